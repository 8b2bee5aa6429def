//! Shared pieces of the coding-agent CLI adapter tests: a scriptable fake
//! LLM upstream that speaks what the CLIs need (the Anthropic Messages API
//! streamed, for Claude Code; the OpenAI Responses API streamed, with
//! custom tool calls, for Codex), plain HTTP on 127.0.0.1, written from the
//! providers' public API documentation; and a lease with a door serving the
//! LLM proxy, built as the gateway's pool builds one (`pool::start_door` +
//! `pool::attachment`). No real API is contacted.
//!
//! A script decides each answer from the request and the step of the
//! current turn (how many model answers follow the last message of the
//! user), so one script serves every turn of a test. The fake checks the
//! real key (401 otherwise) and records every request.

#![allow(dead_code)]

use std::io::{BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moat_policy::BackendKind;
use serde_json::{json, Value};

// The same file as llmkit's `wire`: a test that uses both kits has two
// copies of it, one per kit, on purpose.
#[allow(clippy::duplicate_mod)]
#[path = "../llmkit/wire.rs"]
mod wire;
use wire::read_request;
#[allow(unused_imports)]
pub use wire::{hex, step_of, Keys, Req};

// ---------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Bwrap,
    Gvisor,
}

impl Backend {
    pub fn kind(self) -> BackendKind {
        match self {
            Backend::Bwrap => BackendKind::Bwrap,
            Backend::Gvisor => BackendKind::Gvisor,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Backend::Bwrap => "bwrap",
            Backend::Gvisor => "gvisor",
        }
    }
    /// Whether the backend's runtime is installed; a missing one fails the
    /// test when MOAT_TEST_REQUIRE_ALL is set (CI), else skips it.
    pub fn available(self) -> bool {
        let bin = match self {
            Backend::Bwrap => "bwrap",
            Backend::Gvisor => "runsc",
        };
        let found = Command::new(bin)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !found && std::env::var_os("MOAT_TEST_REQUIRE_ALL").is_some() {
            panic!("{bin} is required (MOAT_TEST_REQUIRE_ALL is set) but not installed");
        }
        found
    }
}

/// One test per backend: `cli_tests! { name => body_fn; }` gives
/// `bwrap::name` and `gvisor::name`.
#[macro_export]
macro_rules! cli_tests {
    ($($name:ident => $body:expr;)*) => {
        mod bwrap {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[test]
                fn $name() {
                    let b = $crate::clikit::Backend::Bwrap;
                    if !b.available() { return; }
                    ($body)(b)
                }
            )*
        }
        mod gvisor {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[test]
                fn $name() {
                    let b = $crate::clikit::Backend::Gvisor;
                    if !b.available() { return; }
                    ($body)(b)
                }
            )*
        }
    };
}

// ---------------------------------------------------------------------------
// The installed CLIs
// ---------------------------------------------------------------------------

/// The setup script: the pinned versions and the install prefix come from it.
const SETUP: &str = include_str!("../../../../scripts/setup");

/// `NAME=value` from scripts/setup.
pub fn setup_value(name: &str) -> String {
    SETUP
        .lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{name}=")))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_else(|| panic!("scripts/setup has no {name}= line"))
}

/// Where the CLIs are installed (the same path inside the sandbox, which
/// sees /usr read-only), after checking on the host that `bin` runs at the
/// version scripts/setup pins (`var`). A missing CLI fails the test.
pub fn cli_dir(bin: &str, var: &str) -> PathBuf {
    let dir = PathBuf::from(setup_value("AGENT_CLI_PREFIX"));
    let want = setup_value(var);
    let path = dir.join("bin").join(bin);
    match Command::new(&path).arg("--version").output() {
        // Pi prints its version on standard error.
        Ok(o)
            if o.status.success()
                && String::from_utf8_lossy(&[o.stdout.as_slice(), &o.stderr].concat())
                    .split_whitespace()
                    .any(|w| w == want) =>
        {
            dir
        }
        Ok(o) => panic!(
            "{} is not at {want} (it says {:?}): run scripts/setup",
            path.display(),
            String::from_utf8_lossy(&o.stdout).trim()
        ),
        Err(e) => panic!(
            "{} is not installed ({e}); run scripts/setup (it installs the agent CLIs with npm)",
            path.display()
        ),
    }
}

pub fn claude_dir() -> PathBuf {
    cli_dir("claude", "CLAUDE_CODE_VERSION")
}

