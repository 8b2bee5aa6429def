//! The path of one message (docs/design.md): store it, authorize it, rate-limit
//! it, debounce it into a turn, run the turn in the conversation's sandbox
//! with the channel's agent, and hand the answer to the platform.
//!
//! Owns: the conversations' actors (one task per conversation: debounce,
//! follow-up queue, stop, status), the pools per channel, per-thread leases,
//! rate limiters, crash recovery at start, and the audit records of messages
//! and turns.
//! Must never: run a message that is not stored, answer an unauthorised
//! sender, run two turns of one conversation at once, give a conversation a
//! lease another conversation's turn still holds, or put message text in the
//! audit log.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::{DefaultKeyedRateLimiter, Quota};
use moat_audit::AuditLog;
use moat_policy::chat_keys::{Mention, Scope};
use moat_policy::gateway::{
    Authorization, ChannelPolicy, GatewayConfig, Platform, SandboxMode, Trust,
};
use moat_policy::trust::{self, Command, Whose};
use moat_sandbox::{Engine, Lease, LeaseOptions, WorkspaceSource};
use moat_store::{IncomingMessage, Inserted, MessageState, Store, TurnState};
use serde_json::json;
use tokio::sync::mpsc;

use crate::agent::{Agent, AgentEvent, CancelHandle, ShellAgent, TurnInput, TurnOutcome};
use crate::artifacts::{Artifact, ArtifactLimits, Collected};
use crate::hub::{ConvEvent, Hub};
use crate::metrics::{Gauges, Metrics, Verdict};
use crate::pool::{LeaseFactory, Lent, Pool, PoolError};

/// How long a turn waits for the platform's thread history.
const HISTORY_WAIT: Duration = Duration::from_secs(3);

/// How long a turn waits for a runner before the user is told it is busy.
const BUSY_AFTER: Duration = Duration::from_secs(1);

/// Refused artifacts told in an answer at most (the rest are counted).
const MAX_REFUSAL_LINES: usize = 20;

/// `hold_lease`'s refusal when the gateway is stopping.
const SHUTTING_DOWN: &str = "moat: shutting down";

/// The stored thread of a conversation that is the whole channel
/// (`conversation = "channel"`); repliers answer at the top level there.
pub const CHANNEL_THREAD: &str = "";

/// A future a platform's replier returns.
pub type BoxFut<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// Where a conversation lives on its platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvRef {
    pub id: i64,
    pub platform: Platform,
    pub channel: String,
    pub thread: String,
}

/// What a platform does with a conversation's turn (Slack: reactions, a live
/// status message, the threaded answer). The web chat needs none of it: it
/// watches the hub.
pub trait Replier: Send + Sync {
    /// A note to the conversation (busy, rate-limited, status, stopped).
    fn notice<'a>(&'a self, conv: &'a ConvRef, text: &'a str) -> BoxFut<'a>;
    /// A turn started for these platform messages.
    fn started<'a>(&'a self, conv: &'a ConvRef, refs: &'a [String]) -> BoxFut<'a>;
    /// The sandbox's status while the turn runs (called often; throttle).
    fn progress<'a>(&'a self, conv: &'a ConvRef, status: &'a str) -> BoxFut<'a>;
    /// The thread's messages since the previous turn, when the platform
    /// keeps the thread (Slack: `conversations.replies`; the bot only hears
    /// mentions, the agent should see the whole thread). `None`: use the
    /// messages the gateway stored.
    fn history<'a>(
        &'a self,
        _conv: &'a ConvRef,
        _refs: &'a [String],
    ) -> Pin<Box<dyn Future<Output = Option<Vec<String>>> + Send + 'a>> {
        Box::pin(async { None })
    }
    /// The files the agent left in `~/artifacts`, called before
    /// [`Replier::finished`] when there are any (Slack: uploaded into the
    /// thread). Entries moat refused are already lines of the answer.
    fn artifacts<'a>(
        &'a self,
        _conv: &'a ConvRef,
        _refs: &'a [String],
        _files: &'a [Artifact],
    ) -> BoxFut<'a> {
        Box::pin(async {})
    }
    /// The turn ended with this answer.
    fn finished<'a>(
        &'a self,
        conv: &'a ConvRef,
        refs: &'a [String],
        outcome: &'a TurnOutcome,
    ) -> BoxFut<'a>;
}

/// A replier that does nothing (the web chat, tests).
pub struct NoReplies;

impl Replier for NoReplies {
    fn notice<'a>(&'a self, _: &'a ConvRef, _: &'a str) -> BoxFut<'a> {
        Box::pin(async {})
    }
    fn started<'a>(&'a self, _: &'a ConvRef, _: &'a [String]) -> BoxFut<'a> {
        Box::pin(async {})
    }
    fn progress<'a>(&'a self, _: &'a ConvRef, _: &'a str) -> BoxFut<'a> {
        Box::pin(async {})
    }
    fn finished<'a>(&'a self, _: &'a ConvRef, _: &'a [String], _: &'a TurnOutcome) -> BoxFut<'a> {
        Box::pin(async {})
    }
}

