//! RabbitMQ side of the operator: broker URIs kept secret, one shared connection
//! per distinct broker, and queue probes by passive declare.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::QueueDeclareOptions;
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::FieldTable;
use lapin::uri::AMQPUri;
use lapin::{Channel, Connection, ConnectionProperties, ErrorKind};
use tokio::sync::Mutex;

use crate::backoff::Backoff;

/// A broker URI holding credentials. Its `Debug` and `Display` never show them.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct BrokerUri {
    raw: String,
    redacted: String,
}

/// Why a broker URI was refused. The message never contains the URI itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidUri(pub String);

impl BrokerUri {
    /// Checks an `amqp://` or `amqps://` URI.
    pub fn parse(raw: &str) -> Result<Self, InvalidUri> {
        let raw = raw.trim();
        let url = url::Url::parse(raw).map_err(|e| InvalidUri(format!("not a URL ({e})")))?;
        let scheme = url.scheme();
        if scheme != "amqp" && scheme != "amqps" {
            return Err(InvalidUri(format!(
                "scheme {scheme:?} is not amqp or amqps"
            )));
        }
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| InvalidUri("the URI has no host".into()))?;
        raw.parse::<AMQPUri>()
            .map_err(|_| InvalidUri("the URI is not a valid AMQP URI".into()))?;
        let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
        let redacted = format!("{scheme}://{host}{port}{}", url.path());
        Ok(Self {
            raw: raw.to_string(),
            redacted,
        })
    }

    /// The URI with credentials and query removed: safe to log.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }

    /// The full URI, credentials included: for the AMQP client only.
    pub fn expose(&self) -> &str {
        &self.raw
    }

    /// The URI as lapin wants it. The host is taken from the URL parser because
    /// lapin's own parser only keeps domain names (an IP address would be lost).
    pub fn amqp_uri(&self) -> AMQPUri {
        let url = url::Url::parse(&self.raw).expect("checked in parse");
        let mut uri: AMQPUri = self.raw.parse().expect("checked in parse");
        if let Some(host) = url.host_str() {
            uri.authority.host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
        }
        uri
    }
}

/// Connects to `uri` (see [`tls_roots`] for `amqps://`).
pub async fn connect(
    uri: &BrokerUri,
    props: lapin::ConnectionProperties,
) -> lapin::Result<lapin::Connection> {
    let tls = lapin::tcp::OwnedTLSConfig {
        cert_chain: tls_roots(uri, || {
            rustls_native_certs::load_native_certs().certs.is_empty()
        }),
        ..Default::default()
    };
    lapin::Connection::connect_uri_with_config(
        uri.amqp_uri(),
        props,
        tls,
        lapin::runtime::default_runtime()?,
    )
    .await
}

/// Extra trust roots for `uri`, as PEM. A broker behind `amqps://` is verified against the
/// system's CA store (the image's, or `SSL_CERT_FILE` / `SSL_CERT_DIR`); where there is
/// none (`no_system_store`: scratch, busybox or distroless/static-less images), against the
/// bundled Mozilla roots of `webpki-root-certs` instead, so a broker with a public
/// certificate is reachable from any image. A broker with a private CA needs that CA
/// mounted and named by `SSL_CERT_FILE`.
pub fn tls_roots(uri: &BrokerUri, no_system_store: impl FnOnce() -> bool) -> Option<String> {
    use base64::Engine;
    if !uri.expose().starts_with("amqps:") || !no_system_store() {
        return None;
    }
    let mut pem = String::new();
    for cert in webpki_root_certs::TLS_SERVER_ROOT_CERTS {
        let b64 = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
        pem.push_str("-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
            pem.push('\n');
        }
        pem.push_str("-----END CERTIFICATE-----\n");
    }
    Some(pem)
}

impl fmt::Debug for BrokerUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BrokerUri({})", self.redacted)
    }
}

impl fmt::Display for BrokerUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

