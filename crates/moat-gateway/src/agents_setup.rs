//! Start-up of the agents: for each channel, which agent answers (the
//! built-in agent when an LLM key is configured and the channel does not
//! choose, else the shell agent), the LLM API its doors serve (the real key
//! stays in the door), moat's own files its sandboxes see under /run/moat
//! (the moat binary for the built-in agent, the CLI template), the persona
//! text and the allowlists.
//!
//! Must never: put a key into anything a sandbox sees (only the door holds
//! it), start a channel whose agent needs a key that is not there, or give a
//! channel a tool or MCP server its configuration does not name.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use moat_egress::llm::{LlmConfig, Provider, UsageLedger};
use moat_policy::gateway::{AgentKind, ChannelPolicy, GatewayConfig, LlmProvider};

use crate::agent::{Agent, AgentSettings, ShellAgent};
use crate::pipeline::ChannelSetup;
use crate::pool::DoorExtras;

use crate::agent::builtin::MOAT_INSIDE;
/// Where a CLI template made by `moat agents install` is shown inside.
pub const TEMPLATE_INSIDE: &str = "/run/moat/agents";
/// Where `scripts/setup` installs the CLIs on the host (seen inside as is,
/// since sandboxes see /usr read-only).
pub const HOST_CLI_DIR: &str = "/usr/local/lib/moat-agent-clis";

/// What building the setups needs from the process.
pub struct SetupInputs<'a> {
    pub cfg: &'a GatewayConfig,
    /// Secrets and settings by name (environment, then secrets file).
    pub secret: &'a (dyn Fn(&str) -> Option<String> + Send + Sync),
    /// The moat executable (for the built-in agent); `None`: not available.
    pub moat_exe: Option<&'a Path>,
    /// Where to put a world-readable copy of it.
    pub runtime_dir: &'a Path,
    /// The usage ledger shared by every door.
    pub ledger: Arc<UsageLedger>,
}

/// Whether an LLM key is configured (the built-in agent becomes the default).
pub fn llm_key_available(secret: &dyn Fn(&str) -> Option<String>) -> bool {
    [LlmProvider::Anthropic, LlmProvider::Openai]
        .iter()
        .any(|p| secret(p.key_var()).is_some_and(|k| !k.is_empty()))
}

/// The tools an agent gets when its channel names none.
pub fn default_tools(kind: AgentKind) -> Vec<String> {
    let list: &[&str] = match kind {
        AgentKind::Shell => &[],
        AgentKind::Builtin => &moat_policy::agents::BUILTIN_TOOLS,
        AgentKind::ClaudeCode => &["Bash", "Read", "Write", "Edit", "Glob", "Grep", "LS"],
        AgentKind::Codex => &["shell"],
        AgentKind::Amp => &["Bash", "Read", "create_file", "edit_file", "glob", "Grep"],
        AgentKind::Pi => &["read", "bash", "edit", "write", "grep", "find", "ls"],
    };
    list.iter().map(|s| s.to_string()).collect()
}

