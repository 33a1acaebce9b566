//! Alert delivery against a local HTTP receiver playing Alertmanager and a webhook.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use jiff::Timestamp;
use serde_json::{Value, json};
use testrunner_operator::alerts::{Alerter, AlerterConfig, Receivers};
use testrunner_operator::core::alerting::{Alert, Severity, names};
use testrunner_operator::metrics::Metrics;
use tokio::time::Instant;

mod common;
use common::{eventually, eventually_some};

// ---------------------------------------------------------------------------------------
// A receiver that records every request.

#[derive(Clone, Debug)]
struct Hit {
    path: String,
    body: Value,
    authorization: Option<String>,
    at: Instant,
    answered: u16,
}

#[derive(Clone, Default)]
struct Recorder {
    hits: Arc<Mutex<Vec<Hit>>>,
    status: Arc<AtomicU16>,
}

impl Recorder {
    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    fn answer(&self, code: u16) {
        self.status.store(code, Ordering::SeqCst);
    }
}

async fn record(State(rec): State<Recorder>, req: Request) -> StatusCode {
    let path = req.uri().path().to_string();
    let authorization = req
        .headers()
        .get("authorization")
        .map(|v| v.to_str().unwrap().to_string());
    let bytes = axum::body::to_bytes(req.into_body(), 1 << 20)
        .await
        .unwrap();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let answered = rec.status.load(Ordering::SeqCst);
    rec.hits.lock().unwrap().push(Hit {
        path,
        body,
        authorization,
        at: Instant::now(),
        answered,
    });
    StatusCode::from_u16(answered).unwrap()
}

async fn receiver_on(listener: tokio::net::TcpListener) -> Recorder {
    let rec = Recorder::default();
    rec.answer(200);
    let app = Router::new().fallback(record).with_state(rec.clone());
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    rec
}

async fn receiver() -> (Recorder, SocketAddr) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (receiver_on(listener).await, addr)
}

/// A port where nothing listens (connection refused) until someone binds it again.
async fn free_port() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

// ---------------------------------------------------------------------------------------
// Helpers

static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct Capture;

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every log line of this test binary, at TRACE, from every crate.
fn capture_logs() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(|| Capture)
            .init();
    });
}

fn logs() -> String {
    String::from_utf8_lossy(&LOGS.lock().unwrap()).into_owned()
}

fn fast() -> AlerterConfig {
    AlerterConfig {
        resend_interval: Duration::from_millis(200),
        request_timeout: Duration::from_secs(2),
        backoff_initial: Duration::from_millis(50),
        backoff_max: Duration::from_millis(400),
    }
}

fn alert(name: &str, ticket: Option<&str>) -> Alert {
    Alert {
        name: name.into(),
        severity: Severity::Critical,
        namespace: "ci".into(),
        pool: "unit".into(),
        ticket: ticket.map(Into::into),
        summary: format!("{name} on ci/unit"),
        description: "three workers crashed on ticket t-1".into(),
        starts_at: "2026-11-28T04:00:00.5Z".parse().unwrap(),
    }
}

fn am(addr: SocketAddr) -> Receivers {
    Receivers {
        alertmanager_url: Some(format!("http://{addr}").parse().unwrap()),
        webhook_url: None,
    }
}

