//! Approvals (docs/approvals.md): an action a channel lists in `approve`
//! waits here while the channel's admins are asked (Slack: Approve and Deny
//! buttons; the web chat: an `approval` event and `POST /api/approvals/{id}`),
//! and an unknown sender's first message in a channel with `unknown =
//! "request_approval"` is held while they decide whether to let them in.
//!
//! Owns: the pending requests (in memory: a request dies with the process,
//! and so does the call that waits for it), their random ids, the timeout,
//! taking a decision once, and the `approval` audit records. Whether an
//! action needs approval and who may decide are moat-policy's
//! (`trust::ipc_gate`, `approvals::may_decide`).
//! Must never: run a held action before an admin of its channel approved
//! it, take a decision twice, take one from another platform's user, or put
//! the held message's or action's text in the audit log.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::Instant;

use moat_policy::approvals::{self, ApprovalKind, DecideRefusal, Outcome};
use moat_policy::gateway::{Authorization, Platform, Trust};
use serde_json::json;
use tokio::sync::oneshot;

use crate::pipeline::{ConvRef, Gateway, Inbound};

/// Decided ids remembered, to tell a replay from a made-up id.
const DECIDED_KEPT: usize = 4096;
/// Unverified clicks are audited at most this often.
const UNVERIFIED_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
/// The longest detail (the agent's message, a task's prompt) shown to admins.
const DETAIL_SHOWN: usize = 1500;

/// What a request asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// An action of the channel's `approve` list.
    Action(ApprovalKind),
    /// Let an unknown sender talk in the channel.
    Admit { user: String },
    /// The agent's own question (`request_approval`).
    Asked,
}

impl Subject {
    pub fn name(&self) -> &'static str {
        match self {
            Subject::Action(k) => k.name(),
            Subject::Admit { .. } => "admit_user",
            Subject::Asked => "agent_request",
        }
    }
}

/// A request as the platforms show it to the channel's admins.
#[derive(Debug, Clone)]
pub struct ApprovalPost {
    /// The random id the buttons carry.
    pub id: String,
    /// moat's own words: who asks for what.
    pub summary: String,
    /// What the agent wrote (a message, a prompt): shown escaped, quoted.
    pub detail: Option<String>,
}

/// A decision as it reached the waiting call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub outcome: Outcome,
    /// The admin who decided (none on timeout).
    pub by: Option<String>,
}

struct Pending {
    subject: Subject,
    platform: Platform,
    channel: String,
    conversation_id: i64,
    tx: oneshot::Sender<Decision>,
}

/// The gateway's pending requests.
#[derive(Default)]
pub struct Desk {
    pending: Mutex<HashMap<String, Pending>>,
    decided: Mutex<(HashSet<String>, VecDeque<String>)>,
    /// Unverified clicks: when the last one was audited, and how many were
    /// left out since (a flood of forged payloads cannot fill the disk).
    unverified: Mutex<Option<(Instant, u64)>>,
    /// Unknown senders with a request open or denied in this run (platform,
    /// chat, user): they do not ask again until a restart.
    asked: Mutex<HashSet<(Platform, String, String)>>,
}

impl Desk {
    fn remember(&self, id: &str) {
        let mut d = self.decided.lock().unwrap_or_else(|p| p.into_inner());
        if d.0.insert(id.to_string()) {
            d.1.push_back(id.to_string());
        }
        while d.1.len() > DECIDED_KEPT {
            if let Some(old) = d.1.pop_front() {
                d.0.remove(&old);
            }
        }
    }

    fn was_decided(&self, id: &str) -> bool {
        self.decided
            .lock()
            .map(|d| d.0.contains(id))
            .unwrap_or(false)
    }
}

