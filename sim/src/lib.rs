//! testrunner-sim: a simulated Kubernetes cluster for development and tests. An
//! in-process stand-in for the API server, a simulated node (a kubelet that runs
//! container commands as local processes), and a launcher of a real control plane the
//! same node joins. A development and test harness, never a product runtime: see
//! docs/simulation.md for what it models.
//!
//! It knows no custom resource of its own: a [`Simulation`] installs the CRDs and Secrets
//! its [`Options`] carry, and [`install_crd`] / [`apply_crd`] take any CRD.
//!
//! [`api`] (store, watches, patches, apply), [`http`] (routes), [`kinds`] (served
//! resources), [`validate`] (CRD schemas), [`ssa`] (field ownership), [`table`]
//! (`kubectl get` columns), [`openapi`] (`kubectl apply`/`explain`), [`protobuf`]
//! (protobuf request bodies, as `kubectl create secret` sends), [`kubelet`] (the
//! simulated node), [`control_plane`] (etcd, kube-apiserver, controller manager and
//! scheduler from their binaries).

pub mod api;
pub mod control_plane;
pub mod http;
pub mod isolate;
pub mod kinds;
pub mod kubelet;
pub mod openapi;
pub mod protobuf;
pub mod select;
pub mod ssa;
pub mod table;
pub mod validate;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
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

/// Installs `crd` (as a client's create would).
pub fn install_crd(cluster: &Cluster, crd: &CustomResourceDefinition) -> Result<(), api::ApiError> {
    let crd_kind = cluster
        .find_kind("apiextensions.k8s.io", "v1", "customresourcedefinitions")
        .expect("CRDs are served");
    let crd = serde_json::to_value(crd).map_err(|e| api::ApiError::bad_request(e.to_string()))?;
    cluster.create(&crd_kind, "", crd, &api::WriteOpts::default())?;
    Ok(())
}

/// Creates `secret` in its namespace (`default` when it names none).
pub fn create_secret(cluster: &Cluster, secret: &Secret) -> Result<(), api::ApiError> {
    let kind = cluster
        .find_kind("", "v1", "secrets")
        .expect("secrets are served");
    let namespace = secret.metadata.namespace.as_deref().unwrap_or("default");
    let body =
        serde_json::to_value(secret).map_err(|e| api::ApiError::bad_request(e.to_string()))?;
    cluster.create(&kind, namespace, body, &api::WriteOpts::default())?;
    Ok(())
}

