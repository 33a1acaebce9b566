//! The simulated cluster: an in-process stand-in for the Kubernetes API server and a
//! kubelet that runs container commands as local processes. A development and test
//! harness, never a product runtime: see docs/simulation.md for what it models.
//!
//! [`api`] (store, watches, patches, apply), [`http`] (routes), [`kinds`] (served
//! resources), [`validate`] (CRD schemas), [`ssa`] (field ownership), [`table`]
//! (`kubectl get` columns), [`openapi`] (`kubectl apply`/`explain`), [`protobuf`]
//! (protobuf request bodies, as `kubectl create secret` sends), [`kubelet`].

pub mod api;
pub mod control_plane;
pub mod http;
pub mod isolate;
pub mod kinds;
pub mod kubelet;
pub mod openapi;
pub mod protobuf;
pub mod publish;
pub mod select;
pub mod ssa;
pub mod table;
pub mod validate;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

pub use api::Cluster;

/// Settings of the API server.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Changes kept for watches that resume from a resourceVersion.
    pub history: usize,
    /// Interval between watch bookmarks (when a client allows them).
    pub bookmark_interval: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            history: 10_000,
            bookmark_interval: Duration::from_secs(10),
        }
    }
}

/// A running API server.
pub struct ApiServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its state.
    pub cluster: Arc<Cluster>,
    task: tokio::task::JoinHandle<()>,
}

impl ApiServer {
    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube client for this server.
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(self.url().parse().expect("a valid URL"));
        kube::Client::try_from(config).expect("a client for a plain HTTP URL")
    }

    /// Stops listening.
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the API server on `listen` (port 0 picks one) with the namespaces a real one
/// starts with (`default`, `kube-system`, `kube-public`, `kube-node-lease`).
pub async fn start_api(listen: SocketAddr, config: ServerConfig) -> std::io::Result<ApiServer> {
    let cluster = Cluster::new(config.history);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let app = http::router(http::Server {
        cluster: cluster.clone(),
        bookmark_interval: config.bookmark_interval,
    });
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the simulated API server stopped");
        }
    });
    let ns_kind = cluster
        .find_kind("", "v1", "namespaces")
        .expect("namespaces are served");
    // The namespaces a real API server creates for itself.
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        cluster
            .create(
                &ns_kind,
                "",
                json!({"metadata": {"name": ns}}),
                &api::WriteOpts::default(),
            )
            .map_err(|e| std::io::Error::other(e.message))?;
    }
    Ok(ApiServer {
        addr,
        cluster,
        task,
    })
}

/// Installs the project's CRD.
pub fn install_crd(cluster: &Cluster) -> Result<(), api::ApiError> {
    let crd_kind = cluster
        .find_kind("apiextensions.k8s.io", "v1", "customresourcedefinitions")
        .expect("CRDs are served");
    let crd = serde_json::to_value(<crate::crd::TestRunnerPool as kube::CustomResourceExt>::crd())
        .map_err(|e| api::ApiError::bad_request(e.to_string()))?;
    cluster.create(&crd_kind, "", crd, &api::WriteOpts::default())?;
    Ok(())
}

/// Creates Secret `name` in `namespace` with one key.
pub fn create_secret(
    cluster: &Cluster,
    namespace: &str,
    name: &str,
    key: &str,
    value: &str,
) -> Result<(), api::ApiError> {
    use base64::Engine;
    let encode = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let kind = cluster
        .find_kind("", "v1", "secrets")
        .expect("secrets are served");
    cluster.create(
        &kind,
        namespace,
        json!({"metadata": {"name": name}, "type": "Opaque", "data": {key: encode(value.as_bytes())}}),
        &api::WriteOpts::default(),
    )?;
    Ok(())
}

/// A kubeconfig for a plain-HTTP server.
pub fn kubeconfig(url: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: testrunner-sim
  cluster:
    server: {url}
users:
- name: testrunner-sim
  user: {{}}
contexts:
- name: testrunner-sim
  context:
    cluster: testrunner-sim
    user: testrunner-sim
    namespace: default
current-context: testrunner-sim
"
    )
}

