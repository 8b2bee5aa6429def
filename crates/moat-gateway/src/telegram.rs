//! Telegram in and out: the webhook (`POST /telegram/webhook`, the secret
//! token header checked in constant time before the body is read) or
//! `getUpdates` long polling, and the platform side of a turn: 👀 on the
//! message and "typing…" while it runs, the answer as Telegram HTML in
//! messages of at most 4,096 characters, 👍/👎 at the end, artifacts as
//! documents.
//!
//! A chat is a channel (`[[channel]] platform = "telegram" id = CHAT_ID`); a
//! forum topic is a conversation's thread, elsewhere the chat is one
//! conversation. Updates are deduplicated by their `update_id`.
//!
//! Must never: read a webhook body whose secret token does not match, move
//! the polling offset past an update that is not stored, answer a message
//! kind moat cannot read more than once per chat, or put the bot token in a
//! log or an error.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use moat_chat::telegram::format::{escape, to_html, TELEGRAM_CHUNK};
use moat_chat::telegram::{
    parse_update, secret_matches, BotApi, BotIdentity, Incoming, TgMessage, SECRET_HEADER,
};
use moat_creds::Secret;
use moat_policy::gateway::Platform;
use moat_policy::platforms::{TelegramConfig, TelegramMode};

use crate::agent::TurnOutcome;
use crate::artifacts::Artifact;
use crate::metrics::Verdict;
use crate::pipeline::Gateway;
use crate::platform::{
    answer_body, answer_parts, Attachment, BoxFut, ChatPlatform, ConvRef, Inbound,
};
use crate::server::ServeError;

/// Messages one answer may take.
pub const MAX_PARTS: usize = 12;
/// Largest webhook body read.
const MAX_BODY: usize = 1024 * 1024;
/// "typing…" lasts five seconds; it is renewed at most this often.
const TYPING_EVERY: Duration = Duration::from_secs(4);
/// A message older than this is stale (Telegram keeps updates for 24 h).
const STALE_SECS: i64 = 25 * 3600;
/// `getUpdates` waits this long for an update.
const POLL_WAIT: Duration = Duration::from_secs(25);
/// What a sticker, poll, voice note... gets, once per chat.
pub const UNSUPPORTED: &str = "I can only read text and files here.";

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The chat and topic of a conversation.
fn target(conv: &ConvRef) -> Option<(i64, Option<i64>)> {
    let chat = conv.channel.parse().ok()?;
    Some((chat, conv.thread.parse().ok()))
}

/// A connected Telegram bot.
#[derive(Clone)]
pub struct Telegram {
    pub mode: TelegramMode,
    pub out: Arc<TelegramOut>,
    pub bot: BotIdentity,
    secret: Option<Arc<Secret>>,
}

fn need(
    secret: &dyn Fn(&str) -> Option<String>,
    var: &str,
    mode: &str,
) -> Result<Secret, ServeError> {
    match secret(var) {
        Some(v) if !v.trim().is_empty() => Ok(Secret::new(v.trim().to_string())),
        _ => Err(ServeError::Config(format!(
            "telegram.mode = \"{mode}\" needs {var} in moat's environment or secrets file"
        ))),
    }
}

/// Connects when `telegram.mode` is not `off`: `getMe` checks the token, so
/// a wrong one stops moat at start with Telegram's reason.
pub async fn connect(
    cfg: &TelegramConfig,
    secret: &(dyn Fn(&str) -> Option<String> + Sync),
) -> Result<Option<Telegram>, ServeError> {
    if cfg.mode == TelegramMode::Off {
        return Ok(None);
    }
    let mode = cfg.mode.name();
    let token = need(secret, "TELEGRAM_BOT_TOKEN", mode)?;
    let hook_secret = match cfg.mode {
        TelegramMode::Webhook => Some(Arc::new(need(secret, "TELEGRAM_WEBHOOK_SECRET", mode)?)),
        _ => None,
    };
    // The configuration allows http:// only for a loopback host (tests).
    let api = BotApi::new(&cfg.api_url, cfg.api_url.starts_with("http://"), token)
        .map_err(|e| ServeError::Config(e.to_string()))?;
    let bot = api.get_me().await.map_err(|e| {
        ServeError::Config(format!("Telegram refused TELEGRAM_BOT_TOKEN (getMe): {e}"))
    })?;
    if cfg.mode == TelegramMode::Polling {
        api.delete_webhook()
            .await
            .map_err(|e| ServeError::Config(format!("Telegram deleteWebhook: {e}")))?;
    }
    tracing::info!(bot = %bot.username, mode, "connected to Telegram");
    Ok(Some(Telegram {
        mode: cfg.mode,
        out: Arc::new(TelegramOut::new(api)),
        bot,
        secret: hook_secret,
    }))
}

