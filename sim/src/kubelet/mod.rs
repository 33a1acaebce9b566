//! The simulated node: a kubelet that runs each pod's containers as local processes and
//! talks to the API server only through a kube client, as a real kubelet does, so the
//! same node joins the embedded API server and a real control plane.
//!
//! It registers a Node (capacity, addresses, Ready) and renews its Lease ([`node`]),
//! and serves `kubectl logs` on its own HTTPS port, as a kubelet does ([`server`]);
//! when no scheduler runs it binds pending pods to itself. It watches the pods bound
//! to it (`spec.nodeName`): a new pod goes Pending, its init containers run to
//! completion in order, then its containers run. An init container with
//! `restartPolicy: Always` is a sidecar (KEP-753): it starts in its place among the init
//! containers, the next one waits until it has started (it runs, and its startup probe
//! passed), and it keeps running for the pod's life, restarted whenever it exits, its
//! readiness part of the pod's. Exits become `lastState.terminated` and restarts follow
//! CrashLoopBackOff (10 s doubling to 5 min, reset after 10 min of running), every
//! duration divided by the time scale, as the container's own `restartPolicy` says, else
//! the pod's; once a pod's containers are all done, its sidecars are stopped and the pod
//! ends Succeeded or Failed from its containers. The node writes `pods/status`
//! ([`pod`]). Each container, a sidecar too, runs as PID 1 of a PID namespace of its own
//! (see [`super::isolate`]), so stopping it stops every process it started, in a mount
//! namespace of its own with its own volume mounts at their `mountPath`, as its
//! `runAsUser`/`runAsGroup`, with the API server's `KUBERNETES_SERVICE_HOST` and
//! `_PORT`; a pod that declares container ports gets a network namespace of its own
//! ([`container`]); startup, readiness and liveness probes of containers and sidecars run
//! as a kubelet runs them ([`probe`]). `testrunner-operator` as a command, and the
//! operator image's entrypoint, run [`Config::exe`]. Deleting a pod sends SIGTERM to
//! each container, then, once they have all exited, to each sidecar, the last declared
//! first, each after the ones declared after it have exited, all within the one grace
//! period (SIGKILL to whatever still runs when it is over); then it writes the final
//! status and deletes the pod for good (grace period 0, the pod's uid as precondition).

pub mod container;
pub mod node;
pub mod pod;
mod probe;
pub mod server;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use container::{BACKOFF_MAX, BACKOFF_RESET, BACKOFF_START, next_backoff};

/// Settings of the kubelet.
#[derive(Clone, Debug)]
pub struct Config {
    /// Durations (backoff, grace periods) are divided by this factor.
    pub time_scale: f64,
    /// Where pod directories go.
    pub root: PathBuf,
    /// The binary a container's `testrunner-operator` command runs (outside a root
    /// filesystem).
    pub exe: PathBuf,
    /// The Node's name.
    pub node_name: String,
    /// Images the node has a root filesystem for: their containers run inside it.
    pub images: std::collections::BTreeMap<String, PathBuf>,
    /// Image repositories (references without tag or digest) that are this project's
    /// operator image: their containers run [`Config::exe`] as the image's entrypoint.
    pub operator_images: Vec<String>,
    /// The API server as containers reach it (`KUBERNETES_SERVICE_HOST` and
    /// `KUBERNETES_SERVICE_PORT`); `None`: not given to containers.
    pub api_server: Option<std::net::SocketAddr>,
    /// Loopback addresses of this machine that pods with a network namespace of their
    /// own reach at the same address (the API server is always among them).
    pub forward: Vec<std::net::SocketAddr>,
    /// A hollow node (as kubemark's): pods are marked Running and Ready without starting
    /// any process, for measuring the operator at a scale no machine runs for real.
    pub hollow: bool,
}

