//! The real monitoring stack around the operator: Prometheus (Debian's 2.42) scrapes the
//! operator's `/metrics` and evaluates the chart's alert rules, Alertmanager (Debian's
//! 0.25) receives both Prometheus's alerts and the ones the operator pushes itself, and a
//! webhook receiver here records what Alertmanager notifies. The operator runs in this
//! process against the simulated cluster and the local RabbitMQ.
//!
//! Then, on the operator that went through all that: every metric and label the Grafana
//! dashboard and the chart's PrometheusRule use is one `/metrics` exposes, and every
//! dashboard query runs on the real Prometheus.
//!
//! Needs `.tools/prometheus/prometheus`, `.tools/alertmanager/alertmanager` and
//! `.tools/helm4/helm` (`bash .ci/install-tools`; or env `TESTRUNNER_PROMETHEUS`,
//! `TESTRUNNER_ALERTMANAGER`, `TESTRUNNER_HELM`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use kube::api::{Api, Patch, PatchParams, PostParams};
use lapin::options::{ConfirmSelectOptions, QueueDeleteOptions};
use serde_json::{Value, json};
use testrunner_operator::controller::{self, Settings};
use testrunner_operator::crd::{RolloutPhase, TestRunnerPool};
use testrunner_operator::http::{self, Health};
use testrunner_operator::metrics::Metrics;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;
use common::{broker_uri, declare_expiring, eventually, eventually_some, queue_counts};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// The job and namespace the chart's TestRunnerOperatorDown rule is rendered for.
const JOB: &str = "testrunner-operator";
const OPERATOR_NAMESPACE: &str = "testrunner-system";
/// Metrics of other exporters the chart's rules use, with their labels (kube-state-metrics
/// and Prometheus's own `up`): checked by name only against this list.
const EXTERNAL: &[(&str, &[&str])] = &[
    ("up", &["job", "instance", "namespace"]),
    (
        "kube_pod_container_status_waiting_reason",
        &["namespace", "pod", "uid", "container", "reason"],
    ),
    (
        "kube_pod_container_status_restarts_total",
        &["namespace", "pod", "uid", "container"],
    ),
    (
        "kube_pod_owner",
        &[
            "namespace",
            "pod",
            "uid",
            "owner_kind",
            "owner_name",
            "owner_is_controller",
        ],
    ),
];

// ---------------------------------------------------------------------------------------
// Tools and processes

fn tool(env: &str, default: &str) -> PathBuf {
    let path = std::env::var_os(env)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(ROOT).join(default));
    assert!(
        path.exists(),
        "{} is missing: install it with `bash .ci/install-tools` (or set {env})",
        path.display()
    );
    path
}

/// A free port on 127.0.0.1 (free when asked; the process given it binds it at once).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A process of the test: killed and reaped when dropped, on success and on panic alike.
struct Process {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Process {
    fn start(name: &'static str, dir: &Path, program: &Path, args: &[String]) -> Self {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(program)
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("{name} ({}) did not start: {e}", program.display()));
        Self { name, child, log }
    }

    /// The tail of its output, for a failure message.
    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited ({status}):\n{}", self.name, self.tail());
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A scratch directory removed when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An HTTP/1.0 GET (the server closes the connection, so no chunked body): status and body.
async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

/// A Prometheus instant query: the `data.result` array, or the error.
async fn query(prometheus: SocketAddr, expr: &str) -> Result<Vec<Value>, String> {
    let q: String = url::form_urlencoded::byte_serialize(expr.as_bytes()).collect();
    let (status, body) = get(prometheus, &format!("/api/v1/query?query={q}"))
        .await
        .ok_or("no answer")?;
    let v: Value = serde_json::from_str(&body).map_err(|e| format!("{status}: {e}: {body}"))?;
    if v["status"] != "success" {
        return Err(format!("{status}: {body}"));
    }
    Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
}

/// The first value of a query's result, if any.
async fn scalar(prometheus: SocketAddr, expr: &str) -> Option<f64> {
    let result = query(prometheus, expr).await.ok()?;
    result.first()?["value"][1].as_str()?.parse().ok()
}

// ---------------------------------------------------------------------------------------
// The webhook receiver: every notification Alertmanager sends.

#[derive(Clone, Default)]
struct Notifications(Arc<Mutex<Vec<Value>>>);

impl Notifications {
    fn all(&self) -> Vec<Value> {
        self.0.lock().unwrap().clone()
    }

