//! The gateway's configuration: its listeners, the Slack front-end, the pool,
//! the user groups, and one policy per chat channel (who may talk there, at which
//! trust level, in which kind of sandbox, with which agent, limits, egress and
//! rates), plus the authorization verdict for one message.
//!
//! Owns the TOML shape of `moat up --config FILE`, its defaults, validation with
//! errors that name the key (`channel[2].rate.user`) and say what to write
//! instead, and the embedded default that `moat up` runs without a file.
//!
//! Access is closed: a channel with no `users` lets nobody talk, a message from a
//! channel with no `[[channel]]` entry is refused, and "everyone" is only ever an
//! explicit `"*"`. It never reads a file, the environment or the clock, and never
//! holds a secret: the file only names the environment variables that carry them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

pub use crate::agents::{
    AgentKind, AgentPolicy, AgentsConfig, ArtifactPolicy, GatewayAmp, GatewayLlm, LlmProvider,
    McpServerConfig,
};
use crate::agents::{RawAgentKeys, RawAgents, RawArtifacts, RawGatewayAmp, RawGatewayLlm, RawMcp};
use crate::network::{canonical_ip, parse_allow_entry, parse_ip_literal, parse_pin};
use crate::sandbox::{BackendKind, SandboxPolicy};
use crate::units::{format_duration, parse_duration, ByteSize};
use crate::PolicyError;

/// What `moat up` runs when no configuration file is given: the web chat on
/// loopback, open to whoever can reach it. That is safe only because the web
/// chat listens on 127.0.0.1 with `auth = "loopback"`, which the validation
/// keeps tied together: anyone able to connect is already a user of this machine.
pub const EMBEDDED_DEFAULT_TOML: &str = r#"# moat's embedded default: a local web chat with the shell agent.
[web]
listen = "127.0.0.1:8080"
auth = "loopback"

[admin]
listen = "127.0.0.1:9090"

[slack]
mode = "off"

[pool]
min = 2
max = 16

[defaults]
trust = "member"
sandbox = "pool"
# agent unset: the built-in agent when ANTHROPIC_API_KEY or OPENAI_API_KEY is
# set (environment or secrets file), else the shell agent.

# Everyone who can reach 127.0.0.1:8080 may talk: only local users can.
[[channel]]
platform = "web"
id = "*"
users = ["*"]
"#;

/// Where the gateway keeps its store and audit log when `gateway.data_dir` is
/// not set (sandboxes' files live in the engine's runtime directory).
pub const DEFAULT_DATA_DIR: &str = "/var/lib/moat";
/// The variable holding the web chat's tokens when `web.token_env` is not set.
pub const DEFAULT_WEB_TOKEN_ENV: &str = "MOAT_WEB_TOKENS";
/// The identity header when `web.header` is not set.
pub const DEFAULT_WEB_HEADER: &str = "X-Forwarded-User";
pub const DEFAULT_SLACK_API_URL: &str = "https://slack.com/api";

// ---- the model ------------------------------------------------------------

/// How much a message is trusted. Ordered: `Untrusted < Member < Admin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Trust {
    /// Anyone there may be hostile, including the thread the agent reads.
    Untrusted,
    /// A colleague: the channel's full configuration, own conversations only.
    Member,
    /// An operator: also the commands that act on other people's conversations.
    Admin,
}

impl Trust {
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "admin" => Ok(Self::Admin),
            "member" => Ok(Self::Member),
            "untrusted" => Ok(Self::Untrusted),
            other => Err(format!(
                "unknown trust level {other:?}; use \"admin\", \"member\" or \"untrusted\""
            )),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Member => "member",
            Self::Untrusted => "untrusted",
        }
    }
}

impl fmt::Display for Trust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a message comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Platform {
    Slack,
    Web,
    /// `moat chat`, the terminal client.
    Cli,
    Telegram,
    WhatsApp,
    Discord,
}

impl Platform {
    /// Every platform, in the order the docs list them.
    pub const ALL: [Platform; 6] = [
        Self::Slack,
        Self::Web,
        Self::Cli,
        Self::Telegram,
        Self::WhatsApp,
        Self::Discord,
    ];

