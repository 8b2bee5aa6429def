//! Leases: a sandbox's files, limits and running instance, owned by one request
//! at a time. Runs commands with streamed output, a time limit, an output limit
//! and memory-limit detection; resets to clean state; keeps or destroys files.
//!
//! Invariants:
//! - a lease is used by one request at a time (`&mut self`, plus a file lock on
//!   its directory against other processes);
//! - when a time, memory or output limit fires, every process of the lease is
//!   killed before `run` returns;
//! - after `reset`, nothing of the previous request remains visible: files
//!   (a fresh tmpfs), processes (a fresh instance), environment (per command);
//! - dropping a lease kills its processes and removes its cgroup; an unnamed
//!   lease's files are deleted too.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moat_policy::{BackendKind, ByteSize, SandboxPolicy};
use nix::fcntl::OFlag;

use crate::backend::{Backend, ChildStdio, CommandLine, Ended, Instance, LeaseEnv};
use crate::cgroup::Cgroup;
use crate::error::{Result, SandboxError};
use crate::fsguard::{
    blocked_inside, protected_binds, protected_parents, resolve_mounts, resolve_workspace,
    ResolvedMount,
};
use crate::storage::{random_u64, Storage, UidLock};
use crate::Engine;

/// Which stream a chunk of output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// Where a command's standard input comes from.
pub enum StdinSource {
    Null,
    Bytes(Vec<u8>),
    Fd(OwnedFd),
}

/// One command to run in a lease.
pub struct RunSpec {
    pub argv: Vec<String>,
    /// Variables for this command only, on top of the policy's.
    pub env: Vec<(String, String)>,
    pub stdin: StdinSource,
    /// Working directory inside; `/workspace` when `None`.
    pub cwd: Option<String>,
    /// Overrides the policy's time limit for this command.
    pub timeout: Option<Duration>,
}

impl RunSpec {
    pub fn new<S: Into<String>>(argv: impl IntoIterator<Item = S>) -> Self {
        RunSpec {
            argv: argv.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            stdin: StdinSource::Null,
            cwd: None,
            timeout: None,
        }
    }
}

/// How a command ended, in moat's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Termination {
    Exited(i32),
    Signaled(i32),
    /// exec failed: the program (argv[0]) and errno.
    NotRunnable(String, i32),
    TimedOut(Duration),
    MemoryLimit(ByteSize),
    OutputLimit(ByteSize),
    /// The sandbox vanished under the command (killed from outside).
    SandboxDied,
}

#[derive(Debug, Clone)]
pub struct RunOutcome {
    pub termination: Termination,
    pub duration: Duration,
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
}

fn signal_name(sig: i32) -> String {
    nix::sys::signal::Signal::try_from(sig)
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|_| format!("signal {sig}"))
}

impl RunOutcome {
    /// The exit status `moat sandbox run` reports: the command's own; 124 on
    /// timeout; 128+N for a signal (137 when a limit killed the tree); 126/127
    /// when the program could not be run.
    pub fn exit_code(&self) -> i32 {
        match &self.termination {
            Termination::Exited(c) => *c,
            Termination::Signaled(s) => 128 + s,
            Termination::NotRunnable(_, e) if *e == libc::ENOENT => 127,
            Termination::NotRunnable(..) => 126,
            Termination::TimedOut(_) => 124,
            Termination::MemoryLimit(_)
            | Termination::OutputLimit(_)
            | Termination::SandboxDied => 137,
        }
    }

    /// moat's one-line reason for a non-zero status, starting with `moat:`.
    pub fn reason(&self) -> Option<String> {
        Some(match &self.termination {
            Termination::Exited(0) => return None,
            Termination::Exited(c) => format!("moat: command exited with status {c}"),
            Termination::Signaled(s) => format!("moat: command killed by {}", signal_name(*s)),
            Termination::NotRunnable(p, e) => format!(
                "moat: cannot run {p:?}: {}",
                std::io::Error::from_raw_os_error(*e)
            ),
            Termination::TimedOut(d) => format!(
                "moat: time limit {} reached, process tree killed",
                moat_policy::units::format_duration(*d)
            ),
            Termination::MemoryLimit(m) => {
                format!("moat: memory limit {m} reached, process tree killed")
            }
            Termination::OutputLimit(o) => {
                format!("moat: output limit {o} reached, process tree killed")
            }
            Termination::SandboxDied => {
                "moat: the sandbox stopped unexpectedly, process tree killed".into()
            }
        })
    }
}

