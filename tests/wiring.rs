//! The controller's wiring at the Kubernetes API level: kube's own `Client` over a
//! tower-test mock service that plays the API server and checks each request.

use std::sync::Arc;
use std::time::Duration;

use futures::channel::mpsc;
use http::{Method, Request, Response};
use kube::Client;
use kube::client::Body;
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::reflector::store::Writer;
use serde_json::{Value, json};
use testrunner_operator::broker::Brokers;
use testrunner_operator::controller::{self, Context, Probes, Settings};
use testrunner_operator::crd::TestRunnerPool;
use testrunner_operator::metrics::Metrics;
use testrunner_operator::pods::PodSettings;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

fn pool() -> TestRunnerPool {
    serde_json::from_value(json!({
        "apiVersion": "testrunner.dev/v1alpha1",
        "kind": "TestRunnerPool",
        "metadata": {"name": "unit", "namespace": "ci", "uid": "11111111-2222-3333-4444-555555555555", "generation": 3},
        "spec": {
            "image": "registry.example/test-runner:7",
            "command": ["/run-tests", "--fast"],
            "queue": {"name": "tickets.unit", "connectionSecretRef": {"name": "rabbitmq", "key": "uri"}},
            "scaling": {"minWorkers": 2, "maxWorkers": 4}
        }
    }))
    .unwrap()
}

fn context(client: Client) -> Arc<Context> {
    let metrics = Arc::new(Metrics::default());
    // An empty store: the probe task sees no pool and stays quiet.
    let store = Writer::<DeserializeGuard<TestRunnerPool>>::default().as_reader();
    let (tx, _rx) = mpsc::unbounded();
    let probes = Probes::new(Brokers::default(), metrics.clone(), store, tx);
    let settings = Settings {
        pods: PodSettings {
            operator_image: "registry.example/testrunner-operator:0.1.0".into(),
            report_interval: testrunner_operator::pods::REPORT_INTERVAL,
            log_format: testrunner_operator::telemetry::LogFormat::Pretty,
            outcome_queue_prefix: testrunner_operator::pods::DEFAULT_OUTCOME_QUEUE_PREFIX.into(),
        },
        namespaces: vec![],
        controller_name: "testrunner-operator".into(),
        instance: Some("test".into()),
    };
    Arc::new(Context::new(client, metrics, settings, probes))
}

fn respond(send: tower_test::mock::SendResponse<Response<Body>>, status: u16, body: Value) {
    send.send_response(
        Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap(),
    );
}

async fn next(
    handle: &mut Handle,
) -> (
    Method,
    String,
    Value,
    tower_test::mock::SendResponse<Response<Body>>,
) {
    let (req, send) = handle.next_request().await.expect("a request");
    let method = req.method().clone();
    let uri = req.uri().to_string();
    let bytes = req.into_body().collect_bytes().await.unwrap();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    (method, uri, body, send)
}

/// Answers the reconcile's read of the latest pool.
async fn serve_pool(handle: &mut Handle) {
    let (m, uri, _, send) = next(handle).await;
    assert_eq!(
        (m, uri.as_str()),
        (
            Method::GET,
            "/apis/testrunner.dev/v1alpha1/namespaces/ci/testrunnerpools/unit"
        )
    );
    respond(send, 200, serde_json::to_value(pool()).unwrap());
}

/// Answers the reconcile's list of the pool's ControllerRevisions (none yet), then its
/// create of the first one, which it checks: `<pool>-<revision>`, owned by the pool,
/// marked stable, holding the workload.
async fn serve_first_revision(handle: &mut Handle) {
    let (m, uri, _, send) = next(handle).await;
    assert_eq!(m, Method::GET);
    assert!(
        uri.starts_with("/apis/apps/v1/namespaces/ci/controllerrevisions?&labelSelector="),
        "{uri}"
    );
    respond(
        send,
        200,
        json!({"apiVersion": "apps/v1", "kind": "ControllerRevisionList", "metadata": {"resourceVersion": "1"}, "items": []}),
    );
    let (m, uri, body, send) = next(handle).await;
    assert_eq!(m, Method::POST);
    assert!(
        uri.starts_with("/apis/apps/v1/namespaces/ci/controllerrevisions?")
            && uri.contains("fieldManager=testrunner-operator"),
        "{uri}"
    );
    let revision = body["metadata"]["labels"]["testrunner.dev/revision"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(body["metadata"]["name"], format!("unit-{revision}"));
    assert_eq!(body["metadata"]["labels"]["testrunner.dev/stable"], "true");
    assert_eq!(
        body["metadata"]["ownerReferences"][0]["kind"],
        "TestRunnerPool"
    );
    assert_eq!(body["revision"], 1);
    assert_eq!(body["data"]["image"], "registry.example/test-runner:7");
    respond(send, 201, body);
}

fn secret(value: &str) -> Value {
    use base64::Engine;
    json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "rabbitmq", "namespace": "ci"},
           "data": {"uri": base64::engine::general_purpose::STANDARD.encode(value)}})
}

