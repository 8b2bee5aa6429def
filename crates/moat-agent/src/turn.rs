//! One turn of the built-in agent: the tool-use loop. Ask the model, run the
//! tools it asks for (only those the turn allows), hand back the results,
//! until it answers without a tool call or the step limit is reached; the
//! conversation is saved in the home directory for the next turn's `resume`.
//!
//! Must never: run a tool call whose name the turn's allowlist does not
//! hold (refused before anything runs, the model is told, a `refused` event
//! says so), offer a tool the allowlist does not hold, or end a turn without
//! exactly one `final` or `error` event.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::mcp::{self, McpClient};
use crate::model::{self, CallResult, Conversation, Endpoint};
use crate::protocol::{is_forbidden_tool, Event, Provider, TurnSpec, BUILTIN_TOOLS};
use crate::retry::{self, RetryPolicy, Verdict};
use crate::tools::{self, shorten, ToolDef, Tools};

/// The system prompt when the channel gives no persona.
pub const DEFAULT_SYSTEM: &str = "You are a coding agent working in a sandbox on behalf of a team chatting with you. \
The workspace is /workspace. Use the tools you are given to look at and change files and to run commands, \
then answer briefly with what you did or found.";

/// Most bytes of one memory file put in the system prompt.
pub const MEMORY_MAX: usize = 64 * 1024;

/// The system prompt with the memory files read at the start of every turn
/// (docs/memory.md): global memory (`global/MEMORY.md`, shared by every
/// channel) and the channel's own (`group/MEMORY.md`), both under the
/// workspace. A missing or empty file adds nothing; a long one is cut.
pub fn with_memory(system: &str, workspace: &Path) -> String {
    let mut out = system.to_string();
    for (dir, title) in [
        (
            "global",
            "Global memory (shared by every channel; /workspace/global/MEMORY.md)",
        ),
        (
            "group",
            "This channel's memory (keep it up to date in /workspace/group/MEMORY.md)",
        ),
    ] {
        let Ok(bytes) = std::fs::read(workspace.join(dir).join("MEMORY.md")) else {
            continue;
        };
        let text = String::from_utf8_lossy(&bytes[..bytes.len().min(MEMORY_MAX)]);
        if text.trim().is_empty() {
            continue;
        }
        out.push_str(&format!("\n\n## {title}\n\n{}", text.trim_end()));
    }
    out
}

/// The line added to an answer cut off by the step limit.
pub const STEP_LIMIT_NOTE: &str = "moat: the step limit of this channel was reached";

/// Most characters of a tool's output in a `tool_result` event (the model
/// gets up to [`tools::MAX_OUTPUT`]).
pub const EVENT_OUTPUT: usize = 2000;

/// Where the agent runs: the workspace, the home directory (for the saved
/// session) and the providers' endpoints (the door, inside a sandbox).
#[derive(Debug, Clone)]
pub struct Setup {
    pub workspace: PathBuf,
    pub home: PathBuf,
    pub anthropic: Option<Endpoint>,
    pub openai: Option<Endpoint>,
    /// Longest wait for one model answer.
    pub model_timeout: Duration,
    /// Which failed model calls are tried again, and after how long.
    pub retry: RetryPolicy,
}

impl Setup {
    /// From the environment the door gives a sandbox: `ANTHROPIC_BASE_URL` +
    /// `ANTHROPIC_API_KEY`, `OPENAI_BASE_URL` + `OPENAI_API_KEY`, `HOME`; the
    /// workspace is /workspace (the current directory if there is none).
    pub fn from_env() -> Result<Setup, String> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let endpoint = |url_var: &str, key_var: &str| -> Result<Option<Endpoint>, String> {
            match (var(url_var), var(key_var)) {
                (Some(u), Some(key)) => Ok(Some(Endpoint {
                    base: crate::http::Url::parse(&u).map_err(|e| format!("{url_var}: {e}"))?,
                    key,
                })),
                _ => Ok(None),
            }
        };
        let ws = Path::new("/workspace");
        let workspace = if ws.is_dir() {
            ws.to_path_buf()
        } else {
            std::env::current_dir().map_err(|e| format!("no working directory: {e}"))?
        };
        Ok(Setup {
            workspace,
            home: var("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| "/home/agent".into()),
            anthropic: endpoint("ANTHROPIC_BASE_URL", "ANTHROPIC_API_KEY")?,
            openai: endpoint("OPENAI_BASE_URL", "OPENAI_API_KEY")?,
            model_timeout: Duration::from_secs(600),
            retry: RetryPolicy::default(),
        })
    }

