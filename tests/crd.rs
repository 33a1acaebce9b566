//! The generated CRD: committed copy up to date, and its schema accepts good pools
//! and refuses bad ones with a message naming the field.

use kube::CustomResourceExt;
use serde_json::{Value, json};
use testrunner_operator::crd::{TestRunnerPool, crd_yaml};

fn schema() -> Value {
    let crd = TestRunnerPool::crd();
    serde_json::to_value(
        crd.spec.versions[0]
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .expect("the CRD has a schema"),
    )
    .unwrap()
}

/// Validates like the API server: OpenAPI structure and bounds, then CEL rules.
/// Returns the error messages.
fn validate(pool: &Value) -> Vec<String> {
    let schema = schema();
    let validator = jsonschema::validator_for(&schema).expect("the schema compiles");
    let mut errors: Vec<String> = validator
        .iter_errors(pool)
        .map(|e| format!("{}: {}", e.instance_path(), e))
        .collect();
    if errors.is_empty()
        && let Err(cel) = kube::core::cel::Validator::new().validate(&schema, pool, None)
    {
        errors.push(cel.to_string());
    }
    errors
}

fn minimal() -> Value {
    json!({
        "apiVersion": "testrunner.dev/v1alpha1",
        "kind": "TestRunnerPool",
        "metadata": {"name": "unit", "namespace": "ci"},
        "spec": {
            "image": "registry.example/test-runner:1",
            "command": ["/run-tests"],
            "queue": {"name": "tickets.unit", "connectionSecretRef": {"name": "rabbitmq"}},
            "scaling": {"minWorkers": 0, "maxWorkers": 20, "pollInterval": "2s", "scaleDownDelay": "2m"}
        }
    })
}

#[test]
fn committed_crd_matches_the_generated_one() {
    let committed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/crds/testrunnerpools.testrunner.dev.yaml"
    ))
    .expect("crds/testrunnerpools.testrunner.dev.yaml exists");
    assert!(
        committed == crd_yaml(),
        "crds/ is stale: run `cargo run -- crd > crds/testrunnerpools.testrunner.dev.yaml`"
    );
}

#[test]
fn crd_names_and_columns() {
    let crd = TestRunnerPool::crd();
    assert_eq!(crd.spec.group, "testrunner.dev");
    assert_eq!(crd.spec.names.short_names, Some(vec!["trp".to_string()]));
    assert_eq!(
        crd.spec.names.categories,
        Some(vec!["testrunner".to_string()])
    );
    let v = &crd.spec.versions[0];
    assert!(v.subresources.as_ref().unwrap().status.is_some());
    let cols: Vec<_> = v
        .additional_printer_columns
        .as_ref()
        .unwrap()
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        cols,
        [
            "Image",
            "Desired",
            "Ready",
            "Queue",
            "Phase",
            "Rollout",
            "Age",
            "Canary OK",
            "Canary Crashes",
            "Quarantined",
            "Diagnosis"
        ]
    );
    // The last four only with `kubectl get -o wide`.
    let wide: Vec<_> = v
        .additional_printer_columns
        .as_ref()
        .unwrap()
        .iter()
        .filter(|c| c.priority == Some(1))
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        wide,
        ["Canary OK", "Canary Crashes", "Quarantined", "Diagnosis"]
    );
}

#[test]
fn every_field_has_a_description() {
    fn walk(path: &str, s: &Value, missing: &mut Vec<String>) {
        if let Some(props) = s.get("properties").and_then(Value::as_object) {
            for (k, v) in props {
                let p = format!("{path}.{k}");
                // Embedded Kubernetes types (resources, affinity, ...) keep their own docs.
                if v.get("description").is_none() && !path.contains(".template.") {
                    missing.push(p.clone());
                }
                walk(&p, v, missing);
            }
        }
        if let Some(items) = s.get("items") {
            walk(&format!("{path}[]"), items, missing);
        }
    }
    let schema = schema();
    let mut missing = Vec::new();
    walk("", &schema["properties"]["spec"], &mut missing);
    walk(".status", &schema["properties"]["status"], &mut missing);
    // Kubernetes' own metadata has no description in any CRD.
    assert!(
        missing.is_empty(),
        "fields without a description: {missing:?}"
    );
}

#[test]
fn good_pools_are_accepted() {
    assert_eq!(validate(&minimal()), Vec::<String>::new());
    let mut full = minimal();
    full["spec"]["worker"] = json!({"mode": "Native"});
    full["spec"]["paused"] = json!(true);
    full["spec"]["queue"]["quarantineQueue"] = json!("tickets.unit.poison");
    full["spec"]["scaling"] = json!({"minWorkers": 2, "maxWorkers": 2, "ticketsPerWorker": 3,
        "pollInterval": "500ms", "scaleDownDelay": "1h30m"});
    full["spec"]["template"] = json!({
        "resources": {"limits": {"memory": "2Gi"}},
        "env": [{"name": "LEVEL", "value": "debug"}],
        "nodeSelector": {"pool": "ci"},
        "terminationGracePeriodSeconds": 3600
    });
    assert_eq!(validate(&full), Vec::<String>::new());
}

