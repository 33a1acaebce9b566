//! A real Kubernetes control plane: `etcd` and `kube-apiserver`, plus
//! `kube-controller-manager` and `kube-scheduler` when their binaries are there, started
//! from prebuilt binaries (`bash tests/control-plane/build.sh` puts them in
//! `target/control-plane/bin/`) on loopback, with throwaway certificates and data in a
//! directory of their own. docs/control-plane.md says which flags and why.
//!
//! Several control planes run at once (tests run in parallel): every port is picked free
//! at start, and a start whose component lost its port to another process is retried
//! with new ports. A component counts as up only when its own process listens on its
//! port (read from `/proc`) and it answers its health check, so a probe never mistakes
//! another control plane's component for this one's.
//!
//! Every certificate is ECDSA P-256, signed by a CA made at start; the service-account
//! tokens are signed with an ECDSA key too (ES256). Both `kube-apiserver` and kube's
//! rustls client accept them.
//!
//! What the Node authorizer (with `NodeRestriction` admission) lets a node identity
//! (user `system:node:NAME`, group `system:nodes`) do, as checked by
//! `tests/control_plane.rs` against Kubernetes v1.37.2: create its own Node object,
//! create and update the Lease named after it in `kube-node-lease`, and list and watch
//! pods with the field selector `spec.nodeName=NAME`. Listing or watching pods without
//! that field selector is forbidden (403), and so is getting a pod bound to another
//! node: a kubelet-like node must always select its own pods.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use nix::libc;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// The etcd binary.
const ETCD: &str = "etcd";
/// The API server binary.
const APISERVER: &str = "kube-apiserver";
/// The controller manager binary (optional).
const CONTROLLER_MANAGER: &str = "kube-controller-manager";
/// The scheduler binary (optional).
const SCHEDULER: &str = "kube-scheduler";

/// The optional components, each with what a control plane without it lacks.
const OPTIONAL: [(&str, &str); 2] = [
    (
        CONTROLLER_MANAGER,
        "no controller manager: no garbage collection, namespace deletion, Deployments/ReplicaSets or service-account tokens",
    ),
    (
        SCHEDULER,
        "no scheduler: the node binds pending pods itself",
    ),
];

/// How many times [`ControlPlane::start`] tries when a component lost its port.
const ATTEMPTS: usize = 3;
/// Interval between two readiness checks.
const POLL: Duration = Duration::from_millis(100);
/// Longest wait for one health request.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for etcd to answer.
const ETCD_READY: Duration = Duration::from_secs(30);
/// Longest wait for the API server's `/readyz` (4 to 5 s on an idle machine; several
/// control planes starting on two busy cores take much longer).
const APISERVER_READY: Duration = Duration::from_secs(120);
/// Longest wait for the controller manager or the scheduler.
const COMPONENT_READY: Duration = Duration::from_secs(120);
/// Grace period after SIGTERM before SIGKILL, controller manager and scheduler.
const STOP_COMPONENT: Duration = Duration::from_secs(15);
/// Grace period after SIGTERM before SIGKILL, API server (exits in about 3 s).
const STOP_APISERVER: Duration = Duration::from_secs(20);
/// Grace period after SIGTERM before SIGKILL, etcd (exits in about 2 s).
const STOP_ETCD: Duration = Duration::from_secs(15);
/// Lines of a component's log an error shows.
const LOG_TAIL: usize = 20;
/// How long the certificates are valid, from start.
const CERT_VALIDITY: Duration = Duration::from_secs(4 * 24 * 3600);
/// How far in the past the certificates become valid (clock skew, and a start just
/// after midnight of a test that checks dates).
const CERT_BACKDATE: Duration = Duration::from_secs(3600);
/// The ClusterIP range; its first address is the `default/kubernetes` Service's.
const SERVICE_CIDR: &str = "10.0.0.0/24";
/// Names the API server's certificate holds.
const APISERVER_SANS: [&str; 7] = [
    "127.0.0.1",
    "10.0.0.1",
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
];

/// A running control plane. [`ControlPlane::stop`] stops it; dropping it kills what is
/// left (best effort).
pub struct ControlPlane {
    /// `https://127.0.0.1:PORT` of the API server.
    url: String,
    /// Certificates, keys, kubeconfigs, etcd's data and the logs.
    work_dir: PathBuf,
    /// The `admin` kubeconfig (group `system:masters`).
    admin_kubeconfig: PathBuf,
    /// The CA every certificate comes from.
    pki: Pki,
    /// The running components, in start order: etcd, API server, then the optional ones.
    processes: Vec<Process>,
    /// Optional components whose binary was not found.
    missing: Vec<&'static str>,
    /// True once `work_dir` is gone.
    removed: bool,
}

