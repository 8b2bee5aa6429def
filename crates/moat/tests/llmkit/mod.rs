//! A scriptable fake LLM upstream for the built-in agent's tests and bench:
//! the Anthropic Messages API (`POST /v1/messages`, JSON or, when the request
//! asks `"stream": true`, server-sent events) and the OpenAI Responses API
//! (`POST /v1/responses`, JSON), plain HTTP on 127.0.0.1, written from the
//! providers' public API documentation. No real API is contacted.
//!
//! A script decides each answer from the request: [`step_of`] tells which
//! step of the current turn a request is (how many model answers follow the
//! last plain user message), so one script serves any number of turns. The
//! fake checks the real key (401 otherwise), records every request and adds
//! up the time it spent handling them (for the bench's overhead figure).

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod wire;
use wire::read_request;
// Each user of the kit (tests, the agent bench) takes what it needs.
#[allow(unused_imports)]
pub use wire::{hex, step_of, Keys, Req};

/// What the fake answers to one request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// Tool calls: (name, input), all in one answer.
    Tools(Vec<(String, Value)>),
    /// A final text answer.
    Text(String),
    /// An upstream failure: this HTTP status with the provider's error body
    /// (500 and 529 as an overloaded API answers them, 429 rate limited).
    Fail(u16),
    /// As `Fail`, with a `retry-after` header of this value.
    FailAfter(u16, String),
}

impl Reply {
    pub fn tool(name: &str, input: Value) -> Reply {
        Reply::Tools(vec![(name.to_string(), input)])
    }
    pub fn text(t: impl Into<String>) -> Reply {
        Reply::Text(t.into())
    }
    /// The status and `retry-after` of a failure.
    fn failure(&self) -> Option<(u16, Option<&str>)> {
        match self {
            Reply::Fail(s) => Some((*s, None)),
            Reply::FailAfter(s, after) => Some((*s, Some(after.as_str()))),
            _ => None,
        }
    }
}

pub type Script = Arc<dyn Fn(&Req, usize) -> Reply + Send + Sync>;

/// The fake upstream.
pub struct FakeLlm {
    pub port: u16,
    reqs: Arc<Mutex<Vec<Req>>>,
    handler_ns: Arc<AtomicU64>,
}

impl FakeLlm {
    /// Serves on 127.0.0.1 (a free port); `anthropic_key` / `openai_key` are
    /// the real keys it accepts.
    pub fn start(anthropic_key: &str, openai_key: &str, script: Script) -> FakeLlm {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let reqs = Arc::new(Mutex::new(Vec::new()));
        let handler_ns = Arc::new(AtomicU64::new(0));
        let (r, h) = (reqs.clone(), handler_ns.clone());
        let keys = Arc::new((anthropic_key.to_string(), openai_key.to_string()));
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let (r, h, k, sc) = (r.clone(), h.clone(), keys.clone(), script.clone());
                std::thread::spawn(move || serve_conn(s, &k, &sc, &r, &h));
            }
        });
        FakeLlm {
            port,
            reqs,
            handler_ns,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
    pub fn requests(&self) -> Vec<Req> {
        self.reqs.lock().unwrap().clone()
    }
    /// Time spent handling requests, from each request's first byte to the
    /// end of its answer, added up.
    pub fn handler_time(&self) -> Duration {
        Duration::from_nanos(self.handler_ns.load(Ordering::SeqCst))
    }
    pub fn reset_stats(&self) {
        self.handler_ns.store(0, Ordering::SeqCst);
        self.reqs.lock().unwrap().clear();
    }
}

