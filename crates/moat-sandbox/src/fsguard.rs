//! Real-path checks for everything the host binds into a sandbox, and the one
//! way the host opens files a sandbox left behind.
//!
//! Owns the rule that a host path is judged by its *canonical* form (all
//! symlinks resolved) and that only that canonical form is handed to a backend;
//! and the rule that a file inside a sandbox-writable directory is opened
//! without following any symlink ([`open_in_workspace`]). Never binds anything.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use moat_policy::paths::{blocked_component, check_sandbox_path};
use moat_policy::SandboxPolicy;

use crate::error::{Result, SandboxError};

/// A mount whose host side is canonical and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedMount {
    pub host: PathBuf,
    pub sandbox: PathBuf,
    pub writable: bool,
}

fn refused(host: &Path, sandbox: &Path, reason: String) -> SandboxError {
    SandboxError::MountRefused {
        host: host.to_path_buf(),
        sandbox: sandbox.to_path_buf(),
        reason,
    }
}

/// Resolves and checks every extra mount of the policy.
///
/// Invariant: each returned `host` is canonical, lies under a canonical allowed
/// root, and neither the requested nor the real path has a blocked component.
pub fn resolve_mounts(policy: &SandboxPolicy) -> Result<Vec<ResolvedMount>> {
    let fs = &policy.filesystem;
    if fs.mounts.is_empty() {
        return Ok(Vec::new());
    }
    let roots: Vec<PathBuf> = fs
        .allowed_roots
        .iter()
        .filter_map(|r| std::fs::canonicalize(r).ok())
        .collect();
    let mut out = Vec::new();
    for m in &fs.mounts {
        check_sandbox_path(&m.sandbox).map_err(|r| refused(&m.host, &m.sandbox, r))?;
        let real = std::fs::canonicalize(&m.host).map_err(|e| {
            refused(
                &m.host,
                &m.sandbox,
                format!("the host path cannot be resolved: {e}"),
            )
        })?;
        if roots.is_empty() {
            return Err(refused(
                &m.host,
                &m.sandbox,
                "no filesystem.allowed_roots are configured, so no extra mount is allowed; add its parent directory to filesystem.allowed_roots in the policy file".into(),
            ));
        }
        if !roots.iter().any(|r| real.starts_with(r)) {
            return Err(refused(
                &m.host,
                &m.sandbox,
                format!(
                    "its real path {} is outside the allowed roots ({})",
                    real.display(),
                    roots
                        .iter()
                        .map(|r| r.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        for p in [&m.host, &real] {
            if let Some(pat) = blocked_component(p, &fs.blocked_patterns) {
                return Err(refused(
                    &m.host,
                    &m.sandbox,
                    format!("{} matches the blocked pattern {pat:?}", p.display()),
                ));
            }
        }
        out.push(ResolvedMount {
            host: real,
            sandbox: m.sandbox.clone(),
            writable: m.writable,
        });
    }
    Ok(out)
}

/// Checks a host directory used as the workspace: it must exist, be a
/// directory, not be `/`, and contain no blocked component in its real path.
pub fn resolve_workspace(dir: &Path, policy: &SandboxPolicy) -> Result<PathBuf> {
    let real = std::fs::canonicalize(dir).map_err(|e| {
        SandboxError::Refused(format!(
            "--workspace {}: cannot be resolved: {e}",
            dir.display()
        ))
    })?;
    if !real.is_dir() {
        return Err(SandboxError::Refused(format!(
            "--workspace {}: not a directory",
            dir.display()
        )));
    }
    if real.parent().is_none() {
        return Err(SandboxError::Refused(
            "--workspace /: the host's root directory cannot be a workspace".into(),
        ));
    }
    if let Some(pat) = blocked_component(&real, &policy.filesystem.blocked_patterns) {
        return Err(SandboxError::Refused(format!(
            "--workspace {}: its real path matches the blocked pattern {pat:?}",
            dir.display()
        )));
    }
    Ok(real)
}

/// The protected paths (relative, e.g. `.git/hooks`) that exist inside a
/// writable host directory, as (host path, in-sandbox path) pairs to bind
/// read-only. A protected path that is a symlink, or whose real path leaves
/// `dir`, refuses the start: binding it would expose what it points at.
pub fn protected_binds(
    dir: &Path,
    in_sandbox: &Path,
    protected: &[String],
) -> Result<Vec<(PathBuf, PathBuf)>> {
    let mut out = Vec::new();
    for rel in protected {
        let host = dir.join(rel);
        let Ok(meta) = std::fs::symlink_metadata(&host) else {
            continue;
        };
        let real = std::fs::canonicalize(&host).ok();
        if meta.file_type().is_symlink() || real.as_deref() != Some(host.as_path()) {
            return Err(SandboxError::Refused(format!(
                "protected path {} is a symlink or leads outside {}; remove it before starting a sandbox here",
                host.display(),
                dir.display()
            )));
        }
        out.push((host, in_sandbox.join(rel)));
    }
    Ok(out)
}

/// The directories between a writable root and each of its protected paths
/// (`.git` for `.git/hooks`), shallowest first, to bind read-write onto
/// themselves before the protected binds. A mount point cannot be renamed or
/// removed (EBUSY), so the agent cannot move `.git` aside, carrying the
/// read-only binds with it, and put a `.git` of its own in its place.
/// `protected` is what [`protected_binds`] returned for `dir`.
pub fn protected_parents(
    dir: &Path,
    in_sandbox: &Path,
    protected: &[(PathBuf, PathBuf)],
) -> Vec<ResolvedMount> {
    let mut rels: Vec<PathBuf> = Vec::new();
    for (host, _) in protected {
        let Ok(rel) = host.strip_prefix(dir) else {
            continue;
        };
        for parent in rel.ancestors().skip(1) {
            if !parent.as_os_str().is_empty() && !rels.iter().any(|r| r == parent) {
                rels.push(parent.to_path_buf());
            }
        }
    }
    rels.sort_by_key(|r| r.components().count());
    rels.into_iter()
        .map(|rel| ResolvedMount {
            host: dir.join(&rel),
            sandbox: in_sandbox.join(&rel),
            writable: true,
        })
        .collect()
}

/// `struct open_how` of openat2(2).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// Flags for the final component: read only, never through a symlink, never
/// block (a FIFO), never become a controlling terminal.
const READ_FLAGS: libc::c_int =
    libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC;

fn cstring(name: &[u8]) -> io::Result<CString> {
    CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

fn check_fd(n: libc::c_long) -> io::Result<OwnedFd> {
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this new descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(n as RawFd) })
}

/// openat2 confined beneath `dir`, with no symlink anywhere on the way.
fn open_beneath(dir: &OwnedFd, names: &[&OsStr]) -> io::Result<OwnedFd> {
    let joined: Vec<u8> = names
        .iter()
        .map(|n| n.as_bytes())
        .collect::<Vec<_>>()
        .join(&b'/');
    let path = cstring(&joined)?;
    let how = OpenHow {
        flags: READ_FLAGS as u64,
        mode: 0,
        resolve: libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: openat2 with a descriptor we own, a NUL-terminated path and an
    // open_how of the size we pass.
    check_fd(unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            path.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    })
}

/// The same without openat2: one component at a time, each with O_NOFOLLOW,
/// so no symlink is followed and `..` never appears (the caller refused it).
fn open_walking(dir: OwnedFd, names: &[&OsStr]) -> io::Result<OwnedFd> {
    let (last, parents) = names
        .split_last()
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut cur = dir;
    for name in parents {
        let c = cstring(name.as_bytes())?;
        let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: openat on a descriptor we own with a NUL-terminated name.
        cur = check_fd(unsafe { libc::openat(cur.as_raw_fd(), c.as_ptr(), flags) }.into())?;
    }
    let c = cstring(last.as_bytes())?;
    // SAFETY: as above.
    check_fd(unsafe { libc::openat(cur.as_raw_fd(), c.as_ptr(), READ_FLAGS) }.into())
}

/// Opens a file inside `root` (a lease's workspace, or any directory a sandbox
/// could write) for reading, the way moat must read what a sandbox left behind
/// (artifacts, logs): `relative` must be a plain relative path (no `/` at the
/// start, no `..`); no component may be a symlink, so neither a planted symlink
/// nor a rename race can lead outside `root`; and the result must be a regular
/// file (a FIFO would block the reader, a device would read the host's).
///
/// Uses openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS);
/// where the kernel or a container's seccomp profile refuses openat2, walks the
/// path one component at a time with `O_NOFOLLOW`. A symlink fails with
/// `ELOOP` (or `ENOTDIR`); a bad path or a non-regular file with
/// `ErrorKind::InvalidInput`.
pub fn open_in_workspace(root: &Path, relative: &Path) -> io::Result<File> {
    let invalid = |why: &str| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: {why}", relative.display()),
        )
    };
    let mut names = Vec::new();
    for c in relative.components() {
        match c {
            Component::Normal(n) => names.push(n),
            Component::CurDir => {}
            _ => return Err(invalid("not a plain relative path inside the workspace")),
        }
    }
    if names.is_empty() {
        return Err(invalid("names no file"));
    }
    let dir = OwnedFd::from(
        File::options()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(root)?,
    );
    let fd = match open_beneath(&dir, &names) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EPERM)) => {
            open_walking(dir, &names)?
        }
        other => other?,
    };
    let file = File::from(fd);
    if !file.metadata()?.file_type().is_file() {
        return Err(invalid("not a regular file"));
    }
    // SAFETY: fcntl on a descriptor we own: clear O_NONBLOCK again.
    unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, 0) };
    Ok(file)
}

