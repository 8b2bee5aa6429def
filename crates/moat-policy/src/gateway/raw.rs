//! The TOML shape of the gateway's configuration file (serde's raw form,
//! unknown keys refused) and the small checks every section shares.
//!
//! Must never: accept a secret in the file or a key it does not know.

use super::*;
// ---- the file format ------------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFile {
    #[serde(default)]
    pub(super) gateway: RawGateway,
    #[serde(default)]
    pub(super) web: RawWeb,
    #[serde(default)]
    pub(super) admin: RawAdmin,
    #[serde(default)]
    pub(super) slack: RawSlack,
    #[serde(default)]
    pub(super) telegram: crate::platforms::RawTelegram,
    #[serde(default)]
    pub(super) whatsapp: crate::platforms::RawWhatsApp,
    #[serde(default)]
    pub(super) discord: crate::platforms::RawDiscord,
    #[serde(default)]
    pub(super) pool: RawPool,
    #[serde(default)]
    pub(super) defaults: RawSettings,
    #[serde(default)]
    pub(super) group: Vec<RawGroup>,
    #[serde(default)]
    pub(super) channel: Vec<RawChannel>,
    #[serde(default)]
    pub(super) mcp: Vec<RawMcp>,
    #[serde(default)]
    pub(super) llm: RawGatewayLlm,
    #[serde(default)]
    pub(super) agents: RawAgents,
    #[serde(default)]
    pub(super) github: crate::github::RawGithubSection,
    #[serde(default)]
    pub(super) amp: RawGatewayAmp,
    #[serde(default)]
    pub(super) memory: crate::memory::RawMemory,
    #[serde(default)]
    pub(super) mounts: crate::memory::RawMounts,
    #[serde(default)]
    pub(super) tasks: crate::tasks::RawTasks,
    #[serde(default)]
    pub(super) ipc: crate::tasks::RawIpc,
    #[serde(default)]
    pub(super) store: crate::store::RawStore,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGateway {
    pub(super) data_dir: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWeb {
    pub(super) enabled: Option<bool>,
    pub(super) listen: Option<String>,
    pub(super) auth: Option<String>,
    pub(super) header: Option<String>,
    pub(super) token_env: Option<String>,
    pub(super) trusted_proxies: Option<Vec<String>>,
    pub(super) allowed_hosts: Option<Vec<String>>,
    // Present only to refuse them with a precise message: secrets never go here.
    pub(super) token: Option<toml::Value>,
    pub(super) tokens: Option<toml::Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub(super) listen: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSlack {
    pub(super) mode: Option<String>,
    pub(super) api_url: Option<String>,
    pub(super) listen: Option<String>,
    pub(super) signing_secret: Option<toml::Value>,
    pub(super) bot_token: Option<toml::Value>,
    pub(super) app_token: Option<toml::Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPool {
    pub(super) size: Option<i64>,
    pub(super) min: Option<i64>,
    pub(super) max: Option<i64>,
    pub(super) max_waiters: Option<i64>,
    pub(super) shrink_after: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGroup {
    pub(super) name: String,
    pub(super) users: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRate {
    pub(super) user: Option<String>,
    pub(super) channel: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub(super) memory: Option<String>,
    pub(super) pids: Option<i64>,
    pub(super) cpus: Option<f64>,
    pub(super) timeout: Option<String>,
}

/// The keys `[defaults]` and `[[channel]]` share.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSettings {
    pub(super) trust: Option<String>,
    pub(super) users: Option<Vec<String>>,
    pub(super) admins: Option<Vec<String>>,
    pub(super) sandbox: Option<String>,
    pub(super) idle_delete: Option<String>,
    pub(super) disk: Option<String>,
    pub(super) image: Option<String>,
    pub(super) root_inside: Option<bool>,
    pub(super) agent: Option<String>,
    pub(super) debounce: Option<String>,
    pub(super) rate: Option<RawRate>,
    pub(super) backend: Option<String>,
    pub(super) egress: Option<Vec<String>>,
    pub(super) resolve: Option<BTreeMap<String, String>>,
    pub(super) limits: Option<RawLimits>,
    pub(super) provider: Option<String>,
    pub(super) model: Option<String>,
    pub(super) tools: Option<Vec<String>>,
    pub(super) mcp: Option<Vec<String>>,
    pub(super) max_steps: Option<i64>,
    pub(super) persona: Option<String>,
    pub(super) budget: Option<i64>,
    pub(super) budget_user: Option<String>,
    pub(super) artifacts: Option<RawArtifacts>,
    pub(super) github: Option<crate::github::RawChannelGithub>,
    pub(super) mounts: Option<Vec<crate::memory::RawChannelMount>>,
    pub(super) conversation: Option<String>,
    pub(super) trigger: Option<String>,
    pub(super) mention: Option<String>,
    pub(super) approve: Option<Vec<String>>,
    pub(super) approve_timeout: Option<String>,
    pub(super) unknown: Option<String>,
}

// serde's `flatten` cannot be combined with `deny_unknown_fields`, so a
// channel repeats the shared keys; `into_parts` hands them over.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawChannel {
    pub(super) platform: String,
    pub(super) id: String,
    pub(super) trust: Option<String>,
    pub(super) users: Option<Vec<String>>,
    pub(super) admins: Option<Vec<String>>,
    pub(super) sandbox: Option<String>,
    pub(super) idle_delete: Option<String>,
    pub(super) disk: Option<String>,
    pub(super) image: Option<String>,
    pub(super) root_inside: Option<bool>,
    pub(super) agent: Option<String>,
    pub(super) debounce: Option<String>,
    pub(super) rate: Option<RawRate>,
    pub(super) backend: Option<String>,
    pub(super) egress: Option<Vec<String>>,
    pub(super) resolve: Option<BTreeMap<String, String>>,
    pub(super) limits: Option<RawLimits>,
    pub(super) provider: Option<String>,
    pub(super) model: Option<String>,
    pub(super) tools: Option<Vec<String>>,
    pub(super) mcp: Option<Vec<String>>,
    pub(super) max_steps: Option<i64>,
    pub(super) persona: Option<String>,
    pub(super) budget: Option<i64>,
    pub(super) budget_user: Option<String>,
    pub(super) artifacts: Option<RawArtifacts>,
    pub(super) github: Option<crate::github::RawChannelGithub>,
    pub(super) mounts: Option<Vec<crate::memory::RawChannelMount>>,
    pub(super) conversation: Option<String>,
    pub(super) trigger: Option<String>,
    pub(super) mention: Option<String>,
    pub(super) approve: Option<Vec<String>>,
    pub(super) approve_timeout: Option<String>,
    pub(super) unknown: Option<String>,
}

impl RawChannel {
    pub(super) fn into_parts(self) -> (String, String, RawSettings) {
        let s = RawSettings {
            trust: self.trust,
            users: self.users,
            admins: self.admins,
            sandbox: self.sandbox,
            idle_delete: self.idle_delete,
            disk: self.disk,
            image: self.image,
            root_inside: self.root_inside,
            agent: self.agent,
            debounce: self.debounce,
            rate: self.rate,
            backend: self.backend,
            egress: self.egress,
            resolve: self.resolve,
            limits: self.limits,
            provider: self.provider,
            model: self.model,
            tools: self.tools,
            mcp: self.mcp,
            max_steps: self.max_steps,
            persona: self.persona,
            budget: self.budget,
            budget_user: self.budget_user,
            artifacts: self.artifacts,
            github: self.github,
            mounts: self.mounts,
            conversation: self.conversation,
            trigger: self.trigger,
            mention: self.mention,
            approve: self.approve,
            approve_timeout: self.approve_timeout,
            unknown: self.unknown,
        };
        (self.platform, self.id, s)
    }
}

pub(super) fn err(key: impl Into<String>, message: impl Into<String>) -> PolicyError {
    PolicyError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// A serde path as a configuration key (`channel[0].users`), with a key
/// whose name is empty written `""` (the library's own form leaves it
/// blank, and an error must name its key).
pub(super) fn key_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for (i, seg) in path.iter().enumerate() {
        if i > 0 && !matches!(seg, Segment::Seq { .. }) {
            out.push('.');
        }
        match seg {
            Segment::Map { key } if key.is_empty() => out.push_str("\"\""),
            seg => out.push_str(&seg.to_string()),
        }
    }
    if out.is_empty() {
        out.push_str("(top level)");
    }
    out
}

pub(super) fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
}

/// A duration within `min..=max`; fractions get a hint instead of parse_duration's
/// "unknown unit".
pub(super) fn duration_in(
    text: &str,
    key: &str,
    min: Duration,
    max: Duration,
) -> Result<Duration, PolicyError> {
    if text.contains('.') {
        return Err(err(
            key,
            format!("{text:?}: write whole numbers with a smaller unit, e.g. \"1500ms\" for 1.5s"),
        ));
    }
    let d = parse_duration(text).map_err(|m| err(key, m))?;
    if d < min || d > max {
        return Err(err(
            key,
            format!(
                "{} is out of range; use {} to {}",
                format_duration(d),
                format_duration(min),
                format_duration(max)
            ),
        ));
    }
    Ok(d)
}

pub(super) fn listen_addr(text: &str, key: &str) -> Result<SocketAddr, PolicyError> {
    text.trim().parse::<SocketAddr>().map_err(|_| {
        err(
            key,
            format!("{text:?} is not an address and port; write e.g. \"127.0.0.1:8080\" or \"[::1]:8080\" (names are not resolved)"),
        )
    })
}

/// Whether two listeners would fight over one socket. Port 0 (any free port)
/// never clashes; an unspecified address (`0.0.0.0`, `[::]`) covers every address.
pub(super) fn clash(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (canonical_ip(a.ip()) == canonical_ip(b.ip())
            || a.ip().is_unspecified()
            || b.ip().is_unspecified())
}

pub(super) fn env_name_ok(name: &str) -> bool {
    !name.is_empty()
        && !name.as_bytes()[0].is_ascii_digit()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

pub(super) fn secret_here(key: &str, instead: &str) -> PolicyError {
    err(
        key,
        format!("secrets never go in the configuration file; {instead}"),
    )
}

/// `http://` is accepted only for a loopback host (tests, a local proxy): the
/// bot token travels in every request.
pub(super) fn slack_api_url(text: &str, key: &str) -> Result<String, PolicyError> {
    let url = text.trim().trim_end_matches('/');
    let (secure, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(err(
            key,
            format!("{text:?} is not a URL; write https://host[:port][/base], e.g. \"https://slack.com/api\""),
        ));
    };
    let authority = rest.split('/').next().unwrap_or("");
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    if host.is_empty() || authority.contains('@') || url.contains(char::is_whitespace) {
        return Err(err(
            key,
            format!("{text:?} is not a URL; write https://host[:port][/base]"),
        ));
    }
    let loopback = host.eq_ignore_ascii_case("localhost")
        || parse_ip_literal(host).is_some_and(|ip| ip.is_loopback());
    if !secure && !loopback {
        return Err(err(
            key,
            format!("{text:?} would send the bot token unencrypted; use https:// (http:// only for a loopback host)"),
        ));
    }
    Ok(url.to_string())
}

/// `[pool]`'s sizes: `size` alone is a fixed pool (the older form); `min`
/// and `max` an elastic one; neither: 2 warm, up to 16.
pub(super) fn pool_config(raw: &RawPool) -> Result<PoolConfig, PolicyError> {
    const LIMIT: i64 = 256;
    let (size, max) = match (raw.size, raw.min, raw.max) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
            return Err(err(
                "pool.size",
                "is the fixed size of the older form; with pool.min or pool.max, leave it out (min = leases kept warm, max = the most it grows to)",
            ))
        }
        (Some(n), None, None) => {
            let n = nonneg(n, "pool.size", LIMIT, "leases")?;
            (n, n)
        }
        (None, min, max) => {
            let min = nonneg(min.unwrap_or(2), "pool.min", LIMIT, "leases")?;
            let max = match max {
                Some(m) => nonneg(m, "pool.max", LIMIT, "leases")?,
                None => min.max(16),
            };
            if max < min {
                return Err(err(
                    "pool.max",
                    format!("{max} is below pool.min = {min}; set max to {min} or more"),
                ));
            }
            (min, max)
        }
    };
    let shrink_after = match &raw.shrink_after {
        Some(t) => duration_in(
            t,
            "pool.shrink_after",
            Duration::from_secs(1),
            Duration::from_secs(24 * 3600),
        )?,
        None => Duration::from_secs(300),
    };
    Ok(PoolConfig {
        size,
        max,
        max_waiters: 16,
        shrink_after,
    })
}

pub(super) fn nonneg(v: i64, key: &str, max: i64, what: &str) -> Result<u32, PolicyError> {
    if !(0..=max).contains(&v) {
        return Err(err(
            key,
            format!("{v} is out of range; use 0 to {max} {what}"),
        ));
    }
    Ok(v as u32)
}

/// Names a `[[group]]` may have: lower-case letters, digits, `-`, `_`.
pub(super) fn group_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// A user id as written in a list: printable, no spaces, not a reserved form.
pub(super) fn check_user_id(id: &str, key: &str) -> Result<(), PolicyError> {
    if id.is_empty() || id.len() > 256 {
        return Err(err(key, "a user id must be 1 to 256 characters"));
    }
    if id.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(err(
            key,
            format!("{id:?} contains a space or control character; write the platform's user id, e.g. \"U0123ABCD\""),
        ));
    }
    if id.contains('*') {
        return Err(err(
            key,
            format!("{id:?}: \"*\" stands alone (everyone); patterns are not supported"),
        ));
    }
    Ok(())
}