pub fn codex_dir() -> PathBuf {
    cli_dir("codex", "CODEX_VERSION")
}

pub fn pi_dir() -> PathBuf {
    cli_dir("pi", "PI_VERSION")
}

pub fn amp_dir() -> PathBuf {
    cli_dir("amp", "AMP_VERSION")
}

// ---------------------------------------------------------------------------
// The fake upstream
// ---------------------------------------------------------------------------

/// What the fake answers to one request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A final text answer.
    Text(String),
    /// Anthropic: a `tool_use` block (name, input).
    Tool(String, Value),
    /// OpenAI Responses: a `custom_tool_call` (name, free-form input).
    Custom(String, String),
    /// Holds the response open (headers sent, no event) until the fake is
    /// dropped or 300 s pass.
    Hang,
}

impl Reply {
    pub fn text(t: impl Into<String>) -> Reply {
        Reply::Text(t.into())
    }
    pub fn tool(name: &str, input: Value) -> Reply {
        Reply::Tool(name.into(), input)
    }
    /// Codex's shell: its `exec` tool (JavaScript) calling `exec_command`.
    pub fn codex_shell(cmd: &str) -> Reply {
        Reply::Custom(
            "exec".into(),
            format!(
                "const r = await tools.exec_command({{cmd: {}, login: false}}); text(r.output);",
                json!(cmd)
            ),
        )
    }
}

impl Req {
    /// The names of the tools the request offers the model (Anthropic
    /// `tools`; OpenAI `tools` and Codex's `additional_tools` items,
    /// namespaces flattened).
    pub fn tool_names(&self) -> Vec<String> {
        fn walk(v: &Value, out: &mut Vec<String>) {
            for t in v.as_array().into_iter().flatten() {
                if let Some(n) = t["name"].as_str() {
                    out.push(n.to_string());
                }
                walk(&t["tools"], out);
            }
        }
        let mut out = Vec::new();
        walk(&self.body["tools"], &mut out);
        for i in self.body["input"].as_array().into_iter().flatten() {
            if i["type"] == "additional_tools" {
                walk(&i["tools"], &mut out);
            }
        }
        out
    }

    /// Tool results the request sends back (Anthropic `tool_result` blocks,
    /// OpenAI `*_call_output` items), as JSON text.
    pub fn tool_results(&self) -> Vec<String> {
        let mut out = Vec::new();
        for m in self.body["messages"].as_array().into_iter().flatten() {
            for b in m["content"].as_array().into_iter().flatten() {
                if b["type"] == "tool_result" {
                    out.push(b.to_string());
                }
            }
        }
        for i in self.body["input"].as_array().into_iter().flatten() {
            if i["type"]
                .as_str()
                .is_some_and(|t| t.ends_with("_call_output"))
            {
                out.push(i.to_string());
            }
        }
        out
    }
}

pub type Script = Arc<dyn Fn(&Req, usize) -> Reply + Send + Sync>;

/// The fake upstream (both APIs on one port).
pub struct FakeLlm {
    pub port: u16,
    reqs: Arc<Mutex<Vec<Req>>>,
    stop: Arc<AtomicBool>,
}

impl FakeLlm {
    /// Serves on 127.0.0.1 (a free port), accepting only the real keys.
    pub fn start(keys: &Keys, script: Script) -> FakeLlm {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let reqs = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, st) = (reqs.clone(), stop.clone());
        let keys = Arc::new((keys.anthropic.clone(), keys.openai.clone()));
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                if st.load(Ordering::SeqCst) {
                    return;
                }
                let (r, k, sc, st) = (r.clone(), keys.clone(), script.clone(), st.clone());
                std::thread::spawn(move || serve_conn(s, &k, &sc, &r, &st));
            }
        });
        FakeLlm { port, reqs, stop }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn requests(&self) -> Vec<Req> {
        self.reqs.lock().unwrap().clone()
    }

    /// The model calls (Messages and Responses requests) so far.
    pub fn calls(&self) -> Vec<Req> {
        self.requests()
            .into_iter()
            .filter(|r| r.path == "/v1/messages" || r.path == "/v1/responses")
            .collect()
    }
}

