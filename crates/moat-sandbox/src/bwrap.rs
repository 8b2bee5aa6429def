//! The `bwrap` backend: bubblewrap namespaces, moat's seccomp filters, cgroup
//! membership and rlimits, with `moat-init` as PID 1 inside.
//!
//! Invariants of every instance started here:
//! - all namespaces are unshared (user, pid, net, ipc, uts, cgroup), further user
//!   namespaces are disabled, and the net namespace has only loopback;
//! - the process tree runs as the lease's unprivileged host uid (bwrap itself is
//!   started under it when moat runs as root), with no capabilities and
//!   `no_new_privs`;
//! - the root is a read-only tmpfs holding read-only system directories, a short
//!   allowlist of /etc files, fresh /proc and minimal, read-only /dev; only the
//!   lease's places (also at /dev/shm) and `rw` mounts are writable;
//! - the process joins the lease's cgroup *before* exec, so nothing ever runs
//!   outside the limits;
//! - killing the instance kills bwrap, whose child (PID 1 of the namespace) dies
//!   with it, and with it every process in the namespace.

use std::io::{IoSlice, Read};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::socket::{
    recv, sendmsg, socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType,
};

use crate::backend::{Backend, ChildStdio, CommandLine, Ended, Instance, LeaseEnv};
use crate::error::{Result, SandboxError};
use crate::image::SystemEntry;
use crate::proto::{Reply, RunRequest};
use crate::seccomp;
use crate::storage::{SANDBOX_UID, UID_BASE};

pub const BWRAP: &str = "bwrap";

/// /etc entries a sandbox may read: what libc, TLS, shells and interpreters
/// need. Everything else of the host's /etc (shadow, ssh keys, moat's own
/// config) stays out.
pub(crate) const ETC_ALLOWLIST: &[&str] = &[
    "alternatives",
    "bash.bashrc",
    "ca-certificates",
    "ca-certificates.conf",
    "debian_version",
    "gai.conf",
    "host.conf",
    "inputrc",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "magic",
    "magic.mime",
    "mime.types",
    "nsswitch.conf",
    "os-release",
    "perl",
    "profile",
    "profile.d",
    "protocols",
    "python3",
    "python3.11",
    "services",
    "ssl",
    "terminfo",
    "timezone",
    "xdg",
];

/// Top-level system entries bound read-only (or recreated as symlinks).
pub(crate) const SYSTEM_DIRS: &[&str] = &["usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"];

/// Capabilities a `root_inside` sandbox keeps inside its user namespace.
pub const ROOT_INSIDE_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_SETUID",
    "CAP_SETGID",
    "CAP_KILL",
];

pub struct BwrapBackend;

fn arg_path(args: &mut Vec<String>, flag: &str, a: &Path, b: &Path) {
    args.push(flag.into());
    args.push(a.to_string_lossy().into_owned());
    args.push(b.to_string_lossy().into_owned());
}

