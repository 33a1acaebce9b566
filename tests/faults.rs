//! The fault matrix: each scenario injects one fault into a running pool on the
//! simulated cluster, with the real operator, and counts the tickets it published,
//! completed, redelivered and quarantined through a ticket ledger. Every scenario
//! asserts: no ticket lost, none acknowledged before its command was done (it would be
//! gone from the queue with no `end` in the ledger: lost), none quarantined that was
//! not guilty, and the pool back to its normal size within a stated bound.
//!
//! Each pool's broker is a RabbitMQ node of the scenario's own
//! (`common::broker_node`), so that stopping or restarting it never touches the
//! machine's broker. Each scenario writes its row of the results table
//! (`docs/reliability.md`) as JSON to `<target>/reliability/<module>.<test>.json` and
//! prints it. The scenarios run one at a time: each measures its own recovery.
//!
//! The API server scenarios put a fault-injecting front (`common::api_proxy`) between
//! the operator's client and the API server (500, 429 with `Retry-After`, 409 on
//! writes, dropped watches, slow answers); besides the tickets they count the requests
//! the operator sends during the fault against a bound derived from its retry policies.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, PostParams};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldArray, FieldTable};
use serde_json::json;
use testrunner_operator::controller::{self, Settings};
use testrunner_operator::crd::{TestRunnerPool, TestRunnerPoolStatus};

mod common;
use common::api_proxy::{ApiFault, ApiProxy, Seen};
use common::broker_node::BrokerNode;
use common::ledger::Ledger;
use common::{declare_expiring, eventually, queue_counts};

/// Longest wait, once the broker answers again, for the operator to see it and for
/// the workers to consume again.
const RECOVERY_BOUND: Duration = Duration::from_secs(90);
/// Longest wait, once the fault is over, for every ticket to complete and the pool to
/// be back at `minWorkers`.
const DRAIN_BOUND: Duration = Duration::from_secs(240);
/// The pools' bounds: one to four workers.
const MIN_WORKERS: usize = 1;

/// One fault at a time: each scenario runs a broker node, a cluster and an operator of
/// its own and measures its recovery, which a second scenario's load would distort.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Which API server a scenario's simulated cluster uses.
#[derive(Clone, Copy, Debug)]
enum On {
    /// The embedded, in-process API server.
    Embedded,
    /// A real control plane (see [`on_both`]).
    ControlPlane,
}

impl On {
    /// The module of the scenario's test, as in its name.
    fn module(self) -> &'static str {
        match self {
            On::Embedded => "embedded",
            On::ControlPlane => "control_plane",
        }
    }
}

/// A pool on a broker node of its own, with the operator running, and a ledger.
struct Fault {
    name: &'static str,
    on: On,
    node: Option<BrokerNode>,
    uri: String,
    sim: testrunner_sim::Simulation,
    client: kube::Client,
    pools: Api<TestRunnerPool>,
    pods: Api<Pod>,
    operator: tokio::task::JoinHandle<()>,
    queue: String,
    ledger: Ledger,
    /// The fault-injecting front the operator's client goes through, when the scenario
    /// has one.
    front: Option<ApiProxy>,
}

impl Fault {
    /// Starts the scenario's broker node, the simulated cluster whose Secret points at
    /// it, the operator, and declares the pool's queue and quarantine queue.
    async fn start(name: &'static str, on: On) -> Fault {
        Fault::start_with(name, on, false, 50.0).await
    }

    /// [`Fault::start`], with the operator's client going through a fault-injecting
    /// front of the API server ([`ApiProxy`]); the test's own client goes straight to
    /// the API server.
    async fn start_behind_front(name: &'static str, on: On) -> Fault {
        Fault::start_with(name, on, true, 50.0).await
    }

    /// [`Fault::start`], with the kubelet's durations divided by `time_scale`.
    async fn start_scaled(name: &'static str, on: On, time_scale: f64) -> Fault {
        Fault::start_with(name, on, false, time_scale).await
    }

    async fn start_with(name: &'static str, on: On, behind_front: bool, time_scale: f64) -> Fault {
        let node = tokio::task::spawn_blocking(move || BrokerNode::start(name))
            .await
            .expect("the broker node starts");
        let uri = node.uri();
        let sim = match on {
            On::Embedded => common::simulation(&uri, time_scale).await,
            On::ControlPlane => {
                let bin = common::whole_control_plane_bin();
                testrunner_sim::Simulation::start_on_control_plane(
                    &bin,
                    common::options(&uri, time_scale),
                )
                .await
                .unwrap_or_else(|e| panic!("the real control plane did not start: {e}"))
            }
        };
        if let On::ControlPlane = on {
            // Pods need the namespace's service account, which the controller manager makes.
            let accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> =
                Api::namespaced(sim.client(), "default");
            eventually(
                "the default service account",
                Duration::from_secs(60),
                || {
                    let accounts = accounts.clone();
                    async move { accounts.get_opt("default").await.ok().flatten().is_some() }
                },
            )
            .await;
        }
        let client = sim.client();
        let front = if behind_front {
            Some(ApiProxy::start(client.clone()).await)
        } else {
            None
        };
        let operator_client = front.as_ref().map_or(client.clone(), ApiProxy::client);
        let operator = controller::spawn(
            operator_client,
            Settings::in_process(vec!["default".into()]),
        );
        let queue = format!("fault-{name}");
        let conn = connect(&uri).await;
        let ch = conn.create_channel().await.unwrap();
        declare_expiring(&ch, &queue, true).await;
        declare_expiring(&ch, &format!("{queue}.quarantine"), true).await;
        let _ = conn.close(200, "done".into()).await;
        Fault {
            name,
            on,
            node: Some(node),
            uri,
            pools: Api::namespaced(client.clone(), "default"),
            pods: Api::namespaced(client.clone(), "default"),
            sim,
            client,
            operator,
            queue,
            ledger: Ledger::new(name),
            front,
        }
    }

    /// The full name of scenario `test` as run here: `embedded::test` or
    /// `control_plane::test`.
    fn test(&self, test: &str) -> String {
        format!("{}::{test}", self.on.module())
    }

    /// Creates the pool: one to four workers running `command`.
    async fn pool(&self, command: serde_json::Value) {
        let pool: TestRunnerPool = serde_json::from_value(json!({
            "apiVersion": "testrunner.dev/v1alpha1", "kind": "TestRunnerPool",
            "metadata": {"name": self.name},
            "spec": {"image": "example.org/runner:1", "command": command,
                "queue": {"name": self.queue, "connectionSecretRef": {"name": "rabbitmq", "key": "uri"}},
                "scaling": {"minWorkers": MIN_WORKERS, "maxWorkers": 4, "pollInterval": "500ms",
                    "scaleDownDelay": "1s"}},
        }))
        .unwrap();
        self.pools
            .create(&PostParams::default(), &pool)
            .await
            .unwrap();
    }

    /// Publishes `n` tickets (persistent, confirmed); returns their ids.
    async fn publish(&self, n: u32) -> Vec<String> {
        testrunner_operator::publish::publish(&self.uri, &self.queue, n, false)
            .await
            .unwrap()
    }

    async fn status(&self) -> TestRunnerPoolStatus {
        self.pools
            .get_status(self.name)
            .await
            .unwrap()
            .status
            .unwrap_or_default()
    }

    /// (status, reason) of condition `type_`, if the status has it.
    async fn condition(&self, type_: &str) -> Option<(String, String)> {
        self.status()
            .await
            .conditions
            .into_iter()
            .find(|c| c.type_ == type_)
            .map(|c| (c.status, c.reason))
    }

    /// The pool's pods, deleted ones included (they still hold a ticket until they end).
    async fn pods_now(&self) -> usize {
        self.pods
            .list(&ListParams::default().labels(&format!("testrunner.dev/pool={}", self.name)))
            .await
            .unwrap()
            .items
            .len()
    }

    /// Ready tickets and consumers of the pool's queue; `None` while the broker is down.
    async fn queue_counts(&self) -> Option<(u32, u32)> {
        let conn = tokio::time::timeout(
            Duration::from_secs(5),
            lapin::Connection::connect(&self.uri, lapin::ConnectionProperties::default()),
        )
        .await
        .ok()?
        .ok()?;
        let ch = conn.create_channel().await.ok()?;
        let counts = queue_counts(&ch, &self.queue).await;
        let _ = conn.close(200, "done".into()).await;
        Some(counts)
    }

