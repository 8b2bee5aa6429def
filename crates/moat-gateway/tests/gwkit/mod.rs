//! Shared pieces of the gateway's web tests and its benchmark: a gateway
//! served in-process (`moat_gateway::server::serve`) on a runtime of its own
//! with a private data directory, a small HTTP/1.1 client for the web chat's
//! JSON API and its server-sent events, and readers for the audit log,
//! `/metrics` and the host's process table.
//!
//! Must never: talk to anything but the gateway it started on 127.0.0.1, or
//! leave a gateway running after its test (dropping a `Gw` stops it).

#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use moat_gateway::metrics::Gauges;
use moat_gateway::pipeline::Gateway;
use moat_gateway::server::{serve, ServeOptions};
use moat_policy::gateway::GatewayConfig;
use moat_sandbox::EngineConfig;
use serde_json::{json, Value};

/// How long a test waits for something that must happen.
pub const WAIT: Duration = Duration::from_secs(30);

/// moat-init next to the test binaries (built on demand: `cargo test -p
/// moat-gateway` alone does not build other packages' binaries).
pub fn init_path() -> PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        let p = exe.parent().unwrap().parent().unwrap().join("moat-init");
        if !p.exists() {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let ok = std::process::Command::new(cargo)
                .args(["build", "-p", "moat-sandbox", "--bin", "moat-init"])
                .status()
                .expect("running cargo to build moat-init")
                .success();
            assert!(ok && p.exists(), "moat-init is missing at {}", p.display());
        }
        p
    })
    .clone()
}

/// A scratch directory for this test binary, world-traversable (sandbox uids
/// reach their leases below it).
pub fn scratch() -> &'static Path {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("moat-gw-web-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o711)).unwrap();
        d
    })
}

/// Where the sandboxes of a gateway on data directory `data` keep their
/// leases (under the tests' shared runtime directory).
pub fn leases_of(data: &Path) -> PathBuf {
    moat_sandbox::leases_dir(&EngineConfig {
        data_dir: data.to_path_buf(),
        runtime_dir: scratch().join("run"),
        init_path: init_path(),
    })
}

/// A fresh directory below `scratch()`, mode 0711.
pub fn fresh_dir(name: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let d = scratch().join(format!("{name}-{}", N.fetch_add(1, Ordering::SeqCst)));
    std::fs::create_dir_all(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o711)).unwrap();
    d
}

/// Random lower-case hex (markers that must show up exactly where expected).
pub fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut b)
        .unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Random decimal digits: a `sleep` argument unique on this host
/// (`sleep 30.<digits>`), so the host's process table can be searched for it.
pub fn random_digits(n: usize) -> String {
    let mut b = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut b)
        .unwrap();
    b.iter().map(|x| char::from(b'0' + x % 10)).collect()
}

/// A gateway configuration with the web chat and the admin address on free
/// loopback ports, `pool` warm sandboxes, `web_extra` lines in `[web]`, and
/// `channel` lines in the one `[[channel]]` (platform web, id "*").
pub fn web_config(pool: usize, web_extra: &str, channel: &str) -> String {
    format!(
        "[web]\nlisten = \"127.0.0.1:0\"\n{web_extra}\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [pool]\nsize = {pool}\n\n[[channel]]\nplatform = \"web\"\nid = \"*\"\n{channel}\n"
    )
}

/// The store of a gateway that just stopped: its lock is released when the
/// last of its threads lets go, which may take a moment on a loaded machine.
#[allow(dead_code)]
pub fn open_store_after_stop(data: &Path) -> moat_store::Store {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match moat_store::Store::open(data.join("moat.db")) {
            Ok(s) => return s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("the store stayed locked after the gateway stopped: {e}"),
        }
    }
}

/// A gateway running in this process.
pub struct Gw {
    pub web: SocketAddr,
    pub admin: SocketAddr,
    pub data: PathBuf,
    pub gw: Gateway,
    rt: Option<tokio::runtime::Runtime>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: Option<std::sync::mpsc::Receiver<Result<(), String>>>,
}

impl Gw {
    /// Starts a gateway on `toml` with no secrets.
    pub fn start(name: &str, toml: &str) -> Gw {
        Gw::start_with(name, toml, Vec::new())
    }

