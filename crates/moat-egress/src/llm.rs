//! The LLM reverse proxy: a sandbox talks to `http://127.0.0.1:8787/anthropic`
//! or `/openai` inside its own namespace with a placeholder key; the door
//! checks the placeholder, strips every credential header, adds the host's
//! real key and forwards to the operator's upstream from the host. This module
//! owns the configuration, the per-lease state (placeholders, token count,
//! budget) and the usage and audit types; the request path is in `proxy`,
//! the judging of requests in `judge`, streams in `stream`, redaction of
//! echoed keys in `redact`.
//!
//! Must never: forward a request that lacks this lease's placeholder, forward
//! the placeholder or any credential the sandbox sent, show a real key in a
//! log, an error, a record or anything the sandbox receives, or buffer a
//! streamed (SSE) response whole.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;

/// The proxy's port on the sandbox's 127.0.0.1.
pub const LLM_PORT: u16 = 8787;
/// Largest request body, and largest non-streamed response, the proxy holds.
pub const MAX_BODY: usize = 64 * 1024 * 1024;

/// A credential, redacted in `Debug` and `Display`; shared with the GitHub
/// App broker.
pub use moat_creds::Secret;

/// Token totals per lease, user and channel (see its module).
pub mod ledger;
pub use ledger::UsageLedger;
/// What the door decides about a request (see its module).
pub mod judge;
pub use judge::Refusal;
/// The proxy's request handling (see its module).
mod proxy;
/// Real keys out of what comes back (see its module).
pub mod redact;
/// Streamed responses: metering, redaction, charging abandoned streams.
pub mod stream;
/// Where a provider's calls go (the door's upstream client; re-exported).
pub use crate::upstream::UpstreamUrl;
pub(crate) use crate::upstream::{send_upstream, upstream_tls};
pub(crate) use proxy::{serve, Call};

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
    /// Tokens one user may use through `channel` in a rolling window (the
    /// gateway's `budget_user`); the user is the turn's, set on the door
    /// for each turn ([`crate::Door::set_llm_user`]). Needs `channel`.
    pub user_window_budget: Option<WindowBudget>,
}

/// A token budget over a rolling window, e.g. 200,000 a day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowBudget {
    pub tokens: u64,
    pub window_ms: u64,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn window_name(ms: u64) -> String {
    match ms {
        3_600_000 => "hour".to_string(),
        86_400_000 => "24 hours".to_string(),
        604_800_000 => "7 days".to_string(),
        _ => format!("{} minutes", ms / 60_000),
    }
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
    /// The sum, saturating: counts come from the upstream's JSON (any u64),
    /// and a sum that wrapped would charge a call almost nothing.
    pub fn total(&self) -> u64 {
        self.input_tokens
            .saturating_add(self.output_tokens)
            .saturating_add(self.cache_creation_input_tokens)
            .saturating_add(self.cache_read_input_tokens)
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
    /// Why a call was refused, as a type (`denied` records only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refusal: Option<Refusal>,
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
    /// Each real key and the placeholder it becomes in what comes back.
    keys: redact::Keys,
    /// Tokens held for calls forwarded but not counted yet (in flight, or
    /// streams read on after their client left); see [`Pending`].
    reserved: AtomicU64,
    /// Makes "judge the budget, then hold the call's estimate" one step.
    admitting: std::sync::Mutex<()>,
    /// The user of the turn the lease serves now (a pooled lease serves one
    /// user after another); `None`: `cfg.user`.
    turn_user: std::sync::Mutex<Option<String>>,
}

/// The largest estimate one call holds (see [`Pending::hold`]).
const MAX_HOLD: u64 = 1 << 40;

/// A call the budget has not counted yet: until it is, the budget holds its
/// estimate (input as sent, output at the request's limit), so a client
/// cannot start more calls than the budget covers while earlier ones, or
/// ones it hung up on, are still running. Dropped after the call is counted.
pub(crate) struct Pending(Arc<crate::State>, u64);

impl Pending {
    pub(crate) fn hold(st: &Arc<crate::State>, tokens: u64) -> Pending {
        // A sandbox names the estimate (`max_tokens`): bounded, so that no
        // number of holds at once can wrap the sum (2^40 is far above any
        // budget, and 2^24 calls would have to be held to reach u64::MAX).
        let tokens = tokens.min(MAX_HOLD);
        if let Some(l) = st.llm.as_ref() {
            l.reserved.fetch_add(tokens, Ordering::SeqCst);
        }
        Pending(st.clone(), tokens)
    }
}

impl Pending {
    /// Lets the budget go of the estimate (the call has been counted).
    pub(crate) fn release(self) {}
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(l) = self.0.llm.as_ref() {
            l.reserved.fetch_sub(self.1, Ordering::SeqCst);
        }
    }
}

