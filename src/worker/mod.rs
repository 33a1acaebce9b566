//! The worker wrapper: `testrunner-operator worker -- COMMAND [ARGS...]`.
//!
//! It consumes one ticket at a time from a RabbitMQ queue (prefetch 1, manual
//! acks), runs COMMAND for it with the body on stdin, acks when the command
//! passes or fails a test, and exits without acking when the command crashes,
//! so that the ticket is redelivered and Kubernetes restarts the container.
//! Before each step it overwrites the termination log with what it holds, so a
//! crashed container tells the operator which ticket was in hand.
//!
//! The decisions (delivery number, ack or crash, header exposure) are plain
//! functions; [`run`] is the thin I/O loop. What the worker and the operator agree on
//! (exit codes, termination-log lines, ticket ids, headers, reports, the quarantine
//! list) is in [`crate::contract`].

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{ExitCode, ExitStatus};
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer, ErrorKind};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::time::Instant;

use self::command::Running;
use crate::broker::BrokerUri;
use crate::contract::{
    HEADER_DELIVERY, HEADER_QUARANTINED_BY, HEADER_QUARANTINED_FROM, HEADER_REPLAYED_AT,
    HEADER_SET_ASIDE, HEADER_TIMESTAMP_MS, Outcome, QuarantineEntry, Report, TerminationLine,
    WorkerExit, parse_quarantine_list, ticket_id,
};

/// The environment variable holding the broker URI. It is removed from the
/// command's environment.
pub const ENV_AMQP_URI: &str = "TESTRUNNER_AMQP_URI";
/// Prefix of the per-header environment variables given to the command.
pub const HEADER_ENV_PREFIX: &str = "TICKET_HEADER_";
/// Longest value of one `TICKET_HEADER_*` variable, in bytes; longer ones are cut.
pub const MAX_HEADER_ENV_BYTES: usize = 32 * 1024;
/// Longest `TICKET_HEADERS` JSON, in bytes; a longer one is replaced by `{}` and
/// `TICKET_HEADERS_TRUNCATED=1` is set.
pub const MAX_HEADERS_JSON_BYTES: usize = 64 * 1024;

/// How long a connect or a setup step may take.
const BROKER_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the connection's health is checked while idle or while a command runs.
const HEALTH_TICK: Duration = Duration::from_millis(250);

const EXIT_CODES_HELP: &str = "\
Termination log (overwritten at each step, read by the operator after a crash):
  starting                     before the consume loop is up
  idle                         consuming, no ticket in hand (after each ack)
  ticket=<id> delivery=<n>     written before the command starts
  broker-unavailable: <why>    could not start consuming (exit 69)
  command-error: <why>         the command could not be started (exit 71)
  broker-lost: <why>           connection or consumer lost (exit 75)
  config-error: <why>          invalid configuration (exit 78)

The command gets the ticket body on stdin and the environment variables
TICKET_ID, TICKET_DELIVERY (1 for a first delivery), TICKET_HEADERS (all headers
as a JSON object) and TICKET_HEADER_<NAME> for each header (name upper-cased,
characters other than A-Z and 0-9 replaced by '_'). TESTRUNNER_AMQP_URI is removed.

Exit codes:
  0        stopped cleanly (SIGTERM or --idle-exit), no ticket in hand
  N        the command crashed with exit code N (not 0, not a test-failure code);
           the ticket is left unacked and will be redelivered
  128+S    the command died of signal S (ticket left unacked), or a second
           SIGTERM/SIGINT was forwarded to the command (ticket left unacked)
  2        invalid command line
  69       broker unreachable, credentials refused or queue missing at start
  71       the command could not be started (checked before taking tickets;
           a ticket in hand is given back)
  75       broker connection lost (the broker requeues the ticket in hand)
  78       invalid configuration";

/// Where the tickets come from: a queue of the broker (the `worker` command run with
/// `--amqp-uri`, and the broker sidecar of a worker pod).
#[derive(clap::Args, Clone, Debug)]
pub struct ConsumeArgs {
    /// amqp:// or amqps:// URI of the broker. Never logged.
    #[arg(long, env = ENV_AMQP_URI, hide_env_values = true)]
    pub amqp_uri: Option<String>,
    /// Queue to consume tickets from. It must exist.
    #[arg(long, env = "TESTRUNNER_QUEUE")]
    pub queue: Option<String>,
    /// Queue that receives the worker's reports: its state (idle, or the ticket in
    /// hand, so that the operator never removes a busy worker) and one outcome per
    /// completed ticket (to tell a poison ticket from a broken image). Shared by the
    /// pools of a namespace: each report names `--pool`. None when empty.
    #[arg(long, env = "TESTRUNNER_OUTCOMES_QUEUE", default_value = "")]
    pub outcomes_queue: String,
    /// Queue that quarantined tickets are moved to.
    #[arg(long, env = "TESTRUNNER_QUARANTINE_QUEUE", default_value = "")]
    pub quarantine_queue: String,
    /// File listing ticket ids to quarantine, one per line (the operator's list,
    /// mounted from a ConfigMap). A listed ticket is moved to the quarantine queue
    /// instead of being run. Read before every ticket; none when empty or missing.
    #[arg(long, env = "TESTRUNNER_QUARANTINE_FILE")]
    pub quarantine_file: Option<PathBuf>,
    /// The work queue's delivery limit (its `x-delivery-limit`): a ticket the broker
    /// counts at this delivery (its `deliveryLimit`th) is set aside into the quarantine
    /// queue instead of being run, before the broker drops or dead-letters it, and the
    /// operator returns it once the pool works again. 0 turns it off.
    #[arg(long, env = "TESTRUNNER_DELIVERY_LIMIT", default_value_t = 0)]
    pub delivery_limit: u64,
    /// How often the worker repeats its state (idle, or the ticket in hand) on the
    /// outcome queue, besides reporting every change at once.
    #[arg(long, env = "TESTRUNNER_REPORT_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub report_interval: Duration,
    /// Name of this worker's pool, for the outcome reports: the operator routes each
    /// report of the shared outcome queue to the pool it names.
    #[arg(long, env = "TESTRUNNER_POOL", default_value = "")]
    pub pool: String,
    /// Uid of this worker's pool, for the outcome reports: a report of a deleted pool
    /// does not count for a new pool of the same name.
    #[arg(long, env = "TESTRUNNER_POOL_UID", default_value = "")]
    pub pool_uid: String,
    /// Name of this worker's pod, for the outcome reports.
    #[arg(long, env = "TESTRUNNER_POD_NAME", default_value = "")]
    pub pod_name: String,
    /// Revision of this worker's pod, for the outcome reports.
    #[arg(long, env = "TESTRUNNER_REVISION", default_value = "")]
    pub revision: String,
}

impl ConsumeArgs {
    /// The broker and the queue, or why they are unusable.
    fn broker(&self) -> Result<(BrokerUri, String), String> {
        let uri = self
            .amqp_uri
            .as_deref()
            .ok_or_else(|| format!("no broker: set --amqp-uri / {ENV_AMQP_URI}"))?;
        let uri = BrokerUri::parse(uri)
            .map_err(|e| format!("invalid --amqp-uri / {ENV_AMQP_URI}: {e}"))?;
        match self.queue.as_deref().map(str::trim) {
            Some(q) if !q.is_empty() => Ok((uri, q.to_string())),
            _ => Err("--queue / TESTRUNNER_QUEUE is empty".into()),
        }
    }
}

/// Runs COMMAND for each ticket of a RabbitMQ queue, one at a time.
#[derive(clap::Args, Debug)]
#[command(after_help = EXIT_CODES_HELP)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub consume: ConsumeArgs,
    /// Take tickets from the broker sidecar at this Unix socket instead of the broker:
    /// the credentials stay in the sidecar's container (worker pods do this).
    #[arg(long, env = socket::ENV_BROKER_SOCKET)]
    pub broker_socket: Option<PathBuf>,
    /// File overwritten with the worker's state before each step.
    #[arg(
        long,
        env = "TESTRUNNER_TERMINATION_LOG",
        default_value = "/dev/termination-log"
    )]
    pub termination_log: PathBuf,
    /// Comma-separated exit codes that mean "tests failed": the ticket is acked
    /// like a pass. Empty for none.
    #[arg(long, env = "TESTRUNNER_TEST_FAILURE_CODES", default_value = "1")]
    pub test_failure_codes: String,
    /// Exit 0 after this long without a ticket (for example `30s`, `5m`).
    #[arg(long, env = "TESTRUNNER_IDLE_EXIT", value_parser = humantime::parse_duration)]
    pub idle_exit: Option<Duration>,
    /// The command run for each ticket, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