    /// Tickets in the quarantine queue.
    async fn quarantined(&self) -> u32 {
        let conn = connect(&self.uri).await;
        let ch = conn.create_channel().await.unwrap();
        let n = queue_counts(&ch, &format!("{}.quarantine", self.queue))
            .await
            .0;
        let _ = conn.close(200, "done".into()).await;
        n
    }

    /// The reasons of the events of the namespace, each once, in order of first sight.
    async fn event_reasons(&self) -> Vec<String> {
        let events: Api<k8s_openapi::api::core::v1::Event> =
            Api::namespaced(self.client.clone(), "default");
        let mut list = events.list(&ListParams::default()).await.unwrap().items;
        list.sort_by_key(|e| e.metadata.creation_timestamp.clone());
        let mut reasons: Vec<String> = Vec::new();
        for r in list.into_iter().filter_map(|e| e.reason) {
            if !reasons.contains(&r) {
                reasons.push(r);
            }
        }
        reasons
    }

    /// Stops the broker node (it keeps its data).
    async fn stop_broker(&mut self) {
        self.on_node(common::broker_node::BrokerNode::stop).await;
    }

    /// Starts the stopped broker node again, on the same port, and waits until it
    /// accepts connections.
    async fn start_broker(&mut self) {
        self.on_node(common::broker_node::BrokerNode::restart).await;
    }

    /// Runs a blocking operation on the broker node, off the async runtime.
    async fn on_node(&mut self, op: fn(&mut common::broker_node::BrokerNode)) {
        let mut node = self.node.take().unwrap();
        self.node = Some(
            tokio::task::spawn_blocking(move || {
                op(&mut node);
                node
            })
            .await
            .unwrap(),
        );
    }

    /// Waits, up to `within`, until the operator says the broker cannot be reached:
    /// BrokerReachable False and Degraded for BrokerUnreachable.
    async fn operator_sees_broker_down(&self, within: Duration) {
        eventually(
            "BrokerReachable=False and Degraded=BrokerUnreachable",
            within,
            || async {
                let reachable = self.condition("BrokerReachable").await;
                let degraded = self.condition("Degraded").await;
                reachable.is_some_and(|(s, _)| s == "False")
                    && degraded.is_some_and(|(s, r)| s == "True" && r == "BrokerUnreachable")
            },
        )
        .await;
    }

    /// Waits, up to `within`, until the operator reaches the broker again and the
    /// workers consume the queue again.
    async fn recovered(&self, within: Duration) {
        eventually(
            "BrokerReachable=True, Degraded=False and a worker consuming again",
            within,
            || async {
                self.condition("BrokerReachable")
                    .await
                    .is_some_and(|(s, _)| s == "True")
                    && self
                        .condition("Degraded")
                        .await
                        .is_some_and(|(s, _)| s == "False")
                    && self.queue_counts().await.is_some_and(|(_, c)| c >= 1)
            },
        )
        .await;
    }

    /// Waits, up to `within`, until every ticket of `ids` has ended once at least, and
    /// the pool is back at `minWorkers`.
    async fn drained(&self, ids: &[String], within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let ends = self.ledger.count("end");
            let done = ids.iter().all(|id| ends.contains_key(id));
            if done && self.pods_now().await == MIN_WORKERS {
                return;
            }
            let missing: Vec<&String> = ids.iter().filter(|id| !ends.contains_key(*id)).collect();
            assert!(
                Instant::now() < deadline,
                "after {within:?}: {} of {} tickets not completed ({missing:?}), {} pods (min {MIN_WORKERS})",
                missing.len(),
                ids.len(),
                self.pods_now().await,
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The counts of the ledger against `ids`: asserts no ticket lost, none run that
    /// was not published, nothing left in the queue, and none in the quarantine queue.
    async fn tally(&self, ids: &[String]) -> Tally {
        self.tally_with_quarantine(ids, 0).await
    }

    /// [`Fault::tally`], with `expected_quarantined` tickets (not among `ids`) in the
    /// quarantine queue.
    async fn tally_with_quarantine(&self, ids: &[String], expected_quarantined: usize) -> Tally {
        let starts = self.ledger.count("start");
        let ends = self.ledger.count("end");
        let published: BTreeMap<&str, usize> = ids.iter().fold(BTreeMap::new(), |mut m, id| {
            *m.entry(id.as_str()).or_default() += 1;
            m
        });
        let lost: Vec<&str> = published
            .keys()
            .filter(|id| !ends.contains_key(**id))
            .copied()
            .collect();
        assert!(lost.is_empty(), "tickets lost: {lost:?}");
        let strangers: Vec<&String> = starts
            .keys()
            .filter(|id| !published.contains_key(id.as_str()))
            .collect();
        assert!(
            strangers.is_empty(),
            "tickets run that were not published: {strangers:?}"
        );
        for (id, n) in &published {
            assert!(
                ends[*id] >= *n,
                "ticket {id} published {n} times completed {} times",
                ends[*id]
            );
        }
        let redelivered: usize = published
            .iter()
            .map(|(id, n)| starts.get(*id).copied().unwrap_or(0).saturating_sub(*n))
            .sum();
        let ran_twice: usize = published
            .iter()
            .map(|(id, n)| ends[*id].saturating_sub(*n))
            .sum();
        let (ready, _) = self
            .queue_counts()
            .await
            .expect("the broker answers at the end");
        assert_eq!(ready, 0, "nothing left in the queue");
        let quarantined = self.quarantined().await as usize;
        assert_eq!(
            quarantined, expected_quarantined,
            "tickets in the quarantine queue"
        );
        let in_status = self.status().await.quarantine.map_or(0, |q| q.count) as usize;
        Tally {
            published: ids.len() + expected_quarantined,
            completed: published
                .iter()
                .map(|(id, n)| ends.get(*id).copied().unwrap_or(0).min(*n))
                .sum(),
            redelivered,
            ran_twice,
            quarantined: quarantined.max(in_status),
            lost: 0,
        }
    }

    async fn finish(self) {
        self.operator.abort();
        self.sim.shutdown().await;
        if let Some(node) = self.node {
            tokio::task::spawn_blocking(move || drop(node))
                .await
                .unwrap();
        }
    }
}

/// A connection to a scenario's broker node.
async fn connect(uri: &str) -> lapin::Connection {
    tokio::time::timeout(
        Duration::from_secs(10),
        lapin::Connection::connect(uri, lapin::ConnectionProperties::default()),
    )
    .await
    .expect("the broker node answers within 10 s")
    .expect("the broker node accepts the connection")
}

/// Tickets in and out of one scenario, from its ledger and queues.
#[derive(Debug, serde::Serialize)]
struct Tally {
    /// Tickets published.
    published: usize,
    /// Published tickets whose command ran to its end at least once.
    completed: usize,
    /// Starts beyond the first, each one a delivery that did not complete.
    redelivered: usize,
    /// Completions beyond the first (at-least-once: an ack lost with the broker).
    ran_twice: usize,
    /// Tickets in the quarantine queue (or in `status.quarantine`) at the end.
    quarantined: usize,
    /// Published tickets that never completed.
    lost: usize,
}

/// One row of the results table in docs/reliability.md.
#[derive(Debug, serde::Serialize)]
struct Row<'a> {
    /// The test's name, with its module (`embedded::` or `control_plane::`).
    test: String,
    fault: &'a str,
    injected: String,
    operator_did: String,
    tickets: &'a Tally,
    /// From the end of the fault to the operator and the workers back on the broker
    /// (or, for a worker kill, to the killed ticket completed).
    recovery_ms: u128,
    /// From the end of the fault to every ticket completed and the pool at minWorkers.
    drain_ms: u128,
    bound_s: u64,
}

impl Row<'_> {
    /// Writes the row to `<target>/reliability/<test>.json` and prints it.
    fn record(&self) {
        let dir = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
            .join("reliability");
        std::fs::create_dir_all(&dir).unwrap();
        let line = serde_json::to_string(self).unwrap();
        let file = format!("{}.json", self.test.replace("::", "."));
        std::fs::write(dir.join(file), format!("{line}\n")).unwrap();
        println!("reliability row: {line}");
    }
}

