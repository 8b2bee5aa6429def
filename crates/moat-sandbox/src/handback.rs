//! Handing a host directory back after a sandbox wrote to it (threat model F8):
//! whatever the sandbox left there must not surprise the host user who owns
//! it, or any other local user.
//!
//! Owns the walk over a writable host directory (a `--workspace DIR`, a
//! read-write mount) that runs after every command and when the lease stops:
//! - git: in every git directory (any `.git`, any directory with a `HEAD`, and
//!   what a `commondir` points at) the `config` and `config.worktree` files are
//!   cut down to keys that cannot make git run a program
//!   ([`moat_policy::gitconfig`]); hooks lose their execute bits; a `config`
//!   that is a symlink, and a `.git` file, `.git` symlink or `commondir` that
//!   points outside the directory, are removed;
//! - modes: setuid and setgid bits are cleared on files and directories;
//! - device nodes are removed;
//! - the `trusted.overlay.*` attributes the socket-proof view leaves are removed.
//!
//! Every change is returned as a [`Finding`] for the caller to log, print and
//! audit. Must never follow a symlink, leave the directory's filesystem, act on
//! a path the sandbox saw read-only (the `protected` list), or change anything
//! but the entry it judged: every entry is opened with `O_NOFOLLOW` relative to
//! its parent's descriptor, so a sandbox still running cannot redirect it.

use std::ffi::{CStr, CString, OsStr};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use moat_policy::gitconfig::{self, Verdict};

/// Entries the walk looks at before it stops and says so.
const MAX_ENTRIES: usize = 1_000_000;
/// Directory depth the walk descends to (one descriptor per level).
const MAX_DEPTH: usize = 256;
/// A git configuration file larger than this is emptied rather than parsed.
const MAX_CONFIG: u64 = 1 << 20;

/// One change made to a host directory, relative to its root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub path: PathBuf,
    pub action: Action,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Keys removed from a git configuration file (names only, never values).
    GitConfigRewritten(Vec<String>),
    /// A git hook's execute bits were cleared.
    HookDisabled,
    /// A git link (`.git` file or symlink, `commondir`, `config` symlink) was removed.
    GitLinkRemoved(&'static str),
    /// Setuid/setgid bits cleared: the mode before and after.
    ModeCleared { from: u32, to: u32 },
    /// A character or block device node was removed.
    DeviceRemoved,
    /// The walk stopped early; what lies beyond was not checked.
    Incomplete(String),
    /// The walk could not change an entry it should have.
    Failed(String),
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = self.path.display();
        match &self.action {
            Action::GitConfigRewritten(keys) => {
                write!(
                    f,
                    "{p}: removed git configuration that runs programs: {}",
                    keys.join(", ")
                )
            }
            Action::HookDisabled => write!(f, "{p}: git hook made non-executable"),
            Action::GitLinkRemoved(why) => write!(f, "{p}: removed ({why})"),
            Action::ModeCleared { from, to } => {
                write!(f, "{p}: setuid/setgid cleared (mode {from:o} -> {to:o})")
            }
            Action::DeviceRemoved => write!(f, "{p}: device node removed"),
            Action::Incomplete(why) => write!(f, "{p}: not fully checked: {why}"),
            Action::Failed(why) => write!(f, "{p}: could not be made safe: {why}"),
        }
    }
}

