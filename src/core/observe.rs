//! The observe step: what one reconcile starts from. The spec read once (settings,
//! spec problems), the previous status (the operator's memory: crash history,
//! quarantine, rollout, timers), and the crashes the pods show merged into the
//! recorded ones.

use std::collections::BTreeMap;

use jiff::Timestamp;

use super::{BrokerView, ConfigProblem, Observed, Settings, diagnosis};
use crate::crd::{
    CrashStatus, QuarantineStatus, TestRunnerPool, TestRunnerPoolSpec, TestRunnerPoolStatus,
    WorkerMode,
};

/// One pool, as one reconcile sees it.
pub(super) struct Observation<'a> {
    /// The pool.
    pub pool: &'a TestRunnerPool,
    /// What the shell observed.
    pub observed: &'a Observed,
    /// Now.
    pub now: Timestamp,
    /// The previous status (empty for a new pool).
    pub previous: TestRunnerPoolStatus,
    /// The pool's annotations.
    pub annotations: &'a BTreeMap<String, String>,
    /// The spec's settings; the defaults when the spec has a problem.
    pub settings: Settings,
    /// The first spec problem: from the shell (Secret, URI), the durations, the command.
    pub config_problem: Option<ConfigProblem>,
    /// The crash history with the new crashes, newest last.
    pub crashes: Vec<CrashStatus>,
    /// The crashes seen for the first time.
    pub fresh_crashes: Vec<CrashStatus>,
    /// The previous quarantine.
    pub quarantine: QuarantineStatus,
    /// The ids of the tickets in it.
    pub quarantined: Vec<String>,
    /// Ready tickets, when the last probe read them.
    pub queue_ready: Option<u64>,
}

static NO_ANNOTATIONS: BTreeMap<String, String> = BTreeMap::new();

/// The step.
pub(super) fn observe<'a>(
    pool: &'a TestRunnerPool,
    observed: &'a Observed,
    now: Timestamp,
) -> Observation<'a> {
    let previous = pool.status.clone().unwrap_or_default();
    let parsed = super::settings(&pool.spec);
    let config_problem = observed
        .config_problem
        .clone()
        .or_else(|| parsed.as_ref().err().cloned())
        .or_else(|| command_problem(&pool.spec));
    let (crashes, fresh_crashes) = diagnosis::merge_crashes(&previous.crashes, &observed.crashes);
    let quarantine = previous.quarantine.clone().unwrap_or_default();
    let quarantined = quarantine.tickets.iter().map(|t| t.id.clone()).collect();
    Observation {
        pool,
        observed,
        now,
        annotations: pool
            .metadata
            .annotations
            .as_ref()
            .unwrap_or(&NO_ANNOTATIONS),
        // A spec problem stops scaling; the rest runs on the defaults.
        settings: parsed.unwrap_or_default(),
        config_problem,
        crashes,
        fresh_crashes,
        quarantine,
        quarantined,
        queue_ready: match observed.broker {
            BrokerView::Depth { ready, .. } => Some(ready),
            _ => None,
        },
        previous,
    }
}

impl Observation<'_> {
    /// The pool spec.
    pub fn spec(&self) -> &TestRunnerPoolSpec {
        &self.pool.spec
    }

    /// True when the last probe could not reach the broker.
    pub fn broker_unreachable(&self) -> bool {
        matches!(self.observed.broker, BrokerView::Unreachable { .. })
    }
}

/// Wrapped mode runs the spec's command for each ticket: without one, nothing can run.
fn command_problem(spec: &TestRunnerPoolSpec) -> Option<ConfigProblem> {
    (spec.workload.worker.mode == WorkerMode::Wrapped && spec.workload.command.is_empty()).then(
        || ConfigProblem::InvalidField {
            field: "spec.command".into(),
            detail: "Wrapped mode needs the test command to run for each ticket".into(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::crash::{CrashRecord, InHand};
    use crate::core::fixtures::{depth, pool, t};

    #[test]
    fn the_first_spec_problem_wins_and_the_settings_fall_back_to_the_defaults() {
        let mut p = pool();
        p.spec.scaling.scale_down_delay = "30s".into();
        p.spec.scaling.poll_interval = "10ms".into();
        p.spec.workload.command.clear();
        let mut observed = depth(0, 0, vec![]);
        let seen = observe(&p, &observed, t(0));
        assert!(
            seen.config_problem
                .as_ref()
                .unwrap()
                .message()
                .contains("pollInterval"),
            "the durations come before the command"
        );
        assert_eq!(seen.settings, Settings::default(), "not the spec's 30s");

        observed.config_problem = Some(ConfigProblem::SecretNotFound { name: "s".into() });
        let seen = observe(&p, &observed, t(0));
        assert_eq!(
            seen.config_problem, observed.config_problem,
            "the shell's first"
        );

        p.spec.scaling.poll_interval = "2s".into();
        observed.config_problem = None;
        let seen = observe(&p, &observed, t(0));
        assert!(
            seen.config_problem
                .unwrap()
                .message()
                .contains("spec.command")
        );
        assert_eq!(seen.settings.scale_down_delay.as_secs(), 30);
    }

    #[test]
    fn new_crashes_join_the_history_and_the_queue_depth_is_read() {
        let mut observed = depth(7, 1, vec![]);
        observed.crashes = vec![CrashRecord {
            id: "u/0/1".into(),
            pod: "unit-a".into(),
            revision: "r".into(),
            image: "i".into(),
            in_hand: InHand::Starting,
            exit_code: 1,
            signal: None,
            reason: "Error".into(),
            at: t(1),
        }];
        let p = pool();
        let seen = observe(&p, &observed, t(2));
        assert_eq!((seen.crashes.len(), seen.fresh_crashes.len()), (1, 1));
        assert_eq!(seen.queue_ready, Some(7));
        assert!(!seen.broker_unreachable());
        assert!(seen.annotations.is_empty() && seen.quarantined.is_empty());

        let mut again = pool();
        again.status = Some(TestRunnerPoolStatus {
            crashes: seen.crashes.clone(),
            ..Default::default()
        });
        let seen = observe(&again, &observed, t(3));
        assert_eq!((seen.crashes.len(), seen.fresh_crashes.len()), (1, 0));
    }
}
