//! Creates a sandbox's network namespace: loopback only, no routes, no other
//! interface; the door's listening sockets are created inside it by a host
//! thread that entered it, so they are the only thing a sandbox can reach.
//!
//! Needs CAP_SYS_ADMIN (moat runs as root). The namespace lives as long as the
//! returned descriptor or any socket created in it.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

/// Runs `bind` on a fresh thread inside a new network namespace whose loopback
/// is up; returns the namespace's descriptor and what `bind` returned.
pub fn with_new_netns<T, F>(bind: F) -> io::Result<(OwnedFd, T)>
where
    F: FnOnce() -> io::Result<T> + Send + 'static,
    T: Send + 'static,
{
    std::thread::spawn(move || -> io::Result<(OwnedFd, T)> {
        // SAFETY: unshare affects only this thread, which ends below.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("cannot create a network namespace ({e}); the egress door needs root"),
            ));
        }
        loopback_up()?;
        // SAFETY: open(2) of a constant path; the result is checked.
        let fd = unsafe {
            libc::open(
                c"/proc/thread-self/ns/net".as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor from open.
        let ns = unsafe { OwnedFd::from_raw_fd(fd) };
        let value = bind()?;
        Ok((ns, value))
    })
    .join()
    .map_err(|_| io::Error::other("the network namespace thread panicked"))?
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn loopback_up() -> io::Result<()> {
    // SAFETY: a plain datagram socket used only for the interface ioctls.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: s is ours.
    let _guard = unsafe { OwnedFd::from_raw_fd(s) };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: 0,
        _pad: [0; 22],
    };
    req.name[..2].copy_from_slice(b"lo");
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write an ifreq we own.
    unsafe {
        if libc::ioctl(s, libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(io::Error::last_os_error());
        }
        req.flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(s, libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Runs `f` on a thread that entered the namespace `ns` (to create more
/// sockets there later).
pub fn in_netns<T, F>(ns: &OwnedFd, f: F) -> io::Result<T>
where
    F: FnOnce() -> io::Result<T> + Send + 'static,
    T: Send + 'static,
{
    use std::os::fd::AsRawFd;
    // SAFETY: dup of a descriptor we hold; the copy moves into the thread.
    let dup = unsafe { libc::fcntl(ns.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor.
    let dup = unsafe { OwnedFd::from_raw_fd(dup) };
    std::thread::spawn(move || {
        // SAFETY: setns on this thread only, with a netns descriptor.
        if unsafe { libc::setns(dup.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        f()
    })
    .join()
    .map_err(|_| io::Error::other("the network namespace thread panicked"))?
}
