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
//! PID 1 is killed if the shim dies, as the shim is when the simulator dies. Creating PID namespaces needs CAP_SYS_ADMIN
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
        // The shim goes when the simulator goes, even when it is killed outright, and
        // PID 1 (and with it the whole namespace) goes with the shim.
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
        if libc::getppid() == 1 {
            libc::_exit(137);
        }
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

/// The filesystem view of a container, as a real container runtime gives it: a mount
/// namespace of its own, the pod's volumes bind-mounted at their `mountPath` (read-only
/// where the mount says so) and, for an image the node has a root filesystem for, that
/// root as `/` with `/proc` of its PID namespace and a few device nodes. Without a root
/// filesystem the container sees this machine's filesystem with its volumes mounted on
/// top, in its own namespace only: the mount points are created here when missing (empty
/// directories and files), nothing else changes for other processes.
#[derive(Clone, Debug, Default)]
pub struct RootFs {
    /// The image's root filesystem; `None`: this machine's.
    pub root: Option<std::path::PathBuf>,
    /// Bind mounts: a host file or directory, where it appears in the container, and
    /// whether it is read-only there.
    pub binds: Vec<(std::path::PathBuf, String, bool)>,
    /// Working directory inside the container (`None`: the process's own).
    pub working_dir: Option<String>,
}

/// Device nodes a container gets, bound from the host's.
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// One prepared bind mount: source, target, directory, read-only.
type Bind = (std::ffi::CString, std::ffi::CString, bool, bool);

/// The prepared system-call arguments of a [`RootFs`] (nothing is allocated between fork
/// and exec).
struct Prepared {
    root: Option<std::ffi::CString>,
    proc_dir: Option<std::ffi::CString>,
    binds: Vec<Bind>,
    working_dir: Option<std::ffi::CString>,
}

