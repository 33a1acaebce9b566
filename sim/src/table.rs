//! `meta.k8s.io/v1` Table responses: what `kubectl get` prints.

use serde_json::{Value, json};

use super::kinds::Kind;

/// Kubernetes' short human duration (`5s`, `3m20s`, `2d4h`).
pub fn human_duration(secs: i64) -> String {
    if secs < -1 {
        return "<invalid>".into();
    }
    let s = secs.max(0);
    if s < 120 {
        return format!("{s}s");
    }
    let m = s / 60;
    if m < 10 {
        return if s % 60 == 0 {
            format!("{m}m")
        } else {
            format!("{m}m{}s", s % 60)
        };
    }
    if m < 180 {
        return format!("{m}m");
    }
    let h = m / 60;
    if h < 8 {
        return if m % 60 == 0 {
            format!("{h}h")
        } else {
            format!("{h}h{}m", m % 60)
        };
    }
    if h < 48 {
        return format!("{h}h");
    }
    if h < 24 * 8 {
        return if h % 24 == 0 {
            format!("{}d", h / 24)
        } else {
            format!("{}d{}h", h / 24, h % 24)
        };
    }
    if h < 24 * 365 * 2 {
        return format!("{}d", h / 24);
    }
    if h < 24 * 365 * 8 {
        return format!("{}y{}d", h / 24 / 365, (h / 24) % 365);
    }
    format!("{}y", h / 24 / 365)
}

/// Seconds since an RFC 3339 time.
pub fn age_secs(t: &str) -> Option<i64> {
    let t: jiff::Timestamp = t.parse().ok()?;
    Some(jiff::Timestamp::now().duration_since(t).as_secs())
}

fn age(v: Option<&Value>) -> Value {
    v.and_then(Value::as_str)
        .and_then(age_secs)
        .map(|s| json!(human_duration(s)))
        .unwrap_or(json!("<unknown>"))
}

/// Evaluates a simple JSONPath (`.status.workers.ready`, `.spec.containers[0].image`).
pub fn json_path<'a>(obj: &'a Value, path: &str) -> Option<&'a Value> {
    let mut cur = obj;
    for seg in path
        .trim_start_matches('.')
        .split('.')
        .filter(|s| !s.is_empty())
    {
        let (name, index) = match seg.split_once('[') {
            Some((n, rest)) => (n, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (seg, None),
        };
        if !name.is_empty() {
            cur = cur.get(name)?;
        }
        if let Some(i) = index {
            cur = cur.get(i)?;
        }
    }
    Some(cur)
}

fn column(name: &str, type_: &str, format: &str, description: &str, priority: i64) -> Value {
    json!({"name": name, "type": type_, "format": format, "description": description, "priority": priority})
}

/// Whether init container `c` (its spec) is a sidecar: `restartPolicy: Always`.
fn restartable(c: Option<&Value>) -> bool {
    c.is_some_and(|c| c["restartPolicy"] == "Always")
}

/// The reason a terminated state shows: its `reason`, else its signal or exit code.
fn terminated_reason(t: &Value, prefix: &str) -> String {
    match t["reason"].as_str().filter(|r| !r.is_empty()) {
        Some(r) => format!("{prefix}{r}"),
        None => match t["signal"].as_i64().filter(|s| *s != 0) {
            Some(sig) => format!("{prefix}Signal:{sig}"),
            None => format!("{prefix}ExitCode:{}", t["exitCode"].as_i64().unwrap_or(0)),
        },
    }
}

