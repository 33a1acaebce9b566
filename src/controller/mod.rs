//! The imperative shell: watches pools and their pods, observes the world, asks the
//! core for a plan, applies it and writes status.
//!
//! observe (Secret, probe cache, pods) → `core::plan` → apply (pods, events) → status.

mod events;
mod probes;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{Instrument, info, instrument, warn};

use crate::backoff::Backoff;
use crate::broker::{BrokerError, BrokerUri, Brokers};
use crate::core::{self, ConfigProblem, Observed, Plan};
use crate::crd::{FIELD_MANAGER, TestRunnerPool, Verdict};
use crate::metrics::{Metrics, PoolLabels, PoolReasonLabels};
use crate::pods::{self, PodSettings};

pub use probes::{ProbeKey, Probes};

/// Reconcile failures. Messages read "failed to ..."; [`Error::category`] gives the
/// static label used for metrics and event reasons.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the connection Secret failed (other than NotFound).
    #[error("failed to read Secret {name:?}: {source}")]
    ReadSecret {
        /// Secret name.
        name: String,
        /// Cause.
        source: kube::Error,
    },
    /// Listing the pool's pods failed.
    #[error("failed to list worker pods: {0}")]
    ListPods(#[source] kube::Error),
    /// Creating a worker pod failed.
    #[error("failed to create worker pod {name:?}: {source}")]
    CreatePod {
        /// Pod name.
        name: String,
        /// Cause.
        source: kube::Error,
    },
    /// Deleting a worker pod failed.
    #[error("failed to delete worker pod {name:?}: {source}")]
    DeletePod {
        /// Pod name.
        name: String,
        /// Cause.
        source: kube::Error,
    },
    /// Writing the status failed.
    #[error("failed to write pool status: {0}")]
    WriteStatus(#[source] kube::Error),
    /// The object could not be read as a TestRunnerPool.
    #[error("failed to read the pool: {0}")]
    InvalidObject(String),
    /// Reading the pool failed.
    #[error("failed to read the pool: {0}")]
    ReadPool(#[source] kube::Error),
    /// Writing the workers' quarantine list failed.
    #[error("failed to write the quarantine list: {0}")]
    WriteQuarantineList(#[source] kube::Error),
    /// A broker operation (quarantine queue, replay) failed.
    #[error("failed to {operation}")]
    Broker {
        /// What the operator was doing.
        operation: String,
        /// Cause.
        source: BrokerError,
    },
}

impl Error {
    /// Static category: metric label and event reason.
    pub fn category(&self) -> &'static str {
        match self {
            Error::ReadSecret { .. } => "ReadSecretFailed",
            Error::ListPods(_) => "ListPodsFailed",
            Error::CreatePod { .. } => "CreatePodFailed",
            Error::DeletePod { .. } => "DeletePodFailed",
            Error::WriteStatus(_) => "WriteStatusFailed",
            Error::InvalidObject(_) => "InvalidObject",
            Error::WriteQuarantineList(_) => "WriteQuarantineListFailed",
            Error::ReadPool(_) => "ReadPoolFailed",
            Error::Broker { .. } => "BrokerOperationFailed",
        }
    }
}

/// Operator settings from the command line.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Pod builder settings.
    pub pods: PodSettings,
    /// Namespaces to watch; empty means all.
    pub namespaces: Vec<String>,
    /// Name reported on events (`reportingController`).
    pub controller_name: String,
    /// Instance reported on events (`reportingInstance`), usually the pod name.
    pub instance: Option<String>,
}

impl Settings {
    /// Settings of an operator run in-process next to a simulated cluster or in a test:
    /// watching `namespaces` (all when empty), reporting every 2 s so that state changes
    /// show quickly.
    pub fn in_process(namespaces: Vec<String>) -> Self {
        Settings {
            pods: PodSettings {
                operator_image: concat!("testrunner-operator:", env!("CARGO_PKG_VERSION")).into(),
                report_interval: Duration::from_secs(2),
            },
            namespaces,
            controller_name: "testrunner-operator".into(),
            instance: Some("in-process".into()),
        }
    }
}

/// Starts the controller as a task of this process, without leader election: what
/// `simulate` and the tests run. Aborting the task stops it and its probes.
pub fn spawn(client: Client, settings: Settings) -> tokio::task::JoinHandle<()> {
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    tokio::spawn(run(client, settings, metrics, ready))
}

/// Shared state of the reconciler.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// Broker connections.
    pub brokers: Brokers,
    /// Probe tasks, one per pool.
    pub probes: Probes,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Event publisher.
    pub recorder: events::Events,
    /// Alert delivery (Alertmanager, webhook).
    pub alerter: crate::alerts::Alerter,
    /// Settings.
    pub settings: Settings,
    /// Retry delays of the pools whose last reconcile failed.
    failures: Mutex<HashMap<ObjectRef<Guarded>, Backoff>>,
}

