use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use clap::{Parser, Subcommand};
use testrunner_operator::controller::{self, Settings};
use testrunner_operator::http::{self, Health};
use testrunner_operator::metrics::Metrics;
use testrunner_operator::pods::{self, PodSettings};
use testrunner_operator::telemetry::{self, LogFormat};
use testrunner_operator::{crd, leader, worker};

#[cfg(feature = "simulate")]
mod simulate;

/// Runs CI test workers off a RabbitMQ ticket queue on Kubernetes.
#[derive(Parser)]
#[command(name = "testrunner-operator", version, about)]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Pretty, env = telemetry::ENV_LOG_FORMAT, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the TestRunnerPool CRD as YAML.
    Crd,
    /// Run the controller against the cluster of KUBECONFIG or the in-cluster config.
    Run(RunArgs),
    /// Copy this binary to PATH (the init container of wrapped-mode worker pods).
    InstallWorker {
        /// Where to put the binary.
        path: std::path::PathBuf,
    },
    /// Run COMMAND for each ticket of the queue, one at a time (wrapped-mode worker pods).
    Worker(worker::WorkerArgs),
    /// Hold the broker credentials for a worker pod and serve its wrapper over a Unix
    /// socket (the broker sidecar of wrapped-mode worker pods).
    BrokerSidecar(worker::SidecarArgs),
    /// Run a simulated cluster (API server, kubelet running local processes, and this
    /// operator) for development and tests. Never a product runtime. The broker URI
    /// goes into Secret default/rabbitmq (key uri).
    #[cfg(feature = "simulate")]
    Simulate(SimulateArgs),
    /// Publish test tickets (persistent, with message_id) to a RabbitMQ queue.
    Publish(PublishArgs),
    /// Nagios-compatible check of one pool: one line, perfdata, exit 0/1/2/3.
    #[command(after_help = testrunner_operator::check::RULES)]
    Check(testrunner_operator::check::CheckArgs),
    /// One screen on a pool for on-call: what it does, its conditions, the verdict, the
    /// rollout and canary, the quarantine, the last crashes and events. Installed as
    /// `kubectl-testrunner`, it is `kubectl testrunner describe POOL`.
    Describe(testrunner_operator::describe::DescribeArgs),
}

#[cfg(feature = "simulate")]
#[derive(clap::Args)]
struct SimulateArgs {
    /// Address of the simulated API server (plain HTTP).
    #[arg(long, default_value = "127.0.0.1:6443")]
    listen: SocketAddr,
    /// Where to write the kubeconfig for kubectl.
    #[arg(long, default_value = "simulated.kubeconfig")]
    kubeconfig: std::path::PathBuf,
    #[command(flatten)]
    broker: BrokerArg,
    /// Divides the kubelet's durations (CrashLoopBackOff, grace periods); 10 runs ten
    /// times faster.
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// An image whose containers run inside a local root filesystem, as NAME=DIR
    /// (repeatable; needs root). Other images run on this machine's filesystem.
    #[arg(long = "image", value_name = "NAME=DIR", value_parser = parse_image)]
    images: Vec<(String, std::path::PathBuf)>,
    /// Run a real control plane from the binaries in DIR instead of the embedded API
    /// server: etcd and kube-apiserver, plus kube-controller-manager and kube-scheduler
    /// when DIR has them (`bash tests/control-plane/build.sh` builds all four into
    /// target/control-plane/bin). --listen does not apply: its ports are picked free.
    #[arg(long, value_name = "DIR")]
    control_plane: Option<std::path::PathBuf>,
    /// Run no operator in this process: install it into the cluster with the chart or
    /// deploy/ (its pods then run on the simulated node, in-cluster, under its RBAC).
    #[arg(long, requires = "control_plane")]
    no_operator: bool,
    /// An image repository the simulated node runs as this binary, like the operator
    /// image (repeatable; `testrunner-operator` always is).
    #[arg(long = "operator-image", value_name = "REPOSITORY")]
    operator_images: Vec<String>,
    /// The in-process operator's outcome queues are `<prefix>.<namespace>` (as `run
    /// --outcome-queue-prefix`): give simulations that share a broker their own.
    #[arg(long, env = "TESTRUNNER_OUTCOME_QUEUE_PREFIX", default_value = pods::DEFAULT_OUTCOME_QUEUE_PREFIX, value_parser = pods::check_outcome_queue_prefix)]
    outcome_queue_prefix: String,
}

