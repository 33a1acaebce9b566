//! Which alerts a pool has active, from its status, and what an alert is. Pure: the
//! time is an argument. Delivering them is the shell's work (the `alerts` module).

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use serde::Serialize;

use super::conditions::{self, ConditionStatus, ConditionType};
use crate::crd::{AlertKind, DiagnosisStatus, TestRunnerPoolStatus, Verdict};

/// Alert names the operator raises.
pub mod names {
    /// A worker container crashed (by default on the first crash).
    pub const WORKER_CRASH: &str = "TestRunnerWorkerCrash";
    /// A ticket crashed workers repeatedly and was quarantined.
    pub const POISON_TICKET: &str = "TestRunnerPoisonTicket";
    /// Workers crash whatever the ticket: image or environment broken.
    pub const BROKEN_ENVIRONMENT: &str = "TestRunnerBrokenEnvironment";
    /// Tickets wait and nothing makes progress.
    pub const QUEUE_STALLED: &str = "TestRunnerQueueStalled";
    /// The pool's broker cannot be reached.
    pub const BROKER_UNREACHABLE: &str = "TestRunnerBrokerUnreachable";
    /// A rollout failed and was rolled back.
    pub const ROLLOUT_FAILED: &str = "TestRunnerRolloutFailed";
}

/// Severity label of an alert.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Someone should look soon.
    Warning,
    /// Work is blocked.
    Critical,
}

impl Severity {
    /// `warning` or `critical`.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// One alert. Identified by (name, namespace, pool, ticket): the other fields may change
/// while it stays the same alert.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alert {
    /// Alert name, one of [`names`].
    pub name: String,
    /// `warning` or `critical`.
    pub severity: Severity,
    /// Namespace of the pool.
    pub namespace: String,
    /// Name of the pool.
    pub pool: String,
    /// The ticket concerned, if any.
    pub ticket: Option<String>,
    /// One line.
    pub summary: String,
    /// What happened and what to do.
    pub description: String,
    /// When the condition began.
    pub starts_at: Timestamp,
}

/// The identity of an alert.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AlertKey {
    /// Alert name.
    pub name: String,
    /// Namespace of the pool.
    pub namespace: String,
    /// Name of the pool.
    pub pool: String,
    /// The ticket, if any.
    pub ticket: Option<String>,
}

impl Alert {
    /// The identity of this alert.
    pub fn key(&self) -> AlertKey {
        AlertKey {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            pool: self.pool.clone(),
            ticket: self.ticket.clone(),
        }
    }
}

/// How long a worker crash keeps TestRunnerWorkerCrash active.
pub const CRASH_ALERT_FOR: Duration = Duration::from_secs(15 * 60);

/// The alerts active for pool `namespace/name` with `status`, among `enabled`.
pub fn active_alerts(
    namespace: &str,
    name: &str,
    status: &TestRunnerPoolStatus,
    enabled: &[AlertKind],
    now: Timestamp,
) -> Vec<Alert> {
    let pool = Pool { namespace, name };
    let on = |k: AlertKind| enabled.contains(&k);
    let mut out = Vec::new();
    if on(AlertKind::FirstCrash) {
        out.extend(worker_crash(&pool, status, now));
    }
    if on(AlertKind::PoisonTicket) {
        out.extend(poison_tickets(&pool, status));
    }
    if let Some(d) = status.diagnosis.as_ref() {
        out.extend(diagnosis(&pool, d, enabled, now));
    }
    if on(AlertKind::RolloutFailed) {
        out.extend(rollout_failed(&pool, status, now));
    }
    if on(AlertKind::BrokerUnreachable) {
        out.extend(broker_unreachable(&pool, status, now));
    }
    out
}

/// The pool an alert is about.
struct Pool<'a> {
    namespace: &'a str,
    name: &'a str,
}

impl std::fmt::Display for Pool<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl Pool<'_> {
    fn alert(
        &self,
        name: &str,
        severity: Severity,
        ticket: Option<String>,
        summary: String,
        description: String,
        since: Timestamp,
    ) -> Alert {
        Alert {
            name: name.to_string(),
            severity,
            namespace: self.namespace.to_string(),
            pool: self.name.to_string(),
            ticket,
            summary,
            description,
            starts_at: since,
        }
    }
}

