//! Hostile test code never sees the broker credentials.
//!
//! A pool's test command looks for the broker password everywhere a test can reach in its
//! container: its environment, every `/proc/*/environ` and `/proc/*/cmdline` it can read,
//! every file of its filesystem and volumes, the service-account token, and the broker
//! sidecar's socket (by running the wrapper against it). The broker account is made for
//! this test with a random password; the test, outside the pod, searches what the command
//! collected for it. Meanwhile good tickets run once each and a poison ticket is still
//! quarantined.
//!
//! The worker image is the busybox-only root of `tests/rootfs.sh`, so the test container
//! sees its own root filesystem, its own `/proc` and its volumes, as in a real pod. Runs on
//! the embedded API server and on the real control plane.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use serde_json::json;
use testrunner_operator::controller::{self, Settings};
use testrunner_operator::crd::TestRunnerPool;
use testrunner_sim as sim;

mod common;
use common::{control_plane_bin, declare_expiring, eventually, eventually_some, queue_counts};

const IMAGE: &str = "registry.example/hostile-runner:1";
/// Where the wrapper binary is in the worker container: the one file the search skips
/// (this build's own binary, larger than the search reads).
const WRAPPER: &str = "/testrunner/testrunner-operator";

/// The command: `hunt` tickets search and write what they found to `/ledger/ID.dump`;
/// `poison` crashes every time; every other ticket just runs. Exit 42 outside the root.
const SCRIPT: &str = r#"
[ -e /.testrunner-rootfs ] || exit 42
body=$(cat)
if [ "$body" = hunt ]; then
  {
    echo "== env"; env
    echo "== termination log"; cat /dev/termination-log
    for p in /proc/[0-9]*; do
      echo "== $p/cmdline"; tr '\0' ' ' < "$p/cmdline"; echo
      echo "== $p/environ"; tr '\0' '\n' < "$p/environ"
    done
    echo "== files"
    find / \( -path /proc -o -path /sys -o -path /dev -o -path /ledger \) -prune -o -type f -print |
    while read -r f; do
      size=$(wc -c < "$f") || { echo "unreadable $f"; continue; }
      if [ "$size" -gt 4194304 ]; then echo "skipped $f"; else echo "== file $f"; cat "$f"; echo; fi
    done
    echo "== socket"; ls -la /run/testrunner
    TESTRUNNER_TERMINATION_LOG=/dev/null /testrunner/testrunner-operator --log-format json worker --broker-socket /run/testrunner/broker.sock -- true
    echo "socket attempt exit $?"
    echo "== token"; ls -la /var/run/secrets/kubernetes.io/serviceaccount
    echo "== end"
  } > "/ledger/$TICKET_ID.tmp" 2>&1
  mv "/ledger/$TICKET_ID.tmp" "/ledger/$TICKET_ID.dump"
fi
[ "$body" = poison ] && exit 3
echo "$TICKET_ID" >> /ledger/ran
"#;

/// The busybox-only root `tests/rootfs.sh` builds; missing, the test fails and says how
/// to build it.
fn busybox_root() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/rootfs/busybox");
    assert!(
        dir.join(".testrunner-rootfs").exists(),
        "{} is missing: build it with `bash tests/rootfs.sh`",
        dir.display()
    );
    dir
}

/// A broker account of its own, with a random password, removed on drop.
struct Account {
    user: String,
    password: String,
}

impl Account {
    fn new(tag: &str) -> Self {
        use sha2::Digest;
        let seed = format!("{tag}-{:?}", std::time::SystemTime::now());
        let password: String = format!("{:x}", sha2::Sha256::digest(seed.as_bytes()))
            .chars()
            .take(32)
            .collect();
        let user = format!("trp-hostile-{tag}");
        let ctl = |args: &[&str]| {
            let out = std::process::Command::new("rabbitmqctl")
                .arg("-q")
                .args(args)
                .output()
                .expect("rabbitmqctl runs (bash .ci/ensure-rabbitmq installs it)");
            assert!(
                out.status.success(),
                "rabbitmqctl {}: {}",
                args[0],
                String::from_utf8_lossy(&out.stderr)
            );
        };
        ctl(&["add_user", &user, &password]);
        ctl(&["set_permissions", "-p", "/", &user, ".*", ".*", ".*"]);
        Self { user, password }
    }

