//! Prometheus metrics of the operator. Label values are pool names, namespaces and
//! static categories: never error text, never URIs.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of per-pool series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    /// Namespace of the pool.
    pub namespace: String,
    /// Name of the pool.
    pub pool: String,
}

/// Labels of error counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// Static error category.
    pub category: String,
}

/// Labels of per-pool series with a static reason or verdict.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolReasonLabels {
    /// Namespace of the pool.
    pub namespace: String,
    /// Name of the pool.
    pub pool: String,
    /// Static reason (Error, OOMKilled, ...) or verdict (PoisonTicket, ...).
    pub reason: String,
}

/// Labels of probe failures.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeFailureLabels {
    /// Namespace of the pool.
    pub namespace: String,
    /// Name of the pool.
    pub pool: String,
    /// Static failure reason (ConnectionFailed, QueueNotFound, ...).
    pub reason: String,
}

/// Labels of alerts sent.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AlertSentLabels {
    /// Static receiver kind: `alertmanager` or `webhook`.
    pub receiver: String,
    /// `firing` or `resolved`.
    pub status: String,
}

/// Labels of alert delivery failures.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReceiverLabels {
    /// Static receiver kind: `alertmanager` or `webhook`. Never a URL.
    pub receiver: String,
}

/// Every metric the operator exports.
pub struct Metrics {
    /// The registry to encode.
    pub registry: Registry,
    /// Tickets ready in the queue.
    pub queue_ready: Family<PoolLabels, Gauge>,
    /// Consumers on the queue.
    pub queue_consumers: Family<PoolLabels, Gauge>,
    /// Workers wanted.
    pub workers_desired: Family<PoolLabels, Gauge>,
    /// Worker pods that exist.
    pub workers_current: Family<PoolLabels, Gauge>,
    /// Worker pods that are ready.
    pub workers_ready: Family<PoolLabels, Gauge>,
    /// Worker pods running a ticket.
    pub workers_busy: Family<PoolLabels, Gauge>,
    /// 1 while the pool's broker is unreachable.
    pub broker_unreachable: Family<PoolLabels, Gauge>,
    /// Reconcile duration.
    pub reconcile_duration: Histogram,
    /// Reconciles.
    pub reconciles: Counter,
    /// Reconcile failures by category.
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    /// Probe latency.
    pub probe_duration: Histogram,
    /// Probe failures by reason.
    pub probe_failures: Family<ProbeFailureLabels, Counter>,
    /// Worker crashes by Kubernetes reason.
    pub worker_crashes: Family<PoolReasonLabels, Counter>,
    /// Tickets in quarantine.
    pub quarantined_tickets: Family<PoolLabels, Gauge>,
    /// Tickets returned from quarantine.
    pub replayed_tickets: Family<PoolLabels, Counter>,
    /// 1 for the pool's current diagnosis verdict (label `reason`).
    pub verdict: Family<PoolReasonLabels, Gauge>,
    /// 1 while the pool's latest rollout failed.
    pub rollout_failed: Family<PoolLabels, Gauge>,
    /// 1 for the phase of the pool's latest rollout (label `reason`).
    pub rollout_phase: Family<PoolReasonLabels, Gauge>,
    /// Alerts delivered, by receiver kind and status (one per alert in a request).
    pub alerts_sent: Family<AlertSentLabels, Counter>,
    /// Failed alert deliveries (requests), by receiver kind.
    pub alert_send_failures: Family<ReceiverLabels, Counter>,
    /// Alerts currently active per pool.
    pub alerts_active: Family<PoolLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("testrunner");
        let m = Metrics {
            queue_ready: Family::default(),
            queue_consumers: Family::default(),
            workers_desired: Family::default(),
            workers_current: Family::default(),
            workers_ready: Family::default(),
            workers_busy: Family::default(),
            broker_unreachable: Family::default(),
            reconcile_duration: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            reconciles: Counter::default(),
            reconcile_errors: Family::default(),
            probe_duration: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            probe_failures: Family::default(),
            alerts_sent: Family::default(),
            alert_send_failures: Family::default(),
            alerts_active: Family::default(),
            worker_crashes: Family::default(),
            quarantined_tickets: Family::default(),
            replayed_tickets: Family::default(),
            verdict: Family::default(),
            rollout_failed: Family::default(),
            rollout_phase: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "queue_ready_tickets",
            "Tickets ready in the pool's queue",
            m.queue_ready.clone(),
        );
        registry.register(
            "queue_consumers",
            "Consumers on the pool's queue",
            m.queue_consumers.clone(),
        );
        registry.register(
            "workers_desired",
            "Worker pods the operator wants",
            m.workers_desired.clone(),
        );
        registry.register(
            "workers_current",
            "Worker pods that exist (not terminating)",
            m.workers_current.clone(),
        );
        registry.register(
            "workers_ready",
            "Worker pods that are ready",
            m.workers_ready.clone(),
        );
        registry.register(
            "workers_busy",
            "Worker pods running a ticket, as their workers report it",
            m.workers_busy.clone(),
        );
        registry.register(
            "broker_unreachable",
            "1 while the pool's broker cannot be reached",
            m.broker_unreachable.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconcile",
            m.reconcile_duration.clone(),
        );
        registry.register("reconciles", "Reconciles run", m.reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Failed reconciles by error category",
            m.reconcile_errors.clone(),
        );
        registry.register(
            "queue_probe_duration_seconds",
            "Time one queue probe took",
            m.probe_duration.clone(),
        );
        registry.register(
            "queue_probe_failures",
            "Failed queue probes by reason",
            m.probe_failures.clone(),
        );
        registry.register(
            "alerts_sent",
            "Alerts delivered to a receiver, by receiver kind and status",
            m.alerts_sent.clone(),
        );
        registry.register(
            "alert_send_failures",
            "Failed alert deliveries, by receiver kind",
            m.alert_send_failures.clone(),
        );
        registry.register(
            "alerts_active",
            "Alerts currently active for the pool",
            m.alerts_active.clone(),
        );
        registry.register(
            "worker_crashes",
            "Worker container crashes by reason (Error, OOMKilled, ...)",
            m.worker_crashes.clone(),
        );
        registry.register(
            "quarantined_tickets",
            "Tickets of the pool in quarantine",
            m.quarantined_tickets.clone(),
        );
        registry.register(
            "replayed_tickets",
            "Tickets returned from quarantine to the work queue",
            m.replayed_tickets.clone(),
        );
        registry.register(
            "diagnosis_verdict",
            "1 for the pool's current crash diagnosis (label reason: Healthy, PoisonTicket, BrokenEnvironment, OutOfMemory, QueueStalled)",
            m.verdict.clone(),
        );
        registry.register(
            "rollout_failed",
            "1 while the pool's latest rollout failed its canary and the spec still names that revision",
            m.rollout_failed.clone(),
        );
        registry.register(
            "rollout_phase",
            "1 for the phase of the pool's latest rollout (label reason: Progressing, Paused, Promoted, RolledBack)",
            m.rollout_phase.clone(),
        );
        Metrics { registry, ..m }
    }
}

