//! The built-in agent end to end: `moat agent-run` inside a real sandbox
//! (bwrap and gVisor), its LLM calls through the lease's door (the LLM proxy
//! swaps the placeholder for the real key) to a scripted fake Anthropic or
//! OpenAI upstream on 127.0.0.1, driven from the host by the gateway's
//! `BuiltinAgent` exactly as a channel would.
//!
//! What they check: a multi-step turn lists files, writes one and answers
//! (both APIs); the fake saw the real key on every call and never the
//! placeholder, and the sandbox only ever held the placeholder; a tool the
//! channel does not allow is refused before it runs and the user is told;
//! cancel stops the turn and every process of the sandbox; a second turn
//! with `resume` continues the first one's conversation; the step limit
//! ends the turn with an answer that says so; a missing agent binary still
//! gives an answer; overloaded and rate-limited calls are retried (the
//! status line says so) and a call that keeps failing ends the turn after
//! three attempts.

mod llmkit;

use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use llmkit::*;
use moat_agent::protocol::Provider;
use moat_gateway::agent::builtin::{BuiltinAgent, MOAT_INSIDE};
use moat_gateway::agent::{Agent, AgentEvent, AgentSettings, CancelHandle, TurnInput, TurnOutcome};
use moat_policy::BackendKind;
use serde_json::{json, Value};

const MOAT: &str = env!("CARGO_BIN_EXE_moat");

/// Whether the backend's runtime is installed; a missing one fails the test
/// when MOAT_TEST_REQUIRE_ALL is set (CI), else skips it.
fn available(b: BackendKind) -> bool {
    let bin = match b {
        BackendKind::Bwrap => "bwrap",
        BackendKind::Gvisor => "runsc",
        BackendKind::Local => return true,
    };
    let found = Command::new(bin).arg("--version").output().is_ok();
    if !found && std::env::var_os("MOAT_TEST_REQUIRE_ALL").is_some() {
        panic!("{bin} is required (MOAT_TEST_REQUIRE_ALL is set) but not installed");
    }
    found
}

