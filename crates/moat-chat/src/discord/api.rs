//! The Discord REST API client's core: the token, the calls with their
//! retries and Discord's rate limits (the endpoints moat uses are in
//! `routes.rs`).
//!
//! Calls carry `Authorization: Bot TOKEN` (a sensitive header value; the
//! token is never in a URL). Rate limits are honoured as Discord documents
//! them: a route whose `X-RateLimit-Remaining` reached 0 waits
//! `X-RateLimit-Reset-After` before its next call (routes sharing an
//! `X-RateLimit-Bucket` share the wait), and a 429 is retried after its
//! body's `retry_after` (seconds, a float), bounded. A 5xx is retried after a
//! short back-off; messages carry a nonce Discord enforces, so such a retry
//! never posts a message twice.
//!
//! Must never: show the token, follow a redirect, or send a message without
//! `allowed_mentions = {"parse": []}` (an answer never pings anyone).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{header, Method, Request};
use moat_creds::Secret;
use serde::Deserialize;

use crate::slack::transport::{self, Client, Endpoint};
use crate::slack::SleepFn;

pub const DEFAULT_API_URL: &str = "https://discord.com/api/v10";
/// Attempts per call (429 and 5xx answers).
const MAX_ATTEMPTS: u32 = 5;
/// The longest wait for one 429 or an exhausted bucket.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
pub(super) const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum DiscordError {
    #[error("discord.api_url {url:?} is not usable: {reason}")]
    BadUrl { url: String, reason: &'static str },
    #[error("Discord {route} failed: {reason}")]
    Transport { route: &'static str, reason: String },
    #[error("Discord {route} refused the call (HTTP {status}, code {code}): {message}{hint}")]
    Api {
        route: &'static str,
        status: u16,
        code: i64,
        message: String,
        hint: &'static str,
    },
    #[error("Discord {route} is still rate limited after {attempts} attempts (retry after {retry_after:.1}s)")]
    RateLimited {
        route: &'static str,
        attempts: u32,
        retry_after: f64,
    },
    #[error("Discord {route} answered something that is not its JSON: {reason}")]
    BadResponse { route: &'static str, reason: String },
}

/// The bot's own user (`GET /users/@me`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BotUser {
    pub id: String,
    pub username: String,
}

/// A channel as `GET /channels/{id}` or the Gateway describes it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ChannelInfo {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: u8,
    #[serde(default)]
    pub parent_id: Option<String>,
}

/// Channel types that are threads (public, private, announcement).
pub fn is_thread(kind: u8) -> bool {
    matches!(kind, 10..=12)
}

/// A route's rate-limit state.
#[derive(Default)]
struct Limits {
    /// Route key -> Discord's bucket hash.
    bucket_of: HashMap<String, String>,
    /// Bucket (or route key) and major parameter -> when calls may resume.
    blocked_until: HashMap<String, Instant>,
}

/// The REST API with the bot's token.
#[derive(Clone)]
pub struct RestApi {
    base: Endpoint,
    token: Secret,
    client: Arc<Client>,
    sleep: SleepFn,
    limits: Arc<Mutex<Limits>>,
}

impl fmt::Debug for RestApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RestApi")
            .field("host", &self.base.host)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct ApiErr {
    #[serde(default)]
    code: i64,
    #[serde(default)]
    message: String,
    #[serde(default)]
    retry_after: Option<f64>,
    #[serde(default)]
    global: bool,
}

/// Messages come from Discord: kept short and printable.
fn clean(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(200).collect()
}

/// `s` percent-encoded for a path segment (an emoji).
pub(super) fn encode_segment(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Discord ids are decimal snowflakes: anything else never reaches a path.
pub(super) fn snowflake(route: &'static str, id: &str) -> Result<(), DiscordError> {
    if !id.is_empty() && id.len() <= 20 && id.bytes().all(|b| b.is_ascii_digit()) {
        Ok(())
    } else {
        Err(DiscordError::BadResponse {
            route,
            reason: "an id that is not a Discord snowflake".into(),
        })
    }
}

/// One call: its route (for errors and rate limits), method and path.
pub(super) struct Call<'a> {
    pub(super) route: &'static str,
    pub(super) method: Method,
    pub(super) path: String,
    /// The major parameter (the channel): buckets are per channel.
    pub(super) major: &'a str,
}

impl RestApi {
    /// `api_url` such as `https://discord.com/api/v10`; `http://` only when
    /// `allow_http` (tests, local fakes).
    pub fn new(api_url: &str, allow_http: bool, token: Secret) -> Result<RestApi, DiscordError> {
        let base = transport::parse_endpoint(api_url, allow_http, false).map_err(|reason| {
            DiscordError::BadUrl {
                url: api_url.to_string(),
                reason,
            }
        })?;
        if base.path_and_query.contains('?') {
            return Err(DiscordError::BadUrl {
                url: api_url.to_string(),
                reason: "the API URL cannot have a query",
            });
        }
        Ok(RestApi {
            base,
            token,
            client: Arc::new(Client::new()),
            sleep: Arc::new(|d| Box::pin(tokio::time::sleep(d))),
            limits: Arc::new(Mutex::new(Limits::default())),
        })
    }

    /// Replaces `tokio::time::sleep` for rate-limit waits (tests).
    pub fn with_sleep(mut self, sleep: SleepFn) -> RestApi {
        self.sleep = sleep;
        self
    }

    /// The TLS settings the Gateway's WebSocket uses too.
    pub fn tls(&self) -> &Arc<tokio_rustls::rustls::ClientConfig> {
        self.client.tls()
    }

    pub(super) async fn json(
        &self,
        call: Call<'_>,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, DiscordError> {
        let payload = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        self.send(call, "application/json", payload, TIMEOUT).await
    }

    /// The key a route's rate limit is kept under: its bucket when Discord
    /// named one, with the major parameter.
    fn limit_key(&self, call: &Call<'_>) -> String {
        let l = self.limits.lock().unwrap_or_else(|e| e.into_inner());
        let bucket = l
            .bucket_of
            .get(call.route)
            .cloned()
            .unwrap_or_else(|| call.route.to_string());
        format!("{bucket}:{}", call.major)
    }

    /// Waits while the route's bucket is exhausted.
    async fn wait_for_bucket(&self, call: &Call<'_>) {
        let key = self.limit_key(call);
        let until = {
            let l = self.limits.lock().unwrap_or_else(|e| e.into_inner());
            l.blocked_until.get(&key).copied()
        };
        if let Some(u) = until {
            let now = Instant::now();
            if u > now {
                let wait = (u - now).min(MAX_RETRY_AFTER);
                tracing::debug!(
                    route = call.route,
                    wait_ms = wait.as_millis() as u64,
                    "Discord rate-limit bucket empty; waiting"
                );
                (self.sleep)(wait).await;
            }
        }
    }

    /// Reads the `X-RateLimit-*` headers of an answer.
    fn note_limits(&self, call: &Call<'_>, headers: &hyper::HeaderMap) {
        let text = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).map(str::trim);
        let mut l = self.limits.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = text("x-ratelimit-bucket") {
            let b: String = b
                .chars()
                .filter(|c| c.is_ascii_graphic())
                .take(64)
                .collect();
            if !b.is_empty() {
                l.bucket_of.insert(call.route.to_string(), b);
            }
        }
        let bucket = l
            .bucket_of
            .get(call.route)
            .cloned()
            .unwrap_or_else(|| call.route.to_string());
        let key = format!("{bucket}:{}", call.major);
        let remaining = text("x-ratelimit-remaining").and_then(|v| v.parse::<u64>().ok());
        let reset_after = text("x-ratelimit-reset-after").and_then(|v| v.parse::<f64>().ok());
        match (remaining, reset_after) {
            (Some(0), Some(secs)) if secs.is_finite() && secs > 0.0 => {
                let d = Duration::from_secs_f64(secs).min(MAX_RETRY_AFTER);
                l.blocked_until.insert(key, Instant::now() + d);
            }
            (Some(_), _) => {
                l.blocked_until.remove(&key);
            }
            _ => {}
        }
    }

    /// One call with its retries; the answer's JSON (`null` for 204).
    pub(super) async fn send(
        &self,
        call: Call<'_>,
        ctype: &str,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<serde_json::Value, DiscordError> {
        let route = call.route;
        let prefix = self.base.path_and_query.trim_end_matches('/');
        let uri = format!("{prefix}{}", call.path);
        let mut auth = header::HeaderValue::from_str(&format!("Bot {}", self.token.expose()))
            .map_err(|_| DiscordError::Transport {
                route,
                reason: "DISCORD_BOT_TOKEN has characters a header cannot carry".into(),
            })?;
        auth.set_sensitive(true);
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.wait_for_bucket(&call).await;
            let mut b = Request::builder()
                .method(call.method.clone())
                .uri(uri.as_str())
                .header(header::HOST, self.base.authority.as_str())
                .header(
                    header::USER_AGENT,
                    "DiscordBot (https://github.com/moat, 1) moat",
                )
                .header(header::AUTHORIZATION, auth.clone());
            if !payload.is_empty() {
                b = b.header(header::CONTENT_TYPE, ctype);
            } else if call.method != Method::GET && call.method != Method::DELETE {
                b = b.header(header::CONTENT_LENGTH, "0");
            }
            let req = b
                .body(Full::new(payload.clone()))
                .map_err(|_| DiscordError::Transport {
                    route,
                    reason: "the request could not be built".into(),
                })?;
            let (resp, body) = self
                .client
                .send(&self.base, req, timeout)
                .await
                .map_err(|reason| DiscordError::Transport { route, reason })?;
            let status = resp.status().as_u16();
            self.note_limits(&call, resp.headers());
            let err: Option<ApiErr> = serde_json::from_slice(&body).ok();
            if status == 429 {
                let header_wait = resp
                    .headers()
                    .get(header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<f64>().ok());
                let wait = err
                    .as_ref()
                    .and_then(|e| e.retry_after)
                    .or(header_wait)
                    .filter(|w| w.is_finite() && *w >= 0.0)
                    .unwrap_or(1.0);
                if attempt >= MAX_ATTEMPTS {
                    return Err(DiscordError::RateLimited {
                        route,
                        attempts: attempt,
                        retry_after: wait,
                    });
                }
                tracing::warn!(
                    route,
                    retry_after_secs = wait,
                    global = err.as_ref().is_some_and(|e| e.global),
                    attempt,
                    "Discord rate limited this call; waiting"
                );
                (self.sleep)(Duration::from_secs_f64(wait).min(MAX_RETRY_AFTER)).await;
                continue;
            }
            if status >= 500 && attempt < MAX_ATTEMPTS {
                tracing::warn!(
                    route,
                    status,
                    attempt,
                    "Discord answered a server error; retrying"
                );
                (self.sleep)(Duration::from_millis(250 << attempt.min(5))).await;
                continue;
            }
            if !(200..300).contains(&status) {
                let (code, message) = err
                    .map(|e| (e.code, clean(&e.message)))
                    .unwrap_or((0, String::new()));
                return Err(DiscordError::Api {
                    route,
                    status,
                    code,
                    message,
                    hint: match status {
                        401 => " (check DISCORD_BOT_TOKEN)",
                        403 => " (the bot lacks a permission in this channel)",
                        _ => "",
                    },
                });
            }
            if body.is_empty() {
                return Ok(serde_json::Value::Null);
            }
            return serde_json::from_slice(&body).map_err(|_| DiscordError::BadResponse {
                route,
                reason: format!("HTTP {status}, the body is not JSON"),
            });
        }
    }
}