/// The READY, STATUS and RESTARTS cells as the API server's printer makes them: READY
/// counts the containers and the sidecars (init containers with `restartPolicy:
/// Always`), ready ones out of all; STATUS is the first unfinished init container's
/// state while the pod initializes, else the last container's reason that stands out;
/// RESTARTS adds up the containers' and sidecars' restarts (every init container's while
/// the pod initializes), with the latest restart's age.
fn pod_cells(pod: &Value) -> Vec<Value> {
    let status = &pod["status"];
    let list = |v: &Value| v.as_array().cloned().unwrap_or_default();
    let statuses = list(&status["containerStatuses"]);
    let init_specs = list(&pod["spec"]["initContainers"]);
    let init_spec = |name: &Value| init_specs.iter().find(|c| c["name"] == *name);
    let mut total = list(&pod["spec"]["containers"]).len();
    total += init_specs.iter().filter(|c| restartable(Some(c))).count();
    let mut ready = 0;
    let mut reason = status["reason"]
        .as_str()
        .filter(|r| !r.is_empty())
        .or(status["phase"].as_str())
        .unwrap_or_default()
        .to_string();
    let conditions = list(&status["conditions"]);
    let condition = |type_: &str, status: &str| {
        conditions
            .iter()
            .any(|c| c["type"] == type_ && c["status"] == status)
    };
    if conditions
        .iter()
        .any(|c| c["type"] == "PodScheduled" && c["reason"] == "SchedulingGated")
    {
        reason = "SchedulingGated".into();
    }
    let finished_at = |c: &Value| {
        c.pointer("/lastState/terminated/finishedAt")
            .and_then(Value::as_str)
            .and_then(|t| t.parse::<jiff::Timestamp>().ok())
    };
    let (mut restarts, mut last_restart) = (0, None::<jiff::Timestamp>);
    let (mut sidecar_restarts, mut last_sidecar_restart) = (0, None::<jiff::Timestamp>);
    let mut initializing = false;
    for (i, c) in list(&status["initContainerStatuses"]).iter().enumerate() {
        let count = c["restartCount"].as_i64().unwrap_or(0);
        let sidecar = restartable(init_spec(&c["name"]));
        restarts += count;
        last_restart = last_restart.max(finished_at(c));
        if sidecar {
            sidecar_restarts += count;
            last_sidecar_restart = last_sidecar_restart.max(finished_at(c));
        }
        let state = &c["state"];
        let terminated = state["terminated"]
            .is_object()
            .then_some(&state["terminated"]);
        if terminated.is_some_and(|t| t["exitCode"] == 0) {
            continue;
        }
        if sidecar && c["started"] == true {
            if c["ready"] == true {
                ready += 1;
            }
            continue;
        }
        initializing = true;
        reason = if let Some(t) = terminated {
            terminated_reason(t, "Init:")
        } else if let Some(w) = state["waiting"]["reason"]
            .as_str()
            .filter(|r| !r.is_empty() && *r != "PodInitializing")
        {
            format!("Init:{w}")
        } else {
            format!("Init:{i}/{}", init_specs.len())
        };
        break;
    }
    if !initializing || condition("Initialized", "True") {
        restarts = sidecar_restarts;
        last_restart = last_sidecar_restart;
        let (mut running, mut error_reason) = (false, None);
        for c in statuses.iter().rev() {
            restarts += c["restartCount"].as_i64().unwrap_or(0);
            last_restart = last_restart.max(finished_at(c));
            let state = &c["state"];
            if let Some(w) = state["waiting"]["reason"]
                .as_str()
                .filter(|r| !r.is_empty())
            {
                reason = w.into();
            } else if state["terminated"].is_object() {
                reason = terminated_reason(&state["terminated"], "");
                if state["terminated"]["exitCode"] != 0 {
                    error_reason = Some(reason.clone());
                }
            } else if c["ready"] == true && state["running"].is_object() {
                running = true;
                ready += 1;
            }
        }
        if reason == "Completed" {
            if running && condition("Ready", "True") {
                reason = "Running".into();
            } else if let Some(e) = error_reason {
                reason = e;
            } else if running {
                reason = "NotReady".into();
            }
        }
    }
    let phase = status["phase"].as_str().unwrap_or_default();
    if pod.pointer("/metadata/deletionTimestamp").is_some() {
        if status["reason"] == "NodeLost" {
            reason = "Unknown".into();
        } else if !matches!(phase, "Succeeded" | "Failed") {
            reason = "Terminating".into();
        }
    }
    let restarts = match last_restart {
        Some(t) if restarts > 0 => {
            let ago = jiff::Timestamp::now().duration_since(t).as_secs();
            format!("{restarts} ({} ago)", human_duration(ago))
        }
        _ => restarts.to_string(),
    };
    let or_none = |v: Option<&str>| json!(v.filter(|s| !s.is_empty()).unwrap_or("<none>"));
    let ip = pod
        .pointer("/status/podIPs/0/ip")
        .or(pod.pointer("/status/podIP"))
        .and_then(Value::as_str);
    let gates: Vec<&str> = pod
        .pointer("/spec/readinessGates")
        .and_then(Value::as_array)
        .map(|g| {
            g.iter()
                .filter_map(|g| g["conditionType"].as_str())
                .collect()
        })
        .unwrap_or_default();
    let gates = if gates.is_empty() {
        json!("<none>")
    } else {
        let met = gates
            .iter()
            .filter(|g| {
                pod.pointer("/status/conditions")
                    .and_then(Value::as_array)
                    .is_some_and(|cs| cs.iter().any(|c| c["type"] == **g && c["status"] == "True"))
            })
            .count();
        json!(format!("{met}/{}", gates.len()))
    };
    vec![
        json!(format!("{ready}/{total}")),
        json!(reason),
        json!(restarts),
        age(pod.pointer("/metadata/creationTimestamp")),
        or_none(ip),
        or_none(pod.pointer("/spec/nodeName").and_then(Value::as_str)),
        or_none(
            pod.pointer("/status/nominatedNodeName")
                .and_then(Value::as_str),
        ),
        gates,
    ]
}

