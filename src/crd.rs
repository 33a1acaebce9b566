//! The `TestRunnerPool` custom resource: spec, status and the constants shared
//! by the controller, the worker pods and the generated CRD.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, EnvFromSource, EnvVar, LocalObjectReference, PodSecurityContext,
    ResourceRequirements, SecurityContext, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use kube::core::crd::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

mod duration;
mod named;

pub use duration::{DURATION_PATTERN, SpecDuration};
pub(crate) use named::named_enum;

/// API group of the custom resource.
pub const GROUP: &str = "testrunner.dev";
/// API version of the custom resource.
pub const VERSION: &str = "v1alpha1";
/// The one field manager the operator writes with (server-side apply and status).
pub const FIELD_MANAGER: &str = "testrunner-operator";
/// Label: the pool a worker pod belongs to.
pub const LABEL_POOL: &str = "testrunner.dev/pool";
/// Label: the revision (hash of image, command and template) a worker pod runs.
pub const LABEL_REVISION: &str = "testrunner.dev/revision";
/// Label on the ControllerRevision of the pool's stable revision (value `true`).
pub const LABEL_STABLE: &str = "testrunner.dev/stable";
/// Annotation on the ControllerRevision of a rolled-back revision: the rollout reason.
pub const ANNOTATION_ROLLED_BACK: &str = "testrunner.dev/rolled-back";
/// Label: `app.kubernetes.io/name` value of worker pods.
pub const APP_NAME: &str = "testrunner-worker";
/// Label: `app.kubernetes.io/managed-by` value of worker pods.
pub const MANAGED_BY: &str = "testrunner-operator";

/// Desired state of a pool: the worker image and command, the ticket queue, and how
/// to scale.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "testrunner.dev",
    version = "v1alpha1",
    kind = "TestRunnerPool",
    plural = "testrunnerpools",
    singular = "testrunnerpool",
    shortname = "trp",
    category = "testrunner",
    namespaced,
    status = "TestRunnerPoolStatus",
    derive = "PartialEq",
    doc = "A pool of CI test workers fed by one RabbitMQ ticket queue. The operator creates worker pods for the pool, scales them to the depth of the queue and reports what it sees in status.",
    printcolumn = r#"{"name":"Image","type":"string","jsonPath":".spec.image","description":"Worker image"}"#,
    printcolumn = r#"{"name":"Desired","type":"integer","jsonPath":".status.workers.desired","description":"Workers the operator wants"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.workers.ready","description":"Workers ready to take tickets"}"#,
    printcolumn = r#"{"name":"Queue","type":"integer","jsonPath":".status.queue.ready","description":"Tickets ready in the queue"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase","description":"Pool phase"}"#,
    printcolumn = r#"{"name":"Rollout","type":"string","jsonPath":".status.rollout.phase","description":"Phase of the latest rollout: Progressing, Paused, Promoted or RolledBack"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Canary OK","type":"integer","priority":1,"jsonPath":".status.rollout.canaryTicketsOk","description":"Tickets the canary of the latest rollout completed"}"#,
    printcolumn = r#"{"name":"Canary Crashes","type":"integer","priority":1,"jsonPath":".status.rollout.canaryCrashes","description":"Crashes of the canary of the latest rollout"}"#,
    printcolumn = r#"{"name":"Quarantined","type":"integer","priority":1,"jsonPath":".status.quarantine.count","description":"Tickets in quarantine"}"#,
    printcolumn = r#"{"name":"Diagnosis","type":"string","priority":1,"jsonPath":".status.diagnosis.verdict","description":"Crash diagnosis: Healthy, PoisonTicket, BrokenEnvironment, OutOfMemory or QueueStalled"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "(has(self.queue.deliveryLimit) ? self.queue.deliveryLimit : 20) == 0 || (has(self.queue.deliveryLimit) ? self.queue.deliveryLimit : 20) > (has(self.poison) && has(self.poison.crashesToQuarantine) ? self.poison.crashesToQuarantine : 3)",
    "message": "queue.deliveryLimit (default 20) must be above poison.crashesToQuarantine (default 3), or 0: a poison ticket is quarantined before the broker's limit",
    "fieldPath": ".queue.deliveryLimit",
    "reason": "FieldValueInvalid"
}]))]
pub struct TestRunnerPoolSpec {
    /// What worker pods run: image, command, worker mode and pod template. Changing any
    /// of it makes a new revision, rolled out behind a canary (see `rollout`).
    #[serde(flatten)]
    pub workload: Workload,