type Guarded = DeserializeGuard<TestRunnerPool>;

impl Context {
    /// A context over `client`.
    pub fn new(client: Client, metrics: Arc<Metrics>, settings: Settings, probes: Probes) -> Self {
        let reporter = Reporter {
            controller: settings.controller_name.clone(),
            instance: settings.instance.clone(),
        };
        let alerter = crate::alerts::Alerter::start(Default::default(), metrics.clone());
        probes.set_alerter(alerter.clone());
        Self {
            alerter,
            recorder: events::Events::new(client.clone(), reporter),
            client,
            brokers: probes.brokers().clone(),
            probes,
            metrics,
            settings,
            failures: Mutex::default(),
        }
    }
}

/// Reads the broker URI from the pool's Secret, or says what is wrong with it.
async fn broker_uri(
    pool: &TestRunnerPool,
    ctx: &Context,
) -> Result<Result<BrokerUri, ConfigProblem>, Error> {
    let ns = pool.namespace().unwrap_or_default();
    let r = &pool.spec.queue.connection_secret_ref;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let secret = match secrets.get_opt(&r.name).await {
        Ok(Some(s)) => s,
        Ok(None) => {
            return Ok(Err(ConfigProblem::SecretNotFound {
                name: r.name.clone(),
            }));
        }
        Err(source) => {
            return Err(Error::ReadSecret {
                name: r.name.clone(),
                source,
            });
        }
    };
    let Some(bytes) = secret.data.as_ref().and_then(|d| d.get(&r.key)) else {
        return Ok(Err(ConfigProblem::SecretKeyMissing {
            name: r.name.clone(),
            key: r.key.clone(),
        }));
    };
    let Ok(text) = std::str::from_utf8(&bytes.0) else {
        return Ok(Err(ConfigProblem::InvalidUri {
            detail: "the Secret value is not UTF-8 text".into(),
        }));
    };
    Ok(BrokerUri::parse(text).map_err(|e| ConfigProblem::InvalidUri { detail: e.0 }))
}

/// The pool's alert receivers. A webhook Secret that cannot be read leaves the
/// webhook out (with a warning) rather than failing the reconcile.
async fn alert_receivers(pool: &TestRunnerPool, ctx: &Context) -> crate::alerts::Receivers {
    let spec = &pool.spec.alerts;
    let alertmanager_url = spec
        .alertmanager_url
        .as_deref()
        .and_then(|u| url::Url::parse(u).ok());
    let webhook_url = match &spec.webhook_secret_ref {
        None => None,
        Some(r) => {
            let secrets: Api<Secret> =
                Api::namespaced(ctx.client.clone(), &pool.namespace().unwrap_or_default());
            match secrets.get_opt(&r.name).await {
                Ok(Some(s)) => s
                    .data
                    .as_ref()
                    .and_then(|d| d.get(&r.key))
                    .and_then(|b| String::from_utf8(b.0.clone()).ok())
                    .map(|u| u.trim().to_string()),
                Ok(None) => {
                    warn!(secret = %r.name, "alert webhook Secret not found");
                    None
                }
                Err(e) => {
                    warn!(secret = %r.name, error = %e, "failed to read the alert webhook Secret");
                    None
                }
            }
        }
    };
    crate::alerts::Receivers {
        alertmanager_url,
        webhook_url,
    }
}

