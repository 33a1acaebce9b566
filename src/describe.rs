//! `testrunner-operator describe` (also `kubectl testrunner describe` when the binary is
//! installed as `kubectl-testrunner`): one screen for on-call. What the pool does, its
//! conditions, the operator's verdict, the rollout and its canary, the quarantine, the
//! last crashes and the latest events, each said once.
//!
//! [`render`] is the whole output, a pure function of the pool, its events and the
//! time; [`run`] only fetches them. Every list is cut to its newest entries, so the
//! output stays within [`MAX_LINES`] whatever the pool went through.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Event;
use kube::api::{Api, ListParams};

use crate::core::crash::ending;
use crate::crd::{Condition, RolloutPhase, TestRunnerPool, TestRunnerPoolStatus, Verdict};

/// The most lines [`render`] prints (long messages are not wrapped).
pub const MAX_LINES: usize = 60;
/// Revision history entries shown, newest last.
pub const HISTORY_SHOWN: usize = 5;
/// Crashes shown, newest last.
pub const CRASHES_SHOWN: usize = 5;
/// Quarantined tickets shown, oldest first (the order they were quarantined in).
pub const QUARANTINE_SHOWN: usize = 5;
/// Events shown, newest last.
pub const EVENTS_SHOWN: usize = 10;

/// Arguments of `describe`.
#[derive(clap::Args, Debug, Clone)]
pub struct DescribeArgs {
    /// Name of the pool (TestRunnerPool).
    pub pool: String,
    /// Namespace of the pool. Default: the kubeconfig context's namespace.
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    /// Kubeconfig to use instead of KUBECONFIG / ~/.kube/config / in-cluster.
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// Seconds before it gives up.
    #[arg(long, default_value_t = 10, value_name = "SECONDS")]
    pub timeout: u64,
}

/// One event as shown: when it was last seen, how often, and what it said.
#[derive(Clone, Debug, PartialEq)]
pub struct EventLine {
    /// Last time it happened.
    pub last_seen: Option<Timestamp>,
    /// Normal or Warning.
    pub type_: String,
    /// Its reason.
    pub reason: String,
    /// Times it happened (1 for a single event).
    pub count: i64,
    /// What it said.
    pub message: String,
}

impl EventLine {
    /// The line of a `core/v1` Event, whichever of its time fields the writer filled.
    pub fn of(e: &Event) -> EventLine {
        let last_seen = e
            .series
            .as_ref()
            .and_then(|s| s.last_observed_time.as_ref().map(|t| t.0))
            .or(e.last_timestamp.as_ref().map(|t| t.0))
            .or(e.event_time.as_ref().map(|t| t.0))
            .or(e.first_timestamp.as_ref().map(|t| t.0))
            .or(e.metadata.creation_timestamp.as_ref().map(|t| t.0));
        let count = e
            .series
            .as_ref()
            .and_then(|s| s.count)
            .map(i64::from)
            .or(e.count.map(i64::from))
            .unwrap_or(1)
            .max(1);
        EventLine {
            last_seen,
            type_: e.type_.clone().unwrap_or_default(),
            reason: e.reason.clone().unwrap_or_default(),
            count,
            message: e.message.clone().unwrap_or_default(),
        }
    }
}