mod command;
mod socket;

pub use socket::{ENV_BROKER_SOCKET, Reply, Request, SidecarArgs, serve as serve_sidecar};

// ---------------------------------------------------------------------------
// Pure parts
// ---------------------------------------------------------------------------

/// Why a worker moves a ticket to the quarantine queue instead of running it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Move {
    /// The operator listed it: a poison ticket.
    Listed,
    /// The broker counted it at the queue's delivery limit.
    SetAside,
}

/// True when a ticket at delivery `number` has reached `limit` (0: no limit) and the
/// broker counts its deliveries (`x-delivery-count`, quorum queues). A quorum queue
/// with `x-delivery-limit: L` delivers a ticket L + 1 times and drops or dead-letters it
/// when the last delivery comes back: at the Lth it is set aside, with one delivery to
/// spare should setting it aside fail.
pub fn at_delivery_limit(headers: Option<&FieldTable>, number: u64, limit: u64) -> bool {
    limit > 0
        && number >= limit
        && headers.is_some_and(|h| h.inner().contains_key("x-delivery-count"))
}

/// The 1-based delivery number of a ticket: `x-delivery-count + 1` when the
/// header is there (quorum queues), else 2 when the `redelivered` flag is set
/// (at least the second delivery), else 1.
pub fn delivery_number(headers: Option<&FieldTable>, redelivered: bool) -> u64 {
    let count = headers
        .and_then(|h| h.inner().get("x-delivery-count"))
        .and_then(|v| value_json(v).as_u64());
    match count {
        Some(c) => c.saturating_add(1),
        None if redelivered => 2,
        None => 1,
    }
}

/// How the command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Exit {
    /// It exited with this code.
    Code(i32),
    /// It was killed by this signal.
    Signal(i32),
}

impl Exit {
    /// Reads a process exit status.
    pub fn from_status(status: ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(code), _) => Exit::Code(code),
            (None, Some(sig)) => Exit::Signal(sig),
            // Neither: cannot happen for a finished process; treat as a crash.
            (None, None) => Exit::Code(255),
        }
    }

    /// The shell-style status: the exit code, or 128 + the signal number.
    pub fn status_code(self) -> u8 {
        match self {
            Exit::Code(c) => u8::try_from(c).unwrap_or(255),
            Exit::Signal(s) => u8::try_from(128 + s.clamp(0, 127)).unwrap_or(255),
        }
    }
}

/// How long a ticket waited in the queue before this worker took it, at `now_ms` (Unix
/// milliseconds): from its publish time, the header [`HEADER_TIMESTAMP_MS`] (Unix
/// milliseconds) or else the AMQP `timestamp` property (Unix seconds, so up to a second
/// too long). `None` on a redelivery (its wait would include the runs that crashed), for a
/// ticket replayed from quarantine (its stamp is from before its quarantine), and when the
/// publisher stamped nothing. A stamp from the future (clocks apart) counts as no wait.
pub fn queue_wait(properties: &BasicProperties, delivery: u64, now_ms: i64) -> Option<u64> {
    let headers = properties.headers().as_ref();
    if delivery != 1 || replayed_at(headers).is_some() {
        return None;
    }
    let header_ms = headers
        .and_then(|h| h.inner().get(HEADER_TIMESTAMP_MS))
        .and_then(|v| match v {
            AMQPValue::LongLongInt(n) => Some(*n),
            AMQPValue::LongInt(n) => Some((*n).into()),
            AMQPValue::LongUInt(n) => Some((*n).into()),
            AMQPValue::Timestamp(n) => i64::try_from(*n).ok(),
            _ => None,
        });
    let published_ms = match header_ms {
        Some(ms) => ms,
        None => i64::try_from((*properties.timestamp())?)
            .ok()?
            .checked_mul(1000)?,
    };
    Some(u64::try_from(now_ms.saturating_sub(published_ms)).unwrap_or(0))
}

/// The replay time a ticket carries, if it was replayed.
fn replayed_at(headers: Option<&FieldTable>) -> Option<i64> {
    match headers?.inner().get(HEADER_REPLAYED_AT)? {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some((*n).into()),
        AMQPValue::Timestamp(n) => i64::try_from(*n).ok(),
        _ => None,
    }
}

/// The quarantine list in `file`; empty when there is none or it cannot be read.
fn quarantine_list(file: Option<&std::path::Path>) -> Vec<QuarantineEntry> {
    file.and_then(|f| std::fs::read_to_string(f).ok())
        .map(|text| parse_quarantine_list(&text))
        .unwrap_or_default()
}

/// The evidence of `id` on the quarantine list in `file` (its first entry), as header
/// name and value pairs (`x-testrunner-crashes`, ...). A missing or unreadable file
/// lists nothing.
pub fn quarantine_evidence(file: Option<&std::path::Path>, id: &str) -> Vec<(String, String)> {
    quarantine_list(file)
        .into_iter()
        .find(|e| e.id == id)
        .map(|e| e.evidence_headers())
        .unwrap_or_default()
}

/// Waits for the broker's answer to `op` for at most [`BROKER_TIMEOUT`]; the error says
/// why, without the URI.
async fn answer<T>(op: impl std::future::Future<Output = lapin::Result<T>>) -> Result<(), String> {
    match tokio::time::timeout(BROKER_TIMEOUT, op).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(describe(&e)),
        Err(_) => Err("no answer".into()),
    }
}

/// True when the quarantine file lists `id` and the ticket was not replayed after it was
/// listed ([`QuarantineEntry::diverts`]). A missing or unreadable file lists nothing.
pub fn quarantine_listed(
    file: Option<&std::path::Path>,
    id: &str,
    replayed_at: Option<i64>,
) -> bool {
    quarantine_list(file)
        .iter()
        .any(|e| e.id == id && e.diverts(replayed_at))
}

/// Exit codes of the command that mean "the tests ran and some failed".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FailureCodes(BTreeSet<u8>);

impl FailureCodes {
    /// Parses `1`, `1,2,5`, or an empty string (none). Codes are 1 to 255.
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut codes = BTreeSet::new();
        for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let code: u8 = part
                .parse()
                .map_err(|_| format!("test-failure code {part:?} is not a number from 1 to 255"))?;
            if code == 0 {
                return Err("test-failure code 0 is a pass already".into());
            }
            codes.insert(code);
        }
        Ok(Self(codes))
    }

    /// Whether `code` is listed.
    pub fn contains(&self, code: i32) -> bool {
        u8::try_from(code).is_ok_and(|c| self.0.contains(&c))
    }
}

/// What to do with a ticket once its command has ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The command passed or reported failing tests: ack the ticket.
    Ack,
    /// The command crashed: leave the ticket unacked and exit with this status.
    Crash(u8),
}

/// Exit 0 or a listed test-failure code: ack. Anything else, signals included:
/// crash, with the shell-style status.
pub fn verdict(exit: Exit, failure_codes: &FailureCodes) -> Verdict {
    match exit {
        Exit::Code(0) => Verdict::Ack,
        Exit::Code(c) if failure_codes.contains(c) => Verdict::Ack,
        other => Verdict::Crash(other.status_code()),
    }
}

/// The environment variable name of header `name`: `TICKET_HEADER_` and the name
/// upper-cased, every character other than ASCII letters and digits made `_`.
pub fn header_env_name(name: &str) -> String {
    let mut out = String::from(HEADER_ENV_PREFIX);
    out.extend(name.chars().map(|c| {
        if c.is_ascii_alphanumeric() {
            c.to_ascii_uppercase()
        } else {
            '_'
        }
    }));
    out
}

