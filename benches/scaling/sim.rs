//! A discrete-event simulation, in simulated time, of one ticket queue, its worker pods
//! and the policy that sizes them. What it models, and where it simplifies, is written
//! down in docs/benchmarks.md ("Scaling quality").
//!
//! The cluster part (pods that start after a delay, consume one ticket at a time, are
//! deleted gracefully and killed at the end of their grace period) is shared by every
//! policy; a policy only decides when pods are created and which are deleted:
//!
//! - [`Policy::Operator`]: the real `testrunner_operator::core::plan`, fed an `Observed`
//!   built from the simulated pods and queue every poll interval, its `Plan` applied;
//! - [`Policy::OperatorNative`]: the same, for workers that do not report what they do
//!   (`worker.mode: Native`): the operator cannot tell a busy pod from an idle one;
//! - [`Policy::OperatorWarm`]: the operator with `scaling.warmWorkers` on, covering the
//!   pod start-up time plus one poll interval;
//! - [`Policy::Keda`]: KEDA's RabbitMQ scaler (AMQP) with its defaults, and the
//!   Kubernetes HPA and ReplicaSet it drives;
//! - [`Policy::Floor`]: workers that start instantly and go as soon as they are idle,
//!   up to maxWorkers: what no policy can beat.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, VecDeque};

use jiff::{SignedDuration, Timestamp};
use testrunner_operator::core::diagnosis::Completions;
use testrunner_operator::core::{self, Activity, BrokerView, Observed, PodState, PodView};
use testrunner_operator::crd::{TestRunnerPool, WarmWorkersSpec};

/// One ticket of a trace.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Ticket {
    /// Seconds from the start of the trace at which it is published.
    pub arrival: f64,
    /// Seconds its test command runs.
    pub run: f64,
}

/// A scaling policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// This operator, workers in Wrapped mode (they report when they hold a ticket).
    Operator,
    /// This operator, workers in Native mode (no reports).
    OperatorNative,
    /// This operator with warm workers.
    OperatorWarm,
    /// KEDA's defaults.
    Keda,
    /// Instant workers up to maxWorkers.
    Floor,
}

impl Policy {
    /// Every policy, in report order.
    pub const ALL: [Policy; 5] = [
        Policy::Operator,
        Policy::OperatorNative,
        Policy::OperatorWarm,
        Policy::Keda,
        Policy::Floor,
    ];

    /// The policy's key in the results.
    pub fn key(self) -> &'static str {
        match self {
            Policy::Operator => "operator",
            Policy::OperatorNative => "operator_native",
            Policy::OperatorWarm => "operator_warm",
            Policy::Keda => "keda",
            Policy::Floor => "floor",
        }
    }
}

/// The operator's defaults, as in `spec.scaling` and `spec.template`.
pub const OPERATOR_POLL_S: f64 = 2.0;
/// `spec.scaling.scaleDownDelay` default.
pub const OPERATOR_SCALE_DOWN_DELAY: &str = "2m";
/// `template.terminationGracePeriodSeconds` default of worker pods (`pods::DEFAULT_GRACE_SECONDS`).
pub const OPERATOR_GRACE_S: f64 = 600.0;

/// KEDA ScaledObject `pollingInterval` default.
pub const KEDA_POLLING_S: f64 = 30.0;
/// KEDA ScaledObject `cooldownPeriod` default.
pub const KEDA_COOLDOWN_S: f64 = 300.0;
/// kube-controller-manager `--horizontal-pod-autoscaler-sync-period` default.
pub const HPA_SYNC_S: f64 = 15.0;
/// When the HPA's first sync falls after KEDA's first poll (their clocks are independent).
pub const HPA_PHASE_S: f64 = 7.5;
/// kube-controller-manager `--horizontal-pod-autoscaler-tolerance` default.
pub const HPA_TOLERANCE: f64 = 0.1;
/// HPA default scale-down stabilization window.
pub const HPA_DOWN_WINDOW_S: f64 = 300.0;
/// HPA scale-up limit of an HPA without `spec.behavior` (KEDA creates it so): at most
/// `max(2 x current, 4)` replicas per sync, that is +100 % or +4 pods every 15 s.
pub const HPA_UP_FACTOR: u32 = 2;
/// See [`HPA_UP_FACTOR`].
pub const HPA_UP_MINIMUM: u32 = 4;
/// Kubernetes' default `terminationGracePeriodSeconds`, which a KEDA-scaled Deployment gets.
pub const KUBERNETES_GRACE_S: f64 = 30.0;
/// The most favourable RabbitMQ scaler target for a one-ticket-at-a-time worker:
/// `mode: QueueLength`, `value: "1"`.
pub const KEDA_TARGET_PER_REPLICA: f64 = 1.0;

