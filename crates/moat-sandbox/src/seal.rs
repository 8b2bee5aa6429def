//! Sealing trees that sandboxes will see read-only (the agents template, root
//! filesystem images), copying a tree without following its symlinks, and
//! resolving a path inside an image's own root.
//!
//! Owns: giving every entry to root, normalising modes (no set-id bit ever
//! survives), dropping device nodes, FIFOs and sockets, and the copy of a
//! host directory into a scratch directory. Must never: follow a symlink of
//! the tree (entries are opened relative to their parent's descriptor with
//! `O_NOFOLLOW`, symlinks are read with `readlinkat` and `lchown`ed, never
//! opened), resolve anything of an image against the host's `/`, or be called
//! on a tree some process may still change.

use std::ffi::{CStr, CString, OsStr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::error::{Result, SandboxError};

/// How modes are normalised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealMode {
    /// Directories and executables 0755, other files 0644 (the agents template).
    Template,
    /// The image's own modes without the set-user-id and set-group-id bits.
    Image,
}

/// What sealing did.
#[derive(Debug, Default, Clone)]
pub struct Sealed {
    /// Disk usage in bytes (each hard-linked inode once).
    pub bytes: u64,
    /// Files whose set-uid or set-gid bit was removed (relative to the root).
    pub setid_stripped: Vec<PathBuf>,
    /// Device nodes, FIFOs and sockets removed (relative to the root).
    pub specials_dropped: Vec<PathBuf>,
}

/// Gives everything under `root` to root (uid and gid 0), normalises modes
/// per `mode`, and removes FIFOs, sockets and device nodes.
///
/// Invariant: never follows a symlink (symlinks are `lchown`ed, never
/// opened), and is only called once nothing else changes the tree.
pub fn seal(root: &Path, mode: SealMode) -> Result<Sealed> {
    let mut out = Sealed::default();
    let mut linked = std::collections::HashSet::new();
    let mut stack = vec![root.to_path_buf()];
    let rel = |p: &Path| p.strip_prefix(root).unwrap_or(p).to_path_buf();
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p)
            .map_err(|e| SandboxError::io(format!("reading {}", p.display()), e))?;
        if meta.nlink() < 2 || meta.is_dir() || linked.insert((meta.dev(), meta.ino())) {
            out.bytes += meta.blocks() * 512;
        }
        let ft = meta.file_type();
        if ft.is_symlink() {
            std::os::unix::fs::lchown(&p, Some(0), Some(0))
                .map_err(|e| SandboxError::io(format!("chown {}", p.display()), e))?;
            continue;
        }
        if !(ft.is_dir() || ft.is_file()) {
            std::fs::remove_file(&p).map_err(|e| {
                SandboxError::io(format!("removing the special file {}", p.display()), e)
            })?;
            out.specials_dropped.push(rel(&p));
            continue;
        }
        std::os::unix::fs::lchown(&p, Some(0), Some(0))
            .map_err(|e| SandboxError::io(format!("chown {}", p.display()), e))?;
        let old = meta.mode() & 0o7777;
        let new = match mode {
            SealMode::Template if ft.is_dir() || old & 0o111 != 0 => 0o755,
            SealMode::Template => 0o644,
            SealMode::Image => old & 0o1777,
        };
        if old & 0o6000 != 0 && !ft.is_dir() {
            out.setid_stripped.push(rel(&p));
        }
        // chown may have cleared set-id bits already; always write the mode.
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(new))
            .map_err(|e| SandboxError::io(format!("chmod {}", p.display()), e))?;
        if ft.is_dir() {
            let entries = std::fs::read_dir(&p)
                .map_err(|e| SandboxError::io(format!("listing {}", p.display()), e))?;
            for e in entries {
                let e = e.map_err(|e| SandboxError::io(format!("listing {}", p.display()), e))?;
                stack.push(e.path());
            }
        }
    }
    Ok(out)
}

fn errno(what: String) -> impl FnOnce(nix::Error) -> SandboxError {
    move |e| SandboxError::io(what, std::io::Error::from(e))
}

fn cname(name: &OsStr) -> Result<CString> {
    CString::new(name.as_bytes())
        .map_err(|_| SandboxError::Refused("a file name contains a NUL byte".into()))
}

