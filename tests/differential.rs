//! The embedded API server (`testrunner_sim::start_api`) against the real
//! kube-apiserver (`testrunner_sim::control_plane`): the same requests, in the same
//! order, to both, and what clients read from the answers compared field by field.
//!
//! The requests are the ones the operator, the simulated node (`sim/src/kubelet/`) and
//! kubectl make (protobuf bodies of `kubectl create`, Table lists, `describe`'s event
//! field selector, client- and server-side apply), plus the error cases they handle. Every case names the fields it compares; status codes, the `reason`
//! and `details.kind`/`details.name` of error Status objects, and the metadata clients
//! read are compared for every case. Server-made values (uid, resourceVersion,
//! timestamps, managedFields) are not compared. One run reports every mismatch; the
//! test fails when one is not in [`KNOWN`], the short list of differences no client
//! depends on.
//!
//! Needs the real control plane's binaries: `bash tests/control-plane/build.sh` puts them
//! in `<target>/control-plane/bin`, or env `TESTRUNNER_CONTROL_PLANE` names their
//! directory. Ignored by default; `cargo test --test differential -- --include-ignored`.

use std::collections::HashMap;
use std::time::Duration;

use futures::FutureExt;
use http_body_util::BodyExt;
use k8s_pb::api::core::v1 as core;
use k8s_pb::apimachinery::pkg::apis::meta::v1 as meta;
use kube::CustomResourceExt;
use serde_json::{Value, json};
use testrunner_operator::crd::TestRunnerPool;
use testrunner_operator::pods::{self, PodSettings};
use testrunner_sim::control_plane::ControlPlane;
use testrunner_sim::kubelet::node::{MANAGER as NODE_MANAGER, node_object, node_status};
use testrunner_sim::{self as sim, ServerConfig};

mod common;
use common::{init_logs, protobuf_body, whole_control_plane_bin};

/// Name of the Node the cases register, as the simulated node does.
const NODE: &str = "diff-node";
/// A scheduler nobody runs: the real control plane's kube-scheduler leaves pods that name
/// it alone, so that only the cases bind pods.
const NO_SCHEDULER: &str = "diff-no-scheduler";
/// The media type of the Kubernetes protobuf encoding.
const PROTOBUF: &str = "application/vnd.kubernetes.protobuf";
/// JSON bodies and answers.
const JSON: &str = "application/json";
/// A JSON merge patch.
const MERGE: &str = "application/merge-patch+json";
/// A JSON patch (RFC 6902).
const JSON_PATCH: &str = "application/json-patch+json";
/// Server-side apply.
const APPLY: &str = "application/apply-patch+yaml";
/// What `kubectl get` accepts.
const TABLE: &str = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json";
/// The pools' collection.
const POOLS: &str = "/apis/testrunner.dev/v1alpha1/namespaces/default/testrunnerpools";
/// Longest wait for one answer (a watch: for its events).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for a case that waits for a status code (garbage collection, namespace
/// deletion: asynchronous on the real control plane).
const UNTIL_TIMEOUT: Duration = Duration::from_secs(90);

/// A difference between the servers that no client depends on, or that
/// docs/simulation.md lists as not modelled.
struct Known {
    /// The case; `PREFIX*` names every case whose name starts with PREFIX.
    case: &'static str,
    /// The compared field, as the report names it.
    field: &'static str,
    /// Why it may differ.
    why: &'static str,
}

/// Every difference the test accepts.
static KNOWN: &[Known] = &[
    Known {
        case: "node: register",
        field: "/spec",
        why: "the real TaintNodesByCondition admission taints a new Node not-ready (NoSchedule) \
              until its controller sees it Ready; admission plugins and scheduling are not \
              modelled (docs/simulation.md), and the node does not read its taints",
    },
    Known {
        case: "node: *",
        field: "/metadata/annotations",
        why: "node.alpha.kubernetes.io/ttl, which the real controller manager's TTL \
              controller puts on Nodes when it gets to them; no client here reads it",
    },
    Known {
        case: "namespace: delete",
        field: "?/metadata/deletionTimestamp",
        why: "a real namespace is Terminating until the namespace controller has emptied it; \
              the embedded server empties and removes it at once (not modelled: the \
              namespace lifecycle, docs/simulation.md)",
    },
    Known {
        case: "namespace: delete",
        field: "/status/phase",
        why: "Terminating on the real server, see the deletionTimestamp above",
    },
];

/// A request body.
enum Body {
    /// None.
    Empty,
    /// JSON; a string `${var}` in it is replaced by what an earlier case saved.
    Json(Value),
    /// Bytes sent as they are (protobuf, text).
    Raw(Vec<u8>),
    /// Built from what earlier cases saved (the operator's own pod).
    Built(fn(&Vars) -> Value),
}

/// What earlier answers of one server held, by name.
type Vars = HashMap<String, Value>;

/// One request to replay against both servers, and what to compare of its answers.
struct Case {
    /// Unique, shown in the report.
    name: &'static str,
    /// The HTTP method.
    method: &'static str,
    /// Path and query; `${var}` is replaced as in [`Body::Json`].
    path: String,
    /// The Content-Type header (none when empty).
    content_type: &'static str,
    /// The Accept header.
    accept: &'static str,
    /// The request body.
    body: Body,
    /// Fields compared besides the default ones (see [`fields_of`]): a JSON pointer
    /// whose `*` segments map over arrays; `?POINTER` compares presence only;
    /// `~POINTER=TEXT` compares whether the string there contains TEXT.
    compare: Vec<&'static str>,
    /// Values to keep for later cases: (name, JSON pointer; "" is the whole answer).
    save: Vec<(&'static str, &'static str)>,
    /// Repeat the request until it answers this code (or [`UNTIL_TIMEOUT`] passes).
    until: Option<u16>,
    /// A watch: read this many events, then compare their types and names.
    watch: Option<usize>,
}

impl Case {
    /// A case comparing the default fields; a JSON body is sent as `application/json`.
    fn new(name: &'static str, method: &'static str, path: impl Into<String>, body: Body) -> Self {
        let content_type = match body {
            Body::Json(_) => JSON,
            _ => "",
        };
        Self {
            name,
            method,
            path: path.into(),
            content_type,
            accept: JSON,
            body,
            compare: Vec::new(),
            save: Vec::new(),
            until: None,
            watch: None,
        }
    }

    /// GET `path`.
    fn get(name: &'static str, path: impl Into<String>) -> Self {
        Self::new(name, "GET", path, Body::Empty)
    }

    /// POST a JSON body.
    fn post(name: &'static str, path: impl Into<String>, body: Value) -> Self {
        Self::new(name, "POST", path, Body::Json(body))
    }

