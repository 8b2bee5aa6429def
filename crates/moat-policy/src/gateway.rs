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
//!
//! Layout: this file is the model (what the rest of moat reads) and the
//! authorization verdict; `gateway/raw.rs` is the file's TOML shape,
//! `gateway/settings.rs` one channel's settings, `gateway/load.rs`
//! `GatewayConfig::from_toml`.

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

mod load;
mod raw;
mod settings;

pub use settings::DISCORD_DMS;
