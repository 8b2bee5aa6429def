//! The Claude Code adapter: runs `claude -p --output-format stream-json` in
//! the conversation's sandbox and turns its JSON lines into [`AgentEvent`]s
//! and a [`TurnOutcome`]. Also the pieces the other CLI adapters share: the
//! prompt, running a CLI in a lease line by line, and the stream-json parser
//! (Amp prints the same format).
//!
//! Owns: Claude Code's command line (tool allowlist, MCP servers, persona,
//! model, turn limit, resume) and the reading of its output.
//! Must never: let Claude Code use a built-in tool, an MCP server or a
//! settings file (hooks, permission grants) the channel does not allow, put
//! anything secret on its command line or into its files, or lose a turn's
//! outcome (a CLI that dies still gives an answer saying so).

use std::collections::{BTreeMap, HashMap, HashSet};

use moat_sandbox::{Lease, RunSpec, StdinSource, Stream};
use serde_json::{json, Value};

use super::{
    first_line, summarize_input, Agent, AgentEvent, AgentSettings, CancelHandle, TurnInput,
    TurnOutcome,
};

/// Claude Code's built-in tools (2.1.x; older and newer names too), so that
/// every one the channel does not allow is named in `--disallowedTools`.
/// A tool missing here is still kept out by `--tools`, which lists only the
/// allowed ones.
pub const KNOWN_TOOLS: &[&str] = &[
    "Agent",
    "Artifact",
    "AskUserQuestion",
    "Bash",
    "BashOutput",
    "ClaudeDesign",
    "CronCreate",
    "CronDelete",
    "CronList",
    "Edit",
    "EnterPlanMode",
    "EnterWorktree",
    "ExitPlanMode",
    "ExitWorktree",
    "Glob",
    "Grep",
    "KillBash",
    "KillShell",
    "LS",
    "ListAgents",
    "ListMcpResources",
    "ListMcpResourcesTool",
    "Monitor",
    "MultiEdit",
    "NotebookEdit",
    "NotebookRead",
    "OfferChromeSetup",
    "PowerShell",
    "Projects",
    "ProposeGoal",
    "ProposeSkills",
    "PushNotification",
    "Read",
    "ReadMcpResource",
    "ReadMcpResourceDir",
    "ReadMcpResourceTool",
    "ReadNotifications",
    "RefreshMcpTools",
    "RemoteTrigger",
    "ReportFindings",
    "ScheduleWakeup",
    "SendFeedback",
    "SendMessage",
    "ShowOnboardingRolePicker",
    "Skill",
    "SlashCommand",
    "Task",
    "TaskCreate",
    "TaskGet",
    "TaskList",
    "TaskStop",
    "TaskUpdate",
    "TodoWrite",
    "ToolSearch",
    "WebFetch",
    "WebSearch",
    "Workflow",
    "Write",
];

/// moat's built-in tool names and the Claude Code tools they stand for, so a
/// channel may use either spelling.
const BUILTIN_ALIASES: &[(&str, &str)] = &[
    ("bash", "Bash"),
    ("read_file", "Read"),
    ("write_file", "Write"),
    ("edit_file", "Edit"),
    ("list_files", "Glob"),
    ("search", "Grep"),
];

/// Largest persona passed on a command line (one argument; Linux allows 128 KiB).
pub(crate) const MAX_PERSONA: usize = 64 * 1024;

/// Largest answer kept (the sandbox's output limit bounds what is read).
const MAX_ANSWER: usize = 256 * 1024;

/// Runs Claude Code headless in the conversation's sandbox.
pub struct ClaudeCodeAgent {
    settings: AgentSettings,
}

/// Which tools a Claude Code run gets, worked out from the channel's list.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ToolPlan {
    /// Built-in tools that exist in the session (`--tools`).
    pub builtin: Vec<String>,
    /// Tools that run without asking (`--allowedTools`): the built-in ones
    /// and `mcp__<server>` for each of the channel's MCP servers.
    pub allowed: Vec<String>,
    /// Every other known tool, and thread-search tools of the MCP servers
    /// (`--disallowedTools`).
    pub disallowed: Vec<String>,
    /// Names dropped, with why (thread-search tools, MCP tools of servers the
    /// channel does not have, malformed names).
    pub dropped: Vec<(String, String)>,
}

/// Whether `name` can be a tool or server name on a command line and in a
/// JSON config (letters, digits, `_`, `-`; not empty).
pub(crate) fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The channel's MCP servers that can be configured, and why others cannot.
pub(crate) fn usable_mcp(
    settings: &AgentSettings,
) -> (Vec<&moat_agent::protocol::McpServer>, Vec<(String, String)>) {
    let mut ok = Vec::new();
    let mut bad = Vec::new();
    for m in &settings.mcp {
        if !plain_name(&m.name) {
            bad.push((m.name.clone(), "not a plain server name".to_string()));
        } else if moat_policy::agents::is_forbidden_tool(&m.name) {
            bad.push((
                m.name.clone(),
                "thread-search servers are never enabled".into(),
            ));
        } else if m.command.is_empty() {
            bad.push((m.name.clone(), "no command".into()));
        } else if ok
            .iter()
            .any(|o: &&moat_agent::protocol::McpServer| o.name == m.name)
        {
            bad.push((m.name.clone(), "listed twice".into()));
        } else {
            ok.push(m);
        }
    }
    (ok, bad)
}