/// One running component.
struct Process {
    /// Its binary's name.
    name: &'static str,
    /// The child process.
    child: tokio::process::Child,
    /// Its process id (kept: the child forgets it once reaped).
    pid: u32,
    /// The loopback port it serves on.
    port: u16,
    /// Where its standard output and error go.
    log: PathBuf,
}

/// Why one try of a start failed.
struct StartError {
    /// What happened, with the component's last log lines.
    message: String,
    /// True when a component could not listen because its port was taken meanwhile: a
    /// new try with other ports may succeed.
    port_taken: bool,
}

impl From<String> for StartError {
    fn from(message: String) -> Self {
        Self {
            message,
            port_taken: false,
        }
    }
}

/// A health check: GET `path` through `client`, which must answer 2xx with a body that
/// `ok` accepts.
struct Probe {
    /// A client for the component's URL.
    client: kube::Client,
    /// The path to GET.
    path: String,
    /// What an answer must look like.
    ok: fn(&str) -> bool,
}

impl Probe {
    /// One check: `Ok` when healthy, else what was wrong.
    async fn check(&self) -> Result<(), String> {
        let request = http::Request::get(&self.path)
            .body(Vec::new())
            .map_err(|e| format!("bad request {}: {e}", self.path))?;
        let text = tokio::time::timeout(PROBE_TIMEOUT, self.client.request_text(request))
            .await
            .map_err(|_| format!("GET {} took longer than {PROBE_TIMEOUT:?}", self.path))?
            .map_err(|e| format!("GET {}: {e}", self.path))?;
        if (self.ok)(&text) {
            Ok(())
        } else {
            Err(format!("GET {} answered {:?}", self.path, text.trim()))
        }
    }
}

impl ControlPlane {
    /// Starts etcd and kube-apiserver from `bin_dir`, plus kube-controller-manager and
    /// kube-scheduler when they are there, with throwaway certificates and data under
    /// `work_dir` (created, and removed by [`ControlPlane::stop`]; it must not exist yet
    /// or be empty).
    ///
    /// Returns when the API server's `/readyz` says `ok`, the controller manager and the
    /// scheduler answer `/healthz`, and (with a controller manager) ServiceAccount
    /// `default/default` exists, so that pods can be created in namespace `default`.
    /// An error names the component that failed and shows the end of its log.
    ///
    /// Call it from a thread that outlives the control plane (a runtime's worker, or a
    /// test's own thread), never from `spawn_blocking`: the kernel kills the components
    /// when the thread that started them exits (see [`Self::processes`]).
    pub async fn start(bin_dir: &Path, work_dir: &Path) -> Result<ControlPlane, String> {
        // The components run in their own work directory: a relative `bin_dir` must
        // still name the binaries.
        let bin_dir = &std::path::absolute(bin_dir)
            .map_err(|e| format!("failed to resolve {}: {e}", bin_dir.display()))?;
        let required: Vec<&str> = [ETCD, APISERVER]
            .into_iter()
            .filter(|name| !bin_dir.join(name).is_file())
            .collect();
        if !required.is_empty() {
            return Err(format!(
                "{} missing in {}: build the control plane with `bash tests/control-plane/build.sh`",
                required.join(" and "),
                bin_dir.display()
            ));
        }
        let missing: Vec<&'static str> = OPTIONAL
            .iter()
            .map(|(name, _)| *name)
            .filter(|name| !bin_dir.join(name).is_file())
            .collect();
        create_work_dir(work_dir)?;
        let work_dir = std::fs::canonicalize(work_dir)
            .map_err(|e| format!("failed to resolve {}: {e}", work_dir.display()))?;
        let mut plane = ControlPlane {
            url: String::new(),
            admin_kubeconfig: work_dir.join("admin.kubeconfig"),
            pki: Pki::new(),
            work_dir,
            processes: Vec::new(),
            missing,
            removed: false,
        };
        // From here on, an error drops `plane`: its processes die, its directory goes.
        plane.pki = Pki::create(&plane.work_dir.join("pki"))?;
        let started = tokio::time::Instant::now();
        for attempt in 1..=ATTEMPTS {
            match plane.launch(bin_dir).await {
                Ok(()) => {
                    tracing::info!(
                        url = %plane.url,
                        missing = ?plane.missing,
                        seconds = started.elapsed().as_secs_f64(),
                        "control plane ready"
                    );
                    return Ok(plane);
                }
                Err(e) if e.port_taken && attempt < ATTEMPTS => {
                    tracing::warn!(attempt, error = %e.message, "a control-plane port was taken meanwhile; starting again on other ports");
                    plane.kill_all().await;
                }
                Err(e) => {
                    // Waited for, so that none writes to the directory while it goes.
                    plane.kill_all().await;
                    return Err(e.message);
                }
            }
        }
        unreachable!("the last attempt returns")
    }

