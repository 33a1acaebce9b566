//! Crash diagnosis: from the recorded crashes, ticket completions and queue progress,
//! tell a poison ticket from a broken environment, say when memory runs out, and
//! notice a queue that stopped moving. Pure: the time is an argument.
//!
//! See docs/diagnosis.md for the rules in words.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::crash::{CrashRecord, InHand};
use crate::contract::WorkerExit;
use crate::crd::{CrashStatus, DiagnosisStatus, Verdict};

/// Crashes kept in status.
pub const MAX_CRASHES: usize = 20;
/// Crashes older than this no longer count.
pub const WINDOW: Duration = Duration::from_secs(3600);

/// Ticket completions the workers reported, per revision.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Completions {
    /// Last completion time per revision.
    pub last_by_revision: BTreeMap<String, Timestamp>,
    /// Recent tickets whose tests ran to the end, per revision, oldest first (at most
    /// [`TICKETS_KEPT`] each): the canary's evidence.
    pub tickets_by_revision: BTreeMap<String, Vec<(String, Timestamp)>>,
}

/// Revisions whose completions are remembered.
pub const REVISIONS_KEPT: usize = 16;
/// Completed tickets remembered per revision: as many as the largest canary gate
/// (`rollout.promoteAfterTickets` is at most 100). The shell copies them into every
/// reconcile, so they stay few.
pub const TICKETS_KEPT: usize = 100;

impl Completions {
    /// Records one outcome report: a completion on `revision` at `at`, of `ticket`
    /// when its tests ran (not when the worker only moved it to quarantine). Only the
    /// most recent revisions are kept.
    pub fn record(&mut self, revision: &str, ticket: Option<&str>, at: Timestamp) {
        self.last_by_revision.insert(revision.to_string(), at);
        if let Some(ticket) = ticket {
            let list = self
                .tickets_by_revision
                .entry(revision.to_string())
                .or_default();
            list.push((ticket.to_string(), at));
            let excess = list.len().saturating_sub(TICKETS_KEPT);
            list.drain(..excess);
        }
        while self.last_by_revision.len() > REVISIONS_KEPT {
            let oldest = self
                .last_by_revision
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(r, _)| r.clone())
                .expect("not empty");
            self.last_by_revision.remove(&oldest);
            self.tickets_by_revision.remove(&oldest);
        }
    }

    /// Tickets completed on `revision` at or after `since`.
    pub fn tickets_since<'a>(
        &'a self,
        revision: &str,
        since: Timestamp,
    ) -> impl Iterator<Item = &'a str> + 'a {
        self.tickets_by_revision
            .get(revision)
            .into_iter()
            .flatten()
            .filter(move |(_, at)| *at >= since)
            .map(|(t, _)| t.as_str())
    }

    /// The last completion on `revision`.
    pub fn last(&self, revision: &str) -> Option<Timestamp> {
        self.last_by_revision.get(revision).copied()
    }

    /// The most recent completion on any revision.
    pub fn latest(&self) -> Option<Timestamp> {
        self.last_by_revision.values().max().copied()
    }
}

/// The status form of a crash record.
pub fn crash_status(r: &CrashRecord) -> CrashStatus {
    let (ticket, delivery, state) = match &r.in_hand {
        InHand::Ticket { id, delivery } => (Some(id.clone()), Some(*delivery as i64), None),
        InHand::Starting => (None, None, Some("starting".to_string())),
        InHand::Idle => (None, None, Some("idle".to_string())),
        InHand::Environment(why) => (None, None, Some(why.clone())),
        InHand::Unknown => (None, None, None),
    };
    CrashStatus {
        id: r.id.clone(),
        pod: r.pod.clone(),
        revision: r.revision.clone(),
        image: r.image.clone(),
        ticket,
        delivery,
        state,
        exit_code: r.exit_code,
        signal: r.signal,
        reason: r.reason.clone(),
        at: Time(r.at),
    }
}