/// One reconcile of one pool.
#[instrument(skip(guarded, ctx), fields(namespace, pool))]
pub async fn reconcile(guarded: Arc<Guarded>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let cached = match &guarded.0 {
        Ok(pool) => pool,
        Err(invalid) => {
            warn!(error = %invalid.error, "pool does not deserialize; waiting for a change");
            return Err(Error::InvalidObject(invalid.error.clone()));
        }
    };
    let ns = cached.namespace().unwrap_or_default();
    let name = cached.name_any();
    // The status is the operator's memory (crash history, quarantine, replay tokens):
    // decide on the latest one, not on a cache that may not have seen the last write.
    let pools: Api<TestRunnerPool> = Api::namespaced(ctx.client.clone(), &ns);
    let fresh = match pools.get_opt(&name).await {
        Ok(Some(p)) => p,
        Ok(None) => return Ok(Action::await_change()),
        Err(source) => return Err(Error::ReadPool(source)),
    };
    let pool = &fresh;
    tracing::Span::current()
        .record("namespace", ns.as_str())
        .record("pool", name.as_str());

    // Observe.
    let uri = broker_uri(pool, &ctx).await?;
    let config_problem = uri.as_ref().err().cloned();
    let poll_interval = core::settings(&pool.spec).unwrap_or_default().poll_interval;
    let key = ObjectRef::from_obj(&*guarded);
    let broker = match &uri {
        Ok(uri) => ctx.probes.ensure(
            &key,
            ProbeKey {
                uri: uri.clone(),
                queue: pool.spec.queue.name.clone(),
                interval: poll_interval,
                outcomes: pods::outcomes_queue(pool),
            },
        ),
        Err(_) => {
            ctx.probes.stop(&key);
            core::BrokerView::NotProbed
        }
    };
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let pod_list = pods_api
        .list(&ListParams::default().labels(&pods::selector(&name)))
        .await
        .map_err(Error::ListPods)?;
    let uid = pool.uid();
    let owned: Vec<&Pod> = pod_list
        .items
        .iter()
        .filter(|p| {
            p.owner_references()
                .iter()
                .any(|o| Some(&o.uid) == uid.as_ref())
        })
        .collect();
    let activity = ctx.probes.activity(&key);
    let observed = Observed {
        pods: owned
            .iter()
            .map(|p| {
                let mut view = pods::view(p);
                // A reporting worker is what its last report says; until then, unknown.
                if view.activity == core::Activity::Unknown
                    && let Some(reported) = activity.get(&view.name)
                {
                    view.activity = reported.clone();
                }
                view
            })
            .collect(),
        crashes: owned
            .iter()
            .flat_map(|p| core::crash::crash_records(p))
            .collect(),
        completions: ctx.probes.completions(&key),
        broker,
        config_problem,
    };

    // Decide.
    let plan = core::plan(pool, &observed, Timestamp::now());

    // Apply.
    quarantine(pool, &plan, uri.as_ref().ok(), &ctx).await?;
    apply(pool, &plan, &pods_api, &ctx).await?;
    write_status(pool, &plan, &ctx).await?;
    let receivers = alert_receivers(pool, &ctx).await;
    let alerts = core::alerting::active_alerts(
        &ns,
        &name,
        &plan.status,
        &pool.spec.alerts.on,
        Timestamp::now(),
    );
    ctx.alerter
        .sync((ns.clone(), name.clone()), receivers, alerts);
    record_metrics(pool, &plan, &ctx.metrics);

    ctx.failures.lock().expect("lock").remove(&key);
    ctx.metrics.reconciled(started.elapsed());
    Ok(Action::requeue(plan.requeue_after))
}

