//! Root filesystem images (`moat image import/build/list/rm`, docs/images.md):
//! `<data_dir>/images/NAME/<version>/root`, sealed read-only and switched in
//! with the `current` symlink ([`crate::versions`]).
//!
//! Owns: importing a directory (copied by [`crate::seal::copy_tree`], which
//! never follows a link) or a tarball (unpacked by `tar` inside a bwrap
//! sandbox of an unprivileged uid that sees only the tarball and the scratch
//! directory), sealing the result (root-owned, no set-id bit, no device node,
//! FIFO or socket), refusing an image without `/bin/sh`, and resolving a name
//! to the root of its current version. Must never: resolve a link of an image
//! against the host's `/`, unpack a tarball outside a sandbox, or switch
//! `current` to a version that failed its checks.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::{Result, SandboxError};
use crate::seal::{self, SealMode};
use crate::versions::{self, VersionDir};

/// Versions kept per image (the current one and the one before, which
/// running sandboxes may still use).
pub const KEEP: usize = 2;
/// The metadata file next to a version's root.
pub const MANIFEST: &str = "image.json";

/// `<data_dir>/images`.
pub fn images_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("images")
}

fn check_name(name: &str) -> Result<()> {
    moat_policy::images::check_name(name).map_err(SandboxError::Refused)
}

/// The root directory of image `name`'s current version (the version is
/// pinned: a later import does not change what this path shows).
pub fn resolve(data_dir: &Path, name: &str) -> Result<PathBuf> {
    check_name(name)?;
    let dir = images_dir(data_dir).join(name);
    let missing = || {
        SandboxError::Refused(format!(
            "there is no image {name:?} in {} (see `moat image list`; make one with `moat image import {name} DIR|TARBALL`)",
            images_dir(data_dir).display()
        ))
    };
    let version = versions::current_of(&dir).ok_or_else(missing)?;
    let root = dir.join(version).join("root");
    if !root.is_dir() {
        return Err(missing());
    }
    Ok(root)
}

/// A version of an image in use by a lease: a shared lock on its manifest,
/// held while the lease lives, so that neither pruning after an import nor
/// `moat image rm` removes files a sandbox still sees.
#[derive(Debug)]
pub struct InUse {
    /// The version's root directory.
    pub root: PathBuf,
    _lock: std::fs::File,
}

/// [`resolve`], taking a shared lock on the version for as long as the
/// result lives.
pub fn open(data_dir: &Path, name: &str) -> Result<InUse> {
    let root = resolve(data_dir, name)?;
    let manifest = root.with_file_name(MANIFEST);
    let lock = std::fs::File::open(&manifest)
        .map_err(|e| SandboxError::io(format!("opening {}", manifest.display()), e))?;
    if lock.try_lock_shared().is_err() {
        return Err(SandboxError::Refused(format!(
            "the image {name:?} is being removed"
        )));
    }
    Ok(InUse { root, _lock: lock })
}

/// An exclusive lock on a version's manifest when no lease uses it; `None`
/// while one does (or the manifest cannot be opened).
fn unused(version_dir: &Path) -> Option<std::fs::File> {
    let f = std::fs::File::open(version_dir.join(MANIFEST)).ok()?;
    f.try_lock().ok()?;
    Some(f)
}

/// [`resolve`], and the image's root can be reached by sandbox uids (bwrap
/// binds it as the sandbox's own uid): for `moat up`, before it listens.
pub fn check_usable(data_dir: &Path, name: &str) -> Result<PathBuf> {
    let root = resolve(data_dir, name)?;
    crate::reach::require_for_sandboxes(
        &root,
        &format!("the image {name:?} at {}", root.display()),
        "let every user search the data directory (chmod o+x on it and its parents), or move it",
    )?;
    Ok(root)
}

