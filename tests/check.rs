//! The `check` command as Nagios runs it: the real binary against the simulated API
//! server, with pool status written through the status subresource.

use std::path::PathBuf;

use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use testrunner_operator::crd::TestRunnerPool;
use testrunner_sim::{ApiServer, ServerConfig};

mod common;

async fn server() -> ApiServer {
    common::api_server(ServerConfig::default()).await
}

/// A kubeconfig for `server` whose user carries a token the output must never show.
fn kubeconfig(name: &str, server: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!(
        "testrunner-check-{}-{name}.kubeconfig",
        std::process::id()
    ));
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: c
  cluster:
    server: {server}
users:
- name: u
  user:
    token: kube-SECRET-token
contexts:
- name: c
  context: {{cluster: c, user: u, namespace: default}}
current-context: c
"
        ),
    )
    .unwrap();
    path
}

async fn create_pool(api: &ApiServer, name: &str, status: Value) -> Value {
    let pools: Api<TestRunnerPool> = Api::namespaced(api.client(), "default");
    let pool: TestRunnerPool = serde_json::from_value(json!({
        "apiVersion": "testrunner.dev/v1alpha1", "kind": "TestRunnerPool",
        "metadata": {"name": name},
        "spec": {"image": "example.org/runner:1", "command": ["true"],
            "queue": {"name": "tickets", "connectionSecretRef": {"name": "rabbitmq"}}},
    }))
    .unwrap();
    pools.create(&PostParams::default(), &pool).await.unwrap();
    let patched = pools
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": status})),
        )
        .await
        .unwrap();
    serde_json::to_value(patched).unwrap()
}

