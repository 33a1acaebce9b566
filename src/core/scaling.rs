//! How many workers a pool needs, and which pods to add or remove.
//!
//! See docs/scaling.md for the accounting in words.

use std::time::Duration;

use jiff::Timestamp;

use super::diagnosis::{Completions, TICKETS_KEPT};
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
    /// Idle workers to keep warm on top of what the queue needs ([`warm_workers`]).
    pub warm: u32,
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
    /// Idle workers kept warm, counted in `desired`.
    pub warm: i32,
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
    clamp(spec, needed_workers(spec, ready, consumers, busy))
}

/// The workers the tickets need, before the bounds.
fn needed_workers(spec: &TestRunnerPoolSpec, ready: u64, consumers: u64, busy: u64) -> i32 {
    let in_flight = if ready > 0 { consumers.max(busy) } else { busy };
    let per_worker = spec.scaling.tickets_per_worker.max(1) as u64;
    let wanted = (ready + in_flight).div_ceil(per_worker).max(busy);
    wanted.min(i32::MAX as u64) as i32
}

/// `scaling.warmWorkers`, parsed.
#[derive(Clone, Debug, PartialEq)]
pub struct WarmSettings {
    /// How long warm workers cover the arrivals for.
    pub cover: Duration,
    /// The window the arrival rate is read over.
    pub window: Duration,
    /// At most this many warm workers.
    pub max: u32,
}

/// Warm workers to keep: the 99th percentile of the tickets that arrive within
/// `cover`, as Poisson arrivals at the recent arrival rate, at most `max`. The rate is
/// the tickets completed over `window` (every revision) plus the `arrived` ones not
/// completed yet (in hand or waiting), over `window`; or, when traffic rises, the same
/// count over the last quarter of the window. Nothing arrived within the window: none.
///
/// Completions are remembered [`TICKETS_KEPT`] per revision; when a revision's list is
/// full and starts inside the window, its rate is read over the span it covers.
pub fn warm_workers(
    warm: &WarmSettings,
    completions: &Completions,
    arrived: u64,
    now: Timestamp,
) -> u32 {
    let window = warm.window.as_secs_f64();
    if window <= 0.0 || warm.max == 0 {
        return 0;
    }
    let rate_over = |window: f64| -> f64 {
        let since = |at: Timestamp| now.duration_since(at).as_secs_f64();
        let completed: f64 = completions
            .tickets_by_revision
            .values()
            .map(|list| {
                let inside = list.iter().filter(|(_, at)| since(*at) <= window).count();
                let oldest = list.first().map_or(window, |(_, at)| since(*at));
                let span = if list.len() >= TICKETS_KEPT && oldest < window {
                    oldest.max(1.0)
                } else {
                    window
                };
                inside as f64 / span
            })
            .sum();
        completed + arrived as f64 / window
    };
    let rate = rate_over(window).max(rate_over(window / 4.0));
    poisson_quantile(rate * warm.cover.as_secs_f64(), 0.99, warm.max)
}