#[test]
fn bad_pools_are_refused_naming_the_field() {
    type Mutation = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Mutation)> = vec![
        (
            "/spec/scaling/maxWorkers",
            Box::new(|p| p["spec"]["scaling"]["maxWorkers"] = json!(5000)),
        ),
        (
            "/spec/scaling/minWorkers",
            Box::new(|p| p["spec"]["scaling"]["minWorkers"] = json!(-1)),
        ),
        (
            "/spec/scaling/pollInterval",
            Box::new(|p| p["spec"]["scaling"]["pollInterval"] = json!("2 seconds")),
        ),
        (
            "/spec/scaling/scaleDownDelay",
            Box::new(|p| p["spec"]["scaling"]["scaleDownDelay"] = json!("5d")),
        ),
        (
            "/spec/scaling/ticketsPerWorker",
            Box::new(|p| p["spec"]["scaling"]["ticketsPerWorker"] = json!(0)),
        ),
        ("/spec/image", Box::new(|p| p["spec"]["image"] = json!(""))),
        (
            "/spec/queue",
            Box::new(|p| {
                p["spec"]["queue"]
                    .as_object_mut()
                    .unwrap()
                    .remove("name")
                    .map(|_| ())
                    .unwrap()
            }),
        ),
        (
            "/spec/worker/mode",
            Box::new(|p| p["spec"]["worker"] = json!({"mode": "Sidecar"})),
        ),
        (
            "/spec/template/imagePullPolicy",
            Box::new(|p| p["spec"]["template"] = json!({"imagePullPolicy": "Sometimes"})),
        ),
    ];
    for (field, mutate) in cases {
        let mut pool = minimal();
        mutate(&mut pool);
        let errors = validate(&pool);
        assert!(
            errors.iter().any(|e| e.contains(field)),
            "expected an error naming {field}, got {errors:?}"
        );
    }
}

#[test]
fn example_pools_are_valid() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).expect("deploy/examples exists") {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let docs: Vec<Value> = serde_saphyr::from_multiple(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for doc in docs.into_iter().filter(|d| d["kind"] == "TestRunnerPool") {
            assert_eq!(validate(&doc), Vec::<String>::new(), "{}", path.display());
            // ...and the operator reads it.
            serde_json::from_value::<TestRunnerPool>(doc).unwrap();
            seen += 1;
        }
    }
    assert!(
        seen >= 2,
        "expected the minimal and full examples, found {seen}"
    );
}

#[test]
fn min_above_max_is_refused_by_the_cel_rule() {
    let mut pool = minimal();
    pool["spec"]["scaling"]["minWorkers"] = json!(5);
    pool["spec"]["scaling"]["maxWorkers"] = json!(2);
    let errors = validate(&pool);
    assert!(
        errors
            .iter()
            .any(|e| e.contains("minWorkers must be less than or equal to maxWorkers")),
        "{errors:?}"
    );
    pool["spec"]["scaling"]["minWorkers"] = json!(2);
    assert_eq!(validate(&pool), Vec::<String>::new());
}

#[test]
fn a_delivery_limit_at_or_below_the_quarantine_threshold_is_refused_by_the_cel_rule() {
    let refused = |pool: &Value| {
        validate(pool)
            .iter()
            .any(|e| e.contains("queue.deliveryLimit (default 20) must be above"))
    };
    let mut pool = minimal();
    assert!(!refused(&pool), "the defaults (20 and 3) hold");
    pool["spec"]["queue"]["deliveryLimit"] = json!(3);
    assert!(refused(&pool), "3 is not above the default threshold 3");
    pool["spec"]["queue"]["deliveryLimit"] = json!(4);
    assert_eq!(validate(&pool), Vec::<String>::new());
    pool["spec"]["poison"] = json!({"crashesToQuarantine": 10});
    assert!(refused(&pool), "4 is not above 10");
    pool["spec"]["queue"]["deliveryLimit"] = json!(0);
    assert_eq!(validate(&pool), Vec::<String>::new(), "0 turns it off");
    pool["spec"]["queue"]
        .as_object_mut()
        .unwrap()
        .remove("deliveryLimit");
    pool["spec"]["poison"] = json!({"crashesToQuarantine": 20});
    assert!(refused(&pool), "the default limit 20 is not above 20");
}