fn open_dir_at(dir: &OwnedFd, name: &CStr, at: &Path) -> Result<OwnedFd> {
    use nix::fcntl::OFlag;
    let fd = nix::fcntl::openat(
        Some(dir.as_raw_fd()),
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(errno(format!("opening {}", at.display())))?;
    // SAFETY: openat returned a fresh descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// What [`copy_tree`] left out.
#[derive(Debug, Default, Clone)]
pub struct Copied {
    /// Device nodes, FIFOs and sockets not copied (relative to the source).
    pub specials_skipped: Vec<PathBuf>,
}

/// Copies the directory `src` into the existing empty directory `dst`:
/// directories, regular files (contents and permission bits without set-id)
/// and symlinks as symlinks (their targets copied as text, never resolved).
/// Device nodes, FIFOs and sockets are skipped. Hard links become copies.
pub fn copy_tree(src: &Path, dst: &Path) -> Result<Copied> {
    let open = |p: &Path| -> Result<OwnedFd> {
        let fd = nix::fcntl::open(
            p,
            nix::fcntl::OFlag::O_RDONLY
                | nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(errno(format!("opening the directory {}", p.display())))?;
        // SAFETY: open returned a fresh descriptor we now own.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    };
    let (s, d) = (open(src)?, open(dst)?);
    let mode = std::fs::metadata(src)
        .map_err(|e| SandboxError::io(format!("reading {}", src.display()), e))?
        .mode();
    let mut out = Copied::default();
    copy_dir(&s, &d, src, Path::new(""), 0, &mut out)?;
    nix::sys::stat::fchmod(
        d.as_raw_fd(),
        nix::sys::stat::Mode::from_bits_truncate(mode & 0o1777),
    )
    .map_err(errno(format!("chmod {}", dst.display())))?;
    Ok(out)
}

fn copy_dir(
    s: &OwnedFd,
    d: &OwnedFd,
    base: &Path,
    rel: &Path,
    depth: usize,
    out: &mut Copied,
) -> Result<()> {
    use nix::fcntl::{AtFlags, OFlag};
    use nix::sys::stat::{fchmod, fstatat, Mode, SFlag};
    if depth > 512 {
        return Err(SandboxError::Refused(format!(
            "{} is nested too deeply",
            base.join(rel).display()
        )));
    }
    // The descriptor's own directory (the magic link names the opened
    // directory itself, never a path looked up again).
    let listing =
        |e: std::io::Error| SandboxError::io(format!("listing {}", base.join(rel).display()), e);
    let mut names = Vec::new();
    for e in std::fs::read_dir(format!("/proc/self/fd/{}", s.as_raw_fd())).map_err(listing)? {
        names.push(cname(&e.map_err(listing)?.file_name())?);
    }
    for name in names {
        let here = rel.join(OsStr::from_bytes(name.to_bytes()));
        let at = base.join(&here);
        let st = fstatat(
            Some(s.as_raw_fd()),
            name.as_c_str(),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(errno(format!("reading {}", at.display())))?;
        let kind = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits());
        let perm = Mode::from_bits_truncate(st.st_mode & 0o1777);
        if kind == SFlag::S_IFDIR {
            nix::sys::stat::mkdirat(
                Some(d.as_raw_fd()),
                name.as_c_str(),
                Mode::from_bits_truncate(0o700),
            )
            .map_err(errno(format!("creating the copy of {}", at.display())))?;
            let cs = open_dir_at(s, &name, &at)?;
            let cd = open_dir_at(d, &name, &at)?;
            copy_dir(&cs, &cd, base, &here, depth + 1, out)?;
            fchmod(cd.as_raw_fd(), perm).map_err(errno(format!("chmod {}", at.display())))?;
        } else if kind == SFlag::S_IFREG {
            let fs = nix::fcntl::openat(
                Some(s.as_raw_fd()),
                name.as_c_str(),
                OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
                Mode::empty(),
            )
            .map_err(errno(format!("reading {}", at.display())))?;
            // SAFETY: a fresh descriptor from openat.
            let mut from = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fs) });
            let meta = from
                .metadata()
                .map_err(|e| SandboxError::io(format!("reading {}", at.display()), e))?;
            if !meta.is_file() {
                return Err(SandboxError::Refused(format!(
                    "{} changed while it was copied",
                    at.display()
                )));
            }
            let fd = nix::fcntl::openat(
                Some(d.as_raw_fd()),
                name.as_c_str(),
                OFlag::O_WRONLY
                    | OFlag::O_CREAT
                    | OFlag::O_EXCL
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o600),
            )
            .map_err(errno(format!("creating the copy of {}", at.display())))?;
            // SAFETY: a fresh descriptor from openat.
            let mut to = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
            std::io::copy(&mut from, &mut to)
                .map_err(|e| SandboxError::io(format!("copying {}", at.display()), e))?;
            fchmod(to.as_raw_fd(), Mode::from_bits_truncate(st.st_mode & 0o777))
                .map_err(errno(format!("chmod {}", at.display())))?;
        } else if kind == SFlag::S_IFLNK {
            let target = nix::fcntl::readlinkat(Some(s.as_raw_fd()), name.as_c_str())
                .map_err(errno(format!("reading the link {}", at.display())))?;
            nix::unistd::symlinkat(target.as_os_str(), Some(d.as_raw_fd()), name.as_c_str())
                .map_err(errno(format!("creating the link {}", at.display())))?;
        } else {
            out.specials_skipped.push(here);
        }
    }
    Ok(())
}