/// The binary containers run as `testrunner-operator`, where any user may reach it: a
/// link (or copy) of `exe` in the node's own directory. A container that runs as
/// `runAsUser` must be able to execute it, as it could the binary of its image; `exe`
/// itself may sit below a directory only its owner enters (a build in `/root`).
fn node_binary(root: &Path, exe: &Path) -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let dir = root.join("bin");
    std::fs::create_dir_all(&dir)
        .map_err(|e| format!("failed to create {}: {e}", dir.display()))?;
    for d in [root, dir.as_path()] {
        let _ = std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755));
    }
    let local = dir.join("testrunner-operator");
    let _ = std::fs::remove_file(&local);
    if std::fs::hard_link(exe, &local).is_err() {
        std::fs::copy(exe, &local).map_err(|e| {
            format!(
                "failed to copy {} to {}: {e}",
                exe.display(),
                local.display()
            )
        })?;
    }
    std::fs::set_permissions(&local, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("failed to make {} executable: {e}", local.display()))?;
    Ok(local)
}

/// The repository of an image reference: without `@digest` and `:tag`.
pub fn repository(image: &str) -> &str {
    let image = image.split('@').next().unwrap_or(image);
    match image.rfind(':') {
        Some(i) if !image[i..].contains('/') => &image[..i],
        _ => image,
    }
}

impl Config {
    /// Whether `image` is the operator's (see [`Config::operator_images`]).
    pub fn is_operator_image(&self, image: &str) -> bool {
        let repo = repository(image);
        self.operator_images.iter().any(|o| repository(o) == repo)
    }

    /// What pods with a network namespace of their own reach on this machine.
    fn forwarded(&self) -> Vec<std::net::SocketAddr> {
        let mut all: Vec<std::net::SocketAddr> = self.api_server.into_iter().collect();
        for a in &self.forward {
            if !all.contains(a) {
                all.push(*a);
            }
        }
        all
    }

    fn scaled(&self, d: Duration) -> Duration {
        if self.time_scale > 0.0 {
            d.div_f64(self.time_scale)
        } else {
            d
        }
    }
}

/// A stop request for a pod: grace period (unscaled seconds); -1 when the node shuts
/// down (the processes stop, the pod object stays).
type Stop = Option<i64>;

struct PodTask {
    stop: watch::Sender<Stop>,
    task: JoinHandle<()>,
}

/// A running kubelet.
pub struct Kubelet {
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Kubelet {
    /// Registers the node through `client` and starts running the pods bound to it.
    /// With `binder` (a client allowed to bind pods), the node also binds every pod
    /// that no node has: for an API server without a scheduler.
    pub async fn start(
        client: kube::Client,
        binder: Option<kube::Client>,
        mut config: Config,
    ) -> Result<Self, String> {
        config.exe = node_binary(&config.root, &config.exe)?;
        if !super::isolate::available() {
            tracing::warn!(
                "no PID namespaces here (they need root): containers run as process groups, and processes a container moves out of its group outlive it"
            );
        }
        let since = super::api::now();
        let (stop, stop_rx) = watch::channel(false);
        let (port, endpoint) =
            server::start(config.root.clone(), &config.node_name, stop_rx.clone()).await?;
        let uid = node::register(&client, &config.node_name, &since, port).await?;
        let mut tasks = vec![
            endpoint,
            tokio::spawn(node::heartbeat(
                client.clone(),
                config.node_name.clone(),
                uid,
                since,
                port,
                stop_rx.clone(),
            )),
        ];
        if let Some(binder) = binder {
            tasks.push(tokio::spawn(node::bind_pending(
                binder,
                config.node_name.clone(),
                stop_rx.clone(),
            )));
        }
        tasks.push(tokio::spawn(run(client, Arc::new(config), stop_rx)));
        Ok(Self {
            stop,
            tasks: Mutex::new(tasks),
        })
    }

    /// Stops every pod's processes (SIGTERM, then SIGKILL after two seconds) and waits.
    /// The pod objects stay: the node goes away, not the pods.
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for t in tasks {
            let _ = t.await;
        }
    }
}

/// The scratch directory of a pod.
fn pod_dir(root: &Path, ns: &str, name: &str, uid: &str) -> PathBuf {
    root.join(format!("{ns}_{name}_{}", &uid[..uid.len().min(8)]))
}

/// Where the node writes a container's output (what `kubectl logs` shows).
pub fn log_path(root: &Path, ns: &str, name: &str, uid: &str, container: &str) -> PathBuf {
    pod_dir(root, ns, name, uid).join(format!("{container}.log"))
}

type Key = (String, String, String);

