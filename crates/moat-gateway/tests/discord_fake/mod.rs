//! A fake Discord on 127.0.0.1, written from the public Discord API
//! documentation (Gateway, Channel and rate-limit pages):
//!
//! - the Gateway over WebSocket: `HELLO` (op 10) with a short heartbeat
//!   interval, `IDENTIFY` (op 2: token and intents checked, `READY` with a
//!   `session_id` and a `resume_gateway_url`, then `GUILD_CREATE` with the
//!   guild's channels and active threads), heartbeats (op 1) acknowledged
//!   (op 11) unless told not to, `RESUME` (op 6: the events after the given
//!   sequence replayed, then `RESUMED`), and on demand a dropped socket,
//!   op 7 (reconnect) or op 9 (invalid session);
//! - REST under `/api/v10` with `Authorization: Bot TOKEN`: `GET
//!   /users/@me`, `GET /channels/{id}`, `POST /channels/{id}/messages`
//!   (JSON with `content` of at most 2,000 characters, or multipart with
//!   `payload_json` and `files[n]`), `POST /channels/{id}/typing`, `PUT` and
//!   `DELETE` of the bot's reaction; messages are limited per channel (3 a
//!   second, announced with `X-RateLimit-Bucket`/`-Remaining`/`-Reset-After`;
//!   a call over the limit is a 429 and counted as a violation), and a 429
//!   with a JSON `retry_after` on demand.
//!
//! Shared by moat-gateway's tests/discord.rs and moat's tests/discord_agent.rs
//! (not every test binary uses every helper).

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message as WsMessage;

pub const TOKEN: &str = "MTEx.test-discord-bot-token.AAAA";
pub const BOT_ID: &str = "900000000000000001";
pub const GUILD: &str = "100000000000000001";
/// The configured guild text channel.
pub const CHANNEL: &str = "111111111111111111";
/// A thread of CHANNEL announced in GUILD_CREATE.
pub const THREAD: &str = "222222222222222222";
/// A thread of CHANNEL only `GET /channels/{id}` knows.
pub const THREAD2: &str = "222222222222222223";
/// A guild channel no `[[channel]]` names.
pub const OTHER: &str = "444444444444444444";
/// Alice's direct message channel with the bot.
pub const DM: &str = "333333333333333333";
pub const HB_MS: u64 = 250;
/// Messages per channel per window.
const BUCKET_LIMIT: u32 = 3;
const BUCKET_WINDOW: Duration = Duration::from_millis(1000);

#[derive(Debug, Clone)]
pub struct Call {
    pub method: String,
    pub path: String,
    /// The JSON body, or a multipart body's `payload_json`.
    pub body: Value,
    pub raw: Vec<u8>,
    pub status: u16,
    /// When the call reached the fake.
    pub at: Instant,
    /// The id of the message the call created.
    pub created: Option<String>,
}

#[derive(Default)]
pub struct RestState {
    pub calls: Vec<Call>,
    /// Message posts to answer 429 before the next succeeds.
    pub throttle: u32,
    /// Calls made while the bucket was exhausted.
    pub violations: u32,
    /// No per-channel bucket (benchmarks).
    pub unlimited: bool,
    /// Message posts to create and then answer 500 (Discord acted, the
    /// answer was lost).
    pub fail_after_create: u32,
    /// `enforce_nonce`: nonce -> the message created with it.
    pub nonces: std::collections::HashMap<String, String>,
    buckets: std::collections::HashMap<String, (Instant, u32)>,
    next_id: u64,
}

#[derive(Default)]
pub struct GwState {
    /// Wakes the connection when something is queued for it.
    wake: Arc<tokio::sync::Notify>,
    pub seq: u64,
    /// Dispatches (seq, type, data), replayed on RESUME.
    pub history: Vec<(u64, String, Value)>,
    pub session: String,
    pub identifies: Vec<u64>,
    /// The `seq` of each RESUME.
    pub resumes: Vec<u64>,
    /// The `d` of each heartbeat.
    pub heartbeats: Vec<Value>,
    pub connections: u32,
    /// Bumped to drop the current connection without a close frame.
    generation: u64,
    pub no_ack: bool,
    /// A frame for the current connection (op 7, op 9).
    pending: Option<Value>,
    /// Close codes the fake received.
    pub closes: Vec<u16>,
}

pub struct FakeDiscord {
    pub rest: SocketAddr,
    pub gateway: SocketAddr,
    pub state: Arc<Mutex<RestState>>,
    pub gw: Arc<Mutex<GwState>>,
    _rt: tokio::runtime::Runtime,
}