fn event_cells(ev: &Value) -> Vec<Value> {
    let last = ev["lastTimestamp"]
        .as_str()
        .or(ev["eventTime"].as_str())
        .or(ev
            .pointer("/metadata/creationTimestamp")
            .and_then(Value::as_str));
    let obj = &ev["involvedObject"];
    vec![
        age(last.map(|s| json!(s)).as_ref()),
        ev["type"].clone(),
        ev["reason"].clone(),
        json!(format!(
            "{}/{}",
            obj["kind"].as_str().unwrap_or_default().to_lowercase(),
            obj["name"].as_str().unwrap_or_default()
        )),
        ev["message"].clone(),
    ]
}

/// The Table of `items` (objects in the view of `kind`). `include` is the
/// `includeObject` parameter: None, Object or PartialObjectMetadata (default).
pub fn table(kind: &Kind, items: &[Value], resource_version: &str, include: Option<&str>) -> Value {
    let mut columns = vec![column(
        "Name",
        "string",
        "name",
        "Name must be unique within a namespace.",
        0,
    )];
    let is_pod = kind.group.is_empty() && kind.kind == "Pod";
    let is_core_event = kind.group.is_empty() && kind.kind == "Event";
    if is_pod {
        columns.push(column(
            "Ready",
            "string",
            "",
            "The number of containers ready.",
            0,
        ));
        columns.push(column(
            "Status",
            "string",
            "",
            "The aggregate status of the containers in this pod.",
            0,
        ));
        columns.push(column("Restarts", "string", "", "The number of times the containers in this pod have been restarted and when the last container restarted.", 0));
        columns.push(column(
            "Age",
            "string",
            "",
            "CreationTimestamp of the pod.",
            0,
        ));
        // The wide columns (`kubectl get -o wide`).
        columns.push(column("IP", "string", "", "The pod's IP address.", 1));
        columns.push(column(
            "Node",
            "string",
            "",
            "The node the pod is bound to.",
            1,
        ));
        columns.push(column(
            "Nominated Node",
            "string",
            "",
            "The node the scheduler nominated for the pod.",
            1,
        ));
        columns.push(column(
            "Readiness Gates",
            "string",
            "",
            "How many of the pod's readiness gates are met.",
            1,
        ));
    } else if is_core_event {
        columns = vec![
            column(
                "Last Seen",
                "string",
                "",
                "When the event was last seen.",
                0,
            ),
            column("Type", "string", "", "Type of the event.", 0),
            column("Reason", "string", "", "Why the event happened.", 0),
            column("Object", "string", "", "The object the event is about.", 0),
            column("Message", "string", "", "What happened.", 0),
        ];
    } else if kind.columns.is_empty() {
        columns.push(column(
            "Age",
            "date",
            "",
            "CreationTimestamp of the object.",
            0,
        ));
    } else {
        for c in &kind.columns {
            let type_ = c["type"].as_str().unwrap_or("string");
            columns.push(column(
                c["name"].as_str().unwrap_or_default(),
                if type_ == "date" { "string" } else { type_ },
                c["format"].as_str().unwrap_or_default(),
                c["description"].as_str().unwrap_or_default(),
                c["priority"].as_i64().unwrap_or(0),
            ));
        }
    }
    let rows: Vec<Value> = items
        .iter()
        .map(|obj| {
            let mut cells = vec![obj.pointer("/metadata/name").cloned().unwrap_or(json!(""))];
            if is_pod {
                cells.extend(pod_cells(obj));
            } else if is_core_event {
                cells = event_cells(obj);
            } else if kind.columns.is_empty() {
                cells.push(age(obj.pointer("/metadata/creationTimestamp")));
            } else {
                for c in &kind.columns {
                    let v = json_path(obj, c["jsonPath"].as_str().unwrap_or_default());
                    cells.push(match (c["type"].as_str(), v) {
                        (Some("date"), v) => age(v),
                        (_, Some(v)) => v.clone(),
                        (_, None) => Value::Null,
                    });
                }
            }
            let mut row = json!({"cells": cells});
            match include {
                Some("None") => {}
                Some("Object") => row["object"] = obj.clone(),
                _ => {
                    row["object"] = json!({
                        "kind": "PartialObjectMetadata",
                        "apiVersion": "meta.k8s.io/v1",
                        "metadata": obj["metadata"],
                    })
                }
            }
            row
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version},
        "columnDefinitions": columns,
        "rows": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_kubectl() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(200), "3m20s");
        assert_eq!(human_duration(3600 * 5 + 60), "5h1m");
        assert_eq!(human_duration(3600 * 24 * 3), "3d");
    }

    #[test]
    fn pod_status_column() {
        let pod = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "w"}]},
            "status": {"phase": "Running", "containerStatuses": [{"ready": false, "restartCount": 2,
                "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]}});
        let cells = pod_cells(&pod);
        assert_eq!(cells[0], "0/1");
        assert_eq!(cells[1], "CrashLoopBackOff");
        assert_eq!(cells[2], "2");
        // The wide columns: none of them known yet.
        assert_eq!(
            cells[4..],
            [
                json!("<none>"),
                json!("<none>"),
                json!("<none>"),
                json!("<none>")
            ]
        );
    }

    #[test]
    fn sidecars_count_in_ready_and_restarts() {
        let running = json!({"running": {"startedAt": "2026-01-01T00:00:00Z"}});
        let restarted =
            json!({"terminated": {"exitCode": 1, "finishedAt": "2026-01-01T00:00:00Z"}});
        let spec = json!({"initContainers": [
                {"name": "setup"}, {"name": "proxy", "restartPolicy": "Always"}, {"name": "late"}],
            "containers": [{"name": "main"}]});
        let init = |proxy_ready: bool, late: Value| {
            json!([
                {"name": "setup", "restartCount": 1, "ready": true,
                    "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}},
                {"name": "proxy", "restartCount": 3, "started": true, "ready": proxy_ready,
                    "state": running, "lastState": restarted},
                late,
            ])
        };
        let done = json!({"name": "late", "ready": true,
            "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}});
        let initialized = json!([{"type": "Initialized", "status": "True"},
            {"type": "Ready", "status": "True"}]);
        let pod = |init: Value, main: Value, conditions: Value| {
            json!({"metadata": {"name": "p"}, "spec": spec,
                "status": {"phase": "Running", "conditions": conditions,
                    "initContainerStatuses": init, "containerStatuses": main}})
        };
        let main = json!([{"name": "main", "restartCount": 2, "ready": true, "state": running}]);
        // Running: the sidecar is one of the containers; its restarts count, the
        // finished init container's do not.
        let cells = pod_cells(&pod(
            init(true, done.clone()),
            main.clone(),
            initialized.clone(),
        ));
        assert_eq!(cells[0], "2/2");
        assert_eq!(cells[1], "Running");
        assert!(
            cells[2].as_str().unwrap().starts_with("5 ("),
            "{}",
            cells[2]
        );
        // A sidecar that is not ready.
        let cells = pod_cells(&pod(init(false, done), main, initialized));
        assert_eq!(cells[0], "1/2");
        // Initializing: the sidecar started, the init container after it runs.
        let late = json!({"name": "late", "ready": false, "started": true, "state": running});
        let waiting = json!([{"name": "main", "restartCount": 0, "ready": false,
            "state": {"waiting": {"reason": "PodInitializing"}}}]);
        let cells = pod_cells(&pod(init(true, late), waiting.clone(), json!([])));
        assert_eq!(cells[0], "1/2");
        assert_eq!(cells[1], "Init:2/3");
        assert!(
            cells[2].as_str().unwrap().starts_with("4 ("),
            "{}",
            cells[2]
        );
        // A sidecar that runs but has not started (its startup probe has not passed).
        let mut statuses = init(
            true,
            json!({"name": "late", "state": {"waiting": {"reason": "PodInitializing"}}}),
        );
        statuses[1]["started"] = json!(false);
        let cells = pod_cells(&pod(statuses, waiting, json!([])));
        assert_eq!(cells[0], "0/2");
        assert_eq!(cells[1], "Init:1/3");
    }

    #[test]
    fn pod_wide_columns() {
        let pod = json!({"metadata": {"name": "p"},
            "spec": {"nodeName": "n1", "containers": [{"name": "w"}],
                "readinessGates": [{"conditionType": "a"}, {"conditionType": "b"}]},
            "status": {"phase": "Running", "podIP": "10.0.0.7", "podIPs": [{"ip": "10.0.0.7"}],
                "conditions": [{"type": "a", "status": "True"}, {"type": "b", "status": "False"}]}});
        let cells = pod_cells(&pod);
        assert_eq!(
            cells[4..],
            [
                json!("10.0.0.7"),
                json!("n1"),
                json!("<none>"),
                json!("1/2")
            ]
        );
    }
}
