//! Leases: a turn's sandbox from its channel's pool (built and warmed on
//! first use), or the conversation's own per-thread lease; giving it back;
//! deleting per-thread sandboxes left idle.
//!
//! Must never: give a conversation a lease another conversation's turn
//! still holds, or start a sandbox while moat is paused (incident mode).

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use moat_policy::gateway::{ChannelPolicy, Platform, SandboxMode};
use moat_sandbox::{Lease, LeaseOptions, WorkspaceSource};
use serde_json::json;

use super::{now_ms, Gateway, Inner, BUSY_AFTER, SHUTTING_DOWN};
use crate::platform::ConvRef;
use crate::pool::{LeaseFactory, Lent, Pool, PoolError};

impl Gateway {
    /// The conversation's lease for one turn: a pooled runner, or the
    /// conversation's own named lease. `Err` is the answer to give instead.
    pub(super) async fn hold_lease(
        &self,
        conv: &ConvRef,
        channel: &ChannelPolicy,
    ) -> Result<Held, String> {
        // Incident mode: no sandbox starts, whatever was already queued.
        if self.paused() {
            return Err(crate::incident::PAUSED_TEXT.to_string());
        }
        match channel.sandbox {
            SandboxMode::Pool => {
                let pool = self
                    .inner
                    .pool_for(channel.index)
                    .await
                    .map_err(|e| format!("moat: {e}"))?;
                // A runner being reset frees up within milliseconds: only a
                // wait longer than BUSY_AFTER is worth telling the user about.
                let ahead_cell: Arc<Mutex<Option<usize>>> = Arc::new(Mutex::new(None));
                let cell = ahead_cell.clone();
                let acquiring = pool.acquire(move |ahead| {
                    if let Ok(mut c) = cell.lock() {
                        *c = Some(ahead);
                    }
                });
                tokio::pin!(acquiring);
                let lent = tokio::select! {
                    r = &mut acquiring => r,
                    _ = tokio::time::sleep(BUSY_AFTER) => {
                        let ahead = ahead_cell.lock().ok().and_then(|c| *c);
                        if let Some(ahead) = ahead {
                            let text = format!(
                                "All sandboxes are busy; {} ahead of you. Your message will run when one is free.",
                                match ahead { 0 => "nobody else is".to_string(), 1 => "1 request is".to_string(), n => format!("{n} requests are") }
                            );
                            self.platform(conv.platform).notice(conv, &text).await;
                        }
                        acquiring.await
                    }
                };
                let lent = lent.map_err(|e| match e {
                    // Shutting down: the turn stays unfinished in the store
                    // and runs again at the next start.
                    PoolError::Closed => SHUTTING_DOWN.to_string(),
                    e => format!("moat: {e}"),
                })?;
                self.audit(
                    "lease",
                    json!({"event": "acquired", "conversation_id": conv.id, "mode": "pool"}),
                );
                Ok(Held::Pooled(lent))
            }
            SandboxMode::PerThread { .. } => {
                // Per-thread leases are named after the conversation; the
                // actor runs one turn at a time, so nobody else holds it.
                if let Ok(mut inuse) = self.inner.leases_in_use.lock() {
                    if !inuse.insert(conv.id) {
                        return Err("moat: this conversation's sandbox is in use".into());
                    }
                }
                let name = format!("conv-{}", conv.id);
                let inner = self.inner.clone();
                let (policy, run_as) = match self.inner.groups.policy_for(channel, &conv.channel) {
                    Ok(p) => p,
                    Err(e) => {
                        if let Ok(mut inuse) = self.inner.leases_in_use.lock() {
                            inuse.remove(&conv.id);
                        }
                        return Err(format!(
                            "moat: could not prepare this conversation's sandbox: {e}"
                        ));
                    }
                };
                let mut extras = self.inner.setup(channel.index).extras;
                extras.hold_pushes = channel
                    .approvals
                    .needs(moat_policy::approvals::ApprovalKind::GithubPush);
                let ipc = match crate::ipc::serves(&policy).then(|| self.inner.ipc.endpoint(&name))
                {
                    None => None,
                    Some(Ok(ep)) => {
                        extras.files.push(ep.mount());
                        Some(ep)
                    }
                    Some(Err(e)) => {
                        tracing::warn!(conversation = conv.id, error = %e, "no IPC endpoint for this sandbox");
                        None
                    }
                };
                crate::push_gate::attach(&mut extras, ipc.as_ref());
                let n2 = name.clone();
                let built = tokio::task::spawn_blocking(move || {
                    let r = crate::runner::open(crate::runner::RunnerSpec {
                        engine: &inner.engine,
                        policy,
                        door_name: &n2,
                        lease_name: Some(n2.clone()),
                        run_as,
                        workspace: WorkspaceSource::Fresh,
                        extras: &extras,
                        runtime: Some(&inner.runtime),
                        audit: inner.egress_audit.clone(),
                    })?;
                    Ok::<_, String>((r.lease, r.door))
                })
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r);
                let built = built.and_then(|(lease, door)| match &ipc {
                    Some(ep) => ep.grant(lease.host_uid()).map(|_| (lease, door)),
                    None => Ok((lease, door)),
                });
                match built {
                    Ok((mut lease, door)) => {
                        // A damaged workspace disk was set aside: say so.
                        for text in lease.take_notices() {
                            self.audit("lease", json!({"event": "disk-set-aside", "conversation_id": conv.id, "lease": name}));
                            self.platform(conv.platform)
                                .notice(conv, &format!("moat: {text}"))
                                .await;
                        }
                        let _ = self
                            .inner
                            .store
                            .set_sandbox_mode(conv.id, moat_store::SandboxMode::PerThread);
                        let _ = self
                            .inner
                            .store
                            .set_conversation_lease(conv.id, Some(&name));
                        self.audit(
                            "lease",
                            json!({"event": "attached", "conversation_id": conv.id, "mode": "per-thread", "lease": name}),
                        );
                        Ok(Held::Own {
                            lease,
                            _door: door,
                            ipc,
                        })
                    }
                    Err(e) => {
                        if let Ok(mut inuse) = self.inner.leases_in_use.lock() {
                            inuse.remove(&conv.id);
                        }
                        Err(format!(
                            "moat: could not prepare this conversation's sandbox: {e}"
                        ))
                    }
                }
            }
        }
    }

    /// Ends one turn's use of a lease: a pooled runner goes back (reset in
    /// the background); a per-thread lease stops, keeping its files.
    pub(super) async fn give_back(&self, conv: &ConvRef, mut held: Held) {
        if let Some(ep) = held.ipc() {
            ep.unbind();
        }
        match held {
            Held::Pooled(lent) => {
                drop(lent);
                self.audit(
                    "lease",
                    json!({"event": "released", "conversation_id": conv.id, "mode": "pool"}),
                );
            }
            Held::Own { lease, _door, ipc } => {
                drop(ipc);
                let r = tokio::task::spawn_blocking(move || {
                    // Stopped first: nothing of the turn can mint a token
                    // after the revocation.
                    let r = lease.release();
                    if let Some(d) = &_door {
                        crate::pool::end_turn_tokens(d);
                    }
                    drop(_door);
                    r
                })
                .await;
                if let Ok(Err(e)) = r {
                    tracing::warn!(conversation = conv.id, error = %e, "could not release a per-thread lease");
                }
                if let Ok(mut inuse) = self.inner.leases_in_use.lock() {
                    inuse.remove(&conv.id);
                }
                self.audit(
                    "lease",
                    json!({"event": "parked", "conversation_id": conv.id, "mode": "per-thread"}),
                );
            }
        }
    }

    /// Deletes per-thread sandboxes idle longer than their channel allows.
    pub async fn sweep_idle(&self) -> usize {
        self.sweep_idle_at(now_ms()).await
    }

    /// [`Gateway::sweep_idle`] as if the time were `now_ms` (tests).
    pub async fn sweep_idle_at(&self, now_ms: i64) -> usize {
        let mut removed = 0;
        // The shortest idle time of any channel finds the candidates; each is
        // then held to its own channel's idle time.
        let shortest = self
            .inner
            .cfg
            .channels
            .iter()
            .filter_map(|c| match c.sandbox {
                SandboxMode::PerThread { idle_delete } => Some(idle_delete),
                SandboxMode::Pool => None,
            })
            .min();
        let Some(idle) = shortest else { return 0 };
        let convs = self
            .inner
            .store
            .idle_conversations(now_ms - idle.as_millis() as i64)
            .unwrap_or_default();
        for c in convs {
            let Some(name) = c.lease_name.clone() else {
                continue;
            };
            let Some(chan) = Platform::parse(&c.platform)
                .ok()
                .and_then(|p| self.inner.cfg.channel(p, &c.channel))
            else {
                continue;
            };
            let SandboxMode::PerThread { idle_delete } = chan.sandbox else {
                continue;
            };
            if c.last_active_ms > now_ms - idle_delete.as_millis() as i64 {
                continue;
            }
            let busy = self
                .inner
                .leases_in_use
                .lock()
                .map(|u| u.contains(&c.id))
                .unwrap_or(true);
            if busy {
                continue;
            }
            let engine = self.inner.engine.clone();
            // The uid it ran as: its group folder's (docs/memory.md).
            let Ok((policy, run_as)) = self.inner.groups.policy_for(chan, &c.channel) else {
                continue;
            };
            let n2 = name.clone();
            let ok = tokio::task::spawn_blocking(move || {
                engine
                    .lease(
                        policy,
                        LeaseOptions {
                            run_as,
                            name: Some(n2),
                            workspace: WorkspaceSource::Fresh,
                            network: None,
                        },
                    )
                    .and_then(Lease::destroy)
                    .is_ok()
            })
            .await
            .unwrap_or(false);
            if ok {
                let _ = self.inner.store.set_conversation_lease(c.id, None);
                self.audit("lease", json!({"event": "deleted", "conversation_id": c.id, "mode": "per-thread", "reason": "idle"}));
                removed += 1;
            }
        }
        removed
    }
}