/// The bwrap command line for a lease (without the program name).
pub fn bwrap_args(env: &LeaseEnv) -> Vec<String> {
    let mut a: Vec<String> = [
        "--unshare-user",
        "--unshare-ipc",
        "--unshare-pid",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--disable-userns",
        "--die-with-parent",
        "--new-session",
        "--as-pid-1",
        "--hostname",
        "moat",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    debug_assert_eq!(SANDBOX_UID, 1000);
    if env.root_inside {
        // uid 0 of the sandbox's own user namespace (the lease's uid
        // outside), with the capabilities a package manager needs over the
        // files it owns there, and nothing for mounts, namespaces, modules,
        // ptrace, raw network or devices (seccomp refuses those calls anyway).
        a.extend(["--uid", "0", "--gid", "0"].map(String::from));
        for cap in ROOT_INSIDE_CAPS {
            a.extend(["--cap-add".to_string(), cap.to_string()]);
        }
    } else {
        a.extend(["--uid", "1000", "--gid", "1000"].map(String::from));
    }
    // With a door, the sandbox joins the door's network namespace (moat enters
    // it before exec); without one, bwrap makes a new, empty one.
    if env.netns.is_none() {
        a.push("--unshare-net".into());
    }
    let system = crate::image::system_entries(env.image.as_deref(), env.root_inside);
    let dir_flag = if env.root_inside {
        "--bind"
    } else {
        "--ro-bind"
    };
    let mut own_etc = false;
    for e in system {
        match e {
            SystemEntry::Link { name, target } => {
                arg_path(&mut a, "--symlink", &target, &Path::new("/").join(name))
            }
            SystemEntry::Dir { name, host } => {
                own_etc |= name == "etc";
                arg_path(&mut a, dir_flag, &host, &Path::new("/").join(name))
            }
        }
    }
    // One bind for /etc: the engine's prepared copy of the allowlist plus the
    // synthetic passwd, group and hosts (one mount instead of thirty); a
    // root_inside lease has its image's own /etc in its writable layer.
    if !own_etc {
        arg_path(&mut a, "--ro-bind", &env.etc, Path::new("/etc"));
    }
    a.extend(["--proc", "/proc", "--dev", "/dev"].map(String::from));
    // bwrap's /dev is a writable tmpfs outside the lease's disk quota: make it
    // read-only, and let /dev/shm be the lease's /tmp (inside the quota).
    arg_path(&mut a, "--bind", &env.tmp, Path::new("/dev/shm"));
    a.extend(["--remount-ro", "/dev"].map(String::from));
    arg_path(
        &mut a,
        "--ro-bind",
        &env.init_path,
        Path::new("/run/moat/init"),
    );
    arg_path(&mut a, "--bind", &env.workspace, Path::new("/workspace"));
    arg_path(&mut a, "--bind", &env.home, Path::new("/home/agent"));
    arg_path(&mut a, "--bind", &env.tmp, Path::new("/tmp"));
    for m in &env.mounts {
        let flag = if m.writable { "--bind" } else { "--ro-bind" };
        arg_path(&mut a, flag, &m.host, &m.sandbox);
    }
    for (host, inside) in &env.protected {
        arg_path(&mut a, "--ro-bind", host, inside);
    }
    if env.image.is_some() {
        // The image's libc may not be the one moat-init was built against:
        // it runs with the host's loader and libraries, bound under
        // /run/moat/lib (the commands it starts use the image's own).
        // moat's own binaries handed in under /run/moat/bin (the built-in
        // agent's moat) run the same way: their libraries join moat-init's.
        let mut deps = init_dependencies(&env.init_path);
        for (host, inside) in &env.protected {
            if inside.starts_with(MOAT_BIN) {
                for d in dependencies(host, false) {
                    if !deps
                        .iter()
                        .any(|x| x.name == d.name || (x.loader && d.loader))
                    {
                        deps.push(d);
                    }
                }
            }
        }
        for d in &deps {
            let at = if d.loader {
                Path::new(INIT_LOADER).to_path_buf()
            } else {
                Path::new(INIT_LIBS).join(&d.name)
            };
            arg_path(&mut a, "--ro-bind", &d.host, &at);
        }
    }
    a.extend(
        [
            "--remount-ro",
            "/",
            "--chdir",
            "/workspace",
            "--add-seccomp-fd",
            "4",
            "--add-seccomp-fd",
            "5",
        ]
        .map(String::from),
    );
    if env.image.is_some() && init_dependencies(&env.init_path).iter().any(|d| d.loader) {
        a.extend([INIT_LOADER, "--library-path", INIT_LIBS].map(String::from));
    }
    a.push("/run/moat/init".into());
    a
}

/// For a backend without moat-init (gVisor) on an image: the host's loader
/// and the libraries of moat's own binaries under /run/moat/bin, as (host
/// file, place inside). Empty without an image.
pub(crate) fn moat_bin_libraries(env: &LeaseEnv) -> Vec<(std::path::PathBuf, std::path::PathBuf)> {
    if env.image.is_none() {
        return Vec::new();
    }
    let mut deps: Vec<InitDep> = Vec::new();
    for (host, inside) in &env.protected {
        if inside.starts_with(MOAT_BIN) {
            for d in dependencies(host, false) {
                if !deps
                    .iter()
                    .any(|x| x.name == d.name || (x.loader && d.loader))
                {
                    deps.push(d);
                }
            }
        }
    }
    deps.into_iter()
        .map(|d| {
            let at = if d.loader {
                Path::new(INIT_LOADER).to_path_buf()
            } else {
                Path::new(INIT_LIBS).join(&d.name)
            };
            (d.host, at)
        })
        .collect()
}

/// Where moat-init's own libraries are bound when the root is an image.
const INIT_LIBS: &str = "/run/moat/lib";
/// Where moat's own binaries for the sandbox are bound (door files).
const MOAT_BIN: &str = "/run/moat/bin/";
const INIT_LOADER: &str = "/run/moat/lib/ld.so";

/// One shared object moat-init needs.
#[derive(Debug, Clone)]
struct InitDep {
    /// The name it is looked up by (`libc.so.6`).
    name: String,
    /// The real file on the host.
    host: std::path::PathBuf,
    loader: bool,
}

/// moat-init's shared libraries and loader on the host, from `ldd` once per
/// installed copy of moat-init (kept beside it as `<init>.deps`, which only
/// root writes, and computed again when a library it names is gone).
fn init_dependencies(init: &Path) -> Vec<InitDep> {
    dependencies(init, true)
}

/// `ldd`'s answer for `bin` (only ever moat's own binaries: ldd may run
/// the program's loader), cached in memory; kept beside it as
/// `<bin>.deps` only when `persist` (moat's installed moat-init, in a
/// directory of root's; never beside a binary moat does not own).
fn dependencies(bin: &Path, persist: bool) -> Vec<InitDep> {
    let init = bin;
    type Cache = Vec<(std::path::PathBuf, Vec<InitDep>)>;
    static CACHE: std::sync::Mutex<Cache> = std::sync::Mutex::new(Vec::new());
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, deps)) = cache.iter().find(|(p, _)| p == init) {
        return deps.clone();
    }
    let saved = init.with_extension("deps");
    let parse = |text: &str| -> Option<Vec<InitDep>> {
        text.lines()
            .map(|l| {
                let mut f = l.splitn(3, '\t');
                let (name, kind, host) = (f.next()?, f.next()?, f.next()?);
                let host = std::path::PathBuf::from(host);
                host.is_file().then(|| InitDep {
                    name: name.to_string(),
                    host,
                    loader: kind == "loader",
                })
            })
            .collect()
    };
    let deps = match persist
        .then(|| std::fs::read_to_string(&saved).ok())
        .flatten()
        .and_then(|t| parse(&t))
    {
        Some(d) if !d.is_empty() => d,
        _ if !persist => ldd(init),
        _ => {
            let d = ldd(init);
            let text: String = d
                .iter()
                .map(|x| {
                    let kind = if x.loader { "loader" } else { "lib" };
                    format!("{}\t{kind}\t{}\n", x.name, x.host.display())
                })
                .collect();
            let tmp = saved.with_extension(format!("deps.{:x}", crate::storage::random_u64()));
            if std::fs::write(&tmp, text).is_ok() && std::fs::rename(&tmp, &saved).is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            d
        }
    };
    cache.push((init.to_path_buf(), deps.clone()));
    deps
}

