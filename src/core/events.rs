//! The events step: the Kubernetes events one reconcile calls for, from what the steps
//! before it decided and from how the new status differs from the previous one.

use super::ConfigProblem;
use super::conditions::{self, ConditionReason, ConditionStatus, ConditionType};
use super::observe::Observation;
use super::scaling::Decision;
use crate::crd::{
    Condition, CrashStatus, DiagnosisStatus, TestRunnerPoolStatus, Verdict, named_enum,
};

named_enum! {
    /// The reason of an event the core plans.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum EventReason {
        /// More workers for the queue.
        ScaledUp,
        /// Fewer workers for the queue.
        ScaledDown,
        /// The broker stopped answering probes.
        BrokerUnreachable,
        /// The broker answers again.
        BrokerRecovered,
        /// The queue does not exist.
        QueueNotFound,
        /// The spec has a problem the schema cannot catch.
        InvalidSpec,
        /// A worker container crashed.
        WorkerCrashed,
        /// The diagnosis found a poison ticket.
        PoisonTicket,
        /// A poison ticket went on the quarantine list.
        PoisonTicketQuarantined,
        /// The diagnosis found a broken environment.
        BrokenEnvironment,
        /// Workers ran out of memory.
        OutOfMemory,
        /// The queue stopped moving.
        QueueStalled,
        /// The diagnosis is healthy again.
        Recovered,
        /// Tickets go back from the quarantine queue to the work queue.
        TicketsReplayed,
        /// A rollout started.
        RolloutStarted,
        /// A revision was promoted.
        RolloutPromoted,
        /// A canary failed.
        RolloutFailed,
        /// A rollout was aborted with the annotation.
        RolloutAborted,
        /// A newer revision replaced the one rolling out.
        RolloutSuperseded,
        /// The spec went back to the stable revision.
        RolloutReverted,
    }
}

impl EventReason {
    /// The event that announces a new verdict.
    pub fn of_verdict(verdict: Verdict) -> EventReason {
        match verdict {
            Verdict::Healthy => EventReason::Recovered,
            Verdict::PoisonTicket => EventReason::PoisonTicket,
            Verdict::BrokenEnvironment => EventReason::BrokenEnvironment,
            Verdict::OutOfMemory => EventReason::OutOfMemory,
            Verdict::QueueStalled => EventReason::QueueStalled,
        }
    }
}

named_enum! {
    /// The action of an event the core plans: what the operator did or was doing.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum EventAction {
        /// Scaling the workers.
        Scale,
        /// Probing the queue.
        ProbeQueue,
        /// Reading the spec.
        Validate,
        /// Reading a worker's status.
        ObserveWorker,
        /// Diagnosing crashes.
        Diagnose,
        /// Quarantining a ticket.
        Quarantine,
        /// Replaying tickets.
        Replay,
        /// Promoting a revision.
        Promote,
        /// Rolling a revision back.
        Rollback,
        /// Rolling a revision out.
        Rollout,
    }
}

/// An event the shell must publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedEvent {
    /// Warning or Normal.
    pub warning: bool,
    /// PascalCase reason.
    pub reason: EventReason,
    /// PascalCase action.
    pub action: EventAction,
    /// Human readable note (at most 1 kB once published).
    pub note: String,
}

impl PlannedEvent {
    /// A Normal event.
    pub fn normal(reason: EventReason, action: EventAction, note: String) -> Self {
        Self {
            warning: false,
            reason,
            action,
            note,
        }
    }

    /// A Warning event.
    pub fn warning(reason: EventReason, action: EventAction, note: String) -> Self {
        Self {
            warning: true,
            ..Self::normal(reason, action, note)
        }
    }
}

/// Most WorkerCrashed events published for one reconcile; the rest are summed up.
pub const MAX_CRASH_EVENTS: usize = 5;

/// The step: every event of one reconcile, in order: condition transitions, new
/// crashes, the diagnosis, then what the quarantine, the rollout and the scaling did.
pub(super) fn events(
    seen: &Observation<'_>,
    status: &TestRunnerPoolStatus,
    diagnosis: &DiagnosisStatus,
    scaling: &Decision,
    quarantine: Vec<PlannedEvent>,
    rollout: Vec<PlannedEvent>,
) -> Vec<PlannedEvent> {
    let old = &seen.previous;
    let config_problem = seen.config_problem.as_ref();
    let mut events: Vec<PlannedEvent> = [
        broker_transition(old, status),
        spec_problem(old, config_problem),
        queue_missing(old, status),
    ]
    .into_iter()
    .flatten()
    .collect();
    events.extend(crashes(&seen.fresh_crashes));
    events.extend(verdict(old.diagnosis.as_ref(), diagnosis));
    events.extend(quarantine);
    events.extend(rollout);
    events.extend(scaled(scaling));
    events
}