/// Deliveries after which the simulation gives a ticket up instead of queueing it
/// again: under KEDA's defaults a ticket longer than the cooldown that runs while the
/// queue is otherwise empty is taken, killed and redelivered forever.
pub const MAX_DELIVERIES: u32 = 20;

/// What the simulation runs with.
#[derive(Clone, Debug)]
pub struct Params {
    /// Seconds from pod creation to a consuming worker (scheduling, image pull,
    /// container start, the wrapper connecting).
    pub pod_start: f64,
    /// `maxWorkers` (`maxReplicaCount` for KEDA).
    pub max_workers: u32,
    /// Seconds from a pod's deletion to SIGTERM reaching its worker; meanwhile the
    /// worker still consumes.
    pub signal_delay: f64,
    /// Seconds between two samples of the queue and the pods (for the plots).
    pub sample_every: f64,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            pod_start: 15.0,
            max_workers: 20,
            signal_delay: 1.0,
            sample_every: 10.0,
        }
    }
}

/// The queue and the pods at one instant.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    /// Seconds.
    pub t: f64,
    /// Tickets ready in the queue.
    pub ready: u32,
    /// Tickets in flight (held by a worker).
    pub busy: u32,
    /// Pods that exist (starting, running or draining): what costs.
    pub pods: u32,
}

/// One reading of KEDA's RabbitMQ scaler, next to the truth.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Reading {
    /// Seconds.
    pub t: f64,
    /// The value the scaler returned (and the HPA or KEDA acted on).
    pub seen: u64,
    /// Tickets ready in the queue then.
    pub ready: u64,
    /// Tickets in flight then.
    pub in_flight: u64,
}

/// What one run measured.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// Per ticket: seconds spent ready in the queue, over all its deliveries.
    pub waits: Vec<f64>,
    /// Per ticket: how many times a worker took it.
    pub deliveries: Vec<u32>,
    /// Per ticket: how many times a worker ran it to the end and acked it.
    pub completions: Vec<u32>,
    /// Per ticket: given up after [`MAX_DELIVERIES`] deliveries, all killed.
    pub abandoned: Vec<bool>,
    /// Pod-seconds, from each pod's creation until it is gone.
    pub worker_seconds: f64,
    /// Tickets killed at least once in the middle of their run.
    pub interrupted: u32,
    /// Deliveries beyond the first.
    pub redeliveries: u32,
    /// Seconds of test runs thrown away by kills.
    pub lost_work_s: f64,
    /// Seconds until every ticket was done and every pod gone.
    pub end: f64,
    /// The queue and pods over time.
    pub series: Vec<Sample>,
    /// KEDA's scaler readings (empty for the other policies).
    pub readings: Vec<Reading>,
    /// Pods created.
    pub pods_created: u32,
}

/// The `p`-quantile (0..=1) of `values` by nearest rank; 0 for none.
pub fn quantile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = (p * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

/// Runs `trace` (sorted by arrival) under `policy`.
pub fn run(policy: Policy, trace: &[Ticket], params: &Params) -> Outcome {
    match policy {
        Policy::Operator => Cluster::new(trace, params, OPERATOR_GRACE_S, false)
            .run(&mut OperatorModel::new(params, false, false)),
        Policy::OperatorNative => Cluster::new(trace, params, OPERATOR_GRACE_S, false)
            .run(&mut OperatorModel::new(params, true, false)),
        Policy::OperatorWarm => Cluster::new(trace, params, OPERATOR_GRACE_S, false)
            .run(&mut OperatorModel::new(params, false, true)),
        Policy::Keda => {
            Cluster::new(trace, params, KUBERNETES_GRACE_S, false).run(&mut KedaModel::new(params))
        }
        Policy::Floor => Cluster::new(trace, params, 0.0, true).run(&mut NoController),
    }
}

// ---------------------------------------------------------------------------------
// The cluster: queue, pods, events.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Created, not consuming yet.
    Pending,
    /// Consuming (idle or running a ticket).
    Ready,
    /// Deleted; SIGTERM not delivered yet.
    Deleting,
    /// SIGTERM delivered while running a ticket: finishing it, no new ticket.
    Draining,
    /// Gone.
    Gone,
}