impl LlmState {
    pub(crate) fn new(cfg: LlmConfig) -> std::io::Result<LlmState> {
        if cfg.user_window_budget.is_some() && cfg.channel.is_none() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the LLM proxy has a per-user budget in a channel but no channel; set LlmConfig::channel",
            ));
        }
        if cfg.user_budget.is_some() && cfg.user.is_none() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the LLM proxy has a per-user budget but no user; set LlmConfig::user",
            ));
        }
        let mut placeholders = Vec::new();
        let mut keys = Vec::new();
        for p in &cfg.providers {
            let ph = p.provider.new_placeholder()?;
            keys.push((
                p.key.expose().as_bytes().to_vec(),
                ph.expose().as_bytes().to_vec(),
            ));
            placeholders.push((p.provider, ph));
        }
        let tls = upstream_tls()?;
        Ok(LlmState {
            cfg,
            placeholders,
            used: AtomicU64::new(0),
            tls,
            keys: redact::Keys::new(keys),
            reserved: AtomicU64::new(0),
            admitting: std::sync::Mutex::new(()),
            turn_user: std::sync::Mutex::new(None),
        })
    }

    /// Sets who the calls from now on are for (the turn's user).
    pub(crate) fn set_turn_user(&self, user: Option<&str>) {
        *self.turn_user.lock().unwrap_or_else(|e| e.into_inner()) = user.map(str::to_string);
    }

    /// Who the calls are for: the turn's user, else the configured one.
    pub(crate) fn user(&self) -> Option<String> {
        self.turn_user
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .or_else(|| self.cfg.user.clone())
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
        // Saturating: a wrapped counter would give the budget back.
        let _ = self
            .used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| {
                Some(u.saturating_add(tokens))
            });
        self.cfg.ledger.add(
            lease,
            self.user().as_deref(),
            self.cfg.channel.as_deref(),
            tokens,
            now_ms(),
        );
    }

    /// Lets a call go out if the budget allows, holding `tokens` for it
    /// until it is counted; otherwise why not.
    pub(crate) fn admit(&self, st: &Arc<crate::State>, tokens: u64) -> Result<Pending, String> {
        let _one = self.admitting.lock().unwrap_or_else(|e| e.into_inner());
        match self.spent() {
            Some(msg) => Err(msg),
            None => Ok(Pending::hold(st, tokens)),
        }
    }

    /// Why a call may not go out now: the lease's or the user's budget is
    /// spent, counting what calls still running hold.
    fn spent(&self) -> Option<String> {
        let reserved = self.reserved.load(Ordering::SeqCst);
        let held = |used: u64, budget: u64| {
            if reserved == 0 {
                format!("({used} of {budget} tokens used)")
            } else {
                format!(
                    "({used} of {budget} tokens used, {reserved} more held for calls not yet counted)"
                )
            }
        };
        if let Some(budget) = self.cfg.token_budget {
            let used = self.used.load(Ordering::SeqCst);
            if used.saturating_add(reserved) >= budget {
                return Some(format!(
                    "moat: this sandbox's token budget is spent {}",
                    held(used, budget)
                ));
            }
        }
        if let (Some(b), Some(user), Some(channel)) = (
            self.cfg.user_window_budget,
            self.user(),
            self.cfg.channel.as_deref(),
        ) {
            let since = now_ms().saturating_sub(b.window_ms);
            let used = self.cfg.ledger.user_in_channel_since(channel, &user, since);
            if used.saturating_add(reserved) >= b.tokens {
                return Some(format!(
                    "moat: user {user}'s token budget in this channel for the last {} is spent {}; ask an admin to raise budget_user, or wait",
                    window_name(b.window_ms),
                    held(used, b.tokens)
                ));
            }
        }
        if let (Some(budget), Some(user)) = (self.cfg.user_budget, self.cfg.user.as_deref()) {
            let used = self.cfg.ledger.user_total(user);
            if used.saturating_add(reserved) >= budget {
                return Some(format!(
                    "moat: user {user}'s token budget is spent {}",
                    held(used, budget)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("sk-real-123");
        assert!(!format!("{s:?} {s}").contains("sk-real"));
    }

    /// Found while writing the sse_stream fuzz target (which now checks it):
    /// usage counts an upstream sends are any u64, and their sum overflowed
    /// (a panic in debug builds, a wrapped, tiny charge in release).
    #[test]
    fn usage_totals_saturate_instead_of_wrapping() {
        let u = Usage {
            input_tokens: u64::MAX,
            output_tokens: 1,
            cache_creation_input_tokens: u64::MAX,
            cache_read_input_tokens: 2,
        };
        assert_eq!(u.total(), u64::MAX);
        let mut m = stream::SseMeter::default();
        m.feed(b"data: {\"usage\":{\"input_tokens\":18446744073709551615,\"output_tokens\":1}}\n");
        assert_eq!(m.usage.total(), u64::MAX);
        let (charged, _) = stream::Estimate::new(4, Some(8), true).charge(u, false);
        assert_eq!(charged.total(), u64::MAX);
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
    fn a_pooled_leases_turn_user_has_a_budget_per_channel_and_window() {
        let ledger = Arc::new(UsageLedger::new());
        let door = |channel: &str| {
            LlmState::new(LlmConfig {
                channel: Some(channel.into()),
                ledger: ledger.clone(),
                user_window_budget: Some(WindowBudget {
                    tokens: 100,
                    window_ms: 86_400_000,
                }),
                ..LlmConfig::default()
            })
            .unwrap()
        };
        let pooled = door("chat-1");
        // No turn user yet: nothing to judge, and calls count for no user.
        assert_eq!(pooled.spent(), None);
        pooled.set_turn_user(Some("alice"));
        pooled.count("lease-1", 60);
        assert_eq!(pooled.spent(), None);
        // Another lease of the same channel, the same user: one total.
        let other = door("chat-1");
        other.set_turn_user(Some("alice"));
        other.count("lease-2", 40);
        let msg = pooled.spent().expect("alice's day is spent");
        assert!(
            msg.contains("user alice's token budget in this channel for the last 24 hours is spent (100 of 100"),
            "{msg}"
        );
        // The next holder of the lease is someone else: their own budget.
        pooled.set_turn_user(Some("bob"));
        assert_eq!(pooled.spent(), None);
        assert_eq!(pooled.user().as_deref(), Some("bob"));
        // Alice in another channel: that channel's count.
        let elsewhere = door("chat-2");
        elsewhere.set_turn_user(Some("alice"));
        assert_eq!(elsewhere.spent(), None);
        assert!(LlmState::new(LlmConfig {
            user_window_budget: Some(WindowBudget {
                tokens: 1,
                window_ms: 1
            }),
            ..LlmConfig::default()
        })
        .is_err());
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
    fn keys_compare_whole() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