/// One image, for `moat image list`.
#[derive(Debug, Clone)]
pub struct ImageInfo {
    pub name: String,
    pub current: Option<String>,
    pub versions: usize,
    /// What the current version's manifest says (source, bytes, ...).
    pub manifest: serde_json::Value,
}

/// Every image under the data directory, by name.
pub fn list(data_dir: &Path) -> Vec<ImageInfo> {
    let mut out: Vec<ImageInfo> = std::fs::read_dir(images_dir(data_dir))
        .map(|it| {
            it.flatten()
                .filter_map(|e| e.file_name().to_str().map(String::from))
                .filter(|n| check_name(n).is_ok())
                .map(|name| {
                    let dir = images_dir(data_dir).join(&name);
                    let current = versions::current_of(&dir);
                    let manifest = current
                        .as_ref()
                        .and_then(|v| std::fs::read(dir.join(v).join(MANIFEST)).ok())
                        .and_then(|b| serde_json::from_slice(&b).ok())
                        .unwrap_or(serde_json::Value::Null);
                    ImageInfo {
                        versions: versions::versions_of(&dir).len(),
                        name,
                        current,
                        manifest,
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Removes image `name` with all its versions.
pub fn remove(data_dir: &Path, name: &str) -> Result<()> {
    check_name(name)?;
    let dir = images_dir(data_dir).join(name);
    if std::fs::symlink_metadata(&dir).is_err() {
        return Err(SandboxError::Refused(format!("there is no image {name:?}")));
    }
    let vd = VersionDir::open(&dir, "moat image command")?;
    // Every version's lock is held until the directory is gone: a lease
    // opening the image meanwhile is refused, not left without files.
    let mut held = Vec::new();
    for v in vd.versions() {
        match unused(&vd.dir.join(&v)) {
            Some(f) => held.push(f),
            None => {
                return Err(SandboxError::Refused(format!(
                    "the image {name:?} (version {v}) is in use by a sandbox; stop the channels or sandboxes using it first"
                )))
            }
        }
    }
    let r = std::fs::remove_dir_all(&vd.dir)
        .map_err(|e| SandboxError::io(format!("removing {}", vd.dir.display()), e));
    drop(held);
    r
}

/// What an import did.
#[derive(Debug, Clone)]
pub struct Imported {
    pub version: String,
    pub root: PathBuf,
    pub sealed: seal::Sealed,
    /// Device nodes, FIFOs and sockets of the source that were not copied.
    pub skipped: Vec<PathBuf>,
}

/// Removes a scratch directory unless it was installed.
struct Scratch(Option<PathBuf>);

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// Imports `source` (a directory or a tarball, optionally compressed) as a new
/// version of image `name`. `runtime_dir` lends an unprivileged uid for
/// unpacking a tarball.
pub fn import(data_dir: &Path, runtime_dir: &Path, name: &str, source: &Path) -> Result<Imported> {
    import_as(
        data_dir,
        runtime_dir,
        name,
        source,
        &source.display().to_string(),
    )
}

/// [`import`], recording `label` as the image's source (`moat image build`
/// names its mmdebstrap run rather than a scratch tarball).
pub fn import_as(
    data_dir: &Path,
    runtime_dir: &Path,
    name: &str,
    source: &Path,
    label: &str,
) -> Result<Imported> {
    check_name(name)?;
    if !nix::unistd::geteuid().is_root() {
        return Err(SandboxError::Refused(
            "moat image import runs as root: images are sealed root-owned".into(),
        ));
    }
    let meta = std::fs::metadata(source)
        .map_err(|e| SandboxError::io(format!("reading {}", source.display()), e))?;
    let images = images_dir(data_dir);
    std::fs::create_dir_all(&images)
        .map_err(|e| SandboxError::io(format!("creating {}", images.display()), e))?;
    std::fs::set_permissions(&images, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .map_err(|e| SandboxError::io(format!("chmod {}", images.display()), e))?;
    let vd = VersionDir::open(&images.join(name), "moat image import")?;
    let staging = Scratch(Some(vd.staging(0o755)?));
    let stage = staging.0.clone().unwrap_or_default();
    let root = stage.join("root");
    std::fs::create_dir(&root)
        .map_err(|e| SandboxError::io(format!("creating {}", root.display()), e))?;
    let skipped = if meta.is_dir() {
        seal::copy_tree(source, &root)?.specials_skipped
    } else if meta.is_file() {
        unpack_in_sandbox(runtime_dir, source, &root)?;
        Vec::new()
    } else {
        return Err(SandboxError::Refused(format!(
            "{} is neither a directory nor a tarball",
            source.display()
        )));
    };
    let sealed = seal::seal(&root, SealMode::Image)?;
    // Sandbox uids traverse the root to bind its directories.
    std::fs::set_permissions(&root, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .map_err(|e| SandboxError::io(format!("chmod {}", root.display()), e))?;
    if !seal::has_shell(&root) {
        return Err(SandboxError::Refused(format!(
            "{} has no /bin/sh (nor /usr/bin/sh): moat runs commands through it; is it a root filesystem?",
            source.display()
        )));
    }
    let manifest = serde_json::json!({
        "name": name,
        "source": label,
        "bytes": sealed.bytes,
        "imported_at": versions::utc_stamp(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        ),
        "setid_stripped": sealed.setid_stripped.len(),
        "specials_dropped": sealed.specials_dropped.len() + skipped.len(),
    });
    std::fs::write(stage.join(MANIFEST), format!("{manifest:#}\n"))
        .map_err(|e| SandboxError::io("writing the image manifest", e))?;
    let version = vd.install(&stage)?;
    let mut staging = staging;
    staging.0 = None;
    // Old versions a running sandbox still uses stay until a later import.
    vd.prune_where(KEEP, |v| unused(v).is_some());
    Ok(Imported {
        root: vd.dir.join(&version).join("root"),
        version,
        sealed,
        skipped,
    })
}

/// Unpacks `tarball` into the empty directory `dest` with the host's `tar`,
/// inside a bwrap sandbox running as a fresh unprivileged uid: every namespace
/// unshared, the host's system directories read-only, the tarball read-only
/// at /in and `dest` writable at /out, nothing else. A member that is a link
/// pointing out resolves in that sandbox, where nothing is writable but /out;
/// device nodes cannot be made there (those failures are expected and left
/// out of the image).
fn unpack_in_sandbox(runtime_dir: &Path, tarball: &Path, dest: &Path) -> Result<()> {
    let lock = crate::storage::UidLock::allocate(runtime_dir)?;
    let uid = lock.uid;
    std::os::unix::fs::chown(dest, Some(uid), Some(uid))
        .map_err(|e| SandboxError::io(format!("chown {}", dest.display()), e))?;
    let mut args: Vec<String> = [
        "--unshare-all",
        "--unshare-user",
        "--disable-userns",
        "--die-with-parent",
        "--new-session",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
    ]
    .map(String::from)
    .to_vec();
    for d in crate::bwrap::SYSTEM_DIRS {
        let host = Path::new("/").join(d);
        match std::fs::symlink_metadata(&host) {
            Ok(m) if m.file_type().is_symlink() => {
                if let Ok(t) = std::fs::read_link(&host) {
                    args.extend([
                        "--symlink".into(),
                        t.display().to_string(),
                        host.display().to_string(),
                    ]);
                }
            }
            Ok(m) if m.is_dir() => {
                args.extend([
                    "--ro-bind".into(),
                    host.display().to_string(),
                    host.display().to_string(),
                ]);
            }
            _ => {}
        }
    }
    args.extend([
        "--ro-bind".into(),
        tarball.display().to_string(),
        "/in".into(),
        "--bind".into(),
        dest.display().to_string(),
        "/out".into(),
        "--chdir".into(),
        "/out".into(),
        "tar".into(),
        "-x".into(),
        "-p".into(),
        "--no-same-owner".into(),
        "-f".into(),
        "/in".into(),
        "-C".into(),
        "/out".into(),
    ]);
    let mut cmd = Command::new(crate::bwrap::BWRAP);
    cmd.args(&args)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: only async-signal-safe calls on plain values.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setresgid(uid, uid, uid) != 0
                    || libc::setresuid(uid, uid, uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let out = cmd.output().map_err(|e| {
        SandboxError::Start(format!(
            "cannot run {}: {e} (install bubblewrap)",
            crate::bwrap::BWRAP
        ))
    })?;
    let text = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| {
            !l.contains("Cannot mknod")
                && !l.contains("Exiting with failure status")
                && !l.contains("Removing leading")
        })
        .filter(|l| !l.trim().is_empty())
        .collect();
    let code = out.status.code();
    if !(code == Some(0) || code == Some(2) && errors.is_empty()) {
        return Err(SandboxError::Refused(format!(
            "unpacking {} failed: {}",
            tarball.display(),
            errors.last().copied().unwrap_or("tar failed")
        )));
    }
    drop(lock);
    Ok(())
}

/// Top-level names of an image moat never binds: its own places (/proc,
/// /dev, /sys, /tmp, /run, /home, /workspace), /etc (an allowlisted copy is
/// prepared instead) and what a sandbox has no use for.
const NOT_BOUND: &[&str] = &[
    "boot",
    "dev",
    "etc",
    "home",
    "lost+found",
    "media",
    "mnt",
    "proc",
    "run",
    "sys",
    "tmp",
    "workspace",
];

/// A top-level entry of the sandbox's root besides moat's own places.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SystemEntry {
    /// A directory bound read-only at `/<name>`.
    Dir { name: String, host: PathBuf },
    /// A symlink `/<name> -> target`, made inside (its target resolves there).
    Link { name: String, target: PathBuf },
}

/// The system directories a sandbox sees: the host's /usr, /bin, /lib...
/// (`bwrap::SYSTEM_DIRS`), or with an image every top-level directory and
/// symlink of the image's root but [`NOT_BOUND`].
/// With `with_etc`, an image's `etc` is listed too (a `root_inside` lease
/// sees its own, writable).
pub fn system_entries(image: Option<&Path>, with_etc: bool) -> Vec<SystemEntry> {
    let (root, names): (&Path, Vec<String>) = match image {
        None => (
            Path::new("/"),
            crate::bwrap::SYSTEM_DIRS
                .iter()
                .map(|s| s.to_string())
                .collect(),
        ),
        Some(root) => {
            let mut names: Vec<String> = std::fs::read_dir(root)
                .map(|it| {
                    it.flatten()
                        .filter_map(|e| e.file_name().to_str().map(String::from))
                        .filter(|n| !NOT_BOUND.contains(&n.as_str()) || (with_etc && n == "etc"))
                        .collect()
                })
                .unwrap_or_default();
            names.sort();
            (root, names)
        }
    };
    let mut out = Vec::new();
    for name in names {
        let host = root.join(&name);
        match std::fs::symlink_metadata(&host) {
            Ok(m) if m.file_type().is_symlink() => {
                if let Ok(target) = std::fs::read_link(&host) {
                    out.push(SystemEntry::Link { name, target });
                }
            }
            Ok(m) if m.is_dir() => out.push(SystemEntry::Dir { name, host }),
            _ => {}
        }
    }
    out
}

/// The directory whose allowlisted entries become the sandbox's /etc: the
/// image's own `etc` when it is a real directory (never a link, which would
/// resolve on the host), else none.
pub fn etc_source(image: &Path) -> Option<PathBuf> {
    let etc = image.join("etc");
    std::fs::symlink_metadata(&etc)
        .is_ok_and(|m| m.is_dir())
        .then_some(etc)
}
