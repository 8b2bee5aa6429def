//! Whether a sandbox's host uid can reach the host paths its backend binds.
//!
//! bwrap sets up a sandbox's mounts as the sandbox's own host uid (with its
//! own gid and no supplementary groups), so every directory above a bind
//! source must grant that uid search permission; otherwise bwrap stops with
//! "Can't find source path ...: Permission denied". This module finds the
//! first directory in the way and says what to change, before anything starts.
//!
//! Owns: the reading of mode bits along a path. Never changes a mode or an
//! owner (the operator decides what becomes traversable), and never grants
//! access: it only predicts a refusal the kernel would give. POSIX ACLs are
//! not read; a path reachable only through an ACL entry is reported as
//! unreachable (a refusal with the reason, never a silent grant).

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::{Result, SandboxError};

/// Who must get through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    /// One host uid with its own gid and no supplementary groups.
    Uid(u32),
    /// Any uid (a lease's uid is picked at random from moat's range).
    Anyone,
}

impl fmt::Display for Who {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Who::Uid(u) => write!(f, "host uid {u}"),
            Who::Anyone => f.write_str("the sandbox users"),
        }
    }
}

/// A directory `who` cannot search, on the way to a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    pub dir: PathBuf,
    pub mode: u32,
    pub owner: u32,
    pub group: u32,
}

impl fmt::Display for Blocked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (mode {:04o}, owner uid {}, group {}) does not let them through",
            self.dir.display(),
            self.mode & 0o7777,
            self.owner,
            self.group
        )
    }
}

fn can_search(meta: &std::fs::Metadata, who: Who) -> bool {
    let mode = meta.mode();
    match who {
        Who::Uid(u) if meta.uid() == u => mode & 0o100 != 0,
        Who::Uid(u) if meta.gid() == u => mode & 0o010 != 0,
        _ => mode & 0o001 != 0,
    }
}

/// The first directory from `/` down to `path`'s parent that `who` cannot
/// search. `path` should be absolute and canonical; a component that cannot be
/// read is reported as blocking, one that does not exist yet ends the walk.
pub fn blocked_ancestor(path: &Path, who: Who) -> Option<Blocked> {
    let mut dirs: Vec<&Path> = path.ancestors().skip(1).collect();
    dirs.reverse();
    for d in dirs {
        match std::fs::metadata(d) {
            Ok(m) if can_search(&m, who) => continue,
            Ok(m) => {
                return Some(Blocked {
                    dir: d.to_path_buf(),
                    mode: m.mode(),
                    owner: m.uid(),
                    group: m.gid(),
                })
            }
            // Not there yet: moat creates it (and what is below) itself.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(_) => {
                return Some(Blocked {
                    dir: d.to_path_buf(),
                    mode: 0,
                    owner: 0,
                    group: 0,
                })
            }
        }
    }
    None
}

/// Refuses when `who` cannot reach `path`; `what` names the path for the
/// operator (e.g. `--workspace /srv/x`) and `other_fix` is the alternative to
/// opening the directory in the way.
pub fn require(path: &Path, who: Who, what: &str, other_fix: &str) -> Result<()> {
    match blocked_ancestor(path, who) {
        None => Ok(()),
        Some(b) => Err(SandboxError::Refused(format!(
            "{what}: {who} cannot reach it: {b}; let them through with `chmod o+x {}` (search only, not listing) or {other_fix}",
            b.dir.display()
        ))),
    }
}

/// [`require`] for a path every sandbox mounts (moat's own files), when moat
/// runs as root; without root, sandboxes run as moat's own uid.
pub fn require_for_sandboxes(path: &Path, what: &str, other_fix: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(());
    }
    require(path, Who::Anyone, what, other_fix)
}

/// Refuses a lease whose bind sources its host uid `uid` cannot reach: the
/// `--workspace` directory (whose owner `uid` is), the extra mounts, and the
/// files a door shows under /run/moat (e.g. a CLI template).
pub fn require_lease_sources(
    uid: u32,
    workspace: Option<&Path>,
    mounts: &[crate::fsguard::ResolvedMount],
    files: &[(PathBuf, PathBuf)],
) -> Result<()> {
    let who = Who::Uid(uid);
    if let Some(ws) = workspace {
        require(
            ws,
            who,
            &format!("--workspace {} (its owner)", ws.display()),
            "move the workspace to a directory its owner can reach",
        )?;
    }
    for m in mounts {
        require(
            &m.host,
            who,
            &format!(
                "mount {} -> {} (the sandbox's uid)",
                m.host.display(),
                m.sandbox.display()
            ),
            "mount a directory from elsewhere",
        )?;
    }
    for (host, inside) in files {
        require(
            host,
            who,
            &format!("{} (shown at {})", host.display(), inside.display()),
            "keep it under a directory they can reach (for agent CLIs: `moat agents install --dir DIR` and `agents.dir = \"DIR/current\"`)",
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_closed_parent_blocks_and_is_named() {
        let t = tempfile::tempdir().unwrap();
        let parent = t.path().join("parent");
        let inner = parent.join("a").join("b");
        std::fs::create_dir_all(&inner).unwrap();
        chmod(t.path(), 0o711);
        chmod(&parent, 0o700);
        chmod(&parent.join("a"), 0o755);
        let b = blocked_ancestor(&inner, Who::Anyone).expect("blocked");
        assert_eq!(b.dir, parent);
        assert_eq!(b.mode & 0o777, 0o700);
        let err = require(&inner, Who::Uid(4242), "--workspace x", "move it")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("chmod o+x {}", parent.display())),
            "{err}"
        );
        chmod(&parent, 0o711);
        assert_eq!(blocked_ancestor(&inner, Who::Anyone), None);
    }

    #[test]
    fn the_owner_and_the_group_bits_count_for_that_uid_only() {
        let t = tempfile::tempdir().unwrap();
        chmod(t.path(), 0o711);
        let d = t.path().join("mine");
        let inner = d.join("ws");
        std::fs::create_dir_all(&inner).unwrap();
        std::os::unix::fs::chown(&d, Some(4242), Some(4343)).unwrap();
        chmod(&d, 0o700);
        assert_eq!(blocked_ancestor(&inner, Who::Uid(4242)), None);
        assert!(blocked_ancestor(&inner, Who::Uid(4343)).is_some());
        assert!(blocked_ancestor(&inner, Who::Anyone).is_some());
        chmod(&d, 0o710);
        // gid == uid for a sandbox: uid 4343 runs with gid 4343.
        assert_eq!(blocked_ancestor(&inner, Who::Uid(4343)), None);
        assert!(blocked_ancestor(&inner, Who::Uid(4444)).is_some());
    }
}
