//! Alert delivery: Alertmanager's v2 API and a JSON webhook.
//!
//! The reconciler hands an [`Alerter`] the full set of alerts active for a pool on every
//! reconcile ([`Alerter::sync`]); a background task compares it with what it sent before
//! and does all the network I/O, so a receiver that is slow or down never blocks or fails
//! a reconcile.
//!
//! - Alertmanager: every active alert is posted at once, then re-sent at least every
//!   [`AlerterConfig::resend_interval`]; an alert that leaves the active set is posted once
//!   more with `endsAt` (resolved).
//! - Webhook: one `firing` and one `resolved` notification per alert, on transitions only.
//! - A failed request is retried with capped exponential backoff; a pending resolve is kept
//!   until it is delivered. Failures are counted in [`Metrics`].
//!
//! The webhook URL comes from a Secret: it is never logged, never a metric label, never in
//! an error message. User info in either URL becomes an `Authorization: Basic` header.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use jiff::Timestamp;
use serde::Serialize;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::core::alerting::{Alert, AlertKey};
use crate::metrics::{AlertSentLabels, Metrics, PoolLabels, ReceiverLabels};

/// Where a pool's alerts go.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Receivers {
    /// Alertmanager base URL (`http://alertmanager:9093`); alerts go to `/api/v2/alerts`.
    pub alertmanager_url: Option<url::Url>,
    /// Webhook URL, read from a Secret. Never logged.
    pub webhook_url: Option<String>,
}

impl fmt::Debug for Receivers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Receivers")
            .field("alertmanager_url", &self.alertmanager_url.is_some())
            .field(
                "webhook_url",
                &self.webhook_url.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// A pool: namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolRef {
    /// Namespace of the pool.
    pub namespace: String,
    /// Name of the pool.
    pub name: String,
}