/// What one update became.
enum Handled {
    Done,
    /// Not stored: not acknowledged, Telegram (or the next poll) retries.
    Retry,
    Invalid(String),
}

impl Telegram {
    /// `POST /telegram/webhook`, in webhook mode.
    pub fn router(&self, gw: &Gateway) -> Option<Router> {
        self.secret.as_ref()?;
        Some(
            Router::new()
                .route("/telegram/webhook", post(webhook))
                .with_state((gw.clone(), self.clone())),
        )
    }

    /// `getUpdates` long polling, in polling mode: the offset moves past an
    /// update only once it is stored.
    pub fn polling(
        &self,
        gw: &Gateway,
        stop: impl Future<Output = ()> + Send + 'static,
    ) -> Option<tokio::task::JoinHandle<()>> {
        if self.mode != TelegramMode::Polling {
            return None;
        }
        let (tg, gw) = (self.clone(), gw.clone());
        Some(tokio::spawn(async move {
            tokio::pin!(stop);
            let mut offset = 0i64;
            loop {
                let got = tokio::select! {
                    _ = &mut stop => return,
                    r = tg.out.api.get_updates(offset, POLL_WAIT) => r,
                };
                let updates = match got {
                    Ok(u) => u,
                    Err(e) => {
                        tracing::warn!(error = %e, "Telegram getUpdates failed; retrying");
                        tokio::time::sleep(Duration::from_secs(2)).await;
                        continue;
                    }
                };
                for (id, raw) in updates {
                    if !raw.is_null() {
                        let body = raw.to_string();
                        if let Handled::Retry = tg.handle(&gw, body.as_bytes()).await {
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            break;
                        }
                    }
                    offset = offset.max(id + 1);
                }
            }
        }))
    }

    /// One update (a verified webhook body or a polled update).
    async fn handle(&self, gw: &Gateway, body: &[u8]) -> Handled {
        let incoming = match parse_update(body, &self.bot) {
            Ok(i) => i,
            Err(e) => {
                gw.inner.metrics.event(Verdict::Invalid);
                return Handled::Invalid(e.to_string());
            }
        };
        match incoming {
            Incoming::Ignored(why) => {
                tracing::debug!(reason = why, "Telegram update ignored");
                Handled::Done
            }
            Incoming::Message(m) if m.date < now_secs() - STALE_SECS => {
                tracing::info!(update = m.update_id, "a stale Telegram message ignored");
                Handled::Done
            }
            Incoming::Unsupported(m) => {
                self.unsupported(gw, &m).await;
                Handled::Done
            }
            Incoming::Message(m) => match gw.accept(self.inbound(&m)).await {
                Ok(_) => Handled::Done,
                Err(e) => {
                    tracing::error!(error = %e, "a Telegram update could not be stored");
                    Handled::Retry
                }
            },
        }
    }

    fn inbound(&self, m: &TgMessage) -> Inbound {
        Inbound {
            platform: Platform::Telegram,
            event_id: format!("telegram:{}:{}", self.bot.id, m.update_id),
            channel: m.chat_id.to_string(),
            thread: m.topic.map(|t| t.to_string()).unwrap_or_default(),
            user: m.user_id.to_string(),
            text: m.text.clone(),
            ts_ms: m.date.saturating_mul(1000),
            message_ref: Some(m.message_id.to_string()),
            addressed: m.addressed,
            attachments: m
                .document
                .iter()
                .map(|(name, bytes)| Attachment {
                    name: name.clone(),
                    bytes: *bytes,
                })
                .collect(),
        }
    }

    /// A sticker, poll, voice note... addressed to the bot by someone who
    /// may talk here: told once per chat what moat reads.
    async fn unsupported(&self, gw: &Gateway, m: &TgMessage) {
        let (chat, user) = (m.chat_id.to_string(), m.user_id.to_string());
        if !m.addressed || !gw.authorize(Platform::Telegram, &chat, &user).is_allowed() {
            return;
        }
        let first = self
            .out
            .told_unsupported
            .lock()
            .map(|mut t| t.insert(m.chat_id))
            .unwrap_or(false);
        if first {
            let r = self
                .out
                .api
                .send_message(m.chat_id, m.topic, &escape(UNSUPPORTED))
                .await;
            TelegramOut::log("sendMessage", r);
        }
    }
}