/// Walks `root` and makes what a sandbox left there safe for host users.
/// Only entries owned by `uid` (the sandbox's host uid: everything it created
/// or could change) are acted on; a setuid program root put there stays.
/// `protected` are paths relative to `root` that the sandbox saw read-only
/// (the host's own `.git/config`, `.git/hooks`): they are left alone.
pub fn hand_back(
    root: &Path,
    uid: u32,
    protected: &[PathBuf],
    clear_overlay_xattrs: bool,
) -> Vec<Finding> {
    let mut w = Walk {
        out: Vec::new(),
        uid,
        protected,
        seen: 0,
        dev: 0,
        extra_git_dirs: Vec::new(),
        clear_overlay_xattrs,
    };
    let top = match open_dir_path(root) {
        Ok(fd) => fd,
        Err(e) => {
            w.fail(Path::new("."), format!("cannot open: {e}"));
            return w.out;
        }
    };
    match fstat(top.as_raw_fd()) {
        Ok(st) => w.dev = st.st_dev,
        Err(e) => {
            w.fail(Path::new("."), format!("cannot stat: {e}"));
            return w.out;
        }
    }
    w.check_dir_fd(&top, Path::new("."));
    w.walk(top, PathBuf::new(), 0);
    // Git directories named by a `commondir`, `.git` file or `.git` symlink
    // that the walk may have judged as plain directories.
    let extra = std::mem::take(&mut w.extra_git_dirs);
    for rel in extra {
        if let Ok(fd) = open_beneath(root, &rel) {
            w.git_dir(&fd, &rel, &[]);
        }
    }
    w.out
}

struct Walk<'a> {
    out: Vec<Finding>,
    uid: u32,
    protected: &'a [PathBuf],
    seen: usize,
    dev: u64,
    extra_git_dirs: Vec<PathBuf>,
    clear_overlay_xattrs: bool,
}

