//! The built-in agent, host side: runs `moat agent-run` inside the
//! conversation's sandbox (the moat binary is bound read-only at
//! `/run/moat/bin/moat`), hands it the turn as JSON on standard input and
//! turns its JSON-lines events into [`AgentEvent`]s and a [`TurnOutcome`].
//!
//! The agent enforces the channel's tool allowlist before any tool runs;
//! this side checks again (defense in depth): a `tool_result` for a tool
//! the channel does not allow stops the turn at once, and the answer says so.
//! Must never: run the agent outside the lease it is given, hand the agent a
//! real key (the lease's environment carries only the door's placeholder),
//! or end a turn without an answer (a crashed, killed or silent agent still
//! gives one).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use moat_agent::protocol::{is_forbidden_tool, Event, Provider, TurnSpec, BUILTIN_TOOLS};
use moat_sandbox::{Lease, RunSpec, StdinSource, Stream};

use super::{
    first_line, summarize_input, Agent, AgentEvent, AgentSettings, CancelHandle, TurnInput,
    TurnOutcome,
};

/// Where the gateway binds the moat binary inside every sandbox of a
/// channel with the built-in agent.
pub const MOAT_INSIDE: &str = "/run/moat/bin/moat";
/// Default model per provider.
pub const DEFAULT_ANTHROPIC_MODEL: &str = "claude-sonnet-4-5";
pub const DEFAULT_OPENAI_MODEL: &str = "gpt-5";
/// `max_tokens` of each model call.
pub const DEFAULT_MAX_TOKENS: u32 = 4096;
/// Time limit of one tool call.
pub const DEFAULT_TOOL_TIMEOUT_SECS: u64 = 120;
/// Model calls per turn when the channel sets none.
pub const DEFAULT_MAX_STEPS: u32 = 25;
/// Largest answer kept, and longest partial event line buffered.
const MAX_ANSWER: usize = 256 * 1024;
const MAX_LINE: usize = 4 * 1024 * 1024;

/// The built-in LLM agent (`agent = "builtin"`).
pub struct BuiltinAgent {
    settings: AgentSettings,
    exe_inside: String,
}

impl BuiltinAgent {
    /// `exe_inside`: the moat binary as the sandbox sees it (normally [`MOAT_INSIDE`]).
    pub fn new(settings: AgentSettings, exe_inside: impl Into<String>) -> BuiltinAgent {
        BuiltinAgent {
            settings,
            exe_inside: exe_inside.into(),
        }
    }

    /// The built-in tools this channel allows (never a thread-search tool).
    pub fn allowed_tools(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for t in &self.settings.tools {
            if BUILTIN_TOOLS.contains(&t.as_str()) && !is_forbidden_tool(t) && !out.contains(t) {
                out.push(t.clone());
            }
        }
        out
    }

    /// Whether a tool the agent reports having run is allowed here.
    fn allows(&self, name: &str) -> bool {
        if is_forbidden_tool(name) {
            return false;
        }
        if let Some((server, tool)) = moat_agent::mcp::split_tool_name(name) {
            return !is_forbidden_tool(tool) && self.settings.mcp.iter().any(|m| m.name == server);
        }
        self.allowed_tools().iter().any(|t| t == name)
    }

    /// The turn as the agent gets it.
    pub fn spec(&self, input: &TurnInput) -> TurnSpec {
        let provider = self.settings.provider.unwrap_or(Provider::Anthropic);
        let model = self.settings.model.clone().unwrap_or_else(|| {
            match provider {
                Provider::Anthropic => DEFAULT_ANTHROPIC_MODEL,
                Provider::Openai => DEFAULT_OPENAI_MODEL,
            }
            .to_string()
        });
        TurnSpec {
            provider,
            model,
            system: self.settings.persona.clone(),
            prompt: input.messages.join("\n\n"),
            history: input.history.clone(),
            tools: self.allowed_tools(),
            mcp: self
                .settings
                .mcp
                .iter()
                .filter(|m| !is_forbidden_tool(&m.name))
                .cloned()
                .collect(),
            max_steps: if self.settings.max_steps == 0 {
                DEFAULT_MAX_STEPS
            } else {
                self.settings.max_steps
            },
            max_tokens: DEFAULT_MAX_TOKENS,
            resume: input.resume,
            tool_timeout_secs: DEFAULT_TOOL_TIMEOUT_SECS,
        }
    }
}

