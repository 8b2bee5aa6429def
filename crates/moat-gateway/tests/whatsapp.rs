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
mod whatsapp_kit;

use std::time::Duration;

use gwkit::*;
use moat_chat::whatsapp::sign;
use serde_json::json;
use whatsapp_kit::*;

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
