//! The Slack client against a fake Slack on 127.0.0.1 (tests/fake_slack):
//! Web API calls, 429 handling, typed errors, the three-step file upload,
//! and Socket Mode's acknowledge-after-store ordering and reconnects.

mod fake_slack;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fake_slack::{FakeSlack, APP_TOKEN, BOT_TOKEN, BOT_USER};
use futures_util::{SinkExt, StreamExt};
use moat_chat::slack::{self, socket, ApiConfig, Callback, Inbound, WebApi, WebApiError};
use moat_creds::Secret;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// A config for the fake whose 429 waits are recorded instead of slept.
fn config(fake: &FakeSlack, slept: &Arc<Mutex<Vec<Duration>>>) -> ApiConfig {
    let slept = slept.clone();
    ApiConfig::new(&fake.api_url(), true)
        .unwrap()
        .with_max_attempts(3)
        .with_max_retry_after(Duration::from_secs(30))
        .with_sleep(Arc::new(move |d| {
            slept.lock().unwrap().push(d);
            Box::pin(async {})
        }))
}

async fn setup() -> (FakeSlack, WebApi, Arc<Mutex<Vec<Duration>>>) {
    let fake = FakeSlack::start().await;
    let slept = Arc::new(Mutex::new(Vec::new()));
    let api = WebApi::new(config(&fake, &slept), Secret::new(BOT_TOKEN));
    (fake, api, slept)
}

#[tokio::test]
async fn auth_test_names_the_bot_and_sends_the_token_as_bearer() {
    let (fake, api, _) = setup().await;
    let me = api.auth_test().await.unwrap();
    assert_eq!(me.user_id, BOT_USER);
    assert_eq!(me.bot_id.as_deref(), Some("B0MOAT01"));
    assert_eq!(me.team_id.as_deref(), Some("T0TEAM01"));
    let call = &fake.calls_to("auth.test")[0];
    assert_eq!(
        call.authorization.as_deref(),
        Some(format!("Bearer {BOT_TOKEN}").as_str())
    );

    // A wrong token: Slack's code, a hint naming the variable, no token.
    let bad = WebApi::new(api.config().clone(), Secret::new("xoxb-wrong-token-value"));
    let e = bad.auth_test().await.unwrap_err();
    assert_eq!(e.code(), Some("invalid_auth"));
    let shown = format!("{e} {e:?}");
    assert!(shown.contains("SLACK_BOT_TOKEN"), "{shown}");
    assert!(
        !shown.contains("wrong-token-value") && !shown.contains(BOT_TOKEN),
        "{shown}"
    );
}

#[tokio::test]
async fn post_update_and_reactions() {
    let (fake, api, _) = setup().await;
    let text = "héllo *world* — <https://e.com|link> & 🦀";
    let ts = api
        .post_message("C0GENERAL", Some("1700000100.000200"), text)
        .await
        .unwrap();
    assert!(ts.starts_with("1700000500."), "{ts}");
    let call = &fake.calls_to("chat.postMessage")[0];
    assert_eq!(
        call.content_type.as_deref(),
        Some("application/json; charset=utf-8")
    );
    let body = call.json();
    assert_eq!(body["channel"], "C0GENERAL");
    assert_eq!(body["thread_ts"], "1700000100.000200");
    assert_eq!(body["text"], text);

    // Top level: no thread_ts at all.
    api.post_message("C0GENERAL", None, "top").await.unwrap();
    assert!(fake.calls_to("chat.postMessage")[1]
        .json()
        .get("thread_ts")
        .is_none());

    api.update_message("C0GENERAL", &ts, "done").await.unwrap();
    let up = fake.calls_to("chat.update")[0].json();
    assert_eq!(
        (
            up["channel"].as_str(),
            up["ts"].as_str(),
            up["text"].as_str()
        ),
        (Some("C0GENERAL"), Some(ts.as_str()), Some("done"))
    );

    // 👀 on, twice (the second is Slack's already_reacted: fine), then off,
    // twice (no_reaction: fine), then ✅.
    api.add_reaction("C0GENERAL", "1700000100.000200", "eyes")
        .await
        .unwrap();
    api.add_reaction("C0GENERAL", "1700000100.000200", ":eyes:")
        .await
        .unwrap();
    assert_eq!(fake.calls_to("reactions.add").len(), 2);
    api.remove_reaction("C0GENERAL", "1700000100.000200", "eyes")
        .await
        .unwrap();
    api.remove_reaction("C0GENERAL", "1700000100.000200", "eyes")
        .await
        .unwrap();
    api.add_reaction("C0GENERAL", "1700000100.000200", "white_check_mark")
        .await
        .unwrap();
    let r: Vec<String> = fake
        .state
        .lock()
        .unwrap()
        .reactions
        .iter()
        .map(|(_, _, n)| n.clone())
        .collect();
    assert_eq!(r, vec!["white_check_mark"]);
    let add = fake.calls_to("reactions.add")[0].json();
    assert_eq!(
        add,
        json!({"channel": "C0GENERAL", "timestamp": "1700000100.000200", "name": "eyes"})
    );
}