/// Writes [`kubeconfig`] to `path`.
pub fn write_kubeconfig(path: &Path, url: &str) -> std::io::Result<()> {
    std::fs::write(path, kubeconfig(url))
}

/// Options of `testrunner-operator simulate`.
#[derive(Clone, Debug)]
pub struct SimulateOptions {
    /// Address of the API server.
    pub listen: SocketAddr,
    /// Where the kubeconfig goes.
    pub kubeconfig: std::path::PathBuf,
    /// Broker URI stored in Secret `rabbitmq` (key `uri`).
    pub amqp_uri: String,
    /// Durations of the kubelet are divided by this.
    pub time_scale: f64,
    /// Images whose containers run in a local root filesystem.
    pub images: std::collections::BTreeMap<String, std::path::PathBuf>,
    /// Binaries of a real control plane to run instead of the embedded API server.
    pub control_plane: Option<std::path::PathBuf>,
}

/// The API server a simulation runs against.
pub enum Backend {
    /// The embedded, in-process API server.
    Embedded(ApiServer),
    /// A real control plane (taken out when it stops).
    ControlPlane {
        /// The running control plane.
        plane: std::sync::Mutex<Option<Box<control_plane::ControlPlane>>>,
        /// Its API server's URL.
        url: String,
        /// The optional components it lacks, each with what that means.
        missing: Vec<&'static str>,
    },
}

/// A whole simulated cluster: API server, the simulated node, and (optionally) the
/// operator.
pub struct Simulation {
    /// The API server.
    pub backend: Backend,
    /// The simulated node.
    pub kubelet: kubelet::Kubelet,
    /// Root of the pods' directories.
    pub root: std::path::PathBuf,
    client: kube::Client,
}

/// Name of the simulated node.
pub const NODE_NAME: &str = "simulated-node";

impl Simulation {
    /// Starts the API server and the kubelet, installs the CRD and the broker Secret.
    /// `exe` is the binary `testrunner-operator` commands in pods run: this binary for
    /// `simulate`; tests pass `CARGO_BIN_EXE_testrunner-operator`.
    pub async fn start(
        listen: SocketAddr,
        amqp_uri: &str,
        time_scale: f64,
        exe: std::path::PathBuf,
    ) -> std::io::Result<Self> {
        Self::start_with_images(listen, amqp_uri, time_scale, exe, Default::default()).await
    }

    /// Like [`Simulation::start`], with root filesystems for some images: containers of
    /// those images run inside them (see [`kubelet::Config::images`]).
    pub async fn start_with_images(
        listen: SocketAddr,
        amqp_uri: &str,
        time_scale: f64,
        exe: std::path::PathBuf,
        images: std::collections::BTreeMap<String, std::path::PathBuf>,
    ) -> std::io::Result<Self> {
        let api = start_api(listen, ServerConfig::default()).await?;
        install_crd(&api.cluster).map_err(|e| std::io::Error::other(e.message))?;
        create_secret(&api.cluster, "default", "rabbitmq", "uri", amqp_uri)
            .map_err(|e| std::io::Error::other(e.message))?;
        let root = std::env::temp_dir().join(format!(
            "testrunner-sim-{}-{}",
            std::process::id(),
            api.addr.port()
        ));
        std::fs::create_dir_all(&root)?;
        let log_root = root.clone();
        api.cluster
            .set_log_locator(Arc::new(move |ns, name, uid, container| {
                kubelet::log_path(&log_root, ns, name, uid, container)
            }));
        let client = api.client();
        // No scheduler here: the node binds pods itself.
        let kubelet = kubelet::Kubelet::start(
            client.clone(),
            Some(client.clone()),
            kubelet::Config {
                time_scale,
                root: root.clone(),
                exe,
                node_name: NODE_NAME.into(),
                images,
            },
        )
        .await
        .map_err(std::io::Error::other)?;
        Ok(Self {
            backend: Backend::Embedded(api),
            kubelet,
            root,
            client,
        })
    }

