//! Status, phase and conditions, and the events their transitions call for.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::diagnosis::verdict;
use super::scaling::Decision;
use super::{BrokerView, ConfigProblem, Observed, PlannedEvent, PodState};
use crate::crd::{
    Condition, CrashStatus, DiagnosisStatus, Phase, QueueStatus, RolloutPhase, RolloutStatus,
    TestRunnerPool, TestRunnerPoolStatus, WorkersStatus,
};

/// Condition type: the pool serves tickets as asked.
pub const CONDITION_READY: &str = "Ready";
/// Condition type: the broker answers queue probes.
pub const CONDITION_BROKER_REACHABLE: &str = "BrokerReachable";
/// Condition type: something stops the pool from working as asked.
pub const CONDITION_DEGRADED: &str = "Degraded";
/// Condition type: every worker runs the revision the spec asks for.
pub const CONDITION_ROLLOUT_COMPLETE: &str = "RolloutComplete";

pub(super) struct StatusInput<'a> {
    pub pool: &'a TestRunnerPool,
    pub old: &'a TestRunnerPoolStatus,
    pub observed: &'a Observed,
    pub config_problem: Option<&'a ConfigProblem>,
    pub decision: &'a Decision,
    pub diagnosis: &'a DiagnosisStatus,
    pub rollout: &'a RolloutStatus,
    pub now: Timestamp,
}

struct Cond {
    type_: &'static str,
    status: &'static str,
    reason: String,
    message: String,
}

fn cond(type_: &'static str, status: bool, reason: &str, message: String) -> Cond {
    Cond {
        type_,
        status: if status { "True" } else { "False" },
        reason: reason.into(),
        message,
    }
}