    /// The RabbitMQ queue the tickets come from.
    pub queue: QueueSpec,

    /// How many workers to run for the queue depth.
    #[serde(default)]
    #[schemars(transform = not_defaulted)]
    pub scaling: ScalingSpec,

    /// How a new revision (image, command, worker or template) is rolled out: a
    /// canary judged by ticket outcomes, promotion, automatic rollback.
    #[serde(default)]
    #[schemars(transform = not_defaulted)]
    pub rollout: RolloutSpec,

    /// How crashes are diagnosed: poison tickets, broken environments, stalled queues.
    #[serde(default)]
    #[schemars(transform = not_defaulted)]
    pub poison: PoisonSpec,

    /// Where alerts go besides Kubernetes events (always published).
    #[serde(default)]
    #[schemars(transform = not_defaulted)]
    pub alerts: AlertsSpec,

    /// When true the operator stops creating and deleting worker pods and a rollout
    /// in progress stops where it is; it keeps probing the queue and reporting status.
    /// Default false.
    #[serde(default)]
    #[schemars(transform = not_defaulted)]
    pub paused: bool,
}

/// Alert receivers of a pool.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AlertsSpec {
    /// Alertmanager base URL (`http://alertmanager.monitoring:9093`): alerts are
    /// pushed to its v2 API, re-sent while active and resolved when over. None when
    /// empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://[^\s]+$"), length(max = 2048))]
    pub alertmanager_url: Option<String>,
    /// Secret key holding a webhook URL that receives a JSON notification when an
    /// alert fires and when it resolves. The URL is never logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_secret_ref: Option<SecretKeyRef>,
    /// Which alerts to send. Default: all of them. FirstCrash reports every worker
    /// crash at once, as the first sign of a poison ticket or a broken image.
    #[serde(default = "all_alerts")]
    pub on: Vec<AlertKind>,
}

impl Default for AlertsSpec {
    fn default() -> Self {
        Self {
            alertmanager_url: None,
            webhook_secret_ref: None,
            on: all_alerts(),
        }
    }
}

fn all_alerts() -> Vec<AlertKind> {
    vec![
        AlertKind::FirstCrash,
        AlertKind::PoisonTicket,
        AlertKind::BrokenEnvironment,
        AlertKind::QueueStalled,
        AlertKind::BrokerUnreachable,
        AlertKind::RolloutFailed,
    ]
}

/// An alert a pool can send.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum AlertKind {
    /// TestRunnerWorkerCrash: a worker crashed (active for 15 minutes after the last crash).
    FirstCrash,
    /// TestRunnerPoisonTicket: a ticket is in quarantine.
    PoisonTicket,
    /// TestRunnerBrokenEnvironment: workers crash whatever the ticket.
    BrokenEnvironment,
    /// TestRunnerQueueStalled: tickets wait and nothing moves.
    QueueStalled,
    /// TestRunnerBrokerUnreachable: the queue cannot be probed.
    BrokerUnreachable,
    /// TestRunnerRolloutFailed: a new revision failed its canary.
    RolloutFailed,
}

