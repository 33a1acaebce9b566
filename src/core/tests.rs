use std::time::Duration;

use proptest::prelude::*;

use super::fixtures::{depth, pod, pool, pool_yaml, t};
use super::*;
use crate::crd::{Phase, TestRunnerPool, WorkersStatus};

fn rev() -> String {
    revision(&pool().spec)
}

fn with_status(mut p: TestRunnerPool, status: TestRunnerPoolStatus) -> TestRunnerPool {
    p.status = Some(status);
    p
}

fn condition(plan: &Plan, type_: ConditionType) -> &crate::crd::Condition {
    plan.status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("no {type_} condition"))
}

#[test]
fn desired_follows_the_queue_within_bounds() {
    let p = pool();
    assert_eq!(desired_workers(&p.spec, 0, 0, 0), 0);
    assert_eq!(desired_workers(&p.spec, 3, 0, 0), 3);
    // ready tickets plus the ones the consumers hold
    assert_eq!(desired_workers(&p.spec, 2, 2, 0), 4);
    // clamped to maxWorkers (5)
    assert_eq!(desired_workers(&p.spec, 100, 4, 0), 5);
    let mut spec = p.spec.clone();
    spec.scaling.tickets_per_worker = 4;
    spec.scaling.min_workers = 1;
    assert_eq!(desired_workers(&spec, 9, 0, 0), 3);
    assert_eq!(desired_workers(&spec, 0, 0, 0), 1);
}

#[test]
fn a_surge_creates_the_missing_workers_with_an_event() {
    let plan = plan(&pool(), &depth(3, 0, vec![]), t(0));
    assert_eq!(plan.created(), 3);
    assert!(plan.delete.is_empty());
    assert_eq!(plan.status.phase, Some(Phase::Scaling));
    let ev = plan.events.iter().find(|e| e.reason == "ScaledUp").unwrap();
    assert_eq!(ev.note, "Scaling up from 0 to 3 workers (3 tickets ready)");
    assert_eq!(plan.create[0].revision, rev());
}

#[test]
fn pending_pods_count_as_capacity_on_its_way() {
    let pods = vec![
        pod("unit-a", &rev(), PodState::Pending, 0),
        pod("unit-b", &rev(), PodState::Starting, 0),
    ];
    let plan = plan(&pool(), &depth(3, 0, pods), t(10));
    assert_eq!(plan.created(), 1);
    let w = plan.status.workers.unwrap();
    assert_eq!((w.desired, w.current, w.ready), (3, 2, 0));
}

#[test]
fn scale_down_waits_for_its_delay_then_removes_pending_pods_first() {
    let pods = vec![
        pod("unit-old", &rev(), PodState::Ready, 0),
        pod("unit-new", &rev(), PodState::Ready, 50),
        pod("unit-pend", &rev(), PodState::Pending, 60),
    ];
    let first = plan(&pool(), &depth(0, 0, pods.clone()), t(100));
    assert_eq!(first.created(), 0);
    assert!(first.delete.is_empty(), "no scale-down before the delay");
    let since = first.status.workers.as_ref().unwrap().surplus_since.clone();
    assert_eq!(since.as_ref().map(|s| s.0), Some(t(100)));
    assert_eq!(first.requeue_after, Duration::from_secs(120));

    let p = with_status(pool(), first.status.clone());
    let early = plan(&p, &depth(0, 0, pods.clone()), t(219));
    assert!(early.delete.is_empty());
    assert_eq!(early.requeue_after, Duration::from_secs(1));

    let due = plan(&p, &depth(0, 0, pods), t(220));
    assert_eq!(due.delete, vec!["unit-pend", "unit-new", "unit-old"]);
    assert!(due.events.iter().any(|e| e.reason == "ScaledDown"));
    assert_eq!(due.status.workers.unwrap().surplus_since, None);
}

#[test]
fn the_surplus_timer_resets_when_tickets_come_back() {
    let pods = vec![pod("unit-a", &rev(), PodState::Ready, 0)];
    let first = plan(&pool(), &depth(0, 0, pods.clone()), t(0));
    assert!(
        first
            .status
            .workers
            .as_ref()
            .unwrap()
            .surplus_since
            .is_some()
    );
    let p = with_status(pool(), first.status);
    let busy = plan(&p, &depth(1, 1, pods.clone()), t(60));
    assert_eq!(busy.status.workers.as_ref().unwrap().surplus_since, None);
    let p = with_status(pool(), busy.status);
    let again = plan(&p, &depth(0, 0, pods), t(200));
    assert!(again.delete.is_empty(), "the delay starts over");
}

