//! Pull-request events back to the thread: `POST /github/webhook` (beside
//! the web chat), and the links that find a conversation: when a turn's door
//! saw a branch pushed or a pull request opened, the conversation is stored
//! against the repository and that branch or number.
//!
//! A delivery is checked in this order, each step refusing before the next
//! reads anything: size (413 over 25 MB), signature on the raw body
//! (`X-Hub-Signature-256`, constant time; 401), delivery id taken once
//! (a replay: 200, nothing twice), event parsed, repository configured for
//! some channel, conversation found from the stored links only. Whatever is
//! not told is answered 200 and audited with the reason.
//!
//! Must never: parse an unsigned body, find a conversation from text in the
//! event, or post anything for a repository no channel has.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use moat_chat::github::{parse, WebhookVerifier, MAX_BODY};
use moat_egress::github::GithubActivity;
use moat_policy::gateway::Platform;
use moat_store::GithubLink;
use serde_json::json;

use crate::pipeline::{ConvRef, Gateway};

/// What the webhook endpoint needs.
#[derive(Clone)]
pub struct Hooks {
    pub gw: Gateway,
    pub verifier: Arc<WebhookVerifier>,
    /// Refused deliveries audited at most once per [`FORGED_EVERY`]: when
    /// the last record was written, and how many were left out since.
    pub forged: Arc<std::sync::Mutex<(Option<std::time::Instant>, u64)>>,
}

impl Hooks {
    pub fn new(gw: Gateway, verifier: Arc<WebhookVerifier>) -> Hooks {
        Hooks {
            gw,
            verifier,
            forged: Arc::default(),
        }
    }
}

/// At most one `forged` audit record this often (unauthenticated requests
/// must not fill the disk); the next one says how many were left out.
const FORGED_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// The `POST /github/webhook` route.
pub fn router(h: Hooks) -> Router {
    Router::new()
        .route("/github/webhook", post(webhook))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(h)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A header value when it is short and printable.
fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 100 && v.bytes().all(|b| b.is_ascii_graphic()))
}

