//! Artifacts: the files an agent leaves in `~/artifacts` inside its sandbox,
//! read on the host after the turn and sent to the chat (docs/threat-model.md F3).
//!
//! Owns: finding the lease's `~/artifacts` on the host, deciding which of its
//! entries may be sent (regular files of the lease's own file system, with a
//! safe name, within the limits), reading them, and taking every entry it
//! looked at out of the directory so the next turn does not send it again.
//! Every entry that is not sent is reported with its reason.
//!
//! Must never: follow a symbolic link (not for `~/artifacts`, not for an
//! entry in it), open anything but a regular file, read a file that is also
//! reachable under another name (a hard link), read more than
//! `max_bytes + 1` bytes of a file, block on a FIFO, recurse into
//! directories, or drop an entry silently.
//!
//! How: the home directory is opened by its host path (moat made it; the
//! sandbox sees it as `/home/agent` and cannot rename it, it is a mount point
//! there). Everything below is opened relative to a directory descriptor:
//! `artifacts` with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)` and `O_NOFOLLOW | O_DIRECTORY`
//! (plain `openat` with `O_NOFOLLOW` where the kernel has no `openat2`), each
//! entry the same way with `O_NOFOLLOW | O_NONBLOCK`, and the checks are made
//! on the opened descriptor (`fstat`), so an entry swapped for a link between
//! the directory listing and the open is refused, not followed.
//!
//! Independently of the link checks, nothing is read or removed unless the
//! home is the lease's own tmpfs and `~/artifacts` and each file belong to
//! the sandbox's user on that same file system: a directory of the host
//! (root's `/etc`, another lease's home) fails these checks even if a link
//! to it were ever followed. Removing entries is the dangerous half of this
//! module; it only ever happens through the descriptor of a directory that
//! passed them.

use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use axum::body::Bytes;
use moat_policy::ByteSize;
use moat_sandbox::Lease;
use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};
use nix::unistd::UnlinkatFlags;

/// The directory in the sandbox's home the agent puts files to send in.
pub const DIR: &str = "artifacts";

/// How `~/artifacts` is named in what the user sees.
pub const SHOWN_DIR: &str = "~/artifacts";

/// Entries of `~/artifacts` examined per turn at most; the rest are reported
/// as one refusal and left in place.
pub const MAX_ENTRIES: usize = 1000;

/// Longest file name sent (bytes); longer names are refused.
const MAX_NAME: usize = 200;

/// Longest name shown in a refusal (characters).
const SHOWN_NAME: usize = 100;

/// What one turn may send: the channel's `artifacts.max_files` and
/// `artifacts.max_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArtifactLimits {
    /// Files sent per turn at most; further regular files are refused as too many.
    pub max_files: usize,
    /// Largest file sent, in bytes.
    pub max_bytes: u64,
}

impl Default for ArtifactLimits {
    /// 10 files of at most 10 MiB each.
    fn default() -> Self {
        ArtifactLimits {
            max_files: 10,
            max_bytes: 10 << 20,
        }
    }
}

/// One file to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifact {
    /// The file's name in `~/artifacts`: UTF-8, no control or
    /// direction-changing characters, no slash, at most 200 bytes.
    pub name: String,
    /// The bytes read (at most the limit's `max_bytes`).
    pub bytes: Bytes,
    /// SHA-256 of `bytes`, lower-case hex.
    pub sha256: String,
}

impl Artifact {
    pub fn size(&self) -> u64 {
        self.bytes.len() as u64
    }
}

