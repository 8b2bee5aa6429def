//! The LLM reverse proxy benchmark (`scripts/bench`, or `cargo bench -p
//! moat-egress --bench llm`; needs root for the network namespace). One run,
//! one machine, each number next to its baseline from the same run:
//! - time to the response head and to the first byte of the first SSE event of
//!   a streamed Anthropic Messages call, through the door's proxy on
//!   127.0.0.1:8787 against the same call made straight to the upstream;
//! - throughput of a long SSE stream (small and large `content_block_delta`
//!   events) through the proxy against direct.
//!
//! The upstream is a fake Anthropic API on the host's 127.0.0.1 (plain HTTP,
//! allowed explicitly) that checks the real key and answers at once; nothing
//! leaves this machine. The clients are raw HTTP/1.1 over blocking sockets, one
//! thread on the host and one inside the door's namespace, called in turn.
//! Every proxied call must end in an audit record carrying the usage the fake
//! put in `message_start` and `message_delta`: the bench panics otherwise, so a
//! number never comes from calls the proxy did not really serve. Must never
//! reach anything but servers it starts itself. Prints Markdown.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::OwnedFd;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moat_egress::llm::{LlmConfig, Provider, ProviderConfig, Secret, UpstreamUrl, LLM_PORT};
use moat_egress::{Door, DoorConfig, JsonlAudit, Resolver};
use moat_policy::network::NetworkPolicy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The "real" key the fake upstream insists on (not a real key: a test value).
const HOST_KEY: &str = "sk-ant-bench-host-key-0123456789";
const INPUT_TOKENS: u64 = 25;
const CACHE_READ_TOKENS: u64 = 7;
/// The door's runtime threads, named so their CPU time can be read.
const DOOR_THREAD: &str = "moat-door";

// ---------------------------------------------------------------------------
// The fake upstream's streams, written from Anthropic's streaming docs.

fn sse(name: &str, data: &str) -> Vec<u8> {
    format!("event: {name}\ndata: {data}\n\n").into_bytes()
}

/// One event as one HTTP chunk, as a server flushing each event sends it.
fn chunk(ev: &[u8]) -> Vec<u8> {
    let mut c = format!("{:x}\r\n", ev.len()).into_bytes();
    c.extend_from_slice(ev);
    c.extend_from_slice(b"\r\n");
    c
}

fn delta(text: &str) -> Vec<u8> {
    sse(
        "content_block_delta",
        &format!(
            r#"{{"type":"content_block_delta","index":0,"delta":{{"type":"text_delta","text":"{text}"}}}}"#
        ),
    )
}

/// Text of `len` ASCII characters (nothing JSON must escape).
fn words(len: usize) -> String {
    const W: &[&str] = &[
        "the ", "proxy ", "streams ", "each ", "token ", "as ", "it ", "comes; ",
    ];
    let mut s = String::with_capacity(len + 8);
    let mut i = 0;
    while s.len() < len {
        s.push_str(W[i % W.len()]);
        i += 1;
    }
    s.truncate(len);
    s
}

/// What the fake sends for one model, pre-encoded, and what a client must see.
struct Stream {
    /// Response head and the `message_start` event: one write, at once.
    first: Vec<u8>,
    /// The following events up to the repeated deltas (chunked).
    middle: Vec<u8>,
    /// A run of delta events written `batches` times.
    batch: Vec<u8>,
    batches: u64,
    /// The remaining events and the last chunk.
    tail: Vec<u8>,
    /// The decoded body: bytes and SSE events.
    body_len: u64,
    events: u64,
    output_tokens: u64,
}

