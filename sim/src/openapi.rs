//! `/openapi/v3`: the index and one document per group version, enough for
//! `kubectl apply` (which checks that PATCH takes `fieldValidation`) and
//! `kubectl explain` (which reads the kind's schema).

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::kinds::Kind;

/// `api/v1` or `apis/group/version`.
pub fn gv_path(kind: &Kind) -> String {
    kind.prefix().trim_start_matches('/').to_string()
}

fn schema_name(kind: &Kind) -> String {
    if kind.group.is_empty() {
        format!("io.k8s.api.core.v1.{}", kind.kind)
    } else {
        let reversed: Vec<&str> = kind.group.split('.').rev().collect();
        format!("{}.{}.{}", reversed.join("."), kind.version, kind.kind)
    }
}

fn param(name: &str, description: &str) -> Value {
    json!({"name": name, "in": "query", "description": description, "schema": {"type": "string", "uniqueItems": true}})
}

fn write_params() -> Vec<Value> {
    vec![
        param(
            "dryRun",
            "When present, modifications are not persisted. Valid value: All.",
        ),
        param("fieldManager", "Name of the actor making the change."),
        param(
            "fieldValidation",
            "Ignore, Warn or Strict: what to do with unknown or duplicate fields.",
        ),
    ]
}

fn kind_schema(kind: &Kind) -> Value {
    let gvk = json!([{"group": kind.group, "kind": kind.kind, "version": kind.version}]);
    let mut schema = kind.schema.clone().unwrap_or_else(|| {
        json!({
            "type": "object",
            "description": format!("{} (the simulated cluster does not describe built-in kinds in detail).", kind.kind),
            "x-kubernetes-preserve-unknown-fields": true,
        })
    });
    let props = schema
        .as_object_mut()
        .expect("schema object")
        .entry("properties")
        .or_insert_with(|| Value::Object(Map::new()));
    if let Some(p) = props.as_object_mut() {
        p.insert("apiVersion".into(), json!({"type": "string", "description": "APIVersion defines the versioned schema of this representation of an object."}));
        p.insert("kind".into(), json!({"type": "string", "description": "Kind is a string value representing the REST resource this object represents."}));
        p.insert("metadata".into(), json!({"type": "object", "description": "Standard object's metadata.", "x-kubernetes-preserve-unknown-fields": true}));
    }
    schema["x-kubernetes-group-version-kind"] = gvk;
    schema
}

fn response(name: &str) -> Value {
    json!({"200": {"description": "OK", "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{name}")}}}}})
}

/// The OpenAPI 3 document of one group version.
pub fn document(kinds: &[&Kind]) -> Value {
    let mut schemas = Map::new();
    let mut paths = Map::new();
    for kind in kinds {
        let name = schema_name(kind);
        schemas.insert(name.clone(), kind_schema(kind));
        let gvk = json!({"group": kind.group, "kind": kind.kind, "version": kind.version});
        let base = if kind.namespaced {
            format!("{}/namespaces/{{namespace}}/{}", kind.prefix(), kind.plural)
        } else {
            format!("{}/{}", kind.prefix(), kind.plural)
        };
        let op = |action: &str, extra: Vec<Value>| {
            let mut o = json!({
                "description": format!("{action} {}", kind.kind),
                "operationId": format!("{action}{}", kind.kind),
                "x-kubernetes-action": action,
                "x-kubernetes-group-version-kind": gvk,
                "parameters": extra,
                "responses": response(&name),
            });
            if matches!(action, "post" | "put" | "patch") {
                o["requestBody"] = json!({"content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{name}")}}}});
            }
            o
        };
        let mut patch_params = write_params();
        patch_params.push(param(
            "force",
            "Force is going to \"force\" Apply requests.",
        ));
        paths.insert(
            base.clone(),
            json!({"get": op("list", vec![]), "post": op("post", write_params())}),
        );
        paths.insert(
            format!("{base}/{{name}}"),
            json!({
                "get": op("get", vec![]),
                "put": op("put", write_params()),
                "patch": op("patch", patch_params.clone()),
                "delete": op("delete", vec![param("dryRun", "When present, modifications are not persisted.")]),
            }),
        );
        if kind.status {
            paths.insert(
                format!("{base}/{{name}}/status"),
                json!({"get": op("get", vec![]), "put": op("put", write_params()), "patch": op("patch", patch_params)}),
            );
        }
    }
    json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes (simulated)", "version": "v1.33.0"},
        "paths": paths,
        "components": {"schemas": schemas},
    })
}

/// The `/openapi/v3` index over group versions.
pub fn index(kinds: &[std::sync::Arc<Kind>]) -> Value {
    let mut gvs: Vec<String> = kinds.iter().map(|k| gv_path(k)).collect();
    gvs.sort();
    gvs.dedup();
    let mut paths = Map::new();
    for gv in gvs {
        let members: Vec<&Kind> = kinds
            .iter()
            .filter(|k| gv_path(k) == gv)
            .map(|k| k.as_ref())
            .collect();
        let doc = document(&members);
        let hash = Sha256::digest(doc.to_string().as_bytes());
        let hex: String = hash.iter().take(16).map(|b| format!("{b:02X}")).collect();
        paths.insert(
            gv.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{gv}?hash={hex}")}),
        );
    }
    json!({"paths": paths})
}
