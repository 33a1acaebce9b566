//! The resource kinds the simulated API server serves: a fixed set of built-in kinds
//! plus one per installed CustomResourceDefinition.

use serde_json::Value;

/// How objects of a kind are converted between the stored form and what clients see.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum View {
    /// Stored as seen.
    Plain,
    /// `events.k8s.io/v1` Event, stored as a core/v1 Event.
    NewEvent,
}

/// One served resource.
#[derive(Clone, Debug)]
pub struct Kind {
    /// API group; empty for core.
    pub group: String,
    /// API version.
    pub version: String,
    /// Kind name.
    pub kind: String,
    /// Resource (plural) name.
    pub plural: String,
    /// Singular name.
    pub singular: String,
    /// Namespaced or cluster scoped.
    pub namespaced: bool,
    /// Short names (`trp`, `po`).
    pub short_names: Vec<String>,
    /// Categories (`all`).
    pub categories: Vec<String>,
    /// Whether `status` is a subresource.
    pub status: bool,
    /// Store shared by all views of the same objects (`events` for both Event APIs).
    pub storage: String,
    /// Conversion to and from the stored form.
    pub view: View,
    /// The CRD's `openAPIV3Schema`, when the kind comes from a CRD.
    pub schema: Option<Value>,
    /// The CRD's `additionalPrinterColumns`.
    pub columns: Vec<Value>,
}

impl Kind {
    fn builtin(
        group: &str,
        version: &str,
        kind: &str,
        plural: &str,
        namespaced: bool,
        short: &[&str],
        status: bool,
    ) -> Self {
        Self {
            group: group.into(),
            version: version.into(),
            kind: kind.into(),
            plural: plural.into(),
            singular: kind.to_lowercase(),
            namespaced,
            short_names: short.iter().map(|s| s.to_string()).collect(),
            categories: Vec::new(),
            status,
            storage: plural.into(),
            view: View::Plain,
            schema: None,
            columns: Vec::new(),
        }
    }

    /// `v1` or `group/version`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `/api/v1` or `/apis/group/version`.
    pub fn prefix(&self) -> String {
        if self.group.is_empty() {
            format!("/api/{}", self.version)
        } else {
            format!("/apis/{}/{}", self.group, self.version)
        }
    }

    /// The qualified resource name used in messages (`testrunnerpools.testrunner.dev`).
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// Whether the served form is the stored one but for `apiVersion` and `kind`.
    pub fn view_is_stored(&self) -> bool {
        self.view != View::NewEvent
    }

    /// Converts a stored object to this view.
    pub fn to_view(&self, mut stored: Value) -> Value {
        if self.view == View::NewEvent {
            rename(
                &mut stored,
                EVENT_FIELDS.iter().map(|(core, new)| (*core, *new)),
            );
        }
        stored["apiVersion"] = Value::String(self.api_version());
        stored["kind"] = Value::String(self.kind.clone());
        stored
    }

    /// Converts an object of this view to the stored form.
    pub fn to_storage(&self, mut viewed: Value) -> Value {
        if self.view == View::NewEvent {
            rename(
                &mut viewed,
                EVENT_FIELDS.iter().map(|(core, new)| (*new, *core)),
            );
            viewed["apiVersion"] = Value::String("v1".into());
            viewed["kind"] = Value::String("Event".into());
        }
        viewed
    }
}

/// core/v1 Event field ↔ events.k8s.io/v1 Event field.
const EVENT_FIELDS: &[(&str, &str)] = &[
    ("involvedObject", "regarding"),
    ("message", "note"),
    ("reportingComponent", "reportingController"),
    ("source", "deprecatedSource"),
    ("firstTimestamp", "deprecatedFirstTimestamp"),
    ("lastTimestamp", "deprecatedLastTimestamp"),
    ("count", "deprecatedCount"),
];

fn rename<'a>(obj: &mut Value, pairs: impl Iterator<Item = (&'a str, &'a str)>) {
    let Some(map) = obj.as_object_mut() else {
        return;
    };
    let moved: Vec<(String, Value)> = pairs
        .filter_map(|(from, to)| map.remove(from).map(|v| (to.to_string(), v)))
        .collect();
    for (k, v) in moved {
        map.insert(k, v);
    }
}