/// Keeps the workers' quarantine list and the quarantine queue in step with the plan,
/// and returns replayed tickets to the work queue. The list is written before the
/// replay, so that workers stop diverting a ticket before it comes back.
async fn quarantine(
    pool: &TestRunnerPool,
    plan: &Plan,
    uri: Option<&BrokerUri>,
    ctx: &Context,
) -> Result<(), Error> {
    let had_list = pool
        .status
        .as_ref()
        .and_then(|s| s.quarantine.as_ref())
        .is_some_and(|q| !q.tickets.is_empty());
    if let Some(uri) = uri
        && plan.replay_dead_lettered
    {
        let quarantine_queue = pool.spec.queue.quarantine_queue_name();
        if matches!(
            ctx.brokers.probe(uri, &quarantine_queue).await,
            crate::broker::Probe::Depth { ready, .. } if ready > 0
        ) {
            let listed: Vec<String> = plan.quarantine_list.iter().map(|t| t.id.clone()).collect();
            let moved = ctx
                .brokers
                .replay_where(
                    uri,
                    &quarantine_queue,
                    &pool.spec.queue.name,
                    crate::broker::ReplayFilter::DeadLettered { except: &listed },
                )
                .await
                .map_err(|source| Error::Broker {
                    operation: "replay dead-lettered tickets".into(),
                    source,
                })?;
            if !moved.is_empty() {
                info!(
                    replayed = moved.len(),
                    "returned tickets the broker dead-lettered while workers crashed"
                );
                let event = Event {
                    type_: EventType::Normal,
                    reason: "TicketsReplayed".into(),
                    note: Some(truncate(
                        &format!(
                            "Returned {} ticket(s) the broker dead-lettered into {quarantine_queue} while workers crashed (the environment recovered, or a failed canary is gone): {}",
                            moved.len(),
                            moved.join(", ")
                        ),
                        1024,
                    )),
                    action: "Replay".into(),
                    secondary: None,
                };
                let _ = ctx.recorder.publish(&event, &pool.object_ref(&())).await;
            }
        }
    }
    if plan.quarantine_list.is_empty() && !had_list && plan.replay.is_empty() {
        return Ok(());
    }
    let ns = pool.namespace().unwrap_or_default();
    let name = pods::quarantine_config_map(pool);
    let list: String = plan
        .quarantine_list
        .iter()
        .map(|t| core::quarantine::list_entry(t).render())
        .collect();
    let config_map = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": pods::selector_labels(&pool.name_any()),
            "ownerReferences": [pool.controller_owner_ref(&())],
        },
        "data": {pods::QUARANTINE_KEY: list},
    });
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    cms.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&config_map),
    )
    .await
    .map_err(Error::WriteQuarantineList)?;
    let Some(uri) = uri else {
        return Ok(());
    };
    let quarantine_queue = pool.spec.queue.quarantine_queue_name();
    if !plan.quarantine_list.is_empty() {
        ctx.brokers
            .ensure_queue(uri, &quarantine_queue)
            .await
            .map_err(|source| Error::Broker {
                operation: format!("declare queue {quarantine_queue:?}"),
                source,
            })?;
    }
    if !plan.replay.is_empty() {
        let moved = ctx
            .brokers
            .replay(
                uri,
                &quarantine_queue,
                &pool.spec.queue.name,
                Some(&plan.replay),
            )
            .await
            .map_err(|source| Error::Broker {
                operation: "replay quarantined tickets".into(),
                source,
            })?;
        info!(
            replayed = moved.len(),
            asked = plan.replay.len(),
            "replayed quarantined tickets"
        );
    }
    Ok(())
}

