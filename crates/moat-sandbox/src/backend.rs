//! The seam between the lease (files, limits, I/O, timeouts) and an isolation
//! technology. A backend starts an *instance* for a lease; the instance runs one
//! command at a time and can kill every process it holds.

use std::os::fd::{OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;

use moat_policy::{Limits, SandboxPolicy};

use crate::cgroup::CgroupLimits;
use crate::error::Result;
use crate::fsguard::ResolvedMount;

/// Everything a backend needs to know about the lease it starts.
#[derive(Debug, Clone)]
pub struct LeaseEnv {
    pub id: String,
    /// Distinguishes successive instances of one lease (cgroup and container names).
    pub instance: u64,
    pub policy: Arc<SandboxPolicy>,
    /// Host uid the sandbox's processes run as (never 0 for isolating backends).
    pub host_uid: u32,
    /// Host directory bound at /workspace.
    pub workspace: PathBuf,
    /// Host directories bound at the agent's home and /tmp.
    pub home: PathBuf,
    pub tmp: PathBuf,
    /// Host directory to show as /etc: the host's allowlisted entries
    /// (`bwrap::ETC_ALLOWLIST`) plus synthetic passwd, group and hosts. Shared by
    /// all leases of an engine, owned by root, never writable by a sandbox.
    pub etc: PathBuf,
    /// The root of the policy's image (`image::resolve`): its directories
    /// replace the host's system directories. `None`: the host's.
    pub image: Option<PathBuf>,
    /// `root_inside`: `image` is the lease's writable overlay of the image
    /// ([`crate::sysroot`]), bound read-write, /etc included, and the
    /// sandbox runs as uid 0 of its user namespace (the lease's uid outside).
    pub root_inside: bool,
    /// Bound in this order: the policy's extra mounts, then the parent
    /// directories of protected paths onto themselves (`fsguard::protected_parents`).
    pub mounts: Vec<ResolvedMount>,
    /// (host, in-sandbox) paths bound read-only over writable places, after `mounts`.
    pub protected: Vec<(PathBuf, PathBuf)>,
    pub init_path: PathBuf,
    pub runtime_dir: PathBuf,
    /// The door's network namespace to join; `None`: a new empty one (no network).
    pub netns: Option<std::sync::Arc<OwnedFd>>,
}

/// The process environment of one command, already filtered by policy.
#[derive(Debug, Clone)]
pub struct CommandLine {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: String,
}

/// The three standard streams handed to a command.
pub struct ChildStdio {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// How a command ended, as the backend saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Exited(i32),
    Signaled(i32),
    /// exec failed with this errno (126/127 like a shell).
    ExecFailed(i32),
    /// The whole instance went away (its processes were killed from outside).
    InstanceDied,
}

pub trait Backend: Send + Sync {
    fn name(&self) -> &'static str;
    /// Whether the lease must create a host cgroup for this backend's instances.
    fn uses_host_cgroup(&self) -> bool {
        true
    }
    /// The limits written to the lease's host cgroup. A backend whose own
    /// runtime lives in the cgroup with the sandbox may need room for it.
    fn host_cgroup_limits(&self, limits: &Limits) -> CgroupLimits {
        CgroupLimits {
            memory: limits.memory.bytes(),
            pids: limits.pids,
            millicpus: limits.millicpus,
        }
    }
    /// Whether host directories must be shown through socket-proof overlay
    /// views ([`crate::view`]): a backend whose sandbox can connect to a host
    /// unix socket it sees in a bound directory (bwrap) says yes.
    fn needs_socket_proof_views(&self) -> bool {
        false
    }
    /// Starts an instance; `cgroup_procs` are open `cgroup.procs` files the
    /// sandbox's first process must join before it runs anything.
    fn start(&self, env: &LeaseEnv, cgroup_procs: &[OwnedFd]) -> Result<Box<dyn Instance>>;
}

pub trait Instance: Send {
    /// Starts one command. Only one runs at a time. `Some` if it ended at once
    /// (for example exec failed).
    fn start_command(&mut self, cmd: &CommandLine, stdio: ChildStdio) -> Result<Option<Ended>>;
    /// A descriptor that becomes readable when `poll_ended` has news.
    fn status_fd(&self) -> RawFd;
    /// Called after `status_fd` polled readable: `Some` once the command ended.
    fn poll_ended(&mut self) -> Result<Option<Ended>>;
    /// Kills every process of the instance and waits until they are gone.
    fn kill_all(&mut self);
    /// Whether the instance can take another command.
    fn is_alive(&mut self) -> bool;
    /// Host pids of the instance's own supervisor processes, for diagnostics.
    fn host_pids(&self) -> Vec<u32> {
        Vec::new()
    }
}
