//! Group folders, global memory and per-channel mounts: the configuration keys
//! `[memory] global`, `[mounts] allowlist`, a channel's `mounts = [...]`, and
//! the mount allowlist file's shape and verdict (docs/memory.md).
//!
//! Owns the shape checks that need no disk (absolute paths, no `..`, plain
//! in-sandbox paths, `ro`/`rw`) and the verdict on a host path that the caller
//! already resolved to its real path. Never touches the filesystem: resolving
//! symlinks and reading the allowlist file happen in the gateway at `moat up`.

use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

use crate::paths::{blocked_component, check_sandbox_path, DEFAULT_BLOCKED_PATTERNS};
use crate::PolicyError;

/// Where a channel's group folder appears inside its sandboxes.
pub const GROUP_DIR: &str = "/workspace/group";
/// Where global memory appears inside every sandbox (when configured).
pub const GLOBAL_DIR: &str = "/workspace/global";
/// The memory file agents read at the start of every turn.
pub const MEMORY_FILE: &str = "MEMORY.md";

/// One `mounts = [{ host, at, mode }]` entry of a channel, shape-checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelMount {
    /// As written (absolute, no `..`); resolved at `moat up`.
    pub host: PathBuf,
    pub at: PathBuf,
    pub writable: bool,
}

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawChannelMount {
    host: String,
    at: String,
    mode: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMemory {
    pub global: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMounts {
    pub allowlist: Option<String>,
}

fn err(key: impl Into<String>, message: impl Into<String>) -> PolicyError {
    PolicyError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// An absolute host path without `..` (`key` names it in the error).
pub(crate) fn host_path(text: &str, key: &str) -> Result<PathBuf, PolicyError> {
    let p = PathBuf::from(text);
    if !p.is_absolute() {
        return Err(err(
            key,
            format!("{text:?} is not an absolute path; write it from /, e.g. \"/srv/repo\""),
        ));
    }
    if p.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(err(
            key,
            format!("{text:?} contains \"..\"; write the directory's own path"),
        ));
    }
    if p.components().count() <= 1 {
        return Err(err(key, "the host's root directory cannot be mounted"));
    }
    Ok(p)
}

/// Checks a channel's `mounts` list; `at` is e.g. `channel[2]`.
pub(crate) fn channel_mounts(
    raw: &[RawChannelMount],
    at: &str,
) -> Result<Vec<ChannelMount>, PolicyError> {
    let mut out: Vec<ChannelMount> = Vec::new();
    for (i, m) in raw.iter().enumerate() {
        let key = |k: &str| format!("{at}.mounts[{i}].{k}");
        let host = host_path(&m.host, &key("host"))?;
        let inside = PathBuf::from(&m.at);
        check_sandbox_path(&inside).map_err(|r| err(key("at"), r))?;
        if !inside.starts_with("/workspace/") {
            return Err(err(
                key("at"),
                format!(
                    "{:?}: mounts go under /workspace, e.g. \"/workspace/repo\"",
                    m.at
                ),
            ));
        }
        for reserved in [GROUP_DIR, GLOBAL_DIR] {
            if inside.starts_with(reserved) || Path::new(reserved).starts_with(&inside) {
                return Err(err(
                    key("at"),
                    format!("{:?} overlaps {reserved}, which moat mounts itself; pick another place under /workspace", m.at),
                ));
            }
        }
        if out.iter().any(|o| o.at == inside) {
            return Err(err(
                key("at"),
                format!(
                    "{:?} is already used by another mount of this channel",
                    m.at
                ),
            ));
        }
        let writable = match m.mode.as_deref().unwrap_or("ro") {
            "ro" => false,
            "rw" => true,
            other => {
                return Err(err(
                    key("mode"),
                    format!("unknown mode {other:?}; use \"ro\" or \"rw\""),
                ))
            }
        };
        out.push(ChannelMount {
            host,
            at: inside,
            writable,
        });
    }
    Ok(out)
}

/// The mount allowlist file (`[mounts] allowlist`), kept where no sandbox sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountAllowlist {
    pub roots: Vec<AllowedRoot>,
    /// The default blocked names plus the file's `blocked_patterns`.
    pub blocked_patterns: Vec<String>,
    /// Untrusted channels get every mount read-only (default true).
    pub untrusted_read_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedRoot {
    pub path: PathBuf,
    pub writable: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAllowlist {
    #[serde(default)]
    root: Vec<RawRoot>,
    #[serde(default)]
    blocked_patterns: Vec<String>,
    untrusted_read_only: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoot {
    path: String,
    #[serde(default)]
    writable: bool,
}

impl MountAllowlist {
    /// Parses the allowlist file's text:
    /// `[[root]] path = "/srv" writable = false`, `blocked_patterns = [...]`,
    /// `untrusted_read_only = true`.
    pub fn from_toml(text: &str) -> Result<Self, PolicyError> {
        let raw: RawAllowlist = toml::from_str(text).map_err(|e| PolicyError::Syntax {
            key: "(mount allowlist)".into(),
            message: e.message().to_string(),
            line: None,
        })?;
        let mut roots = Vec::new();
        for (i, r) in raw.root.iter().enumerate() {
            roots.push(AllowedRoot {
                path: host_path(&r.path, &format!("root[{i}].path"))?,
                writable: r.writable,
            });
        }
        let mut blocked: Vec<String> = DEFAULT_BLOCKED_PATTERNS
            .iter()
            .map(|s| s.to_string())
            .collect();
        for (i, p) in raw.blocked_patterns.iter().enumerate() {
            if p.trim().is_empty() || p.contains("..") {
                return Err(err(
                    format!("blocked_patterns[{i}]"),
                    "write a file or directory name, e.g. \".vault\"",
                ));
            }
            blocked.push(p.clone());
        }
        Ok(MountAllowlist {
            roots,
            blocked_patterns: blocked,
            untrusted_read_only: raw.untrusted_read_only.unwrap_or(true),
        })
    }

    /// The verdict on one mount whose host side resolved to `real` (canonical,
    /// symlinks followed; `roots` given canonical too). `Ok(writable)`: the
    /// mode it gets. `Err`: why it is refused.
    pub fn judge(
        &self,
        m: &ChannelMount,
        real: &Path,
        canonical_roots: &[(PathBuf, bool)],
        untrusted: bool,
    ) -> Result<bool, String> {
        if real != m.host {
            return Err(format!(
                "{} goes through a symlink (its real path is {}); write the real path",
                m.host.display(),
                real.display()
            ));
        }
        for p in [&m.host, &real.to_path_buf()] {
            if let Some(pat) = blocked_component(p, &self.blocked_patterns) {
                return Err(format!(
                    "{} matches the blocked pattern {pat:?}",
                    p.display()
                ));
            }
        }
        let Some((root, root_writable)) = canonical_roots
            .iter()
            .filter(|(r, _)| real.starts_with(r))
            .max_by_key(|(r, _)| r.components().count())
        else {
            return Err(format!(
                "{} is outside the allowed roots of the mount allowlist ({}); add a [[root]] to the allowlist file",
                real.display(),
                if canonical_roots.is_empty() {
                    "none".to_string()
                } else {
                    canonical_roots
                        .iter()
                        .map(|(r, _)| r.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            ));
        };
        if m.writable && !root_writable {
            return Err(format!(
                "mode = \"rw\" but the allowed root {} is read-only in the allowlist; use mode = \"ro\"",
                root.display()
            ));
        }
        if m.writable && untrusted && self.untrusted_read_only {
            return Err(
                "mode = \"rw\" in an untrusted channel, and the allowlist sets untrusted_read_only; use mode = \"ro\""
                    .into(),
            );
        }
        Ok(m.writable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount(host: &str, at: &str, mode: Option<&str>) -> RawChannelMount {
        RawChannelMount {
            host: host.into(),
            at: at.into(),
            mode: mode.map(String::from),
        }
    }

    fn refusal(raw: &[RawChannelMount]) -> String {
        channel_mounts(raw, "channel[0]").unwrap_err().to_string()
    }

    #[test]
    fn attack_m3_mount_shapes_are_refused_naming_the_key() {
        let e = refusal(&[mount("/srv/../etc", "/workspace/x", None)]);
        assert!(
            e.contains("channel[0].mounts[0].host") && e.contains(".."),
            "{e}"
        );
        let e = refusal(&[mount("srv", "/workspace/x", None)]);
        assert!(
            e.contains("mounts[0].host") && e.contains("absolute"),
            "{e}"
        );
        let e = refusal(&[mount("/srv/a", "/etc/x", None)]);
        assert!(e.contains("mounts[0].at"), "{e}");
        let e = refusal(&[mount("/srv/a", "/workspace/group", None)]);
        assert!(
            e.contains("mounts[0].at") && e.contains("/workspace/group"),
            "{e}"
        );
        let e = refusal(&[mount("/srv/a", "/workspace/a", Some("rwx"))]);
        assert!(e.contains("mounts[0].mode"), "{e}");
        let ok = channel_mounts(&[mount("/srv/a", "/workspace/a", Some("rw"))], "c").unwrap();
        assert!(ok[0].writable);
    }

    #[test]
    fn attack_m3_the_allowlist_verdict() {
        let list = MountAllowlist::from_toml(
            "blocked_patterns = [\".vault\"]\n[[root]]\npath = \"/srv\"\n[[root]]\npath = \"/srv/rw\"\nwritable = true\n",
        )
        .unwrap();
        assert!(list.untrusted_read_only);
        let roots = vec![
            (PathBuf::from("/srv"), false),
            (PathBuf::from("/srv/rw"), true),
        ];
        let m = |h: &str, w: bool| ChannelMount {
            host: h.into(),
            at: "/workspace/x".into(),
            writable: w,
        };
        let j = |h: &str, real: &str, w: bool, untrusted: bool| {
            list.judge(&m(h, w), Path::new(real), &roots, untrusted)
        };
        assert_eq!(j("/srv/a", "/srv/a", false, false), Ok(false));
        assert_eq!(j("/srv/rw/a", "/srv/rw/a", true, false), Ok(true));
        assert!(j("/opt/a", "/opt/a", false, false)
            .unwrap_err()
            .contains("outside"));
        assert!(j("/srv/link", "/opt/a", false, false)
            .unwrap_err()
            .contains("symlink"));
        assert!(j("/srv/.ssh", "/srv/.ssh", false, false)
            .unwrap_err()
            .contains(".ssh"));
        assert!(j("/srv/x.vault", "/srv/x.vault", false, false).is_ok());
        assert!(j("/srv/.vault", "/srv/.vault", false, false)
            .unwrap_err()
            .contains(".vault"));
        assert!(j("/srv/a", "/srv/a", true, false)
            .unwrap_err()
            .contains("read-only"));
        assert!(j("/srv/rw/a", "/srv/rw/a", true, true)
            .unwrap_err()
            .contains("untrusted"));
    }
}
