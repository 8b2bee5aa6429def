//! The web chat: a page and a small JSON + server-sent-events API over the
//! gateway, and the admin listener with `/metrics`.
//!
//! Identity: `loopback` (the default) accepts only connections from this
//! machine and calls the user `local`; `token` maps bearer tokens (from the
//! environment variable the config names, `user:token` pairs separated by
//! commas) to users; `header` takes the user from a header set by a trusted
//! reverse proxy, accepted only from the configured proxy addresses.
//! Artifacts the agent left are downloaded from
//! `/api/conversations/{thread}/artifacts/{id}` by the conversation's owner
//! only, always as an attachment of type `application/octet-stream` with
//! `nosniff` and a sandboxing CSP (an HTML artifact never runs on this origin).
//!
//! Every listener's routes sit behind `guard` (docs/threat-model.md W1): a request whose
//! `Host` is not the listener's own address (or a name in
//! `web.allowed_hosts`), or that comes from another site's page, is refused
//! before any route reads or queues anything.
//!
//! Must never: let one user read or write another user's conversation (or
//! download its artifacts), or accept a request whose identity it could not
//! establish.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use moat_policy::gateway::{Platform, WebAuth};
use serde::Deserialize;
use serde_json::json;

pub mod guard;
mod out;

pub use out::WebChat;

use crate::hub::ConvEvent;
use crate::pipeline::{Accepted, Gateway, Inbound};

const PAGE: &str = include_str!("web/index.html");

#[derive(Clone)]
struct Web {
    gw: Gateway,
    /// token → user, for `auth = "token"`.
    tokens: Arc<HashMap<String, String>>,
}

/// Why a web request has no identity.
fn unauthorized(msg: &str) -> Response {
    (StatusCode::UNAUTHORIZED, Json(json!({ "error": msg }))).into_response()
}

/// Reads `user:token,user:token` (the value of the variable `auth = "token"`
/// names). Errors name the problem, never a token.
pub fn parse_tokens(text: &str) -> Result<HashMap<String, String>, String> {
    let mut out = HashMap::new();
    for (i, pair) in text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .enumerate()
    {
        let Some((user, token)) = pair.split_once(':') else {
            return Err(format!("entry {} is not user:token", i + 1));
        };
        if user.is_empty() || token.len() < 16 {
            return Err(format!(
                "entry {} needs a user name and a token of at least 16 characters",
                i + 1
            ));
        }
        if out.insert(token.to_string(), user.to_string()).is_some() {
            return Err(format!("entry {} repeats a token", i + 1));
        }
    }
    if out.is_empty() {
        return Err("no user:token entries".into());
    }
    Ok(out)
}

impl Web {
    fn identify(&self, peer: SocketAddr, headers: &HeaderMap) -> Result<String, Box<Response>> {
        match &self.gw.inner.cfg.web.auth {
            WebAuth::Loopback => {
                if peer.ip().is_loopback() {
                    Ok("local".to_string())
                } else {
                    Err(Box::new(unauthorized(
                        "this web chat accepts connections from this machine only",
                    )))
                }
            }
            WebAuth::Token { .. } => {
                let presented = headers
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .map(str::trim);
                let Some(p) = presented else {
                    return Err(Box::new(unauthorized(
                        "send Authorization: Bearer <your token>",
                    )));
                };
                // Compare every token in constant time; no early exit on a match.
                let mut found = None;
                for (t, u) in self.tokens.iter() {
                    if moat_egress::llm::constant_time_eq(t.as_bytes(), p.as_bytes()) {
                        found = Some(u.clone());
                    }
                }
                found.ok_or_else(|| Box::new(unauthorized("unknown token")))
            }
            WebAuth::Header {
                header: name,
                trusted_proxies,
            } => {
                if !trusted_proxies.contains(&peer.ip()) {
                    return Err(Box::new(unauthorized(
                        "identity headers are accepted from the configured proxies only",
                    )));
                }
                headers
                    .get(name.as_str())
                    .and_then(|v| v.to_str().ok())
                    .map(str::trim)
                    .filter(|u| !u.is_empty() && u.len() <= 200)
                    .map(str::to_string)
                    .ok_or_else(|| Box::new(unauthorized("the identity header is missing")))
            }
        }
    }
}

