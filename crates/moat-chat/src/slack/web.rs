//! The Slack Web API client: the calls the gateway makes to answer in Slack.
//!
//! Owns `auth.test`, `chat.postMessage`, `chat.update`, `reactions.add` and
//! `reactions.remove`, `conversations.replies` (all pages), the three-step
//! file upload (`files.getUploadURLExternal`, the upload itself,
//! `files.completeUploadExternal`) and `apps.connections.open` for Socket
//! Mode. HTTP 429 is honoured: wait `Retry-After` and try again, a bounded
//! number of times. Slack's `{"ok":false,"error":"…"}` becomes
//! [`WebApiError::Api`] with that code.
//!
//! The token travels only in a sensitive `Authorization: Bearer` header to
//! the configured API base; it never appears in an error, a log line or a
//! `Debug` output, and is never sent to the file upload URL.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{header, Method, Request, StatusCode};
use moat_creds::Secret;
use serde::Deserialize;

use super::events::FileRef;
use super::transport::{self, Client, Endpoint};

/// Slack's Web API.
pub const DEFAULT_API_URL: &str = "https://slack.com/api";
/// Attempts per call when Slack answers 429 (the first try included).
pub const DEFAULT_MAX_ATTEMPTS: u32 = 4;
/// A `Retry-After` longer than this is waited only this long.
pub const DEFAULT_MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
/// Whole-call limit for one HTTP exchange.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// `conversations.replies` stops after this many pages.
const MAX_PAGES: usize = 100;

/// How the client waits before retrying after a 429 (injectable for tests).
pub type SleepFn = Arc<dyn Fn(Duration) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// Where the Web API is and how calls behave. Cheap to clone.
#[derive(Clone)]
pub struct ApiConfig {
    base: Endpoint,
    base_url: String,
    allow_http: bool,
    max_attempts: u32,
    max_retry_after: Duration,
    timeout: Duration,
    sleep: SleepFn,
    client: Arc<Client>,
}

impl fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiConfig")
            .field("base_url", &self.base_url)
            .field("allow_http", &self.allow_http)
            .field("max_attempts", &self.max_attempts)
            .field("max_retry_after", &self.max_retry_after)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Default for ApiConfig {
    #[allow(clippy::expect_used, reason = "a constant, tested")]
    fn default() -> ApiConfig {
        ApiConfig::new(DEFAULT_API_URL, false).expect("the default API URL is valid")
    }
}

impl ApiConfig {
    /// `base_url` such as `https://slack.com/api` (method names are appended
    /// as `/{method}`). `http://` is refused unless `allow_http` (tests,
    /// local fakes); the same flag allows a `ws://` Socket Mode URL and an
    /// `http://` upload URL.
    pub fn new(base_url: &str, allow_http: bool) -> Result<ApiConfig, WebApiError> {
        let base = transport::parse_endpoint(base_url, allow_http, false).map_err(|reason| {
            WebApiError::BadUrl {
                url: base_url.to_string(),
                reason,
            }
        })?;
        if base.path_and_query.contains('?') {
            return Err(WebApiError::BadUrl {
                url: base_url.to_string(),
                reason: "the API base URL cannot have a query",
            });
        }
        let base_url = base_url.trim_end_matches('/').to_string();
        Ok(ApiConfig {
            base,
            base_url,
            allow_http,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            max_retry_after: DEFAULT_MAX_RETRY_AFTER,
            timeout: DEFAULT_TIMEOUT,
            sleep: Arc::new(|d| Box::pin(tokio::time::sleep(d))),
            client: Arc::new(Client::new()),
        })
    }

    /// Attempts per call when rate limited (at least 1).
    pub fn with_max_attempts(mut self, n: u32) -> ApiConfig {
        self.max_attempts = n.max(1);
        self
    }

    /// Longest wait after one 429.
    pub fn with_max_retry_after(mut self, d: Duration) -> ApiConfig {
        self.max_retry_after = d;
        self
    }

