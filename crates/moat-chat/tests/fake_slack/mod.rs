//! A fake Slack for the tests, written from Slack's public API documentation:
//! the Web API methods moat calls (over plain HTTP on 127.0.0.1), the file
//! upload URL, and a Socket Mode WebSocket server. It records every call and
//! can answer 429 with `Retry-After` a given number of times.

#![allow(dead_code)]
// Response-sized errors are what hyper and tungstenite callbacks use.
#![allow(clippy::result_large_err)]

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

pub const BOT_TOKEN: &str = "xoxb-fake-bot-token-0123456789";
pub const APP_TOKEN: &str = "xapp-1-A0APP001-fake-app-token";
pub const BOT_USER: &str = "UB0TM047";

/// One request the fake received.
#[derive(Debug, Clone)]
pub struct Call {
    pub path: String,
    pub authorization: Option<String>,
    pub content_type: Option<String>,
    pub body: Bytes,
}

impl Call {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
    pub fn form(&self) -> HashMap<String, String> {
        parse_form(std::str::from_utf8(&self.body).expect("UTF-8 form"))
    }
}

#[derive(Default)]
pub struct State {
    pub calls: Vec<Call>,
    /// method → (answers of 429 left, Retry-After seconds)
    pub rate_limit: HashMap<String, (u32, u64)>,
    /// (channel, ts, name)
    pub reactions: HashSet<(String, String, String)>,
    /// thread_ts → messages in order (JSON objects as Slack returns them).
    pub threads: HashMap<String, Vec<Value>>,
    pub next_ts: u64,
    /// file_id → (declared length, uploaded bytes)
    pub files: HashMap<String, (usize, Option<Bytes>)>,
    /// Tickets handed out by apps.connections.open, not yet used.
    pub tickets: HashSet<String>,
    pub tickets_issued: usize,
    pub ws_port: u16,
}

pub struct FakeSlack {
    pub port: u16,
    pub state: Arc<Mutex<State>>,
    pub connections: Arc<AtomicUsize>,
}

impl FakeSlack {
    pub async fn start() -> FakeSlack {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(State {
            next_ts: 1,
            ..State::default()
        }));
        let connections = Arc::new(AtomicUsize::new(0));
        let (st, conns) = (state.clone(), connections.clone());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                conns.fetch_add(1, Ordering::SeqCst);
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let st = st.clone();
                        async move { Ok::<_, Infallible>(handle(st, port, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        FakeSlack {
            port,
            state,
            connections,
        }
    }

    pub fn api_url(&self) -> String {
        format!("http://127.0.0.1:{}/api", self.port)
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }

    pub fn calls_to(&self, method: &str) -> Vec<Call> {
        let path = format!("/api/{method}");
        self.calls()
            .into_iter()
            .filter(|c| c.path == path)
            .collect()
    }

    pub fn rate_limit(&self, method: &str, times: u32, retry_after: u64) {
        self.state
            .lock()
            .unwrap()
            .rate_limit
            .insert(method.to_string(), (times, retry_after));
    }

    pub fn add_thread(&self, thread_ts: &str, messages: Vec<Value>) {
        self.state
            .lock()
            .unwrap()
            .threads
            .insert(thread_ts.to_string(), messages);
    }
}

pub fn parse_form(s: &str) -> HashMap<String, String> {
    fn dec(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < b.len() => {
                    let h = std::str::from_utf8(&b[i + 1..i + 3]).unwrap();
                    out.push(u8::from_str_radix(h, 16).expect("hex escape"));
                    i += 2;
                }
                c => out.push(c),
            }
            i += 1;
        }
        String::from_utf8(out).expect("UTF-8 value")
    }
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (dec(k), dec(v))
        })
        .collect()
}

fn reply(status: u16, headers: &[(&str, String)], body: Value) -> Response<Full<Bytes>> {
    let mut r = Response::builder()
        .status(status)
        .header("content-type", "application/json; charset=utf-8");
    for (k, v) in headers {
        r = r.header(*k, v.as_str());
    }
    r.body(Full::new(Bytes::from(body.to_string()))).unwrap()
}

