//! One reconcile's decisions, step by step (see the picture in [`crate::core`]). Each
//! step is a function of what the steps before it decided; this file only wires them.

use std::time::Duration;

use jiff::Timestamp;

use super::diagnosis::{DiagnosisInput, diagnose};
use super::observe::{Observation, observe};
use super::quarantine::{QuarantineDecision, QuarantineInput};
use super::rollout::{RolloutDecision, RolloutInput};
use super::scaling::{Decision, ScalingInput};
use super::{BrokerView, ConditionType};
use super::{
    CONFIG_RETRY, Observed, Plan, PodBatch, RESYNC, events, quarantine, revisions, rollout,
    scaling, status,
};
use crate::crd::{DiagnosisStatus, RolloutPhase, TestRunnerPool, Verdict, Workload};

/// Computes the plan for one pool: observe, rollout, diagnosis, quarantine, scaling,
/// status (with its conditions), events.
pub fn plan(pool: &TestRunnerPool, observed: &Observed, now: Timestamp) -> Plan {
    let seen = observe(pool, observed, now);
    let rollout = rollout_step(&seen);
    let diagnosis = diagnosis_step(&seen, &rollout);
    let quarantine = quarantine_step(&seen, &rollout, &diagnosis);
    let stuck = stuck_pods(&seen, &quarantine);
    let scaling = scaling_step(&seen, &rollout, &diagnosis, &stuck);

    let create = pod_batches(&seen, &rollout, &scaling);
    let revisions = revisions::plan(&seen.observed.revisions, &rollout.status, |r| {
        workload_of(&seen, r)
    });
    let requeue_after = requeue_after(&seen, &rollout, &scaling);
    let replay_dead_lettered = replay_dead_lettered(&seen, &rollout, &diagnosis);
    let quarantine_list = quarantine.status.tickets.clone();
    let status = status::status(
        &seen,
        &scaling,
        &diagnosis,
        quarantine.status,
        rollout.status,
    );
    let events = events::events(
        &seen,
        &status,
        &diagnosis,
        &scaling,
        quarantine.events,
        rollout.events,
    );
    let mut delete = scaling.delete;
    for name in stuck {
        if !delete.contains(&name) {
            delete.push(name);
        }
    }
    Plan {
        create,
        delete,
        status,
        events,
        quarantine_list,
        replay: quarantine.replay,
        revisions,
        replay_dead_lettered,
        new_crashes: seen.fresh_crashes,
        requeue_after,
    }
}

/// The rollout: which revision is stable, and whether a canary runs.
fn rollout_step(seen: &Observation<'_>) -> RolloutDecision {
    rollout::decide(&RolloutInput {
        spec: seen.spec(),
        settings: &seen.settings.rollout,
        previous: seen.previous.rollout.as_ref(),
        stored: &seen.observed.revisions,
        annotations: seen.annotations,
        pods: &seen.observed.pods,
        crashes: &seen.crashes,
        quarantined: &seen.quarantined,
        completions: &seen.observed.completions,
        queue_ready: seen.queue_ready,
        broker_unreachable: seen.broker_unreachable(),
        now: seen.now,
    })
}

/// The diagnosis of the crashes, on the stable revision.
fn diagnosis_step(seen: &Observation<'_>, rollout: &RolloutDecision) -> DiagnosisStatus {
    let spec = seen.spec();
    let forgiven: Vec<(String, Timestamp)> = seen
        .quarantine
        .replayed
        .iter()
        .map(|r| (r.id.clone(), r.at.0))
        .collect();
    diagnose(&DiagnosisInput {
        crashes: &seen.crashes,
        revision: &rollout.status.stable_revision,
        completions: &seen.observed.completions,
        crashes_to_quarantine: spec.poison.crashes_to_quarantine.max(1) as u32,
        quarantined: &seen.quarantined,
        forgiven: &forgiven,
        stall_timeout: seen.settings.stall_timeout,
        queue_ready: seen.queue_ready,
        previous_ready: seen.previous.queue.as_ref().map(|q| q.ready),
        previous: seen.previous.diagnosis.as_ref(),
        paused: spec.paused,
        broker_reached_at: match seen.observed.broker {
            BrokerView::Depth { at, .. } | BrokerView::QueueNotFound { at } => Some(at),
            _ => None,
        },
        broker_back_at: broker_back_at(seen),
        now: seen.now,
    })
}

/// When the broker became reachable again: as the previous `BrokerReachable`
/// condition says when it was True; now when it was not (or there was none: the
/// operator had not reached the broker before).
fn broker_back_at(seen: &Observation<'_>) -> Option<Timestamp> {
    let previous = seen
        .previous
        .conditions
        .iter()
        .find(|c| c.type_ == ConditionType::BrokerReachable.as_str());
    match previous {
        Some(c) if c.status == "True" => c.last_transition_time.as_ref().map(|t| t.0),
        _ => Some(seen.now),
    }
}