pub(super) fn decode<T: serde::de::DeserializeOwned>(
    route: &'static str,
    v: serde_json::Value,
) -> Result<T, DiscordError> {
    T::deserialize(v).map_err(|_| DiscordError::BadResponse {
        route,
        reason: "the answer has an unexpected shape".into(),
    })
}

pub(super) fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_ids_emoji_and_debug() {
        assert!(RestApi::new("http://127.0.0.1:1", false, Secret::new("abc")).is_err());
        let api = RestApi::new(
            "http://127.0.0.1:1/api/v10",
            true,
            Secret::new("very-secret"),
        )
        .unwrap();
        assert!(!format!("{api:?}").contains("very-secret"));
        assert_eq!(encode_segment("👀"), "%F0%9F%91%80");
        assert!(snowflake("r", "1234").is_ok());
        for bad in ["", "12/../x", "1a", "123456789012345678901"] {
            assert!(snowflake("r", bad).is_err(), "{bad}");
        }
        assert!(is_thread(11) && !is_thread(0) && !is_thread(1));
    }

    fn call(route: &'static str, major: &'static str) -> Call<'static> {
        Call {
            route,
            method: Method::POST,
            path: String::new(),
            major,
        }
    }

    /// An exhausted bucket blocks its route in that channel until the reset,
    /// other channels and routes not at all, and a bucket with room again
    /// unblocks it.
    #[test]
    fn buckets_are_per_route_and_channel() {
        let api = RestApi::new("http://127.0.0.1:1", true, Secret::new("t")).unwrap();
        let blocked = |c: &Call<'_>| {
            let key = api.limit_key(c);
            let l = api.limits.lock().unwrap();
            l.blocked_until
                .get(&key)
                .is_some_and(|u| *u > Instant::now())
        };
        let mut h = hyper::HeaderMap::new();
        h.insert("x-ratelimit-bucket", "abcd1234".parse().unwrap());
        h.insert("x-ratelimit-remaining", "0".parse().unwrap());
        h.insert("x-ratelimit-reset-after", "2.5".parse().unwrap());
        let (a_x, a_y, b_x) = (call("A", "1"), call("A", "2"), call("B", "1"));
        api.note_limits(&a_x, &h);
        assert!(blocked(&a_x));
        assert!(!blocked(&a_y) && !blocked(&b_x));
        assert_eq!(api.limit_key(&a_x), "abcd1234:1");
        h.insert("x-ratelimit-remaining", "4".parse().unwrap());
        api.note_limits(&a_x, &h);
        assert!(!blocked(&a_x));
        // Garbage headers change nothing and never panic.
        let mut g = hyper::HeaderMap::new();
        g.insert("x-ratelimit-remaining", "0".parse().unwrap());
        g.insert("x-ratelimit-reset-after", "NaN".parse().unwrap());
        api.note_limits(&b_x, &g);
        assert!(!blocked(&b_x));
    }
}
