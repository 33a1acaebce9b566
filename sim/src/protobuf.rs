//! Request bodies in the Kubernetes protobuf encoding (`application/vnd.kubernetes.protobuf`),
//! which kubectl and client-go send for built-in kinds (`kubectl create secret generic`,
//! `kubectl create configmap`, `kubectl create namespace`).
//!
//! A body is the four magic bytes `k8s\0` and a `runtime.Unknown` message whose `typeMeta`
//! names the object's apiVersion and kind and whose `raw` is the object's message from
//! Kubernetes' `generated.proto`. The messages are decoded with the prost-generated types of
//! the `k8s-pb` crate; as those have no serde support, each decoded kind is mapped to its
//! JSON form here, field by field and as Go's JSON encoding writes it (empty values of
//! `omitempty` fields left out, pointer fields kept when set), so that the rest of the
//! server sees what a JSON client would have sent.
//!
//! Every message is taken apart with an exhaustive pattern, so a field the mapping does not
//! handle is named in the code: a body that sets one (a Pod with `affinity`, say) is refused
//! with 415 naming the field rather than stored without it. Responses are always JSON,
//! which every Kubernetes client also accepts.

use std::collections::BTreeMap;

use base64::Engine;
use k8s_pb::api::coordination::v1 as coordination;
use k8s_pb::api::core::v1 as core;
use k8s_pb::api::events::v1 as events;
use k8s_pb::apimachinery::pkg::api::resource::Quantity;
use k8s_pb::apimachinery::pkg::apis::meta::v1 as meta;
use k8s_pb::apimachinery::pkg::runtime::Unknown;
use k8s_pb::apimachinery::pkg::util::intstr::IntOrString;
use prost::Message;
use serde_json::{Map, Value};

use super::api::ApiError;
use super::kinds::Kind;

/// The media type of the Kubernetes protobuf encoding.
pub const MEDIA_TYPE: &str = "application/vnd.kubernetes.protobuf";

/// The prefix of every protobuf-encoded object.
const MAGIC: &[u8] = b"k8s\0";

/// The kinds (apiVersion, kind) whose protobuf bodies are decoded.
pub const DECODED: &[(&str, &str)] = &[
    ("v1", "Secret"),
    ("v1", "ConfigMap"),
    ("v1", "Namespace"),
    ("v1", "Pod"),
    ("v1", "Event"),
    ("events.k8s.io/v1", "Event"),
    ("coordination.k8s.io/v1", "Lease"),
];

/// Whether a Content-Type (without parameters) names the Kubernetes protobuf encoding.
pub fn is_protobuf(media_type: &str) -> bool {
    media_type.eq_ignore_ascii_case(MEDIA_TYPE)
}

/// Decodes the protobuf body of a create or update of `kind` into the JSON object a JSON
/// client would have sent.
///
/// A kind without a decoder, or an object that sets a field the decoder does not map, is
/// 415 Unsupported Media Type (the client can send JSON); a malformed body, or one holding
/// another kind than the URL names, is 400.
pub fn decode_object(kind: &Kind, body: &[u8]) -> Result<Value, ApiError> {
    let api_version = kind.api_version();
    let what = format!(
        "{} in version \"{}\" cannot be handled as a {}",
        kind.kind, kind.version, kind.kind
    );
    let Some(decoder) = decoder(&api_version, &kind.kind) else {
        return Err(unsupported(format!(
            "the simulated API server decodes {MEDIA_TYPE} bodies of {} only, not of {api_version} {}",
            decoded_list(),
            kind.kind
        )));
    };
    let (type_meta, raw) =
        envelope(body).map_err(|e| ApiError::bad_request(format!("{what}: {e}")))?;
    if !type_meta.0.is_empty() && type_meta.0 != api_version {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({}) does not match the expected API version ({api_version})",
            type_meta.0
        )));
    }
    if !type_meta.1.is_empty() && type_meta.1 != kind.kind {
        return Err(ApiError::bad_request(format!(
            "{what}: the body holds a {} {}",
            type_meta.0, type_meta.1
        )));
    }
    let mut obj = decoder(&raw).map_err(|f| match f {
        Fault::Unsupported(field) => unsupported(format!(
            "the simulated API server does not decode field {field} of a {} from {MEDIA_TYPE}",
            kind.kind
        )),
        invalid => ApiError::bad_request(format!("{what}: {}", invalid.describe())),
    })?;
    obj["apiVersion"] = Value::String(api_version);
    obj["kind"] = Value::String(kind.kind.clone());
    Ok(obj)
}

/// Decodes a protobuf `DeleteOptions` body into its JSON form.
pub fn decode_delete_options(body: &[u8]) -> Result<Value, ApiError> {
    let what = "DeleteOptions cannot be decoded";
    let ((_, kind), raw) =
        envelope(body).map_err(|e| ApiError::bad_request(format!("{what}: {e}")))?;
    if !kind.is_empty() && kind != "DeleteOptions" {
        return Err(ApiError::bad_request(format!(
            "{what}: the body holds a {kind}"
        )));
    }
    decode::<meta::DeleteOptions>(&raw)
        .and_then(delete_options)
        .map_err(|f| ApiError::bad_request(format!("{what}: {}", f.describe())))
}

/// 415, in the words of a real API server, with what this one decodes.
fn unsupported(detail: String) -> ApiError {
    ApiError::new(
        415,
        "UnsupportedMediaType",
        format!(
            "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml ({detail}; send it as application/json)"
        ),
    )
}

