//! The Pi adapter: runs `pi --mode json` (`@mariozechner/pi-coding-agent`)
//! in the conversation's sandbox and turns its JSON event stream into
//! [`AgentEvent`]s and a [`TurnOutcome`].
//!
//! Pi talks to the Anthropic Messages or the OpenAI Responses API; a
//! `models.json` written for the run points the provider at the door's LLM
//! proxy, with the door's placeholder key (the name of the variable holding
//! it, never the value). Its tool allowlist is `--tools`: only the listed
//! built-in tools exist for the model; a call to any other is answered
//! "Tool X not found" by Pi and nothing runs. Pi has no MCP support and no
//! limit on model calls per turn.
//!
//! Owns: Pi's command line and configuration directory, and the reading of
//! its JSON events.
//! Must never: load configuration the sandbox could have written (its
//! extensions run code, its settings name packages to install; the config
//! directory is made anew for every run and extension, skill, prompt and
//! theme discovery is off), give Pi a tool the channel does not allow, put
//! a key or the persona on its command line, or lose a turn's outcome.

use moat_agent::protocol::Provider;
use moat_sandbox::{Lease, RunSpec, StdinSource};
use serde_json::Value;

use super::claude::{
    compose_prompt, plain_name, push_para, refusal, report_dropped, run_cli, CliEnd, CliRun,
    MAX_PERSONA, NOT_ALLOWED,
};
use super::{
    first_line, summarize_input, Agent, AgentEvent, AgentSettings, CancelHandle, TurnInput,
    TurnOutcome,
};

/// Pi's built-in tools (0.73).
pub const PI_TOOLS: &[&str] = &["read", "bash", "edit", "write", "grep", "find", "ls"];

/// moat's built-in tool names and the Pi tools they stand for.
const ALIASES: &[(&str, &str)] = &[
    ("read_file", "read"),
    ("write_file", "write"),
    ("edit_file", "edit"),
    ("list_files", "ls"),
    ("search", "grep"),
    ("Bash", "bash"),
];

/// Largest answer kept.
const MAX_ANSWER: usize = 256 * 1024;

/// The wrapper every Pi run goes through: checks the door's proxy for the
/// provider is there, makes Pi's configuration directory anew (whatever the
/// sandbox left there is removed, a link included, never followed), writes
/// `models.json` (the provider's base URL: the door), `settings.json` and
/// the persona into it, and runs Pi with its sessions in the home directory.
const PI_WRAPPER: &str = r#"set -eu
case "${MOAT_PI_PROVIDER:-}" in
  anthropic) url="${ANTHROPIC_BASE_URL:-}"; key=ANTHROPIC_API_KEY; name=Anthropic ;;
  openai) url="${OPENAI_BASE_URL:-}"; key=OPENAI_API_KEY; name=OpenAI ;;
  *) echo "moat: no provider for Pi" >&2; exit 78 ;;
esac
if [ -z "$url" ]; then
  echo "moat: Pi needs the door's $name proxy, but this sandbox has none (give moat an $key for this channel)" >&2
  exit 78
fi
case "$url" in *'"'*|*'\'*) echo "moat: the $name base URL is not a plain URL" >&2; exit 78 ;; esac
umask 077
mkdir -p "$HOME/.moat"
d="$HOME/.moat/pi"
rm -rf "$d"
mkdir "$d"
set -C
printf '{"providers":{"%s":{"baseUrl":"%s","apiKey":"%s"}}}\n' "$MOAT_PI_PROVIDER" "$url" "$key" > "$d/models.json"
printf '%s\n' '{"enableInstallTelemetry":false,"quietStartup":true,"packages":[],"extensions":[],"skills":[],"prompts":[],"themes":[]}' > "$d/settings.json"
if [ -n "${MOAT_PI_PERSONA:-}" ]; then
  printf '%s' "$MOAT_PI_PERSONA" > "$d/persona.md"
  set -- "$@" --append-system-prompt "$d/persona.md"
fi
set +C
unset MOAT_PI_PERSONA MOAT_PI_PROVIDER
export PI_CODING_AGENT_DIR="$d"
exec "$@" --session-dir "$HOME/.moat/pi-sessions"
"#;

/// Which tools a Pi run gets, from the channel's list.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PiTools {
    /// Pi's names, for `--tools` (empty: `--no-tools`).
    pub enabled: Vec<String>,
    /// Names left out, with why.
    pub dropped: Vec<(String, String)>,
}