    /// `https://127.0.0.1:PORT`, the API server.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The directory of this control plane's files (see [`ControlPlane::start`]).
    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }

    /// A kubeconfig for user `admin` in group `system:masters` (client certificate),
    /// namespace `default`.
    pub fn admin_kubeconfig(&self) -> &Path {
        &self.admin_kubeconfig
    }

    /// The CA certificate (PEM) that signed the API server's certificate and every client
    /// certificate.
    pub fn ca_pem(&self) -> &str {
        &self.pki.ca_pem
    }

    /// Writes a kubeconfig to `path` with a new client certificate for `user` in `groups`
    /// (at most two), e.g. `"system:node:simulated-node"`, `["system:nodes"]`.
    pub fn write_kubeconfig(&self, path: &Path, user: &str, groups: &[&str]) -> Result<(), String> {
        let text = self.kubeconfig(user, groups)?;
        write_private(path, text.as_bytes())
    }

    /// A client that authenticates with a new client certificate for `user` in `groups`
    /// (at most two).
    pub async fn client_as(&self, user: &str, groups: &[&str]) -> Result<kube::Client, String> {
        let text = self.kubeconfig(user, groups)?;
        let kubeconfig = kube::config::Kubeconfig::from_yaml(&text)
            .map_err(|e| format!("failed to parse the kubeconfig of {user}: {e}"))?;
        client_from(kubeconfig, user).await
    }

    /// A client as `admin` (group `system:masters`: every request is allowed).
    pub async fn admin_client(&self) -> Result<kube::Client, String> {
        let config = self.admin_config().await?;
        kube::Client::try_from(config)
            .map_err(|e| format!("failed to build a client as admin: {e}"))
    }

    /// The admin's configuration, from its kubeconfig.
    async fn admin_config(&self) -> Result<kube::Config, String> {
        let path = &self.admin_kubeconfig;
        let kubeconfig = kube::config::Kubeconfig::read_from(path)
            .map_err(|e| format!("failed to read {}: {e}", path.display()))?;
        config_from(kubeconfig, "admin").await
    }

    /// The admin's client for readiness probes: see [`quiet_client`].
    async fn admin_probe_client(&self) -> Result<kube::Client, String> {
        quiet_client(self.admin_config().await?, "the API server")
    }

    /// The optional components that were not found in the binaries' directory, e.g.
    /// `["kube-controller-manager", "kube-scheduler"]`.
    pub fn missing(&self) -> &[&'static str] {
        &self.missing
    }

    /// What this control plane lacks for each missing component, one sentence each, in
    /// the order of [`ControlPlane::missing`], e.g. "no scheduler: the node binds pending
    /// pods itself".
    pub fn missing_effects(&self) -> Vec<&'static str> {
        OPTIONAL
            .iter()
            .filter(|(name, _)| self.missing.contains(name))
            .map(|(_, effect)| *effect)
            .collect()
    }

    /// The running components: binary name and process id, in start order.
    ///
    /// Each is started with `PR_SET_PDEATHSIG` = SIGKILL, so that none outlives a killed
    /// test or operator. The kernel sends that signal when the *thread* that spawned the
    /// child exits, not the process: hence [`ControlPlane::start`]'s advice.
    pub fn processes(&self) -> Vec<(&'static str, u32)> {
        self.processes.iter().map(|p| (p.name, p.pid)).collect()
    }

    /// Stops the components with SIGTERM in the documented order, each waited for with a
    /// deadline, then SIGKILL: scheduler and controller manager, then the API server (it
    /// keeps retrying a stopped etcd for more than 30 s), then etcd. Then removes the
    /// work directory.
    pub async fn stop(mut self) {
        let mut processes = std::mem::take(&mut self.processes);
        let optional = processes.split_off(processes.len().min(2));
        futures::future::join_all(optional.into_iter().map(|p| terminate(p, STOP_COMPONENT))).await;
        let mut core = processes.into_iter();
        let etcd = core.next();
        if let Some(apiserver) = core.next() {
            terminate(apiserver, STOP_APISERVER).await;
        }
        if let Some(etcd) = etcd {
            terminate(etcd, STOP_ETCD).await;
        }
        self.remove_work_dir();
    }

    /// One try at starting every component on newly picked ports.
    async fn launch(&mut self, bin_dir: &Path) -> Result<(), StartError> {
        let [etcd_port, peer_port, api_port, kcm_port, scheduler_port] = free_ports()?;
        let dir = self.work_dir.clone();
        let pki = dir.join("pki");
        let p = |name: &str| pki.join(name).display().to_string();
        let etcd_data = dir.join("etcd");
        if etcd_data.exists() {
            std::fs::remove_dir_all(&etcd_data)
                .map_err(|e| format!("failed to remove {}: {e}", etcd_data.display()))?;
        }
        self.url = format!("https://127.0.0.1:{api_port}");
        let admin = self.kubeconfig("admin", &["system:masters"])?;
        write_private(&self.admin_kubeconfig, admin.as_bytes())?;

        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        self.spawn(
            ETCD,
            bin_dir,
            etcd_port,
            vec![
                "--name=cp".into(),
                format!("--data-dir={}", etcd_data.display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=cp={peer_url}"),
                "--initial-cluster-state=new".into(),
                // The data is thrown away: no need to wait for the disk.
                "--unsafe-no-fsync".into(),
                "--log-level=warn".into(),
            ],
        )?;
        let etcd_probe = Probe {
            client: probe_client(&etcd_url, None)?,
            path: "/health".into(),
            ok: |body| body.contains(r#""health":"true""#),
        };
        self.wait_ready(ETCD, "healthy", &etcd_probe, ETCD_READY)
            .await?;

        self.spawn(
            APISERVER,
            bin_dir,
            api_port,
            vec![
                format!("--etcd-servers={etcd_url}"),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                format!("--secure-port={api_port}"),
                // The default reconciler refuses a loopback advertise address.
                "--endpoint-reconciler-type=none".into(),
                format!("--tls-cert-file={}", p("apiserver.crt")),
                format!("--tls-private-key-file={}", p("apiserver.key")),
                format!("--client-ca-file={}", p("ca.crt")),
                // Fill the extension-apiserver-authentication ConfigMap that the
                // controller manager and the scheduler read.
                format!("--requestheader-client-ca-file={}", p("front-proxy-ca.crt")),
                "--requestheader-allowed-names=front-proxy-client".into(),
                "--requestheader-username-headers=X-Remote-User".into(),
                "--requestheader-group-headers=X-Remote-Group".into(),
                "--requestheader-extra-headers-prefix=X-Remote-Extra-".into(),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                format!("--service-account-key-file={}", p("sa.pub")),
                format!("--service-account-signing-key-file={}", p("sa.key")),
                format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                "--authorization-mode=Node,RBAC".into(),
                // Nodes are reached at their InternalIP (the simulated node's 127.0.0.1),
                // not at their host name.
                "--kubelet-preferred-address-types=InternalIP".into(),
                // In addition to the default plugins (PodSecurity among them).
                "--enable-admission-plugins=NodeRestriction".into(),
            ],
        )?;
        let admin = self.admin_client().await?;
        let ready = Probe {
            client: self.admin_probe_client().await?,
            path: "/readyz".into(),
            ok: |body| body.trim() == "ok",
        };
        self.wait_ready(APISERVER, "ready (/readyz)", &ready, APISERVER_READY)
            .await?;

        let mut optional = Vec::new();
        for (name, port, user) in [
            (
                CONTROLLER_MANAGER,
                kcm_port,
                "system:kube-controller-manager",
            ),
            (SCHEDULER, scheduler_port, "system:kube-scheduler"),
        ] {
            if self.missing.contains(&name) {
                continue;
            }
            let kubeconfig = dir.join(format!("{name}.kubeconfig"));
            self.write_kubeconfig(&kubeconfig, user, &[])?;
            let kc = kubeconfig.display();
            let mut args = vec![
                format!("--kubeconfig={kc}"),
                format!("--authentication-kubeconfig={kc}"),
                format!("--authorization-kubeconfig={kc}"),
                "--bind-address=127.0.0.1".into(),
                // A port of its own: 0 would not pick one but turn HTTPS (and with it
                // /healthz) off.
                format!("--secure-port={port}"),
                format!("--tls-cert-file={}", p(&format!("{name}.crt"))),
                format!("--tls-private-key-file={}", p(&format!("{name}.key"))),
                "--leader-elect=false".into(),
            ];
            if name == CONTROLLER_MANAGER {
                args.extend([
                    // Each controller acts as a service account of its own, as on a
                    // cluster (the RBAC roles of kube-system assume it).
                    "--use-service-account-credentials=true".into(),
                    format!("--service-account-private-key-file={}", p("sa.key")),
                    format!("--root-ca-file={}", p("ca.crt")),
                    format!("--cluster-signing-cert-file={}", p("ca.crt")),
                    format!("--cluster-signing-key-file={}", p("ca.key")),
                ]);
            }
            self.spawn(name, bin_dir, port, args)?;
            optional.push((name, port));
        }
        for (name, port) in optional {
            // The components' certificates come from this control plane's CA: a
            // probe that passes talked to them.
            let healthz = Probe {
                client: probe_client(&format!("https://127.0.0.1:{port}"), Some(&self.pki))?,
                path: "/healthz".into(),
                ok: |body| body.trim() == "ok",
            };
            self.wait_ready(name, "healthy (/healthz)", &healthz, COMPONENT_READY)
                .await?;
        }
        if !self.missing.contains(&CONTROLLER_MANAGER) {
            // Pods need their namespace's `default` ServiceAccount, which the controller
            // manager's serviceaccount controller creates.
            let account = Probe {
                client: admin,
                path: "/api/v1/namespaces/default/serviceaccounts/default".into(),
                ok: |_| true,
            };
            self.wait_ready(
                CONTROLLER_MANAGER,
                "done creating ServiceAccount default/default",
                &account,
                COMPONENT_READY,
            )
            .await?;
        }
        Ok(())
    }

    /// Starts component `name` from `bin_dir`, its output going to `NAME.log`.
    fn spawn(
        &mut self,
        name: &'static str,
        bin_dir: &Path,
        port: u16,
        args: Vec<String>,
    ) -> Result<(), String> {
        let log = self.work_dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log)
            .map_err(|e| format!("failed to create {}: {e}", log.display()))?;
        let err = out
            .try_clone()
            .map_err(|e| format!("failed to open {}: {e}", log.display()))?;
        let mut command = tokio::process::Command::new(bin_dir.join(name));
        command
            .args(&args)
            .current_dir(&self.work_dir)
            .stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true);
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: between fork and exec: only async-signal-safe system calls, no
        // allocation (from_raw_os_error does not allocate).
        unsafe {
            command.pre_exec(move || {
                // Killed when the spawning *thread* exits (PDEATHSIG follows the thread
                // that forked, not the process): see ControlPlane::processes.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent died before prctl: nothing would kill this child.
                if libc::getppid() != parent {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .map_err(|e| format!("failed to start {}: {e}", bin_dir.join(name).display()))?;
        let pid = child.id().ok_or_else(|| format!("{name} exited at once"))?;
        tracing::debug!(component = name, pid, port, log = %log.display(), "control-plane component started");
        self.processes.push(Process {
            name,
            child,
            pid,
            port,
            log,
        });
        Ok(())
    }

    /// Waits until component `name` runs, listens on its port and passes `probe`; `what`
    /// says what is awaited, for errors.
    async fn wait_ready(
        &mut self,
        name: &'static str,
        what: &str,
        probe: &Probe,
        timeout: Duration,
    ) -> Result<(), StartError> {
        let started = tokio::time::Instant::now();
        let deadline = started + timeout;
        let process = self
            .processes
            .iter_mut()
            .find(|p| p.name == name)
            .ok_or_else(|| format!("{name} was not started"))?;
        loop {
            match process.child.try_wait() {
                Ok(Some(status)) => {
                    return Err(process.failure(&format!("exited ({status}) before it was {what}")));
                }
                Ok(None) => {}
                Err(e) => return Err(process.failure(&format!("could not be waited for: {e}"))),
            }
            let last = if !listens_on(process.pid, process.port) {
                format!("not listening on 127.0.0.1:{} yet", process.port)
            } else {
                match probe.check().await {
                    Ok(()) => {
                        tracing::info!(
                            component = name,
                            seconds = started.elapsed().as_secs_f64(),
                            "control-plane component {what}"
                        );
                        return Ok(());
                    }
                    Err(e) => e,
                }
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(process.failure(&format!(
                    "was not {what} within {timeout:?} (last check: {last})"
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// A kubeconfig for a new client certificate of `user` in `groups`.
    fn kubeconfig(&self, user: &str, groups: &[&str]) -> Result<String, String> {
        let (cert, key) = self.pki.client(user, groups)?;
        Ok(kubeconfig_text(&self.url, &self.pki.ca_pem, &cert, &key))
    }

    /// SIGKILLs every component and waits for it (a failed try of a start).
    async fn kill_all(&mut self) {
        for mut process in self.processes.drain(..) {
            let _ = process.child.kill().await;
        }
    }

    /// Removes the work directory, once.
    fn remove_work_dir(&mut self) {
        if self.removed {
            return;
        }
        self.removed = true;
        if let Err(e) = std::fs::remove_dir_all(&self.work_dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %self.work_dir.display(), error = %e, "failed to remove the control plane's directory");
        }
    }
}

impl Drop for ControlPlane {
    /// Best effort when [`ControlPlane::stop`] was not awaited (a failed start or test):
    /// SIGKILL to every component still running, and the work directory goes.
    fn drop(&mut self) {
        for process in &mut self.processes {
            let _ = process.child.start_kill();
        }
        self.remove_work_dir();
    }
}

impl Process {
    /// A start error for this component: `what` it did, and the end of its log.
    fn failure(&self, what: &str) -> StartError {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(LOG_TAIL)..].join("\n");
        StartError {
            message: format!(
                "{} {what}; the last lines of {}:\n{tail}",
                self.name,
                self.log.display()
            ),
            port_taken: log.contains("address already in use"),
        }
    }
}

/// SIGTERM to `process`, then SIGKILL if it is still running after `grace`.
async fn terminate(mut process: Process, grace: Duration) {
    // A child is reaped only here: until then its pid cannot have been reused.
    if let Ok(Some(_)) = process.child.try_wait() {
        return;
    }
    let _ = kill(Pid::from_raw(process.pid as libc::pid_t), Signal::SIGTERM);
    match tokio::time::timeout(grace, process.child.wait()).await {
        Ok(Ok(status)) => {
            tracing::debug!(component = process.name, %status, "control-plane component stopped");
        }
        Ok(Err(e)) => {
            tracing::warn!(component = process.name, error = %e, "failed to wait for a control-plane component; killing it");
            let _ = process.child.kill().await;
        }
        Err(_) => {
            tracing::warn!(
                component = process.name,
                ?grace,
                "a control-plane component ignored SIGTERM; killing it"
            );
            let _ = process.child.kill().await;
        }
    }
}

/// Creates `dir`, which must not exist yet or be empty (the control plane removes it).
fn create_work_dir(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("failed to create {}: {e}", dir.display()))?;
    let mut entries =
        std::fs::read_dir(dir).map_err(|e| format!("failed to read {}: {e}", dir.display()))?;
    if entries.next().is_some() {
        return Err(format!(
            "{} is not empty: the control plane needs a directory of its own (it removes it when stopped)",
            dir.display()
        ));
    }
    Ok(())
}

/// Five distinct loopback ports that were free a moment ago (bound together, then
/// released for the components to take).
fn free_ports() -> Result<[u16; 5], StartError> {
    let listeners = (0..5)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("failed to find a free loopback port: {e}"))?;
    let mut ports = [0; 5];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener
            .local_addr()
            .map_err(|e| format!("failed to read a bound port: {e}"))?
            .port();
    }
    Ok(ports)
}

/// True when process `pid` holds a socket listening on 127.0.0.1:`port` (from
/// `/proc/net/tcp` and the process's file descriptors).
fn listens_on(pid: u32, port: u16) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    // Local addresses are hex, the IPv4 address in host byte order: 127.0.0.1 on a
    // little-endian machine is 0100007F.
    let local = format!("{:08X}:{port:04X}", u32::from_ne_bytes([127, 0, 0, 1]));
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            (fields.len() > 9 && fields[1] == local && fields[3] == "0A")
                .then(|| format!("socket:[{}]", fields[9]))
        })
        .collect();
    if inodes.is_empty() {
        return false;
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path()).is_ok_and(|target| {
            inodes
                .iter()
                .any(|inode| target.as_os_str() == inode.as_str())
        })
    })
}