    /// Notifications of the group `alertname` from `source` (`prometheus`: the chart's rule;
    /// no `source` label: pushed by the operator).
    fn of(&self, alertname: &str, source: Option<&str>) -> Vec<Value> {
        self.all()
            .into_iter()
            .filter(|n| {
                n["groupLabels"]["alertname"] == alertname
                    && n["groupLabels"]["source"].as_str() == source
            })
            .collect()
    }

    fn has(&self, alertname: &str, source: Option<&str>, status: &str) -> bool {
        self.of(alertname, source)
            .iter()
            .any(|n| n["status"] == status)
    }
}

async fn record(State(n): State<Notifications>, req: Request) -> &'static str {
    let bytes = axum::body::to_bytes(req.into_body(), 1 << 20)
        .await
        .unwrap();
    if let Ok(v) = serde_json::from_slice::<Value>(&bytes) {
        n.0.lock().unwrap().push(v);
    }
    "ok"
}

// ---------------------------------------------------------------------------------------
// PromQL: the metric names, label matchers and grouping labels an expression uses.

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Num,
    Punct(char),
}

fn lex(expr: &str) -> Vec<Tok> {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            out.push(Tok::Ident(chars[start..i].iter().collect()));
        } else if c.is_ascii_digit() || c == '.' {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
            out.push(Tok::Num);
        } else if c == '"' || c == '\'' || c == '`' {
            let mut s = String::new();
            i += 1;
            while i < chars.len() && chars[i] != c {
                if chars[i] == '\\' && c != '`' {
                    i += 1;
                }
                s.extend(chars.get(i));
                i += 1;
            }
            assert!(i < chars.len(), "unterminated string in {expr}");
            i += 1;
            out.push(Tok::Str(s));
        } else if c == '#' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else {
            assert!(
                "{}()[],=!~<>+-*/^%@".contains(c),
                "unexpected {c:?} in {expr}"
            );
            out.push(Tok::Punct(c));
            i += 1;
        }
    }
    out
}

/// What an expression uses.
#[derive(Debug, Default)]
struct Uses {
    /// Each selector: its metric and the labels of its matchers.
    selectors: Vec<(String, Vec<String>)>,
    /// Labels of `by`, `without`, `on`, `ignoring`, `group_left` and `group_right`.
    grouping: BTreeSet<String>,
    /// Labels `label_replace` creates.
    created: BTreeSet<String>,
}

const GROUPING: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
const KEYWORDS: &[&str] = &[
    "bool", "offset", "and", "or", "unless", "atan2", "inf", "nan", "Inf", "NaN",
];

fn uses(expr: &str) -> Uses {
    let toks = lex(expr);
    let mut u = Uses::default();
    // Open calls: (function, paren depth inside it, argument index).
    let mut calls: Vec<(String, usize, usize)> = Vec::new();
    let mut depth = 0;
    let mut i = 0;
    let matchers = |i: &mut usize| -> Vec<String> {
        // At '{': `label op "value"` separated by commas, up to '}'.
        let mut labels = Vec::new();
        *i += 1;
        loop {
            match &toks[*i] {
                Tok::Punct('}') => break,
                Tok::Punct(',') => *i += 1,
                Tok::Ident(label) => {
                    labels.push(label.clone());
                    *i += 1;
                    while matches!(toks[*i], Tok::Punct('=' | '!' | '~')) {
                        *i += 1;
                    }
                    assert!(
                        matches!(toks[*i], Tok::Str(_)),
                        "a matcher of {label} without a value in {expr}"
                    );
                    *i += 1;
                }
                other => panic!("unexpected {other:?} in the matchers of {expr}"),
            }
        }
        *i += 1;
        labels
    };
    while i < toks.len() {
        match &toks[i] {
            Tok::Ident(name) if toks.get(i + 1) == Some(&Tok::Punct('(')) => {
                if GROUPING.contains(&name.as_str()) {
                    i += 2;
                    while toks[i] != Tok::Punct(')') {
                        if let Tok::Ident(l) = &toks[i] {
                            u.grouping.insert(l.clone());
                        }
                        i += 1;
                    }
                    i += 1;
                } else {
                    depth += 1;
                    calls.push((name.clone(), depth, 0));
                    i += 2;
                }
            }
            Tok::Ident(name) if GROUPING.contains(&name.as_str()) => i += 1,
            // An aggregation with its clause first: `max by (pool) (...)`.
            Tok::Ident(_) if matches!(toks.get(i + 1), Some(Tok::Ident(k)) if k == "by" || k == "without") => {
                i += 1
            }
            Tok::Ident(name) if KEYWORDS.contains(&name.as_str()) => i += 1,
            Tok::Ident(name) => {
                i += 1;
                let labels = if toks.get(i) == Some(&Tok::Punct('{')) {
                    matchers(&mut i)
                } else {
                    Vec::new()
                };
                u.selectors.push((name.clone(), labels));
            }
            Tok::Punct('{') => {
                let labels = matchers(&mut i);
                u.selectors.push((String::new(), labels));
            }
            Tok::Punct('(') => {
                depth += 1;
                i += 1;
            }
            Tok::Punct(')') => {
                if calls.last().is_some_and(|c| c.1 == depth) {
                    calls.pop();
                }
                depth -= 1;
                i += 1;
            }
            Tok::Punct(',') => {
                if let Some(c) = calls.last_mut().filter(|c| c.1 == depth) {
                    c.2 += 1;
                }
                i += 1;
            }
            Tok::Str(s) => {
                if let Some(c) = calls.last().filter(|c| c.1 == depth)
                    && c.0 == "label_replace"
                    && c.2 == 1
                {
                    u.created.insert(s.clone());
                }
                i += 1;
            }
            _ => i += 1,
        }
    }
    u
}

