//! Request bodies of the embedded API server, through its HTTP handler: any bytes as the
//! body of a create, update, patch (each patch type), bind or delete, in JSON, YAML or
//! protobuf, and any text as a list's label and field selectors.
//!
//! - every request is answered with a Kubernetes status below 500: a body is taken or
//!   refused (400, 404, 409, 415, 422, ...), never a panic or a server error;
//! - every answer but a watch is a JSON document.
#![no_main]

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;
use serde_json::json;
use testrunner_sim::Cluster;
use testrunner_sim::api::WriteOpts;
use testrunner_sim::http::{Server, handle};

const CM: &str = "/api/v1/namespaces/default/configmaps";
const POD: &str = "/api/v1/namespaces/default/pods";
const JSON: &str = "application/json";
const YAML: &str = "application/yaml";
const PROTOBUF: &str = "application/vnd.kubernetes.protobuf";

/// The requests a body is sent as: method, path, content type.
const REQUESTS: &[(&str, &str, &str)] = &[
    ("POST", CM, JSON),
    ("POST", CM, YAML),
    ("POST", CM, PROTOBUF),
    ("POST", POD, JSON),
    ("POST", POD, PROTOBUF),
    ("POST", "/api/v1/namespaces/default/secrets", PROTOBUF),
    ("POST", "/api/v1/namespaces", PROTOBUF),
    ("POST", "/api/v1/namespaces/default/events", PROTOBUF),
    (
        "POST",
        "/apis/events.k8s.io/v1/namespaces/default/events",
        PROTOBUF,
    ),
    (
        "POST",
        "/apis/coordination.k8s.io/v1/namespaces/default/leases",
        PROTOBUF,
    ),
    (
        "POST",
        "/apis/apps/v1/namespaces/default/controllerrevisions",
        JSON,
    ),
    (
        "POST",
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
        JSON,
    ),
    ("PUT", "/api/v1/namespaces/default/configmaps/c", JSON),
    ("PUT", "/api/v1/namespaces/default/pods/p/status", JSON),
    (
        "PATCH",
        "/api/v1/namespaces/default/configmaps/c",
        "application/merge-patch+json",
    ),
    (
        "PATCH",
        "/api/v1/namespaces/default/configmaps/c",
        "application/json-patch+json",
    ),
    (
        "PATCH",
        "/api/v1/namespaces/default/pods/p",
        "application/strategic-merge-patch+json",
    ),
    (
        "PATCH",
        "/api/v1/namespaces/default/pods/p/status",
        "application/merge-patch+json",
    ),
    (
        "PATCH",
        "/api/v1/namespaces/default/configmaps/c?fieldManager=fuzz&force=true",
        "application/apply-patch+yaml",
    ),
    (
        "PATCH",
        "/api/v1/namespaces/default/configmaps/new?fieldManager=fuzz",
        "application/apply-patch+yaml",
    ),
    ("POST", "/api/v1/namespaces/default/pods/p/binding", JSON),
    ("DELETE", "/api/v1/namespaces/default/configmaps/c", JSON),
    ("DELETE", "/api/v1/namespaces/default/pods/p", PROTOBUF),
    ("GET", CM, "labelSelector"),
    ("GET", POD, "fieldSelector"),
];

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    })
}

/// A cluster with namespace `default`, ConfigMap `c` and Pod `p`.
fn cluster() -> Arc<Cluster> {
    let cluster = Cluster::new(16);
    let opts = WriteOpts::default();
    let create = |plural: &str, ns: &str, obj: serde_json::Value| {
        let kind = cluster.find_kind("", "v1", plural).expect("built in");
        cluster.create(&kind, ns, obj, &opts).expect("created");
    };
    create("namespaces", "", json!({"metadata": {"name": "default"}}));
    create(
        "configmaps",
        "default",
        json!({"metadata": {"name": "c", "labels": {"a": "b"}}, "data": {"k": "v"}}),
    );
    create(
        "pods",
        "default",
        json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "w", "image": "i"}]}}),
    );
    cluster
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let (method, path, content_type) = REQUESTS[usize::from(which) % REQUESTS.len()];
    let request = if method == "GET" {
        let query: String = url::form_urlencoded::Serializer::new(String::new())
            .append_pair(content_type, &String::from_utf8_lossy(body))
            .finish();
        Request::get(format!("{path}?{query}")).body(Body::empty())
    } else {
        Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", content_type)
            .body(Body::from(body.to_vec()))
    }
    .expect("a request");
    let server = Server {
        cluster: cluster(),
        bookmark_interval: Duration::from_secs(10),
    };
    let (status, bytes) = runtime().block_on(async {
        let response = handle(State(server), request).await;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("a body")
            .to_bytes();
        (status, bytes)
    });
    assert!(
        status.as_u16() < 500,
        "{method} {path} ({content_type}): {status} {}",
        String::from_utf8_lossy(&bytes)
    );
    serde_json::from_slice::<serde_json::Value>(&bytes).unwrap_or_else(|e| {
        panic!(
            "{method} {path}: {status} answered with no JSON ({e}): {}",
            String::from_utf8_lossy(&bytes)
        )
    });
});
