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
use super::revisions::StoredRevision;
use super::{EventAction, EventReason, PlannedEvent, PodState, PodView};
use crate::contract::WorkerExit;
use crate::crd::{
    ANNOTATION_ABORT, ANNOTATION_PROMOTE, CrashStatus, RevisionRecord, RolloutPhase, RolloutReason,
    RolloutResult, RolloutSpec, RolloutStatus, TestRunnerPoolSpec, Workload,
};

/// Ended rollouts kept in `status.rollout.history`.
pub const HISTORY: usize = 10;

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
    /// The previous `status.rollout`; none for a new pool (or a lost status).
    pub previous: Option<&'a RolloutStatus>,
    /// The pool's stored revisions (its ControllerRevisions).
    pub stored: &'a [StoredRevision],
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
    status.reason.is_some_and(RolloutReason::is_failure) && status.phase != RolloutPhase::Promoted
}

fn since(from: Timestamp, now: Timestamp) -> Duration {
    now.duration_since(from)
        .try_into()
        .unwrap_or(Duration::ZERO)
}

fn remaining(gate: Duration, ran: Duration) -> Option<Duration> {
    (ran < gate).then(|| (gate - ran).max(Duration::from_millis(10)))
}

fn in_progress(phase: RolloutPhase) -> bool {
    matches!(phase, RolloutPhase::Progressing | RolloutPhase::Paused)
}

/// How a canary ended: as [`super::crash::ending`], but a signal is said alone.
fn exit_text(c: &CrashStatus) -> String {
    match c.signal {
        Some(sig) => format!("signal {sig}"),
        None => super::crash::ending(c, "exit"),
    }
}

/// The annotations asking for a promotion or an abort, each value acted on once.
struct Asks {
    promote: bool,
    abort: bool,
}

/// The rollout status being decided, and what the decision did on the way.
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
    /// Ends the rollout of the current target: a history record, the last
    /// [`HISTORY`] kept.
    fn end(&mut self, result: RolloutResult, why: RolloutReason) {
        let st = &mut self.st;
        st.history.push(RevisionRecord {
            revision: st.target_revision.clone(),
            image: st.target_image.clone(),
            result,
            reason: why.to_string(),
            at: Time(self.now),
        });
        let excess = st.history.len().saturating_sub(HISTORY);
        st.history.drain(..excess);
    }

    /// Holds a canary where it is: its times start over when it goes on.
    fn hold(&mut self, why: RolloutReason, message: String) {
        self.st.reason = Some(why);
        self.st.canary_since = None;
        self.st.message = message;
    }

    fn promote(&mut self, why: RolloutReason, how: String) {
        self.end(RolloutResult::Promoted, why);
        let st = &mut self.st;
        st.stable_revision = self.target_revision.clone();
        st.stable_image = self.spec.workload.image.clone();
        st.phase = RolloutPhase::Promoted;
        st.reason = Some(why);
        st.message = format!(
            "Revision {} (image {}) is promoted: {how}. Its pods replace the older ones one at a time.",
            st.stable_revision, st.stable_image
        );
        self.events.push(PlannedEvent::normal(
            EventReason::RolloutPromoted,
            EventAction::Promote,
            st.message.clone(),
        ));
    }

    fn roll_back(&mut self, why: RolloutReason, what: String) {
        self.end(RolloutResult::RolledBack, why);
        let st = &mut self.st;
        st.phase = RolloutPhase::RolledBack;
        st.reason = Some(why);
        st.message = format!(
            "{what}. Back to stable revision {} (image {}): canary pods are removed and the tickets they held go back to the queue; none is quarantined. Change spec.image to roll out a fix.",
            st.stable_revision, st.stable_image
        );
        let note = st.message.clone();
        self.events
            .push(if why == RolloutReason::AbortedByAnnotation {
                PlannedEvent::normal(EventReason::RolloutAborted, EventAction::Rollback, note)
            } else {
                PlannedEvent::warning(EventReason::RolloutFailed, EventAction::Rollback, note)
            });
        self.rolled_back = true;
    }

    /// A new revision in the spec: the rollout in progress is superseded; the spec
    /// back on the stable revision reverts, any other starts a rollout.
    fn retarget(&mut self, target: &Workload) {
        let new = self.target_revision.clone();
        if in_progress(self.st.phase) {
            let note = format!(
                "The rollout of revision {} (image {}) is superseded by revision {new} (image {})",
                self.st.target_revision, self.st.target_image, target.image
            );
            self.end(RolloutResult::Superseded, RolloutReason::Superseded);
            self.events.push(PlannedEvent::normal(
                EventReason::RolloutSuperseded,
                EventAction::Rollout,
                note,
            ));
        }
        let st = &mut self.st;
        st.target_revision = new.clone();
        st.target_image = target.image.clone();
        st.canary_since = None;
        st.canary_tickets_ok = 0;
        st.canary_crashes = 0;
        st.canary_tickets.clear();
        if new == st.stable_revision {
            st.phase = RolloutPhase::Promoted;
            st.reason = Some(RolloutReason::Reverted);
            st.started_at = None;
            st.message = format!(
                "The spec is back on stable revision {} (image {}); pods of other revisions are removed.",
                st.stable_revision, st.stable_image
            );
            let note = st.message.clone();
            self.events.push(PlannedEvent::normal(
                EventReason::RolloutReverted,
                EventAction::Rollout,
                note,
            ));
        } else {
            st.phase = RolloutPhase::Progressing;
            st.reason = Some(RolloutReason::WaitingForWork);
            st.started_at = Some(Time(self.now));
            st.message = String::new();
            let rollout = &self.spec.rollout;
            let note = format!(
                "Rolling out revision {new} (image {}): {} canary pod(s) next to stable revision {} (image {}), promoted after {} tickets",
                target.image,
                rollout.canary_workers.max(0),
                st.stable_revision,
                st.stable_image,
                rollout.promote_after_tickets.max(0)
            );
            self.events.push(PlannedEvent::normal(
                EventReason::RolloutStarted,
                EventAction::Rollout,
                note,
            ));
        }
    }
}

