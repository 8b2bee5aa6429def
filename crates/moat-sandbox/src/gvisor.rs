//! The `gvisor` backend: every command is one OCI container run by gVisor's
//! `runsc`, whose user-space kernel (the sentry) stands between the agent and
//! the host kernel. docs/gvisor.md describes what it enforces and how it differs
//! from bwrap, with measurements.
//!
//! Invariants of every container started here:
//! - the spec is built by [`base_spec`] only: process uid/gid 1000, every
//!   capability set empty, `noNewPrivileges`, rlimits (core 0, nofile, fsize,
//!   nproc), the environment exactly the command's, pid/ipc/uts/mount/user
//!   namespaces, moat's deny list as the OCI seccomp section (`--oci-seccomp`);
//! - the network is an empty namespace of its own (`--network=none`), or with
//!   an egress door the door's namespace, which holds loopback and the door;
//! - the root is a read-only skeleton directory of moat's own (never the host's
//!   `/`), with read-only binds of the system directories and the prepared /etc,
//!   and read-write binds of the lease's places and `rw` mounts only;
//! - runsc's gofer and sandbox run in a user namespace mapping only host root
//!   and the lease's host uid (seen inside as 1000), so files the agent creates
//!   belong to the lease's uid on the host;
//! - the `runsc run` process joins the lease's cgroup *before* exec, so the
//!   sentry, the gofer and every host process they start are inside the limits;
//! - killing the instance kills `runsc run` and every host process under it,
//!   waits until they are gone, deletes runsc's state of the container and
//!   removes the bundle and the skeleton.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::{self, File};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Component, Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moat_policy::Limits;
use oci_spec::runtime::{
    Arch, LinuxBuilder, LinuxCapabilities, LinuxCpuBuilder, LinuxIdMappingBuilder,
    LinuxMemoryBuilder, LinuxNamespaceBuilder, LinuxNamespaceType, LinuxPidsBuilder,
    LinuxResourcesBuilder, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArgBuilder,
    LinuxSeccompBuilder, LinuxSeccompOperator, LinuxSyscallBuilder, Mount, MountBuilder,
    PosixRlimitBuilder, PosixRlimitType, ProcessBuilder, RootBuilder, Spec, SpecBuilder,
    UserBuilder,
};

use crate::backend::{Backend, ChildStdio, CommandLine, Ended, Instance, LeaseEnv};
use crate::cgroup::CgroupLimits;
use crate::error::{Result, SandboxError};
use crate::image::SystemEntry;
use crate::seccomp::{self, ArgTest};
use crate::storage::{random_u64, SANDBOX_UID};
use crate::EngineConfig;

pub const RUNSC: &str = "runsc";

/// How long runsc's helper commands (`delete`) and the processes of a killed
/// container may take before moat stops waiting.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// A place in the container's mount table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Source {
    /// A host file or directory bound in.
    Bind { host: PathBuf, writable: bool },
    /// A fresh /proc of the sentry.
    Proc,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Place {
    pub dest: PathBuf,
    pub source: Source,
}

fn bind(host: &Path, dest: &str, writable: bool) -> Place {
    Place {
        dest: PathBuf::from(dest),
        source: Source::Bind {
            host: host.to_path_buf(),
            writable,
        },
    }
}

/// The mount table of a lease, in mount order (later entries cover earlier
/// ones), mirroring `bwrap_args`: system directories and /etc read-only, a
/// fresh /proc, the lease's places read-write (its /tmp also at /dev/shm), the
/// policy's mounts, then the protected paths read-only over everything.
/// Top-level symlinks (`/bin -> usr/bin`) are made in the skeleton instead.
pub(crate) fn places(env: &LeaseEnv) -> Vec<Place> {
    let mut out = Vec::new();
    for e in crate::image::system_entries(env.image.as_deref(), false) {
        if let SystemEntry::Dir { name, host } = e {
            out.push(bind(&host, &format!("/{name}"), false));
        }
    }
    out.push(bind(&env.etc, "/etc", false));
    out.push(Place {
        dest: PathBuf::from("/proc"),
        source: Source::Proc,
    });
    out.push(bind(&env.workspace, "/workspace", true));
    out.push(bind(&env.home, "/home/agent", true));
    out.push(bind(&env.tmp, "/tmp", true));
    out.push(bind(&env.tmp, "/dev/shm", true));
    for m in &env.mounts {
        out.push(Place {
            dest: m.sandbox.clone(),
            source: Source::Bind {
                host: m.host.clone(),
                writable: m.writable,
            },
        });
    }
    for (host, inside) in &env.protected {
        out.push(Place {
            dest: inside.clone(),
            source: Source::Bind {
                host: host.clone(),
                writable: false,
            },
        });
    }
    // On an image, moat's own binaries start through the host's loader.
    for (host, inside) in crate::bwrap::moat_bin_libraries(env) {
        out.push(bind(&host, &inside.to_string_lossy(), false));
    }
    out
}

/// Places whose mount point lies on gVisor's own file systems (its /dev and
/// /sys), not in the skeleton.
fn on_sentry_fs(dest: &Path) -> bool {
    dest.starts_with("/dev") || dest.starts_with("/sys")
}

fn mkdir_0755(p: &Path) -> std::io::Result<()> {
    fs::DirBuilder::new().recursive(true).mode(0o755).create(p)
}

/// Builds the read-only skeleton the container sees as `/`: the top-level
/// symlinks of the host's system directories, and a mount point for every
/// place that does not lie inside another bind (gVisor makes those itself).
fn build_root(root: &Path, image: Option<&Path>, places: &[Place]) -> Result<()> {
    let io = |what: &str, p: &Path, e: std::io::Error| {
        SandboxError::io(format!("{what} {}", p.display()), e)
    };
    mkdir_0755(root).map_err(|e| io("creating", root, e))?;
    for d in ["dev", "sys", "proc"] {
        mkdir_0755(&root.join(d)).map_err(|e| io("creating", &root.join(d), e))?;
    }
    for e in crate::image::system_entries(image, false) {
        if let SystemEntry::Link { name, target } = e {
            std::os::unix::fs::symlink(&target, root.join(&name))
                .map_err(|e| io("creating", &root.join(&name), e))?;
        }
    }
    for (i, p) in places.iter().enumerate() {
        let inside_bind = places.iter().enumerate().any(|(j, q)| {
            j != i
                && q.dest != p.dest
                && p.dest.starts_with(&q.dest)
                && matches!(q.source, Source::Bind { .. })
        });
        if inside_bind || on_sentry_fs(&p.dest) {
            continue;
        }
        let Ok(rel) = p.dest.strip_prefix("/") else {
            continue;
        };
        let target = root.join(rel);
        if target.symlink_metadata().is_ok() {
            continue;
        }
        let is_file = match &p.source {
            Source::Bind { host, .. } => fs::metadata(host).is_ok_and(|m| !m.is_dir()),
            Source::Proc => false,
        };
        if is_file {
            if let Some(parent) = target.parent() {
                mkdir_0755(parent).map_err(|e| io("creating", parent, e))?;
            }
            File::options()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o644)
                .open(&target)
                .map_err(|e| io("creating", &target, e))?;
        } else {
            mkdir_0755(&target).map_err(|e| io("creating", &target, e))?;
        }
    }
    Ok(())
}

