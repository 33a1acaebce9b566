//! The simulated API server at the HTTP level, driven by kube's own client: the
//! semantics the operator and kubectl rely on.

use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Event as CoreEvent, Pod};
use k8s_openapi::api::events::v1::Event as NewEvent;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use testrunner_operator::controller::{self, Settings};
use testrunner_operator::crd::TestRunnerPool;
use testrunner_operator::pods;
use testrunner_sim::{self as sim, ApiServer, ServerConfig};

mod common;
use common::{control_plane_bin, eventually_some, process_alive, protobuf_body};

async fn server() -> ApiServer {
    common::api_server(ServerConfig::default()).await
}

fn cm(name: &str, data: Value) -> ConfigMap {
    serde_json::from_value(json!({"metadata": {"name": name}, "data": data})).unwrap()
}

fn pool_json(name: &str, scaling: Value) -> Value {
    json!({
        "apiVersion": "testrunner.dev/v1alpha1", "kind": "TestRunnerPool",
        "metadata": {"name": name},
        "spec": {"image": "example.org/runner:1", "command": ["true"],
            "queue": {"name": "tickets", "connectionSecretRef": {"name": "rabbitmq"}}, "scaling": scaling},
    })
}

fn api_code(e: kube::Error) -> (u16, String, String) {
    match e {
        kube::Error::Api(s) => (s.code, s.reason.clone(), s.message.clone()),
        other => panic!("expected an API error, got {other}"),
    }
}

#[tokio::test]
async fn create_get_list_with_monotonic_versions_and_409_on_stale_update() {
    let s = server().await;
    let cms: Api<ConfigMap> = Api::namespaced(s.client(), "default");
    let a = cms
        .create(&PostParams::default(), &cm("a", json!({"k": "1"})))
        .await
        .unwrap();
    let rv_a: u64 = a.resource_version().unwrap().parse().unwrap();
    let generated: ConfigMap =
        serde_json::from_value(json!({"metadata": {"generateName": "gen-"}})).unwrap();
    let g = cms
        .create(&PostParams::default(), &generated)
        .await
        .unwrap();
    assert!(
        g.name_any().starts_with("gen-") && g.name_any().len() == 9,
        "{}",
        g.name_any()
    );
    assert!(g.resource_version().unwrap().parse::<u64>().unwrap() > rv_a);

    let (code, reason, _) = api_code(
        cms.create(&PostParams::default(), &cm("a", json!({})))
            .await
            .unwrap_err(),
    );
    assert_eq!((code, reason.as_str()), (409, "AlreadyExists"));

    let got = cms.get("a").await.unwrap();
    assert_eq!(got.data.unwrap()["k"], "1");
    let list = cms.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 2);

    let mut fresh = cms.get("a").await.unwrap();
    fresh.data = Some([("k".to_string(), "2".to_string())].into());
    let updated = cms
        .replace("a", &PostParams::default(), &fresh)
        .await
        .unwrap();
    assert!(updated.resource_version().unwrap().parse::<u64>().unwrap() > rv_a);
    // `fresh` still carries the old resourceVersion: a stale write.
    let (code, reason, msg) = api_code(
        cms.replace("a", &PostParams::default(), &fresh)
            .await
            .unwrap_err(),
    );
    assert_eq!((code, reason.as_str()), (409, "Conflict"), "{msg}");
    assert!(msg.contains("the object has been modified"), "{msg}");

    let (code, _, _) = api_code(cms.get("missing").await.unwrap_err());
    assert_eq!(code, 404);
    let other_ns: Api<ConfigMap> = Api::namespaced(s.client(), "nowhere");
    let (code, _, msg) = api_code(
        other_ns
            .create(&PostParams::default(), &cm("x", json!({})))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 404, "{msg}");
}

#[tokio::test]
async fn watch_resumes_from_a_version_and_expired_versions_get_410() {
    let s = server().await;
    let cms: Api<ConfigMap> = Api::namespaced(s.client(), "default");
    let a = cms
        .create(&PostParams::default(), &cm("a", json!({})))
        .await
        .unwrap();
    let rv = a.resource_version().unwrap();
    cms.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"x": "1"}})),
    )
    .await
    .unwrap();
    cms.delete("a", &DeleteParams::default()).await.unwrap();

    let mut stream = cms
        .watch(&WatchParams::default().timeout(5), &rv)
        .await
        .unwrap()
        .boxed();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        match stream.try_next().await.unwrap().expect("stream open") {
            WatchEvent::Modified(o) => {
                seen.push(("MODIFIED", o.data.unwrap_or_default().get("x").cloned()))
            }
            WatchEvent::Deleted(_) => seen.push(("DELETED", None)),
            WatchEvent::Bookmark(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        seen,
        vec![("MODIFIED", Some("1".to_string())), ("DELETED", None)]
    );
    drop(stream);

    s.cluster.compact();
    let mut stream = cms
        .watch(&WatchParams::default().timeout(5), &rv)
        .await
        .unwrap()
        .boxed();
    match stream.try_next().await.unwrap().expect("one event") {
        WatchEvent::Error(e) => assert_eq!(e.code, 410),
        other => panic!("expected 410 Gone, got {other:?}"),
    }
}

#[tokio::test]
async fn kube_runtime_watcher_lists_then_watches_with_bookmarks() {
    let s = common::api_server(ServerConfig {
        bookmark_interval: Duration::from_millis(100),
        ..ServerConfig::default()
    })
    .await;
    let cms: Api<ConfigMap> = Api::namespaced(s.client(), "default");
    cms.create(&PostParams::default(), &cm("before", json!({})))
        .await
        .unwrap();
    let stream = kube::runtime::watcher(
        cms.clone(),
        kube::runtime::watcher::Config::default().labels("app=x"),
    );
    let mut objects = kube::runtime::WatchStreamExt::applied_objects(stream).boxed();
    let mut labelled = cm("after", json!({}));
    labelled.metadata.labels = Some([("app".to_string(), "x".to_string())].into());
    cms.create(&PostParams::default(), &labelled).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), objects.try_next())
        .await
        .expect("an event in time")
        .unwrap()
        .unwrap();
    assert_eq!(first.name_any(), "after");
}

#[tokio::test]
async fn label_and_field_selectors() {
    let s = server().await;
    let cms: Api<ConfigMap> = Api::namespaced(s.client(), "default");
    for (name, tier) in [("a", Some("web")), ("b", Some("db")), ("c", None)] {
        let mut c = cm(name, json!({}));
        if let Some(t) = tier {
            c.metadata.labels = Some([("tier".to_string(), t.to_string())].into());
        }
        cms.create(&PostParams::default(), &c).await.unwrap();
    }
    let names = |sel: &'static str| {
        let cms = cms.clone();
        async move {
            let mut n: Vec<String> = cms
                .list(&ListParams::default().labels(sel))
                .await
                .unwrap()
                .items
                .iter()
                .map(|o| o.name_any())
                .collect();
            n.sort();
            n
        }
    };
    assert_eq!(names("tier=web").await, vec!["a"]);
    assert_eq!(names("tier!=web").await, vec!["b", "c"]);
    assert_eq!(names("tier in (web,db)").await, vec!["a", "b"]);
    assert_eq!(names("tier notin (web)").await, vec!["b", "c"]);
    assert_eq!(names("tier").await, vec!["a", "b"]);
    assert_eq!(names("!tier").await, vec!["c"]);
    let by_name = cms
        .list(&ListParams::default().fields("metadata.name=b"))
        .await
        .unwrap();
    assert_eq!(by_name.items.len(), 1);

    // Events written through events.k8s.io/v1 read back as core/v1, selected by
    // involvedObject fields, as kubectl describe asks for them.
    let new_events: Api<NewEvent> = Api::namespaced(s.client(), "default");
    let ev: NewEvent = serde_json::from_value(json!({
        "metadata": {"generateName": "pool."},
        "eventTime": "2026-01-01T00:00:00.000000Z",
        "regarding": {"kind": "TestRunnerPool", "name": "p", "namespace": "default", "uid": "u1"},
        "reason": "ScaledUp", "note": "up to 2", "type": "Normal", "action": "Scale",
        "reportingController": "testrunner-operator", "reportingInstance": "x",
    }))
    .unwrap();
    let created = new_events
        .create(&PostParams::default(), &ev)
        .await
        .unwrap();
    new_events
        .patch(
            &created.name_any(),
            &PatchParams::default(),
            &Patch::Merge(
                json!({"series": {"count": 2, "lastObservedTime": "2026-01-01T00:00:01.000000Z"}}),
            ),
        )
        .await
        .unwrap();
    let core: Api<CoreEvent> = Api::namespaced(s.client(), "default");
    let sel = "involvedObject.name=p,involvedObject.namespace=default,involvedObject.kind=TestRunnerPool,involvedObject.uid=u1";
    let found = core.list(&ListParams::default().fields(sel)).await.unwrap();
    assert_eq!(found.items.len(), 1);
    assert_eq!(found.items[0].message.as_deref(), Some("up to 2"));
    assert_eq!(found.items[0].reason.as_deref(), Some("ScaledUp"));
    assert_eq!(found.items[0].series.as_ref().unwrap().count, Some(2));
    let none = core
        .list(&ListParams::default().fields("involvedObject.name=other"))
        .await
        .unwrap();
    assert!(none.items.is_empty());
}