/// Why an entry of `~/artifacts` was not sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A symbolic link (never followed, removed).
    Symlink,
    /// A named pipe (never opened for long: `O_NONBLOCK`; removed).
    Fifo,
    Socket,
    /// A character or block device node.
    Device,
    /// A subdirectory (not recursed into; removed only when empty).
    Directory,
    /// A regular file with more than one name: it may be another file's
    /// content (another lease's, once), so it is not read.
    HardLink {
        links: u64,
    },
    /// Larger than the limit (`size`: what was seen, at least `limit + 1`).
    TooBig {
        size: u64,
        limit: u64,
    },
    /// This turn already sent `limit` files.
    TooMany {
        limit: usize,
    },
    /// The name is not UTF-8, has control or direction-changing characters,
    /// or is too long.
    BadName,
    /// Not on the file system of the sandbox's home.
    OtherFileSystem,
    /// Not owned by the sandbox's user.
    NotOwned,
    /// `~/artifacts` itself is a symbolic link (removed; nothing read).
    DirIsLink,
    /// `~/artifacts` is not a directory.
    NotADirectory,
    /// More than [`MAX_ENTRIES`] entries; `left` were not examined.
    TooManyEntries {
        left: usize,
    },
    /// The host could not read it (the error, without contents).
    Unreadable(String),
}

const REGULAR_ONLY: &str = "artifacts must be regular files in ~/artifacts";

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Symlink => write!(f, "it is a symbolic link ({REGULAR_ONLY})"),
            Refusal::Fifo => write!(f, "it is a named pipe ({REGULAR_ONLY})"),
            Refusal::Socket => write!(f, "it is a socket ({REGULAR_ONLY})"),
            Refusal::Device => write!(f, "it is a device node ({REGULAR_ONLY})"),
            Refusal::Directory => write!(
                f,
                "it is a directory (moat sends only the files directly in ~/artifacts)"
            ),
            Refusal::HardLink { links } => write!(
                f,
                "it has {links} hard links (copy the file into ~/artifacts instead of linking it)"
            ),
            Refusal::TooBig { limit, .. } => write!(
                f,
                "it is larger than {} (the channel's artifacts.max_bytes)",
                ByteSize(*limit)
            ),
            Refusal::TooMany { limit } => write!(
                f,
                "this turn already sent {limit} files (the channel's artifacts.max_files)"
            ),
            Refusal::BadName => write!(
                f,
                "its name is not plain text (control or direction-changing characters, invalid UTF-8, or over {MAX_NAME} bytes); rename it"
            ),
            Refusal::OtherFileSystem => {
                write!(f, "it is not on the sandbox's own file system")
            }
            Refusal::NotOwned => write!(f, "it does not belong to the sandbox's user"),
            Refusal::DirIsLink => write!(
                f,
                "~/artifacts is a symbolic link; moat reads only a real directory there and never follows links"
            ),
            Refusal::NotADirectory => write!(f, "~/artifacts is not a directory"),
            Refusal::TooManyEntries { left } => write!(
                f,
                "~/artifacts holds more than {MAX_ENTRIES} entries; {left} more were not examined and stay there"
            ),
            Refusal::Unreadable(e) => write!(f, "moat could not read it ({e})"),
        }
    }
}

impl Refusal {
    /// A short machine-readable kind, for the audit log.
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::Symlink => "symlink",
            Refusal::Fifo => "fifo",
            Refusal::Socket => "socket",
            Refusal::Device => "device",
            Refusal::Directory => "directory",
            Refusal::HardLink { .. } => "hard_link",
            Refusal::TooBig { .. } => "too_big",
            Refusal::TooMany { .. } => "too_many",
            Refusal::BadName => "bad_name",
            Refusal::OtherFileSystem => "other_file_system",
            Refusal::NotOwned => "not_owned",
            Refusal::DirIsLink => "artifacts_dir_is_link",
            Refusal::NotADirectory => "artifacts_not_a_directory",
            Refusal::TooManyEntries { .. } => "too_many_entries",
            Refusal::Unreadable(_) => "unreadable",
        }
    }
}

/// What one collection found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Collected {
    /// Files to send, in name order.
    pub files: Vec<Artifact>,
    /// Every entry not sent: its name as shown to the user (see
    /// [`shown_name`]) and why.
    pub refused: Vec<(String, Refusal)>,
}

