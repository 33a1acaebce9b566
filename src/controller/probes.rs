//! Queue probe tasks: one per pool, every `scaling.pollInterval`. A probe wakes the
//! pool's reconcile only when its answer changes.
//!
//! Outcome readers: one per broker and namespace, shared by the namespace's pools on
//! that broker. A reader consumes the namespace's outcome queue (`<prefix>.<namespace>`)
//! on one channel and hands each report to the pool it names. While a pool still has
//! pods of an older operator, which report on a queue of their pool's own, the reader
//! consumes that queue too, until those pods are gone.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::channel::mpsc::UnboundedSender;
use jiff::Timestamp;
use kube::core::DeserializeGuard;
use kube::runtime::reflector::{ObjectRef, Store};
use tokio::sync::{Notify, watch};
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
    /// The outcome queue of the pool's namespace, which its workers report to.
    pub outcomes: String,
}

impl ProbeKey {
    fn reader(&self) -> ReaderKey {
        ReaderKey {
            uri: self.uri.clone(),
            queue: self.outcomes.clone(),
        }
    }
}

struct Task {
    key: ProbeKey,
    latest: watch::Receiver<BrokerView>,
    reports: Reports,
    handle: AbortHandle,
}

/// What a pool learns from its workers' reports, shared by its probe task and the
/// outcome reader of its namespace.
#[derive(Clone, Default)]
struct Reports {
    completions: Arc<Mutex<Completions>>,
    activity: Arc<Mutex<Activities>>,
    wakes: Arc<Mutex<Wakes>>,
}

/// When reports last woke the pool's reconcile, and whether one is held back.
#[derive(Default)]
struct Wakes {
    last: Option<Instant>,
    pending: bool,
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

/// An outcome reader: a broker and a namespace's outcome queue on it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ReaderKey {
    uri: BrokerUri,
    queue: String,
}

struct Reader {
    /// The pools it reads for, by name.
    members: HashMap<String, Member>,
    /// Queues of pools' own to delete once nobody reads them (their old pods are gone,
    /// or their pool was deleted).
    retired: BTreeSet<String>,
    /// Whether the last pool to leave was deleted: then the queue goes with it.
    deleted: bool,
    /// Wakes the reader's task when its members change.
    wake: Arc<Notify>,
    handle: AbortHandle,
}

struct Member {
    pool: ObjectRef<Guarded>,
    uid: Option<String>,
    interval: Duration,
    reports: Reports,
    /// Other queues the pool's pods report to (pods of an older operator).
    legacy: BTreeSet<String>,
    /// Of those read, the ones to delete once no pod of the pool names them (the pool's
    /// own queue).
    disposable: BTreeSet<String>,
}

#[derive(Default)]
struct State {
    tasks: HashMap<ObjectRef<Guarded>, Task>,
    readers: HashMap<ReaderKey, Reader>,
}

struct Inner {
    brokers: Brokers,
    metrics: Arc<Metrics>,
    store: Store<Guarded>,
    trigger: UnboundedSender<ObjectRef<Guarded>>,
    state: Mutex<State>,
}