/// One chat message as a front-end hands it over (signature already checked).
#[derive(Debug, Clone)]
pub struct Inbound {
    pub platform: Platform,
    /// The platform's id for the event; a retry carries the same id.
    pub event_id: String,
    pub channel: String,
    /// The conversation within the channel (a Slack thread's root ts).
    pub thread: String,
    pub user: String,
    pub text: String,
    pub ts_ms: i64,
    /// The platform's id of this message (Slack: its ts), for reactions.
    pub message_ref: Option<String>,
    /// Addressed to the bot: a Slack mention or direct message, a web chat
    /// message. A Slack channel message without a mention is not (it starts a
    /// turn only where the channel sets `mention = "optional"`).
    pub addressed: bool,
}

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

/// Refused tool calls recorded one by one per turn; the rest are counted.
const MAX_REFUSALS_AUDITED: usize = 50;
/// The longest answer kept, posted and stored (the agent's output is the
/// sandbox's: bounded here whatever an agent does).
const MAX_ANSWER_BYTES: usize = 256 * 1024;

/// `s` cut to `max` characters.
fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(max).collect::<String>())
    }
}

/// Cuts an answer longer than [`MAX_ANSWER_BYTES`] at a character boundary
/// and says so.
fn cap_answer(answer: &mut String) {
    cap_answer_at(answer, MAX_ANSWER_BYTES);
}

/// [`cap_answer`] at `max` bytes.
fn cap_answer_at(answer: &mut String, max: usize) {
    if answer.len() <= max {
        return;
    }
    let mut end = max;
    while !answer.is_char_boundary(end) {
        end -= 1;
    }
    let cut = answer.len() - end;
    answer.truncate(end);
    answer.push_str(&format!(
        "\n\nmoat: the answer was cut here ({cut} more bytes)"
    ));
}