pub fn snowflake() -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        - 1_420_070_400_000;
    ((ms << 22) | (N.fetch_add(1, std::sync::atomic::Ordering::Relaxed) & 0x3f_ffff)).to_string()
}

fn authorized(headers: &HeaderMap) -> bool {
    headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(&format!("Bot {TOKEN}"))
}

fn unauthorized() -> axum::response::Response {
    (
        StatusCode::UNAUTHORIZED,
        Json(json!({"message": "401: Unauthorized", "code": 0})),
    )
        .into_response()
}

async fn me(headers: HeaderMap) -> axum::response::Response {
    if !authorized(&headers) {
        return unauthorized();
    }
    Json(json!({"id": BOT_ID, "username": "moat", "bot": true})).into_response()
}

async fn channel(headers: HeaderMap, Path(id): Path<String>) -> axum::response::Response {
    if !authorized(&headers) {
        return unauthorized();
    }
    match id.as_str() {
        THREAD | THREAD2 => {
            Json(json!({"id": id, "type": 11, "guild_id": GUILD, "parent_id": CHANNEL}))
                .into_response()
        }
        CHANNEL | OTHER => Json(json!({"id": id, "type": 0, "guild_id": GUILD})).into_response(),
        _ => (
            StatusCode::NOT_FOUND,
            Json(json!({"message": "Unknown Channel", "code": 10003})),
        )
            .into_response(),
    }
}

/// The `payload_json` part of a multipart body.
fn payload_json(raw: &[u8]) -> Value {
    let text = String::from_utf8_lossy(raw);
    let Some(i) = text.find("name=\"payload_json\"") else {
        return Value::Null;
    };
    let rest = &text[i..];
    let Some(start) = rest.find("\r\n\r\n") else {
        return Value::Null;
    };
    let body = &rest[start + 4..];
    let end = body.find("\r\n--").unwrap_or(body.len());
    serde_json::from_str(&body[..end]).unwrap_or(Value::Null)
}

async fn messages(
    State(st): State<Arc<Mutex<RestState>>>,
    headers: HeaderMap,
    Path(chan): Path<String>,
    body: axum::body::Bytes,
) -> axum::response::Response {
    if !authorized(&headers) {
        return unauthorized();
    }
    let multipart = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    let parsed = if multipart {
        payload_json(&body)
    } else {
        serde_json::from_slice(&body).unwrap_or(Value::Null)
    };
    let mut s = st.lock().unwrap();
    let mut call = Call {
        method: "POST".into(),
        path: format!("/channels/{chan}/messages"),
        body: parsed.clone(),
        raw: body.to_vec(),
        status: 200,
        at: Instant::now(),
        created: None,
    };
    if s.throttle > 0 {
        s.throttle -= 1;
        call.status = 429;
        s.calls.push(call);
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", "1"), ("x-ratelimit-scope", "user")],
            Json(json!({"message": "You are being rate limited.", "retry_after": 0.3, "global": false})),
        )
            .into_response();
    }
    // The per-channel bucket.
    let now = Instant::now();
    let (start, used) = s
        .buckets
        .get(&chan)
        .copied()
        .filter(|(start, _)| now.duration_since(*start) < BUCKET_WINDOW)
        .unwrap_or((now, 0));
    let left = BUCKET_WINDOW.saturating_sub(now.duration_since(start));
    let reset = format!("{:.3}", left.as_secs_f64());
    if used >= BUCKET_LIMIT && !s.unlimited {
        s.violations += 1;
        call.status = 429;
        s.calls.push(call);
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [("x-ratelimit-bucket", "msgbucket"), ("x-ratelimit-remaining", "0"), ("x-ratelimit-reset-after", reset.as_str())],
            Json(json!({"message": "You are being rate limited.", "retry_after": left.as_secs_f64(), "global": false})),
        )
            .into_response();
    }
    s.buckets.insert(chan.clone(), (start, used + 1));
    let remaining = BUCKET_LIMIT
        .saturating_sub(used + 1)
        .max(u32::from(s.unlimited))
        .to_string();
    let content = parsed["content"].as_str().unwrap_or("");
    // 2,000 characters; counted in UTF-16 units, the stricter reading.
    if content.encode_utf16().count() > 2000 || (content.is_empty() && !multipart) {
        call.status = 400;
        s.calls.push(call);
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"message": "Invalid Form Body", "code": 50035})),
        )
            .into_response();
    }
    // enforce_nonce: the message already created with this nonce, no new
    // one (status 201 marks such a call in the record).
    let nonce = parsed["nonce"]
        .as_str()
        .filter(|_| parsed["enforce_nonce"] == json!(true))
        .map(str::to_string);
    if let Some(id) = nonce.as_ref().and_then(|n| s.nonces.get(n)).cloned() {
        call.status = 201;
        s.calls.push(call);
        return Json(json!({"id": id, "channel_id": chan, "content": content})).into_response();
    }
    s.next_id += 1;
    let id = snowflake();
    call.created = Some(id.clone());
    s.calls.push(call);
    if let Some(n) = nonce {
        s.nonces.insert(n, id.clone());
    }
    if s.fail_after_create > 0 {
        s.fail_after_create -= 1;
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"message": "500: Internal Server Error", "code": 0})),
        )
            .into_response();
    }
    (
        [
            ("x-ratelimit-bucket", "msgbucket".to_string()),
            ("x-ratelimit-limit", BUCKET_LIMIT.to_string()),
            ("x-ratelimit-remaining", remaining),
            ("x-ratelimit-reset-after", reset),
        ],
        Json(json!({"id": id, "channel_id": chan, "content": content, "author": {"id": BOT_ID, "bot": true}})),
    )
        .into_response()
}