/// The probe tasks and outcome readers of one controller.
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
            state: Mutex::default(),
        }))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.state.lock().expect("lock")
    }

    /// True while the controller's store holds `pool` (it is not deleted).
    pub fn holds(&self, pool: &ObjectRef<Guarded>) -> bool {
        self.0.store.get(pool).is_some()
    }

    /// True while a probe task runs for `pool`.
    pub fn probing(&self, pool: &ObjectRef<Guarded>) -> bool {
        self.state().tasks.contains_key(pool)
    }

    /// The shared broker connections.
    pub fn brokers(&self) -> &Brokers {
        &self.0.brokers
    }

    /// Makes sure a task probes `key` for `pool` (whose uid is `uid`) and that the
    /// outcome reader of its namespace reads for it; returns the latest answer.
    pub fn ensure(
        &self,
        pool: &ObjectRef<Guarded>,
        key: ProbeKey,
        uid: Option<String>,
    ) -> BrokerView {
        let mut state = self.state();
        let mut carried = BrokerView::NotProbed;
        let mut reports = Reports::default();
        let mut left = None;
        if let Some(task) = state.tasks.get(pool) {
            if task.key == key && !task.handle.is_finished() {
                let view = task.latest.borrow().clone();
                // A pool deleted and made again under the same name: its workers'
                // reports name the new uid.
                if let Some(member) = state
                    .readers
                    .get_mut(&key.reader())
                    .and_then(|r| r.members.get_mut(&pool.name))
                {
                    member.uid = uid;
                }
                return view;
            }
            if task.key.uri == key.uri && task.key.queue == key.queue {
                carried = task.latest.borrow().clone();
                reports.completions = task.reports.completions.clone();
            }
            task.handle.abort();
            let old = task.key.clone();
            state.tasks.remove(pool);
            if old.reader() != key.reader() {
                leave(&mut state, &old.reader(), &pool.name, false);
            }
            left = Some(old.uri);
        }
        let (tx, rx) = watch::channel(carried.clone());
        let handle = tokio::spawn(probe_loop(
            self.clone(),
            pool.clone(),
            key.clone(),
            tx,
            reports.clone(),
        ))
        .abort_handle();
        self.join(&mut state, pool, &key, uid, reports.clone());
        state.tasks.insert(
            pool.clone(),
            Task {
                key,
                latest: rx,
                reports,
                handle,
            },
        );
        if let Some(uri) = left {
            self.release_if_unused(&state, &uri);
        }
        carried
    }

    /// Makes `pool` a member of the outcome reader of `key`, starting the reader if
    /// it is the first.
    fn join(
        &self,
        state: &mut State,
        pool: &ObjectRef<Guarded>,
        key: &ProbeKey,
        uid: Option<String>,
        reports: Reports,
    ) {
        let reader_key = key.reader();
        let reader = state.readers.entry(reader_key.clone()).or_insert_with(|| {
            let wake = Arc::new(Notify::new());
            let handle =
                tokio::spawn(reader_loop(self.clone(), reader_key, wake.clone())).abort_handle();
            Reader {
                members: HashMap::new(),
                retired: BTreeSet::new(),
                deleted: false,
                wake,
                handle,
            }
        });
        let (legacy, disposable) = reader
            .members
            .remove(&pool.name)
            .map(|m| (m.legacy, m.disposable))
            .unwrap_or_default();
        reader.members.insert(
            pool.name.clone(),
            Member {
                pool: pool.clone(),
                uid,
                interval: key.interval,
                reports,
                legacy,
                disposable,
            },
        );
        reader.wake.notify_one();
    }

    /// Tells the outcome reader which other queues `pool`'s pods report to (pods of an
    /// older operator, on a queue of their pool's own): it reads them as long as they are
    /// named, and deletes those of them in `disposable` once they are not any more, or
    /// with the pool.
    pub fn read_legacy(
        &self,
        pool: &ObjectRef<Guarded>,
        queues: BTreeSet<String>,
        disposable: BTreeSet<String>,
    ) {
        let mut state = self.state();
        let Some(key) = state.tasks.get(pool).map(|t| t.key.reader()) else {
            return;
        };
        let Some(reader) = state.readers.get_mut(&key) else {
            return;
        };
        let Some(member) = reader.members.get_mut(&pool.name) else {
            return;
        };
        let queues: BTreeSet<String> = queues.into_iter().filter(|q| *q != key.queue).collect();
        // Only a queue the reader has read is deleted: one that no pod of the pool named
        // since this operator started expires by itself.
        member
            .disposable
            .extend(disposable.into_iter().filter(|q| queues.contains(q)));
        if member.legacy == queues {
            return;
        }
        let gone: Vec<String> = member
            .legacy
            .difference(&queues)
            .filter(|q| member.disposable.contains(*q))
            .cloned()
            .collect();
        for queue in &gone {
            member.disposable.remove(queue);
        }
        member.legacy = queues;
        reader.retired.extend(gone);
        reader.wake.notify_one();
    }

    /// The ticket completions `pool`'s workers reported since this operator started.
    pub fn completions(&self, pool: &ObjectRef<Guarded>) -> Completions {
        self.state()
            .tasks
            .get(pool)
            .map(|t| t.reports.completions.lock().expect("lock").clone())
            .unwrap_or_default()
    }

    /// What `pod` of `pool` last reported doing, if its report was read.
    pub fn activity(&self, pool: &ObjectRef<Guarded>) -> HashMap<String, Activity> {
        let state = self.state();
        let Some(task) = state.tasks.get(pool) else {
            return HashMap::new();
        };
        let activities = task.reports.activity.lock().expect("lock");
        activities
            .0
            .keys()
            .filter_map(|pod| Some((pod.clone(), activities.of(pod)?)))
            .collect()
    }

    /// Stops probing for `pool`.
    pub fn stop(&self, pool: &ObjectRef<Guarded>) {
        let mut state = self.state();
        if let Some(task) = state.tasks.remove(pool) {
            task.handle.abort();
            leave(&mut state, &task.key.reader(), &pool.name, false);
            self.release_if_unused(&state, &task.key.uri);
        }
    }

    /// Stops every probe task and outcome reader and closes their broker connections:
    /// the controller stopped. A reader left running would go on reading the workers'
    /// reports (without acks), so a controller started after it would miss them.
    pub fn stop_all(&self) {
        let (tasks, readers) = {
            let mut state = self.state();
            let tasks: Vec<Task> = state.tasks.drain().map(|(_, t)| t).collect();
            let readers: Vec<(ReaderKey, Reader)> = state.readers.drain().collect();
            (tasks, readers)
        };
        for task in &tasks {
            task.handle.abort();
        }
        for (_, reader) in &readers {
            reader.handle.abort();
        }
        // Closing a connection takes a task of its own: not possible once the runtime is gone.
        if tokio::runtime::Handle::try_current().is_ok() {
            let uris = tasks
                .iter()
                .map(|t| &t.key.uri)
                .chain(readers.iter().map(|(k, _)| &k.uri));
            for uri in uris {
                self.0.brokers.forget(uri);
            }
        }
    }

    /// Closes the connection to `uri` once no pool probes it and no reader reads on it
    /// (a rotated password or a deleted pool must not leave connections behind).
    fn release_if_unused(&self, state: &State, uri: &BrokerUri) {
        if !state.tasks.values().any(|t| &t.key.uri == uri)
            && !state.readers.keys().any(|k| &k.uri == uri)
        {
            self.0.brokers.forget(uri);
        }
    }

    /// Pools being probed.
    pub fn len(&self) -> usize {
        self.state().tasks.len()
    }

    /// True when no pool is probed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Outcome readers running: one per broker and namespace with pools.
    pub fn outcome_readers(&self) -> usize {
        self.state().readers.len()
    }
}

