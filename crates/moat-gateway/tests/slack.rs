//! Slack end to end: the gateway (`moat_gateway::server::serve`, in this
//! process, with real bwrap sandboxes and the shell agent) against a fake
//! Slack on 127.0.0.1 (tests/slack_kit): signed Events API callbacks in,
//! Web API calls out, Socket Mode over a WebSocket.
//!
//! Each test starts its own fake and gateway with made-up secrets, and checks
//! what Slack would see (the calls, their order and arguments), what the
//! gateway stored, its audit log and its metrics. Run as root:
//! `cargo test -p moat-gateway --test slack -- --test-threads=2`.

mod slack_kit;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use slack_kit::*;
use tokio_tungstenite::tungstenite::Message as WsMessage;

const ALICE: &str = "U0ALICE1";
const BOB: &str = "U0BOB002";
const MALLORY: &str = "U0MALLORY";
const GENERAL: &str = "C0GENERAL";

/// A fake Slack and a gateway with `rest` as the pool/defaults/channels.
async fn start(name: &str, mode: Mode, rest: &str) -> (FakeSlack, Running) {
    let fake = FakeSlack::start().await;
    let data = data_dir(name);
    let gw = Running::start(&config(&fake, &data, mode, rest), &data).await;
    (fake, gw)
}

/// One channel entry for everything, Alice and Bob allowed.
const OPEN: &str = r#"
[pool]
size = 1

[defaults]
debounce = "100ms"

[[channel]]
platform = "slack"
id = "*"
users = ["U0ALICE1", "U0BOB002"]
"#;

fn reaction_calls<'a>(calls: &'a [Call], method: &str, ts: &str, name: &str) -> Vec<&'a Call> {
    calls
        .iter()
        .filter(|c| {
            c.method == method
                && c.ok()
                && c.arg("timestamp") == Some(ts)
                && c.arg("name") == Some(name)
        })
        .collect()
}

fn index_of(calls: &[Call], what: &str, f: impl Fn(&Call) -> bool) -> usize {
    calls
        .iter()
        .position(f)
        .unwrap_or_else(|| panic!("no {what} among the calls:\n{}", summary(calls)))
}

/// Waits for a top-level (not threaded) post in `channel` containing `needle`.
async fn wait_top_post(fake: &FakeSlack, channel: &str, needle: &str) {
    fake.wait_for(
        &format!("a top-level post with {needle:?} in {channel}"),
        Duration::from_secs(60),
        |calls| {
            calls
                .iter()
                .any(|c| {
                    c.method == "chat.postMessage"
                        && c.ok()
                        && c.arg("channel") == Some(channel)
                        && c.arg("thread_ts").is_none()
                        && c.text().contains(needle)
                })
                .then_some(())
        },
    )
    .await
}

/// Waits until `name` was added to message `ts`.
async fn wait_reaction(fake: &FakeSlack, ts: &str, name: &str) {
    fake.wait_for(
        &format!("reaction {name} on {ts}"),
        Duration::from_secs(60),
        |calls| (!reaction_calls(calls, "reactions.add", ts, name).is_empty()).then_some(()),
    )
    .await
}

