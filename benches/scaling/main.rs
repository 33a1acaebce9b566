//! Scaling quality, trace-driven, in simulated time: this operator's real decision
//! (`core::plan`) against KEDA's defaults and the physical floor, on ticket arrival
//! traces.
//!
//! ```text
//! cargo bench --bench scaling                       # the shipped traces (benches/traces/)
//! cargo bench --bench scaling -- --trace FILE --pod-start SECONDS --max-workers N
//! cargo bench --bench scaling -- --write-traces     # regenerate the shipped traces
//! ```
//!
//! Results: `$CARGO_TARGET_DIR/bench/scaling.json` (target/bench/ when unset); plots:
//! docs/scaling-<trace>.png for the shipped traces, next to the JSON for others.
//! Method and figures: docs/benchmarks.md.

mod plot;
mod sim;
mod traces;

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{Map, Value, json};

use sim::{Outcome, Params, Policy, Ticket, quantile};

struct Args {
    trace: Option<PathBuf>,
    pod_start: Option<f64>,
    max_workers: Option<u32>,
    write_traces: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: cargo bench --bench scaling [-- [--trace FILE] [--pod-start SECONDS] [--max-workers N] [--write-traces]]"
    );
    std::process::exit(2)
}

fn args() -> Args {
    let mut out = Args {
        trace: None,
        pod_start: None,
        max_workers: None,
        write_traces: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage());
        match arg.as_str() {
            // What `cargo bench` passes to every bench binary.
            "--bench" => {}
            "--trace" => out.trace = Some(PathBuf::from(value())),
            "--pod-start" => {
                out.pod_start = Some(
                    value()
                        .parse()
                        .ok()
                        .filter(|v: &f64| *v >= 0.0)
                        .unwrap_or_else(|| usage()),
                )
            }
            "--max-workers" => {
                out.max_workers = Some(
                    value()
                        .parse()
                        .ok()
                        .filter(|v| *v > 0)
                        .unwrap_or_else(|| usage()),
                )
            }
            "--write-traces" => out.write_traces = true,
            _ => usage(),
        }
    }
    out
}

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn results_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir().join("target"));
    target.join("bench")
}