    /// Starts a real control plane from the binaries in `bin_dir` (see
    /// [`control_plane::ControlPlane`]), the simulated node joined to it with a node's
    /// credentials (`system:node:simulated-node`), the CRD and the broker Secret.
    /// Without a scheduler in `bin_dir`, the node binds pods itself.
    pub async fn start_on_control_plane(
        bin_dir: &Path,
        amqp_uri: &str,
        time_scale: f64,
        exe: std::path::PathBuf,
        images: std::collections::BTreeMap<String, std::path::PathBuf>,
    ) -> Result<Self, String> {
        static STARTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let base = std::env::temp_dir().join(format!("testrunner-cp-{}-{n}", std::process::id()));
        let plane =
            control_plane::ControlPlane::start(bin_dir, &base.join("control-plane")).await?;
        let client = plane.admin_client().await?;
        if plane.missing().contains(&"kube-controller-manager") {
            // What the controller manager would make and pods need: their service
            // account, and the CA bundle their service-account volume projects.
            default_service_account(&client, "default").await?;
            root_ca_config_map(&client, "default", plane.ca_pem()).await?;
        }
        apply_crd(&client).await?;
        broker_secret(&client, "default", amqp_uri).await?;
        let node = plane
            .client_as(&format!("system:node:{NODE_NAME}"), &["system:nodes"])
            .await?;
        let binder = plane
            .missing()
            .contains(&"kube-scheduler")
            .then(|| client.clone());
        let root = base.join("pods");
        std::fs::create_dir_all(&root)
            .map_err(|e| format!("failed to create {}: {e}", root.display()))?;
        let kubelet = kubelet::Kubelet::start(
            node,
            binder,
            kubelet::Config {
                time_scale,
                root: root.clone(),
                exe,
                node_name: NODE_NAME.into(),
                images,
            },
        )
        .await?;
        let url = plane.url().to_string();
        let missing = plane.missing_effects();
        Ok(Self {
            backend: Backend::ControlPlane {
                plane: std::sync::Mutex::new(Some(Box::new(plane))),
                url,
                missing,
            },
            kubelet,
            root: base,
            client,
        })
    }

    /// A client of the API server (full rights).
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// The API server's URL.
    pub fn url(&self) -> String {
        match &self.backend {
            Backend::Embedded(api) => api.url(),
            Backend::ControlPlane { url, .. } => url.clone(),
        }
    }

    /// The embedded API server, when the simulation runs on it.
    pub fn embedded(&self) -> Option<&ApiServer> {
        match &self.backend {
            Backend::Embedded(api) => Some(api),
            Backend::ControlPlane { .. } => None,
        }
    }

    /// Writes a kubeconfig with full rights for this cluster to `path`.
    pub fn write_kubeconfig(&self, path: &Path) -> Result<(), String> {
        match &self.backend {
            Backend::Embedded(api) => write_kubeconfig(path, &api.url())
                .map_err(|e| format!("failed to write {}: {e}", path.display())),
            Backend::ControlPlane { plane, .. } => {
                let plane = plane.lock().unwrap_or_else(|p| p.into_inner());
                let plane = plane.as_ref().ok_or("the control plane is stopped")?;
                plane.write_kubeconfig(path, "admin", &["system:masters"])
            }
        }
    }

