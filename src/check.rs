//! `testrunner-operator check`: a Nagios-compatible plugin that reads one pool's status
//! through the Kubernetes API and prints one line with performance data.
//!
//! The pool is read as plain JSON, so the check keeps working as the status grows.
//! [`evaluate`] is the whole decision; [`check`] only fetches the object.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use kube::api::{Api, ApiResource, DynamicObject};
use serde_json::Value;

use crate::crd::TestRunnerPool;

/// The rules, as `--help` prints them (docs/check.md says the same).
pub const RULES: &str = "\
States (exit code):
  OK (0)        none of the rules below applies.
  WARNING (1)   condition Degraded=True with reason PoisonTicket, QueueStalled, OutOfMemory,
                QueueNotFound or any reason not listed under CRITICAL; or phase Paused; or
                ready tickets >= --warn-queue; or quarantined tickets >= --warn-quarantined
                (default 1; the line names them); or status.observedGeneration is behind
                metadata.generation (the operator has not caught up with the spec).
  CRITICAL (2)  condition Degraded=True with reason BrokenEnvironment, BrokerUnreachable,
                RolloutFailed, SecretNotFound, SecretKeyMissing, InvalidBrokerUri or
                InvalidSpec; or ready tickets >= --crit-queue; or quarantined tickets >=
                --crit-quarantined.
  UNKNOWN (3)   the Kubernetes API or the pool cannot be read (the reason is printed,
                never a credential).

Output: one line, then performance data:
  TESTRUNNER OK - unit: Running, 7/8 workers ready, 12 tickets ready | 'ready'=12;W;C;0 \
'workers'=8;;;0 'ready_workers'=7;;;0 'quarantined'=0;W;C;0
  ready: tickets ready in the queue (U before the first probe); workers: worker pods that
  exist; ready_workers: worker pods that are ready; quarantined: status.quarantine.count.

The cluster comes from --kubeconfig, else KUBECONFIG, ~/.kube/config or the in-cluster
service account.";

/// Degraded reasons that stop the pool from working at all.
pub const CRITICAL_REASONS: &[&str] = &[
    "BrokenEnvironment",
    "BrokerUnreachable",
    "RolloutFailed",
    "SecretNotFound",
    "SecretKeyMissing",
    "InvalidBrokerUri",
    "InvalidSpec",
];

/// Arguments of `check`.
#[derive(clap::Args, Debug, Clone)]
pub struct CheckArgs {
    /// Namespace of the pool.
    #[arg(long, short = 'n')]
    pub namespace: String,
    /// Name of the pool (TestRunnerPool).
    #[arg(long)]
    pub pool: String,
    /// WARNING when this many tickets or more are ready in the queue.
    #[arg(long, value_name = "N")]
    pub warn_queue: Option<u64>,
    /// CRITICAL when this many tickets or more are ready in the queue.
    #[arg(long, value_name = "N")]
    pub crit_queue: Option<u64>,
    /// WARNING when this many tickets or more sit in quarantine: each is a CI job that
    /// will not report until someone looks at it. 0 turns it off.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub warn_quarantined: u64,
    /// CRITICAL when this many tickets or more sit in quarantine.
    #[arg(long, value_name = "N")]
    pub crit_quarantined: Option<u64>,
    /// Kubeconfig to use instead of KUBECONFIG / ~/.kube/config / in-cluster.
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// Seconds before the check gives up with UNKNOWN.
    #[arg(long, default_value_t = 10, value_name = "SECONDS")]
    pub timeout: u64,
}

/// A Nagios plugin state; the discriminant is the exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum State {
    /// 0
    Ok = 0,
    /// 1
    Warning = 1,
    /// 2
    Critical = 2,
    /// 3
    Unknown = 3,
}

impl State {
    /// `OK`, `WARNING`, `CRITICAL` or `UNKNOWN`.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Ok => "OK",
            State::Warning => "WARNING",
            State::Critical => "CRITICAL",
            State::Unknown => "UNKNOWN",
        }
    }

    /// The plugin's exit code.
    pub fn code(self) -> u8 {
        self as u8
    }
}

/// Thresholds on ready tickets and on quarantined tickets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Thresholds {
    /// WARNING at or above this many ready tickets.
    pub warn_queue: Option<u64>,
    /// CRITICAL at or above this many ready tickets.
    pub crit_queue: Option<u64>,
    /// WARNING at or above this many quarantined tickets.
    pub warn_quarantined: Option<u64>,
    /// CRITICAL at or above this many quarantined tickets.
    pub crit_quarantined: Option<u64>,
}

