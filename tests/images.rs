//! The worker wrapper inside foreign root filesystems on the simulated node. The roots
//! come from Debian's packages (`bash tests/rootfs.sh`, which `tests/run.sh` runs):
//! `busybox` holds a static busybox and nothing else; `musl` adds the musl C library;
//! neither has glibc, NSS files, a CA store, users or a HOME. `debian11` is Debian 11
//! (glibc 2.31, older than the glibc of the machine that builds the binary). The wrapper is this build's
//! `testrunner-operator`, copied in by the worker pod's init container as on a cluster.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use lapin::options::{BasicGetOptions, BasicPublishOptions, QueueDeleteOptions};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::{Value, json};
use testrunner_operator::controller::{self, Settings};
use testrunner_operator::crd::TestRunnerPool;
use testrunner_sim as sim;

mod common;
use common::{declare_expiring, eventually, eventually_some, queue_counts};

const BROKER: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const IMAGE: &str = "registry.example/minimal-runner:1";
/// Test-command prefix that fails (exit 42) outside a root `tests/rootfs.sh` built (it
/// marks each with `/.testrunner-rootfs`): the commands must never run on the host's root.
const NOT_ON_HOST: &str = "[ -e /.testrunner-rootfs ] || exit 42;";

/// A root filesystem `tests/rootfs.sh` built; a missing one fails the test and says how to
/// build it.
fn rootfs(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(".tools/rootfs")
        .join(name);
    assert!(
        dir.join(".testrunner-rootfs").exists(),
        "{} is missing: build it with `bash tests/rootfs.sh`",
        dir.display()
    );
    dir
}

/// A root without glibc and without NSS configuration.
fn bare_rootfs(name: &str) -> PathBuf {
    let dir = rootfs(name);
    assert!(
        !dir.join("lib/x86_64-linux-gnu/libc.so.6").exists()
            && !dir.join("etc/nsswitch.conf").exists(),
        "{} must hold no glibc and no NSS configuration",
        dir.display()
    );
    dir
}

async fn channel() -> (Connection, Channel) {
    let conn = Connection::connect(BROKER, ConnectionProperties::default())
        .await
        .expect("RabbitMQ answers on 127.0.0.1:5672 (`bash .ci/ensure-rabbitmq` installs and starts it)");
    let ch = conn.create_channel().await.unwrap();
    (conn, ch)
}

/// A simulated cluster (time scale 50) whose broker Secret holds `uri`, on which [`IMAGE`]
/// runs in the root filesystem `root`.
async fn simulation(uri: &str, root: PathBuf) -> sim::Simulation {
    sim::Simulation::start(
        "127.0.0.1:0".parse().unwrap(),
        sim::Options {
            images: BTreeMap::from([(IMAGE.to_string(), root)]),
            ..common::options(uri, 50.0)
        },
    )
    .await
    .unwrap()
}

