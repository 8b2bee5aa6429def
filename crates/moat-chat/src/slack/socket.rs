//! Socket Mode: Slack events over a WebSocket the gateway opens, instead of
//! HTTP requests to a public URL.
//!
//! Owns the connection's life: `apps.connections.open` with the app-level
//! token (`SLACK_APP_TOKEN`, scope `connections:write`) for a single-use URL,
//! the WebSocket (TLS by rustls), reading envelopes (`hello`, `events_api`,
//! `interactive` (button clicks), `disconnect`), and reconnecting with backoff when Slack asks or the socket
//! dies. For each `events_api` envelope it calls the handler and sends the
//! acknowledgement `{"envelope_id":…}` only after the handler returned `Ok`,
//! that is after the gateway stored the event (docs/design.md D7): an event whose
//! handler failed is not acknowledged, so Slack delivers it again.
//!
//! It never runs two handlers at once, never acknowledges before the handler
//! returns, never logs a payload or the token, and never quotes the
//! WebSocket URL's ticket.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use moat_creds::Secret;
use serde::Deserialize;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use super::transport;
use super::web::{ApiConfig, WebApi, WebApiError};

/// One `events_api` (or `interactive`) envelope, for the handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketEvent {
    pub envelope_id: String,
    /// The Events API callback, byte for byte as Slack sent it inside the
    /// envelope: give it to [`super::parse_callback`].
    pub payload: Bytes,
    /// 0 for the first delivery; Slack counts up when it redelivers.
    pub retry_attempt: u32,
    pub retry_reason: Option<String>,
    /// An `interactive` envelope: `payload` is an interaction payload
    /// (`block_actions`, a button click), not an Events API callback.
    pub interactive: bool,
}

/// Reconnection timing.
#[derive(Debug, Clone)]
pub struct SocketOptions {
    /// First wait after a failed connection; doubled on each failure.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// With no frame from Slack for this long, ping; after twice this long,
    /// reconnect. Slack pings every few seconds.
    pub idle_timeout: Duration,
}

