//! Queue probe tasks: one per pool, every `scaling.pollInterval`. A probe wakes the
//! pool's reconcile only when its answer changes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::channel::mpsc::UnboundedSender;
use jiff::Timestamp;
use kube::core::DeserializeGuard;
use kube::runtime::reflector::{ObjectRef, Store};
use tokio::sync::watch;
use tokio::task::AbortHandle;

use crate::broker::{BrokerUri, Brokers, Probe};
use crate::contract::Report;
use crate::core::diagnosis::Completions;
use crate::core::{Activity, BrokerView};
use crate::crd::TestRunnerPool;
use crate::metrics::{Metrics, PoolLabels, PoolReasonLabels};

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
    /// The queue the pool's workers report completed tickets to.
    pub outcomes: String,
}

struct Task {
    key: ProbeKey,
    latest: watch::Receiver<BrokerView>,
    completions: Arc<Mutex<Completions>>,
    activity: Arc<Mutex<Activities>>,
    handle: AbortHandle,
}

/// What each worker pod last reported holding (`None`: idle), and when, as read by
/// the current outcome consumer. Emptied when that consumer is set up again: reports
/// may have been missed meanwhile, so every pod is unknown until it reports again.
#[derive(Debug, Default)]
pub struct Activities(HashMap<String, (Option<String>, Instant)>);

impl Activities {
    fn record(&mut self, pod: &str, holds: Option<&str>) {
        self.0
            .insert(pod.to_string(), (holds.map(String::from), Instant::now()));
    }

    /// Forgets pods that stopped reporting for ten minutes (deleted pods); a pod still
    /// there is unknown again, never idle.
    fn prune(&mut self) {
        let keep = Duration::from_secs(600);
        self.0.retain(|_, (_, at)| at.elapsed() < keep);
    }

    /// What `pod` reported, if it did.
    pub fn of(&self, pod: &str) -> Option<Activity> {
        self.0.get(pod).map(|(holds, _)| match holds {
            Some(ticket) => Activity::Busy {
                ticket: ticket.clone(),
            },
            None => Activity::Idle,
        })
    }
}