/// How a new revision is rolled out.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct RolloutSpec {
    /// Canary pods of a new revision run next to the stable ones until it is promoted.
    /// 0 skips the canary: the new revision is promoted at once and replaces the pods
    /// progressively. Default 1.
    #[schemars(range(min = 0, max = 100))]
    pub canary_workers: i32,

    /// Tickets the canaries must complete (distinct tickets, passed or failed tests)
    /// without a crash before the new revision is promoted (at most 100). Default 3.
    #[schemars(range(min = 0, max = 100))]
    pub promote_after_tickets: i32,

    /// Least time the canaries run before promotion, as a duration. Default `0s`.
    pub min_canary_time: SpecDuration,

    /// With no ticket waiting, canaries cannot be judged by tickets: they are promoted
    /// once they have run this long without a crash. Set it above `progressDeadline`
    /// to never promote without ticket evidence. Default `5m`.
    pub idle_promote_after: SpecDuration,

    /// A canary not promoted this long after it started fails the rollout. Default `10m`.
    pub progress_deadline: SpecDuration,

    /// Return to the stable revision when the canary fails: it crashed before its
    /// consume loop, crashed on two distinct tickets, or missed `progressDeadline`.
    /// When false a failed canary stays and waits for `testrunner.dev/abort` or
    /// `testrunner.dev/promote`. Default true.
    pub auto_rollback: bool,
}

/// The defaults of every field (the one place they are set).
impl Default for RolloutSpec {
    fn default() -> Self {
        Self {
            canary_workers: 1,
            promote_after_tickets: 3,
            min_canary_time: "0s".into(),
            idle_promote_after: "5m".into(),
            progress_deadline: "10m".into(),
            auto_rollback: true,
        }
    }
}

/// What a worker pod is built from: the revision-defining part of a pool's spec
/// (written in the spec at its top level), and the stable revision kept in its status.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    /// Container image of the test runner. Changing it (or command, worker or template)
    /// makes a new revision, rolled out behind a canary (see `rollout`).
    #[schemars(length(min = 1, max = 1024))]
    pub image: String,

    /// The test command run for each ticket; the ticket body arrives on its standard
    /// input. In Wrapped mode it is required. In Native mode it replaces the image's
    /// entrypoint when set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,

    /// How worker pods consume tickets: Wrapped (default) puts the operator's worker
    /// wrapper in front of `command`; Native runs an image that speaks AMQP itself and
    /// follows the ticket contract.
    #[serde(default)]
    #[schemars(transform = not_defaulted)]
    pub worker: WorkerSpec,

    /// Overrides merged into every worker pod: resources, env, volumes, scheduling,
    /// service account, grace period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<PodTemplateOverrides>,
}

/// The schema of the stable workload snapshot older statuses kept: any object (it is
/// only read back, and the spec's copy was checked when it was written).
/// Drops the schema's `default` of a spec section: the API server stores a section the
/// user left out as absent (and `kubectl describe` shows only what was written), while
/// the operator applies the same defaults when it reads the spec. Fields inside a
/// section the user wrote are still defaulted by the API server.
fn not_defaulted(schema: &mut schemars::Schema) {
    schema.remove("default");
}

fn workload_snapshot(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "Only in statuses written before revisions were kept in ControllerRevisions: what stable pods were built from. Read once to store it in a ControllerRevision, then dropped.",
        "type": "object",
        "nullable": true,
        "x-kubernetes-preserve-unknown-fields": true
    })
}

impl TestRunnerPoolSpec {
    /// The spec with its revision-defining part replaced by `workload`.
    pub fn with_workload(&self, workload: &Workload) -> TestRunnerPoolSpec {
        TestRunnerPoolSpec {
            workload: workload.clone(),
            ..self.clone()
        }
    }
}

/// Crash diagnosis settings.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct PoisonSpec {
    /// Crashes one ticket must cause, while other tickets complete on the same
    /// revision, before it is called a poison ticket. Default 3.
    #[schemars(range(min = 1, max = 100))]
    pub crashes_to_quarantine: i32,

    /// How long tickets may wait with no progress (no ticket taken, none finished)
    /// before the queue is called stalled, as a duration (`10m`). Set it above your
    /// longest test run. Default `10m`.
    pub stall_timeout: SpecDuration,

    /// Return quarantined tickets to the work queue once a new image has completed a
    /// ticket (the ticket may crash only the old image). Default true.
    pub replay_on_image_change: bool,
}

