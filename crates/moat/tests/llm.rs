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
/// after its first event until the client creates `/workspace/gate-NAME`
/// (then waits `x-test-pause-ms` more); `x-test-cut` ends a stream after its
/// first event without its usage or its end; `x-test-echo` sends the key it
/// received back in headers and body (a hostile or careless upstream). A Chat
/// Completions stream carries its usage only when the request asks
/// (`stream_options.include_usage`), as OpenAI's does.
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
    let pause = req
        .header("x-test-pause-ms")
        .and_then(|p| p.parse().ok())
        .map(Duration::from_millis);
    let gate_wait = |req: &mut Req| {
        req.gated = gate.as_deref().map(wait_file);
        if let Some(p) = pause {
            std::thread::sleep(p);
        }
    };
    let cut = req.header("x-test-cut").is_some();
    if req.header("x-test-echo").is_some() {
        let key = req
            .header("x-api-key")
            .or_else(|| {
                req.header("authorization")
                    .and_then(|a| a.strip_prefix("Bearer "))
            })
            .unwrap_or("")
            .to_string();
        if req.header("x-test-echo") == Some("gzip") {
            // Labelled compressed: the door cannot look inside.
            let _ = write!(s, "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: gzip\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{key}", key.len());
        } else {
            echo_key(&mut s, &key, stream, &path);
        }
        log.lock().unwrap().push(req);
        return;
    }
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
            if cut {
                log.lock().unwrap().push(req);
                return;
            }
            chunk(
                &mut s,
                &ev(
                    "content_block_start",
                    json!({"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}),
                ),
            );
            gate_wait(&mut req);
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
        } else if !stream && doc["background"] == true {
            // A background response: queued, its usage known only later.
            reply(
                &mut s,
                "200 OK",
                &json!({"id":"resp_fake","object":"response","status":"queued","model":doc["model"],"output":[],"usage":null}),
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
                if cut {
                    log.lock().unwrap().push(req);
                    return;
                }
                gate_wait(&mut req);
                chunk(
                    &mut s,
                    &d(c(json!({"content":"hello streamed"}), Value::Null)),
                );
                if doc["stream_options"]["include_usage"] == true {
                    chunk(
                        &mut s,
                        &d(
                            json!({"id":"chatcmpl-fake","object":"chat.completion.chunk","created":1,"model":doc["model"],"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":12,"total_tokens":21}}),
                        ),
                    );
                }
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
                gate_wait(&mut req);
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

/// Sends `key` back: as a 401 with the key in headers and the error message,
/// or as a 200 stream whose text holds the key split across two chunks.
fn echo_key(s: &mut TcpStream, key: &str, stream: bool, path: &str) {
    if !stream {
        let b = json!({"type":"error","error":{"type":"authentication_error",
            "message": format!("Incorrect API key provided: {key}")}})
        .to_string();
        let _ = write!(
            s,
            "HTTP/1.1 401 Bad key {key}\r\ncontent-type: application/json\r\nx-echo: key={key}\r\nwww-authenticate: Bearer error=\"invalid_token\", key=\"{key}\"\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{b}",
            b.len()
        );
        return;
    }
    let _ = write!(s, "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nx-echo: {key}\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n");
    let text = if path == "/v1/messages" {
        let ev = |t: &str, d: Value| format!("event: {t}\ndata: {d}\n\n");
        [
            ev("message_start", json!({"type":"message_start","message":{"id":"msg_echo","usage":{"input_tokens":5,"output_tokens":1}}})),
            ev("content_block_delta", json!({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":format!("echo={key} and again {key}")}})),
            ev("message_delta", json!({"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":4}})),
            ev("message_stop", json!({"type":"message_stop"})),
        ]
        .concat()
    } else {
        let d = |v: Value| format!("data: {v}\n\n");
        [
            d(json!({"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":format!("echo={key} and again {key}")}}]})),
            d(json!({"object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":4}})),
            "data: [DONE]\n\n".to_string(),
        ]
        .concat()
    };
    // Cut in the middle of each copy of the key, and one byte after its start.
    let mut cuts: Vec<usize> = text
        .match_indices(key)
        .flat_map(|(i, _)| [i + 1, i + key.len() / 2])
        .collect();
    cuts.push(text.len());
    let mut at = 0;
    for c in cuts {
        chunk(s, &text[at..c]);
        std::thread::sleep(Duration::from_millis(20));
        at = c;
    }
    chunk(s, "");
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
    assert_eq!(recs.len(), 8, "{recs:?}");
    assert!(
        recs.iter().all(|r| r["verdict"] == "denied"
            && ((r["status"] == 401 && r["refusal"] == "bad_key")
                || (r["status"] == 400 && r["refusal"] == "bad_path"))),
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

/// The hostile client of the C5 tests: raw HTTP to the door (`http.client`,
/// so paths, bodies and headers go exactly as written).
const C5_PY: &str = r#"
import http.client, json, os, socket, sys
KEYS = {"/anthropic": ("x-api-key", os.environ["ANTHROPIC_API_KEY"]),
        "/openai": ("authorization", "Bearer " + os.environ["OPENAI_API_KEY"])}
def conn():
    return http.client.HTTPConnection("127.0.0.1", 8787, timeout=30)
def headers(path, extra):
    h = {"content-type": "application/json"}
    for prefix, (k, v) in KEYS.items():
        if path.startswith(prefix):
            h[k] = v
    h.update(extra or {})
    return h
def call(method, path, body=None, extra=None, raw=None):
    c = conn()
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    c.putrequest(method, path, skip_accept_encoding=True)
    for k, v in headers(path, extra).items():
        c.putheader(k, v)
    if data is not None:
        c.putheader("content-length", str(len(data)))
    c.endheaders(data)
    r = c.getresponse()
    body = r.read().decode("utf-8", "replace")
    out = {"status": r.status, "reason": r.reason,
           "headers": "\n".join("%s: %s" % kv for kv in r.getheaders()), "body": body}
    c.close()
    return out
def abandon(path, body, gate):
    """Opens a stream, reads its first event, hangs up with the rest unread."""
    c = conn()
    c.request("POST", path, body=json.dumps(body).encode(),
              headers=headers(path, {"x-test-gate": gate, "x-test-pause-ms": "500"}))
    r = c.getresponse()
    if r.status != 200:
        r.read(); c.close()
        return r.status
    while True:
        line = r.fp.readline()
        if not line or line.startswith(b"data:"):
            break
    open("/workspace/gate-" + gate, "w").close()
    c.sock.shutdown(socket.SHUT_RDWR)
    r.close(); c.close()
    return r.status
MSG = [{"role": "user", "content": "hi"}]
BODIES = {
    "anthropic": ("/anthropic/v1/messages", {"model": "claude-test", "max_tokens": 64, "stream": True, "messages": MSG}),
    "chat": ("/openai/v1/chat/completions", {"model": "gpt-test", "stream": True, "messages": MSG}),
    "responses": ("/openai/v1/responses", {"model": "gpt-test", "stream": True, "input": "hi"}),
}
mode = sys.argv[1]
res = {}
if mode == "abandon":
    path, body = BODIES[sys.argv[2]]
    res = [abandon(path, body, "%s-%d" % (sys.argv[2], i)) for i in range(6)]
elif mode == "echo":
    for name, (path, body) in BODIES.items():
        if name == "responses":
            continue
        res[name + "-plain"] = call("POST", path, dict(body, stream=False), {"x-test-echo": "1"})
        res[name + "-stream"] = call("POST", path, body, {"x-test-echo": "1"})
    path, body = BODIES["anthropic"]
    res["gzip"] = call("POST", path, dict(body, stream=False), {"x-test-echo": "gzip"})
elif mode == "paths":
    for p in sys.argv[2:]:
        res[p] = call("POST", p, {"model": "claude-test", "max_tokens": 8, "messages": MSG})
elif mode == "models":
    A = "/anthropic/v1/messages"
    ok = {"model": "claude-ok", "max_tokens": 8, "messages": MSG}
    res["ok"] = call("POST", A, ok)
    res["query"] = call("POST", A + "?model=claude-bad", ok)
    res["query encoded"] = call("POST", A + "?beta=true&%6Dodel=claude-bad", ok)
    res["azure path"] = call("POST", "/openai/deployments/gpt-bad/chat/completions?api-version=1", {"model": "gpt-ok", "messages": MSG})
    res["duplicate bad last"] = call("POST", A, raw=b'{"model":"claude-ok","max_tokens":8,"messages":[],"model":"claude-bad"}')
    res["duplicate bad first"] = call("POST", A, raw=b'{"model":"claude-bad","model":"claude-ok","max_tokens":8,"messages":[]}')
    res["duplicate escaped"] = call("POST", A, raw=b'{"model":"claude-ok","mod\\u0065l":"claude-bad","messages":[]}')
    res["nested params"] = call("POST", A, dict(ok, params={"model": "claude-bad"}))
    res["batch"] = call("POST", A + "/batches", {"requests": [{"custom_id": "a", "params": dict(ok, model="claude-bad")}]})
    res["get with body"] = call("GET", "/openai/v1/models", {"model": "gpt-bad"})
    res["override"] = call("POST", A, dict(ok, model="claude-bad"), {"X-HTTP-Method-Override": "GET"})
    res["override on get"] = call("GET", "/anthropic/v1/models", None, {"X-HTTP-Method-Override": "POST"})
    res["model not a string"] = call("POST", A, dict(ok, model=["claude-ok", "claude-bad"]))
    res["not json"] = call("POST", A, raw=b"model=claude-bad")
print(json.dumps(res))
"#;

/// Runs `c5.py ARGS` in a sandbox through the door; its JSON output.
fn c5(sb: &Sandbox, keys: &Keys, fake: &FakeLlm, flags: &[&str], args: &str) -> (Value, Run) {
    std::fs::write(sb.ws.join("c5.py"), C5_PY).unwrap();
    let out = run(
        sb,
        keys,
        fake,
        flags,
        &format!("python3 /workspace/c5.py {args}"),
    );
    assert_eq!(
        out.code,
        Some(0),
        "{}\n{}",
        out.text(),
        String::from_utf8_lossy(&out.stderr)
    );
    let v = serde_json::from_str(out.text().lines().last().unwrap_or("")).unwrap();
    (v, out)
}

/// Neither real key in what the sandbox's client got, moat's log or the audit log.
fn assert_no_real_key(sb: &Sandbox, keys: &Keys, out: &Run) {
    let audit = std::fs::read(audit_path(sb)).unwrap_or_default();
    for key in [&keys.anthropic, &keys.openai] {
        let k = key.as_bytes();
        assert!(
            find(&out.stdout, k).is_none(),
            "the real key reached the sandbox: {}",
            out.text()
        );
        assert!(
            find(&out.stderr, k).is_none(),
            "the real key is in moat's log"
        );
        assert!(
            find(&audit, k).is_none(),
            "the real key is in the audit log"
        );
    }
}

fn wait_requests(fake: &FakeLlm, n: usize) -> Vec<Req> {
    let t0 = Instant::now();
    while fake.requests().len() < n && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    fake.requests()
}

/// A client that hangs up a stream before its usage event is still charged
/// the call's whole usage (the door reads on after it left: Anthropic 50
/// tokens a call, Chat Completions 21 though its client did not ask for
/// usage, Responses 11), and while it is read the budget holds the call's
/// estimate: under a budget of 40 tokens, one call of six goes upstream.
fn attack_c5_abandoned_streams(b: Backend) {
    let keys = Keys::new();
    let sb = Sandbox::new(b, "llm-c5-abandon");
    let fake = FakeLlm::start(&sb.ws, &keys);
    for (i, (api, path)) in [
        ("anthropic", "/v1/messages"),
        ("chat", "/v1/chat/completions"),
        ("responses", "/v1/responses"),
    ]
    .into_iter()
    .enumerate()
    {
        // (The sleep lets the door finish reading the abandoned stream
        // before the run ends.)
        let (v, out) = c5(
            &sb,
            &keys,
            &fake,
            &["--llm-budget", "40"],
            &format!("abandon {api}; sleep 1.5"),
        );
        assert_eq!(
            v,
            json!([200, 429, 429, 429, 429, 429]),
            "{api}: the budget did not hold"
        );
        let reqs = wait_requests(&fake, i + 1);
        assert_eq!(reqs.len(), i + 1, "{api}: {reqs:?}");
        assert_eq!(reqs[i].path, path);
        // The call was abandoned with the rest of the stream unread.
        assert_eq!(reqs[i].gated, Some(true), "{api}");
        assert_swapped(&reqs, &keys);
        assert_no_real_key(&sb, &keys, &out);
    }
    let recs = llm_records(&sb);
    let allowed: Vec<&Value> = recs.iter().filter(|r| r["verdict"] == "allowed").collect();
    assert_eq!(allowed.len(), 3, "{recs:?}");
    for r in &allowed {
        let total: u64 = [
            "input_tokens",
            "output_tokens",
            "cache_creation_input_tokens",
            "cache_read_input_tokens",
        ]
        .iter()
        .map(|k| r[*k].as_u64().unwrap_or(0))
        .sum();
        let want = match r["path"].as_str() {
            Some("/v1/messages") => 50,
            Some("/v1/chat/completions") => 21,
            _ => 11,
        };
        assert_eq!(total, want, "{r}");
        let reason = r["reason"].as_str().unwrap_or("");
        assert!(
            reason.contains("closed the stream early; its usage was read from the upstream"),
            "{r}"
        );
    }
    let denied: Vec<&Value> = recs.iter().filter(|r| r["verdict"] == "denied").collect();
    assert_eq!(denied.len(), 15, "{recs:?}");
    assert!(denied
        .iter()
        .all(|r| r["refusal"] == "budget_spent" && r["status"] == 429));
    sb.audit().assert_well_formed();
}

/// A stream whose usage never comes is charged the request's output limit
/// (or 32768 output tokens without one); a Chat Completions stream whose
/// client did not ask for usage is asked for it upstream, counted, and the
/// client does not see the extra chunk; a background Responses call (no
/// usage in its answer) is charged its limit.
fn attack_c5_streams_without_usage(b: Backend) {
    let keys = Keys::new();
    let sb = Sandbox::new(b, "llm-c5-nousage");
    let fake = FakeLlm::start(&sb.ws, &keys);
    let a = r#"curl -sS -N -m 30 -w ' %{http_code}\n' "$ANTHROPIC_BASE_URL/v1/messages" -H "x-api-key: $ANTHROPIC_API_KEY" -H "content-type: application/json""#;
    let o = r#"curl -sS -N -m 30 -w ' %{http_code}\n' "$OPENAI_BASE_URL/chat/completions" -H "Authorization: Bearer $OPENAI_API_KEY" -H "content-type: application/json""#;
    let script = format!(
        r#"
echo "CUT_A=$({a} -H 'x-test-cut: 1' -d '{{"model":"claude-test","max_tokens":64,"stream":true,"messages":[]}}' | tr '\n' ' ')"
echo "AFTER_A=$({a} -d '{{"model":"claude-test","max_tokens":8,"messages":[]}}')"
"#
    );
    let out = run(&sb, &keys, &fake, &["--llm-budget", "40"], &script);
    assert_eq!(out.code, Some(0), "{}", out.text());
    assert_no_real_key(&sb, &keys, &out);
    assert!(
        out.line("CUT_A=").contains("message_start"),
        "{}",
        out.text()
    );
    // 25 + 3 + 7 input and cache tokens as sent, output at max_tokens 64: 99.
    let after = out.line("AFTER_A=");
    assert!(
        after.ends_with(" 429") && after.contains("(99 of 40 tokens used)"),
        "{after}"
    );
    assert_eq!(wait_requests(&fake, 1).len(), 1);

    let script = format!(
        r#"
echo "CHAT=$({o} -d '{{"model":"gpt-test","stream":true,"messages":[]}}' | tr '\n' ' ')"
echo "CUT_O=$({o} -H 'x-test-cut: 1' -d '{{"model":"gpt-test","stream":true,"messages":[]}}' | tr '\n' ' ')"
echo "AFTER_O=$({o} -d '{{"model":"gpt-test","messages":[]}}')"
"#
    );
    let out = run(&sb, &keys, &fake, &["--llm-budget", "40"], &script);
    assert_eq!(out.code, Some(0), "{}", out.text());
    assert_no_real_key(&sb, &keys, &out);
    let chat = out.line("CHAT=");
    assert!(
        chat.contains("hello streamed")
            && chat.contains("[DONE]")
            && chat.trim_end().ends_with(" 200"),
        "{chat}"
    );
    assert!(
        !chat.contains("\"choices\":[]") && !chat.contains("prompt_tokens"),
        "the usage chunk the door asked for reached a client that did not: {chat}"
    );
    let after = out.line("AFTER_O=");
    assert!(
        after.ends_with(" 429") && after.contains("budget_exceeded"),
        "{after}"
    );
    let reqs = wait_requests(&fake, 3);
    assert_eq!(reqs.len(), 3, "{reqs:?}");
    let asked: Value = serde_json::from_str(&reqs[1].body).unwrap();
    assert_eq!(asked["stream_options"]["include_usage"], true, "{asked}");
    assert_eq!(asked["model"], "gpt-test");
    assert_swapped(&reqs, &keys);

    let recs: Vec<Value> = llm_records(&sb)
        .into_iter()
        .filter(|r| r["verdict"] == "allowed")
        .collect();
    assert_eq!(recs.len(), 3, "{recs:?}");
    assert_eq!(
        (
            recs[0]["output_tokens"].as_u64(),
            recs[0]["input_tokens"].as_u64()
        ),
        (Some(64), Some(25))
    );
    assert!(
        recs[0]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("charged 99 tokens"),
        "{}",
        recs[0]
    );
    assert_eq!(
        (
            recs[1]["input_tokens"].as_u64(),
            recs[1]["output_tokens"].as_u64(),
            &recs[1]["reason"]
        ),
        (Some(9), Some(12), &Value::Null),
        "{}",
        recs[1]
    );
    assert_eq!(
        recs[2]["output_tokens"].as_u64(),
        Some(32768),
        "{}",
        recs[2]
    );
    assert!(
        recs[2]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("did not come whole"),
        "{}",
        recs[2]
    );

    // A background Responses call answers at once without usage: charged
    // its limit (max_output_tokens 500), so the next call is refused.
    let r = r#"curl -sS -m 30 -w ' %{http_code}\n' "$OPENAI_BASE_URL/responses" -H "Authorization: Bearer $OPENAI_API_KEY" -H "content-type: application/json""#;
    let script = format!(
        r#"
echo "BG=$({r} -d '{{"model":"gpt-test","input":"hi","background":true,"max_output_tokens":500}}')"
echo "AFTER_BG=$({r} -d '{{"model":"gpt-test","input":"hi"}}')"
"#
    );
    let out = run(&sb, &keys, &fake, &["--llm-budget", "40"], &script);
    assert_eq!(out.code, Some(0), "{}", out.text());
    assert_no_real_key(&sb, &keys, &out);
    assert!(out.line("BG=").ends_with(" 200"), "{}", out.text());
    let after = out.line("AFTER_BG=");
    assert!(
        after.ends_with(" 429") && after.contains("budget_exceeded"),
        "{after}"
    );
    assert_eq!(wait_requests(&fake, 4).len(), 4);
    let bg = llm_records(&sb)
        .into_iter()
        .rfind(|r| r["verdict"] == "allowed")
        .unwrap();
    assert_eq!(bg["output_tokens"].as_u64(), Some(500), "{bg}");
    assert!(
        bg["reason"]
            .as_str()
            .unwrap_or("")
            .contains("the answer carried no usage; charged"),
        "{bg}"
    );
    sb.audit().assert_well_formed();
}

/// An upstream that sends the real key back (reason phrase, headers, an
/// error body, a stream with the key split across chunks): the sandbox gets
/// its own placeholder there, never the key.
fn attack_c5_echoed_key(b: Backend) {
    let keys = Keys::new();
    let sb = Sandbox::new(b, "llm-c5-echo");
    let fake = FakeLlm::start(&sb.ws, &keys);
    let (v, out) = c5(&sb, &keys, &fake, &[], "echo");
    assert_no_real_key(&sb, &keys, &out);
    let ph_a = "sk-ant-moat-";
    for (name, ph) in [("anthropic", ph_a), ("chat", "sk-moat-")] {
        let plain = &v[format!("{name}-plain")];
        assert_eq!(plain["status"], 401, "{plain}");
        let h = plain["headers"].as_str().unwrap();
        assert!(
            h.contains(&format!("x-echo: key={ph}")),
            "{name}: the echo did not come through: {h}"
        );
        assert!(h.contains(&format!("key=\"{ph}")), "{h}");
        assert!(
            plain["body"]
                .as_str()
                .unwrap()
                .contains(&format!("provided: {ph}")),
            "{plain}"
        );
        assert!(
            !plain["reason"].as_str().unwrap().contains("sk-"),
            "{plain}"
        );
        let stream = &v[format!("{name}-stream")];
        assert_eq!(stream["status"], 200, "{stream}");
        let body = stream["body"].as_str().unwrap();
        assert!(
            body.contains(&format!("echo={ph}")) && body.contains(&format!("again {ph}")),
            "{body}"
        );
        assert!(
            stream["headers"]
                .as_str()
                .unwrap()
                .contains(&format!("x-echo: {ph}")),
            "{stream}"
        );
    }
    // A compressed answer could hide a key from redaction: refused.
    let gz = &v["gzip"];
    assert_eq!(gz["status"], 502, "{gz}");
    assert!(
        gz["body"].as_str().unwrap().contains("compressed answer"),
        "{gz}"
    );
    let reqs = fake.requests();
    assert_eq!(reqs.len(), 5, "{reqs:?}");
    assert_swapped(&reqs, &keys);
}

/// Encoded traversal and paths outside the API's documented ones never
/// reach the upstream with the real key (docs/threat-model.md C2, C5).
fn attack_c2_encoded_traversal(b: Backend) {
    let keys = Keys::new();
    let sb = Sandbox::new(b, "llm-c2-paths");
    let fake = FakeLlm::start(&sb.ws, &keys);
    let paths = [
        "/anthropic/v1/..%2f..%2fadmin",
        "/anthropic/v1/%2f..%2fadmin",
        "/anthropic/v1/..%5c..%5cadmin",
        "/anthropic/v1/%252e%252e/%252e%252e/admin",
        "/anthropic/v1/%2E%2e/admin",
        "/anthropic/v1/messages/..%2F..%2Fadmin",
        "/anthropic/v1/messages%2f..%2f..%2fadmin",
        "/anthropic/v1/..\\..\\admin",
        "/anthropic/v1/messages;/../../admin",
        "/anthropic/v1//messages",
        "/anthropic/admin",
        "/anthropic/v1/messages/batches",
        "/anthropic/v1/files",
        "/openai/v1/chat/completions/..%2f..%2fadmin",
        "/openai/v1/%2e%2e/%2e%2e/admin",
        "/openai/v1/files",
        "/openai/v1/batches",
        "/openai/v1/organization/admin_api_keys",
    ];
    let (v, out) = c5(
        &sb,
        &keys,
        &fake,
        &[],
        &format!(
            "paths {}",
            paths
                .iter()
                .map(|p| format!("'{p}'"))
                .collect::<Vec<_>>()
                .join(" ")
        ),
    );
    assert_no_real_key(&sb, &keys, &out);
    for p in paths {
        let r = &v[p];
        let s = r["status"].as_u64().unwrap_or(0);
        assert!(s == 400 || s == 404, "{p} was not refused: {r}");
        let body: Value = serde_json::from_str(r["body"].as_str().unwrap()).unwrap();
        let msg = body["error"]["message"].as_str().unwrap_or("");
        assert!(
            msg.starts_with("moat: ")
                && (msg.contains("not allowed in the path") || msg.contains("is not served")),
            "{p}: {r}"
        );
    }
    assert!(
        fake.requests().is_empty(),
        "a traversal reached the upstream: {:?}",
        fake.requests()
    );
    let recs = llm_records(&sb);
    assert_eq!(recs.len(), paths.len(), "{recs:?}");
    for r in &recs {
        assert_eq!(r["verdict"], "denied", "{r}");
        assert!(
            r["refusal"] == "bad_path" || r["refusal"] == "path_not_served",
            "{r}"
        );
    }
}

/// The model allowlist judges every place a request could name a model, and
/// refuses what it cannot judge: the query, Azure-style deployment paths,
/// duplicate keys (a first-wins parser upstream would read the other),
/// nested `params.model`, batches, a GET with a body, method overrides.
fn attack_c5_model_allowlist(b: Backend) {
    let keys = Keys::new();
    let sb = Sandbox::new(b, "llm-c5-models");
    let fake = FakeLlm::start(&sb.ws, &keys);
    let (v, out) = c5(
        &sb,
        &keys,
        &fake,
        &["--llm-model", "claude-ok", "--llm-model", "gpt-ok"],
        "models",
    );
    assert_no_real_key(&sb, &keys, &out);
    assert_eq!(v["ok"]["status"], 200, "{}", v["ok"]);
    let refused = [
        ("query", 403, "model_not_judgeable"),
        ("query encoded", 403, "model_not_judgeable"),
        ("azure path", 404, "path_not_served"),
        ("duplicate bad last", 400, "ambiguous_json"),
        ("duplicate bad first", 400, "ambiguous_json"),
        ("duplicate escaped", 400, "ambiguous_json"),
        ("nested params", 403, "model_not_judgeable"),
        ("batch", 404, "path_not_served"),
        ("get with body", 400, "body_on_get"),
        ("override", 400, "method_override"),
        ("override on get", 400, "method_override"),
        ("model not a string", 403, "model_not_judgeable"),
        ("not json", 400, "ambiguous_json"),
    ];
    for (name, status, _) in refused {
        let r = &v[name];
        assert_eq!(r["status"], status, "{name}: {r}");
        let body: Value = serde_json::from_str(r["body"].as_str().unwrap()).unwrap();
        let msg = body["error"]["message"].as_str().unwrap_or("");
        assert!(
            msg.starts_with("moat: "),
            "{name}: not the door's refusal: {body}"
        );
    }
    // Only the allowed call reached the upstream.
    let reqs = fake.requests();
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    assert!(!reqs[0].everything().contains("claude-bad"), "{reqs:?}");
    assert_swapped(&reqs, &keys);
    let recs = llm_records(&sb);
    assert_eq!(recs.len(), 1 + refused.len(), "{recs:?}");
    for (name, status, refusal) in refused {
        assert!(
            recs.iter().any(|r| r["verdict"] == "denied"
                && r["status"] == status
                && r["refusal"] == refusal),
            "no {refusal} record for {name}: {recs:?}"
        );
    }
    sb.audit().assert_well_formed();
}

net_tests! {
    llm_curl_and_python_complete_messages_and_chat_calls => clients_complete_calls;
    llm_length_framed_stream_is_recorded_whole => length_framed_stream_is_recorded_whole;
    llm_model_allowlist_and_token_budget => model_allowlist_and_budget;
    llm_user_budget_spans_runs_per_user_with_channel_in_audit => user_budget_spans_runs;
    attack_c1_real_llm_key_is_nowhere_in_the_sandbox => attack_c1;
    attack_c2_placeholder_sent_elsewhere_is_never_swapped => attack_c2;
    attack_c5_abandoned_streams_are_charged_and_the_budget_holds => attack_c5_abandoned_streams;
    attack_c5_streams_without_usage_are_charged => attack_c5_streams_without_usage;
    attack_c5_echoed_real_key_never_reaches_the_sandbox => attack_c5_echoed_key;
    attack_c2_encoded_traversal_never_carries_the_key_upstream => attack_c2_encoded_traversal;
    attack_c5_model_allowlist_refuses_what_it_cannot_judge => attack_c5_model_allowlist;
}