/// Takes `pool` out of the reader of `key`; with `deleted` (the pool is gone), the
/// queues of its own it read go, and the namespace's queue too if it was the last.
fn leave(state: &mut State, key: &ReaderKey, pool: &str, deleted: bool) {
    let Some(reader) = state.readers.get_mut(key) else {
        return;
    };
    if let Some(member) = reader.members.remove(pool)
        && deleted
    {
        reader.retired.extend(member.disposable);
    }
    if reader.members.is_empty() {
        reader.deleted = deleted;
    }
    reader.wake.notify_one();
}

impl Reports {
    /// Wakes `pool`'s reconcile now, or with its next probe when the last wake is
    /// recent.
    fn wake(&self, probes: &Probes, pool: &ObjectRef<Guarded>) {
        let mut wakes = self.wakes.lock().expect("lock");
        if wakes
            .last
            .is_none_or(|w: Instant| w.elapsed() >= COMPLETION_WAKE)
        {
            wakes.last = Some(Instant::now());
            wakes.pending = false;
            let _ = probes.0.trigger.unbounded_send(pool.clone());
        } else {
            wakes.pending = true;
        }
    }

    /// Takes in one report; true when it changed what the pool knows.
    fn record(&self, report: &Report) -> bool {
        let mut changed = false;
        if let Some(ticket) = report.completed() {
            self.completions.lock().expect("lock").record(
                &report.revision,
                ticket,
                Timestamp::now(),
            );
            changed = true;
        }
        if let Some(holds) = report.holds()
            && !report.pod.is_empty()
        {
            let mut activity = self.activity.lock().expect("lock");
            let before = activity.of(&report.pod);
            activity.record(&report.pod, holds);
            changed |= activity.of(&report.pod) != before;
        }
        changed
    }
}

