//! One pod on the simulated node: its directory and volumes, its containers' inputs
//! (environment from Secrets, ConfigMaps and the downward API), and its status, which
//! a writer task sends to `pods/status` (the newest status wins; a failed write is
//! retried).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, ServiceAccount};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use serde_json::{Value, json};
use tokio::sync::watch;

use super::container::{ContainerStatus, Halt, Role, container_loop};
use super::{Config, Key, Stop, pod_dir, pod_key};
use crate::api::now;

/// The pod's state as the node tracks it.
pub(super) struct PodModel {
    pub init: Vec<ContainerStatus>,
    pub main: Vec<ContainerStatus>,
    pub phase: &'static str,
    pub initialized: bool,
    start_time: String,
    /// Each condition's status and when it last changed.
    transitions: BTreeMap<&'static str, (bool, String)>,
}

/// A volume whose files the node writes from API objects.
#[derive(Clone, Debug)]
enum Projection {
    /// A ConfigMap's keys (or the listed items).
    ConfigMap {
        name: String,
        items: Value,
        optional: bool,
    },
    /// A Secret's keys (or the listed items).
    Secret {
        name: String,
        items: Value,
        optional: bool,
    },
    /// Downward API files.
    DownwardApi { items: Value },
    /// A service-account token for the pod.
    Token { path: String, expiration: i64 },
}

/// What one pod run shares between its container loops.
pub(super) struct PodRun {
    pub client: kube::Client,
    pub config: Arc<Config>,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub pod: Value,
    pub dir: PathBuf,
    /// Mount paths and the directories they map to.
    pub mounts: Vec<(String, PathBuf)>,
    /// Each volume's directory on this machine.
    pub volume_dirs: Vec<(String, PathBuf)>,
    /// Volumes written from API objects: name, directory, sources.
    projections: Vec<(String, PathBuf, Vec<Projection>)>,
    pub restart_policy: String,
    /// The pod's network namespace, when it declares container ports (so that two
    /// pods may listen on the same port); else it shares this machine's network.
    pub netns: Option<crate::isolate::NetNs>,
    pub model: Mutex<PodModel>,
    status: watch::Sender<(u64, Option<Value>)>,
    written: watch::Receiver<u64>,
}

/// Why a container's inputs could not be prepared.
pub(super) struct ConfigError(pub String);