    /// PUT a JSON body.
    fn put(name: &'static str, path: impl Into<String>, body: Value) -> Self {
        Self::new(name, "PUT", path, Body::Json(body))
    }

    /// PATCH with a JSON body of the given patch type.
    fn patch(
        name: &'static str,
        path: impl Into<String>,
        content_type: &'static str,
        body: Value,
    ) -> Self {
        Self::new(name, "PATCH", path, Body::Json(body)).content_type(content_type)
    }

    /// DELETE without options.
    fn delete(name: &'static str, path: impl Into<String>) -> Self {
        Self::new(name, "DELETE", path, Body::Empty)
    }

    /// POST a protobuf body, as kubectl's `create` commands do.
    fn protobuf(name: &'static str, path: impl Into<String>, body: Vec<u8>) -> Self {
        Self::new(name, "POST", path, Body::Raw(body)).content_type(PROTOBUF)
    }

    /// Sends this Content-Type.
    fn content_type(mut self, content_type: &'static str) -> Self {
        self.content_type = content_type;
        self
    }

    /// Asks for a `meta.k8s.io/v1` Table, as `kubectl get` does.
    fn table(mut self) -> Self {
        self.accept = TABLE;
        self
    }

    /// Sends this JSON body (DeleteOptions of a DELETE).
    fn body(mut self, body: Value) -> Self {
        self.body = Body::Json(body);
        if self.content_type.is_empty() {
            self.content_type = JSON;
        }
        self
    }

    /// Compares these fields too (see [`Case::compare`]).
    fn compare(mut self, fields: &[&'static str]) -> Self {
        self.compare.extend_from_slice(fields);
        self
    }

    /// Keeps the value at `pointer` of this case's answer as `${var}`; an object's
    /// resourceVersion is kept as `${var-rv}` too.
    fn save(mut self, var: &'static str, pointer: &'static str) -> Self {
        self.save.push((var, pointer));
        self
    }

    /// Repeats the request until it answers `code`.
    fn until(mut self, code: u16) -> Self {
        self.until = Some(code);
        self
    }

    /// Reads `events` watch events from the answer.
    fn watch(mut self, events: usize) -> Self {
        self.watch = Some(events);
        self
    }
}

/// Protobuf metadata with a name only.
fn pb_meta(name: &str) -> Option<meta::ObjectMeta> {
    Some(meta::ObjectMeta {
        name: Some(name.into()),
        ..Default::default()
    })
}

/// Base64, as `data` holds values.
fn b64(text: &str) -> String {
    base64::Engine::encode(&base64::engine::general_purpose::STANDARD, text)
}

/// A valid pool.
fn pool(name: &str) -> Value {
    json!({
        "apiVersion": "testrunner.dev/v1alpha1", "kind": "TestRunnerPool",
        "metadata": {"name": name, "labels": {"team": "diff"}},
        "spec": {
            "image": "registry.example/runner:1",
            "command": ["sh", "-c", "sleep 1"],
            "queue": {"name": "tickets.diff", "connectionSecretRef": {"name": "rabbitmq", "key": "uri"}},
            "scaling": {"minWorkers": 0, "maxWorkers": 3},
        },
    })
}

/// A pod no scheduler takes, labelled `diff=pods`.
fn pod(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"diff": "pods"}},
        "spec": {
            "schedulerName": NO_SCHEDULER,
            "containers": [{"name": "main", "image": "registry.example/app:1"}],
        },
    })
}

/// What the node's scheduler stand-in posts to `pods/binding`.
fn binding(pod: &str, node: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Binding",
        "metadata": {"name": pod, "namespace": "default"},
        "target": {"apiVersion": "v1", "kind": "Node", "name": node},
    })
}

/// A ConfigMap with labels.
fn config_map(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "labels": labels}, "data": {"k": "v"}})
}

/// The status a running pod's node reports (as `sim/src/kubelet/pod.rs` writes it).
fn running_status() -> Value {
    let t = "2026-01-01T00:00:00Z";
    let conditions: Vec<Value> = [
        "PodReadyToStartContainers",
        "PodScheduled",
        "Initialized",
        "ContainersReady",
        "Ready",
    ]
    .iter()
    .map(|c| json!({"type": c, "status": "True", "lastTransitionTime": t}))
    .collect();
    json!({"status": {
        "phase": "Running",
        "hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}],
        "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
        "startTime": t,
        "qosClass": "BestEffort",
        "conditions": conditions,
        "containerStatuses": [{
            "name": "main", "image": "registry.example/app:1",
            "imageID": "simulated://registry.example/app:1", "containerID": "simulated://main",
            "restartCount": 0, "state": {"running": {"startedAt": t}}, "lastState": {},
            "ready": true, "started": true,
        }],
    }})
}

/// A pod no scheduler takes, labelled `diff=sidecar`: a sidecar (an init container with
/// `restartPolicy` `sidecar`, a startup and a readiness probe), an init container with a
/// startup probe unless the sidecar is one, and a container with `restartPolicy` `main`.
fn sidecar_pod(name: &str, sidecar: Value, main: Value) -> Value {
    let probe = json!({"exec": {"command": ["true"]}});
    let mut init = json!({"name": "setup", "image": "registry.example/tools:1"});
    if sidecar != "Always" {
        init["startupProbe"] = probe.clone();
    }
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"diff": "sidecar"}},
        "spec": {
            "schedulerName": NO_SCHEDULER,
            "initContainers": [
                {"name": "proxy", "image": "registry.example/proxy:1", "restartPolicy": sidecar,
                    "startupProbe": probe, "readinessProbe": probe},
                init,
            ],
            "containers": [{"name": "main", "image": "registry.example/app:1", "restartPolicy": main}],
        },
    })
}

/// The status of [`sidecar_pod`] running: the setup container done, the sidecar
/// restarted twice, started, and `ready` or not; the main container ready.
fn sidecar_status(ready: bool) -> Value {
    let t = "2026-01-01T00:00:00Z";
    let status =
        |name: &str, image: &str, state: Value, restarts: i64, ready: bool, started: bool| {
            json!({"name": name, "image": image, "imageID": format!("simulated://{image}"),
            "containerID": format!("simulated://{name}"), "restartCount": restarts,
            "state": state, "lastState": {}, "ready": ready, "started": started})
        };
    let running = json!({"running": {"startedAt": t}});
    let mut proxy = status(
        "proxy",
        "registry.example/proxy:1",
        running.clone(),
        2,
        ready,
        true,
    );
    proxy["lastState"] = json!({"terminated": {"exitCode": 1, "reason": "Error",
        "startedAt": t, "finishedAt": t, "containerID": "simulated://proxy"}});
    let done = json!({"terminated": {"exitCode": 0, "reason": "Completed",
        "startedAt": t, "finishedAt": t, "containerID": "simulated://setup"}});
    let conditions: Vec<Value> = [
        ("PodReadyToStartContainers", true),
        ("PodScheduled", true),
        ("Initialized", true),
        ("ContainersReady", ready),
        ("Ready", ready),
    ]
    .iter()
    .map(|(c, s)| json!({"type": c, "status": if *s { "True" } else { "False" }, "lastTransitionTime": t}))
    .collect();
    json!({"status": {
        "phase": "Running",
        "startTime": t,
        "conditions": conditions,
        "initContainerStatuses": [
            proxy,
            status("setup", "registry.example/tools:1", done, 0, true, false),
        ],
        "containerStatuses": [status("main", "registry.example/app:1", running, 1, true, true)],
    }})
}