    /// Whole-call limit for one HTTP exchange.
    pub fn with_timeout(mut self, d: Duration) -> ApiConfig {
        self.timeout = d;
        self
    }

    /// Replaces `tokio::time::sleep` for 429 waits.
    pub fn with_sleep(mut self, sleep: SleepFn) -> ApiConfig {
        self.sleep = sleep;
        self
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    pub fn allow_http(&self) -> bool {
        self.allow_http
    }

    pub(crate) fn client(&self) -> &Arc<Client> {
        &self.client
    }
}

/// Why a Web API call failed. Never carries a token or a message's text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebApiError {
    #[error("Slack API URL {url:?} is not usable: {reason}")]
    BadUrl { url: String, reason: &'static str },
    /// Slack answered `ok: false` with `code` (e.g. `channel_not_found`).
    #[error("Slack {method} failed: {code}{}", api_hint(code, needed.as_deref(), token_var))]
    Api {
        method: &'static str,
        code: String,
        /// For `missing_scope`: the scope Slack says is needed.
        needed: Option<String>,
        /// The variable the token came from, named in the hint.
        token_var: &'static str,
    },
    #[error("Slack {method} is still rate limited (HTTP 429) after {attempts} attempts; Slack asked to wait {retry_after_secs} s: try again later")]
    RateLimited {
        method: &'static str,
        attempts: u32,
        retry_after_secs: u64,
    },
    #[error("Slack {method} answered HTTP {status}")]
    Http { method: &'static str, status: u16 },
    #[error("Slack {method}: {reason}")]
    Transport {
        method: &'static str,
        reason: String,
    },
    #[error("Slack {method} answered something unexpected: {reason}")]
    BadResponse {
        method: &'static str,
        reason: String,
    },
}

impl WebApiError {
    /// Slack's error code, for [`WebApiError::Api`].
    pub fn code(&self) -> Option<&str> {
        match self {
            WebApiError::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

fn api_hint(code: &str, needed: Option<&str>, token_var: &str) -> String {
    match code {
        "not_authed" | "invalid_auth" | "token_revoked" | "token_expired" | "account_inactive" => {
            format!(" (check {token_var}: the token is missing, wrong or revoked)")
        }
        "missing_scope" => format!(
            " (the token lacks the scope {}: add it under OAuth & Permissions and reinstall the app)",
            needed.unwrap_or("this method needs")
        ),
        "not_allowed_token_type" => format!(" ({token_var} is the wrong kind of token for this method)"),
        "channel_not_found" | "not_in_channel" => {
            " (invite the bot to the channel, or check the channel id)".to_string()
        }
        _ => String::new(),
    }
}

/// What `auth.test` says about the token.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct AuthTest {
    /// The bot's own user id (`U…`): mentions of it are mentions of moat.
    pub user_id: String,
    #[serde(default)]
    pub bot_id: Option<String>,
    #[serde(default)]
    pub team_id: Option<String>,
    #[serde(default)]
    pub team: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
}

/// A message from `conversations.replies`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Message {
    pub ts: String,
    #[serde(default)]
    pub thread_ts: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub bot_id: Option<String>,
    #[serde(default)]
    pub subtype: Option<String>,
    /// As Slack stores it (mrkdwn, `&amp;` `&lt;` `&gt;` escaped).
    #[serde(default)]
    pub text: String,
    #[serde(default)]
    pub files: Vec<FileRef>,
    /// The app's message metadata, when asked for
    /// (`include_all_metadata`): `event_type` and `event_payload`.
    #[serde(default)]
    pub metadata: Option<serde_json::Value>,
}

/// A Slack Web API client holding one token.
#[derive(Clone)]
pub struct WebApi {
    cfg: ApiConfig,
    token: Secret,
    token_var: &'static str,
}

impl fmt::Debug for WebApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebApi")
            .field("cfg", &self.cfg)
            .field("token", &self.token)
            .finish()
    }
}

#[derive(Deserialize)]
struct Envelope {
    ok: bool,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    needed: Option<String>,
}

enum Body<'a> {
    None,
    Json(&'a serde_json::Value),
    Form(&'a [(&'a str, &'a str)]),
}

/// Printable ASCII only, at most 80 characters: Slack's codes are short words.
fn clean(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_graphic())
        .take(80)
        .collect()
}

impl WebApi {
    /// A client for the bot token (`SLACK_BOT_TOKEN`, `xoxb-…`).
    pub fn new(cfg: ApiConfig, bot_token: Secret) -> WebApi {
        WebApi::with_token_var(cfg, bot_token, "SLACK_BOT_TOKEN")
    }

