//! The agent part of a channel's configuration: which agent answers, which
//! API and model it uses, which tools and MCP servers it may use, how many
//! steps and tokens a turn may take, the operator's persona file, and the
//! limits on artifacts sent back to chat. Also the gateway-wide `[[mcp]]`
//! servers, `[llm]` upstreams and `[agents]` CLI directory.
//!
//! Pure data and validation, like the rest of this crate: it never reads the
//! persona file, the environment or a key. Tools that would read other
//! people's conversations (`find_thread`, `read_thread`, …) are refused
//! whatever the file says, and no MCP server is enabled unless a channel
//! names it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use crate::units::{parse_size, ByteSize};
use crate::PolicyError;

/// The built-in agent's tools, by the names its model sees.
pub const BUILTIN_TOOLS: [&str; 6] = [
    "bash",
    "read_file",
    "write_file",
    "edit_file",
    "list_files",
    "search",
];

/// Tools that read other users' conversations: never enabled.
pub const FORBIDDEN_TOOLS: [&str; 4] = [
    "find_thread",
    "read_thread",
    "search_threads",
    "list_threads",
];

/// Whether `name` is a thread-search tool (any case, `-` for `_`, with or
/// without an `mcp__server__` prefix).
pub fn is_forbidden_tool(name: &str) -> bool {
    // The tool's own name (after an `mcp__server__` prefix), compared without
    // case, `_` or `-`: `read_thread`, `readThread`, `READ-THREAD` are one.
    let base = name.rsplit("__").next().unwrap_or(name);
    let squash = |s: &str| -> String {
        s.chars()
            .filter(|c| *c != '_' && *c != '-')
            .flat_map(char::to_lowercase)
            .collect()
    };
    let n = squash(base);
    FORBIDDEN_TOOLS.iter().any(|f| squash(f) == n)
}

/// Which agent answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentKind {
    /// Each message is run as a shell command; its output is the answer.
    Shell,
    /// moat's own tool-use loop, run inside the sandbox.
    Builtin,
    /// Claude Code (`claude -p`), run inside the sandbox.
    ClaudeCode,
    /// The Codex CLI (`codex exec`), run inside the sandbox.
    Codex,
    /// The Amp CLI (`amp -x`), run inside the sandbox.
    Amp,
    /// Pi (`pi --mode json`, `@mariozechner/pi-coding-agent`), run inside the sandbox.
    Pi,
}

impl AgentKind {
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "shell" => Ok(Self::Shell),
            "builtin" => Ok(Self::Builtin),
            "claude" | "claude-code" => Ok(Self::ClaudeCode),
            "codex" => Ok(Self::Codex),
            "amp" => Ok(Self::Amp),
            "pi" => Ok(Self::Pi),
            other => Err(format!(
                "unknown agent {other:?}; use \"builtin\", \"claude\", \"codex\", \"amp\", \"pi\" or \"shell\""
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Shell => "shell",
            Self::Builtin => "builtin",
            Self::ClaudeCode => "claude",
            Self::Codex => "codex",
            Self::Amp => "amp",
            Self::Pi => "pi",
        }
    }

    /// The LLM API the agent must be served, if it is fixed by the agent.
    pub fn fixed_provider(self) -> Option<LlmProvider> {
        match self {
            Self::ClaudeCode => Some(LlmProvider::Anthropic),
            Self::Codex => Some(LlmProvider::Openai),
            _ => None,
        }
    }
}

/// An LLM API served through the door.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LlmProvider {
    Anthropic,
    Openai,
}

impl LlmProvider {
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "anthropic" => Ok(Self::Anthropic),
            "openai" => Ok(Self::Openai),
            other => Err(format!(
                "unknown provider {other:?}; use \"anthropic\" or \"openai\""
            )),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Anthropic => "anthropic",
            Self::Openai => "openai",
        }
    }
    /// The variable (moat's environment or secrets file) holding the real key.
    pub fn key_var(self) -> &'static str {
        match self {
            Self::Anthropic => "ANTHROPIC_API_KEY",
            Self::Openai => "OPENAI_API_KEY",
        }
    }
}

