//! A channel's approval keys (docs/approvals.md): `approve = [...]` (which
//! actions wait for an admin of the channel), `approve_timeout` (how long
//! they wait before they are denied) and `unknown = "drop" |
//! "request_approval"` (what an unknown sender's first message does).
//!
//! Owns their parsing and validation (an unknown action name is refused
//! naming the key), which operations count as which action, whether an
//! action needs approval in a channel, and who may decide one. Must never:
//! let anyone but an admin of the request's channel decide, let an expired
//! request be approved, read a file, the environment or the clock.

use std::time::Duration;

use crate::gateway::{Platform, Trust};
use crate::units::{format_duration, parse_duration};
use crate::PolicyError;

/// An action a channel may hold for an admin's approval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ApprovalKind {
    /// `send_message` to another chat than the caller's own.
    SendElsewhere,
    /// `schedule_task`.
    Schedule,
    /// A push through the GitHub door (no hook yet: refused in the config).
    GithubPush,
    /// A package install (no hook yet: refused in the config).
    InstallPackages,
    /// Adding an MCP server (no hook yet: refused in the config).
    AddMcpServer,
}

impl ApprovalKind {
    pub const ALL: [ApprovalKind; 5] = [
        ApprovalKind::SendElsewhere,
        ApprovalKind::Schedule,
        ApprovalKind::GithubPush,
        ApprovalKind::InstallPackages,
        ApprovalKind::AddMcpServer,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::SendElsewhere => "send_elsewhere",
            Self::Schedule => "schedule",
            Self::GithubPush => "github_push",
            Self::InstallPackages => "install_packages",
            Self::AddMcpServer => "add_mcp_server",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == s)
    }

    /// Can moat hold this action today? Only actions with a hook where the
    /// gateway can wait; the others are refused in the configuration rather
    /// than silently not enforced.
    pub fn enforced(self) -> bool {
        matches!(self, Self::SendElsewhere | Self::Schedule)
    }

    /// What admins are asked, before the details.
    pub fn question(self) -> &'static str {
        match self {
            Self::SendElsewhere => "send a message to another chat",
            Self::Schedule => "schedule a task",
            Self::GithubPush => "push to GitHub",
            Self::InstallPackages => "install packages",
            Self::AddMcpServer => "add an MCP server",
        }
    }
}

/// What an unknown sender's message does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Unknown {
    /// Dropped and audited; nobody is told.
    #[default]
    Drop,
    /// The first one asks the channel's admins, who may let the sender in.
    RequestApproval,
}

/// The default `approve_timeout`: half the default turn limit
/// (`limits.timeout`, 10m), so a held call is decided before its turn ends.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5 * 60);
const MIN_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);

/// A channel's approval keys, as set in `[defaults]` or `[[channel]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalKeys {
    pub approve: Vec<ApprovalKind>,
    pub timeout: Duration,
    pub unknown: Unknown,
}

impl Default for ApprovalKeys {
    fn default() -> Self {
        ApprovalKeys {
            approve: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
            unknown: Unknown::Drop,
        }
    }
}

fn invalid(key: String, message: String) -> PolicyError {
    PolicyError::Invalid { key, message }
}

impl ApprovalKeys {
    /// Applies the keys set at `at` (`defaults`, `channel[2]`).
    pub(crate) fn apply(
        &mut self,
        approve: Option<Vec<String>>,
        timeout: Option<String>,
        unknown: Option<String>,
        at: &str,
    ) -> Result<(), PolicyError> {
        if let Some(list) = approve {
            let mut kinds = Vec::new();
            for (i, name) in list.iter().enumerate() {
                let key = format!("{at}.approve[{i}]");
                let Some(kind) = ApprovalKind::parse(name.trim()) else {
                    let known: Vec<&str> = ApprovalKind::ALL.iter().map(|k| k.name()).collect();
                    return Err(invalid(
                        key,
                        format!(
                            "unknown action {:?}; use one of {}",
                            name.chars().take(60).collect::<String>(),
                            known.join(", ")
                        ),
                    ));
                };
                if !kind.enforced() {
                    return Err(invalid(
                        key,
                        format!(
                            "{:?}: moat cannot hold this action for approval yet (docs/approvals.md); remove it rather than believe it is held",
                            kind.name()
                        ),
                    ));
                }
                if !kinds.contains(&kind) {
                    kinds.push(kind);
                }
            }
            self.approve = kinds;
        }
        if let Some(t) = timeout {
            let key = format!("{at}.approve_timeout");
            let d = parse_duration(&t).map_err(|m| invalid(key.clone(), m))?;
            if d < MIN_TIMEOUT || d > MAX_TIMEOUT {
                return Err(invalid(
                    key,
                    format!(
                        "{} is out of range; use {} to {}",
                        format_duration(d),
                        format_duration(MIN_TIMEOUT),
                        format_duration(MAX_TIMEOUT)
                    ),
                ));
            }
            self.timeout = d;
        }
        if let Some(u) = unknown {
            self.unknown = match u.as_str() {
                "drop" => Unknown::Drop,
                "request_approval" => Unknown::RequestApproval,
                other => {
                    return Err(invalid(
                        format!("{at}.unknown"),
                        format!(
                            "unknown policy {:?}; use \"drop\" or \"request_approval\"",
                            other.chars().take(60).collect::<String>()
                        ),
                    ))
                }
            };
        }
        Ok(())
    }