impl RootFs {
    /// Creates the mount points (empty files and directories, as a container runtime
    /// does) and returns the mounts to make, parents before what they hold.
    fn prepare(&self) -> std::io::Result<Prepared> {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let c = |p: &std::path::Path| {
            CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other)
        };
        let inside = |path: &str| match &self.root {
            Some(root) => root.join(path.trim_start_matches('/')),
            None => std::path::PathBuf::from(path),
        };
        let mut wanted: Vec<(std::path::PathBuf, String, bool)> = Vec::new();
        if self.root.is_some() {
            wanted.extend(DEVICES.iter().map(|d| {
                (
                    std::path::PathBuf::from(format!("/dev/{d}")),
                    format!("/dev/{d}"),
                    false,
                )
            }));
        }
        let mut binds_sorted = self.binds.clone();
        binds_sorted.sort_by_key(|(_, at, _)| at.trim_end_matches('/').matches('/').count());
        wanted.extend(binds_sorted);
        let mut binds = Vec::new();
        for (host, at, read_only) in wanted {
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
            binds.push((c(&host)?, c(&target)?, dir, read_only));
        }
        let proc_dir = match &self.root {
            Some(_) => {
                let proc_dir = inside("/proc");
                std::fs::create_dir_all(&proc_dir)?;
                Some(c(&proc_dir)?)
            }
            None => None,
        };
        Ok(Prepared {
            root: self.root.as_deref().map(c).transpose()?,
            proc_dir,
            binds,
            working_dir: self
                .working_dir
                .as_ref()
                .map(|w| CString::new(w.as_bytes()).map_err(std::io::Error::other))
                .transpose()?,
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

fn check(r: libc::c_int) -> std::io::Result<()> {
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn enter_root_fs(p: &Prepared) -> std::io::Result<()> {
    use std::ptr::null;
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
        for (host, target, dir, read_only) in &p.binds {
            let flags = libc::MS_BIND | if *dir { libc::MS_REC } else { 0 };
            check(libc::mount(
                host.as_ptr(),
                target.as_ptr(),
                null(),
                flags,
                null(),
            ))?;
            if *read_only {
                check(libc::mount(
                    null(),
                    target.as_ptr(),
                    null(),
                    libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                    null(),
                ))?;
            }
        }
        if let Some(proc_dir) = &p.proc_dir {
            check(libc::mount(
                c"proc".as_ptr(),
                proc_dir.as_ptr(),
                c"proc".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                null(),
            ))?;
        }
        if let Some(root) = &p.root {
            check(libc::chroot(root.as_ptr()))?;
            check(libc::chdir(c"/".as_ptr()))?;
        }
        if let Some(dir) = &p.working_dir
            && libc::chdir(dir.as_ptr()) != 0
            && p.root.is_some()
        {
            check(libc::chdir(c"/".as_ptr()))?;
        }
    }
    Ok(())
}

/// The identity a container's process runs as (`runAsUser`, `runAsGroup`,
/// `supplementalGroups`, `allowPrivilegeEscalation: false`).
#[derive(Clone, Debug, Default)]
pub struct Identity {
    /// User id; `None`: stay root.
    pub uid: Option<u32>,
    /// Group id; `None`: the user id's (0 when running as root).
    pub gid: Option<u32>,
    /// Supplementary groups.
    pub groups: Vec<u32>,
    /// Set `no_new_privs`: no setuid binary or file capability raises privileges.
    pub no_new_privs: bool,
}

/// Makes `command` switch to `identity` just before exec. Call last, after the
/// namespaces and mounts (which need root).
pub fn as_identity(command: &mut tokio::process::Command, identity: &Identity) {
    let identity = identity.clone();
    let groups: Vec<libc::gid_t> = identity.groups.clone();
    // SAFETY: only async-signal-safe system calls on prepared values.
    unsafe {
        command.pre_exec(move || {
            if identity.uid.is_some() || identity.gid.is_some() {
                let gid = identity.gid.or(identity.uid).unwrap_or(0);
                check(libc::setgroups(groups.len(), groups.as_ptr()))?;
                check(libc::setgid(gid))?;
            }
            if let Some(uid) = identity.uid {
                check(libc::setuid(uid))?;
            }
            if identity.no_new_privs {
                check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
            }
            // A change of credentials clears the parent-death signal: set it again, so
            // that the container's PID 1 still goes with its shim.
            if identity.uid.is_some() || identity.gid.is_some() {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
            }
            Ok(())
        });
    }
}

/// A network namespace of a pod's own, with its loopback up, and TCP forwarders that make
/// some of this machine's loopback services (the API server, the broker) reachable
/// at the same address inside it, as Services are in a cluster.
pub struct NetNs {
    fd: std::os::fd::OwnedFd,
    forwarders: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for NetNs {
    fn drop(&mut self) {
        for f in &self.forwarders {
            f.abort();
        }
    }
}

/// Runs `f` on a thread of its own inside the network namespace `fd`.
fn in_netns<T: Send + 'static>(
    fd: Option<std::os::fd::RawFd>,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    std::thread::spawn(move || {
        match fd {
            // SAFETY: setns on a namespace descriptor this thread only reads.
            Some(fd) => check(unsafe { libc::setns(fd, libc::CLONE_NEWNET) })?,
            // SAFETY: unshare affects this thread only.
            None => check(unsafe { libc::unshare(libc::CLONE_NEWNET) })?,
        }
        f()
    })
    .join()
    .map_err(|_| std::io::Error::other("the network namespace thread panicked"))?
}

impl NetNs {
    /// A new network namespace with `lo` up and `forward` (loopback addresses of this
    /// machine) reachable inside it. Needs root and a Tokio runtime.
    pub fn new(forward: &[std::net::SocketAddr]) -> std::io::Result<Self> {
        let forward_to = forward.to_vec();
        let (fd, listeners) = in_netns(None, move || {
            // SAFETY: an ioctl on a socket of this namespace with a zeroed ifreq.
            unsafe {
                let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
                if sock < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let mut req: libc::ifreq = std::mem::zeroed();
                for (i, b) in b"lo".iter().enumerate() {
                    req.ifr_name[i] = *b as libc::c_char;
                }
                let up = libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req) == 0 && {
                    req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
                    libc::ioctl(sock, libc::SIOCSIFFLAGS, &req) == 0
                };
                let err = std::io::Error::last_os_error();
                libc::close(sock);
                if !up {
                    return Err(err);
                }
            }
            let ns = std::fs::File::open("/proc/thread-self/ns/net")?;
            let mut listeners = Vec::new();
            for addr in &forward_to {
                let l = std::net::TcpListener::bind(addr)?;
                l.set_nonblocking(true)?;
                listeners.push((*addr, l));
            }
            Ok((std::os::fd::OwnedFd::from(ns), listeners))
        })?;
        let mut forwarders = Vec::new();
        for (addr, l) in listeners {
            let l = tokio::net::TcpListener::from_std(l)?;
            forwarders.push(tokio::spawn(async move {
                while let Ok((mut inside, _)) = l.accept().await {
                    tokio::spawn(async move {
                        if let Ok(mut outside) = tokio::net::TcpStream::connect(addr).await {
                            let _ = tokio::io::copy_bidirectional(&mut inside, &mut outside).await;
                        }
                    });
                }
            }));
        }
        Ok(Self { fd, forwarders })
    }

    /// Makes `command` join this namespace. Call first: joining needs root.
    pub fn enter(&self, command: &mut tokio::process::Command) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        // The child gets a descriptor of its own that survives until exec.
        let fd = nix_dup(self.fd.as_raw_fd())?;
        // SAFETY: setns is async-signal-safe; the descriptor stays open in the child.
        unsafe {
            command.pre_exec(move || check(libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET)));
        }
        Ok(())
    }

    /// Runs blocking `f` on a thread inside this namespace (a probe's connection).
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
    ) -> std::io::Result<T> {
        use std::os::fd::AsRawFd;
        let fd = std::sync::Arc::new(nix_dup(self.fd.as_raw_fd())?);
        let raw = fd.as_raw_fd();
        tokio::task::spawn_blocking(move || {
            let _keep = fd;
            in_netns(Some(raw), f)
        })
        .await
        .map_err(std::io::Error::other)?
    }
}

/// A close-on-exec duplicate of `fd`.
fn nix_dup(fd: std::os::fd::RawFd) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor we own.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `new` is a fresh descriptor.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(new) })
}