/// Waits until at least `n` tickets are in a command (started, not ended), and `done`
/// ended: the surge is under way.
async fn in_flight(ledger: &Ledger, n: usize, done: usize) {
    eventually(
        &format!("{n} tickets in flight and {done} done"),
        Duration::from_secs(90),
        || async {
            let (starts, ends) = (ledger.count("start"), ledger.count("end"));
            let running = starts.keys().filter(|id| !ends.contains_key(*id)).count();
            running >= n && ends.len() >= done
        },
    )
    .await;
}

/// A broker outage in the middle of a surge: the node stops while workers run tickets,
/// the operator must say so, then it starts again after `down` (at least until the
/// operator said so).
async fn broker_outage(on: On, test: &str, name: &'static str, fault: &str, down: Duration) {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut f = Fault::start(name, on).await;
    f.pool(f.ledger.command(1.0)).await;
    let ids = f.publish(40).await;
    in_flight(&f.ledger, 3, 2).await;
    let busy_at_fault = {
        let (s, e) = (f.ledger.count("start"), f.ledger.count("end"));
        s.keys().filter(|id| !e.contains_key(*id)).count()
    };

    let stopped = Instant::now();
    f.stop_broker().await;
    f.operator_sees_broker_down(Duration::from_secs(60)).await;
    let seen_down = stopped.elapsed();
    if let Some(rest) = down.checked_sub(stopped.elapsed()) {
        // The fault itself: the broker stays down this long.
        tokio::time::sleep(rest).await;
    }
    // Still down, and still said so, at the end of the outage.
    f.operator_sees_broker_down(Duration::from_secs(1)).await;
    f.start_broker().await;
    let back = Instant::now();
    let outage = stopped.elapsed();

    f.recovered(RECOVERY_BOUND).await;
    let recovery = back.elapsed();
    f.drained(&ids, DRAIN_BOUND).await;
    let drain = back.elapsed();
    let tally = f.tally(&ids).await;
    assert_eq!(
        tally.quarantined, 0,
        "no ticket is guilty of a broker outage"
    );
    let reasons = f.event_reasons().await;
    for r in ["BrokerUnreachable", "BrokerRecovered"] {
        assert!(
            reasons.iter().any(|x| x == r),
            "no {r} event in {reasons:?}"
        );
    }
    // Workers that could not reach the broker while the operator could not either are
    // not a broken environment.
    assert!(
        !reasons.iter().any(|x| x == "BrokenEnvironment"),
        "an outage is not a broken environment: {reasons:?}"
    );
    Row {
        test: f.test(test),
        fault,
        injected: format!(
            "broker node stopped {:.1} s with {busy_at_fault} tickets in commands, 40 published, 4 workers",
            outage.as_secs_f64()
        ),
        operator_did: format!(
            "BrokerReachable=False, Degraded=BrokerUnreachable after {:.1} s; events: {}",
            seen_down.as_secs_f64(),
            reasons.join(", ")
        ),
        tickets: &tally,
        recovery_ms: recovery.as_millis(),
        drain_ms: drain.as_millis(),
        bound_s: (RECOVERY_BOUND + DRAIN_BOUND).as_secs(),
    }
    .record();
    f.finish().await;
}

async fn the_broker_restarts_mid_surge_and_every_ticket_completes(on: On) {
    broker_outage(
        on,
        "the_broker_restarts_mid_surge_and_every_ticket_completes",
        "broker-restart",
        "the broker restarts mid-surge",
        Duration::ZERO,
    )
    .await;
}

async fn the_broker_is_unreachable_for_a_minute_and_every_ticket_completes(on: On) {
    broker_outage(
        on,
        "the_broker_is_unreachable_for_a_minute_and_every_ticket_completes",
        "broker-unreachable",
        "the broker is unreachable for a minute",
        Duration::from_secs(60),
    )
    .await;
}

/// The host pid of the wrapped command running ticket `id` (the process whose
/// environment holds `TICKET_ID=<id>`), and its parent, the worker container's wrapper.
fn command_and_wrapper(id: &str) -> Option<(u32, u32)> {
    let needle = format!("TICKET_ID={id}");
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        if !environ.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()) {
            continue;
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let ppid: u32 = status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))?
            .trim()
            .parse()
            .ok()?;
        let cmdline = std::fs::read(format!("/proc/{ppid}/cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args.contains(&b"worker".as_slice()) {
            return Some((pid, ppid));
        }
    }
    None
}

async fn a_worker_sigkilled_mid_ticket_gets_its_ticket_redelivered_and_completed_not_quarantined(
    on: On,
) {
    let _one = ONE_AT_A_TIME.lock().await;
    let name = "worker-sigkill";
    let f = Fault::start(name, on).await;
    f.pool(f.ledger.command(2.0)).await;
    let ids = f.publish(12).await;
    in_flight(&f.ledger, 2, 0).await;
    let (victim, command, wrapper) = common::eventually_some(
        "a ticket's command and its wrapper in /proc",
        Duration::from_secs(30),
        || async {
            let (s, e) = (f.ledger.count("start"), f.ledger.count("end"));
            s.keys()
                .filter(|id| !e.contains_key(*id))
                .find_map(|id| command_and_wrapper(id).map(|(c, w)| (id.clone(), c, w)))
        },
    )
    .await;
    // SIGKILL the worker container's first process: the kernel takes its command with
    // it (the container is a PID namespace), as when a node kills a container.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(wrapper as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("the wrapper can be killed");
    let killed = Instant::now();
    eventually(
        "the killed ticket's command to die",
        Duration::from_secs(10),
        || async { !common::process_alive(&command.to_string()) },
    )
    .await;

    // The crash is recorded against the ticket in hand; the ticket comes back and
    // completes on some worker.
    eventually(
        "the crash to be recorded against the killed ticket",
        Duration::from_secs(60),
        || async {
            f.status()
                .await
                .crashes
                .iter()
                .any(|c| c.ticket.as_deref() == Some(victim.as_str()))
        },
    )
    .await;
    eventually(
        "the killed ticket to complete",
        Duration::from_secs(120),
        || async { f.ledger.count("end").contains_key(&victim) },
    )
    .await;
    let recovery = killed.elapsed();
    f.drained(&ids, DRAIN_BOUND).await;
    let drain = killed.elapsed();
    let tally = f.tally(&ids).await;
    assert_eq!(tally.quarantined, 0, "one crash is not poison");
    assert_eq!(
        f.ledger.count("start").get(&victim).copied(),
        Some(2),
        "the killed ticket ran again once"
    );
    assert_eq!(f.ledger.count("end").get(&victim).copied(), Some(1));
    let status = f.status().await;
    let verdict = status.diagnosis.as_ref().map(|d| d.verdict);
    assert_eq!(
        verdict.as_deref(),
        Some("Healthy"),
        "{:?}",
        status.diagnosis
    );
    let reasons = f.event_reasons().await;
    assert!(
        reasons.iter().any(|r| r == "WorkerCrashed"),
        "no WorkerCrashed event in {reasons:?}"
    );
    Row {
        test: f.test("a_worker_sigkilled_mid_ticket_gets_its_ticket_redelivered_and_completed_not_quarantined"),
        fault: "a worker is SIGKILLed mid-ticket",
        injected: "SIGKILL to one worker container's wrapper (PID 1 of the container) 2 s tickets, 12 published, 4 workers".into(),
        operator_did: format!(
            "crash recorded against the ticket in hand (delivery 1), diagnosis {}; events: {}",
            verdict.unwrap_or_default(),
            reasons.join(", ")
        ),
        tickets: &tally,
        recovery_ms: recovery.as_millis(),
        drain_ms: drain.as_millis(),
        bound_s: DRAIN_BOUND.as_secs(),
    }
    .record();
    f.finish().await;
}

/// The hostile scenario's test command: records the start, the bytes it read on
/// standard input, what it saw of the headers, and the end.
fn hostile_command(ledger: &Ledger) -> serde_json::Value {
    json!([
        "sh",
        "-c",
        format!(
            "echo \"$TICKET_ID start\" >> {p}; n=$(wc -c); echo \"$TICKET_ID bytes $n\" >> {p}; \
             echo \"$TICKET_ID headers ${{TICKET_HEADERS_TRUNCATED:-0}} ${{TICKET_HEADER_X_INT:-none}} ${{#TICKET_HEADER_X_BIG}}\" >> {p}; \
             echo \"$TICKET_ID end\" >> {p}",
            p = ledger.path.display()
        )
    ])
}