/// Decides the state of a pool (the object as JSON) and renders the output line.
pub fn evaluate(pool: &Value, thresholds: Thresholds) -> (State, String) {
    let name = pool
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("?");
    let status = pool.get("status").unwrap_or(&Value::Null);
    let int = |path: &str| status.pointer(path).and_then(Value::as_i64);
    let phase = status.get("phase").and_then(Value::as_str);
    let queue_ready = int("/queue/ready");
    let workers = int("/workers/current").unwrap_or(0);
    let ready_workers = int("/workers/ready").unwrap_or(0);
    let quarantined = int("/quarantine/count").unwrap_or(0);

    let mut problems: Vec<(State, String)> = Vec::new();
    let degraded = status
        .get("conditions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|c| c.get("type").and_then(Value::as_str) == Some("Degraded"));
    if let Some(c) = degraded
        && c.get("status").and_then(Value::as_str) == Some("True")
    {
        let reason = c
            .get("reason")
            .and_then(Value::as_str)
            .filter(|r| !r.is_empty())
            .unwrap_or("NoReason");
        let state = if CRITICAL_REASONS.contains(&reason) {
            State::Critical
        } else {
            State::Warning
        };
        let message = c.get("message").and_then(Value::as_str).unwrap_or("");
        let text = if message.is_empty() {
            format!("Degraded: {reason}")
        } else {
            format!("Degraded: {reason}: {}", clean(message, 200))
        };
        problems.push((state, text));
    }
    if let Some(ready) = queue_ready.map(|r| r.max(0) as u64) {
        if let Some(crit) = thresholds.crit_queue.filter(|c| ready >= *c) {
            problems.push((State::Critical, format!("{ready} tickets ready >= {crit}")));
        } else if let Some(warn) = thresholds.warn_queue.filter(|w| ready >= *w) {
            problems.push((State::Warning, format!("{ready} tickets ready >= {warn}")));
        }
    }
    let held = quarantined.max(0) as u64;
    let quarantine_state = if thresholds.crit_quarantined.is_some_and(|c| held >= c) {
        Some((State::Critical, thresholds.crit_quarantined))
    } else if thresholds.warn_quarantined.is_some_and(|w| held >= w) {
        Some((State::Warning, thresholds.warn_quarantined))
    } else {
        None
    };
    if let Some((state, Some(limit))) = quarantine_state {
        let ids: Vec<String> = status
            .pointer("/quarantine/tickets")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|t| t.get("id").and_then(Value::as_str))
            .map(|id| clean(id, 80))
            .collect();
        let mut named = ids.iter().take(3).cloned().collect::<Vec<_>>().join(", ");
        if ids.len() > 3 {
            named.push_str(&format!(" and {} more", ids.len() - 3));
        }
        let noun = if held == 1 { "ticket" } else { "tickets" };
        let mut text = format!("{held} {noun} in quarantine >= {limit}");
        if !named.is_empty() {
            text.push_str(&format!(": {named}"));
        }
        problems.push((state, text));
    }
    if phase == Some("Paused") {
        problems.push((State::Warning, "paused (spec.paused)".into()));
    }
    // A rollout in progress is news, not a problem (a failed one is Degraded above).
    if let Some(rollout) = status.get("rollout")
        && let Some(p @ ("Progressing" | "Paused")) = rollout.get("phase").and_then(Value::as_str)
    {
        let gate = pool
            .pointer("/spec/rollout/promoteAfterTickets")
            .and_then(Value::as_i64)
            .unwrap_or(3);
        let ok = rollout
            .get("canaryTicketsOk")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        let image = rollout
            .get("targetImage")
            .and_then(Value::as_str)
            .unwrap_or_default();
        problems.push((
            State::Ok,
            format!(
                "rollout {p} to {} (canary {ok}/{gate} tickets)",
                clean(image, 200)
            ),
        ));
    }
    if let Some(generation) = pool.pointer("/metadata/generation").and_then(Value::as_i64) {
        match status.get("observedGeneration").and_then(Value::as_i64) {
            Some(observed) if observed >= generation => {}
            Some(observed) => problems.push((
                State::Warning,
                format!(
                    "status is behind the spec (observed generation {observed} of {generation})"
                ),
            )),
            None => problems.push((
                State::Warning,
                format!("not reconciled yet (generation {generation})"),
            )),
        }
    }
    // Worst first; stable, so equal states keep the order above.
    problems.sort_by_key(|p| std::cmp::Reverse(p.0));
    let state = problems.first().map_or(State::Ok, |p| p.0);

    let queue_text = match queue_ready {
        Some(r) => format!("{r} tickets ready"),
        None => "queue not probed yet".into(),
    };
    let mut line = format!(
        "TESTRUNNER {} - {}: {}, {ready_workers}/{workers} workers ready, {queue_text}",
        state.as_str(),
        clean(name, 253),
        clean(phase.unwrap_or("no status yet"), 40),
    );
    for (_, text) in &problems {
        line.push_str("; ");
        line.push_str(text);
    }
    let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
    line.push_str(&format!(
        " | 'ready'={};{};{};0 'workers'={workers};;;0 'ready_workers'={ready_workers};;;0 'quarantined'={quarantined};{};{};0",
        queue_ready.map_or("U".to_string(), |r| r.to_string()),
        opt(thresholds.warn_queue),
        opt(thresholds.crit_queue),
        opt(thresholds.warn_quarantined),
        opt(thresholds.crit_quarantined),
    ));
    (state, line)
}

