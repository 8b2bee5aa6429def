//! moat-sandbox: runs untrusted commands in isolated, limited, clean sandboxes.
//!
//! The [`Engine`] opens [`Lease`]s; a lease owns a sandbox's files (a
//! size-limited tmpfs), its host uid, its cgroup limits and its running
//! instance, started by one of the backends (`bwrap`, `gvisor`, `local`).
//! Security-relevant modules: `bwrap`, `gvisor`, `seccomp`, `cgroup`, `reach`,
//! `fsguard`, `storage`, `proto`. Nothing here reads moat's own configuration
//! or secrets, and nothing from moat's environment is passed into a sandbox.

// Outside input never reaches an `unwrap`/`expect` (house style); tests may.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod backend;
pub mod bwrap;
pub mod cgroup;
pub mod disk;
pub mod doctor;
pub mod error;
pub mod fsguard;
pub mod gvisor;
pub mod handback;
pub mod image;
pub mod lease;
pub mod local;
pub mod proto;
pub mod reach;
pub mod seal;
pub mod seccomp;
mod spawner;
pub mod storage;
pub mod sysroot;
pub mod versions;
pub mod view;
pub mod wipe;

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use moat_policy::{BackendKind, SandboxPolicy};

pub use error::{Result, SandboxError};
pub use lease::{
    Lease, LeaseOptions, NetworkAttachment, RunOutcome, RunSpec, StdinSource, Stream, Termination,
    WorkspaceSource,
};

/// Where the engine keeps things on the host.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// moat's own state; sandboxes mount nothing from here, so it may lie
    /// anywhere (under a home directory of mode 0700, say).
    pub data_dir: PathBuf,
    /// Everything a sandbox mounts: leases' storage (`leases/<scope>`), the
    /// installed copy of moat-init, the prepared /etc, the mask sources; and
    /// the uid locks. Every directory above it must let any uid search it.
    pub runtime_dir: PathBuf,
    /// The moat-init binary to install into sandboxes.
    pub init_path: PathBuf,
}

impl EngineConfig {
    /// Defaults: `MOAT_DATA_DIR`, `MOAT_RUNTIME_DIR`, `MOAT_INIT` if set; else
    /// /var/lib/moat and /run/moat for root, XDG directories otherwise; moat-init
    /// next to the running executable.
    pub fn from_env() -> EngineConfig {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| "/tmp".into());
        let data_dir = std::env::var_os("MOAT_DATA_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                if root {
                    "/var/lib/moat".into()
                } else {
                    std::env::var_os("XDG_DATA_HOME")
                        .map(PathBuf::from)
                        .unwrap_or_else(|| home.join(".local/share"))
                        .join("moat")
                }
            });
        let runtime_dir = std::env::var_os("MOAT_RUNTIME_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                if root {
                    "/run/moat".into()
                } else {
                    std::env::var_os("XDG_RUNTIME_DIR")
                        .map(|d| PathBuf::from(d).join("moat"))
                        .unwrap_or_else(|| {
                            PathBuf::from(format!("/tmp/moat-{}", nix::unistd::getuid()))
                        })
                }
            });
        let init_path = std::env::var_os("MOAT_INIT")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                std::env::current_exe()
                    .ok()
                    .and_then(|p| p.parent().map(|d| d.join("moat-init")))
                    .unwrap_or_else(|| "moat-init".into())
            });
        EngineConfig {
            data_dir,
            runtime_dir,
            init_path,
        }
    }
}

/// Creates leases for the backends it was opened with (one gateway may run
/// bwrap and gVisor channels side by side; each lease names its backend in
/// its policy).
pub struct Engine {
    config: EngineConfig,
    backends: Vec<(BackendKind, Arc<dyn backend::Backend>)>,
    installed_init: PathBuf,
    etc_dir: PathBuf,
    mask_sources: (PathBuf, PathBuf),
    cgroup_scope: String,
}

fn mkdir_mode(p: &Path, mode: u32) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(p)
        .map_err(|e| SandboxError::io(format!("creating {}", p.display()), e))?;
    // An existing directory keeps its mode unless we set it.
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .map_err(|e| SandboxError::io(format!("setting mode of {}", p.display()), e))
}

impl Engine {
    /// An engine for one backend.
    pub fn new(config: EngineConfig, kind: BackendKind) -> Result<Engine> {
        Engine::with_backends(config, &[kind])
    }

