//! Rollouts: a new revision runs as a canary next to the stable one, is promoted on
//! ticket evidence and goes back to the stable one when it fails. Pure: the time is an
//! argument.
//!
//! See docs/rollouts.md for the rules in words.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::diagnosis::Completions;
use super::{PlannedEvent, PodState, PodView};
use crate::contract::WorkerExit;
use crate::crd::{
    ANNOTATION_ABORT, ANNOTATION_PROMOTE, CrashStatus, RevisionRecord, RolloutPhase, RolloutSpec,
    RolloutStatus, TestRunnerPoolSpec,
};

/// Ended rollouts kept in `status.rollout.history`.
pub const HISTORY: usize = 10;

/// Why a rollout is in its phase (`status.rollout.reason`).
pub mod reason {
    /// The pool's first revision serves directly.
    pub const FIRST_REVISION: &str = "FirstRevision";
    /// The canaries run and are being judged.
    pub const CANARY_RUNNING: &str = "CanaryRunning";
    /// No canary runs yet: the pool has no work.
    pub const WAITING_FOR_WORK: &str = "WaitingForWork";
    /// `spec.paused` holds the rollout.
    pub const PAUSED: &str = "Paused";
    /// The broker cannot be reached: nothing to judge the canary by.
    pub const BROKER_UNREACHABLE: &str = "BrokerUnreachable";
    /// The canaries completed enough tickets without a crash.
    pub const CANARY_PASSED: &str = "CanaryPassed";
    /// No ticket waited; the canaries ran `idlePromoteAfter` without a crash.
    pub const IDLE_PROMOTED: &str = "IdlePromoted";
    /// `rollout.canaryWorkers` is 0.
    pub const NO_CANARY: &str = "NoCanary";
    /// The `testrunner.dev/promote` annotation.
    pub const PROMOTED_BY_ANNOTATION: &str = "PromotedByAnnotation";
    /// The spec went back to the stable revision.
    pub const REVERTED: &str = "Reverted";
    /// A newer revision replaced the one rolling out.
    pub const SUPERSEDED: &str = "Superseded";
    /// A canary crashed with no ticket in hand.
    pub const CRASHED_BEFORE_CONSUMING: &str = "CanaryCrashedBeforeConsuming";
    /// Canaries crashed on two tickets no stable worker crashed on.
    pub const CRASHED_ON_TICKETS: &str = "CanaryCrashedOnTickets";
    /// No promotion within `rollout.progressDeadline`.
    pub const DEADLINE_EXCEEDED: &str = "ProgressDeadlineExceeded";
    /// The `testrunner.dev/abort` annotation.
    pub const ABORTED: &str = "AbortedByAnnotation";
}

/// The rollout's durations, parsed.
#[derive(Clone, Debug, PartialEq)]
pub struct RolloutSettings {
    /// `rollout.minCanaryTime`.
    pub min_canary_time: Duration,
    /// `rollout.idlePromoteAfter`.
    pub idle_promote_after: Duration,
    /// `rollout.progressDeadline`.
    pub progress_deadline: Duration,
}

impl RolloutSettings {
    /// Reads `spec.rollout`'s durations.
    pub fn from_spec(spec: &RolloutSpec) -> Result<Self, super::ConfigProblem> {
        Ok(Self {
            min_canary_time: super::duration("spec.rollout.minCanaryTime", &spec.min_canary_time)?,
            idle_promote_after: super::duration(
                "spec.rollout.idlePromoteAfter",
                &spec.idle_promote_after,
            )?,
            progress_deadline: super::duration(
                "spec.rollout.progressDeadline",
                &spec.progress_deadline,
            )?,
        })
    }
}

/// The settings of a spec that leaves `rollout` out.
impl Default for RolloutSettings {
    fn default() -> Self {
        Self::from_spec(&RolloutSpec::default()).expect("the defaults are valid")
    }
}

/// What the rollout decision needs.
pub struct RolloutInput<'a> {
    /// The pool spec.
    pub spec: &'a TestRunnerPoolSpec,
    /// Its rollout durations.
    pub settings: &'a RolloutSettings,
    /// The previous `status.rollout`; none for a new pool.
    pub previous: Option<&'a RolloutStatus>,
    /// The pool's annotations.
    pub annotations: &'a BTreeMap<String, String>,
    /// The pool's pods.
    pub pods: &'a [PodView],
    /// The crash history (merged).
    pub crashes: &'a [CrashStatus],
    /// Tickets in quarantine: crashes on them are the ticket's fault.
    pub quarantined: &'a [String],
    /// Reported completions.
    pub completions: &'a Completions,
    /// Ready tickets, when the broker answered.
    pub queue_ready: Option<u64>,
    /// The last probe could not reach the broker.
    pub broker_unreachable: bool,
    /// Now.
    pub now: Timestamp,
}

