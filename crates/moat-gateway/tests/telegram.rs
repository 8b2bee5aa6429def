//! Telegram end to end: the gateway (in this process, real bwrap sandboxes,
//! the shell agent) against a fake Bot API on 127.0.0.1 written from the
//! public Bot API documentation: `getMe`, `getUpdates` (long polling with
//! `offset`), `sendMessage` (4,096 characters at most, HTML parse mode
//! checked for balanced tags), `sendChatAction`, `setMessageReaction`,
//! `sendDocument` (multipart), `deleteWebhook`, and a 429 with
//! `parameters.retry_after` on demand. Webhook deliveries carry
//! `X-Telegram-Bot-Api-Secret-Token`.
//!
//! Run as root: `cargo test -p moat-gateway --test telegram`.

mod gwkit;
mod telegram_kit;

use std::time::Duration;

use gwkit::*;
use serde_json::json;
use telegram_kit::*;

#[test]
fn a_private_message_and_a_topic_mention_are_answered_with_reactions_retries_and_chunks() {
    let fake = FakeTelegram::start();
    // The first answer meets a 429: it is retried after retry_after, once.
    fake.state.lock().unwrap().throttle = 1;
    let gw = Gw::start_with("tg-e2e", &config(&fake, "webhook"), secrets());

    let r = deliver(
        &gw,
        Some(HOOK_SECRET),
        &update(
            1,
            ALICE,
            "private",
            ALICE,
            json!({"text": "echo tg-$((6*7))"}),
        )
        .to_string(),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    fake.wait("the answer", |c| {
        c.iter().any(|c| {
            c.method == "setMessageReaction" && c.body["reaction"][0]["emoji"] == json!("👍")
        })
    });
    let answers: Vec<Call> = fake
        .sent_to(ALICE)
        .into_iter()
        .filter(|c| c.body["text"].as_str().unwrap().contains("tg-42"))
        .collect();
    assert_eq!(answers.len(), 1, "answered once despite the 429");
    assert_eq!(answers[0].body["parse_mode"], json!("HTML"));
    let calls = fake.calls();
    assert!(
        calls.iter().any(|c| c.method == "sendMessage" && !c.ok),
        "the 429 happened"
    );
    let pos = |f: &dyn Fn(&Call) -> bool| calls.iter().position(f).unwrap();
    let eyes =
        pos(&|c| c.method == "setMessageReaction" && c.body["reaction"][0]["emoji"] == json!("👀"));
    let typing = pos(&|c| c.method == "sendChatAction" && c.body["action"] == json!("typing"));
    let answer = pos(&|c| {
        c.method == "sendMessage" && c.ok && c.body["text"].as_str().unwrap().contains("tg-42")
    });
    assert!(eyes < answer && typing < answer);

    // A forum topic: a mention of the bot is answered in its topic.
    let r = deliver(
        &gw,
        Some(HOOK_SECRET),
        &update(
            2,
            GROUP,
            "supergroup",
            ALICE,
            json!({"text": "@moat_bot echo topic-ok", "message_thread_id": 7, "is_topic_message": true,
                   "entities": [{"type": "mention", "offset": 0, "length": 9}]}),
        )
        .to_string(),
    );
    assert_eq!(r.status, 200);
    let calls = fake.wait("the topic's answer", |c| {
        c.iter().any(|c| {
            c.method == "sendMessage"
                && c.ok
                && c.body["text"].as_str().unwrap().contains("topic-ok")
        })
    });
    let a = calls
        .iter()
        .find(|c| {
            c.method == "sendMessage"
                && c.ok
                && c.body["text"].as_str().unwrap().contains("topic-ok")
        })
        .unwrap();
    assert_eq!(a.body["chat_id"], json!(GROUP));
    assert_eq!(a.body["message_thread_id"], json!(7));

    // A long answer: several messages, each within 4,096 visible characters.
    let before = fake.sent_to(ALICE).len();
    let r = deliver(
        &gw,
        Some(HOOK_SECRET),
        &update(3, ALICE, "private", ALICE, json!({"text": "seq 1 3000"})).to_string(),
    );
    assert_eq!(r.status, 200);
    let calls = fake.wait("the long answer's end", |c| {
        c.iter().any(|c| {
            c.method == "sendMessage"
                && c.ok
                && visible(c.body["text"].as_str().unwrap()).contains("3000")
        })
    });
    let long: Vec<&Call> = calls
        .iter()
        .filter(|c| c.method == "sendMessage" && c.ok && c.body["chat_id"] == json!(ALICE))
        .skip(before)
        .collect();
    assert!(long.len() >= 4, "{} messages", long.len());
    for c in &long {
        let t = c.body["text"].as_str().unwrap();
        assert!(visible(t).chars().count() <= 4096);
        assert_eq!(t.matches("<pre>").count(), t.matches("</pre>").count());
    }
    assert!(
        calls.iter().all(|c| c.ok || c.method == "sendMessage"),
        "no failed call but the 429"
    );

    // Stickers: told once what moat reads, not run.
    for id in [4, 5] {
        let r = deliver(
            &gw,
            Some(HOOK_SECRET),
            &update(
                id,
                ALICE,
                "private",
                ALICE,
                json!({"sticker": {"file_id": "x"}}),
            )
            .to_string(),
        );
        assert_eq!(r.status, 200);
    }
    fake.wait("the unsupported notice", |c| {
        c.iter().any(|c| {
            c.method == "sendMessage"
                && c.body["text"]
                    .as_str()
                    .unwrap()
                    .contains("only read text and files")
        })
    });
    std::thread::sleep(Duration::from_millis(300));
    let told = fake
        .sent_to(ALICE)
        .iter()
        .filter(|c| {
            c.body["text"]
                .as_str()
                .unwrap()
                .contains("only read text and files")
        })
        .count();
    assert_eq!(told, 1);
    gw.stop();
}

/// P1: a delivery without the webhook secret, with a wrong one, or a
/// replay of a stored one: refused (401) before the body is read (a body
/// that is not even JSON gets 401, not 400), nothing stored, nothing run;
/// the replay is answered once.
#[test]
fn attack_p1_forged_and_replayed_telegram_deliveries_are_refused_before_parsing() {
    let fake = FakeTelegram::start();
    let gw = Gw::start_with("tg-p1", &config(&fake, "webhook"), secrets());
    let good = update(
        10,
        ALICE,
        "private",
        ALICE,
        json!({"text": "echo forged-ran > /tmp/x; echo forged-ran"}),
    )
    .to_string();
    let wrong_len = format!("{HOOK_SECRET}x");
    let wrong_same_len = format!("{}X", &HOOK_SECRET[..HOOK_SECRET.len() - 1]);
    for secret in [
        None,
        Some(""),
        Some(wrong_len.as_str()),
        Some(wrong_same_len.as_str()),
    ] {
        for body in [good.as_str(), "{not json", ""] {
            let r = deliver(&gw, secret, body);
            assert_eq!(r.status, 401, "{secret:?} {body:?}: {}", r.body);
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        gw.audit_kind("message").is_empty(),
        "a forged delivery reached the inbox: {:?}",
        gw.audit_kind("message")
    );
    assert!(fake.sent_to(ALICE).is_empty());
    let m = gw.metrics();
    let forged = metric(&m, "moat_events_total{verdict=\"forged\"}").unwrap_or(0.0);
    assert!(forged >= 12.0, "{m}");

    // The real delivery, then its replay: run once.
    let real = update(
        11,
        ALICE,
        "private",
        ALICE,
        json!({"text": "echo once-$((1+1))"}),
    )
    .to_string();
    assert_eq!(deliver(&gw, Some(HOOK_SECRET), &real).status, 200);
    assert_eq!(deliver(&gw, Some(HOOK_SECRET), &real).status, 200);
    fake.wait("the answer", |c| {
        c.iter().any(|c| {
            c.method == "sendMessage" && c.ok && c.body["text"].as_str().unwrap().contains("once-2")
        })
    });
    std::thread::sleep(Duration::from_millis(500));
    let n = fake
        .sent_to(ALICE)
        .iter()
        .filter(|c| c.body["text"].as_str().unwrap().contains("once-2"))
        .count();
    assert_eq!(n, 1, "the replay ran again");
    let verdicts: Vec<String> = gw
        .audit_kind("message")
        .iter()
        .map(|r| r["verdict"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(verdicts, ["accepted", "duplicate"], "{verdicts:?}");

    // A Telegram user not in the channel's users: stored as dropped, never told.
    let r = deliver(
        &gw,
        Some(HOOK_SECRET),
        &update(
            12,
            MALLORY,
            "private",
            MALLORY,
            json!({"text": "echo mallory"}),
        )
        .to_string(),
    );
    assert_eq!(r.status, 200);
    std::thread::sleep(Duration::from_millis(500));
    assert!(fake.sent_to(MALLORY).is_empty());
    gw.stop();
}

#[test]
fn long_polling_answers_and_moves_the_offset_past_stored_updates_only() {
    let fake = FakeTelegram::start();
    fake.state.lock().unwrap().updates.push_back(update(
        500,
        ALICE,
        "private",
        ALICE,
        json!({"text": "echo polled-$((2*3))"}),
    ));
    let gw = Gw::start_with("tg-poll", &config(&fake, "polling"), secrets());
    fake.wait("the polled answer", |c| {
        c.iter().any(|c| {
            c.method == "sendMessage"
                && c.ok
                && c.body["text"].as_str().unwrap().contains("polled-6")
        })
    });
    let calls = fake.calls();
    assert!(calls.iter().any(|c| c.method == "deleteWebhook"));
    // The webhook route is not served in polling mode.
    let r = deliver(&gw, Some(HOOK_SECRET), "{}");
    assert_ne!(r.status, 200);
    // The update is confirmed (offset 501) and not run twice.
    fake.wait("the confirming offset", |_| {
        fake.state.lock().unwrap().offsets.contains(&501)
    });
    std::thread::sleep(Duration::from_millis(500));
    let n = fake
        .sent_to(ALICE)
        .iter()
        .filter(|c| c.body["text"].as_str().unwrap().contains("polled-6"))
        .count();
    assert_eq!(n, 1);
    gw.stop();
}

#[test]
fn documents_are_sent_with_send_document() {
    let fake = FakeTelegram::start();
    let gw = Gw::start_with("tg-doc", &config(&fake, "webhook"), secrets());
    let r = deliver(
        &gw,
        Some(HOOK_SECRET),
        &update(
            20,
            ALICE,
            "private",
            ALICE,
            json!({"text": "mkdir -p ~/artifacts && echo report-body > ~/artifacts/report.txt && echo made"}),
        )
        .to_string(),
    );
    assert_eq!(r.status, 200);
    let calls = fake.wait("the document", |c| {
        c.iter().any(|c| c.method == "sendDocument")
    });
    let doc = calls.iter().find(|c| c.method == "sendDocument").unwrap();
    let raw = String::from_utf8_lossy(&doc.raw);
    assert!(raw.contains("filename=\"report.txt\""), "{raw}");
    assert!(raw.contains("report-body"));
    assert!(
        raw.contains(&format!("\r\n\r\n{ALICE}\r\n")),
        "chat_id field: {raw}"
    );
    gw.stop();
}
