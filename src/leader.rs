//! Leader election on a `coordination.k8s.io` Lease (kube-lease-manager), so that
//! several replicas of the operator are safe: only the holder reconciles.
//!
//! Failover: a standby takes the Lease once it has gone unrenewed for its duration
//! (default 15 s), or within two seconds once its holder released it (a leader releases
//! it when it stops on SIGTERM); the holder renews it `grace` seconds (5 s) before it
//! expires. A replica that loses the Lease exits, and Kubernetes restarts it as a
//! standby.

use std::future::Future;

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use kube_lease_manager::LeaseManagerBuilder;

/// Lease settings.
#[derive(Clone, Debug)]
pub struct Election {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This replica's identity (the pod name).
    pub identity: String,
    /// Seconds the Lease stays valid without renewal.
    pub duration_seconds: u64,
}

/// Why leading stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Lease could not be read or written.
    #[error("failed to manage the leader Lease: {0}")]
    Lease(#[from] kube_lease_manager::LeaseManagerError),
    /// Another replica took the Lease.
    #[error("failed to keep the leader Lease: another replica holds it now")]
    Lost,
}

/// How often a standby reads the Lease to see whether its holder released it.
const RELEASE_POLL: std::time::Duration = std::time::Duration::from_secs(2);

/// Resolves once the Lease has no holder (its leader stopped and released it), read by
/// name every [`RELEASE_POLL`]; errors are ignored (the lease manager reports them).
async fn released(leases: &Api<Lease>, election: &Election) {
    loop {
        tokio::time::sleep(RELEASE_POLL).await;
        if let Ok(Some(lease)) = leases.get_opt(&election.name).await
            && lease
                .spec
                .and_then(|s| s.holder_identity)
                .is_none_or(|h| h.is_empty())
        {
            return;
        }
    }
}

/// A default identity: the host name, else a process-unique name.
pub fn default_identity() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| format!("testrunner-operator-{}", std::process::id()))
}

/// Waits for the Lease, then runs `work` while holding it. Returns when `work`
/// ends (the Lease is released) or with [`Error::Lost`] when the Lease is lost; Ctrl-C
/// stops it (see [`run_as_leader_until`]).
pub async fn run_as_leader<F: Future<Output = ()>>(
    client: Client,
    election: Election,
    work: F,
) -> Result<(), Error> {
    run_as_leader_until(client, election, work, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await
}

/// Resolves on SIGTERM (what the kubelet sends to stop a pod) or SIGINT. In a container
/// the operator is PID 1, which gets no signal it does not handle: without this it
/// would only go with SIGKILL at the end of the grace period, holding its Lease.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("stopping: shutdown signal received");
}

/// [`run_as_leader`], stopping when `shutdown` resolves: while waiting, or while
/// leading (then `work` is dropped and the Lease released, so that a standby takes
/// over at once instead of after the Lease's duration).
pub async fn run_as_leader_until<F: Future<Output = ()>, S: Future<Output = ()>>(
    client: Client,
    election: Election,
    work: F,
    shutdown: S,
) -> Result<(), Error> {
    tokio::pin!(shutdown);
    let grace = (election.duration_seconds / 3).clamp(1, 5);
    let manager = || {
        LeaseManagerBuilder::new(client.clone(), &election.name)
            .with_namespace(&election.namespace)
            .with_identity(&election.identity)
            .with_duration(election.duration_seconds)
            .with_grace(grace)
            // One field manager per replica: server-side apply's conflicts are what keep
            // two replicas from taking a free Lease at once.
            .with_field_manager(format!(
                "{}-{}",
                crate::crd::FIELD_MANAGER,
                election.identity
            ))
            .build()
    };
    let (mut leading, mut task) = manager().await?.watch().await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &election.namespace);
    tracing::info!(lease = %election.name, identity = %election.identity, "waiting for the leader Lease");
    while !*leading.borrow_and_update() {
        tokio::select! {
            changed = leading.changed() => {
                if changed.is_err() {
                    return Err(task.await.map_err(|_| Error::Lost)?.err().map(Error::Lease).unwrap_or(Error::Lost));
                }
            }
            _ = released(&leases, &election) => {
                // The lease manager would wait for the old Lease to expire: start a new
                // one, which takes the free Lease at once. The old one is stopped, not
                // dropped, so that it releases nothing on its way out.
                tracing::info!(lease = %election.name, "the leader released the Lease; taking it");
                task.abort();
                (leading, task) = manager().await?.watch().await;
            }
            _ = &mut shutdown => return Ok(()),
        }
    }
    tracing::info!(lease = %election.name, "became the leader");
    let result = tokio::select! {
        _ = work => Ok(()),
        _ = &mut shutdown => Ok(()),
        _ = async {
            loop {
                if leading.changed().await.is_err() || !*leading.borrow_and_update() {
                    break;
                }
            }
        } => Err(Error::Lost),
    };
    drop(leading);
    let _ = task.await;
    result
}