/// The defaults of every field (the one place they are set).
impl Default for PoisonSpec {
    fn default() -> Self {
        Self {
            crashes_to_quarantine: 3,
            stall_timeout: "10m".into(),
            replay_on_image_change: true,
        }
    }
}

/// How worker pods consume tickets.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerSpec {
    /// Wrapped (default): an init container copies the operator's worker wrapper into
    /// the pod, a broker sidecar alone holds the broker credentials, and the worker
    /// container runs `worker -- <command>`, taking tickets from the sidecar. Native: the
    /// image consumes the queue itself (with the credentials in its environment) and
    /// follows the ticket contract.
    #[serde(default)]
    pub mode: WorkerMode,
}

/// Worker mode.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum WorkerMode {
    /// The operator's wrapper consumes tickets and runs `command` for each.
    #[default]
    Wrapped,
    /// The image consumes tickets itself.
    Native,
}

/// The ticket queue of a pool.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QueueSpec {
    /// Name of the RabbitMQ queue holding the tickets. The operator only inspects it
    /// (passive declare); the queue must exist.
    #[schemars(length(min = 1, max = 255))]
    pub name: String,

    /// Secret key holding the broker URI (`amqp://` or `amqps://`, with credentials).
    /// The URI is never logged nor written to status, events or metrics.
    pub connection_secret_ref: SecretKeyRef,

    /// Queue that receives quarantined (poison) tickets. Default `<name>.quarantine`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub quarantine_queue: Option<String>,

    /// The work queue's delivery limit, as its `x-delivery-limit` argument or policy sets
    /// it (RabbitMQ 4 gives quorum queues 20 by default): the broker drops a ticket, or
    /// dead-letters it, once it has been delivered this many times and once more. Workers
    /// set a ticket aside into the quarantine queue at its `deliveryLimit`th delivery,
    /// before the broker can, and the operator returns it to the work queue once the pool
    /// works again: while an environment stays broken, no innocent ticket is dropped.
    /// Keep it above `poison.crashesToQuarantine`. 0 turns it off. Default 20.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100000))]
    pub delivery_limit: Option<u32>,
}

/// The delivery limit workers assume when `queue.deliveryLimit` is not set: RabbitMQ 4's
/// default for quorum queues.
pub const DEFAULT_DELIVERY_LIMIT: u32 = 20;

impl QueueSpec {
    /// The delivery limit workers set tickets aside at (0: never).
    pub fn delivery_limit(&self) -> u32 {
        self.delivery_limit.unwrap_or(DEFAULT_DELIVERY_LIMIT)
    }

    /// The quarantine queue name, defaulted from the work queue.
    pub fn quarantine_queue_name(&self) -> String {
        self.quarantine_queue
            .clone()
            .unwrap_or_else(|| format!("{}.quarantine", self.name))
    }
}

/// A key of a Secret in the pool's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret, in the pool's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key inside the Secret. Default `uri`.
    #[serde(default = "default_secret_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_secret_key() -> String {
    "uri".into()
}

/// Scaling of the worker pods to the queue depth.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self.minWorkers <= self.maxWorkers",
    "message": "minWorkers must be less than or equal to maxWorkers",
    "fieldPath": ".minWorkers",
    "reason": "FieldValueInvalid"
}]))]
pub struct ScalingSpec {
    /// Workers kept running even when the queue is empty. Default 0 (scale to zero).
    #[schemars(range(min = 0, max = 1000))]
    pub min_workers: i32,

    /// Upper bound on worker pods. Default 10.
    #[schemars(range(min = 0, max = 1000))]
    pub max_workers: i32,

    /// Tickets (ready plus in flight) per worker: desired workers =
    /// ceil(tickets / ticketsPerWorker), clamped to [minWorkers, maxWorkers]. Default 1.
    #[schemars(range(min = 1, max = 10000))]
    pub tickets_per_worker: i32,