fn metric(metrics: &Metrics, series: &str) -> f64 {
    metrics
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

const SENT_AM_FIRING: &str =
    r#"testrunner_alerts_sent_total{receiver="alertmanager",status="firing"}"#;
const SENT_AM_RESOLVED: &str =
    r#"testrunner_alerts_sent_total{receiver="alertmanager",status="resolved"}"#;
const FAILED_AM: &str = r#"testrunner_alert_send_failures_total{receiver="alertmanager"}"#;
const ACTIVE_UNIT: &str = r#"testrunner_alerts_active{namespace="ci",pool="unit"}"#;

fn alertname(a: &Value) -> &str {
    a["labels"]["alertname"].as_str().unwrap()
}

// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn alertmanager_gets_the_v2_shape_resent_while_active_and_resolved_on_removal() {
    let (rec, addr) = receiver().await;
    let metrics = Arc::new(Metrics::default());
    let alerter = Alerter::start(fast(), metrics.clone());
    let poison = alert(names::POISON_TICKET, Some("t-1"));
    let mut stalled = alert(names::QUEUE_STALLED, None);
    stalled.severity = Severity::Warning;
    alerter.sync(
        ("ci", "unit"),
        am(addr),
        vec![poison.clone(), stalled.clone()],
    );
    assert_eq!(metric(&metrics, ACTIVE_UNIT), 2.0);

    let first = eventually_some("the first post", Duration::from_secs(5), async || {
        rec.hits().first().cloned()
    })
    .await;
    assert_eq!(first.path, "/api/v2/alerts");
    let mut alerts = first.body.as_array().expect("a JSON array").clone();
    alerts.sort_by_key(|a| alertname(a).to_string());
    assert_eq!(
        alerts,
        vec![
            json!({
                "labels": {"alertname": "TestRunnerPoisonTicket", "namespace": "ci", "pool": "unit",
                           "ticket": "t-1", "severity": "critical"},
                "annotations": {"summary": "TestRunnerPoisonTicket on ci/unit",
                                "description": "three workers crashed on ticket t-1"},
                "startsAt": "2026-11-28T04:00:00.5Z",
            }),
            json!({
                "labels": {"alertname": "TestRunnerQueueStalled", "namespace": "ci", "pool": "unit",
                           "severity": "warning"},
                "annotations": {"summary": "TestRunnerQueueStalled on ci/unit",
                                "description": "three workers crashed on ticket t-1"},
                "startsAt": "2026-11-28T04:00:00.5Z",
            }),
        ]
    );

    // Re-sent while active, about every resend interval, also with no new sync.
    let hits = eventually_some("two re-sends", Duration::from_secs(5), async || {
        let h = rec.hits();
        (h.len() >= 3).then_some(h)
    })
    .await;
    for pair in hits.windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(
            gap >= Duration::from_millis(150),
            "re-sent too early: {gap:?}"
        );
        assert!(
            gap <= Duration::from_millis(1500),
            "re-sent too late: {gap:?}"
        );
        assert_eq!(pair[1].body.as_array().unwrap().len(), 2);
    }
    // The reconciler calling sync again with the same set sends nothing extra.
    for _ in 0..20 {
        alerter.sync(
            ("ci", "unit"),
            am(addr),
            vec![poison.clone(), stalled.clone()],
        );
    }

    // The poison alert leaves the active set: sent once more with endsAt.
    let before = Timestamp::now();
    alerter.sync(("ci", "unit"), am(addr), vec![stalled.clone()]);
    assert_eq!(metric(&metrics, ACTIVE_UNIT), 1.0);
    let resolve = eventually_some("the resolve", Duration::from_secs(5), async || {
        rec.hits().into_iter().find_map(|h| {
            h.body
                .as_array()
                .unwrap()
                .iter()
                .find(|a| alertname(a) == names::POISON_TICKET && a.get("endsAt").is_some())
                .cloned()
        })
    })
    .await;
    let ends_at: Timestamp = resolve["endsAt"]
        .as_str()
        .unwrap()
        .parse()
        .expect("RFC 3339");
    assert!(
        ends_at >= before && ends_at <= Timestamp::now(),
        "{ends_at}"
    );
    assert_eq!(resolve["labels"]["ticket"], "t-1");
    assert_eq!(resolve["startsAt"], "2026-11-28T04:00:00.5Z");

    // Then it is gone, while the other one keeps being re-sent.
    let n = rec.hits().len();
    let later = eventually_some("two more re-sends", Duration::from_secs(5), async || {
        let h = rec.hits();
        (h.len() >= n + 2).then(|| h[n..].to_vec())
    })
    .await;
    for hit in later {
        let names: Vec<&str> = hit.body.as_array().unwrap().iter().map(alertname).collect();
        assert_eq!(names, vec![names::QUEUE_STALLED]);
    }
    assert_eq!(metric(&metrics, SENT_AM_RESOLVED), 1.0);
    assert!(metric(&metrics, SENT_AM_FIRING) >= 5.0);
    assert_eq!(metric(&metrics, FAILED_AM), 0.0);
}

