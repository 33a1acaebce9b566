//! Field ownership and server-side apply, simplified: objects (maps) are merged key by
//! key, every list and scalar is one atomic field. Each manager owns the set of leaf
//! paths it last applied or changed, recorded in `metadata.managedFields` as `FieldsV1`.

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

/// A leaf path in an object: map keys from the root.
pub type Path = Vec<String>;

/// Paths the server owns itself; never recorded nor conflicting.
fn ignored(path: &[String]) -> bool {
    match path.first().map(String::as_str) {
        Some("apiVersion" | "kind") => true,
        Some("metadata") => matches!(
            path.get(1).map(String::as_str),
            Some(
                "name"
                    | "namespace"
                    | "uid"
                    | "resourceVersion"
                    | "generation"
                    | "creationTimestamp"
                    | "managedFields"
                    | "deletionTimestamp"
                    | "deletionGracePeriodSeconds"
                    | "selfLink"
                    | "generateName"
            )
        ),
        _ => false,
    }
}

/// Which part of the object a request may write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// The whole object (no status subresource for this kind).
    All,
    /// The main resource of a kind with a status subresource: everything but `status`.
    Main,
    /// The status subresource: only `status`.
    Status,
}

impl Scope {
    /// Whether `path` is writable in this scope.
    pub fn covers(self, path: &[String]) -> bool {
        let status = path.first().is_some_and(|p| p == "status");
        match self {
            Scope::All => true,
            Scope::Main => !status,
            Scope::Status => status,
        }
    }

    fn subresource(self) -> Option<&'static str> {
        (self == Scope::Status).then_some("status")
    }
}

/// The leaf paths of `v` (maps are walked; everything else, and empty maps, are leaves).
pub fn leaves(v: &Value) -> Vec<Path> {
    fn walk(v: &Value, prefix: &mut Path, out: &mut Vec<Path>) {
        match v {
            Value::Object(m) if !m.is_empty() => {
                for (k, child) in m {
                    prefix.push(k.clone());
                    walk(child, prefix, out);
                    prefix.pop();
                }
            }
            _ => {
                if !prefix.is_empty() {
                    out.push(prefix.clone());
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(v, &mut Vec::new(), &mut out);
    out
}

/// The value at `path`.
pub fn get<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(v, |cur, seg| cur.get(seg))
}

/// Sets `path` to `value`, creating maps on the way.
pub fn set(v: &mut Value, path: &[String], value: Value) {
    let mut cur = v;
    for seg in &path[..path.len() - 1] {
        if !cur.is_object() {
            *cur = Value::Object(Map::new());
        }
        let map = cur.as_object_mut().expect("object");
        cur = map
            .entry(seg.clone())
            .or_insert_with(|| Value::Object(Map::new()));
    }
    if !cur.is_object() {
        *cur = Value::Object(Map::new());
    }
    cur.as_object_mut()
        .expect("object")
        .insert(path[path.len() - 1].clone(), value);
}

/// Removes `path`; parents emptied by the removal are removed too.
pub fn remove(v: &mut Value, path: &[String]) {
    if path.is_empty() {
        return;
    }
    let Some(map) = v.as_object_mut() else { return };
    if path.len() == 1 {
        map.remove(&path[0]);
        return;
    }
    if let Some(child) = map.get_mut(&path[0]) {
        remove(child, &path[1..]);
        if child.as_object().is_some_and(Map::is_empty) {
            map.remove(&path[0]);
        }
    }
}

fn to_fields(paths: &BTreeSet<Path>) -> Value {
    let mut root = Value::Object(Map::new());
    for p in paths {
        let keyed: Path = p.iter().map(|s| format!("f:{s}")).collect();
        set(&mut root, &keyed, json!({}));
    }
    root
}

fn from_fields(v: &Value) -> BTreeSet<Path> {
    leaves(v)
        .into_iter()
        .filter_map(|p| {
            p.into_iter()
                .map(|s| s.strip_prefix("f:").map(str::to_string))
                .collect::<Option<Path>>()
        })
        .collect()
}

/// One `managedFields` entry.
#[derive(Clone, Debug)]
struct Entry {
    manager: String,
    operation: String,
    subresource: Option<String>,
    api_version: String,
    time: String,
    fields: BTreeSet<Path>,
}

fn read_entries(obj: &Value) -> Vec<Entry> {
    obj.pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|e| Entry {
                    manager: e["manager"].as_str().unwrap_or_default().into(),
                    operation: e["operation"].as_str().unwrap_or("Update").into(),
                    subresource: e["subresource"].as_str().map(Into::into),
                    api_version: e["apiVersion"].as_str().unwrap_or_default().into(),
                    time: e["time"].as_str().unwrap_or_default().into(),
                    fields: from_fields(&e["fieldsV1"]),
                })
                .collect()
        })
        .unwrap_or_default()
}

