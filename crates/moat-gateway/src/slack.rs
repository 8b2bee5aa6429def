//! Slack in and out: the Events API endpoint (`POST /slack/events`, signed
//! requests only), Socket Mode, and the replier that posts a turn's answer in
//! the thread with a live status message and reactions (👀 while working,
//! ✅ done, ❌ failed), and uploads the turn's artifacts into the thread.
//!
//! Must never: act on a request whose signature does not verify, answer
//! later than Slack's 3 seconds for a stored event (the turn runs after the
//! acknowledgement), run a retried event twice (the store dedups by
//! `event_id`), or put a token or the signing secret anywhere but the
//! Authorization header / HMAC key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use moat_chat::format::to_mrkdwn;
use moat_chat::slack::{
    parse_callback, Callback, Inbound as SlackInbound, InboundMessage, Verifier, WebApi,
};
use moat_policy::gateway::Platform;

use crate::agent::TurnOutcome;
use crate::approvals::{ApprovalPost, Decision};
use crate::artifacts::Artifact;
use crate::metrics::Verdict;
use crate::pipeline::Gateway;
use crate::platform::{
    answer_body, answer_parts, BoxFut, ChatPlatform, ConvRef, Inbound, CHANNEL_THREAD,
};

/// Where answers go: the thread, or the top level when the conversation is
/// the whole channel (`conversation = "channel"`).
fn reply_thread(conv: &ConvRef) -> Option<&str> {
    (conv.thread != CHANNEL_THREAD).then_some(conv.thread.as_str())
}

/// Slack's limit is 4,000 characters a message; leave room for formatting.
pub const CHUNK: usize = 3_900;
/// Messages one answer may take in a thread (about 47,000 characters).
pub const MAX_PARTS: usize = 12;
/// Largest callback body read.
const MAX_BODY: usize = 1024 * 1024;
/// The live status message is edited at most this often.
const STATUS_EVERY: Duration = Duration::from_secs(2);

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Turns a Slack message into the gateway's inbound message.
pub fn inbound(event_id: &str, event_time: i64, m: &InboundMessage, addressed: bool) -> Inbound {
    Inbound {
        platform: Platform::Slack,
        event_id: event_id.to_string(),
        channel: m.channel.clone(),
        thread: m.thread_root().to_string(),
        user: m.user.clone(),
        text: m.text.clone(),
        ts_ms: event_time.saturating_mul(1000),
        message_ref: Some(m.ts.clone()),
        addressed,
        attachments: Vec::new(),
    }
}

/// What the events endpoint needs.
#[derive(Clone)]
pub struct SlackIn {
    pub gw: Gateway,
    pub verifier: Arc<Verifier>,
    /// The bot's own user id (from `auth.test`), to ignore its own messages.
    pub bot_user: Option<String>,
}

/// Handles one callback body (from the Events API or a Socket Mode
/// envelope, already authenticated). Returns the body of the 200 answer.
pub async fn handle_callback(
    gw: &Gateway,
    bot_user: Option<&str>,
    body: &[u8],
) -> Result<String, (StatusCode, String)> {
    let cb = parse_callback(body, bot_user).map_err(|e| {
        gw.inner.metrics.event(Verdict::Invalid);
        (StatusCode::BAD_REQUEST, e.to_string())
    })?;
    match cb {
        Callback::UrlVerification { challenge } => Ok(challenge),
        Callback::Event(ev) => match &ev.inbound {
            SlackInbound::ChannelMessage(m) if !wanted_unmentioned(gw, &m.channel) => {
                tracing::debug!(event_id = %ev.event_id, "Slack channel message without a mention ignored");
                Ok(String::new())
            }
            SlackInbound::Mention(m)
            | SlackInbound::DirectMessage(m)
            | SlackInbound::ChannelMessage(m) => {
                let addressed = !matches!(ev.inbound, SlackInbound::ChannelMessage(_));
                gw.accept(inbound(&ev.event_id, ev.event_time, m, addressed))
                    .await
                    .map_err(|e| {
                        tracing::error!(error = %e, "a Slack event could not be stored");
                        // Not acknowledged: Slack retries it.
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "not stored; retry".to_string(),
                        )
                    })?;
                Ok(String::new())
            }
            SlackInbound::Ignored(why) => {
                tracing::debug!(event_id = %ev.event_id, reason = %why, "Slack event ignored");
                Ok(String::new())
            }
        },
        Callback::AppRateLimited { .. } => {
            tracing::warn!("Slack is dropping this app's events for a minute (app_rate_limited)");
            Ok(String::new())
        }
        Callback::Other { kind } => {
            tracing::debug!(kind = %kind, "Slack callback of an unknown type acknowledged");
            Ok(String::new())
        }
    }
}