/// The pool a report read on a namespace's outcome queue belongs to: the pool it names,
/// unless it names another uid (a worker of a deleted pool of the same name); for a
/// report that names none (a worker of an older operator, or a Native image that does
/// not say), the pool whose own queue it came from (`owner`), else the pool its pod is
/// named after (`<pool>-xxxxx`). `uid_of` gives a member pool's uid (`Some(None)`: a
/// member whose uid is not known). `None`: no pool of the reader; the report is dropped.
fn route(
    report: &Report,
    owner: Option<&str>,
    uid_of: impl Fn(&str) -> Option<Option<String>>,
) -> Option<String> {
    if !report.pool.is_empty() {
        let uid = uid_of(&report.pool)?;
        if let Some(uid) = uid
            && !report.pool_uid.is_empty()
            && report.pool_uid != uid
        {
            return None;
        }
        return Some(report.pool.clone());
    }
    if let Some(owner) = owner {
        return uid_of(owner).map(|_| owner.to_string());
    }
    let (pool, suffix) = report.pod.rsplit_once('-')?;
    (suffix.len() == 5 && uid_of(pool).is_some()).then(|| pool.to_string())
}

/// One consumer's next delivery: `None` for the namespace's queue, else the queue of a
/// pool's own it came from; `None` as the delivery when the consumer ended.
type Next = (
    Option<String>,
    Option<Result<lapin::message::Delivery, lapin::Error>>,
);

async fn reader_loop(probes: Probes, key: ReaderKey, wake: Arc<Notify>) {
    let inner = &probes.0;
    let mut shared: Option<lapin::Consumer> = None;
    let mut legacy: HashMap<String, lapin::Consumer> = HashMap::new();
    loop {
        // What to read, and for whom; `None` once the last pool left.
        let wanted = {
            let mut state = probes.state();
            let Some(reader) = state.readers.get_mut(&key) else {
                return;
            };
            if reader.members.is_empty() {
                // The last pool left: its consumers go; the queue too if it was deleted
                // (else it expires an hour after its last use).
                let mut retired = std::mem::take(&mut reader.retired);
                if reader.deleted {
                    retired.insert(key.queue.clone());
                }
                state.readers.remove(&key);
                Err(retired)
            } else {
                let mut owners: BTreeMap<String, Vec<String>> = BTreeMap::new();
                for (name, member) in &reader.members {
                    for queue in &member.legacy {
                        owners.entry(queue.clone()).or_default().push(name.clone());
                    }
                }
                let interval = reader
                    .members
                    .values()
                    .map(|m| m.interval)
                    .min()
                    .unwrap_or(Duration::from_secs(2));
                let retired: Vec<String> = std::mem::take(&mut reader.retired)
                    .into_iter()
                    .filter(|q| !owners.contains_key(q) && *q != key.queue)
                    .collect();
                Ok((owners, interval, retired))
            }
        };
        let (owners, interval, retired) = match wanted {
            Ok(wanted) => wanted,
            Err(retired) => {
                drop(shared.take());
                legacy.clear();
                for queue in retired {
                    delete(&inner.brokers, &key.uri, &queue).await;
                }
                let state = probes.state();
                probes.release_if_unused(&state, &key.uri);
                return;
            }
        };
        legacy.retain(|queue, _| owners.contains_key(queue));
        for queue in retired {
            delete(&inner.brokers, &key.uri, &queue).await;
        }
        if shared.is_none() {
            match inner.brokers.consume_outcomes(&key.uri, &key.queue).await {
                Ok(c) => {
                    // Reports may have been lost while no consumer read them: every
                    // worker is unknown again until it reports (at most one report
                    // interval), so none is taken for idle by mistake.
                    forget_activities(&probes, &key, None);
                    shared = Some(c);
                }
                Err(p) => {
                    tracing::debug!(queue = %key.queue, ?p, "outcome queue not consumed yet")
                }
            }
        }
        for (queue, pools) in &owners {
            if legacy.contains_key(queue) {
                continue;
            }
            match inner.brokers.consume_outcomes(&key.uri, queue).await {
                Ok(c) => {
                    forget_activities(&probes, &key, Some(pools));
                    legacy.insert(queue.clone(), c);
                }
                Err(p) => {
                    tracing::debug!(%queue, ?p, "older pods' outcome queue not consumed yet")
                }
            }
        }

        // Read reports until the next check, or until the members change.
        let next_check = tokio::time::sleep(interval);
        tokio::pin!(next_check);
        loop {
            let next = async {
                let mut next: Vec<futures::future::BoxFuture<'_, Next>> = Vec::new();
                if let Some(c) = shared.as_mut() {
                    next.push(Box::pin(async move { (None, c.next().await) }));
                }
                for (queue, c) in legacy.iter_mut() {
                    next.push(Box::pin(
                        async move { (Some(queue.clone()), c.next().await) },
                    ));
                }
                if next.is_empty() {
                    std::future::pending::<Next>().await
                } else {
                    futures::future::select_all(next).await.0
                }
            };
            tokio::select! {
                _ = &mut next_check => break,
                _ = wake.notified() => break,
                (from, delivery) = next => match delivery {
                    Some(Ok(delivery)) => deliver(&probes, &key, from.as_deref(), &delivery.data),
                    // The consumer ended (connection lost, queue deleted): set it up
                    // again with the next check.
                    _ => match from {
                        None => shared = None,
                        Some(queue) => {
                            legacy.remove(&queue);
                        }
                    },
                },
            }
        }
    }
}