#[tokio::test]
async fn merge_and_json_patches_and_the_status_subresource() {
    let s = server().await;
    let pools: Api<TestRunnerPool> = Api::namespaced(s.client(), "default");
    let body: TestRunnerPool = serde_json::from_value(pool_json("p", json!({}))).unwrap();
    let created = pools.create(&PostParams::default(), &body).await.unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    // Schema defaults are filled in by the server.
    assert_eq!(created.spec.scaling.max_workers, 10);
    assert_eq!(created.spec.scaling.poll_interval, "2s");

    let patched = pools
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"paused": true}, "status": {"phase": "Idle"}})),
        )
        .await
        .unwrap();
    assert!(patched.spec.paused);
    assert!(
        patched.status.is_none(),
        "the main resource cannot write status"
    );
    assert_eq!(patched.metadata.generation, Some(2));

    let path = "/apis/testrunner.dev/v1alpha1/namespaces/default/testrunnerpools/p";
    let ops = r#"[{"op": "replace", "path": "/spec/image", "value": "example.org/runner:2"},
        {"op": "test", "path": "/spec/paused", "value": true}]"#;
    let (code, patched) = raw(
        &s.client(),
        "PATCH",
        path,
        "application/json-patch+json",
        ops,
    )
    .await;
    assert_eq!(code, 200, "{patched}");
    assert_eq!(patched["spec"]["image"], "example.org/runner:2");
    assert_eq!(patched["metadata"]["generation"], 3);
    // Fields of a written section are defaulted; sections left out stay out (a typed
    // client writes every section, so this pool is written as plain JSON).
    let (code, bare) = raw(
        &s.client(),
        "POST",
        "/apis/testrunner.dev/v1alpha1/namespaces/default/testrunnerpools",
        "application/json",
        &pool_json("bare", json!({"maxWorkers": 4})).to_string(),
    )
    .await;
    assert_eq!(code, 201, "{bare}");
    assert_eq!(bare["spec"]["scaling"]["pollInterval"], "2s");
    for section in ["rollout", "poison", "alerts", "worker", "paused"] {
        assert!(bare["spec"].get(section).is_none(), "{section}: {bare}");
    }

    let st = pools
        .patch_status(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Idle"}, "spec": {"image": "ignored"}})),
        )
        .await
        .unwrap();
    assert_eq!(st.status.unwrap().phase.map(|p| p.as_str()), Some("Idle"));
    assert_eq!(st.spec.workload.image, "example.org/runner:2");
    assert_eq!(
        st.metadata.generation,
        Some(3),
        "a status write keeps the generation"
    );

    let bad = r#"[{"op": "test", "path": "/spec/image", "value": "nope"}]"#;
    let (code, st) = raw(
        &s.client(),
        "PATCH",
        path,
        "application/json-patch+json",
        bad,
    )
    .await;
    assert_eq!((code, st["kind"].as_str()), (422, Some("Status")));
}

#[tokio::test]
async fn server_side_apply_merges_owns_fields_and_reports_conflicts() {
    let s = server().await;
    let cms: Api<ConfigMap> = Api::namespaced(s.client(), "default");
    let cfg = |data: Value| json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": data});
    let created = cms
        .patch(
            "c",
            &PatchParams::apply("alice"),
            &Patch::Apply(cfg(json!({"a": "1", "b": "1"}))),
        )
        .await
        .unwrap();
    assert_eq!(created.data.as_ref().unwrap().len(), 2);
    let mf = created.metadata.managed_fields.as_ref().unwrap();
    assert_eq!(mf[0].manager.as_deref(), Some("alice"));
    assert_eq!(mf[0].operation.as_deref(), Some("Apply"));

    cms.patch(
        "c",
        &PatchParams::apply("bob"),
        &Patch::Apply(cfg(json!({"z": "9"}))),
    )
    .await
    .unwrap();
    let (code, reason, msg) = api_code(
        cms.patch(
            "c",
            &PatchParams::apply("bob"),
            &Patch::Apply(cfg(json!({"a": "2"}))),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!((code, reason.as_str()), (409, "Conflict"));
    assert!(msg.contains("alice") && msg.contains(".data.a"), "{msg}");

    let forced = cms
        .patch(
            "c",
            &PatchParams::apply("bob").force(),
            &Patch::Apply(cfg(json!({"a": "2"}))),
        )
        .await
        .unwrap();
    let data = forced.data.unwrap();
    // bob no longer applies z: it goes; alice's b stays; a is bob's now.
    assert_eq!(data.get("a").map(String::as_str), Some("2"));
    assert_eq!(data.get("b").map(String::as_str), Some("1"));
    assert!(!data.contains_key("z"));
    // alice drops b and keeps nothing else of her own: b goes.
    let after = cms
        .patch(
            "c",
            &PatchParams::apply("alice"),
            &Patch::Apply(cfg(json!({}))),
        )
        .await
        .unwrap();
    assert_eq!(after.data.unwrap().keys().collect::<Vec<_>>(), vec!["a"]);

    // Apply to the status subresource changes only status.
    let pools: Api<TestRunnerPool> = Api::namespaced(s.client(), "default");
    pools
        .patch(
            "p",
            &PatchParams::apply("me"),
            &Patch::Apply(pool_json("p", json!({}))),
        )
        .await
        .unwrap();
    let st = pools
        .patch_status(
            "p",
            &PatchParams::apply("op").force(),
            &Patch::Apply(json!({"apiVersion": "testrunner.dev/v1alpha1", "kind": "TestRunnerPool", "status": {"phase": "Running"}})),
        )
        .await
        .unwrap();
    assert_eq!(
        st.status.unwrap().phase.map(|p| p.as_str()),
        Some("Running")
    );
}

#[tokio::test]
async fn invalid_pools_are_refused_with_422_naming_the_field() {
    let s = server().await;
    let client: Client = s.client();
    let typed: Api<TestRunnerPool> = Api::namespaced(client, "default");
    let post = |v: Value| {
        let typed = typed.clone();
        async move {
            let obj: TestRunnerPool = serde_json::from_value(v).unwrap();
            typed.create(&PostParams::default(), &obj).await
        }
    };
    let (code, reason, msg) = api_code(
        post(pool_json("a", json!({"minWorkers": 5, "maxWorkers": 2})))
            .await
            .unwrap_err(),
    );
    assert_eq!((code, reason.as_str()), (422, "Invalid"));
    assert!(
        msg.contains("spec.scaling.minWorkers") && msg.contains("less than or equal"),
        "{msg}"
    );

    let (code, _, msg) = api_code(
        post(pool_json("b", json!({"maxWorkers": 5000})))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 422);
    assert!(msg.contains("spec.scaling.maxWorkers"), "{msg}");

    let (code, _, msg) = api_code(
        post(pool_json("c", json!({"pollInterval": "soon"})))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 422);
    assert!(msg.contains("spec.scaling.pollInterval"), "{msg}");

    // An update that breaks the rule is refused too, and leaves the object as it was.
    post(pool_json("d", json!({"minWorkers": 1, "maxWorkers": 2})))
        .await
        .unwrap();
    let (code, _, msg) = api_code(
        typed
            .patch(
                "d",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"scaling": {"minWorkers": 3}}})),
            )
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 422, "{msg}");
    assert_eq!(typed.get("d").await.unwrap().spec.scaling.min_workers, 1);
}