    /// Starts a gateway on `toml`; `secrets` answer the gateway's secret
    /// look-ups (nothing is read from this process's environment).
    pub fn start_with(name: &str, toml: &str, secrets: Vec<(String, String)>) -> Gw {
        Gw::try_start_with(name, toml, secrets)
            .unwrap_or_else(|e| panic!("the gateway stopped before it was ready: {e}"))
    }

    /// [`Gw::start_with`], returning what `serve` failed with when it stops
    /// before it is ready.
    #[allow(dead_code)]
    pub fn try_start_with(
        name: &str,
        toml: &str,
        secrets: Vec<(String, String)>,
    ) -> Result<Gw, String> {
        Gw::try_start_in(fresh_dir(name).join("data"), toml, secrets)
    }

    /// [`Gw::try_start_with`] on a given data directory (a restart keeps it).
    /// A gateway stopped in this process a moment ago may still hold the
    /// store's lock (a blocking task of its runtime finishing on a loaded
    /// machine): that start is tried again for up to 30 s.
    #[allow(dead_code)]
    pub fn try_start_in(
        data: PathBuf,
        toml: &str,
        secrets: Vec<(String, String)>,
    ) -> Result<Gw, String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match Gw::try_start_once(data.clone(), toml, secrets.clone()) {
                Err(e) if e.contains("locked by another process") && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                r => return r,
            }
        }
    }

    #[allow(dead_code)]
    fn try_start_once(
        data: PathBuf,
        toml: &str,
        secrets: Vec<(String, String)>,
    ) -> Result<Gw, String> {
        let cfg = GatewayConfig::from_toml(toml)
            .unwrap_or_else(|e| panic!("test configuration refused: {e}\n{toml}"));
        let engine = EngineConfig {
            data_dir: data.clone(),
            runtime_dir: scratch().join("run"),
            init_path: init_path(),
        };
        let secrets = Arc::new(secrets);
        let secret: moat_gateway::server::SecretFn =
            Arc::new(move |k: &str| secrets.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime");
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let opts = ServeOptions {
            cfg,
            data_dir: data.clone(),
            engine,
            secret,
        };
        rt.spawn(async move {
            let r = serve(
                opts,
                move |bound, gw| {
                    let _ = ready_tx.send((bound, gw.clone()));
                },
                async move {
                    let _ = stop_rx.await;
                },
            )
            .await;
            let _ = done_tx.send(r.map_err(|e| e.to_string()));
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let (bound, gw) = loop {
            if let Ok(r) = ready_rx.recv_timeout(Duration::from_millis(50)) {
                break r;
            }
            if let Ok(r) = done_rx.try_recv() {
                rt.shutdown_timeout(Duration::from_secs(5));
                return Err(match r {
                    Err(e) => e,
                    Ok(()) => "serve returned Ok before it was ready".into(),
                });
            }
            assert!(
                Instant::now() < deadline,
                "the gateway was not ready in 60 s"
            );
        };
        Ok(Gw {
            web: bound.web.expect("the web chat is enabled"),
            admin: bound.admin,
            data,
            gw,
            rt: Some(rt),
            stop: Some(stop_tx),
            done: Some(done_rx),
        })
    }

    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.as_ref().expect("running").block_on(f)
    }

    /// The gauges `/metrics` shows (queue, pool, running turns).
    pub fn gauges(&self) -> Gauges {
        self.block_on(self.gw.gauges())
    }

    /// Waits until the pool has `idle` warm runners and nothing runs.
    pub fn wait_pool_idle(&self, idle: u64) {
        let deadline = Instant::now() + WAIT;
        loop {
            let g = self.gauges();
            if g.pool_idle == idle && g.running_turns == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the pool never had {idle} idle runners: {g:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn audit_path(&self) -> PathBuf {
        self.data.join("audit").join("audit.jsonl")
    }

    /// The audit log's records.
    pub fn audit(&self) -> Vec<Value> {
        audit_records(&self.audit_path())
    }

    /// The audit log's records of `kind`.
    pub fn audit_kind(&self, kind: &str) -> Vec<Value> {
        self.audit()
            .into_iter()
            .filter(|r| r["kind"] == kind)
            .collect()
    }

    /// Waits until `pred` holds for the audit log's records, and returns them.
    pub fn wait_audit(&self, what: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + WAIT;
        loop {
            let recs = self.audit();
            if pred(&recs) {
                return recs;
            }
            assert!(
                Instant::now() < deadline,
                "the audit log never showed {what}: {recs:#?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A client of the web chat (loopback identity, or a bearer token).
    pub fn client(&self, token: Option<&str>) -> Client {
        Client {
            addr: self.web,
            token: token.map(str::to_string),
        }
    }

    /// `/metrics` from the admin address.
    pub fn metrics(&self) -> String {
        let r = request(self.admin, "GET", "/metrics", &[], None);
        assert_eq!(r.status, 200, "{r:?}");
        r.body
    }

    /// Stops the gateway (the shutdown future completes) and checks `serve`
    /// returned `Ok`.
    pub fn stop(mut self) {
        self.shutdown().expect("serve returned an error");
    }

    fn shutdown(&mut self) -> Result<(), String> {
        let Some(stop) = self.stop.take() else {
            return Ok(());
        };
        let _ = stop.send(());
        let r = match self.done.take() {
            Some(rx) => rx
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| Err("serve did not return within 60 s".into())),
            None => Ok(()),
        };
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
        r
    }
}

impl Drop for Gw {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            if !std::thread::panicking() {
                panic!("the gateway did not stop cleanly: {e}");
            }
        }
    }
}

/// Every record of an audit log file (one JSON object per line).
pub fn audit_records(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line {l:?}: {e}")))
        .collect()
}

/// The value of one sample in a Prometheus exposition (`name{labels}` as
/// written), or `None`.
pub fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == sample).then(|| v.parse().ok())?
    })
}