/// Where a new lease's workspace comes from.
#[derive(Debug, Clone, Default)]
pub enum WorkspaceSource {
    /// An empty directory in the lease's own storage.
    #[default]
    Fresh,
    /// A host directory bound read-write (the caller's own files).
    Host(PathBuf),
    /// A prepared directory copied into each fresh generation.
    Template(PathBuf),
}

#[derive(Debug, Clone, Default)]
pub struct LeaseOptions {
    /// A named lease keeps its files after release and can be reattached.
    pub name: Option<String>,
    pub workspace: WorkspaceSource,
    /// The egress door's namespace and client settings; required when the
    /// policy allows any destination.
    pub network: Option<NetworkAttachment>,
    /// Run as this host uid instead of one of moat's own (when moat is root):
    /// the owner of a host directory several leases share, such as a
    /// channel's group folder (docs/memory.md). The caller keeps the uid
    /// from other uses; uid 0 is refused.
    pub run_as: Option<u32>,
}

/// What a door gives a lease: the network namespace in which its listeners
/// live (loopback only), and the variables that point clients at it.
#[derive(Debug, Clone)]
pub struct NetworkAttachment {
    pub netns: Arc<OwnedFd>,
    pub env: Vec<(String, String)>,
    /// Files of the door's the sandbox sees read-only: (host path, absolute
    /// path under `/run/moat` inside), e.g. the CA bundle with the lease CA.
    pub files: Vec<(PathBuf, PathBuf)>,
}

struct Running {
    instance: Box<dyn Instance>,
    cgroup: Option<Cgroup>,
    /// Socket-proof views of host directories; unmounted after the kill.
    views: Vec<crate::view::View>,
    /// A `root_inside` lease's writable system layer; unmounted after the kill.
    sysroot: Option<crate::sysroot::SysRoot>,
}

/// A writable host directory to hand back after the sandbox wrote to it.
struct HandBack {
    root: PathBuf,
    /// The root's socket-proof view while the instance runs: the walk goes
    /// through it then, so the overlay never sees the directory change
    /// behind its back (it would keep stale entries).
    view: Option<PathBuf>,
    /// Paths (relative to `root`) the sandbox saw read-only.
    protected: Vec<PathBuf>,
}

pub struct Lease {
    id: String,
    named: bool,
    policy: Arc<SandboxPolicy>,
    backend: Arc<dyn Backend>,
    /// What the user must be told about this lease's files (a damaged
    /// workspace disk set aside).
    notices: Vec<String>,
    storage: Option<Storage>,
    _uid: Option<UidLock>,
    host_uid: u32,
    host_workspace: Option<PathBuf>,
    template: Option<PathBuf>,
    mounts: Vec<ResolvedMount>,
    running: Option<Running>,
    instances: u64,
    init_path: PathBuf,
    etc_dir: PathBuf,
    /// The policy's image, pinned to the version current at open (and
    /// locked against removal while the lease lives).
    image: Option<crate::image::InUse>,
    /// An empty read-only file and directory, bound over blocked entries.
    mask_sources: (PathBuf, PathBuf),
    /// `.git` directories of writable host roots to clear of a planted `commondir`.
    watched_git: Vec<PathBuf>,
    /// Writable host directories to make safe after each command (F8).
    hand_back: Vec<HandBack>,
    /// What the hand-back changed since the caller last took it.
    findings: Vec<crate::handback::Finding>,
    runtime_dir: PathBuf,
    /// Distinguishes this engine's cgroups from other moat data directories'.
    cgroup_scope: String,
    network: Option<NetworkAttachment>,
}