    /// The platforms a user id without a `platform:` prefix in a shared list
    /// (`[[group]]`, `[defaults]`) stands for: those whose ids cannot be
    /// mistaken for another platform's (Slack's `U…`, web and terminal
    /// names). Telegram, WhatsApp and Discord ids are numbers, which collide
    /// across platforms: in a shared list they are written `telegram:123`.
    pub const UNPREFIXED: [Platform; 3] = [Self::Slack, Self::Web, Self::Cli];

    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "slack" => Ok(Self::Slack),
            "web" => Ok(Self::Web),
            "cli" => Ok(Self::Cli),
            "telegram" => Ok(Self::Telegram),
            "whatsapp" => Ok(Self::WhatsApp),
            "discord" => Ok(Self::Discord),
            other => Err(format!(
                "unknown platform {other:?}; use \"slack\", \"web\", \"cli\", \"telegram\", \"whatsapp\" or \"discord\""
            )),
        }
    }
    /// The debounce a channel of this platform gets when neither it nor
    /// `[defaults]` sets one: chat-app users often split one request over
    /// several quick messages, which should be one turn; the web chat and
    /// `moat chat` send one complete message per Enter, which should start at
    /// once (a quick second one runs as a follow-up turn).
    pub fn default_debounce(self) -> Duration {
        match self {
            Self::Slack | Self::Telegram | Self::WhatsApp | Self::Discord => {
                Duration::from_millis(1500)
            }
            Self::Web | Self::Cli => Duration::ZERO,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Slack => "slack",
            Self::Web => "web",
            Self::Cli => "cli",
            Self::Telegram => "telegram",
            Self::WhatsApp => "whatsapp",
            Self::Discord => "discord",
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How a conversation gets its sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxMode {
    /// A pre-warmed lease from the pool per turn, reset to clean state afterwards.
    Pool,
    /// The conversation keeps its own files across turns (nothing runs while idle);
    /// they are deleted after `idle_delete` without a turn.
    PerThread { idle_delete: Duration },
}

/// `count` events per `per`, written `"20/min"`. A token bucket of `count`
/// tokens refilled one every `per / count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: NonZeroU32,
    pub per: Duration,
}

impl Rate {
    /// Parses `N/sec`, `N/min` or `N/hour` (also `s`, `second`, `m`, `minute`, `h`).
    pub fn parse(text: &str) -> Result<Self, String> {
        let shape = || {
            format!("{text:?} is not a rate; write a count per unit, e.g. \"20/min\", \"1/sec\" or \"100/hour\"")
        };
        let (n, unit) = text.split_once('/').ok_or_else(shape)?;
        let (n, unit) = (n.trim(), unit.trim());
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
            return Err(shape());
        }
        let count: u32 = n
            .parse()
            .ok()
            .filter(|c| (1..=1_000_000).contains(c))
            .ok_or_else(|| format!("{text:?}: the count must be 1 to 1000000"))?;
        let per = match unit {
            "sec" | "s" | "second" => Duration::from_secs(1),
            "min" | "m" | "minute" => Duration::from_secs(60),
            "hour" | "h" => Duration::from_secs(3600),
            other => {
                return Err(format!(
                    "{text:?} has an unknown unit {other:?}; use sec, min or hour"
                ))
            }
        };
        Ok(Rate {
            count: NonZeroU32::new(count)
                .ok_or_else(|| format!("{text:?}: the count must be at least 1"))?,
            per,
        })
    }

    /// The time to earn back one event.
    pub fn interval(self) -> Duration {
        self.per / self.count.get()
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per.as_secs() {
            1 => "sec",
            60 => "min",
            _ => "hour",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

/// Rate limits of one channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rates {
    /// Messages one user may send in this channel.
    pub user: Rate,
    /// Messages all users together may send in this channel.
    pub channel: Rate,
}

/// Who a `users` or `admins` list lets in, groups expanded. Empty: nobody.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserSet {
    /// An explicit `"*"`.
    pub everyone: bool,
    /// Exact, case-sensitive user ids, each of one platform: an id
    /// matches only messages from its own platform.
    pub ids: BTreeSet<(Platform, String)>,
}

impl UserSet {
    /// Is this user of this platform in the set? An id of another platform
    /// never matches, whatever its text.
    pub fn contains(&self, platform: Platform, user_id: &str) -> bool {
        self.everyone || self.ids.contains(&(platform, user_id.to_string()))
    }
    pub fn is_empty(&self) -> bool {
        !self.everyone && self.ids.is_empty()
    }
}

/// A list entry `platform:id` split, when the prefix names a platform.
fn prefixed(entry: &str) -> Option<(Platform, &str)> {
    let (p, id) = entry.split_once(':')?;
    Some((Platform::parse(p).ok()?, id))
}

/// One `[[channel]]`: `[defaults]` with this entry's keys on top, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelPolicy {
    /// Position in the file: this is `channel[index]` in errors and logs.
    pub index: usize,
    pub platform: Platform,
    /// The platform's channel id, or `"*"` for any channel of the platform
    /// that has no entry of its own.
    pub id: String,
    pub trust: Trust,
    /// Who may talk here.
    pub users: UserSet,
    /// Who talks here as `admin` (and may talk even if not in `users`).
    pub admins: UserSet,
    pub sandbox: SandboxMode,
    /// Which agent answers and what it may use.
    pub agent: AgentPolicy,
    /// Messages from one user in one thread closer together than this are one turn.
    pub debounce: Duration,
    pub rate: Rates,
    /// What the channel's turns may do on GitHub (`github = { ... }`).
    pub github: Option<crate::github::ChannelGithub>,
    /// Extra host directories (`mounts = [...]`), shape-checked; judged
    /// against the mount allowlist at `moat up`.
    pub mounts: Vec<crate::memory::ChannelMount>,
    /// `conversation`, `trigger` and `mention`: which messages start a turn
    /// and what one conversation is.
    pub chat: crate::chat_keys::ChatKeys,
    /// `approve`, `approve_timeout` and `unknown` (docs/approvals.md).
    pub approvals: crate::approvals::ApprovalKeys,
    /// Loosened tightened keys of an untrusted channel, for `warnings()`.
    untrusted_overrides: Vec<String>,
    policy: SandboxPolicy,
}

impl ChannelPolicy {
    /// The sandbox policy for this channel's turns: backend, limits and egress,
    /// ready to hand to the engine.
    pub fn sandbox_policy(&self) -> SandboxPolicy {
        self.policy.clone()
    }

    pub fn is_wildcard(&self) -> bool {
        self.id == "*"
    }

    /// `slack channel C0123`, or `slack channel "*"` for the wildcard entry.
    pub fn describe(&self) -> String {
        if self.is_wildcard() {
            format!("{} channel \"*\"", self.platform)
        } else {
            format!("{} channel {}", self.platform, self.id)
        }
    }
}

/// How the web chat learns who is talking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebAuth {
    /// Whoever connects names themselves; only allowed on a loopback listener.
    Loopback,
    /// A bearer token; the variable `env` names holds the tokens.
    Token { env: String },
    /// A trusted reverse proxy puts the user in `header`; only requests from
    /// `trusted_proxies` (or from loopback when empty) are believed.
    Header {
        header: String,
        trusted_proxies: Vec<IpAddr>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
    pub auth: WebAuth,
    /// Names besides the listening address that moat's HTTP listeners answer
    /// to (`web.allowed_hosts`: a reverse proxy's public name); every other
    /// `Host` is refused (docs/threat-model.md W1).
    pub allowed_hosts: Vec<crate::hosts::HostPort>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// Serves `/metrics`.
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlackMode {
    /// Slack posts events to `POST /slack/events`.
    Events,
    /// moat opens a Socket Mode WebSocket to Slack.
    Socket,
    Off,
}

impl SlackMode {
    /// The environment variables the mode needs (read by the gateway, never here).
    pub fn required_env(self) -> &'static [&'static str] {
        match self {
            Self::Events => &["SLACK_SIGNING_SECRET", "SLACK_BOT_TOKEN"],
            Self::Socket => &["SLACK_APP_TOKEN", "SLACK_BOT_TOKEN"],
            Self::Off => &[],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlackConfig {
    pub mode: SlackMode,
    /// Web API base, without a trailing slash.
    pub api_url: String,
    /// Events mode: where `POST /slack/events` is served. `None`: on `web.listen`.
    pub listen: Option<SocketAddr>,
}

/// Each pool-mode channel's pool: `min` warm leases, grown under load up to
/// `max`, shrunk back to `min` after `shrink_after` without use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolConfig {
    /// Leases kept warm (`min`, or the older fixed `size`).
    pub size: u32,
    /// Leases a pool may grow to under load (`size` alone: the same as it).
    pub max: u32,
    /// Requests that may wait once `max` leases are busy; the next one is
    /// told the pool is busy.
    pub max_waiters: u32,
    /// A lease above `min` idle this long is destroyed.
    pub shrink_after: Duration,
}

/// A named set of user ids, referred to as `"@name"` in `users` and `admins`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub name: String,
    pub users: Vec<String>,
}

/// The whole gateway configuration, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayConfig {
    pub data_dir: PathBuf,
    pub web: WebConfig,
    pub admin: AdminConfig,
    pub slack: SlackConfig,
    /// `[telegram]`.
    pub telegram: crate::platforms::TelegramConfig,
    /// `[whatsapp]`.
    pub whatsapp: crate::platforms::WhatsAppConfig,
    /// `[discord]`.
    pub discord: crate::platforms::DiscordConfig,
    pub pool: PoolConfig,
    pub groups: Vec<Group>,
    /// In file order.
    pub channels: Vec<ChannelPolicy>,
    /// `[llm]`: the upstream APIs the doors call.
    pub llm: GatewayLlm,
    /// `[agents]`: where the agent CLIs come from.
    pub agents: AgentsConfig,
    /// `[github]`: where the App's API and git hosts are.
    pub github: crate::github::GithubSection,
    /// `[amp]`: where the door sends Amp's requests.
    pub amp: GatewayAmp,
    /// `[memory] global`: the global memory directory, if any.
    pub memory_global: Option<PathBuf>,
    /// `[mounts] allowlist`: the mount allowlist file, if any.
    pub mounts_allowlist: Option<PathBuf>,
    /// `[tasks]`: limits on scheduled tasks (docs/tasks.md).
    pub tasks: crate::tasks::TasksConfig,
    /// `[ipc]`: the agent's endpoint (docs/ipc.md).
    pub ipc: crate::tasks::IpcConfig,
    /// `[store]`: SQLite in the data directory, or a shared PostgreSQL.
    pub store: crate::store::StoreConfig,
    /// `store.retention`: how long messages and answers are kept.
    pub retention: Option<std::time::Duration>,
}

