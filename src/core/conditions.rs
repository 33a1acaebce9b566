//! The conditions of a pool's status, one function each, and the phase they add up
//! to. Each function returns its condition complete: type, status, reason, message,
//! transition time and generation.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::scaling::Decision;
use super::{BrokerView, ConfigProblem, PodState, PodView};
use crate::crd::{
    Condition, DiagnosisStatus, Phase, RolloutPhase, RolloutStatus, TestRunnerPoolSpec,
    TestRunnerPoolStatus, Verdict, named_enum,
};

named_enum! {
    /// The type of a pool condition.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum ConditionType {
        /// The pool serves tickets as asked.
        Ready,
        /// The broker answers queue probes.
        BrokerReachable,
        /// Something stops the pool from working as asked.
        Degraded,
        /// Every worker runs the revision the spec asks for.
        RolloutComplete,
    }
}

named_enum! {
    /// The status of a condition.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum ConditionStatus {
        /// It holds.
        True,
        /// It does not hold.
        False,
        /// Not known yet.
        Unknown,
    }
}

named_enum! {
    /// The reasons of the conditions, besides those that come from elsewhere: a
    /// [`Verdict`], a [`crate::crd::RolloutReason`], and the failure the broker
    /// probe reports (ConnectionFailed, AuthenticationFailed, ...).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum ConditionReason {
        /// BrokerReachable: no probe has completed yet.
        NotProbed,
        /// BrokerReachable: the queue answers.
        QueueFound,
        /// BrokerReachable and Degraded: the broker answers but the queue does not exist.
        QueueNotFound,
        /// Degraded: nothing is wrong.
        AsExpected,
        /// Degraded: the broker cannot be reached.
        BrokerUnreachable,
        /// Degraded: the latest rollout failed.
        RolloutFailed,
        /// Degraded: the connection Secret does not exist.
        SecretNotFound,
        /// Degraded: the Secret lacks the key.
        SecretKeyMissing,
        /// Degraded: the URI in the Secret is not a usable AMQP URI.
        InvalidBrokerUri,
        /// Degraded: a field the schema cannot check is wrong.
        InvalidSpec,
        /// Ready and RolloutComplete: `spec.paused` holds the pool.
        Paused,
        /// Ready: the workers the pool wants are ready.
        WorkersReady,
        /// Ready: workers are being added or removed.
        Scaling,
        /// RolloutComplete: the spec's revision is promoted (when the rollout names no
        /// reason).
        Promoted,
        /// RolloutComplete: pods of older revisions are being replaced.
        Replacing,
        /// RolloutComplete: the canaries run.
        CanaryRunning,
        /// RolloutComplete: the new revision was rolled back.
        RolledBack,
    }
}

/// The condition of `type_` in `status`.
pub fn find(status: &TestRunnerPoolStatus, type_: ConditionType) -> Option<&Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}

/// What the conditions are computed from: the pool and the decisions of the steps
/// before.
pub(super) struct Inputs<'a> {
    /// The pool spec.
    pub spec: &'a TestRunnerPoolSpec,
    /// Its generation.
    pub generation: Option<i64>,
    /// The previous conditions: a condition whose status stays keeps its transition time.
    pub previous: &'a [Condition],
    /// The last queue probe.
    pub broker: &'a BrokerView,
    /// The pool's pods.
    pub pods: &'a [PodView],
    /// A spec problem.
    pub config_problem: Option<&'a ConfigProblem>,
    /// The scaling decision.
    pub scaling: &'a Decision,
    /// The diagnosis.
    pub diagnosis: &'a DiagnosisStatus,
    /// The rollout status.
    pub rollout: &'a RolloutStatus,
    /// Now.
    pub now: Timestamp,
}

impl Inputs<'_> {
    fn condition(
        &self,
        type_: ConditionType,
        status: ConditionStatus,
        reason: impl AsRef<str>,
        message: String,
    ) -> Condition {
        let last_transition_time = match self.previous.iter().find(|c| c.type_ == type_) {
            Some(previous) if previous.status == status => previous.last_transition_time.clone(),
            _ => Some(Time(self.now)),
        };
        Condition {
            type_: type_.to_string(),
            status: status.to_string(),
            reason: reason.as_ref().to_string(),
            message,
            last_transition_time,
            observed_generation: self.generation,
        }
    }
}

