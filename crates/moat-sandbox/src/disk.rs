//! A kept lease's files on disk: one ext4 filesystem image per named lease
//! (a sparse file: the size is a hard limit, only what is written takes
//! space), under moat's data directory in a root-only directory that no
//! sandbox mounts or can reach; loop-mounted at the lease's storage
//! generation while the lease is open, unmounted when it is released.
//!
//! Owns: creating an image (`mkfs.ext4`), checking it before every mount
//! (`e2fsck -p`: a journal replayed and safe fixes made; anything worse and
//! the image is set aside, never mounted, and the caller told), mounting it
//! `nosuid,nodev`, unmounting it, deleting it.
//! Must never: mount an image that did not pass the check, put the image
//! file anywhere a sandbox can see, or run a tool on a path a sandbox chose
//! (every path here is built from a checked lease name).

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::{IoContext, Result, SandboxError};

/// One lease's image, `<disks>/<name>.img`.
#[derive(Debug, Clone)]
pub struct DiskImage {
    pub path: PathBuf,
    pub size: u64,
}

/// The root-only directory of the images under `data_dir`.
pub fn disks_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("disks")
}

impl DiskImage {
    /// The image of the named lease `name` (already checked by
    /// `storage::check_name`) in `data_dir`.
    pub fn of(data_dir: &Path, name: &str, size: u64) -> Result<DiskImage> {
        let dir = disks_dir(data_dir);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .ctx(|| format!("creating {}", dir.display()))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
            .ctx(|| format!("setting the mode of {}", dir.display()))?;
        Ok(DiskImage {
            path: dir.join(format!("{name}.img")),
            size,
        })
    }

    /// The uid the image's files belong to (recorded when it was made, so a
    /// lease opened after a host reboot runs as the same uid).
    pub fn recorded_owner(&self) -> Option<u32> {
        fs::read_to_string(self.path.with_extension("uid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Makes the image if it does not exist, else checks it. A damaged image
    /// is renamed aside (`<name>.img.damaged-<time>`) and a fresh one made;
    /// the returned text tells the user so. `owner` is recorded.
    pub fn prepare(&self, owner: u32) -> Result<Option<String>> {
        let mut told = None;
        if self.path.exists() {
            if let Err(reason) = self.check() {
                let stamp = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let aside = self.path.with_extension(format!("img.damaged-{stamp}"));
                fs::rename(&self.path, &aside)
                    .ctx(|| format!("setting aside the damaged {}", self.path.display()))?;
                tracing::error!(image = %self.path.display(), set_aside = %aside.display(), reason = %reason, "a workspace disk failed its check and was set aside");
                told = Some(format!(
                    "this sandbox's workspace disk was damaged ({reason}); it was not mounted, it is kept aside for the operator as {}, and this turn starts with an empty workspace",
                    aside.display()
                ));
            }
        }
        if !self.path.exists() {
            self.create()?;
        }
        fs::write(self.path.with_extension("uid"), owner.to_string())
            .ctx(|| format!("recording the owner of {}", self.path.display()))?;
        Ok(told)
    }

    fn create(&self) -> Result<()> {
        let tmp = self.path.with_extension("img.new");
        let _ = fs::remove_file(&tmp);
        let f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .ctx(|| format!("creating {}", tmp.display()))?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))
            .ctx(|| format!("setting the mode of {}", tmp.display()))?;
        f.set_len(self.size)
            .ctx(|| format!("sizing {} to {} bytes", tmp.display(), self.size))?;
        drop(f);
        // No reserved blocks (the sandbox is the only user); lazy init keeps
        // the creation of a large image quick.
        run(
            Command::new("mkfs.ext4")
                .args([
                    "-q",
                    "-F",
                    "-m",
                    "0",
                    "-E",
                    "root_owner=0:0,lazy_itable_init=1,lazy_journal_init=1",
                ])
                .arg(&tmp),
            "mkfs.ext4",
        )
        .inspect_err(|_| {
            let _ = fs::remove_file(&tmp);
        })?;
        fs::rename(&tmp, &self.path).ctx(|| format!("installing {}", self.path.display()))
    }

    /// `e2fsck -p`: 0 (clean) and 1 (fixed) pass; anything else is damage.
    fn check(&self) -> std::result::Result<(), String> {
        let out = Command::new("e2fsck")
            .arg("-p")
            .arg(&self.path)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("e2fsck could not run: {e}"))?;
        match out.status.code() {
            Some(0) | Some(1) => Ok(()),
            code => {
                let text = String::from_utf8_lossy(&out.stdout);
                let first = text
                    .lines()
                    .map(str::trim)
                    .find(|l| !l.is_empty())
                    .unwrap_or("no output");
                Err(format!(
                    "e2fsck exit {}: {first}",
                    code.map(|c| c.to_string())
                        .unwrap_or_else(|| "by signal".into())
                ))
            }
        }
    }

    /// Mounts the image at `at` (nosuid, nodev; a loop device freed at unmount).
    pub fn mount(&self, at: &Path) -> Result<()> {
        run(
            Command::new("mount")
                .args(["-t", "ext4", "-o", "loop,nosuid,nodev"])
                .arg(&self.path)
                .arg(at),
            "mount",
        )
        .map_err(|e| {
            SandboxError::Limits(format!(
                "cannot mount the workspace disk {} at {}: {e} (loop mounts need root)",
                self.path.display(),
                at.display()
            ))
        })
    }

    /// Deletes the image and its owner record.
    pub fn delete(&self) -> Result<()> {
        let _ = fs::remove_file(self.path.with_extension("uid"));
        match fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(SandboxError::io(
                format!("deleting {}", self.path.display()),
                e,
            )),
        }
    }
}

/// Unmounts a disk-backed generation: a plain unmount (the filesystem is
/// written back and the loop device freed before the next check); lazily
/// if something still holds it.
pub fn unmount(at: &Path) -> Result<()> {
    use nix::mount::{umount2, MntFlags};
    match umount2(at, MntFlags::empty()) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EBUSY) => umount2(at, MntFlags::MNT_DETACH).map_err(|e| {
            SandboxError::io(
                format!("unmounting {}", at.display()),
                std::io::Error::from(e),
            )
        }),
        Err(e) => Err(SandboxError::io(
            format!("unmounting {}", at.display()),
            std::io::Error::from(e),
        )),
    }
}

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| SandboxError::io(format!("running {what}"), e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(SandboxError::Start(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}
