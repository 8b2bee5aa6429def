//! The coding-agent CLI adapters (moat_gateway::agent::{claude, codex, amp})
//! in real sandboxes (bwrap and gVisor), each lease with a real door whose
//! LLM proxy holds the real keys, against a scripted fake Anthropic/OpenAI
//! upstream on 127.0.0.1 (tests/clikit). The CLIs are the ones scripts/setup
//! installs (Claude Code and Codex, pinned); a missing one fails the test.
//!
//! What they check: a scripted turn through each adapter gives the tool
//! call, its result and the final text as events and the right answer; a
//! tool the channel does not allow is refused before it runs (no marker
//! file) and the refusal is in the answer; per-thread resume continues the
//! previous session; only the channel's MCP servers reach the model; a
//! cancelled turn leaves no process behind; Amp's turn goes through the
//! door, which adds Amp's key (a stand-in `amp` against a fake Amp service,
//! tests/ampkit). The real keys are only ever seen by the fakes, never inside.

mod ampkit;
mod clikit;

use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clikit::*;
use moat_gateway::agent::amp::AmpAgent;
use moat_gateway::agent::claude::ClaudeCodeAgent;
use moat_gateway::agent::codex::CodexAgent;
use moat_gateway::agent::pi::PiAgent;
use moat_gateway::agent::{Agent, AgentEvent, AgentSettings, CancelHandle, TurnInput, TurnOutcome};
use serde_json::json;

fn settings(cli_dir: PathBuf, tools: &[&str]) -> AgentSettings {
    AgentSettings {
        tools: tools.iter().map(|s| s.to_string()).collect(),
        max_steps: 10,
        cli_dir,
        ..AgentSettings::default()
    }
}

fn input(text: &str, resume: bool) -> TurnInput {
    TurnInput {
        messages: vec![text.to_string()],
        history: Vec::new(),
        resume,
    }
}

/// Runs one turn, collecting its events; prints how long it took.
fn turn(agent: &dyn Agent, b: &mut CliBox, input: &TurnInput) -> (TurnOutcome, Vec<AgentEvent>) {
    let cancel = CancelHandle::default();
    let mut events = Vec::new();
    let t0 = Instant::now();
    let out = agent.run_turn(b.lease(), input, &cancel, &mut |e| events.push(e));
    eprintln!(
        "{} turn: {:.2} s, ok={}",
        agent.name(),
        t0.elapsed().as_secs_f64(),
        out.ok
    );
    (out, events)
}

/// The keys were used where they belong and nowhere else: every model call
/// reached the fake with the real key (never a placeholder), and neither
/// key is in the events or the answer.
fn assert_sealed(
    b: &CliBox,
    fake: &FakeLlm,
    keys: &Keys,
    out: &TurnOutcome,
    events: &[AgentEvent],
) {
    // With the settings the adapters give, the CLIs try no other
    // connection (the door would refuse it and record it here).
    let other: Vec<String> = b
        .audit
        .records
        .lock()
        .unwrap()
        .iter()
        .map(|r| format!("{} {}:{} {}", r.kind, r.host, r.port, r.verdict))
        .collect();
    assert!(
        other.is_empty(),
        "the CLI tried to reach more than its API: {other:?}"
    );
    // Every model call went through the door's LLM proxy and was recorded.
    assert_eq!(
        b.audit.llm_records.lock().unwrap().len(),
        fake.calls().len()
    );
    let calls = fake.calls();
    assert!(!calls.is_empty(), "no model call reached the fake");
    for r in &calls {
        assert!(
            !r.raw.contains("sk-ant-moat-") && !r.raw.contains("sk-moat-"),
            "a placeholder reached upstream: {}",
            r.raw
        );
        let real = if r.path == "/v1/messages" {
            r.header("x-api-key").map(str::to_string)
        } else {
            r.header("authorization").map(str::to_string)
        };
        assert!(
            real.as_deref() == Some(keys.anthropic.as_str())
                || real.as_deref() == Some(format!("Bearer {}", keys.openai).as_str()),
            "{}",
            r.raw
        );
        assert_eq!(r.status, 200, "{}", r.raw);
    }
    let seen = format!("{out:?}{events:?}");
    for k in [&keys.anthropic, &keys.openai] {
        assert!(
            !seen.contains(k.as_str()),
            "a real key is in the turn's outcome or events"
        );
    }
}

// ---------------------------------------------------------------------------
// Claude Code
// ---------------------------------------------------------------------------