    /// Where the conversation is kept between turns.
    pub fn session_path(&self) -> PathBuf {
        self.home.join(".moat-agent").join("session.json")
    }
}

/// The tools a turn allows: the built-in ones its spec names (never a
/// thread-search tool), in [`BUILTIN_TOOLS`] order.
pub fn allowed_builtins(spec: &TurnSpec) -> Vec<&'static str> {
    BUILTIN_TOOLS
        .into_iter()
        .filter(|t| spec.tools.iter().any(|s| s == t) && !is_forbidden_tool(t))
        .collect()
}

/// The first user message of a turn: the thread's messages since the last
/// turn as context, then the new message(s).
pub fn compose_prompt(spec: &TurnSpec) -> String {
    if spec.history.is_empty() {
        return spec.prompt.clone();
    }
    format!(
        "Messages in this thread since your last turn, for context:\n{}\n\nThe message to answer:\n{}",
        spec.history.join("\n"),
        spec.prompt
    )
}

/// A saved session larger than this starts over: it would soon outgrow the
/// model's context, and every later turn of the thread would fail.
const MAX_SESSION_BYTES: u64 = 1024 * 1024;

fn load_session(path: &Path, provider: Provider) -> Option<Conversation> {
    let size = std::fs::metadata(path).ok()?.len();
    if size > MAX_SESSION_BYTES {
        eprintln!(
            "moat-agent: the saved session is {size} bytes (over {MAX_SESSION_BYTES}); starting a new one"
        );
        return None;
    }
    let text = std::fs::read(path).ok()?;
    match serde_json::from_slice::<Conversation>(&text) {
        Ok(c) if c.provider == provider && c.is_complete() => Some(c),
        Ok(_) => {
            eprintln!("moat-agent: the saved session is for another provider or incomplete; starting a new one");
            None
        }
        Err(e) => {
            eprintln!("moat-agent: the saved session cannot be read ({e}); starting a new one");
            None
        }
    }
}

fn save_session(path: &Path, c: &Conversation) {
    use std::os::unix::fs::OpenOptionsExt;
    if !c.is_complete() {
        return;
    }
    let Ok(bytes) = serde_json::to_vec(c) else {
        return;
    };
    let r = (|| -> std::io::Result<()> {
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d)?;
        }
        let tmp = path.with_extension("json.tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        std::io::Write::write_all(&mut f, &bytes)?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = r {
        eprintln!(
            "moat-agent: could not save the session at {}: {e}",
            path.display()
        );
    }
}

/// One model call, tried again as [`retry::judge`] says (each wait is a
/// `status` event); the last error, with why it was not retried again.
fn call_with_retries(
    provider: Provider,
    endpoint: &Endpoint,
    body: &serde_json::Value,
    setup: &Setup,
    emit: &mut dyn FnMut(Event),
) -> Result<serde_json::Value, String> {
    let mut retried = 0;
    loop {
        let err = match model::call(provider, endpoint, body, setup.model_timeout) {
            Ok(doc) => return Ok(doc),
            Err(e) => e,
        };
        match retry::judge(&err, retried, &setup.retry, std::time::SystemTime::now()) {
            Verdict::Retry { wait, status } => {
                eprintln!("moat-agent: {err}; {status}");
                emit(Event::Status { text: status });
                std::thread::sleep(wait);
                retried += 1;
            }
            Verdict::Stop { note: None } => return Err(err.to_string()),
            Verdict::Stop { note: Some(n) } => return Err(format!("{err} ({n})")),
        }
    }
}