/// The rollout decision.
#[derive(Clone, Debug, PartialEq)]
pub struct RolloutDecision {
    /// The new `status.rollout`.
    pub status: RolloutStatus,
    /// While a canary is on: its revision and how many canary pods it wants.
    pub canary: Option<(String, u32)>,
    /// Events.
    pub events: Vec<PlannedEvent>,
    /// The rollout was rolled back in this decision.
    pub rolled_back: bool,
    /// When a gate (deadline, idle promotion, minimum canary time) opens.
    pub wake_after: Option<Duration>,
}

/// True while the latest rollout has failed and the spec still names its revision.
pub fn failed(status: &RolloutStatus) -> bool {
    let failure = matches!(
        status.reason.as_deref(),
        Some(
            reason::CRASHED_BEFORE_CONSUMING
                | reason::CRASHED_ON_TICKETS
                | reason::DEADLINE_EXCEEDED
        )
    );
    failure && status.phase != RolloutPhase::Promoted
}

fn record(revision: &str, image: &str, result: &str, why: &str, now: Timestamp) -> RevisionRecord {
    RevisionRecord {
        revision: revision.into(),
        image: image.into(),
        result: result.into(),
        reason: why.into(),
        at: Time(now),
    }
}

fn push_history(st: &mut RolloutStatus, entry: RevisionRecord) {
    st.history.push(entry);
    let excess = st.history.len().saturating_sub(HISTORY);
    st.history.drain(..excess);
}

fn event(warning: bool, reason: &'static str, action: &'static str, note: String) -> PlannedEvent {
    PlannedEvent {
        warning,
        reason,
        action,
        note,
    }
}

fn since(from: Timestamp, now: Timestamp) -> Duration {
    now.duration_since(from)
        .try_into()
        .unwrap_or(Duration::ZERO)
}

fn remaining(gate: Duration, ran: Duration) -> Option<Duration> {
    (ran < gate).then(|| (gate - ran).max(Duration::from_millis(10)))
}

fn exit_text(c: &CrashStatus) -> String {
    match c.signal {
        Some(sig) => format!("signal {sig}"),
        None if c.reason.is_empty() || c.reason == "Error" => format!("exit {}", c.exit_code),
        None => format!("exit {} ({})", c.exit_code, c.reason),
    }
}

struct Outcome<'a> {
    st: RolloutStatus,
    events: Vec<PlannedEvent>,
    rolled_back: bool,
    wake_after: Option<Duration>,
    spec: &'a TestRunnerPoolSpec,
    target_revision: String,
    now: Timestamp,
}

impl Outcome<'_> {
    fn promote(&mut self, why: &'static str, how: String) {
        let st = &mut self.st;
        push_history(
            st,
            record(
                &st.target_revision,
                &st.target_image,
                "Promoted",
                why,
                self.now,
            ),
        );
        st.stable = self.spec.workload();
        st.stable_revision = self.target_revision.clone();
        st.stable_image = self.spec.image.clone();
        st.phase = RolloutPhase::Promoted;
        st.reason = Some(why.into());
        st.message = format!(
            "Revision {} (image {}) is promoted: {how}. Its pods replace the older ones one at a time.",
            st.stable_revision, st.stable_image
        );
        self.events.push(event(
            false,
            "RolloutPromoted",
            "Promote",
            st.message.clone(),
        ));
    }

    fn roll_back(&mut self, why: &'static str, what: String) {
        let st = &mut self.st;
        push_history(
            st,
            record(
                &st.target_revision,
                &st.target_image,
                "RolledBack",
                why,
                self.now,
            ),
        );
        st.phase = RolloutPhase::RolledBack;
        st.reason = Some(why.into());
        st.message = format!(
            "{what}. Back to stable revision {} (image {}): canary pods are removed and the tickets they held go back to the queue; none is quarantined. Change spec.image to roll out a fix.",
            st.stable_revision, st.stable_image
        );
        let (reason, warning) = if why == reason::ABORTED {
            ("RolloutAborted", false)
        } else {
            ("RolloutFailed", true)
        };
        self.events
            .push(event(warning, reason, "Rollback", st.message.clone()));
        self.rolled_back = true;
    }
}