/// The values of `testrunner_rollout_phase`'s reason label.
pub const ROLLOUT_PHASES: [&str; 4] = ["Progressing", "Paused", "Promoted", "RolledBack"];

impl Metrics {
    /// Records a reconcile.
    pub fn reconciled(&self, took: Duration) {
        self.reconciles.inc();
        self.reconcile_duration.observe(took.as_secs_f64());
    }

    /// Records a failed reconcile.
    pub fn reconcile_failed(&self, category: &'static str) {
        self.reconcile_errors
            .get_or_create(&ErrorLabels {
                category: category.into(),
            })
            .inc();
    }

    /// Removes a deleted pool's series.
    pub fn forget_pool(&self, labels: &PoolLabels) {
        for family in [
            &self.queue_ready,
            &self.queue_consumers,
            &self.workers_desired,
            &self.workers_current,
            &self.workers_ready,
            &self.workers_busy,
            &self.broker_unreachable,
            &self.alerts_active,
            &self.quarantined_tickets,
            &self.rollout_failed,
        ] {
            family.remove(labels);
        }
        for phase in ROLLOUT_PHASES {
            self.rollout_phase.remove(&PoolReasonLabels {
                namespace: labels.namespace.clone(),
                pool: labels.pool.clone(),
                reason: phase.into(),
            });
        }
        for reason in crate::broker::Probe::FAILURE_REASONS {
            self.probe_failures.remove(&ProbeFailureLabels {
                namespace: labels.namespace.clone(),
                pool: labels.pool.clone(),
                reason: (*reason).into(),
            });
        }
        for reason in [
            "Healthy",
            "PoisonTicket",
            "BrokenEnvironment",
            "OutOfMemory",
            "QueueStalled",
        ] {
            self.verdict.remove(&PoolReasonLabels {
                namespace: labels.namespace.clone(),
                pool: labels.pool.clone(),
                reason: reason.into(),
            });
        }
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
