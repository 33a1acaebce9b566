//! The install path, end to end, as a user runs it: a real control plane and the
//! simulated node with no operator (`simulate --control-plane DIR --no-operator`), then
//! the operator installed with the real Helm 3, Helm 4, or `kubectl apply -f deploy/`.
//! The operator runs as the chart's pods on the node: in-cluster configuration, the
//! ServiceAccount's rights only, `runAsUser` 65532, probes, leader election between
//! its two replicas. Worker pods run in a namespace that enforces the `restricted`
//! Pod Security Standard.
//!
//! Each test starts its own control plane and uses a pool namespace of its own, so that
//! outcome queues on the shared broker never collide. They need the control plane's
//! binaries, kubectl and both Helms (`bash .ci/install-tools`), and fail when one is
//! missing.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{
    broker_uri, declare_expiring, eventually, eventually_some, init_logs, publish_confirmed,
};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams};
use kube::runtime::{WatchStreamExt, watcher};
use testrunner_operator::crd::TestRunnerPool;
use testrunner_sim::{Options, Simulation};

const SYSTEM: &str = "testrunner-system";
const OPERATOR: &str = "testrunner-operator";
const SERVICE_ACCOUNT: &str = "system:serviceaccount:testrunner-system:testrunner-operator";
const TICKETS: usize = 40;
const MAX_WORKERS: usize = 4;

/// How the operator is installed.
#[derive(Clone, Copy, Debug, PartialEq)]
enum How {
    Helm3,
    Helm4,
    Manifests,
}

/// A tool the project's scripts install into `.tools/` (or the one `env` names); fails,
/// saying how to get it, when it is missing.
fn tool(env: &str, relative: &str) -> PathBuf {
    let path = std::env::var_os(env)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(relative));
    assert!(
        path.exists(),
        "{} is missing: the install tests need it (install it with `bash .ci/install-tools`, or set {env})",
        path.display()
    );
    path
}

/// The simulated cluster, and the commands a user runs against it.
struct Cluster {
    sim: Simulation,
    dir: PathBuf,
    kubeconfig: PathBuf,
    kubectl: PathBuf,
    helm: Option<PathBuf>,
}

