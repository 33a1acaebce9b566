//! Cleanup: what a deleted pool leaves in this process goes once the pool is gone: its
//! metric series, and its alerts (resolved at the receivers). The pool's probe task
//! removes the broker's side itself when it sees the pool gone (it leaves its namespace's
//! outcome reader, which deletes the outcome queue with the namespace's last pool, and an
//! unused connection is closed); a pool that never had a probe task (its Secret held no valid
//! broker URI) is swept all the same.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::runtime::reflector::ObjectRef;

use super::Guarded;
use super::probes::Probes;
use crate::alerts::Alerter;
use crate::metrics::{Metrics, PoolLabels};

/// The pools that have series and alerts in this process, and their sweeping.
#[derive(Clone)]
pub struct Cleanup(Arc<Inner>);

struct Inner {
    probes: Probes,
    metrics: Arc<Metrics>,
    alerter: Alerter,
    tracked: Mutex<HashSet<ObjectRef<Guarded>>>,
}

impl Cleanup {
    /// Sweeps the pools that `probes`' store no longer holds from `metrics` and
    /// `alerter`.
    pub fn new(probes: Probes, metrics: Arc<Metrics>, alerter: Alerter) -> Self {
        Self(Arc::new(Inner {
            probes,
            metrics,
            alerter,
            tracked: Mutex::default(),
        }))
    }

    /// Remembers that `pool` has series and alerts here (after each reconcile).
    pub fn track(&self, pool: &ObjectRef<Guarded>) {
        self.0.tracked.lock().expect("lock").insert(pool.clone());
    }

    /// Forgets the series and alerts of each tracked pool that is gone and whose probe
    /// task has ended (so that nothing records for it any more); returns how many.
    pub fn sweep(&self) -> usize {
        let gone: Vec<ObjectRef<Guarded>> = {
            let mut tracked = self.0.tracked.lock().expect("lock");
            let gone: Vec<_> = tracked
                .iter()
                .filter(|p| !self.0.probes.holds(p) && !self.0.probes.probing(p))
                .cloned()
                .collect();
            for pool in &gone {
                tracked.remove(pool);
            }
            gone
        };
        for pool in &gone {
            let namespace = pool.namespace.clone().unwrap_or_default();
            self.0.metrics.forget_pool(&PoolLabels {
                namespace: namespace.clone(),
                pool: pool.name.clone(),
            });
            self.0.alerter.forget((namespace, pool.name.clone()));
            tracing::debug!(namespace = ?pool.namespace, pool = %pool.name, "forgot a deleted pool");
        }
        gone.len()
    }

    /// Sweeps every `interval`, until the task is aborted.
    pub async fn run(self, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.sweep();
        }
    }
}