    /// Checks the keys of a `[[channel]]` of `platform` once it is built.
    pub(crate) fn check(&self, platform: Platform, at: &str) -> Result<(), PolicyError> {
        if self.unknown == Unknown::RequestApproval && platform == Platform::Web {
            return Err(invalid(
                format!("{at}.unknown"),
                "a web chat conversation is its sender's own: no admin would see the request; use \"drop\" and list the user".into(),
            ));
        }
        Ok(())
    }

    /// Does `kind` wait for an admin here?
    pub fn needs(&self, kind: ApprovalKind) -> bool {
        self.approve.contains(&kind)
    }
}

/// A channel that holds actions for longer than its turns may run: the
/// turn would be cut off (and the held call with it) before the timeout.
pub fn timeout_warning(c: &crate::gateway::ChannelPolicy) -> Option<String> {
    let turn = c.sandbox_policy().limits.timeout;
    (!c.approvals.approve.is_empty() && c.approvals.timeout >= turn).then(|| {
        format!(
            "channel[{}] ({}) waits up to approve_timeout = {} for an admin, but its turns end after limits.timeout = {}: set approve_timeout below it",
            c.index,
            c.describe(),
            format_duration(c.approvals.timeout),
            format_duration(turn)
        )
    })
}

/// How a decision on a request came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Approved,
    Denied,
    TimedOut,
}

impl Outcome {
    pub fn name(self) -> &'static str {
        match self {
            Self::Approved => "approved",
            Self::Denied => "denied",
            Self::TimedOut => "timed_out",
        }
    }
}

/// Why a click or a POST on a request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecideRefusal {
    /// The decider is not an admin of the request's channel.
    NotAdmin,
    /// The request was decided (or timed out) already: a replay.
    AlreadyDecided,
    /// No such request (never made, or from before a restart).
    Unknown,
}

impl DecideRefusal {
    pub fn name(self) -> &'static str {
        match self {
            Self::NotAdmin => "not_admin",
            Self::AlreadyDecided => "already_decided",
            Self::Unknown => "unknown_request",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Self::NotAdmin => "only an admin of this channel may decide this request",
            Self::AlreadyDecided => "this request was decided already",
            Self::Unknown => "no such request (it may have timed out, or moat restarted)",
        }
    }
}

/// A decision typed in the chat, for platforms without buttons: `approve
/// ID` or `deny ID` (case ignored), ID the request's 32 hex digits. Returns
/// whether it approves, and the id in lower case.
pub fn parse_decision(text: &str) -> Option<(bool, String)> {
    let (word, id) = text.trim().split_once(char::is_whitespace)?;
    let approve = match word.to_ascii_lowercase().as_str() {
        "approve" => true,
        "deny" => false,
        _ => return None,
    };
    let id = id.trim();
    (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| (approve, id.to_ascii_lowercase()))
}

/// May someone at `trust` in the request's channel decide a request that
/// is `pending` (still waiting, not past its deadline)? Only admins, once.
pub fn may_decide(trust: Option<Trust>, pending: bool) -> Result<(), DecideRefusal> {
    if !pending {
        return Err(DecideRefusal::AlreadyDecided);
    }
    match trust {
        Some(Trust::Admin) => Ok(()),
        _ => Err(DecideRefusal::NotAdmin),
    }
}

/// The trust an unknown sender an admin let in gets: the channel's, never
/// admin (admins are listed in the file only).
pub fn admitted_trust(channel_trust: Trust) -> Trust {
    match channel_trust {
        Trust::Admin => Trust::Member,
        t => t,
    }
}