fn ldd(init: &Path) -> Vec<InitDep> {
    let text = Command::new("ldd")
        .arg(init)
        .env_clear()
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let path = l.split_whitespace().find(|w| w.starts_with('/'))?;
            let host = std::fs::canonicalize(path).ok()?;
            let name = Path::new(path).file_name()?.to_str()?.to_string();
            let loader = !l.contains("=>");
            Some(InitDep { name, host, loader })
        })
        .collect()
}

/// `argv`, started through the host's loader when it names one of moat's
/// own binaries and the root is an image.
pub(crate) fn through_host_loader(host_loader: bool, argv: &[String]) -> Vec<String> {
    match argv.first() {
        Some(prog) if host_loader && prog.starts_with(MOAT_BIN) && !prog.contains("/../") => {
            let mut out: Vec<String> = [INIT_LOADER, "--library-path", INIT_LIBS]
                .map(String::from)
                .to_vec();
            out.extend(argv.iter().cloned());
            out
        }
        _ => argv.to_vec(),
    }
}

fn filter_pipe(bytes: &[u8]) -> Result<OwnedFd> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| SandboxError::io("creating seccomp pipe", std::io::Error::from(e)))?;
    if bytes.len() > 60 * 1024 {
        return Err(SandboxError::Start(
            "seccomp program too large for a pipe".into(),
        ));
    }
    nix::unistd::write(&w, bytes)
        .map_err(|e| SandboxError::io("writing seccomp program", std::io::Error::from(e)))?;
    Ok(r)
}

