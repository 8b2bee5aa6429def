//! A lease's writable places on the host: a size-limited tmpfs per generation
//! holding `workspace/`, `home/` and `tmp/` (or, for a named lease with a
//! persistent disk, its checked ext4 image mounted there: `disk.rs`), plus
//! the host uid the lease's processes run as.
//!
//! Owns: the disk quota (tmpfs `size=`, or the image's size), O(1) reset
//! (mount a fresh generation, detach the old one; never for a disk), keeping
//! files for a named lease, and the per-lease uid.
//! Never follows a symlink created by a sandbox: it only mounts, unmounts,
//! creates its own entries and removes whole mounts.

use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::error::{IoContext, Result, SandboxError};

/// First host uid handed to sandboxes; a lease takes one of `UID_RANGE` after it.
pub const UID_BASE: u32 = 1_000_000_000;
pub const UID_RANGE: u32 = 1 << 24;
/// The uid and gid a sandboxed process sees for itself.
pub const SANDBOX_UID: u32 = 1000;

pub fn random_u64() -> u64 {
    let mut buf = [0u8; 8];
    // SAFETY: getrandom writes at most buf.len() bytes into buf.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n != buf.len() as isize {
        // Fall back to time and pid; only used for names, never for secrets.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        return t ^ ((std::process::id() as u64) << 32);
    }
    u64::from_ne_bytes(buf)
}

fn flock_nb(f: &File) -> bool {
    // SAFETY: flock on a file descriptor we own.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// An exclusively held host uid (released when dropped).
#[derive(Debug)]
pub struct UidLock {
    pub uid: u32,
    _lock: File,
}

impl UidLock {
    pub fn take(runtime: &Path, uid: u32) -> Result<UidLock> {
        let dir = runtime.join("uids");
        fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        let path = dir.join(uid.to_string());
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .ctx(|| format!("opening {}", path.display()))?;
        if flock_nb(&f) {
            Ok(UidLock { uid, _lock: f })
        } else {
            Err(SandboxError::Refused(format!(
                "host uid {uid} is in use by another lease"
            )))
        }
    }

    pub fn allocate(runtime: &Path) -> Result<UidLock> {
        for _ in 0..64 {
            let uid = UID_BASE + (random_u64() % UID_RANGE as u64) as u32;
            if let Ok(l) = UidLock::take(runtime, uid) {
                return Ok(l);
            }
        }
        Err(SandboxError::Start(
            "no free host uid for the sandbox".into(),
        ))
    }
}

/// Validates a lease name: letters, digits, `-`, `_`, `.`, 1 to 100 chars, not starting with `.`.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(SandboxError::Refused(format!(
            "lease name {name:?} must be 1-100 letters, digits, '-', '_' or '.', not starting with '.'"
        )))
    }
}

/// The host side of one lease's files.
#[derive(Debug)]
pub struct Storage {
    pub dir: PathBuf,
    pub generation: u64,
    pub owner: u32,
    quota: u64,
    /// `Some`: generations are this ext4 image, not tmpfs.
    disk: Option<crate::disk::DiskImage>,
    /// What the user must be told (a damaged disk set aside).
    pub notices: Vec<String>,
    /// Threads unmounting old generations; joined before the lease is destroyed.
    detaching: Vec<std::thread::JoinHandle<()>>,
    _lock: File,
}

pub(crate) const PASSWD: &str = "root:x:0:0:root:/root:/usr/sbin/nologin\nagent:x:1000:1000:moat agent:/home/agent:/bin/bash\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";
pub(crate) const GROUP: &str = "root:x:0:\nagent:x:1000:\nnogroup:x:65534:\n";
/// The sandbox's resolver is its door's DNS stub (without a door: nothing answers).
pub(crate) const RESOLV: &str = "nameserver 127.0.0.1\noptions attempts:1 timeout:2\n";
pub(crate) const HOSTS: &str = "127.0.0.1 localhost moat\n::1 localhost ip6-localhost\n";

impl Storage {
    /// Opens (creating if needed) the lease directory `dir` and locks it, so no
    /// two leases ever use the same files at once. `owner` is the host uid of the
    /// lease's processes; `quota` the tmpfs size in bytes.
    pub fn open(dir: &Path, owner: u32, quota: u64) -> Result<Storage> {
        Storage::open_backed(dir, owner, quota, None)
    }

    /// As [`Storage::open`], the files on `disk` (checked, then mounted;
    /// unmounted again by [`Storage::close`]).
    pub fn open_on_disk(dir: &Path, owner: u32, disk: crate::disk::DiskImage) -> Result<Storage> {
        Storage::open_backed(dir, owner, disk.size, Some(disk))
    }