impl Collected {
    pub fn is_empty(&self) -> bool {
        self.files.is_empty() && self.refused.is_empty()
    }

    /// The lines told to the user about refused entries, at most `max`
    /// (then one line counting the rest).
    pub fn refusal_lines(&self, max: usize) -> Vec<String> {
        let mut out: Vec<String> = self
            .refused
            .iter()
            .take(max)
            .map(|(name, why)| format!("moat did not send `{name}`: {why}"))
            .collect();
        if self.refused.len() > max {
            out.push(format!(
                "moat did not send {} more entries of ~/artifacts (see the audit log)",
                self.refused.len() - max
            ));
        }
        out
    }
}

/// Whether the lease's home has an `~/artifacts` entry at all (of any kind;
/// nothing is followed or read). The pipeline stops the sandbox before
/// collecting when it does, so every write is on the host (gVisor flushes
/// what it cached) and nothing changes during the collection.
pub fn present(lease: &Lease) -> bool {
    std::fs::symlink_metadata(lease.home_dir().join(DIR)).is_ok()
}

/// Collects the lease's artifacts (see [`collect_home`]).
///
/// Blocking. Call it after the agent's turn, while no turn runs in the lease.
/// It stays safe if the sandbox still has processes changing `~/artifacts`:
/// every check is made on the opened descriptor, so a swapped entry is
/// refused, never followed.
pub fn collect(lease: &Lease, limits: &ArtifactLimits) -> Collected {
    collect_home_of(&lease.home_dir(), limits, lease.on_disk())
}

/// Collects `<home>/artifacts`: every regular file with a safe name, one
/// name only and at most `max_bytes`, up to `max_files` of them in name
/// order, is read and removed; every other entry is refused with its reason
/// and removed too (links, pipes, sockets, device nodes, hard links, files
/// too big or too many, bad names; empty subdirectories), except non-empty
/// subdirectories and a `~/artifacts` that is not a directory or link,
/// which are left in place.
///
/// Invariants: `home` must be a directory the sandbox cannot replace (its
/// own home's mount point); it is opened with `O_NOFOLLOW`. Nothing below it
/// is reached through a symbolic link, a magic link or a mount point; no
/// file is read beyond `max_bytes + 1` bytes; a FIFO is never opened (and
/// would not block: `O_NONBLOCK`); no entry is left out of the result
/// without a refusal, except a missing `~/artifacts` (nothing to send).
pub fn collect_home(home: &Path, limits: &ArtifactLimits) -> Collected {
    collect_home_of(home, limits, false)
}