// ------------------------------------------------------------------ 1

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mention_is_answered_in_its_thread_with_reactions_and_a_status_message() {
    let (fake, gw) = start("mention", Mode::Events, OPEN).await;

    // The command sleeps 1 s, so an acknowledgement that came after the
    // turn could not be faster than that.
    let ts = new_ts();
    let body = fake.callback(
        &new_event_id(),
        mention(GENERAL, ALICE, &ts, None, "sleep 1; echo hello-$((6*7))"),
    );
    let t0 = Instant::now();
    let r = post_signed(gw.events(), &body).await;
    let acked = t0.elapsed();
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        acked < Duration::from_millis(500),
        "Slack must get its 200 before the turn runs, got it after {acked:?}"
    );
    assert!(
        !fake.calls().iter().any(|c| c.text().contains("hello-42")),
        "the answer was posted before the event was acknowledged"
    );

    let answer = fake.wait_post(GENERAL, &ts, "hello-42").await;
    assert!(
        answer.text().contains("```"),
        "output in a code block: {}",
        answer.text()
    );
    wait_reaction(&fake, &ts, "white_check_mark").await;

    let calls = fake.calls();
    for c in &calls {
        assert_eq!(
            c.authorization.as_deref(),
            Some(format!("Bearer {BOT_TOKEN}").as_str()),
            "{} without the bot token",
            c.method
        );
    }
    assert_eq!(calls[0].method, "auth.test", "auth.test first, at start");
    let eyes = index_of(&calls, "👀 on the mention", |c| {
        c.method == "reactions.add"
            && c.arg("timestamp") == Some(ts.as_str())
            && c.arg("name") == Some("eyes")
    });
    let status = index_of(&calls, "the status message", |c| {
        c.method == "chat.postMessage"
            && c.arg("thread_ts") == Some(ts.as_str())
            && c.text().contains("working")
    });
    let status_ts = calls[status].answer["ts"].as_str().unwrap().to_string();
    let answered = index_of(&calls, "the answer", |c| {
        c.method == "chat.postMessage" && c.text().contains("hello-42")
    });
    assert_eq!(calls[answered].arg("channel"), Some(GENERAL));
    assert_eq!(
        calls[answered].arg("thread_ts"),
        Some(ts.as_str()),
        "answered in the mention's thread"
    );
    let updated = index_of(&calls, "chat.update of the status message", |c| {
        c.method == "chat.update" && c.arg("ts") == Some(status_ts.as_str())
    });
    assert_eq!(calls[updated].text(), "_done_");
    let uneyes = index_of(&calls, "👀 removed", |c| {
        c.method == "reactions.remove"
            && c.arg("timestamp") == Some(ts.as_str())
            && c.arg("name") == Some("eyes")
    });
    let check = index_of(&calls, "✅", |c| {
        c.method == "reactions.add"
            && c.arg("timestamp") == Some(ts.as_str())
            && c.arg("name") == Some("white_check_mark")
    });
    assert!(
        eyes < status && status < answered && answered < updated && answered < uneyes && uneyes < check,
        "order: 👀 {eyes}, status {status}, answer {answered}, update {updated}, 👀 off {uneyes}, ✅ {check}\n{}",
        summary(&calls)
    );
    assert!(reaction_calls(&calls, "reactions.add", &ts, "x").is_empty());

    // A direct message is answered too, at the top level: a direct
    // conversation is one conversation (docs/configuration.md, `conversation`).
    let dm_ts = new_ts();
    let r = post_signed(
        gw.events(),
        &fake.callback(
            &new_event_id(),
            direct("D0DIRECT1", ALICE, &dm_ts, "echo dm-$((6*7))"),
        ),
    )
    .await;
    assert_eq!(r.status, 200);
    wait_top_post(&fake, "D0DIRECT1", "dm-42").await;
    wait_reaction(&fake, &dm_ts, "white_check_mark").await;

    // The bot's own messages, other bots' messages and edits: acknowledged,
    // never stored, never run.
    let orig = new_ts();
    let ignored = [
        direct("D0DIRECT1", BOT_USER, &new_ts(), "echo own-$((6*7))"),
        json!({"type": "message", "subtype": "bot_message", "bot_id": "B0OTHER1", "username": "ci",
               "text": "echo botmsg-$((6*7))", "ts": new_ts(), "channel": "D0DIRECT1", "channel_type": "im"}),
        json!({"type": "message", "bot_id": "B0OTHER1", "user": "U0OTHERBOT",
               "text": "echo botuser-$((6*7))", "ts": new_ts(), "channel": "D0DIRECT1", "channel_type": "im"}),
        {
            let mut m = mention(
                GENERAL,
                "U0OTHERBOT",
                &new_ts(),
                None,
                "echo botmention-$((6*7))",
            );
            m["bot_id"] = json!("B0OTHER1");
            m
        },
        json!({"type": "message", "subtype": "message_changed", "hidden": true, "channel": "D0DIRECT1",
               "channel_type": "im", "ts": new_ts(), "event_ts": new_ts(),
               "message": {"type": "message", "user": ALICE, "text": "echo edited-$((6*7))", "ts": orig,
                           "edited": {"user": ALICE, "ts": new_ts()}},
               "previous_message": {"type": "message", "user": ALICE, "text": "echo x", "ts": orig}}),
    ];
    let mut ids = Vec::new();
    for ev in ignored {
        let id = new_event_id();
        let r = post_signed(gw.events(), &fake.callback(&id, ev)).await;
        assert_eq!(r.status, 200, "ignored events are still acknowledged");
        ids.push(id);
    }
    // A legitimate message after them is answered: the gateway is alive.
    let after = new_ts();
    post_signed(
        gw.events(),
        &fake.callback(
            &new_event_id(),
            direct("D0DIRECT1", ALICE, &after, "echo after-$((6*7))"),
        ),
    )
    .await;
    wait_top_post(&fake, "D0DIRECT1", "after-42").await;
    for id in &ids {
        assert!(gw.stored(id).is_none(), "ignored event {id} was stored");
    }
    for m in [
        "own-42",
        "botmsg-42",
        "botuser-42",
        "botmention-42",
        "edited-42",
    ] {
        assert!(
            !fake.calls().iter().any(|c| c.text().contains(m)),
            "an ignored event ran: {m}"
        );
    }
    assert_eq!(events_total(gw.bound.admin, "accepted").await, 3);
    gw.stop().await;
}

// ------------------------------------------------------------------ 2

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_stale_and_unsigned_events_get_401_and_nothing_runs() {
    let (fake, gw) = start("forged", Mode::Events, OPEN).await;
    let ts = new_ts();
    let body = fake.callback(
        &new_event_id(),
        mention(GENERAL, ALICE, &ts, None, "echo forged-$((6*7))"),
    );
    let now = now_secs();
    let good = signed_headers(&body, now);
    let sig = |b: &str, t: i64| signed_headers(b, t);
    let wrong_secret = vec![
        ("X-Slack-Request-Timestamp".to_string(), now.to_string()),
        (
            "X-Slack-Signature".to_string(),
            moat_chat::slack::sign(
                &moat_creds::Secret::new("not-the-signing-secret"),
                now,
                body.as_bytes(),
            ),
        ),
    ];
    let altered = body.replace("forged-", "altered-");
    type Case<'a> = (&'a str, &'a str, Vec<(String, String)>);
    let cases: Vec<Case> = vec![
        ("signed with another secret", &body, wrong_secret),
        ("body altered after signing", &altered, good.clone()),
        ("stale: 301 s old", &body, sig(&body, now - 301)),
        ("an hour old", &body, sig(&body, now - 3600)),
        ("from the future", &body, sig(&body, now + 400)),
        ("no signature header", &body, vec![good[0].clone()]),
        ("no timestamp header", &body, vec![good[1].clone()]),
        ("no headers", &body, vec![]),
    ];
    let n = cases.len() as u64;
    for (what, b, headers) in cases {
        let r = post_event(gw.events(), b, &headers).await;
        assert_eq!(r.status, 401, "{what}: {r:?}");
        assert!(
            !r.body.contains("forged-"),
            "{what}: the body is not echoed"
        );
    }
    assert_eq!(events_total(gw.bound.admin, "forged").await, n);
    assert_eq!(gw.stored_count(), 0, "a refused request was stored");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let calls = fake.calls();
    assert!(
        calls.iter().all(|c| c.method == "auth.test"),
        "Slack was called for a refused request:\n{}",
        summary(&calls)
    );
    assert!(
        !gw.audit().iter().any(|r| r["kind"] == "message"),
        "a refused request has a message record"
    );
    // The same event, properly signed, runs: the refusals were the signature's.
    let r = post_signed(gw.events(), &body).await;
    assert_eq!(r.status, 200);
    fake.wait_post(GENERAL, &ts, "forged-42").await;
    assert_eq!(events_total(gw.bound.admin, "accepted").await, 1);
    gw.stop().await;
}