/// Is a channel message without a mention worth storing? Only where it can
/// start a turn (`mention = "optional"`) or where the gateway keeps the whole
/// channel's history as the conversation (`conversation = "channel"`); a
/// thread's history is read from Slack at the turn.
fn wanted_unmentioned(gw: &Gateway, channel: &str) -> bool {
    use moat_policy::chat_keys::{Mention, Scope};
    gw.inner
        .cfg
        .channel(Platform::Slack, channel)
        .is_some_and(|c| {
            c.chat.mention == Mention::Optional
                || c.chat.scope(Platform::Slack, channel) == Scope::Channel
        })
}

async fn events(State(s): State<SlackIn>, headers: HeaderMap, body: Bytes) -> Response {
    if body.len() > MAX_BODY {
        s.gw.inner.metrics.event(Verdict::Invalid);
        return (StatusCode::PAYLOAD_TOO_LARGE, "body too large").into_response();
    }
    // The signature first: nothing of an unsigned body is read.
    if let Err(e) = s.verifier.verify(&headers, &body, now_secs()) {
        s.gw.inner.metrics.event(Verdict::Forged);
        tracing::debug!(error = %e, "Slack request refused");
        return (StatusCode::UNAUTHORIZED, "invalid signature").into_response();
    }
    match handle_callback(&s.gw, s.bot_user.as_deref(), &body).await {
        Ok(text) if text.is_empty() => StatusCode::OK.into_response(),
        Ok(challenge) => (
            StatusCode::OK,
            [(axum::http::header::CONTENT_TYPE, "text/plain")],
            challenge,
        )
            .into_response(),
        Err((status, msg)) => (status, msg).into_response(),
    }
}

/// The `POST /slack/events` and `POST /slack/interactions` routes.
pub fn router(s: SlackIn) -> Router {
    Router::new()
        .route("/slack/events", post(events))
        .route(
            "/slack/interactions",
            post(crate::slack_approvals::interactions),
        )
        .with_state(s)
}

/// Posts turns to Slack threads.
pub struct SlackReplier {
    pub api: WebApi,
    /// Per conversation: the live status message and when it was last edited.
    status: Mutex<HashMap<i64, (String, Instant)>>,
    /// Per conversation: the newest message `ts` a turn has already seen.
    seen: Mutex<HashMap<i64, String>>,
}

/// Slack `ts` values ("1700000000.000100") compare as numbers.
fn ts_key(ts: &str) -> (u64, u64) {
    let (a, b) = ts.split_once('.').unwrap_or((ts, "0"));
    (a.parse().unwrap_or(0), b.parse().unwrap_or(0))
}

impl SlackReplier {
    pub fn new(api: WebApi) -> SlackReplier {
        SlackReplier {
            api,
            status: Mutex::new(HashMap::new()),
            seen: Mutex::new(HashMap::new()),
        }
    }

    fn log<T>(what: &str, r: Result<T, moat_chat::slack::WebApiError>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::warn!(call = what, error = %e, "Slack call failed");
                None
            }
        }
    }
}