/// (a) A scripted turn: the model runs Bash (writes a marker in the
/// workspace), then answers with text that names the tool's output.
fn claude_code_turn(backend: Backend) {
    let keys = Keys::new();
    let marker = format!("RAN-{}", hex(6));
    let m = marker.clone();
    let fake = FakeLlm::start(
        &keys,
        Arc::new(move |_req: &Req, step: usize| match step {
            0 => Reply::tool(
                "Bash",
                json!({"command": format!("echo {m} > /workspace/out.txt && cat /workspace/out.txt"),
                       "description": "write the marker"}),
            ),
            _ => Reply::text(format!("Done: the file says {m}.")),
        }),
    );
    let mut b = CliBox::start(backend, None, &fake.url(), &keys);
    let agent = ClaudeCodeAgent::new(settings(claude_dir(), &["Bash", "Read"]));
    let (out, events) = turn(&agent, &mut b, &input("Write the marker file.", false));
    let ctx = format!("{out:#?}\n{events:#?}");
    assert!(out.ok && !out.cancelled, "{ctx}");
    assert_eq!(
        out.answer,
        format!("Done: the file says {marker}."),
        "{ctx}"
    );
    // The events: the call, its result (the tool's output), the final text, usage.
    assert!(
        events
            .iter()
            .any(|e| matches!(e, AgentEvent::ToolCall { name, summary }
            if name == "Bash" && summary.contains("out.txt"))),
        "{ctx}"
    );
    assert!(
        events.iter().any(
            |e| matches!(e, AgentEvent::ToolResult { name, ok: true, summary }
            if name == "Bash" && summary.contains(&marker))
        ),
        "{ctx}"
    );
    assert!(
        events.contains(&AgentEvent::Text(format!("Done: the file says {marker}."))),
        "{ctx}"
    );
    assert!(
        events.iter().any(
            |e| matches!(e, AgentEvent::Usage { input_tokens, output_tokens }
            if *input_tokens >= 200 && *output_tokens >= 20)
        ),
        "{ctx}"
    );
    // The command ran in the sandbox's workspace, and its output went back.
    assert_eq!(b.sh("cat /workspace/out.txt").1.trim(), marker);
    let calls = fake.calls();
    assert_eq!(calls.len(), 2, "{calls:#?}");
    assert!(
        calls[1].tool_results().iter().any(|r| r.contains(&marker)),
        "{:?}",
        calls[1].tool_results()
    );
    // Only the channel's tools were offered.
    let offered = calls[0].tool_names();
    assert!(offered.contains(&"Bash".to_string()) && offered.contains(&"Read".to_string()));
    for t in ["Write", "Edit", "WebFetch", "Agent", "Task"] {
        assert!(
            !offered.contains(&t.to_string()),
            "{t} offered: {offered:?}"
        );
    }
    // Inside, the key is the door's placeholder.
    let (_, key) = b.sh("printf %s \"$ANTHROPIC_API_KEY\"");
    assert!(key.starts_with("sk-ant-moat-"), "{key}");
    assert_sealed(&b, &fake, &keys, &out, &events);
}

/// (b) Bash is not allowed: the model calls it anyway; Claude Code refuses,
/// nothing runs, and the answer says so.
fn claude_code_refuses_a_tool(backend: Backend) {
    let keys = Keys::new();
    let marker = format!("/workspace/refused-{}", hex(6));
    let m = marker.clone();
    let fake = FakeLlm::start(
        &keys,
        Arc::new(move |_req: &Req, step: usize| match step {
            0 => Reply::tool(
                "Bash",
                json!({"command": format!("touch {m}"), "description": "x"}),
            ),
            _ => Reply::text("I could not run that."),
        }),
    );
    let mut b = CliBox::start(backend, None, &fake.url(), &keys);
    let agent = ClaudeCodeAgent::new(settings(claude_dir(), &["Read", "Write"]));
    let (out, events) = turn(&agent, &mut b, &input("Touch the file.", false));
    let ctx = format!("{out:#?}\n{events:#?}");
    assert!(
        events.contains(&AgentEvent::Refused {
            tool: "Bash".into(),
            reason: "not allowed in this channel".into()
        }),
        "{ctx}"
    );
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, AgentEvent::ToolResult { name, .. } if name == "Bash")),
        "{ctx}"
    );
    assert!(
        out.answer.starts_with("I could not run that.")
            && out
                .answer
                .ends_with("moat refused tool `Bash`: not allowed in this channel"),
        "{ctx}"
    );
    // Nothing ran: no marker in the workspace.
    let (code, _) = b.sh(&format!("test -e {marker}"));
    assert_eq!(code, 1, "the refused command ran: {ctx}");
    // The model was not offered Bash and was told the call failed.
    let calls = fake.calls();
    assert!(!calls[0].tool_names().contains(&"Bash".to_string()));
    assert!(
        calls[1]
            .tool_results()
            .iter()
            .any(|r| r.contains("\"is_error\":true")),
        "{:?}",
        calls[1].tool_results()
    );
    assert_sealed(&b, &fake, &keys, &out, &events);
}

/// (c) Per-thread resume: the second turn continues the first session (the
/// fake sees the first turn's messages); a turn without resume does not.
fn claude_code_resumes(backend: Backend) {
    let keys = Keys::new();
    let first_q = format!("first question {}", hex(4));
    let first_a = format!("first answer {}", hex(4));
    let a = first_a.clone();
    let fake = FakeLlm::start(
        &keys,
        Arc::new(move |req: &Req, _| {
            if req.raw.contains("second question") {
                Reply::text("second answer")
            } else {
                Reply::text(a.clone())
            }
        }),
    );
    let name = format!("resume-{}", hex(4));
    let mut b = CliBox::start(backend, Some(&name), &fake.url(), &keys);
    let agent = ClaudeCodeAgent::new(settings(claude_dir(), &["Read"]));
    let (out1, _) = turn(&agent, &mut b, &input(&first_q, true));
    assert!(out1.ok, "{out1:?}");
    assert_eq!(out1.answer, first_a);
    let (out2, ev2) = turn(&agent, &mut b, &input("second question", true));
    assert!(out2.ok, "{out2:?}");
    assert_eq!(out2.answer, "second answer");
    let calls = fake.calls();
    let second = calls.last().unwrap();
    assert!(
        second.raw.contains(&first_q) && second.raw.contains(&first_a),
        "the second turn did not continue the first: {}",
        second.raw
    );
    // Without resume (pool mode), a new session: the first turn is not sent.
    let (out3, _) = turn(&agent, &mut b, &input("second question again", false));
    assert!(out3.ok, "{out3:?}");
    let third = fake.calls().last().unwrap().clone();
    assert!(!third.raw.contains(&first_q), "{}", third.raw);
    assert_sealed(&b, &fake, &keys, &out2, &ev2);
}

