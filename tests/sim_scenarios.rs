//! Whole-system scenarios on the simulated cluster: the real operator, the simulated
//! API server and kubelet, and the real RabbitMQ (on 127.0.0.1:5672 or at
//! TESTRUNNER_AMQP_URI; without one they fail and say so).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::apps::v1::ControllerRevision;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use lapin::options::QueueDeleteOptions;
use serde_json::json;
use testrunner_operator::controller::{self, Settings};
use testrunner_operator::crd::{
    Condition, RolloutPhase, RolloutStatus, TestRunnerPool, TestRunnerPoolStatus,
};
use testrunner_sim as sim;

mod common;
use common::ledger::Ledger;
use common::{
    broker_uri, control_plane_bin, declare_expiring, eventually, kubectl, passive_declare,
    process_alive, queue_counts,
};

/// Where a scenario runs: the simulated cluster by default, or the real cluster of
/// TESTRUNNER_E2E_KUBECONFIG (worker image TESTRUNNER_E2E_IMAGE, in a fresh namespace,
/// with the operator running in this process against it).
struct Target {
    client: kube::Client,
    namespace: String,
    image: String,
    /// Allowance on top of the poll interval for pods to appear.
    margin: Duration,
    sim: Option<sim::Simulation>,
    /// The prefix of the operator's outcome queues: scenarios run side by side in the
    /// same namespace on one broker, each with an operator of its own.
    outcomes: String,
}

/// An outcome queue prefix no other scenario uses.
fn outcomes_prefix() -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    format!(
        "testrunner.outcomes.sim-{}-{}-{}",
        std::process::id(),
        jiff::Timestamp::now().as_millisecond(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// Which API server a scenario's simulated cluster uses.
#[derive(Clone, Copy, Debug)]
enum On {
    /// The embedded, in-process API server.
    Embedded,
    /// A real control plane (see [`on_both`]).
    ControlPlane,
}

impl Target {
    async fn new(on: On) -> Self {
        let Ok(path) = std::env::var("TESTRUNNER_E2E_KUBECONFIG") else {
            let sim = match on {
                On::Embedded => common::simulation(&broker_uri(), 50.0).await,
                On::ControlPlane => {
                    let bin = control_plane_bin();
                    sim::Simulation::start_on_control_plane(&bin, common::options(&broker_uri(), 50.0))
                        .await
                        .unwrap_or_else(|e| panic!("the real control plane did not start from {}: {e}\n(build it with: bash tests/control-plane/build.sh)", bin.display()))
                }
            };
            // Its own namespace on the control plane: the outcome queues are named after
            // namespace and pool, and both halves of a scenario share the broker.
            let namespace = match on {
                On::Embedded => "default".to_string(),
                On::ControlPlane => {
                    let ns = "on-control-plane";
                    namespace_with_broker_secret(&sim.client(), ns).await;
                    ns.to_string()
                }
            };
            return Self {
                client: sim.client(),
                namespace,
                image: "example.org/runner:1".into(),
                margin: Duration::from_secs(15),
                sim: Some(sim),
                outcomes: outcomes_prefix(),
            };
        };
        eprintln!("TESTRUNNER_E2E_KUBECONFIG is set: running on that cluster ({on:?} ignored)");
        let image = std::env::var("TESTRUNNER_E2E_IMAGE").expect(
            "TESTRUNNER_E2E_IMAGE names the worker image when TESTRUNNER_E2E_KUBECONFIG is set",
        );
        let kc =
            kube::config::Kubeconfig::read_from(&path).expect("TESTRUNNER_E2E_KUBECONFIG reads");
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .expect("TESTRUNNER_E2E_KUBECONFIG loads");
        let client = kube::Client::try_from(config).unwrap();
        let namespace = format!(
            "trp-e2e-{}-{}",
            std::process::id(),
            jiff::Timestamp::now().as_millisecond()
        );
        let apply = kube::api::PatchParams::apply("testrunner-e2e").force();
        let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
            Api::all(client.clone());
        let crd = <TestRunnerPool as kube::CustomResourceExt>::crd();
        crds.patch(
            "testrunnerpools.testrunner.dev",
            &apply,
            &kube::api::Patch::Apply(&crd),
        )
        .await
        .expect("the CRD applies");
        let nss: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
        nss.create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": namespace}})).unwrap(),
        )
        .await
        .expect("the test namespace is created");
        let secrets: Api<k8s_openapi::api::core::v1::Secret> =
            Api::namespaced(client.clone(), &namespace);
        let uri = std::env::var("TESTRUNNER_E2E_AMQP_URI").unwrap_or_else(|_| broker_uri());
        secrets
            .create(
                &PostParams::default(),
                &serde_json::from_value(
                    json!({"metadata": {"name": "rabbitmq"}, "stringData": {"uri": uri}}),
                )
                .unwrap(),
            )
            .await
            .expect("the broker Secret is created");
        Self {
            client,
            namespace,
            image,
            margin: Duration::from_secs(120),
            sim: None,
            outcomes: outcomes_prefix(),
        }
    }

    /// The settings of this scenario's operator (each one started on it).
    fn settings(&self) -> Settings {
        Settings::in_process(vec![self.namespace.clone()]).with_outcome_queue_prefix(&self.outcomes)
    }

    /// The outcome queue of the scenario's namespace.
    fn outcome_queue(&self) -> String {
        format!("{}.{}", self.outcomes, self.namespace)
    }

    async fn finish(self) {
        match self.sim {
            Some(sim) => sim.shutdown().await,
            None => {
                let nss: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(self.client.clone());
                let _ = nss.delete(&self.namespace, &DeleteParams::default()).await;
            }
        }
    }
}

/// Creates namespace `ns` with the broker Secret, and waits (up to a minute) for the
/// controller manager to give it its `default` service account, which pods need.
async fn namespace_with_broker_secret(client: &kube::Client, ns: &str) {
    let nss: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    nss.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
    )
    .await
    .expect("the namespace is created");
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), ns);
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"metadata": {"name": "rabbitmq"}, "stringData": {"uri": broker_uri()}}),
            )
            .unwrap(),
        )
        .await
        .expect("the broker Secret is created");
    let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(client.clone(), ns);
    eventually(
        "the default service account",
        Duration::from_secs(60),
        || {
            let sas = sas.clone();
            async move { sas.get_opt("default").await.ok().flatten().is_some() }
        },
    )
    .await;
}

/// A connection to the test broker; a scenario without one fails and says how to
/// start it.
async fn broker() -> lapin::Connection {
    let uri = testrunner_operator::broker::BrokerUri::parse(&broker_uri())
        .expect("TESTRUNNER_AMQP_URI is a valid AMQP URI");
    let connect =
        lapin::Connection::connect_uri(uri.amqp_uri(), lapin::ConnectionProperties::default());
    match tokio::time::timeout(Duration::from_secs(5), connect).await {
        Ok(Ok(c)) => c,
        _ => panic!(
            "no RabbitMQ answers at {}: the scenarios need one (`bash .ci/ensure-rabbitmq` installs and starts it)",
            testrunner_operator::broker::BrokerUri::parse(&broker_uri())
                .map(|u| u.redacted().to_string())
                .unwrap_or_default()
        ),
    }
}

async fn depth(conn: &lapin::Connection, queue: &str) -> u32 {
    let ch = conn.create_channel().await.unwrap();
    let n = depth_on(&ch, queue).await;
    let _ = ch.close(200, "done".into()).await;
    n
}

async fn depth_on(ch: &lapin::Channel, queue: &str) -> u32 {
    queue_counts(ch, queue).await.0
}

async fn consumers(conn: &lapin::Connection, queue: &str) -> u32 {
    let ch = conn.create_channel().await.unwrap();
    let n = queue_counts(&ch, queue).await.1;
    let _ = ch.close(200, "done".into()).await;
    n
}