/// A stream with `deltas` delta events of `text_len` characters each
/// (`deltas` 2 and short text: the short answer of the docs' example).
fn build_stream(model: &str, deltas: u64, text_len: usize) -> Stream {
    let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n\
                cache-control: no-cache\r\nrequest-id: req_bench\r\ntransfer-encoding: chunked\r\n\r\n";
    let start = sse(
        "message_start",
        &format!(
            r#"{{"type":"message_start","message":{{"id":"msg_bench","type":"message","role":"assistant","content":[],"model":"{model}","stop_reason":null,"stop_sequence":null,"usage":{{"input_tokens":{INPUT_TOKENS},"cache_creation_input_tokens":0,"cache_read_input_tokens":{CACHE_READ_TOKENS},"output_tokens":1}}}}}}"#
        ),
    );
    let block_start = sse(
        "content_block_start",
        r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
    );
    let ping = sse("ping", r#"{"type": "ping"}"#);
    let one = delta(&words(text_len));
    let stop = sse(
        "content_block_stop",
        r#"{"type":"content_block_stop","index":0}"#,
    );
    let msg_delta = sse(
        "message_delta",
        &format!(
            r#"{{"type":"message_delta","delta":{{"stop_reason":"end_turn","stop_sequence":null}},"usage":{{"output_tokens":{deltas}}}}}"#
        ),
    );
    let msg_stop = sse("message_stop", r#"{"type":"message_stop"}"#);

    let mut first = head.as_bytes().to_vec();
    first.extend_from_slice(&chunk(&start));
    let mut middle = chunk(&block_start);
    middle.extend_from_slice(&chunk(&ping));
    // About 64 KiB of deltas per write, as a busy server's socket takes them.
    let per_batch = (64 * 1024 / (one.len() as u64 + 8)).clamp(1, deltas.max(1));
    let batches = deltas / per_batch;
    let batch: Vec<u8> = (0..per_batch).flat_map(|_| chunk(&one)).collect();
    let mut tail: Vec<u8> = (0..deltas % per_batch).flat_map(|_| chunk(&one)).collect();
    for ev in [&stop, &msg_delta, &msg_stop] {
        tail.extend_from_slice(&chunk(ev));
    }
    tail.extend_from_slice(b"0\r\n\r\n");
    let fixed = [&start, &block_start, &ping, &stop, &msg_delta, &msg_stop];
    Stream {
        first,
        middle,
        batch,
        batches,
        tail,
        body_len: fixed.iter().map(|e| e.len() as u64).sum::<u64>() + deltas * one.len() as u64,
        events: fixed.len() as u64 + deltas,
        output_tokens: deltas,
    }
}

struct Streams(Vec<(String, Stream)>);

impl Streams {
    fn get(&self, model: &str) -> Option<&Stream> {
        self.0.iter().find(|(m, _)| m == model).map(|(_, s)| s)
    }
}

// ---------------------------------------------------------------------------
// The fake upstream: POST /v1/messages with the host key and `stream: true`.

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

async fn fake_upstream(listener: tokio::net::TcpListener, streams: Arc<Streams>) {
    loop {
        let Ok((s, _)) = listener.accept().await else {
            continue;
        };
        let streams = streams.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(s, &streams).await {
                eprintln!("fake upstream: {e}");
            }
        });
    }
}

async fn refuse(s: &mut tokio::net::TcpStream, status: &str, why: &str) -> std::io::Result<()> {
    let body = format!(
        r#"{{"type":"error","error":{{"type":"invalid_request_error","message":"{why}"}}}}"#
    );
    let resp = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(resp.as_bytes()).await
}

async fn answer(mut s: tokio::net::TcpStream, streams: &Streams) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(4096);
    let mut tmp = [0u8; 4096];
    let head_len = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 64 * 1024 {
            return refuse(
                &mut s,
                "431 Request Header Fields Too Large",
                "head too large",
            )
            .await;
        }
        let n = s.read(&mut tmp).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let mut fields = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut fields);
    if !matches!(
        req.parse(&buf[..head_len]),
        Ok(httparse::Status::Complete(_))
    ) {
        return refuse(&mut s, "400 Bad Request", "malformed head").await;
    }
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
    };
    if header("x-api-key") != Some(HOST_KEY) || header("authorization").is_some() {
        return refuse(&mut s, "401 Unauthorized", "not the host key").await;
    }
    if req.method != Some("POST") || req.path != Some("/v1/messages") {
        return refuse(&mut s, "404 Not Found", "only POST /v1/messages").await;
    }
    let Some(len) = header("content-length").and_then(|v| v.parse::<usize>().ok()) else {
        return refuse(&mut s, "411 Length Required", "no content-length").await;
    };
    let mut body = buf[head_len..].to_vec();
    while body.len() < len {
        let n = s.read(&mut tmp).await?;
        if n == 0 {
            return Ok(());
        }
        body.extend_from_slice(&tmp[..n]);
    }
    let doc: serde_json::Value = serde_json::from_slice(&body[..len]).unwrap_or_default();
    let model = doc.get("model").and_then(|m| m.as_str()).unwrap_or("");
    let Some(st) = streams.get(model).filter(|_| doc["stream"] == true) else {
        return refuse(&mut s, "400 Bad Request", "unknown model or not streaming").await;
    };
    s.write_all(&st.first).await?;
    s.write_all(&st.middle).await?;
    for _ in 0..st.batches {
        s.write_all(&st.batch).await?;
    }
    s.write_all(&st.tail).await?;
    s.flush().await
}