/// What the event stream said, as it came.
#[derive(Default)]
struct Collected {
    /// Text events, joined (what the user sees if no `final` comes).
    text: String,
    final_text: Option<String>,
    error: Option<String>,
    refused: Vec<(String, String)>,
    /// A tool the channel does not allow was reported as run.
    violation: Option<String>,
    partial: Vec<u8>,
}

impl Agent for BuiltinAgent {
    fn name(&self) -> &'static str {
        "builtin"
    }

    fn run_turn(
        &self,
        lease: &mut Lease,
        input: &TurnInput,
        cancel: &CancelHandle,
        events: &mut dyn FnMut(AgentEvent),
    ) -> TurnOutcome {
        let fail = |answer: String| TurnOutcome {
            preformatted: false,
            answer,
            ok: false,
            cancelled: cancel.is_cancelled(),
        };
        if cancel.is_cancelled() {
            return TurnOutcome {
                preformatted: false,
                answer: "moat: stopped".into(),
                ok: false,
                cancelled: true,
            };
        }
        if let Err(e) = lease.start() {
            return fail(format!("moat: the sandbox could not start: {e}"));
        }
        cancel.arm(lease);
        let spec = self.spec(input);
        let stdin = match serde_json::to_vec(&spec) {
            Ok(b) => b,
            Err(e) => return fail(format!("moat: the turn could not be encoded: {e}")),
        };
        // Our own handle for the defense-in-depth stop: it must not mark the
        // user's handle as cancelled.
        let guard = CancelHandle::default();
        guard.arm(lease);
        events(AgentEvent::Status("thinking".into()));
        let mut c = Collected::default();
        let mut stderr = Vec::new();
        let mut run = RunSpec::new([self.exe_inside.as_str(), "agent-run"]);
        run.stdin = StdinSource::Bytes(stdin);
        let result = {
            let mut sink = |s: Stream, bytes: &[u8]| match s {
                Stream::Stdout => {
                    c.partial.extend_from_slice(bytes);
                    while let Some(i) = c.partial.iter().position(|&b| b == b'\n') {
                        let line: Vec<u8> = c.partial.drain(..=i).collect();
                        self.take_line(&line, &mut c, &guard, events);
                    }
                    if c.partial.len() > MAX_LINE {
                        tracing::warn!(
                            bytes = c.partial.len(),
                            "built-in agent: an event line is too long; dropped"
                        );
                        c.partial.clear();
                    }
                }
                Stream::Stderr => {
                    if stderr.len() < 64 * 1024 {
                        stderr.extend_from_slice(bytes);
                    }
                }
            };
            lease.run(run, &mut sink)
        };
        if !c.partial.is_empty() {
            let line = std::mem::take(&mut c.partial);
            self.take_line(&line, &mut c, &guard, events);
        }
        if !stderr.is_empty() {
            tracing::debug!(stderr = %String::from_utf8_lossy(&stderr), "built-in agent stderr");
        }

        let mut answer = c
            .final_text
            .clone()
            .unwrap_or_else(|| c.text.trim().to_string());
        let mut ok = c.final_text.is_some();
        fn note(line: String, answer: &mut String) {
            if !answer.is_empty() && !answer.ends_with('\n') {
                answer.push('\n');
            }
            answer.push_str(&line);
        }
        for (tool, reason) in &c.refused {
            note(format!("moat refused tool `{tool}`: {reason}"), &mut answer);
        }
        if let Some(v) = &c.violation {
            ok = false;
            note(
                format!("moat stopped the agent: it reported running `{v}`, which this channel does not allow"),
                &mut answer,
            );
        } else if cancel.is_cancelled() {
            ok = false;
            note("moat: stopped".into(), &mut answer);
        } else if let Some(e) = &c.error {
            ok = false;
            note(format!("moat: the agent failed: {e}"), &mut answer);
        } else {
            match &result {
                Ok(outcome) if c.final_text.is_none() => {
                    ok = false;
                    let why = outcome
                        .reason()
                        .unwrap_or_else(|| "moat: the agent exited without an answer".into());
                    note(
                        format!("{why} (the built-in agent stopped before answering)"),
                        &mut answer,
                    );
                }
                Ok(outcome) => {
                    if let Some(r) = outcome.reason() {
                        tracing::warn!(reason = %r, "built-in agent answered but exited non-zero");
                    }
                }
                Err(e) => {
                    ok = false;
                    note(
                        format!("moat: the sandbox could not run the agent: {e}"),
                        &mut answer,
                    );
                }
            }
        }
        if answer.trim().is_empty() {
            answer = "(the agent gave no answer)".into();
        }
        if answer.len() > MAX_ANSWER {
            let mut cut = MAX_ANSWER;
            while !answer.is_char_boundary(cut) {
                cut -= 1;
            }
            answer.truncate(cut);
            answer.push_str("\n(moat: answer cut)");
        }
        TurnOutcome {
            preformatted: false,
            answer,
            ok: ok && !cancel.is_cancelled(),
            cancelled: cancel.is_cancelled(),
        }
    }
}