impl ToolPlan {
    /// The plan for `settings`: only the channel's tools exist and run; an
    /// MCP tool name is kept only if its server is one of the channel's.
    pub fn for_settings(settings: &AgentSettings) -> ToolPlan {
        ToolPlan::build(settings, KNOWN_TOOLS, BUILTIN_ALIASES)
    }

    /// The plan for a CLI whose built-in tools are `known`, with moat's
    /// built-in names mapped by `aliases` (moat name, CLI name).
    pub(crate) fn build(
        settings: &AgentSettings,
        known: &[&str],
        aliases: &[(&str, &str)],
    ) -> ToolPlan {
        let mut plan = ToolPlan::default();
        let (servers, _) = usable_mcp(settings);
        for t in &settings.tools {
            if moat_policy::agents::is_forbidden_tool(t) {
                plan.dropped.push((
                    t.clone(),
                    "thread-search tools are never enabled".to_string(),
                ));
                continue;
            }
            if let Some(rest) = t.strip_prefix("mcp__") {
                let server = rest.split("__").next().unwrap_or("");
                if servers.iter().any(|s| s.name == server) && plain_name(rest) {
                    push_unique(&mut plan.allowed, t);
                } else {
                    plan.dropped.push((
                        t.clone(),
                        "its MCP server is not one of the channel's".to_string(),
                    ));
                }
                continue;
            }
            if !plain_name(t) {
                plan.dropped
                    .push((t.clone(), "not a tool name".to_string()));
                continue;
            }
            let name = aliases
                .iter()
                .find(|(alias, _)| alias == t)
                .map(|(_, real)| real.to_string())
                .unwrap_or_else(|| t.clone());
            push_unique(&mut plan.builtin, &name);
            push_unique(&mut plan.allowed, &name);
        }
        for s in &servers {
            push_unique(&mut plan.allowed, &format!("mcp__{}", s.name));
        }
        for k in known {
            if !plan.builtin.iter().any(|b| b == k) {
                plan.disallowed.push(k.to_string());
            }
        }
        for s in &servers {
            for f in moat_policy::agents::FORBIDDEN_TOOLS {
                plan.disallowed.push(format!("mcp__{}__{f}", s.name));
            }
        }
        plan
    }

    /// Whether a call of `tool` is one the channel allows.
    pub fn allows(&self, tool: &str) -> bool {
        if self.disallowed.iter().any(|d| d == tool) {
            return false;
        }
        self.builtin.iter().any(|b| b == tool)
            || self.allowed.iter().any(|a| {
                a == tool
                    || (a.starts_with("mcp__")
                        && a.matches("__").count() == 1
                        && tool.starts_with(&format!("{a}__")))
            })
    }
}

fn push_unique(v: &mut Vec<String>, s: &str) {
    if !v.iter().any(|x| x == s) {
        v.push(s.to_string());
    }
}

/// The MCP configuration file (`--mcp-config`): only the channel's servers.
pub fn mcp_config(settings: &AgentSettings) -> Value {
    let (servers, _) = usable_mcp(settings);
    let mut map = serde_json::Map::new();
    for s in servers {
        map.insert(
            s.name.clone(),
            json!({
                "type": "stdio",
                "command": s.command[0],
                "args": s.command[1..],
                "env": s.env,
            }),
        );
    }
    json!({ "mcpServers": map })
}

/// The shell wrapper every Claude Code run goes through: checks the door's
/// Anthropic proxy is there, writes the MCP configuration into the home
/// directory (never following a link the sandbox planted: the old file is
/// removed and the new one created exclusively), links the channel's memory
/// as `/workspace/CLAUDE.md` (docs/memory.md) and runs the CLI with it.
const CLAUDE_WRAPPER: &str = r#"set -eu
if [ -z "${ANTHROPIC_BASE_URL:-}" ]; then
  echo "moat: Claude Code needs the door's Anthropic proxy, but this sandbox has none (give moat an ANTHROPIC_API_KEY for this channel)" >&2
  exit 78
fi
umask 077
d="$HOME/.moat"
mkdir -p "$d"
f="$d/claude-mcp.json"
rm -f "$f"
set -C
printf '%s' "$MOAT_MCP_CONFIG" > "$f"
set +C
unset MOAT_MCP_CONFIG
if [ -f /workspace/group/MEMORY.md ] && [ ! -e /workspace/CLAUDE.md ]; then
  ln -s group/MEMORY.md /workspace/CLAUDE.md 2>/dev/null || true
fi
exec "$@" "--mcp-config=$f"
"#;

impl ClaudeCodeAgent {
    pub fn new(settings: AgentSettings) -> Self {
        ClaudeCodeAgent { settings }
    }

    /// The tools this channel's runs get.
    pub fn tool_plan(&self) -> ToolPlan {
        ToolPlan::for_settings(&self.settings)
    }