async fn create_pod(
    pool: &TestRunnerPool,
    batch: &core::PodBatch,
    pods_api: &Api<Pod>,
    ctx: &Context,
) -> Result<(), Error> {
    let pod_name = pods::pod_name(&pool.name_any());
    let pod = pods::build_pod(pool, &pod_name, &batch.revision, &ctx.settings.pods);
    pods_api
        .patch(
            &pod_name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&pod),
        )
        .await
        .map_err(|source| Error::CreatePod {
            name: pod_name.clone(),
            source,
        })?;
    info!(pod = %pod_name, revision = %batch.revision, canary = batch.canary, "created worker pod");
    Ok(())
}

async fn apply(
    pool: &TestRunnerPool,
    plan: &Plan,
    pods_api: &Api<Pod>,
    ctx: &Context,
) -> Result<(), Error> {
    for batch in &plan.create {
        // Stable pods are built from the stable revision's snapshot, canaries from the spec.
        let mut at_revision = pool.clone();
        at_revision.spec = pool.spec.with_workload(&batch.workload);
        for _ in 0..batch.count {
            create_pod(&at_revision, batch, pods_api, ctx).await?;
        }
    }
    for pod_name in &plan.delete {
        match pods_api.delete(pod_name, &DeleteParams::default()).await {
            Ok(_) => info!(pod = %pod_name, "deleting worker pod; it drains the ticket in hand"),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(source) => {
                return Err(Error::DeletePod {
                    name: pod_name.clone(),
                    source,
                });
            }
        }
    }
    let reference = pool.object_ref(&());
    for ev in &plan.events {
        let event = Event {
            type_: if ev.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: ev.reason.to_string(),
            note: Some(truncate(&ev.note, 1024)),
            action: ev.action.to_string(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &reference).await {
            warn!(reason = %ev.reason, error = %e, "failed to publish event");
        }
    }
    Ok(())
}

async fn write_status(pool: &TestRunnerPool, plan: &Plan, ctx: &Context) -> Result<(), Error> {
    if !core::status_changed(pool.status.as_ref(), &plan.status) {
        return Ok(());
    }
    let api: Api<TestRunnerPool> =
        Api::namespaced(ctx.client.clone(), &pool.namespace().unwrap_or_default());
    let body = json!({
        "apiVersion": TestRunnerPool::api_version(&()),
        "kind": TestRunnerPool::kind(&()),
        "status": plan.status,
    });
    api.patch_status(
        &pool.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map_err(Error::WriteStatus)?;
    Ok(())
}

fn record_metrics(pool: &TestRunnerPool, plan: &Plan, metrics: &Metrics) {
    let labels = PoolLabels {
        namespace: pool.namespace().unwrap_or_default(),
        pool: pool.name_any(),
    };
    if let Some(q) = &plan.status.queue {
        metrics.queue_ready.get_or_create(&labels).set(q.ready);
        metrics
            .queue_consumers
            .get_or_create(&labels)
            .set(q.consumers);
    }
    if let Some(w) = &plan.status.workers {
        metrics
            .workers_desired
            .get_or_create(&labels)
            .set(w.desired as i64);
        metrics
            .workers_current
            .get_or_create(&labels)
            .set(w.current as i64);
        metrics
            .workers_ready
            .get_or_create(&labels)
            .set(w.ready as i64);
        metrics
            .workers_busy
            .get_or_create(&labels)
            .set(w.busy as i64);
    }
    for c in &plan.new_crashes {
        metrics
            .worker_crashes
            .get_or_create(&PoolReasonLabels {
                namespace: labels.namespace.clone(),
                pool: labels.pool.clone(),
                reason: if c.reason.is_empty() {
                    "Error".into()
                } else {
                    c.reason.clone()
                },
            })
            .inc();
    }
    metrics.quarantined_tickets.get_or_create(&labels).set(
        plan.status
            .quarantine
            .as_ref()
            .map_or(0, |q| q.count as i64),
    );
    if !plan.replay.is_empty() {
        metrics
            .replayed_tickets
            .get_or_create(&labels)
            .inc_by(plan.replay.len() as u64);
    }
    if let Some(d) = &plan.status.diagnosis {
        for &v in Verdict::ALL {
            metrics
                .verdict
                .get_or_create(&PoolReasonLabels {
                    namespace: labels.namespace.clone(),
                    pool: labels.pool.clone(),
                    reason: v.to_string(),
                })
                .set((d.verdict == v) as i64);
        }
    }
    if let Some(r) = &plan.status.rollout {
        metrics
            .rollout_failed
            .get_or_create(&labels)
            .set(core::rollout::failed(r) as i64);
        let phase = serde_json::to_value(r.phase).unwrap_or_default();
        for p in crate::metrics::ROLLOUT_PHASES {
            metrics
                .rollout_phase
                .get_or_create(&PoolReasonLabels {
                    namespace: labels.namespace.clone(),
                    pool: labels.pool.clone(),
                    reason: p.into(),
                })
                .set((phase == p) as i64);
        }
    }
    let unreachable = plan
        .status
        .conditions
        .iter()
        .any(|c| c.type_ == core::ConditionType::BrokerReachable && c.status == "False");
    metrics
        .broker_unreachable
        .get_or_create(&labels)
        .set(unreachable as i64);
}

/// Cuts `s` to at most `max` bytes on a character boundary.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max.saturating_sub(3);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// Retry delays of a pool whose reconciles fail: 1 s doubling up to 5 minutes.
fn failure_backoff() -> Backoff {
    Backoff::new(Duration::from_secs(1), Duration::from_secs(300))
}

/// What happens after a failed reconcile: an invalid object waits for a change; other
/// failures are retried with backoff and reported as a Warning event.
pub fn error_policy(guarded: Arc<Guarded>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_failed(error.category());
    let reference = guarded.object_ref(&());
    let (reason, action) = match &guarded.0 {
        // A malformed object cannot be fixed by retrying: say so once, wait for a change.
        Err(_) => ("InvalidSpec", Action::await_change()),
        Ok(_) => {
            let key = ObjectRef::from_obj(&*guarded);
            let delay = ctx
                .failures
                .lock()
                .expect("lock")
                .entry(key)
                .or_insert_with(failure_backoff)
                .failed();
            (error.category(), Action::requeue(delay))
        }
    };
    warn!(
        pool = %guarded.name_any(),
        category = error.category(),
        error = %error,
        ?action,
        "reconcile failed"
    );
    let event = Event {
        type_: EventType::Warning,
        reason: reason.into(),
        note: Some(truncate(&cause_chain(error), 1024)),
        action: "Reconcile".into(),
        secondary: None,
    };
    tokio::spawn(async move {
        if let Err(e) = ctx.recorder.publish(&event, &reference).await {
            warn!(error = %e, "failed to publish event");
        }
    });
    action
}

/// The error and its sources, each once, joined by ": ".
fn cause_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut chain = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !chain.contains(&text) {
            chain.push_str(": ");
            chain.push_str(&text);
        }
        source = s.source();
    }
    chain
}

