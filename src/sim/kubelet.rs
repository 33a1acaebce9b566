//! The simulated kubelet: runs each pod's containers as local processes.
//!
//! A new pod goes Pending, then its init containers run to completion in order, then
//! its containers run; exits become `lastState.terminated` and restarts follow
//! CrashLoopBackOff (10 s doubling to 5 min, reset after 10 min of running), every
//! duration divided by the time scale. Paths under the pod's emptyDir mounts (such as
//! `/testrunner`) map to a per-pod directory; `testrunner-operator` as a command is
//! this very binary. Each container runs as PID 1 of a PID namespace of its own (see
//! [`super::isolate`]), so stopping it stops every process it started. Deleting a pod
//! sends SIGTERM to each container, waits the grace period, then sends SIGKILL.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::api::{Cluster, now};
use base64::Engine;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// Settings of the kubelet.
#[derive(Clone, Debug)]
pub struct Config {
    /// Durations (backoff, grace periods) are divided by this factor.
    pub time_scale: f64,
    /// Where pod directories go.
    pub root: PathBuf,
    /// The binary `testrunner-operator` commands run.
    pub exe: PathBuf,
    /// Node name written to `spec.nodeName`.
    pub node_name: String,
    /// Images the node has a root filesystem for: their containers run inside it.
    pub images: std::collections::BTreeMap<String, PathBuf>,
}

impl Config {
    fn scaled(&self, d: Duration) -> Duration {
        if self.time_scale > 0.0 {
            d.div_f64(self.time_scale)
        } else {
            d
        }
    }
}

/// First CrashLoopBackOff delay.
pub const BACKOFF_START: Duration = Duration::from_secs(10);
/// Longest CrashLoopBackOff delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// Running this long resets the backoff.
pub const BACKOFF_RESET: Duration = Duration::from_secs(600);

/// The next backoff after `current`.
pub fn next_backoff(current: Duration) -> Duration {
    (current * 2).min(BACKOFF_MAX)
}

/// A stop request for a pod: grace period (unscaled seconds).
type Stop = Option<i64>;

struct PodTask {
    stop: watch::Sender<Stop>,
    task: JoinHandle<()>,
}

/// A running kubelet.
pub struct Kubelet {
    stop: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Kubelet {
    /// Starts watching pods of `cluster`.
    pub fn start(cluster: Arc<Cluster>, config: Config) -> Self {
        let root = config.root.clone();
        cluster.set_log_locator(Arc::new(move |ns, name, uid, container| {
            pod_dir(&root, ns, name, uid).join(format!("{container}.log"))
        }));
        if !super::isolate::available() {
            tracing::warn!(
                "no PID namespaces here (they need root): containers run as process groups, and processes a container moves out of its group outlive it"
            );
        }
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run(cluster, Arc::new(config), stop_rx));
        Self {
            stop,
            task: Mutex::new(Some(task)),
        }
    }

    /// Stops every pod's processes (SIGTERM, then SIGKILL after two seconds) and waits.
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = task {
            let _ = t.await;
        }
    }
}

/// The scratch directory of a pod.
fn pod_dir(root: &Path, ns: &str, name: &str, uid: &str) -> PathBuf {
    root.join(format!("{ns}_{name}_{}", &uid[..uid.len().min(8)]))
}

fn pod_key(pod: &Value) -> (String, String, String) {
    let m = &pod["metadata"];
    (
        m["namespace"].as_str().unwrap_or_default().into(),
        m["name"].as_str().unwrap_or_default().into(),
        m["uid"].as_str().unwrap_or_default().into(),
    )
}

fn grace_of(pod: &Value) -> i64 {
    pod.pointer("/metadata/deletionGracePeriodSeconds")
        .and_then(Value::as_i64)
        .unwrap_or(30)
}