/// A header value as environment-variable text: strings as they are (invalid
/// UTF-8 replaced by U+FFFD), numbers in decimal, booleans `true`/`false`,
/// timestamps as Unix seconds, decimals as `123.45`, byte arrays in hex, `void`
/// as empty, arrays and tables as JSON.
pub fn render_value(value: &AMQPValue) -> String {
    let text = match value {
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Float(f) => f.to_string(),
        AMQPValue::Double(f) => f.to_string(),
        AMQPValue::DecimalValue(d) => decimal_text(d.scale, d.value),
        AMQPValue::ShortString(s) => s.as_str().to_string(),
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::Timestamp(t) => t.to_string(),
        AMQPValue::ByteArray(b) => hex(b.as_slice()),
        AMQPValue::Void => String::new(),
        AMQPValue::FieldArray(_) | AMQPValue::FieldTable(_) => value_json(value).to_string(),
    };
    // Environment strings cannot hold NUL bytes.
    let text = text.replace('\0', "\u{FFFD}");
    truncate(text, MAX_HEADER_ENV_BYTES)
}

fn decimal_text(scale: u8, value: u32) -> String {
    let digits = value.to_string();
    let scale = usize::from(scale);
    if scale == 0 {
        return digits;
    }
    let padded = format!("{digits:0>width$}", width = scale + 1);
    let (int, frac) = padded.split_at(padded.len() - scale);
    format!("{int}.{frac}")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// A header value as JSON: like [`render_value`], but numbers, booleans,
/// arrays and tables keep their JSON types; `void` and non-finite floats are null.
pub fn value_json(value: &AMQPValue) -> serde_json::Value {
    use serde_json::Value;
    match value {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(n) => (*n).into(),
        AMQPValue::ShortShortUInt(n) => (*n).into(),
        AMQPValue::ShortInt(n) => (*n).into(),
        AMQPValue::ShortUInt(n) => (*n).into(),
        AMQPValue::LongInt(n) => (*n).into(),
        AMQPValue::LongUInt(n) => (*n).into(),
        AMQPValue::LongLongInt(n) => (*n).into(),
        AMQPValue::Timestamp(n) => (*n).into(),
        AMQPValue::Float(f) => {
            serde_json::Number::from_f64(f64::from(*f)).map_or(Value::Null, Value::Number)
        }
        AMQPValue::Double(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
        AMQPValue::DecimalValue(d) => Value::String(decimal_text(d.scale, d.value)),
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_string()),
        AMQPValue::LongString(s) => {
            Value::String(String::from_utf8_lossy(s.as_bytes()).into_owned())
        }
        AMQPValue::ByteArray(b) => Value::String(hex(b.as_slice())),
        AMQPValue::Void => Value::Null,
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(value_json).collect()),
        AMQPValue::FieldTable(t) => table_json(t),
    }
}

fn table_json(table: &FieldTable) -> serde_json::Value {
    serde_json::Value::Object(
        table
            .inner()
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), value_json(v)))
            .collect(),
    )
}

/// The ticket's environment for the command (besides the inherited one).
pub fn ticket_env(id: &str, delivery: u64, headers: Option<&FieldTable>) -> Vec<(String, String)> {
    let mut env = vec![
        ("TICKET_ID".to_string(), id.to_string()),
        ("TICKET_DELIVERY".to_string(), delivery.to_string()),
    ];
    let empty = FieldTable::default();
    let headers = headers.unwrap_or(&empty);
    let json = table_json(headers).to_string();
    if json.len() <= MAX_HEADERS_JSON_BYTES {
        env.push(("TICKET_HEADERS".into(), json));
    } else {
        env.push(("TICKET_HEADERS".into(), "{}".into()));
        env.push(("TICKET_HEADERS_TRUNCATED".into(), "1".into()));
    }
    let mut seen = BTreeSet::new();
    for (name, value) in headers.inner() {
        let var = header_env_name(name.as_str());
        // Two headers that map to the same name: the first in byte order wins.
        if seen.insert(var.clone()) {
            env.push((var, render_value(value)));
        }
    }
    env
}

/// Checks that `program` can be started before any ticket is taken, so that a
/// missing command charges no ticket with a delivery. A name without `/` is
/// looked up in `path` (the `PATH` value); with no `PATH` the check is left to
/// the start of the command itself.
pub fn check_command(
    program: &std::ffi::OsStr,
    path: Option<&std::ffi::OsStr>,
) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let shown = program.to_string_lossy();
    let runnable = |p: &std::path::Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.is_empty() {
        return Err("the command is empty".into());
    }
    if program.as_encoded_bytes().contains(&b'/') {
        let p = std::path::Path::new(program);
        return match std::fs::metadata(p) {
            Err(e) => Err(format!("cannot start command {shown}: {e}")),
            Ok(_) if !runnable(p) => Err(format!(
                "cannot start command {shown}: not an executable file"
            )),
            Ok(_) => Ok(()),
        };
    }
    let Some(path) = path else { return Ok(()) };
    if std::env::split_paths(path).any(|dir| runnable(&dir.join(program))) {
        Ok(())
    } else {
        Err(format!("cannot start command {shown}: not found in PATH"))
    }
}

// ---------------------------------------------------------------------------
// I/O
// ---------------------------------------------------------------------------

/// Overwrites the termination log; a failure to write is reported once and
/// does not stop the worker.
struct TerminationLog {
    path: PathBuf,
    warned: bool,
}

impl TerminationLog {
    fn new(path: PathBuf) -> Self {
        Self {
            path,
            warned: false,
        }
    }

    fn write(&mut self, line: &TerminationLine) {
        if let Err(e) = std::fs::write(&self.path, line.render())
            && !self.warned
        {
            self.warned = true;
            tracing::warn!(path = %self.path.display(), error = %e, "cannot write the termination log");
        }
    }
}

/// SIGTERM and SIGINT, received as one stream.
struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn recv(&mut self) -> nix::sys::signal::Signal {
        use nix::sys::signal::Signal as S;
        tokio::select! {
            _ = self.term.recv() => S::SIGTERM,
            _ = self.int.recv() => S::SIGINT,
        }
    }
}

/// What asks the worker to stop: its own signals (the `worker` command), or the broker
/// sidecar's, which stops a session once the ticket in hand is done (one request only).
enum Stops {
    Signals(Signals),
    Flag {
        stop: tokio::sync::watch::Receiver<bool>,
        seen: bool,
    },
}

impl Stops {
    fn flag(stop: tokio::sync::watch::Receiver<bool>) -> Self {
        Stops::Flag { stop, seen: false }
    }

    /// The next stop request (cancel-safe).
    async fn recv(&mut self) -> nix::sys::signal::Signal {
        match self {
            Stops::Signals(s) => s.recv().await,
            Stops::Flag { stop, seen } => {
                if *seen || stop.wait_for(|s| *s).await.is_err() {
                    return std::future::pending().await;
                }
                *seen = true;
                nix::sys::signal::Signal::SIGTERM
            }
        }
    }
}

/// A credential-free description of a lapin error.
fn describe(e: &lapin::Error) -> String {
    match e.kind() {
        ErrorKind::IOError(io) => format!("connection failed: {io}"),
        ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => {
                format!("access refused: {}", amqp.get_message())
            }
            _ => format!(
                "the broker closed the channel or connection: {}",
                amqp.get_message()
            ),
        },
        ErrorKind::AuthProviderError(_) => "the broker refused the credentials".into(),
        ErrorKind::MissingHeartbeatError => "the broker stopped sending heartbeats".into(),
        ErrorKind::InvalidConnectionState(_) => "the connection is closed".into(),
        ErrorKind::InvalidChannelState(..) => "the channel is closed".into(),
        _ => "the connection failed".into(),
    }
}

/// Where the commands of tickets run.
enum Runner {
    /// Here, as children of this process (the `worker` command).
    Local {
        command: Vec<OsString>,
        codes: FailureCodes,
    },
    /// In the test container, by the wrapper at the other end of the socket (the broker
    /// sidecar).
    Remote(socket::Link),
}

/// The sidecar's link to its wrapper (`None` for a local runner).
fn link_of(runner: &mut Runner) -> Option<&mut socket::Link> {
    match runner {
        Runner::Remote(link) => Some(link),
        Runner::Local { .. } => None,
    }
}

