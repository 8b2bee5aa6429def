//! What the gateway's Slack tests and the Slack benchmark share: a fake Slack
//! written from Slack's public API documentation, signed Events API
//! callbacks, a small HTTP/1.1 client, and a gateway started in-process with
//! `moat_gateway::server::serve` on real bwrap sandboxes.
//!
//! The fake serves the Web API methods moat calls over plain HTTP on
//! 127.0.0.1 (`auth.test`, `chat.postMessage`, `chat.update`,
//! `reactions.add`/`remove`, `conversations.replies`, the three-step file
//! upload, `apps.connections.open`) and a Socket Mode WebSocket listener. It
//! checks the bearer token of every call, records every call with the time it
//! arrived, and can answer a chosen call 429 with `Retry-After` or answer it
//! late. The secrets here are made up for the tests; no real token or signing
//! secret is ever used, and no request leaves 127.0.0.1.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use moat_creds::Secret;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Made-up secrets: the gateway gets them through `ServeOptions::secret`.
pub const SIGNING_SECRET: &str = "test-signing-secret-0f1e2d3c4b5a6978";
pub const BOT_TOKEN: &str = "xoxb-test-bot-token-not-real-5566";
pub const APP_TOKEN: &str = "xapp-1-A0APP001-test-app-token-not-real";
/// The bot's own user id, as `auth.test` answers it.
pub const BOT_USER: &str = "UB0TM047";
pub const TEAM: &str = "T0TEAM01";

// ------------------------------------------------------------------ fake Slack

/// One Web API call the fake received.
#[derive(Debug, Clone)]
pub struct Call {
    /// `chat.postMessage`, …, or `upload` for the file upload URL.
    pub method: String,
    pub authorization: Option<String>,
    /// The arguments: the JSON object, or the form as an object of strings.
    pub args: Value,
    /// The HTTP status the fake answered.
    pub status: u16,
    /// When the request arrived (before any delay the fake added).
    pub at: Instant,
    /// The answer's JSON (with `ok`).
    pub answer: Value,
}

impl Call {
    pub fn arg(&self, k: &str) -> Option<&str> {
        self.args.get(k).and_then(Value::as_str)
    }
    pub fn text(&self) -> &str {
        self.arg("text").unwrap_or("")
    }
    pub fn ok(&self) -> bool {
        self.status == 200 && self.answer["ok"] == json!(true)
    }
}

/// What the fake does instead of answering normally.
#[derive(Debug, Clone, Copy)]
pub enum Action {
    /// HTTP 429 with `Retry-After: secs`.
    RateLimit { retry_after_secs: u64 },
    /// Answer normally, after this long.
    Delay(Duration),
}

struct Rule {
    method: String,
    /// Only calls whose `text` contains this.
    text_contains: Option<String>,
    times: u32,
    action: Action,
}

#[derive(Default)]
struct Fake {
    calls: Vec<Call>,
    rules: Vec<Rule>,
    next_ts: u64,
    reactions: HashSet<(String, String, String)>,
    threads: HashMap<String, Vec<Value>>,
    /// file id → (declared length, uploaded length)
    files: HashMap<String, (usize, Option<usize>)>,
    tickets: HashSet<String>,
    tickets_issued: usize,
    ws_port: u16,
}

struct Shared {
    state: Mutex<Fake>,
    changed: tokio::sync::Notify,
    port: u16,
}

/// A fake Slack on 127.0.0.1.
#[derive(Clone)]
pub struct FakeSlack {
    shared: Arc<Shared>,
    pub addr: SocketAddr,
}