/// A duration in kubectl's short form: `42s`, `5m`, `3h`, `2d`.
pub fn age(now: Timestamp, then: Option<Timestamp>) -> String {
    let Some(then) = then else {
        return "-".into();
    };
    let s = now.duration_since(then).as_secs().max(0);
    match s {
        0..120 => format!("{s}s"),
        120..10_800 => format!("{}m", s / 60),
        10_800..172_800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

fn at(t: &Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>) -> Option<Timestamp> {
    t.as_ref().map(|t| t.0)
}

/// Rows of cells, each column padded to its widest cell; the last column is not padded.
fn table(out: &mut String, indent: &str, rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let mut line = indent.to_string();
        for (c, cell) in r.iter().enumerate() {
            if c + 1 == r.len() {
                line.push_str(cell);
            } else {
                let pad = widths[c] - cell.chars().count();
                line.push_str(cell);
                line.push_str(&" ".repeat(pad + 2));
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
}

fn condition<'a>(status: &'a TestRunnerPoolStatus, type_: &str) -> Option<&'a Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}

/// The on-call view of `pool`, with its `events` (any order), at `now`.
pub fn render(pool: &TestRunnerPool, events: &[EventLine], now: Timestamp) -> String {
    let mut out = String::new();
    let spec = &pool.spec;
    let status = pool.status.clone().unwrap_or_default();
    let name = pool.metadata.name.as_deref().unwrap_or("?");
    let ns = pool.metadata.namespace.as_deref().unwrap_or("default");
    let generation = pool.metadata.generation.unwrap_or(0);
    let observed = match status.observed_generation {
        Some(g) if g == generation => format!("generation {g}, status current"),
        Some(g) => format!("generation {generation}, status for {g}: the operator is behind"),
        None => format!("generation {generation}, no status yet"),
    };
    let _ = writeln!(out, "Pool:        {ns}/{name} ({observed})");
    let _ = writeln!(out, "Image:       {}", spec.workload.image);
    let phase = status.phase.map(|p| p.as_str()).unwrap_or("-");
    let paused = if spec.paused { " (spec.paused)" } else { "" };
    let _ = writeln!(out, "Phase:       {phase}{paused}");

    // What the pool has and wants.
    if let Some(w) = &status.workers {
        let mut extra = Vec::new();
        if w.busy > 0 {
            extra.push(format!("{} busy", w.busy));
        }
        if w.warm > 0 {
            extra.push(format!("{} warm", w.warm));
        }
        let extra = if extra.is_empty() {
            String::new()
        } else {
            format!(" ({})", extra.join(", "))
        };
        let _ = writeln!(
            out,
            "Workers:     {} desired{extra}, {} current, {} ready (min {}, max {})",
            w.desired, w.current, w.ready, spec.scaling.min_workers, spec.scaling.max_workers
        );
    }
    match &status.queue {
        Some(q) => {
            // The probe time is written only with a change: while the broker answers,
            // the numbers have held since then.
            let reachable =
                condition(&status, "BrokerReachable").is_some_and(|c| c.status == "True");
            let since = age(now, at(&q.last_probe_time));
            let when = if reachable {
                format!("unchanged for {since}")
            } else {
                format!("last read {since} ago")
            };
            let _ = writeln!(
                out,
                "Queue:       {}: {} ready, {} consumers ({when})",
                spec.queue.name, q.ready, q.consumers,
            );
        }
        None => {
            let _ = writeln!(out, "Queue:       {}: not probed yet", spec.queue.name);
        }
    }

    // Conditions: the standard place for what is wrong, so messages said here are not
    // repeated below.
    let mut said: Vec<String> = Vec::new();
    if !status.conditions.is_empty() {
        let _ = writeln!(out, "Conditions:");
        let rows: Vec<Vec<String>> = status
            .conditions
            .iter()
            .map(|c| {
                if !c.message.is_empty() {
                    said.push(c.message.clone());
                }
                vec![
                    c.type_.clone(),
                    c.status.clone(),
                    c.reason.clone(),
                    age(now, at(&c.last_transition_time)),
                    c.message.clone(),
                ]
            })
            .collect();
        table(&mut out, "  ", &rows);
    }

    // The verdict.
    if let Some(d) = &status.diagnosis {
        let mut line = format!("Diagnosis:   {}", d.verdict.as_str());
        if let Some(t) = &d.ticket {
            let _ = write!(line, " (ticket {t})");
        }
        let _ = write!(line, " for {}", age(now, at(&d.since)));
        if d.last_progress_time.is_some() {
            let _ = write!(
                line,
                "; last progress {} ago",
                age(now, at(&d.last_progress_time))
            );
        }
        let _ = writeln!(out, "{line}");
        let degraded = condition(&status, "Degraded").map(|c| c.message.as_str());
        if d.verdict != Verdict::Healthy && !d.message.is_empty() && degraded != Some(&d.message) {
            let _ = writeln!(out, "             {}", d.message);
            said.push(d.message.clone());
        }
    }

    // The newest events, oldest of them first.
    let mut events: Vec<&EventLine> = events.iter().collect();
    events.sort_by_key(|e| e.last_seen);
    let shown_events = &events[events.len().saturating_sub(EVENTS_SHOWN)..];

    // The rollout.
    if let Some(r) = &status.rollout {
        let reason = r
            .reason
            .map(|r| format!(" ({})", r.as_str()))
            .unwrap_or_default();
        let phase = format!("{:?}", r.phase);
        let head = match r.phase {
            RolloutPhase::Progressing | RolloutPhase::Paused => format!(
                "{phase}{reason}: revision {} ({}) next to stable {} ({})",
                r.target_revision, r.target_image, r.stable_revision, r.stable_image
            ),
            RolloutPhase::RolledBack => format!(
                "{phase}{reason}: revision {} ({}) failed; stable {} ({}) serves",
                r.target_revision, r.target_image, r.stable_revision, r.stable_image
            ),
            RolloutPhase::Promoted => format!(
                "{phase}{reason}: revision {} ({})",
                r.stable_revision, r.stable_image
            ),
        };
        let _ = writeln!(out, "Rollout:     {head}");
        let in_events = shown_events.iter().any(|e| e.message == r.message);
        if !r.message.is_empty() && !in_events && !said.contains(&r.message) {
            let _ = writeln!(out, "             {}", r.message);
        }
        if r.canary_since.is_some() || r.canary_tickets_ok > 0 || r.canary_crashes > 0 {
            let _ = writeln!(
                out,
                "  Canary:    {} of {} tickets completed, {} crashes; started {} ago",
                r.canary_tickets_ok,
                spec.rollout.promote_after_tickets,
                r.canary_crashes,
                age(now, at(&r.canary_since))
            );
        }
        if !r.history.is_empty() {
            let skip = r.history.len().saturating_sub(HISTORY_SHOWN);
            let _ = writeln!(out, "  History:   {}", shown_of(r.history.len(), skip));
            let rows: Vec<Vec<String>> = r.history[skip..]
                .iter()
                .map(|h| {
                    vec![
                        age(now, Some(h.at.0)),
                        h.revision.clone(),
                        h.image.clone(),
                        h.result.as_str().to_string(),
                        h.reason.clone(),
                    ]
                })
                .collect();
            table(&mut out, "    ", &rows);
        }
    }

    // The quarantine.
    if let Some(q) = status.quarantine.as_ref().filter(|q| q.count > 0) {
        let _ = writeln!(
            out,
            "Quarantine:  {} ticket(s) in {}",
            q.count,
            spec.queue.quarantine_queue_name()
        );
        let rows: Vec<Vec<String>> = q
            .tickets
            .iter()
            .take(QUARANTINE_SHOWN)
            .map(|t| {
                vec![
                    age(now, Some(t.at.0)),
                    t.id.clone(),
                    format!("{} crashes", t.crashes),
                    t.last_exit.clone(),
                    t.pods.join(", "),
                ]
            })
            .collect();
        table(&mut out, "    ", &rows);
        if q.tickets.len() > QUARANTINE_SHOWN {
            let _ = writeln!(
                out,
                "    ... {} more: kubectl get trp {name} -n {ns} -o jsonpath='{{.status.quarantine.tickets[*].id}}'",
                q.tickets.len() - QUARANTINE_SHOWN
            );
        }
    }
    if let Some(q) = status
        .quarantine
        .as_ref()
        .filter(|q| !q.replayed.is_empty())
    {
        let last = q.replayed.last().expect("not empty");
        let _ = writeln!(
            out,
            "Replayed:    {} ticket(s) returned from quarantine, the last {} ({} ago)",
            q.replayed.len(),
            last.id,
            age(now, Some(last.at.0))
        );
    }

    // The crashes, newest last.
    if !status.crashes.is_empty() {
        let mut crashes: Vec<_> = status.crashes.iter().collect();
        crashes.sort_by_key(|c| (c.at.0, c.delivery));
        let skip = crashes.len().saturating_sub(CRASHES_SHOWN);
        let _ = writeln!(out, "Crashes:     {}", shown_of(status.crashes.len(), skip));
        let rows: Vec<Vec<String>> = crashes[skip..]
            .iter()
            .map(|c| {
                let held = match (&c.ticket, c.delivery, &c.state) {
                    (Some(t), Some(d), _) => format!("ticket {t} (delivery {d})"),
                    (Some(t), None, _) => format!("ticket {t}"),
                    (None, _, Some(s)) => format!("no ticket: {s}"),
                    (None, _, None) => "no ticket".to_string(),
                };
                vec![
                    age(now, Some(c.at.0)),
                    c.pod.clone(),
                    c.revision.clone(),
                    ending(c, "exit"),
                    held,
                ]
            })
            .collect();
        table(&mut out, "    ", &rows);
    }

    // The events.
    if events.is_empty() {
        let _ = writeln!(out, "Events:      none");
    } else {
        let skip = events.len() - shown_events.len();
        let _ = writeln!(out, "Events:      {}", shown_of(events.len(), skip));
        let rows: Vec<Vec<String>> = shown_events
            .iter()
            .map(|e| {
                let count = if e.count > 1 {
                    format!("x{}", e.count)
                } else {
                    String::new()
                };
                vec![
                    age(now, e.last_seen),
                    e.type_.clone(),
                    e.reason.clone(),
                    count,
                    e.message.clone(),
                ]
            })
            .collect();
        table(&mut out, "    ", &rows);
    }
    out
}

fn shown_of(total: usize, skipped: usize) -> String {
    if skipped == 0 {
        format!("{total}, oldest first")
    } else {
        format!("the last {} of {total}, oldest first", total - skipped)
    }
}

/// Reads the pool and its events, and prints [`render`]. Exit 1 when they cannot be read
/// (the reason is printed, never a credential).
pub async fn run(args: DescribeArgs) -> ExitCode {
    let read = async {
        let client = crate::check::client(args.kubeconfig.as_deref()).await?;
        let ns = args
            .namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_string());
        let pools: Api<TestRunnerPool> = Api::namespaced(client.clone(), &ns);
        let target = format!("{ns}/{}", args.pool);
        let pool = match pools.get(&args.pool).await {
            Ok(p) => p,
            Err(kube::Error::Api(s)) if s.code == 404 => {
                return Err(format!("pool {target} not found"));
            }
            Err(e) => {
                return Err(format!(
                    "failed to read pool {target}: {}",
                    crate::check::describe(&e)
                ));
            }
        };
        let uid = pool.metadata.uid.clone().unwrap_or_default();
        let events: Api<Event> = Api::namespaced(client, &ns);
        let selector = format!("involvedObject.uid={uid}");
        let events = events
            .list(&ListParams::default().fields(&selector))
            .await
            .map_err(|e| {
                format!(
                    "failed to read the events of {target}: {}",
                    crate::check::describe(&e)
                )
            })?;
        Ok::<_, String>((pool, events.items))
    };
    match tokio::time::timeout(Duration::from_secs(args.timeout), read).await {
        Ok(Ok((pool, events))) => {
            let lines: Vec<EventLine> = events.iter().map(EventLine::of).collect();
            print!("{}", render(&pool, &lines, Timestamp::now()));
            ExitCode::SUCCESS
        }
        Ok(Err(reason)) => {
            eprintln!("{reason}");
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("no answer from the API server within {} s", args.timeout);
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn t(s: i64) -> String {
        Timestamp::from_second(1_800_000_000 + s)
            .unwrap()
            .to_string()
    }

    fn now() -> Timestamp {
        Timestamp::from_second(1_800_000_000 + 3600).unwrap()
    }

    /// A pool that went through everything, many times over.
    fn busy_pool() -> TestRunnerPool {
        let crashes: Vec<_> = (0..20)
            .map(|i| {
                json!({"id": format!("u{i}/0/1"), "pod": format!("unit-{i}"), "revision": "r1",
                    "image": "runner:1", "ticket": format!("t-{}", i % 3), "delivery": i,
                    "exitCode": 3, "reason": "Error", "at": t(i)})
            })
            .collect();
        let quarantined: Vec<_> = (0..50)
            .map(|i| {
                json!({"id": format!("q-{i}"), "crashes": 3, "pods": ["a", "b", "c"],
                    "lastExit": "exit code 3", "at": t(100 + i)})
            })
            .collect();
        let history: Vec<_> = (0..10)
            .map(|i| {
                json!({"revision": format!("r{i}"), "image": format!("runner:{i}"),
                    "result": "RolledBack", "reason": "CanaryCrashedOnTickets", "at": t(200 + i)})
            })
            .collect();
        let failed = "Canary pods of revision r9 crashed on 2 different tickets.";
        serde_json::from_value(json!({
            "apiVersion": "testrunner.dev/v1alpha1", "kind": "TestRunnerPool",
            "metadata": {"name": "unit", "namespace": "ci", "generation": 12},
            "spec": {"image": "runner:9", "command": ["true"],
                "queue": {"name": "tickets", "connectionSecretRef": {"name": "rabbitmq"}}},
            "status": {
                "observedGeneration": 11, "phase": "Degraded",
                "conditions": [
                    {"type": "Ready", "status": "False", "reason": "RolloutFailed",
                        "message": "See Degraded", "lastTransitionTime": t(300)},
                    {"type": "Degraded", "status": "True", "reason": "RolloutFailed",
                        "message": failed, "lastTransitionTime": t(300)},
                ],
                "queue": {"ready": 12, "consumers": 3, "lastProbeTime": t(3000)},
                "workers": {"desired": 3, "current": 3, "ready": 2, "busy": 2},
                "diagnosis": {"verdict": "PoisonTicket", "ticket": "t-1",
                    "message": "Ticket t-1 crashed 3 workers.", "since": t(10)},
                "quarantine": {"count": 50, "tickets": quarantined,
                    "replayed": [{"id": "old", "at": t(50)}]},
                "crashes": crashes,
                "rollout": {"phase": "RolledBack", "reason": "CanaryCrashedOnTickets",
                    "message": failed, "stableRevision": "r0", "stableImage": "runner:0",
                    "targetRevision": "r9", "targetImage": "runner:9", "canaryTicketsOk": 1,
                    "canaryCrashes": 2, "canarySince": t(290), "history": history},
            },
        }))
        .unwrap()
    }

    fn events(n: i64) -> Vec<EventLine> {
        (0..n)
            .map(|i| EventLine {
                last_seen: Some(Timestamp::from_second(1_800_000_000 + 400 + i).unwrap()),
                type_: "Warning".into(),
                reason: format!("Reason{i}"),
                count: if i == n - 1 { 4 } else { 1 },
                message: format!("event {i}"),
            })
            .collect()
    }

    #[test]
    fn a_pool_that_went_through_everything_fits_one_screen() {
        let out = render(&busy_pool(), &events(40), now());
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines.len() <= MAX_LINES, "{} lines:\n{out}", lines.len());
        assert!(
            out.contains(
                "Pool:        ci/unit (generation 12, status for 11: the operator is behind)"
            ),
            "{out}"
        );
        // The newest of each list, oldest first.
        assert!(out.contains("History:   the last 5 of 10"), "{out}");
        assert!(
            out.contains("runner:9") && !out.contains("runner:4 "),
            "{out}"
        );
        assert!(out.contains("Crashes:     the last 5 of 20"), "{out}");
        assert!(
            out.contains("unit-19") && !out.contains("unit-14 "),
            "{out}"
        );
        let events_at = lines.iter().position(|l| l.starts_with("Events:")).unwrap();
        assert_eq!(
            lines[events_at],
            "Events:      the last 10 of 40, oldest first"
        );
        assert!(lines[events_at + 1].contains("Reason30"), "{out}");
        assert!(lines[events_at + 10].contains("x4  event 39"), "{out}");
        // The quarantine: the first five, and where the rest is.
        assert!(
            out.contains("Quarantine:  50 ticket(s) in tickets.quarantine"),
            "{out}"
        );
        assert!(out.contains("q-4 ") && !out.contains("q-5 "), "{out}");
        assert!(
            out.contains("... 45 more: kubectl get trp unit -n ci"),
            "{out}"
        );
        assert!(out.contains("Replayed:    1 ticket(s) returned from quarantine, the last old"));
    }

    #[test]
    fn each_message_is_said_once() {
        let out = render(&busy_pool(), &events(3), now());
        // The rollout's failure is the Degraded condition's message: said there only.
        assert_eq!(
            out.matches("crashed on 2 different tickets").count(),
            1,
            "{out}"
        );
        assert!(out.contains("Ticket t-1 crashed 3 workers."), "{out}");
        assert!(
            out.contains("Diagnosis:   PoisonTicket (ticket t-1)"),
            "{out}"
        );
        assert!(
            out.contains("  Canary:    1 of 3 tickets completed, 2 crashes"),
            "{out}"
        );
        assert!(
            out.contains("RolledBack (CanaryCrashedOnTickets): revision r9 (runner:9) failed; stable r0 (runner:0) serves"),
            "{out}"
        );
    }

    #[test]
    fn a_new_pool_says_what_it_lacks() {
        let mut pool = busy_pool();
        pool.status = None;
        let out = render(&pool, &[], now());
        assert_eq!(
            out,
            "Pool:        ci/unit (generation 12, no status yet)\n\
             Image:       runner:9\n\
             Phase:       -\n\
             Queue:       tickets: not probed yet\n\
             Events:      none\n"
        );
    }

    #[test]
    fn ages_read_like_kubectl() {
        let at = |s: i64| Some(Timestamp::from_second(1_800_000_000 + 3600 - s).unwrap());
        assert_eq!(age(now(), at(5)), "5s");
        assert_eq!(age(now(), at(119)), "119s");
        assert_eq!(age(now(), at(600)), "10m");
        assert_eq!(age(now(), at(4 * 3600)), "4h");
        assert_eq!(age(now(), at(3 * 86_400)), "3d");
        assert_eq!(
            age(now(), at(-30)),
            "0s",
            "a clock ahead is not a negative age"
        );
        assert_eq!(age(now(), None), "-");
    }
}
