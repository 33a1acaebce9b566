//! The worker wrapper against the real RabbitMQ on 127.0.0.1:5672, running the
//! real binary with small shell scripts as the command.
//!
//! Every test uses its own queues (named after the test, the process id and a
//! counter; they also expire on their own if a failed test leaves them behind),
//! counts tickets in and out through files the command writes, and waits on
//! conditions with deadlines.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeleteOptions,
};
use lapin::types::{
    AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString, ShortString,
};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use testrunner_operator::broker::BrokerUri;
use testrunner_operator::contract::{WorkerExit, ticket_id};
use tokio::process::{Child, Command};
use tokio::time::timeout;

mod common;
use common::{declare_expiring, eventually, queue_counts};

const URI: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const BIN: &str = env!("CARGO_BIN_EXE_testrunner-operator");
/// Generous: the machine is shared with other builds.
const DEADLINE: Duration = Duration::from_secs(60);

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn unique(test: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    format!("trw-{test}-{}-{n}", std::process::id())
}

/// How the worker reaches the broker.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// `worker` with the broker URI, as a user runs it by hand.
    Direct,
    /// `worker --broker-socket` in front of `broker-sidecar`, as in a worker pod: only
    /// the sidecar has the URI.
    Sidecar,
}

/// The variables the sidecar takes (the broker side); the wrapper gets the others.
const SIDECAR_ENV: &[&str] = &[
    "TESTRUNNER_QUARANTINE_QUEUE",
    "TESTRUNNER_QUARANTINE_FILE",
    "TESTRUNNER_OUTCOMES_QUEUE",
    "TESTRUNNER_POD_NAME",
    "TESTRUNNER_REVISION",
    "TESTRUNNER_REPORT_INTERVAL",
];

/// One test's broker connection, scratch directory and queues.
struct Fixture {
    mode: Mode,
    name: String,
    dir: PathBuf,
    _conn: Connection,
    ch: Channel,
    queues: Vec<String>,
}