/// Runs the controller until a shutdown signal; `ready` turns true once it runs.
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
) {
    let namespaces: Vec<Option<String>> = if settings.namespaces.is_empty() {
        vec![None]
    } else {
        settings.namespaces.iter().cloned().map(Some).collect()
    };
    let brokers = Brokers::default();
    let mut runs = Vec::new();
    // Probe tasks are spawned on their own: they end with the controller, also when
    // its future is dropped (an operator stopped in-process, or a lost Lease).
    let mut probe_sets = StopProbes(Vec::new());
    for ns in namespaces {
        let (pools, pods): (Api<Guarded>, Api<Pod>) = match &ns {
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
            ),
            None => (Api::all(client.clone()), Api::all(client.clone())),
        };
        let pod_config = watcher::Config::default().labels(&format!(
            "app.kubernetes.io/managed-by={}",
            crate::crd::MANAGED_BY
        ));
        let controller = Controller::new(pools, watcher::Config::default());
        let store = controller.store();
        let (trigger_tx, trigger_rx) = futures::channel::mpsc::unbounded();
        let probes = Probes::new(brokers.clone(), metrics.clone(), store, trigger_tx);
        probe_sets.0.push(probes.clone());
        let ctx = Arc::new(Context::new(
            client.clone(),
            metrics.clone(),
            settings.clone(),
            probes,
        ));
        let fut = controller
            .owns(pods, pod_config)
            .reconcile_on(trigger_rx)
            .shutdown_on_signal()
            .run(reconcile, error_policy, ctx)
            .for_each(|res| async move {
                if let Err(e) = res {
                    tracing::debug!(error = %e, "reconcile did not complete");
                }
            })
            .instrument(tracing::info_span!(
                "controller",
                namespace = ns.as_deref().unwrap_or("*")
            ));
        runs.push(fut);
    }
    ready.store(true, Ordering::Relaxed);
    futures::future::join_all(runs).await;
    drop(probe_sets);
}

