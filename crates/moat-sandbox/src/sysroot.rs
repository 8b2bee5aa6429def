//! The writable system layer of a `root_inside` lease (docs/images.md,
//! threat model R1): an overlay whose lower layer is the sealed image, shown
//! through an idmapped mount in which the image's owner (host root) appears
//! as the lease's unprivileged host uid, and whose upper layer lies on the
//! lease's own size-limited tmpfs (or disk), so `apt-get install` inside
//! writes there, counts against the lease's quota, and vanishes at a pool
//! reset (a fresh generation holds a fresh, empty upper layer).
//!
//! Owns: making the mapping namespace, the idmapped view of the image, the
//! overlay, and unmounting all of it when the instance stops. Must never:
//! map any host uid but the lease's (never host root) into what the sandbox
//! can write, mount without `nosuid,nodev`, put the upper layer anywhere the
//! sandbox could reach by another path, or leave a mount behind on drop.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::error::{Result, SandboxError};

const OPEN_TREE_CLONE: libc::c_uint = 1;
const AT_RECURSIVE: libc::c_uint = 0x8000;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// A mounted system layer; unmounted and removed on drop.
#[derive(Debug)]
pub struct SysRoot {
    /// The overlay's mount point: the sandbox's system directories come from here.
    pub merged: PathBuf,
    base: PathBuf,
}

impl Drop for SysRoot {
    fn drop(&mut self) {
        sweep_one(&self.base);
    }
}

/// Unmounts what [`mount_sysroot`] mounted at `base` and removes its (then
/// empty) directories; never recurses into a directory (a mount that would
/// not go away is left alone, not emptied).
pub fn sweep_one(base: &Path) {
    for name in ["merged", "lower"] {
        let p = base.join(name);
        let _ = umount2(&p, MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(&p);
    }
    let _ = std::fs::remove_dir(base);
}

fn err(what: &str, e: std::io::Error) -> SandboxError {
    SandboxError::Start(format!("root inside: {what}: {e}"))
}

fn cpath(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| SandboxError::Refused(format!("{} contains a NUL byte", p.display())))
}