#[test]
fn an_unreachable_broker_holds_the_current_workers() {
    let pods = vec![
        pod("unit-a", &rev(), PodState::Ready, 0),
        pod("unit-b", &rev(), PodState::Ready, 0),
    ];
    let observed = Observed {
        pods,
        broker: BrokerView::Unreachable {
            reason: "ConnectionFailed".into(),
            message: "connection failed: Connection refused".into(),
            since: t(0),
        },
        config_problem: None,
        ..Default::default()
    };
    let plan = plan(&pool(), &observed, t(1000));
    assert_eq!((plan.created(), plan.delete.len()), (0, 0));
    assert_eq!(plan.status.workers.as_ref().unwrap().desired, 2);
    assert_eq!(plan.status.phase, Some(Phase::Degraded));
    let c = condition(&plan, ConditionType::BrokerReachable);
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "ConnectionFailed")
    );
    assert!(
        plan.events
            .iter()
            .any(|e| e.reason == "BrokerUnreachable" && e.warning)
    );
    assert_eq!(plan.requeue_after, CONFIG_RETRY);

    // Recovery: the event says so, once.
    let recovered = super::plan(
        &with_status(pool(), plan.status.clone()),
        &depth(2, 2, vec![]),
        t(1010),
    );
    assert!(
        recovered
            .events
            .iter()
            .any(|e| e.reason == "BrokerRecovered")
    );
    assert!(
        !recovered
            .events
            .iter()
            .any(|e| e.reason == "BrokerUnreachable")
    );
    let still = super::plan(&with_status(pool(), plan.status), &observed, t(1020));
    assert!(
        !still.events.iter().any(|e| e.reason == "BrokerUnreachable"),
        "no repeated event while the outage lasts"
    );
}

#[test]
fn paused_pools_neither_create_nor_delete() {
    let mut p = pool();
    p.spec.paused = true;
    let plan = plan(
        &p,
        &depth(4, 0, vec![pod("x", "old", PodState::Finished, 0)]),
        t(0),
    );
    assert_eq!(plan.created(), 0);
    assert_eq!(plan.delete, vec!["x"], "finished pods are still cleaned up");
    assert_eq!(plan.status.phase, Some(Phase::Paused));
    assert_eq!(condition(&plan, ConditionType::Ready).reason, "Paused");
}

#[test]
fn spec_problems_are_reported_once_and_stop_scaling() {
    let mut observed = depth(4, 0, vec![]);
    observed.config_problem = Some(ConfigProblem::SecretNotFound {
        name: "rabbitmq".into(),
    });
    let first = plan(&pool(), &observed, t(0));
    assert_eq!(first.created(), 0);
    let c = condition(&first, ConditionType::Degraded);
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("True", "SecretNotFound")
    );
    assert!(c.message.contains("\"rabbitmq\""));
    assert_eq!(
        first
            .events
            .iter()
            .filter(|e| e.reason == "InvalidSpec")
            .count(),
        1
    );
    let second = plan(&with_status(pool(), first.status), &observed, t(5));
    assert!(second.events.iter().all(|e| e.reason != "InvalidSpec"));
}

#[test]
fn wrapped_mode_without_a_command_is_a_spec_problem() {
    let mut p = pool();
    p.spec.workload.command.clear();
    let plan = plan(&p, &depth(1, 0, vec![]), t(0));
    assert_eq!(plan.created(), 0);
    assert!(
        condition(&plan, ConditionType::Degraded)
            .message
            .contains("spec.command")
    );
}

#[test]
fn durations_below_the_minimum_are_reported() {
    let mut p = pool();
    p.spec.scaling.poll_interval = "10ms".into();
    let err = settings(&p.spec).unwrap_err();
    assert_eq!(err.reason(), "InvalidSpec");
    assert!(err.message().contains("spec.scaling.pollInterval"));
    p.spec.scaling.poll_interval = "1m30s".into();
    assert_eq!(
        settings(&p.spec).unwrap().poll_interval,
        Duration::from_secs(90)
    );
}

#[test]
fn a_missing_queue_holds_workers_and_warns() {
    let observed = Observed {
        pods: vec![pod("unit-a", &rev(), PodState::Ready, 0)],
        broker: BrokerView::QueueNotFound { at: t(0) },
        config_problem: None,
        ..Default::default()
    };
    let plan = plan(&pool(), &observed, t(0));
    assert_eq!((plan.created(), plan.delete.len()), (0, 0));
    assert_eq!(
        condition(&plan, ConditionType::Degraded).reason,
        "QueueNotFound"
    );
    assert!(plan.events.iter().any(|e| e.reason == "QueueNotFound"));
}

