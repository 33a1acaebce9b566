//! The simulated cluster: an in-process stand-in for the Kubernetes API server and a
//! kubelet that runs container commands as local processes. A development and test
//! harness, never a product runtime: see docs/simulation.md for what it models.
//!
//! [`api`] (store, watches, patches, apply), [`http`] (routes), [`kinds`] (served
//! resources), [`validate`] (CRD schemas), [`ssa`] (field ownership), [`table`]
//! (`kubectl get` columns), [`openapi`] (`kubectl apply`/`explain`), [`protobuf`]
//! (protobuf request bodies, as `kubectl create secret` sends), [`kubelet`].

pub mod api;
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

/// Starts the API server on `listen` (port 0 picks one) with the `default` namespace.
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
    cluster
        .create(
            &ns_kind,
            "",
            json!({"metadata": {"name": "default"}}),
            &api::WriteOpts::default(),
        )
        .map_err(|e| std::io::Error::other(e.message))?;
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
}

/// A whole simulated cluster: API server, kubelet, and (optionally) the operator.
pub struct Simulation {
    /// The API server.
    pub api: ApiServer,
    /// The kubelet.
    pub kubelet: kubelet::Kubelet,
    /// Root of the pods' directories.
    pub root: std::path::PathBuf,
}

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
        let kubelet = kubelet::Kubelet::start(
            api.cluster.clone(),
            kubelet::Config {
                time_scale,
                root: root.clone(),
                exe,
                node_name: "simulated-node".into(),
                images,
            },
        );
        Ok(Self { api, kubelet, root })
    }

    /// Stops every container process and removes the pods' directories.
    pub async fn shutdown(&self) {
        self.kubelet.shutdown().await;
        self.api.stop();
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
    let sim = Simulation::start_with_images(
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
    })?;
    write_kubeconfig(&opts.kubeconfig, &sim.api.url())
        .map_err(|e| format!("failed to write {}: {e}", opts.kubeconfig.display()))?;
    let client = client_from_kubeconfig(&opts.kubeconfig).await?;
    let operator = start_operator(client);
    let kubeconfig = std::fs::canonicalize(&opts.kubeconfig).unwrap_or(opts.kubeconfig.clone());
    let kc = kubeconfig.display();
    let bin = exe.display();
    println!(
        "Simulated cluster at {url} (API server and kubelet in this process; the operator runs against it).
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
        url = sim.api.url(),
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