/// [`collect_home`]; `on_disk`: the home is the lease's own ext4 disk image
/// (a persistent workspace), accepted besides its tmpfs.
fn collect_home_of(home: &Path, limits: &ArtifactLimits, on_disk: bool) -> Collected {
    let mut out = Collected::default();
    let home_fd = match nix::fcntl::open(
        home,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        // SAFETY: a descriptor open just returned, owned by nobody else.
        Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd) },
        Err(e) => {
            tracing::error!(home = %home.display(), error = %e, "could not open a lease's home to collect artifacts");
            out.refused.push((
                SHOWN_DIR.to_string(),
                Refusal::Unreadable(format!("the sandbox's home could not be opened: {e}")),
            ));
            return out;
        }
    };
    // The home must be a lease's own tmpfs (or its own disk), never a host
    // directory.
    match nix::sys::statfs::fstatfs(&home_fd) {
        Ok(fs) if fs.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC => {}
        Ok(fs) if on_disk && fs.filesystem_type() == nix::sys::statfs::EXT4_SUPER_MAGIC => {}
        Ok(_) => {
            tracing::error!(home = %home.display(), "a lease's home is not its tmpfs; artifacts not collected");
            out.refused
                .push((SHOWN_DIR.to_string(), Refusal::OtherFileSystem));
            return out;
        }
        Err(e) => {
            out.refused
                .push((SHOWN_DIR.to_string(), Refusal::Unreadable(e.to_string())));
            return out;
        }
    }
    let home = match nix::sys::stat::fstat(home_fd.as_raw_fd()) {
        Ok(st) => Owner {
            dev: st.st_dev,
            uid: st.st_uid,
        },
        Err(e) => {
            out.refused
                .push((SHOWN_DIR.to_string(), Refusal::Unreadable(e.to_string())));
            return out;
        }
    };
    let dir = match open_beneath(
        home_fd.as_raw_fd(),
        OsStr::new(DIR),
        OFlag::O_RDONLY | OFlag::O_DIRECTORY,
    ) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return out,
        Err(Errno::ELOOP) => {
            // A link the agent made in its own home: removing it follows nothing.
            remove(home_fd.as_raw_fd(), OsStr::new(DIR), false);
            out.refused
                .push((SHOWN_DIR.to_string(), Refusal::DirIsLink));
            return out;
        }
        Err(Errno::ENOTDIR) => {
            let why = match lstat_at(home_fd.as_raw_fd(), OsStr::new(DIR)) {
                Ok(st) if kind(&st) == SFlag::S_IFLNK => {
                    remove(home_fd.as_raw_fd(), OsStr::new(DIR), false);
                    Refusal::DirIsLink
                }
                _ => Refusal::NotADirectory,
            };
            out.refused.push((SHOWN_DIR.to_string(), why));
            return out;
        }
        Err(e) => {
            out.refused
                .push((SHOWN_DIR.to_string(), Refusal::Unreadable(e.to_string())));
            return out;
        }
    };
    // Nothing below is read or removed unless this holds.
    match nix::sys::stat::fstat(dir.as_raw_fd()) {
        Ok(st) if kind(&st) != SFlag::S_IFDIR => {
            out.refused
                .push((SHOWN_DIR.to_string(), Refusal::NotADirectory));
            return out;
        }
        Ok(st) if st.st_dev != home.dev => {
            out.refused
                .push((SHOWN_DIR.to_string(), Refusal::OtherFileSystem));
            return out;
        }
        Ok(st) if st.st_uid != home.uid => {
            out.refused.push((SHOWN_DIR.to_string(), Refusal::NotOwned));
            return out;
        }
        Ok(_) => {}
        Err(e) => {
            out.refused
                .push((SHOWN_DIR.to_string(), Refusal::Unreadable(e.to_string())));
            return out;
        }
    }
    let dfd = dir.as_raw_fd();
    let (names, left) = match list(dfd) {
        Ok(v) => v,
        Err(e) => {
            out.refused
                .push((SHOWN_DIR.to_string(), Refusal::Unreadable(e.to_string())));
            return out;
        }
    };
    for name in names {
        let shown = shown_name(&name);
        match examine(dfd, &name, home, limits, out.files.len()) {
            Ok(bytes) => {
                let sha256 = hex(ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref());
                remove(dfd, &name, false);
                out.files.push(Artifact {
                    // `examine` accepted only UTF-8 names.
                    name: name.to_string_lossy().into_owned(),
                    bytes: Bytes::from(bytes),
                    sha256,
                });
            }
            Err(why) => {
                match why {
                    Refusal::Directory => remove(dfd, &name, true),
                    // Left for the operator to look at: the host could not read it.
                    Refusal::Unreadable(_) => {}
                    _ => remove(dfd, &name, false),
                }
                out.refused.push((shown, why));
            }
        }
    }
    if left > 0 {
        out.refused
            .push((SHOWN_DIR.to_string(), Refusal::TooManyEntries { left }));
    }
    out
}

/// The device and owner of the lease's home: what `~/artifacts` and its
/// files must match.
#[derive(Debug, Clone, Copy)]
struct Owner {
    dev: u64,
    uid: u32,
}

