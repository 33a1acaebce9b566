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
use crate::crd::{CrashStatus, DiagnosisStatus};

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
    /// Now.
    pub now: Timestamp,
}

/// Verdict names, also the Degraded condition's reasons and the event reasons.
pub mod verdict {
    /// Nothing wrong.
    pub const HEALTHY: &str = "Healthy";
    /// One ticket crashes every worker that takes it.
    pub const POISON_TICKET: &str = "PoisonTicket";
    /// Workers crash whatever the ticket: the image, its configuration or the cluster.
    pub const BROKEN_ENVIRONMENT: &str = "BrokenEnvironment";
    /// Workers were killed for using too much memory.
    pub const OUT_OF_MEMORY: &str = "OutOfMemory";
    /// Tickets wait and nothing moves.
    pub const QUEUE_STALLED: &str = "QueueStalled";
}

#[derive(Default)]
struct TicketCrashes<'a> {
    count: u32,
    first: Option<Timestamp>,
    revisions: BTreeSet<&'a str>,
    images: BTreeSet<&'a str>,
    last: Option<&'a CrashStatus>,
    oom: bool,
}

fn exit_text(c: &CrashStatus) -> String {
    let mut s = match c.signal {
        Some(sig) => format!("signal {sig}"),
        None => format!("exit {}", c.exit_code),
    };
    if !c.reason.is_empty() && c.reason != "Error" {
        s.push_str(&format!(" ({})", c.reason));
    }
    s
}