/// The operator's worker pod for the pool saved as `pool`, as `controller::create_pod`
/// applies it; with a scheduler nobody runs, so that it stays unbound.
fn operator_pod(vars: &Vars) -> Value {
    let pool: TestRunnerPool =
        serde_json::from_value(vars["pool"].clone()).expect("the saved pool is a pool");
    let settings = PodSettings {
        operator_image: "registry.example/testrunner-operator:1".into(),
        report_interval: pods::REPORT_INTERVAL,
        log_format: testrunner_operator::telemetry::LogFormat::Pretty,
        outcome_queue_prefix: pods::DEFAULT_OUTCOME_QUEUE_PREFIX.into(),
    };
    let pod = pods::build_pod(&pool, "diff-pool-worker", "rev1", &settings);
    let mut pod = serde_json::to_value(pod).expect("a pod serializes");
    pod["spec"]["schedulerName"] = json!(NO_SCHEDULER);
    pod
}

/// The requests, in order.
fn cases() -> Vec<Case> {
    let ns = "/api/v1/namespaces/default";
    let node = format!("/api/v1/nodes/{NODE}");
    let lease = format!(
        "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{NODE}?fieldManager={NODE_MANAGER}&force=true"
    );
    let lease_body = |renew: &str| {
        json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": NODE, "namespace": "kube-node-lease",
                "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": NODE, "uid": "${node-uid}"}]},
            "spec": {"holderIdentity": NODE, "leaseDurationSeconds": 40, "renewTime": renew},
        })
    };
    let pool_path = |name: &str| format!("{POOLS}/{name}");
    let secret = core::Secret {
        metadata: pb_meta("diff-pb-secret"),
        data: [("user".to_string(), b"guest".to_vec())].into(),
        ..Default::default()
    };
    let config = core::ConfigMap {
        metadata: pb_meta("diff-pb-config"),
        data: [("a.conf".to_string(), "x = 1\n".to_string())].into(),
        binary_data: [("blob".to_string(), vec![0u8, 1, 2])].into(),
        ..Default::default()
    };
    let namespace = core::Namespace {
        metadata: pb_meta("diff-ns"),
        ..Default::default()
    };
    let event = json!({
        "apiVersion": "events.k8s.io/v1", "kind": "Event",
        "metadata": {"name": "diff-pool.scaled", "namespace": "default"},
        "eventTime": "2026-01-01T00:00:00.000000Z",
        "reportingController": "testrunner-operator",
        "reportingInstance": "testrunner-operator-diff",
        "action": "Scale", "reason": "ScaledUp", "type": "Normal",
        "note": "scaled up to 1 worker",
        "regarding": {"apiVersion": "testrunner.dev/v1alpha1", "kind": "TestRunnerPool",
            "name": "diff-pool", "namespace": "default", "uid": "${pool-uid}"},
    });
    let cm_path = |name: &str| format!("{ns}/configmaps/{name}");
    let selected = |selector: &str| format!("{ns}/configmaps?labelSelector={selector}");
    vec![
        // The simulated node: its Node, status and Lease.
        Case::post("node: register", "/api/v1/nodes", node_object(NODE))
            .compare(&["/spec"])
            .save("node-uid", "/metadata/uid"),
        Case::post("node: register again", "/api/v1/nodes", node_object(NODE)),
        Case::patch(
            "node: status merge patch",
            format!("{node}/status"),
            MERGE,
            json!({"status": node_status(NODE, "2026-01-01T00:00:00Z", 10250)}),
        )
        .compare(&[
            "/status/conditions/*/type",
            "/status/conditions/*/status",
            "/status/addresses",
            "/status/capacity",
            "/status/nodeInfo/kubeletVersion",
        ]),
        Case::patch(
            "lease: server-side apply (create)",
            &lease,
            APPLY,
            lease_body("2026-01-01T00:00:00.000000Z"),
        )
        .compare(&["/spec"]),
        Case::patch(
            "lease: server-side apply (renew)",
            &lease,
            APPLY,
            lease_body("2026-01-01T00:00:10.000000Z"),
        )
        .compare(&["/spec"]),
        // The node's pods: bind, watch, status, deletion.
        Case::get("pods: list before", format!("{ns}/pods?labelSelector=diff%3Dpods"))
            .save("pods-rv", "/metadata/resourceVersion"),
        Case::post("pod: create", format!("{ns}/pods"), pod("diff-pod-a"))
            .compare(&[
                "/spec/nodeName",
                "/spec/schedulerName",
                "/spec/containers/*/name",
                "/status/phase",
                "/status/qosClass",
            ])
            .save("pod-a-uid", "/metadata/uid"),
        Case::get(
            "pods: pending, all namespaces (fieldSelector spec.nodeName=)",
            "/api/v1/pods?fieldSelector=spec.nodeName%3D&labelSelector=diff%3Dpods",
        ),
        Case::post(
            "pod: binding",
            format!("{ns}/pods/diff-pod-a/binding"),
            binding("diff-pod-a", NODE),
        )
        .compare(&["/status", "/code"]),
        Case::post(
            "pod: second binding of a bound pod",
            format!("{ns}/pods/diff-pod-a/binding"),
            binding("diff-pod-a", "another-node"),
        ),
        Case::get(
            "pods: the node's (fieldSelector spec.nodeName=NODE)",
            format!("/api/v1/pods?fieldSelector=spec.nodeName%3D{NODE}"),
        )
        .compare(&["/items/*/spec/nodeName"]),
        Case::get("pod: get bound", format!("{ns}/pods/diff-pod-a")).compare(&[
            "/spec/nodeName",
            "/status/phase",
            "/status/conditions/*/type",
            "/status/conditions/*/status",
        ]),
        Case::patch(
            "pod: status merge patch (running)",
            format!("{ns}/pods/diff-pod-a/status"),
            MERGE,
            running_status(),
        )
        .compare(&[
            "/spec/nodeName",
            "/status/phase",
            "/status/podIP",
            "/status/podIPs",
            "/status/conditions/*/type",
            "/status/containerStatuses/*/ready",
        ]),
        Case::get(
            "pods: watch from a version, fieldSelector status.phase=Pending",
            format!(
                "{ns}/pods?watch=true&resourceVersion=${{pods-rv}}&labelSelector=diff%3Dpods&fieldSelector=status.phase%3DPending&timeoutSeconds=20"
            ),
        )
        .watch(3),
        Case::get("pods: kubectl get (Table)", format!("{ns}/pods?labelSelector=diff%3Dpods&limit=500"))
            .table()
            .compare(&[
                "/columnDefinitions/*/name",
                "/columnDefinitions/*/priority",
                "/rows/*/cells/0",
                "/rows/*/cells/1",
                "/rows/*/cells/2",
                "/rows/*/cells/3",
                "/rows/*/cells/5",
                "/rows/*/cells/6",
            ]),
        Case::delete("pod: graceful delete of a bound pod", format!("{ns}/pods/diff-pod-a"))
            .compare(&["/status/phase"]),
        Case::get("pod: terminating", format!("{ns}/pods/diff-pod-a")),
        Case::delete(
            "pod: delete with a wrong uid precondition",
            format!("{ns}/pods/diff-pod-a"),
        )
        .body(json!({"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
            "preconditions": {"uid": "00000000-0000-0000-0000-000000000000"}})),
        Case::delete(
            "pod: final delete (gracePeriodSeconds=0, uid precondition)",
            format!("{ns}/pods/diff-pod-a"),
        )
        .body(json!({"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
            "preconditions": {"uid": "${pod-a-uid}"}})),
        Case::get("pod: gone after the final delete", format!("{ns}/pods/diff-pod-a")),
        Case::get(
            "pods: the node's watch from a version (fieldSelector spec.nodeName=NODE)",
            format!(
                "/api/v1/pods?watch=true&resourceVersion=${{pods-rv}}&fieldSelector=spec.nodeName%3D{NODE}&timeoutSeconds=5"
            ),
        )
        .watch(5),
        Case::get("pods: list before the unbound pod", format!("{ns}/pods?labelSelector=diff%3Dpods"))
            .save("pods-b-rv", "/metadata/resourceVersion"),
        Case::post("pod: create unbound", format!("{ns}/pods"), pod("diff-pod-b")),
        Case::delete("pod: delete of an unbound pod", format!("{ns}/pods/diff-pod-b")),
        Case::get("pod: unbound pod gone at once", format!("{ns}/pods/diff-pod-b")),
        Case::get(
            "pods: watch the unbound pod's deletion",
            format!(
                "{ns}/pods?watch=true&resourceVersion=${{pods-b-rv}}&fieldSelector=metadata.name%3Ddiff-pod-b&timeoutSeconds=5"
            ),
        )
        .watch(3),
        // Native sidecars: what the server takes and refuses, and how kubectl counts them.
        Case::post(
            "pod: invalid container restart policies and probes of an init container",
            format!("{ns}/pods"),
            sidecar_pod("diff-pod-invalid", json!("Sometimes"), json!("Sometimes")),
        )
        .compare(&["/message", "/details/causes"]),
        Case::post(
            "pod: create with a sidecar",
            format!("{ns}/pods"),
            sidecar_pod("diff-pod-sidecar", json!("Always"), json!("OnFailure")),
        )
        .compare(&[
            "/spec/initContainers/*/restartPolicy",
            "/spec/containers/*/restartPolicy",
        ]),
        Case::patch(
            "pod: status merge patch (sidecar started, not ready)",
            format!("{ns}/pods/diff-pod-sidecar/status"),
            MERGE,
            sidecar_status(false),
        )
        .compare(&["/status/initContainerStatuses/*/started"]),
        Case::get("pods: kubectl get, a sidecar not ready (Table)", format!("{ns}/pods?labelSelector=diff%3Dsidecar&limit=500"))
            .table()
            .compare(&["/rows/*/cells/0", "/rows/*/cells/1", "/rows/*/cells/2", "/rows/*/cells/3"]),
        Case::patch(
            "pod: status merge patch (sidecar ready)",
            format!("{ns}/pods/diff-pod-sidecar/status"),
            MERGE,
            sidecar_status(true),
        ),
        Case::get("pods: kubectl get, a sidecar ready (Table)", format!("{ns}/pods?labelSelector=diff%3Dsidecar&limit=500"))
            .table()
            .compare(&["/rows/*/cells/0", "/rows/*/cells/1", "/rows/*/cells/2", "/rows/*/cells/3"]),
        Case::delete("pod: delete the sidecar pod", format!("{ns}/pods/diff-pod-sidecar"))
            .body(json!({"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0})),
        // What kubectl creates, in protobuf.
        Case::protobuf(
            "secret: kubectl create secret generic (protobuf)",
            format!("{ns}/secrets?fieldManager=kubectl-create&fieldValidation=Strict"),
            protobuf_body("v1", "Secret", &secret),
        )
        .compare(&["/data", "/type"]),
        Case::get("secret: get", format!("{ns}/secrets/diff-pb-secret")).compare(&["/data", "/type"]),
        Case::protobuf(
            "configmap: kubectl create configmap (protobuf)",
            format!("{ns}/configmaps?fieldManager=kubectl-create&fieldValidation=Strict"),
            protobuf_body("v1", "ConfigMap", &config),
        )
        .compare(&["/data", "/binaryData"]),
        Case::get("configmap: get", cm_path("diff-pb-config")).compare(&["/data", "/binaryData"]),
        Case::post(
            "secret: create with stringData",
            format!("{ns}/secrets"),
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "diff-string-data"},
                "data": {"keep": b64("old"), "uri": b64("loses")},
                "stringData": {"uri": "amqp://guest:guest@127.0.0.1:5672/%2f"}}),
        )
        .compare(&["/data", "/stringData", "/type"]),
        Case::get("secret: stringData reads back as data", format!("{ns}/secrets/diff-string-data"))
            .compare(&["/data", "/stringData", "/type"]),
        // A namespace the cases create (kubectl create namespace) and delete.
        Case::protobuf(
            "namespace: kubectl create namespace (protobuf)",
            "/api/v1/namespaces?fieldManager=kubectl-create&fieldValidation=Strict",
            protobuf_body("v1", "Namespace", &namespace),
        )
        .compare(&["/status/phase"]),
        Case::post(
            "configmap: create in the new namespace",
            "/api/v1/namespaces/diff-ns/configmaps",
            config_map("diff-in-ns", json!({})),
        ),
        Case::delete("namespace: delete", "/api/v1/namespaces/diff-ns").compare(&["/status/phase"]),
        Case::get(
            "configmap: gone with its namespace",
            "/api/v1/namespaces/diff-ns/configmaps/diff-in-ns",
        )
        .until(404),
        Case::get("namespace: gone", "/api/v1/namespaces/diff-ns").until(404),
        // The pool: create, errors, patches, status.
        Case::post("pool: create", POOLS, pool("diff-pool"))
            .compare(&["/spec", "/status", "/metadata/generation"])
            .save("pool-uid", "/metadata/uid")
            .save("pool-created", ""),
        Case::post("pool: create a duplicate", POOLS, pool("diff-pool")),
        Case::get("pool: get a missing one", pool_path("diff-missing")),
        Case::post("pool: invalid (minWorkers > maxWorkers)", POOLS, {
            let mut p = pool("diff-invalid");
            p["spec"]["scaling"] = json!({"minWorkers": 5, "maxWorkers": 2});
            p
        })
        .compare(&["~/message=spec.scaling"]),
        Case::post("pool: invalid (no image)", POOLS, {
            let mut p = pool("diff-invalid");
            p["spec"].as_object_mut().unwrap().remove("image");
            p
        })
        .compare(&["~/message=spec.image"]),
        Case::patch(
            "pool: merge patch",
            pool_path("diff-pool"),
            MERGE,
            json!({"metadata": {"labels": {"tier": "a"}}, "spec": {"image": "registry.example/runner:2"}}),
        )
        .compare(&["/spec", "/metadata/generation"]),
        Case::patch(
            "pool: JSON patch",
            pool_path("diff-pool"),
            JSON_PATCH,
            json!([
                {"op": "replace", "path": "/spec/scaling/maxWorkers", "value": 7},
                {"op": "add", "path": "/metadata/annotations", "value": {"note": "patched"}},
            ]),
        )
        .compare(&["/spec", "/metadata/generation"]),
        Case::patch(
            "pool: JSON patch whose test fails",
            pool_path("diff-pool"),
            JSON_PATCH,
            json!([{"op": "test", "path": "/spec/image", "value": "nope"}]),
        ),
        Case::patch(
            "pool: merge patch of status through the main resource",
            pool_path("diff-pool"),
            MERGE,
            json!({"status": {"phase": "Running", "observedGeneration": 3}}),
        )
        .compare(&["/status", "/metadata/generation"]),
        Case::patch(
            "pool: merge patch of the status subresource",
            format!("{}/status", pool_path("diff-pool")),
            MERGE,
            json!({"spec": {"image": "registry.example/ignored:1"},
                "status": {"phase": "Scaling", "observedGeneration": 3}}),
        )
        .compare(&["/spec/image", "/status", "/metadata/generation"]),
        Case::patch(
            "pool: server-side apply of status (the operator)",
            format!(
                "{}/status?fieldManager=testrunner-operator&force=true",
                pool_path("diff-pool")
            ),
            APPLY,
            json!({"apiVersion": "testrunner.dev/v1alpha1", "kind": "TestRunnerPool",
                "status": {"phase": "Idle", "observedGeneration": 3}}),
        )
        .compare(&["/spec/image", "/status", "/metadata/generation"]),
        Case::put(
            "pool: update with a stale resourceVersion",
            pool_path("diff-pool"),
            json!("${pool-created}"),
        ),
        Case::patch(
            "pool: merge patch with a stale resourceVersion",
            pool_path("diff-pool"),
            MERGE,
            json!({"metadata": {"resourceVersion": "${pool-created-rv}"}, "spec": {"image": "x:1"}}),
        ),
        Case::get("pool: kubectl get (Table)", format!("{POOLS}?limit=500"))
            .table()
            .compare(&[
                "/columnDefinitions/*/name",
                "/columnDefinitions/*/priority",
                "/rows/*/cells/0",
                "/rows/*/cells/1",
                "/rows/*/cells/2",
                "/rows/*/cells/3",
                "/rows/*/cells/4",
                "/rows/*/cells/5",
            ]),
        Case::patch(
            "pool: kubectl apply --server-side (create)",
            format!("{}?fieldManager=kubectl&fieldValidation=Strict&force=false", pool_path("diff-kubectl")),
            APPLY,
            pool("diff-kubectl"),
        )
        .compare(&["/spec"]),
        Case::post("pool: create with an unknown field (fieldValidation=Strict)", format!("{POOLS}?fieldValidation=Strict"), {
            let mut p = pool("diff-strict");
            p["spec"]["bogus"] = json!(1);
            p
        })
        .compare(&["~/message=spec.bogus"]),
        Case::patch(
            "configmap: strategic merge patch (kubectl apply)",
            format!("{}?fieldManager=kubectl-client-side-apply&fieldValidation=Strict", cm_path("diff-pb-config")),
            "application/strategic-merge-patch+json",
            json!({"metadata": {"annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}}, "data": {"b.conf": "y = 2\n"}}),
        )
        .compare(&["/data"]),
        Case::get("pool: get", pool_path("diff-pool"))
            .compare(&["/spec", "/status", "/metadata/generation"])
            .save("pool", ""),
        // Server-side apply conflicts between managers.
        Case::patch(
            "pool: server-side apply (create)",
            format!("{}?fieldManager=diff-a", pool_path("diff-ssa")),
            APPLY,
            pool("diff-ssa"),
        )
        .compare(&["/spec"]),
        Case::patch(
            "pool: server-side apply by another manager (conflict)",
            format!("{}?fieldManager=diff-b", pool_path("diff-ssa")),
            APPLY,
            {
                let mut p = pool("diff-ssa");
                p["spec"]["image"] = json!("registry.example/runner:b");
                p
            },
        )
        .compare(&["/details/causes/*/field"]),
        Case::patch(
            "pool: server-side apply by another manager (force)",
            format!("{}?fieldManager=diff-b&force=true", pool_path("diff-ssa")),
            APPLY,
            {
                let mut p = pool("diff-ssa");
                p["spec"]["image"] = json!("registry.example/runner:b");
                p
            },
        )
        .compare(&["/spec"]),
        // The operator's writes.
        Case::patch(
            "configmap: server-side apply with an owner (the operator's quarantine list)",
            format!(
                "{}?fieldManager=testrunner-operator&force=true",
                cm_path("diff-pool-quarantine")
            ),
            APPLY,
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "diff-pool-quarantine", "namespace": "default",
                    "labels": pods::selector_labels("diff-pool"),
                    "ownerReferences": [{"apiVersion": "testrunner.dev/v1alpha1", "kind": "TestRunnerPool",
                        "name": "diff-pool", "uid": "${pool-uid}", "controller": true, "blockOwnerDeletion": true}]},
                "data": {"tickets": ""}}),
        )
        .compare(&["/data"]),
        Case::new(
            "pod: server-side apply (the operator's worker pod)",
            "PATCH",
            format!("{ns}/pods/diff-pool-worker?fieldManager=testrunner-operator&force=true"),
            Body::Built(operator_pod),
        )
        .content_type(APPLY)
        .compare(&[
            "/spec/containers/*/name",
            "/spec/initContainers/*/name",
            "/spec/restartPolicy",
            "/spec/terminationGracePeriodSeconds",
            "/status/phase",
        ]),
        Case::get(
            "pods: the operator's label selector",
            format!("{ns}/pods?labelSelector={}", pods::selector("diff-pool")),
        ),
        Case::delete(
            "pod: the operator deletes an unbound worker",
            format!("{ns}/pods/diff-pool-worker"),
        ),
        // Events: the operator writes events.k8s.io/v1, kubectl describe reads core/v1.
        Case::post(
            "event: create through events.k8s.io/v1",
            "/apis/events.k8s.io/v1/namespaces/default/events",
            event,
        )
        .compare(&[
            "/regarding/kind",
            "/regarding/name",
            "/note",
            "/reason",
            "/type",
            "/action",
            "/reportingController",
            "/reportingInstance",
        ]),
        Case::get(
            "events: core/v1 with kubectl describe's field selector",
            format!(
                "{ns}/events?fieldSelector=involvedObject.name%3Ddiff-pool,involvedObject.namespace%3Ddefault,involvedObject.kind%3DTestRunnerPool,involvedObject.uid%3D${{pool-uid}}&limit=500"
            ),
        )
        .compare(&[
            "/items/*/involvedObject/kind",
            "/items/*/involvedObject/name",
            "/items/*/message",
            "/items/*/reason",
            "/items/*/type",
            "/items/*/action",
            "/items/*/reportingComponent",
            "/items/*/reportingInstance",
        ]),
        // Garbage collection of the quarantine list with its pool.
        Case::delete("pool: delete", pool_path("diff-pool")),
        Case::get(
            "configmap: garbage collected with its owner",
            cm_path("diff-pool-quarantine"),
        )
        .until(404),
        // Selectors on lists.
        Case::post(
            "configmap: create selector a",
            format!("{ns}/configmaps"),
            config_map("diff-sel-a", json!({"app": "sel", "tier": "a"})),
        ),
        Case::post(
            "configmap: create selector b",
            format!("{ns}/configmaps"),
            config_map("diff-sel-b", json!({"app": "sel", "tier": "b"})),
        ),
        Case::post(
            "configmap: create selector c",
            format!("{ns}/configmaps"),
            config_map("diff-sel-c", json!({"app": "sel"})),
        ),
        Case::get("configmaps: app=sel,tier!=b", selected("app%3Dsel,tier!%3Db")),
        Case::get("configmaps: tier in (a,b)", selected("tier%20in%20(a,b)")),
        Case::get("configmaps: app=sel,!tier", selected("app%3Dsel,!tier")),
        Case::get("configmaps: app==sel,tier notin (a)", selected("app%3D%3Dsel,tier%20notin%20(a)")),
        Case::get(
            "configmaps: fieldSelector metadata.name=diff-sel-b",
            format!("{ns}/configmaps?labelSelector=app%3Dsel&fieldSelector=metadata.name%3Ddiff-sel-b"),
        ),
        Case::get(
            "configmaps: fieldSelector metadata.name!=diff-sel-a",
            format!("{ns}/configmaps?labelSelector=app%3Dsel&fieldSelector=metadata.name!%3Ddiff-sel-a"),
        ),
        // Optimistic concurrency on a ConfigMap.
        Case::post(
            "configmap: create",
            format!("{ns}/configmaps"),
            config_map("diff-rv", json!({})),
        )
        .save("cm-rv", "/metadata/resourceVersion"),
        Case::get("configmap: get created", cm_path("diff-rv")).compare(&["/data"]),
        Case::put(
            "configmap: update with the current resourceVersion",
            cm_path("diff-rv"),
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "diff-rv", "resourceVersion": "${cm-rv}"}, "data": {"k": "2"}}),
        )
        .compare(&["/data"]),
        Case::put(
            "configmap: update with a stale resourceVersion",
            cm_path("diff-rv"),
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "diff-rv", "resourceVersion": "${cm-rv}"}, "data": {"k": "3"}}),
        ),
        Case::put(
            "configmap: update without a resourceVersion",
            cm_path("diff-rv"),
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "diff-rv"}, "data": {"k": "4"}}),
        )
        .compare(&["/data"]),
        Case::post(
            "configmap: create a duplicate",
            format!("{ns}/configmaps"),
            config_map("diff-rv", json!({})),
        ),
        Case::get("configmap: get a missing one", cm_path("diff-missing")),
        // Deletion answers: the object, or a Status when it went at once.
        Case::delete("configmap: delete", cm_path("diff-sel-c")),
        Case::delete("secret: delete", format!("{ns}/secrets/diff-string-data")),
        Case::post(
            "configmap: create with a finalizer",
            format!("{ns}/configmaps"),
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "diff-held", "finalizers": ["diff.example/hold"]}}),
        ),
        Case::delete("configmap: delete with a finalizer", cm_path("diff-held")),
        Case::get("configmap: held by its finalizer", cm_path("diff-held")),
        Case::patch(
            "configmap: remove the finalizer",
            cm_path("diff-held"),
            MERGE,
            json!({"metadata": {"finalizers": null}}),
        ),
        Case::get("configmap: gone without its finalizer", cm_path("diff-held")).until(404),
        // Unknown paths, media types, namespaces.
        Case::get("unknown resource", format!("{ns}/widgets")),
        Case::get("unknown group", "/apis/nowhere.example/v1/things"),
        Case::get("unknown group (discovery)", "/apis/nowhere.example"),
        Case::get(
            "unknown version of a served group",
            "/apis/testrunner.dev/v9/namespaces/default/testrunnerpools",
        ),
        Case::get("unknown subresource", format!("{ns}/pods/diff-pod-a/widgets")),
        Case::get("unknown path", "/nothing/here"),
        Case::patch(
            "patch with an unsupported content type",
            cm_path("diff-rv"),
            "text/plain",
            json!({"data": {"k": "5"}}),
        ),
        Case::post(
            "configmap: create in a missing namespace",
            "/api/v1/namespaces/diff-missing/configmaps",
            config_map("diff-nowhere", json!({})),
        ),
        Case::get(
            "configmap: get in a missing namespace",
            "/api/v1/namespaces/diff-missing/configmaps/diff-nowhere",
        ),
        Case::delete("node: delete", node),
    ]
}

