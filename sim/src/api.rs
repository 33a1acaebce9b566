//! The object store of the simulated API server: one resourceVersion counter for all
//! objects, a bounded history of changes for watches, optimistic concurrency, patches,
//! server-side apply, validation of custom resources, graceful deletion and garbage
//! collection of dependents.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{Value, json};
use tokio::sync::broadcast;

use super::kinds::{self, Kind};
use super::ssa::{self, Scope};
use super::validate;

/// A failed request, rendered as a Kubernetes `Status`.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    /// HTTP status code.
    pub code: u16,
    /// Machine-readable reason (`NotFound`, `Conflict`, `Invalid`, ...).
    pub reason: &'static str,
    /// Human-readable message.
    pub message: String,
    /// `details` of the Status.
    pub details: Option<Value>,
}

impl ApiError {
    /// A Status without details.
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    fn with_details(mut self, kind: &Kind, name: &str) -> Self {
        self.details = Some(json!({"name": name, "group": kind.group, "kind": kind.plural}));
        self
    }

    /// 404 for a missing object.
    pub fn not_found(kind: &Kind, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", kind.qualified()),
        )
        .with_details(kind, name)
    }

    /// 422 Invalid, naming each invalid field as the API server does.
    pub fn invalid(kind: &Kind, name: &str, causes: &[validate::Cause]) -> Self {
        let text: Vec<String> = causes
            .iter()
            .map(|c| format!("{}: {}", c.field, c.message))
            .collect();
        let message = if text.len() == 1 {
            text[0].clone()
        } else {
            format!("[{}]", text.join(", "))
        };
        let mut err = Self::new(
            422,
            "Invalid",
            format!("{} \"{name}\" is invalid: {message}", kind.kind),
        );
        err.details = Some(json!({
            "name": name,
            "group": kind.group,
            "kind": kind.kind,
            "causes": causes.iter().map(|c| json!({"reason": c.reason, "message": c.message, "field": c.field})).collect::<Vec<_>>(),
        }));
        err
    }

    /// 400.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    /// The Status object.
    pub fn status(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(d) = &self.details {
            s["details"] = d.clone();
        }
        s
    }
}

/// One change to the store, as a watch delivers it.
#[derive(Clone, Debug)]
pub struct Change {
    /// The resourceVersion the change produced.
    pub rv: u64,
    /// The store the object lives in (`pods`, `events`, ...).
    pub storage: String,
    /// Namespace ("" for cluster-scoped objects).
    pub namespace: String,
    /// ADDED, MODIFIED or DELETED.
    pub type_: &'static str,
    /// The object after the change (for DELETED: its last state), in stored form.
    pub object: Value,
    /// The object before the change.
    pub old: Option<Value>,
}

/// Options of a write request.
#[derive(Clone, Debug, Default)]
pub struct WriteOpts {
    /// `fieldManager`.
    pub field_manager: Option<String>,
    /// `dryRun=All`.
    pub dry_run: bool,
    /// `force` (server-side apply).
    pub force: bool,
    /// `fieldValidation=Strict`.
    pub strict: bool,
}

/// The outcome of a write.
#[derive(Clone, Debug)]
pub struct Written {
    /// The object as stored, in the requested view.
    pub object: Value,
    /// Whether it was created.
    pub created: bool,
    /// Warnings (unknown fields pruned).
    pub warnings: Vec<String>,
}

/// The outcome of a deletion.
#[derive(Clone, Debug)]
pub struct Deleted {
    /// The object's last state, in the requested view.
    pub object: Value,
    /// True when it is gone; false while finalizers or a grace period keep it.
    pub gone: bool,
}

/// A patch body by content type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchType {
    /// `application/merge-patch+json` (and strategic merge, approximated by it).
    Merge,
    /// `application/json-patch+json`.
    Json,
    /// `application/apply-patch+yaml`.
    Apply,
}

/// Deletion options.
#[derive(Clone, Debug, Default)]
pub struct DeleteOpts {
    /// `gracePeriodSeconds`.
    pub grace: Option<i64>,
    /// `propagationPolicy=Orphan`.
    pub orphan: bool,
    /// `dryRun=All`.
    pub dry_run: bool,
    /// `preconditions.uid`: delete only the object with this uid.
    pub uid: Option<String>,
}

type Key = (String, String, String);

/// The start of a watch: the events to send first, the live subscription, and the
/// resourceVersion it starts at.
pub type WatchStart = (Vec<Arc<Change>>, broadcast::Receiver<Arc<Change>>, u64);

struct State {
    rv: u64,
    kinds: Vec<Arc<Kind>>,
    objects: BTreeMap<Key, Value>,
    history: VecDeque<Arc<Change>>,
    history_limit: usize,
    compacted: u64,
}

/// The simulated cluster's API state. Cheap to share behind an `Arc`.
pub struct Cluster {
    state: Mutex<State>,
    tx: broadcast::Sender<Arc<Change>>,
    logs: Mutex<Option<LogLocator>>,
}

/// Finds the log file of a container: (namespace, pod, pod uid, container).
pub type LogLocator = Arc<dyn Fn(&str, &str, &str, &str) -> std::path::PathBuf + Send + Sync>;

/// Now, to the second, RFC 3339.
pub fn now() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| jiff::Timestamp::now().to_string())
}

fn random_string(n: usize, alphabet: &[u8]) -> String {
    use rand::RngExt;
    let mut rng = rand::rng();
    (0..n)
        .map(|_| alphabet[rng.random_range(0..alphabet.len())] as char)
        .collect()
}

fn new_uid() -> String {
    let h = random_string(32, b"0123456789abcdef");
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..]
    )
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// The object without server-maintained bookkeeping, to tell a no-op write.
fn essence(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("resourceVersion");
        if let Some(Value::Array(mf)) = meta.get_mut("managedFields") {
            for e in mf {
                if let Some(e) = e.as_object_mut() {
                    e.remove("time");
                }
            }
        }
    }
    v
}

/// Everything but metadata and status: a change there bumps `metadata.generation`.
fn spec_part(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
        m.remove("apiVersion");
        m.remove("kind");
    }
    v
}

