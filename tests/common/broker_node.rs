//! A RabbitMQ node of a test's (or a benchmark's) own, on free ports, with its data in a
//! directory of its own: for tests that stop, restart or load a broker, so that the
//! machine's broker (127.0.0.1:5672) is never touched. It runs Debian's
//! `rabbitmq-server` (what `bash .ci/ensure-rabbitmq` installs) as the current user.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The server script that runs a node in the foreground as the current user (the one on
/// the PATH switches to the `rabbitmq` user and the machine's node directories).
const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
/// Its control tool.
const CTL: &str = "/usr/lib/rabbitmq/bin/rabbitmqctl";
/// Longest wait for a node to accept AMQP connections (about 10 s on an idle machine).
const START_TIMEOUT: Duration = Duration::from_secs(90);

/// A running node; stopped (and its directory removed) when dropped.
pub struct BrokerNode {
    name: String,
    port: u16,
    dist: u16,
    dir: PathBuf,
    /// The node's limit of open files (its file descriptors), when set.
    open_files: Option<u32>,
    child: Option<Child>,
}

/// A port free on 127.0.0.1 now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

fn accepts(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

impl BrokerNode {
    /// Starts a node named after `tag` and waits until it accepts AMQP connections.
    /// Panics, saying how to install RabbitMQ, when the server is missing.
    pub fn start(tag: &str) -> BrokerNode {
        Self::start_with_open_files(tag, None)
    }

    /// [`BrokerNode::start`] with a limit of open files for the node (Debian's default
    /// for a service is 1,024); `None` keeps this process's.
    pub fn start_with_open_files(tag: &str, open_files: Option<u32>) -> BrokerNode {
        assert!(
            std::path::Path::new(SERVER).exists(),
            "{SERVER} is missing: install RabbitMQ with `bash .ci/ensure-rabbitmq`"
        );
        let name = format!("testrunner-{tag}-{}@localhost", std::process::id());
        let dir = std::env::temp_dir().join(format!("rabbitmq-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("the node's directory");
        std::fs::write(dir.join("enabled_plugins"), "[].\n").expect("its plugin list");
        let port = free_port();
        let dist = loop {
            let p = free_port();
            if p != port {
                break p;
            }
        };
        let mut node = BrokerNode {
            name,
            port,
            dist,
            dir,
            open_files,
            child: None,
        };
        node.boot();
        node
    }

    /// Starts the node (again, with the same data and ports).
    fn boot(&mut self) {
        let log = std::fs::File::create(self.dir.join("server.out")).expect("its log file");
        // `ulimit -n` in a shell that then becomes the server.
        let limit = self
            .open_files
            .map(|n| format!("ulimit -n {n} && "))
            .unwrap_or_default();
        let child = Command::new("sh")
            .arg("-c")
            .arg(format!("{limit}exec {SERVER}"))
            .current_dir(&self.dir)
            .envs(self.env())
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist.to_string())
            .env("RABBITMQ_MNESIA_BASE", self.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", self.dir.join("log"))
            .env("RABBITMQ_PID_FILE", self.dir.join("pid"))
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                self.dir.join("enabled_plugins"),
            )
            .env("RABBITMQ_CONFIG_FILE", self.dir.join("rabbitmq"))
            .env(
                "RABBITMQ_ADVANCED_CONFIG_FILE",
                self.dir.join("advanced.config"),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("its log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("failed to start {SERVER}: {e}"));
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        while !accepts(self.port) {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!(
                    "RabbitMQ node {} exited ({status}): {}",
                    self.name,
                    self.log_tail()
                );
            }
            assert!(
                Instant::now() < deadline,
                "RabbitMQ node {} did not accept connections within {START_TIMEOUT:?}: {}",
                self.name,
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// What the node's processes and `rabbitmqctl` share: its name and cookie home.
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("RABBITMQ_NODENAME", self.name.clone()),
            ("HOME", self.dir.display().to_string()),
        ]
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("server.out")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// `amqp://guest:guest@127.0.0.1:PORT/%2f`.
    pub fn uri(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// The AMQP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id of the node's Erlang VM (its CPU and memory are the broker's).
    pub fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// `rabbitmqctl ARGS` against this node: its standard output.
    pub fn ctl(&self, args: &[&str]) -> String {
        let out = Command::new(CTL)
            .envs(self.env())
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("failed to run {CTL}: {e}"));
        assert!(
            out.status.success(),
            "rabbitmqctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Stops the node and waits for it (its data stays for [`BrokerNode::restart`]).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new(CTL)
                .envs(self.env())
                .arg("-n")
                .arg(&self.name)
                .arg("stop")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the node and starts it again with its data, on the same ports.
    pub fn restart(&mut self) {
        self.stop();
        self.boot();
    }
}

impl Drop for BrokerNode {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
