//! WhatsApp end to end: the gateway (in this process, real bwrap sandboxes,
//! the shell agent) against a fake Graph API on 127.0.0.1 written from the
//! Cloud API documentation: `POST /{phone-number-id}/messages` (text with a
//! 4,096-character body at most, read receipts, documents by media id),
//! `POST /{phone-number-id}/media` (multipart upload), a 429 on demand and
//! error 131047 for a closed 24-hour window. Deliveries are signed with
//! `X-Hub-Signature-256` as Meta signs them.
//!
//! Run as root: `cargo test -p moat-gateway --test whatsapp`.

mod gwkit;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post as route_post;
use axum::{Json, Router};
use gwkit::*;
use moat_chat::whatsapp::sign;
use serde_json::{json, Value};

const TOKEN: &str = "EAAG-test-access-token";
const APP_SECRET: &str = "app-secret-0123456789";
const VERIFY: &str = "verify-token-abc";
const PHONE: &str = "5550001";
const ALICE: &str = "4915112345678";
const MALLORY: &str = "4915100000666";

#[derive(Debug, Clone)]
struct Call {
    path: String,
    body: Value,
    ok: bool,
}

#[derive(Default)]
struct FakeState {
    calls: Vec<Call>,
    throttle: u32,
}

struct FakeGraph {
    addr: SocketAddr,
    state: Arc<Mutex<FakeState>>,
    _rt: tokio::runtime::Runtime,
}