async fn webhook(State(h): State<Hooks>, headers: HeaderMap, body: Bytes) -> Response {
    let audit = |verdict: &str, extra: serde_json::Value| {
        let mut rec = json!({"verdict": verdict});
        if let (Some(o), Some(e)) = (rec.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        h.gw.audit("github-webhook", rec);
    };
    if body.len() > MAX_BODY {
        return (StatusCode::PAYLOAD_TOO_LARGE, "body too large").into_response();
    }
    let sig = headers.get("x-hub-signature-256").map(|v| v.as_bytes());
    if let Err(e) = h.verifier.verify(sig, &body) {
        let left_out = h.forged.lock().ok().and_then(|mut f| {
            let due = f.0.is_none_or(|t| t.elapsed() >= FORGED_EVERY);
            if due {
                let n = f.1;
                *f = (Some(std::time::Instant::now()), 0);
                Some(n)
            } else {
                f.1 += 1;
                None
            }
        });
        if let Some(n) = left_out {
            audit("forged", json!({"reason": e.to_string(), "left_out": n}));
        }
        return (StatusCode::UNAUTHORIZED, "invalid signature").into_response();
    }
    let Some(delivery) = header(&headers, "x-github-delivery") else {
        audit("invalid", json!({"reason": "no X-GitHub-Delivery header"}));
        return (StatusCode::BAD_REQUEST, "no X-GitHub-Delivery header").into_response();
    };
    let event = header(&headers, "x-github-event").unwrap_or("").to_string();
    // Taken once by its id and once by its body: the id is not signed, so
    // a captured delivery resent under a new id is still a replay.
    let store = h.gw.inner.store.clone();
    let id = delivery.to_string();
    let digest: String = ring::digest::digest(&ring::digest::SHA256, &body)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let first = tokio::task::spawn_blocking(move || {
        let by_id = store.take_github_delivery(&id, now_ms())?;
        let by_body = store.take_github_delivery(&format!("sha256:{digest}"), now_ms())?;
        Ok::<_, moat_store::StoreError>(by_id && by_body)
    })
    .await;
    match first {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => {
            audit("duplicate", json!({"delivery": delivery, "event": event}));
            return StatusCode::OK.into_response();
        }
        _ => {
            // Not taken: GitHub may deliver it again.
            return (StatusCode::SERVICE_UNAVAILABLE, "not stored; retry").into_response();
        }
    }
    let ev = match parse(&event, &body) {
        Ok(Some(ev)) => ev,
        Ok(None) => {
            audit(
                "ignored",
                json!({"delivery": delivery, "event": event, "reason": "an event moat does not tell"}),
            );
            return StatusCode::OK.into_response();
        }
        Err(e) => {
            audit(
                "invalid",
                json!({"delivery": delivery, "event": event, "reason": e.to_string()}),
            );
            return (StatusCode::BAD_REQUEST, e.to_string()).into_response();
        }
    };
    let configured = h.gw.inner.cfg.channels.iter().any(|c| {
        c.github.as_ref().is_some_and(|g| {
            g.full_names()
                .iter()
                .any(|r| r.eq_ignore_ascii_case(&ev.repo))
        })
    });
    if !configured {
        audit(
            "ignored",
            json!({"delivery": delivery, "event": event, "repo": ev.repo, "reason": "no channel has this repository"}),
        );
        return StatusCode::OK.into_response();
    }
    let conv =
        h.gw.inner
            .store
            .github_conversation(&ev.repo, ev.number, ev.branch.as_deref())
            .ok()
            .flatten()
            .and_then(|id| h.gw.inner.store.conversation(id).ok().flatten());
    let Some(conv) = conv else {
        audit(
            "ignored",
            json!({"delivery": delivery, "event": event, "repo": ev.repo, "pull_request": ev.number, "reason": "no conversation pushed this branch or opened this pull request"}),
        );
        return StatusCode::OK.into_response();
    };
    let Ok(platform) = Platform::parse(&conv.platform) else {
        // Every delivery not told is audited with its reason.
        audit(
            "ignored",
            json!({"delivery": delivery, "event": event, "conversation_id": conv.id, "reason": "the conversation's platform is no longer known"}),
        );
        return StatusCode::OK.into_response();
    };
    let cref = ConvRef {
        id: conv.id,
        platform,
        channel: conv.channel.clone(),
        thread: conv.thread.clone(),
    };
    h.gw.platform(platform).notice(&cref, &ev.line).await;
    audit(
        "delivered",
        json!({"delivery": delivery, "event": event, "repo": ev.repo, "pull_request": ev.number, "conversation_id": conv.id}),
    );
    if let Some((login, text)) = &ev.comment {
        comment_turn(&h.gw, &cref, delivery, login, text).await;
    }
    StatusCode::OK.into_response()
}

/// A pull-request comment that mentions the bot becomes a message of the
/// conversation, from the chat user the channel maps the login to; an
/// unmapped login is ignored and audited. The message then goes through the
/// same authorisation and limits as one typed in the chat.
async fn comment_turn(gw: &Gateway, conv: &ConvRef, delivery: &str, login: &str, text: &str) {
    let Some(bot) = gw.inner.cfg.github.bot.as_deref() else {
        return;
    };
    if !moat_chat::github::mentions(text, bot) {
        return;
    }
    let mapped = gw
        .inner
        .cfg
        .channel(conv.platform, &conv.channel)
        .and_then(|c| c.github.as_ref())
        .and_then(|g| g.users.get(&login.to_ascii_lowercase()).cloned());
    let Some(user) = mapped else {
        gw.audit(
            "github-webhook",
            json!({"verdict": "ignored", "delivery": delivery, "login": login, "conversation_id": conv.id,
                   "reason": "a comment mentions the bot, but github.users does not map its author"}),
        );
        return;
    };
    let r = gw
        .accept(crate::pipeline::Inbound {
            platform: conv.platform,
            event_id: format!("github:{delivery}"),
            channel: conv.channel.clone(),
            thread: conv.thread.clone(),
            user,
            text: text.to_string(),
            ts_ms: now_ms(),
            message_ref: None,
            addressed: true,
            attachments: Vec::new(),
        })
        .await;
    if let Err(e) = r {
        tracing::warn!(error = %e, "a pull-request comment could not be stored as a message");
    }
}

/// Stores what a turn's door saw reach GitHub as links to `conversation`
/// (branches pushed with a 2xx answer, pull requests opened).
pub fn link(gw: &Gateway, conversation: i64, activity: &[GithubActivity]) {
    for a in activity {
        let r = match a {
            GithubActivity::Pushed {
                repo, refs, status, ..
            } if (200..300).contains(status) => refs
                .iter()
                .filter_map(|r| r.strip_prefix("refs/heads/"))
                .try_for_each(|b| {
                    gw.inner
                        .store
                        .link_github(repo, GithubLink::Branch(b), conversation, now_ms())
                }),
            GithubActivity::PullRequest { repo, number, .. } => gw.inner.store.link_github(
                repo,
                GithubLink::PullRequest(*number),
                conversation,
                now_ms(),
            ),
            _ => Ok(()),
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, "could not store a GitHub link; its webhook events will not reach the conversation");
        }
    }
}