#[tokio::test]
async fn slack_errors_are_typed() {
    let (_fake, api, _) = setup().await;
    let e = api.post_message("C0MISSING", None, "x").await.unwrap_err();
    match &e {
        WebApiError::Api { method, code, .. } => {
            assert_eq!(
                (*method, code.as_str()),
                ("chat.postMessage", "channel_not_found")
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(e.to_string().contains("invite the bot"), "{e}");
}

#[tokio::test]
async fn rate_limits_wait_retry_after_then_succeed_or_give_up() {
    let (fake, api, slept) = setup().await;
    fake.rate_limit("chat.postMessage", 1, 7);
    api.post_message("C0GENERAL", None, "once limited")
        .await
        .unwrap();
    assert_eq!(fake.calls_to("chat.postMessage").len(), 2);
    assert_eq!(*slept.lock().unwrap(), vec![Duration::from_secs(7)]);

    // Always limited: 3 attempts, then a typed error. A Retry-After above
    // the cap (30 s here) is waited only the cap.
    slept.lock().unwrap().clear();
    fake.rate_limit("chat.update", 10, 120);
    let e = api
        .update_message("C0GENERAL", "1.2", "x")
        .await
        .unwrap_err();
    assert_eq!(
        e,
        WebApiError::RateLimited {
            method: "chat.update",
            attempts: 3,
            retry_after_secs: 120
        }
    );
    assert_eq!(fake.calls_to("chat.update").len(), 3);
    assert_eq!(*slept.lock().unwrap(), vec![Duration::from_secs(30); 2]);
}

#[tokio::test]
async fn real_sleep_honours_retry_after() {
    // Without an injected sleep: tokio's clock, really waiting 1 s.
    let fake = FakeSlack::start().await;
    let api = WebApi::new(
        ApiConfig::new(&fake.api_url(), true).unwrap(),
        Secret::new(BOT_TOKEN),
    );
    fake.rate_limit("auth.test", 1, 1);
    let t = std::time::Instant::now();
    api.auth_test().await.unwrap();
    assert!(t.elapsed() >= Duration::from_secs(1), "{:?}", t.elapsed());
}

#[tokio::test]
async fn replies_follow_cursors_and_oldest() {
    let (fake, api, _) = setup().await;
    let msgs: Vec<_> = (1..=5)
        .map(|i| {
            json!({"type": "message", "user": "U0ALICE1", "text": format!("m{i} &lt;x&gt;"),
                "ts": format!("1700000100.00000{i}"), "thread_ts": "1700000100.000001"})
        })
        .collect();
    fake.add_thread("1700000100.000001", msgs);
    let all = api
        .conversations_replies("C0GENERAL", "1700000100.000001", None)
        .await
        .unwrap();
    let texts: Vec<_> = all.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(
        texts,
        [
            "m1 &lt;x&gt;",
            "m2 &lt;x&gt;",
            "m3 &lt;x&gt;",
            "m4 &lt;x&gt;",
            "m5 &lt;x&gt;"
        ]
    );
    assert_eq!(all[0].user.as_deref(), Some("U0ALICE1"));
    let calls = fake.calls_to("conversations.replies");
    assert_eq!(calls.len(), 3, "three pages of two");
    assert_eq!(
        calls[0].content_type.as_deref(),
        Some("application/x-www-form-urlencoded")
    );
    assert_eq!(
        calls[1].form().get("cursor").map(String::as_str),
        Some("next:2")
    );

    let since = api
        .conversations_replies("C0GENERAL", "1700000100.000001", Some("1700000100.000003"))
        .await
        .unwrap();
    let ts: Vec<_> = since.iter().map(|m| m.ts.as_str()).collect();
    assert_eq!(ts, ["1700000100.000004", "1700000100.000005"]);
    let last = fake.calls_to("conversations.replies").pop().unwrap().form();
    assert_eq!(
        last.get("oldest").map(String::as_str),
        Some("1700000100.000003")
    );
}

#[tokio::test]
async fn upload_in_three_steps_without_the_token_at_the_upload_url() {
    let (fake, api, _) = setup().await;
    let data = Bytes::from((0..5000u32).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let id = api
        .upload_file(
            "C0GENERAL",
            Some("1700000100.000200"),
            "report.bin",
            data.clone(),
            Some("Build report"),
        )
        .await
        .unwrap();
    let paths: Vec<String> = fake.calls().into_iter().map(|c| c.path).collect();
    assert_eq!(
        paths,
        [
            "/api/files.getUploadURLExternal".to_string(),
            format!("/upload/v1/{id}"),
            "/api/files.completeUploadExternal".to_string()
        ]
    );
    let calls = fake.calls();
    let get = calls[0].form();
    assert_eq!(get["filename"], "report.bin");
    assert_eq!(get["length"], "5000");
    assert_eq!(
        calls[1].authorization, None,
        "the token never goes to the upload URL"
    );
    assert_eq!(calls[1].body, data);
    let done = calls[2].form();
    assert_eq!(done["channel_id"], "C0GENERAL");
    assert_eq!(done["thread_ts"], "1700000100.000200");
    let files: serde_json::Value = serde_json::from_str(&done["files"]).unwrap();
    assert_eq!(files, json!([{"id": id, "title": "Build report"}]));
    assert_eq!(
        fake.state.lock().unwrap().files[&id].1.as_ref(),
        Some(&data)
    );
}

#[tokio::test]
async fn connections_are_reused() {
    let (fake, api, _) = setup().await;
    for i in 0..10 {
        api.post_message("C0GENERAL", None, &format!("n{i}"))
            .await
            .unwrap();
    }
    assert_eq!(fake.calls_to("chat.postMessage").len(), 10);
    assert_eq!(
        fake.connections.load(std::sync::atomic::Ordering::SeqCst),
        1
    );
}

#[tokio::test]
async fn plain_http_needs_explicit_permission() {
    let fake = FakeSlack::start().await;
    let e = ApiConfig::new(&fake.api_url(), false).unwrap_err();
    assert!(matches!(e, WebApiError::BadUrl { .. }), "{e:?}");
    assert!(fake.calls().is_empty());
}

// ---------------------------------------------------------------- Socket Mode

fn mention_payload(event_id: &str, text: &str) -> serde_json::Value {
    json!({
        "token": "legacy", "team_id": "T0TEAM01", "api_app_id": "A0APP001",
        "event": {"type": "app_mention", "user": "U0ALICE1", "text": format!("<@{BOT_USER}> {text}"),
            "ts": "1700000100.000200", "channel": "C0GENERAL", "event_ts": "1700000100.000200"},
        "type": "event_callback", "event_id": event_id, "event_time": 1_700_000_100
    })
}

async fn send(ws: &mut fake_slack::Ws, v: serde_json::Value) {
    ws.send(WsMessage::text(v.to_string())).await.unwrap();
}

async fn send_event(ws: &mut fake_slack::Ws, envelope_id: &str, event_id: &str, retry: u32) {
    send(
        ws,
        json!({"envelope_id": envelope_id, "payload": mention_payload(event_id, event_id),
            "type": "events_api", "accepts_response_payload": false,
            "retry_attempt": retry, "retry_reason": if retry > 0 { "timeout" } else { "" }}),
    )
    .await;
}

/// The next acknowledgement's envelope id (pings and pongs skipped).
async fn next_ack(ws: &mut fake_slack::Ws) -> Option<String> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .ok()??
        {
            Ok(WsMessage::Text(t)) => {
                let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
                assert_eq!(
                    v.as_object().unwrap().len(),
                    1,
                    "an ack is only the envelope id: {v}"
                );
                return Some(v["envelope_id"].as_str().unwrap().to_string());
            }
            Ok(WsMessage::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}

fn hello() -> serde_json::Value {
    json!({"type": "hello", "num_connections": 1,
        "debug_info": {"host": "fake-1", "approximate_connection_time": 18060},
        "connection_info": {"app_id": "A0APP001"}})
}

#[tokio::test]
async fn socket_mode_acks_only_after_store_and_reconnects() {
    let fake = FakeSlack::start().await;
    let sock = fake.socket().await;
    let api = ApiConfig::new(&fake.api_url(), true).unwrap();

    // The gateway's store: the handler takes a while, then records the
    // event; "Ev-FAIL" fails the first time (its store failed).
    let store: Arc<Mutex<Vec<String>>> = Arc::default();
    let failed_once = Arc::new(Mutex::new(false));
    let handler = {
        let (store, failed_once) = (store.clone(), failed_once.clone());
        move |ev: socket::SocketEvent| {
            let (store, failed_once) = (store.clone(), failed_once.clone());
            async move {
                let cb = slack::parse_callback(&ev.payload, Some(BOT_USER))
                    .map_err(|e| e.to_string())?;
                let Callback::Event(e) = cb else {
                    return Err("not an event".to_string());
                };
                let Inbound::Mention(m) = &e.inbound else {
                    return Err("not a mention".into());
                };
                assert_eq!(m.text, e.event_id, "mention stripped, payload intact");
                tokio::time::sleep(Duration::from_millis(150)).await;
                if e.event_id == "Ev-FAIL"
                    && !std::mem::replace(&mut *failed_once.lock().unwrap(), true)
                {
                    assert_eq!(ev.retry_attempt, 0);
                    return Err("disk full".to_string());
                }
                if e.event_id == "Ev-FAIL" {
                    assert_eq!(
                        (ev.retry_attempt, ev.retry_reason.as_deref()),
                        (1, Some("timeout"))
                    );
                }
                store
                    .lock()
                    .unwrap()
                    .push(format!("{}:{}", ev.envelope_id, e.event_id));
                Ok::<(), String>(())
            }
        }
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let opts = socket::SocketOptions {
        min_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(200),
        idle_timeout: Duration::from_secs(30),
    };
    let client = tokio::spawn(async move {
        let stop = async {
            let _ = stop_rx.await;
        };
        socket::run_with(Secret::new(APP_TOKEN), &api, opts, handler, stop).await
    });

    let stored = |s: &Arc<Mutex<Vec<String>>>| s.lock().unwrap().clone();

    // Connection 1: an event is acknowledged only once it is in the store.
    let (mut ws, t1) = sock.accept().await;
    send(&mut ws, hello()).await;
    send_event(&mut ws, "env-1", "Ev-ONE", 0).await;
    assert_eq!(next_ack(&mut ws).await.as_deref(), Some("env-1"));
    assert_eq!(
        stored(&store),
        ["env-1:Ev-ONE"],
        "ack came before the store"
    );
    // A failed store is not acknowledged; the next event is.
    send_event(&mut ws, "env-2", "Ev-FAIL", 0).await;
    send_event(&mut ws, "env-3", "Ev-THREE", 0).await;
    assert_eq!(next_ack(&mut ws).await.as_deref(), Some("env-3"));
    assert_eq!(stored(&store), ["env-1:Ev-ONE", "env-3:Ev-THREE"]);
    // Slack asks for a new connection.
    send(
        &mut ws,
        json!({"type": "disconnect", "reason": "refresh_requested",
        "debug_info": {"host": "fake-1"}}),
    )
    .await;

    // Connection 2 (a new ticket): the failed event comes back and is stored
    // this time; then the socket just dies.
    let (mut ws2, t2) = sock.accept().await;
    assert_ne!(t1, t2);
    send(&mut ws2, hello()).await;
    send_event(&mut ws2, "env-2b", "Ev-FAIL", 1).await;
    assert_eq!(next_ack(&mut ws2).await.as_deref(), Some("env-2b"));
    assert_eq!(
        stored(&store).last().map(String::as_str),
        Some("env-2b:Ev-FAIL")
    );
    drop(ws2);
    drop(ws);

    // Connection 3 after the backoff: still working; then shut down.
    let (mut ws3, _) = sock.accept().await;
    send(&mut ws3, hello()).await;
    send_event(&mut ws3, "env-4", "Ev-FOUR", 0).await;
    assert_eq!(next_ack(&mut ws3).await.as_deref(), Some("env-4"));
    stop_tx.send(()).unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), client)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r, Ok(()));
    assert_eq!(
        next_ack(&mut ws3).await,
        None,
        "the client closed the socket"
    );

    assert_eq!(
        stored(&store),
        [
            "env-1:Ev-ONE",
            "env-3:Ev-THREE",
            "env-2b:Ev-FAIL",
            "env-4:Ev-FOUR"
        ]
    );
    let opens = fake.calls_to("apps.connections.open");
    assert_eq!(opens.len(), 3);
    assert!(opens
        .iter()
        .all(|c| c.authorization.as_deref() == Some(format!("Bearer {APP_TOKEN}").as_str())));
}

#[tokio::test]
async fn socket_mode_acks_unhandled_envelopes_and_survives_garbage() {
    let fake = FakeSlack::start().await;
    let sock = fake.socket().await;
    let api = ApiConfig::new(&fake.api_url(), true).unwrap();
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let s2 = seen.clone();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let handler = move |ev: socket::SocketEvent| {
        let s2 = s2.clone();
        async move {
            s2.lock().unwrap().push(ev.envelope_id);
            Ok::<(), String>(())
        }
    };
    let client = tokio::spawn(async move {
        let stop = async {
            let _ = stop_rx.await;
        };
        socket::run(Secret::new(APP_TOKEN), &api, handler, stop).await
    });
    let (mut ws, _) = sock.accept().await;
    send(&mut ws, hello()).await;
    ws.send(WsMessage::text("not json")).await.unwrap();
    send(
        &mut ws,
        json!({"type": "slash_commands", "envelope_id": "env-cmd", "payload": {"command": "/x"}}),
    )
    .await;
    assert_eq!(next_ack(&mut ws).await.as_deref(), Some("env-cmd"));
    send_event(&mut ws, "env-5", "Ev-FIVE", 0).await;
    assert_eq!(next_ack(&mut ws).await.as_deref(), Some("env-5"));
    assert_eq!(
        *seen.lock().unwrap(),
        ["env-5"],
        "only events_api reaches the handler"
    );
    stop_tx.send(()).unwrap();
    assert_eq!(client.await.unwrap(), Ok(()));
}

#[tokio::test]
async fn socket_mode_stops_when_slack_refuses_the_token() {
    let fake = FakeSlack::start().await;
    let api = ApiConfig::new(&fake.api_url(), true).unwrap();
    // The bot token is the wrong kind of token for apps.connections.open.
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        socket::run(
            Secret::new(BOT_TOKEN),
            &api,
            |_ev: socket::SocketEvent| async { Ok::<(), String>(()) },
            std::future::pending(),
        ),
    )
    .await
    .unwrap();
    let e = r.unwrap_err();
    let shown = e.to_string();
    assert!(
        shown.contains("not_allowed_token_type") && shown.contains("SLACK_APP_TOKEN"),
        "{shown}"
    );
    assert!(!shown.contains(BOT_TOKEN));
}