    /// How often the queue depth is probed, as a duration (`500ms`, `2s`, `1m`).
    /// Default `2s`; at least 100ms.
    pub poll_interval: SpecDuration,

    /// How long the pool must have more workers than it needs before it scales down,
    /// as a duration (`30s`, `2m`). Default `2m`.
    pub scale_down_delay: SpecDuration,

    /// Idle workers kept started ahead of the tickets, sized from the recent arrival
    /// rate, so that a ticket finds a worker instead of waiting for a pod to start.
    /// Off when absent. Each warm worker costs its pod's time while it waits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warm_workers: Option<WarmWorkersSpec>,
}

/// The defaults of every field (the one place they are set).
impl Default for ScalingSpec {
    fn default() -> Self {
        Self {
            min_workers: 0,
            max_workers: 10,
            tickets_per_worker: 1,
            poll_interval: "2s".into(),
            scale_down_delay: "2m".into(),
            warm_workers: None,
        }
    }
}

/// Warm workers: the operator keeps as many idle workers as tickets arrive, at the
/// 99th percentile, within `cover` (Poisson arrivals at the rate of the tickets
/// completed over `window`), at most `max`, within `maxWorkers`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct WarmWorkersSpec {
    /// How long the warm workers must cover the arrivals for: the time a new worker
    /// takes to be ready (pod start-up, image pull) plus `pollInterval`. Default `30s`.
    pub cover: SpecDuration,
    /// The arrival rate is the rate of tickets completed over this window. Default `15m`.
    pub window: SpecDuration,
    /// At most this many warm workers. Default 5.
    #[schemars(range(min = 0, max = 1000))]
    pub max: i32,
}

/// The defaults of every field (the one place they are set).
impl Default for WarmWorkersSpec {
    fn default() -> Self {
        Self {
            cover: "30s".into(),
            window: "15m".into(),
            max: 5,
        }
    }
}

/// Overrides merged into every worker pod.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodTemplateOverrides {
    /// Extra labels on worker pods. The operator's own labels win on conflict.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Extra annotations on worker pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Compute resources of the worker container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Extra environment variables of the worker container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Extra environment sources (ConfigMaps, Secrets) of the worker container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env_from: Vec<EnvFromSource>,
    /// Extra volumes of the worker pod.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<Volume>,
    /// Extra volume mounts of the worker container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volume_mounts: Vec<VolumeMount>,
    /// Node selector of the worker pod.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations of the worker pod.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Affinity rules of the worker pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Service account the worker pod runs as. Default: the namespace's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// Pull secrets for the worker image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,
    /// Image pull policy of the worker container (Always, IfNotPresent, Never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^(Always|IfNotPresent|Never)$"))]
    pub image_pull_policy: Option<String>,
    /// Priority class of the worker pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// Seconds a deleted worker has to finish the ticket in hand before it is killed.
    /// Set it above your longest test run: a scale-down waits for the ticket. Default 600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 86400))]
    pub termination_grace_period_seconds: Option<i64>,
    /// Pod security context. Default: runAsNonRoot, seccomp RuntimeDefault.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_context: Option<PodSecurityContext>,
    /// Security context of the worker container. Default: no privilege escalation,
    /// all capabilities dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_security_context: Option<SecurityContext>,
}

/// Observed state of a pool, written by the operator.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TestRunnerPoolStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Summary: Idle, Running, Scaling, Degraded or Paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Conditions: Ready, BrokerReachable, Degraded, RolloutComplete.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The last queue probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<QueueStatus>,
    /// Worker pod counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<WorkersStatus>,
    /// The current crash diagnosis.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diagnosis: Option<DiagnosisStatus>,
    /// Poison tickets moved out of the work queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantine: Option<QuarantineStatus>,
    /// Recent worker crashes, newest last (at most 20): the evidence of the diagnosis.
    /// Each container termination is recorded once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub crashes: Vec<CrashStatus>,
    /// The stable revision, the latest rollout and the revision history.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
}

