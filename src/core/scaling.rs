//! How many workers a pool needs, and which pods to add or remove.
//!
//! See docs/scaling.md for the accounting in words.

use std::time::Duration;

use jiff::Timestamp;

use super::{BrokerView, PodState, PodView};
use crate::crd::TestRunnerPoolSpec;

/// What the scaling decision needs.
pub struct ScalingInput<'a> {
    /// The pool spec.
    pub spec: &'a TestRunnerPoolSpec,
    /// The pool's pods.
    pub pods: &'a [PodView],
    /// Pods deleted for another reason (stuck on a quarantined ticket): counted as gone.
    pub leaving: &'a [String],
    /// The last queue probe.
    pub broker: &'a BrokerView,
    /// False when the spec has a problem: then nothing is created or deleted.
    pub config_ok: bool,
    /// The revision that serves tickets (the stable one): new pods get it, and pods of
    /// other revisions are replaced by it.
    pub revision: &'a str,
    /// While a canary runs: its revision and how many canary pods it wants, on top of
    /// the desired workers.
    pub canary: Option<(&'a str, u32)>,
    /// Since when the pool has had a surplus (from the previous status).
    pub surplus_since: Option<Timestamp>,
    /// `spec.scaling.scaleDownDelay`, parsed.
    pub scale_down_delay: Duration,
    /// An upper bound on desired workers below maxWorkers (a broken environment).
    pub cap: Option<i32>,
    /// A revision whose pods go even while busy (a canary that was rolled back):
    /// they drain the ticket in hand within their grace period.
    pub discard: Option<&'a str>,
    /// The time of this decision.
    pub now: Timestamp,
}

/// The scaling decision.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// Workers wanted: those the queue needs, plus the canaries.
    pub desired: i32,
    /// Live worker pods (not terminating, not finished), Pending ones included.
    pub current: i32,
    /// Ready worker pods.
    pub ready: i32,
    /// Worker pods running a ticket, as their workers reported.
    pub busy: i32,
    /// Tickets ready in the queue at the last probe (0 when unknown).
    pub queue_ready: u64,
    /// Pods of the serving revision to create.
    pub create: u32,
    /// Canary pods to create.
    pub create_canary: u32,
    /// `create` is the one extra pod that replaces an old one, not a scale-up.
    pub replacing: bool,
    /// Pods to delete (finished pods, surplus, replaced revisions).
    pub delete: Vec<String>,
    /// How many of `delete` are a scale-down (not clean-up or replacement).
    pub scaled_down: u32,
    /// The surplus timer to keep in status.
    pub surplus_since: Option<Timestamp>,
    /// Time left before a pending scale-down happens.
    pub scale_down_wait: Option<Duration>,
}

/// desired = clamp(max(ceil((ready + in_flight) / ticketsPerWorker), busy), min, max).
///
/// In flight are the tickets workers hold: the workers that reported a ticket in hand
/// (`busy`), or, with prefetch 1, every consumer while tickets wait (a passive
/// declare counts ready messages only, so the broker cannot tell in-flight tickets
/// once none is ready). Busy workers are always among the desired ones: a pool never
/// wants fewer workers than are running tickets.
pub fn desired_workers(spec: &TestRunnerPoolSpec, ready: u64, consumers: u64, busy: u64) -> i32 {
    let in_flight = if ready > 0 { consumers.max(busy) } else { busy };
    let per_worker = spec.scaling.tickets_per_worker.max(1) as u64;
    let wanted = (ready + in_flight).div_ceil(per_worker).max(busy);
    clamp(spec, wanted.min(i32::MAX as u64) as i32)
}

fn clamp(spec: &TestRunnerPoolSpec, n: i32) -> i32 {
    let max = spec.scaling.max_workers.max(0);
    let min = spec.scaling.min_workers.clamp(0, max);
    n.clamp(min, max)
}

/// Order in which surplus pods go: Pending first, then not ready, then outdated
/// revisions, then the youngest.
fn removal_order(pods: &mut [&PodView], revision: &str) {
    pods.sort_by(|a, b| {
        let rank = |p: &PodView| match p.state {
            PodState::Pending => 0,
            PodState::Starting => 1,
            _ => 2,
        };
        rank(a)
            .cmp(&rank(b))
            .then_with(|| (a.revision == revision).cmp(&(b.revision == revision)))
            .then_with(|| b.created.cmp(&a.created))
            .then_with(|| a.name.cmp(&b.name))
    });
}

