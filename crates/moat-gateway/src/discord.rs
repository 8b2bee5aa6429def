//! Discord in and out: the Gateway (a WebSocket moat opens with
//! `DISCORD_BOT_TOKEN`; no inbound address, nothing to forge) and the
//! platform side of a turn: 👀 on the message and "typing…" while it runs,
//! the answer in messages of at most 2,000 characters that can notify
//! nobody, ✅/❌ at the end, artifacts uploaded as attachments.
//!
//! A guild text channel is a channel (`[[channel]] platform = "discord"
//! id = CHANNEL_ID`); a thread in it is a conversation of that channel (its
//! thread id the conversation's thread), the channel's own messages one
//! conversation. Direct messages are the channel `id = "dm"` (their channel
//! ids are not known in advance), each direct message channel its thread
//! (a conversation, where answers go). Messages are
//! deduplicated by their snowflake id, so an event Discord replays after a
//! resume is answered once.
//!
//! Approval buttons and their clicks are `discord_approvals.rs`.
//!
//! Must never: store chatter of a channel no `[[channel]]` names (only
//! messages addressed to the bot there are stored, to be refused and
//! audited), answer a message kind moat cannot read more than once per
//! channel, or put the bot token in a log or an error.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moat_chat::discord::format::{fit, to_discord, DISCORD_CHUNK};
use moat_chat::discord::gateway::{self, Dispatch, GatewayParams};
use moat_chat::discord::{
    is_thread, parse_message, BotUser, ChannelInfo, DcMessage, DiscordError, Incoming, RestApi,
};
use moat_creds::Secret;
use moat_policy::gateway::{Platform, DISCORD_DMS};
use moat_policy::platforms::DiscordConfig;

use crate::agent::TurnOutcome;
use crate::approvals::{ApprovalPost, Decision};
use crate::artifacts::Artifact;
use crate::metrics::Verdict;
use crate::pipeline::Gateway;
use crate::platform::{
    answer_body, answer_parts, Attachment, BoxFut, ChatPlatform, ConvRef, Inbound,
};
use crate::server::ServeError;

/// Messages one answer may take.
pub const MAX_PARTS: usize = 10;
/// "typing…" lasts ten seconds; it is renewed at most this often.
const TYPING_EVERY: Duration = Duration::from_secs(8);
/// What a sticker or poll gets, once per channel.
pub const UNSUPPORTED: &str = "I can only read text and files here.";
/// The longest wait for `GET /channels/{id}` (a thread not announced on
/// the Gateway).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Channels whose kind is remembered.
const MAX_KNOWN: usize = 50_000;

/// A connected Discord bot.
#[derive(Clone)]
pub struct Discord {
    pub out: Arc<DiscordOut>,
    pub bot: BotUser,
    params: GatewayParams,
    /// Channel id -> its parent when it is a thread (`None`: not a thread).
    known: Arc<Mutex<HashMap<String, Option<String>>>>,
}

/// Connects when `discord.enabled`: `GET /users/@me` checks the token, so a
/// wrong one stops moat at start with Discord's reason.
pub async fn connect(
    cfg: &DiscordConfig,
    secret: &(dyn Fn(&str) -> Option<String> + Sync),
) -> Result<Option<Discord>, ServeError> {
    if !cfg.enabled {
        return Ok(None);
    }
    let token = match secret("DISCORD_BOT_TOKEN") {
        Some(v) if !v.trim().is_empty() => Secret::new(v.trim().to_string()),
        _ => return Err(ServeError::Config(
            "discord.enabled = true needs DISCORD_BOT_TOKEN in moat's environment or secrets file"
                .into(),
        )),
    };
    // The configuration allows http:// and ws:// only for a loopback host.
    let api = RestApi::new(
        &cfg.api_url,
        cfg.api_url.starts_with("http://"),
        token.clone(),
    )
    .map_err(|e| ServeError::Config(e.to_string()))?;
    let bot = api.me().await.map_err(|e| {
        ServeError::Config(format!(
            "Discord refused DISCORD_BOT_TOKEN (GET /users/@me): {e}"
        ))
    })?;
    tracing::info!(bot = %bot.username, "connected to Discord");
    let params = GatewayParams {
        url: cfg.gateway_url.clone(),
        allow_plain: cfg.gateway_url.starts_with("ws://"),
        token,
        tls: api.tls().clone(),
    };
    Ok(Some(Discord {
        out: Arc::new(DiscordOut::new(api)),
        bot,
        params,
        known: Arc::new(Mutex::new(HashMap::new())),
    }))
}