/// A lease held for one turn.
pub(super) enum Held {
    Pooled(Lent),
    Own {
        lease: Lease,
        _door: Option<moat_egress::Door>,
        ipc: Option<crate::ipc::Endpoint>,
    },
}

impl Held {
    pub(super) fn door(&mut self) -> Option<&moat_egress::Door> {
        match self {
            Held::Pooled(l) => l.runner().door.as_ref(),
            Held::Own { _door, .. } => _door.as_ref(),
        }
    }

    pub(super) fn ipc(&mut self) -> Option<&crate::ipc::Endpoint> {
        match self {
            Held::Pooled(l) => l.runner().ipc.as_ref(),
            Held::Own { ipc, .. } => ipc.as_ref(),
        }
    }

    pub(super) fn lease(&mut self) -> &mut Lease {
        match self {
            Held::Pooled(l) => &mut l.runner().lease,
            Held::Own { lease, .. } => lease,
        }
    }
}

impl Inner {
    /// The pool of a pool-mode channel, built (and warmed) on first use.
    pub(super) async fn pool_for(&self, idx: usize) -> Result<Pool, PoolError> {
        let mut pools = self.pools.lock().await;
        if let Some(p) = pools.get(&idx) {
            return Ok(p.clone());
        }
        let c = &self.cfg.channels[idx];
        let (policy, run_as) = self
            .groups
            .policy_for(c, &c.id)
            .map_err(PoolError::Sandbox)?;
        let factory = LeaseFactory {
            engine: self.engine.clone(),
            policy,
            run_as,
            extras: {
                let mut e = self.setup(idx).extras;
                e.hold_pushes = c
                    .approvals
                    .needs(moat_policy::approvals::ApprovalKind::GithubPush);
                e
            },
            runtime: self.runtime.clone(),
            audit: self.egress_audit.clone(),
            prefix: format!("pool{idx}"),
            counter: AtomicU64::new(0),
            ipc: Some(self.ipc.clone()),
        };
        let p = &self.cfg.pool;
        let bounds = crate::pool::Bounds {
            min: p.size as usize,
            max: p.max as usize,
            max_waiters: p.max_waiters as usize,
            shrink_after: p.shrink_after,
        };
        let pool = Pool::elastic(Arc::new(factory), bounds).await?;
        pools.insert(idx, pool.clone());
        Ok(pool)
    }
}