/// Grafana's variables replaced by what Prometheus accepts: `$__rate_interval` by a range,
/// `$namespace` and `$pool` (in regex matchers) by `.*`.
fn grafana_to_promql(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$namespace", ".*")
        .replace("$pool", ".*")
}

/// The operator's exposition: each sample name with the labels its series carry, and the
/// sample names its `# TYPE` lines declare (a family with no series yet has only those).
#[derive(Debug, Default)]
struct Exposed {
    series: BTreeMap<String, BTreeSet<String>>,
    declared: BTreeSet<String>,
}

fn exposed(text: &str) -> Exposed {
    let mut e = Exposed::default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            for s in suffixes {
                e.declared.insert(format!("{name}{s}"));
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            let name = &line[..end];
            let labels: BTreeSet<String> = match line[end..].strip_prefix('{') {
                Some(rest) => lex(&rest[..rest.find('}').unwrap()])
                    .into_iter()
                    .filter_map(|t| match t {
                        Tok::Ident(l) => Some(l),
                        _ => None,
                    })
                    .collect(),
                None => BTreeSet::new(),
            };
            e.series.entry(name.to_string()).or_default().extend(labels);
        }
    }
    e
}

/// What `what` (a dashboard panel or an alert) uses that `/metrics` does not expose.
fn missing(what: &str, expr: &str, e: &Exposed) -> Vec<String> {
    let u = uses(expr);
    let mut out = Vec::new();
    let mut available: BTreeSet<String> = u.created.clone();
    available.insert("le".into());
    for (metric, labels) in &u.selectors {
        let known: BTreeSet<String> = match EXTERNAL.iter().find(|(m, _)| m == metric) {
            Some((_, ls)) => ls.iter().map(|l| l.to_string()).collect(),
            None if !e.declared.contains(metric) && !e.series.contains_key(metric) => {
                out.push(format!("{what}: metric {metric} is not exposed"));
                continue;
            }
            None => match e.series.get(metric) {
                Some(ls) => ls.clone(),
                None if labels.is_empty() && u.grouping.is_empty() => BTreeSet::new(),
                None => {
                    out.push(format!(
                        "{what}: metric {metric} has no series in the scrape, so its labels {labels:?} cannot be checked"
                    ));
                    continue;
                }
            },
        };
        for l in labels {
            if !known.contains(l) && l != "__name__" {
                out.push(format!(
                    "{what}: {metric} has no label {l} (it has {known:?})"
                ));
            }
        }
        available.extend(known);
    }
    for l in &u.grouping {
        if !available.contains(l) {
            out.push(format!(
                "{what}: grouping label {l} is on none of its metrics ({available:?})"
            ));
        }
    }
    out
}