#[test]
fn steady_state_is_ready_and_writes_no_status() {
    let pods = vec![
        pod("unit-a", &rev(), PodState::Ready, 0),
        pod("unit-b", &rev(), PodState::Ready, 0),
    ];
    let mut p = pool();
    p.spec.scaling.min_workers = 2;
    let first = plan(&p, &depth(0, 2, pods.clone()), t(0));
    assert_eq!(first.status.phase, Some(Phase::Running));
    assert_eq!(condition(&first, ConditionType::Ready).status, "True");
    assert!(status_changed(None, &first.status));
    let p = with_status(p, first.status.clone());
    // A later probe with the same numbers: only timestamps differ.
    let mut observed = depth(0, 2, pods);
    observed.broker = BrokerView::Depth {
        ready: 0,
        consumers: 2,
        at: t(30),
    };
    let second = plan(&p, &observed, t(30));
    assert!(!status_changed(Some(&first.status), &second.status));
    assert_eq!(
        condition(&second, ConditionType::Ready).last_transition_time,
        condition(&first, ConditionType::Ready).last_transition_time,
        "lastTransitionTime only moves on a transition"
    );
}

#[test]
fn a_new_revision_replaces_pods_one_at_a_time() {
    let old = "0000000000";
    let new = rev();
    let pods = vec![
        pod("unit-a", old, PodState::Ready, 0),
        pod("unit-b", old, PodState::Ready, 0),
    ];
    // Two tickets in flight, none waiting beyond them: the pool is at size.
    let mut p = pool();
    p.spec.scaling.min_workers = 2;
    let step1 = plan(&p, &depth(0, 2, pods.clone()), t(0));
    assert_eq!((step1.created(), step1.delete.len()), (1, 0));
    // While it starts: wait.
    let mut pods2 = pods.clone();
    pods2.push(pod("unit-c", &new, PodState::Starting, 1));
    let step2 = plan(&p, &depth(0, 2, pods2.clone()), t(1));
    assert_eq!((step2.created(), step2.delete.len()), (0, 0));
    // Once ready: one outdated pod drains.
    pods2[2].state = PodState::Ready;
    let step3 = plan(&p, &depth(0, 2, pods2), t(2));
    assert_eq!(step3.created(), 0);
    assert_eq!(step3.delete.len(), 1);
    assert!(step3.delete[0] == "unit-a" || step3.delete[0] == "unit-b");
}

#[test]
fn revision_is_stable_and_tracks_what_goes_into_pods() {
    let a = pool();
    assert_eq!(revision(&a.spec), revision(&pool().spec));
    let mut b = pool();
    b.spec.workload.image = "registry.example/test-runner:2".into();
    assert_ne!(revision(&a.spec), revision(&b.spec));
    let mut c = pool();
    c.spec.scaling.max_workers = 9;
    assert_eq!(
        revision(&a.spec),
        revision(&c.spec),
        "scaling is not a revision"
    );
}

#[test]
fn yaml_fixture_gets_spec_defaults() {
    let p = pool_yaml(
        r#"
apiVersion: testrunner.dev/v1alpha1
kind: TestRunnerPool
metadata: {name: x, namespace: ci}
spec:
  image: i
  command: [c]
  queue: {name: q, connectionSecretRef: {name: s}}
"#,
    );
    assert_eq!(p.spec.queue.connection_secret_ref.key, "uri");
    assert_eq!(p.spec.scaling.max_workers, 10);
    assert_eq!(p.spec.queue.quarantine_queue_name(), "q.quarantine");
}

// ---- properties ----

fn arb_state() -> impl Strategy<Value = PodState> {
    prop_oneof![
        Just(PodState::Pending),
        Just(PodState::Starting),
        Just(PodState::Ready),
        Just(PodState::Terminating),
        Just(PodState::Finished),
    ]
}

fn arb_broker() -> impl Strategy<Value = BrokerView> {
    prop_oneof![
        4 => (0u64..200, 0u64..30).prop_map(|(ready, consumers)| BrokerView::Depth { ready, consumers, at: t(0) }),
        1 => Just(BrokerView::NotProbed),
        1 => Just(BrokerView::QueueNotFound { at: t(0) }),
        1 => Just(BrokerView::Unreachable { reason: "ConnectionFailed".into(), message: "down".into(), since: t(0) }),
    ]
}

