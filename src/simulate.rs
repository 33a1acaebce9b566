//! `testrunner-operator simulate`: the operator against a simulated cluster
//! ([`testrunner_sim`]) in one process, with its walk-through. Part of the binary only,
//! with the `simulate` feature (on by default): the operator library does not depend on
//! the simulator, and the product image leaves it out.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use kube::CustomResourceExt;
use testrunner_operator::controller::{self, Settings};
use testrunner_operator::crd::TestRunnerPool;
use testrunner_sim::{Backend, Options, Simulation};

/// Options of `testrunner-operator simulate`.
#[derive(Clone, Debug)]
pub(crate) struct SimulateOptions {
    /// Address of the API server.
    pub listen: SocketAddr,
    /// Where the kubeconfig goes.
    pub kubeconfig: PathBuf,
    /// Broker URI stored in Secret `rabbitmq` (key `uri`).
    pub amqp_uri: String,
    /// Durations of the kubelet are divided by this.
    pub time_scale: f64,
    /// Images whose containers run in a local root filesystem.
    pub images: BTreeMap<String, PathBuf>,
    /// Binaries of a real control plane to run instead of the embedded API server.
    pub control_plane: Option<PathBuf>,
    /// Run no operator in this process: it is installed into the cluster (Helm or
    /// `deploy/`) and runs as pods on the simulated node.
    pub no_operator: bool,
    /// Repositories of the operator image, beyond the chart's `testrunner-operator`.
    pub operator_images: Vec<String>,
    /// The in-process operator's outcome queue prefix.
    pub outcome_queue_prefix: String,
}

/// What the simulated cluster starts with: the `TestRunnerPool` CRD, Secret
/// `default/rabbitmq` (key `uri`) holding `amqp_uri`, the node's durations divided by
/// `time_scale`, and this binary as what `testrunner-operator` commands in pods run.
fn options(amqp_uri: &str, time_scale: f64, exe: PathBuf) -> Options {
    Options {
        crds: vec![TestRunnerPool::crd()],
        secrets: vec![Options::string_secret("rabbitmq", "uri", amqp_uri)],
        time_scale,
        ..Options::new(exe)
    }
}

async fn client_from_kubeconfig(path: &Path) -> Result<kube::Client, String> {
    let kc = kube::config::Kubeconfig::read_from(path)
        .map_err(|e| format!("failed to read {}: {e}", path.display()))?;
    let config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .map_err(|e| format!("failed to load {}: {e}", path.display()))?;
    kube::Client::try_from(config).map_err(|e| format!("failed to build a client: {e}"))
}

/// `testrunner-operator simulate`: runs until Ctrl-C or SIGTERM.
pub(crate) async fn simulate(opts: SimulateOptions) -> Result<(), String> {
    // Listen before anything starts: a Ctrl-C while the cluster starts stops it cleanly
    // instead of killing the process with its children's directories left behind.
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())
        .map_err(|e| format!("failed to listen for SIGTERM: {e}"))?;
    let mut int =
        signal(SignalKind::interrupt()).map_err(|e| format!("failed to listen for SIGINT: {e}"))?;
    let exe = std::env::current_exe().map_err(|e| format!("failed to find this binary: {e}"))?;
    let mut options = Options {
        images: opts.images.clone(),
        forward: testrunner_sim::loopback_address(&opts.amqp_uri)
            .into_iter()
            .collect(),
        ..options(&opts.amqp_uri, opts.time_scale, exe.clone())
    };
    options
        .operator_images
        .extend(opts.operator_images.iter().cloned());
    if opts.no_operator {
        // The chart (or deploy/) installs the CRD; the user makes the broker Secret.
        options.crds.clear();
        options.secrets.clear();
    }
    let sim = match &opts.control_plane {
        None => Simulation::start(opts.listen, options).await.map_err(|e| {
            format!(
                "failed to start the simulated cluster on {}: {e}",
                opts.listen
            )
        })?,
        Some(dir) => {
            println!("Starting a real control plane from {} ...", dir.display());
            Simulation::start_on_control_plane(dir, options)
                .await
                .map_err(|e| {
                    format!(
                        "failed to start the control plane from {}: {e}",
                        dir.display()
                    )
                })?
        }
    };
    sim.write_kubeconfig(&opts.kubeconfig)?;
    let client = client_from_kubeconfig(&opts.kubeconfig).await?;
    let operator = (!opts.no_operator).then(|| {
        let settings =
            Settings::in_process(Vec::new()).with_outcome_queue_prefix(&opts.outcome_queue_prefix);
        controller::spawn(client, settings)
    });
    let kubeconfig = std::fs::canonicalize(&opts.kubeconfig).unwrap_or(opts.kubeconfig.clone());
    let kc = kubeconfig.display();
    let bin = exe.display();
    let what = match &sim.backend {
        Backend::Embedded(_) => {
            "API server and kubelet in this process; the operator runs against it".to_string()
        }
        Backend::ControlPlane { missing, .. } => {
            let mut what = "a real control plane: etcd, kube-apiserver".to_string();
            if missing.is_empty() {
                what.push_str(", kube-controller-manager, kube-scheduler");
            }
            what.push_str(if opts.no_operator {
                "; the simulated node in this process, no operator: install it"
            } else {
                "; the simulated node and the operator in this process"
            });
            for m in missing {
                what.push_str(&format!("\n  {m}"));
            }
            what
        }
    };
    if opts.no_operator {
        print_install_steps(&sim.url(), &what, &kc.to_string(), &bin.to_string());
    } else {
        print_walkthrough(
            &sim.url(),
            &what,
            &kc.to_string(),
            &bin.to_string(),
            opts.time_scale,
        );
    }
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    println!("stopping the simulated cluster");
    if let Some(operator) = operator {
        operator.abort();
    }
    sim.shutdown().await;
    Ok(())
}