fn is(status: &TestRunnerPoolStatus, type_: ConditionType, value: ConditionStatus) -> bool {
    conditions::find(status, type_).is_some_and(|c| c.status == value)
}

/// BrokerUnreachable when the broker stops answering, BrokerRecovered when it answers
/// again.
fn broker_transition(
    old: &TestRunnerPoolStatus,
    new: &TestRunnerPoolStatus,
) -> Option<PlannedEvent> {
    let is_now = conditions::find(new, ConditionType::BrokerReachable)?;
    let was_false = is(old, ConditionType::BrokerReachable, ConditionStatus::False);
    if is_now.status == ConditionStatus::False && !was_false {
        Some(PlannedEvent::warning(
            EventReason::BrokerUnreachable,
            EventAction::ProbeQueue,
            format!(
                "{}: {}; holding the current workers",
                is_now.reason, is_now.message
            ),
        ))
    } else if is_now.status == ConditionStatus::True && was_false {
        Some(PlannedEvent::normal(
            EventReason::BrokerRecovered,
            EventAction::ProbeQueue,
            is_now.message.clone(),
        ))
    } else {
        None
    }
}

/// InvalidSpec once per spec problem (while the Degraded condition does not say it
/// already).
fn spec_problem(
    old: &TestRunnerPoolStatus,
    problem: Option<&ConfigProblem>,
) -> Option<PlannedEvent> {
    let message = problem?.message();
    let already = conditions::find(old, ConditionType::Degraded)
        .is_some_and(|c| c.status == ConditionStatus::True && c.message == message);
    (!already)
        .then(|| PlannedEvent::warning(EventReason::InvalidSpec, EventAction::Validate, message))
}

/// QueueNotFound when the queue goes missing.
fn queue_missing(old: &TestRunnerPoolStatus, new: &TestRunnerPoolStatus) -> Option<PlannedEvent> {
    fn missing(s: &TestRunnerPoolStatus) -> Option<&Condition> {
        conditions::find(s, ConditionType::Degraded)
            .filter(|c| c.status == ConditionStatus::True)
            .filter(|c| c.reason == ConditionReason::QueueNotFound)
    }
    let now = missing(new)?;
    missing(old).is_none().then(|| {
        PlannedEvent::warning(
            EventReason::QueueNotFound,
            EventAction::ProbeQueue,
            now.message.clone(),
        )
    })
}

/// A Warning event for each crash seen for the first time: the first crash is reported
/// right away.
pub(super) fn crashes(fresh: &[CrashStatus]) -> Vec<PlannedEvent> {
    let mut events: Vec<PlannedEvent> = fresh
        .iter()
        .take(MAX_CRASH_EVENTS)
        .map(|c| {
            let on = match (&c.ticket, &c.state) {
                (Some(t), _) => format!("on ticket {t} (delivery {})", c.delivery.unwrap_or(1)),
                (None, Some(s)) if s != "starting" && s != "idle" => {
                    format!("with no ticket in hand: {s}")
                }
                (None, _) => "with no ticket in hand".to_string(),
            };
            PlannedEvent::warning(
                EventReason::WorkerCrashed,
                EventAction::ObserveWorker,
                format!(
                    "Worker pod {} (image {}) crashed {on}: {}",
                    c.pod,
                    c.image,
                    super::crash::ending(c, "exit code")
                ),
            )
        })
        .collect();
    if fresh.len() > MAX_CRASH_EVENTS {
        events.push(PlannedEvent::warning(
            EventReason::WorkerCrashed,
            EventAction::ObserveWorker,
            format!(
                "{} more worker crashes; see status.crashes",
                fresh.len() - MAX_CRASH_EVENTS
            ),
        ));
    }
    events
}

/// An event when the diagnosis changes: its verdict, or Recovered.
pub(super) fn verdict(
    old: Option<&DiagnosisStatus>,
    new: &DiagnosisStatus,
) -> Option<PlannedEvent> {
    let was = old.map(|d| (d.verdict, d.ticket.as_deref()));
    let is = (new.verdict, new.ticket.as_deref());
    if was == Some(is) || (was.is_none() && new.verdict == Verdict::Healthy) {
        return None;
    }
    let reason = EventReason::of_verdict(new.verdict);
    Some(if new.verdict == Verdict::Healthy {
        PlannedEvent::normal(
            reason,
            EventAction::Diagnose,
            format!(
                "No longer {}: workers are healthy again",
                old.map(|d| d.verdict.as_str()).unwrap_or_default()
            ),
        )
    } else {
        PlannedEvent::warning(reason, EventAction::Diagnose, new.message.clone())
    })
}