#[derive(Clone, Debug)]
struct Pod {
    created: f64,
    phase: Phase,
    /// It was consuming when deleted (so it still consumes until SIGTERM).
    was_ready: bool,
    ticket: Option<usize>,
    started: f64,
    run_seq: u64,
    idle_since: f64,
    ready_since: f64,
}

impl Pod {
    fn consuming(&self) -> bool {
        self.phase == Phase::Ready || (self.phase == Phase::Deleting && self.was_ready)
    }
}

#[derive(Clone, Copy, Debug)]
enum Ev {
    Done { pod: usize, seq: u64 },
    Kill { pod: usize, seq: u64 },
    Signal(usize),
    PodReady(usize),
    Arrival(usize),
    Sample,
    Tick,
}

impl Ev {
    /// Order of events at the same instant: workers finish before anything else, the
    /// controller decides last, on what the instant left.
    fn rank(&self) -> u8 {
        match self {
            Ev::Done { .. } => 0,
            Ev::Kill { .. } => 1,
            Ev::Signal(_) => 2,
            Ev::PodReady(_) => 3,
            Ev::Arrival(_) => 4,
            Ev::Sample => 5,
            Ev::Tick => 6,
        }
    }
}

struct Scheduled {
    t: f64,
    rank: u8,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    /// Reversed: the heap pops the earliest first.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .t
            .total_cmp(&self.t)
            .then_with(|| other.rank.cmp(&self.rank))
            .then_with(|| other.seq.cmp(&self.seq))
    }
}

/// The simulated queue and pods.
pub struct Cluster<'a> {
    trace: &'a [Ticket],
    params: &'a Params,
    grace: f64,
    /// Floor: a pod appears, consuming, when a ticket waits, and goes when idle.
    elastic: bool,
    heap: BinaryHeap<Scheduled>,
    seq: u64,
    pods: Vec<Pod>,
    /// Ids of the pods that are not gone.
    live: Vec<usize>,
    queue: VecDeque<usize>,
    queued_since: Vec<f64>,
    /// Per ticket: killed at least once.
    killed: Vec<bool>,
    /// Completions since the controller last looked: (ticket, time).
    completed_log: Vec<(usize, f64)>,
    done: usize,
    out: Outcome,
}

/// A scaling policy's controller: decides at its own times.
pub trait Controller {
    /// The time of its first decision.
    fn first_tick(&self) -> f64;
    /// Decides at `now` (creating and deleting pods through `cluster`); returns the
    /// time of its next decision.
    fn tick(&mut self, now: f64, cluster: &mut Cluster<'_>) -> f64;
}

struct NoController;

impl Controller for NoController {
    fn first_tick(&self) -> f64 {
        f64::INFINITY
    }
    fn tick(&mut self, _: f64, _: &mut Cluster<'_>) -> f64 {
        f64::INFINITY
    }
}

impl<'a> Cluster<'a> {
    fn new(trace: &'a [Ticket], params: &'a Params, grace: f64, elastic: bool) -> Self {
        let n = trace.len();
        Cluster {
            trace,
            params,
            grace,
            elastic,
            heap: BinaryHeap::new(),
            seq: 0,
            pods: Vec::new(),
            live: Vec::new(),
            queue: VecDeque::new(),
            queued_since: vec![0.0; n],
            killed: vec![false; n],
            completed_log: Vec::new(),
            done: 0,
            out: Outcome {
                waits: vec![0.0; n],
                deliveries: vec![0; n],
                completions: vec![0; n],
                abandoned: vec![false; n],
                ..Default::default()
            },
        }
    }

    fn at(&mut self, t: f64, ev: Ev) {
        self.seq += 1;
        self.heap.push(Scheduled {
            t,
            rank: ev.rank(),
            seq: self.seq,
            ev,
        });
    }

