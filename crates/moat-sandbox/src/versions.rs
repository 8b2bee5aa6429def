//! Versioned directories switched atomically: the agents template
//! (`moat agents install`) and root-filesystem images (`moat image import`).
//!
//! A versioned directory holds version directories named by
//! [`new_version_id`] (sorting by age), a `current` symlink naming one of them,
//! scratch directories `.new-<random>` of a running install, and a `.lock` held
//! by the one process changing it.
//!
//! Owns: taking the lock, creating and cleaning scratch directories, switching
//! `current` with one rename of a fresh symlink (a reader sees the old version
//! or the new one, never neither), and pruning old versions. Must never: point
//! `current` at anything but a version directory's name, follow a symlink
//! named `current` that is not moat's, or remove the version `current` names.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Result, SandboxError};

/// The symlink naming the version in use.
pub const CURRENT: &str = "current";
/// Prefix of an install's scratch directory.
pub const STAGING_PREFIX: &str = ".new-";

/// Random hex for scratch names.
pub fn random_hex() -> String {
    format!("{:016x}", crate::storage::random_u64())
}

/// `YYYYMMDDTHHMMSSZ` for a time since the Unix epoch (UTC).
pub fn utc_stamp(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A version's directory name: the UTC second and its nanoseconds in hex, so
/// names sort by age even for two installs in one second. It always sorts
/// after `newest` (the newest existing version), so a clock that stepped back
/// cannot make `prune` take the new version for the oldest.
pub fn new_version_id(newest: Option<&str>) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let id = format!("{}-{:08x}", utc_stamp(now.as_secs()), now.subsec_nanos());
    match newest {
        Some(n) if is_version_id(n) && n >= id.as_str() => {
            // Same stamp as the newest, one past its suffix.
            let (stamp, suffix) = n.split_at(17);
            let next = u32::from_str_radix(suffix, 16)
                .unwrap_or(u32::MAX - 1)
                .saturating_add(1);
            format!("{stamp}{next:08x}")
        }
        _ => id,
    }
}

/// Whether `name` is a version directory's name (`new_version_id`'s shape).
pub fn is_version_id(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() == 25
        && b[..8].iter().all(u8::is_ascii_digit)
        && b[8] == b'T'
        && b[9..15].iter().all(u8::is_ascii_digit)
        && b[15] == b'Z'
        && b[16] == b'-'
        && b[17..].iter().all(|c| c.is_ascii_hexdigit())
}

/// Flushes a directory's entries (a rename in it) to disk.
pub fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

fn io(what: String, e: std::io::Error) -> SandboxError {
    SandboxError::io(what, e)
}

/// A versioned directory, locked against a second writer while this lives.
#[derive(Debug)]
pub struct VersionDir {
    /// The directory's real path.
    pub dir: PathBuf,
    _lock: std::fs::File,
}

impl VersionDir {
    /// Creates (mode 0755, owned by the caller) and locks `dir`; removes the
    /// scratch an interrupted writer left. `what` names the command for the
    /// "another ... is running" message.
    pub fn open(dir: &Path, what: &str) -> Result<VersionDir> {
        if !dir.is_absolute() {
            return Err(SandboxError::Refused(format!(
                "{}: write an absolute path",
                dir.display()
            )));
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .create(dir)
            .map_err(|e| io(format!("creating {}", dir.display()), e))?;
        let real = std::fs::canonicalize(dir)
            .map_err(|e| io(format!("resolving {}", dir.display()), e))?;
        let meta =
            std::fs::metadata(&real).map_err(|e| io(format!("reading {}", real.display()), e))?;
        if meta.uid() != nix::unistd::geteuid().as_raw() {
            return Err(SandboxError::Refused(format!(
                "{} is not owned by the user running moat; sandboxes must never be able to change it",
                real.display()
            )));
        }
        // Sandbox uids traverse it to mount a version; nobody else writes.
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| io(format!("setting the mode of {}", real.display()), e))?;
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(real.join(".lock"))
            .map_err(|e| io(format!("opening {}/.lock", real.display()), e))?;
        if lock.try_lock().is_err() {
            return Err(SandboxError::Refused(format!(
                "another {what} is running on {}; wait for it to finish",
                real.display()
            )));
        }
        let t = VersionDir {
            dir: real,
            _lock: lock,
        };
        if let Ok(target) = std::fs::symlink_metadata(t.dir.join(CURRENT)) {
            if !target.file_type().is_symlink() {
                return Err(SandboxError::Refused(format!(
                    "{} is not a symlink; moat switches versions by replacing that symlink. Move it away first",
                    t.dir.join(CURRENT).display()
                )));
            }
        }
        t.remove_stale_staging();
        Ok(t)
    }

