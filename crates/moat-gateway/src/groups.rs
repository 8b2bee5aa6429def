//! Group folders, global memory and per-channel mounts (docs/memory.md,
//! threat model M1, M2, M3).
//!
//! Owns: the checks of `[memory] global`, `[mounts] allowlist` and every
//! channel's `mounts` at `moat up` (real paths after symlinks, against the
//! allowlist file), each channel's folder under `<data>/groups`, the host uid
//! a channel's sandboxes share to write it, and the mounts these add to a
//! channel's sandbox policy. The sandbox engine binds them like any other
//! mount, so hand-back (F8) and socket-proof views (N9) apply to them too.
//! Must never: mount one channel's folder into another channel's sandbox, mount
//! global memory writable outside an admin channel, show the allowlist file to
//! a sandbox, or change ownership through a symlink.

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use moat_policy::gateway::{ChannelPolicy, GatewayConfig, SandboxMode, Trust};
use moat_policy::memory::{MountAllowlist, GLOBAL_DIR, GROUP_DIR, MEMORY_FILE};
use moat_policy::paths::DEFAULT_BLOCKED_PATTERNS;
use moat_policy::sandbox::MountRequest;
use moat_policy::SandboxPolicy;
use moat_sandbox::storage::UidLock;

/// A refusal at `moat up`, naming the configuration key.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct GroupsError {
    pub key: String,
    pub message: String,
}

fn refuse(key: impl Into<String>, message: impl Into<String>) -> GroupsError {
    GroupsError {
        key: key.into(),
        message: message.into(),
    }
}

/// One checked per-channel mount: the real host path.
#[derive(Debug, Clone)]
struct Checked {
    host: PathBuf,
    at: PathBuf,
    writable: bool,
}

/// What the gateway adds to its channels' sandboxes.
pub struct Groups {
    dir: PathBuf,
    global: Option<PathBuf>,
    mounts: HashMap<usize, Vec<Checked>>,
    runtime_dir: PathBuf,
    root: bool,
    /// The uid each group folder's sandboxes share, held so that the engine
    /// never gives it to another lease.
    uids: Mutex<HashMap<PathBuf, (u32, Option<UidLock>)>>,
}

/// The real path of `p`, refused when it does not exist or is reached
/// through a symlink.
fn real_dir(p: &Path, key: &str, what: &str) -> Result<PathBuf, GroupsError> {
    let real = std::fs::canonicalize(p).map_err(|e| {
        refuse(
            key,
            format!("{what} {} cannot be resolved: {e}", p.display()),
        )
    })?;
    if real != p {
        return Err(refuse(
            key,
            format!(
                "{} goes through a symlink (its real path is {}); write the real path",
                p.display(),
                real.display()
            ),
        ));
    }
    Ok(real)
}

