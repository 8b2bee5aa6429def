//! The path of one message (docs/design.md): store it, authorize it, rate-limit
//! it, debounce it into a turn, run the turn in the conversation's sandbox
//! with the channel's agent, and hand the answer to the platform through the
//! one platform interface (crate::platform).
//!
//! Owns: the gateway's shared state and its phases, one module each:
//! `intake` (store, authorize, rate-limit, commands), `actor` (one task per
//! conversation: debounce, follow-up queue, stop, status), `turn` (one turn,
//! start to answer), `leases` (the pools per channel, per-thread leases, the
//! idle sweep) and `recovery` (crash recovery at start); the audit records
//! of messages and turns.
//! Must never: run a message that is not stored, answer an unauthorised
//! sender, run two turns of one conversation at once, give a conversation a
//! lease another conversation's turn still holds, talk to a platform other
//! than through [`ChatPlatform`], or put message text in the audit log.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::{DefaultKeyedRateLimiter, Quota};
use moat_audit::AuditLog;
use moat_policy::gateway::{GatewayConfig, Platform, SandboxMode, Trust};
use moat_sandbox::Engine;
use moat_store::Store;
use tokio::sync::mpsc;

use crate::agent::{Agent, ShellAgent};
use crate::artifacts::ArtifactLimits;
use crate::hub::Hub;
use crate::metrics::{Gauges, Metrics};
use crate::platform::{ChatPlatform, Platforms};
use crate::pool::{Pool, PoolError};

mod actor;
mod intake;
mod leases;
mod recovery;
mod turn;

pub use crate::platform::{BoxFut, ConvRef, Inbound, CHANNEL_THREAD};

/// How long a turn waits for the platform's thread history.
const HISTORY_WAIT: Duration = Duration::from_secs(3);

/// How long a turn waits for a runner before the user is told it is busy.
const BUSY_AFTER: Duration = Duration::from_secs(1);

/// Refused artifacts told in an answer at most (the rest are counted).
const MAX_REFUSAL_LINES: usize = 20;

/// `hold_lease`'s refusal when the gateway is stopping.
const SHUTTING_DOWN: &str = "moat: shutting down";

/// What `accept` did with a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accepted {
    /// Stored and queued for a turn.
    Queued {
        message_id: i64,
        conversation_id: i64,
    },
    /// A platform retry of a stored event: not run again.
    Duplicate { message_id: i64 },
    /// Not authorised: stored as dropped, audited, nothing said to the sender.
    Dropped { reason: String },
    /// Over the rate limit: dropped (the sender was told once).
    Limited,
    /// `stop`, `abort`, `status` or `pool` (refused ones too: the sender was
    /// told why).
    Command { conversation_id: i64 },
    /// Stored as context for the next turn, no turn started: the channel's
    /// trigger did not match, or a Slack channel message without a mention.
    Context {
        message_id: i64,
        conversation_id: i64,
    },
    /// moat is in incident mode (`moat incident`): stored as dropped,
    /// audited, and the conversation told once that moat is paused.
    Paused,
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("the message store failed: {0}")]
    Store(#[from] moat_store::StoreError),
    #[error("the audit log failed: {0}")]
    Audit(String),
    #[error("internal: {0}")]
    Internal(String),
}

/// A message waiting for its turn.
#[derive(Debug, Clone)]
pub(crate) struct Pending {
    message_id: i64,
    user: String,
    text: String,
    message_ref: Option<String>,
    arrived: Instant,
}

pub(crate) enum ConvCmd {
    Message(Pending),
    Stop { user: String, trust: Trust },
    Status { user: String, trust: Trust },
}

struct Limiters {
    users: DefaultKeyedRateLimiter<String>,
    channels: DefaultKeyedRateLimiter<String>,
}

#[allow(clippy::expect_used, reason = "the period is at least 1 ns")]
fn quota(r: moat_policy::gateway::Rate) -> Quota {
    Quota::with_period(r.interval().max(Duration::from_nanos(1)))
        .expect("a positive period")
        .allow_burst(r.count)
}