const MCP_SERVER: &str = r#"import sys, json
for line in sys.stdin:
    try:
        m = json.loads(line)
    except Exception:
        continue
    if "id" not in m:
        continue
    meth = m.get("method")
    if meth == "initialize":
        r = {"protocolVersion": m["params"].get("protocolVersion", "2025-06-18"),
             "capabilities": {"tools": {}}, "serverInfo": {"name": "probe", "version": "1"}}
    elif meth == "tools/list":
        r = {"tools": [{"name": "whisper", "description": "Returns the word of the test server.",
                        "inputSchema": {"type": "object", "properties": {"q": {"type": "string"}}}}]}
    elif meth == "tools/call":
        r = {"content": [{"type": "text", "text": "MCPWORD-" + str(m["params"].get("arguments", {}).get("q"))}]}
    else:
        sys.stdout.write(json.dumps({"jsonrpc": "2.0", "id": m["id"], "error": {"code": -32601, "message": "no such method"}}) + "\n")
        sys.stdout.flush()
        continue
    sys.stdout.write(json.dumps({"jsonrpc": "2.0", "id": m["id"], "result": r}) + "\n")
    sys.stdout.flush()
"#;

/// Other MCP configurations the sandbox could plant: a project `.mcp.json`
/// in the workspace and user settings in the home directory, both naming a
/// "rogue" server (the same script). Only the channel's may be used.
fn plant_rogue_mcp(b: &mut CliBox) {
    let rogue = json!({"mcpServers": {"rogue": {"type": "stdio", "command": "python3",
        "args": ["/workspace/mcp_probe.py"]}}})
    .to_string();
    b.write("/workspace/.mcp.json", &rogue);
    b.write("/home/agent/.claude.json", &rogue);
    b.write(
        "/home/agent/.claude/settings.json",
        &json!({"enableAllProjectMcpServers": true, "permissions": {"allow": ["Bash", "mcp__rogue"]}})
            .to_string(),
    );
}

/// (d) Only the channel's MCP server is offered to the model, and its tool
/// works; with none configured, no MCP tool is offered at all.
fn claude_code_gets_only_the_channels_mcp(backend: Backend) {
    let keys = Keys::new();
    let fake = FakeLlm::start(
        &keys,
        Arc::new(|req: &Req, step: usize| {
            let offered = req.tool_names();
            match step {
                0 if offered.iter().any(|t| t == "mcp__probe__whisper") => {
                    Reply::tool("mcp__probe__whisper", json!({"q": "x7"}))
                }
                0 => Reply::text("no MCP tool here"),
                _ => Reply::text("the server answered"),
            }
        }),
    );
    let mut b = CliBox::start(backend, None, &fake.url(), &keys);
    b.write("/workspace/mcp_probe.py", MCP_SERVER);
    plant_rogue_mcp(&mut b);
    let mut s = settings(claude_dir(), &["Read"]);
    s.mcp = vec![moat_agent::protocol::McpServer {
        name: "probe".into(),
        command: vec!["python3".into(), "/workspace/mcp_probe.py".into()],
        env: Default::default(),
    }];
    let (out, events) = turn(
        &ClaudeCodeAgent::new(s),
        &mut b,
        &input("Ask the server.", false),
    );
    let ctx = format!("{out:#?}\n{events:#?}");
    assert!(out.ok, "{ctx}");
    assert_eq!(out.answer, "the server answered", "{ctx}");
    let calls = fake.calls();
    let offered = calls[0].tool_names();
    let mcp: Vec<&String> = offered.iter().filter(|t| t.starts_with("mcp__")).collect();
    assert_eq!(mcp, ["mcp__probe__whisper"], "{offered:?}");
    assert!(!offered.contains(&"Bash".to_string()), "{offered:?}");
    assert!(
        events.iter().any(
            |e| matches!(e, AgentEvent::ToolResult { name, ok: true, summary }
            if name == "mcp__probe__whisper" && summary.contains("MCPWORD-x7"))
        ),
        "{ctx}"
    );
    assert!(calls[1]
        .tool_results()
        .iter()
        .any(|r| r.contains("MCPWORD-x7")));

    // No MCP server configured: nothing MCP reaches the model, whatever the
    // sandbox planted.
    let (out, events) = turn(
        &ClaudeCodeAgent::new(settings(claude_dir(), &["Read"])),
        &mut b,
        &input("Ask the server.", false),
    );
    assert!(out.ok, "{out:?}");
    assert_eq!(out.answer, "no MCP tool here");
    let last = fake.calls().last().unwrap().clone();
    let offered = last.tool_names();
    assert!(
        !offered.iter().any(|t| t.starts_with("mcp__")),
        "an MCP tool was offered: {offered:?}"
    );
    assert!(!offered.contains(&"Bash".to_string()), "{offered:?}");
    assert_sealed(&b, &fake, &keys, &out, &events);
}