    /// An engine for each backend of `kinds` (duplicates are ignored); a
    /// lease's policy picks one of them.
    pub fn with_backends(config: EngineConfig, kinds: &[BackendKind]) -> Result<Engine> {
        // Sandboxes run as other uids and must traverse (not list) these.
        // The data directory stays traversable for a CLI template installed
        // under it (`moat agents install`'s default).
        mkdir_mode(&config.data_dir, 0o711)?;
        check_runtime_dir(&config.runtime_dir)?;
        mkdir_mode(&config.runtime_dir, 0o711)?;
        mkdir_mode(&config.runtime_dir.join("bin"), 0o755)?;
        mkdir_mode(&config.runtime_dir.join("views"), 0o711)?;
        mkdir_mode(&config.runtime_dir.join("empty"), 0o755)?;
        let cgroup_scope = scope_of(&config.data_dir);
        let leases = leases_dir_of(&config.runtime_dir, &cgroup_scope);
        mkdir_mode(&config.runtime_dir.join("leases"), 0o711)?;
        mkdir_mode(&leases, 0o711)?;
        let mut swept = sweep(&leases, &cgroup_scope);
        // Leases of a moat from before they moved to the runtime directory.
        let legacy = sweep(&config.data_dir.join("leases"), &cgroup_scope);
        swept.leases += legacy.leases;
        swept.cgroups += legacy.cgroups;
        if swept.leases + swept.cgroups > 0 {
            tracing::info!(
                leases = swept.leases,
                cgroups = swept.cgroups,
                "cleaned up after a moat process that died"
            );
        }
        sweep_views(&config, &cgroup_scope, &leases);
        let installed_init = install_init(&config)?;
        let etc_dir = prepare_etc(&config.runtime_dir, Some(Path::new("/etc")))?;
        let mask_sources = prepare_masks(&config.runtime_dir)?;
        let mut backends: Vec<(BackendKind, Arc<dyn backend::Backend>)> = Vec::new();
        for &kind in kinds {
            if backends.iter().any(|(k, _)| *k == kind) {
                continue;
            }
            let backend: Arc<dyn backend::Backend> = match kind {
                BackendKind::Bwrap => Arc::new(bwrap::BwrapBackend),
                BackendKind::Gvisor => Arc::new(gvisor::GvisorBackend::new(&config)?),
                BackendKind::Local => Arc::new(local::LocalBackend),
            };
            backends.push((kind, backend));
        }
        if backends.is_empty() {
            return Err(SandboxError::Refused(
                "an engine needs at least one sandbox backend".into(),
            ));
        }
        Ok(Engine {
            config,
            backends,
            installed_init,
            etc_dir,
            mask_sources,
            cgroup_scope,
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }
    /// The backends this engine runs.
    pub fn backends(&self) -> Vec<BackendKind> {
        self.backends.iter().map(|(k, _)| *k).collect()
    }
    /// The backend of `kind`, when this engine runs it.
    pub(crate) fn backend(&self, kind: BackendKind) -> Result<Arc<dyn backend::Backend>> {
        self.backends
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, b)| b.clone())
            .ok_or_else(|| {
                SandboxError::Refused(format!(
                    "this engine runs the {} backend, the policy asks for {}",
                    self.backends
                        .iter()
                        .map(|(k, _)| k.name())
                        .collect::<Vec<_>>()
                        .join(" and "),
                    kind.name()
                ))
            })
    }
    pub(crate) fn init_path(&self) -> &Path {
        &self.installed_init
    }
    pub(crate) fn cgroup_scope(&self) -> &str {
        &self.cgroup_scope
    }
    pub(crate) fn mask_sources(&self) -> &(PathBuf, PathBuf) {
        &self.mask_sources
    }
    pub(crate) fn etc_dir(&self) -> &Path {
        &self.etc_dir
    }
    /// The /etc prepared from an image's own (`image::etc_source`).
    pub(crate) fn image_etc_dir(&self, image: &Path) -> Result<PathBuf> {
        prepare_etc(
            &self.config.runtime_dir,
            image::etc_source(image).as_deref(),
        )
    }
    /// `<runtime_dir>/leases/<scope>`: this data directory's leases.
    pub fn leases_dir(&self) -> PathBuf {
        leases_dir_of(&self.config.runtime_dir, &self.cgroup_scope)
    }

    /// Opens a lease: a new one, or the named lease's kept files. The policy's
    /// backend must be one of this engine's.
    pub fn lease(&self, policy: SandboxPolicy, opts: LeaseOptions) -> Result<Lease> {
        let backend = self.backend(policy.backend)?;
        lease::open_lease(self, backend, policy, opts)
    }
}

/// Where the leases of the data directory whose scope is `scope` live.
pub(crate) fn leases_dir_of(runtime_dir: &Path, scope: &str) -> PathBuf {
    runtime_dir.join("leases").join(scope)
}

/// The leases' directory `config` gives, without starting an engine (for
/// tools and tests that look at leases from outside).
pub fn leases_dir(config: &EngineConfig) -> PathBuf {
    leases_dir_of(&config.runtime_dir, &scope_of(&config.data_dir))
}