fn ok(mut v: Value) -> Response<Full<Bytes>> {
    v["ok"] = json!(true);
    reply(200, &[], v)
}

fn err(code: &str) -> Response<Full<Bytes>> {
    reply(200, &[], json!({"ok": false, "error": code}))
}

/// The request's arguments: a JSON object or a form, as the content type says.
fn args(call: &Call) -> Result<Value, &'static str> {
    let ct = call.content_type.as_deref().unwrap_or("");
    if ct == "application/json; charset=utf-8" {
        serde_json::from_slice(&call.body).map_err(|_| "invalid_json")
    } else if ct == "application/x-www-form-urlencoded" {
        Ok(Value::Object(
            call.form()
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect(),
        ))
    } else if call.body.is_empty() {
        Ok(json!({}))
    } else {
        Err("invalid_form_data")
    }
}

async fn handle(st: Arc<Mutex<State>>, port: u16, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let header = |n: &str| {
        req.headers()
            .get(n)
            .map(|v| v.to_str().unwrap().to_string())
    };
    let authorization = header("authorization");
    let content_type = header("content-type");
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let call = Call {
        path: path.clone(),
        authorization,
        content_type,
        body,
    };
    let mut s = st.lock().unwrap();
    s.calls.push(call.clone());

    if let Some(ticket) = path.strip_prefix("/upload/v1/") {
        // The upload URL: bytes in the body, no token needed.
        let Some(entry) = s.files.get_mut(ticket) else {
            return reply(404, &[], json!({}));
        };
        entry.1 = Some(call.body.clone());
        let n = call.body.len();
        return Response::new(Full::new(Bytes::from(format!("OK - {n}"))));
    }
    let Some(method) = path.strip_prefix("/api/") else {
        return reply(404, &[], json!({"ok": false, "error": "unknown_method"}));
    };
    if let Some((left, secs)) = s.rate_limit.get_mut(method) {
        if *left > 0 {
            *left -= 1;
            let secs = *secs;
            return reply(
                429,
                &[("retry-after", secs.to_string())],
                json!({"ok": false, "error": "ratelimited"}),
            );
        }
    }
    let token = call
        .authorization
        .as_deref()
        .and_then(|a| a.strip_prefix("Bearer "));
    let a = match args(&call) {
        Ok(a) => a,
        Err(code) => return err(code),
    };
    let arg = |k: &str| a.get(k).and_then(Value::as_str).map(str::to_string);
    if method == "apps.connections.open" {
        return match token {
            Some(APP_TOKEN) => {
                s.tickets_issued += 1;
                let ticket = format!("tk{}", s.tickets_issued);
                s.tickets.insert(ticket.clone());
                ok(
                    json!({"url": format!("ws://127.0.0.1:{}/link/?ticket={ticket}&app_id=A0APP001", s.ws_port)}),
                )
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
    let channel_ok = |c: &Option<String>| match c.as_deref() {
        None => Err(err("channel_not_found")),
        Some("C0MISSING") => Err(err("channel_not_found")),
        Some(_) => Ok(()),
    };
    match method {
        "auth.test" => ok(json!({
            "url": "https://fake.slack.test/", "team": "Fake Team", "user": "moat",
            "team_id": "T0TEAM01", "user_id": BOT_USER, "bot_id": "B0MOAT01", "is_enterprise_install": false
        })),
        "chat.postMessage" => {
            let ch = arg("channel");
            if let Err(e) = channel_ok(&ch) {
                return e;
            }
            let Some(text) = arg("text") else {
                return err("no_text");
            };
            s.next_ts += 1;
            let ts = format!("1700000500.{:06}", s.next_ts);
            ok(
                json!({"channel": ch, "ts": ts, "message": {"type": "message", "text": text, "user": BOT_USER, "ts": ts}}),
            )
        }
        "chat.update" => {
            let ch = arg("channel");
            if let Err(e) = channel_ok(&ch) {
                return e;
            }
            match (arg("ts"), arg("text")) {
                (Some(ts), Some(text)) => ok(json!({"channel": ch, "ts": ts, "text": text})),
                _ => err("message_not_found"),
            }
        }
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
            let (Some(_ch), Some(ts)) = (arg("channel"), arg("ts")) else {
                return err("invalid_arguments");
            };
            let Some(all) = s.threads.get(&ts) else {
                return err("thread_not_found");
            };
            let oldest: f64 = arg("oldest").map(|o| o.parse().unwrap()).unwrap_or(0.0);
            let msgs: Vec<&Value> = all
                .iter()
                .filter(|m| m["ts"].as_str().unwrap().parse::<f64>().unwrap() > oldest)
                .collect();
            // Pages of 2, whatever `limit` says (Slack may return fewer).
            let start: usize = arg("cursor")
                .map(|c| c.strip_prefix("next:").unwrap().parse().unwrap())
                .unwrap_or(0);
            let page: Vec<Value> = msgs
                .iter()
                .skip(start)
                .take(2)
                .map(|m| (*m).clone())
                .collect();
            let next = if start + 2 < msgs.len() {
                format!("next:{}", start + 2)
            } else {
                String::new()
            };
            ok(json!({"messages": page, "has_more": !next.is_empty(),
                "response_metadata": {"next_cursor": next}}))
        }
        "files.getUploadURLExternal" => {
            let (Some(_name), Some(len)) = (arg("filename"), arg("length")) else {
                return err("invalid_arguments");
            };
            let id = format!("F0UP{:04}", s.files.len() + 1);
            s.files.insert(id.clone(), (len.parse().unwrap(), None));
            ok(
                json!({"upload_url": format!("http://127.0.0.1:{port}/upload/v1/{id}"), "file_id": id}),
            )
        }
        "files.completeUploadExternal" => {
            let Some(files) = arg("files") else {
                return err("invalid_arguments");
            };
            let files: Vec<Value> = serde_json::from_str(&files).unwrap();
            for f in &files {
                let id = f["id"].as_str().unwrap();
                match s.files.get(id) {
                    Some((len, Some(b))) if *len == b.len() => {}
                    _ => return err("file_not_found"),
                }
            }
            if let Err(e) = channel_ok(&arg("channel_id")) {
                return e;
            }
            ok(json!({"files": files}))
        }
        _ => err("unknown_method"),
    }
}

/// The Socket Mode side: a WebSocket listener whose URLs apps.connections.open hands out.
pub struct FakeSocket {
    pub listener: tokio::net::TcpListener,
    pub state: Arc<Mutex<State>>,
}

pub type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

impl FakeSlack {
    /// Starts listening for Socket Mode connections.
    pub async fn socket(&self) -> FakeSocket {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        self.state.lock().unwrap().ws_port = listener.local_addr().unwrap().port();
        FakeSocket {
            listener,
            state: self.state.clone(),
        }
    }
}

impl FakeSocket {
    /// Accepts the next WebSocket connection. Its URL must carry a ticket
    /// from apps.connections.open that was not used before (Slack's URLs
    /// are single-use). Returns the socket and its ticket.
    pub async fn accept(&self) -> (Ws, String) {
        use tokio_tungstenite::tungstenite::handshake::server::{
            ErrorResponse, Request as WsReq, Response as WsResp,
        };
        let (tcp, _) = self.listener.accept().await.unwrap();
        let seen = Arc::new(Mutex::new(String::new()));
        let seen2 = seen.clone();
        let st = self.state.clone();
        let cb = move |req: &WsReq, resp: WsResp| -> Result<WsResp, ErrorResponse> {
            let q = req.uri().query().unwrap_or("");
            let ticket = parse_form(q).remove("ticket").unwrap_or_default();
            assert_eq!(req.uri().path(), "/link/");
            assert!(
                st.lock().unwrap().tickets.remove(&ticket),
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