impl Default for SocketOptions {
    fn default() -> SocketOptions {
        SocketOptions {
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Why Socket Mode stopped for good (retrying cannot help).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SocketError {
    #[error("Socket Mode cannot connect: {0}")]
    Open(WebApiError),
}

/// Runs Socket Mode until `shutdown` completes (then returns `Ok`) or Slack
/// refuses the app token (then `Err`). Every other failure is retried.
pub async fn run<F, Fut, E>(
    app_token: Secret,
    api: &ApiConfig,
    handler: F,
    shutdown: impl Future<Output = ()>,
) -> Result<(), SocketError>
where
    F: FnMut(SocketEvent) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    run_with(app_token, api, SocketOptions::default(), handler, shutdown).await
}

/// [`run`] with explicit [`SocketOptions`].
pub async fn run_with<F, Fut, E>(
    app_token: Secret,
    api: &ApiConfig,
    opts: SocketOptions,
    mut handler: F,
    shutdown: impl Future<Output = ()>,
) -> Result<(), SocketError>
where
    F: FnMut(SocketEvent) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let opener = WebApi::with_token_var(api.clone(), app_token, "SLACK_APP_TOKEN");
    tokio::pin!(shutdown);
    let mut backoff = opts.min_backoff;
    loop {
        let outcome = session(&opener, api, &opts, &mut handler, &mut shutdown).await;
        let wait = match outcome {
            Session::Stopped => return Ok(()),
            Session::Fatal(e) => return Err(SocketError::Open(e)),
            // Slack asked for a new connection, and this one was healthy.
            Session::Reconnect { healthy: true } => {
                backoff = opts.min_backoff;
                Duration::ZERO
            }
            Session::Reconnect { healthy: false } => {
                let w = backoff;
                backoff = (backoff * 2).min(opts.max_backoff);
                w
            }
        };
        if !wait.is_zero() {
            tokio::select! {
                biased;
                _ = &mut shutdown => return Ok(()),
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

enum Session {
    Stopped,
    Fatal(WebApiError),
    /// `healthy`: the connection got its `hello` (resets the backoff).
    Reconnect {
        healthy: bool,
    },
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    envelope_id: Option<String>,
    #[serde(borrow, default)]
    payload: Option<&'a serde_json::value::RawValue>,
    #[serde(default)]
    retry_attempt: Option<u32>,
    #[serde(default)]
    retry_reason: Option<String>,
    #[serde(default)]
    reason: Option<String>,
}

fn fatal(e: &WebApiError) -> bool {
    match e {
        WebApiError::BadUrl { .. } => true,
        WebApiError::Api { code, .. } => matches!(
            code.as_str(),
            "not_authed"
                | "invalid_auth"
                | "not_allowed_token_type"
                | "missing_scope"
                | "token_revoked"
                | "token_expired"
                | "account_inactive"
        ),
        _ => false,
    }
}

fn short(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_graphic())
        .take(64)
        .collect()
}

/// One connection, from `apps.connections.open` to its end.
async fn session<F, Fut, E, S>(
    opener: &WebApi,
    api: &ApiConfig,
    opts: &SocketOptions,
    handler: &mut F,
    shutdown: &mut std::pin::Pin<&mut S>,
) -> Session
where
    F: FnMut(SocketEvent) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
    S: Future<Output = ()>,
{
    let opened = tokio::select! {
        biased;
        _ = shutdown.as_mut() => return Session::Stopped,
        r = opener.apps_connections_open() => r,
    };
    let url = match opened {
        Ok(u) => u,
        Err(e) if fatal(&e) => return Session::Fatal(e),
        Err(e) => {
            tracing::warn!(error = %e, "Socket Mode: cannot get a connection URL; retrying");
            return Session::Reconnect { healthy: false };
        }
    };
    let ep = match transport::parse_endpoint(&url, api.allow_http(), true) {
        Ok(ep) => ep,
        Err(reason) => {
            tracing::warn!(
                reason,
                "Socket Mode: Slack's connection URL is not usable; retrying"
            );
            return Session::Reconnect { healthy: false };
        }
    };
    let connect = async {
        let stream = transport::dial(&ep, api.client().tls()).await?;
        tokio_tungstenite::client_async(url.as_str(), stream)
            .await
            .map(|(ws, _)| ws)
            .map_err(|e| format!("WebSocket handshake with {} failed: {e}", ep.host))
    };
    let connected = tokio::select! {
        biased;
        _ = shutdown.as_mut() => return Session::Stopped,
        c = tokio::time::timeout(opts.idle_timeout, connect) => c,
    };
    let mut ws = match connected {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "Socket Mode: cannot connect; retrying");
            return Session::Reconnect { healthy: false };
        }
        Err(_) => {
            tracing::warn!(host = %ep.host, "Socket Mode: connecting timed out; retrying");
            return Session::Reconnect { healthy: false };
        }
    };
    let mut healthy = false;
    let mut pinged = false;
    loop {
        let next = tokio::select! {
            biased;
            _ = shutdown.as_mut() => {
                let _ = ws.close(None).await;
                return Session::Stopped;
            }
            n = tokio::time::timeout(opts.idle_timeout, ws.next()) => n,
        };
        let msg = match next {
            Err(_) if !pinged => {
                pinged = true;
                if ws
                    .send(WsMessage::Ping(Bytes::from_static(b"moat")))
                    .await
                    .is_err()
                {
                    return Session::Reconnect { healthy };
                }
                continue;
            }
            Err(_) => {
                tracing::warn!("Socket Mode: connection silent; reconnecting");
                return Session::Reconnect { healthy };
            }
            Ok(None) => return Session::Reconnect { healthy },
            Ok(Some(Err(e))) => {
                tracing::warn!(error = %e, "Socket Mode: connection failed; reconnecting");
                return Session::Reconnect { healthy };
            }
            Ok(Some(Ok(m))) => m,
        };
        pinged = false;
        let text = match msg {
            WsMessage::Text(t) => t,
            WsMessage::Close(_) => return Session::Reconnect { healthy },
            _ => continue, // pings are answered by the library
        };
        let env: Envelope = match serde_json::from_str(text.as_str()) {
            Ok(e) => e,
            Err(_) => {
                tracing::warn!("Socket Mode: a frame that is not an envelope; ignored");
                continue;
            }
        };
        match env.kind.as_str() {
            "hello" => {
                healthy = true;
                tracing::info!("Socket Mode: connected");
            }
            "disconnect" => {
                let reason = env.reason.as_deref().map(short).unwrap_or_default();
                tracing::info!(reason, "Socket Mode: Slack asked to reconnect");
                let _ = ws.close(None).await;
                return Session::Reconnect { healthy };
            }
            kind @ ("events_api" | "interactive") => {
                let interactive = kind == "interactive";
                let (Some(id), Some(payload)) = (env.envelope_id, env.payload) else {
                    tracing::warn!(kind, "Socket Mode: envelope without id or payload; ignored");
                    continue;
                };
                let ev = SocketEvent {
                    envelope_id: id.clone(),
                    payload: Bytes::copy_from_slice(payload.get().as_bytes()),
                    retry_attempt: env.retry_attempt.unwrap_or(0),
                    retry_reason: env
                        .retry_reason
                        .as_deref()
                        .map(short)
                        .filter(|r| !r.is_empty()),
                    interactive,
                };
                // Not raced against shutdown: a store that began finishes
                // and is acknowledged.
                match handler(ev).await {
                    Ok(()) => {
                        if ws.send(ack(&id)).await.is_err() {
                            return Session::Reconnect { healthy };
                        }
                    }
                    Err(e) => {
                        tracing::warn!(envelope_id = %short(&id), error = %e,
                            "Socket Mode: event not stored; not acknowledged, Slack will redeliver it");
                    }
                }
            }
            other => {
                // Slash commands are not used by moat:
                // acknowledge so Slack stops resending them.
                tracing::debug!(kind = %short(other), "Socket Mode: envelope type not handled");
                if let Some(id) = env.envelope_id {
                    if ws.send(ack(&id)).await.is_err() {
                        return Session::Reconnect { healthy };
                    }
                }
            }
        }
    }
}

fn ack(envelope_id: &str) -> WsMessage {
    WsMessage::text(serde_json::json!({ "envelope_id": envelope_id }).to_string())
}
