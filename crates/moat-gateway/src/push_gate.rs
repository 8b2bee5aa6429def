//! Pushes held for approval (docs/approvals.md, `approve =
//! ["github_push"]`): the gate a lease's GitHub door waits on before any
//! byte of a push goes upstream. The caller is the turn holding the lease
//! when the push comes (its IPC endpoint's binding), asked through
//! `crate::approvals` like any held action.
//!
//! Must never: let a push through when no turn holds the lease, or when the
//! lease has no endpoint to ask through (gVisor); decide itself whether a
//! channel holds pushes (moat-policy's `approve` keys do).

use moat_policy::approvals::ApprovalKind;

use crate::pipeline::Gateway;

/// Holds a lease's pushes through the GitHub door (`approve =
/// ["github_push"]`) until an admin of the channel of the turn that holds
/// the lease approves.
pub(crate) struct LeaseGate {
    pub(crate) holder: crate::ipc::Shared,
    pub(crate) ops: std::sync::Weak<crate::pipeline::Inner>,
}

impl moat_egress::github::PushGate for LeaseGate {
    fn decide(
        &self,
        repo: String,
        refs: Vec<String>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>> {
        let caller = crate::ipc::Endpoint::holder_caller(&self.holder);
        let ops = self.ops.clone();
        Box::pin(async move {
            let Some(c) = caller else {
                return Err(
                    "no turn holds this sandbox: a push waits for an admin's approval only during a turn"
                        .to_string(),
                );
            };
            let Some(inner) = ops.upgrade() else {
                return Err("moat is stopping".to_string());
            };
            let gw = Gateway { inner };
            let names: Vec<&str> = refs
                .iter()
                .map(|r| r.strip_prefix("refs/heads/").unwrap_or(r))
                .collect();
            crate::ipc::ops::held(
                &gw,
                &c,
                ApprovalKind::GithubPush,
                format!(
                    "The agent of user {}'s turn wants to push to {repo}:",
                    c.user
                ),
                Some(names.join("\n")),
                &format!("the push to {repo}"),
            )
            .await
            .map_err(|e| e.message().to_string())
        })
    }
}

/// Refuses every push: a channel that holds pushes but whose lease has no
/// IPC endpoint (gVisor) has no turn to ask for.
struct RefuseAll;

impl moat_egress::github::PushGate for RefuseAll {
    fn decide(
        &self,
        _repo: String,
        _refs: Vec<String>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>> {
        Box::pin(async {
            Err("this channel holds pushes for an admin's approval, but its sandboxes cannot ask (no IPC endpoint, e.g. gVisor); the push is refused".to_string())
        })
    }
}

/// Gives a lease's door its push gate when its channel holds pushes.
pub(crate) fn attach(extras: &mut crate::runner::DoorExtras, ep: Option<&crate::ipc::Endpoint>) {
    if extras.hold_pushes {
        extras.push_gate = Some(match ep {
            Some(ep) => ep.push_gate(),
            None => std::sync::Arc::new(RefuseAll),
        });
    }
}
