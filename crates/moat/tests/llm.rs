//! The door's LLM reverse proxy, through the real CLI, against fake Anthropic
//! and OpenAI servers written here from their public API documentation (plain
//! HTTP on 127.0.0.1; no real API is ever contacted). Real clients inside the
//! sandbox: curl and Python's urllib. Also docs/threat-model.md C1 (the real key is
//! nowhere in the sandbox, moat's logs or the audit log) and C2 (a placeholder
//! sent anywhere else is never swapped; another lease's placeholder is refused).

mod netkit;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use netkit::*;
use serde_json::{json, Value};

/// One request the fake upstream received.
#[derive(Debug, Clone)]
struct Req {
    path: String,
    headers: Vec<(String, String)>,
    body: String,
    /// For a gated stream: whether the client saw the first event before the
    /// rest was sent.
    gated: Option<bool>,
}

impl Req {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    fn everything(&self) -> String {
        let mut s = format!("{}\n", self.path);
        for (k, v) in &self.headers {
            s.push_str(&format!("{k}: {v}\n"));
        }
        s + &self.body
    }
}

/// Real keys, known only to the host and the fake upstream.
struct Keys {
    anthropic: String,
    openai: String,
}

impl Keys {
    fn new() -> Keys {
        Keys {
            anthropic: format!("sk-ant-REAL-{}", random_hex(16)),
            openai: format!("sk-REAL-{}", random_hex(16)),
        }
    }
}

/// A fake Anthropic Messages API and OpenAI Chat Completions / Responses API
/// on one port. Checks the real key; a stream with `x-test-gate: NAME` stops
/// after its first event until the client creates `/workspace/gate-NAME`.
struct FakeLlm {
    port: u16,
    reqs: Arc<Mutex<Vec<Req>>>,
}

impl FakeLlm {
    fn start(ws: &Path, keys: &Keys) -> FakeLlm {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let reqs = Arc::new(Mutex::new(Vec::new()));
        let (r, ws) = (reqs.clone(), ws.to_path_buf());
        let (ka, ko) = (keys.anthropic.clone(), keys.openai.clone());
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let (r, ws, ka, ko) = (r.clone(), ws.clone(), ka.clone(), ko.clone());
                std::thread::spawn(move || serve(s, &ws, &ka, &ko, &r));
            }
        });
        FakeLlm { port, reqs }
    }
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
    fn requests(&self) -> Vec<Req> {
        self.reqs.lock().unwrap().clone()
    }
}