impl Drop for FakeLlm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn serve_conn(
    s: TcpStream,
    keys: &(String, String),
    script: &Script,
    log: &Mutex<Vec<Req>>,
    stop: &AtomicBool,
) {
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(Duration::from_secs(120)));
    let Ok(mut w) = s.try_clone() else { return };
    let mut r = BufReader::new(s);
    loop {
        let Some(mut req) = read_request(&mut r) else {
            return;
        };
        let keep = !req
            .header("connection")
            .is_some_and(|c| c.eq_ignore_ascii_case("close"));
        let reply = answer(&req, keys, script);
        req.status = reply.status;
        log.lock().unwrap().push(req);
        if w.write_all(reply.head.as_bytes()).is_err() {
            return;
        }
        for c in &reply.chunks {
            if w.write_all(c.as_bytes()).and_then(|_| w.flush()).is_err() {
                return;
            }
        }
        if reply.hang {
            let _ = w.flush();
            for _ in 0..3000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            return;
        }
        if !keep {
            return;
        }
    }
}

struct Answer {
    status: u16,
    head: String,
    chunks: Vec<String>,
    hang: bool,
}

fn json_answer(status: u16, body: &Value) -> Answer {
    let b = body.to_string();
    Answer {
        status,
        head: format!(
            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{b}",
            b.len()
        ),
        chunks: Vec::new(),
        hang: false,
    }
}

fn sse_answer(events: &[Value]) -> Answer {
    let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n".to_string();
    let mut chunks: Vec<String> = events
        .iter()
        .map(|e| {
            let data = format!("event: {}\ndata: {e}\n\n", e["type"].as_str().unwrap_or(""));
            format!("{:x}\r\n{data}\r\n", data.len())
        })
        .collect();
    chunks.push("0\r\n\r\n".into());
    Answer {
        status: 200,
        head,
        chunks,
        hang: false,
    }
}

fn hang_answer() -> Answer {
    Answer {
        status: 200,
        head: "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
            .into(),
        chunks: Vec::new(),
        hang: true,
    }
}

static IDS: AtomicU64 = AtomicU64::new(1);

fn next_id(prefix: &str) -> String {
    format!("{prefix}{:06}", IDS.fetch_add(1, Ordering::SeqCst))
}

fn answer(req: &Req, keys: &(String, String), script: &Script) -> Answer {
    match req.path.as_str() {
        "/v1/messages" => {
            if req.header("x-api-key") != Some(keys.0.as_str()) {
                return json_answer(
                    401,
                    &json!({"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"}}),
                );
            }
            if !req.body["messages"].is_array() {
                return json_answer(
                    400,
                    &json!({"type":"error","error":{"type":"invalid_request_error","message":"messages: field required"}}),
                );
            }
            anthropic(&req.body, &script(req, step_of(&req.body)))
        }
        "/v1/responses" => {
            if req.header("authorization") != Some(format!("Bearer {}", keys.1).as_str()) {
                return json_answer(
                    401,
                    &json!({"error":{"message":"Incorrect API key provided","type":"invalid_request_error","code":"invalid_api_key"}}),
                );
            }
            if !req.body["input"].is_array() {
                return json_answer(
                    400,
                    &json!({"error":{"message":"input: expected a list of items","type":"invalid_request_error"}}),
                );
            }
            openai(&req.body, &script(req, step_of(&req.body)))
        }
        _ => json_answer(404, &json!({"error": "the fake has no such endpoint"})),
    }
}

