//! The LLM reverse proxy: a sandbox talks to `http://127.0.0.1:8787/anthropic`
//! or `/openai` inside its own namespace with a placeholder key; the door
//! checks the placeholder, strips every credential header, adds the host's
//! real key and forwards to the operator's upstream from the host.
//!
//! Must never: forward a request that lacks this lease's placeholder, forward
//! the placeholder or any credential the sandbox sent, show a real key in a log,
//! an error or a record, or buffer a streamed (SSE) response whole.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body::{Body, Frame};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::STEP_TIMEOUT;

/// The proxy's port on the sandbox's 127.0.0.1.
pub const LLM_PORT: u16 = 8787;
/// Largest request body, and largest non-streamed response, the proxy holds.
pub const MAX_BODY: usize = 64 * 1024 * 1024;
/// Longest SSE line the usage meter looks at (longer lines pass unread).
const MAX_SSE_LINE: usize = 1024 * 1024;

/// A credential, redacted in `Debug` and `Display`; shared with the GitHub
/// App broker.
pub use moat_creds::Secret;

/// Token totals per lease, user and channel (see its module).
pub mod ledger;
pub use ledger::UsageLedger;

/// Compares without an early exit on the first differing byte.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(crate) fn random_hex(bytes: usize) -> std::io::Result<String> {
    let mut buf = vec![0u8; bytes];
    getrandom::getrandom(&mut buf).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Provider {
    Anthropic,
    OpenAi,
}

impl Provider {
    pub fn parse(s: &str) -> Option<Provider> {
        match s {
            "anthropic" => Some(Provider::Anthropic),
            "openai" => Some(Provider::OpenAi),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Provider::Anthropic => "anthropic",
            Provider::OpenAi => "openai",
        }
    }
    /// The host variable holding the real key; also the sandbox's variable.
    pub fn key_var(self) -> &'static str {
        match self {
            Provider::Anthropic => "ANTHROPIC_API_KEY",
            Provider::OpenAi => "OPENAI_API_KEY",
        }
    }
    pub fn url_var(self) -> &'static str {
        match self {
            Provider::Anthropic => "MOAT_ANTHROPIC_URL",
            Provider::OpenAi => "MOAT_OPENAI_URL",
        }
    }
    pub fn default_url(self) -> &'static str {
        match self {
            Provider::Anthropic => "https://api.anthropic.com",
            Provider::OpenAi => "https://api.openai.com",
        }
    }
    fn base_var(self) -> &'static str {
        match self {
            Provider::Anthropic => "ANTHROPIC_BASE_URL",
            Provider::OpenAi => "OPENAI_BASE_URL",
        }
    }
    /// What the sandbox's base URL variable holds.
    fn sandbox_base(self) -> String {
        match self {
            Provider::Anthropic => format!("http://127.0.0.1:{LLM_PORT}/anthropic"),
            Provider::OpenAi => format!("http://127.0.0.1:{LLM_PORT}/openai/v1"),
        }
    }
    fn new_placeholder(self) -> std::io::Result<Secret> {
        let prefix = match self {
            Provider::Anthropic => "sk-ant-moat-",
            Provider::OpenAi => "sk-moat-",
        };
        Ok(Secret::new(format!("{prefix}{}", random_hex(16)?)))
    }
}

/// Where a provider's calls go: `http(s)://host[:port][/base]`.
#[derive(Debug, Clone)]
pub struct UpstreamUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Prefix of every forwarded path, without a trailing slash.
    pub base_path: String,
}

