//! Surge reaction, end to end: from the publish of a surge of tickets into an idle pool
//! to the operator's pod create requests, and to the first ticket started, over repeated
//! surges, on the simulated cluster with the local RabbitMQ (and on a real control plane
//! with `--control-plane DIR`).
//!
//! ```text
//! cargo bench --bench reaction
//! cargo bench --bench reaction -- --surges 30 --tickets 5 --poll-interval 1s
//! cargo bench --bench reaction -- --control-plane target/control-plane/bin
//! ```
//!
//! Results: `$CARGO_TARGET_DIR/bench/reaction.json` (target/bench/ when unset). Method and
//! figures: docs/benchmarks.md.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::CustomResourceExt;
use kube::api::{Api, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::json;
use testrunner_operator::controller::{self, Settings};
use testrunner_operator::crd::TestRunnerPool;
use testrunner_sim as sim;

#[path = "common/mod.rs"]
mod common;
use common::{quantile, until};

struct Args {
    surges: usize,
    tickets: usize,
    poll_interval: Duration,
    control_plane: Option<PathBuf>,
    amqp_uri: String,
}

fn usage() -> ! {
    eprintln!(
        "usage: cargo bench --bench reaction [-- [--surges N] [--tickets N] [--poll-interval DURATION] [--control-plane DIR] [--amqp-uri URI]]"
    );
    std::process::exit(2)
}

fn args() -> Args {
    let mut out = Args {
        surges: 20,
        tickets: 5,
        poll_interval: Duration::from_secs(1),
        control_plane: None,
        amqp_uri: std::env::var("TESTRUNNER_AMQP_URI")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage());
        match arg.as_str() {
            "--bench" => {}
            "--surges" => {
                out.surges = value()
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .unwrap_or_else(|| usage())
            }
            "--tickets" => {
                out.tickets = value()
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .unwrap_or_else(|| usage())
            }
            "--poll-interval" => {
                out.poll_interval = humantime::parse_duration(&value()).unwrap_or_else(|_| usage())
            }
            "--control-plane" => out.control_plane = Some(PathBuf::from(value())),
            "--amqp-uri" => out.amqp_uri = value(),
            _ => usage(),
        }
    }
    out
}