impl PiTools {
    pub fn for_settings(settings: &AgentSettings) -> PiTools {
        let mut plan = PiTools::default();
        for t in &settings.tools {
            let why = if moat_policy::agents::is_forbidden_tool(t) {
                "thread-search tools are never enabled".to_string()
            } else if t.starts_with("mcp__") {
                "Pi has no MCP support".to_string()
            } else if !plain_name(t) {
                "not a tool name".to_string()
            } else {
                let name = ALIASES
                    .iter()
                    .find(|(alias, _)| alias == t)
                    .map(|(_, real)| *real)
                    .unwrap_or(t.as_str());
                if PI_TOOLS.contains(&name) {
                    if !plan.enabled.iter().any(|e| e == name) {
                        plan.enabled.push(name.to_string());
                    }
                    continue;
                }
                format!("Pi has no such tool; its tools are {}", PI_TOOLS.join(", "))
            };
            plan.dropped.push((t.clone(), why));
        }
        plan
    }

    pub fn allows(&self, tool: &str) -> bool {
        self.enabled.iter().any(|e| e == tool)
    }
}

/// Runs Pi headless in the conversation's sandbox.
pub struct PiAgent {
    settings: AgentSettings,
}

impl PiAgent {
    pub fn new(settings: AgentSettings) -> Self {
        PiAgent { settings }
    }

    fn provider(&self) -> Provider {
        self.settings.provider.unwrap_or(Provider::Anthropic)
    }

    pub fn tools(&self) -> PiTools {
        PiTools::for_settings(&self.settings)
    }

    /// Pi's command line, without what the wrapper adds (the persona file
    /// and the session directory). The prompt goes on standard input.
    pub fn command_line(&self, resume: bool) -> Vec<String> {
        let s = &self.settings;
        let tools = self.tools();
        let mut argv = vec![
            format!("{}/bin/pi", s.cli_dir.display()),
            "--mode".into(),
            "json".into(),
            "--provider".into(),
            self.provider().name().into(),
            // No code or configuration from the sandbox: no extensions
            // (TypeScript that runs in Pi), skills, prompt templates, themes.
            "--no-extensions".into(),
            "--no-skills".into(),
            "--no-prompt-templates".into(),
            "--no-themes".into(),
            // No update check, telemetry or package installs.
            "--offline".into(),
        ];
        if tools.enabled.is_empty() {
            argv.push("--no-tools".into());
        } else {
            argv.extend(["--tools".into(), tools.enabled.join(",")]);
        }
        if let Some(m) = &s.model {
            argv.extend(["--model".into(), m.clone()]);
        }
        if resume {
            // The most recent session of /workspace: the previous turn's in
            // a per-thread sandbox; a new one on the first turn.
            argv.push("--continue".into());
        }
        argv
    }

    /// The environment of a run (besides the door's, which the lease adds).
    pub fn environment(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("MOAT_PI_PROVIDER".into(), self.provider().name().into()),
            ("PI_OFFLINE".into(), "1".into()),
            ("PI_SKIP_VERSION_CHECK".into(), "1".into()),
            ("PI_TELEMETRY".into(), "0".into()),
        ];
        if let Some(p) = self
            .settings
            .persona
            .as_deref()
            .filter(|p| !p.trim().is_empty())
        {
            env.push(("MOAT_PI_PERSONA".into(), p.to_string()));
        }
        env
    }

    fn preflight(&self) -> Result<(), String> {
        if let Some(p) = &self.settings.persona {
            if p.len() > MAX_PERSONA {
                return Err(format!(
                    "moat: the channel's persona is {} KiB; Pi takes at most {} KiB; shorten the persona file",
                    p.len() / 1024,
                    MAX_PERSONA / 1024
                ));
            }
        }
        Ok(())
    }

    /// The channel's MCP servers, each left out: Pi has no MCP.
    fn dropped_servers(&self) -> Vec<(String, String)> {
        self.settings
            .mcp
            .iter()
            .map(|m| (m.name.clone(), "Pi has no MCP support".to_string()))
            .collect()
    }
}