/// A dispatch could not be stored: the Gateway resumes and gets it again.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotStored(String);

impl Discord {
    /// The Gateway connection, until `stop`.
    pub fn gateway(
        &self,
        gw: &Gateway,
        stop: impl Future<Output = ()> + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let (dc, gw) = (self.clone(), gw.clone());
        tokio::spawn(async move {
            let params = dc.params.clone();
            let handler = |d: Dispatch| {
                let (dc, gw) = (dc.clone(), gw.clone());
                async move { dc.dispatch(&gw, d).await }
            };
            if let Err(e) = gateway::run(params, handler, stop).await {
                tracing::error!(error = %e, "the Discord Gateway stopped; Discord messages are not received");
            }
        })
    }

    fn remember(&self, id: &str, parent: Option<String>) {
        if let Ok(mut k) = self.known.lock() {
            if k.len() >= MAX_KNOWN {
                k.clear();
            }
            k.insert(id.to_string(), parent);
        }
    }

    fn remember_channel(&self, c: &serde_json::Value) {
        if let Ok(c) = serde_json::from_value::<ChannelInfo>(c.clone()) {
            let parent = if is_thread(c.kind) { c.parent_id } else { None };
            self.remember(&c.id, parent);
        }
    }

    /// One dispatch from the Gateway.
    async fn dispatch(&self, gw: &Gateway, d: Dispatch) -> Result<(), NotStored> {
        match d.kind.as_str() {
            "GUILD_CREATE" => {
                for key in ["channels", "threads"] {
                    if let Some(list) = d.data.get(key).and_then(|v| v.as_array()) {
                        for c in list {
                            self.remember_channel(c);
                        }
                    }
                }
                Ok(())
            }
            "THREAD_CREATE" | "THREAD_UPDATE" | "CHANNEL_CREATE" | "CHANNEL_UPDATE" => {
                self.remember_channel(&d.data);
                Ok(())
            }
            "THREAD_LIST_SYNC" => {
                if let Some(list) = d.data.get("threads").and_then(|v| v.as_array()) {
                    for c in list {
                        self.remember_channel(c);
                    }
                }
                Ok(())
            }
            "MESSAGE_CREATE" => self.message(gw, &d.data).await,
            "INTERACTION_CREATE" => {
                crate::discord_approvals::click(&self.out.api, gw, &d.data).await;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// The channel and thread of a message: `dm` and the direct message
    /// channel, or for a guild message, a thread's parent is the
    /// channel. Unknown channels are looked up once; when that fails the
    /// message is taken as the channel's own (a thread's parent is then not
    /// found, and the message is refused rather than misplaced).
    async fn place(&self, m: &DcMessage) -> (String, String) {
        if m.guild_id.is_none() {
            return (DISCORD_DMS.to_string(), m.channel_id.clone());
        }
        let cached = self
            .known
            .lock()
            .ok()
            .and_then(|k| k.get(&m.channel_id).cloned());
        let parent = match cached {
            Some(p) => p,
            // Bounded: the Gateway's heartbeat waits while this runs.
            None => match tokio::time::timeout(LOOKUP_TIMEOUT, self.out.api.channel(&m.channel_id))
                .await
            {
                Ok(Ok(c)) => {
                    let p = if is_thread(c.kind) { c.parent_id } else { None };
                    self.remember(&m.channel_id, p.clone());
                    p
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "a Discord channel could not be looked up");
                    None
                }
                Err(_) => {
                    tracing::warn!("looking up a Discord channel timed out");
                    None
                }
            },
        };
        match parent {
            Some(p) => (p, m.channel_id.clone()),
            None => (m.channel_id.clone(), String::new()),
        }
    }

    async fn message(&self, gw: &Gateway, d: &serde_json::Value) -> Result<(), NotStored> {
        let incoming = match parse_message(d, &self.bot.id) {
            Ok(i) => i,
            Err(e) => {
                gw.inner.metrics.event(Verdict::Invalid);
                tracing::warn!(error = %e, "a Discord dispatch was not a message; ignored");
                return Ok(());
            }
        };
        let m = match incoming {
            Incoming::Ignored(why) => {
                tracing::debug!(reason = why, "Discord message ignored");
                return Ok(());
            }
            Incoming::Unsupported(m) => {
                self.unsupported(gw, &m).await;
                return Ok(());
            }
            Incoming::Message(m) => m,
        };
        let (channel, thread) = self.place(&m).await;
        // Chatter in channels moat does not serve is not stored; a message
        // addressed to the bot there is, to be refused and audited.
        if !m.addressed && gw.inner.cfg.channel(Platform::Discord, &channel).is_none() {
            return Ok(());
        }
        let inbound = Inbound {
            platform: Platform::Discord,
            event_id: format!("discord:{}", m.id),
            channel,
            thread,
            user: m.user_id.clone(),
            text: m.text.clone(),
            ts_ms: m.ts_ms,
            message_ref: Some(m.id.clone()),
            addressed: m.addressed,
            attachments: m
                .attachments
                .iter()
                .map(|(name, bytes)| Attachment {
                    name: name.clone(),
                    bytes: *bytes,
                })
                .collect(),
        };
        match gw.accept(inbound).await {
            Ok(_) => Ok(()),
            Err(e) => {
                tracing::error!(error = %e, "a Discord message could not be stored");
                Err(NotStored(e.to_string()))
            }
        }
    }

    /// A sticker or poll addressed to the bot by someone who may talk here:
    /// told once per channel what moat reads.
    async fn unsupported(&self, gw: &Gateway, m: &DcMessage) {
        let (channel, _) = self.place(m).await;
        if !m.addressed
            || !gw
                .authorize(Platform::Discord, &channel, &m.user_id)
                .is_allowed()
        {
            return;
        }
        let first = self
            .out
            .told_unsupported
            .lock()
            .map(|mut t| t.insert(m.channel_id.clone()))
            .unwrap_or(false);
        if first {
            let r = self
                .out
                .api
                .send_message(&m.channel_id, UNSUPPORTED, Some(&m.id))
                .await;
            DiscordOut::log("send a message", r);
        }
    }
}

/// The Discord channel a conversation's messages go to: its thread, else
/// the channel.
fn target(conv: &ConvRef) -> &str {
    if conv.thread.is_empty() {
        &conv.channel
    } else {
        &conv.thread
    }
}

/// Posts turns to Discord channels.
pub struct DiscordOut {
    pub api: RestApi,
    typing: Mutex<HashMap<i64, Instant>>,
    told_unsupported: Mutex<HashSet<String>>,
}

impl DiscordOut {
    pub fn new(api: RestApi) -> DiscordOut {
        DiscordOut {
            api,
            typing: Mutex::new(HashMap::new()),
            told_unsupported: Mutex::new(HashSet::new()),
        }
    }

    pub(crate) fn log<T>(what: &str, r: Result<T, DiscordError>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::warn!(call = what, error = %e, "Discord call failed");
                None
            }
        }
    }