    /// Claude Code's command line (without `--mcp-config`, which the
    /// wrapper adds once it has written the file). The prompt goes on
    /// standard input.
    pub fn command_line(&self, resume: bool) -> Vec<String> {
        let plan = self.tool_plan();
        let s = &self.settings;
        let mut argv = vec![
            format!("{}/bin/claude", s.cli_dir.display()),
            "-p".into(),
            "--output-format".into(),
            "stream-json".into(),
            "--verbose".into(),
            // Nothing that is not allowed below runs, and nothing asks.
            "--permission-mode".into(),
            "dontAsk".into(),
            // No user, project or local settings files: their hooks would
            // run commands and their rules grant tools, whatever the channel says.
            "--setting-sources=".into(),
            "--strict-mcp-config".into(),
            "--disable-slash-commands".into(),
            format!("--tools={}", plan.builtin.join(",")),
        ];
        if !plan.allowed.is_empty() {
            argv.push(format!("--allowedTools={}", plan.allowed.join(",")));
        }
        argv.push(format!("--disallowedTools={}", plan.disallowed.join(",")));
        if let Some(p) = s.persona.as_deref().filter(|p| !p.trim().is_empty()) {
            argv.push(format!("--append-system-prompt={p}"));
        }
        if let Some(m) = &s.model {
            argv.push(format!("--model={m}"));
        }
        if s.max_steps > 0 {
            argv.push(format!("--max-turns={}", s.max_steps));
        }
        if resume {
            // The most recent conversation in /workspace: the previous
            // turn's in a per-thread sandbox; a new one on the first turn.
            argv.push("--continue".into());
        }
        argv
    }

    /// The environment of a run (besides the door's, which the lease adds).
    pub fn environment(&self) -> Vec<(String, String)> {
        vec![
            // Only the Messages API: no telemetry, error reports, update or
            // feature-flag checks (the door would refuse them anyway).
            (
                "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC".into(),
                "1".into(),
            ),
            ("DISABLE_AUTOUPDATER".into(), "1".into()),
            ("DISABLE_TELEMETRY".into(), "1".into()),
            ("DISABLE_ERROR_REPORTING".into(), "1".into()),
            (
                "MOAT_MCP_CONFIG".into(),
                mcp_config(&self.settings).to_string(),
            ),
        ]
    }

    fn preflight(&self) -> Result<(), String> {
        if let Some(p) = &self.settings.persona {
            if p.len() > MAX_PERSONA {
                return Err(format!(
                    "moat: the channel's persona is {} KiB; Claude Code takes at most {} KiB on its command line; shorten the persona file",
                    p.len() / 1024,
                    MAX_PERSONA / 1024
                ));
            }
        }
        Ok(())
    }
}

impl Agent for ClaudeCodeAgent {
    fn name(&self) -> &'static str {
        "claude"
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
        let plan = self.tool_plan();
        report_dropped(&plan.dropped, &usable_mcp(&self.settings).1, events);
        let mut argv: Vec<String> = vec![
            "/bin/sh".into(),
            "-c".into(),
            CLAUDE_WRAPPER.into(),
            "moat-claude".into(),
        ];
        argv.extend(self.command_line(input.resume));
        let mut spec = RunSpec::new(argv);
        spec.env = self.environment();
        spec.stdin = StdinSource::Bytes(compose_prompt(input).into_bytes());
        events(AgentEvent::Status("starting Claude Code".into()));
        let mut parser = StreamJsonParser::new("Claude Code", plan);
        let run = run_cli(lease, cancel, spec, &mut |line| parser.line(line, events));
        parser.finish(&run, events)
    }
}

/// A turn that could not start: the answer says why.
pub(crate) fn refusal(answer: String) -> TurnOutcome {
    TurnOutcome {
        preformatted: false,
        answer,
        ok: false,
        cancelled: false,
    }
}

/// Tells the operator (through the turn's events) which configured names a
/// run leaves out.
pub(crate) fn report_dropped(
    tools: &[(String, String)],
    servers: &[(String, String)],
    events: &mut dyn FnMut(AgentEvent),
) {
    for (t, why) in tools {
        events(AgentEvent::Error(format!(
            "the channel's tool {t:?} is left out: {why}"
        )));
    }
    for (s, why) in servers {
        events(AgentEvent::Error(format!(
            "the channel's MCP server {s:?} is left out: {why}"
        )));
    }
}

/// The prompt of a turn: the thread's messages since the last turn (if any),
/// then the new message(s).
pub fn compose_prompt(input: &TurnInput) -> String {
    let now = input.messages.join("\n\n");
    if input.history.is_empty() {
        return now;
    }
    format!(
        "Earlier in this thread, since your last answer:\n{}\n\nThe message(s) to answer now:\n{now}",
        input.history.join("\n")
    )
}

// ---------------------------------------------------------------------------
// Running a CLI in a lease
// ---------------------------------------------------------------------------

/// How a CLI run ended, as the parsers need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CliEnd {
    /// The process exited with status 0.
    Success,
    /// It exited otherwise or was killed: moat's one-line reason.
    Failed(String),
    /// The sandbox could not run it at all.
    NotRun(String),
}

/// What a CLI run left for its parser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliRun {
    pub end: CliEnd,
    /// The end of its standard error (at most [`STDERR_TAIL`] bytes).
    pub stderr_tail: String,
    pub cancelled: bool,
}

impl CliRun {
    /// The last non-empty line of standard error, for an answer.
    pub fn stderr_last_line(&self) -> Option<String> {
        self.stderr_tail
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(first_line)
    }
}