fn dup_high(fd: RawFd) -> Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor we then own.
    let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100) };
    if n < 0 {
        return Err(SandboxError::io(
            "duplicating descriptor",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: n is a fresh descriptor returned by fcntl.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

fn wait_readable(fd: RawFd, timeout: Duration) -> bool {
    let mut pfd = [libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }];
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: poll on one valid pollfd.
    unsafe { libc::poll(pfd.as_mut_ptr(), 1, ms) > 0 }
}

/// Reads one reply; `None` on EOF, error or nonsense (all treated as broken).
fn read_reply(fd: RawFd) -> Option<Reply> {
    let mut buf = [0u8; 16];
    match recv(fd, &mut buf, MsgFlags::MSG_DONTWAIT) {
        Ok(n) if n > 0 => Reply::decode(&buf[..n]),
        _ => None,
    }
}

impl Backend for BwrapBackend {
    fn name(&self) -> &'static str {
        "bwrap"
    }

    fn needs_socket_proof_views(&self) -> bool {
        true
    }

    fn start(&self, env: &LeaseEnv, cgroup_procs: &[OwnedFd]) -> Result<Box<dyn Instance>> {
        let deny = seccomp::to_bytes(&seccomp::deny_filter(&env.policy.extra_denied_syscalls)?);
        let clone3 = seccomp::to_bytes(&seccomp::enosys_filter()?);
        let (host_end, sandbox_end) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| SandboxError::io("creating control socket", std::io::Error::from(e)))?;
        let ctl = dup_high(sandbox_end.as_raw_fd())?;
        let f1 = dup_high(filter_pipe(&deny)?.as_raw_fd())?;
        let f2 = dup_high(filter_pipe(&clone3)?.as_raw_fd())?;
        drop(sandbox_end);

        let procs: Vec<RawFd> = cgroup_procs.iter().map(|f| f.as_raw_fd()).collect();
        let netns: RawFd = env.netns.as_ref().map(|f| f.as_raw_fd()).unwrap_or(-1);
        let (ctl_raw, f1_raw, f2_raw) = (ctl.as_raw_fd(), f1.as_raw_fd(), f2.as_raw_fd());
        let limits = env.policy.limits.clone();
        // SAFETY: geteuid has no preconditions.
        let as_root = unsafe { libc::geteuid() } == 0;
        let uid = env.host_uid;
        if as_root && uid == 0 {
            return Err(SandboxError::Refused(
                "refusing to run a sandbox as host uid 0".into(),
            ));
        }
        let moat_uid = uid >= UID_BASE;

        let mut cmd = Command::new(BWRAP);
        cmd.args(bwrap_args(env))
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: the closure only makes async-signal-safe system calls on
        // descriptors and values prepared before fork; it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                let check = |r: libc::c_int| {
                    if r < 0 {
                        Err(std::io::Error::last_os_error())
                    } else {
                        Ok(())
                    }
                };
                // Join the cgroup first: the dup2 calls below may reuse the
                // numbers of the cgroup.procs descriptors.
                for fd in &procs {
                    if libc::write(*fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if netns >= 0 {
                    // The door's namespace: loopback with the door's listeners only.
                    check(libc::setns(netns, libc::CLONE_NEWNET))?;
                }
                check(libc::dup2(ctl_raw, 3))?;
                check(libc::dup2(f1_raw, 4))?;
                check(libc::dup2(f2_raw, 5))?;
                let set = |res, v: u64| {
                    let lim = libc::rlimit {
                        rlim_cur: v,
                        rlim_max: v,
                    };
                    check(libc::setrlimit(res, &lim))
                };
                set(libc::RLIMIT_CORE, 0)?;
                set(libc::RLIMIT_NOFILE, limits.open_files as u64)?;
                set(libc::RLIMIT_FSIZE, limits.disk.bytes())?;
                if as_root {
                    if moat_uid {
                        set(libc::RLIMIT_NPROC, limits.pids as u64 + 16)?;
                    }
                    check(libc::setgroups(0, std::ptr::null()))?;
                    check(libc::setresgid(uid, uid, uid))?;
                    check(libc::setresuid(uid, uid, uid))?;
                }
                check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0))?;
                Ok(())
            });
        }
        // Forked from a thread that outlives this call: the parent-death
        // signal must follow moat, not the thread that happened to start the lease.
        let child = crate::spawner::spawn(cmd).map_err(|e| {
            SandboxError::Start(format!(
                "cannot run {BWRAP}: {e} (install bubblewrap: apt-get install bubblewrap, or run `moat doctor`)"
            ))
        })?;
        drop((ctl, f1, f2));

        let mut inst = BwrapInstance {
            child: Some(child),
            ctl: host_end,
            dead: false,
            host_loader: env.image.is_some()
                && init_dependencies(&env.init_path).iter().any(|d| d.loader),
        };
        // moat-init says hello once it runs; EOF means bwrap failed (its stderr says why).
        if !wait_readable(inst.ctl.as_raw_fd(), Duration::from_secs(10)) {
            inst.kill_all();
            return Err(SandboxError::Start(
                "the sandbox did not start within 10 s".into(),
            ));
        }
        match read_reply(inst.ctl.as_raw_fd()) {
            Some(Reply::Hello) => Ok(Box::new(inst)),
            _ => {
                let msg = inst.failure_text();
                inst.kill_all();
                Err(SandboxError::Start(msg))
            }
        }
    }
}

