//! Footprint at scale: the operator, as its own process (`testrunner-operator run`),
//! against the embedded API server with a hollow node (pods Running and Ready, no
//! processes), 1,000 pools of 10 workers each on their own quorum queues, on a RabbitMQ
//! node of the benchmark's own (with Debian's default of 1,024 open files).
//!
//! ```text
//! cargo bench --bench scale
//! cargo bench --bench scale -- --pools 200 --pods-per-pool 5 --steady 30s
//! ```
//!
//! Measures: the operator's resident memory, CPU and API requests per minute at steady
//! state, its probe rate, reconcile latency when 10% of the queues change at once, the
//! time to converge after a restart; and the broker's side: the queues, channels,
//! consumers and connections the operator adds, the broker's CPU and memory, and the
//! time a new broker connection takes throughout the run.
//!
//! Results: `$CARGO_TARGET_DIR/bench/scale.json` (target/bench/ when unset). Method and
//! figures: docs/benchmarks.md.

#[allow(dead_code)] // the tests use more of it
#[path = "../tests/common/broker_node.rs"]
mod broker_node;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::CustomResourceExt;
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::json;
use testrunner_operator::crd::TestRunnerPool;
use testrunner_sim as sim;

#[path = "common/mod.rs"]
mod common;
use common::{quantile, until};

struct Args {
    pools: usize,
    pods_per_pool: usize,
    namespaces: usize,
    steady: Duration,
    poll_interval: Duration,
    broker_files: u32,
}

fn usage() -> ! {
    eprintln!(
        "usage: cargo bench --bench scale [-- [--pools N] [--pods-per-pool N] [--namespaces N] [--steady DURATION] [--poll-interval DURATION] [--broker-files N]]"
    );
    std::process::exit(2)
}

fn args() -> Args {
    let mut out = Args {
        pools: 1000,
        pods_per_pool: 10,
        namespaces: 10,
        steady: Duration::from_secs(60),
        poll_interval: Duration::from_secs(1),
        broker_files: 1024,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage());
        let mut count = || -> usize {
            value()
                .parse()
                .ok()
                .filter(|n| *n > 0)
                .unwrap_or_else(|| usage())
        };
        match arg.as_str() {
            "--bench" => {}
            "--pools" => out.pools = count(),
            "--pods-per-pool" => out.pods_per_pool = count(),
            "--namespaces" => out.namespaces = count(),
            "--broker-files" => out.broker_files = count() as u32,
            "--steady" => {
                out.steady = humantime::parse_duration(&value()).unwrap_or_else(|_| usage())
            }
            "--poll-interval" => {
                out.poll_interval = humantime::parse_duration(&value()).unwrap_or_else(|_| usage())
            }
            _ => usage(),
        }
    }
    out.namespaces = out.namespaces.min(out.pools);
    out
}

/// How often a wait looks again ([`common::until`]).
const POLL: Duration = Duration::from_millis(200);

/// CPU seconds (user + system) and resident memory (MiB) of process `pid`.
fn usage_of(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): state is the first.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the state.
    let cpu = (ticks(11) + ticks(12)) / clock_ticks();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    (cpu, rss_kib / 1024.0)
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// The body of `GET /metrics` at `addr` (HTTP/1.0: the server closes the connection).
async fn metrics_text(addr: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: operator\r\n\r\n")
        .await?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await?;
    match answer.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.") && head.contains(" 200 ") => {
            Ok(body.to_string())
        }
        _ => Err(std::io::Error::other("no 200 answer")),
    }
}