async fn run(cluster: Arc<Cluster>, config: Arc<Config>, mut stop: watch::Receiver<bool>) {
    let mut rx = cluster.subscribe();
    let mut pods: HashMap<(String, String, String), PodTask> = HashMap::new();
    let handle = |pod: &Value, deleted: bool, pods: &mut HashMap<_, PodTask>| {
        let key = pod_key(pod);
        let terminating = pod.pointer("/metadata/deletionTimestamp").is_some();
        if deleted || terminating {
            let grace = if deleted { 0 } else { grace_of(pod) };
            match pods.get(&key) {
                Some(t) => {
                    let _ = t.stop.send(Some(grace));
                }
                None if terminating => {
                    // Never started here (or already finished): nothing to stop.
                    cluster.remove_now("pods", &key.0, &key.1);
                }
                None => {}
            }
            return;
        }
        if pods.contains_key(&key) {
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
        let task = tokio::spawn(run_pod(
            cluster.clone(),
            config.clone(),
            pod.clone(),
            stop_rx,
        ));
        pods.insert(
            key,
            PodTask {
                stop: stop_tx,
                task,
            },
        );
    };
    for pod in cluster.stored("pods") {
        handle(&pod, false, &mut pods);
    }
    loop {
        tokio::select! {
            got = rx.recv() => match got {
                Ok(change) if change.storage == "pods" => {
                    handle(&change.object, change.type_ == "DELETED", &mut pods);
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    for pod in cluster.stored("pods") {
                        handle(&pod, false, &mut pods);
                    }
                }
                Err(_) => break,
            },
            _ = stop.changed() => break,
        }
        pods.retain(|_, t| !t.task.is_finished());
    }
    for t in pods.values() {
        let _ = t.stop.send(Some(-1));
    }
    for (_, t) in pods.drain() {
        let _ = t.task.await;
    }
}

/// One container's status, as the kubelet tracks it.
#[derive(Clone, Debug)]
struct ContainerStatus {
    name: String,
    image: String,
    restart_count: i64,
    state: Value,
    last_state: Value,
    ready: bool,
    started: bool,
}

impl ContainerStatus {
    fn new(c: &Value, waiting: &str) -> Self {
        Self {
            name: c["name"].as_str().unwrap_or_default().into(),
            image: c["image"].as_str().unwrap_or_default().into(),
            restart_count: 0,
            state: json!({"waiting": {"reason": waiting}}),
            last_state: json!({}),
            ready: false,
            started: false,
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "name": self.name,
            "image": self.image,
            "imageID": format!("simulated://{}", self.image),
            "containerID": format!("simulated://{}", self.name),
            "restartCount": self.restart_count,
            "state": self.state,
            "lastState": self.last_state,
            "ready": self.ready,
            "started": self.started,
        })
    }
}

struct PodModel {
    init: Vec<ContainerStatus>,
    main: Vec<ContainerStatus>,
    phase: &'static str,
    initialized: bool,
    start_time: String,
}

/// What one pod run shares between its container loops.
struct PodRun {
    cluster: Arc<Cluster>,
    config: Arc<Config>,
    namespace: String,
    name: String,
    dir: PathBuf,
    mounts: Vec<(String, PathBuf)>,
    /// Each volume's directory on this machine.
    volume_dirs: Vec<(String, PathBuf)>,
    /// ConfigMap volumes: the ConfigMap's name and the directory its keys go to.
    config_maps: Vec<(String, PathBuf)>,
    restart_policy: String,
    model: Mutex<PodModel>,
}

impl PodRun {
    /// Writes each ConfigMap volume's keys as files (a missing ConfigMap leaves the
    /// directory empty, as an optional volume does). Done before every container
    /// start: the simulation's stand-in for the kubelet's periodic refresh.
    fn project_config_maps(&self) {
        for (config_map, dir) in &self.config_maps {
            let _ = std::fs::create_dir_all(dir);
            let data = self
                .cluster
                .stored("configmaps")
                .into_iter()
                .find(|o| {
                    o.pointer("/metadata/namespace").and_then(Value::as_str)
                        == Some(&self.namespace)
                        && o.pointer("/metadata/name").and_then(Value::as_str) == Some(config_map)
                })
                .and_then(|o| o.get("data").cloned());
            if let Some(Value::Object(data)) = data {
                for (key, value) in data {
                    if let Some(text) = value.as_str() {
                        let _ = std::fs::write(dir.join(&key), text);
                    }
                }
            }
        }
    }