/// The wrapper's next request; pending forever for a local runner.
async fn request_of(runner: &mut Runner) -> std::io::Result<Option<socket::Request>> {
    match link_of(runner) {
        Some(link) => link.recv().await,
        None => std::future::pending().await,
    }
}

/// How a ticket's command ended.
enum Ended {
    /// Passed or tests failed: ack it (the exit, how long it ran).
    Done(Exit, Duration),
    /// It crashed: the ticket stays unacked and goes back with the connection; the
    /// worker exits with this code (the sidecar ends the session).
    Crashed(u8),
    /// Already handled: the worker exits with this code.
    Exit(u8),
}

struct Worker {
    consume: ConsumeArgs,
    queue: String,
    idle_exit: Option<Duration>,
    log: TerminationLog,
    stops: Stops,
    connection: Connection,
    channel: Channel,
    consumer: Consumer,
    consumer_tag: String,
    cancelled: bool,
    runner: Runner,
    /// The remote wrapper asked for a ticket (always true for a local runner).
    asked: bool,
}

/// Runs the worker; the returned code is the process exit status.
pub async fn run(args: WorkerArgs) -> ExitCode {
    ExitCode::from(run_code(args).await)
}

async fn run_code(args: WorkerArgs) -> u8 {
    let mut log = TerminationLog::new(args.termination_log.clone());
    log.write(&TerminationLine::Starting);

    let config_error = |log: &mut TerminationLog, why: String| {
        tracing::error!("{why}");
        log.write(&TerminationLine::ConfigError(why));
        WorkerExit::Config.code()
    };
    let broker = match &args.broker_socket {
        Some(_) => None,
        None => match args.consume.broker() {
            Ok(b) => Some(b),
            Err(e) => return config_error(&mut log, e),
        },
    };
    let codes = match FailureCodes::parse(&args.test_failure_codes) {
        Ok(c) => c,
        Err(e) => return config_error(&mut log, e),
    };
    if let Err(why) = check_command(&args.command[0], std::env::var_os("PATH").as_deref()) {
        tracing::error!("{why}");
        log.write(&TerminationLine::CommandError(why));
        return WorkerExit::CommandNotStarted.code();
    }
    let mut signals = match Signals::new() {
        Ok(s) => s,
        Err(e) => return config_error(&mut log, format!("cannot handle signals: {e}")),
    };
    let Some((uri, queue)) = broker else {
        let socket = args
            .broker_socket
            .clone()
            .expect("a socket without a broker");
        return socket::run_client(&args, &socket, codes, log, signals).await;
    };

    let setup = tokio::select! {
        r = Worker::start(
            args.consume.clone(),
            queue,
            uri,
            args.idle_exit,
            log,
            Stops::Signals(Signals::new().expect("signals were set up above")),
            Runner::Local { command: args.command.clone(), codes },
        ) => r,
        sig = signals.recv() => {
            tracing::info!(signal = %sig, "stopping before the first ticket");
            return 0;
        }
    };
    drop(signals);
    let mut worker = match setup {
        Ok(w) => w,
        Err(_) => return WorkerExit::BrokerUnavailable.code(),
    };
    if let Err(why) = worker.report_state(None).await {
        return worker
            .broker_lost(format!("cannot report the worker's state: {why}"))
            .await;
    }
    worker.consume().await
}

async fn connect(
    uri: &BrokerUri,
    queue: &str,
) -> Result<(Connection, Channel, Consumer, String), String> {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let pid = std::process::id();
    let props = ConnectionProperties::default()
        .with_connection_name(format!("testrunner-worker {host} pid={pid}").into());
    let connection = crate::broker::connect(uri, props)
        .await
        .map_err(|e| describe(&e))?;
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| describe(&e))?;
    channel
        .basic_qos(1, BasicQosOptions::default())
        .await
        .map_err(|e| describe(&e))?;
    // Acks are transactional: moving a ticket to quarantine (publish, then ack) and
    // its outcome report take effect together, at commit, or not at all.
    channel.tx_select().await.map_err(|e| describe(&e))?;
    let tag = format!("testrunner-worker-{host}-{pid}");
    let consumer = channel
        .basic_consume(
            queue.into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| describe(&e))?;
    Ok((connection, channel, consumer, tag))
}

impl Worker {
    /// Connects to the broker and starts consuming `queue`. On failure the termination
    /// log says why, and the runner comes back with the reason.
    async fn start(
        consume: ConsumeArgs,
        queue: String,
        uri: BrokerUri,
        idle_exit: Option<Duration>,
        mut log: TerminationLog,
        stops: Stops,
        runner: Runner,
    ) -> Result<Self, (Runner, String)> {
        let (connection, channel, consumer, consumer_tag) =
            match tokio::time::timeout(BROKER_TIMEOUT, connect(&uri, &queue)).await {
                Ok(Ok(parts)) => parts,
                Ok(Err(why)) => {
                    tracing::error!(broker = %uri, %queue, "cannot start consuming: {why}");
                    log.write(&TerminationLine::BrokerUnavailable(why.clone()));
                    return Err((runner, why));
                }
                Err(_) => {
                    let why = format!("no answer from the broker within {BROKER_TIMEOUT:?}");
                    tracing::error!(broker = %uri, %queue, "cannot start consuming: {why}");
                    log.write(&TerminationLine::BrokerUnavailable(why.clone()));
                    return Err((runner, why));
                }
            };
        tracing::info!(broker = %uri, %queue, "consuming, one ticket at a time");
        log.write(&TerminationLine::Idle);
        let asked = matches!(runner, Runner::Local { .. });
        Ok(Worker {
            consume,
            queue,
            idle_exit,
            log,
            stops,
            connection,
            channel,
            consumer,
            consumer_tag,
            cancelled: false,
            runner,
            asked,
        })
    }

    fn healthy(&self) -> bool {
        self.connection.status().connected() && self.channel.status().connected()
    }

    fn remote(&self) -> bool {
        matches!(self.runner, Runner::Remote(_))
    }

    /// Tells the remote wrapper `reply`, best effort.
    async fn tell(&mut self, reply: socket::Reply) {
        if let Some(link) = link_of(&mut self.runner) {
            let _ = tokio::time::timeout(BROKER_TIMEOUT, link.send(&reply)).await;
        }
    }