pub(crate) fn open_lease(
    engine: &Engine,
    backend: Arc<dyn crate::backend::Backend>,
    policy: SandboxPolicy,
    opts: LeaseOptions,
) -> Result<Lease> {
    if policy.backend == BackendKind::Local {
        let env_ok = std::env::var("MOAT_ALLOW_UNSANDBOXED").is_ok_and(|v| v == "1");
        if !(policy.allow_unsandboxed || env_ok) {
            return Err(SandboxError::Refused(
                "the local backend runs commands with NO isolation; it is refused unless the operator opts in with MOAT_ALLOW_UNSANDBOXED=1 or sandbox.allow_unsandboxed = true".into(),
            ));
        }
    }
    if policy.network.is_enabled() && opts.network.is_none() {
        return Err(SandboxError::Refused(
            "the policy allows network destinations but no egress door is attached; refusing to start without one".into(),
        ));
    }
    let mounts = resolve_mounts(&policy)?;
    let (host_workspace, template) = match &opts.workspace {
        WorkspaceSource::Fresh => (None, None),
        WorkspaceSource::Host(dir) => (Some(resolve_workspace(dir, &policy)?), None),
        WorkspaceSource::Template(dir) => {
            let real = std::fs::canonicalize(dir)
                .map_err(|e| SandboxError::Refused(format!("template {}: {e}", dir.display())))?;
            (None, Some(real))
        }
    };
    let (id, named) = match &opts.name {
        Some(n) => {
            crate::storage::check_name(n)?;
            (n.clone(), true)
        }
        None => (format!("tmp-{:016x}", random_u64()), false),
    };
    let dir = engine.leases_dir().join(&id);
    // The host uid: the workspace owner's for a host workspace (so its files
    // stay theirs), else a fresh uid of moat's own range, kept by named leases.
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let (uid_lock, host_uid) = if !root || policy.backend == BackendKind::Local {
        // SAFETY: as above.
        (None, unsafe { libc::geteuid() })
    } else if let Some(uid) = opts.run_as {
        if uid == 0 || host_workspace.is_some() {
            return Err(SandboxError::Refused(
                "a lease runs as a shared uid only without --workspace, and never as root".into(),
            ));
        }
        (None, uid)
    } else if let Some(ws) = &host_workspace {
        let owner = std::os::unix::fs::MetadataExt::uid(
            &std::fs::metadata(ws)
                .map_err(|e| SandboxError::io(format!("reading {}", ws.display()), e))?,
        );
        if owner == 0 {
            return Err(SandboxError::Refused(format!(
                "--workspace {}: it is owned by root, and sandboxed processes never run as root on the host; chown it to an unprivileged user (for example chown -R 1000:1000 {}) or leave --workspace out",
                ws.display(),
                ws.display()
            )));
        }
        (None, owner)
    } else if let Some(uid) = Storage::recorded_owner(&dir).or_else(|| {
        // After a host reboot the lease directory is gone, its disk is not.
        let size = policy.limits.persistent_disk?;
        if !named {
            return None;
        }
        crate::disk::DiskImage::of(&engine.config().data_dir, &id, size.bytes())
            .ok()?
            .recorded_owner()
    }) {
        let lock = UidLock::take(&engine.config().runtime_dir, uid)?;
        (Some(lock), uid)
    } else {
        let lock = UidLock::allocate(&engine.config().runtime_dir)?;
        let uid = lock.uid;
        (Some(lock), uid)
    };
    if root && policy.backend != BackendKind::Local {
        let files = opts.network.as_ref().map(|n| n.files.as_slice());
        crate::reach::require_lease_sources(
            host_uid,
            host_workspace.as_deref(),
            &mounts,
            files.unwrap_or_default(),
        )?;
    }
    if policy.root_inside
        && (policy.image.is_none() || policy.backend != BackendKind::Bwrap || !root)
    {
        return Err(SandboxError::Refused(
            "root_inside needs an image, the bwrap backend and moat running as root (it mounts the lease's writable layer)".into(),
        ));
    }
    let image = match &policy.image {
        Some(name) => Some(crate::image::open(&engine.config().data_dir, name)?),
        None => None,
    };
    let etc_dir = match &image {
        Some(i) => engine.image_etc_dir(&i.root)?,
        None => engine.etc_dir().to_path_buf(),
    };
    let fresh = !dir.join("uid").exists();
    let mut storage = match policy.limits.persistent_disk {
        Some(size) if named && root => Storage::open_on_disk(
            &dir,
            host_uid,
            crate::disk::DiskImage::of(&engine.config().data_dir, &id, size.bytes())?,
        )?,
        _ => Storage::open(&dir, host_uid, policy.limits.disk.bytes())?,
    };
    let notices = std::mem::take(&mut storage.notices);
    let mut lease = Lease {
        id,
        named,
        policy: Arc::new(policy),
        backend,
        storage: Some(storage),
        _uid: uid_lock,
        host_uid,
        host_workspace,
        template,
        mounts,
        running: None,
        instances: 0,
        init_path: engine.init_path().to_path_buf(),
        etc_dir,
        image,
        mask_sources: engine.mask_sources().clone(),
        watched_git: Vec::new(),
        hand_back: Vec::new(),
        findings: Vec::new(),
        notices,
        cgroup_scope: engine.cgroup_scope().to_string(),
        network: opts.network.clone(),
        runtime_dir: engine.config().runtime_dir.clone(),
    };
    if fresh {
        lease.fill_template()?;
    }
    Ok(lease)
}