/// An answer: its status code, its body (JSON, or the text as a string), and for a
/// watch the events read.
struct Answer {
    code: u16,
    body: Value,
    events: Vec<Value>,
}

/// `text` with every `${var}` replaced by the saved value (a string as it is).
fn substitute(text: &str, vars: &Vars) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        let Some(len) = rest[start..].find('}') else {
            break;
        };
        let var = &rest[start + 2..start + len];
        out.push_str(&rest[..start]);
        match vars.get(var) {
            Some(Value::String(s)) => out.push_str(s),
            Some(other) => out.push_str(&other.to_string()),
            None => panic!("${{{var}}} is used before a case saved it"),
        }
        rest = &rest[start + len + 1..];
    }
    out.push_str(rest);
    out
}

/// `body` with `${var}` replaced in every string; a string that is only `${var}`
/// becomes the saved value itself.
fn substitute_json(body: &Value, vars: &Vars) -> Value {
    match body {
        Value::String(s) => match s.strip_prefix("${").and_then(|v| v.strip_suffix('}')) {
            Some(var) if !var.contains('}') => vars
                .get(var)
                .cloned()
                .unwrap_or_else(|| panic!("${{{var}}} is used before a case saved it")),
            _ => Value::String(substitute(s, vars)),
        },
        Value::Array(items) => {
            Value::Array(items.iter().map(|v| substitute_json(v, vars)).collect())
        }
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), substitute_json(v, vars)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Sends `case` once to a server.
async fn send_once(client: &kube::Client, case: &Case, vars: &Vars) -> Result<Answer, String> {
    let body = match &case.body {
        Body::Empty => Vec::new(),
        Body::Json(v) => substitute_json(v, vars).to_string().into_bytes(),
        Body::Raw(bytes) => bytes.clone(),
        Body::Built(build) => build(vars).to_string().into_bytes(),
    };
    let mut request = http::Request::builder()
        .method(case.method)
        .uri(substitute(&case.path, vars))
        .header("accept", case.accept);
    if !case.content_type.is_empty() {
        request = request.header("content-type", case.content_type);
    }
    let request = request
        .body(kube::client::Body::from(body))
        .map_err(|e| format!("bad request: {e}"))?;
    let read = async {
        let response = client
            .send(request)
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        let code = response.status().as_u16();
        let mut body = response.into_body();
        let mut bytes = Vec::new();
        let mut events = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("reading the answer failed: {e}"))?;
            if let Ok(data) = frame.into_data() {
                bytes.extend_from_slice(&data);
            }
            if let Some(wanted) = case.watch {
                while let Some(end) = bytes.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = bytes.drain(..=end).collect();
                    if let Ok(event) = serde_json::from_slice::<Value>(&line) {
                        events.push(event);
                    }
                }
                if events.len() >= wanted {
                    break;
                }
            }
        }
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Ok(Answer { code, body, events })
    };
    tokio::time::timeout(ANSWER_TIMEOUT, read)
        .await
        .map_err(|_| format!("no answer within {ANSWER_TIMEOUT:?}"))?
}

