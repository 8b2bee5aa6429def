//! One `[[channel]]` entry's settings: `[defaults]` with the entry's keys
//! on top, validated key by key (`Settings::apply`), and the user lists
//! with groups expanded (`Ctx`).
//!
//! Must never: loosen a key the file did not set, or let an untrusted
//! channel keep a default that is only safe for members.

use super::raw::*;
use super::*;
pub(super) struct Ctx<'a> {
    pub(super) groups: &'a BTreeMap<String, Vec<String>>,
    pub(super) mcp: &'a BTreeMap<String, McpServerConfig>,
}

impl Ctx<'_> {
    /// Resolves a `users`/`admins` list. `key` is e.g. `channel[2].users`;
    /// `platform` is the channel's (`None` for `[defaults]`). An id written
    /// `platform:id` is of that platform; a plain id in a channel's own list
    /// is of the channel's platform, and a plain id in `[defaults]` or a
    /// `[[group]]` of the platforms in [`Platform::UNPREFIXED`].
    pub(super) fn user_set(
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
pub(super) struct Settings {
    pub(super) trust: Trust,
    pub(super) users: UserSet,
    pub(super) admins: UserSet,
    pub(super) sandbox_kind: SandboxKind,
    pub(super) idle_delete: Duration,
    pub(super) agent: AgentPolicy,
    /// `None`: the platform's default (`Platform::default_debounce`).
    pub(super) debounce: Option<Duration>,
    pub(super) rate: Rates,
    pub(super) github: Option<crate::github::RawChannelGithub>,
    pub(super) mounts: Vec<crate::memory::ChannelMount>,
    pub(super) policy: SandboxPolicy,
    pub(super) chat: crate::chat_keys::ChatKeys,
    pub(super) approvals: crate::approvals::ApprovalKeys,
}

#[derive(Clone, Copy, PartialEq)]
pub(super) enum SandboxKind {
    Pool,
    PerThread,
}

impl Settings {
    #[allow(clippy::expect_used, reason = "constant rates, tested")]
    pub(super) fn initial() -> Self {
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
    pub(super) fn apply(
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
pub(super) fn check_channel_id(platform: Platform, id: &str, key: &str) -> Result<(), PolicyError> {
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