async fn typing(
    State(st): State<Arc<Mutex<RestState>>>,
    headers: HeaderMap,
    Path(chan): Path<String>,
) -> axum::response::Response {
    if !authorized(&headers) {
        return unauthorized();
    }
    st.lock().unwrap().calls.push(Call {
        method: "POST".into(),
        path: format!("/channels/{chan}/typing"),
        body: Value::Null,
        raw: Vec::new(),
        status: 204,
        at: Instant::now(),
        created: None,
    });
    StatusCode::NO_CONTENT.into_response()
}

async fn reaction(
    State(st): State<Arc<Mutex<RestState>>>,
    method: Method,
    headers: HeaderMap,
    Path((chan, msg, emoji)): Path<(String, String, String)>,
) -> axum::response::Response {
    if !authorized(&headers) {
        return unauthorized();
    }
    st.lock().unwrap().calls.push(Call {
        method: method.to_string(),
        path: format!("/channels/{chan}/messages/{msg}/reactions"),
        body: json!({"emoji": emoji}),
        raw: Vec::new(),
        status: 204,
        at: Instant::now(),
        created: None,
    });
    StatusCode::NO_CONTENT.into_response()
}

async fn edit(
    State(st): State<Arc<Mutex<RestState>>>,
    headers: HeaderMap,
    Path((chan, msg)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> axum::response::Response {
    if !authorized(&headers) {
        return unauthorized();
    }
    let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    st.lock().unwrap().calls.push(Call {
        method: "PATCH".into(),
        path: format!("/channels/{chan}/messages/{msg}"),
        body: parsed.clone(),
        raw: body.to_vec(),
        status: 200,
        at: Instant::now(),
        created: None,
    });
    Json(json!({"id": msg, "channel_id": chan, "content": parsed["content"]})).into_response()
}

/// The answer to an interaction (no bot token needed: the interaction's
/// token is the credential).
async fn callback(
    State(st): State<Arc<Mutex<RestState>>>,
    Path((id, token)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> axum::response::Response {
    let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    st.lock().unwrap().calls.push(Call {
        method: "POST".into(),
        path: format!("/interactions/{id}/{token}/callback"),
        body: parsed,
        raw: body.to_vec(),
        status: 204,
        at: Instant::now(),
        created: None,
    });
    StatusCode::NO_CONTENT.into_response()
}

async fn send(
    ws: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    v: Value,
) -> bool {
    ws.send(WsMessage::text(v.to_string())).await.is_ok()
}

fn guild_create() -> Value {
    json!({"id": GUILD, "name": "test guild",
        "channels": [{"id": CHANNEL, "type": 0, "guild_id": GUILD}, {"id": OTHER, "type": 0, "guild_id": GUILD}],
        "threads": [{"id": THREAD, "type": 11, "guild_id": GUILD, "parent_id": CHANNEL}]})
}

/// One Gateway connection.
async fn gateway_conn(stream: tokio::net::TcpStream, st: Arc<Mutex<GwState>>, me: SocketAddr) {
    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
        return;
    };
    let generation = {
        let mut s = st.lock().unwrap();
        s.connections += 1;
        s.generation
    };
    if !send(
        &mut ws,
        json!({"op": 10, "d": {"heartbeat_interval": HB_MS}}),
    )
    .await
    {
        return;
    }
    // Events after this sequence go to this connection once it is ready.
    let mut sent_upto: Option<u64> = None;
    loop {
        let mut out = Vec::new();
        {
            let mut s = st.lock().unwrap();
            if s.generation != generation {
                return; // dropped: no close frame
            }
            if let Some(f) = s.pending.take() {
                out.push(f);
            }
            if let Some(upto) = sent_upto {
                for (seq, t, d) in s.history.iter().filter(|(q, ..)| *q > upto) {
                    out.push(json!({"op": 0, "s": seq, "t": t, "d": d}));
                    sent_upto = Some(*seq);
                }
            }
        }
        for f in out {
            if !send(&mut ws, f).await {
                return;
            }
        }
        let wake = st.lock().unwrap().wake.clone();
        let next = tokio::select! {
            n = ws.next() => Some(n),
            _ = wake.notified() => None,
            _ = tokio::time::sleep(Duration::from_millis(20)) => None,
        };
        let Some(next) = next else {
            continue;
        };
        let frame = match next {
            Some(Ok(WsMessage::Text(t))) => t,
            Some(Ok(WsMessage::Close(c))) => {
                if let Some(c) = c {
                    st.lock().unwrap().closes.push(u16::from(c.code));
                }
                return;
            }
            Some(Ok(_)) => continue,
            _ => return,
        };
        let f: Value = serde_json::from_str(frame.as_str()).unwrap_or(Value::Null);
        match f["op"].as_u64() {
            Some(1) => {
                let ack = {
                    let mut s = st.lock().unwrap();
                    s.heartbeats.push(f["d"].clone());
                    !s.no_ack
                };
                if ack && !send(&mut ws, json!({"op": 11})).await {
                    return;
                }
            }
            Some(2) => {
                if f["d"]["token"] != json!(TOKEN) {
                    let _ = ws.close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                        code: tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Library(4004),
                        reason: "Authentication failed.".into(),
                    })).await;
                    return;
                }
                let frames = {
                    let mut s = st.lock().unwrap();
                    s.identifies.push(f["d"]["intents"].as_u64().unwrap_or(0));
                    s.session = format!("session-{}", s.identifies.len());
                    s.seq += 1;
                    let ready = json!({"op": 0, "s": s.seq, "t": "READY", "d": {
                        "v": 10, "session_id": s.session, "resume_gateway_url": format!("ws://{me}"),
                        "user": {"id": BOT_ID, "username": "moat", "bot": true},
                        "guilds": [{"id": GUILD, "unavailable": true}]}});
                    s.seq += 1;
                    let guild =
                        json!({"op": 0, "s": s.seq, "t": "GUILD_CREATE", "d": guild_create()});
                    sent_upto = Some(s.seq);
                    vec![ready, guild]
                };
                for fr in frames {
                    if !send(&mut ws, fr).await {
                        return;
                    }
                }
            }
            Some(6) => {
                let (ok, seq) = {
                    let mut s = st.lock().unwrap();
                    let ok =
                        f["d"]["token"] == json!(TOKEN) && f["d"]["session_id"] == json!(s.session);
                    let seq = f["d"]["seq"].as_u64().unwrap_or(0);
                    if ok {
                        s.resumes.push(seq);
                    }
                    (ok, seq)
                };
                if !ok {
                    if !send(&mut ws, json!({"op": 9, "d": false})).await {
                        return;
                    }
                    continue;
                }
                // Replay what the client missed, then RESUMED.
                let frames = {
                    let mut s = st.lock().unwrap();
                    let mut v: Vec<Value> = s
                        .history
                        .iter()
                        .filter(|(q, ..)| *q > seq)
                        .map(|(q, t, d)| json!({"op": 0, "s": q, "t": t, "d": d}))
                        .collect();
                    s.seq += 1;
                    v.push(json!({"op": 0, "s": s.seq, "t": "RESUMED", "d": null}));
                    sent_upto = Some(s.seq);
                    v
                };
                for fr in frames {
                    if !send(&mut ws, fr).await {
                        return;
                    }
                }
            }
            _ => {}
        }
    }
}