    async fn send(&self, conv: &ConvRef, content: &str, reply_to: Option<&str>) {
        Self::log(
            "send a message",
            self.api.send_message(target(conv), content, reply_to).await,
        );
    }

    /// The answer, as messages; with `turn`, each carries the nonce
    /// `t{turn}m{n}`, so delivering the same kept answer again within
    /// Discord's nonce window (a restart) posts nothing twice.
    async fn answer(
        &self,
        conv: &ConvRef,
        refs: &[String],
        outcome: &TurnOutcome,
        turn: Option<i64>,
    ) {
        // Split as Markdown (code blocks closed and reopened), then each
        // piece made safe.
        let parts = answer_parts(&answer_body(outcome), DISCORD_CHUNK, MAX_PARTS, |left| {
            format!("(the answer goes on for {left} more characters; ask the agent to put long output in ~/artifacts, which is sent as a file)")
        });
        // The first part replies to the last message of the turn: in a busy
        // channel it shows what is answered.
        let mut reply_to = refs.last().map(String::as_str);
        let mut n = 0;
        for part in parts {
            for msg in fit(&part) {
                let nonce = turn.map(|t| format!("t{t}m{n}"));
                n += 1;
                let r = self
                    .api
                    .send_message_once(target(conv), &msg, reply_to.take(), nonce.as_deref())
                    .await;
                Self::log("send a message", r);
            }
        }
        if let Ok(mut t) = self.typing.lock() {
            t.remove(&conv.id);
        }
        // Reactions are idempotent: the bot's own reaction is there or not.
        self.react(conv, refs, "👀", false).await;
        self.react(conv, refs, if outcome.ok { "✅" } else { "❌" }, true)
            .await;
    }