    /// A client for another token; `token_var` names where it came from in
    /// error hints (`SLACK_APP_TOKEN` for Socket Mode).
    pub fn with_token_var(cfg: ApiConfig, token: Secret, token_var: &'static str) -> WebApi {
        WebApi {
            cfg,
            token,
            token_var,
        }
    }

    pub fn config(&self) -> &ApiConfig {
        &self.cfg
    }

    /// `auth.test`: who the token belongs to.
    pub async fn auth_test(&self) -> Result<AuthTest, WebApiError> {
        let method = "auth.test";
        let v = self.call(method, Body::None).await?;
        decode(method, v)
    }

    /// `chat.postMessage` of mrkdwn `text` into `channel`, in the thread
    /// `thread_ts` when given. Link previews are off. Returns the new message's `ts`.
    pub async fn post_message(
        &self,
        channel: &str,
        thread_ts: Option<&str>,
        text: &str,
    ) -> Result<String, WebApiError> {
        self.post_message_with(channel, thread_ts, text, None).await
    }

    /// [`WebApi::post_message`] carrying Slack message metadata
    /// (`{"event_type": ..., "event_payload": {...}}`), which
    /// [`WebApi::conversations_replies`] returns with the message: how an
    /// app finds its own earlier messages in a thread.
    pub async fn post_message_with(
        &self,
        channel: &str,
        thread_ts: Option<&str>,
        text: &str,
        metadata: Option<&serde_json::Value>,
    ) -> Result<String, WebApiError> {
        let method = "chat.postMessage";
        let mut body = serde_json::json!({
            "channel": channel,
            "text": text,
            "mrkdwn": true,
            "unfurl_links": false,
            "unfurl_media": false,
        });
        if let Some(t) = thread_ts {
            body["thread_ts"] = t.into();
        }
        if let Some(m) = metadata {
            body["metadata"] = m.clone();
        }
        let v = self.call(method, Body::Json(&body)).await?;
        ts_of(method, &v)
    }

    /// `chat.postMessage` with Block Kit `blocks` (buttons, ...) and
    /// `text` as the notification's fallback. Returns the message's `ts`.
    pub async fn post_blocks(
        &self,
        channel: &str,
        thread_ts: Option<&str>,
        text: &str,
        blocks: &serde_json::Value,
    ) -> Result<String, WebApiError> {
        let method = "chat.postMessage";
        let mut body = serde_json::json!({
            "channel": channel,
            "text": text,
            "blocks": blocks,
            "unfurl_links": false,
            "unfurl_media": false,
        });
        if let Some(t) = thread_ts {
            body["thread_ts"] = t.into();
        }
        let v = self.call(method, Body::Json(&body)).await?;
        ts_of(method, &v)
    }

    /// `chat.update` of the bot's message `ts` to `text` and `blocks` (an
    /// empty list removes the old blocks, e.g. spent buttons).
    pub async fn update_blocks(
        &self,
        channel: &str,
        ts: &str,
        text: &str,
        blocks: &serde_json::Value,
    ) -> Result<(), WebApiError> {
        let method = "chat.update";
        let body =
            serde_json::json!({ "channel": channel, "ts": ts, "text": text, "blocks": blocks });
        self.call(method, Body::Json(&body)).await.map(drop)
    }