/// The gateway's shared state.
pub struct Inner {
    pub cfg: GatewayConfig,
    pub store: Arc<Store>,
    pub audit: Arc<AuditLog>,
    pub egress_audit: Arc<dyn moat_egress::Audit>,
    pub engine: Arc<Engine>,
    pub hub: Arc<Hub>,
    pub metrics: Metrics,
    setups: HashMap<usize, ChannelSetup>,
    groups: Arc<crate::groups::Groups>,
    runtime: tokio::runtime::Handle,
    platforms: Platforms,
    pub(crate) pools: tokio::sync::Mutex<HashMap<usize, Pool>>,
    pub(crate) convs: Mutex<HashMap<i64, mpsc::UnboundedSender<ConvCmd>>>,
    limiters: Vec<Limiters>,
    told: Mutex<HashSet<(usize, String)>>,
    running: AtomicU64,
    /// Conversations whose actor holds a per-thread lease right now.
    leases_in_use: Mutex<HashSet<i64>>,
    /// Incident mode (`moat incident`): no message is taken, no sandbox
    /// is leased.
    pub(crate) paused: std::sync::atomic::AtomicBool,
    /// What incident mode must do at its lift (crate::incident).
    pub(crate) incident: crate::incident::IncidentState,
    /// The leases' IPC endpoints (crate::ipc).
    pub(crate) ipc: Arc<crate::ipc::IpcHost>,
    /// Task runs the scheduler handed to `accept` (crate::tasks).
    pub(crate) scheduled: crate::tasks::ScheduledRuns,
    /// Turns whose kept answer is being delivered by this process right
    /// now: recovery (run again on every beat of a shared store) leaves
    /// them alone.
    pub(crate) delivering: Mutex<HashSet<i64>>,
    /// Requests waiting for an admin (crate::approvals).
    pub(crate) approvals: crate::approvals::Desk,
}

/// The gateway: clone it freely.
#[derive(Clone)]
pub struct Gateway {
    pub inner: Arc<Inner>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// What builds a gateway.
pub struct GatewayParts {
    pub cfg: GatewayConfig,
    pub store: Arc<Store>,
    pub audit: Arc<AuditLog>,
    pub engine: Arc<Engine>,
    /// The chat platforms connected (Slack, ...); the web chat and `moat
    /// chat` are added by [`Gateway::new`].
    pub platforms: Platforms,
    /// Per channel (by index): the agent and what its doors serve. A channel
    /// without an entry runs the shell agent with the policy's egress only.
    pub setups: HashMap<usize, ChannelSetup>,
    /// Group folders, global memory and per-channel mounts, checked.
    pub groups: Arc<crate::groups::Groups>,
}

/// What a channel's turns run with besides its sandbox policy.
#[derive(Clone)]
pub struct ChannelSetup {
    pub agent: Arc<dyn Agent>,
    pub extras: crate::pool::DoorExtras,
    /// What a turn may send from `~/artifacts` (`artifacts.max_files`,
    /// `artifacts.max_bytes`).
    pub artifacts: ArtifactLimits,
}

impl Default for ChannelSetup {
    fn default() -> Self {
        ChannelSetup {
            agent: Arc::new(ShellAgent),
            extras: Default::default(),
            artifacts: ArtifactLimits::default(),
        }
    }
}

impl Gateway {
    /// Builds the gateway (on a tokio runtime). Pools are warmed on first use
    /// of their channel, or now with [`Gateway::warm`].
    pub fn new(parts: GatewayParts) -> Gateway {
        let limiters = parts
            .cfg
            .channels
            .iter()
            .map(|c| Limiters {
                users: governor::RateLimiter::keyed(quota(c.rate.user)),
                channels: governor::RateLimiter::keyed(quota(c.rate.channel)),
            })
            .collect();
        let egress_audit: Arc<dyn moat_egress::Audit> =
            Arc::new(moat_egress::JsonlAudit::with_log(parts.audit.clone()));
        // The web chat and `moat chat` watch the hub: their platform is the
        // hub's publisher.
        let hub = Arc::new(Hub::default());
        let mut platforms = parts.platforms;
        let web: Arc<dyn ChatPlatform> = Arc::new(crate::web::WebChat::new(hub.clone()));
        for p in [Platform::Web, Platform::Cli] {
            if !platforms.contains(p) {
                platforms.insert(p, web.clone());
            }
        }
        let ipc_root = crate::ipc::root_under(&parts.engine.config().runtime_dir);
        let ipc_rate = parts.cfg.ipc.rate;
        let runtime = tokio::runtime::Handle::current();
        Gateway {
            inner: Arc::new_cyclic(|me| Inner {
                ipc: Arc::new(crate::ipc::IpcHost::new(
                    ipc_root,
                    ipc_rate,
                    me.clone(),
                    runtime.clone(),
                )),
                scheduled: Default::default(),
                delivering: Default::default(),
                approvals: Default::default(),
                cfg: parts.cfg,
                store: parts.store,
                audit: parts.audit,
                egress_audit,
                engine: parts.engine,
                hub,
                metrics: Metrics::default(),
                setups: parts.setups,
                groups: parts.groups,
                runtime,
                platforms,
                pools: tokio::sync::Mutex::new(HashMap::new()),
                convs: Mutex::new(HashMap::new()),
                limiters,
                told: Mutex::new(HashSet::new()),
                running: AtomicU64::new(0),
                leases_in_use: Mutex::new(HashSet::new()),
                paused: std::sync::atomic::AtomicBool::new(false),
                incident: Default::default(),
            }),
        }
    }