/// A signed delivery sent with `host` in its Host header (and `origin`, if
/// any), as raw HTTP/1.1.
async fn post_as(addr: SocketAddr, host: &str, origin: Option<&str>, body: &str) -> Resp {
    let mut h = signed_headers(body, now_secs());
    if let Some(o) = origin {
        h.push(("Origin".into(), o.into()));
    }
    let req = Conn::request_bytes(host, "/slack/events", &h, Some(body));
    Conn::open(addr)
        .await
        .send_raw(&req)
        .await
        .expect("POST /slack/events")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_w1_slack_events_refuse_a_foreign_host_or_origin_and_slack_still_delivers() {
    // On its own listener and beside the web chat: a page whose name was
    // re-pointed at the gateway (DNS rebinding) reaches /slack/events with its
    // own name in Host; a browser page elsewhere sends its Origin. Neither is
    // served, even with a valid signature; Slack's own deliveries (no Origin)
    // still are.
    for mode in [Mode::Events, Mode::EventsBesideWeb] {
        let (fake, gw) = start("w1-events", mode, OPEN).await;
        let at = gw.events();
        let port = at.port();
        let ts = new_ts();
        let body = fake.callback(
            &new_event_id(),
            mention(GENERAL, ALICE, &ts, None, "echo rebound-$((6*7))"),
        );
        for (host, origin, status) in [
            (format!("evil.test:{port}"), None, 421),
            (format!("127.0.0.1.evil.test:{port}"), None, 421),
            (format!("127.0.0.1:{}", port ^ 1), None, 421),
            (format!("[::1]:{port}"), None, 421),
            (
                format!("127.0.0.1:{port}"),
                Some("http://evil.test".to_string()),
                403,
            ),
            (format!("127.0.0.1:{port}"), Some("null".to_string()), 403),
        ] {
            let r = post_as(at, &host, origin.as_deref(), &body).await;
            assert_eq!(r.status, status, "{mode:?} {host} {origin:?}: {r:?}");
            assert!(!r.body.contains("rebound"), "the body is not echoed: {r:?}");
        }
        // /metrics on the admin address answers to its own address only.
        let admin = gw.bound.admin;
        let req = Conn::request_bytes(
            &format!("evil.test:{}", admin.port()),
            "/metrics",
            &[],
            None,
        );
        let m = Conn::open(admin)
            .await
            .send_raw(&req)
            .await
            .expect("GET /metrics");
        assert_eq!(m.status, 421, "{m:?}");
        assert!(!m.body.contains("moat_events_total"), "{m:?}");
        assert_eq!(
            gw.stored_count(),
            0,
            "{mode:?}: a refused delivery was stored"
        );
        assert!(
            fake.calls().iter().all(|c| c.method == "auth.test"),
            "Slack was called for a refused request:\n{}",
            summary(&fake.calls())
        );
        let refused = gw
            .audit()
            .into_iter()
            .filter(|r| r["kind"] == "http_refused")
            .collect::<Vec<_>>();
        assert!(
            refused.iter().any(|r| r["reason"] == "foreign_host")
                && refused.iter().any(|r| r["reason"] == "foreign_origin"),
            "{refused:#?}"
        );
        // Slack's delivery: Host is the address it was sent to, no Origin.
        let r = post_as(at, &at.to_string(), None, &body).await;
        assert_eq!(r.status, 200, "{mode:?}: {r:?}");
        fake.wait_post(GENERAL, &ts, "rebound-42").await;
        assert_eq!(gw.stored_count(), 1);
        gw.stop().await;
    }
}

// ------------------------------------------------------------------ 3

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_verification_and_events_that_cannot_be_stored() {
    // Events API beside the web chat (no slack.listen).
    let (fake, gw) = start("verify", Mode::EventsBesideWeb, OPEN).await;
    assert!(gw.bound.slack.is_none());
    let challenge = "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P";
    let body = json!({"token": "Jhj5dZrVaK7ZwHHjRyZWjbDl", "challenge": challenge,
                      "type": "url_verification"})
    .to_string();
    let r = post_signed(gw.events(), &body).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, challenge);
    assert!(
        r.header("content-type")
            .unwrap_or("")
            .starts_with("text/plain"),
        "{r:?}"
    );
    // Unsigned, the challenge is not answered.
    let r = post_event(gw.events(), &body, &[]).await;
    assert_eq!(r.status, 401);
    assert!(!r.body.contains(challenge));
    // The web chat is still on the same listener.
    assert_eq!(get(gw.events(), "/").await.status, 200);

    // An event the store refuses (empty event_id) is not acknowledged, so
    // Slack would deliver it again; a body that is not JSON is a 400.
    let ts = new_ts();
    let r = post_signed(
        gw.events(),
        &fake.callback(
            "",
            mention(GENERAL, ALICE, &ts, None, "echo nostore-$((6*7))"),
        ),
    )
    .await;
    assert_eq!(r.status, 503, "{r:?}");
    let r = post_signed(gw.events(), "{\"type\": \"event_callback\", not json").await;
    assert_eq!(r.status, 400, "{r:?}");
    assert!(
        !r.body.contains("not json"),
        "the body is not quoted: {}",
        r.body
    );
    assert_eq!(events_total(gw.bound.admin, "invalid").await, 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(fake.calls().iter().all(|c| c.method == "auth.test"));
    assert_eq!(gw.stored_count(), 0);
    gw.stop().await;
}

// ------------------------------------------------------------------ 4

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthorised_user_gets_nothing_and_an_audit_record() {
    let rest = r#"
[pool]
size = 1

[defaults]
debounce = "100ms"

[[channel]]
platform = "slack"
id = "C0ALICE"
users = ["U0ALICE1"]
"#;
    let (fake, gw) = start("unauth", Mode::Events, rest).await;
    let secret_words = "zebra-canary-private-words";
    let m_ts = new_ts();
    let m_id = new_event_id();
    let r = post_signed(
        gw.events(),
        &fake.callback(
            &m_id,
            mention(
                "C0ALICE",
                MALLORY,
                &m_ts,
                None,
                &format!("echo mallory-$((6*7)) {secret_words}"),
            ),
        ),
    )
    .await;
    assert_eq!(
        r.status, 200,
        "Slack gets its 200 (nothing tells the sender)"
    );
    // A channel with no entry at all.
    let o_ts = new_ts();
    let o_id = new_event_id();
    let r = post_signed(
        gw.events(),
        &fake.callback(
            &o_id,
            mention(
                "C0OTHER",
                ALICE,
                &o_ts,
                None,
                &format!("echo other-$((6*7)) {secret_words}"),
            ),
        ),
    )
    .await;
    assert_eq!(r.status, 200);
    // Alice, after them, is answered.
    let a_ts = new_ts();
    post_signed(
        gw.events(),
        &fake.callback(
            &new_event_id(),
            mention("C0ALICE", ALICE, &a_ts, None, "echo alice-$((6*7))"),
        ),
    )
    .await;
    fake.wait_post("C0ALICE", &a_ts, "alice-42").await;
    wait_reaction(&fake, &a_ts, "white_check_mark").await;

    let calls = fake.calls();
    for ts in [&m_ts, &o_ts] {
        assert!(
            !calls
                .iter()
                .any(|c| c.arg("thread_ts") == Some(ts) || c.arg("timestamp") == Some(ts)),
            "something was posted or reacted for a refused message:\n{}",
            summary(&calls)
        );
    }
    assert!(!calls
        .iter()
        .any(|c| c.text().contains("mallory-42") || c.text().contains("other-42")));

    let records = gw.audit_messages("unauthorized");
    assert_eq!(records.len(), 2, "{records:?}");
    let rec = |id: &str| {
        records
            .iter()
            .find(|r| r["event_id"] == id)
            .unwrap()
            .clone()
    };
    let m = rec(&m_id);
    assert_eq!(
        (m["user"].as_str(), m["channel"].as_str()),
        (Some(MALLORY), Some("C0ALICE"))
    );
    let reason = m["reason"].as_str().unwrap();
    assert!(
        reason.contains(MALLORY) && reason.contains("C0ALICE"),
        "{reason}"
    );
    let reason = rec(&o_id)["reason"].as_str().unwrap().to_string();
    assert!(
        reason.contains("no [[channel]] entry") && reason.contains("C0OTHER"),
        "{reason}"
    );
    let log = std::fs::read_to_string(gw.audit_path()).unwrap();
    assert!(!log.contains(secret_words), "message text in the audit log");
    assert_eq!(
        gw.stored(&m_id).unwrap().state,
        moat_store::MessageState::Dropped
    );
    assert_eq!(events_total(gw.bound.admin, "unauthorized").await, 2);
    gw.stop().await;
}

// ------------------------------------------------------------------ 5

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_event_is_answered_once() {
    let (fake, gw) = start("retry", Mode::Events, OPEN).await;
    let ts = new_ts();
    let id = new_event_id();
    let body = fake.callback(
        &id,
        mention(GENERAL, ALICE, &ts, None, "sleep 0.5; echo retry-$((6*7))"),
    );
    assert_eq!(post_signed(gw.events(), &body).await.status, 200);
    // Slack's retry: the same event (same event_id), signed anew, with the
    // retry headers; while the first delivery's turn runs, and after it.
    let retry = |n: u32| {
        let mut h = signed_headers(&body, now_secs());
        h.push(("X-Slack-Retry-Num".into(), n.to_string()));
        h.push(("X-Slack-Retry-Reason".into(), "http_timeout".into()));
        h
    };
    assert_eq!(post_event(gw.events(), &body, &retry(1)).await.status, 200);
    fake.wait_post(GENERAL, &ts, "retry-42").await;
    assert_eq!(post_event(gw.events(), &body, &retry(2)).await.status, 200);
    // A later message in the same thread: everything before it is done.
    post_signed(
        gw.events(),
        &fake.callback(
            &new_event_id(),
            mention(GENERAL, ALICE, &new_ts(), Some(&ts), "echo later-$((6*7))"),
        ),
    )
    .await;
    fake.wait_post(GENERAL, &ts, "later-42").await;
    let answers = fake.posts_in(GENERAL, &ts);
    assert_eq!(
        answers.iter().filter(|t| t.contains("retry-42")).count(),
        1,
        "answered once: {answers:#?}"
    );
    assert_eq!(
        reaction_calls(&fake.calls(), "reactions.add", &ts, "eyes").len(),
        1
    );
    assert_eq!(gw.audit_messages("duplicate").len(), 2);
    assert_eq!(gw.audit_messages("accepted").len(), 2);
    assert_eq!(events_total(gw.bound.admin, "duplicate").await, 2);
    gw.stop().await;
}

/// A Slack message a crash left unanswered (stored, never run) is answered
/// after the restart and still gets its final reaction: the platform's id
/// of the message is stored with it (the soak run found recovered messages
/// left with only 👀).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_recovered_after_a_crash_still_gets_its_final_reaction() {
    let fake = FakeSlack::start().await;
    let data = data_dir("recover-reaction");
    let ts = new_ts();
    // What a gateway killed right after storing the message leaves.
    {
        let store = moat_store::Store::open(data.join("moat.db")).unwrap();
        let ins = store
            .insert_message(&moat_store::IncomingMessage {
                platform: "slack".into(),
                event_id: new_event_id(),
                channel: GENERAL.into(),
                thread: ts.clone(),
                user: BOB.into(),
                text: "echo recovered-$((6*7))".into(),
                ts_ms: 1,
                message_ref: Some(ts.clone()),
            })
            .unwrap();
        assert!(matches!(ins, moat_store::Inserted::New { .. }), "{ins:?}");
    }
    let gw = Running::start(&config(&fake, &data, Mode::Events, OPEN), &data).await;
    fake.wait_post(GENERAL, &ts, "recovered-42").await;
    wait_reaction(&fake, &ts, "white_check_mark").await;
    assert_eq!(gw.audit_messages("recovered").len(), 1);
    gw.stop().await;
}