/// A client for health checks on `url`: no credentials, short timeouts, no retries;
/// trusting `pki`'s CA for HTTPS.
fn probe_client(url: &str, pki: Option<&Pki>) -> Result<kube::Client, String> {
    let uri = url.parse().map_err(|e| format!("bad URL {url}: {e}"))?;
    let mut config = kube::Config::new(uri);
    config.connect_timeout = Some(PROBE_TIMEOUT);
    config.read_timeout = Some(PROBE_TIMEOUT);
    config.default_retry = false;
    if let Some(pki) = pki {
        config.root_cert = Some(vec![pki.ca_der.clone()]);
    }
    quiet_client(config, url)
}

/// A client without kube's tracing layer, which logs every 5xx answer as an error: a
/// component that is still starting answers its health endpoint with 500, and waiting
/// for it is no error. The probe reports what it saw when the wait fails.
fn quiet_client(config: kube::Config, what: &str) -> Result<kube::Client, String> {
    use kube::client::ConfigExt;
    use tower::Layer;
    let https = config
        .rustls_https_connector()
        .map_err(|e| format!("failed to set up TLS for {what}: {e}"))?;
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, kube::client::Body>(https);
    let service = config.base_uri_layer().layer(http);
    Ok(kube::client::ClientBuilder::new(service, config.default_namespace.clone()).build())
}

