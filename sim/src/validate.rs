//! Validation of custom resources against their CRD's `openAPIV3Schema`, as the API
//! server does it: unknown fields are pruned (or refused under strict field
//! validation), `default:` values are filled in, then the object is checked against the
//! schema and its `x-kubernetes-validations` rules. Pods get the few checks of the real
//! API server's pod validation that the simulation relies on ([`pod_spec`]).

use serde_json::{Map, Value};

/// One invalid field.
#[derive(Clone, Debug, PartialEq)]
pub struct Cause {
    /// The field, as `spec.scaling.minWorkers`.
    pub field: String,
    /// What is wrong, as `Invalid value: 5: must be ...`.
    pub message: String,
    /// `FieldValueInvalid`, `FieldValueRequired`, ...
    pub reason: String,
}

/// Prunes unknown fields (returned as `spec.foo` paths), drops nulls the schema does not
/// allow, and fills in defaults, recursively.
pub fn normalize(schema: &Value, obj: &mut Value) -> Vec<String> {
    let mut unknown = Vec::new();
    if let Some(map) = obj.as_object_mut() {
        let props = schema.get("properties").and_then(Value::as_object);
        let keys: Vec<String> = map.keys().cloned().collect();
        for k in keys {
            if matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
                continue;
            }
            match props.and_then(|p| p.get(&k)) {
                Some(sub) => walk(sub, map.get_mut(&k).expect("key"), &k, &mut unknown),
                None => {
                    map.remove(&k);
                    unknown.push(k);
                }
            }
        }
        fill_defaults(schema, map, "", &mut unknown);
    }
    unknown
}

fn fill_defaults(
    schema: &Value,
    map: &mut Map<String, Value>,
    path: &str,
    unknown: &mut Vec<String>,
) {
    let Some(props) = schema.get("properties").and_then(Value::as_object) else {
        return;
    };
    for (k, sub) in props {
        if map.contains_key(k) {
            continue;
        }
        if let Some(d) = sub.get("default") {
            let mut d = d.clone();
            let child = join(path, k);
            walk(sub, &mut d, &child, unknown);
            map.insert(k.clone(), d);
        }
    }
}

fn join(path: &str, k: &str) -> String {
    if path.is_empty() {
        k.to_string()
    } else {
        format!("{path}.{k}")
    }
}

fn walk(schema: &Value, v: &mut Value, path: &str, unknown: &mut Vec<String>) {
    let preserve = schema
        .get("x-kubernetes-preserve-unknown-fields")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    match v {
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            if props.is_none() && additional.is_none() {
                return;
            }
            let keys: Vec<String> = map.keys().cloned().collect();
            for k in keys {
                let child = join(path, &k);
                let sub = props.and_then(|p| p.get(&k)).or(additional);
                let value = map.get_mut(&k).expect("key");
                if value.is_null()
                    && sub.is_some_and(|s| s.get("nullable") != Some(&Value::Bool(true)))
                {
                    map.remove(&k);
                    continue;
                }
                match sub {
                    Some(sub) => walk(sub, value, &child, unknown),
                    None if preserve => {}
                    None => {
                        map.remove(&k);
                        unknown.push(child);
                    }
                }
            }
            fill_defaults(schema, map, path, unknown);
        }
        Value::Array(items) => {
            if let Some(sub) = schema.get("items") {
                for (i, item) in items.iter_mut().enumerate() {
                    walk(sub, item, &format!("{path}[{i}]"), unknown);
                }
            }
        }
        _ => {}
    }
}