/// The values recorded on `<id> <what> ...` lines of the ledger.
fn recorded(ledger: &Ledger, id: &str, what: &str) -> Vec<String> {
    let prefix = format!("{id} {what} ");
    ledger
        .lines()
        .iter()
        .filter_map(|l| l.strip_prefix(&prefix).map(str::to_string))
        .collect()
}

/// Publishes one ticket on `ch` (confirm mode) with `props`, and checks the broker took it.
async fn publish_raw(ch: &lapin::Channel, queue: &str, body: &[u8], props: lapin::BasicProperties) {
    let confirm = ch
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            props.with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack(), "the broker took the ticket");
}

async fn hostile_tickets_each_run_once_and_never_crash_the_wrapper(on: On) {
    let _one = ONE_AT_A_TIME.lock().await;
    let f = Fault::start("hostile", on).await;
    let conn = connect(&f.uri).await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let plain = lapin::BasicProperties::default;
    let mut ids: Vec<String> = Vec::new();

    // A huge body: 8 MiB.
    let huge = vec![b'x'; 8 << 20];
    publish_raw(
        &ch,
        &f.queue,
        &huge,
        plain().with_message_id("hostile-huge".into()),
    )
    .await;
    ids.push("hostile-huge".into());
    // No message_id: the id is the body's hash.
    let anonymous = b"a ticket without a message id";
    publish_raw(&ch, &f.queue, anonymous, plain()).await;
    ids.push(testrunner_operator::contract::ticket_id(None, anonymous));
    // An empty body, no message_id either.
    publish_raw(&ch, &f.queue, b"", plain()).await;
    ids.push(testrunner_operator::contract::ticket_id(None, b""));
    // Two tickets with one id.
    for body in [&b"twin one"[..], b"twin two"] {
        publish_raw(
            &ch,
            &f.queue,
            body,
            plain().with_message_id("hostile-twin".into()),
        )
        .await;
        ids.push("hostile-twin".into());
    }
    // An id with spaces, a percent sign, a newline and non-ASCII letters.
    let odd_id = "odd id/100%\n\u{e9}t\u{e9}";
    publish_raw(
        &ch,
        &f.queue,
        b"odd id",
        plain().with_message_id(odd_id.into()),
    )
    .await;
    ids.push(testrunner_operator::contract::ticket_id(
        Some(odd_id),
        b"odd id",
    ));
    // Headers of eight AMQP types (integer, boolean, float, void, timestamp, bytes,
    // table, array), one of 40 KiB and 40 more of 1 KiB: over the 64 KiB
    // of TICKET_HEADERS.
    let mut headers = FieldTable::default();
    headers.insert("x-int".into(), AMQPValue::LongLongInt(-42));
    headers.insert("x-bool".into(), AMQPValue::Boolean(true));
    headers.insert("x-float".into(), AMQPValue::Double(1.5));
    headers.insert("x-void".into(), AMQPValue::Void);
    headers.insert("x-time".into(), AMQPValue::Timestamp(1_700_000_000));
    headers.insert(
        "x-bytes".into(),
        AMQPValue::ByteArray(vec![0u8, 255, 10].into()),
    );
    let mut inner = FieldTable::default();
    inner.insert("deep".into(), AMQPValue::LongString("\u{0}\n\"".into()));
    headers.insert("x-table".into(), AMQPValue::FieldTable(inner));
    headers.insert(
        "x-array".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![
            AMQPValue::ShortInt(1),
            AMQPValue::LongString("two".into()),
        ])),
    );
    headers.insert(
        "x-big".into(),
        AMQPValue::LongString("b".repeat(40 << 10).into()),
    );
    for i in 0..40 {
        headers.insert(
            format!("x-pad-{i:02}").into(),
            AMQPValue::LongString("p".repeat(1 << 10).into()),
        );
    }
    publish_raw(
        &ch,
        &f.queue,
        b"odd headers",
        plain()
            .with_message_id("hostile-headers".into())
            .with_headers(headers),
    )
    .await;
    ids.push("hostile-headers".into());
    let _ = conn.close(200, "done".into()).await;
    // Plain tickets around them.
    ids.extend(f.publish(6).await);

    f.pool(hostile_command(&f.ledger)).await;
    let started = Instant::now();
    f.drained(&ids, DRAIN_BOUND).await;
    let drain = started.elapsed();
    let tally = f.tally(&ids).await;
    assert_eq!(tally.quarantined, 0, "none of them is poison");
    assert_eq!(tally.redelivered, 0, "none of them crashed a worker");
    assert_eq!(tally.ran_twice, 0, "each ran once");
    assert!(f.status().await.crashes.is_empty(), "no worker crashed");
    // The command got each body whole, and the headers as the contract says.
    assert_eq!(
        recorded(&f.ledger, "hostile-huge", "bytes"),
        [(8 << 20).to_string()]
    );
    assert_eq!(recorded(&f.ledger, &ids[2], "bytes"), ["0"]);
    assert_eq!(recorded(&f.ledger, "hostile-twin", "bytes"), ["8", "8"]);
    assert_eq!(
        recorded(&f.ledger, "hostile-headers", "headers"),
        [format!("1 -42 {}", 32 << 10)],
        "TICKET_HEADERS cut, numbers in decimal, a long value cut at 32 KiB"
    );
    let reasons = f.event_reasons().await;
    Row {
        test: f.test("hostile_tickets_each_run_once_and_never_crash_the_wrapper"),
        fault: "hostile tickets",
        injected: "an 8 MiB body, no message_id (twice, one empty body), two tickets with one id, an id with space/%/newline/non-ASCII, headers of 8 AMQP types, 49 headers over 64 KiB, among 6 plain tickets".into(),
        operator_did: format!("nothing to do: no crash; events: {}", reasons.join(", ")),
        tickets: &tally,
        recovery_ms: 0,
        drain_ms: drain.as_millis(),
        bound_s: DRAIN_BOUND.as_secs(),
    }
    .record();
    f.finish().await;
}

/// Publishes, through the node's own Erlang shell, a ticket whose `message_id` is not
/// UTF-8 (`bad-` and the bytes FF FE): AMQP's short strings are bytes, but no client
/// built on lapin can publish one.
fn publish_non_utf8_id(f: &Fault) {
    let out = f.node.as_ref().unwrap().ctl(&[
        "eval",
        &format!(
            "rabbit_basic:publish(rabbit_misc:r(<<\"/\">>, exchange, <<>>), <<\"{}\">>, \
             [{{message_id, <<\"bad-\", 255, 254>>}}, {{delivery_mode, 2}}], <<\"non-utf8 id\">>).",
            f.queue
        ),
    ]);
    assert!(out.contains("ok"), "the node published it: {out}");
}

/// The broker-side backstop of docs/diagnosis.md on the pool's queue: after 3
/// redeliveries the broker dead-letters a ticket to the quarantine queue.
fn backstop(f: &Fault) {
    f.node.as_ref().unwrap().ctl(&[
        "set_policy",
        "--apply-to",
        "queues",
        "backstop",
        &format!("^{}$", f.queue),
        &format!(
            "{{\"delivery-limit\": 3, \"dead-letter-exchange\": \"\", \"dead-letter-routing-key\": \"{}.quarantine\"}}",
            f.queue
        ),
    ]);
}