/// Bytes of standard error kept for error messages.
pub const STDERR_TAIL: usize = 4096;

/// Splits a byte stream into lines (`\n`), handing each complete one on.
#[derive(Default)]
pub(crate) struct LineBuf {
    buf: Vec<u8>,
}

impl LineBuf {
    pub(crate) fn push(&mut self, bytes: &[u8], on_line: &mut dyn FnMut(&str)) {
        self.buf.extend_from_slice(bytes);
        while let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=i).collect();
            on_line(String::from_utf8_lossy(&line[..i]).trim_end_matches('\r'));
        }
    }

    pub(crate) fn finish(&mut self, on_line: &mut dyn FnMut(&str)) {
        if !self.buf.is_empty() {
            let line = std::mem::take(&mut self.buf);
            on_line(String::from_utf8_lossy(&line).trim_end_matches('\r'));
        }
    }
}

/// Runs `spec` in `lease` (started and armed for `cancel` first), handing
/// each line of standard output to `on_line` as it arrives.
pub(crate) fn run_cli(
    lease: &mut Lease,
    cancel: &CancelHandle,
    spec: RunSpec,
    on_line: &mut dyn FnMut(&str),
) -> CliRun {
    let mut tail: Vec<u8> = Vec::new();
    if cancel.is_cancelled() {
        return CliRun {
            end: CliEnd::NotRun("stopped before it started".into()),
            stderr_tail: String::new(),
            cancelled: true,
        };
    }
    if let Err(e) = lease.start() {
        return CliRun {
            end: CliEnd::NotRun(format!("the sandbox could not start: {e}")),
            stderr_tail: String::new(),
            cancelled: cancel.is_cancelled(),
        };
    }
    cancel.arm(lease);
    let mut lines = LineBuf::default();
    let result = lease.run(spec, &mut |stream, bytes| match stream {
        Stream::Stdout => lines.push(bytes, on_line),
        Stream::Stderr => {
            tail.extend_from_slice(bytes);
            if tail.len() > STDERR_TAIL {
                tail.drain(..tail.len() - STDERR_TAIL);
            }
        }
    });
    lines.finish(on_line);
    let end = match result {
        Ok(outcome) => match outcome.reason() {
            None => CliEnd::Success,
            Some(r) => CliEnd::Failed(r),
        },
        Err(e) => CliEnd::NotRun(format!("the sandbox could not run it: {e}")),
    };
    CliRun {
        end,
        stderr_tail: String::from_utf8_lossy(&tail).into_owned(),
        cancelled: cancel.is_cancelled(),
    }
}

// ---------------------------------------------------------------------------
// The stream-json parser (Claude Code; Amp prints the same format)
// ---------------------------------------------------------------------------

/// The reason given for a call of a tool the channel does not allow.
pub const NOT_ALLOWED: &str = "not allowed in this channel";

/// The `result` line of a stream.
#[derive(Debug, Clone, Default)]
struct ResultLine {
    is_error: bool,
    subtype: String,
    text: Option<String>,
    errors: Vec<String>,
}

/// Reads a stream-json output line by line: reports events as they come
/// and, at the end, the turn's outcome. Lines that are not JSON objects, or
/// not of a known shape, are skipped (never fatal).
pub struct StreamJsonParser {
    /// The CLI's name, for messages ("Claude Code", "Amp").
    cli: &'static str,
    plan: ToolPlan,
    /// Text blocks of the main agent's messages, in order.
    texts: Vec<String>,
    text_len: usize,
    /// tool_use id → tool name.
    calls: HashMap<String, String>,
    /// tool_use ids already reported as refused.
    refused_ids: HashSet<String>,
    /// Refused tools, for the answer: name → reason (first reason kept).
    refused: BTreeMap<String, String>,
    result: Option<ResultLine>,
    session_id: Option<String>,
    skipped: usize,
}

impl StreamJsonParser {
    pub fn new(cli: &'static str, plan: ToolPlan) -> Self {
        StreamJsonParser {
            cli,
            plan,
            texts: Vec::new(),
            text_len: 0,
            calls: HashMap::new(),
            refused_ids: HashSet::new(),
            refused: BTreeMap::new(),
            result: None,
            session_id: None,
            skipped: 0,
        }
    }

    /// The session the CLI reported (`system`/`init`), if any.
    pub fn session_id(&self) -> Option<&str> {
        self.session_id.as_deref()
    }

    /// Lines that were skipped (not JSON, or of an unknown shape).
    pub fn skipped(&self) -> usize {
        self.skipped
    }