/// A client from a parsed kubeconfig.
async fn client_from(
    kubeconfig: kube::config::Kubeconfig,
    user: &str,
) -> Result<kube::Client, String> {
    let config = config_from(kubeconfig, user).await?;
    kube::Client::try_from(config).map_err(|e| format!("failed to build a client as {user}: {e}"))
}

/// The configuration of a parsed kubeconfig.
async fn config_from(
    kubeconfig: kube::config::Kubeconfig,
    user: &str,
) -> Result<kube::Config, String> {
    kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
        .await
        .map_err(|e| format!("failed to load the kubeconfig of {user}: {e}"))
}

/// A kubeconfig with the CA, the certificate and the key inline, namespace `default`.
fn kubeconfig_text(url: &str, ca_pem: &str, cert_pem: &str, key_pem: &str) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: control-plane
  cluster:
    server: {url}
    certificate-authority-data: {ca}
users:
- name: client
  user:
    client-certificate-data: {cert}
    client-key-data: {key}
contexts:
- name: control-plane
  context:
    cluster: control-plane
    user: client
    namespace: default
current-context: control-plane
",
        ca = b64(ca_pem),
        cert = b64(cert_pem),
        key = b64(key_pem),
    )
}

/// Writes `contents` to `path`, readable by its owner only (keys).
fn write_private(path: &Path, contents: &[u8]) -> Result<(), String> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("failed to create {}: {e}", path.display()))?;
    file.write_all(contents)
        .map_err(|e| format!("failed to write {}: {e}", path.display()))
}