/// One [`ChannelSetup`] per channel, by index. Fails naming the channel key
/// when an agent's key, persona or binary is missing.
pub fn build(inputs: &SetupInputs) -> Result<HashMap<usize, ChannelSetup>, String> {
    let cfg = inputs.cfg;
    let key_here = llm_key_available(inputs.secret);
    let cli_dir = cli_template(cfg);
    let mut moat_copy: Option<PathBuf> = None;
    let mut out = HashMap::new();
    let mut github = crate::github_setup::templates(cfg, inputs.secret, inputs.runtime_dir)?;
    for c in &cfg.channels {
        let at = format!("channel[{}]", c.index);
        let kind = c.agent.kind_or_default(key_here);
        // The settings are checked again against the agent the default
        // picked (the file may leave `agent` unset).
        c.agent.check_as(kind, &at).map_err(|e| e.to_string())?;
        if kind == AgentKind::Shell {
            out.insert(
                c.index,
                ChannelSetup {
                    artifacts: artifact_limits(c),
                    ..ChannelSetup::default()
                },
            );
            continue;
        }
        let provider = provider_for(c, kind, inputs.secret, &at)?;
        let persona = match &c.agent.persona {
            None => None,
            Some(p) => Some(std::fs::read_to_string(p).map_err(|e| {
                format!(
                    "{at}.persona: cannot read {}: {e}; make it a readable text file or remove the key",
                    p.display()
                )
            })?),
        };
        let mut extras = DoorExtras::default();
        if let Some(p) = provider {
            let mut llm = llm_config(cfg, c, p, inputs)?;
            // The channel's model is enforced at the door for the agents that
            // use only that model (Claude Code also calls a small background
            // model, so for it `model` is what it asks for, not a limit).
            if let (Some(m), AgentKind::Builtin | AgentKind::Codex | AgentKind::Pi) =
                (&c.agent.model, kind)
            {
                llm.models = vec![m.clone()];
            }
            extras.llm = Some(llm);
        }
        if kind == AgentKind::Amp {
            // The real key stays in the door; the sandbox gets a placeholder.
            let amp = moat_egress::amp::AmpAccess::from_env(
                inputs.secret,
                cfg.amp.url.as_deref(),
                cfg.amp.allow_plain_http,
                inputs.runtime_dir.join("doors"),
            )
            .map_err(|e| format!("{at}.agent: agent \"amp\": {e}"))?;
            extras.amp = Some(amp);
        }
        let inside_cli_dir = match &cli_dir {
            Some(host) if kind != AgentKind::Builtin => {
                moat_sandbox::reach::require_for_sandboxes(
                    host,
                    &format!("{at}: the agent CLI template {}", host.display()),
                    "install the CLIs where they can (`moat agents install --dir DIR`) and set agents.dir = \"DIR/current\"",
                )
                .map_err(|e| e.to_string())?;
                extras
                    .files
                    .push((host.clone(), PathBuf::from(TEMPLATE_INSIDE)));
                PathBuf::from(TEMPLATE_INSIDE)
            }
            _ => PathBuf::from(HOST_CLI_DIR),
        };
        if kind == AgentKind::Builtin && moat_copy.is_none() {
            let exe = inputs.moat_exe.ok_or_else(|| {
                format!("{at}.agent: the built-in agent runs the moat binary inside the sandbox, but this process does not know where it is; choose another agent")
            })?;
            moat_copy = Some(crate::agent::builtin::install_moat_binary(
                inputs.runtime_dir,
                exe,
            )?);
        }
        // moat's own tools (docs/ipc.md): every agent but the shell reaches
        // its lease's IPC endpoint through `moat ipc-bridge` as an MCP server.
        if moat_copy.is_none() {
            if let Some(exe) = inputs.moat_exe {
                moat_copy = crate::agent::builtin::install_moat_binary(inputs.runtime_dir, exe)
                    .map_err(|e| tracing::warn!(error = %e, "moat's IPC tools are not offered to the agents"))
                    .ok();
            }
        }
        if let Some(copy) = &moat_copy {
            extras
                .files
                .push((copy.clone(), PathBuf::from(MOAT_INSIDE)));
        }
        // gVisor leases get no IPC endpoint (crate::ipc::serves), so their
        // agents are not offered moat's tools either.
        let moat_tools =
            (moat_copy.is_some() && crate::ipc::serves(&c.sandbox_policy())).then(|| {
                moat_agent::protocol::McpServer {
                    name: crate::ipc::MCP_SERVER.into(),
                    command: vec![MOAT_INSIDE.into(), "ipc-bridge".into()],
                    env: Default::default(),
                }
            });
        let settings = AgentSettings {
            persona,
            tools: c.agent.tools.clone().unwrap_or_else(|| default_tools(kind)),
            mcp: c
                .agent
                .mcp
                .iter()
                .map(|m| moat_agent::protocol::McpServer {
                    name: m.name.clone(),
                    command: m.command.clone(),
                    env: m.env.clone(),
                })
                .chain(
                    moat_tools
                        .filter(|_| !c.agent.mcp.iter().any(|m| m.name == crate::ipc::MCP_SERVER)),
                )
                .collect(),
            model: c.agent.model.clone(),
            max_steps: c.agent.max_steps,
            provider: provider.map(|p| match p {
                LlmProvider::Anthropic => moat_agent::protocol::Provider::Anthropic,
                LlmProvider::Openai => moat_agent::protocol::Provider::Openai,
            }),
            cli_dir: inside_cli_dir,
        };
        let agent = make_agent(kind, settings);
        out.insert(
            c.index,
            ChannelSetup {
                agent,
                extras,
                artifacts: artifact_limits(c),
            },
        );
    }
    for (idx, setup) in out.iter_mut() {
        setup.extras.github = github.remove(idx);
    }
    Ok(out)
}

fn artifact_limits(c: &ChannelPolicy) -> crate::artifacts::ArtifactLimits {
    crate::artifacts::ArtifactLimits {
        max_files: c.agent.artifacts.max_files as usize,
        max_bytes: c.agent.artifacts.max_bytes,
    }
}

