//! The Discord Gateway: the WebSocket moat opens to receive events.
//!
//! Owns the connection's life as Discord documents it: `HELLO` (op 10) gives
//! the heartbeat interval; the first heartbeat (op 1, the last sequence
//! number) goes after a random fraction of it, then one per interval, and a
//! beat not acknowledged (op 11) by the next one means the connection is a
//! zombie: it is dropped and resumed. `IDENTIFY` (op 2) with the intents moat
//! needs starts a session; `READY` gives its `session_id` and
//! `resume_gateway_url`. A dropped connection, op 7 (reconnect) or a
//! resumable op 9 (invalid session) is answered by `RESUME` (op 6) on the
//! resume URL with the last sequence handled, so Discord replays what was
//! missed; a non-resumable op 9 starts a fresh session after 1-5 s.
//!
//! Each dispatch (op 0) goes to the handler; its sequence number counts as
//! handled only when the handler returned `Ok` (the gateway stored the
//! message). When the handler fails, the connection is dropped and resumed
//! from the last handled sequence: Discord sends the event again.
//!
//! Must never: run two handlers at once, log the token or a payload, close
//! with 1000/1001 when it means to resume (that ends the session), or keep
//! retrying a token or intents Discord refused (close codes 4004, 4010-4014).

use std::future::Future;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use moat_creds::Secret;
use serde::Deserialize;
use serde_json::json;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::slack::transport;

/// GUILDS (1<<0) | GUILD_MESSAGES (1<<9) | DIRECT_MESSAGES (1<<12) |
/// MESSAGE_CONTENT (1<<15, privileged: enabled in the Developer Portal).
pub const INTENTS: u64 = (1 << 0) | (1 << 9) | (1 << 12) | (1 << 15);
/// Waiting for `HELLO` after the handshake, and for the handshake.
const HELLO_TIMEOUT: Duration = Duration::from_secs(20);

/// One dispatch (op 0) for the handler.
#[derive(Debug, Clone)]
pub struct Dispatch {
    /// The event name (`MESSAGE_CREATE`, `GUILD_CREATE`, ...).
    pub kind: String,
    pub seq: u64,
    pub data: serde_json::Value,
}

/// Where and how to connect.
#[derive(Clone)]
pub struct GatewayParams {
    /// `wss://gateway.discord.gg` (no query).
    pub url: String,
    /// `ws://` allowed (a loopback fake; the configuration checked that).
    pub allow_plain: bool,
    pub token: Secret,
    pub tls: std::sync::Arc<tokio_rustls::rustls::ClientConfig>,
}

/// Why the Gateway stopped for good.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    #[error("Discord closed the Gateway with {code}: {reason}")]
    Refused { code: u16, reason: &'static str },
}

/// The session to resume.
#[derive(Debug, Clone, Default)]
struct Session {
    id: Option<String>,
    resume_url: Option<String>,
    /// The last sequence number handled.
    seq: Option<u64>,
}

enum End {
    Stopped,
    Fatal(GatewayError),
    /// Connect again; `resume`: with the session, else identify afresh.
    /// `healthy`: the connection worked (no back-off).
    Again {
        resume: bool,
        healthy: bool,
    },
}

#[derive(Deserialize)]
struct Frame {
    op: u8,
    #[serde(default)]
    d: serde_json::Value,
    #[serde(default)]
    s: Option<u64>,
    #[serde(default)]
    t: Option<String>,
}

fn fatal_close(code: u16) -> Option<&'static str> {
    Some(match code {
        4004 => "authentication failed (check DISCORD_BOT_TOKEN)",
        4010 => "invalid shard",
        4011 => "sharding required (the bot is in too many guilds for one connection)",
        4012 => "invalid API version",
        4013 => "invalid intents",
        4014 => "disallowed intents: enable the Message Content intent for the bot in the Developer Portal (Bot → Privileged Gateway Intents)",
        _ => return None,
    })
}

fn jitter() -> f64 {
    let mut b = [0u8; 4];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    f64::from(u32::from_le_bytes(b)) / f64::from(u32::MAX)
}