/// The gateway's shared state.
pub struct Inner {
    pub cfg: GatewayConfig,
    pub store: Arc<Store>,
    pub audit: Arc<AuditLog>,
    pub egress_audit: Arc<dyn moat_egress::Audit>,
    pub engine: Arc<Engine>,
    pub hub: Hub,
    pub metrics: Metrics,
    setups: HashMap<usize, ChannelSetup>,
    groups: Arc<crate::groups::Groups>,
    runtime: tokio::runtime::Handle,
    repliers: HashMap<Platform, Arc<dyn Replier>>,
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
    pub repliers: HashMap<Platform, Arc<dyn Replier>>,
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
        Gateway {
            inner: Arc::new(Inner {
                cfg: parts.cfg,
                store: parts.store,
                audit: parts.audit,
                egress_audit,
                engine: parts.engine,
                hub: Hub::default(),
                metrics: Metrics::default(),
                setups: parts.setups,
                groups: parts.groups,
                runtime: tokio::runtime::Handle::current(),
                repliers: parts.repliers,
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

    pub(crate) fn replier(&self, p: Platform) -> Arc<dyn Replier> {
        self.inner
            .repliers
            .get(&p)
            .cloned()
            .unwrap_or_else(|| Arc::new(NoReplies))
    }

    /// Takes one message: stored first (when this returns, the message is
    /// durable and the platform may be told so), then judged and queued.
    pub async fn accept(&self, mut m: Inbound) -> Result<Accepted, GatewayError> {
        // `conversation = "channel"`: the whole chat is one conversation.
        if let Some(c) = self.inner.cfg.channel(m.platform, &m.channel) {
            if c.chat.scope(m.platform, &m.channel) == Scope::Channel {
                m.thread = CHANNEL_THREAD.to_string();
            }
        }
        let store = self.inner.store.clone();
        let incoming = IncomingMessage {
            platform: m.platform.name().to_string(),
            event_id: m.event_id.clone(),
            channel: m.channel.clone(),
            thread: m.thread.clone(),
            user: m.user.clone(),
            text: m.text.clone(),
            ts_ms: m.ts_ms,
            message_ref: m.message_ref.clone(),
        };
        let inserted = tokio::task::spawn_blocking(move || store.insert_message(&incoming))
            .await
            .map_err(|e| GatewayError::Internal(e.to_string()))??;
        let base = json!({
            "platform": m.platform.name(),
            "channel": m.channel,
            "thread": m.thread,
            "user": m.user,
            "event_id": m.event_id,
        });
        let with = |extra: serde_json::Value| {
            let mut b = base.clone();
            if let (Some(o), Some(e)) = (b.as_object_mut(), extra.as_object()) {
                o.extend(e.clone());
            }
            b
        };
        let (message_id, conversation_id) = match inserted {
            Inserted::Duplicate { message_id } => {
                self.inner.metrics.event(Verdict::Duplicate);
                self.audit(
                    "message",
                    with(json!({"verdict": "duplicate", "message_id": message_id})),
                );
                return Ok(Accepted::Duplicate { message_id });
            }
            Inserted::New {
                message_id,
                conversation_id,
            } => (message_id, conversation_id),
        };
        let (chan_idx, channel, trust) = match self
            .inner
            .cfg
            .authorize(m.platform, &m.channel, &m.user)
        {
            Authorization::Allowed { channel, trust } => (channel.index, channel.clone(), trust),
            Authorization::Denied { reason } => {
                self.inner.metrics.event(Verdict::Unauthorized);
                self.inner.store.set_message_state(
                    message_id,
                    MessageState::Dropped,
                    Some(&format!("unauthorised: {reason}")),
                )?;
                self.audit(
                    "message",
                    with(json!({"verdict": "unauthorized", "reason": reason, "message_id": message_id})),
                );
                return Ok(Accepted::Dropped { reason });
            }
        };
        let conv = ConvRef {
            id: conversation_id,
            platform: m.platform,
            channel: m.channel.clone(),
            thread: m.thread.clone(),
        };
        if self.paused() {
            return self.refuse_paused(&conv, message_id, with(json!({"verdict": "paused", "message_id": message_id, "conversation_id": conversation_id})));
        }
        // Rate limits: the user's, then the channel's.
        let lim = &self.inner.limiters[chan_idx];
        let limited = if lim.users.check_key(&m.user).is_err() {
            Some(format!("user rate {}", channel.rate.user))
        } else if lim.channels.check_key(&m.channel).is_err() {
            Some(format!("channel rate {}", channel.rate.channel))
        } else {
            None
        };
        let told_key = (chan_idx, m.user.clone());
        if let Some(which) = limited {
            self.inner.metrics.event(Verdict::RateLimited);
            self.inner.store.set_message_state(
                message_id,
                MessageState::Dropped,
                Some(&format!("over the {which}")),
            )?;
            self.audit(
                "message",
                with(json!({"verdict": "rate_limited", "reason": which, "message_id": message_id})),
            );
            let first = self
                .inner
                .told
                .lock()
                .map(|mut t| t.insert(told_key))
                .unwrap_or(false);
            if first {
                let text = format!(
                    "You are sending messages faster than this channel allows ({which}); moat will answer again shortly."
                );
                self.inner
                    .hub
                    .publish(conv.id, ConvEvent::Notice { text: text.clone() });
                // In the background: the platform's acknowledgement (Slack's
                // 3 seconds) must not wait for the notice to be posted.
                let (replier, conv2) = (self.replier(m.platform), conv.clone());
                tokio::spawn(async move { replier.notice(&conv2, &text).await });
            }
            return Ok(Accepted::Limited);
        }
        if let Ok(mut t) = self.inner.told.lock() {
            t.remove(&told_key);
        }
        // Which messages start a turn: Slack's mention rule, then the trigger
        // (admin channels need none). The rest is context for the next turn.
        let mention_ok = m.addressed || channel.chat.mention == Mention::Optional;
        let after_trigger = match &channel.chat.trigger {
            Some(t) if trust::needs_trigger(channel.trust) => t.strip(&m.text),
            _ => Some(m.text.as_str()),
        };
        let Some(asked) = after_trigger.filter(|_| mention_ok) else {
            let why = if mention_ok {
                "no trigger"
            } else {
                "no mention"
            };
            self.inner.store.set_message_state(
                message_id,
                MessageState::Answered,
                Some(&format!("context ({why}): read at the next turn")),
            )?;
            self.audit(
                "message",
                with(json!({"verdict": "context", "reason": why, "trust": trust.name(), "message_id": message_id, "conversation_id": conversation_id})),
            );
            self.inner.hub.publish(
                conv.id,
                ConvEvent::Message {
                    user: m.user.clone(),
                    text: m.text.clone(),
                },
            );
            return Ok(Accepted::Context {
                message_id,
                conversation_id,
            });
        };
        // A leading trigger is taken off the turn's text, as Slack's mention is
        // (the stored message keeps it).
        let turn_text = match asked.trim() {
            t if asked.len() != m.text.len() && !t.is_empty() => t.to_string(),
            _ => m.text.clone(),
        };
        if let Some(cmd) = Command::parse(asked) {
            self.inner.metrics.event(Verdict::Command);
            self.inner.store.set_message_state(
                message_id,
                MessageState::Answered,
                Some(&format!("command {}", cmd.name())),
            )?;
            self.audit(
                "message",
                with(json!({"verdict": "command", "command": cmd.name(), "trust": trust.name(), "message_id": message_id, "conversation_id": conversation_id})),
            );
            match cmd {
                Command::Stop => self.send(
                    &conv,
                    chan_idx,
                    ConvCmd::Stop {
                        user: m.user,
                        trust,
                    },
                ),
                Command::Status => self.send(
                    &conv,
                    chan_idx,
                    ConvCmd::Status {
                        user: m.user,
                        trust,
                    },
                ),
                Command::Pool => {
                    // In the background: Slack's acknowledgement must not wait.
                    let (gw, conv, user) = (self.clone(), conv.clone(), m.user.clone());
                    tokio::spawn(async move { gw.pool_command(&conv, &user, trust).await });
                }
            }
            return Ok(Accepted::Command { conversation_id });
        }
        self.inner
            .store
            .set_message_state(message_id, MessageState::Queued, None)?;
        self.inner.metrics.event(Verdict::Accepted);
        self.audit(
            "message",
            with(json!({"verdict": "accepted", "trust": trust.name(), "message_id": message_id, "conversation_id": conversation_id})),
        );
        self.inner.hub.publish(
            conv.id,
            ConvEvent::Message {
                user: m.user.clone(),
                text: m.text.clone(),
            },
        );
        self.send(
            &conv,
            chan_idx,
            ConvCmd::Message(Pending {
                message_id,
                user: m.user,
                text: turn_text,
                message_ref: m.message_ref,
                arrived: Instant::now(),
            }),
        );
        Ok(Accepted::Queued {
            message_id,
            conversation_id,
        })
    }

    /// `pool`: the pools' numbers, for the channel's admins only.
    async fn pool_command(&self, conv: &ConvRef, user: &str, trust: Trust) {
        let text = match trust::may_command(trust, Command::Pool, Whose::Others) {
            Ok(()) => {
                let g = self.gauges().await;
                format!(
                    "Pool: {} sandboxes ({} idle, {} busy), {} turns waiting for one; {} turns running, {} messages queued.",
                    g.pool_size, g.pool_idle, g.pool_busy, g.pool_waiting, g.running_turns, g.queue_depth
                )
            }
            Err(r) => {
                self.audit(
                    "command",
                    json!({"verdict": "refused", "command": "pool", "reason": r.name(), "trust": trust.name(), "user": user, "conversation_id": conv.id}),
                );
                r.message(Command::Pool)
            }
        };
        self.inner
            .hub
            .publish(conv.id, ConvEvent::Notice { text: text.clone() });
        self.replier(conv.platform).notice(conv, &text).await;
    }

    /// Hands a command to the conversation's actor, starting it if needed.
    fn send(&self, conv: &ConvRef, chan_idx: usize, cmd: ConvCmd) {
        let mut convs = self.inner.convs.lock().unwrap_or_else(|p| p.into_inner());
        // A live actor takes it; a finished one hands it back for a new one.
        let cmd = match convs.get(&conv.id) {
            Some(tx) => match tx.send(cmd) {
                Ok(()) => return,
                Err(mpsc::error::SendError(c)) => c,
            },
            None => cmd,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(cmd);
        convs.insert(conv.id, tx);
        let gw = self.clone();
        let conv = conv.clone();
        self.inner
            .runtime
            .spawn(async move { gw.conversation(conv, chan_idx, rx).await });
    }

    /// One conversation's actor: debounce per user, one turn at a time,
    /// follow-ups queued, `stop` and `status`.
    async fn conversation(
        self,
        conv: ConvRef,
        chan_idx: usize,
        mut rx: mpsc::UnboundedReceiver<ConvCmd>,
    ) {
        let channel = self.inner.cfg.channels[chan_idx].clone();
        let debounce = channel.debounce;
        // Per user: their messages and when their debounce ends.
        let mut pending: Vec<(String, Vec<Pending>, tokio::time::Instant)> = Vec::new();
        let mut ready: VecDeque<Vec<Pending>> = VecDeque::new();
        let mut running: Option<(tokio::task::JoinHandle<()>, CancelHandle)> = None;
        // Whose turn runs, and who has written here (for `stop`/`status`).
        let mut running_user: Option<String> = None;
        let mut participants: HashSet<String> = HashSet::new();
        let status = Arc::new(Mutex::new(String::from("idle")));
        let idle_exit = Duration::from_secs(600);
        loop {
            let now = tokio::time::Instant::now();
            let mut i = 0;
            while i < pending.len() {
                if pending[i].2 <= now {
                    let (_, batch, _) = pending.remove(i);
                    ready.push_back(batch);
                } else {
                    i += 1;
                }
            }
            if running.is_none() {
                if let Some(mut batch) = ready.pop_front() {
                    // What the same user sent while this waited joins it: a
                    // burst typed during a running turn is one follow-up
                    // turn, also when the debounce is 0 (the web chat's).
                    let user = batch.first().map(|p| p.user.clone());
                    let mut i = 0;
                    while i < ready.len() {
                        if ready[i].first().map(|p| &p.user) == user.as_ref() {
                            batch.extend(ready.remove(i).unwrap_or_default());
                        } else {
                            i += 1;
                        }
                    }
                    let cancel = CancelHandle::default();
                    let gw = self.clone();
                    let c = conv.clone();
                    let ch = channel.clone();
                    let st = status.clone();
                    let cn = cancel.clone();
                    let h = tokio::spawn(async move { gw.turn(c, ch, batch, cn, st).await });
                    running = Some((h, cancel));
                    running_user = user;
                    continue;
                }
            }
            let next = pending.iter().map(|p| p.2).min();
            let quiet = running.is_none() && pending.is_empty() && ready.is_empty();
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    None => break,
                    Some(ConvCmd::Message(p)) => {
                        participants.insert(p.user.clone());
                        let deadline = tokio::time::Instant::now() + debounce;
                        match pending.iter_mut().find(|e| e.0 == p.user) {
                            Some(e) => { e.1.push(p); e.2 = deadline; }
                            None => pending.push((p.user.clone(), vec![p], deadline)),
                        }
                    }
                    Some(ConvCmd::Stop { user, trust }) => {
                        let whose = |u: &str| if u == user { Whose::Own } else { Whose::Others };
                        let may = |u: &str| trust::may_command(trust, Command::Stop, whose(u)).is_ok();
                        let mut dropped = Vec::new();
                        pending.retain_mut(|(u, b, _)| {
                            if may(u) { dropped.append(b); false } else { true }
                        });
                        ready.retain_mut(|b| {
                            let u = b.first().map(|p| p.user.clone()).unwrap_or_default();
                            if may(&u) { dropped.append(b); false } else { true }
                        });
                        for p in &dropped {
                            let _ = self.inner.store.set_message_state(p.message_id, MessageState::Failed, Some("stopped before its turn"));
                        }
                        let verdict = running.as_ref().map(|_| {
                            trust::may_command(trust, Command::Stop, whose(running_user.as_deref().unwrap_or("")))
                        });
                        let text = match verdict {
                            Some(Ok(())) => "Stopping the running turn.".to_string(),
                            Some(Err(r)) => {
                                self.audit("command", json!({"verdict": "refused", "command": "stop", "reason": r.name(), "trust": trust.name(), "user": user, "conversation_id": conv.id}));
                                r.message(Command::Stop)
                            }
                            None if !dropped.is_empty() => format!("Dropped {} queued message(s).", dropped.len()),
                            None => "Nothing is running.".to_string(),
                        };
                        // Told before the cancel: the stopped turn's answer comes after it.
                        self.inner.hub.publish(conv.id, ConvEvent::Notice { text: text.clone() });
                        if let (Some((_, cancel)), Some(Ok(()))) = (&running, verdict) {
                            cancel.cancel();
                        }
                        self.replier(conv.platform).notice(&conv, &text).await;
                    }
                    Some(ConvCmd::Status { user, trust }) => {
                        let whose = if participants.contains(&user) { Whose::Own } else { Whose::Others };
                        let text = match trust::may_command(trust, Command::Status, whose) {
                            Ok(()) => {
                                let waiting: usize = pending.iter().map(|p| p.1.len()).sum::<usize>() + ready.iter().map(Vec::len).sum::<usize>();
                                let now_doing = status.lock().map(|s| s.clone()).unwrap_or_default();
                                format!("Sandbox: {now_doing}. Messages waiting: {waiting}.")
                            }
                            Err(r) => {
                                self.audit("command", json!({"verdict": "refused", "command": "status", "reason": r.name(), "trust": trust.name(), "user": user, "conversation_id": conv.id}));
                                r.message(Command::Status)
                            }
                        };
                        self.inner.hub.publish(conv.id, ConvEvent::Notice { text: text.clone() });
                        self.replier(conv.platform).notice(&conv, &text).await;
                    }
                },
                _ = sleep_until(next), if next.is_some() => {}
                _ = async { if let Some((h, _)) = running.as_mut() { let _ = h.await; } }, if running.is_some() => {
                    running = None;
                    running_user = None;
                }
                _ = tokio::time::sleep(idle_exit), if quiet => {
                    // Idle: end the actor; a new message starts a new one.
                    let mut convs = self.inner.convs.lock().unwrap_or_else(|p| p.into_inner());
                    if rx.is_empty() {
                        convs.remove(&conv.id);
                        break;
                    }
                }
            }
        }
    }

    /// Runs one turn for `batch`, start to answer.
    async fn turn(
        self,
        conv: ConvRef,
        channel: ChannelPolicy,
        batch: Vec<Pending>,
        cancel: CancelHandle,
        status: Arc<Mutex<String>>,
    ) {
        let started = batch
            .iter()
            .map(|p| p.arrived)
            .min()
            .unwrap_or_else(Instant::now);
        let ids: Vec<i64> = batch.iter().map(|p| p.message_id).collect();
        let refs: Vec<String> = batch.iter().filter_map(|p| p.message_ref.clone()).collect();
        let replier = self.replier(conv.platform);
        let set_status = |s: &str| {
            if let Ok(mut st) = status.lock() {
                *st = s.to_string();
            }
        };
        let store = self.inner.store.clone();
        let turn_id = match store.start_turn(conv.id, &ids, now_ms()) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(conversation = conv.id, error = %e, "could not start a turn");
                for id in &ids {
                    let _ = store.set_message_state(
                        *id,
                        MessageState::Failed,
                        Some("moat could not start the turn"),
                    );
                }
                let text = format!("moat could not start this turn: {e}");
                self.inner.hub.publish(
                    conv.id,
                    ConvEvent::Answer {
                        text: text.clone(),
                        ok: false,
                    },
                );
                replier.notice(&conv, &text).await;
                return;
            }
        };
        self.inner.running.fetch_add(1, Ordering::Relaxed);
        // The platform's thread, briefly: a slow platform must not hold up
        // the turn (the stored messages are the fallback).
        let platform_history = tokio::time::timeout(HISTORY_WAIT, replier.history(&conv, &refs))
            .await
            .ok()
            .flatten();
        let history = match platform_history {
            Some(h) => h,
            None => store
                .messages_since_last_turn(conv.id)
                .unwrap_or_default()
                .into_iter()
                .filter(|m| !ids.contains(&m.id) && m.state != MessageState::Dropped)
                .map(|m| format!("{}: {}", m.user, m.text))
                .collect(),
        };
        let input = TurnInput {
            messages: batch.iter().map(|p| p.text.clone()).collect(),
            history,
            resume: matches!(channel.sandbox, SandboxMode::PerThread { .. }),
        };
        let setup = self.inner.setup(channel.index);
        let (agent, limits) = (setup.agent, setup.artifacts);
        replier.started(&conv, &refs).await;
        set_status("waiting for a sandbox");
        self.inner.hub.publish(
            conv.id,
            ConvEvent::Status {
                text: "waiting for a sandbox".into(),
            },
        );
        let held = self.hold_lease(&conv, &channel).await;
        let (mut usage, mut tool_calls, mut refusals) = ((0u64, 0u64), 0u64, 0usize);
        let mut collected = Collected::default();
        let mut outcome = match held {
            Err(text) if text == SHUTTING_DOWN => {
                tracing::info!(
                    conversation = conv.id,
                    turn = turn_id,
                    "turn left for the next start (shutting down)"
                );
                self.inner.running.fetch_sub(1, Ordering::Relaxed);
                return;
            }
            Err(text) => TurnOutcome {
                preformatted: false,
                answer: text,
                ok: false,
                cancelled: false,
            },
            Ok(held) => {
                set_status("running");
                self.inner.hub.publish(
                    conv.id,
                    ConvEvent::Status {
                        text: "running".into(),
                    },
                );
                let (tx, mut rx) = mpsc::unbounded_channel::<AgentEvent>();
                let agent = agent.clone();
                let c2 = cancel.clone();
                // The channel's repository, cloned before the agent starts.
                let clone_plan = channel.github.as_ref().and_then(|g| {
                    let first = input.messages.first().map(String::as_str).unwrap_or("");
                    crate::github_clone::plan(g, conv.id, first)
                });
                // Whose turn it is, for the LLM door's accounting and budget_user.
                let turn_user = batch.first().map(|p| p.user.clone());
                let job = tokio::task::spawn_blocking(move || {
                    let mut held = held;
                    if let Some(d) = held.door() {
                        d.set_llm_user(turn_user.as_deref());
                    }
                    let cloned = match &clone_plan {
                        None => Ok(()),
                        Some(p) => {
                            let _ = tx.send(AgentEvent::Status(format!("cloning {}", p.repo)));
                            crate::github_clone::prepare(held.lease(), p).map(|_| ())
                        }
                    };
                    let out = match cloned {
                        Err(answer) => TurnOutcome {
                            preformatted: false,
                            answer,
                            ok: false,
                            cancelled: false,
                        },
                        Ok(()) => agent.run_turn(held.lease(), &input, &c2, &mut |e| {
                            let _ = tx.send(e);
                        }),
                    };
                    // Before the lease is given back (a pooled one is reset):
                    // what the agent left in ~/artifacts, read without
                    // following any link (crate::artifacts), with the
                    // sandbox stopped (it is stopped or reset next anyway).
                    if crate::artifacts::present(held.lease()) {
                        held.lease().stop();
                    }
                    let collected = crate::artifacts::collect(held.lease(), &limits);
                    // What the hand-back changed in host directories the
                    // sandbox could write (docs/workspace.md), for the audit.
                    let handed_back = held.lease().take_findings();
                    // What reached GitHub, from the door's own record.
                    let github = held
                        .door()
                        .map(|d| d.take_github_activity())
                        .unwrap_or_default();
                    (held, out, (collected, handed_back, github))
                });
                while let Some(ev) = rx.recv().await {
                    match ev {
                        AgentEvent::Text(t) => {
                            self.inner.hub.publish(conv.id, ConvEvent::Text { text: t })
                        }
                        AgentEvent::Status(s) => {
                            set_status(&s);
                            self.inner
                                .hub
                                .publish(conv.id, ConvEvent::Status { text: s.clone() });
                            replier.progress(&conv, &s).await;
                        }
                        AgentEvent::ToolCall { name, summary } => {
                            let s = format!("{name}: {summary}");
                            set_status(&s);
                            self.inner
                                .hub
                                .publish(conv.id, ConvEvent::Status { text: s.clone() });
                            replier.progress(&conv, &s).await;
                        }
                        AgentEvent::Refused { tool, reason } => {
                            // The names come from the sandbox: bounded in
                            // number and length before they are recorded.
                            refusals += 1;
                            if refusals <= MAX_REFUSALS_AUDITED {
                                self.audit(
                                    "tool-refused",
                                    json!({
                                        "conversation_id": conv.id,
                                        "turn_id": turn_id,
                                        "tool": clip(&tool, 200),
                                        "reason": clip(&reason, 200),
                                    }),
                                );
                            }
                        }
                        AgentEvent::Usage {
                            input_tokens,
                            output_tokens,
                        } => {
                            usage.0 += input_tokens;
                            usage.1 += output_tokens;
                        }
                        AgentEvent::ToolResult { .. } => tool_calls += 1,
                        AgentEvent::Error(e) => {
                            tracing::warn!(conversation = conv.id, turn = turn_id, error = %e, "agent error");
                        }
                    }
                }
                match job.await {
                    Ok((held, mut out, (found, handed_back, github))) => {
                        self.give_back(&conv, held).await;
                        if !github.is_empty() {
                            // The agent's text is cut first, so that moat's
                            // record is never what the cap cuts off.
                            cap_answer_at(&mut out.answer, MAX_ANSWER_BYTES - 32 * 1024);
                            if !out.answer.is_empty() && !out.answer.ends_with('\n') {
                                out.answer.push('\n');
                            }
                            crate::github_hooks::link(&self, conv.id, &github);
                            out.answer.push_str("\nOn GitHub (moat's record):\n");
                            for a in &github {
                                out.answer.push_str(&format!("- {a}\n"));
                                self.audit(
                                    "github-activity",
                                    json!({
                                        "conversation_id": conv.id,
                                        "turn_id": turn_id,
                                        "activity": a,
                                    }),
                                );
                            }
                        }
                        for f in handed_back.iter().take(MAX_REFUSALS_AUDITED) {
                            self.audit(
                                "hand-back",
                                json!({
                                    "conversation_id": conv.id,
                                    "turn_id": turn_id,
                                    "change": clip(&f.to_string(), 300),
                                }),
                            );
                        }
                        collected = found;
                        out
                    }
                    Err(e) => TurnOutcome {
                        preformatted: false,
                        answer: format!("moat: the turn crashed: {e}"),
                        ok: false,
                        cancelled: false,
                    },
                }
            }
        };
        cap_answer(&mut outcome.answer);
        if refusals > MAX_REFUSALS_AUDITED {
            self.audit(
                "tool-refused",
                json!({
                    "conversation_id": conv.id,
                    "turn_id": turn_id,
                    "more": refusals - MAX_REFUSALS_AUDITED,
                }),
            );
        }
        set_status("idle");
        self.artifacts_found(&conv, turn_id, &collected, &mut outcome);
        let state = if outcome.cancelled {
            TurnState::Cancelled
        } else if outcome.ok {
            TurnState::Done
        } else {
            TurnState::Failed
        };
        let error = (!outcome.ok).then(|| outcome.answer.lines().last().unwrap_or("").to_string());
        if let Err(e) = store.finish_turn(
            turn_id,
            state,
            outcome.answer.chars().count() as u64,
            error.as_deref(),
            now_ms(),
        ) {
            tracing::error!(turn = turn_id, error = %e, "could not record the end of a turn");
        }
        self.inner.hub.publish(
            conv.id,
            ConvEvent::Answer {
                text: outcome.answer.clone(),
                ok: outcome.ok,
            },
        );
        if !collected.files.is_empty() {
            replier.artifacts(&conv, &refs, &collected.files).await;
        }
        replier.finished(&conv, &refs, &outcome).await;
        let secs = started.elapsed().as_secs_f64();
        self.inner.metrics.turn(outcome.ok, secs);
        self.inner.running.fetch_sub(1, Ordering::Relaxed);
        self.audit(
            "turn",
            json!({
                "conversation_id": conv.id,
                "turn_id": turn_id,
                "messages": ids,
                "state": format!("{state:?}").to_lowercase(),
                "answer_chars": outcome.answer.chars().count(),
                "duration_ms": (secs * 1000.0) as u64,
                "agent": agent.name(),
                "tool_calls": tool_calls,
                "input_tokens": usage.0,
                "output_tokens": usage.1,
            }),
        );
    }