fn new_id() -> String {
    let mut b = [0u8; 16];
    let _ = getrandom::getrandom(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Is `id` shaped like one of ours (32 hex digits)? Anything else is not
/// looked up, nor echoed into the audit log.
pub fn valid_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

impl Gateway {
    /// [`GatewayConfig::authorize`](moat_policy::gateway::GatewayConfig::authorize)
    /// with the senders admins let in (`unknown = "request_approval"`).
    pub fn authorize(&self, platform: Platform, channel: &str, user: &str) -> Authorization<'_> {
        let store = &self.inner.store;
        self.inner
            .cfg
            .authorize_admitted(platform, channel, user, || {
                store
                    .is_admitted(platform.name(), channel, user)
                    .unwrap_or(false)
            })
    }

    /// Asks the admins of `conv`'s channel about `subject` and waits for
    /// their decision, at most the channel's `approve_timeout` (then it is
    /// [`Outcome::TimedOut`], a denial). `requester` is who the request is
    /// for (the turn's user, or the unknown sender).
    pub(crate) async fn ask_approval(
        &self,
        conv: &ConvRef,
        chan_idx: usize,
        requester: &str,
        subject: Subject,
        summary: String,
        detail: Option<String>,
    ) -> Decision {
        let timeout = self
            .inner
            .cfg
            .channels
            .get(chan_idx)
            .map(|c| c.approvals.timeout)
            .unwrap_or(approvals::DEFAULT_TIMEOUT);
        let id = new_id();
        let (tx, rx) = oneshot::channel();
        let what = subject.name();
        if let Ok(mut p) = self.inner.approvals.pending.lock() {
            p.insert(
                id.clone(),
                Pending {
                    subject,
                    platform: conv.platform,
                    channel: conv.channel.clone(),
                    conversation_id: conv.id,
                    tx,
                },
            );
        }
        let base = json!({
            "id": id, "action": what, "platform": conv.platform.name(),
            "channel": conv.channel, "conversation_id": conv.id, "requester": requester,
        });
        self.audit_approval(
            &base,
            json!({"verdict": "requested", "timeout_ms": timeout.as_millis() as u64}),
        );
        let post = ApprovalPost {
            id: id.clone(),
            summary,
            detail: detail.map(|d| d.chars().take(DETAIL_SHOWN).collect()),
        };
        let out = self.platform(conv.platform);
        let msg_ref = out.approval(conv, &post).await;
        let started = Instant::now();
        let decision = match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(d)) => d,
            // Timed out (or the desk dropped the request): denied. Whoever
            // holds the lock first wins: a click that came just before the
            // timeout still counts.
            _ => {
                let gone = self
                    .inner
                    .approvals
                    .pending
                    .lock()
                    .map(|mut p| p.remove(&id))
                    .ok()
                    .flatten();
                match gone {
                    Some(_) => {
                        self.inner.approvals.remember(&id);
                        let d = Decision {
                            outcome: Outcome::TimedOut,
                            by: None,
                        };
                        self.audit_approval(
                            &base,
                            json!({"verdict": "timed_out", "waited_ms": started.elapsed().as_millis() as u64}),
                        );
                        d
                    }
                    // Decided in the instant between: the decision was sent.
                    None => Decision {
                        outcome: Outcome::TimedOut,
                        by: None,
                    },
                }
            }
        };
        out.approval_decided(conv, &post, msg_ref.as_deref(), &decision)
            .await;
        decision
    }

    /// An admin's click or POST on request `id`: `approve` or deny, by
    /// `user` of `platform` (as the platform authenticated them), coming
    /// through `source` (`slack`, `web`). Refused (and audited): a decider
    /// who is not an admin of the request's channel, a request decided
    /// already (a replay), an unknown id.
    pub fn decide_approval(
        &self,
        id: &str,
        platform: Platform,
        user: &str,
        approve: bool,
        source: &str,
    ) -> Result<Outcome, DecideRefusal> {
        let refuse = |why: DecideRefusal, extra: serde_json::Value| {
            let mut rec = json!({"verdict": "refused", "reason": why.name(), "by": user,
                "by_platform": platform.name(), "source": source});
            if valid_id(id) {
                rec["id"] = json!(id);
            }
            if let (Some(o), Some(e)) = (rec.as_object_mut(), extra.as_object()) {
                o.extend(e.clone());
            }
            self.audit("approval", rec);
            Err(why)
        };
        if !valid_id(id) {
            return refuse(DecideRefusal::Unknown, json!({}));
        }
        let mut pending = self
            .inner
            .approvals
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let Some(p) = pending.get(id) else {
            drop(pending);
            let why = if self.inner.approvals.was_decided(id) {
                DecideRefusal::AlreadyDecided
            } else {
                DecideRefusal::Unknown
            };
            return refuse(why, json!({}));
        };
        // The decider's trust in the request's channel, on the request's
        // platform: a user id of another platform is nobody there.
        let trust: Option<Trust> = (platform == p.platform)
            .then(|| match self.authorize(p.platform, &p.channel, user) {
                Authorization::Allowed { trust, .. } => Some(trust),
                Authorization::Denied { .. } => None,
            })
            .flatten();
        let where_ = json!({"action": p.subject.name(), "platform": p.platform.name(),
            "channel": p.channel, "conversation_id": p.conversation_id});
        if let Err(why) = approvals::may_decide(trust, true) {
            drop(pending);
            return refuse(why, where_);
        }
        let Some(p) = pending.remove(id) else {
            return refuse(DecideRefusal::AlreadyDecided, where_);
        };
        drop(pending);
        self.inner.approvals.remember(id);
        let outcome = if approve {
            Outcome::Approved
        } else {
            Outcome::Denied
        };
        let mut rec = json!({"verdict": outcome.name(), "id": id, "by": user, "source": source});
        if let (Some(o), Some(e)) = (rec.as_object_mut(), where_.as_object()) {
            o.extend(e.clone());
        }
        self.audit("approval", rec);
        let _ = p.tx.send(Decision {
            outcome,
            by: Some(user.to_string()),
        });
        Ok(outcome)
    }

    /// A click or POST whose signature or timestamp did not verify: at
    /// most one audit record a second, with the number left out.
    pub fn audit_unverified_click(&self, source: &str, reason: &str) {
        let left_out = {
            let mut u = self
                .inner
                .approvals
                .unverified
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            match u.as_mut() {
                Some((last, n)) if last.elapsed() < UNVERIFIED_EVERY => {
                    *n += 1;
                    None
                }
                _ => {
                    let n = u.map(|(_, n)| n).unwrap_or(0);
                    *u = Some((Instant::now(), 0));
                    Some(n)
                }
            }
        };
        if let Some(n) = left_out {
            self.audit(
                "approval",
                json!({"verdict": "refused", "reason": reason, "source": source, "not_recorded_before": n}),
            );
        }
    }

    fn audit_approval(&self, base: &serde_json::Value, extra: serde_json::Value) {
        let mut rec = base.clone();
        if let (Some(o), Some(e)) = (rec.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        self.audit("approval", rec);
    }

    /// An unknown sender's message in a channel with `unknown =
    /// "request_approval"`: held (stored, not answered) while the channel's
    /// admins are asked, once per sender and chat in this run. Approved: the
    /// sender is let in (in the store) and the held message is taken again.
    /// Denied or timed out: it is dropped. Returns `false` when the channel
    /// does not ask (the message is dropped as before).
    pub(crate) fn hold_unknown(&self, m: &Inbound, message_id: i64, conversation_id: i64) -> bool {
        let Some(channel) = self.inner.cfg.channel(m.platform, &m.channel) else {
            return false;
        };
        if channel.approvals.unknown != approvals::Unknown::RequestApproval || m.user.is_empty() {
            return false;
        }
        let key = (m.platform, m.channel.clone(), m.user.clone());
        let first = self
            .inner
            .approvals
            .asked
            .lock()
            .map(|mut a| a.insert(key.clone()))
            .unwrap_or(false);
        let detail = if first {
            "held: the channel's admins are asked to let the sender in"
        } else {
            "held: the sender's request to be let in is open or was denied"
        };
        let _ = self.inner.store.set_message_state(
            message_id,
            moat_store::MessageState::Received,
            Some(detail),
        );
        self.audit(
            "message",
            json!({"verdict": "held", "platform": m.platform.name(), "channel": m.channel,
                "thread": m.thread, "user": m.user, "event_id": m.event_id,
                "message_id": message_id, "asked": first}),
        );
        if !first {
            let _ = self.inner.store.set_message_state(
                message_id,
                moat_store::MessageState::Dropped,
                Some("unauthorised: the sender's request to be let in is open or was denied"),
            );
            return true;
        }
        let conv = ConvRef {
            id: conversation_id,
            platform: m.platform,
            channel: m.channel.clone(),
            thread: m.thread.clone(),
        };
        let (gw, m, chan_idx) = (self.clone(), m.clone(), channel.index);
        tokio::spawn(async move {
            let summary = format!(
                "User {} is not in this channel's users and wrote here. Let them talk here (as a {})?",
                m.user.chars().take(100).collect::<String>(),
                approvals::admitted_trust(
                    gw.inner.cfg.channels.get(chan_idx).map(|c| c.trust).unwrap_or(Trust::Member)
                )
                .name()
            );
            let d = gw
                .ask_approval(
                    &conv,
                    chan_idx,
                    &m.user,
                    Subject::Admit {
                        user: m.user.clone(),
                    },
                    summary,
                    None,
                )
                .await;
            gw.settle_unknown(m, message_id, conversation_id, key, d)
                .await;
        });
        true
    }

    async fn settle_unknown(
        &self,
        m: Inbound,
        message_id: i64,
        conversation_id: i64,
        key: (Platform, String, String),
        d: Decision,
    ) {
        if d.outcome != Outcome::Approved {
            let _ = self.inner.store.set_message_state(
                message_id,
                moat_store::MessageState::Dropped,
                Some(&format!(
                    "unauthorised: letting the sender in was {}",
                    d.outcome.name()
                )),
            );
            return;
        }
        let by = d.by.unwrap_or_default();
        let admitted = self.inner.store.admit_user(
            m.platform.name(),
            &m.channel,
            &m.user,
            &by,
            crate::tasks::now_ms(),
        );
        if let Err(e) = admitted {
            tracing::error!(error = %e, "could not store an admitted sender");
            let _ = self.inner.store.set_message_state(
                message_id,
                moat_store::MessageState::Dropped,
                Some("approved, but the store could not record it"),
            );
            return;
        }
        self.audit(
            "approval",
            json!({"verdict": "admitted", "platform": m.platform.name(), "channel": m.channel,
                "user": m.user, "by": by}),
        );
        if let Ok(mut a) = self.inner.approvals.asked.lock() {
            a.remove(&key);
        }
        // The held message, taken again: now its sender is let in.
        if let Err(e) = self.judge(m, message_id, conversation_id).await {
            tracing::error!(error = %e, "a held message could not be taken");
        }
    }
}
