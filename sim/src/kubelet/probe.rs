//! Startup, readiness and liveness probes of a running container (a main container or
//! a sidecar), as a kubelet runs them: `httpGet` (HTTP; a status from 200 to 399
//! passes), `tcpSocket` (the connection opens) and `exec` (the command, run in the
//! container's environment, mounts and user, exits 0), each after
//! `initialDelaySeconds`, every `periodSeconds` (both divided by the time scale), with
//! `timeoutSeconds`, `successThreshold` and `failureThreshold`. Until the startup probe
//! passes the container has not `started` and the other probes wait; a startup probe
//! that fails `failureThreshold` times has the container stopped and restarted. The
//! readiness probe drives the container's `ready` (false until it passes); a liveness
//! probe that fails `failureThreshold` times in a row has the container stopped and
//! restarted. Connections are made in the pod's network namespace when it has one.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::watch;

use super::pod::PodRun;

/// A probe's settings, defaults as in the API.
struct Settings {
    initial_delay: Duration,
    period: Duration,
    timeout: Duration,
    success_threshold: u64,
    failure_threshold: u64,
}

impl Settings {
    fn of(run: &PodRun, probe: &Value) -> Self {
        let secs = |field: &str, default: u64| probe[field].as_u64().unwrap_or(default);
        Settings {
            initial_delay: run
                .config
                .scaled(Duration::from_secs(secs("initialDelaySeconds", 0))),
            period: run
                .config
                .scaled(Duration::from_secs(secs("periodSeconds", 10).max(1))),
            timeout: Duration::from_secs(secs("timeoutSeconds", 1).max(1)),
            success_threshold: secs("successThreshold", 1).max(1),
            failure_threshold: secs("failureThreshold", 3).max(1),
        }
    }
}

/// Runs the container's probes until aborted (when the container exits): first the
/// startup probe, if any, which marks the container started (and tells `started`); then
/// readiness and liveness. Returns only when the startup or liveness probe gives up: the
/// grace period (seconds) to stop the container with, the probe's
/// `terminationGracePeriodSeconds` or else the pod's. `init`: the container's status is
/// among the init containers' (a sidecar).
pub(super) async fn run_probes(
    run: Arc<PodRun>,
    c: Value,
    init: bool,
    index: usize,
    env: Vec<(String, String)>,
    started: Option<Arc<watch::Sender<bool>>>,
) -> u64 {
    let probe_of = |field: &str| c.get(field).filter(|p| p.is_object()).cloned();
    let grace = |probe: &Value| {
        probe["terminationGracePeriodSeconds"]
            .as_u64()
            .or_else(|| {
                run.pod
                    .pointer("/spec/terminationGracePeriodSeconds")
                    .and_then(Value::as_u64)
            })
            .unwrap_or(30)
    };
    let readiness_probe = probe_of("readinessProbe");
    if let Some(probe) = probe_of("startupProbe") {
        let settings = Settings::of(&run, &probe);
        tokio::time::sleep(settings.initial_delay).await;
        let mut failures = 0;
        while let Err(why) = check(&run, &c, &probe, &env, settings.timeout).await {
            failures += 1;
            tracing::info!(pod = %run.name, error = %why, failures, "startup probe failed");
            if failures >= settings.failure_threshold {
                return grace(&probe);
            }
            tokio::time::sleep(settings.period).await;
        }
        let ready = readiness_probe.is_none();
        run.with_container(init, index, |s| {
            s.started = true;
            s.ready = ready;
        });
        if let Some(tx) = &started {
            tx.send_replace(true);
        }
    }
    let readiness = async {
        let Some(probe) = &readiness_probe else {
            return std::future::pending::<u64>().await;
        };
        let settings = Settings::of(&run, probe);
        tokio::time::sleep(settings.initial_delay).await;
        let (mut successes, mut failures, mut ready) = (0, 0, false);
        loop {
            match check(&run, &c, probe, &env, settings.timeout).await {
                Ok(()) => {
                    successes += 1;
                    failures = 0;
                    if !ready && successes >= settings.success_threshold {
                        ready = true;
                        run.with_container(init, index, |s| s.ready = true);
                    }
                }
                Err(why) => {
                    failures += 1;
                    successes = 0;
                    tracing::debug!(pod = %run.name, error = %why, "readiness probe failed");
                    if ready && failures >= settings.failure_threshold {
                        ready = false;
                        run.with_container(init, index, |s| s.ready = false);
                    }
                }
            }
            tokio::time::sleep(settings.period).await;
        }
    };
    let liveness = async {
        let Some(probe) = probe_of("livenessProbe") else {
            return std::future::pending::<u64>().await;
        };
        let settings = Settings::of(&run, &probe);
        tokio::time::sleep(settings.initial_delay).await;
        let mut failures = 0;
        loop {
            match check(&run, &c, &probe, &env, settings.timeout).await {
                Ok(()) => failures = 0,
                Err(why) => {
                    failures += 1;
                    tracing::info!(pod = %run.name, error = %why, failures, "liveness probe failed");
                    if failures >= settings.failure_threshold {
                        return grace(&probe);
                    }
                }
            }
            tokio::time::sleep(settings.period).await;
        }
    };
    tokio::select! {
        never = readiness => never,
        grace = liveness => grace,
    }
}