/// Entries a mount may hold before moat gives up looking inside it for
/// blocked names (and refuses the mount rather than show it unchecked).
pub const MAX_SCANNED_ENTRIES: usize = 200_000;

/// Directories never descended into while looking for blocked names: large,
/// and named by tools, not people (`.git/objects`, `node_modules`).
fn skip_descent(rel: &Path) -> bool {
    rel.ends_with("node_modules") || rel.ends_with(".git/objects")
}

/// The entries under the host directory `root` (bound at `inside`) whose path
/// matches a blocked pattern, as (in-sandbox path, is a directory). Symlinks
/// are never followed (inside the sandbox they resolve within the sandbox) and
/// never reported. The caller hides each hit behind an empty read-only bind.
pub fn blocked_inside(
    root: &Path,
    inside: &Path,
    patterns: &[String],
) -> Result<Vec<(PathBuf, bool)>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    let mut seen = 0usize;
    while let Some(rel) = stack.pop() {
        // A directory that cannot be listed cannot be checked: refuse rather
        // than show it unchecked (one that vanished meanwhile is simply gone).
        let rd = match std::fs::read_dir(root.join(&rel)) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(SandboxError::Refused(format!(
                    "cannot check {} for secret-looking entries: {e}",
                    root.join(&rel).display()
                )))
            }
        };
        for entry in rd.flatten() {
            seen += 1;
            if seen > MAX_SCANNED_ENTRIES {
                return Err(SandboxError::Refused(format!(
                    "{} holds more than {MAX_SCANNED_ENTRIES} entries; moat hides secret-looking files in every mount and cannot check this one; mount a smaller directory",
                    root.display()
                )));
            }
            let Ok(ft) = entry.file_type() else { continue };
            let child = rel.join(entry.file_name());
            if ft.is_symlink() {
                continue;
            }
            if blocked_component(&child, patterns).is_some() {
                out.push((inside.join(&child), ft.is_dir()));
            } else if ft.is_dir() && !skip_descent(&child) {
                stack.push(child);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The `.git` directories of writable host roots that have no `commondir`
/// file now: a `commondir` that appears there later was planted by the sandbox.
pub fn git_dirs_without_commondir(roots: &[PathBuf]) -> Vec<PathBuf> {
    roots
        .iter()
        .map(|r| r.join(".git"))
        .filter(|g| std::fs::symlink_metadata(g).is_ok_and(|m| m.is_dir()))
        .filter(|g| std::fs::symlink_metadata(g.join("commondir")).is_err())
        .collect()
}

/// Removes a `commondir` entry (file or symlink, never followed) planted in a
/// main repository's `.git`, where git never writes one: it would point host
/// `git` at a config the sandbox wrote. Returns whether one was removed.
pub fn remove_planted_commondir(git_dir: &Path) -> io::Result<bool> {
    let c = CString::new(git_dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: open(2) of a NUL-terminated path; the result is checked.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_RDONLY,
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::NotFound {
            Ok(false)
        } else {
            Err(e)
        };
    }
    // SAFETY: fd is fresh from open.
    let dir = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: unlinkat relative to a directory we hold; a symlink is removed, not followed.
    if unsafe { libc::unlinkat(dir.as_raw_fd(), c"commondir".as_ptr(), 0) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::EISDIR) => Ok(false),
        _ => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::fs::symlink;

    fn read(f: io::Result<File>) -> io::Result<String> {
        let mut s = String::new();
        f?.read_to_string(&mut s)?;
        Ok(s)
    }

    /// A workspace with a file, a subdirectory, and a secret outside it.
    fn fixture() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let ws = t.path().join("ws");
        std::fs::create_dir_all(ws.join("sub")).unwrap();
        std::fs::write(ws.join("a.txt"), "inside").unwrap();
        std::fs::write(ws.join("sub/b.txt"), "deeper").unwrap();
        let secret = t.path().join("secret");
        std::fs::write(&secret, "SECRET").unwrap();
        (t, ws, secret)
    }

    fn errno(e: io::Error) -> i32 {
        e.raw_os_error().unwrap_or(-1)
    }

    #[test]
    fn parents_of_protected_paths_are_pinned_shallowest_first() {
        let binds = vec![
            (
                PathBuf::from("/r/.git/hooks"),
                PathBuf::from("/workspace/.git/hooks"),
            ),
            (
                PathBuf::from("/r/.git/config"),
                PathBuf::from("/workspace/.git/config"),
            ),
            (PathBuf::from("/r/a/b/c"), PathBuf::from("/workspace/a/b/c")),
            (PathBuf::from("/r/top"), PathBuf::from("/workspace/top")),
        ];
        let pins = protected_parents(Path::new("/r"), Path::new("/workspace"), &binds);
        let got: Vec<(&str, &str, bool)> = pins
            .iter()
            .map(|m| {
                (
                    m.host.to_str().unwrap(),
                    m.sandbox.to_str().unwrap(),
                    m.writable,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("/r/.git", "/workspace/.git", true),
                ("/r/a", "/workspace/a", true),
                ("/r/a/b", "/workspace/a/b", true),
            ]
        );
    }

    #[test]
    fn plain_files_inside_open() {
        let (_t, ws, _) = fixture();
        assert_eq!(
            read(open_in_workspace(&ws, Path::new("a.txt"))).unwrap(),
            "inside"
        );
        assert_eq!(
            read(open_in_workspace(&ws, Path::new("./sub/b.txt"))).unwrap(),
            "deeper"
        );
    }

    #[test]
    fn symlinks_anywhere_are_refused() {
        let (_t, ws, secret) = fixture();
        symlink(&secret, ws.join("abs")).unwrap();
        symlink("../secret", ws.join("rel")).unwrap();
        symlink("a.txt", ws.join("inner")).unwrap();
        symlink(secret.parent().unwrap(), ws.join("dirlink")).unwrap();
        symlink("/proc/self/root/etc", ws.join("magic")).unwrap();
        for p in ["abs", "rel", "inner", "dirlink/secret", "magic/passwd"] {
            let e = open_in_workspace(&ws, Path::new(p)).unwrap_err();
            assert!(
                matches!(errno(e), libc::ELOOP | libc::ENOTDIR | libc::EXDEV),
                "{p}"
            );
        }
    }

    #[test]
    fn dotdot_absolute_and_empty_paths_are_refused() {
        let (_t, ws, _) = fixture();
        for p in [
            "../secret",
            "sub/../../secret",
            "sub/..",
            "/etc/passwd",
            "",
            ".",
        ] {
            let e = open_in_workspace(&ws, Path::new(p)).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{p}: {e}");
        }
    }

    #[test]
    fn fifos_and_directories_are_refused_without_blocking() {
        let (_t, ws, _) = fixture();
        let fifo = cstring(ws.join("fifo").as_os_str().as_bytes()).unwrap();
        // SAFETY: mkfifo with a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        for p in ["fifo", "sub"] {
            let e = open_in_workspace(&ws, Path::new(p)).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{p}: {e}");
        }
    }

    #[test]
    fn the_fallback_walk_refuses_symlinks_too() {
        let (_t, ws, secret) = fixture();
        symlink(&secret, ws.join("abs")).unwrap();
        symlink(secret.parent().unwrap(), ws.join("dirlink")).unwrap();
        let open = |p: &str| {
            let dir = OwnedFd::from(File::open(&ws).unwrap());
            let names: Vec<&OsStr> = Path::new(p).iter().collect();
            open_walking(dir, &names).map(File::from)
        };
        assert_eq!(read(open("sub/b.txt")).unwrap(), "deeper");
        for p in ["abs", "dirlink/secret"] {
            let e = open(p).unwrap_err();
            assert!(matches!(errno(e), libc::ELOOP | libc::ENOTDIR), "{p}");
        }
    }
}