/// Decides the rollout step.
pub fn decide(input: &RolloutInput<'_>) -> RolloutDecision {
    let spec = input.spec;
    let now = input.now;
    let target = spec.workload();
    let target_revision = super::revision(spec);
    let promote_ask = input.annotations.get(ANNOTATION_PROMOTE);
    let abort_ask = input.annotations.get(ANNOTATION_ABORT);

    let Some(previous) = input.previous else {
        // A new pool: its first revision has nothing to be compared with.
        let st = RolloutStatus {
            phase: RolloutPhase::Promoted,
            reason: Some(reason::FIRST_REVISION.into()),
            message: format!(
                "Revision {target_revision} (image {}) is the pool's first: it serves directly, and crash diagnosis protects it.",
                target.image
            ),
            stable_revision: target_revision.clone(),
            stable_image: target.image.clone(),
            target_revision: target_revision.clone(),
            target_image: target.image.clone(),
            started_at: None,
            canary_since: None,
            canary_tickets_ok: 0,
            canary_crashes: 0,
            canary_tickets: Vec::new(),
            history: vec![record(
                &target_revision,
                &target.image,
                "Promoted",
                reason::FIRST_REVISION,
                now,
            )],
            stable: target,
            promote_token: promote_ask.cloned(),
            abort_token: abort_ask.cloned(),
        };
        return RolloutDecision {
            status: st,
            canary: None,
            events: Vec::new(),
            rolled_back: false,
            wake_after: None,
        };
    };

    let mut out = Outcome {
        st: previous.clone(),
        events: Vec::new(),
        rolled_back: false,
        wake_after: None,
        spec,
        target_revision: target_revision.clone(),
        now,
    };
    let promote_asked = promote_ask.is_some_and(|v| Some(v) != previous.promote_token.as_ref());
    let abort_asked = abort_ask.is_some_and(|v| Some(v) != previous.abort_token.as_ref());
    if let Some(v) = promote_ask {
        out.st.promote_token = Some(v.clone());
    }
    if let Some(v) = abort_ask {
        out.st.abort_token = Some(v.clone());
    }
    let in_progress =
        |p: RolloutPhase| matches!(p, RolloutPhase::Progressing | RolloutPhase::Paused);

    // A new revision in the spec.
    if target_revision != out.st.target_revision {
        let st = &mut out.st;
        if in_progress(st.phase) {
            push_history(
                st,
                record(
                    &st.target_revision,
                    &st.target_image,
                    "Superseded",
                    reason::SUPERSEDED,
                    now,
                ),
            );
            out.events.push(event(
                false,
                "RolloutSuperseded",
                "Rollout",
                format!(
                    "The rollout of revision {} (image {}) is superseded by revision {target_revision} (image {})",
                    st.target_revision, st.target_image, target.image
                ),
            ));
        }
        st.target_revision = target_revision.clone();
        st.target_image = target.image.clone();
        st.canary_since = None;
        st.canary_tickets_ok = 0;
        st.canary_crashes = 0;
        st.canary_tickets.clear();
        if target_revision == st.stable_revision {
            st.phase = RolloutPhase::Promoted;
            st.reason = Some(reason::REVERTED.into());
            st.started_at = None;
            st.message = format!(
                "The spec is back on stable revision {} (image {}); pods of other revisions are removed.",
                st.stable_revision, st.stable_image
            );
            out.events.push(event(
                false,
                "RolloutReverted",
                "Rollout",
                st.message.clone(),
            ));
        } else {
            st.phase = RolloutPhase::Progressing;
            st.reason = Some(reason::WAITING_FOR_WORK.into());
            st.started_at = Some(Time(now));
            st.message = String::new();
            out.events.push(event(
                false,
                "RolloutStarted",
                "Rollout",
                format!(
                    "Rolling out revision {target_revision} (image {}): {} canary pod(s) next to stable revision {} (image {}), promoted after {} tickets",
                    target.image,
                    spec.rollout.canary_workers.max(0),
                    st.stable_revision,
                    st.stable_image,
                    spec.rollout.promote_after_tickets.max(0)
                ),
            ));
        }
    }

    if in_progress(out.st.phase) {
        out.st.phase = if spec.paused {
            RolloutPhase::Paused
        } else {
            RolloutPhase::Progressing
        };
        if abort_asked {
            out.roll_back(
                reason::ABORTED,
                format!(
                    "The rollout of revision {} was aborted (annotation {ANNOTATION_ABORT})",
                    out.st.target_revision
                ),
            );
        } else if promote_asked {
            out.promote(
                reason::PROMOTED_BY_ANNOTATION,
                format!("annotation {ANNOTATION_PROMOTE} skipped the canary's gates"),
            );
        } else if spec.rollout.canary_workers <= 0 {
            out.promote(
                reason::NO_CANARY,
                "rollout.canaryWorkers is 0, so no canary judges it".into(),
            );
        } else if spec.paused {
            out.st.reason = Some(reason::PAUSED.into());
            out.st.canary_since = None;
            out.st.message = format!(
                "spec.paused holds the rollout of revision {}; the canary's times start again when it resumes.",
                out.st.target_revision
            );
        } else if input.broker_unreachable {
            // No ticket moves: an outage must not fail (or promote) the canary.
            out.st.reason = Some(reason::BROKER_UNREACHABLE.into());
            out.st.canary_since = None;
            out.st.message = format!(
                "The broker cannot be reached: the canary of revision {} is judged again when it answers, its times starting over.",
                out.st.target_revision
            );
        } else {
            judge(input, &mut out);
        }
    } else if out.st.phase == RolloutPhase::RolledBack && promote_asked {
        out.promote(
            reason::PROMOTED_BY_ANNOTATION,
            format!("annotation {ANNOTATION_PROMOTE} overrode the rollback"),
        );
    }

    let canary = in_progress(out.st.phase).then(|| {
        (
            out.st.target_revision.clone(),
            spec.rollout.canary_workers.max(0) as u32,
        )
    });
    RolloutDecision {
        status: out.st,
        canary,
        events: out.events,
        rolled_back: out.rolled_back,
        wake_after: out.wake_after,
    }
}