/// A `[[mcp]]` server: started inside the sandbox, speaking MCP on stdio.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct McpServerConfig {
    pub name: String,
    /// Program (absolute, as seen inside the sandbox) and arguments.
    pub command: Vec<String>,
    /// Extra variables (never secrets: the server runs inside the sandbox).
    pub env: BTreeMap<String, String>,
}

/// What may come back to chat from `~/artifacts` after a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArtifactPolicy {
    /// Files per turn; 0: artifacts are not sent.
    pub max_files: u32,
    /// Bytes per file.
    pub max_bytes: u64,
}

impl Default for ArtifactPolicy {
    fn default() -> Self {
        ArtifactPolicy {
            max_files: 10,
            max_bytes: 10 * 1024 * 1024,
        }
    }
}

pub const DEFAULT_MAX_STEPS: u32 = 25;
const MAX_MAX_STEPS: u32 = 200;
const MAX_ARTIFACT_FILES: u32 = 100;
const MAX_ARTIFACT_BYTES: u64 = 100 * 1024 * 1024;

/// A channel's agent settings, `[defaults]` with the channel's keys on top.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentPolicy {
    /// `None`: the built-in agent when an LLM key is configured, else the
    /// shell agent (decided by the gateway, which can see the keys).
    pub kind: Option<AgentKind>,
    /// The built-in agent's API; `None`: anthropic when its key is set, else openai.
    pub provider: Option<LlmProvider>,
    pub model: Option<String>,
    /// `None`: the agent's default tools.
    pub tools: Option<Vec<String>>,
    /// The MCP servers this channel may use (default: none).
    pub mcp: Vec<McpServerConfig>,
    /// Model calls one turn may make.
    pub max_steps: u32,
    /// The persona (system prompt) file, read by the gateway at start.
    pub persona: Option<PathBuf>,
    /// Tokens one sandbox may use through the door.
    pub budget: Option<u64>,
    /// Tokens one user may use in this channel over a rolling window
    /// (`budget_user = "200000/day"`).
    pub budget_user: Option<UserBudget>,
    pub artifacts: ArtifactPolicy,
}

/// `budget_user`: tokens per user per rolling window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserBudget {
    pub tokens: u64,
    pub per: std::time::Duration,
}

impl UserBudget {
    /// `"200000/day"`, `"50000/hour"`, `"1000000/week"` or `"N/<duration>"`
    /// (`"100000/12h"`), the window from an hour to a week (usage is
    /// counted by the hour and kept eight days).
    pub fn parse(text: &str) -> Result<UserBudget, String> {
        let hint = "use \"TOKENS/day\" (or /hour, /week, /12h), e.g. \"200000/day\"";
        let Some((n, per)) = text.split_once('/') else {
            return Err(format!("{text:?} is not a budget; {hint}"));
        };
        let tokens = n
            .trim()
            .replace('_', "")
            .parse::<u64>()
            .ok()
            .filter(|t| *t > 0)
            .ok_or_else(|| format!("{n:?} is not a number of tokens (1 or more); {hint}"))?;
        let per = match per.trim() {
            "hour" => std::time::Duration::from_secs(3600),
            "day" => std::time::Duration::from_secs(86_400),
            "week" => std::time::Duration::from_secs(7 * 86_400),
            d => crate::units::parse_duration(d).map_err(|e| format!("{e}; {hint}"))?,
        };
        if per < std::time::Duration::from_secs(3600)
            || per > std::time::Duration::from_secs(7 * 86_400)
        {
            return Err(format!(
                "the window {:?} is outside an hour to a week; {hint}",
                per
            ));
        }
        Ok(UserBudget { tokens, per })
    }
}