fn oci_err(e: oci_spec::OciSpecError) -> SandboxError {
    SandboxError::Start(format!("building the OCI spec: {e}"))
}

fn arch() -> Result<Arch> {
    match std::env::consts::ARCH {
        "x86_64" => Ok(Arch::ScmpArchX86_64),
        "aarch64" => Ok(Arch::ScmpArchAarch64),
        other => Err(SandboxError::Refused(format!(
            "no seccomp support for {other}"
        ))),
    }
}

/// moat's deny list as an OCI seccomp section: every call of `seccomp::DENIED`
/// and the policy's extra names fails with EPERM, and so do the argument
/// rules of `seccomp::conditional_rules`.
pub(crate) fn oci_seccomp(extra: &[String]) -> Result<LinuxSeccomp> {
    let outright = seccomp::denied_outright(extra)?;
    let mut names: Vec<String> = outright.iter().map(|(n, _)| n.to_string()).collect();
    names.sort();
    names.dedup();
    let eperm = libc::EPERM as u32;
    let mut syscalls = vec![LinuxSyscallBuilder::default()
        .names(names)
        .action(LinuxSeccompAction::ScmpActErrno)
        .errno_ret(eperm)
        .build()
        .map_err(oci_err)?];
    // bwrap's second filter (ENOSYS for clone3 and openat2) has no rule here:
    // this runsc answers every OCI errno rule with EPERM, which would stop libc
    // from falling back; its sentry implements neither call and answers ENOSYS
    // itself (attacks_setuid.rs and attack_k4 check that it still does).
    for (name, nr, rules) in seccomp::conditional_rules() {
        if outright.iter().any(|(_, n)| *n == nr) {
            continue;
        }
        for rule in rules {
            // gVisor's OCI seccomp keeps one test per argument: a rule with two
            // tests on one argument (personality's) would become another rule.
            // Its personality(2) refuses every call anyway (docs/gvisor.md).
            let mut indexes: Vec<u8> = rule.iter().map(|(i, _)| *i).collect();
            indexes.sort_unstable();
            indexes.dedup();
            if indexes.len() != rule.len() {
                continue;
            }
            let args = rule
                .iter()
                .map(|(index, test)| {
                    let b = LinuxSeccompArgBuilder::default().index(*index as usize);
                    match *test {
                        ArgTest::Eq(v) => b.value(v).op(LinuxSeccompOperator::ScmpCmpEq),
                        ArgTest::Ne(v) => b.value(v).op(LinuxSeccompOperator::ScmpCmpNe),
                        ArgTest::MaskedEq { mask, value } => b
                            .value(mask)
                            .value_two(value)
                            .op(LinuxSeccompOperator::ScmpCmpMaskedEq),
                    }
                    .build()
                    .map_err(oci_err)
                })
                .collect::<Result<Vec<_>>>()?;
            syscalls.push(
                LinuxSyscallBuilder::default()
                    .names(vec![name.to_string()])
                    .action(LinuxSeccompAction::ScmpActErrno)
                    .errno_ret(eperm)
                    .args(args)
                    .build()
                    .map_err(oci_err)?,
            );
        }
    }
    LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActAllow)
        .architectures(vec![arch()?])
        .syscalls(syscalls)
        .build()
        .map_err(oci_err)
}

fn mount_of(p: &Place) -> Result<Mount> {
    let b = MountBuilder::default().destination(p.dest.clone());
    match &p.source {
        // nosuid and nodev, as bwrap's binds (docs/threat-model.md F8, K2).
        Source::Bind { host, writable } => b.typ("bind").source(host.clone()).options(vec![
            "rbind".to_string(),
            if *writable { "rw" } else { "ro" }.to_string(),
            "nosuid".to_string(),
            "nodev".to_string(),
        ]),
        Source::Proc => b.typ("proc").source("proc"),
    }
    .build()
    .map_err(oci_err)
}

fn rlimit(typ: PosixRlimitType, v: u64) -> Result<oci_spec::runtime::PosixRlimit> {
    PosixRlimitBuilder::default()
        .typ(typ)
        .hard(v)
        .soft(v)
        .build()
        .map_err(oci_err)
}

/// The CPU quota per 100 ms period for `millicpus`, as the cgroup module writes it.
fn cpu_quota(millicpus: u32) -> (i64, u64) {
    let period: u64 = 100_000;
    let quota = (millicpus as u64 * period / 1000).max(1000);
    (quota as i64, period)
}