impl ChatPlatform for SlackReplier {
    fn history<'a>(
        &'a self,
        conv: &'a ConvRef,
        refs: &'a [String],
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<Vec<String>>> + Send + 'a>> {
        Box::pin(async move {
            if conv.thread == CHANNEL_THREAD {
                // The whole channel is the conversation: the gateway stored
                // what was said there since the last turn.
                return None;
            }
            let since = self.seen.lock().ok().and_then(|s| s.get(&conv.id).cloned());
            let newest = refs.iter().max_by_key(|t| ts_key(t)).cloned();
            if let (Some(n), Ok(mut s)) = (newest, self.seen.lock()) {
                s.insert(conv.id, n);
            }
            let msgs = match self
                .api
                .conversations_replies(&conv.channel, &conv.thread, since.as_deref())
                .await
            {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "conversations.replies failed; the turn gets the stored history only");
                    return None;
                }
            };
            let since_key = since.as_deref().map(ts_key);
            Some(
                msgs.into_iter()
                    .filter(|m| since_key.is_none_or(|k| ts_key(&m.ts) > k))
                    .filter(|m| !refs.contains(&m.ts) && m.bot_id.is_none() && m.subtype.is_none())
                    .map(|m| format!("{}: {}", m.user.unwrap_or_default(), m.text))
                    .collect(),
            )
        })
    }

    fn notice<'a>(&'a self, conv: &'a ConvRef, text: &'a str) -> BoxFut<'a> {
        Box::pin(async move {
            let r = self
                .api
                .post_message(&conv.channel, reply_thread(conv), &to_mrkdwn(text))
                .await;
            Self::log("chat.postMessage", r);
        })
    }

    fn approval<'a>(
        &'a self,
        conv: &'a ConvRef,
        req: &'a ApprovalPost,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<String>> + Send + 'a>> {
        Box::pin(crate::slack_approvals::post_request(&self.api, conv, req))
    }

    fn approval_decided<'a>(
        &'a self,
        conv: &'a ConvRef,
        req: &'a ApprovalPost,
        asked: Option<&'a str>,
        d: &'a Decision,
    ) -> BoxFut<'a> {
        Box::pin(crate::slack_approvals::post_decision(
            &self.api, conv, req, asked, d,
        ))
    }

    fn started<'a>(&'a self, conv: &'a ConvRef, refs: &'a [String]) -> BoxFut<'a> {
        Box::pin(async move {
            for ts in refs {
                Self::log(
                    "reactions.add",
                    self.api.add_reaction(&conv.channel, ts, "eyes").await,
                );
            }
            let posted = self
                .api
                .post_message(&conv.channel, reply_thread(conv), "_working…_")
                .await;
            if let Some(ts) = Self::log("chat.postMessage", posted) {
                if let Ok(mut s) = self.status.lock() {
                    s.insert(conv.id, (ts, Instant::now()));
                }
            }
        })
    }

    fn progress<'a>(&'a self, conv: &'a ConvRef, status: &'a str) -> BoxFut<'a> {
        Box::pin(async move {
            let due = self.status.lock().ok().and_then(|mut s| {
                let e = s.get_mut(&conv.id)?;
                if e.1.elapsed() < STATUS_EVERY {
                    return None;
                }
                e.1 = Instant::now();
                Some(e.0.clone())
            });
            if let Some(ts) = due {
                // The status is the agent's (tool names and inputs): escaped,
                // so it cannot mention anyone or hide a link.
                let text = format!("_{}_", moat_chat::format::escape(&status.replace('_', " ")));
                Self::log(
                    "chat.update",
                    self.api.update_message(&conv.channel, &ts, &text).await,
                );
            }
        })
    }

    fn artifacts<'a>(
        &'a self,
        conv: &'a ConvRef,
        _refs: &'a [String],
        files: &'a [Artifact],
    ) -> BoxFut<'a> {
        Box::pin(async move {
            // One at a time, in name order: the thread shows them in that order.
            for f in files {
                let r = self
                    .api
                    .upload_file(
                        &conv.channel,
                        reply_thread(conv),
                        &f.name,
                        f.bytes.clone(),
                        Some(&f.name),
                    )
                    .await;
                if let Err(e) = r {
                    tracing::warn!(conversation = conv.id, file = %f.name, error = %e, "an artifact could not be uploaded to Slack");
                    let text = format!(
                        "moat could not upload `{}` to Slack: {e}",
                        f.name.replace('`', "'")
                    );
                    Self::log(
                        "chat.postMessage",
                        self.api
                            .post_message(&conv.channel, reply_thread(conv), &to_mrkdwn(&text))
                            .await,
                    );
                }
            }
        })
    }

    fn finished<'a>(
        &'a self,
        conv: &'a ConvRef,
        refs: &'a [String],
        outcome: &'a TurnOutcome,
    ) -> BoxFut<'a> {
        Box::pin(self.finish(conv, refs, outcome, None, Vec::new()))
    }

    fn deliver<'a>(
        &'a self,
        conv: &'a ConvRef,
        refs: &'a [String],
        outcome: &'a TurnOutcome,
        turn: i64,
    ) -> BoxFut<'a> {
        Box::pin(self.finish(conv, refs, outcome, Some(turn), Vec::new()))
    }

    fn redeliver<'a>(
        &'a self,
        conv: &'a ConvRef,
        refs: &'a [String],
        outcome: &'a TurnOutcome,
        turn: i64,
    ) -> BoxFut<'a> {
        Box::pin(async move {
            // The parts of this answer already in the thread (posted before
            // the restart) are not posted again; reactions are idempotent.
            let posted = match reply_thread(conv) {
                Some(thread) => match self
                    .api
                    .conversations_replies(&conv.channel, thread, None)
                    .await
                {
                    Ok(msgs) => msgs
                        .iter()
                        .filter(|m| m.bot_id.is_some())
                        .filter_map(|m| answer_mark(m.metadata.as_ref()?))
                        .filter(|(t, _)| *t == turn)
                        .map(|(_, part)| part)
                        .collect(),
                    Err(e) => {
                        Self::log("conversations.replies", Err::<(), _>(e));
                        Vec::new()
                    }
                },
                None => Vec::new(),
            };
            self.finish(conv, refs, outcome, Some(turn), posted).await
        })
    }
}