/// Decides the rollout step: a new pool's first revision serves at once; a new
/// revision in the spec starts (or supersedes, or reverts) a rollout; a rollout in
/// progress is steered by the annotations, the spec and its canary's evidence.
pub fn decide(input: &RolloutInput<'_>) -> RolloutDecision {
    let restored;
    let previous = match input.previous.filter(|p| stable_known(input, p)) {
        Some(previous) => previous,
        None => match restore(input) {
            Some(status) => {
                restored = status;
                &restored
            }
            None => return first_revision(input),
        },
    };
    let promote_ask = input.annotations.get(ANNOTATION_PROMOTE);
    let abort_ask = input.annotations.get(ANNOTATION_ABORT);
    let asks = Asks {
        promote: promote_ask.is_some_and(|v| Some(v) != previous.promote_token.as_ref()),
        abort: abort_ask.is_some_and(|v| Some(v) != previous.abort_token.as_ref()),
    };
    let mut out = Outcome {
        st: RolloutStatus {
            // A snapshot kept by an older operator is in a ControllerRevision by now.
            stable: None,
            ..previous.clone()
        },
        events: Vec::new(),
        rolled_back: false,
        wake_after: None,
        spec: input.spec,
        target_revision: super::revision(input.spec),
        now: input.now,
    };
    if let Some(v) = promote_ask {
        out.st.promote_token = Some(v.clone());
    }
    if let Some(v) = abort_ask {
        out.st.abort_token = Some(v.clone());
    }

    if out.target_revision != out.st.target_revision {
        out.retarget(&input.spec.workload.clone());
    }
    if in_progress(out.st.phase) {
        steer(input, &mut out, &asks);
    } else if out.st.phase == RolloutPhase::RolledBack && asks.promote {
        out.promote(
            RolloutReason::PromotedByAnnotation,
            format!("annotation {ANNOTATION_PROMOTE} overrode the rollback"),
        );
    }

    let canary = in_progress(out.st.phase).then(|| {
        (
            out.st.target_revision.clone(),
            input.spec.rollout.canary_workers.max(0) as u32,
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

/// True when what the stable revision of `previous` is built from is known: it is
/// stored, it is the spec's, or an older status kept its snapshot.
fn stable_known(input: &RolloutInput<'_>, previous: &RolloutStatus) -> bool {
    let rev = &previous.stable_revision;
    input.stored.iter().any(|r| &r.revision == rev)
        || super::revision(input.spec) == *rev
        || previous.stable.is_some()
}

/// A pool whose status was lost (wiped, restored from a backup without it, written by
/// another client) but whose ControllerRevisions say which revision is stable: that
/// revision serves on. The spec's revision, when another, is rolled out as usual, unless
/// its ControllerRevision says it was rolled back.
fn restore(input: &RolloutInput<'_>) -> Option<RolloutStatus> {
    let stable = input
        .stored
        .iter()
        .filter(|r| r.stable)
        .max_by_key(|r| r.number)?;
    let target_revision = super::revision(input.spec);
    let failed = input
        .stored
        .iter()
        .find(|r| r.revision == target_revision && !r.stable)
        .and_then(|r| r.rolled_back.as_deref());
    let image = &stable.workload.image;
    let mut status = RolloutStatus::serving(
        &stable.revision,
        image,
        RolloutReason::Restored,
        format!(
            "Revision {} (image {image}) is stable, as its ControllerRevision says: the pool's status was lost and is rebuilt.",
            stable.revision
        ),
    );
    // Annotations already there were acted on before the status was lost.
    status.promote_token = input.annotations.get(ANNOTATION_PROMOTE).cloned();
    status.abort_token = input.annotations.get(ANNOTATION_ABORT).cloned();
    if let Some(why) = failed {
        status.phase = RolloutPhase::RolledBack;
        status.reason = RolloutReason::ALL.iter().copied().find(|r| *r == why);
        status.target_revision = target_revision.clone();
        status.target_image = input.spec.workload.image.clone();
        status.message = format!(
            "Revision {target_revision} (image {}) was rolled back ({why}), as its ControllerRevision says; stable revision {} (image {}) serves. Change spec.image to roll out a fix.",
            status.target_image, status.stable_revision, status.stable_image
        );
    }
    Some(status)
}

/// A new pool: its first revision has nothing to be compared with.
fn first_revision(input: &RolloutInput<'_>) -> RolloutDecision {
    let image = &input.spec.workload.image;
    let revision = super::revision(input.spec);
    let why = RolloutReason::FirstRevision;
    let mut status = RolloutStatus::serving(
        &revision,
        image,
        why,
        format!(
            "Revision {revision} (image {image}) is the pool's first: it serves directly, and crash diagnosis protects it."
        ),
    );
    status.history.push(RevisionRecord {
        revision,
        image: image.clone(),
        result: RolloutResult::Promoted,
        reason: why.to_string(),
        at: Time(input.now),
    });
    status.promote_token = input.annotations.get(ANNOTATION_PROMOTE).cloned();
    status.abort_token = input.annotations.get(ANNOTATION_ABORT).cloned();
    RolloutDecision {
        status,
        canary: None,
        events: Vec::new(),
        rolled_back: false,
        wake_after: None,
    }
}

/// A rollout in progress: an abort or a promotion asked for, no canary, a pause, a
/// broker outage (no ticket moves: an outage must not fail or promote the canary),
/// or else the canary is judged.
fn steer(input: &RolloutInput<'_>, out: &mut Outcome<'_>, asks: &Asks) {
    let spec = input.spec;
    out.st.phase = if spec.paused {
        RolloutPhase::Paused
    } else {
        RolloutPhase::Progressing
    };
    let target = out.st.target_revision.clone();
    if asks.abort {
        out.roll_back(
            RolloutReason::AbortedByAnnotation,
            format!("The rollout of revision {target} was aborted (annotation {ANNOTATION_ABORT})"),
        );
    } else if asks.promote {
        out.promote(
            RolloutReason::PromotedByAnnotation,
            format!("annotation {ANNOTATION_PROMOTE} skipped the canary's gates"),
        );
    } else if spec.rollout.canary_workers <= 0 {
        out.promote(
            RolloutReason::NoCanary,
            "rollout.canaryWorkers is 0, so no canary judges it".into(),
        );
    } else if spec.paused {
        out.hold(
            RolloutReason::Paused,
            format!(
                "spec.paused holds the rollout of revision {target}; the canary's times start again when it resumes."
            ),
        );
    } else if input.broker_unreachable {
        out.hold(
            RolloutReason::BrokerUnreachable,
            format!(
                "The broker cannot be reached: the canary of revision {target} is judged again when it answers, its times starting over."
            ),
        );
    } else {
        judge(input, out);
    }
}

/// What the canary of `target` did since its rollout started.
struct Evidence<'a> {
    /// Its live pods.
    pods: Vec<&'a PodView>,
    /// The distinct tickets it completed (the ones counted before included).
    completed: BTreeSet<&'a str>,
    /// Its crashes (a lost broker connection is no crash).
    crashes: Vec<&'a CrashStatus>,
    /// Its crashes with no ticket in hand, but for a broker the stable workers could
    /// not reach either.
    before_consuming: Vec<&'a CrashStatus>,
    /// The tickets it crashed on that no other revision crashed on, and that are not
    /// quarantined (those are the ticket's fault).
    canary_only: BTreeSet<&'a str>,
}

impl<'a> Evidence<'a> {
    fn gather(
        input: &RolloutInput<'a>,
        target: &str,
        started: Timestamp,
        counted: &'a [String],
    ) -> Self {
        let pods = input
            .pods
            .iter()
            .filter(|p| p.revision == target)
            .filter(|p| !matches!(p.state, PodState::Terminating | PodState::Finished))
            .collect();
        let mut completed: BTreeSet<&str> = counted.iter().map(String::as_str).collect();
        completed.extend(input.completions.tickets_since(target, started));
        let crashes: Vec<&CrashStatus> = input
            .crashes
            .iter()
            .filter(|c| c.revision == target && c.at.0 >= started)
            .filter(|c| c.exit_code != 0 && c.exit_code != i32::from(WorkerExit::BrokerLost))
            .collect();
        let elsewhere = || input.crashes.iter().filter(|c| c.revision != target);
        let crashed_elsewhere: BTreeSet<&str> =
            elsewhere().filter_map(|c| c.ticket.as_deref()).collect();
        let broker_trouble_elsewhere = elsewhere().any(|c| {
            c.at.0 >= started
                && matches!(
                    WorkerExit::from_code(c.exit_code),
                    Some(WorkerExit::BrokerUnavailable | WorkerExit::BrokerLost)
                )
        });
        let before_consuming = crashes
            .iter()
            .copied()
            .filter(|c| c.ticket.is_none())
            .filter(|c| {
                !(broker_trouble_elsewhere
                    && c.exit_code == i32::from(WorkerExit::BrokerUnavailable))
            })
            .collect();
        let canary_only = crashes
            .iter()
            .filter_map(|c| c.ticket.as_deref())
            .filter(|t| !crashed_elsewhere.contains(t))
            .filter(|t| !input.quarantined.iter().any(|q| q == t))
            .collect();
        Evidence {
            pods,
            completed,
            crashes,
            before_consuming,
            canary_only,
        }
    }
}

/// Judges a running canary: fail, promote, or wait.
fn judge(input: &RolloutInput<'_>, out: &mut Outcome<'_>) {
    let now = input.now;
    let target = out.target_revision.clone();
    let started = out.st.started_at.as_ref().map(|t| t.0).unwrap_or(now);
    let counted = std::mem::take(&mut out.st.canary_tickets);
    let evidence = Evidence::gather(input, &target, started, &counted);
    // The canary's clock runs while canary pods exist (Pending ones too: an image
    // that cannot be pulled must miss the deadline).
    if evidence.pods.is_empty() {
        out.st.canary_since = None;
    } else if out.st.canary_since.is_none() {
        out.st.canary_since = Some(Time(now));
    }
    let needed = input.spec.rollout.promote_after_tickets.max(0) as usize;
    out.st.canary_tickets_ok = evidence.completed.len().min(i32::MAX as usize) as i32;
    out.st.canary_crashes = evidence.crashes.len() as i32;
    out.st.canary_tickets = evidence
        .completed
        .iter()
        .take(needed)
        .map(|t| t.to_string())
        .collect();

    let ran = out.st.canary_since.as_ref().map(|s| since(s.0, now));
    if let Some((why, what)) = failure(input, &out.st, &evidence, ran, needed) {
        fail(out, why, what);
    } else if let Some(ran) = ran {
        weigh(input, out, &evidence, ran, needed);
    } else {
        out.st.reason = Some(RolloutReason::WaitingForWork);
        out.st.message = match last_crash(&evidence) {
            None => format!(
                "Revision {target} (image {}) waits for work: its canary starts with the pool's next worker.",
                out.st.target_image
            ),
            Some(last) => format!(
                "Revision {target} (image {}) waits for work with {} canary crash(es) on record ({last}): no ticket is left to judge it by. Its canary starts with the pool's next worker; {}",
                out.st.target_image,
                evidence.crashes.len(),
                what_fails_it(&evidence)
            ),
        };
    }
}

/// The canary's last crash, for messages: `last: pod P on ticket T, exit 3`.
fn last_crash(evidence: &Evidence<'_>) -> Option<String> {
    let c = evidence.crashes.last()?;
    let on = match &c.ticket {
        Some(t) => format!("on ticket {t}"),
        None => "before taking a ticket".into(),
    };
    Some(format!("last: pod {} {on}, {}", c.pod, exit_text(c)))
}

/// What would fail a canary with crashes on record.
fn what_fails_it(evidence: &Evidence<'_>) -> String {
    format!(
        "crashes on two tickets no stable worker crashed on roll it back ({} so far).",
        evidence.canary_only.len()
    )
}

/// Why the canary failed, if it did: a crash before its consume loop, crashes on two
/// tickets of its own, or its progress deadline.
fn failure(
    input: &RolloutInput<'_>,
    st: &RolloutStatus,
    evidence: &Evidence<'_>,
    ran: Option<Duration>,
    needed: usize,
) -> Option<(RolloutReason, String)> {
    let target = &st.target_revision;
    let deadline = input.settings.progress_deadline;
    if let Some(c) = evidence.before_consuming.last() {
        Some((
            RolloutReason::CanaryCrashedBeforeConsuming,
            format!(
                "Canary pod {} of revision {target} (image {}) crashed before taking a ticket ({})",
                c.pod,
                c.image,
                exit_text(c)
            ),
        ))
    } else if evidence.canary_only.len() >= 2 {
        Some((
            RolloutReason::CanaryCrashedOnTickets,
            format!(
                "Canary pods of revision {target} (image {}) crashed on {} different tickets no stable worker crashed on ({})",
                st.target_image,
                evidence.canary_only.len(),
                evidence
                    .canary_only
                    .iter()
                    .copied()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ))
    } else if ran.is_some_and(|r| r >= deadline) {
        Some((
            RolloutReason::ProgressDeadlineExceeded,
            format!(
                "The canary of revision {target} was not promoted within rollout.progressDeadline ({}; {} of {needed} tickets completed, {} crash(es))",
                humantime::format_duration(deadline),
                evidence.completed.len(),
                evidence.crashes.len()
            ),
        ))
    } else {
        None
    }
}

/// A failed canary is rolled back; with `autoRollback` off it stays, and the failure
/// is reported once.
fn fail(out: &mut Outcome<'_>, why: RolloutReason, what: String) {
    if out.spec.rollout.auto_rollback {
        out.roll_back(why, what);
        return;
    }
    if out.st.reason != Some(why) {
        out.events.push(PlannedEvent::warning(
            EventReason::RolloutFailed,
            EventAction::Rollout,
            format!(
                "{what}; rollout.autoRollback is false, so the canary stays: annotate {ANNOTATION_ABORT} or {ANNOTATION_PROMOTE}"
            ),
        ));
    }
    out.st.reason = Some(why);
    out.st.message = format!(
        "{what}. rollout.autoRollback is false: the canary stays until annotation {ANNOTATION_ABORT} or {ANNOTATION_PROMOTE}."
    );
}

/// A canary that has not failed, running for `ran`: promoted once it completed its
/// tickets (or, with none waiting, ran quietly for `idlePromoteAfter`), after its
/// minimum time; else it runs on until the next gate opens.
fn weigh(
    input: &RolloutInput<'_>,
    out: &mut Outcome<'_>,
    evidence: &Evidence<'_>,
    ran: Duration,
    needed: usize,
) {
    let settings = input.settings;
    let done = evidence.completed.len();
    let ran_text = || humantime::format_duration(Duration::from_secs(ran.as_secs()));
    let clean = evidence.canary_only.is_empty();
    let min_time_done = ran >= settings.min_canary_time;
    let all_ready = evidence.pods.iter().all(|p| p.state == PodState::Ready);
    if clean && min_time_done && done >= needed {
        out.promote(
            RolloutReason::CanaryPassed,
            format!(
                "its canary completed {done} tickets without a crash in {}",
                ran_text()
            ),
        );
    } else if clean
        && min_time_done
        && all_ready
        && input.queue_ready == Some(0)
        && ran >= settings.idle_promote_after
    {
        out.promote(
            RolloutReason::IdlePromoted,
            format!(
                "no ticket waited, and its canary ran {} without a crash ({done} tickets completed)",
                ran_text()
            ),
        );
    } else {
        out.st.reason = Some(RolloutReason::CanaryRunning);
        let crashes = match last_crash(evidence) {
            None => "no crash".to_string(),
            Some(last) => format!("{} crash(es) ({last})", evidence.crashes.len()),
        };
        out.st.message = format!(
            "Canary of revision {} (image {}): {done} of {needed} tickets completed, {crashes}; the stable revision {} serves the rest.",
            out.st.target_revision, out.st.target_image, out.st.stable_revision
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
}

#[cfg(test)]
mod tests;