pub struct BwrapInstance {
    child: Option<Child>,
    ctl: OwnedFd,
    dead: bool,
    /// On an image: moat's binaries under /run/moat/bin start through the
    /// host's loader at /run/moat/lib (the image's libc may differ).
    host_loader: bool,
}

impl BwrapInstance {
    /// bwrap's own error message, once it has exited.
    fn failure_text(&mut self) -> String {
        let mut text = String::new();
        if let Some(child) = self.child.as_mut() {
            let _ = child.wait();
            if let Some(mut err) = child.stderr.take() {
                let _ = err.read_to_string(&mut text);
            }
        }
        let text = text.trim();
        if text.is_empty() {
            "bwrap exited before the sandbox was ready".into()
        } else {
            format!(
                "bwrap: {}",
                text.lines()
                    .last()
                    .unwrap_or(text)
                    .trim_start_matches("bwrap: ")
            )
        }
    }
}

impl Instance for BwrapInstance {
    fn start_command(&mut self, cmd: &CommandLine, stdio: ChildStdio) -> Result<Option<Ended>> {
        let req = RunRequest {
            argv: through_host_loader(self.host_loader, &cmd.argv)
                .iter()
                .map(|s| s.as_bytes().to_vec())
                .collect(),
            env: cmd
                .env
                .iter()
                .map(|(k, v)| format!("{k}={v}").into_bytes())
                .collect(),
            cwd: cmd.cwd.as_bytes().to_vec(),
        };
        let bytes = req.encode().ok_or_else(|| {
            SandboxError::Refused(
                "the command line or environment is too long or contains a NUL byte".into(),
            )
        })?;
        let fds = [
            stdio.stdin.as_raw_fd(),
            stdio.stdout.as_raw_fd(),
            stdio.stderr.as_raw_fd(),
        ];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        sendmsg::<()>(
            self.ctl.as_raw_fd(),
            &[IoSlice::new(&bytes)],
            &cmsg,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(|e| {
            self.dead = true;
            SandboxError::Broken(format!("sending the command to the sandbox: {e}"))
        })?;
        drop(stdio);
        if !wait_readable(self.ctl.as_raw_fd(), Duration::from_secs(10)) {
            self.dead = true;
            return Err(SandboxError::Broken(
                "the sandbox did not start the command".into(),
            ));
        }
        match read_reply(self.ctl.as_raw_fd()) {
            Some(Reply::Started(_)) => Ok(None),
            Some(Reply::ExecFailed(errno)) => Ok(Some(Ended::ExecFailed(errno))),
            _ => {
                self.dead = true;
                Err(SandboxError::Broken(
                    "the sandbox's init answered nonsense or exited".into(),
                ))
            }
        }
    }

    fn status_fd(&self) -> RawFd {
        self.ctl.as_fd().as_raw_fd()
    }

    fn poll_ended(&mut self) -> Result<Option<Ended>> {
        match read_reply(self.ctl.as_raw_fd()) {
            Some(Reply::Exited(c)) => Ok(Some(Ended::Exited(c))),
            Some(Reply::Signaled(s)) => Ok(Some(Ended::Signaled(s))),
            _ => {
                self.dead = true;
                Ok(Some(Ended::InstanceDied))
            }
        }
    }

    fn kill_all(&mut self) {
        self.dead = true;
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn is_alive(&mut self) -> bool {
        if self.dead {
            return false;
        }
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => true,
            _ => {
                self.dead = true;
                false
            }
        }
    }

    fn host_pids(&self) -> Vec<u32> {
        self.child.iter().map(|c| c.id()).collect()
    }
}

impl Drop for BwrapInstance {
    fn drop(&mut self) {
        self.kill_all();
    }
}