impl crate::gateway::GatewayConfig {
    /// [`GatewayConfig::authorize`](crate::gateway::GatewayConfig::authorize),
    /// then the admitted senders: in a channel with `unknown =
    /// "request_approval"`, a sender an admin let in (`admitted()` asks the
    /// store, only when it matters) talks at [`admitted_trust`]. Switching
    /// the channel back to `"drop"` shuts them out again.
    pub fn authorize_admitted(
        &self,
        platform: Platform,
        channel_id: &str,
        user_id: &str,
        admitted: impl FnOnce() -> bool,
    ) -> crate::gateway::Authorization<'_> {
        use crate::gateway::Authorization;
        let verdict = self.authorize(platform, channel_id, user_id);
        if verdict.is_allowed() || user_id.is_empty() {
            return verdict;
        }
        match self.channel(platform, channel_id) {
            Some(c) if c.approvals.unknown == Unknown::RequestApproval && admitted() => {
                Authorization::Allowed {
                    channel: c,
                    trust: admitted_trust(c.trust),
                }
            }
            _ => verdict,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(approve: &[&str], t: Option<&str>, u: Option<&str>) -> Result<ApprovalKeys, String> {
        let mut k = ApprovalKeys::default();
        k.apply(
            Some(approve.iter().map(|s| s.to_string()).collect()),
            t.map(str::to_string),
            u.map(str::to_string),
            "channel[0]",
        )
        .map_err(|e| e.to_string())?;
        Ok(k)
    }

    #[test]
    fn approval_keys_parse_and_name_the_key() {
        let k = keys(
            &["send_elsewhere", "schedule", "schedule"],
            Some("30s"),
            None,
        )
        .unwrap();
        assert_eq!(
            k.approve,
            [ApprovalKind::SendElsewhere, ApprovalKind::Schedule]
        );
        assert_eq!(k.timeout, Duration::from_secs(30));
        assert!(k.needs(ApprovalKind::Schedule));
        let e = keys(&["schedule", "launch_missiles"], None, None).unwrap_err();
        assert!(
            e.starts_with("channel[0].approve[1]: unknown action \"launch_missiles\""),
            "{e}"
        );
        let e = keys(&["github_push"], None, None).unwrap_err();
        assert!(e.contains("approve[0]") && e.contains("cannot hold"), "{e}");
        let e = keys(&[], Some("soon"), None).unwrap_err();
        assert!(e.starts_with("channel[0].approve_timeout"), "{e}");
        let e = keys(&[], Some("200h"), None).unwrap_err();
        assert!(e.contains("out of range"), "{e}");
        let e = keys(&[], None, Some("ask")).unwrap_err();
        assert!(e.starts_with("channel[0].unknown"), "{e}");
        let k = keys(&[], None, Some("request_approval")).unwrap();
        assert_eq!(k.unknown, Unknown::RequestApproval);
        assert_eq!(k.timeout, DEFAULT_TIMEOUT);
        assert!(k.check(Platform::Web, "channel[0]").is_err());
        assert!(k.check(Platform::Slack, "channel[0]").is_ok());
    }

    #[test]
    fn admitted_senders_count_only_where_unknown_asks() {
        use crate::gateway::{Authorization, GatewayConfig};
        let toml = |unknown: &str| {
            format!(
                "[[channel]]\nplatform = \"slack\"\nid = \"C1\"\ntrust = \"admin\"\nusers = [\"U1\"]\nunknown = \"{unknown}\"\n"
            )
        };
        let cfg = GatewayConfig::from_toml(&toml("request_approval")).unwrap();
        let a = cfg.authorize_admitted(Platform::Slack, "C1", "U9", || true);
        assert!(
            matches!(
                a,
                Authorization::Allowed {
                    trust: Trust::Member,
                    ..
                }
            ),
            "{a:?}"
        );
        assert!(!cfg
            .authorize_admitted(Platform::Slack, "C1", "U9", || false)
            .is_allowed());
        assert!(!cfg
            .authorize_admitted(Platform::Slack, "C2", "U9", || true)
            .is_allowed());
        let cfg = GatewayConfig::from_toml(&toml("drop")).unwrap();
        assert!(!cfg
            .authorize_admitted(Platform::Slack, "C1", "U9", || true)
            .is_allowed());
        // Waiting as long as the turn may run (10m by default) is warned
        // about; the default wait is shorter.
        let with = |extra: &str| {
            GatewayConfig::from_toml(&format!(
                "[[channel]]\nplatform = \"slack\"\nid = \"C1\"\nusers = [\"U1\"]\napprove = [\"schedule\"]\n{extra}"
            ))
            .unwrap()
            .warnings()
            .iter()
            .any(|w| w.contains("approve_timeout"))
        };
        assert!(with("approve_timeout = \"10m\"\n"));
        assert!(with(
            "approve_timeout = \"2m\"\nlimits = { timeout = \"1m\" }\n"
        ));
        assert!(!with(""));
    }

    #[test]
    fn only_admins_decide_and_only_once() {
        assert_eq!(may_decide(Some(Trust::Admin), true), Ok(()));
        assert_eq!(
            may_decide(Some(Trust::Member), true),
            Err(DecideRefusal::NotAdmin)
        );
        assert_eq!(may_decide(None, true), Err(DecideRefusal::NotAdmin));
        assert_eq!(
            may_decide(Some(Trust::Admin), false),
            Err(DecideRefusal::AlreadyDecided)
        );
        assert_eq!(admitted_trust(Trust::Admin), Trust::Member);
        assert_eq!(admitted_trust(Trust::Untrusted), Trust::Untrusted);
    }

    #[test]
    fn typed_decisions_need_the_word_and_a_whole_id() {
        let id = "0123456789abcdef0123456789ABCDEF";
        assert_eq!(
            parse_decision(&format!("approve {id}")),
            Some((true, id.to_ascii_lowercase()))
        );
        assert_eq!(
            parse_decision(&format!("  DENY  {id} ")),
            Some((false, id.to_ascii_lowercase()))
        );
        for t in [
            "approve",
            "approve 0123",
            "approve everything please",
            &format!("approved {id}"),
            &format!("approve {id} and more"),
        ] {
            assert_eq!(parse_decision(t), None, "{t}");
        }
    }
}