#[tokio::test]
async fn deleting_an_owner_collects_its_dependents_and_pods_terminate_gracefully() {
    let s = server().await;
    let client = s.client();
    let pools: Api<TestRunnerPool> = Api::namespaced(client.clone(), "default");
    let body: TestRunnerPool = serde_json::from_value(pool_json("owner", json!({}))).unwrap();
    let pool = pools.create(&PostParams::default(), &body).await.unwrap();
    let owner = json!([{"apiVersion": "testrunner.dev/v1alpha1", "kind": "TestRunnerPool", "name": "owner",
        "uid": pool.uid().unwrap(), "controller": true}]);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let dep: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "dep", "ownerReferences": owner}}))
            .unwrap();
    cms.create(&PostParams::default(), &dep).await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    // Bound to a node that does not run; and one that no node took.
    let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "worker", "ownerReferences": owner},
        "spec": {"nodeName": "gone", "terminationGracePeriodSeconds": 30, "containers": [{"name": "w", "image": "x", "command": ["true"]}]}}))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let pending: Pod = serde_json::from_value(json!({"metadata": {"name": "pending", "ownerReferences": owner},
        "spec": {"terminationGracePeriodSeconds": 30, "containers": [{"name": "w", "image": "x", "command": ["true"]}]}}))
    .unwrap();
    pods.create(&PostParams::default(), &pending).await.unwrap();

    pools
        .delete("owner", &DeleteParams::default())
        .await
        .unwrap();
    assert!(
        cms.get_opt("dep").await.unwrap().is_none(),
        "the dependent ConfigMap is collected"
    );
    // A dependent created after its owner is gone is collected as well.
    let late: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "late", "ownerReferences": owner}}))
            .unwrap();
    cms.create(&PostParams::default(), &late).await.unwrap();
    assert!(cms.get_opt("late").await.unwrap().is_none());
    // As on a real server: a pod that no node took has nothing to stop and goes at
    // once; the bound one waits in Terminating for its node, which is gone.
    assert!(pods.get_opt("pending").await.unwrap().is_none());
    let p = pods.get("worker").await.unwrap();
    assert!(p.metadata.deletion_timestamp.is_some());
    assert_eq!(p.metadata.deletion_grace_period_seconds, Some(30));
    pods.delete("worker", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    assert!(pods.get_opt("worker").await.unwrap().is_none());
}

