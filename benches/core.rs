//! Cost of one pure decision (`core::plan`) as the pool grows.
//!
//! Run with `cargo bench --bench core`. Method and figures: docs/benchmarks.md.

use std::hint::black_box;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use testrunner_operator::core::{self, Activity, BrokerView, Observed, PodState, PodView};
use testrunner_operator::crd::{TestRunnerPool, TestRunnerPoolStatus, WorkersStatus};

fn pool(max: i32) -> TestRunnerPool {
    let mut pool: TestRunnerPool = serde_json::from_value(serde_json::json!({
        "apiVersion": "testrunner.dev/v1alpha1",
        "kind": "TestRunnerPool",
        "metadata": {"name": "bench", "namespace": "ci", "generation": 1},
        "spec": {
            "image": "registry.example/test-runner:1",
            "command": ["/run-tests"],
            "queue": {"name": "tickets", "connectionSecretRef": {"name": "rabbitmq"}},
        }
    }))
    .unwrap();
    pool.spec.scaling.max_workers = max;
    pool
}

fn observed(pods: usize, revision: &str, now: Timestamp) -> Observed {
    Observed {
        pods: (0..pods)
            .map(|i| PodView {
                name: format!("bench-{i:05}"),
                revision: revision.to_string(),
                state: match i % 10 {
                    0 => PodState::Pending,
                    1 => PodState::Starting,
                    _ => PodState::Ready,
                },
                created: now,
                // Half the running workers hold a ticket.
                activity: if i % 2 == 0 {
                    Activity::Busy {
                        ticket: format!("t-{i}"),
                    }
                } else {
                    Activity::Idle
                },
            })
            .collect(),
        broker: BrokerView::Depth {
            ready: pods as u64 / 2,
            consumers: pods as u64,
            at: now,
        },
        config_problem: None,
        ..Default::default()
    }
}

/// Median time per call over `rounds` rounds of `iters` calls.
fn measure(mut f: impl FnMut(), iters: u32, rounds: usize) -> Duration {
    let mut samples: Vec<Duration> = (0..rounds)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..iters {
                f();
            }
            start.elapsed() / iters
        })
        .collect();
    samples.sort();
    samples[rounds / 2]
}

fn main() {
    let now = Timestamp::now();
    println!(
        "{:>8} {:>14} {:>14} {:>14}",
        "pods", "plan (median)", "scale-down", "mid-rollout"
    );
    for pods in [0usize, 10, 100, 1000, 5000] {
        let p = pool(pods as i32 + 10);
        let rev = core::revision(&p.spec);
        let obs = observed(pods, &rev, now);
        let steady = measure(
            || {
                black_box(core::plan(black_box(&p), black_box(&obs), now));
            },
            200,
            21,
        );
        // Scale-down from `pods` to zero, the delay long past: orders every pod.
        let empty = Observed {
            broker: BrokerView::Depth {
                ready: 0,
                consumers: 0,
                at: now,
            },
            ..obs.clone()
        };
        let mut waited = p.clone();
        waited.status = Some(TestRunnerPoolStatus {
            workers: Some(WorkersStatus {
                surplus_since: Some(Time(now - jiff::SignedDuration::from_hours(1))),
                ..Default::default()
            }),
            ..Default::default()
        });
        assert_eq!(core::plan(&waited, &empty, now).delete.len(), pods);
        let down = measure(
            || {
                black_box(core::plan(black_box(&waited), black_box(&empty), now));
            },
            200,
            21,
        );
        // A rollout in progress: the stable pods, one canary, and the canary's evidence
        // (999 completions reported for its revision, the last 100 remembered, 99 of
        // them since the rollout started; 19 crashes on record).
        let mut rolling = p.clone();
        rolling.status = Some(core::plan(&p, &obs, now).status);
        rolling.spec.workload.image = "registry.example/test-runner:2".into();
        rolling.spec.rollout.promote_after_tickets = 100;
        let canary = core::revision(&rolling.spec);
        let mut mid = obs.clone();
        mid.pods.push(PodView {
            name: "bench-canary".into(),
            revision: canary.clone(),
            state: PodState::Ready,
            created: now,
            activity: Activity::Idle,
        });
        rolling.status = Some(core::plan(&rolling, &mid, now).status);
        for i in 0..999 {
            // Most of them before the rollout started: only the recent ones count.
            let at = if i < 900 {
                now - jiff::SignedDuration::from_hours(1)
            } else {
                now
            };
            mid.completions
                .record(&canary, Some(&format!("ticket-{i}")), at);
        }
        let crashes = rolling.status.as_mut().unwrap();
        crashes.crashes = (0..19)
            .map(|i| testrunner_operator::crd::CrashStatus {
                id: format!("crash-{i}"),
                pod: format!("bench-{i:05}"),
                revision: rev.clone(),
                image: "registry.example/test-runner:1".into(),
                ticket: Some(format!("poison-{}", i % 3)),
                delivery: Some(1),
                state: None,
                exit_code: 1,
                signal: None,
                reason: "Error".into(),
                at: Time(now),
            })
            .collect();
        let r = core::plan(&rolling, &mid, now).status.rollout.unwrap();
        assert_eq!(r.canary_tickets_ok, 99, "{}", r.message);
        let rollout = measure(
            || {
                black_box(core::plan(black_box(&rolling), black_box(&mid), now));
            },
            50,
            21,
        );
        println!("{pods:>8} {:>14?} {:>14?} {:>14?}", steady, down, rollout);
    }
}
