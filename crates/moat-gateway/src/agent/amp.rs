//! The Amp adapter: the command line (`amp -x --stream-json` with a
//! settings file written into the sandbox: tool allowlist, MCP servers),
//! and the reading of Amp's stream JSON, which Amp documents as compatible
//! with Claude Code's (so Claude Code's parser reads it).
//!
//! Amp's CLI works only with Amp's own service (ampcode.com) and an Amp API
//! key (`AMP_API_KEY`). The sandbox holds a placeholder key; the egress door
//! intercepts Amp's host (TLS with the lease CA) and puts the real key on
//! each request on the way out (`moat_egress::amp`). The adapter refuses to
//! start only when the sandbox policy itself would put a key inside
//! ([`unavailable`]).
//!
//! Owns: Amp's command line, its settings file and the refusal.
//! Must never: put an Amp key (or any real key) into a sandbox, let Amp use
//! a tool or MCP server the channel does not allow (thread-search tools
//! `find_thread` and `read_thread` are always off), or pretend a turn ran.

use moat_policy::SandboxPolicy;
use moat_sandbox::{Lease, RunSpec, StdinSource};
use serde_json::{json, Value};

use super::claude::{
    compose_prompt, refusal, report_dropped, run_cli, usable_mcp, StreamJsonParser, ToolPlan,
    MAX_PERSONA, NOT_ALLOWED,
};
use super::{Agent, AgentEvent, AgentSettings, CancelHandle, TurnInput, TurnOutcome};

/// Amp's service, which its CLI must reach.
pub use moat_egress::amp::AMP_HOST;

/// Variables that would carry an Amp credential into the sandbox.
pub const AMP_KEY_VARS: &[&str] = &["AMP_API_KEY", "AMP_TOKEN"];

/// Amp's built-in tools (as its stream JSON's `init` line lists them).
pub const KNOWN_TOOLS: &[&str] = &[
    "Bash",
    "create_file",
    "edit_file",
    "find_thread",
    "finder",
    "glob",
    "Grep",
    "handoff",
    "librarian",
    "look_at",
    "mermaid",
    "oracle",
    "painter",
    "Read",
    "read_mcp_resource",
    "read_thread",
    "read_web_page",
    "skill",
    "Task",
    "task_list",
    "undo_edit",
    "web_search",
];

/// moat's built-in tool names and Amp's.
const BUILTIN_ALIASES: &[(&str, &str)] = &[
    ("bash", "Bash"),
    ("read_file", "Read"),
    ("write_file", "create_file"),
    ("list_files", "glob"),
    ("search", "Grep"),
];

/// Why Amp cannot run in a channel.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmpUnavailable {
    /// The sandbox policy itself would put a key inside.
    #[error("the sandbox policy sets {0} in the sandbox's environment; a real key must never be inside a sandbox (the door adds Amp's key on the way out): remove it from the policy's env")]
    KeyInSandbox(String),
}

/// Every reason Amp cannot run under `policy`; empty means it can. The key
/// itself is the door's (`AMP_API_KEY` in moat's environment, checked when
/// the gateway starts); Amp's host needs no egress entry (the door
/// intercepts it).
pub fn unavailable(policy: &SandboxPolicy) -> Vec<AmpUnavailable> {
    AMP_KEY_VARS
        .iter()
        .filter(|v| policy.env.contains_key(**v))
        .map(|v| AmpUnavailable::KeyInSandbox(v.to_string()))
        .collect()
}

/// The answer of a turn Amp cannot run.
pub fn refusal_text(why: &[AmpUnavailable]) -> String {
    let mut s = String::from("moat: the Amp agent cannot run in this channel:");
    for w in why {
        s.push_str(&format!("\n- {w}"));
    }
    s.push_str(
        "\nUse the claude, codex or builtin agent for this channel (see docs/agents/amp.md).",
    );
    s
}

/// Runs the Amp CLI headless in the conversation's sandbox.
pub struct AmpAgent {
    settings: AgentSettings,
}

/// The wrapper of an Amp run: writes the settings file into the home
/// directory (the old one removed, the new one created exclusively) and
/// runs the CLI with it.
const AMP_WRAPPER: &str = r#"set -eu
umask 077
d="$HOME/.moat"
mkdir -p "$d"
f="$d/amp-settings.json"
rm -f "$f"
set -C
printf '%s' "$MOAT_AMP_SETTINGS" > "$f"
set +C
unset MOAT_AMP_SETTINGS
exec "$@" --settings-file "$f"
"#;