/// The outbox (docs/store.md): a gateway killed after a turn ended, while
/// its answer was being posted, finds the kept answer at its restart and
/// posts only the part the thread does not already hold (found by its
/// message metadata), adds the final reaction, and does not run the
/// message again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_answer_is_delivered_after_a_crash_not_run_again() {
    let fake = FakeSlack::start().await;
    let data = data_dir("outbox");
    let ts = new_ts();
    // Two Slack messages' worth of answer: part 0 reached the thread
    // before the kill, the rest did not.
    let answer = format!("first-half {}second-half-77", "lorem ".repeat(900));
    let turn = {
        let store = moat_store::Store::open(data.join("moat.db")).unwrap();
        let (message_id, conversation_id) = match store
            .insert_message(&moat_store::IncomingMessage {
                platform: "slack".into(),
                event_id: new_event_id(),
                channel: GENERAL.into(),
                thread: ts.clone(),
                user: BOB.into(),
                text: "echo never-run-$((6*7))".into(),
                ts_ms: 1,
                message_ref: Some(ts.clone()),
            })
            .unwrap()
        {
            moat_store::Inserted::New {
                message_id,
                conversation_id,
            } => (message_id, conversation_id),
            other => panic!("{other:?}"),
        };
        let t = store.start_turn(conversation_id, &[message_id], 2).unwrap();
        store
            .finish_turn_keeping(t, moat_store::TurnState::Done, &answer, false, None, 3)
            .unwrap();
        t
    };
    fake.bot_said(
        &ts,
        "1700000000.000001",
        "first-half xxxx",
        json!({"event_type": "moat_answer", "event_payload": {"turn": turn, "part": 0, "parts": 2}}),
    );
    let gw = Running::start(&config(&fake, &data, Mode::Events, OPEN), &data).await;
    fake.wait_post(GENERAL, &ts, "second-half-77").await;
    wait_reaction(&fake, &ts, "white_check_mark").await;
    let posts = fake.posts_in(GENERAL, &ts);
    assert_eq!(posts.len(), 1, "only the missing part: {posts:#?}");
    assert!(!posts[0].contains("first-half"), "{posts:#?}");
    // The post carries the turn's mark, for the next restart.
    let call = fake.wait_post(GENERAL, &ts, "second-half-77").await;
    assert_eq!(call.args["metadata"]["event_type"], json!("moat_answer"));
    assert_eq!(call.args["metadata"]["event_payload"]["turn"], json!(turn));
    assert_eq!(call.args["metadata"]["event_payload"]["part"], json!(1));
    assert_eq!(call.args["metadata"]["event_payload"]["parts"], json!(2));
    // Not run again: no recovered message, no new turn, nothing echoed.
    assert!(gw.audit_messages("recovered").is_empty());
    assert!(fake
        .calls()
        .iter()
        .all(|c| !c.text().contains("never-run-42")));
    let delivered: Vec<_> = gw
        .audit()
        .into_iter()
        .filter(|r| r["kind"] == "answer")
        .collect();
    assert_eq!(delivered.len(), 1, "{delivered:#?}");
    assert_eq!(delivered[0]["turn_id"], json!(turn));
    let store = gw.gw.inner.store.clone();
    assert!(store.undelivered_answers().unwrap().is_empty());
    assert!(store.turn(turn + 1).unwrap().is_none(), "no second turn");
    gw.stop().await;
}