impl Cluster {
    async fn start(how: How) -> Cluster {
        init_logs();
        let kubectl = common::kubectl();
        let helm = match how {
            How::Helm3 => Some(tool("TESTRUNNER_HELM3", ".tools/helm3/helm")),
            How::Helm4 => Some(tool("TESTRUNNER_HELM4", ".tools/helm4/helm")),
            How::Manifests => None,
        };
        let mut options = Options::new(env!("CARGO_BIN_EXE_testrunner-operator").into());
        // The operator's pods reach the broker through their network namespace.
        options.forward = testrunner_sim::loopback_address(&broker_uri())
            .into_iter()
            .collect();
        // Crash loops back off ten times faster: the poison ticket is quarantined sooner.
        options.time_scale = 10.0;
        let sim = Simulation::start_on_control_plane(&common::whole_control_plane_bin(), options)
            .await
            .expect("the control plane starts");
        let dir =
            std::env::temp_dir().join(format!("testrunner-install-{how:?}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kubeconfig = dir.join("kubeconfig");
        sim.write_kubeconfig(&kubeconfig).unwrap();
        Cluster {
            sim,
            dir,
            kubeconfig,
            kubectl,
            helm,
        }
    }

    /// Runs `program` with `args` (stdin from `input`) against the cluster; fails with
    /// its output unless it succeeds. Returns its standard output.
    fn run(&self, program: &Path, args: &[&str], input: Option<&str>) -> String {
        self.try_run(program, args, input)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn try_run(
        &self,
        program: &Path,
        args: &[&str],
        input: Option<&str>,
    ) -> Result<String, String> {
        use std::io::Write;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HELM_CACHE_HOME", self.dir.join("helm/cache"))
            .env("HELM_CONFIG_HOME", self.dir.join("helm/config"))
            .env("HELM_DATA_HOME", self.dir.join("helm/data"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{program:?} starts: {e}"));
        let mut stdin = child.stdin.take().unwrap();
        if let Some(input) = input {
            stdin.write_all(input.as_bytes()).unwrap();
        }
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(format!(
                "{} {} failed ({}):\n{stdout}{}",
                program.display(),
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    fn kubectl(&self, args: &[&str]) -> String {
        self.run(&self.kubectl, args, None)
    }

    fn helm(&self, args: &[&str]) -> String {
        let helm = self.helm.clone().expect("a Helm install");
        self.run(&helm, args, None)
    }

    /// `kubectl auth can-i` as the operator's ServiceAccount.
    fn can_i(&self, args: &[&str]) -> bool {
        let mut all = vec!["auth", "can-i", "--as", SERVICE_ACCOUNT];
        all.extend_from_slice(args);
        // Exit 0 and `yes`, or exit 1 and `no`.
        match self.try_run(&self.kubectl, &all, None) {
            Ok(out) => out.trim() == "yes",
            Err(e) if e.contains("\nno") => false,
            Err(e) => panic!("{e}"),
        }
    }
}

/// The operator's pods that are Ready and not terminating, by name, with their image.
async fn ready_operators(pods: &Api<Pod>) -> BTreeMap<String, String> {
    let list = pods
        .list(&ListParams::default().labels("app.kubernetes.io/name=testrunner-operator"))
        .await
        .unwrap();
    list.items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .map(|p| {
            let image = p.spec.as_ref().unwrap().containers[0]
                .image
                .clone()
                .unwrap_or_default();
            (p.metadata.name.unwrap(), image)
        })
        .collect()
}

async fn lease_holder(leases: &Api<Lease>) -> Option<String> {
    leases
        .get_opt(OPERATOR)
        .await
        .ok()??
        .spec?
        .holder_identity
        .filter(|h| !h.is_empty())
}

/// Waits for two Ready replicas of `image` and a Lease held by one of them; returns them.
async fn two_ready_replicas(
    pods: &Api<Pod>,
    leases: &Api<Lease>,
    image: &str,
    timeout: Duration,
) -> (BTreeMap<String, String>, String) {
    eventually_some(
        &format!("two Ready operator replicas of {image}, one holding the Lease"),
        timeout,
        || async {
            let ready = ready_operators(pods).await;
            let holder = lease_holder(leases).await?;
            (ready.len() == 2 && ready.values().all(|i| i == image) && ready.contains_key(&holder))
                .then_some((ready, holder))
        },
    )
    .await
}

/// Publishes `ids` as persistent tickets (body and message id: the id), each confirmed.
async fn publish(conn: &lapin::Connection, queue: &str, ids: &[String]) {
    use lapin::options::ConfirmSelectOptions;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for id in ids {
        publish_confirmed(&ch, queue, id).await;
    }
}

async fn depth(conn: &lapin::Connection, queue: &str) -> u32 {
    let ch = conn.create_channel().await.unwrap();
    let (ready, _) = common::queue_counts(&ch, queue).await;
    ready
}

/// The tickets the workers ran, in the order they finished.
fn ledger(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

/// Worker pods (uid, and restarts of the worker container) of pool `pool`.
async fn workers(pods: &Api<Pod>, pool: &str) -> BTreeMap<String, i32> {
    pods.list(&ListParams::default().labels(&format!("testrunner.dev/pool={pool}")))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| {
            let restarts = p
                .status
                .and_then(|s| s.container_statuses)
                .and_then(|cs| cs.into_iter().find(|c| c.name == "worker"))
                .map_or(0, |c| c.restart_count);
            (p.metadata.uid.unwrap(), restarts)
        })
        .collect()
}

/// The whole install path with `how`.
async fn install_and_operate(how: How) {
    let cluster = Cluster::start(how).await;
    let client = cluster.sim.client();
    let system_pods: Api<Pod> = Api::namespaced(client.clone(), SYSTEM);
    let leases: Api<Lease> = Api::namespaced(client.clone(), SYSTEM);
    let started = std::time::Instant::now();

    // Install, with the default values: two replicas, one leads.
    match how {
        How::Helm3 | How::Helm4 => {
            cluster.helm(&[
                "install",
                OPERATOR,
                "charts/testrunner-operator",
                "--namespace",
                SYSTEM,
                "--create-namespace",
                "--wait",
                "--timeout",
                "180s",
            ]);
        }
        How::Manifests => {
            cluster.kubectl(&["apply", "--server-side", "-f", "deploy/"]);
        }
    }
    let (replicas, leader) = two_ready_replicas(
        &system_pods,
        &leases,
        "testrunner-operator:0.1.0",
        Duration::from_secs(120),
    )
    .await;
    eprintln!(
        "{how:?}: installed in {:.1} s: {replicas:?}, {leader} leads",
        started.elapsed().as_secs_f64()
    );

    // A namespace that enforces the restricted Pod Security Standard, the broker Secret
    // and a pool, as the README says.
    let ns = format!("install-{}", format!("{how:?}").to_lowercase());
    cluster.kubectl(&["create", "namespace", &ns]);
    cluster.kubectl(&[
        "label",
        "namespace",
        &ns,
        "pod-security.kubernetes.io/enforce=restricted",
    ]);
    let uri_arg = format!("--from-literal=uri={}", broker_uri());
    cluster.kubectl(&[
        "-n", &ns, "create", "secret", "generic", "rabbitmq", &uri_arg,
    ]);
    let queue = format!(
        "install-{}-{}-{}",
        format!("{how:?}").to_lowercase(),
        std::process::id(),
        jiff::Timestamp::now().as_millisecond()
    );
    let quarantine = format!("{queue}.quarantine");
    let conn = lapin::Connection::connect(&broker_uri(), lapin::ConnectionProperties::default())
        .await
        .expect("the test broker is up (bash .ci/ensure-rabbitmq)");
    {
        let ch = conn.create_channel().await.unwrap();
        declare_expiring(&ch, &queue, true).await;
        declare_expiring(&ch, &quarantine, true).await;
    }
    let ledger_path = cluster.dir.join("ledger");
    let poison = format!("{queue}-poison");
    let script = format!(
        "[ \"$TICKET_ID\" = \"$POISON\" ] && exit 3; cat >/dev/null; sleep 1; echo \"$TICKET_ID\" >> {}",
        ledger_path.display()
    );
    let pool = serde_json::json!({
        "apiVersion": "testrunner.dev/v1alpha1",
        "kind": "TestRunnerPool",
        "metadata": {"name": "surge"},
        "spec": {
            "image": "example.org/test-runner:1",
            "command": ["sh", "-c", script],
            "queue": {"name": queue, "connectionSecretRef": {"name": "rabbitmq", "key": "uri"}},
            "scaling": {"minWorkers": 1, "maxWorkers": MAX_WORKERS, "pollInterval": "500ms",
                "scaleDownDelay": "10m"},
            "rollout": {"canaryWorkers": 0},
            "template": {"env": [{"name": "POISON", "value": poison}]},
        },
    });
    // Every worker pod created for the pool, and the pods the namespace admitted.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let created: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let seen = created.clone();
    let watch = tokio::spawn(
        watcher(
            pods.clone(),
            watcher::Config::default().labels("testrunner.dev/pool=surge"),
        )
        .applied_objects()
        .for_each(move |p| {
            if let Ok(p) = p {
                seen.lock()
                    .unwrap()
                    .insert(p.metadata.uid.unwrap_or_default());
            }
            std::future::ready(())
        }),
    );
    cluster.run(
        &cluster.kubectl,
        &["-n", &ns, "apply", "-f", "-"],
        Some(&serde_json::to_string(&pool).unwrap()),
    );
    eventually(
        "the minimum worker to be admitted and Ready",
        Duration::from_secs(60),
        || async { !workers(&pods, "surge").await.is_empty() },
    )
    .await;
    // As the restricted namespace admitted it: the broker credentials only in the
    // sidecar, which runs as its own user.
    let admitted = pods
        .list(&ListParams::default().labels("testrunner.dev/pool=surge"))
        .await
        .unwrap()
        .items
        .remove(0);
    let spec = admitted.spec.unwrap();
    let sidecar = spec
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == "broker")
        .expect("a broker sidecar");
    assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
    let holds_uri = |c: &k8s_openapi::api::core::v1::Container| {
        c.env
            .iter()
            .flatten()
            .any(|e| e.name == "TESTRUNNER_AMQP_URI")
    };
    assert!(holds_uri(sidecar));
    assert!(
        !holds_uri(&spec.containers[0]),
        "the worker holds no broker URI"
    );
    assert_eq!(spec.automount_service_account_token, Some(false));

    // A surge of tickets; the leader is deleted while it runs.
    let ids: Vec<String> = (0..TICKETS).map(|i| format!("{queue}-{i}")).collect();
    publish(&conn, &queue, &ids).await;
    eventually(
        "the pool to scale up and run the first tickets",
        Duration::from_secs(60),
        || async { ledger(&ledger_path).len() >= 4 },
    )
    .await;
    cluster.kubectl(&["-n", SYSTEM, "delete", "pod", &leader, "--wait=false"]);
    let failover = std::time::Instant::now();
    let new_leader = eventually_some(
        "the other replica to take the Lease",
        Duration::from_secs(60),
        || async { lease_holder(&leases).await.filter(|h| *h != leader) },
    )
    .await;
    // The deleted leader released the Lease on SIGTERM: the standby or the replacement
    // pod, whichever asks first, takes it at once instead of after its duration.
    let failover_seconds = failover.elapsed().as_secs_f64();
    eprintln!(
        "{how:?}: {new_leader} ({}) took the Lease {failover_seconds:.1} s after {leader} was deleted",
        if replicas.contains_key(&new_leader) {
            "the standby"
        } else {
            "the replacement pod"
        }
    );
    assert!(
        failover_seconds < 15.0,
        "the Lease changed hands in {failover_seconds} s, before it would have expired"
    );
    eventually(
        "every ticket of the surge to run",
        Duration::from_secs(180),
        || async { ledger(&ledger_path).len() >= TICKETS },
    )
    .await;
    let ran = ledger(&ledger_path);
    let distinct: BTreeSet<&String> = ran.iter().collect();
    assert_eq!(ran.len(), TICKETS, "each ticket ran once: {ran:?}");
    assert_eq!(
        distinct,
        ids.iter().collect::<BTreeSet<_>>(),
        "every ticket ran"
    );
    assert_eq!(depth(&conn, &queue).await, 0, "no ticket is left");
    let pods_created = created.lock().unwrap().len();
    assert!(
        pods_created <= MAX_WORKERS,
        "no pod was created twice for the same need: {pods_created} worker pods for at most {MAX_WORKERS}"
    );

    // A poison ticket is quarantined, once.
    publish(&conn, &queue, std::slice::from_ref(&poison)).await;
    eventually(
        "the poison ticket to be quarantined",
        Duration::from_secs(120),
        || async { depth(&conn, &quarantine).await == 1 },
    )
    .await;
    let pools: Api<TestRunnerPool> = Api::namespaced(client.clone(), &ns);
    eventually(
        "the pool's status to list the quarantined ticket",
        Duration::from_secs(30),
        || async {
            pools
                .get("surge")
                .await
                .ok()
                .and_then(|p| p.status?.quarantine)
                .is_some_and(|q| q.tickets.iter().any(|t| t.id == poison))
        },
    )
    .await;
    assert!(!ledger(&ledger_path).contains(&poison));
    watch.abort();

    // The operator's rights: what it needs, nothing more.
    let allowed: &[&[&str]] = &[
        &["list", "testrunnerpools.testrunner.dev", "-A"],
        &["watch", "testrunnerpools.testrunner.dev", "-A"],
        &[
            "patch",
            "testrunnerpools.testrunner.dev",
            "--subresource=status",
            "-n",
            &ns,
        ],
        &[
            "update",
            "testrunnerpools.testrunner.dev",
            "--subresource=finalizers",
            "-n",
            &ns,
        ],
        &["create", "pods", "-n", &ns],
        &["delete", "pods", "-n", &ns],
        &["watch", "pods", "-A"],
        &["create", "events.events.k8s.io", "-n", &ns],
        &["create", "configmaps", "-n", &ns],
        &["list", "controllerrevisions.apps", "-n", &ns],
        &["create", "controllerrevisions.apps", "-n", &ns],
        &["patch", "controllerrevisions.apps", "-n", &ns],
        &["delete", "controllerrevisions.apps", "-n", &ns],
        &["get", "secrets/rabbitmq", "-n", &ns],
        &[
            "get",
            "leases.coordination.k8s.io/testrunner-operator",
            "-n",
            SYSTEM,
        ],
        &[
            "update",
            "leases.coordination.k8s.io/testrunner-operator",
            "-n",
            SYSTEM,
        ],
    ];
    for args in allowed {
        assert!(cluster.can_i(args), "the operator may {args:?}");
    }
    let denied: &[&[&str]] = &[
        &["list", "secrets", "-n", &ns],
        &["watch", "secrets", "-A"],
        &["create", "secrets", "-n", &ns],
        &["delete", "testrunnerpools.testrunner.dev", "-n", &ns],
        &["create", "testrunnerpools.testrunner.dev", "-n", &ns],
        &["update", "pods", "-n", &ns],
        &["list", "configmaps", "-n", &ns],
        &["delete", "configmaps", "-n", &ns],
        &["update", "leases.coordination.k8s.io/other", "-n", SYSTEM],
        &["update", "leases.coordination.k8s.io", "-n", "kube-system"],
        &["create", "deployments.apps", "-n", &ns],
        &["update", "controllerrevisions.apps", "-n", &ns],
        &["watch", "controllerrevisions.apps", "-A"],
        &["list", "nodes"],
        &["create", "namespaces"],
        &["update", "customresourcedefinitions.apiextensions.k8s.io"],
        &["create", "clusterrolebindings.rbac.authorization.k8s.io"],
        &["create", "pods", "--subresource=exec", "-n", &ns],
        &["create", "pods", "--subresource=eviction", "-n", &ns],
        &["update", "pods", "--subresource=status", "-n", &ns],
        &[
            "update",
            "testrunnerpools.testrunner.dev",
            "--subresource=scale",
            "-n",
            &ns,
        ],
        &["*", "*"],
    ];
    for args in denied {
        assert!(!cluster.can_i(args), "the operator may not {args:?}");
    }

    // A new operator image rolls the operator; the workers keep running untouched.
    let before = workers(&pods, "surge").await;
    assert!(!before.is_empty());
    match how {
        How::Helm3 | How::Helm4 => {
            cluster.helm(&[
                "upgrade",
                OPERATOR,
                "charts/testrunner-operator",
                "--namespace",
                SYSTEM,
                "--reuse-values",
                "--set",
                "image.tag=0.2.0",
                "--wait",
                "--timeout",
                "180s",
            ]);
        }
        How::Manifests => {
            let image = "testrunner-operator:0.2.0";
            cluster.kubectl(&[
                "-n",
                SYSTEM,
                "set",
                "image",
                "deployment/testrunner-operator",
                &format!("operator={image}"),
            ]);
            cluster.kubectl(&[
                "-n",
                SYSTEM,
                "set",
                "env",
                "deployment/testrunner-operator",
                &format!("TESTRUNNER_OPERATOR_IMAGE={image}"),
            ]);
        }
    }
    let (upgraded, _) = two_ready_replicas(
        &system_pods,
        &leases,
        "testrunner-operator:0.2.0",
        Duration::from_secs(180),
    )
    .await;
    assert!(
        upgraded.keys().all(|p| !replicas.contains_key(p)),
        "new operator pods: {upgraded:?}"
    );
    // The new leader has reconciled the pool: its status names the new operator's view.
    eventually(
        "the upgraded operator to reconcile the pool",
        Duration::from_secs(60),
        || async {
            pools
                .get("surge")
                .await
                .ok()
                .and_then(|p| p.status)
                .is_some_and(|s| s.workers.as_ref().is_some_and(|w| w.ready >= 1))
        },
    )
    .await;
    assert_eq!(
        workers(&pods, "surge").await,
        before,
        "the workers are the same pods, not restarted"
    );

    // Uninstall: the operator goes, the CRD and the pool stay.
    match how {
        How::Helm3 | How::Helm4 => {
            cluster.helm(&["uninstall", OPERATOR, "--namespace", SYSTEM, "--wait"]);
        }
        How::Manifests => {
            cluster.kubectl(&[
                "delete",
                "-f",
                "deploy/testrunner-operator.yaml",
                "--wait=false",
            ]);
        }
    }
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), SYSTEM);
    eventually(
        "the operator's Deployment and pods to go",
        Duration::from_secs(120),
        || async {
            deployments.get_opt(OPERATOR).await.ok().flatten().is_none()
                && ready_operators(&system_pods).await.is_empty()
        },
    )
    .await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    assert!(
        crds.get_opt("testrunnerpools.testrunner.dev")
            .await
            .unwrap()
            .is_some(),
        "the CRD stays"
    );
    assert!(
        pools.get_opt("surge").await.unwrap().is_some(),
        "the pool stays"
    );
    eprintln!(
        "{how:?}: install, surge, failover, poison, rights, upgrade and uninstall in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    for q in [&queue, &quarantine] {
        let ch = conn.create_channel().await.unwrap();
        let _ = ch
            .queue_delete(
                q.as_str().into(),
                lapin::options::QueueDeleteOptions::default(),
            )
            .await;
    }
    let _ = conn.close(200, "done".into()).await;
    cluster.sim.shutdown().await;
    let _ = std::fs::remove_dir_all(&cluster.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real control plane: bash tests/control-plane/build.sh, then cargo test -- --include-ignored (bash tests/run.sh does both)"]
async fn helm3_installs_a_working_operator_that_fails_over_upgrades_and_uninstalls() {
    install_and_operate(How::Helm3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real control plane: bash tests/control-plane/build.sh, then cargo test -- --include-ignored (bash tests/run.sh does both)"]
async fn helm4_installs_a_working_operator_that_fails_over_upgrades_and_uninstalls() {
    install_and_operate(How::Helm4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real control plane: bash tests/control-plane/build.sh, then cargo test -- --include-ignored (bash tests/run.sh does both)"]
async fn the_plain_manifests_install_a_working_operator_that_fails_over_upgrades_and_uninstalls() {
    install_and_operate(How::Manifests).await;
}