// ---------------------------------------------------------------------------
// The client: raw HTTP/1.1 on a blocking socket, timing each step.

/// A streaming decoder of a chunked body.
enum Chunked {
    Size(Vec<u8>),
    Data(u64),
    DataEnd(Vec<u8>),
    Trailer(Vec<u8>),
    Done,
}

impl Chunked {
    /// Feeds raw bytes; `out` gets the decoded body.
    fn feed(&mut self, mut b: &[u8], out: &mut impl FnMut(&[u8])) -> Result<(), String> {
        while !b.is_empty() {
            match self {
                Chunked::Size(line) => {
                    let Some(i) = b.iter().position(|c| *c == b'\n') else {
                        line.extend_from_slice(b);
                        return Ok(());
                    };
                    line.extend_from_slice(&b[..i]);
                    b = &b[i + 1..];
                    let text = String::from_utf8_lossy(line);
                    let hex = text.trim_end_matches('\r').split(';').next().unwrap_or("");
                    let n = u64::from_str_radix(hex.trim(), 16)
                        .map_err(|_| format!("bad chunk size line {text:?}"))?;
                    *self = if n == 0 {
                        Chunked::Trailer(Vec::new())
                    } else {
                        Chunked::Data(n)
                    };
                }
                Chunked::Data(left) => {
                    let n = (*left).min(b.len() as u64) as usize;
                    out(&b[..n]);
                    b = &b[n..];
                    *left -= n as u64;
                    if *left == 0 {
                        *self = Chunked::DataEnd(Vec::new());
                    }
                }
                Chunked::DataEnd(seen) => {
                    seen.push(b[0]);
                    b = &b[1..];
                    if seen.len() == 2 {
                        if seen != b"\r\n" {
                            return Err("a chunk does not end in CRLF".into());
                        }
                        *self = Chunked::Size(Vec::new());
                    }
                }
                Chunked::Trailer(line) => {
                    let Some(i) = b.iter().position(|c| *c == b'\n') else {
                        line.extend_from_slice(b);
                        return Ok(());
                    };
                    let empty = line.is_empty() && b[..i].iter().all(|c| *c == b'\r');
                    b = &b[i + 1..];
                    *self = if empty {
                        Chunked::Done
                    } else {
                        Chunked::Trailer(Vec::new())
                    };
                }
                Chunked::Done => return Err("bytes after the last chunk".into()),
            }
        }
        Ok(())
    }
}

/// One call: what the client saw and when (from the write of the request).
#[derive(Debug, Clone)]
struct Timing {
    head: Duration,
    first_event: Duration,
    end: Duration,
    body_len: u64,
    events: u64,
}

/// Where a client sends its call.
#[derive(Clone)]
struct Target {
    addr: SocketAddr,
    path: &'static str,
    key: String,
}