impl Lease {
    pub fn id(&self) -> &str {
        &self.id
    }
    pub fn policy(&self) -> &SandboxPolicy {
        &self.policy
    }
    /// Host uid of the lease's processes.
    pub fn host_uid(&self) -> u32 {
        self.host_uid
    }

    #[allow(clippy::expect_used, reason = "storage is taken only in drop")]
    fn storage(&self) -> &Storage {
        self.storage
            .as_ref()
            .expect("storage lives as long as the lease")
    }

    /// The host directory the sandbox sees as /workspace.
    pub fn workspace_dir(&self) -> PathBuf {
        self.host_workspace
            .clone()
            .unwrap_or_else(|| self.storage().workspace())
    }

    /// The host directory of the lease's storage generation (workspace, home, tmp).
    pub fn storage_dir(&self) -> PathBuf {
        self.storage().root()
    }

    /// The host directory the sandbox sees as /home/agent (both backends bind it there).
    pub fn home_dir(&self) -> PathBuf {
        self.storage().home()
    }

    /// Host pids of the running instance's supervisor, if any.
    pub fn host_pids(&self) -> Vec<u32> {
        self.running
            .as_ref()
            .map(|r| r.instance.host_pids())
            .unwrap_or_default()
    }

    /// Cgroup directories of the running instance (for tests and diagnostics).
    pub fn cgroup_paths(&self) -> Vec<PathBuf> {
        self.running
            .as_ref()
            .and_then(|r| r.cgroup.as_ref())
            .map(|c| c.paths())
            .unwrap_or_default()
    }

    fn fill_template(&mut self) -> Result<()> {
        let Some(src) = self.template.clone() else {
            return Ok(());
        };
        let dst = self.storage().workspace();
        let status = std::process::Command::new("cp")
            .arg("-a")
            .arg("--no-preserve=ownership")
            .arg(format!("{}/.", src.display()))
            .arg(&dst)
            .status()
            .map_err(|e| SandboxError::io("running cp for the template", e))?;
        let chown = std::process::Command::new("chown")
            .arg("-R")
            .arg("-P")
            .arg(format!("{0}:{0}", self.host_uid))
            .arg(&dst)
            .status()
            .map_err(|e| SandboxError::io("running chown for the template", e))?;
        if !status.success() || !chown.success() {
            return Err(SandboxError::Start(format!(
                "copying the template {} into the lease failed (does it fit in limits.disk?)",
                src.display()
            )));
        }
        Ok(())
    }

    /// Every host directory the sandbox sees, as (host, in-sandbox, writable):
    /// a `--workspace DIR` first, then the extra mounts. The lease's own tmpfs
    /// places are not host data and are not listed.
    fn host_dirs(&self) -> Vec<(PathBuf, PathBuf, bool)> {
        let ws = self
            .host_workspace
            .iter()
            .map(|w| (w.clone(), PathBuf::from("/workspace"), true));
        let mounts = self
            .mounts
            .iter()
            .map(|m| (m.host.clone(), m.sandbox.clone(), m.writable));
        ws.chain(mounts).collect()
    }

    fn lease_env(&self) -> Result<LeaseEnv> {
        let st = self.storage();
        let workspace = self.workspace_dir();
        let mut protected = Vec::new();
        let mut mounts = self.mounts.clone();
        let prot = &self.policy.filesystem.protected;
        let dirs = self.host_dirs();
        for (host, inside, _) in dirs.iter().filter(|d| d.2) {
            let binds = protected_binds(host, inside, prot)?;
            // Their parent directories become mount points, which cannot be
            // renamed away (after the extra mounts they may lie in).
            mounts.extend(protected_parents(host, inside, &binds));
            protected.extend(binds);
        }
        // Secret-looking entries inside host directories (a project's `.env`,
        // a `.ssh` in a mounted home) are hidden behind empty read-only binds.
        let patterns = &self.policy.filesystem.blocked_patterns;
        let (empty_file, empty_dir) = &self.mask_sources;
        for (host, inside, _) in &dirs {
            for (path, is_dir) in blocked_inside(host, inside, patterns)? {
                protected.push((if is_dir { empty_dir } else { empty_file }.clone(), path));
            }
        }
        // The door's files (moat's own, not the user's): read-only, and only
        // under /run/moat, so they cannot cover anything of the sandbox's.
        if let Some(n) = &self.network {
            for (host, inside) in &n.files {
                if !inside.starts_with("/run/moat/")
                    || inside
                        .components()
                        .any(|c| matches!(c, std::path::Component::ParentDir))
                {
                    return Err(SandboxError::Refused(format!(
                        "a door file must live under /run/moat, not {}",
                        inside.display()
                    )));
                }
                protected.push((host.clone(), inside.clone()));
            }
        }
        Ok(LeaseEnv {
            id: self.id.clone(),
            instance: self.instances,
            policy: self.policy.clone(),
            host_uid: self.host_uid,
            workspace,
            home: st.home(),
            tmp: st.tmp(),
            etc: self.etc_dir.clone(),
            image: self.image.as_ref().map(|i| i.root.clone()),
            root_inside: false,
            mounts,
            protected,
            init_path: self.init_path.clone(),
            runtime_dir: self.runtime_dir.clone(),
            netns: self.network.as_ref().map(|n| n.netns.clone()),
        })
    }