/// Stops the probe tasks of a controller when dropped.
struct StopProbes(Vec<Probes>);

impl Drop for StopProbes {
    fn drop(&mut self) {
        for probes in &self.0 {
            probes.stop_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::fixtures::{depth, pool, t};
    use crate::crd::{RolloutPhase, RolloutReason};

    #[test]
    fn busy_workers_are_a_metric_and_go_with_the_pool() {
        use crate::core::fixtures::pod;
        use crate::core::{Activity, PodState};
        let p = pool();
        let mut busy = pod("unit-a", &core::revision(&p.spec), PodState::Ready, 0);
        busy.activity = Activity::Busy {
            ticket: "t-1".into(),
        };
        let plan = core::plan(&p, &depth(0, 1, vec![busy]), t(0));
        let metrics = Metrics::default();
        record_metrics(&p, &plan, &metrics);
        let text = metrics.encode();
        assert!(
            text.contains(r#"testrunner_workers_busy{namespace="ci",pool="unit"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"testrunner_workers_desired{namespace="ci",pool="unit"} 1"#));
        metrics.forget_pool(&PoolLabels {
            namespace: "ci".into(),
            pool: "unit".into(),
        });
        assert!(!metrics.encode().contains("testrunner_workers_busy{"));
    }

    #[test]
    fn rollout_metrics_follow_the_status_and_go_with_the_pool() {
        let p = pool();
        let mut plan = core::plan(&p, &depth(0, 0, vec![]), t(0));
        let metrics = Metrics::default();
        record_metrics(&p, &plan, &metrics);
        let text = metrics.encode();
        assert!(
            text.contains(
                r#"testrunner_rollout_phase{namespace="ci",pool="unit",reason="Promoted"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"testrunner_rollout_failed{namespace="ci",pool="unit"} 0"#));

        let rollout = plan.status.rollout.as_mut().unwrap();
        rollout.phase = RolloutPhase::RolledBack;
        rollout.reason = Some(RolloutReason::CanaryCrashedOnTickets);
        record_metrics(&p, &plan, &metrics);
        let text = metrics.encode();
        assert!(text.contains(r#"testrunner_rollout_failed{namespace="ci",pool="unit"} 1"#));
        assert!(text.contains(
            r#"testrunner_rollout_phase{namespace="ci",pool="unit",reason="RolledBack"} 1"#
        ));
        assert!(text.contains(
            r#"testrunner_rollout_phase{namespace="ci",pool="unit",reason="Promoted"} 0"#
        ));

        metrics.forget_pool(&PoolLabels {
            namespace: "ci".into(),
            pool: "unit".into(),
        });
        assert!(!metrics.encode().contains(r#"pool="unit""#));
    }
}