/// Runs one turn, reporting through `emit`; the last event is the one
/// `final` or `error`. Returns whether the turn ended with `final`.
pub fn run_turn(spec: &TurnSpec, setup: &Setup, emit: &mut dyn FnMut(Event)) -> bool {
    match run_inner(spec, setup, emit) {
        Ok((text, steps)) => {
            emit(Event::Final { text, steps });
            true
        }
        Err(message) => {
            emit(Event::Error { message });
            false
        }
    }
}

fn run_inner(
    spec: &TurnSpec,
    setup: &Setup,
    emit: &mut dyn FnMut(Event),
) -> Result<(String, u32), String> {
    if spec.max_steps == 0 {
        return Err("max_steps is 0: the turn may not call the model at all".into());
    }
    if spec.model.trim().is_empty() {
        return Err("no model given".into());
    }
    let endpoint = match spec.provider {
        Provider::Anthropic => setup.anthropic.as_ref().ok_or(
            "ANTHROPIC_BASE_URL and ANTHROPIC_API_KEY are not set: the sandbox's door does not serve \
             Anthropic (configure the channel's LLM provider)",
        )?,
        Provider::Openai => setup.openai.as_ref().ok_or(
            "OPENAI_BASE_URL and OPENAI_API_KEY are not set: the sandbox's door does not serve \
             OpenAI (configure the channel's LLM provider)",
        )?,
    };
    let timeout = Duration::from_secs(spec.tool_timeout_secs.max(1));
    let tools = Tools {
        root: setup.workspace.clone(),
        timeout,
    };

    // What the model is offered; nothing else runs.
    let mut defs: Vec<ToolDef> = allowed_builtins(spec)
        .into_iter()
        .filter_map(tools::definition)
        .collect();
    let mut notes = Vec::new();
    let mut servers: BTreeMap<String, McpClient> = BTreeMap::new();
    for s in &spec.mcp {
        if servers.contains_key(&s.name) {
            continue;
        }
        match McpClient::start(s, &setup.workspace, timeout) {
            Ok(c) => {
                defs.extend(c.tools.iter().cloned());
                servers.insert(s.name.clone(), c);
            }
            Err(e) => {
                eprintln!("moat-agent: {e}");
                notes.push(format!(
                    "moat: {e}; its tools were not available in this turn"
                ));
            }
        }
    }
    let offered: Vec<String> = defs.iter().map(|d| d.name.clone()).collect();

    let session = setup.session_path();
    let mut conv = spec
        .resume
        .then(|| load_session(&session, spec.provider))
        .flatten()
        .unwrap_or_else(|| Conversation::new(spec.provider));
    conv.push_user(&compose_prompt(spec));
    let system = spec
        .system
        .as_deref()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or(DEFAULT_SYSTEM);
    let system = with_memory(system, &setup.workspace);
    let system = system.as_str();

    let mut texts: Vec<String> = Vec::new();
    let mut steps = 0u32;
    loop {
        steps += 1;
        let body = conv.request(&spec.model, system, spec.max_tokens, &defs);
        let reply = call_with_retries(spec.provider, endpoint, &body, setup, emit)
            .and_then(|doc| conv.take_reply(&doc).map_err(|e| e.to_string()));
        let reply = match reply {
            Ok(r) => r,
            Err(e) => {
                // The saved session stays as the last good turn left it: a
                // prompt the model refused (e.g. too long) is not kept.
                return Err(e);
            }
        };
        emit(Event::Usage {
            input_tokens: reply.input_tokens,
            output_tokens: reply.output_tokens,
        });
        if !reply.text.trim().is_empty() {
            emit(Event::Text {
                text: reply.text.clone(),
            });
            texts.push(reply.text.trim().to_string());
        }
        if reply.calls.is_empty() {
            break;
        }
        let last = steps >= spec.max_steps;
        let mut results = Vec::new();
        for call in reply.calls {
            if last {
                results.push(CallResult {
                    id: call.id,
                    ok: false,
                    text: "not run: the step limit of this turn was reached".into(),
                });
                continue;
            }
            // The allowlist, before anything runs.
            if !offered.contains(&call.name) {
                let reason = refusal_reason(&call.name);
                emit(Event::Refused {
                    id: call.id.clone(),
                    name: call.name.clone(),
                    reason: reason.clone(),
                });
                results.push(CallResult {
                    id: call.id,
                    ok: false,
                    text: format!(
                        "moat refused this call: the tool `{}` is not allowed here ({reason}). \
                         Do not retry it; use the tools you were given, or answer without it.",
                        call.name
                    ),
                });
                continue;
            }
            emit(Event::ToolCall {
                id: call.id.clone(),
                name: call.name.clone(),
                input: call.input.clone(),
            });
            let out = if let Some(e) = &call.bad_input {
                tools::ToolOutput {
                    ok: false,
                    text: format!("the arguments are not valid JSON: {e}"),
                }
            } else if let Some((server, tool)) = mcp::split_tool_name(&call.name) {
                match servers.get_mut(server) {
                    Some(c) => c.call(tool, &call.input),
                    None => tools::ToolOutput {
                        ok: false,
                        text: format!("MCP server {server} is not running"),
                    },
                }
            } else {
                tools.run(&call.name, &call.input)
            };
            emit(Event::ToolResult {
                id: call.id.clone(),
                name: call.name.clone(),
                ok: out.ok,
                output: shorten(&out.text, EVENT_OUTPUT),
            });
            results.push(CallResult {
                id: call.id,
                ok: out.ok,
                text: out.text,
            });
        }
        conv.push_results(&results);
        if last {
            texts.push(format!(
                "{STEP_LIMIT_NOTE} ({} model calls).",
                spec.max_steps
            ));
            break;
        }
    }
    save_session(&session, &conv);
    texts.extend(notes);
    Ok((texts.join("\n\n"), steps))
}