impl FakeDiscord {
    pub fn start() -> FakeDiscord {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let state = Arc::new(Mutex::new(RestState::default()));
        let app = Router::new()
            .route("/api/v10/users/@me", get(me))
            .route("/api/v10/channels/{id}", get(channel))
            .route("/api/v10/channels/{id}/messages", post(messages))
            .route("/api/v10/channels/{id}/typing", post(typing))
            .route(
                "/api/v10/channels/{c}/messages/{m}",
                axum::routing::patch(edit),
            )
            .route(
                "/api/v10/interactions/{id}/{token}/callback",
                post(callback),
            )
            .route(
                "/api/v10/channels/{c}/messages/{m}/reactions/{e}/@me",
                put(reaction).delete(reaction),
            )
            .with_state(state.clone());
        let rest_l = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let rest = rest_l.local_addr().unwrap();
        rt.spawn(async move { axum::serve(rest_l, app).await });
        let gw = Arc::new(Mutex::new(GwState::default()));
        let gw_l = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let gateway = gw_l.local_addr().unwrap();
        let st = gw.clone();
        rt.spawn(async move {
            while let Ok((s, _)) = gw_l.accept().await {
                tokio::spawn(gateway_conn(s, st.clone(), gateway));
            }
        });
        FakeDiscord {
            rest,
            gateway,
            state,
            gw,
            _rt: rt,
        }
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }

    /// Messages posted (accepted) to a channel.
    pub fn posted(&self, chan: &str) -> Vec<Call> {
        let path = format!("/channels/{chan}/messages");
        self.calls()
            .into_iter()
            .filter(|c| c.method == "POST" && c.path == path && c.status == 200)
            .collect()
    }

    /// Posted texts (all channels) containing `needle`.
    pub fn posted_with(&self, needle: &str) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| {
                c.method == "POST"
                    && c.status == 200
                    && c.body["content"]
                        .as_str()
                        .is_some_and(|t| t.contains(needle))
            })
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
                    .map(|c| (
                        c.method.clone(),
                        c.path.clone(),
                        c.status,
                        c.body.to_string()
                    ))
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn wait_gw(&self, what: &str, f: impl Fn(&GwState) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !f(&self.gw.lock().unwrap()) {
            assert!(Instant::now() < deadline, "no {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Queues a dispatch; returns its sequence number.
    pub fn dispatch(&self, t: &str, d: Value) -> u64 {
        let mut s = self.gw.lock().unwrap();
        s.seq += 1;
        let seq = s.seq;
        s.history.push((seq, t.to_string(), d));
        s.wake.notify_waiters();
        seq
    }

    /// Drops the current connection without a close frame, then queues
    /// `events` (they reach moat only through a RESUME's replay).
    pub fn drop_socket_then(&self, events: Vec<(&str, Value)>) -> Vec<u64> {
        let mut s = self.gw.lock().unwrap();
        s.generation += 1;
        events
            .into_iter()
            .map(|(t, d)| {
                s.seq += 1;
                let seq = s.seq;
                s.history.push((seq, t.to_string(), d));
                seq
            })
            .collect()
    }

    /// Sends `frame` on the current connection (op 7, op 9).
    pub fn send_op(&self, frame: Value) {
        let mut s = self.gw.lock().unwrap();
        s.pending = Some(frame);
        s.wake.notify_waiters();
    }

    /// Ready for messages: identified at least once.
    pub fn wait_ready(&self) {
        self.wait_gw("IDENTIFY", |s| !s.identifies.is_empty());
    }
}

/// A `MESSAGE_CREATE` `d`: in `channel` (of the guild unless `dm`), by
/// `user`, mentioning the bot when `mention`.
pub fn message(channel: &str, dm: bool, user: &str, content: &str, mention: bool) -> Value {
    let mut m = json!({
        "id": snowflake(), "channel_id": channel, "type": 0, "content": content,
        "author": {"id": user, "username": "u", "discriminator": "0"},
        "mentions": if mention { json!([{"id": BOT_ID, "username": "moat", "bot": true}]) } else { json!([]) },
        "mention_roles": [], "attachments": [], "embeds": [], "tts": false,
        "timestamp": "2026-12-07T19:00:00.000000+00:00", "pinned": false,
    });
    if !dm {
        m["guild_id"] = json!(GUILD);
    }
    m
}

/// An `INTERACTION_CREATE` `d`: `user` clicked the button `custom_id` in a
/// guild channel.
pub fn click(channel: &str, user: &str, custom_id: &str) -> Value {
    json!({
        "id": snowflake(), "application_id": "1", "type": 3, "token": format!("itoken-{}", snowflake()),
        "guild_id": GUILD, "channel_id": channel, "version": 1,
        "member": {"user": {"id": user, "username": "u"}, "roles": []},
        "data": {"custom_id": custom_id, "component_type": 2},
        "message": {"id": "1", "channel_id": channel},
    })
}