/// Adds the terminations seen on pods to the recorded history, each once: returns
/// the new history (newest last, at most [`MAX_CRASHES`]) and the crashes not seen
/// before. With a full history, a termination older than everything kept was
/// recorded and dropped already.
pub fn merge_crashes(
    history: &[CrashStatus],
    seen: &[CrashRecord],
) -> (Vec<CrashStatus>, Vec<CrashStatus>) {
    let known: BTreeSet<&str> = history.iter().map(|c| c.id.as_str()).collect();
    let watermark = (history.len() >= MAX_CRASHES)
        .then(|| history.iter().map(|c| c.at.0).min())
        .flatten();
    let mut fresh: Vec<CrashStatus> = seen
        .iter()
        .filter(|r| !known.contains(r.id.as_str()))
        .filter(|r| watermark.is_none_or(|w| r.at > w))
        .map(crash_status)
        .collect();
    fresh.sort_by(|a, b| a.at.0.cmp(&b.at.0).then_with(|| a.id.cmp(&b.id)));
    fresh.dedup_by(|a, b| a.id == b.id);
    let mut all: Vec<CrashStatus> = history
        .iter()
        .cloned()
        .chain(fresh.iter().cloned())
        .collect();
    all.sort_by(|a, b| a.at.0.cmp(&b.at.0).then_with(|| a.id.cmp(&b.id)));
    let excess = all.len().saturating_sub(MAX_CRASHES);
    all.drain(..excess);
    (all, fresh)
}

/// What the diagnosis needs.
pub struct DiagnosisInput<'a> {
    /// Crash history, merged.
    pub crashes: &'a [CrashStatus],
    /// The revision that serves tickets (the stable one). Crashes on other revisions
    /// (a canary, pods being replaced) count only against tickets that crashed this
    /// one too: the rest are the rollout's business.
    pub revision: &'a str,
    /// Reported ticket completions.
    pub completions: &'a Completions,
    /// `poison.crashesToQuarantine`.
    pub crashes_to_quarantine: u32,
    /// Tickets already quarantined: their crashes are explained.
    pub quarantined: &'a [String],
    /// Tickets returned from quarantine, and when: earlier crashes no longer count.
    pub forgiven: &'a [(String, Timestamp)],
    /// `poison.stallTimeout`, parsed.
    pub stall_timeout: Duration,
    /// Ready tickets now, when the broker answered.
    pub queue_ready: Option<u64>,
    /// Ready tickets at the previous status, when known.
    pub previous_ready: Option<i64>,
    /// The previous diagnosis.
    pub previous: Option<&'a DiagnosisStatus>,
    /// True when the pool is paused (a paused pool is not stalled).
    pub paused: bool,
    /// When the operator last reached the broker (its last probe that got an answer).
    pub broker_reached_at: Option<Timestamp>,
    /// When the broker became reachable again after the operator last lost it.
    pub broker_back_at: Option<Timestamp>,
    /// Now.
    pub now: Timestamp,
}

/// Crashes of one ticket, across revisions.
#[derive(Default)]
struct TicketCrashes<'a> {
    count: u32,
    revisions: BTreeSet<&'a str>,
    images: BTreeSet<&'a str>,
    last: Option<&'a CrashStatus>,
    oom: bool,
}

/// How a worker ended, for diagnosis messages.
fn exit_text(c: &CrashStatus) -> String {
    super::crash::ending(c, "exit")
}

const OOM_NOTE: &str = " Workers were killed for using too much memory (OOMKilled): raise spec.template.resources.limits.memory if the tests need it.";

/// The crashes a diagnosis weighs.
struct Evidence<'a> {
    /// The serving revision's crashes since the last ticket it completed: the
    /// environment is judged by these.
    env: Vec<&'a CrashStatus>,
    /// The ticket that crashed the most workers, at least `crashesToQuarantine`,
    /// counted across revisions: a ticket that crashes old and new workers alike is the
    /// ticket's fault, not the rollout's.
    worst: Option<(&'a str, &'a TicketCrashes<'a>)>,
}