impl FakeSlack {
    pub async fn start() -> FakeSlack {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            state: Mutex::new(Fake {
                next_ts: 1,
                ..Fake::default()
            }),
            changed: tokio::sync::Notify::new(),
            port: addr.port(),
        });
        let app = Router::new()
            .route("/api/{method}", post(api))
            .route("/upload/{file}", post(upload))
            .with_state(shared.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeSlack { shared, addr }
    }

    /// `slack.api_url` for the gateway.
    pub fn api_url(&self) -> String {
        format!("http://{}/api", self.addr)
    }

    pub fn calls(&self) -> Vec<Call> {
        self.shared.state.lock().unwrap().calls.clone()
    }

    pub fn calls_to(&self, method: &str) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.method == method)
            .collect()
    }

    /// The next `times` calls of `method` (whose text contains
    /// `text_contains`, if given) get `action`.
    pub fn rule(&self, method: &str, text_contains: Option<&str>, times: u32, action: Action) {
        self.shared.state.lock().unwrap().rules.push(Rule {
            method: method.into(),
            text_contains: text_contains.map(str::to_string),
            times,
            action,
        });
    }

    /// Waits until `f` finds what it looks for in the calls so far; panics
    /// after `timeout`, listing the calls.
    pub async fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        f: impl Fn(&[Call]) -> Option<T>,
    ) -> T {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(v) = f(&self.shared.state.lock().unwrap().calls) {
                return v;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let calls = self.calls();
                panic!(
                    "waited {timeout:?} for {what}; the fake Slack saw {} calls:\n{}",
                    calls.len(),
                    summary(&calls)
                );
            }
        }
    }

    /// Waits for a successful `chat.postMessage` in `thread` whose text
    /// contains `needle`; returns it.
    pub async fn wait_post(&self, channel: &str, thread: &str, needle: &str) -> Call {
        self.wait_for(
            &format!("a message containing {needle:?} in {channel}/{thread}"),
            Duration::from_secs(60),
            |calls| {
                calls
                    .iter()
                    .find(|c| {
                        c.method == "chat.postMessage"
                            && c.ok()
                            && c.arg("channel") == Some(channel)
                            && c.arg("thread_ts") == Some(thread)
                            && c.text().contains(needle)
                    })
                    .cloned()
            },
        )
        .await
    }

    /// Successful `chat.postMessage` texts in a thread, in the order posted.
    pub fn posts_in(&self, channel: &str, thread: &str) -> Vec<String> {
        self.calls()
            .iter()
            .filter(|c| {
                c.method == "chat.postMessage"
                    && c.ok()
                    && c.arg("channel") == Some(channel)
                    && c.arg("thread_ts") == Some(thread)
            })
            .map(|c| c.text().to_string())
            .collect()
    }

    /// Slack's side of a user's message: kept in its thread (what
    /// `conversations.replies` returns), as Slack keeps every message.
    pub fn user_said(
        &self,
        channel: &str,
        user: &str,
        ts: &str,
        thread_ts: Option<&str>,
        text: &str,
    ) {
        let root = thread_ts.unwrap_or(ts).to_string();
        let mut m =
            json!({"type": "message", "user": user, "text": text, "ts": ts, "channel": channel});
        if let Some(t) = thread_ts {
            m["thread_ts"] = json!(t);
        }
        self.shared
            .state
            .lock()
            .unwrap()
            .threads
            .entry(root)
            .or_default()
            .push(m);
    }

    /// A message of the bot already in a thread (posted by an earlier
    /// gateway), with its message metadata.
    pub fn bot_said(&self, thread: &str, ts: &str, text: &str, metadata: Value) {
        self.shared
            .state
            .lock()
            .unwrap()
            .threads
            .entry(thread.to_string())
            .or_default()
            .push(
                json!({"type": "message", "user": BOT_USER, "bot_id": "B0MOAT01",
                "text": text, "ts": ts, "metadata": metadata}),
            );
    }

    /// The callback body for `event` (see [`callback`]), the message also
    /// kept in the fake's thread as Slack would have it.
    pub fn callback(&self, event_id: &str, event: Value) -> String {
        let s = |k: &str| event.get(k).and_then(Value::as_str);
        if let (Some(ch), Some(user), Some(ts), None) =
            (s("channel"), s("user"), s("ts"), s("subtype"))
        {
            self.user_said(ch, user, ts, s("thread_ts"), s("text").unwrap_or(""));
        }
        callback(event_id, event)
    }

    /// Listens for Socket Mode connections; `apps.connections.open` hands
    /// out URLs to this listener from now on.
    pub async fn socket(&self) -> FakeSocket {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        self.shared.state.lock().unwrap().ws_port = listener.local_addr().unwrap().port();
        FakeSocket {
            listener,
            shared: self.shared.clone(),
        }
    }
}