impl<N: Into<String>, P: Into<String>> From<(N, P)> for PoolRef {
    fn from((namespace, name): (N, P)) -> Self {
        PoolRef {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

/// Timing of the delivery task.
#[derive(Clone, Debug)]
pub struct AlerterConfig {
    /// Active alerts are re-sent to Alertmanager at least this often. Default 60 s.
    pub resend_interval: Duration,
    /// Limit on one request, connection included. Default 10 s.
    pub request_timeout: Duration,
    /// First retry delay after a failure; doubles per failure. Default 1 s.
    pub backoff_initial: Duration,
    /// Longest retry delay. Default 60 s.
    pub backoff_max: Duration,
}

impl Default for AlerterConfig {
    fn default() -> Self {
        Self {
            resend_interval: Duration::from_secs(60),
            request_timeout: Duration::from_secs(10),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
        }
    }
}

/// Handle to the alert delivery task. Cheap to clone; every method returns at once.
#[derive(Clone)]
pub struct Alerter {
    handle: Arc<Handle>,
}

struct Handle {
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        lock(&self.shared.pending).closed = true;
        self.shared.wake.notify_one();
    }
}

struct Shared {
    pending: Mutex<Pending>,
    wake: Notify,
}

#[derive(Default)]
struct Pending {
    /// The latest word on each pool since the task last looked.
    updates: HashMap<PoolRef, Update>,
    /// Every handle is gone: finish what is pending, then stop.
    closed: bool,
}

enum Update {
    Sync {
        receivers: Receivers,
        active: Vec<Alert>,
    },
    Forget,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Alerter {
    /// Starts the delivery task on the current tokio runtime.
    pub fn start(config: AlerterConfig, metrics: Arc<Metrics>) -> Alerter {
        // Every delivery counter exists from the start at 0, so that the first delivery
        // or failure shows in `increase()` and dashboards find the series.
        for kind in Kind::ALL {
            let receiver = kind.as_str().to_string();
            for status in ["firing", "resolved"] {
                let _ = metrics.alerts_sent.get_or_create(&AlertSentLabels {
                    receiver: receiver.clone(),
                    status: status.into(),
                });
            }
            let _ = metrics
                .alert_send_failures
                .get_or_create(&ReceiverLabels { receiver });
        }
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            wake: Notify::new(),
        });
        let task = Task {
            client: http_client(config.request_timeout),
            config,
            metrics: metrics.clone(),
            shared: shared.clone(),
            pools: HashMap::new(),
            in_flight: JoinSet::new(),
            next_target: 0,
        };
        tokio::spawn(task.run());
        Alerter {
            handle: Arc::new(Handle { shared, metrics }),
        }
    }

    /// The alerts active for `pool` now, and where they go. Call it on every reconcile
    /// with the full set: an alert missing from `active` is resolved. Never blocks.
    pub fn sync(&self, pool: impl Into<PoolRef>, receivers: Receivers, active: Vec<Alert>) {
        let pool = pool.into();
        let mut unique: Vec<Alert> = Vec::with_capacity(active.len());
        for alert in active {
            match unique.iter_mut().find(|a| a.key() == alert.key()) {
                Some(existing) => *existing = alert,
                None => unique.push(alert),
            }
        }
        self.handle
            .metrics
            .alerts_active
            .get_or_create(&pool_labels(&pool))
            .set(unique.len() as i64);
        lock(&self.handle.shared.pending).updates.insert(
            pool,
            Update::Sync {
                receivers,
                active: unique,
            },
        );
        self.handle.shared.wake.notify_one();
    }

    /// The pool is gone: resolve its alerts wherever they were sent. Never blocks.
    pub fn forget(&self, pool: impl Into<PoolRef>) {
        let pool = pool.into();
        self.handle
            .metrics
            .alerts_active
            .remove(&pool_labels(&pool));
        lock(&self.handle.shared.pending)
            .updates
            .insert(pool, Update::Forget);
        self.handle.shared.wake.notify_one();
    }
}

fn pool_labels(pool: &PoolRef) -> PoolLabels {
    PoolLabels {
        namespace: pool.namespace.clone(),
        pool: pool.name.clone(),
    }
}

// ---------------------------------------------------------------------------------------
// Wire format

#[derive(Serialize)]
struct WireAlert<'a> {
    labels: BTreeMap<&'static str, &'a str>,
    annotations: BTreeMap<&'static str, &'a str>,
    #[serde(rename = "startsAt")]
    starts_at: String,
    #[serde(rename = "endsAt", skip_serializing_if = "Option::is_none")]
    ends_at: Option<String>,
}

fn wire(alert: &Alert, ends_at: Option<Timestamp>) -> WireAlert<'_> {
    let mut labels = BTreeMap::new();
    labels.insert("alertname", alert.name.as_str());
    labels.insert("namespace", alert.namespace.as_str());
    labels.insert("pool", alert.pool.as_str());
    if let Some(ticket) = &alert.ticket {
        labels.insert("ticket", ticket.as_str());
    }
    labels.insert("severity", alert.severity.as_str());
    let mut annotations = BTreeMap::new();
    annotations.insert("summary", alert.summary.as_str());
    annotations.insert("description", alert.description.as_str());
    WireAlert {
        labels,
        annotations,
        starts_at: alert.starts_at.to_string(),
        ends_at: ends_at.map(|t| t.to_string()),
    }
}

#[derive(Serialize)]
struct WebhookBody<'a> {
    status: &'static str,
    alerts: Vec<WireAlert<'a>>,
}

// ---------------------------------------------------------------------------------------
// Endpoints and requests

type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

fn http_client(timeout: Duration) -> HttpClient {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = match hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_native_roots(provider.clone())
    {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "no usable root certificates: HTTPS alert receivers will fail");
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("ring supports the default protocol versions")
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
            hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config)
        }
    };
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(timeout));
    let connector = builder.https_or_http().enable_http1().wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector)
}

/// A parsed receiver URL, user info moved to a header. No Debug: it may hold a secret.
struct Endpoint {
    uri: http::Uri,
    authorization: Option<http::HeaderValue>,
}