/// Decides on one entry; `Ok` is the file's bytes.
fn examine(
    dfd: RawFd,
    name: &OsStr,
    home: Owner,
    limits: &ArtifactLimits,
    sent: usize,
) -> Result<Vec<u8>, Refusal> {
    if !safe_name(name) {
        return Err(Refusal::BadName);
    }
    // A first look without opening: links, pipes and device nodes are never opened.
    let st = lstat_at(dfd, name).map_err(|e| Refusal::Unreadable(e.to_string()))?;
    not_regular(&st)?;
    if sent >= limits.max_files {
        return Err(Refusal::TooMany {
            limit: limits.max_files,
        });
    }
    let fd = open_beneath(
        dfd,
        name,
        OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY,
    )
    .map_err(|e| match e {
        // Swapped for a link since the first look.
        Errno::ELOOP | Errno::EXDEV => Refusal::Symlink,
        e => Refusal::Unreadable(e.to_string()),
    })?;
    // The checks that count: on what was opened.
    let st =
        nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|e| Refusal::Unreadable(e.to_string()))?;
    not_regular(&st)?;
    if st.st_dev != home.dev {
        return Err(Refusal::OtherFileSystem);
    }
    if st.st_uid != home.uid {
        return Err(Refusal::NotOwned);
    }
    if st.st_nlink > 1 {
        return Err(Refusal::HardLink {
            links: st.st_nlink as u64,
        });
    }
    let size = st.st_size.max(0) as u64;
    if size > limits.max_bytes {
        return Err(Refusal::TooBig {
            size,
            limit: limits.max_bytes,
        });
    }
    // At most one byte more than allowed: a file that grew since fstat is caught.
    let mut bytes = Vec::with_capacity(size as usize);
    std::fs::File::from(fd)
        .take(limits.max_bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| Refusal::Unreadable(e.to_string()))?;
    if bytes.len() as u64 > limits.max_bytes {
        return Err(Refusal::TooBig {
            size: bytes.len() as u64,
            limit: limits.max_bytes,
        });
    }
    Ok(bytes)
}

fn kind(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
}

fn not_regular(st: &FileStat) -> Result<(), Refusal> {
    match kind(st) {
        SFlag::S_IFREG => Ok(()),
        SFlag::S_IFLNK => Err(Refusal::Symlink),
        SFlag::S_IFIFO => Err(Refusal::Fifo),
        SFlag::S_IFSOCK => Err(Refusal::Socket),
        SFlag::S_IFCHR | SFlag::S_IFBLK => Err(Refusal::Device),
        SFlag::S_IFDIR => Err(Refusal::Directory),
        _ => Err(Refusal::Unreadable("an unknown kind of file".into())),
    }
}