/// The crashes that count: within the [`WINDOW`], real crashes (not a clean exit nor a
/// lost broker connection), not on a ticket that is quarantined or was replayed since,
/// and on the serving revision or on a ticket that crashed it too.
fn counted<'a>(
    input: &DiagnosisInput<'a>,
    window: SignedDuration,
    broken_until: Option<Timestamp>,
) -> Vec<&'a CrashStatus> {
    let forgiven = |c: &CrashStatus, t: &String| {
        input.quarantined.contains(t)
            || input
                .forgiven
                .iter()
                .any(|(id, at)| id == t && c.at.0 <= *at)
    };
    let recent: Vec<&CrashStatus> = input
        .crashes
        .iter()
        .filter(|c| input.now.duration_since(c.at.0) <= window)
        // Crashes of a broken environment, once it works again, blame no ticket.
        .filter(|c| broken_until.is_none_or(|b| c.at.0 > b))
        .filter(|c| c.exit_code != 0 && c.exit_code != i32::from(WorkerExit::BrokerLost))
        // A broker outage the operator saw too is not the environment's fault.
        .filter(|c| c.exit_code != i32::from(WorkerExit::BrokerUnavailable) || unexcused(input, c))
        .filter(|c| c.ticket.as_ref().is_none_or(|t| !forgiven(c, t)))
        .collect();
    let on_serving: BTreeSet<&str> = recent
        .iter()
        .filter(|c| c.revision == input.revision)
        .filter_map(|c| c.ticket.as_deref())
        .collect();
    recent
        .into_iter()
        .filter(|c| {
            c.revision == input.revision
                || c.ticket.as_deref().is_some_and(|t| on_serving.contains(t))
        })
        .collect()
}

/// A worker that could not reach the broker (exit 69) is the environment's fault only
/// when the operator reached the broker after it, and not just after an outage it saw
/// too: until then the broker is down for everyone.
///
/// Kubernetes records a container's end in whole seconds: the crash may have come up to
/// a second after its recorded time, so the operator must have reached the broker more
/// than a second after it.
fn unexcused(input: &DiagnosisInput<'_>, c: &CrashStatus) -> bool {
    let after = c.at.0 + SignedDuration::from_secs(1);
    input.broker_reached_at.is_some_and(|r| after < r)
        && input.broker_back_at.is_none_or(|b| c.at.0 > b)
}

fn tally<'a>(crashes: &[&'a CrashStatus]) -> BTreeMap<&'a str, TicketCrashes<'a>> {
    let mut tickets: BTreeMap<&str, TicketCrashes<'_>> = BTreeMap::new();
    for c in crashes {
        if let Some(t) = c.ticket.as_deref() {
            let e = tickets.entry(t).or_default();
            e.count += 1;
            e.revisions.insert(&c.revision);
            e.images.insert(&c.image);
            e.last = Some(c);
            e.oom |= c.reason == "OOMKilled";
        }
    }
    tickets
}

/// A diagnosis other than Healthy.
struct Finding {
    verdict: Verdict,
    ticket: Option<String>,
    message: String,
}

impl Finding {
    fn new(verdict: Verdict, message: String) -> Self {
        Finding {
            verdict,
            ticket: None,
            message,
        }
    }
}