// ------------------------------------------------------------------ 6

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_over_the_user_rate_is_limited_with_one_notice() {
    let rest = r#"
[pool]
size = 1

[defaults]
debounce = "300ms"
rate = { user = "3/min" }

[[channel]]
platform = "slack"
id = "*"
users = ["U0ALICE1", "U0BOB002"]
"#;
    let (fake, gw) = start("burst", Mode::Events, rest).await;
    let thread = new_ts();
    for i in 0..7 {
        let ts = if i == 0 { thread.clone() } else { new_ts() };
        let parent = (i > 0).then_some(thread.as_str());
        let r = post_signed(
            gw.events(),
            &fake.callback(
                &new_event_id(),
                mention(
                    GENERAL,
                    ALICE,
                    &ts,
                    parent,
                    &format!("echo burst{i}-$((6*7))"),
                ),
            ),
        )
        .await;
        assert_eq!(r.status, 200, "limited events are still acknowledged");
    }
    // Another user in the same channel has their own bucket.
    let bob_ts = new_ts();
    post_signed(
        gw.events(),
        &fake.callback(
            &new_event_id(),
            mention(GENERAL, BOB, &bob_ts, None, "echo bob-$((6*7))"),
        ),
    )
    .await;
    for i in 0..3 {
        fake.wait_post(GENERAL, &thread, &format!("burst{i}-42"))
            .await;
    }
    fake.wait_post(GENERAL, &bob_ts, "bob-42").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let posts = fake.posts_in(GENERAL, &thread);
    let notices: Vec<_> = posts
        .iter()
        .filter(|t| t.contains("faster than this channel allows"))
        .collect();
    assert_eq!(notices.len(), 1, "told once, then quiet: {posts:#?}");
    for i in 3..7 {
        assert!(
            !posts.iter().any(|t| t.contains(&format!("burst{i}-42"))),
            "burst{i} ran: {posts:#?}"
        );
    }
    let limited = gw.audit_messages("rate_limited");
    assert_eq!(limited.len(), 4, "{limited:?}");
    assert!(limited
        .iter()
        .all(|r| r["user"] == ALICE && r["reason"].as_str().unwrap().contains("user rate 3/min")));
    assert_eq!(events_total(gw.bound.admin, "rate_limited").await, 4);
    gw.stop().await;
}