impl Agent for PiAgent {
    fn name(&self) -> &'static str {
        "pi"
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
        report_dropped(&self.tools().dropped, &self.dropped_servers(), events);
        let mut argv: Vec<String> = vec![
            "/bin/sh".into(),
            "-c".into(),
            PI_WRAPPER.into(),
            "moat-pi".into(),
        ];
        argv.extend(self.command_line(input.resume));
        let mut spec = RunSpec::new(argv);
        spec.env = self.environment();
        spec.stdin = StdinSource::Bytes(compose_prompt(input).into_bytes());
        events(AgentEvent::Status("starting Pi".into()));
        let mut parser = PiParser::new(self.tools());
        let run = run_cli(lease, cancel, spec, &mut |line| parser.line(line, events));
        parser.finish(&run, events)
    }
}

/// Reads `pi --mode json` output line by line: reports events as they come
/// and, at the end, the turn's outcome. Lines that are not JSON objects, or
/// not of a known shape, are skipped (never fatal).
pub struct PiParser {
    tools: PiTools,
    /// The text of each assistant message, in order.
    messages: Vec<String>,
    text_len: usize,
    /// Tools refused (name), reported at the end of the answer.
    refused: Vec<String>,
    /// The last assistant message ended with an error (its message).
    error: Option<String>,
    ended: bool,
    session: Option<String>,
    skipped: usize,
}

impl PiParser {
    pub fn new(tools: PiTools) -> PiParser {
        PiParser {
            tools,
            messages: Vec::new(),
            text_len: 0,
            refused: Vec::new(),
            error: None,
            ended: false,
            session: None,
            skipped: 0,
        }
    }

    /// The session Pi reported in its header line, if any.
    pub fn session_id(&self) -> Option<&str> {
        self.session.as_deref()
    }