/// Diagnoses a pool. The result goes to `status.diagnosis`.
pub fn diagnose(input: &DiagnosisInput<'_>) -> DiagnosisStatus {
    let window = SignedDuration::try_from(WINDOW).unwrap_or(SignedDuration::MAX);
    let recovered_at = input.completions.last(input.revision);
    let broken_until = broken_until(input.previous, recovered_at);
    let crashes = counted(input, window, broken_until);
    let tickets = tally(&crashes);
    let env = crashes
        .iter()
        .copied()
        .filter(|c| c.revision == input.revision)
        .filter(|c| recovered_at.is_none_or(|r| c.at.0 > r))
        .collect();
    let threshold = input.crashes_to_quarantine.max(1);
    let worst = tickets
        .iter()
        .filter(|(_, t)| t.count >= threshold)
        .max_by_key(|(id, t)| (t.count, std::cmp::Reverse(*id)))
        .map(|(id, t)| (*id, t));
    let evidence = Evidence { env, worst };
    let progress = last_progress(input);
    let finding = broken_before_consuming(&evidence)
        .or_else(|| poison(input, &evidence, window))
        .or_else(|| broken_across_tickets(&evidence))
        .or_else(|| out_of_memory(&evidence))
        .or_else(|| stalled(input, progress));
    let Finding {
        verdict,
        ticket,
        message,
    } = finding.unwrap_or_else(|| Finding::new(Verdict::Healthy, String::new()));
    let since = match input.previous {
        Some(p) if p.verdict == verdict && p.ticket == ticket => p.since.clone(),
        _ => Some(Time(input.now)),
    };
    DiagnosisStatus {
        verdict,
        message,
        ticket,
        since,
        last_progress_time: progress.map(Time),
        broken_until: broken_until.map(Time),
    }
}

/// When the pool last came out of a broken environment: the first completion on the
/// serving revision after a `BrokenEnvironment` verdict began, else what the previous
/// diagnosis said. Every ticket crashed while the environment was broken, so the
/// completions after it do not make the ticket that crashed most a poison ticket.
fn broken_until(
    previous: Option<&DiagnosisStatus>,
    recovered_at: Option<Timestamp>,
) -> Option<Timestamp> {
    let earlier = previous.and_then(|p| p.broken_until.as_ref()).map(|t| t.0);
    match (previous, recovered_at) {
        (Some(p), Some(r))
            if p.verdict == Verdict::BrokenEnvironment
                && p.since.as_ref().is_none_or(|s| r > s.0) =>
        {
            Some(r)
        }
        _ => earlier,
    }
}

/// BrokenEnvironment: workers of the serving revision crash with no ticket in hand.
fn broken_before_consuming(evidence: &Evidence<'_>) -> Option<Finding> {
    let pre_loop: Vec<&CrashStatus> = evidence
        .env
        .iter()
        .copied()
        .filter(|c| c.ticket.is_none())
        .collect();
    let last = pre_loop.last()?;
    let what = match last.state.as_deref() {
        Some(s) if s != "starting" && s != "idle" => s.to_string(),
        _ => "before taking a ticket".to_string(),
    };
    Some(Finding::new(
        Verdict::BrokenEnvironment,
        format!(
            "{} worker crash(es) with no ticket in hand on image {} ({what}, last {}); tickets are held in the queue until the image or its configuration changes.",
            pre_loop.len(),
            last.image,
            exit_text(last)
        ),
    ))
}

/// PoisonTicket: a ticket crashed enough workers while other tickets completed on the
/// revisions it crashed, within the window.
fn poison(
    input: &DiagnosisInput<'_>,
    evidence: &Evidence<'_>,
    window: SignedDuration,
) -> Option<Finding> {
    let completed_within = |revisions: &BTreeSet<&str>| {
        revisions
            .iter()
            .filter_map(|r| input.completions.last(r))
            .any(|c| input.now.duration_since(c) <= window)
    };
    let (id, t) = evidence
        .worst
        .filter(|(_, t)| completed_within(&t.revisions))?;
    let mut message = format!(
        "Ticket {id} crashed {} workers (images {}; last {}) while other tickets completed: it is a poison ticket.",
        t.count,
        t.images.iter().copied().collect::<Vec<_>>().join(", "),
        t.last.map(exit_text).unwrap_or_default()
    );
    if t.oom {
        message.push_str(OOM_NOTE);
    }
    Some(Finding {
        ticket: Some(id.to_string()),
        ..Finding::new(Verdict::PoisonTicket, message)
    })
}