/// Sends `case` to a server (again, until its awaited code or the deadline) and saves
/// what the case keeps.
async fn send(client: &kube::Client, case: &Case, vars: &mut Vars) -> Result<Answer, String> {
    let deadline = tokio::time::Instant::now() + UNTIL_TIMEOUT;
    let answer = loop {
        let answer = send_once(client, case, vars).await?;
        match case.until {
            Some(code) if answer.code != code && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            _ => break answer,
        }
    };
    for (var, pointer) in &case.save {
        if let Some(v) = answer.body.pointer(pointer) {
            vars.insert(var.to_string(), v.clone());
            if let Some(rv) = v.pointer("/metadata/resourceVersion") {
                vars.insert(format!("{var}-rv"), rv.clone());
            }
        }
    }
    Ok(answer)
}

/// The value at `pointer`, where a `*` segment maps over an array's items.
fn at(v: &Value, segments: &[&str]) -> Value {
    match segments.split_first() {
        None => v.clone(),
        Some((&"*", rest)) => Value::Array(
            v.as_array()
                .map(|items| items.iter().map(|x| at(x, rest)).collect())
                .unwrap_or_default(),
        ),
        Some((key, rest)) => {
            let key = key.replace("~1", "/").replace("~0", "~");
            match v {
                Value::Object(map) => map.get(&key).map(|x| at(x, rest)).unwrap_or(Value::Null),
                Value::Array(items) => key
                    .parse::<usize>()
                    .ok()
                    .and_then(|i| items.get(i))
                    .map(|x| at(x, rest))
                    .unwrap_or(Value::Null),
                _ => Value::Null,
            }
        }
    }
}