    /// Warms the pools of every pool-mode channel now.
    pub async fn warm(&self) -> Result<(), PoolError> {
        for (i, c) in self.inner.cfg.channels.iter().enumerate() {
            if c.sandbox == SandboxMode::Pool {
                self.inner.pool_for(i).await?;
            }
        }
        Ok(())
    }

    pub(crate) fn audit(&self, kind: &str, fields: serde_json::Value) {
        if let Err(e) = self.inner.audit.append(kind, fields) {
            tracing::error!(error = %e, "could not write an audit record");
        }
    }

    /// The outbound side of a conversation's platform: the one interface
    /// the turn code talks to.
    pub(crate) fn platform(&self, p: Platform) -> Arc<dyn ChatPlatform> {
        self.inner.platforms.get(p)
    }

    /// Gauges for `/metrics`.
    pub async fn gauges(&self) -> Gauges {
        let mut g = Gauges {
            queue_depth: self.inner.store.queue_depth().unwrap_or(0),
            running_turns: self.inner.running.load(Ordering::Relaxed),
            ..Gauges::default()
        };
        for p in self.inner.pools.lock().await.values() {
            let s = p.stats();
            g.pool_size += s.size as u64;
            g.pool_idle += s.idle as u64;
            g.pool_busy += s.busy as u64;
            g.pool_waiting += s.waiting as u64;
        }
        g
    }

    /// Stops taking turns: pools close, and this waits (up to `wait`) until
    /// every pooled sandbox is destroyed, so none outlives the process.
    pub async fn shutdown(&self, wait: Duration) {
        let pools: Vec<Pool> = self.inner.pools.lock().await.values().cloned().collect();
        for p in &pools {
            p.close();
        }
        let deadline = tokio::time::Instant::now() + wait;
        while tokio::time::Instant::now() < deadline
            && pools.iter().any(|p| {
                let s = p.stats();
                s.idle + s.busy > 0
            })
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Inner {
    /// Turns running now.
    pub fn running_turns(&self) -> u64 {
        self.running.load(Ordering::Relaxed)
    }

    /// The agent and door extras of channel `idx`.
    fn setup(&self, idx: usize) -> ChannelSetup {
        self.setups.get(&idx).cloned().unwrap_or_default()
    }
}