    fn publish(&self) {
        let status = {
            let m = self.model.lock().unwrap_or_else(|p| p.into_inner());
            let ready = m.initialized && !m.main.is_empty() && m.main.iter().all(|c| c.ready);
            let bool_s = |b: bool| if b { "True" } else { "False" };
            json!({
                "phase": m.phase,
                "hostIP": "127.0.0.1",
                "podIP": "127.0.0.1",
                "podIPs": [{"ip": "127.0.0.1"}],
                "startTime": m.start_time,
                "qosClass": "BestEffort",
                "conditions": [
                    {"type": "PodScheduled", "status": "True"},
                    {"type": "Initialized", "status": bool_s(m.initialized)},
                    {"type": "ContainersReady", "status": bool_s(ready)},
                    {"type": "Ready", "status": bool_s(ready)},
                ],
                "initContainerStatuses": m.init.iter().map(ContainerStatus::to_json).collect::<Vec<_>>(),
                "containerStatuses": m.main.iter().map(ContainerStatus::to_json).collect::<Vec<_>>(),
            })
        };
        let node = self.config.node_name.clone();
        self.cluster
            .mutate("pods", &self.namespace, &self.name, |pod| {
                let mut status = status;
                let old = pod["status"]["conditions"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                let t = now();
                if let Some(conds) = status["conditions"].as_array_mut() {
                    for c in conds {
                        let prev = old.iter().find(|o| o["type"] == c["type"]);
                        c["lastTransitionTime"] = match prev {
                            Some(p) if p["status"] == c["status"] => {
                                p["lastTransitionTime"].clone()
                            }
                            _ => json!(t),
                        };
                    }
                }
                if let Some(ics) = status["initContainerStatuses"].as_array()
                    && ics.is_empty()
                    && let Some(s) = status.as_object_mut()
                {
                    s.remove("initContainerStatuses");
                }
                pod["status"] = status;
                pod["spec"]["nodeName"] = json!(node);
                true
            });
    }

    fn with_container(&self, init: bool, i: usize, f: impl FnOnce(&mut ContainerStatus)) {
        {
            let mut m = self.model.lock().unwrap_or_else(|p| p.into_inner());
            let list = if init { &mut m.init } else { &mut m.main };
            if let Some(c) = list.get_mut(i) {
                f(c);
            }
        }
        self.publish();
    }

    /// Maps paths in the container to the pod directory when they lie under a mount:
    /// a whole argument equal to the mount path, and every `<mount>/` inside an
    /// argument that starts a path (at the start, or after a space, `=`, `:`, `;`,
    /// a quote or a parenthesis), so shell scripts can name files in their volumes
    /// while `/etc/testrunner/...` is not mistaken for `/testrunner/...`. Longer
    /// mount paths win.
    fn map_path(&self, s: &str) -> String {
        let mut mounts: Vec<&(String, PathBuf)> = self.mounts.iter().collect();
        mounts.sort_by_key(|(m, _)| std::cmp::Reverse(m.len()));
        for (mount, dir) in &mounts {
            if s.trim_end_matches('/') == mount.trim_end_matches('/') {
                return dir.display().to_string();
            }
        }
        let mut out = String::with_capacity(s.len());
        let mut rest = s;
        'scan: while !rest.is_empty() {
            let at_boundary = out.chars().last().is_none_or(|c| {
                matches!(
                    c,
                    ' ' | '=' | ':' | ';' | '"' | '\'' | '(' | '`' | '\n' | '\t'
                )
            });
            if at_boundary {
                for (mount, dir) in &mounts {
                    let prefix = format!("{}/", mount.trim_end_matches('/'));
                    if let Some(tail) = rest.strip_prefix(&prefix) {
                        out.push_str(&format!("{}/", dir.display()));
                        rest = tail;
                        continue 'scan;
                    }
                }
            }
            let c = rest.chars().next().expect("not empty");
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
        out
    }
}

fn secret_or_config_value(
    cluster: &Cluster,
    storage: &str,
    ns: &str,
    name: &str,
    key: &str,
) -> Option<String> {
    let obj = cluster.stored(storage).into_iter().find(|o| {
        o.pointer("/metadata/namespace").and_then(Value::as_str) == Some(ns)
            && o.pointer("/metadata/name").and_then(Value::as_str) == Some(name)
    })?;
    if storage == "secrets" {
        // The store keeps no stringData: it is merged into data on every write.
        let b64 = obj
            .pointer("/data")
            .and_then(|d| d.get(key))
            .and_then(Value::as_str)?;
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .ok()?,
        )
        .ok()
    } else {
        obj.pointer("/data")
            .and_then(|d| d.get(key))
            .and_then(Value::as_str)
            .map(String::from)
    }
}

