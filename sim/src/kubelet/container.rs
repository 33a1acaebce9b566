//! One container on the simulated node: its process (PID 1 of a PID namespace of its
//! own, in the image's root filesystem when the node has one), its restarts with
//! CrashLoopBackOff as its restart policy says, and its stop (SIGTERM, then SIGKILL at the
//! deadline its pod sets).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;

use super::pod::{ConfigError, PodRun};
use crate::api::now;

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

/// When a container is to stop: `None` while it may run; `Some(deadline)`: SIGTERM now,
/// SIGKILL at the deadline (which may come nearer, never further).
pub(super) type Halt = Option<Instant>;

/// What a container is to its pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Role {
    /// An init container: runs to completion before the next one starts.
    Init,
    /// A sidecar (an init container with `restartPolicy: Always`): starts in its place
    /// among the init containers and runs, restarted whenever it exits, as long as the
    /// pod does.
    Sidecar,
    /// One of the pod's `containers`.
    Main,
}

impl Role {
    /// The role of init container `c`.
    pub fn of_init(c: &Value) -> Self {
        if c["restartPolicy"] == "Always" {
            Role::Sidecar
        } else {
            Role::Init
        }
    }

    /// Whether its status is among the pod's `initContainerStatuses`.
    pub fn is_init(self) -> bool {
        self != Role::Main
    }

    /// Whether its probes run (init containers that are not sidecars have none).
    fn probed(self) -> bool {
        self != Role::Init
    }
}

/// One container's status, as the kubelet tracks it.
#[derive(Clone, Debug)]
pub(super) struct ContainerStatus {
    name: String,
    image: String,
    /// Whether it is a sidecar (its readiness counts towards the pod's).
    pub sidecar: bool,
    pub restart_count: i64,
    pub state: Value,
    pub last_state: Value,
    pub ready: bool,
    pub started: bool,
}

impl ContainerStatus {
    pub fn new(c: &Value, role: Role, waiting: &str) -> Self {
        Self {
            name: c["name"].as_str().unwrap_or_default().into(),
            image: c["image"].as_str().unwrap_or_default().into(),
            sidecar: role == Role::Sidecar,
            restart_count: 0,
            state: json!({"waiting": {"reason": waiting}}),
            last_state: json!({}),
            ready: false,
            started: false,
        }
    }