/// Deletes `queue`, best effort: a queue left behind expires an hour after its last use.
async fn delete(brokers: &Brokers, uri: &BrokerUri, queue: &str) {
    if let Err(why) = brokers.delete_queue(uri, queue).await {
        tracing::debug!(%queue, error = %why, "outcome queue not deleted");
    }
}

/// Forgets what the reader's pools (or only `pools`) last heard from their workers.
fn forget_activities(probes: &Probes, key: &ReaderKey, pools: Option<&Vec<String>>) {
    let state = probes.state();
    let Some(reader) = state.readers.get(key) else {
        return;
    };
    for (name, member) in &reader.members {
        if pools.is_none_or(|p| p.contains(name)) {
            member.reports.activity.lock().expect("lock").0.clear();
        }
    }
}

/// Hands one report to its pool, and wakes that pool's reconcile when it learned
/// something. A report for no pool of the reader is dropped.
fn deliver(probes: &Probes, key: &ReaderKey, from: Option<&str>, body: &[u8]) {
    let Some(report) = Report::parse(body) else {
        return;
    };
    let target = {
        let state = probes.state();
        let Some(reader) = state.readers.get(key) else {
            return;
        };
        // The pool whose own queue it came from, when only one pool reads it.
        let owner = from.and_then(|queue| {
            let mut readers = reader
                .members
                .iter()
                .filter(|(_, m)| m.legacy.contains(queue));
            match (readers.next(), readers.next()) {
                (Some((name, _)), None) => Some(name.as_str()),
                _ => None,
            }
        });
        route(&report, owner, |name| {
            reader.members.get(name).map(|m| m.uid.clone())
        })
        .and_then(|name| reader.members.get(&name))
        .map(|m| (m.pool.clone(), m.reports.clone()))
    };
    let Some((pool, reports)) = target else {
        tracing::trace!(pod = %report.pod, pool = %report.pool, "report for no pool here dropped");
        return;
    };
    if let Some(ms) = report.waited_ms {
        probes
            .0
            .metrics
            .ticket_wait
            .get_or_create(&PoolLabels {
                namespace: pool.namespace.clone().unwrap_or_default(),
                pool: pool.name.clone(),
            })
            .observe(ms as f64 / 1000.0);
    }
    if reports.record(&report) {
        reports.wake(probes, &pool);
    }
}