    fn run(mut self, controller: &mut dyn Controller) -> Outcome {
        for (i, t) in self.trace.iter().enumerate() {
            self.at(t.arrival, Ev::Arrival(i));
        }
        self.at(0.0, Ev::Sample);
        let first = controller.first_tick();
        if first.is_finite() {
            self.at(first, Ev::Tick);
        }
        let last_arrival = self.trace.iter().map(|t| t.arrival).fold(0.0, f64::max);
        let total_run: f64 = self.trace.iter().map(|t| t.run).sum();
        // A bound no sane run reaches: everything run one after another, plus a day.
        let horizon = last_arrival + total_run + 86_400.0;
        while let Some(Scheduled { t: now, ev, .. }) = self.heap.pop() {
            if now > horizon {
                panic!("the simulation did not settle by {horizon} s");
            }
            match ev {
                Ev::Arrival(i) => {
                    self.queue.push_back(i);
                    self.queued_since[i] = now;
                }
                Ev::PodReady(id) => {
                    let pod = &mut self.pods[id];
                    if pod.phase == Phase::Pending {
                        pod.phase = Phase::Ready;
                        pod.was_ready = true;
                        pod.idle_since = now;
                        pod.ready_since = now;
                    }
                }
                Ev::Done { pod, seq } => self.finish(pod, seq, now),
                Ev::Signal(id) => self.signal(id, now),
                Ev::Kill { pod, seq } => self.kill(pod, seq, now),
                Ev::Sample => {
                    self.sample(now);
                    let next = now + self.params.sample_every;
                    self.at(next, Ev::Sample);
                }
                Ev::Tick => {
                    let next = controller.tick(now, &mut self);
                    if next.is_finite() {
                        self.at(next.max(now), Ev::Tick);
                    }
                }
            }
            self.dispatch(now);
            if self.done == self.trace.len() && self.live.is_empty() && now >= last_arrival {
                self.sample(now);
                self.out.end = now;
                break;
            }
        }
        self.out.interrupted = self.killed.iter().filter(|k| **k).count() as u32;
        self.out.redeliveries = self
            .out
            .deliveries
            .iter()
            .map(|d| d.saturating_sub(1))
            .sum();
        self.out
    }

    fn sample(&mut self, now: f64) {
        let busy = self
            .live
            .iter()
            .filter(|&&id| self.pods[id].ticket.is_some())
            .count() as u32;
        self.out.series.push(Sample {
            t: now,
            ready: self.queue.len() as u32,
            busy,
            pods: self.live.len() as u32,
        });
    }

    /// Hands waiting tickets to idle consumers, first come first served; the worker
    /// idle the longest gets the next one (the broker's round robin, roughly).
    fn dispatch(&mut self, now: f64) {
        while let Some(&ticket) = self.queue.front() {
            let idle = self
                .live
                .iter()
                .copied()
                .filter(|&id| self.pods[id].consuming() && self.pods[id].ticket.is_none())
                .min_by(|&a, &b| self.pods[a].idle_since.total_cmp(&self.pods[b].idle_since));
            let id = match idle {
                Some(id) => id,
                None if self.elastic && self.live.len() < self.params.max_workers as usize => {
                    let id = self.spawn(now, 0.0);
                    let pod = &mut self.pods[id];
                    pod.phase = Phase::Ready;
                    pod.was_ready = true;
                    id
                }
                None => break,
            };
            self.queue.pop_front();
            self.out.waits[ticket] += now - self.queued_since[ticket];
            self.out.deliveries[ticket] += 1;
            let run = self.trace[ticket].run;
            let pod = &mut self.pods[id];
            pod.ticket = Some(ticket);
            pod.started = now;
            pod.run_seq += 1;
            let seq = pod.run_seq;
            self.at(now + run, Ev::Done { pod: id, seq });
        }
    }

    fn spawn(&mut self, now: f64, start: f64) -> usize {
        let id = self.pods.len();
        self.pods.push(Pod {
            created: now,
            phase: Phase::Pending,
            was_ready: false,
            ticket: None,
            started: 0.0,
            run_seq: 0,
            idle_since: now,
            ready_since: f64::INFINITY,
        });
        self.live.push(id);
        self.out.pods_created += 1;
        if !self.elastic {
            self.at(now + start, Ev::PodReady(id));
        }
        id
    }

    /// Creates `n` pods; they consume once started.
    pub fn create(&mut self, n: u32, now: f64) {
        for _ in 0..n {
            self.spawn(now, self.params.pod_start);
        }
    }