async fn raw(client: &Client, method: &str, path: &str, ctype: &str, body: &str) -> (u16, Value) {
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", ctype)
        .body(body.as_bytes().to_vec())
        .unwrap();
    let resp = client
        .send(req.map(kube::client::Body::from))
        .await
        .unwrap();
    let code = resp.status().as_u16();
    use http_body_util::BodyExt;
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (code, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

#[tokio::test]
async fn bad_requests_get_kubernetes_status_answers() {
    let s = server().await;
    let c = s.client();
    let (code, st) = raw(
        &c,
        "POST",
        "/api/v1/namespaces/default/configmaps",
        "application/json",
        "{not json",
    )
    .await;
    assert_eq!(code, 400);
    assert_eq!(st["kind"], "Status");
    assert!(
        st["message"]
            .as_str()
            .unwrap()
            .contains("could not be decoded"),
        "{st}"
    );

    let (code, st) = raw(
        &c,
        "GET",
        "/api/v1/namespaces/default/widgets",
        "application/json",
        "",
    )
    .await;
    assert_eq!((code, st["reason"].as_str()), (404, Some("NotFound")));
    let (code, st) = raw(
        &c,
        "PUT",
        "/api/v1/namespaces/default/configmaps",
        "application/json",
        "{}",
    )
    .await;
    assert_eq!(
        (code, st["reason"].as_str()),
        (405, Some("MethodNotAllowed"))
    );
    let (code, _) = raw(
        &c,
        "GET",
        "/api/v1/namespaces/default/configmaps/x/scale",
        "application/json",
        "",
    )
    .await;
    assert_eq!(code, 404);
    let created = raw(
        &c,
        "POST",
        "/api/v1/namespaces/default/configmaps",
        "application/json",
        r#"{"metadata":{"name":"x"}}"#,
    )
    .await;
    assert_eq!(created.0, 201);
    for (ctype, body) in [
        (
            "application/json-patch+json",
            r#"[{"op":"replace","path":"","value":5}]"#,
        ),
        ("application/json-patch+json", r#"{"op":"add"}"#),
        ("application/merge-patch+json", "[1]"),
        ("application/apply-patch+yaml", "a: [b"),
        ("application/merge-patch+json", r#"{"metadata": "oops"}"#),
    ] {
        let (code, st) = raw(
            &c,
            "PATCH",
            "/api/v1/namespaces/default/configmaps/x",
            ctype,
            body,
        )
        .await;
        assert!((400..500).contains(&code), "{ctype} {body}: {code} {st}");
        assert_eq!(st["kind"], "Status", "{ctype} {body}");
    }
    let (code, st) = raw(
        &c,
        "PATCH",
        "/api/v1/namespaces/default/configmaps/x",
        "text/plain",
        "{}",
    )
    .await;
    assert_eq!(code, 415, "{st}");
    let (code, st) = raw(
        &c,
        "GET",
        "/api/v1/namespaces/default/configmaps?labelSelector=a%20b%20c",
        "application/json",
        "",
    )
    .await;
    assert_eq!(code, 400, "{st}");
    let (code, st) = raw(
        &c,
        "POST",
        "/api/v1/namespaces/default/configmaps",
        "application/json",
        r#"{"metadata":{"name":"Bad_Name"}}"#,
    )
    .await;
    assert_eq!(code, 422, "{st}");
}

#[tokio::test]
async fn a_watch_client_that_goes_away_frees_its_subscription() {
    let s = common::api_server(ServerConfig {
        bookmark_interval: Duration::from_millis(50),
        ..ServerConfig::default()
    })
    .await;
    watch_then_go(&s, &WatchParams::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_runs_against_the_simulation_and_gc_removes_its_workers() {
    let sim = common::simulation("amqp://guest:guest@127.0.0.1:1/%2f", 50.0).await;
    let client = sim.client();
    let operator = controller::spawn(client.clone(), Settings::in_process(Vec::new()));
    let pools: Api<TestRunnerPool> = Api::namespaced(client.clone(), "default");
    let body: TestRunnerPool =
        serde_json::from_value(pool_json("demo", json!({"minWorkers": 1, "maxWorkers": 2})))
            .unwrap();
    pools.create(&PostParams::default(), &body).await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod = eventually_some(
        "a worker pod whose wrapper was installed and whose broker sidecar runs",
        Duration::from_secs(60),
        || {
            let pods = pods.clone();
            async move {
                let list = pods
                    .list(&ListParams::default().labels("testrunner.dev/pool=demo"))
                    .await
                    .ok()?;
                list.items.into_iter().find(|p| {
                    let inits = p
                        .status
                        .as_ref()
                        .and_then(|s| s.init_container_statuses.clone())
                        .unwrap_or_default();
                    let state = |name: &str| {
                        inits
                            .iter()
                            .find(|c| c.name == name)
                            .and_then(|c| c.state.clone())
                    };
                    state(pods::INSTALL_CONTAINER)
                        .and_then(|s| s.terminated)
                        .is_some_and(|t| t.exit_code == 0)
                        && state(pods::BROKER_CONTAINER).is_some_and(|s| s.running.is_some())
                })
            }
        },
    )
    .await;
    assert_eq!(
        pod.spec.as_ref().unwrap().node_name.as_deref(),
        Some("simulated-node")
    );
    let status = pools.get_status("demo").await.unwrap().status;
    assert!(status.is_some(), "the operator writes the pool status");

    pools
        .delete("demo", &DeleteParams::default())
        .await
        .unwrap();
    eventually_some("the pool's pods to go", Duration::from_secs(60), || {
        let pods = pods.clone();
        async move {
            let list = pods
                .list(&ListParams::default().labels("testrunner.dev/pool=demo"))
                .await
                .ok()?;
            list.items.is_empty().then_some(())
        }
    })
    .await;
    operator.abort();
    sim.shutdown().await;
}

fn pod_status(p: &Pod) -> Value {
    serde_json::to_value(p.status.clone().unwrap_or_default()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubelet_runs_init_then_main_containers_with_env_restarts_and_termination_messages() {
    // Time scale 100: CrashLoopBackOff waits 0.1 s, 0.2 s, 0.4 s, ...
    let sim = common::simulation("amqp://user:secret@broker.example/%2f", 100.0).await;
    let pods: Api<Pod> = Api::namespaced(sim.client(), "default");
    let mount = json!([{"name": "shared", "mountPath": "/opt/shared"}]);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "crasher"},
        "spec": {
            "volumes": [{"name": "shared", "emptyDir": {}}],
            "initContainers": [{"name": "init", "image": "tools:1", "volumeMounts": mount,
                "command": ["sh", "-c", "echo hello > /opt/shared/greeting"]}],
            "containers": [{"name": "main", "image": "runner:broken", "volumeMounts": mount,
                "env": [{"name": "URI", "valueFrom": {"secretKeyRef": {"name": "rabbitmq", "key": "uri"}}}],
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "command": ["sh", "-c", "printf '%s|%s|%s' \"$(cat /opt/shared/greeting)\" \"$URI\" \"$TESTRUNNER_IMAGE\" > \"$TESTRUNNER_TERMINATION_LOG\"; exit 3"]}],
        }
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let status = eventually_some("two restarts", Duration::from_secs(30), || {
        let pods = pods.clone();
        async move {
            let p = pods.get("crasher").await.ok()?;
            let s = pod_status(&p);
            (s["containerStatuses"][0]["restartCount"].as_i64()? >= 2).then_some(s)
        }
    })
    .await;
    let init = &status["initContainerStatuses"][0]["state"]["terminated"];
    assert_eq!(
        (init["exitCode"].as_i64(), init["reason"].as_str()),
        (Some(0), Some("Completed"))
    );
    let last = &status["containerStatuses"][0]["lastState"]["terminated"];
    assert_eq!(last["exitCode"], 3);
    assert_eq!(last["reason"], "Error");
    assert_eq!(
        last["message"],
        "hello|amqp://user:secret@broker.example/%2f|runner:broken"
    );
    assert!(last["finishedAt"].is_string());
    assert_eq!(status["phase"], "Running");

    // A crash with an empty termination message falls back to the log's tail.
    let logs: Pod = serde_json::from_value(json!({
        "metadata": {"name": "logger"},
        "spec": {"restartPolicy": "Never", "containers": [{"name": "main", "image": "x",
            "terminationMessagePolicy": "FallbackToLogsOnError",
            "command": ["sh", "-c", "echo first line; echo last words >&2; exit 7"]}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &logs).await.unwrap();
    let status = eventually_some("the logger to fail", Duration::from_secs(30), || {
        let pods = pods.clone();
        async move {
            let s = pod_status(&pods.get("logger").await.ok()?);
            (s["phase"] == "Failed").then_some(s)
        }
    })
    .await;
    let term = &status["containerStatuses"][0]["state"]["terminated"];
    assert_eq!(term["exitCode"], 7);
    assert_eq!(term["message"], "first line\nlast words");
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_pod_sends_sigterm_waits_the_grace_period_then_kills() {
    // Time scale 100: a grace period of 100 s lasts one second.
    let sim = common::simulation("amqp://guest:guest@127.0.0.1:5672/%2f", 100.0).await;
    let dir = std::env::temp_dir().join(format!("sim-grace-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = format!(
        // The pid as the host sees it: the container has a PID namespace of its own.
        "cut -d' ' -f4 /proc/self/stat > {d}/pid.tmp && mv {d}/pid.tmp {d}/pid; trap 'echo term > {d}/term' TERM; while true; do sleep 0.05; done",
        d = dir.display()
    );
    let pods: Api<Pod> = Api::namespaced(sim.client(), "default");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "stubborn"},
        "spec": {"terminationGracePeriodSeconds": 100,
            "containers": [{"name": "main", "image": "x", "command": ["sh", "-c", script]}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    eventually_some("the pod to be Ready", Duration::from_secs(30), || {
        let pods = pods.clone();
        async move {
            let s = pod_status(&pods.get("stubborn").await.ok()?);
            let ready = s["conditions"]
                .as_array()?
                .iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            ready.then_some(())
        }
    })
    .await;
    let pid = eventually_some("the pid file", Duration::from_secs(10), || {
        let f = dir.join("pid");
        async move {
            std::fs::read_to_string(f)
                .ok()
                .filter(|s| !s.trim().is_empty())
        }
    })
    .await;
    let pid = pid.trim().to_string();
    assert!(process_alive(&pid));

    let started = std::time::Instant::now();
    pods.delete("stubborn", &DeleteParams::default())
        .await
        .unwrap();
    let terminating = pods.get("stubborn").await.unwrap();
    assert!(terminating.metadata.deletion_timestamp.is_some());
    eventually_some(
        "SIGTERM to reach the process",
        Duration::from_secs(10),
        || {
            let f = dir.join("term");
            async move { f.exists().then_some(()) }
        },
    )
    .await;
    assert!(
        process_alive(&pid),
        "the process ignores SIGTERM and lives through the grace period"
    );
    eventually_some("the pod object to go", Duration::from_secs(15), || {
        let pods = pods.clone();
        async move { pods.get_opt("stubborn").await.ok()?.is_none().then_some(()) }
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "the grace period is waited for"
    );
    eventually_some("the process to be killed", Duration::from_secs(5), || {
        let pid = pid.clone();
        async move { (!process_alive(&pid)).then_some(()) }
    })
    .await;
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_election_runs_through_the_lease_api() {
    use k8s_openapi::api::coordination::v1::Lease;
    use testrunner_operator::leader::{self, Election};
    let s = server().await;
    let client = s.client();
    let election = Election {
        namespace: "default".into(),
        name: "testrunner-operator".into(),
        identity: "replica-a".into(),
        duration_seconds: 5,
    };
    let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
    let leases2 = leases.clone();
    let work = async move {
        let lease = eventually_some(
            "the Lease to name its holder",
            Duration::from_secs(10),
            || {
                let leases = leases2.clone();
                async move {
                    let l = leases.get_opt("testrunner-operator").await.ok()??;
                    let holder = l.spec.as_ref()?.holder_identity.clone()?;
                    (holder == "replica-a").then_some(l)
                }
            },
        )
        .await;
        assert!(lease.spec.unwrap().lease_duration_seconds == Some(5));
    };
    tokio::time::timeout(
        Duration::from_secs(30),
        leader::run_as_leader(client, election, work),
    )
    .await
    .expect("leading finishes")
    .expect("the Lease is taken and released");
}

/// A container runs as its `runAsUser`/`runAsGroup` in a mount namespace of its own with
/// its volumes at their `mountPath` (the host's mount point stays empty); an exec
/// readiness probe, run inside those mounts, decides Ready; a failing exec liveness probe
/// restarts the container; two pods that serve the same port each get a network
/// namespace of their own, and their HTTP readiness probes reach each one's server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_get_their_user_mounts_probes_and_network_namespace() {
    if !sim::isolate::available() {
        eprintln!("skipped: namespaces need root");
        return;
    }
    let sim = common::simulation("amqp://guest:guest@127.0.0.1:5672/%2f", 10.0).await;
    let dir = std::env::temp_dir().join(format!("sim-probes-{}", std::process::id()));
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let mnt = dir.join("mnt");
    let (o, m) = (out.display(), mnt.display());
    let script = format!(
        "id -u > {o}/uid; id -g > {o}/gid; echo hi > {m}/hello; while true; do sleep 0.05; done"
    );
    let pods: Api<Pod> = Api::namespaced(sim.client(), "default");
    let probe = |cmd: &str| json!({"exec": {"command": ["sh", "-c", cmd]}, "periodSeconds": 1, "failureThreshold": 1});
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "user"},
        "spec": {"securityContext": {"runAsUser": 1234, "runAsGroup": 2345},
            "volumes": [{"name": "scratch", "emptyDir": {}}],
            "containers": [{"name": "main", "image": "x", "command": ["sh", "-c", script],
                "volumeMounts": [{"name": "scratch", "mountPath": m.to_string()}],
                "readinessProbe": probe(&format!("test -s {m}/hello")),
                "livenessProbe": probe(&format!("test ! -e {o}/die"))}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let ready = |name: &'static str| {
        let pods = pods.clone();
        async move {
            let s = pod_status(&pods.get(name).await.ok()?);
            s["conditions"]
                .as_array()?
                .iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
                .then_some(s)
        }
    };
    eventually_some(
        "the exec readiness probe to pass",
        Duration::from_secs(30),
        || ready("user"),
    )
    .await;
    let read = |f: &str| std::fs::read_to_string(out.join(f)).unwrap_or_default();
    assert_eq!(read("uid").trim(), "1234");
    assert_eq!(read("gid").trim(), "2345");
    assert_eq!(
        std::fs::read_dir(&mnt).unwrap().count(),
        0,
        "the volume is mounted for the container only"
    );
    std::fs::write(out.join("die"), b"").unwrap();
    eventually_some(
        "the liveness probe to restart the container",
        Duration::from_secs(30),
        || {
            let pods = pods.clone();
            async move {
                let s = pod_status(&pods.get("user").await.ok()?);
                (s["containerStatuses"][0]["restartCount"].as_i64()? >= 1).then_some(())
            }
        },
    )
    .await;
    std::fs::remove_file(out.join("die")).unwrap();

    // Two HTTP servers on one port, each in its own pod's network namespace.
    for name in ["web-a", "web-b"] {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"containers": [{"name": "web", "image": "x",
                "command": ["/usr/bin/python3", "-m", "http.server", "18080", "--bind", "127.0.0.1"],
                "ports": [{"name": "http", "containerPort": 18080}],
                "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1}}]}
        }))
        .unwrap();
        pods.create(&PostParams::default(), &pod).await.unwrap();
    }
    for name in ["web-a", "web-b"] {
        eventually_some(
            &format!("{name}'s HTTP readiness probe to pass"),
            Duration::from_secs(30),
            || ready(name),
        )
        .await;
    }
    assert!(
        std::net::TcpStream::connect("127.0.0.1:18080").is_err(),
        "the servers listen in their pods' network namespaces, not on the host"
    );
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A leader that stops releases its Lease, and a standby takes it within a few seconds,
/// long before the Lease's duration; the stopped leader's work ends with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_leader_releases_the_lease_and_the_standby_takes_it_at_once() {
    use k8s_openapi::api::coordination::v1::Lease;
    use std::sync::atomic::{AtomicBool, Ordering};
    use testrunner_operator::leader::{self, Election};
    let s = server().await;
    let client = s.client();
    let election = |identity: &str| Election {
        namespace: "default".into(),
        name: "handover".into(),
        identity: identity.into(),
        duration_seconds: 60,
    };
    let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
    let holder = || {
        let leases = leases.clone();
        async move {
            leases
                .get_opt("handover")
                .await
                .ok()??
                .spec?
                .holder_identity
                .filter(|h| !h.is_empty())
        }
    };
    let (stop_a, stopped_a) = tokio::sync::oneshot::channel::<()>();
    let a_working = Arc::new(AtomicBool::new(false));
    let a_flag = a_working.clone();
    let a = tokio::spawn(leader::run_as_leader_until(
        client.clone(),
        election("replica-a"),
        async move {
            a_flag.store(true, Ordering::SeqCst);
            std::future::pending::<()>().await
        },
        async move {
            let _ = stopped_a.await;
        },
    ));
    eventually_some("replica-a to lead", Duration::from_secs(10), || async {
        (holder().await.as_deref() == Some("replica-a") && a_working.load(Ordering::SeqCst))
            .then_some(())
    })
    .await;
    let b_working = Arc::new(AtomicBool::new(false));
    let b_flag = b_working.clone();
    let b = tokio::spawn(leader::run_as_leader_until(
        client.clone(),
        election("replica-b"),
        async move {
            b_flag.store(true, Ordering::SeqCst);
            std::future::pending::<()>().await
        },
        std::future::pending::<()>(),
    ));
    stop_a.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), a)
        .await
        .expect("the stopped leader returns")
        .unwrap()
        .expect("it stops cleanly");
    let started = std::time::Instant::now();
    eventually_some(
        "the standby to take the released Lease",
        Duration::from_secs(10),
        || async {
            (holder().await.as_deref() == Some("replica-b") && b_working.load(Ordering::SeqCst))
                .then_some(())
        },
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "well before the Lease's 60 s"
    );
    b.abort();
}

#[tokio::test]
async fn kube_runtime_watcher_with_streaming_lists_gets_initial_events_then_changes() {
    let s = server().await;
    let cms: Api<ConfigMap> = Api::namespaced(s.client(), "default");
    cms.create(&PostParams::default(), &cm("old", json!({})))
        .await
        .unwrap();
    let stream = kube::runtime::watcher(
        cms.clone(),
        kube::runtime::watcher::Config::default().streaming_lists(),
    );
    let mut events = stream.boxed();
    let mut initial = Vec::new();
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(10), events.try_next())
            .await
            .expect("an event in time")
            .unwrap()
            .unwrap();
        match ev {
            kube::runtime::watcher::Event::Init => {}
            kube::runtime::watcher::Event::InitApply(o) => initial.push(o.name_any()),
            kube::runtime::watcher::Event::InitDone => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(initial, vec!["old"]);
    cms.create(&PostParams::default(), &cm("new", json!({})))
        .await
        .unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(10), events.try_next())
        .await
        .expect("an event in time")
        .unwrap()
        .unwrap();
    match ev {
        kube::runtime::watcher::Event::Apply(o) => assert_eq!(o.name_any(), "new"),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loop_backoff_doubles_and_resets_after_a_long_enough_run() {
    // Time scale 6000: the backoff starts at 10 s / 6000 and a run of 10 min / 6000 =
    // 0.1 s resets it.
    let sim = common::simulation("amqp://guest:guest@127.0.0.1:5672/%2f", 6000.0).await;
    let pods: Api<Pod> = Api::namespaced(sim.client(), "default");
    for (name, script) in [("quick", "exit 1"), ("steady", "sleep 0.3; exit 1")] {
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": name},
            "spec": {"containers": [{"name": "main", "image": "x", "command": ["sh", "-c", script]}]}}))
        .unwrap();
        pods.create(&PostParams::default(), &pod).await.unwrap();
    }
    let waiting = |name: &'static str, restarts: i64| {
        let pods = pods.clone();
        async move {
            let s = pod_status(&pods.get(name).await.ok()?);
            let c = &s["containerStatuses"][0];
            if c["restartCount"].as_i64()? < restarts {
                return None;
            }
            c["state"]["waiting"]["message"].as_str().map(String::from)
        }
    };
    let quick = eventually_some(
        "the quick crasher to back off",
        Duration::from_secs(30),
        || waiting("quick", 5),
    )
    .await;
    assert!(
        ["back-off 160s", "back-off 300s"]
            .iter()
            .any(|b| quick.starts_with(b)),
        "the backoff doubles: {quick}"
    );
    let steady = eventually_some(
        "the steady crasher to restart",
        Duration::from_secs(30),
        || waiting("steady", 3),
    )
    .await;
    assert!(
        steady.starts_with("back-off 10s "),
        "a long run resets the backoff: {steady}"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn a_watch_without_bookmarks_is_released_when_its_client_goes() {
    let s = server().await;
    watch_then_go(&s, &WatchParams::default().disable_bookmarks()).await;
}

/// Watches ConfigMaps with `params`, then drops the watch: the subscription must come
/// and go with it.
async fn watch_then_go(s: &ApiServer, params: &WatchParams) {
    let cluster: Arc<sim::Cluster> = s.cluster.clone();
    let before = cluster.watcher_count();
    let cms: Api<ConfigMap> = Api::namespaced(s.client(), "default");
    let stream = cms.watch(params, "0").await.unwrap().boxed();
    eventually_some("the watch to subscribe", Duration::from_secs(5), || async {
        (cluster.watcher_count() > before).then_some(())
    })
    .await;
    drop(stream);
    eventually_some(
        "the watch to be released",
        Duration::from_secs(5),
        || async { (cluster.watcher_count() == before).then_some(()) },
    )
    .await;
}

/// Sends `body` with the given Content-Type and Accept; returns the status code, the
/// answer's Content-Type and the answer (its first line, for a watch) as JSON.
async fn send(
    client: &Client,
    method: &str,
    path: &str,
    ctype: &str,
    accept: &str,
    body: Vec<u8>,
) -> (u16, String, Value) {
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", ctype)
        .header("accept", accept)
        .body(body)
        .unwrap();
    let resp = client
        .send(req.map(kube::client::Body::from))
        .await
        .unwrap();
    let code = resp.status().as_u16();
    let answered = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    use http_body_util::BodyExt;
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let first = bytes.split(|b| *b == b'\n').next().unwrap_or_default();
    let value = serde_json::from_slice(first)
        .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {bytes:?}"));
    (code, answered, value)
}

#[tokio::test]
async fn protobuf_bodies_are_decoded_and_every_answer_is_json() {
    use k8s_pb::api::core::v1 as core;
    use k8s_pb::apimachinery::pkg::apis::meta::v1 as meta;
    let s = server().await;
    let c = s.client();
    const PB: &str = "application/vnd.kubernetes.protobuf";
    const PB_OR_JSON: &str = "application/vnd.kubernetes.protobuf, application/json";
    let b64 = |v: &str| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, v);
    let secrets = "/api/v1/namespaces/default/secrets";

    // Create, as kubectl create secret generic does (with stringData too).
    let secret = core::Secret {
        metadata: Some(meta::ObjectMeta {
            name: Some("rabbitmq".into()),
            ..Default::default()
        }),
        data: [("user".to_string(), b"guest".to_vec())].into(),
        string_data: [("uri".to_string(), "amqp://127.0.0.1:5672/%2f".to_string())].into(),
        ..Default::default()
    };
    let (code, ctype, obj) = send(
        &c,
        "POST",
        &format!("{secrets}?fieldManager=kubectl-create"),
        PB,
        PB_OR_JSON,
        protobuf_body("v1", "Secret", &secret),
    )
    .await;
    assert_eq!((code, ctype.as_str()), (201, "application/json"), "{obj}");
    assert_eq!(
        obj["data"],
        json!({"user": b64("guest"), "uri": b64("amqp://127.0.0.1:5672/%2f")})
    );
    assert!(obj.get("stringData").is_none(), "{obj}");
    assert_eq!(obj["type"], "Opaque");

    // Update through protobuf, with the resourceVersion read.
    let mut update = secret.clone();
    update.string_data.clear();
    update.data.insert("user".into(), b"ci".to_vec());
    update.metadata.as_mut().unwrap().resource_version = obj["metadata"]["resourceVersion"]
        .as_str()
        .map(String::from);
    let (code, _, obj) = send(
        &c,
        "PUT",
        &format!("{secrets}/rabbitmq"),
        PB,
        PB_OR_JSON,
        protobuf_body("v1", "Secret", &update),
    )
    .await;
    assert_eq!(code, 200, "{obj}");
    assert_eq!(obj["data"]["user"], b64("ci"));

    // Reads asking for protobuf first (or only) are answered in JSON, labelled so.
    for (path, accept) in [
        (format!("{secrets}/rabbitmq"), PB),
        (format!("{secrets}/rabbitmq"), PB_OR_JSON),
        (secrets.to_string(), PB),
        (format!("{secrets}?watch=true&timeoutSeconds=1"), PB_OR_JSON),
    ] {
        let (code, ctype, obj) = send(&c, "GET", &path, "", accept, Vec::new()).await;
        assert_eq!((code, ctype.as_str()), (200, "application/json"), "{path}");
        assert!(obj.is_object(), "{path}: {obj}");
    }

    // A kind without a protobuf decoder, and a media type no server takes: 415.
    let (code, _, st) = send(
        &c,
        "POST",
        "/apis/testrunner.dev/v1alpha1/namespaces/default/testrunnerpools",
        PB,
        PB_OR_JSON,
        protobuf_body("testrunner.dev/v1alpha1", "TestRunnerPool", &secret),
    )
    .await;
    assert_eq!(
        (code, st["reason"].as_str()),
        (415, Some("UnsupportedMediaType"))
    );
    assert!(
        st["message"].as_str().unwrap().contains("TestRunnerPool"),
        "{st}"
    );
    let (code, _, st) = send(
        &c,
        "POST",
        "/api/v1/namespaces/default/configmaps",
        "text/plain",
        "application/json",
        br#"{"metadata":{"name":"x"}}"#.to_vec(),
    )
    .await;
    assert_eq!(code, 415, "{st}");

    // Deletion options in protobuf: a dry run keeps the Secret, then it goes.
    let dry = meta::DeleteOptions {
        dry_run: vec!["All".into()],
        ..Default::default()
    };
    let (code, _, _) = send(
        &c,
        "DELETE",
        &format!("{secrets}/rabbitmq"),
        PB,
        PB_OR_JSON,
        protobuf_body("v1", "DeleteOptions", &dry),
    )
    .await;
    assert_eq!(code, 200);
    let api: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(c.clone(), "default");
    assert!(api.get_opt("rabbitmq").await.unwrap().is_some());
    let (code, _, _) = send(
        &c,
        "DELETE",
        &format!("{secrets}/rabbitmq"),
        PB,
        PB_OR_JSON,
        protobuf_body("v1", "DeleteOptions", &meta::DeleteOptions::default()),
    )
    .await;
    assert_eq!(code, 200);
    assert!(api.get_opt("rabbitmq").await.unwrap().is_none());
}

/// What the simulated node does for a pod, the same on the embedded server and on a real
/// control plane: a pod with a volume of a ConfigMap that does not exist yet waits with
/// `ContainerCreating`, then starts once it exists; init containers run first;
/// ConfigMap (with `items`), Secret and downward API volumes, env from Secrets,
/// ConfigMaps and the downward API, CrashLoopBackOff with the termination message; on a
/// real control plane, the service-account token the API server's admission adds;
/// `kubectl logs` (whole, tail, follow); and a graceful deletion: SIGTERM, then the node
/// deletes the pod for good.
async fn the_node_runs_a_pod_with_volumes_env_and_graceful_deletion(sim: sim::Simulation) {
    let real = sim.embedded().is_none();
    let client = sim.client();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let scratch = json!({"name": "scratch", "mountPath": "/scratch"});
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "features", "labels": {"app": "demo"}},
        "spec": {
            "terminationGracePeriodSeconds": 5,
            "volumes": [
                {"name": "scratch", "emptyDir": {}},
                {"name": "cfg", "configMap": {"name": "node-cfg", "items": [{"key": "a", "path": "renamed"}]}},
                {"name": "sec", "secret": {"secretName": "rabbitmq"}},
                {"name": "down", "downwardAPI": {"items": [{"path": "name", "fieldRef": {"fieldPath": "metadata.name"}}]}},
            ],
            "initContainers": [{"name": "init", "image": "tools:1", "volumeMounts": [scratch],
                "command": ["sh", "-c", "echo ready > /scratch/init"]}],
            "containers": [{"name": "main", "image": "runner:1",
                "volumeMounts": [scratch, {"name": "cfg", "mountPath": "/cfg"},
                    {"name": "sec", "mountPath": "/sec"}, {"name": "down", "mountPath": "/down"}],
                "env": [
                    {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                    {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                    {"name": "FROM_CM", "valueFrom": {"configMapKeyRef": {"name": "node-cfg", "key": "a"}}},
                ],
                "envFrom": [{"prefix": "S_", "secretRef": {"name": "rabbitmq"}}],
                "command": ["sh", "-c", "t=none; test -s /var/run/secrets/kubernetes.io/serviceaccount/token && t=token; \
                    printf '%s|%s|%s|%s|%s|%s|%s|%s|%s' \"$(cat /scratch/init)\" \"$(cat /cfg/renamed)\" \"$(cat /sec/uri)\" \
                    \"$(cat /down/name)\" \"$APP\" \"$NODE\" \"$FROM_CM\" \"$S_uri\" \"$t\" > \"$TESTRUNNER_TERMINATION_LOG\"; exit 5"]}],
        }
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    eventually_some(
        "ContainerCreating while the ConfigMap of a volume is missing",
        Duration::from_secs(60),
        || {
            let pods = pods.clone();
            async move {
                let s = pod_status(&pods.get("features").await.ok()?);
                let waiting = &s["initContainerStatuses"][0]["state"]["waiting"];
                (waiting["reason"] == "ContainerCreating"
                    && waiting["message"]
                        .as_str()?
                        .contains("configmap \"node-cfg\" not found"))
                .then_some(())
            }
        },
    )
    .await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let cm: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "node-cfg"}, "data": {"a": "alpha"}}))
            .unwrap();
    cms.create(&PostParams::default(), &cm).await.unwrap();
    let status = eventually_some(
        "a restart after the container ran",
        Duration::from_secs(60),
        || {
            let pods = pods.clone();
            async move {
                let s = pod_status(&pods.get("features").await.ok()?);
                (s["containerStatuses"][0]["restartCount"].as_i64()? >= 1).then_some(s)
            }
        },
    )
    .await;
    let last = &status["containerStatuses"][0]["lastState"]["terminated"];
    assert_eq!(last["exitCode"], 5, "{status}");
    let uri = "amqp://user:secret@broker.example/%2f";
    let token = if real { "token" } else { "none" };
    assert_eq!(
        last["message"],
        format!("ready|alpha|{uri}|features|demo|simulated-node|alpha|{uri}|{token}"),
        "{status}"
    );
    let init = &status["initContainerStatuses"][0]["state"]["terminated"];
    assert_eq!(init["reason"], "Completed", "{status}");
    assert_eq!(status["hostIP"], "127.0.0.1");

    // A graceful deletion: the container handles SIGTERM and exits; the node then
    // deletes the pod for good.
    let dir = sim.root.join("graceful-witness");
    std::fs::create_dir_all(&dir).unwrap();
    let witness = dir.join("term");
    let graceful: Pod = serde_json::from_value(json!({
        "metadata": {"name": "graceful"},
        "spec": {"terminationGracePeriodSeconds": 30, "containers": [{"name": "main", "image": "x",
            "command": ["sh", "-c", format!("trap 'echo term > {w}; exit 0' TERM; echo first; while true; do sleep 0.05; echo tick; done", w = witness.display())]}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &graceful)
        .await
        .unwrap();
    eventually_some("the graceful pod to run", Duration::from_secs(60), || {
        let pods = pods.clone();
        async move {
            let s = pod_status(&pods.get("graceful").await.ok()?);
            (s["containerStatuses"][0]["ready"] == true).then_some(())
        }
    })
    .await;
    // kubectl logs: the whole log, its tail, and a followed stream that goes on.
    let log = eventually_some(
        "the container's first line in its log",
        Duration::from_secs(30),
        || {
            let pods = pods.clone();
            async move {
                let log = pods.logs("graceful", &Default::default()).await.ok()?;
                (log.starts_with("first\n") && log.contains("tick\n")).then_some(log)
            }
        },
    )
    .await;
    assert!(log.lines().all(|l| l == "first" || l == "tick"), "{log}");
    let tail = pods
        .logs(
            "graceful",
            &kube::api::LogParams {
                tail_lines: Some(1),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(tail.lines().collect::<Vec<_>>(), vec!["tick"], "{tail}");
    let follow = kube::api::LogParams {
        follow: true,
        tail_lines: Some(0),
        ..Default::default()
    };
    let mut stream = pods.log_stream("graceful", &follow).await.unwrap();
    let mut more = String::new();
    {
        use futures::AsyncBufReadExt;
        tokio::time::timeout(Duration::from_secs(30), stream.read_line(&mut more))
            .await
            .expect("a followed log goes on")
            .unwrap();
    }
    assert_eq!(more, "tick\n");
    drop(stream);
    pods.delete("graceful", &DeleteParams::default())
        .await
        .unwrap();
    eventually_some(
        "the node to delete the stopped pod",
        Duration::from_secs(60),
        || {
            let pods = pods.clone();
            async move { pods.get_opt("graceful").await.ok()?.is_none().then_some(()) }
        },
    )
    .await;
    assert_eq!(std::fs::read_to_string(&witness).unwrap().trim(), "term");
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_runs_pods_on_the_embedded_server() {
    let sim = common::simulation("amqp://user:secret@broker.example/%2f", 100.0).await;
    the_node_runs_a_pod_with_volumes_env_and_graceful_deletion(sim).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real control plane: bash tests/control-plane/build.sh, then cargo test -- --include-ignored (bash tests/run.sh does both)"]
async fn the_node_runs_pods_on_a_real_control_plane() {
    let sim = sim::Simulation::start_on_control_plane(
        &control_plane_bin(),
        common::options("amqp://user:secret@broker.example/%2f", 100.0),
    )
    .await
    .unwrap_or_else(|e| panic!("the control plane did not start: {e}"));
    the_node_runs_a_pod_with_volumes_env_and_graceful_deletion(sim).await;
}

/// The READY and RESTARTS cells `kubectl get pod NAME` shows: the server's Table.
async fn ready_and_restarts(client: &Client, name: &str) -> Option<(String, String)> {
    let req = http::Request::get(format!("/api/v1/namespaces/default/pods/{name}"))
        .header("accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
        .body(Vec::new())
        .unwrap();
    let table: Value = client.request(req).await.ok()?;
    let cells = &table["rows"][0]["cells"];
    Some((cells[1].as_str()?.into(), cells[3].as_str()?.into()))
}

/// Native sidecars (init containers with `restartPolicy: Always`), the same on the
/// embedded server and on a real control plane (then the real API server judges the
/// pods and the statuses): a container starts only once the sidecar before it has
/// started (its startup probe passed); sidecars are restarted whatever happens to them
/// (a crash, a failed liveness probe) and count their restarts; a sidecar's readiness is
/// the pod's; kubectl's READY counts sidecars; deleting the pod stops the container
/// first, then the sidecars, the last declared first, each once the ones before it in
/// that order have exited; a `restartPolicy: Never` pod whose container succeeds stops
/// its sidecar and succeeds. A restart policy a container may not have is refused.
async fn the_node_runs_native_sidecars(sim: sim::Simulation) {
    let client = sim.client();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    // What the containers tell the test: a directory of this machine, as a hostPath.
    let witness = sim.root.join("sidecar-witness");
    std::fs::create_dir_all(&witness).unwrap();
    let volumes = json!([{"name": "shared", "emptyDir": {}},
        {"name": "witness", "hostPath": {"path": witness.display().to_string()}}]);
    let mounts = json!([{"name": "shared", "mountPath": "/shared"},
        {"name": "witness", "mountPath": "/witness"}]);
    let exec = |script: &str, period: i64, failures: i64| {
        json!({"exec": {"command": ["sh", "-c", script]}, "periodSeconds": period,
            "failureThreshold": failures})
    };
    // Each run of a sidecar counts itself in the emptyDir; a SIGTERM tells the witness
    // what the sidecar then sees of the others.
    let count = |name: &str| {
        format!(
            "n=$(( $(cat /shared/{name}-runs 2>/dev/null || echo 0) + 1 )); echo $n > /shared/{name}-runs; "
        )
    };
    let proxy = count("proxy")
        + "trap '{ test -e /shared/main-done && echo main-done || echo main-running; \
           test -e /shared/logger-done-$(cat /shared/logger-runs) && echo logger-done || echo logger-running; \
           } > /witness/proxy-term-$n; touch /shared/proxy-term-$n; exit 0' TERM; \
           sleep 0.2; touch /shared/proxy-up-$n; \
           while true; do if [ $n = 1 ] && [ -e /shared/main-up ]; then exit 1; fi; sleep 0.05; done";
    let logger = count("logger")
        + "trap '{ test -e /shared/main-done && echo main-done || echo main-running; \
           test -e /shared/proxy-term-$(cat /shared/proxy-runs) && echo proxy-stopped || echo proxy-running; \
           } > /witness/logger-term-$n; sleep 0.1; touch /shared/logger-done-$n; exit 0' TERM; \
           while true; do sleep 0.05; done";
    let main = "test -e /shared/proxy-up-1 || { echo proxy-missing >> /witness/main-runs; exit 1; }; \
        echo proxy-up >> /witness/main-runs; \
        trap 'sleep 0.2; touch /shared/main-done; exit 0' TERM; \
        touch /shared/main-up; while true; do sleep 0.05; done";
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "sidecars"},
        "spec": {
            "terminationGracePeriodSeconds": 300,
            "volumes": volumes,
            "initContainers": [
                {"name": "proxy", "image": "proxy:1", "restartPolicy": "Always",
                    "volumeMounts": mounts, "command": ["sh", "-c", proxy],
                    "startupProbe": exec("test -e /shared/proxy-up-$(cat /shared/proxy-runs)", 1, 300),
                    "readinessProbe": exec("test ! -e /witness/proxy-unready", 1, 1)},
                {"name": "logger", "image": "logger:1", "restartPolicy": "Always",
                    "volumeMounts": mounts, "command": ["sh", "-c", logger],
                    // Fails once for each kill-logger file (which it takes away).
                    "livenessProbe": exec("! rm /witness/kill-logger 2>/dev/null", 1, 1)},
            ],
            "containers": [{"name": "main", "image": "app:1", "volumeMounts": mounts,
                "command": ["sh", "-c", main]}],
        }
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let status = |name: &'static str| {
        let pods = pods.clone();
        async move { pods.get(name).await.ok().map(|p| pod_status(&p)) }
    };
    let pod_ready = |s: &Value| {
        s["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    };
    let running = |c: &Value| c["state"]["running"].is_object() && c["started"] == true;
    // The proxy's first run crashes once the main container is up: it is restarted.
    let s = eventually_some(
        "the pod Ready with the proxy restarted once",
        Duration::from_secs(60),
        || async {
            let s = status("sidecars").await?;
            let proxy = &s["initContainerStatuses"][0];
            (pod_ready(&s)
                && proxy["restartCount"] == 1
                && running(proxy)
                && proxy["ready"] == true)
                .then_some(s)
        },
    )
    .await;
    let proxy = &s["initContainerStatuses"][0];
    assert_eq!(proxy["lastState"]["terminated"]["exitCode"], 1, "{s}");
    assert!(running(&s["initContainerStatuses"][1]), "{s}");
    let main_status = &s["containerStatuses"][0];
    assert_eq!(main_status["restartCount"], 0, "{s}");
    assert_eq!(s["phase"], "Running");
    assert_eq!(
        std::fs::read_to_string(witness.join("main-runs")).unwrap(),
        "proxy-up\n",
        "the main container started once, after the proxy had started"
    );
    let (ready, restarts) = eventually_some("the pod's Table row", Duration::from_secs(30), || {
        ready_and_restarts(&client, "sidecars")
    })
    .await;
    assert_eq!(ready, "3/3", "READY counts the sidecars");
    assert!(
        restarts.starts_with("1 ("),
        "RESTARTS counts the proxy's: {restarts}"
    );

    // The proxy's readiness is the pod's.
    std::fs::write(witness.join("proxy-unready"), b"").unwrap();
    eventually_some(
        "the pod not Ready while the proxy is not",
        Duration::from_secs(30),
        || async {
            let s = status("sidecars").await?;
            let proxy = &s["initContainerStatuses"][0];
            (!pod_ready(&s)
                && proxy["ready"] == false
                && s["containerStatuses"][0]["ready"] == true)
                .then_some(())
        },
    )
    .await;
    let (ready, _) = ready_and_restarts(&client, "sidecars").await.unwrap();
    assert_eq!(ready, "2/3");
    std::fs::remove_file(witness.join("proxy-unready")).unwrap();
    eventually_some("the pod Ready again", Duration::from_secs(30), || async {
        pod_ready(&status("sidecars").await?).then_some(())
    })
    .await;

    // A failing liveness probe restarts the logger (SIGTERM, then a new run).
    std::fs::write(witness.join("kill-logger"), b"").unwrap();
    eventually_some(
        "the logger restarted by its liveness probe",
        Duration::from_secs(30),
        || async {
            let s = status("sidecars").await?;
            let logger = &s["initContainerStatuses"][1];
            (logger["restartCount"] == 1 && running(logger)).then_some(())
        },
    )
    .await;
    assert!(witness.join("logger-term-1").exists());

    // Deletion: the main container first, then the logger, then the proxy.
    pods.delete("sidecars", &DeleteParams::default())
        .await
        .unwrap();
    eventually_some(
        "the node to delete the stopped pod",
        Duration::from_secs(60),
        || async { pods.get_opt("sidecars").await.ok()?.is_none().then_some(()) },
    )
    .await;
    let read = |f: &str| std::fs::read_to_string(witness.join(f)).unwrap_or_default();
    assert_eq!(
        read("logger-term-2"),
        "main-done\nproxy-running\n",
        "the logger stops after the main container and before the proxy"
    );
    assert_eq!(
        read("proxy-term-2"),
        "main-done\nlogger-done\n",
        "the proxy stops last"
    );
    assert_eq!(read("main-runs"), "proxy-up\n");

    // A pod that runs to completion stops its sidecar and succeeds. The sidecar is a
    // container of its own: its user, PID 1 of its own PID namespace.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&witness, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let helper = "trap 'echo stopped > /witness/helper-term; exit 0' TERM; \
        echo \"$(id -u) $$\" > /witness/helper-id; touch /shared/up; \
        while true; do sleep 0.05; done";
    let finisher: Pod = serde_json::from_value(json!({
        "metadata": {"name": "finisher"},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 300,
            "volumes": volumes,
            "initContainers": [{"name": "helper", "image": "helper:1", "restartPolicy": "Always",
                "securityContext": {"runAsUser": 1234},
                "volumeMounts": mounts, "command": ["sh", "-c", helper],
                "startupProbe": exec("test -e /shared/up", 1, 300)}],
            "containers": [{"name": "main", "image": "app:1", "command": ["sh", "-c", "exit 0"]}],
        }
    }))
    .unwrap();
    pods.create(&PostParams::default(), &finisher)
        .await
        .unwrap();
    let s = eventually_some(
        "the finisher to succeed",
        Duration::from_secs(60),
        || async {
            let s = status("finisher").await?;
            (s["phase"] == "Succeeded").then_some(s)
        },
    )
    .await;
    let helper = &s["initContainerStatuses"][0];
    assert_eq!(helper["state"]["terminated"]["exitCode"], 0, "{s}");
    assert_eq!(helper["restartCount"], 0, "{s}");
    let main_status = &s["containerStatuses"][0]["state"]["terminated"];
    assert_eq!(
        (
            main_status["exitCode"].as_i64(),
            main_status["reason"].as_str()
        ),
        (Some(0), Some("Completed")),
        "{s}"
    );
    assert!(!pod_ready(&s));
    assert_eq!(read("helper-term"), "stopped\n");
    if sim::isolate::available() {
        assert_eq!(
            read("helper-id"),
            "1234 1\n",
            "the sidecar's user, and PID 1"
        );
    }
    pods.delete("finisher", &DeleteParams::default())
        .await
        .unwrap();

    // A restart policy an init container may not have.
    let mut invalid = serde_json::to_value(&finisher).unwrap();
    invalid["metadata"]["name"] = json!("invalid-sidecar");
    invalid["spec"]["initContainers"][0]["restartPolicy"] = json!("Sometimes");
    let invalid: Pod = serde_json::from_value(invalid).unwrap();
    let (code, _, message) = api_code(
        pods.create(&PostParams::default(), &invalid)
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 422);
    assert!(
        message.contains(
            "spec.initContainers[0].restartPolicy: Unsupported value: \"Sometimes\": supported values: \"Always\", \"Never\", \"OnFailure\""
        ),
        "{message}"
    );
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(&witness);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_runs_native_sidecars_on_the_embedded_server() {
    let sim = common::simulation("amqp://guest:guest@127.0.0.1:5672/%2f", 100.0).await;
    the_node_runs_native_sidecars(sim).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real control plane: bash tests/control-plane/build.sh, then cargo test -- --include-ignored (bash tests/run.sh does both)"]
async fn the_node_runs_native_sidecars_on_a_real_control_plane() {
    let sim = sim::Simulation::start_on_control_plane(
        &control_plane_bin(),
        common::options("amqp://guest:guest@127.0.0.1:5672/%2f", 100.0),
    )
    .await
    .unwrap_or_else(|e| panic!("the control plane did not start: {e}"));
    the_node_runs_native_sidecars(sim).await;
}

/// The hollow node (for footprint benchmarks): a pod is Running and Ready at once,
/// its sidecar up and its init container completed, though its commands would fail;
/// nothing runs, so nothing is logged; a deleted pod goes at once.
#[tokio::test]
async fn a_hollow_node_marks_pods_ready_without_running_them() {
    let marker = std::env::temp_dir().join(format!("hollow-ran-{}", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    let touch = format!("touch {}; exit 1", marker.display());
    let options = sim::Options {
        hollow: true,
        ..sim::Options::new(env!("CARGO_BIN_EXE_testrunner-operator").into())
    };
    let sim = sim::Simulation::start("127.0.0.1:0".parse().unwrap(), options)
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(sim.client(), "default");
    let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "hollow"},
        "spec": {"terminationGracePeriodSeconds": 600,
            "initContainers": [
                {"name": "setup", "image": "x", "command": ["sh", "-c", touch]},
                {"name": "side", "image": "x", "restartPolicy": "Always", "command": ["sh", "-c", touch]}],
            "containers": [{"name": "main", "image": "x", "command": ["sh", "-c", touch]}]}}))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let ready = eventually_some(
        "the hollow pod to be Ready",
        Duration::from_secs(20),
        || async {
            let p = pods.get("hollow").await.ok()?;
            let status = p.status?;
            let ready = status
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            ready.then_some(status)
        },
    )
    .await;
    assert_eq!(ready.phase.as_deref(), Some("Running"));
    let init = ready.init_container_statuses.unwrap();
    assert!(init[0].state.as_ref().unwrap().terminated.is_some());
    assert!(init[1].ready && init[1].state.as_ref().unwrap().running.is_some());
    assert!(ready.container_statuses.unwrap()[0].ready);
    assert!(!marker.exists(), "no container ran");
    pods.delete("hollow", &DeleteParams::default())
        .await
        .unwrap();
    eventually_some(
        "the deleted hollow pod to go at once",
        Duration::from_secs(10),
        || async {
            pods.get_opt("hollow")
                .await
                .unwrap()
                .is_none()
                .then_some(())
        },
    )
    .await;
    sim.shutdown().await;
}