/// Go clients read an empty map or list as an absent one: both become null, and keys
/// whose value is null go.
fn normalize(v: Value) -> Value {
    match v {
        Value::Object(map) => {
            let map: serde_json::Map<String, Value> = map
                .into_iter()
                .map(|(k, v)| (k, normalize(v)))
                .filter(|(_, v)| !v.is_null())
                .collect();
            if map.is_empty() {
                Value::Null
            } else {
                Value::Object(map)
            }
        }
        Value::Array(items) if items.is_empty() => Value::Null,
        Value::Array(items) => Value::Array(items.into_iter().map(normalize).collect()),
        other => other,
    }
}

/// What a field spec (see [`Case::compare`]) reads from an answer.
fn extract(body: &Value, spec: &str) -> Value {
    let segments = |p: &str| -> Vec<String> { p.split('/').skip(1).map(String::from).collect() };
    let value = |p: &str| {
        let segs = segments(p);
        let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
        normalize(at(body, &segs))
    };
    if let Some(p) = spec.strip_prefix('?') {
        json!(!value(p).is_null())
    } else if let Some(rest) = spec.strip_prefix('~') {
        let (p, text) = rest.split_once('=').expect("~POINTER=TEXT");
        json!(value(p).as_str().is_some_and(|s| s.contains(text)))
    } else {
        value(spec)
    }
}