fn make_agent(kind: AgentKind, settings: AgentSettings) -> Arc<dyn Agent> {
    match kind {
        AgentKind::Shell => Arc::new(ShellAgent),
        AgentKind::Builtin => Arc::new(crate::agent::builtin::BuiltinAgent::new(
            settings,
            MOAT_INSIDE,
        )),
        AgentKind::ClaudeCode => Arc::new(crate::agent::claude::ClaudeCodeAgent::new(settings)),
        AgentKind::Codex => Arc::new(crate::agent::codex::CodexAgent::new(settings)),
        AgentKind::Amp => Arc::new(crate::agent::amp::AmpAgent::new(settings)),
        AgentKind::Pi => Arc::new(crate::agent::pi::PiAgent::new(settings)),
    }
}

/// The host directory of the CLI template, if one is configured or installed.
fn cli_template(cfg: &GatewayConfig) -> Option<PathBuf> {
    match &cfg.agents.dir {
        Some(d) => Some(d.clone()),
        None => {
            let d = cfg.data_dir.join("agents").join("current");
            d.is_dir().then_some(d)
        }
    }
}

/// The API a channel's doors serve, checking its key is there.
fn provider_for(
    c: &ChannelPolicy,
    kind: AgentKind,
    secret: &dyn Fn(&str) -> Option<String>,
    at: &str,
) -> Result<Option<LlmProvider>, String> {
    let has = |p: LlmProvider| secret(p.key_var()).is_some_and(|k| !k.is_empty());
    let p = match kind {
        AgentKind::Shell => return Ok(None),
        AgentKind::Amp => return Ok(None),
        AgentKind::ClaudeCode => LlmProvider::Anthropic,
        AgentKind::Codex => LlmProvider::Openai,
        AgentKind::Builtin | AgentKind::Pi => {
            c.agent.provider.unwrap_or(if has(LlmProvider::Anthropic) {
                LlmProvider::Anthropic
            } else {
                LlmProvider::Openai
            })
        }
    };
    if !has(p) {
        return Err(format!(
            "{at}.agent: agent \"{}\" needs {} in moat's environment or secrets file (the key stays in moat; the sandbox gets a placeholder)",
            kind.name(),
            p.key_var()
        ));
    }
    Ok(Some(p))
}