pub(super) fn status(input: StatusInput<'_>) -> TestRunnerPoolStatus {
    let StatusInput {
        pool,
        old,
        observed,
        config_problem,
        decision,
        diagnosis,
        rollout,
        now,
    } = input;
    let generation = pool.metadata.generation;

    let broker = match &observed.broker {
        BrokerView::NotProbed => Cond {
            type_: CONDITION_BROKER_REACHABLE,
            status: "Unknown",
            reason: "NotProbed".into(),
            message: "The queue has not been probed yet".into(),
        },
        BrokerView::Depth { .. } => cond(
            CONDITION_BROKER_REACHABLE,
            true,
            "QueueFound",
            format!("Queue {:?} answers probes", pool.spec.queue.name),
        ),
        BrokerView::QueueNotFound { .. } => cond(
            CONDITION_BROKER_REACHABLE,
            true,
            "QueueNotFound",
            format!(
                "The broker answers but queue {:?} does not exist",
                pool.spec.queue.name
            ),
        ),
        BrokerView::Unreachable {
            reason, message, ..
        } => cond(CONDITION_BROKER_REACHABLE, false, reason, message.clone()),
    };

    let degraded = if let Some(problem) = config_problem {
        cond(
            CONDITION_DEGRADED,
            true,
            problem.reason(),
            problem.message(),
        )
    } else if let BrokerView::Unreachable { message, .. } = &observed.broker {
        cond(
            CONDITION_DEGRADED,
            true,
            "BrokerUnreachable",
            format!(
                "The broker cannot be reached; holding {} workers: {message}",
                decision.current
            ),
        )
    } else if let BrokerView::QueueNotFound { .. } = &observed.broker {
        cond(
            CONDITION_DEGRADED,
            true,
            "QueueNotFound",
            format!(
                "Queue {:?} does not exist; holding {} workers",
                pool.spec.queue.name, decision.current
            ),
        )
    } else if diagnosis.verdict != verdict::HEALTHY {
        cond(
            CONDITION_DEGRADED,
            true,
            &diagnosis.verdict,
            diagnosis.message.clone(),
        )
    } else if super::rollout::failed(rollout) {
        cond(
            CONDITION_DEGRADED,
            true,
            "RolloutFailed",
            rollout.message.clone(),
        )
    } else {
        cond(CONDITION_DEGRADED, false, "AsExpected", String::new())
    };
    let is_degraded = degraded.status == "True";

    let ready = if pool.spec.paused {
        cond(
            CONDITION_READY,
            false,
            "Paused",
            "spec.paused is true: workers are neither created nor deleted".into(),
        )
    } else if is_degraded {
        cond(
            CONDITION_READY,
            false,
            &degraded.reason,
            degraded.message.clone(),
        )
    } else if decision.ready >= decision.desired && decision.current == decision.desired {
        cond(
            CONDITION_READY,
            true,
            "WorkersReady",
            format!("{} of {} workers ready", decision.ready, decision.desired),
        )
    } else {
        cond(
            CONDITION_READY,
            false,
            "Scaling",
            format!(
                "{} of {} workers ready, {} exist",
                decision.ready, decision.desired, decision.current
            ),
        )
    };

    let phase = if pool.spec.paused {
        Phase::Paused
    } else if is_degraded {
        Phase::Degraded
    } else if decision.current != decision.desired || decision.ready < decision.desired {
        Phase::Scaling
    } else if decision.desired == 0 && decision.queue_ready == 0 {
        Phase::Idle
    } else {
        Phase::Running
    };

    let outdated = observed
        .pods
        .iter()
        .filter(|p| !matches!(p.state, PodState::Terminating | PodState::Finished))
        .filter(|p| p.revision != rollout.target_revision)
        .count();
    let complete = match rollout.phase {
        RolloutPhase::Promoted if outdated == 0 => cond(
            CONDITION_ROLLOUT_COMPLETE,
            true,
            rollout.reason.as_deref().unwrap_or("Promoted"),
            format!(
                "Every worker runs revision {} (image {})",
                rollout.stable_revision, rollout.stable_image
            ),
        ),
        RolloutPhase::Promoted => cond(
            CONDITION_ROLLOUT_COMPLETE,
            false,
            "Replacing",
            format!(
                "{outdated} worker(s) of older revisions left to replace with revision {}",
                rollout.stable_revision
            ),
        ),
        RolloutPhase::Progressing | RolloutPhase::Paused => cond(
            CONDITION_ROLLOUT_COMPLETE,
            false,
            if rollout.phase == RolloutPhase::Paused {
                "Paused"
            } else {
                "CanaryRunning"
            },
            rollout.message.clone(),
        ),
        RolloutPhase::RolledBack => cond(
            CONDITION_ROLLOUT_COMPLETE,
            false,
            "RolledBack",
            rollout.message.clone(),
        ),
    };

    let conditions = [ready, broker, degraded, complete]
        .into_iter()
        .map(|c| {
            let previous = old.conditions.iter().find(|o| o.type_ == c.type_);
            let last_transition_time = match previous {
                Some(p) if p.status == c.status => p.last_transition_time.clone(),
                _ => Some(Time(now)),
            };
            Condition {
                type_: c.type_.into(),
                status: c.status.into(),
                reason: c.reason,
                message: c.message,
                last_transition_time,
                observed_generation: generation,
            }
        })
        .collect();

    let queue = match &observed.broker {
        BrokerView::Depth {
            ready,
            consumers,
            at,
        } => Some(QueueStatus {
            ready: *ready as i64,
            consumers: *consumers as i64,
            last_probe_time: Some(Time(*at)),
        }),
        // Keep the last numbers seen; the conditions say they are stale.
        _ => old.queue.clone(),
    };

    TestRunnerPoolStatus {
        observed_generation: generation,
        phase: Some(phase),
        conditions,
        queue,
        workers: Some(WorkersStatus {
            desired: decision.desired,
            current: decision.current,
            ready: decision.ready,
            busy: decision.busy,
            surplus_since: decision.surplus_since.map(Time),
        }),
        diagnosis: Some(diagnosis.clone()),
        quarantine: None,
        crashes: Vec::new(),
        rollout: None,
    }
}

fn find<'a>(s: &'a TestRunnerPoolStatus, type_: &str) -> Option<&'a Condition> {
    s.conditions.iter().find(|c| c.type_ == type_)
}