/// The pool's live pods, as the decision sorts them.
struct Live<'a> {
    /// Live pods (not terminating, not finished, not leaving).
    count: i32,
    /// Ready ones.
    ready: i32,
    /// Busy ones.
    busy: i32,
    /// The canaries among them.
    canaries: Vec<&'a PodView>,
    /// The others: the pods that serve.
    main: Vec<&'a PodView>,
}

impl<'a> Live<'a> {
    fn sort(input: &ScalingInput<'a>) -> Self {
        let live: Vec<&PodView> = input
            .pods
            .iter()
            .filter(|p| !matches!(p.state, PodState::Terminating | PodState::Finished))
            .filter(|p| !input.leaving.contains(&p.name))
            .collect();
        let is_canary = |p: &PodView| input.canary.is_some_and(|(rev, _)| p.revision == rev);
        let (canaries, main) = live.iter().copied().partition(|p| is_canary(p));
        Live {
            count: live.len() as i32,
            ready: live.iter().filter(|p| p.state == PodState::Ready).count() as i32,
            busy: live.iter().filter(|p| p.busy()).count() as i32,
            canaries,
            main,
        }
    }
}

/// Pods whose removal cannot interrupt a ticket; a discarded revision goes anyway.
fn removable(input: &ScalingInput<'_>, p: &PodView) -> bool {
    p.removable() || input.discard == Some(p.revision.as_str())
}

/// Canary pods wanted while `serving` pods serve: none for a pool without workers.
fn canary_for(input: &ScalingInput<'_>, serving: i32) -> i32 {
    match input.canary {
        Some((_, n)) if serving > 0 => n as i32,
        _ => 0,
    }
}

/// Decides the pods to create and delete.
///
/// Canary pods run on top of the desired workers. The other pods serve the stable
/// revision; pods of other revisions among them are replaced: surplus ones go at once
/// (not-ready ones first, ready ones while the ready serving pods cover the desired
/// count), else one pod of the stable revision is added and one old pod drains once
/// it is ready.
pub fn decide(input: &ScalingInput<'_>) -> Decision {
    let spec = input.spec;
    let live = Live::sort(input);
    let main_current = live.main.len() as i32;
    let (wanted, queue_ready) = match input.broker {
        BrokerView::Depth {
            ready, consumers, ..
        } => (
            desired_workers(spec, *ready, *consumers, live.busy as u64),
            *ready,
        ),
        // Without numbers, hold what runs: never scale to zero on an error.
        _ => (clamp(spec, main_current), 0),
    };
    let wanted = input.cap.map_or(wanted, |cap| wanted.min(cap));
    let mut decision = Decision {
        desired: wanted,
        current: live.count,
        ready: live.ready,
        busy: live.busy,
        queue_ready,
        create: 0,
        create_canary: 0,
        replacing: false,
        delete: input
            .pods
            .iter()
            .filter(|p| p.state == PodState::Finished)
            .map(|p| p.name.clone())
            .collect(),
        scaled_down: 0,
        surplus_since: None,
        scale_down_wait: None,
    };
    if spec.paused || !input.config_ok {
        decision.desired = wanted + canary_for(input, wanted.max(main_current));
        return decision;
    }
    let serving = serve(input, &live.main, wanted, &mut decision);
    decision.desired = wanted + canaries(input, &live.canaries, wanted, serving, &mut decision);
    decision
}