/// https://docs.anthropic.com/en/api/messages-streaming
fn anthropic(doc: &Value, reply: &Reply) -> Answer {
    let (content, stop) = match reply {
        Reply::Hang => return hang_answer(),
        Reply::Text(t) => (json!([{"type": "text", "text": t}]), "end_turn"),
        Reply::Tool(n, i) => (
            json!([{"type": "tool_use", "id": next_id("toolu_"), "name": n, "input": i}]),
            "tool_use",
        ),
        Reply::Custom(..) => (
            json!([{"type": "text", "text": "(the script gave an OpenAI answer)"}]),
            "end_turn",
        ),
    };
    let usage = json!({"input_tokens": 100, "output_tokens": 10,
        "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0});
    let id = next_id("msg_");
    if doc["stream"] != true {
        return json_answer(
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
    sse_answer(&ev)
}

/// https://platform.openai.com/docs/api-reference/responses-streaming
fn openai(doc: &Value, reply: &Reply) -> Answer {
    let item = match reply {
        Reply::Hang => return hang_answer(),
        Reply::Text(t) => json!({"type": "message", "id": next_id("msg_"), "status": "completed",
            "role": "assistant", "content": [{"type": "output_text", "text": t, "annotations": []}]}),
        Reply::Custom(n, input) => json!({"type": "custom_tool_call", "id": next_id("ctc_"),
            "status": "completed", "call_id": next_id("call_"), "name": n, "input": input}),
        Reply::Tool(n, i) => json!({"type": "function_call", "id": next_id("fc_"),
            "call_id": next_id("call_"), "name": n, "arguments": i.to_string(), "status": "completed"}),
    };
    let id = next_id("resp_");
    let base = json!({"id": id, "object": "response", "created_at": 1_700_000_000u64,
        "status": "in_progress", "model": doc["model"], "output": [], "usage": null});
    let mut done = base.clone();
    done["status"] = json!("completed");
    done["output"] = json!([item.clone()]);
    done["usage"] = json!({"input_tokens": 200, "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 20, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 220});
    let mut ev = vec![
        json!({"type": "response.created", "response": base}),
        json!({"type": "response.output_item.added", "output_index": 0, "item": item}),
        json!({"type": "response.output_item.done", "output_index": 0, "item": item}),
        json!({"type": "response.completed", "response": done}),
    ];
    for (n, e) in ev.iter_mut().enumerate() {
        e["sequence_number"] = json!(n);
    }
    sse_answer(&ev)
}

// ---------------------------------------------------------------------------
// A lease with a door serving the LLM proxy
// ---------------------------------------------------------------------------

/// A lease of `backend` whose door proxies both providers to the fake, as
/// the gateway's pool builds it.
pub struct CliBox {
    pub lease: Option<moat_sandbox::Lease>,
    pub door: Option<moat_egress::Door>,
    pub audit: Arc<moat_egress::MemoryAudit>,
    engine: Option<moat_sandbox::Engine>,
    rt: Option<tokio::runtime::Runtime>,
    pub dir: PathBuf,
}

impl CliBox {
    /// `name`: a named lease (per-thread mode keeps its files).
    pub fn start(backend: Backend, name: Option<&str>, fake_url: &str, keys: &Keys) -> CliBox {
        CliBox::start_with(backend, name, fake_url, keys, None)
    }

    /// As [`CliBox::start`], the door also serving Amp: `amp` is (the
    /// fake's URL, the real key).
    pub fn start_with(
        backend: Backend,
        name: Option<&str>,
        fake_url: &str,
        keys: &Keys,
        amp: Option<(&str, &str)>,
    ) -> CliBox {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "moat-clis-{}-{}",
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
        let moat_exe = Path::new(env!("CARGO_BIN_EXE_moat"));
        let engine = moat_sandbox::Engine::new(
            moat_sandbox::EngineConfig {
                data_dir: dir.join("data"),
                runtime_dir: dir.join("run"),
                init_path: moat_exe.parent().unwrap().join("moat-init"),
            },
            backend.kind(),
        )
        .expect("engine");
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
            files: Vec::new(),
            github: None,
            amp: amp.map(|(url, key)| {
                moat_egress::amp::AmpAccess::from_env(
                    |k| (k == "AMP_API_KEY").then(|| key.to_string()),
                    Some(url),
                    true,
                    dir.join("doors"),
                )
                .expect("the Amp configuration")
            }),
            ..Default::default()
        };
        let policy = moat_policy::SandboxPolicy {
            backend: backend.kind(),
            ..moat_policy::SandboxPolicy::default()
        };
        let audit = Arc::new(moat_egress::MemoryAudit::default());
        let door = moat_gateway::pool::start_door(
            rt.handle(),
            &policy,
            name.unwrap_or("cli-test"),
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
        CliBox {
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

    /// Writes `text` to `path` inside the sandbox.
    pub fn write(&mut self, path: &str, text: &str) {
        let mut spec = moat_sandbox::RunSpec::new([
            "/bin/sh",
            "-c",
            "mkdir -p \"$(dirname \"$1\")\" && cat > \"$1\"",
            "write",
            path,
        ]);
        spec.stdin = moat_sandbox::StdinSource::Bytes(text.as_bytes().to_vec());
        let o = self.lease().run(spec, &mut |_, _| {}).expect("run");
        assert_eq!(o.exit_code(), 0, "writing {path} in the sandbox");
    }

    /// Processes still in the lease's cgroups.
    pub fn processes(&self) -> Vec<u32> {
        let mut pids = Vec::new();
        for d in self.lease.as_ref().unwrap().cgroup_paths() {
            let text = std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
            pids.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        pids
    }
}

impl Drop for CliBox {
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

/// Host processes whose command line contains `needle`.
pub fn host_processes_with(needle: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmd).contains(needle) {
            found.push(pid);
        }
    }
    found
}