fn endpoint(mut url: url::Url, append: Option<&str>) -> Option<Endpoint> {
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return None;
    }
    let authorization = if !url.username().is_empty() || url.password().is_some() {
        let user = percent_decode(url.username());
        let password = url.password().map(percent_decode).unwrap_or_default();
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        let mut value = http::HeaderValue::from_str(&format!("Basic {token}")).ok()?;
        value.set_sensitive(true);
        url.set_username("").ok()?;
        url.set_password(None).ok()?;
        Some(value)
    } else {
        None
    };
    if let Some(suffix) = append {
        let path = format!("{}{suffix}", url.path().trim_end_matches('/'));
        url.set_path(&path);
        url.set_query(None);
    }
    url.set_fragment(None);
    let uri = url.as_str().parse::<http::Uri>().ok()?;
    Some(Endpoint { uri, authorization })
}

/// A user name or password as written in a URL, decoded (`%40` is `@`).
fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// Why a delivery failed. Its text never holds a URL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SendError {
    InvalidUrl,
    Timeout,
    Connect(Option<std::io::ErrorKind>),
    Status(u16),
    Transport,
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendError::InvalidUrl => f.write_str("the receiver URL is not a valid http(s) URL"),
            SendError::Timeout => f.write_str("the request timed out"),
            SendError::Connect(Some(kind)) => write!(f, "failed to connect: {kind}"),
            SendError::Connect(None) => f.write_str("failed to connect"),
            SendError::Status(code) => write!(f, "the receiver answered HTTP {code}"),
            SendError::Transport => f.write_str("the request failed in transit"),
        }
    }
}

fn io_kind(e: &(dyn std::error::Error + 'static)) -> Option<std::io::ErrorKind> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        cur = err.source();
    }
    None
}

async fn post(
    client: HttpClient,
    endpoint: Arc<Option<Endpoint>>,
    body: Vec<u8>,
    timeout: Duration,
) -> Result<(), SendError> {
    let Some(endpoint) = endpoint.as_ref() else {
        return Err(SendError::InvalidUrl);
    };
    let mut request = http::Request::post(endpoint.uri.clone())
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(
            http::header::USER_AGENT,
            concat!("testrunner-operator/", env!("CARGO_PKG_VERSION")),
        )
        .body(Full::new(Bytes::from(body)))
        .map_err(|_| SendError::InvalidUrl)?;
    if let Some(auth) = &endpoint.authorization {
        request
            .headers_mut()
            .insert(http::header::AUTHORIZATION, auth.clone());
    }
    let exchange = async {
        let response = client.request(request).await.map_err(|e| {
            if e.is_connect() {
                SendError::Connect(io_kind(&e))
            } else {
                SendError::Transport
            }
        })?;
        let status = response.status();
        // Read the (small) answer so the connection can be reused.
        let _ = response.into_body().collect().await;
        if status.is_success() {
            Ok(())
        } else {
            Err(SendError::Status(status.as_u16()))
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or(Err(SendError::Timeout))
}

// ---------------------------------------------------------------------------------------
// The delivery task

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    Alertmanager,
    Webhook,
}

impl Kind {
    const ALL: [Kind; 2] = [Kind::Alertmanager, Kind::Webhook];

    fn as_str(self) -> &'static str {
        match self {
            Kind::Alertmanager => "alertmanager",
            Kind::Webhook => "webhook",
        }
    }
}

/// What the task knows of one alert at one receiver.
struct Tracked {
    alert: Alert,
    /// Some once the alert left the active set: a resolve is pending.
    ends_at: Option<Timestamp>,
    /// Bumped on every change of content or state.
    version: u64,
    /// Alertmanager: the version it last acknowledged.
    delivered: Option<u64>,
    /// Webhook: the firing notification went out.
    firing_notified: bool,
}