/// The walk-through of `simulate`: tickets, a pool, scaling, a failed and a good
/// rollout. Every command line of it returns, so that it runs as a script (a test does).
fn print_walkthrough(url: &str, what: &str, kc: &str, bin: &str, scale: f64) {
    println!(
        "Simulated cluster at {url} ({what}).
Kubeconfig: {kc}   Broker Secret: default/rabbitmq (key uri)   Time scale: {scale}

{}
Ctrl-C stops everything (the API server, the operator and every worker process).",
        walkthrough(kc, bin)
    );
}

/// The steps of the walk-through, as shell lines.
pub(crate) fn walkthrough(kc: &str, bin: &str) -> String {
    let pool = demo_pool(
        "  # no image is pulled (see simulate --image); this command crashes on any image tagged :broken
  command: [\"sh\", \"-c\", \"case $TESTRUNNER_IMAGE in *:broken) exit 3;; esac; cat >/dev/null; sleep 1\"]",
    );
    let wait = |phase: &str| {
        format!(
            "  kubectl wait trp demo --for=jsonpath='{{.status.rollout.phase}}'={phase} --timeout=3m"
        )
    };
    format!(
        "In a second terminal (and, to watch it all, `kubectl get trp,pods -w` in a third):
  export KUBECONFIG={kc}
  # 1. Ten tickets and a pool: it starts workers, runs them, and scales back to zero.
  {bin} publish --queue tickets.demo --count 10 --declare-quorum
  kubectl apply -f - <<'YAML'
{pool}YAML
  # 2. A surge: the pool scales up to maxWorkers, then back down when the queue is empty.
  {bin} publish --queue tickets.demo --count 30
  kubectl get pods
  kubectl describe trp demo
  # 3. A broken upgrade under load: its canary crashes on two tickets and is rolled back;
  #    the stable workers run every ticket.
  {bin} publish --queue tickets.demo --count 100
  kubectl patch trp demo --type merge -p '{{\"spec\":{{\"image\":\"example.org/test-runner:broken\"}}}}'
{rolled_back}
  kubectl get trp demo -o wide
  kubectl describe trp demo
  # 4. A good upgrade: its canary completes three tickets and is promoted, then its pods
  #    replace the older ones.
  {bin} publish --queue tickets.demo --count 30
  kubectl patch trp demo --type merge -p '{{\"spec\":{{\"image\":\"example.org/test-runner:2\"}}}}'
{promoted}
  kubectl get controllerrevisions -l testrunner.dev/pool=demo -L testrunner.dev/stable
",
        rolled_back = wait("RolledBack"),
        promoted = wait("Promoted"),
    )
}

/// Pool `demo` of the walk-throughs, on queue `tickets.demo`, with `command` (its YAML
/// lines) as what each ticket runs.
fn demo_pool(command: &str) -> String {
    format!(
        "apiVersion: testrunner.dev/v1alpha1
kind: TestRunnerPool
metadata:
  name: demo
spec:
  image: example.org/test-runner:1
{command}
  queue:
    name: tickets.demo
    connectionSecretRef: {{name: rabbitmq, key: uri}}
  scaling: {{minWorkers: 0, maxWorkers: 5, pollInterval: 1s, scaleDownDelay: 20s}}
"
    )
}

/// The walk-through of `simulate --no-operator`: install the operator as a user would,
/// then a pool.
fn print_install_steps(url: &str, what: &str, kc: &str, bin: &str) {
    let pool = demo_pool("  command: [\"sh\", \"-c\", \"cat >/dev/null; sleep 1\"]");
    println!(
        "Simulated cluster at {url} ({what}).
Kubeconfig: {kc}
The node runs images named testrunner-operator[:TAG] (the chart's and deploy/'s default) as
this binary, so the chart and the manifests install as they are.

In a second terminal, from the repository's root:
  export KUBECONFIG={kc}
  helm install testrunner-operator charts/testrunner-operator -n testrunner-system --create-namespace
  # or: kubectl apply --server-side -f deploy/
  kubectl -n testrunner-system get pods          # two replicas, Ready; one holds the Lease
  kubectl -n testrunner-system get lease
  kubectl create namespace ci
  kubectl label namespace ci pod-security.kubernetes.io/enforce=restricted
  kubectl -n ci create secret generic rabbitmq --from-literal=uri='amqp://guest:guest@127.0.0.1:5672/%2f'
  {bin} publish --queue tickets.demo --count 10 --declare-quorum
  kubectl -n ci apply -f - <<'YAML'
{pool}YAML
  kubectl -n ci get trp -w

Ctrl-C stops everything (the control plane and every pod's processes)."
    );
}