/// One line of plain text: no newline, no `|` (it starts the performance data), bounded.
fn clean(text: &str, max_chars: usize) -> String {
    let mut out: String = text
        .chars()
        .map(|c| match c {
            '|' => '/',
            c if c.is_control() => ' ',
            c => c,
        })
        .take(max_chars)
        .collect();
    if text.chars().count() > max_chars {
        out.push_str("...");
    }
    out
}

fn unknown(reason: impl std::fmt::Display) -> (State, String) {
    (State::Unknown, format!("TESTRUNNER UNKNOWN - {reason}"))
}

/// Reads the pool and evaluates it. Never panics on API trouble: that is UNKNOWN.
pub async fn check(args: &CheckArgs) -> (State, String) {
    let thresholds = Thresholds {
        warn_queue: args.warn_queue,
        crit_queue: args.crit_queue,
        warn_quarantined: Some(args.warn_quarantined).filter(|n| *n > 0),
        crit_quarantined: args.crit_quarantined.filter(|n| *n > 0),
    };
    let target = format!("{}/{}", clean(&args.namespace, 63), clean(&args.pool, 253));
    let read = async {
        let client = client(args.kubeconfig.as_deref()).await?;
        let resource = ApiResource::erase::<TestRunnerPool>(&());
        let api: Api<DynamicObject> = Api::namespaced_with(client, &args.namespace, &resource);
        match api.get(&args.pool).await {
            Ok(obj) => serde_json::to_value(&obj)
                .map_err(|_| format!("pool {target}: cannot encode the object")),
            Err(kube::Error::Api(s)) if s.code == 404 => Err(format!("pool {target} not found")),
            Err(e) => Err(format!("failed to read pool {target}: {}", describe(&e))),
        }
    };
    match tokio::time::timeout(Duration::from_secs(args.timeout), read).await {
        Ok(Ok(pool)) => evaluate(&pool, thresholds),
        Ok(Err(reason)) => unknown(reason),
        Err(_) => unknown(format!(
            "failed to read pool {target}: no answer within {} s",
            args.timeout
        )),
    }
}

pub(crate) async fn client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client, String> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|_| {
                format!(
                    "failed to read the kubeconfig {}",
                    clean(&path.display().to_string(), 200)
                )
            })?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|_| {
                    format!(
                        "failed to use the kubeconfig {}: no usable context, cluster or user",
                        clean(&path.display().to_string(), 200)
                    )
                })?
        }
        None => kube::Config::infer().await.map_err(|_| {
            "failed to find a Kubernetes configuration (KUBECONFIG, ~/.kube/config or in-cluster)"
                .to_string()
        })?,
    };
    kube::Client::try_from(config)
        .map_err(|_| "failed to build a Kubernetes client from the configuration".to_string())
}

/// A kube error in words that cannot carry a credential: the API server's own status,
/// or the kind of network failure.
pub(crate) fn describe(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!(
            "the API server answered {} {}: {}",
            s.code,
            clean(&s.reason, 60),
            clean(&s.message, 200)
        ),
        kube::Error::Auth(_) => "failed to authenticate to the API server".into(),
        kube::Error::SerdeError(_) => "unexpected answer from the API server".into(),
        other => {
            let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(other);
            while let Some(err) = cur {
                if let Some(io) = err.downcast_ref::<std::io::Error>() {
                    return format!("cannot reach the API server: {}", io.kind());
                }
                cur = err.source();
            }
            "cannot reach the API server".into()
        }
    }
}