impl UpstreamUrl {
    pub fn parse(text: &str, allow_plain_http: bool) -> Result<UpstreamUrl, String> {
        let uri: Uri = text
            .parse()
            .map_err(|e| format!("{text:?} is not a URL: {e}"))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") if allow_plain_http => false,
            Some("http") => {
                return Err(format!(
                    "{text:?} is plain HTTP; set MOAT_LLM_ALLOW_PLAIN_HTTP=1 to allow an unencrypted upstream"
                ))
            }
            _ => return Err(format!("{text:?} must start with https://")),
        };
        let auth = uri
            .authority()
            .ok_or_else(|| format!("{text:?} has no host"))?;
        if auth.as_str().contains('@') || uri.query().is_some() {
            return Err(format!(
                "{text:?} must not hold user information or a query"
            ));
        }
        let host = auth.host().trim_start_matches('[').trim_end_matches(']');
        Ok(UpstreamUrl {
            tls,
            host: host.to_string(),
            port: auth.port_u16().unwrap_or(if tls { 443 } else { 80 }),
            base_path: uri.path().trim_end_matches('/').to_string(),
        })
    }

    /// `host[:port]` as a Host header names it (port left out when default).
    pub(crate) fn authority(&self) -> String {
        let default = if self.tls { 443 } else { 80 };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == default {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

/// One provider the proxy serves: where to, and the host's real key.
#[derive(Debug, Clone)]
pub struct ProviderConfig {
    pub provider: Provider,
    pub upstream: UpstreamUrl,
    pub key: Secret,
}

/// What the door's LLM proxy serves for one lease.
#[derive(Debug, Clone, Default)]
pub struct LlmConfig {
    pub providers: Vec<ProviderConfig>,
    /// Models a request may name; empty: any.
    pub models: Vec<String>,
    /// Tokens (input, cache and output together) the lease may use; `None`: no limit.
    pub token_budget: Option<u64>,
    /// Who the calls are for (a label for accounting, budget and audit).
    pub user: Option<String>,
    /// Where the calls come from (a chat channel; `cli` for the CLI).
    pub channel: Option<String>,
    /// Tokens `user` may use in total, as counted by `ledger`; `None`: no
    /// limit. Needs `user`.
    pub user_budget: Option<u64>,
    /// Where calls are counted per lease, user and channel; share one
    /// ledger across doors for totals that span them.
    pub ledger: Arc<UsageLedger>,
}

impl LlmConfig {
    /// Reads each provider's real key and upstream from `env` (moat's own
    /// environment in the CLI); fails naming the variable that is missing.
    pub fn from_env(
        providers: &[Provider],
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<LlmConfig, String> {
        let plain = env("MOAT_LLM_ALLOW_PLAIN_HTTP").as_deref() == Some("1");
        let mut out = LlmConfig::default();
        for &p in providers {
            if out.providers.iter().any(|c| c.provider == p) {
                continue;
            }
            let key = env(p.key_var()).filter(|k| !k.is_empty()).ok_or_else(|| {
                format!(
                    "--llm {} needs the real key in moat's environment: {} is not set \
                     (set it there or in the secrets file, --secrets FILE)",
                    p.name(),
                    p.key_var()
                )
            })?;
            let url = env(p.url_var()).unwrap_or_else(|| p.default_url().to_string());
            let upstream =
                UpstreamUrl::parse(&url, plain).map_err(|e| format!("{}: {e}", p.url_var()))?;
            out.providers.push(ProviderConfig {
                provider: p,
                upstream,
                key: Secret::new(key),
            });
        }
        Ok(out)
    }
}

/// Token counts from the API's own usage fields.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_creation_input_tokens: u64,
    pub cache_read_input_tokens: u64,
}

impl Usage {
    pub fn total(&self) -> u64 {
        self.input_tokens
            + self.output_tokens
            + self.cache_creation_input_tokens
            + self.cache_read_input_tokens
    }

    fn take(&mut self, u: &Value) {
        let n = |k: &str| u.get(k).and_then(Value::as_u64);
        if let Some(v) = n("input_tokens").or_else(|| n("prompt_tokens")) {
            self.input_tokens = v;
        }
        if let Some(v) = n("output_tokens").or_else(|| n("completion_tokens")) {
            self.output_tokens = v;
        }
        if let Some(v) = n("cache_creation_input_tokens") {
            self.cache_creation_input_tokens = v;
        }
        let cached = n("cache_read_input_tokens")
            .or_else(|| {
                u.pointer("/prompt_tokens_details/cached_tokens")
                    .and_then(Value::as_u64)
            })
            .or_else(|| {
                u.pointer("/input_tokens_details/cached_tokens")
                    .and_then(Value::as_u64)
            });
        if let Some(v) = cached {
            self.cache_read_input_tokens = v;
        }
    }

    /// Takes what one JSON document (a whole response or one SSE event) says.
    pub fn absorb(&mut self, v: &Value) {
        let kind = v.get("type").and_then(Value::as_str).unwrap_or("");
        let usage = match kind {
            "message_start" => v.pointer("/message/usage"),
            k if k.starts_with("response.") => v.pointer("/response/usage"),
            _ => v.get("usage"),
        };
        if let Some(u) = usage.filter(|u| u.is_object()) {
            self.take(u);
        }
    }
}

/// One LLM call in the audit log. Never a key, a placeholder or a body.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct LlmRecord {
    pub ts_ms: u64,
    pub lease: String,
    /// The user and channel the call was counted for.
    pub user: Option<String>,
    pub channel: Option<String>,
    /// Always `llm`.
    pub kind: &'static str,
    pub provider: &'static str,
    /// The upstream host and port.
    pub host: String,
    pub port: u16,
    /// The API path called, e.g. `/v1/messages` (no query).
    pub path: String,
    pub model: Option<String>,
    pub stream: bool,
    /// `allowed` (forwarded) or `denied` (refused by the door).
    pub verdict: &'static str,
    pub reason: Option<String>,
    /// The HTTP status the sandbox got.
    pub status: u16,
    #[serde(flatten)]
    pub usage: Usage,
    pub duration_ms: u64,
}

pub(crate) struct LlmState {
    cfg: LlmConfig,
    placeholders: Vec<(Provider, Secret)>,
    used: AtomicU64,
    tls: Arc<tokio_rustls::rustls::ClientConfig>,
}

impl LlmState {
    pub(crate) fn new(cfg: LlmConfig) -> std::io::Result<LlmState> {
        if cfg.user_budget.is_some() && cfg.user.is_none() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the LLM proxy has a per-user budget but no user; set LlmConfig::user",
            ));
        }
        let mut placeholders = Vec::new();
        for p in &cfg.providers {
            placeholders.push((p.provider, p.provider.new_placeholder()?));
        }
        let tls = upstream_tls()?;
        Ok(LlmState {
            cfg,
            placeholders,
            used: AtomicU64::new(0),
            tls,
        })
    }

    /// Starts the lease's token count again (its budget is per holder).
    pub(crate) fn reset_usage(&self) {
        self.used.store(0, Ordering::SeqCst);
    }

    /// The sandbox's variables: base URLs and placeholder keys.
    pub(crate) fn client_env(&self) -> Vec<(String, String)> {
        let mut env = Vec::new();
        for (p, ph) in &self.placeholders {
            env.push((p.base_var().to_string(), p.sandbox_base()));
            env.push((p.key_var().to_string(), ph.expose().to_string()));
        }
        env
    }

    /// Counts one call's tokens for this lease and in the ledger.
    fn count(&self, lease: &str, tokens: u64) {
        self.used.fetch_add(tokens, Ordering::SeqCst);
        self.cfg.ledger.add(
            lease,
            self.cfg.user.as_deref(),
            self.cfg.channel.as_deref(),
            tokens,
        );
    }

    /// Why a call may not go out now: the lease's or the user's budget is spent.
    fn spent(&self) -> Option<String> {
        if let Some(budget) = self.cfg.token_budget {
            let used = self.used.load(Ordering::SeqCst);
            if used >= budget {
                return Some(format!(
                    "moat: this sandbox's token budget is spent ({used} of {budget} tokens used)"
                ));
            }
        }
        if let (Some(budget), Some(user)) = (self.cfg.user_budget, self.cfg.user.as_deref()) {
            let used = self.cfg.ledger.user_total(user);
            if used >= budget {
                return Some(format!(
                    "moat: user {user}'s token budget is spent ({used} of {budget} tokens used)"
                ));
            }
        }
        None
    }

    fn placeholder(&self, p: Provider) -> Option<&Secret> {
        self.placeholders
            .iter()
            .find(|(q, _)| *q == p)
            .map(|(_, s)| s)
    }
}