    /// Stops every container process, then the API server (a control plane's every
    /// process), and removes the pods' directories.
    pub async fn shutdown(&self) {
        self.kubelet.shutdown().await;
        match &self.backend {
            Backend::Embedded(api) => api.stop(),
            Backend::ControlPlane { plane, .. } => {
                let plane = plane.lock().unwrap_or_else(|p| p.into_inner()).take();
                if let Some(plane) = plane {
                    plane.stop().await;
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

impl Drop for Simulation {
    fn drop(&mut self) {
        // Best effort when `shutdown` was not awaited (a failed test): the processes
        // die with their handles (kill on drop); their directories go here.
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Applies the project's CRD (server-side apply) and waits until it is Established.
pub async fn apply_crd(client: &kube::Client) -> Result<(), String> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let crds: kube::Api<CustomResourceDefinition> = kube::Api::all(client.clone());
    let crd = <crate::crd::TestRunnerPool as kube::CustomResourceExt>::crd();
    let name = crd.metadata.name.clone().unwrap_or_default();
    crds.patch(
        &name,
        &kube::api::PatchParams::apply("testrunner-simulate").force(),
        &kube::api::Patch::Apply(&crd),
    )
    .await
    .map_err(|e| format!("failed to apply CRD {name}: {e}"))?;
    let established = kube::runtime::wait::conditions::is_crd_established();
    tokio::time::timeout(
        Duration::from_secs(60),
        kube::runtime::wait::await_condition(crds, &name, established),
    )
    .await
    .map_err(|_| format!("CRD {name} was not Established within a minute"))?
    .map_err(|e| format!("failed to watch CRD {name}: {e}"))?;
    Ok(())
}

/// Creates ServiceAccount `default` in `namespace` unless it exists.
pub async fn default_service_account(client: &kube::Client, namespace: &str) -> Result<(), String> {
    let sas: kube::Api<k8s_openapi::api::core::v1::ServiceAccount> =
        kube::Api::namespaced(client.clone(), namespace);
    let sa = serde_json::from_value(json!({"metadata": {"name": "default"}}))
        .map_err(|e| e.to_string())?;
    match sas.create(&kube::api::PostParams::default(), &sa).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(format!(
            "failed to create ServiceAccount {namespace}/default: {e}"
        )),
    }
}

/// Creates ConfigMap `kube-root-ca.crt` (key `ca.crt`) in `namespace` unless it exists,
/// as the controller manager's root CA publisher does.
pub async fn root_ca_config_map(
    client: &kube::Client,
    namespace: &str,
    ca_pem: &str,
) -> Result<(), String> {
    let cms: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
        kube::Api::namespaced(client.clone(), namespace);
    let cm = serde_json::from_value(
        json!({"metadata": {"name": "kube-root-ca.crt"}, "data": {"ca.crt": ca_pem}}),
    )
    .map_err(|e| e.to_string())?;
    match cms.create(&kube::api::PostParams::default(), &cm).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(format!(
            "failed to create ConfigMap {namespace}/kube-root-ca.crt: {e}"
        )),
    }
}

/// Creates (or replaces) Secret `rabbitmq` (key `uri`) in `namespace`.
pub async fn broker_secret(
    client: &kube::Client,
    namespace: &str,
    uri: &str,
) -> Result<(), String> {
    let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(client.clone(), namespace);
    let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "rabbitmq"},
        "type": "Opaque", "stringData": {"uri": uri}});
    secrets
        .patch(
            "rabbitmq",
            &kube::api::PatchParams::apply("testrunner-simulate").force(),
            &kube::api::Patch::Apply(&secret),
        )
        .await
        .map(|_| ())
        .map_err(|e| format!("failed to write Secret {namespace}/rabbitmq: {e}"))
}

/// Starts the operator in-process against `client` (no leader election).
pub fn start_operator(client: kube::Client) -> tokio::task::JoinHandle<()> {
    start_operator_in(client, Vec::new())
}

/// Starts the operator in-process, watching only `namespaces` (all when empty).
pub fn start_operator_in(
    client: kube::Client,
    namespaces: Vec<String>,
) -> tokio::task::JoinHandle<()> {
    use crate::controller::{self, Settings};
    use crate::pods::PodSettings;
    let settings = Settings {
        pods: PodSettings {
            operator_image: concat!("testrunner-operator:", env!("CARGO_PKG_VERSION")).into(),
            // A simulation wants to see state changes quickly.
            report_interval: std::time::Duration::from_secs(2),
        },
        namespaces,
        controller_name: "testrunner-operator".into(),
        instance: Some("simulated".into()),
    };
    let metrics = Arc::new(crate::metrics::Metrics::default());
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    tokio::spawn(controller::run(client, settings, metrics, ready))
}

async fn client_from_kubeconfig(path: &Path) -> Result<kube::Client, String> {
    let kc = kube::config::Kubeconfig::read_from(path)
        .map_err(|e| format!("failed to read {}: {e}", path.display()))?;
    let config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .map_err(|e| format!("failed to load {}: {e}", path.display()))?;
    kube::Client::try_from(config).map_err(|e| format!("failed to build a client: {e}"))
}

/// `testrunner-operator simulate`: runs until Ctrl-C or SIGTERM.
pub async fn simulate(opts: SimulateOptions) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("failed to find this binary: {e}"))?;
    let sim = match &opts.control_plane {
        None => Simulation::start_with_images(
            opts.listen,
            &opts.amqp_uri,
            opts.time_scale,
            exe.clone(),
            opts.images.clone(),
        )
        .await
        .map_err(|e| {
            format!(
                "failed to start the simulated cluster on {}: {e}",
                opts.listen
            )
        })?,
        Some(dir) => {
            println!("Starting a real control plane from {} ...", dir.display());
            Simulation::start_on_control_plane(
                dir,
                &opts.amqp_uri,
                opts.time_scale,
                exe.clone(),
                opts.images.clone(),
            )
            .await
            .map_err(|e| {
                format!(
                    "failed to start the control plane from {}: {e}",
                    dir.display()
                )
            })?
        }
    };
    sim.write_kubeconfig(&opts.kubeconfig)?;
    let client = client_from_kubeconfig(&opts.kubeconfig).await?;
    let operator = start_operator(client);
    let kubeconfig = std::fs::canonicalize(&opts.kubeconfig).unwrap_or(opts.kubeconfig.clone());
    let kc = kubeconfig.display();
    let bin = exe.display();
    let what = match &sim.backend {
        Backend::Embedded(_) => {
            "API server and kubelet in this process; the operator runs against it".to_string()
        }
        Backend::ControlPlane { missing, .. } => {
            let mut what = "a real control plane: etcd, kube-apiserver".to_string();
            if missing.is_empty() {
                what.push_str(", kube-controller-manager, kube-scheduler");
            }
            what.push_str("; the simulated node and the operator in this process");
            for m in missing {
                what.push_str(&format!("\n  {m}"));
            }
            what
        }
    };
    println!(
        "Simulated cluster at {url} ({what}).
Kubeconfig: {kc}   Broker Secret: default/rabbitmq (key uri)   Time scale: {scale}

In a second terminal:
  export KUBECONFIG={kc}
  {bin} publish --queue tickets.demo --count 10 --declare-quorum
  kubectl apply -f - <<'YAML'
apiVersion: testrunner.dev/v1alpha1
kind: TestRunnerPool
metadata:
  name: demo
spec:
  image: example.org/test-runner:1
  # no image is pulled (see simulate --image); this command crashes on any image tagged :broken
  command: [\"sh\", \"-c\", \"case $TESTRUNNER_IMAGE in *:broken) exit 3;; esac; cat >/dev/null; sleep 1\"]
  queue:
    name: tickets.demo
    connectionSecretRef: {{name: rabbitmq, key: uri}}
  scaling: {{minWorkers: 0, maxWorkers: 5, pollInterval: 1s, scaleDownDelay: 20s}}
YAML
  kubectl get trp -w
  ({bin} publish --queue tickets.demo --count 30 sends more: watch the pool scale up and back down)
  kubectl get pods
  kubectl describe trp demo
  (a rollout: publish 30 more, then set image example.org/test-runner:broken, watch its canary
   roll back, then example.org/test-runner:2, watch it promoted:
   kubectl patch trp demo --type merge -p '{{\"spec\":{{\"image\":\"example.org/test-runner:broken\"}}}}')

Ctrl-C stops everything (the API server, the operator and every worker process).",
        url = sim.url(),
        scale = opts.time_scale,
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("failed to listen for SIGTERM: {e}"))?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    println!("stopping the simulated cluster");
    operator.abort();
    sim.shutdown().await;
    Ok(())
}