fn call(t: &Target, model: &str, buf: &mut [u8]) -> Result<Timing, String> {
    let body = format!(
        r#"{{"model":"{model}","max_tokens":1024,"stream":true,"messages":[{{"role":"user","content":"Say hello, then keep talking."}}]}}"#
    );
    let req = format!(
        "POST {} HTTP/1.1\r\nhost: {}\r\nx-api-key: {}\r\nanthropic-version: 2023-06-01\r\n\
         content-type: application/json\r\naccept: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        t.path,
        t.addr,
        t.key,
        body.len()
    );
    let mut s = TcpStream::connect(t.addr).map_err(|e| format!("connect {}: {e}", t.addr))?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut head = Vec::new();
    let mut seen = Seen::default();
    let mut decoder = Chunked::Size(Vec::new());
    let mut head_at = None;
    loop {
        let n = s.read(buf).map_err(|e| e.to_string())?;
        let now = t0.elapsed();
        if n == 0 {
            break;
        }
        let fresh = &buf[..n];
        let after_head: Vec<u8>;
        let part: &[u8] = if head_at.is_none() {
            head.extend_from_slice(fresh);
            let Some(i) = find(&head, b"\r\n\r\n") else {
                continue;
            };
            head_at = Some(now);
            let text = String::from_utf8_lossy(&head[..i]).to_ascii_lowercase();
            if !text.starts_with("http/1.1 200") {
                return Err(format!(
                    "{} answered {}",
                    t.addr,
                    String::from_utf8_lossy(&head)
                ));
            }
            if !text.contains("content-type: text/event-stream")
                || !text.contains("transfer-encoding: chunked")
            {
                return Err(format!("not a chunked event stream: {text}"));
            }
            after_head = head.split_off(i + 4);
            &after_head
        } else {
            fresh
        };
        decoder.feed(part, &mut |d| seen.data(d, now))?;
        if matches!(decoder, Chunked::Done) {
            break;
        }
    }
    let end = t0.elapsed();
    if !matches!(decoder, Chunked::Done) {
        return Err(format!(
            "{}: the stream ended before its last chunk",
            t.addr
        ));
    }
    if !seen.first_bytes.starts_with(b"event: message_start\n") {
        return Err(format!(
            "the first event is not message_start: {:?}",
            String::from_utf8_lossy(&seen.first_bytes)
        ));
    }
    Ok(Timing {
        head: head_at.unwrap_or_default(),
        first_event: seen.first_at.unwrap_or_default(),
        end,
        body_len: seen.body_len,
        events: seen.events,
    })
}

/// What the client has seen of the decoded body.
#[derive(Default)]
struct Seen {
    first_at: Option<Duration>,
    first_bytes: Vec<u8>,
    body_len: u64,
    /// Events so far (each ends with an empty line).
    events: u64,
    last: u8,
}

impl Seen {
    fn data(&mut self, d: &[u8], now: Duration) {
        if d.is_empty() {
            return;
        }
        self.first_at.get_or_insert(now);
        if self.first_bytes.len() < 32 {
            let take = d.len().min(32 - self.first_bytes.len());
            self.first_bytes.extend_from_slice(&d[..take]);
        }
        self.body_len += d.len() as u64;
        for &c in d {
            if c == b'\n' && self.last == b'\n' {
                self.events += 1;
            }
            self.last = c;
        }
    }
}

/// A client thread, on the host or inside a namespace, making calls on demand.
struct Client {
    jobs: mpsc::Sender<String>,
    results: mpsc::Receiver<Result<Timing, String>>,
}

impl Client {
    fn start(target: Target, netns: Option<Arc<OwnedFd>>) -> Client {
        let (jobs, job_rx) = mpsc::channel::<String>();
        let (res_tx, results) = mpsc::channel();
        let serve = move || {
            // Written once here, so no call pays for first-touch page faults.
            let mut buf = vec![1u8; 256 * 1024];
            while let Ok(model) = job_rx.recv() {
                if res_tx.send(call(&target, &model, &mut buf)).is_err() {
                    break;
                }
            }
        };
        std::thread::spawn(move || match netns {
            Some(ns) => {
                moat_egress::netns::in_netns(&ns, move || {
                    serve();
                    Ok(())
                })
                .expect("a client thread inside the door's namespace");
            }
            None => serve(),
        });
        Client { jobs, results }
    }

    fn call(&self, model: &str) -> Timing {
        self.jobs.send(model.into()).expect("client thread");
        match self.results.recv().expect("client thread") {
            Ok(t) => t,
            Err(e) => panic!("call failed: {e}"),
        }
    }
}

// ---------------------------------------------------------------------------

fn percentiles(v: &[Duration]) -> [f64; 3] {
    let mut v = v.to_vec();
    v.sort();
    let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)].as_secs_f64() * 1e3;
    [at(0.5), at(0.9), at(0.99)]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// CPU time (on-CPU nanoseconds) of this process's threads named `name`.
