//! Real coding-agent CLIs in a sandbox, through the door's LLM proxy: Claude
//! Code (`@anthropic-ai/claude-code`) with `--llm anthropic` and the Codex CLI
//! (`@openai/codex`) with `--llm openai`. Each completes one turn, and one turn
//! that runs a shell tool, against a fake upstream written here from
//! Anthropic's and OpenAI's public API documentation (Messages streaming;
//! Responses streaming), plain HTTP on 127.0.0.1. No real API is contacted.
//!
//! The CLIs are installed by `scripts/setup` at the versions it pins, under
//! `/usr/local` (sandboxes see `/usr` read-only). A CLI that is missing or at
//! another version fails these tests with a message saying to run
//! `scripts/setup`; they never skip.
//!
//! What they check: the CLI prints the answer (a random marker only the fake
//! knows); the fake saw the real key and never a placeholder; the real key is
//! not in the CLI's output, its home directory or /tmp, moat's stderr (debug
//! level) or the audit log; every call is an audit record carrying the token
//! counts the fake sent; and with the settings docs/credentials.md gives, the
//! CLI tries no other connection (anything else would be refused by the door
//! and show up as an audit record).

mod netkit;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use netkit::*;
use serde_json::{json, Value};

/// The setup script: the pinned versions and the install prefix come from it,
/// so the tests always expect what it installs.
const SETUP: &str = include_str!("../../../scripts/setup");

/// `NAME=value` from scripts/setup.
fn setup_value(name: &str) -> String {
    SETUP
        .lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{name}=")))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_else(|| panic!("scripts/setup has no {name}= line"))
}

/// The word in a prompt that makes the fake ask for a tool call.
const TOOL_WORD: &str = "please-run-the-scripted-tool";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cli {
    ClaudeCode,
    Codex,
}

impl Cli {
    fn name(self) -> &'static str {
        match self {
            Cli::ClaudeCode => "Claude Code",
            Cli::Codex => "Codex",
        }
    }

    /// The CLI's path inside the sandbox (the same as on the host), after
    /// checking on the host that it is installed at the pinned version.
    fn path(self) -> String {
        let (bin, var, package) = match self {
            Cli::ClaudeCode => ("claude", "CLAUDE_CODE_VERSION", "@anthropic-ai/claude-code"),
            Cli::Codex => ("codex", "CODEX_VERSION", "@openai/codex"),
        };
        let want = setup_value(var);
        let path = format!("{}/bin/{bin}", setup_value("AGENT_CLI_PREFIX"));
        let name = self.name();
        match Command::new(&path).arg("--version").output() {
            Ok(o)
                if o.status.success()
                    && String::from_utf8_lossy(&o.stdout)
                        .split_whitespace()
                        .any(|w| w == want) =>
            {
                path
            }
            Ok(o) => panic!(
                "{name} at {path} is not {package}@{want} (it says {:?} {:?}): run scripts/setup",
                String::from_utf8_lossy(&o.stdout).trim(),
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => panic!(
                "{name} ({package}@{want}) is not installed: {path}: {e}; run scripts/setup (it installs it with npm)"
            ),
        }
    }
}

// ---------------------------------------------------------------------------
// The fake upstream
// ---------------------------------------------------------------------------

/// Real keys, known only to the host and the fake upstream.
struct Keys {
    anthropic: String,
    openai: String,
}

impl Keys {
    fn new() -> Keys {
        Keys {
            anthropic: format!("sk-ant-api03-{}", random_hex(24)),
            openai: format!("sk-proj-{}", random_hex(24)),
        }
    }
}

/// Token counts the fake reports, different for every kind of answer, so an
/// audit record shows which answer it counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tokens {
    input: u64,
    output: u64,
    cache_creation: u64,
    cache_read: u64,
}