/// Resolves `path` inside the image rooted at `root` the way the sandbox
/// will: absolute symlink targets start at `root`, `..` stops at `root`.
/// `None` if a component is missing or links nest deeper than 40.
pub fn resolve_in_root(root: &Path, path: &str) -> Option<PathBuf> {
    let mut todo: Vec<std::ffi::OsString> = Path::new(path)
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    let mut at: Vec<std::ffi::OsString> = Vec::new();
    let mut links = 0;
    while let Some(part) = todo.pop() {
        if part == ".." {
            at.pop();
            continue;
        }
        let mut host = root.to_path_buf();
        host.extend(&at);
        host.push(&part);
        let meta = std::fs::symlink_metadata(&host).ok()?;
        if meta.file_type().is_symlink() {
            links += 1;
            if links > 40 {
                return None;
            }
            let target = std::fs::read_link(&host).ok()?;
            if target.is_absolute() {
                at.clear();
            }
            for c in target.components().rev() {
                match c {
                    Component::Normal(n) => todo.push(n.to_os_string()),
                    Component::ParentDir => todo.push("..".into()),
                    _ => {}
                }
            }
        } else {
            at.push(part);
        }
    }
    let mut out = root.to_path_buf();
    out.extend(&at);
    Some(out)
}

/// Whether the image at `root` has an executable `/bin/sh` (resolved inside it).
pub fn has_shell(root: &Path) -> bool {
    ["bin/sh", "usr/bin/sh"].iter().any(|p| {
        resolve_in_root(root, p)
            .and_then(|h| std::fs::symlink_metadata(h).ok())
            .is_some_and(|m| m.is_file() && m.mode() & 0o111 != 0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_resolve_inside_the_root_only() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        std::fs::create_dir_all(r.join("usr/bin")).unwrap();
        std::fs::write(r.join("usr/bin/dash"), "").unwrap();
        std::fs::set_permissions(r.join("usr/bin/dash"), PermissionsExt::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("usr/bin", r.join("bin")).unwrap();
        std::os::unix::fs::symlink("dash", r.join("usr/bin/sh")).unwrap();
        std::fs::create_dir(r.join("etc")).unwrap();
        std::os::unix::fs::symlink("/../../../etc", r.join("up")).unwrap();
        std::os::unix::fs::symlink("loop", r.join("loop")).unwrap();
        assert_eq!(resolve_in_root(r, "bin/sh"), Some(r.join("usr/bin/dash")));
        assert_eq!(resolve_in_root(r, "up"), Some(r.join("etc")));
        assert_eq!(resolve_in_root(r, "loop"), None);
        assert!(has_shell(r));
        std::fs::remove_file(r.join("usr/bin/dash")).unwrap();
        assert!(!has_shell(r));
    }
}