    /// The consume loop: waits for tickets, signals, the idle deadline and, in the
    /// sidecar, the wrapper's requests. Returns the exit code.
    async fn consume(&mut self) -> u8 {
        let mut health = tokio::time::interval(HEALTH_TICK);
        let mut heartbeat = self.heartbeat();
        let mut idle_until = self.idle_exit.map(|d| Instant::now() + d);
        let remote = self.remote();
        loop {
            let idle_deadline = async {
                match idle_until {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let takes = self.asked && !self.cancelled;
            tokio::select! {
                next = self.consumer.next(), if takes => match next {
                    Some(Ok(delivery)) => {
                        if let Some(stop) = self.ticket(delivery).await {
                            return stop;
                        }
                        idle_until = self.idle_exit.map(|d| Instant::now() + d);
                    }
                    Some(Err(e)) => return self.broker_lost(describe(&e)).await,
                    None => return self.broker_lost("the broker cancelled the consumer".into()).await,
                },
                request = request_of(&mut self.runner), if remote => match request {
                    Ok(Some(socket::Request::Next)) if !self.cancelled => self.asked = true,
                    Ok(Some(socket::Request::Next | socket::Request::Stop)) => {
                        tracing::info!("the wrapper's session ends: no ticket in hand");
                        self.close().await;
                        self.tell(socket::Reply::Stopped).await;
                        return 0;
                    }
                    Ok(None) => {
                        tracing::info!("the wrapper went away with no ticket in hand");
                        self.close().await;
                        return 0;
                    }
                    Ok(Some(other)) => {
                        tracing::warn!(?other, "unexpected request from the wrapper: session closed");
                        self.close().await;
                        return 0;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the wrapper's connection failed: session closed");
                        self.close().await;
                        return 0;
                    }
                },
                sig = self.stops.recv() => {
                    if remote && !self.asked {
                        // The wrapper hears it when it asks for the next ticket.
                        tracing::info!(signal = %sig, "stopping: the wrapper gets no more tickets");
                        self.cancel().await;
                        continue;
                    }
                    tracing::info!(signal = %sig, "stopping: no ticket in hand");
                    self.close().await;
                    self.tell(socket::Reply::Stopped).await;
                    return 0;
                }
                _ = idle_deadline => {
                    tracing::info!("no ticket for the --idle-exit period: stopping");
                    self.close().await;
                    return 0;
                }
                _ = health.tick() => {
                    if !self.healthy() {
                        return self.broker_lost("the connection was closed".into()).await;
                    }
                }
                _ = heartbeat.tick() => {
                    if let Err(why) = self.report_state(None).await {
                        tracing::debug!(error = %why, "state report not sent");
                    }
                }
            }
        }
    }

    /// Ticks every report interval, the first one interval from now.
    fn heartbeat(&self) -> tokio::time::Interval {
        let every = self.consume.report_interval.max(Duration::from_millis(100));
        let mut tick = tokio::time::interval_at(Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick
    }

    /// Handles one delivery. `None`: go on consuming; else the exit code.
    async fn ticket(&mut self, mut delivery: lapin::message::Delivery) -> Option<u8> {
        let headers = delivery.properties.headers().clone();
        let id = ticket_id(
            delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.as_str()),
            &delivery.data,
        );
        let number = delivery_number(headers.as_ref(), delivery.redelivered);
        self.log.write(&TerminationLine::Ticket {
            id: id.clone(),
            delivery: number,
        });
        if quarantine_listed(
            self.consume.quarantine_file.as_deref(),
            &id,
            replayed_at(headers.as_ref()),
        ) {
            return self.divert(delivery, &id, number, Move::Listed).await;
        }
        if at_delivery_limit(headers.as_ref(), number, self.consume.delivery_limit) {
            let queue = self.consume.quarantine_queue.clone();
            if !queue.is_empty() && self.queue_exists(&queue).await {
                return self.divert(delivery, &id, number, Move::SetAside).await;
            }
            // Giving it back would bring it closer to being dropped: run it.
            tracing::warn!(ticket = %id, delivery = number, quarantine = %queue, "ticket at the delivery limit, but there is no quarantine queue to set it aside into: running it");
        }
        // The operator learns that this worker is busy before its command starts, so it
        // never removes it to shrink the pool while the ticket runs; and how long the
        // ticket waited for a worker.
        let waited = queue_wait(
            &delivery.properties,
            number,
            jiff::Timestamp::now().as_millisecond(),
        );
        if let Err(why) = self.report_taken(&id, number, waited).await {
            return Some(
                self.broker_lost(format!("cannot report ticket {id} as taken: {why}"))
                    .await,
            );
        }
        let body = std::mem::take(&mut delivery.data);
        tracing::info!(ticket = %id, delivery = number, bytes = body.len(), "ticket received");
        let env = ticket_env(&id, number, headers.as_ref());
        let ended = if self.remote() {
            self.run_remote(&id, number, env, body).await
        } else {
            self.run_local(&delivery, &id, env, body).await
        };
        match ended {
            Ended::Done(exit, elapsed) => {
                if let Err(why) = answer(delivery.ack(BasicAckOptions::default())).await {
                    return Some(
                        self.broker_lost(format!("cannot ack ticket {id}: {why}"))
                            .await,
                    );
                }
                self.report_outcome(&id, number, exit, elapsed).await;
                if let Err(why) = self.commit().await {
                    return Some(
                        self.broker_lost(format!("cannot ack ticket {id}: {why}"))
                            .await,
                    );
                }
                self.log.write(&TerminationLine::Idle);
                tracing::info!(ticket = %id, delivery = number, ?exit, ?elapsed, "ticket done and acked");
                if self.remote() {
                    self.asked = false;
                    self.tell(socket::Reply::Acked).await;
                } else if self.cancelled {
                    self.close().await;
                    return Some(0);
                }
                None
            }
            Ended::Crashed(code) => {
                self.close().await;
                Some(code)
            }
            Ended::Exit(code) => Some(code),
        }
    }

    /// Runs the ticket's command here.
    async fn run_local(
        &mut self,
        delivery: &lapin::message::Delivery,
        id: &str,
        env: Vec<(String, String)>,
        body: Vec<u8>,
    ) -> Ended {
        let Runner::Local { command, .. } = &self.runner else {
            unreachable!("run_local on a remote runner")
        };
        let mut running = match Running::start(command, env, body) {
            Ok(r) => r,
            Err(why) => {
                tracing::error!(ticket = %id, "{why}; giving the ticket back");
                self.log.write(&TerminationLine::CommandError(why));
                let nack = delivery.nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                });
                let _ = tokio::time::timeout(BROKER_TIMEOUT, nack).await;
                let _ = self.commit().await;
                self.close().await;
                return Ended::Exit(WorkerExit::CommandNotStarted.code());
            }
        };
        let started = Instant::now();
        let mut health = tokio::time::interval(HEALTH_TICK);
        let mut heartbeat = self.heartbeat();
        let mut forwarded = None;
        let exit = loop {
            tokio::select! {
                exit = running.wait() => break exit,
                sig = self.stops.recv() => {
                    if self.cancelled {
                        tracing::warn!(ticket = %id, signal = %sig, "second stop signal: forwarding it to the command; the ticket stays unacked");
                        running.signal(sig);
                        forwarded = Some(sig);
                    } else {
                        tracing::info!(ticket = %id, signal = %sig, "stopping after this ticket");
                        self.cancel().await;
                    }
                }
                next = self.consumer.next(), if !self.cancelled => match next {
                    Some(Ok(extra)) => {
                        // Cannot happen with prefetch 1; give it back untouched.
                        let _ = extra.nack(BasicNackOptions { requeue: true, ..Default::default() }).await;
                    }
                    Some(Err(e)) => return self.stop_command(running, id, describe(&e)).await,
                    None => {
                        return self.stop_command(running, id, "the broker cancelled the consumer".into()).await;
                    }
                },
                _ = health.tick() => {
                    if !self.healthy() {
                        return self.stop_command(running, id, "the connection was closed".into()).await;
                    }
                }
                _ = heartbeat.tick() => {
                    if let Err(why) = self.report_state(Some((id, delivery_number(delivery.properties.headers().as_ref(), delivery.redelivered)))).await {
                        tracing::debug!(ticket = %id, error = %why, "state report not sent");
                    }
                }
            }
        };
        let elapsed = started.elapsed();
        if let Some(sig) = forwarded {
            tracing::warn!(ticket = %id, ?exit, "command stopped by a forwarded signal; ticket left unacked");
            self.close().await;
            return Ended::Exit(128 + sig as u8);
        }
        let Runner::Local { codes, .. } = &self.runner else {
            unreachable!("run_local on a remote runner")
        };
        match verdict(exit, codes) {
            Verdict::Ack => Ended::Done(exit, elapsed),
            Verdict::Crash(code) => {
                tracing::error!(ticket = %id, ?exit, ?elapsed, "command crashed; ticket left unacked");
                Ended::Crashed(code)
            }
        }
    }