/// A `message_id` that is not UTF-8 cannot be read by the worker's AMQP client: the
/// delivery breaks its connection and the ticket goes back to the head of the queue.
/// With the broker-side backstop the broker dead-letters it to the quarantine queue
/// after three deliveries, intact, and every other ticket completes.
async fn a_ticket_with_a_non_utf8_message_id_is_dead_lettered_by_the_broker_backstop(on: On) {
    let _one = ONE_AT_A_TIME.lock().await;
    let f = Fault::start("non-utf8", on).await;
    backstop(&f);
    publish_non_utf8_id(&f);
    let ids = f.publish(6).await;
    f.pool(hostile_command(&f.ledger)).await;
    let started = Instant::now();
    f.drained(&ids, DRAIN_BOUND).await;
    let drain = started.elapsed();
    let tally = f.tally_with_quarantine(&ids, 1).await;
    assert_eq!(tally.ran_twice, 0, "each readable ticket ran once");
    assert!(
        f.ledger.lines().iter().all(|l| !l.starts_with("bad-")),
        "the unreadable ticket never reached the command"
    );
    let status = f.status().await;
    assert!(
        status
            .crashes
            .iter()
            .all(|c| c.ticket.is_none() && c.exit_code == 75),
        "only lost broker connections: {:?}",
        status.crashes
    );
    let reasons = f.event_reasons().await;
    Row {
        test: f.test("a_ticket_with_a_non_utf8_message_id_is_dead_lettered_by_the_broker_backstop"),
        fault: "a ticket whose message_id is not UTF-8",
        injected: "message_id `bad-` FF FE (published by the node itself) ahead of 6 plain tickets; backstop policy delivery-limit 3 to the quarantine queue".into(),
        operator_did: format!(
            "nothing: {} lost-connection exits (75) of the workers, not counted; the broker dead-lettered the ticket; events: {}",
            status.crashes.len(),
            reasons.join(", ")
        ),
        tickets: &tally,
        recovery_ms: 0,
        drain_ms: drain.as_millis(),
        bound_s: DRAIN_BOUND.as_secs(),
    }
    .record();
    f.finish().await;
}

/// Tickets of the API server scenarios' surge (one second each, published as the fault
/// begins): with one worker the surge would take 40 s, so the operator has to scale up.
const API_SURGE: u32 = 40;
/// How long an API server fault lasts (the slow API server's lasts the whole scenario).
const API_FAULT: Duration = Duration::from_secs(20);
/// `Retry-After` of the 429 scenario, in seconds.
const RETRY_AFTER: u64 = 3;
/// Event reasons that an API server fault must not bring: it says nothing of the
/// workers, the broker, the tickets or a rollout.
const WRONG_AFTER_API_FAULT: [&str; 8] = [
    "WorkerCrashed",
    "OutOfMemory",
    "BrokenEnvironment",
    "BrokerUnreachable",
    "PoisonTicketQuarantined",
    "RolloutStarted",
    "RolloutFailed",
    "TicketsReplayed",
];

/// The operator's watchers in a namespace: pools, and the pods it manages.
const WATCHERS: usize = 2;
/// The requests of a reconcile before its first write: GET the pool, GET its Secret,
/// LIST its pods, LIST its ControllerRevisions.
const READS_PER_RECONCILE: usize = 4;
/// The first retry delay of a failed reconcile (the controller's `failure_backoff`: 1 s
/// doubling up to 5 minutes).
const RECONCILE_RETRY: Duration = Duration::from_secs(1);
/// The first retry delay of a failed watcher (kube-runtime's default watcher backoff:
/// 0.8 s doubling up to 30 s, jitter adding up to the delay itself).
const WATCHER_RETRY: Duration = Duration::from_millis(800);
/// The pools' poll interval.
const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Attempts of something retried with a delay from `first` doubling, in `window`: the
/// attempts at 0, first, 3 first, 7 first, ...: ⌊log2(window / first + 1)⌋ + 1.
fn doubling_attempts(window: Duration, first: Duration) -> usize {
    (window.as_secs_f64() / first.as_secs_f64() + 1.0)
        .log2()
        .floor() as usize
        + 1
}

/// Requests in `window` of a chain that sends one request at a time, each at least
/// `gap` after the one before: ⌊window / gap⌋ + 1.
fn spaced(window: Duration, gap: Duration) -> usize {
    (window.as_secs_f64() / gap.as_secs_f64()).floor() as usize + 1
}

/// The most requests the operator may send during an API server fault of `window`: of
/// its reconciles, and of its watchers (docs/reliability.md, "Requests during an API
/// server fault", gives the reasoning).
#[derive(Debug)]
struct Bound {
    reconciles: usize,
    watchers: usize,
}

/// A request of the operator's watchers: a watch, or the list a watcher begins with
/// (the pools of the namespace, or every pod the operator manages; a reconcile lists
/// the pods of its pool).
fn from_watcher(s: &Seen) -> bool {
    let selector = url::form_urlencoded::parse(s.query.as_bytes())
        .find(|(k, _)| k == "labelSelector")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    s.watch
        || (s.method == "GET"
            && (s.path.ends_with("/testrunnerpools")
                || (s.path.ends_with("/pods")
                    && !selector.contains(testrunner_operator::crd::LABEL_POOL))))
}

/// One API server scenario.
struct ApiCase {
    /// The test's name, without its module.
    test: &'static str,
    /// The pool's (and the scenario's broker node's) name.
    name: &'static str,
    /// The row's fault column.
    fault: &'static str,
    /// What the front does during the fault.
    inject: ApiFault,
    /// The operator's requests still get through during the fault, so it must scale up
    /// during it; otherwise it cannot (the test checks that it did not).
    scales_during_fault: bool,
    /// The most requests the operator may send during a fault of a given length.
    bound: fn(Duration) -> Bound,
}