/// The built-in kinds.
pub fn builtins() -> Vec<Kind> {
    let mut pod = Kind::builtin("", "v1", "Pod", "pods", true, &["po"], true);
    pod.categories = vec!["all".into()];
    let mut new_event = Kind::builtin(
        "events.k8s.io",
        "v1",
        "Event",
        "events",
        true,
        &["ev"],
        false,
    );
    new_event.view = View::NewEvent;
    let mut crd = Kind::builtin(
        "apiextensions.k8s.io",
        "v1",
        "CustomResourceDefinition",
        "customresourcedefinitions",
        false,
        &["crd", "crds"],
        true,
    );
    crd.storage = "customresourcedefinitions.apiextensions.k8s.io".into();
    let mut lease = Kind::builtin(
        "coordination.k8s.io",
        "v1",
        "Lease",
        "leases",
        true,
        &[],
        false,
    );
    lease.storage = "leases.coordination.k8s.io".into();
    let mut revision = Kind::builtin(
        "apps",
        "v1",
        "ControllerRevision",
        "controllerrevisions",
        true,
        &[],
        false,
    );
    revision.storage = "controllerrevisions.apps".into();
    revision.columns = vec![serde_json::json!({
        "name": "Revision", "type": "integer", "jsonPath": ".revision"
    })];
    vec![
        Kind::builtin("", "v1", "Namespace", "namespaces", false, &["ns"], true),
        Kind::builtin("", "v1", "Node", "nodes", false, &["no"], true),
        pod,
        Kind::builtin("", "v1", "Secret", "secrets", true, &[], false),
        Kind::builtin("", "v1", "ConfigMap", "configmaps", true, &["cm"], false),
        Kind::builtin("", "v1", "Event", "events", true, &["ev"], false),
        new_event,
        lease,
        revision,
        crd,
    ]
}

/// The kinds a CustomResourceDefinition defines (one per served version).
pub fn from_crd(crd: &Value) -> Result<Vec<Kind>, String> {
    let spec = crd.get("spec").ok_or("spec: Required value")?;
    let group = spec["group"].as_str().ok_or("spec.group: Required value")?;
    let names = &spec["names"];
    let plural = names["plural"]
        .as_str()
        .ok_or("spec.names.plural: Required value")?;
    let kind = names["kind"]
        .as_str()
        .ok_or("spec.names.kind: Required value")?;
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let versions = spec["versions"]
        .as_array()
        .ok_or("spec.versions: Required value")?;
    let mut out = Vec::new();
    for v in versions
        .iter()
        .filter(|v| v["served"].as_bool() != Some(false))
    {
        out.push(Kind {
            group: group.into(),
            version: v["name"]
                .as_str()
                .ok_or("spec.versions.name: Required value")?
                .into(),
            kind: kind.into(),
            plural: plural.into(),
            singular: names["singular"]
                .as_str()
                .map(String::from)
                .unwrap_or_else(|| kind.to_lowercase()),
            namespaced: spec["scope"].as_str() != Some("Cluster"),
            short_names: strings(&names["shortNames"]),
            categories: strings(&names["categories"]),
            status: v.pointer("/subresources/status").is_some(),
            storage: format!("{plural}.{group}"),
            view: View::Plain,
            schema: v.pointer("/schema/openAPIV3Schema").cloned(),
            columns: v["additionalPrinterColumns"]
                .as_array()
                .cloned()
                .unwrap_or_default(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn events_convert_both_ways() {
        let kinds = builtins();
        let new = kinds.iter().find(|k| k.view == View::NewEvent).unwrap();
        let stored = new.to_storage(json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "regarding": {"name": "p"}, "note": "hi", "reason": "R"}));
        assert_eq!(stored["involvedObject"]["name"], "p");
        assert_eq!(stored["message"], "hi");
        assert_eq!(stored["apiVersion"], "v1");
        let back = new.to_view(stored);
        assert_eq!(back["regarding"]["name"], "p");
        assert_eq!(back["apiVersion"], "events.k8s.io/v1");
    }

    #[test]
    fn the_project_crd_defines_the_pool_kind() {
        let kinds = from_crd(&crate::fixtures::pool_crd()).unwrap();
        assert_eq!(kinds.len(), 1);
        assert_eq!(kinds[0].short_names, vec!["trp"]);
        assert!(kinds[0].status);
        assert!(kinds[0].schema.is_some());
        // Seven columns, and four more with `kubectl get -o wide`.
        assert_eq!(kinds[0].columns.len(), 11);
    }
}