/// The "over the limit" notice goes to Slack; Slack's acknowledgement of the
/// event must not wait for it (Slack retries after 3 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_notice_does_not_hold_up_the_acknowledgement() {
    let rest = r#"
[pool]
size = 1

[defaults]
debounce = "100ms"
rate = { user = "1/min" }

[[channel]]
platform = "slack"
id = "*"
users = ["U0ALICE1"]
"#;
    let (fake, gw) = start("slow-notice", Mode::Events, rest).await;
    fake.rule(
        "chat.postMessage",
        Some("faster than this channel allows"),
        1,
        Action::Delay(Duration::from_secs(4)),
    );
    let thread = new_ts();
    let first = fake.callback(
        &new_event_id(),
        mention(GENERAL, ALICE, &thread, None, "echo one-$((6*7))"),
    );
    assert_eq!(post_signed(gw.events(), &first).await.status, 200);
    let second = fake.callback(
        &new_event_id(),
        mention(
            GENERAL,
            ALICE,
            &new_ts(),
            Some(&thread),
            "echo two-$((6*7))",
        ),
    );
    let t0 = Instant::now();
    let r = post_signed(gw.events(), &second).await;
    let took = t0.elapsed();
    assert_eq!(r.status, 200);
    fake.wait_post(GENERAL, &thread, "faster than").await;
    assert!(
        took < Duration::from_millis(2500),
        "a rate-limited event was acknowledged only after {took:?}: the notice to Slack held it up past Slack's 3 s"
    );
    gw.stop().await;
}

