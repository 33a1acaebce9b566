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

/// What a container that runs in an image's root filesystem gets, as a real container
/// runtime gives it: its own mount namespace, the image's root, `/proc` of its PID
/// namespace, a few device nodes, the termination log at its path, the kubelet's
/// `/etc/hosts` and `/etc/resolv.conf`, and the pod's volumes at their `mountPath`.
#[derive(Clone, Debug, Default)]
pub struct RootFs {
    /// The image's root filesystem.
    pub root: std::path::PathBuf,
    /// Bind mounts: a host file or directory, and where it appears in the container.
    pub binds: Vec<(std::path::PathBuf, String)>,
    /// Working directory inside the container.
    pub working_dir: String,
}

/// Device nodes a container gets, bound from the host's.
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// The prepared system-call arguments of a [`RootFs`] (nothing is allocated between fork
/// and exec).
struct Prepared {
    root: std::ffi::CString,
    proc_dir: std::ffi::CString,
    binds: Vec<(std::ffi::CString, std::ffi::CString, bool)>,
    working_dir: std::ffi::CString,
}

impl RootFs {
    /// Creates the mount points in the root filesystem (empty files and directories, as a
    /// container runtime does) and returns the mounts to make.
    fn prepare(&self) -> std::io::Result<Prepared> {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let c = |p: &std::path::Path| {
            CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other)
        };
        let inside = |path: &str| self.root.join(path.trim_start_matches('/'));
        let mut binds = Vec::new();
        let devices = DEVICES.iter().map(|d| {
            (
                std::path::PathBuf::from(format!("/dev/{d}")),
                format!("/dev/{d}"),
            )
        });
        for (host, at) in devices.chain(self.binds.iter().cloned()) {
            if !host.exists() {
                continue;
            }
            let target = inside(&at);
            let dir = host.is_dir();
            if dir {
                std::fs::create_dir_all(&target)?;
            } else {
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                if !target.exists() {
                    std::fs::write(&target, b"")?;
                }
            }
            binds.push((c(&host)?, c(&target)?, dir));
        }
        let proc_dir = inside("/proc");
        std::fs::create_dir_all(&proc_dir)?;
        Ok(Prepared {
            root: c(&self.root)?,
            proc_dir: c(&proc_dir)?,
            binds,
            working_dir: CString::new(self.working_dir.as_bytes())
                .map_err(std::io::Error::other)?,
        })
    }
}

/// Makes `command` run in `rootfs` (see [`RootFs`]). Call after [`in_pid_namespace`], so
/// that the container's `/proc` shows its own PID namespace.
pub fn in_root_fs(command: &mut tokio::process::Command, rootfs: &RootFs) -> std::io::Result<()> {
    let prepared = rootfs.prepare()?;
    // SAFETY: enter_root_fs only makes async-signal-safe calls on prepared arguments.
    unsafe {
        command.pre_exec(move || enter_root_fs(&prepared));
    }
    Ok(())
}

fn enter_root_fs(p: &Prepared) -> std::io::Result<()> {
    use std::ptr::null;
    let check = |r: libc::c_int| {
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    // SAFETY: raw system calls between fork and exec on prepared C strings.
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS))?;
        // Nothing mounted here propagates back to the host.
        check(libc::mount(
            null(),
            c"/".as_ptr(),
            null(),
            libc::MS_REC | libc::MS_PRIVATE,
            null(),
        ))?;
        for (host, target, dir) in &p.binds {
            let flags = libc::MS_BIND | if *dir { libc::MS_REC } else { 0 };
            check(libc::mount(
                host.as_ptr(),
                target.as_ptr(),
                null(),
                flags,
                null(),
            ))?;
        }
        check(libc::mount(
            c"proc".as_ptr(),
            p.proc_dir.as_ptr(),
            c"proc".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            null(),
        ))?;
        check(libc::chroot(p.root.as_ptr()))?;
        check(libc::chdir(c"/".as_ptr()))?;
        if libc::chdir(p.working_dir.as_ptr()) != 0 {
            check(libc::chdir(c"/".as_ptr()))?;
        }
    }
    Ok(())
}
