//! The `local` backend: no isolation at all. Commands run as moat's own user,
//! in the lease's directories, inside the lease's cgroup when there is one.
//! For one trusted user on their own machine; the engine refuses it unless the
//! operator opted in, and every run logs a warning.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

use crate::backend::{Backend, ChildStdio, CommandLine, Ended, Instance, LeaseEnv};
use crate::error::{Result, SandboxError};

pub struct LocalBackend;

impl Backend for LocalBackend {
    fn name(&self) -> &'static str {
        "local"
    }

    fn start(&self, env: &LeaseEnv, cgroup_procs: &[OwnedFd]) -> Result<Box<dyn Instance>> {
        let mut procs = Vec::new();
        for fd in cgroup_procs {
            // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor we own.
            let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
            if n < 0 {
                return Err(SandboxError::io(
                    "duplicating cgroup fd",
                    std::io::Error::last_os_error(),
                ));
            }
            // SAFETY: n is fresh from fcntl.
            procs.push(unsafe { OwnedFd::from_raw_fd(n) });
        }
        Ok(Box::new(LocalInstance {
            env: env.clone(),
            procs,
            child: None,
            pidfd: None,
        }))
    }
}

pub struct LocalInstance {
    env: LeaseEnv,
    procs: Vec<OwnedFd>,
    child: Option<Child>,
    pidfd: Option<OwnedFd>,
}

impl LocalInstance {
    fn host_path(&self, inside: &str) -> std::path::PathBuf {
        if let Some(rest) = inside.strip_prefix("/workspace") {
            return self.env.workspace.join(rest.trim_start_matches('/'));
        }
        self.env.workspace.clone()
    }
}

impl Instance for LocalInstance {
    fn start_command(&mut self, cmd: &CommandLine, stdio: ChildStdio) -> Result<Option<Ended>> {
        tracing::warn!(lease = %self.env.id, "running a command with NO sandbox (backend local)");
        let procs: Vec<RawFd> = self.procs.iter().map(|f| f.as_raw_fd()).collect();
        let limits = self.env.policy.limits.clone();
        let mut c = Command::new(&cmd.argv[0]);
        c.args(&cmd.argv[1..])
            .env_clear()
            .envs(cmd.env.iter().map(|(k, v)| {
                let v = match k.as_str() {
                    "HOME" => self.env.home.to_string_lossy().into_owned(),
                    _ => v.clone(),
                };
                (k.clone(), v)
            }))
            .env("TMPDIR", &self.env.tmp)
            .current_dir(self.host_path(&cmd.cwd))
            .stdin(stdio.stdin)
            .stdout(stdio.stdout)
            .stderr(stdio.stderr);
        // SAFETY: only async-signal-safe calls on values prepared before fork.
        unsafe {
            c.pre_exec(move || {
                for fd in &procs {
                    if libc::write(*fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                libc::setsid();
                let lim = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                libc::setrlimit(libc::RLIMIT_CORE, &lim);
                let n = limits.open_files as u64;
                let lim = libc::rlimit {
                    rlim_cur: n,
                    rlim_max: n,
                };
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
                Ok(())
            });
        }
        let child = match c.spawn() {
            Ok(c) => c,
            Err(e) => {
                let errno = e.raw_os_error().unwrap_or(libc::ENOENT);
                return Ok(Some(Ended::ExecFailed(errno)));
            }
        };
        // SAFETY: pidfd_open on the pid of a child we have not reaped yet.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) };
        if fd < 0 {
            return Err(SandboxError::io(
                "pidfd_open",
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: fd is a fresh pidfd.
        self.pidfd = Some(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
        self.child = Some(child);
        Ok(None)
    }

    fn status_fd(&self) -> RawFd {
        self.pidfd.as_ref().map(|f| f.as_raw_fd()).unwrap_or(-1)
    }

    fn poll_ended(&mut self) -> Result<Option<Ended>> {
        use std::os::unix::process::ExitStatusExt;
        let Some(child) = self.child.as_mut() else {
            return Ok(Some(Ended::InstanceDied));
        };
        match child.try_wait() {
            Ok(Some(st)) => {
                self.child = None;
                self.pidfd = None;
                Ok(Some(match (st.code(), st.signal()) {
                    (Some(c), _) => Ended::Exited(c),
                    (_, Some(s)) => Ended::Signaled(s),
                    _ => Ended::InstanceDied,
                }))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(SandboxError::io("waiting for the command", e)),
        }
    }

    fn kill_all(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill the process group the child leads (it called setsid).
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.kill();
            let _ = child.wait();
        }
        self.pidfd = None;
    }

    fn is_alive(&mut self) -> bool {
        true
    }
}