/// The serving pods: the missing ones are created, pods of other revisions replaced,
/// and a surplus removed once the scale-down delay has passed. Returns how many will
/// serve.
fn serve(input: &ScalingInput<'_>, main: &[&PodView], wanted: i32, decision: &mut Decision) -> i32 {
    let current = main.len() as i32;
    let fresh: Vec<&PodView> = main
        .iter()
        .copied()
        .filter(|p| p.revision == input.revision)
        .collect();
    let fresh_ready = fresh.iter().filter(|p| p.state == PodState::Ready).count() as i32;
    let mut outdated: Vec<&PodView> = main
        .iter()
        .copied()
        .filter(|p| p.revision != input.revision)
        .collect();
    removal_order(&mut outdated, input.revision);
    if current < wanted {
        decision.create = (wanted - current) as u32;
        wanted
    } else if !outdated.is_empty() && current > wanted {
        current
            - drain_outdated(
                input,
                &outdated,
                current - wanted,
                wanted,
                fresh_ready,
                decision,
            )
    } else if !outdated.is_empty()
        && current == wanted
        && fresh_ready == fresh.len() as i32
        && wanted > 0
    {
        // A replaced revision: one extra pod of the serving revision; once it is
        // ready, the surplus rule above drains one old pod.
        decision.create = 1;
        decision.replacing = true;
        current + 1
    } else if current > wanted {
        current - scale_down(input, main, (current - wanted) as usize, decision)
    } else {
        current
    }
}

/// Surplus old pods go now: not-ready ones freely, ready ones while the ready pods
/// left still cover what the queue needs; busy ones are replaced once their ticket is
/// done. Returns how many go.
fn drain_outdated(
    input: &ScalingInput<'_>,
    outdated: &[&PodView],
    surplus: i32,
    wanted: i32,
    fresh_ready: i32,
    decision: &mut Decision,
) -> i32 {
    let outdated_ready = outdated
        .iter()
        .filter(|p| p.state == PodState::Ready)
        .count() as i32;
    let spare_ready = (fresh_ready + outdated_ready - wanted).max(0);
    let (mut ready_taken, mut gone) = (0, 0);
    for p in outdated {
        if gone == surplus {
            break;
        }
        if !removable(input, p) {
            continue;
        }
        if p.state == PodState::Ready {
            if ready_taken == spare_ready {
                continue;
            }
            ready_taken += 1;
        }
        decision.delete.push(p.name.clone());
        gone += 1;
    }
    gone
}

/// A surplus of `surplus` serving pods goes once it has lasted the scale-down delay;
/// until then the timer runs. Only pods that hold no ticket go; busy ones stay until
/// they are done, and the timer stays set so that they go as soon as they are.
/// Returns how many go.
fn scale_down(
    input: &ScalingInput<'_>,
    main: &[&PodView],
    surplus: usize,
    decision: &mut Decision,
) -> i32 {
    let since = input.surplus_since.unwrap_or(input.now);
    let waited = input.now.duration_since(since);
    let delay =
        jiff::SignedDuration::try_from(input.scale_down_delay).unwrap_or(jiff::SignedDuration::MAX);
    if waited < delay {
        decision.surplus_since = Some(since);
        decision.scale_down_wait = Some(
            (delay - waited)
                .try_into()
                .unwrap_or(Duration::from_secs(1))
                .max(Duration::from_millis(10)),
        );
        return 0;
    }
    let mut candidates: Vec<&PodView> = main
        .iter()
        .copied()
        .filter(|p| removable(input, p))
        .collect();
    removal_order(&mut candidates, input.revision);
    let gone = surplus.min(candidates.len());
    decision
        .delete
        .extend(candidates.iter().take(gone).map(|p| p.name.clone()));
    decision.scaled_down = gone as u32;
    if gone < surplus {
        decision.surplus_since = Some(since);
    }
    gone as i32
}

/// Canaries run while the pool has work or workers, within the surge bound: at most
/// maxWorkers + canaryWorkers + 1 pods (pods left over from an earlier rollout can
/// take some of that room for a while). Returns how many canaries are wanted.
fn canaries(
    input: &ScalingInput<'_>,
    canaries: &[&PodView],
    wanted: i32,
    serving: i32,
    decision: &mut Decision,
) -> i32 {
    let bound = input.spec.scaling.max_workers.max(0) + 1 + canary_for(input, 1);
    let canary_wanted = canary_for(input, wanted.max(serving)).min((bound - serving).max(0));
    let have = canaries.len() as i32;
    if have < canary_wanted {
        decision.create_canary = (canary_wanted - have) as u32;
    } else if have > canary_wanted {
        let mut order: Vec<&PodView> = canaries
            .iter()
            .copied()
            .filter(|p| removable(input, p))
            .collect();
        removal_order(&mut order, "");
        decision.delete.extend(
            order
                .iter()
                .take((have - canary_wanted) as usize)
                .map(|p| p.name.clone()),
        );
    }
    canary_wanted
}