/// Fields of an error Status.
const STATUS_FIELDS: &[&str] = &[
    "/kind",
    "/status",
    "/code",
    "/reason",
    "/details/kind",
    "/details/name",
];
/// Fields of a list.
const LIST_FIELDS: &[&str] = &["/kind", "/apiVersion", "/items/*/metadata/name"];
/// Fields of an object.
const OBJECT_FIELDS: &[&str] = &[
    "/kind",
    "/apiVersion",
    "/metadata/name",
    "/metadata/namespace",
    "/metadata/labels",
    "/metadata/annotations",
    "/metadata/ownerReferences",
    "/metadata/finalizers",
    "?/metadata/deletionTimestamp",
    "/metadata/deletionGracePeriodSeconds",
];

/// The fields compared for one case: the code, the default fields of what either server
/// answered (a Status, a list, an object), then the case's own.
fn fields_of(case: &Case, answers: [&Answer; 2]) -> Vec<(String, [Value; 2])> {
    let mut fields = vec![("code".to_string(), answers.map(|a| json!(a.code)))];
    if case.watch.is_some() {
        let events = answers.map(|a| {
            json!(
                a.events
                    .iter()
                    .map(|e| format!(
                        "{} {}",
                        e["type"].as_str().unwrap_or("?"),
                        e.pointer("/object/metadata/name")
                            .and_then(Value::as_str)
                            .unwrap_or("?")
                    ))
                    .collect::<Vec<_>>()
            )
        });
        fields.push(("events".into(), events));
    }
    let shape = |f: fn(&Value) -> bool| answers.iter().any(|a| f(&a.body));
    let mut specs: Vec<&str> = Vec::new();
    if shape(|b| b["kind"] == "Status") {
        specs.extend(STATUS_FIELDS);
    }
    if shape(|b| b["kind"].as_str().is_some_and(|k| k.ends_with("List"))) {
        specs.extend(LIST_FIELDS);
    }
    if shape(|b| b["kind"] != "Status" && b.get("metadata").is_some() && b.get("items").is_none()) {
        specs.extend(OBJECT_FIELDS);
    }
    if case.watch.is_none() && shape(|b| !b.is_object()) {
        // Not JSON: the text.
        specs.push("");
    }
    specs.extend(&case.compare);
    let mut seen = Vec::new();
    for spec in specs {
        if seen.contains(&spec) {
            continue;
        }
        seen.push(spec);
        let values = answers.map(|a| {
            if spec.is_empty() {
                a.body.clone()
            } else {
                extract(&a.body, spec)
            }
        });
        fields.push((
            if spec.is_empty() {
                "body".into()
            } else {
                spec.into()
            },
            values,
        ));
    }
    fields
}