/// Slack message metadata marking part `part` of turn `turn`'s answer.
fn mark(turn: i64, part: usize, parts: usize) -> serde_json::Value {
    serde_json::json!({
        "event_type": "moat_answer",
        "event_payload": {"turn": turn, "part": part, "parts": parts},
    })
}

/// The turn and part a message's metadata marks, if it is moat's mark.
fn answer_mark(m: &serde_json::Value) -> Option<(i64, usize)> {
    if m.get("event_type")?.as_str()? != "moat_answer" {
        return None;
    }
    let p = m.get("event_payload")?;
    Some((p.get("turn")?.as_i64()?, p.get("part")?.as_u64()? as usize))
}

impl SlackReplier {
    /// Posts the answer's parts (those not in `posted`), each marked with
    /// the turn when there is one, then settles the status message and the
    /// reactions.
    async fn finish(
        &self,
        conv: &ConvRef,
        refs: &[String],
        outcome: &TurnOutcome,
        turn: Option<i64>,
        posted: Vec<usize>,
    ) {
        {
            // Command output is shown as it is, in a code block; an agent's
            // answer is Markdown, converted to mrkdwn. A thread is not a
            // file: at most MAX_PARTS messages per answer.
            let parts = answer_parts(
                &to_mrkdwn(&answer_body(outcome)),
                CHUNK,
                MAX_PARTS,
                |left| {
                    format!("_(the answer goes on for {left} more characters; ask the agent to put long output in ~/artifacts, which is sent as a file)_")
                },
            );
            let n = parts.len();
            for (i, part) in parts.into_iter().enumerate() {
                if posted.contains(&i) {
                    continue;
                }
                let meta = turn.map(|t| mark(t, i, n));
                Self::log(
                    "chat.postMessage",
                    self.api
                        .post_message_with(&conv.channel, reply_thread(conv), &part, meta.as_ref())
                        .await,
                );
            }
            let status_ts = self.status.lock().ok().and_then(|mut s| s.remove(&conv.id));
            if let Some((ts, _)) = status_ts {
                let text = if outcome.cancelled {
                    "_stopped_"
                } else if outcome.ok {
                    "_done_"
                } else {
                    "_failed_"
                };
                Self::log(
                    "chat.update",
                    self.api.update_message(&conv.channel, &ts, text).await,
                );
            }
            let mark = if outcome.ok { "white_check_mark" } else { "x" };
            for ts in refs {
                Self::log(
                    "reactions.remove",
                    self.api.remove_reaction(&conv.channel, ts, "eyes").await,
                );
                Self::log(
                    "reactions.add",
                    self.api.add_reaction(&conv.channel, ts, mark).await,
                );
            }
        }
    }
}