/// The operator's `/metrics`, as name{labels} -> value.
async fn scrape(addr: &str) -> HashMap<String, f64> {
    let text = metrics_text(addr)
        .await
        .expect("the operator serves /metrics");
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// The sum of every series of `metric` whose labels contain `filter`.
fn total(metrics: &HashMap<String, f64>, metric: &str, filter: &str) -> f64 {
    metrics
        .iter()
        .filter(|(k, _)| {
            (k.as_str() == metric || k.starts_with(&format!("{metric}{{"))) && k.contains(filter)
        })
        .map(|(_, v)| v)
        .sum()
}

/// How many series of `metric` there are.
fn series(metrics: &HashMap<String, f64>, metric: &str) -> usize {
    metrics
        .keys()
        .filter(|k| k.starts_with(&format!("{metric}{{")))
        .count()
}

/// API requests (all, and writes) the operator made so far.
fn requests(metrics: &HashMap<String, f64>) -> (f64, f64) {
    let all = total(metrics, "testrunner_kube_api_requests_total", "");
    let writes: f64 = ["POST", "PUT", "PATCH", "DELETE"]
        .iter()
        .map(|m| {
            total(
                metrics,
                "testrunner_kube_api_requests_total",
                &format!("method=\"{m}\""),
            )
        })
        .sum();
    (all, writes)
}

/// The operator as its own process.
struct Operator {
    child: Child,
    metrics_addr: String,
}

impl Operator {
    fn start(kubeconfig: &std::path::Path, log: &std::path::Path) -> Operator {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let metrics_addr = format!("127.0.0.1:{port}");
        let out = std::fs::File::create(log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_testrunner-operator"))
            .args(["--log-format", "json", "run", "--leader-election", "false"])
            .args(["--metrics-addr", &metrics_addr])
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("the operator starts");
        Operator {
            child,
            metrics_addr,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The broker's objects: queues, consumers, channels, connections.
fn broker_objects(node: &broker_node::BrokerNode) -> BTreeMap<&'static str, usize> {
    let count = |what: &str| {
        node.ctl(&["-q", "--no-table-headers", what])
            .lines()
            .filter(|l| !l.trim().is_empty())
            .count()
    };
    BTreeMap::from([
        ("queues", count("list_queues")),
        ("consumers", count("list_consumers")),
        ("channels", count("list_channels")),
        ("connections", count("list_connections")),
    ])
}

/// How long new broker connections took, measured every two seconds on a thread of its
/// own (so that this process's load does not count as the broker's).
#[derive(Default)]
struct Connects {
    took: Vec<Duration>,
    failures: usize,
}

/// Starts measuring new connections to `uri` until `stop` is set.
fn connection_watch(
    uri: String,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> (Arc<Mutex<Connects>>, std::thread::JoinHandle<()>) {
    let connects: Arc<Mutex<Connects>> = Arc::default();
    let c = connects.clone();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let started = Instant::now();
                let ok = tokio::time::timeout(
                    Duration::from_secs(5),
                    Connection::connect(&uri, ConnectionProperties::default()),
                )
                .await;
                let took = started.elapsed();
                {
                    let mut c = c.lock().unwrap();
                    c.took.push(took);
                    if !matches!(ok, Ok(Ok(_))) {
                        c.failures += 1;
                    }
                }
                if let Ok(Ok(conn)) = ok {
                    let _ = conn.close(200, "measured".into()).await;
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        });
    });
    (connects, thread)
}

/// What the operator added to the broker: `steady` minus `before`, per kind.
fn added(
    steady: &BTreeMap<&'static str, usize>,
    before: &BTreeMap<&'static str, usize>,
) -> BTreeMap<&'static str, i64> {
    steady
        .iter()
        .map(|(k, v)| (*k, *v as i64 - before.get(k).copied().unwrap_or(0) as i64))
        .collect()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = args();
    let total_pods = args.pools * args.pods_per_pool;
    eprintln!(
        "scale: {} pools x {} pods in {} namespaces, steady {:?}, poll {:?}",
        args.pools, args.pods_per_pool, args.namespaces, args.steady, args.poll_interval
    );
    let files = args.broker_files;
    let node = tokio::task::spawn_blocking(move || {
        broker_node::BrokerNode::start_with_open_files("scale", Some(files))
    })
    .await
    .unwrap();
    let uri = node.uri();
    let broker_pid = node.pid().expect("the broker's pid");
    let (broker_cpu_0, broker_rss_0) = usage_of(broker_pid);
    let objects_empty = broker_objects(&node);
    let stop_connects = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (connects, connect_thread) = connection_watch(uri.clone(), stop_connects.clone());

    // The work queues: one quorum queue per pool, as users declare them.
    let conn = Connection::connect(&uri, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut quorum = FieldTable::default();
    quorum.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    let pool_names: Vec<(String, String)> = (0..args.pools)
        .map(|i| {
            (
                format!("scale-{}", i % args.namespaces),
                format!("pool-{i}"),
            )
        })
        .collect();
    let queue_of = |ns: &str, pool: &str| format!("{ns}.{pool}");
    let started = Instant::now();
    for (ns, pool) in &pool_names {
        ch.queue_declare(
            queue_of(ns, pool).as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            quorum.clone(),
        )
        .await
        .expect("the broker declares the work queue");
    }
    eprintln!(
        "scale: {} quorum queues declared in {:.1} s",
        args.pools,
        started.elapsed().as_secs_f64()
    );
    let objects_queues = broker_objects(&node);
    let (broker_cpu_1, broker_rss_1) = usage_of(broker_pid);

    // The cluster: the embedded API server, a hollow node, the pools.
    let cluster = sim::Simulation::start(
        "127.0.0.1:0".parse().unwrap(),
        sim::Options {
            crds: vec![TestRunnerPool::crd()],
            hollow: true,
            ..sim::Options::new(env!("CARGO_BIN_EXE_testrunner-operator").into())
        },
    )
    .await
    .expect("the simulated cluster starts");
    let client = cluster.client();
    let dir = std::env::temp_dir().join(format!("bench-scale-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    cluster.write_kubeconfig(&kubeconfig).unwrap();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for n in 0..args.namespaces {
        let ns = format!("scale-{n}");
        namespaces
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
            )
            .await
            .unwrap();
        let secret: Secret = serde_json::from_value(
            json!({"metadata": {"name": "rabbitmq"}, "stringData": {"uri": uri}}),
        )
        .unwrap();
        Api::<Secret>::namespaced(client.clone(), &ns)
            .create(&PostParams::default(), &secret)
            .await
            .unwrap();
    }
    let poll = format!("{}ms", args.poll_interval.as_millis());
    for (ns, pool) in &pool_names {
        let p: TestRunnerPool = serde_json::from_value(json!({
            "apiVersion": "testrunner.dev/v1alpha1", "kind": "TestRunnerPool",
            "metadata": {"name": pool},
            "spec": {
                "image": "example.org/test-runner:1",
                "command": ["run-tests"],
                "queue": {"name": queue_of(ns, pool),
                    "connectionSecretRef": {"name": "rabbitmq", "key": "uri"}},
                "scaling": {"minWorkers": args.pods_per_pool, "maxWorkers": args.pods_per_pool,
                    "pollInterval": poll},
            },
        }))
        .unwrap();
        Api::<TestRunnerPool>::namespaced(client.clone(), ns)
            .create(&PostParams::default(), &p)
            .await
            .unwrap();
    }
    let pools_all: Api<TestRunnerPool> = Api::all(client.clone());
    let ready_workers = async || -> usize {
        pools_all
            .list(&ListParams::default())
            .await
            .map(|l| {
                l.items
                    .iter()
                    .filter_map(|p| Some(p.status.as_ref()?.workers.as_ref()?.ready as usize))
                    .sum()
            })
            .unwrap_or(0)
    };

    // The operator starts; every pool gets its workers.
    let mut operator = Operator::start(&kubeconfig, &dir.join("operator.log"));
    let started = Instant::now();
    until(
        &format!("{total_pods} ready workers"),
        Duration::from_secs(1800),
        POLL,
        || async { ready_workers().await >= total_pods },
    )
    .await;
    let first_converge_s = started.elapsed().as_secs_f64();
    eprintln!(
        "scale: {total_pods} workers ready {first_converge_s:.1} s after the operator started"
    );

    // Steady state: nothing changes for `steady`.
    tokio::time::sleep(args.poll_interval * 5).await;
    let m0 = scrape(&operator.metrics_addr).await;
    let (cpu0, _) = usage_of(operator.pid());
    let (bcpu0, _) = usage_of(broker_pid);
    let t0 = Instant::now();
    let mut rss_max: f64 = 0.0;
    let mut broker_rss_max: f64 = 0.0;
    while t0.elapsed() < args.steady {
        rss_max = rss_max.max(usage_of(operator.pid()).1);
        broker_rss_max = broker_rss_max.max(usage_of(broker_pid).1);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let seconds = t0.elapsed().as_secs_f64();
    let m1 = scrape(&operator.metrics_addr).await;
    let (cpu1, _) = usage_of(operator.pid());
    let (bcpu1, _) = usage_of(broker_pid);
    let per_min = |a: f64, b: f64| (b - a) * 60.0 / seconds;
    let (req0, wr0) = requests(&m0);
    let (req1, wr1) = requests(&m1);
    let probes_per_s = (total(&m1, "testrunner_queue_probe_duration_seconds_count", "")
        - total(&m0, "testrunner_queue_probe_duration_seconds_count", ""))
        / seconds;
    let probe_seconds = total(&m1, "testrunner_queue_probe_duration_seconds_sum", "")
        - total(&m0, "testrunner_queue_probe_duration_seconds_sum", "");
    let probe_mean_ms = if probes_per_s > 0.0 {
        probe_seconds / (probes_per_s * seconds) * 1000.0
    } else {
        0.0
    };
    let operator_core_fraction = (cpu1 - cpu0) / seconds;
    let broker_core_fraction = (bcpu1 - bcpu0) / seconds;
    let objects_steady = broker_objects(&node);
    eprintln!(
        "scale: steady: rss max {rss_max:.1} MiB, {:.3} core, {:.1} API requests/min ({:.1} writes/min), {probes_per_s:.0} probes/s (mean {probe_mean_ms:.2} ms); broker {broker_core_fraction:.3} core, {broker_rss_max:.0} MiB, {objects_steady:?}",
        operator_core_fraction,
        per_min(req0, req1),
        per_min(wr0, wr1),
    );

    // 10% of the queues change at once: how long until each pool's status shows it.
    let changed: Vec<&(String, String)> = pool_names
        .iter()
        .step_by(10)
        .take((args.pools / 10).max(1))
        .collect();
    let waiting: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let latencies: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let watch = {
        let waiting = waiting.clone();
        let latencies = latencies.clone();
        tokio::spawn(
            watcher(pools_all.clone(), watcher::Config::default())
                .applied_objects()
                .for_each(move |p| {
                    if let Ok(p) = p {
                        let key = format!(
                            "{}/{}",
                            p.metadata.namespace.clone().unwrap_or_default(),
                            p.metadata.name.clone().unwrap_or_default()
                        );
                        let shows = p
                            .status
                            .as_ref()
                            .and_then(|s| s.queue.as_ref())
                            .is_some_and(|q| q.ready >= 1);
                        if shows && let Some(at) = waiting.lock().unwrap().remove(&key) {
                            latencies.lock().unwrap().push(at.elapsed());
                        }
                    }
                    std::future::ready(())
                }),
        )
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (ns, pool) in &changed {
        waiting
            .lock()
            .unwrap()
            .insert(format!("{ns}/{pool}"), Instant::now());
        ch.basic_publish(
            "".into(),
            queue_of(ns, pool).as_str().into(),
            BasicPublishOptions::default(),
            b"ticket",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    until(
        "every changed queue to show in its pool's status",
        Duration::from_secs(120),
        POLL,
        || async { waiting.lock().unwrap().is_empty() },
    )
    .await;
    watch.abort();
    let reconcile: Vec<Duration> = latencies.lock().unwrap().clone();
    let reconcile_p50 = quantile(&reconcile, 0.5);
    let reconcile_p99 = quantile(&reconcile, 0.99);
    eprintln!(
        "scale: {} queues changed at once: status shows it after p50 {reconcile_p50:.2} s, p99 {reconcile_p99:.2} s",
        reconcile.len()
    );

    // A restart: how long until every pool is reconciled again, and what it writes.
    operator.stop();
    let pods_before = ready_workers().await;
    let mut operator = Operator::start(&kubeconfig, &dir.join("operator-restarted.log"));
    let restarted = Instant::now();
    until(
        "the restarted operator to reconcile every pool",
        Duration::from_secs(600),
        POLL,
        || async {
            metrics_text(&operator.metrics_addr)
                .await
                .is_ok_and(|text| {
                    text.lines()
                        .filter(|l| l.starts_with("testrunner_workers_ready{"))
                        .count()
                        >= args.pools
                })
        },
    )
    .await;
    let restart_converge_s = restarted.elapsed().as_secs_f64();
    let after_restart = scrape(&operator.metrics_addr).await;
    let restart_writes = requests(&after_restart).1;
    let pods_after = ready_workers().await;
    eprintln!(
        "scale: restarted operator reconciled every pool in {restart_converge_s:.1} s with {restart_writes} API writes; ready workers {pods_before} -> {pods_after}"
    );
    operator.stop();
    stop_connects.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = tokio::task::spawn_blocking(move || connect_thread.join()).await;
    let (connect_worst, connect_p99, connect_failures, connect_attempts) = {
        let c = connects.lock().unwrap();
        (
            c.took.iter().max().copied().unwrap_or_default(),
            quantile(&c.took, 0.99),
            c.failures,
            c.took.len(),
        )
    };

    let (broker_cpu_now, _) = usage_of(broker_pid);
    let result = json!({
        "pools": args.pools,
        "pods": total_pods,
        "namespaces": args.namespaces,
        "poll_interval_s": args.poll_interval.as_secs_f64(),
        "steady_seconds": seconds,
        "first_converge_s": first_converge_s,
        "rss_mib": rss_max,
        "operator_core_fraction": operator_core_fraction,
        "probe_core_fraction": operator_core_fraction,
        "api_requests_per_min_steady": per_min(req0, req1),
        "api_writes_per_min_steady": per_min(wr0, wr1),
        "probes_per_s": probes_per_s,
        "probe_mean_ms": probe_mean_ms,
        "probe_failure_series": series(&m1, "testrunner_queue_probe_failures_total"),
        "reconcile_changed_pools": reconcile.len(),
        "reconcile_p50_s": reconcile_p50,
        "reconcile_p99_s": reconcile_p99,
        "restart_converge_s": restart_converge_s,
        "restart_api_writes": restart_writes,
        "ready_workers_before_restart": pods_before,
        "ready_workers_after_restart": pods_after,
        "broker": {
            "open_files_limit": args.broker_files,
            "objects_empty": objects_empty,
            "objects_with_work_queues": objects_queues,
            "objects_steady": objects_steady,
            "objects_added_by_operator": added(&objects_steady, &objects_queues),
            "rss_mib_empty": broker_rss_0,
            "rss_mib_with_work_queues": broker_rss_1,
            "rss_mib_steady_max": broker_rss_max,
            "core_fraction_steady": broker_core_fraction,
            "cpu_s_total": broker_cpu_now - broker_cpu_0,
            "cpu_s_declaring_work_queues": broker_cpu_1 - broker_cpu_0,
            "new_connection_worst_s": connect_worst.as_secs_f64(),
            "new_connection_p99_s": connect_p99,
            "new_connection_failures": connect_failures,
            "new_connection_attempts": connect_attempts,
        },
    });
    let out_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("bench");
    std::fs::create_dir_all(&out_dir).unwrap();
    let path = out_dir.join("scale.json");
    std::fs::write(&path, serde_json::to_string_pretty(&result).unwrap()).unwrap();
    println!("{}", serde_json::to_string_pretty(&result).unwrap());
    eprintln!("scale: wrote {}", path.display());

    // The queues go with the broker node; the cluster with this process.
    cluster.shutdown().await;
    drop(conn);
    let _ = std::fs::remove_dir_all(&dir);
    tokio::task::spawn_blocking(move || drop(node))
        .await
        .unwrap();
    assert!(
        connect_failures == 0 && connect_worst <= Duration::from_secs(1),
        "the broker must answer a new connection within 1 s throughout: worst {connect_worst:?}, {connect_failures} failed"
    );
}