fn arb_activity() -> impl Strategy<Value = Activity> {
    prop_oneof![
        Just(Activity::Untracked),
        Just(Activity::Unknown),
        Just(Activity::Idle),
        Just(Activity::Busy {
            ticket: "t-1".into()
        }),
    ]
}

prop_compose! {
    fn arb_case()(
        min in 0i32..6,
        extra in 0i32..10,
        per in 1i32..4,
        states in proptest::collection::vec((arb_state(), any::<bool>(), arb_activity()), 0..20),
        broker in arb_broker(),
        surplus_age in proptest::option::of(0i64..400),
        paused in any::<bool>(),
    ) -> (TestRunnerPool, Observed, Option<i64>) {
        let mut p = pool();
        p.spec.scaling.min_workers = min;
        p.spec.scaling.max_workers = min + extra;
        p.spec.scaling.tickets_per_worker = per;
        p.spec.paused = paused;
        let r = rev();
        let pods = states.iter().enumerate().map(|(i, (s, fresh, activity))| PodView {
            activity: activity.clone(),
            ..pod(&format!("unit-{i}"), if *fresh { &r } else { "0000000000" }, *s, i as i64)
        }).collect();
        (p, Observed { pods, broker, config_problem: None, ..Default::default() }, surplus_age)
    }
}

fn live(o: &Observed) -> i32 {
    o.pods
        .iter()
        .filter(|p| !matches!(p.state, PodState::Terminating | PodState::Finished))
        .count() as i32
}

proptest! {
    #[test]
    fn never_above_max_nor_below_min((p, observed, surplus_age) in arb_case()) {
        let now = t(1000);
        let pool = with_status(p.clone(), TestRunnerPoolStatus {
            workers: Some(WorkersStatus {
                surplus_since: surplus_age.map(|a| k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(t(1000 - a))),
                ..Default::default()
            }),
            ..Default::default()
        });
        let plan = plan(&pool, &observed, now);
        let w = plan.status.workers.clone().unwrap();
        prop_assert!(w.desired >= p.spec.scaling.min_workers && w.desired <= p.spec.scaling.max_workers);
        let live_before = live(&observed);
        let scaled_down = plan.delete.iter().filter(|n| {
            observed.pods.iter().any(|p| &p.name == *n && !matches!(p.state, PodState::Terminating | PodState::Finished))
        }).count() as i32;
        let after = live_before + plan.created() as i32 - scaled_down;
        // Creating never goes past max plus the one-pod surge of a revision change.
        if plan.created() > 0 {
            prop_assert!(after <= p.spec.scaling.max_workers.max(live_before) + 1);
        }
        // Deleting never goes below what is wanted, nor below min.
        if scaled_down > 0 {
            prop_assert!(after >= w.desired.min(live_before));
            prop_assert!(after >= p.spec.scaling.min_workers.min(live_before));
        }
        // Paused pools and pools without numbers never scale.
        if p.spec.paused {
            prop_assert_eq!(plan.created(), 0);
            prop_assert_eq!(scaled_down, 0);
        }
        if !matches!(observed.broker, BrokerView::Depth { .. }) {
            let outdated = observed.pods.iter().any(|p| p.revision != rev() && !matches!(p.state, PodState::Terminating | PodState::Finished));
            if live_before >= p.spec.scaling.min_workers && !outdated {
                prop_assert_eq!(plan.created(), 0, "no scale-up without numbers beyond min");
            }
            prop_assert!(after >= live_before.min(p.spec.scaling.max_workers), "an outage never scales down");
        }
        // Every deletion names a pod of the pool; terminating pods are never deleted
        // again, and a pod whose worker may hold a ticket is never deleted.
        for name in &plan.delete {
            let pod = observed.pods.iter().find(|p| &p.name == name);
            prop_assert!(pod.is_some());
            let pod = pod.unwrap();
            prop_assert!(pod.state != PodState::Terminating);
            prop_assert!(pod.removable() || pod.state == PodState::Finished, "deleted {:?}", pod);
        }
        // Busy workers are counted in the desired ones (within maxWorkers).
        let busy = observed.pods.iter().filter(|p| p.busy()).count() as i32;
        prop_assert_eq!(w.busy, busy);
        if !p.spec.paused && matches!(observed.broker, BrokerView::Depth { .. }) {
            prop_assert!(w.desired >= busy.min(p.spec.scaling.max_workers));
        }
    }

    #[test]
    fn scale_down_waits_for_the_delay(
        (p, observed, _) in arb_case(),
        age in 0i64..119,
    ) {
        // Single revision, queue numbers known: a scale-down happens only after the delay.
        let r = rev();
        let mut observed = observed;
        for pod in &mut observed.pods { pod.revision = r.clone(); }
        let pool = with_status(p, TestRunnerPoolStatus {
            workers: Some(WorkersStatus {
                surplus_since: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(t(1000 - age))),
                ..Default::default()
            }),
            ..Default::default()
        });
        let plan = plan(&pool, &observed, t(1000));
        let live_deleted = plan.delete.iter().filter(|n| {
            observed.pods.iter().any(|p| &p.name == *n && !matches!(p.state, PodState::Terminating | PodState::Finished))
        }).count();
        prop_assert_eq!(live_deleted, 0);
    }

    #[test]
    fn while_tickets_wait_busy_consumers_are_not_removed(
        ready in 1u64..50,
        busy in 0usize..8,
        idle_pending in 0usize..5,
        max in 1i32..20,
    ) {
        // With prefetch 1 and tickets ready, each consumer holds a ticket. With one
        // ticket per worker, desired covers every consumer, so only pods that are not
        // consuming (Pending ones here) can be surplus.
        let mut p = pool();
        p.spec.scaling.max_workers = max.max(busy as i32);
        let r = rev();
        let mut pods: Vec<PodView> = (0..busy).map(|i| pod(&format!("busy-{i}"), &r, PodState::Ready, 0)).collect();
        pods.extend((0..idle_pending).map(|i| pod(&format!("pend-{i}"), &r, PodState::Pending, 1)));
        let observed = depth(ready, busy as u64, pods);
        let pool = with_status(p, TestRunnerPoolStatus {
            workers: Some(WorkersStatus { surplus_since: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(t(0))), ..Default::default() }),
            ..Default::default()
        });
        let plan = plan(&pool, &observed, t(10_000));
        prop_assert!(plan.delete.iter().all(|n| n.starts_with("pend-")), "{:?}", plan.delete);
    }

    #[test]
    fn never_zero_workers_while_tickets_wait(ready in 1u64..100, consumers in 0u64..10, max in 1i32..30) {
        let mut p = pool();
        p.spec.scaling.max_workers = max;
        let plan = plan(&p, &depth(ready, consumers, vec![]), t(0));
        prop_assert!(plan.created() >= 1);
    }
}

