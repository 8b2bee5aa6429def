//! The fake Telegram Bot API (from the public Bot API documentation) and the
//! helpers the Telegram tests and the platform bench share.

#![allow(dead_code)]

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::gwkit::*;

pub const TOKEN: &str = "123456:test-bot-token-AAAA";
pub const HOOK_SECRET: &str = "hook-secret-0123456789";
pub const BOT_ID: i64 = 99;
pub const ALICE: i64 = 4242;
pub const MALLORY: i64 = 666;
pub const GROUP: i64 = -1001234;

#[derive(Debug, Clone)]
pub struct Call {
    pub method: String,
    pub body: Value,
    /// Raw bytes of a multipart body.
    pub raw: Vec<u8>,
    pub ok: bool,
    /// When the fake received it (the bench's clock).
    pub at: Instant,
}

#[derive(Default)]
pub struct FakeState {
    pub calls: Vec<Call>,
    pub updates: VecDeque<Value>,
    /// `sendMessage` calls to answer 429 before the next succeeds.
    pub throttle: u32,
    pub next_id: i64,
    pub offsets: Vec<i64>,
}

/// The fake Bot API, on its own runtime.
pub struct FakeTelegram {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<FakeState>>,
    pub _rt: tokio::runtime::Runtime,
}

/// The visible text of an HTML message: tags dropped, entities decoded.
pub fn visible(html: &str) -> String {
    let mut out = String::new();
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => in_tag = false,
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    out.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&amp;", "&")
}

pub async fn api(
    State(st): State<Arc<Mutex<FakeState>>>,
    Path((bot, method)): Path<(String, String)>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> axum::response::Response {
    if bot != format!("bot{TOKEN}") {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"ok": false, "error_code": 401, "description": "Unauthorized"})),
        )
            .into_response();
    }
    let multipart = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    let parsed: Value = if multipart {
        Value::Null
    } else {
        serde_json::from_slice(&body).unwrap_or(Value::Null)
    };
    if method == "getUpdates" {
        // A short long poll when nothing is queued.
        let empty = st.lock().unwrap().updates.is_empty();
        if empty {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let mut s = st.lock().unwrap();
    let mut call = Call {
        method: method.clone(),
        body: parsed.clone(),
        raw: body.to_vec(),
        ok: true,
        at: Instant::now(),
    };
    let reply = match method.as_str() {
        "getMe" => {
            json!({"ok": true, "result": {"id": BOT_ID, "is_bot": true, "first_name": "moat", "username": "moat_bot"}})
        }
        "deleteWebhook" | "sendChatAction" | "setMessageReaction" => {
            json!({"ok": true, "result": true})
        }
        "sendMessage" => {
            let text = parsed["text"].as_str().unwrap_or("");
            if s.throttle > 0 {
                s.throttle -= 1;
                call.ok = false;
                s.calls.push(call);
                return (
                    StatusCode::TOO_MANY_REQUESTS,
                    Json(json!({"ok": false, "error_code": 429, "description": "Too Many Requests: retry after 1", "parameters": {"retry_after": 1}})),
                )
                    .into_response();
            }
            if visible(text).chars().count() > 4096 || text.is_empty() {
                call.ok = false;
                s.calls.push(call);
                return (
                    StatusCode::BAD_REQUEST,
                    Json(json!({"ok": false, "error_code": 400, "description": "Bad Request: message is too long"})),
                )
                    .into_response();
            }
            s.next_id += 1;
            json!({"ok": true, "result": {"message_id": 1000 + s.next_id, "date": 0, "chat": {"id": parsed["chat_id"], "type": "private"}}})
        }
        "sendDocument" => {
            s.next_id += 1;
            json!({"ok": true, "result": {"message_id": 1000 + s.next_id, "date": 0, "chat": {"id": 0, "type": "private"}}})
        }
        "getUpdates" => {
            let offset = parsed["offset"].as_i64().unwrap_or(0);
            s.offsets.push(offset);
            // Confirmed updates (id < offset) are forgotten, as the Bot API does.
            while s
                .updates
                .front()
                .is_some_and(|u| u["update_id"].as_i64().unwrap_or(0) < offset)
            {
                s.updates.pop_front();
            }
            let list: Vec<Value> = s.updates.iter().cloned().collect();
            json!({"ok": true, "result": list})
        }
        _ => json!({"ok": false, "error_code": 404, "description": "Not Found"}),
    };
    s.calls.push(call);
    Json(reply).into_response()
}

impl FakeTelegram {
    pub fn start() -> FakeTelegram {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let state = Arc::new(Mutex::new(FakeState::default()));
        let app = Router::new()
            .route("/{bot}/{method}", post(api))
            .with_state(state.clone());
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        rt.spawn(async move { axum::serve(listener, app).await });
        FakeTelegram {
            addr,
            state,
            _rt: rt,
        }
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }

    pub fn sent_to(&self, chat: i64) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.method == "sendMessage" && c.ok && c.body["chat_id"] == json!(chat))
            .collect()
    }

    pub fn wait(&self, what: &str, f: impl Fn(&[Call]) -> bool) -> Vec<Call> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let calls = self.calls();
            if f(&calls) {
                return calls;
            }
            assert!(
                Instant::now() < deadline,
                "no {what}; calls: {:?}",
                calls
                    .iter()
                    .map(|c| (c.method.clone(), c.body.to_string()))
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

pub fn config(fake: &FakeTelegram, mode: &str) -> String {
    format!(
        r#"
[web]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"

[telegram]
mode = "{mode}"
api_url = "http://{}"

[pool]
size = 1

[defaults]
debounce = "0s"

[[channel]]
platform = "telegram"
id = "*"
users = ["{ALICE}"]
"#,
        fake.addr
    )
}

pub fn secrets() -> Vec<(String, String)> {
    vec![
        ("TELEGRAM_BOT_TOKEN".into(), TOKEN.into()),
        ("TELEGRAM_WEBHOOK_SECRET".into(), HOOK_SECRET.into()),
    ]
}

pub fn update(id: i64, chat: i64, kind: &str, user: i64, extra: Value) -> Value {
    let mut m = json!({
        "message_id": id * 10,
        "date": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs(),
        "chat": {"id": chat, "type": kind},
        "from": {"id": user, "is_bot": false, "first_name": "U"},
    });
    m.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    json!({"update_id": id, "message": m})
}

pub fn deliver(gw: &Gw, secret: Option<&str>, body: &str) -> Resp {
    let mut h = vec![("Content-Type", "application/json")];
    if let Some(s) = secret {
        h.push(("X-Telegram-Bot-Api-Secret-Token", s));
    }
    request(gw.web, "POST", "/telegram/webhook", &h, Some(body))
}