fn pointer_to_field(pointer: &str) -> String {
    let mut out = String::new();
    for seg in pointer.split('/').filter(|s| !s.is_empty()) {
        let seg = seg.replace("~1", "/").replace("~0", "~");
        if seg.chars().all(|c| c.is_ascii_digit()) {
            out.push_str(&format!("[{seg}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&seg);
        }
    }
    out
}

/// Checks `obj` (already normalized) against the schema and its CEL rules.
pub fn validate(schema: &Value, obj: &Value, old: Option<&Value>) -> Vec<Cause> {
    let mut causes = Vec::new();
    let mut body = obj.clone();
    if let Some(m) = body.as_object_mut() {
        m.remove("apiVersion");
        m.remove("kind");
        m.remove("metadata");
    }
    let mut schema_only = schema.clone();
    strip_extensions(&mut schema_only);
    match jsonschema::validator_for(&schema_only) {
        Ok(validator) => {
            for e in validator.iter_errors(&body) {
                let mut field = pointer_to_field(e.instance_path().as_str());
                let (reason, message) = match e.kind() {
                    jsonschema::error::ValidationErrorKind::Required { property } => {
                        let prop = property.as_str().unwrap_or_default();
                        field = join(&field, prop);
                        ("FieldValueRequired", "Required value".to_string())
                    }
                    _ => (
                        "FieldValueInvalid",
                        format!("Invalid value: {}: {e}", e.instance()),
                    ),
                };
                causes.push(Cause {
                    field,
                    message,
                    reason: reason.into(),
                });
            }
        }
        Err(e) => causes.push(Cause {
            field: String::new(),
            message: format!("the CRD schema does not compile: {e}"),
            reason: "FieldValueInvalid".into(),
        }),
    }
    if causes.is_empty() {
        let old_body = old.map(|o| {
            let mut o = o.clone();
            if let Some(m) = o.as_object_mut() {
                m.remove("apiVersion");
                m.remove("kind");
                m.remove("metadata");
            }
            o
        });
        cel_rules(schema, &body, old_body.as_ref(), &mut causes);
    }
    causes
}

/// The container restart policies the API server takes (the `ContainerRestartRules`
/// feature, on by default since Kubernetes 1.35: any of them on any container).
const CONTAINER_RESTART_POLICIES: [&str; 3] = ["Always", "Never", "OnFailure"];

/// What the real API server refuses in a pod's containers, as it words it: a container
/// `restartPolicy` that is not one of [`CONTAINER_RESTART_POLICIES`], and on an init
/// container that is not a sidecar (`restartPolicy: Always`) a `lifecycle` or a probe.
/// Regular containers come first, then init containers, in the server's order.
pub fn pod_spec(spec: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    let containers = |field: &str| spec[field].as_array().cloned().unwrap_or_default();
    for (i, c) in containers("containers").iter().enumerate() {
        restart_policy(c, &format!("spec.containers[{i}]"), &mut causes);
    }
    for (i, c) in containers("initContainers").iter().enumerate() {
        let path = format!("spec.initContainers[{i}]");
        if restart_policy(c, &path, &mut causes).as_deref() == Some("Always") {
            continue;
        }
        for field in [
            "lifecycle",
            "livenessProbe",
            "readinessProbe",
            "startupProbe",
        ] {
            if c.get(field).is_some_and(|v| !v.is_null()) {
                causes.push(Cause {
                    field: format!("{path}.{field}"),
                    message:
                        "Forbidden: may not be set for init containers without restartPolicy=Always"
                            .into(),
                    reason: "FieldValueForbidden".into(),
                });
            }
        }
    }
    causes
}

/// Container `c`'s `restartPolicy`, if it has one; one the server does not take is a
/// cause (at `path`).
fn restart_policy(c: &Value, path: &str, causes: &mut Vec<Cause>) -> Option<String> {
    let policy = c.get("restartPolicy").filter(|p| !p.is_null())?;
    let text = policy.as_str().unwrap_or_default();
    if !CONTAINER_RESTART_POLICIES.contains(&text) {
        let allowed: Vec<String> = CONTAINER_RESTART_POLICIES
            .iter()
            .map(|p| format!("{p:?}"))
            .collect();
        causes.push(Cause {
            field: format!("{path}.restartPolicy"),
            message: format!(
                "Unsupported value: {policy}: supported values: {}",
                allowed.join(", ")
            ),
            reason: "FieldValueNotSupported".into(),
        });
    }
    Some(text.to_string())
}

/// Removes keywords a JSON Schema validator does not know (`x-kubernetes-*`, `nullable`)
/// so they cannot be misread.
fn strip_extensions(schema: &mut Value) {
    match schema {
        Value::Object(m) => {
            m.retain(|k, _| !k.starts_with("x-kubernetes-") && k != "nullable");
            for (k, v) in m.iter_mut() {
                if k != "default" && k != "enum" && k != "example" {
                    strip_extensions(v);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(strip_extensions),
        _ => {}
    }
}

/// The `type` of the schema node holding `rule` ("object" when not given): what a
/// real API server shows as the invalid value of a failed rule.
fn rule_node_type(schema: &Value, rule: &str) -> Option<String> {
    let here = schema
        .get("x-kubernetes-validations")
        .and_then(Value::as_array)
        .is_some_and(|rs| rs.iter().any(|r| r["rule"] == rule));
    if here {
        return Some(schema["type"].as_str().unwrap_or("object").to_string());
    }
    let children = schema
        .get("properties")
        .and_then(Value::as_object)
        .into_iter()
        .flat_map(|p| p.values())
        .chain(schema.get("items"))
        .chain(schema.get("additionalProperties").filter(|a| a.is_object()));
    for child in children {
        if let Some(t) = rule_node_type(child, rule) {
            return Some(t);
        }
    }
    None
}

/// Evaluates the schema's `x-kubernetes-validations` rules with the CEL evaluator of
/// kube (`kube::core::cel`), transition rules (`oldSelf`) against `old` on updates.
fn cel_rules(schema: &Value, body: &Value, old: Option<&Value>, causes: &mut Vec<Cause>) {
    thread_local! {
        static CEL: kube::core::cel::Validator = kube::core::cel::Validator::new();
    }
    let Err(errors) = CEL.with(|v| v.validate(schema, body, old)) else {
        return;
    };
    for e in errors.into_vec() {
        let shown = match e.kind {
            kube::core::cel::ErrorKind::ValidationFailure => {
                format!(
                    "{:?}",
                    rule_node_type(schema, &e.rule).unwrap_or_else(|| "object".into())
                )
            }
            _ => format!("{:?}", e.rule),
        };
        causes.push(Cause {
            field: e.field_path.trim_start_matches('.').to_string(),
            message: format!("Invalid value: {shown}: {}", e.message),
            reason: e.reason.unwrap_or_else(|| "FieldValueInvalid".into()),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        let crd = crate::fixtures::pool_crd();
        crd.pointer("/spec/versions/0/schema/openAPIV3Schema")
            .unwrap()
            .clone()
    }

    fn pool(scaling: Value) -> Value {
        json!({"apiVersion": "testrunner.dev/v1alpha1", "kind": "TestRunnerPool", "metadata": {"name": "p"},
            "spec": {"image": "i", "command": ["true"], "queue": {"name": "q", "connectionSecretRef": {"name": "s"}}, "scaling": scaling}})
    }

    #[test]
    fn pods_take_sidecars_and_the_container_restart_policies_the_server_takes() {
        let probe = json!({"exec": {"command": ["true"]}});
        let spec = json!({
            "containers": [{"name": "main", "restartPolicy": "Never"},
                {"name": "other", "restartPolicy": "Sometimes"}],
            "initContainers": [
                {"name": "sidecar", "restartPolicy": "Always", "startupProbe": probe, "readinessProbe": probe},
                {"name": "once", "restartPolicy": "OnFailure"},
                {"name": "bad", "restartPolicy": "Sometimes", "readinessProbe": probe},
                {"name": "plain", "livenessProbe": probe},
            ],
        });
        let causes: Vec<(String, String, String)> = pod_spec(&spec)
            .into_iter()
            .map(|c| (c.field, c.reason, c.message))
            .collect();
        let unsupported = "Unsupported value: \"Sometimes\": supported values: \"Always\", \"Never\", \"OnFailure\"";
        let forbidden =
            "Forbidden: may not be set for init containers without restartPolicy=Always";
        let cause = |f: &str, r: &str, m: &str| (f.to_string(), r.to_string(), m.to_string());
        assert_eq!(
            causes,
            vec![
                cause(
                    "spec.containers[1].restartPolicy",
                    "FieldValueNotSupported",
                    unsupported
                ),
                cause(
                    "spec.initContainers[2].restartPolicy",
                    "FieldValueNotSupported",
                    unsupported
                ),
                cause(
                    "spec.initContainers[2].readinessProbe",
                    "FieldValueForbidden",
                    forbidden
                ),
                cause(
                    "spec.initContainers[3].livenessProbe",
                    "FieldValueForbidden",
                    forbidden
                ),
            ]
        );
    }

    #[test]
    fn defaults_are_filled_and_unknown_fields_pruned() {
        let mut p = pool(json!({"minWorkers": 1}));
        p["spec"]["bogus"] = json!(1);
        let unknown = normalize(&schema(), &mut p);
        assert_eq!(unknown, vec!["spec.bogus"]);
        assert_eq!(p["spec"]["scaling"]["maxWorkers"], 10);
        assert_eq!(p["spec"]["scaling"]["pollInterval"], "2s");
        assert_eq!(p["spec"]["queue"]["connectionSecretRef"]["key"], "uri");
        assert!(validate(&schema(), &p, None).is_empty());
    }

    #[test]
    fn bounds_and_the_cel_rule_name_the_field() {
        let mut p = pool(json!({"minWorkers": 5, "maxWorkers": 2}));
        normalize(&schema(), &mut p);
        let causes = validate(&schema(), &p, None);
        assert_eq!(causes.len(), 1, "{causes:?}");
        assert_eq!(causes[0].field, "spec.scaling.minWorkers");
        assert!(
            causes[0]
                .message
                .contains("minWorkers must be less than or equal to maxWorkers")
        );

        let mut p = pool(json!({"maxWorkers": 5000}));
        normalize(&schema(), &mut p);
        let causes = validate(&schema(), &p, None);
        assert_eq!(causes[0].field, "spec.scaling.maxWorkers");

        let mut p = pool(json!({}));
        p["spec"].as_object_mut().unwrap().remove("image");
        normalize(&schema(), &mut p);
        let causes = validate(&schema(), &p, None);
        assert_eq!(causes[0].field, "spec.image");
        assert_eq!(causes[0].reason, "FieldValueRequired");
    }

    #[test]
    fn cel_rules_use_the_real_evaluator_with_old_self() {
        let schema = json!({"type": "object", "properties": {"spec": {"type": "object",
            "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
            "x-kubernetes-validations": [
                {"rule": "self.name.startsWith('a') && size(self.name) < 5", "message": "bad name", "fieldPath": ".name"},
                {"rule": "self.n >= oldSelf.n", "message": "n cannot shrink"}]}}});
        let ok = json!({"spec": {"name": "abc", "n": 2}});
        assert!(validate(&schema, &ok, None).is_empty());
        let bad = json!({"spec": {"name": "zzz", "n": 2}});
        let causes = validate(&schema, &bad, None);
        assert_eq!(causes.len(), 1, "{causes:?}");
        assert_eq!(causes[0].field, "spec.name");
        assert_eq!(causes[0].message, "Invalid value: \"object\": bad name");
        let shrunk = json!({"spec": {"name": "abc", "n": 1}});
        let causes = validate(&schema, &shrunk, Some(&ok));
        assert_eq!(causes.len(), 1, "{causes:?}");
        assert!(causes[0].message.contains("n cannot shrink"));
    }
}