#[derive(Deserialize)]
struct PostMessage {
    text: String,
    /// Makes a retried POST idempotent (the web's event id).
    #[serde(default)]
    client_id: Option<String>,
}

fn valid_thread(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 64
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn random_id() -> String {
    let mut b = [0u8; 12];
    let _ = getrandom::getrandom(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn me(
    State(w): State<Web>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    match w.identify(peer, &headers) {
        Ok(u) => Json(json!({ "user": u })).into_response(),
        Err(r) => *r,
    }
}

async fn list(
    State(w): State<Web>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    let user = match w.identify(peer, &headers) {
        Ok(u) => u,
        Err(r) => return *r,
    };
    match w.gw.inner.store.conversations_in("web", &user) {
        Ok(cs) => Json(json!({
            "conversations": cs.iter().map(|c| json!({"thread": c.thread, "id": c.id, "last_active_ms": c.last_active_ms})).collect::<Vec<_>>()
        }))
        .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({"error": e.to_string()}))).into_response(),
    }
}

async fn post_message(
    State(w): State<Web>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(thread): Path<String>,
    headers: HeaderMap,
    body: Result<Json<PostMessage>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let user = match w.identify(peer, &headers) {
        Ok(u) => u,
        Err(r) => return *r,
    };
    let Ok(Json(body)) = body else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "send JSON: {\"text\": \"...\"}"})),
        )
            .into_response();
    };
    if !valid_thread(&thread) {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "a conversation name is 1-64 letters, digits, - or _"})),
        )
            .into_response();
    }
    if body.text.trim().is_empty() || body.text.len() > 64 * 1024 {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "a message is 1 to 65536 bytes of text"})),
        )
            .into_response();
    }
    let event_id = match body.client_id {
        Some(c) if valid_thread(&c) => format!("{user}/{c}"),
        _ => format!("{user}/{}", random_id()),
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let inbound = Inbound {
        platform: Platform::Web,
        event_id,
        channel: user.clone(),
        thread,
        user,
        text: body.text,
        ts_ms: now,
        message_ref: None,
        addressed: true,
        attachments: Vec::new(),
    };
    match w.gw.accept(inbound).await {
        Ok(Accepted::Queued { message_id, conversation_id }) => (
            StatusCode::ACCEPTED,
            Json(json!({"status": "queued", "message_id": message_id, "conversation_id": conversation_id})),
        )
            .into_response(),
        Ok(Accepted::Context { message_id, conversation_id }) => (
            StatusCode::ACCEPTED,
            Json(json!({"status": "context", "message_id": message_id, "conversation_id": conversation_id})),
        )
            .into_response(),
        Ok(Accepted::Duplicate { message_id }) => {
            Json(json!({"status": "duplicate", "message_id": message_id})).into_response()
        }
        Ok(Accepted::Command { conversation_id }) => {
            Json(json!({"status": "command", "conversation_id": conversation_id})).into_response()
        }
        Ok(Accepted::Limited) => (
            StatusCode::TOO_MANY_REQUESTS,
            Json(json!({"status": "rate_limited", "error": "too many messages; wait a moment"})),
        )
            .into_response(),
        Ok(Accepted::Paused) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "paused", "error": crate::incident::PAUSED_TEXT})),
        )
            .into_response(),
        // Unauthorised senders learn nothing beyond "not accepted".
        Ok(Accepted::Dropped { .. }) => {
            (StatusCode::FORBIDDEN, Json(json!({"status": "not_accepted"}))).into_response()
        }
        Err(e) => {
            tracing::error!(error = %e, "a web message could not be taken");
            (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"error": "moat could not store the message; try again"}))).into_response()
        }
    }
}

