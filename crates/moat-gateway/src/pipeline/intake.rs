//! Intake: a message from a front-end stored first, then deduplicated,
//! authorized, rate-limited, matched against the channel's mention and
//! trigger rules, and handed to its conversation's actor (or run as a
//! command).
//!
//! Must never: judge a message before it is stored, tell an unauthorised
//! sender anything, or wait on a platform's API before the delivery is
//! acknowledged (notices are sent in the background).

use std::time::Instant;

use moat_policy::chat_keys::{Mention, Scope};
use moat_policy::gateway::{Authorization, Trust};
use moat_policy::trust::{self, Command, Whose};
use moat_store::{IncomingMessage, Inserted, MessageState};
use serde_json::json;
use tokio::sync::mpsc;

use super::{Accepted, ConvCmd, Gateway, GatewayError, Pending};
use crate::metrics::Verdict;
use crate::platform::{ConvRef, Inbound, CHANNEL_THREAD};

impl Gateway {
    /// Takes one message: stored first (when this returns, the message is
    /// durable and the platform may be told so), then judged and queued.
    pub async fn accept(&self, mut m: Inbound) -> Result<Accepted, GatewayError> {
        // Attached files are lines of the stored text (the agent is told).
        if !m.attachments.is_empty() {
            m.text = m.full_text();
        }
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
        self.judge(m, message_id, conversation_id).await
    }

    /// A stored message judged: authorized, rate-limited, matched against
    /// the channel's mention and trigger rules, queued or run as a command.
    /// Also takes a held message again once an admin let its sender in.
    pub(crate) async fn judge(
        &self,
        m: Inbound,
        message_id: i64,
        conversation_id: i64,
    ) -> Result<Accepted, GatewayError> {
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
        let (chan_idx, channel, trust) = match self.authorize(m.platform, &m.channel, &m.user) {
            Authorization::Allowed { channel, trust } => (channel.index, channel.clone(), trust),
            Authorization::Denied { reason } => {
                self.inner.metrics.event(Verdict::Unauthorized);
                // `unknown = "request_approval"`: held while the admins decide.
                if self.hold_unknown(&m, message_id, conversation_id) {
                    return Ok(Accepted::Dropped { reason });
                }
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
                // In the background: the platform's acknowledgement (Slack's
                // 3 seconds) must not wait for the notice to be posted.
                let (out, conv2) = (self.platform(m.platform), conv.clone());
                tokio::spawn(async move { out.notice(&conv2, &text).await });
            }
            return Ok(Accepted::Limited);
        }
        if let Ok(mut t) = self.inner.told.lock() {
            t.remove(&told_key);
        }
        // Which messages start a turn: Slack's mention rule, then the trigger
        // (admin channels need none). The rest is context for the next turn.
        let mention_ok = m.addressed || channel.chat.mention == Mention::Optional;
        // A task's run needs no trigger: its creator asked when scheduling it.
        let scheduled = self.inner.scheduled.take(&m.event_id);
        let after_trigger = match &channel.chat.trigger {
            Some(t) if trust::needs_trigger(channel.trust) && !scheduled => t.strip(&m.text),
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
            self.platform(m.platform)
                .said(&conv, message_id, &m.user, &m.text)
                .await;
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
        // `approve ID` / `deny ID`: an admin decides a request where the
        // platform has no buttons (crate::approvals decides who may).
        if let Some((approve, id)) =
            moat_policy::approvals::parse_decision(asked).filter(|_| !scheduled)
        {
            self.inner.metrics.event(Verdict::Command);
            let word = if approve { "approve" } else { "deny" };
            self.inner.store.set_message_state(
                message_id,
                MessageState::Answered,
                Some(&format!("command {word}")),
            )?;
            self.audit(
                "message",
                with(json!({"verdict": "command", "command": word, "trust": trust.name(), "message_id": message_id, "conversation_id": conversation_id})),
            );
            let text = match self.decide_approval(&id, conv.platform, &m.user, approve, "chat") {
                Ok(o) => format!("request {id}: {}", o.name()),
                Err(why) => format!("request {id}: {}", why.message()),
            };
            self.platform(m.platform).notice(&conv, &text).await;
            return Ok(Accepted::Command { conversation_id });
        }
        if let Some(cmd) = trust::TaskCommand::parse(asked).filter(|_| !scheduled) {
            self.inner.metrics.event(Verdict::Command);
            self.inner.store.set_message_state(
                message_id,
                MessageState::Answered,
                Some(&format!("command {}", cmd.op().name())),
            )?;
            let caller = crate::ipc::Caller {
                conversation_id,
                platform: conv.platform,
                channel: conv.channel.clone(),
                thread: conv.thread.clone(),
                user: m.user.clone(),
                trust,
                chan_idx,
            };
            tokio::spawn(crate::tasks::command(self.clone(), conv, caller, cmd));
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
        self.platform(m.platform)
            .said(&conv, message_id, &m.user, &m.text)
            .await;
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
        self.platform(conv.platform).notice(conv, &text).await;
    }

    /// Hands a command to the conversation's actor, starting it if needed.
    pub(super) fn send(&self, conv: &ConvRef, chan_idx: usize, cmd: ConvCmd) {
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
}