    /// `chat.update`: replaces the text of the bot's message `ts`.
    pub async fn update_message(
        &self,
        channel: &str,
        ts: &str,
        text: &str,
    ) -> Result<(), WebApiError> {
        let method = "chat.update";
        let body = serde_json::json!({ "channel": channel, "ts": ts, "text": text });
        self.call(method, Body::Json(&body)).await.map(drop)
    }

    /// `reactions.add` of emoji `name` (without colons) to message `ts`.
    /// Already present counts as done.
    pub async fn add_reaction(
        &self,
        channel: &str,
        ts: &str,
        name: &str,
    ) -> Result<(), WebApiError> {
        self.reaction("reactions.add", "already_reacted", channel, ts, name)
            .await
    }

    /// `reactions.remove`; already absent counts as done.
    pub async fn remove_reaction(
        &self,
        channel: &str,
        ts: &str,
        name: &str,
    ) -> Result<(), WebApiError> {
        self.reaction("reactions.remove", "no_reaction", channel, ts, name)
            .await
    }

    async fn reaction(
        &self,
        method: &'static str,
        fine: &str,
        channel: &str,
        ts: &str,
        name: &str,
    ) -> Result<(), WebApiError> {
        let body = serde_json::json!({
            "channel": channel,
            "timestamp": ts,
            "name": name.trim_matches(':'),
        });
        match self.call(method, Body::Json(&body)).await {
            Err(e) if e.code() == Some(fine) => Ok(()),
            r => r.map(drop),
        }
    }

    /// `conversations.replies`: the thread `thread_ts` in `channel`, all
    /// pages, oldest first; with `oldest`, only messages after that `ts`.
    pub async fn conversations_replies(
        &self,
        channel: &str,
        thread_ts: &str,
        oldest: Option<&str>,
    ) -> Result<Vec<Message>, WebApiError> {
        let method = "conversations.replies";
        #[derive(Deserialize)]
        struct Page {
            #[serde(default)]
            messages: Vec<Message>,
            #[serde(default)]
            response_metadata: Option<Meta>,
        }
        #[derive(Deserialize)]
        struct Meta {
            #[serde(default)]
            next_cursor: Option<String>,
        }
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let mut form = vec![
                ("channel", channel),
                ("ts", thread_ts),
                ("limit", "200"),
                ("include_all_metadata", "true"),
            ];
            if let Some(o) = oldest {
                form.push(("oldest", o));
            }
            if let Some(c) = cursor.as_deref() {
                form.push(("cursor", c));
            }
            let page: Page = decode(method, self.call(method, Body::Form(&form)).await?)?;
            out.extend(page.messages);
            cursor = page
                .response_metadata
                .and_then(|m| m.next_cursor)
                .filter(|c| !c.is_empty());
            if cursor.is_none() {
                return Ok(out);
            }
        }
        Err(WebApiError::BadResponse {
            method,
            reason: format!("more than {MAX_PAGES} pages of replies"),
        })
    }