    /// Scratch directories an interrupted install left (we hold the lock, so
    /// none is in use).
    fn remove_stale_staging(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(STAGING_PREFIX) || name.starts_with(".current-") {
                let p = e.path();
                let r = match e.file_type() {
                    Ok(t) if t.is_dir() => std::fs::remove_dir_all(&p),
                    _ => std::fs::remove_file(&p),
                };
                match r {
                    Ok(()) => eprintln!(
                        "moat: removed {} left by an interrupted install",
                        p.display()
                    ),
                    Err(e) => eprintln!("moat: warning: could not remove {}: {e}", p.display()),
                }
            }
        }
    }

    /// A fresh scratch directory `.new-<random>` of the given mode.
    pub fn staging(&self, mode: u32) -> Result<PathBuf> {
        let root = self.dir.join(format!("{STAGING_PREFIX}{}", random_hex()));
        std::fs::DirBuilder::new()
            .create(&root)
            .map_err(|e| io(format!("creating {}", root.display()), e))?;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(mode))
            .map_err(|e| io(format!("setting the mode of {}", root.display()), e))?;
        Ok(root)
    }

    /// The version `current` points at, if any.
    pub fn current(&self) -> Option<String> {
        current_of(&self.dir)
    }

    /// Version directories, oldest first.
    pub fn versions(&self) -> Vec<String> {
        versions_of(&self.dir)
    }

    /// Moves the complete `ready` directory into place as a new version and
    /// points `current` at it; returns the version's name.
    pub fn install(&self, ready: &Path) -> Result<String> {
        let id = new_version_id(self.versions().last().map(String::as_str));
        let final_dir = self.dir.join(&id);
        std::fs::rename(ready, &final_dir).map_err(|e| {
            io(
                format!("moving the new version to {}", final_dir.display()),
                e,
            )
        })?;
        sync_dir(&self.dir);
        self.switch(&id)?;
        Ok(id)
    }

    /// Points `current` at `id` with one rename of a fresh symlink over it:
    /// a reader sees the old target or the new one, never neither.
    pub fn switch(&self, id: &str) -> Result<()> {
        if !is_version_id(id) {
            return Err(SandboxError::Refused(format!(
                "{id:?} is not a version name"
            )));
        }
        let tmp = self.dir.join(format!(".current-{}", random_hex()));
        std::os::unix::fs::symlink(id, &tmp)
            .map_err(|e| io(format!("creating the symlink {}", tmp.display()), e))?;
        if let Err(e) = std::fs::rename(&tmp, self.dir.join(CURRENT)) {
            let _ = std::fs::remove_file(&tmp);
            return Err(io(
                format!("switching {} to {id}", self.dir.join(CURRENT).display()),
                e,
            ));
        }
        sync_dir(&self.dir);
        Ok(())
    }

    /// Removes all but the newest `keep` versions (never `current`).
    pub fn prune(&self, keep: usize) -> Vec<String> {
        self.prune_where(keep, |_| true)
    }

    /// [`VersionDir::prune`], removing only the versions whose directory
    /// `removable` accepts.
    pub fn prune_where(&self, keep: usize, removable: impl Fn(&Path) -> bool) -> Vec<String> {
        let current = self.current();
        let versions = self.versions();
        let cut = versions.len().saturating_sub(keep.max(1));
        let mut removed = Vec::new();
        for old in &versions[..cut] {
            if Some(old) == current.as_ref() || !removable(&self.dir.join(old)) {
                continue;
            }
            match std::fs::remove_dir_all(self.dir.join(old)) {
                Ok(()) => removed.push(old.clone()),
                Err(e) => eprintln!("moat: warning: could not remove the old version {old}: {e}"),
            }
        }
        removed
    }
}

/// The version `dir/current` points at, if it names a version (read without the lock).
pub fn current_of(dir: &Path) -> Option<String> {
    let t = std::fs::read_link(dir.join(CURRENT)).ok()?;
    let name = t.to_str()?.to_string();
    is_version_id(&name).then_some(name)
}

/// Version directories of `dir`, oldest first.
pub fn versions_of(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|it| {
            it.flatten()
                .filter_map(|e| e.file_name().to_str().map(String::from))
                .filter(|n| is_version_id(n))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_ids() {
        assert_eq!(utc_stamp(0), "19700101T000000Z");
        assert_eq!(utc_stamp(951_782_400), "20000229T000000Z");
        assert_eq!(utc_stamp(1_767_225_599), "20251231T235959Z");
        let id = new_version_id(None);
        assert!(is_version_id(&id), "{id}");
        let later = new_version_id(Some(&id));
        assert!(is_version_id(&later) && later > id, "{later} after {id}");
        let from_the_future = "29991231T235959Z-00000005";
        let next = new_version_id(Some(from_the_future));
        assert_eq!(next, "29991231T235959Z-00000006");
        assert!(!is_version_id("current"));
        assert!(!is_version_id(".new-0123456789abcdef"));
    }

    #[test]
    fn install_switches_current_and_prune_keeps_it() {
        let tmp = tempfile::tempdir().unwrap();
        let v = VersionDir::open(tmp.path(), "test").unwrap();
        assert!(VersionDir::open(tmp.path(), "test").is_err(), "locked");
        let mut ids = Vec::new();
        for _ in 0..3 {
            let s = v.staging(0o700).unwrap();
            ids.push(v.install(&s).unwrap());
        }
        assert_eq!(v.current().as_deref(), Some(ids[2].as_str()));
        assert_eq!(v.versions(), ids);
        v.switch(&ids[0]).unwrap();
        let removed = v.prune(1);
        assert_eq!(removed, vec![ids[1].clone()]);
        assert_eq!(v.versions(), vec![ids[0].clone(), ids[2].clone()]);
        assert!(v.switch("../etc").is_err());
    }
}
