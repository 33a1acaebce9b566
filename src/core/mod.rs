//! The pure decision core: given a pool, what the shell observed and the time,
//! compute the plan. No clock reads, no network, no Kubernetes calls in here.
//!
//! The shell (see `controller`) gathers an [`Observed`], calls [`plan`], applies the
//! [`Plan`]'s actions and writes its status.

pub mod alerting;
mod conditions;
pub mod crash;
pub mod diagnosis;
pub mod quarantine;
pub mod rollout;
mod scaling;

use std::time::Duration;

use jiff::Timestamp;

use crate::crd::{
    PoisonSpec, ScalingSpec, SpecDuration, TestRunnerPool, TestRunnerPoolSpec, TestRunnerPoolStatus,
};

pub use conditions::{
    CONDITION_BROKER_REACHABLE, CONDITION_DEGRADED, CONDITION_READY, CONDITION_ROLLOUT_COMPLETE,
};
pub use scaling::{ScalingInput, desired_workers};

/// What the shell saw of the world for one pool.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observed {
    /// The pool's worker pods (owned by it), terminating ones included.
    pub pods: Vec<PodView>,
    /// The last queue probe for this pool.
    pub broker: BrokerView,
    /// A problem with the spec that the API server could not catch (missing Secret,
    /// malformed URI, ...), found while dereferencing it.
    pub config_problem: Option<ConfigProblem>,
    /// Worker container terminations the pods' status shows.
    pub crashes: Vec<crash::CrashRecord>,
    /// Ticket completions the workers reported.
    pub completions: diagnosis::Completions,
}

/// One worker pod, as far as decisions need it.
#[derive(Clone, Debug, PartialEq)]
pub struct PodView {
    /// Pod name.
    pub name: String,
    /// Value of the revision label.
    pub revision: String,
    /// Lifecycle state.
    pub state: PodState,
    /// Creation time.
    pub created: Timestamp,
    /// What its worker last reported doing.
    pub activity: Activity,
}

/// What a worker pod is doing, as its worker last reported it.
///
/// Wrapped workers report when they start consuming, when they take a ticket and
/// when they finish one, and repeat their state every report interval (the operator's
/// `--worker-report-interval`). A pod whose worker may be busy is never removed to
/// shrink the pool: only pods known to be idle (or not yet running) are.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Activity {
    /// The worker does not report (Native mode, or a pod created by an operator
    /// version without reports): removed like any pod, draining its ticket.
    #[default]
    Untracked,
    /// Reports are expected but none has arrived since the operator started reading
    /// them (operator restart, broker outage): taken as busy.
    Unknown,
    /// Consuming, no ticket in hand.
    Idle,
    /// Running this ticket.
    Busy {
        /// Ticket id.
        ticket: String,
    },
}

impl PodView {
    /// True when its worker reported a ticket in hand and it is running.
    pub fn busy(&self) -> bool {
        self.state == PodState::Ready && matches!(self.activity, Activity::Busy { .. })
    }

    /// True when removing it cannot interrupt a ticket: it is not running the consume
    /// loop yet (Pending, Starting), its worker reported being idle, or its worker does
    /// not report at all.
    pub fn removable(&self) -> bool {
        matches!(self.state, PodState::Pending | PodState::Starting)
            || matches!(self.activity, Activity::Untracked | Activity::Idle)
    }
}

/// Lifecycle of a worker pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PodState {
    /// Not yet running (unscheduled, pulling the image, init containers).
    Pending,
    /// Running but not ready (starting, or restarting after a crash).
    Starting,
    /// Running and ready.
    Ready,
    /// Being deleted: draining the ticket in hand.
    Terminating,
    /// Finished (Succeeded or Failed phase, for example evicted); it will not run again.
    Finished,
}