/// Settings files the sandbox can write (the agent has `Write`, or a
/// previous turn left them) must not run commands: Claude Code runs the
/// hooks of `~/.claude/settings.json` and `/workspace/.claude/settings.json`
/// whatever its tool list says. With moat's command line none runs.
fn claude_code_ignores_planted_hooks(backend: Backend) {
    let keys = Keys::new();
    let fake = FakeLlm::start(
        &keys,
        Arc::new(|_req: &Req, step: usize| match step {
            0 => Reply::tool("Read", json!({"file_path": "/workspace/readme.txt"})),
            _ => Reply::text("read it"),
        }),
    );
    let mut b = CliBox::start(backend, None, &fake.url(), &keys);
    b.write("/workspace/readme.txt", "hello\n");
    for (file, tag) in [
        ("/home/agent/.claude/settings.json", "user"),
        ("/workspace/.claude/settings.json", "project"),
        ("/workspace/.claude/settings.local.json", "local"),
    ] {
        let hook = |event: &str| {
            json!([{"matcher": "*", "hooks": [{"type": "command",
                "command": format!("touch /workspace/hook-{tag}-{event}")}]}])
        };
        let settings = json!({"hooks": {"UserPromptSubmit": hook("prompt"),
            "PreToolUse": hook("pre"), "PostToolUse": hook("post"), "Stop": hook("stop")}});
        b.write(file, &settings.to_string());
    }
    let agent = ClaudeCodeAgent::new(settings(claude_dir(), &["Read"]));
    let (out, events) = turn(&agent, &mut b, &input("Read the file.", false));
    let ctx = format!("{out:#?}\n{events:#?}");
    assert!(out.ok, "{ctx}");
    assert_eq!(out.answer, "read it");
    assert!(
        events
            .iter()
            .any(|e| matches!(e, AgentEvent::ToolResult { name, ok: true, .. } if name == "Read")),
        "the tool call the hooks would fire on did not happen: {ctx}"
    );
    // Listed by globbing (ls fails under this gVisor); the control file must
    // show, and nothing a hook would have made.
    let (code, ran) = b.sh(
        "touch /workspace/hook-control; for f in /workspace/hook-*; do [ -e \"$f\" ] && echo \"${f##*/}\"; done",
    );
    assert_eq!(code, 0, "{ran}");
    assert_eq!(
        ran, "hook-control\n",
        "a planted hook ran (or the listing failed): {ran}"
    );
    assert_sealed(&b, &fake, &keys, &out, &events);
}

/// (f) Cancel: the model runs a long command; cancelling the turn stops it
/// and leaves no process of the lease.
fn claude_code_cancel(backend: Backend) {
    let keys = Keys::new();
    // A duration no other program uses, to find stray processes by.
    let secs = format!(
        "300.{}",
        100000 + (u32::from_str_radix(&hex(2), 16).unwrap() % 800000)
    );
    let s2 = secs.clone();
    let fake = FakeLlm::start(
        &keys,
        Arc::new(move |_req: &Req, step: usize| match step {
            // (Claude Code refuses a bare `sleep N` as a way to wait.)
            0 => Reply::tool(
                "Bash",
                json!({"command": format!("python3 -c 'import time; time.sleep({s2})'"),
                       "description": "wait"}),
            ),
            _ => Reply::text("finished waiting"),
        }),
    );
    let mut b = CliBox::start(backend, None, &fake.url(), &keys);
    let agent = ClaudeCodeAgent::new(settings(claude_dir(), &["Bash"]));
    let cancel = CancelHandle::default();
    let (tx, rx) = mpsc::channel();
    let c2 = cancel.clone();
    let t0 = Instant::now();
    let (out, events, procs) = std::thread::scope(|sc| {
        let h = sc.spawn(|| {
            let mut events = Vec::new();
            let out = agent.run_turn(b.lease(), &input("Wait a while.", false), &c2, &mut |e| {
                if matches!(e, AgentEvent::ToolCall { .. }) {
                    let _ = tx.send(());
                }
                events.push(e);
            });
            (out, events)
        });
        rx.recv_timeout(Duration::from_secs(60))
            .expect("the tool call never came");
        // Let the command start, then stop the turn.
        std::thread::sleep(Duration::from_millis(1500));
        let sleeping = host_processes_with(&secs);
        cancel.cancel();
        let (out, events) = h.join().unwrap();
        (out, events, sleeping)
    });
    let took = t0.elapsed();
    eprintln!("cancelled turn returned after {:.2} s", took.as_secs_f64());
    let ctx = format!("{out:#?}\n{events:#?}");
    assert!(out.cancelled && !out.ok, "{ctx}");
    assert!(out.answer.ends_with("moat: stopped"), "{ctx}");
    assert!(took < Duration::from_secs(60), "cancel took {took:?}");
    if backend == Backend::Bwrap {
        // The command was really running on the host before the cancel.
        assert!(!procs.is_empty(), "the sleep never started: {ctx}");
    }
    assert!(
        b.processes().is_empty(),
        "processes left in the lease: {:?}",
        b.processes()
    );
    assert!(host_processes_with(&secs).is_empty(), "the sleep survived");
    assert_eq!(fake.calls().len(), 1, "the turn went on after the cancel");
}

// ---------------------------------------------------------------------------
// Codex
// ---------------------------------------------------------------------------

/// Whether Codex's `exec` tool (its JavaScript tool that calls the others)
/// declares the nested tool `name` to the model.
fn codex_declares(req: &Req, name: &str) -> bool {
    let mut found = false;
    for i in req.body["input"].as_array().into_iter().flatten() {
        for ns in i["tools"].as_array().into_iter().flatten() {
            for t in ns["tools"].as_array().into_iter().flatten() {
                if t["name"] == "exec" {
                    found |= t["description"]
                        .as_str()
                        .is_some_and(|d| d.contains(&format!("### `{name}`")));
                }
            }
        }
    }
    found
}

