//! The real kubectl against the simulated API server. Each test gets its own HOME (so
//! its own discovery and OpenAPI cache) and its own server on 127.0.0.1:0. The kubectl
//! is the one `bash .ci/install-tools` puts in .tools/ (or TESTRUNNER_KUBECTL); without
//! it these tests fail and say so.

use std::path::PathBuf;
use std::process::Output;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event as NewEvent;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use testrunner_sim::{self as sim, ApiServer, ServerConfig};

mod common;
use common::kubectl;

struct Kubectl {
    home: PathBuf,
    kubeconfig: PathBuf,
    server: Server,
}

enum Server {
    Api(ApiServer),
    Sim(Box<sim::Simulation>),
}

impl Drop for Kubectl {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.home);
    }
}

/// A server with the CRD installed and a kubectl set up for it.
async fn setup(test: &str) -> Kubectl {
    kubectl();
    let api = common::api_server(ServerConfig::default()).await;
    with_home(test, Server::Api(api))
}

/// A whole simulation (API server and kubelet) and a kubectl for it.
async fn setup_sim(test: &str) -> Kubectl {
    kubectl();
    let s = common::simulation("amqp://guest:guest@127.0.0.1:5672/%2f", 100.0).await;
    with_home(test, Server::Sim(Box::new(s)))
}

