//! Process isolation of the simulated node's containers.
//!
//! A container's command runs as PID 1 of a PID namespace of its own, as under a real
//! container runtime: when it exits or is killed, the kernel kills every process left
//! in the namespace, including those that moved to process groups or sessions of
//! their own (a test suite's background servers, a wrapper's command). Its signals
//! behave as in a real container too: PID 1 gets SIGTERM only if it handles it.
//!
//! The spawned process is a small shim that stays outside the namespace, waits for
//! the container's PID 1 and exits as it did (same code, or killed by the same
//! signal); it ignores the stop signals the kubelet sends to the process group, and
//! PID 1 is killed if the shim dies. Creating PID namespaces needs CAP_SYS_ADMIN
//! (root); without it containers run as plain process groups and [`available`] says
//! so.

use std::sync::OnceLock;

use nix::libc;

/// True when this process may give containers PID namespaces of their own.
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        let mut probe = std::process::Command::new("true");
        probe
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        // SAFETY: enter_pid_namespace only makes async-signal-safe calls.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut probe, enter_pid_namespace);
        }
        probe.status().is_ok_and(|s| s.success())
    })
}

/// Makes `command` start as PID 1 of a new PID namespace (see the module docs).
pub fn in_pid_namespace(command: &mut tokio::process::Command) {
    // SAFETY: enter_pid_namespace only makes async-signal-safe calls.
    unsafe {
        command.pre_exec(enter_pid_namespace);
    }
}

/// Runs in the forked child before exec: unshares the PID namespace and forks its
/// PID 1, which returns to exec the command; the child itself becomes the shim.
fn enter_pid_namespace() -> std::io::Result<()> {
    // SAFETY: raw system calls between fork and exec; no allocation, no locks.
    unsafe {
        if libc::unshare(libc::CLONE_NEWPID) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let init = libc::fork();
        if init < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if init == 0 {
            // PID 1 of the new namespace: it goes when the shim goes.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
            return Ok(());
        }
        shim(init)
    }
}

/// Waits for the container's PID 1 and ends the same way.
unsafe fn shim(init: libc::pid_t) -> ! {
    // SAFETY: async-signal-safe calls only (see enter_pid_namespace).
    unsafe {
        for sig in [
            libc::SIGTERM,
            libc::SIGINT,
            libc::SIGHUP,
            libc::SIGQUIT,
            libc::SIGUSR1,
            libc::SIGUSR2,
            libc::SIGPIPE,
        ] {
            libc::signal(sig, libc::SIG_IGN);
        }
        libc::signal(libc::SIGCHLD, libc::SIG_DFL);
        // Close every inherited descriptor, the spawner's exec-status pipe among them, so
        // that the spawner sees the exec of PID 1 as the exec of this process.
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
        let mut status: libc::c_int = 0;
        loop {
            let got = libc::waitpid(init, &mut status, 0);
            if got == init {
                break;
            }
            if got < 0 && *libc::__errno_location() != libc::EINTR {
                libc::_exit(127);
            }
        }
        if libc::WIFEXITED(status) {
            libc::_exit(libc::WEXITSTATUS(status));
        }
        let sig = libc::WTERMSIG(status);
        libc::signal(sig, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, sig);
        libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::kill(libc::getpid(), sig);
        libc::_exit(128 + sig)
    }
}