named_enum! {
    /// Why a rollout is in its phase (`status.rollout.reason`).
    #[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
    pub enum RolloutReason {
        /// The pool's first revision serves directly.
        FirstRevision,
        /// The status was lost: the stable revision was read back from its
        /// ControllerRevision.
        Restored,
        /// The canaries run and are being judged.
        CanaryRunning,
        /// No canary runs yet: the pool has no work.
        WaitingForWork,
        /// `spec.paused` holds the rollout.
        Paused,
        /// The broker cannot be reached: nothing to judge the canary by.
        BrokerUnreachable,
        /// The canaries completed enough tickets without a crash.
        CanaryPassed,
        /// No ticket waited; the canaries ran `idlePromoteAfter` without a crash.
        IdlePromoted,
        /// `rollout.canaryWorkers` is 0.
        NoCanary,
        /// The `testrunner.dev/promote` annotation.
        PromotedByAnnotation,
        /// The spec went back to the stable revision.
        Reverted,
        /// A newer revision replaced the one rolling out.
        Superseded,
        /// A canary crashed with no ticket in hand.
        CanaryCrashedBeforeConsuming,
        /// Canaries crashed on two tickets no stable worker crashed on.
        CanaryCrashedOnTickets,
        /// No promotion within `rollout.progressDeadline`.
        ProgressDeadlineExceeded,
        /// The `testrunner.dev/abort` annotation.
        AbortedByAnnotation,
    }
}

impl RolloutReason {
    /// True for the reasons a canary fails with (an abort is the user's choice, not a
    /// failure).
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            RolloutReason::CanaryCrashedBeforeConsuming
                | RolloutReason::CanaryCrashedOnTickets
                | RolloutReason::ProgressDeadlineExceeded
        )
    }
}

named_enum! {
    /// How a rollout ended (`status.rollout.history[].result`).
    #[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
    pub enum RolloutResult {
        /// The revision became the stable one.
        Promoted,
        /// The revision failed or was aborted; the stable one serves on.
        RolledBack,
        /// A newer revision replaced it before it ended.
        Superseded,
    }
}

/// Phase of the latest rollout.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RolloutPhase {
    /// Canaries of the new revision run next to the stable pods.
    Progressing,
    /// `spec.paused` stopped the rollout where it is.
    Paused,
    /// The spec's revision is the stable one; its pods replace older ones.
    Promoted,
    /// The new revision failed or was aborted; the stable revision serves.
    RolledBack,
}

/// The stable revision, the latest rollout and the revision history.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// Progressing, Paused, Promoted or RolledBack.
    pub phase: RolloutPhase,
    /// Why the rollout is in its phase: FirstRevision, CanaryPassed, IdlePromoted,
    /// NoCanary, PromotedByAnnotation, Reverted, CanaryCrashedBeforeConsuming,
    /// CanaryCrashedOnTickets, ProgressDeadlineExceeded, AbortedByAnnotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub reason: Option<RolloutReason>,
    /// What happens, in words.
    #[serde(default)]
    pub message: String,
    /// The revision that serves tickets.
    pub stable_revision: String,
    /// Its image.
    pub stable_image: String,
    /// The revision the spec asks for.
    pub target_revision: String,
    /// Its image.
    pub target_image: String,
    /// When the rollout to the target revision started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// When its first canary pod ran: the progress deadline and the canary times count
    /// from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_since: Option<Time>,
    /// Distinct tickets the canaries completed.
    #[serde(default)]
    pub canary_tickets_ok: i32,
    /// Canary crashes (on tickets or before taking one).
    #[serde(default)]
    pub canary_crashes: i32,
    /// Tickets the canaries completed (at most `promoteAfterTickets`), kept so that a
    /// restarted operator goes on counting.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub canary_tickets: Vec<String>,
    /// Only in statuses written before revisions were kept in ControllerRevisions: what
    /// stable pods were built from. Read once to store it in a ControllerRevision, then
    /// dropped; never written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "workload_snapshot")]
    pub stable: Option<Workload>,
    /// Ended rollouts, newest last (at most 10).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<RevisionRecord>,
    /// The last `testrunner.dev/promote` annotation value acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promote_token: Option<String>,
    /// The last `testrunner.dev/abort` annotation value acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort_token: Option<String>,
}