/// Judges a running canary: fail, promote, or wait.
fn judge(input: &RolloutInput<'_>, out: &mut Outcome<'_>) {
    let now = input.now;
    let spec = input.spec;
    let settings = input.settings;
    let target = out.target_revision.clone();
    let started = out.st.started_at.as_ref().map(|t| t.0).unwrap_or(now);

    let canary_pods: Vec<&PodView> = input
        .pods
        .iter()
        .filter(|p| p.revision == target)
        .filter(|p| !matches!(p.state, PodState::Terminating | PodState::Finished))
        .collect();
    // The canary's clock runs while canary pods exist (Pending ones too: an image
    // that cannot be pulled must miss the deadline).
    if canary_pods.is_empty() {
        out.st.canary_since = None;
    } else if out.st.canary_since.is_none() {
        out.st.canary_since = Some(Time(now));
    }

    let stored = std::mem::take(&mut out.st.canary_tickets);
    let mut ok: BTreeSet<&str> = stored.iter().map(String::as_str).collect();
    ok.extend(input.completions.tickets_since(&target, started));
    let crashes: Vec<&CrashStatus> = input
        .crashes
        .iter()
        .filter(|c| c.revision == target && c.at.0 >= started)
        .filter(|c| c.exit_code != 0 && c.exit_code != i32::from(WorkerExit::BrokerLost))
        .collect();
    // A ticket that also crashed other revisions is a poison ticket, not the canary's
    // fault; so is a quarantined one.
    let crashed_elsewhere: BTreeSet<&str> = input
        .crashes
        .iter()
        .filter(|c| c.revision != target)
        .filter_map(|c| c.ticket.as_deref())
        .collect();
    // A broker the stable workers could not reach either is no fault of the canary's.
    let broker_trouble_elsewhere = input.crashes.iter().any(|c| {
        c.revision != target
            && c.at.0 >= started
            && matches!(
                WorkerExit::from_code(c.exit_code),
                Some(WorkerExit::BrokerUnavailable | WorkerExit::BrokerLost)
            )
    });
    let pre_loop: Vec<&&CrashStatus> = crashes
        .iter()
        .filter(|c| c.ticket.is_none())
        .filter(|c| {
            !(broker_trouble_elsewhere && c.exit_code == i32::from(WorkerExit::BrokerUnavailable))
        })
        .collect();
    let canary_only: BTreeSet<&str> = crashes
        .iter()
        .filter_map(|c| c.ticket.as_deref())
        .filter(|t| !crashed_elsewhere.contains(t))
        .filter(|t| !input.quarantined.iter().any(|q| q == t))
        .collect();
    let needed = spec.rollout.promote_after_tickets.max(0) as usize;
    out.st.canary_tickets_ok = ok.len().min(i32::MAX as usize) as i32;
    out.st.canary_crashes = crashes.len() as i32;
    out.st.canary_tickets = ok.iter().take(needed).map(|t| t.to_string()).collect();

    let ran = out.st.canary_since.as_ref().map(|s| since(s.0, now));
    let failure = if let Some(c) = pre_loop.last() {
        Some((
            reason::CRASHED_BEFORE_CONSUMING,
            format!(
                "Canary pod {} of revision {target} (image {}) crashed before taking a ticket ({})",
                c.pod,
                c.image,
                exit_text(c)
            ),
        ))
    } else if canary_only.len() >= 2 {
        Some((
            reason::CRASHED_ON_TICKETS,
            format!(
                "Canary pods of revision {target} (image {}) crashed on {} different tickets no stable worker crashed on ({})",
                out.st.target_image,
                canary_only.len(),
                canary_only.iter().copied().collect::<Vec<_>>().join(", ")
            ),
        ))
    } else if ran.is_some_and(|r| r >= settings.progress_deadline) {
        Some((
            reason::DEADLINE_EXCEEDED,
            format!(
                "The canary of revision {target} was not promoted within rollout.progressDeadline ({}; {} of {needed} tickets completed, {} crash(es))",
                humantime::format_duration(settings.progress_deadline),
                ok.len(),
                crashes.len()
            ),
        ))
    } else {
        None
    };

    if let Some((why, what)) = failure {
        if spec.rollout.auto_rollback {
            out.roll_back(why, what);
        } else {
            if out.st.reason.as_deref() != Some(why) {
                out.events.push(event(
                    true,
                    "RolloutFailed",
                    "Rollout",
                    format!(
                        "{what}; rollout.autoRollback is false, so the canary stays: annotate {ANNOTATION_ABORT} or {ANNOTATION_PROMOTE}"
                    ),
                ));
            }
            out.st.reason = Some(why.into());
            out.st.message = format!(
                "{what}. rollout.autoRollback is false: the canary stays until annotation {ANNOTATION_ABORT} or {ANNOTATION_PROMOTE}."
            );
        }
        return;
    }

    let Some(ran) = ran else {
        out.st.reason = Some(reason::WAITING_FOR_WORK.into());
        out.st.message = format!(
            "Revision {target} (image {}) waits for work: its canary starts with the pool's next worker.",
            out.st.target_image
        );
        return;
    };
    let clean = canary_only.is_empty();
    let min_time_done = ran >= settings.min_canary_time;
    let all_ready = canary_pods.iter().all(|p| p.state == PodState::Ready);
    if clean && min_time_done && ok.len() >= needed {
        out.promote(
            reason::CANARY_PASSED,
            format!(
                "its canary completed {} tickets without a crash in {}",
                ok.len(),
                humantime::format_duration(Duration::from_secs(ran.as_secs()))
            ),
        );
        return;
    }
    if clean
        && min_time_done
        && all_ready
        && input.queue_ready == Some(0)
        && ran >= settings.idle_promote_after
    {
        out.promote(
            reason::IDLE_PROMOTED,
            format!(
                "no ticket waited, and its canary ran {} without a crash ({} tickets completed)",
                humantime::format_duration(Duration::from_secs(ran.as_secs())),
                ok.len()
            ),
        );
        return;
    }
    out.st.reason = Some(reason::CANARY_RUNNING.into());
    out.st.message = format!(
        "Canary of revision {target} (image {}): {} of {needed} tickets completed, {} crash(es); the stable revision {} serves the rest.",
        out.st.target_image,
        ok.len(),
        crashes.len(),
        out.st.stable_revision
    );
    out.wake_after = [
        remaining(settings.progress_deadline, ran),
        remaining(settings.min_canary_time, ran),
        remaining(settings.idle_promote_after, ran),
    ]
    .into_iter()
    .flatten()
    .min();
}

#[cfg(test)]
mod tests;