impl AmpAgent {
    pub fn new(settings: AgentSettings) -> Self {
        AmpAgent { settings }
    }

    /// The tools Amp's runs get (Amp's names; moat's built-in names are
    /// mapped to them).
    pub fn tool_plan(&self) -> ToolPlan {
        ToolPlan::build(&self.settings, KNOWN_TOOLS, BUILTIN_ALIASES)
    }

    /// Amp's settings file: every known tool the channel does not allow is
    /// disabled, calls are allowed only for the channel's tools and MCP
    /// servers (thread-search tools are rejected first, everything else
    /// last), and the MCP servers are only the channel's.
    pub fn settings_file(&self) -> Value {
        let plan = self.tool_plan();
        let mut rules = Vec::new();
        for f in moat_policy::agents::FORBIDDEN_TOOLS {
            for pattern in [f.to_string(), format!("mcp__*__{f}")] {
                rules.push(json!({"tool": pattern, "action": "reject", "message": NOT_ALLOWED}));
            }
        }
        for a in &plan.allowed {
            let pattern = if a.starts_with("mcp__") && a.matches("__").count() == 1 {
                format!("{a}__*")
            } else {
                a.clone()
            };
            rules.push(json!({"tool": pattern, "action": "allow"}));
        }
        rules.push(json!({"tool": "*", "action": "reject", "message": NOT_ALLOWED}));
        let (servers, _) = usable_mcp(&self.settings);
        let mut mcp = serde_json::Map::new();
        for s in servers {
            mcp.insert(
                s.name.clone(),
                json!({"command": s.command[0], "args": s.command[1..], "env": s.env}),
            );
        }
        let mut disable: Vec<String> = plan
            .disallowed
            .iter()
            .filter(|t| !t.starts_with("mcp__"))
            .cloned()
            .collect();
        for f in moat_policy::agents::FORBIDDEN_TOOLS {
            if !disable.iter().any(|d| d == f) {
                disable.push(f.to_string());
            }
        }
        json!({
            "amp.dangerouslyAllowAll": false,
            "amp.updates.mode": "disabled",
            "amp.tools.disable": disable,
            "amp.permissions": rules,
            "amp.mcpServers": mcp,
        })
    }

    /// Amp's command line (without `--settings-file`, which the wrapper
    /// adds). The prompt goes on standard input.
    pub fn command_line(&self, resume: bool) -> Vec<String> {
        let mut argv = vec![format!("{}/bin/amp", self.settings.cli_dir.display())];
        if resume {
            // Continues the most recent thread.
            argv.extend(["threads".into(), "continue".into()]);
        }
        argv.extend(["-x".into(), "--stream-json".into()]);
        argv
    }

    /// The prompt: Amp has no system-prompt option, so the persona leads it.
    pub fn prompt(&self, input: &TurnInput) -> String {
        let p = compose_prompt(input);
        match self
            .settings
            .persona
            .as_deref()
            .filter(|p| !p.trim().is_empty())
        {
            Some(persona) => {
                format!("<operator-instructions>\n{persona}\n</operator-instructions>\n\n{p}")
            }
            None => p,
        }
    }
}

impl Agent for AmpAgent {
    fn name(&self) -> &'static str {
        "amp"
    }

    fn run_turn(
        &self,
        lease: &mut Lease,
        input: &TurnInput,
        cancel: &CancelHandle,
        events: &mut dyn FnMut(AgentEvent),
    ) -> TurnOutcome {
        let why = unavailable(lease.policy());
        if !why.is_empty() {
            let text = refusal_text(&why);
            events(AgentEvent::Error(text.clone()));
            return refusal(text);
        }
        if self
            .settings
            .persona
            .as_ref()
            .is_some_and(|p| p.len() > MAX_PERSONA)
        {
            return refusal(format!(
                "moat: the channel's persona is longer than {} KiB; shorten the persona file",
                MAX_PERSONA / 1024
            ));
        }
        if self.settings.model.is_some() {
            events(AgentEvent::Error(
                "Amp picks its own models; the channel's model setting is ignored".into(),
            ));
        }
        let plan = self.tool_plan();
        report_dropped(&plan.dropped, &usable_mcp(&self.settings).1, events);
        let mut argv: Vec<String> = vec![
            "/bin/sh".into(),
            "-c".into(),
            AMP_WRAPPER.into(),
            "moat-amp".into(),
        ];
        argv.extend(self.command_line(input.resume));
        let mut spec = RunSpec::new(argv);
        spec.env = vec![("MOAT_AMP_SETTINGS".into(), self.settings_file().to_string())];
        spec.stdin = StdinSource::Bytes(self.prompt(input).into_bytes());
        events(AgentEvent::Status("starting Amp".into()));
        let mut parser = StreamJsonParser::new("Amp", plan);
        let run = run_cli(lease, cancel, spec, &mut |line| parser.line(line, events));
        parser.finish(&run, events)
    }
}