/// One line per call, for failure messages (texts cut short).
pub fn summary(calls: &[Call]) -> String {
    calls
        .iter()
        .map(|c| {
            let t: String = c.text().chars().take(80).collect();
            format!(
                "  {} {} ch={:?} thread={:?} ts={:?} name={:?} text={t:?}",
                c.status,
                c.method,
                c.arg("channel"),
                c.arg("thread_ts"),
                c.arg("ts").or(c.arg("timestamp")),
                c.arg("name"),
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn slack_json(status: StatusCode, v: &Value, extra: &[(&'static str, String)]) -> Response {
    let mut r = (
        status,
        [(
            axum::http::header::CONTENT_TYPE,
            "application/json; charset=utf-8",
        )],
        v.to_string(),
    )
        .into_response();
    for (k, val) in extra {
        r.headers_mut()
            .insert(*k, axum::http::HeaderValue::from_str(val).unwrap());
    }
    r
}

fn parse_form(s: &str) -> Value {
    fn dec(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < b.len() => {
                    let h = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("3F");
                    out.push(u8::from_str_radix(h, 16).unwrap_or(b'?'));
                    i += 2;
                }
                c => out.push(c),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    Value::Object(
        s.split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (dec(k), Value::String(dec(v)))
            })
            .collect(),
    )
}

/// The arguments as Slack reads them: JSON or a form, by content type.
fn args_of(headers: &HeaderMap, body: &[u8]) -> Result<Value, &'static str> {
    let ct = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if ct.starts_with("application/json") {
        serde_json::from_slice(body).map_err(|_| "invalid_json")
    } else if ct.starts_with("application/x-www-form-urlencoded") {
        Ok(parse_form(
            std::str::from_utf8(body).map_err(|_| "invalid_form_data")?,
        ))
    } else if body.is_empty() {
        Ok(json!({}))
    } else {
        Err("invalid_form_data")
    }
}

async fn api(
    State(sh): State<Arc<Shared>>,
    UrlPath(method): UrlPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let at = Instant::now();
    let authorization = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let args = args_of(&headers, &body);
    let text = args
        .as_ref()
        .ok()
        .and_then(|a| a.get("text"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    // A rule for this call?
    let action = {
        let mut s = sh.state.lock().unwrap();
        s.rules
            .iter_mut()
            .find(|r| {
                r.times > 0
                    && r.method == method
                    && r.text_contains.as_ref().is_none_or(|t| text.contains(t))
            })
            .map(|r| {
                r.times -= 1;
                r.action
            })
    };
    if let Some(Action::Delay(d)) = action {
        tokio::time::sleep(d).await;
    }
    let (status, answer, extra) = match (action, &args) {
        (Some(Action::RateLimit { retry_after_secs }), _) => (
            StatusCode::TOO_MANY_REQUESTS,
            json!({"ok": false, "error": "ratelimited"}),
            vec![("retry-after", retry_after_secs.to_string())],
        ),
        (_, Err(code)) => (StatusCode::OK, json!({"ok": false, "error": code}), vec![]),
        (_, Ok(a)) => {
            let token = authorization
                .as_deref()
                .and_then(|a| a.strip_prefix("Bearer "));
            let mut s = sh.state.lock().unwrap();
            (
                StatusCode::OK,
                answer(&mut s, sh.port, &method, token, a),
                vec![],
            )
        }
    };
    sh.state.lock().unwrap().calls.push(Call {
        method: method.clone(),
        authorization,
        args: args.unwrap_or(Value::Null),
        status: status.as_u16(),
        at,
        answer: answer.clone(),
    });
    sh.changed.notify_waiters();
    slack_json(status, &answer, &extra)
}

/// The Web API's answer to one call (Slack's documented shapes and codes).
fn answer(s: &mut Fake, port: u16, method: &str, token: Option<&str>, a: &Value) -> Value {
    let err = |code: &str| json!({"ok": false, "error": code});
    let arg = |k: &str| a.get(k).and_then(Value::as_str).map(str::to_string);
    if method == "apps.connections.open" {
        return match token {
            Some(APP_TOKEN) => {
                s.tickets_issued += 1;
                let ticket = format!("tk{}", s.tickets_issued);
                s.tickets.insert(ticket.clone());
                json!({"ok": true, "url": format!("ws://127.0.0.1:{}/link/?ticket={ticket}&app_id=A0APP001", s.ws_port)})
            }
            Some(BOT_TOKEN) => err("not_allowed_token_type"),
            _ => err("invalid_auth"),
        };
    }
    match token {
        Some(BOT_TOKEN) => {}
        None => return err("not_authed"),
        Some(_) => return err("invalid_auth"),
    }
    let ok = |mut v: Value| {
        v["ok"] = json!(true);
        v
    };
    match method {
        "auth.test" => ok(json!({
            "url": "https://fake.slack.test/", "team": "Fake Team", "user": "moat",
            "team_id": TEAM, "user_id": BOT_USER, "bot_id": "B0MOAT01", "is_enterprise_install": false
        })),
        "chat.postMessage" => {
            let Some(ch) = arg("channel") else {
                return err("channel_not_found");
            };
            let Some(text) = arg("text").filter(|t| !t.is_empty()) else {
                return err("no_text");
            };
            if text.chars().count() > 40_000 {
                return err("msg_too_long");
            }
            s.next_ts += 1;
            let ts = format!("1800000000.{:06}", s.next_ts);
            if let Some(t) = arg("thread_ts") {
                let mut m = json!({"type": "message", "user": BOT_USER, "bot_id": "B0MOAT01", "text": text, "ts": ts});
                // Message metadata: an object with event_type and
                // event_payload (Slack's docs), kept with the message.
                if let Some(meta) = a.get("metadata").filter(|m| m.is_object()) {
                    if meta.get("event_type").and_then(Value::as_str).is_none() {
                        return err("invalid_metadata_format");
                    }
                    m["metadata"] = meta.clone();
                }
                s.threads.entry(t).or_default().push(m);
            }
            ok(
                json!({"channel": ch, "ts": ts, "message": {"type": "message", "text": text, "user": BOT_USER, "ts": ts}}),
            )
        }
        "chat.update" => match (arg("channel"), arg("ts"), arg("text")) {
            (Some(ch), Some(ts), Some(text)) => ok(json!({"channel": ch, "ts": ts, "text": text})),
            (None, _, _) => err("channel_not_found"),
            _ => err("message_not_found"),
        },
        "reactions.add" | "reactions.remove" => {
            let (Some(ch), Some(ts), Some(name)) = (arg("channel"), arg("timestamp"), arg("name"))
            else {
                return err("invalid_arguments");
            };
            let key = (ch, ts, name);
            if method == "reactions.add" {
                if !s.reactions.insert(key) {
                    return err("already_reacted");
                }
            } else if !s.reactions.remove(&key) {
                return err("no_reaction");
            }
            ok(json!({}))
        }
        "conversations.replies" => {
            let (Some(_), Some(ts)) = (arg("channel"), arg("ts")) else {
                return err("invalid_arguments");
            };
            // `oldest` is exclusive (Slack's `inclusive` defaults to false).
            let key = |t: &str| {
                let (a, b) = t.split_once('.').unwrap_or((t, "0"));
                (a.parse::<u64>().unwrap_or(0), b.parse::<u64>().unwrap_or(0))
            };
            let oldest = arg("oldest").map(|o| key(&o));
            // Metadata only when asked for (`include_all_metadata`).
            let with_meta =
                matches!(a.get("include_all_metadata"), Some(v) if *v == "true" || *v == true);
            match s.threads.get(&ts) {
                Some(msgs) => {
                    let msgs: Vec<Value> = msgs
                        .iter()
                        .filter(|m| oldest.is_none_or(|o| key(m["ts"].as_str().unwrap_or("0")) > o))
                        .map(|m| {
                            let mut m = m.clone();
                            if !with_meta {
                                if let Some(o) = m.as_object_mut() {
                                    o.remove("metadata");
                                }
                            }
                            m
                        })
                        .collect();
                    ok(json!({"messages": msgs, "has_more": false,
                        "response_metadata": {"next_cursor": ""}}))
                }
                None => err("thread_not_found"),
            }
        }
        "files.getUploadURLExternal" => {
            let (Some(_), Some(len)) = (arg("filename"), arg("length")) else {
                return err("invalid_arguments");
            };
            let id = format!("F0UP{:04}", s.files.len() + 1);
            s.files.insert(id.clone(), (len.parse().unwrap_or(0), None));
            ok(json!({"upload_url": format!("http://127.0.0.1:{port}/upload/{id}"), "file_id": id}))
        }
        "files.completeUploadExternal" => {
            let Some(files) = arg("files") else {
                return err("invalid_arguments");
            };
            let files: Vec<Value> = serde_json::from_str(&files).unwrap_or_default();
            for f in &files {
                match f["id"].as_str().and_then(|id| s.files.get(id)) {
                    Some((len, Some(got))) if len == got => {}
                    _ => return err("file_not_found"),
                }
            }
            ok(json!({"files": files}))
        }
        _ => err("unknown_method"),
    }
}

/// The uploads that completed into `channel`/`thread`: (filename, bytes, sha256).
pub fn uploads(calls: &[Call], channel: &str, thread: &str) -> Vec<(String, u64, String)> {
    let mut out = Vec::new();
    for done in calls
        .iter()
        .filter(|c| c.method == "files.completeUploadExternal" && c.ok())
    {
        if done.arg("channel_id") != Some(channel) || done.arg("thread_ts") != Some(thread) {
            continue;
        }
        let files: Vec<Value> = serde_json::from_str(done.arg("files").unwrap_or("[]")).unwrap();
        for f in files {
            let id = f["id"].as_str().unwrap_or("");
            let ticket = calls
                .iter()
                .find(|c| c.method == "files.getUploadURLExternal" && c.answer["file_id"] == id)
                .expect("the upload's ticket");
            let sent = calls
                .iter()
                .find(|c| c.method == "upload" && c.arg("file") == Some(id) && c.status == 200)
                .expect("the upload's bytes");
            out.push((
                ticket.arg("filename").unwrap_or("").to_string(),
                sent.args["bytes"].as_u64().unwrap_or(0),
                sent.arg("sha256").unwrap_or("").to_string(),
            ));
        }
    }
    out
}

/// SHA-256 of `b`, lower-case hex (what an upload's bytes are checked by).
pub fn sha256_hex(b: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, b);
    d.as_ref().iter().map(|x| format!("{x:02x}")).collect()
}

/// The upload URL: bytes in the body, no token.
async fn upload(
    State(sh): State<Arc<Shared>>,
    UrlPath(file): UrlPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut s = sh.state.lock().unwrap();
    let status = match s.files.get_mut(&file) {
        Some(e) => {
            e.1 = Some(body.len());
            StatusCode::OK
        }
        None => StatusCode::NOT_FOUND,
    };
    s.calls.push(Call {
        method: "upload".into(),
        authorization: headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        args: json!({"file": file, "bytes": body.len(), "sha256": sha256_hex(&body)}),
        status: status.as_u16(),
        at: Instant::now(),
        answer: json!({}),
    });
    drop(s);
    sh.changed.notify_waiters();
    (status, format!("OK - {}", body.len())).into_response()
}

/// The Socket Mode side of the fake.
pub struct FakeSocket {
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
}

pub type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

impl FakeSocket {
    /// Accepts the next WebSocket connection (within 30 s). Its URL must
    /// carry a ticket from `apps.connections.open` that was not used before
    /// (Slack's URLs are single-use). Returns the socket and its ticket.
    pub async fn accept(&self) -> (Ws, String) {
        use tokio_tungstenite::tungstenite::handshake::server::{
            ErrorResponse, Request as WsReq, Response as WsResp,
        };
        let (tcp, _) = tokio::time::timeout(Duration::from_secs(30), self.listener.accept())
            .await
            .expect("the gateway opened no Socket Mode connection within 30 s")
            .unwrap();
        let seen = Arc::new(Mutex::new(String::new()));
        let seen2 = seen.clone();
        let sh = self.shared.clone();
        #[allow(clippy::result_large_err)] // the handshake callback's signature is the library's
        let cb = move |req: &WsReq, resp: WsResp| -> Result<WsResp, ErrorResponse> {
            let q = req.uri().query().unwrap_or("");
            let ticket = parse_form(q)["ticket"].as_str().unwrap_or("").to_string();
            assert_eq!(req.uri().path(), "/link/");
            assert!(
                sh.state.lock().unwrap().tickets.remove(&ticket),
                "ticket {ticket:?} unknown or reused"
            );
            *seen2.lock().unwrap() = ticket;
            Ok(resp)
        };
        let ws = tokio_tungstenite::accept_hdr_async(tcp, cb).await.unwrap();
        let ticket = seen.lock().unwrap().clone();
        (ws, ticket)
    }
}

// ------------------------------------------------------------------ events

pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A fresh Slack `ts` (unique within the process).
pub fn new_ts() -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(100);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}.{:06}", now_secs(), n)
}

/// A fresh `event_id`.
pub fn new_event_id() -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("Ev0TEST{n:06}")
}

/// An `event_callback` envelope around `event`, as Slack sends it.
pub fn callback(event_id: &str, event: Value) -> String {
    json!({
        "token": "legacy-verification-token-unused",
        "team_id": TEAM,
        "api_app_id": "A0APP001",
        "event": event,
        "type": "event_callback",
        "event_id": event_id,
        "event_time": now_secs(),
        "authorizations": [{"team_id": TEAM, "user_id": BOT_USER, "is_bot": true}],
        "is_ext_shared_channel": false,
        "event_context": "4-opaque-context"
    })
    .to_string()
}

/// `app_mention` of the bot by `user` in `channel` with `text` after the
/// mention; in the thread `thread_ts` when given.
pub fn mention(channel: &str, user: &str, ts: &str, thread_ts: Option<&str>, text: &str) -> Value {
    let mut ev = json!({
        "type": "app_mention",
        "user": user,
        "text": format!("<@{BOT_USER}> {text}"),
        "ts": ts,
        "channel": channel,
        "event_ts": ts,
        "client_msg_id": format!("cm-{ts}"),
        "team": TEAM,
    });
    if let Some(t) = thread_ts {
        ev["thread_ts"] = json!(t);
    }
    ev
}

/// A direct message (`message`, `channel_type` `im`).
pub fn direct(channel: &str, user: &str, ts: &str, text: &str) -> Value {
    json!({
        "type": "message",
        "channel": channel,
        "user": user,
        "text": text,
        "ts": ts,
        "event_ts": ts,
        "channel_type": "im",
        "team": TEAM,
    })
}

/// The Slack headers of a request signed with [`SIGNING_SECRET`] at `ts`.
pub fn signed_headers(body: &str, ts: i64) -> Vec<(String, String)> {
    let sig = moat_chat::slack::sign(&Secret::new(SIGNING_SECRET), ts, body.as_bytes());
    vec![
        ("X-Slack-Request-Timestamp".into(), ts.to_string()),
        ("X-Slack-Signature".into(), sig),
    ]
}

/// A shell command whose output is `{tag}-42` while its text is not, so a
/// message containing `{tag}-42` can only be the command's output.
pub fn marked(tag: &str) -> (String, String) {
    (format!("echo {tag}-$((6*7))"), format!("{tag}-42"))
}

// ------------------------------------------------------------------ HTTP client

/// An HTTP response: status, headers and body.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One kept-alive HTTP/1.1 connection (responses must have Content-Length).
pub struct Conn {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
    host: String,
}

impl Conn {
    pub async fn open(addr: SocketAddr) -> Conn {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        Conn {
            stream,
            buf: Vec::with_capacity(4096),
            host: addr.to_string(),
        }
    }

    /// A whole request; `body` `None` is a GET.
    pub fn request_bytes(
        host: &str,
        path: &str,
        headers: &[(String, String)],
        body: Option<&str>,
    ) -> Vec<u8> {
        let mut r = String::new();
        let method = if body.is_some() { "POST" } else { "GET" };
        r.push_str(&format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n"));
        if let Some(b) = body {
            r.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        for (k, v) in headers {
            r.push_str(&format!("{k}: {v}\r\n"));
        }
        r.push_str("\r\n");
        if let Some(b) = body {
            r.push_str(b);
        }
        r.into_bytes()
    }

    pub async fn send(
        &mut self,
        path: &str,
        headers: &[(String, String)],
        body: Option<&str>,
    ) -> std::io::Result<Resp> {
        let req = Conn::request_bytes(&self.host, path, headers, body);
        self.send_raw(&req).await
    }

    /// Sends a whole request and reads its response.
    pub async fn send_raw(&mut self, req: &[u8]) -> std::io::Result<Resp> {
        self.stream.write_all(req).await?;
        self.read_response().await
    }

    async fn read_response(&mut self) -> std::io::Result<Resp> {
        let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buf[..end])
                    .map_err(|_| bad("head not UTF-8"))?
                    .to_string();
                let mut lines = head.split("\r\n");
                let status: u16 = lines
                    .next()
                    .and_then(|l| l.split(' ').nth(1))
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| bad("no status"))?;
                let headers: Vec<(String, String)> = lines
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                    .collect();
                let len: usize = headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                    .and_then(|(_, v)| v.parse().ok())
                    .ok_or_else(|| bad("no Content-Length"))?;
                let total = end + 4 + len;
                while self.buf.len() < total {
                    self.fill().await?;
                }
                let body = String::from_utf8_lossy(&self.buf[end + 4..total]).into_owned();
                self.buf.drain(..total);
                return Ok(Resp {
                    status,
                    headers,
                    body,
                });
            }
            self.fill().await?;
        }
    }

    async fn fill(&mut self) -> std::io::Result<()> {
        let mut chunk = [0u8; 8192];
        let n = self.stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            ));
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// POSTs a callback body to `/slack/events` with `headers`, on a new connection.
pub async fn post_event(addr: SocketAddr, body: &str, headers: &[(String, String)]) -> Resp {
    Conn::open(addr)
        .await
        .send("/slack/events", headers, Some(body))
        .await
        .expect("POST /slack/events")
}