    /// One line of the CLI's standard output.
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
            Some("system") => self.system(&v, events),
            Some("assistant") => self.assistant(&v, events),
            Some("user") => self.user(&v, events),
            Some("result") => self.result(&v, events),
            _ => self.skipped += 1,
        }
    }

    fn system(&mut self, v: &Value, events: &mut dyn FnMut(AgentEvent)) {
        match v["subtype"].as_str() {
            Some("init") => {
                if let Some(id) = v["session_id"].as_str() {
                    self.session_id = Some(id.to_string());
                }
                let model = v["model"].as_str().unwrap_or("its default model");
                events(AgentEvent::Status(format!(
                    "{} started ({model})",
                    self.cli
                )));
            }
            Some("permission_denied") => {
                let tool = v["tool_name"].as_str().unwrap_or("?").to_string();
                let id = v["tool_use_id"].as_str().unwrap_or("").to_string();
                let cli_says = v["message"].as_str().unwrap_or("");
                self.refuse(&id, &tool, cli_says, events);
            }
            _ => {}
        }
    }

    fn refuse(&mut self, id: &str, tool: &str, cli_says: &str, events: &mut dyn FnMut(AgentEvent)) {
        if !id.is_empty() && !self.refused_ids.insert(id.to_string()) {
            return;
        }
        let reason = if !self.plan.allows(tool) {
            NOT_ALLOWED.to_string()
        } else if cli_says.trim().is_empty() {
            format!("{} refused it", self.cli)
        } else {
            format!("{} refused it: {}", self.cli, first_line(cli_says))
        };
        self.refused
            .entry(tool.to_string())
            .or_insert_with(|| reason.clone());
        events(AgentEvent::Refused {
            tool: tool.to_string(),
            reason,
        });
    }

    fn assistant(&mut self, v: &Value, events: &mut dyn FnMut(AgentEvent)) {
        // Messages of a subagent (Task) carry the id of the call that
        // started it: their text is not the answer.
        let main = v["parent_tool_use_id"].is_null();
        let Some(blocks) = v["message"]["content"].as_array() else {
            self.skipped += 1;
            return;
        };
        for b in blocks {
            match b["type"].as_str() {
                Some("text") => {
                    let Some(t) = b["text"].as_str() else {
                        continue;
                    };
                    if main && !t.is_empty() {
                        if self.text_len < MAX_ANSWER {
                            self.text_len += t.len();
                            self.texts.push(t.to_string());
                        }
                        events(AgentEvent::Text(t.to_string()));
                    }
                }
                Some("tool_use") => {
                    let name = b["name"].as_str().unwrap_or("?").to_string();
                    if let Some(id) = b["id"].as_str() {
                        self.calls.insert(id.to_string(), name.clone());
                    }
                    events(AgentEvent::ToolCall {
                        summary: summarize_input(&b["input"]),
                        name,
                    });
                }
                _ => {}
            }
        }
    }

    fn user(&mut self, v: &Value, events: &mut dyn FnMut(AgentEvent)) {
        let Some(blocks) = v["message"]["content"].as_array() else {
            return;
        };
        for b in blocks {
            if b["type"] != "tool_result" {
                continue;
            }
            let id = b["tool_use_id"].as_str().unwrap_or("");
            let name = self
                .calls
                .get(id)
                .cloned()
                .unwrap_or_else(|| "?".to_string());
            let is_error = b["is_error"].as_bool().unwrap_or(false);
            let output = result_text(&b["content"]);
            if self.refused_ids.contains(id) {
                continue;
            }
            if is_error && !self.plan.allows(&name) {
                // A call of a tool the session does not have ("No such tool
                // available") or one it denied without saying so.
                self.refuse(id, &name, &output, events);
                continue;
            }
            events(AgentEvent::ToolResult {
                name,
                ok: !is_error,
                summary: first_line(&output),
            });
        }
    }

    fn result(&mut self, v: &Value, events: &mut dyn FnMut(AgentEvent)) {
        if let Some(id) = v["session_id"].as_str() {
            self.session_id.get_or_insert_with(|| id.to_string());
        }
        if let Some(denials) = v["permission_denials"].as_array() {
            for d in denials {
                let tool = d["tool_name"].as_str().unwrap_or("?").to_string();
                let id = d["tool_use_id"].as_str().unwrap_or("").to_string();
                self.refuse(&id, &tool, "", events);
            }
        }
        let u = &v["usage"];
        if u.is_object() {
            let n = |k: &str| u[k].as_u64().unwrap_or(0);
            events(AgentEvent::Usage {
                input_tokens: n("input_tokens")
                    + n("cache_creation_input_tokens")
                    + n("cache_read_input_tokens"),
                output_tokens: n("output_tokens"),
            });
        }
        let r = ResultLine {
            is_error: v["is_error"].as_bool().unwrap_or(false),
            subtype: v["subtype"].as_str().unwrap_or("").to_string(),
            text: v["result"].as_str().map(str::to_string),
            errors: v["errors"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|e| e.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
        };
        if r.is_error {
            events(AgentEvent::Error(format!(
                "{} ended the turn with an error: {}",
                self.cli,
                error_line(&r)
            )));
        }
        self.result = Some(r);
    }

    /// The turn's outcome once the CLI has ended.
    pub fn finish(self, run: &CliRun, events: &mut dyn FnMut(AgentEvent)) -> TurnOutcome {
        if self.skipped > 0 {
            tracing::debug!(
                cli = self.cli,
                lines = self.skipped,
                "skipped output lines that are not stream-json"
            );
        }
        let said = self.texts.join("\n\n");
        let mut answer;
        let mut ok;
        match (&self.result, run.cancelled) {
            (_, true) => {
                answer = said;
                ok = false;
                push_para(&mut answer, "moat: stopped");
            }
            (Some(r), false) if !r.is_error => {
                answer = r
                    .text
                    .clone()
                    .filter(|t| !t.trim().is_empty())
                    .unwrap_or(said);
                ok = true;
                if let CliEnd::Failed(why) | CliEnd::NotRun(why) = &run.end {
                    ok = false;
                    push_para(&mut answer, why);
                }
            }
            (Some(r), false) => {
                answer = said;
                ok = false;
                push_para(
                    &mut answer,
                    &format!("{} stopped: {}", self.cli, error_line(r)),
                );
            }
            (None, false) => {
                answer = said;
                ok = false;
                let why = match &run.end {
                    CliEnd::Success => "it exited without a result".to_string(),
                    CliEnd::Failed(r) | CliEnd::NotRun(r) => {
                        r.strip_prefix("moat: ").unwrap_or(r).to_string()
                    }
                };
                let mut line = format!(
                    "moat: {} stopped before finishing its turn ({why})",
                    self.cli
                );
                if let Some(e) = run.stderr_last_line() {
                    line.push_str(&format!(": {e}"));
                }
                events(AgentEvent::Error(line.clone()));
                push_para(&mut answer, &line);
            }
        }
        for (tool, reason) in &self.refused {
            push_para(
                &mut answer,
                &format!("moat refused tool `{tool}`: {reason}"),
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

/// Appends `p` to `s` as a paragraph of its own.
pub(crate) fn push_para(s: &mut String, p: &str) {
    let trimmed = s.trim_end().len();
    s.truncate(trimmed);
    if !s.is_empty() {
        s.push_str("\n\n");
    }
    s.push_str(p);
}

fn error_line(r: &ResultLine) -> String {
    if !r.errors.is_empty() {
        return first_line(&r.errors.join("; "));
    }
    match r.text.as_deref().filter(|t| !t.trim().is_empty()) {
        Some(t) => first_line(t),
        None if !r.subtype.is_empty() => r.subtype.clone(),
        None => "no reason given".to_string(),
    }
}

/// The text of a tool result's `content` (a string or a list of blocks).
pub(crate) fn result_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .filter_map(|b| b["text"].as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        Value::Null => String::new(),
        other => other.to_string(),
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

    fn server(name: &str) -> moat_agent::protocol::McpServer {
        moat_agent::protocol::McpServer {
            name: name.into(),
            command: vec!["/usr/bin/python3".into(), "/workspace/mcp.py".into()],
            env: [("LEVEL".to_string(), "1".to_string())].into(),
        }
    }

    fn collect(parser: &mut StreamJsonParser, lines: &[&str]) -> Vec<AgentEvent> {
        let mut ev = Vec::new();
        for l in lines {
            parser.line(l, &mut |e| ev.push(e));
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

    const INIT: &str = r#"{"type":"system","subtype":"init","cwd":"/workspace","session_id":"s-1","tools":["Bash","Read"],"mcp_servers":[],"model":"claude-x"}"#;
    const TOOL_USE: &str = r#"{"type":"assistant","message":{"role":"assistant","content":[{"type":"text","text":"Let me look."},{"type":"tool_use","id":"toolu_1","name":"Bash","input":{"command":"ls /workspace\necho more","description":"list"}}]},"parent_tool_use_id":null,"session_id":"s-1"}"#;
    const TOOL_RESULT: &str = r#"{"type":"user","message":{"role":"user","content":[{"tool_use_id":"toolu_1","type":"tool_result","content":"a.txt\nb.txt","is_error":false}]},"parent_tool_use_id":null,"session_id":"s-1"}"#;
    const FINAL: &str = r#"{"type":"assistant","message":{"role":"assistant","content":[{"type":"text","text":"There are two files."}]},"parent_tool_use_id":null,"session_id":"s-1"}"#;
    const RESULT: &str = r#"{"type":"result","subtype":"success","is_error":false,"num_turns":2,"result":"There are two files.","session_id":"s-1","usage":{"input_tokens":100,"cache_creation_input_tokens":10,"cache_read_input_tokens":5,"output_tokens":20},"permission_denials":[]}"#;

    #[test]
    fn the_plan_allows_only_the_channels_tools() {
        let mut s = settings(&["Bash", "read_file", "find_thread", "mcp__other__x", "Bash"]);
        s.mcp = vec![server("probe")];
        let plan = ToolPlan::for_settings(&s);
        assert_eq!(plan.builtin, ["Bash", "Read"]);
        assert_eq!(plan.allowed, ["Bash", "Read", "mcp__probe"]);
        assert!(!plan.disallowed.contains(&"Bash".to_string()));
        for t in [
            "Write",
            "Edit",
            "WebFetch",
            "Agent",
            "Task",
            "Skill",
            "mcp__probe__read_thread",
        ] {
            assert!(plan.disallowed.contains(&t.to_string()), "{t}");
        }
        assert_eq!(
            plan.dropped
                .iter()
                .map(|d| d.0.as_str())
                .collect::<Vec<_>>(),
            ["find_thread", "mcp__other__x"]
        );
        assert!(plan.allows("Bash") && plan.allows("mcp__probe__whisper"));
        assert!(!plan.allows("Write") && !plan.allows("mcp__probe__read_thread"));
        assert!(!plan.allows("mcp__other__x") && !plan.allows("mcp__probex__y"));
    }

    #[test]
    fn the_command_line_carries_the_allowlist_persona_model_and_resume() {
        let mut s = settings(&["Bash"]);
        s.persona = Some("-You are terse.\nAlways.".into());
        s.model = Some("claude-sonnet-4-5".into());
        s.max_steps = 7;
        let argv = ClaudeCodeAgent::new(s).command_line(true);
        assert_eq!(argv[0], "/opt/clis/bin/claude");
        for want in [
            "-p",
            "--verbose",
            "--strict-mcp-config",
            "--setting-sources=",
            "--tools=Bash",
            "--allowedTools=Bash",
            "--append-system-prompt=-You are terse.\nAlways.",
            "--model=claude-sonnet-4-5",
            "--max-turns=7",
            "--continue",
        ] {
            assert!(
                argv.iter().any(|a| a == want),
                "{want} missing from {argv:?}"
            );
        }
        let dis = argv
            .iter()
            .find_map(|a| a.strip_prefix("--disallowedTools="))
            .unwrap();
        assert!(dis.split(',').any(|t| t == "Write"));
        assert!(!dis.split(',').any(|t| t == "Bash"));
        let fresh = ClaudeCodeAgent::new(settings(&[])).command_line(false);
        assert!(fresh.iter().any(|a| a == "--tools="));
        assert!(!fresh
            .iter()
            .any(|a| a == "--continue" || a.starts_with("--allowedTools")));
    }

    #[test]
    fn the_mcp_config_lists_only_the_channels_servers() {
        let mut s = settings(&[]);
        s.mcp = vec![server("probe"), server("read_thread"), server("bad name")];
        let c = mcp_config(&s);
        assert_eq!(
            c,
            json!({"mcpServers": {"probe": {"type": "stdio", "command": "/usr/bin/python3",
                "args": ["/workspace/mcp.py"], "env": {"LEVEL": "1"}}}})
        );
        assert_eq!(mcp_config(&settings(&[])), json!({"mcpServers": {}}));
    }

    #[test]
    fn the_prompt_carries_the_threads_history() {
        let i = TurnInput {
            messages: vec!["fix it".into(), "please".into()],
            history: vec!["bob: the build is red".into()],
            resume: false,
        };
        let p = compose_prompt(&i);
        assert!(p.contains("bob: the build is red") && p.ends_with("fix it\n\nplease"));
        let plain = TurnInput {
            messages: vec!["hi".into()],
            ..TurnInput::default()
        };
        assert_eq!(compose_prompt(&plain), "hi");
    }

    #[test]
    fn a_turn_with_a_tool_call_becomes_events_and_an_answer() {
        let mut p =
            StreamJsonParser::new("Claude Code", ToolPlan::for_settings(&settings(&["Bash"])));
        let ev = collect(&mut p, &[INIT, TOOL_USE, TOOL_RESULT, FINAL, RESULT]);
        assert_eq!(
            ev,
            vec![
                AgentEvent::Status("Claude Code started (claude-x)".into()),
                AgentEvent::Text("Let me look.".into()),
                AgentEvent::ToolCall {
                    name: "Bash".into(),
                    summary: "ls /workspace".into()
                },
                AgentEvent::ToolResult {
                    name: "Bash".into(),
                    ok: true,
                    summary: "a.txt".into()
                },
                AgentEvent::Text("There are two files.".into()),
                AgentEvent::Usage {
                    input_tokens: 115,
                    output_tokens: 20
                },
            ]
        );
        assert_eq!(p.session_id(), Some("s-1"));
        let out = p.finish(&ok_run(), &mut |_| {});
        assert_eq!(
            out,
            TurnOutcome {
                preformatted: false,
                answer: "There are two files.".into(),
                ok: true,
                cancelled: false
            }
        );
    }

    #[test]
    fn a_denied_tool_is_refused_once_and_told_in_the_answer() {
        let mut p =
            StreamJsonParser::new("Claude Code", ToolPlan::for_settings(&settings(&["Read"])));
        let denied = r#"{"type":"system","subtype":"permission_denied","tool_name":"Bash","tool_use_id":"toolu_1","message":"Permission to use Bash has been denied."}"#;
        let err_result = r#"{"type":"user","message":{"role":"user","content":[{"type":"tool_result","content":"Permission to use Bash has been denied.","is_error":true,"tool_use_id":"toolu_1"}]},"parent_tool_use_id":null}"#;
        let result = r#"{"type":"result","subtype":"success","is_error":false,"result":"I could not run it.","permission_denials":[{"tool_name":"Bash","tool_use_id":"toolu_1","tool_input":{}}]}"#;
        let ev = collect(&mut p, &[INIT, TOOL_USE, denied, err_result, result]);
        let refused: Vec<_> = ev
            .iter()
            .filter(|e| matches!(e, AgentEvent::Refused { .. }))
            .collect();
        assert_eq!(
            refused,
            [&AgentEvent::Refused {
                tool: "Bash".into(),
                reason: NOT_ALLOWED.into()
            }]
        );
        assert!(!ev
            .iter()
            .any(|e| matches!(e, AgentEvent::ToolResult { .. })));
        let out = p.finish(&ok_run(), &mut |_| {});
        assert_eq!(
            out.answer,
            "I could not run it.\n\nmoat refused tool `Bash`: not allowed in this channel"
        );
        assert!(out.ok);
    }

    #[test]
    fn a_call_of_a_tool_the_session_lacks_is_refused() {
        let mut p =
            StreamJsonParser::new("Claude Code", ToolPlan::for_settings(&settings(&["Read"])));
        let no_such = r#"{"type":"user","message":{"role":"user","content":[{"type":"tool_result","content":"<tool_use_error>Error: No such tool available: Bash.</tool_use_error>","is_error":true,"tool_use_id":"toolu_1"}]}}"#;
        let ev = collect(&mut p, &[TOOL_USE, no_such]);
        assert!(ev.contains(&AgentEvent::Refused {
            tool: "Bash".into(),
            reason: NOT_ALLOWED.into()
        }));
        // An allowed tool that fails is a failed result, not a refusal.
        let mut p =
            StreamJsonParser::new("Claude Code", ToolPlan::for_settings(&settings(&["Bash"])));
        let failed = r#"{"type":"user","message":{"role":"user","content":[{"type":"tool_result","content":[{"type":"text","text":"exit 1"}],"is_error":true,"tool_use_id":"toolu_1"}]}}"#;
        let ev = collect(&mut p, &[TOOL_USE, failed]);
        assert!(ev.contains(&AgentEvent::ToolResult {
            name: "Bash".into(),
            ok: false,
            summary: "exit 1".into()
        }));
    }

    #[test]
    fn malformed_lines_are_skipped_not_fatal() {
        let mut p = StreamJsonParser::new("Claude Code", ToolPlan::default());
        let ev = collect(
            &mut p,
            &[
                "Warning: something on stdout",
                "{not json",
                "[1,2]",
                r#"{"type":"assistant","message":"oops"}"#,
                r#"{"type":"mystery"}"#,
                "",
                FINAL,
                RESULT,
            ],
        );
        assert_eq!(p.skipped(), 5);
        assert!(ev.contains(&AgentEvent::Text("There are two files.".into())));
        let out = p.finish(&ok_run(), &mut |_| {});
        assert_eq!(out.answer, "There are two files.");
        assert!(out.ok);
    }

    #[test]
    fn a_cli_that_dies_mid_stream_says_so() {
        let mut p =
            StreamJsonParser::new("Claude Code", ToolPlan::for_settings(&settings(&["Bash"])));
        collect(&mut p, &[INIT, TOOL_USE]);
        let run = CliRun {
            end: CliEnd::Failed("moat: command killed by SIGSEGV".into()),
            stderr_tail: "some trace\nSegmentation fault\n\n".into(),
            cancelled: false,
        };
        let mut errors = Vec::new();
        let out = p.finish(&run, &mut |e| errors.push(e));
        assert!(!out.ok && !out.cancelled);
        assert_eq!(
            out.answer,
            "Let me look.\n\nmoat: Claude Code stopped before finishing its turn (command killed by SIGSEGV): Segmentation fault"
        );
        assert!(matches!(&errors[..], [AgentEvent::Error(_)]));
    }

    #[test]
    fn an_error_result_and_a_cancel_are_not_ok() {
        let mut p = StreamJsonParser::new("Claude Code", ToolPlan::default());
        let max = r#"{"type":"result","subtype":"error_max_turns","is_error":true,"errors":["Reached maximum number of turns (2)"]}"#;
        let ev = collect(&mut p, &[FINAL, max]);
        assert!(ev.iter().any(|e| matches!(e, AgentEvent::Error(_))));
        let out = p.finish(&ok_run(), &mut |_| {});
        assert_eq!(
            out.answer,
            "There are two files.\n\nClaude Code stopped: Reached maximum number of turns (2)"
        );
        assert!(!out.ok);

        let mut p = StreamJsonParser::new("Claude Code", ToolPlan::default());
        collect(&mut p, &[FINAL]);
        let run = CliRun {
            end: CliEnd::Failed("moat: command killed by SIGKILL".into()),
            stderr_tail: String::new(),
            cancelled: true,
        };
        let out = p.finish(&run, &mut |_| {});
        assert_eq!(
            out,
            TurnOutcome {
                preformatted: false,
                answer: "There are two files.\n\nmoat: stopped".into(),
                ok: false,
                cancelled: true
            }
        );
    }

    #[test]
    fn subagent_text_is_not_the_answer() {
        let mut p = StreamJsonParser::new("Claude Code", ToolPlan::default());
        let sub = r#"{"type":"assistant","message":{"role":"assistant","content":[{"type":"text","text":"inner"}]},"parent_tool_use_id":"toolu_9"}"#;
        let ev = collect(&mut p, &[sub]);
        assert!(ev.is_empty());
        let out = p.finish(&ok_run(), &mut |_| {});
        assert!(!out.answer.contains("inner"));
    }

    #[test]
    fn lines_are_split_across_chunks() {
        let mut b = LineBuf::default();
        let mut got = Vec::new();
        b.push(b"{\"a\":1}\n{\"b\"", &mut |l| got.push(l.to_string()));
        b.push(b":2}\r\n{\"c\":3}", &mut |l| got.push(l.to_string()));
        b.finish(&mut |l| got.push(l.to_string()));
        assert_eq!(got, [r#"{"a":1}"#, r#"{"b":2}"#, r#"{"c":3}"#]);
    }
}