fn round(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

fn summary(o: &Outcome) -> Value {
    json!({
        "p50_wait_s": round(quantile(&o.waits, 0.50)),
        "p99_wait_s": round(quantile(&o.waits, 0.99)),
        "max_wait_s": round(quantile(&o.waits, 1.0)),
        "worker_seconds": o.worker_seconds.round(),
        "interrupted": o.interrupted,
        "redeliveries": o.redeliveries,
        "abandoned": o.abandoned.iter().filter(|a| **a).count(),
        "lost_work_s": o.lost_work_s.round(),
        "pods_created": o.pods_created,
        "end_s": o.end.round(),
    })
}

/// Runs every policy on one trace, in parallel; returns the outcomes in policy order.
fn run_all(trace: &[Ticket], params: &Params) -> Vec<(Policy, Outcome)> {
    std::thread::scope(|s| {
        let handles: Vec<_> = Policy::ALL
            .iter()
            .map(|&p| s.spawn(move || (p, sim::run(p, trace, params))))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a simulation thread"))
            .collect()
    })
}

/// Checks that every ticket completed exactly once, or was given up.
fn check(name: &str, policy: Policy, o: &Outcome) {
    let settled = |i: usize| o.completions[i] + u32::from(o.abandoned[i]) == 1;
    if let Some(i) = (0..o.completions.len()).find(|&i| !settled(i)) {
        panic!(
            "{name}/{}: ticket {i} completed {} times",
            policy.key(),
            o.completions[i]
        );
    }
}

fn bench_one(
    name: &str,
    about: &str,
    file: &Path,
    trace: &[Ticket],
    params: &Params,
    plot_to: &Path,
) -> Value {
    let started = Instant::now();
    let runs = run_all(trace, params);
    let mut entry = Map::new();
    entry.insert("about".into(), json!(about));
    entry.insert("file".into(), json!(file.display().to_string()));
    entry.insert("tickets".into(), json!(trace.len()));
    entry.insert("max_workers".into(), json!(params.max_workers));
    entry.insert("pod_start_s".into(), json!(params.pod_start));
    println!(
        "\n{name}: {} tickets, maxWorkers {}, pod start {} s ({:.1?})",
        trace.len(),
        params.max_workers,
        params.pod_start,
        started.elapsed()
    );
    println!(
        "  {:<16} {:>10} {:>10} {:>10} {:>14} {:>11} {:>12}",
        "policy", "p50 wait", "p99 wait", "max wait", "worker-s", "interrupted", "redeliveries"
    );
    let abandoned = |o: &Outcome| o.abandoned.iter().filter(|a| **a).count();
    for (policy, o) in &runs {
        check(name, *policy, o);
        println!(
            "  {:<16} {:>9.1}s {:>9.1}s {:>9.1}s {:>14.0} {:>11} {:>12}{}",
            policy.key(),
            quantile(&o.waits, 0.5),
            quantile(&o.waits, 0.99),
            quantile(&o.waits, 1.0),
            o.worker_seconds,
            o.interrupted,
            o.redeliveries,
            match abandoned(o) {
                0 => String::new(),
                n => format!("  ({n} abandoned)"),
            }
        );
        entry.insert(policy.key().into(), summary(o));
    }
    let title = format!(
        "{name}: {} tickets, maxWorkers {}, pod start-up {} s",
        trace.len(),
        params.max_workers,
        params.pod_start
    );
    let refs: Vec<(Policy, &Outcome)> = runs.iter().map(|(p, o)| (*p, o)).collect();
    match plot::draw(plot_to, &title, &refs) {
        Ok(()) => println!("  plot: {}", plot_to.display()),
        Err(e) => eprintln!("  plot failed: {e}"),
    }
    Value::Object(entry)
}

fn main() {
    let args = args();
    let root = manifest_dir();
    let traces_dir = root.join("benches/traces");
    if args.write_traces {
        for shipped in traces::SHIPPED {
            let path = traces_dir.join(format!("{}.csv", shipped.name));
            traces::write(&path, &traces::generate(shipped)).expect("write a trace");
            println!("wrote {}", path.display());
        }
        return;
    }
    let out_dir = results_dir();
    std::fs::create_dir_all(&out_dir).expect("create the results directory");
    let base = Params::default();
    let mut results = Map::new();
    if let Some(file) = &args.trace {
        let trace = traces::read(file).unwrap_or_else(|e| {
            eprintln!("{e}");
            std::process::exit(1)
        });
        let params = Params {
            pod_start: args.pod_start.unwrap_or(base.pod_start),
            max_workers: args.max_workers.unwrap_or(base.max_workers),
            ..base
        };
        let name = file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "trace".into());
        let plot_to = out_dir.join(format!("scaling-{name}.png"));
        results.insert(
            name.clone(),
            bench_one(&name, "", file, &trace, &params, &plot_to),
        );
    } else {
        for shipped in traces::SHIPPED {
            let file = traces_dir.join(format!("{}.csv", shipped.name));
            let trace = traces::read(&file).unwrap_or_else(|e| {
                eprintln!("{e} (regenerate with `cargo bench --bench scaling -- --write-traces`)");
                std::process::exit(1)
            });
            let params = Params {
                pod_start: args.pod_start.unwrap_or(base.pod_start),
                max_workers: args.max_workers.unwrap_or(shipped.max_workers),
                ..base.clone()
            };
            let plot_to = root.join(format!("docs/scaling-{}.png", shipped.name));
            let relative = Path::new("benches/traces").join(format!("{}.csv", shipped.name));
            results.insert(
                shipped.name.into(),
                bench_one(
                    shipped.name,
                    shipped.about,
                    &relative,
                    &trace,
                    &params,
                    &plot_to,
                ),
            );
        }
    }
    let path = out_dir.join("scaling.json");
    let text = serde_json::to_string_pretty(&Value::Object(results)).expect("JSON");
    std::fs::write(&path, text + "\n").expect("write the results");
    println!("\nresults: {}", path.display());
}