const A_TEXT: Tokens = Tokens {
    input: 321,
    output: 45,
    cache_creation: 11,
    cache_read: 22,
};
const A_TOOL: Tokens = Tokens {
    input: 301,
    output: 31,
    cache_creation: 0,
    cache_read: 5,
};
const O_TEXT: Tokens = Tokens {
    input: 654,
    output: 76,
    cache_creation: 0,
    cache_read: 33,
};
const O_TOOL: Tokens = Tokens {
    input: 601,
    output: 61,
    cache_creation: 0,
    cache_read: 0,
};

/// What the fake answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// The scripted text with the marker (and these usage numbers).
    Text(Tokens),
    /// A tool call running the scripted shell command.
    Tool(Tokens),
    /// An error status (wrong key, unknown path, bad request).
    Error(u16),
}

/// One request the fake received.
#[derive(Debug, Clone)]
struct Req {
    method: String,
    /// Path and query as sent.
    target: String,
    headers: Vec<(String, String)>,
    body: String,
    answer: Answer,
}

impl Req {
    fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
    fn everything(&self) -> String {
        let mut s = format!("{} {}\n", self.method, self.target);
        for (k, v) in &self.headers {
            s.push_str(&format!("{k}: {v}\n"));
        }
        s + &self.body
    }
}

/// What the fake answers with: the text carrying `marker`, and the shell
/// command of a tool call (which writes `tool_marker` to /workspace/tool-out).
#[derive(Clone)]
struct Script {
    marker: String,
    tool_marker: String,
    anthropic_key: String,
    openai_key: String,
}

impl Script {
    fn command(&self) -> String {
        format!(
            "echo {} > /workspace/tool-out && cat /workspace/tool-out",
            self.tool_marker
        )
    }
}

/// The Anthropic Messages API and the OpenAI Responses API on one port.
struct FakeUpstream {
    port: u16,
    reqs: Arc<Mutex<Vec<Req>>>,
    script: Script,
}

impl FakeUpstream {
    fn start(keys: &Keys) -> FakeUpstream {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let reqs = Arc::new(Mutex::new(Vec::new()));
        let script = Script {
            marker: format!("MARKER-{}", random_hex(8)),
            tool_marker: format!("TOOLRAN-{}", random_hex(8)),
            anthropic_key: keys.anthropic.clone(),
            openai_key: keys.openai.clone(),
        };
        let (r, sc) = (reqs.clone(), script.clone());
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let (r, sc) = (r.clone(), sc.clone());
                std::thread::spawn(move || serve(s, &sc, &r));
            }
        });
        FakeUpstream { port, reqs, script }
    }
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
    fn requests(&self) -> Vec<Req> {
        self.reqs.lock().unwrap().clone()
    }
}

fn reply_json(s: &mut TcpStream, status: u16, body: &Value) {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        _ => "Error",
    };
    let b = body.to_string();
    let _ = write!(
        s,
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{b}",
        b.len()
    );
}

/// A server-sent event stream, one chunk per event, flushed as it goes.
fn reply_sse(s: &mut TcpStream, events: &[(&str, Value)]) {
    let _ = write!(
        s,
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    );
    for (name, data) in events {
        let e = format!("event: {name}\ndata: {data}\n\n");
        let _ = write!(s, "{:x}\r\n{e}\r\n", e.len());
        let _ = s.flush();
    }
    let _ = write!(s, "0\r\n\r\n");
    let _ = s.flush();
}

/// Reads one request (not answered yet); `None` if the connection closed or
/// sent garbage.
fn read_request(s: &mut TcpStream) -> Option<Req> {
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let mut buf = Vec::new();
    let mut tmp = [0u8; 16384];
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i;
        }
        match s.read(&mut tmp) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_string();
    let target = first.next()?.to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < len {
        match s.read(&mut tmp) {
            Ok(0) | Err(_) => return None,
            Ok(n) => body.extend_from_slice(&tmp[..n]),
        }
    }
    Some(Req {
        method,
        target,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
        answer: Answer::Error(404),
    })
}