impl Default for AgentPolicy {
    fn default() -> Self {
        AgentPolicy {
            kind: None,
            provider: None,
            model: None,
            tools: None,
            mcp: Vec::new(),
            max_steps: DEFAULT_MAX_STEPS,
            persona: None,
            budget: None,
            budget_user: None,
            artifacts: ArtifactPolicy::default(),
        }
    }
}

impl AgentPolicy {
    /// The agent that answers, given whether an LLM key is configured.
    pub fn kind_or_default(&self, llm_key_available: bool) -> AgentKind {
        self.kind.unwrap_or(if llm_key_available {
            AgentKind::Builtin
        } else {
            AgentKind::Shell
        })
    }
}

/// `[llm]` of the gateway file: where the door sends each API's calls.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GatewayLlm {
    /// `None`: `MOAT_ANTHROPIC_URL`, else the public API.
    pub anthropic_url: Option<String>,
    pub openai_url: Option<String>,
}

/// `[amp]` of the gateway file: where the door sends Amp's requests (the
/// key, `AMP_API_KEY`, stays in moat's environment or secrets file).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GatewayAmp {
    /// `None`: `MOAT_AMP_URL`, else `https://ampcode.com`.
    pub url: Option<String>,
    /// Allow an `http://` upstream (tests).
    pub allow_plain_http: bool,
}

/// `[agents]` of the gateway file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentsConfig {
    /// The CLI template (`moat agents install`); `None`: `<data_dir>/agents/current`
    /// if it exists, else the CLIs under /usr/local/lib/moat-agent-clis.
    pub dir: Option<PathBuf>,
}

