//! A lease behind its door: the one constructor every sandbox moat opens for
//! someone goes through (the pool's runners, per-thread conversations,
//! `moat sandbox run`, the installers), so what a sandbox receives — its
//! door, the variables that point at it, the door's files and moat's own
//! read-only files — is decided here and nowhere else.
//!
//! Owns: starting the egress door for a lease (when it needs one), the
//! lease's side of that door (netns, client variables, files), and opening
//! the lease on it. Must never: hand a sandbox any variable or file that is
//! not the door's or listed in [`DoorExtras`], or open a lease whose door
//! failed to start (a lease with network but no door would be cut off, one
//! with a door of another policy would be let out).

use std::sync::Arc;

use moat_policy::SandboxPolicy;
use moat_sandbox::{Engine, Lease, LeaseOptions, NetworkAttachment, WorkspaceSource};

/// A lease with its door (when the policy allows any network or serves
/// credentials). The door lives exactly as long as the lease.
pub struct Runner {
    pub lease: Lease,
    pub door: Option<moat_egress::Door>,
    /// The lease's IPC endpoint (crate::ipc), bound to a caller per turn;
    /// set by whoever made one for this lease (the pool, per-thread leases).
    pub ipc: Option<crate::ipc::Endpoint>,
}

/// What a channel's doors add to the policy's egress: the LLM proxy (the
/// real keys stay in the door) and moat's own read-only files under
/// `/run/moat` (host path, path inside).
#[derive(Clone, Default)]
pub struct DoorExtras {
    pub llm: Option<moat_egress::llm::LlmConfig>,
    pub files: Vec<(std::path::PathBuf, std::path::PathBuf)>,
    /// GitHub interception with a token of the channel's scope.
    pub github: Option<crate::github_setup::GithubTemplate>,
    /// Amp's key injected for Amp's host; its `state_dir` is the root under
    /// which each door gets a directory of its own.
    pub amp: Option<moat_egress::amp::AmpAccess>,
    /// The channel holds pushes for an admin (`approve = ["github_push"]`).
    pub hold_pushes: bool,
    /// What holds this lease's pushes (crate::approvals::push_gate).
    pub push_gate: Option<Arc<dyn moat_egress::github::PushGate>>,
}

/// Everything one lease behind its door is made of.
pub struct RunnerSpec<'a> {
    pub engine: &'a Engine,
    pub policy: SandboxPolicy,
    /// The door's name in audit records (`pool0-3`, `conv-12`, `cli`).
    pub door_name: &'a str,
    /// `Some`: the named lease's kept files (per-thread, named sandboxes).
    pub lease_name: Option<String>,
    /// The host uid to run as (a group folder's owner), else a free one.
    pub run_as: Option<u32>,
    pub workspace: WorkspaceSource,
    pub extras: &'a DoorExtras,
    /// The runtime the door's listeners run on (`None` only when
    /// [`needs_door`] says no door is needed).
    pub runtime: Option<&'a tokio::runtime::Handle>,
    pub audit: Arc<dyn moat_egress::Audit>,
}

/// Opens the lease of `spec` behind its door (started first; the lease is
/// not started). A blocking call: run it on a blocking thread.
pub fn open(spec: RunnerSpec<'_>) -> Result<Runner, String> {
    let door = match spec.runtime {
        Some(rt) => start_door(rt, &spec.policy, spec.door_name, spec.audit, spec.extras)?,
        None if needs_door(&spec.policy, spec.extras) => {
            return Err("this sandbox needs an egress door, but no runtime was given for it".into())
        }
        None => None,
    };
    let network = door.as_ref().map(|d| attachment(d, spec.extras));
    let lease = spec
        .engine
        .lease(
            spec.policy,
            LeaseOptions {
                run_as: spec.run_as,
                name: spec.lease_name,
                workspace: spec.workspace,
                network,
            },
        )
        .map_err(|e| e.to_string())?;
    Ok(Runner {
        lease,
        door,
        ipc: None,
    })
}

/// The lease's side of a door: its namespace, client settings and files.
pub fn attachment(door: &moat_egress::Door, extras: &DoorExtras) -> NetworkAttachment {
    let mut files = door.files();
    files.extend(extras.files.iter().cloned());
    NetworkAttachment {
        netns: door.netns(),
        env: moat_egress::Door::client_env()
            .into_iter()
            .chain(door.llm_env())
            .chain(door.intercept_env())
            .collect(),
        files,
    }
}

/// Whether a lease of `policy` with `extras` gets a door: when the policy
/// allows any destination, or the door serves an LLM, GitHub, Amp or files.
pub fn needs_door(policy: &SandboxPolicy, extras: &DoorExtras) -> bool {
    policy.network.is_enabled()
        || extras.llm.is_some()
        || !extras.files.is_empty()
        || extras.github.is_some()
        || extras.amp.is_some()
}

/// The egress door for a lease of `policy`, when [`needs_door`] (`None`: the
/// sandbox gets an empty network namespace).
pub fn start_door(
    runtime: &tokio::runtime::Handle,
    policy: &SandboxPolicy,
    name: &str,
    audit: Arc<dyn moat_egress::Audit>,
    extras: &DoorExtras,
) -> Result<Option<moat_egress::Door>, String> {
    if !needs_door(policy, extras) {
        return Ok(None);
    }
    let github = match &extras.github {
        Some(t) => {
            let mut a = t.access(name, audit.clone())?;
            a.push_gate = extras.push_gate.clone();
            Some(a)
        }
        None => None,
    };
    moat_egress::Door::start(
        runtime,
        moat_egress::DoorConfig {
            lease: name.to_string(),
            policy: Arc::new(policy.network.clone()),
            resolver: moat_egress::Resolver::System,
            audit,
            llm: extras.llm.clone(),
            github,
            amp: extras.amp.clone().map(|mut a| {
                a.state_dir = a.state_dir.join(name);
                a
            }),
        },
    )
    .map(Some)
    .map_err(|e| format!("starting the egress door: {e}"))
}

/// Revokes the GitHub tokens a turn's door minted (a blocking thread's
/// call: it waits for GitHub's answer, at most the door's step timeout).
pub fn end_turn_tokens(door: &moat_egress::Door) {
    let failed = door.revoke_github_blocking();
    if failed > 0 {
        tracing::warn!(
            failed,
            "GitHub tokens of a finished turn could not be revoked; they expire within the hour"
        );
    }
}