#[cfg(test)]
mod tests {
    use super::super::claude::{CliEnd, CliRun};
    use super::*;
    use std::path::PathBuf;

    fn settings(tools: &[&str]) -> AgentSettings {
        AgentSettings {
            tools: tools.iter().map(|s| s.to_string()).collect(),
            cli_dir: PathBuf::from("/opt/clis"),
            ..AgentSettings::default()
        }
    }

    // Lines shaped like the stream JSON in Amp's documentation (the
    // "Streaming JSON" announcement and the manual's appendix).
    const INIT: &str = r#"{"type":"system","subtype":"init","cwd":"/workspace","session_id":"T-2775dc92-90ed-4f85-8b73-8f9766029e83","tools":["Bash","Read","create_file","find_thread"],"mcp_servers":[]}"#;
    const USER: &str = r#"{"type":"user","message":{"role":"user","content":[{"type":"text","text":"what is in here?"}]},"parent_tool_use_id":null,"session_id":"T-2775dc92-90ed-4f85-8b73-8f9766029e83"}"#;
    const TOOL: &str = r#"{"type":"assistant","message":{"type":"message","role":"assistant","content":[{"type":"tool_use","id":"toolu_01","name":"Bash","input":{"cmd":"ls"}}],"stop_reason":"tool_use","usage":{"input_tokens":12783,"cache_creation_input_tokens":367,"cache_read_input_tokens":12416,"output_tokens":8,"max_tokens":224000,"service_tier":"standard"}},"parent_tool_use_id":null,"session_id":"T-2775dc92-90ed-4f85-8b73-8f9766029e83"}"#;
    const TOOL_OUT: &str = r#"{"type":"user","message":{"role":"user","content":[{"type":"tool_result","tool_use_id":"toolu_01","content":"README.md\n","is_error":false}]},"parent_tool_use_id":null,"session_id":"T-2775dc92-90ed-4f85-8b73-8f9766029e83"}"#;
    const ANSWER: &str = r#"{"type":"assistant","message":{"type":"message","role":"assistant","content":[{"type":"text","text":"Just a README."}],"stop_reason":"end_turn","usage":{"input_tokens":12800,"cache_creation_input_tokens":0,"cache_read_input_tokens":12416,"output_tokens":6,"max_tokens":224000,"service_tier":"standard"}},"parent_tool_use_id":null,"session_id":"T-2775dc92-90ed-4f85-8b73-8f9766029e83"}"#;
    const RESULT: &str = r#"{"type":"result","subtype":"success","duration_ms":2906,"is_error":false,"num_turns":2,"result":"Just a README.","session_id":"T-2775dc92-90ed-4f85-8b73-8f9766029e83"}"#;

    #[test]
    fn amp_refuses_only_a_key_put_in_the_sandbox_by_the_policy() {
        assert!(unavailable(&SandboxPolicy::default()).is_empty());
        let mut leaky = SandboxPolicy::default();
        leaky
            .env
            .insert("AMP_API_KEY".into(), "sgamp_user_x".into());
        let why = unavailable(&leaky);
        assert_eq!(why, [AmpUnavailable::KeyInSandbox("AMP_API_KEY".into())]);
        let text = refusal_text(&why);
        assert!(text.starts_with("moat: the Amp agent cannot run in this channel:"));
        assert!(text.contains("remove it from the policy's env"));
        // The refusal never repeats a value from the policy.
        assert!(!text.contains("sgamp_user_x"));
    }