/// The requests of `seen`, counted by kind (method and path without names), most
/// frequent first.
fn by_kind(seen: &[Seen]) -> String {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for s in seen {
        let status = if s.injected {
            format!(" {} injected", s.status)
        } else {
            String::new()
        };
        *counts.entry(format!("{}{status}", s.kind())).or_default() += 1;
    }
    let mut counts: Vec<(String, usize)> = counts.into_iter().collect();
    counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    counts
        .iter()
        .map(|(k, n)| format!("{n} {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Each request sent again after a 429 with `Retry-After: <secs>` (the same method,
/// path and query) that came sooner than that: (key, seconds after the 429).
fn retried_too_soon(seen: &[Seen], secs: u64) -> Vec<(String, f64)> {
    let mut early = Vec::new();
    for (i, s) in seen.iter().enumerate() {
        if !(s.injected && s.status == 429) {
            continue;
        }
        let key = s.key();
        if let Some(next) = seen[i + 1..].iter().find(|n| n.key() == key) {
            let after = next.at.duration_since(s.at);
            // The front's clock reads both arrivals; 50 ms for scheduling.
            if after + Duration::from_millis(50) < Duration::from_secs(secs) {
                early.push((key, after.as_secs_f64()));
            }
        }
    }
    early
}

/// An API server fault in the middle of a surge: the pool runs one worker, the fault
/// begins and 40 tickets are published; after [`API_FAULT`] the fault ends (the slow
/// server's stays). Asserts the ledger's counts, the operator's requests during the
/// fault under the case's bound, the pool scaled up (during the fault when the
/// operator's requests still get through, else after it), and back to `minWorkers`.
async fn api_fault(on: On, case: ApiCase) {
    let _one = ONE_AT_A_TIME.lock().await;
    let f = Fault::start_behind_front(case.name, on).await;
    f.pool(f.ledger.command(1.0)).await;
    eventually(
        "the pool's one worker consuming",
        Duration::from_secs(60),
        || async {
            f.pods_now().await == MIN_WORKERS && f.queue_counts().await.is_some_and(|(_, c)| c >= 1)
        },
    )
    .await;
    let front = f.front.as_ref().expect("the scenario has a front");
    let fault_start = front.set(case.inject.clone());
    let ids = f.publish(API_SURGE).await;
    let slow = matches!(case.inject, ApiFault::Slow { .. });

    let scaled_up = || async { f.pods_now().await > MIN_WORKERS };
    let (recovery, fault_end, drain) = if case.scales_during_fault {
        eventually(
            "the operator to scale up during the fault",
            RECOVERY_BOUND,
            scaled_up,
        )
        .await;
        let reaction = fault_start.elapsed();
        if slow {
            f.drained(&ids, DRAIN_BOUND).await;
            let end = front.set(ApiFault::None);
            (reaction, end, end.duration_since(fault_start))
        } else {
            if let Some(rest) = API_FAULT.checked_sub(fault_start.elapsed()) {
                tokio::time::sleep(rest).await;
            }
            let end = front.set(ApiFault::None);
            f.drained(&ids, DRAIN_BOUND).await;
            (reaction, end, end.elapsed())
        }
    } else {
        // The fault itself: it lasts this long.
        if let Some(rest) = API_FAULT.checked_sub(fault_start.elapsed()) {
            tokio::time::sleep(rest).await;
        }
        assert_eq!(
            f.pods_now().await,
            MIN_WORKERS,
            "no pod could be created during the fault"
        );
        let end = front.set(ApiFault::None);
        eventually(
            "the operator to scale up after the fault",
            RECOVERY_BOUND,
            scaled_up,
        )
        .await;
        let recovery = end.elapsed();
        f.drained(&ids, DRAIN_BOUND).await;
        (recovery, end, end.elapsed())
    };
    let during = front.seen_between(fault_start, fault_end);
    let window = fault_end.duration_since(fault_start);
    let tally = f.tally(&ids).await;
    assert_eq!(tally.quarantined, 0, "no ticket is guilty of an API fault");
    assert_eq!(tally.redelivered, 0, "no worker lost a ticket");
    let bound = (case.bound)(window);
    let (watchers, reconciles): (Vec<Seen>, Vec<Seen>) =
        during.iter().cloned().partition(from_watcher);
    assert!(
        reconciles.len() <= bound.reconciles && watchers.len() <= bound.watchers,
        "{} requests of the reconciles and {} of the watchers during the {:.1} s fault, over the bound {bound:?}: {}",
        reconciles.len(),
        watchers.len(),
        window.as_secs_f64(),
        by_kind(&during)
    );
    if let ApiFault::TooManyRequests { retry_after } = case.inject {
        let early = retried_too_soon(&during, retry_after);
        assert!(
            early.is_empty(),
            "requests sent again sooner than Retry-After: {retry_after} s: {early:?}"
        );
    }
    let reasons = f.event_reasons().await;
    let wrong: Vec<&String> = reasons
        .iter()
        .filter(|r| WRONG_AFTER_API_FAULT.contains(&r.as_str()))
        .collect();
    assert!(wrong.is_empty(), "wrong events {wrong:?} in {reasons:?}");
    let injected = during.iter().filter(|s| s.injected).count();
    let mut watches = String::new();
    if let ApiFault::DropWatches { .. } = case.inject {
        let (broken, ended) = front.watches_cut();
        let relists = |resource: &str| {
            during
                .iter()
                .filter(|s| from_watcher(s) && !s.watch && s.path.ends_with(resource))
                .count()
        };
        let gone = during.iter().filter(|s| s.status == 410).count();
        assert!(
            broken >= 1 && ended >= 1,
            "watches cut: {broken} broken, {ended} ended"
        );
        assert!(gone >= 1, "no watch resumed from a resourceVersion");
        for resource in ["/testrunnerpools", "/pods"] {
            assert!(
                relists(resource) >= 1,
                "the operator did not list {resource} again: {}",
                by_kind(&during)
            );
        }
        watches = format!(
            "; {broken} watches broken and {ended} ended by the front, {gone} resumes answered 410 Gone, pools listed again {} times and pods {} times",
            relists("/testrunnerpools"),
            relists("/pods")
        );
    }
    Row {
        test: f.test(case.test),
        fault: case.fault,
        injected: format!(
            "{:?} for {:.1} s from the start of a surge of {API_SURGE} tickets of 1 s (1 to 4 workers)",
            case.inject,
            window.as_secs_f64(),
        ),
        operator_did: format!(
            "{} requests during the fault: {} of the reconciles (bound {}), {} of the watchers (bound {}); {injected} answered by the fault: {}{watches}; {}; events: {}",
            during.len(),
            reconciles.len(),
            bound.reconciles,
            watchers.len(),
            bound.watchers,
            by_kind(&during),
            if case.scales_during_fault {
                format!("scaled up {:.1} s into the fault", recovery.as_secs_f64())
            } else {
                format!("scaled up {:.1} s after the fault", recovery.as_secs_f64())
            },
            reasons.join(", ")
        ),
        tickets: &tally,
        recovery_ms: recovery.as_millis(),
        drain_ms: drain.as_millis(),
        bound_s: (RECOVERY_BOUND + DRAIN_BOUND).as_secs(),
    }
    .record();
    f.finish().await;
}

async fn the_api_server_answers_500_for_20_s_and_the_operator_backs_off_and_converges(on: On) {
    api_fault(
        on,
        ApiCase {
            test: "the_api_server_answers_500_for_20_s_and_the_operator_backs_off_and_converges",
            name: "api-500",
            fault: "the API server answers 500 to every request",
            inject: ApiFault::ServerError { every: 1 },
            scales_during_fault: false,
            // Each retry of the reconcile fails at its first request and posts a
            // Warning event (which fails too); the one under way as the fault begins
            // sends at most its reads, a write and its event. A watcher that has to
            // start again fails at its list, retried with its backoff.
            bound: |w| Bound {
                reconciles: doubling_attempts(w, RECONCILE_RETRY) * 2 + READS_PER_RECONCILE + 2,
                watchers: WATCHERS * doubling_attempts(w, WATCHER_RETRY),
            },
        },
    )
    .await;
}

async fn the_api_server_answers_429_with_retry_after_and_the_operator_honours_it(on: On) {
    api_fault(
        on,
        ApiCase {
            test: "the_api_server_answers_429_with_retry_after_and_the_operator_honours_it",
            name: "api-429",
            fault: "the API server answers 429 with Retry-After to every request",
            inject: ApiFault::TooManyRequests {
                retry_after: RETRY_AFTER,
            },
            scales_during_fault: false,
            // kube's client retries a 429 itself, after Retry-After: the reconcile under
            // way is one request at a time, each Retry-After apart (50 ms for the
            // clocks), and it does not fail within the window (15 retries); a watcher
            // only sends if it has to start again.
            bound: |w| {
                let chain = spaced(
                    w,
                    Duration::from_secs(RETRY_AFTER) - Duration::from_millis(50),
                );
                Bound {
                    reconciles: chain,
                    watchers: WATCHERS * chain,
                }
            },
        },
    )
    .await;
}

async fn the_api_server_answers_409_to_writes_and_the_operator_converges(on: On) {
    api_fault(
        on,
        ApiCase {
            test: "the_api_server_answers_409_to_writes_and_the_operator_converges",
            name: "api-409",
            fault: "the API server answers 409 Conflict to every write",
            inject: ApiFault::ConflictOnWrites,
            scales_during_fault: false,
            // Each retry of the reconcile reads, fails at its first write and posts a
            // Warning event; the one under way as the fault begins too. Watches are
            // reads: a watcher only sends if it has to start again.
            bound: |w| Bound {
                reconciles: (doubling_attempts(w, RECONCILE_RETRY) + 1) * (READS_PER_RECONCILE + 2),
                watchers: WATCHERS * doubling_attempts(w, WATCHER_RETRY),
            },
        },
    )
    .await;
}

async fn the_api_server_drops_watches_and_the_operator_relists_and_converges(on: On) {
    api_fault(
        on,
        ApiCase {
            test: "the_api_server_drops_watches_and_the_operator_relists_and_converges",
            name: "api-watch",
            fault: "the API server drops watches and expires their resourceVersion",
            inject: ApiFault::DropWatches {
                after: Duration::from_secs(2),
            },
            scales_during_fault: true,
            // A watch lasts at least `after` (2 s) before it is cut; then at most a
            // resume (410), a list and a new watch. The reconciles succeed: one per
            // wake at most, the wakes being the probe's (one per poll interval at
            // most), one per watcher's list, and the pod watch's (at most 6 changes of
            // each of the 3 pods created and deleted); each reconcile reads, writes
            // the status and at most one more (an event, a pod).
            bound: |w| {
                let cycles = spaced(w, Duration::from_secs(2));
                let wakes = spaced(w, POLL_INTERVAL) + WATCHERS * cycles + 6 * 2 * 3;
                Bound {
                    reconciles: wakes * (READS_PER_RECONCILE + 2),
                    watchers: WATCHERS * 3 * cycles,
                }
            },
        },
    )
    .await;
}

async fn a_slow_api_server_still_sees_every_ticket_completed(on: On) {
    api_fault(
        on,
        ApiCase {
            test: "a_slow_api_server_still_sees_every_ticket_completed",
            name: "api-slow",
            fault: "the API server answers every request 2 s late",
            inject: ApiFault::Slow {
                delay: Duration::from_secs(2),
            },
            scales_during_fault: true,
            // Each request takes 2 s and a reconcile sends one at a time (as does each
            // watcher), and no reconcile fails (no Warning event sent on the side).
            bound: |w| Bound {
                reconciles: spaced(w, Duration::from_secs(2)),
                watchers: WATCHERS * spaced(w, Duration::from_secs(2)),
            },
        },
    )
    .await;
}

/// The kubelet's durations in the delivery-limit scenarios are divided by this: its
/// restart backoff runs from 10 s / 200 to 5 min / 200 (1.5 s), so a crash loop reaches
/// 20 deliveries of one ticket in well under a minute instead of about 80 minutes.
const CRASH_LOOP_SCALE: f64 = 200.0;

/// The broker's delivery limit as RabbitMQ 4 sets it on quorum queues by default:
/// `x-delivery-limit: 20`, set here by a policy (with or without a dead-letter exchange
/// routed to the quarantine queue). The environment is broken (the test command fails on
/// every ticket until a file exists): one worker is kept, crash-looping, and the ticket at
/// the head of the queue is delivered again at each crash. Workers set it aside at its
/// 20th delivery, before the broker would drop it (no dead-letter exchange) or
/// dead-letter it; once the environment is fixed, the operator returns it and it runs.
async fn broken_environment_at_the_delivery_limit(
    on: On,
    test: &str,
    name: &'static str,
    dlx: bool,
) {
    let _one = ONE_AT_A_TIME.lock().await;
    let f = Fault::start_scaled(name, on, CRASH_LOOP_SCALE).await;
    let mut policy = serde_json::json!({"delivery-limit": 20});
    if dlx {
        policy["dead-letter-exchange"] = json!("");
        policy["dead-letter-routing-key"] = json!(format!("{}.quarantine", f.queue));
    }
    f.node.as_ref().unwrap().ctl(&[
        "set_policy",
        "--apply-to",
        "queues",
        "limit",
        &format!("^{}$", f.queue),
        &policy.to_string(),
    ]);
    let fixed = f.ledger.path.with_extension("fixed");
    let _ = std::fs::remove_file(&fixed);
    let ledger = f.ledger.path.display().to_string();
    let command = json!([
        "sh",
        "-c",
        format!(
            "echo \"$TICKET_ID start\" >> {ledger}; echo \"$TICKET_ID delivery $TICKET_DELIVERY\" >> {ledger}; cat >/dev/null; [ -e {fixed} ] || {{ echo \"$TICKET_ID crash\" >> {ledger}; exit 3; }}; sleep 0.2; echo \"$TICKET_ID end\" >> {ledger}",
            fixed = fixed.display()
        )
    ]);
    f.pool(command).await;
    let ids = f.publish(6).await;

    // The environment stays broken until a ticket has been set aside.
    let broken_at = Instant::now();
    eventually("BrokenEnvironment", Duration::from_secs(60), || async {
        f.status()
            .await
            .diagnosis
            .is_some_and(|d| d.verdict.as_str() == "BrokenEnvironment")
    })
    .await;
    eventually(
        "a ticket set aside at its 20th delivery",
        Duration::from_secs(240),
        || async { f.quarantined().await >= 1 },
    )
    .await;
    let held = broken_at.elapsed();
    let crashes_held = f.ledger.count("crash").values().sum::<usize>();
    let set_aside = f.quarantined().await;

    // Fixed: the held tickets run, and the operator returns the one set aside.
    std::fs::write(&fixed, b"").unwrap();
    let fixed_at = Instant::now();
    f.drained(&ids, DRAIN_BOUND).await;
    let drain = fixed_at.elapsed();
    let deliveries: Vec<u64> = f
        .ledger
        .lines()
        .iter()
        .filter_map(|l| {
            l.rsplit_once(" delivery ")
                .and_then(|(_, n)| n.parse().ok())
        })
        .collect();
    let most = deliveries.iter().copied().max().unwrap_or(0);
    let tally = f.tally(&ids).await;
    let _ = std::fs::remove_file(&fixed);
    assert!(
        most <= 20,
        "no ticket went past its 20th delivery, where the broker takes it: {most}"
    );
    assert_eq!(
        tally.quarantined, 0,
        "no ticket is guilty of a broken environment"
    );
    let reasons = f.event_reasons().await;
    for r in ["BrokenEnvironment", "TicketsReplayed"] {
        assert!(
            reasons.iter().any(|x| x == r),
            "no {r} event in {reasons:?}"
        );
    }
    Row {
        test: if dlx {
            format!("dead_letter_exchange::{test}")
        } else {
            f.test(test)
        },
        fault: if dlx {
            "a broken environment held past the delivery limit (x-delivery-limit 20, dead-lettered to the quarantine queue)"
        } else {
            "a broken environment held past the delivery limit (x-delivery-limit 20, no dead-letter exchange: the broker drops)"
        },
        injected: format!(
            "the test command fails on every ticket (exit 3) for {:.0} s: {crashes_held} crashes, one worker kept crash-looping (restart backoff / {CRASH_LOOP_SCALE}), 6 tickets",
            held.as_secs_f64()
        ),
        operator_did: format!(
            "BrokenEnvironment, one worker kept; {set_aside} ticket(s) set aside by the workers at their 20th delivery (most deliveries of any ticket: {most}); after the fix the set-aside ones returned; events: {}",
            reasons.join(", ")
        ),
        tickets: &tally,
        recovery_ms: 0,
        drain_ms: drain.as_millis(),
        bound_s: DRAIN_BOUND.as_secs(),
    }
    .record();
    f.finish().await;
}

async fn a_broken_environment_held_past_the_delivery_limit_drops_no_ticket(on: On) {
    broken_environment_at_the_delivery_limit(
        on,
        "a_broken_environment_held_past_the_delivery_limit_drops_no_ticket",
        "limit-drop",
        false,
    )
    .await;
}

mod dead_letter_exchange {
    /// With a dead-letter exchange, on the embedded API server only: the set-aside path
    /// is the same as without one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_broken_environment_held_past_the_delivery_limit_dead_letters_no_ticket() {
        super::broken_environment_at_the_delivery_limit(
            super::On::Embedded,
            "a_broken_environment_held_past_the_delivery_limit_dead_letters_no_ticket",
            "limit-dlx",
            true,
        )
        .await;
    }
}

/// The Lease the replicas of the failover scenarios elect their leader on.
const LEASE: &str = "testrunner-failover";
/// The Lease's duration (the operator's default), and the longest a standby may take to
/// lead once the leader is gone without releasing it: the duration, the standby's next
/// look at the Lease, and the API round trips.
const LEASE_DURATION: Duration = Duration::from_secs(15);
const TAKEOVER_BOUND: Duration = Duration::from_secs(22);

/// An operator replica as a process of its own, with leader election on, so that it can
/// be killed or frozen like a pod's container.
struct Replica {
    child: std::process::Child,
    log: PathBuf,
}

impl Replica {
    fn start(f: &Fault, kubeconfig: &std::path::Path, identity: &'static str) -> Replica {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = std::env::temp_dir().join(format!(
            "trp-{}-{identity}-{}.log",
            f.name,
            std::process::id()
        ));
        let out = std::fs::File::create(&log).unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_testrunner-operator"))
            .args(["--log-format", "json", "run", "--leader-election", "true"])
            .args(["--lease-namespace", "default", "--lease-name", LEASE])
            .args(["--lease-duration", &LEASE_DURATION.as_secs().to_string()])
            .args(["--instance", identity, "--watch-namespaces", "default"])
            .args(["--worker-report-interval", "2s"])
            .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("the operator replica starts");
        Replica { child, log }
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), signal).unwrap();
    }

    /// Whether the process has ended (and reaps it).
    fn ended(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Its log, for a failure message.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// The holder of the replicas' Lease.
async fn lease_holder(client: &kube::Client) -> Option<String> {
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), "default");
    leases
        .get_opt(LEASE)
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
        .filter(|h| !h.is_empty())
}