impl RolloutStatus {
    /// Revision `revision` (image `image`) serving alone, promoted for `reason`: no
    /// rollout in progress, no canary evidence, no history.
    pub fn serving(revision: &str, image: &str, reason: RolloutReason, message: String) -> Self {
        RolloutStatus {
            phase: RolloutPhase::Promoted,
            reason: Some(reason),
            message,
            stable_revision: revision.into(),
            stable_image: image.into(),
            target_revision: revision.into(),
            target_image: image.into(),
            started_at: None,
            canary_since: None,
            canary_tickets_ok: 0,
            canary_crashes: 0,
            canary_tickets: Vec::new(),
            stable: None,
            history: Vec::new(),
            promote_token: None,
            abort_token: None,
        }
    }
}

/// How a rollout ended.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RevisionRecord {
    /// Revision.
    pub revision: String,
    /// Its image.
    pub image: String,
    /// Promoted, RolledBack or Superseded.
    #[schemars(with = "String")]
    pub result: RolloutResult,
    /// Why, as in `reason`.
    #[serde(default)]
    pub reason: String,
    /// When.
    pub at: Time,
}

/// Annotation: a new value promotes the rollout in progress at once, skipping its
/// gates (or a rolled-back revision, retrying it without a canary).
pub const ANNOTATION_PROMOTE: &str = "testrunner.dev/promote";
/// Annotation: a new value aborts the rollout in progress and returns to the stable
/// revision.
pub const ANNOTATION_ABORT: &str = "testrunner.dev/abort";

/// The crash diagnosis of a pool.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DiagnosisStatus {
    /// Healthy, PoisonTicket, BrokenEnvironment, OutOfMemory or QueueStalled.
    #[schemars(with = "String")]
    pub verdict: Verdict,
    /// What was seen and what happens now; absent while healthy.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// The ticket a PoisonTicket verdict names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ticket: Option<String>,
    /// Since when the verdict holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,
    /// Last time the queue made progress (a ticket taken or finished).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_progress_time: Option<Time>,
    /// When the pool last came out of a broken environment (its first completion after
    /// it): the crashes before then were the environment's and count against no ticket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broken_until: Option<Time>,
}

named_enum! {
    /// A crash diagnosis (`status.diagnosis.verdict`), also the Degraded condition's reason
    /// and the reason of the event that reports it.
    #[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub enum Verdict {
        /// Nothing wrong.
        #[default]
        Healthy,
        /// One ticket crashes every worker that takes it.
        PoisonTicket,
        /// Workers crash whatever the ticket: the image, its configuration or the cluster.
        BrokenEnvironment,
        /// Workers were killed for using too much memory.
        OutOfMemory,
        /// Tickets wait and nothing moves.
        QueueStalled,
    }
}

/// Quarantined tickets.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QuarantineStatus {
    /// Tickets in quarantine.
    #[serde(default)]
    pub count: i32,
    /// The quarantined tickets, oldest first (at most 50). Workers move each to the
    /// quarantine queue when they next receive it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tickets: Vec<QuarantinedTicket>,
    /// Tickets returned from quarantine, newest last (at most 50): crashes they
    /// caused before their return no longer count against them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replayed: Vec<ReplayedTicket>,
    /// The last `testrunner.dev/replay-quarantined` annotation value acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_token: Option<String>,
    /// The last `testrunner.dev/replay-ticket` annotation value acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_ticket_token: Option<String>,
}

/// A ticket returned from quarantine.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplayedTicket {
    /// Ticket id.
    pub id: String,
    /// When it went back to the work queue.
    pub at: Time,
}