impl BuiltinAgent {
    fn take_line(
        &self,
        line: &[u8],
        c: &mut Collected,
        guard: &CancelHandle,
        events: &mut dyn FnMut(AgentEvent),
    ) {
        let text = String::from_utf8_lossy(line);
        let text = text.trim();
        if text.is_empty() {
            return;
        }
        let event: Event = match serde_json::from_str(text) {
            Ok(e) => e,
            Err(_) => {
                tracing::debug!(line = %first_line(text), "built-in agent: not an event line");
                return;
            }
        };
        if c.violation.is_some() {
            return;
        }
        match event {
            Event::Text { text } => {
                if c.text.len() < MAX_ANSWER {
                    if !c.text.is_empty() {
                        c.text.push_str("\n\n");
                    }
                    c.text.push_str(&text);
                }
                events(AgentEvent::Text(text));
            }
            Event::ToolCall { name, input, .. } => {
                events(AgentEvent::Status(format!(
                    "{name}: {}",
                    summarize_input(&input)
                )));
                events(AgentEvent::ToolCall {
                    summary: summarize_input(&input),
                    name,
                });
            }
            Event::ToolResult {
                name, ok, output, ..
            } => {
                if !self.allows(&name) {
                    tracing::error!(tool = %name, "built-in agent reported running a tool this channel does not allow; stopping it");
                    c.violation = Some(name.clone());
                    guard.cancel();
                    events(AgentEvent::Error(format!(
                        "the agent ran `{name}`, which this channel does not allow; stopped"
                    )));
                    return;
                }
                events(AgentEvent::ToolResult {
                    name,
                    ok,
                    summary: first_line(&output),
                });
            }
            Event::Refused { name, reason, .. } => {
                events(AgentEvent::Refused {
                    tool: name.clone(),
                    reason: reason.clone(),
                });
                if !c.refused.iter().any(|(n, _)| *n == name) {
                    c.refused.push((name, reason));
                }
            }
            Event::Usage {
                input_tokens,
                output_tokens,
            } => events(AgentEvent::Usage {
                input_tokens,
                output_tokens,
            }),
            // What the agent is waiting for (a model call to retry): the
            // status line only, bounded (it comes from the sandbox).
            Event::Status { text } => events(AgentEvent::Status(text.chars().take(200).collect())),
            Event::Final { text, .. } => c.final_text = Some(text),
            Event::Error { message } => {
                events(AgentEvent::Error(message.clone()));
                c.error = Some(message);
            }
        }
    }
}