/// One receiver of one pool.
struct Target {
    id: u64,
    kind: Kind,
    /// The URL as configured, to recognise the same receiver on the next sync.
    raw: String,
    endpoint: Arc<Option<Endpoint>>,
    alerts: BTreeMap<AlertKey, Tracked>,
    backoff: Backoff,
    retry_at: Option<Instant>,
    last_sent: Option<Instant>,
    in_flight: bool,
}

#[derive(Default)]
struct PoolState {
    targets: Vec<Target>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Batch {
    /// Alertmanager: every alert of the target, firing and resolved.
    All,
    /// Webhook `firing`.
    Firing,
    /// Webhook `resolved`.
    Resolved,
}

/// One alert in a request: its identity, the version sent, and whether it went as resolved.
type Item = (AlertKey, u64, bool);

/// A request ready to go.
struct Request {
    batch: Batch,
    items: Vec<Item>,
    body: Vec<u8>,
}

struct Attempt {
    pool: PoolRef,
    target: u64,
    /// When the request left: re-sends are timed from here, so they are never further
    /// apart than the resend interval.
    started: Instant,
    batch: Batch,
    /// (alert, version sent, resolved in this request)
    items: Vec<Item>,
    result: Result<(), SendError>,
}

struct Task {
    config: AlerterConfig,
    metrics: Arc<Metrics>,
    shared: Arc<Shared>,
    client: HttpClient,
    pools: HashMap<PoolRef, PoolState>,
    in_flight: JoinSet<Attempt>,
    next_target: u64,
}

impl Task {
    async fn run(mut self) {
        loop {
            let (updates, closed) = {
                let mut pending = lock(&self.shared.pending);
                (std::mem::take(&mut pending.updates), pending.closed)
            };
            for (pool, update) in updates {
                self.apply(pool, update);
            }
            let now = Instant::now();
            self.launch(now);
            if closed && self.in_flight.is_empty() && !self.anything_owed() {
                return;
            }
            let wake_at = self.next_wake();
            tokio::select! {
                _ = self.shared.wake.notified() => {}
                Some(done) = self.in_flight.join_next(), if !self.in_flight.is_empty() => {
                    if let Ok(attempt) = done {
                        self.finish(attempt);
                    }
                }
                _ = sleep_until(wake_at), if wake_at.is_some() => {}
            }
        }
    }

    fn apply(&mut self, pool: PoolRef, update: Update) {
        let now = Timestamp::now();
        let state = self.pools.entry(pool.clone()).or_default();
        let (wanted, active) = match update {
            Update::Sync { receivers, active } => {
                let mut wanted: Vec<(Kind, String)> = Vec::new();
                if let Some(url) = receivers.alertmanager_url {
                    wanted.push((Kind::Alertmanager, url.to_string()));
                }
                if let Some(url) = receivers.webhook_url {
                    wanted.push((Kind::Webhook, url));
                }
                (Some(wanted), active)
            }
            // Keep the receivers the alerts went to; resolve everything there.
            Update::Forget => (None, Vec::new()),
        };
        if let Some(wanted) = &wanted {
            for (kind, raw) in wanted {
                if !state
                    .targets
                    .iter()
                    .any(|t| t.kind == *kind && &t.raw == raw)
                {
                    let endpoint = url::Url::parse(raw).ok().and_then(|u| {
                        endpoint(u, (*kind == Kind::Alertmanager).then_some("/api/v2/alerts"))
                    });
                    self.next_target += 1;
                    state.targets.push(Target {
                        id: self.next_target,
                        kind: *kind,
                        raw: raw.clone(),
                        endpoint: Arc::new(endpoint),
                        alerts: BTreeMap::new(),
                        backoff: Backoff::jittered(
                            self.config.backoff_initial,
                            self.config.backoff_max,
                        ),
                        retry_at: None,
                        last_sent: None,
                        in_flight: false,
                    });
                }
            }
        }
        for target in &mut state.targets {
            let keep = match &wanted {
                Some(wanted) => wanted
                    .iter()
                    .any(|(k, raw)| *k == target.kind && *raw == target.raw),
                None => false,
            };
            let empty = Vec::new();
            target.reconcile(if keep { &active } else { &empty }, now);
        }
        self.prune();
    }