#[test]
fn a_crash_is_reported_at_once_and_only_once() {
    use crate::core::crash::{CrashRecord, InHand};
    let pods = vec![pod("unit-a", &rev(), PodState::Starting, 0)];
    let mut observed = depth(3, 0, pods);
    observed.crashes = vec![CrashRecord {
        id: "uid-a/0/1800000010".into(),
        pod: "unit-a".into(),
        revision: rev(),
        image: "registry.example/test-runner:1".into(),
        in_hand: InHand::Ticket {
            id: "t-7".into(),
            delivery: 2,
        },
        exit_code: 3,
        signal: None,
        reason: "Error".into(),
        at: t(10),
    }];
    let first = plan(&pool(), &observed, t(20));
    let crashed: Vec<_> = first
        .events
        .iter()
        .filter(|e| e.reason == "WorkerCrashed")
        .collect();
    assert_eq!(crashed.len(), 1);
    assert!(crashed[0].warning);
    assert_eq!(
        crashed[0].note,
        "Worker pod unit-a (image registry.example/test-runner:1) crashed on ticket t-7 (delivery 2): exit code 3"
    );
    assert_eq!(first.status.crashes.len(), 1);
    assert_eq!(first.status.crashes[0].ticket.as_deref(), Some("t-7"));
    // One crash on one ticket is no verdict yet.
    assert_eq!(first.status.diagnosis.as_ref().unwrap().verdict, "Healthy");

    // The same termination seen again (next reconcile, a re-list, a restart) is not new.
    let second = plan(&with_status(pool(), first.status.clone()), &observed, t(30));
    assert!(second.events.iter().all(|e| e.reason != "WorkerCrashed"));
    assert_eq!(second.status.crashes, first.status.crashes);
}