fn lstat_at(dfd: RawFd, name: &OsStr) -> nix::Result<FileStat> {
    nix::sys::stat::fstatat(Some(dfd), name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
}

/// Opens `name` (one path component) in `dfd` without following any link or
/// leaving the directory: `openat2` with every `RESOLVE_NO_*` restriction,
/// or, on kernels without it, `openat` with `O_NOFOLLOW` (enough for a single
/// component: only the last component could be a link).
fn open_beneath(dfd: RawFd, name: &OsStr, flags: OFlag) -> nix::Result<OwnedFd> {
    open_beneath_with(dfd, name, flags, false)
}

fn open_beneath_with(
    dfd: RawFd,
    name: &OsStr,
    flags: OFlag,
    force_fallback: bool,
) -> nix::Result<OwnedFd> {
    if !single_entry(name) {
        return Err(Errno::EINVAL);
    }
    let flags = flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    if !force_fallback {
        let how = OpenHow::new().flags(flags).resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_MAGICLINKS
                | ResolveFlag::RESOLVE_NO_XDEV,
        );
        match nix::fcntl::openat2(dfd, name, how) {
            // SAFETY: a descriptor open just returned, owned by nobody else.
            Ok(fd) => return Ok(unsafe { OwnedFd::from_raw_fd(fd) }),
            // No openat2 here (old kernel, or a seccomp filter refusing it).
            Err(Errno::ENOSYS) | Err(Errno::EPERM) | Err(Errno::E2BIG) => {}
            Err(e) => return Err(e),
        }
    }
    let fd = nix::fcntl::openat(Some(dfd), name, flags, Mode::empty())?;
    // SAFETY: as above.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A name of one entry of a directory: not empty, no `/`, not `.` or `..`.
fn single_entry(name: &OsStr) -> bool {
    !(name.is_empty() || name.as_bytes().contains(&b'/') || name == "." || name == "..")
}

/// Whether an entry named `name` passes both name checks (the fuzz target in
/// `fuzz/`, docs/fuzzing.md).
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub fn name_accepted_for_fuzzing(name: &OsStr) -> bool {
    safe_name(name) && single_entry(name)
}

/// Up to [`MAX_ENTRIES`] names of the directory, sorted, and how many more there were.
fn list(dfd: RawFd) -> nix::Result<(Vec<OsString>, usize)> {
    // Its own descriptor for the listing: `Dir` closes what it is given.
    let own = open_beneath_dot(dfd)?;
    let mut d = nix::dir::Dir::from(own)?;
    let mut names = Vec::new();
    let mut left = 0usize;
    for e in d.iter() {
        let e = e?;
        let n = e.file_name().to_bytes();
        if n == b"." || n == b".." {
            continue;
        }
        if names.len() < MAX_ENTRIES {
            names.push(OsStr::from_bytes(n).to_os_string());
        } else {
            left += 1;
        }
    }
    names.sort();
    Ok((names, left))
}

fn open_beneath_dot(dfd: RawFd) -> nix::Result<OwnedFd> {
    let fd = nix::fcntl::openat(
        Some(dfd),
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    // SAFETY: a descriptor open just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Removes one entry (never following it; a directory only when empty).
fn remove(dfd: RawFd, name: &OsStr, dir: bool) {
    let flag = if dir {
        UnlinkatFlags::RemoveDir
    } else {
        UnlinkatFlags::NoRemoveDir
    };
    match nix::unistd::unlinkat(Some(dfd), name, flag) {
        Ok(()) | Err(Errno::ENOENT) | Err(Errno::ENOTEMPTY) | Err(Errno::EEXIST) => {}
        Err(e) => {
            tracing::warn!(name = %shown_name(name), error = %e, "could not remove an entry of ~/artifacts")
        }
    }
}

/// Characters a name may not hold: controls, and the invisible ones that
/// change how text around them reads (bidirectional overrides, zero-width).
fn unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2069}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}')
}

/// Whether a file name may be sent as it is.
pub fn safe_name(name: &OsStr) -> bool {
    let Some(s) = name.to_str() else { return false };
    !s.is_empty() && s.len() <= MAX_NAME && !s.chars().any(unsafe_char)
}

