//! The imperative shell: watches pools and their pods, observes the world, asks the
//! core for a plan, applies it, and sweeps what deleted pools leave behind.
//!
//! `observe` (Secret, probe cache, pods) → `core::plan` → `apply` (quarantine,
//! pods, events, status, alerts, metrics); `probes` (one queue probe per pool, one
//! outcome reader per namespace and broker), `cleanup` (series and alerts of deleted pools), `events`
//! (the event recorder).

mod apply;
mod cleanup;
mod events;
mod failures;
mod observe;
mod probes;
mod revisions;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::core::DeserializeGuard;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use tracing::{Instrument, instrument, warn};

use crate::backoff::Backoff;
use crate::broker::{BrokerError, Brokers};
use crate::core;
use crate::crd::TestRunnerPool;
use crate::metrics::Metrics;
use crate::pods::PodSettings;

pub use cleanup::Cleanup;
use failures::Failures;
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
    /// Listing the pool's ControllerRevisions failed.
    #[error("failed to list the pool's ControllerRevisions: {0}")]
    ListRevisions(#[source] kube::Error),
    /// Creating, relabelling or deleting a ControllerRevision failed.
    #[error("failed to write ControllerRevision {name:?}: {source}")]
    WriteRevision {
        /// Its name.
        name: String,
        /// Cause.
        source: kube::Error,
    },
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
    /// Every value [`Error::category`] gives (the operator exports each error counter
    /// at 0 from the start); a new variant's category goes here too.
    pub const CATEGORIES: [&'static str; 11] = [
        "ReadSecretFailed",
        "ListPodsFailed",
        "CreatePodFailed",
        "DeletePodFailed",
        "WriteStatusFailed",
        "InvalidObject",
        "WriteQuarantineListFailed",
        "ReadPoolFailed",
        "BrokerOperationFailed",
        "ListRevisionsFailed",
        "WriteRevisionFailed",
    ];

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
            Error::ListRevisions(_) => "ListRevisionsFailed",
            Error::WriteRevision { .. } => "WriteRevisionFailed",
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
                log_format: crate::telemetry::LogFormat::Pretty,
                outcome_queue_prefix: crate::pods::DEFAULT_OUTCOME_QUEUE_PREFIX.into(),
            },
            namespaces,
            controller_name: "testrunner-operator".into(),
            instance: Some("in-process".into()),
        }
    }

    /// The same settings with outcome queues `<prefix>.<namespace>`: operators that share
    /// a broker and namespace names (clusters, or tests run side by side) each need
    /// their own prefix.
    pub fn with_outcome_queue_prefix(mut self, prefix: &str) -> Self {
        self.pods.outcome_queue_prefix = prefix.into();
        self
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
    /// Probe tasks, one per pool, and outcome readers, one per namespace and broker.
    pub probes: Probes,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Event publisher.
    pub recorder: events::Events,
    /// Alert delivery (Alertmanager, webhook).
    pub alerter: crate::alerts::Alerter,
    /// What deleted pools leave behind, swept.
    pub cleanup: Cleanup,
    /// Settings.
    pub settings: Settings,
    /// The pools whose last reconcile failed, and when each is retried.
    failures: Mutex<Failures<ObjectRef<Guarded>>>,
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
        Self {
            cleanup: Cleanup::new(probes.clone(), metrics.clone(), alerter.clone()),
            alerter,
            recorder: events::Events::new(client.clone(), reporter),
            client,
            brokers: probes.brokers().clone(),
            probes,
            metrics,
            settings,
            failures: Mutex::new(Failures::new(failure_backoff)),
        }
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
    let key = ObjectRef::from_obj(&*guarded);
    // A wake (the queue probe, a pod) of a pool whose last reconcile failed waits for
    // its retry: the failure backoff holds during an API server outage.
    let hold =
        ctx.failures
            .lock()
            .expect("lock")
            .hold(&key, cached.meta().generation, Instant::now());
    if let Some(wait) = hold {
        return Ok(Action::requeue(wait));
    }
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

    let seen = observe::observe(pool, &key, &ctx).await?;
    let plan = core::plan(pool, &seen.observed, Timestamp::now());
    apply::apply(pool, &plan, &seen, &ctx).await?;
    // After the metrics and alerts: what a pool deleted meanwhile left is swept later.
    ctx.cleanup.track(&key);

    ctx.failures.lock().expect("lock").succeeded(&key);
    ctx.metrics.reconciled(started.elapsed());
    Ok(Action::requeue(plan.requeue_after))
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
        Ok(pool) => {
            let key = ObjectRef::from_obj(&*guarded);
            let delay = ctx.failures.lock().expect("lock").failed(
                key,
                pool.meta().generation,
                Instant::now(),
            );
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
    // Every error counter exists from the start at 0, so that the first failure shows in
    // `increase()` and dashboards find the series.
    for category in Error::CATEGORIES {
        let _ = metrics
            .reconcile_errors
            .get_or_create(&crate::metrics::ErrorLabels {
                category: category.into(),
            });
    }
    let brokers = Brokers::default();
    let mut runs = Vec::new();
    // Probe and sweep tasks are spawned on their own: they end with the controller,
    // also when its future is dropped (an operator stopped in-process, or a lost Lease).
    let mut tasks = StopTasks::default();
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
        tasks.probes.push(probes.clone());
        let ctx = Arc::new(Context::new(
            client.clone(),
            metrics.clone(),
            settings.clone(),
            probes,
        ));
        let sweeper = tokio::spawn(ctx.cleanup.clone().run(SWEEP_INTERVAL));
        tasks.sweepers.push(sweeper.abort_handle());
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
    drop(tasks);
}

/// How often what deleted pools left behind is swept.
const SWEEP_INTERVAL: Duration = Duration::from_secs(2);

/// Stops the probe and sweep tasks of a controller when dropped.
#[derive(Default)]
struct StopTasks {
    probes: Vec<Probes>,
    sweepers: Vec<tokio::task::AbortHandle>,
}

impl Drop for StopTasks {
    fn drop(&mut self) {
        for probes in &self.probes {
            probes.stop_all();
        }
        for sweeper in &self.sweepers {
            sweeper.abort();
        }
    }
}