/// Why a call was refused, for the model and the user.
fn refusal_reason(name: &str) -> String {
    if is_forbidden_tool(name) {
        "moat never enables tools that read other conversations".into()
    } else if BUILTIN_TOOLS.contains(&name) {
        "not allowed in this channel".into()
    } else if let Some((server, _)) = mcp::split_tool_name(name) {
        format!("not offered by an MCP server allowed in this channel ({server})")
    } else {
        "there is no such tool".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_files_follow_the_persona_in_the_system_prompt() {
        let t = tempfile::tempdir().unwrap();
        assert_eq!(with_memory("Be brief.", t.path()), "Be brief.");
        std::fs::create_dir_all(t.path().join("group")).unwrap();
        std::fs::create_dir_all(t.path().join("global")).unwrap();
        std::fs::write(t.path().join("group/MEMORY.md"), "The repo is foo.\n").unwrap();
        std::fs::write(t.path().join("global/MEMORY.md"), "  \n").unwrap();
        let s = with_memory("Be brief.", t.path());
        assert!(
            s.starts_with("Be brief.\n\n## This channel's memory"),
            "{s}"
        );
        assert!(s.ends_with("The repo is foo."), "{s}");
        assert!(!s.contains("Global memory"), "{s}");
        std::fs::write(
            t.path().join("global/MEMORY.md"),
            "x".repeat(MEMORY_MAX + 10),
        )
        .unwrap();
        let s = with_memory("P", t.path());
        assert!(
            s.contains("Global memory") && s.len() < MEMORY_MAX + 500,
            "{}",
            s.len()
        );
    }
}
