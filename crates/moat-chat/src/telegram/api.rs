//! The Telegram Bot API client: `getMe`, `getUpdates`, `sendMessage`,
//! `sendChatAction`, `setMessageReaction`, `sendDocument`, `deleteWebhook`.
//!
//! Calls are `POST {api_url}/bot{TOKEN}/{method}` with a JSON body
//! (multipart for `sendDocument`). A 429 is retried after the answer's
//! `parameters.retry_after` (bounded); a 5xx after a short back-off, a
//! bounded number of times.
//!
//! Must never: show the token (it is in the URL path, so no URL of a call is
//! ever formatted into an error or a log), or follow a redirect.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{header, Method, Request};
use moat_creds::Secret;
use serde::Deserialize;
use serde_json::json;

use super::update::{BotIdentity, Update};
use crate::slack::transport::{self, Client, Endpoint};
use crate::slack::SleepFn;

pub const DEFAULT_API_URL: &str = "https://api.telegram.org";
/// Attempts per call (429 and 5xx answers).
const MAX_ATTEMPTS: u32 = 5;
/// The longest `retry_after` waited for once.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
/// Whole-exchange limit (a `getUpdates` long poll adds its own timeout).
const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum TelegramError {
    #[error("telegram.api_url {url:?} is not usable: {reason}")]
    BadUrl { url: String, reason: &'static str },
    #[error("Telegram {method} failed: {reason}")]
    Transport {
        method: &'static str,
        reason: String,
    },
    #[error("Telegram {method} refused the call ({code}): {description}{hint}")]
    Api {
        method: &'static str,
        code: u16,
        description: String,
        hint: &'static str,
    },
    #[error("Telegram {method} is still rate limited after {attempts} attempts (retry after {retry_after}s)")]
    RateLimited {
        method: &'static str,
        attempts: u32,
        retry_after: u64,
    },
    #[error("Telegram {method} answered something that is not the Bot API's JSON: {reason}")]
    BadResponse {
        method: &'static str,
        reason: String,
    },
}

/// The Bot API with the bot's token.
#[derive(Clone)]
pub struct BotApi {
    base: Endpoint,
    token: Secret,
    client: Arc<Client>,
    sleep: SleepFn,
}

impl fmt::Debug for BotApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BotApi")
            .field("host", &self.base.host)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct Envelope {
    ok: bool,
    result: Option<serde_json::Value>,
    description: Option<String>,
    error_code: Option<u16>,
    parameters: Option<Params>,
}

#[derive(Deserialize)]
struct Params {
    retry_after: Option<u64>,
}

/// Descriptions come from Telegram: kept short and printable.
fn clean(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(200).collect()
}

impl BotApi {
    /// `api_url` such as `https://api.telegram.org`; `http://` only when
    /// `allow_http` (tests, local fakes).
    pub fn new(api_url: &str, allow_http: bool, token: Secret) -> Result<BotApi, TelegramError> {
        let base = transport::parse_endpoint(api_url, allow_http, false).map_err(|reason| {
            TelegramError::BadUrl {
                url: api_url.to_string(),
                reason,
            }
        })?;
        if base.path_and_query.contains('?') {
            return Err(TelegramError::BadUrl {
                url: api_url.to_string(),
                reason: "the API URL cannot have a query",
            });
        }
        Ok(BotApi {
            base,
            token,
            client: Arc::new(Client::new()),
            sleep: Arc::new(|d| Box::pin(tokio::time::sleep(d))),
        })
    }

    /// Replaces `tokio::time::sleep` for retry waits (tests).
    pub fn with_sleep(mut self, sleep: SleepFn) -> BotApi {
        self.sleep = sleep;
        self
    }

    /// `getMe`: the bot's id and username.
    pub async fn get_me(&self) -> Result<BotIdentity, TelegramError> {
        #[derive(Deserialize)]
        struct Me {
            id: i64,
            username: Option<String>,
        }
        let method = "getMe";
        let v = self.call(method, json!({}), TIMEOUT).await?;
        let me: Me = decode(method, v)?;
        Ok(BotIdentity {
            id: me.id,
            username: me.username.unwrap_or_default(),
        })
    }

    /// `deleteWebhook`: long polling is refused while a webhook is set.
    pub async fn delete_webhook(&self) -> Result<(), TelegramError> {
        self.call("deleteWebhook", json!({}), TIMEOUT)
            .await
            .map(|_| ())
    }

    /// `getUpdates` from `offset`, waiting up to `wait` for one. Returns the
    /// raw updates (each also parsed, for its id).
    pub async fn get_updates(
        &self,
        offset: i64,
        wait: Duration,
    ) -> Result<Vec<(i64, serde_json::Value)>, TelegramError> {
        let method = "getUpdates";
        let v = self
            .call(
                method,
                json!({"offset": offset, "timeout": wait.as_secs(), "allowed_updates": ["message"]}),
                TIMEOUT + wait,
            )
            .await?;
        let list: Vec<serde_json::Value> = decode(method, v)?;
        let mut out = Vec::new();
        for u in list {
            match Update::deserialize(&u) {
                Ok(p) => out.push((p.update_id, u)),
                Err(_) => {
                    // Skipped, but its id still moves the offset on.
                    if let Some(id) = u.get("update_id").and_then(|i| i.as_i64()) {
                        out.push((id, serde_json::Value::Null));
                    }
                }
            }
        }
        Ok(out)
    }

    /// `sendMessage` with `parse_mode = "HTML"` (the text already
    /// formatted), in the forum topic when given. Returns the message id.
    pub async fn send_message(
        &self,
        chat: i64,
        topic: Option<i64>,
        html: &str,
    ) -> Result<i64, TelegramError> {
        let mut body = json!({"chat_id": chat, "text": html, "parse_mode": "HTML",
            "link_preview_options": {"is_disabled": true}});
        if let Some(t) = topic {
            body["message_thread_id"] = t.into();
        }
        let method = "sendMessage";
        let v = self.call(method, body, TIMEOUT).await?;
        v.get("message_id")
            .and_then(|i| i.as_i64())
            .ok_or(TelegramError::BadResponse {
                method,
                reason: "no message_id".into(),
            })
    }

    /// `sendChatAction` (`typing`): shown for five seconds or until a message.
    pub async fn send_chat_action(
        &self,
        chat: i64,
        topic: Option<i64>,
    ) -> Result<(), TelegramError> {
        let mut body = json!({"chat_id": chat, "action": "typing"});
        if let Some(t) = topic {
            body["message_thread_id"] = t.into();
        }
        self.call("sendChatAction", body, TIMEOUT).await.map(|_| ())
    }

    /// `setMessageReaction` with one emoji (or none, to clear).
    pub async fn set_reaction(
        &self,
        chat: i64,
        message: i64,
        emoji: Option<&str>,
    ) -> Result<(), TelegramError> {
        let reaction = match emoji {
            Some(e) => json!([{"type": "emoji", "emoji": e}]),
            None => json!([]),
        };
        let body = json!({"chat_id": chat, "message_id": message, "reaction": reaction});
        self.call("setMessageReaction", body, TIMEOUT)
            .await
            .map(|_| ())
    }

    /// `sendDocument` (multipart upload of `bytes` as `name`).
    pub async fn send_document(
        &self,
        chat: i64,
        topic: Option<i64>,
        name: &str,
        bytes: Bytes,
    ) -> Result<(), TelegramError> {
        let method = "sendDocument";
        let boundary = format!("moat-{:016x}", rand_u64());
        let mut body = Vec::with_capacity(bytes.len() + 512);
        let mut field = |k: &str, v: &str| {
            body.extend_from_slice(
                format!(
                    "--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n"
                )
                .as_bytes(),
            );
        };
        field("chat_id", &chat.to_string());
        if let Some(t) = topic {
            field("message_thread_id", &t.to_string());
        }
        // The name is the artifact's (checked by moat); quotes and line
        // breaks are still kept out of the header.
        let safe: String = name
            .chars()
            .map(|c| {
                if c == '"' || c == '\\' || c.is_control() {
                    '_'
                } else {
                    c
                }
            })
            .collect();
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"document\"; filename=\"{safe}\"\r\nContent-Type: application/octet-stream\r\n\r\n")
                .as_bytes(),
        );
        body.extend_from_slice(&bytes);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let ctype = format!("multipart/form-data; boundary={boundary}");
        self.send(method, &ctype, Bytes::from(body), TIMEOUT * 4)
            .await
            .map(|_| ())
    }

    async fn call(
        &self,
        method: &'static str,
        body: serde_json::Value,
        timeout: Duration,
    ) -> Result<serde_json::Value, TelegramError> {
        self.send(
            method,
            "application/json",
            Bytes::from(body.to_string()),
            timeout,
        )
        .await
    }

    /// One call with its retries; the result field of the answer.
    async fn send(
        &self,
        method: &'static str,
        ctype: &str,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<serde_json::Value, TelegramError> {
        let prefix = self.base.path_and_query.trim_end_matches('/');
        let uri = format!("{prefix}/bot{}/{method}", self.token.expose());
        let mut attempt = 0;
        loop {
            attempt += 1;
            let req = Request::builder()
                .method(Method::POST)
                .uri(uri.as_str())
                .header(header::HOST, self.base.authority.as_str())
                .header(header::USER_AGENT, "moat")
                .header(header::CONTENT_TYPE, ctype)
                .body(Full::new(payload.clone()))
                .map_err(|_| TelegramError::Transport {
                    method,
                    // The error would quote the URI, which holds the token.
                    reason: "the request could not be built (is TELEGRAM_BOT_TOKEN a bot token?)"
                        .into(),
                })?;
            let (resp, body) = self
                .client
                .send(&self.base, req, timeout)
                .await
                .map_err(|reason| TelegramError::Transport { method, reason })?;
            let status = resp.status().as_u16();
            let env: Option<Envelope> = serde_json::from_slice(&body).ok();
            if status == 429 {
                let wait = env
                    .as_ref()
                    .and_then(|e| e.parameters.as_ref())
                    .and_then(|p| p.retry_after)
                    .unwrap_or(1);
                if attempt >= MAX_ATTEMPTS {
                    return Err(TelegramError::RateLimited {
                        method,
                        attempts: attempt,
                        retry_after: wait,
                    });
                }
                tracing::warn!(
                    method,
                    retry_after_secs = wait,
                    attempt,
                    "Telegram rate limited this call; waiting"
                );
                (self.sleep)(Duration::from_secs(wait).min(MAX_RETRY_AFTER)).await;
                continue;
            }
            if status >= 500 && attempt < MAX_ATTEMPTS {
                tracing::warn!(
                    method,
                    status,
                    attempt,
                    "Telegram answered a server error; retrying"
                );
                (self.sleep)(Duration::from_millis(250 << attempt.min(5))).await;
                continue;
            }
            let Some(env) = env else {
                return Err(TelegramError::BadResponse {
                    method,
                    reason: format!("HTTP {status}, the body is not JSON"),
                });
            };
            if !env.ok {
                let code = env.error_code.unwrap_or(status);
                return Err(TelegramError::Api {
                    method,
                    code,
                    description: env.description.as_deref().map(clean).unwrap_or_default(),
                    hint: if code == 401 || code == 404 {
                        " (check TELEGRAM_BOT_TOKEN)"
                    } else {
                        ""
                    },
                });
            }
            return Ok(env.result.unwrap_or(serde_json::Value::Null));
        }
    }
}

fn decode<T: serde::de::DeserializeOwned>(
    method: &'static str,
    v: serde_json::Value,
) -> Result<T, TelegramError> {
    T::deserialize(v).map_err(|_| TelegramError::BadResponse {
        method,
        reason: "the result has an unexpected shape".into(),
    })
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_debug() {
        assert!(BotApi::new("http://127.0.0.1:1", false, Secret::new("1:abc")).is_err());
        let api = BotApi::new("http://127.0.0.1:1", true, Secret::new("1:very-secret")).unwrap();
        assert!(!format!("{api:?}").contains("very-secret"));
    }
}