    fn open_backed(
        dir: &Path,
        owner: u32,
        quota: u64,
        disk: Option<crate::disk::DiskImage>,
    ) -> Result<Storage> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(dir)
            .ctx(|| format!("creating lease directory {}", dir.display()))?;
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))
            .ctx(|| format!("opening {}/lock", dir.display()))?;
        if !flock_nb(&lock) {
            return Err(SandboxError::Refused(format!(
                "lease {} is in use by another request",
                dir.display()
            )));
        }
        let mut st = Storage {
            dir: dir.to_path_buf(),
            generation: 0,
            owner,
            quota,
            disk,
            notices: Vec::new(),
            detaching: Vec::new(),
            _lock: lock,
        };
        // Written under the lock: `sweep` only considers directories that have it.
        st.record_owner()?;
        let mut gens = st.mounted_generations();
        gens.sort_unstable();
        match gens.pop() {
            Some(g) => {
                st.generation = g;
                for old in gens {
                    st.unmount_generation(old);
                }
            }
            None => {
                st.generation = 1;
                st.mount_generation(1)?;
            }
        }
        Ok(st)
    }

    /// Locks an existing lease directory whose owner is gone (its lock is free),
    /// without mounting anything. `None` if a live process holds it.
    pub fn adopt_stale(dir: &Path) -> Result<Option<Storage>> {
        // A directory without `uid` is still being created (or was never used).
        if !dir.join("uid").exists() {
            return Ok(None);
        }
        let lock = match File::options().write(true).open(dir.join("lock")) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(dir.join("lock"))
                .ctx(|| format!("opening {}/lock", dir.display()))?,
            Err(e) => {
                return Err(SandboxError::io(
                    format!("opening {}/lock", dir.display()),
                    e,
                ))
            }
        };
        if !flock_nb(&lock) {
            return Ok(None);
        }
        let mut st = Storage {
            dir: dir.to_path_buf(),
            generation: 0,
            owner: Storage::recorded_owner(dir).unwrap_or(0),
            quota: 0,
            disk: None,
            notices: Vec::new(),
            detaching: Vec::new(),
            _lock: lock,
        };
        st.generation = st.mounted_generations().into_iter().max().unwrap_or(0);
        Ok(Some(st))
    }

    /// Reads the owner uid recorded for an existing lease directory.
    pub fn recorded_owner(dir: &Path) -> Option<u32> {
        fs::read_to_string(dir.join("uid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    pub fn record_owner(&self) -> Result<()> {
        fs::write(self.dir.join("uid"), self.owner.to_string())
            .ctx(|| format!("writing {}/uid", self.dir.display()))
    }

    fn gen_dir(&self, generation: u64) -> PathBuf {
        self.dir.join(format!("g{generation}"))
    }

    fn mounted_generations(&self) -> Vec<u64> {
        let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let prefix = format!("{}/g", self.dir.display());
        info.lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter_map(|mp| mp.strip_prefix(&prefix))
            .filter_map(|g| g.parse().ok())
            .collect()
    }

    fn mount_generation(&mut self, generation: u64) -> Result<()> {
        let dir = self.gen_dir(generation);
        fs::DirBuilder::new()
            .mode(0o755)
            .create(&dir)
            .or_else(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .ctx(|| format!("creating {}", dir.display()))?;
        if let Some(disk) = self.disk.clone() {
            return self.mount_disk(&disk, &dir);
        }
        // The inode limit keeps a flood of empty files inside the quota too.
        let inodes = (self.quota / 4096).clamp(1024, 4 << 20);
        let opts = format!("size={},nr_inodes={inodes},mode=0755", self.quota);
        mount(
            Some("moat-lease"),
            &dir,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(opts.as_str()),
        )
        .map_err(|e| {
            SandboxError::Limits(format!(
                "cannot mount the lease's size-limited tmpfs at {}: {e} (the disk quota needs root)",
                dir.display()
            ))
        })?;
        let made = (|| -> std::io::Result<()> {
            for (name, mode) in [("workspace", 0o700), ("home", 0o700), ("tmp", 0o1777)] {
                let p = dir.join(name);
                fs::create_dir(&p)?;
                fs::set_permissions(&p, fs::Permissions::from_mode(mode))?;
                std::os::unix::fs::chown(&p, Some(self.owner), Some(self.owner))?;
            }
            Ok(())
        })();
        if let Err(e) = made {
            let _ = umount2(&dir, MntFlags::MNT_DETACH);
            return Err(SandboxError::io(format!("preparing {}", dir.display()), e));
        }
        Ok(())
    }

    /// Checks and mounts `disk` at `dir`; its three directories are made on
    /// first use and kept after.
    fn mount_disk(&mut self, disk: &crate::disk::DiskImage, dir: &Path) -> Result<()> {
        if let Some(n) = disk.prepare(self.owner)? {
            self.notices.push(n);
        }
        disk.mount(dir)?;
        let made = (|| -> std::io::Result<()> {
            for (name, mode) in [("workspace", 0o700), ("home", 0o700), ("tmp", 0o1777)] {
                let p = dir.join(name);
                match fs::symlink_metadata(&p) {
                    Ok(m) if m.is_dir() => continue,
                    // Not a directory (cannot come from a sandbox: the root of
                    // the image is not mounted inside): replaced.
                    Ok(_) => fs::remove_file(&p)?,
                    Err(_) => {}
                }
                fs::create_dir(&p)?;
                fs::set_permissions(&p, fs::Permissions::from_mode(mode))?;
                std::os::unix::fs::chown(&p, Some(self.owner), Some(self.owner))?;
            }
            Ok(())
        })();
        if let Err(e) = made {
            let _ = crate::disk::unmount(dir);
            return Err(SandboxError::io(format!("preparing {}", dir.display()), e));
        }
        Ok(())
    }

    /// Whether the files are on a disk image.
    pub fn on_disk(&self) -> bool {
        self.disk.is_some()
    }

    /// Ends this use of a kept lease's files: a disk image is unmounted (it is
    /// checked again at the next open); tmpfs stays mounted.
    pub fn close(self) -> Result<()> {
        if self.disk.is_some() {
            for g in self.mounted_generations() {
                let dir = self.gen_dir(g);
                crate::disk::unmount(&dir)?;
                let _ = fs::remove_dir(&dir);
            }
        }
        Ok(())
    }

    fn unmount_generation(&self, generation: u64) {
        let dir = self.gen_dir(generation);
        if let Err(e) = umount2(&dir, MntFlags::MNT_DETACH) {
            tracing::warn!(dir = %dir.display(), error = %e, "could not unmount old lease generation");
            return;
        }
        let _ = fs::remove_dir(&dir);
    }

    /// The current generation's root (holding workspace, home, tmp, etc).
    pub fn root(&self) -> PathBuf {
        self.gen_dir(self.generation)
    }
    pub fn workspace(&self) -> PathBuf {
        self.root().join("workspace")
    }
    pub fn home(&self) -> PathBuf {
        self.root().join("home")
    }
    pub fn tmp(&self) -> PathBuf {
        self.root().join("tmp")
    }

    /// Switches to a fresh, empty generation. The old one is detached from the
    /// host's mount table at once and its memory freed by the kernel (in a
    /// background thread, so this returns in O(1) whatever the old size).
    pub fn reset(&mut self) -> Result<()> {
        if self.disk.is_some() {
            // Mounting the image a second time would corrupt it.
            return Err(SandboxError::Refused(
                "a lease on a persistent disk is never reset; destroy it instead".into(),
            ));
        }
        let old = self.gen_dir(self.generation);
        let next = self.generation + 1;
        self.mount_generation(next)?;
        self.generation = next;
        self.detaching.retain(|t| !t.is_finished());
        self.detaching.push(std::thread::spawn(move || {
            if let Err(e) = umount2(&old, MntFlags::MNT_DETACH) {
                tracing::warn!(dir = %old.display(), error = %e, "could not unmount old lease generation");
            }
            let _ = fs::remove_dir(&old);
        }));
        Ok(())
    }

    /// Unmounts everything and deletes the lease directory.
    pub fn destroy(mut self) -> Result<()> {
        for t in self.detaching.drain(..) {
            let _ = t.join();
        }
        for g in self.mounted_generations() {
            let dir = self.gen_dir(g);
            umount2(&dir, MntFlags::MNT_DETACH).map_err(|e| {
                SandboxError::io(
                    format!("unmounting {}", dir.display()),
                    std::io::Error::from(e),
                )
            })?;
            let _ = fs::remove_dir(&dir);
        }
        // Empty generation directories left by a crash between mount and rmdir.
        if let Ok(rd) = fs::read_dir(&self.dir) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with('g') {
                    let _ = fs::remove_dir(e.path());
                }
            }
        }
        if let Some(d) = &self.disk {
            d.delete()?;
        }
        let _ = fs::remove_file(self.dir.join("lock"));
        let _ = fs::remove_file(self.dir.join("uid"));
        fs::remove_dir(&self.dir).ctx(|| format!("removing {}", self.dir.display()))
    }
}