/// Diagnoses a pool. The result goes to `status.diagnosis`.
pub fn diagnose(input: &DiagnosisInput<'_>) -> DiagnosisStatus {
    let now = input.now;
    let window = SignedDuration::try_from(WINDOW).unwrap_or(SignedDuration::MAX);
    let recent: Vec<&CrashStatus> = input
        .crashes
        .iter()
        .filter(|c| now.duration_since(c.at.0) <= window)
        .filter(|c| c.exit_code != 0 && c.exit_code != i32::from(WorkerExit::BrokerLost))
        .filter(|c| {
            c.ticket.as_ref().is_none_or(|t| {
                !input.quarantined.contains(t)
                    && !input
                        .forgiven
                        .iter()
                        .any(|(id, at)| id == t && c.at.0 <= *at)
            })
        })
        .collect();
    let on_serving: BTreeSet<&str> = recent
        .iter()
        .filter(|c| c.revision == input.revision)
        .filter_map(|c| c.ticket.as_deref())
        .collect();
    let recent: Vec<&CrashStatus> = recent
        .into_iter()
        .filter(|c| {
            c.revision == input.revision
                || c.ticket.as_deref().is_some_and(|t| on_serving.contains(t))
        })
        .collect();

    // Per ticket, across revisions: a ticket that crashes old and new workers alike is
    // the ticket's fault, not the rollout's.
    let mut tickets: BTreeMap<&str, TicketCrashes<'_>> = BTreeMap::new();
    for c in &recent {
        if let Some(t) = c.ticket.as_deref() {
            let e = tickets.entry(t).or_default();
            e.count += 1;
            e.first = Some(e.first.map_or(c.at.0, |f| f.min(c.at.0)));
            e.revisions.insert(&c.revision);
            e.images.insert(&c.image);
            e.last = Some(c);
            e.oom |= c.reason == "OOMKilled";
        }
    }
    // The environment is judged on the current revision, by the crashes since the last
    // ticket it completed.
    let recovered_at = input.completions.last(input.revision);
    let env: Vec<&&CrashStatus> = recent
        .iter()
        .filter(|c| c.revision == input.revision)
        .filter(|c| recovered_at.is_none_or(|r| c.at.0 > r))
        .collect();
    let pre_loop: Vec<&&&CrashStatus> = env.iter().filter(|c| c.ticket.is_none()).collect();
    let distinct: BTreeSet<&str> = env.iter().filter_map(|c| c.ticket.as_deref()).collect();
    let oom_on_rev = env.iter().any(|c| c.reason == "OOMKilled");
    // Other tickets completing on the revisions a ticket crashed, within the window,
    // clear the environment and put the blame on the ticket.
    let completed_within = |revisions: &BTreeSet<&str>| {
        revisions
            .iter()
            .filter_map(|r| input.completions.last(r))
            .any(|c| now.duration_since(c) <= window)
    };
    let threshold = input.crashes_to_quarantine.max(1);
    let worst = tickets
        .iter()
        .filter(|(_, t)| t.count >= threshold)
        .max_by_key(|(id, t)| (t.count, std::cmp::Reverse(*id)));

    let progress = last_progress(input);
    let mut out = DiagnosisStatus {
        verdict: verdict::HEALTHY.into(),
        message: String::new(),
        ticket: None,
        since: None,
        last_progress_time: progress.map(Time),
    };
    let oom_note = " Workers were killed for using too much memory (OOMKilled): raise spec.template.resources.limits.memory if the tests need it.";

    if let Some(last) = pre_loop.last() {
        out.verdict = verdict::BROKEN_ENVIRONMENT.into();
        let what = match last.state.as_deref() {
            Some(s) if s != "starting" && s != "idle" => s.to_string(),
            _ => "before taking a ticket".to_string(),
        };
        out.message = format!(
            "{} worker crash(es) with no ticket in hand on image {} ({what}, last {}); tickets are held in the queue until the image or its configuration changes.",
            pre_loop.len(),
            last.image,
            exit_text(last)
        );
    } else if let Some((id, t)) = worst.filter(|(_, t)| completed_within(&t.revisions)) {
        out.verdict = verdict::POISON_TICKET.into();
        out.ticket = Some(id.to_string());
        out.message = format!(
            "Ticket {id} crashed {} workers (images {}; last {}) while other tickets completed: it is a poison ticket.",
            t.count,
            t.images.iter().copied().collect::<Vec<_>>().join(", "),
            t.last.map(exit_text).unwrap_or_default()
        );
        if t.oom {
            out.message.push_str(oom_note);
        }
    } else if distinct.len() >= 2 || worst.is_some() {
        out.verdict = verdict::BROKEN_ENVIRONMENT.into();
        let last = env.last().map(|c| (c.image.clone(), exit_text(c)));
        let (image, exit) = last.unwrap_or_default();
        out.message = if distinct.len() >= 2 {
            format!(
                "Workers on image {image} crashed on {} different tickets and completed none since (last {exit}); tickets are held in the queue, none is quarantined.",
                distinct.len()
            )
        } else {
            let (id, t) = worst.expect("checked");
            format!(
                "Ticket {id} crashed {} workers and no other ticket completed on this revision, so the ticket cannot be blamed; it is held in the queue until workers complete other tickets or the image changes.",
                t.count
            )
        };
        if oom_on_rev {
            out.message.push_str(oom_note);
        }
    } else if let Some(c) = env.iter().rev().find(|c| c.reason == "OOMKilled") {
        out.verdict = verdict::OUT_OF_MEMORY.into();
        out.message = format!(
            "Worker pod {} was killed for using too much memory (OOMKilled){}; raise spec.template.resources.limits.memory if the tests need it.",
            c.pod,
            c.ticket
                .as_deref()
                .map(|t| format!(" on ticket {t}"))
                .unwrap_or_default()
        );
    } else if let (Some(ready), Some(since), false) = (input.queue_ready, progress, input.paused) {
        let stall = SignedDuration::try_from(input.stall_timeout).unwrap_or(SignedDuration::MAX);
        if ready > 0 && now.duration_since(since) >= stall {
            out.verdict = verdict::QUEUE_STALLED.into();
            out.message = format!(
                "{ready} tickets are ready and no ticket was taken or finished for {} (poison.stallTimeout {:?}).",
                SignedDuration::from_secs(now.duration_since(since).as_secs()),
                input.stall_timeout
            );
        }
    }
    out.since = match input.previous {
        Some(p) if p.verdict == out.verdict && p.ticket == out.ticket => p.since.clone(),
        _ => Some(Time(now)),
    };
    out
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
