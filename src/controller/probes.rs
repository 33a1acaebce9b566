//! Queue probe tasks: one per pool, every `scaling.pollInterval`. A probe wakes the
//! pool's reconcile only when its answer changes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::channel::mpsc::UnboundedSender;
use jiff::Timestamp;
use kube::core::DeserializeGuard;
use kube::runtime::reflector::{ObjectRef, Store};
use tokio::sync::watch;
use tokio::task::AbortHandle;

use crate::broker::{BrokerUri, Brokers, Probe};
use crate::core::BrokerView;
use crate::crd::TestRunnerPool;
use crate::metrics::{Metrics, PoolLabels, ProbeFailureLabels};

type Guarded = DeserializeGuard<TestRunnerPool>;

/// What a probe task probes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeKey {
    /// The broker.
    pub uri: BrokerUri,
    /// The queue.
    pub queue: String,
    /// How often.
    pub interval: Duration,
}

struct Task {
    key: ProbeKey,
    latest: watch::Receiver<BrokerView>,
    handle: AbortHandle,
}

struct Inner {
    brokers: Brokers,
    metrics: Arc<Metrics>,
    store: Store<Guarded>,
    trigger: UnboundedSender<ObjectRef<Guarded>>,
    tasks: Mutex<HashMap<ObjectRef<Guarded>, Task>>,
}

/// The probe tasks of one controller.
#[derive(Clone)]
pub struct Probes(Arc<Inner>);

impl Probes {
    /// Probe tasks sharing `brokers`; `store` tells when a pool is gone, `trigger`
    /// wakes a pool's reconcile.
    pub fn new(
        brokers: Brokers,
        metrics: Arc<Metrics>,
        store: Store<Guarded>,
        trigger: UnboundedSender<ObjectRef<Guarded>>,
    ) -> Self {
        Self(Arc::new(Inner {
            brokers,
            metrics,
            store,
            trigger,
            tasks: Mutex::default(),
        }))
    }

    /// The shared broker connections.
    pub fn brokers(&self) -> &Brokers {
        &self.0.brokers
    }

    /// Makes sure a task probes `key` for `pool`, and returns its latest answer.
    pub fn ensure(&self, pool: &ObjectRef<Guarded>, key: ProbeKey) -> BrokerView {
        let mut tasks = self.0.tasks.lock().expect("lock");
        let mut carried = BrokerView::NotProbed;
        if let Some(task) = tasks.get(pool) {
            if task.key == key && !task.handle.is_finished() {
                return task.latest.borrow().clone();
            }
            if task.key.uri == key.uri && task.key.queue == key.queue {
                carried = task.latest.borrow().clone();
            }
            task.handle.abort();
        }
        let (tx, rx) = watch::channel(carried.clone());
        let handle = tokio::spawn(probe_loop(self.clone(), pool.clone(), key.clone(), tx)).abort_handle();
        tasks.insert(
            pool.clone(),
            Task {
                key,
                latest: rx,
                handle,
            },
        );
        carried
    }

    /// Stops probing for `pool`.
    pub fn stop(&self, pool: &ObjectRef<Guarded>) {
        if let Some(task) = self.0.tasks.lock().expect("lock").remove(pool) {
            task.handle.abort();
        }
    }

    /// Pools being probed.
    pub fn len(&self) -> usize {
        self.0.tasks.lock().expect("lock").len()
    }

    /// True when no pool is probed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

async fn probe_loop(probes: Probes, pool: ObjectRef<Guarded>, key: ProbeKey, tx: watch::Sender<BrokerView>) {
    let inner = &probes.0;
    let labels = PoolLabels {
        namespace: pool.namespace.clone().unwrap_or_default(),
        pool: pool.name.clone(),
    };
    let mut last: Option<Probe> = None;
    let mut unreachable_since: Option<Timestamp> = match &*tx.borrow() {
        BrokerView::Unreachable { since, .. } => Some(*since),
        _ => None,
    };
    loop {
        if inner.store.get(&pool).is_none() {
            // The pool is gone: its series and task go with it.
            inner.metrics.forget_pool(&labels);
            inner.tasks.lock().expect("lock").remove(&pool);
            return;
        }
        let started = Instant::now();
        let probe = inner.brokers.probe(&key.uri, &key.queue).await;
        inner.metrics.probe_duration.observe(started.elapsed().as_secs_f64());
        if let Some(reason) = probe.failure_reason() {
            inner
                .metrics
                .probe_failures
                .get_or_create(&ProbeFailureLabels {
                    namespace: labels.namespace.clone(),
                    pool: labels.pool.clone(),
                    reason: reason.into(),
                })
                .inc();
        }
        let now = Timestamp::now();
        let view = match &probe {
            Probe::Depth { ready, consumers } => {
                unreachable_since = None;
                BrokerView::Depth {
                    ready: *ready,
                    consumers: *consumers,
                    at: now,
                }
            }
            Probe::QueueNotFound => {
                unreachable_since = None;
                BrokerView::QueueNotFound { at: now }
            }
            Probe::Unreachable { reason, message } => BrokerView::Unreachable {
                reason: (*reason).into(),
                message: message.clone(),
                since: *unreachable_since.get_or_insert(now),
            },
        };
        tx.send_replace(view);
        if last.as_ref() != Some(&probe) {
            let _ = inner.trigger.unbounded_send(pool.clone());
        }
        last = Some(probe);
        tokio::time::sleep(key.interval).await;
    }
}