/// The arguments outcome queues are declared with: short-lived reports, at most 10,000
/// messages of at most 10 minutes, the queue removed after an hour unused.
pub fn outcome_queue_arguments() -> FieldTable {
    use lapin::types::AMQPValue;
    let mut args = FieldTable::default();
    args.insert("x-expires".into(), AMQPValue::LongInt(3_600_000));
    args.insert("x-max-length".into(), AMQPValue::LongInt(10_000));
    args.insert("x-message-ttl".into(), AMQPValue::LongInt(600_000));
    args
}

/// Which tickets a replay moves.
#[derive(Clone, Copy, Debug)]
pub enum ReplayFilter<'a> {
    /// Every ticket.
    All,
    /// These ticket ids.
    Only(&'a [String]),
    /// Tickets the broker dead-lettered (they carry `x-death`) or workers set aside at
    /// the delivery limit, except these ids: what a delivery limit moved during a
    /// broken-environment episode.
    DeadLettered {
        /// Ids to leave where they are (the operator's own quarantine list).
        except: &'a [String],
    },
}

impl ReplayFilter<'_> {
    fn wants(&self, id: &str, headers: Option<&FieldTable>) -> bool {
        match self {
            ReplayFilter::All => true,
            ReplayFilter::Only(ids) => ids.iter().any(|i| i == id),
            ReplayFilter::DeadLettered { except } => {
                headers.is_some_and(|h| {
                    h.inner().contains_key("x-death")
                        || h.inner().contains_key(crate::contract::HEADER_SET_ASIDE)
                }) && !except.iter().any(|i| i == id)
            }
        }
    }
}

/// The answer of one queue probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    /// Ready messages and consumers, from a passive declare.
    Depth {
        /// Ready (not delivered) messages.
        ready: u64,
        /// Consumers on the queue.
        consumers: u64,
    },
    /// The broker answered 404 NOT_FOUND.
    QueueNotFound,
    /// No answer.
    Unreachable {
        /// PascalCase category: ConnectionFailed, AuthenticationFailed, Timeout,
        /// AccessRefused, ProtocolError.
        reason: &'static str,
        /// Credential-free detail.
        message: String,
    },
}

impl Probe {
    /// Every reason a probe fails with: what [`Probe::failure_reason`] gives.
    pub const FAILURE_REASONS: &[&str] = &[
        "QueueNotFound",
        "ConnectionFailed",
        "AuthenticationFailed",
        "Timeout",
        "AccessRefused",
        "ProtocolError",
    ];

    /// Metric label / reason of a failed probe.
    pub fn failure_reason(&self) -> Option<&'static str> {
        match self {
            Probe::Depth { .. } => None,
            Probe::QueueNotFound => Some("QueueNotFound"),
            Probe::Unreachable { reason, .. } => Some(reason),
        }
    }
}

/// A broker operation that failed (a connection, a declaration, a replay): why, in
/// a word, and what the broker or the network said, without credentials.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message} ({reason})")]
pub struct BrokerError {
    /// PascalCase category, as in [`Probe::Unreachable`].
    pub reason: &'static str,
    /// Credential-free detail.
    pub message: String,
}

impl BrokerError {
    fn timeout(what: &str) -> Self {
        BrokerError {
            reason: "Timeout",
            message: format!("no answer to {what}"),
        }
    }
}

impl From<&lapin::Error> for BrokerError {
    fn from(e: &lapin::Error) -> Self {
        let (reason, message) = classify(e);
        BrokerError { reason, message }
    }
}

impl From<BrokerError> for Probe {
    fn from(e: BrokerError) -> Self {
        Probe::Unreachable {
            reason: e.reason,
            message: e.message,
        }
    }
}

/// Timeouts and backoff of broker connections.
#[derive(Clone, Debug)]
pub struct BrokerSettings {
    /// Connect (TCP, TLS and AMQP handshake) timeout.
    pub connect_timeout: Duration,
    /// Timeout of one probe on an open connection.
    pub probe_timeout: Duration,
    /// First reconnect delay after a failure; doubles up to `max_backoff`.
    pub min_backoff: Duration,
    /// Longest reconnect delay.
    pub max_backoff: Duration,
}

