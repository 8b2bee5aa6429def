//! Agents: what runs a turn inside the conversation's sandbox, behind one
//! trait. The shell agent (each message is a shell command), the built-in
//! LLM agent (`moat agent-run` inside the sandbox) and the adapters for the
//! coding-agent CLIs (Claude Code, Codex, Amp, Pi) all report the same events.
//!
//! Must never: run anything outside the lease it is given, let a turn use a
//! tool or MCP server its channel does not allow, or lose the outcome of a
//! turn (a crashed or cancelled agent still gives an answer).

pub mod amp;
pub mod builtin;
pub mod claude;
pub mod codex;
pub mod pi;
pub mod shell;

pub use shell::ShellAgent;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use moat_sandbox::Lease;

/// What a turn gets: the new messages (debounced into one turn) and the
/// thread's history since the last turn.
#[derive(Debug, Clone, Default)]
pub struct TurnInput {
    pub messages: Vec<String>,
    pub history: Vec<String>,
    /// Continue the agent's session of the previous turn (per-thread mode:
    /// the sandbox kept its files, including the agent's session).
    pub resume: bool,
}

/// What an agent reports while it works.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEvent {
    /// Part of the answer, as it is produced.
    Text(String),
    /// What the sandbox is doing, for the status line.
    Status(String),
    /// The agent called a tool (`summary`: the input, shortened, for the status line).
    ToolCall { name: String, summary: String },
    /// A tool finished (`summary`: its output, shortened).
    ToolResult {
        name: String,
        ok: bool,
        summary: String,
    },
    /// A tool call was refused before it ran (not allowed in this channel).
    Refused { tool: String, reason: String },
    /// Tokens one model call used.
    Usage {
        input_tokens: u64,
        output_tokens: u64,
    },
    /// Something went wrong; the turn may still end with an answer.
    Error(String),
}

/// How an agent is set up for one channel: the operator's persona, the
/// allowlists and the model. Built from the channel's configuration.
#[derive(Debug, Clone, Default)]
pub struct AgentSettings {
    /// The system prompt (the persona file's text).
    pub persona: Option<String>,
    /// Tools the agent may use, in its own names (built-in: [`moat_agent::protocol::BUILTIN_TOOLS`];
    /// Claude Code: `Bash`, `Read`, …). Never a thread-search tool.
    pub tools: Vec<String>,
    /// MCP servers the agent may use (default: none).
    pub mcp: Vec<moat_agent::protocol::McpServer>,
    /// The model; `None`: the agent's default.
    pub model: Option<String>,
    /// Model calls one turn may make.
    pub max_steps: u32,
    /// Which API the built-in agent speaks.
    pub provider: Option<moat_agent::protocol::Provider>,
    /// Where the agent CLIs are installed, as seen inside the sandbox
    /// (`<dir>/bin/claude`, `<dir>/bin/codex`, `<dir>/bin/amp`).
    pub cli_dir: PathBuf,
}

/// How a turn ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurnOutcome {
    /// The whole answer to post.
    pub answer: String,
    /// `false` when the command failed, was cancelled or the sandbox died.
    pub ok: bool,
    pub cancelled: bool,
    /// The answer is command output, shown as it is (a code block in Slack),
    /// not Markdown (the shell agent).
    pub preformatted: bool,
}

/// Stops a running turn from another thread: kills every process of the
/// lease's sandbox (its cgroups), so the blocking run returns.
#[derive(Clone, Default)]
pub struct CancelHandle {
    cancelled: Arc<AtomicBool>,
    cgroups: Arc<Mutex<Vec<PathBuf>>>,
}

impl CancelHandle {
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
        let dirs = self.cgroups.lock().map(|d| d.clone()).unwrap_or_default();
        for dir in dirs {
            kill_cgroup(&dir);
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    /// Points the handle at the lease's running instance (call after `lease.start()`).
    pub fn arm(&self, lease: &Lease) {
        if let Ok(mut c) = self.cgroups.lock() {
            *c = lease.cgroup_paths();
        }
        if self.is_cancelled() {
            self.cancel();
        }
    }
}

/// SIGKILL to every process in a cgroup directory (v1 or v2).
fn kill_cgroup(dir: &std::path::Path) {
    if std::fs::write(dir.join("cgroup.kill"), "1").is_ok() {
        return;
    }
    if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        for pid in text.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Runs a turn in a lease. Blocking: call it on a blocking thread.
pub trait Agent: Send + Sync {
    fn name(&self) -> &'static str;
    fn run_turn(
        &self,
        lease: &mut Lease,
        input: &TurnInput,
        cancel: &CancelHandle,
        events: &mut dyn FnMut(AgentEvent),
    ) -> TurnOutcome;
}

/// The first line of `s`, at most 80 characters (for status lines).
pub(crate) fn first_line(s: &str) -> String {
    let l = s.lines().next().unwrap_or("");
    if l.chars().count() > 80 {
        format!("{}…", l.chars().take(80).collect::<String>())
    } else {
        l.to_string()
    }
}

/// The status-line summary of a tool call's input.
pub(crate) fn summarize_input(input: &serde_json::Value) -> String {
    for key in ["command", "file_path", "path", "pattern", "url", "query"] {
        if let Some(s) = input[key].as_str() {
            return first_line(s);
        }
    }
    match input {
        serde_json::Value::Null => String::new(),
        serde_json::Value::Object(m) if m.is_empty() => String::new(),
        other => first_line(&other.to_string()),
    }
}