/// A name as shown in a chat message: invalid UTF-8 replaced, controls and
/// invisible characters escaped (`\n`, `\u{202e}`), backticks replaced (the
/// name is shown between backticks), at most 100 characters.
pub fn shown_name(name: &OsStr) -> String {
    let lossy = String::from_utf8_lossy(name.as_bytes());
    let mut out = String::new();
    for (i, c) in lossy.chars().enumerate() {
        if i == SHOWN_NAME {
            out.push('…');
            break;
        }
        if c == '`' {
            out.push('\'');
        } else if unsafe_char(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn dir_fd(p: &Path) -> OwnedFd {
        let fd = nix::fcntl::open(p, OFlag::O_RDONLY | OFlag::O_DIRECTORY, Mode::empty()).unwrap();
        // SAFETY: fd is fresh from open and owned by nothing else.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    #[test]
    fn both_ways_of_opening_refuse_links() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("f"), "x").unwrap();
        symlink("/etc/hostname", t.path().join("l")).unwrap();
        symlink(".", t.path().join("d")).unwrap();
        let d = dir_fd(t.path());
        for fallback in [false, true] {
            let f = OsStr::new("f");
            assert!(open_beneath_with(d.as_raw_fd(), f, OFlag::O_RDONLY, fallback).is_ok());
            assert_eq!(
                open_beneath_with(d.as_raw_fd(), OsStr::new("l"), OFlag::O_RDONLY, fallback).err(),
                Some(Errno::ELOOP)
            );
            let r = open_beneath_with(
                d.as_raw_fd(),
                OsStr::new("d"),
                OFlag::O_RDONLY | OFlag::O_DIRECTORY,
                fallback,
            );
            assert!(
                matches!(r, Err(Errno::ELOOP) | Err(Errno::ENOTDIR)),
                "{r:?}"
            );
            for bad in ["..", ".", "a/b", ""] {
                assert_eq!(
                    open_beneath_with(d.as_raw_fd(), OsStr::new(bad), OFlag::O_RDONLY, fallback)
                        .err(),
                    Some(Errno::EINVAL)
                );
            }
        }
    }

    /// The guard that holds even if a link were followed: a home that is
    /// not a lease's tmpfs (here a plain directory) is neither read nor
    /// emptied.
    #[test]
    fn a_home_that_is_not_a_lease_tmpfs_is_left_alone() {
        let on_tmpfs = |p: &Path| {
            nix::sys::statfs::statfs(p)
                .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
        };
        let base = [std::env::temp_dir(), std::path::PathBuf::from("/var/tmp")]
            .into_iter()
            .find(|p| p.is_dir() && !on_tmpfs(p))
            .expect("a temporary directory that is not on a tmpfs");
        let t = tempfile::tempdir_in(base).unwrap();
        let dir = t.path().join(DIR);
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("f"), "x").unwrap();
        let c = collect_home(t.path(), &ArtifactLimits::default());
        assert!(c.files.is_empty(), "{c:?}");
        assert_eq!(
            c.refused,
            vec![(SHOWN_DIR.to_string(), Refusal::OtherFileSystem)]
        );
        assert_eq!(std::fs::read(dir.join("f")).unwrap(), b"x");
    }

    #[test]
    fn names() {
        assert!(safe_name(OsStr::new("report.txt")));
        assert!(safe_name(OsStr::new("résumé ü.pdf")));
        assert!(!safe_name(OsStr::new("a\nb")));
        assert!(!safe_name(OsStr::new("a\u{7f}")));
        assert!(!safe_name(OsStr::new("gpj.\u{202e}exe")));
        assert!(!safe_name(OsStr::from_bytes(b"\xff")));
        assert!(!safe_name(OsStr::new(&"a".repeat(201))));
        assert_eq!(shown_name(OsStr::new("a\nb`c")), "a\\nb'c");
        assert_eq!(shown_name(OsStr::new("x\u{202e}y")), "x\\u{202e}y");
        assert_eq!(shown_name(OsStr::from_bytes(b"\xffz")), "\u{fffd}z");
        assert_eq!(
            shown_name(OsStr::new(&"a".repeat(150))).chars().count(),
            101
        );
    }

    #[test]
    fn refusal_lines_are_bounded() {
        let c = Collected {
            files: vec![],
            refused: (0..25).map(|i| (format!("f{i}"), Refusal::Fifo)).collect(),
        };
        let lines = c.refusal_lines(20);
        assert_eq!(lines.len(), 21);
        assert_eq!(
            lines[0],
            "moat did not send `f0`: it is a named pipe (artifacts must be regular files in ~/artifacts)"
        );
        assert!(lines[20].contains("5 more"));
    }
}