#[cfg(feature = "simulate")]
fn parse_image(value: &str) -> Result<(String, std::path::PathBuf), String> {
    let (name, dir) = value
        .split_once('=')
        .ok_or_else(|| format!("{value:?} is not NAME=DIR"))?;
    let dir = std::path::PathBuf::from(dir);
    if name.is_empty() || !dir.join("bin").is_dir() {
        return Err(format!(
            "{value:?}: DIR must be a root filesystem (with a bin/ directory)"
        ));
    }
    Ok((name.to_string(), dir))
}

/// `--amqp-uri`, shared by the commands that talk to a broker.
#[derive(clap::Args)]
struct BrokerArg {
    /// Broker URI (amqp:// or amqps://); default: the local broker, guest/guest. Never
    /// printed.
    #[arg(
        long,
        env = "TESTRUNNER_AMQP_URI",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true,
        hide_default_value = true
    )]
    amqp_uri: String,
}

#[derive(clap::Args)]
struct PublishArgs {
    #[command(flatten)]
    broker: BrokerArg,
    /// Queue to publish to (through the default exchange).
    #[arg(long)]
    queue: String,
    /// Number of tickets.
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// Declare the queue as a durable quorum queue first.
    #[arg(long)]
    declare_quorum: bool,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "TESTRUNNER_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// The operator's own image: the init container of wrapped-mode worker pods.
    #[arg(long, env = "TESTRUNNER_OPERATOR_IMAGE", default_value = concat!("testrunner-operator:", env!("CARGO_PKG_VERSION")))]
    operator_image: String,
    /// How often wrapped workers repeat their state (idle, or the ticket in hand) on the
    /// outcome queue. After a restart the operator removes no worker until it has heard
    /// from it, so this bounds how long scale-down waits then.
    #[arg(long, env = "TESTRUNNER_WORKER_REPORT_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    worker_report_interval: std::time::Duration,
    /// Workers report to one outcome queue per namespace, `<prefix>.<namespace>`.
    /// Operators of clusters that share a broker and have namespaces of the same name
    /// each need their own prefix (for example `testrunner.outcomes.ci-east`).
    #[arg(long, env = "TESTRUNNER_OUTCOME_QUEUE_PREFIX", default_value = pods::DEFAULT_OUTCOME_QUEUE_PREFIX, value_parser = pods::check_outcome_queue_prefix)]
    outcome_queue_prefix: String,
    /// Namespaces to watch, comma separated; all namespaces when empty.
    #[arg(
        long,
        env = "TESTRUNNER_WATCH_NAMESPACES",
        value_delimiter = ',',
        default_value = ""
    )]
    watch_namespaces: Vec<String>,
    /// Take part in leader election (on a coordination.k8s.io Lease) so replicas are safe.
    #[arg(long, env = "TESTRUNNER_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Namespace of the leader Lease (defaults to the pod's namespace, else `default`).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Name of the leader Lease.
    #[arg(
        long,
        env = "TESTRUNNER_LEASE_NAME",
        default_value = "testrunner-operator"
    )]
    lease_name: String,
    /// Seconds a Lease stays valid without renewal; a standby takes over after it.
    #[arg(long, env = "TESTRUNNER_LEASE_DURATION", default_value_t = 15)]
    lease_duration: u64,
    /// Identity of this replica (events' reportingInstance, Lease holder).
    #[arg(long, env = "POD_NAME")]
    instance: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    match cli.command {
        Command::Crd => {
            use std::io::Write;
            // A closed pipe (`| head`) is not an error worth a panic.
            let _ = std::io::stdout().write_all(crd::crd_yaml().as_bytes());
            ExitCode::SUCCESS
        }
        Command::InstallWorker { path } => match install_worker(&path) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!(
                    "failed to install the worker binary at {}: {e}",
                    path.display()
                );
                ExitCode::FAILURE
            }
        },
        Command::Run(args) => runtime().block_on(run(args, cli.log_format)),
        Command::Worker(args) => runtime().block_on(worker::run(args)),
        Command::BrokerSidecar(args) => runtime().block_on(worker::serve_sidecar(args)),
        #[cfg(feature = "simulate")]
        Command::Simulate(args) => simulate(args),
        Command::Publish(args) => publish(args),
        Command::Check(args) => runtime().block_on(testrunner_operator::check::run(args)),
        Command::Describe(args) => runtime().block_on(testrunner_operator::describe::run(args)),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("failed to start the async runtime")
}

