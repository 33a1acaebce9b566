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
    /// Static reason (Error, OOMKilled, ...), verdict (PoisonTicket, ...) or probe
    /// failure (ConnectionFailed, QueueNotFound, ...).
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

/// Labels of the API request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiRequestLabels {
    /// `GET`, `WATCH` (a GET with `watch=true`), `POST`, `PUT`, `PATCH` or `DELETE`.
    pub method: String,
}

impl ApiRequestLabels {
    /// The label of a request to the API server.
    pub fn of<B>(request: &http::Request<B>) -> Self {
        let watch = request.method() == http::Method::GET
            && request
                .uri()
                .query()
                .is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
        Self {
            method: if watch {
                "WATCH".into()
            } else {
                request.method().as_str().into()
            },
        }
    }

    /// True for requests that change something (POST, PUT, PATCH, DELETE).
    pub fn writes(&self) -> bool {
        matches!(self.method.as_str(), "POST" | "PUT" | "PATCH" | "DELETE")
    }
}

/// Declares the operator's metrics once each: the field, its type and value, and the
/// name and help it is registered with.
macro_rules! metrics {
    ($($(#[doc = $doc:literal])* $field:ident: $ty:ty = $init:expr => $name:literal, $help:literal;)*) => {
        /// Every metric the operator exports.
        pub struct Metrics {
            /// The registry to encode.
            pub registry: Registry,
            $($(#[doc = $doc])* pub $field: $ty,)*
        }

        impl Default for Metrics {
            fn default() -> Self {
                let mut registry = Registry::with_prefix("testrunner");
                $(let $field: $ty = $init;
                registry.register($name, $help, $field.clone());)*
                Metrics { registry, $($field,)* }
            }
        }
    };
}

metrics! {
    /// Tickets ready in the queue.
    queue_ready: Family<PoolLabels, Gauge> = Family::default()
        => "queue_ready_tickets", "Tickets ready in the pool's queue";
    /// Consumers on the queue.
    queue_consumers: Family<PoolLabels, Gauge> = Family::default()
        => "queue_consumers", "Consumers on the pool's queue";
    /// Workers wanted.
    workers_desired: Family<PoolLabels, Gauge> = Family::default()
        => "workers_desired", "Worker pods the operator wants";
    /// Worker pods that exist.
    workers_current: Family<PoolLabels, Gauge> = Family::default()
        => "workers_current", "Worker pods that exist (not terminating)";
    /// Worker pods that are ready.
    workers_ready: Family<PoolLabels, Gauge> = Family::default()
        => "workers_ready", "Worker pods that are ready";
    /// Worker pods running a ticket.
    workers_busy: Family<PoolLabels, Gauge> = Family::default()
        => "workers_busy", "Worker pods running a ticket, as their workers report it";
    /// 1 while the pool's broker is unreachable.
    broker_unreachable: Family<PoolLabels, Gauge> = Family::default()
        => "broker_unreachable", "1 while the pool's broker cannot be reached";
    /// Reconcile duration.
    reconcile_duration: Histogram = Histogram::new(exponential_buckets(0.001, 2.0, 14))
        => "reconcile_duration_seconds", "Time spent in one reconcile";
    /// Reconciles.
    reconciles: Counter = Counter::default()
        => "reconciles", "Reconciles run";
    /// Reconcile failures by category.
    reconcile_errors: Family<ErrorLabels, Counter> = Family::default()
        => "reconcile_errors", "Failed reconciles by error category";
    /// Probe latency.
    probe_duration: Histogram = Histogram::new(exponential_buckets(0.0001, 2.0, 16))
        => "queue_probe_duration_seconds", "Time one queue probe took";
    /// Probe failures by reason.
    probe_failures: Family<PoolReasonLabels, Counter> = Family::default()
        => "queue_probe_failures", "Failed queue probes by reason";
    /// Worker crashes by Kubernetes reason.
    worker_crashes: Family<PoolReasonLabels, Counter> = Family::default()
        => "worker_crashes", "Worker container crashes by reason (Error, OOMKilled, ...)";
    /// Tickets in quarantine.
    quarantined_tickets: Family<PoolLabels, Gauge> = Family::default()
        => "quarantined_tickets", "Tickets of the pool in quarantine";
    /// Tickets returned from quarantine.
    replayed_tickets: Family<PoolLabels, Counter> = Family::default()
        => "replayed_tickets", "Tickets returned from quarantine to the work queue";
    /// 1 for the pool's current diagnosis verdict (label `reason`).
    verdict: Family<PoolReasonLabels, Gauge> = Family::default()
        => "diagnosis_verdict", "1 for the pool's current crash diagnosis (label reason: Healthy, PoisonTicket, BrokenEnvironment, OutOfMemory, QueueStalled)";
    /// 1 while the pool's latest rollout failed.
    rollout_failed: Family<PoolLabels, Gauge> = Family::default()
        => "rollout_failed", "1 while the pool's latest rollout failed its canary and the spec still names that revision";
    /// 1 for the phase of the pool's latest rollout (label `reason`).
    rollout_phase: Family<PoolReasonLabels, Gauge> = Family::default()
        => "rollout_phase", "1 for the phase of the pool's latest rollout (label reason: Progressing, Paused, Promoted, RolledBack)";
    /// Alerts delivered, by receiver kind and status (one per alert in a request).
    alerts_sent: Family<AlertSentLabels, Counter> = Family::default()
        => "alerts_sent", "Alerts delivered to a receiver, by receiver kind and status";
    /// Failed alert deliveries (requests), by receiver kind.
    alert_send_failures: Family<ReceiverLabels, Counter> = Family::default()
        => "alert_send_failures", "Failed alert deliveries, by receiver kind";
    /// How long tickets waited in the queue for a worker, per pool.
    ticket_wait: Family<PoolLabels, Histogram, fn() -> Histogram> = Family::new_with_constructor(ticket_wait_histogram)
        => "ticket_wait_seconds", "How long a ticket waited in the queue, from its publish timestamp to a worker taking it (first deliveries of stamped tickets only)";
    /// Alerts currently active per pool.
    alerts_active: Family<PoolLabels, Gauge> = Family::default()
        => "alerts_active", "Alerts currently active for the pool";
    /// Requests to the Kubernetes API server, by method.
    api_requests: Family<ApiRequestLabels, Counter> = Family::default()
        => "kube_api_requests", "Requests the operator sent to the Kubernetes API server, by method (WATCH: a watch request)";
}

/// Buckets of `testrunner_ticket_wait_seconds`: a quarter second to an hour.
fn ticket_wait_histogram() -> Histogram {
    Histogram::new([
        0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
    ])
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
        self.ticket_wait.remove(labels);
        for phase in ROLLOUT_PHASES {
            self.rollout_phase.remove(&PoolReasonLabels {
                namespace: labels.namespace.clone(),
                pool: labels.pool.clone(),
                reason: phase.into(),
            });
        }
        for reason in crate::broker::Probe::FAILURE_REASONS {
            self.probe_failures.remove(&PoolReasonLabels {
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

#[cfg(test)]
mod tests {
    use super::ApiRequestLabels;

    fn label(method: &str, uri: &str) -> ApiRequestLabels {
        ApiRequestLabels::of(
            &http::Request::builder()
                .method(method)
                .uri(uri)
                .body(())
                .unwrap(),
        )
    }

    #[test]
    fn api_requests_are_counted_by_method_and_watches_apart() {
        let list = label("GET", "/api/v1/pods?labelSelector=a%3Db");
        assert_eq!(list.method, "GET");
        assert!(!list.writes());
        let watch = label(
            "GET",
            "/apis/testrunner.dev/v1alpha1/testrunnerpools?allowWatchBookmarks=true&watch=true",
        );
        assert_eq!(watch.method, "WATCH");
        assert!(!watch.writes());
        for write in ["POST", "PUT", "PATCH", "DELETE"] {
            let l = label(write, "/api/v1/namespaces/ci/pods");
            assert_eq!(l.method, write);
            assert!(l.writes(), "{write} writes");
        }
    }
}
