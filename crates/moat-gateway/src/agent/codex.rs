//! The Codex adapter: runs `codex exec --json` in the conversation's sandbox
//! and turns its JSON events into [`AgentEvent`]s and a [`TurnOutcome`].
//!
//! Codex has no per-tool allowlist like Claude Code's. What the channel's
//! `tools` list decides here is whether Codex has a shell: without `shell`
//! in the list Codex runs with its shell tool turned off (`--disable
//! shell_tool`), so `exec_command` does not exist for the model. Its file
//! editing tool (`apply_patch`), `view_image` and the MCP-resource readers
//! cannot be turned off in Codex 0.169 and are always there; they act only
//! inside the sandbox. MCP servers are only the channel's, and their
//! thread-search tools are disabled.
//!
//! Owns: Codex's command line (provider through the door, features, user
//! configuration ignored, persona, model, MCP servers, resume) and the
//! reading of its `--json` output.
//! Must never: give Codex a shell the channel does not allow, load the
//! sandbox's own `~/.codex/config.toml` (its `notify` and hooks run
//! commands, whatever the channel says), put anything secret on its command
//! line, or lose a turn's outcome.

use moat_sandbox::{Lease, RunSpec, StdinSource};
use serde_json::Value;

use super::claude::{
    compose_prompt, push_para, refusal, report_dropped, run_cli, usable_mcp, CliEnd, CliRun,
    MAX_PERSONA,
};
use super::{first_line, Agent, AgentEvent, AgentSettings, CancelHandle, TurnInput, TurnOutcome};

/// Names a Codex channel's `tools` list may use. `shell` (or moat's `bash`)
/// turns Codex's shell on; the others are always on and listed so that a
/// configuration naming them is not reported as a mistake.
pub const SHELL_NAMES: &[&str] = &["shell", "bash", "Bash", "exec_command"];
/// Codex tools that cannot be turned off (0.169).
pub const ALWAYS_ON: &[&str] = &["apply_patch", "view_image"];

/// Codex features turned off in every run: plugins and apps (they reach
/// github.com and chatgpt.com), hooks (they run commands), goals.
const DISABLED_FEATURES: &[&str] = &["plugins", "hooks", "goals"];

/// Largest answer kept.
const MAX_ANSWER: usize = 256 * 1024;

/// Runs the Codex CLI headless in the conversation's sandbox.
pub struct CodexAgent {
    settings: AgentSettings,
}

/// The wrapper every Codex run goes through: checks the door's OpenAI proxy
/// is there and points Codex's own provider at it (Codex's built-in
/// `openai` provider reads no key from the environment), then reads the
/// prompt from standard input (`-`).
const CODEX_WRAPPER: &str = r#"set -eu
if [ -z "${OPENAI_BASE_URL:-}" ]; then
  echo "moat: Codex needs the door's OpenAI proxy, but this sandbox has none (give moat an OPENAI_API_KEY for this channel)" >&2
  exit 78
fi
case "$OPENAI_BASE_URL" in *'"'*|*'\'*) echo "moat: OPENAI_BASE_URL is not a plain URL" >&2; exit 78;; esac
exec "$@" -c "model_providers.moat={name=\"moat\", base_url=\"$OPENAI_BASE_URL\", env_key=\"OPENAI_API_KEY\", wire_api=\"responses\"}" -
"#;

/// A TOML string (JSON's escapes are TOML's basic-string escapes).
fn toml_str(s: &str) -> String {
    Value::String(s.to_string()).to_string()
}

impl CodexAgent {
    pub fn new(settings: AgentSettings) -> Self {
        CodexAgent { settings }
    }

    /// Whether the channel gives Codex a shell.
    pub fn shell_allowed(&self) -> bool {
        self.settings
            .tools
            .iter()
            .any(|t| SHELL_NAMES.contains(&t.as_str()))
    }

    /// Names in the channel's list Codex has no use for, with why.
    pub fn dropped_tools(&self) -> Vec<(String, String)> {
        self.settings
            .tools
            .iter()
            .filter(|t| {
                !SHELL_NAMES.contains(&t.as_str()) && !ALWAYS_ON.contains(&t.as_str())
            })
            .map(|t| {
                let why = if moat_policy::agents::is_forbidden_tool(t) {
                    "thread-search tools are never enabled".to_string()
                } else if t.starts_with("mcp__") {
                    "Codex allows MCP servers as a whole (the channel's `mcp` list), not single tools".to_string()
                } else {
                    format!(
                        "Codex has no such tool; its names are {} (shell) and {} (always on)",
                        SHELL_NAMES.join(", "),
                        ALWAYS_ON.join(", ")
                    )
                };
                (t.clone(), why)
            })
            .collect()
    }

