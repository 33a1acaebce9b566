//! What the integration tests share: waiting for a condition, the test broker and its
//! queues, where the real control plane's binaries and kubectl are, and starting the
//! simulated cluster with what the operator needs. A test file takes it with
//! `mod common;`.

// Each test binary uses only some of these.
#![allow(dead_code)]

pub mod api_proxy;
pub mod broker_node;
pub mod ledger;

use std::path::{Path, PathBuf};
use std::time::Duration;

use kube::CustomResourceExt;
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};
use testrunner_operator::crd::TestRunnerPool;
use testrunner_sim::{ApiServer, ServerConfig, Simulation};

/// How often [`eventually`] and [`eventually_some`] check.
const POLL: Duration = Duration::from_millis(50);

/// Checks `check` until it holds; fails, naming `what`, once `timeout` has passed.
pub async fn eventually(what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Checks `check` until it gives a value, and returns it; fails, naming `what`, once
/// `timeout` has passed.
pub async fn eventually_some<T>(
    what: &str,
    timeout: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// The test broker: env `TESTRUNNER_AMQP_URI`, else the local RabbitMQ as guest.
pub fn broker_uri() -> String {
    std::env::var("TESTRUNNER_AMQP_URI")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// Publishes ticket `id` (body and message id: the id, persistent) to `queue` on `ch`, a
/// channel in confirm mode, and checks that the broker confirmed it.
pub async fn publish_confirmed(ch: &lapin::Channel, queue: &str, id: &str) {
    publish_body_confirmed(ch, queue, id, id.as_bytes()).await;
}

/// Publishes ticket `id` with `body` (persistent) to `queue` on `ch`, a channel in
/// confirm mode, and checks that the broker confirmed it.
pub async fn publish_body_confirmed(ch: &lapin::Channel, queue: &str, id: &str, body: &[u8]) {
    let confirm = ch
        .basic_publish(
            "".into(),
            queue.into(),
            lapin::options::BasicPublishOptions::default(),
            body,
            lapin::BasicProperties::default()
                .with_message_id(id.into())
                .with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack(), "the broker took ticket {id}");
}

/// Declares `queue` on `ch`: a durable quorum queue with `quorum`, else a classic one,
/// that removes itself after ten unused minutes, so a failed test leaves nothing behind
/// on the broker.
pub async fn declare_expiring(ch: &lapin::Channel, queue: &str, quorum: bool) {
    let mut args = FieldTable::default();
    if quorum {
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
    }
    args.insert("x-expires".into(), AMQPValue::LongInt(600_000));
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: quorum,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap_or_else(|e| panic!("failed to declare queue {queue}: {e}"));
}

/// A passive declare of `queue`: its counts, or the broker's error (a missing queue
/// closes the channel).
pub async fn passive_declare(ch: &lapin::Channel, queue: &str) -> lapin::Result<lapin::Queue> {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
}

/// Ready messages and consumers of `queue`, which exists.
pub async fn queue_counts(ch: &lapin::Channel, queue: &str) -> (u32, u32) {
    let q = passive_declare(ch, queue)
        .await
        .unwrap_or_else(|e| panic!("no queue {queue}: {e}"));
    (q.message_count(), q.consumer_count())
}

/// The real control plane's binaries: env `TESTRUNNER_CONTROL_PLANE`, else
/// `<CARGO_TARGET_DIR or target>/control-plane/bin`, where
/// `bash tests/control-plane/build.sh` puts them.
pub fn control_plane_bin() -> PathBuf {
    std::env::var_os("TESTRUNNER_CONTROL_PLANE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
                .join("control-plane/bin")
        })
}

/// [`control_plane_bin`] when it holds all four binaries (etcd, kube-apiserver,
/// kube-controller-manager, kube-scheduler); fails, saying how to build them, when one
/// is missing.
pub fn whole_control_plane_bin() -> PathBuf {
    let dir = control_plane_bin();
    let missing: Vec<&str> = [
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
    ]
    .into_iter()
    .filter(|name| !dir.join(name).is_file())
    .collect();
    assert!(
        missing.is_empty(),
        "needs the real control plane: {} missing in {}; build them with \
         `bash tests/control-plane/build.sh` (or set TESTRUNNER_CONTROL_PLANE to a directory \
         that holds them)",
        missing.join(", "),
        dir.display()
    );
    dir
}

/// The kubectl the project's scripts install (`bash .ci/install-tools`), or the one
/// env `TESTRUNNER_KUBECTL` names; fails, saying how to get it, when it is missing.
pub fn kubectl() -> PathBuf {
    let path = std::env::var_os("TESTRUNNER_KUBECTL")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/kubectl/kubectl"));
    assert!(
        path.exists(),
        "{} is missing: the real-kubectl tests need it (install it with `bash .ci/install-tools`, or set TESTRUNNER_KUBECTL)",
        path.display()
    );
    path
}

/// Whether process `pid` runs (a zombie does not: it only waits to be reaped).
pub fn process_alive(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .split(") ")
            .nth(1)
            .is_some_and(|rest| rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// The simulated cluster's logs (control-plane readiness times, ...) in the test's
/// output; `RUST_LOG` overrides.
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "testrunner_sim=info".into()),
        )
        .with_ansi(false)
        .with_test_writer()
        .try_init();
}

/// A body as client-go encodes it for `application/vnd.kubernetes.protobuf`: the magic
/// bytes `k8s\0` and a `runtime.Unknown` around the object's message.
pub fn protobuf_body(api_version: &str, kind: &str, object: &impl prost::Message) -> Vec<u8> {
    use k8s_pb::apimachinery::pkg::runtime::{TypeMeta, Unknown};
    use prost::Message;
    let unknown = Unknown {
        type_meta: Some(TypeMeta {
            api_version: Some(api_version.into()),
            kind: Some(kind.into()),
        }),
        raw: Some(object.encode_to_vec()),
        content_encoding: Some(String::new()),
        content_type: Some(String::new()),
    };
    let mut body = b"k8s\0".to_vec();
    body.extend(unknown.encode_to_vec());
    body
}

/// The embedded API server on 127.0.0.1:0, with the TestRunnerPool CRD.
pub async fn api_server(config: ServerConfig) -> ApiServer {
    let api = testrunner_sim::start_api("127.0.0.1:0".parse().unwrap(), config)
        .await
        .expect("the embedded API server starts");
    testrunner_sim::install_crd(&api.cluster, &TestRunnerPool::crd()).expect("the CRD installs");
    api
}

/// What the operator's simulated cluster starts with (the pool CRD, Secret
/// `default/rabbitmq` holding `amqp_uri`), the node's durations divided by
/// `time_scale`, and this package's binary as the pods' `testrunner-operator`.
pub fn options(amqp_uri: &str, time_scale: f64) -> testrunner_sim::Options {
    testrunner_sim::Options {
        crds: vec![TestRunnerPool::crd()],
        secrets: vec![testrunner_sim::Options::string_secret(
            "rabbitmq", "uri", amqp_uri,
        )],
        time_scale,
        ..testrunner_sim::Options::new(env!("CARGO_BIN_EXE_testrunner-operator").into())
    }
}

/// The simulated cluster of [`options`] on the embedded API server (127.0.0.1:0).
pub async fn simulation(amqp_uri: &str, time_scale: f64) -> Simulation {
    Simulation::start(
        "127.0.0.1:0".parse().unwrap(),
        options(amqp_uri, time_scale),
    )
    .await
    .expect("the simulated cluster starts")
}
