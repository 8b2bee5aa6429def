//! The fake WhatsApp Cloud API (Graph API, from its public documentation) and
//! the helpers the WhatsApp tests and the platform bench share.

#![allow(dead_code)]

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post as route_post;
use axum::{Json, Router};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::gwkit::*;

pub const TOKEN: &str = "EAAG-test-access-token";
pub const APP_SECRET: &str = "app-secret-0123456789";
pub const VERIFY: &str = "verify-token-abc";
pub const PHONE: &str = "5550001";
pub const ALICE: &str = "4915112345678";
pub const MALLORY: &str = "4915100000666";

#[derive(Debug, Clone)]
pub struct Call {
    pub path: String,
    pub body: Value,
    pub ok: bool,
    /// When the fake received it (the bench's clock).
    pub at: Instant,
}

#[derive(Default)]
pub struct FakeState {
    pub calls: Vec<Call>,
    pub throttle: u32,
}

pub struct FakeGraph {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<FakeState>>,
    pub _rt: tokio::runtime::Runtime,
}

pub async fn api(
    State(st): State<Arc<Mutex<FakeState>>>,
    Path((phone, what)): Path<(String, String)>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> axum::response::Response {
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
    if auth != Some(&format!("Bearer {TOKEN}")) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": {"code": 190, "message": "Invalid OAuth access token"}})),
        )
            .into_response();
    }
    let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let mut s = st.lock().unwrap();
    let mut call = Call {
        path: format!("{phone}/{what}"),
        body: parsed.clone(),
        ok: true,
        at: Instant::now(),
    };
    if what == "media" {
        s.calls.push(call);
        return Json(json!({"id": "media-1"})).into_response();
    }
    if parsed["type"] == json!("text") {
        if s.throttle > 0 {
            s.throttle -= 1;
            call.ok = false;
            s.calls.push(call);
            return (
                StatusCode::TOO_MANY_REQUESTS,
                Json(json!({"error": {"code": 130429, "message": "Rate limit hit"}})),
            )
                .into_response();
        }
        let text = parsed["text"]["body"].as_str().unwrap_or("");
        if text.chars().count() > 4096 || parsed["to"] == json!("closed") {
            call.ok = false;
            s.calls.push(call);
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": {"code": 131047, "message": "Re-engagement message"}})),
            )
                .into_response();
        }
    }
    s.calls.push(call);
    Json(json!({"messaging_product": "whatsapp", "messages": [{"id": "wamid.out"}]}))
        .into_response()
}

impl FakeGraph {
    pub fn start() -> FakeGraph {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let state = Arc::new(Mutex::new(FakeState::default()));
        let app = Router::new()
            .route("/v21.0/{phone}/{what}", route_post(api))
            .with_state(state.clone());
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        rt.spawn(async move { axum::serve(listener, app).await });
        FakeGraph {
            addr,
            state,
            _rt: rt,
        }
    }

    pub fn texts_to(&self, to: &str) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .calls
            .iter()
            .filter(|c| c.ok && c.body["type"] == json!("text") && c.body["to"] == json!(to))
            .map(|c| c.body["text"]["body"].as_str().unwrap().to_string())
            .collect()
    }

    pub fn wait(&self, what: &str, f: impl Fn(&[Call]) -> bool) -> Vec<Call> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let calls = self.state.lock().unwrap().calls.clone();
            if f(&calls) {
                return calls;
            }
            assert!(Instant::now() < deadline, "no {what}; calls: {calls:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

pub fn config(fake: &FakeGraph) -> String {
    format!(
        r#"
[web]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"

[whatsapp]
enabled = true
api_url = "http://{}/v21.0"

[pool]
size = 1

[defaults]
debounce = "0s"

[[channel]]
platform = "whatsapp"
id = "{PHONE}"
users = ["{ALICE}"]
"#,
        fake.addr
    )
}

pub fn secrets() -> Vec<(String, String)> {
    vec![
        ("WHATSAPP_TOKEN".into(), TOKEN.into()),
        ("WHATSAPP_APP_SECRET".into(), APP_SECRET.into()),
        ("WHATSAPP_VERIFY_TOKEN".into(), VERIFY.into()),
    ]
}

pub fn delivery(id: &str, from: &str, message: Value) -> String {
    let mut m = json!({"from": from, "id": id, "timestamp": "1700000000"});
    m.as_object_mut()
        .unwrap()
        .extend(message.as_object().unwrap().clone());
    json!({"object": "whatsapp_business_account", "entry": [{"id": "WABA", "changes": [{"field": "messages",
        "value": {"messaging_product": "whatsapp", "metadata": {"display_phone_number": "15550001", "phone_number_id": PHONE},
                  "contacts": [{"wa_id": from, "profile": {"name": "A"}}], "messages": [m]}}]}]})
    .to_string()
}

pub fn post(gw: &Gw, sig: Option<&str>, body: &str) -> Resp {
    let mut h = vec![("Content-Type", "application/json")];
    if let Some(s) = sig {
        h.push(("X-Hub-Signature-256", s));
    }
    request(gw.web, "POST", "/whatsapp/webhook", &h, Some(body))
}