/// The container's environment, Secret and ConfigMap references resolved.
fn environment(
    run: &PodRun,
    pod: &Value,
    c: &Value,
    map_paths: bool,
) -> Result<Vec<(String, String)>, String> {
    let cluster = &run.cluster;
    let ns = &run.namespace;
    let mut env = Vec::new();
    if let Some(from) = c["envFrom"].as_array() {
        for src in from {
            let prefix = src["prefix"].as_str().unwrap_or_default();
            for (storage, field) in [("secrets", "secretRef"), ("configmaps", "configMapRef")] {
                let Some(name) = src[field]["name"].as_str() else {
                    continue;
                };
                let obj = cluster.stored(storage).into_iter().find(|o| {
                    o.pointer("/metadata/namespace").and_then(Value::as_str) == Some(ns.as_str())
                        && o.pointer("/metadata/name").and_then(Value::as_str) == Some(name)
                });
                match obj {
                    Some(o) => {
                        for k in o["data"]
                            .as_object()
                            .map(|d| d.keys().cloned().collect::<Vec<_>>())
                            .unwrap_or_default()
                        {
                            if let Some(v) = secret_or_config_value(cluster, storage, ns, name, &k)
                            {
                                env.push((format!("{prefix}{k}"), v));
                            }
                        }
                    }
                    None if src[field]["optional"] == true => {}
                    None => return Err(format!("{storage} \"{name}\" not found")),
                }
            }
        }
    }
    for e in c["env"].as_array().cloned().unwrap_or_default() {
        let name = e["name"].as_str().unwrap_or_default().to_string();
        if let Some(v) = e["value"].as_str() {
            env.push((
                name,
                if map_paths {
                    run.map_path(v)
                } else {
                    v.to_string()
                },
            ));
            continue;
        }
        let from = &e["valueFrom"];
        let (storage, sel) = if from["secretKeyRef"].is_object() {
            ("secrets", &from["secretKeyRef"])
        } else if from["configMapKeyRef"].is_object() {
            ("configmaps", &from["configMapKeyRef"])
        } else if let Some(path) = from.pointer("/fieldRef/fieldPath").and_then(Value::as_str) {
            let v = match path {
                "metadata.name" => run.name.clone(),
                "metadata.namespace" => ns.clone(),
                "metadata.uid" => pod
                    .pointer("/metadata/uid")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .into(),
                "spec.nodeName" => run.config.node_name.clone(),
                "status.podIP" | "status.hostIP" => "127.0.0.1".into(),
                other => return Err(format!("unsupported fieldRef {other:?}")),
            };
            env.push((name, v));
            continue;
        } else {
            env.push((name, String::new()));
            continue;
        };
        let obj_name = sel["name"].as_str().unwrap_or_default();
        let key = sel["key"].as_str().unwrap_or_default();
        match secret_or_config_value(cluster, storage, ns, obj_name, key) {
            Some(v) => env.push((name, v)),
            None if sel["optional"] == true => {}
            None => {
                let what = if storage == "secrets" {
                    "secret"
                } else {
                    "configmap"
                };
                return Err(format!("couldn't find key {key} in {what} {ns}/{obj_name}"));
            }
        }
    }
    Ok(env)
}

