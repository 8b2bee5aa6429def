//! `GatewayConfig::from_toml`: the whole file parsed, every section
//! validated and put together, errors naming their key.
//!
//! Must never: read a file, the environment or the clock.

use super::raw::*;
use super::settings::*;
use super::*;
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