fn empty_pod_list() -> Value {
    json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "1"}, "items": []})
}

#[tokio::test]
async fn reconcile_creates_owned_pods_publishes_events_and_writes_status() {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let ctx = context(Client::new(service, "default"));
    let guarded = Arc::new(DeserializeGuard(Ok(pool())));
    let reconcile = tokio::spawn(controller::reconcile(guarded, ctx));

    serve_pool(&mut handle).await;
    let (m, uri, _, send) = next(&mut handle).await;
    assert_eq!(
        (m, uri.as_str()),
        (Method::GET, "/api/v1/namespaces/ci/secrets/rabbitmq")
    );
    respond(
        send,
        200,
        secret("amqp://ci:hunter2@rabbit.example:5672/%2f"),
    );

    let (m, uri, _, send) = next(&mut handle).await;
    assert_eq!(m, Method::GET);
    assert!(
        uri.starts_with("/api/v1/namespaces/ci/pods?&labelSelector="),
        "{uri}"
    );
    assert!(uri.contains("testrunner.dev%2Fpool%3Dunit"), "{uri}");
    respond(send, 200, empty_pod_list());
    serve_first_revision(&mut handle).await;

    // No probe yet: the pool holds minWorkers, so two pods are applied.
    let mut pods = Vec::new();
    for _ in 0..2 {
        let (m, uri, body, send) = next(&mut handle).await;
        assert_eq!(m, Method::PATCH);
        assert!(
            uri.contains("fieldManager=testrunner-operator") && uri.contains("force=true"),
            "{uri}"
        );
        let name = body["metadata"]["name"].as_str().unwrap().to_string();
        assert!(
            uri.starts_with(&format!("/api/v1/namespaces/ci/pods/{name}?")),
            "{uri}"
        );
        respond(send, 200, body.clone());
        pods.push(body);
    }
    for pod in &pods {
        let name = pod["metadata"]["name"].as_str().unwrap();
        assert!(
            name.starts_with("unit-") && name.len() == "unit-".len() + 5,
            "{name}"
        );
        let labels = &pod["metadata"]["labels"];
        assert_eq!(labels["testrunner.dev/pool"], "unit");
        assert_eq!(
            labels["app.kubernetes.io/managed-by"],
            "testrunner-operator"
        );
        assert_eq!(labels["app.kubernetes.io/name"], "testrunner-worker");
        assert_eq!(
            labels["testrunner.dev/revision"].as_str().unwrap().len(),
            10
        );
        let owner = &pod["metadata"]["ownerReferences"][0];
        assert_eq!(owner["kind"], "TestRunnerPool");
        assert_eq!(owner["uid"], "11111111-2222-3333-4444-555555555555");
        assert_eq!(owner["controller"], true);
        let spec = &pod["spec"];
        assert_eq!(spec["restartPolicy"], "Always");
        let worker = &spec["containers"][0];
        assert_eq!(worker["image"], "registry.example/test-runner:7");
        assert_eq!(worker["terminationMessagePolicy"], "FallbackToLogsOnError");
        assert_eq!(
            worker["args"],
            json!(["worker", "--", "/run-tests", "--fast"])
        );
        let get_in = |c: &Value, n: &str| {
            c["env"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["name"] == n)
                .cloned()
                .unwrap_or(Value::Null)
        };
        assert_eq!(get_in(worker, "TESTRUNNER_POOL")["value"], "unit");
        // The queue and the credentials go to the broker sidecar only.
        let sidecar = &spec["initContainers"][1];
        assert_eq!(sidecar["name"], "broker");
        assert_eq!(sidecar["restartPolicy"], "Always");
        assert_eq!(get_in(worker, "TESTRUNNER_AMQP_URI"), Value::Null);
        assert_eq!(get_in(sidecar, "TESTRUNNER_QUEUE")["value"], "tickets.unit");
        let uri_env = get_in(sidecar, "TESTRUNNER_AMQP_URI");
        assert!(uri_env.get("value").is_none(), "the URI is never a literal");
        assert_eq!(
            uri_env["valueFrom"]["secretKeyRef"],
            json!({"name": "rabbitmq", "key": "uri", "optional": false})
        );
        assert_eq!(
            spec["initContainers"][0]["image"],
            "registry.example/testrunner-operator:0.1.0"
        );
        assert_eq!(spec["securityContext"]["runAsNonRoot"], true);
        assert_eq!(
            worker["securityContext"]["capabilities"]["drop"],
            json!(["ALL"])
        );
        assert!(!pod.to_string().contains("hunter2"));
    }

    // ScaledUp event through events.k8s.io.
    let (m, uri, body, send) = next(&mut handle).await;
    assert_eq!(
        (m, uri.as_str()),
        (Method::POST, "/apis/events.k8s.io/v1/namespaces/ci/events?")
    );
    assert_eq!(body["reason"], "ScaledUp");
    assert_eq!(body["type"], "Normal");
    assert_eq!(body["regarding"]["name"], "unit");
    assert_eq!(body["reportingController"], "testrunner-operator");
    respond(send, 201, body);

    // Status through server-side apply on the status subresource.
    let (m, uri, body, send) = next(&mut handle).await;
    assert_eq!(m, Method::PATCH);
    assert!(
        uri.starts_with("/apis/testrunner.dev/v1alpha1/namespaces/ci/testrunnerpools/unit/status?"),
        "{uri}"
    );
    assert!(uri.contains("fieldManager=testrunner-operator"), "{uri}");
    let status = &body["status"];
    assert_eq!(status["observedGeneration"], 3);
    assert_eq!(
        status["workers"],
        json!({"desired": 2, "current": 0, "ready": 0, "busy": 0})
    );
    assert_eq!(status["phase"], "Scaling");
    let broker = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "BrokerReachable")
        .unwrap();
    assert_eq!(broker["status"], "Unknown");
    assert!(!body.to_string().contains("hunter2"), "no secret in status");
    respond(
        send,
        200,
        json!({"apiVersion": "testrunner.dev/v1alpha1", "kind": "TestRunnerPool", "metadata": {"name": "unit", "namespace": "ci"}, "spec": pool().spec, "status": status}),
    );

    let action = reconcile.await.unwrap().expect("reconcile succeeds");
    // Nothing to wait for but the periodic resync.
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
}