type ProxyBody = BoxBody<Bytes, hyper::Error>;

fn full(b: impl Into<Bytes>) -> ProxyBody {
    Full::new(b.into())
        .map_err(|e: Infallible| match e {})
        .boxed()
}

/// An error the way the provider's own API shapes it.
fn api_error(
    p: Option<Provider>,
    status: StatusCode,
    kind: &str,
    code: &str,
    msg: &str,
) -> Response<ProxyBody> {
    let body = match p {
        Some(Provider::OpenAi) => {
            json!({"error": {"message": msg, "type": kind, "param": null, "code": code}})
        }
        _ => json!({"type": "error", "error": {"type": kind, "message": msg}}),
    };
    let mut r = Response::new(full(body.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// Serves the proxy on `listener` (inside the sandbox's namespace).
pub(crate) async fn serve(state: Arc<crate::State>, listener: tokio::net::TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let st = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let st = st.clone();
                async move { Ok::<_, Infallible>(handle(st, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(STEP_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// What the audit record of one call starts as.
struct Call {
    provider: Option<Provider>,
    host: String,
    port: u16,
    path: String,
    model: Option<String>,
    stream: bool,
    user: Option<String>,
    channel: Option<String>,
    t0: Instant,
}

impl Call {
    fn record(
        &self,
        verdict: &'static str,
        reason: Option<String>,
        status: u16,
        usage: Usage,
    ) -> LlmRecord {
        LlmRecord {
            ts_ms: 0,
            lease: String::new(),
            user: self.user.clone(),
            channel: self.channel.clone(),
            kind: "llm",
            provider: self.provider.map(Provider::name).unwrap_or("unknown"),
            host: self.host.clone(),
            port: self.port,
            path: self.path.clone(),
            model: self.model.clone(),
            stream: self.stream,
            verdict,
            reason,
            status,
            usage,
            duration_ms: self.t0.elapsed().as_millis() as u64,
        }
    }
}

async fn handle(st: Arc<crate::State>, req: Request<Incoming>) -> Response<ProxyBody> {
    let t0 = Instant::now();
    let llm = st
        .llm
        .as_ref()
        .expect("the LLM proxy runs only with a config");
    let path = req.uri().path().to_string();
    let (provider, rest) = if let Some(r) = path.strip_prefix("/anthropic/") {
        (Provider::Anthropic, r)
    } else if let Some(r) = path.strip_prefix("/openai/") {
        (Provider::OpenAi, r)
    } else {
        return api_error(
            None,
            StatusCode::NOT_FOUND,
            "not_found_error",
            "not_found",
            "moat: use /anthropic/... or /openai/...",
        );
    };
    let rest = format!("/{rest}");
    // No dot segments: a call must stay under the upstream's base path.
    if rest
        .split('/')
        .any(|seg| seg == "." || seg == ".." || seg.to_ascii_lowercase().contains("%2e"))
    {
        return api_error(
            Some(provider),
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "bad_path",
            "moat: dot segments are not allowed in the path",
        );
    }
    let pc = llm.cfg.providers.iter().find(|c| c.provider == provider);
    let mut call = Call {
        provider: Some(provider),
        host: pc.map(|c| c.upstream.host.clone()).unwrap_or_default(),
        port: pc.map(|c| c.upstream.port).unwrap_or(0),
        path: rest.clone(),
        model: None,
        stream: false,
        user: llm.cfg.user.clone(),
        channel: llm.cfg.channel.clone(),
        t0,
    };
    let deny = |call: &Call, status: StatusCode, kind: &str, code: &str, msg: String| {
        st.audit_llm(call.record(
            "denied",
            Some(msg.clone()),
            status.as_u16(),
            Usage::default(),
        ));
        api_error(Some(provider), status, kind, code, &msg)
    };
    let (Some(pc), Some(placeholder)) = (pc, llm.placeholder(provider)) else {
        let msg = format!(
            "moat: {} is not enabled for this sandbox (moat sandbox run --llm {})",
            provider.name(),
            provider.name()
        );
        return deny(
            &call,
            StatusCode::NOT_FOUND,
            "not_found_error",
            "not_found",
            msg,
        );
    };
    // The placeholder: the only credential the sandbox has, and the only one accepted.
    let presented = presented_key(provider, req.headers());
    if !presented.is_some_and(|k| constant_time_eq(k.as_bytes(), placeholder.expose().as_bytes())) {
        let msg = if presented.is_none() {
            format!(
                "moat: no API key; send this sandbox's {} placeholder",
                provider.key_var()
            )
        } else {
            format!(
                "moat: invalid API key; only this sandbox's {} placeholder is accepted",
                provider.key_var()
            )
        };
        let (kind, code) = match provider {
            Provider::Anthropic => ("authentication_error", "invalid_api_key"),
            Provider::OpenAi => ("invalid_request_error", "invalid_api_key"),
        };
        return deny(&call, StatusCode::UNAUTHORIZED, kind, code, msg);
    }
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            let msg = format!("moat: the request body is unreadable or over {MAX_BODY} bytes");
            return deny(
                &call,
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "request_too_large",
                msg,
            );
        }
    };
    let doc: Option<Value> = serde_json::from_slice(&body).ok();
    call.model = doc
        .as_ref()
        .and_then(|d| d.get("model"))
        .and_then(Value::as_str)
        .map(str::to_string);
    call.stream = doc
        .as_ref()
        .and_then(|d| d.get("stream"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if !llm.cfg.models.is_empty() && parts.method != Method::GET {
        let ok = call
            .model
            .as_ref()
            .is_some_and(|m| llm.cfg.models.iter().any(|a| a == m));
        if !ok {
            let msg = format!(
                "moat: model {} is not allowed for this sandbox; allowed: {}",
                call.model.as_deref().unwrap_or("(none)"),
                llm.cfg.models.join(", ")
            );
            let kind = match provider {
                Provider::Anthropic => "permission_error",
                Provider::OpenAi => "invalid_request_error",
            };
            return deny(&call, StatusCode::FORBIDDEN, kind, "model_not_allowed", msg);
        }
    }
    if let Some(msg) = llm.spent() {
        let kind = match provider {
            Provider::Anthropic => "rate_limit_error",
            Provider::OpenAi => "insufficient_quota",
        };
        return deny(
            &call,
            StatusCode::TOO_MANY_REQUESTS,
            kind,
            "budget_exceeded",
            msg,
        );
    }
    // The request upstream: same method, path under the base, no credential
    // or hop-by-hop header from the sandbox, the real key added.
    let up = &pc.upstream;
    let mut target = format!("{}{}", up.base_path, rest);
    if let Some(q) = parts.uri.query() {
        target.push('?');
        target.push_str(q);
    }
    let mut out = Request::builder()
        .method(parts.method.clone())
        .uri(target.as_str());
    let headers = out.headers_mut().expect("a fresh builder");
    for (k, v) in &parts.headers {
        if !strip_request_header(k) {
            headers.append(k.clone(), v.clone());
        }
    }
    let authority = up.authority();
    headers.insert(
        header::HOST,
        HeaderValue::from_str(&authority).unwrap_or(HeaderValue::from_static("invalid")),
    );
    headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    let key_header = match provider {
        Provider::Anthropic => (
            HeaderName::from_static("x-api-key"),
            pc.key.expose().to_string(),
        ),
        Provider::OpenAi => (header::AUTHORIZATION, format!("Bearer {}", pc.key.expose())),
    };
    let Ok(mut key_value) = HeaderValue::from_str(&key_header.1) else {
        let msg = format!(
            "moat: the host's {} is not a valid header value",
            provider.key_var()
        );
        return deny(&call, StatusCode::BAD_GATEWAY, "api_error", "bad_key", msg);
    };
    key_value.set_sensitive(true);
    headers.insert(key_header.0, key_value);
    let Ok(out) = out.body(Full::new(body)) else {
        return deny(
            &call,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "bad_request",
            "moat: malformed request".into(),
        );
    };
    let resp = match send_upstream(&llm.tls, up, out).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(provider = provider.name(), host = %up.host, error = %e, "LLM upstream failed");
            let msg = format!("moat: the upstream {authority} could not be reached: {e}");
            let kind = match provider {
                Provider::Anthropic => "api_error",
                Provider::OpenAi => "server_error",
            };
            return deny(&call, StatusCode::BAD_GATEWAY, kind, "upstream_error", msg);
        }
    };
    let (mut rparts, rbody) = resp.into_parts();
    strip_hop_by_hop(&mut rparts.headers);
    let is_sse = rparts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("text/event-stream"));
    let status = rparts.status.as_u16();
    if is_sse {
        call.stream = true;
        rparts.headers.remove(header::CONTENT_LENGTH);
        let metered = Metered {
            inner: rbody,
            meter: SseMeter::default(),
            done: Some((st.clone(), call, status)),
        };
        return Response::from_parts(rparts, metered.boxed());
    }
    match Limited::new(rbody, MAX_BODY).collect().await {
        Ok(b) => {
            let b = b.to_bytes();
            let mut usage = Usage::default();
            if let Ok(v) = serde_json::from_slice::<Value>(&b) {
                usage.absorb(&v);
            }
            llm.count(&st.cfg.lease, usage.total());
            st.audit_llm(call.record("allowed", None, status, usage));
            rparts.headers.remove(header::CONTENT_LENGTH);
            Response::from_parts(rparts, full(b))
        }
        Err(e) => {
            let msg =
                format!("moat: the upstream response was unreadable or over {MAX_BODY} bytes: {e}");
            deny(
                &call,
                StatusCode::BAD_GATEWAY,
                "api_error",
                "upstream_error",
                msg,
            )
        }
    }
}

/// The key the sandbox presented, by the provider's own conventions.
fn presented_key(p: Provider, h: &HeaderMap) -> Option<&str> {
    let bearer = h
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match p {
        Provider::Anthropic => h
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .or(bearer),
        Provider::OpenAi => bearer,
    }
}

/// Credentials (any of them, whoever they were meant for) and hop-by-hop headers.
fn strip_request_header(k: &HeaderName) -> bool {
    matches!(
        k.as_str(),
        "authorization"
            | "proxy-authorization"
            | "x-api-key"
            | "api-key"
            | "x-goog-api-key"
            | "cookie"
            | "host"
            | "content-length"
            | "accept-encoding"
    ) || is_hop_by_hop(k)
}

fn is_hop_by_hop(k: &HeaderName) -> bool {
    matches!(
        k.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

fn strip_hop_by_hop(h: &mut HeaderMap) {
    let names: Vec<HeaderName> = h.keys().filter(|k| is_hop_by_hop(k)).cloned().collect();
    for n in names {
        h.remove(n);
    }
    h.remove("set-cookie");
}

/// TLS to an operator-configured upstream: the Mozilla roots, HTTP/1.1.
pub(crate) fn upstream_tls() -> std::io::Result<Arc<tokio_rustls::rustls::ClientConfig>> {
    use tokio_rustls::rustls;
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(std::io::Error::other)?
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(tls))
}

/// Connects from the host (never from the sandbox's namespace) and sends `req`.
pub(crate) async fn send_upstream<B>(
    tls: &Arc<tokio_rustls::rustls::ClientConfig>,
    up: &UpstreamUrl,
    req: Request<B>,
) -> Result<Response<Incoming>, String>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = tokio::time::timeout(
        STEP_TIMEOUT,
        tokio::net::TcpStream::connect((up.host.as_str(), up.port)),
    )
    .await
    .map_err(|_| "connect timed out".to_string())?
    .map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    if !up.tls {
        return exchange(tcp, req).await;
    }
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from(up.host.clone())
        .map_err(|e| e.to_string())?;
    let stream = tokio::time::timeout(
        STEP_TIMEOUT,
        tokio_rustls::TlsConnector::from(tls.clone()).connect(name, tcp),
    )
    .await
    .map_err(|_| "TLS handshake timed out".to_string())?
    .map_err(|e| format!("TLS: {e}"))?;
    exchange(stream, req).await
}

async fn exchange<S, B>(s: S, req: Request<B>) -> Result<Response<Incoming>, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender.send_request(req).await.map_err(|e| e.to_string())
}

/// Reads `data:` lines of a server-sent event stream as they pass.
#[derive(Default)]
struct SseMeter {
    line: Vec<u8>,
    overlong: bool,
    usage: Usage,
    /// The API's last event passed (`message_stop`, `response.completed`,
    /// `[DONE]`, ...): a client that goes away now has the whole answer.
    complete: bool,
}

impl SseMeter {
    fn feed(&mut self, mut chunk: &[u8]) {
        while !chunk.is_empty() {
            match chunk.iter().position(|b| *b == b'\n') {
                Some(i) => {
                    self.push(&chunk[..i]);
                    self.end_line();
                    chunk = &chunk[i + 1..];
                }
                None => {
                    self.push(chunk);
                    chunk = &[];
                }
            }
        }
    }
    fn push(&mut self, b: &[u8]) {
        if self.line.len() + b.len() > MAX_SSE_LINE {
            self.overlong = true;
            self.line.clear();
        } else if !self.overlong {
            self.line.extend_from_slice(b);
        }
    }
    fn end_line(&mut self) {
        let line = std::mem::take(&mut self.line);
        let overlong = std::mem::replace(&mut self.overlong, false);
        if overlong {
            return;
        }
        let line = line.strip_suffix(b"\r").unwrap_or(&line);
        if let Some(data) = line.strip_prefix(b"data:") {
            if data.trim_ascii() == b"[DONE]" {
                self.complete = true;
            } else if let Ok(v) = serde_json::from_slice::<Value>(data) {
                self.usage.absorb(&v);
                let last = matches!(
                    v.get("type").and_then(Value::as_str),
                    Some(
                        "message_stop"
                            | "response.completed"
                            | "response.failed"
                            | "response.incomplete"
                    )
                );
                self.complete |= last;
            }
        }
    }
}

/// A streamed response body: each frame passes on as it arrives; the usage
/// it carried is counted and audited when the stream ends or is dropped.
struct Metered {
    inner: Incoming,
    meter: SseMeter,
    done: Option<(Arc<crate::State>, Call, u16)>,
}

impl Metered {
    fn finish(&mut self, reason: Option<String>) {
        if let Some((st, call, status)) = self.done.take() {
            let usage = std::mem::take(&mut self.meter.usage);
            if let Some(llm) = st.llm.as_ref() {
                llm.count(&st.cfg.lease, usage.total());
            }
            st.audit_llm(call.record("allowed", reason, status, usage));
        }
    }
}

impl Body for Metered {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    this.meter.feed(d);
                }
                // A stream with a Content-Length ends with its last frame:
                // hyper stops polling then, so the record is written here.
                if this.inner.is_end_stream() {
                    this.finish(None);
                }
            }
            Poll::Ready(None) => this.finish(None),
            Poll::Ready(Some(Err(e))) => this.finish(Some(format!("upstream stream failed: {e}"))),
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        // A client may hang up once it has the API's last event, before the
        // body's own end arrives: that stream was whole.
        let reason =
            (!self.meter.complete).then(|| "the client closed the stream early".to_string());
        self.finish(reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("sk-real-123");
        assert!(!format!("{s:?} {s}").contains("sk-real"));
    }

    #[test]
    fn plain_http_needs_an_explicit_yes() {
        assert!(UpstreamUrl::parse("http://127.0.0.1:9", false).is_err());
        let u = UpstreamUrl::parse("http://127.0.0.1:9/base/", true).unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port, u.base_path.as_str()),
            (false, "127.0.0.1", 9, "/base")
        );
        let u = UpstreamUrl::parse("https://api.anthropic.com", false).unwrap();
        assert_eq!(
            (u.tls, u.port, u.authority()),
            (true, 443, "api.anthropic.com".to_string())
        );
        assert!(UpstreamUrl::parse("ftp://x", true).is_err());
        assert!(UpstreamUrl::parse("https://u:p@x", true).is_err());
    }

    #[test]
    fn a_missing_key_names_its_variable() {
        let e = LlmConfig::from_env(&[Provider::OpenAi], |_| None).unwrap_err();
        assert!(e.contains("OPENAI_API_KEY"), "{e}");
        let c = LlmConfig::from_env(&[Provider::Anthropic], |k| {
            (k == "ANTHROPIC_API_KEY").then(|| "k".into())
        })
        .unwrap();
        assert_eq!(c.providers[0].upstream.host, "api.anthropic.com");
        assert!(!format!("{c:?}").contains("\"k\""));
    }

    #[test]
    fn usage_comes_from_each_apis_own_fields() {
        let mut m = SseMeter::default();
        m.feed(b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"cache_creation_input_tokens\":3,\"cache_read_input_tokens\":7,\"output_tokens\":1}}}\n\n");
        m.feed(b"event: message_delta\r\ndata: {\"type\":\"message_delta\",\"usa");
        m.feed(b"ge\":{\"output_tokens\":15}}\r\n\r\n");
        assert_eq!(
            m.usage,
            Usage {
                input_tokens: 25,
                output_tokens: 15,
                cache_creation_input_tokens: 3,
                cache_read_input_tokens: 7
            }
        );
        let mut u = Usage::default();
        u.absorb(&json!({"object":"chat.completion","usage":{"prompt_tokens":9,"completion_tokens":12,"prompt_tokens_details":{"cached_tokens":4}}}));
        assert_eq!(
            (u.input_tokens, u.output_tokens, u.cache_read_input_tokens),
            (9, 12, 4)
        );
        let mut u = Usage::default();
        u.absorb(&json!({"type":"response.completed","response":{"usage":{"input_tokens":5,"output_tokens":6}}}));
        assert_eq!(u.total(), 11);
        let mut u = Usage::default();
        u.absorb(&json!({"choices":[],"usage":null}));
        assert_eq!(u.total(), 0);
    }

    fn state(user: Option<&str>, user_budget: Option<u64>, ledger: &Arc<UsageLedger>) -> LlmState {
        LlmState::new(LlmConfig {
            user: user.map(str::to_string),
            channel: Some("chat-1".into()),
            user_budget,
            ledger: ledger.clone(),
            ..LlmConfig::default()
        })
        .unwrap()
    }

    #[test]
    fn a_users_budget_spans_every_door_sharing_the_ledger() {
        let ledger = Arc::new(UsageLedger::new());
        let a = state(Some("alice"), None, &ledger);
        let b = state(Some("alice"), Some(100), &ledger);
        let bob = state(Some("bob"), Some(100), &ledger);
        a.count("lease-a", 60);
        assert_eq!(b.spent(), None, "60 of 100");
        a.count("lease-a", 40);
        let msg = b.spent().expect("alice has used 100 of 100");
        assert!(
            msg.contains("user alice's token budget is spent (100 of 100 tokens used)"),
            "{msg}"
        );
        assert_eq!(bob.spent(), None, "bob's budget is his own");
        bob.count("lease-bob", 7);
        assert_eq!(ledger.lease_total("lease-a"), 100);
        assert_eq!(ledger.lease_total("lease-bob"), 7);
        assert_eq!(ledger.channel_total("chat-1"), 107);
        assert_eq!(ledger.user_total("alice"), 100);
    }

    #[test]
    fn the_lease_budget_still_counts_this_door_only() {
        let ledger = Arc::new(UsageLedger::new());
        let mut cfg = LlmConfig {
            user: Some("alice".into()),
            token_budget: Some(50),
            user_budget: Some(1000),
            ledger: ledger.clone(),
            ..LlmConfig::default()
        };
        let other = LlmState::new(cfg.clone()).unwrap();
        other.count("other", 500);
        let this = LlmState::new(cfg.clone()).unwrap();
        assert_eq!(
            this.spent(),
            None,
            "another door's tokens are not this lease's"
        );
        this.count("this", 50);
        let msg = this.spent().unwrap();
        assert!(
            msg.contains("this sandbox's token budget is spent (50 of 50"),
            "{msg}"
        );
        cfg.token_budget = None;
        cfg.user_budget = Some(550);
        let msg = LlmState::new(cfg).unwrap().spent().unwrap();
        assert!(
            msg.contains("user alice's token budget is spent (550 of 550"),
            "{msg}"
        );
    }

    #[test]
    fn a_user_budget_needs_a_user() {
        let e = LlmState::new(LlmConfig {
            user_budget: Some(1),
            ..LlmConfig::default()
        })
        .err()
        .expect("refused");
        assert!(e.to_string().contains("no user"), "{e}");
    }

    #[test]
    fn records_carry_user_and_channel() {
        let call = Call {
            provider: Some(Provider::Anthropic),
            host: "h".into(),
            port: 1,
            path: "/v1/messages".into(),
            model: None,
            stream: false,
            user: Some("alice".into()),
            channel: Some("cli".into()),
            t0: Instant::now(),
        };
        let v = serde_json::to_value(call.record("allowed", None, 200, Usage::default())).unwrap();
        assert_eq!(
            (v["user"].as_str(), v["channel"].as_str()),
            (Some("alice"), Some("cli"))
        );
        assert_eq!(v["kind"], "llm");
    }

    #[test]
    fn the_last_event_of_each_api_completes_a_stream() {
        for last in [
            "data: {\"type\":\"message_stop\"}\n\n",
            "data: {\"type\":\"response.completed\",\"response\":{}}\n\n",
            "data: [DONE]\n\n",
        ] {
            let mut m = SseMeter::default();
            m.feed(b"data: {\"type\":\"message_start\",\"message\":{}}\n\n");
            assert!(!m.complete);
            m.feed(last.as_bytes());
            assert!(m.complete, "{last}");
        }
    }

    #[test]
    fn keys_compare_whole() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }

    #[test]
    fn presented_keys_follow_each_api() {
        let mut h = HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_static("a"));
        assert_eq!(presented_key(Provider::Anthropic, &h), Some("a"));
        assert_eq!(presented_key(Provider::OpenAi, &h), None);
        h.insert("authorization", HeaderValue::from_static("Bearer b"));
        assert_eq!(presented_key(Provider::OpenAi, &h), Some("b"));
    }
}