/// Refuses a runtime directory the sandboxes could not reach, or one another
/// user owns (who could then swap the moat-init or /etc sandboxes run).
/// Without root, sandboxes run as moat's own uid and only ownership matters.
fn check_runtime_dir(dir: &Path) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if !dir.is_absolute() {
        return Err(SandboxError::Refused(format!(
            "MOAT_RUNTIME_DIR={}: must be an absolute path",
            dir.display()
        )));
    }
    reach::require_for_sandboxes(
            dir,
            &format!(
                "the runtime directory {} (MOAT_RUNTIME_DIR: what sandboxes mount, lease storage, moat-init, their /etc)",
                dir.display()
            ),
            "set MOAT_RUNTIME_DIR to a directory under one they can traverse (the default is /run/moat)",
        )?;
    match std::fs::metadata(dir) {
        Ok(m) if m.uid() != euid => Err(SandboxError::Refused(format!(
            "the runtime directory {} is owned by uid {}, not by moat's uid {euid}; remove it or set MOAT_RUNTIME_DIR to a directory moat creates",
            dir.display(),
            m.uid()
        ))),
        _ => Ok(()),
    }
}

/// Copies moat-init to a world-readable place under the runtime directory
/// (the sandbox's uid may not be able to reach the build or install tree).
fn install_init(config: &EngineConfig) -> Result<PathBuf> {
    let src = &config.init_path;
    let meta = std::fs::metadata(src).map_err(|e| {
        SandboxError::Start(format!(
            "moat-init not found at {} ({e}); build it with `cargo build` or set MOAT_INIT",
            src.display()
        ))
    })?;
    let dst = config.runtime_dir.join("bin").join(format!(
        "moat-init-{}-{}",
        meta.len(),
        meta.mtime_nsec() ^ meta.mtime()
    ));
    if !dst.exists() {
        let tmp = dst.with_extension(format!("tmp{:x}", storage::random_u64()));
        std::fs::copy(src, &tmp)
            .map_err(|e| SandboxError::io(format!("copying {}", src.display()), e))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| SandboxError::io("chmod moat-init", e))?;
        std::fs::rename(&tmp, &dst).map_err(|e| SandboxError::io("installing moat-init", e))?;
    }
    Ok(dst)
}

/// Builds (once per state of the host's /etc) the directory sandboxes see as
/// /etc: copies of the allowlisted entries, symlinks kept as symlinks, plus
/// moat's synthetic passwd, group and hosts. Named after a fingerprint of the
/// sources' sizes and times, so a host update (new CA certificates, new
/// libraries) produces a fresh copy; old copies stay for running sandboxes.
fn prepare_etc(runtime: &Path, source: Option<&Path>) -> Result<PathBuf> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let mut sources = Vec::new();
    source.hash(&mut h);
    let etc = source.unwrap_or(Path::new("/nonexistent"));
    for name in bwrap::ETC_ALLOWLIST {
        let p = etc.join(name);
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        (name, m.len(), m.mtime(), m.mtime_nsec(), m.ino()).hash(&mut h);
        sources.push(p);
    }
    // A directory's mtime changes when an entry is added or removed: enough to
    // notice new certificates or alternatives without listing every file.
    for sub in ["ssl/certs", "alternatives", "ld.so.conf.d", "profile.d"] {
        if let Ok(m) = std::fs::metadata(etc.join(sub)) {
            (sub, m.mtime(), m.mtime_nsec(), m.ino()).hash(&mut h);
        }
    }
    (
        storage::PASSWD,
        storage::GROUP,
        storage::HOSTS,
        storage::RESOLV,
    )
        .hash(&mut h);
    let dir = runtime.join(format!("etc-{:016x}", h.finish()));
    if dir.is_dir() {
        return Ok(dir);
    }
    let tmp = runtime.join(format!(".etc-tmp-{:016x}", storage::random_u64()));
    mkdir_mode(&tmp, 0o755)?;
    if !sources.is_empty() {
        let status = std::process::Command::new("cp")
            .arg("-a")
            .args(&sources)
            .arg(&tmp)
            .status()
            .map_err(|e| SandboxError::io("running cp to prepare the sandbox /etc", e))?;
        if !status.success() {
            return Err(SandboxError::Start(
                "copying the /etc allowlist failed".into(),
            ));
        }
    }
    for (name, text) in [
        ("passwd", storage::PASSWD),
        ("group", storage::GROUP),
        ("hosts", storage::HOSTS),
        ("resolv.conf", storage::RESOLV),
    ] {
        std::fs::write(tmp.join(name), text)
            .map_err(|e| SandboxError::io(format!("writing {name}"), e))?;
        std::fs::set_permissions(tmp.join(name), std::fs::Permissions::from_mode(0o644))
            .map_err(|e| SandboxError::io(format!("chmod {name}"), e))?;
    }
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        // Another process prepared the same copy first.
        Err(_) if dir.is_dir() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(dir)
        }
        Err(e) => Err(SandboxError::io("installing the sandbox /etc", e)),
    }
}