/// Copies the moat executable `exe` to a world-readable file under
/// `<runtime_dir>/bin/` (sandbox uids may not reach the build or install
/// tree), named by its size and modification time; an existing copy of the
/// same binary is reused. Returns the copy's path, for
/// `DoorExtras.files` as `(path, MOAT_INSIDE)`.
///
/// Invariant: the copy is written under a temporary name and renamed into
/// place, so a sandbox never sees a half-written binary.
pub fn install_moat_binary(runtime_dir: &Path, exe: &Path) -> Result<PathBuf, String> {
    let meta = std::fs::metadata(exe).map_err(|e| {
        format!(
            "the moat binary {} cannot be read ({e}); the built-in agent needs it inside the sandbox",
            exe.display()
        )
    })?;
    let dir = runtime_dir.join("bin");
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755));
    // Named by the file's identity (device, inode, size, change time: none of
    // them can be set back by a build), so a rebuilt binary never reuses an
    // older copy, without reading the whole binary at every start.
    let dst = dir.join(format!(
        "moat-{:x}-{:x}-{}-{}.{}",
        meta.dev(),
        meta.ino(),
        meta.len(),
        meta.ctime(),
        meta.ctime_nsec()
    ));
    if dst.exists() {
        return Ok(dst);
    }
    let mut rnd = [0u8; 8];
    getrandom::getrandom(&mut rnd).map_err(|e| format!("random name: {e}"))?;
    let tmp = dst.with_extension(format!("tmp{:x}", u64::from_le_bytes(rnd)));
    let r = std::fs::copy(exe, &tmp)
        .and_then(|_| std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)))
        .and_then(|_| std::fs::rename(&tmp, &dst));
    if let Err(e) = r {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!(
            "copying {} to {}: {e}",
            exe.display(),
            dst.display()
        ));
    }
    Ok(dst)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(tools: &[&str]) -> BuiltinAgent {
        BuiltinAgent::new(
            AgentSettings {
                tools: tools.iter().map(|s| s.to_string()).collect(),
                mcp: vec![moat_agent::protocol::McpServer {
                    name: "gh".into(),
                    command: vec!["x".into()],
                    env: Default::default(),
                }],
                ..Default::default()
            },
            MOAT_INSIDE,
        )
    }

    #[test]
    fn spec_defaults_and_allowlist() {
        let a = agent(&["bash", "read_thread", "Bash", "read_file", "bash"]);
        let s = a.spec(&TurnInput {
            messages: vec!["a".into(), "b".into()],
            history: vec!["h".into()],
            resume: true,
        });
        assert_eq!(s.tools, ["bash", "read_file"]);
        assert_eq!(s.model, DEFAULT_ANTHROPIC_MODEL);
        assert_eq!(s.prompt, "a\n\nb");
        assert_eq!(
            (s.max_steps, s.max_tokens, s.tool_timeout_secs, s.resume),
            (DEFAULT_MAX_STEPS, 4096, 120, true)
        );
        assert!(a.allows("bash") && a.allows("mcp__gh__issues"));
        assert!(!a.allows("write_file") && !a.allows("read_thread"));
        assert!(!a.allows("mcp__other__x") && !a.allows("mcp__gh__find_thread"));
        let o = BuiltinAgent::new(
            AgentSettings {
                provider: Some(Provider::Openai),
                max_steps: 3,
                ..Default::default()
            },
            MOAT_INSIDE,
        );
        let s = o.spec(&TurnInput::default());
        assert_eq!((s.model.as_str(), s.max_steps), (DEFAULT_OPENAI_MODEL, 3));
    }

    #[test]
    fn events_become_agent_events_and_a_violation_stops() {
        let a = agent(&["read_file"]);
        let mut c = Collected::default();
        let guard = CancelHandle::default();
        let mut got = Vec::new();
        for l in [
            r#"{"type":"text","text":"hi"}"#,
            "not json",
            r#"{"type":"tool_call","id":"1","name":"read_file","input":{"path":"a.txt"}}"#,
            r#"{"type":"tool_result","id":"1","name":"read_file","ok":true,"output":"x\ny"}"#,
            r#"{"type":"refused","id":"2","name":"bash","reason":"not allowed in this channel"}"#,
            r#"{"type":"tool_result","id":"3","name":"bash","ok":true,"output":"z"}"#,
            r#"{"type":"final","text":"late","steps":2}"#,
        ] {
            a.take_line(l.as_bytes(), &mut c, &guard, &mut |e| got.push(e));
        }
        assert_eq!(got[0], AgentEvent::Text("hi".into()));
        assert!(got.contains(&AgentEvent::ToolCall {
            name: "read_file".into(),
            summary: "a.txt".into()
        }));
        assert!(got.contains(&AgentEvent::ToolResult {
            name: "read_file".into(),
            ok: true,
            summary: "x".into()
        }));
        assert_eq!(
            c.refused,
            [("bash".into(), "not allowed in this channel".into())]
        );
        assert_eq!(c.violation.as_deref(), Some("bash"));
        assert!(
            c.final_text.is_none(),
            "events after a violation are ignored"
        );
        assert!(guard.is_cancelled(), "the violation stops the sandbox");
    }

    #[test]
    fn install_copies_once() {
        let d = tempfile::tempdir().unwrap();
        let exe = d.path().join("moat");
        std::fs::write(&exe, b"binary").unwrap();
        let a = install_moat_binary(&d.path().join("run"), &exe).unwrap();
        let b = install_moat_binary(&d.path().join("run"), &exe).unwrap();
        assert_eq!(a, b);
        assert_eq!(std::fs::read(&a).unwrap(), b"binary");
        assert_eq!(
            std::fs::metadata(&a).unwrap().permissions().mode() & 0o777,
            0o755
        );
        assert!(install_moat_binary(d.path(), &d.path().join("missing")).is_err());
    }
}