fn write_entries(obj: &mut Value, entries: Vec<Entry>) {
    let list: Vec<Value> = entries
        .into_iter()
        .filter(|e| !e.fields.is_empty())
        .map(|e| {
            let mut v = json!({
                "manager": e.manager,
                "operation": e.operation,
                "apiVersion": e.api_version,
                "time": e.time,
                "fieldsType": "FieldsV1",
                "fieldsV1": to_fields(&e.fields),
            });
            if let Some(s) = e.subresource {
                v["subresource"] = json!(s);
            }
            v
        })
        .collect();
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        if list.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".into(), Value::Array(list));
        }
    }
}

/// Whether two paths overlap: equal, or one is a prefix of the other.
fn overlaps(a: &[String], b: &[String]) -> bool {
    let n = a.len().min(b.len());
    a[..n] == b[..n]
}

/// A field another manager owns with a different value.
#[derive(Clone, Debug, PartialEq)]
pub struct Conflict {
    /// The other manager.
    pub manager: String,
    /// The field, as `.spec.image`.
    pub field: String,
}

fn dotted(p: &[String]) -> String {
    p.iter().map(|s| format!(".{s}")).collect()
}

/// Context of one write.
pub struct Write<'a> {
    /// Field manager of the request.
    pub manager: &'a str,
    /// apiVersion the request used.
    pub api_version: &'a str,
    /// Which part of the object the request writes.
    pub scope: Scope,
    /// Current time (RFC 3339).
    pub now: &'a str,
}