    /// Drops receivers with nothing left to say and pools with no receivers.
    fn prune(&mut self) {
        for state in self.pools.values_mut() {
            state
                .targets
                .retain(|t| t.in_flight || !t.alerts.is_empty());
        }
        self.pools.retain(|_, s| !s.targets.is_empty());
    }

    fn anything_owed(&self) -> bool {
        self.pools
            .values()
            .flat_map(|p| &p.targets)
            .any(|t| t.owes())
    }

    fn launch(&mut self, now: Instant) {
        for (pool, state) in &mut self.pools {
            for target in &mut state.targets {
                if target.in_flight || target.retry_at.is_some_and(|at| at > now) {
                    continue;
                }
                let Some(Request { batch, items, body }) = target.next_request(now, &self.config)
                else {
                    continue;
                };
                target.in_flight = true;
                let client = self.client.clone();
                let endpoint = target.endpoint.clone();
                let timeout = self.config.request_timeout;
                let pool = pool.clone();
                let id = target.id;
                self.in_flight.spawn(async move {
                    let result = post(client, endpoint, body, timeout).await;
                    Attempt {
                        pool,
                        target: id,
                        started: now,
                        batch,
                        items,
                        result,
                    }
                });
            }
        }
    }

    fn finish(&mut self, attempt: Attempt) {
        let now = Instant::now();
        let Some(state) = self.pools.get_mut(&attempt.pool) else {
            return;
        };
        let Some(target) = state.targets.iter_mut().find(|t| t.id == attempt.target) else {
            return;
        };
        target.in_flight = false;
        let receiver = target.kind.as_str();
        match attempt.result {
            Ok(()) => {
                target.backoff.succeeded();
                target.retry_at = None;
                for (_, _, resolved) in &attempt.items {
                    let status = if *resolved { "resolved" } else { "firing" };
                    self.metrics
                        .alerts_sent
                        .get_or_create(&AlertSentLabels {
                            receiver: receiver.into(),
                            status: status.into(),
                        })
                        .inc();
                }
                tracing::debug!(
                    receiver,
                    namespace = %attempt.pool.namespace,
                    pool = %attempt.pool.name,
                    alerts = attempt.items.len(),
                    "alerts delivered"
                );
                target.delivered(attempt.batch, &attempt.items, attempt.started);
            }
            Err(error) => {
                let delay = target.backoff.failed();
                target.retry_at = Some(now + delay);
                self.metrics
                    .alert_send_failures
                    .get_or_create(&ReceiverLabels {
                        receiver: receiver.into(),
                    })
                    .inc();
                tracing::warn!(
                    receiver,
                    namespace = %attempt.pool.namespace,
                    pool = %attempt.pool.name,
                    %error,
                    failures = target.backoff.failures(),
                    retry_in_ms = delay.as_millis() as u64,
                    "failed to deliver alerts; will retry"
                );
            }
        }
        self.prune();
    }

