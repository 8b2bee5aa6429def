//! The tool-use loop against an in-process fake upstream (plain HTTP on
//! 127.0.0.1) that answers from a script and records every request: the
//! Anthropic and OpenAI shapes, the allowlist, the step limit, the saved
//! session, and errors from the API.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moat_agent::http::Url;
use moat_agent::model::Endpoint;
use moat_agent::protocol::{Event, McpServer, Provider, TurnSpec};
use moat_agent::retry::RetryPolicy;
use moat_agent::Setup;
use serde_json::{json, Value};

/// One recorded request: path, headers (lower-case names), body.
#[derive(Debug, Clone)]
struct Req {
    path: String,
    headers: Vec<(String, String)>,
    body: Value,
}

impl Req {
    fn header(&self, k: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    }
}

struct Fake {
    url: String,
    reqs: Arc<Mutex<Vec<Req>>>,
}

/// Serves `answers` in order, (status, body), one per request; then 500.
fn fake(answers: Vec<(u16, Value)>) -> Fake {
    fake_with_headers(answers.into_iter().map(|(s, b)| (s, "", b)).collect())
}

/// As [`fake`], with extra header lines (`"retry-after: 1\r\n"`) per answer.
fn fake_with_headers(answers: Vec<(u16, &'static str, Value)>) -> Fake {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let reqs = Arc::new(Mutex::new(Vec::new()));
    let r = reqs.clone();
    std::thread::spawn(move || {
        let mut answers = answers.into_iter();
        for s in l.incoming() {
            let Ok(s) = s else { continue };
            let mut rd = BufReader::new(s.try_clone().unwrap());
            let mut first = String::new();
            rd.read_line(&mut first).unwrap();
            let path = first.split(' ').nth(1).unwrap_or("").to_string();
            let mut headers = Vec::new();
            loop {
                let mut l = String::new();
                rd.read_line(&mut l).unwrap();
                let l = l.trim_end();
                if l.is_empty() {
                    break;
                }
                let (k, v) = l.split_once(':').unwrap();
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
            let len: usize = headers
                .iter()
                .find(|(k, _)| k == "content-length")
                .map(|(_, v)| v.parse().unwrap())
                .unwrap_or(0);
            let mut body = vec![0u8; len];
            rd.read_exact(&mut body).unwrap();
            r.lock().unwrap().push(Req {
                path,
                headers,
                body: serde_json::from_slice(&body).unwrap_or(Value::Null),
            });
            let (status, extra, answer) =
                answers
                    .next()
                    .unwrap_or((500, "", json!({"error": {"message": "script over"}})));
            let b = answer.to_string();
            // Chunked, as the door's proxy may send it.
            let mut w = s;
            let _ = write!(
                w,
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n{extra}transfer-encoding: chunked\r\n\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
                b.len()
            );
        }
    });
    Fake { url, reqs }
}

fn setup(dir: &std::path::Path, provider: Provider, url: &str) -> Setup {
    let ws = dir.join("ws");
    let home = dir.join("home");
    std::fs::create_dir_all(&ws).unwrap();
    std::fs::create_dir_all(&home).unwrap();
    let e = |base: String| {
        Some(Endpoint {
            base: Url::parse(&base).unwrap(),
            key: "sk-placeholder".into(),
        })
    };
    Setup {
        workspace: ws,
        home,
        anthropic: (provider == Provider::Anthropic)
            .then(|| e(format!("{url}/anthropic")))
            .flatten(),
        openai: (provider == Provider::Openai)
            .then(|| e(format!("{url}/openai/v1")))
            .flatten(),
        model_timeout: Duration::from_secs(10),
        // Short waits: the tests count calls and read the status lines.
        retry: RetryPolicy {
            delays: vec![Duration::from_millis(10), Duration::from_millis(40)],
            max_retry_after: Duration::from_secs(30),
        },
    }
}

fn spec(provider: Provider, tools: &[&str]) -> TurnSpec {
    TurnSpec {
        provider,
        model: "test-model".into(),
        system: Some("You are a test.".into()),
        prompt: "Make a file.".into(),
        history: vec!["bob: earlier".into()],
        tools: tools.iter().map(|s| s.to_string()).collect(),
        mcp: vec![],
        max_steps: 10,
        max_tokens: 1000,
        resume: false,
        tool_timeout_secs: 10,
    }
}

fn run(spec: &TurnSpec, setup: &Setup) -> (bool, Vec<Event>) {
    let mut events = Vec::new();
    let ok = moat_agent::run_turn(spec, setup, &mut |e| events.push(e));
    (ok, events)
}

fn a_tool(id: &str, name: &str, input: Value) -> Value {
    json!({"id": "msg", "type": "message", "role": "assistant", "content": [
        {"type": "tool_use", "id": id, "name": name, "input": input}],
        "stop_reason": "tool_use", "usage": {"input_tokens": 10, "output_tokens": 2}})
}

fn a_text(text: &str) -> Value {
    json!({"id": "msg", "type": "message", "role": "assistant",
        "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
        "usage": {"input_tokens": 20, "output_tokens": 3}})
}

fn final_text(events: &[Event]) -> String {
    match events.last() {
        Some(Event::Final { text, .. }) => text.clone(),
        other => panic!("the last event is not final: {other:?} in {events:?}"),
    }
}

#[test]
fn anthropic_multi_step_turn() {
    let d = tempfile::tempdir().unwrap();
    let f = fake(vec![
        (200, a_tool("tu1", "list_files", json!({}))),
        (
            200,
            a_tool(
                "tu2",
                "write_file",
                json!({"path": "hello.txt", "content": "hi\n"}),
            ),
        ),
        (200, a_text("Done: wrote hello.txt.")),
    ]);
    let s = setup(d.path(), Provider::Anthropic, &f.url);
    std::fs::write(s.workspace.join("existing.md"), "x").unwrap();
    let (ok, events) = run(
        &spec(Provider::Anthropic, &["list_files", "write_file"]),
        &s,
    );
    assert!(ok, "{events:?}");
    assert_eq!(final_text(&events), "Done: wrote hello.txt.");
    assert_eq!(
        std::fs::read_to_string(s.workspace.join("hello.txt")).unwrap(),
        "hi\n"
    );
    let reqs = f.reqs.lock().unwrap().clone();
    assert_eq!(reqs.len(), 3);
    for r in &reqs {
        assert_eq!(r.path, "/anthropic/v1/messages");
        assert_eq!(r.header("x-api-key"), Some("sk-placeholder"));
        assert_eq!(r.header("anthropic-version"), Some("2023-06-01"));
        assert_eq!(r.body["model"], "test-model");
        assert_eq!(r.body["system"], "You are a test.");
        let names: Vec<&str> = r.body["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["write_file", "list_files"]);
    }
    // The history is context in the first user message.
    let first = reqs[0].body["messages"][0]["content"][0]["text"]
        .as_str()
        .unwrap();
    assert!(
        first.contains("bob: earlier") && first.ends_with("Make a file."),
        "{first}"
    );
    // The listing went back as the tool result.
    let m = &reqs[1].body["messages"];
    assert_eq!(m[1]["content"][0]["type"], "tool_use");
    assert_eq!(m[2]["content"][0]["tool_use_id"], "tu1");
    assert_eq!(m[2]["content"][0]["content"], "existing.md");
    assert_eq!(m[2]["content"][0]["is_error"], false);
    // Events: usage, call, result for each step, then the answer.
    let kinds: Vec<String> = events
        .iter()
        .map(|e| {
            serde_json::to_value(e).unwrap()["type"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "usage",
            "tool_call",
            "tool_result",
            "usage",
            "tool_call",
            "tool_result",
            "usage",
            "text",
            "final"
        ]
    );
    assert!(matches!(&events[8], Event::Final { steps: 3, .. }));
}

#[test]
fn openai_multi_step_turn() {
    let d = tempfile::tempdir().unwrap();
    let call = |id: &str, name: &str, args: Value| {
        json!({"id": "resp", "object": "response", "status": "completed", "output": [
            {"type": "function_call", "id": format!("fc_{id}"), "call_id": id, "name": name, "arguments": args.to_string(), "status": "completed"}],
            "usage": {"input_tokens": 5, "output_tokens": 1}})
    };
    let f = fake(vec![
        (200, call("c1", "list_files", json!({}))),
        (
            200,
            call(
                "c2",
                "write_file",
                json!({"path": "o.txt", "content": "openai"}),
            ),
        ),
        (
            200,
            json!({"id": "resp", "status": "completed", "output": [
            {"type": "message", "id": "m1", "role": "assistant", "content": [{"type": "output_text", "text": "All done.", "annotations": []}]}],
            "usage": {"input_tokens": 7, "output_tokens": 2}}),
        ),
    ]);
    let s = setup(d.path(), Provider::Openai, &f.url);
    let (ok, events) = run(
        &spec(Provider::Openai, &["list_files", "write_file", "bash"]),
        &s,
    );
    assert!(ok, "{events:?}");
    assert_eq!(final_text(&events), "All done.");
    assert_eq!(
        std::fs::read_to_string(s.workspace.join("o.txt")).unwrap(),
        "openai"
    );
    let reqs = f.reqs.lock().unwrap().clone();
    for r in &reqs {
        assert_eq!(r.path, "/openai/v1/responses");
        assert_eq!(r.header("authorization"), Some("Bearer sk-placeholder"));
        assert_eq!(r.body["instructions"], "You are a test.");
        assert_eq!(r.body["max_output_tokens"], 1000);
        assert_eq!(r.body["tools"][0]["type"], "function");
    }
    let input = reqs[2].body["input"].as_array().unwrap();
    let out: Vec<&Value> = input
        .iter()
        .filter(|i| i["type"] == "function_call_output")
        .collect();
    assert_eq!(out.len(), 2);
    assert_eq!(out[0]["call_id"], "c1");
    assert_eq!(
        out[0]["output"],
        "(ws is empty)".replace("ws", &s.workspace.display().to_string())
    );
    assert!(out[1]["output"]
        .as_str()
        .unwrap()
        .starts_with("wrote 6 bytes"));
}

#[test]
fn a_tool_not_allowed_is_refused_before_it_runs() {
    let d = tempfile::tempdir().unwrap();
    let marker = d.path().join("ws/ran");
    let f = fake(vec![
        (
            200,
            a_tool(
                "tu1",
                "bash",
                json!({"command": format!("touch {}", marker.display())}),
            ),
        ),
        (
            200,
            a_tool("tu2", "read_thread", json!({"thread": "other"})),
        ),
        (200, a_text("I could not run it.")),
    ]);
    let s = setup(d.path(), Provider::Anthropic, &f.url);
    let (ok, events) = run(
        &spec(Provider::Anthropic, &["read_file", "read_thread"]),
        &s,
    );
    assert!(ok);
    assert!(!marker.exists(), "the refused command ran");
    let refused: Vec<(String, String)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Refused { name, reason, .. } => Some((name.clone(), reason.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(refused.len(), 2, "{events:?}");
    assert_eq!(refused[0].0, "bash");
    assert!(refused[0].1.contains("not allowed in this channel"));
    assert!(refused[1].1.contains("never"), "{refused:?}");
    assert!(!events
        .iter()
        .any(|e| matches!(e, Event::ToolCall { .. } | Event::ToolResult { .. })));
    let reqs = f.reqs.lock().unwrap().clone();
    // Only read_file was offered (read_thread is never offered).
    let names: Vec<&str> = reqs[0].body["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["read_file"]);
    let result = &reqs[1].body["messages"][2]["content"][0];
    assert_eq!(result["is_error"], true);
    assert!(
        result["content"]
            .as_str()
            .unwrap()
            .contains("not allowed here"),
        "{result}"
    );
}

#[test]
fn the_step_limit_ends_the_turn_with_what_there_is() {
    let d = tempfile::tempdir().unwrap();
    let f = fake(vec![
        (
            200,
            a_tool("tu1", "bash", json!({"command": "echo one >> steps"})),
        ),
        (
            200,
            a_tool("tu2", "bash", json!({"command": "echo two >> steps"})),
        ),
        (200, a_text("never asked")),
    ]);
    let s = setup(d.path(), Provider::Anthropic, &f.url);
    let mut sp = spec(Provider::Anthropic, &["bash"]);
    sp.max_steps = 2;
    let (ok, events) = run(&sp, &s);
    assert!(ok);
    let text = final_text(&events);
    assert!(text.contains("step limit"), "{text}");
    assert_eq!(f.reqs.lock().unwrap().len(), 2);
    // The second step's call was not run.
    assert_eq!(
        std::fs::read_to_string(s.workspace.join("steps")).unwrap(),
        "one\n"
    );
    // The saved session is complete (every call has a result).
    let saved: Value = serde_json::from_slice(&std::fs::read(s.session_path()).unwrap()).unwrap();
    assert_eq!(saved["items"].as_array().unwrap().len(), 5);
}

#[test]
fn resume_continues_the_saved_conversation() {
    let d = tempfile::tempdir().unwrap();
    let f = fake(vec![
        (200, a_text("first answer")),
        (200, a_text("second answer")),
    ]);
    let s = setup(d.path(), Provider::Anthropic, &f.url);
    let mut sp = spec(Provider::Anthropic, &[]);
    sp.history.clear();
    sp.prompt = "first question".into();
    assert_eq!(final_text(&run(&sp, &s).1), "first answer");
    sp.prompt = "second question".into();
    sp.resume = true;
    assert_eq!(final_text(&run(&sp, &s).1), "second answer");
    let reqs = f.reqs.lock().unwrap().clone();
    let m = reqs[1].body["messages"].as_array().unwrap();
    assert_eq!(m.len(), 3, "{m:?}");
    assert_eq!(m[0]["content"][0]["text"], "first question");
    assert_eq!(m[1]["content"][0]["text"], "first answer");
    assert_eq!(m[2]["content"][0]["text"], "second question");
    // Without resume, a fresh conversation.
    let f2 = fake(vec![(200, a_text("x"))]);
    let s2 = Setup {
        anthropic: setup(d.path(), Provider::Anthropic, &f2.url).anthropic,
        ..s
    };
    sp.resume = false;
    run(&sp, &s2);
    assert_eq!(
        f2.reqs.lock().unwrap()[0].body["messages"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn api_errors_end_the_turn_with_an_error_event() {
    let d = tempfile::tempdir().unwrap();
    let f = fake(vec![(
        401,
        json!({"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}}),
    )]);
    let s = setup(d.path(), Provider::Anthropic, &f.url);
    let (ok, events) = run(&spec(Provider::Anthropic, &[]), &s);
    assert!(!ok);
    assert_eq!(events.len(), 1);
    assert_eq!(f.reqs.lock().unwrap().len(), 1, "a 401 is not retried");
    match &events[0] {
        Event::Error { message } => {
            assert!(
                message.contains("401") && message.contains("invalid x-api-key"),
                "{message}"
            );
            assert!(!message.contains("sk-placeholder"));
        }
        e => panic!("{e:?}"),
    }
    // No endpoint for the provider: an error naming the variables.
    let s = setup(d.path(), Provider::Openai, &f.url);
    let (ok, events) = run(&spec(Provider::Anthropic, &[]), &s);
    assert!(!ok);
    assert!(
        matches!(&events[0], Event::Error { message } if message.contains("ANTHROPIC_BASE_URL"))
    );
}

#[test]
fn stdio_reports_a_bad_spec_as_one_error_line() {
    let mut out = Vec::new();
    let ok = moat_agent::run_stdio(&b"{not json"[..], &mut out, Err("unused".into()));
    assert!(!ok);
    let text = String::from_utf8(out).unwrap();
    assert_eq!(text.lines().count(), 1);
    let e: Event = serde_json::from_str(text.trim()).unwrap();
    assert!(matches!(e, Event::Error { message } if message.contains("turn spec")));
}

#[test]
fn mcp_tools_are_offered_and_called_by_their_prefixed_name() {
    let d = tempfile::tempdir().unwrap();
    let server = r#"
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if "id" not in m: continue
    if m["method"] == "initialize": r = {"protocolVersion": "2025-06-18", "capabilities": {}, "serverInfo": {"name": "n", "version": "1"}}
    elif m["method"] == "tools/list": r = {"tools": [{"name": "shout", "description": "upper-case", "inputSchema": {"type": "object", "properties": {"s": {"type": "string"}}}}]}
    else: r = {"content": [{"type": "text", "text": m["params"]["arguments"]["s"].upper()}]}
    print(json.dumps({"jsonrpc": "2.0", "id": m["id"], "result": r}), flush=True)
"#;
    let f = fake(vec![
        (200, a_tool("tu1", "mcp__loud__shout", json!({"s": "hey"}))),
        (200, a_tool("tu2", "mcp__other__x", json!({}))),
        (200, a_text("ok")),
    ]);
    let s = setup(d.path(), Provider::Anthropic, &f.url);
    let mut sp = spec(Provider::Anthropic, &[]);
    sp.mcp = vec![McpServer {
        name: "loud".into(),
        command: vec!["python3".into(), "-c".into(), server.into()],
        env: Default::default(),
    }];
    let (ok, events) = run(&sp, &s);
    assert!(ok, "{events:?}");
    let reqs = f.reqs.lock().unwrap().clone();
    assert_eq!(reqs[0].body["tools"][0]["name"], "mcp__loud__shout");
    assert_eq!(reqs[1].body["messages"][2]["content"][0]["content"], "HEY");
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::Refused { name, .. } if name == "mcp__other__x")));
}

fn statuses(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Status { text } => Some(text.clone()),
            _ => None,
        })
        .collect()
}

fn error_text(events: &[Event]) -> String {
    match events.last() {
        Some(Event::Error { message }) => message.clone(),
        other => panic!("the last event is not an error: {other:?} in {events:?}"),
    }
}

#[test]
fn an_overloaded_model_is_retried_and_the_status_line_says_so() {
    let d = tempfile::tempdir().unwrap();
    let overloaded =
        json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}});
    let f = fake(vec![(529, overloaded), (200, a_text("Done after a wait."))]);
    let s = setup(d.path(), Provider::Anthropic, &f.url);
    let (ok, events) = run(&spec(Provider::Anthropic, &[]), &s);
    assert!(ok, "{events:?}");
    assert_eq!(final_text(&events), "Done after a wait.");
    assert_eq!(
        f.reqs.lock().unwrap().len(),
        2,
        "one failed call, one retry"
    );
    assert_eq!(
        statuses(&events),
        ["the model is overloaded (HTTP 529); retrying in 10 ms (1 of 2)"]
    );
    // The retry is the same request.
    let reqs = f.reqs.lock().unwrap();
    assert_eq!(reqs[0].body, reqs[1].body);
}

#[test]
fn retry_after_is_honoured() {
    let d = tempfile::tempdir().unwrap();
    let limited =
        json!({"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}});
    let f = fake_with_headers(vec![
        (429, "retry-after: 1\r\n", limited),
        (200, "", a_text("ok")),
    ]);
    let s = setup(d.path(), Provider::Anthropic, &f.url);
    let t0 = std::time::Instant::now();
    let (ok, events) = run(&spec(Provider::Anthropic, &[]), &s);
    assert!(ok, "{events:?}");
    assert!(
        t0.elapsed() >= Duration::from_secs(1),
        "waited {:?}, not the 1 s the API asked for",
        t0.elapsed()
    );
    assert_eq!(f.reqs.lock().unwrap().len(), 2);
    assert_eq!(
        statuses(&events),
        ["the model API is rate limiting (HTTP 429); retrying in 1 s (1 of 2)"]
    );
}

#[test]
fn a_retry_after_over_the_cap_is_not_waited_for() {
    let d = tempfile::tempdir().unwrap();
    let limited = json!({"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}});
    let f = fake_with_headers(vec![(429, "retry-after: 600\r\n", limited)]);
    let s = setup(d.path(), Provider::Openai, &f.url);
    let (ok, events) = run(&spec(Provider::Openai, &[]), &s);
    assert!(!ok);
    assert_eq!(f.reqs.lock().unwrap().len(), 1);
    assert!(statuses(&events).is_empty());
    let e = error_text(&events);
    assert!(
        e.contains("HTTP 429")
            && e.contains(
                "not retried: the API asked to wait 600 s, longer than moat waits (30 s)"
            ),
        "{e}"
    );
}

#[test]
fn a_failing_model_gives_up_after_three_attempts() {
    let d = tempfile::tempdir().unwrap();
    let boom = json!({"error": {"message": "The server had an error", "type": "server_error"}});
    let f = fake(vec![(500, boom.clone()), (500, boom.clone()), (500, boom)]);
    let s = setup(d.path(), Provider::Openai, &f.url);
    let (ok, events) = run(&spec(Provider::Openai, &[]), &s);
    assert!(!ok);
    assert_eq!(f.reqs.lock().unwrap().len(), 3, "one call and two retries");
    assert_eq!(
        statuses(&events),
        [
            "the model API failed (HTTP 500); retrying in 10 ms (1 of 2)",
            "the model API failed (HTTP 500); retrying in 40 ms (2 of 2)"
        ]
    );
    let e = error_text(&events);
    assert!(
        e.contains("HTTP 500: The server had an error (gave up after 3 attempts)"),
        "{e}"
    );
}

#[test]
fn the_doors_budget_refusal_is_not_retried() {
    let d = tempfile::tempdir().unwrap();
    // As the door's LLM proxy answers when the turn's budget is spent.
    let spent = json!({"type": "error", "error": {"type": "rate_limit_error",
        "message": "moat: this sandbox's token budget is spent (5000 of 5000 tokens used)"}});
    let f = fake(vec![(429, spent), (200, a_text("must not be reached"))]);
    let s = setup(d.path(), Provider::Anthropic, &f.url);
    let (ok, events) = run(&spec(Provider::Anthropic, &[]), &s);
    assert!(!ok);
    assert_eq!(f.reqs.lock().unwrap().len(), 1);
    assert!(statuses(&events).is_empty());
    assert!(error_text(&events).contains("token budget is spent"));
}