fn serve_conn(
    s: TcpStream,
    keys: &(String, String),
    script: &Script,
    log: &Mutex<Vec<Req>>,
    handler_ns: &AtomicU64,
) {
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(Duration::from_secs(120)));
    let Ok(w) = s.try_clone() else { return };
    let mut w = w;
    let mut r = BufReader::new(s);
    loop {
        // Wait for the first byte before the clock starts.
        match r.fill_buf() {
            Ok([]) | Err(_) => return,
            Ok(_) => {}
        }
        let t0 = Instant::now();
        let Some(mut req) = read_request(&mut r) else {
            return;
        };
        let keep = !req
            .header("connection")
            .is_some_and(|c| c.eq_ignore_ascii_case("close"));
        let (status, head, chunks) = answer(&req, keys, script);
        req.status = status;
        let mut out = head;
        for c in &chunks {
            out.push_str(c);
        }
        // Logged before the answer goes out: a client that has its answer
        // must find its request in the log.
        log.lock().unwrap().push(req);
        let ok = w.write_all(out.as_bytes()).and_then(|_| w.flush()).is_ok();
        handler_ns.fetch_add(t0.elapsed().as_nanos() as u64, Ordering::SeqCst);
        if !ok || !keep {
            return;
        }
    }
}

fn json_response(status: u16, body: &Value) -> (u16, String, Vec<String>) {
    let b = body.to_string();
    (
        status,
        format!(
            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{b}",
            b.len()
        ),
        Vec::new(),
    )
}

fn fail_response(
    status: u16,
    retry_after: Option<&str>,
    body: &Value,
) -> (u16, String, Vec<String>) {
    let (status, head, rest) = json_response(status, body);
    let head = match retry_after {
        Some(a) => head.replacen("\r\n", &format!("\r\nretry-after: {a}\r\n"), 1),
        None => head,
    };
    (status, head, rest)
}

fn sse_response(events: &[Value]) -> (u16, String, Vec<String>) {
    let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n".to_string();
    let mut chunks: Vec<String> = events
        .iter()
        .map(|e| {
            let data = format!("event: {}\ndata: {e}\n\n", e["type"].as_str().unwrap_or(""));
            format!("{:x}\r\n{data}\r\n", data.len())
        })
        .collect();
    chunks.push("0\r\n\r\n".into());
    (200, head, chunks)
}

static IDS: AtomicU64 = AtomicU64::new(1);

fn next_id(prefix: &str) -> String {
    format!("{prefix}{:06}", IDS.fetch_add(1, Ordering::SeqCst))
}

fn answer(req: &Req, keys: &(String, String), script: &Script) -> (u16, String, Vec<String>) {
    match req.path.as_str() {
        "/v1/messages" => {
            if req.header("x-api-key") != Some(keys.0.as_str()) {
                return json_response(
                    401,
                    &json!({"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"}}),
                );
            }
            if !req.body["messages"].is_array() {
                return json_response(
                    400,
                    &json!({"type":"error","error":{"type":"invalid_request_error","message":"messages: field required"}}),
                );
            }
            let reply = script(req, step_of(&req.body));
            if let Some((status, after)) = reply.failure() {
                let kind = match status {
                    429 => "rate_limit_error",
                    500 => "api_error",
                    _ => "overloaded_error",
                };
                return fail_response(
                    status,
                    after,
                    &json!({"type":"error","error":{"type":kind,"message":"the fake upstream fails on purpose"}}),
                );
            }
            anthropic(&req.body, &reply)
        }
        "/v1/responses" => {
            if req.header("authorization") != Some(format!("Bearer {}", keys.1).as_str()) {
                return json_response(
                    401,
                    &json!({"error":{"message":"Incorrect API key provided","type":"invalid_request_error","code":"invalid_api_key"}}),
                );
            }
            if !req.body["input"].is_array() {
                return json_response(
                    400,
                    &json!({"error":{"message":"input: expected a list of items","type":"invalid_request_error"}}),
                );
            }
            let reply = script(req, step_of(&req.body));
            if let Some((status, after)) = reply.failure() {
                return fail_response(
                    status,
                    after,
                    &json!({"error":{"message":"the fake upstream fails on purpose","type":"server_error"}}),
                );
            }
            openai(&req.body, &reply)
        }
        _ => json_response(404, &json!({"error": "the fake has no such endpoint"})),
    }
}