/// BrokenEnvironment: crashes on several tickets with none completed since, or one
/// ticket crashing workers with no other completing (it cannot be blamed).
fn broken_across_tickets(evidence: &Evidence<'_>) -> Option<Finding> {
    let distinct: BTreeSet<&str> = evidence
        .env
        .iter()
        .filter_map(|c| c.ticket.as_deref())
        .collect();
    let mut message = if distinct.len() >= 2 {
        let last = evidence.env.last().map(|c| (c.image.clone(), exit_text(c)));
        let (image, exit) = last.unwrap_or_default();
        format!(
            "Workers on image {image} crashed on {} different tickets and completed none since (last {exit}); tickets are held in the queue, none is quarantined.",
            distinct.len()
        )
    } else {
        let (id, t) = evidence.worst?;
        format!(
            "Ticket {id} crashed {} workers and no other ticket completed on this revision, so the ticket cannot be blamed; it is held in the queue until workers complete other tickets or the image changes.",
            t.count
        )
    };
    if evidence.env.iter().any(|c| c.reason == "OOMKilled") {
        message.push_str(OOM_NOTE);
    }
    Some(Finding::new(Verdict::BrokenEnvironment, message))
}

/// OutOfMemory: a worker of the serving revision was OOMKilled.
fn out_of_memory(evidence: &Evidence<'_>) -> Option<Finding> {
    let c = evidence
        .env
        .iter()
        .rev()
        .find(|c| c.reason == "OOMKilled")?;
    Some(Finding::new(
        Verdict::OutOfMemory,
        format!(
            "Worker pod {} was killed for using too much memory (OOMKilled){}; raise spec.template.resources.limits.memory if the tests need it.",
            c.pod,
            c.ticket
                .as_deref()
                .map(|t| format!(" on ticket {t}"))
                .unwrap_or_default()
        ),
    ))
}

/// QueueStalled: tickets are ready and the queue made no progress for
/// `poison.stallTimeout` (a paused pool is not stalled).
fn stalled(input: &DiagnosisInput<'_>, progress: Option<Timestamp>) -> Option<Finding> {
    let (Some(ready), Some(since), false) = (input.queue_ready, progress, input.paused) else {
        return None;
    };
    let stall = SignedDuration::try_from(input.stall_timeout).unwrap_or(SignedDuration::MAX);
    let waited = input.now.duration_since(since);
    (ready > 0 && waited >= stall).then(|| {
        Finding::new(
            Verdict::QueueStalled,
            format!(
                "{ready} tickets are ready and no ticket was taken or finished for {} (poison.stallTimeout {:?}).",
                SignedDuration::from_secs(waited.as_secs()),
                input.stall_timeout
            ),
        )
    })
}

/// When the queue last moved while tickets waited: none while no ticket waits; now
/// when tickets start to wait, when fewer are ready than before (one was taken), or
/// when a ticket was completed since; else as before. It changes only when the ready
/// count or the completions do, so it causes no status write of its own.
fn last_progress(input: &DiagnosisInput<'_>) -> Option<Timestamp> {
    let previous = input
        .previous
        .and_then(|p| p.last_progress_time.as_ref())
        .map(|t| t.0);
    let Some(ready) = input.queue_ready else {
        return previous;
    };
    if ready == 0 {
        return None;
    }
    let moved = input
        .previous_ready
        .is_none_or(|p| p == 0 || (ready as i64) < p)
        || input
            .completions
            .latest()
            .is_some_and(|c| previous.is_none_or(|p| c > p));
    match previous {
        Some(p) if !moved => Some(p),
        _ => Some(input.now),
    }
}

#[cfg(test)]
mod tests;
