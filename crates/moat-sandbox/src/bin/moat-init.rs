//! moat-init: the first process inside a bwrap sandbox (PID 1 of its pid
//! namespace). It receives run requests from the host over fd 3, forks and
//! execs each command in its own session with the three descriptors it was
//! given, reports how it ended, and reaps every orphan.
//!
//! It holds no privilege and no secret: it runs under the same seccomp filter,
//! uid and namespaces as the commands. The host trusts nothing it says, but it
//! is the one that reports every command's exit status, so the commands must
//! never reach into it (docs/threat-model.md K9): it makes itself non-dumpable before
//! anything else, which puts its /proc entries (mem, environ, fd, root, maps,
//! syscall, ...) out of reach of same-uid processes without CAP_SYS_PTRACE (none
//! has it); ptrace, process_vm_* and pidfd_getfd are refused by the filter, and
//! as its namespace's init it ignores every signal it has no handler for.

// Outside input never reaches an `unwrap`/`expect` (house style); tests may.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::ffi::{CString, OsStr};
use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

use moat_sandbox::proto::{Reply, RunRequest, CONTROL_FD, MAX_REQUEST};
use nix::cmsg_space;
use nix::sys::signal::{signal, SigHandler, SigSet, Signal};
use nix::sys::socket::{recvmsg, send, ControlMessageOwned, MsgFlags};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

fn reply(r: Reply) {
    let _ = send(CONTROL_FD, &r.encode(), MsgFlags::MSG_NOSIGNAL);
}

fn close_from(first: u32, cloexec_only: bool) {
    let flags = if cloexec_only { 1 << 2 } else { 0 }; // CLOSE_RANGE_CLOEXEC
                                                       // SAFETY: close_range on descriptors this process owns; no Rust object owns them.
    unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, flags) };
}

fn reap_orphans() {
    while let Ok(status) = waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
        if status == WaitStatus::StillAlive {
            break;
        }
    }
}

/// In the child, between fork and exec. Returns the errno to report.
fn exec_child(req: &RunRequest, fds: &[RawFd; 3]) -> i32 {
    let _ = nix::unistd::setsid();
    for (i, fd) in fds.iter().enumerate() {
        // SAFETY: dup2 onto the standard descriptors of this (child) process.
        if unsafe { libc::dup2(*fd, i as i32) } < 0 {
            return nix::errno::Errno::last_raw();
        }
    }
    close_from(3, true);
    // SAFETY: restoring default dispositions before exec in a single-threaded child.
    unsafe {
        let _ = signal(Signal::SIGPIPE, SigHandler::SigDfl);
    }
    let _ = SigSet::empty().thread_set_mask();
    let cwd = OsStr::from_bytes(&req.cwd);
    if let Err(e) = nix::unistd::chdir(cwd) {
        return e as i32;
    }
    let cstr = |v: &Vec<u8>| CString::new(v.clone()).ok();
    let Some(argv) = req.argv.iter().map(cstr).collect::<Option<Vec<_>>>() else {
        return libc::EINVAL;
    };
    let Some(env) = req.env.iter().map(cstr).collect::<Option<Vec<_>>>() else {
        return libc::EINVAL;
    };
    let prog = &req.argv[0];
    if prog.contains(&b'/') {
        let Err(e) = nix::unistd::execve(&argv[0], &argv, &env);
        return e as i32;
    }
    let path = req
        .env
        .iter()
        .find_map(|kv| kv.strip_prefix(b"PATH="))
        .unwrap_or(b"/usr/local/bin:/usr/bin:/bin");
    let mut err = libc::ENOENT;
    for dir in path.split(|&b| b == b':').filter(|d| !d.is_empty()) {
        let mut full = dir.to_vec();
        full.push(b'/');
        full.extend_from_slice(prog);
        let Ok(c) = CString::new(full) else { continue };
        let Err(e) = nix::unistd::execve(&c, &argv, &env);
        if e == nix::errno::Errno::EACCES {
            err = libc::EACCES;
        }
    }
    err
}

fn run(req: &RunRequest, fds: [OwnedFd; 3]) {
    let Ok((err_r, err_w)) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) else {
        reply(Reply::ExecFailed(libc::EMFILE));
        return;
    };
    let raw = [fds[0].as_raw_fd(), fds[1].as_raw_fd(), fds[2].as_raw_fd()];
    // SAFETY: this process is single-threaded; the child only execs or exits.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            let e = exec_child(req, &raw);
            let _ = nix::unistd::write(&err_w, &e.to_ne_bytes());
            // SAFETY: leave the child without running the parent's destructors.
            unsafe { libc::_exit(127) };
        }
        Ok(ForkResult::Parent { child }) => {
            drop(fds);
            drop(err_w);
            let mut buf = [0u8; 4];
            let n = nix::unistd::read(err_r.as_raw_fd(), &mut buf).unwrap_or(0);
            if n == 4 {
                let _ = waitpid(child, None);
                reply(Reply::ExecFailed(i32::from_ne_bytes(buf).max(1)));
                return;
            }
            reply(Reply::Started(child.as_raw()));
            loop {
                match waitpid(Pid::from_raw(-1), None) {
                    Ok(WaitStatus::Exited(pid, code)) if pid == child => {
                        reply(Reply::Exited(code));
                        break;
                    }
                    Ok(WaitStatus::Signaled(pid, sig, _)) if pid == child => {
                        reply(Reply::Signaled(sig as i32));
                        break;
                    }
                    Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                    Err(_) => {
                        reply(Reply::Signaled(libc::SIGKILL));
                        break;
                    }
                }
            }
        }
        Err(e) => reply(Reply::ExecFailed(e as i32)),
    }
}

fn main() {
    // First thing, before any command can exist: not dumpable (K9). execve
    // resets the flag, so the commands it starts are ordinary again.
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        // Fail closed: the host sees no Hello and refuses the sandbox.
        std::process::exit(1);
    }
    close_from(CONTROL_FD as u32 + 1, false);
    // SAFETY: fcntl on our control descriptor.
    unsafe { libc::fcntl(CONTROL_FD, libc::F_SETFD, libc::FD_CLOEXEC) };
    reply(Reply::Hello);
    let mut buf = vec![0u8; MAX_REQUEST + 64];
    loop {
        let mut pfd = [libc::pollfd {
            fd: CONTROL_FD,
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: poll on one valid pollfd.
        let ready = unsafe { libc::poll(pfd.as_mut_ptr(), 1, 1000) };
        if ready == 0 {
            reap_orphans();
            continue;
        }
        let mut cmsg = cmsg_space!([RawFd; 3]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let (len, fds) = match recvmsg::<()>(
            CONTROL_FD,
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => {
                let mut fds: Vec<OwnedFd> = Vec::new();
                if let Ok(cmsgs) = msg.cmsgs() {
                    for c in cmsgs {
                        if let ControlMessageOwned::ScmRights(list) = c {
                            // SAFETY: the kernel just handed us these descriptors.
                            fds.extend(
                                list.into_iter()
                                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                            );
                        }
                    }
                }
                (msg.bytes, fds)
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => std::process::exit(1),
        };
        if len == 0 {
            std::process::exit(0);
        }
        let req = RunRequest::decode(&buf[..len]);
        match (req, <[OwnedFd; 3]>::try_from(fds)) {
            (Some(req), Ok(fds)) => run(&req, fds),
            _ => reply(Reply::ExecFailed(libc::EINVAL)),
        }
        reap_orphans();
    }
}