/// https://docs.anthropic.com/en/api/messages (and messages-streaming).
fn anthropic(doc: &Value, reply: &Reply) -> (u16, String, Vec<String>) {
    let (content, stop) = match reply {
        Reply::Text(t) => (json!([{"type": "text", "text": t}]), "end_turn"),
        // Answered as an error before this is reached.
        Reply::Fail(_) | Reply::FailAfter(..) => (json!([]), "end_turn"),
        Reply::Tools(calls) => (
            calls
                .iter()
                .map(|(n, i)| json!({"type": "tool_use", "id": next_id("toolu_"), "name": n, "input": i}))
                .collect(),
            "tool_use",
        ),
    };
    let usage = json!({"input_tokens": 100, "output_tokens": 10,
        "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0});
    let id = next_id("msg_");
    if doc["stream"] != true {
        return json_response(
            200,
            &json!({"id": id, "type": "message", "role": "assistant", "model": doc["model"],
                "content": content, "stop_reason": stop, "stop_sequence": null, "usage": usage}),
        );
    }
    let mut start_usage = usage.clone();
    start_usage["output_tokens"] = json!(1);
    let mut ev = vec![
        json!({"type":"message_start","message":{"id": id,"type":"message","role":"assistant",
            "model": doc["model"],"content":[],"stop_reason":null,"stop_sequence":null,"usage": start_usage}}),
        json!({"type":"ping"}),
    ];
    for (i, block) in content.as_array().into_iter().flatten().enumerate() {
        if block["type"] == "text" {
            ev.push(json!({"type":"content_block_start","index":i,"content_block":{"type":"text","text":""}}));
            ev.push(json!({"type":"content_block_delta","index":i,"delta":{"type":"text_delta","text": block["text"]}}));
        } else {
            ev.push(json!({"type":"content_block_start","index":i,"content_block":{"type":"tool_use","id": block["id"],"name": block["name"],"input":{}}}));
            ev.push(json!({"type":"content_block_delta","index":i,"delta":{"type":"input_json_delta","partial_json": block["input"].to_string()}}));
        }
        ev.push(json!({"type":"content_block_stop","index":i}));
    }
    ev.push(json!({"type":"message_delta","delta":{"stop_reason": stop,"stop_sequence":null},"usage":{"output_tokens": 10}}));
    ev.push(json!({"type":"message_stop"}));
    sse_response(&ev)
}

/// https://platform.openai.com/docs/api-reference/responses (non-streaming).
fn openai(doc: &Value, reply: &Reply) -> (u16, String, Vec<String>) {
    let output: Vec<Value> = match reply {
        Reply::Text(t) => vec![
            json!({"type": "message", "id": next_id("msg_"), "status": "completed",
            "role": "assistant", "content": [{"type": "output_text", "text": t, "annotations": []}]}),
        ],
        // Answered as an error before this is reached.
        Reply::Fail(_) | Reply::FailAfter(..) => Vec::new(),
        Reply::Tools(calls) => calls
            .iter()
            .map(|(n, i)| {
                json!({"type": "function_call", "id": next_id("fc_"), "call_id": next_id("call_"),
                    "name": n, "arguments": i.to_string(), "status": "completed"})
            })
            .collect(),
    };
    json_response(
        200,
        &json!({"id": next_id("resp_"), "object": "response", "created_at": 1_700_000_000u64,
            "status": "completed", "model": doc["model"], "output": output,
            "usage": {"input_tokens": 200, "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": 20, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 220}}),
    )
}

// ---------------------------------------------------------------------------
// A lease with a door serving the LLM proxy and the moat binary, as the
// gateway's pool builds it (pool::start_door + pool::attachment).
// ---------------------------------------------------------------------------

/// A lease of `backend` whose door proxies both providers to the fake and
/// binds the installed moat binary at /run/moat/bin/moat.
pub struct AgentBox {
    pub lease: Option<moat_sandbox::Lease>,
    pub door: Option<moat_egress::Door>,
    pub audit: Arc<moat_egress::MemoryAudit>,
    engine: Option<moat_sandbox::Engine>,
    rt: Option<tokio::runtime::Runtime>,
    pub dir: std::path::PathBuf,
}

impl AgentBox {
    /// `moat_exe`: the host's moat binary (`CARGO_BIN_EXE_moat`); moat-init
    /// is next to it. `name`: a named lease (kept files, per-thread mode).
    pub fn start(
        backend: moat_policy::BackendKind,
        moat_exe: &std::path::Path,
        name: Option<&str>,
        fake_url: &str,
        keys: &Keys,
    ) -> AgentBox {
        use std::os::unix::fs::PermissionsExt;
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "moat-builtin-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711)).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let engine = moat_sandbox::Engine::new(
            moat_sandbox::EngineConfig {
                data_dir: dir.join("data"),
                runtime_dir: dir.join("run"),
                init_path: moat_exe.parent().unwrap().join("moat-init"),
            },
            backend,
        )
        .expect("engine");
        let bin = moat_gateway::agent::builtin::install_moat_binary(&dir.join("run"), moat_exe)
            .expect("installing the moat binary");
        let upstream = |p| moat_egress::llm::ProviderConfig {
            provider: p,
            upstream: moat_egress::llm::UpstreamUrl::parse(fake_url, true).unwrap(),
            key: moat_egress::llm::Secret::new(match p {
                moat_egress::llm::Provider::Anthropic => keys.anthropic.clone(),
                moat_egress::llm::Provider::OpenAi => keys.openai.clone(),
            }),
        };
        let extras = moat_gateway::pool::DoorExtras {
            llm: Some(moat_egress::llm::LlmConfig {
                providers: vec![
                    upstream(moat_egress::llm::Provider::Anthropic),
                    upstream(moat_egress::llm::Provider::OpenAi),
                ],
                channel: Some("test".into()),
                ..Default::default()
            }),
            files: vec![(bin, moat_gateway::agent::builtin::MOAT_INSIDE.into())],
            github: None,
            amp: None,
            ..Default::default()
        };
        let policy = moat_policy::SandboxPolicy {
            backend,
            ..moat_policy::SandboxPolicy::default()
        };
        let audit = Arc::new(moat_egress::MemoryAudit::default());
        let door = moat_gateway::pool::start_door(
            rt.handle(),
            &policy,
            name.unwrap_or("builtin-test"),
            audit.clone(),
            &extras,
        )
        .expect("door")
        .expect("a door (the LLM proxy is on)");
        let network = moat_gateway::pool::attachment(&door, &extras);
        let lease = engine
            .lease(
                policy,
                moat_sandbox::LeaseOptions {
                    run_as: None,
                    name: name.map(str::to_string),
                    workspace: moat_sandbox::WorkspaceSource::Fresh,
                    network: Some(network),
                },
            )
            .expect("lease");
        AgentBox {
            lease: Some(lease),
            door: Some(door),
            audit,
            engine: Some(engine),
            rt: Some(rt),
            dir,
        }
    }

    pub fn lease(&mut self) -> &mut moat_sandbox::Lease {
        self.lease.as_mut().unwrap()
    }

    /// Runs `sh -c script` in the lease; (exit code, stdout).
    pub fn sh(&mut self, script: &str) -> (i32, String) {
        let mut out = Vec::new();
        let o = self
            .lease()
            .run(
                moat_sandbox::RunSpec::new(["/bin/sh", "-c", script]),
                &mut |s, b| {
                    if s == moat_sandbox::Stream::Stdout {
                        out.extend_from_slice(b)
                    }
                },
            )
            .expect("run");
        (o.exit_code(), String::from_utf8_lossy(&out).into_owned())
    }
}

impl Drop for AgentBox {
    fn drop(&mut self) {
        if let Some(l) = self.lease.take() {
            let _ = l.destroy();
        }
        self.door.take();
        self.engine.take();
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