async fn api(
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
    fn start() -> FakeGraph {
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

    fn texts_to(&self, to: &str) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .calls
            .iter()
            .filter(|c| c.ok && c.body["type"] == json!("text") && c.body["to"] == json!(to))
            .map(|c| c.body["text"]["body"].as_str().unwrap().to_string())
            .collect()
    }

    fn wait(&self, what: &str, f: impl Fn(&[Call]) -> bool) -> Vec<Call> {
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

fn config(fake: &FakeGraph) -> String {
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

fn secrets() -> Vec<(String, String)> {
    vec![
        ("WHATSAPP_TOKEN".into(), TOKEN.into()),
        ("WHATSAPP_APP_SECRET".into(), APP_SECRET.into()),
        ("WHATSAPP_VERIFY_TOKEN".into(), VERIFY.into()),
    ]
}

fn delivery(id: &str, from: &str, message: Value) -> String {
    let mut m = json!({"from": from, "id": id, "timestamp": "1700000000"});
    m.as_object_mut()
        .unwrap()
        .extend(message.as_object().unwrap().clone());
    json!({"object": "whatsapp_business_account", "entry": [{"id": "WABA", "changes": [{"field": "messages",
        "value": {"messaging_product": "whatsapp", "metadata": {"display_phone_number": "15550001", "phone_number_id": PHONE},
                  "contacts": [{"wa_id": from, "profile": {"name": "A"}}], "messages": [m]}}]}]})
    .to_string()
}

fn post(gw: &Gw, sig: Option<&str>, body: &str) -> Resp {
    let mut h = vec![("Content-Type", "application/json")];
    if let Some(s) = sig {
        h.push(("X-Hub-Signature-256", s));
    }
    request(gw.web, "POST", "/whatsapp/webhook", &h, Some(body))
}

#[test]
fn a_whatsapp_message_is_answered_read_and_chunked_and_the_subscription_is_verified() {
    let fake = FakeGraph::start();
    fake.state.lock().unwrap().throttle = 1;
    let gw = Gw::start_with("wa-e2e", &config(&fake), secrets());

    // The subscription check: the challenge only for the right token.
    let r = request(gw.web, "GET", "/whatsapp/webhook?hub.mode=subscribe&hub.verify_token=verify-token-abc&hub.challenge=1158201444", &[], None);
    assert_eq!((r.status, r.body.as_str()), (200, "1158201444"));
    let r = request(
        gw.web,
        "GET",
        "/whatsapp/webhook?hub.mode=subscribe&hub.verify_token=wrong&hub.challenge=1",
        &[],
        None,
    );
    assert_eq!(r.status, 403);

    let body = delivery(
        "wamid.1",
        ALICE,
        json!({"type": "text", "text": {"body": "echo wa-$((6*7))"}}),
    );
    let r = post(&gw, Some(&sign(APP_SECRET, body.as_bytes())), &body);
    assert_eq!(r.status, 200, "{}", r.body);
    fake.wait("the answer", |c| {
        c.iter().any(|c| {
            c.ok && c.body["text"]["body"]
                .as_str()
                .is_some_and(|t| t.contains("wa-42"))
        })
    });
    assert_eq!(
        fake.texts_to(ALICE)
            .iter()
            .filter(|t| t.contains("wa-42"))
            .count(),
        1,
        "once despite the 429"
    );
    let calls = fake.state.lock().unwrap().calls.clone();
    assert!(
        calls
            .iter()
            .any(|c| c.body["status"] == json!("read") && c.body["message_id"] == json!("wamid.1")),
        "read receipt"
    );
    assert!(
        calls.iter().all(|c| c.path == format!("{PHONE}/messages")),
        "sent from the business number"
    );

    // A long answer: several messages within 4,096 characters.
    let body = delivery(
        "wamid.2",
        ALICE,
        json!({"type": "text", "text": {"body": "seq 1 3000"}}),
    );
    assert_eq!(
        post(&gw, Some(&sign(APP_SECRET, body.as_bytes())), &body).status,
        200
    );
    fake.wait("the long answer", |c| {
        c.iter().any(|c| {
            c.ok && c.body["text"]["body"]
                .as_str()
                .is_some_and(|t| t.contains("\n3000"))
        })
    });
    let texts = fake.texts_to(ALICE);
    assert!(texts.len() >= 5, "{}", texts.len());
    assert!(texts.iter().all(|t| t.chars().count() <= 4096));

    // A sticker: told once what moat reads.
    for id in ["wamid.3", "wamid.4"] {
        let body = delivery(
            id,
            ALICE,
            json!({"type": "sticker", "sticker": {"id": "s"}}),
        );
        assert_eq!(
            post(&gw, Some(&sign(APP_SECRET, body.as_bytes())), &body).status,
            200
        );
    }
    fake.wait("the notice", |c| {
        c.iter().any(|c| {
            c.body["text"]["body"]
                .as_str()
                .is_some_and(|t| t.contains("only read text and files"))
        })
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        fake.texts_to(ALICE)
            .iter()
            .filter(|t| t.contains("only read text"))
            .count(),
        1
    );
    gw.stop();
}

/// P1 for WhatsApp: unsigned, wrongly signed or altered deliveries get 401
/// before the body is parsed (a body that is not JSON gets 401, not 400),
/// nothing is stored or run; a replayed signed delivery runs once.
#[test]
fn attack_p1_forged_and_replayed_whatsapp_deliveries_are_refused_before_parsing() {
    let fake = FakeGraph::start();
    let gw = Gw::start_with("wa-p1", &config(&fake), secrets());
    let body = delivery(
        "wamid.9",
        ALICE,
        json!({"type": "text", "text": {"body": "echo replay-$((1+1))"}}),
    );
    let good = sign(APP_SECRET, body.as_bytes());
    let altered = body.replace("replay", "forged");
    let other = sign("not-the-app-secret", body.as_bytes());
    for (sig, b) in [
        (None, body.as_str()),
        (Some(""), body.as_str()),
        (Some(other.as_str()), body.as_str()),
        (Some(good.as_str()), altered.as_str()),
        (Some("sha256=00"), "{not json"),
        (Some(other.as_str()), "{not json"),
    ] {
        let r = post(&gw, sig, b);
        assert_eq!(r.status, 401, "{sig:?}: {}", r.body);
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        gw.audit_kind("message").is_empty(),
        "{:?}",
        gw.audit_kind("message")
    );
    assert!(fake.texts_to(ALICE).is_empty());

    assert_eq!(post(&gw, Some(&good), &body).status, 200);
    assert_eq!(post(&gw, Some(&good), &body).status, 200);
    fake.wait("the answer", |c| {
        c.iter().any(|c| {
            c.ok && c.body["text"]["body"]
                .as_str()
                .is_some_and(|t| t.contains("replay-2"))
        })
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        fake.texts_to(ALICE)
            .iter()
            .filter(|t| t.contains("replay-2"))
            .count(),
        1
    );
    let verdicts: Vec<String> = gw
        .audit_kind("message")
        .iter()
        .map(|r| r["verdict"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(verdicts, ["accepted", "duplicate"]);

    // Someone not in the channel's users: dropped, never answered.
    let body = delivery(
        "wamid.10",
        MALLORY,
        json!({"type": "text", "text": {"body": "echo hi"}}),
    );
    assert_eq!(
        post(&gw, Some(&sign(APP_SECRET, body.as_bytes())), &body).status,
        200
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(fake.texts_to(MALLORY).is_empty());
    gw.stop();
}