/// POSTs `body` signed now.
pub async fn post_signed(addr: SocketAddr, body: &str) -> Resp {
    post_event(addr, body, &signed_headers(body, now_secs())).await
}

/// POSTs a form body (an interaction: `payload=...`) to
/// `/slack/interactions` with `headers`, on a new connection.
pub async fn post_interaction(addr: SocketAddr, body: &str, headers: &[(String, String)]) -> Resp {
    let mut r = format!(
        "POST /slack/interactions HTTP/1.1\r\nHost: {addr}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    r.push_str("\r\n");
    r.push_str(body);
    Conn::open(addr)
        .await
        .send_raw(r.as_bytes())
        .await
        .expect("POST /slack/interactions")
}

/// The approval id in the action ids of a request's buttons (a
/// `chat.postMessage` with `blocks`), if it is one.
pub fn approval_id(c: &Call) -> Option<String> {
    c.args["blocks"]
        .as_array()?
        .iter()
        .flat_map(|b| b["elements"].as_array().cloned().unwrap_or_default())
        .find_map(|e| {
            e["action_id"]
                .as_str()?
                .strip_prefix("moat-approve:")
                .map(str::to_string)
        })
}

/// The body Slack sends when `user` clicks Approve (or Deny) on request
/// `id`, posted in `channel` as message `ts`: a `block_actions` payload,
/// form-encoded as Slack's documentation shows.
pub fn click_body(user: &str, id: &str, approve: bool, channel: &str, ts: &str) -> String {
    let payload = click_payload(user, id, approve, channel, ts);
    let mut out = String::from("payload=");
    for b in payload.to_string().bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The `block_actions` payload of that click (as Socket Mode carries it).
pub fn click_payload(user: &str, id: &str, approve: bool, channel: &str, ts: &str) -> Value {
    let (action, label) = if approve {
        (format!("moat-approve:{id}"), "Approve")
    } else {
        (format!("moat-deny:{id}"), "Deny")
    };
    json!({
        "type": "block_actions",
        "user": {"id": user, "username": user.to_lowercase(), "name": user.to_lowercase(), "team_id": TEAM},
        "api_app_id": "A0APP001",
        "token": "legacy-verification-token-unused",
        "container": {"type": "message", "message_ts": ts, "channel_id": channel, "is_ephemeral": false},
        "trigger_id": "1234567890.0987654321.abcdef",
        "team": {"id": TEAM, "domain": "fake"},
        "channel": {"id": channel, "name": "a-channel"},
        "message": {"type": "message", "ts": ts, "user": BOT_USER},
        "response_url": "https://hooks.slack.test/actions/T0TEAM01/1/x",
        "actions": [{
            "action_id": action, "block_id": "moat-approval", "value": id, "type": "button",
            "text": {"type": "plain_text", "text": label}, "action_ts": format!("{}.000100", now_secs()),
        }],
    })
}

/// `GET path` on a new connection.
pub async fn get(addr: SocketAddr, path: &str) -> Resp {
    Conn::open(addr)
        .await
        .send(path, &[], None)
        .await
        .expect("GET")
}

/// The `moat_events_total` counter for `verdict` from `/metrics`.
pub async fn events_total(admin: SocketAddr, verdict: &str) -> u64 {
    let m = get(admin, "/metrics").await;
    assert_eq!(m.status, 200, "{}", m.body);
    let key = format!("moat_events_total{{verdict=\"{verdict}\"}} ");
    m.body
        .lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /metrics:\n{}", m.body))
}

// ------------------------------------------------------------------ the gateway

/// moat-init next to the test or bench binaries (built on demand, as in
/// tests/pool.rs: `cargo test -p moat-gateway` alone does not build other
/// packages' binaries).
pub fn init_path() -> PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        let dir = exe.parent().unwrap().parent().unwrap();
        let p = dir.join("moat-init");
        if !p.exists() {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut cmd = std::process::Command::new(cargo);
            cmd.args(["build", "-p", "moat-sandbox", "--bin", "moat-init"]);
            if dir.file_name().is_some_and(|n| n == "release") {
                cmd.arg("--release");
            }
            let ok = cmd
                .status()
                .expect("running cargo to build moat-init")
                .success();
            assert!(ok && p.exists(), "moat-init is missing at {}", p.display());
        }
        p
    })
    .clone()
}