    /// Deletes a pod gracefully: SIGTERM after the signal delay; a worker holding a
    /// ticket then finishes it, or is killed at the end of the grace period.
    pub fn delete(&mut self, id: usize, now: f64) {
        let pod = &mut self.pods[id];
        if matches!(pod.phase, Phase::Pending | Phase::Ready) {
            pod.phase = Phase::Deleting;
            self.at(now + self.params.signal_delay, Ev::Signal(id));
        }
    }

    fn gone(&mut self, id: usize, now: f64) {
        let pod = &mut self.pods[id];
        pod.phase = Phase::Gone;
        self.out.worker_seconds += now - pod.created;
        self.live.retain(|&p| p != id);
    }

    fn finish(&mut self, id: usize, seq: u64, now: f64) {
        let pod = &mut self.pods[id];
        let Some(ticket) = pod.ticket.filter(|_| pod.run_seq == seq) else {
            return;
        };
        pod.ticket = None;
        pod.idle_since = now;
        self.out.completions[ticket] += 1;
        self.done += 1;
        self.completed_log.push((ticket, now));
        if pod.phase == Phase::Draining {
            self.gone(id, now);
        } else if self.elastic {
            // The floor keeps no idle worker: the next ticket, if any, takes the pod
            // right away (dispatch runs before this returns to the loop).
            self.dispatch(now);
            if self.pods[id].ticket.is_none() {
                self.gone(id, now);
            }
        }
    }

    fn signal(&mut self, id: usize, now: f64) {
        let pod = &mut self.pods[id];
        if pod.phase != Phase::Deleting {
            return;
        }
        if pod.ticket.is_some() {
            pod.phase = Phase::Draining;
            let seq = pod.run_seq;
            self.at(now + self.grace, Ev::Kill { pod: id, seq });
        } else {
            self.gone(id, now);
        }
    }

    fn kill(&mut self, id: usize, seq: u64, now: f64) {
        let pod = &self.pods[id];
        if pod.phase != Phase::Draining || pod.run_seq != seq {
            return;
        }
        if let Some(ticket) = pod.ticket {
            // The broker gives an unacked ticket back when the channel closes; it is
            // delivered again before the tickets published after it.
            self.out.lost_work_s += now - pod.started;
            self.killed[ticket] = true;
            if self.out.deliveries[ticket] >= MAX_DELIVERIES {
                self.out.abandoned[ticket] = true;
                self.done += 1;
            } else {
                self.queue.push_front(ticket);
                self.queued_since[ticket] = now;
            }
        }
        self.pods[id].ticket = None;
        self.gone(id, now);
    }

    /// Tickets ready in the queue.
    pub fn ready(&self) -> u64 {
        self.queue.len() as u64
    }

    /// Tickets held by workers.
    pub fn in_flight(&self) -> u64 {
        self.live
            .iter()
            .filter(|&&id| self.pods[id].ticket.is_some())
            .count() as u64
    }
}

// ---------------------------------------------------------------------------------
// This operator: the real decision.

/// The operator's controller: every poll interval, an `Observed` of the simulated pods
/// and queue, `core::plan`, and its `Plan` applied.
pub struct OperatorModel {
    pool: TestRunnerPool,
    revision: String,
    completions: Completions,
    base: Timestamp,
    /// Workers report nothing (Native mode).
    native: bool,
}

impl OperatorModel {
    fn new(params: &Params, native: bool, warm: bool) -> Self {
        let mut pool = pool(params.max_workers, native);
        if warm {
            pool.spec.scaling.warm_workers = Some(warm_workers(params));
        }
        let revision = core::revision(&pool.spec);
        OperatorModel {
            pool,
            revision,
            completions: Completions::default(),
            base: Timestamp::from_second(1_800_000_000).expect("a valid time"),
            native,
        }
    }

    fn ts(&self, t: f64) -> Timestamp {
        self.base + SignedDuration::from_secs_f64(t)
    }