fn pod_key(pod: &Value) -> Key {
    let m = &pod["metadata"];
    (
        m["namespace"].as_str().unwrap_or_default().into(),
        m["name"].as_str().unwrap_or_default().into(),
        m["uid"].as_str().unwrap_or_default().into(),
    )
}

/// The pods this node runs, and what it does when one changes.
struct Pods {
    client: kube::Client,
    config: Arc<Config>,
    running: HashMap<Key, PodTask>,
    /// Pods whose run ended here (uids): never started again.
    done: HashSet<String>,
}

impl Pods {
    fn handle(&mut self, pod: &Value, deleted: bool) {
        let key = pod_key(pod);
        let terminating = pod.pointer("/metadata/deletionTimestamp").is_some();
        if deleted {
            self.done.remove(&key.2);
            if let Some(t) = self.running.get(&key) {
                let _ = t.stop.send(Some(0));
            }
            return;
        }
        if terminating {
            let grace = pod
                .pointer("/metadata/deletionGracePeriodSeconds")
                .and_then(Value::as_i64)
                .unwrap_or(30);
            match self.running.get(&key) {
                Some(t) => {
                    let _ = t.stop.send(Some(grace));
                }
                // Not running here (finished, or never started): delete it for good.
                None => {
                    tokio::spawn(pod::delete_for_good(self.client.clone(), key));
                }
            }
            return;
        }
        if self.running.contains_key(&key) || self.done.contains(&key.2) {
            return;
        }
        let finished = matches!(
            pod.pointer("/status/phase").and_then(Value::as_str),
            Some("Succeeded" | "Failed")
        );
        if finished {
            return;
        }
        let (stop_tx, stop_rx) = watch::channel(None);
        let task = if self.config.hollow {
            tokio::spawn(pod::run_hollow_pod(
                self.client.clone(),
                pod.clone(),
                stop_rx,
            ))
        } else {
            tokio::spawn(pod::run_pod(
                self.client.clone(),
                self.config.clone(),
                pod.clone(),
                stop_rx,
            ))
        };
        self.running.insert(
            key,
            PodTask {
                stop: stop_tx,
                task,
            },
        );
    }

    /// After a re-list: pods that went away meanwhile are stopped at once.
    fn forget_all_but(&mut self, seen: &HashSet<Key>) {
        for (key, t) in &self.running {
            if !seen.contains(key) {
                let _ = t.stop.send(Some(0));
            }
        }
        self.done.retain(|uid| seen.iter().any(|k| &k.2 == uid));
    }

    fn reap(&mut self) {
        let done = &mut self.done;
        self.running.retain(|key, t| {
            let finished = t.task.is_finished();
            if finished {
                done.insert(key.2.clone());
            }
            !finished
        });
    }
}

async fn run(client: kube::Client, config: Arc<Config>, mut stop: watch::Receiver<bool>) {
    let api: Api<Pod> = Api::all(client.clone());
    let selector = format!("spec.nodeName={}", config.node_name);
    let mut events = watcher(api, watcher::Config::default().fields(&selector))
        .default_backoff()
        .boxed();
    let mut pods = Pods {
        client,
        config,
        running: HashMap::new(),
        done: HashSet::new(),
    };
    let mut relist: Option<HashSet<Key>> = None;
    loop {
        let event = tokio::select! {
            got = events.next() => match got {
                Some(Ok(event)) => event,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "watching this node's pods failed; retrying");
                    continue;
                }
                None => break,
            },
            _ = stop.changed() => break,
        };
        pods.reap();
        let as_value = |p: &Pod| serde_json::to_value(p).unwrap_or_default();
        match event {
            watcher::Event::Init => relist = Some(HashSet::new()),
            watcher::Event::InitApply(p) => {
                let v = as_value(&p);
                if let Some(seen) = relist.as_mut() {
                    seen.insert(pod_key(&v));
                }
                pods.handle(&v, false);
            }
            watcher::Event::InitDone => {
                if let Some(seen) = relist.take() {
                    pods.forget_all_but(&seen);
                }
            }
            watcher::Event::Apply(p) => pods.handle(&as_value(&p), false),
            watcher::Event::Delete(p) => pods.handle(&as_value(&p), true),
        }
    }
    for t in pods.running.values() {
        let _ = t.stop.send(Some(-1));
    }
    for (_, t) in pods.running.drain() {
        let _ = t.task.await;
    }
}