/// How often a wait looks again ([`common::until`]).
const POLL: Duration = Duration::from_millis(20);

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = args();
    let tag = format!(
        "{}-{}",
        std::process::id(),
        jiff::Timestamp::now().as_millisecond()
    );
    let queue = format!("bench-reaction-{tag}");
    let ledger = std::env::temp_dir().join(format!("bench-reaction-{tag}"));
    std::fs::create_dir_all(&ledger).unwrap();

    let conn = Connection::connect(&args.amqp_uri, ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| {
            panic!("the broker does not answer ({e}); start it with `bash .ci/ensure-rabbitmq`")
        });
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut queue_args = FieldTable::default();
    queue_args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    queue_args.insert("x-expires".into(), AMQPValue::LongInt(600_000));
    for q in [queue.clone(), format!("{queue}.quarantine")] {
        ch.queue_declare(
            q.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            queue_args.clone(),
        )
        .await
        .unwrap();
    }

    let options = sim::Options {
        crds: vec![TestRunnerPool::crd()],
        secrets: vec![sim::Options::string_secret(
            "rabbitmq",
            "uri",
            &args.amqp_uri,
        )],
        ..sim::Options::new(env!("CARGO_BIN_EXE_testrunner-operator").into())
    };
    let (cluster, on) = match &args.control_plane {
        None => (
            sim::Simulation::start("127.0.0.1:0".parse().unwrap(), options)
                .await
                .expect("the simulated cluster starts"),
            "embedded",
        ),
        Some(dir) => (
            sim::Simulation::start_on_control_plane(dir, options)
                .await
                .unwrap_or_else(|e| {
                    panic!("the control plane in {} did not start: {e}", dir.display())
                }),
            "control-plane",
        ),
    };
    let client = cluster.client();
    // Its own outcome queue: tests may run operators on the same broker and namespace.
    let operator = controller::spawn(
        client.clone(),
        Settings::in_process(vec!["default".into()])
            .with_outcome_queue_prefix(&format!("{queue}.outcomes")),
    );
    let pools: Api<TestRunnerPool> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");

    // Every pod the pool gets, with the time this process saw it created.
    let created: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let seen = created.clone();
    let known: Arc<Mutex<std::collections::BTreeSet<String>>> = Arc::default();
    let watch = tokio::spawn(
        watcher(
            pods.clone(),
            watcher::Config::default().labels("testrunner.dev/pool=reaction"),
        )
        .applied_objects()
        .for_each(move |p| {
            if let Ok(p) = p {
                let uid = p.metadata.uid.unwrap_or_default();
                if known.lock().unwrap().insert(uid) {
                    seen.lock().unwrap().push(Instant::now());
                }
            }
            std::future::ready(())
        }),
    );

    let poll = format!("{}ms", args.poll_interval.as_millis());
    let pool: TestRunnerPool = serde_json::from_value(json!({
        "apiVersion": "testrunner.dev/v1alpha1", "kind": "TestRunnerPool",
        "metadata": {"name": "reaction"},
        "spec": {"image": "example.org/runner:1",
            // The start of each ticket, in nanoseconds since the epoch.
            "command": ["sh", "-c", format!("date +%s%N >> {}/started; cat >/dev/null", ledger.display())],
            "queue": {"name": queue, "connectionSecretRef": {"name": "rabbitmq"}},
            "scaling": {"minWorkers": 0, "maxWorkers": args.tickets, "pollInterval": poll,
                "scaleDownDelay": "1s"},
            "template": {"terminationGracePeriodSeconds": 5}},
    }))
    .unwrap();
    pools.create(&PostParams::default(), &pool).await.unwrap();

    let started_count = || {
        std::fs::read_to_string(ledger.join("started"))
            .unwrap_or_default()
            .lines()
            .count()
    };
    let first_start_after = |at_ns: u128| {
        std::fs::read_to_string(ledger.join("started"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse::<u128>().ok())
            .filter(|t| *t >= at_ns)
            .min()
    };
    let mut to_create = Vec::new();
    let mut to_first_ticket = Vec::new();
    let mut done = 0;
    for surge in 0..args.surges {
        // Idle: no pods, nothing queued; then the pool has been probed at least once
        // more, so the surge lands at a random point of the probe cycle.
        until(
            "the pool to be idle",
            Duration::from_secs(120),
            POLL,
            async || {
                pods.list(&Default::default())
                    .await
                    .is_ok_and(|l| l.items.is_empty())
            },
        )
        .await;
        let jitter = Duration::from_millis(
            rand::random::<u64>() % args.poll_interval.as_millis().max(1) as u64,
        );
        tokio::time::sleep(args.poll_interval + jitter).await;

        let before = created.lock().unwrap().len();
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let t0 = Instant::now();
        for i in 0..args.tickets {
            let confirm = ch
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    b"",
                    BasicProperties::default()
                        .with_message_id(format!("s{surge}-t{i}").into())
                        .with_delivery_mode(2),
                )
                .await
                .unwrap()
                .await
                .unwrap();
            assert!(confirm.is_ack());
        }
        until(
            "the first pod create",
            Duration::from_secs(60),
            POLL,
            async || created.lock().unwrap().len() > before,
        )
        .await;
        let create = created.lock().unwrap()[before] - t0;
        until(
            "the first ticket to start",
            Duration::from_secs(60),
            POLL,
            async || first_start_after(wall).is_some(),
        )
        .await;
        let first = Duration::from_nanos((first_start_after(wall).unwrap() - wall) as u64);
        done += args.tickets;
        until(
            "the surge to complete",
            Duration::from_secs(120),
            POLL,
            async || started_count() >= done,
        )
        .await;
        eprintln!(
            "surge {:>3}: pod create after {:>6.3} s, first ticket after {:>6.3} s",
            surge + 1,
            create.as_secs_f64(),
            first.as_secs_f64()
        );
        to_create.push(create);
        to_first_ticket.push(first);
    }

    let poll_s = args.poll_interval.as_secs_f64();
    let result = json!({
        "on": on,
        "surges": args.surges,
        "tickets_per_surge": args.tickets,
        "poll_interval_s": poll_s,
        "p50_to_create_s": quantile(&to_create, 0.5),
        "p99_to_create_s": quantile(&to_create, 0.99),
        "max_to_create_s": quantile(&to_create, 1.0),
        "p50_to_first_ticket_s": quantile(&to_first_ticket, 0.5),
        "p99_to_first_ticket_s": quantile(&to_first_ticket, 0.99),
        "goal_p99_to_create_s": poll_s + 0.2,
    });
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("bench");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(if on == "embedded" {
        "reaction.json"
    } else {
        "reaction-control-plane.json"
    });
    std::fs::write(&file, serde_json::to_string_pretty(&result).unwrap()).unwrap();
    println!("{}", serde_json::to_string_pretty(&result).unwrap());
    println!("written to {}", file.display());

    watch.abort();
    operator.abort();
    cluster.shutdown().await;
    for q in [
        queue.clone(),
        format!("{queue}.quarantine"),
        format!("{queue}.outcomes.default"),
    ] {
        let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
    }
    let _ = conn.close(200, "done".into()).await;
    let _ = std::fs::remove_dir_all(&ledger);
}
