//! The node's own objects: its Node (capacity, addresses, Ready condition), its Lease
//! in `kube-node-lease` (renewed every 10 s, as a real kubelet does), and, when no
//! scheduler runs, the binding of pending pods to itself.

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::api::now;

/// How often the node renews its Lease.
pub const LEASE_RENEW: Duration = Duration::from_secs(10);
/// The Lease's duration (a real kubelet's default).
pub const LEASE_DURATION_SECONDS: i64 = 40;
/// How often the node writes its status when nothing changed.
pub const STATUS_REPORT: Duration = Duration::from_secs(60);
/// Field manager of the node's writes.
pub const MANAGER: &str = "testrunner-simulated-node";

/// The Node object a simulated node registers: the labels a kubelet sets on itself,
/// the legacy `beta.kubernetes.io/{os,arch}` pair included (a real kubelet still sets
/// both, and the controller manager adds the pair to a Node that lacks it).
pub fn node_object(name: &str) -> Value {
    let arch = std::env::consts::ARCH
        .replace("x86_64", "amd64")
        .replace("aarch64", "arm64");
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": arch,
                "beta.kubernetes.io/os": "linux",
                "beta.kubernetes.io/arch": arch,
                "node.kubernetes.io/instance-type": "simulated",
            },
        },
        "spec": {},
    })
}

/// The node's status: this machine's CPUs and memory, loopback addresses, Ready, and
/// the port of its endpoint ([`super::server`]).
pub fn node_status(name: &str, transition: &str, port: u16) -> Value {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .map(|v| v.trim().to_string())
        })
        .map(|v| v.replace(" kB", "Ki"))
        .unwrap_or_else(|| "8Gi".into());
    let resources = json!({"cpu": cpus.to_string(), "memory": memory, "pods": "110", "ephemeral-storage": "100Gi"});
    let t = now();
    let condition = |type_: &str, status: &str, reason: &str, message: &str| {
        json!({"type": type_, "status": status, "reason": reason, "message": message,
            "lastHeartbeatTime": t, "lastTransitionTime": transition})
    };
    json!({
        "capacity": resources,
        "allocatable": resources,
        "conditions": [
            condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
            condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            condition("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
            condition("Ready", "True", "KubeletReady", "simulated node: containers run as local processes"),
        ],
        "addresses": [
            {"type": "InternalIP", "address": "127.0.0.1"},
            {"type": "Hostname", "address": name},
        ],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": port}},
        "nodeInfo": {
            "machineID": "", "systemUUID": "", "bootID": "",
            "kernelVersion": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
            "osImage": "testrunner simulated node",
            "containerRuntimeVersion": "simulated://1",
            "kubeletVersion": concat!("v0.0.0-testrunner-", env!("CARGO_PKG_VERSION")),
            "kubeProxyVersion": "",
            "operatingSystem": "linux", "architecture": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
        },
    })
}

/// Registers the node: creates its Node (or takes the one of the same name) and writes
/// its status. Returns the Node's uid.
pub async fn register(
    client: &kube::Client,
    name: &str,
    since: &str,
    port: u16,
) -> Result<String, String> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(node_object(name)).map_err(|e| e.to_string())?;
    let created = match nodes.create(&PostParams::default(), &node).await {
        Ok(n) => n,
        Err(kube::Error::Api(e)) if e.code == 409 => nodes
            .get(name)
            .await
            .map_err(|e| format!("failed to read Node {name}: {e}"))?,
        Err(e) => return Err(format!("failed to register Node {name}: {e}")),
    };
    write_status(client, name, since, port).await?;
    created
        .metadata
        .uid
        .ok_or_else(|| format!("Node {name} has no uid"))
}

async fn write_status(
    client: &kube::Client,
    name: &str,
    since: &str,
    port: u16,
) -> Result<(), String> {
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": node_status(name, since, port)})),
        )
        .await
        .map(|_| ())
        .map_err(|e| format!("failed to write the status of Node {name}: {e}"))
}

async fn renew_lease(client: &kube::Client, name: &str, node_uid: &str) -> Result<(), String> {
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), "kube-node-lease");
    let renew = jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string();
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": name,
            "namespace": "kube-node-lease",
            "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": name, "uid": node_uid}],
        },
        "spec": {"holderIdentity": name, "leaseDurationSeconds": LEASE_DURATION_SECONDS, "renewTime": renew},
    });
    leases
        .patch(
            name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&lease),
        )
        .await
        .map(|_| ())
        .map_err(|e| format!("failed to renew Lease kube-node-lease/{name}: {e}"))
}

/// Renews the Lease every [`LEASE_RENEW`] and the status every [`STATUS_REPORT`], and
/// registers the node again if its Node was deleted, until `stop`.
pub async fn heartbeat(
    client: kube::Client,
    name: String,
    mut uid: String,
    since: String,
    port: u16,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(LEASE_RENEW);
    let mut beats: u64 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        beats += 1;
        let nodes: Api<Node> = Api::all(client.clone());
        if let Ok(None) = nodes.get_opt(&name).await {
            tracing::warn!(node = %name, "the Node was deleted: registering again");
            match register(&client, &name, &since, port).await {
                Ok(u) => uid = u,
                Err(e) => tracing::warn!(node = %name, error = %e, "registering the node failed"),
            }
        }
        if let Err(e) = renew_lease(&client, &name, &uid).await {
            tracing::warn!(node = %name, error = %e, "lease renewal failed; retrying");
        }
        if (beats * LEASE_RENEW.as_secs()).is_multiple_of(STATUS_REPORT.as_secs())
            && let Err(e) = write_status(&client, &name, &since, port).await
        {
            tracing::warn!(node = %name, error = %e, "status report failed; retrying");
        }
    }
}

/// Binds every pod that no node has to `node` (what the scheduler does when there is
/// one), until `stop`.
pub async fn bind_pending(client: kube::Client, node: String, mut stop: watch::Receiver<bool>) {
    let pods: Api<Pod> = Api::all(client.clone());
    let config = watcher::Config::default().fields("spec.nodeName=");
    let mut events = watcher(pods, config)
        .default_backoff()
        .applied_objects()
        .boxed();
    loop {
        let pod = tokio::select! {
            got = events.next() => match got {
                Some(Ok(pod)) => pod,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "watching pending pods failed; retrying");
                    continue;
                }
                None => return,
            },
            _ = stop.changed() => return,
        };
        if pod.metadata.deletion_timestamp.is_some()
            || pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.as_deref())
                .is_some_and(|n| !n.is_empty())
        {
            continue;
        }
        let (Some(ns), Some(name)) = (pod.metadata.namespace.clone(), pod.metadata.name.clone())
        else {
            continue;
        };
        let binding = json!({
            "apiVersion": "v1", "kind": "Binding",
            "metadata": {"name": name, "namespace": ns, "uid": pod.metadata.uid},
            "target": {"apiVersion": "v1", "kind": "Node", "name": node},
        });
        let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let mut delay = Duration::from_millis(200);
        for attempt in 1..=5 {
            match api
                .create_subresource::<Value, Value>(
                    "binding",
                    &name,
                    &PostParams::default(),
                    &binding,
                )
                .await
            {
                Ok(_) => {
                    tracing::info!(pod = %name, namespace = %ns, node = %node, "pod bound");
                    break;
                }
                // Someone else bound it, or it is gone: nothing to do.
                Err(kube::Error::Api(e)) if matches!(e.code, 404 | 409) => break,
                Err(e) => {
                    tracing::warn!(pod = %name, namespace = %ns, attempt, error = %e, "binding failed");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
            }
        }
    }
}