    fn next_wake(&self) -> Option<Instant> {
        let now = Instant::now();
        self.pools
            .values()
            .flat_map(|p| &p.targets)
            .filter(|t| !t.in_flight)
            .filter_map(|t| t.wake_at(&self.config, now))
            .min()
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Target {
    /// Brings the tracked alerts in line with the active set.
    fn reconcile(&mut self, active: &[Alert], now: Timestamp) {
        for alert in active {
            match self.alerts.get_mut(&alert.key()) {
                None => {
                    self.alerts.insert(
                        alert.key(),
                        Tracked {
                            alert: alert.clone(),
                            ends_at: None,
                            version: 1,
                            delivered: None,
                            firing_notified: false,
                        },
                    );
                }
                Some(t) => {
                    if t.ends_at.is_some() || t.alert != *alert {
                        // Back before its resolve went out: the same episode goes on.
                        t.ends_at = None;
                        t.alert = alert.clone();
                        t.version += 1;
                    }
                }
            }
        }
        for (key, t) in &mut self.alerts {
            if t.ends_at.is_none() && !active.iter().any(|a| a.key() == *key) {
                t.ends_at = Some(now);
                t.version += 1;
            }
        }
    }

    /// Something must still reach this receiver (not counting Alertmanager re-sends).
    fn owes(&self) -> bool {
        self.alerts.values().any(|t| match self.kind {
            Kind::Alertmanager => t.ends_at.is_some() || t.delivered != Some(t.version),
            Kind::Webhook => !t.firing_notified || t.ends_at.is_some(),
        })
    }

    /// When this receiver needs a request next, backoff included.
    fn wake_at(&self, config: &AlerterConfig, now: Instant) -> Option<Instant> {
        let natural = if self.owes() {
            Some(now)
        } else if self.kind == Kind::Alertmanager && !self.alerts.is_empty() {
            Some(self.last_sent.map_or(now, |l| l + config.resend_interval))
        } else {
            None
        };
        natural.map(|at| self.retry_at.map_or(at, |retry| at.max(retry)))
    }

    /// The request to send now, if any.
    fn next_request(&self, now: Instant, config: &AlerterConfig) -> Option<Request> {
        match self.kind {
            Kind::Alertmanager => {
                if self.alerts.is_empty() {
                    return None;
                }
                let resend_due = self
                    .last_sent
                    .is_none_or(|l| now.duration_since(l) >= config.resend_interval);
                if !self.owes() && !resend_due {
                    return None;
                }
                let items = self
                    .alerts
                    .iter()
                    .map(|(k, t)| (k.clone(), t.version, t.ends_at.is_some()))
                    .collect();
                let wires: Vec<WireAlert<'_>> = self
                    .alerts
                    .values()
                    .map(|t| wire(&t.alert, t.ends_at))
                    .collect();
                let body = serde_json::to_vec(&wires).expect("alerts serialize");
                Some(Request {
                    batch: Batch::All,
                    items,
                    body,
                })
            }
            Kind::Webhook => {
                let firing: Vec<(&AlertKey, &Tracked)> = self
                    .alerts
                    .iter()
                    .filter(|(_, t)| !t.firing_notified)
                    .collect();
                let (batch, chosen, status) = if !firing.is_empty() {
                    (Batch::Firing, firing, "firing")
                } else {
                    let resolved: Vec<(&AlertKey, &Tracked)> = self
                        .alerts
                        .iter()
                        .filter(|(_, t)| t.ends_at.is_some())
                        .collect();
                    if resolved.is_empty() {
                        return None;
                    }
                    (Batch::Resolved, resolved, "resolved")
                };
                let resolved = batch == Batch::Resolved;
                let items = chosen
                    .iter()
                    .map(|(k, t)| ((*k).clone(), t.version, resolved))
                    .collect();
                let body = WebhookBody {
                    status,
                    alerts: chosen
                        .iter()
                        .map(|(_, t)| wire(&t.alert, if resolved { t.ends_at } else { None }))
                        .collect(),
                };
                let body = serde_json::to_vec(&body).expect("alerts serialize");
                Some(Request { batch, items, body })
            }
        }
    }

    /// Records a successful request.
    fn delivered(&mut self, batch: Batch, items: &[Item], started: Instant) {
        match batch {
            Batch::All => {
                self.last_sent = Some(started);
                for (key, version, _) in items {
                    let Some(t) = self.alerts.get_mut(key) else {
                        continue;
                    };
                    if t.version != *version {
                        continue;
                    }
                    if t.ends_at.is_some() {
                        self.alerts.remove(key);
                    } else {
                        t.delivered = Some(*version);
                    }
                }
            }
            Batch::Firing => {
                for (key, _, _) in items {
                    if let Some(t) = self.alerts.get_mut(key) {
                        t.firing_notified = true;
                    }
                }
            }
            Batch::Resolved => {
                for (key, _, _) in items {
                    let Some(t) = self.alerts.get_mut(key) else {
                        continue;
                    };
                    if t.ends_at.is_some() {
                        self.alerts.remove(key);
                    } else {
                        // Active again after its resolve went out: a new episode.
                        t.firing_notified = false;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::alerting::{Severity, names};

    fn alert(name: &str, ticket: Option<&str>) -> Alert {
        Alert {
            name: name.into(),
            severity: Severity::Critical,
            namespace: "ci".into(),
            pool: "unit".into(),
            ticket: ticket.map(Into::into),
            summary: "s".into(),
            description: "d".into(),
            starts_at: "2026-11-28T04:00:00Z".parse().unwrap(),
        }
    }

    #[test]
    fn wire_shape_has_labels_annotations_and_rfc3339_times() {
        let a = alert(names::POISON_TICKET, Some("t-1"));
        let v =
            serde_json::to_value(wire(&a, Some("2026-11-28T05:00:00Z".parse().unwrap()))).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "labels": {"alertname": "TestRunnerPoisonTicket", "namespace": "ci", "pool": "unit",
                           "ticket": "t-1", "severity": "critical"},
                "annotations": {"summary": "s", "description": "d"},
                "startsAt": "2026-11-28T04:00:00Z",
                "endsAt": "2026-11-28T05:00:00Z",
            })
        );
        let v = serde_json::to_value(wire(&alert(names::QUEUE_STALLED, None), None)).unwrap();
        assert!(v["labels"].get("ticket").is_none());
        assert!(v.get("endsAt").is_none());
    }

    #[test]
    fn endpoint_moves_user_info_to_a_header_and_appends_the_api_path() {
        let e = endpoint(
            "https://am:s3cret@alertmanager.example:9093/prefix/"
                .parse()
                .unwrap(),
            Some("/api/v2/alerts"),
        )
        .unwrap();
        assert_eq!(
            e.uri.to_string(),
            "https://alertmanager.example:9093/prefix/api/v2/alerts"
        );
        let auth = e.authorization.unwrap();
        assert!(auth.is_sensitive());
        assert_eq!(auth.to_str().unwrap(), "Basic YW06czNjcmV0");
        assert!(endpoint("ftp://x/".parse().unwrap(), None).is_none());
        assert_eq!(percent_decode("a%40b%2"), "a@b%2");
    }

    #[test]
    fn receivers_debug_never_shows_the_webhook_url() {
        let r = Receivers {
            alertmanager_url: None,
            webhook_url: Some("https://hooks.example/T0/secret-token".into()),
        };
        let text = format!("{r:?}");
        assert!(!text.contains("secret-token"), "{text}");
    }

    #[test]
    fn webhook_target_sends_one_firing_then_one_resolved() {
        let mut t = Target {
            id: 1,
            kind: Kind::Webhook,
            raw: String::new(),
            endpoint: Arc::new(None),
            alerts: BTreeMap::new(),
            backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(1)),
            retry_at: None,
            last_sent: None,
            in_flight: false,
        };
        let config = AlerterConfig::default();
        let now = Instant::now();
        let a = alert(names::WORKER_CRASH, None);
        t.reconcile(std::slice::from_ref(&a), Timestamp::now());
        let Request { batch, items, .. } = t.next_request(now, &config).unwrap();
        assert!(batch == Batch::Firing);
        t.delivered(batch, &items, now);
        t.reconcile(std::slice::from_ref(&a), Timestamp::now());
        assert!(t.next_request(now, &config).is_none(), "no second firing");
        t.reconcile(&[], Timestamp::now());
        let Request { batch, items, body } = t.next_request(now, &config).unwrap();
        assert!(batch == Batch::Resolved);
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["status"], "resolved");
        assert!(body["alerts"][0]["endsAt"].is_string());
        t.delivered(batch, &items, now);
        assert!(t.alerts.is_empty());
        assert!(t.next_request(now, &config).is_none());
    }
}