/// Completions wake a reconcile at most this often.
const COMPLETION_WAKE: Duration = Duration::from_secs(2);

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

    /// True while the controller's store holds `pool` (it is not deleted).
    pub fn holds(&self, pool: &ObjectRef<Guarded>) -> bool {
        self.0.store.get(pool).is_some()
    }

    /// True while a probe task runs for `pool`.
    pub fn probing(&self, pool: &ObjectRef<Guarded>) -> bool {
        self.0.tasks.lock().expect("lock").contains_key(pool)
    }

    /// The shared broker connections.
    pub fn brokers(&self) -> &Brokers {
        &self.0.brokers
    }

    /// Makes sure a task probes `key` for `pool`, and returns its latest answer.
    pub fn ensure(&self, pool: &ObjectRef<Guarded>, key: ProbeKey) -> BrokerView {
        let mut tasks = self.0.tasks.lock().expect("lock");
        let mut carried = BrokerView::NotProbed;
        let mut completions = Arc::new(Mutex::new(Completions::default()));
        let activity = Arc::new(Mutex::new(Activities::default()));
        if let Some(task) = tasks.get(pool) {
            if task.key == key && !task.handle.is_finished() {
                return task.latest.borrow().clone();
            }
            if task.key.uri == key.uri && task.key.queue == key.queue {
                carried = task.latest.borrow().clone();
                completions = task.completions.clone();
            }
            task.handle.abort();
            let old_uri = task.key.uri.clone();
            tasks.remove(pool);
            self.release_if_unused(&tasks, &old_uri);
        }
        let (tx, rx) = watch::channel(carried.clone());
        let handle = tokio::spawn(probe_loop(
            self.clone(),
            pool.clone(),
            key.clone(),
            tx,
            completions.clone(),
            activity.clone(),
        ))
        .abort_handle();
        tasks.insert(
            pool.clone(),
            Task {
                key,
                latest: rx,
                completions,
                activity,
                handle,
            },
        );
        carried
    }

    /// The ticket completions `pool`'s workers reported since this operator started.
    pub fn completions(&self, pool: &ObjectRef<Guarded>) -> Completions {
        self.0
            .tasks
            .lock()
            .expect("lock")
            .get(pool)
            .map(|t| t.completions.lock().expect("lock").clone())
            .unwrap_or_default()
    }

    /// What `pod` of `pool` last reported doing, if its report was read.
    pub fn activity(&self, pool: &ObjectRef<Guarded>) -> HashMap<String, Activity> {
        let tasks = self.0.tasks.lock().expect("lock");
        let Some(task) = tasks.get(pool) else {
            return HashMap::new();
        };
        let activities = task.activity.lock().expect("lock");
        activities
            .0
            .keys()
            .filter_map(|pod| Some((pod.clone(), activities.of(pod)?)))
            .collect()
    }

    /// Stops probing for `pool`.
    pub fn stop(&self, pool: &ObjectRef<Guarded>) {
        let mut tasks = self.0.tasks.lock().expect("lock");
        if let Some(task) = tasks.remove(pool) {
            task.handle.abort();
            self.release_if_unused(&tasks, &task.key.uri);
        }
    }

    /// Stops every probe task and closes their broker connections: the controller
    /// stopped. A task left running would go on reading the workers' outcome reports
    /// (without acks), so a controller started after it would miss them.
    pub fn stop_all(&self) {
        let tasks: Vec<Task> = self
            .0
            .tasks
            .lock()
            .expect("lock")
            .drain()
            .map(|(_, task)| task)
            .collect();
        for task in &tasks {
            task.handle.abort();
        }
        // Closing a connection takes a task of its own: not possible once the runtime is gone.
        if tokio::runtime::Handle::try_current().is_ok() {
            for task in &tasks {
                self.0.brokers.forget(&task.key.uri);
            }
        }
    }

    /// Closes the connection to `uri` once no pool probes it (a rotated password or
    /// a deleted pool must not leave connections behind).
    fn release_if_unused(&self, tasks: &HashMap<ObjectRef<Guarded>, Task>, uri: &BrokerUri) {
        if !tasks.values().any(|t| &t.key.uri == uri) {
            self.0.brokers.forget(uri);
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

async fn probe_loop(
    probes: Probes,
    pool: ObjectRef<Guarded>,
    key: ProbeKey,
    tx: watch::Sender<BrokerView>,
    completions: Arc<Mutex<Completions>>,
    activity: Arc<Mutex<Activities>>,
) {
    let inner = &probes.0;
    let labels = PoolLabels {
        namespace: pool.namespace.clone().unwrap_or_default(),
        pool: pool.name.clone(),
    };
    // Each failure counter exists from the first probe on at 0, so that the first failure
    // shows in `increase()` (`forget_pool` removes them with the pool).
    for reason in Probe::FAILURE_REASONS {
        let _ = inner
            .metrics
            .probe_failures
            .get_or_create(&PoolReasonLabels {
                namespace: labels.namespace.clone(),
                pool: labels.pool.clone(),
                reason: (*reason).into(),
            });
    }
    let mut last: Option<Probe> = None;
    let mut outcomes: Option<lapin::Consumer> = None;
    let mut last_wake: Option<Instant> = None;
    // A wake held back by the rate limit goes out with the next probe.
    let mut wake_pending = false;
    let mut unreachable_since: Option<Timestamp> = match &*tx.borrow() {
        BrokerView::Unreachable { since, .. } => Some(*since),
        _ => None,
    };
    loop {
        if !probes.holds(&pool) {
            // The pool is gone: its outcome queue and task go with it (its series and
            // alerts are swept once the task has ended, see `cleanup`).
            drop(outcomes.take());
            if let Err(why) = inner.brokers.delete_queue(&key.uri, &key.outcomes).await {
                // It expires by itself an hour after its last use.
                tracing::debug!(queue = %key.outcomes, error = %why, "outcome queue not deleted");
            }
            let mut tasks = inner.tasks.lock().expect("lock");
            tasks.remove(&pool);
            probes.release_if_unused(&tasks, &key.uri);
            return;
        }
        let started = Instant::now();
        let probe = inner.brokers.probe(&key.uri, &key.queue).await;
        inner
            .metrics
            .probe_duration
            .observe(started.elapsed().as_secs_f64());
        if let Some(reason) = probe.failure_reason() {
            inner
                .metrics
                .probe_failures
                .get_or_create(&PoolReasonLabels {
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
        if last.as_ref() != Some(&probe) || wake_pending {
            wake_pending = false;
            last_wake = Some(Instant::now());
            let _ = inner.trigger.unbounded_send(pool.clone());
        }
        activity.lock().expect("lock").prune();
        if matches!(probe, Probe::Depth { .. }) && outcomes.is_none() {
            match inner
                .brokers
                .consume_outcomes(&key.uri, &key.outcomes)
                .await
            {
                Ok(c) => {
                    // Reports may have been lost while no consumer read them: every
                    // worker is unknown again until it reports (at most one report
                    // interval), so none is taken for idle by mistake.
                    activity.lock().expect("lock").0.clear();
                    outcomes = Some(c);
                }
                Err(p) => {
                    tracing::debug!(queue = %key.outcomes, ?p, "outcome queue not consumed yet")
                }
            }
        }
        last = Some(probe);

        // Wait for the next probe, reading outcome reports meanwhile.
        let next_probe = tokio::time::sleep(key.interval);
        tokio::pin!(next_probe);
        loop {
            let report = async {
                match outcomes.as_mut() {
                    Some(c) => c.next().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = &mut next_probe => break,
                report = report => match report {
                    Some(Ok(delivery)) => {
                        let Some(report) = Report::parse(&delivery.data) else {
                            continue;
                        };
                        if let Some(ms) = report.waited_ms {
                            inner.metrics.ticket_wait.get_or_create(&labels).observe(ms as f64 / 1000.0);
                        }
                        let mut changed = false;
                        if let Some(ticket) = report.completed() {
                            completions.lock().expect("lock").record(&report.revision, ticket, Timestamp::now());
                            changed = true;
                        }
                        if let Some(holds) = report.holds() && !report.pod.is_empty() {
                            let mut activity = activity.lock().expect("lock");
                            let before = activity.of(&report.pod);
                            activity.record(&report.pod, holds);
                            changed |= activity.of(&report.pod) != before;
                        }
                        if changed {
                            if last_wake.is_none_or(|w: Instant| w.elapsed() >= COMPLETION_WAKE) {
                                last_wake = Some(Instant::now());
                                let _ = inner.trigger.unbounded_send(pool.clone());
                            } else {
                                wake_pending = true;
                            }
                        }
                    }
                    // The consumer ended (connection lost): set it up again later.
                    _ => outcomes = None,
                },
            }
        }
    }
}