impl Default for BrokerSettings {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            probe_timeout: Duration::from_secs(5),
            min_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
        }
    }
}

struct Open {
    connection: Connection,
    channel: Option<Channel>,
}

struct ConnState {
    open: Option<Open>,
    backoff: Backoff,
    retry_at: Option<Instant>,
    last_error: Option<BrokerError>,
}

/// One connection per distinct broker URI, shared by every pool that uses it.
#[derive(Clone, Default)]
pub struct Brokers {
    settings: BrokerSettings,
    conns: Arc<std::sync::Mutex<HashMap<BrokerUri, Arc<Mutex<ConnState>>>>>,
}

/// How long one broker round trip of a replay may take.
const REPLAY_STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a replay step failed.
enum StepError {
    Broker(lapin::Error),
    Stalled,
}

/// One broker round trip of a replay, bounded by [`REPLAY_STEP_TIMEOUT`].
async fn step<T>(
    op: impl std::future::Future<Output = Result<T, lapin::Error>>,
) -> Result<T, StepError> {
    match tokio::time::timeout(REPLAY_STEP_TIMEOUT, op).await {
        Ok(result) => result.map_err(StepError::Broker),
        Err(_) => Err(StepError::Stalled),
    }
}

impl Brokers {
    /// A connection pool with these settings.
    pub fn new(settings: BrokerSettings) -> Self {
        Self {
            settings,
            conns: Default::default(),
        }
    }

    /// How many broker connections are held (open or retrying).
    pub fn connections(&self) -> usize {
        self.conns.lock().expect("lock").len()
    }

    fn entry(&self, uri: &BrokerUri) -> Arc<Mutex<ConnState>> {
        self.conns
            .lock()
            .expect("lock")
            .entry(uri.clone())
            .or_insert_with(|| {
                Arc::new(Mutex::new(ConnState {
                    open: None,
                    backoff: Backoff::new(self.settings.min_backoff, self.settings.max_backoff),
                    retry_at: None,
                    last_error: None,
                }))
            })
            .clone()
    }

    /// Opens (or reuses) the connection to `uri` and returns a channel on it.
    async fn channel(
        &self,
        state: &mut ConnState,
        uri: &BrokerUri,
    ) -> Result<Channel, BrokerError> {
        if let Some(open) = &state.open
            && !open.connection.status().connected()
        {
            state.open = None;
        }
        if state.open.is_none() {
            if let (Some(at), Some(last)) = (state.retry_at, &state.last_error)
                && Instant::now() < at
            {
                // Still backing off: report the last failure as it was.
                return Err(last.clone());
            }
            let connect = connect(uri, ConnectionProperties::default());
            let connection = match tokio::time::timeout(self.settings.connect_timeout, connect)
                .await
            {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return Err(self.fail(state, uri, (&e).into())),
                Err(_) => {
                    let error = BrokerError {
                        reason: "Timeout",
                        message: format!("no answer within {:?}", self.settings.connect_timeout),
                    };
                    return Err(self.fail(state, uri, error));
                }
            };
            tracing::info!(broker = %uri, "connected to broker");
            state.open = Some(Open {
                connection,
                channel: None,
            });
            state.backoff.succeeded();
            state.retry_at = None;
            state.last_error = None;
        }
        let open = state.open.as_mut().expect("just opened");
        if let Some(ch) = &open.channel
            && ch.status().connected()
        {
            return Ok(ch.clone());
        }
        match open.connection.create_channel().await {
            Ok(ch) => {
                open.channel = Some(ch.clone());
                Ok(ch)
            }
            Err(e) => {
                state.open = None;
                Err(self.fail(state, uri, (&e).into()))
            }
        }
    }

    fn fail(&self, state: &mut ConnState, uri: &BrokerUri, error: BrokerError) -> BrokerError {
        let backoff = state.backoff.failed();
        state.retry_at = Some(Instant::now() + backoff);
        state.last_error = Some(error.clone());
        tracing::warn!(broker = %uri, reason = error.reason, error = %error.message, ?backoff, "broker connection failed");
        error
    }