/// The last queue probe, as the shell's broker client reports it.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum BrokerView {
    /// No probe has completed yet.
    #[default]
    NotProbed,
    /// The queue answered.
    Depth {
        /// Ready messages.
        ready: u64,
        /// Consumers.
        consumers: u64,
        /// When it was read.
        at: Timestamp,
    },
    /// The broker answered but the queue does not exist.
    QueueNotFound {
        /// When it was read.
        at: Timestamp,
    },
    /// The broker could not be reached (connection refused, authentication, TLS, ...).
    Unreachable {
        /// PascalCase cause: ConnectionFailed, AuthenticationFailed, Timeout, ...
        reason: String,
        /// Human readable, credential-free detail.
        message: String,
        /// Since when the broker has been unreachable.
        since: Timestamp,
    },
}

/// A spec problem only the operator can see.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigProblem {
    /// The connection Secret does not exist.
    SecretNotFound {
        /// Secret name.
        name: String,
    },
    /// The Secret exists but lacks the key.
    SecretKeyMissing {
        /// Secret name.
        name: String,
        /// Key.
        key: String,
    },
    /// The URI in the Secret is not a usable AMQP URI.
    InvalidUri {
        /// What is wrong, without the URI itself.
        detail: String,
    },
    /// Some other field the schema cannot check (for example a duration out of range).
    InvalidField {
        /// JSON path of the field.
        field: String,
        /// What is wrong.
        detail: String,
    },
}

impl ConfigProblem {
    /// PascalCase reason for conditions and events.
    pub fn reason(&self) -> &'static str {
        match self {
            ConfigProblem::SecretNotFound { .. } => "SecretNotFound",
            ConfigProblem::SecretKeyMissing { .. } => "SecretKeyMissing",
            ConfigProblem::InvalidUri { .. } => "InvalidBrokerUri",
            ConfigProblem::InvalidField { .. } => "InvalidSpec",
        }
    }

    /// Human readable message.
    pub fn message(&self) -> String {
        match self {
            ConfigProblem::SecretNotFound { name } => {
                format!(
                    "Secret {name:?} referenced by spec.queue.connectionSecretRef does not exist"
                )
            }
            ConfigProblem::SecretKeyMissing { name, key } => {
                format!("Secret {name:?} has no key {key:?} (spec.queue.connectionSecretRef.key)")
            }
            ConfigProblem::InvalidUri { detail } => {
                format!("the broker URI in spec.queue.connectionSecretRef is invalid: {detail}")
            }
            ConfigProblem::InvalidField { field, detail } => format!("{field}: {detail}"),
        }
    }
}

/// An event the shell must publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedEvent {
    /// Warning or Normal.
    pub warning: bool,
    /// PascalCase reason.
    pub reason: &'static str,
    /// PascalCase action.
    pub action: &'static str,
    /// Human readable note (at most 1 kB once published).
    pub note: String,
}

/// Worker pods to create, all of one revision.
#[derive(Clone, Debug, PartialEq)]
pub struct PodBatch {
    /// Their revision.
    pub revision: String,
    /// What they are built from.
    pub workload: crate::crd::Workload,
    /// How many.
    pub count: u32,
    /// True for canary pods of a rollout.
    pub canary: bool,
}

/// Everything the shell must do for one pool after one reconcile.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// Worker pods to create.
    pub create: Vec<PodBatch>,
    /// Worker pods to delete gracefully (they drain the ticket in hand).
    pub delete: Vec<String>,
    /// The status to write (the shell skips the write when only timestamps differ).
    pub status: TestRunnerPoolStatus,
    /// Events to publish.
    pub events: Vec<PlannedEvent>,
    /// Tickets workers must move to the quarantine queue, with their evidence (the
    /// ConfigMap's list).
    pub quarantine_list: Vec<crate::crd::QuarantinedTicket>,
    /// Ticket ids to move from the quarantine queue back to the work queue.
    pub replay: Vec<String>,
    /// The environment recovered from a broken-environment episode: tickets a broker
    /// backstop dead-lettered into the quarantine queue meanwhile go back.
    pub replay_dead_lettered: bool,
    /// Crashes seen for the first time in this reconcile.
    pub new_crashes: Vec<crate::crd::CrashStatus>,
    /// When to reconcile again at the latest.
    pub requeue_after: Duration,
}