/// Samples, every 100 ms until stopped, the most worker pods the pool had at once that
/// were not being deleted: two leaders acting at once would create more than
/// `maxWorkers`.
fn watch_live_pods(
    pods: Api<Pod>,
    pool: &str,
) -> (
    tokio::task::JoinHandle<usize>,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let selector = format!("testrunner.dev/pool={pool}");
    let stopping = stop.clone();
    let sampler = tokio::spawn(async move {
        let mut most = 0;
        while !stopping.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok(list) = pods.list(&ListParams::default().labels(&selector)).await {
                let live = list
                    .items
                    .iter()
                    .filter(|p| p.metadata.deletion_timestamp.is_none())
                    .count();
                most = most.max(live);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        most
    });
    (sampler, stop)
}

/// Two replicas, a surge, and the leader stops leading mid-surge: killed (SIGKILL: it
/// cannot release its Lease), or frozen (SIGSTOP) past its Lease and woken once the
/// standby leads. The standby must lead within the Lease bound; a woken leader must see
/// that it lost the Lease and end before it acts; no action is doubled (never more
/// live pods than `maxWorkers`, no ticket started twice: no busy worker was removed).
async fn failover(on: On, test: &str, name: &'static str, freeze: bool) {
    let _one = ONE_AT_A_TIME.lock().await;
    let f = Fault::start(name, on).await;
    // The replicas below are the operator here.
    f.operator.abort();
    let dir = std::env::temp_dir().join(format!("trp-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    f.sim.write_kubeconfig(&kubeconfig).unwrap();

    let mut leader = Replica::start(&f, &kubeconfig, "replica-a");
    eventually("replica-a to lead", Duration::from_secs(60), || async {
        lease_holder(&f.client).await.as_deref() == Some("replica-a")
    })
    .await;
    let mut standby = Replica::start(&f, &kubeconfig, "replica-b");
    let (sampler, stop) = watch_live_pods(f.pods.clone(), name);
    f.pool(f.ledger.command(1.0)).await;
    let ids = f.publish(80).await;
    in_flight(&f.ledger, 3, 2).await;
    let busy_at_fault = {
        let (s, e) = (f.ledger.count("start"), f.ledger.count("end"));
        s.keys().filter(|id| !e.contains_key(*id)).count()
    };

    let fault_at = Instant::now();
    if freeze {
        leader.signal(nix::sys::signal::Signal::SIGSTOP);
    } else {
        leader.signal(nix::sys::signal::Signal::SIGKILL);
    }
    let deadline = Instant::now() + TAKEOVER_BOUND;
    while lease_holder(&f.client).await.as_deref() != Some("replica-b") {
        assert!(
            Instant::now() < deadline,
            "replica-b did not lead within {TAKEOVER_BOUND:?}; its log:\n{}",
            standby.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let takeover = fault_at.elapsed();
    assert!(!standby.ended(), "replica-b leads and runs");
    let woken_ended = if freeze {
        // The frozen leader wakes after the standby has led for a while, and must see
        // that the Lease is gone and end without acting.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let woken = Instant::now();
        let woke_at = jiff::Timestamp::now();
        leader.signal(nix::sys::signal::Signal::SIGCONT);
        let deadline = woken + Duration::from_secs(30);
        while !leader.ended() {
            assert!(
                Instant::now() < deadline,
                "the woken replica-a did not end within 30 s; its log:\n{}",
                leader.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // What it logged once awake: that it lost the Lease, and nothing the modules that
        // write (pods, revisions, quarantine) did.
        let said = std::fs::read_to_string(&leader.log).unwrap_or_default();
        let awake: Vec<serde_json::Value> = said
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|l| {
                l["timestamp"]
                    .as_str()
                    .and_then(|t| t.parse::<jiff::Timestamp>().ok())
                    .is_some_and(|t| t >= woke_at)
            })
            .collect();
        assert!(
            awake
                .iter()
                .any(|l| l.to_string().contains("another replica holds it now")),
            "the woken replica-a says it lost the Lease: {}",
            leader.log_tail()
        );
        let acted: Vec<&serde_json::Value> = awake
            .iter()
            .filter(|l| {
                l["target"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("testrunner_operator::controller::"))
            })
            .collect();
        assert!(acted.is_empty(), "the woken replica-a acted: {acted:?}");
        Some(woken.elapsed())
    } else {
        None
    };
    assert_eq!(
        lease_holder(&f.client).await.as_deref(),
        Some("replica-b"),
        "the standby keeps leading"
    );

    f.drained(&ids, DRAIN_BOUND).await;
    let drain = fault_at.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let most_pods = sampler.await.unwrap();
    let tally = f.tally(&ids).await;
    assert!(
        most_pods <= 4,
        "at most maxWorkers (4) live pods at once, saw {most_pods}"
    );
    assert_eq!(
        (tally.redelivered, tally.ran_twice, tally.quarantined),
        (0, 0, 0),
        "no busy worker removed, no ticket run twice, none quarantined: {tally:?}"
    );
    let reasons = f.event_reasons().await;
    let fault = if freeze {
        "the leader freezes past its Lease, then wakes"
    } else {
        "the leader is killed mid-surge"
    };
    let injected = format!(
        "{} replica-a (leading, Lease {} s) with {busy_at_fault} tickets in commands, 80 published, 4 workers; replica-b standing by",
        if freeze { "SIGSTOP to" } else { "SIGKILL to" },
        LEASE_DURATION.as_secs()
    );
    let mut did = format!(
        "replica-b led {:.1} s after the fault; at most {most_pods} live pods",
        takeover.as_secs_f64()
    );
    if let Some(ended) = woken_ended {
        did.push_str(&format!(
            "; replica-a, woken, ended {:.1} s later without acting",
            ended.as_secs_f64()
        ));
    }
    did.push_str(&format!("; events: {}", reasons.join(", ")));
    Row {
        test: f.test(test),
        fault,
        injected,
        operator_did: did,
        tickets: &tally,
        recovery_ms: takeover.as_millis(),
        drain_ms: drain.as_millis(),
        bound_s: (TAKEOVER_BOUND + DRAIN_BOUND).as_secs(),
    }
    .record();
    drop(standby);
    drop(leader);
    let _ = std::fs::remove_dir_all(&dir);
    f.finish().await;
}

async fn a_leader_killed_mid_surge_is_replaced_within_the_lease_and_no_action_is_doubled(on: On) {
    failover(
        on,
        "a_leader_killed_mid_surge_is_replaced_within_the_lease_and_no_action_is_doubled",
        "leader-kill",
        false,
    )
    .await;
}

async fn a_leader_frozen_past_its_lease_ends_on_waking_and_no_action_is_doubled(on: On) {
    failover(
        on,
        "a_leader_frozen_past_its_lease_ends_on_waking_and_no_action_is_doubled",
        "leader-freeze",
        true,
    )
    .await;
}

/// Each scenario runs twice: on the embedded API server (`embedded::NAME`), and on a
/// real control plane (`control_plane::NAME`: etcd, kube-apiserver, the controller
/// manager and the scheduler from TESTRUNNER_CONTROL_PLANE, by default
/// `target/control-plane/bin`). The second half is ignored by plain `cargo test`, by
/// name and with the reason; `bash tests/run.sh` builds the binaries and runs both.
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::On::Embedded).await
                }
            )*
        }
        mod control_plane {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                #[ignore = "needs the real control plane: bash tests/control-plane/build.sh, then cargo test -- --include-ignored (bash tests/run.sh does both)"]
                async fn $name() {
                    super::$name(super::On::ControlPlane).await
                }
            )*
        }
    };
}

on_both!(
    the_broker_restarts_mid_surge_and_every_ticket_completes,
    the_broker_is_unreachable_for_a_minute_and_every_ticket_completes,
    a_worker_sigkilled_mid_ticket_gets_its_ticket_redelivered_and_completed_not_quarantined,
    hostile_tickets_each_run_once_and_never_crash_the_wrapper,
    a_ticket_with_a_non_utf8_message_id_is_dead_lettered_by_the_broker_backstop,
    the_api_server_answers_500_for_20_s_and_the_operator_backs_off_and_converges,
    the_api_server_answers_429_with_retry_after_and_the_operator_honours_it,
    the_api_server_answers_409_to_writes_and_the_operator_converges,
    the_api_server_drops_watches_and_the_operator_relists_and_converges,
    a_slow_api_server_still_sees_every_ticket_completed,
    a_leader_killed_mid_surge_is_replaced_within_the_lease_and_no_action_is_doubled,
    a_leader_frozen_past_its_lease_ends_on_waking_and_no_action_is_doubled,
    a_broken_environment_held_past_the_delivery_limit_drops_no_ticket,
);