/// (e) A scripted Codex turn with a command execution through the adapter.
fn codex_turn(backend: Backend) {
    let keys = Keys::new();
    let marker = format!("CODEX-{}", hex(6));
    let m = marker.clone();
    let fake = FakeLlm::start(
        &keys,
        Arc::new(move |_req: &Req, step: usize| match step {
            0 => Reply::codex_shell(&format!(
                "echo {m} > /workspace/codex-out.txt && cat /workspace/codex-out.txt"
            )),
            _ => Reply::text(format!("Codex wrote {m}.")),
        }),
    );
    let mut b = CliBox::start(backend, None, &fake.url(), &keys);
    let mut s = settings(codex_dir(), &["shell"]);
    s.persona = Some("PERSONA-MARK: answer briefly.".into());
    let (out, events) = turn(
        &CodexAgent::new(s),
        &mut b,
        &input("Write the marker.", false),
    );
    let ctx = format!("{out:#?}\n{events:#?}");
    assert!(out.ok && !out.cancelled, "{ctx}");
    assert_eq!(out.answer, format!("Codex wrote {marker}."), "{ctx}");
    assert!(
        events
            .iter()
            .any(|e| matches!(e, AgentEvent::ToolCall { name, summary }
            if name == "shell" && summary.contains("codex-out.txt"))),
        "{ctx}"
    );
    assert!(
        events.iter().any(
            |e| matches!(e, AgentEvent::ToolResult { name, ok: true, summary }
            if name == "shell" && summary.contains(&marker))
        ),
        "{ctx}"
    );
    assert!(
        events.iter().any(|e| matches!(e, AgentEvent::Usage { .. })),
        "{ctx}"
    );
    assert_eq!(b.sh("cat /workspace/codex-out.txt").1.trim(), marker);
    let calls = fake.calls();
    assert_eq!(calls.len(), 2, "{calls:#?}");
    assert!(
        calls[0].raw.contains("PERSONA-MARK"),
        "the persona did not reach the model"
    );
    assert!(codex_declares(&calls[0], "exec_command"));
    // No hosted tool that would reach the web outside the door (web search
    // runs at OpenAI, not in the sandbox).
    assert!(
        calls.iter().all(|c| !c.raw.contains("web_search")),
        "Codex offered the model web search"
    );
    assert!(calls[1].tool_results().iter().any(|r| r.contains(&marker)));
    assert_sealed(&b, &fake, &keys, &out, &events);
}

/// Codex without `shell` in the channel's tools: its shell tool does not
/// exist, the model's command fails inside Codex and nothing runs.
fn codex_without_shell(backend: Backend) {
    let keys = Keys::new();
    let marker = format!("/workspace/noshell-{}", hex(6));
    let m = marker.clone();
    let fake = FakeLlm::start(
        &keys,
        Arc::new(move |_req: &Req, step: usize| match step {
            0 => Reply::codex_shell(&format!("touch {m}")),
            _ => Reply::text("No shell here."),
        }),
    );
    let mut b = CliBox::start(backend, None, &fake.url(), &keys);
    let (out, events) = turn(
        &CodexAgent::new(settings(codex_dir(), &["apply_patch"])),
        &mut b,
        &input("Touch the file.", false),
    );
    let ctx = format!("{out:#?}\n{events:#?}");
    assert!(out.ok, "{ctx}");
    assert_eq!(out.answer, "No shell here.");
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, AgentEvent::ToolCall { name, .. } if name == "shell")),
        "{ctx}"
    );
    assert_eq!(
        b.sh(&format!("test -e {marker}")).0,
        1,
        "the command ran: {ctx}"
    );
    let calls = fake.calls();
    assert!(
        !codex_declares(&calls[0], "exec_command") && codex_declares(&calls[0], "apply_patch"),
        "exec_command was offered to the model"
    );
    assert!(
        calls[1]
            .tool_results()
            .iter()
            .any(|r| r.contains("exec_command is not a function")),
        "{:?}",
        calls[1].tool_results()
    );
    assert_sealed(&b, &fake, &keys, &out, &events);
}

/// The sandbox's own `~/.codex/config.toml` is not loaded: its `notify`
/// program would run a command after the turn even with the shell off.
fn codex_ignores_a_planted_config(backend: Backend) {
    let keys = Keys::new();
    let fake = FakeLlm::start(&keys, Arc::new(|_req: &Req, _| Reply::text("hello")));
    let mut b = CliBox::start(backend, None, &fake.url(), &keys);
    b.write(
        "/home/agent/.codex/config.toml",
        "notify = [\"touch\", \"/workspace/notified\"]\n",
    );
    let (out, events) = turn(
        &CodexAgent::new(settings(codex_dir(), &[])),
        &mut b,
        &input("Say hello.", false),
    );
    assert!(out.ok, "{out:?}");
    assert_eq!(out.answer, "hello");
    // notify runs when the turn ends; give a stray one time to show up.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        b.sh("test -e /workspace/notified").0,
        1,
        "the planted notify ran"
    );
    assert_sealed(&b, &fake, &keys, &out, &events);
}

/// Codex resume: the second turn continues the first thread.
fn codex_resumes(backend: Backend) {
    let keys = Keys::new();
    let first_q = format!("first question {}", hex(4));
    let fake = FakeLlm::start(
        &keys,
        Arc::new(|req: &Req, _| {
            if req.raw.contains("second question") {
                Reply::text("second answer")
            } else {
                Reply::text("first answer")
            }
        }),
    );
    let name = format!("cx-resume-{}", hex(4));
    let mut b = CliBox::start(backend, Some(&name), &fake.url(), &keys);
    let agent = CodexAgent::new(settings(codex_dir(), &["shell"]));
    let (out1, _) = turn(&agent, &mut b, &input(&first_q, true));
    assert_eq!(
        (out1.ok, out1.answer.as_str()),
        (true, "first answer"),
        "{out1:?}"
    );
    let (out2, ev2) = turn(&agent, &mut b, &input("second question", true));
    assert_eq!(
        (out2.ok, out2.answer.as_str()),
        (true, "second answer"),
        "{out2:?}"
    );
    let last = fake.calls().last().unwrap().clone();
    assert!(
        last.raw.contains(&first_q) && last.raw.contains("first answer"),
        "the second turn did not continue the first: {}",
        last.raw
    );
    assert_sealed(&b, &fake, &keys, &out2, &ev2);
}