impl Plan {
    /// How many pods the plan creates, all revisions together.
    pub fn created(&self) -> u32 {
        self.create.iter().map(|b| b.count).sum()
    }
}

/// Settings parsed out of the spec, with their defaults and bounds applied.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// Queue probe interval.
    pub poll_interval: Duration,
    /// Scale-down delay.
    pub scale_down_delay: Duration,
    /// Time without queue progress before the queue is called stalled.
    pub stall_timeout: Duration,
    /// The rollout's durations.
    pub rollout: rollout::RolloutSettings,
}

/// The smallest poll interval the operator accepts.
pub const MIN_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How often a pool is reconciled when nothing happens.
pub const RESYNC: Duration = Duration::from_secs(300);
/// How soon a pool with a spec problem is looked at again.
pub const CONFIG_RETRY: Duration = Duration::from_secs(15);

/// Reads the spec's durations. The schema checks their syntax; this checks the rest.
pub fn settings(spec: &TestRunnerPoolSpec) -> Result<Settings, ConfigProblem> {
    let poll_interval = duration("spec.scaling.pollInterval", &spec.scaling.poll_interval)?;
    if poll_interval < MIN_POLL_INTERVAL {
        return Err(ConfigProblem::InvalidField {
            field: "spec.scaling.pollInterval".into(),
            detail: format!(
                "{:?} is below the minimum of 100ms",
                spec.scaling.poll_interval.as_str()
            ),
        });
    }
    Ok(Settings {
        poll_interval,
        scale_down_delay: duration(
            "spec.scaling.scaleDownDelay",
            &spec.scaling.scale_down_delay,
        )?,
        stall_timeout: duration("spec.poison.stallTimeout", &spec.poison.stall_timeout)?,
        rollout: rollout::RolloutSettings::from_spec(&spec.rollout)?,
    })
}

/// The value of the duration field at `field`, or the spec problem it is.
pub(crate) fn duration(field: &str, value: &SpecDuration) -> Result<Duration, ConfigProblem> {
    value.duration().map_err(|e| ConfigProblem::InvalidField {
        field: field.into(),
        detail: format!("{:?} is not a duration: {e}", value.as_str()),
    })
}

/// The settings of a spec that leaves every field out.
impl Default for Settings {
    fn default() -> Self {
        let (scaling, poison) = (ScalingSpec::default(), PoisonSpec::default());
        let valid = |d: &SpecDuration| d.duration().expect("the defaults are valid");
        Settings {
            poll_interval: valid(&scaling.poll_interval),
            scale_down_delay: valid(&scaling.scale_down_delay),
            stall_timeout: valid(&poison.stall_timeout),
            rollout: rollout::RolloutSettings::default(),
        }
    }
}

/// The revision of a spec: a short, stable hash of what goes into a worker pod
/// (image, command, worker mode, template).
pub fn revision(spec: &TestRunnerPoolSpec) -> String {
    revision_of(&spec.workload())
}

/// The revision of a workload (see [`revision`]).
pub fn revision_of(workload: &crate::crd::Workload) -> String {
    use sha2::{Digest, Sha256};
    let material = serde_json::json!({
        "image": workload.image,
        "command": workload.command,
        "worker": workload.worker,
        "template": workload.template,
    });
    let digest = Sha256::digest(material.to_string().as_bytes());
    digest[..5].iter().map(|b| format!("{b:02x}")).collect()
}