impl Fixture {
    async fn new(test: &str, mode: Mode) -> Self {
        let name = unique(test);
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir).unwrap();
        let uri = BrokerUri::parse(URI).unwrap();
        let conn = Connection::connect_uri(uri.amqp_uri(), ConnectionProperties::default())
            .await
            .expect("RabbitMQ must run on 127.0.0.1:5672 (bash .ci/ensure-rabbitmq)");
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        Self {
            mode,
            name,
            dir,
            _conn: conn,
            ch,
            queues: Vec::new(),
        }
    }

    /// A new durable quorum queue (it has `x-delivery-count`), removed after 10
    /// unused minutes should the test fail before deleting it.
    async fn quorum_queue(&mut self) -> String {
        let queue = format!("{}.q{}", self.name, self.queues.len());
        declare_expiring(&self.ch, &queue, true).await;
        self.queues.push(queue.clone());
        queue
    }

    /// Publishes with a publisher confirm: once this returns, the ticket is in.
    async fn publish(&self, queue: &str, body: &[u8], props: BasicProperties) {
        let confirm = self
            .ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack(), "publish not confirmed: {confirm:?}");
    }

    async fn ticket(&self, queue: &str, id: &str, body: &str) {
        let props = BasicProperties::default().with_message_id(id.into());
        self.publish(queue, body.as_bytes(), props).await;
    }

    /// (ready messages, consumers) of `queue`.
    async fn depth(&self, queue: &str) -> (u32, u32) {
        queue_counts(&self.ch, queue).await
    }

    /// Waits until no worker consumes `queue` (so whatever it held is back) and
    /// returns the number of ready tickets.
    async fn settled(&self, queue: &str) -> u32 {
        eventually("no consumer left", DEADLINE, || async {
            self.depth(queue).await.1 == 0
        })
        .await;
        self.depth(queue).await.0
    }

    /// Takes the next ticket of `queue`, which must be `id` delivered again (given back,
    /// not acked), and acks it.
    async fn take_redelivered(&self, queue: &str, id: &str) {
        let msg = self
            .ch
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{id} back in the queue"));
        assert_eq!(msg.properties.message_id().as_ref().unwrap().as_str(), id);
        assert!(msg.redelivered, "{id} was delivered before");
        msg.ack(BasicAckOptions::default()).await.unwrap();
    }

    /// The command's record of what it ran: one line per run.
    fn lines(&self, file: &str) -> Vec<String> {
        match std::fs::read_to_string(self.dir.join(file)) {
            Ok(text) => text.lines().map(str::to_string).collect(),
            Err(_) => Vec::new(),
        }
    }

    fn termination_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("termination-log")).unwrap_or_default()
    }

    /// Starts `worker EXTRA -- COMMAND` on `queue`.
    fn worker(&self, queue: &str, extra: &[&str], command: &[&str]) -> Worker {
        let mut args = extra.to_vec();
        args.push("--");
        args.extend(command);
        self.worker_env(queue, &[], &args)
    }

    /// Starts `worker ARGS` on `queue` with extra environment variables (in sidecar
    /// mode, the broker's go to the sidecar, the others to the wrapper).
    fn worker_env(&self, queue: &str, env: &[(&str, &str)], args: &[&str]) -> Worker {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let stderr = self.dir.join(format!("stderr-{n}"));
        type Env<'a> = Vec<(&'a str, &'a str)>;
        let (broker_env, wrapper_env): (Env, Env) = match self.mode {
            Mode::Direct => (Vec::new(), env.to_vec()),
            Mode::Sidecar => env.iter().partition(|(k, _)| SIDECAR_ENV.contains(k)),
        };
        let mut command = self.wrapper_command(&stderr);
        command.envs(wrapper_env.iter().copied());
        let sidecar = match self.mode {
            Mode::Direct => {
                command
                    .env("TESTRUNNER_AMQP_URI", URI)
                    .env("TESTRUNNER_QUEUE", queue);
                None
            }
            Mode::Sidecar => {
                let (sidecar, socket, sidecar_stderr) = self.sidecar(queue, URI, &broker_env);
                command.arg("--broker-socket").arg(&socket);
                Some((sidecar, sidecar_stderr))
            }
        };
        let child = command.args(args).spawn().unwrap();
        Worker {
            child,
            stderr,
            sidecar,
        }
    }

    /// `worker` with this test's termination log and `T_DIR`, none of the broker's
    /// variables, its log in `stderr`.
    fn wrapper_command(&self, stderr: &Path) -> Command {
        let mut command = Command::new(BIN);
        command
            .arg("worker")
            .env(
                "TESTRUNNER_TERMINATION_LOG",
                self.dir.join("termination-log"),
            )
            .env("T_DIR", &self.dir)
            .env_remove("TESTRUNNER_TEST_FAILURE_CODES")
            .env_remove("TESTRUNNER_IDLE_EXIT")
            .env_remove("TESTRUNNER_AMQP_URI")
            .env_remove("TESTRUNNER_QUEUE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(stderr).unwrap())
            .kill_on_drop(true);
        command
    }

    /// Starts a broker sidecar for `queue` on `uri`: the process, its socket, its log.
    fn sidecar(&self, queue: &str, uri: &str, env: &[(&str, &str)]) -> (Child, PathBuf, PathBuf) {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let socket = self.dir.join(format!("broker-{n}.sock"));
        let stderr = self.dir.join(format!("sidecar-stderr-{n}"));
        let sidecar = Command::new(BIN)
            .args(["broker-sidecar", "--listen"])
            .arg(&socket)
            .env("TESTRUNNER_AMQP_URI", uri)
            .env("TESTRUNNER_QUEUE", queue)
            .env(
                "TESTRUNNER_TERMINATION_LOG",
                self.dir.join("sidecar-termination-log"),
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        (sidecar, socket, stderr)
    }

    /// Starts `worker --broker-socket SOCKET -- sh -c SCRIPT`, with no broker URI.
    fn wrapper(&self, socket: &Path, extra: &[&str], script: &str) -> Worker {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let stderr = self.dir.join(format!("stderr-{n}"));
        let child = self
            .wrapper_command(&stderr)
            .arg("--broker-socket")
            .arg(socket)
            .args(extra)
            .args(["--", "/bin/sh", "-c", script])
            .spawn()
            .unwrap();
        Worker {
            child,
            stderr,
            sidecar: None,
        }
    }

    /// Starts the worker on `queue` with `sh -c SCRIPT` as the command.
    fn script_worker(&self, queue: &str, extra: &[&str], script: &str) -> Worker {
        self.worker(queue, extra, &["/bin/sh", "-c", script])
    }

    /// A worker on an empty `queue`, once it consumes and says it is idle.
    async fn idle_worker(&self, queue: &str) -> Worker {
        let w = self.script_worker(queue, &[], "exit 0");
        eventually("consuming", DEADLINE, || async {
            self.termination_log() == "idle\n" && self.depth(queue).await.1 == 1
        })
        .await;
        w
    }

    async fn cleanup(self) {
        for q in &self.queues {
            self.ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await
                .unwrap();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Worker {
    child: Child,
    stderr: PathBuf,
    /// In sidecar mode: the broker sidecar and its log.
    sidecar: Option<(Child, PathBuf)>,
}

impl Worker {
    /// Waits for the worker to exit and returns its exit code.
    async fn exit_code(&mut self) -> i32 {
        let status = timeout(DEADLINE, self.child.wait())
            .await
            .expect("the worker did not exit in time")
            .unwrap();
        let stderr = self.stderr();
        assert!(
            !stderr.contains("guest:guest") && !stderr.contains(URI),
            "credentials in the worker's log:\n{stderr}"
        );
        assert!(
            !stderr.contains('\x1b'),
            "colour escapes in a log that is no terminal:\n{stderr}"
        );
        if let Some((_, log)) = &self.sidecar {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            assert!(
                !log.contains("guest:guest") && !log.contains(URI),
                "credentials in the sidecar's log:\n{log}"
            );
        }
        status
            .code()
            .unwrap_or_else(|| panic!("worker killed by a signal: {status:?}\n{stderr}"))
    }

    /// The wrapper's log and, in sidecar mode, the sidecar's.
    fn stderr(&self) -> String {
        let mut text = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        if let Some((_, log)) = &self.sidecar {
            text.push_str("\n--- broker sidecar ---\n");
            text.push_str(&std::fs::read_to_string(log).unwrap_or_default());
        }
        text
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = self.child.id().expect("worker still running") as i32;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).unwrap();
    }

    /// The process that holds the broker connection: the sidecar, or the worker.
    fn broker_pid(&self) -> u32 {
        match &self.sidecar {
            Some((sidecar, _)) => sidecar.id().expect("sidecar still running"),
            None => self.child.id().expect("worker still running"),
        }
    }
}

/// How many times each line occurs.
fn counts(lines: &[String]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for l in lines {
        *out.entry(l.clone()).or_default() += 1;
    }
    out
}

fn exists(dir: &Path, file: &str) -> bool {
    dir.join(file).exists()
}

/// Records "<id> <delivery>" in `ran`, crashes (exit 3) on the first delivery of
/// a ticket whose body is `crash`, records the id in `done` otherwise.
const CRASH_ON_FIRST_DELIVERY: &str = r#"
body=$(cat)
echo "$TICKET_ID $TICKET_DELIVERY" >> "$T_DIR/ran"
if [ "$body" = crash ] && [ "$TICKET_DELIVERY" = 1 ]; then exit 3; fi
echo "$TICKET_ID" >> "$T_DIR/done"
"#;

async fn a_crashing_ticket_is_redelivered_and_named_the_others_are_acked_once(mode: Mode) {
    let mut f = Fixture::new("crash", mode).await;
    let q = f.quorum_queue().await;
    for i in 0..5 {
        let body = if i == 2 { "crash" } else { "ok" };
        f.ticket(&q, &format!("t{i}"), body).await;
    }

    let mut first = f.script_worker(&q, &[], CRASH_ON_FIRST_DELIVERY);
    assert_eq!(first.exit_code().await, 3, "{}", first.stderr());
    assert_eq!(f.termination_log(), "ticket=t2 delivery=1\n");
    assert_eq!(f.lines("ran"), ["t0 1", "t1 1", "t2 1"]);
    // Prefetch 1: only t2 was held by the crashed worker; t3 and t4 are untouched.
    assert_eq!(f.settled(&q).await, 3);

    // The restarted container.
    let mut second = f.script_worker(&q, &["--idle-exit", "1s"], CRASH_ON_FIRST_DELIVERY);
    assert_eq!(second.exit_code().await, 0, "{}", second.stderr());
    assert_eq!(f.termination_log(), "idle\n");

    let ran = counts(&f.lines("ran"));
    let expected: BTreeMap<String, usize> = ["t0 1", "t1 1", "t2 1", "t2 2", "t3 1", "t4 1"]
        .iter()
        .map(|s| (s.to_string(), 1))
        .collect();
    assert_eq!(
        ran, expected,
        "t2 came back with a higher delivery count, nothing else did"
    );
    let done = counts(&f.lines("done"));
    assert_eq!(done.len(), 5, "{done:?}");
    assert!(
        done.values().all(|n| *n == 1),
        "each ticket completed once: {done:?}"
    );
    assert_eq!(f.settled(&q).await, 0, "every ticket acked");
    f.cleanup().await;
}

async fn a_test_failure_exit_1_is_acked_and_not_redelivered(mode: Mode) {
    let mut f = Fixture::new("fail", mode).await;
    let q = f.quorum_queue().await;
    f.ticket(&q, "pass", "0").await;
    f.ticket(&q, "fail", "1").await;
    let script = r#"code=$(cat); echo "$TICKET_ID $TICKET_DELIVERY" >> "$T_DIR/ran"; exit "$code""#;
    let mut w = f.script_worker(&q, &["--idle-exit", "1s"], script);
    assert_eq!(w.exit_code().await, 0, "{}", w.stderr());
    assert_eq!(f.lines("ran"), ["pass 1", "fail 1"]);
    assert_eq!(f.termination_log(), "idle\n");
    assert_eq!(f.settled(&q).await, 0);
    f.cleanup().await;
}

async fn listed_test_failure_codes_from_env_are_acked_others_crash(mode: Mode) {
    let mut f = Fixture::new("codes", mode).await;
    let q = f.quorum_queue().await;
    f.ticket(&q, "c1", "1").await;
    f.ticket(&q, "c5", "5").await;
    f.ticket(&q, "c4", "4").await;
    let script = r#"code=$(cat); echo "$TICKET_ID $TICKET_DELIVERY" >> "$T_DIR/ran"; exit "$code""#;
    // Through the environment, as the operator passes it.
    let mut w = f.worker_env(
        &q,
        &[("TESTRUNNER_TEST_FAILURE_CODES", "1,5")],
        &["--", "/bin/sh", "-c", script],
    );
    assert_eq!(w.exit_code().await, 4, "{}", w.stderr());
    assert_eq!(f.termination_log(), "ticket=c4 delivery=1\n");
    assert_eq!(counts(&f.lines("ran")).get("c4 1"), Some(&1));
    assert_eq!(f.settled(&q).await, 1, "only c4 is back");
    let back =
        f.ch.basic_get(q.as_str().into(), BasicGetOptions::default())
            .await
            .unwrap()
            .expect("c4 is back in the queue");
    assert_eq!(
        back.properties.message_id().as_ref().unwrap().as_str(),
        "c4"
    );
    back.ack(BasicAckOptions::default()).await.unwrap();
    let ran = counts(&f.lines("ran"));
    assert_eq!(ran.len(), 3, "{ran:?}");
    assert!(ran.values().all(|n| *n == 1), "{ran:?}");
    f.cleanup().await;
}

/// Records start and end of each ticket; waits for the file `go` in between.
const WAIT_FOR_GO: &str = r#"
echo "$TICKET_ID start" >> "$T_DIR/ran"
while [ ! -e "$T_DIR/go" ]; do sleep 0.05; done
echo "$TICKET_ID end" >> "$T_DIR/ran"
"#;

async fn sigterm_lets_the_running_ticket_finish_and_acks_it(mode: Mode) {
    let mut f = Fixture::new("sigterm", mode).await;
    let q = f.quorum_queue().await;
    f.ticket(&q, "s0", "").await;
    f.ticket(&q, "s1", "").await;
    let mut w = f.script_worker(&q, &[], WAIT_FOR_GO);
    eventually("s0 started", DEADLINE, || async {
        f.lines("ran") == ["s0 start"]
    })
    .await;

    w.signal(nix::sys::signal::Signal::SIGTERM);
    // The worker stops taking tickets (basic.cancel) while the command still runs.
    // (A quorum queue keeps counting a cancelled consumer until its ticket is acked,
    // so the worker's own log says when the cancel is done.)
    eventually("consumer cancelled", DEADLINE, || async {
        w.stderr().contains("consumer cancelled")
    })
    .await;
    assert_eq!(f.lines("ran"), ["s0 start"]);
    assert_eq!(f.termination_log(), "ticket=s0 delivery=1\n");

    std::fs::write(f.dir.join("go"), "").unwrap();
    assert_eq!(w.exit_code().await, 0, "{}", w.stderr());
    assert_eq!(f.lines("ran"), ["s0 start", "s0 end"]);
    assert_eq!(f.termination_log(), "idle\n");

    // s0 acked; s1 never delivered: it is first-hand.
    assert_eq!(f.settled(&q).await, 1);
    let s1 =
        f.ch.basic_get(q.as_str().into(), BasicGetOptions::default())
            .await
            .unwrap()
            .expect("s1 still queued");
    assert_eq!(s1.properties.message_id().as_ref().unwrap().as_str(), "s1");
    assert!(
        !s1.redelivered,
        "s1 was never handed to the stopping worker"
    );
    s1.ack(BasicAckOptions::default()).await.unwrap();
    assert_eq!(f.depth(&q).await.0, 0);
    f.cleanup().await;
}

async fn a_second_sigterm_is_forwarded_and_the_ticket_stays_unacked(mode: Mode) {
    let mut f = Fixture::new("sigterm2", mode).await;
    let q = f.quorum_queue().await;
    f.ticket(&q, "u0", "").await;
    let script = r#"
trap 'echo "$TICKET_ID term" >> "$T_DIR/ran"; exit 0' TERM
echo "$TICKET_ID start" >> "$T_DIR/ran"
while true; do sleep 0.05; done
"#;
    let mut w = f.script_worker(&q, &[], script);
    eventually("u0 started", DEADLINE, || async {
        f.lines("ran") == ["u0 start"]
    })
    .await;
    w.signal(nix::sys::signal::Signal::SIGTERM);
    eventually("consumer cancelled", DEADLINE, || async {
        w.stderr().contains("consumer cancelled")
    })
    .await;
    w.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(w.exit_code().await, 128 + 15, "{}", w.stderr());
    assert_eq!(f.lines("ran"), ["u0 start", "u0 term"]);
    assert_eq!(f.termination_log(), "ticket=u0 delivery=1\n");

    assert_eq!(f.settled(&q).await, 1, "u0 released, not acked");
    f.take_redelivered(&q, "u0").await;
    f.cleanup().await;
}

async fn sigterm_while_idle_exits_0(mode: Mode) {
    let mut f = Fixture::new("idle", mode).await;
    let q = f.quorum_queue().await;
    let mut w = f.idle_worker(&q).await;
    w.signal(nix::sys::signal::Signal::SIGINT);
    assert_eq!(w.exit_code().await, 0, "{}", w.stderr());
    assert_eq!(f.settled(&q).await, 0);
    f.cleanup().await;
}

/// Closes the worker's broker connection from the broker's side.
async fn cut_connection(w: &Worker, why: &str) {
    let pid = w.broker_pid();
    let name = tokio::task::spawn_blocking(move || connection_of(pid))
        .await
        .unwrap()
        .expect("the worker's connection is listed");
    let closed = std::process::Command::new("rabbitmqctl")
        .args(["-q", "close_connection", &name, why])
        .status()
        .unwrap();
    assert!(closed.success());
}

/// The worker exited with the broker-lost code and said so in its termination log.
async fn assert_broker_lost(f: &Fixture, w: &mut Worker) {
    assert_eq!(
        w.exit_code().await,
        i32::from(WorkerExit::BrokerLost),
        "{}",
        w.stderr()
    );
    assert!(
        f.termination_log().starts_with("broker-lost: "),
        "{}",
        f.termination_log()
    );
}

/// The broker-side id of the connection whose client-provided name ends with
/// `pid=<pid>`, as `rabbitmqctl list_connections` shows it.
fn connection_of(pid: u32) -> Option<String> {
    let out = std::process::Command::new("rabbitmqctl")
        .args([
            "-q",
            "list_connections",
            "--no-table-headers",
            "pid",
            "client_properties",
        ])
        .output()
        .expect("rabbitmqctl runs");
    let needle = format!("pid={pid}\"");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.contains(&needle))
        .and_then(|l| l.split('\t').next())
        .map(str::to_string)
}

async fn a_cut_connection_stops_the_command_and_the_ticket_comes_back(mode: Mode) {
    let mut f = Fixture::new("cut", mode).await;
    let q = f.quorum_queue().await;
    f.ticket(&q, "c0", "").await;
    let script = r#"
echo $$ > "$T_DIR/cmd.pid"
echo "$TICKET_ID $TICKET_DELIVERY start" >> "$T_DIR/ran"
if [ "$TICKET_DELIVERY" = 1 ]; then while true; do sleep 0.05; done; fi
echo "$TICKET_ID $TICKET_DELIVERY end" >> "$T_DIR/ran"
"#;
    let mut w = f.script_worker(&q, &[], script);
    eventually("c0 started", DEADLINE, || async {
        f.lines("ran") == ["c0 1 start"]
    })
    .await;
    cut_connection(&w, "test: cut mid-ticket").await;

    assert_broker_lost(&f, &mut w).await;
    // The command was stopped, not left running.
    let cmd: i32 = std::fs::read_to_string(f.dir.join("cmd.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(cmd), None).is_err(),
        "the command is still running"
    );
    assert_eq!(f.lines("ran"), ["c0 1 start"]);

    // Nothing lost: the next worker gets it again.
    assert_eq!(f.settled(&q).await, 1);
    let mut next = f.script_worker(&q, &["--idle-exit", "1s"], script);
    assert_eq!(next.exit_code().await, 0, "{}", next.stderr());
    assert_eq!(f.lines("ran"), ["c0 1 start", "c0 2 start", "c0 2 end"]);
    assert_eq!(f.settled(&q).await, 0);
    f.cleanup().await;
}

async fn malformed_messages_do_not_crash_the_worker(mode: Mode) {
    let mut f = Fixture::new("malformed", mode).await;
    let q = f.quorum_queue().await;

    // 1. Empty body, no properties at all.
    f.publish(&q, b"", BasicProperties::default()).await;
    // 2. Several MiB of non-UTF-8 bytes, NULs included.
    let big: Vec<u8> = (0..5 * 1024 * 1024u32)
        .map(|i| (i * 7 % 256) as u8)
        .collect();
    f.publish(
        &q,
        &big,
        BasicProperties::default().with_message_id("big".into()),
    )
    .await;
    // 3. A message id with a space and a newline, and headers of every odd type.
    let mut nested = FieldTable::default();
    nested.insert("k".into(), AMQPValue::LongString("v".into()));
    let mut headers = FieldTable::default();
    for (k, v) in [
        ("retries", AMQPValue::LongLongInt(3)),
        ("flag", AMQPValue::Boolean(true)),
        ("ratio", AMQPValue::Double(0.25)),
        (
            "price",
            AMQPValue::DecimalValue(DecimalValue {
                scale: 2,
                value: 1999,
            }),
        ),
        ("at", AMQPValue::Timestamp(1_700_000_000)),
        ("nested", AMQPValue::FieldTable(nested)),
        (
            "list",
            AMQPValue::FieldArray(FieldArray::from(vec![
                AMQPValue::LongInt(1),
                AMQPValue::LongString("two".into()),
            ])),
        ),
        ("raw", AMQPValue::ByteArray(ByteArray::from(vec![0u8, 255]))),
        ("nothing", AMQPValue::Void),
        (
            "binary",
            AMQPValue::LongString(LongString::from(vec![b'a', 0, 0xff, b'b'])),
        ),
        ("wëird name!", AMQPValue::LongString("value".into())),
    ] {
        headers.insert(ShortString::from(k), v);
    }
    f.publish(
        &q,
        &[0xff, 0xfe, 0x00, b'a'],
        BasicProperties::default()
            .with_message_id("odd id\nx".into())
            .with_headers(headers),
    )
    .await;
    // 4. An empty message id: the body hash stands in.
    f.publish(
        &q,
        b"empty id",
        BasicProperties::default().with_message_id("".into()),
    )
    .await;

    let script = r#"
n=$(wc -c | tr -d ' ')
echo "$TICKET_ID $TICKET_DELIVERY $n" >> "$T_DIR/ran"
if [ "$TICKET_ID" = "odd%20id%0Ax" ]; then
  printf '%s' "$TICKET_HEADERS" > "$T_DIR/headers.json"
  printf '%s|%s|%s|%s|%s' "$TICKET_HEADER_RETRIES" "$TICKET_HEADER_W_IRD_NAME_" \
    "$TICKET_HEADER_PRICE" "$TICKET_HEADER_FLAG" "$TICKET_HEADER_RAW" > "$T_DIR/header-env"
fi
"#;
    let mut w = f.script_worker(&q, &["--idle-exit", "2s"], script);
    assert_eq!(w.exit_code().await, 0, "{}", w.stderr());

    let expected = [
        format!("{} 1 0", ticket_id(None, b"")),
        format!("big 1 {}", big.len()),
        "odd%20id%0Ax 1 4".to_string(),
        format!("{} 1 8", ticket_id(None, b"empty id")),
    ];
    assert_eq!(f.lines("ran"), expected);
    assert_eq!(
        std::fs::read_to_string(f.dir.join("header-env")).unwrap(),
        "3|value|19.99|true|00ff"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(f.dir.join("headers.json")).unwrap())
            .unwrap();
    assert_eq!(json["retries"], 3);
    assert_eq!(json["nested"]["k"], "v");
    assert_eq!(json["list"][1], "two");
    assert_eq!(json["nothing"], serde_json::Value::Null);
    assert_eq!(json["binary"], "a\u{0}\u{FFFD}b");
    assert_eq!(json["wëird name!"], "value");
    assert_eq!(f.termination_log(), "idle\n");
    assert_eq!(f.settled(&q).await, 0, "all four acked");
    f.cleanup().await;
}

async fn a_missing_command_is_an_environment_failure_and_takes_no_ticket(mode: Mode) {
    let mut f = Fixture::new("missing", mode).await;
    let q = f.quorum_queue().await;
    f.ticket(&q, "m0", "").await;
    let mut w = f.worker(&q, &[], &["/nonexistent/run-tests", "--all"]);
    assert_eq!(
        w.exit_code().await,
        i32::from(WorkerExit::CommandNotStarted),
        "{}",
        w.stderr()
    );
    let log = f.termination_log();
    assert!(
        log.starts_with("command-error: cannot start command /nonexistent/run-tests"),
        "{log}"
    );
    assert!(
        w.stderr().contains("/nonexistent/run-tests"),
        "{}",
        w.stderr()
    );
    // Checked before consuming: the ticket was never handed out.
    assert_eq!(f.settled(&q).await, 1);
    let m0 =
        f.ch.basic_get(q.as_str().into(), BasicGetOptions::default())
            .await
            .unwrap()
            .expect("m0 still queued");
    assert_eq!(m0.properties.message_id().as_ref().unwrap().as_str(), "m0");
    assert!(!m0.redelivered, "no delivery charged to m0");
    m0.ack(BasicAckOptions::default()).await.unwrap();
    f.cleanup().await;
}

async fn a_command_that_cannot_start_gives_its_ticket_back(mode: Mode) {
    use std::os::unix::fs::PermissionsExt;
    let mut f = Fixture::new("noexec", mode).await;
    let q = f.quorum_queue().await;
    f.ticket(&q, "n0", "").await;
    // Executable bits, but not a program the kernel can run.
    let broken = f.dir.join("broken-runner");
    std::fs::write(&broken, [0u8, 1, 2, 3]).unwrap();
    std::fs::set_permissions(&broken, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut w = f.worker(&q, &[], &[broken.to_str().unwrap()]);
    assert_eq!(
        w.exit_code().await,
        i32::from(WorkerExit::CommandNotStarted),
        "{}",
        w.stderr()
    );
    let log = f.termination_log();
    assert!(
        log.starts_with("command-error: cannot start command "),
        "{log}"
    );
    assert!(log.contains("broken-runner"), "{log}");
    assert_eq!(f.settled(&q).await, 1, "n0 given back, not acked");
    f.take_redelivered(&q, "n0").await;
    f.cleanup().await;
}

#[tokio::test]
async fn startup_failures_have_their_own_exit_codes_and_hide_credentials() {
    let mut f = Fixture::new("startup", Mode::Direct).await;
    let q = f.quorum_queue().await;
    let run = |uri: &str, queue: &str, extra: &[&str]| {
        let mut cmd = std::process::Command::new(BIN);
        cmd.arg("worker")
            .args(extra)
            .args(["--", "/bin/true"])
            .env("TESTRUNNER_AMQP_URI", uri)
            .env("TESTRUNNER_QUEUE", queue)
            .env("TESTRUNNER_TERMINATION_LOG", f.dir.join("termination-log"))
            .env_remove("TESTRUNNER_TEST_FAILURE_CODES")
            .stdin(Stdio::null());
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        (out.status.code(), text, f.termination_log())
    };

    // Nothing listens on port 1.
    let (code, out, log) = run("amqp://guest:s3cret@127.0.0.1:1/%2f", &q, &[]);
    assert_eq!(
        code,
        Some(i32::from(WorkerExit::BrokerUnavailable)),
        "{out}"
    );
    assert!(log.starts_with("broker-unavailable: "), "{log}");
    assert!(
        !out.contains("s3cret") && !log.contains("s3cret"),
        "{out}{log}"
    );

    let missing = format!("{q}.missing");
    let (code, out, log) = run(URI, &missing, &[]);
    assert_eq!(
        code,
        Some(i32::from(WorkerExit::BrokerUnavailable)),
        "{out}"
    );
    assert!(log.contains("NOT_FOUND"), "{log}");

    let (code, out, log) = run("http://guest:s3cret@127.0.0.1/", &q, &[]);
    assert_eq!(code, Some(i32::from(WorkerExit::Config)), "{out}");
    assert!(log.starts_with("config-error: "), "{log}");
    assert!(
        !out.contains("s3cret") && !log.contains("s3cret"),
        "{out}{log}"
    );

    let (code, out, log) = run(URI, &q, &["--test-failure-codes", "one"]);
    assert_eq!(code, Some(i32::from(WorkerExit::Config)), "{out}");
    assert!(log.starts_with("config-error: "), "{log}");

    assert!(!exists(&f.dir, "ran"));
    assert_eq!(f.depth(&q).await, (0, 0));
    f.cleanup().await;
}

#[tokio::test]
async fn starting_is_written_before_the_consume_loop_is_up() {
    let f = Fixture::new("starting", Mode::Direct).await;
    // A listener that accepts the TCP connection but never speaks AMQP: the worker
    // stays in its handshake.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let uri = format!("amqp://guest:guest@{}/%2f", silent.local_addr().unwrap());
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let stderr = f.dir.join(format!("stderr-{n}"));
    let child = Command::new(BIN)
        .args(["worker", "--queue", "never", "--", "/bin/true"])
        .env("TESTRUNNER_AMQP_URI", &uri)
        .env("TESTRUNNER_TERMINATION_LOG", f.dir.join("termination-log"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut w = Worker {
        child,
        stderr,
        sidecar: None,
    };
    silent.set_nonblocking(true).unwrap();
    let mut held = Vec::new();
    eventually("the worker connects", DEADLINE, || {
        if let Ok((conn, _)) = silent.accept() {
            held.push(conn);
        }
        let connected = !held.is_empty();
        async move { connected }
    })
    .await;
    eventually("starting written", DEADLINE, || async {
        f.termination_log() == "starting\n"
    })
    .await;
    w.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(w.exit_code().await, 0, "{}", w.stderr());
    assert_eq!(f.termination_log(), "starting\n");
    f.cleanup().await;
}

async fn a_command_killed_by_a_signal_exits_128_plus_the_signal(mode: Mode) {
    let mut f = Fixture::new("killed", mode).await;
    let q = f.quorum_queue().await;
    f.ticket(&q, "k0", "").await;
    let script = r#"echo "$TICKET_ID $TICKET_DELIVERY" >> "$T_DIR/ran"; kill -KILL $$"#;
    let mut w = f.script_worker(&q, &[], script);
    assert_eq!(w.exit_code().await, 128 + 9, "{}", w.stderr());
    assert_eq!(f.termination_log(), "ticket=k0 delivery=1\n");
    assert_eq!(f.lines("ran"), ["k0 1"]);
    assert_eq!(f.settled(&q).await, 1, "k0 not acked");
    let k0 =
        f.ch.basic_get(q.as_str().into(), BasicGetOptions::default())
            .await
            .unwrap()
            .expect("k0 back");
    assert!(k0.redelivered);
    k0.ack(BasicAckOptions::default()).await.unwrap();
    f.cleanup().await;
}

async fn a_cut_connection_while_idle_exits_with_the_broker_lost_code(mode: Mode) {
    let mut f = Fixture::new("cutidle", mode).await;
    let q = f.quorum_queue().await;
    let mut w = f.idle_worker(&q).await;
    cut_connection(&w, "test: cut while idle").await;
    assert_broker_lost(&f, &mut w).await;
    assert_eq!(f.settled(&q).await, 0);
    f.cleanup().await;
}

async fn a_listed_ticket_is_moved_to_quarantine_intact_and_not_run(mode: Mode) {
    let mut f = Fixture::new("divert", mode).await;
    let q = f.quorum_queue().await;
    let quarantine = f.quorum_queue().await;
    let outcomes = f.quorum_queue().await;
    let list = f.dir.join("quarantine-list");
    std::fs::write(
        &list,
        "t-other\nt-poison 100 crashes=3&pods=unit-a%2Cunit-b&images=runner%3A1&last_exit=exit+code+3\n",
    )
    .unwrap();
    let mut headers = FieldTable::default();
    headers.insert("x-suite".into(), AMQPValue::LongString("unit".into()));
    let props = BasicProperties::default()
        .with_message_id("t-poison".into())
        .with_content_type("text/plain".into())
        .with_headers(headers);
    f.publish(&q, b"poison body", props).await;
    // Stamped as published 30 s ago: its busy report says it waited that long.
    let stamped = jiff::Timestamp::now().as_second() - 30;
    let props = BasicProperties::default()
        .with_message_id("t-good".into())
        .with_timestamp(stamped as u64);
    f.publish(&q, b"good body", props).await;

    let list_s = list.display().to_string();
    let mut w = f.worker_env(
        &q,
        &[
            ("TESTRUNNER_QUARANTINE_QUEUE", quarantine.as_str()),
            ("TESTRUNNER_QUARANTINE_FILE", list_s.as_str()),
            ("TESTRUNNER_OUTCOMES_QUEUE", outcomes.as_str()),
            ("TESTRUNNER_POD_NAME", "unit-abcde"),
        ],
        &[
            "--",
            "/bin/sh",
            "-c",
            "echo \"$TICKET_ID\" >> \"$T_DIR/ran\"",
        ],
    );
    eventually(
        "the good ticket to run and the poison one to move",
        DEADLINE,
        || async {
            f.lines("ran") == ["t-good"]
                && f.depth(&quarantine).await.0 == 1
                && f.depth(&q).await.0 == 0
        },
    )
    .await;
    w.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(w.exit_code().await, 0, "{}", w.stderr());
    assert_eq!(f.settled(&q).await, 0, "nothing left in the work queue");

    // The quarantined copy keeps body, properties and headers, and says where it came from.
    let msg =
        f.ch.basic_get(quarantine.as_str().into(), BasicGetOptions::default())
            .await
            .unwrap()
            .expect("the quarantined ticket");
    assert_eq!(msg.data, b"poison body");
    assert_eq!(
        msg.properties.message_id().as_ref().map(|s| s.as_str()),
        Some("t-poison")
    );
    assert_eq!(
        msg.properties.content_type().as_ref().map(|s| s.as_str()),
        Some("text/plain")
    );
    let h = msg.properties.headers().clone().unwrap();
    let text = |k: &str| match h.inner().get(k) {
        Some(AMQPValue::LongString(s)) => s.to_string(),
        other => format!("{other:?}"),
    };
    assert_eq!(text("x-suite"), "unit");
    assert_eq!(text("x-testrunner-quarantined-from"), q);
    assert_eq!(text("x-testrunner-quarantined-by"), "unit-abcde");
    assert_eq!(text("x-testrunner-crashes"), "3");
    assert_eq!(text("x-testrunner-pods"), "unit-a,unit-b");
    assert_eq!(text("x-testrunner-images"), "runner:1");
    assert_eq!(text("x-testrunner-last-exit"), "exit code 3");
    msg.ack(BasicAckOptions::default()).await.unwrap();
    assert_eq!(f.depth(&quarantine).await.0, 0, "exactly one copy");

    // The outcome queue got one outcome per ticket (one run, one quarantined), and state
    // reports: idle when consuming, busy with the ticket that ran, before it ran; the
    // quarantined ticket never ran, so the worker never reported it busy.
    let mut outcomes_seen = Vec::new();
    let mut states_seen = Vec::new();
    let mut waits = Vec::new();
    while let Some(m) =
        f.ch.basic_get(outcomes.as_str().into(), BasicGetOptions::default())
            .await
            .unwrap()
    {
        let v: serde_json::Value = serde_json::from_slice(&m.data).unwrap();
        let ticket = v["ticket"].as_str().unwrap_or_default().to_string();
        if let Some(ms) = v["waitedMs"].as_u64() {
            waits.push((
                v["state"].as_str().unwrap_or_default().to_string(),
                ticket.clone(),
                ms,
            ));
        }
        match (v["outcome"].as_str(), v["state"].as_str()) {
            (Some(outcome), None) => outcomes_seen.push((ticket, outcome.to_string())),
            (None, Some(state)) => states_seen.push((state.to_string(), ticket)),
            other => panic!("neither an outcome nor a state report: {other:?} in {v}"),
        }
        assert_eq!(v["pod"], "unit-abcde");
        m.ack(BasicAckOptions::default()).await.unwrap();
    }
    // The wait is in the busy report of the taking only (heartbeats do not repeat it),
    // measured from the stamp: 30 s, plus the second the stamp drops, plus the run.
    assert_eq!(waits.len(), 1, "{waits:?}");
    let (state, ticket, ms) = &waits[0];
    assert_eq!((state.as_str(), ticket.as_str()), ("busy", "t-good"));
    assert!(
        (30_000..30_000 + 1_000 + DEADLINE.as_millis() as u64).contains(ms),
        "waited {ms} ms"
    );
    assert_eq!(
        states_seen.first(),
        Some(&("idle".to_string(), String::new()))
    );
    assert!(states_seen.contains(&("busy".to_string(), "t-good".to_string())));
    assert!(!states_seen.contains(&("busy".to_string(), "t-poison".to_string())));
    outcomes_seen.sort();
    assert_eq!(
        outcomes_seen,
        [
            ("t-good".to_string(), "passed".to_string()),
            ("t-poison".to_string(), "quarantined".to_string())
        ]
    );
    f.cleanup().await;
}

/// Every test above runs twice: the worker on the broker itself, and the wrapper
/// through a broker sidecar that alone holds the credentials.
macro_rules! in_both_modes {
    ($($name:ident),* $(,)?) => {
        mod direct {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Mode::Direct).await
            })*
        }
        mod through_sidecar {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Mode::Sidecar).await
            })*
        }
    };
}