/// This process's scratch directory (mode 711, so sandbox uids can pass).
pub fn scratch() -> PathBuf {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("moat-gw-slack-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o711)).unwrap();
        d
    })
    .clone()
}

/// A new, empty data directory for one gateway.
pub fn data_dir(name: &str) -> PathBuf {
    let d = scratch().join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// How a test's gateway talks to Slack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Events API on its own `slack.listen` address.
    Events,
    /// Events API beside the web chat (no `slack.listen`).
    EventsBesideWeb,
    /// Socket Mode, web chat off.
    Socket,
}

/// A gateway configuration: listeners on port 0, Slack at the fake, then
/// `rest` (`[pool]`, `[defaults]`, `[[channel]]`…).
pub fn config(fake: &FakeSlack, data: &Path, mode: Mode, rest: &str) -> String {
    let (web, slack) = match mode {
        Mode::Events => (
            "listen = \"127.0.0.1:0\"",
            "mode = \"events\"\nlisten = \"127.0.0.1:0\"",
        ),
        Mode::EventsBesideWeb => ("listen = \"127.0.0.1:0\"", "mode = \"events\""),
        Mode::Socket => ("enabled = false", "mode = \"socket\""),
    };
    format!(
        "[gateway]\ndata_dir = {data:?}\n\n[web]\n{web}\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [slack]\n{slack}\napi_url = \"{api}\"\n\n{rest}\n",
        data = data.display().to_string(),
        api = fake.api_url(),
    )
}