    /// Audits a turn's artifacts (name, size, SHA-256; never contents) and
    /// refusals, tells the user about every refusal in the answer, and
    /// offers the files to the web chat's watchers (kept for download).
    fn artifacts_found(
        &self,
        conv: &ConvRef,
        turn_id: i64,
        collected: &Collected,
        outcome: &mut TurnOutcome,
    ) {
        for a in &collected.files {
            self.audit(
                "artifact",
                json!({
                    "conversation_id": conv.id,
                    "turn_id": turn_id,
                    "name": a.name,
                    "bytes": a.size(),
                    "sha256": a.sha256,
                }),
            );
        }
        for (name, why) in &collected.refused {
            self.audit(
                "artifact-refused",
                json!({
                    "conversation_id": conv.id,
                    "turn_id": turn_id,
                    "name": name,
                    "reason": why.kind(),
                    "detail": why.to_string(),
                }),
            );
        }
        let lines = collected.refusal_lines(MAX_REFUSAL_LINES);
        if !lines.is_empty() {
            if !outcome.answer.is_empty() && !outcome.answer.ends_with('\n') {
                outcome.answer.push('\n');
            }
            for l in lines {
                outcome.answer.push_str(&l);
                outcome.answer.push('\n');
            }
        }
        if conv.platform == Platform::Web {
            for a in &collected.files {
                let url = self
                    .inner
                    .hub
                    .keep_artifact(conv.id, a)
                    .map(|id| format!("/api/conversations/{}/artifacts/{id}", conv.thread));
                self.inner.hub.publish(
                    conv.id,
                    ConvEvent::Artifact {
                        name: a.name.clone(),
                        size: a.size(),
                        sha256: a.sha256.clone(),
                        url,
                    },
                );
            }
        }
    }