/// Cancel while Codex waits on the model (the fake holds the response).
fn codex_cancel(backend: Backend) {
    let keys = Keys::new();
    let fake = FakeLlm::start(&keys, Arc::new(|_req: &Req, _| Reply::Hang));
    let mut b = CliBox::start(backend, None, &fake.url(), &keys);
    let agent = CodexAgent::new(settings(codex_dir(), &["shell"]));
    let cancel = CancelHandle::default();
    let c2 = cancel.clone();
    let out = std::thread::scope(|sc| {
        let h =
            sc.spawn(|| agent.run_turn(b.lease(), &input("Anything.", false), &c2, &mut |_| {}));
        let t0 = Instant::now();
        while fake.calls().is_empty() && t0.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(!fake.calls().is_empty(), "Codex never called the model");
        cancel.cancel();
        h.join().unwrap()
    });
    assert!(out.cancelled && !out.ok, "{out:?}");
    assert!(
        b.processes().is_empty(),
        "processes left: {:?}",
        b.processes()
    );
}

// ---------------------------------------------------------------------------
// Failures the user must be told about
// ---------------------------------------------------------------------------

/// A CLI that is not there: the turn still answers, saying what happened.
fn missing_cli_answers(backend: Backend) {
    let keys = Keys::new();
    let fake = FakeLlm::start(&keys, Arc::new(|_req: &Req, _| Reply::text("unused")));
    let mut b = CliBox::start(backend, None, &fake.url(), &keys);
    let agent = ClaudeCodeAgent::new(settings(PathBuf::from("/nonexistent/clis"), &["Read"]));
    let (out, events) = turn(&agent, &mut b, &input("hi", false));
    assert!(!out.ok && !out.cancelled, "{out:?}");
    assert!(
        out.answer.starts_with(
            "moat: Claude Code stopped before finishing its turn (command exited with status 127)"
        ),
        "{out:?}"
    );
    assert!(
        out.answer.contains("/nonexistent/clis/bin/claude"),
        "{out:?}"
    );
    assert!(events.iter().any(|e| matches!(e, AgentEvent::Error(_))));
    assert!(fake.calls().is_empty());
}

/// docs/threat-model.md C1, C2: Amp through the door. The door serves Amp
/// (its real key, a fake Amp service on 127.0.0.1 as upstream); the
/// stand-in `amp` (tests/ampkit: Amp's CLI itself cannot finish a turn
/// offline) runs through the adapter, makes the CLI's first call
/// (`POST /api/internal?getUserInfo` with `Authorization: Bearer
/// $AMP_API_KEY`) to https://ampcode.com and answers in Amp's stream JSON.
/// The turn answers with what the fake said; the fake saw the real key and
/// never the placeholder; the sandbox (environment, /proc, files) holds
/// only the placeholder; a stolen key sent from inside gets 401 from the
/// door and never reaches the fake; both are audit records.
fn amp_turn(backend: Backend) {
    let keys = Keys::new();
    let llm = FakeLlm::start(&keys, Arc::new(|_req: &Req, _| Reply::text("unused")));
    let real = ampkit::real_key();
    let amp = ampkit::FakeAmp::start(&real);
    let mut b = CliBox::start_with(backend, None, &llm.url(), &keys, Some((&amp.url(), &real)));
    let (code, out) = b.sh(&format!(
        "mkdir -p /home/agent/fakeamp/bin && cat > /home/agent/fakeamp/bin/amp <<'MOATEOF'\n{}MOATEOF\nchmod 755 /home/agent/fakeamp/bin/amp",
        ampkit::FAKE_AMP
    ));
    assert_eq!(code, 0, "{out}");
    let agent = AmpAgent::new(settings(PathBuf::from("/home/agent/fakeamp"), &["Bash"]));
    let (out, events) = turn(&agent, &mut b, &input("hi", false));
    assert!(out.ok, "{out:?} {events:?}");
    assert!(
        out.answer.contains(&format!(
            "Amp answers as {} (settings: tools-limited;",
            ampkit::FAKE_USER
        )),
        "{}",
        out.answer
    );
    let seen = amp.requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].path, "/api/internal?getUserInfo");
    assert_eq!(seen[0].authorization, [format!("Bearer {real}")]);

    // Everything readable inside, dumped for the host to search.
    let (code, dump) = b.sh(
        "env; for f in /proc/[0-9]*/environ /proc/[0-9]*/cmdline; do cat \"$f\" 2>/dev/null; echo; done; \
         find /workspace /home/agent /tmp /etc /run/moat -xdev -type f -size -4M -exec cat {} + 2>/dev/null; echo; echo SCAN-DONE",
    );
    assert_eq!(code, 0);
    assert!(dump.trim_end().ends_with("SCAN-DONE"));
    let ph = dump
        .lines()
        .find_map(|l| l.strip_prefix("AMP_API_KEY="))
        .expect("the placeholder in the environment")
        .to_string();
    assert!(ph.starts_with("sgamp_moat_") && ph != real, "{ph}");
    assert!(dump.contains("AMP_URL=https://ampcode.com"));
    assert!(dump.contains("root:"), "/etc/passwd was not read");
    assert!(!dump.contains(&real), "the real Amp key is readable inside");
    assert!(
        seen.iter().all(|r| !r.raw.contains(&ph)),
        "the placeholder reached Amp's service"
    );

    // A stolen (or any other) key from inside: refused by the door.
    let (_, code) = b.sh(
        "curl -sS -o /dev/null -w '%{http_code}' -X POST -H 'Authorization: Bearer sgamp_user_stolen' 'https://ampcode.com/api/internal?getUserInfo'",
    );
    assert_eq!(code.trim(), "401");
    let (_, code) = b.sh(
        "curl -sS -o /dev/null -w '%{http_code}' -H 'X-Api-Key: sgamp_user_stolen' 'https://ampcode.com/api/internal?getUserInfo'",
    );
    assert_eq!(code.trim(), "401");
    assert_eq!(
        amp.requests().len(),
        1,
        "a refused request reached the fake"
    );
    let verdicts: Vec<(&str, u16)> = b
        .audit
        .github_records
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.kind == "amp")
        .map(|r| (r.verdict, r.status))
        .collect();
    assert_eq!(
        verdicts,
        [("allowed", 200), ("denied", 401), ("denied", 401)]
    );
    let records = format!("{:?}", b.audit.github_records.lock().unwrap());
    assert!(!records.contains(&real) && !records.contains(&ph));
}