/// The smallest k with P(N <= k) >= p for N ~ Poisson(mean), at most `max`.
fn poisson_quantile(mean: f64, p: f64, max: u32) -> u32 {
    if mean <= 0.0 || !mean.is_finite() {
        return 0;
    }
    let mut k = 0;
    let mut term = (-mean).exp();
    let mut cdf = term;
    while cdf < p && k < max {
        k += 1;
        term *= mean / f64::from(k);
        cdf += term;
    }
    k
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
            // Warm workers wait idle on top of what the tickets need.
            clamp(
                spec,
                needed_workers(spec, *ready, *consumers, live.busy as u64)
                    .saturating_add(input.warm as i32),
            ),
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
        warm: input.warm as i32,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::fixtures::{depth, pod, pool, t};
    use crate::core::{Activity, plan, revision};

    fn warm(cover: u64, window: u64, max: u32) -> WarmSettings {
        WarmSettings {
            cover: Duration::from_secs(cover),
            window: Duration::from_secs(window),
            max,
        }
    }

    /// `n` completions on one revision, one every `every` seconds, the last at `t(end)`.
    fn completed(n: usize, every: i64, end: i64) -> Completions {
        let mut c = Completions::default();
        for i in 0..n as i64 {
            let at = end - (n as i64 - 1 - i) * every;
            c.record("r1", Some(&format!("t{i}")), t(at));
        }
        c
    }

    #[test]
    fn the_poisson_quantile_is_the_smallest_count_covering_the_percentile() {
        assert_eq!(poisson_quantile(0.0, 0.99, 10), 0);
        // P(N <= 3) = 0.981 and P(N <= 4) = 0.996 for a mean of 1.
        assert_eq!(poisson_quantile(1.0, 0.99, 10), 4);
        // P(N <= 1) = 0.9953 for a mean of 0.1.
        assert_eq!(poisson_quantile(0.1, 0.99, 10), 1);
        assert_eq!(poisson_quantile(50.0, 0.99, 7), 7, "at most max");
        assert_eq!(poisson_quantile(f64::NAN, 0.99, 7), 0);
    }

    #[test]
    fn warm_workers_follow_the_rate_of_recent_completions() {
        let now = 10_000;
        // One ticket every 30 s over the 15-minute window: a mean of 1 per 30 s.
        let steady = completed(30, 30, now);
        assert_eq!(warm_workers(&warm(30, 900, 5), &steady, 0, t(now)), 4);
        assert_eq!(warm_workers(&warm(30, 900, 2), &steady, 0, t(now)), 2);
        assert_eq!(warm_workers(&warm(30, 900, 0), &steady, 0, t(now)), 0);
        // Nothing arrived within the window: no warm worker.
        assert_eq!(
            warm_workers(&warm(30, 900, 5), &steady, 0, t(now + 2_000)),
            0
        );
        // The first ticket of the day, in hand: one worker is kept warm behind it.
        assert_eq!(
            warm_workers(&warm(30, 900, 5), &steady, 1, t(now + 2_000)),
            1
        );
        // Long after, half the tickets are in the window: a lower rate, fewer workers.
        let later = warm_workers(&warm(30, 900, 5), &steady, 0, t(now + 600));
        assert!(later < 4 && later > 0, "{later}");
        // Rising traffic: 20 tickets within the last 200 s weigh as a rate over the
        // last quarter of the window, not diluted over all of it.
        let rising = completed(20, 10, now);
        assert_eq!(warm_workers(&warm(30, 900, 9), &rising, 0, t(now)), 7);
        // A full memory of 100 tickets within the last 100 s: the rate is read over
        // those 100 s (1 a second), not over the whole window.
        let busy = completed(100, 1, now);
        assert_eq!(warm_workers(&warm(10, 900, 50), &busy, 0, t(now)), 18);
    }

    #[test]
    fn a_pool_with_warm_workers_keeps_them_idle_and_lets_them_go_when_tickets_stop() {
        let mut p = pool();
        p.spec.scaling.warm_workers = Some(Default::default());
        let rev = revision(&p.spec);
        let idle = |name: &str| {
            let mut w = pod(name, &rev, PodState::Ready, 0);
            w.activity = Activity::Idle;
            w
        };
        // One ticket every 30 s completed lately, none waiting: warm workers wait.
        let mut seen = depth(0, 1, vec![idle("w1")]);
        seen.completions = completed(30, 30, 900);
        let first = plan(&p, &seen, t(900));
        let w = first.status.workers.clone().unwrap();
        assert_eq!((w.desired, w.warm), (4, 4));
        assert_eq!(first.created(), 3);
        assert!(
            first.events.iter().any(|e| e.note.contains("kept warm")),
            "{:?}",
            first.events
        );
        // Without warmWorkers the same pool scales to zero.
        let mut cold = p.clone();
        cold.spec.scaling.warm_workers = None;
        let w = plan(&cold, &seen, t(900)).status.workers.unwrap();
        assert_eq!((w.desired, w.warm), (0, 0));
        // Never above maxWorkers.
        let mut small = p.clone();
        small.spec.scaling.max_workers = 2;
        assert_eq!(
            plan(&small, &seen, t(900)).status.workers.unwrap().desired,
            2
        );
        // An hour without a completion: no worker is kept warm.
        let w = plan(&p, &seen, t(4_500)).status.workers.unwrap();
        assert_eq!((w.desired, w.warm), (0, 0));
    }
}