    /// Codex's command line, up to (not including) the provider and the
    /// prompt, which the wrapper adds.
    pub fn command_line(&self, resume: bool) -> Vec<String> {
        let s = &self.settings;
        let mut argv = vec![format!("{}/bin/codex", s.cli_dir.display()), "exec".into()];
        if resume {
            // The most recent session in /workspace: the previous turn's in
            // a per-thread sandbox; a new one on the first turn.
            argv.extend(["resume".into(), "--last".into()]);
        }
        argv.extend(
            [
                "--json",
                "--skip-git-repo-check",
                // moat's sandbox is the sandbox: Codex's own (bwrap) cannot
                // start inside it, and nobody is there to approve.
                "--dangerously-bypass-approvals-and-sandbox",
                // Not ~/.codex/config.toml nor .rules files: the sandbox
                // could have written them (notify, hooks, rules).
                "--ignore-user-config",
                "--ignore-rules",
            ]
            .map(String::from),
        );
        for f in DISABLED_FEATURES {
            argv.extend(["--disable".into(), f.to_string()]);
        }
        if !self.shell_allowed() {
            argv.extend(["--disable".into(), "shell_tool".into()]);
        }
        for c in [
            "analytics.enabled=false".to_string(),
            "check_for_update_on_startup=false".to_string(),
            "model_provider=\"moat\"".to_string(),
        ] {
            argv.extend(["-c".into(), c]);
        }
        if let Some(p) = s.persona.as_deref().filter(|p| !p.trim().is_empty()) {
            argv.extend([
                "-c".into(),
                format!("developer_instructions={}", toml_str(p)),
            ]);
        }
        if let Some(m) = &s.model {
            argv.extend(["-m".into(), m.clone()]);
        }
        let (servers, _) = usable_mcp(s);
        for m in servers {
            let key = format!("mcp_servers.{}", m.name);
            let args: Vec<String> = m.command[1..].iter().map(|a| toml_str(a)).collect();
            let env: Vec<String> = m
                .env
                .iter()
                .map(|(k, v)| format!("{}={}", toml_str(k), toml_str(v)))
                .collect();
            let forbidden: Vec<String> = moat_policy::agents::FORBIDDEN_TOOLS
                .iter()
                .map(|f| toml_str(f))
                .collect();
            argv.extend([
                "-c".into(),
                format!("{key}.command={}", toml_str(&m.command[0])),
                "-c".into(),
                format!("{key}.args=[{}]", args.join(", ")),
                "-c".into(),
                format!("{key}.env={{{}}}", env.join(", ")),
                "-c".into(),
                format!("{key}.disabled_tools=[{}]", forbidden.join(", ")),
            ]);
        }
        argv
    }

    fn preflight(&self) -> Result<(), String> {
        if let Some(p) = &self.settings.persona {
            if p.len() > MAX_PERSONA {
                return Err(format!(
                    "moat: the channel's persona is {} KiB; Codex takes at most {} KiB on its command line; shorten the persona file",
                    p.len() / 1024,
                    MAX_PERSONA / 1024
                ));
            }
        }
        Ok(())
    }
}

impl Agent for CodexAgent {
    fn name(&self) -> &'static str {
        "codex"
    }

    fn run_turn(
        &self,
        lease: &mut Lease,
        input: &TurnInput,
        cancel: &CancelHandle,
        events: &mut dyn FnMut(AgentEvent),
    ) -> TurnOutcome {
        if let Err(answer) = self.preflight() {
            return refusal(answer);
        }
        report_dropped(&self.dropped_tools(), &usable_mcp(&self.settings).1, events);
        let mut argv: Vec<String> = vec![
            "/bin/sh".into(),
            "-c".into(),
            CODEX_WRAPPER.into(),
            "moat-codex".into(),
        ];
        argv.extend(self.command_line(input.resume));
        let mut spec = RunSpec::new(argv);
        spec.stdin = StdinSource::Bytes(compose_prompt(input).into_bytes());
        events(AgentEvent::Status("starting Codex".into()));
        let mut parser = CodexParser::default();
        let run = run_cli(lease, cancel, spec, &mut |line| parser.line(line, events));
        parser.finish(&run, events)
    }
}