    /// Reads the depth of `queue` with a passive declare.
    pub async fn probe(&self, uri: &BrokerUri, queue: &str) -> Probe {
        let entry = self.entry(uri);
        let mut state = entry.lock().await;
        let channel = match self.channel(&mut state, uri).await {
            Ok(ch) => ch,
            Err(e) => return e.into(),
        };
        let declare = channel.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        );
        match tokio::time::timeout(self.settings.probe_timeout, declare).await {
            Ok(Ok(q)) => Probe::Depth {
                ready: q.message_count() as u64,
                consumers: q.consumer_count() as u64,
            },
            Ok(Err(e)) => {
                if let Some(open) = state.open.as_mut() {
                    open.channel = None;
                }
                match e.kind() {
                    ErrorKind::ProtocolError(amqp)
                        if matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)) =>
                    {
                        Probe::QueueNotFound
                    }
                    ErrorKind::ProtocolError(amqp)
                        if matches!(
                            amqp.kind(),
                            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)
                        ) =>
                    {
                        Probe::Unreachable {
                            reason: "AccessRefused",
                            message: format!("access to queue {queue:?} refused"),
                        }
                    }
                    _ => {
                        state.open = None;
                        self.fail(&mut state, uri, (&e).into()).into()
                    }
                }
            }
            Err(_) => {
                state.open = None;
                let error = BrokerError {
                    reason: "Timeout",
                    message: format!("no answer within {:?}", self.settings.probe_timeout),
                };
                self.fail(&mut state, uri, error).into()
            }
        }
    }

    /// A new channel of its own on the shared connection to `uri`; the connection's lock
    /// is released before the caller uses it, so long operations do not hold up probes.
    async fn private_channel(&self, uri: &BrokerUri) -> Result<Channel, BrokerError> {
        let entry = self.entry(uri);
        let mut state = entry.lock().await;
        self.channel(&mut state, uri).await?;
        let open = state.open.as_ref().expect("a channel implies a connection");
        self.bounded("opening a channel", open.connection.create_channel())
            .await
    }

    /// `operation` within the probe timeout.
    async fn bounded<T>(
        &self,
        what: &str,
        operation: impl Future<Output = Result<T, lapin::Error>>,
    ) -> Result<T, BrokerError> {
        match tokio::time::timeout(self.settings.probe_timeout, operation).await {
            Ok(result) => result.map_err(|e| BrokerError::from(&e)),
            Err(_) => Err(BrokerError::timeout(what)),
        }
    }

    /// Declares `queue` as an outcome queue (see [`outcome_queue_arguments`]; not
    /// durable) and consumes it without acks.
    pub async fn consume_outcomes(
        &self,
        uri: &BrokerUri,
        queue: &str,
    ) -> Result<lapin::Consumer, BrokerError> {
        use lapin::options::BasicConsumeOptions;
        let channel = self.private_channel(uri).await?;
        let setup = async {
            channel
                .queue_declare(
                    queue.into(),
                    QueueDeclareOptions::default(),
                    outcome_queue_arguments(),
                )
                .await?;
            channel
                .basic_consume(
                    queue.into(),
                    "".into(),
                    BasicConsumeOptions {
                        no_ack: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
        };
        self.bounded("declaring and consuming the outcome queue", setup)
            .await
    }

    /// Deletes `queue` (an outcome queue nobody reports to any more). A queue that
    /// is already gone is fine.
    pub async fn delete_queue(&self, uri: &BrokerUri, queue: &str) -> Result<(), BrokerError> {
        use lapin::options::QueueDeleteOptions;
        let channel = self.private_channel(uri).await?;
        let delete = channel.queue_delete(queue.into(), QueueDeleteOptions::default());
        let result = self.bounded("the queue deletion", delete).await.map(drop);
        let _ = tokio::time::timeout(
            self.settings.probe_timeout,
            channel.close(200, "done".into()),
        )
        .await;
        result
    }

    /// Makes sure `queue` exists: a passive declare, and a durable classic queue
    /// when it is missing.
    pub async fn ensure_queue(&self, uri: &BrokerUri, queue: &str) -> Result<(), BrokerError> {
        match self.probe(uri, queue).await {
            Probe::Depth { .. } => Ok(()),
            Probe::QueueNotFound => {
                let entry = self.entry(uri);
                let mut state = entry.lock().await;
                let channel = self.channel(&mut state, uri).await?;
                let declare = channel.queue_declare(
                    queue.into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                );
                self.bounded("the queue declaration", declare).await?;
                tracing::info!(broker = %uri, queue, "declared the quarantine queue");
                Ok(())
            }
            Probe::Unreachable { reason, message } => Err(BrokerError { reason, message }),
        }
    }

    /// Moves tickets from `from` back to `to`: every ticket, or only those in
    /// `only`. Each move is one transaction (publish to `to`, ack in `from`, commit),
    /// so an operator that dies mid-way leaves every ticket in exactly one of the two
    /// queues. Headers the quarantine added are removed; everything else is kept.
    /// Returns the ids moved. A second copy of an id already moved in this call is
    /// dropped rather than replayed twice.
    pub async fn replay(
        &self,
        uri: &BrokerUri,
        from: &str,
        to: &str,
        only: Option<&[String]>,
    ) -> Result<Vec<String>, BrokerError> {
        let filter = match only {
            Some(ids) => ReplayFilter::Only(ids),
            None => ReplayFilter::All,
        };
        self.replay_where(uri, from, to, filter).await
    }

    /// Like [`Brokers::replay`], with the tickets chosen by `filter`.
    pub async fn replay_where(
        &self,
        uri: &BrokerUri,
        from: &str,
        to: &str,
        filter: ReplayFilter<'_>,
    ) -> Result<Vec<String>, BrokerError> {
        use lapin::options::{
            BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
        };
        let ch = self.private_channel(uri).await?;
        // Each broker round trip gets REPLAY_STEP_TIMEOUT: a connection that dies without
        // a word must not hold the reconcile for long.
        let work = async {
            step(ch.tx_select()).await?;
            let mut moved: Vec<String> = Vec::new();
            // Tickets not chosen are held (unacked) until the end, so that each is
            // looked at once, then given back in their order.
            let mut held = Vec::new();
            while let Some(msg) =
                step(ch.basic_get(from.into(), BasicGetOptions::default())).await?
            {
                let id = crate::contract::ticket_id(
                    msg.properties.message_id().as_ref().map(|s| s.as_str()),
                    &msg.data,
                );
                if !filter.wants(&id, msg.properties.headers().as_ref()) {
                    held.push(msg);
                    continue;
                }
                if !moved.contains(&id) {
                    let mut props = msg.properties.clone();
                    let mut kept = FieldTable::default();
                    for (k, v) in props.headers().clone().unwrap_or_default().inner() {
                        if !k.as_str().starts_with(crate::contract::HEADER_PREFIX) {
                            kept.insert(k.clone(), v.clone());
                        }
                    }
                    // Workers whose quarantine list is not yet updated do not divert a
                    // ticket replayed after it was listed.
                    kept.insert(
                        crate::contract::HEADER_REPLAYED_AT.into(),
                        lapin::types::AMQPValue::LongLongInt(jiff::Timestamp::now().as_second()),
                    );
                    props = props.with_headers(kept);
                    step(ch.basic_publish(
                        "".into(),
                        to.into(),
                        BasicPublishOptions::default(),
                        &msg.data,
                        props,
                    ))
                    .await?;
                    moved.push(id);
                }
                step(msg.ack(BasicAckOptions::default())).await?;
                step(ch.tx_commit()).await?;
            }
            for msg in held {
                step(msg.nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                }))
                .await?;
            }
            step(ch.tx_commit()).await?;
            let _ = ch.close(200, "replayed".into()).await;
            Ok::<_, StepError>(moved)
        };
        work.await.map_err(|e| match e {
            StepError::Broker(e) => BrokerError::from(&e),
            StepError::Stalled => BrokerError::timeout(&format!(
                "a replay step within {}s",
                REPLAY_STEP_TIMEOUT.as_secs()
            )),
        })
    }

    /// Drops the connection to `uri` if no pool uses it any longer.
    pub fn forget(&self, uri: &BrokerUri) {
        let Some(entry) = self.conns.lock().expect("lock").remove(uri) else {
            return;
        };
        let uri = uri.clone();
        tokio::spawn(async move {
            if let Some(open) = entry.lock().await.open.take() {
                let _ = open
                    .connection
                    .close(200, "no pool uses this broker any longer".into())
                    .await;
                tracing::info!(broker = %uri, "closed unused broker connection");
            }
        });
    }
}