fn wait_file(p: &Path) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(15) {
        if p.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn reply(s: &mut TcpStream, status: &str, body: &Value) {
    let b = body.to_string();
    let _ = write!(
        s,
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{b}",
        b.len()
    );
}

fn chunk(s: &mut TcpStream, data: &str) {
    let _ = write!(s, "{:x}\r\n{data}\r\n", data.len());
    let _ = s.flush();
}

fn serve(mut s: TcpStream, ws: &Path, ka: &str, ko: &str, log: &Mutex<Vec<Req>>) {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = Vec::new();
    let mut tmp = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i;
        }
        match s.read(&mut tmp) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let path = lines
        .next()
        .unwrap_or("")
        .split(' ')
        .nth(1)
        .unwrap_or("")
        .to_string();
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
            Ok(0) | Err(_) => return,
            Ok(n) => body.extend_from_slice(&tmp[..n]),
        }
    }
    let mut req = Req {
        path: path.clone(),
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
        gated: None,
    };
    let doc: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let stream = doc["stream"] == true;
    let gate = req
        .header("x-test-gate")
        .map(|g| ws.join(format!("gate-{g}")));
    if path == "/v1/messages" {
        // https://docs.anthropic.com/en/api/messages, .../messages-streaming
        if req.header("x-api-key") != Some(ka) || req.header("authorization").is_some() {
            reply(
                &mut s,
                "401 Unauthorized",
                &json!({"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"}}),
            );
        } else if !stream {
            reply(
                &mut s,
                "200 OK",
                &json!({"id":"msg_fake","type":"message","role":"assistant","model":doc["model"],
                    "content":[{"type":"text","text":"hello from fake anthropic"}],
                    "stop_reason":"end_turn","stop_sequence":null,
                    "usage":{"input_tokens":25,"cache_creation_input_tokens":3,"cache_read_input_tokens":7,"output_tokens":12}}),
            );
        } else if req.header("x-test-length").is_some() {
            // A stream framed by Content-Length (as some gateways send it).
            let ev = |t: &str, d: Value| format!("event: {t}\ndata: {d}\n\n");
            let text = [
                ev("message_start", json!({"type":"message_start","message":{"id":"msg_fake","type":"message","role":"assistant","model":doc["model"],"content":[],"stop_reason":null,"usage":{"input_tokens":20,"output_tokens":1}}})),
                ev("message_delta", json!({"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":4}})),
                ev("message_stop", json!({"type":"message_stop"})),
            ]
            .concat();
            let _ = write!(s, "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}", text.len());
        } else {
            let ev = |t: &str, d: Value| format!("event: {t}\ndata: {d}\n\n");
            let _ = write!(s, "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n");
            chunk(
                &mut s,
                &ev(
                    "message_start",
                    json!({"type":"message_start","message":{"id":"msg_fake","type":"message","role":"assistant","model":doc["model"],"content":[],"stop_reason":null,"usage":{"input_tokens":25,"cache_creation_input_tokens":3,"cache_read_input_tokens":7,"output_tokens":1}}}),
                ),
            );
            chunk(
                &mut s,
                &ev(
                    "content_block_start",
                    json!({"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}),
                ),
            );
            req.gated = gate.as_deref().map(wait_file);
            chunk(
                &mut s,
                &ev(
                    "content_block_delta",
                    json!({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"hello streamed"}}),
                ),
            );
            chunk(
                &mut s,
                &ev(
                    "content_block_stop",
                    json!({"type":"content_block_stop","index":0}),
                ),
            );
            chunk(
                &mut s,
                &ev(
                    "message_delta",
                    json!({"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":15}}),
                ),
            );
            chunk(&mut s, &ev("message_stop", json!({"type":"message_stop"})));
            chunk(&mut s, "");
        }
    } else if path == "/v1/chat/completions" || path == "/v1/responses" {
        // https://platform.openai.com/docs/api-reference/chat, .../responses
        let chat = path == "/v1/chat/completions";
        if req.header("authorization") != Some(&format!("Bearer {ko}")) {
            reply(
                &mut s,
                "401 Unauthorized",
                &json!({"error":{"message":"Incorrect API key provided","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}),
            );
        } else if !stream && chat {
            reply(
                &mut s,
                "200 OK",
                &json!({"id":"chatcmpl-fake","object":"chat.completion","created":1,"model":doc["model"],
                    "choices":[{"index":0,"message":{"role":"assistant","content":"hello from fake openai"},"finish_reason":"stop"}],
                    "usage":{"prompt_tokens":9,"completion_tokens":12,"total_tokens":21}}),
            );
        } else if !stream {
            reply(
                &mut s,
                "200 OK",
                &json!({"id":"resp_fake","object":"response","status":"completed","model":doc["model"],
                    "output":[{"type":"message","role":"assistant","content":[{"type":"output_text","text":"hello from responses"}]}],
                    "usage":{"input_tokens":5,"output_tokens":6,"total_tokens":11}}),
            );
        } else {
            let _ = write!(s, "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n");
            let d = |v: Value| format!("data: {v}\n\n");
            if chat {
                let c = |delta: Value, usage: Value| json!({"id":"chatcmpl-fake","object":"chat.completion.chunk","created":1,"model":doc["model"],"choices":[{"index":0,"delta":delta,"finish_reason":null}],"usage":usage});
                chunk(
                    &mut s,
                    &d(c(json!({"role":"assistant","content":""}), Value::Null)),
                );
                req.gated = gate.as_deref().map(wait_file);
                chunk(
                    &mut s,
                    &d(c(json!({"content":"hello streamed"}), Value::Null)),
                );
                chunk(
                    &mut s,
                    &d(
                        json!({"id":"chatcmpl-fake","object":"chat.completion.chunk","created":1,"model":doc["model"],"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":12,"total_tokens":21}}),
                    ),
                );
                chunk(&mut s, "data: [DONE]\n\n");
            } else {
                let e = |t: &str, v: Value| format!("event: {t}\ndata: {v}\n\n");
                chunk(
                    &mut s,
                    &e(
                        "response.created",
                        json!({"type":"response.created","response":{"id":"resp_fake","status":"in_progress"}}),
                    ),
                );
                req.gated = gate.as_deref().map(wait_file);
                chunk(
                    &mut s,
                    &e(
                        "response.output_text.delta",
                        json!({"type":"response.output_text.delta","delta":"hello"}),
                    ),
                );
                chunk(
                    &mut s,
                    &e(
                        "response.completed",
                        json!({"type":"response.completed","response":{"id":"resp_fake","status":"completed","usage":{"input_tokens":5,"output_tokens":6,"total_tokens":11}}}),
                    ),
                );
            }
            chunk(&mut s, "");
        }
    } else {
        reply(&mut s, "404 Not Found", &json!({"error":"no such path"}));
    }
    log.lock().unwrap().push(req);
}

struct Run {
    code: Option<i32>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

impl Run {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    fn line(&self, prefix: &str) -> String {
        self.text()
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix} line: {}", self.text()))
            .to_string()
    }
}

/// `moat sandbox run` with the LLM proxy for both providers, pointed at `fake`.
fn run(sb: &Sandbox, keys: &Keys, fake: &FakeLlm, extra: &[&str], script: &str) -> Run {
    let o = sb
        .command()
        .env("ANTHROPIC_API_KEY", &keys.anthropic)
        .env("OPENAI_API_KEY", &keys.openai)
        .env("MOAT_ANTHROPIC_URL", fake.url())
        .env("MOAT_OPENAI_URL", fake.url())
        .env("MOAT_LLM_ALLOW_PLAIN_HTTP", "1")
        .env("MOAT_LOG", "debug")
        .args(["--llm", "anthropic", "--llm", "openai"])
        .args(extra)
        .args(["--", "/bin/sh", "-c", script])
        .output()
        .expect("running moat");
    Run {
        code: o.status.code(),
        stdout: o.stdout,
        stderr: o.stderr,
    }
}

fn llm_records(sb: &Sandbox) -> Vec<Value> {
    sb.audit()
        .records
        .into_iter()
        .filter(|r| r["kind"] == "llm")
        .collect()
}

fn audit_path(sb: &Sandbox) -> PathBuf {
    sb.dir.join("data").join("audit").join("audit.jsonl")
}

/// Asserts the fake saw the real key and never a placeholder.
fn assert_swapped(reqs: &[Req], keys: &Keys) {
    for r in reqs {
        let all = r.everything();
        assert!(
            !all.contains("moat-"),
            "a placeholder reached upstream: {all}"
        );
        if r.path == "/v1/messages" {
            assert_eq!(
                r.header("x-api-key"),
                Some(keys.anthropic.as_str()),
                "{all}"
            );
            assert!(!all.contains(&keys.openai), "{all}");
        } else {
            assert_eq!(
                r.header("authorization"),
                Some(format!("Bearer {}", keys.openai).as_str()),
                "{all}"
            );
            assert!(!all.contains(&keys.anthropic), "{all}");
        }
    }
}

const CLIENTS_PY: &str = r#"
import json, os, urllib.request
A = os.environ["ANTHROPIC_BASE_URL"]; O = os.environ["OPENAI_BASE_URL"]
AH = {"x-api-key": os.environ["ANTHROPIC_API_KEY"], "anthropic-version": "2023-06-01"}
OH = {"Authorization": "Bearer " + os.environ["OPENAI_API_KEY"]}
def post(url, body, headers):
    h = {"content-type": "application/json"}; h.update(headers)
    return urllib.request.urlopen(urllib.request.Request(url, data=json.dumps(body).encode(), headers=h, method="POST"), timeout=30)
def events(r, gate):
    out = []
    for line in r:
        line = line.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            out.append("DONE"); break
        out.append(json.loads(data))
        if len(out) == 1:
            open("/workspace/gate-" + gate, "w").close()
    return out
res = {}
msg = {"model": "claude-test", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
res["a_plain"] = json.load(post(A + "/v1/messages", msg, AH))
res["a_stream"] = [e["type"] for e in events(post(A + "/v1/messages", dict(msg, stream=True), dict(AH, **{"x-test-gate": "py-a"})), "py-a")]
chat = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
res["o_plain"] = json.load(post(O + "/chat/completions", chat, OH))
res["o_stream"] = events(post(O + "/chat/completions", dict(chat, stream=True, stream_options={"include_usage": True}), dict(OH, **{"x-test-gate": "py-o"})), "py-o")
res["r_plain"] = json.load(post(O + "/responses", {"model": "gpt-test", "input": "hi"}, OH))
print(json.dumps(res))
"#;

/// A stream framed by Content-Length instead of chunks is counted and
/// recorded as complete (the record is written with its last frame).
fn length_framed_stream_is_recorded_whole(b: Backend) {
    let keys = Keys::new();
    let sb = Sandbox::new(b, "llm-length");
    let fake = FakeLlm::start(&sb.ws, &keys);
    let script = r#"curl -sS -N "$ANTHROPIC_BASE_URL/v1/messages" -H "x-api-key: $ANTHROPIC_API_KEY" -H 'x-test-length: 1' -H 'content-type: application/json' -d '{"model":"claude-test","max_tokens":8,"stream":true,"messages":[]}' | grep -c '^event:'"#;
    let out = run(&sb, &keys, &fake, &[], script);
    assert_eq!(
        out.code,
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.text().trim(), "3", "all three events arrived");
    let recs = llm_records(&sb);
    assert_eq!(recs.len(), 1, "{recs:?}");
    let r = &recs[0];
    assert_eq!(r["stream"], true, "{r}");
    assert_eq!(
        r["reason"],
        Value::Null,
        "a whole stream is not 'closed early': {r}"
    );
    assert_eq!(
        (r["input_tokens"].as_u64(), r["output_tokens"].as_u64()),
        (Some(20), Some(4)),
        "{r}"
    );
}

fn clients_complete_calls(b: Backend) {
    let keys = Keys::new();
    let sb = Sandbox::new(b, "llm-clients");
    let fake = FakeLlm::start(&sb.ws, &keys);
    std::fs::write(sb.ws.join("clients.py"), CLIENTS_PY).unwrap();
    let script = r#"
set -e
curl -sS -f -m 30 -o /workspace/a_plain.json "$ANTHROPIC_BASE_URL/v1/messages" -H "x-api-key: $ANTHROPIC_API_KEY" -H "anthropic-version: 2023-06-01" -H "content-type: application/json" -d '{"model":"claude-test","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}'
curl -sS -f -N -m 30 "$ANTHROPIC_BASE_URL/v1/messages" -H "x-api-key: $ANTHROPIC_API_KEY" -H "x-test-gate: curl-a" -H "content-type: application/json" -d '{"model":"claude-test","max_tokens":16,"stream":true,"messages":[{"role":"user","content":"hi"}]}' \
  | while IFS= read -r l; do case "$l" in *message_start*) touch /workspace/gate-curl-a;; esac; printf '%s\n' "$l"; done > /workspace/a_stream.txt
curl -sS -f -m 30 -o /workspace/o_plain.json "$OPENAI_BASE_URL/chat/completions" -H "Authorization: Bearer $OPENAI_API_KEY" -H "content-type: application/json" -d '{"model":"gpt-test","messages":[{"role":"user","content":"hi"}]}'
curl -sS -f -N -m 30 "$OPENAI_BASE_URL/responses" -H "Authorization: Bearer $OPENAI_API_KEY" -H "x-test-gate: curl-r" -H "content-type: application/json" -d '{"model":"gpt-test","input":"hi","stream":true}' \
  | while IFS= read -r l; do case "$l" in *response.created*) touch /workspace/gate-curl-r;; esac; printf '%s\n' "$l"; done > /workspace/r_stream.txt
python3 /workspace/clients.py
"#;
    let out = run(&sb, &keys, &fake, &[], script);
    assert_eq!(
        out.code,
        Some(0),
        "{}\n{}",
        out.text(),
        String::from_utf8_lossy(&out.stderr)
    );
    let read = |n: &str| std::fs::read_to_string(sb.ws.join(n)).unwrap();
    let a: Value = serde_json::from_str(&read("a_plain.json")).unwrap();
    assert_eq!(a["content"][0]["text"], "hello from fake anthropic");
    let a_stream = read("a_stream.txt");
    assert!(
        a_stream.contains("hello streamed") && a_stream.contains("message_stop"),
        "{a_stream}"
    );
    let o: Value = serde_json::from_str(&read("o_plain.json")).unwrap();
    assert_eq!(
        o["choices"][0]["message"]["content"],
        "hello from fake openai"
    );
    assert!(read("r_stream.txt").contains("response.completed"));
    let py: Value = serde_json::from_str(out.text().lines().last().unwrap()).unwrap();
    assert_eq!(py["a_plain"]["usage"]["output_tokens"], 12, "{py}");
    assert_eq!(
        py["a_stream"],
        json!([
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ])
    );
    assert_eq!(py["o_plain"]["usage"]["prompt_tokens"], 9, "{py}");
    assert_eq!(
        py["o_stream"].as_array().unwrap().last().unwrap(),
        "DONE",
        "{py}"
    );
    assert_eq!(py["r_plain"]["usage"]["output_tokens"], 6, "{py}");

    let reqs = fake.requests();
    assert_eq!(reqs.len(), 9, "{reqs:?}");
    assert_swapped(&reqs, &keys);
    // Every stream reached the client event by event, not at its end.
    let gated: Vec<_> = reqs.iter().filter_map(|r| r.gated).collect();
    assert_eq!(
        gated, [true; 4],
        "a stream was held back by the door: {reqs:?}"
    );

    let recs = llm_records(&sb);
    assert_eq!(recs.len(), 9, "{recs:?}");
    for r in &recs {
        assert_eq!(r["verdict"], "allowed", "{r}");
        assert_eq!(r["status"], 200, "{r}");
        assert_eq!(r["lease"], "cli", "{r}");
        assert_eq!(r["port"], fake.port, "{r}");
    }
    let find = |path: &str, stream: bool| -> Vec<&Value> {
        recs.iter()
            .filter(|r| r["path"] == path && r["stream"] == stream)
            .collect()
    };
    for r in find("/v1/messages", false) {
        assert_eq!(
            (
                &r["provider"],
                &r["model"],
                &r["input_tokens"],
                &r["output_tokens"],
                &r["cache_creation_input_tokens"],
                &r["cache_read_input_tokens"]
            ),
            (
                &json!("anthropic"),
                &json!("claude-test"),
                &json!(25),
                &json!(12),
                &json!(3),
                &json!(7)
            ),
            "{r}"
        );
    }
    assert_eq!(find("/v1/messages", true).len(), 2);
    for r in find("/v1/messages", true) {
        assert_eq!(
            (&r["input_tokens"], &r["output_tokens"]),
            (&json!(25), &json!(15)),
            "{r}"
        );
    }
    assert_eq!(find("/v1/chat/completions", false).len(), 2);
    for r in find("/v1/chat/completions", true)
        .into_iter()
        .chain(find("/v1/chat/completions", false))
    {
        assert_eq!(
            (&r["provider"], &r["input_tokens"], &r["output_tokens"]),
            (&json!("openai"), &json!(9), &json!(12)),
            "{r}"
        );
    }
    for r in find("/v1/responses", true)
        .into_iter()
        .chain(find("/v1/responses", false))
    {
        assert_eq!(
            (&r["input_tokens"], &r["output_tokens"]),
            (&json!(5), &json!(6)),
            "{r}"
        );
    }
    sb.audit().assert_well_formed();
}