/// Reads `codex exec --json` output line by line: reports events as they
/// come and, at the end, the turn's outcome. Lines that are not JSON
/// objects, or not of a known shape, are skipped (never fatal).
#[derive(Default)]
pub struct CodexParser {
    /// The agent's messages, in order.
    messages: Vec<String>,
    text_len: usize,
    /// Items whose start was reported (so their completion is not a second call).
    started: Vec<String>,
    thread_id: Option<String>,
    completed: bool,
    failed: Option<String>,
    skipped: usize,
}

impl CodexParser {
    /// The thread Codex reported (`thread.started`), if any.
    pub fn thread_id(&self) -> Option<&str> {
        self.thread_id.as_deref()
    }

    /// Lines that were skipped.
    pub fn skipped(&self) -> usize {
        self.skipped
    }

    /// One line of Codex's standard output.
    pub fn line(&mut self, line: &str, events: &mut dyn FnMut(AgentEvent)) {
        let line = line.trim();
        if line.is_empty() {
            return;
        }
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            self.skipped += 1;
            return;
        };
        match v["type"].as_str() {
            Some("thread.started") => {
                self.thread_id = v["thread_id"].as_str().map(str::to_string);
                events(AgentEvent::Status("Codex started".into()));
            }
            Some("turn.started") => {}
            Some("item.started") => self.item(&v["item"], false, events),
            Some("item.updated") => {}
            Some("item.completed") => self.item(&v["item"], true, events),
            Some("turn.completed") => {
                self.completed = true;
                let u = &v["usage"];
                if u.is_object() {
                    // cached_input_tokens are part of input_tokens (OpenAI's counting).
                    events(AgentEvent::Usage {
                        input_tokens: u["input_tokens"].as_u64().unwrap_or(0),
                        output_tokens: u["output_tokens"].as_u64().unwrap_or(0),
                    });
                }
            }
            Some("turn.failed") => {
                let msg = v["error"]["message"]
                    .as_str()
                    .unwrap_or("no reason given")
                    .to_string();
                events(AgentEvent::Error(format!(
                    "Codex: the turn failed: {}",
                    first_line(&msg)
                )));
                self.failed = Some(msg);
            }
            Some("error") => {
                // Often a notice that Codex retries; fatal only with turn.failed.
                let msg = v["message"].as_str().unwrap_or("?");
                events(AgentEvent::Error(format!("Codex: {}", first_line(msg))));
            }
            _ => self.skipped += 1,
        }
    }

    fn item(&mut self, item: &Value, done: bool, events: &mut dyn FnMut(AgentEvent)) {
        let id = item["id"].as_str().unwrap_or("").to_string();
        let kind = item["type"].as_str().unwrap_or("");
        let (name, summary) = match kind {
            "agent_message" => {
                if done {
                    let t = item["text"].as_str().unwrap_or("").to_string();
                    if !t.is_empty() {
                        if self.text_len < MAX_ANSWER {
                            self.text_len += t.len();
                            self.messages.push(t.clone());
                        }
                        events(AgentEvent::Text(t));
                    }
                }
                return;
            }
            "reasoning" => {
                if done {
                    if let Some(t) = item["text"].as_str().filter(|t| !t.trim().is_empty()) {
                        events(AgentEvent::Status(format!("thinking: {}", first_line(t))));
                    }
                }
                return;
            }
            "error" => {
                if done {
                    let m = item["message"].as_str().unwrap_or("?");
                    events(AgentEvent::Error(format!("Codex: {}", first_line(m))));
                }
                return;
            }
            "todo_list" => return,
            "command_execution" => (
                "shell".to_string(),
                first_line(item["command"].as_str().unwrap_or("")),
            ),
            "file_change" => {
                let changes: Vec<String> = item["changes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|c| {
                        format!(
                            "{} {}",
                            c["kind"].as_str().unwrap_or("change"),
                            c["path"].as_str().unwrap_or("?")
                        )
                    })
                    .collect();
                ("apply_patch".to_string(), first_line(&changes.join(", ")))
            }
            "mcp_tool_call" => (
                format!(
                    "mcp__{}__{}",
                    item["server"].as_str().unwrap_or("?"),
                    item["tool"].as_str().unwrap_or("?")
                ),
                match &item["arguments"] {
                    Value::Null => String::new(),
                    a => first_line(&a.to_string()),
                },
            ),
            "web_search" => (
                "web_search".to_string(),
                first_line(item["query"].as_str().unwrap_or("")),
            ),
            "" => {
                self.skipped += 1;
                return;
            }
            other => (other.to_string(), String::new()),
        };
        if !self.started.contains(&id) || id.is_empty() {
            if !id.is_empty() {
                self.started.push(id);
            }
            events(AgentEvent::ToolCall {
                name: name.clone(),
                summary,
            });
        }
        if !done {
            return;
        }
        let status = item["status"].as_str().unwrap_or("completed");
        let (ok, out) = match kind {
            "command_execution" => (
                status == "completed" && item["exit_code"].as_i64() == Some(0),
                item["aggregated_output"].as_str().unwrap_or("").to_string(),
            ),
            "mcp_tool_call" => {
                let err = &item["error"];
                if err.is_null() {
                    (
                        status == "completed",
                        super::claude::result_text(&item["result"]["content"]),
                    )
                } else {
                    (
                        false,
                        err["message"]
                            .as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| err.to_string()),
                    )
                }
            }
            _ => (status == "completed", status.to_string()),
        };
        events(AgentEvent::ToolResult {
            name,
            ok,
            summary: first_line(&out),
        });
    }

    /// The turn's outcome once Codex has ended: its last message is the answer.
    pub fn finish(self, run: &CliRun, events: &mut dyn FnMut(AgentEvent)) -> TurnOutcome {
        if self.skipped > 0 {
            tracing::debug!(
                lines = self.skipped,
                "skipped Codex output lines that are not its JSON events"
            );
        }
        let all = self.messages.join("\n\n");
        let mut answer;
        let mut ok = false;
        if run.cancelled {
            answer = all;
            push_para(&mut answer, "moat: stopped");
        } else if let Some(msg) = &self.failed {
            answer = all;
            push_para(&mut answer, &format!("Codex stopped: {}", first_line(msg)));
        } else if self.completed {
            answer = self.messages.last().cloned().unwrap_or_default();
            ok = true;
            if let CliEnd::Failed(why) | CliEnd::NotRun(why) = &run.end {
                ok = false;
                push_para(&mut answer, why);
            }
        } else {
            answer = all;
            let why = match &run.end {
                CliEnd::Success => "it exited without finishing the turn".to_string(),
                CliEnd::Failed(r) | CliEnd::NotRun(r) => {
                    r.strip_prefix("moat: ").unwrap_or(r).to_string()
                }
            };
            let mut line = format!("moat: Codex stopped before finishing its turn ({why})");
            if let Some(e) = run.stderr_last_line() {
                line.push_str(&format!(": {e}"));
            }
            events(AgentEvent::Error(line.clone()));
            push_para(&mut answer, &line);
        }
        if answer.trim().is_empty() {
            answer = "(no answer)".to_string();
        }
        TurnOutcome {
            preformatted: false,
            answer,
            ok: ok && !run.cancelled,
            cancelled: run.cancelled,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn settings(tools: &[&str]) -> AgentSettings {
        AgentSettings {
            tools: tools.iter().map(|s| s.to_string()).collect(),
            cli_dir: PathBuf::from("/opt/clis"),
            ..AgentSettings::default()
        }
    }

    fn collect(p: &mut CodexParser, lines: &[&str]) -> Vec<AgentEvent> {
        let mut ev = Vec::new();
        for l in lines {
            p.line(l, &mut |e| ev.push(e));
        }
        ev
    }

    fn ok_run() -> CliRun {
        CliRun {
            end: CliEnd::Success,
            stderr_tail: String::new(),
            cancelled: false,
        }
    }

    const STARTED: &str = r#"{"type":"thread.started","thread_id":"01a2-thread"}"#;
    const TURN: &str = r#"{"type":"turn.started"}"#;
    const CMD_START: &str = r#"{"type":"item.started","item":{"id":"item_0","type":"command_execution","command":"/bin/bash -lc 'echo hi > /workspace/x'","aggregated_output":"","exit_code":null,"status":"in_progress"}}"#;
    const CMD_DONE: &str = r#"{"type":"item.completed","item":{"id":"item_0","type":"command_execution","command":"/bin/bash -lc 'echo hi > /workspace/x'","aggregated_output":"hi\n","exit_code":0,"status":"completed"}}"#;
    const MSG: &str = r#"{"type":"item.completed","item":{"id":"item_1","type":"agent_message","text":"Done: wrote x."}}"#;
    const DONE: &str = r#"{"type":"turn.completed","usage":{"input_tokens":654,"cached_input_tokens":33,"output_tokens":76,"reasoning_output_tokens":0}}"#;

    #[test]
    fn the_command_line_turns_the_shell_off_unless_allowed() {
        let with = CodexAgent::new(settings(&["shell"])).command_line(false);
        let without = CodexAgent::new(settings(&["apply_patch"])).command_line(false);
        let has_off = |a: &[String]| {
            a.windows(2)
                .any(|w| w[0] == "--disable" && w[1] == "shell_tool")
        };
        assert!(!has_off(&with), "{with:?}");
        assert!(has_off(&without), "{without:?}");
        for want in [
            "--json",
            "--ignore-user-config",
            "--ignore-rules",
            "--dangerously-bypass-approvals-and-sandbox",
        ] {
            assert!(with.iter().any(|a| a == want), "{want}");
        }
        assert_eq!(with[..2], ["/opt/clis/bin/codex", "exec"]);
        assert!(!with.iter().any(|a| a == "resume"));
    }

    #[test]
    fn persona_model_mcp_and_resume_are_passed() {
        let mut s = settings(&["bash", "Read", "find_thread"]);
        s.persona = Some("Be \"brief\".\nNo \\ tricks.".into());
        s.model = Some("gpt-5".into());
        s.mcp = vec![moat_agent::protocol::McpServer {
            name: "probe".into(),
            command: vec!["python3".into(), "/workspace/mcp.py".into()],
            env: [("K".to_string(), "v".to_string())].into(),
        }];
        let a = CodexAgent::new(s);
        let argv = a.command_line(true);
        assert_eq!(argv[2..4], ["resume", "--last"]);
        for want in [
            r#"developer_instructions="Be \"brief\".\nNo \\ tricks.""#,
            r#"mcp_servers.probe.command="python3""#,
            r#"mcp_servers.probe.args=["/workspace/mcp.py"]"#,
            r#"mcp_servers.probe.env={"K"="v"}"#,
            r#"mcp_servers.probe.disabled_tools=["find_thread", "read_thread", "search_threads", "list_threads"]"#,
            "gpt-5",
        ] {
            assert!(
                argv.iter().any(|x| x == want),
                "{want} missing from {argv:?}"
            );
        }
        assert!(a.shell_allowed());
        let dropped = a.dropped_tools();
        let names: Vec<&str> = dropped.iter().map(|d| d.0.as_str()).collect();
        assert_eq!(names, ["Read", "find_thread"]);
    }

    #[test]
    fn a_turn_with_a_command_becomes_events_and_an_answer() {
        let mut p = CodexParser::default();
        let ev = collect(&mut p, &[STARTED, TURN, CMD_START, CMD_DONE, MSG, DONE]);
        assert_eq!(
            ev,
            vec![
                AgentEvent::Status("Codex started".into()),
                AgentEvent::ToolCall {
                    name: "shell".into(),
                    summary: "/bin/bash -lc 'echo hi > /workspace/x'".into()
                },
                AgentEvent::ToolResult {
                    name: "shell".into(),
                    ok: true,
                    summary: "hi".into()
                },
                AgentEvent::Text("Done: wrote x.".into()),
                AgentEvent::Usage {
                    input_tokens: 654,
                    output_tokens: 76
                },
            ]
        );
        assert_eq!(p.thread_id(), Some("01a2-thread"));
        assert_eq!(
            p.finish(&ok_run(), &mut |_| {}),
            TurnOutcome {
                preformatted: false,
                answer: "Done: wrote x.".into(),
                ok: true,
                cancelled: false
            }
        );
    }

    #[test]
    fn mcp_calls_file_changes_and_failures_are_reported() {
        let mut p = CodexParser::default();
        let mcp = r#"{"type":"item.completed","item":{"id":"item_2","type":"mcp_tool_call","server":"probe","tool":"whisper","arguments":{"q":"x"},"result":{"content":[{"type":"text","text":"the word"}]},"error":null,"status":"completed"}}"#;
        let patch = r#"{"type":"item.completed","item":{"id":"item_3","type":"file_change","changes":[{"path":"/workspace/a","kind":"add"}],"status":"completed"}}"#;
        let failed_cmd = r#"{"type":"item.completed","item":{"id":"item_4","type":"command_execution","command":"false","aggregated_output":"","exit_code":1,"status":"failed"}}"#;
        let ev = collect(&mut p, &[mcp, patch, failed_cmd]);
        assert_eq!(
            ev,
            vec![
                AgentEvent::ToolCall {
                    name: "mcp__probe__whisper".into(),
                    summary: r#"{"q":"x"}"#.into()
                },
                AgentEvent::ToolResult {
                    name: "mcp__probe__whisper".into(),
                    ok: true,
                    summary: "the word".into()
                },
                AgentEvent::ToolCall {
                    name: "apply_patch".into(),
                    summary: "add /workspace/a".into()
                },
                AgentEvent::ToolResult {
                    name: "apply_patch".into(),
                    ok: true,
                    summary: "completed".into()
                },
                AgentEvent::ToolCall {
                    name: "shell".into(),
                    summary: "false".into()
                },
                AgentEvent::ToolResult {
                    name: "shell".into(),
                    ok: false,
                    summary: String::new()
                },
            ]
        );
    }

    #[test]
    fn malformed_lines_are_skipped_not_fatal() {
        let mut p = CodexParser::default();
        let ev = collect(
            &mut p,
            &[
                "WARNING: proceeding",
                "{\"type\":",
                "42",
                r#"{"type":"nope"}"#,
                r#"{"type":"item.completed","item":{}}"#,
                MSG,
                DONE,
            ],
        );
        assert_eq!(p.skipped(), 5);
        assert!(ev.contains(&AgentEvent::Text("Done: wrote x.".into())));
        let out = p.finish(&ok_run(), &mut |_| {});
        assert!(out.ok);
        assert_eq!(out.answer, "Done: wrote x.");
    }

    #[test]
    fn a_failed_turn_and_a_cli_that_dies_say_so() {
        let mut p = CodexParser::default();
        let failed =
            r#"{"type":"turn.failed","error":{"message":"stream disconnected before completion"}}"#;
        let ev = collect(
            &mut p,
            &[
                STARTED,
                MSG,
                r#"{"type":"error","message":"Reconnecting... 1/5"}"#,
                failed,
            ],
        );
        assert_eq!(
            ev.iter()
                .filter(|e| matches!(e, AgentEvent::Error(_)))
                .count(),
            2
        );
        let out = p.finish(
            &CliRun {
                end: CliEnd::Failed("moat: command exited with status 1".into()),
                stderr_tail: String::new(),
                cancelled: false,
            },
            &mut |_| {},
        );
        assert_eq!(
            out.answer,
            "Done: wrote x.\n\nCodex stopped: stream disconnected before completion"
        );
        assert!(!out.ok);

        let mut p = CodexParser::default();
        collect(&mut p, &[STARTED, CMD_START]);
        let out = p.finish(
            &CliRun {
                end: CliEnd::Failed("moat: command killed by SIGABRT".into()),
                stderr_tail: "thread 'main' panicked\n".into(),
                cancelled: false,
            },
            &mut |_| {},
        );
        assert_eq!(
            out.answer,
            "moat: Codex stopped before finishing its turn (command killed by SIGABRT): thread 'main' panicked"
        );
        assert!(!out.ok && !out.cancelled);
    }

    #[test]
    fn a_cancelled_turn_is_cancelled() {
        let mut p = CodexParser::default();
        collect(&mut p, &[STARTED, CMD_START]);
        let out = p.finish(
            &CliRun {
                end: CliEnd::Failed("moat: command killed by SIGKILL".into()),
                stderr_tail: String::new(),
                cancelled: true,
            },
            &mut |_| {},
        );
        assert_eq!(
            out,
            TurnOutcome {
                preformatted: false,
                answer: "moat: stopped".into(),
                ok: false,
                cancelled: true
            }
        );
    }
}