/// Maps a lapin error to a reason and a credential-free message.
fn classify(e: &lapin::Error) -> (&'static str, String) {
    match e.kind() {
        ErrorKind::IOError(io) => ("ConnectionFailed", format!("connection failed: {io}")),
        ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => (
                "AuthenticationFailed",
                "the broker refused the credentials or vhost".into(),
            ),
            _ => (
                "ProtocolError",
                format!("the broker closed the connection: {}", amqp.get_message()),
            ),
        },
        ErrorKind::AuthProviderError(_) => (
            "AuthenticationFailed",
            "the broker refused the credentials".into(),
        ),
        ErrorKind::MissingHeartbeatError => {
            ("Timeout", "the broker stopped sending heartbeats".into())
        }
        ErrorKind::InvalidConnectionState(_) | ErrorKind::InvalidChannelState(..) => {
            ("ConnectionFailed", "the connection was closed".into())
        }
        _ => ("ConnectionFailed", "the connection failed".into()),
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn amqps_falls_back_to_the_bundled_roots_only_without_a_system_store() {
        use rustls::pki_types::{CertificateDer, pem::PemObject};
        let tls = BrokerUri::parse("amqps://u:p@broker.example:5671/").unwrap();
        let plain = BrokerUri::parse("amqp://u:p@broker.example:5672/").unwrap();
        assert_eq!(
            tls_roots(&tls, || false),
            None,
            "the system's store is used"
        );
        assert_eq!(tls_roots(&plain, || true), None, "no TLS, no roots");
        let pem = tls_roots(&tls, || true).expect("bundled roots");
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<_, _>>()
            .expect("the bundle is valid PEM");
        assert_eq!(certs.len(), webpki_root_certs::TLS_SERVER_ROOT_CERTS.len());
        assert!(certs.len() > 100, "{}", certs.len());
        assert_eq!(&certs[0], &webpki_root_certs::TLS_SERVER_ROOT_CERTS[0]);
    }
    use super::*;

    #[test]
    fn uri_debug_and_display_hide_credentials() {
        let uri =
            BrokerUri::parse("amqp://alice:s3cret@rabbit.example:5673/ci?heartbeat=10").unwrap();
        let shown = format!("{uri:?} {uri}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(!shown.contains("alice"), "{shown}");
        assert_eq!(uri.redacted(), "amqp://rabbit.example:5673/ci");
    }

    #[test]
    fn uri_keeps_ip_hosts() {
        let uri = BrokerUri::parse("amqp://guest:guest@10.1.2.3:5672/%2f").unwrap();
        assert_eq!(uri.amqp_uri().authority.host, "10.1.2.3");
        let v6 = BrokerUri::parse("amqps://u:p@[::1]:5671/").unwrap();
        assert_eq!(v6.amqp_uri().authority.host, "::1");
    }

    #[test]
    fn bad_uris_are_refused_without_echoing_them() {
        for raw in [
            "http://u:pw@host/",
            "not a uri pw",
            "amqp://",
            "amqp://u:pw@/vhost",
        ] {
            let err = BrokerUri::parse(raw).unwrap_err();
            assert!(!err.0.contains("pw"), "{raw} -> {err}");
        }
    }
}