    /// Hands the ticket to the wrapper and waits for it to be done.
    async fn run_remote(
        &mut self,
        id: &str,
        number: u64,
        env: Vec<(String, String)>,
        body: Vec<u8>,
    ) -> Ended {
        let ticket = socket::Reply::Ticket {
            id: id.into(),
            delivery: number,
            env,
        };
        let link = link_of(&mut self.runner).expect("run_remote on a local runner");
        if let Err(e) = link.send_ticket(ticket, body).await {
            tracing::warn!(ticket = %id, error = %e, "the wrapper went away before it got the ticket: it goes back to the queue");
            return Ended::Crashed(0);
        }
        let mut health = tokio::time::interval(HEALTH_TICK);
        let mut heartbeat = self.heartbeat();
        loop {
            tokio::select! {
                request = request_of(&mut self.runner) => match request {
                    Ok(Some(socket::Request::Done { exit, elapsed_ms })) => {
                        return Ended::Done(exit, Duration::from_millis(elapsed_ms));
                    }
                    Ok(Some(socket::Request::Stop)) => self.cancel().await,
                    Ok(None) => {
                        tracing::warn!(ticket = %id, "the wrapper went away with the ticket in hand: it goes back to the queue");
                        return Ended::Crashed(0);
                    }
                    Ok(Some(other)) => {
                        tracing::warn!(ticket = %id, ?other, "unexpected request from the wrapper with a ticket in hand: session closed, the ticket goes back to the queue");
                        return Ended::Crashed(0);
                    }
                    Err(e) => {
                        tracing::warn!(ticket = %id, error = %e, "the wrapper's connection failed with the ticket in hand: it goes back to the queue");
                        return Ended::Crashed(0);
                    }
                },
                sig = self.stops.recv() => {
                    tracing::info!(ticket = %id, signal = %sig, "stopping after the wrapper's ticket");
                    self.cancel().await;
                }
                next = self.consumer.next(), if !self.cancelled => match next {
                    Some(Ok(extra)) => {
                        let _ = extra.nack(BasicNackOptions { requeue: true, ..Default::default() }).await;
                    }
                    Some(Err(e)) => return Ended::Exit(self.broker_lost(describe(&e)).await),
                    None => return Ended::Exit(self.broker_lost("the broker cancelled the consumer".into()).await),
                },
                _ = health.tick() => {
                    if !self.healthy() {
                        return Ended::Exit(self.broker_lost("the connection was closed".into()).await);
                    }
                }
                _ = heartbeat.tick() => {
                    if let Err(why) = self.report_state(Some((id, number))).await {
                        tracing::debug!(ticket = %id, error = %why, "state report not sent");
                    }
                }
            }
        }
    }

    /// The connection is gone mid-ticket: stop the command, exit [`WorkerExit::BrokerLost`].
    async fn stop_command(&mut self, running: Running, id: &str, why: String) -> Ended {
        tracing::error!(ticket = %id, "broker connection lost ({why}); stopping the command, the broker requeues the ticket");
        self.log.write(&TerminationLine::BrokerLost(why));
        running.stop().await;
        Ended::Exit(WorkerExit::BrokerLost.code())
    }

    /// The broker connection is lost: say so (to the wrapper too, in the sidecar) and
    /// return [`WorkerExit::BrokerLost`].
    async fn broker_lost(&mut self, why: String) -> u8 {
        tracing::error!("broker connection lost: {why}");
        self.log.write(&TerminationLine::BrokerLost(why.clone()));
        self.tell(socket::Reply::BrokerLost { reason: why }).await;
        WorkerExit::BrokerLost.code()
    }

    /// Stops taking tickets.
    async fn cancel(&mut self) {
        if self.cancelled {
            return;
        }
        self.cancelled = true;
        let cancel = self.channel.basic_cancel(
            self.consumer_tag.as_str().into(),
            BasicCancelOptions::default(),
        );
        if let Ok(Err(e)) | Err(e) = tokio::time::timeout(BROKER_TIMEOUT, cancel)
            .await
            .map_err(|_| "no answer".to_string())
            .map(|r| r.map_err(|e| describe(&e)))
        {
            tracing::warn!("cannot cancel the consumer: {e}");
        } else {
            tracing::info!("consumer cancelled: no new tickets");
        }
    }

    /// Commits the channel's transaction: the pending ack and publishes take effect.
    async fn commit(&self) -> Result<(), String> {
        answer(self.channel.tx_commit()).await
    }