/// The secrets the gateway is given: made up, never real.
pub fn secret_fn() -> moat_gateway::server::SecretFn {
    Arc::new(|k: &str| match k {
        "SLACK_SIGNING_SECRET" => Some(SIGNING_SECRET.to_string()),
        "SLACK_BOT_TOKEN" => Some(BOT_TOKEN.to_string()),
        "SLACK_APP_TOKEN" => Some(APP_TOKEN.to_string()),
        _ => None,
    })
}

/// A gateway running in this process.
pub struct Running {
    pub bound: moat_gateway::server::Bound,
    pub gw: moat_gateway::pipeline::Gateway,
    pub data_dir: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), moat_gateway::server::ServeError>>>,
}

impl Running {
    /// Starts `serve` with `toml` and waits until it is ready (pools warm).
    pub async fn start(toml: &str, data: &Path) -> Running {
        Running::start_with(toml, data, secret_fn()).await
    }

    /// [`Running::start`] with other secrets (e.g. an LLM key besides Slack's).
    /// A store a test (or a gateway stopped a moment ago) just let go of
    /// may still be locked while its last thread ends: that start is tried
    /// again for up to 30 s.
    pub async fn start_with(
        toml: &str,
        data: &Path,
        secret: moat_gateway::server::SecretFn,
    ) -> Running {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            match Running::try_start(toml, data, secret.clone()).await {
                Ok(r) => return r,
                Err(e) if e.contains("Locked") && std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("serve failed before ready: {e}"),
            }
        }
    }

    async fn try_start(
        toml: &str,
        data: &Path,
        secret: moat_gateway::server::SecretFn,
    ) -> Result<Running, String> {
        let cfg = moat_policy::gateway::GatewayConfig::from_toml(toml)
            .unwrap_or_else(|e| panic!("test config: {e}\n{toml}"));
        let engine = moat_sandbox::EngineConfig {
            data_dir: data.to_path_buf(),
            runtime_dir: scratch().join("run"),
            init_path: init_path(),
        };
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let opts = moat_gateway::server::ServeOptions {
            cfg,
            data_dir: data.to_path_buf(),
            engine,
            secret,
        };
        let task = tokio::spawn(moat_gateway::server::serve(
            opts,
            move |bound, gw| {
                let _ = ready_tx.send((bound, gw.clone()));
            },
            async move {
                let _ = stop_rx.await;
            },
        ));
        let (bound, gw) = match tokio::time::timeout(Duration::from_secs(60), ready_rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => return Err(format!("{:?}", task.await)),
            Err(_) => panic!("serve was not ready within 60 s"),
        };
        Ok(Running {
            bound,
            gw,
            data_dir: data.to_path_buf(),
            stop: Some(stop_tx),
            task: Some(task),
        })
    }

    /// Where `POST /slack/events` is.
    pub fn events(&self) -> SocketAddr {
        self.bound
            .slack
            .or(self.bound.web)
            .expect("an events listener")
    }

    pub fn audit_path(&self) -> PathBuf {
        self.data_dir.join("audit").join("audit.jsonl")
    }

    /// Every audit record so far.
    pub fn audit(&self) -> Vec<Value> {
        std::fs::read_to_string(self.audit_path())
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("an audit line is JSON"))
            .collect()
    }

    /// `kind = "message"` audit records with this verdict.
    pub fn audit_messages(&self, verdict: &str) -> Vec<Value> {
        self.audit()
            .into_iter()
            .filter(|r| r["kind"] == "message" && r["verdict"] == verdict)
            .collect()
    }

    /// The stored message with this event id, if any.
    pub fn stored(&self, event_id: &str) -> Option<moat_store::StoredMessage> {
        (1..10_000)
            .map_while(|id| self.gw.inner.store.message(id).ok().flatten())
            .find(|m| m.event_id == event_id)
    }

    /// Number of stored messages.
    pub fn stored_count(&self) -> usize {
        (1..10_000)
            .map_while(|id| self.gw.inner.store.message(id).ok().flatten())
            .count()
    }

    /// Stops the gateway (pools closed, leases destroyed) and checks that
    /// the audit chain verifies and holds no secret.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(60), t)
                .await
                .expect("serve stopped within 60 s")
                .expect("serve did not panic")
                .expect("serve ended cleanly");
        }
        let path = self.audit_path();
        moat_audit::verify(&path).unwrap_or_else(|e| panic!("audit chain: {e}"));
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        for s in [SIGNING_SECRET, BOT_TOKEN, APP_TOKEN] {
            assert!(!text.contains(s), "a secret is in the audit log");
        }
        remove_data_dir(&self.data_dir);
    }
}

/// Removes a stopped gateway's data directory, unmounting first what is
/// still mounted below it (per-thread sandboxes outlive the gateway by
/// design: they wait for their idle time). A failed test keeps its
/// directory for a post-mortem; scripts/clean-test-scratch clears it later.
pub fn remove_data_dir(dir: &Path) {
    let prefix = format!("{}/", dir.display());
    let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .filter(|m| m.starts_with(&prefix))
        .map(str::to_string)
        .collect();
    mounts.sort_by(|a, b| b.cmp(a));
    for m in mounts {
        let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
    }
    let _ = std::fs::remove_dir_all(dir);
}

impl Drop for Running {
    fn drop(&mut self) {
        // A test that failed before stop(): still ask serve to stop.
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}