/// TestRunnerWorkerCrash while the last crash is recent, since the first recent one.
fn worker_crash(pool: &Pool<'_>, status: &TestRunnerPoolStatus, now: Timestamp) -> Option<Alert> {
    let recent = |at: Timestamp| {
        now.duration_since(at) <= SignedDuration::try_from(CRASH_ALERT_FOR).unwrap_or_default()
    };
    let last = status.crashes.last().filter(|c| recent(c.at.0))?;
    let first = status
        .crashes
        .iter()
        .find(|c| recent(c.at.0))
        .map(|c| c.at.0)
        .unwrap_or(last.at.0);
    let on_what = match &last.ticket {
        Some(t) => format!("on ticket {t}"),
        None => "with no ticket in hand".into(),
    };
    Some(pool.alert(
        names::WORKER_CRASH,
        Severity::Warning,
        None,
        format!("A worker of pool {pool} crashed"),
        format!(
            "Worker pod {} (image {}) crashed {on_what}: exit code {} {}",
            last.pod, last.image, last.exit_code, last.reason
        ),
        first,
    ))
}

/// TestRunnerPoisonTicket for each quarantined ticket.
fn poison_tickets(pool: &Pool<'_>, status: &TestRunnerPoolStatus) -> Vec<Alert> {
    let tickets = status.quarantine.iter().flat_map(|q| q.tickets.iter());
    tickets
        .map(|t| {
            pool.alert(
                names::POISON_TICKET,
                Severity::Warning,
                Some(t.id.clone()),
                format!("Poison ticket {} quarantined in pool {pool}", t.id),
                format!(
                    "Ticket {} crashed {} workers (images {}; last {}); it was moved to the quarantine queue",
                    t.id,
                    t.crashes,
                    t.images.join(", "),
                    t.last_exit
                ),
                t.at.0,
            )
        })
        .collect()
}

/// TestRunnerBrokenEnvironment or TestRunnerQueueStalled while the diagnosis says so,
/// since it does.
fn diagnosis(
    pool: &Pool<'_>,
    d: &DiagnosisStatus,
    enabled: &[AlertKind],
    now: Timestamp,
) -> Option<Alert> {
    let (kind, name, severity, summary) = match d.verdict {
        Verdict::BrokenEnvironment => (
            AlertKind::BrokenEnvironment,
            names::BROKEN_ENVIRONMENT,
            Severity::Critical,
            format!("Workers of pool {pool} crash whatever the ticket"),
        ),
        Verdict::QueueStalled => (
            AlertKind::QueueStalled,
            names::QUEUE_STALLED,
            Severity::Warning,
            format!("The queue of pool {pool} is stalled"),
        ),
        _ => return None,
    };
    let since = d.since.as_ref().map(|t| t.0).unwrap_or(now);
    enabled
        .contains(&kind)
        .then(|| pool.alert(name, severity, None, summary, d.message.clone(), since))
}

/// TestRunnerRolloutFailed while the latest rollout has failed.
fn rollout_failed(pool: &Pool<'_>, status: &TestRunnerPoolStatus, now: Timestamp) -> Option<Alert> {
    let r = status
        .rollout
        .as_ref()
        .filter(|r| super::rollout::failed(r))?;
    let since = r
        .history
        .last()
        .filter(|h| h.revision == r.target_revision)
        .map(|h| h.at.0)
        .or(r.started_at.as_ref().map(|t| t.0))
        .unwrap_or(now);
    Some(pool.alert(
        names::ROLLOUT_FAILED,
        Severity::Warning,
        None,
        format!(
            "Revision {} (image {}) of pool {pool} failed its canary",
            r.target_revision, r.target_image
        ),
        r.message.clone(),
        since,
    ))
}