/// The control plane's CA, which signs every certificate.
struct Pki {
    /// The CA as an issuer (None until [`Pki::create`]).
    issuer: Option<Issuer<'static, KeyPair>>,
    /// The CA certificate, PEM.
    ca_pem: String,
    /// The CA certificate, DER.
    ca_der: Vec<u8>,
}

impl Pki {
    /// No CA yet.
    fn new() -> Self {
        Self {
            issuer: None,
            ca_pem: String::new(),
            ca_der: Vec::new(),
        }
    }

    /// Makes the CA and writes to `dir` what the components read: `ca.crt`/`ca.key`,
    /// `front-proxy-ca.crt` (request-header authentication, a CA of its own that signs
    /// nothing here), `apiserver.crt`/`.key`, serving certificates of the controller
    /// manager and the scheduler, and the service-account key pair `sa.key`/`sa.pub`.
    fn create(dir: &Path) -> Result<Self, String> {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("failed to create {}: {e}", dir.display()))?;
        let write = |name: &str, text: &str| write_private(&dir.join(name), text.as_bytes());
        let (ca_params, ca_key) = ca("testrunner-control-plane-ca")?;
        let ca_cert = ca_params
            .self_signed(&ca_key)
            .map_err(|e| format!("failed to sign the CA certificate: {e}"))?;
        write("ca.crt", &ca_cert.pem())?;
        write("ca.key", &ca_key.serialize_pem())?;
        let (proxy_params, proxy_key) = ca("testrunner-front-proxy-ca")?;
        let proxy_cert = proxy_params
            .self_signed(&proxy_key)
            .map_err(|e| format!("failed to sign the front-proxy CA certificate: {e}"))?;
        write("front-proxy-ca.crt", &proxy_cert.pem())?;
        let pki = Self {
            ca_pem: ca_cert.pem(),
            ca_der: ca_cert.der().to_vec(),
            issuer: Some(Issuer::new(ca_params, ca_key)),
        };
        for (name, sans) in [
            (APISERVER, &APISERVER_SANS[..]),
            (CONTROLLER_MANAGER, &["127.0.0.1", "localhost"][..]),
            (SCHEDULER, &["127.0.0.1", "localhost"][..]),
        ] {
            let (cert, key) = pki.sign(name, &[], sans, ExtendedKeyUsagePurpose::ServerAuth)?;
            let file = if name == APISERVER { "apiserver" } else { name };
            write(&format!("{file}.crt"), &cert)?;
            write(&format!("{file}.key"), &key)?;
        }
        let sa = KeyPair::generate()
            .map_err(|e| format!("failed to make the service-account key: {e}"))?;
        write("sa.key", &sa.serialize_pem())?;
        write("sa.pub", &sa.public_key_pem())?;
        Ok(pki)
    }

    /// A client certificate and its key (PEM) for `user` in `groups` (at most two).
    fn client(&self, user: &str, groups: &[&str]) -> Result<(String, String), String> {
        self.sign(user, groups, &[], ExtendedKeyUsagePurpose::ClientAuth)
    }

    /// A certificate and its new key (PEM), for common name `cn`, organizations `orgs`
    /// (a client certificate's groups, at most two), alternative names `sans`.
    fn sign(
        &self,
        cn: &str,
        orgs: &[&str],
        sans: &[&str],
        usage: ExtendedKeyUsagePurpose,
    ) -> Result<(String, String), String> {
        let issuer = self
            .issuer
            .as_ref()
            .ok_or_else(|| "the control plane's CA is not made yet".to_string())?;
        let mut dn = DistinguishedName::new();
        match orgs {
            [] => {}
            [one] => dn.push(DnType::OrganizationName, *one),
            // rcgen keeps one value per attribute type: the second organization goes in
            // as an attribute of the same OID (2.5.4.10) given as a custom type.
            [one, two] => {
                dn.push(DnType::OrganizationName, *one);
                dn.push(DnType::CustomDnType(vec![2, 5, 4, 10]), *two);
            }
            _ => {
                return Err(format!(
                    "a certificate holds at most two groups here; {cn} was given {orgs:?}"
                ));
            }
        }
        dn.push(DnType::CommonName, cn);
        let mut params = CertificateParams::default();
        params.distinguished_name = dn;
        params.subject_alt_names = sans
            .iter()
            .map(|san| match san.parse() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => (*san)
                    .try_into()
                    .map(SanType::DnsName)
                    .map_err(|e| format!("bad name {san}: {e}")),
            })
            .collect::<Result<_, _>>()?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params);
        let key = KeyPair::generate().map_err(|e| format!("failed to make a key for {cn}: {e}"))?;
        let cert = params
            .signed_by(&key, issuer)
            .map_err(|e| format!("failed to sign the certificate of {cn}: {e}"))?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// A CA's parameters and key.