/// Runs the Gateway until `shutdown` completes (`Ok`) or Discord refuses
/// the token or intents (`Err`). Every other failure is retried.
pub async fn run<F, Fut, E>(
    params: GatewayParams,
    mut handler: F,
    shutdown: impl Future<Output = ()>,
) -> Result<(), GatewayError>
where
    F: FnMut(Dispatch) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    tokio::pin!(shutdown);
    let mut session = Session::default();
    let mut backoff = Duration::from_millis(500);
    loop {
        let end = connection(&params, &mut session, &mut handler, &mut shutdown).await;
        let wait = match end {
            End::Stopped => return Ok(()),
            End::Fatal(e) => return Err(e),
            End::Again { resume, healthy } => {
                if !resume {
                    session = Session::default();
                }
                if healthy {
                    backoff = Duration::from_millis(500);
                    Duration::ZERO
                } else {
                    let w = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    w
                }
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

type Ws = tokio_tungstenite::WebSocketStream<Box<dyn transport::Stream>>;

/// A close that keeps the session resumable (not 1000/1001).
async fn drop_for_resume(ws: &mut Ws) {
    let _ = ws
        .close(Some(CloseFrame {
            code: CloseCode::Library(4000),
            reason: "resuming".into(),
        }))
        .await;
}

async fn send(ws: &mut Ws, v: serde_json::Value) -> bool {
    ws.send(WsMessage::text(v.to_string())).await.is_ok()
}

/// One connection: handshake, HELLO, IDENTIFY or RESUME, then events.
async fn connection<F, Fut, E, S>(
    params: &GatewayParams,
    session: &mut Session,
    handler: &mut F,
    shutdown: &mut std::pin::Pin<&mut S>,
) -> End
where
    F: FnMut(Dispatch) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
    S: Future<Output = ()>,
{
    let resuming = session.id.is_some() && session.seq.is_some();
    let base = match (&session.resume_url, resuming) {
        (Some(u), true) => u.clone(),
        _ => params.url.clone(),
    };
    let url = format!("{}/?v=10&encoding=json", base.trim_end_matches('/'));
    let ep = match transport::parse_endpoint(&url, params.allow_plain, true) {
        Ok(ep) => ep,
        Err(reason) => {
            tracing::warn!(
                reason,
                "Discord Gateway: the URL is not usable; identifying on the configured one"
            );
            session.resume_url = None;
            return End::Again {
                resume: false,
                healthy: false,
            };
        }
    };
    let connect = async {
        let stream = transport::dial(&ep, &params.tls).await?;
        tokio_tungstenite::client_async(url.as_str(), stream)
            .await
            .map(|(ws, _)| ws)
            .map_err(|e| format!("WebSocket handshake with {} failed: {e}", ep.host))
    };
    let connected = tokio::select! {
        biased;
        _ = shutdown.as_mut() => return End::Stopped,
        c = tokio::time::timeout(HELLO_TIMEOUT, connect) => c,
    };
    let mut ws: Ws = match connected {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "Discord Gateway: cannot connect; retrying");
            return End::Again {
                resume: resuming,
                healthy: false,
            };
        }
        Err(_) => {
            tracing::warn!(host = %ep.host, "Discord Gateway: connecting timed out; retrying");
            return End::Again {
                resume: resuming,
                healthy: false,
            };
        }
    };
    // HELLO first.
    let interval = loop {
        let next = tokio::select! {
            biased;
            _ = shutdown.as_mut() => return End::Stopped,
            n = tokio::time::timeout(HELLO_TIMEOUT, ws.next()) => n,
        };
        let text = match next {
            Ok(Some(Ok(WsMessage::Text(t)))) => t,
            Ok(Some(Ok(WsMessage::Close(c)))) => {
                return closed(c.map(|c| u16::from(c.code)), resuming, false)
            }
            Ok(Some(Ok(_))) => continue,
            _ => {
                tracing::warn!("Discord Gateway: no HELLO; reconnecting");
                return End::Again {
                    resume: resuming,
                    healthy: false,
                };
            }
        };
        match serde_json::from_str::<Frame>(text.as_str()) {
            Ok(f) if f.op == 10 => {
                let ms =
                    f.d.get("heartbeat_interval")
                        .and_then(|v| v.as_u64())
                        .unwrap_or(41_250);
                break Duration::from_millis(ms.clamp(100, 120_000));
            }
            _ => continue,
        }
    };
    let token = params.token.expose();
    let hello_reply = if resuming {
        json!({"op": 6, "d": {"token": token, "session_id": session.id, "seq": session.seq}})
    } else {
        json!({"op": 2, "d": {"token": token, "intents": INTENTS,
            "properties": {"os": std::env::consts::OS, "browser": "moat", "device": "moat"}}})
    };
    if !send(&mut ws, hello_reply).await {
        return End::Again {
            resume: resuming,
            healthy: false,
        };
    }
    let mut next_beat = Instant::now() + interval.mul_f64(jitter());
    let mut acked = true;
    let mut healthy = false;
    loop {
        let ev = tokio::select! {
            biased;
            _ = shutdown.as_mut() => {
                let _ = ws.close(Some(CloseFrame { code: CloseCode::Normal, reason: "".into() })).await;
                return End::Stopped;
            }
            _ = tokio::time::sleep_until(next_beat) => None,
            n = ws.next() => Some(n),
        };
        let Some(next) = ev else {
            if !acked {
                tracing::warn!("Discord Gateway: heartbeat not acknowledged; resuming");
                drop_for_resume(&mut ws).await;
                return End::Again {
                    resume: true,
                    healthy,
                };
            }
            if !send(&mut ws, json!({"op": 1, "d": session.seq})).await {
                return End::Again {
                    resume: true,
                    healthy,
                };
            }
            acked = false;
            next_beat = Instant::now() + interval;
            continue;
        };
        let text = match next {
            None => {
                return End::Again {
                    resume: true,
                    healthy,
                }
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "Discord Gateway: connection failed; resuming");
                return End::Again {
                    resume: true,
                    healthy,
                };
            }
            Some(Ok(WsMessage::Text(t))) => t,
            Some(Ok(WsMessage::Close(c))) => {
                return closed(c.map(|c| u16::from(c.code)), true, healthy)
            }
            Some(Ok(_)) => continue,
        };
        let Ok(f) = serde_json::from_str::<Frame>(text.as_str()) else {
            tracing::warn!("Discord Gateway: a frame that is not JSON; ignored");
            continue;
        };
        match f.op {
            11 => acked = true,
            // op 1: Discord asks for a beat now (sent in the guard).
            1 if !send(&mut ws, json!({"op": 1, "d": session.seq})).await => {
                return End::Again {
                    resume: true,
                    healthy,
                };
            }
            7 => {
                tracing::info!("Discord Gateway: Discord asked to reconnect; resuming");
                drop_for_resume(&mut ws).await;
                return End::Again {
                    resume: true,
                    healthy: true,
                };
            }
            9 => {
                let resumable = f.d.as_bool().unwrap_or(false);
                tracing::info!(resumable, "Discord Gateway: invalid session");
                if !resumable {
                    // Discord asks for 1-5 s before a fresh IDENTIFY.
                    let wait = Duration::from_millis(1000 + (jitter() * 4000.0) as u64);
                    tokio::select! {
                        biased;
                        _ = shutdown.as_mut() => return End::Stopped,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
                drop_for_resume(&mut ws).await;
                // Not `healthy`: a session refused again and again backs off.
                return End::Again {
                    resume: resumable,
                    healthy: false,
                };
            }
            0 => {
                let kind = f.t.unwrap_or_default();
                let seq = f.s.unwrap_or(0);
                match kind.as_str() {
                    "READY" => {
                        let s = |k: &str| f.d.get(k).and_then(|v| v.as_str()).map(str::to_string);
                        session.id = s("session_id");
                        session.resume_url = s("resume_gateway_url");
                        session.seq = Some(seq);
                        healthy = true;
                        tracing::info!("Discord Gateway: connected (READY)");
                    }
                    "RESUMED" => {
                        session.seq = Some(seq.max(session.seq.unwrap_or(0)));
                        healthy = true;
                        tracing::info!("Discord Gateway: resumed");
                    }
                    _ => {
                        let d = Dispatch {
                            kind,
                            seq,
                            data: f.d,
                        };
                        // Not raced against shutdown: a store that began
                        // finishes and counts.
                        match handler(d).await {
                            Ok(()) => session.seq = Some(seq.max(session.seq.unwrap_or(0))),
                            Err(e) => {
                                tracing::warn!(seq, error = %e, "Discord Gateway: event not stored; resuming so Discord sends it again");
                                drop_for_resume(&mut ws).await;
                                return End::Again {
                                    resume: true,
                                    healthy: false,
                                };
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

/// The connection was closed by Discord with `code`.
fn closed(code: Option<u16>, resume: bool, healthy: bool) -> End {
    match code {
        Some(c) => {
            if let Some(reason) = fatal_close(c) {
                return End::Fatal(GatewayError::Refused { code: c, reason });
            }
            tracing::info!(code = c, "Discord Gateway: closed by Discord; reconnecting");
            // 4007 invalid seq, 4009 session timed out: identify afresh.
            End::Again {
                resume: resume && c != 4007 && c != 4009,
                healthy,
            }
        }
        None => End::Again { resume, healthy },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intents_and_close_codes() {
        assert_eq!(INTENTS, 37377);
        assert!(fatal_close(4014).unwrap().contains("Message Content"));
        assert!(fatal_close(4000).is_none());
        assert!(matches!(
            closed(Some(4009), true, true),
            End::Again { resume: false, .. }
        ));
        assert!(matches!(
            closed(Some(4000), true, true),
            End::Again { resume: true, .. }
        ));
        assert!(matches!(closed(Some(4004), true, true), End::Fatal(_)));
    }
}