/// Amp's real CLI (the pinned `@ampcode/cli`) through the adapter and the
/// door: it trusts the lease CA, reaches https://ampcode.com through the
/// door, and its start-up calls reach the fake Amp service with the real
/// key (never the placeholder). The fake does not serve Amp's threads
/// (their agent loop runs on Amp's servers), so the turn ends with the
/// CLI's error, which the answer reports.
fn amp_cli_through_the_door(backend: Backend) {
    let cli = amp_dir();
    let keys = Keys::new();
    let llm = FakeLlm::start(&keys, Arc::new(|_req: &Req, _| Reply::text("unused")));
    let real = ampkit::real_key();
    let amp = ampkit::FakeAmp::start(&real);
    let mut b = CliBox::start_with(backend, None, &llm.url(), &keys, Some((&amp.url(), &real)));
    let agent = AmpAgent::new(settings(cli, &["Bash"]));
    let (out, events) = turn(&agent, &mut b, &input("hi", false));
    assert!(!out.ok, "the fake serves no thread: {out:?}");
    let seen = amp.requests();
    assert!(
        seen.first()
            .is_some_and(|r| r.path == "/api/internal?getUserInfo"),
        "{seen:?} {events:?}"
    );
    for r in &seen {
        assert_eq!(r.authorization, [format!("Bearer {real}")], "{}", r.path);
    }
    let ph = b.sh("printf %s \"$AMP_API_KEY\"").1;
    assert!(ph.starts_with("sgamp_moat_"), "{ph}");
    assert!(seen.iter().all(|r| !r.raw.contains(&ph)));
    eprintln!(
        "Amp's CLI sent: {:?}",
        seen.iter()
            .map(|r| format!("{} {}", r.method, r.path))
            .collect::<Vec<_>>()
    );
}

// ---------------------------------------------------------------------------
// Pi
// ---------------------------------------------------------------------------

/// A scripted Pi turn (Anthropic, streamed): bash writes a marker, then an
/// answer. The real key stays in the door: inside there is the placeholder,
/// and Pi's configuration holds only the variable's name.
fn pi_turn(backend: Backend) {
    let keys = Keys::new();
    let marker = format!("PI-{}", hex(6));
    let m = marker.clone();
    let fake = FakeLlm::start(
        &keys,
        Arc::new(move |_req: &Req, step: usize| match step {
            0 => Reply::tool(
                "bash",
                json!({"command": format!("echo {m} > /workspace/pi-out.txt && cat /workspace/pi-out.txt")}),
            ),
            _ => Reply::text(format!("Pi wrote {m}.")),
        }),
    );
    let mut b = CliBox::start(backend, None, &fake.url(), &keys);
    let mut s = settings(pi_dir(), &["bash", "read_file"]);
    s.persona = Some("PERSONA-MARK: answer briefly.".into());
    s.model = Some("claude-sonnet-4-5".into());
    let (out, events) = turn(&PiAgent::new(s), &mut b, &input("Write the marker.", false));
    let ctx = format!("{out:#?}\n{events:#?}");
    assert!(out.ok && !out.cancelled, "{ctx}");
    assert_eq!(out.answer, format!("Pi wrote {marker}."), "{ctx}");
    assert!(
        events
            .iter()
            .any(|e| matches!(e, AgentEvent::ToolCall { name, summary }
            if name == "bash" && summary.contains("pi-out.txt"))),
        "{ctx}"
    );
    assert!(
        events.iter().any(
            |e| matches!(e, AgentEvent::ToolResult { name, ok: true, summary }
            if name == "bash" && summary.contains(&marker))
        ),
        "{ctx}"
    );
    assert!(
        events.iter().any(|e| matches!(e, AgentEvent::Usage { .. })),
        "{ctx}"
    );
    assert_eq!(b.sh("cat /workspace/pi-out.txt").1.trim(), marker);
    let calls = fake.calls();
    assert_eq!(calls.len(), 2, "{calls:#?}");
    assert_eq!(calls[0].path, "/v1/messages");
    assert_eq!(calls[0].body["model"], "claude-sonnet-4-5");
    assert!(
        calls[0].raw.contains("PERSONA-MARK"),
        "the persona did not reach the model"
    );
    let mut offered = calls[0].tool_names();
    offered.sort();
    assert_eq!(offered, ["bash", "read"], "only the channel's tools");
    assert!(calls[1].tool_results().iter().any(|r| r.contains(&marker)));
    // Inside: the placeholder, and no real key in the environment or in
    // anything Pi keeps in the home directory.
    let (_, key) = b.sh("printf %s \"$ANTHROPIC_API_KEY\"");
    assert!(key.starts_with("sk-ant-moat-"), "{key}");
    let (code, home) = b.sh(
        "cat ~/.moat/pi/models.json; env; find ~/.moat/pi-sessions -name '*.jsonl' -exec cat {} +",
    );
    assert_eq!(code, 0, "{home}");
    assert!(home.contains("\"apiKey\":\"ANTHROPIC_API_KEY\""), "{home}");
    assert!(home.contains(&marker), "the session was not kept: {home}");
    for k in [&keys.anthropic, &keys.openai] {
        assert!(
            !home.contains(k.as_str()),
            "a real key is inside the sandbox"
        );
    }
    assert_sealed(&b, &fake, &keys, &out, &events);
}