impl Walk<'_> {
    fn note(&mut self, path: &Path, action: Action) {
        self.out.push(Finding {
            path: path.to_path_buf(),
            action,
        });
    }
    fn fail(&mut self, path: &Path, why: String) {
        self.note(path, Action::Failed(why));
    }
    fn is_protected(&self, rel: &Path) -> bool {
        self.protected.iter().any(|p| p == rel)
    }

    fn walk(&mut self, dir: OwnedFd, rel: PathBuf, depth: usize) {
        if depth >= MAX_DEPTH {
            self.note(
                &rel,
                Action::Incomplete(format!("deeper than {MAX_DEPTH} levels")),
            );
            return;
        }
        let names = match list(&dir) {
            Ok(n) => n,
            Err(e) => {
                self.fail(&rel, format!("cannot list: {e}"));
                return;
            }
        };
        let is_git = rel.file_name() == Some(OsStr::new(".git"))
            || names.iter().any(|n| n.as_bytes() == b"HEAD");
        if is_git && !self.is_protected(&rel) {
            self.git_dir(&dir, &rel, &names);
        }
        for name in names {
            self.seen += 1;
            if self.seen > MAX_ENTRIES {
                if self.seen == MAX_ENTRIES + 1 {
                    self.note(
                        &rel,
                        Action::Incomplete(format!("more than {MAX_ENTRIES} entries")),
                    );
                }
                return;
            }
            let Ok(st) = fstatat(dir.as_raw_fd(), &name) else {
                continue;
            };
            let kind = st.st_mode & libc::S_IFMT;
            // Most entries need nothing: a plain file without setuid/setgid
            // that is not a git link. Skip them before building a path.
            let plain =
                kind == libc::S_IFREG && st.st_mode & 0o6000 == 0 && name.as_bytes() != b".git";
            if plain || (kind == libc::S_IFLNK && name.as_bytes() != b".git") {
                continue;
            }
            let child = rel.join(OsStr::from_bytes(name.as_bytes()));
            if self.is_protected(&child) {
                continue;
            }
            // Another filesystem mounted inside is not the sandbox's to hand
            // back. (Only directories say so reliably: through an overlayfs
            // view, files report their layer's device.)
            if kind == libc::S_IFDIR && st.st_dev != self.dev {
                continue;
            }
            match st.st_mode & libc::S_IFMT {
                libc::S_IFDIR => {
                    let Ok(fd) = openat(dir.as_raw_fd(), &name, libc::O_DIRECTORY) else {
                        continue;
                    };
                    self.check_dir_fd(&fd, &child);
                    self.walk(fd, child, depth + 1);
                }
                _ if st.st_uid != self.uid => {}
                libc::S_IFREG => {
                    if st.st_mode & 0o6000 != 0 {
                        if let Ok(fd) = openat(dir.as_raw_fd(), &name, 0) {
                            self.clear_mode(&fd, &child);
                        }
                    }
                    if name.as_bytes() == b".git" {
                        self.git_link(dir.as_raw_fd(), &name, &rel, &child, false);
                    }
                }
                libc::S_IFLNK if name.as_bytes() == b".git" => {
                    self.git_link(dir.as_raw_fd(), &name, &rel, &child, true);
                }
                libc::S_IFCHR | libc::S_IFBLK => {
                    if unlinkat(dir.as_raw_fd(), &name, 0).is_ok() {
                        self.note(&child, Action::DeviceRemoved);
                    } else {
                        self.fail(&child, "device node could not be removed".into());
                    }
                }
                _ => {}
            }
        }
    }

    /// Mode bits and overlay attributes of a directory already opened.
    fn check_dir_fd(&mut self, fd: &OwnedFd, rel: &Path) {
        self.clear_mode(fd, rel);
        if self.clear_overlay_xattrs {
            remove_overlay_xattrs(fd.as_raw_fd());
        }
    }

    fn clear_mode(&mut self, fd: &OwnedFd, rel: &Path) {
        let Ok(st) = fstat(fd.as_raw_fd()) else {
            return;
        };
        let from = st.st_mode & 0o7777;
        if from & 0o6000 == 0 || st.st_uid != self.uid {
            return;
        }
        let to = from & !0o6000;
        // SAFETY: fchmod on a descriptor this function owns a borrow of.
        if unsafe { libc::fchmod(fd.as_raw_fd(), to) } == 0 {
            self.note(rel, Action::ModeCleared { from, to });
        } else {
            self.fail(
                rel,
                format!("cannot clear setuid/setgid: {}", io::Error::last_os_error()),
            );
        }
    }

    /// A git directory: its configuration files, hooks and `commondir`.
    fn git_dir(&mut self, dir: &OwnedFd, rel: &Path, names: &[CString]) {
        let listed;
        let names = if names.is_empty() {
            listed = list(dir).unwrap_or_default();
            &listed[..]
        } else {
            names
        };
        for n in names {
            let b = n.as_bytes();
            let child = rel.join(OsStr::from_bytes(b));
            if self.is_protected(&child) {
                continue;
            }
            match b {
                b"config" | b"config.worktree" => self.config_file(dir.as_raw_fd(), n, &child),
                b"hooks" => self.hooks(dir.as_raw_fd(), n, &child),
                b"commondir"
                    if fstatat(dir.as_raw_fd(), n).is_ok_and(|st| st.st_uid == self.uid) =>
                {
                    let target = read_small(dir.as_raw_fd(), n).ok();
                    match target.and_then(|t| inside(rel, t.trim_end_matches(['\n', '\r']))) {
                        Some(p) => self.extra_git_dirs.push(p),
                        None => self.remove_link(
                            dir.as_raw_fd(),
                            n,
                            &child,
                            "a commondir pointing outside the directory",
                        ),
                    }
                }
                _ => {}
            }
        }
    }

    fn config_file(&mut self, dir: RawFd, name: &CStr, rel: &Path) {
        let Ok(st) = fstatat(dir, name) else { return };
        if st.st_uid != self.uid {
            return;
        }
        match st.st_mode & libc::S_IFMT {
            libc::S_IFLNK => {
                return self.remove_link(dir, name, rel, "a git configuration that is a symlink")
            }
            libc::S_IFREG => {}
            _ => return,
        }
        let Ok(fd) = openat(dir, name, 0) else { return };
        let mut file = std::fs::File::from(fd);
        let (text, too_big) = if st.st_size as u64 > MAX_CONFIG {
            (String::new(), true)
        } else {
            let mut buf = Vec::new();
            if file.read_to_end(&mut buf).is_err() {
                return;
            }
            (String::from_utf8_lossy(&buf).into_owned(), false)
        };
        let (text, mut removed) = match gitconfig::sanitize(&text) {
            Verdict::Keep if !too_big => return,
            Verdict::Keep => (String::new(), Vec::new()),
            Verdict::Rewrite { text, removed } => (text, removed),
        };
        if too_big {
            removed.push(format!("(the whole file: larger than {MAX_CONFIG} bytes)"));
        }
        match replace_file(dir, name, text.as_bytes(), &st) {
            Ok(()) => self.note(rel, Action::GitConfigRewritten(removed)),
            Err(e) => self.fail(rel, format!("cannot rewrite git configuration: {e}")),
        }
    }

    fn hooks(&mut self, dir: RawFd, name: &CStr, rel: &Path) {
        let Ok(fd) = openat(dir, name, libc::O_DIRECTORY) else {
            return;
        };
        for hook in list(&fd).unwrap_or_default() {
            let child = rel.join(OsStr::from_bytes(hook.as_bytes()));
            let Ok(st) = fstatat(fd.as_raw_fd(), &hook) else {
                continue;
            };
            if st.st_uid != self.uid {
                continue;
            }
            match st.st_mode & libc::S_IFMT {
                libc::S_IFLNK => self.remove_link(
                    fd.as_raw_fd(),
                    &hook,
                    &child,
                    "a git hook that is a symlink",
                ),
                libc::S_IFREG if st.st_mode & 0o111 != 0 => {
                    let Ok(h) = openat(fd.as_raw_fd(), &hook, 0) else {
                        continue;
                    };
                    let to = st.st_mode & 0o7777 & !0o7111;
                    // SAFETY: fchmod on a descriptor owned here.
                    if unsafe { libc::fchmod(h.as_raw_fd(), to) } == 0 {
                        self.note(&child, Action::HookDisabled);
                    } else {
                        self.fail(&child, "cannot disable the hook".into());
                    }
                }
                _ => {}
            }
        }
    }

    /// A `.git` file (`gitdir: PATH`) or `.git` symlink in directory `parent`.
    fn git_link(&mut self, dir: RawFd, name: &CStr, parent: &Path, rel: &Path, symlink: bool) {
        let target = if symlink {
            readlinkat(dir, name).ok()
        } else {
            read_small(dir, name)
                .ok()
                .and_then(|t| t.strip_prefix("gitdir:").map(|g| g.trim().to_string()))
        };
        match target.and_then(|t| inside(parent, &t)) {
            Some(p) => self.extra_git_dirs.push(p),
            None => self.remove_link(dir, name, rel, "a .git link pointing outside the directory"),
        }
    }

    fn remove_link(&mut self, dir: RawFd, name: &CStr, rel: &Path, why: &'static str) {
        if unlinkat(dir, name, 0).is_ok() {
            self.note(rel, Action::GitLinkRemoved(why));
        } else {
            self.fail(rel, format!("cannot remove {why}"));
        }
    }
}