/// Processes on this host whose command line contains `needle` (not this
/// process): (pid, owner uid, command line).
pub fn host_procs(needle: &str) -> Vec<(u32, u32, String)> {
    let me = std::process::id();
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmd.contains(needle) {
            let uid = std::fs::metadata(e.path()).map(|m| m.uid()).unwrap_or(0);
            out.push((pid, uid, cmd.trim_end().to_string()));
        }
    }
    out
}

/// Waits until some host process's command line contains `needle`.
pub fn wait_host_proc(needle: &str) -> Vec<(u32, u32, String)> {
    let deadline = Instant::now() + WAIT;
    loop {
        let p = host_procs(needle);
        if !p.is_empty() {
            return p;
        }
        assert!(
            Instant::now() < deadline,
            "no process on the host runs {needle:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until no host process's command line contains `needle`.
pub fn wait_no_host_proc(needle: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let p = host_procs(needle);
        if p.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "processes still run {needle:?} after {within:?}: {p:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---- HTTP ----

/// A response: status and body.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub body: String,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

/// An HTTP/1.1 connection (kept alive between requests).
pub struct Conn {
    stream: TcpStream,
    raw: Vec<u8>,
}

impl Conn {
    pub fn connect(addr: SocketAddr) -> Conn {
        let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        stream.set_nodelay(true).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        Conn {
            stream,
            raw: Vec::new(),
        }
    }

    fn send_head(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if !body.is_empty() || method == "POST" {
            req.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body);
        self.stream.write_all(&bytes).expect("sending a request");
    }

    fn fill(&mut self, deadline: Option<Instant>) -> std::io::Result<usize> {
        if let Some(d) = deadline {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::io::ErrorKind::TimedOut.into());
            }
            self.stream.set_read_timeout(Some(left))?;
        }
        let mut buf = [0u8; 16 * 1024];
        let n = self.stream.read(&mut buf)?;
        self.raw.extend_from_slice(&buf[..n]);
        Ok(n)
    }

    /// Reads a response head: status and lower-cased headers.
    fn read_head(&mut self) -> (u16, Vec<(String, String)>) {
        loop {
            if let Some(end) = find(&self.raw, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.raw[..end]).into_owned();
                self.raw.drain(..end + 4);
                let mut lines = head.split("\r\n");
                let status = lines
                    .next()
                    .and_then(|l| l.split(' ').nth(1))
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| panic!("a bad response head: {head:?}"));
                let headers = lines
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                    .collect();
                return (status, headers);
            }
            let n = self.fill(None).expect("reading a response head");
            assert!(n > 0, "the connection closed before a response");
        }
    }

    /// Sends a request and reads the whole response.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Resp {
        self.send_head(method, path, headers, body.unwrap_or("").as_bytes());
        self.read_response()
    }

    /// Sends `head` exactly as written (request line and header lines, each
    /// ending in CRLF, without the empty line; no Host is added) and `body`
    /// with its Content-Length, and reads the whole response.
    pub fn raw(&mut self, head: &str, body: &str) -> Resp {
        let mut req = head.to_string();
        if !body.is_empty() {
            req.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        req.push_str(body);
        self.stream
            .write_all(req.as_bytes())
            .expect("sending a request");
        self.read_response()
    }

    /// Reads one whole response.
    fn read_response(&mut self) -> Resp {
        let (status, headers) = self.read_head();
        let get = |k: &str| headers.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let body = if let Some(len) = get("content-length") {
            let len: usize = len.parse().expect("a content-length");
            while self.raw.len() < len {
                let n = self.fill(None).expect("reading a body");
                assert!(n > 0, "the connection closed inside a body");
            }
            self.raw.drain(..len).collect::<Vec<u8>>()
        } else if get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            let mut out = Vec::new();
            loop {
                match take_chunk(&mut self.raw) {
                    Some(Some(c)) => out.extend_from_slice(&c),
                    Some(None) => break,
                    None => {
                        let n = self.fill(None).expect("reading a chunk");
                        assert!(n > 0, "the connection closed inside a chunked body");
                    }
                }
            }
            out
        } else {
            while self.fill(None).map(|n| n > 0).unwrap_or(false) {}
            std::mem::take(&mut self.raw)
        };
        Resp {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One chunk of a chunked body from the front of `raw`: `None` when it is not
/// complete yet, `Some(None)` for the last chunk.
fn take_chunk(raw: &mut Vec<u8>) -> Option<Option<Vec<u8>>> {
    let line_end = find(raw, b"\r\n")?;
    let size_text = String::from_utf8_lossy(&raw[..line_end]).into_owned();
    let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
        .unwrap_or_else(|_| panic!("a bad chunk size line {size_text:?}"));
    if size == 0 {
        // The last chunk: its line and the empty trailer.
        if raw.len() < line_end + 4 {
            return None;
        }
        raw.drain(..line_end + 4);
        return Some(None);
    }
    if raw.len() < line_end + 2 + size + 2 {
        return None;
    }
    let data = raw[line_end + 2..line_end + 2 + size].to_vec();
    raw.drain(..line_end + 2 + size + 2);
    Some(Some(data))
}

/// One request written as-is (see `Conn::raw`) on a fresh connection.
pub fn raw_request(addr: SocketAddr, head: &str, body: &str) -> Resp {
    Conn::connect(addr).raw(&format!("{head}Connection: close\r\n"), body)
}

/// One request on a fresh connection.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Resp {
    let mut h = headers.to_vec();
    h.push(("Connection", "close"));
    Conn::connect(addr).request(method, path, &h, body)
}

/// A web chat client: loopback identity, or a bearer token.
#[derive(Clone)]
pub struct Client {
    pub addr: SocketAddr,
    pub token: Option<String>,
}

impl Client {
    fn auth(&self) -> Option<String> {
        self.token.as_ref().map(|t| format!("Bearer {t}"))
    }

    fn headers<'a>(&self, auth: &'a Option<String>) -> Vec<(&'static str, &'a str)> {
        let mut h = vec![("Content-Type", "application/json")];
        if let Some(a) = auth {
            h.push(("Authorization", a.as_str()));
        }
        h
    }

    pub fn get(&self, path: &str) -> Resp {
        let auth = self.auth();
        request(self.addr, "GET", path, &self.headers(&auth), None)
    }

    /// Posts `text` to conversation `thread`.
    pub fn post(&self, thread: &str, text: &str) -> Resp {
        self.post_body(thread, &json!({ "text": text }))
    }

    /// Posts `text` with a client id (a retry carries the same one).
    pub fn post_id(&self, thread: &str, text: &str, client_id: &str) -> Resp {
        self.post_body(thread, &json!({ "text": text, "client_id": client_id }))
    }

    pub fn post_body(&self, thread: &str, body: &Value) -> Resp {
        let auth = self.auth();
        request(
            self.addr,
            "POST",
            &format!("/api/conversations/{thread}/messages"),
            &self.headers(&auth),
            Some(&body.to_string()),
        )
    }

    /// Opens the conversation's event stream (`Err`: the refusal).
    pub fn events(&self, thread: &str) -> Result<Sse, Resp> {
        let auth = self.auth();
        let mut h = vec![("Accept", "text/event-stream")];
        if let Some(a) = &auth {
            h.push(("Authorization", a.as_str()));
        }
        Sse::open(
            self.addr,
            &format!("/api/conversations/{thread}/events"),
            &h,
        )
    }
}