in_both_modes!(
    a_crashing_ticket_is_redelivered_and_named_the_others_are_acked_once,
    a_test_failure_exit_1_is_acked_and_not_redelivered,
    listed_test_failure_codes_from_env_are_acked_others_crash,
    sigterm_lets_the_running_ticket_finish_and_acks_it,
    a_second_sigterm_is_forwarded_and_the_ticket_stays_unacked,
    sigterm_while_idle_exits_0,
    a_cut_connection_stops_the_command_and_the_ticket_comes_back,
    malformed_messages_do_not_crash_the_worker,
    a_missing_command_is_an_environment_failure_and_takes_no_ticket,
    a_command_that_cannot_start_gives_its_ticket_back,
    a_command_killed_by_a_signal_exits_128_plus_the_signal,
    a_cut_connection_while_idle_exits_with_the_broker_lost_code,
    a_listed_ticket_is_moved_to_quarantine_intact_and_not_run,
);

// ---------------------------------------------------------------------------
// The broker sidecar's own promises
// ---------------------------------------------------------------------------

/// One length-delimited JSON frame over `stream` and the answer, as any process in the
/// test container could send it.
async fn raw_exchange(stream: &mut tokio::net::UnixStream, message: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(&(message.len() as u32).to_be_bytes())
        .await
        .ok()?;
    stream.write_all(message.as_bytes()).await.ok()?;
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).await.ok()?;
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    stream.read_exact(&mut body).await.ok()?;
    Some(String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn the_wrapper_and_its_command_never_hold_the_broker_uri() {
    let mut f = Fixture::new("nouri", Mode::Sidecar).await;
    let q = f.quorum_queue().await;
    let outcomes = f.quorum_queue().await;
    f.ticket(&q, "n0", "").await;
    // The command looks where a test could: its environment, its parent's (the
    // wrapper's) environment and command line, and the socket's answers.
    let script = r#"
{ env; tr '\0' '\n' < /proc/$PPID/environ; tr '\0' ' ' < /proc/$PPID/cmdline; } > "$T_DIR/seen"
echo "$TICKET_ID" >> "$T_DIR/ran"
"#;
    let mut w = f.worker_env(
        &q,
        &[("TESTRUNNER_OUTCOMES_QUEUE", outcomes.as_str())],
        &["--idle-exit", "1s", "--", "/bin/sh", "-c", script],
    );
    assert_eq!(w.exit_code().await, 0, "{}", w.stderr());
    assert_eq!(f.lines("ran"), ["n0"]);
    let seen = std::fs::read_to_string(f.dir.join("seen")).unwrap();
    assert!(seen.contains("TICKET_ID=n0"), "{seen}");
    assert!(seen.contains("--broker-socket"), "{seen}");
    assert!(
        !seen.contains("guest") && !seen.contains("amqp://"),
        "the test command saw the broker URI:\n{seen}"
    );
    // The sidecar still reported for it: the busy state and the outcome.
    assert!(
        f.depth(&outcomes).await.0 >= 2,
        "reports on the outcome queue"
    );
    assert_eq!(f.settled(&q).await, 0);
    f.cleanup().await;
}

#[tokio::test]
async fn one_wrapper_at_a_time_and_the_sidecar_serves_the_next_after_a_crash() {
    let mut f = Fixture::new("onesession", Mode::Sidecar).await;
    let q = f.quorum_queue().await;
    let (_sidecar, socket, sidecar_log) = f.sidecar(&q, URI, &[]);
    f.ticket(&q, "p0", "crash").await;
    f.ticket(&q, "p1", "").await;

    // The first wrapper waits for "go" on the first ticket.
    let script = r#"
body=$(cat)
echo "$TICKET_ID $TICKET_DELIVERY" >> "$T_DIR/ran"
while [ ! -e "$T_DIR/go" ]; do sleep 0.05; done
if [ "$body" = crash ] && [ "$TICKET_DELIVERY" = 1 ]; then exit 3; fi
"#;
    let mut first = f.wrapper(&socket, &[], script);
    eventually("p0 running", DEADLINE, || async {
        f.lines("ran") == ["p0 1"]
    })
    .await;

    // Anyone else on the socket meanwhile is refused, and learns nothing.
    let mut other = tokio::net::UnixStream::connect(&socket).await.unwrap();
    let answer = raw_exchange(&mut other, r#"{"request":"hello","version":1}"#).await;
    assert_eq!(answer.as_deref(), Some(r#"{"reply":"busy"}"#));

    // The crash gives p0 back with the session; the same sidecar serves the next
    // wrapper, which gets p0 again (delivery 2) and p1.
    std::fs::write(f.dir.join("go"), "").unwrap();
    assert_eq!(first.exit_code().await, 3, "{}", first.stderr());
    assert_eq!(f.termination_log(), "ticket=p0 delivery=1\n");
    let mut second = f.wrapper(&socket, &["--idle-exit", "1s"], script);
    assert_eq!(second.exit_code().await, 0, "{}", second.stderr());
    // Whether the redelivered p0 comes before p1 is the broker's choice.
    let mut ran = f.lines("ran");
    ran.sort();
    assert_eq!(ran, ["p0 1", "p0 2", "p1 1"]);
    assert_eq!(f.settled(&q).await, 0);
    let log = std::fs::read_to_string(&sidecar_log).unwrap();
    assert!(log.contains("one wrapper at a time"), "{log}");
    assert!(!log.contains("guest:guest"), "{log}");
    f.cleanup().await;
}

#[tokio::test]
async fn a_sidecar_that_cannot_serve_makes_the_wrapper_exit_with_the_cause() {
    let mut f = Fixture::new("sidecarfail", Mode::Sidecar).await;
    let q = f.quorum_queue().await;
    f.ticket(&q, "x0", "").await;
    // Nothing listens on port 1: the broker is unavailable.
    let (_down, socket, log) = f.sidecar(&q, "amqp://guest:s3cret@127.0.0.1:1/%2f", &[]);
    let mut w = f.wrapper(&socket, &[], "exit 0");
    assert_eq!(
        w.exit_code().await,
        i32::from(WorkerExit::BrokerUnavailable),
        "{}",
        w.stderr()
    );
    assert!(f.termination_log().starts_with("broker-unavailable: "));
    // Not a URI at all: a configuration error, told to the wrapper.
    let (_bad, socket, bad_log) = f.sidecar(&q, "http://guest:s3cret@127.0.0.1/", &[]);
    let mut w2 = f.wrapper(&socket, &[], "exit 0");
    assert_eq!(
        w2.exit_code().await,
        i32::from(WorkerExit::Config),
        "{}",
        w2.stderr()
    );
    assert!(f.termination_log().starts_with("config-error: "));
    for text in [
        w.stderr(),
        w2.stderr(),
        f.termination_log(),
        std::fs::read_to_string(log).unwrap(),
        std::fs::read_to_string(bad_log).unwrap(),
    ] {
        assert!(!text.contains("s3cret"), "{text}");
    }
    assert!(!exists(&f.dir, "ran"));
    assert_eq!(f.depth(&q).await.0, 1, "x0 untouched");
    f.cleanup().await;
}