/// BrokerReachable: the last probe reached the broker (and found the queue, or not).
pub(super) fn broker_reachable(i: &Inputs<'_>) -> Condition {
    use {ConditionReason as R, ConditionStatus as S};
    let queue = &i.spec.queue.name;
    let (status, reason, message) = match i.broker {
        BrokerView::NotProbed => (
            S::Unknown,
            R::NotProbed.as_str(),
            "The queue has not been probed yet".to_string(),
        ),
        BrokerView::Depth { .. } => (
            S::True,
            R::QueueFound.as_str(),
            format!("Queue {queue:?} answers probes"),
        ),
        BrokerView::QueueNotFound { .. } => (
            S::True,
            R::QueueNotFound.as_str(),
            format!("The broker answers but queue {queue:?} does not exist"),
        ),
        BrokerView::Unreachable {
            reason, message, ..
        } => (S::False, reason.as_str(), message.clone()),
    };
    i.condition(ConditionType::BrokerReachable, status, reason, message)
}

/// Degraded: the most pressing of what stops the pool from working as asked: a spec
/// problem, the broker, the queue, the diagnosis, a failed rollout.
pub(super) fn degraded(i: &Inputs<'_>) -> Condition {
    use ConditionReason as R;
    let holding = i.scaling.current;
    let (reason, message) = if let Some(problem) = i.config_problem {
        (problem.reason().as_str(), problem.message())
    } else if let BrokerView::Unreachable { message, .. } = i.broker {
        (
            R::BrokerUnreachable.as_str(),
            format!("The broker cannot be reached; holding {holding} workers: {message}"),
        )
    } else if let BrokerView::QueueNotFound { .. } = i.broker {
        (
            R::QueueNotFound.as_str(),
            format!(
                "Queue {:?} does not exist; holding {holding} workers",
                i.spec.queue.name
            ),
        )
    } else if i.diagnosis.verdict != Verdict::Healthy {
        (i.diagnosis.verdict.as_str(), i.diagnosis.message.clone())
    } else if super::rollout::failed(i.rollout) {
        (R::RolloutFailed.as_str(), i.rollout.message.clone())
    } else {
        return i.condition(
            ConditionType::Degraded,
            ConditionStatus::False,
            R::AsExpected,
            String::new(),
        );
    };
    i.condition(
        ConditionType::Degraded,
        ConditionStatus::True,
        reason,
        message,
    )
}

/// Ready: the workers the pool wants are there and ready; else why not (paused,
/// degraded, scaling).
pub(super) fn ready(i: &Inputs<'_>, degraded: &Condition) -> Condition {
    use {ConditionReason as R, ConditionStatus as S};
    let d = i.scaling;
    let (status, reason, message) = if i.spec.paused {
        (
            S::False,
            R::Paused.as_str(),
            "spec.paused is true: workers are neither created nor deleted".to_string(),
        )
    } else if degraded.status == S::True {
        // The Degraded condition says why, in full: said once.
        (
            S::False,
            degraded.reason.as_str(),
            format!(
                "The pool is degraded ({}): see the Degraded condition",
                degraded.reason
            ),
        )
    } else if d.ready >= d.desired && d.current == d.desired {
        (
            S::True,
            R::WorkersReady.as_str(),
            format!("{} of {} workers ready", d.ready, d.desired),
        )
    } else {
        (
            S::False,
            R::Scaling.as_str(),
            format!(
                "{} of {} workers ready, {} exist",
                d.ready, d.desired, d.current
            ),
        )
    };
    i.condition(ConditionType::Ready, status, reason, message)
}

/// RolloutComplete: every live worker runs the promoted revision; else where the
/// rollout stands.
pub(super) fn rollout_complete(i: &Inputs<'_>) -> Condition {
    use {ConditionReason as R, ConditionStatus as S};
    let r = i.rollout;
    let outdated = i
        .pods
        .iter()
        .filter(|p| !matches!(p.state, PodState::Terminating | PodState::Finished))
        .filter(|p| p.revision != r.target_revision)
        .count();
    let (status, reason, message) = match r.phase {
        RolloutPhase::Promoted if outdated == 0 => (
            S::True,
            r.reason.map_or(R::Promoted.as_str(), |why| why.as_str()),
            format!(
                "Every worker runs revision {} (image {})",
                r.stable_revision, r.stable_image
            ),
        ),
        RolloutPhase::Promoted => (
            S::False,
            R::Replacing.as_str(),
            format!(
                "{outdated} worker(s) of older revisions left to replace with revision {}",
                r.stable_revision
            ),
        ),
        // status.rollout.message says the rest, once.
        RolloutPhase::Progressing => (
            S::False,
            R::CanaryRunning.as_str(),
            format!(
                "Revision {} (image {}) is rolling out: see status.rollout",
                r.target_revision, r.target_image
            ),
        ),
        RolloutPhase::Paused => (
            S::False,
            R::Paused.as_str(),
            format!(
                "The rollout of revision {} is paused: see status.rollout",
                r.target_revision
            ),
        ),
        RolloutPhase::RolledBack => (
            S::False,
            R::RolledBack.as_str(),
            format!(
                "Revision {} (image {}) was rolled back; stable revision {} serves: see status.rollout",
                r.target_revision, r.target_image, r.stable_revision
            ),
        ),
    };
    i.condition(ConditionType::RolloutComplete, status, reason, message)
}