#[tokio::test]
async fn a_missing_secret_becomes_a_condition_and_a_warning() {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let ctx = context(Client::new(service, "default"));
    let reconcile = tokio::spawn(controller::reconcile(
        Arc::new(DeserializeGuard(Ok(pool()))),
        ctx,
    ));
    serve_pool(&mut handle).await;

    let (_, uri, _, send) = next(&mut handle).await;
    assert!(uri.ends_with("/secrets/rabbitmq"));
    respond(
        send,
        404,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "secrets \"rabbitmq\" not found"}),
    );

    let (_, uri, _, send) = next(&mut handle).await;
    assert!(uri.contains("/pods?"));
    respond(send, 200, empty_pod_list());
    serve_first_revision(&mut handle).await;

    // Nothing is created; a Warning event says what is wrong.
    let (m, _, body, send) = next(&mut handle).await;
    assert_eq!(m, Method::POST);
    assert_eq!(
        (body["type"].as_str(), body["reason"].as_str()),
        (Some("Warning"), Some("InvalidSpec"))
    );
    assert!(
        body["note"]
            .as_str()
            .unwrap()
            .contains("Secret \"rabbitmq\"")
    );
    respond(send, 201, body);

    let (m, _, body, send) = next(&mut handle).await;
    assert_eq!(m, Method::PATCH);
    let degraded = body["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Degraded")
        .unwrap()
        .clone();
    assert_eq!(
        (degraded["status"].as_str(), degraded["reason"].as_str()),
        (Some("True"), Some("SecretNotFound"))
    );
    assert_eq!(body["status"]["phase"], "Degraded");
    respond(
        send,
        200,
        json!({"apiVersion": "testrunner.dev/v1alpha1", "kind": "TestRunnerPool", "metadata": {"name": "unit", "namespace": "ci"}, "spec": pool().spec}),
    );

    reconcile
        .await
        .unwrap()
        .expect("a spec problem is not a reconcile error");
}

#[tokio::test]
async fn api_errors_fail_the_reconcile_with_a_category() {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let ctx = context(Client::new(service, "default"));
    let reconcile = tokio::spawn(controller::reconcile(
        Arc::new(DeserializeGuard(Ok(pool()))),
        ctx,
    ));
    serve_pool(&mut handle).await;
    let (_, _, _, send) = next(&mut handle).await;
    respond(send, 200, secret("amqp://ci:pw@rabbit.example/%2f"));
    let (_, _, _, send) = next(&mut handle).await;
    respond(
        send,
        500,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "InternalError", "code": 500, "message": "etcd is down"}),
    );
    let err = reconcile.await.unwrap().expect_err("the reconcile fails");
    assert_eq!(err.category(), "ListPodsFailed");
    assert!(
        err.to_string().starts_with("failed to list worker pods"),
        "{err}"
    );
}