    /// The conversation's lease for one turn: a pooled runner, or the
    /// conversation's own named lease. `Err` is the answer to give instead.
    async fn hold_lease(&self, conv: &ConvRef, channel: &ChannelPolicy) -> Result<Held, String> {
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
                            self.inner.hub.publish(conv.id, ConvEvent::Notice { text: text.clone() });
                            self.replier(conv.platform).notice(conv, &text).await;
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
                let extras = self.inner.setup(channel.index).extras;
                let n2 = name.clone();
                let built = tokio::task::spawn_blocking(move || {
                    let door = crate::pool::start_door(
                        &inner.runtime,
                        &policy,
                        &n2,
                        inner.egress_audit.clone(),
                        &extras,
                    )?;
                    let network = door.as_ref().map(|d| crate::pool::attachment(d, &extras));
                    let lease = inner
                        .engine
                        .lease(
                            policy,
                            LeaseOptions {
                                run_as,
                                name: Some(n2),
                                workspace: WorkspaceSource::Fresh,
                                network,
                            },
                        )
                        .map_err(|e| e.to_string())?;
                    Ok::<_, String>((lease, door))
                })
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r);
                match built {
                    Ok((lease, door)) => {
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
                        Ok(Held::Own { lease, _door: door })
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
    async fn give_back(&self, conv: &ConvRef, held: Held) {
        match held {
            Held::Pooled(lent) => {
                drop(lent);
                self.audit(
                    "lease",
                    json!({"event": "released", "conversation_id": conv.id, "mode": "pool"}),
                );
            }
            Held::Own { lease, _door } => {
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

    /// After a crash: every stored message that was not answered is queued
    /// again (turns cut off by the crash are closed as failed first).
    pub async fn recover(&self) -> Result<usize, GatewayError> {
        let store = self.inner.store.clone();
        let requeued = tokio::task::spawn_blocking(move || store.requeue_interrupted(now_ms()))
            .await
            .map_err(|e| GatewayError::Internal(e.to_string()))??;
        let mut n = 0;
        for m in requeued {
            let Some(conv) = self.inner.store.conversation(m.conversation_id)? else {
                continue;
            };
            let Ok(platform) = Platform::parse(&conv.platform) else {
                continue;
            };
            let Authorization::Allowed { channel, .. } =
                self.inner.cfg.authorize(platform, &conv.channel, &m.user)
            else {
                self.inner.store.set_message_state(
                    m.id,
                    MessageState::Dropped,
                    Some("no longer authorised after a restart"),
                )?;
                continue;
            };
            let idx = channel.index;
            let cref = ConvRef {
                id: conv.id,
                platform,
                channel: conv.channel.clone(),
                thread: conv.thread.clone(),
            };
            self.audit(
                "message",
                json!({"verdict": "recovered", "message_id": m.id, "conversation_id": conv.id}),
            );
            self.send(
                &cref,
                idx,
                ConvCmd::Message(Pending {
                    message_id: m.id,
                    user: m.user,
                    text: m.text,
                    // Stored with the message: the recovered message still
                    // gets its reactions.
                    message_ref: m.message_ref,
                    arrived: Instant::now(),
                }),
            );
            n += 1;
        }
        Ok(n)
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

async fn sleep_until(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// A lease held for one turn.
enum Held {
    Pooled(Lent),
    Own {
        lease: Lease,
        _door: Option<moat_egress::Door>,
    },
}

impl Held {
    fn door(&mut self) -> Option<&moat_egress::Door> {
        match self {
            Held::Pooled(l) => l.runner().door.as_ref(),
            Held::Own { _door, .. } => _door.as_ref(),
        }
    }

    fn lease(&mut self) -> &mut Lease {
        match self {
            Held::Pooled(l) => &mut l.runner().lease,
            Held::Own { lease, .. } => lease,
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

    /// The pool of a pool-mode channel, built (and warmed) on first use.
    async fn pool_for(&self, idx: usize) -> Result<Pool, PoolError> {
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
            extras: self.setup(idx).extras,
            runtime: self.runtime.clone(),
            audit: self.egress_audit.clone(),
            prefix: format!("pool{idx}"),
            counter: AtomicU64::new(0),
        };
        let pool = Pool::new(
            Arc::new(factory),
            self.cfg.pool.size as usize,
            self.cfg.pool.max_waiters as usize,
        )
        .await?;
        pools.insert(idx, pool.clone());
        Ok(pool)
    }
}