/// What `sweep` cleaned up.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    pub leases: usize,
    pub cgroups: usize,
}

/// Cleans up after moat processes that died without releasing their leases
/// (a crash, SIGKILL): for every lease of this data directory whose lock no
/// live process holds, its instance cgroups (of this `scope`) are emptied and
/// removed, and an unnamed lease's files are deleted (a named lease keeps its
/// files). Leases in use are never touched: their lock is held.
pub fn sweep(leases_dir: &Path, scope: &str) -> Swept {
    let mut swept = Swept::default();
    let cgroups = cgroup::instance_names();
    let lease_of = |cg: &str| -> Option<String> {
        let (s, rest) = cg.split_once('-')?;
        let (n, lease) = rest.split_once('-')?;
        (s == scope && n.bytes().all(|b| b.is_ascii_digit())).then(|| lease.to_string())
    };
    let Ok(rd) = std::fs::read_dir(leases_dir) else {
        return swept;
    };
    for e in rd.flatten() {
        let id = e.file_name().to_string_lossy().into_owned();
        let Ok(Some(st)) = storage::Storage::adopt_stale(&e.path()) else {
            continue;
        };
        for cg in cgroups
            .iter()
            .filter(|c| lease_of(c).as_deref() == Some(id.as_str()))
        {
            if cgroup::remove_stale(cg).is_ok() {
                swept.cgroups += 1;
            }
        }
        if id.starts_with("tmp-") {
            match st.destroy() {
                Ok(()) => swept.leases += 1,
                Err(err) => {
                    tracing::warn!(lease = %id, error = %err, "could not delete a dead lease")
                }
            }
        }
    }
    swept
}

/// Unmounts the socket-proof views and writable system layers of leases no
/// live moat holds (a crash).
pub(crate) fn sweep_views(config: &EngineConfig, scope: &str, leases: &Path) {
    let Ok(rd) = std::fs::read_dir(config.runtime_dir.join("views").join(scope)) else {
        return;
    };
    for e in rd.flatten() {
        let lease_dir = leases.join(e.file_name());
        let stale =
            !lease_dir.exists() || matches!(storage::Storage::adopt_stale(&lease_dir), Ok(Some(_)));
        if stale {
            view::sweep_one(&e.path());
        }
    }
    // The writable system layers of root_inside leases, laid out alike.
    let Ok(rd) = std::fs::read_dir(config.runtime_dir.join("sysroots").join(scope)) else {
        return;
    };
    for e in rd.flatten() {
        let lease_dir = leases.join(e.file_name());
        let stale =
            !lease_dir.exists() || matches!(storage::Storage::adopt_stale(&lease_dir), Ok(Some(_)));
        if stale {
            for inst in std::fs::read_dir(e.path()).into_iter().flatten().flatten() {
                sysroot::sweep_one(&inst.path());
            }
            let _ = std::fs::remove_dir(e.path());
        }
    }
}

/// The cgroup name of a lease's `n`th instance: `<scope>-<n>-<lease id>`.
pub(crate) fn cgroup_name(scope: &str, n: u64, lease: &str) -> String {
    format!("{scope}-{n}-{lease}")
}

/// A short, stable tag for a data directory, so two moat installations on one
/// host never touch each other's cgroups.
pub(crate) fn scope_of(data_dir: &Path) -> String {
    use std::hash::{Hash, Hasher};
    let real = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    let mut h = std::collections::hash_map::DefaultHasher::new();
    real.hash(&mut h);
    format!("{:08x}", h.finish() as u32)
}

/// An empty read-only file and an empty read-only directory, root-owned, bound
/// over blocked entries found inside mounted host directories.
fn prepare_masks(runtime: &Path) -> Result<(PathBuf, PathBuf)> {
    let dir = runtime.join("mask");
    mkdir_mode(&dir, 0o755)?;
    let empty_dir = dir.join("empty-dir");
    mkdir_mode(&empty_dir, 0o555)?;
    let empty_file = dir.join("empty-file");
    if std::fs::metadata(&empty_file)
        .map(|m| m.len() != 0)
        .unwrap_or(true)
    {
        std::fs::write(&empty_file, b"")
            .map_err(|e| SandboxError::io("creating the mask file", e))?;
    }
    std::fs::set_permissions(&empty_file, std::fs::Permissions::from_mode(0o444))
        .map_err(|e| SandboxError::io("chmod the mask file", e))?;
    Ok((empty_file, empty_dir))
}