// ---- the file format ------------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawArtifacts {
    max_files: Option<i64>,
    max_bytes: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMcp {
    name: String,
    command: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawGatewayLlm {
    anthropic_url: Option<String>,
    openai_url: Option<String>,
    // Present only to refuse them with a precise message.
    api_key: Option<toml::Value>,
    anthropic_api_key: Option<toml::Value>,
    openai_api_key: Option<toml::Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawGatewayAmp {
    url: Option<String>,
    allow_plain_http: Option<bool>,
    // Present only to refuse it with a precise message.
    api_key: Option<toml::Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAgents {
    dir: Option<String>,
}

/// The agent keys `[defaults]` and `[[channel]]` share.
#[derive(Default)]
pub(crate) struct RawAgentKeys {
    pub agent: Option<String>,
    pub provider: Option<String>,
    pub model: Option<String>,
    pub tools: Option<Vec<String>>,
    pub mcp: Option<Vec<String>>,
    pub max_steps: Option<i64>,
    pub persona: Option<String>,
    pub budget: Option<i64>,
    pub budget_user: Option<String>,
    pub artifacts: Option<RawArtifacts>,
}

fn err(key: impl Into<String>, message: impl Into<String>) -> PolicyError {
    PolicyError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

fn name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Variable names that look like they carry a secret.
fn secret_like(name: &str) -> bool {
    let n = name.to_ascii_uppercase();
    ["KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL"]
        .iter()
        .any(|w| n.contains(w))
}

/// Validates the `[[mcp]]` entries into servers by name.
pub(crate) fn mcp_servers(
    raw: Vec<RawMcp>,
) -> Result<BTreeMap<String, McpServerConfig>, PolicyError> {
    let mut out = BTreeMap::new();
    for (i, m) in raw.into_iter().enumerate() {
        let key = |k: &str| format!("mcp[{i}].{k}");
        if !name_ok(&m.name) || m.name.contains("__") {
            return Err(err(
                key("name"),
                format!("{:?} is not a server name; use letters, digits, '-' and '_' (at most 64, no \"__\")", m.name),
            ));
        }
        if out.contains_key(&m.name) {
            return Err(err(
                key("name"),
                format!(
                    "a server named {:?} is already defined; names must be unique",
                    m.name
                ),
            ));
        }
        match m.command.first() {
            Some(p) if p.starts_with('/') => {}
            _ => {
                return Err(err(
                    key("command"),
                    "write the program's absolute path inside the sandbox and its arguments, e.g. [\"/usr/bin/python3\", \"/workspace/server.py\"]",
                ))
            }
        }
        if m.command.iter().any(|a| a.contains('\0')) {
            return Err(err(key("command"), "an argument contains a NUL byte"));
        }
        for name in m.env.keys() {
            let ok = !name.is_empty()
                && !name.as_bytes()[0].is_ascii_digit()
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !ok {
                return Err(err(
                    key(&format!("env.{name}")),
                    "is not a variable name; use letters, digits and '_'",
                ));
            }
            if secret_like(name) {
                return Err(err(
                    key(&format!("env.{name}")),
                    "looks like a secret; MCP servers run inside the sandbox, where no real secret may go (serve it through the door instead)",
                ));
            }
        }
        out.insert(
            m.name.clone(),
            McpServerConfig {
                name: m.name,
                command: m.command,
                env: m.env,
            },
        );
    }
    Ok(out)
}

pub(crate) fn gateway_llm(raw: RawGatewayLlm) -> Result<GatewayLlm, PolicyError> {
    for (present, k, var) in [
        (
            raw.api_key.is_some(),
            "llm.api_key",
            "ANTHROPIC_API_KEY or OPENAI_API_KEY",
        ),
        (
            raw.anthropic_api_key.is_some(),
            "llm.anthropic_api_key",
            "ANTHROPIC_API_KEY",
        ),
        (
            raw.openai_api_key.is_some(),
            "llm.openai_api_key",
            "OPENAI_API_KEY",
        ),
    ] {
        if present {
            return Err(err(
                k,
                format!("secrets never go in the configuration file; set {var} in moat's environment or the secrets file"),
            ));
        }
    }
    let url = |v: Option<String>, k: &str| -> Result<Option<String>, PolicyError> {
        match v {
            Some(u) if !(u.starts_with("https://") || u.starts_with("http://")) => Err(err(
                k,
                format!("{u:?} is not a URL; write https://host[:port][/base]"),
            )),
            other => Ok(other.map(|u| u.trim_end_matches('/').to_string())),
        }
    };
    Ok(GatewayLlm {
        anthropic_url: url(raw.anthropic_url, "llm.anthropic_url")?,
        openai_url: url(raw.openai_url, "llm.openai_url")?,
    })
}

pub(crate) fn gateway_amp(raw: RawGatewayAmp) -> Result<GatewayAmp, PolicyError> {
    if raw.api_key.is_some() {
        return Err(err(
            "amp.api_key",
            "secrets never go in the configuration file; set AMP_API_KEY in moat's environment or the secrets file".to_string(),
        ));
    }
    let url = match raw.url {
        Some(u) if !(u.starts_with("https://") || u.starts_with("http://")) => {
            return Err(err(
                "amp.url",
                format!("{u:?} is not a URL; write https://host[:port][/base]"),
            ))
        }
        Some(u) if u.starts_with("http://") && raw.allow_plain_http != Some(true) => {
            return Err(err(
                "amp.url",
                format!("{u:?} is plain HTTP; set amp.allow_plain_http = true to allow an unencrypted upstream (tests)"),
            ))
        }
        other => other.map(|u| u.trim_end_matches('/').to_string()),
    };
    Ok(GatewayAmp {
        url,
        allow_plain_http: raw.allow_plain_http.unwrap_or(false),
    })
}

pub(crate) fn agents_config(raw: RawAgents) -> Result<AgentsConfig, PolicyError> {
    let dir = match raw.dir {
        None => None,
        Some(d) => {
            let p = PathBuf::from(&d);
            if !p.is_absolute() || p.components().count() <= 1 {
                return Err(err(
                    "agents.dir",
                    format!("{d:?} must be an absolute path, e.g. \"/var/lib/moat/agents/current\" (made by `moat agents install`)"),
                ));
            }
            Some(p)
        }
    };
    Ok(AgentsConfig { dir })
}

fn tokens(v: Option<i64>, key: &str) -> Result<Option<u64>, PolicyError> {
    match v {
        None => Ok(None),
        Some(n) if n > 0 => Ok(Some(n as u64)),
        Some(n) => Err(err(
            key,
            format!("{n} is not a number of tokens; use 1 or more"),
        )),
    }
}

impl AgentPolicy {
    /// Applies the keys set in `raw`; `at` is the section (`defaults`, `channel[2]`).
    pub(crate) fn apply(
        &mut self,
        raw: RawAgentKeys,
        at: &str,
        servers: &BTreeMap<String, McpServerConfig>,
    ) -> Result<(), PolicyError> {
        let key = |k: &str| format!("{at}.{k}");
        if let Some(a) = raw.agent {
            self.kind = Some(AgentKind::parse(&a).map_err(|m| err(key("agent"), m))?);
        }
        if let Some(p) = raw.provider {
            self.provider = Some(LlmProvider::parse(&p).map_err(|m| err(key("provider"), m))?);
        }
        if let Some(m) = raw.model {
            let ok = !m.is_empty() && m.len() <= 128 && m.bytes().all(|b| b.is_ascii_graphic());
            if !ok {
                return Err(err(
                    key("model"),
                    format!("{m:?} is not a model name, e.g. \"claude-sonnet-4-5\" or \"gpt-5\""),
                ));
            }
            self.model = Some(m);
        }
        if let Some(list) = raw.tools {
            for (i, t) in list.iter().enumerate() {
                let k = key(&format!("tools[{i}]"));
                if is_forbidden_tool(t) {
                    return Err(err(
                        k,
                        format!("{t:?} would let the agent read other people's conversations; moat never enables thread-search tools (the thread the agent answers is already in its context)"),
                    ));
                }
                let ok = !t.is_empty()
                    && t.len() <= 128
                    && t.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                if !ok {
                    return Err(err(
                        k,
                        format!("{t:?} is not a tool name; use the agent's names, e.g. \"bash\" (builtin) or \"Bash\" (claude)"),
                    ));
                }
            }
            self.tools = Some(list);
        }
        if let Some(names) = raw.mcp {
            self.mcp.clear();
            for (i, n) in names.iter().enumerate() {
                let Some(s) = servers.get(n) else {
                    let known: Vec<&str> = servers.keys().map(|s| s.as_str()).collect();
                    let known = if known.is_empty() {
                        "none is defined".to_string()
                    } else {
                        format!("defined: {}", known.join(", "))
                    };
                    return Err(err(
                        key(&format!("mcp[{i}]")),
                        format!("no [[mcp]] server named {n:?} ({known}); define it with [[mcp]] name = {n:?}, command = [...]"),
                    ));
                };
                if is_forbidden_tool(n) {
                    return Err(err(
                        key(&format!("mcp[{i}]")),
                        "thread-search servers are never enabled",
                    ));
                }
                if self.mcp.iter().any(|m| &m.name == n) {
                    return Err(err(
                        key(&format!("mcp[{i}]")),
                        format!("{n:?} is listed twice"),
                    ));
                }
                self.mcp.push(s.clone());
            }
        }
        if let Some(n) = raw.max_steps {
            if !(1..=MAX_MAX_STEPS as i64).contains(&n) {
                return Err(err(
                    key("max_steps"),
                    format!("{n} is out of range; use 1 to {MAX_MAX_STEPS} model calls per turn"),
                ));
            }
            self.max_steps = n as u32;
        }
        if let Some(p) = raw.persona {
            let path = PathBuf::from(&p);
            if !path.is_absolute() {
                return Err(err(
                    key("persona"),
                    format!("{p:?} must be an absolute path to a text file with the system prompt, e.g. \"/etc/moat/persona.md\""),
                ));
            }
            self.persona = Some(path);
        }
        if raw.budget.is_some() {
            self.budget = tokens(raw.budget, &key("budget"))?;
        }
        if let Some(b) = raw.budget_user {
            self.budget_user = Some(UserBudget::parse(&b).map_err(|m| err(key("budget_user"), m))?);
        }
        if let Some(a) = raw.artifacts {
            if let Some(n) = a.max_files {
                if !(0..=MAX_ARTIFACT_FILES as i64).contains(&n) {
                    return Err(err(
                        key("artifacts.max_files"),
                        format!("{n} is out of range; use 0 (send none) to {MAX_ARTIFACT_FILES}"),
                    ));
                }
                self.artifacts.max_files = n as u32;
            }
            if let Some(s) = a.max_bytes {
                let ByteSize(b) = parse_size(&s).map_err(|m| err(key("artifacts.max_bytes"), m))?;
                if b == 0 || b > MAX_ARTIFACT_BYTES {
                    return Err(err(
                        key("artifacts.max_bytes"),
                        format!("{s:?} is out of range; use 1 byte to 100MiB"),
                    ));
                }
                self.artifacts.max_bytes = b;
            }
        }
        Ok(())
    }

    /// Checks the combination once `[defaults]` and the channel are merged.
    pub(crate) fn check(&self, at: &str) -> Result<(), PolicyError> {
        match self.kind {
            None => Ok(()),
            Some(kind) => self.check_as(kind, at),
        }
    }

    /// Checks the settings against `kind`, the agent that will answer (the
    /// gateway calls this once it has picked the default for an unset `agent`).
    pub fn check_as(&self, kind: AgentKind, at: &str) -> Result<(), PolicyError> {
        let key = |k: &str| format!("{at}.{k}");
        if kind == AgentKind::Shell {
            for (set, k) in [
                (self.tools.is_some(), "tools"),
                (!self.mcp.is_empty(), "mcp"),
                (self.model.is_some(), "model"),
                (self.provider.is_some(), "provider"),
            ] {
                if set {
                    return Err(err(
                        key(k),
                        "the shell agent runs each message as a command and uses no model, tools or MCP servers; remove it or choose agent = \"builtin\"",
                    ));
                }
            }
        }
        if let (Some(fixed), Some(p)) = (kind.fixed_provider(), self.provider) {
            if fixed != p {
                return Err(err(
                    key("provider"),
                    format!(
                        "agent = \"{}\" speaks {} only; remove provider or choose agent = \"builtin\"",
                        kind.name(),
                        fixed.name()
                    ),
                ));
            }
        }
        if kind == AgentKind::Builtin {
            if let Some(tools) = &self.tools {
                for (i, t) in tools.iter().enumerate() {
                    if !BUILTIN_TOOLS.contains(&t.as_str()) {
                        return Err(err(
                            key(&format!("tools[{i}]")),
                            format!(
                                "the built-in agent has no tool {t:?}; its tools are {}",
                                BUILTIN_TOOLS.join(", ")
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_search_tools_are_forbidden_in_every_spelling() {
        for n in [
            "find_thread",
            "READ_THREAD",
            "search-threads",
            "mcp__slack__read_thread",
            "readThread",
            "mcp__x__FindThread",
        ] {
            assert!(is_forbidden_tool(n), "{n}");
        }
        for n in BUILTIN_TOOLS {
            assert!(!is_forbidden_tool(n), "{n}");
        }
        assert!(!is_forbidden_tool("Bash"));
    }

    #[test]
    fn default_agent_depends_on_the_key() {
        let p = AgentPolicy::default();
        assert_eq!(p.kind_or_default(true), AgentKind::Builtin);
        assert_eq!(p.kind_or_default(false), AgentKind::Shell);
        let p = AgentPolicy {
            kind: Some(AgentKind::Codex),
            ..Default::default()
        };
        assert_eq!(p.kind_or_default(false), AgentKind::Codex);
    }
}