/// One run of `probe` against container `c`.
async fn check(
    run: &PodRun,
    c: &Value,
    probe: &Value,
    env: &[(String, String)],
    timeout: Duration,
) -> Result<(), String> {
    if let Some(http) = probe.get("httpGet") {
        if http["scheme"].as_str().is_some_and(|s| s != "HTTP") {
            return Err("only HTTP probes are simulated".into());
        }
        let addr = address(c, http)?;
        let path = http["path"].as_str().unwrap_or("/").to_string();
        let mut headers = String::new();
        for h in http["httpHeaders"].as_array().into_iter().flatten() {
            if let (Some(n), Some(v)) = (h["name"].as_str(), h["value"].as_str()) {
                headers.push_str(&format!("{n}: {v}\r\n"));
            }
        }
        let code = connect(run, move || {
            let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
            stream.set_read_timeout(Some(timeout))?;
            stream.set_write_timeout(Some(timeout))?;
            write!(
                stream,
                "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: kube-probe/simulated\r\nAccept: */*\r\n{headers}Connection: close\r\n\r\n"
            )?;
            let mut head = [0u8; 64];
            let n = stream.read(&mut head)?;
            let line = String::from_utf8_lossy(&head[..n]).to_string();
            line.split_whitespace()
                .nth(1)
                .and_then(|c| c.parse::<u16>().ok())
                .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {line:?}")))
        })
        .await
        .map_err(|e| format!("HTTP probe of {addr}: {e}"))?;
        return if (200..400).contains(&code) {
            Ok(())
        } else {
            Err(format!("HTTP probe failed with statuscode: {code}"))
        };
    }
    if let Some(tcp) = probe.get("tcpSocket") {
        let addr = address(c, tcp)?;
        return connect(run, move || {
            TcpStream::connect_timeout(&addr, timeout).map(drop)
        })
        .await
        .map_err(|e| format!("TCP probe of {addr}: {e}"));
    }
    if let Some(exec) = probe.get("exec") {
        let argv: Vec<String> = exec["command"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(String::from)
            .collect();
        if argv.is_empty() {
            return Err("exec probe without a command".into());
        }
        let name = c["name"].as_str().unwrap_or("container");
        let term_log = run.dir.join(format!("{name}.termination-log"));
        let mut cmd = super::container::command(run, c, &argv, env.to_vec(), &term_log, false)?;
        let mut child = cmd.spawn().map_err(|e| format!("exec probe: {e}"))?;
        return match tokio::time::timeout(timeout, child.wait()).await {
            Ok(Ok(s)) if s.success() => Ok(()),
            Ok(Ok(s)) => Err(format!("exec probe exited with {s}")),
            Ok(Err(e)) => Err(format!("exec probe: {e}")),
            Err(_) => {
                let _ = child.start_kill();
                Err(format!("exec probe timed out after {timeout:?}"))
            }
        };
    }
    Err("probe has no handler the simulation runs (httpGet, tcpSocket, exec)".into())
}

/// The address a probe connects to: `host` (default the pod's IP, 127.0.0.1) and `port`,
/// a number or the name of one of the container's ports.
fn address(c: &Value, handler: &Value) -> Result<SocketAddr, String> {
    let port = match &handler["port"] {
        Value::Number(n) => n.as_u64().map(|p| p as u16),
        Value::String(name) => name.parse::<u16>().ok().or_else(|| {
            c["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["name"] == name.as_str())
                .and_then(|p| p["containerPort"].as_u64())
                .map(|p| p as u16)
        }),
        _ => None,
    }
    .ok_or_else(|| {
        format!(
            "probe port {} is not a port of the container",
            handler["port"]
        )
    })?;
    let host = handler["host"].as_str().unwrap_or("127.0.0.1");
    format!("{host}:{port}")
        .parse()
        .map_err(|e| format!("probe address {host}:{port}: {e}"))
}

/// Runs blocking `f` in the pod's network namespace (or this machine's).
async fn connect<T: Send + 'static>(
    run: &PodRun,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    match &run.netns {
        Some(ns) => ns.run(f).await,
        None => tokio::task::spawn_blocking(f)
            .await
            .map_err(std::io::Error::other)?,
    }
}