async fn probe_loop(
    probes: Probes,
    pool: ObjectRef<Guarded>,
    key: ProbeKey,
    tx: watch::Sender<BrokerView>,
    reports: Reports,
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
    let mut unreachable_since: Option<Timestamp> = match &*tx.borrow() {
        BrokerView::Unreachable { since, .. } => Some(*since),
        _ => None,
    };
    loop {
        if !probes.holds(&pool) {
            // The pool is gone: its task goes, and it leaves its namespace's outcome
            // reader, which deletes the queues only it used (its series and alerts are
            // swept once the task has ended, see `cleanup`).
            let mut state = probes.state();
            state.tasks.remove(&pool);
            leave(&mut state, &key.reader(), &pool.name, true);
            probes.release_if_unused(&state, &key.uri);
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
        {
            // A wake that reports held back goes out with the next probe.
            let mut wakes = reports.wakes.lock().expect("lock");
            if last.as_ref() != Some(&probe) || wakes.pending {
                wakes.pending = false;
                wakes.last = Some(Instant::now());
                let _ = inner.trigger.unbounded_send(pool.clone());
            }
        }
        reports.activity.lock().expect("lock").prune();
        last = Some(probe);
        tokio::time::sleep(key.interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(pools: &[(&str, Option<&str>)]) -> impl Fn(&str) -> Option<Option<String>> {
        let map: HashMap<String, Option<String>> = pools
            .iter()
            .map(|(n, u)| (n.to_string(), u.map(String::from)))
            .collect();
        move |name| map.get(name).cloned()
    }

    fn report(pool: &str, uid: &str, pod: &str) -> Report {
        Report::state(pod, "r1", None).of_pool(pool, uid)
    }

    #[test]
    fn a_report_goes_to_the_pool_it_names() {
        let here = members(&[("unit", Some("u-1")), ("e2e", Some("u-2")), ("lint", None)]);
        let route = |r: &Report, owner| route(r, owner, &here);
        assert_eq!(
            route(&report("e2e", "u-2", "e2e-bcdfg"), None),
            Some("e2e".into())
        );
        // Even when it came on another pool's own queue, or its pod says otherwise.
        assert_eq!(
            route(&report("e2e", "u-2", "unit-bcdfg"), Some("unit")),
            Some("e2e".into())
        );
        // A uid the worker does not know, or a pool whose uid is not known: by name.
        assert_eq!(route(&report("e2e", "", "x"), None), Some("e2e".into()));
        assert_eq!(
            route(&report("lint", "u-9", "x"), None),
            Some("lint".into())
        );
    }

    #[test]
    fn reports_of_pools_that_are_gone_are_dropped() {
        let here = members(&[("unit", Some("u-1"))]);
        assert_eq!(
            route(&report("gone", "u-7", "gone-bcdfg"), None, &here),
            None
        );
        // A pool deleted and made again under its name: the old workers' reports do
        // not count for the new pool.
        assert_eq!(
            route(&report("unit", "u-0", "unit-bcdfg"), None, &here),
            None
        );
        // Nor for the owner of the queue they came on.
        assert_eq!(
            route(&report("", "", "gone-bcdfg"), Some("gone"), &here),
            None
        );
    }

    #[test]
    fn a_report_that_names_no_pool_goes_to_its_queue_or_its_pod() {
        let here = members(&[("unit", Some("u-1")), ("unit-e2e", Some("u-2"))]);
        let old = report("", "", "unit-e2e-bcdfg");
        // On a pool's own queue (pods of an older operator): that pool.
        assert_eq!(route(&old, Some("unit"), &here), Some("unit".into()));
        // On the shared queue (a Native image that does not name its pool): by pod name.
        assert_eq!(route(&old, None, &here), Some("unit-e2e".into()));
        assert_eq!(
            route(&report("", "", "unit-bcdfg"), None, &here),
            Some("unit".into())
        );
        assert_eq!(route(&report("", "", "other-bcdfg"), None, &here), None);
        assert_eq!(route(&report("", "", "unit"), None, &here), None);
        assert_eq!(route(&report("", "", ""), None, &here), None);
    }
}