async fn webhook(
    State((gw, tg)): State<(Gateway, Telegram)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    // The secret first: nothing of a delivery without it is read.
    let given = headers
        .get(SECRET_HEADER)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    let ok = tg.secret.as_ref().is_some_and(|s| secret_matches(s, given));
    if !ok {
        gw.inner.metrics.event(Verdict::Forged);
        return (StatusCode::UNAUTHORIZED, "invalid secret token").into_response();
    }
    if body.len() > MAX_BODY {
        gw.inner.metrics.event(Verdict::Invalid);
        return (StatusCode::PAYLOAD_TOO_LARGE, "body too large").into_response();
    }
    match tg.handle(&gw, &body).await {
        Handled::Done => StatusCode::OK.into_response(),
        Handled::Retry => (StatusCode::SERVICE_UNAVAILABLE, "not stored; retry").into_response(),
        Handled::Invalid(e) => (StatusCode::BAD_REQUEST, e).into_response(),
    }
}

/// Posts turns to Telegram chats.
pub struct TelegramOut {
    pub api: BotApi,
    typing: Mutex<HashMap<i64, Instant>>,
    told_unsupported: Mutex<HashSet<i64>>,
}

impl TelegramOut {
    pub fn new(api: BotApi) -> TelegramOut {
        TelegramOut {
            api,
            typing: Mutex::new(HashMap::new()),
            told_unsupported: Mutex::new(HashSet::new()),
        }
    }

    fn log<T>(what: &str, r: Result<T, moat_chat::telegram::TelegramError>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::warn!(call = what, error = %e, "Telegram call failed");
                None
            }
        }
    }

    async fn send(&self, conv: &ConvRef, html: &str) {
        if let Some((chat, topic)) = target(conv) {
            Self::log(
                "sendMessage",
                self.api.send_message(chat, topic, html).await,
            );
        }
    }

    async fn react(&self, conv: &ConvRef, refs: &[String], emoji: &str) {
        let Some((chat, _)) = target(conv) else {
            return;
        };
        for r in refs {
            if let Ok(id) = r.parse() {
                Self::log(
                    "setMessageReaction",
                    self.api.set_reaction(chat, id, Some(emoji)).await,
                );
            }
        }
    }
}

impl ChatPlatform for TelegramOut {
    fn notice<'a>(&'a self, conv: &'a ConvRef, text: &'a str) -> BoxFut<'a> {
        Box::pin(async move { self.send(conv, &format!("<i>{}</i>", escape(text))).await })
    }

    fn started<'a>(&'a self, conv: &'a ConvRef, refs: &'a [String]) -> BoxFut<'a> {
        Box::pin(async move {
            self.react(conv, refs, "👀").await;
            if let Some((chat, topic)) = target(conv) {
                if let Ok(mut t) = self.typing.lock() {
                    t.insert(conv.id, Instant::now());
                }
                Self::log(
                    "sendChatAction",
                    self.api.send_chat_action(chat, topic).await,
                );
            }
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
            if let (true, Some((chat, topic))) = (due, target(conv)) {
                Self::log(
                    "sendChatAction",
                    self.api.send_chat_action(chat, topic).await,
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
            let Some((chat, topic)) = target(conv) else {
                return;
            };
            for f in files {
                let r = self
                    .api
                    .send_document(chat, topic, &f.name, f.bytes.clone())
                    .await;
                if let Err(e) = r {
                    tracing::warn!(conversation = conv.id, file = %f.name, error = %e, "an artifact could not be sent to Telegram");
                    let text = format!("moat could not send {} to Telegram: {e}", f.name);
                    self.send(conv, &format!("<i>{}</i>", escape(&text))).await;
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
        Box::pin(async move {
            // Split as Markdown, then each piece formatted: tags never cross
            // a message.
            let parts = answer_parts(&answer_body(outcome), TELEGRAM_CHUNK, MAX_PARTS, |left| {
                format!("(the answer goes on for {left} more characters; ask the agent to put long output in ~/artifacts, which is sent as a file)")
            });
            for part in parts {
                self.send(conv, &to_html(&part)).await;
            }
            if let Ok(mut t) = self.typing.lock() {
                t.remove(&conv.id);
            }
            self.react(conv, refs, if outcome.ok { "👍" } else { "👎" })
                .await;
        })
    }
}