#[cfg(feature = "simulate")]
fn simulate(args: SimulateArgs) -> ExitCode {
    let opts = simulate::SimulateOptions {
        listen: args.listen,
        kubeconfig: args.kubeconfig,
        amqp_uri: args.broker.amqp_uri,
        time_scale: args.time_scale,
        images: args.images.into_iter().collect(),
        control_plane: args.control_plane,
        no_operator: args.no_operator,
        operator_images: args.operator_images,
        outcome_queue_prefix: args.outcome_queue_prefix,
    };
    match runtime().block_on(simulate::simulate(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn publish(args: PublishArgs) -> ExitCode {
    let published = runtime().block_on(testrunner_operator::publish::publish(
        &args.broker.amqp_uri,
        &args.queue,
        args.count,
        args.declare_quorum,
    ));
    match published {
        Ok(ids) => {
            println!(
                "published {} ticket(s) to {}: {}",
                ids.len(),
                args.queue,
                ids.join(" ")
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn install_worker(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let me = std::env::current_exe()?;
    std::fs::copy(&me, path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
}

/// The Kubernetes client of `run` (in-cluster, or the kubeconfig), counting every
/// request in `testrunner_kube_api_requests_total`.
async fn counted_client(metrics: Arc<Metrics>) -> Result<kube::Client, kube::Error> {
    let config = kube::Config::infer()
        .await
        .map_err(kube::Error::InferConfig)?;
    let counter =
        tower::util::MapRequestLayer::new(move |request: ::http::Request<kube::client::Body>| {
            metrics
                .api_requests
                .get_or_create(&testrunner_operator::metrics::ApiRequestLabels::of(
                    &request,
                ))
                .inc();
            request
        });
    Ok(kube::client::ClientBuilder::try_from(config)?
        .with_layer(&counter)
        .build())
}

async fn run(args: RunArgs, log_format: LogFormat) -> ExitCode {
    let metrics = Arc::new(Metrics::default());
    let client = match counted_client(metrics.clone()).await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "failed to configure the Kubernetes client");
            return ExitCode::FAILURE;
        }
    };
    let ready = Arc::new(AtomicBool::new(false));
    let health = Health {
        metrics: metrics.clone(),
        ready: ready.clone(),
    };
    let addr = args.metrics_addr;
    tokio::spawn(async move {
        if let Err(e) = http::serve(addr, health).await {
            tracing::error!(error = %e, %addr, "failed to serve HTTP endpoints");
        }
    });
    let instance = args
        .instance
        .clone()
        .unwrap_or_else(leader::default_identity);
    let settings = Settings {
        pods: PodSettings {
            operator_image: args.operator_image,
            report_interval: args.worker_report_interval,
            log_format,
            outcome_queue_prefix: args.outcome_queue_prefix,
        },
        namespaces: args
            .watch_namespaces
            .into_iter()
            .filter(|n| !n.is_empty())
            .collect(),
        controller_name: "testrunner-operator".into(),
        instance: Some(instance.clone()),
    };
    if args.leader_election {
        let election = leader::Election {
            namespace: args.lease_namespace,
            name: args.lease_name,
            identity: instance,
            duration_seconds: args.lease_duration,
        };
        // A standby is ready: it serves its probes while it waits for the lease.
        ready.store(true, std::sync::atomic::Ordering::Relaxed);
        match leader::run_as_leader_until(
            client.clone(),
            election,
            controller::run(client, settings, metrics, ready),
            leader::shutdown_signal(),
        )
        .await
        {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "leader election failed");
                ExitCode::FAILURE
            }
        }
    } else {
        tokio::select! {
            _ = controller::run(client, settings, metrics, ready) => {}
            _ = leader::shutdown_signal() => {}
        }
        ExitCode::SUCCESS
    }
}