#[test]
fn the_promql_reader_finds_metrics_matchers_and_grouping_labels() {
    let u = uses(
        r#"max by (namespace, pool) (label_replace(rate(a_total{x="1", y=~"b"}[5m]) * on (pod) group_left (owner_name) b, "pool", "$1", "owner_name", "(.+)")) > bool 0 and c offset 10m"#,
    );
    assert_eq!(
        u.selectors,
        vec![
            (
                "a_total".to_string(),
                vec!["x".to_string(), "y".to_string()]
            ),
            ("b".to_string(), vec![]),
            ("c".to_string(), vec![]),
        ]
    );
    assert_eq!(
        u.grouping,
        ["namespace", "pool", "pod", "owner_name"]
            .map(String::from)
            .into()
    );
    assert_eq!(u.created, ["pool".to_string()].into());
    let e = exposed(
        "# TYPE a counter\na_total{x=\"1\",y=\"2\",pod=\"p\",namespace=\"n\"} 1\n# TYPE h histogram\n# TYPE g gauge\ng{owner_name=\"o\"} 1\n",
    );
    assert!(missing("ok", r#"sum by (namespace) (rate(a_total{x="1"}[1m]))"#, &e).is_empty());
    assert!(missing("ok", "sum(rate(h_count[1m]))", &e).is_empty());
    assert_eq!(missing("bad", r#"a_total{z="1"}"#, &e).len(), 1);
    assert_eq!(missing("bad", "nope", &e).len(), 1);
    assert_eq!(missing("bad", "sum by (pool) (g)", &e).len(), 1);
    assert!(
        !missing("bad", "sum by (pool) (rate(h_count[1m]))", &e).is_empty(),
        "labels of a family with no series cannot be checked"
    );
}

// ---------------------------------------------------------------------------------------
// The dashboard and the chart's rules

/// Every query of the shipped dashboard: panels' targets and the variables' queries, as
/// (where, expression).
fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(Path::new(ROOT).join("docs/grafana-dashboard.json"))
        .expect("docs/grafana-dashboard.json");
    let chart = std::fs::read_to_string(
        Path::new(ROOT)
            .join("charts/testrunner-operator/files/dashboards/testrunner-operator.json"),
    )
    .unwrap();
    assert_eq!(
        text, chart,
        "the chart's dashboard is a copy of docs/grafana-dashboard.json"
    );
    let d: Value = serde_json::from_str(&text).unwrap();
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((
                format!("panel {:?} {}", p["title"], t["refId"]),
                grafana_to_promql(t["expr"].as_str().unwrap()),
            ));
        }
    }
    for v in d["templating"]["list"].as_array().unwrap() {
        let Some(q) = v["query"]["query"].as_str() else {
            continue;
        };
        // label_values(SELECTOR, LABEL): the label must be on the selector's metric.
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
            .unwrap_or_else(|| panic!("variable {}: unexpected query {q}", v["name"]));
        let (selector, label) = inner.rsplit_once(',').unwrap();
        out.push((
            format!("variable {}", v["name"]),
            format!(
                "count by ({}) ({})",
                label.trim(),
                grafana_to_promql(selector)
            ),
        ));
    }
    out
}

/// The chart's PrometheusRule, rendered with Helm for job [`JOB`] in [`OPERATOR_NAMESPACE`]:
/// its `spec` (a Prometheus rule file).
fn chart_rules(helm: &Path) -> Value {
    let out = Command::new(helm)
        .current_dir(ROOT)
        .args([
            "template",
            "testrunner-operator",
            "charts/testrunner-operator",
            "--namespace",
            OPERATOR_NAMESPACE,
            "--api-versions",
            "monitoring.coreos.com/v1",
            "--set",
            "prometheus.prometheusRule.enabled=true",
            "--set",
            &format!("prometheus.prometheusRule.job={JOB}"),
            "--show-only",
            "templates/prometheusrule.yaml",
        ])
        .output()
        .expect("helm runs");
    assert!(
        out.status.success(),
        "helm template failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rule: Value = serde_saphyr::from_str(&String::from_utf8(out.stdout).unwrap()).unwrap();
    assert_eq!(rule["kind"], "PrometheusRule");
    rule["spec"].clone()
}

/// The runbook anchors of docs/runbooks.md, as GitHub makes them from its headings.
fn runbook_anchors() -> BTreeSet<String> {
    let text = std::fs::read_to_string(Path::new(ROOT).join("docs/runbooks.md")).unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("## "))
        .map(|h| {
            h.trim()
                .to_lowercase()
                .chars()
                .filter(|c| c.is_alphanumeric() || *c == '-' || *c == ' ')
                .collect::<String>()
                .replace(' ', "-")
        })
        .collect()
}

// ---------------------------------------------------------------------------------------

async fn broker() -> lapin::Connection {
    lapin::Connection::connect(&broker_uri(), lapin::ConnectionProperties::default())
        .await
        .expect("RabbitMQ on 127.0.0.1:5672 (bash .ci/ensure-rabbitmq) or at TESTRUNNER_AMQP_URI")
}

/// Keeps `waiting` tickets ready in `queue` (stamped, as `publish` stamps them) until
/// stopped, so canaries have tickets to be judged on.
fn keep_tickets(
    queue: String,
    waiting: u32,
) -> (
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
) {
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move {
        let conn = broker().await;
        let ch = conn.create_channel().await.unwrap();
        while !*stopped.borrow() {
            let (ready, _) = queue_counts(&ch, &queue).await;
            if ready < waiting {
                testrunner_operator::publish::publish(
                    &broker_uri(),
                    &queue,
                    waiting - ready,
                    false,
                )
                .await
                .unwrap();
            }
            tokio::select! {
                _ = stopped.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
        let _ = conn.close(200, "done".into()).await;
    });
    (stop, task)
}

async fn rollout_phase(
    pools: &Api<TestRunnerPool>,
    name: &str,
) -> Option<(String, RolloutPhase, String)> {
    let r = pools.get_status(name).await.ok()?.status?.rollout?;
    Some((r.target_image, r.phase, r.stable_image))
}

async fn quarantined(pools: &Api<TestRunnerPool>, name: &str) -> Option<Vec<String>> {
    let s = pools.get_status(name).await.ok()?.status?;
    Some(
        s.quarantine
            .map(|q| q.tickets.into_iter().map(|t| t.id).collect())
            .unwrap_or_default(),
    )
}

/// The one alert of `alertname` in `notification`.
fn the_alert<'a>(notification: &'a Value, alertname: &str) -> &'a Value {
    let alerts = notification["alerts"].as_array().unwrap();
    assert_eq!(alerts.len(), 1, "one alert in {notification:#}");
    assert_eq!(alerts[0]["labels"]["alertname"], alertname);
    &alerts[0]
}