/// A server-sent-events stream of JSON events.
pub struct Sse {
    conn: Conn,
    chunked: bool,
    text: Vec<u8>,
    events: VecDeque<Value>,
}

impl Sse {
    pub fn open(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Result<Sse, Resp> {
        let mut conn = Conn::connect(addr);
        conn.send_head("GET", path, headers, b"");
        let (status, hdrs) = conn.read_head();
        let get = |k: &str| hdrs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        if status != 200 {
            let len: usize = get("content-length")
                .and_then(|l| l.parse().ok())
                .unwrap_or(0);
            while conn.raw.len() < len {
                if conn.fill(None).map(|n| n == 0).unwrap_or(true) {
                    break;
                }
            }
            let body = String::from_utf8_lossy(&conn.raw).into_owned();
            return Err(Resp { status, body });
        }
        assert!(
            get("content-type").is_some_and(|c| c.starts_with("text/event-stream")),
            "not an event stream: {hdrs:?}"
        );
        let chunked = get("transfer-encoding").is_some_and(|v| v.contains("chunked"));
        Ok(Sse {
            conn,
            chunked,
            text: Vec::new(),
            events: VecDeque::new(),
        })
    }

    /// Moves decoded body bytes into `text` and complete events into `events`.
    fn decode(&mut self) -> bool {
        let mut ended = false;
        if self.chunked {
            while let Some(c) = take_chunk(&mut self.conn.raw) {
                match c {
                    Some(data) => self.text.extend_from_slice(&data),
                    None => {
                        ended = true;
                        break;
                    }
                }
            }
        } else {
            self.text.append(&mut self.conn.raw);
        }
        while let Some(end) = find(&self.text, b"\n\n") {
            let block = String::from_utf8_lossy(&self.text[..end]).into_owned();
            self.text.drain(..end + 2);
            let data: Vec<&str> = block
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            if !data.is_empty() {
                let joined = data.join("\n");
                let v = serde_json::from_str(&joined)
                    .unwrap_or_else(|e| panic!("an event that is not JSON ({e}): {joined:?}"));
                self.events.push_back(v);
            }
        }
        ended
    }

    /// The next event, or `None` when `timeout` passes first (or the stream ends).
    pub fn next(&mut self, timeout: Duration) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let ended = self.decode();
            if let Some(v) = self.events.pop_front() {
                return Some(v);
            }
            if ended {
                return None;
            }
            match self.conn.fill(Some(deadline)) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return None
                }
                Err(e) => panic!("reading the event stream: {e}"),
            }
        }
    }

    /// Events until (and including) the first one `stop` accepts; panics with
    /// what came when `timeout` passes first.
    pub fn until(&mut self, timeout: Duration, mut stop: impl FnMut(&Value) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left) {
                Some(v) => {
                    let done = stop(&v);
                    seen.push(v);
                    if done {
                        return seen;
                    }
                }
                None => panic!("the awaited event did not come in {timeout:?}; events: {seen:#?}"),
            }
        }
    }

    /// Events until `n` answers have come.
    pub fn answers(&mut self, n: usize) -> Vec<Value> {
        let mut got = 0;
        self.until(WAIT, |v| {
            if v["type"] == "answer" {
                got += 1;
            }
            got == n
        })
    }

    /// Every event that comes within `d`.
    pub fn during(&mut self, d: Duration) -> Vec<Value> {
        let deadline = Instant::now() + d;
        let mut seen = Vec::new();
        while let Some(v) = self.next(deadline.saturating_duration_since(Instant::now())) {
            seen.push(v);
        }
        seen
    }
}

/// The `type` of an event.
pub fn kind(v: &Value) -> &str {
    v["type"].as_str().unwrap_or("")
}

/// The texts of the answer events in `evs`, with their `ok`.
pub fn answers_of(evs: &[Value]) -> Vec<(String, bool)> {
    evs.iter()
        .filter(|v| kind(v) == "answer")
        .map(|v| {
            (
                v["text"].as_str().unwrap_or("").to_string(),
                v["ok"].as_bool().unwrap_or(false),
            )
        })
        .collect()
}
