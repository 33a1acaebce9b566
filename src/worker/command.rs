//! The test command of one ticket, run as a child of the wrapper: its own process group
//! (stopping it reaches its children), the ticket body on stdin, the ticket's variables in
//! its environment and never the broker URI.

use std::ffi::OsString;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::io::AsyncWriteExt;

use super::{ENV_AMQP_URI, Exit};

/// How long a stopped command gets between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// A running command.
pub struct Running {
    child: tokio::process::Child,
    pgid: Option<i32>,
}

impl Running {
    /// Starts `argv` with `env` added to the inherited environment and `body` on stdin.
    /// The error names the program.
    pub fn start(
        argv: &[OsString],
        env: Vec<(String, String)>,
        body: Vec<u8>,
    ) -> Result<Self, String> {
        let program = &argv[0];
        let mut command = tokio::process::Command::new(program);
        command
            .args(&argv[1..])
            .env_remove(ENV_AMQP_URI)
            .envs(env)
            .stdin(Stdio::piped())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .process_group(0);
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start command {}: {e}", program.to_string_lossy()))?;
        let pgid = child.id().and_then(|p| i32::try_from(p).ok());
        if let Some(mut stdin) = child.stdin.take() {
            // The command may exit without reading it all: a broken pipe is fine.
            tokio::spawn(async move {
                let _ = stdin.write_all(&body).await;
                let _ = stdin.shutdown().await;
            });
        }
        Ok(Self { child, pgid })
    }

    /// Waits for the command to end (cancel-safe) and reaps what it left behind.
    pub async fn wait(&mut self) -> Exit {
        let status = self.child.wait().await;
        reap_orphans();
        match status {
            Ok(s) => Exit::from_status(s),
            Err(e) => {
                tracing::error!(error = %e, "cannot wait for the command");
                Exit::Code(255)
            }
        }
    }

    /// Sends `sig` to the command's process group.
    pub fn signal(&self, sig: Signal) {
        signal_group(self.pgid, sig);
    }

    /// Stops the command: SIGTERM, [`STOP_GRACE`], then SIGKILL.
    pub async fn stop(mut self) {
        self.signal(Signal::SIGTERM);
        if tokio::time::timeout(STOP_GRACE, self.child.wait())
            .await
            .is_err()
        {
            self.signal(Signal::SIGKILL);
            let _ = self.child.wait().await;
        }
        reap_orphans();
    }
}

/// As PID 1 of a container the wrapper inherits the orphans of the commands it runs;
/// reap those that have exited. Called only when no command of its own is running, so it
/// never takes the status of a child it waits for.
pub fn reap_orphans() {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    if std::process::id() != 1 {
        return;
    }
    while let Ok(status) = waitpid(nix::unistd::Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
        if status == WaitStatus::StillAlive {
            break;
        }
    }
}

/// Sends `sig` to the process group `pgid`; a group already gone is fine.
fn signal_group(pgid: Option<i32>, sig: Signal) {
    if let Some(pgid) = pgid.filter(|p| *p > 1) {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), sig);
    }
}