/// The container spec of an instance, without the command (see [`with_command`]).
/// Every field moat relies on is set explicitly: nothing comes from oci-spec's
/// defaults (which grant capabilities and name another hostname).
pub(crate) fn base_spec(env: &LeaseEnv, root: &Path, places: &[Place]) -> Result<Spec> {
    let l = &env.policy.limits;
    let empty = || Some(Default::default());
    let mut caps = LinuxCapabilities::default();
    caps.set_bounding(empty());
    caps.set_effective(empty());
    caps.set_inheritable(empty());
    caps.set_permitted(empty());
    caps.set_ambient(empty());
    let process = ProcessBuilder::default()
        .terminal(false)
        .user(
            UserBuilder::default()
                .uid(SANDBOX_UID)
                .gid(SANDBOX_UID)
                .additional_gids(Vec::<u32>::new())
                .build()
                .map_err(oci_err)?,
        )
        .args(vec!["/bin/false".to_string()])
        .env(Vec::<String>::new())
        .cwd("/workspace")
        .capabilities(caps)
        .no_new_privileges(true)
        .rlimits(vec![
            rlimit(PosixRlimitType::RlimitCore, 0)?,
            rlimit(PosixRlimitType::RlimitNofile, l.open_files as u64)?,
            rlimit(PosixRlimitType::RlimitFsize, l.disk.bytes())?,
            // gVisor counts the sandbox uid's tasks in its own kernel: the
            // sandbox's process limit (the host cgroup counts runsc's threads).
            rlimit(PosixRlimitType::RlimitNproc, l.pids as u64)?,
        ])
        .build()
        .map_err(oci_err)?;
    let ns = |t| {
        LinuxNamespaceBuilder::default()
            .typ(t)
            .build()
            .map_err(oci_err)
    };
    let id_map = |inside: u32, host: u32| {
        LinuxIdMappingBuilder::default()
            .container_id(inside)
            .host_id(host)
            .size(1u32)
            .build()
            .map_err(oci_err)
    };
    // runsc's gofer and sandbox run as root of this user namespace; the only
    // other host id in it is the lease's, which the sandbox user appears as.
    let ids = vec![id_map(0, 0)?, id_map(SANDBOX_UID, env.host_uid)?];
    let (quota, period) = cpu_quota(l.millicpus);
    let memory = i64::try_from(l.memory.bytes()).unwrap_or(i64::MAX);
    let resources = LinuxResourcesBuilder::default()
        .memory(
            LinuxMemoryBuilder::default()
                .limit(memory)
                .swap(memory)
                .build()
                .map_err(oci_err)?,
        )
        .pids(
            LinuxPidsBuilder::default()
                .limit(l.pids as i64)
                .build()
                .map_err(oci_err)?,
        )
        .cpu(
            LinuxCpuBuilder::default()
                .quota(quota)
                .period(period)
                .build()
                .map_err(oci_err)?,
        )
        .build()
        .map_err(oci_err)?;
    let mut namespaces = vec![
        ns(LinuxNamespaceType::Pid)?,
        ns(LinuxNamespaceType::Ipc)?,
        ns(LinuxNamespaceType::Uts)?,
        ns(LinuxNamespaceType::Mount)?,
        ns(LinuxNamespaceType::User)?,
    ];
    // Without a door: a network namespace of its own, empty (`--network=none`).
    // With one, runsc is started inside the door's namespace and the sandbox
    // uses it (`--network=host`), which holds loopback and the door only.
    if env.netns.is_none() {
        namespaces.insert(1, ns(LinuxNamespaceType::Network)?);
    }
    let mut linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .uid_mappings(ids.clone())
        .gid_mappings(ids)
        .resources(resources)
        .seccomp(oci_seccomp(&env.policy.extra_denied_syscalls)?)
        .build()
        .map_err(oci_err)?;
    // gVisor's /proc is its own: there is nothing of the host's to mask.
    linux.set_masked_paths(None);
    linux.set_readonly_paths(None);
    linux.set_devices(None);
    linux.set_sysctl(None);
    linux.set_cgroups_path(None);
    let mut spec = SpecBuilder::default()
        .version("1.0.2")
        .root(
            RootBuilder::default()
                .path(root.to_path_buf())
                .readonly(true)
                .build()
                .map_err(oci_err)?,
        )
        .mounts(places.iter().map(mount_of).collect::<Result<Vec<_>>>()?)
        .process(process)
        .hostname("moat")
        .linux(linux)
        .build()
        .map_err(oci_err)?;
    spec.set_annotations(None);
    spec.set_domainname(None);
    spec.set_hooks(None);
    Ok(spec)
}

/// The instance's spec with one command's argv, environment and directory.
pub(crate) fn with_command(base: &Spec, cmd: &CommandLine) -> Result<Spec> {
    let mut spec = base.clone();
    let process = spec
        .process_mut()
        .as_mut()
        .ok_or_else(|| SandboxError::Start("the base spec has no process".into()))?;
    process.set_args(Some(cmd.argv.clone()));
    process.set_env(Some(
        cmd.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
    ));
    process.set_cwd(PathBuf::from(&cmd.cwd));
    Ok(spec)
}

/// What a path lookup in the container's view found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lookup {
    Found,
    Missing,
    /// On a file system moat cannot see from the host (/proc, /dev, /sys), a
    /// symlink loop, or an error: runsc decides.
    Unknown,
}

/// The container's file system as the host sees it, to find out before
/// starting runsc whether a program or directory exists. Only reads metadata
/// and symlinks of host paths that the mount table maps, resolving every
/// symlink itself in the container's view (never through the host's).
pub(crate) struct View<'a> {
    pub root: &'a Path,
    pub places: &'a [Place],
}

impl View<'_> {
    /// The host path behind the container path `p` (absolute, no `.`/`..`).
    fn host_of(&self, p: &Path) -> Option<PathBuf> {
        let covering = self.places.iter().rev().find(|pl| p.starts_with(&pl.dest));
        match covering {
            Some(Place {
                dest,
                source: Source::Bind { host, .. },
            }) => {
                let rest = p.strip_prefix(dest).ok()?;
                Some(if rest.as_os_str().is_empty() {
                    host.clone()
                } else {
                    host.join(rest)
                })
            }
            Some(Place {
                source: Source::Proc,
                ..
            }) => None,
            None if on_sentry_fs(p) => None,
            None => Some(self.root.join(p.strip_prefix("/").ok()?)),
        }
    }

    /// Looks `path` up relative to the container directory `cwd`.
    pub fn lookup(&self, cwd: &str, path: &str) -> Lookup {
        let mut pending: VecDeque<OsString> = VecDeque::new();
        let push_front = |q: &mut VecDeque<OsString>, p: &Path| {
            for c in p.components().rev() {
                match c {
                    Component::Normal(n) => q.push_front(n.to_os_string()),
                    Component::ParentDir => q.push_front("..".into()),
                    _ => {}
                }
            }
        };
        if !path.starts_with('/') {
            push_front(&mut pending, Path::new(path));
            push_front(&mut pending, Path::new(cwd));
        } else {
            push_front(&mut pending, Path::new(path));
        }
        let mut cur = PathBuf::from("/");
        let mut hops = 0;
        while let Some(c) = pending.pop_front() {
            if c == ".." {
                cur.pop();
                continue;
            }
            let next = cur.join(&c);
            let Some(host) = self.host_of(&next) else {
                return Lookup::Unknown;
            };
            match fs::symlink_metadata(&host) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Lookup::Missing,
                Err(_) => return Lookup::Unknown,
                Ok(m) if m.file_type().is_symlink() => {
                    hops += 1;
                    let Ok(target) = fs::read_link(&host) else {
                        return Lookup::Unknown;
                    };
                    if hops > 40 {
                        return Lookup::Unknown;
                    }
                    if target.is_absolute() {
                        cur = PathBuf::from("/");
                    }
                    push_front(&mut pending, &target);
                }
                Ok(m) if !pending.is_empty() && !m.is_dir() => return Lookup::Unknown,
                Ok(_) => cur = next,
            }
        }
        Lookup::Found
    }

    /// Whether `cmd` certainly cannot start: its directory or its program
    /// (searched in the command's PATH like execvp) does not exist.
    pub fn missing(&self, cmd: &CommandLine) -> bool {
        if self.lookup("/", &cmd.cwd) == Lookup::Missing {
            return true;
        }
        let prog = cmd.argv.first().map(String::as_str).unwrap_or("");
        if prog.is_empty() {
            return true;
        }
        if prog.contains('/') {
            return self.lookup(&cmd.cwd, prog) == Lookup::Missing;
        }
        let Some((_, path)) = cmd.env.iter().find(|(k, _)| k == "PATH") else {
            return false;
        };
        path.split(':').all(|dir| {
            let dir = if dir.is_empty() { "." } else { dir };
            self.lookup(&cmd.cwd, &format!("{dir}/{prog}")) == Lookup::Missing
        })
    }
}