/// A quarantined ticket and the evidence against it.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QuarantinedTicket {
    /// Ticket id.
    pub id: String,
    /// Worker crashes it caused.
    pub crashes: i32,
    /// Images it crashed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<String>,
    /// Worker pods it crashed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pods: Vec<String>,
    /// How the last worker it crashed ended.
    #[serde(default)]
    pub last_exit: String,
    /// When it was quarantined.
    pub at: Time,
}

/// Annotation: a new value replays every quarantined ticket.
pub const ANNOTATION_REPLAY_ALL: &str = "testrunner.dev/replay-quarantined";
/// Annotation: a ticket id to replay from quarantine.
pub const ANNOTATION_REPLAY_TICKET: &str = "testrunner.dev/replay-ticket";

/// One worker container termination.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CrashStatus {
    /// Identity: pod uid, restart count and finish time.
    pub id: String,
    /// Worker pod.
    pub pod: String,
    /// Revision of the pod.
    #[serde(default)]
    pub revision: String,
    /// Image of the worker container.
    #[serde(default)]
    pub image: String,
    /// Ticket in hand, if the worker held one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ticket: Option<String>,
    /// Delivery number of that ticket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<i64>,
    /// What the worker said when it stopped holding no ticket: starting, idle, or an
    /// environment failure it reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// Exit code.
    pub exit_code: i32,
    /// Signal, when killed by one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// Kubernetes' reason: Error, OOMKilled, ...
    #[serde(default)]
    pub reason: String,
    /// When the container finished.
    pub at: Time,
}

named_enum! {
    /// Pool phase.
    #[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
    pub enum Phase {
        /// No tickets and no workers.
        Idle,
        /// Workers match what the queue needs.
        Running,
        /// Workers are being added or removed.
        Scaling,
        /// Something stops the pool from working as asked; see the Degraded condition.
        Degraded,
        /// `spec.paused` is true.
        Paused,
    }
}

/// A status condition, in the shape of `metav1.Condition`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Condition type: Ready, BrokerReachable or Degraded.
    #[serde(rename = "type")]
    pub type_: String,
    /// True, False or Unknown.
    pub status: String,
    /// PascalCase reason of the last transition.
    pub reason: String,
    /// Human readable detail; absent when there is nothing to add to the reason.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// When the status last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<Time>,
    /// The spec generation the condition was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The last queue probe.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QueueStatus {
    /// Tickets ready for delivery (not counting tickets held by workers).
    #[serde(default)]
    pub ready: i64,
    /// Consumers attached to the queue.
    #[serde(default)]
    pub consumers: i64,
    /// When the numbers were last read from the broker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_probe_time: Option<Time>,
}

/// Worker pod counts.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkersStatus {
    /// Workers the operator wants: those the queue needs, and never fewer than the
    /// busy ones.
    #[serde(default)]
    pub desired: i32,
    /// Worker pods that exist and are not terminating (including Pending ones).
    #[serde(default)]
    pub current: i32,
    /// Worker pods that are ready.
    #[serde(default)]
    pub ready: i32,
    /// Worker pods running a ticket, as their workers report it. A busy worker is never
    /// removed to shrink the pool.
    #[serde(default)]
    pub busy: i32,
    /// Idle workers kept warm ahead of the tickets (`scaling.warmWorkers`), counted in
    /// `desired`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub warm: i32,
    /// Since when the pool has had more workers than it needs; scale-down happens
    /// `scaling.scaleDownDelay` after this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub surplus_since: Option<Time>,
}

fn is_zero(n: &i32) -> bool {
    *n == 0
}

/// The CRD as YAML, exactly as `crds/testrunnerpools.testrunner.dev.yaml` holds it.
pub fn crd_yaml() -> String {
    let crd = TestRunnerPool::crd();
    let body = serde_saphyr::to_string(&crd).expect("the CRD serializes to YAML");
    format!(
        "# Generated by `testrunner-operator crd`; do not edit.\n---\n{}",
        body
    )
}
