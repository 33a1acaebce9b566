//! The status step: the pool's status, complete, from the decisions of the steps
//! before it. Nothing is added to it afterwards.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::BrokerView;
use super::conditions::{self, Inputs};
use super::observe::Observation;
use super::scaling::Decision;
use crate::crd::{
    DiagnosisStatus, QuarantineStatus, QueueStatus, RolloutStatus, TestRunnerPoolStatus,
    WorkersStatus,
};

/// The new status: phase and conditions, queue and worker counts, and the diagnosis,
/// quarantine, crash history and rollout as decided.
pub(super) fn status(
    seen: &Observation<'_>,
    scaling: &Decision,
    diagnosis: &DiagnosisStatus,
    quarantine: QuarantineStatus,
    rollout: RolloutStatus,
) -> TestRunnerPoolStatus {
    let generation = seen.pool.metadata.generation;
    let inputs = Inputs {
        spec: &seen.pool.spec,
        generation,
        previous: &seen.previous.conditions,
        broker: &seen.observed.broker,
        pods: &seen.observed.pods,
        config_problem: seen.config_problem.as_ref(),
        scaling,
        diagnosis,
        rollout: &rollout,
        now: seen.now,
    };
    let degraded = conditions::degraded(&inputs);
    let ready = conditions::ready(&inputs, &degraded);
    let phase = conditions::phase(&inputs, &degraded);
    let broker = conditions::broker_reachable(&inputs);
    let complete = conditions::rollout_complete(&inputs);
    TestRunnerPoolStatus {
        observed_generation: generation,
        phase: Some(phase),
        conditions: vec![ready, broker, degraded, complete],
        queue: queue(&seen.observed.broker, seen.previous.queue.as_ref()),
        workers: Some(workers(scaling)),
        diagnosis: Some(diagnosis.clone()),
        quarantine: (quarantine != QuarantineStatus::default()).then_some(quarantine),
        crashes: seen.crashes.clone(),
        rollout: Some(rollout),
    }
}

/// The numbers of the last probe; without a new one, the last numbers seen (the
/// conditions say they are stale).
fn queue(broker: &BrokerView, previous: Option<&QueueStatus>) -> Option<QueueStatus> {
    match broker {
        BrokerView::Depth {
            ready,
            consumers,
            at,
        } => Some(QueueStatus {
            ready: *ready as i64,
            consumers: *consumers as i64,
            last_probe_time: Some(Time(*at)),
        }),
        _ => previous.cloned(),
    }
}

fn workers(d: &Decision) -> WorkersStatus {
    WorkersStatus {
        desired: d.desired,
        current: d.current,
        ready: d.ready,
        busy: d.busy,
        warm: d.warm,
        surplus_since: d.surplus_since.map(Time),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::fixtures::t;

    #[test]
    fn the_queue_numbers_stay_while_the_probe_fails() {
        let seen = QueueStatus {
            ready: 4,
            consumers: 1,
            last_probe_time: Some(Time(t(5))),
        };
        let fresh = BrokerView::Depth {
            ready: 9,
            consumers: 2,
            at: t(10),
        };
        assert_eq!(
            queue(&fresh, Some(&seen)),
            Some(QueueStatus {
                ready: 9,
                consumers: 2,
                last_probe_time: Some(Time(t(10)))
            })
        );
        let down = BrokerView::Unreachable {
            reason: "Timeout".into(),
            message: "slow".into(),
            since: t(6),
        };
        assert_eq!(queue(&down, Some(&seen)), Some(seen.clone()));
        assert_eq!(queue(&BrokerView::NotProbed, None), None);
    }
}