fn status(phase: &str, ready: i64, degraded: Option<(&str, &str)>) -> Value {
    let degraded = match degraded {
        Some((reason, message)) => {
            json!({"type": "Degraded", "status": "True", "reason": reason, "message": message})
        }
        None => {
            json!({"type": "Degraded", "status": "False", "reason": "AsExpected", "message": ""})
        }
    };
    json!({
        "observedGeneration": 1,
        "phase": phase,
        "conditions": [
            {"type": "Ready", "status": "True", "reason": "WorkersReady", "message": ""},
            degraded,
        ],
        "queue": {"ready": ready, "consumers": 7},
        "workers": {"desired": 8, "current": 8, "ready": 7},
        "quarantine": {"count": 0},
    })
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

async fn check(kubeconfig: Option<&PathBuf>, env: Option<&PathBuf>, args: &[&str]) -> Run {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_testrunner-operator"));
    cmd.arg("check").args(args).env_remove("KUBECONFIG");
    if let Some(path) = kubeconfig {
        cmd.arg("--kubeconfig").arg(path);
    }
    if let Some(path) = env {
        cmd.env("KUBECONFIG", path);
    }
    let out = cmd.output().await.expect("the binary runs");
    let run = Run {
        code: out.status.code().expect("an exit code"),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    };
    assert_eq!(
        run.stdout.lines().count(),
        1,
        "one line: {:?} (stderr {:?})",
        run.stdout,
        run.stderr
    );
    assert!(!run.stdout.contains("SECRET") && !run.stderr.contains("SECRET"));
    run
}

#[tokio::test]
async fn ok_warning_and_critical_from_the_pool_status() {
    let api = server().await;
    let config = kubeconfig("states", &api.url());
    let stored = create_pool(&api, "unit", status("Running", 12, None)).await;
    // The check reports what the API holds (0 if the server's schema pruned the field).
    let quarantined = stored
        .pointer("/status/quarantine/count")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    let perf = format!(
        "| 'ready'=12;20;50;0 'workers'=8;;;0 'ready_workers'=7;;;0 'quarantined'={quarantined};1;;0"
    );

    let ok = check(
        Some(&config),
        None,
        &[
            "--namespace",
            "default",
            "--pool",
            "unit",
            "--warn-queue",
            "20",
            "--crit-queue",
            "50",
        ],
    )
    .await;
    assert_eq!(ok.code, 0, "{}", ok.stdout);
    assert_eq!(
        ok.stdout.trim_end(),
        format!("TESTRUNNER OK - unit: Running, 7/8 workers ready, 12 tickets ready {perf}")
    );

    // KUBECONFIG works too; 12 ready tickets cross a lower warning threshold.
    let warn = check(
        None,
        Some(&config),
        &["-n", "default", "--pool", "unit", "--warn-queue", "10"],
    )
    .await;
    assert_eq!(warn.code, 1, "{}", warn.stdout);
    assert!(
        warn.stdout
            .starts_with("TESTRUNNER WARNING - unit: Running, 7/8 workers ready, 12 tickets ready; 12 tickets ready >= 10 |"),
        "{}",
        warn.stdout
    );

    let mut poisoned = status(
        "Degraded",
        3,
        Some(("PoisonTicket", "ticket t-9 crashed 3 workers")),
    );
    poisoned["quarantine"] = json!({"count": 1, "tickets": [{"id": "t-9", "crashes": 3,
        "pods": ["p-1"], "images": ["example.org/runner:1"], "lastExit": "exit code 3",
        "at": "2026-01-01T00:00:00Z"}]});
    create_pool(&api, "poison", poisoned).await;
    let poison = check(Some(&config), None, &["-n", "default", "--pool", "poison"]).await;
    assert_eq!(poison.code, 1, "{}", poison.stdout);
    assert!(
        poison
            .stdout
            .contains("Degraded: PoisonTicket: ticket t-9 crashed 3 workers"),
        "{}",
        poison.stdout
    );
    // A ticket in quarantine warns by default, names the ticket, and can be made critical.
    assert!(
        poison
            .stdout
            .contains("; 1 ticket in quarantine >= 1: t-9 |"),
        "{}",
        poison.stdout
    );
    let critical = check(
        Some(&config),
        None,
        &[
            "-n",
            "default",
            "--pool",
            "poison",
            "--crit-quarantined",
            "1",
        ],
    )
    .await;
    assert_eq!(critical.code, 2, "{}", critical.stdout);
    assert!(
        critical.stdout.ends_with("'quarantined'=1;1;1;0\n"),
        "{}",
        critical.stdout
    );
    let off = check(
        Some(&config),
        None,
        &[
            "-n",
            "default",
            "--pool",
            "poison",
            "--warn-quarantined",
            "0",
        ],
    )
    .await;
    assert!(!off.stdout.contains("in quarantine"), "{}", off.stdout);

    create_pool(
        &api,
        "broken",
        status(
            "Degraded",
            40,
            Some((
                "BrokenEnvironment",
                "every worker exits 127 before its first ticket",
            )),
        ),
    )
    .await;
    let broken = check(
        Some(&config),
        None,
        &["-n", "default", "--pool", "broken", "--warn-queue", "10"],
    )
    .await;
    assert_eq!(broken.code, 2, "{}", broken.stdout);
    assert!(
        broken.stdout.starts_with(
            "TESTRUNNER CRITICAL - broken: Degraded, 7/8 workers ready, 40 tickets ready; Degraded: BrokenEnvironment: every worker exits 127"
        ),
        "{}",
        broken.stdout
    );
    assert!(
        broken.stdout.contains("'ready'=40;10;;0"),
        "{}",
        broken.stdout
    );

    let crit_queue = check(
        Some(&config),
        None,
        &["-n", "default", "--pool", "unit", "--crit-queue", "12"],
    )
    .await;
    assert_eq!(crit_queue.code, 2, "{}", crit_queue.stdout);
    let _ = std::fs::remove_file(config);
}

#[tokio::test]
async fn unknown_when_the_pool_is_missing_or_the_api_is_down() {
    let api = server().await;
    let config = kubeconfig("missing", &api.url());
    let missing = check(Some(&config), None, &["-n", "default", "--pool", "nope"]).await;
    assert_eq!(missing.code, 3, "{}", missing.stdout);
    assert_eq!(
        missing.stdout.trim_end(),
        "TESTRUNNER UNKNOWN - pool default/nope not found"
    );

    // Nothing listens there any more.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let down = kubeconfig("down", &format!("http://{addr}"));
    let run = check(Some(&down), None, &["-n", "default", "--pool", "unit"]).await;
    assert_eq!(run.code, 3, "{}", run.stdout);
    assert!(
        run.stdout.starts_with(
            "TESTRUNNER UNKNOWN - failed to read pool default/unit: cannot reach the API server"
        ),
        "{}",
        run.stdout
    );

    let nowhere = std::env::temp_dir().join("testrunner-check-no-such.kubeconfig");
    let run = check(Some(&nowhere), None, &["-n", "default", "--pool", "unit"]).await;
    assert_eq!(run.code, 3, "{}", run.stdout);
    assert!(
        run.stdout.contains("failed to read the kubeconfig"),
        "{}",
        run.stdout
    );
    let _ = std::fs::remove_file(config);
    let _ = std::fs::remove_file(down);
}

#[test]
fn help_documents_the_rules() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_testrunner-operator"))
        .args(["check", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "--warn-queue",
        "--crit-queue",
        "--kubeconfig",
        "UNKNOWN (3)",
        "BrokenEnvironment",
        "PoisonTicket",
        "'quarantined'=",
    ] {
        assert!(help.contains(needle), "{needle} missing from:\n{help}");
    }
}

/// A minimal API server that serves one pool with fields the CRD does not have yet, and
/// refuses another: the check reads the object as plain JSON.
async fn fake_api() -> std::net::SocketAddr {
    use axum::http::StatusCode;
    async fn answer(req: axum::extract::Request) -> (StatusCode, String) {
        let path = req.uri().path().to_string();
        match path.as_str() {
            "/apis/testrunner.dev/v1alpha1/namespaces/ci/testrunnerpools/unit" => (
                StatusCode::OK,
                json!({
                    "apiVersion": "testrunner.dev/v1alpha1", "kind": "TestRunnerPool",
                    "metadata": {"name": "unit", "namespace": "ci", "generation": 2},
                    "spec": {},
                    "status": {
                        "observedGeneration": 2, "phase": "Running",
                        "queue": {"ready": 4}, "workers": {"current": 3, "ready": 3},
                        "quarantine": {"count": 2, "tickets": [{"id": "t-1"}, {"id": "t-2"}]},
                        "somethingNew": {"a": 1},
                    },
                })
                .to_string(),
            ),
            _ => (
                StatusCode::FORBIDDEN,
                json!({
                    "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 403,
                    "reason": "Forbidden",
                    "message": "testrunnerpools.testrunner.dev \"other\" is forbidden: User \"nagios\" cannot get resource",
                })
                .to_string(),
            ),
        }
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(answer);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

#[tokio::test]
async fn status_fields_the_crd_does_not_have_yet_are_read_and_a_refusal_is_unknown() {
    let addr = fake_api().await;
    let config = kubeconfig("fake", &format!("http://{addr}"));
    let run = check(Some(&config), None, &["-n", "ci", "--pool", "unit"]).await;
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert_eq!(
        run.stdout.trim_end(),
        "TESTRUNNER WARNING - unit: Running, 3/3 workers ready, 4 tickets ready; 2 tickets in quarantine >= 1: t-1, t-2 | 'ready'=4;;;0 'workers'=3;;;0 'ready_workers'=3;;;0 'quarantined'=2;1;;0"
    );
    let run = check(Some(&config), None, &["-n", "ci", "--pool", "other"]).await;
    assert_eq!(run.code, 3, "{}", run.stdout);
    assert!(
        run.stdout.starts_with(
            "TESTRUNNER UNKNOWN - failed to read pool ci/other: the API server answered 403 Forbidden:"
        ),
        "{}",
        run.stdout
    );
    let _ = std::fs::remove_file(config);
}