/// `bash` is not allowed: the model calls it anyway; Pi has no such tool,
/// nothing runs, and the answer says so.
fn pi_refuses_a_tool(backend: Backend) {
    let keys = Keys::new();
    let marker = format!("/workspace/refused-{}", hex(6));
    let m = marker.clone();
    let fake = FakeLlm::start(
        &keys,
        Arc::new(move |_req: &Req, step: usize| match step {
            0 => Reply::tool("bash", json!({"command": format!("touch {m}")})),
            _ => Reply::text("I could not run that."),
        }),
    );
    let mut b = CliBox::start(backend, None, &fake.url(), &keys);
    let agent = PiAgent::new(settings(pi_dir(), &["read", "ls"]));
    let (out, events) = turn(&agent, &mut b, &input("Touch the file.", false));
    let ctx = format!("{out:#?}\n{events:#?}");
    assert!(
        events.contains(&AgentEvent::Refused {
            tool: "bash".into(),
            reason: "not allowed in this channel".into()
        }),
        "{ctx}"
    );
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, AgentEvent::ToolResult { name, .. } if name == "bash")),
        "{ctx}"
    );
    assert_eq!(
        out.answer,
        "I could not run that.\n\nmoat refused tool `bash`: not allowed in this channel",
        "{ctx}"
    );
    let (code, _) = b.sh(&format!("test -e {marker}"));
    assert_eq!(code, 1, "the refused command ran: {ctx}");
    let calls = fake.calls();
    assert!(!calls[0].tool_names().contains(&"bash".to_string()));
    assert_sealed(&b, &fake, &keys, &out, &events);
}

/// The sandbox plants Pi extensions (TypeScript that would run inside Pi at
/// start, whatever the tool list) in the project and in the configuration
/// directory, and a settings file naming them: none runs.
fn pi_ignores_planted_extensions(backend: Backend) {
    let keys = Keys::new();
    let fake = FakeLlm::start(&keys, Arc::new(|_: &Req, _| Reply::text("ok")));
    let mut b = CliBox::start(backend, None, &fake.url(), &keys);
    let ext = "import { writeFileSync } from 'node:fs';\n\
               export default function () { writeFileSync('/workspace/PLANTED-RAN', 'x'); }\n";
    b.write("/workspace/.pi/extensions/evil.ts", ext);
    b.write("/home/agent/.moat/pi/extensions/evil.ts", ext);
    b.write(
        "/workspace/.pi/settings.json",
        r#"{"extensions": ["/workspace/.pi/extensions/evil.ts"], "packages": ["npm:left-pad"]}"#,
    );
    let agent = PiAgent::new(settings(pi_dir(), &["read"]));
    let (out, events) = turn(&agent, &mut b, &input("Hello.", false));
    let ctx = format!("{out:#?}\n{events:#?}");
    assert!(out.ok, "{ctx}");
    assert_eq!(out.answer, "ok");
    let (code, _) = b.sh("test -e /workspace/PLANTED-RAN");
    assert_eq!(code, 1, "a planted extension ran: {ctx}");
    assert_sealed(&b, &fake, &keys, &out, &events);
}

/// Per-thread resume: the second turn continues the first session.
fn pi_resumes(backend: Backend) {
    let keys = Keys::new();
    let fake = FakeLlm::start(
        &keys,
        Arc::new(|req: &Req, _| {
            if req.raw.contains("second question") {
                Reply::text("second answer")
            } else {
                Reply::text("first answer")
            }
        }),
    );
    let mut b = CliBox::start(backend, Some("pi-thread"), &fake.url(), &keys);
    let agent = PiAgent::new(settings(pi_dir(), &["read"]));
    let (out, _) = turn(&agent, &mut b, &input("first question", true));
    assert_eq!(out.answer, "first answer", "{out:?}");
    let (out, _) = turn(&agent, &mut b, &input("second question", true));
    assert_eq!(out.answer, "second answer", "{out:?}");
    let calls = fake.calls();
    let last = calls.last().unwrap();
    for want in ["first question", "first answer", "second question"] {
        assert!(last.raw.contains(want), "{want} missing: {}", last.raw);
    }
}

cli_tests! {
    claude_code_completes_a_scripted_turn_through_the_adapter => claude_code_turn;
    claude_code_refuses_a_tool_the_channel_does_not_allow => claude_code_refuses_a_tool;
    claude_code_resume_continues_the_previous_session => claude_code_resumes;
    claude_code_gets_only_the_channels_mcp_servers => claude_code_gets_only_the_channels_mcp;
    claude_code_cancel_stops_the_turn_and_its_processes => claude_code_cancel;
    claude_code_runs_no_hook_the_sandbox_planted => claude_code_ignores_planted_hooks;
    codex_loads_no_config_the_sandbox_planted => codex_ignores_a_planted_config;
    codex_completes_a_scripted_turn_with_a_command => codex_turn;
    codex_without_shell_in_the_allowlist_runs_no_command => codex_without_shell;
    codex_resume_continues_the_previous_thread => codex_resumes;
    codex_cancel_while_waiting_on_the_model => codex_cancel;
    a_missing_cli_still_answers => missing_cli_answers;
    attack_c1_amp_key_stays_in_the_door_and_a_turn_answers => amp_turn;
    amps_real_cli_reaches_the_service_through_the_door_with_the_real_key => amp_cli_through_the_door;
    pi_completes_a_scripted_turn_through_the_door => pi_turn;
    pi_refuses_a_tool_the_channel_does_not_allow => pi_refuses_a_tool;
    pi_loads_no_extension_the_sandbox_planted => pi_ignores_planted_extensions;
    pi_resume_continues_the_previous_session => pi_resumes;
}