/// The quarantine: a poison ticket joins it, replayed tickets leave it.
fn quarantine_step(
    seen: &Observation<'_>,
    rollout: &RolloutDecision,
    diagnosis: &DiagnosisStatus,
) -> QuarantineDecision {
    let stable = &rollout.status;
    quarantine::decide(&QuarantineInput {
        old: &seen.quarantine,
        diagnosis,
        crashes: &seen.crashes,
        annotations: seen.annotations,
        // Quarantined tickets get another go once a new image is stable and completes
        // tickets: not while it is a canary.
        image: &stable.stable_image,
        replay_on_image_change: seen.spec().poison.replay_on_image_change,
        completed_on_revision: seen.observed.completions.last(&stable.stable_revision),
        queue: &seen.spec().queue.quarantine_queue_name(),
        now: seen.now,
    })
}

/// Pods stuck on a quarantined ticket: deleted, and scaling replaces them at once.
fn stuck_pods(seen: &Observation<'_>, quarantine: &QuarantineDecision) -> Vec<String> {
    let listed: Vec<String> = quarantine
        .status
        .tickets
        .iter()
        .map(|t| t.id.clone())
        .collect();
    quarantine::stuck_pods(&seen.observed.pods, &seen.observed.crashes, &listed)
}

/// The pods to create and delete.
fn scaling_step(
    seen: &Observation<'_>,
    rollout: &RolloutDecision,
    diagnosis: &DiagnosisStatus,
    stuck: &[String],
) -> Decision {
    let spec = seen.spec();
    let r = &rollout.status;
    scaling::decide(&ScalingInput {
        spec,
        pods: &seen.observed.pods,
        leaving: stuck,
        broker: &seen.observed.broker,
        config_ok: seen.config_problem.is_none(),
        revision: &r.stable_revision,
        canary: rollout.canary.as_ref().map(|(r, n)| (r.as_str(), *n)),
        surplus_since: seen
            .previous
            .workers
            .as_ref()
            .and_then(|w| w.surplus_since.as_ref())
            .map(|t| t.0),
        scale_down_delay: seen.settings.scale_down_delay,
        // A broken environment keeps a small number of workers: more would only crash.
        cap: (diagnosis.verdict == Verdict::BrokenEnvironment)
            .then(|| spec.scaling.min_workers.max(1)),
        // A rolled-back canary goes at once, busy or not: it drains within its grace period.
        discard: (r.phase == RolloutPhase::RolledBack && r.target_revision != r.stable_revision)
            .then_some(r.target_revision.as_str()),
        warm: seen.settings.warm.as_ref().map_or(0, |w| {
            // Tickets that arrived but are not completed yet: in hand, or waiting.
            let busy = seen.observed.pods.iter().filter(|p| p.busy()).count() as u64;
            let arrived = busy + seen.queue_ready.unwrap_or(0);
            scaling::warm_workers(w, &seen.observed.completions, arrived, seen.now)
        }),
        now: seen.now,
    })
}

/// What `revision`'s pods are built from (see [`revisions::workload_of`]).
fn workload_of<'a>(seen: &'a Observation<'_>, revision: &str) -> Option<&'a Workload> {
    let legacy = seen
        .previous
        .rollout
        .as_ref()
        .and_then(|r| r.stable.as_ref().map(|w| (r.stable_revision.as_str(), w)));
    revisions::workload_of(
        revision,
        &seen.observed.revisions,
        &seen.spec().workload,
        legacy,
    )
}

/// The pods to create: stable ones from the stable revision's ControllerRevision,
/// canaries from the spec.
fn pod_batches(
    seen: &Observation<'_>,
    rollout: &RolloutDecision,
    scaling: &Decision,
) -> Vec<PodBatch> {
    let mut create = Vec::new();
    let stable = &rollout.status.stable_revision;
    if scaling.create > 0
        && let Some(workload) = workload_of(seen, stable)
    {
        create.push(PodBatch {
            revision: stable.clone(),
            workload: workload.clone(),
            count: scaling.create,
            canary: false,
        });
    }
    if let (Some((canary_revision, _)), true) = (&rollout.canary, scaling.create_canary > 0) {
        create.push(PodBatch {
            revision: canary_revision.clone(),
            workload: seen.spec().workload.clone(),
            count: scaling.create_canary,
            canary: true,
        });
    }
    create
}

/// When to look again: at the next resync, or sooner when a timer runs out (scale-down
/// delay, a rollout gate) or something may have been fixed (the spec, the broker).
fn requeue_after(
    seen: &Observation<'_>,
    rollout: &RolloutDecision,
    scaling: &Decision,
) -> Duration {
    let retry =
        (seen.config_problem.is_some() || seen.broker_unreachable()).then_some(CONFIG_RETRY);
    [scaling.scale_down_wait, retry, rollout.wake_after]
        .into_iter()
        .flatten()
        .fold(RESYNC, Duration::min)
}