    /// Uploads `bytes` as `filename` and shares it in `channel` (in the
    /// thread `thread_ts` when given): `files.getUploadURLExternal`, a POST
    /// of the bytes to the URL Slack returns (without the token), then
    /// `files.completeUploadExternal`. Returns the file id.
    pub async fn upload_file(
        &self,
        channel: &str,
        thread_ts: Option<&str>,
        filename: &str,
        bytes: Bytes,
        title: Option<&str>,
    ) -> Result<String, WebApiError> {
        let method = "files.getUploadURLExternal";
        #[derive(Deserialize)]
        struct Ticket {
            upload_url: String,
            file_id: String,
        }
        let length = bytes.len().to_string();
        let form = [("filename", filename), ("length", length.as_str())];
        let t: Ticket = decode(method, self.call(method, Body::Form(&form)).await?)?;

        let method = "file upload";
        let ep = transport::parse_endpoint(&t.upload_url, self.cfg.allow_http, false).map_err(
            |reason| WebApiError::BadResponse {
                method,
                reason: format!("the upload URL is not usable: {reason}"),
            },
        )?;
        let req = Request::builder()
            .method(Method::POST)
            .uri(ep.path_and_query.as_str())
            .header(header::HOST, ep.authority.as_str())
            .header(header::USER_AGENT, "moat")
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .body(Full::new(bytes))
            .map_err(|e| WebApiError::Transport {
                method,
                reason: format!("building the request: {e}"),
            })?;
        let (resp, _) = self.exchange(method, &ep, req).await?;
        if !resp.status().is_success() {
            return Err(WebApiError::Http {
                method,
                status: resp.status().as_u16(),
            });
        }

        let method = "files.completeUploadExternal";
        let mut file = serde_json::json!({ "id": t.file_id });
        if let Some(title) = title {
            file["title"] = title.into();
        }
        let files = serde_json::json!([file]).to_string();
        let mut form = vec![("files", files.as_str()), ("channel_id", channel)];
        if let Some(ts) = thread_ts {
            form.push(("thread_ts", ts));
        }
        self.call(method, Body::Form(&form)).await?;
        Ok(t.file_id)
    }

    /// `apps.connections.open` (app-level token, `connections:write`): a
    /// fresh single-use WebSocket URL for Socket Mode.
    pub async fn apps_connections_open(&self) -> Result<String, WebApiError> {
        let method = "apps.connections.open";
        #[derive(Deserialize)]
        struct Open {
            url: String,
        }
        let o: Open = decode(method, self.call(method, Body::None).await?)?;
        Ok(o.url)
    }

    /// One method call: POST to `{base}/{method}`, 429s retried, `ok` checked.
    async fn call(
        &self,
        method: &'static str,
        body: Body<'_>,
    ) -> Result<serde_json::Value, WebApiError> {
        let base = &self.cfg.base;
        let prefix = base.path_and_query.trim_end_matches('/');
        let uri = format!("{prefix}/{method}");
        let (ctype, payload) = match body {
            Body::None => (None, Bytes::new()),
            Body::Json(v) => (
                Some("application/json; charset=utf-8"),
                Bytes::from(v.to_string()),
            ),
            Body::Form(f) => (
                Some("application/x-www-form-urlencoded"),
                Bytes::from(transport::form_encode(f)),
            ),
        };
        let mut auth = header::HeaderValue::from_str(&format!("Bearer {}", self.token.expose()))
            .map_err(|_| WebApiError::Transport {
                method,
                reason: format!("{} is not a valid header value", self.token_var),
            })?;
        auth.set_sensitive(true);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut req = Request::builder()
                .method(Method::POST)
                .uri(uri.as_str())
                .header(header::HOST, base.authority.as_str())
                .header(header::USER_AGENT, "moat")
                .header(header::AUTHORIZATION, auth.clone());
            if let Some(c) = ctype {
                req = req.header(header::CONTENT_TYPE, c);
            }
            let req = req
                .body(Full::new(payload.clone()))
                .map_err(|e| WebApiError::Transport {
                    method,
                    reason: format!("building the request: {e}"),
                })?;
            let (resp, body) = self.exchange(method, base, req).await?;
            let status = resp.status();
            if status == StatusCode::TOO_MANY_REQUESTS {
                let wait = resp
                    .headers()
                    .get(header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(1);
                if attempt >= self.cfg.max_attempts {
                    return Err(WebApiError::RateLimited {
                        method,
                        attempts: attempt,
                        retry_after_secs: wait,
                    });
                }
                let d = Duration::from_secs(wait).min(self.cfg.max_retry_after);
                tracing::warn!(
                    method,
                    retry_after_secs = wait,
                    attempt,
                    "Slack rate limited this call; waiting"
                );
                (self.cfg.sleep)(d).await;
                continue;
            }
            tracing::debug!(method, status = status.as_u16(), "Slack API call");
            if !status.is_success() {
                return Err(WebApiError::Http {
                    method,
                    status: status.as_u16(),
                });
            }
            let v: serde_json::Value =
                serde_json::from_slice(&body).map_err(|_| WebApiError::BadResponse {
                    method,
                    reason: "the body is not JSON".to_string(),
                })?;
            let env = Envelope::deserialize(&v).map_err(|_| WebApiError::BadResponse {
                method,
                reason: "no \"ok\" field".to_string(),
            })?;
            if !env.ok {
                return Err(WebApiError::Api {
                    method,
                    code: env
                        .error
                        .as_deref()
                        .map(clean)
                        .unwrap_or_else(|| "unknown_error".into()),
                    needed: env.needed.as_deref().map(clean),
                    token_var: self.token_var,
                });
            }
            return Ok(v);
        }
    }