fn ca(cn: &str) -> Result<(CertificateParams, KeyPair), String> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params);
    let key = KeyPair::generate().map_err(|e| format!("failed to make the key of {cn}: {e}"))?;
    Ok((params, key))
}

/// Valid from a little before now for a few days.
fn validity(params: &mut CertificateParams) {
    let now = SystemTime::now();
    params.not_before = (now - CERT_BACKDATE).into();
    params.not_after = (now + CERT_VALIDITY).into();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listens_on_finds_this_process_listener() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(listens_on(std::process::id(), port));
        drop(listener);
        assert!(!listens_on(std::process::id(), port));
    }

    #[test]
    fn missing_effects_follow_missing() {
        let plane = ControlPlane {
            url: String::new(),
            work_dir: PathBuf::from("/nonexistent/testrunner-control-plane"),
            admin_kubeconfig: PathBuf::new(),
            pki: Pki::new(),
            processes: Vec::new(),
            missing: vec![SCHEDULER],
            removed: true,
        };
        assert_eq!(
            plane.missing_effects(),
            ["no scheduler: the node binds pending pods itself"]
        );
    }

    #[test]
    fn client_certificates_hold_up_to_two_groups() {
        assert!(Pki::new().client("x", &[]).is_err(), "no CA yet");
        let dir = std::env::temp_dir().join(format!("testrunner-pki-{}", std::process::id()));
        let pki = Pki::create(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(pki.client("system:node:n", &["system:nodes"]).is_ok());
        assert!(pki.client("u", &["a", "b"]).is_ok());
        assert!(pki.client("u", &["a", "b", "c"]).is_err());
    }
}