/// What a real API server does to a Secret on every write (create, update, patch, apply):
/// `stringData` is merged into `data` (base64), a key in both taking the `stringData`
/// value, and is never stored nor returned; an empty `type` defaults to `Opaque`. Other
/// kinds are left as they are.
fn merge_string_data(kind: &Kind, obj: &mut Value) -> Result<(), ApiError> {
    if !(kind.group.is_empty() && kind.kind == "Secret") {
        return Ok(());
    }
    let Some(map) = obj.as_object_mut() else {
        return Ok(());
    };
    if map
        .get("type")
        .is_none_or(|t| t.is_null() || t.as_str() == Some(""))
    {
        map.insert("type".into(), json!("Opaque"));
    }
    let cannot = |why: String| {
        ApiError::bad_request(format!(
            "Secret in version \"v1\" cannot be handled as a Secret: {why}"
        ))
    };
    let entries = match map.remove("stringData") {
        None | Some(Value::Null) => return Ok(()),
        Some(Value::Object(entries)) => entries,
        Some(other) => return Err(cannot(format!("stringData must be an object, not {other}"))),
    };
    if entries.is_empty() {
        return Ok(());
    }
    let data = map
        .entry("data")
        .and_modify(|d| {
            if d.is_null() {
                *d = json!({});
            }
        })
        .or_insert_with(|| json!({}));
    let Some(data) = data.as_object_mut() else {
        return Err(cannot(format!("data must be an object, not {data}")));
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    for (key, value) in entries {
        let Value::String(text) = value else {
            return Err(cannot(format!(
                "stringData.{key} must be a string, not {value}"
            )));
        };
        data.insert(key, Value::String(base64::Engine::encode(&b64, text)));
    }
    Ok(())
}

/// The label a real server keeps on every namespace, on every write: its name.
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Sets [`NAMESPACE_NAME_LABEL`] on a Namespace (`obj` has its final name); other kinds
/// are left as they are.
fn label_namespace(kind: &Kind, obj: &mut Value) {
    if !(kind.group.is_empty() && kind.kind == "Namespace") {
        return;
    }
    let name = new_name(obj);
    let meta = &mut obj["metadata"];
    if !meta["labels"].is_object() {
        meta["labels"] = json!({});
    }
    meta["labels"][NAMESPACE_NAME_LABEL] = json!(name);
}

/// Parses a request body: JSON, or YAML for server-side apply.
pub fn parse_body(body: &[u8], yaml: bool) -> Result<Value, ApiError> {
    let parsed: Result<Value, String> = match serde_json::from_slice(body) {
        Ok(v) => Ok(v),
        Err(e) if yaml => {
            let text = std::str::from_utf8(body)
                .map_err(|u| ApiError::bad_request(format!("body is not UTF-8: {u}")))?;
            serde_saphyr::from_str::<Value>(text).map_err(|y| format!("{y} (as JSON: {e})"))
        }
        Err(e) => Err(e.to_string()),
    };
    parsed.map_err(|e| ApiError::bad_request(format!("the request body could not be decoded: {e}")))
}

impl Cluster {
    /// An empty cluster with the built-in kinds; watches can resume from the last
    /// `history_limit` changes.
    pub fn new(history_limit: usize) -> Arc<Self> {
        let (tx, _) = broadcast::channel(4096);
        Arc::new(Self {
            state: Mutex::new(State {
                rv: 1,
                kinds: kinds::builtins().into_iter().map(Arc::new).collect(),
                objects: BTreeMap::new(),
                history: VecDeque::new(),
                history_limit: history_limit.max(1),
                compacted: 0,
            }),
            tx,
            logs: Mutex::new(None),
        })
    }

    /// Where the kubelet keeps container logs (for `kubectl logs`).
    pub fn set_log_locator(&self, locator: LogLocator) {
        *self.logs.lock().unwrap_or_else(|p| p.into_inner()) = Some(locator);
    }

    /// The log file of `container` of `pod` (stored form), if a kubelet runs.
    pub fn log_path(&self, pod: &Value, container: &str) -> Option<std::path::PathBuf> {
        let locator = self
            .logs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        let meta = &pod["metadata"];
        Some(locator(
            meta["namespace"].as_str().unwrap_or_default(),
            meta["name"].as_str().unwrap_or_default(),
            meta["uid"].as_str().unwrap_or_default(),
            container,
        ))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// All served kinds.
    pub fn kinds(&self) -> Vec<Arc<Kind>> {
        self.lock().kinds.clone()
    }

    /// The kind served at `group/version` under `plural`.
    pub fn find_kind(&self, group: &str, version: &str, plural: &str) -> Option<Arc<Kind>> {
        self.lock()
            .kinds
            .iter()
            .find(|k| k.group == group && k.version == version && k.plural == plural)
            .cloned()
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    /// Drops the watch history, as an etcd compaction does: watches from any earlier
    /// resourceVersion get 410 Gone.
    pub fn compact(&self) {
        let mut st = self.lock();
        st.history.clear();
        st.compacted = st.rv;
    }

    /// Open watch streams (and other subscribers).
    pub fn watcher_count(&self) -> usize {
        self.tx.receiver_count()
    }

    /// A raw subscription to every change.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        self.tx.subscribe()
    }

    /// Reads one object.
    pub fn get(&self, kind: &Kind, ns: &str, name: &str) -> Result<Value, ApiError> {
        let st = self.lock();
        let ns = if kind.namespaced { ns } else { "" };
        st.objects
            .get(&(kind.storage.clone(), ns.to_string(), name.to_string()))
            .map(|o| kind.to_view(o.clone()))
            .ok_or_else(|| ApiError::not_found(kind, name))
    }

    /// Objects of a store, in stored form (for the kubelet).
    pub fn stored(&self, storage: &str) -> Vec<Value> {
        self.lock()
            .objects
            .iter()
            .filter(|((s, _, _), _)| s == storage)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Lists objects (`ns` None: all namespaces) with the current resourceVersion.
    pub fn list(&self, kind: &Kind, ns: Option<&str>) -> (Vec<Value>, u64) {
        self.list_where(kind, ns, |_| true)
    }

    /// Lists the objects that `keep` (given each in its served form) selects. Only the
    /// objects of the kind (and namespace) are visited, and only the selected ones are
    /// copied: a label-selected list in one namespace costs what it returns, not what
    /// the cluster holds.
    pub fn list_where(
        &self,
        kind: &Kind,
        ns: Option<&str>,
        keep: impl Fn(&Value) -> bool,
    ) -> (Vec<Value>, u64) {
        let st = self.lock();
        // Keys sort by (storage, namespace, name): one namespace, or one storage, is
        // one range. "\0" sorts right after the prefix and before any longer name.
        let (from, to): (Key, Key) = match ns {
            Some(ns) => (
                (kind.storage.clone(), ns.to_string(), String::new()),
                (kind.storage.clone(), format!("{ns}\0"), String::new()),
            ),
            None => (
                (kind.storage.clone(), String::new(), String::new()),
                (format!("{}\0", kind.storage), String::new(), String::new()),
            ),
        };
        let items = st
            .objects
            .range(from..to)
            .filter_map(|(_, v)| {
                if kind.view_is_stored() {
                    keep(v).then(|| kind.to_view(v.clone()))
                } else {
                    Some(kind.to_view(v.clone())).filter(|o| keep(o))
                }
            })
            .collect();
        (items, st.rv)
    }

    /// Starts a watch: the events to send first (a synthetic ADDED per object when `rv`
    /// is absent or "0" or when initial events are asked for; otherwise the history
    /// after `rv`), and the live subscription. Both are unfiltered.
    pub fn watch(
        &self,
        kind: &Kind,
        rv: Option<&str>,
        send_initial: bool,
    ) -> Result<WatchStart, ApiError> {
        let st = self.lock();
        let rx = self.tx.subscribe();
        let rv = rv.filter(|r| !r.is_empty());
        let from =
            match rv {
                None | Some("0") => None,
                Some(r) => Some(r.parse::<u64>().map_err(|_| {
                    ApiError::bad_request(format!("invalid resource version {r:?}"))
                })?),
            };
        let mut first = Vec::new();
        match from {
            Some(n) if !send_initial => {
                if n < st.compacted {
                    return Err(ApiError::new(
                        410,
                        "Expired",
                        format!("too old resource version: {n} ({})", st.compacted),
                    ));
                }
                first.extend(
                    st.history
                        .iter()
                        .filter(|c| c.rv > n && c.storage == kind.storage)
                        .cloned(),
                );
            }
            _ => {
                for ((s, ns, _), v) in &st.objects {
                    if *s == kind.storage {
                        first.push(Arc::new(Change {
                            rv: st.rv,
                            storage: s.clone(),
                            namespace: ns.clone(),
                            type_: "ADDED",
                            object: v.clone(),
                            old: None,
                        }));
                    }
                }
            }
        }
        Ok((first, rx, st.rv))
    }

    fn record(&self, st: &mut State, change: Change) {
        let change = Arc::new(change);
        st.history.push_back(change.clone());
        while st.history.len() > st.history_limit {
            if let Some(c) = st.history.pop_front() {
                st.compacted = c.rv;
            }
        }
        let _ = self.tx.send(change);
    }

    fn check_namespace(st: &State, kind: &Kind, ns: &str) -> Result<(), ApiError> {
        if kind.namespaced
            && !st
                .objects
                .contains_key(&("namespaces".into(), String::new(), ns.into()))
        {
            let ns_kind = st
                .kinds
                .iter()
                .find(|k| k.plural == "namespaces")
                .expect("namespaces kind");
            return Err(ApiError::not_found(ns_kind, ns));
        }
        Ok(())
    }

    /// Validates a custom resource, fills defaults, prunes unknown fields.
    fn admit(
        kind: &Kind,
        obj: &mut Value,
        old: Option<&Value>,
        opts: &WriteOpts,
    ) -> Result<Vec<String>, ApiError> {
        let Some(schema) = &kind.schema else {
            return Ok(Vec::new());
        };
        let name = obj
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let unknown = validate::normalize(schema, obj);
        if opts.strict && !unknown.is_empty() {
            let list: Vec<String> = unknown
                .iter()
                .map(|u| format!("unknown field \"{u}\""))
                .collect();
            return Err(ApiError::bad_request(format!(
                "{} in version \"{}\" cannot be handled as a {}: strict decoding error: {}",
                kind.kind,
                kind.version,
                kind.kind,
                list.join(", ")
            )));
        }
        let causes = validate::validate(schema, obj, old);
        if !causes.is_empty() {
            return Err(ApiError::invalid(kind, &name, &causes));
        }
        Ok(unknown
            .into_iter()
            .map(|u| format!("unknown field \"{u}\""))
            .collect())
    }

    /// Creates an object (`body` in the view of `kind`).
    pub fn create(
        &self,
        kind: &Kind,
        ns: &str,
        body: Value,
        opts: &WriteOpts,
    ) -> Result<Written, ApiError> {
        let mut st = self.lock();
        self.create_locked(&mut st, kind, ns, body, opts, None)
    }

    fn create_locked(
        &self,
        st: &mut State,
        kind: &Kind,
        ns: &str,
        body: Value,
        opts: &WriteOpts,
        applied: Option<&Value>,
    ) -> Result<Written, ApiError> {
        if !body.is_object() {
            return Err(ApiError::bad_request("the request body must be an object"));
        }
        let ns = if kind.namespaced { ns } else { "" };
        let mut obj = kind.to_storage(body);
        if let Some(body_ns) = obj.pointer("/metadata/namespace").and_then(Value::as_str)
            && kind.namespaced
            && !body_ns.is_empty()
            && body_ns != ns
        {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        Self::check_namespace(st, kind, ns)?;
        check_metadata(&obj)?;
        if obj.get("metadata").is_none() {
            obj["metadata"] = json!({});
        }
        let mut name = obj
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if name.is_empty() {
            let Some(prefix) = obj
                .pointer("/metadata/generateName")
                .and_then(Value::as_str)
            else {
                return Err(ApiError::new(
                    422,
                    "Invalid",
                    format!(
                        "{} \"\" is invalid: metadata.name: Required value: name or generateName is required",
                        kind.kind
                    ),
                ));
            };
            loop {
                name = format!(
                    "{prefix}{}",
                    random_string(5, b"bcdfghjklmnpqrstvwxz2456789")
                );
                if !st
                    .objects
                    .contains_key(&(kind.storage.clone(), ns.into(), name.clone()))
                {
                    break;
                }
            }
        }
        if !valid_name(&name) {
            return Err(ApiError::new(
                422,
                "Invalid",
                format!(
                    "{} \"{name}\" is invalid: metadata.name: Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
                    kind.kind
                ),
            ));
        }
        let key = (kind.storage.clone(), ns.to_string(), name.clone());
        if st.objects.contains_key(&key) {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", kind.qualified()),
            )
            .with_details(kind, &name));
        }
        if kind.status
            && kind.schema.is_some()
            && let Some(m) = obj.as_object_mut()
        {
            m.remove("status");
        }
        let now = now();
        {
            let meta = obj["metadata"].as_object_mut().expect("metadata object");
            meta.insert("name".into(), json!(name));
            if kind.namespaced {
                meta.insert("namespace".into(), json!(ns));
            } else {
                meta.remove("namespace");
            }
            meta.insert("uid".into(), json!(new_uid()));
            meta.insert("creationTimestamp".into(), json!(now));
            meta.insert("generation".into(), json!(1));
            for k in [
                "resourceVersion",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "managedFields",
                "selfLink",
            ] {
                meta.remove(k);
            }
        }
        if kind.kind == "Pod" && kind.group.is_empty() {
            let containers = obj.pointer("/spec/containers").and_then(Value::as_array);
            let named = containers.is_some_and(|cs| {
                !cs.is_empty()
                    && cs
                        .iter()
                        .all(|c| c["name"].as_str().is_some_and(|n| !n.is_empty()))
            });
            if !named {
                return Err(ApiError::new(
                    422,
                    "Invalid",
                    format!(
                        "Pod \"{name}\" is invalid: spec.containers: Required value: every container needs a name"
                    ),
                ));
            }
            let causes = validate::pod_spec(&obj["spec"]);
            if !causes.is_empty() {
                return Err(ApiError::invalid(kind, &name, &causes));
            }
        }
        label_namespace(kind, &mut obj);
        match kind.kind.as_str() {
            "Pod" if kind.group.is_empty() => {
                obj["status"] = json!({"phase": "Pending", "qosClass": "BestEffort"})
            }
            "Namespace" => obj["status"] = json!({"phase": "Active"}),
            _ => {}
        }
        merge_string_data(kind, &mut obj)?;
        let warnings = Self::admit(kind, &mut obj, None, opts)?;
        let api_version = kind.api_version();
        let manager = opts
            .field_manager
            .clone()
            .unwrap_or_else(|| "unknown".into());
        let scope = if kind.status { Scope::Main } else { Scope::All };
        let w = ssa::Write {
            manager: &manager,
            api_version: &api_version,
            scope,
            now: &now,
        };
        match applied {
            Some(config) => {
                obj = ssa::apply(&obj, config, &w, true).unwrap_or(obj);
                // The applied configuration is already merged; only ownership is new
                // (and the configuration's stringData, merged again).
                merge_string_data(kind, &mut obj)?;
            }
            None => ssa::record_update(None, &mut obj, &w),
        }
        if kind.plural == "customresourcedefinitions" {
            let defined = kinds::from_crd(&obj).map_err(|e| {
                ApiError::new(
                    422,
                    "Invalid",
                    format!("CustomResourceDefinition \"{name}\" is invalid: {e}"),
                )
            })?;
            if !opts.dry_run {
                for k in defined {
                    st.kinds.retain(|old| {
                        !(old.group == k.group
                            && old.version == k.version
                            && old.plural == k.plural)
                    });
                    st.kinds.push(Arc::new(k));
                }
            }
        }
        if opts.dry_run {
            return Ok(Written {
                object: kind.to_view(obj),
                created: true,
                warnings,
            });
        }
        st.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        st.objects.insert(key, obj.clone());
        let change = Change {
            rv: st.rv,
            storage: kind.storage.clone(),
            namespace: ns.into(),
            type_: "ADDED",
            object: obj.clone(),
            old: None,
        };
        self.record(st, change);
        // As the garbage collector would: a dependent whose owners are all gone (its
        // owner was deleted while the request was in flight) is deleted.
        let owners: Vec<String> = obj
            .pointer("/metadata/ownerReferences")
            .and_then(Value::as_array)
            .map(|refs| {
                refs.iter()
                    .filter_map(|r| r["uid"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        let orphaned = !owners.is_empty()
            && !st.objects.values().any(|o| {
                o.pointer("/metadata/uid")
                    .and_then(Value::as_str)
                    .is_some_and(|u| owners.iter().any(|w| w == u))
            });
        if orphaned {
            self.delete_locked(st, &kind.storage, &obj, DeleteOpts::default());
            if let Some(now) = st
                .objects
                .get(&(kind.storage.clone(), ns.to_string(), name.clone()))
            {
                obj = now.clone();
            }
        }
        Ok(Written {
            object: kind.to_view(obj),
            created: true,
            warnings,
        })
    }

    /// Replaces an object (`status`: the status subresource).
    pub fn update(
        &self,
        kind: &Kind,
        ns: &str,
        name: &str,
        body: Value,
        status: bool,
        opts: &WriteOpts,
    ) -> Result<Written, ApiError> {
        let mut st = self.lock();
        let ns = if kind.namespaced { ns } else { "" };
        let key = (kind.storage.clone(), ns.to_string(), name.to_string());
        let Some(old) = st.objects.get(&key).cloned() else {
            return Err(ApiError::not_found(kind, name));
        };
        if !body.is_object() {
            return Err(ApiError::bad_request("the request body must be an object"));
        }
        let body = kind.to_storage(body);
        if let Some(body_name) = body.pointer("/metadata/name").and_then(Value::as_str)
            && body_name != name
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        if let Some(rv) = body
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            && !rv.is_empty()
            && Some(rv)
                != old
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str)
        {
            return Err(conflict(kind, name));
        }
        let scope = scope_of(kind, status);
        let new = merge_scope(&old, body, scope);
        self.commit(&mut st, kind, key, old, new, scope, opts, false)
    }

    /// Patches an object; server-side apply creates it when absent.
    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &self,
        kind: &Kind,
        ns: &str,
        name: &str,
        ptype: PatchType,
        body: Value,
        status: bool,
        opts: &WriteOpts,
    ) -> Result<Written, ApiError> {
        let mut st = self.lock();
        let ns = if kind.namespaced { ns } else { "" };
        let key = (kind.storage.clone(), ns.to_string(), name.to_string());
        let scope = scope_of(kind, status);
        let old = st.objects.get(&key).cloned();
        let manager = opts.field_manager.clone();
        match ptype {
            PatchType::Apply => {
                let Some(manager) = manager else {
                    return Err(ApiError::bad_request(
                        "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
                    ));
                };
                if !body.is_object() {
                    return Err(ApiError::bad_request(
                        "the apply configuration must be an object",
                    ));
                }
                for (field, want) in [
                    ("apiVersion", kind.api_version()),
                    ("kind", kind.kind.clone()),
                ] {
                    if body.get(field).and_then(Value::as_str) != Some(want.as_str()) {
                        return Err(ApiError::bad_request(format!(
                            "invalid object: {field} must be {want:?} for this resource"
                        )));
                    }
                }
                if let Some(n) = body.pointer("/metadata/name").and_then(Value::as_str)
                    && n != name
                {
                    return Err(ApiError::bad_request(format!(
                        "the name of the object ({n}) does not match the name on the URL ({name})"
                    )));
                }
                let config = kind.to_storage(body);
                let Some(old) = old else {
                    if status {
                        return Err(ApiError::not_found(kind, name));
                    }
                    let mut fresh = config.clone();
                    fresh["metadata"]["name"] = json!(name);
                    let opts = WriteOpts {
                        field_manager: Some(manager.clone()),
                        ..opts.clone()
                    };
                    return self.create_locked(&mut st, kind, ns, fresh, &opts, Some(&config));
                };
                let api_version = kind.api_version();
                let now = now();
                let w = ssa::Write {
                    manager: &manager,
                    api_version: &api_version,
                    scope,
                    now: &now,
                };
                let new = ssa::apply(&old, &config, &w, opts.force).map_err(|conflicts| {
                    let fields: Vec<String> = conflicts
                        .iter()
                        .map(|c| format!("conflict with \"{}\": {}", c.manager, c.field))
                        .collect();
                    let mut e = ApiError::new(
                        409,
                        "Conflict",
                        format!("Apply failed with {} conflict{}: {}", conflicts.len(), if conflicts.len() == 1 { "" } else { "s" }, fields.join("; ")),
                    );
                    // As a real server: the details hold the causes only.
                    e.details = Some(json!({
                        "causes": conflicts.iter().map(|c| json!({"reason": "FieldManagerConflict", "message": format!("conflict with \"{}\"", c.manager), "field": c.field})).collect::<Vec<_>>(),
                    }));
                    e
                })?;
                self.commit(&mut st, kind, key, old, new, scope, opts, true)
            }
            PatchType::Merge | PatchType::Json => {
                let Some(old) = old else {
                    return Err(ApiError::not_found(kind, name));
                };
                let viewed = kind.to_view(old.clone());
                let mut patched = viewed;
                match ptype {
                    PatchType::Merge => {
                        if !body.is_object() {
                            return Err(ApiError::bad_request(
                                "a merge patch must be a JSON object",
                            ));
                        }
                        json_patch::merge(&mut patched, &body);
                    }
                    _ => {
                        let ops: json_patch::Patch = serde_json::from_value(body).map_err(|e| {
                            ApiError::bad_request(format!(
                                "the JSON patch could not be decoded: {e}"
                            ))
                        })?;
                        json_patch::patch(&mut patched, &ops).map_err(|e| {
                            ApiError::new(
                                422,
                                "Invalid",
                                format!("the JSON patch does not apply: {e}"),
                            )
                        })?;
                    }
                }
                if !patched.is_object() {
                    return Err(ApiError::new(
                        422,
                        "Invalid",
                        "the patched object is not a JSON object",
                    ));
                }
                if let Some(rv) = patched
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str)
                    && Some(rv)
                        != old
                            .pointer("/metadata/resourceVersion")
                            .and_then(Value::as_str)
                {
                    return Err(conflict(kind, name));
                }
                let new = merge_scope(&old, kind.to_storage(patched), scope);
                self.commit(&mut st, kind, key, old, new, scope, opts, false)
            }
        }
    }

    /// Writes `new` over `old` after keeping server-owned metadata, admission, generation
    /// and field ownership; a write that changes nothing keeps the resourceVersion.
    #[allow(clippy::too_many_arguments)]
    fn commit(
        &self,
        st: &mut State,
        kind: &Kind,
        key: Key,
        old: Value,
        mut new: Value,
        scope: Scope,
        opts: &WriteOpts,
        applied: bool,
    ) -> Result<Written, ApiError> {
        check_metadata(&new)?;
        merge_string_data(kind, &mut new)?;
        if new.get("metadata").is_none() {
            new["metadata"] = json!({});
        }
        for k in [
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
            "resourceVersion",
        ] {
            match old["metadata"].get(k) {
                Some(v) => new["metadata"][k] = v.clone(),
                None => {
                    if let Some(m) = new["metadata"].as_object_mut() {
                        m.remove(k);
                    }
                }
            }
        }
        // A write that sets managedFields itself (kubectl does, when it moves
        // client-side apply ownership to server-side apply) is taken as given.
        let explicit_fields = !applied
            && new["metadata"]["managedFields"]
                .as_array()
                .is_some_and(|a| !a.is_empty())
            && new["metadata"]["managedFields"] != old["metadata"]["managedFields"];
        if !applied && !explicit_fields {
            new["metadata"]["managedFields"] = old["metadata"]["managedFields"].clone();
            if new["metadata"]["managedFields"].is_null()
                && let Some(m) = new["metadata"].as_object_mut()
            {
                m.remove("managedFields");
            }
        }
        label_namespace(kind, &mut new);
        let warnings = Self::admit(kind, &mut new, Some(&old), opts)?;
        if spec_part(&new) != spec_part(&old) {
            let g = old
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(1);
            new["metadata"]["generation"] = json!(g + 1);
        }
        if !applied && !explicit_fields {
            let api_version = kind.api_version();
            let now = now();
            let manager = opts
                .field_manager
                .clone()
                .unwrap_or_else(|| "unknown".into());
            ssa::record_update(
                Some(&old),
                &mut new,
                &ssa::Write {
                    manager: &manager,
                    api_version: &api_version,
                    scope,
                    now: &now,
                },
            );
        }
        if opts.dry_run || essence(&new) == essence(&old) {
            let object = if opts.dry_run { new } else { old };
            return Ok(Written {
                object: kind.to_view(object),
                created: false,
                warnings,
            });
        }
        self.store(st, kind, key, Some(old), new.clone());
        let finished = new.pointer("/metadata/deletionTimestamp").is_some()
            && new
                .pointer("/metadata/finalizers")
                .and_then(Value::as_array)
                .is_none_or(Vec::is_empty)
            && kind.plural != "pods";
        let stored = if finished {
            self.remove_locked(st, &kind.storage, &new, false);
            new
        } else {
            st.objects
                .get(&(kind.storage.clone(), new_ns(&new), new_name(&new)))
                .cloned()
                .unwrap_or(new)
        };
        Ok(Written {
            object: kind.to_view(stored),
            created: false,
            warnings,
        })
    }

    fn store(&self, st: &mut State, kind: &Kind, key: Key, old: Option<Value>, mut new: Value) {
        st.rv += 1;
        new["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        st.objects.insert(key.clone(), new.clone());
        let change = Change {
            rv: st.rv,
            storage: kind.storage.clone(),
            namespace: key.1,
            type_: if old.is_some() { "MODIFIED" } else { "ADDED" },
            object: new,
            old,
        };
        self.record(st, change);
    }

    /// Changes a stored object in place, bypassing admission (the kubelet's status
    /// writes). `f` returns false to leave it untouched.
    pub fn mutate(
        &self,
        storage: &str,
        ns: &str,
        name: &str,
        f: impl FnOnce(&mut Value) -> bool,
    ) -> Option<Value> {
        let mut st = self.lock();
        let key = (storage.to_string(), ns.to_string(), name.to_string());
        let old = st.objects.get(&key)?.clone();
        let mut new = old.clone();
        if !f(&mut new) || new == old {
            return Some(old);
        }
        let kind = st.kinds.iter().find(|k| k.storage == storage)?.clone();
        self.store(&mut st, &kind, key.clone(), Some(old), new);
        st.objects.get(&key).cloned()
    }

    /// `pods/binding`: assigns a pod to a node, once (what a scheduler does).
    pub fn bind(&self, ns: &str, name: &str, binding: &Value) -> Result<Value, ApiError> {
        let node = binding
            .pointer("/target/name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| ApiError::new(422, "Invalid", "Binding.target.name: Required value"))?
            .to_string();
        let mut st = self.lock();
        let kind = st
            .kinds
            .iter()
            .find(|k| k.storage == "pods")
            .cloned()
            .expect("pods are served");
        let key = ("pods".to_string(), ns.to_string(), name.to_string());
        let old = st
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(&kind, name))?;
        // As a real server: a Conflict on `pods/binding` (the details name that
        // resource, without a group).
        let refused = |why: String| {
            let mut e = ApiError::new(
                409,
                "Conflict",
                format!("Operation cannot be fulfilled on pods/binding \"{name}\": {why}"),
            );
            e.details = Some(json!({"name": name, "kind": "pods/binding"}));
            e
        };
        if old.pointer("/metadata/deletionTimestamp").is_some() {
            return Err(refused(format!(
                "pod {name} is being deleted, cannot be assigned to a host"
            )));
        }
        if let Some(current) = old
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
        {
            return Err(refused(format!(
                "pod {name} is already assigned to node \"{current}\""
            )));
        }
        let mut new = old.clone();
        new["spec"]["nodeName"] = json!(node);
        let scheduled =
            json!({"type": "PodScheduled", "status": "True", "lastTransitionTime": now()});
        match new["status"]["conditions"].as_array_mut() {
            Some(conds) => {
                conds.retain(|c| c["type"] != "PodScheduled");
                conds.push(scheduled);
            }
            None => new["status"]["conditions"] = json!([scheduled]),
        }
        self.store(&mut st, &kind, key, Some(old), new);
        Ok(
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
        )
    }

    /// Removes an object for good (the kubelet, once a deleted pod has stopped).
    pub fn remove_now(&self, storage: &str, ns: &str, name: &str) {
        let mut st = self.lock();
        if let Some(obj) = st
            .objects
            .get(&(storage.to_string(), ns.to_string(), name.to_string()))
            .cloned()
        {
            self.remove_locked(&mut st, storage, &obj, false);
        }
    }

    fn remove_locked(&self, st: &mut State, storage: &str, obj: &Value, orphan: bool) {
        let key = (storage.to_string(), new_ns(obj), new_name(obj));
        let Some(last) = st.objects.remove(&key) else {
            return;
        };
        st.rv += 1;
        let mut last_v = last.clone();
        last_v["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        let change = Change {
            rv: st.rv,
            storage: storage.into(),
            namespace: key.1.clone(),
            type_: "DELETED",
            object: last_v,
            old: Some(last.clone()),
        };
        self.record(st, change);
        if storage == "customresourcedefinitions.apiextensions.k8s.io"
            && let Ok(defined) = kinds::from_crd(&last)
        {
            for k in defined {
                st.kinds.retain(|old| old.storage != k.storage);
                let doomed: Vec<Value> = st
                    .objects
                    .iter()
                    .filter(|((s, _, _), _)| *s == k.storage)
                    .map(|(_, v)| v.clone())
                    .collect();
                for d in doomed {
                    self.remove_locked(st, &k.storage, &d, false);
                }
            }
        }
        if storage == "namespaces" {
            let contents: Vec<(String, Value)> = st
                .objects
                .iter()
                .filter(|((_, ns, _), _)| *ns == key.2)
                .map(|((s, _, _), v)| (s.clone(), v.clone()))
                .collect();
            for (s, v) in contents {
                self.delete_locked(st, &s, &v, DeleteOpts::default());
            }
        }
        // Garbage collection of dependents.
        let Some(uid) = last
            .pointer("/metadata/uid")
            .and_then(Value::as_str)
            .map(String::from)
        else {
            return;
        };
        let dependents: Vec<(Key, Value)> = st
            .objects
            .iter()
            .filter(|(_, v)| {
                v.pointer("/metadata/ownerReferences")
                    .and_then(Value::as_array)
                    .is_some_and(|refs| refs.iter().any(|r| r["uid"] == uid.as_str()))
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (k, v) in dependents {
            if orphan {
                let mut new = v.clone();
                if let Some(refs) = new["metadata"]["ownerReferences"].as_array_mut() {
                    refs.retain(|r| r["uid"] != uid.as_str());
                }
                if let Some(kind) = st.kinds.iter().find(|kd| kd.storage == k.0).cloned() {
                    self.store(st, &kind, k, Some(v), new);
                }
            } else {
                self.delete_locked(st, &k.0, &v, DeleteOpts::default());
            }
        }
    }

    /// Deletes an object: pods and objects with finalizers get a deletionTimestamp
    /// first; everything else goes at once, its dependents with it.
    pub fn delete(
        &self,
        kind: &Kind,
        ns: &str,
        name: &str,
        opts: DeleteOpts,
    ) -> Result<Deleted, ApiError> {
        let mut st = self.lock();
        let ns = if kind.namespaced { ns } else { "" };
        let key = (kind.storage.clone(), ns.to_string(), name.to_string());
        let Some(obj) = st.objects.get(&key).cloned() else {
            return Err(ApiError::not_found(kind, name));
        };
        if let Some(uid) = &opts.uid
            && obj.pointer("/metadata/uid").and_then(Value::as_str) != Some(uid.as_str())
        {
            let actual = obj
                .pointer("/metadata/uid")
                .and_then(Value::as_str)
                .unwrap_or_default();
            // A real server names the kind here, not the resource.
            let qualified = if kind.group.is_empty() {
                kind.kind.clone()
            } else {
                format!("{}.{}", kind.kind, kind.group)
            };
            let mut e = ApiError::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {qualified} \"{name}\": the UID in the precondition ({uid}) does not match the UID in record ({actual}). The object might have been deleted and then recreated"
                ),
            );
            e.details = Some(json!({"name": name, "group": kind.group, "kind": kind.kind}));
            return Err(e);
        }
        if opts.dry_run {
            return Ok(Deleted {
                object: kind.to_view(obj),
                gone: false,
            });
        }
        let (last, gone) = self.delete_locked(&mut st, &kind.storage, &obj, opts);
        Ok(Deleted {
            object: kind.to_view(last),
            gone,
        })
    }

    /// Deletes `obj`, gracefully or at once; returns its last state and whether it is
    /// gone.
    fn delete_locked(
        &self,
        st: &mut State,
        storage: &str,
        obj: &Value,
        opts: DeleteOpts,
    ) -> (Value, bool) {
        let finalizers = obj
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|f| !f.is_empty());
        let is_pod = storage == "pods";
        let finished_pod = is_pod
            && matches!(
                obj.pointer("/status/phase").and_then(Value::as_str),
                Some("Succeeded" | "Failed")
            );
        let grace = opts.grace.unwrap_or_else(|| {
            obj.pointer("/spec/terminationGracePeriodSeconds")
                .and_then(Value::as_i64)
                .unwrap_or(30)
        });
        // As a real server: a pod no node took yet has no process to stop.
        let unbound_pod = is_pod
            && obj
                .pointer("/spec/nodeName")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty);
        let graceful = is_pod && grace > 0 && !finished_pod && !unbound_pod;
        let key = (storage.to_string(), new_ns(obj), new_name(obj));
        let kind = st.kinds.iter().find(|k| k.storage == storage).cloned();
        if !finalizers && !graceful {
            let mut last = obj.clone();
            // As a real server does with pods (they are deleted gracefully, with a grace
            // period of 0 here): first marked deleted now, a MODIFIED event, then gone.
            if is_pod
                && let Some(kind) = &kind
                && obj
                    .pointer("/metadata/deletionGracePeriodSeconds")
                    .and_then(Value::as_i64)
                    != Some(0)
            {
                last["metadata"]["deletionTimestamp"] = json!(now());
                last["metadata"]["deletionGracePeriodSeconds"] = json!(0);
                self.store(st, kind, key.clone(), Some(obj.clone()), last);
                last = st.objects.get(&key).cloned().unwrap_or_default();
            }
            self.remove_locked(st, storage, &last, opts.orphan);
            return (last, true);
        }
        let current_grace = obj
            .pointer("/metadata/deletionGracePeriodSeconds")
            .and_then(Value::as_i64);
        if obj.pointer("/metadata/deletionTimestamp").is_some()
            && current_grace.is_none_or(|g| g <= grace)
        {
            return (obj.clone(), false);
        }
        let mut new = obj.clone();
        let when = jiff::Timestamp::now()
            .checked_add(jiff::SignedDuration::from_secs(if graceful {
                grace
            } else {
                0
            }))
            .unwrap_or_else(|_| jiff::Timestamp::now())
            .round(jiff::Unit::Second)
            .map(|t| t.to_string())
            .unwrap_or_else(|_| now());
        new["metadata"]["deletionTimestamp"] = json!(when);
        new["metadata"]["deletionGracePeriodSeconds"] = json!(if graceful { grace } else { 0 });
        if let Some(kind) = &kind {
            self.store(st, kind, key.clone(), Some(obj.clone()), new);
        }
        (st.objects.get(&key).cloned().unwrap_or(obj.clone()), false)
    }
}

/// `metadata`, when present, must be an object.
fn check_metadata(obj: &Value) -> Result<(), ApiError> {
    match obj.get("metadata") {
        None | Some(Value::Object(_)) => Ok(()),
        Some(other) => Err(ApiError::bad_request(format!(
            "the request body could not be decoded: metadata must be an object, not {other}"
        ))),
    }
}

fn new_ns(v: &Value) -> String {
    v.pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

fn new_name(v: &Value) -> String {
    v.pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

fn conflict(kind: &Kind, name: &str) -> ApiError {
    ApiError::new(
        409,
        "Conflict",
        format!(
            "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
            kind.qualified()
        ),
    )
    .with_details(kind, name)
}

fn scope_of(kind: &Kind, status: bool) -> Scope {
    match (kind.status, status) {
        (true, true) => Scope::Status,
        (true, false) => Scope::Main,
        _ => Scope::All,
    }
}

/// The new object a write in `scope` produces: the main resource cannot change
/// `status`; the status subresource changes only `status`.
fn merge_scope(old: &Value, body: Value, scope: Scope) -> Value {
    match scope {
        Scope::All => body,
        Scope::Main => with_status_of(body, old),
        Scope::Status => with_status_of(old.clone(), &body),
    }
}

/// `object` with the `status` of `source` (none when `source` has none).
fn with_status_of(mut object: Value, source: &Value) -> Value {
    match source.get("status") {
        Some(s) => object["status"] = s.clone(),
        None => {
            if let Some(m) = object.as_object_mut() {
                m.remove("status");
            }
        }
    }
    object
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, s)
    }

    /// A cluster with namespace `default`, and its Secret kind.
    fn cluster() -> (Arc<Cluster>, Arc<Kind>) {
        let c = Cluster::new(100);
        let ns = c.find_kind("", "v1", "namespaces").unwrap();
        c.create(
            &ns,
            "",
            json!({"metadata": {"name": "default"}}),
            &WriteOpts::default(),
        )
        .unwrap();
        let secrets = c.find_kind("", "v1", "secrets").unwrap();
        (c, secrets)
    }

    fn opts(manager: &str) -> WriteOpts {
        WriteOpts {
            field_manager: Some(manager.into()),
            ..WriteOpts::default()
        }
    }

    /// The stored Secret has no stringData, and what is answered is what is stored.
    fn stored(c: &Cluster, secrets: &Kind, answered: &Value) -> Value {
        let got = c.get(secrets, "default", "s").unwrap();
        assert!(got.get("stringData").is_none(), "{got}");
        assert_eq!(&got, answered);
        got
    }

    #[test]
    fn create_merges_string_data_into_data_and_string_data_wins() {
        let (c, secrets) = cluster();
        let w = c
            .create(
                &secrets,
                "default",
                json!({"metadata": {"name": "s"}, "type": "Opaque",
                    "data": {"keep": b64("old"), "uri": b64("loses")},
                    "stringData": {"uri": "amqp://guest:guest@127.0.0.1:5672/%2f"}}),
                &opts("test"),
            )
            .unwrap();
        let got = stored(&c, &secrets, &w.object);
        assert_eq!(
            got["data"],
            json!({"keep": b64("old"), "uri": b64("amqp://guest:guest@127.0.0.1:5672/%2f")})
        );
        let fields = got["metadata"]["managedFields"][0]["fieldsV1"].to_string();
        assert!(
            fields.contains("f:data") && !fields.contains("f:stringData"),
            "{fields}"
        );
        // A ConfigMap's field of that name is just a field.
        let cms = c.find_kind("", "v1", "configmaps").unwrap();
        let w = c
            .create(
                &cms,
                "default",
                json!({"metadata": {"name": "c"}, "stringData": {"a": "b"}}),
                &opts("test"),
            )
            .unwrap();
        assert_eq!(w.object["stringData"], json!({"a": "b"}));
    }

    #[test]
    fn update_and_patches_merge_string_data_and_the_type_defaults() {
        let (c, secrets) = cluster();
        let w = c
            .create(
                &secrets,
                "default",
                json!({"metadata": {"name": "s"}, "data": {"a": b64("1")}}),
                &opts("test"),
            )
            .unwrap();
        assert_eq!(w.object["type"], "Opaque", "the type defaults");
        let mut obj = c.get(&secrets, "default", "s").unwrap();
        obj["stringData"] = json!({"b": "2"});
        let w = c
            .update(&secrets, "default", "s", obj, false, &opts("test"))
            .unwrap();
        assert_eq!(
            stored(&c, &secrets, &w.object)["data"],
            json!({"a": b64("1"), "b": b64("2")})
        );
        let w = c
            .patch(
                &secrets,
                "default",
                "s",
                PatchType::Merge,
                json!({"stringData": {"a": "one"}}),
                false,
                &opts("test"),
            )
            .unwrap();
        assert_eq!(
            stored(&c, &secrets, &w.object)["data"],
            json!({"a": b64("one"), "b": b64("2")})
        );
        let w = c
            .patch(
                &secrets,
                "default",
                "s",
                PatchType::Json,
                json!([{"op": "add", "path": "/stringData", "value": {"c": "3"}}]),
                false,
                &opts("test"),
            )
            .unwrap();
        assert_eq!(w.object["data"]["c"], b64("3"));
        stored(&c, &secrets, &w.object);
        // The same value again changes nothing, so the resourceVersion stays.
        let rv = w.object["metadata"]["resourceVersion"].clone();
        let w = c
            .patch(
                &secrets,
                "default",
                "s",
                PatchType::Merge,
                json!({"stringData": {"c": "3"}}),
                false,
                &opts("test"),
            )
            .unwrap();
        assert_eq!(w.object["metadata"]["resourceVersion"], rv);
    }

    #[test]
    fn server_side_apply_merges_string_data_on_create_and_update() {
        let (c, secrets) = cluster();
        let config = |v: &str| {
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"},
                "stringData": {"uri": v}})
        };
        let w = c
            .patch(
                &secrets,
                "default",
                "s",
                PatchType::Apply,
                config("amqp://a"),
                false,
                &opts("ssa"),
            )
            .unwrap();
        assert!(w.created);
        assert_eq!(
            stored(&c, &secrets, &w.object)["data"],
            json!({"uri": b64("amqp://a")})
        );
        let w = c
            .patch(
                &secrets,
                "default",
                "s",
                PatchType::Apply,
                config("amqp://b"),
                false,
                &opts("ssa"),
            )
            .unwrap();
        assert_eq!(
            stored(&c, &secrets, &w.object)["data"],
            json!({"uri": b64("amqp://b")})
        );
    }

    #[test]
    fn string_data_that_is_not_strings_is_a_bad_request() {
        let (c, secrets) = cluster();
        for bad in [json!({"a": 1}), json!(["a"])] {
            let err = c
                .create(
                    &secrets,
                    "default",
                    json!({"metadata": {"name": "s"}, "stringData": bad}),
                    &opts("test"),
                )
                .unwrap_err();
            assert_eq!(err.code, 400, "{}", err.message);
            assert!(err.message.contains("stringData"), "{}", err.message);
        }
        assert!(c.get(&secrets, "default", "s").is_err());
    }
}
