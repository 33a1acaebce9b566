//! The HTTP face of the simulated API server: discovery, OpenAPI, CRUD, patches and
//! watches, with Kubernetes-style `Status` errors.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::broadcast;
use tokio::time::Instant;

use super::api::{ApiError, Change, Cluster, DeleteOpts, PatchType, WriteOpts, parse_body};
use super::kinds::Kind;
use super::select::{FieldSelector, LabelSelector};
use super::{openapi, protobuf, table};

/// Largest request body accepted.
const MAX_BODY: usize = 16 << 20;

/// Shared state of the HTTP handlers.
#[derive(Clone)]
pub struct Server {
    /// The object store.
    pub cluster: Arc<Cluster>,
    /// Interval between watch bookmarks.
    pub bookmark_interval: Duration,
}

/// The router: every path goes through [`handle`].
pub fn router(server: Server) -> Router {
    Router::new().fallback(handle).with_state(server)
}

fn json_response(code: u16, v: &Value) -> Response {
    let mut r = Response::new(Body::from(v.to_string()));
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn error(e: ApiError) -> Response {
    json_response(e.code, &e.status())
}

fn path_not_found() -> ApiError {
    ApiError::new(
        404,
        "NotFound",
        "the server could not find the requested resource",
    )
}

fn not_found_path() -> Response {
    error(path_not_found())
}

/// What a real server answers for a path outside every API it serves (an unknown
/// group or version, or no API path at all): plain text, not a Status.
fn page_not_found() -> Response {
    let mut r = Response::new(Body::from("404 page not found\n"));
    *r.status_mut() = StatusCode::NOT_FOUND;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Whether `group/version` is served.
fn serves(cluster: &Cluster, group: &str, version: &str) -> bool {
    cluster
        .kinds()
        .iter()
        .any(|k| k.group == group && k.version == version)
}

fn method_not_allowed(method: &Method) -> Response {
    error(ApiError::new(
        405,
        "MethodNotAllowed",
        format!("the server does not allow this method on the requested resource ({method})"),
    ))
}

/// What a request addresses below `/api/v1` or `/apis/g/v`.
struct Target {
    kind: Arc<Kind>,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

fn resolve(
    cluster: &Cluster,
    group: &str,
    version: &str,
    rest: &[&str],
) -> Result<Target, ApiError> {
    let (namespace, rest) = match rest {
        ["namespaces", ns, r, more @ ..]
            if !(more.is_empty() && matches!(*r, "status" | "finalize")) =>
        {
            (Some(ns.to_string()), {
                let mut v = vec![*r];
                v.extend_from_slice(more);
                v
            })
        }
        other => (None, other.to_vec()),
    };
    let Some(plural) = rest.first() else {
        return Err(path_not_found());
    };
    let Some(kind) = cluster.find_kind(group, version, plural) else {
        return Err(path_not_found());
    };
    if rest.len() > 3 || (namespace.is_some() && !kind.namespaced) {
        return Err(path_not_found());
    }
    let name = rest.get(1).map(|s| s.to_string());
    let subresource = rest.get(2).map(|s| s.to_string());
    if name.is_some() && kind.namespaced && namespace.is_none() {
        return Err(path_not_found());
    }
    let pod = kind.group.is_empty() && kind.plural == "pods";
    if let Some(sub) = &subresource
        && !(sub == "status" && kind.status)
        && !(pod && matches!(sub.as_str(), "log" | "binding"))
    {
        return Err(path_not_found());
    }
    Ok(Target {
        kind,
        namespace,
        name,
        subresource,
    })
}

/// Every request.
pub async fn handle(State(server): State<Server>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let query: HashMap<String, String> = parts
        .uri
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(e) => {
            return error(ApiError::bad_request(format!(
                "failed to read the request body: {e}"
            )));
        }
    };
    let path = parts.uri.path().to_string();
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let cluster = &server.cluster;
    let get = parts.method == Method::GET;
    tracing::debug!(method = %parts.method, %path, "request");
    match segs.as_slice() {
        ["version"] if get => json_response(
            200,
            &json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-testrunner-sim", "gitCommit": "", "gitTreeState": "clean",
                "buildDate": "2026-01-01T00:00:00Z", "goVersion": "", "compiler": "rust", "platform": "linux/amd64"}),
        ),
        ["healthz" | "livez" | "readyz"] if get => (StatusCode::OK, "ok").into_response(),
        ["api"] if get => json_response(
            200,
            &json!({"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}),
        ),
        ["apis"] if get => json_response(200, &group_list(cluster)),
        ["apis", g] if get => match group_list(cluster)["groups"]
            .as_array()
            .and_then(|gs| gs.iter().find(|x| x["name"] == *g).cloned())
        {
            Some(mut group) => {
                group["kind"] = json!("APIGroup");
                group["apiVersion"] = json!("v1");
                json_response(200, &group)
            }
            None => page_not_found(),
        },
        ["api", "v1"] if get => resource_list(cluster, "", "v1"),
        ["apis", g, v] if get => resource_list(cluster, g, v),
        ["openapi", "v3"] if get => json_response(200, &openapi::index(&cluster.kinds())),
        ["openapi", "v3", rest @ ..] if get => {
            let gv = rest.join("/");
            let kinds = cluster.kinds();
            let members: Vec<&Kind> = kinds
                .iter()
                .filter(|k| openapi::gv_path(k) == gv)
                .map(|k| k.as_ref())
                .collect();
            if members.is_empty() {
                not_found_path()
            } else {
                json_response(200, &openapi::document(&members))
            }
        }
        ["api", "v1", rest @ ..] => {
            resource(
                &server,
                "",
                "v1",
                rest,
                &parts.method,
                &parts.headers,
                &query,
                body,
            )
            .await
        }
        ["apis", g, v, ..] if !serves(cluster, g, v) => page_not_found(),
        ["apis", g, v, rest @ ..] if !rest.is_empty() => {
            resource(
                &server,
                g,
                v,
                rest,
                &parts.method,
                &parts.headers,
                &query,
                body,
            )
            .await
        }
        _ if !get
            && matches!(
                segs.as_slice(),
                [
                    "version" | "api" | "apis" | "healthz" | "livez" | "readyz",
                    ..
                ] | ["openapi", ..]
            ) =>
        {
            method_not_allowed(&parts.method)
        }
        _ => page_not_found(),
    }
}

fn group_list(cluster: &Cluster) -> Value {
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for k in cluster.kinds().iter().filter(|k| !k.group.is_empty()) {
        match groups.iter_mut().find(|(g, _)| *g == k.group) {
            Some((_, vs)) => {
                if !vs.contains(&k.version) {
                    vs.push(k.version.clone());
                }
            }
            None => groups.push((k.group.clone(), vec![k.version.clone()])),
        }
    }
    let groups: Vec<Value> = groups
        .into_iter()
        .map(|(g, vs)| {
            let versions: Vec<Value> = vs
                .iter()
                .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
                .collect();
            json!({"name": g, "versions": versions, "preferredVersion": versions[0]})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn resource_list(cluster: &Cluster, group: &str, version: &str) -> Response {
    let kinds: Vec<Arc<Kind>> = cluster
        .kinds()
        .into_iter()
        .filter(|k| k.group == group && k.version == version)
        .collect();
    if kinds.is_empty() {
        return page_not_found();
    }
    let mut resources = Vec::new();
    for k in &kinds {
        let mut r = json!({
            "name": k.plural, "singularName": k.singular, "namespaced": k.namespaced, "kind": k.kind,
            "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
        });
        if !k.short_names.is_empty() {
            r["shortNames"] = json!(k.short_names);
        }
        if !k.categories.is_empty() {
            r["categories"] = json!(k.categories);
        }
        resources.push(r);
        if k.status {
            resources.push(json!({"name": format!("{}/status", k.plural), "singularName": "", "namespaced": k.namespaced,
                "kind": k.kind, "verbs": ["get", "patch", "update"]}));
        }
    }
    let gv = kinds[0].api_version();
    json_response(
        200,
        &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
    )
}

fn wants_table(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .next()
                .is_some_and(|first| first.contains("as=Table"))
        })
}

/// The media type of the request body (`Content-Type` without parameters), lowercased.
fn media_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// The body of a create or update of `kind`: JSON or YAML, or protobuf (what kubectl and
/// client-go send for built-in kinds) for the kinds [`protobuf`] decodes. Any other
/// media type is 415, as a real API server answers.
fn object_body(headers: &HeaderMap, kind: &Kind, body: &[u8]) -> Result<Value, ApiError> {
    match media_type(headers).as_str() {
        m if protobuf::is_protobuf(m) => protobuf::decode_object(kind, body),
        "" | "application/json" | "application/yaml" => parse_body(body, true),
        other => Err(ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml, {} (got {other:?})",
                protobuf::MEDIA_TYPE
            ),
        )),
    }
}

fn write_opts(query: &HashMap<String, String>) -> WriteOpts {
    WriteOpts {
        field_manager: query.get("fieldManager").cloned().filter(|m| !m.is_empty()),
        dry_run: query.get("dryRun").is_some_and(|d| d == "All"),
        force: query.get("force").is_some_and(|f| f == "true"),
        strict: query.get("fieldValidation").is_some_and(|f| f == "Strict"),
    }
}

fn with_warnings(mut r: Response, warnings: &[String]) -> Response {
    for w in warnings {
        let text = format!("299 - \"{}\"", w.replace('"', "'"));
        if let Ok(v) = HeaderValue::from_str(&text) {
            r.headers_mut().append(header::WARNING, v);
        }
    }
    r
}

fn selectors(query: &HashMap<String, String>) -> Result<(LabelSelector, FieldSelector), ApiError> {
    let labels = LabelSelector::parse(query.get("labelSelector").map(String::as_str).unwrap_or(""))
        .map_err(ApiError::bad_request)?;
    let fields = FieldSelector::parse(query.get("fieldSelector").map(String::as_str).unwrap_or(""))
        .map_err(ApiError::bad_request)?;
    Ok((labels, fields))
}

fn selected(obj: &Value, labels: &LabelSelector, fields: &FieldSelector) -> bool {
    labels.matches(obj.pointer("/metadata/labels").and_then(Value::as_object))
        && fields.matches(obj)
}

#[allow(clippy::too_many_arguments)]
async fn resource(
    server: &Server,
    group: &str,
    version: &str,
    rest: &[&str],
    method: &Method,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
    body: Bytes,
) -> Response {
    let cluster = &server.cluster;
    let t = match resolve(cluster, group, version, rest) {
        Ok(t) => t,
        Err(e) => return error(e),
    };
    let kind = t.kind.clone();
    let ns = t.namespace.clone().unwrap_or_default();
    let table = wants_table(headers);
    let include = query.get("includeObject").map(String::as_str);
    let status_sub = t.subresource.is_some();
    match (&t.name, method.clone()) {
        (None, Method::GET) => {
            let (labels, fields) = match selectors(query) {
                Ok(s) => s,
                Err(e) => return error(e),
            };
            if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
                return watch(server, kind, t.namespace, labels, fields, query, table);
            }
            let (items, rv) = cluster.list_where(&kind, t.namespace.as_deref(), |o| {
                selected(o, &labels, &fields)
            });
            if table {
                return json_response(200, &table::table(&kind, &items, &rv.to_string(), include));
            }
            json_response(
                200,
                &json!({"kind": format!("{}List", kind.kind), "apiVersion": kind.api_version(),
                    "metadata": {"resourceVersion": rv.to_string()}, "items": items}),
            )
        }
        (None, Method::POST) => {
            if kind.namespaced && t.namespace.is_none() {
                return method_not_allowed(method);
            }
            let obj = match object_body(headers, &kind, &body) {
                Ok(v) => v,
                Err(e) => return error(e),
            };
            match cluster.create(&kind, &ns, obj, &write_opts(query)) {
                Ok(w) => with_warnings(json_response(201, &w.object), &w.warnings),
                Err(e) => error(e),
            }
        }
        (None, _) => method_not_allowed(method),
        (Some(name), Method::GET) if t.subresource.as_deref() == Some("log") => {
            pod_log(cluster, &kind, &ns, name, query)
        }
        (Some(_), _) if t.subresource.as_deref() == Some("log") => method_not_allowed(method),
        (Some(name), Method::POST) if t.subresource.as_deref() == Some("binding") => {
            let binding = match parse_body(&body, false) {
                Ok(v) => v,
                Err(e) => return error(e),
            };
            match cluster.bind(&ns, name, &binding) {
                Ok(status) => json_response(201, &status),
                Err(e) => error(e),
            }
        }
        (Some(_), _) if t.subresource.as_deref() == Some("binding") => method_not_allowed(method),
        (Some(name), Method::GET) => match cluster.get(&kind, &ns, name) {
            Ok(obj) if table => json_response(
                200,
                &table::table(
                    &kind,
                    std::slice::from_ref(&obj),
                    &cluster.resource_version().to_string(),
                    include,
                ),
            ),
            Ok(obj) => json_response(200, &obj),
            Err(e) => error(e),
        },
        (Some(name), Method::PUT) => {
            let obj = match object_body(headers, &kind, &body) {
                Ok(v) => v,
                Err(e) => return error(e),
            };
            match cluster.update(&kind, &ns, name, obj, status_sub, &write_opts(query)) {
                Ok(w) => with_warnings(json_response(200, &w.object), &w.warnings),
                Err(e) => error(e),
            }
        }
        (Some(name), Method::PATCH) => {
            let ptype = match media_type(headers).as_str() {
                "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
                    PatchType::Merge
                }
                "application/json-patch+json" => PatchType::Json,
                "application/apply-patch+yaml" | "application/apply-patch+json" => PatchType::Apply,
                other => {
                    return error(ApiError::new(
                        415,
                        "UnsupportedMediaType",
                        format!(
                            "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (got {other:?})"
                        ),
                    ));
                }
            };
            let patch = match parse_body(&body, ptype == PatchType::Apply) {
                Ok(v) => v,
                Err(e) => return error(e),
            };
            match cluster.patch(
                &kind,
                &ns,
                name,
                ptype,
                patch,
                status_sub,
                &write_opts(query),
            ) {
                Ok(w) => with_warnings(
                    json_response(if w.created { 201 } else { 200 }, &w.object),
                    &w.warnings,
                ),
                Err(e) => error(e),
            }
        }
        (Some(name), Method::DELETE) if !status_sub => {
            let mut opts = DeleteOpts::default();
            if !body.is_empty() {
                let options = if protobuf::is_protobuf(&media_type(headers)) {
                    protobuf::decode_delete_options(&body)
                } else {
                    parse_body(&body, false)
                };
                match options {
                    Ok(v) => {
                        opts.grace = v["gracePeriodSeconds"].as_i64();
                        opts.orphan =
                            v["propagationPolicy"] == "Orphan" || v["orphanDependents"] == true;
                        opts.dry_run = v["dryRun"]
                            .as_array()
                            .is_some_and(|d| d.iter().any(|x| x == "All"));
                        opts.uid = v
                            .pointer("/preconditions/uid")
                            .and_then(Value::as_str)
                            .map(String::from);
                    }
                    Err(e) => return error(e),
                }
            }
            if let Some(g) = query.get("gracePeriodSeconds").and_then(|g| g.parse().ok()) {
                opts.grace = Some(g);
            }
            if query
                .get("propagationPolicy")
                .is_some_and(|p| p == "Orphan")
            {
                opts.orphan = true;
            }
            if query.get("dryRun").is_some_and(|d| d == "All") {
                opts.dry_run = true;
            }
            match cluster.delete(&kind, &ns, name, opts) {
                Ok(deleted) if deleted.gone && !returns_deleted_object(&kind) => {
                    json_response(200, &deleted_status(&kind, &deleted.object))
                }
                Ok(deleted) => json_response(200, &deleted.object),
                Err(e) => error(e),
            }
        }
        (Some(_), _) => method_not_allowed(method),
    }
}