    /// Moves a listed ticket, or one at the delivery limit, to the quarantine queue:
    /// publish a copy (body, properties and headers kept, plus where it came from), ack
    /// the original, and commit both at once. A worker that dies before the commit
    /// leaves the ticket where it was; after it, only the moved copy exists.
    async fn divert(
        &mut self,
        delivery: lapin::message::Delivery,
        id: &str,
        number: u64,
        why: Move,
    ) -> Option<u8> {
        let queue = self.consume.quarantine_queue.clone();
        if queue.is_empty() || !self.queue_exists(&queue).await {
            tracing::error!(ticket = %id, quarantine = %queue, "ticket listed for quarantine but the quarantine queue is missing; giving it back");
            let nack = delivery.nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            });
            let _ = tokio::time::timeout(BROKER_TIMEOUT, nack).await;
            let _ = self.commit().await;
            self.log.write(&TerminationLine::Idle);
            // Do not spin on it: it comes straight back.
            tokio::time::sleep(Duration::from_secs(1)).await;
            return None;
        }
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        headers.insert(
            HEADER_QUARANTINED_FROM.into(),
            AMQPValue::LongString(self.queue.as_str().into()),
        );
        headers.insert(
            HEADER_QUARANTINED_BY.into(),
            AMQPValue::LongString(self.consume.pod_name.as_str().into()),
        );
        headers.insert(
            HEADER_DELIVERY.into(),
            AMQPValue::LongLongInt(number as i64),
        );
        match why {
            Move::Listed => {
                for (name, value) in
                    quarantine_evidence(self.consume.quarantine_file.as_deref(), id)
                {
                    headers.insert(
                        name.as_str().into(),
                        AMQPValue::LongString(value.as_str().into()),
                    );
                }
            }
            Move::SetAside => {
                headers.insert(
                    HEADER_SET_ASIDE.into(),
                    AMQPValue::LongString(
                        format!("delivery limit {}", self.consume.delivery_limit)
                            .as_str()
                            .into(),
                    ),
                );
            }
        }
        let properties = delivery.properties.clone().with_headers(headers);
        let moved = async {
            self.channel
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    &delivery.data,
                    properties,
                )
                .await?;
            delivery.ack(BasicAckOptions::default()).await
        };
        if let Err(why) = answer(moved).await {
            return Some(
                self.broker_lost(format!("cannot quarantine ticket {id}: {why}"))
                    .await,
            );
        }
        let outcome = match why {
            Move::Listed => Outcome::Quarantined,
            Move::SetAside => Outcome::SetAside,
        };
        self.report(id, number, outcome, 0, Duration::ZERO).await;
        if let Err(why) = self.commit().await {
            return Some(
                self.broker_lost(format!("cannot quarantine ticket {id}: {why}"))
                    .await,
            );
        }
        self.log.write(&TerminationLine::Idle);
        match why {
            Move::Listed => {
                tracing::warn!(ticket = %id, delivery = number, quarantine = %queue, "ticket moved to quarantine")
            }
            Move::SetAside => {
                tracing::warn!(ticket = %id, delivery = number, limit = self.consume.delivery_limit, quarantine = %queue, "ticket at the delivery limit set aside; the operator returns it once the pool works again")
            }
        }
        None
    }

    /// True when `queue` exists (checked on a throwaway channel: a missing queue
    /// closes the channel it is asked on).
    async fn queue_exists(&self, queue: &str) -> bool {
        let check = async {
            let ch = self.connection.create_channel().await?;
            let found = ch
                .queue_declare(
                    queue.into(),
                    lapin::options::QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await;
            if found.is_ok() {
                let _ = ch.close(200, "checked".into()).await;
            }
            found
        };
        matches!(tokio::time::timeout(BROKER_TIMEOUT, check).await, Ok(Ok(_)))
    }

    /// Publishes the outcome report of an acked ticket inside the current
    /// transaction, best effort: a report that cannot be sent is only logged.
    async fn report_outcome(&self, id: &str, delivery: u64, exit: Exit, elapsed: Duration) {
        let (outcome, code) = match exit {
            Exit::Code(0) => (Outcome::Passed, 0),
            Exit::Code(c) => (Outcome::Failed, c),
            Exit::Signal(s) => (Outcome::Failed, 128 + s),
        };
        self.report(id, delivery, outcome, code, elapsed).await;
    }

    /// Publishes one outcome report inside the current transaction, best effort.
    async fn report(
        &self,
        id: &str,
        delivery: u64,
        outcome: Outcome,
        code: i32,
        elapsed: Duration,
    ) {
        let report = Report {
            pool: self.consume.pool.clone(),
            pool_uid: self.consume.pool_uid.clone(),
            pod: self.consume.pod_name.clone(),
            revision: self.consume.revision.clone(),
            outcome: Some(outcome),
            ticket: Some(id.into()),
            delivery: Some(delivery),
            exit_code: Some(code),
            duration_ms: Some(elapsed.as_millis() as u64),
            ..Default::default()
        };
        if let Err(why) = self.publish_report(&report).await {
            tracing::debug!(ticket = %id, error = %why, "outcome report not sent");
        }
    }

    /// Reports the worker's state (idle, or `ticket` in hand) and commits it, so the
    /// operator has it before anything else happens. No-op without an outcome queue.
    async fn report_state(&self, ticket: Option<(&str, u64)>) -> Result<(), String> {
        if self.consume.outcomes_queue.is_empty() {
            return Ok(());
        }
        let report = Report::state(&self.consume.pod_name, &self.consume.revision, ticket)
            .of_pool(&self.consume.pool, &self.consume.pool_uid);
        self.publish_report(&report).await?;
        self.commit().await
    }

    /// Reports that the worker took ticket `id` (delivery `number`), which waited
    /// `waited_ms` in the queue, and commits it. No-op without an outcome queue.
    async fn report_taken(
        &self,
        id: &str,
        number: u64,
        waited_ms: Option<u64>,
    ) -> Result<(), String> {
        if self.consume.outcomes_queue.is_empty() {
            return Ok(());
        }
        let report = Report::state(
            &self.consume.pod_name,
            &self.consume.revision,
            Some((id, number)),
        )
        .with_wait(waited_ms);
        self.publish_report(&report).await?;
        self.commit().await
    }

    /// Publishes `report` to the outcome queue inside the current transaction.
    async fn publish_report(&self, report: &Report) -> Result<(), String> {
        if self.consume.outcomes_queue.is_empty() {
            return Ok(());
        }
        answer(self.channel.basic_publish(
            "".into(),
            self.consume.outcomes_queue.as_str().into(),
            BasicPublishOptions::default(),
            &report.to_vec(),
            BasicProperties::default().with_content_type("application/json".into()),
        ))
        .await
    }

    /// Closes the connection; anything unacked goes back to the queue.
    async fn close(&mut self) {
        self.cancel().await;
        let close = self.connection.close(200, "worker stopping".into());
        let _ = tokio::time::timeout(Duration::from_secs(5), close).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quarantine_lines_carry_the_evidence_into_headers() {
        let line = crate::contract::quarantine_example::LINE;
        let dir = std::env::temp_dir().join(format!("qline-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("tickets");
        std::fs::write(&file, format!("other 5\n{line}")).unwrap();
        let headers = quarantine_evidence(Some(&file), "t-9");
        assert_eq!(headers, crate::contract::quarantine_example::headers());
        assert!(quarantine_listed(Some(&file), "t-9", Some(999)));
        assert!(quarantine_evidence(Some(&file), "other").is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_quarantine_list_skips_tickets_replayed_after_they_were_listed() {
        let dir = std::env::temp_dir().join(format!("qlist-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("tickets");
        std::fs::write(&file, "t-1 1000\nt-2\n").unwrap();
        let f = Some(file.as_path());
        assert!(quarantine_listed(f, "t-1", None));
        assert!(
            quarantine_listed(f, "t-1", Some(999)),
            "listed again after a replay"
        );
        assert!(
            !quarantine_listed(f, "t-1", Some(1000)),
            "replayed after it was listed"
        );
        assert!(quarantine_listed(f, "t-2", None));
        assert!(
            !quarantine_listed(f, "t-2", Some(5)),
            "no listing time: a replay wins"
        );
        assert!(!quarantine_listed(f, "t-3", None));
        assert!(!quarantine_listed(Some(&dir.join("missing")), "t-1", None));
        assert!(!quarantine_listed(None, "t-1", None));
        std::fs::remove_dir_all(&dir).unwrap();
    }
    use lapin::types::{ByteArray, DecimalValue, FieldArray, LongString, ShortString};

    fn table(pairs: Vec<(&str, AMQPValue)>) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert(ShortString::from(k), v);
        }
        t
    }

    #[test]
    fn the_wait_runs_from_the_publish_stamp_on_first_deliveries_only() {
        let now = 1_800_000_000_000;
        let seconds = BasicProperties::default().with_timestamp(1_800_000_000 - 7);
        assert_eq!(queue_wait(&seconds, 1, now), Some(7_000));
        assert_eq!(queue_wait(&seconds, 2, now), None, "a redelivery");
        let millis = seconds.clone().with_headers(table(vec![(
            HEADER_TIMESTAMP_MS,
            AMQPValue::LongLongInt(now - 1_234),
        )]));
        assert_eq!(queue_wait(&millis, 1, now), Some(1_234), "the header wins");
        let future = BasicProperties::default().with_timestamp(1_800_000_000 + 60);
        assert_eq!(queue_wait(&future, 1, now), Some(0));
        assert_eq!(queue_wait(&BasicProperties::default(), 1, now), None);
        let replayed = seconds.with_headers(table(vec![(
            HEADER_REPLAYED_AT,
            AMQPValue::LongLongInt(1_800_000_000),
        )]));
        assert_eq!(queue_wait(&replayed, 1, now), None, "a replayed ticket");
    }

    #[test]
    fn delivery_number_from_header_or_flag() {
        assert_eq!(delivery_number(None, false), 1);
        assert_eq!(delivery_number(None, true), 2);
        let h = table(vec![("x-delivery-count", AMQPValue::LongLongInt(3))]);
        assert_eq!(delivery_number(Some(&h), true), 4);
        let h = table(vec![("x-delivery-count", AMQPValue::LongInt(0))]);
        assert_eq!(delivery_number(Some(&h), false), 1);
        let h = table(vec![("x-delivery-count", AMQPValue::ShortUInt(1))]);
        assert_eq!(delivery_number(Some(&h), false), 2);
    }

    #[test]
    fn a_ticket_is_set_aside_at_the_delivery_limit_only_where_the_broker_counts() {
        let counted = |n: i64| table(vec![("x-delivery-count", AMQPValue::LongLongInt(n))]);
        // x-delivery-limit 20: deliveries 1 to 21, the 21st's return drops it. At the
        // 20th (x-delivery-count 19) it is set aside.
        let h = counted(18);
        assert!(!at_delivery_limit(
            Some(&h),
            delivery_number(Some(&h), true),
            20
        ));
        let h = counted(19);
        assert!(at_delivery_limit(
            Some(&h),
            delivery_number(Some(&h), true),
            20
        ));
        let h = counted(20);
        assert!(at_delivery_limit(
            Some(&h),
            delivery_number(Some(&h), true),
            20
        ));
        assert!(!at_delivery_limit(Some(&h), 21, 0), "0 turns it off");
        // A classic queue counts nothing: its redelivered flag says 2 at most.
        assert!(!at_delivery_limit(None, 2, 2));
        assert!(!at_delivery_limit(Some(&table(vec![])), 30, 20));
    }

    #[test]
    fn delivery_number_ignores_odd_count_headers() {
        let h = table(vec![(
            "x-delivery-count",
            AMQPValue::LongString("7".into()),
        )]);
        assert_eq!(delivery_number(Some(&h), true), 2);
        let h = table(vec![("x-delivery-count", AMQPValue::LongLongInt(-5))]);
        assert_eq!(delivery_number(Some(&h), false), 1);
        let h = table(vec![("x-delivery-count", AMQPValue::LongLongInt(i64::MAX))]);
        assert_eq!(delivery_number(Some(&h), false), i64::MAX as u64 + 1);
        let h = table(vec![("other", AMQPValue::LongLongInt(9))]);
        assert_eq!(delivery_number(Some(&h), false), 1);
    }

    #[test]
    fn pass_and_test_failures_are_acked_everything_else_crashes() {
        let codes = FailureCodes::parse("1").unwrap();
        assert_eq!(verdict(Exit::Code(0), &codes), Verdict::Ack);
        assert_eq!(verdict(Exit::Code(1), &codes), Verdict::Ack);
        assert_eq!(verdict(Exit::Code(2), &codes), Verdict::Crash(2));
        assert_eq!(verdict(Exit::Code(139), &codes), Verdict::Crash(139));
        assert_eq!(verdict(Exit::Signal(9), &codes), Verdict::Crash(137));
        assert_eq!(verdict(Exit::Signal(11), &codes), Verdict::Crash(139));
        let none = FailureCodes::parse("").unwrap();
        assert_eq!(verdict(Exit::Code(1), &none), Verdict::Crash(1));
        let many = FailureCodes::parse(" 1, 5 ,42").unwrap();
        assert_eq!(verdict(Exit::Code(5), &many), Verdict::Ack);
        assert_eq!(verdict(Exit::Code(42), &many), Verdict::Ack);
        assert_eq!(verdict(Exit::Code(4), &many), Verdict::Crash(4));
    }

    #[test]
    fn failure_code_lists_are_checked() {
        assert!(FailureCodes::parse("0").is_err());
        assert!(FailureCodes::parse("256").is_err());
        assert!(FailureCodes::parse("one").is_err());
        assert!(FailureCodes::parse("-1").is_err());
        assert_eq!(FailureCodes::parse(",,"), Ok(FailureCodes::default()));
        assert!(!FailureCodes::parse("1").unwrap().contains(-1));
        assert!(!FailureCodes::parse("1").unwrap().contains(257));
    }

    #[test]
    fn exit_status_of_real_processes() {
        let status = std::process::Command::new("sh")
            .args(["-c", "exit 3"])
            .status()
            .unwrap();
        assert_eq!(Exit::from_status(status), Exit::Code(3));
        let status = std::process::Command::new("sh")
            .args(["-c", "kill -9 $$"])
            .status()
            .unwrap();
        assert_eq!(Exit::from_status(status), Exit::Signal(9));
        assert_eq!(Exit::Signal(9).status_code(), 137);
    }

    #[test]
    fn commands_are_checked_before_taking_tickets() {
        use std::ffi::OsStr;
        let path = Some(OsStr::new("/nonexistent-dir:/bin:/usr/bin"));
        assert_eq!(check_command(OsStr::new("sh"), path), Ok(()));
        assert_eq!(check_command(OsStr::new("/bin/sh"), None), Ok(()));
        assert_eq!(
            check_command(OsStr::new("anything"), None),
            Ok(()),
            "no PATH: left to spawn"
        );
        let err = check_command(OsStr::new("no-such-test-runner"), path).unwrap_err();
        assert!(
            err.contains("no-such-test-runner") && err.contains("not found"),
            "{err}"
        );
        let err = check_command(OsStr::new("/nonexistent/run-tests"), path).unwrap_err();
        assert!(err.contains("/nonexistent/run-tests"), "{err}");
        let plain = std::env::temp_dir().join(format!("trw-plain-{}", std::process::id()));
        std::fs::write(&plain, "not a program").unwrap();
        let err = check_command(plain.as_os_str(), path).unwrap_err();
        std::fs::remove_file(&plain).unwrap();
        assert!(err.contains("not an executable"), "{err}");
        assert!(check_command(OsStr::new("/"), path).is_err(), "a directory");
        assert!(check_command(OsStr::new(""), path).is_err());
    }

    #[test]
    fn the_help_gives_the_contract_s_exit_codes_and_lines() {
        let lines = [
            (
                WorkerExit::BrokerUnavailable,
                TerminationLine::BrokerUnavailable(String::new()),
            ),
            (
                WorkerExit::CommandNotStarted,
                TerminationLine::CommandError(String::new()),
            ),
            (
                WorkerExit::BrokerLost,
                TerminationLine::BrokerLost(String::new()),
            ),
            (
                WorkerExit::Config,
                TerminationLine::ConfigError(String::new()),
            ),
        ];
        for (exit, line) in lines {
            let prefix = line.render().trim().to_string();
            let code = exit.code();
            assert!(
                EXIT_CODES_HELP
                    .lines()
                    .any(|l| l.trim_start().starts_with(&prefix)
                        && l.ends_with(&format!("(exit {code})"))),
                "{prefix} (exit {code})"
            );
            assert!(
                EXIT_CODES_HELP
                    .lines()
                    .any(|l| l.starts_with(&format!("  {code}  "))),
                "{code}"
            );
        }
    }

    #[test]
    fn header_names_become_env_names() {
        assert_eq!(
            header_env_name("x-delivery-count"),
            "TICKET_HEADER_X_DELIVERY_COUNT"
        );
        assert_eq!(header_env_name("suite"), "TICKET_HEADER_SUITE");
        assert_eq!(header_env_name("wëird name!"), "TICKET_HEADER_W_IRD_NAME_");
        assert_eq!(header_env_name(""), "TICKET_HEADER_");
    }

    #[test]
    fn header_values_are_rendered_as_text() {
        assert_eq!(render_value(&AMQPValue::Boolean(true)), "true");
        assert_eq!(render_value(&AMQPValue::LongLongInt(-7)), "-7");
        assert_eq!(render_value(&AMQPValue::Double(1.5)), "1.5");
        assert_eq!(
            render_value(&AMQPValue::Timestamp(1_700_000_000)),
            "1700000000"
        );
        let dec = |scale, value| AMQPValue::DecimalValue(DecimalValue { scale, value });
        assert_eq!(render_value(&dec(2, 12345)), "123.45");
        assert_eq!(render_value(&dec(3, 5)), "0.005");
        assert_eq!(render_value(&dec(0, 5)), "5");
        assert_eq!(
            render_value(&AMQPValue::ByteArray(ByteArray::from(vec![0u8, 0xab]))),
            "00ab"
        );
        assert_eq!(render_value(&AMQPValue::Void), "");
        let bytes = AMQPValue::LongString(LongString::from(vec![b'a', 0, 0xff, b'b']));
        assert_eq!(render_value(&bytes), "a\u{FFFD}\u{FFFD}b");
        let arr = AMQPValue::FieldArray(FieldArray::from(vec![
            AMQPValue::LongInt(1),
            AMQPValue::Void,
        ]));
        assert_eq!(render_value(&arr), "[1,null]");
        let nested = AMQPValue::FieldTable(table(vec![("k", AMQPValue::LongString("v".into()))]));
        assert_eq!(render_value(&nested), r#"{"k":"v"}"#);
        assert_eq!(render_value(&AMQPValue::Float(f32::NAN)), "NaN");
        assert_eq!(
            value_json(&AMQPValue::Float(f32::NAN)),
            serde_json::Value::Null
        );
    }

    #[test]
    fn huge_header_values_are_cut() {
        let big = AMQPValue::LongString("é".repeat(MAX_HEADER_ENV_BYTES).into());
        let text = render_value(&big);
        assert!(text.len() <= MAX_HEADER_ENV_BYTES);
        assert!(text.len() > MAX_HEADER_ENV_BYTES - 4);
        let h = table(vec![("a", big.clone()), ("b", big.clone()), ("c", big)]);
        let env = ticket_env("t", 1, Some(&h));
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("TICKET_HEADERS"), Some("{}"));
        assert_eq!(get("TICKET_HEADERS_TRUNCATED"), Some("1"));
    }

    #[test]
    fn ticket_env_exposes_id_delivery_and_headers() {
        let h = table(vec![
            ("suite", AMQPValue::LongString("unit".into())),
            ("retries", AMQPValue::LongLongInt(3)),
            ("Suite", AMQPValue::LongString("shadowed".into())),
        ]);
        let env = ticket_env("t-9", 2, Some(&h));
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("TICKET_ID"), Some("t-9"));
        assert_eq!(get("TICKET_DELIVERY"), Some("2"));
        assert_eq!(get("TICKET_HEADER_RETRIES"), Some("3"));
        // "Suite" sorts before "suite": the first in byte order wins the shared name.
        assert_eq!(get("TICKET_HEADER_SUITE"), Some("shadowed"));
        assert_eq!(
            env.iter()
                .filter(|(n, _)| n == "TICKET_HEADER_SUITE")
                .count(),
            1
        );
        let json: serde_json::Value = serde_json::from_str(get("TICKET_HEADERS").unwrap()).unwrap();
        assert_eq!(json["suite"], "unit");
        assert_eq!(json["Suite"], "shadowed");
        assert_eq!(json["retries"], 3);
        for (name, value) in &env {
            assert!(!name.contains('\0') && !value.contains('\0'));
        }
        let bare = ticket_env("t", 1, None);
        assert_eq!(bare.len(), 3);
    }
}