    async fn exchange(
        &self,
        method: &'static str,
        ep: &Endpoint,
        req: Request<Full<Bytes>>,
    ) -> Result<(hyper::Response<()>, Bytes), WebApiError> {
        self.cfg
            .client
            .send(ep, req, self.cfg.timeout)
            .await
            .map_err(|reason| WebApiError::Transport { method, reason })
    }
}

fn decode<T: serde::de::DeserializeOwned>(
    method: &'static str,
    v: serde_json::Value,
) -> Result<T, WebApiError> {
    T::deserialize(v).map_err(|e| WebApiError::BadResponse {
        method,
        // serde's message names the field; values are not quoted for
        // missing fields, and type errors here are about Slack's JSON.
        reason: clean_serde(&e),
    })
}

fn clean_serde(e: &serde_json::Error) -> String {
    let s = e.to_string();
    // Keep "missing field `x`" style messages; drop quoted values.
    match s.find('"') {
        Some(i) => format!("{} …", s[..i].trim_end()),
        None => s,
    }
}

fn ts_of(method: &'static str, v: &serde_json::Value) -> Result<String, WebApiError> {
    v.get("ts")
        .and_then(|t| t.as_str())
        .map(str::to_string)
        .ok_or(WebApiError::BadResponse {
            method,
            reason: "no \"ts\" in the answer".to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_refuses_plain_http_unless_allowed() {
        assert!(ApiConfig::new("http://127.0.0.1:1/api", false).is_err());
        assert!(ApiConfig::new("http://127.0.0.1:1/api", true).is_ok());
        assert!(ApiConfig::new("https://slack.com/api?x=1", false).is_err());
        assert_eq!(ApiConfig::default().base_url(), DEFAULT_API_URL);
        let e = ApiConfig::new("http://h/api", false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("http://h/api") && e.contains("explicitly allowed"),
            "{e}"
        );
    }

    #[test]
    fn error_texts_guide_the_operator() {
        let e = WebApiError::Api {
            method: "chat.postMessage",
            code: "missing_scope".into(),
            needed: Some("chat:write".into()),
            token_var: "SLACK_BOT_TOKEN",
        };
        assert_eq!(
            e.to_string(),
            "Slack chat.postMessage failed: missing_scope (the token lacks the scope chat:write: add it under OAuth & Permissions and reinstall the app)"
        );
        let e = WebApiError::Api {
            method: "apps.connections.open",
            code: "invalid_auth".into(),
            needed: None,
            token_var: "SLACK_APP_TOKEN",
        };
        assert!(e.to_string().contains("check SLACK_APP_TOKEN"), "{e}");
    }

    #[test]
    fn debug_hides_the_token() {
        let api = WebApi::new(ApiConfig::default(), Secret::new("xoxb-very-secret"));
        assert!(!format!("{api:?}").contains("very-secret"));
    }
}