/// `target` (as written in a git link inside `dir`) as a path relative to the
/// walk's root, or `None` when it is absolute or climbs out.
fn inside(dir: &Path, target: &str) -> Option<PathBuf> {
    if target.is_empty() || target.contains('\0') {
        return None;
    }
    let t = Path::new(target);
    if t.is_absolute() {
        return None;
    }
    let mut out: Vec<&OsStr> = dir
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n),
            _ => None,
        })
        .collect();
    for c in t.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop()?;
            }
            _ => return None,
        }
    }
    Some(out.iter().collect())
}

fn cstr(b: &[u8]) -> io::Result<CString> {
    CString::new(b).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn check(fd: libc::c_int) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor returned by the kernel, owned from here on.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn openat(dir: RawFd, name: &CStr, extra: libc::c_int) -> io::Result<OwnedFd> {
    let flags = libc::O_RDONLY
        | libc::O_NOFOLLOW
        | libc::O_CLOEXEC
        | libc::O_NONBLOCK
        | libc::O_NOCTTY
        | extra;
    // SAFETY: `name` is a valid C string; the result is checked.
    check(unsafe { libc::openat(dir, name.as_ptr(), flags) })
}

fn open_dir_path(p: &Path) -> io::Result<OwnedFd> {
    let c = cstr(p.as_os_str().as_bytes())?;
    openat(libc::AT_FDCWD, &c, libc::O_DIRECTORY)
}

/// Opens `rel` below `root` one component at a time, never through a symlink.
fn open_beneath(root: &Path, rel: &Path) -> io::Result<OwnedFd> {
    let mut fd = open_dir_path(root)?;
    for c in rel.components() {
        let Component::Normal(n) = c else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        fd = openat(fd.as_raw_fd(), &cstr(n.as_bytes())?, libc::O_DIRECTORY)?;
    }
    Ok(fd)
}

fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: zeroed stat is a valid out-buffer; the result is checked.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

fn fstatat(dir: RawFd, name: &CStr) -> io::Result<libc::stat> {
    // SAFETY: zeroed stat is a valid out-buffer; the result is checked.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `name` is a valid C string, `st` a valid buffer.
    if unsafe { libc::fstatat(dir, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

fn unlinkat(dir: RawFd, name: &CStr, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: `name` is a valid C string.
    if unsafe { libc::unlinkat(dir, name.as_ptr(), flags) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn readlinkat(dir: RawFd, name: &CStr) -> io::Result<String> {
    let mut buf = vec![0u8; 4096];
    // SAFETY: `buf` is writable for its length; the result is checked.
    let n = unsafe { libc::readlinkat(dir, name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    String::from_utf8(buf).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))
}

/// The first 4 KiB of a regular file (git links are one short line).
fn read_small(dir: RawFd, name: &CStr) -> io::Result<String> {
    let fd = openat(dir, name, 0)?;
    let mut f = std::fs::File::from(fd);
    let mut buf = Vec::new();
    (&mut f).take(4096).read_to_end(&mut buf)?;
    String::from_utf8(buf).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))
}

/// Names in a directory, without `.` and `..`.
fn list(dir: &OwnedFd) -> io::Result<Vec<CString>> {
    // fdopendir takes ownership of the descriptor it is given: hand it a dup.
    // SAFETY: dup of a valid descriptor, checked.
    let dup = check(unsafe { libc::fcntl(dir.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) })?;
    // SAFETY: seek the shared offset back to the start (the dup shares it).
    unsafe { libc::lseek(dup.as_raw_fd(), 0, libc::SEEK_SET) };
    let raw = std::os::fd::IntoRawFd::into_raw_fd(dup);
    // SAFETY: `raw` is a valid directory descriptor; on success the DIR owns it.
    let d = unsafe { libc::fdopendir(raw) };
    if d.is_null() {
        let e = io::Error::last_os_error();
        // SAFETY: fdopendir failed, so the descriptor is still ours to close.
        unsafe { libc::close(raw) };
        return Err(e);
    }
    let mut out = Vec::new();
    loop {
        // SAFETY: `d` is a valid DIR until closedir below.
        let ent = unsafe { libc::readdir(d) };
        if ent.is_null() {
            break;
        }
        // SAFETY: readdir returned a valid dirent whose name is NUL-terminated.
        let name = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) };
        if name.to_bytes() != b"." && name.to_bytes() != b".." {
            out.push(name.to_owned());
        }
    }
    // SAFETY: closes the DIR and its descriptor, once.
    unsafe { libc::closedir(d) };
    Ok(out)
}

/// Replaces a file by writing a sibling and renaming it over, keeping the
/// owner and permission bits.
fn replace_file(dir: RawFd, name: &CStr, data: &[u8], st: &libc::stat) -> io::Result<()> {
    let tmp = cstr(format!(".{}.moat-{}", name.to_string_lossy(), std::process::id()).as_bytes())?;
    let _ = unlinkat(dir, &tmp, 0);
    let mode = st.st_mode & 0o666;
    // SAFETY: valid C string; flags refuse an existing entry or a symlink.
    let fd = check(unsafe {
        libc::openat(
            dir,
            tmp.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    })?;
    // SAFETY: fchown/fchmod on the descriptor just created.
    unsafe {
        libc::fchown(fd.as_raw_fd(), st.st_uid, st.st_gid);
        libc::fchmod(fd.as_raw_fd(), mode);
    }
    let mut f = std::fs::File::from(fd);
    let written = f.write_all(data).and_then(|_| f.sync_all());
    if let Err(e) = written {
        let _ = unlinkat(dir, &tmp, 0);
        return Err(e);
    }
    // SAFETY: both names are valid C strings relative to `dir`.
    if unsafe { libc::renameat(dir, tmp.as_ptr(), dir, name.as_ptr()) } != 0 {
        let e = io::Error::last_os_error();
        let _ = unlinkat(dir, &tmp, 0);
        return Err(e);
    }
    Ok(())
}

/// Removes the `trusted.overlay.*` attributes overlayfs leaves on directories
/// of its upper layer (the socket-proof view of a workspace).
fn remove_overlay_xattrs(fd: RawFd) {
    let mut buf = vec![0u8; 1024];
    // SAFETY: `buf` is writable for its length; the result is checked.
    let n = unsafe { libc::flistxattr(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n <= 0 {
        return;
    }
    buf.truncate(n as usize);
    for name in buf
        .split(|b| *b == 0)
        .filter(|n| n.starts_with(b"trusted.overlay."))
    {
        if let Ok(c) = cstr(name) {
            // SAFETY: valid C string; failure is harmless.
            unsafe { libc::fremovexattr(fd, c.as_ptr()) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    #[test]
    fn git_links_are_judged_relative_to_their_directory() {
        assert_eq!(
            inside(Path::new("a/b"), "../c/.git"),
            Some(PathBuf::from("a/c/.git"))
        );
        assert_eq!(inside(Path::new("a"), "../../x"), None);
        assert_eq!(inside(Path::new(""), "/tmp/x"), None);
        assert_eq!(inside(Path::new(""), ""), None);
        assert_eq!(
            inside(Path::new("a"), "./.git/modules/s"),
            Some(PathBuf::from("a/.git/modules/s"))
        );
    }

    #[test]
    fn nested_repositories_setuid_and_links_are_made_safe() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        let sub = r.join("vendor/lib/.git");
        std::fs::create_dir_all(sub.join("hooks")).unwrap();
        std::fs::write(sub.join("HEAD"), "ref: refs/heads/main\n").unwrap();
        std::fs::write(
            sub.join("config"),
            "[core]\n\tfsmonitor = touch pwned\n\tbare = false\n",
        )
        .unwrap();
        std::fs::write(sub.join("hooks/post-checkout"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(
            sub.join("hooks/post-checkout"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        std::fs::create_dir_all(r.join("x")).unwrap();
        std::fs::write(r.join("x/.git"), "gitdir: /tmp/elsewhere\n").unwrap();
        symlink("/etc", r.join("y.git")).unwrap();
        std::fs::write(r.join("tool"), "").unwrap();
        std::fs::set_permissions(r.join("tool"), std::fs::Permissions::from_mode(0o4755)).unwrap();
        let protected = vec![PathBuf::from(".git/config")];
        let found = hand_back(r, 0, &protected, false);
        let text: Vec<String> = found.iter().map(|f| f.to_string()).collect();
        assert!(
            text.iter()
                .any(|t| t.contains("vendor/lib/.git/config") && t.contains("core.fsmonitor")),
            "{text:?}"
        );
        let cfg = std::fs::read_to_string(sub.join("config")).unwrap();
        assert!(!cfg.contains("fsmonitor") && cfg.contains("bare"), "{cfg}");
        assert_eq!(
            std::fs::metadata(sub.join("hooks/post-checkout"))
                .unwrap()
                .permissions()
                .mode()
                & 0o111,
            0
        );
        assert!(!r.join("x/.git").exists());
        assert_eq!(
            std::fs::metadata(r.join("tool"))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777,
            0o755
        );
        // The symlink not named .git stays, and nothing outside was touched.
        assert!(std::fs::symlink_metadata(r.join("y.git")).is_ok());
        // A second pass finds nothing more.
        assert_eq!(hand_back(r, 0, &protected, false), Vec::new());
    }
}