/// How a container process ended.
struct Exit {
    code: i32,
    signaled: bool,
}

/// Runs one container once: its exit and termination message, or why it could not start.
async fn run_once(
    run: &PodRun,
    pod: &Value,
    c: &Value,
    init: bool,
    index: usize,
    stop: &mut watch::Receiver<Stop>,
) -> Result<(Exit, String), String> {
    let name = c["name"].as_str().unwrap_or("container");
    run.project_config_maps();
    let image = c["image"].as_str().unwrap_or_default();
    // An image the node has a root filesystem for runs in it, with its volumes mounted
    // where the pod says; any other runs on the host's filesystem, its volume paths
    // rewritten to the pod's directory.
    let image_root = run.config.images.get(image).cloned();
    let in_image = image_root.is_some();
    let env = environment(run, pod, c, !in_image)?;
    let mut argv: Vec<String> = c["command"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(c["args"].as_array().into_iter().flatten())
        .filter_map(Value::as_str)
        .map(|s| {
            if in_image {
                s.to_string()
            } else {
                run.map_path(s)
            }
        })
        .collect();
    if argv.is_empty() {
        return Err(format!(
            "container {name:?} has no command: the simulation runs commands, not image entrypoints"
        ));
    }
    if argv[0] == "testrunner-operator" && !in_image {
        argv[0] = run.config.exe.display().to_string();
    }
    let term_log = run.dir.join(format!("{name}.termination-log"));
    let log_path = run.dir.join(format!("{name}.log"));
    std::fs::write(&term_log, b"")
        .map_err(|e| format!("failed to create the termination log: {e}"))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("failed to open the container log: {e}"))?;
    let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
    let log2 = log.try_clone().map_err(|e| e.to_string())?;
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .env("HOSTNAME", &run.name)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2))
        .process_group(0)
        .kill_on_drop(true);
    if in_image {
        cmd.env("PATH", IMAGE_PATH)
            .env("HOME", "/")
            .envs(env)
            .env("TESTRUNNER_IMAGE", image)
            .current_dir(&run.dir);
    } else {
        cmd.env(
            "PATH",
            std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
        )
        .env("HOME", &run.dir)
        .envs(env)
        .env("TESTRUNNER_IMAGE", image)
        .env("TESTRUNNER_TERMINATION_LOG", &term_log)
        .current_dir(
            c["workingDir"]
                .as_str()
                .map(|w| PathBuf::from(run.map_path(w)))
                .filter(|p| p.is_dir())
                .unwrap_or_else(|| run.dir.clone()),
        );
    }
    let isolated = super::isolate::available();
    if isolated {
        super::isolate::in_pid_namespace(&mut cmd);
    }
    if let Some(root) = image_root {
        if !isolated {
            return Err(format!(
                "image {image:?} has a root filesystem, but running in it needs root (namespaces)"
            ));
        }
        let rootfs = image_rootfs(run, pod, c, root, &term_log)?;
        super::isolate::in_root_fs(&mut cmd, &rootfs)
            .map_err(|e| format!("failed to prepare the root filesystem of {image:?}: {e}"))?;
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("failed to start {:?}: {e}", argv[0]))?;
    let pid = child.id().map(|p| p as i32);
    let started = now();
    run.with_container(init, index, |s| {
        s.state = json!({"running": {"startedAt": started}});
        s.ready = !init;
        s.started = true;
    });
    tracing::info!(pod = %run.name, container = name, pid, "container started");
    let status = tokio::select! {
        status = child.wait() => status,
        grace = stop_requested(stop) => {
            if let Some(pid) = pid {
                signal_group(pid, Signal::SIGTERM);
                let wait = if grace < 0 { Duration::from_secs(2) } else { run.config.scaled(Duration::from_secs(grace as u64)) };
                match tokio::time::timeout(wait, child.wait()).await {
                    Ok(s) => {
                        signal_group(pid, Signal::SIGKILL);
                        s
                    }
                    Err(_) => {
                        signal_group(pid, Signal::SIGKILL);
                        child.wait().await
                    }
                }
            } else {
                child.wait().await
            }
        }
    };
    // Whatever the container left behind in its group goes with it.
    if let Some(pid) = pid {
        signal_group(pid, Signal::SIGKILL);
    }
    let status = status.map_err(|e| format!("failed to wait for the container: {e}"))?;
    use std::os::unix::process::ExitStatusExt;
    let exit = match (status.code(), status.signal()) {
        (Some(code), _) => Exit {
            code,
            signaled: false,
        },
        (None, Some(sig)) => Exit {
            code: 128 + sig,
            signaled: true,
        },
        _ => Exit {
            code: 1,
            signaled: false,
        },
    };
    let mut message = std::fs::read_to_string(&term_log).unwrap_or_default();
    if message.trim().is_empty()
        && exit.code != 0
        && c["terminationMessagePolicy"].as_str() == Some("FallbackToLogsOnError")
    {
        message = log_tail(&log_path, log_start, 80, 2048);
    }
    message.truncate(4096.min(message.len()));
    Ok((exit, message))
}