impl Groups {
    /// Checks the configuration's memory and mount keys against the disk.
    pub fn check(
        cfg: &GatewayConfig,
        data_dir: &Path,
        runtime_dir: &Path,
    ) -> Result<Groups, GroupsError> {
        let defaults: Vec<String> = DEFAULT_BLOCKED_PATTERNS
            .iter()
            .map(|s| s.to_string())
            .collect();
        let global = match &cfg.memory_global {
            None => None,
            Some(g) => {
                let real = real_dir(g, "memory.global", "the global memory directory")?;
                if !real.is_dir() {
                    return Err(refuse(
                        "memory.global",
                        format!("{} is not a directory", g.display()),
                    ));
                }
                if let Some(pat) = moat_policy::paths::blocked_component(&real, &defaults) {
                    return Err(refuse(
                        "memory.global",
                        format!("{} matches the blocked pattern {pat:?}", real.display()),
                    ));
                }
                Some(real)
            }
        };
        let mut mounts = HashMap::new();
        let wanted = cfg.channels.iter().find(|c| !c.mounts.is_empty());
        if let Some(first) = wanted {
            let Some(list_path) = &cfg.mounts_allowlist else {
                return Err(refuse(
                    format!("channel[{}].mounts", first.index),
                    "per-channel mounts need a mount allowlist; set [mounts] allowlist = \"/etc/moat/mounts.toml\" and list the allowed roots there",
                ));
            };
            let text = std::fs::read_to_string(list_path).map_err(|e| {
                refuse(
                    "mounts.allowlist",
                    format!("reading {}: {e}", list_path.display()),
                )
            })?;
            let list = MountAllowlist::from_toml(&text)
                .map_err(|e| refuse("mounts.allowlist", format!("{}: {e}", list_path.display())))?;
            let list_real = std::fs::canonicalize(list_path).unwrap_or(list_path.clone());
            let mut roots = Vec::new();
            for r in &list.roots {
                match std::fs::canonicalize(&r.path) {
                    Ok(real) => roots.push((real, r.writable)),
                    Err(e) => {
                        tracing::warn!(root = %r.path.display(), error = %e, "mount allowlist: a root cannot be resolved; ignored")
                    }
                }
            }
            for c in &cfg.channels {
                let mut out = Vec::new();
                for (j, m) in c.mounts.iter().enumerate() {
                    let key = format!("channel[{}].mounts[{j}].host", c.index);
                    let real = std::fs::canonicalize(&m.host).map_err(|e| {
                        refuse(
                            &key,
                            format!("{} cannot be resolved: {e}", m.host.display()),
                        )
                    })?;
                    let writable = list
                        .judge(m, &real, &roots, c.trust == Trust::Untrusted)
                        .map_err(|r| refuse(&key, r))?;
                    if list_real.starts_with(&real) {
                        return Err(refuse(
                            &key,
                            format!(
                                "{} holds the mount allowlist file, which no sandbox may see",
                                real.display()
                            ),
                        ));
                    }
                    out.push(Checked {
                        host: real,
                        at: m.at.clone(),
                        writable,
                    });
                }
                mounts.insert(c.index, out);
            }
        }
        let root = nix::unistd::geteuid().is_root();
        Ok(Groups {
            dir: data_dir.join("groups"),
            global,
            mounts,
            runtime_dir: runtime_dir.to_path_buf(),
            root,
            uids: Mutex::new(HashMap::new()),
        })
    }

    /// The folder of channel `channel_id` of `platform` (not created).
    pub fn folder(&self, platform: &str, channel_id: &str) -> PathBuf {
        self.dir.join(folder_name(platform, channel_id))
    }

    /// Whether turns of `channel` in chat `channel_id` get a group folder: a
    /// pool serves every chat of a wildcard entry, so only per-thread
    /// sandboxes and channels with their own entry do.
    fn has_folder(channel: &ChannelPolicy) -> bool {
        !(channel.is_wildcard() && matches!(channel.sandbox, SandboxMode::Pool))
    }

    /// The sandbox policy of one turn of `channel` in chat `channel_id`, and
    /// the uid its sandbox runs as (the group folder's owner, when root).
    pub fn policy_for(
        &self,
        channel: &ChannelPolicy,
        channel_id: &str,
    ) -> Result<(SandboxPolicy, Option<u32>), String> {
        let mut p = channel.sandbox_policy();
        let admin = channel.trust == Trust::Admin;
        let mut uid = None;
        let add = |p: &mut SandboxPolicy, host: &Path, at: &str, writable: bool| {
            p.filesystem.allowed_roots.push(host.to_path_buf());
            p.filesystem.mounts.push(MountRequest {
                host: host.to_path_buf(),
                sandbox: PathBuf::from(at),
                writable,
            });
        };
        if Self::has_folder(channel) {
            let id = if channel.is_wildcard() {
                channel_id
            } else {
                &channel.id
            };
            let folder = self.folder(channel.platform.name(), id);
            uid = self.prepare(&folder, admin)?;
            add(&mut p, &folder, GROUP_DIR, true);
        }
        if let Some(g) = &self.global {
            add(&mut p, g, GLOBAL_DIR, admin);
        }
        for m in self.mounts.get(&channel.index).into_iter().flatten() {
            add(&mut p, &m.host, &m.at.to_string_lossy(), m.writable);
        }
        Ok((p, uid))
    }