/// `v` with every uid a case saved (a variable named `*-uid`) replaced by its name:
/// the servers give the same object different uids.
fn anonymize(v: Value, vars: &Vars) -> Value {
    match v {
        Value::String(s) => Value::String(
            vars.iter()
                .find(|(name, saved)| name.ends_with("-uid") && saved.as_str() == Some(s.as_str()))
                .map(|(name, _)| format!("${{{name}}}"))
                .unwrap_or(s),
        ),
        Value::Array(items) => {
            Value::Array(items.into_iter().map(|x| anonymize(x, vars)).collect())
        }
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, x)| (k, anonymize(x, vars)))
                .collect(),
        ),
        other => other,
    }
}

/// One difference.
struct Mismatch {
    case: &'static str,
    field: String,
    embedded: Value,
    real: Value,
}

/// Replays every case against both servers, in order; returns every difference.
async fn run(cases: &[Case], embedded: &kube::Client, real: &kube::Client) -> Vec<Mismatch> {
    for (i, case) in cases.iter().enumerate() {
        assert!(
            cases[..i].iter().all(|c| c.name != case.name),
            "two cases are named {:?}",
            case.name
        );
    }
    let mut vars: [Vars; 2] = Default::default();
    let mut mismatches = Vec::new();
    for case in cases {
        let mut answers = Vec::new();
        for (client, vars) in [embedded, real].into_iter().zip(vars.iter_mut()) {
            let answer = send(client, case, vars).await.unwrap_or_else(|e| Answer {
                code: 0,
                body: json!(e),
                events: Vec::new(),
            });
            answers.push(answer);
        }
        eprintln!("{:<72} {} {}", case.name, answers[0].code, answers[1].code);
        for (field, [embedded, real]) in fields_of(case, [&answers[0], &answers[1]]) {
            let (embedded, real) = (anonymize(embedded, &vars[0]), anonymize(real, &vars[1]));
            if embedded != real {
                mismatches.push(Mismatch {
                    case: case.name,
                    field,
                    embedded,
                    real,
                });
            }
        }
    }
    mismatches
}

/// The allow-list entry that covers `m`, if any.
fn known(m: &Mismatch) -> Option<&'static Known> {
    KNOWN.iter().find(|k| {
        let case = match k.case.strip_suffix('*') {
            Some(prefix) => m.case.starts_with(prefix),
            None => k.case == m.case,
        };
        case && k.field == m.field
    })
}

#[tokio::test]
#[ignore = "needs the real control plane: bash tests/control-plane/build.sh, then cargo test -- --include-ignored"]
async fn the_embedded_server_answers_as_the_real_one() {
    init_logs();
    let bin = whole_control_plane_bin();

    let embedded = common::api_server(ServerConfig::default()).await;
    let work = std::env::temp_dir().join(format!("testrunner-differential-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let plane = ControlPlane::start(&bin, &work).await.unwrap_or_else(|e| {
        panic!(
            "the real control plane did not start from {}: {e}",
            bin.display()
        )
    });

    let cases = cases();
    let outcome = std::panic::AssertUnwindSafe(async {
        let real = plane.admin_client().await.expect("an admin client");
        sim::apply_crd(&real, &TestRunnerPool::crd())
            .await
            .expect("the CRD is Established");
        run(&cases, &embedded.client(), &real).await
    })
    .catch_unwind()
    .await;
    plane.stop().await;
    embedded.stop();
    let mismatches = outcome.unwrap_or_else(|panic| std::panic::resume_unwind(panic));

    let mut report = String::new();
    let mut unexpected = 0;
    for m in &mismatches {
        let verdict = match known(m) {
            Some(k) => format!("known: {}", k.why),
            None => {
                unexpected += 1;
                "UNEXPECTED".to_string()
            }
        };
        report.push_str(&format!(
            "\n{} | {}\n    embedded: {}\n    real:     {}\n    {verdict}",
            m.case, m.field, m.embedded, m.real
        ));
    }
    let unused: Vec<String> = KNOWN
        .iter()
        .filter(|k| {
            !mismatches
                .iter()
                .any(|m| known(m).is_some_and(|used| std::ptr::eq(used, *k)))
        })
        .map(|k| format!("{} | {}", k.case, k.field))
        .collect();
    eprintln!(
        "{} cases, {} differences ({unexpected} unexpected){report}",
        cases.len(),
        mismatches.len()
    );
    if !unused.is_empty() {
        eprintln!("allow-list entries no difference used: {unused:?}");
    }
    assert_eq!(
        unexpected, 0,
        "the embedded API server answers differently from the real one:{report}"
    );
}