/// PATH of a container that runs in an image: the usual default of container images.
const IMAGE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What a container running in the image root `root` gets mounted: its volumes at their
/// `mountPath`, its termination log at its `terminationMessagePath`, and the kubelet's
/// `/etc/hosts` (localhost, the pod's name, `hostAliases`) and `/etc/resolv.conf`.
fn image_rootfs(
    run: &PodRun,
    pod: &Value,
    c: &Value,
    root: PathBuf,
    term_log: &Path,
) -> Result<super::isolate::RootFs, String> {
    let mut binds = Vec::new();
    for m in c["volumeMounts"].as_array().into_iter().flatten() {
        let (Some(vol), Some(path)) = (m["name"].as_str(), m["mountPath"].as_str()) else {
            continue;
        };
        if let Some((_, host)) = run.volume_dirs.iter().find(|(name, _)| name == vol) {
            binds.push((host.clone(), path.to_string()));
        }
    }
    let term_path = c["terminationMessagePath"]
        .as_str()
        .unwrap_or("/dev/termination-log");
    binds.push((term_log.to_path_buf(), term_path.to_string()));
    let mut hosts = format!(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.0.1\t{}\n",
        run.name
    );
    for alias in pod
        .pointer("/spec/hostAliases")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let names: Vec<&str> = alias["hostnames"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        if let Some(ip) = alias["ip"].as_str() {
            hosts.push_str(&format!("{ip}\t{}\n", names.join(" ")));
        }
    }
    let hosts_file = run.dir.join("hosts");
    std::fs::write(&hosts_file, hosts).map_err(|e| format!("failed to write /etc/hosts: {e}"))?;
    binds.push((hosts_file, "/etc/hosts".into()));
    binds.push((PathBuf::from("/etc/resolv.conf"), "/etc/resolv.conf".into()));
    Ok(super::isolate::RootFs {
        root,
        binds,
        working_dir: c["workingDir"].as_str().unwrap_or("/").to_string(),
    })
}

/// Waits for a stop request and returns its grace period (-1: shutting down).
async fn stop_requested(stop: &mut watch::Receiver<Stop>) -> i64 {
    match stop.wait_for(Option::is_some).await {
        Ok(g) => g.unwrap_or(0),
        Err(_) => -1,
    }
}

/// Signals the process group the kubelet created for a container (`process_group(0)`).
fn signal_group(pid: i32, sig: Signal) {
    let _ = killpg(Pid::from_raw(pid), sig);
}

/// The last `lines` lines (at most `bytes` bytes) written to the log after `from`.
fn log_tail(path: &Path, from: u64, lines: usize, bytes: usize) -> String {
    let raw = std::fs::read(path).unwrap_or_default();
    let start = (from as usize).min(raw.len());
    let text = String::from_utf8_lossy(&raw[start..]).into_owned();
    let all: Vec<&str> = text.lines().collect();
    let mut tail = all[all.len().saturating_sub(lines)..].join("\n");
    if tail.len() > bytes {
        let mut cut = tail.len() - bytes;
        while !tail.is_char_boundary(cut) {
            cut += 1;
        }
        tail = tail[cut..].to_string();
    }
    tail
}