    /// One line of Pi's standard output.
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
            Some("session") => {
                self.session = v["id"].as_str().map(str::to_string);
                events(AgentEvent::Status("Pi started".into()));
            }
            Some("message_end") => self.message_end(&v["message"], events),
            Some("tool_execution_start") => {
                let name = v["toolName"].as_str().unwrap_or("?").to_string();
                let summary = summarize_input(&v["args"]);
                events(AgentEvent::Status(format!("{name}: {summary}")));
                events(AgentEvent::ToolCall { name, summary });
            }
            Some("tool_execution_end") => {
                let name = v["toolName"].as_str().unwrap_or("?").to_string();
                let is_error = v["isError"].as_bool().unwrap_or(true);
                let text = content_text(&v["result"]["content"]);
                if !self.tools.allows(&name) {
                    // Pi answers a tool it does not have with "Tool X not
                    // found" and runs nothing; anything else is reported too.
                    if !is_error {
                        events(AgentEvent::Error(format!(
                            "Pi reported running `{name}`, which this channel does not allow"
                        )));
                    }
                    events(AgentEvent::Refused {
                        tool: name.clone(),
                        reason: NOT_ALLOWED.into(),
                    });
                    if !self.refused.contains(&name) && self.refused.len() < 50 {
                        self.refused.push(name);
                    }
                    return;
                }
                events(AgentEvent::ToolResult {
                    name,
                    ok: !is_error,
                    summary: first_line(&text),
                });
            }
            Some("auto_retry_start") => {
                let secs = v["delayMs"].as_u64().unwrap_or(0).div_ceil(1000);
                events(AgentEvent::Status(format!(
                    "the model API failed ({}); Pi retries in {secs} s ({} of {})",
                    first_line(v["errorMessage"].as_str().unwrap_or("?")),
                    v["attempt"].as_u64().unwrap_or(0),
                    v["maxAttempts"].as_u64().unwrap_or(0)
                )));
            }
            Some("compaction_start") => events(AgentEvent::Status(
                "Pi is compacting the conversation".into(),
            )),
            Some("agent_end") => self.ended = true,
            Some(
                "agent_start"
                | "turn_start"
                | "turn_end"
                | "message_start"
                | "message_update"
                | "tool_execution_update"
                | "auto_retry_end"
                | "compaction_end"
                | "queue_update",
            ) => {}
            _ => self.skipped += 1,
        }
    }

    fn message_end(&mut self, m: &Value, events: &mut dyn FnMut(AgentEvent)) {
        if m["role"] != "assistant" {
            return;
        }
        let u = &m["usage"];
        if u.is_object() {
            let n = |k: &str| u[k].as_u64().unwrap_or(0);
            events(AgentEvent::Usage {
                input_tokens: n("input") + n("cacheRead") + n("cacheWrite"),
                output_tokens: n("output"),
            });
        }
        let text = content_text(&m["content"]);
        if !text.trim().is_empty() {
            if self.text_len < MAX_ANSWER {
                self.text_len += text.len();
                self.messages.push(text.clone());
            }
            events(AgentEvent::Text(text));
        }
        match m["stopReason"].as_str() {
            Some("error") | Some("aborted") => {
                let msg = api_error(
                    m["errorMessage"]
                        .as_str()
                        .unwrap_or("the model call failed"),
                );
                events(AgentEvent::Error(format!("Pi: {}", first_line(&msg))));
                self.error = Some(msg);
            }
            _ => self.error = None,
        }
    }

    /// The turn's outcome once Pi has ended: its last message is the answer.
    pub fn finish(self, run: &CliRun, events: &mut dyn FnMut(AgentEvent)) -> TurnOutcome {
        if self.skipped > 0 {
            tracing::debug!(
                lines = self.skipped,
                "skipped Pi output lines that are not its JSON events"
            );
        }
        let all = self.messages.join("\n\n");
        let mut answer;
        let mut ok = false;
        if run.cancelled {
            answer = all;
            push_para(&mut answer, "moat: stopped");
        } else if let Some(msg) = &self.error {
            answer = all;
            push_para(&mut answer, &format!("Pi stopped: {msg}"));
        } else if self.ended {
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
            let mut line = format!("moat: Pi stopped before finishing its turn ({why})");
            if let Some(e) = run.stderr_last_line() {
                line.push_str(&format!(": {e}"));
            }
            events(AgentEvent::Error(line.clone()));
            push_para(&mut answer, &line);
        }
        for t in &self.refused {
            push_para(
                &mut answer,
                &format!("moat refused tool `{t}`: {NOT_ALLOWED}"),
            );
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

/// Pi's error text for a failed API call (`403 {"type":"error",...}`) as
/// `HTTP 403: <the API's message>`; other text as it is. One line, at most
/// 300 characters.
fn api_error(text: &str) -> String {
    let parsed = text.split_once(' ').and_then(|(status, rest)| {
        let status: u16 = status.parse().ok()?;
        let doc: Value = serde_json::from_str(rest).ok()?;
        let msg = doc["error"]["message"]
            .as_str()
            .or_else(|| doc["message"].as_str())?;
        Some(format!("HTTP {status}: {msg}"))
    });
    let line = parsed.unwrap_or_else(|| text.to_string());
    let line = line.lines().next().unwrap_or("").trim();
    if line.chars().count() > 300 {
        format!("{}…", line.chars().take(300).collect::<String>())
    } else {
        line.to_string()
    }
}

/// The text parts of a message's or a tool result's `content`, joined.
fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter(|p| p["type"] == "text")
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
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

    fn run_lines(p: &mut PiParser, lines: &[&str]) -> Vec<AgentEvent> {
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

    // Lines as Pi 0.73.1 prints them (`pi --mode json`, captured against a
    // fake Anthropic upstream; the long `partial` objects shortened).
    const SESSION: &str = r#"{"type":"session","version":3,"id":"01a250c8-43bd-7423-825b-f1cd1ec1ad5e","timestamp":"2026-12-07T13:53:51.550Z","cwd":"/workspace"}"#;
    const USER_END: &str = r#"{"type":"message_end","message":{"role":"user","content":[{"type":"text","text":"Write hi to a file."}],"timestamp":1796651631896}}"#;
    const UPDATE: &str = r#"{"type":"message_update","assistantMessageEvent":{"type":"toolcall_delta","contentIndex":0,"delta":"{\"command\": \"echo hi\"}"},"message":{"role":"assistant","content":[]}}"#;
    const CALL_END: &str = r#"{"type":"message_end","message":{"role":"assistant","content":[{"type":"toolCall","id":"toolu_1","name":"bash","arguments":{"command":"echo hi > out.txt; cat out.txt"}}],"api":"anthropic-messages","provider":"anthropic","model":"claude-sonnet-4-5","usage":{"input":100,"output":10,"cacheRead":5,"cacheWrite":0,"totalTokens":115},"stopReason":"toolUse","timestamp":1796651632092,"responseId":"msg_1"}}"#;
    const TOOL_START: &str = r#"{"type":"tool_execution_start","toolCallId":"toolu_1","toolName":"bash","args":{"command":"echo hi > out.txt; cat out.txt"}}"#;
    const TOOL_UPDATE: &str = r#"{"type":"tool_execution_update","toolCallId":"toolu_1","toolName":"bash","args":{"command":"echo hi > out.txt; cat out.txt"},"partialResult":{"content":[{"type":"text","text":"hi\n"}],"details":{}}}"#;
    const TOOL_END: &str = r#"{"type":"tool_execution_end","toolCallId":"toolu_1","toolName":"bash","result":{"content":[{"type":"text","text":"hi\n"}]},"isError":false}"#;
    const TEXT_END: &str = r#"{"type":"message_end","message":{"role":"assistant","content":[{"type":"text","text":"Done."}],"api":"anthropic-messages","provider":"anthropic","model":"claude-sonnet-4-5","usage":{"input":100,"output":10,"cacheRead":0,"cacheWrite":0,"totalTokens":110},"stopReason":"stop","timestamp":1796651632353,"responseId":"msg_2"}}"#;
    const AGENT_END: &str = r#"{"type":"agent_end","messages":[]}"#;
    const WRITE_START: &str = r#"{"type":"tool_execution_start","toolCallId":"toolu_1","toolName":"write","args":{"path":"w.txt","content":"x"}}"#;
    const WRITE_END: &str = r#"{"type":"tool_execution_end","toolCallId":"toolu_1","toolName":"write","result":{"content":[{"type":"text","text":"Tool write not found"}],"details":{}},"isError":true}"#;
    const API_ERROR: &str = r#"{"type":"message_end","message":{"role":"assistant","content":[],"api":"anthropic-messages","provider":"anthropic","model":"claude-sonnet-4-5","usage":{"input":0,"output":0,"cacheRead":0,"cacheWrite":0,"totalTokens":0},"stopReason":"error","timestamp":1796651670124,"errorMessage":"403 {\"type\":\"error\",\"error\":{\"type\":\"invalid_request_error\",\"message\":\"moat: the model \\\"x\\\" is not allowed\"}}"}}"#;
    const RETRY: &str = r#"{"type":"auto_retry_start","attempt":1,"maxAttempts":3,"delayMs":2000,"errorMessage":"529 overloaded_error"}"#;

    #[test]
    fn a_turn_with_a_tool_call_and_an_answer() {
        let mut p = PiParser::new(PiTools::for_settings(&settings(&["bash"])));
        let ev = run_lines(
            &mut p,
            &[
                SESSION,
                r#"{"type":"agent_start"}"#,
                r#"{"type":"turn_start"}"#,
                USER_END,
                UPDATE,
                CALL_END,
                TOOL_START,
                TOOL_UPDATE,
                TOOL_END,
                TEXT_END,
                AGENT_END,
                "not json",
                "",
            ],
        );
        assert_eq!(p.session_id(), Some("01a250c8-43bd-7423-825b-f1cd1ec1ad5e"));
        assert_eq!(ev[0], AgentEvent::Status("Pi started".into()));
        assert!(ev.contains(&AgentEvent::ToolCall {
            name: "bash".into(),
            summary: "echo hi > out.txt; cat out.txt".into()
        }));
        assert!(ev.contains(&AgentEvent::ToolResult {
            name: "bash".into(),
            ok: true,
            summary: "hi".into()
        }));
        assert!(ev.contains(&AgentEvent::Usage {
            input_tokens: 105,
            output_tokens: 10
        }));
        assert!(ev.contains(&AgentEvent::Text("Done.".into())));
        assert!(
            !ev.iter().any(|e| matches!(e, AgentEvent::Error(_))),
            "{ev:?}"
        );
        let out = p.finish(&ok_run(), &mut |_| {});
        assert!(out.ok && !out.cancelled, "{out:?}");
        assert_eq!(out.answer, "Done.");
    }

    #[test]
    fn a_tool_the_channel_does_not_allow_is_a_refusal() {
        let mut p = PiParser::new(PiTools::for_settings(&settings(&["read"])));
        let ev = run_lines(
            &mut p,
            &[SESSION, WRITE_START, WRITE_END, TEXT_END, AGENT_END],
        );
        assert!(ev.contains(&AgentEvent::Refused {
            tool: "write".into(),
            reason: NOT_ALLOWED.into()
        }));
        assert!(!ev
            .iter()
            .any(|e| matches!(e, AgentEvent::ToolResult { .. })));
        let out = p.finish(&ok_run(), &mut |_| {});
        assert_eq!(
            out.answer,
            "Done.\n\nmoat refused tool `write`: not allowed in this channel"
        );
    }

    #[test]
    fn an_api_error_ends_the_turn_with_its_message() {
        let mut p = PiParser::new(PiTools::default());
        let ev = run_lines(&mut p, &[SESSION, RETRY, API_ERROR, AGENT_END]);
        assert!(ev.contains(&AgentEvent::Status(
            "the model API failed (529 overloaded_error); Pi retries in 2 s (1 of 3)".into()
        )));
        assert!(ev
            .iter()
            .any(|e| matches!(e, AgentEvent::Error(m) if m.contains("403"))));
        let out = p.finish(&ok_run(), &mut |_| {});
        assert!(!out.ok);
        assert_eq!(
            out.answer,
            "Pi stopped: HTTP 403: moat: the model \"x\" is not allowed"
        );
        assert_eq!(api_error("connection refused"), "connection refused");
    }

    #[test]
    fn a_pi_that_dies_or_is_cancelled_still_answers() {
        let mut p = PiParser::new(PiTools::default());
        run_lines(&mut p, &[SESSION, TEXT_END]);
        let run = CliRun {
            end: CliEnd::Failed("command killed by SIGKILL".into()),
            stderr_tail: "Error: boom\n".into(),
            cancelled: false,
        };
        let mut errs = Vec::new();
        let out = p.finish(&run, &mut |e| errs.push(e));
        assert!(!out.ok);
        assert_eq!(
            out.answer,
            "Done.\n\nmoat: Pi stopped before finishing its turn (command killed by SIGKILL): Error: boom"
        );
        assert_eq!(errs.len(), 1);
        let mut p = PiParser::new(PiTools::default());
        run_lines(&mut p, &[SESSION]);
        let run = CliRun {
            cancelled: true,
            ..ok_run()
        };
        let out = p.finish(&run, &mut |_| {});
        assert!(out.cancelled && !out.ok);
        assert_eq!(out.answer, "moat: stopped");
    }

    #[test]
    fn the_tool_list_maps_moat_names_and_drops_the_rest() {
        let t = PiTools::for_settings(&settings(&[
            "bash",
            "read_file",
            "read",
            "find",
            "WebFetch",
            "mcp__docs__search",
            "find_thread",
            "a b",
        ]));
        assert_eq!(t.enabled, ["bash", "read", "find"]);
        let dropped: Vec<&str> = t.dropped.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            dropped,
            ["WebFetch", "mcp__docs__search", "find_thread", "a b"]
        );
        assert!(t.dropped[0].1.contains("its tools are read, bash"));
        assert!(t.dropped[1].1.contains("no MCP"));
    }

    #[test]
    fn the_command_line_limits_tools_and_loads_nothing_from_the_sandbox() {
        let mut s = settings(&["read", "grep"]);
        s.model = Some("claude-sonnet-4-5".into());
        s.persona = Some("Be brief.".into());
        let a = PiAgent::new(s);
        let argv = a.command_line(true);
        assert_eq!(argv[0], "/opt/clis/bin/pi");
        for want in [
            "--no-extensions",
            "--no-skills",
            "--no-prompt-templates",
            "--no-themes",
            "--offline",
            "--continue",
        ] {
            assert!(argv.iter().any(|a| a == want), "{want} in {argv:?}");
        }
        let joined = argv.join(" ");
        assert!(
            joined.contains("--mode json --provider anthropic"),
            "{joined}"
        );
        assert!(joined.contains("--tools read,grep"), "{joined}");
        assert!(joined.contains("--model claude-sonnet-4-5"), "{joined}");
        // The persona travels in the environment, to a file; not on the command line.
        assert!(!joined.contains("Be brief."), "{joined}");
        assert!(a
            .environment()
            .contains(&("MOAT_PI_PERSONA".into(), "Be brief.".into())));
        assert!(a.environment().contains(&("PI_OFFLINE".into(), "1".into())));
        // No tools: none at all; no resume: no --continue.
        let none = PiAgent::new(settings(&[])).command_line(false);
        assert!(none.iter().any(|a| a == "--no-tools"), "{none:?}");
        assert!(!none.iter().any(|a| a == "--tools" || a == "--continue"));
        let mut o = settings(&["bash"]);
        o.provider = Some(Provider::Openai);
        let joined = PiAgent::new(o).command_line(false).join(" ");
        assert!(joined.contains("--provider openai"), "{joined}");
    }
}