#[tokio::test]
async fn forget_resolves_every_alert_of_the_pool() {
    let (rec, addr) = receiver().await;
    let metrics = Arc::new(Metrics::default());
    let alerter = Alerter::start(fast(), metrics.clone());
    let crash = alert(names::WORKER_CRASH, None);
    let broken = alert(names::BROKEN_ENVIRONMENT, None);
    alerter.sync(("ci", "unit"), am(addr), vec![crash, broken]);
    eventually_some("the firing post", Duration::from_secs(5), async || {
        rec.hits().first().cloned()
    })
    .await;

    alerter.forget(("ci", "unit"));
    assert!(
        !metrics.encode().contains(ACTIVE_UNIT),
        "the pool's gauge is removed"
    );
    let resolved = eventually_some("both resolved", Duration::from_secs(5), async || {
        rec.hits().into_iter().find(|h| {
            let alerts = h.body.as_array().unwrap();
            alerts.len() == 2 && alerts.iter().all(|a| a.get("endsAt").is_some())
        })
    })
    .await;
    assert_eq!(resolved.path, "/api/v2/alerts");
    eventually("the resolves counted", Duration::from_secs(5), async || {
        metric(&metrics, SENT_AM_RESOLVED) == 2.0
    })
    .await;
}

#[tokio::test]
async fn webhook_gets_one_firing_and_one_resolved_per_alert() {
    let (hook, hook_addr) = receiver().await;
    let (clock, clock_addr) = receiver().await;
    let metrics = Arc::new(Metrics::default());
    let alerter = Alerter::start(fast(), metrics.clone());
    let path = "/hooks/T000/SECRET-TOKEN-dedup";
    let receivers = Receivers {
        alertmanager_url: None,
        webhook_url: Some(format!("http://{hook_addr}{path}")),
    };
    let a = alert(names::WORKER_CRASH, Some("t-7"));
    let b = alert(names::BROKER_UNREACHABLE, None);
    // A second pool sends to a separate Alertmanager: its re-sends show time passing
    // through the same delivery task.
    let mut tick = alert(names::QUEUE_STALLED, None);
    tick.pool = "clock".into();

    for _ in 0..10 {
        alerter.sync(("ci", "unit"), receivers.clone(), vec![a.clone()]);
        alerter.sync(("ci", "clock"), am(clock_addr), vec![tick.clone()]);
    }
    eventually("firing A", Duration::from_secs(5), async || {
        hook.hits().len() == 1
    })
    .await;
    for _ in 0..10 {
        alerter.sync(
            ("ci", "unit"),
            receivers.clone(),
            vec![a.clone(), b.clone()],
        );
    }
    eventually("firing B", Duration::from_secs(5), async || {
        hook.hits().len() == 2
    })
    .await;
    alerter.sync(("ci", "unit"), receivers.clone(), vec![b.clone()]);
    eventually("resolved A", Duration::from_secs(5), async || {
        hook.hits().len() == 3
    })
    .await;
    alerter.forget(("ci", "unit"));
    eventually("resolved B", Duration::from_secs(5), async || {
        hook.hits().len() == 4
    })
    .await;

    // Nothing more comes, while the other pool is re-sent three more times.
    let n = clock.hits().len();
    eventually("three clock ticks", Duration::from_secs(5), async || {
        clock.hits().len() >= n + 3
    })
    .await;
    let hits = hook.hits();
    assert_eq!(hits.len(), 4, "{hits:#?}");
    let seen: Vec<(String, String, bool)> = hits
        .iter()
        .map(|h| {
            assert_eq!(h.path, path);
            let alerts = h.body["alerts"].as_array().unwrap();
            assert_eq!(alerts.len(), 1, "{:?}", h.body);
            (
                h.body["status"].as_str().unwrap().to_string(),
                alertname(&alerts[0]).to_string(),
                alerts[0].get("endsAt").is_some(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            ("firing".into(), names::WORKER_CRASH.into(), false),
            ("firing".into(), names::BROKER_UNREACHABLE.into(), false),
            ("resolved".into(), names::WORKER_CRASH.into(), true),
            ("resolved".into(), names::BROKER_UNREACHABLE.into(), true),
        ]
    );
    assert_eq!(hits[0].body["alerts"][0]["labels"]["ticket"], "t-7");
    assert_eq!(
        hits[0].body["alerts"][0]["annotations"]["summary"],
        "TestRunnerWorkerCrash on ci/unit"
    );
    assert_eq!(
        metric(
            &metrics,
            r#"testrunner_alerts_sent_total{receiver="webhook",status="firing"}"#
        ),
        2.0
    );
    assert_eq!(
        metric(
            &metrics,
            r#"testrunner_alerts_sent_total{receiver="webhook",status="resolved"}"#
        ),
        2.0
    );
}

#[tokio::test]
async fn a_receiver_that_is_down_gets_the_alert_and_its_pending_resolve_once_up() {
    let addr = free_port().await;
    let metrics = Arc::new(Metrics::default());
    let alerter = Alerter::start(fast(), metrics.clone());
    let crash = alert(names::WORKER_CRASH, None);
    alerter.sync(("ci", "unit"), am(addr), vec![crash.clone()]);
    eventually("failures counted", Duration::from_secs(5), async || {
        metric(&metrics, FAILED_AM) >= 3.0
    })
    .await;
    // The alert ends while the receiver is still down: the resolve must wait, not vanish.
    alerter.sync(("ci", "unit"), am(addr), vec![]);
    let failed = metric(&metrics, FAILED_AM);
    eventually("more failures", Duration::from_secs(5), async || {
        metric(&metrics, FAILED_AM) > failed
    })
    .await;

    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let rec = receiver_on(listener).await;
    let hit = eventually_some(
        "the resolve after recovery",
        Duration::from_secs(5),
        async || rec.hits().first().cloned(),
    )
    .await;
    let alerts = hit.body.as_array().unwrap();
    assert_eq!(alerts.len(), 1);
    assert_eq!(alertname(&alerts[0]), names::WORKER_CRASH);
    assert!(alerts[0]["endsAt"].is_string(), "{alerts:?}");
    eventually("the resolve counted", Duration::from_secs(5), async || {
        metric(&metrics, SENT_AM_RESOLVED) == 1.0
    })
    .await;
}

#[tokio::test]
async fn server_errors_are_retried_with_growing_capped_backoff() {
    let (rec, addr) = receiver().await;
    rec.answer(500);
    let metrics = Arc::new(Metrics::default());
    let alerter = Alerter::start(fast(), metrics.clone());
    alerter.sync(
        ("ci", "unit"),
        am(addr),
        vec![alert(names::BROKEN_ENVIRONMENT, None)],
    );
    let hits = eventually_some("six attempts", Duration::from_secs(10), async || {
        let h = rec.hits();
        (h.len() >= 6).then_some(h)
    })
    .await;
    let gaps: Vec<Duration> = hits.windows(2).map(|p| p[1].at - p[0].at).collect();
    // Delays are drawn from [d/2, d] with d = 50, 100, 200, 400 (cap), 400 ms.
    assert!(gaps[0] <= Duration::from_millis(150), "{gaps:?}");
    assert!(gaps[3] >= Duration::from_millis(190), "{gaps:?}");
    assert!(gaps[3] > gaps[0], "{gaps:?}");
    for gap in &gaps {
        assert!(
            *gap <= Duration::from_millis(900),
            "the cap holds: {gaps:?}"
        );
    }
    assert!(metric(&metrics, FAILED_AM) >= 5.0);

    rec.answer(200);
    eventually(
        "delivered once the receiver recovers",
        Duration::from_secs(5),
        async || metric(&metrics, SENT_AM_FIRING) >= 1.0,
    )
    .await;
    assert!(rec.hits().iter().any(|h| h.answered == 200));
}

#[tokio::test]
async fn sync_never_blocks_and_requests_time_out() {
    // Accepts connections (the kernel's backlog) but never answers.
    let black_hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = black_hole.local_addr().unwrap();
    let metrics = Arc::new(Metrics::default());
    let config = AlerterConfig {
        request_timeout: Duration::from_millis(200),
        ..fast()
    };
    let alerter = Alerter::start(config, metrics.clone());
    let receivers = Receivers {
        alertmanager_url: Some(format!("http://{addr}").parse().unwrap()),
        webhook_url: Some(format!("http://{addr}/hook/SECRET-TOKEN-blackhole")),
    };
    let started = std::time::Instant::now();
    for i in 0..2000 {
        let ticket = format!("t-{}", i % 50);
        alerter.sync(
            ("ci", "unit"),
            receivers.clone(),
            vec![alert(names::WORKER_CRASH, Some(&ticket))],
        );
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(500),
        "2000 syncs took {took:?}"
    );
    eventually(
        "timeouts counted as failures",
        Duration::from_secs(5),
        async || {
            metric(&metrics, FAILED_AM) >= 2.0
                && metric(
                    &metrics,
                    r#"testrunner_alert_send_failures_total{receiver="webhook"}"#,
                ) >= 2.0
        },
    )
    .await;
    drop(black_hole);
}

#[tokio::test]
async fn the_webhook_url_never_reaches_logs_or_metrics() {
    capture_logs();
    let (rec, addr) = receiver().await;
    let down = free_port().await;
    let metrics = Arc::new(Metrics::default());
    let alerter = Alerter::start(fast(), metrics.clone());
    let secret = "SECRET-TOKEN-logs";
    let password = "pa55-SECRET";
    // First a webhook that is down (errors are logged), then one that works.
    let mut receivers = Receivers {
        alertmanager_url: None,
        webhook_url: Some(format!("http://hook:{password}@{down}/hooks/{secret}")),
    };
    alerter.sync(
        ("ci", "unit"),
        receivers.clone(),
        vec![alert(names::WORKER_CRASH, None)],
    );
    // This alerter's own failure (other tests log failures to the same capture).
    eventually("the failure counted", Duration::from_secs(5), async || {
        metric(
            &metrics,
            r#"testrunner_alert_send_failures_total{receiver="webhook"}"#,
        ) >= 1.0
    })
    .await;
    assert!(logs().contains("failed to deliver alerts"));
    receivers.webhook_url = Some(format!("http://hook:{password}@{addr}/hooks/{secret}"));
    alerter.sync(
        ("ci", "unit"),
        receivers.clone(),
        vec![alert(names::WORKER_CRASH, None)],
    );
    let hit = eventually_some("delivery", Duration::from_secs(5), async || {
        rec.hits().first().cloned()
    })
    .await;
    assert_eq!(hit.path, format!("/hooks/{secret}"));
    assert_eq!(
        hit.authorization.as_deref(),
        Some("Basic aG9vazpwYTU1LVNFQ1JFVA=="),
        "user info travels as a Basic header"
    );
    eventually("delivery logged", Duration::from_secs(5), async || {
        logs().contains("alerts delivered")
    })
    .await;

    let logs = logs();
    let text = metrics.encode();
    for leaked in [secret, password, "/hooks/"] {
        assert!(!logs.contains(leaked), "{leaked} in logs:\n{logs}");
        assert!(!text.contains(leaked), "{leaked} in metrics:\n{text}");
    }
    assert!(text.contains(r#"testrunner_alert_send_failures_total{receiver="webhook"}"#));
}

// ---------------------------------------------------------------------------------------
// A deleted pool's series and alerts, with the controller on the embedded API server.

/// The operator's lines in `metrics` that name pool `pool`.
fn series_of(metrics: &Metrics, pool: &str) -> Vec<String> {
    let label = format!("pool=\"{pool}\"");
    metrics
        .encode()
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains(&label))
        .map(String::from)
        .collect()
}

#[tokio::test]
async fn a_deleted_pool_leaves_no_series_or_alerts_whether_or_not_it_was_probed() {
    use k8s_openapi::api::core::v1::{Namespace, Secret};
    use kube::api::{Api, DeleteParams, PostParams};
    use testrunner_operator::controller::{self, Settings};
    use testrunner_operator::crd::TestRunnerPool;

    let (rec, addr) = receiver().await;
    let api = common::api_server(testrunner_sim::ServerConfig::default()).await;
    let client = api.client();
    let ns = "pool-cleanup";
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
        )
        .await
        .unwrap();
    // A broker nobody answers on: the probed pool's BrokerReachable goes False.
    let closed = free_port().await;
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "closed-broker"},
                "stringData": {"uri": format!("amqp://guest:guest@{closed}/%2f")},
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let pools: Api<TestRunnerPool> = Api::namespaced(client.clone(), ns);
    for (name, secret) in [("probed", "closed-broker"), ("unprobed", "no-such-secret")] {
        let pool = serde_json::from_value(json!({
            "apiVersion": "testrunner.dev/v1alpha1",
            "kind": "TestRunnerPool",
            "metadata": {"name": name},
            "spec": {
                "image": "registry.example/test-runner:1",
                "command": ["/run-tests"],
                "queue": {"name": format!("tickets.{name}"), "connectionSecretRef": {"name": secret, "key": "uri"}},
                "scaling": {"minWorkers": 0, "maxWorkers": 2, "pollInterval": "1s"},
                "alerts": {"alertmanagerUrl": format!("http://{addr}")},
            }
        }))
        .unwrap();
        pools.create(&PostParams::default(), &pool).await.unwrap();
    }
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let operator = tokio::spawn(controller::run(
        client.clone(),
        Settings::in_process(vec![ns.into()]),
        metrics.clone(),
        ready,
    ));

    eventually(
        "series of both pools",
        Duration::from_secs(20),
        async || {
            !series_of(&metrics, "probed").is_empty() && !series_of(&metrics, "unprobed").is_empty()
        },
    )
    .await;
    let firing = eventually_some(
        "the probed pool's broker alert",
        Duration::from_secs(20),
        async || {
            rec.hits().into_iter().find(|h| {
                h.body.as_array().into_iter().flatten().any(|a| {
                    alertname(a) == names::BROKER_UNREACHABLE && a["labels"]["pool"] == "probed"
                })
            })
        },
    )
    .await;
    let seen = rec.hits().len();
    assert_eq!(firing.path, "/api/v2/alerts");

    for name in ["probed", "unprobed"] {
        pools.delete(name, &DeleteParams::default()).await.unwrap();
    }
    let left = || {
        [
            series_of(&metrics, "probed"),
            series_of(&metrics, "unprobed"),
        ]
        .concat()
    };
    let waited = tokio::time::timeout(Duration::from_secs(20), async {
        while !left().is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "series left after the pools were deleted: {:#?}",
        left()
    );
    eventually_some(
        "the broker alert resolved",
        Duration::from_secs(20),
        async || {
            rec.hits().into_iter().skip(seen).find(|h| {
                h.body.as_array().into_iter().flatten().any(|a| {
                    alertname(a) == names::BROKER_UNREACHABLE
                        && a["labels"]["pool"] == "probed"
                        && a["endsAt"]
                            .as_str()
                            .and_then(|t| t.parse::<Timestamp>().ok())
                            .is_some_and(|t| t <= Timestamp::now())
                })
            })
        },
    )
    .await;
    operator.abort();
}