/// The raw wait status runsc logs as it exits (`Exiting with status: N`).
fn logged_wait_status(run_log: &str) -> Option<i32> {
    run_log
        .lines()
        .rev()
        .find_map(|l| l.split("Exiting with status: ").nth(1))
        .and_then(|v| v.trim().parse().ok())
}

/// The message of the last error record in runsc's `--log` file (JSON lines).
fn last_error(error_log: &str) -> Option<String> {
    let mut last = None;
    let stream = serde_json::Deserializer::from_str(error_log).into_iter::<serde_json::Value>();
    for v in stream {
        let Ok(v) = v else { break };
        if v.get("level").and_then(|l| l.as_str()) == Some("error") {
            if let Some(m) = v.get("msg").and_then(|m| m.as_str()) {
                last = Some(m.to_string());
            }
        }
    }
    last
}

/// The errno of an exec failure runsc reported while starting the container.
fn exec_errno(msg: &str) -> Option<i32> {
    let is_exec = msg.contains("error finding executable")
        || msg.contains("failed to load")
        || msg.contains("working directory");
    if !is_exec {
        return None;
    }
    let m = msg.to_ascii_lowercase();
    [
        ("no such file or directory", libc::ENOENT),
        ("permission denied", libc::EACCES),
        ("exec format error", libc::ENOEXEC),
        ("not a directory", libc::ENOTDIR),
        ("is a directory", libc::EACCES),
        ("too many levels of symbolic links", libc::ELOOP),
    ]
    .iter()
    .find(|(text, _)| m.ends_with(text))
    .map(|(_, e)| *e)
}

/// How a command ended, from runsc's own exit (`code` or `signal`), its run
/// log (info level) and its error log. `Err` is a runsc failure that is not
/// the command's: the instance cannot run commands.
pub(crate) fn interpret(
    code: Option<i32>,
    signal: Option<i32>,
    run_log: &str,
    error_log: &str,
) -> std::result::Result<Ended, String> {
    if signal.is_some() {
        // runsc itself was killed (from outside, or by the OOM killer).
        return Ok(Ended::InstanceDied);
    }
    let Some(code) = code else {
        return Ok(Ended::InstanceDied);
    };
    if code == 128 {
        if let Some(msg) = last_error(error_log) {
            return match exec_errno(&msg) {
                Some(e) => Ok(Ended::ExecFailed(e)),
                None => Err(msg),
            };
        }
    }
    // The sentry died under the container (killed, or the OOM killer):
    // runsc then reports the sandbox process's status.
    if run_log.contains("Wait RPC to container") && run_log.contains("failed") {
        return Ok(Ended::InstanceDied);
    }
    if let Some(ws) = logged_wait_status(run_log) {
        if libc::WIFEXITED(ws) {
            return Ok(Ended::Exited(libc::WEXITSTATUS(ws)));
        }
        if libc::WIFSIGNALED(ws) {
            return Ok(Ended::Signaled(libc::WTERMSIG(ws)));
        }
    }
    // No log: runsc exits with the status, or 128+N for a signal.
    Ok(if code > 128 && code <= 128 + 64 {
        Ended::Signaled(code - 128)
    } else {
        Ended::Exited(code)
    })
}

/// The host cgroup limits for a gVisor sandbox. Memory and CPU are the
/// policy's: they cover the sentry, which holds all of the sandbox's memory and
/// runs all of its code. The pids limit is applied inside gVisor (RLIMIT_NPROC
/// in the spec); the host limit only bounds runsc's own threads and ptrace
/// stubs, which grow with the sandbox's processes (measured in docs/gvisor.md).
pub(crate) fn host_limits(l: &Limits) -> CgroupLimits {
    CgroupLimits {
        memory: l.memory.bytes(),
        pids: l.pids.saturating_mul(16).saturating_add(1024),
        millicpus: l.millicpus,
    }
}

pub struct GvisorBackend {
    /// `<runtime_dir>/gvisor`: instance directories and runsc's state.
    base: PathBuf,
}

fn flock_nb(f: &File) -> bool {
    // SAFETY: flock on a descriptor we own.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

impl GvisorBackend {
    pub fn new(config: &EngineConfig) -> Result<Self> {
        let base = config.runtime_dir.join("gvisor");
        for d in [base.clone(), base.join("state")] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&d)
                .map_err(|e| SandboxError::io(format!("creating {}", d.display()), e))?;
        }
        let b = GvisorBackend { base };
        b.sweep();
        Ok(b)
    }

    fn state(&self) -> PathBuf {
        self.base.join("state")
    }

    /// Removes what instances of a moat process that died left behind: their
    /// containers' runsc state and their directories. An instance in use holds
    /// the lock file in its directory.
    fn sweep(&self) {
        let Ok(rd) = fs::read_dir(&self.base) else {
            return;
        };
        for e in rd.flatten() {
            let dir = e.path();
            let name = e.file_name();
            if name == "state" || name.to_string_lossy().starts_with('.') || !dir.is_dir() {
                continue;
            }
            let Ok(lock) = File::options().write(true).open(dir.join("lock")) else {
                continue;
            };
            if !flock_nb(&lock) {
                continue;
            }
            for b in fs::read_dir(&dir).into_iter().flatten().flatten() {
                if let Ok(id) = fs::read_to_string(b.path().join("id")) {
                    delete_container(&self.state(), id.trim());
                }
            }
            let _ = fs::remove_dir_all(&dir);
            tracing::info!(dir = %dir.display(), "removed a gVisor instance left by a moat process that died");
        }
    }
}