/// Runs one container with restarts until the pod stops (or, for init containers and
/// restart policies other than Always, until it is done). Returns whether it succeeded.
async fn container_loop(
    run: Arc<PodRun>,
    pod: Value,
    c: Value,
    init: bool,
    index: usize,
    mut stop: watch::Receiver<Stop>,
) -> bool {
    let mut backoff = BACKOFF_START;
    let name = c["name"].as_str().unwrap_or("container").to_string();
    loop {
        if stop.borrow().is_some() {
            return false;
        }
        let began = Instant::now();
        let outcome = run_once(&run, &pod, &c, init, index, &mut stop).await;
        let stopping = stop.borrow().is_some();
        let (exit, message, reason) = match outcome {
            Ok((exit, message)) => {
                let reason = if exit.code == 0 {
                    "Completed"
                } else if exit.signaled && exit.code == 137 && !stopping {
                    "OOMKilled"
                } else {
                    "Error"
                };
                (exit, message, reason)
            }
            Err(e) => {
                tracing::warn!(pod = %run.name, container = %name, error = %e, "container could not start");
                (
                    Exit {
                        code: 128,
                        signaled: false,
                    },
                    e,
                    "StartError",
                )
            }
        };
        if began.elapsed() >= run.config.scaled(BACKOFF_RESET) {
            backoff = BACKOFF_START;
        }
        let finished = now();
        let terminated = json!({
            "exitCode": exit.code,
            "reason": reason,
            "message": message,
            "finishedAt": finished,
            "containerID": format!("simulated://{name}"),
        });
        let succeeded = exit.code == 0;
        let restart = !stopping
            && match run.restart_policy.as_str() {
                "Never" => false,
                "OnFailure" => !succeeded,
                _ => !(init && succeeded),
            };
        tracing::info!(pod = %run.name, container = %name, exit_code = exit.code, reason, restart, "container exited");
        if !restart {
            run.with_container(init, index, |s| {
                s.state = json!({"terminated": terminated});
                s.ready = false;
            });
            return succeeded;
        }
        let delay = run.config.scaled(backoff);
        let shown = backoff;
        backoff = next_backoff(backoff);
        run.with_container(init, index, |s| {
            s.last_state = json!({"terminated": terminated});
            s.state = json!({"waiting": {"reason": "CrashLoopBackOff",
                "message": format!("back-off {}s restarting failed container={name} pod={}", shown.as_secs(), run.name)}});
            s.ready = false;
            s.restart_count += 1;
        });
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.wait_for(Option::is_some) => return false,
        }
    }
}

