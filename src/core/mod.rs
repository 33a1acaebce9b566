//! The pure decision core: given a pool, what the shell observed and the time,
//! compute the plan. No clock reads, no network, no Kubernetes calls in here.
//!
//! The shell (see `controller`) gathers an [`Observed`], calls [`plan`], applies the
//! [`Plan`]'s actions and writes its status. [`plan`] is a pipeline of steps, each a
//! function of what the steps before it decided:
//!
//! ```text
//!  pool, Observed, now
//!      |
//!   observe      spec read once (settings, spec problems), previous   observe.rs
//!      |         status, crashes merged into the history
//!   rollout      stable revision, canary, promotion or rollback       rollout.rs
//!      |         and the ControllerRevisions that hold the revisions   revisions.rs
//!      |
//!   diagnosis    verdict on the stable revision's crashes             diagnosis.rs
//!      |
//!   quarantine   poison tickets in, replayed tickets out              quarantine.rs
//!      |
//!   scaling      pods to create and delete                            scaling.rs
//!      |
//!   status       one function per condition, the phase: the status    status.rs,
//!      |         complete                                             conditions.rs
//!   events       what the shell publishes                             events.rs
//!      |
//!    Plan        with the pods to create and when to look again       pipeline.rs
//! ```
//!
//! `pipeline.rs` wires the steps. Verdicts, reasons and event names are enums
//! ([`crate::crd::Verdict`], [`crate::crd::RolloutReason`], [`ConditionReason`],
//! [`EventReason`]), each written as its variant's name.

pub mod alerting;
pub mod conditions;
pub mod crash;
pub mod diagnosis;
mod events;
mod observe;
mod pipeline;
pub mod quarantine;
pub mod revisions;
pub mod rollout;
mod scaling;
mod status;

use std::time::Duration;

use jiff::Timestamp;

use crate::crd::{PoisonSpec, ScalingSpec, SpecDuration, TestRunnerPoolSpec, TestRunnerPoolStatus};

pub use conditions::{ConditionReason, ConditionStatus, ConditionType};
pub use events::{EventAction, EventReason, MAX_CRASH_EVENTS, PlannedEvent};
pub use pipeline::plan;
pub use scaling::{ScalingInput, WarmSettings, desired_workers, warm_workers};

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
    /// The pool's revisions, as its ControllerRevisions hold them.
    pub revisions: Vec<revisions::StoredRevision>,
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
    /// The Degraded condition's reason.
    pub fn reason(&self) -> ConditionReason {
        match self {
            ConfigProblem::SecretNotFound { .. } => ConditionReason::SecretNotFound,
            ConfigProblem::SecretKeyMissing { .. } => ConditionReason::SecretKeyMissing,
            ConfigProblem::InvalidUri { .. } => ConditionReason::InvalidBrokerUri,
            ConfigProblem::InvalidField { .. } => ConditionReason::InvalidSpec,
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
    /// The ControllerRevisions to create, remark and delete (before the pods are created
    /// from them).
    pub revisions: revisions::RevisionPlan,
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
    /// `scaling.warmWorkers`, when the pool asks for warm workers.
    pub warm: Option<scaling::WarmSettings>,
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
        warm: match &spec.scaling.warm_workers {
            None => None,
            Some(w) => Some(scaling::WarmSettings {
                cover: duration("spec.scaling.warmWorkers.cover", &w.cover)?,
                window: duration("spec.scaling.warmWorkers.window", &w.window)?,
                max: w.max.max(0) as u32,
            }),
        },
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
            warm: None,
        }
    }
}

/// The revision of a spec: a short, stable hash of what goes into a worker pod
/// (image, command, worker mode, template).
pub fn revision(spec: &TestRunnerPoolSpec) -> String {
    revision_of(&spec.workload)
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