fn model_allowlist_and_budget(b: Backend) {
    let keys = Keys::new();
    let sb = Sandbox::new(b, "llm-policy");
    let fake = FakeLlm::start(&sb.ws, &keys);
    let script = r#"
a() { curl -sS -m 30 -w ' %{http_code}\n' "$ANTHROPIC_BASE_URL/v1/messages" -H "x-api-key: $ANTHROPIC_API_KEY" -H "content-type: application/json" -d "{\"model\":\"$1\",\"max_tokens\":16,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}"; }
o() { curl -sS -m 30 -w ' %{http_code}\n' "$OPENAI_BASE_URL/chat/completions" -H "Authorization: Bearer $OPENAI_API_KEY" -H "content-type: application/json" -d "{\"model\":\"$1\",\"messages\":[]}"; }
echo "BADMODEL_A=$(a claude-other)"
echo "BADMODEL_O=$(o gpt-other)"
echo "FIRST=$(a claude-ok)"
echo "OVER_A=$(a claude-ok)"
echo "OVER_O=$(o gpt-ok)"
"#;
    let out = run(
        &sb,
        &keys,
        &fake,
        &[
            "--llm-model",
            "claude-ok",
            "--llm-model",
            "gpt-ok",
            "--llm-budget",
            "30",
        ],
        script,
    );
    assert_eq!(out.code, Some(0), "{}", out.text());
    let bad = out.line("BADMODEL_A=");
    assert!(
        bad.ends_with(" 403")
            && bad.contains(r#""type":"error""#)
            && bad.contains("permission_error")
            && bad.contains("claude-other is not allowed"),
        "{bad}"
    );
    let bad = out.line("BADMODEL_O=");
    assert!(
        bad.ends_with(" 403") && bad.contains(r#""code":"model_not_allowed""#),
        "{bad}"
    );
    assert!(out.line("FIRST=").ends_with(" 200"));
    // 25 + 3 + 7 + 12 = 47 tokens used of 30: the next call is refused.
    let over = out.line("OVER_A=");
    assert!(
        over.ends_with(" 429")
            && over.contains("rate_limit_error")
            && over.contains("token budget"),
        "{over}"
    );
    let over = out.line("OVER_O=");
    assert!(
        over.ends_with(" 429") && over.contains(r#""code":"budget_exceeded""#),
        "{over}"
    );
    assert_eq!(fake.requests().len(), 1, "a refused call reached upstream");
    let recs = llm_records(&sb);
    let denied: Vec<_> = recs.iter().filter(|r| r["verdict"] == "denied").collect();
    assert_eq!(denied.len(), 4, "{recs:?}");
    sb.audit().assert_well_formed();
}

/// `--llm-user-budget` spans runs (the CLI seeds the user's total from the
/// audit log), is per user, and the records carry user and channel.
fn user_budget_spans_runs(b: Backend) {
    let keys = Keys::new();
    let sb = Sandbox::new(b, "llm-user");
    let fake = FakeLlm::start(&sb.ws, &keys);
    let script = r#"
a() { curl -sS -m 30 -w ' %{http_code}\n' "$ANTHROPIC_BASE_URL/v1/messages" -H "x-api-key: $ANTHROPIC_API_KEY" -H "content-type: application/json" -d '{"model":"claude-test","max_tokens":16,"messages":[]}'; }
o() { curl -sS -m 30 -w ' %{http_code}\n' "$OPENAI_BASE_URL/chat/completions" -H "Authorization: Bearer $OPENAI_API_KEY" -H "content-type: application/json" -d '{"model":"gpt-test","messages":[]}'; }
echo "FIRST=$(a)"
echo "SECOND=$(a)"
echo "OPENAI=$(o)"
"#;
    let user = |name: &str, channel: Option<&str>| {
        let mut a = vec!["--user", name, "--llm-user-budget", "40"];
        if let Some(c) = channel {
            a.extend(["--channel", c]);
        }
        let out = run(&sb, &keys, &fake, &a, script);
        assert_eq!(out.code, Some(0), "{}", out.text());
        out
    };
    let ok = |l: String| assert!(l.ends_with(" 200"), "{l}");
    let spent = |l: String, used: u64| {
        assert!(
            l.ends_with(" 429")
                && l.contains(&format!(
                    "user alice's token budget is spent ({used} of 40 tokens used)"
                )),
            "{l}"
        );
    };
    // Run 1: alice's first call (25 + 3 + 7 + 12 = 47 tokens) uses up her 40;
    // the next ones are refused, in both APIs' shapes.
    let r1 = user("alice", Some("chat-7"));
    ok(r1.line("FIRST="));
    spent(r1.line("SECOND="), 47);
    let o = r1.line("OPENAI=");
    assert!(
        o.ends_with(" 429")
            && o.contains(r#""code":"budget_exceeded""#)
            && o.contains("user alice's"),
        "{o}"
    );
    // Run 2, a new sandbox and door: alice is still over, from the first call on.
    let r2 = user("alice", None);
    spent(r2.line("FIRST="), 47);
    spent(r2.line("SECOND="), 47);
    // Bob has his own budget: his first call goes through.
    let r3 = user("bob", None);
    ok(r3.line("FIRST="));
    let l = r3.line("SECOND=");
    assert!(
        l.ends_with(" 429") && l.contains("user bob's token budget is spent (47 of 40"),
        "{l}"
    );
    // Without --user, the invoking user ($USER) is the label, channel `cli`.
    let out = sb
        .command()
        .env("ANTHROPIC_API_KEY", &keys.anthropic)
        .env("MOAT_ANTHROPIC_URL", fake.url())
        .env("MOAT_LLM_ALLOW_PLAIN_HTTP", "1")
        .env("USER", "carol")
        .args(["--llm", "anthropic", "--llm-user-budget", "40"])
        .args(["--", "/bin/sh", "-c", script])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let out = Run {
        code: out.status.code(),
        stdout: out.stdout,
        stderr: out.stderr,
    };
    ok(out.line("FIRST="));
    assert_eq!(fake.requests().len(), 3, "a refused call reached upstream");
    let recs = llm_records(&sb);
    let who: Vec<(String, String, String, u64)> = recs
        .iter()
        .map(|r| {
            (
                r["user"].as_str().unwrap_or("-").to_string(),
                r["channel"].as_str().unwrap_or("-").to_string(),
                r["verdict"].as_str().unwrap_or("-").to_string(),
                r["input_tokens"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    let w = |u: &str, c: &str, v: &str, t: u64| (u.to_string(), c.to_string(), v.to_string(), t);
    assert_eq!(
        who,
        vec![
            w("alice", "chat-7", "allowed", 25),
            w("alice", "chat-7", "denied", 0),
            w("alice", "chat-7", "denied", 0),
            w("alice", "cli", "denied", 0),
            w("alice", "cli", "denied", 0),
            w("alice", "cli", "denied", 0),
            w("bob", "cli", "allowed", 25),
            w("bob", "cli", "denied", 0),
            w("bob", "cli", "denied", 0),
            // (carol's run serves Anthropic only: no OpenAI call was made.)
            w("carol", "cli", "allowed", 25),
            w("carol", "cli", "denied", 0),
        ],
        "{recs:?}"
    );
    sb.audit().assert_well_formed();
}

fn attack_c1(b: Backend) {
    let keys = Keys::new();
    let sb = Sandbox::new(b, "llm-c1");
    let fake = FakeLlm::start(&sb.ws, &keys);
    // A call first, so the door has used the key; then everything readable.
    let script = r#"
curl -sS -f -m 30 -o /workspace/out.json "$ANTHROPIC_BASE_URL/v1/messages" -H "x-api-key: $ANTHROPIC_API_KEY" -H "content-type: application/json" -d '{"model":"claude-test","max_tokens":16,"messages":[]}' || echo CALL-FAILED
echo "PH_A=$ANTHROPIC_API_KEY"
echo "PH_O=$OPENAI_API_KEY"
env
for f in /proc/[0-9]*/environ /proc/[0-9]*/cmdline /proc/self/environ; do cat "$f" 2>/dev/null; echo; done
find /workspace /home/agent /tmp /etc -xdev -type f -size -4M -exec cat {} + 2>/dev/null
echo SCAN-DONE
"#;
    let out = run(&sb, &keys, &fake, &[], script);
    assert_eq!(
        out.code,
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = out.text();
    assert!(
        !text.lines().any(|l| l == "CALL-FAILED") && text.lines().last() == Some("SCAN-DONE"),
        "{text}"
    );
    // The scan did see the environment and the files it had to.
    let ph_a = out.line("PH_A=");
    let ph_o = out.line("PH_O=");
    assert!(
        ph_a.starts_with("sk-ant-moat-") && ph_a.len() == 12 + 32,
        "{ph_a}"
    );
    assert!(
        ph_o.starts_with("sk-moat-") && ph_o.len() == 8 + 32,
        "{ph_o}"
    );
    assert!(text.contains("ANTHROPIC_BASE_URL=http://127.0.0.1:8787/anthropic"));
    assert!(text.contains("OPENAI_BASE_URL=http://127.0.0.1:8787/openai/v1"));
    assert!(text.contains("root:"), "/etc/passwd was not read");
    for key in [&keys.anthropic, &keys.openai] {
        let needle = key.as_bytes();
        assert!(
            find(&out.stdout, needle).is_none(),
            "the real key is readable inside the sandbox"
        );
        assert!(
            find(&out.stderr, needle).is_none(),
            "the real key is in moat's log"
        );
        let audit = std::fs::read(audit_path(&sb)).unwrap();
        assert!(
            find(&audit, needle).is_none(),
            "the real key is in the audit log"
        );
        // The placeholders are not in the audit log either.
        for ph in [&ph_a, &ph_o] {
            assert!(
                find(&audit, ph.as_bytes()).is_none(),
                "a placeholder is in the audit log"
            );
        }
    }
    assert_eq!(fake.requests().len(), 1);
    assert_swapped(&fake.requests(), &keys);
}

fn attack_c2(b: Backend) {
    let keys = Keys::new();
    // Another lease's placeholders.
    let other = Sandbox::new(b, "llm-c2-other");
    let fake = FakeLlm::start(&other.ws, &keys);
    let o = run(
        &other,
        &keys,
        &fake,
        &[],
        "echo PH_A=$ANTHROPIC_API_KEY; echo PH_O=$OPENAI_API_KEY",
    );
    let (other_a, other_o) = (o.line("PH_A="), o.line("PH_O="));

    let up = Upstream::loopback();
    let p = up.port;
    let mut sb = Sandbox::new(b, "llm-c2");
    sb.allow(&format!("web.test:{p}"))
        .pin("web.test", "127.0.0.1");
    let script = format!(
        r#"
echo "PH_A=$ANTHROPIC_API_KEY"
echo "PH_O=$OPENAI_API_KEY"
echo "ELSEWHERE=$(curl -sS -m 10 http://web.test:{p}/c2 -H "x-api-key: $ANTHROPIC_API_KEY" -H "Authorization: Bearer $OPENAI_API_KEY")"
m() {{ curl -sS -m 10 -w ' %{{http_code}}' "$ANTHROPIC_BASE_URL/v1/messages" -H "content-type: application/json" "$@" -d '{{"model":"claude-test","max_tokens":16,"messages":[]}}'; }}
c() {{ curl -sS -m 10 -w ' %{{http_code}}' "$OPENAI_BASE_URL/chat/completions" -H "content-type: application/json" "$@" -d '{{"model":"gpt-test","messages":[]}}'; }}
echo "NOKEY_A=$(m)"
echo "OTHER_A=$(m -H 'x-api-key: {other_a}')"
echo "OTHER_A_BEARER=$(m -H 'Authorization: Bearer {other_a}')"
echo "CROSS_A=$(m -H "x-api-key: $OPENAI_API_KEY")"
echo "NOKEY_O=$(c)"
echo "OTHER_O=$(c -H 'Authorization: Bearer {other_o}')"
echo "XAPI_O=$(c -H "x-api-key: $OPENAI_API_KEY")"
echo "DOTS=$(curl -sS -m 10 -w ' %{{http_code}}' --path-as-is "$ANTHROPIC_BASE_URL/v1/../../x" -H "x-api-key: $ANTHROPIC_API_KEY" -d '{{}}')"
"#
    );
    let out = run(&sb, &keys, &fake, &[], &script);
    assert_eq!(out.code, Some(0), "{}", out.text());
    let (ph_a, ph_o) = (out.line("PH_A="), out.line("PH_O="));
    assert_ne!(ph_a, other_a, "two leases share a placeholder");
    assert_ne!(ph_o, other_o, "two leases share a placeholder");
    // Sent to another allowed host, the placeholder arrives as it was sent.
    assert!(
        out.line("ELSEWHERE=").starts_with("upstream-ok GET /c2"),
        "{}",
        out.text()
    );
    let hits = up.hits();
    assert_eq!(hits.len(), 1);
    let seen = hits[0].text();
    assert!(seen.contains(&format!("x-api-key: {ph_a}")), "{seen}");
    assert!(
        seen.contains(&format!("Authorization: Bearer {ph_o}")),
        "{seen}"
    );
    assert!(
        !seen.contains(&keys.anthropic) && !seen.contains(&keys.openai),
        "{seen}"
    );
    // The LLM proxy refuses anything but this lease's own placeholder.
    for k in ["NOKEY_A", "OTHER_A", "OTHER_A_BEARER", "CROSS_A"] {
        let l = out.line(&format!("{k}="));
        assert!(
            l.ends_with(" 401")
                && l.contains(r#""type":"error""#)
                && l.contains("authentication_error"),
            "{k}: {l}"
        );
    }
    for k in ["NOKEY_O", "OTHER_O", "XAPI_O"] {
        let l = out.line(&format!("{k}="));
        assert!(
            l.ends_with(" 401") && l.contains(r#""code":"invalid_api_key""#),
            "{k}: {l}"
        );
    }
    let dots = out.line("DOTS=");
    assert!(
        dots.ends_with(" 400") && dots.contains("dot segments"),
        "{dots}"
    );
    assert!(
        fake.requests().is_empty(),
        "a refused call reached upstream: {:?}",
        fake.requests()
    );
    let recs = llm_records(&sb);
    assert_eq!(recs.len(), 7, "{recs:?}");
    assert!(
        recs.iter()
            .all(|r| r["verdict"] == "denied" && r["status"] == 401),
        "{recs:?}"
    );
    let audit = std::fs::read_to_string(audit_path(&sb)).unwrap();
    for s in [&ph_a, &ph_o, &other_a, &other_o] {
        assert!(
            !audit.contains(s.as_str()),
            "a placeholder is in the audit log"
        );
    }
}

/// The real keys from a secrets file (`--secrets FILE` or
/// `MOAT_SECRETS_FILE`), after moat's environment; a loose file is refused.
#[test]
fn llm_keys_from_a_secrets_file() {
    use std::os::unix::fs::PermissionsExt;
    if !Backend::Bwrap.available() {
        return;
    }
    let keys = Keys::new();
    let sb = Sandbox::new(Backend::Bwrap, "llm-secrets");
    let fake = FakeLlm::start(&sb.ws, &keys);
    let file = sb.dir.join("secrets");
    let write = |text: &str, mode: u32| {
        std::fs::write(&file, text).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    write(
        &format!(
            "# the host's keys\nANTHROPIC_API_KEY=\"{}\"\n\nOPENAI_API_KEY='{}'\n",
            keys.anthropic, keys.openai
        ),
        0o600,
    );
    let script = r#"
echo "A=$(curl -sS -m 30 -w ' %{http_code}' "$ANTHROPIC_BASE_URL/v1/messages" -H "x-api-key: $ANTHROPIC_API_KEY" -H "content-type: application/json" -d '{"model":"claude-test","max_tokens":16,"messages":[]}')"
echo "O=$(curl -sS -m 30 -w ' %{http_code}' "$OPENAI_BASE_URL/chat/completions" -H "Authorization: Bearer $OPENAI_API_KEY" -H "content-type: application/json" -d '{"model":"gpt-test","messages":[]}')"
"#;
    let moat = |flag: bool, env_file: Option<&Path>, env_key: Option<&str>| {
        let mut c = sb.command();
        c.env_remove("ANTHROPIC_API_KEY")
            .env_remove("OPENAI_API_KEY")
            .env_remove("MOAT_SECRETS_FILE")
            .env("MOAT_ANTHROPIC_URL", fake.url())
            .env("MOAT_OPENAI_URL", fake.url())
            .env("MOAT_LLM_ALLOW_PLAIN_HTTP", "1");
        if flag {
            c.arg("--secrets").arg(&file);
        }
        if let Some(f) = env_file {
            c.env("MOAT_SECRETS_FILE", f);
        }
        if let Some(k) = env_key {
            c.env("ANTHROPIC_API_KEY", k);
        }
        let o = c
            .args([
                "--llm",
                "anthropic",
                "--llm",
                "openai",
                "--",
                "/bin/sh",
                "-c",
                script,
            ])
            .output()
            .unwrap();
        let r = Run {
            code: o.status.code(),
            stdout: o.stdout,
            stderr: o.stderr,
        };
        for k in [&keys.anthropic, &keys.openai] {
            assert!(
                find(&r.stderr, k.as_bytes()).is_none(),
                "a key in moat's log"
            );
            assert!(
                find(&r.stdout, k.as_bytes()).is_none(),
                "a key in the sandbox"
            );
        }
        r
    };
    let both_ok = |r: &Run| {
        assert_eq!(r.code, Some(0), "{}", String::from_utf8_lossy(&r.stderr));
        assert!(r.line("A=").ends_with(" 200"), "{}", r.text());
        assert!(r.line("O=").ends_with(" 200"), "{}", r.text());
    };
    // --secrets FILE; MOAT_SECRETS_FILE; the flag wins over the variable.
    both_ok(&moat(true, None, None));
    both_ok(&moat(false, Some(&file), None));
    both_ok(&moat(true, Some(&sb.dir.join("no-such-file")), None));
    assert_eq!(fake.requests().len(), 6);
    assert_swapped(&fake.requests(), &keys);
    // moat's environment comes first: a wrong key there is what upstream gets.
    let r = moat(true, None, Some("sk-ant-from-env"));
    assert!(r.line("A=").ends_with(" 401"), "{}", r.text());
    assert!(r.line("O=").ends_with(" 200"), "{}", r.text());
    let last = fake.requests();
    assert_eq!(
        last[last.len() - 2].header("x-api-key"),
        Some("sk-ant-from-env")
    );
    // A file others can read, or a malformed one, stops moat before the sandbox.
    let refused = |r: Run, want: &str| {
        assert_eq!(r.code, Some(125), "{}", r.text());
        let err = String::from_utf8_lossy(&r.stderr).into_owned();
        assert!(err.contains(want), "{err}");
        assert!(err.contains(&file.display().to_string()), "{err}");
    };
    write(&format!("ANTHROPIC_API_KEY={}\n", keys.anthropic), 0o644);
    refused(
        moat(true, None, None),
        &format!("chmod 600 {}", file.display()),
    );
    write(&format!("OPENAI_API_KEY=x\n{}\n", keys.anthropic), 0o600);
    refused(moat(true, None, None), "line 2: no `=`");
    write("OPENAI_API_KEY=a\nOPENAI_API_KEY=b\n", 0o600);
    refused(moat(false, Some(&file), None), "already set on line 1");
    assert_eq!(fake.requests().len(), 8, "a refused run called upstream");
}

#[test]
fn llm_without_the_host_key_fails_naming_the_variable() {
    let sb = Sandbox::new(Backend::Bwrap, "llm-nokey");
    let o = sb
        .command()
        .env_remove("OPENAI_API_KEY")
        .args(["--llm", "openai", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(125));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("OPENAI_API_KEY is not set"), "{err}");
    let o = sb
        .command()
        .env("ANTHROPIC_API_KEY", "x")
        .env("MOAT_ANTHROPIC_URL", "http://127.0.0.1:1")
        .env_remove("MOAT_LLM_ALLOW_PLAIN_HTTP")
        .args(["--llm", "anthropic", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(125));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("MOAT_LLM_ALLOW_PLAIN_HTTP=1"), "{err}");
}

net_tests! {
    llm_curl_and_python_complete_messages_and_chat_calls => clients_complete_calls;
    llm_length_framed_stream_is_recorded_whole => length_framed_stream_is_recorded_whole;
    llm_model_allowlist_and_token_budget => model_allowlist_and_budget;
    llm_user_budget_spans_runs_per_user_with_channel_in_audit => user_budget_spans_runs;
    attack_c1_real_llm_key_is_nowhere_in_the_sandbox => attack_c1;
    attack_c2_placeholder_sent_elsewhere_is_never_swapped => attack_c2;
}