/// Creates the instance directory `dir` holding a `lock` file, already locked
/// when the directory appears under its name (a concurrent sweep never sees it
/// unlocked).
fn locked_dir(dir: &Path) -> Result<File> {
    let parent = dir.parent().unwrap_or(Path::new("/"));
    let tmp = parent.join(format!(".new-{:016x}", random_u64()));
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&tmp)
        .map_err(|e| SandboxError::io(format!("creating {}", tmp.display()), e))?;
    let made = (|| {
        let lock = File::options()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(tmp.join("lock"))?;
        if !flock_nb(&lock) {
            return Err(std::io::Error::other("the new lock file is locked"));
        }
        fs::rename(&tmp, dir)?;
        Ok(lock)
    })();
    made.map_err(|e| {
        let _ = fs::remove_dir_all(&tmp);
        SandboxError::io(format!("creating {}", dir.display()), e)
    })
}

impl Backend for GvisorBackend {
    fn name(&self) -> &'static str {
        "gvisor"
    }

    fn host_cgroup_limits(&self, limits: &Limits) -> CgroupLimits {
        host_limits(limits)
    }

    fn start(&self, env: &LeaseEnv, cgroup_procs: &[OwnedFd]) -> Result<Box<dyn Instance>> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(SandboxError::Refused(
                "the gvisor backend needs moat to run as root (runsc creates the sandbox's namespaces)".into(),
            ));
        }
        if env.host_uid == 0 {
            return Err(SandboxError::Refused(
                "refusing to run a sandbox as host uid 0".into(),
            ));
        }
        let dir = self.base.join(format!(
            "{}-{}-{:08x}",
            env.id,
            env.instance,
            random_u64() as u32
        ));
        let lock = locked_dir(&dir)?;
        let mut inst = GvisorInstance {
            dir: dir.clone(),
            state: self.state(),
            root: dir.join("root"),
            places: places(env),
            spec: None,
            procs: Vec::new(),
            netns: env.netns.clone(),
            lock: Some(lock),
            commands: 0,
            running: None,
            dead: false,
            host_loader: false,
        };
        inst.host_loader = inst
            .places
            .iter()
            .any(|p| p.dest == Path::new("/run/moat/lib/ld.so"));
        build_root(&inst.root, env.image.as_deref(), &inst.places)?;
        inst.spec = Some(base_spec(env, &inst.root, &inst.places)?);
        for fd in cgroup_procs {
            // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor we own.
            let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
            if n < 0 {
                return Err(SandboxError::io(
                    "duplicating a cgroup descriptor",
                    std::io::Error::last_os_error(),
                ));
            }
            // SAFETY: n is fresh from fcntl.
            inst.procs.push(unsafe { OwnedFd::from_raw_fd(n) });
        }
        Ok(Box::new(inst))
    }
}

struct Running {
    child: Child,
    pidfd: OwnedFd,
    id: String,
    bundle: PathBuf,
}

pub struct GvisorInstance {
    dir: PathBuf,
    state: PathBuf,
    root: PathBuf,
    places: Vec<Place>,
    spec: Option<Spec>,
    procs: Vec<OwnedFd>,
    /// The door's network namespace, entered by `runsc run` before exec.
    netns: Option<Arc<OwnedFd>>,
    lock: Option<File>,
    commands: u64,
    running: Option<Running>,
    dead: bool,
    /// On an image: moat's binaries under /run/moat/bin start through the
    /// host's loader bound at /run/moat/lib.
    host_loader: bool,
}

fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open on a pid; the result is a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    // SAFETY: fd is a fresh pidfd when non-negative.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Every process below `pid` (children of all its threads, recursively).
fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let tasks = fs::read_dir(format!("/proc/{p}/task"))
            .into_iter()
            .flatten();
        for t in tasks.flatten() {
            let children = fs::read_to_string(t.path().join("children")).unwrap_or_default();
            for c in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                if !out.contains(&c) {
                    out.push(c);
                    todo.push(c);
                }
            }
        }
    }
    out
}

/// Waits until `fd` (a pidfd) is readable, that is the process has exited.
fn wait_pidfd(fd: &OwnedFd, deadline: Instant) -> bool {
    let left = deadline.saturating_duration_since(Instant::now());
    let mut pfd = [libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    // SAFETY: poll on one valid pollfd.
    unsafe { libc::poll(pfd.as_mut_ptr(), 1, left.as_millis().min(60_000) as i32) > 0 }
}

/// Runs `runsc --root <state> delete --force <id>` (bounded by `KILL_WAIT`) and
/// removes what runsc leaves of the container in its state directory.
fn delete_container(state: &Path, id: &str) {
    let child = Command::new(RUNSC)
        .arg("--root")
        .arg(state)
        .args(["delete", "--force", id])
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    if let Ok(mut child) = child {
        let deadline = Instant::now() + KILL_WAIT;
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }
    let prefix = format!("{id}_sandbox:");
    for e in fs::read_dir(state).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = fs::remove_file(e.path());
        }
    }
}