/// The phase `kubectl get` shows: paused, degraded, scaling, idle or running.
pub(super) fn phase(i: &Inputs<'_>, degraded: &Condition) -> Phase {
    let d = i.scaling;
    if i.spec.paused {
        Phase::Paused
    } else if degraded.status == ConditionStatus::True {
        Phase::Degraded
    } else if d.current != d.desired || d.ready < d.desired {
        Phase::Scaling
    } else if d.desired == 0 && d.queue_ready == 0 {
        Phase::Idle
    } else {
        Phase::Running
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::fixtures::{decision, pod, pool, t};
    use crate::crd::RolloutReason;

    fn unreachable(reason: &str, message: &str) -> BrokerView {
        BrokerView::Unreachable {
            reason: reason.into(),
            message: message.into(),
            since: t(0),
        }
    }

    fn rollout(phase: RolloutPhase, reason: Option<RolloutReason>) -> RolloutStatus {
        let mut r = RolloutStatus::serving(
            "a",
            "runner:1",
            RolloutReason::FirstRevision,
            "what the rollout says".into(),
        );
        r.phase = phase;
        r.reason = reason;
        r
    }

    /// What the conditions are computed from, changed one field at a time.
    struct World {
        spec: TestRunnerPoolSpec,
        broker: BrokerView,
        pods: Vec<PodView>,
        problem: Option<ConfigProblem>,
        scaling: Decision,
        diagnosis: DiagnosisStatus,
        rollout: RolloutStatus,
        previous: Vec<Condition>,
    }

    impl World {
        fn new() -> Self {
            World {
                spec: pool().spec,
                broker: BrokerView::Depth {
                    ready: 0,
                    consumers: 0,
                    at: t(0),
                },
                pods: Vec::new(),
                problem: None,
                scaling: decision(2, 2, 2),
                diagnosis: DiagnosisStatus::default(),
                rollout: rollout(RolloutPhase::Promoted, Some(RolloutReason::FirstRevision)),
                previous: Vec::new(),
            }
        }

        fn inputs(&self) -> Inputs<'_> {
            Inputs {
                spec: &self.spec,
                generation: Some(4),
                previous: &self.previous,
                broker: &self.broker,
                pods: &self.pods,
                config_problem: self.problem.as_ref(),
                scaling: &self.scaling,
                diagnosis: &self.diagnosis,
                rollout: &self.rollout,
                now: t(100),
            }
        }
    }

    fn said(c: &Condition) -> (&str, &str) {
        (c.status.as_str(), c.reason.as_str())
    }

    #[test]
    fn broker_reachable_follows_the_probe() {
        let mut w = World::new();
        assert_eq!(said(&broker_reachable(&w.inputs())), ("True", "QueueFound"));
        w.broker = BrokerView::NotProbed;
        assert_eq!(
            said(&broker_reachable(&w.inputs())),
            ("Unknown", "NotProbed")
        );
        w.broker = BrokerView::QueueNotFound { at: t(0) };
        let c = broker_reachable(&w.inputs());
        assert_eq!(said(&c), ("True", "QueueNotFound"));
        assert_eq!(
            c.message,
            "The broker answers but queue \"tickets.unit\" does not exist"
        );
        w.broker = unreachable("AuthenticationFailed", "bad password");
        let c = broker_reachable(&w.inputs());
        assert_eq!(said(&c), ("False", "AuthenticationFailed"));
        assert_eq!(c.message, "bad password");
    }

    #[test]
    fn degraded_names_the_most_pressing_problem() {
        let mut w = World::new();
        assert_eq!(said(&degraded(&w.inputs())), ("False", "AsExpected"));
        w.rollout = rollout(
            RolloutPhase::RolledBack,
            Some(RolloutReason::CanaryCrashedOnTickets),
        );
        assert_eq!(said(&degraded(&w.inputs())), ("True", "RolloutFailed"));
        w.diagnosis.verdict = Verdict::QueueStalled;
        assert_eq!(said(&degraded(&w.inputs())), ("True", "QueueStalled"));
        w.broker = BrokerView::QueueNotFound { at: t(0) };
        assert_eq!(said(&degraded(&w.inputs())), ("True", "QueueNotFound"));
        w.broker = unreachable("ConnectionFailed", "refused");
        let c = degraded(&w.inputs());
        assert_eq!(said(&c), ("True", "BrokerUnreachable"));
        assert_eq!(
            c.message,
            "The broker cannot be reached; holding 2 workers: refused"
        );
        w.problem = Some(ConfigProblem::InvalidUri {
            detail: "no host".into(),
        });
        assert_eq!(said(&degraded(&w.inputs())), ("True", "InvalidBrokerUri"));
    }

    #[test]
    fn ready_when_the_wanted_workers_are_ready_unless_paused_or_degraded() {
        let mut w = World::new();
        let fine = degraded(&w.inputs());
        let c = ready(&w.inputs(), &fine);
        assert_eq!(said(&c), ("True", "WorkersReady"));
        assert_eq!(c.message, "2 of 2 workers ready");
        assert_eq!(phase(&w.inputs(), &fine), Phase::Running);

        w.scaling = decision(3, 2, 2);
        let c = ready(&w.inputs(), &fine);
        assert_eq!(said(&c), ("False", "Scaling"));
        assert_eq!(c.message, "2 of 3 workers ready, 2 exist");
        assert_eq!(phase(&w.inputs(), &fine), Phase::Scaling);

        w.diagnosis.verdict = Verdict::OutOfMemory;
        w.diagnosis.message = "killed".into();
        let bad = degraded(&w.inputs());
        let c = ready(&w.inputs(), &bad);
        assert_eq!(bad.message, "killed");
        assert_eq!(
            (said(&c), c.message.as_str()),
            (
                ("False", "OutOfMemory"),
                "The pool is degraded (OutOfMemory): see the Degraded condition"
            )
        );
        assert_eq!(phase(&w.inputs(), &bad), Phase::Degraded);

        w.spec.paused = true;
        assert_eq!(said(&ready(&w.inputs(), &bad)), ("False", "Paused"));
        assert_eq!(phase(&w.inputs(), &bad), Phase::Paused);

        w.spec.paused = false;
        w.scaling = decision(0, 0, 0);
        let fine = degraded(&World::new().inputs());
        assert_eq!(phase(&w.inputs(), &fine), Phase::Idle);
    }

    #[test]
    fn rollout_complete_once_no_older_worker_is_left() {
        let mut w = World::new();
        assert_eq!(
            said(&rollout_complete(&w.inputs())),
            ("True", "FirstRevision")
        );
        w.rollout.reason = None;
        assert_eq!(said(&rollout_complete(&w.inputs())), ("True", "Promoted"));
        w.pods = vec![
            pod("old", "0", PodState::Ready, 0),
            pod("gone", "0", PodState::Terminating, 0),
        ];
        let c = rollout_complete(&w.inputs());
        assert_eq!(said(&c), ("False", "Replacing"));
        assert!(c.message.starts_with("1 worker(s)"), "{}", c.message);
        for (phase, reason) in [
            (RolloutPhase::Progressing, "CanaryRunning"),
            (RolloutPhase::Paused, "Paused"),
            (RolloutPhase::RolledBack, "RolledBack"),
        ] {
            w.rollout.phase = phase;
            let c = rollout_complete(&w.inputs());
            assert_eq!(said(&c), ("False", reason));
            // The rollout's own message is not repeated.
            assert!(c.message.ends_with("see status.rollout"), "{}", c.message);
        }
    }

    #[test]
    fn a_condition_keeps_its_transition_time_while_its_status_stays() {
        let mut w = World::new();
        let first = broker_reachable(&w.inputs());
        assert_eq!(first.last_transition_time, Some(Time(t(100))));
        assert_eq!(first.observed_generation, Some(4));
        w.previous = vec![Condition {
            last_transition_time: Some(Time(t(7))),
            reason: "Other".into(),
            ..first.clone()
        }];
        assert_eq!(
            broker_reachable(&w.inputs()).last_transition_time,
            Some(Time(t(7)))
        );
        w.broker = BrokerView::NotProbed;
        assert_eq!(
            broker_reachable(&w.inputs()).last_transition_time,
            Some(Time(t(100)))
        );
    }
}