async fn events(
    State(w): State<Web>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(thread): Path<String>,
    headers: HeaderMap,
) -> Response {
    let user = match w.identify(peer, &headers) {
        Ok(u) => u,
        Err(r) => return *r,
    };
    // Only the user's own conversation: looked up under their own channel.
    let conv = match w.gw.inner.store.conversation_by_key("web", &user, &thread) {
        Ok(Some(c)) => c,
        Ok(None) => {
            return (
                StatusCode::NOT_FOUND,
                Json(json!({"error": "no such conversation; send a message first"})),
            )
                .into_response()
        }
        Err(e) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({"error": e.to_string()})),
            )
                .into_response()
        }
    };
    // After a restart the transcript starts from the stored history.
    let store = w.gw.inner.store.clone();
    let (past, rx) =
        w.gw.inner
            .hub
            .subscribe_with(conv.id, || stored_history(&store, conv.id));
    let past = futures_util::stream::iter(past.into_iter().map(to_sse));
    let live = futures_util::stream::unfold(rx, |mut rx| async move {
        match rx.recv().await {
            Ok(ev) => Some((to_sse(ev), rx)),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                let ev = ConvEvent::Notice {
                    text: format!("(this view fell behind and skipped {n} updates)"),
                };
                Some((to_sse(ev), rx))
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => None,
        }
    });
    use futures_util::StreamExt;
    Sse::new(past.chain(live))
        .keep_alive(KeepAlive::default())
        .into_response()
}

#[derive(Deserialize)]
struct PostDecision {
    approve: bool,
}

/// `POST /api/approvals/{id}`: an admin's decision on a request shown in
/// their conversation (docs/approvals.md). The decider is the web identity;
/// moat-policy decides whether they may (an admin of the request's channel).
async fn decide(
    State(w): State<Web>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Json<PostDecision>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let user = match w.identify(peer, &headers) {
        Ok(u) => u,
        Err(r) => return *r,
    };
    let Ok(Json(body)) = body else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "send JSON: {\"approve\": true} or {\"approve\": false}"})),
        )
            .into_response();
    };
    match w
        .gw
        .decide_approval(&id, Platform::Web, &user, body.approve, "web")
    {
        Ok(o) => Json(json!({"status": o.name()})).into_response(),
        Err(why) => {
            use moat_policy::approvals::DecideRefusal;
            let status = match why {
                DecideRefusal::NotAdmin => StatusCode::FORBIDDEN,
                DecideRefusal::AlreadyDecided => StatusCode::CONFLICT,
                DecideRefusal::Unknown => StatusCode::NOT_FOUND,
            };
            (
                status,
                Json(json!({"error": why.message(), "reason": why.name()})),
            )
                .into_response()
        }
    }
}

/// One artifact of the user's own conversation, as a download.
async fn artifact(
    State(w): State<Web>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path((thread, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let user = match w.identify(peer, &headers) {
        Ok(u) => u,
        Err(r) => return *r,
    };
    let gone = || {
        (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "no such file here (moat keeps a web chat's files in memory for a while; ask the agent again)"})),
        )
            .into_response()
    };
    if !valid_thread(&thread) || !valid_thread(&id) {
        return gone();
    }
    // Only the user's own conversation: looked up under their own channel.
    let conv = match w.gw.inner.store.conversation_by_key("web", &user, &thread) {
        Ok(Some(c)) => c,
        Ok(None) => return gone(),
        Err(e) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({"error": e.to_string()})),
            )
                .into_response()
        }
    };
    let Some((name, bytes)) = w.gw.inner.hub.artifact(conv.id, &id) else {
        return gone();
    };
    (
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_DISPOSITION, attachment(&name)),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_string()),
            (
                header::CONTENT_SECURITY_POLICY,
                "sandbox; default-src 'none'".to_string(),
            ),
            (header::CACHE_CONTROL, "private, no-store".to_string()),
        ],
        bytes,
    )
        .into_response()
}