fn serve(mut s: TcpStream, sc: &Script, log: &Mutex<Vec<Req>>) {
    let Some(mut req) = read_request(&mut s) else {
        return;
    };
    req.answer = match (req.method.as_str(), req.path()) {
        ("POST", "/v1/messages") => anthropic_messages(&mut s, &req, sc),
        ("POST", "/v1/responses") => openai_responses(&mut s, &req, sc),
        _ => {
            reply_json(
                &mut s,
                404,
                &json!({"error": "the fake has no such endpoint"}),
            );
            Answer::Error(404)
        }
    };
    log.lock().unwrap().push(req);
}

/// https://docs.anthropic.com/en/api/messages and .../messages-streaming
fn anthropic_messages(s: &mut TcpStream, req: &Req, sc: &Script) -> Answer {
    if req.header("x-api-key") != Some(sc.anthropic_key.as_str())
        || req.header("authorization").is_some()
    {
        reply_json(
            s,
            401,
            &json!({"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"}}),
        );
        return Answer::Error(401);
    }
    let doc = req.json();
    let Some(messages) = doc["messages"].as_array() else {
        reply_json(
            s,
            400,
            &json!({"type":"error","error":{"type":"invalid_request_error","message":"messages: field required"}}),
        );
        return Answer::Error(400);
    };
    let has_tool_result = messages
        .iter()
        .filter_map(|m| m["content"].as_array())
        .flatten()
        .any(|b| b["type"] == "tool_result");
    let tool = !has_tool_result && doc["messages"].to_string().contains(TOOL_WORD);
    let t = if tool { A_TOOL } else { A_TEXT };
    let usage = json!({"input_tokens": t.input, "cache_creation_input_tokens": t.cache_creation,
        "cache_read_input_tokens": t.cache_read, "output_tokens": t.output});
    let id = format!("msg_fake{}", random_hex(6));
    if doc["stream"] != true {
        let content = if tool {
            json!([{"type":"tool_use","id":"toolu_fake01","name":"Bash","input":{"command": sc.command()}}])
        } else {
            json!([{"type":"text","text": format!("The marker is {}.", sc.marker)}])
        };
        reply_json(
            s,
            200,
            &json!({"id": id, "type":"message","role":"assistant","model": doc["model"],
                "content": content, "stop_reason": if tool {"tool_use"} else {"end_turn"},
                "stop_sequence": null, "usage": usage}),
        );
        return if tool {
            Answer::Tool(t)
        } else {
            Answer::Text(t)
        };
    }
    let mut start_usage = usage.clone();
    start_usage["output_tokens"] = json!(1);
    let mut ev = vec![
        (
            "message_start",
            json!({"type":"message_start","message":{"id": id,"type":"message","role":"assistant",
                "model": doc["model"],"content":[],"stop_reason":null,"stop_sequence":null,"usage": start_usage}}),
        ),
        ("ping", json!({"type":"ping"})),
    ];
    if tool {
        // The input arrives as partial JSON in pieces, as the API sends it.
        let input =
            json!({"command": sc.command(), "description": "Write the tool marker"}).to_string();
        let (a, b) = input.split_at(input.len() / 2);
        ev.push((
            "content_block_start",
            json!({"type":"content_block_start","index":0,"content_block":{"type":"tool_use","id":"toolu_fake01","name":"Bash","input":{}}}),
        ));
        for part in [a, b] {
            ev.push((
                "content_block_delta",
                json!({"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json": part}}),
            ));
        }
    } else {
        // The marker is split over two deltas: the CLI must join them.
        let (a, b) = sc.marker.split_at(sc.marker.len() / 2);
        ev.push((
            "content_block_start",
            json!({"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}),
        ));
        for part in [format!("The marker is {a}"), format!("{b}.")] {
            ev.push((
                "content_block_delta",
                json!({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text": part}}),
            ));
        }
    }
    ev.push((
        "content_block_stop",
        json!({"type":"content_block_stop","index":0}),
    ));
    ev.push((
        "message_delta",
        json!({"type":"message_delta","delta":{"stop_reason": if tool {"tool_use"} else {"end_turn"},"stop_sequence":null},
            "usage":{"output_tokens": t.output}}),
    ));
    ev.push(("message_stop", json!({"type":"message_stop"})));
    reply_sse(s, &ev);
    if tool {
        Answer::Tool(t)
    } else {
        Answer::Text(t)
    }
}

/// https://platform.openai.com/docs/api-reference/responses and
/// .../responses-streaming
fn openai_responses(s: &mut TcpStream, req: &Req, sc: &Script) -> Answer {
    if req.header("authorization") != Some(format!("Bearer {}", sc.openai_key).as_str()) {
        reply_json(
            s,
            401,
            &json!({"error":{"message":"Incorrect API key provided","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}),
        );
        return Answer::Error(401);
    }
    let doc = req.json();
    let Some(input) = doc["input"].as_array() else {
        reply_json(
            s,
            400,
            &json!({"error":{"message":"input: expected a list of items","type":"invalid_request_error","param":"input","code":null}}),
        );
        return Answer::Error(400);
    };
    let has_tool_output = input
        .iter()
        .any(|i| i["type"] == "custom_tool_call_output" || i["type"] == "function_call_output");
    let asked = input
        .iter()
        .filter(|i| i["type"] == "message" && i["role"] == "user")
        .any(|i| i.to_string().contains(TOOL_WORD));
    let tool = asked && !has_tool_output;
    let t = if tool { O_TOOL } else { O_TEXT };
    let id = format!("resp_fake{}", random_hex(6));
    let base = json!({"id": id, "object":"response","created_at": 1_700_000_000u64,
        "status":"in_progress","model": doc["model"],"output":[],"usage":null});
    let item = if tool {
        // Codex's shell runs through its `exec` tool (JavaScript calling
        // `tools.exec_command`), a custom (free-form) tool of the Responses API.
        json!({"id":"ctc_fake01","type":"custom_tool_call","status":"completed","call_id":"call_fake01",
            "name":"exec","input": format!("const r = await tools.exec_command({{cmd: {}, login: false}}); text(r.output);",
                json!(sc.command()))})
    } else {
        json!({"id":"msg_fake01","type":"message","status":"completed","role":"assistant",
            "content":[{"type":"output_text","text": format!("The marker is {}.", sc.marker),"annotations":[]}]})
    };
    let mut done = base.clone();
    done["status"] = json!("completed");
    done["output"] = json!([item.clone()]);
    done["usage"] = json!({"input_tokens": t.input,"input_tokens_details":{"cached_tokens": t.cache_read},
        "output_tokens": t.output,"output_tokens_details":{"reasoning_tokens":0},
        "total_tokens": t.input + t.output});
    if doc["stream"] != true {
        reply_json(s, 200, &done);
        return if tool {
            Answer::Tool(t)
        } else {
            Answer::Text(t)
        };
    }
    let mut ev: Vec<(&str, Value)> = vec![
        (
            "response.created",
            json!({"type":"response.created","response": base}),
        ),
        (
            "response.in_progress",
            json!({"type":"response.in_progress","response": base}),
        ),
    ];
    let mut pending = item.clone();
    pending["status"] = json!("in_progress");
    if tool {
        pending["input"] = json!("");
        ev.push((
            "response.output_item.added",
            json!({"type":"response.output_item.added","output_index":0,"item": pending}),
        ));
    } else {
        pending["content"] = json!([]);
        ev.push((
            "response.output_item.added",
            json!({"type":"response.output_item.added","output_index":0,"item": pending}),
        ));
        ev.push((
            "response.content_part.added",
            json!({"type":"response.content_part.added","item_id":"msg_fake01","output_index":0,"content_index":0,
                "part":{"type":"output_text","text":"","annotations":[]}}),
        ));
        let text = format!("The marker is {}.", sc.marker);
        let (a, b) = text.split_at(text.len() / 2);
        for part in [a, b] {
            ev.push((
                "response.output_text.delta",
                json!({"type":"response.output_text.delta","item_id":"msg_fake01","output_index":0,"content_index":0,"delta": part}),
            ));
        }
        ev.push((
            "response.output_text.done",
            json!({"type":"response.output_text.done","item_id":"msg_fake01","output_index":0,"content_index":0,"text": text}),
        ));
        ev.push((
            "response.content_part.done",
            json!({"type":"response.content_part.done","item_id":"msg_fake01","output_index":0,"content_index":0,
                "part":{"type":"output_text","text": text,"annotations":[]}}),
        ));
    }
    ev.push((
        "response.output_item.done",
        json!({"type":"response.output_item.done","output_index":0,"item": item}),
    ));
    ev.push((
        "response.completed",
        json!({"type":"response.completed","response": done}),
    ));
    // Every event carries its sequence number, as the API's do.
    for (n, (_, e)) in ev.iter_mut().enumerate() {
        e["sequence_number"] = json!(n);
    }
    reply_sse(s, &ev);
    if tool {
        Answer::Tool(t)
    } else {
        Answer::Text(t)
    }
}

// ---------------------------------------------------------------------------
// Running a CLI through moat
// ---------------------------------------------------------------------------

/// What one `moat sandbox run` of a CLI produced.
struct Turn {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    /// The CLI's home directory and /tmp after the turn, as a tar archive.
    state: Vec<u8>,
    /// The placeholder the sandbox held.
    placeholder: String,
}

impl Turn {
    fn context(&self) -> String {
        format!(
            "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
    /// The JSON lines the CLI printed.
    fn events(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(Value::is_object)
            .collect()
    }
}

/// Runs `cli` once in `sb` with `prompt`, the LLM proxy pointed at `fake`.
/// The wall time (moat start to exit) goes to stderr.
fn run_turn(sb: &mut Sandbox, cli: Cli, keys: &Keys, fake: &FakeUpstream, prompt: &str) -> Turn {
    let path = cli.path();
    let (provider, key_var, command) = match cli {
        Cli::ClaudeCode => {
            // Only the Messages API: no telemetry, error reports, update or
            // feature-flag checks (which the door would refuse anyway).
            sb.env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1");
            (
                "anthropic",
                "ANTHROPIC_API_KEY",
                // ANTHROPIC_BASE_URL and ANTHROPIC_API_KEY come from the door.
                format!(
                    "{path} -p '{prompt}' --output-format stream-json --verbose --allowedTools Bash"
                ),
            )
        }
        Cli::Codex => (
            "openai",
            "OPENAI_API_KEY",
            // A provider of its own: the built-in `openai` one reads no key
            // from the environment (it wants `codex login`) and tries a
            // WebSocket first. Plugins (github.com, chatgpt.com) and
            // analytics (ab.chatgpt.com) off. Codex's own sandbox (bwrap)
            // cannot start inside moat's, so tools run in moat's sandbox.
            format!(
                r#"{path} exec --json --skip-git-repo-check --dangerously-bypass-approvals-and-sandbox \
  --disable plugins -c analytics.enabled=false -c model_provider='"moat"' \
  -c "model_providers.moat={{name=\"moat\", base_url=\"$OPENAI_BASE_URL\", env_key=\"OPENAI_API_KEY\", wire_api=\"responses\"}}" \
  '{prompt}'"#
            ),
        ),
    };
    let script = format!(
        r#"echo "placeholder=${key_var}" >&2
{command} </dev/null
rc=$?
tar -cf /workspace/state.tar -C "$HOME" . -C /tmp . 2>/dev/null
exit $rc
"#
    );
    let t0 = Instant::now();
    let o = sb
        .command()
        .env("ANTHROPIC_API_KEY", &keys.anthropic)
        .env("OPENAI_API_KEY", &keys.openai)
        .env("MOAT_ANTHROPIC_URL", fake.url())
        .env("MOAT_OPENAI_URL", fake.url())
        .env("MOAT_LLM_ALLOW_PLAIN_HTTP", "1")
        .env("MOAT_LOG", "debug")
        .args(["--llm", provider, "--", "/bin/sh", "-c", &script])
        .output()
        .expect("running moat");
    let elapsed = t0.elapsed();
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    let placeholder = stderr
        .lines()
        .find_map(|l| l.strip_prefix("placeholder="))
        .unwrap_or("")
        .to_string();
    let state = std::fs::read(sb.ws.join("state.tar")).unwrap_or_default();
    let _ = std::fs::remove_file(sb.ws.join("state.tar"));
    eprintln!(
        "{} turn through moat ({}): {:.2} s",
        cli.name(),
        sb.backend.name(),
        elapsed.as_secs_f64()
    );
    Turn {
        code: o.status.code(),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr,
        state,
        placeholder,
    }
}

/// The checks every turn must pass: keys, audit records and egress.
fn assert_sealed(
    sb: &Sandbox,
    cli: Cli,
    keys: &Keys,
    fake: &FakeUpstream,
    turn: &Turn,
    want: &[Answer],
) {
    let ctx = turn.context();
    let (real, other, prefix) = match cli {
        Cli::ClaudeCode => (&keys.anthropic, &keys.openai, "sk-ant-moat-"),
        Cli::Codex => (&keys.openai, &keys.anthropic, "sk-moat-"),
    };
    assert!(
        turn.placeholder.starts_with(prefix) && turn.placeholder.len() == prefix.len() + 32,
        "the sandbox's key is not a placeholder: {ctx}"
    );

    // Upstream: the real key on every call, never a placeholder.
    let reqs = fake.requests();
    let answers: Vec<Answer> = reqs.iter().map(|r| r.answer).collect();
    assert_eq!(answers, want, "the fake's answers: {reqs:#?}\n{ctx}");
    for r in &reqs {
        let all = r.everything();
        assert!(
            !all.contains(&turn.placeholder)
                && !all.contains("sk-ant-moat-")
                && !all.contains("sk-moat-"),
            "a placeholder reached upstream: {all}"
        );
        assert!(
            !all.contains(other.as_str()),
            "the other provider's key was sent: {all}"
        );
        match cli {
            Cli::ClaudeCode => assert_eq!(r.header("x-api-key"), Some(real.as_str()), "{all}"),
            Cli::Codex => assert_eq!(
                r.header("authorization"),
                Some(format!("Bearer {real}").as_str()),
                "{all}"
            ),
        }
    }

    // The real key is nowhere the sandbox or its operator's logs could show.
    for (what, bytes) in [
        ("the CLI's output", turn.stdout.as_bytes()),
        ("moat's stderr", turn.stderr.as_bytes()),
        ("the CLI's home directory or /tmp", &turn.state[..]),
    ] {
        for key in [&keys.anthropic, &keys.openai] {
            assert!(
                find(bytes, key.as_bytes()).is_none(),
                "a real key is in {what}"
            );
        }
    }
    // The state scan did see the CLI's files.
    let dir = match cli {
        Cli::ClaudeCode => "./.claude/",
        Cli::Codex => "./.codex/",
    };
    assert!(
        find(&turn.state, dir.as_bytes()).is_some(),
        "the CLI's state ({dir}) was not scanned: {} bytes",
        turn.state.len()
    );

    // The audit log: one allowed, complete record per call, with the fake's
    // token counts; nothing else.
    let audit = sb.audit();
    for key in [&keys.anthropic, &keys.openai, &turn.placeholder] {
        audit.assert_absent(key);
    }
    let llm: Vec<&Value> = audit
        .records
        .iter()
        .filter(|r| r["kind"] == "llm")
        .collect();
    assert_eq!(
        llm.len(),
        reqs.len(),
        "one record per call:\n{}",
        audit.text
    );
    let provider = match cli {
        Cli::ClaudeCode => "anthropic",
        Cli::Codex => "openai",
    };
    for (rec, req) in llm.iter().zip(&reqs) {
        let t = match req.answer {
            Answer::Text(t) | Answer::Tool(t) => t,
            Answer::Error(_) => unreachable!(),
        };
        assert_eq!(
            (
                &rec["provider"],
                &rec["port"],
                &rec["path"],
                &rec["model"],
                &rec["stream"],
                &rec["verdict"],
                &rec["status"],
                &rec["reason"],
            ),
            (
                &json!(provider),
                &json!(fake.port),
                &json!(req.path()),
                &req.json()["model"],
                &json!(true),
                &json!("allowed"),
                &json!(200),
                &Value::Null,
            ),
            "{rec}"
        );
        assert_eq!(
            (
                &rec["input_tokens"],
                &rec["output_tokens"],
                &rec["cache_creation_input_tokens"],
                &rec["cache_read_input_tokens"]
            ),
            (
                &json!(t.input),
                &json!(t.output),
                &json!(t.cache_creation),
                &json!(t.cache_read)
            ),
            "{rec}"
        );
    }
    let others: Vec<&Value> = audit
        .records
        .iter()
        .filter(|r| r["kind"] != "llm")
        .collect();
    assert!(
        others.iter().all(|r| r["verdict"] == "denied"),
        "the door let something else through: {others:?}"
    );
    assert!(
        others.is_empty(),
        "{} tried to reach more than its API (the door refused it; docs/credentials.md lists \
         the settings that stop this): {others:?}",
        cli.name()
    );
}

// ---------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------

fn claude_code_turn(b: Backend) {
    let keys = Keys::new();
    let fake = FakeUpstream::start(&keys);
    let mut sb = Sandbox::new(b, "claude-turn");
    let turn = run_turn(&mut sb, Cli::ClaudeCode, &keys, &fake, "Say the marker.");
    let ctx = turn.context();
    assert_eq!(turn.code, Some(0), "{ctx}");
    let events = turn.events();
    let result = events
        .iter()
        .find(|e| e["type"] == "result")
        .unwrap_or_else(|| panic!("no result event: {ctx}"));
    assert_eq!(
        (&result["subtype"], &result["is_error"]),
        (&json!("success"), &json!(false)),
        "{result}"
    );
    let answer = format!("The marker is {}.", fake.script.marker);
    assert_eq!(result["result"], json!(answer), "{ctx}");
    // The CLI counted what the API reported.
    assert_eq!(result["usage"]["input_tokens"], A_TEXT.input, "{result}");
    assert_eq!(result["usage"]["output_tokens"], A_TEXT.output, "{result}");
    assert_sealed(
        &sb,
        Cli::ClaudeCode,
        &keys,
        &fake,
        &turn,
        &[Answer::Text(A_TEXT)],
    );
}

fn claude_code_tool_turn(b: Backend) {
    let keys = Keys::new();
    let fake = FakeUpstream::start(&keys);
    let mut sb = Sandbox::new(b, "claude-tool");
    let turn = run_turn(
        &mut sb,
        Cli::ClaudeCode,
        &keys,
        &fake,
        &format!("Run the tool: {TOOL_WORD}."),
    );
    let ctx = turn.context();
    assert_eq!(turn.code, Some(0), "{ctx}");
    // The command ran in the sandbox's workspace ...
    let out = std::fs::read_to_string(sb.ws.join("tool-out")).unwrap_or_default();
    assert_eq!(out.trim(), fake.script.tool_marker, "{ctx}");
    // ... and its output went back to the model as the tool's result.
    let reqs = fake.requests();
    let second = reqs.get(1).map(Req::json).unwrap_or_default();
    let result = second["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["content"].as_array())
        .flatten()
        .find(|b| b["type"] == "tool_result" && b["tool_use_id"] == "toolu_fake01")
        .unwrap_or_else(|| panic!("no tool_result sent back: {reqs:#?}"));
    assert!(
        result.to_string().contains(&fake.script.tool_marker),
        "the tool's output is not in its result: {result}"
    );
    let answer = format!("The marker is {}.", fake.script.marker);
    assert!(
        turn.events()
            .iter()
            .any(|e| e["type"] == "result" && e["result"] == json!(answer)),
        "{ctx}"
    );
    assert_sealed(
        &sb,
        Cli::ClaudeCode,
        &keys,
        &fake,
        &turn,
        &[Answer::Tool(A_TOOL), Answer::Text(A_TEXT)],
    );
}

fn codex_turn(b: Backend) {
    let keys = Keys::new();
    let fake = FakeUpstream::start(&keys);
    let mut sb = Sandbox::new(b, "codex-turn");
    let turn = run_turn(&mut sb, Cli::Codex, &keys, &fake, "Say the marker.");
    let ctx = turn.context();
    assert_eq!(turn.code, Some(0), "{ctx}");
    let events = turn.events();
    let answer = format!("The marker is {}.", fake.script.marker);
    assert!(
        events.iter().any(|e| e["type"] == "item.completed"
            && e["item"]["type"] == "agent_message"
            && e["item"]["text"] == json!(answer)),
        "{ctx}"
    );
    let done = events
        .iter()
        .find(|e| e["type"] == "turn.completed")
        .unwrap_or_else(|| panic!("no turn.completed event: {ctx}"));
    // The CLI counted what the API reported.
    assert_eq!(
        (
            &done["usage"]["input_tokens"],
            &done["usage"]["cached_input_tokens"],
            &done["usage"]["output_tokens"]
        ),
        (
            &json!(O_TEXT.input),
            &json!(O_TEXT.cache_read),
            &json!(O_TEXT.output)
        ),
        "{done}"
    );
    assert_sealed(
        &sb,
        Cli::Codex,
        &keys,
        &fake,
        &turn,
        &[Answer::Text(O_TEXT)],
    );
}

fn codex_tool_turn(b: Backend) {
    let keys = Keys::new();
    let fake = FakeUpstream::start(&keys);
    let mut sb = Sandbox::new(b, "codex-tool");
    let turn = run_turn(
        &mut sb,
        Cli::Codex,
        &keys,
        &fake,
        &format!("Run the tool: {TOOL_WORD}."),
    );
    let ctx = turn.context();
    assert_eq!(turn.code, Some(0), "{ctx}");
    let out = std::fs::read_to_string(sb.ws.join("tool-out")).unwrap_or_default();
    assert_eq!(out.trim(), fake.script.tool_marker, "{ctx}");
    let events = turn.events();
    assert!(
        events.iter().any(|e| e["type"] == "item.completed"
            && e["item"]["type"] == "command_execution"
            && e["item"]["exit_code"] == 0
            && e["item"]["aggregated_output"]
                .as_str()
                .is_some_and(|o| o.contains(&fake.script.tool_marker))),
        "{ctx}"
    );
    let reqs = fake.requests();
    let second = reqs.get(1).map(Req::json).unwrap_or_default();
    let output = second["input"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i["type"] == "custom_tool_call_output" && i["call_id"] == "call_fake01")
        .unwrap_or_else(|| panic!("no custom_tool_call_output sent back: {reqs:#?}"));
    assert!(
        output.to_string().contains(&fake.script.tool_marker),
        "the command's output is not in the tool's result: {output}"
    );
    let answer = format!("The marker is {}.", fake.script.marker);
    assert!(
        events.iter().any(|e| e["type"] == "item.completed"
            && e["item"]["type"] == "agent_message"
            && e["item"]["text"] == json!(answer)),
        "{ctx}"
    );
    assert_sealed(
        &sb,
        Cli::Codex,
        &keys,
        &fake,
        &turn,
        &[Answer::Tool(O_TOOL), Answer::Text(O_TEXT)],
    );
}

#[test]
fn agent_clis_are_installed_at_the_pinned_versions() {
    for cli in [Cli::ClaudeCode, Cli::Codex] {
        cli.path();
    }
}

net_tests! {
    claude_code_completes_a_turn_through_the_llm_proxy => claude_code_turn;
    claude_code_runs_a_bash_tool_through_the_llm_proxy => claude_code_tool_turn;
    codex_completes_a_turn_through_the_llm_proxy => codex_turn;
    codex_runs_a_shell_tool_through_the_llm_proxy => codex_tool_turn;
}