impl GvisorInstance {
    /// Whether runsc still keeps state of container `id` (it removes it itself
    /// when a container ends normally).
    fn has_state(&self, id: &str) -> bool {
        let prefix = format!("{id}_sandbox:");
        fs::read_dir(&self.state)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(&prefix))
    }

    fn finish(&self, r: &Running) {
        if self.has_state(&r.id) {
            delete_container(&self.state, &r.id);
        }
        let _ = fs::remove_dir_all(&r.bundle);
    }

    fn spawn(&mut self, cmd: &CommandLine, stdio: ChildStdio) -> Result<Running> {
        let spec = self
            .spec
            .as_ref()
            .ok_or_else(|| SandboxError::Broken("the instance has no spec".into()))?;
        let spec = with_command(spec, cmd)?;
        self.commands += 1;
        let id = format!("moat-{:016x}", random_u64());
        let bundle = self.dir.join(format!("c{}", self.commands));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&bundle)
            .map_err(|e| SandboxError::io(format!("creating {}", bundle.display()), e))?;
        let json = serde_json::to_vec(&spec)
            .map_err(|e| SandboxError::Start(format!("serializing the OCI spec: {e}")))?;
        let write = |name: &str, bytes: &[u8]| {
            fs::write(bundle.join(name), bytes)
                .map_err(|e| SandboxError::io(format!("writing {name}"), e))
        };
        write("id", id.as_bytes())?;
        write("config.json", &json)?;
        let procs: Vec<RawFd> = self.procs.iter().map(|f| f.as_raw_fd()).collect();
        let netns: RawFd = self.netns.as_ref().map(|f| f.as_raw_fd()).unwrap_or(-1);
        let mut c = Command::new(RUNSC);
        c.arg("--root")
            .arg(&self.state)
            .arg(if netns >= 0 {
                "--network=host"
            } else {
                "--network=none"
            })
            .args(["--ignore-cgroups", "--oci-seccomp", "--debug-command=run"])
            .arg("--log")
            .arg(bundle.join("runsc.log"))
            .arg("--debug-log")
            .arg(bundle.join("run.log"))
            .args(["run", "--bundle"])
            .arg(&bundle)
            .arg(&id)
            .env_clear()
            .stdin(Stdio::from(stdio.stdin))
            .stdout(Stdio::from(stdio.stdout))
            .stderr(Stdio::from(stdio.stderr));
        // SAFETY: the closure only makes async-signal-safe system calls on
        // values prepared before fork; it allocates nothing.
        unsafe {
            c.pre_exec(move || {
                for fd in &procs {
                    if libc::write(*fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if netns >= 0 && libc::setns(netns, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::setsid();
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = match crate::spawner::spawn(c) {
            Ok(c) => c,
            Err(e) => {
                let _ = fs::remove_dir_all(&bundle);
                return Err(SandboxError::Start(format!(
                    "cannot run {RUNSC}: {e} (install gVisor: apt-get install runsc, or run `moat doctor`)"
                )));
            }
        };
        let Some(pidfd) = pidfd_open(child.id()) else {
            let err = std::io::Error::last_os_error();
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
            delete_container(&self.state, &id);
            let _ = fs::remove_dir_all(&bundle);
            return Err(SandboxError::io("pidfd_open", err));
        };
        Ok(Running {
            child,
            pidfd,
            id,
            bundle,
        })
    }

    /// SIGKILLs `runsc run` and every process under it, and waits until they
    /// are gone; then deletes the container's state and bundle.
    fn kill(&self, r: &mut Running) {
        let pid = r.child.id();
        let below: Vec<(u32, Option<OwnedFd>)> = descendants(pid)
            .into_iter()
            .map(|p| (p, pidfd_open(p)))
            .collect();
        let _ = r.child.kill();
        for fd in below.iter().filter_map(|(_, fd)| fd.as_ref()) {
            // SAFETY: pidfd_send_signal on a pidfd we own.
            unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd.as_raw_fd(),
                    libc::SIGKILL,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                )
            };
        }
        let _ = r.child.wait();
        let deadline = Instant::now() + KILL_WAIT;
        for (p, fd) in &below {
            if fd.as_ref().is_some_and(|fd| !wait_pidfd(fd, deadline)) {
                tracing::error!(pid = p, "a runsc process survived SIGKILL");
            }
        }
        self.finish(r);
    }
}

impl Instance for GvisorInstance {
    fn start_command(&mut self, cmd: &CommandLine, stdio: ChildStdio) -> Result<Option<Ended>> {
        if self.dead {
            return Err(SandboxError::Broken(
                "the gVisor instance was stopped".into(),
            ));
        }
        if self.running.is_some() {
            return Err(SandboxError::Broken(
                "a command is still running in this instance".into(),
            ));
        }
        let routed;
        let cmd = if self.host_loader {
            routed = CommandLine {
                argv: crate::bwrap::through_host_loader(true, &cmd.argv),
                ..cmd.clone()
            };
            &routed
        } else {
            cmd
        };
        let view = View {
            root: &self.root,
            places: &self.places,
        };
        if view.missing(cmd) {
            return Ok(Some(Ended::ExecFailed(libc::ENOENT)));
        }
        let r = self.spawn(cmd, stdio)?;
        self.running = Some(r);
        Ok(None)
    }

    fn status_fd(&self) -> RawFd {
        self.running
            .as_ref()
            .map(|r| r.pidfd.as_raw_fd())
            .unwrap_or(-1)
    }

    fn poll_ended(&mut self) -> Result<Option<Ended>> {
        let Some(r) = self.running.as_mut() else {
            return Ok(Some(Ended::InstanceDied));
        };
        let status = match r.child.try_wait() {
            Ok(Some(st)) => st,
            Ok(None) => return Ok(None),
            Err(e) => return Err(SandboxError::io("waiting for runsc", e)),
        };
        let read = |name: &str| fs::read_to_string(r.bundle.join(name)).unwrap_or_default();
        let outcome = interpret(
            status.code(),
            status.signal(),
            &read("run.log"),
            &read("runsc.log"),
        );
        if let Some(r) = self.running.take() {
            self.finish(&r);
        }
        match outcome {
            Ok(e) => Ok(Some(e)),
            Err(msg) => {
                self.dead = true;
                Err(SandboxError::Start(format!("runsc: {msg}")))
            }
        }
    }

    fn kill_all(&mut self) {
        self.dead = true;
        if let Some(mut r) = self.running.take() {
            self.kill(&mut r);
        }
        self.spec = None;
        if self.dir.exists() {
            if let Err(e) = fs::remove_dir_all(&self.dir) {
                tracing::warn!(dir = %self.dir.display(), error = %e, "could not remove a gVisor instance directory");
            }
        }
        self.lock = None;
    }

    fn is_alive(&mut self) -> bool {
        !self.dead
    }

    fn host_pids(&self) -> Vec<u32> {
        self.running.iter().map(|r| r.child.id()).collect()
    }
}

impl Drop for GvisorInstance {
    fn drop(&mut self) {
        self.kill_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsguard::ResolvedMount;
    use moat_policy::{ByteSize, SandboxPolicy};

    fn env() -> LeaseEnv {
        let mut policy = SandboxPolicy {
            backend: moat_policy::BackendKind::Gvisor,
            ..SandboxPolicy::default()
        };
        policy.limits.memory = ByteSize::mib(300);
        policy.limits.pids = 77;
        policy.limits.millicpus = 1500;
        policy.limits.open_files = 321;
        policy.limits.disk = ByteSize::mib(50);
        policy.extra_denied_syscalls = vec!["uname".into()];
        LeaseEnv {
            id: "t".into(),
            instance: 1,
            policy: Arc::new(policy),
            host_uid: 1_000_000_123,
            workspace: "/lease/ws".into(),
            home: "/lease/home".into(),
            tmp: "/lease/tmp".into(),
            etc: "/run/moat/etc-x".into(),
            image: None,
            root_inside: false,
            mounts: vec![
                ResolvedMount {
                    host: "/srv/data".into(),
                    sandbox: "/data".into(),
                    writable: false,
                },
                ResolvedMount {
                    host: "/srv/out".into(),
                    sandbox: "/workspace/out".into(),
                    writable: true,
                },
            ],
            protected: vec![(
                "/lease/ws/.git/hooks".into(),
                "/workspace/.git/hooks".into(),
            )],
            init_path: "/run/moat/bin/moat-init".into(),
            runtime_dir: "/run/moat".into(),
            netns: None,
        }
    }

    fn spec() -> serde_json::Value {
        let e = env();
        let p = places(&e);
        serde_json::to_value(base_spec(&e, Path::new("/run/moat/gvisor/x/root"), &p).unwrap())
            .unwrap()
    }

    #[test]
    fn no_mount_exposes_the_host_root_or_etc() {
        let s = spec();
        assert_eq!(s["root"]["path"], "/run/moat/gvisor/x/root");
        assert_eq!(s["root"]["readonly"], true);
        for m in s["mounts"].as_array().unwrap() {
            let src = m["source"].as_str().unwrap_or("");
            assert_ne!(src, "/", "{m}");
            assert_ne!(src, "/etc", "{m}");
            assert!(!src.starts_with("/etc/"), "{m}");
            let opts: Vec<&str> = m["options"]
                .as_array()
                .map(|o| o.iter().filter_map(|x| x.as_str()).collect())
                .unwrap_or_default();
            let writable = opts.contains(&"rw");
            let dest = m["destination"].as_str().unwrap();
            let may_write = [
                "/workspace",
                "/home/agent",
                "/tmp",
                "/dev/shm",
                "/workspace/out",
            ];
            assert_eq!(writable, may_write.contains(&dest), "{m}");
            if m["type"] == "bind" {
                assert!(opts.contains(&"nosuid") && opts.contains(&"nodev"), "{m}");
            }
        }
    }

    #[test]
    fn mounts_follow_bwraps_order_with_protected_paths_last() {
        let s = spec();
        let dests: Vec<&str> = s["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["destination"].as_str().unwrap())
            .collect();
        let pos = |d: &str| dests.iter().position(|x| *x == d).unwrap();
        assert!(pos("/usr") < pos("/etc"));
        assert!(pos("/etc") < pos("/workspace"));
        assert!(pos("/workspace") < pos("/workspace/out"));
        assert_eq!(dests.last(), Some(&"/workspace/.git/hooks"));
        let etc = &s["mounts"][pos("/etc")];
        assert_eq!(etc["source"], "/run/moat/etc-x");
    }

    #[test]
    fn the_process_has_no_privileges_and_the_policys_limits() {
        let s = spec();
        let p = &s["process"];
        assert_eq!(p["user"]["uid"], 1000);
        assert_eq!(p["user"]["gid"], 1000);
        assert_eq!(p["noNewPrivileges"], true);
        assert_eq!(p["terminal"], false);
        for set in [
            "bounding",
            "effective",
            "inheritable",
            "permitted",
            "ambient",
        ] {
            assert_eq!(p["capabilities"][set], serde_json::json!([]), "{set}");
        }
        let rl = |t: &str| {
            p["rlimits"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["type"] == t)
                .map(|r| (r["soft"].as_u64().unwrap(), r["hard"].as_u64().unwrap()))
        };
        assert_eq!(rl("RLIMIT_CORE"), Some((0, 0)));
        assert_eq!(rl("RLIMIT_NOFILE"), Some((321, 321)));
        assert_eq!(rl("RLIMIT_FSIZE"), Some((50 << 20, 50 << 20)));
        assert_eq!(rl("RLIMIT_NPROC"), Some((77, 77)));
        let r = &s["linux"]["resources"];
        assert_eq!(r["memory"]["limit"], 300 << 20);
        assert_eq!(r["memory"]["swap"], 300 << 20);
        assert_eq!(r["pids"]["limit"], 77);
        assert_eq!(r["cpu"]["quota"], 150_000);
        assert_eq!(r["cpu"]["period"], 100_000);
        assert_eq!(s["hostname"], "moat");
        assert!(s.get("annotations").is_none());
    }

    #[test]
    fn namespaces_and_id_maps_are_moats() {
        let s = spec();
        let l = &s["linux"];
        let mut ns: Vec<&str> = l["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        ns.sort();
        assert_eq!(ns, ["ipc", "mount", "network", "pid", "user", "uts"]);
        for key in ["uidMappings", "gidMappings"] {
            assert_eq!(
                l[key],
                serde_json::json!([
                    {"containerID": 0, "hostID": 0, "size": 1},
                    {"containerID": 1000, "hostID": 1_000_000_123u32, "size": 1}
                ]),
                "{key}"
            );
        }
        assert!(l.get("cgroupsPath").is_none());
        assert!(l.get("maskedPaths").is_none());
    }

    #[test]
    fn seccomp_denies_moats_list_and_the_policys_extras() {
        let s = spec();
        let sc = &s["linux"]["seccomp"];
        assert_eq!(sc["defaultAction"], "SCMP_ACT_ALLOW");
        let rules = sc["syscalls"].as_array().unwrap();
        let outright = &rules[0];
        assert!(outright.get("args").is_none());
        assert_eq!(outright["action"], "SCMP_ACT_ERRNO");
        assert_eq!(outright["errnoRet"], libc::EPERM);
        let names: Vec<&str> = outright["names"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_str().unwrap())
            .collect();
        for n in crate::seccomp::DENIED.iter().chain(&["uname"]) {
            assert!(names.contains(n), "{n} not denied");
        }
        let conditional: Vec<&str> = rules[1..]
            .iter()
            .map(|r| r["names"][0].as_str().unwrap())
            .collect();
        for n in [
            "socket",
            "ioctl",
            "clone",
            "fchmod",
            "fchmodat",
            "fchmodat2",
            "mknodat",
            "openat",
        ] {
            assert!(conditional.contains(&n), "{n}");
        }
        // A setuid mode in openat's mode (argument 3) is refused when it creates.
        let creat = rules[1..]
            .iter()
            .filter(|r| r["names"][0] == "openat")
            .map(|r| {
                (
                    r["args"][0]["index"].clone(),
                    r["args"][1]["index"].clone(),
                    r["args"][1]["valueTwo"].clone(),
                )
            })
            .collect::<Vec<_>>();
        assert!(
            creat.contains(&(2.into(), 3.into(), libc::S_ISUID.into())),
            "{creat:?}"
        );
        let raw = rules[1..]
            .iter()
            .find(|r| {
                r["names"][0] == "socket" && r["args"].as_array().is_some_and(|a| a.len() == 2)
            })
            .unwrap();
        assert_eq!(raw["args"][1]["op"], "SCMP_CMP_MASKED_EQ");
        assert_eq!(raw["args"][1]["value"], 0xf);
        assert_eq!(raw["args"][1]["valueTwo"], libc::SOCK_RAW);
        // Denied outright: no conditional rule for the same call.
        let mut e = env();
        Arc::make_mut(&mut e.policy).extra_denied_syscalls = vec!["socket".into()];
        let sc = oci_seccomp(&e.policy.extra_denied_syscalls).unwrap();
        let v = serde_json::to_value(sc).unwrap();
        assert_eq!(
            v["syscalls"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| r["names"].as_array().unwrap().iter().any(|n| n == "socket"))
                .count(),
            1
        );
        assert!(oci_seccomp(&["frobnicate".into()]).is_err());
    }

    #[test]
    fn a_command_sets_only_argv_env_and_cwd() {
        let e = env();
        let base = base_spec(&e, Path::new("/r"), &places(&e)).unwrap();
        let cmd = CommandLine {
            argv: vec!["echo".into(), "hi".into()],
            env: vec![
                ("PATH".into(), "/usr/bin".into()),
                ("A".into(), "b=c".into()),
            ],
            cwd: "/workspace/sub".into(),
        };
        let s = serde_json::to_value(with_command(&base, &cmd).unwrap()).unwrap();
        assert_eq!(s["process"]["args"], serde_json::json!(["echo", "hi"]));
        assert_eq!(
            s["process"]["env"],
            serde_json::json!(["PATH=/usr/bin", "A=b=c"])
        );
        assert_eq!(s["process"]["cwd"], "/workspace/sub");
        let mut b = serde_json::to_value(&base).unwrap();
        let mut c = s.clone();
        for v in [&mut b, &mut c] {
            let p = v["process"].as_object_mut().unwrap();
            p.remove("args");
            p.remove("env");
            p.remove("cwd");
        }
        assert_eq!(b, c);
    }

    #[test]
    fn exit_statuses_map_like_bwraps() {
        let log = |ws: i32| {
            format!("I1123 09:42:17.389375   17264 main.go:266] Exiting with status: {ws}\n")
        };
        assert_eq!(
            interpret(Some(3), None, &log(3 << 8), ""),
            Ok(Ended::Exited(3))
        );
        assert_eq!(
            interpret(Some(143), None, &log(15), ""),
            Ok(Ended::Signaled(15))
        );
        assert_eq!(
            interpret(Some(143), None, &log(143 << 8), ""),
            Ok(Ended::Exited(143))
        );
        // Without runsc's log: 128+N is a signal.
        assert_eq!(interpret(Some(137), None, "", ""), Ok(Ended::Signaled(9)));
        assert_eq!(interpret(Some(0), None, "", ""), Ok(Ended::Exited(0)));
        // runsc itself killed, or the sandbox gone under the container.
        assert_eq!(interpret(None, Some(9), "", ""), Ok(Ended::InstanceDied));
        let died = "W1123 sandbox.go:957] Wait RPC to container \"c\" failed: urpc method \"containerManager.Wait\" failed: EOF.\n";
        assert_eq!(
            interpret(Some(137), None, &(died.to_string() + &log(9)), ""),
            Ok(Ended::InstanceDied)
        );
        // runsc's own failures.
        let err = |m: &str| {
            format!(
                "{{\"msg\":{},\"level\":\"error\",\"time\":\"t\"}}",
                serde_json::json!(m)
            )
        };
        let missing = err("running container: starting container: starting root container: starting sandbox: error finding executable \"x\" in PATH [/usr/bin /bin]: no such file or directory");
        assert_eq!(
            interpret(Some(128), None, "", &missing),
            Ok(Ended::ExecFailed(libc::ENOENT))
        );
        let denied = err("running container: starting container: starting root container: starting sandbox: creating process: failed to load /etc: permission denied");
        assert_eq!(
            interpret(Some(128), None, "", &denied),
            Ok(Ended::ExecFailed(libc::EACCES))
        );
        let other = err("running container: creating container: cannot create sandbox: EOF");
        assert!(interpret(Some(128), None, "", &other).is_err());
        // A command's own exit 128 leaves no error record.
        assert_eq!(
            interpret(Some(128), None, &log(128 << 8), ""),
            Ok(Ended::Exited(128))
        );
    }

    #[test]
    fn the_host_cgroup_leaves_room_for_runsc() {
        let l = SandboxPolicy::default().limits;
        let h = host_limits(&l);
        assert_eq!(h.memory, l.memory.bytes());
        assert_eq!(h.millicpus, l.millicpus);
        assert!(h.pids >= l.pids * 10);
    }

    #[test]
    fn lookups_resolve_symlinks_in_the_containers_view() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        let usr = t.path().join("usr");
        let ws = t.path().join("ws");
        for d in [&root, &usr.join("bin"), &ws] {
            fs::create_dir_all(d).unwrap();
        }
        fs::write(usr.join("bin/tool"), "").unwrap();
        std::os::unix::fs::symlink("usr/bin", root.join("bin")).unwrap();
        // A symlink pointing at a host path outside the mounts resolves in the
        // container's view, where it does not exist.
        std::os::unix::fs::symlink(t.path().join("usr/bin/tool"), ws.join("escape")).unwrap();
        std::os::unix::fs::symlink("/usr/bin/tool", ws.join("inside")).unwrap();
        std::os::unix::fs::symlink("loop", ws.join("loop")).unwrap();
        let places = vec![
            bind(&usr, "/usr", false),
            Place {
                dest: "/proc".into(),
                source: Source::Proc,
            },
            bind(&ws, "/workspace", true),
        ];
        let v = View {
            root: &root,
            places: &places,
        };
        assert_eq!(v.lookup("/", "/bin/tool"), Lookup::Found);
        assert_eq!(v.lookup("/workspace", "../usr/bin/tool"), Lookup::Found);
        assert_eq!(v.lookup("/", "/bin/nothing"), Lookup::Missing);
        assert_eq!(v.lookup("/workspace", "inside"), Lookup::Found);
        assert_eq!(v.lookup("/workspace", "escape"), Lookup::Missing);
        assert_eq!(v.lookup("/workspace", "loop"), Lookup::Unknown);
        assert_eq!(v.lookup("/", "/proc/self/exe"), Lookup::Unknown);
        assert_eq!(v.lookup("/", "/dev/null"), Lookup::Unknown);
        let cmd = |argv0: &str, cwd: &str| CommandLine {
            argv: vec![argv0.into()],
            env: vec![("PATH".into(), "/usr/local/bin:/bin".into())],
            cwd: cwd.into(),
        };
        assert!(!v.missing(&cmd("tool", "/workspace")));
        assert!(v.missing(&cmd("no-such-tool", "/workspace")));
        assert!(v.missing(&cmd("./tool", "/workspace")));
        assert!(v.missing(&cmd("tool", "/workspace/gone")));
        assert!(!v.missing(&cmd("/proc/self/exe", "/workspace")));
    }
}
