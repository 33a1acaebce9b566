//! Validation of custom resources against their CRD's `openAPIV3Schema`, as the API
//! server does it: unknown fields are pruned (or refused under strict field
//! validation), `default:` values are filled in, then the object is checked against the
//! schema and its `x-kubernetes-validations` rules.

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
pub fn validate(schema: &Value, obj: &Value) -> Vec<Cause> {
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
        cel_rules(schema, &body, "", &mut causes);
    }
    causes
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

fn cel_rules(schema: &Value, v: &Value, path: &str, causes: &mut Vec<Cause>) {
    if let Some(rules) = schema
        .get("x-kubernetes-validations")
        .and_then(Value::as_array)
    {
        for rule in rules {
            let Some(text) = rule["rule"].as_str() else {
                continue;
            };
            match cel::eval(text, v) {
                Some(true) => {}
                Some(false) => {
                    let field = match rule["fieldPath"].as_str() {
                        Some(fp) => join(path, fp.trim_start_matches('.')),
                        None => path.to_string(),
                    };
                    let message = rule["message"]
                        .as_str()
                        .map(String::from)
                        .unwrap_or_else(|| format!("failed rule: {text}"));
                    let shown = if v.is_object() {
                        "\"object\"".to_string()
                    } else {
                        v.to_string()
                    };
                    causes.push(Cause {
                        field,
                        message: format!("Invalid value: {shown}: {message}"),
                        reason: rule["reason"]
                            .as_str()
                            .unwrap_or("FieldValueInvalid")
                            .into(),
                    });
                }
                None => tracing::warn!(
                    rule = text,
                    "CEL rule not understood by the simulation; skipped"
                ),
            }
        }
    }
    match v {
        Value::Object(m) => {
            let props = schema.get("properties").and_then(Value::as_object);
            for (k, child) in m {
                if let Some(sub) = props.and_then(|p| p.get(k)) {
                    cel_rules(sub, child, &join(path, k), causes);
                }
            }
        }
        Value::Array(a) => {
            if let Some(sub) = schema.get("items") {
                for (i, child) in a.iter().enumerate() {
                    cel_rules(sub, child, &format!("{path}[{i}]"), causes);
                }
            }
        }
        _ => {}
    }
}

/// A small CEL subset: comparisons of `self.<path>` and literals, joined by `&&` / `||`.
pub mod cel {
    use serde_json::Value;

    fn operand(s: &str, this: &Value) -> Option<Value> {
        let s = s.trim();
        if s == "self" {
            return Some(this.clone());
        }
        if let Some(path) = s.strip_prefix("self.") {
            let mut cur = this;
            for seg in path.split('.') {
                if !seg.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return None;
                }
                cur = cur.get(seg)?;
            }
            return Some(cur.clone());
        }
        if let Some(inner) = s
            .strip_prefix('\'')
            .and_then(|r| r.strip_suffix('\''))
            .or_else(|| s.strip_prefix('"').and_then(|r| r.strip_suffix('"')))
        {
            return Some(Value::String(inner.into()));
        }
        match s {
            "true" => Some(Value::Bool(true)),
            "false" => Some(Value::Bool(false)),
            _ => s.parse::<f64>().ok().map(|n| serde_json::json!(n)),
        }
    }

    fn compare(a: &Value, b: &Value) -> Option<std::cmp::Ordering> {
        match (a, b) {
            (Value::Number(x), Value::Number(y)) => x.as_f64()?.partial_cmp(&y.as_f64()?),
            (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
            (Value::Bool(x), Value::Bool(y)) => Some(x.cmp(y)),
            _ => None,
        }
    }

    /// Evaluates `rule` with `self` bound to `this`; `None` when the rule is outside the
    /// subset (or refers to an absent field).
    pub fn eval(rule: &str, this: &Value) -> Option<bool> {
        if let Some((l, r)) = rule.split_once("||") {
            return Some(eval(l, this)? || eval(r, this)?);
        }
        if let Some((l, r)) = rule.split_once("&&") {
            return Some(eval(l, this)? && eval(r, this)?);
        }
        for op in ["<=", ">=", "==", "!=", "<", ">"] {
            if let Some((l, r)) = rule.split_once(op) {
                let (a, b) = (operand(l, this)?, operand(r, this)?);
                use std::cmp::Ordering::*;
                let ord = compare(&a, &b)?;
                return Some(match op {
                    "<=" => ord != Greater,
                    ">=" => ord != Less,
                    "==" => ord == Equal,
                    "!=" => ord != Equal,
                    "<" => ord == Less,
                    _ => ord == Greater,
                });
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        let crd =
            serde_json::to_value(<crate::crd::TestRunnerPool as kube::CustomResourceExt>::crd())
                .unwrap();
        crd.pointer("/spec/versions/0/schema/openAPIV3Schema")
            .unwrap()
            .clone()
    }

    fn pool(scaling: Value) -> Value {
        json!({"apiVersion": "testrunner.dev/v1alpha1", "kind": "TestRunnerPool", "metadata": {"name": "p"},
            "spec": {"image": "i", "command": ["true"], "queue": {"name": "q", "connectionSecretRef": {"name": "s"}}, "scaling": scaling}})
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
        assert!(validate(&schema(), &p).is_empty());
    }

    #[test]
    fn bounds_and_the_cel_rule_name_the_field() {
        let mut p = pool(json!({"minWorkers": 5, "maxWorkers": 2}));
        normalize(&schema(), &mut p);
        let causes = validate(&schema(), &p);
        assert_eq!(causes.len(), 1, "{causes:?}");
        assert_eq!(causes[0].field, "spec.scaling.minWorkers");
        assert!(
            causes[0]
                .message
                .contains("minWorkers must be less than or equal to maxWorkers")
        );

        let mut p = pool(json!({"maxWorkers": 5000}));
        normalize(&schema(), &mut p);
        let causes = validate(&schema(), &p);
        assert_eq!(causes[0].field, "spec.scaling.maxWorkers");

        let mut p = pool(json!({}));
        p["spec"].as_object_mut().unwrap().remove("image");
        normalize(&schema(), &mut p);
        let causes = validate(&schema(), &p);
        assert_eq!(causes[0].field, "spec.image");
        assert_eq!(causes[0].reason, "FieldValueRequired");
    }

    #[test]
    fn cel_subset() {
        let v = json!({"a": 1, "b": 2, "s": "x"});
        assert_eq!(cel::eval("self.a <= self.b", &v), Some(true));
        assert_eq!(
            cel::eval("self.a > self.b || self.s == 'x'", &v),
            Some(true)
        );
        assert_eq!(cel::eval("self.a >= 3", &v), Some(false));
        assert_eq!(cel::eval("size(self.s) > 0", &v), None);
    }
}