/// Computes the plan for one pool.
pub fn plan(pool: &TestRunnerPool, observed: &Observed, now: Timestamp) -> Plan {
    let spec = &pool.spec;
    let old_status = pool.status.clone().unwrap_or_default();
    let no_annotations = std::collections::BTreeMap::new();
    let annotations = pool
        .metadata
        .annotations
        .as_ref()
        .unwrap_or(&no_annotations);

    let parsed = settings(spec);
    let config_problem = observed
        .config_problem
        .clone()
        .or_else(|| parsed.as_ref().err().cloned())
        .or_else(|| command_problem(spec));
    // A spec problem stops scaling; the rest runs on the defaults.
    let settings = parsed.unwrap_or_default();
    let scale_down_delay = settings.scale_down_delay;

    let (crashes, fresh_crashes) = diagnosis::merge_crashes(&old_status.crashes, &observed.crashes);
    let old_quarantine = old_status.quarantine.clone().unwrap_or_default();
    let already_quarantined: Vec<String> = old_quarantine
        .tickets
        .iter()
        .map(|t| t.id.clone())
        .collect();
    let queue_ready = match observed.broker {
        BrokerView::Depth { ready, .. } => Some(ready),
        _ => None,
    };
    let rollout = rollout::decide(&rollout::RolloutInput {
        spec,
        settings: &settings.rollout,
        previous: old_status.rollout.as_ref(),
        annotations,
        pods: &observed.pods,
        crashes: &crashes,
        quarantined: &already_quarantined,
        completions: &observed.completions,
        queue_ready,
        broker_unreachable: matches!(observed.broker, BrokerView::Unreachable { .. }),
        now,
    });
    let stable = &rollout.status;
    let revision = stable.stable_revision.clone();
    let diagnosis = diagnosis::diagnose(&diagnosis::DiagnosisInput {
        crashes: &crashes,
        revision: &revision,
        completions: &observed.completions,
        crashes_to_quarantine: spec.poison.crashes_to_quarantine.max(1) as u32,
        quarantined: &already_quarantined,
        forgiven: &old_quarantine
            .replayed
            .iter()
            .map(|r| (r.id.clone(), r.at.0))
            .collect::<Vec<_>>(),
        stall_timeout: settings.stall_timeout,
        queue_ready,
        previous_ready: old_status.queue.as_ref().map(|q| q.ready),
        previous: old_status.diagnosis.as_ref(),
        paused: spec.paused,
        now,
    });

    let quarantine = quarantine::decide(&quarantine::QuarantineInput {
        old: &old_quarantine,
        diagnosis: &diagnosis,
        crashes: &crashes,
        annotations,
        // Quarantined tickets get another go once a new image is stable and completes
        // tickets: not while it is a canary.
        image: &stable.stable_image,
        replay_on_image_change: spec.poison.replay_on_image_change,
        completed_on_revision: observed.completions.last(&revision),
        queue: &spec.queue.quarantine_queue_name(),
        now,
    });
    let quarantine_list = quarantine.status.tickets.clone();
    let listed: Vec<String> = quarantine_list.iter().map(|t| t.id.clone()).collect();
    // Pods stuck on a quarantined ticket are deleted; scaling replaces them at once.
    let stuck = quarantine::stuck_pods(&observed.pods, &observed.crashes, &listed);

    let decision = scaling::decide(&ScalingInput {
        spec,
        pods: &observed.pods,
        leaving: &stuck,
        broker: &observed.broker,
        config_ok: config_problem.is_none(),
        revision: &revision,
        canary: rollout.canary.as_ref().map(|(r, n)| (r.as_str(), *n)),
        surplus_since: old_status
            .workers
            .as_ref()
            .and_then(|w| w.surplus_since.as_ref())
            .map(|t| t.0),
        scale_down_delay,
        // A broken environment keeps a small number of workers: more would only crash.
        cap: (diagnosis.verdict == diagnosis::verdict::BROKEN_ENVIRONMENT)
            .then(|| spec.scaling.min_workers.max(1)),
        // A rolled-back canary goes at once, busy or not: it drains within its grace period.
        discard: (rollout.status.phase == crate::crd::RolloutPhase::RolledBack
            && rollout.status.target_revision != rollout.status.stable_revision)
            .then_some(rollout.status.target_revision.as_str()),
        now,
    });

    let mut status = conditions::status(conditions::StatusInput {
        pool,
        old: &old_status,
        observed,
        config_problem: config_problem.as_ref(),
        decision: &decision,
        diagnosis: &diagnosis,
        rollout: &rollout.status,
        now,
    });
    let mut delete = decision.delete.clone();
    for name in stuck {
        if !delete.contains(&name) {
            delete.push(name);
        }
    }
    status.crashes = crashes;
    status.quarantine =
        (quarantine.status != Default::default()).then(|| quarantine.status.clone());
    let mut events = conditions::transition_events(&old_status, &status, config_problem.as_ref());
    events.extend(conditions::crash_events(&fresh_crashes));
    let new_crashes = fresh_crashes;
    events.extend(conditions::diagnosis_events(
        old_status.diagnosis.as_ref(),
        &diagnosis,
    ));
    events.extend(quarantine.events);
    events.extend(rollout.events.iter().cloned());
    if decision.create > 0 && !decision.replacing {
        events.push(PlannedEvent {
            warning: false,
            reason: "ScaledUp",
            action: "Scale",
            note: format!(
                "Scaling up from {} to {} workers ({} tickets ready)",
                decision.current,
                decision.current + decision.create as i32,
                decision.queue_ready
            ),
        });
    }
    if decision.scaled_down > 0 {
        events.push(PlannedEvent {
            warning: false,
            reason: "ScaledDown",
            action: "Scale",
            note: format!(
                "Scaling down from {} to {} workers; removed workers finish the ticket in hand",
                decision.current,
                decision.current - decision.scaled_down as i32
            ),
        });
    }

    let mut requeue_after = RESYNC;
    if let Some(wait) = decision.scale_down_wait {
        requeue_after = requeue_after.min(wait);
    }
    if config_problem.is_some() || matches!(observed.broker, BrokerView::Unreachable { .. }) {
        requeue_after = requeue_after.min(CONFIG_RETRY);
    }
    if let Some(wake) = rollout.wake_after {
        requeue_after = requeue_after.min(wake);
    }

    let mut create = Vec::new();
    if decision.create > 0 {
        create.push(PodBatch {
            revision: revision.clone(),
            workload: rollout.status.stable.clone(),
            count: decision.create,
            canary: false,
        });
    }
    if let (Some((canary_revision, _)), true) = (&rollout.canary, decision.create_canary > 0) {
        create.push(PodBatch {
            revision: canary_revision.clone(),
            workload: spec.workload(),
            count: decision.create_canary,
            canary: true,
        });
    }
    status.rollout = Some(rollout.status);

    Plan {
        create,
        delete,
        status,
        events,
        quarantine_list,
        replay: quarantine.replay,
        // Tickets a broker backstop dead-lettered while workers crashed go back when
        // the environment recovers or a failed canary is gone.
        replay_dead_lettered: rollout.rolled_back
            || old_status
                .diagnosis
                .as_ref()
                .is_some_and(|d| d.verdict == diagnosis::verdict::BROKEN_ENVIRONMENT)
                && diagnosis.verdict == diagnosis::verdict::HEALTHY,
        new_crashes,
        requeue_after,
    }
}

fn command_problem(spec: &TestRunnerPoolSpec) -> Option<ConfigProblem> {
    use crate::crd::WorkerMode;
    (spec.worker.mode == WorkerMode::Wrapped && spec.command.is_empty()).then(|| {
        ConfigProblem::InvalidField {
            field: "spec.command".into(),
            detail: "Wrapped mode needs the test command to run for each ticket".into(),
        }
    })
}

/// True when two statuses differ in more than their timestamps (probe time,
/// condition transition times): only then is a status write worth it.
pub fn status_changed(old: Option<&TestRunnerPoolStatus>, new: &TestRunnerPoolStatus) -> bool {
    fn strip(s: &TestRunnerPoolStatus) -> TestRunnerPoolStatus {
        let mut s = s.clone();
        if let Some(q) = s.queue.as_mut() {
            q.last_probe_time = None;
        }
        for c in &mut s.conditions {
            c.last_transition_time = None;
        }
        s
    }
    match old {
        None => true,
        Some(old) => strip(old) != strip(new),
    }
}

#[cfg(test)]
pub(crate) mod fixtures;
#[cfg(test)]
mod tests;
