//! WhatsApp in and out: the Cloud API webhook (`GET /whatsapp/webhook` for
//! the subscription check, `POST` deliveries whose `X-Hub-Signature-256` is
//! checked before the body is parsed) and the platform side of a turn: the
//! customer's messages marked read when the turn starts, the answer as
//! WhatsApp text in messages of at most 4,096 characters, artifacts
//! uploaded through `/media` and sent as documents.
//!
//! The business number (`phone_number_id`) is the channel
//! (`[[channel]] platform = "whatsapp" id = PHONE_NUMBER_ID`); each
//! customer's chat is a conversation. Messages are deduplicated by their
//! `wamid`. When the customer's 24-hour service window is closed WhatsApp
//! refuses free-form answers: moat logs and audits that clearly.
//!
//! Must never: parse a body whose signature does not verify, answer a
//! message kind moat cannot read more than once per chat, or show a secret.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use moat_chat::whatsapp::{
    parse_delivery, signature_ok, subscription, to_text, CloudApi, CloudError, WaKind, WaMessage,
    SIGNATURE_HEADER, WHATSAPP_CHUNK,
};
use moat_creds::Secret;
use moat_policy::gateway::Platform;
use moat_policy::platforms::WhatsAppConfig;

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
const MAX_BODY: usize = 1024 * 1024;

/// A connected WhatsApp number set.
#[derive(Clone)]
pub struct WhatsApp {
    pub out: Arc<WhatsAppOut>,
    app_secret: Arc<Secret>,
    verify_token: Arc<Secret>,
}

fn need(secret: &dyn Fn(&str) -> Option<String>, var: &str) -> Result<Secret, ServeError> {
    match secret(var) {
        Some(v) if !v.trim().is_empty() => Ok(Secret::new(v.trim().to_string())),
        _ => Err(ServeError::Config(format!(
            "whatsapp.enabled = true needs {var} in moat's environment or secrets file"
        ))),
    }
}

/// Prepares the WhatsApp front-end when `whatsapp.enabled`.
pub fn connect(
    cfg: &WhatsAppConfig,
    secret: &(dyn Fn(&str) -> Option<String> + Sync),
) -> Result<Option<WhatsApp>, ServeError> {
    if !cfg.enabled {
        return Ok(None);
    }
    let token = need(secret, "WHATSAPP_TOKEN")?;
    let app_secret = Arc::new(need(secret, "WHATSAPP_APP_SECRET")?);
    let verify_token = Arc::new(need(secret, "WHATSAPP_VERIFY_TOKEN")?);
    let api = CloudApi::new(&cfg.api_url, cfg.api_url.starts_with("http://"), token)
        .map_err(|e| ServeError::Config(e.to_string()))?;
    Ok(Some(WhatsApp {
        out: Arc::new(WhatsAppOut {
            api,
            told_unsupported: Mutex::new(HashSet::new()),
        }),
        app_secret,
        verify_token,
    }))
}

impl WhatsApp {
    /// `GET` and `POST /whatsapp/webhook`.
    pub fn router(&self, gw: &Gateway) -> Router {
        Router::new()
            .route("/whatsapp/webhook", get(verify).post(deliver))
            .with_state((gw.clone(), self.clone()))
    }

    fn inbound(m: &WaMessage) -> Inbound {
        let (text, attachments) = match &m.kind {
            WaKind::Text(t) => (t.clone(), Vec::new()),
            WaKind::Document { filename, caption } => (
                caption.clone(),
                vec![Attachment {
                    name: filename.clone(),
                    bytes: None,
                }],
            ),
            WaKind::Unsupported(_) => (String::new(), Vec::new()),
        };
        Inbound {
            platform: Platform::WhatsApp,
            event_id: format!("whatsapp:{}", m.id),
            channel: m.phone_number_id.clone(),
            thread: m.from.clone(),
            user: m.from.clone(),
            text,
            ts_ms: m.timestamp.saturating_mul(1000),
            message_ref: Some(m.id.clone()),
            addressed: true,
            attachments,
        }
    }
}