/// The verdict on one message.
#[derive(Debug, Clone, PartialEq)]
pub enum Authorization<'a> {
    Allowed {
        channel: &'a ChannelPolicy,
        trust: Trust,
    },
    /// `reason` is for the audit log and the operator, never for the sender.
    Denied { reason: String },
}

impl Authorization<'_> {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Self::Allowed { .. })
    }
}

impl GatewayConfig {
    /// The configuration `moat up` runs without `--config`: see
    /// [`EMBEDDED_DEFAULT_TOML`].
    #[allow(clippy::expect_used, reason = "a constant, tested")]
    pub fn embedded_default() -> Self {
        Self::from_toml(EMBEDDED_DEFAULT_TOML).expect("the embedded default configuration is valid")
    }

    /// The channel entry a message from `channel_id` on `platform` falls under:
    /// the entry with exactly that id, else the platform's `"*"` entry.
    pub fn channel(&self, platform: Platform, channel_id: &str) -> Option<&ChannelPolicy> {
        let of_platform = || self.channels.iter().filter(|c| c.platform == platform);
        of_platform()
            .find(|c| !c.is_wildcard() && c.id == channel_id)
            .or_else(|| of_platform().find(|c| c.is_wildcard()))
    }

    /// May `user_id` talk in `channel_id`, and at which trust level? Ids are
    /// compared exactly. An admin gets `Trust::Admin` unless the channel is
    /// untrusted (validation forbids admins there).
    pub fn authorize(
        &self,
        platform: Platform,
        channel_id: &str,
        user_id: &str,
    ) -> Authorization<'_> {
        let denied = |reason: String| Authorization::Denied { reason };
        if channel_id.is_empty() {
            return denied(format!("the {platform} message has no channel id"));
        }
        let Some(channel) = self.channel(platform, channel_id) else {
            return denied(format!(
                "no [[channel]] entry for {platform} channel {}",
                shown(channel_id)
            ));
        };
        let matched = if channel.is_wildcard() {
            format!(
                "{platform} channel {} (the {platform} \"*\" entry, channel[{}])",
                shown(channel_id),
                channel.index
            )
        } else {
            format!(
                "{platform} channel {} (channel[{}])",
                shown(channel_id),
                channel.index
            )
        };
        if user_id.is_empty() {
            return denied(format!("a message in {matched} has no user id"));
        }
        if channel.admins.contains(platform, user_id) {
            return Authorization::Allowed {
                channel,
                trust: Trust::Admin,
            };
        }
        if channel.users.contains(platform, user_id) {
            return Authorization::Allowed {
                channel,
                trust: channel.trust,
            };
        }
        if channel.users.is_empty() && channel.admins.is_empty() {
            denied(format!(
                "{matched} lets nobody talk: its users list is empty (user {})",
                shown(user_id)
            ))
        } else {
            denied(format!(
                "user {} is not in the users of {matched}",
                shown(user_id)
            ))
        }
    }

    /// Things that are valid but probably not meant, for `moat up` to print.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if self.channels.is_empty() {
            w.push("no [[channel]] entries: nobody can talk to the gateway".to_string());
        }
        for c in &self.channels {
            w.extend(c.untrusted_overrides.iter().cloned());
            w.extend(crate::approvals::timeout_warning(c));
            if let Some(g) = &c.github {
                if c.trust == Trust::Untrusted && g.can_write() {
                    w.push(format!(
                        "channel[{}] ({}) is untrusted but its github.permissions grant write ({}): anyone there can have the agent push and open pull requests",
                        c.index,
                        c.describe(),
                        g.permissions
                            .iter()
                            .filter(|(_, v)| *v == "write")
                            .map(|(k, _)| k.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
            }
            if c.users.is_empty() && c.admins.is_empty() {
                w.push(format!(
                    "channel[{}] ({}) lets nobody talk: its users list is empty",
                    c.index,
                    c.describe()
                ));
            }
        }
        if self.slack.mode != SlackMode::Off
            && !self.channels.iter().any(|c| c.platform == Platform::Slack)
        {
            w.push(format!(
                "slack.mode = \"{}\" but no [[channel]] has platform = \"slack\": every Slack message will be refused",
                slack_mode_name(self.slack.mode)
            ));
        }
        if !is_loopback(self.admin.listen) {
            w.push(format!(
                "admin.listen = \"{}\" is not a loopback address: /metrics is served to anyone who can reach it",
                self.admin.listen
            ));
        }
        w
    }
}

fn slack_mode_name(m: SlackMode) -> &'static str {
    match m {
        SlackMode::Events => "events",
        SlackMode::Socket => "socket",
        SlackMode::Off => "off",
    }
}

/// An id as it may go into a log line: as is when short and plain, else quoted
/// and escaped (ids from a platform are not trusted to be printable).
fn shown(id: &str) -> String {
    let plain = id.len() <= 80 && id.bytes().all(|b| b.is_ascii_graphic() && b != b'"');
    if plain {
        id.to_string()
    } else {
        let cut: String = id.chars().take(80).collect();
        format!("{cut:?}")
    }
}

fn is_loopback(addr: SocketAddr) -> bool {
    canonical_ip(addr.ip()).is_loopback()
}

// ---- the file format ------------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    gateway: RawGateway,
    #[serde(default)]
    web: RawWeb,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    slack: RawSlack,
    #[serde(default)]
    telegram: crate::platforms::RawTelegram,
    #[serde(default)]
    whatsapp: crate::platforms::RawWhatsApp,
    #[serde(default)]
    discord: crate::platforms::RawDiscord,
    #[serde(default)]
    pool: RawPool,
    #[serde(default)]
    defaults: RawSettings,
    #[serde(default)]
    group: Vec<RawGroup>,
    #[serde(default)]
    channel: Vec<RawChannel>,
    #[serde(default)]
    mcp: Vec<RawMcp>,
    #[serde(default)]
    llm: RawGatewayLlm,
    #[serde(default)]
    agents: RawAgents,
    #[serde(default)]
    github: crate::github::RawGithubSection,
    #[serde(default)]
    amp: RawGatewayAmp,
    #[serde(default)]
    memory: crate::memory::RawMemory,
    #[serde(default)]
    mounts: crate::memory::RawMounts,
    #[serde(default)]
    tasks: crate::tasks::RawTasks,
    #[serde(default)]
    ipc: crate::tasks::RawIpc,
    #[serde(default)]
    store: crate::store::RawStore,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawGateway {
    data_dir: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawWeb {
    enabled: Option<bool>,
    listen: Option<String>,
    auth: Option<String>,
    header: Option<String>,
    token_env: Option<String>,
    trusted_proxies: Option<Vec<String>>,
    allowed_hosts: Option<Vec<String>>,
    // Present only to refuse them with a precise message: secrets never go here.
    token: Option<toml::Value>,
    tokens: Option<toml::Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSlack {
    mode: Option<String>,
    api_url: Option<String>,
    listen: Option<String>,
    signing_secret: Option<toml::Value>,
    bot_token: Option<toml::Value>,
    app_token: Option<toml::Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPool {
    size: Option<i64>,
    min: Option<i64>,
    max: Option<i64>,
    max_waiters: Option<i64>,
    shrink_after: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    name: String,
    users: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRate {
    user: Option<String>,
    channel: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    memory: Option<String>,
    pids: Option<i64>,
    cpus: Option<f64>,
    timeout: Option<String>,
}

/// The keys `[defaults]` and `[[channel]]` share.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    trust: Option<String>,
    users: Option<Vec<String>>,
    admins: Option<Vec<String>>,
    sandbox: Option<String>,
    idle_delete: Option<String>,
    disk: Option<String>,
    image: Option<String>,
    root_inside: Option<bool>,
    agent: Option<String>,
    debounce: Option<String>,
    rate: Option<RawRate>,
    backend: Option<String>,
    egress: Option<Vec<String>>,
    resolve: Option<BTreeMap<String, String>>,
    limits: Option<RawLimits>,
    provider: Option<String>,
    model: Option<String>,
    tools: Option<Vec<String>>,
    mcp: Option<Vec<String>>,
    max_steps: Option<i64>,
    persona: Option<String>,
    budget: Option<i64>,
    budget_user: Option<String>,
    artifacts: Option<RawArtifacts>,
    github: Option<crate::github::RawChannelGithub>,
    mounts: Option<Vec<crate::memory::RawChannelMount>>,
    conversation: Option<String>,
    trigger: Option<String>,
    mention: Option<String>,
    approve: Option<Vec<String>>,
    approve_timeout: Option<String>,
    unknown: Option<String>,
}

// serde's `flatten` cannot be combined with `deny_unknown_fields`, so a
// channel repeats the shared keys; `into_parts` hands them over.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawChannel {
    platform: String,
    id: String,
    trust: Option<String>,
    users: Option<Vec<String>>,
    admins: Option<Vec<String>>,
    sandbox: Option<String>,
    idle_delete: Option<String>,
    disk: Option<String>,
    image: Option<String>,
    root_inside: Option<bool>,
    agent: Option<String>,
    debounce: Option<String>,
    rate: Option<RawRate>,
    backend: Option<String>,
    egress: Option<Vec<String>>,
    resolve: Option<BTreeMap<String, String>>,
    limits: Option<RawLimits>,
    provider: Option<String>,
    model: Option<String>,
    tools: Option<Vec<String>>,
    mcp: Option<Vec<String>>,
    max_steps: Option<i64>,
    persona: Option<String>,
    budget: Option<i64>,
    budget_user: Option<String>,
    artifacts: Option<RawArtifacts>,
    github: Option<crate::github::RawChannelGithub>,
    mounts: Option<Vec<crate::memory::RawChannelMount>>,
    conversation: Option<String>,
    trigger: Option<String>,
    mention: Option<String>,
    approve: Option<Vec<String>>,
    approve_timeout: Option<String>,
    unknown: Option<String>,
}

impl RawChannel {
    fn into_parts(self) -> (String, String, RawSettings) {
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

fn err(key: impl Into<String>, message: impl Into<String>) -> PolicyError {
    PolicyError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// A serde path as a configuration key (`channel[0].users`), with a key
/// whose name is empty written `""` (the library's own form leaves it
/// blank, and an error must name its key).
fn key_path(path: &serde_path_to_error::Path) -> String {
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

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
}

/// A duration within `min..=max`; fractions get a hint instead of parse_duration's
/// "unknown unit".
fn duration_in(
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

fn listen_addr(text: &str, key: &str) -> Result<SocketAddr, PolicyError> {
    text.trim().parse::<SocketAddr>().map_err(|_| {
        err(
            key,
            format!("{text:?} is not an address and port; write e.g. \"127.0.0.1:8080\" or \"[::1]:8080\" (names are not resolved)"),
        )
    })
}

/// Whether two listeners would fight over one socket. Port 0 (any free port)
/// never clashes; an unspecified address (`0.0.0.0`, `[::]`) covers every address.
fn clash(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (canonical_ip(a.ip()) == canonical_ip(b.ip())
            || a.ip().is_unspecified()
            || b.ip().is_unspecified())
}

fn env_name_ok(name: &str) -> bool {
    !name.is_empty()
        && !name.as_bytes()[0].is_ascii_digit()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn secret_here(key: &str, instead: &str) -> PolicyError {
    err(
        key,
        format!("secrets never go in the configuration file; {instead}"),
    )
}

/// `http://` is accepted only for a loopback host (tests, a local proxy): the
/// bot token travels in every request.
fn slack_api_url(text: &str, key: &str) -> Result<String, PolicyError> {
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
fn pool_config(raw: &RawPool) -> Result<PoolConfig, PolicyError> {
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

fn nonneg(v: i64, key: &str, max: i64, what: &str) -> Result<u32, PolicyError> {
    if !(0..=max).contains(&v) {
        return Err(err(
            key,
            format!("{v} is out of range; use 0 to {max} {what}"),
        ));
    }
    Ok(v as u32)
}

/// Names a `[[group]]` may have: lower-case letters, digits, `-`, `_`.
fn group_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// A user id as written in a list: printable, no spaces, not a reserved form.
fn check_user_id(id: &str, key: &str) -> Result<(), PolicyError> {
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

struct Ctx<'a> {
    groups: &'a BTreeMap<String, Vec<String>>,
    mcp: &'a BTreeMap<String, McpServerConfig>,
}

impl Ctx<'_> {
    /// Resolves a `users`/`admins` list. `key` is e.g. `channel[2].users`;
    /// `platform` is the channel's (`None` for `[defaults]`). An id written
    /// `platform:id` is of that platform; a plain id in a channel's own list
    /// is of the channel's platform, and a plain id in `[defaults]` or a
    /// `[[group]]` of the platforms in [`Platform::UNPREFIXED`].
    fn user_set(
        &self,
        list: &[String],
        key: &str,
        platform: Option<Platform>,
    ) -> Result<UserSet, PolicyError> {
        let mut set = UserSet::default();
        let shared = |set: &mut UserSet, id: &str| match prefixed(id) {
            Some((p, id)) => {
                set.ids.insert((p, id.to_string()));
            }
            None => {
                for p in Platform::UNPREFIXED {
                    set.ids.insert((p, id.to_string()));
                }
            }
        };
        for (i, entry) in list.iter().enumerate() {
            let k = format!("{key}[{i}]");
            if entry == "*" {
                if list.len() > 1 {
                    return Err(err(
                        k,
                        "\"*\" already lets everyone in; remove the other entries or the \"*\"",
                    ));
                }
                set.everyone = true;
            } else if let Some(name) = entry.strip_prefix('@') {
                let Some(members) = self.groups.get(name) else {
                    let known: Vec<&str> = self.groups.keys().map(|s| s.as_str()).collect();
                    let known = if known.is_empty() {
                        "none is defined".to_string()
                    } else {
                        format!("defined: {}", known.join(", "))
                    };
                    return Err(err(
                        k,
                        format!("no [[group]] named {name:?} ({known}); define it with [[group]] name = {name:?}, or list the user by id without \"@\""),
                    ));
                };
                for m in members {
                    shared(&mut set, m);
                }
            } else {
                check_user_id(entry, &k)?;
                match (platform, prefixed(entry)) {
                    (Some(own), Some((p, _))) if p != own => {
                        return Err(err(
                            k,
                            format!("{entry:?} is a {p} user, but this is a {own} channel: a user id matches only on its own platform; list {own} ids here (or \"{own}:ID\")"),
                        ));
                    }
                    (_, Some((p, id))) => {
                        if id.is_empty() {
                            return Err(err(k, format!("{entry:?} has no user id after \"{p}:\"")));
                        }
                        set.ids.insert((p, id.to_string()));
                    }
                    (Some(own), None) => {
                        set.ids.insert((own, entry.clone()));
                    }
                    (None, None) => shared(&mut set, entry),
                }
            }
        }
        Ok(set)
    }
}

/// `[defaults]` resolved, or a channel's settings while being built.
#[derive(Clone)]
struct Settings {
    trust: Trust,
    users: UserSet,
    admins: UserSet,
    sandbox_kind: SandboxKind,
    idle_delete: Duration,
    agent: AgentPolicy,
    /// `None`: the platform's default (`Platform::default_debounce`).
    debounce: Option<Duration>,
    rate: Rates,
    github: Option<crate::github::RawChannelGithub>,
    mounts: Vec<crate::memory::ChannelMount>,
    policy: SandboxPolicy,
    chat: crate::chat_keys::ChatKeys,
    approvals: crate::approvals::ApprovalKeys,
}

#[derive(Clone, Copy, PartialEq)]
enum SandboxKind {
    Pool,
    PerThread,
}

impl Settings {
    #[allow(clippy::expect_used, reason = "constant rates, tested")]
    fn initial() -> Self {
        Settings {
            trust: Trust::Member,
            users: UserSet::default(),
            admins: UserSet::default(),
            sandbox_kind: SandboxKind::Pool,
            idle_delete: Duration::from_secs(24 * 3600),
            agent: AgentPolicy::default(),
            debounce: None,
            rate: Rates {
                user: Rate::parse("20/min").expect("valid"),
                channel: Rate::parse("100/min").expect("valid"),
            },
            github: None,
            mounts: Vec::new(),
            policy: SandboxPolicy::default(),
            chat: crate::chat_keys::ChatKeys::default(),
            approvals: crate::approvals::ApprovalKeys::default(),
        }
    }

    /// Applies the keys set in `raw`; `at` is the section (`defaults`, `channel[2]`).
    fn apply(
        &mut self,
        raw: RawSettings,
        at: &str,
        ctx: &Ctx,
        platform: Option<Platform>,
    ) -> Result<(), PolicyError> {
        let key = |k: &str| format!("{at}.{k}");
        if let Some(t) = raw.trust {
            self.trust = Trust::parse(&t).map_err(|m| err(key("trust"), m))?;
        }
        if let Some(u) = raw.users {
            self.users = ctx.user_set(&u, &key("users"), platform)?;
        }
        let admins_here = raw.admins.is_some();
        if let Some(a) = raw.admins {
            self.admins = ctx.user_set(&a, &key("admins"), platform)?;
            if self.admins.everyone {
                return Err(err(
                    key("admins[0]"),
                    "\"*\" would make everyone an admin; set trust = \"admin\" for that, or list the admins",
                ));
            }
        }
        if let Some(s) = raw.sandbox {
            self.sandbox_kind = match s.as_str() {
                "pool" => SandboxKind::Pool,
                "per-thread" => SandboxKind::PerThread,
                other => {
                    return Err(err(
                        key("sandbox"),
                        format!("unknown sandbox mode {other:?}; use \"pool\" or \"per-thread\""),
                    ))
                }
            };
        }
        if let Some(d) = raw.disk {
            let k = key("disk");
            let size = crate::units::parse_size(&d).map_err(|m| err(&k, m))?;
            let (lo, hi) = (ByteSize::mib(64), ByteSize::mib(16 << 20));
            if size < lo || size > hi {
                return Err(err(k, format!("{d:?} is out of range; use 64MiB to 16TiB")));
            }
            self.policy.limits.persistent_disk = Some(size);
        }
        crate::images::apply(&mut self.policy, raw.image, raw.root_inside, at)?;
        if let Some(d) = raw.idle_delete {
            self.idle_delete = duration_in(
                &d,
                &key("idle_delete"),
                Duration::from_secs(60),
                Duration::from_secs(365 * 24 * 3600),
            )?;
        }
        self.agent.apply(
            RawAgentKeys {
                agent: raw.agent,
                provider: raw.provider,
                model: raw.model,
                tools: raw.tools,
                mcp: raw.mcp,
                max_steps: raw.max_steps,
                persona: raw.persona,
                budget: raw.budget,
                budget_user: raw.budget_user,
                artifacts: raw.artifacts,
            },
            at,
            ctx.mcp,
        )?;
        if let Some(g) = raw.github {
            self.github = Some(g);
        }
        if let Some(m) = raw.mounts {
            self.mounts = crate::memory::channel_mounts(&m, at)?;
        }
        self.chat
            .apply(raw.conversation, raw.trigger, raw.mention, at)?;
        self.approvals
            .apply(raw.approve, raw.approve_timeout, raw.unknown, at)?;
        if let Some(d) = raw.debounce {
            self.debounce = Some(duration_in(
                &d,
                &key("debounce"),
                Duration::ZERO,
                Duration::from_secs(60),
            )?);
        }
        if let Some(r) = raw.rate {
            if let Some(u) = r.user {
                self.rate.user = Rate::parse(&u).map_err(|m| err(key("rate.user"), m))?;
            }
            if let Some(c) = r.channel {
                self.rate.channel = Rate::parse(&c).map_err(|m| err(key("rate.channel"), m))?;
            }
        }
        if let Some(b) = raw.backend {
            let kind = BackendKind::parse(&b).map_err(|m| err(key("backend"), m))?;
            if kind == BackendKind::Local {
                return Err(err(
                    key("backend"),
                    "the gateway serves other people and never runs their turns unsandboxed; use \"bwrap\" or \"gvisor\"",
                ));
            }
            self.policy.backend = kind;
        }
        if let Some(list) = raw.egress {
            self.policy.network.allow.clear();
            for (i, entry) in list.iter().enumerate() {
                let e =
                    parse_allow_entry(entry).map_err(|m| err(key(&format!("egress[{i}]")), m))?;
                self.policy.network.allow.push(e);
            }
        }
        if let Some(pins) = raw.resolve {
            self.policy.network.pins.clear();
            for (host, ip) in &pins {
                let (h, a) = parse_pin(&format!("{host}={ip}"))
                    .map_err(|m| err(key(&format!("resolve.{host}")), m))?;
                self.policy.network.pins.insert(h, a);
            }
        }
        if let Some(l) = raw.limits {
            let p = &mut self.policy;
            if let Some(m) = l.memory {
                p.set_memory(&m, &key("limits.memory"))?;
            }
            if let Some(n) = l.pids {
                p.set_pids(n, &key("limits.pids"))?;
            }
            if let Some(c) = l.cpus {
                p.set_cpus(c, &key("limits.cpus"))?;
            }
            if let Some(t) = l.timeout {
                p.set_timeout(&t, &key("limits.timeout"))?;
            }
        }
        if self.trust == Trust::Untrusted && !self.admins.is_empty() {
            let (k, fix) = if admins_here {
                ("admins", "remove admins or raise trust to \"member\"")
            } else {
                (
                    "trust",
                    "the admins come from [defaults]; set admins = [] here",
                )
            };
            return Err(err(
                key(k),
                format!("an untrusted channel has no admins: everything in its threads is untrusted input; {fix}"),
            ));
        }
        Ok(())
    }
}

/// The `[[channel]] platform = "discord"` id of the bot's direct messages
/// (each direct message channel is a conversation of it).
pub const DISCORD_DMS: &str = "dm";

/// Channel ids as platforms write them. A Slack id is what the channel's
/// details show (`C0123ABCD`), never its `#name`.
fn check_channel_id(platform: Platform, id: &str, key: &str) -> Result<(), PolicyError> {
    if id == "*" {
        return Ok(());
    }
    match platform {
        Platform::Slack => {
            let ok = !id.is_empty()
                && id.len() <= 32
                && id
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit());
            if !ok {
                return Err(err(
                    key,
                    format!("{id:?} is not a Slack channel id; write the id from the channel's details (e.g. \"C0123ABCD\"), not its #name, or \"*\" for any channel"),
                ));
            }
        }
        // Discord's direct messages: their channel ids are not known in
        // advance, so they are one entry.
        Platform::Discord if id == DISCORD_DMS => {}
        Platform::Telegram | Platform::WhatsApp | Platform::Discord => {
            let digits = id
                .strip_prefix('-')
                .filter(|_| platform == Platform::Telegram)
                .unwrap_or(id);
            let ok = !digits.is_empty()
                && digits.len() <= 20
                && digits.bytes().all(|b| b.is_ascii_digit());
            if !ok {
                let what = match platform {
                    Platform::Telegram => "a Telegram chat id (a number, negative for groups, e.g. \"-1001234567890\")",
                    Platform::WhatsApp => "a WhatsApp phone number id (the number's id in the app's WhatsApp settings, digits only)",
                    _ => "a Discord channel id (the digits \"Copy Channel ID\" gives), \"dm\" for direct messages,",
                };
                return Err(err(key, format!("{id:?} is not {what}, or \"*\" for any")));
            }
        }
        Platform::Web | Platform::Cli => {
            let ok = !id.is_empty()
                && id.len() <= 64
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
            if !ok {
                return Err(err(
                    key,
                    format!("{id:?} is not a channel id; use letters, digits, '-', '_' and '.' (at most 64), or \"*\" for any channel"),
                ));
            }
        }
    }
    Ok(())
}

impl GatewayConfig {
    /// Parses and validates a configuration file's text. Unset keys take the
    /// defaults documented in docs/configuration.md; every error names the key
    /// and says what to write instead. A file replaces the embedded default
    /// entirely: without `[[channel]]` entries nobody may talk.
    pub fn from_toml(text: &str) -> Result<Self, PolicyError> {
        let de = toml::Deserializer::new(text);
        let raw: RawFile = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = key_path(e.path());
            let inner = e.into_inner();
            PolicyError::Syntax {
                key,
                message: inner.message().to_string(),
                line: inner.span().map(|s| line_of(text, s.start)),
            }
        })?;

        // [gateway]
        let data_dir = match raw.gateway.data_dir {
            None => PathBuf::from(DEFAULT_DATA_DIR),
            Some(d) => {
                let p = PathBuf::from(&d);
                if !p.is_absolute() || p.components().count() <= 1 {
                    return Err(err(
                        "gateway.data_dir",
                        format!("{d:?} must be an absolute path to a directory other than /, e.g. \"{DEFAULT_DATA_DIR}\""),
                    ));
                }
                p
            }
        };

        // [web]
        let w = raw.web;
        if w.token.is_some() || w.tokens.is_some() {
            let k = if w.token.is_some() {
                "web.token"
            } else {
                "web.tokens"
            };
            return Err(secret_here(
                k,
                &format!("put the tokens in the environment variable named by web.token_env (default {DEFAULT_WEB_TOKEN_ENV}) or the secrets file"),
            ));
        }
        let enabled = w.enabled.unwrap_or(true);
        let web_listen = listen_addr(
            w.listen.as_deref().unwrap_or("127.0.0.1:8080"),
            "web.listen",
        )?;
        let auth_name = w.auth.as_deref().unwrap_or("loopback");
        let only_with = |k: &str, mode: &str| {
            err(
                format!("web.{k}"),
                format!("is only used with auth = \"{mode}\" (auth is \"{auth_name}\"); remove it or set auth = \"{mode}\""),
            )
        };
        if w.header.is_some() && auth_name != "header" {
            return Err(only_with("header", "header"));
        }
        if w.trusted_proxies.is_some() && auth_name != "header" {
            return Err(only_with("trusted_proxies", "header"));
        }
        if w.token_env.is_some() && auth_name != "token" {
            return Err(only_with("token_env", "token"));
        }
        let auth = match auth_name {
            "loopback" => WebAuth::Loopback,
            "token" => {
                let env = w.token_env.unwrap_or_else(|| DEFAULT_WEB_TOKEN_ENV.into());
                if !env_name_ok(&env) {
                    return Err(err(
                        "web.token_env",
                        format!("{env:?} is not an environment variable name (letters, digits, _); write the variable's name, not a token"),
                    ));
                }
                WebAuth::Token { env }
            }
            "header" => {
                let header = w.header.unwrap_or_else(|| DEFAULT_WEB_HEADER.into());
                let token_char =
                    |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
                if header.is_empty() || !header.bytes().all(token_char) {
                    return Err(err(
                        "web.header",
                        format!("{header:?} is not an HTTP header name; write e.g. \"{DEFAULT_WEB_HEADER}\""),
                    ));
                }
                let mut trusted = Vec::new();
                for (i, p) in w.trusted_proxies.unwrap_or_default().iter().enumerate() {
                    let ip = parse_ip_literal(p).ok_or_else(|| {
                        err(
                            format!("web.trusted_proxies[{i}]"),
                            format!("{p:?} is not an IP address; list the proxies' addresses, e.g. \"10.0.0.5\""),
                        )
                    })?;
                    if ip.is_unspecified() {
                        return Err(err(
                            format!("web.trusted_proxies[{i}]"),
                            format!(
                                "{p:?} would trust every peer; list the proxies' own addresses"
                            ),
                        ));
                    }
                    trusted.push(ip);
                }
                if enabled && !is_loopback(web_listen) && trusted.is_empty() {
                    return Err(err(
                        "web.trusted_proxies",
                        format!("web.listen {web_listen} is reachable from other machines, and anyone reaching it could set {header}; list the reverse proxies' addresses, e.g. trusted_proxies = [\"10.0.0.5\"]"),
                    ));
                }
                WebAuth::Header {
                    header,
                    trusted_proxies: trusted,
                }
            }
            other => {
                return Err(err(
                    "web.auth",
                    format!("unknown auth {other:?}; use \"loopback\", \"token\" or \"header\""),
                ))
            }
        };
        if enabled && auth == WebAuth::Loopback && !is_loopback(web_listen) {
            return Err(err(
                "web.listen",
                format!("{web_listen} is reachable from other machines, but auth = \"loopback\" believes whoever connects; listen on 127.0.0.1, or set auth = \"token\" or \"header\""),
            ));
        }
        let mut allowed_hosts = Vec::new();
        for (i, h) in w.allowed_hosts.unwrap_or_default().iter().enumerate() {
            let parsed = crate::hosts::parse_host_port(h).ok_or_else(|| {
                err(
                    format!("web.allowed_hosts[{i}]"),
                    format!("{h:?} is not a host name or IP address with an optional port; write it as a browser's Host header would, e.g. \"chat.example.com\" or \"chat.example.com:8443\" (no scheme, no path, no wildcard)"),
                )
            })?;
            allowed_hosts.push(parsed);
        }
        let web = WebConfig {
            enabled,
            listen: web_listen,
            auth,
            allowed_hosts,
        };

        // [admin]
        let admin = AdminConfig {
            listen: listen_addr(
                raw.admin.listen.as_deref().unwrap_or("127.0.0.1:9090"),
                "admin.listen",
            )?,
        };
        if web.enabled && clash(admin.listen, web.listen) {
            return Err(err(
                "admin.listen",
                format!("{} is also web.listen ({}); give /metrics its own port, e.g. \"127.0.0.1:9090\"", admin.listen, web.listen),
            ));
        }

        // [slack]
        let s = raw.slack;
        for (present, k) in [
            (s.signing_secret.is_some(), "slack.signing_secret"),
            (s.bot_token.is_some(), "slack.bot_token"),
            (s.app_token.is_some(), "slack.app_token"),
        ] {
            if present {
                let var = format!("SLACK_{}", k["slack.".len()..].to_ascii_uppercase());
                return Err(secret_here(
                    k,
                    &format!("set {var} in moat's environment or the secrets file"),
                ));
            }
        }
        let mode = match s.mode.as_deref().unwrap_or("off") {
            "events" => SlackMode::Events,
            "socket" => SlackMode::Socket,
            "off" => SlackMode::Off,
            other => {
                return Err(err(
                    "slack.mode",
                    format!("unknown mode {other:?}; use \"events\", \"socket\" or \"off\""),
                ))
            }
        };
        let api_url = slack_api_url(
            s.api_url.as_deref().unwrap_or(DEFAULT_SLACK_API_URL),
            "slack.api_url",
        )?;
        let slack_listen = match s.listen {
            None => None,
            Some(l) => {
                if mode != SlackMode::Events {
                    return Err(err(
                        "slack.listen",
                        "is only used with mode = \"events\"; remove it or set mode = \"events\"",
                    ));
                }
                let a = listen_addr(&l, "slack.listen")?;
                if web.enabled && clash(a, web.listen) {
                    return Err(err(
                        "slack.listen",
                        format!("{a} is also web.listen; leave slack.listen out to serve /slack/events on web.listen, or give it its own port"),
                    ));
                }
                if clash(a, admin.listen) {
                    return Err(err(
                        "slack.listen",
                        format!("{a} is also admin.listen; give it its own port"),
                    ));
                }
                Some(a)
            }
        };
        if mode == SlackMode::Events && !web.enabled && slack_listen.is_none() {
            return Err(err(
                "slack.listen",
                "mode = \"events\" needs a listener for POST /slack/events and the web chat is disabled; set slack.listen, e.g. \"0.0.0.0:3000\"",
            ));
        }
        let slack = SlackConfig {
            mode,
            api_url,
            listen: slack_listen,
        };

        // [pool]
        let pool = pool_config(&raw.pool)?;
        let pool = PoolConfig {
            max_waiters: nonneg(
                raw.pool.max_waiters.unwrap_or(16),
                "pool.max_waiters",
                10_000,
                "waiting requests",
            )?,
            ..pool
        };

        // [[group]]
        let mut groups = Vec::new();
        let mut by_name: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (i, g) in raw.group.into_iter().enumerate() {
            if !group_name_ok(&g.name) {
                return Err(err(
                    format!("group[{i}].name"),
                    format!("{:?} is not a group name; use lower-case letters, digits, '-' and '_' (refer to it as \"@name\")", g.name),
                ));
            }
            if by_name.contains_key(&g.name) {
                let first = groups
                    .iter()
                    .position(|x: &Group| x.name == g.name)
                    .unwrap_or(0);
                return Err(err(
                    format!("group[{i}].name"),
                    format!(
                        "{:?} is already group[{first}]; merge the two lists or rename one",
                        g.name
                    ),
                ));
            }
            for (j, u) in g.users.iter().enumerate() {
                let k = format!("group[{i}].users[{j}]");
                if u == "*" {
                    return Err(err(
                        k,
                        "a group lists people; to let everyone in, write users = [\"*\"] on the channel",
                    ));
                }
                if u.starts_with('@') {
                    return Err(err(
                        k,
                        format!("{u:?}: groups cannot contain groups; list the members' ids"),
                    ));
                }
                check_user_id(u, &k)?;
            }
            by_name.insert(g.name.clone(), g.users.clone());
            groups.push(Group {
                name: g.name,
                users: g.users,
            });
        }
        let mcp_servers = crate::agents::mcp_servers(raw.mcp)?;
        let ctx = Ctx {
            groups: &by_name,
            mcp: &mcp_servers,
        };

        // [telegram]
        let telegram = crate::platforms::telegram(raw.telegram, slack_api_url)?;
        if telegram.mode == crate::platforms::TelegramMode::Webhook && !web.enabled {
            return Err(err(
                "telegram.mode",
                "\"webhook\" is served on web.listen (POST /telegram/webhook), but the web chat is disabled; set web.enabled = true or mode = \"polling\"",
            ));
        }

        // [whatsapp]
        let whatsapp = crate::platforms::whatsapp(raw.whatsapp, slack_api_url)?;
        if whatsapp.enabled && !web.enabled {
            return Err(err(
                "whatsapp.enabled",
                "the webhook is served on web.listen (/whatsapp/webhook), but the web chat is disabled; set web.enabled = true",
            ));
        }

        // [discord]
        let discord = crate::platforms::discord(raw.discord, slack_api_url)?;

        // [defaults]
        let mut defaults = Settings::initial();
        defaults.apply(raw.defaults, "defaults", &ctx, None)?;

        // [[channel]]
        let mut channels: Vec<ChannelPolicy> = Vec::new();
        for (i, rc) in raw.channel.into_iter().enumerate() {
            let at = format!("channel[{i}]");
            let (platform, id, settings) = rc.into_parts();
            let disk_here = settings.disk.is_some();
            let platform =
                Platform::parse(&platform).map_err(|m| err(format!("{at}.platform"), m))?;
            check_channel_id(platform, &id, &format!("{at}.id"))?;
            if let Some(other) = channels
                .iter()
                .find(|c| c.platform == platform && c.id == id)
            {
                return Err(err(
                    format!("{at}.id"),
                    format!(
                        "channel[{}] is already the entry for {}; merge the two entries",
                        other.index,
                        other.describe()
                    ),
                ));
            }
            let own = [
                ("egress", settings.egress.is_some()),
                ("resolve", settings.resolve.is_some()),
                ("mcp", settings.mcp.is_some()),
            ];
            let mut s = defaults.clone();
            s.apply(settings, &at, &ctx, Some(platform))?;
            let mut untrusted_overrides = Vec::new();
            if s.trust == Trust::Untrusted {
                // Tightened keys come from this entry only (docs/trust.md).
                let here = format!("channel[{i}] ({platform} channel {})", shown(&id));
                for (key, set_here) in own {
                    let loose = match key {
                        "egress" => !s.policy.network.allow.is_empty(),
                        "resolve" => !s.policy.network.pins.is_empty(),
                        _ => !s.agent.mcp.is_empty(),
                    };
                    if !set_here {
                        match key {
                            "egress" => s.policy.network.allow.clear(),
                            "resolve" => s.policy.network.pins.clear(),
                            _ => s.agent.mcp.clear(),
                        }
                    } else if loose {
                        untrusted_overrides.push(crate::trust::override_warning(&here, key));
                    }
                }
                if s.policy.backend == BackendKind::Bwrap {
                    untrusted_overrides.push(crate::trust::backend_warning(&here));
                }
            }
            s.agent.check(&at)?;
            crate::images::check(&s.policy, &at)?;
            if s.sandbox_kind == SandboxKind::Pool {
                if disk_here {
                    return Err(err(
                        format!("{at}.disk"),
                        "a per-thread conversation's workspace disk; this channel uses the pool, whose sandboxes stay on tmpfs (reset in O(1)): set sandbox = \"per-thread\" or leave disk out",
                    ));
                }
                // From [defaults]: only per-thread channels take it.
                s.policy.limits.persistent_disk = None;
            }
            if s.sandbox_kind == SandboxKind::Pool && pool.max == 0 {
                return Err(err(
                    format!("{at}.sandbox"),
                    "uses the pool, but the pool may hold no sandbox (pool.size or pool.max = 0); set pool.max to 1 or more, or sandbox = \"per-thread\"",
                ));
            }
            s.approvals.check(platform, &at)?;
            channels.push(ChannelPolicy {
                index: i,
                platform,
                id,
                trust: s.trust,
                users: s.users,
                admins: s.admins,
                sandbox: match s.sandbox_kind {
                    SandboxKind::Pool => SandboxMode::Pool,
                    SandboxKind::PerThread => SandboxMode::PerThread {
                        idle_delete: s.idle_delete,
                    },
                },
                agent: s.agent,
                debounce: s.debounce.unwrap_or_else(|| platform.default_debounce()),
                rate: s.rate,
                github: s
                    .github
                    .as_ref()
                    .map(|g| crate::github::channel(g, &at, s.trust == Trust::Untrusted))
                    .transpose()?,
                mounts: s.mounts,
                chat: s.chat,
                approvals: s.approvals,
                untrusted_overrides,
                policy: s.policy,
            });
        }

        Ok(GatewayConfig {
            data_dir,
            web,
            admin,
            slack,
            telegram,
            whatsapp,
            discord,
            pool,
            groups,
            channels,
            llm: crate::agents::gateway_llm(raw.llm)?,
            agents: crate::agents::agents_config(raw.agents)?,
            github: crate::github::section(raw.github)?,
            amp: crate::agents::gateway_amp(raw.amp)?,
            memory_global: raw
                .memory
                .global
                .map(|g| crate::memory::host_path(&g, "memory.global"))
                .transpose()?,
            mounts_allowlist: raw
                .mounts
                .allowlist
                .map(|a| crate::memory::host_path(&a, "mounts.allowlist"))
                .transpose()?,
            tasks: crate::tasks::tasks_config(raw.tasks)?,
            ipc: crate::tasks::ipc_config(raw.ipc)?,
            retention: crate::store::retention(&raw.store)?,
            store: crate::store::section(raw.store)?,
        })
    }
}