#[test]
fn a_crash_before_the_consume_loop_degrades_the_pool_with_the_diagnosis() {
    use crate::core::crash::{CrashRecord, InHand};
    let mut observed = depth(3, 0, vec![pod("unit-a", &rev(), PodState::Starting, 0)]);
    observed.crashes = vec![CrashRecord {
        id: "uid-a/0/1800000010".into(),
        pod: "unit-a".into(),
        revision: rev(),
        image: "registry.example/test-runner:1".into(),
        in_hand: InHand::Starting,
        exit_code: 1,
        signal: None,
        reason: "Error".into(),
        at: t(10),
    }];
    let plan = plan(&pool(), &observed, t(20));
    assert_eq!(plan.status.phase, Some(Phase::Degraded));
    let c = condition(&plan, ConditionType::Degraded);
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("True", "BrokenEnvironment")
    );
    assert!(c.message.contains("tickets are held"), "{}", c.message);
    assert!(
        plan.events
            .iter()
            .any(|e| e.reason == "BrokenEnvironment" && e.warning)
    );
    assert!(
        plan.events
            .iter()
            .any(|e| e.reason == "WorkerCrashed" && e.note.contains("with no ticket in hand"))
    );
    // Tickets wait for the environment to get better; one worker stays to find out
    // (more would only crash), and three waiting tickets add none.
    assert_eq!(plan.created(), 0);
    assert_eq!(plan.status.workers.as_ref().unwrap().desired, 1);
}

fn with_activity(mut p: PodView, activity: Activity) -> PodView {
    p.activity = activity;
    p
}

fn busy_on(ticket: &str) -> Activity {
    Activity::Busy {
        ticket: ticket.into(),
    }
}

#[test]
fn a_busy_worker_is_never_removed_to_shrink_the_pool() {
    let p = pool();
    let r = rev();
    let busy = busy_on("long-1");
    let pods = vec![
        with_activity(pod("unit-busy", &r, PodState::Ready, 0), busy.clone()),
        with_activity(pod("unit-idle", &r, PodState::Ready, 1), Activity::Idle),
        with_activity(
            pod("unit-unknown", &r, PodState::Ready, 2),
            Activity::Unknown,
        ),
    ];
    // The queue is empty; the surplus timer ran out long ago.
    let waited = with_status(
        p,
        TestRunnerPoolStatus {
            workers: Some(WorkersStatus {
                surplus_since: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(t(
                    -3600,
                ))),
                ..Default::default()
            }),
            ..Default::default()
        },
    );
    let plan = plan(&waited, &depth(0, 3, pods.clone()), t(0));
    let w = plan.status.workers.clone().unwrap();
    assert_eq!(w.busy, 1);
    assert_eq!(w.desired, 1, "the busy worker is desired");
    assert_eq!(plan.delete, vec!["unit-idle".to_string()]);
    assert!(
        w.surplus_since.is_some(),
        "the surplus the unknown pod holds is still pending"
    );

    // Once it reports idle, the surplus goes at once.
    let done: Vec<PodView> = pods
        .into_iter()
        .filter(|p| p.name != "unit-idle")
        .map(|p| with_activity(p, Activity::Idle))
        .collect();
    let later = with_status(waited.clone(), plan.status.clone());
    let plan = super::plan(&later, &depth(0, 2, done), t(5));
    let mut deleted = plan.delete.clone();
    deleted.sort();
    assert_eq!(deleted, vec!["unit-busy", "unit-unknown"]);
}

#[test]
fn busy_workers_count_as_desired_with_tickets_per_worker() {
    let mut p = pool();
    p.spec.scaling.tickets_per_worker = 4;
    assert_eq!(desired_workers(&p.spec, 0, 3, 3), 3);
    assert_eq!(desired_workers(&p.spec, 4, 3, 3), 3);
    assert_eq!(desired_workers(&p.spec, 12, 3, 1), 4);
    // maxWorkers (5) still bounds the want; the busy pods above it stay until done.
    assert_eq!(desired_workers(&p.spec, 0, 7, 7), 5);
}

#[test]
fn an_outdated_busy_worker_is_replaced_when_its_ticket_is_done() {
    let p = pool();
    let r = rev();
    let busy = busy_on("long-1");
    let pods = vec![
        with_activity(pod("unit-old", "0000000000", PodState::Ready, 0), busy),
        with_activity(pod("unit-new", &r, PodState::Ready, 1), Activity::Idle),
    ];
    let plan = plan(&p, &depth(0, 2, pods.clone()), t(0));
    assert!(plan.delete.is_empty(), "{:?}", plan.delete);
    let idle: Vec<PodView> = pods
        .into_iter()
        .map(|p| with_activity(p, Activity::Idle))
        .collect();
    let plan = super::plan(&p, &depth(0, 2, idle), t(1));
    assert_eq!(plan.delete, vec!["unit-old".to_string()]);
}