fn with_home(test: &str, server: Server) -> Kubectl {
    let url = match &server {
        Server::Api(a) => a.url(),
        Server::Sim(s) => s.url(),
    };
    let home = std::env::temp_dir().join(format!("sim-kubectl-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&home);
    std::fs::create_dir_all(&home).unwrap();
    let kubeconfig = home.join("kubeconfig");
    sim::write_kubeconfig(&kubeconfig, &url).unwrap();
    Kubectl {
        home,
        kubeconfig,
        server,
    }
}

impl Kubectl {
    fn api(&self) -> &ApiServer {
        match &self.server {
            Server::Api(a) => a,
            Server::Sim(s) => s.embedded().expect("an embedded simulation"),
        }
    }

    async fn run_with(&self, args: &[&str], stdin: Option<&str>) -> Output {
        use tokio::io::AsyncWriteExt;
        let mut cmd = tokio::process::Command::new(kubectl());
        cmd.args(args)
            .env_clear()
            .env("HOME", &self.home)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("PATH", "/usr/bin:/bin")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("kubectl starts");
        let mut input = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).await.unwrap();
        }
        drop(input);
        tokio::time::timeout(std::time::Duration::from_secs(60), child.wait_with_output())
            .await
            .expect("kubectl finishes within a minute")
            .unwrap()
    }

    /// Runs kubectl and returns stdout, failing the test on a non-zero exit.
    async fn ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.run_with(args, stdin).await;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {stderr}\n{stdout}"
        );
        stdout
    }

    /// Runs kubectl expecting failure; returns stderr.
    async fn fails(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.run_with(args, stdin).await;
        assert!(
            !out.status.success(),
            "kubectl {args:?} should have failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

fn pool_yaml(name: &str, image: &str, min: i32, max: i32) -> String {
    format!(
        "apiVersion: testrunner.dev/v1alpha1
kind: TestRunnerPool
metadata:
  name: {name}
spec:
  image: {image}
  command: [\"sh\", \"-c\", \"cat\"]
  queue:
    name: tickets.{name}
    connectionSecretRef: {{name: rabbitmq, key: uri}}
  scaling: {{minWorkers: {min}, maxWorkers: {max}}}
"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_apply_get_describe_annotate_patch_delete() {
    let k = setup("flow").await;

    // Client-side apply: create, then change.
    let out = k
        .ok(
            &["apply", "-f", "-"],
            Some(&pool_yaml("unit", "runner:1", 0, 3)),
        )
        .await;
    assert!(
        out.contains("testrunnerpool.testrunner.dev/unit created"),
        "{out}"
    );
    let out = k
        .ok(
            &["apply", "-f", "-"],
            Some(&pool_yaml("unit", "runner:2", 0, 3)),
        )
        .await;
    assert!(out.contains("configured"), "{out}");
    let out = k.ok(&["get", "trp", "unit", "-o", "json"], None).await;
    let obj: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(obj["spec"]["image"], "runner:2");
    assert_eq!(
        obj["spec"]["scaling"]["pollInterval"], "2s",
        "schema defaults applied"
    );
    assert!(
        obj["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"]
            .is_string()
    );

    // Server-side apply. Changing a field client-side apply set conflicts, as on a
    // real cluster; applying the same values succeeds and kubectl then moves the
    // ownership to its server-side manager, after which changes go through.
    let err = k
        .fails(
            &["apply", "--server-side", "-f", "-"],
            Some(&pool_yaml("unit", "runner:2", 1, 3)),
        )
        .await;
    assert!(
        err.contains("conflict with \"kubectl-client-side-apply\"")
            && err.contains(".spec.scaling.minWorkers"),
        "{err}"
    );
    let out = k
        .ok(
            &["apply", "--server-side", "-f", "-"],
            Some(&pool_yaml("unit", "runner:2", 0, 3)),
        )
        .await;
    assert!(out.contains("serverside-applied"), "{out}");
    let out = k
        .ok(
            &["apply", "--server-side", "-f", "-"],
            Some(&pool_yaml("unit", "runner:2", 1, 3)),
        )
        .await;
    assert!(out.contains("serverside-applied"), "{out}");
    let obj: Value =
        serde_json::from_str(&k.ok(&["get", "trp", "unit", "-o", "json"], None).await).unwrap();
    assert_eq!(obj["spec"]["scaling"]["minWorkers"], 1);
    let out = k
        .ok(
            &["apply", "--server-side", "-f", "-"],
            Some(&pool_yaml("ssa", "runner:1", 0, 2)),
        )
        .await;
    assert!(
        out.contains("testrunnerpool.testrunner.dev/ssa serverside-applied"),
        "{out}"
    );

    // A status as the operator would write it, then the printer columns.
    let pools: Api<testrunner_operator::crd::TestRunnerPool> =
        Api::namespaced(k.api().client(), "default");
    pools
        .patch_status(
            "unit",
            &kube::api::PatchParams::apply("testrunner-operator").force(),
            &kube::api::Patch::Apply(json!({"apiVersion": "testrunner.dev/v1alpha1", "kind": "TestRunnerPool",
                "status": {"phase": "Running", "workers": {"desired": 2, "current": 2, "ready": 1}, "queue": {"ready": 7, "consumers": 1}}})),
        )
        .await
        .unwrap();
    let out = k.ok(&["get", "trp"], None).await;
    let header: Vec<&str> = out.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        vec![
            "NAME", "IMAGE", "DESIRED", "READY", "QUEUE", "PHASE", "ROLLOUT", "AGE"
        ],
        "{out}"
    );
    let row: Vec<&str> = out
        .lines()
        .find(|l| l.starts_with("unit "))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        &row[..6],
        &["unit", "runner:2", "2", "1", "7", "Running"],
        "{out}"
    );

    // Events written through events.k8s.io/v1 (as kube's Recorder does) in describe.
    let uid = obj["metadata"]["uid"].as_str().unwrap().to_string();
    let events: Api<NewEvent> = Api::namespaced(k.api().client(), "default");
    let ev: NewEvent = serde_json::from_value(json!({
        "metadata": {"generateName": "unit."},
        "eventTime": jiff::Timestamp::now().to_string(),
        "regarding": {"apiVersion": "testrunner.dev/v1alpha1", "kind": "TestRunnerPool", "name": "unit", "namespace": "default", "uid": uid},
        "reason": "ScaledUp", "note": "Scaling up from 0 to 2 workers", "type": "Normal", "action": "Scale",
        "reportingController": "testrunner-operator", "reportingInstance": "test",
    }))
    .unwrap();
    events.create(&PostParams::default(), &ev).await.unwrap();
    let out = k.ok(&["describe", "trp", "unit"], None).await;
    assert!(out.contains("Name:") && out.contains("unit"), "{out}");
    assert!(
        out.contains("ScaledUp") && out.contains("Scaling up from 0 to 2 workers"),
        "{out}"
    );

    // Annotate and patch (merge and JSON).
    let out = k
        .ok(
            &["annotate", "trp", "unit", "testrunner.dev/note=hello"],
            None,
        )
        .await;
    assert!(out.contains("annotated"), "{out}");
    k.ok(
        &[
            "patch",
            "trp",
            "unit",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"paused":true}}"#,
        ],
        None,
    )
    .await;
    k.ok(
        &[
            "patch",
            "trp",
            "unit",
            "--type",
            "json",
            "-p",
            r#"[{"op":"replace","path":"/spec/scaling/maxWorkers","value":5}]"#,
        ],
        None,
    )
    .await;
    let obj: Value =
        serde_json::from_str(&k.ok(&["get", "trp", "unit", "-o", "json"], None).await).unwrap();
    assert_eq!(
        obj["metadata"]["annotations"]["testrunner.dev/note"],
        "hello"
    );
    assert_eq!(obj["spec"]["paused"], true);
    assert_eq!(obj["spec"]["scaling"]["maxWorkers"], 5);

    // Pods print their own columns.
    let pods: Api<Pod> = Api::namespaced(k.api().client(), "default");
    let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "worker-1"},
        "spec": {"containers": [{"name": "w", "image": "runner:2", "command": ["true"]}]}}))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let out = k.ok(&["get", "pods"], None).await;
    let header: Vec<&str> = out.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        vec!["NAME", "READY", "STATUS", "RESTARTS", "AGE"],
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("worker-1") && l.contains("0/1") && l.contains("Pending")),
        "{out}"
    );

    // Delete.
    let out = k.ok(&["delete", "trp", "unit", "ssa"], None).await;
    assert!(
        out.contains("\"unit\" deleted") && out.contains("\"ssa\" deleted"),
        "{out}"
    );
    let out = k.run_with(&["get", "trp"], None).await;
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("No resources found"),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_explain_reads_the_pool_schema() {
    let k = setup("explain").await;
    let out = k.ok(&["explain", "trp.spec"], None).await;
    assert!(
        out.contains("KIND:") && out.contains("TestRunnerPool"),
        "{out}"
    );
    for field in ["image", "queue", "scaling", "paused"] {
        assert!(out.contains(field), "{field} missing from:\n{out}");
    }
    let out = k
        .ok(&["explain", "trp.spec.scaling.maxWorkers"], None)
        .await;
    assert!(out.contains("Upper bound on worker pods"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_is_refused_an_invalid_pool_with_the_field_named() {
    let k = setup("invalid").await;
    let err = k
        .fails(
            &["apply", "-f", "-"],
            Some(&pool_yaml("bad", "runner:1", 5, 2)),
        )
        .await;
    assert!(
        err.contains("spec.scaling.minWorkers") && err.contains("less than or equal to maxWorkers"),
        "{err}"
    );
    let err = k
        .fails(
            &["apply", "--server-side", "-f", "-"],
            Some(&pool_yaml("bad", "runner:1", 0, 5000)),
        )
        .await;
    assert!(err.contains("spec.scaling.maxWorkers"), "{err}");
    let typo = pool_yaml("typo", "runner:1", 0, 2).replace("  image:", "  imagee: x\n  image:");
    let err = k.fails(&["apply", "-f", "-"], Some(&typo)).await;
    assert!(
        err.contains("unknown field") && err.contains("spec.imagee"),
        "{err}"
    );
    let out = k.run_with(&["get", "trp"], None).await;
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("No resources found"),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_get_watch_prints_rows_as_they_change() {
    let k = setup("watch").await;
    k.ok(
        &["apply", "-f", "-"],
        Some(&pool_yaml("w", "runner:1", 0, 2)),
    )
    .await;
    let mut cmd = tokio::process::Command::new(kubectl());
    cmd.args(["get", "trp", "-w", "--request-timeout=3s"])
        .env_clear()
        .env("HOME", &k.home)
        .env("KUBECONFIG", &k.kubeconfig)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let before = k.api().cluster.watcher_count();
    let child = cmd.spawn().unwrap();
    // Change the pool once kubectl watches.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while k.api().cluster.watcher_count() <= before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "kubectl never started watching"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let pools: Api<testrunner_operator::crd::TestRunnerPool> =
        Api::namespaced(k.api().client(), "default");
    pools
        .patch(
            "w",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"image": "runner:9"}})),
        )
        .await
        .unwrap();
    let out = tokio::time::timeout(std::time::Duration::from_secs(30), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("runner:1"), "{stdout}");
    assert!(
        stdout.contains("runner:9"),
        "the watch shows the change: {stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_logs_shows_what_the_container_printed() {
    let k = setup_sim("logs").await;
    let pod = "apiVersion: v1
kind: Pod
metadata:
  name: talker
spec:
  containers:
  - name: main
    image: x
    command: [\"sh\", \"-c\", \"echo hello from the pod; echo second line; sleep 30\"]
";
    k.ok(&["apply", "-f", "-"], Some(pod)).await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let out = k.run_with(&["logs", "talker"], None).await;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() && text.contains("second line") {
            assert_eq!(text, "hello from the pod\nsecond line\n");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no logs: {out:?}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let tail = k.ok(&["logs", "talker", "--tail=1"], None).await;
    assert_eq!(tail, "second line\n");
    let out = k.ok(&["get", "pod", "talker"], None).await;
    assert!(out.contains("1/1") && out.contains("Running"), "{out}");
    k.ok(&["delete", "pod", "talker", "--wait=true"], None)
        .await;
    if let Server::Sim(s) = &k.server {
        s.shutdown().await;
    }
}

fn unbase64(text: &str) -> String {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .unwrap_or_else(|e| panic!("{text:?} is not base64: {e}"));
    String::from_utf8(bytes).unwrap()
}

/// A throwaway self-signed certificate and its key (P-256, CN sim.test), for
/// `kubectl create secret tls`, which checks that the pair parses and matches.
const TEST_CERT: &str = "-----BEGIN CERTIFICATE-----
MIIBfjCCASOgAwIBAgIUFb1RlwxZ9xEM3pMTW2E35V5qquYwCgYIKoZIzj0EAwIw
EzERMA8GA1UEAwwIc2ltLnRlc3QwIBcNMjYxMTMwMTQwMzMwWhgPMjEyNjExMDYx
NDAzMzBaMBMxETAPBgNVBAMMCHNpbS50ZXN0MFkwEwYHKoZIzj0CAQYIKoZIzj0D
AQcDQgAE6GskwdEueo/wQtVF4vRtWjMJzPXefBbZaq+LbKJqYeguNikpF6B2mYKy
1t7TJVLVptmse2cRW0uSPi+AdVsci6NTMFEwHQYDVR0OBBYEFFn+7jNPCCdi1NWt
1pcwnsJFAD9dMB8GA1UdIwQYMBaAFFn+7jNPCCdi1NWt1pcwnsJFAD9dMA8GA1Ud
EwEB/wQFMAMBAf8wCgYIKoZIzj0EAwIDSQAwRgIhANvTAS23dIwSKYGqIFmCsvWg
dkckTI+oDj8DND9KmVbcAiEAulDHdXCmN8f83aNoC3zHm0ugKWjYwXGFW6ZVFib7
9CA=
-----END CERTIFICATE-----
";
const TEST_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgZmPa+BWTsb0N9S50
+tY24eesDZ0z9Dyt1XzroOypjqahRANCAAToayTB0S56j/BC1UXi9G1aMwnM9d58
Ftlqr4tsomph6C42KSkXoHaZgrLW3tMlUtWm2ax7ZxFbS5I+L4B1WxyL
-----END PRIVATE KEY-----
";

/// `kubectl create secret|configmap|namespace` send protobuf bodies
/// (application/vnd.kubernetes.protobuf) and accept the JSON answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_create_secret_configmap_and_namespace_send_protobuf() {
    let k = setup("create-protobuf").await;
    let uri = "amqp://guest:guest@127.0.0.1:5672/%2f";
    let out = k
        .ok(
            &[
                "create",
                "secret",
                "generic",
                "rabbitmq",
                &format!("--from-literal=uri={uri}"),
            ],
            None,
        )
        .await;
    assert_eq!(out.trim(), "secret/rabbitmq created");
    let data = k
        .ok(
            &["get", "secret", "rabbitmq", "-o", "jsonpath={.data.uri}"],
            None,
        )
        .await;
    assert_eq!(unbase64(&data), uri);
    let secrets = k.api().cluster.find_kind("", "v1", "secrets").unwrap();
    let stored = k
        .api()
        .cluster
        .get(&secrets, "default", "rabbitmq")
        .unwrap();
    assert_eq!(stored["type"], "Opaque");
    assert_eq!(
        stored["metadata"]["managedFields"][0]["manager"],
        "kubectl-create"
    );
    // Creating it again: the error Status reaches kubectl as it would from a real server.
    let err = k
        .fails(
            &[
                "create",
                "secret",
                "generic",
                "rabbitmq",
                "--from-literal=uri=x",
            ],
            None,
        )
        .await;
    assert!(err.contains("secrets \"rabbitmq\" already exists"), "{err}");
    // A server-side dry run answers the object and stores nothing.
    let out = k
        .ok(
            &[
                "create",
                "secret",
                "generic",
                "dry",
                "--from-literal=a=b",
                "--dry-run=server",
                "-o",
                "json",
            ],
            None,
        )
        .await;
    let dry: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(unbase64(dry["data"]["a"].as_str().unwrap()), "b");
    assert!(k.api().cluster.get(&secrets, "default", "dry").is_err());

    k.ok(
        &[
            "create",
            "secret",
            "docker-registry",
            "regcred",
            "--docker-server=registry.test",
            "--docker-username=ci",
            "--docker-password=pw",
        ],
        None,
    )
    .await;
    let reg: Value = serde_json::from_str(
        &k.ok(&["get", "secret", "regcred", "-o", "json"], None)
            .await,
    )
    .unwrap();
    assert_eq!(reg["type"], "kubernetes.io/dockerconfigjson");
    let config: Value = serde_json::from_str(&unbase64(
        reg["data"][".dockerconfigjson"].as_str().unwrap(),
    ))
    .unwrap();
    assert_eq!(config["auths"]["registry.test"]["username"], "ci");

    let cert = k.home.join("tls.crt");
    let key = k.home.join("tls.key");
    std::fs::write(&cert, TEST_CERT).unwrap();
    std::fs::write(&key, TEST_KEY).unwrap();
    k.ok(
        &[
            "create",
            "secret",
            "tls",
            "web",
            &format!("--cert={}", cert.display()),
            &format!("--key={}", key.display()),
        ],
        None,
    )
    .await;
    let tls: Value =
        serde_json::from_str(&k.ok(&["get", "secret", "web", "-o", "json"], None).await).unwrap();
    assert_eq!(tls["type"], "kubernetes.io/tls");
    assert_eq!(
        unbase64(tls["data"]["tls.crt"].as_str().unwrap()),
        TEST_CERT
    );
    assert_eq!(unbase64(tls["data"]["tls.key"].as_str().unwrap()), TEST_KEY);

    let out = k
        .ok(
            &[
                "create",
                "configmap",
                "settings",
                "--from-literal=a=b",
                "--from-literal=greeting=hello world",
            ],
            None,
        )
        .await;
    assert_eq!(out.trim(), "configmap/settings created");
    let cm: Value =
        serde_json::from_str(&k.ok(&["get", "cm", "settings", "-o", "json"], None).await).unwrap();
    assert_eq!(cm["data"], json!({"a": "b", "greeting": "hello world"}));

    let out = k.ok(&["create", "namespace", "ci"], None).await;
    assert_eq!(out.trim(), "namespace/ci created");
    let phase = k
        .ok(&["get", "ns", "ci", "-o", "jsonpath={.status.phase}"], None)
        .await;
    assert_eq!(phase, "Active");
    k.ok(
        &[
            "-n",
            "ci",
            "create",
            "secret",
            "generic",
            "rabbitmq",
            &format!("--from-literal=uri={uri}"),
        ],
        None,
    )
    .await;
    let data = k
        .ok(
            &[
                "-n",
                "ci",
                "get",
                "secret",
                "rabbitmq",
                "-o",
                "jsonpath={.data.uri}",
            ],
            None,
        )
        .await;
    assert_eq!(unbase64(&data), uri);
}

/// A Secret written with `stringData` (client-side apply, server-side apply, patch) is
/// stored and read back with `data` only, as on a real API server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_apply_of_a_secret_with_string_data_reads_back_as_data() {
    let k = setup("string-data").await;
    let manifest = |uri: &str| {
        format!(
            "apiVersion: v1
kind: Secret
metadata:
  name: rabbitmq
type: Opaque
stringData:
  uri: \"{uri}\"
"
        )
    };
    let data_uri = async || {
        let text = k
            .ok(
                &["get", "secret", "rabbitmq", "-o", "jsonpath={.data.uri}"],
                None,
            )
            .await;
        let obj: Value = serde_json::from_str(
            &k.ok(&["get", "secret", "rabbitmq", "-o", "json"], None)
                .await,
        )
        .unwrap();
        assert!(obj.get("stringData").is_none(), "{obj}");
        unbase64(&text)
    };

    let first = "amqp://guest:guest@127.0.0.1:5672/%2f";
    let out = k.ok(&["apply", "-f", "-"], Some(&manifest(first))).await;
    assert_eq!(out.trim(), "secret/rabbitmq created");
    let text = k
        .ok(
            &["get", "secret", "rabbitmq", "-o", "jsonpath={.data.uri}"],
            None,
        )
        .await;
    use base64::Engine;
    assert_eq!(
        text,
        base64::engine::general_purpose::STANDARD.encode(first)
    );
    assert_eq!(data_uri().await, first);

    // Client-side apply of a change: a strategic merge patch with stringData.
    let second = "amqp://ci:secret@rabbitmq:5672/%2f";
    let out = k.ok(&["apply", "-f", "-"], Some(&manifest(second))).await;
    assert_eq!(out.trim(), "secret/rabbitmq configured");
    assert_eq!(data_uri().await, second);

    // Server-side apply.
    let third = "amqps://ci:secret@rabbitmq:5671/ci";
    let out = k
        .ok(
            &["apply", "--server-side", "-f", "-"],
            Some(&manifest(third)),
        )
        .await;
    assert_eq!(out.trim(), "secret/rabbitmq serverside-applied");
    assert_eq!(data_uri().await, third);

    // A patch.
    k.ok(
        &[
            "patch",
            "secret",
            "rabbitmq",
            "-p",
            r#"{"stringData":{"uri":"amqp://patched"}}"#,
        ],
        None,
    )
    .await;
    assert_eq!(data_uri().await, "amqp://patched");
}