async fn verify(
    State((_, wa)): State<(Gateway, WhatsApp)>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Response {
    let get = |k: &str| q.get(k).map(String::as_str);
    match subscription(
        get("hub.mode"),
        get("hub.verify_token"),
        get("hub.challenge"),
        &wa.verify_token,
    ) {
        Some(c) => (StatusCode::OK, c.to_string()).into_response(),
        None => (StatusCode::FORBIDDEN, "verification failed").into_response(),
    }
}

async fn deliver(
    State((gw, wa)): State<(Gateway, WhatsApp)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if body.len() > MAX_BODY {
        gw.inner.metrics.event(Verdict::Invalid);
        return (StatusCode::PAYLOAD_TOO_LARGE, "body too large").into_response();
    }
    // The signature first: nothing of an unsigned body is read.
    let sig = headers
        .get(SIGNATURE_HEADER)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    if !signature_ok(&wa.app_secret, sig, &body) {
        gw.inner.metrics.event(Verdict::Forged);
        return (StatusCode::UNAUTHORIZED, "invalid signature").into_response();
    }
    let messages = match parse_delivery(&body) {
        Ok(m) => m,
        Err(e) => {
            gw.inner.metrics.event(Verdict::Invalid);
            return (StatusCode::BAD_REQUEST, e.to_string()).into_response();
        }
    };
    for m in &messages {
        if let WaKind::Unsupported(kind) = &m.kind {
            wa.out.unsupported(&gw, m, kind).await;
            continue;
        }
        if let Err(e) = gw.accept(WhatsApp::inbound(m)).await {
            tracing::error!(error = %e, "a WhatsApp message could not be stored");
            // Not acknowledged: WhatsApp retries the delivery; the stored
            // ones are recognised by their wamid.
            return (StatusCode::SERVICE_UNAVAILABLE, "not stored; retry").into_response();
        }
    }
    StatusCode::OK.into_response()
}

/// Posts turns to WhatsApp chats.
pub struct WhatsAppOut {
    pub api: CloudApi,
    told_unsupported: Mutex<HashSet<(String, String)>>,
}

impl WhatsAppOut {
    async fn unsupported(&self, gw: &Gateway, m: &WaMessage, kind: &str) {
        if !gw
            .authorize(Platform::WhatsApp, &m.phone_number_id, &m.from)
            .is_allowed()
        {
            return;
        }
        let first = self
            .told_unsupported
            .lock()
            .map(|mut t| t.insert((m.phone_number_id.clone(), m.from.clone())))
            .unwrap_or(false);
        if first {
            tracing::debug!(kind, "a WhatsApp message moat cannot read");
            let r = self
                .api
                .send_text(&m.phone_number_id, &m.from, crate::telegram::UNSUPPORTED)
                .await;
            self.log(None, "send", r);
        }
    }

    fn log(&self, conv: Option<&ConvRef>, what: &str, r: Result<(), CloudError>) {
        match r {
            Ok(()) => {}
            Err(e) if e.window_closed() => {
                tracing::warn!(
                    conversation = conv.map(|c| c.id),
                    "WhatsApp refused the answer: the customer's 24-hour service window is closed (they must write again, or an approved template must be sent)"
                );
            }
            Err(e) => tracing::warn!(call = what, error = %e, "WhatsApp call failed"),
        }
    }

    async fn send(&self, conv: &ConvRef, text: &str) {
        let r = self.api.send_text(&conv.channel, &conv.thread, text).await;
        self.log(Some(conv), "messages", r);
    }
}

impl ChatPlatform for WhatsAppOut {
    fn notice<'a>(&'a self, conv: &'a ConvRef, text: &'a str) -> BoxFut<'a> {
        Box::pin(async move { self.send(conv, &format!("_{text}_")).await })
    }

    fn started<'a>(&'a self, conv: &'a ConvRef, refs: &'a [String]) -> BoxFut<'a> {
        Box::pin(async move {
            for r in refs {
                let res = self.api.mark_read(&conv.channel, r).await;
                self.log(Some(conv), "read receipt", res);
            }
        })
    }

    fn progress<'a>(&'a self, _conv: &'a ConvRef, _status: &'a str) -> BoxFut<'a> {
        Box::pin(async {})
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
                    .send_document(&conv.channel, &conv.thread, &f.name, f.bytes.clone())
                    .await;
                self.log(Some(conv), "media", r);
            }
        })
    }

    fn finished<'a>(
        &'a self,
        conv: &'a ConvRef,
        _refs: &'a [String],
        outcome: &'a TurnOutcome,
    ) -> BoxFut<'a> {
        Box::pin(async move {
            let parts = answer_parts(&answer_body(outcome), WHATSAPP_CHUNK, MAX_PARTS, |left| {
                format!("(the answer goes on for {left} more characters; ask the agent to put long output in ~/artifacts, which is sent as a file)")
            });
            for part in parts {
                let r = self
                    .api
                    .send_text(&conv.channel, &conv.thread, &to_text(&part))
                    .await;
                let closed = matches!(&r, Err(e) if e.window_closed());
                self.log(Some(conv), "messages", r);
                if closed {
                    break;
                }
            }
        })
    }
}