impl PodRun {
    /// A Secret's data, decoded as text; `None` when it does not exist.
    async fn secret(&self, name: &str) -> Result<Option<BTreeMap<String, String>>, ConfigError> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        let secret = api
            .get_opt(name)
            .await
            .map_err(|e| ConfigError(format!("failed to read secret {name:?}: {e}")))?;
        Ok(secret.map(|s| {
            s.data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
                .collect()
        }))
    }

    /// A ConfigMap's data; `None` when it does not exist.
    async fn config_map(
        &self,
        name: &str,
    ) -> Result<Option<BTreeMap<String, String>>, ConfigError> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.namespace);
        let cm = api
            .get_opt(name)
            .await
            .map_err(|e| ConfigError(format!("failed to read configmap {name:?}: {e}")))?;
        Ok(cm.map(|c| c.data.unwrap_or_default()))
    }

    /// A downward API value: `metadata.name`, `metadata.labels['k']`, `status.podIP`, ...
    fn field(&self, path: &str) -> Result<String, ConfigError> {
        let meta = &self.pod["metadata"];
        let from_map = |map: &str, rest: &str| -> Option<String> {
            let key = rest.strip_prefix("['")?.strip_suffix("']")?;
            Some(meta[map][key].as_str().unwrap_or_default().to_string())
        };
        let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
        Ok(match path {
            "metadata.name" => self.name.clone(),
            "metadata.namespace" => self.namespace.clone(),
            "metadata.uid" => self.uid.clone(),
            "spec.nodeName" => self.config.node_name.clone(),
            "spec.serviceAccountName" => text(&self.pod["spec"]["serviceAccountName"]),
            "status.podIP" | "status.hostIP" | "status.podIPs" | "status.hostIPs" => {
                "127.0.0.1".into()
            }
            "metadata.labels" | "metadata.annotations" => {
                let map = &meta[path.trim_start_matches("metadata.")];
                map.as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| format!("{k}={v}\n"))
                    .collect()
            }
            other => if let Some(rest) = other.strip_prefix("metadata.labels") {
                from_map("labels", rest)
            } else if let Some(rest) = other.strip_prefix("metadata.annotations") {
                from_map("annotations", rest)
            } else {
                None
            }
            .ok_or_else(|| ConfigError(format!("unsupported fieldRef {other:?}")))?,
        })
    }

    /// Writes every projected volume's files (ConfigMaps, Secrets, downward API,
    /// service-account tokens). Done before every container start and then every
    /// second: the simulation's stand-in for the kubelet's refresh. A missing ConfigMap
    /// or Secret of an optional source leaves its files out; of any other it is an
    /// error (the first one), as a volume a real kubelet cannot mount: the containers
    /// wait for it.
    pub async fn project_volumes(&self) -> Result<(), ConfigError> {
        let mut first = Ok(());
        for (volume, dir, sources) in &self.projections {
            let _ = std::fs::create_dir_all(dir);
            for source in sources {
                if let Err(ConfigError(e)) = self.project(dir, source).await
                    && first.is_ok()
                {
                    first = Err(ConfigError(format!(
                        "MountVolume.SetUp failed for volume {volume:?}: {e}"
                    )));
                }
            }
        }
        first
    }

    async fn project(&self, dir: &std::path::Path, source: &Projection) -> Result<(), ConfigError> {
        let required =
            |data: Option<BTreeMap<String, String>>, what: &str, name: &str, optional: bool| {
                match data {
                    Some(d) => Ok(d),
                    None if optional => Ok(BTreeMap::new()),
                    None => Err(ConfigError(format!("{what} {name:?} not found"))),
                }
            };
        let files: Vec<(String, String)> = match source {
            Projection::ConfigMap {
                name,
                items,
                optional,
            } => select_items(
                required(self.config_map(name).await?, "configmap", name, *optional)?,
                items,
            ),
            Projection::Secret {
                name,
                items,
                optional,
            } => select_items(
                required(self.secret(name).await?, "secret", name, *optional)?,
                items,
            ),
            Projection::DownwardApi { items } => {
                let mut files = Vec::new();
                for item in items.as_array().into_iter().flatten() {
                    let (Some(path), Some(field)) = (
                        item["path"].as_str(),
                        item.pointer("/fieldRef/fieldPath").and_then(Value::as_str),
                    ) else {
                        continue;
                    };
                    files.push((path.to_string(), self.field(field)?));
                }
                files
            }
            Projection::Token { path, expiration } => {
                if dir.join(path).exists() {
                    return Ok(());
                }
                vec![(path.clone(), self.token(*expiration).await?)]
            }
        };
        for (path, content) in files {
            let file = dir.join(&path);
            if let Some(parent) = file.parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            if std::fs::read_to_string(&file).ok().as_deref() != Some(content.as_str()) {
                let _ = std::fs::write(&file, content);
            }
        }
        Ok(())
    }

    /// A token of the pod's service account, bound to the pod (TokenRequest).
    async fn token(&self, expiration: i64) -> Result<String, ConfigError> {
        let sa = self.pod["spec"]["serviceAccountName"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), &self.namespace);
        let request = json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"audiences": [], "expirationSeconds": expiration,
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": self.name, "uid": self.uid}},
        });
        let answer: Value = api
            .create_subresource("token", &sa, &PostParams::default(), &request)
            .await
            .map_err(|e| ConfigError(format!("failed to request a token for {sa:?}: {e}")))?;
        answer
            .pointer("/status/token")
            .and_then(Value::as_str)
            .map(String::from)
            .ok_or_else(|| ConfigError("the token request gave no token".into()))
    }

    /// The container's environment, Secret and ConfigMap references resolved.
    pub async fn environment(
        &self,
        c: &Value,
        map_paths: bool,
    ) -> Result<Vec<(String, String)>, ConfigError> {
        let mut env = Vec::new();
        for src in c["envFrom"].as_array().into_iter().flatten() {
            let prefix = src["prefix"].as_str().unwrap_or_default();
            for (field, what) in [("secretRef", "secret"), ("configMapRef", "configmap")] {
                let Some(name) = src[field]["name"].as_str() else {
                    continue;
                };
                let data = if what == "secret" {
                    self.secret(name).await?
                } else {
                    self.config_map(name).await?
                };
                match data {
                    Some(data) => {
                        env.extend(data.into_iter().map(|(k, v)| (format!("{prefix}{k}"), v)))
                    }
                    None if src[field]["optional"] == true => {}
                    None => return Err(ConfigError(format!("{what} \"{name}\" not found"))),
                }
            }
        }
        for e in c["env"].as_array().into_iter().flatten() {
            let name = e["name"].as_str().unwrap_or_default().to_string();
            if let Some(v) = e["value"].as_str() {
                let v = if map_paths {
                    self.map_path(v)
                } else {
                    v.to_string()
                };
                env.push((name, v));
                continue;
            }
            let from = &e["valueFrom"];
            if let Some(path) = from.pointer("/fieldRef/fieldPath").and_then(Value::as_str) {
                env.push((name, self.field(path)?));
                continue;
            }
            let (what, sel) = if from["secretKeyRef"].is_object() {
                ("secret", &from["secretKeyRef"])
            } else if from["configMapKeyRef"].is_object() {
                ("configmap", &from["configMapKeyRef"])
            } else {
                env.push((name, String::new()));
                continue;
            };
            let obj = sel["name"].as_str().unwrap_or_default();
            let key = sel["key"].as_str().unwrap_or_default();
            let data = if what == "secret" {
                self.secret(obj).await?
            } else {
                self.config_map(obj).await?
            };
            match data.as_ref().and_then(|d| d.get(key)) {
                Some(v) => env.push((name, v.clone())),
                None if sel["optional"] == true => {}
                None if data.is_none() => {
                    return Err(ConfigError(format!("{what} \"{obj}\" not found")));
                }
                None => {
                    let ns = &self.namespace;
                    return Err(ConfigError(format!(
                        "couldn't find key {key} in {what} {ns}/{obj}"
                    )));
                }
            }
        }
        Ok(env)
    }

    /// Sends the current model to the status writer.
    pub fn publish(&self) {
        let mut status = {
            let mut m = self.model.lock().unwrap_or_else(|p| p.into_inner());
            m.status()
        };
        // The API server sets the QoS class at creation, from the resources; it never
        // changes.
        if let Some(qos) = self.pod.pointer("/status/qosClass") {
            status["qosClass"] = qos.clone();
        }
        self.status.send_modify(|(seq, s)| {
            *seq += 1;
            *s = Some(status);
        });
    }

    /// Changes one container's status and publishes.
    pub fn with_container(&self, init: bool, i: usize, f: impl FnOnce(&mut ContainerStatus)) {
        {
            let mut m = self.model.lock().unwrap_or_else(|p| p.into_inner());
            let list = if init { &mut m.init } else { &mut m.main };
            if let Some(c) = list.get_mut(i) {
                f(c);
            }
        }
        self.publish();
    }

    /// Waits (up to ten seconds) until the last published status is written.
    async fn flush(&self) {
        let target = self.status.borrow().0;
        let mut written = self.written.clone();
        let _ =
            tokio::time::timeout(Duration::from_secs(10), written.wait_for(|w| *w >= target)).await;
    }

    /// Maps paths in the container to the pod directory when they lie under a mount:
    /// a whole argument equal to the mount path, and every `<mount>/` inside an
    /// argument that starts a path (at the start, or after a space, `=`, `:`, `;`,
    /// a quote or a parenthesis), so shell scripts can name files in their volumes
    /// while `/etc/testrunner/...` is not mistaken for `/testrunner/...`. Longer
    /// mount paths win.
    pub fn map_path(&self, s: &str) -> String {
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

impl PodModel {
    /// The `status` the node reports, condition transition times kept.
    fn status(&mut self) -> Value {
        // Sidecars' readiness counts as the containers' does.
        let ready = self.initialized
            && !self.main.is_empty()
            && self.main.iter().all(|c| c.ready)
            && self.init.iter().filter(|c| c.sidecar).all(|c| c.ready);
        let t = now();
        let mut conditions = Vec::new();
        for (type_, status) in [
            ("PodReadyToStartContainers", true),
            ("PodScheduled", true),
            ("Initialized", self.initialized),
            ("ContainersReady", ready),
            ("Ready", ready),
        ] {
            let entry = self
                .transitions
                .entry(type_)
                .or_insert_with(|| (status, t.clone()));
            if entry.0 != status {
                *entry = (status, t.clone());
            }
            conditions.push(
                json!({"type": type_, "status": if status { "True" } else { "False" },
                "lastTransitionTime": entry.1}),
            );
        }
        let mut status = json!({
            "phase": self.phase,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
            "startTime": self.start_time,
            "qosClass": "BestEffort",
            "conditions": conditions,
            "containerStatuses": self.main.iter().map(ContainerStatus::to_json).collect::<Vec<_>>(),
        });
        if !self.init.is_empty() {
            status["initContainerStatuses"] = json!(
                self.init
                    .iter()
                    .map(ContainerStatus::to_json)
                    .collect::<Vec<_>>()
            );
        }
        status
    }
}

/// The files a ConfigMap or Secret volume holds: every key, or the listed `items`
/// (key to path).
fn select_items(data: BTreeMap<String, String>, items: &Value) -> Vec<(String, String)> {
    match items.as_array() {
        Some(items) if !items.is_empty() => items
            .iter()
            .filter_map(|i| {
                let key = i["key"].as_str()?;
                let path = i["path"].as_str().unwrap_or(key);
                Some((path.to_string(), data.get(key)?.clone()))
            })
            .collect(),
        _ => data.into_iter().collect(),
    }
}

/// The projections a volume needs, if it is one the node writes from API objects.
fn projections(volume: &Value) -> Option<Vec<Projection>> {
    let items = |v: &Value| v["items"].clone();
    let optional = |v: &Value| v["optional"] == true;
    if let Some(cm) = volume.get("configMap") {
        return Some(vec![Projection::ConfigMap {
            name: cm["name"].as_str().unwrap_or_default().into(),
            items: items(cm),
            optional: optional(cm),
        }]);
    }
    if let Some(s) = volume.get("secret") {
        return Some(vec![Projection::Secret {
            name: s["secretName"].as_str().unwrap_or_default().into(),
            items: items(s),
            optional: optional(s),
        }]);
    }
    if let Some(d) = volume.get("downwardAPI") {
        return Some(vec![Projection::DownwardApi { items: items(d) }]);
    }
    let sources = volume.pointer("/projected/sources")?.as_array()?;
    Some(
        sources
            .iter()
            .filter_map(|s| {
                if let Some(cm) = s.get("configMap") {
                    Some(Projection::ConfigMap {
                        name: cm["name"].as_str().unwrap_or_default().into(),
                        items: items(cm),
                        optional: optional(cm),
                    })
                } else if let Some(sec) = s.get("secret") {
                    Some(Projection::Secret {
                        name: sec["name"].as_str().unwrap_or_default().into(),
                        items: items(sec),
                        optional: optional(sec),
                    })
                } else if let Some(d) = s.get("downwardAPI") {
                    Some(Projection::DownwardApi { items: items(d) })
                } else {
                    s.get("serviceAccountToken").map(|t| Projection::Token {
                        path: t["path"].as_str().unwrap_or("token").into(),
                        expiration: t["expirationSeconds"].as_i64().unwrap_or(3600),
                    })
                }
            })
            .collect(),
    )
}

/// Writes each newest status to `pods/status` until the pod run ends; a failed write
/// is retried (backing off to five seconds) unless a newer status replaces it.
async fn write_statuses(
    api: Api<Pod>,
    name: String,
    mut rx: watch::Receiver<(u64, Option<Value>)>,
    written: watch::Sender<u64>,
) {
    'next: loop {
        let (seq, status) = rx.borrow_and_update().clone();
        if let Some(status) = status {
            let mut delay = Duration::from_millis(100);
            loop {
                let patch = Patch::Merge(json!({"status": status}));
                match api
                    .patch_status(&name, &PatchParams::default(), &patch)
                    .await
                {
                    Ok(_) => break,
                    Err(kube::Error::Api(e)) if e.code == 404 => {
                        let _ = written.send(seq);
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(pod = %name, error = %e, "writing the pod's status failed; retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(5));
                        if rx.has_changed().unwrap_or(false) {
                            continue 'next;
                        }
                    }
                }
            }
        }
        let _ = written.send(seq);
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Deletes a pod for good once its containers stopped: grace period 0, only this uid.
pub(super) async fn delete_for_good(client: kube::Client, key: Key) {
    let (ns, name, uid) = key;
    let api: Api<Pod> = Api::namespaced(client, &ns);
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: Some(uid),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    let mut delay = Duration::from_millis(200);
    for _ in 0..8 {
        match api.delete(&name, &params).await {
            Ok(_) => return,
            Err(kube::Error::Api(e)) if matches!(e.code, 404 | 409) => return,
            Err(e) => {
                tracing::warn!(pod = %name, namespace = %ns, error = %e, "deleting the stopped pod failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Where each volume lives on this machine: API-object volumes and emptyDir in the
/// pod's directory, hostPath volumes at their path.
fn volume_dirs(volumes: &[Value], dir: &std::path::Path) -> Vec<(String, PathBuf)> {
    volumes
        .iter()
        .filter_map(|v| {
            let name = v["name"].as_str()?;
            if let Some(path) = v.pointer("/hostPath/path").and_then(Value::as_str) {
                Some((name.to_string(), PathBuf::from(path)))
            } else {
                Some((name.to_string(), dir.join("volumes").join(name)))
            }
        })
        .collect()
}

/// Each mount path of the pod's containers and the directory it maps to.
fn mounts(spec: &Value, volume_dirs: &[(String, PathBuf)]) -> Vec<(String, PathBuf)> {
    let mut mounts: Vec<(String, PathBuf)> = Vec::new();
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
                && !mounts.iter().any(|(p, _)| p == path)
            {
                mounts.push((path.to_string(), host.clone()));
            }
        }
    }
    mounts
}

impl PodRun {
    fn new(client: kube::Client, config: Arc<Config>, pod: Value) -> Arc<Self> {
        let (ns, name, uid) = pod_key(&pod);
        let dir = pod_dir(&config.root, &ns, &name, &uid);
        let spec = &pod["spec"];
        let volumes = spec["volumes"].as_array().cloned().unwrap_or_default();
        let volume_dirs = volume_dirs(&volumes, &dir);
        let projections = volumes
            .iter()
            .filter_map(|v| {
                let sources = projections(v)?;
                let (name, dir) = volume_dirs.iter().find(|(n, _)| v["name"] == **n)?.clone();
                Some((name, dir, sources))
            })
            .collect();
        let mounts = mounts(spec, &volume_dirs);
        for (_, d) in &volume_dirs {
            let _ = std::fs::create_dir_all(d);
        }
        // emptyDir volumes are writable by every user, as a kubelet makes them.
        for v in &volumes {
            if v.get("emptyDir").is_some()
                && let Some((_, d)) = volume_dirs.iter().find(|(n, _)| v["name"] == **n)
            {
                use std::os::unix::fs::PermissionsExt;
                let _ = std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o777));
            }
        }
        let serves_ports = spec["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["ports"].as_array().is_some_and(|p| !p.is_empty()));
        let netns = if serves_ports && crate::isolate::available() {
            match crate::isolate::NetNs::new(&config.forwarded()) {
                Ok(ns) => Some(ns),
                Err(e) => {
                    tracing::warn!(pod = %name, error = %e, "failed to give the pod a network namespace; it shares this machine's");
                    None
                }
            }
        } else {
            None
        };
        let _ = std::fs::create_dir_all(&dir);
        let list = |field: &str| spec[field].as_array().cloned().unwrap_or_default();
        let (init_specs, main_specs) = (list("initContainers"), list("containers"));
        let waiting = if init_specs.is_empty() {
            "ContainerCreating"
        } else {
            "PodInitializing"
        };
        let (status, status_rx) = watch::channel((0, None));
        let (written_tx, written) = watch::channel(0);
        tokio::spawn(write_statuses(
            Api::namespaced(client.clone(), &ns),
            name.clone(),
            status_rx,
            written_tx,
        ));
        Arc::new(PodRun {
            client,
            config,
            namespace: ns,
            name,
            uid,
            dir,
            mounts,
            volume_dirs,
            projections,
            restart_policy: spec["restartPolicy"]
                .as_str()
                .unwrap_or("Always")
                .to_string(),
            netns,
            model: Mutex::new(PodModel {
                init: init_specs
                    .iter()
                    .map(|c| ContainerStatus::new(c, Role::of_init(c), "PodInitializing"))
                    .collect(),
                main: main_specs
                    .iter()
                    .map(|c| ContainerStatus::new(c, Role::Main, waiting))
                    .collect(),
                phase: "Pending",
                initialized: init_specs.is_empty(),
                start_time: now(),
                transitions: BTreeMap::new(),
            }),
            pod,
            status,
            written,
        })
    }
}

/// A sidecar's container loop and what stops it.
struct Sidecar {
    halt: watch::Sender<Halt>,
    task: tokio::task::JoinHandle<bool>,
}

/// Runs a pod: init containers in order, each sidecar among them started (and left
/// running) before the next one, then its containers; once they are all done (or the
/// pod stops), the sidecars stop, the last declared first. Then the pod stays until it
/// is deleted (then deletes it for good) or the node shuts down.
pub(super) async fn run_pod(
    client: kube::Client,
    config: Arc<Config>,
    pod: Value,
    mut stop: watch::Receiver<Stop>,
) {
    let key = pod_key(&pod);
    let run = PodRun::new(client.clone(), config.clone(), pod.clone());
    run.publish();
    // Volumes from API objects are refreshed every second while the pod runs.
    if !run.projections.is_empty() {
        let weak = Arc::downgrade(&run);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    // A volume that cannot be written yet is reported where a container
                    // starts; the refresh just tries again.
                    Some(run) => {
                        let _ = run.project_volumes().await;
                    }
                    None => return,
                }
            }
        });
    }
    // The pod's stop becomes one deadline for all its containers: its grace period from
    // when the stop came (two seconds when the node shuts down). A later, shorter grace
    // period brings the deadline nearer.
    let (halt_tx, halt) = watch::channel::<Halt>(None);
    let forward = {
        let mut stop = stop.clone();
        let config = config.clone();
        tokio::spawn(async move {
            while let Ok(grace) = stop.wait_for(Option::is_some).await.map(|g| g.unwrap_or(0)) {
                let budget = if grace < 0 {
                    Duration::from_secs(2)
                } else {
                    config.scaled(Duration::from_secs(grace as u64))
                };
                let deadline = tokio::time::Instant::now() + budget;
                halt_tx.send_if_modified(|h| match h {
                    Some(d) if *d <= deadline => false,
                    _ => {
                        *h = Some(deadline);
                        true
                    }
                });
                if stop.changed().await.is_err() {
                    break;
                }
            }
            // Keeps the deadline for the sidecars until the pod run ends.
            std::future::pending::<()>().await
        })
    };
    let spec = &pod["spec"];
    let list = |field: &str| spec[field].as_array().cloned().unwrap_or_default();
    let mut sidecars: Vec<Sidecar> = Vec::new();
    let mut initialized = true;
    for (i, c) in list("initContainers").into_iter().enumerate() {
        if halt.borrow().is_some() {
            initialized = false;
            break;
        }
        let role = Role::of_init(&c);
        if role == Role::Init {
            if !container_loop(run.clone(), c, role, i, halt.clone(), None).await {
                initialized = false;
                break;
            }
            continue;
        }
        let (sidecar_halt, halted) = watch::channel::<Halt>(None);
        let (started_tx, mut started) = watch::channel(false);
        let task = tokio::spawn(container_loop(
            run.clone(),
            c,
            role,
            i,
            halted,
            Some(Arc::new(started_tx)),
        ));
        sidecars.push(Sidecar {
            halt: sidecar_halt,
            task,
        });
        let mut halt = halt.clone();
        let up = tokio::select! {
            up = started.wait_for(|s| *s) => up.is_ok(),
            _ = halt.wait_for(Option::is_some) => false,
        };
        if !up {
            initialized = false;
            break;
        }
    }
    let mut outcome = None;
    if initialized && halt.borrow().is_none() {
        {
            let mut m = run.model.lock().unwrap_or_else(|p| p.into_inner());
            m.initialized = true;
            m.phase = "Running";
        }
        run.publish();
        let loops = list("containers")
            .into_iter()
            .enumerate()
            .map(|(i, c)| container_loop(run.clone(), c, Role::Main, i, halt.clone(), None));
        let results = futures::future::join_all(loops).await;
        outcome = Some(results.iter().all(|r| *r));
    }
    // The containers are done, or the pod stops: the sidecars stop, each once the ones
    // declared after it have exited, within the pod's deadline (or, when the containers
    // finished by themselves, within its grace period from now).
    let mut deadline = halt.borrow().unwrap_or_else(|| {
        let grace = spec["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
        tokio::time::Instant::now() + config.scaled(Duration::from_secs(grace))
    });
    let mut pod_halt = halt.clone();
    for mut sidecar in sidecars.into_iter().rev() {
        let _ = sidecar.halt.send(Some(deadline));
        loop {
            tokio::select! {
                _ = &mut sidecar.task => break,
                // A shorter grace period for the pod meanwhile.
                Ok(()) = pod_halt.changed() => {
                    if let Some(d) = *pod_halt.borrow_and_update() && d < deadline {
                        deadline = d;
                        let _ = sidecar.halt.send(Some(deadline));
                    }
                }
            }
        }
    }
    if halt.borrow().is_none() {
        let phase = match outcome {
            Some(true) => "Succeeded",
            // An init container failed for good, or a container did.
            _ => "Failed",
        };
        run.model.lock().unwrap_or_else(|p| p.into_inner()).phase = phase;
    }
    run.publish();
    // Stay until deleted; then the final status, and the pod goes for good.
    let _ = stop.wait_for(Option::is_some).await;
    forward.abort();
    let shutting_down = *stop.borrow() == Some(-1);
    run.flush().await;
    if !shutting_down {
        delete_for_good(client, key.clone()).await;
    }
    let _ = std::fs::remove_dir_all(&run.dir);
    tracing::info!(pod = %key.1, namespace = %key.0, "pod stopped");
}

/// Runs a pod on a hollow node (see [`Config::hollow`]): it is Running and Ready at
/// once, its init containers completed and its sidecars up, and no process starts. On
/// its stop it goes for good at once, whatever its grace period.
pub(super) async fn run_hollow_pod(
    client: kube::Client,
    pod: Value,
    mut stop: watch::Receiver<Stop>,
) {
    let key = pod_key(&pod);
    let t = now();
    let running = |c: &Value, role: Role| {
        let mut s = ContainerStatus::new(c, role, "ContainerCreating");
        s.state = json!({"running": {"startedAt": t}});
        s.ready = true;
        s.started = true;
        s
    };
    let list = |field: &str| pod["spec"][field].as_array().cloned().unwrap_or_default();
    let init = list("initContainers")
        .iter()
        .map(|c| match Role::of_init(c) {
            Role::Init => {
                let mut s = ContainerStatus::new(c, Role::Init, "PodInitializing");
                s.state = json!({"terminated": {"exitCode": 0, "reason": "Completed",
                    "startedAt": t, "finishedAt": t}});
                s
            }
            role => running(c, role),
        })
        .collect();
    let main = list("containers")
        .iter()
        .map(|c| running(c, Role::Main))
        .collect();
    let mut model = PodModel {
        init,
        main,
        phase: "Running",
        initialized: true,
        start_time: t.clone(),
        transitions: BTreeMap::new(),
    };
    let api: Api<Pod> = Api::namespaced(client.clone(), &key.0);
    let patch = Patch::Merge(json!({"status": model.status()}));
    let params = PatchParams::default();
    let mut delay = Duration::from_millis(100);
    loop {
        tokio::select! {
            written = api.patch_status(&key.1, &params, &patch) => match written {
                Ok(_) => break,
                Err(kube::Error::Api(e)) if e.code == 404 => return,
                Err(e) => {
                    tracing::warn!(pod = %key.1, error = %e, "writing the hollow pod's status failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            },
            _ = async { stop.wait_for(Option::is_some).await.is_ok() } => break,
        }
    }
    let _ = stop.wait_for(Option::is_some).await;
    let shutting_down = *stop.borrow() == Some(-1);
    if !shutting_down {
        delete_for_good(client, key).await;
    }
}