/// Server-side apply of `applied` onto `live` (an empty object when creating). Returns
/// the merged object with updated `managedFields`, or the conflicts when `force` is
/// false and another manager owns a field the configuration sets to another value.
pub fn apply(
    live: &Value,
    applied: &Value,
    w: &Write<'_>,
    force: bool,
) -> Result<Value, Vec<Conflict>> {
    let new_paths: BTreeSet<Path> = leaves(applied)
        .into_iter()
        .filter(|p| !ignored(p) && w.scope.covers(p))
        .collect();
    let mut entries = read_entries(live);
    let sub = w.scope.subresource().map(str::to_string);
    let mine = |e: &Entry| e.manager == w.manager && e.operation == "Apply" && e.subresource == sub;

    // An empty map in the configuration merges into the live map: it neither replaces
    // nor conflicts with what others own inside it.
    let merge_only = |p: &Path| {
        get(applied, p).is_some_and(|v| v.as_object().is_some_and(Map::is_empty))
            && get(live, p).is_none_or(Value::is_object)
    };
    let mut conflicts = Vec::new();
    for p in &new_paths {
        let wanted = get(applied, p);
        if get(live, p) == wanted || merge_only(p) {
            continue;
        }
        for e in entries.iter().filter(|e| !mine(e)) {
            if e.fields.iter().any(|q| overlaps(p, q)) {
                conflicts.push(Conflict {
                    manager: e.manager.clone(),
                    field: dotted(p),
                });
            }
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(conflicts);
    }
    if force {
        for e in entries.iter_mut().filter(|e| !mine(e)) {
            e.fields.retain(|q| {
                !new_paths
                    .iter()
                    .any(|p| !merge_only(p) && overlaps(p, q) && get(live, p) != get(applied, p))
            });
        }
    }

    let mut out = live.clone();
    let previous: BTreeSet<Path> = entries
        .iter()
        .filter(|e| mine(e))
        .flat_map(|e| e.fields.iter().cloned())
        .collect();
    for gone in previous.difference(&new_paths) {
        let owned_elsewhere = entries
            .iter()
            .filter(|e| !mine(e))
            .any(|e| e.fields.iter().any(|q| overlaps(gone, q)));
        let replaced = new_paths
            .iter()
            .any(|p| !merge_only(p) && overlaps(p, gone));
        if !owned_elsewhere && !replaced {
            remove(&mut out, gone);
        }
    }
    for p in &new_paths {
        if merge_only(p) && get(&out, p).is_some() {
            continue;
        }
        if let Some(v) = get(applied, p) {
            set(&mut out, p, v.clone());
        }
    }
    entries.retain(|e| !mine(e));
    entries.push(Entry {
        manager: w.manager.into(),
        operation: "Apply".into(),
        subresource: sub,
        api_version: w.api_version.into(),
        time: w.now.into(),
        fields: new_paths,
    });
    write_entries(&mut out, entries);
    Ok(out)
}

/// Records an ordinary write (create, update, patch) from `old` to `new`: the manager
/// takes the fields it changed; other managers lose them.
pub fn record_update(old: Option<&Value>, new: &mut Value, w: &Write<'_>) {
    let null = Value::Null;
    let old_v = old.unwrap_or(&null);
    let changed: BTreeSet<Path> = leaves(new)
        .into_iter()
        .filter(|p| !ignored(p) && w.scope.covers(p) && get(old_v, p) != get(new, p))
        .collect();
    let mut entries = read_entries(old.unwrap_or(new));
    let sub = w.scope.subresource().map(str::to_string);
    for e in entries.iter_mut() {
        e.fields.retain(|q| !changed.iter().any(|p| overlaps(p, q)));
        // Fields that no longer exist are owned by nobody.
        e.fields.retain(|q| get(new, q).is_some());
    }
    if !changed.is_empty() {
        if let Some(e) = entries
            .iter_mut()
            .find(|e| e.manager == w.manager && e.operation == "Update" && e.subresource == sub)
        {
            e.fields.extend(changed);
            e.time = w.now.into();
        } else {
            entries.push(Entry {
                manager: w.manager.into(),
                operation: "Update".into(),
                subresource: sub,
                api_version: w.api_version.into(),
                time: w.now.into(),
                fields: changed,
            });
        }
    }
    write_entries(new, entries);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(manager: &str) -> Write<'_> {
        Write {
            manager,
            api_version: "v1",
            scope: Scope::All,
            now: "2026-01-01T00:00:00Z",
        }
    }

    #[test]
    fn apply_merges_and_removes_dropped_fields() {
        let live = json!({"metadata": {"name": "a"}, "data": {"x": "1"}});
        let first = apply(
            &live,
            &json!({"data": {"y": "2", "z": "3"}}),
            &w("m"),
            false,
        )
        .unwrap();
        assert_eq!(first["data"], json!({"x": "1", "y": "2", "z": "3"}));
        let second = apply(&first, &json!({"data": {"y": "2"}}), &w("m"), false).unwrap();
        assert_eq!(second["data"], json!({"x": "1", "y": "2"}));
        assert_eq!(
            second["metadata"]["managedFields"][0]["fieldsV1"],
            json!({"f:data": {"f:y": {}}})
        );
    }

    #[test]
    fn apply_conflicts_with_another_manager_unless_forced() {
        let live = apply(
            &json!({"metadata": {}}),
            &json!({"data": {"y": "1"}}),
            &w("a"),
            false,
        )
        .unwrap();
        let err = apply(&live, &json!({"data": {"y": "2"}}), &w("b"), false).unwrap_err();
        assert_eq!(
            err,
            vec![Conflict {
                manager: "a".into(),
                field: ".data.y".into()
            }]
        );
        // Same value: shared ownership, no conflict.
        assert!(apply(&live, &json!({"data": {"y": "1"}}), &w("b"), false).is_ok());
        let forced = apply(&live, &json!({"data": {"y": "2"}}), &w("b"), true).unwrap();
        assert_eq!(forced["data"]["y"], "2");
        let managers: Vec<_> = forced["metadata"]["managedFields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["manager"].clone())
            .collect();
        assert_eq!(managers, vec![json!("b")]);
    }

    #[test]
    fn updates_take_ownership() {
        let live = apply(
            &json!({"metadata": {}}),
            &json!({"data": {"y": "1"}}),
            &w("a"),
            false,
        )
        .unwrap();
        let mut new = live.clone();
        new["data"]["y"] = json!("9");
        record_update(Some(&live), &mut new, &w("kubectl-edit"));
        let err = apply(&new, &json!({"data": {"y": "1"}}), &w("a"), false).unwrap_err();
        assert_eq!(err[0].manager, "kubectl-edit");
    }
}