    #[test]
    fn the_settings_file_allows_only_the_channels_tools_and_servers() {
        let mut s = settings(&["Bash", "read_file", "read_thread"]);
        s.mcp = vec![moat_agent::protocol::McpServer {
            name: "probe".into(),
            command: vec!["python3".into(), "/workspace/mcp.py".into()],
            env: Default::default(),
        }];
        let f = AmpAgent::new(s).settings_file();
        let disable: Vec<&str> = f["amp.tools.disable"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        for t in [
            "create_file",
            "edit_file",
            "oracle",
            "find_thread",
            "read_thread",
            "web_search",
        ] {
            assert!(disable.contains(&t), "{t} not disabled: {disable:?}");
        }
        assert!(!disable.contains(&"Bash") && !disable.contains(&"Read"));
        let rules = f["amp.permissions"].as_array().unwrap();
        let allow: Vec<&str> = rules
            .iter()
            .filter(|r| r["action"] == "allow")
            .map(|r| r["tool"].as_str().unwrap())
            .collect();
        assert_eq!(allow, ["Bash", "Read", "mcp__probe__*"]);
        assert_eq!(rules.first().unwrap()["action"], "reject");
        assert_eq!(
            rules.last().unwrap(),
            &json!({"tool": "*", "action": "reject", "message": NOT_ALLOWED})
        );
        assert_eq!(
            f["amp.mcpServers"],
            json!({"probe": {"command": "python3", "args": ["/workspace/mcp.py"], "env": {}}})
        );
        assert_eq!(f["amp.dangerouslyAllowAll"], false);
    }

    #[test]
    fn the_command_line_and_prompt() {
        let mut s = settings(&[]);
        s.persona = Some("Be kind.".into());
        let a = AmpAgent::new(s);
        assert_eq!(
            a.command_line(false),
            ["/opt/clis/bin/amp", "-x", "--stream-json"]
        );
        assert_eq!(
            a.command_line(true),
            [
                "/opt/clis/bin/amp",
                "threads",
                "continue",
                "-x",
                "--stream-json"
            ]
        );
        let p = a.prompt(&TurnInput {
            messages: vec!["hi".into()],
            ..TurnInput::default()
        });
        assert_eq!(
            p,
            "<operator-instructions>\nBe kind.\n</operator-instructions>\n\nhi"
        );
    }

    #[test]
    fn amps_stream_json_is_read_by_the_claude_code_parser() {
        let a = AmpAgent::new(settings(&["Bash"]));
        let mut p = StreamJsonParser::new("Amp", a.tool_plan());
        let mut ev = Vec::new();
        for l in [INIT, USER, TOOL, TOOL_OUT, "not json", ANSWER, RESULT] {
            p.line(l, &mut |e| ev.push(e));
        }
        assert_eq!(
            ev,
            vec![
                AgentEvent::Status("Amp started (its default model)".into()),
                AgentEvent::ToolCall {
                    name: "Bash".into(),
                    summary: "{\"cmd\":\"ls\"}".into()
                },
                AgentEvent::ToolResult {
                    name: "Bash".into(),
                    ok: true,
                    summary: "README.md".into()
                },
                AgentEvent::Text("Just a README.".into()),
            ]
        );
        assert_eq!(
            p.session_id(),
            Some("T-2775dc92-90ed-4f85-8b73-8f9766029e83")
        );
        assert_eq!(p.skipped(), 1);
        let out = p.finish(
            &CliRun {
                end: CliEnd::Success,
                stderr_tail: String::new(),
                cancelled: false,
            },
            &mut |_| {},
        );
        assert_eq!(
            out,
            TurnOutcome {
                preformatted: false,
                answer: "Just a README.".into(),
                ok: true,
                cancelled: false
            }
        );
    }

    #[test]
    fn a_rejected_amp_tool_is_refused_and_a_dead_amp_says_so() {
        let a = AmpAgent::new(settings(&["Read"]));
        let mut p = StreamJsonParser::new("Amp", a.tool_plan());
        let rejected = r#"{"type":"user","message":{"role":"user","content":[{"type":"tool_result","tool_use_id":"toolu_01","content":"not allowed in this channel","is_error":true}]},"parent_tool_use_id":null}"#;
        let mut ev = Vec::new();
        for l in [INIT, TOOL, rejected] {
            p.line(l, &mut |e| ev.push(e));
        }
        assert!(ev.contains(&AgentEvent::Refused {
            tool: "Bash".into(),
            reason: NOT_ALLOWED.into()
        }));
        let out = p.finish(
            &CliRun {
                end: CliEnd::Failed("moat: command exited with status 1".into()),
                stderr_tail: "Error: Unauthorized\n".into(),
                cancelled: false,
            },
            &mut |_| {},
        );
        assert!(!out.ok);
        assert_eq!(
            out.answer,
            "moat: Amp stopped before finishing its turn (command exited with status 1): Error: Unauthorized\n\nmoat refused tool `Bash`: not allowed in this channel"
        );
    }
}