    fn uri(&self) -> String {
        format!("amqp://{}:{}@127.0.0.1:5672/%2f", self.user, self.password)
    }
}

impl Drop for Account {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["-q", "delete_user", &self.user])
            .output();
    }
}

#[derive(Clone, Copy, Debug)]
enum On {
    Embedded,
    ControlPlane,
}

async fn hostile_tickets_never_find_the_broker_password(on: On) {
    let tag = format!(
        "{}-{}-{}",
        match on {
            On::Embedded => "e",
            On::ControlPlane => "cp",
        },
        std::process::id(),
        jiff::Timestamp::now().as_millisecond()
    );
    let account = Account::new(&tag);
    let queue = format!("hostile-{tag}");
    let quarantine = format!("{queue}.quarantine");
    let pool_name = format!("hostile-{}", &tag[..tag.find('-').unwrap()]);
    // Its own outcome queue: other tests run operators on the same broker and namespace.
    let outcomes_prefix = format!("{queue}.outcomes");
    let outcomes = format!("{outcomes_prefix}.default");
    let conn = lapin::Connection::connect(
        &common::broker_uri(),
        lapin::ConnectionProperties::default(),
    )
    .await
    .expect(
        "RabbitMQ answers on 127.0.0.1:5672 (`bash .ci/ensure-rabbitmq` installs and starts it)",
    );
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    declare_expiring(&ch, &queue, true).await;
    declare_expiring(&ch, &quarantine, true).await;

    let ledger = std::env::temp_dir().join(format!("hostile-ledger-{tag}"));
    std::fs::create_dir_all(&ledger).unwrap();
    let options = sim::Options {
        images: BTreeMap::from([(IMAGE.to_string(), busybox_root())]),
        ..common::options(&account.uri(), 50.0)
    };
    let sim = match on {
        On::Embedded => sim::Simulation::start("127.0.0.1:0".parse().unwrap(), options)
            .await
            .expect("the simulated cluster starts"),
        On::ControlPlane => {
            let bin = control_plane_bin();
            sim::Simulation::start_on_control_plane(&bin, options)
                .await
                .unwrap_or_else(|e| {
                    panic!(
                        "the real control plane did not start from {}: {e}\n(build it with: bash tests/control-plane/build.sh)",
                        bin.display()
                    )
                })
        }
    };
    let client = sim.client();
    let operator = controller::spawn(
        client.clone(),
        Settings::in_process(vec!["default".into()]).with_outcome_queue_prefix(&outcomes_prefix),
    );
    let pools: Api<TestRunnerPool> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pool: TestRunnerPool = serde_json::from_value(json!({
        "apiVersion": "testrunner.dev/v1alpha1", "kind": "TestRunnerPool",
        "metadata": {"name": pool_name},
        "spec": {"image": IMAGE,
            "command": ["sh", "-c", SCRIPT],
            "queue": {"name": queue, "connectionSecretRef": {"name": "rabbitmq"}},
            "scaling": {"minWorkers": 0, "maxWorkers": 3, "pollInterval": "300ms", "scaleDownDelay": "2s"},
            "template": {
                "volumes": [{"name": "ledger", "hostPath": {"path": ledger.display().to_string()}}],
                "volumeMounts": [{"name": "ledger", "mountPath": "/ledger"}]}},
    }))
    .unwrap();
    pools.create(&PostParams::default(), &pool).await.unwrap();

    let hunts = ["hunt-1", "hunt-2", "hunt-3"];
    let good: Vec<String> = (0..9).map(|i| format!("good-{i}")).collect();
    for id in &hunts {
        common::publish_body_confirmed(&ch, &queue, id, b"hunt").await;
    }
    common::publish_body_confirmed(&ch, &queue, "poison-1", b"poison").await;
    for id in &good {
        common::publish_body_confirmed(&ch, &queue, id, b"fine").await;
    }

    let ran = || {
        std::fs::read_to_string(ledger.join("ran"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let expected: Vec<String> = hunts
        .iter()
        .map(|s| s.to_string())
        .chain(good.iter().cloned())
        .collect();
    eventually(
        "every good and hunting ticket to run",
        Duration::from_secs(120),
        || async { expected.iter().all(|id| ran().contains(id)) },
    )
    .await;
    eventually(
        "the poison ticket to land in quarantine",
        Duration::from_secs(90),
        || async { queue_counts(&ch, &quarantine).await.0 == 1 },
    )
    .await;
    let status = eventually_some("status.quarantine", Duration::from_secs(30), || {
        let pools = pools.clone();
        let name = pool_name.clone();
        async move {
            let q = pools.get_status(&name).await.ok()?.status?.quarantine?;
            (q.count == 1).then_some(q)
        }
    })
    .await;
    assert_eq!(status.tickets[0].id, "poison-1");
    eventually("the pool to scale to zero", Duration::from_secs(60), || {
        let pods = pods.clone();
        async move {
            pods.list(&Default::default())
                .await
                .is_ok_and(|l| l.items.is_empty())
        }
    })
    .await;

    // Each good ticket ran once; nothing is left in the work queue.
    let ran = ran();
    for id in &expected {
        assert_eq!(
            ran.iter().filter(|r| *r == id).count(),
            1,
            "{id} ran once: {ran:?}"
        );
    }
    assert_eq!(queue_counts(&ch, &queue).await.0, 0);

    // What the hunts found: a real search, and never the password.
    for id in hunts {
        // Binary files included: searched as bytes, read as lossy text.
        let dump = std::fs::read(ledger.join(format!("{id}.dump")))
            .unwrap_or_else(|e| panic!("{id} left no dump: {e}"));
        let dump = String::from_utf8_lossy(&dump).into_owned();
        let brief: String = dump.chars().take(3000).collect();
        assert!(
            !dump.contains(&account.password),
            "{id} found the broker password:\n{brief}"
        );
        assert!(
            !dump.contains(&account.user),
            "{id} found the broker account:\n{brief}"
        );
        for seen in [
            format!("TICKET_ID={id}"),
            "--broker-socket".to_string(),
            "== file /bin/busybox".to_string(),
            "serves another wrapper".to_string(),
            "socket attempt exit 69".to_string(),
            "== end".to_string(),
        ] {
            assert!(dump.contains(&seen), "{id}: no {seen:?} in\n{brief}");
        }
        // Only this build's wrapper was too large to read; nothing was unreadable.
        let skipped: Vec<&str> = dump
            .lines()
            .filter(|l| l.starts_with("skipped ") || l.starts_with("unreadable "))
            .collect();
        assert_eq!(skipped, [format!("skipped {WRAPPER}")], "{id}");
        // Only its own container's processes: the wrapper and the command's.
        assert!(
            !dump.contains("broker-sidecar"),
            "{id} saw the sidecar's process"
        );
        // No API token for the tests.
        let token = dump
            .split("\n== token\n")
            .nth(1)
            .and_then(|rest| rest.split("\n== end").next())
            .unwrap_or_default();
        assert!(
            token.contains("No such file or directory"),
            "{id} found a service-account token: {token}"
        );
    }

    operator.abort();
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(&ledger);
    for q in [&queue, &quarantine, &outcomes] {
        let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
    }
    let _ = conn.close(200, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_tickets_never_find_the_broker_password_on_the_embedded_server() {
    hostile_tickets_never_find_the_broker_password(On::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real control plane: bash tests/control-plane/build.sh, then cargo test -- --include-ignored (bash tests/run.sh does both)"]
async fn hostile_tickets_never_find_the_broker_password_on_a_real_control_plane() {
    hostile_tickets_never_find_the_broker_password(On::ControlPlane).await;
}