    /// Creates `folder` with an empty memory file when missing, and returns
    /// the uid its sandboxes share (root only). An admin channel's sandboxes
    /// run as the global memory directory's owner, so they can write it.
    fn prepare(&self, folder: &Path, admin: bool) -> Result<Option<u32>, String> {
        let io = |what: &str, e: std::io::Error| format!("{what} {}: {e}", folder.display());
        // One channel's first turns may come at once: one of them makes it.
        let mut uids = self
            .uids
            .lock()
            .map_err(|_| "uid table poisoned".to_string())?;
        std::fs::create_dir_all(&self.dir).map_err(|e| io("creating the parent of", e))?;
        if self.root {
            // Sandbox uids must get through to their folder, but not list the others.
            let _ = std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o711));
        }
        match std::fs::symlink_metadata(folder) {
            Ok(m) if !m.is_dir() => {
                return Err(format!(
                    "{} is not a directory; move it away",
                    folder.display()
                ))
            }
            Ok(_) => {}
            Err(_) => {
                std::fs::create_dir(folder).map_err(|e| io("creating", e))?;
                std::fs::set_permissions(folder, std::fs::Permissions::from_mode(0o700))
                    .map_err(|e| io("setting the mode of", e))?;
                // Only in a folder just made: in one a sandbox has written,
                // the memory file is the sandbox's to keep or delete (and a
                // name there is never followed by the host).
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(folder.join(MEMORY_FILE))
                    .map_err(|e| io("creating MEMORY.md in", e))?;
            }
        }
        if !self.root {
            return Ok(None);
        }
        if let Some((u, _)) = uids.get(folder) {
            return Ok(Some(*u));
        }
        let wanted = match (&self.global, admin) {
            (Some(g), true) => {
                let owner = std::fs::metadata(g)
                    .map_err(|e| format!("{}: {e}", g.display()))?
                    .uid();
                if owner == 0 {
                    return Err(format!("the global memory directory {} is owned by root, and sandboxes never run as root; chown it to an unprivileged user", g.display()));
                }
                Some(owner)
            }
            _ => None,
        };
        let owner = std::fs::metadata(folder)
            .map_err(|e| io("reading", e))?
            .uid();
        let (u, lock) = match wanted {
            Some(u) => (u, None),
            None if owner != 0 => (owner, UidLock::take(&self.runtime_dir, owner).ok()),
            None => {
                let l = UidLock::allocate(&self.runtime_dir).map_err(|e| e.to_string())?;
                (l.uid, Some(l))
            }
        };
        if owner != u {
            chown_tree(folder, u)?;
        }
        uids.insert(folder.to_path_buf(), (u, lock));
        Ok(Some(u))
    }
}

/// `<platform>-<id>`, with anything but letters, digits, `-`, `_` and `.` made
/// `_` and, when that changed the id, a hash of the id added (two ids never
/// share a folder).
pub fn folder_name(platform: &str, channel_id: &str) -> String {
    let clean: String = channel_id
        .chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let clean = if clean.starts_with('.') {
        format!("_{clean}")
    } else {
        clean
    };
    if clean == channel_id {
        format!("{platform}-{clean}")
    } else {
        // FNV-1a: stable across versions and platforms.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in channel_id.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        format!("{platform}-{clean}-{h:016x}")
    }
}

/// Gives a folder and everything in it to `uid`, never following a symlink.
fn chown_tree(dir: &Path, uid: u32) -> Result<(), String> {
    let status = std::process::Command::new("chown")
        .arg("-R")
        .arg("-P")
        .arg(format!("{uid}:{uid}"))
        .arg(dir)
        .status()
        .map_err(|e| format!("running chown on {}: {e}", dir.display()))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("chown of {} to uid {uid} failed", dir.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_names_are_safe_and_distinct() {
        assert_eq!(folder_name("slack", "C0123"), "slack-C0123");
        let a = folder_name("web", "a@b");
        let b = folder_name("web", "a_b");
        assert_ne!(a, b);
        assert!(a.starts_with("web-a_b-"), "{a}");
        let dots = folder_name("web", "..");
        assert!(!dots.contains('/') && dots.starts_with("web-_"), "{dots}");
        assert!(!folder_name("web", "x/../../etc").contains('/'));
    }
}