/// The address of a service URI (`amqp://user:pass@127.0.0.1:5672/vhost`, `amqps://`,
/// `http://`, `https://`) when it is on this machine's loopback: what pods with a network
/// namespace of their own reach through [`Options::forward`].
pub fn loopback_address(uri: &str) -> Option<SocketAddr> {
    let (scheme, rest) = uri.split_once("://")?;
    let authority = rest.split('/').next()?;
    let host_port = authority.rsplit('@').next()?;
    let default_port = match scheme {
        "amqps" => 5671,
        "http" => 80,
        "https" => 443,
        _ => 5672,
    };
    let (host, port) = match host_port
        .rsplit_once(':')
        .filter(|(h, _)| !h.ends_with(':'))
    {
        Some((h, p)) if !h.starts_with('[') || h.ends_with(']') => (h, p.parse().ok()?),
        _ => (host_port, default_port),
    };
    let ip: std::net::IpAddr = match host {
        "localhost" | "" => std::net::Ipv4Addr::LOCALHOST.into(),
        h => h.trim_matches(['[', ']']).parse().ok()?,
    };
    ip.is_loopback().then_some(SocketAddr::new(ip, port))
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

/// What a [`Simulation`] starts with: the resources it installs before anything runs,
/// and how its node runs containers.
#[derive(Clone, Debug)]
pub struct Options {
    /// CustomResourceDefinitions to install (on a real control plane: applied, then
    /// waited for until Established).
    pub crds: Vec<CustomResourceDefinition>,
    /// Secrets to create, each in its namespace (`default` when it names none).
    pub secrets: Vec<Secret>,
    /// The node's durations (backoff, grace periods) are divided by this.
    pub time_scale: f64,
    /// The binary a container's `testrunner-operator` command runs (see
    /// [`kubelet::Config::exe`]).
    pub exe: PathBuf,
    /// Images whose containers run inside a local root filesystem (see
    /// [`kubelet::Config::images`]).
    pub images: BTreeMap<String, PathBuf>,
    /// Repositories of the operator's image (see [`kubelet::Config::operator_images`]);
    /// by default the chart's, `testrunner-operator`.
    pub operator_images: Vec<String>,
    /// Loopback services of this machine that pods with a network namespace of their
    /// own reach (see [`kubelet::Config::forward`]), such as the broker.
    pub forward: Vec<SocketAddr>,
    /// A hollow node: pods are Running and Ready without any process (see
    /// [`kubelet::Config::hollow`]).
    pub hollow: bool,
}

impl Options {
    /// Nothing to install, real time, no root filesystems; `exe` as in [`Options::exe`].
    pub fn new(exe: PathBuf) -> Self {
        Self {
            crds: Vec::new(),
            secrets: Vec::new(),
            time_scale: 1.0,
            exe,
            images: BTreeMap::new(),
            operator_images: vec![OPERATOR_IMAGE.into()],
            forward: Vec::new(),
            hollow: false,
        }
    }

    /// An Opaque Secret `name` (namespace `default`) holding `value` under `key`, for
    /// [`Options::secrets`].
    pub fn string_secret(name: &str, key: &str, value: &str) -> Secret {
        Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            type_: Some("Opaque".into()),
            string_data: Some(BTreeMap::from([(key.to_string(), value.to_string())])),
            ..Default::default()
        }
    }

    /// The simulated node's settings, its pods' directories under `root`.
    fn node(self, root: PathBuf, api_server: Option<SocketAddr>) -> kubelet::Config {
        kubelet::Config {
            time_scale: self.time_scale,
            root,
            exe: self.exe,
            node_name: NODE_NAME.into(),
            images: self.images,
            operator_images: self.operator_images,
            api_server,
            forward: self.forward,
            hollow: self.hollow,
        }
    }
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

/// A whole simulated cluster: an API server and the simulated node.
pub struct Simulation {
    /// The API server.
    pub backend: Backend,
    /// The simulated node.
    pub kubelet: kubelet::Kubelet,
    /// Root of the pods' directories.
    pub root: PathBuf,
    client: kube::Client,
}

/// Name of the simulated node.
pub const NODE_NAME: &str = "simulated-node";
/// The operator image's repository in the chart's and the manifests' defaults.
pub const OPERATOR_IMAGE: &str = "testrunner-operator";

impl Simulation {
    /// Starts the embedded API server on `listen` (port 0 picks one) and the simulated
    /// node, after installing the CRDs and Secrets of `options`.
    pub async fn start(listen: SocketAddr, options: Options) -> std::io::Result<Self> {
        let api = start_api(listen, ServerConfig::default()).await?;
        for crd in &options.crds {
            install_crd(&api.cluster, crd).map_err(|e| std::io::Error::other(e.message))?;
        }
        for secret in &options.secrets {
            create_secret(&api.cluster, secret).map_err(|e| std::io::Error::other(e.message))?;
        }
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
            options.node(root.clone(), None),
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
    /// [`control_plane::ControlPlane`]), applies the CRDs and Secrets of `options`, and
    /// joins the simulated node to it with a node's credentials
    /// (`system:node:simulated-node`). Without a scheduler in `bin_dir`, the node binds
    /// pods itself.
    pub async fn start_on_control_plane(bin_dir: &Path, options: Options) -> Result<Self, String> {
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
        for crd in &options.crds {
            apply_crd(&client, crd).await?;
        }
        for secret in &options.secrets {
            apply_secret(&client, secret).await?;
        }
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
        let api_server = plane
            .url()
            .strip_prefix("https://")
            .and_then(|a| a.parse().ok());
        let kubelet =
            kubelet::Kubelet::start(node, binder, options.node(root.clone(), api_server)).await?;
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

/// Field manager of what a simulation applies.
const MANAGER: &str = "testrunner-simulate";

/// Applies `crd` (server-side apply) and waits until it is Established.
pub async fn apply_crd(
    client: &kube::Client,
    crd: &CustomResourceDefinition,
) -> Result<(), String> {
    let crds: kube::Api<CustomResourceDefinition> = kube::Api::all(client.clone());
    let name = crd.metadata.name.clone().unwrap_or_default();
    crds.patch(
        &name,
        &kube::api::PatchParams::apply(MANAGER).force(),
        &kube::api::Patch::Apply(crd),
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

/// Creates or replaces `secret` (server-side apply) in its namespace (`default` when it
/// names none).
pub async fn apply_secret(client: &kube::Client, secret: &Secret) -> Result<(), String> {
    let namespace = secret.metadata.namespace.as_deref().unwrap_or("default");
    let name = secret.metadata.name.as_deref().unwrap_or_default();
    let secrets: kube::Api<Secret> = kube::Api::namespaced(client.clone(), namespace);
    secrets
        .patch(
            name,
            &kube::api::PatchParams::apply(MANAGER).force(),
            &kube::api::Patch::Apply(secret),
        )
        .await
        .map(|_| ())
        .map_err(|e| format!("failed to write Secret {namespace}/{name}: {e}"))
}

/// What the unit tests share.
#[cfg(test)]
mod fixtures {
    /// A real CRD with a schema, defaults, CEL rules, short names, a status subresource
    /// and printer columns: the repository's `TestRunnerPool` CRD, as committed.
    pub fn pool_crd() -> serde_json::Value {
        serde_saphyr::from_str(include_str!(
            "../../crds/testrunnerpools.testrunner.dev.yaml"
        ))
        .expect("the committed CRD is YAML")
    }
}

#[cfg(test)]
mod tests {
    use super::loopback_address;

    #[test]
    fn loopback_addresses_of_service_uris() {
        let at = |s: &str| Some(s.parse().unwrap());
        assert_eq!(
            loopback_address("amqp://guest:guest@127.0.0.1:5672/%2f"),
            at("127.0.0.1:5672")
        );
        assert_eq!(
            loopback_address("amqps://u:p@localhost/v"),
            at("127.0.0.1:5671")
        );
        assert_eq!(loopback_address("amqp://[::1]:5673/"), at("[::1]:5673"));
        assert_eq!(loopback_address("amqp://u:p@10.0.0.5:5672/%2f"), None);
        assert_eq!(loopback_address("amqp://rabbitmq.ci:5672/%2f"), None);
    }
}