    fn observe(&mut self, now: f64, cluster: &mut Cluster<'_>) -> Observed {
        for (ticket, at) in std::mem::take(&mut cluster.completed_log) {
            let at = self.ts(at);
            self.completions
                .record(&self.revision, Some(&format!("t{ticket}")), at);
        }
        let pods = cluster
            .live
            .iter()
            .map(|&id| {
                let p = &cluster.pods[id];
                let state = match p.phase {
                    Phase::Pending => PodState::Pending,
                    Phase::Ready => PodState::Ready,
                    _ => PodState::Terminating,
                };
                let activity = if self.native {
                    Activity::Untracked
                } else if p.phase == Phase::Pending {
                    // Wrapped workers report once their consume loop is up.
                    Activity::Unknown
                } else {
                    match p.ticket {
                        Some(t) => Activity::Busy {
                            ticket: format!("t{t}"),
                        },
                        None => Activity::Idle,
                    }
                };
                PodView {
                    name: format!("w-{id}"),
                    revision: self.revision.clone(),
                    state,
                    created: self.ts(p.created),
                    activity,
                }
            })
            .collect();
        let consumers = cluster
            .live
            .iter()
            .filter(|&&id| cluster.pods[id].consuming())
            .count() as u64;
        Observed {
            pods,
            broker: BrokerView::Depth {
                ready: cluster.ready(),
                consumers,
                at: self.ts(now),
            },
            completions: self.completions.clone(),
            ..Default::default()
        }
    }
}

/// `scaling.warmWorkers` covering a new pod's start-up plus one poll interval, with
/// the defaults otherwise.
pub fn warm_workers(params: &Params) -> WarmWorkersSpec {
    WarmWorkersSpec {
        cover: format!("{}s", (params.pod_start + OPERATOR_POLL_S).ceil())
            .as_str()
            .into(),
        ..Default::default()
    }
}

/// A pool with the operator's defaults but `maxWorkers`.
pub fn pool(max_workers: u32, native: bool) -> TestRunnerPool {
    let mut spec = serde_json::json!({
        "image": "registry.example/test-runner:1",
        "command": ["/run-tests"],
        "queue": {"name": "tickets", "connectionSecretRef": {"name": "rabbitmq"}},
        "scaling": {
            "minWorkers": 0,
            "maxWorkers": max_workers,
            "pollInterval": format!("{OPERATOR_POLL_S}s"),
            "scaleDownDelay": OPERATOR_SCALE_DOWN_DELAY,
        },
    });
    if native {
        spec["worker"] = serde_json::json!({"mode": "Native"});
    }
    serde_json::from_value(serde_json::json!({
        "apiVersion": "testrunner.dev/v1alpha1",
        "kind": "TestRunnerPool",
        "metadata": {"name": "bench", "namespace": "ci", "generation": 1, "uid": "u-1"},
        "spec": spec,
    }))
    .expect("a valid pool")
}

impl Controller for OperatorModel {
    fn first_tick(&self) -> f64 {
        0.0
    }

    fn tick(&mut self, now: f64, cluster: &mut Cluster<'_>) -> f64 {
        let observed = self.observe(now, cluster);
        let plan = core::plan(&self.pool, &observed, self.ts(now));
        cluster.create(plan.created(), now);
        for name in &plan.delete {
            let id: usize = name
                .strip_prefix("w-")
                .and_then(|n| n.parse().ok())
                .expect("a pod of the simulation");
            cluster.delete(id, now);
        }
        self.pool.status = Some(plan.status);
        now + OPERATOR_POLL_S
    }
}

// ---------------------------------------------------------------------------------
// KEDA: its scale loop, the HPA it creates, and the Deployment's ReplicaSet.

/// KEDA's ScaledObject (RabbitMQ trigger, AMQP, QueueLength 1, min 0, max maxWorkers)
/// with the HPA it owns (minReplicas 1, default behavior) and the ReplicaSet that
/// creates and deletes the pods.
pub struct KedaModel {
    max: u32,
    /// Deployment `spec.replicas`.
    replicas: u32,
    last_active: f64,
    next_poll: f64,
    next_hpa: f64,
    /// The HPA's recommendations (time, replicas), for the stabilization window.
    recommendations: VecDeque<(f64, u32)>,
}

impl KedaModel {
    fn new(params: &Params) -> Self {
        KedaModel {
            max: params.max_workers.max(1),
            replicas: 0,
            last_active: f64::NEG_INFINITY,
            next_poll: 0.0,
            next_hpa: HPA_PHASE_S,
            recommendations: VecDeque::new(),
        }
    }