    /// Starts the lease's sandbox if it is not running (a pool warms leases this way).
    pub fn start(&mut self) -> Result<()> {
        if let Some(r) = self.running.as_mut() {
            if r.instance.is_alive() {
                return Ok(());
            }
            self.stop();
        }
        self.instances += 1;
        let t0 = Instant::now();
        let env = self.lease_env()?;
        let roots: Vec<PathBuf> = self
            .host_dirs()
            .into_iter()
            .filter(|d| d.2)
            .map(|d| d.0)
            .collect();
        self.watched_git = crate::fsguard::git_dirs_without_commondir(&roots);
        self.hand_back = roots
            .iter()
            .map(|root| HandBack {
                protected: env
                    .protected
                    .iter()
                    .filter_map(|(host, _)| host.strip_prefix(root).ok())
                    .filter(|rel| !rel.as_os_str().is_empty())
                    .map(PathBuf::from)
                    .collect(),
                root: root.clone(),
                view: None,
            })
            .collect();
        let (mut env, views) = self.through_views(env)?;
        let sysroot = match (&self.image, self.policy.root_inside) {
            (Some(image), true) => {
                let base = self
                    .runtime_dir
                    .join("sysroots")
                    .join(&self.cgroup_scope)
                    .join(&self.id)
                    .join(self.instances.to_string());
                let s = crate::sysroot::mount_sysroot(
                    &image.root,
                    &self.storage().root(),
                    &base,
                    self.host_uid,
                )?;
                env.image = Some(s.merged.clone());
                env.root_inside = true;
                if let Some(conf) = crate::sysroot::apt_conf(&self.runtime_dir, &s.merged)? {
                    env.protected.push(conf);
                }
                Some(s)
            }
            _ => None,
        };
        for hb in &mut self.hand_back {
            hb.view = views
                .iter()
                .find(|v| v.host == hb.root)
                .map(|v| v.path.clone());
        }
        let cgroup = if self.backend.uses_host_cgroup() {
            Some(Cgroup::create(
                &crate::cgroup_name(&self.cgroup_scope, self.instances, &self.id),
                self.backend.host_cgroup_limits(&self.policy.limits),
            )?)
        } else {
            None
        };
        let procs = match &cgroup {
            Some(c) => c.procs_fds()?,
            None => Vec::new(),
        };
        let t1 = Instant::now();
        let instance = self.backend.start(&env, &procs)?;
        tracing::debug!(lease = %self.id, cgroup_us = (t1 - t0).as_micros() as u64, start_us = t1.elapsed().as_micros() as u64, "instance started");
        self.running = Some(Running {
            instance,
            cgroup,
            views,
            sysroot,
        });
        Ok(())
    }

    /// Kills every process of the lease and removes its cgroup; files stay,
    /// made safe for host users (see [`Lease::take_findings`]).
    pub fn stop(&mut self) {
        self.stop_instance();
        self.clear_planted_git_files();
    }