async fn a_queue_surge_scales_up_an_operator_restart_takes_over_and_deleting_the_pool_removes_its_pods(
    on: On,
) {
    let conn = broker().await;
    let queue = format!(
        "sim-surge-{}-{}",
        std::process::id(),
        jiff::Timestamp::now().as_millisecond()
    );
    let target = Target::new(on).await;
    let client = target.client.clone();
    let ns = target.namespace.clone();
    let mut operator = controller::spawn(client.clone(), target.settings());

    let ids = publish_to_test_queue(&conn, &queue, 6).await;
    assert_eq!(ids.len(), 6);
    let pools: Api<TestRunnerPool> = Api::namespaced(client.clone(), &ns);
    let pool: TestRunnerPool = serde_json::from_value(json!({
        "apiVersion": "testrunner.dev/v1alpha1", "kind": "TestRunnerPool",
        "metadata": {"name": "surge"},
        // Native mode with a command that never takes a ticket: the queue depth alone
        // drives the pool, and every ticket stays where it is.
        "spec": {"image": target.image, "worker": {"mode": "Native"}, "command": ["sleep", "3600"],
            "queue": {"name": queue, "connectionSecretRef": {"name": "rabbitmq", "key": "uri"}},
            "scaling": {"minWorkers": 0, "maxWorkers": 4, "pollInterval": "500ms"},
            // `sleep` ignores SIGTERM as PID 1 of a real container: keep deletions short.
            "template": {"terminationGracePeriodSeconds": 5}},
    }))
    .unwrap();
    let started = tokio::time::Instant::now();
    pools.create(&PostParams::default(), &pool).await.unwrap();

    // Six tickets, at most four workers: four pods within the poll interval plus a margin.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let selector = ListParams::default().labels("testrunner.dev/pool=surge");
    let deadline = started + Duration::from_millis(500) + target.margin;
    loop {
        let n = pods.list(&selector).await.unwrap().items.len();
        let desired = pools
            .get_status("surge")
            .await
            .unwrap()
            .status
            .and_then(|s| s.workers)
            .map(|w| w.desired);
        if n == 4 && desired == Some(4) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "pool did not scale to 4 (pods {n}, desired {desired:?})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Operator restart mid-run: the new one takes over from what it finds. One worker
    // is lost while no operator runs; the new operator replaces it and never runs more
    // than four.
    operator.abort();
    let _ = operator.await;
    let victim = pods.list(&selector).await.unwrap().items[0]
        .metadata
        .name
        .clone()
        .unwrap();
    pods.delete(&victim, &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    operator = controller::spawn(client.clone(), target.settings());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let live: Vec<String> = pods
            .list(&selector)
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .map(|p| p.metadata.name.unwrap())
            .collect();
        assert!(live.len() <= 4, "more workers than maxWorkers: {live:?}");
        if live.len() == 4 && !live.contains(&victim) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lost worker was not replaced: {live:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    pools
        .delete("surge", &DeleteParams::default())
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !pods.list(&selector).await.unwrap().items.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the pool's pods did not go"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Nothing lost: no worker took a ticket, and every ticket is still in the queue.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while depth(&conn, &queue).await != 6 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "tickets went missing"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    operator.abort();
    target.finish().await;
    let ch = conn.create_channel().await.unwrap();
    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
}

/// A fresh directory for a `simulate` run, and where its kubeconfig goes.
fn fresh_dir(tag: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    (dir, kubeconfig)
}

/// Starts `testrunner-operator simulate` on a free port with `args`, writing
/// `kubeconfig`, on this test's broker; its standard output is piped.
fn spawn_simulate(kubeconfig: &std::path::Path, args: &[&str]) -> tokio::process::Child {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    tokio::process::Command::new(env!("CARGO_BIN_EXE_testrunner-operator"))
        .args(["simulate", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .env("TESTRUNNER_AMQP_URI", broker_uri())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulate_command_serves_kubectl_clients_and_ctrl_c_leaves_no_process_behind() {
    let (dir, kubeconfig) = fresh_dir("sim-command");
    let mut child = spawn_simulate(&kubeconfig, &["--time-scale", "100"]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let client = loop {
        if let Ok(kc) = kube::config::Kubeconfig::read_from(&kubeconfig)
            && let Ok(config) = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await
            && let Ok(client) = kube::Client::try_from(config)
            && client.apiserver_version().await.is_ok()
        {
            break client;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "simulate did not come up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // A stubborn PID 1, and a process that leaves its process group and session (as a
    // test's background server might): stopping the container stops both. Each writes
    // its pid as the host sees it (the container has a PID namespace of its own).
    let script = format!(
        "cut -d' ' -f4 /proc/self/stat > {d}/pid.tmp && mv {d}/pid.tmp {d}/pid; \
         setsid sh -c 'cut -d\" \" -f4 /proc/self/stat > {d}/escaped.tmp && mv {d}/escaped.tmp {d}/escaped; trap \"\" TERM; while true; do sleep 0.05; done' & \
         trap '' TERM; while true; do sleep 0.05; done",
        d = dir.display()
    );
    let pods: Api<Pod> = Api::namespaced(client, "default");
    let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "stubborn"},
        "spec": {"containers": [{"name": "main", "image": "x", "command": ["sh", "-c", script]}]}}))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let read_pid = |name: &str| {
        std::fs::read_to_string(dir.join(name))
            .ok()
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty())
    };
    let (pid, escaped) = loop {
        if let (Some(pid), Some(escaped)) = (read_pid("pid"), read_pid("escaped")) {
            break (pid, escaped);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the pod's processes did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(process_alive(&pid));
    assert!(process_alive(&escaped));

    let out = interrupt(&mut child, Duration::from_secs(20)).await;
    assert!(
        out.contains("Simulated cluster at http://127.0.0.1:"),
        "{out}"
    );
    assert!(out.contains("kubectl get trp,pods -w"), "{out}");
    assert!(
        !out.contains("guest:guest"),
        "the broker URI is never printed: {out}"
    );
    // The kubelet sent SIGKILL before simulate exited; the kernel tears the processes
    // down asynchronously, a moment later at most.
    let gone_by = tokio::time::Instant::now() + Duration::from_secs(5);
    while (process_alive(&pid) || process_alive(&escaped)) && tokio::time::Instant::now() < gone_by
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!process_alive(&pid), "the pod's process is gone");
    assert!(
        !process_alive(&escaped),
        "the process that left the container's process group is gone too"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The walk-through `simulate` prints runs as printed, at the default time scale, on a
/// queue of its own: ten tickets, a surge, a broken upgrade whose canary is rolled back
/// while the stable workers run every ticket, and a good upgrade that is promoted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_walk_through_simulate_prints_runs_as_printed() {
    use tokio::io::AsyncBufReadExt;
    let conn = broker().await;
    let (dir, kubeconfig) = fresh_dir("sim-walk");
    let prefix = outcomes_prefix();
    let queue = queue_name("walk");
    let mut child = spawn_simulate(&kubeconfig, &["--outcome-queue-prefix", &prefix]);
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut printed = Vec::new();
    let read = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.starts_with("Ctrl-C stops everything") {
                return;
            }
            printed.push(line);
        }
        panic!("simulate ended before its walk-through");
    };
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("simulate prints its walk-through");
    let from = printed
        .iter()
        .position(|l| l.starts_with("In a second terminal"))
        .expect("the walk-through's steps")
        + 1;
    let script = printed[from..].join("\n").replace("tickets.demo", &queue);
    assert!(script.contains(&format!("export KUBECONFIG={}", kubeconfig.display())));

    let kubectl = kubectl();
    let path = format!(
        "{}:{}",
        kubectl.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let run = tokio::process::Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .env("PATH", path)
        .env("TESTRUNNER_AMQP_URI", broker_uri())
        .output();
    let out = tokio::time::timeout(Duration::from_secs(600), run)
        .await
        .expect("the walk-through ends within ten minutes")
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the walk-through failed:\n{said}");
    assert!(said.contains("condition met"), "{said}");

    // What the steps said happened did.
    let client = {
        let kc = kube::config::Kubeconfig::read_from(&kubeconfig).unwrap();
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .unwrap();
        kube::Client::try_from(config).unwrap()
    };
    let (pools, pods) = apis_in(&client, "default");
    let r = status_of(&pools, "demo").await.rollout.unwrap();
    let ends: Vec<(&str, &str, &str)> = r
        .history
        .iter()
        .map(|h| (h.image.as_str(), h.result.as_str(), h.reason.as_str()))
        .collect();
    assert_eq!(
        ends,
        [
            ("example.org/test-runner:1", "Promoted", "FirstRevision"),
            (
                "example.org/test-runner:broken",
                "RolledBack",
                "CanaryCrashedOnTickets"
            ),
            ("example.org/test-runner:2", "Promoted", "CanaryPassed"),
        ]
    );
    assert!(
        said.contains("CanaryCrashedOnTickets"),
        "describe shows the rollback: {said}"
    );
    // The pool scales back to zero, and every ticket ran: none quarantined, none left
    // (a worker gone with a ticket in hand would have put it back).
    eventually(
        "the pool to scale to zero",
        Duration::from_secs(180),
        || async { all_pods(&pods, "demo").await == 0 },
    )
    .await;
    let ch = conn.create_channel().await.unwrap();
    assert_eq!(queue_counts(&ch, &queue).await, (0, 0));
    // The quarantine queue is made with the first ticket it takes.
    let quarantine = format!("{queue}.quarantine");
    let ch = conn.create_channel().await.unwrap();
    if let Ok(q) = passive_declare(&ch, &quarantine).await {
        assert_eq!(q.message_count(), 0, "nothing was quarantined");
    }
    let status = status_of(&pools, "demo").await;
    assert!(status.quarantine.is_none(), "{:?}", status.quarantine);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let stopped = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("simulate stops")
        .unwrap();
    assert!(stopped.success(), "{stopped:?}");
    delete_queue(&conn, &queue).await;
    delete_queue(&conn, &format!("{queue}.quarantine")).await;
    delete_queue(&conn, &format!("{prefix}.default")).await;
    let _ = std::fs::remove_dir_all(&dir);
}

fn wrapped_pool(
    name: &str,
    image: &str,
    queue: &str,
    command: serde_json::Value,
    scaling: serde_json::Value,
) -> TestRunnerPool {
    serde_json::from_value(json!({
        "apiVersion": "testrunner.dev/v1alpha1", "kind": "TestRunnerPool",
        "metadata": {"name": name},
        "spec": {"image": image, "command": command,
            "queue": {"name": queue, "connectionSecretRef": {"name": "rabbitmq", "key": "uri"}},
            "scaling": scaling},
    }))
    .unwrap()
}

async fn live_pods(pods: &Api<Pod>, pool: &str) -> usize {
    pods.list(&ListParams::default().labels(&format!("testrunner.dev/pool={pool}")))
        .await
        .unwrap()
        .items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .count()
}

async fn all_pods(pods: &Api<Pod>, pool: &str) -> usize {
    pods.list(&ListParams::default().labels(&format!("testrunner.dev/pool={pool}")))
        .await
        .unwrap()
        .items
        .len()
}

fn queue_name(scenario: &str) -> String {
    format!(
        "sim-{scenario}-{}-{}",
        std::process::id(),
        jiff::Timestamp::now().as_millisecond()
    )
}

/// Declares a scenario's quorum queue that removes itself after ten unused minutes, so a
/// failed scenario leaves nothing behind on the broker.
async fn test_queue(conn: &lapin::Connection, queue: &str) {
    let ch = conn.create_channel().await.unwrap();
    declare_expiring(&ch, queue, true).await;
}

/// Publishes `n` tickets to a fresh self-removing queue (and its quarantine queue).
async fn publish_to_test_queue(conn: &lapin::Connection, queue: &str, n: u32) -> Vec<String> {
    test_queue(conn, queue).await;
    test_queue(conn, &format!("{queue}.quarantine")).await;
    testrunner_operator::publish::publish(&broker_uri(), queue, n, false)
        .await
        .unwrap()
}

/// Keeps tickets waiting in a queue until stopped, so that a rollout is judged under
/// load however fast the machine runs the tickets.
struct Load {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl Load {
    /// Publishes to `queue` whenever fewer than `waiting` tickets are ready.
    async fn start(queue: &str, waiting: u32) -> Load {
        use lapin::options::ConfirmSelectOptions;
        let conn = broker().await;
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let queue = queue.to_string();
        let task = tokio::spawn(async move {
            let mut ids = Vec::new();
            while !*stopped.borrow() {
                for _ in depth_on(&ch, &queue).await..waiting {
                    let id = format!("{queue}-load-{}", ids.len());
                    common::publish_confirmed(&ch, &queue, &id).await;
                    ids.push(id);
                }
                tokio::select! {
                    _ = stopped.changed() => {}
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
            let _ = conn.close(200, "done".into()).await;
            ids
        });
        Load { stop, task }
    }

    /// Stops publishing; returns the tickets it published.
    async fn stop(self) -> Vec<String> {
        let _ = self.stop.send(true);
        self.task.await.expect("the load publisher ran")
    }
}

async fn delete_queue(conn: &lapin::Connection, queue: &str) {
    let ch = conn.create_channel().await.unwrap();
    let _ = ch
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await;
}

/// What every ticket-counting scenario starts with: a broker connection, the simulated
/// cluster, the operator, a fresh queue with `tickets` tickets, and a ledger.
struct Scenario {
    conn: lapin::Connection,
    target: Target,
    client: kube::Client,
    ns: String,
    operator: tokio::task::JoinHandle<()>,
    queue: String,
    ledger: Ledger,
    ids: Vec<String>,
}

impl Scenario {
    /// Starts a scenario; it needs the simulated cluster (its ticket ledger is a local
    /// file), so on a real cluster it fails and says so.
    async fn start(on: On, name: &str, tickets: u32) -> Scenario {
        let conn = broker().await;
        let target = Target::new(on).await;
        if target.sim.is_none() {
            target.finish().await;
            panic!(
                "scenario {name} needs the simulated cluster: its ticket ledger is a local file"
            );
        }
        let (client, ns) = (target.client.clone(), target.namespace.clone());
        let operator = controller::spawn(client.clone(), target.settings());
        let queue = queue_name(name);
        let ledger = Ledger::new(name);
        let ids = publish_to_test_queue(&conn, &queue, tickets).await;
        Scenario {
            conn,
            target,
            client,
            ns,
            operator,
            queue,
            ledger,
            ids,
        }
    }
}

/// Stops the operator and the cluster and removes the scenario's queues, the outcome
/// queue of its namespace included (the operator deletes it when the namespace's last
/// pool is deleted; these pools go with the cluster instead).
async fn finish(
    conn: lapin::Connection,
    target: Target,
    operator: tokio::task::JoinHandle<()>,
    queue: &str,
) {
    operator.abort();
    delete_queue(&conn, &target.outcome_queue()).await;
    target.finish().await;
    delete_queue(&conn, queue).await;
    delete_queue(&conn, &format!("{queue}.quarantine")).await;
}

async fn tickets_flow_through_wrapped_workers_and_the_pool_drains_back_to_min(on: On) {
    let Scenario {
        conn,
        target,
        client,
        ns,
        operator,
        queue,
        ledger,
        ids,
    } = Scenario::start(on, "flow", 20).await;

    let (pools, pods) = apis_in(&client, &ns);
    let pool = wrapped_pool(
        "flow",
        &target.image,
        &queue,
        ledger.command(0.2),
        json!({"minWorkers": 1, "maxWorkers": 5, "pollInterval": "500ms", "scaleDownDelay": "1s"}),
    );
    let created = tokio::time::Instant::now();
    pools.create(&PostParams::default(), &pool).await.unwrap();

    // Twenty tickets waiting: the pool goes to maxWorkers within the poll interval plus a margin.
    let mut peak = 0;
    while peak < 5 {
        peak = peak.max(live_pods(&pods, "flow").await);
        assert!(
            created.elapsed() < Duration::from_millis(500) + target.margin,
            "scaled to {peak} of 5"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Every ticket runs once, then the pool drains back to minWorkers.
    eventually(
        "every ticket to complete",
        Duration::from_secs(60),
        || async { ledger.count("end").len() == ids.len() },
    )
    .await;
    eventually(
        "the pool to drain back to minWorkers",
        Duration::from_secs(30),
        || async { all_pods(&pods, "flow").await == 1 },
    )
    .await;
    ledger.assert_each_once(&ids);
    assert_eq!(depth(&conn, &queue).await, 0, "nothing left in the queue");
    let status = pools.get_status("flow").await.unwrap().status.unwrap();
    assert_eq!(status.workers.unwrap().desired, 1);

    finish(conn, target, operator, &queue).await;
}

/// The pool's worker counts as its status shows them: (desired, current, busy).
async fn workers(pools: &Api<TestRunnerPool>, pool: &str) -> (i32, i32, i32) {
    let w = status_of(pools, pool).await.workers.unwrap_or_default();
    (w.desired, w.current, w.busy)
}

/// True while the queue exists on the broker.
async fn queue_exists(conn: &lapin::Connection, queue: &str) -> bool {
    let ch = conn.create_channel().await.unwrap();
    let found = passive_declare(&ch, queue).await.is_ok();
    if found {
        let _ = ch.close(200, "done".into()).await;
    }
    found
}

async fn a_long_ticket_runs_once_while_the_empty_queue_would_scale_the_pool_to_zero(on: On) {
    let Scenario {
        conn,
        target,
        client,
        ns,
        operator,
        queue,
        ledger,
        ids,
    } = Scenario::start(on, "long", 1).await;
    let (pools, pods) = apis_in(&client, &ns);
    // One 25 s ticket, a 3 s scale-down delay and an 8 s grace period: once the worker
    // takes the ticket the queue is empty, yet the busy worker must stay until it is done.
    let mut pool = wrapped_pool(
        "long",
        &target.image,
        &queue,
        ledger.command(25.0),
        json!({"minWorkers": 0, "maxWorkers": 2, "pollInterval": "500ms", "scaleDownDelay": "3s"}),
    );
    pool.spec.workload.template =
        Some(serde_json::from_value(json!({"terminationGracePeriodSeconds": 8})).unwrap());
    pools.create(&PostParams::default(), &pool).await.unwrap();

    eventually("the ticket to start", Duration::from_secs(30), || async {
        ledger.count("start").len() == 1
    })
    .await;
    eventually(
        "the status to show the busy worker in DESIRED",
        Duration::from_secs(10),
        || async { workers(&pools, "long").await == (1, 1, 1) },
    )
    .await;
    // Well past the scale-down delay plus the grace period, the worker still runs it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while tokio::time::Instant::now() < deadline {
        assert_eq!(live_pods(&pods, "long").await, 1, "the busy worker stays");
        assert_eq!(ledger.count("start").len(), 1);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eventually(
        "the ticket to complete",
        Duration::from_secs(30),
        || async { ledger.count("end").len() == 1 },
    )
    .await;
    eventually(
        "the idle worker to go once done",
        Duration::from_secs(30),
        || async { all_pods(&pods, "long").await == 0 },
    )
    .await;
    ledger.assert_each_once(&ids);
    assert_eq!(depth(&conn, &queue).await, 0);
    eventually(
        "the status to show no workers",
        Duration::from_secs(10),
        || async { workers(&pools, "long").await == (0, 0, 0) },
    )
    .await;

    // The namespace's outcome queue goes with its last pool.
    let outcomes = target.outcome_queue();
    assert!(queue_exists(&conn, &outcomes).await);
    pools
        .delete("long", &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        "the outcome queue to be deleted with the pool",
        Duration::from_secs(20),
        || async { !queue_exists(&conn, &outcomes).await },
    )
    .await;

    finish(conn, target, operator, &queue).await;
}

/// Five long tickets among thirty short ones on three workers: each runs once while
/// the pool scales up and down around the long ones; with `restart`, the operator is
/// replaced while the long tickets run.
async fn long_and_short_tickets(on: On, name: &str, restart: bool) {
    let Scenario {
        conn,
        target,
        client,
        ns,
        mut operator,
        queue,
        ledger,
        ids: short,
    } = Scenario::start(on, name, 30).await;
    let (pools, pods) = apis_in(&client, &ns);
    let long: Vec<String> = (0..5).map(|i| format!("{queue}-long-{i}")).collect();
    {
        use lapin::options::BasicPublishOptions;
        let ch = conn.create_channel().await.unwrap();
        for id in &long {
            ch.basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                b"long",
                lapin::BasicProperties::default()
                    .with_message_id(id.as_str().into())
                    .with_delivery_mode(2),
            )
            .await
            .unwrap();
        }
        let _ = ch.close(200, "done".into()).await;
    }
    // Long tickets sleep 8 s, short ones 0.2 s; the grace period is 2 s and the
    // scale-down delay 1 s, so any busy worker removed to shrink the pool would be
    // killed mid-ticket.
    let p = ledger.path.display();
    let command = json!([
        "sh",
        "-c",
        format!(
            "echo \"$TICKET_ID start\" >> {p}; body=$(cat); if [ \"$body\" = long ]; then sleep 8; else sleep 0.2; fi; echo \"$TICKET_ID end\" >> {p}"
        )
    ]);
    let mut pool = wrapped_pool(
        name,
        &target.image,
        &queue,
        command,
        json!({"minWorkers": 0, "maxWorkers": 3, "pollInterval": "300ms", "scaleDownDelay": "1s"}),
    );
    pool.spec.workload.template =
        Some(serde_json::from_value(json!({"terminationGracePeriodSeconds": 2})).unwrap());
    pools.create(&PostParams::default(), &pool).await.unwrap();

    eventually(
        "the short tickets to complete",
        Duration::from_secs(60),
        || async { short.iter().all(|id| ledger.count("end").contains_key(id)) },
    )
    .await;
    if restart {
        eventually("a long ticket to run", Duration::from_secs(60), || async {
            let started = ledger.count("start");
            let ended = ledger.count("end");
            long.iter()
                .any(|id| started.contains_key(id) && !ended.contains_key(id))
        })
        .await;
        operator.abort();
        let _ = operator.await;
        operator = controller::spawn(client.clone(), target.settings());
    }
    let all: Vec<String> = short.iter().chain(&long).cloned().collect();
    eventually(
        "every ticket to complete",
        Duration::from_secs(180),
        || async { ledger.count("end").len() == all.len() },
    )
    .await;
    eventually(
        "the pool to scale to zero",
        Duration::from_secs(30),
        || async { all_pods(&pods, name).await == 0 },
    )
    .await;
    ledger.assert_each_once(&all);
    assert_eq!(depth(&conn, &queue).await, 0);
    pools.delete(name, &DeleteParams::default()).await.unwrap();

    finish(conn, target, operator, &queue).await;
}

async fn long_and_short_tickets_each_run_once_while_the_pool_scales_around_them(on: On) {
    long_and_short_tickets(on, "mixed", false).await;
}

async fn long_tickets_run_once_across_an_operator_restart(on: On) {
    long_and_short_tickets(on, "mixedrestart", true).await;
}

async fn an_operator_restart_mid_run_loses_nothing_and_runs_nothing_twice(on: On) {
    let Scenario {
        conn,
        target,
        client,
        ns,
        mut operator,
        queue,
        ledger,
        ids,
    } = Scenario::start(on, "restart", 30).await;
    let (pools, pods) = apis_in(&client, &ns);
    let pool = wrapped_pool(
        "restart",
        &target.image,
        &queue,
        ledger.command(0.2),
        json!({"minWorkers": 0, "maxWorkers": 3, "pollInterval": "300ms", "scaleDownDelay": "1s"}),
    );
    pools.create(&PostParams::default(), &pool).await.unwrap();

    eventually(
        "a few tickets to complete",
        Duration::from_secs(30),
        || async { ledger.count("end").len() >= 5 },
    )
    .await;
    // The operator goes away mid-run; the workers keep going meanwhile.
    operator.abort();
    let _ = operator.await;
    let done_before = ledger.count("end").len();
    eventually(
        "work to go on without the operator",
        Duration::from_secs(30),
        || async { ledger.count("end").len() > done_before },
    )
    .await;
    operator = controller::spawn(client.clone(), target.settings());

    eventually(
        "every ticket to complete",
        Duration::from_secs(60),
        || async { ledger.count("end").len() == ids.len() },
    )
    .await;
    eventually(
        "the pool to scale to zero",
        Duration::from_secs(30),
        || async { all_pods(&pods, "restart").await == 0 },
    )
    .await;
    ledger.assert_each_once(&ids);
    assert_eq!(depth(&conn, &queue).await, 0);

    finish(conn, target, operator, &queue).await;
}

/// A local stand-in for Alertmanager's v2 API that records what it is sent.
struct Alertmanager {
    url: String,
    posted: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
}

impl Alertmanager {
    async fn start() -> Self {
        let posted = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = posted.clone();
        let app = axum::Router::new().route(
            "/api/v2/alerts",
            axum::routing::post(move |body: axum::body::Bytes| {
                let sink = sink.clone();
                async move {
                    let alerts: serde_json::Value =
                        serde_json::from_slice(&body).unwrap_or_default();
                    sink.lock()
                        .unwrap()
                        .extend(alerts.as_array().cloned().unwrap_or_default());
                    "ok"
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { url, posted }
    }

    fn posted(&self) -> Vec<serde_json::Value> {
        self.posted.lock().unwrap().clone()
    }

    /// True once `name` was sent resolved (with `endsAt`).
    fn resolved(&self, name: &str) -> bool {
        self.posted()
            .iter()
            .any(|a| a["labels"]["alertname"] == name && a.get("endsAt").is_some())
    }

    fn alert_names(&self) -> Vec<String> {
        self.posted()
            .iter()
            .filter_map(|a| a["labels"]["alertname"].as_str().map(str::to_string))
            .collect()
    }
}

async fn diagnosis(
    pools: &Api<TestRunnerPool>,
    name: &str,
) -> Option<testrunner_operator::crd::DiagnosisStatus> {
    pools.get_status(name).await.ok()?.status?.diagnosis
}

async fn event_reasons(client: &kube::Client, ns: &str) -> Vec<String> {
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), ns);
    events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|e| e.reason)
        .collect()
}

async fn a_poison_ticket_is_quarantined_the_good_ones_complete_and_a_new_image_gets_it_back(
    on: On,
) {
    let Scenario {
        conn,
        target,
        client,
        ns,
        operator,
        queue,
        ledger,
        ids,
    } = Scenario::start(on, "poison", 51).await;
    let quarantine = format!("{queue}.quarantine");
    let poison = ids[25].clone();
    let good: Vec<String> = ids.iter().filter(|id| **id != poison).cloned().collect();

    let (pools, pods) = apis_in(&client, &ns);
    // The test command crashes (exit 3) on the poison ticket, but only on image :1.
    let command = json!([
        "sh",
        "-c",
        format!(
            "case \"$TESTRUNNER_IMAGE\" in *:1) [ \"$TICKET_ID\" = \"$POISON\" ] && exit 3;; esac; echo \"$TICKET_ID start\" >> {p}; cat >/dev/null; sleep 0.05; echo \"$TICKET_ID end\" >> {p}",
            p = ledger.path.display()
        )
    ]);
    let mut pool = wrapped_pool(
        "poison",
        "example.org/runner:1",
        &queue,
        command,
        json!({"minWorkers": 0, "maxWorkers": 3, "pollInterval": "300ms", "scaleDownDelay": "2s"}),
    );
    pool.spec.workload.template = Some(
        serde_json::from_value(json!({"env": [{"name": "POISON", "value": poison}]})).unwrap(),
    );
    // This scenario is about quarantine, not canaries: a new image replaces the pods at once.
    pool.spec.rollout.canary_workers = 0;
    pools.create(&PostParams::default(), &pool).await.unwrap();
    // The 50 good tickets complete once each; the poison one lands, once, in quarantine.
    eventually(
        "the good tickets to complete",
        Duration::from_secs(90),
        || async { ledger.count("end").len() == good.len() },
    )
    .await;
    ledger.assert_each_once(&good);
    eventually(
        "the poison ticket to land in quarantine",
        Duration::from_secs(60),
        || async { depth(&conn, &quarantine).await == 1 },
    )
    .await;
    let status = pools.get_status("poison").await.unwrap().status.unwrap();
    let q = status.quarantine.clone().expect("status.quarantine");
    assert_eq!(q.count, 1);
    assert_eq!(q.tickets[0].id, poison);
    assert!(q.tickets[0].crashes >= 3, "{:?}", q.tickets[0]);
    assert!(
        status
            .crashes
            .iter()
            .all(|c| c.ticket.as_deref() == Some(poison.as_str()))
    );
    let reasons = event_reasons(&client, &ns).await;
    for r in ["WorkerCrashed", "PoisonTicket", "PoisonTicketQuarantined"] {
        assert!(
            reasons.iter().any(|x| x == r),
            "no {r} event in {reasons:?}"
        );
    }
    // Capacity is back: nothing left in the work queue, no worker stuck in a crash loop.
    assert_eq!(depth(&conn, &queue).await, 0);
    eventually(
        "the pool to scale back to zero",
        Duration::from_secs(30),
        || async { all_pods(&pods, "poison").await == 0 },
    )
    .await;

    // A new image that completes tickets gets the quarantined ticket back, and runs it.
    // The new image is promoted first (no canary), so the pods that take the new tickets
    // are of the new image whatever the machine's speed.
    patch_spec(&pools, "poison", json!({"image": "example.org/runner:2"})).await;
    rollout_when(&pools, "poison", ":2 to be the stable image", |r| {
        r.stable_image == "example.org/runner:2"
    })
    .await;
    let more = testrunner_operator::publish::publish(&broker_uri(), &queue, 3, false)
        .await
        .unwrap();
    let mut everything = ids.clone();
    everything.extend(more);
    eventually(
        "every ticket, the poison one included, to complete",
        Duration::from_secs(90),
        || async { ledger.count("end").len() == everything.len() },
    )
    .await;
    ledger.assert_each_once(&everything);
    assert_eq!(depth(&conn, &quarantine).await, 0);
    eventually(
        "the quarantine to be empty in status",
        Duration::from_secs(10),
        || async {
            let status = pools.get_status("poison").await.unwrap().status.unwrap();
            status.quarantine.map(|q| q.count).unwrap_or(0) == 0
        },
    )
    .await;
    assert!(
        event_reasons(&client, &ns)
            .await
            .iter()
            .any(|r| r == "TicketsReplayed")
    );

    finish(conn, target, operator, &queue).await;
}

async fn a_broken_image_holds_the_tickets_until_it_is_fixed_then_they_all_complete(on: On) {
    let Scenario {
        conn,
        target,
        client,
        ns,
        operator,
        queue,
        ledger,
        ids,
    } = Scenario::start(on, "broken", 8).await;
    let (pools, pods) = apis_in(&client, &ns);
    let alertmanager = Alertmanager::start().await;
    // The image lacks its test runner: the worker dies before it consumes anything.
    let mut pool = wrapped_pool(
        "broken",
        &target.image,
        &queue,
        json!(["/nonexistent/run-tests"]),
        json!({"minWorkers": 0, "maxWorkers": 4, "pollInterval": "300ms", "scaleDownDelay": "1s"}),
    );
    pool.spec.alerts.alertmanager_url = Some(alertmanager.url.clone());
    pools.create(&PostParams::default(), &pool).await.unwrap();

    eventually(
        "a broken environment to be diagnosed",
        Duration::from_secs(30),
        || async {
            diagnosis(&pools, "broken")
                .await
                .is_some_and(|d| d.verdict == "BrokenEnvironment")
        },
    )
    .await;
    let d = diagnosis(&pools, "broken").await.unwrap();
    assert!(d.message.contains("no ticket in hand"), "{}", d.message);
    assert_eq!(d.ticket, None);
    // Tickets are held, not consumed nor thrown away; the pool shrinks to one worker.
    eventually(
        "the pool to keep one worker",
        Duration::from_secs(30),
        || async { live_pods(&pods, "broken").await == 1 },
    )
    .await;
    assert_eq!(depth(&conn, &queue).await, 8);
    assert!(ledger.lines().is_empty());
    let reasons = event_reasons(&client, &ns).await;
    assert!(
        reasons.iter().any(|r| r == "BrokenEnvironment"),
        "{reasons:?}"
    );
    // The first crash and the verdict reach Alertmanager, labelled with the pool.
    eventually(
        "the alerts to reach Alertmanager",
        Duration::from_secs(20),
        || async {
            let got = alertmanager.alert_names();
            got.contains(&"TestRunnerWorkerCrash".to_string())
                && got.contains(&"TestRunnerBrokenEnvironment".to_string())
        },
    )
    .await;
    assert!(
        alertmanager
            .posted()
            .iter()
            .all(|a| a["labels"]["pool"] == "broken")
    );

    // The fixed image (here: command) is a new revision; the tickets flow on by themselves.
    patch_spec(&pools, "broken", json!({"command": ledger.command(0.1)})).await;
    eventually(
        "every held ticket to complete",
        Duration::from_secs(60),
        || async { ledger.count("end").len() == ids.len() },
    )
    .await;
    ledger.assert_each_once(&ids);
    eventually(
        "the diagnosis to clear",
        Duration::from_secs(30),
        || async {
            diagnosis(&pools, "broken")
                .await
                .is_some_and(|d| d.verdict == "Healthy")
        },
    )
    .await;
    assert!(
        event_reasons(&client, &ns)
            .await
            .iter()
            .any(|r| r == "Recovered")
    );

    finish(conn, target, operator, &queue).await;
}

// Rollouts: a new revision runs as a canary next to the stable workers, under load, and
// is promoted or rolled back by what its tickets do.

const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(60);

/// A pool of image `example.org/runner:1` for rollout scenarios: one to three workers,
/// with `rollout` over the rollout defaults.
fn rollout_pool(
    name: &str,
    queue: &str,
    command: serde_json::Value,
    rollout: serde_json::Value,
) -> TestRunnerPool {
    let mut pool = wrapped_pool(
        name,
        "example.org/runner:1",
        queue,
        command,
        json!({"minWorkers": 1, "maxWorkers": 3, "pollInterval": "300ms", "scaleDownDelay": "1s"}),
    );
    pool.spec.rollout = serde_json::from_value(rollout).unwrap();
    pool
}

fn apis(s: &Scenario) -> (Api<TestRunnerPool>, Api<Pod>) {
    apis_in(&s.client, &s.ns)
}

/// The pool and pod APIs of namespace `ns`.
fn apis_in(client: &kube::Client, ns: &str) -> (Api<TestRunnerPool>, Api<Pod>) {
    (
        Api::namespaced(client.clone(), ns),
        Api::namespaced(client.clone(), ns),
    )
}

async fn patch_spec(pools: &Api<TestRunnerPool>, name: &str, spec: serde_json::Value) {
    pools
        .patch(
            name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&json!({ "spec": spec })),
        )
        .await
        .unwrap();
}

async fn status_of(pools: &Api<TestRunnerPool>, name: &str) -> TestRunnerPoolStatus {
    pools
        .get_status(name)
        .await
        .unwrap()
        .status
        .unwrap_or_default()
}

fn condition<'a>(status: &'a TestRunnerPoolStatus, type_: &str) -> &'a Condition {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {:?}", status.conditions))
}

/// Waits until the pool's `status.rollout` passes `check`, and returns it.
async fn rollout_when(
    pools: &Api<TestRunnerPool>,
    name: &str,
    what: &str,
    check: impl Fn(&RolloutStatus) -> bool,
) -> RolloutStatus {
    let deadline = tokio::time::Instant::now() + ROLLOUT_TIMEOUT;
    loop {
        let rollout = status_of(pools, name).await.rollout;
        if let Some(r) = rollout.as_ref().filter(|r| check(r)) {
            return r.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {ROLLOUT_TIMEOUT:?} waiting for {what}; status.rollout: {rollout:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How many of the pool's pods (terminating ones included) run each revision.
async fn revisions(pods: &Api<Pod>, pool: &str) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for p in pods
        .list(&ListParams::default().labels(&format!("testrunner.dev/pool={pool}")))
        .await
        .unwrap()
        .items
    {
        let revision = p.metadata.labels.unwrap_or_default()["testrunner.dev/revision"].clone();
        *out.entry(revision).or_insert(0) += 1;
    }
    out
}

/// The pool's live pods of `revision`.
async fn pods_of(pods: &Api<Pod>, pool: &str, revision: &str) -> Vec<String> {
    pods.list(&ListParams::default().labels(&format!(
        "testrunner.dev/pool={pool},testrunner.dev/revision={revision}"
    )))
    .await
    .unwrap()
    .items
    .into_iter()
    .filter(|p| p.metadata.deletion_timestamp.is_none())
    .filter_map(|p| p.metadata.name)
    .collect()
}

/// Waits until exactly `n` pods of the pool exist, all of `revision`.
async fn pods_become(pods: &Api<Pod>, pool: &str, n: usize, revision: &str) {
    eventually(
        &format!("{n} pod(s), all of revision {revision}"),
        ROLLOUT_TIMEOUT,
        || async { revisions(pods, pool).await == BTreeMap::from([(revision.to_string(), n)]) },
    )
    .await;
}

/// Creates `pool` and waits until it serves its first revision; from then on, tickets
/// keep waiting in its queue.
async fn serve_under_load(
    s: &Scenario,
    pools: &Api<TestRunnerPool>,
    pool: TestRunnerPool,
) -> (RolloutStatus, Load) {
    let name = pool.metadata.name.clone().unwrap();
    pools.create(&PostParams::default(), &pool).await.unwrap();
    eventually(
        "the pool to complete its first tickets",
        ROLLOUT_TIMEOUT,
        || async { s.ledger.count("end").len() >= 5 },
    )
    .await;
    let first = rollout_when(pools, &name, "the first revision to serve", |r| {
        r.phase == RolloutPhase::Promoted
    })
    .await;
    assert_eq!(first.reason.as_deref(), Some("FirstRevision"));
    (first, Load::start(&s.queue, 6).await)
}

/// Stops the load, then waits for every ticket to complete and the pool to drain back
/// to its one minimum worker, of `revision`. Returns every ticket published.
async fn drain(
    s: &Scenario,
    pods: &Api<Pod>,
    pool: &str,
    load: Load,
    revision: &str,
) -> Vec<String> {
    let mut ids = s.ids.clone();
    ids.extend(load.stop().await);
    eventually(
        "every ticket to complete",
        Duration::from_secs(90),
        || async { s.ledger.count("end").len() == ids.len() },
    )
    .await;
    pods_become(pods, pool, 1, revision).await;
    assert_eq!(
        depth(&s.conn, &s.queue).await,
        0,
        "nothing left in the queue"
    );
    ids
}

/// The last entry of the revision history, as (revision, image, result, reason).
fn last_record(r: &RolloutStatus) -> (&str, &str, &str, &str) {
    let h = r.history.last().expect("a revision history");
    (&h.revision, &h.image, &h.result, &h.reason)
}

async fn assert_nothing_quarantined(s: &Scenario, pools: &Api<TestRunnerPool>, pool: &str) {
    let status = status_of(pools, pool).await;
    assert_eq!(
        status.quarantine.map_or(0, |q| q.count),
        0,
        "no ticket is quarantined"
    );
    assert_eq!(depth(&s.conn, &format!("{}.quarantine", s.queue)).await, 0);
}

async fn assert_events(s: &Scenario, wanted: &[&str]) {
    let reasons = event_reasons(&s.client, &s.ns).await;
    for r in wanted {
        assert!(
            reasons.iter().any(|x| x == r),
            "no {r} event in {reasons:?}"
        );
    }
}

async fn a_canary_crashing_on_its_tickets_is_alerted_and_rolled_back_and_a_fixed_image_is_promoted(
    on: On,
) {
    let s = Scenario::start(on, "seed", 40).await;
    let (pools, pods) = apis(&s);
    let alertmanager = Alertmanager::start().await;
    // The test command crashes (exit 3) on every ticket, but only on image :bad.
    let mut pool = rollout_pool(
        "seed",
        &s.queue,
        s.ledger.command_crashing_on("*:bad", 0.2),
        json!({}),
    );
    pool.spec.alerts.alertmanager_url = Some(alertmanager.url.clone());
    let (first, load) = serve_under_load(&s, &pools, pool).await;
    let stable = first.stable_revision.clone();

    patch_spec(&pools, "seed", json!({"image": "example.org/runner:bad"})).await;
    let failed = rollout_when(&pools, "seed", "the :bad canary to be rolled back", |r| {
        let bad = r.target_image.ends_with(":bad");
        assert!(!bad || r.phase != RolloutPhase::Promoted, "{r:#?}");
        bad && r.phase == RolloutPhase::RolledBack
    })
    .await;
    let bad = failed.target_revision.clone();
    assert_eq!(
        failed.reason.as_deref(),
        Some("CanaryCrashedOnTickets"),
        "{}",
        failed.message
    );
    assert_eq!(failed.stable_revision, stable);
    assert_eq!(
        last_record(&failed),
        (
            bad.as_str(),
            "example.org/runner:bad",
            "RolledBack",
            "CanaryCrashedOnTickets"
        )
    );
    // The crashes are the canary's, on tickets; the diagnosis blames neither the
    // tickets nor the stable workers, so nothing is quarantined.
    let status = status_of(&pools, "seed").await;
    let degraded = condition(&status, "Degraded");
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", "RolloutFailed")
    );
    assert_eq!(status.diagnosis.as_ref().unwrap().verdict, "Healthy");
    let crashed: BTreeSet<&str> = status
        .crashes
        .iter()
        .map(|c| {
            assert_eq!(
                (c.revision.as_str(), c.exit_code),
                (bad.as_str(), 3),
                "{c:?}"
            );
            c.ticket.as_deref().expect("a crash on a ticket")
        })
        .collect();
    assert!(crashed.len() >= 2, "{:?}", status.crashes);
    assert_nothing_quarantined(&s, &pools, "seed").await;
    assert_events(&s, &["RolloutStarted", "WorkerCrashed", "RolloutFailed"]).await;
    eventually(
        "the crash and the failed rollout to reach Alertmanager",
        Duration::from_secs(20),
        || async {
            let got = alertmanager.alert_names();
            got.iter().any(|a| a == "TestRunnerWorkerCrash")
                && got.iter().any(|a| a == "TestRunnerRolloutFailed")
        },
    )
    .await;

    // The canary is gone; the tickets flow on, on the stable image.
    pods_become(&pods, "seed", 3, &stable).await;
    let done = s.ledger.count("end").len();
    eventually(
        "tickets to flow on the stable image",
        ROLLOUT_TIMEOUT,
        || async { s.ledger.count("end").len() >= done + 5 },
    )
    .await;

    // The fixed image passes its canary and replaces every pod.
    patch_spec(&pools, "seed", json!({"image": "example.org/runner:2"})).await;
    let promoted = rollout_when(&pools, "seed", "the fixed image to be promoted", |r| {
        r.target_image.ends_with(":2") && r.phase == RolloutPhase::Promoted
    })
    .await;
    let fixed = promoted.target_revision.clone();
    assert_eq!(promoted.reason.as_deref(), Some("CanaryPassed"));
    assert_eq!(promoted.stable_revision, fixed);
    assert_eq!(
        last_record(&promoted),
        (
            fixed.as_str(),
            "example.org/runner:2",
            "Promoted",
            "CanaryPassed"
        )
    );
    pods_become(&pods, "seed", 3, &fixed).await;
    let status = status_of(&pools, "seed").await;
    assert_eq!(condition(&status, "Degraded").status, "False");
    eventually(
        "the failed rollout's alert to be resolved",
        Duration::from_secs(20),
        || async { alertmanager.resolved("TestRunnerRolloutFailed") },
    )
    .await;

    // Every ticket completed once; only the ones the :bad canary crashed on started again.
    let ids = drain(&s, &pods, "seed", load, &fixed).await;
    let crashed_in_ledger = s.ledger.assert_each_once_but_crashes(&ids);
    assert!(
        crashed.iter().all(|t| crashed_in_ledger.contains(*t)),
        "crashes in status {crashed:?}, in the ledger {crashed_in_ledger:?}"
    );
    assert_nothing_quarantined(&s, &pools, "seed").await;

    finish(s.conn, s.target, s.operator, &s.queue).await;
}

async fn a_canary_crashing_before_its_consume_loop_is_rolled_back_and_the_stable_workers_complete_every_ticket(
    on: On,
) {
    let s = Scenario::start(on, "nocmd", 40).await;
    let (pools, pods) = apis(&s);
    let pool = rollout_pool("nocmd", &s.queue, s.ledger.command(0.2), json!({}));
    let (first, load) = serve_under_load(&s, &pools, pool).await;
    let stable = first.stable_revision.clone();

    // The new image lacks its test runner: the canary's wrapper exits before consuming.
    patch_spec(
        &pools,
        "nocmd",
        json!({"image": "example.org/runner:2", "command": ["/nonexistent/run-tests"]}),
    )
    .await;
    // The stable workers stay healthy throughout: the canary's crashes are its own.
    let healthy = || async {
        let d = diagnosis(&pools, "nocmd").await.unwrap();
        assert_eq!(d.verdict, "Healthy", "{}", d.message);
    };
    eventually("the canary to be rolled back", ROLLOUT_TIMEOUT, || async {
        healthy().await;
        let r = status_of(&pools, "nocmd").await.rollout.unwrap();
        let new = r.target_image.ends_with(":2");
        assert!(!new || r.phase != RolloutPhase::Promoted, "{r:#?}");
        new && r.phase == RolloutPhase::RolledBack
    })
    .await;
    let status = status_of(&pools, "nocmd").await;
    let failed = status.rollout.clone().unwrap();
    assert_eq!(
        failed.reason.as_deref(),
        Some("CanaryCrashedBeforeConsuming"),
        "{}",
        failed.message
    );
    assert_eq!(
        last_record(&failed),
        (
            failed.target_revision.as_str(),
            "example.org/runner:2",
            "RolledBack",
            "CanaryCrashedBeforeConsuming"
        )
    );
    assert!(!status.crashes.is_empty());
    for c in &status.crashes {
        assert_eq!(c.revision, failed.target_revision, "{c:?}");
        assert_eq!((c.ticket.as_deref(), c.exit_code), (None, 71), "{c:?}");
    }
    let degraded = condition(&status, "Degraded");
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", "RolloutFailed")
    );
    assert_events(&s, &["RolloutStarted", "WorkerCrashed", "RolloutFailed"]).await;

    // The spec still names the failed revision; the pool serves on the stable one.
    eventually("the canary to go", ROLLOUT_TIMEOUT, || async {
        healthy().await;
        revisions(&pods, "nocmd").await == BTreeMap::from([(stable.clone(), 3)])
    })
    .await;
    let ids = drain(&s, &pods, "nocmd", load, &stable).await;
    s.ledger.assert_each_once(&ids);
    healthy().await;
    assert_nothing_quarantined(&s, &pools, "nocmd").await;
    assert!(
        !event_reasons(&s.client, &s.ns)
            .await
            .iter()
            .any(|r| r == "BrokenEnvironment")
    );

    finish(s.conn, s.target, s.operator, &s.queue).await;
}

async fn a_good_upgrade_under_load_is_promoted_and_replaces_every_pod_without_interrupting_a_ticket(
    on: On,
) {
    let s = Scenario::start(on, "upgrade", 40).await;
    let (pools, pods) = apis(&s);
    let pool = rollout_pool("upgrade", &s.queue, s.ledger.command(0.2), json!({}));
    let (first, load) = serve_under_load(&s, &pools, pool).await;

    patch_spec(&pools, "upgrade", json!({"image": "example.org/runner:2"})).await;
    let promoted = rollout_when(&pools, "upgrade", ":2 to be promoted", |r| {
        r.target_image.ends_with(":2") && r.phase == RolloutPhase::Promoted
    })
    .await;
    let new = promoted.target_revision.clone();
    assert_eq!(promoted.reason.as_deref(), Some("CanaryPassed"));
    assert!(promoted.canary_tickets_ok >= 3, "{promoted:?}");
    assert_eq!(promoted.canary_crashes, 0);
    let history: Vec<_> = promoted
        .history
        .iter()
        .map(|h| (h.revision.as_str(), h.result.as_str(), h.reason.as_str()))
        .collect();
    assert_eq!(
        history,
        [
            (first.stable_revision.as_str(), "Promoted", "FirstRevision"),
            (new.as_str(), "Promoted", "CanaryPassed")
        ]
    );
    pods_become(&pods, "upgrade", 3, &new).await;
    eventually(
        "the rollout to be complete in status",
        Duration::from_secs(10),
        || async {
            condition(&status_of(&pools, "upgrade").await, "RolloutComplete").status == "True"
        },
    )
    .await;
    let status = status_of(&pools, "upgrade").await;
    assert!(status.crashes.is_empty(), "{:?}", status.crashes);
    assert_events(&s, &["RolloutStarted", "RolloutPromoted"]).await;

    // Old pods drained their tickets before they went: nothing ran twice.
    let ids = drain(&s, &pods, "upgrade", load, &new).await;
    s.ledger.assert_each_once(&ids);

    // Each revision is a ControllerRevision owned by the pool; the promoted one is
    // marked stable.
    let stored = controller_revisions(&s.client, &s.ns, "upgrade").await;
    assert_eq!(
        stored,
        [
            (
                first.stable_revision.clone(),
                false,
                "example.org/runner:1".into()
            ),
            (new.clone(), true, "example.org/runner:2".into()),
        ]
    );
    let mut s = s;
    a_lost_status_is_rebuilt_and_an_older_status_migrates_without_a_restart(
        &mut s, "upgrade", &new,
    )
    .await;

    finish(s.conn, s.target, s.operator, &s.queue).await;
}

/// The pool's ControllerRevisions as (revision, marked stable, image), oldest first.
async fn controller_revisions(
    client: &kube::Client,
    ns: &str,
    pool: &str,
) -> Vec<(String, bool, String)> {
    let api: Api<ControllerRevision> = Api::namespaced(client.clone(), ns);
    let mut list = api
        .list(&ListParams::default().labels(&format!("testrunner.dev/pool={pool}")))
        .await
        .unwrap()
        .items;
    list.sort_by_key(|r| r.revision);
    list.into_iter()
        .map(|r| {
            let labels = r.metadata.labels.unwrap_or_default();
            let revision = labels["testrunner.dev/revision"].clone();
            assert_eq!(
                r.metadata.name.as_deref(),
                Some(format!("{pool}-{revision}").as_str())
            );
            let owner = &r.metadata.owner_references.expect("an owner")[0];
            assert_eq!(
                (owner.kind.as_str(), owner.name.as_str(), owner.controller),
                ("TestRunnerPool", pool, Some(true))
            );
            let image = r.data.expect("data").0["image"]
                .as_str()
                .unwrap()
                .to_string();
            (
                revision,
                labels
                    .get("testrunner.dev/stable")
                    .is_some_and(|v| v == "true"),
                image,
            )
        })
        .collect()
}

/// Pool `name`, serving `stable` on one pod: its status is wiped (a backup restored
/// without it, another client's write) and rebuilt from the ControllerRevisions; then
/// it is put back as an older operator left it (the stable workload in the status, no
/// ControllerRevision) and a new operator migrates it. No pod is replaced on the way.
async fn a_lost_status_is_rebuilt_and_an_older_status_migrates_without_a_restart(
    s: &mut Scenario,
    name: &str,
    stable: &str,
) {
    let (pools, pods) = apis(s);
    let serving = pods_of(&pods, name, stable).await;
    // Every field of the status set to null: what is left is an empty status.
    let current = serde_json::to_value(status_of(&pools, name).await).unwrap();
    let wiped: serde_json::Map<String, serde_json::Value> = current
        .as_object()
        .unwrap()
        .keys()
        .map(|k| (k.clone(), serde_json::Value::Null))
        .collect();
    pools
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(&json!({ "status": wiped })),
        )
        .await
        .unwrap();
    let restored = rollout_when(&pools, name, "the status to be rebuilt", |r| {
        r.reason.as_deref() == Some("Restored")
    })
    .await;
    assert_eq!(restored.stable_revision, stable);
    assert_eq!(restored.phase, RolloutPhase::Promoted);

    // As an older operator left the pool: its status keeps the stable workload, and no
    // ControllerRevision exists.
    s.operator.abort();
    let _ = (&mut s.operator).await;
    let revisions: Api<ControllerRevision> = Api::namespaced(s.client.clone(), &s.ns);
    for r in revisions
        .list(&ListParams::default().labels(&format!("testrunner.dev/pool={name}")))
        .await
        .unwrap()
        .items
    {
        let gone = r.metadata.name.unwrap();
        revisions
            .delete(&gone, &DeleteParams::default())
            .await
            .unwrap();
    }
    let pool = pools.get(name).await.unwrap();
    let mut old = pool.status.clone().unwrap();
    old.rollout.as_mut().unwrap().stable = Some(pool.spec.workload.clone());
    pools
        .patch_status(
            name,
            &PatchParams::apply("testrunner-operator").force(),
            &Patch::Apply(&json!({
                "apiVersion": "testrunner.dev/v1alpha1",
                "kind": "TestRunnerPool",
                "status": old,
            })),
        )
        .await
        .unwrap();
    assert!(
        status_of(&pools, name)
            .await
            .rollout
            .unwrap()
            .stable
            .is_some()
    );
    s.operator = controller::spawn(s.client.clone(), s.target.settings());
    eventually(
        "the stable revision to be stored again",
        ROLLOUT_TIMEOUT,
        || async {
            controller_revisions(&s.client, &s.ns, name).await
                == [(stable.to_string(), true, "example.org/runner:2".to_string())]
        },
    )
    .await;
    rollout_when(
        &pools,
        name,
        "the older status's snapshot to be dropped",
        |r| r.stable.is_none(),
    )
    .await;
    assert_eq!(
        pods_of(&pods, name, stable).await,
        serving,
        "no pod was replaced"
    );
}

async fn a_newer_image_supersedes_a_rollout_in_progress_and_is_promoted_in_its_place(on: On) {
    let s = Scenario::start(on, "supersede", 40).await;
    let (pools, pods) = apis(&s);
    // :2's canary cannot pass its gate in this scenario's time.
    let pool = rollout_pool(
        "supersede",
        &s.queue,
        s.ledger.command(0.2),
        json!({"promoteAfterTickets": 100}),
    );
    let (first, load) = serve_under_load(&s, &pools, pool).await;

    patch_spec(
        &pools,
        "supersede",
        json!({"image": "example.org/runner:2"}),
    )
    .await;
    let running = rollout_when(
        &pools,
        "supersede",
        ":2's canary to complete a ticket",
        |r| {
            r.target_image.ends_with(":2")
                && r.phase == RolloutPhase::Progressing
                && r.canary_tickets_ok >= 1
        },
    )
    .await;
    let superseded = running.target_revision.clone();

    patch_spec(
        &pools,
        "supersede",
        json!({"image": "example.org/runner:3", "rollout": {"promoteAfterTickets": 3}}),
    )
    .await;
    let promoted = rollout_when(&pools, "supersede", ":3 to be promoted", |r| {
        r.target_image.ends_with(":3") && r.phase == RolloutPhase::Promoted
    })
    .await;
    let new = promoted.target_revision.clone();
    assert_eq!(promoted.reason.as_deref(), Some("CanaryPassed"));
    let history: Vec<_> = promoted
        .history
        .iter()
        .map(|h| {
            (
                h.revision.as_str(),
                h.image.as_str(),
                h.result.as_str(),
                h.reason.as_str(),
            )
        })
        .collect();
    assert_eq!(
        history,
        [
            (
                first.stable_revision.as_str(),
                "example.org/runner:1",
                "Promoted",
                "FirstRevision"
            ),
            (
                superseded.as_str(),
                "example.org/runner:2",
                "Superseded",
                "Superseded"
            ),
            (
                new.as_str(),
                "example.org/runner:3",
                "Promoted",
                "CanaryPassed"
            ),
        ]
    );
    assert_events(&s, &["RolloutSuperseded", "RolloutPromoted"]).await;
    // No pod of :2 is left (not even a terminating one); every pod runs :3.
    pods_become(&pods, "supersede", 3, &new).await;

    let ids = drain(&s, &pods, "supersede", load, &new).await;
    s.ledger.assert_each_once(&ids);

    finish(s.conn, s.target, s.operator, &s.queue).await;
}

async fn an_operator_restart_mid_rollout_resumes_the_canary_and_promotes_it(on: On) {
    let mut s = Scenario::start(on, "resume", 40).await;
    let (pools, pods) = apis(&s);
    let pool = rollout_pool(
        "resume",
        &s.queue,
        s.ledger.command(0.2),
        json!({"promoteAfterTickets": 10}),
    );
    let (_, load) = serve_under_load(&s, &pools, pool).await;

    patch_spec(&pools, "resume", json!({"image": "example.org/runner:2"})).await;
    let before = rollout_when(
        &pools,
        "resume",
        "the canary to complete two tickets",
        |r| {
            r.target_image.ends_with(":2")
                && r.phase == RolloutPhase::Progressing
                && r.canary_tickets_ok >= 2
        },
    )
    .await;
    let canary = pods_of(&pods, "resume", &before.target_revision).await;
    assert_eq!(canary.len(), 1, "one canary pod: {canary:?}");

    // The operator goes away mid-rollout; the workers, canary included, keep going.
    s.operator.abort();
    let _ = (&mut s.operator).await;
    let done = s.ledger.count("end").len();
    eventually(
        "work to go on without the operator",
        ROLLOUT_TIMEOUT,
        || async { s.ledger.count("end").len() >= done + 5 },
    )
    .await;
    s.operator = controller::spawn(s.client.clone(), s.target.settings());

    // The new operator goes on with the same rollout, counting on from status.
    let promoted = rollout_when(&pools, "resume", ":2 to be promoted", |r| {
        assert_eq!(
            (&r.target_revision, &r.started_at),
            (&before.target_revision, &before.started_at),
            "the same rollout goes on"
        );
        assert!(
            r.canary_tickets_ok >= before.canary_tickets_ok,
            "the canary count goes on: {} after {}",
            r.canary_tickets_ok,
            before.canary_tickets_ok
        );
        r.phase == RolloutPhase::Promoted
    })
    .await;
    assert_eq!(promoted.reason.as_deref(), Some("CanaryPassed"));
    assert!(promoted.canary_tickets_ok >= 10, "{promoted:?}");
    let started = event_reasons(&s.client, &s.ns)
        .await
        .into_iter()
        .filter(|r| r == "RolloutStarted")
        .count();
    assert_eq!(started, 1, "the rollout was not started again");
    assert!(
        pods_of(&pods, "resume", &before.target_revision)
            .await
            .contains(&canary[0]),
        "the canary pod was kept, not replaced"
    );
    // As after a real restart, only the running operator reads the workers' reports.
    assert_eq!(
        consumers(&s.conn, &s.target.outcome_queue()).await,
        1,
        "one reader of the outcome reports"
    );
    pods_become(&pods, "resume", 3, &promoted.stable_revision).await;

    let ids = drain(&s, &pods, "resume", load, &promoted.stable_revision).await;
    s.ledger.assert_each_once(&ids);

    finish(s.conn, s.target, s.operator, &s.queue).await;
}

/// Pools of one namespace on one broker: three pools, one long ticket each on a queue
/// of its own, ending at different times. Their workers report on the one outcome queue
/// of the namespace, and each report reaches its pool: each pool counts its worker busy
/// and keeps it past the scale-down delay and the grace period, and removes it once it
/// reports idle. The broker holds one outcome queue with one consumer for all three,
/// and no queue of a pool's own; the queue goes with the last pool.
async fn pools_of_a_namespace_share_one_outcome_queue_and_each_keeps_its_busy_worker(on: On) {
    let Scenario {
        conn,
        target,
        client,
        ns,
        operator,
        queue,
        ledger,
        ..
    } = Scenario::start(on, "shared", 0).await;
    let (pools, pods) = apis_in(&client, &ns);
    let mut names = Vec::new();
    let mut ids = Vec::new();
    for i in 0..3u32 {
        // Each pool is named after its queue: both are the scenario's own.
        let name = format!("{queue}-{i}");
        ids.extend(publish_to_test_queue(&conn, &name, 1).await);
        let mut pool = wrapped_pool(
            &name,
            &target.image,
            &name,
            ledger.command(20.0 + 5.0 * f64::from(i)),
            json!({"minWorkers": 0, "maxWorkers": 2, "pollInterval": "500ms", "scaleDownDelay": "2s"}),
        );
        pool.spec.workload.template =
            Some(serde_json::from_value(json!({"terminationGracePeriodSeconds": 4})).unwrap());
        pools.create(&PostParams::default(), &pool).await.unwrap();
        names.push(name);
    }

    eventually("every ticket to start", Duration::from_secs(40), || async {
        ledger.count("start").len() == 3
    })
    .await;
    // Busy counts only what a worker's own report says: each report reached its pool.
    for name in &names {
        eventually(
            &format!("pool {name} to show its worker busy"),
            Duration::from_secs(10),
            || async { workers(&pools, name).await == (1, 1, 1) },
        )
        .await;
    }
    // What the pools cost the broker: one outcome queue, read by one consumer.
    let outcomes = target.outcome_queue();
    assert_eq!(
        consumers(&conn, &outcomes).await,
        1,
        "one reader for three pools"
    );
    for name in &names {
        let own = format!("testrunner.outcomes.{ns}.{name}");
        assert!(
            !queue_exists(&conn, &own).await,
            "no queue of a pool's own: {own}"
        );
    }
    // Past the scale-down delay plus the grace period, every busy worker stays until
    // its ticket is done.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    while tokio::time::Instant::now() < deadline {
        for (name, id) in names.iter().zip(&ids) {
            let live = live_pods(&pods, name).await;
            if !ledger.count("end").contains_key(id) {
                assert_eq!(live, 1, "the busy worker of {name} stays");
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Each pool removes its worker once that worker reported idle, and only then.
    for name in &names {
        eventually(
            &format!("the worker of {name} to go once done"),
            Duration::from_secs(60),
            || async { all_pods(&pods, name).await == 0 },
        )
        .await;
    }
    ledger.assert_each_once(&ids);

    // The namespace's queue stays while a pool uses it, and goes with the last one.
    for name in &names[..2] {
        pools.delete(name, &DeleteParams::default()).await.unwrap();
    }
    eventually(
        "the deleted pools to be swept",
        Duration::from_secs(20),
        || async {
            pools
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .len()
                == 1
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        consumers(&conn, &outcomes).await,
        1,
        "the last pool still reads it"
    );
    pools
        .delete(&names[2], &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        "the outcome queue to be deleted with the last pool",
        Duration::from_secs(20),
        || async { !queue_exists(&conn, &outcomes).await },
    )
    .await;

    for name in &names {
        delete_queue(&conn, name).await;
        delete_queue(&conn, &format!("{name}.quarantine")).await;
    }
    finish(conn, target, operator, &queue).await;
}

/// An operator upgrade: a worker pod started by an older operator reports on its pool's
/// own queue (`testrunner.outcomes.<namespace>.<pool>`) and does not name its pool. The
/// new operator reads that queue while such a pod is there, so it knows the worker is
/// busy with a long ticket and keeps it, removes it once it reports idle, and then
/// deletes the queue nobody reports to any more.
async fn a_worker_of_an_older_operator_is_still_heard_on_its_pool_s_own_queue(on: On) {
    let conn = broker().await;
    let target = Target::new(on).await;
    assert!(
        target.sim.is_some(),
        "the ticket ledger is a local file: the simulated cluster only"
    );
    let client = target.client.clone();
    let ns = target.namespace.clone();
    let (pools, pods) = apis_in(&client, &ns);
    let queue = queue_name("legacy");
    let ledger = Ledger::new("legacy");
    let ids = publish_to_test_queue(&conn, &queue, 1).await;
    let name = queue.clone();
    let mut pool = wrapped_pool(
        &name,
        &target.image,
        &queue,
        ledger.command(20.0),
        json!({"minWorkers": 0, "maxWorkers": 2, "pollInterval": "500ms", "scaleDownDelay": "2s"}),
    );
    pool.spec.workload.template =
        Some(serde_json::from_value(json!({"terminationGracePeriodSeconds": 4})).unwrap());
    let pool = pools.create(&PostParams::default(), &pool).await.unwrap();

    // What the older operator left: the queue it declared, and a pod reporting there
    // without naming its pool.
    let own = format!("testrunner.outcomes.{ns}.{name}");
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        own.as_str().into(),
        Default::default(),
        testrunner_operator::broker::outcome_queue_arguments(),
    )
    .await
    .unwrap();
    let settings = target.settings().pods;
    let revision = testrunner_operator::core::revision(&pool.spec);
    let mut old = serde_json::to_value(testrunner_operator::pods::build_pod(
        &pool,
        &format!("{name}-bcdfg"),
        &revision,
        &settings,
    ))
    .unwrap();
    for list in ["initContainers", "containers"] {
        for c in old["spec"][list].as_array_mut().unwrap() {
            if let Some(env) = c["env"].as_array_mut() {
                env.retain(|e| {
                    e["name"] != "TESTRUNNER_POOL" && e["name"] != "TESTRUNNER_POOL_UID"
                });
                for e in env {
                    if e["name"] == "TESTRUNNER_OUTCOMES_QUEUE" {
                        e["value"] = json!(own);
                    }
                }
            }
        }
    }
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(old).unwrap(),
    )
    .await
    .unwrap();
    eventually(
        "the old worker to take the ticket",
        Duration::from_secs(30),
        || async { ledger.count("start").len() == 1 },
    )
    .await;

    // The new operator.
    let operator = controller::spawn(client.clone(), target.settings());
    eventually(
        "the status to show the old worker busy",
        Duration::from_secs(15),
        || async { workers(&pools, &name).await == (1, 1, 1) },
    )
    .await;
    assert_eq!(
        consumers(&conn, &own).await,
        1,
        "the pool's own queue is read"
    );
    assert_eq!(consumers(&conn, &target.outcome_queue()).await, 1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(6);
    while tokio::time::Instant::now() < deadline {
        let live = live_pods(&pods, &name).await;
        if ledger.count("end").is_empty() {
            assert_eq!(live, 1, "the busy old worker stays");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eventually(
        "the old worker to go once it reported idle",
        Duration::from_secs(40),
        || async { all_pods(&pods, &name).await == 0 },
    )
    .await;
    ledger.assert_each_once(&ids);
    eventually(
        "the pool's own queue to be deleted once no pod reports there",
        Duration::from_secs(20),
        || async { !queue_exists(&conn, &own).await },
    )
    .await;

    delete_queue(&conn, &own).await;
    finish(conn, target, operator, &queue).await;
}

/// After a quarantine and a rollout, `kubectl testrunner describe` (the binary installed
/// as a kubectl plugin) fits one screen and says each thing once; `kubectl describe`
/// shows the spec as written, without the sections the pool left out.
async fn an_on_call_describe_after_a_quarantine_and_a_rollout_fits_one_screen(on: On) {
    let Scenario {
        conn,
        target,
        client,
        ns,
        operator,
        queue,
        ledger,
        ids,
    } = Scenario::start(on, "oncall", 10).await;
    let quarantine = format!("{queue}.quarantine");
    let poison = ids[4].clone();
    let good: Vec<String> = ids.iter().filter(|id| **id != poison).cloned().collect();
    let (dir, kubeconfig) = fresh_dir(&format!("oncall-{on:?}"));
    target
        .sim
        .as_ref()
        .expect("the scenario runs on the simulated cluster")
        .write_kubeconfig(&kubeconfig)
        .unwrap();
    // kubectl finds plugins on PATH by name: the operator's binary as kubectl-testrunner.
    let plugins = dir.join("bin");
    std::fs::create_dir_all(&plugins).unwrap();
    std::os::unix::fs::symlink(
        env!("CARGO_BIN_EXE_testrunner-operator"),
        plugins.join("kubectl-testrunner"),
    )
    .unwrap();
    let kubectl = kubectl();
    let path = format!(
        "{}:{}:{}",
        plugins.display(),
        kubectl.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let run = async |args: &[&str], stdin: Option<&str>| -> String {
        use tokio::io::AsyncWriteExt;
        let mut child = tokio::process::Command::new(&kubectl)
            .args(args)
            .args(["-n", &ns])
            .env("KUBECONFIG", &kubeconfig)
            .env("PATH", &path)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        input
            .write_all(stdin.unwrap_or_default().as_bytes())
            .await
            .unwrap();
        drop(input);
        let out = child.wait_with_output().await.unwrap();
        let said = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "kubectl {args:?}: {said}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        said
    };

    // The pool as a user writes it: no rollout, alerts or worker section.
    let pool = format!(
        r#"apiVersion: testrunner.dev/v1alpha1
kind: TestRunnerPool
metadata:
  name: oncall
spec:
  image: example.org/runner:1
  command: ["sh", "-c", "[ \"$TICKET_ID\" = \"$POISON\" ] && exit 3; echo \"$TICKET_ID start\" >> {ledger}; cat >/dev/null; echo \"$TICKET_ID end\" >> {ledger}"]
  template:
    env: [{{name: POISON, value: "{poison}"}}]
  queue:
    name: {queue}
    connectionSecretRef: {{name: rabbitmq}}
  scaling: {{maxWorkers: 3, pollInterval: 300ms, scaleDownDelay: 2s}}
  poison: {{replayOnImageChange: false}}
"#,
        ledger = ledger.path.display()
    );
    run(&["apply", "-f", "-"], Some(&pool)).await;
    let (pools, pods) = apis_in(&client, &ns);
    eventually(
        "the good tickets to complete",
        Duration::from_secs(90),
        || async { ledger.count("end").len() == good.len() },
    )
    .await;
    ledger.assert_each_once(&good);
    eventually(
        "the poison ticket to land in quarantine",
        Duration::from_secs(60),
        || async { depth(&conn, &quarantine).await == 1 },
    )
    .await;
    // A rollout, promoted by hand while the queue is empty.
    run(
        &[
            "patch",
            "trp",
            "oncall",
            "--type",
            "merge",
            "-p",
            r#"{"metadata":{"annotations":{"testrunner.dev/promote":"now"}},"spec":{"image":"example.org/runner:2"}}"#,
        ],
        None,
    )
    .await;
    rollout_when(&pools, "oncall", ":2 to be promoted", |r| {
        r.stable_image == "example.org/runner:2" && r.phase == RolloutPhase::Promoted
    })
    .await;
    eventually(
        "the pool to scale to zero",
        Duration::from_secs(60),
        || async { all_pods(&pods, "oncall").await == 0 },
    )
    .await;
    let status = status_of(&pools, "oncall").await;
    assert_eq!(status.quarantine.as_ref().map(|q| q.count), Some(1));

    let screen = run(&["testrunner", "describe", "oncall"], None).await;
    let lines: Vec<&str> = screen.lines().collect();
    eprintln!("kubectl testrunner describe oncall:\n{screen}");
    assert!(
        lines.len() <= testrunner_operator::describe::MAX_LINES,
        "{} lines",
        lines.len()
    );
    let has = |needle: &str| lines.iter().any(|l| l.contains(needle));
    assert!(has(&format!("Pool:        {ns}/oncall")), "{screen}");
    assert!(has("Image:       example.org/runner:2"), "{screen}");
    assert!(
        has(&format!("Quarantine:  1 ticket(s) in {quarantine}")),
        "{screen}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&poison) && l.contains("crashes") && l.contains("exit code 3")),
        "the quarantined ticket with its evidence: {screen}"
    );
    assert!(
        has("Rollout:     Promoted (PromotedByAnnotation)"),
        "{screen}"
    );
    let history = lines
        .iter()
        .position(|l| l.starts_with("  History:"))
        .expect("history");
    assert!(
        lines[history + 1].contains("example.org/runner:1"),
        "{screen}"
    );
    assert!(
        lines[history + 2].contains("example.org/runner:2"),
        "{screen}"
    );
    let crashes = lines
        .iter()
        .filter(|l| l.contains("exit 3") && l.contains(&format!("ticket {poison}")))
        .count();
    assert!(crashes >= 3, "the crashes, each with its ticket: {screen}");
    for reason in [
        "PoisonTicketQuarantined",
        "RolloutPromoted",
        "WorkerCrashed",
    ] {
        assert!(
            lines
                .iter()
                .skip_while(|l| !l.starts_with("Events:"))
                .any(|l| l.contains(reason)),
            "event {reason}: {screen}"
        );
    }
    // Each message of the status is said at most once.
    let mut messages: Vec<&str> = status
        .conditions
        .iter()
        .map(|c| c.message.as_str())
        .collect();
    messages.extend(status.diagnosis.as_ref().map(|d| d.message.as_str()));
    messages.extend(status.rollout.as_ref().map(|r| r.message.as_str()));
    for m in messages.into_iter().filter(|m| !m.is_empty()) {
        assert!(
            screen.matches(m).count() <= 1,
            "said twice: {m:?}\n{screen}"
        );
    }

    // kubectl's own describe shows the spec as written: sections left out stay out.
    let described = run(&["describe", "trp", "oncall"], None).await;
    let spec: Vec<&str> = described
        .lines()
        .skip_while(|l| *l != "Spec:")
        .take_while(|l| *l != "Status:")
        .collect();
    assert!(
        spec.iter().any(|l| l.contains("Max Workers:")),
        "{described}"
    );
    for left_out in [
        "Promote After Tickets",
        "Canary Workers",
        "Alerts:",
        "Mode:",
    ] {
        assert!(
            !spec.iter().any(|l| l.contains(left_out)),
            "{left_out} was not written: {described}"
        );
    }
    // Inside a written section the server fills in the defaults.
    assert!(
        spec.iter().any(|l| l.contains("Crashes To Quarantine:")),
        "{described}"
    );
    eprintln!(
        "kubectl describe trp oncall: {} lines\n{described}",
        described.lines().count()
    );

    delete_queue(&conn, &quarantine).await;
    finish(conn, target, operator, &queue).await;
    let _ = std::fs::remove_dir_all(&dir);
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
    a_queue_surge_scales_up_an_operator_restart_takes_over_and_deleting_the_pool_removes_its_pods,
    tickets_flow_through_wrapped_workers_and_the_pool_drains_back_to_min,
    a_long_ticket_runs_once_while_the_empty_queue_would_scale_the_pool_to_zero,
    long_and_short_tickets_each_run_once_while_the_pool_scales_around_them,
    long_tickets_run_once_across_an_operator_restart,
    an_operator_restart_mid_run_loses_nothing_and_runs_nothing_twice,
    a_poison_ticket_is_quarantined_the_good_ones_complete_and_a_new_image_gets_it_back,
    a_broken_image_holds_the_tickets_until_it_is_fixed_then_they_all_complete,
    a_canary_crashing_on_its_tickets_is_alerted_and_rolled_back_and_a_fixed_image_is_promoted,
    a_canary_crashing_before_its_consume_loop_is_rolled_back_and_the_stable_workers_complete_every_ticket,
    a_good_upgrade_under_load_is_promoted_and_replaces_every_pod_without_interrupting_a_ticket,
    a_newer_image_supersedes_a_rollout_in_progress_and_is_promoted_in_its_place,
    an_operator_restart_mid_rollout_resumes_the_canary_and_promotes_it,
    pools_of_a_namespace_share_one_outcome_queue_and_each_keeps_its_busy_worker,
    a_worker_of_an_older_operator_is_still_heard_on_its_pool_s_own_queue,
    an_on_call_describe_after_a_quarantine_and_a_rollout_fits_one_screen,
);

/// Processes whose command line mentions `needle` (the control plane's components name
/// their work directory in their flags).
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = entry.file_name().to_string_lossy().to_string();
        if !pid.chars().all(|c| c.is_ascii_digit()) || !process_alive(&pid) {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(needle) {
            found.push(pid);
        }
    }
    found
}

/// The README's walk-through on a real control plane: `simulate --control-plane`
/// serves kubectl (`/livez?verbose` lists etcd, `kubectl create secret generic` works),
/// a pool applied with kubectl gets pods the scheduler binds to the simulated node,
/// deleting the pool has the controller manager's garbage collector delete them, and
/// Ctrl-C stops every process it started and removes its files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real control plane: bash tests/control-plane/build.sh, then cargo test -- --include-ignored (bash tests/run.sh does both)"]
async fn the_simulate_command_on_a_real_control_plane_serves_the_walk_through_and_ctrl_c_leaves_nothing()
 {
    let dir = std::env::temp_dir().join(format!("sim-cp-command-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_testrunner-operator"))
        .arg("simulate")
        .arg("--control-plane")
        .arg(control_plane_bin())
        .args(["--time-scale", "20"])
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .env("RUST_LOG", "warn")
        .env("TESTRUNNER_AMQP_URI", broker_uri())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let sim_pid = child.id().expect("simulate runs");
    let work = format!("testrunner-cp-{sim_pid}-");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    let client = loop {
        if let Ok(kc) = kube::config::Kubeconfig::read_from(&kubeconfig)
            && let Ok(config) = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await
            && let Ok(client) = kube::Client::try_from(config)
            && client.apiserver_version().await.is_ok()
        {
            break client;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "simulate --control-plane did not come up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        !processes_mentioning(&work).is_empty(),
        "the control plane's processes name their work directory"
    );
    let kubectl = |args: Vec<String>, stdin: Option<String>| {
        let kubeconfig = kubeconfig.clone();
        let home = dir.join("home");
        async move {
            let mut cmd = tokio::process::Command::new(common::kubectl());
            cmd.args(&args)
                .env("KUBECONFIG", &kubeconfig)
                .env("HOME", &home)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
            let mut c = cmd
                .spawn()
                .expect("kubectl runs (bash .ci/install-tools installs it)");
            if let Some(text) = stdin {
                use tokio::io::AsyncWriteExt;
                c.stdin
                    .take()
                    .unwrap()
                    .write_all(text.as_bytes())
                    .await
                    .unwrap();
            }
            let out = c.wait_with_output().await.unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(out.status.success(), "kubectl {args:?}: {text}");
            text
        }
    };
    let livez = kubectl(
        vec!["get".into(), "--raw".into(), "/livez?verbose".into()],
        None,
    )
    .await;
    assert!(livez.contains("[+]etcd ok"), "{livez}");
    // The README's own step (a protobuf body on the wire), then the pool uses it.
    kubectl(
        vec![
            "create".into(),
            "secret".into(),
            "generic".into(),
            "broker".into(),
            format!("--from-literal=uri={}", broker_uri()),
        ],
        None,
    )
    .await;
    let conn = broker().await;
    let queue = queue_name("cpcommand");
    test_queue(&conn, &queue).await;
    let pool = format!(
        "apiVersion: testrunner.dev/v1alpha1
kind: TestRunnerPool
metadata:
  name: walk
spec:
  image: example.org/test-runner:1
  command: [\"sh\", \"-c\", \"cat >/dev/null; sleep 1\"]
  queue:
    name: {queue}
    connectionSecretRef: {{name: broker, key: uri}}
  scaling: {{minWorkers: 2, maxWorkers: 3, pollInterval: 1s}}
"
    );
    kubectl(vec!["apply".into(), "-f".into(), "-".into()], Some(pool)).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    eventually(
        "two running pods on the simulated node",
        Duration::from_secs(120),
        || {
            let pods = pods.clone();
            async move {
                let list = pods.list(&ListParams::default()).await.unwrap().items;
                list.iter()
                    .filter(|p| {
                        p.spec.as_ref().and_then(|s| s.node_name.as_deref())
                            == Some("simulated-node")
                            && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                    })
                    .count()
                    == 2
            }
        },
    )
    .await;
    // The scheduler bound them (a Scheduled event from default-scheduler).
    let events = kubectl(
        vec![
            "get".into(),
            "events".into(),
            "--field-selector".into(),
            "reason=Scheduled".into(),
        ],
        None,
    )
    .await;
    assert!(
        events.contains("Successfully assigned default/walk-"),
        "{events}"
    );
    kubectl(
        vec![
            "delete".into(),
            "trp".into(),
            "walk".into(),
            "--wait=false".into(),
        ],
        None,
    )
    .await;
    eventually(
        "the garbage collector deletes the pool's pods",
        Duration::from_secs(120),
        || {
            let pods = pods.clone();
            async move {
                pods.list(&ListParams::default())
                    .await
                    .unwrap()
                    .items
                    .is_empty()
            }
        },
    )
    .await;

    let out = interrupt(&mut child, Duration::from_secs(90)).await;
    assert!(
        out.contains("Simulated cluster at https://127.0.0.1:"),
        "{out}"
    );
    assert!(
        out.contains(
            "a real control plane: etcd, kube-apiserver, kube-controller-manager, kube-scheduler"
        ),
        "{out}"
    );
    assert!(
        !out.contains("guest:guest"),
        "the broker URI is never printed: {out}"
    );
    let gone_by = tokio::time::Instant::now() + Duration::from_secs(5);
    while !processes_mentioning(&work).is_empty() && tokio::time::Instant::now() < gone_by {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        processes_mentioning(&work),
        Vec::<String>::new(),
        "no control-plane process is left"
    );
    let left: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&work))
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "simulate removed its files: {left:?}");
    delete_queue(&conn, &queue).await;
    delete_queue(&conn, "testrunner.outcomes.default").await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// What envtest ships, etcd and kube-apiserver alone: the node binds pods itself,
/// pods get the service account the controller manager would have made, and the
/// simulation says which controllers are missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real control plane: bash tests/control-plane/build.sh, then cargo test -- --include-ignored (bash tests/run.sh does both)"]
async fn on_etcd_and_kube_apiserver_alone_the_node_binds_and_runs_pods_itself() {
    let bin = std::env::temp_dir().join(format!("cp-envtest-bin-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&bin);
    std::fs::create_dir_all(&bin).unwrap();
    for name in ["etcd", "kube-apiserver"] {
        let real = control_plane_bin().join(name);
        assert!(
            real.is_file(),
            "{} is missing: bash tests/control-plane/build.sh",
            real.display()
        );
        std::os::unix::fs::symlink(&real, bin.join(name)).unwrap();
    }
    let sim = sim::Simulation::start_on_control_plane(&bin, common::options(&broker_uri(), 50.0))
        .await
        .unwrap();
    match &sim.backend {
        sim::Backend::ControlPlane { missing, .. } => {
            assert_eq!(missing.len(), 2, "{missing:?}");
            assert!(
                missing[0].starts_with("no controller manager"),
                "{missing:?}"
            );
            assert!(
                missing[1].contains("the node binds pending pods itself"),
                "{missing:?}"
            );
        }
        sim::Backend::Embedded(_) => panic!("a control plane was asked for"),
    }
    let pods: Api<Pod> = Api::namespaced(sim.client(), "default");
    let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "alone"},
        "spec": {"containers": [{"name": "main", "image": "x", "command": ["sh", "-c", "exit 0"]}],
            "restartPolicy": "Never"}}))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    eventually(
        "the pod ran to completion on the simulated node",
        Duration::from_secs(60),
        || {
            let pods = pods.clone();
            async move {
                let p = pods.get("alone").await.unwrap();
                p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some("simulated-node")
                    && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Succeeded")
            }
        },
    )
    .await;
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(&bin);
}

/// Ctrl-C to a running `simulate`: it must exit with success within `within`; returns
/// what it printed.
async fn interrupt(child: &mut tokio::process::Child, within: Duration) -> String {
    let pid = child.id().expect("simulate runs") as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("the simulation gets SIGINT");
    let status = tokio::time::timeout(within, child.wait())
        .await
        .unwrap_or_else(|_| panic!("simulate stops within {within:?}"))
        .unwrap();
    assert!(status.success(), "{status:?}");
    let mut out = String::new();
    use tokio::io::AsyncReadExt;
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .await
        .unwrap();
    out
}