/// A user namespace whose uid and gid 0 are `uid` on the host: the
/// idmapping of the image's view. Made by a short-lived `sleep` unshared into
/// it (std waits until the child has exec'd, so the namespace exists).
fn mapping_namespace(uid: u32) -> Result<OwnedFd> {
    let mut cmd = std::process::Command::new("sleep");
    cmd.arg("60")
        .env_clear()
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: one async-signal-safe system call.
    unsafe {
        cmd.pre_exec(|| {
            if libc::unshare(libc::CLONE_NEWUSER) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| err("making the mapping namespace", e))?;
    let pid = child.id();
    let result = (|| {
        let map = format!("0 {uid} 1\n");
        std::fs::write(format!("/proc/{pid}/uid_map"), &map)
            .map_err(|e| err("writing uid_map", e))?;
        std::fs::write(format!("/proc/{pid}/gid_map"), &map)
            .map_err(|e| err("writing gid_map", e))?;
        let f = std::fs::File::open(format!("/proc/{pid}/ns/user"))
            .map_err(|e| err("opening the namespace", e))?;
        Ok(OwnedFd::from(f))
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// Mounts `image` (read-only, idmapped so that its root-owned files belong to
/// `uid`) at `base/lower`, and an overlay of it with the upper layer
/// `upper_parent/upper` at `base/merged`.
pub fn mount_sysroot(image: &Path, upper_parent: &Path, base: &Path, uid: u32) -> Result<SysRoot> {
    sweep_one(base);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(base)
        .map_err(|e| err("creating its directory", e))?;
    let sys = SysRoot {
        merged: base.join("merged"),
        base: base.to_path_buf(),
    };
    let lower = base.join("lower");
    for d in [&lower, &sys.merged] {
        std::fs::create_dir(d).map_err(|e| err("creating a mount point", e))?;
    }
    std::fs::set_permissions(&sys.merged, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| err("chmod", e))?;
    // Upper and work directories on the lease's storage, in a directory
    // only root may enter (the sandbox sees them only through the overlay).
    let layer = upper_parent.join(".system");
    let (upper, work) = (layer.join("upper"), layer.join("work"));
    for (d, mode) in [(&layer, 0o700), (&upper, 0o755), (&work, 0o700)] {
        match std::fs::DirBuilder::new().mode(mode).create(d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(err("creating the writable layer", e)),
        }
        let m = std::fs::symlink_metadata(d).map_err(|e| err("reading the writable layer", e))?;
        if !m.is_dir() || std::os::unix::fs::MetadataExt::uid(&m) != 0 {
            return Err(SandboxError::Refused(format!(
                "root inside: {} is not a directory of root's",
                d.display()
            )));
        }
    }

    let userns = mapping_namespace(uid)?;
    let src = cpath(image)?;
    // SAFETY: open_tree with a valid path; the result is checked.
    let tree = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            src.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | AT_RECURSIVE,
        )
    };
    if tree < 0 {
        return Err(err(
            "open_tree of the image",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: a fresh descriptor returned by open_tree.
    let tree = unsafe { OwnedFd::from_raw_fd(tree as i32) };
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP | MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    let empty = c"";
    // SAFETY: valid descriptor, empty path with AT_EMPTY_PATH, a live struct of the given size.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint | AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r < 0 {
        return Err(err(
            "idmapping the image (needs Linux 5.12 and a filesystem that supports idmapped mounts)",
            std::io::Error::last_os_error(),
        ));
    }
    let to = cpath(&lower)?;
    // SAFETY: valid descriptor and path.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if r < 0 {
        return Err(err(
            "attaching the image's view",
            std::io::Error::last_os_error(),
        ));
    }
    let data = format!(
        "lowerdir={},upperdir={},workdir={},index=off,redirect_dir=off,metacopy=off,xino=off,uuid=off",
        lower.display(),
        upper.display(),
        work.display()
    );
    mount(
        Some("moat-system"),
        &sys.merged,
        Some("overlay"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(data.as_str()),
    )
    .map_err(|e| err("mounting the overlay", std::io::Error::from(e)))?;
    // The overlay holds its own reference to the layer.
    let _ = umount2(&lower, MntFlags::MNT_DETACH);
    Ok(sys)
}

/// Where apt looks for configuration parts, inside the image.
const APT_PARTS: &str = "etc/apt/apt.conf.d";

/// For an image with apt: a file of moat's to bind read-only at
/// `/etc/apt/apt.conf.d/00moat-root-inside`, telling apt to fetch as root
/// (its `_apt` user is not mapped in the sandbox's namespace, where uid 0 is
/// the only id). The directory is found by resolving inside the image's
/// root, never following a link on the host; none when any part of that
/// path is a link.
pub fn apt_conf(runtime_dir: &Path, merged: &Path) -> Result<Option<(PathBuf, PathBuf)>> {
    // Only a plain path of directories: bwrap makes the mount point by
    // following the path, and a link there (a previous turn of a kept lease
    // may have left one) could lead it outside the sandbox's root.
    let plain = merged.join(APT_PARTS);
    let parts = crate::seal::resolve_in_root(merged, APT_PARTS);
    if parts.as_ref() != Some(&plain)
        || !std::fs::symlink_metadata(&plain).is_ok_and(|m| m.is_dir())
    {
        return Ok(None);
    }
    let file = runtime_dir.join("root-inside-apt.conf");
    let text = "// moat root_inside: uid 0 is the only user here (docs/images.md)\nAPT::Sandbox::User \"root\";\n";
    if std::fs::read_to_string(&file).ok().as_deref() != Some(text) {
        let tmp = runtime_dir.join(format!(
            ".root-inside-apt.conf.{}",
            crate::storage::random_u64()
        ));
        std::fs::write(&tmp, text).map_err(|e| err("writing the apt setting", e))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| err("chmod the apt setting", e))?;
        std::fs::rename(&tmp, &file).map_err(|e| err("installing the apt setting", e))?;
    }
    Ok(Some((
        file,
        Path::new("/").join(APT_PARTS).join("00moat-root-inside"),
    )))
}