fn decoded_list() -> String {
    DECODED
        .iter()
        .map(|(v, k)| format!("{v} {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The envelope's (apiVersion, kind) and raw object message.
fn envelope(body: &[u8]) -> Result<((String, String), Vec<u8>), String> {
    let Some(rest) = body.strip_prefix(MAGIC) else {
        return Err(format!(
            "the {MEDIA_TYPE} body does not start with the magic bytes \"k8s\\x00\""
        ));
    };
    let unknown = Unknown::decode(rest)
        .map_err(|e| format!("the {MEDIA_TYPE} envelope could not be decoded: {e}"))?;
    let Unknown {
        type_meta,
        raw,
        content_encoding,
        content_type,
    } = unknown;
    if let Some(enc) = content_encoding.filter(|e| !e.is_empty()) {
        return Err(format!("content encoding {enc:?} is not supported"));
    }
    if let Some(ct) = content_type.filter(|c| !c.is_empty() && !is_protobuf(c)) {
        return Err(format!(
            "an embedded object of content type {ct:?} is not supported"
        ));
    }
    let meta = type_meta.unwrap_or_default();
    Ok((
        (
            meta.api_version.unwrap_or_default(),
            meta.kind.unwrap_or_default(),
        ),
        raw.unwrap_or_default(),
    ))
}

/// Maps the raw message of one kind to JSON.
type Decoder = fn(&[u8]) -> Mapped;

fn decoder(api_version: &str, kind: &str) -> Option<Decoder> {
    let decoder: Decoder = match (api_version, kind) {
        ("v1", "Secret") => |raw| decode(raw).and_then(secret),
        ("v1", "ConfigMap") => |raw| decode(raw).and_then(config_map),
        ("v1", "Namespace") => |raw| decode(raw).and_then(namespace),
        ("v1", "Pod") => |raw| decode(raw).and_then(pod),
        ("v1", "Event") => |raw| decode(raw).and_then(core_event),
        ("events.k8s.io/v1", "Event") => |raw| decode(raw).and_then(new_event),
        ("coordination.k8s.io/v1", "Lease") => |raw| decode(raw).and_then(lease),
        _ => return None,
    };
    Some(decoder)
}

fn decode<M: Message + Default>(raw: &[u8]) -> Result<M, Fault> {
    M::decode(raw).map_err(|e| {
        Fault::Invalid(
            String::new(),
            format!("the protobuf message could not be decoded: {e}"),
        )
    })
}

/// Why a message could not be mapped; the path runs from the object's root.
#[derive(Debug, PartialEq)]
enum Fault {
    /// A field the mapping does not handle is set.
    Unsupported(String),
    /// A value is not what its type allows (field path, why).
    Invalid(String, String),
}

impl Fault {
    /// The fault in words, its field path first.
    fn describe(&self) -> String {
        match self {
            Fault::Unsupported(field) => format!("field {field} is not supported"),
            Fault::Invalid(field, why) if field.is_empty() => why.clone(),
            Fault::Invalid(field, why) => format!("{field}: {why}"),
        }
    }

    fn under(self, parent: &str) -> Self {
        let join = |p: String| {
            if p.is_empty() {
                parent.to_string()
            } else {
                format!("{parent}.{p}")
            }
        };
        match self {
            Fault::Unsupported(p) => Fault::Unsupported(join(p)),
            Fault::Invalid(p, why) => Fault::Invalid(join(p), why),
        }
    }
}

/// The JSON form of a message, or why there is none.
type Mapped = Result<Value, Fault>;

/// Whether a field is unset: absent, empty, or its type's zero value (how Go encodes an
/// unset value field).
trait Unset {
    fn unset(&self) -> bool;
}

impl<T: Default + PartialEq> Unset for Option<T> {
    fn unset(&self) -> bool {
        self.as_ref().is_none_or(|v| *v == T::default())
    }
}

impl<T> Unset for Vec<T> {
    fn unset(&self) -> bool {
        self.is_empty()
    }
}

/// Fails when a field the mapping does not handle is set.
fn unmapped(field: &str, value: &impl Unset) -> Result<(), Fault> {
    if value.unset() {
        Ok(())
    } else {
        Err(Fault::Unsupported(field.into()))
    }
}

/// A JSON object under construction, written as Go's JSON encoding writes the type.
#[derive(Default)]
struct Obj(Map<String, Value>);

impl Obj {
    fn put(mut self, key: &str, value: Value) -> Self {
        self.0.insert(key.into(), value);
        self
    }

    /// A string value field (`omitempty`): left out when empty.
    fn s(self, key: &str, v: Option<String>) -> Self {
        match v.filter(|s| !s.is_empty()) {
            Some(s) => self.put(key, Value::String(s)),
            None => self,
        }
    }

    /// A number or boolean value field (`omitempty`): left out when zero.
    fn z<T: Into<Value> + Default + PartialEq>(self, key: &str, v: Option<T>) -> Self {
        match v.filter(|x| *x != T::default()) {
            Some(x) => self.put(key, x.into()),
            None => self,
        }
    }

    /// A pointer field: written whenever set, zero values included.
    fn p<T: Into<Value>>(self, key: &str, v: Option<T>) -> Self {
        match v {
            Some(x) => self.put(key, x.into()),
            None => self,
        }
    }

    /// A list of scalars, left out when empty.
    fn list<T: Into<Value>>(self, key: &str, v: Vec<T>) -> Self {
        if v.is_empty() {
            self
        } else {
            self.put(key, Value::Array(v.into_iter().map(Into::into).collect()))
        }
    }

    /// A map of strings, left out when empty.
    fn strings(self, key: &str, v: BTreeMap<String, String>) -> Self {
        if v.is_empty() {
            self
        } else {
            self.put(
                key,
                Value::Object(v.into_iter().map(|(k, s)| (k, Value::String(s))).collect()),
            )
        }
    }

    /// A map of bytes, base64 in JSON, left out when empty.
    fn bytes(self, key: &str, v: BTreeMap<String, Vec<u8>>) -> Self {
        if v.is_empty() {
            return self;
        }
        let b64 = base64::engine::general_purpose::STANDARD;
        self.put(
            key,
            Value::Object(
                v.into_iter()
                    .map(|(k, b)| (k, Value::String(b64.encode(b))))
                    .collect(),
            ),
        )
    }

    /// A resource list (`cpu: 100m`), left out when empty.
    fn quantities(self, key: &str, v: BTreeMap<String, Quantity>) -> Self {
        if v.is_empty() {
            return self;
        }
        self.put(
            key,
            Value::Object(
                v.into_iter()
                    .map(|(k, q)| (k, Value::String(q.string.unwrap_or_default())))
                    .collect(),
            ),
        )
    }

    /// A quantity field, left out when unset.
    fn quantity(self, key: &str, v: Option<Quantity>) -> Self {
        self.s(key, v.and_then(|q| q.string))
    }

    /// A `metav1.Time`: seconds only, RFC 3339; left out when zero (Go encodes the zero
    /// time as an empty message).
    fn time(self, key: &str, v: Option<meta::Time>) -> Result<Self, Fault> {
        match v.and_then(|t| t.seconds) {
            Some(s) => Ok(self.put(
                key,
                Value::String(rfc3339(s, None).map_err(|e| e.under(key))?),
            )),
            None => Ok(self),
        }
    }

    /// A `metav1.MicroTime`: RFC 3339 with microseconds; left out when zero.
    fn micro_time(self, key: &str, v: Option<meta::MicroTime>) -> Result<Self, Fault> {
        match v {
            Some(meta::MicroTime {
                seconds: Some(s),
                nanos,
            }) => Ok(self.put(
                key,
                Value::String(rfc3339(s, Some(nanos.unwrap_or(0))).map_err(|e| e.under(key))?),
            )),
            _ => Ok(self),
        }
    }

    /// An int-or-string field, left out when unset.
    fn int_or_string(self, key: &str, v: Option<IntOrString>) -> Self {
        match v {
            Some(IntOrString {
                r#type: Some(1),
                str_val,
                ..
            }) => self.put(key, Value::String(str_val.unwrap_or_default())),
            Some(IntOrString { int_val, .. }) => self.put(key, int_val.unwrap_or(0).into()),
            None => self,
        }
    }

    /// A message field, written whenever set (Go writes struct value fields even when empty).
    fn msg<M>(self, key: &str, v: Option<M>, f: impl FnOnce(M) -> Mapped) -> Result<Self, Fault> {
        match v {
            Some(m) => Ok(self.put(key, f(m).map_err(|e| e.under(key))?)),
            None => Ok(self),
        }
    }

    /// A list of messages, left out when empty.
    fn msgs<M>(self, key: &str, v: Vec<M>, f: impl Fn(M) -> Mapped) -> Result<Self, Fault> {
        if v.is_empty() {
            return Ok(self);
        }
        let items = v
            .into_iter()
            .enumerate()
            .map(|(i, m)| f(m).map_err(|e| e.under(&format!("{key}[{i}]"))))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(self.put(key, Value::Array(items)))
    }

    /// The fields of an embedded (inlined) message, such as `LocalObjectReference`.
    fn inline<M>(mut self, v: Option<M>, f: impl FnOnce(M) -> Mapped) -> Result<Self, Fault> {
        if let Some(Value::Object(fields)) = v.map(f).transpose()? {
            self.0.extend(fields);
        }
        Ok(self)
    }

    fn done(self) -> Mapped {
        Ok(Value::Object(self.0))
    }
}

/// RFC 3339 in UTC, as Kubernetes writes times: whole seconds, or microseconds for a
/// `MicroTime`.
fn rfc3339(seconds: i64, nanos: Option<i32>) -> Result<String, Fault> {
    let t = jiff::Timestamp::from_second(seconds)
        .map_err(|e| Fault::Invalid(String::new(), format!("time out of range: {e}")))?;
    let whole = t.strftime("%Y-%m-%dT%H:%M:%S").to_string();
    Ok(match nanos {
        None => format!("{whole}Z"),
        Some(n) => format!("{whole}.{:06}Z", n.clamp(0, 999_999_999) / 1000),
    })
}

// ---- apimachinery ----

fn object_meta(m: meta::ObjectMeta) -> Mapped {
    let meta::ObjectMeta {
        name,
        generate_name,
        namespace,
        self_link,
        uid,
        resource_version,
        generation,
        creation_timestamp,
        deletion_timestamp,
        deletion_grace_period_seconds,
        labels,
        annotations,
        owner_references,
        finalizers,
        managed_fields,
    } = m;
    Obj::default()
        .s("name", name)
        .s("generateName", generate_name)
        .s("namespace", namespace)
        .s("selfLink", self_link)
        .s("uid", uid)
        .s("resourceVersion", resource_version)
        .z("generation", generation)
        .time("creationTimestamp", creation_timestamp)?
        .time("deletionTimestamp", deletion_timestamp)?
        .p("deletionGracePeriodSeconds", deletion_grace_period_seconds)
        .strings("labels", labels)
        .strings("annotations", annotations)
        .msgs("ownerReferences", owner_references, owner_reference)?
        .list("finalizers", finalizers)
        .msgs("managedFields", managed_fields, managed_fields_entry)?
        .done()
}

fn owner_reference(r: meta::OwnerReference) -> Mapped {
    let meta::OwnerReference {
        api_version,
        kind,
        name,
        uid,
        controller,
        block_owner_deletion,
    } = r;
    Obj::default()
        .s("apiVersion", api_version)
        .s("kind", kind)
        .s("name", name)
        .s("uid", uid)
        .p("controller", controller)
        .p("blockOwnerDeletion", block_owner_deletion)
        .done()
}

fn managed_fields_entry(e: meta::ManagedFieldsEntry) -> Mapped {
    let meta::ManagedFieldsEntry {
        manager,
        operation,
        api_version,
        time,
        fields_type,
        fields_v1,
        subresource,
    } = e;
    let fields = match fields_v1.and_then(|f| f.raw) {
        Some(raw) if !raw.is_empty() => Some(
            serde_json::from_slice::<Value>(&raw)
                .map_err(|e| Fault::Invalid("fieldsV1".into(), format!("not JSON: {e}")))?,
        ),
        _ => None,
    };
    Obj::default()
        .s("manager", manager)
        .s("operation", operation)
        .s("apiVersion", api_version)
        .time("time", time)?
        .s("fieldsType", fields_type)
        .p("fieldsV1", fields)
        .s("subresource", subresource)
        .done()
}

fn delete_options(o: meta::DeleteOptions) -> Mapped {
    let meta::DeleteOptions {
        grace_period_seconds,
        preconditions,
        orphan_dependents,
        propagation_policy,
        dry_run,
        ignore_store_read_error_with_cluster_breaking_potential,
    } = o;
    Obj::default()
        .put("kind", Value::String("DeleteOptions".into()))
        .put("apiVersion", Value::String("v1".into()))
        .p("gracePeriodSeconds", grace_period_seconds)
        .msg("preconditions", preconditions, |p| {
            let meta::Preconditions {
                uid,
                resource_version,
            } = p;
            Obj::default()
                .p("uid", uid)
                .p("resourceVersion", resource_version)
                .done()
        })?
        .p("orphanDependents", orphan_dependents)
        .p("propagationPolicy", propagation_policy)
        .list("dryRun", dry_run)
        .p(
            "ignoreStoreReadErrorWithClusterBreakingPotential",
            ignore_store_read_error_with_cluster_breaking_potential,
        )
        .done()
}

// ---- core/v1: Secret, ConfigMap, Namespace, Event ----

fn secret(s: core::Secret) -> Mapped {
    let core::Secret {
        metadata,
        immutable,
        data,
        string_data,
        r#type,
    } = s;
    Obj::default()
        .msg("metadata", metadata, object_meta)?
        .p("immutable", immutable)
        .bytes("data", data)
        .strings("stringData", string_data)
        .s("type", r#type)
        .done()
}

fn config_map(c: core::ConfigMap) -> Mapped {
    let core::ConfigMap {
        metadata,
        immutable,
        data,
        binary_data,
    } = c;
    Obj::default()
        .msg("metadata", metadata, object_meta)?
        .p("immutable", immutable)
        .strings("data", data)
        .bytes("binaryData", binary_data)
        .done()
}

fn namespace(n: core::Namespace) -> Mapped {
    let core::Namespace {
        metadata,
        spec,
        status,
    } = n;
    Obj::default()
        .msg("metadata", metadata, object_meta)?
        .msg("spec", spec, |s| {
            let core::NamespaceSpec { finalizers } = s;
            Obj::default().list("finalizers", finalizers).done()
        })?
        .msg("status", status, |s| {
            let core::NamespaceStatus { phase, conditions } = s;
            Obj::default()
                .s("phase", phase)
                .msgs("conditions", conditions, |c| {
                    let core::NamespaceCondition {
                        r#type,
                        status,
                        last_transition_time,
                        reason,
                        message,
                    } = c;
                    Obj::default()
                        .s("type", r#type)
                        .s("status", status)
                        .time("lastTransitionTime", last_transition_time)?
                        .s("reason", reason)
                        .s("message", message)
                        .done()
                })?
                .done()
        })?
        .done()
}

fn object_reference(r: core::ObjectReference) -> Mapped {
    let core::ObjectReference {
        kind,
        namespace,
        name,
        uid,
        api_version,
        resource_version,
        field_path,
    } = r;
    Obj::default()
        .s("kind", kind)
        .s("namespace", namespace)
        .s("name", name)
        .s("uid", uid)
        .s("apiVersion", api_version)
        .s("resourceVersion", resource_version)
        .s("fieldPath", field_path)
        .done()
}

fn event_source(s: core::EventSource) -> Mapped {
    let core::EventSource { component, host } = s;
    Obj::default()
        .s("component", component)
        .s("host", host)
        .done()
}

fn core_event(e: core::Event) -> Mapped {
    let core::Event {
        metadata,
        involved_object,
        reason,
        message,
        source,
        first_timestamp,
        last_timestamp,
        count,
        r#type,
        event_time,
        series,
        action,
        related,
        reporting_component,
        reporting_instance,
    } = e;
    Obj::default()
        .msg("metadata", metadata, object_meta)?
        .msg("involvedObject", involved_object, object_reference)?
        .s("reason", reason)
        .s("message", message)
        .msg("source", source, event_source)?
        .time("firstTimestamp", first_timestamp)?
        .time("lastTimestamp", last_timestamp)?
        .z("count", count)
        .s("type", r#type)
        .micro_time("eventTime", event_time)?
        .msg("series", series, |s| {
            let core::EventSeries {
                count,
                last_observed_time,
            } = s;
            Obj::default()
                .z("count", count)
                .micro_time("lastObservedTime", last_observed_time)?
                .done()
        })?
        .s("action", action)
        .msg("related", related, object_reference)?
        .s("reportingComponent", reporting_component)
        .s("reportingInstance", reporting_instance)
        .done()
}

// ---- events.k8s.io/v1 Event, coordination.k8s.io/v1 Lease ----

fn new_event(e: events::Event) -> Mapped {
    let events::Event {
        metadata,
        event_time,
        series,
        reporting_controller,
        reporting_instance,
        action,
        reason,
        regarding,
        related,
        note,
        r#type,
        deprecated_source,
        deprecated_first_timestamp,
        deprecated_last_timestamp,
        deprecated_count,
    } = e;
    Obj::default()
        .msg("metadata", metadata, object_meta)?
        .micro_time("eventTime", event_time)?
        .msg("series", series, |s| {
            let events::EventSeries {
                count,
                last_observed_time,
            } = s;
            Obj::default()
                .z("count", count)
                .micro_time("lastObservedTime", last_observed_time)?
                .done()
        })?
        .s("reportingController", reporting_controller)
        .s("reportingInstance", reporting_instance)
        .s("action", action)
        .s("reason", reason)
        .msg("regarding", regarding, object_reference)?
        .msg("related", related, object_reference)?
        .s("note", note)
        .s("type", r#type)
        .msg("deprecatedSource", deprecated_source, event_source)?
        .time("deprecatedFirstTimestamp", deprecated_first_timestamp)?
        .time("deprecatedLastTimestamp", deprecated_last_timestamp)?
        .z("deprecatedCount", deprecated_count)
        .done()
}

fn lease(l: coordination::Lease) -> Mapped {
    let coordination::Lease { metadata, spec } = l;
    Obj::default()
        .msg("metadata", metadata, object_meta)?
        .msg("spec", spec, |s| {
            let coordination::LeaseSpec {
                holder_identity,
                lease_duration_seconds,
                acquire_time,
                renew_time,
                lease_transitions,
                strategy,
                preferred_holder,
            } = s;
            Obj::default()
                .p("holderIdentity", holder_identity)
                .p("leaseDurationSeconds", lease_duration_seconds)
                .micro_time("acquireTime", acquire_time)?
                .micro_time("renewTime", renew_time)?
                .p("leaseTransitions", lease_transitions)
                .p("strategy", strategy)
                .p("preferredHolder", preferred_holder)
                .done()
        })?
        .done()
}

// ---- core/v1 Pod ----

fn pod(p: core::Pod) -> Mapped {
    let core::Pod {
        metadata,
        spec,
        status,
    } = p;
    Obj::default()
        .msg("metadata", metadata, object_meta)?
        .msg("spec", spec, pod_spec)?
        .msg("status", status, pod_status)?
        .done()
}

fn pod_spec(s: core::PodSpec) -> Mapped {
    let core::PodSpec {
        volumes,
        init_containers,
        containers,
        ephemeral_containers,
        restart_policy,
        termination_grace_period_seconds,
        active_deadline_seconds,
        dns_policy,
        node_selector,
        service_account_name,
        service_account,
        automount_service_account_token,
        node_name,
        host_network,
        host_pid,
        host_ipc,
        share_process_namespace,
        security_context,
        image_pull_secrets,
        hostname,
        subdomain,
        affinity,
        scheduler_name,
        tolerations,
        host_aliases,
        priority_class_name,
        priority,
        dns_config,
        readiness_gates,
        runtime_class_name,
        enable_service_links,
        preemption_policy,
        overhead,
        topology_spread_constraints,
        set_hostname_as_fqdn,
        os,
        host_users,
        scheduling_gates,
        resource_claims,
        resources,
        hostname_override,
        workload_ref,
    } = s;
    unmapped("ephemeralContainers", &ephemeral_containers)?;
    unmapped("affinity", &affinity)?;
    unmapped("topologySpreadConstraints", &topology_spread_constraints)?;
    unmapped("resourceClaims", &resource_claims)?;
    unmapped("workloadRef", &workload_ref)?;
    Obj::default()
        .msgs("volumes", volumes, volume)?
        .msgs("initContainers", init_containers, container)?
        .msgs("containers", containers, container)?
        .s("restartPolicy", restart_policy)
        .p(
            "terminationGracePeriodSeconds",
            termination_grace_period_seconds,
        )
        .p("activeDeadlineSeconds", active_deadline_seconds)
        .s("dnsPolicy", dns_policy)
        .strings("nodeSelector", node_selector)
        .s("serviceAccountName", service_account_name)
        .s("serviceAccount", service_account)
        .p(
            "automountServiceAccountToken",
            automount_service_account_token,
        )
        .s("nodeName", node_name)
        .z("hostNetwork", host_network)
        .z("hostPID", host_pid)
        .z("hostIPC", host_ipc)
        .p("shareProcessNamespace", share_process_namespace)
        .msg("securityContext", security_context, pod_security_context)?
        .msgs(
            "imagePullSecrets",
            image_pull_secrets,
            local_object_reference,
        )?
        .s("hostname", hostname)
        .s("subdomain", subdomain)
        .s("schedulerName", scheduler_name)
        .msgs("tolerations", tolerations, toleration)?
        .msgs("hostAliases", host_aliases, |a| {
            let core::HostAlias { ip, hostnames } = a;
            Obj::default()
                .s("ip", ip)
                .list("hostnames", hostnames)
                .done()
        })?
        .s("priorityClassName", priority_class_name)
        .p("priority", priority)
        .msg("dnsConfig", dns_config, |c| {
            let core::PodDnsConfig {
                nameservers,
                searches,
                options,
            } = c;
            Obj::default()
                .list("nameservers", nameservers)
                .list("searches", searches)
                .msgs("options", options, |o| {
                    let core::PodDnsConfigOption { name, value } = o;
                    Obj::default().s("name", name).p("value", value).done()
                })?
                .done()
        })?
        .msgs("readinessGates", readiness_gates, |g| {
            let core::PodReadinessGate { condition_type } = g;
            Obj::default().s("conditionType", condition_type).done()
        })?
        .p("runtimeClassName", runtime_class_name)
        .p("enableServiceLinks", enable_service_links)
        .p("preemptionPolicy", preemption_policy)
        .quantities("overhead", overhead)
        .p("setHostnameAsFQDN", set_hostname_as_fqdn)
        .msg("os", os, |o| {
            let core::PodOs { name } = o;
            Obj::default().s("name", name).done()
        })?
        .p("hostUsers", host_users)
        .msgs("schedulingGates", scheduling_gates, |g| {
            let core::PodSchedulingGate { name } = g;
            Obj::default().s("name", name).done()
        })?
        .msg("resources", resources, resource_requirements)?
        .p("hostnameOverride", hostname_override)
        .done()
}

fn local_object_reference(r: core::LocalObjectReference) -> Mapped {
    let core::LocalObjectReference { name } = r;
    Obj::default().s("name", name).done()
}

fn toleration(t: core::Toleration) -> Mapped {
    let core::Toleration {
        key,
        operator,
        value,
        effect,
        toleration_seconds,
    } = t;
    Obj::default()
        .s("key", key)
        .s("operator", operator)
        .s("value", value)
        .s("effect", effect)
        .p("tolerationSeconds", toleration_seconds)
        .done()
}

fn resource_requirements(r: core::ResourceRequirements) -> Mapped {
    let core::ResourceRequirements {
        limits,
        requests,
        claims,
    } = r;
    Obj::default()
        .quantities("limits", limits)
        .quantities("requests", requests)
        .msgs("claims", claims, |c| {
            let core::ResourceClaim { name, request } = c;
            Obj::default().s("name", name).s("request", request).done()
        })?
        .done()
}

fn container(c: core::Container) -> Mapped {
    let core::Container {
        name,
        image,
        command,
        args,
        working_dir,
        ports,
        env_from,
        env,
        resources,
        resize_policy,
        restart_policy,
        restart_policy_rules,
        volume_mounts,
        volume_devices,
        liveness_probe,
        readiness_probe,
        startup_probe,
        lifecycle,
        termination_message_path,
        termination_message_policy,
        image_pull_policy,
        security_context,
        stdin,
        stdin_once,
        tty,
    } = c;
    unmapped("restartPolicyRules", &restart_policy_rules)?;
    Obj::default()
        .s("name", name)
        .s("image", image)
        .list("command", command)
        .list("args", args)
        .s("workingDir", working_dir)
        .msgs("ports", ports, |p| {
            let core::ContainerPort {
                name,
                host_port,
                container_port,
                protocol,
                host_ip,
            } = p;
            Obj::default()
                .s("name", name)
                .z("hostPort", host_port)
                .z("containerPort", container_port)
                .s("protocol", protocol)
                .s("hostIP", host_ip)
                .done()
        })?
        .msgs("envFrom", env_from, env_from_source)?
        .msgs("env", env, env_var)?
        .msg("resources", resources, resource_requirements)?
        .msgs("resizePolicy", resize_policy, |r| {
            let core::ContainerResizePolicy {
                resource_name,
                restart_policy,
            } = r;
            Obj::default()
                .s("resourceName", resource_name)
                .s("restartPolicy", restart_policy)
                .done()
        })?
        .p("restartPolicy", restart_policy)
        .msgs("volumeMounts", volume_mounts, volume_mount)?
        .msgs("volumeDevices", volume_devices, |d| {
            let core::VolumeDevice { name, device_path } = d;
            Obj::default()
                .s("name", name)
                .s("devicePath", device_path)
                .done()
        })?
        .msg("livenessProbe", liveness_probe, probe)?
        .msg("readinessProbe", readiness_probe, probe)?
        .msg("startupProbe", startup_probe, probe)?
        .msg("lifecycle", lifecycle, |l| {
            let core::Lifecycle {
                post_start,
                pre_stop,
                stop_signal,
            } = l;
            Obj::default()
                .msg("postStart", post_start, lifecycle_handler)?
                .msg("preStop", pre_stop, lifecycle_handler)?
                .p("stopSignal", stop_signal)
                .done()
        })?
        .s("terminationMessagePath", termination_message_path)
        .s("terminationMessagePolicy", termination_message_policy)
        .s("imagePullPolicy", image_pull_policy)
        .msg("securityContext", security_context, security_context_of)?
        .z("stdin", stdin)
        .z("stdinOnce", stdin_once)
        .z("tty", tty)
        .done()
}

fn env_var(e: core::EnvVar) -> Mapped {
    let core::EnvVar {
        name,
        value,
        value_from,
    } = e;
    Obj::default()
        .s("name", name)
        .s("value", value)
        .msg("valueFrom", value_from, |v| {
            let core::EnvVarSource {
                field_ref,
                resource_field_ref,
                config_map_key_ref,
                secret_key_ref,
                file_key_ref,
            } = v;
            unmapped("fileKeyRef", &file_key_ref)?;
            Obj::default()
                .msg("fieldRef", field_ref, object_field_selector)?
                .msg(
                    "resourceFieldRef",
                    resource_field_ref,
                    resource_field_selector,
                )?
                .msg("configMapKeyRef", config_map_key_ref, |r| {
                    let core::ConfigMapKeySelector {
                        local_object_reference,
                        key,
                        optional,
                    } = r;
                    Obj::default()
                        .inline(local_object_reference, self::local_object_reference)?
                        .s("key", key)
                        .p("optional", optional)
                        .done()
                })?
                .msg("secretKeyRef", secret_key_ref, |r| {
                    let core::SecretKeySelector {
                        local_object_reference,
                        key,
                        optional,
                    } = r;
                    Obj::default()
                        .inline(local_object_reference, self::local_object_reference)?
                        .s("key", key)
                        .p("optional", optional)
                        .done()
                })?
                .done()
        })?
        .done()
}

fn object_field_selector(f: core::ObjectFieldSelector) -> Mapped {
    let core::ObjectFieldSelector {
        api_version,
        field_path,
    } = f;
    Obj::default()
        .s("apiVersion", api_version)
        .s("fieldPath", field_path)
        .done()
}

fn resource_field_selector(r: core::ResourceFieldSelector) -> Mapped {
    let core::ResourceFieldSelector {
        container_name,
        resource,
        divisor,
    } = r;
    Obj::default()
        .s("containerName", container_name)
        .s("resource", resource)
        .quantity("divisor", divisor)
        .done()
}

fn env_from_source(e: core::EnvFromSource) -> Mapped {
    let core::EnvFromSource {
        prefix,
        config_map_ref,
        secret_ref,
    } = e;
    Obj::default()
        .s("prefix", prefix)
        .msg("configMapRef", config_map_ref, |r| {
            let core::ConfigMapEnvSource {
                local_object_reference,
                optional,
            } = r;
            Obj::default()
                .inline(local_object_reference, self::local_object_reference)?
                .p("optional", optional)
                .done()
        })?
        .msg("secretRef", secret_ref, |r| {
            let core::SecretEnvSource {
                local_object_reference,
                optional,
            } = r;
            Obj::default()
                .inline(local_object_reference, self::local_object_reference)?
                .p("optional", optional)
                .done()
        })?
        .done()
}

fn volume_mount(m: core::VolumeMount) -> Mapped {
    let core::VolumeMount {
        name,
        read_only,
        recursive_read_only,
        mount_path,
        sub_path,
        mount_propagation,
        sub_path_expr,
    } = m;
    Obj::default()
        .s("name", name)
        .z("readOnly", read_only)
        .p("recursiveReadOnly", recursive_read_only)
        .s("mountPath", mount_path)
        .s("subPath", sub_path)
        .p("mountPropagation", mount_propagation)
        .s("subPathExpr", sub_path_expr)
        .done()
}

fn probe(p: core::Probe) -> Mapped {
    let core::Probe {
        handler,
        initial_delay_seconds,
        timeout_seconds,
        period_seconds,
        success_threshold,
        failure_threshold,
        termination_grace_period_seconds,
    } = p;
    let core::ProbeHandler {
        exec,
        http_get,
        tcp_socket,
        grpc,
    } = handler.unwrap_or_default();
    Obj::default()
        .msg("exec", exec, exec_action)?
        .msg("httpGet", http_get, http_get_action)?
        .msg("tcpSocket", tcp_socket, tcp_socket_action)?
        .msg("grpc", grpc, |g| {
            let core::GrpcAction { port, service } = g;
            Obj::default()
                .put("port", port.unwrap_or(0).into())
                .p("service", service)
                .done()
        })?
        .z("initialDelaySeconds", initial_delay_seconds)
        .z("timeoutSeconds", timeout_seconds)
        .z("periodSeconds", period_seconds)
        .z("successThreshold", success_threshold)
        .z("failureThreshold", failure_threshold)
        .p(
            "terminationGracePeriodSeconds",
            termination_grace_period_seconds,
        )
        .done()
}

fn lifecycle_handler(h: core::LifecycleHandler) -> Mapped {
    let core::LifecycleHandler {
        exec,
        http_get,
        tcp_socket,
        sleep,
    } = h;
    Obj::default()
        .msg("exec", exec, exec_action)?
        .msg("httpGet", http_get, http_get_action)?
        .msg("tcpSocket", tcp_socket, tcp_socket_action)?
        .msg("sleep", sleep, |s| {
            let core::SleepAction { seconds } = s;
            Obj::default()
                .put("seconds", seconds.unwrap_or(0).into())
                .done()
        })?
        .done()
}

fn exec_action(e: core::ExecAction) -> Mapped {
    let core::ExecAction { command } = e;
    Obj::default().list("command", command).done()
}

fn http_get_action(h: core::HttpGetAction) -> Mapped {
    let core::HttpGetAction {
        path,
        port,
        host,
        scheme,
        http_headers,
    } = h;
    Obj::default()
        .s("path", path)
        .int_or_string("port", port)
        .s("host", host)
        .s("scheme", scheme)
        .msgs("httpHeaders", http_headers, |h| {
            let core::HttpHeader { name, value } = h;
            Obj::default()
                .put("name", Value::String(name.unwrap_or_default()))
                .put("value", Value::String(value.unwrap_or_default()))
                .done()
        })?
        .done()
}

fn tcp_socket_action(t: core::TcpSocketAction) -> Mapped {
    let core::TcpSocketAction { port, host } = t;
    Obj::default()
        .int_or_string("port", port)
        .s("host", host)
        .done()
}

fn security_context_of(s: core::SecurityContext) -> Mapped {
    let core::SecurityContext {
        capabilities,
        privileged,
        se_linux_options,
        windows_options,
        run_as_user,
        run_as_group,
        run_as_non_root,
        read_only_root_filesystem,
        allow_privilege_escalation,
        proc_mount,
        seccomp_profile,
        app_armor_profile,
    } = s;
    unmapped("windowsOptions", &windows_options)?;
    Obj::default()
        .msg("capabilities", capabilities, |c| {
            let core::Capabilities { add, drop } = c;
            Obj::default().list("add", add).list("drop", drop).done()
        })?
        .p("privileged", privileged)
        .msg("seLinuxOptions", se_linux_options, se_linux_options_of)?
        .p("runAsUser", run_as_user)
        .p("runAsGroup", run_as_group)
        .p("runAsNonRoot", run_as_non_root)
        .p("readOnlyRootFilesystem", read_only_root_filesystem)
        .p("allowPrivilegeEscalation", allow_privilege_escalation)
        .p("procMount", proc_mount)
        .msg("seccompProfile", seccomp_profile, seccomp_profile_of)?
        .msg("appArmorProfile", app_armor_profile, app_armor_profile_of)?
        .done()
}

fn pod_security_context(s: core::PodSecurityContext) -> Mapped {
    let core::PodSecurityContext {
        se_linux_options,
        windows_options,
        run_as_user,
        run_as_group,
        run_as_non_root,
        supplemental_groups,
        supplemental_groups_policy,
        fs_group,
        sysctls,
        fs_group_change_policy,
        seccomp_profile,
        app_armor_profile,
        se_linux_change_policy,
    } = s;
    unmapped("windowsOptions", &windows_options)?;
    Obj::default()
        .msg("seLinuxOptions", se_linux_options, se_linux_options_of)?
        .p("runAsUser", run_as_user)
        .p("runAsGroup", run_as_group)
        .p("runAsNonRoot", run_as_non_root)
        .list("supplementalGroups", supplemental_groups)
        .p("supplementalGroupsPolicy", supplemental_groups_policy)
        .p("fsGroup", fs_group)
        .msgs("sysctls", sysctls, |s| {
            let core::Sysctl { name, value } = s;
            Obj::default()
                .put("name", Value::String(name.unwrap_or_default()))
                .put("value", Value::String(value.unwrap_or_default()))
                .done()
        })?
        .p("fsGroupChangePolicy", fs_group_change_policy)
        .msg("seccompProfile", seccomp_profile, seccomp_profile_of)?
        .msg("appArmorProfile", app_armor_profile, app_armor_profile_of)?
        .p("seLinuxChangePolicy", se_linux_change_policy)
        .done()
}

fn se_linux_options_of(o: core::SeLinuxOptions) -> Mapped {
    let core::SeLinuxOptions {
        user,
        role,
        r#type,
        level,
    } = o;
    Obj::default()
        .s("user", user)
        .s("role", role)
        .s("type", r#type)
        .s("level", level)
        .done()
}

fn seccomp_profile_of(p: core::SeccompProfile) -> Mapped {
    let core::SeccompProfile {
        r#type,
        localhost_profile,
    } = p;
    Obj::default()
        .s("type", r#type)
        .p("localhostProfile", localhost_profile)
        .done()
}

fn app_armor_profile_of(p: core::AppArmorProfile) -> Mapped {
    let core::AppArmorProfile {
        r#type,
        localhost_profile,
    } = p;
    Obj::default()
        .s("type", r#type)
        .p("localhostProfile", localhost_profile)
        .done()
}

fn key_to_path(k: core::KeyToPath) -> Mapped {
    let core::KeyToPath { key, path, mode } = k;
    Obj::default()
        .s("key", key)
        .s("path", path)
        .p("mode", mode)
        .done()
}

fn volume(v: core::Volume) -> Mapped {
    let core::Volume {
        name,
        volume_source,
    } = v;
    let core::VolumeSource {
        host_path,
        empty_dir,
        gce_persistent_disk,
        aws_elastic_block_store,
        git_repo,
        secret,
        nfs,
        iscsi,
        glusterfs,
        persistent_volume_claim,
        rbd,
        flex_volume,
        cinder,
        cephfs,
        flocker,
        downward_api,
        fc,
        azure_file,
        config_map,
        vsphere_volume,
        quobyte,
        azure_disk,
        photon_persistent_disk,
        projected,
        portworx_volume,
        scale_io,
        storageos,
        csi,
        ephemeral,
        image,
    } = volume_source.unwrap_or_default();
    unmapped("gcePersistentDisk", &gce_persistent_disk)?;
    unmapped("awsElasticBlockStore", &aws_elastic_block_store)?;
    unmapped("gitRepo", &git_repo)?;
    unmapped("nfs", &nfs)?;
    unmapped("iscsi", &iscsi)?;
    unmapped("glusterfs", &glusterfs)?;
    unmapped("rbd", &rbd)?;
    unmapped("flexVolume", &flex_volume)?;
    unmapped("cinder", &cinder)?;
    unmapped("cephfs", &cephfs)?;
    unmapped("flocker", &flocker)?;
    unmapped("fc", &fc)?;
    unmapped("azureFile", &azure_file)?;
    unmapped("vsphereVolume", &vsphere_volume)?;
    unmapped("quobyte", &quobyte)?;
    unmapped("azureDisk", &azure_disk)?;
    unmapped("photonPersistentDisk", &photon_persistent_disk)?;
    unmapped("projected", &projected)?;
    unmapped("portworxVolume", &portworx_volume)?;
    unmapped("scaleIO", &scale_io)?;
    unmapped("storageos", &storageos)?;
    unmapped("csi", &csi)?;
    unmapped("ephemeral", &ephemeral)?;
    unmapped("image", &image)?;
    Obj::default()
        .s("name", name)
        .msg("hostPath", host_path, |h| {
            let core::HostPathVolumeSource { path, r#type } = h;
            Obj::default().s("path", path).p("type", r#type).done()
        })?
        .msg("emptyDir", empty_dir, |e| {
            let core::EmptyDirVolumeSource { medium, size_limit } = e;
            Obj::default()
                .s("medium", medium)
                .quantity("sizeLimit", size_limit)
                .done()
        })?
        .msg("secret", secret, |s| {
            let core::SecretVolumeSource {
                secret_name,
                items,
                default_mode,
                optional,
            } = s;
            Obj::default()
                .s("secretName", secret_name)
                .msgs("items", items, key_to_path)?
                .p("defaultMode", default_mode)
                .p("optional", optional)
                .done()
        })?
        .msg("persistentVolumeClaim", persistent_volume_claim, |c| {
            let core::PersistentVolumeClaimVolumeSource {
                claim_name,
                read_only,
            } = c;
            Obj::default()
                .s("claimName", claim_name)
                .z("readOnly", read_only)
                .done()
        })?
        .msg("downwardAPI", downward_api, |d| {
            let core::DownwardAPIVolumeSource {
                items,
                default_mode,
            } = d;
            Obj::default()
                .msgs("items", items, |f| {
                    let core::DownwardAPIVolumeFile {
                        path,
                        field_ref,
                        resource_field_ref,
                        mode,
                    } = f;
                    Obj::default()
                        .s("path", path)
                        .msg("fieldRef", field_ref, object_field_selector)?
                        .msg(
                            "resourceFieldRef",
                            resource_field_ref,
                            resource_field_selector,
                        )?
                        .p("mode", mode)
                        .done()
                })?
                .p("defaultMode", default_mode)
                .done()
        })?
        .msg("configMap", config_map, |c| {
            let core::ConfigMapVolumeSource {
                local_object_reference,
                items,
                default_mode,
                optional,
            } = c;
            Obj::default()
                .inline(local_object_reference, self::local_object_reference)?
                .msgs("items", items, key_to_path)?
                .p("defaultMode", default_mode)
                .p("optional", optional)
                .done()
        })?
        .done()
}

fn pod_status(s: core::PodStatus) -> Mapped {
    let core::PodStatus {
        observed_generation,
        phase,
        conditions,
        message,
        reason,
        nominated_node_name,
        host_ip,
        host_ips,
        pod_ip,
        pod_ips,
        start_time,
        init_container_statuses,
        container_statuses,
        qos_class,
        ephemeral_container_statuses,
        resize,
        resource_claim_statuses,
        extended_resource_claim_status,
        allocated_resources,
        resources,
    } = s;
    unmapped("initContainerStatuses", &init_container_statuses)?;
    unmapped("containerStatuses", &container_statuses)?;
    unmapped("ephemeralContainerStatuses", &ephemeral_container_statuses)?;
    unmapped("resourceClaimStatuses", &resource_claim_statuses)?;
    unmapped(
        "extendedResourceClaimStatus",
        &extended_resource_claim_status,
    )?;
    Obj::default()
        .z("observedGeneration", observed_generation)
        .s("phase", phase)
        .msgs("conditions", conditions, |c| {
            let core::PodCondition {
                r#type,
                observed_generation,
                status,
                last_probe_time,
                last_transition_time,
                reason,
                message,
            } = c;
            Obj::default()
                .s("type", r#type)
                .z("observedGeneration", observed_generation)
                .s("status", status)
                .time("lastProbeTime", last_probe_time)?
                .time("lastTransitionTime", last_transition_time)?
                .s("reason", reason)
                .s("message", message)
                .done()
        })?
        .s("message", message)
        .s("reason", reason)
        .s("nominatedNodeName", nominated_node_name)
        .s("hostIP", host_ip)
        .msgs("hostIPs", host_ips, |h| {
            let core::HostIp { ip } = h;
            Obj::default().s("ip", ip).done()
        })?
        .s("podIP", pod_ip)
        .msgs("podIPs", pod_ips, |p| {
            let core::PodIp { ip } = p;
            Obj::default().s("ip", ip).done()
        })?
        .time("startTime", start_time)?
        .s("qosClass", qos_class)
        .s("resize", resize)
        .quantities("allocatedResources", allocated_resources)
        .msg("resources", resources, resource_requirements)?
        .done()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds;
    use serde_json::json;

    fn kind(api_version: &str, name: &str) -> Kind {
        kinds::builtins()
            .into_iter()
            .find(|k| k.api_version() == api_version && k.kind == name)
            .expect("a built-in kind")
    }

    /// What client-go sends: the magic bytes and a `runtime.Unknown` around `object`.
    fn envelope_of(api_version: &str, kind: &str, object: &impl Message) -> Vec<u8> {
        let unknown = Unknown {
            type_meta: Some(k8s_pb::apimachinery::pkg::runtime::TypeMeta {
                api_version: Some(api_version.into()),
                kind: Some(kind.into()),
            }),
            raw: Some(object.encode_to_vec()),
            content_encoding: Some(String::new()),
            content_type: Some(String::new()),
        };
        let mut body = MAGIC.to_vec();
        body.extend(unknown.encode_to_vec());
        body
    }

    /// ObjectMeta as Go encodes a new object's: every value field present, zero or not.
    fn new_meta(name: &str) -> meta::ObjectMeta {
        meta::ObjectMeta {
            name: Some(name.into()),
            generate_name: Some(String::new()),
            namespace: Some(String::new()),
            self_link: Some(String::new()),
            uid: Some(String::new()),
            resource_version: Some(String::new()),
            generation: Some(0),
            creation_timestamp: Some(meta::Time::default()),
            ..Default::default()
        }
    }

    #[test]
    fn a_secret_as_kubectl_create_secret_generic_sends_it() {
        let secret = core::Secret {
            metadata: Some(new_meta("rabbitmq")),
            data: [(
                "uri".to_string(),
                b"amqp://guest:guest@127.0.0.1:5672/%2f".to_vec(),
            )]
            .into(),
            r#type: Some("Opaque".into()),
            ..Default::default()
        };
        let body = envelope_of("v1", "Secret", &secret);
        let obj = decode_object(&kind("v1", "Secret"), &body).unwrap();
        assert_eq!(
            obj,
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "rabbitmq"},
                "data": {"uri": "YW1xcDovL2d1ZXN0Omd1ZXN0QDEyNy4wLjAuMTo1NjcyLyUyZg=="}, "type": "Opaque"})
        );
    }

    #[test]
    fn string_data_immutable_and_binary_data_come_through() {
        let secret = core::Secret {
            metadata: Some(new_meta("s")),
            string_data: [("a".to_string(), "b".to_string())].into(),
            immutable: Some(false),
            ..Default::default()
        };
        let obj =
            decode_object(&kind("v1", "Secret"), &envelope_of("v1", "Secret", &secret)).unwrap();
        assert_eq!(obj["stringData"], json!({"a": "b"}));
        assert_eq!(obj["immutable"], false, "a pointer field keeps its zero");
        let cm = core::ConfigMap {
            metadata: Some(new_meta("c")),
            data: [("k".to_string(), "v".to_string())].into(),
            binary_data: [("bin".to_string(), vec![0u8, 255])].into(),
            ..Default::default()
        };
        let obj = decode_object(
            &kind("v1", "ConfigMap"),
            &envelope_of("v1", "ConfigMap", &cm),
        )
        .unwrap();
        assert_eq!(obj["data"], json!({"k": "v"}));
        assert_eq!(obj["binaryData"], json!({"bin": "AP8="}));
        assert!(obj.get("immutable").is_none());
    }

    #[test]
    fn metadata_maps_times_owners_and_managed_fields() {
        let mut m = new_meta("n");
        m.labels = [("app".to_string(), "x".to_string())].into();
        m.creation_timestamp = Some(meta::Time {
            seconds: Some(1_700_000_000),
            nanos: Some(5),
        });
        m.deletion_grace_period_seconds = Some(0);
        m.owner_references = vec![meta::OwnerReference {
            api_version: Some("v1".into()),
            kind: Some("ConfigMap".into()),
            name: Some("o".into()),
            uid: Some("u-1".into()),
            controller: Some(true),
            block_owner_deletion: None,
        }];
        m.managed_fields = vec![meta::ManagedFieldsEntry {
            manager: Some("kubectl-create".into()),
            operation: Some("Update".into()),
            api_version: Some("v1".into()),
            time: None,
            fields_type: Some("FieldsV1".into()),
            fields_v1: Some(meta::FieldsV1 {
                raw: Some(br#"{"f:data":{}}"#.to_vec()),
            }),
            subresource: Some(String::new()),
        }];
        let ns = core::Namespace {
            metadata: Some(m),
            spec: Some(core::NamespaceSpec::default()),
            status: Some(core::NamespaceStatus::default()),
        };
        let obj = decode_object(
            &kind("v1", "Namespace"),
            &envelope_of("v1", "Namespace", &ns),
        )
        .unwrap();
        let meta = &obj["metadata"];
        assert_eq!(meta["creationTimestamp"], "2023-11-14T22:13:20Z");
        assert_eq!(meta["deletionGracePeriodSeconds"], 0);
        assert_eq!(meta["labels"], json!({"app": "x"}));
        assert_eq!(
            meta["ownerReferences"],
            json!([{"apiVersion": "v1", "kind": "ConfigMap", "name": "o", "uid": "u-1", "controller": true}])
        );
        assert_eq!(meta["managedFields"][0]["fieldsV1"], json!({"f:data": {}}));
        assert_eq!(obj["spec"], json!({}));
        assert_eq!(obj["status"], json!({}));
    }

    #[test]
    fn events_and_leases_map_their_micro_times() {
        let time = meta::MicroTime {
            seconds: Some(1_700_000_000),
            nanos: Some(123_456_789),
        };
        let ev = events::Event {
            metadata: Some(new_meta("e")),
            event_time: Some(time),
            reason: Some("ScaledUp".into()),
            note: Some("up".into()),
            regarding: Some(core::ObjectReference {
                kind: Some("Pod".into()),
                name: Some("p".into()),
                ..Default::default()
            }),
            deprecated_count: Some(0),
            ..Default::default()
        };
        let obj = decode_object(
            &kind("events.k8s.io/v1", "Event"),
            &envelope_of("events.k8s.io/v1", "Event", &ev),
        )
        .unwrap();
        assert_eq!(obj["eventTime"], "2023-11-14T22:13:20.123456Z");
        assert_eq!(obj["regarding"], json!({"kind": "Pod", "name": "p"}));
        assert_eq!(obj["note"], "up");
        assert!(obj.get("deprecatedCount").is_none());
        let core_ev = core::Event {
            metadata: Some(new_meta("e")),
            involved_object: Some(core::ObjectReference {
                name: Some("p".into()),
                ..Default::default()
            }),
            message: Some("hi".into()),
            count: Some(2),
            first_timestamp: Some(meta::Time {
                seconds: Some(0),
                nanos: None,
            }),
            ..Default::default()
        };
        let obj =
            decode_object(&kind("v1", "Event"), &envelope_of("v1", "Event", &core_ev)).unwrap();
        assert_eq!(obj["involvedObject"]["name"], "p");
        assert_eq!(obj["count"], 2);
        assert_eq!(obj["firstTimestamp"], "1970-01-01T00:00:00Z");
        let lease = coordination::Lease {
            metadata: Some(new_meta("l")),
            spec: Some(coordination::LeaseSpec {
                holder_identity: Some("me".into()),
                lease_duration_seconds: Some(15),
                renew_time: Some(time),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        let obj = decode_object(
            &kind("coordination.k8s.io/v1", "Lease"),
            &envelope_of("coordination.k8s.io/v1", "Lease", &lease),
        )
        .unwrap();
        assert_eq!(
            obj["spec"],
            json!({"holderIdentity": "me", "leaseDurationSeconds": 15,
                "renewTime": "2023-11-14T22:13:20.123456Z", "leaseTransitions": 0})
        );
    }

    #[test]
    fn a_pod_maps_containers_env_volumes_and_probes() {
        let container = core::Container {
            name: Some("main".into()),
            image: Some("busybox".into()),
            command: vec!["sh".into(), "-c".into(), "sleep 1".into()],
            env: vec![
                core::EnvVar {
                    name: Some("A".into()),
                    value: Some("1".into()),
                    value_from: None,
                },
                core::EnvVar {
                    name: Some("URI".into()),
                    value: Some(String::new()),
                    value_from: Some(core::EnvVarSource {
                        secret_key_ref: Some(core::SecretKeySelector {
                            local_object_reference: Some(core::LocalObjectReference {
                                name: Some("rabbitmq".into()),
                            }),
                            key: Some("uri".into()),
                            optional: None,
                        }),
                        ..Default::default()
                    }),
                },
            ],
            resources: Some(core::ResourceRequirements {
                limits: [(
                    "cpu".to_string(),
                    Quantity {
                        string: Some("100m".into()),
                    },
                )]
                .into(),
                ..Default::default()
            }),
            volume_mounts: vec![core::VolumeMount {
                name: Some("cfg".into()),
                mount_path: Some("/etc/cfg".into()),
                read_only: Some(true),
                ..Default::default()
            }],
            readiness_probe: Some(core::Probe {
                handler: Some(core::ProbeHandler {
                    http_get: Some(core::HttpGetAction {
                        path: Some("/ready".into()),
                        port: Some(IntOrString {
                            r#type: Some(1),
                            int_val: Some(0),
                            str_val: Some("http".into()),
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                period_seconds: Some(5),
                ..Default::default()
            }),
            stdin: Some(false),
            ..Default::default()
        };
        let pod = core::Pod {
            metadata: Some(new_meta("p")),
            spec: Some(core::PodSpec {
                containers: vec![container],
                volumes: vec![core::Volume {
                    name: Some("cfg".into()),
                    volume_source: Some(core::VolumeSource {
                        config_map: Some(core::ConfigMapVolumeSource {
                            local_object_reference: Some(core::LocalObjectReference {
                                name: Some("settings".into()),
                            }),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                }],
                restart_policy: Some("Never".into()),
                termination_grace_period_seconds: Some(0),
                host_network: Some(false),
                ..Default::default()
            }),
            status: Some(core::PodStatus::default()),
        };
        let obj = decode_object(&kind("v1", "Pod"), &envelope_of("v1", "Pod", &pod)).unwrap();
        assert_eq!(
            obj["spec"],
            json!({
                "volumes": [{"name": "cfg", "configMap": {"name": "settings"}}],
                "containers": [{
                    "name": "main", "image": "busybox", "command": ["sh", "-c", "sleep 1"],
                    "env": [{"name": "A", "value": "1"},
                        {"name": "URI", "valueFrom": {"secretKeyRef": {"name": "rabbitmq", "key": "uri"}}}],
                    "resources": {"limits": {"cpu": "100m"}},
                    "volumeMounts": [{"name": "cfg", "readOnly": true, "mountPath": "/etc/cfg"}],
                    "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 5},
                }],
                "restartPolicy": "Never",
                "terminationGracePeriodSeconds": 0,
            })
        );
        assert_eq!(obj["status"], json!({}));
    }

    #[test]
    fn a_field_the_mapping_lacks_is_415_naming_it() {
        let pod = core::Pod {
            metadata: Some(new_meta("p")),
            spec: Some(core::PodSpec {
                containers: vec![core::Container {
                    name: Some("c".into()),
                    ..Default::default()
                }],
                affinity: Some(core::Affinity {
                    node_affinity: Some(core::NodeAffinity::default()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            status: None,
        };
        let err = decode_object(&kind("v1", "Pod"), &envelope_of("v1", "Pod", &pod)).unwrap_err();
        assert_eq!((err.code, err.reason), (415, "UnsupportedMediaType"));
        assert!(err.message.contains("spec.affinity"), "{}", err.message);
        let pod = core::Pod {
            spec: Some(core::PodSpec {
                volumes: vec![
                    core::Volume::default(),
                    core::Volume {
                        name: Some("nfs".into()),
                        volume_source: Some(core::VolumeSource {
                            nfs: Some(core::NfsVolumeSource {
                                server: Some("s".into()),
                                ..Default::default()
                            }),
                            ..Default::default()
                        }),
                    },
                ],
                ..Default::default()
            }),
            ..Default::default()
        };
        let err = decode_object(&kind("v1", "Pod"), &envelope_of("v1", "Pod", &pod)).unwrap_err();
        assert!(
            err.message.contains("spec.volumes[1].nfs"),
            "{}",
            err.message
        );
    }

    #[test]
    fn kinds_without_a_decoder_and_mismatched_bodies_are_refused() {
        let crd = kinds::from_crd(&crate::fixtures::pool_crd())
            .unwrap()
            .remove(0);
        let secret = core::Secret::default();
        let err = decode_object(&crd, &envelope_of("v1", "Secret", &secret)).unwrap_err();
        assert_eq!((err.code, err.reason), (415, "UnsupportedMediaType"));
        assert!(
            err.message
                .contains("testrunner.dev/v1alpha1 TestRunnerPool")
                && err.message.contains("v1 Secret"),
            "{}",
            err.message
        );
        let cm = core::ConfigMap::default();
        let err =
            decode_object(&kind("v1", "Secret"), &envelope_of("v1", "ConfigMap", &cm)).unwrap_err();
        assert_eq!(err.code, 400);
        assert!(err.message.contains("ConfigMap"), "{}", err.message);
        let err = decode_object(&kind("v1", "Secret"), &envelope_of("v2", "Secret", &secret))
            .unwrap_err();
        assert!(
            err.message
                .contains("does not match the expected API version"),
            "{}",
            err.message
        );
        for bad in [&b"{\"kind\": \"Secret\"}"[..], b"k8s\0\xff\xff\xff"] {
            let err = decode_object(&kind("v1", "Secret"), bad).unwrap_err();
            assert_eq!(err.code, 400, "{}", err.message);
            assert!(err.message.contains("cannot be handled as a Secret"));
        }
        let mut truncated = envelope_of(
            "v1",
            "Secret",
            &core::Secret {
                metadata: Some(new_meta("s")),
                ..Default::default()
            },
        );
        // Past the two empty content fields (two bytes each), into the object.
        truncated.truncate(truncated.len() - 6);
        assert_eq!(
            decode_object(&kind("v1", "Secret"), &truncated)
                .unwrap_err()
                .code,
            400
        );
    }

    #[test]
    fn every_listed_kind_has_a_decoder_and_a_served_kind() {
        let served = kinds::builtins();
        for (api_version, name) in DECODED {
            assert!(decoder(api_version, name).is_some(), "{api_version} {name}");
            let k = served
                .iter()
                .find(|k| k.api_version() == *api_version && k.kind == *name)
                .unwrap_or_else(|| panic!("{api_version} {name} is not served"));
            let obj = decode_object(k, &envelope_of(api_version, name, &())).unwrap();
            assert_eq!(obj["kind"], *name);
        }
    }

    #[test]
    fn delete_options_decode() {
        let opts = meta::DeleteOptions {
            grace_period_seconds: Some(0),
            propagation_policy: Some("Orphan".into()),
            dry_run: vec!["All".into()],
            ..Default::default()
        };
        let v = decode_delete_options(&envelope_of("v1", "DeleteOptions", &opts)).unwrap();
        assert_eq!(v["gracePeriodSeconds"], 0);
        assert_eq!(v["propagationPolicy"], "Orphan");
        assert_eq!(v["dryRun"], json!(["All"]));
    }
}