fn llm_config(
    cfg: &GatewayConfig,
    c: &ChannelPolicy,
    p: LlmProvider,
    inputs: &SetupInputs,
) -> Result<LlmConfig, String> {
    let provider = match p {
        LlmProvider::Anthropic => Provider::Anthropic,
        LlmProvider::Openai => Provider::OpenAi,
    };
    let configured = match p {
        LlmProvider::Anthropic => cfg.llm.anthropic_url.clone(),
        LlmProvider::Openai => cfg.llm.openai_url.clone(),
    };
    let secret = inputs.secret;
    let mut llm = LlmConfig::from_env(&[provider], |k| {
        if k == provider.url_var() {
            if let Some(u) = &configured {
                return Some(u.clone());
            }
        }
        secret(k)
    })
    .map_err(|e| format!("channel[{}].agent: {e}", c.index))?;
    llm.token_budget = c.agent.budget;
    llm.user_window_budget = c.agent.budget_user.map(|b| moat_egress::llm::WindowBudget {
        tokens: b.tokens,
        window_ms: u64::try_from(b.per.as_millis()).unwrap_or(u64::MAX),
    });
    llm.channel = Some(c.describe());
    llm.ledger = inputs.ledger.clone();
    Ok(llm)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Env {
        dir: tempfile::TempDir,
        exe: PathBuf,
    }

    fn env() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("moat");
        std::fs::write(&exe, b"#!/bin/sh\n").unwrap();
        Env { dir, exe }
    }

    fn build_with(
        toml: &str,
        keys: &[(&'static str, &'static str)],
        e: &Env,
    ) -> Result<HashMap<usize, ChannelSetup>, String> {
        let cfg = GatewayConfig::from_toml(toml).unwrap();
        let keys: Vec<(String, String)> = keys
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let secret = move |k: &str| keys.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        build(&SetupInputs {
            cfg: &cfg,
            secret: &secret,
            moat_exe: Some(&e.exe),
            runtime_dir: e.dir.path(),
            ledger: Arc::new(UsageLedger::new()),
        })
    }

    const CHANNEL: &str = "[[channel]]\nplatform = \"web\"\nid = \"*\"\nusers = [\"*\"]\n";
    const KEY: &str = "sk-ant-api03-unit-test-key-0000";

    #[test]
    fn without_a_key_the_default_is_the_shell_agent_with_no_door_extras() {
        let e = env();
        let s = build_with(CHANNEL, &[], &e).unwrap();
        assert_eq!(s[&0].agent.name(), "shell");
        assert!(s[&0].extras.llm.is_none());
        assert!(s[&0].extras.files.is_empty());
    }

    #[test]
    fn with_a_key_the_default_is_the_builtin_agent_with_the_llm_proxy_and_the_binary() {
        let e = env();
        let s = build_with(CHANNEL, &[("ANTHROPIC_API_KEY", KEY)], &e).unwrap();
        assert_eq!(s[&0].agent.name(), "builtin");
        let llm = s[&0].extras.llm.as_ref().expect("the door serves the API");
        assert_eq!(llm.providers.len(), 1);
        assert_eq!(llm.providers[0].provider, Provider::Anthropic);
        let (host, inside) = &s[&0].extras.files[0];
        assert_eq!(inside, Path::new(MOAT_INSIDE));
        assert!(
            host.starts_with(e.dir.path()),
            "a copy under the runtime dir"
        );
        assert_eq!(std::fs::read(host).unwrap(), b"#!/bin/sh\n");
    }

    #[test]
    fn openai_only_picks_openai_and_an_agent_without_its_key_fails_naming_it() {
        let e = env();
        let s = build_with(CHANNEL, &[("OPENAI_API_KEY", "sk-proj-x")], &e).unwrap();
        assert_eq!(
            s[&0].extras.llm.as_ref().unwrap().providers[0].provider,
            Provider::OpenAi
        );
        let err = build_with(
            &format!("{CHANNEL}agent = \"claude\""),
            &[("OPENAI_API_KEY", "sk-proj-x")],
            &e,
        )
        .err()
        .expect("claude without an Anthropic key");
        assert!(
            err.contains("channel[0].agent") && err.contains("ANTHROPIC_API_KEY"),
            "{err}"
        );
        assert!(!err.contains("sk-proj-x"));
    }

    #[test]
    fn an_unreadable_persona_fails_naming_the_key_and_a_readable_one_is_used() {
        let e = env();
        let err = build_with(
            &format!("{CHANNEL}persona = \"/nonexistent/persona.md\""),
            &[("ANTHROPIC_API_KEY", KEY)],
            &e,
        )
        .err()
        .expect("missing persona");
        assert!(err.starts_with("channel[0].persona:"), "{err}");
        let p = e.dir.path().join("persona.md");
        std::fs::write(&p, "You are terse.").unwrap();
        let s = build_with(
            &format!("{CHANNEL}persona = \"{}\"", p.display()),
            &[("ANTHROPIC_API_KEY", KEY)],
            &e,
        );
        assert!(s.is_ok());
    }

    #[test]
    fn a_cli_template_dir_is_shown_at_run_moat_agents() {
        let e = env();
        let s = build_with(
            &format!("[agents]\ndir = \"/srv/agents/current\"\n{CHANNEL}agent = \"claude\""),
            &[("ANTHROPIC_API_KEY", KEY)],
            &e,
        )
        .unwrap();
        assert_eq!(s[&0].agent.name(), "claude");
        assert_eq!(
            s[&0].extras.files[0],
            (
                PathBuf::from("/srv/agents/current"),
                PathBuf::from(TEMPLATE_INSIDE)
            )
        );
        // And moat's binary, for `moat ipc-bridge` (docs/ipc.md).
        assert_eq!(s[&0].extras.files[1].1, PathBuf::from(MOAT_INSIDE));
        assert_eq!(s[&0].extras.files.len(), 2);
    }

    #[test]
    fn a_cli_template_the_sandboxes_cannot_reach_stops_the_start_naming_the_fix() {
        use std::os::unix::fs::PermissionsExt;
        let e = env();
        // Below a directory only root may enter, as under /root.
        let closed = e.dir.path().join("closed");
        let template = closed.join("agents").join("current");
        std::fs::create_dir_all(&template).unwrap();
        std::fs::set_permissions(e.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
        let toml = format!(
            "[agents]\ndir = \"{}\"\n{CHANNEL}agent = \"claude\"",
            template.display()
        );
        let keys = [("ANTHROPIC_API_KEY", KEY)];
        let err = build_with(&toml, &keys, &e).err().expect("refused");
        assert!(
            err.starts_with("channel[0]: the agent CLI template")
                && err.contains(&format!("chmod o+x {}", closed.display()))
                && err.contains("agents.dir"),
            "{err}"
        );
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o711)).unwrap();
        assert!(build_with(&toml, &keys, &e).is_ok());
    }

    #[test]
    fn default_tools_cover_every_agent_and_never_a_thread_search_tool() {
        for k in [
            AgentKind::Builtin,
            AgentKind::ClaudeCode,
            AgentKind::Codex,
            AgentKind::Amp,
            AgentKind::Pi,
        ] {
            let t = default_tools(k);
            assert!(!t.is_empty(), "{k:?}");
            assert!(!t.iter().any(|n| moat_policy::agents::is_forbidden_tool(n)));
        }
    }
}