macro_rules! backend_tests {
    ($($name:ident => $body:expr;)*) => {
        mod bwrap {
            use super::*;
            $( #[test] fn $name() { if available(BackendKind::Bwrap) { ($body)(BackendKind::Bwrap) } } )*
        }
        mod gvisor {
            use super::*;
            $( #[test] fn $name() { if available(BackendKind::Gvisor) { ($body)(BackendKind::Gvisor) } } )*
        }
    };
}

fn settings(provider: Provider, tools: &[&str]) -> AgentSettings {
    AgentSettings {
        provider: Some(provider),
        tools: tools.iter().map(|s| s.to_string()).collect(),
        max_steps: 10,
        persona: Some("You are moat's test agent.".into()),
        ..Default::default()
    }
}

fn turn(
    bx: &mut AgentBox,
    agent: &BuiltinAgent,
    text: &str,
    resume: bool,
    cancel: &CancelHandle,
) -> (TurnOutcome, Vec<AgentEvent>) {
    let mut events = Vec::new();
    let input = TurnInput {
        messages: vec![text.to_string()],
        history: vec![],
        resume,
    };
    let t0 = Instant::now();
    let out = agent.run_turn(bx.lease(), &input, cancel, &mut |e| events.push(e));
    eprintln!("turn: {:.0} ms", t0.elapsed().as_secs_f64() * 1000.0);
    (out, events)
}

fn script(f: impl Fn(&Req, usize) -> Reply + Send + Sync + 'static) -> Script {
    Arc::new(f)
}

/// Every file below `dir` (the lease's home and workspace on the host).
fn all_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(p),
                Ok(t) if t.is_file() => out.push((
                    p.display().to_string(),
                    std::fs::read(&p).unwrap_or_default(),
                )),
                _ => {}
            }
        }
    }
    out
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// A list_files, write_file, answer turn through the given provider.
fn multi_step_turn(b: BackendKind, provider: Provider) {
    let keys = Keys::new();
    let marker = format!("MADE-{}", hex(8));
    let answer = format!("I wrote made.txt ({marker}).");
    let (m, a) = (marker.clone(), answer.clone());
    let fake = FakeLlm::start(
        &keys.anthropic,
        &keys.openai,
        script(move |_, step| match step {
            0 => Reply::tool("list_files", json!({})),
            1 => Reply::tool("write_file", json!({"path": "made.txt", "content": m})),
            _ => Reply::text(a.clone()),
        }),
    );
    let mut bx = AgentBox::start(b, Path::new(MOAT), None, &fake.url(), &keys);
    assert_eq!(bx.sh("echo seed > /workspace/seed.txt").0, 0);
    let agent = BuiltinAgent::new(
        settings(provider, &["list_files", "write_file", "read_file"]),
        MOAT_INSIDE,
    );
    let (out, events) = turn(
        &mut bx,
        &agent,
        "Make a file.",
        false,
        &CancelHandle::default(),
    );
    let ctx = format!("{out:?}\n{events:#?}");
    assert!(out.ok && !out.cancelled, "{ctx}");
    assert_eq!(out.answer, answer, "{ctx}");

    // The file is in the lease's workspace, written by the sandbox.
    let ws = bx.lease().workspace_dir();
    assert_eq!(
        std::fs::read_to_string(ws.join("made.txt")).unwrap_or_default(),
        marker,
        "{ctx}"
    );

    // Events show both calls and their results.
    let calls: Vec<&str> = events
        .iter()
        .filter_map(|e| match e {
            AgentEvent::ToolCall { name, .. } => Some(name.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(calls, ["list_files", "write_file"], "{ctx}");
    assert!(
        events.contains(&AgentEvent::ToolResult {
            name: "list_files".into(),
            ok: true,
            summary: "seed.txt".into()
        }),
        "{ctx}"
    );
    assert!(events
        .iter()
        .any(|e| matches!(e, AgentEvent::Usage { input_tokens, .. } if *input_tokens > 0)));

    // Upstream: three calls, each with the real key and never a placeholder.
    let reqs = fake.requests();
    assert_eq!(reqs.len(), 3, "{reqs:#?}");
    let (real, other) = match provider {
        Provider::Anthropic => (&keys.anthropic, &keys.openai),
        Provider::Openai => (&keys.openai, &keys.anthropic),
    };
    for r in &reqs {
        assert_eq!(r.status, 200, "{}", r.raw);
        match provider {
            Provider::Anthropic => {
                assert_eq!(r.path, "/v1/messages");
                assert_eq!(r.header("x-api-key"), Some(real.as_str()));
                assert_eq!(r.header("anthropic-version"), Some("2023-06-01"));
                assert_eq!(r.body["model"], "claude-sonnet-4-5");
                assert_eq!(r.body["system"], "You are moat's test agent.");
            }
            Provider::Openai => {
                assert_eq!(r.path, "/v1/responses");
                assert_eq!(
                    r.header("authorization"),
                    Some(format!("Bearer {real}").as_str())
                );
                assert_eq!(r.body["model"], "gpt-5");
                assert_eq!(r.body["instructions"], "You are moat's test agent.");
            }
        }
        assert!(
            !r.raw.contains("sk-ant-moat-") && !r.raw.contains("sk-moat-"),
            "a placeholder reached upstream: {}",
            r.raw
        );
        assert!(
            !r.raw.contains(other.as_str()),
            "the other provider's key was sent"
        );
    }
    // The listing went back to the model as the first call's result.
    assert!(reqs[1].raw.contains("seed.txt"), "{}", reqs[1].raw);

    // Inside: only the placeholder, and the real keys nowhere in the lease's files.
    let (var, prefix) = match provider {
        Provider::Anthropic => ("ANTHROPIC_API_KEY", "sk-ant-moat-"),
        Provider::Openai => ("OPENAI_API_KEY", "sk-moat-"),
    };
    let (_, inside) = bx.sh(&format!("printf %s \"${var}\""));
    assert!(
        inside.starts_with(prefix) && inside.len() == prefix.len() + 32,
        "{inside:?}"
    );
    let files = all_bytes(&bx.lease().storage_dir());
    assert!(
        files
            .iter()
            .any(|(p, _)| p.ends_with(".moat-agent/session.json")),
        "the session was not saved: {:?}",
        files.iter().map(|(p, _)| p).collect::<Vec<_>>()
    );
    for (p, bytes) in &files {
        for k in [&keys.anthropic, &keys.openai] {
            assert!(!contains(bytes, k), "a real key is in {p}");
        }
    }
    for e in &events {
        let s = format!("{e:?}");
        assert!(!s.contains(&keys.anthropic) && !s.contains(&keys.openai) && !s.contains(&inside));
    }
    // The door audited every call, without keys.
    let llm = bx.audit.llm_records.lock().unwrap().clone();
    assert_eq!(llm.len(), 3);
    assert!(llm
        .iter()
        .all(|r| r.verdict == "allowed" && r.status == 200));
    let audit = format!("{llm:?}");
    assert!(
        !audit.contains(&keys.anthropic)
            && !audit.contains(&keys.openai)
            && !audit.contains(&inside)
    );
}

fn refused_turn(b: BackendKind) {
    let keys = Keys::new();
    let marker = format!("/workspace/refused-{}", hex(6));
    let cmd = format!("touch {marker}");
    let fake = FakeLlm::start(
        &keys.anthropic,
        &keys.openai,
        script(move |_, step| match step {
            0 => Reply::tool("bash", json!({"command": cmd})),
            _ => Reply::text("I was not allowed to run that."),
        }),
    );
    let mut bx = AgentBox::start(b, Path::new(MOAT), None, &fake.url(), &keys);
    let agent = BuiltinAgent::new(
        settings(Provider::Anthropic, &["list_files", "read_file"]),
        MOAT_INSIDE,
    );
    let (out, events) = turn(&mut bx, &agent, "Run it.", false, &CancelHandle::default());
    let ctx = format!("{out:?}\n{events:#?}");
    // Nothing ran: the file the command would make does not exist.
    let ws = bx.lease().workspace_dir();
    let name = marker.trim_start_matches("/workspace/");
    assert!(!ws.join(name).exists(), "the refused command ran: {ctx}");
    let (_, ls) = bx.sh("ls -a /workspace");
    assert!(!ls.contains(name), "{ls}");
    assert!(
        events.contains(&AgentEvent::Refused {
            tool: "bash".into(),
            reason: "not allowed in this channel".into()
        }),
        "{ctx}"
    );
    assert!(
        !events.iter().any(|e| matches!(
            e,
            AgentEvent::ToolCall { .. } | AgentEvent::ToolResult { .. }
        )),
        "{ctx}"
    );
    // The user is told.
    assert!(
        out.answer.contains("I was not allowed to run that."),
        "{ctx}"
    );
    assert!(
        out.answer
            .contains("moat refused tool `bash`: not allowed in this channel"),
        "{ctx}"
    );
    // bash was not offered, and the model got an error result.
    let reqs = fake.requests();
    assert_eq!(reqs.len(), 2);
    let offered: Vec<&str> = reqs[0].body["tools"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert_eq!(offered, ["read_file", "list_files"]);
    let result = reqs[1].body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["content"].as_array())
        .flatten()
        .find(|b| b["type"] == "tool_result")
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(result["is_error"], true, "{result}");
    assert!(
        result["content"]
            .as_str()
            .unwrap_or("")
            .contains("not allowed here"),
        "{result}"
    );
}

fn cancel_turn(b: BackendKind) {
    let keys = Keys::new();
    let tag = format!("moat-cancel-{}", hex(6));
    let cmd = format!("exec -a {tag} sleep 300");
    let fake = FakeLlm::start(
        &keys.anthropic,
        &keys.openai,
        script(move |_, step| match step {
            0 => Reply::tool("bash", json!({"command": cmd})),
            _ => Reply::text("slept"),
        }),
    );
    let mut bx = AgentBox::start(b, Path::new(MOAT), None, &fake.url(), &keys);
    bx.lease().start().unwrap();
    let cgroups = bx.lease().cgroup_paths();
    let agent = BuiltinAgent::new(settings(Provider::Anthropic, &["bash"]), MOAT_INSIDE);
    let cancel = CancelHandle::default();
    let (tx, rx) = mpsc::channel::<()>();
    let c2 = cancel.clone();
    let tag2 = tag.clone();
    let canceller = std::thread::spawn(move || {
        // The tool call started; give the command a moment, then cancel.
        rx.recv_timeout(Duration::from_secs(60))
            .expect("the tool call never started");
        if b == BackendKind::Bwrap {
            // bwrap's processes are host processes: wait until the tagged
            // sleep is seen running.
            let t0 = Instant::now();
            loop {
                let o = Command::new("pgrep").args(["-f", &tag2]).output().unwrap();
                if !o.stdout.is_empty() {
                    break;
                }
                assert!(
                    t0.elapsed() < Duration::from_secs(20),
                    "the tool's command never ran"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        } else {
            std::thread::sleep(Duration::from_millis(700));
        }
        let t = Instant::now();
        c2.cancel();
        t
    });
    let mut events = Vec::new();
    let input = TurnInput {
        messages: vec!["Sleep.".into()],
        ..Default::default()
    };
    let mut tx = Some(tx);
    let out = agent.run_turn(bx.lease(), &input, &cancel, &mut |e| {
        if matches!(e, AgentEvent::ToolCall { .. }) {
            if let Some(tx) = tx.take() {
                let _ = tx.send(());
            }
        }
        events.push(e);
    });
    let returned = Instant::now();
    let cancelled_at = canceller.join().unwrap();
    let took = returned.duration_since(cancelled_at);
    eprintln!("cancel to return: {took:?}");
    let ctx = format!("{out:?}\n{events:#?}");
    assert!(out.cancelled && !out.ok, "{ctx}");
    assert!(out.answer.contains("moat: stopped"), "{ctx}");
    assert!(took < Duration::from_secs(10), "cancel took {took:?}");
    // No process of the lease remains.
    let o = Command::new("pgrep").args(["-f", &tag]).output().unwrap();
    assert!(
        o.stdout.is_empty(),
        "still running: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(!cgroups.is_empty());
    for cg in &cgroups {
        let procs = std::fs::read_to_string(cg.join("cgroup.procs")).unwrap_or_default();
        assert!(
            procs.trim().is_empty(),
            "{} still has {procs}",
            cg.display()
        );
    }
    // The model never got a result: the turn ended at the tool call.
    assert_eq!(fake.requests().len(), 1);
}

fn resume_turns(b: BackendKind) {
    let keys = Keys::new();
    let fake = FakeLlm::start(
        &keys.anthropic,
        &keys.openai,
        script(|req, _| {
            let n = req.body["messages"].as_array().map_or(0, |m| m.len());
            Reply::text(if n == 1 {
                "first answer"
            } else {
                "second answer"
            })
        }),
    );
    let name = format!("resume-{}", hex(4));
    let mut bx = AgentBox::start(b, Path::new(MOAT), Some(&name), &fake.url(), &keys);
    let agent = BuiltinAgent::new(settings(Provider::Anthropic, &["read_file"]), MOAT_INSIDE);
    let (out, _) = turn(
        &mut bx,
        &agent,
        "first question",
        false,
        &CancelHandle::default(),
    );
    assert_eq!(out.answer, "first answer");
    // Idle between turns: nothing runs, the files stay.
    bx.lease().stop();
    let (out, ev) = turn(
        &mut bx,
        &agent,
        "second question",
        true,
        &CancelHandle::default(),
    );
    assert_eq!(out.answer, "second answer", "{ev:?}");
    let reqs = fake.requests();
    assert_eq!(reqs.len(), 2);
    let m = reqs[1].body["messages"].as_array().unwrap();
    let texts: Vec<String> = m
        .iter()
        .map(|x| x["content"][0]["text"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        texts,
        ["first question", "first answer", "second question"],
        "{m:?}"
    );
}

fn step_limit_turn(b: BackendKind) {
    let keys = Keys::new();
    let fake = FakeLlm::start(
        &keys.anthropic,
        &keys.openai,
        script(|_, step| {
            if step == 0 {
                Reply::Tools(vec![("list_files".into(), json!({}))])
            } else {
                Reply::Tools(vec![(
                    "write_file".into(),
                    json!({"path": "late.txt", "content": "x"}),
                )])
            }
        }),
    );
    let mut bx = AgentBox::start(b, Path::new(MOAT), None, &fake.url(), &keys);
    let mut s = settings(Provider::Anthropic, &["list_files", "write_file"]);
    s.max_steps = 2;
    let agent = BuiltinAgent::new(s, MOAT_INSIDE);
    let (out, events) = turn(
        &mut bx,
        &agent,
        "Loop forever.",
        false,
        &CancelHandle::default(),
    );
    let ctx = format!("{out:?}\n{events:#?}");
    assert!(out.ok, "{ctx}");
    assert!(out.answer.contains("step limit"), "{ctx}");
    assert_eq!(fake.requests().len(), 2, "{ctx}");
    // The call of the last step was not run.
    assert!(!bx.lease().workspace_dir().join("late.txt").exists());
}

fn missing_binary_turn(b: BackendKind) {
    let keys = Keys::new();
    let fake = FakeLlm::start(
        &keys.anthropic,
        &keys.openai,
        script(|_, _| Reply::text("x")),
    );
    let mut bx = AgentBox::start(b, Path::new(MOAT), None, &fake.url(), &keys);
    let agent = BuiltinAgent::new(
        settings(Provider::Anthropic, &[]),
        "/run/moat/bin/no-such-moat",
    );
    let (out, _) = turn(&mut bx, &agent, "Hello?", false, &CancelHandle::default());
    assert!(!out.ok && !out.cancelled, "{out:?}");
    assert!(
        out.answer.starts_with("moat: ") && out.answer.contains("before answering"),
        "{out:?}"
    );
    assert!(fake.requests().is_empty());
}

/// An agent that was tampered with (here: a script in the workspace posing as
/// moat) reports running `bash`, which the channel does not allow: the host
/// stops the sandbox at once and says so.
fn tampered_agent_turn(b: BackendKind) {
    let keys = Keys::new();
    let fake = FakeLlm::start(
        &keys.anthropic,
        &keys.openai,
        script(|_, _| Reply::text("x")),
    );
    let mut bx = AgentBox::start(b, Path::new(MOAT), None, &fake.url(), &keys);
    let tag = format!("moat-tampered-{}", hex(6));
    let body = format!(
        "#!/bin/sh\necho '{{\"type\":\"tool_result\",\"id\":\"1\",\"name\":\"bash\",\"ok\":true,\"output\":\"pwned\"}}'\n\
         (exec -a {tag} sleep 300) &\nwait\necho '{{\"type\":\"final\",\"text\":\"all fine\",\"steps\":1}}'\n"
    );
    let (code, _) = bx.sh(&format!(
        "cat > /workspace/evil <<'EOF'\n{body}EOF\nchmod 755 /workspace/evil"
    ));
    assert_eq!(code, 0);
    bx.lease().start().unwrap();
    let cgroups = bx.lease().cgroup_paths();
    let agent = BuiltinAgent::new(
        settings(Provider::Anthropic, &["read_file"]),
        "/workspace/evil",
    );
    let t0 = Instant::now();
    let (out, events) = turn(&mut bx, &agent, "hi", false, &CancelHandle::default());
    let ctx = format!("{out:?}\n{events:#?}");
    assert!(t0.elapsed() < Duration::from_secs(30), "{ctx}");
    assert!(!out.ok && !out.cancelled, "{ctx}");
    assert!(
        out.answer.contains(
            "moat stopped the agent: it reported running `bash`, which this channel does not allow"
        ),
        "{ctx}"
    );
    assert!(!out.answer.contains("all fine"), "{ctx}");
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, AgentEvent::ToolResult { .. })),
        "{ctx}"
    );
    let o = Command::new("pgrep").args(["-f", &tag]).output().unwrap();
    assert!(
        o.stdout.is_empty(),
        "still running: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    for cg in &cgroups {
        let procs = std::fs::read_to_string(cg.join("cgroup.procs")).unwrap_or_default();
        assert!(
            procs.trim().is_empty(),
            "{} still has {procs}",
            cg.display()
        );
    }
}

/// Failed model calls through the door: an overloaded answer (529), then a
/// rate limit with `retry-after`, then success, in one turn; then a turn whose
/// every call fails (500) gives up after three attempts. The status line
/// says what is happening; the fake counts the calls.
fn retried_turns(b: BackendKind) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let keys = Keys::new();
    let n = Arc::new(AtomicUsize::new(0));
    let calls = n.clone();
    let fake = FakeLlm::start(
        &keys.anthropic,
        &keys.openai,
        script(move |_, _| match calls.fetch_add(1, Ordering::SeqCst) {
            0 => Reply::Fail(529),
            1 => Reply::FailAfter(429, "1".into()),
            2 => Reply::text("answered after two retries"),
            _ => Reply::Fail(500),
        }),
    );
    let mut bx = AgentBox::start(b, Path::new(MOAT), None, &fake.url(), &keys);
    let agent = BuiltinAgent::new(settings(Provider::Anthropic, &[]), MOAT_INSIDE);
    let t0 = Instant::now();
    let (out, events) = turn(&mut bx, &agent, "Hello?", false, &CancelHandle::default());
    let ctx = format!("{out:?}\n{events:#?}");
    assert!(out.ok, "{ctx}");
    assert_eq!(out.answer, "answered after two retries", "{ctx}");
    assert!(
        t0.elapsed() >= Duration::from_secs(2),
        "1 s backoff + 1 s retry-after: {ctx}"
    );
    let statuses: Vec<&str> = events
        .iter()
        .filter_map(|e| match e {
            AgentEvent::Status(s) if s.contains("retrying") => Some(s.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(
        statuses,
        [
            "the model is overloaded (HTTP 529); retrying in 1 s (1 of 2)",
            "the model API is rate limiting (HTTP 429); retrying in 1 s (2 of 2)"
        ],
        "{ctx}"
    );
    let seen: Vec<u16> = fake.requests().iter().map(|r| r.status).collect();
    assert_eq!(seen, [529, 429, 200], "{ctx}");
    // The door passed each answer on and audited each call.
    let llm = bx.audit.llm_records.lock().unwrap().clone();
    let audited: Vec<u16> = llm.iter().map(|r| r.status).collect();
    assert_eq!(audited, [529, 429, 200]);

    // Every call fails: three attempts, then an answer that says so.
    fake.reset_stats();
    let (out, events) = turn(&mut bx, &agent, "Again?", false, &CancelHandle::default());
    let ctx = format!("{out:?}\n{events:#?}");
    assert!(!out.ok && !out.cancelled, "{ctx}");
    assert!(
        out.answer.contains("HTTP 500") && out.answer.contains("gave up after 3 attempts"),
        "{ctx}"
    );
    assert_eq!(fake.requests().len(), 3, "one call and two retries: {ctx}");
}

/// `moat agent-run` itself: a bad spec is one `error` line and exit status 1.
#[test]
fn agent_run_reports_a_bad_spec_and_exits_1() {
    use std::io::Write;
    let mut child = Command::new(MOAT)
        .arg("agent-run")
        .env_remove("ANTHROPIC_API_KEY")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"{\"provider\": \"anthropic\"}")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    let out = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{out}");
    assert_eq!(lines[0]["type"], "error");
    assert!(
        lines[0]["message"].as_str().unwrap().contains("turn spec"),
        "{out}"
    );
}

backend_tests! {
    anthropic_turn_lists_writes_and_answers => |b| multi_step_turn(b, Provider::Anthropic);
    openai_turn_lists_writes_and_answers => |b| multi_step_turn(b, Provider::Openai);
    a_disallowed_tool_is_refused_and_reported => refused_turn;
    cancel_stops_the_turn_and_every_process => cancel_turn;
    resume_continues_the_previous_turn => resume_turns;
    the_step_limit_gives_an_answer_that_says_so => step_limit_turn;
    a_missing_agent_binary_still_answers => missing_binary_turn;
    a_tampered_agent_running_a_disallowed_tool_is_stopped => tampered_agent_turn;
    failed_model_calls_are_retried_then_given_up => retried_turns;
}