/// Deletes a test's queues and closes its connection.
async fn remove_queues(conn: Connection, ch: &Channel, queues: &[String]) {
    for q in queues {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = conn.close(200, "done".into()).await;
}

async fn publish(ch: &Channel, queue: &str, id: &str, body: &str) {
    ch.basic_publish(
        "".into(),
        queue.into(),
        BasicPublishOptions::default(),
        body.as_bytes(),
        BasicProperties::default()
            .with_message_id(id.into())
            .with_delivery_mode(2),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

/// Reads every report on the outcome queue into `seen`: (ticket, outcome or state).
async fn read_reports(ch: &Channel, queue: &str, seen: &mut Vec<(String, String)>) {
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        let v: Value = serde_json::from_slice(&m.data).unwrap();
        let what = v["outcome"].as_str().or(v["state"].as_str()).unwrap_or("?");
        seen.push((
            v["ticket"].as_str().unwrap_or_default().to_string(),
            what.to_string(),
        ));
    }
}

/// The worker's reports on its outcome queue.
struct Reports<'a> {
    ch: &'a Channel,
    queue: &'a str,
}

impl Reports<'_> {
    /// Reads reports into `seen` until `ticket` has `what` (an outcome or a state), or
    /// fails after a minute.
    async fn wait(&self, seen: &mut Vec<(String, String)>, ticket: &str, what: &str) {
        let key = (ticket.to_string(), what.to_string());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            read_reports(self.ch, self.queue, seen).await;
            if seen.contains(&key) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {ticket} {what}; reports so far: {seen:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn worker_container_status(pod: &Pod) -> Value {
    let pod = serde_json::to_value(pod).unwrap();
    pod.pointer("/status/containerStatuses")
        .and_then(Value::as_array)
        .and_then(|cs| cs.iter().find(|c| c["name"] == "worker").cloned())
        .unwrap_or_default()
}

fn pool(queue: &str) -> TestRunnerPool {
    serde_json::from_value(json!({
        "apiVersion": "testrunner.dev/v1alpha1", "kind": "TestRunnerPool",
        "metadata": {"name": "minimal", "namespace": "default", "uid": "00000000-0000-4000-8000-000000000001"},
        "spec": {"image": IMAGE,
            // Exit 42 (a crash no ticket survives) if this were the host's filesystem.
            "command": ["sh", "-c", format!("{NOT_ON_HOST} body=$(cat); case \"$body\" in crash) exit 3;; slow) sleep 3;; esac; echo \"ran $TICKET_ID\"")],
            "queue": {"name": queue, "connectionSecretRef": {"name": "rabbitmq"}}},
    }))
    .unwrap()
}

/// One worker pod, built as the operator builds it, running in the root filesystem
/// `root`, that reaches the broker by a host name only its `/etc/hosts` knows: it runs a
/// ticket, crashes on one and says which, diverts a ticket the mounted quarantine list
/// names, and drains the ticket in hand when the pod is deleted.
async fn wrapper_runs_in(root: PathBuf) {
    let tag = format!(
        "{}-{}-{}",
        root.file_name().unwrap().to_string_lossy(),
        std::process::id(),
        jiff::Timestamp::now().as_millisecond()
    );
    let queue = format!("img-{tag}");
    let quarantine = format!("{queue}.quarantine");
    let outcomes = format!("{queue}.outcomes");
    let (conn, ch) = channel().await;
    declare_expiring(&ch, &queue, true).await;
    declare_expiring(&ch, &quarantine, true).await;
    declare_expiring(&ch, &outcomes, false).await;

    // The broker by a name that only the pod's hostAliases resolve.
    let sim = simulation("amqp://guest:guest@rabbitmq.testrunner-sim:5672/%2f", root).await;
    let client = sim.client();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), "default");

    let pool = pool(&queue);
    let settings = testrunner_operator::pods::PodSettings {
        operator_image: "testrunner-operator:test".into(),
        report_interval: Duration::from_secs(2),
        log_format: testrunner_operator::telemetry::LogFormat::Json,
        outcome_queue_prefix: testrunner_operator::pods::DEFAULT_OUTCOME_QUEUE_PREFIX.into(),
    };
    let mut pod = serde_json::to_value(testrunner_operator::pods::build_pod(
        &pool,
        "minimal-1",
        "r1",
        &settings,
    ))
    .unwrap();
    pod["metadata"]["ownerReferences"] = json!([]);
    pod["spec"]["hostAliases"] =
        json!([{"ip": "127.0.0.1", "hostnames": ["rabbitmq.testrunner-sim"]}]);
    // The broker sidecar reports: it gets this test's outcome queue.
    for list in ["initContainers", "containers"] {
        for c in pod["spec"][list].as_array_mut().unwrap() {
            for e in c["env"].as_array_mut().into_iter().flatten() {
                if e["name"] == "TESTRUNNER_OUTCOMES_QUEUE" {
                    e["value"] = json!(outcomes);
                }
            }
        }
    }
    let list = |ids: &[&str]| {
        let at = jiff::Timestamp::now().as_second();
        ids.iter()
            .map(|id| format!("{id} {at}\n"))
            .collect::<String>()
    };
    let quarantine_cm = testrunner_operator::pods::quarantine_config_map(&pool);
    config_maps
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": quarantine_cm},
                "data": {"tickets": list(&["t-listed"])}}))
            .unwrap(),
        )
        .await
        .unwrap();
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(pod).unwrap(),
    )
    .await
    .unwrap();

    let mut seen = Vec::new();
    let reports = Reports {
        ch: &ch,
        queue: &outcomes,
    };

    // A ticket runs and is acked: the wrapper started in the root filesystem, found the
    // broker by its host name, and reported.
    publish(&ch, &queue, "t-ok", "fine").await;
    reports.wait(&mut seen, "t-ok", "passed").await;

    // A ticket on the mounted quarantine list goes to the quarantine queue, unrun.
    publish(&ch, &queue, "t-listed", "fine").await;
    reports.wait(&mut seen, "t-listed", "quarantined").await;
    assert!(!seen.contains(&("t-listed".to_string(), "busy".to_string())));

    // A crash is attributed to its ticket through the termination log.
    publish(&ch, &queue, "t-crash", "crash").await;
    let terminated = eventually_some(
        "the crash on t-crash in the pod status",
        Duration::from_secs(60),
        || {
            let pods = pods.clone();
            async move {
                let status = worker_container_status(&pods.get("minimal-1").await.ok()?);
                let t = status.pointer("/lastState/terminated")?.clone();
                t["message"]
                    .as_str()?
                    .contains("ticket=t-crash")
                    .then_some(t)
            }
        },
    )
    .await;
    assert_eq!(terminated["exitCode"], 3, "{terminated}");
    // Listing it ends the crash loop: the next delivery goes to quarantine.
    config_maps
        .patch(
            &quarantine_cm,
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"tickets": list(&["t-listed", "t-crash"])}})),
        )
        .await
        .unwrap();
    reports.wait(&mut seen, "t-crash", "quarantined").await;

    // Deleting the pod while a ticket runs: the wrapper finishes it, acks, and exits.
    publish(&ch, &queue, "t-slow", "slow").await;
    reports.wait(&mut seen, "t-slow", "busy").await;
    pods.delete("minimal-1", &DeleteParams::default())
        .await
        .unwrap();
    reports.wait(&mut seen, "t-slow", "passed").await;
    eventually_some("the pod to go", Duration::from_secs(30), || {
        let pods = pods.clone();
        async move {
            pods.get_opt("minimal-1")
                .await
                .unwrap()
                .is_none()
                .then_some(())
        }
    })
    .await;

    // Counted in and out: each ticket ran or moved once, nothing is left.
    let count = |ticket: &str, what: &str| {
        seen.iter()
            .filter(|(t, o)| t == ticket && o == what)
            .count()
    };
    assert_eq!(count("t-ok", "passed"), 1);
    assert_eq!(count("t-slow", "passed"), 1);
    assert_eq!(count("t-listed", "quarantined"), 1);
    assert_eq!(count("t-crash", "quarantined"), 1);
    let depth = |q: String| {
        let ch = ch.clone();
        async move { queue_counts(&ch, &q).await.0 }
    };
    assert_eq!(depth(queue.clone()).await, 0);
    assert_eq!(depth(quarantine.clone()).await, 2);

    sim.shutdown().await;
    remove_queues(conn, &ch, &[queue.clone(), quarantine, outcomes]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wrapper_runs_tickets_in_a_busybox_only_root_filesystem() {
    wrapper_runs_in(bare_rootfs("busybox")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wrapper_runs_tickets_in_a_musl_root_filesystem() {
    let root = bare_rootfs("musl");
    assert!(root.join("lib/ld-musl-x86_64.so.1").exists());
    wrapper_runs_in(root).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wrapper_runs_tickets_in_a_debian_11_root_filesystem_with_an_older_glibc() {
    let root = rootfs("debian11");
    assert!(root.join("lib/x86_64-linux-gnu/libc-2.31.so").exists());
    wrapper_runs_in(root).await;
}

/// The operator's own worker pods on an image with the root `root`: the broker by IP, a
/// ledger on a hostPath volume, and every ticket run once while the pool scales up and
/// back to zero.
async fn a_pool_runs_each_ticket_once_in(root: PathBuf) {
    let root_name = root.file_name().unwrap().to_string_lossy().into_owned();
    let tag = format!(
        "{root_name}-{}-{}",
        std::process::id(),
        jiff::Timestamp::now().as_millisecond()
    );
    let queue = format!("img-pool-{tag}");
    let (conn, ch) = channel().await;
    declare_expiring(&ch, &queue, true).await;
    declare_expiring(&ch, &format!("{queue}.quarantine"), true).await;
    let ids = testrunner_operator::publish::publish(BROKER, &queue, 12, false)
        .await
        .unwrap();

    let ledger = std::env::temp_dir().join(format!("img-ledger-{tag}"));
    std::fs::create_dir_all(&ledger).unwrap();
    let sim = simulation(BROKER, root).await;
    let client = sim.client();
    // Its own outcome queue: other tests run operators on the same broker and namespace.
    let outcomes_prefix = format!("{queue}.outcomes");
    let operator = controller::spawn(
        client.clone(),
        Settings::in_process(vec!["default".into()]).with_outcome_queue_prefix(&outcomes_prefix),
    );
    let pools: Api<TestRunnerPool> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pool: TestRunnerPool = serde_json::from_value(json!({
        "apiVersion": "testrunner.dev/v1alpha1", "kind": "TestRunnerPool",
        "metadata": {"name": format!("pool-{}", root_name)},
        "spec": {"image": IMAGE,
            "command": ["sh", "-c", format!("{NOT_ON_HOST} echo \"$TICKET_ID start\" >> /ledger/log; cat >/dev/null; sleep 0.2; echo \"$TICKET_ID end\" >> /ledger/log")],
            "queue": {"name": queue, "connectionSecretRef": {"name": "rabbitmq"}},
            "scaling": {"minWorkers": 0, "maxWorkers": 3, "pollInterval": "300ms", "scaleDownDelay": "1s"},
            "template": {
                "volumes": [{"name": "ledger", "hostPath": {"path": ledger.display().to_string()}}],
                "volumeMounts": [{"name": "ledger", "mountPath": "/ledger"}]}},
    }))
    .unwrap();
    pools.create(&PostParams::default(), &pool).await.unwrap();

    let lines = || {
        std::fs::read_to_string(ledger.join("log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    eventually(
        "every ticket to complete",
        Duration::from_secs(90),
        || async { lines().iter().filter(|l| l.ends_with(" end")).count() >= ids.len() },
    )
    .await;
    eventually_some("the pool to scale to zero", Duration::from_secs(60), || {
        let pods = pods.clone();
        async move {
            pods.list(&Default::default())
                .await
                .ok()?
                .items
                .is_empty()
                .then_some(())
        }
    })
    .await;
    let lines = lines();
    for id in &ids {
        for what in ["start", "end"] {
            let line = format!("{id} {what}");
            assert_eq!(
                lines.iter().filter(|l| **l == line).count(),
                1,
                "{id} {what} once: {lines:?}"
            );
        }
    }
    assert_eq!(lines.len(), 2 * ids.len(), "nothing else ran: {lines:?}");

    operator.abort();
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(&ledger);
    let outcomes = format!("{outcomes_prefix}.default");
    remove_queues(
        conn,
        &ch,
        &[queue.clone(), format!("{queue}.quarantine"), outcomes],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_on_a_busybox_only_image_runs_each_ticket_once() {
    a_pool_runs_each_ticket_once_in(bare_rootfs("busybox")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_on_a_musl_image_runs_each_ticket_once() {
    a_pool_runs_each_ticket_once_in(bare_rootfs("musl")).await;
}
