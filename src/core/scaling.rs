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
    /// The last queue probe.
    pub broker: &'a BrokerView,
    /// False when the spec has a problem: then nothing is created or deleted.
    pub config_ok: bool,
    /// The revision new pods get.
    pub revision: &'a str,
    /// Since when the pool has had a surplus (from the previous status).
    pub surplus_since: Option<Timestamp>,
    /// `spec.scaling.scaleDownDelay`, parsed.
    pub scale_down_delay: Duration,
    /// An upper bound on desired workers below maxWorkers (a broken environment).
    pub cap: Option<i32>,
    /// The time of this decision.
    pub now: Timestamp,
}

/// The scaling decision.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// Workers wanted.
    pub desired: i32,
    /// Live worker pods (not terminating, not finished), Pending ones included.
    pub current: i32,
    /// Ready worker pods.
    pub ready: i32,
    /// Tickets ready in the queue at the last probe (0 when unknown).
    pub queue_ready: u64,
    /// Pods to create.
    pub create: u32,
    /// Pods to delete (finished pods, surplus, replaced revisions).
    pub delete: Vec<String>,
    /// How many of `delete` are a scale-down (not clean-up or replacement).
    pub scaled_down: u32,
    /// The surplus timer to keep in status.
    pub surplus_since: Option<Timestamp>,
    /// Time left before a pending scale-down happens.
    pub scale_down_wait: Option<Duration>,
}

/// desired = clamp(ceil((ready + in_flight) / ticketsPerWorker), min, max).
///
/// With prefetch 1, every consumer is busy while tickets are ready, so in-flight is
/// the consumer count then. When no ticket is ready the broker cannot say which
/// consumers are busy (a passive declare counts ready messages only); in-flight is
/// taken as 0, and workers removed then drain the ticket in hand before they exit.
pub fn desired_workers(spec: &TestRunnerPoolSpec, ready: u64, consumers: u64) -> i32 {
    let in_flight = if ready > 0 { consumers } else { 0 };
    let per_worker = spec.scaling.tickets_per_worker.max(1) as u64;
    let wanted = (ready + in_flight).div_ceil(per_worker);
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

/// Decides the pods to create and delete.
pub fn decide(input: &ScalingInput<'_>) -> Decision {
    let spec = input.spec;
    let live: Vec<&PodView> = input
        .pods
        .iter()
        .filter(|p| !matches!(p.state, PodState::Terminating | PodState::Finished))
        .collect();
    let current = live.len() as i32;
    let ready = live.iter().filter(|p| p.state == PodState::Ready).count() as i32;
    let finished: Vec<String> = input
        .pods
        .iter()
        .filter(|p| p.state == PodState::Finished)
        .map(|p| p.name.clone())
        .collect();

    let (desired, queue_ready) = match input.broker {
        BrokerView::Depth {
            ready, consumers, ..
        } => (desired_workers(spec, *ready, *consumers), *ready),
        // Without numbers, hold what runs: never scale to zero on an error.
        _ => (clamp(spec, current), 0),
    };
    let desired = input.cap.map_or(desired, |cap| desired.min(cap));

    let mut decision = Decision {
        desired,
        current,
        ready,
        queue_ready,
        create: 0,
        delete: finished,
        scaled_down: 0,
        surplus_since: None,
        scale_down_wait: None,
    };
    if spec.paused || !input.config_ok {
        return decision;
    }

    let fresh: Vec<&PodView> = live
        .iter()
        .copied()
        .filter(|p| p.revision == input.revision)
        .collect();
    let outdated = live.len() - fresh.len();
    let fresh_all_ready = fresh.iter().all(|p| p.state == PodState::Ready);

    if current < desired {
        decision.create = (desired - current) as u32;
    } else if outdated > 0 && current == desired && fresh_all_ready && desired > 0 {
        // A changed revision: one extra pod of the new revision...
        decision.create = 1;
    } else if outdated > 0 && current == desired + 1 && !fresh.is_empty() {
        // ...and once it is ready, one outdated pod drains.
        if fresh_all_ready {
            let mut order: Vec<&PodView> = live
                .iter()
                .copied()
                .filter(|p| p.revision != input.revision)
                .collect();
            removal_order(&mut order, input.revision);
            decision.delete.push(order[0].name.clone());
        }
    } else if current > desired {
        let since = input.surplus_since.unwrap_or(input.now);
        let waited = input.now.duration_since(since);
        let delay = jiff::SignedDuration::try_from(input.scale_down_delay)
            .unwrap_or(jiff::SignedDuration::MAX);
        if waited >= delay {
            let mut candidates = live.clone();
            removal_order(&mut candidates, input.revision);
            let surplus = (current - desired) as usize;
            decision
                .delete
                .extend(candidates.iter().take(surplus).map(|p| p.name.clone()));
            decision.scaled_down = surplus as u32;
        } else {
            decision.surplus_since = Some(since);
            decision.scale_down_wait = Some(
                (delay - waited)
                    .try_into()
                    .unwrap_or(Duration::from_secs(1))
                    .max(Duration::from_millis(10)),
            );
        }
    }
    decision
}