    /// Shows every host directory through a socket-proof view when the
    /// backend needs one (docs/threat-model.md N9): the workspace, mounts and protected
    /// binds that lie in a host directory are bound from its view instead.
    fn through_views(&self, mut env: LeaseEnv) -> Result<(LeaseEnv, Vec<crate::view::View>)> {
        if !self.backend.needs_socket_proof_views() {
            return Ok((env, Vec::new()));
        }
        let base = self
            .runtime_dir
            .join("views")
            .join(&self.cgroup_scope)
            .join(&self.id)
            .join(self.instances.to_string());
        let empty = self.runtime_dir.join("empty");
        let mut views = Vec::new();
        let mut map: Vec<(PathBuf, PathBuf)> = Vec::new();
        for (i, (host, _, writable)) in self.host_dirs().into_iter().enumerate() {
            let tag = format!("{}-{}-{i}", self.id, self.instances);
            let v = crate::view::mount(&host, writable, &base.join(i.to_string()), &empty, &tag)?;
            map.push((host, v.path.clone()));
            views.push(v);
        }
        // The deepest host directory first: a mount may lie inside the workspace.
        map.sort_by_key(|(h, _)| std::cmp::Reverse(h.components().count()));
        let remap = |p: &PathBuf| -> PathBuf {
            for (host, view) in &map {
                if let Ok(rest) = p.strip_prefix(host) {
                    return if rest.as_os_str().is_empty() {
                        view.clone()
                    } else {
                        view.join(rest)
                    };
                }
            }
            p.clone()
        };
        if self.host_workspace.is_some() {
            env.workspace = remap(&env.workspace);
        }
        for m in &mut env.mounts {
            m.host = remap(&m.host);
        }
        for (host, _) in &mut env.protected {
            *host = remap(host);
        }
        Ok((env, views))
    }

    /// Keeps a finding for [`Lease::take_findings`], at most 1,000 of them
    /// (a caller that never takes them must not make the lease grow).
    /// What the user must be told about the lease's files since it was
    /// opened (a damaged workspace disk set aside and replaced).
    pub fn take_notices(&mut self) -> Vec<String> {
        std::mem::take(&mut self.notices)
    }

    /// Whether the lease's files are on a persistent disk image.
    pub fn on_disk(&self) -> bool {
        self.storage.as_ref().is_some_and(Storage::on_disk)
    }

    fn note_finding(&mut self, f: crate::handback::Finding) {
        if self.findings.len() < 1000 {
            self.findings.push(f);
        }
    }

    /// What the hand-back changed in host directories since the last call
    /// (each is also logged): for the caller to show the user and audit.
    pub fn take_findings(&mut self) -> Vec<crate::handback::Finding> {
        std::mem::take(&mut self.findings)
    }

    fn stop_instance(&mut self) {
        if let Some(mut r) = self.running.take() {
            let t0 = Instant::now();
            r.instance.kill_all();
            drop(std::mem::take(&mut r.views));
            drop(r.sysroot.take());
            for hb in &mut self.hand_back {
                hb.view = None;
            }
            let t1 = Instant::now();
            if let Some(cg) = r.cgroup.take() {
                if let Err(e) = cg.remove() {
                    tracing::error!(lease = %self.id, error = %e, "cgroup removal failed");
                }
            }
            tracing::debug!(lease = %self.id, kill_us = (t1 - t0).as_micros() as u64, cgroup_us = t1.elapsed().as_micros() as u64, "instance stopped");
        }
    }

    /// Removes a `.git/commondir` the sandbox planted in a writable host
    /// repository (git never writes one there; host git would follow it to a
    /// config the sandbox wrote). Called after every command and at stop.
    fn clear_planted_git_files(&mut self) {
        let overlay = self.backend.needs_socket_proof_views();
        let mut found = Vec::new();
        for hb in &self.hand_back {
            let through = hb.view.as_ref().unwrap_or(&hb.root);
            for f in crate::handback::hand_back(through, self.host_uid, &hb.protected, overlay) {
                tracing::warn!(lease = %self.id, root = %hb.root.display(), "hand-back: {f}");
                found.push(f);
            }
        }
        for f in found {
            self.note_finding(f);
        }
        // A kept (named) lease's own files outlive the turn too, and an
        // operator may look at them on the host (a per-thread workspace):
        // hand them back the same way.
        let kept = match (&self.storage, self.named) {
            (Some(st), true) => vec![st.workspace(), st.home()],
            _ => Vec::new(),
        };
        for root in kept {
            for f in crate::handback::hand_back(&root, self.host_uid, &[], false) {
                tracing::warn!(lease = %self.id, root = %root.display(), "hand-back: {f}");
                self.note_finding(f);
            }
        }
        for g in &self.watched_git {
            // Through the view while one is mounted (see `HandBack::view`).
            let through = self
                .hand_back
                .iter()
                .find_map(|hb| {
                    let rest = g.strip_prefix(&hb.root).ok()?;
                    hb.view.as_ref().map(|v| v.join(rest))
                })
                .unwrap_or_else(|| g.clone());
            match crate::fsguard::remove_planted_commondir(&through) {
                Ok(true) => {
                    tracing::warn!(lease = %self.id, git_dir = %g.display(), "removed a .git/commondir planted by the sandbox")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(lease = %self.id, git_dir = %g.display(), error = %e, "could not check .git/commondir")
                }
            }
        }
    }