#[tokio::test]
async fn a_failing_pool_is_reconciled_again_at_its_retry_or_when_its_spec_changes() {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let ctx = context(Client::new(service, "default"));
    let guarded = Arc::new(DeserializeGuard(Ok(pool())));
    let pool_uri = "/apis/testrunner.dev/v1alpha1/namespaces/ci/testrunnerpools/unit";
    let internal_error = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
        "reason": "InternalError", "code": 500, "message": "etcd is down"});

    // The reconcile fails at its first request; its retry is due in a second.
    let reconcile = tokio::spawn(controller::reconcile(guarded.clone(), ctx.clone()));
    let (m, uri, _, send) = next(&mut handle).await;
    assert_eq!((m, uri.as_str()), (Method::GET, pool_uri));
    respond(send, 500, internal_error.clone());
    let error = reconcile.await.unwrap().expect_err("the reconcile fails");
    let action = controller::error_policy(guarded.clone(), &error, ctx.clone());
    assert_eq!(action, Action::requeue(Duration::from_secs(1)));
    let (m, uri, body, send) = next(&mut handle).await;
    assert_eq!(
        (m, uri.as_str(), body["reason"].as_str()),
        (
            Method::POST,
            "/apis/events.k8s.io/v1/namespaces/ci/events?",
            Some("ReadPoolFailed")
        )
    );
    respond(send, 201, body);

    // A wake before then (the queue probe, a pod) waits for the retry, sending nothing.
    let held = tokio::time::timeout(
        Duration::from_millis(500),
        controller::reconcile(guarded.clone(), ctx.clone()),
    )
    .await
    .expect("a held reconcile sends no request")
    .expect("a held reconcile is no failure");
    assert_ne!(held, Action::await_change());
    assert!(
        tokio::time::timeout(Duration::from_millis(100), handle.next_request())
            .await
            .is_err(),
        "no request before the retry"
    );

    // A changed spec is reconciled at once.
    let mut changed = pool();
    changed.metadata.generation = Some(4);
    let reconcile = tokio::spawn(controller::reconcile(
        Arc::new(DeserializeGuard(Ok(changed))),
        ctx.clone(),
    ));
    let (m, uri, _, _send) = next(&mut handle).await;
    assert_eq!((m, uri.as_str()), (Method::GET, pool_uri));
    reconcile.abort();

    // And the unchanged pool once its retry is due.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let reconcile = tokio::spawn(controller::reconcile(guarded, ctx));
    let (m, uri, _, _send) = next(&mut handle).await;
    assert_eq!((m, uri.as_str()), (Method::GET, pool_uri));
    reconcile.abort();
}

#[tokio::test]
async fn a_malformed_pool_is_reported_once_and_waits_for_a_change() {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use kube::core::error_boundary::InvalidObject;

    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let ctx = context(Client::new(service, "default"));
    let guarded = Arc::new(DeserializeGuard::<TestRunnerPool>(Err(InvalidObject {
        error: "spec.scaling.maxWorkers: invalid type: string \"many\", expected i32".into(),
        metadata: ObjectMeta {
            name: Some("broken".into()),
            namespace: Some("ci".into()),
            uid: Some("99999999-2222-3333-4444-555555555555".into()),
            ..Default::default()
        },
    })));
    let error = controller::reconcile(guarded.clone(), ctx.clone())
        .await
        .expect_err("a malformed pool cannot be reconciled");
    assert_eq!(error.category(), "InvalidObject");
    let action = controller::error_policy(guarded, &error, ctx);
    assert_eq!(action, Action::await_change());

    let (m, uri, body, send) = next(&mut handle).await;
    assert_eq!(
        (m, uri.as_str()),
        (Method::POST, "/apis/events.k8s.io/v1/namespaces/ci/events?")
    );
    assert_eq!(
        (body["type"].as_str(), body["reason"].as_str()),
        (Some("Warning"), Some("InvalidSpec"))
    );
    assert_eq!(body["regarding"]["name"], "broken");
    assert!(
        body["note"]
            .as_str()
            .unwrap()
            .contains("spec.scaling.maxWorkers"),
        "{body}"
    );
    respond(send, 201, body);
}
