//! Socket-proof views of host directories (threat model N9).
//!
//! A unix socket file in a directory the sandbox shares with the host (a
//! development server's socket in a mounted workspace) would accept a
//! connection from a bwrap sandbox, which runs as the directory owner's uid;
//! a read-only bind does not help (connecting needs no write access to the
//! mount). Through overlayfs it cannot: the socket is looked up by the
//! overlay's own inode, which no listening socket is bound to, so `connect`
//! fails with `ECONNREFUSED` while files read and write as before.
//!
//! Owns mounting and unmounting one overlay per host directory, in the host's
//! mount namespace, under moat's runtime directory:
//! - writable: the host directory is the overlay's upper layer over an empty
//!   lower one, so every write lands in the host directory itself; the
//!   overlay's work directory is a sibling on the same mount (overlayfs needs
//!   both on one mount, outside each other), made and removed by moat;
//! - read-only: the host directory is a lower layer, with no upper one.
//!
//! Must never mount anything but overlayfs with `nosuid,nodev`, never resolve a
//! host path by name after checking it (layers are passed as
//! `/proc/self/fd/N` of descriptors opened with `O_NOFOLLOW`), and never leave
//! a mount behind: [`View`] unmounts on drop and [`sweep_one`] removes what a
//! killed moat left.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::error::{Result, SandboxError};

/// One mounted view; unmounted (and its work directory removed) on drop.
#[derive(Debug)]
pub struct View {
    /// Where the overlay is mounted; bind this into the sandbox.
    pub path: PathBuf,
    /// The host directory it shows.
    pub host: PathBuf,
    workdir: Option<PathBuf>,
}

/// The name of the work directory made beside a writable host directory.
fn workdir_for(host: &Path, tag: &str) -> Option<PathBuf> {
    let parent = host.parent()?;
    let name = host.file_name()?.to_string_lossy();
    Some(parent.join(format!(".{name}.moat-overlay-{tag}")))
}

fn open_dir(p: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: valid C string; the result is checked before use.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor, owned from here on.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn fd_path(fd: &OwnedFd) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

fn refused(host: &Path, why: String) -> SandboxError {
    SandboxError::Refused(format!(
        "{}: cannot show it to the sandbox without its unix sockets (docs/threat-model.md N9): {why}",
        host.display()
    ))
}

/// Mounts a view of `host` (canonical, already checked) at `at`. `empty` is an
/// empty directory moat owns (the lower layer of a writable view). `tag`
/// names the work directory uniquely (lease id and index).
pub fn mount(host: &Path, writable: bool, at: &Path, empty: &Path, tag: &str) -> Result<View> {
    std::fs::create_dir_all(at)
        .map_err(|e| SandboxError::io(format!("creating {}", at.display()), e))?;
    let host_fd = open_dir(host).map_err(|e| refused(host, format!("cannot open it: {e}")))?;
    let empty_fd = open_dir(empty).map_err(|e| SandboxError::io("opening the empty layer", e))?;
    let mut workdir = None;
    let data = if writable {
        let wd = workdir_for(host, tag).ok_or_else(|| {
            refused(
                host,
                "it has no parent directory to hold overlayfs' work directory".into(),
            )
        })?;
        let _ = std::fs::remove_dir_all(&wd);
        std::fs::create_dir(&wd).map_err(|e| {
            refused(
                host,
                format!("cannot create the work directory {}: {e}", wd.display()),
            )
        })?;
        workdir = Some(wd.clone());
        let wd_fd = open_dir(&wd).map_err(|e| SandboxError::io("opening the work directory", e))?;
        let data = format!(
            "lowerdir={},upperdir={},workdir={},index=off,redirect_dir=off,metacopy=off,xino=off,uuid=off",
            fd_path(&empty_fd),
            fd_path(&host_fd),
            fd_path(&wd_fd)
        );
        let r = do_mount(at, &data);
        drop(wd_fd);
        r
    } else {
        let data = format!("lowerdir={}:{}", fd_path(&host_fd), fd_path(&empty_fd));
        do_mount(at, &data)
    };
    if let Err(e) = data {
        if let Some(wd) = &workdir {
            let _ = std::fs::remove_dir_all(wd);
        }
        let hint = if writable {
            " (overlayfs needs the directory's parent on the same mount and a local filesystem such as ext4, xfs, btrfs or tmpfs; use a subdirectory of a mount point)"
        } else {
            ""
        };
        return Err(refused(
            host,
            format!("mounting overlayfs failed: {e}{hint}"),
        ));
    }
    Ok(View {
        path: at.to_path_buf(),
        host: host.to_path_buf(),
        workdir,
    })
}

fn do_mount(at: &Path, data: &str) -> io::Result<()> {
    nix::mount::mount(
        Some("overlay"),
        at,
        Some("overlay"),
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
        Some(data),
    )
    .map_err(io::Error::from)
}

fn unmount(path: &Path) {
    let _ = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH);
    let _ = std::fs::remove_dir(path);
}

impl Drop for View {
    fn drop(&mut self) {
        unmount(&self.path);
        if let Some(wd) = &self.workdir {
            // overlayfs leaves `work/` with mode 0; root removes it anyway.
            let _ = std::fs::remove_dir_all(wd);
        }
    }
}

/// Unmounts the views of one lease that a killed moat left (`dir` is that
/// lease's directory of views). Their work directories beside the host
/// directories, empty but for overlayfs' `work/`, stay; they are named
/// `.NAME.moat-overlay-*`.
pub fn sweep_one(dir: &Path) {
    if let Ok(inner) = std::fs::read_dir(dir) {
        for v in inner.flatten() {
            unmount(&v.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
}