/// Tickets a broker backstop dead-lettered while workers crashed go back when the
/// environment recovers or a failed canary is gone.
fn replay_dead_lettered(
    seen: &Observation<'_>,
    rollout: &RolloutDecision,
    diagnosis: &DiagnosisStatus,
) -> bool {
    let was_broken = seen
        .previous
        .diagnosis
        .as_ref()
        .is_some_and(|d| d.verdict == Verdict::BrokenEnvironment);
    rollout.rolled_back || was_broken && diagnosis.verdict == Verdict::Healthy
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::fixtures::{depth, pool, t};
    use crate::crd::TestRunnerPoolStatus;

    #[test]
    fn the_status_the_core_returns_is_complete() {
        let first = plan(&pool(), &depth(2, 0, vec![]), t(0));
        let s = &first.status;
        assert!(s.phase.is_some() && s.queue.is_some() && s.workers.is_some());
        assert!(s.diagnosis.is_some() && s.rollout.is_some());
        let types: Vec<&str> = s.conditions.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(
            types,
            ["Ready", "BrokerReachable", "Degraded", "RolloutComplete"]
        );
        assert!(
            s.conditions
                .iter()
                .all(|c| c.last_transition_time.is_some() && c.observed_generation == Some(1))
        );
    }

    #[test]
    fn requeue_takes_the_soonest_timer() {
        let p = pool();
        let observed = depth(0, 0, vec![]);
        let seen = observe(&p, &observed, t(0));
        let rollout = rollout_step(&seen);
        let mut scaling = scaling_step(&seen, &rollout, &DiagnosisStatus::default(), &[]);
        assert_eq!(requeue_after(&seen, &rollout, &scaling), RESYNC);
        scaling.scale_down_wait = Some(Duration::from_secs(7));
        assert_eq!(
            requeue_after(&seen, &rollout, &scaling),
            Duration::from_secs(7)
        );
        scaling.scale_down_wait = Some(Duration::from_secs(70));
        let mut broken = p.clone();
        broken.spec.workload.command.clear();
        let seen = observe(&broken, &observed, t(0));
        assert_eq!(requeue_after(&seen, &rollout, &scaling), CONFIG_RETRY);
    }

    #[test]
    fn dead_lettered_tickets_go_back_when_the_environment_recovers() {
        let mut p = pool();
        let observed = depth(0, 0, vec![]);
        let broken = DiagnosisStatus {
            verdict: Verdict::BrokenEnvironment,
            ..Default::default()
        };
        p.status = Some(TestRunnerPoolStatus {
            diagnosis: Some(broken.clone()),
            ..Default::default()
        });
        let seen = observe(&p, &observed, t(0));
        let rollout = rollout_step(&seen);
        assert!(!replay_dead_lettered(&seen, &rollout, &broken));
        assert!(replay_dead_lettered(
            &seen,
            &rollout,
            &DiagnosisStatus::default()
        ));
        let fresh = pool();
        let seen = observe(&fresh, &observed, t(0));
        assert!(!replay_dead_lettered(
            &seen,
            &rollout,
            &DiagnosisStatus::default()
        ));
    }

    #[test]
    fn stable_pods_come_from_their_controller_revision_and_canaries_from_the_spec() {
        let p = pool();
        let stable = crate::crd::Workload {
            image: "runner:stable".into(),
            ..p.spec.workload.clone()
        };
        let mut observed = depth(1, 0, vec![]);
        observed.revisions = vec![revisions::StoredRevision {
            revision: super::super::revision_of(&stable),
            number: 1,
            workload: stable.clone(),
            stable: true,
            rolled_back: None,
        }];
        let seen = observe(&p, &observed, t(0));
        let mut rollout = rollout_step(&seen);
        // The stored stable revision serves; the spec's is rolled out next to it.
        assert_eq!(
            rollout.status.stable_revision,
            observed.revisions[0].revision
        );
        assert_eq!(rollout.status.phase, RolloutPhase::Progressing);
        rollout.canary = Some(("canary".into(), 1));
        let mut scaling = scaling_step(&seen, &rollout, &DiagnosisStatus::default(), &[]);
        scaling.create = 1;
        scaling.create_canary = 1;
        let batches = pod_batches(&seen, &rollout, &scaling);
        assert_eq!(batches.len(), 2);
        assert_eq!(
            (batches[0].workload.image.as_str(), batches[0].canary),
            ("runner:stable", false)
        );
        assert_eq!(
            (batches[1].revision.as_str(), batches[1].canary),
            ("canary", true)
        );
        assert_eq!(batches[1].workload, p.spec.workload.clone());
    }
}