    /// The RabbitMQ scaler over AMQP: a passive queue.declare, whose message count is
    /// the ready messages only. Recorded next to the truth.
    fn read(cluster: &mut Cluster<'_>, now: f64) -> u64 {
        let seen = cluster.ready();
        let reading = Reading {
            t: now,
            seen,
            ready: cluster.ready(),
            in_flight: cluster.in_flight(),
        };
        cluster.out.readings.push(reading);
        seen
    }

    /// KEDA's own loop (every pollingInterval): activation from zero, and back to zero
    /// after cooldownPeriod without activity. In between the HPA scales.
    fn poll(&mut self, now: f64, cluster: &mut Cluster<'_>) {
        let active = Self::read(cluster, now) as f64 > 0.0; // activationValue 0
        if active {
            self.last_active = now;
            if self.replicas == 0 {
                self.scale_to(1, now, cluster);
            }
        } else if self.replicas > 0 && now - self.last_active >= KEDA_COOLDOWN_S {
            self.scale_to(0, now, cluster);
        }
    }

    /// One HPA sync: the external metric per pod (AverageValue), the tolerance, the
    /// scale-down stabilization window, the scale-up limit, min 1 and max.
    fn hpa(&mut self, now: f64, cluster: &mut Cluster<'_>) {
        if self.replicas == 0 {
            return; // scaling is disabled while the target has zero replicas
        }
        let metric = Self::read(cluster, now) as f64;
        let current = self.replicas;
        let ratio = metric / (KEDA_TARGET_PER_REPLICA * current as f64);
        let proposed = if (1.0 - ratio).abs() > HPA_TOLERANCE {
            (metric / KEDA_TARGET_PER_REPLICA).ceil() as u32
        } else {
            current
        };
        // Stabilization: scale up at once (window 0), scale down no lower than the
        // highest recommendation of the last 300 s.
        self.recommendations.push_back((now, proposed));
        while self
            .recommendations
            .front()
            .is_some_and(|(t, _)| *t <= now - HPA_DOWN_WINDOW_S)
        {
            self.recommendations.pop_front();
        }
        let down = self
            .recommendations
            .iter()
            .map(|(_, r)| *r)
            .max()
            .unwrap_or(proposed);
        // Rate: at most max(2 x current, 4) per sync (`calculateScaleUpLimit`), then
        // minReplicas 1 and maxReplicaCount.
        let up_limit = (current * HPA_UP_FACTOR).max(HPA_UP_MINIMUM).min(self.max);
        let wanted = current
            .max(proposed)
            .min(down)
            .min(up_limit)
            .clamp(1, self.max);
        if wanted != current {
            self.scale_to(wanted, now, cluster);
        }
    }

    /// Sets the Deployment's replicas; its ReplicaSet creates or deletes pods at once.
    /// Deletion order (ReplicaSet ranking): pods not started yet first, then those
    /// ready for the shortest time. It does not know which workers hold a ticket.
    fn scale_to(&mut self, n: u32, now: f64, cluster: &mut Cluster<'_>) {
        self.replicas = n;
        let mut live: Vec<usize> = cluster
            .live
            .iter()
            .copied()
            .filter(|&id| matches!(cluster.pods[id].phase, Phase::Pending | Phase::Ready))
            .collect();
        if (live.len() as u32) < n {
            cluster.create(n - live.len() as u32, now);
            return;
        }
        live.sort_by(|&a, &b| {
            let (pa, pb) = (&cluster.pods[a], &cluster.pods[b]);
            (pa.phase == Phase::Ready)
                .cmp(&(pb.phase == Phase::Ready))
                .then(pb.ready_since.total_cmp(&pa.ready_since))
                .then(b.cmp(&a))
        });
        let surplus = live.len() - n as usize;
        for id in live.into_iter().take(surplus) {
            cluster.delete(id, now);
        }
    }
}

impl Controller for KedaModel {
    fn first_tick(&self) -> f64 {
        0.0
    }

    fn tick(&mut self, now: f64, cluster: &mut Cluster<'_>) -> f64 {
        if now >= self.next_poll {
            self.poll(now, cluster);
            self.next_poll += KEDA_POLLING_S;
        }
        if now >= self.next_hpa {
            self.hpa(now, cluster);
            self.next_hpa += HPA_SYNC_S;
        }
        self.next_poll.min(self.next_hpa)
    }
}