// ------------------------------------------------------------------ 7

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_threads_get_two_isolated_sandboxes() {
    let rest = r#"
[pool]
size = 1

[defaults]
debounce = "100ms"
users = ["U0ALICE1"]

[[channel]]
platform = "slack"
id = "C0THREADS"
sandbox = "per-thread"

[[channel]]
platform = "slack"
id = "C0POOL"
sandbox = "pool"
"#;
    let (fake, gw) = start("isolation", Mode::Events, rest).await;
    let say = |channel: &'static str, ts: String, parent: Option<String>, text: &str| {
        let body = fake.callback(
            &new_event_id(),
            mention(channel, ALICE, &ts, parent.as_deref(), text),
        );
        let addr = gw.events();
        async move { assert_eq!(post_signed(addr, &body).await.status, 200) }
    };

    // Per-thread: thread A keeps its file across turns; thread B never sees it.
    let a = new_ts();
    say(
        "C0THREADS",
        a.clone(),
        None,
        "echo secret-$((3*3))A > /workspace/a.txt; echo wroteA-$((6*7))",
    )
    .await;
    fake.wait_post("C0THREADS", &a, "wroteA-42").await;
    let b = new_ts();
    say(
        "C0THREADS",
        b.clone(),
        None,
        "cat /workspace/a.txt 2>&1; ls -A /workspace; echo readB-$((6*7))",
    )
    .await;
    let rb = fake.wait_post("C0THREADS", &b, "readB-42").await;
    assert!(
        !rb.text().contains("secret-9A"),
        "thread B saw thread A's file: {}",
        rb.text()
    );
    assert!(rb.text().contains("No such file"), "{}", rb.text());
    say(
        "C0THREADS",
        new_ts(),
        Some(a.clone()),
        "cat /workspace/a.txt; echo readA-$((6*7))",
    )
    .await;
    let ra = fake.wait_post("C0THREADS", &a, "readA-42").await;
    assert!(
        ra.text().contains("secret-9A"),
        "thread A lost its own file: {}",
        ra.text()
    );

    let store = &gw.gw.inner.store;
    let conv_a = store
        .conversation_by_key("slack", "C0THREADS", &a)
        .unwrap()
        .unwrap();
    let conv_b = store
        .conversation_by_key("slack", "C0THREADS", &b)
        .unwrap()
        .unwrap();
    assert_ne!(conv_a.id, conv_b.id, "two threads, two conversations");
    let leases: Vec<(i64, String)> = gw
        .audit()
        .iter()
        .filter(|r| r["kind"] == "lease" && r["event"] == "attached")
        .map(|r| {
            (
                r["conversation_id"].as_i64().unwrap(),
                r["lease"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let lease_of = |id: i64| {
        leases
            .iter()
            .find(|(c, _)| *c == id)
            .map(|(_, l)| l.clone())
            .unwrap_or_else(|| panic!("no lease attached for conversation {id}: {leases:?}"))
    };
    assert_ne!(
        lease_of(conv_a.id),
        lease_of(conv_b.id),
        "two threads, two sandboxes"
    );

    // Pool: one warm runner, reset between the two threads' turns.
    let p1 = new_ts();
    say(
        "C0POOL",
        p1.clone(),
        None,
        "echo secret-$((4*4))P > /workspace/p.txt; echo t-$((4*4))Q > /tmp/q; sleep 600 >/dev/null 2>&1 & echo wroteP-$((6*7))",
    )
    .await;
    fake.wait_post("C0POOL", &p1, "wroteP-42").await;
    let p2 = new_ts();
    say(
        "C0POOL",
        p2.clone(),
        None,
        "cat /workspace/p.txt /tmp/q 2>&1; echo sleepers=$(pgrep -c sleep); echo readP-$((6*7))",
    )
    .await;
    let rp = fake.wait_post("C0POOL", &p2, "readP-42").await;
    assert!(
        !rp.text().contains("secret-16P") && !rp.text().contains("t-16Q"),
        "the pooled sandbox kept another thread's files: {}",
        rp.text()
    );
    assert!(
        rp.text().contains("sleepers=0"),
        "a process survived: {}",
        rp.text()
    );
    gw.stop().await;
}

// ------------------------------------------------------------------ 8

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_command_gets_x_and_a_long_answer_comes_in_ordered_chunks() {
    let (fake, gw) = start("fail-long", Mode::Events, OPEN).await;
    let f = new_ts();
    post_signed(
        gw.events(),
        &fake.callback(
            &new_event_id(),
            mention(GENERAL, ALICE, &f, None, "echo before-$((6*7)); exit 3"),
        ),
    )
    .await;
    let answer = fake.wait_post(GENERAL, &f, "before-42").await;
    assert!(
        answer.text().contains("moat: command exited with status 3"),
        "the exit reason is in the answer: {}",
        answer.text()
    );
    wait_reaction(&fake, &f, "x").await;
    let calls = fake.calls();
    assert!(reaction_calls(&calls, "reactions.add", &f, "white_check_mark").is_empty());
    assert!(calls
        .iter()
        .any(|c| c.method == "chat.update" && c.text() == "_failed_"));

    // About 8,900 characters of output: at least three messages, each
    // within Slack's limit, together the whole output in order.
    let l = new_ts();
    post_signed(
        gw.events(),
        &fake.callback(
            &new_event_id(),
            mention(GENERAL, ALICE, &l, None, "seq 1 2000; echo long-$((6*7))"),
        ),
    )
    .await;
    fake.wait_post(GENERAL, &l, "long-42").await;
    let posts: Vec<Call> = fake
        .calls()
        .into_iter()
        .filter(|c| {
            c.method == "chat.postMessage"
                && c.arg("thread_ts") == Some(l.as_str())
                && !c.text().contains("working")
        })
        .collect();
    assert!(posts.len() >= 3, "{} chunk(s)", posts.len());
    let mut numbers = Vec::new();
    for (i, p) in posts.iter().enumerate() {
        let n = p.text().chars().count();
        assert!(n <= 3_900, "chunk {i} has {n} characters");
        assert!(
            p.text().starts_with("```"),
            "chunk {i} is a code block: {:?}",
            &p.text()[..20]
        );
        if i > 0 {
            assert!(p.at >= posts[i - 1].at, "chunks posted in order");
        }
        numbers.extend(
            p.text()
                .lines()
                .filter_map(|l| l.trim().parse::<u32>().ok()),
        );
    }
    assert_eq!(
        numbers,
        (1..=2000).collect::<Vec<_>>(),
        "the whole output, in order"
    );
    assert!(posts.last().unwrap().text().contains("long-42"));
    wait_reaction(&fake, &l, "white_check_mark").await;
    gw.stop().await;
}

// ------------------------------------------------------------------ 9

/// Reads frames until an acknowledgement (`{"envelope_id": …}`); `None` if
/// the socket closed or nothing came within `wait`.
async fn next_ack(ws: &mut Ws, wait: Duration) -> Option<String> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let m = tokio::time::timeout_at(deadline, ws.next())
            .await
            .ok()??
            .ok()?;
        match m {
            WsMessage::Text(t) => {
                let v: Value = serde_json::from_str(t.as_str()).expect("acks are JSON");
                return Some(
                    v["envelope_id"]
                        .as_str()
                        .expect("an envelope_id")
                        .to_string(),
                );
            }
            WsMessage::Close(_) => return None,
            _ => continue,
        }
    }
}

fn hello() -> WsMessage {
    WsMessage::text(
        json!({"type": "hello", "num_connections": 1,
               "debug_info": {"host": "applink-fake", "build_number": 1, "approximate_connection_time": 18060},
               "connection_info": {"app_id": "A0APP001"}})
        .to_string(),
    )
}

fn envelope(envelope_id: &str, payload: &str, retry_attempt: u32) -> WsMessage {
    WsMessage::text(format!(
        r#"{{"envelope_id":"{envelope_id}","payload":{payload},"type":"events_api","accepts_response_payload":false,"retry_attempt":{retry_attempt},"retry_reason":"{}"}}"#,
        if retry_attempt > 0 { "timeout" } else { "" }
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_mode_acks_after_storing_answers_and_reconnects() {
    let fake = FakeSlack::start().await;
    let sock = fake.socket().await;
    let data = data_dir("socket");
    let gw = Running::start(&config(&fake, &data, Mode::Socket, OPEN), &data).await;
    assert!(
        gw.bound.web.is_none() && gw.bound.slack.is_none(),
        "no inbound port"
    );

    let (mut ws, ticket) = sock.accept().await;
    assert_eq!(ticket, "tk1");
    ws.send(hello()).await.unwrap();
    // An event the store refuses (empty event_id): never acknowledged.
    let bad_ts = new_ts();
    ws.send(envelope(
        "env-bad",
        &fake.callback(
            "",
            mention(GENERAL, ALICE, &bad_ts, None, "echo bad-$((6*7))"),
        ),
        0,
    ))
    .await
    .unwrap();
    let ts1 = new_ts();
    let id1 = new_event_id();
    let payload1 = fake.callback(
        &id1,
        mention(GENERAL, ALICE, &ts1, None, "echo sock1-$((6*7))"),
    );
    ws.send(envelope("env-1", &payload1, 0)).await.unwrap();
    let ack = next_ack(&mut ws, Duration::from_secs(10)).await;
    // Checked the moment the ack arrives: the message is already stored
    // and audited.
    let stored = gw.stored(&id1);
    let audited = gw
        .audit_messages("accepted")
        .iter()
        .any(|r| r["event_id"] == id1.as_str());
    assert_eq!(
        ack.as_deref(),
        Some("env-1"),
        "the first ack is env-1's (env-bad is never acked)"
    );
    assert!(stored.is_some(), "acknowledged before the event was stored");
    assert!(audited, "acknowledged before the event was audited");
    fake.wait_post(GENERAL, &ts1, "sock1-42").await;
    wait_reaction(&fake, &ts1, "white_check_mark").await;

    // Slack asks for a new connection: the gateway opens one with a new URL.
    ws.send(WsMessage::text(
        json!({"type": "disconnect", "reason": "refresh_requested", "debug_info": {"host": "applink-fake"}})
            .to_string(),
    ))
    .await
    .unwrap();
    assert_eq!(
        next_ack(&mut ws, Duration::from_secs(10)).await,
        None,
        "the gateway closed the old socket"
    );
    let (mut ws2, ticket) = sock.accept().await;
    assert_eq!(ticket, "tk2");
    assert_eq!(fake.calls_to("apps.connections.open").len(), 2);
    assert!(fake
        .calls_to("apps.connections.open")
        .iter()
        .all(|c| c.authorization.as_deref() == Some(format!("Bearer {APP_TOKEN}").as_str())));
    ws2.send(hello()).await.unwrap();
    // Slack redelivers env-1 (it counts as unacknowledged on its side), and a new event.
    ws2.send(envelope("env-1r", &payload1, 1)).await.unwrap();
    assert_eq!(
        next_ack(&mut ws2, Duration::from_secs(10)).await.as_deref(),
        Some("env-1r")
    );
    let ts2 = new_ts();
    let id2 = new_event_id();
    ws2.send(envelope(
        "env-2",
        &fake.callback(
            &id2,
            mention(GENERAL, ALICE, &ts2, None, "echo sock2-$((6*7))"),
        ),
        0,
    ))
    .await
    .unwrap();
    assert_eq!(
        next_ack(&mut ws2, Duration::from_secs(10)).await.as_deref(),
        Some("env-2")
    );
    assert!(gw.stored(&id2).is_some());
    fake.wait_post(GENERAL, &ts2, "sock2-42").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        fake.posts_in(GENERAL, &ts1)
            .iter()
            .filter(|t| t.contains("sock1-42"))
            .count(),
        1,
        "the redelivered event was not run again"
    );
    assert!(!fake.calls().iter().any(|c| c.text().contains("bad-42")));
    assert_eq!(gw.audit_messages("duplicate").len(), 1);
    gw.stop().await;
}

// ------------------------------------------------------------------ 10

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_on_chat_post_message_is_honoured() {
    let (fake, gw) = start("ratelimited", Mode::Events, OPEN).await;
    fake.rule(
        "chat.postMessage",
        Some("rl-42"),
        1,
        Action::RateLimit {
            retry_after_secs: 1,
        },
    );
    let ts = new_ts();
    post_signed(
        gw.events(),
        &fake.callback(
            &new_event_id(),
            mention(GENERAL, ALICE, &ts, None, "echo rl-$((6*7))"),
        ),
    )
    .await;
    fake.wait_post(GENERAL, &ts, "rl-42").await;
    let tries: Vec<Call> = fake
        .calls_to("chat.postMessage")
        .into_iter()
        .filter(|c| c.text().contains("rl-42"))
        .collect();
    assert_eq!(
        tries.iter().map(|c| c.status).collect::<Vec<_>>(),
        vec![429, 200],
        "one 429, then the answer"
    );
    let waited = tries[1].at - tries[0].at;
    assert!(
        waited >= Duration::from_millis(990),
        "Retry-After: 1 was not honoured: retried after {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(5),
        "retried only after {waited:?}"
    );
    wait_reaction(&fake, &ts, "white_check_mark").await;
    gw.stop().await;
}

// ------------------------------------------------------------------ history

/// The bot hears only mentions; a turn reads the rest of its thread from
/// Slack (`conversations.replies`), from where the previous turn stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_reads_its_thread_from_slack_since_the_previous_turn() {
    let (fake, gw) = start("history", Mode::Events, OPEN).await;
    let root = new_ts();
    post_signed(
        gw.events(),
        &fake.callback(
            &new_event_id(),
            mention(GENERAL, ALICE, &root, None, "echo h1-$((6*7))"),
        ),
    )
    .await;
    fake.wait_post(GENERAL, &root, "h1-42").await;
    wait_reaction(&fake, &root, "white_check_mark").await;
    // Two messages in the thread that do not mention the bot: Slack keeps
    // them, but sends the bot no event.
    let (b1, a1) = (new_ts(), new_ts());
    fake.user_said(GENERAL, BOB, &b1, Some(&root), "the build broke after 3f2a");
    fake.user_said(GENERAL, ALICE, &a1, Some(&root), "and the deploy too");
    let m2 = new_ts();
    post_signed(
        gw.events(),
        &fake.callback(
            &new_event_id(),
            mention(GENERAL, ALICE, &m2, Some(&root), "echo h2-$((6*7))"),
        ),
    )
    .await;
    fake.wait_post(GENERAL, &root, "h2-42").await;

    let calls = fake.calls();
    let replies: Vec<&Call> = calls
        .iter()
        .filter(|c| c.method == "conversations.replies")
        .collect();
    assert_eq!(replies.len(), 2, "one read per turn:\n{}", summary(&calls));
    for r in &replies {
        assert_eq!(
            (r.arg("channel"), r.arg("ts")),
            (Some(GENERAL), Some(root.as_str()))
        );
        assert!(r.ok(), "{:?}", r.answer);
    }
    assert_eq!(
        replies[0].arg("oldest"),
        None,
        "the first turn reads the whole thread"
    );
    assert_eq!(
        replies[1].arg("oldest"),
        Some(root.as_str()),
        "the second turn reads from the first turn's newest message on"
    );
    // What Slack gave the second turn: both unheard messages.
    let texts: Vec<&str> = replies[1].answer["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["text"].as_str())
        .collect();
    assert!(
        texts.contains(&"the build broke after 3f2a") && texts.contains(&"and the deploy too"),
        "{texts:?}"
    );
    // Read before the turn starts: before 👀 on the second mention.
    let read = calls
        .iter()
        .position(|c| std::ptr::eq(c, replies[1]))
        .unwrap();
    let eyes = index_of(&calls, "👀 on the second mention", |c| {
        c.method == "reactions.add"
            && c.arg("timestamp") == Some(m2.as_str())
            && c.arg("name") == Some("eyes")
    });
    assert!(read < eyes);
    gw.stop().await;
}