/// [`attachment`], for the fuzz target in `fuzz/` (docs/fuzzing.md).
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub fn attachment_for_fuzzing(name: &str) -> String {
    attachment(name)
}

/// `Content-Disposition: attachment` with the name in RFC 6266/5987 form
/// (percent-encoded UTF-8) and a plain ASCII fallback.
fn attachment(name: &str) -> String {
    let ascii: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ' ') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let encoded: String = name
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    format!("attachment; filename=\"{ascii}\"; filename*=UTF-8''{encoded}")
}

/// Messages and answers of a conversation kept in the store, oldest first.
fn stored_history(store: &moat_store::Store, conversation: i64) -> Vec<ConvEvent> {
    let said = store
        .recent_messages(conversation, HISTORY)
        .unwrap_or_else(|e| {
            tracing::warn!(conversation, error = %e, "the stored messages could not be read");
            Vec::new()
        });
    let answers = store
        .kept_answers(conversation, HISTORY)
        .unwrap_or_else(|e| {
            tracing::warn!(conversation, error = %e, "the kept answers could not be read");
            Vec::new()
        });
    let mut timed: Vec<(i64, u8, ConvEvent)> = said
        .into_iter()
        .map(|m| {
            (
                m.ts_ms,
                0,
                ConvEvent::Message {
                    user: m.user,
                    text: m.text,
                    id: Some(m.id),
                },
            )
        })
        .chain(answers.into_iter().map(|a| {
            (
                a.ended_ms,
                1,
                ConvEvent::Answer {
                    text: a.answer,
                    ok: a.state == moat_store::TurnState::Done,
                    turn: Some(a.turn_id),
                    verbatim: a.verbatim,
                },
            )
        }))
        .collect();
    timed.sort_by_key(|(t, k, _)| (*t, *k));
    timed.into_iter().map(|(_, _, e)| e).collect()
}

fn to_sse(ev: ConvEvent) -> Result<Event, Infallible> {
    Ok(Event::default()
        .json_data(&ev)
        .unwrap_or_else(|_| Event::default().data("{}")))
}

/// Messages, and answers, of the stored history a watcher is shown after a
/// restart.
const HISTORY: u32 = 100;

/// The web chat's routes.
pub fn router(gw: Gateway, tokens: HashMap<String, String>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/api/me", get(me))
        .route("/api/conversations", get(list))
        .route("/api/conversations/{thread}/messages", post(post_message))
        .route("/api/conversations/{thread}/events", get(events))
        .route("/api/conversations/{thread}/artifacts/{id}", get(artifact))
        .route("/api/approvals/{id}", post(decide))
        .with_state(Web {
            gw,
            tokens: Arc::new(tokens),
        })
}

async fn metrics(State(gw): State<Gateway>) -> Response {
    let g = gw.gauges().await;
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        gw.inner.metrics.render(g),
    )
        .into_response()
}

/// Readiness, for load balancers: 200 while the store answers, 503 when it
/// does not (a PostgreSQL that went away: send events to another node).
async fn healthz(State(gw): State<Gateway>) -> Response {
    let store = gw.inner.store.clone();
    match tokio::task::spawn_blocking(move || store.queue_depth()).await {
        Ok(Ok(_)) => "ok\n".into_response(),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "/healthz: the store does not answer");
            (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n").into_response()
        }
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "store check failed\n").into_response(),
    }
}

/// The admin routes: `/metrics`, `/healthz` (ready: the store answers) and
/// `/livez` (the process serves; a database outage must not get it
/// restarted).
pub fn admin_router(gw: Gateway) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/livez", get(|| async { "ok\n" }))
        .with_state(gw)
}