/// The notifications of one alert group: one firing, then resolved ones only.
fn assert_fired_once_then_resolved(
    n: &Notifications,
    alertname: &str,
    source: Option<&str>,
) -> (Value, Value) {
    let of = n.of(alertname, source);
    let firing: Vec<&Value> = of.iter().filter(|x| x["status"] == "firing").collect();
    assert_eq!(
        firing.len(),
        1,
        "{alertname} from {source:?} reached the receiver once as firing: {of:#?}"
    );
    let first_resolved = of
        .iter()
        .position(|x| x["status"] == "resolved")
        .unwrap_or_else(|| panic!("{alertname} from {source:?} was resolved: {of:#?}"));
    let first_firing = of.iter().position(|x| x["status"] == "firing").unwrap();
    assert!(first_firing < first_resolved, "{of:#?}");
    (firing[0].clone(), of[first_resolved].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_and_alertmanager_carry_a_poison_ticket_and_a_failed_rollout_to_the_receiver_once_and_resolve_them()
 {
    common::init_logs();
    let prometheus_bin = tool("TESTRUNNER_PROMETHEUS", ".tools/prometheus/prometheus");
    let alertmanager_bin = tool(
        "TESTRUNNER_ALERTMANAGER",
        ".tools/alertmanager/alertmanager",
    );
    let helm = tool("TESTRUNNER_HELM", ".tools/helm4/helm");
    let scratch = Scratch(std::env::temp_dir().join(format!(
        "testrunner-monitoring-{}-{}",
        std::process::id(),
        jiff::Timestamp::now().as_millisecond()
    )));
    let dir = scratch.0.clone();
    std::fs::create_dir_all(&dir).unwrap();

    // The webhook receiver.
    let notifications = Notifications::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let receiver = listener.local_addr().unwrap();
    let app = Router::new()
        .fallback(record)
        .with_state(notifications.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    // Alertmanager: one group per alert name, pool and source (the chart's rules carry
    // `source: prometheus` from Prometheus's external labels; the operator's own alerts
    // have no source), notified at once and resolved notices sent.
    let am_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    std::fs::write(
        dir.join("alertmanager.yml"),
        json!({
            "route": {
                "receiver": "recorder",
                "group_by": ["alertname", "namespace", "pool", "source"],
                "group_wait": "1s",
                "group_interval": "2s",
                "repeat_interval": "1h"
            },
            "receivers": [{
                "name": "recorder",
                "webhook_configs": [{"url": format!("http://{receiver}/"), "send_resolved": true}]
            }]
        })
        .to_string(),
    )
    .unwrap();
    let mut alertmanager = Process::start(
        "alertmanager",
        &dir,
        &alertmanager_bin,
        &[
            "--config.file=alertmanager.yml".into(),
            "--storage.path=alertmanager-data".into(),
            format!("--web.listen-address={am_addr}"),
            "--cluster.listen-address=".into(),
        ],
    );

    // The operator, in this process, with its /metrics on a free port.
    let conn = broker().await;
    let sim = common::simulation(&broker_uri(), 50.0).await;
    let client = sim.client();
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let metrics_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let serving = tokio::spawn(http::serve(
        metrics_addr,
        Health {
            metrics: metrics.clone(),
            ready: ready.clone(),
        },
    ));
    let operator = tokio::spawn(controller::run(
        client.clone(),
        Settings::in_process(vec!["default".into()]),
        metrics.clone(),
        ready,
    ));

    // Prometheus: scrapes the operator every second with the chart's rules.
    std::fs::write(dir.join("rules.json"), chart_rules(&helm).to_string()).unwrap();
    let prom_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    std::fs::write(
        dir.join("prometheus.yml"),
        json!({
            "global": {
                "scrape_interval": "1s",
                "evaluation_interval": "1s",
                "external_labels": {"source": "prometheus"}
            },
            "rule_files": ["rules.json"],
            "alerting": {"alertmanagers": [{"static_configs": [{"targets": [am_addr.to_string()]}]}]},
            "scrape_configs": [{
                "job_name": JOB,
                // The pools' own `namespace` label wins over the target's (as the chart's
                // ServiceMonitor does it).
                "honor_labels": true,
                "static_configs": [{
                    "targets": [metrics_addr.to_string()],
                    "labels": {"namespace": OPERATOR_NAMESPACE}
                }]
            }]
        })
        .to_string(),
    )
    .unwrap();
    let mut prometheus = Process::start(
        "prometheus",
        &dir,
        &prometheus_bin,
        &[
            "--config.file=prometheus.yml".into(),
            "--storage.tsdb.path=prometheus-data".into(),
            format!("--web.listen-address={prom_addr}"),
            "--rules.alert.resend-delay=1s".into(),
        ],
    );
    eventually(
        "Prometheus to scrape the operator",
        Duration::from_secs(60),
        async || {
            prometheus.assert_running();
            alertmanager.assert_running();
            scalar(
                prom_addr,
                &format!("up{{job=\"{JOB}\",namespace=\"{OPERATOR_NAMESPACE}\"}}"),
            )
            .await
                == Some(1.0)
        },
    )
    .await;
    eventually(
        "Alertmanager to be ready",
        Duration::from_secs(30),
        async || {
            get(am_addr, "/-/ready")
                .await
                .is_some_and(|(s, _)| s == 200)
        },
    )
    .await;

    // A pool whose command crashes on one ticket on image :1, on every ticket on :bad,
    // and on none on :2; its own alerts go to the same Alertmanager.
    let queue = format!(
        "monitoring-{}-{}",
        std::process::id(),
        jiff::Timestamp::now().as_millisecond()
    );
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    declare_expiring(&ch, &queue, true).await;
    declare_expiring(&ch, &format!("{queue}.quarantine"), true).await;
    let ids = testrunner_operator::publish::publish(&broker_uri(), &queue, 12, false)
        .await
        .unwrap();
    let poison = ids[4].clone();
    let pools: Api<TestRunnerPool> = Api::namespaced(client.clone(), "default");
    let pool: TestRunnerPool = serde_json::from_value(json!({
        "apiVersion": "testrunner.dev/v1alpha1", "kind": "TestRunnerPool",
        "metadata": {"name": "mon"},
        "spec": {
            "image": "example.org/runner:1",
            "command": ["sh", "-c", "case \"$TESTRUNNER_IMAGE\" in *:1) [ \"$TICKET_ID\" = \"$POISON\" ] && exit 3;; *:bad) exit 3;; esac; cat >/dev/null; sleep 0.1"],
            "template": {"env": [{"name": "POISON", "value": poison}]},
            "queue": {"name": queue, "connectionSecretRef": {"name": "rabbitmq", "key": "uri"}},
            "scaling": {"minWorkers": 1, "maxWorkers": 2, "pollInterval": "300ms", "scaleDownDelay": "1s"},
            "alerts": {"alertmanagerUrl": format!("http://{am_addr}"), "on": ["PoisonTicket", "RolloutFailed"]}
        }
    }))
    .unwrap();
    pools.create(&PostParams::default(), &pool).await.unwrap();

    // 1. The poison ticket is quarantined: both alerts reach the receiver.
    eventually_some(
        "the poison ticket in quarantine",
        Duration::from_secs(120),
        async || {
            quarantined(&pools, "mon")
                .await
                .filter(|q| q == std::slice::from_ref(&poison))
        },
    )
    .await;
    eventually(
        "TestRunnerPoisonTicket from the rule and from the operator at the receiver",
        Duration::from_secs(60),
        async || {
            notifications.has("TestRunnerPoisonTicket", Some("prometheus"), "firing")
                && notifications.has("TestRunnerPoisonTicket", None, "firing")
        },
    )
    .await;

    // 2. A bad image fails its canary (on tickets kept waiting for it).
    let (stop_load, load) = keep_tickets(queue.clone(), 3);
    let patch = |image: &str| json!({"spec": {"image": image}});
    pools
        .patch(
            "mon",
            &PatchParams::default(),
            &Patch::Merge(patch("example.org/runner:bad")),
        )
        .await
        .unwrap();
    eventually_some(
        "the :bad canary to be rolled back",
        Duration::from_secs(120),
        async || {
            rollout_phase(&pools, "mon")
                .await
                .filter(|(target, phase, _)| {
                    target.ends_with(":bad") && *phase == RolloutPhase::RolledBack
                })
        },
    )
    .await;
    eventually(
        "TestRunnerRolloutFailed from the rule and from the operator at the receiver",
        Duration::from_secs(60),
        async || {
            notifications.has("TestRunnerRolloutFailed", Some("prometheus"), "firing")
                && notifications.has("TestRunnerRolloutFailed", None, "firing")
        },
    )
    .await;

    // 3. The fixed image is promoted and gets the poison ticket back, which now passes:
    // every alert resolves.
    pools
        .patch(
            "mon",
            &PatchParams::default(),
            &Patch::Merge(patch("example.org/runner:2")),
        )
        .await
        .unwrap();
    eventually_some(
        "the fixed image to be promoted",
        Duration::from_secs(180),
        async || {
            rollout_phase(&pools, "mon")
                .await
                .filter(|(target, phase, stable)| {
                    target.ends_with(":2")
                        && *phase == RolloutPhase::Promoted
                        && stable.ends_with(":2")
                })
        },
    )
    .await;
    eventually_some(
        "the quarantine to be empty",
        Duration::from_secs(120),
        async || quarantined(&pools, "mon").await.filter(|q| q.is_empty()),
    )
    .await;
    eventually(
        "every alert to be resolved at the receiver",
        Duration::from_secs(90),
        async || {
            ["TestRunnerPoisonTicket", "TestRunnerRolloutFailed"]
                .iter()
                .all(|a| {
                    notifications.has(a, Some("prometheus"), "resolved")
                        && notifications.has(a, None, "resolved")
                })
        },
    )
    .await;
    let _ = stop_load.send(true);
    load.await.unwrap();

    // Each alert reached the receiver once as firing, with the labels and annotations the
    // runbooks speak of, then resolved.
    let anchors = runbook_anchors();
    for alertname in ["TestRunnerPoisonTicket", "TestRunnerRolloutFailed"] {
        let (firing, resolved) =
            assert_fired_once_then_resolved(&notifications, alertname, Some("prometheus"));
        let a = the_alert(&firing, alertname);
        let labels = a["labels"].as_object().unwrap();
        let names: BTreeSet<&str> = labels.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            BTreeSet::from(["alertname", "namespace", "pool", "severity", "source"]),
            "{a:#}"
        );
        assert_eq!(
            (&a["labels"]["namespace"], &a["labels"]["pool"]),
            (&json!("default"), &json!("mon"))
        );
        assert_eq!(a["labels"]["severity"], "warning");
        for key in ["summary", "description", "runbook_url"] {
            assert!(
                a["annotations"][key]
                    .as_str()
                    .is_some_and(|s| !s.is_empty()),
                "{alertname} has {key}: {a:#}"
            );
        }
        assert!(
            a["annotations"]["summary"]
                .as_str()
                .unwrap()
                .contains("default/mon"),
            "{a:#}"
        );
        let anchor = a["annotations"]["runbook_url"]
            .as_str()
            .unwrap()
            .rsplit_once('#')
            .unwrap()
            .1;
        assert_eq!(anchor, alertname.to_lowercase());
        assert!(
            anchors.contains(anchor),
            "docs/runbooks.md has a section #{anchor}"
        );
        assert_eq!(the_alert(&resolved, alertname)["status"], "resolved");

        let (firing, resolved) = assert_fired_once_then_resolved(&notifications, alertname, None);
        let a = the_alert(&firing, alertname);
        assert_eq!(
            (&a["labels"]["namespace"], &a["labels"]["pool"]),
            (&json!("default"), &json!("mon"))
        );
        assert_eq!(a["labels"]["severity"], "warning");
        for key in ["summary", "description"] {
            assert!(
                a["annotations"][key]
                    .as_str()
                    .is_some_and(|s| !s.is_empty()),
                "{alertname} has {key}: {a:#}"
            );
        }
        assert_eq!(the_alert(&resolved, alertname)["status"], "resolved");
        if alertname == "TestRunnerPoisonTicket" {
            assert_eq!(
                a["labels"]["ticket"],
                json!(poison),
                "the operator's alert names the ticket"
            );
            assert!(
                a["annotations"]["summary"]
                    .as_str()
                    .unwrap()
                    .contains(&poison),
                "{a:#}"
            );
        } else {
            assert!(
                a["annotations"]["summary"]
                    .as_str()
                    .unwrap()
                    .contains("runner:bad"),
                "{a:#}"
            );
        }
    }

    // Every metric and label the dashboard and the rules use is exposed by this operator,
    // which has probed, scaled, crashed, quarantined, replayed, rolled back, promoted and
    // alerted.
    let (status, text) = get(metrics_addr, "/metrics")
        .await
        .expect("/metrics answers");
    assert_eq!(status, 200);
    let e = exposed(&text);
    let mut problems = Vec::new();
    let rules = chart_rules(&helm);
    let mut rule_exprs = Vec::new();
    for group in rules["groups"].as_array().unwrap() {
        for r in group["rules"].as_array().unwrap() {
            let what = format!("alert {}", r["alert"].as_str().unwrap());
            problems.extend(missing(&what, r["expr"].as_str().unwrap(), &e));
            rule_exprs.push(what);
        }
    }
    assert_eq!(rule_exprs.len(), 7, "{rule_exprs:?}");
    let queries = dashboard_queries();
    for (what, expr) in &queries {
        problems.extend(missing(what, expr, &e));
    }
    assert!(
        problems.is_empty(),
        "{}\n\nexposed:\n{text}",
        problems.join("\n")
    );

    // Every dashboard query runs on Prometheus; the per-pool ones have data for this pool.
    for (what, expr) in &queries {
        let result = query(prom_addr, expr)
            .await
            .unwrap_or_else(|e| panic!("{what}: {expr}: {e}"));
        let per_pool = expr.contains("pool=~")
            && !expr.contains("histogram_quantile")
            && !expr.contains("== 1");
        if per_pool && !expr.contains("increase(") && !expr.contains("rate(") {
            assert!(
                result.iter().any(|s| s["metric"]["pool"] == "mon"),
                "{what}: no series of pool mon for {expr}: {result:?}"
            );
        }
    }
    let taken = scalar(
        prom_addr,
        r#"sum(testrunner_ticket_wait_seconds_count{pool="mon"})"#,
    )
    .await
    .unwrap_or(0.0);
    assert!(
        taken >= ids.len() as f64 - 1.0,
        "ticket waits recorded: {taken}"
    );
    let p50 = scalar(
        prom_addr,
        r#"histogram_quantile(0.5, sum by (le) (testrunner_ticket_wait_seconds_bucket{pool="mon"}))"#,
    )
    .await;
    let p99 = scalar(
        prom_addr,
        r#"histogram_quantile(0.99, sum by (le) (testrunner_ticket_wait_seconds_bucket{pool="mon"}))"#,
    )
    .await;
    eprintln!(
        "ticket waits recorded: {taken}; p50 {p50:?} s, p99 {p99:?} s; notifications: {}",
        notifications.all().len()
    );

    // Cleanup: the operator, the cluster, the queues; the processes go with their guards.
    operator.abort();
    serving.abort();
    sim.shutdown().await;
    for q in [
        queue.clone(),
        format!("{queue}.quarantine"),
        "testrunner.outcomes.default.mon".to_string(),
    ] {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = conn.close(200, "done".into()).await;
    drop(prometheus);
    drop(alertmanager);
}