/// ScaledUp and ScaledDown (a pod that replaces an old revision is no scale-up).
pub(super) fn scaled(decision: &Decision) -> Vec<PlannedEvent> {
    let mut events = Vec::new();
    if decision.create > 0 && !decision.replacing {
        events.push(PlannedEvent::normal(
            EventReason::ScaledUp,
            EventAction::Scale,
            format!(
                "Scaling up from {} to {} workers ({} tickets ready{})",
                decision.current,
                decision.current + decision.create as i32,
                decision.queue_ready,
                if decision.warm > 0 {
                    format!(", {} kept warm", decision.warm)
                } else {
                    String::new()
                }
            ),
        ));
    }
    if decision.scaled_down > 0 {
        events.push(PlannedEvent::normal(
            EventReason::ScaledDown,
            EventAction::Scale,
            format!(
                "Scaling down from {} to {} workers; removed workers finish the ticket in hand",
                decision.current,
                decision.current - decision.scaled_down as i32
            ),
        ));
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::fixtures::{decision, ticket_crash};

    fn diagnosis(verdict: Verdict, ticket: Option<&str>) -> DiagnosisStatus {
        DiagnosisStatus {
            verdict,
            message: format!("{verdict} seen"),
            ticket: ticket.map(Into::into),
            ..Default::default()
        }
    }

    #[test]
    fn a_new_verdict_is_announced_once_and_its_end_too() {
        let healthy = diagnosis(Verdict::Healthy, None);
        assert_eq!(verdict(None, &healthy), None, "a new pool starts healthy");
        let poison = diagnosis(Verdict::PoisonTicket, Some("t-1"));
        let e = verdict(Some(&healthy), &poison).unwrap();
        assert_eq!(
            (e.warning, e.reason, e.action),
            (true, EventReason::PoisonTicket, EventAction::Diagnose)
        );
        assert_eq!(e.note, "PoisonTicket seen");
        assert_eq!(verdict(Some(&poison), &poison), None);
        let other = diagnosis(Verdict::PoisonTicket, Some("t-2"));
        assert!(verdict(Some(&poison), &other).is_some(), "another ticket");
        let e = verdict(Some(&other), &healthy).unwrap();
        assert_eq!((e.warning, e.reason), (false, EventReason::Recovered));
        assert_eq!(e.note, "No longer PoisonTicket: workers are healthy again");
        for &v in Verdict::ALL {
            assert_eq!(
                EventReason::of_verdict(v).as_str(),
                if v == Verdict::Healthy {
                    "Recovered"
                } else {
                    v.as_str()
                }
            );
        }
    }

    #[test]
    fn crash_events_name_the_ticket_and_sum_up_past_the_fifth() {
        let mut fresh: Vec<CrashStatus> = (0..7)
            .map(|i| ticket_crash(&format!("unit-{i}"), "t-9", "runner:1", i))
            .collect();
        fresh[1].ticket = None;
        fresh[1].state = Some("config-error: no command".into());
        fresh[2].signal = Some(11);
        fresh[2].reason = "OOMKilled".into();
        let events = crashes(&fresh);
        let notes: Vec<&str> = events.iter().map(|e| e.note.as_str()).collect();
        assert_eq!(notes.len(), MAX_CRASH_EVENTS + 1);
        assert_eq!(
            notes[0],
            "Worker pod unit-0 (image runner:1) crashed on ticket t-9 (delivery 1): exit code 3"
        );
        assert_eq!(
            notes[1],
            "Worker pod unit-1 (image runner:1) crashed with no ticket in hand: config-error: no command: exit code 3"
        );
        assert!(
            notes[2].ends_with(": signal 11 (OOMKilled)"),
            "{}",
            notes[2]
        );
        assert_eq!(notes[5], "2 more worker crashes; see status.crashes");
        assert!(
            events
                .iter()
                .all(|e| e.warning && e.reason == EventReason::WorkerCrashed)
        );
    }

    #[test]
    fn scaling_says_up_and_down_but_not_a_replacement() {
        let mut d = Decision {
            queue_ready: 2,
            create: 2,
            ..decision(3, 1, 1)
        };
        let up = scaled(&d);
        assert_eq!(up.len(), 1);
        assert_eq!(
            up[0].note,
            "Scaling up from 1 to 3 workers (2 tickets ready)"
        );
        d.create = 1;
        d.replacing = true;
        assert!(scaled(&d).is_empty());
        d.create = 0;
        d.current = 3;
        d.scaled_down = 2;
        let down = scaled(&d);
        assert_eq!(down[0].reason, EventReason::ScaledDown);
        assert_eq!(
            down[0].note,
            "Scaling down from 3 to 1 workers; removed workers finish the ticket in hand"
        );
    }
}