async fn run_pod(
    cluster: Arc<Cluster>,
    config: Arc<Config>,
    pod: Value,
    mut stop: watch::Receiver<Stop>,
) {
    let (ns, name, uid) = pod_key(&pod);
    let dir = pod_dir(&config.root, &ns, &name, &uid);
    let spec = &pod["spec"];
    let volumes = spec["volumes"].as_array().cloned().unwrap_or_default();
    // Where each volume lives on this machine: emptyDir and configMap volumes in the
    // pod's directory, hostPath volumes at their path.
    let volume_dirs: Vec<(String, PathBuf)> = volumes
        .iter()
        .filter_map(|v| {
            let name = v["name"].as_str()?;
            if v["emptyDir"].is_object() || v["configMap"].is_object() {
                Some((name.to_string(), dir.join("volumes").join(name)))
            } else {
                let path = v.pointer("/hostPath/path")?.as_str()?;
                Some((name.to_string(), PathBuf::from(path)))
            }
        })
        .collect();
    let config_maps: Vec<(String, PathBuf)> = volumes
        .iter()
        .filter_map(|v| {
            let cm = v.pointer("/configMap/name")?.as_str()?;
            let vol = v["name"].as_str()?;
            Some((cm.to_string(), dir.join("volumes").join(vol)))
        })
        .collect();
    let mut mounts = Vec::new();
    for c in spec["initContainers"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(spec["containers"].as_array().into_iter().flatten())
    {
        for m in c["volumeMounts"].as_array().into_iter().flatten() {
            let (Some(vol), Some(path)) = (m["name"].as_str(), m["mountPath"].as_str()) else {
                continue;
            };
            if let Some((_, host)) = volume_dirs.iter().find(|(name, _)| name == vol)
                && !mounts.iter().any(|(p, _): &(String, PathBuf)| p == path)
            {
                mounts.push((path.to_string(), host.clone()));
            }
        }
    }
    for (_, d) in &volume_dirs {
        let _ = std::fs::create_dir_all(d);
    }
    let _ = std::fs::create_dir_all(&dir);
    let init_specs: Vec<Value> = spec["initContainers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let main_specs: Vec<Value> = spec["containers"].as_array().cloned().unwrap_or_default();
    let waiting = if init_specs.is_empty() {
        "ContainerCreating"
    } else {
        "PodInitializing"
    };
    let run = Arc::new(PodRun {
        cluster: cluster.clone(),
        config: config.clone(),
        namespace: ns.clone(),
        name: name.clone(),
        dir: dir.clone(),
        mounts,
        volume_dirs,
        config_maps,
        restart_policy: spec["restartPolicy"]
            .as_str()
            .unwrap_or("Always")
            .to_string(),
        model: Mutex::new(PodModel {
            init: init_specs
                .iter()
                .map(|c| ContainerStatus::new(c, "PodInitializing"))
                .collect(),
            main: main_specs
                .iter()
                .map(|c| ContainerStatus::new(c, waiting))
                .collect(),
            phase: "Pending",
            initialized: init_specs.is_empty(),
            start_time: now(),
        }),
    });
    run.publish();
    // The kubelet refreshes ConfigMap volumes of running pods now and then; here
    // twice a second (not time-scaled), for as long as the pod runs.
    if !run.config_maps.is_empty() {
        let weak = Arc::downgrade(&run);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    Some(run) => run.project_config_maps(),
                    None => return,
                }
            }
        });
    }

    let mut ok = true;
    for (i, c) in init_specs.iter().enumerate() {
        if !container_loop(run.clone(), pod.clone(), c.clone(), true, i, stop.clone()).await {
            ok = false;
            break;
        }
    }
    if ok && stop.borrow().is_none() {
        {
            let mut m = run.model.lock().unwrap_or_else(|p| p.into_inner());
            m.initialized = true;
            m.phase = "Running";
        }
        run.publish();
        let loops = main_specs.iter().enumerate().map(|(i, c)| {
            container_loop(run.clone(), pod.clone(), c.clone(), false, i, stop.clone())
        });
        let results = futures::future::join_all(loops).await;
        if stop.borrow().is_none() {
            let mut m = run.model.lock().unwrap_or_else(|p| p.into_inner());
            m.phase = if results.iter().all(|r| *r) {
                "Succeeded"
            } else {
                "Failed"
            };
        }
        run.publish();
    } else if !ok && stop.borrow().is_none() {
        run.model.lock().unwrap_or_else(|p| p.into_inner()).phase = "Failed";
        run.publish();
    }
    // Stay until deleted, then remove the object.
    let _ = stop.wait_for(Option::is_some).await;
    let shutting_down = *stop.borrow() == Some(-1);
    if !shutting_down {
        cluster.remove_now("pods", &ns, &name);
    }
    let _ = std::fs::remove_dir_all(&dir);
    tracing::info!(pod = %name, namespace = %ns, "pod stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_five_minutes() {
        let mut b = BACKOFF_START;
        let mut seen = vec![b.as_secs()];
        for _ in 0..7 {
            b = next_backoff(b);
            seen.push(b.as_secs());
        }
        assert_eq!(seen, vec![10, 20, 40, 80, 160, 300, 300, 300]);
    }
}