    pub fn to_json(&self) -> Value {
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

/// How a container process ended.
struct Exit {
    code: i32,
    signaled: bool,
}

/// The argv a container runs: `command` and `args`; for an image of the operator
/// ([`super::Config::operator_images`]) without a command, the operator binary with the
/// arguments (its image's entrypoint); a command named `testrunner-operator` runs
/// [`super::Config::exe`] outside a root filesystem.
fn argv(run: &PodRun, c: &Value) -> Result<Vec<String>, String> {
    let name = c["name"].as_str().unwrap_or("container");
    let image = c["image"].as_str().unwrap_or_default();
    let in_image = run.config.images.contains_key(image);
    let operator = run.config.is_operator_image(image);
    let strings = |field: &str| -> Vec<String> {
        c[field]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(String::from)
            .collect()
    };
    let mut argv = strings("command");
    if argv.is_empty() && operator && !in_image {
        argv.push(OPERATOR_BINARY.into());
    }
    argv.extend(strings("args"));
    if argv.is_empty() {
        return Err(format!(
            "container {name:?} has no command: the simulation runs commands, not image entrypoints"
        ));
    }
    if !in_image && (argv[0] == "testrunner-operator" || (operator && argv[0] == OPERATOR_BINARY)) {
        argv[0] = run.config.exe.display().to_string();
    }
    if !crate::isolate::available() && !in_image {
        argv = argv.iter().map(|s| run.map_path(s)).collect();
    }
    Ok(argv)
}

/// Where the operator image has its binary (the Dockerfile's entrypoint).
const OPERATOR_BINARY: &str = "/usr/local/bin/testrunner-operator";

/// The process of `argv` as the container runs it: its environment (`env`, plus what
/// the node adds), its filesystem (a mount namespace of its own with its volumes at
/// their `mountPath`, in the image's root filesystem when the node has one), its pod's
/// network namespace when the pod has one, and its user and groups. With
/// `pid_namespace`, it is PID 1 of a PID namespace of its own. Output goes nowhere;
/// the caller redirects it.
pub(super) fn command(
    run: &PodRun,
    c: &Value,
    argv: &[String],
    env: Vec<(String, String)>,
    term_log: &Path,
    pid_namespace: bool,
) -> Result<tokio::process::Command, String> {
    let image = c["image"].as_str().unwrap_or_default();
    let image_root = run.config.images.get(image).cloned();
    let isolated = crate::isolate::available();
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .env("HOSTNAME", &run.name)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .kill_on_drop(true);
    if image_root.is_some() {
        cmd.env("PATH", IMAGE_PATH).env("HOME", "/");
    } else {
        cmd.env(
            "PATH",
            std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
        )
        .env("HOME", &run.dir)
        .env("TESTRUNNER_TERMINATION_LOG", term_log);
    }
    // The API server's Service, as a kubelet gives every container; `env` may override.
    if let Some(api) = run.config.api_server {
        let (host, port) = (api.ip().to_string(), api.port().to_string());
        cmd.env("KUBERNETES_SERVICE_HOST", &host)
            .env("KUBERNETES_SERVICE_PORT", &port)
            .env("KUBERNETES_SERVICE_PORT_HTTPS", &port)
            .env("KUBERNETES_PORT", format!("tcp://{host}:{port}"))
            .env(
                format!("KUBERNETES_PORT_{port}_TCP"),
                format!("tcp://{host}:{port}"),
            )
            .env(format!("KUBERNETES_PORT_{port}_TCP_PROTO"), "tcp")
            .env(format!("KUBERNETES_PORT_{port}_TCP_PORT"), &port)
            .env(format!("KUBERNETES_PORT_{port}_TCP_ADDR"), &host);
    }
    cmd.envs(env)
        .env("TESTRUNNER_IMAGE", image)
        .current_dir(&run.dir);
    if !isolated {
        if image_root.is_some() {
            return Err(format!(
                "image {image:?} has a root filesystem, but running in it needs root (namespaces)"
            ));
        }
        if let Some(dir) = c["workingDir"]
            .as_str()
            .map(|w| PathBuf::from(run.map_path(w)))
            .filter(|p| p.is_dir())
        {
            cmd.current_dir(dir);
        }
        return Ok(cmd);
    }
    if let Some(netns) = &run.netns {
        netns
            .enter(&mut cmd)
            .map_err(|e| format!("failed to join the pod's network namespace: {e}"))?;
    }
    if pid_namespace {
        crate::isolate::in_pid_namespace(&mut cmd);
    }
    let rootfs = rootfs(run, c, image_root, term_log)?;
    crate::isolate::in_root_fs(&mut cmd, &rootfs)
        .map_err(|e| format!("failed to prepare the container's mounts: {e}"))?;
    crate::isolate::as_identity(&mut cmd, &identity(run, c));
    Ok(cmd)
}

/// The user and groups of container `c`: `runAsUser`, `runAsGroup` (the container's
/// security context over the pod's), the pod's `supplementalGroups` and `fsGroup`, and
/// `allowPrivilegeEscalation: false`.
fn identity(run: &PodRun, c: &Value) -> crate::isolate::Identity {
    let pod = &run.pod["spec"]["securityContext"];
    let own = &c["securityContext"];
    let id = |field: &str| {
        own[field]
            .as_u64()
            .or_else(|| pod[field].as_u64())
            .map(|v| v as u32)
    };
    let mut groups: Vec<u32> = pod["supplementalGroups"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_u64)
        .map(|g| g as u32)
        .collect();
    if let Some(fs_group) = pod["fsGroup"].as_u64() {
        groups.push(fs_group as u32);
    }
    crate::isolate::Identity {
        uid: id("runAsUser"),
        gid: id("runAsGroup"),
        groups,
        no_new_privs: own["allowPrivilegeEscalation"] == false,
    }
}

/// Runs one container once: its exit and termination message, or why it could not start.
/// `env` is the container's environment, already resolved. `started` is told once the
/// container has started (it runs, and its startup probe passed).
async fn run_once(
    run: &Arc<PodRun>,
    c: &Value,
    env: Vec<(String, String)>,
    role: Role,
    index: usize,
    halt: &mut watch::Receiver<Halt>,
    started: Option<&Arc<watch::Sender<bool>>>,
) -> Result<(Exit, String), String> {
    let name = c["name"].as_str().unwrap_or("container");
    let argv = argv(run, c)?;
    let term_log = run.dir.join(format!("{name}.termination-log"));
    let log_path = run.dir.join(format!("{name}.log"));
    std::fs::write(&term_log, b"")
        .map_err(|e| format!("failed to create the termination log: {e}"))?;
    // The container's user may write its termination log.
    let _ = std::fs::set_permissions(
        &term_log,
        std::os::unix::fs::PermissionsExt::from_mode(0o666),
    );
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("failed to open the container log: {e}"))?;
    let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
    let log2 = log.try_clone().map_err(|e| e.to_string())?;
    let mut cmd = command(run, c, &argv, env.clone(), &term_log, true)?;
    cmd.stdout(Stdio::from(log)).stderr(Stdio::from(log2));
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("failed to start {:?}: {e}", argv[0]))?;
    let pid = child.id().map(|p| p as i32);
    let started_at = now();
    let probed = role.probed();
    let has = |probe: &str| probed && c.get(probe).is_some_and(Value::is_object);
    let (has_startup, has_readiness) = (has("startupProbe"), has("readinessProbe"));
    run.with_container(role.is_init(), index, |s| {
        s.state = json!({"running": {"startedAt": started_at}});
        s.started = !has_startup;
        s.ready = probed && !has_startup && !has_readiness;
    });
    if !has_startup && let Some(tx) = started {
        tx.send_replace(true);
    }
    tracing::info!(pod = %run.name, container = name, pid, "container started");
    let mut probes = probed.then(|| {
        tokio::spawn(super::probe::run_probes(
            run.clone(),
            c.clone(),
            role.is_init(),
            index,
            env,
            started.cloned(),
        ))
    });
    let status = tokio::select! {
        status = child.wait() => status,
        deadline = async {
            tokio::select! {
                d = halt_requested(halt) => d,
                Some(Ok(grace)) = async {
                    match probes.as_mut() {
                        Some(p) => Some(p.await),
                        None => None,
                    }
                } => {
                    tracing::info!(pod = %run.name, container = name, "a liveness or startup probe failed: the container will be restarted");
                    Instant::now() + run.config.scaled(Duration::from_secs(grace))
                }
            }
        } => {
            match pid {
                Some(pid) => {
                    signal_group(pid, Signal::SIGTERM);
                    wait_or_kill(&mut child, pid, deadline, halt).await
                }
                None => child.wait().await,
            }
        }
    };
    if let Some(p) = probes {
        p.abort();
    }
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

/// What a container gets mounted in its own mount namespace: its volumes at their
/// `mountPath` (with `subPath`, read-only as the mount says) and the kubelet's `/etc/hosts`
/// (localhost, the pod's name, `hostAliases`); in an image root `root`, also its
/// termination log at its `terminationMessagePath` and `/etc/resolv.conf`.
fn rootfs(
    run: &PodRun,
    c: &Value,
    root: Option<PathBuf>,
    term_log: &Path,
) -> Result<crate::isolate::RootFs, String> {
    let mut binds = Vec::new();
    for m in c["volumeMounts"].as_array().into_iter().flatten() {
        let (Some(vol), Some(path)) = (m["name"].as_str(), m["mountPath"].as_str()) else {
            continue;
        };
        if let Some((_, host)) = run.volume_dirs.iter().find(|(name, _)| name == vol) {
            let host = match m["subPath"].as_str().filter(|p| !p.is_empty()) {
                Some(sub) => {
                    let sub = host.join(sub);
                    if !sub.exists() {
                        let _ = std::fs::create_dir_all(&sub);
                    }
                    sub
                }
                None => host.clone(),
            };
            binds.push((host, path.to_string(), m["readOnly"] == true));
        }
    }
    let working_dir = c["workingDir"].as_str().map(String::from);
    // The kubelet's /etc/hosts, in every container: localhost, the pod's name and its
    // hostAliases.
    let mut hosts = format!(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.0.1\t{}\n",
        run.name
    );
    for alias in run
        .pod
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
    binds.push((hosts_file, "/etc/hosts".into(), false));
    if root.is_none() {
        return Ok(crate::isolate::RootFs {
            root,
            binds,
            working_dir,
        });
    }
    let term_path = c["terminationMessagePath"]
        .as_str()
        .unwrap_or("/dev/termination-log");
    binds.push((term_log.to_path_buf(), term_path.to_string(), false));
    binds.push((
        PathBuf::from("/etc/resolv.conf"),
        "/etc/resolv.conf".into(),
        false,
    ));
    Ok(crate::isolate::RootFs {
        root,
        binds,
        working_dir: Some(working_dir.unwrap_or_else(|| "/".into())),
    })
}

/// Waits until the container is to stop and returns when it is to be killed.
async fn halt_requested(halt: &mut watch::Receiver<Halt>) -> Instant {
    match halt.wait_for(Option::is_some).await {
        Ok(d) => d.unwrap_or_else(Instant::now),
        Err(_) => Instant::now(),
    }
}

/// Waits for `child` (sent SIGTERM) until `deadline`, or a nearer one that `halt` brings;
/// then SIGKILLs its group.
async fn wait_or_kill(
    child: &mut tokio::process::Child,
    pid: i32,
    mut deadline: Instant,
    halt: &mut watch::Receiver<Halt>,
) -> std::io::Result<std::process::ExitStatus> {
    loop {
        tokio::select! {
            status = child.wait() => return status,
            _ = tokio::time::sleep_until(deadline) => {
                signal_group(pid, Signal::SIGKILL);
                return child.wait().await;
            }
            Ok(()) = halt.changed() => {
                if let Some(d) = *halt.borrow_and_update() {
                    deadline = deadline.min(d);
                }
            }
        }
    }
}

/// Whether a container that exited with `code` starts again: as its own `restartPolicy`
/// says when it has one (Kubernetes 1.35 and later), else as the pod's.
fn should_restart(c: &Value, pod_policy: &str, code: i32) -> bool {
    let own = c["restartPolicy"]
        .as_str()
        .filter(|p| matches!(*p, "Always" | "Never" | "OnFailure"));
    match own.unwrap_or(pod_policy) {
        "Never" => false,
        "OnFailure" => code != 0,
        _ => true,
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

/// The container's volumes and environment, ready to start it. While a Secret or
/// ConfigMap a volume needs is missing the container waits with reason
/// `ContainerCreating`; while one its environment needs is missing (or cannot be
/// read), with `CreateContainerConfigError`, as on a real node; the node tries again
/// every (scaled) ten seconds. `None` when the pod stops meanwhile.
async fn inputs(
    run: &PodRun,
    c: &Value,
    init: bool,
    index: usize,
    halt: &mut watch::Receiver<Halt>,
) -> Option<Vec<(String, String)>> {
    // Without namespaces (not root), volume paths in env values are rewritten to the
    // pod's directories; otherwise the container's mounts put the volumes there.
    let map_paths = !crate::isolate::available();
    loop {
        let ready = match run.project_volumes().await {
            Err(ConfigError(message)) => Err(("ContainerCreating", message)),
            Ok(()) => run
                .environment(c, map_paths)
                .await
                .map_err(|ConfigError(m)| ("CreateContainerConfigError", m)),
        };
        match ready {
            Ok(env) => return Some(env),
            Err((reason, message)) => {
                tracing::warn!(pod = %run.name, error = %message, "container cannot start yet");
                run.with_container(init, index, |s| {
                    s.state = json!({"waiting": {"reason": reason, "message": message}});
                    s.ready = false;
                });
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(run.config.scaled(BACKOFF_START)) => {}
            _ = halt.wait_for(Option::is_some) => return None,
        }
    }
}

/// Runs one container with restarts until it is halted, or until it is done: an init
/// container once it succeeded (or failed for good), a container once its restart policy
/// (or the pod's) does not restart it; a sidecar runs until halted, restarted whenever it
/// exits. Returns whether it succeeded. `started` is told when the container has started
/// (see [`run_once`]).
pub(super) async fn container_loop(
    run: Arc<PodRun>,
    c: Value,
    role: Role,
    index: usize,
    mut halt: watch::Receiver<Halt>,
    started: Option<Arc<watch::Sender<bool>>>,
) -> bool {
    let mut backoff = BACKOFF_START;
    let name = c["name"].as_str().unwrap_or("container").to_string();
    let init = role.is_init();
    loop {
        if halt.borrow().is_some() {
            return false;
        }
        let Some(env) = inputs(&run, &c, init, index, &mut halt).await else {
            return false;
        };
        let began = Instant::now();
        let outcome = run_once(&run, &c, env, role, index, &mut halt, started.as_ref()).await;
        let stopping = halt.borrow().is_some();
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
            && match role {
                Role::Sidecar => true,
                Role::Init => !succeeded && should_restart(&c, &run.restart_policy, exit.code),
                Role::Main => should_restart(&c, &run.restart_policy, exit.code),
            };
        tracing::info!(pod = %run.name, container = %name, exit_code = exit.code, reason, restart, "container exited");
        if !restart {
            run.with_container(init, index, |s| {
                s.state = json!({"terminated": terminated});
                // A finished init container is ready, as a kubelet reports it.
                s.ready = role == Role::Init && succeeded;
                s.started = false;
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
            s.started = false;
            s.restart_count += 1;
        });
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = halt.wait_for(Option::is_some) => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_container_restart_policy_overrides_the_pod_s() {
        let plain = json!({"name": "c"});
        let never = json!({"name": "c", "restartPolicy": "Never"});
        let on_failure = json!({"name": "c", "restartPolicy": "OnFailure"});
        assert!(should_restart(&plain, "Always", 0));
        assert!(!should_restart(&plain, "OnFailure", 0));
        assert!(should_restart(&plain, "OnFailure", 1));
        assert!(!should_restart(&never, "Always", 1));
        assert!(should_restart(&on_failure, "Never", 1));
        assert!(!should_restart(&on_failure, "Never", 0));
    }

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