/// Whether a real server answers the deletion of an object of `kind` that went at once
/// with the object (pods, namespaces and CRDs: their registries say so) rather than with
/// a Status.
fn returns_deleted_object(kind: &Kind) -> bool {
    (kind.group.is_empty() && matches!(kind.plural.as_str(), "pods" | "namespaces"))
        || kind.plural == "customresourcedefinitions"
}

/// The Status a real server answers when `object` (of `kind`) was deleted at once:
/// `Success`, with its name, group, resource (as `kind`) and uid.
fn deleted_status(kind: &Kind, object: &Value) -> Value {
    let mut details = json!({
        "name": object.pointer("/metadata/name").cloned().unwrap_or_default(),
        "kind": kind.plural,
        "uid": object.pointer("/metadata/uid").cloned().unwrap_or_default(),
    });
    if !kind.group.is_empty() {
        details["group"] = json!(kind.group);
    }
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details})
}

/// `kubectl logs`: the container's output (`tailLines` and `follow` honoured).
fn pod_log(
    cluster: &Cluster,
    kind: &Kind,
    ns: &str,
    name: &str,
    query: &HashMap<String, String>,
) -> Response {
    let pod = match cluster.get(kind, ns, name) {
        Ok(p) => p,
        Err(e) => return error(e),
    };
    let names: Vec<String> = ["initContainers", "containers"]
        .iter()
        .flat_map(|f| pod["spec"][f].as_array().cloned().unwrap_or_default())
        .filter_map(|c| c["name"].as_str().map(String::from))
        .collect();
    let container = match query.get("container") {
        Some(c) if names.contains(c) => c.clone(),
        Some(c) => {
            return error(ApiError::bad_request(format!(
                "container {c} is not valid for pod {name}"
            )));
        }
        None => match pod["spec"]["containers"].as_array().map(Vec::as_slice) {
            Some([only]) => only["name"].as_str().unwrap_or_default().to_string(),
            _ => {
                return error(ApiError::bad_request(format!(
                    "a container name must be specified for pod {name}, choose one of: {names:?}"
                )));
            }
        },
    };
    let tail_lines = query.get("tailLines").and_then(|n| n.parse::<usize>().ok());
    let follow = query.get("follow").is_some_and(|f| f == "true" || f == "1");
    let mut r = match cluster.log_path(&pod, &container) {
        Some(path) => super::kubelet::server::log_body(path, tail_lines, follow),
        None => Response::new(Body::empty()),
    };
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

struct WatchState {
    queue: VecDeque<Bytes>,
    rx: broadcast::Receiver<Arc<Change>>,
    kind: Arc<Kind>,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
    table: bool,
    bookmarks: bool,
    bookmark_every: Duration,
    next_bookmark: Instant,
    deadline: Instant,
    last_rv: u64,
    done: bool,
}

impl WatchState {
    fn line(&self, type_: &str, obj: Value) -> Bytes {
        let object = if self.table && type_ != "BOOKMARK" && type_ != "ERROR" {
            let rv = obj
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            table::table(&self.kind, &[obj], &rv, None)
        } else {
            obj
        };
        let mut bytes =
            serde_json::to_vec(&json!({"type": type_, "object": object})).unwrap_or_default();
        bytes.push(b'\n');
        Bytes::from(bytes)
    }

    /// The event this watcher sees for `change`, if any: an object that stops matching
    /// the selectors is DELETED for it, one that starts matching is ADDED.
    fn event(&self, change: &Change) -> Option<Bytes> {
        if change.storage != self.kind.storage
            || self
                .namespace
                .as_ref()
                .is_some_and(|ns| *ns != change.namespace)
        {
            return None;
        }
        let now = self.kind.to_view(change.object.clone());
        let matches_now = selected(&now, &self.labels, &self.fields);
        let matched_before = change
            .old
            .as_ref()
            .map(|o| selected(&self.kind.to_view(o.clone()), &self.labels, &self.fields));
        let type_ = match (change.type_, matched_before, matches_now) {
            ("DELETED", Some(true), _) => "DELETED",
            ("DELETED", _, _) => return None,
            (_, Some(true), true) => "MODIFIED",
            (_, Some(true), false) => "DELETED",
            (_, _, true) => "ADDED",
            _ => return None,
        };
        Some(self.line(type_, now))
    }

    fn bookmark(&self, initial_end: bool) -> Bytes {
        let mut meta = json!({"resourceVersion": self.last_rv.to_string()});
        if initial_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        self.line(
            "BOOKMARK",
            json!({"kind": self.kind.kind, "apiVersion": self.kind.api_version(), "metadata": meta}),
        )
    }
}

fn watch(
    server: &Server,
    kind: Arc<Kind>,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
    query: &HashMap<String, String>,
    table: bool,
) -> Response {
    let send_initial = query.get("sendInitialEvents").is_some_and(|v| v == "true");
    let rv = query.get("resourceVersion").map(String::as_str);
    let (first, rx, start_rv) = match server.cluster.watch(&kind, rv, send_initial) {
        Ok(w) => w,
        // As a real API server does, an expired version is an ERROR event in a
        // successful watch response: watch clients then list again.
        Err(e) if e.code == 410 => {
            let mut line = serde_json::to_vec(&json!({"type": "ERROR", "object": e.status()}))
                .unwrap_or_default();
            line.push(b'\n');
            let mut r = Response::new(Body::from(line));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            return r;
        }
        Err(e) => return error(e),
    };
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .unwrap_or(1800);
    let bookmarks = query
        .get("allowWatchBookmarks")
        .is_some_and(|b| b == "true");
    let mut st = WatchState {
        queue: VecDeque::new(),
        rx,
        kind,
        namespace,
        labels,
        fields,
        table,
        bookmarks,
        bookmark_every: server.bookmark_interval,
        next_bookmark: Instant::now() + server.bookmark_interval,
        deadline: Instant::now() + Duration::from_secs(timeout),
        last_rv: start_rv,
        done: false,
    };
    for c in &first {
        if let Some(line) = st.event(c) {
            st.queue.push_back(line);
        }
    }
    if send_initial {
        let b = st.bookmark(true);
        st.queue.push_back(b);
    }
    let stream = futures::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(b) = st.queue.pop_front() {
                return Some((Ok::<Bytes, std::io::Error>(b), st));
            }
            if st.done {
                return None;
            }
            tokio::select! {
                got = st.rx.recv() => match got {
                    Ok(change) => {
                        if change.rv > st.last_rv {
                            st.last_rv = change.rv;
                        }
                        if let Some(line) = st.event(&change) {
                            st.queue.push_back(line);
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let e = ApiError::new(410, "Expired", "the watch fell behind; list again").status();
                        let line = st.line("ERROR", e);
                        st.queue.push_back(line);
                        st.done = true;
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                _ = tokio::time::sleep_until(st.next_bookmark), if st.bookmarks => {
                    st.next_bookmark = Instant::now() + st.bookmark_every;
                    let b = st.bookmark(false);
                    st.queue.push_back(b);
                }
                _ = tokio::time::sleep_until(st.deadline) => return None,
            }
        }
    });
    let mut r = Response::new(Body::from_stream(stream));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}