/// `check` as a command: prints the line, returns the plugin's exit code.
pub async fn run(args: CheckArgs) -> ExitCode {
    let (state, line) = check(&args).await;
    println!("{line}");
    ExitCode::from(state.code())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pool(status: Value) -> Value {
        json!({"metadata": {"name": "unit", "namespace": "ci", "generation": 4}, "status": status})
    }

    fn healthy() -> Value {
        json!({
            "observedGeneration": 4, "phase": "Running",
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "WorkersReady", "message": ""},
                {"type": "Degraded", "status": "False", "reason": "AsExpected", "message": ""},
            ],
            "queue": {"ready": 12, "consumers": 7},
            "workers": {"desired": 8, "current": 8, "ready": 7},
            "quarantine": {"count": 1},
        })
    }

    fn with(mut base: Value, path: &str, v: Value) -> Value {
        *base.pointer_mut(path).unwrap() = v;
        base
    }

    fn degraded(reason: &str) -> Value {
        with(
            healthy(),
            "/conditions/1",
            json!({"type": "Degraded", "status": "True", "reason": reason, "message": "look at it"}),
        )
    }

    const NONE: Thresholds = Thresholds {
        warn_queue: None,
        crit_queue: None,
        warn_quarantined: None,
        crit_quarantined: None,
    };
    const Q: Thresholds = Thresholds {
        warn_queue: Some(10),
        crit_queue: Some(20),
        warn_quarantined: None,
        crit_quarantined: None,
    };

    #[test]
    fn a_rollout_in_progress_is_reported_without_changing_the_state() {
        let status = with(healthy(), "/quarantine", json!({"count": 0}));
        let mut status = status;
        status["rollout"] =
            json!({"phase": "Progressing", "targetImage": "runner:2", "canaryTicketsOk": 1});
        let (state, line) = evaluate(&pool(status.clone()), NONE);
        assert_eq!(state, State::Ok);
        assert!(
            line.contains(
                "12 tickets ready; rollout Progressing to runner:2 (canary 1/3 tickets) |"
            ),
            "{line}"
        );
        status["rollout"]["phase"] = json!("Promoted");
        let (_, line) = evaluate(&pool(status), NONE);
        assert!(!line.contains("rollout"), "{line}");
    }

    #[test]
    fn ok_line_matches_the_documented_format() {
        let (state, line) = evaluate(&pool(healthy()), Q);
        assert_eq!(state, State::Warning, "12 >= warn 10");
        let (state, line_none) = evaluate(&pool(healthy()), NONE);
        assert_eq!(state, State::Ok);
        assert_eq!(
            line_none,
            "TESTRUNNER OK - unit: Running, 7/8 workers ready, 12 tickets ready | 'ready'=12;;;0 'workers'=8;;;0 'ready_workers'=7;;;0 'quarantined'=1;;;0"
        );
        assert!(
            line.ends_with(
                "| 'ready'=12;10;20;0 'workers'=8;;;0 'ready_workers'=7;;;0 'quarantined'=1;;;0"
            ),
            "{line}"
        );
    }

    #[test]
    fn decision_table() {
        let rows: Vec<(&str, Value, Thresholds, State, &str)> = vec![
            ("healthy", pool(healthy()), NONE, State::Ok, "TESTRUNNER OK"),
            (
                "below thresholds",
                pool(healthy()),
                Thresholds {
                    warn_queue: Some(13),
                    crit_queue: Some(50),
                    warn_quarantined: None,
                    crit_quarantined: None,
                },
                State::Ok,
                "12 tickets ready |",
            ),
            (
                "warn queue",
                pool(healthy()),
                Thresholds {
                    warn_queue: Some(12),
                    crit_queue: Some(50),
                    warn_quarantined: None,
                    crit_quarantined: None,
                },
                State::Warning,
                "12 tickets ready >= 12",
            ),
            (
                "crit queue",
                pool(healthy()),
                Thresholds {
                    warn_queue: Some(5),
                    crit_queue: Some(12),
                    warn_quarantined: None,
                    crit_quarantined: None,
                },
                State::Critical,
                "12 tickets ready >= 12",
            ),
            (
                "crit only",
                pool(healthy()),
                Thresholds {
                    warn_queue: None,
                    crit_queue: Some(1),
                    warn_quarantined: None,
                    crit_quarantined: None,
                },
                State::Critical,
                ">= 1",
            ),
            (
                "one ticket in quarantine, warned by default",
                pool(with(
                    healthy(),
                    "/quarantine",
                    json!({"count": 1, "tickets": [{"id": "t-9", "crashes": 3}]}),
                )),
                Thresholds {
                    warn_quarantined: Some(1),
                    ..NONE
                },
                State::Warning,
                "1 ticket in quarantine >= 1: t-9 |",
            ),
            (
                "quarantine critical, named up to three",
                pool(with(
                    healthy(),
                    "/quarantine",
                    json!({"count": 5, "tickets": [{"id": "a"}, {"id": "b"}, {"id": "c|d"}, {"id": "e"}, {"id": "f"}]}),
                )),
                Thresholds {
                    warn_quarantined: Some(1),
                    crit_quarantined: Some(5),
                    ..NONE
                },
                State::Critical,
                "5 tickets in quarantine >= 5: a, b, c/d and 2 more | 'ready'=12;;;0 'workers'=8;;;0 'ready_workers'=7;;;0 'quarantined'=5;1;5;0",
            ),
            (
                "quarantine below its threshold",
                pool(healthy()),
                Thresholds {
                    warn_quarantined: Some(2),
                    ..NONE
                },
                State::Ok,
                "'quarantined'=1;2;;0",
            ),
            (
                "paused",
                pool(with(healthy(), "/phase", json!("Paused"))),
                NONE,
                State::Warning,
                "paused",
            ),
            (
                "generation behind",
                pool(with(healthy(), "/observedGeneration", json!(3))),
                NONE,
                State::Warning,
                "observed generation 3 of 4",
            ),
            (
                "never reconciled",
                json!({"metadata": {"name": "unit", "generation": 1}}),
                NONE,
                State::Warning,
                "not reconciled yet",
            ),
            (
                "degraded false is fine",
                pool(with(
                    healthy(),
                    "/conditions/1/reason",
                    json!("BrokenEnvironment"),
                )),
                NONE,
                State::Ok,
                "OK",
            ),
            (
                "degraded without reason",
                pool(with(degraded("x"), "/conditions/1/reason", json!(""))),
                NONE,
                State::Warning,
                "Degraded: NoReason",
            ),
            (
                "unlisted reason",
                pool(degraded("SomethingNew")),
                NONE,
                State::Warning,
                "Degraded: SomethingNew: look at it",
            ),
            (
                "no queue probe",
                pool(with(healthy(), "/queue", json!(null))),
                Q,
                State::Ok,
                "'ready'=U;10;20;0",
            ),
            (
                "no quarantine",
                pool(with(healthy(), "/quarantine", json!(null))),
                NONE,
                State::Ok,
                "'quarantined'=0;;;0",
            ),
            (
                "degraded beats queue warning",
                pool(degraded("RolloutFailed")),
                Q,
                State::Critical,
                "CRITICAL - unit: Running, 7/8 workers ready, 12 tickets ready; Degraded: RolloutFailed: look at it; 12 tickets ready >= 10",
            ),
        ];
        for reason in [
            "PoisonTicket",
            "QueueStalled",
            "OutOfMemory",
            "QueueNotFound",
        ] {
            let (state, line) = evaluate(&pool(degraded(reason)), NONE);
            assert_eq!(state, State::Warning, "{reason}: {line}");
            assert!(
                line.contains(&format!("Degraded: {reason}: look at it")),
                "{line}"
            );
        }
        for reason in CRITICAL_REASONS {
            let (state, line) = evaluate(&pool(degraded(reason)), NONE);
            assert_eq!(state, State::Critical, "{reason}: {line}");
            assert!(line.starts_with("TESTRUNNER CRITICAL - unit: "), "{line}");
        }
        for (what, value, thresholds, want, text) in rows {
            let (state, line) = evaluate(&value, thresholds);
            assert_eq!(state, want, "{what}: {line}");
            assert!(line.contains(text), "{what}: {line:?} lacks {text:?}");
            assert!(
                line.starts_with(&format!("TESTRUNNER {} - ", want.as_str())),
                "{what}: {line}"
            );
            assert_eq!(line.matches('|').count(), 1, "{what}: {line}");
        }
    }

    #[test]
    fn messages_cannot_break_the_line_or_the_perfdata() {
        let status = with(
            degraded("PoisonTicket"),
            "/conditions/1/message",
            json!(format!("a|b\nc {}", "x".repeat(500))),
        );
        let (_, line) = evaluate(&pool(status), NONE);
        assert!(!line.contains('\n'));
        assert_eq!(line.matches('|').count(), 1, "{line}");
        assert!(line.contains("a/b c "), "{line}");
        assert!(line.len() < 600, "{}", line.len());
    }

    #[test]
    fn exit_codes() {
        assert_eq!(
            [State::Ok, State::Warning, State::Critical, State::Unknown].map(State::code),
            [0, 1, 2, 3]
        );
    }
}