/// Events for condition transitions between two statuses.
pub(super) fn transition_events(
    old: &TestRunnerPoolStatus,
    new: &TestRunnerPoolStatus,
    config_problem: Option<&ConfigProblem>,
) -> Vec<PlannedEvent> {
    let mut events = Vec::new();
    let was = find(old, CONDITION_BROKER_REACHABLE);
    let is = find(new, CONDITION_BROKER_REACHABLE);
    if let (Some(is), was) = (is, was) {
        let was_false = was.is_some_and(|c| c.status == "False");
        if is.status == "False" && !was_false {
            events.push(PlannedEvent {
                warning: true,
                reason: "BrokerUnreachable",
                action: "ProbeQueue",
                note: format!("{}: {}; holding the current workers", is.reason, is.message),
            });
        } else if is.status == "True" && was_false {
            events.push(PlannedEvent {
                warning: false,
                reason: "BrokerRecovered",
                action: "ProbeQueue",
                note: is.message.clone(),
            });
        }
    }
    if let Some(problem) = config_problem {
        let message = problem.message();
        let already = find(old, CONDITION_DEGRADED)
            .is_some_and(|c| c.status == "True" && c.message == message);
        if !already {
            events.push(PlannedEvent {
                warning: true,
                reason: "InvalidSpec",
                action: "Validate",
                note: message,
            });
        }
    }
    let queue_missing = |s: &TestRunnerPoolStatus| {
        find(s, CONDITION_DEGRADED)
            .is_some_and(|c| c.status == "True" && c.reason == "QueueNotFound")
    };
    if queue_missing(new) && !queue_missing(old) {
        let note = find(new, CONDITION_DEGRADED)
            .map(|c| c.message.clone())
            .unwrap_or_default();
        events.push(PlannedEvent {
            warning: true,
            reason: "QueueNotFound",
            action: "ProbeQueue",
            note,
        });
    }
    events
}

/// Most WorkerCrashed events published for one reconcile; the rest are summed up.
pub const MAX_CRASH_EVENTS: usize = 5;

/// A Warning event for each crash seen for the first time: the seed's rule, report
/// the first crash right away.
pub(super) fn crash_events(fresh: &[CrashStatus]) -> Vec<PlannedEvent> {
    let mut events: Vec<PlannedEvent> = fresh
        .iter()
        .take(MAX_CRASH_EVENTS)
        .map(|c| {
            let exit = match c.signal {
                Some(sig) => format!("signal {sig}"),
                None => format!("exit code {}", c.exit_code),
            };
            let reason = if c.reason.is_empty() || c.reason == "Error" {
                String::new()
            } else {
                format!(" ({})", c.reason)
            };
            let on = match (&c.ticket, &c.state) {
                (Some(t), _) => format!("on ticket {t} (delivery {})", c.delivery.unwrap_or(1)),
                (None, Some(s)) if s != "starting" && s != "idle" => {
                    format!("with no ticket in hand: {s}")
                }
                (None, _) => "with no ticket in hand".to_string(),
            };
            PlannedEvent {
                warning: true,
                reason: "WorkerCrashed",
                action: "ObserveWorker",
                note: format!(
                    "Worker pod {} (image {}) crashed {on}: {exit}{reason}",
                    c.pod, c.image
                ),
            }
        })
        .collect();
    if fresh.len() > MAX_CRASH_EVENTS {
        events.push(PlannedEvent {
            warning: true,
            reason: "WorkerCrashed",
            action: "ObserveWorker",
            note: format!(
                "{} more worker crashes; see status.crashes",
                fresh.len() - MAX_CRASH_EVENTS
            ),
        });
    }
    events
}

/// An event when the diagnosis changes.
pub(super) fn diagnosis_events(
    old: Option<&DiagnosisStatus>,
    new: &DiagnosisStatus,
) -> Vec<PlannedEvent> {
    let was = old.map(|d| (d.verdict.as_str(), d.ticket.as_deref()));
    let is = (new.verdict.as_str(), new.ticket.as_deref());
    if was == Some(is) || (was.is_none() && new.verdict == verdict::HEALTHY) {
        return Vec::new();
    }
    if new.verdict == verdict::HEALTHY {
        return vec![PlannedEvent {
            warning: false,
            reason: "Recovered",
            action: "Diagnose",
            note: format!(
                "No longer {}: workers are healthy again",
                old.map(|d| d.verdict.as_str()).unwrap_or_default()
            ),
        }];
    }
    let reason = match new.verdict.as_str() {
        verdict::POISON_TICKET => "PoisonTicket",
        verdict::BROKEN_ENVIRONMENT => "BrokenEnvironment",
        verdict::OUT_OF_MEMORY => "OutOfMemory",
        _ => "QueueStalled",
    };
    vec![PlannedEvent {
        warning: true,
        reason,
        action: "Diagnose",
        note: new.message.clone(),
    }]
}