fn thread_cpu_ns(name: &str) -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim_end() == name)
        })
        .filter_map(|t| {
            std::fs::read_to_string(t.path().join("schedstat"))
                .ok()?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

fn main() {
    let quick = std::env::var("MOAT_BENCH_QUICK").is_ok_and(|v| !v.is_empty());
    let (warm, n) = if quick { (50, 200) } else { (200, 2000) };
    let stream_bytes: u64 = if quick { 8 << 20 } else { 64 << 20 };
    let rounds = if quick { 1 } else { 3 };

    // Small deltas (~150 bytes, a few tokens each) and large ones (16 KiB).
    let small_len = delta(&words(40)).len() as u64;
    let large_len = delta(&words(16 * 1024)).len() as u64;
    let streams = Arc::new(Streams(vec![
        ("bench-short".into(), build_stream("bench-short", 2, 5)),
        (
            "bench-small".into(),
            build_stream("bench-small", stream_bytes / small_len, 40),
        ),
        (
            "bench-large".into(),
            build_stream("bench-large", stream_bytes / large_len, 16 * 1024),
        ),
    ]));

    // The fake upstream runs on its own thread and runtime, as a remote API
    // would not share the door's.
    let (addr_tx, addr_rx) = mpsc::channel();
    let fake_streams = streams.clone();
    std::thread::Builder::new()
        .name("fake-upstream".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind the fake upstream");
                addr_tx.send(l.local_addr().expect("addr")).expect("main");
                fake_upstream(l, fake_streams).await;
            });
        })
        .expect("fake upstream thread");
    let upstream: SocketAddr = addr_rx.recv().expect("fake upstream address");

    // The door, configured as `moat sandbox run --llm anthropic` with
    // MOAT_ANTHROPIC_URL=http://127.0.0.1:PORT and MOAT_LLM_ALLOW_PLAIN_HTTP=1.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(DOOR_THREAD)
        .enable_all()
        .build()
        .expect("runtime");
    let audit_dir = tempfile::tempdir().expect("a temporary directory");
    let audit_path = audit_dir.path().join("audit.jsonl");
    let door = Door::start(
        rt.handle(),
        DoorConfig {
            lease: "bench".into(),
            policy: Arc::new(NetworkPolicy::default()),
            resolver: Resolver::Static(Default::default()),
            audit: Arc::new(JsonlAudit::open(&audit_path).expect("audit log")),
            llm: Some(LlmConfig {
                providers: vec![ProviderConfig {
                    provider: Provider::Anthropic,
                    upstream: UpstreamUrl::parse(&format!("http://{upstream}"), true)
                        .expect("upstream URL"),
                    key: Secret::new(HOST_KEY),
                }],
                ..LlmConfig::default()
            }),
            github: None,
            amp: None,
        },
    )
    .expect("door (run as root)");
    let env = door.llm_env();
    let var = |k: &str| {
        env.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("the door gave no {k}"))
    };
    let placeholder = var("ANTHROPIC_API_KEY");
    assert_eq!(
        var("ANTHROPIC_BASE_URL"),
        format!("http://127.0.0.1:{LLM_PORT}/anthropic")
    );
    assert_ne!(placeholder, HOST_KEY);

    let direct = Client::start(
        Target {
            addr: upstream,
            path: "/v1/messages",
            key: HOST_KEY.into(),
        },
        None,
    );
    let proxied = Client::start(
        Target {
            addr: SocketAddr::from(([127, 0, 0, 1], LLM_PORT)),
            path: "/anthropic/v1/messages",
            key: placeholder,
        },
        Some(door.netns()),
    );
    let mut proxied_calls: Vec<(&str, u64)> = Vec::new();
    let check = |t: &Timing, model: &str| {
        let s = streams.get(model).expect("stream");
        assert_eq!(
            (t.body_len, t.events),
            (s.body_len, s.events),
            "the client must see the whole {model} stream"
        );
    };

    println!("## LLM proxy\n");

    // Time to first streamed byte: the two paths in turn, so both see the
    // same machine state.
    let short = "bench-short";
    let mut d_head = Vec::new();
    let mut d_first = Vec::new();
    let mut p_head = Vec::new();
    let mut p_first = Vec::new();
    for i in 0..warm + n {
        let d = direct.call(short);
        let p = proxied.call(short);
        check(&d, short);
        check(&p, short);
        proxied_calls.push((short, streams.get(short).expect("stream").output_tokens));
        if i >= warm {
            d_head.push(d.head);
            d_first.push(d.first_event);
            p_head.push(p.head);
            p_first.push(p.first_event);
        }
    }
    let [dh50, dh90, dh99] = percentiles(&d_head);
    let [df50, df90, df99] = percentiles(&d_first);
    let [ph50, ph90, ph99] = percentiles(&p_head);
    let [pf50, pf90, pf99] = percentiles(&p_first);
    println!(
        "### Time to first streamed byte ({n} calls each after {warm} warm-up, alternating direct and proxied)\n"
    );
    println!("A streamed `POST /v1/messages`; the fake upstream answers at once. Time from the write of the request, on a connected socket.\n");
    println!("| path | head median ms | head p90 | head p99 | first event median ms | first event p90 | first event p99 |\n|---|---|---|---|---|---|---|");
    println!("| direct to the upstream | {dh50:.3} | {dh90:.3} | {dh99:.3} | {df50:.3} | {df90:.3} | {df99:.3} |");
    println!("| through the LLM proxy (placeholder check, key swap, upstream connect, usage meter) | {ph50:.3} | {ph90:.3} | {ph99:.3} | {pf50:.3} | {pf90:.3} | {pf99:.3} |");
    let added = pf50 - df50;
    println!(
        "\nAdded to the first event at the median: **{added:.3} ms** ({:.2}× direct); goal at most 2 ms: {}.",
        pf50 / df50,
        if added <= 2.0 { "met" } else { "missed" }
    );

    // Throughput of a long stream.
    println!(
        "\n### Throughput of a long SSE stream (median of {rounds}, alternating direct and proxied)\n"
    );
    println!("| events | stream | direct MiB/s | proxied MiB/s | ratio | direct events/s | proxied events/s | door CPU per MiB |\n|---|---|---|---|---|---|---|---|");
    for (model, what) in [
        ("bench-small", format!("{small_len} B deltas")),
        ("bench-large", format!("{} KiB deltas", large_len >> 10)),
    ] {
        let s = streams.get(model).expect("stream");
        let mib = s.body_len as f64 / (1 << 20) as f64;
        let (mut dr, mut pr) = (Vec::new(), Vec::new());
        let mut door_cpu = Vec::new();
        // One unmeasured call each first: buffers and page cache warm.
        check(&direct.call(model), model);
        check(&proxied.call(model), model);
        proxied_calls.push((model, s.output_tokens));
        for _ in 0..rounds {
            let d = direct.call(model);
            check(&d, model);
            dr.push(mib / d.end.as_secs_f64());
            let cpu0 = thread_cpu_ns(DOOR_THREAD);
            let p = proxied.call(model);
            door_cpu.push((thread_cpu_ns(DOOR_THREAD) - cpu0) as f64 / 1e6 / mib);
            check(&p, model);
            proxied_calls.push((model, s.output_tokens));
            pr.push(mib / p.end.as_secs_f64());
        }
        let (d, p) = (median(dr), median(pr));
        let per_mib = s.events as f64 / mib;
        println!(
            "| {what} | {mib:.0} MiB, {} events | {d:.0} | {p:.0} | {:.2} | {:.0} | {:.0} | {:.2} ms |",
            s.events,
            p / d,
            d * per_mib,
            p * per_mib,
            median(door_cpu)
        );
    }

    // Every proxied call must be in the audit log with the usage its stream
    // carried: the proxy read message_start and message_delta of each.
    drop(direct);
    drop(proxied);
    let text = std::fs::read_to_string(&audit_path).expect("the audit log");
    let records: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|r: &serde_json::Value| r["kind"] == "llm")
        .collect();
    assert_eq!(
        records.len(),
        proxied_calls.len(),
        "one audit record per proxied call"
    );
    for (r, (model, out)) in records.iter().zip(&proxied_calls) {
        assert_eq!(r["verdict"], "allowed", "{r}");
        assert_eq!(r["status"], 200, "{r}");
        assert_eq!(r["model"], *model, "{r}");
        assert_eq!(r["input_tokens"], INPUT_TOKENS, "{r}");
        assert_eq!(r["cache_read_input_tokens"], CACHE_READ_TOKENS, "{r}");
        assert_eq!(r["output_tokens"], *out, "{r}");
        assert!(r["reason"].is_null(), "{r}");
    }
    assert!(!text.contains(HOST_KEY), "the host key is in the audit log");
    println!(
        "\nAudit records: {} (one per proxied call), each with the usage of its stream's `message_start` and `message_delta`.",
        records.len()
    );
    drop(door);
    rt.shutdown_background();
}