/// TestRunnerBrokerUnreachable while the BrokerReachable condition is False.
fn broker_unreachable(
    pool: &Pool<'_>,
    status: &TestRunnerPoolStatus,
    now: Timestamp,
) -> Option<Alert> {
    let c = conditions::find(status, ConditionType::BrokerReachable)
        .filter(|c| c.status == ConditionStatus::False)?;
    Some(pool.alert(
        names::BROKER_UNREACHABLE,
        Severity::Critical,
        None,
        format!("The broker of pool {pool} is unreachable"),
        format!("{}: {}", c.reason, c.message),
        c.last_transition_time.as_ref().map(|t| t.0).unwrap_or(now),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{
        Condition, CrashStatus, DiagnosisStatus, QuarantineStatus, QuarantinedTicket,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use crate::core::fixtures::t;

    fn all() -> Vec<AlertKind> {
        crate::crd::AlertsSpec::default().on
    }

    fn crash(at: i64) -> CrashStatus {
        crate::core::fixtures::ticket_crash("unit-a", "t-9", "runner:1", at)
    }

    #[test]
    fn the_first_crash_alerts_at_once_and_resolves_after_a_quiet_spell() {
        let status = TestRunnerPoolStatus {
            crashes: vec![crash(0)],
            ..Default::default()
        };
        let a = active_alerts("ci", "unit", &status, &all(), t(1));
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].name, names::WORKER_CRASH);
        assert!(
            a[0].description.contains("on ticket t-9"),
            "{}",
            a[0].description
        );
        assert_eq!(a[0].starts_at, t(0));
        assert!(active_alerts("ci", "unit", &status, &all(), t(15 * 60 + 1)).is_empty());
        assert!(active_alerts("ci", "unit", &status, &[AlertKind::PoisonTicket], t(1)).is_empty());
    }

    #[test]
    fn verdicts_quarantine_and_outages_each_have_their_alert() {
        let status = TestRunnerPoolStatus {
            diagnosis: Some(DiagnosisStatus {
                verdict: Verdict::BrokenEnvironment,
                message: "crashes before taking a ticket".into(),
                since: Some(Time(t(5))),
                ..Default::default()
            }),
            quarantine: Some(QuarantineStatus {
                count: 1,
                tickets: vec![QuarantinedTicket {
                    id: "t-9".into(),
                    crashes: 3,
                    images: vec!["runner:1".into()],
                    pods: vec!["unit-a".into()],
                    last_exit: "exit code 3".into(),
                    at: Time(t(2)),
                }],
                ..Default::default()
            }),
            conditions: vec![Condition {
                type_: "BrokerReachable".into(),
                status: "False".into(),
                reason: "ConnectionFailed".into(),
                message: "connection refused".into(),
                last_transition_time: Some(Time(t(7))),
                observed_generation: None,
            }],
            ..Default::default()
        };
        let a = active_alerts("ci", "unit", &status, &all(), t(10));
        let names: Vec<&str> = a.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(
            names,
            [
                names::POISON_TICKET,
                names::BROKEN_ENVIRONMENT,
                names::BROKER_UNREACHABLE
            ]
        );
        assert_eq!(a[0].ticket.as_deref(), Some("t-9"));
        assert_eq!(a[1].severity, Severity::Critical);
        assert_eq!(a[1].starts_at, t(5));
        assert_eq!(a[2].starts_at, t(7));
    }

    #[test]
    fn a_failed_rollout_alerts_until_the_spec_moves_on() {
        use crate::crd::{
            RevisionRecord, RolloutPhase, RolloutReason, RolloutResult, RolloutStatus,
        };
        let mut rollout = RolloutStatus {
            phase: RolloutPhase::RolledBack,
            reason: Some(RolloutReason::CanaryCrashedOnTickets),
            message: "canary crashed on 2 tickets".into(),
            stable_revision: "a".into(),
            stable_image: "runner:1".into(),
            target_revision: "b".into(),
            target_image: "runner:2".into(),
            started_at: Some(Time(t(1))),
            canary_since: Some(Time(t(2))),
            canary_tickets_ok: 0,
            canary_crashes: 2,
            canary_tickets: vec![],
            stable: None,
            history: vec![RevisionRecord {
                revision: "b".into(),
                image: "runner:2".into(),
                result: RolloutResult::RolledBack,
                reason: "CanaryCrashedOnTickets".into(),
                at: Time(t(4)),
            }],
            promote_token: None,
            abort_token: None,
        };
        let status = |r: &RolloutStatus| TestRunnerPoolStatus {
            rollout: Some(r.clone()),
            ..Default::default()
        };
        let a = active_alerts("ci", "unit", &status(&rollout), &all(), t(10));
        assert_eq!(a.len(), 1, "{a:?}");
        assert_eq!(a[0].name, names::ROLLOUT_FAILED);
        assert_eq!(a[0].starts_at, t(4));
        assert!(a[0].summary.contains("runner:2"), "{}", a[0].summary);
        assert!(
            active_alerts(
                "ci",
                "unit",
                &status(&rollout),
                &[AlertKind::FirstCrash],
                t(10)
            )
            .is_empty()
        );
        // An aborted rollout is the user's choice, not a failure.
        rollout.reason = Some(RolloutReason::AbortedByAnnotation);
        assert!(active_alerts("ci", "unit", &status(&rollout), &all(), t(10)).is_empty());
        // A new revision in progress ends the alert.
        rollout.reason = Some(RolloutReason::CanaryCrashedOnTickets);
        rollout.phase = RolloutPhase::Promoted;
        assert!(active_alerts("ci", "unit", &status(&rollout), &all(), t(10)).is_empty());
    }
}