    async fn react(&self, conv: &ConvRef, refs: &[String], emoji: &str, add: bool) {
        for r in refs {
            Self::log("react", self.api.react(target(conv), r, emoji, add).await);
        }
    }
}

impl ChatPlatform for DiscordOut {
    fn notice<'a>(&'a self, conv: &'a ConvRef, text: &'a str) -> BoxFut<'a> {
        Box::pin(async move {
            let t = format!("*{}*", to_discord(text).replace('*', "\\*"));
            self.send(conv, &t, None).await
        })
    }

    fn approval<'a>(
        &'a self,
        conv: &'a ConvRef,
        req: &'a ApprovalPost,
    ) -> std::pin::Pin<Box<dyn Future<Output = Option<String>> + Send + 'a>> {
        Box::pin(crate::discord_approvals::post_request(
            &self.api,
            target(conv),
            req,
        ))
    }

    fn approval_decided<'a>(
        &'a self,
        conv: &'a ConvRef,
        req: &'a ApprovalPost,
        asked: Option<&'a str>,
        d: &'a Decision,
    ) -> BoxFut<'a> {
        Box::pin(crate::discord_approvals::post_decision(
            &self.api,
            target(conv),
            req,
            asked,
            d,
        ))
    }

    fn started<'a>(&'a self, conv: &'a ConvRef, refs: &'a [String]) -> BoxFut<'a> {
        Box::pin(async move {
            self.react(conv, refs, "👀", true).await;
            if let Ok(mut t) = self.typing.lock() {
                t.insert(conv.id, Instant::now());
            }
            Self::log("typing", self.api.typing(target(conv)).await);
        })
    }

    fn progress<'a>(&'a self, conv: &'a ConvRef, _status: &'a str) -> BoxFut<'a> {
        Box::pin(async move {
            let due = self.typing.lock().ok().is_some_and(|mut t| {
                let e = t.entry(conv.id).or_insert_with(Instant::now);
                if e.elapsed() < TYPING_EVERY {
                    return false;
                }
                *e = Instant::now();
                true
            });
            if due {
                Self::log("typing", self.api.typing(target(conv)).await);
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
            for f in files {
                let r = self
                    .api
                    .upload(target(conv), &f.name, f.bytes.clone())
                    .await;
                if let Err(e) = r {
                    tracing::warn!(conversation = conv.id, file = %f.name, error = %e, "an artifact could not be sent to Discord");
                    let text = format!("moat could not send {} to Discord: {e}", f.name);
                    self.notice(conv, &text).await;
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
        Box::pin(self.answer(conv, refs, outcome, None))
    }

    fn deliver<'a>(
        &'a self,
        conv: &'a ConvRef,
        refs: &'a [String],
        outcome: &'a TurnOutcome,
        turn: i64,
    ) -> BoxFut<'a> {
        Box::pin(self.answer(conv, refs, outcome, Some(turn)))
    }
}