    fn command_env(&self, extra: &[(String, String)]) -> Vec<(String, String)> {
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        env.insert(
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        );
        env.insert("HOME".into(), "/home/agent".into());
        env.insert("LANG".into(), "C.UTF-8".into());
        env.insert("TERM".into(), "dumb".into());
        env.insert("USER".into(), "agent".into());
        for (k, v) in self.policy.env.iter() {
            env.insert(k.clone(), v.clone());
        }
        for (k, v) in self.network.iter().flat_map(|n| n.env.iter()) {
            env.insert(k.clone(), v.clone());
        }
        for (k, v) in extra {
            if k != "HOME" {
                env.insert(k.clone(), v.clone());
            }
        }
        env.into_iter().collect()
    }

    /// Runs one command to completion, streaming its output to `sink`.
    /// Errors mean the sandbox could not run it at all (exit 125 territory);
    /// everything the command itself did is in the outcome.
    pub fn run(
        &mut self,
        spec: RunSpec,
        sink: &mut dyn FnMut(Stream, &[u8]),
    ) -> Result<RunOutcome> {
        if spec.argv.is_empty() {
            return Err(SandboxError::Refused("no command given".into()));
        }
        self.start()?;
        let started = Instant::now();
        let timeout = spec.timeout.unwrap_or(self.policy.limits.timeout);
        let output_limit = self.policy.limits.output;
        let cmd = CommandLine {
            argv: spec.argv.clone(),
            env: self.command_env(&spec.env),
            cwd: spec.cwd.clone().unwrap_or_else(|| "/workspace".into()),
        };
        let pipe = || {
            nix::unistd::pipe2(OFlag::O_CLOEXEC)
                .map_err(|e| SandboxError::io("pipe", std::io::Error::from(e)))
        };
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        let mut writer = None;
        let stdin = match spec.stdin {
            StdinSource::Null => std::fs::File::open("/dev/null")
                .map_err(|e| SandboxError::io("opening /dev/null", e))?
                .into(),
            StdinSource::Fd(fd) => fd,
            StdinSource::Bytes(bytes) => {
                let (r, w) = pipe()?;
                writer = Some(std::thread::spawn(move || {
                    use std::io::Write;
                    let mut f = std::fs::File::from(w);
                    let _ = f.write_all(&bytes);
                }));
                r
            }
        };
        let oom_before = self
            .running
            .as_ref()
            .and_then(|r| r.cgroup.as_ref())
            .map(|c| c.oom_kills())
            .unwrap_or(0);
        #[allow(clippy::expect_used, reason = "started above")]
        let running = self.running.as_mut().expect("started above");
        let early = match running.instance.start_command(
            &cmd,
            ChildStdio {
                stdin,
                stdout: out_w,
                stderr: err_w,
            },
        ) {
            Ok(e) => e,
            Err(e) => {
                self.stop();
                return Err(e);
            }
        };
        for fd in [&out_r, &err_r] {
            let _ = nix::fcntl::fcntl(
                fd.as_raw_fd(),
                nix::fcntl::FcntlArg::F_SETFL(OFlag::O_NONBLOCK),
            );
        }
        let mut counts = [0u64; 2];
        let mut open = [true, true];
        let mut buf = vec![0u8; 64 * 1024];
        let deadline = started + timeout;
        let mut ended = early;
        let mut limit_hit: Option<Termination> = None;
        let fds: [RawFd; 2] = [out_r.as_raw_fd(), err_r.as_raw_fd()];

        // Reads what is there; returns false once the output limit is passed.
        let mut pump = |i: usize,
                        counts: &mut [u64; 2],
                        open: &mut [bool; 2],
                        sink: &mut dyn FnMut(Stream, &[u8])|
         -> bool {
            loop {
                // SAFETY: read into our own buffer from our own pipe.
                let n = unsafe { libc::read(fds[i], buf.as_mut_ptr().cast(), buf.len()) };
                if n > 0 {
                    let n = n as usize;
                    let total = counts[0] + counts[1];
                    let room = output_limit.bytes().saturating_sub(total) as usize;
                    let take = n.min(room);
                    if take > 0 {
                        sink(
                            if i == 0 {
                                Stream::Stdout
                            } else {
                                Stream::Stderr
                            },
                            &buf[..take],
                        );
                    }
                    counts[i] += take as u64;
                    if n > room {
                        return false;
                    }
                } else if n == 0 {
                    open[i] = false;
                    return true;
                } else {
                    return true; // EAGAIN or error: nothing more now
                }
            }
        };

        let status_fd = running.instance.status_fd();
        while ended.is_none() {
            let now = Instant::now();
            if now >= deadline {
                limit_hit = Some(Termination::TimedOut(timeout));
                break;
            }
            let mut pfds = vec![libc::pollfd {
                fd: status_fd,
                events: libc::POLLIN,
                revents: 0,
            }];
            for i in 0..2 {
                if open[i] {
                    pfds.push(libc::pollfd {
                        fd: fds[i],
                        events: libc::POLLIN,
                        revents: 0,
                    });
                }
            }
            let wait_ms = (deadline - now).as_millis().clamp(1, 1000) as i32;
            // SAFETY: poll over pollfds we built from live descriptors.
            let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, wait_ms) };
            if n < 0 {
                continue;
            }
            for i in 0..2 {
                if open[i] && !pump(i, &mut counts, &mut open, sink) {
                    limit_hit = Some(Termination::OutputLimit(output_limit));
                }
            }
            if limit_hit.is_some() {
                break;
            }
            if pfds[0].revents != 0 {
                match running.instance.poll_ended() {
                    Ok(e) => ended = e,
                    Err(e) => {
                        self.stop();
                        return Err(e);
                    }
                }
            }
        }
        if limit_hit.is_none() {
            // Whatever the command wrote before it ended is in the pipes now.
            for i in 0..2 {
                if open[i] && !pump(i, &mut counts, &mut open, sink) {
                    limit_hit = Some(Termination::OutputLimit(output_limit));
                }
            }
        }
        let oom = self
            .running
            .as_ref()
            .and_then(|r| r.cgroup.as_ref())
            .map(|c| c.oom_kills())
            .unwrap_or(0)
            > oom_before;
        let termination = match (limit_hit, ended) {
            (Some(t), _) => t,
            // Any OOM kill in the lease's cgroup during the command means the
            // memory limit fired, whichever process it hit (a shell's child, a
            // daemon): the whole tree is killed below and the limit reported.
            (None, Some(_)) if oom => Termination::MemoryLimit(self.policy.limits.memory),
            (None, Some(Ended::Exited(c))) => Termination::Exited(c),
            (None, Some(Ended::Signaled(s))) => Termination::Signaled(s),
            (None, Some(Ended::ExecFailed(e))) => Termination::NotRunnable(spec.argv[0].clone(), e),
            (None, Some(Ended::InstanceDied)) | (None, None) => Termination::SandboxDied,
        };
        if matches!(
            termination,
            Termination::TimedOut(_)
                | Termination::MemoryLimit(_)
                | Termination::OutputLimit(_)
                | Termination::SandboxDied
        ) {
            self.stop();
        }
        drop((out_r, err_r));
        if let Some(w) = writer {
            let _ = w.join();
        }
        self.clear_planted_git_files();
        Ok(RunOutcome {
            termination,
            duration: started.elapsed(),
            stdout_bytes: counts[0],
            stderr_bytes: counts[1],
        })
    }

    /// Returns the lease to a clean state: every process killed, a fresh empty
    /// storage generation (or the template again). O(1) in the size of the
    /// old files, which the kernel frees in the background.
    #[allow(clippy::expect_used, reason = "storage is taken only in drop")]
    pub fn reset(&mut self) -> Result<()> {
        self.stop();
        self.storage
            .as_mut()
            .expect("storage lives as long as the lease")
            .reset()?;
        self.fill_template()
    }

    /// Ends this use of the lease: processes stop; a named lease keeps its files
    /// for the next `attach`, an unnamed one is deleted.
    pub fn release(mut self) -> Result<()> {
        self.stop();
        if self.named {
            match self.storage.take() {
                Some(st) => st.close(),
                None => Ok(()),
            }
        } else {
            self.destroy_storage()
        }
    }

    /// Kills everything and deletes the lease's files, named or not.
    pub fn destroy(mut self) -> Result<()> {
        self.stop();
        self.destroy_storage()
    }

    fn destroy_storage(&mut self) -> Result<()> {
        match self.storage.take() {
            Some(s) => s.destroy(),
            None => Ok(()),
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop();
        if !self.named {
            if let Err(e) = self.destroy_storage() {
                tracing::error!(lease = %self.id, error = %e, "could not delete lease files");
            }
        } else if let Some(st) = self.storage.take() {
            // A kept lease's disk is unmounted (checked again at next open).
            if let Err(e) = st.close() {
                tracing::error!(lease = %self.id, error = %e, "could not unmount the lease's disk");
            }
        }
    }
}
