//! The privilege table (docs/trust.md) and the chat keys, end to end: the
//! gateway (in this process, real bwrap sandboxes, the shell agent) against a
//! fake Slack (tests/slack_kit). Who may `stop`, `status` and `pool`; a
//! conversation that is the whole channel; triggers and the mention rule
//! (attack M4). Run as root:
//! `cargo test -p moat-gateway --test trust -- --test-threads=2`.

mod slack_kit;

use std::time::Duration;

use moat_store::MessageState;
use serde_json::{json, Value};
use slack_kit::*;

const ALICE: &str = "U0ALICE1";
const BOB: &str = "U0BOB002";
const CAROL: &str = "U0CAROL3";
const GENERAL: &str = "C0GENERAL";
const DM: &str = "D0ALICEDM";

async fn start(name: &str, rest: &str) -> (FakeSlack, Running) {
    let fake = FakeSlack::start().await;
    let data = data_dir(name);
    let gw = Running::start(&config(&fake, &data, Mode::Events, rest), &data).await;
    (fake, gw)
}

/// Alice and Bob are members of #general, Carol administers it.
const TEAM: &str = r#"
[pool]
size = 2

[defaults]
debounce = "50ms"

[[channel]]
platform = "slack"
id = "C0GENERAL"
users = ["U0ALICE1", "U0BOB002"]
admins = ["U0CAROL3"]
"#;

async fn say(fake: &FakeSlack, gw: &Running, ev: Value) -> String {
    let id = new_event_id();
    let r = post_signed(gw.events(), &fake.callback(&id, ev)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    id
}

/// A channel message that does not mention the bot.
fn plain(channel: &str, user: &str, ts: &str, thread_ts: Option<&str>, text: &str) -> Value {
    let mut ev = json!({
        "type": "message", "channel": channel, "user": user, "text": text,
        "ts": ts, "event_ts": ts, "channel_type": "channel", "team": "T0TEAM",
    });
    if let Some(t) = thread_ts {
        ev["thread_ts"] = json!(t);
    }
    ev
}

fn refused(gw: &Running, command: &str, user: &str) -> usize {
    gw.audit()
        .iter()
        .filter(|r| {
            r["kind"] == "command"
                && r["verdict"] == "refused"
                && r["command"] == command
                && r["user"] == user
        })
        .count()
}

fn turns(gw: &Running) -> Vec<Value> {
    gw.audit()
        .into_iter()
        .filter(|r| r["kind"] == "turn")
        .collect()
}

// Row `member`: stop and status act on one's own turns only (the hole: any
// member could stop anyone's turn).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_cannot_stop_or_inspect_another_members_turn() {
    let (fake, gw) = start("trust-member-stop", TEAM).await;
    let m = random_tag();
    let root = new_ts();
    say(
        &fake,
        &gw,
        mention(
            GENERAL,
            ALICE,
            &root,
            None,
            &format!("sleep 3; echo late-{m}"),
        ),
    )
    .await;
    fake.wait_post(GENERAL, &root, "working").await;

    say(
        &fake,
        &gw,
        mention(GENERAL, BOB, &new_ts(), Some(&root), "stop"),
    )
    .await;
    fake.wait_post(GENERAL, &root, "someone else's").await;
    say(
        &fake,
        &gw,
        mention(GENERAL, BOB, &new_ts(), Some(&root), "status"),
    )
    .await;
    wait_until("the status refusal", || {
        (refused(&gw, "status", BOB) == 1).then_some(())
    })
    .await;
    // Alice's turn ran to its end, untouched.
    fake.wait_post(GENERAL, &root, &format!("late-{m}")).await;
    assert_eq!(refused(&gw, "stop", BOB), 1);
    assert!(!fake
        .posts_in(GENERAL, &root)
        .iter()
        .any(|p| p.contains("Stopping the running turn")));
    wait_until("the finished turn", || {
        (turns(&gw).first()?["state"] == "done").then_some(())
    })
    .await;

    // Alice stops her own.
    let root2 = new_ts();
    say(
        &fake,
        &gw,
        mention(
            GENERAL,
            ALICE,
            &root2,
            None,
            &format!("sleep 30; echo never-{m}"),
        ),
    )
    .await;
    fake.wait_post(GENERAL, &root2, "working").await;
    say(
        &fake,
        &gw,
        mention(GENERAL, ALICE, &new_ts(), Some(&root2), "stop"),
    )
    .await;
    fake.wait_post(GENERAL, &root2, "Stopping the running turn.")
        .await;
    wait_until("the cancelled turn", || {
        turns(&gw)
            .iter()
            .any(|t| t["state"] == "cancelled")
            .then_some(())
    })
    .await;
    assert!(!fake
        .posts_in(GENERAL, &root2)
        .iter()
        .any(|p| p.contains("never-")));
    gw.stop().await;
}

// Row `admin`: stop and status of any conversation in the channel, and `pool`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_stops_and_inspects_any_turn_and_sees_the_pool() {
    let (fake, gw) = start("trust-admin", TEAM).await;
    let m = random_tag();
    let root = new_ts();
    say(
        &fake,
        &gw,
        mention(
            GENERAL,
            BOB,
            &root,
            None,
            &format!("sleep 30; echo never-{m}"),
        ),
    )
    .await;
    fake.wait_post(GENERAL, &root, "working").await;
    say(
        &fake,
        &gw,
        mention(GENERAL, CAROL, &new_ts(), Some(&root), "status"),
    )
    .await;
    fake.wait_post(GENERAL, &root, "Sandbox: ").await;
    say(
        &fake,
        &gw,
        mention(GENERAL, CAROL, &new_ts(), Some(&root), "stop"),
    )
    .await;
    fake.wait_post(GENERAL, &root, "Stopping the running turn.")
        .await;
    wait_until("the cancelled turn", || {
        turns(&gw)
            .iter()
            .any(|t| t["state"] == "cancelled")
            .then_some(())
    })
    .await;

    // pool: the admin gets the numbers, a member a refusal.
    let r2 = new_ts();
    say(&fake, &gw, mention(GENERAL, CAROL, &r2, None, "pool")).await;
    fake.wait_post(GENERAL, &r2, "Pool: 2 sandboxes").await;
    let r3 = new_ts();
    say(&fake, &gw, mention(GENERAL, ALICE, &r3, None, "pool")).await;
    fake.wait_post(GENERAL, &r3, "for this channel's admins")
        .await;
    assert!(!fake
        .posts_in(GENERAL, &r3)
        .iter()
        .any(|p| p.contains("Pool:")));
    assert_eq!(refused(&gw, "pool", ALICE), 1);
    assert_eq!(
        refused(&gw, "stop", CAROL) + refused(&gw, "status", CAROL),
        0
    );
    gw.stop().await;
}

/// #general with a trigger, every message heard, one conversation.
const TRIGGERED: &str = r#"
[pool]
size = 1

[defaults]
debounce = "50ms"

[[channel]]
platform = "slack"
id = "C0GENERAL"
users = ["U0ALICE1", "U0BOB002"]
mention = "optional"
conversation = "channel"
trigger = "^@Andy\\b"

[[channel]]
platform = "slack"
id = "*"
users = ["U0ALICE1"]
"#;

fn answers_at_top(calls: &[Call], channel: &str) -> Vec<String> {
    calls
        .iter()
        .filter(|c| {
            c.method == "chat.postMessage"
                && c.ok()
                && c.arg("channel") == Some(channel)
                && c.arg("thread_ts").is_none()
        })
        .map(|c| c.text().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_m4_messages_without_the_trigger_start_no_turn() {
    let (fake, gw) = start("trust-m4", TRIGGERED).await;
    let m = random_tag();
    let tries = [
        format!("echo no-{m}"),
        format!("> @Andy echo quoted-{m}"),
        format!("ask @Andy to echo mid-{m}"),
        format!("@Andrew echo lookalike-{m}"),
        format!("`@Andy echo code-{m}`"),
    ];
    let mut ids = Vec::new();
    for t in &tries {
        ids.push(say(&fake, &gw, plain(GENERAL, BOB, &new_ts(), None, t)).await);
    }
    // An edit that adds the trigger, and a forwarded message carrying it
    // in an attachment: Slack events moat never takes as a turn.
    let edited = json!({
        "type": "message", "subtype": "message_changed", "channel": GENERAL,
        "channel_type": "channel", "ts": new_ts(), "event_ts": new_ts(),
        "message": {"type": "message", "user": BOB, "text": format!("@Andy echo edited-{m}"), "ts": new_ts()},
    });
    say(&fake, &gw, edited).await;
    let forwarded = json!({
        "type": "message", "channel": GENERAL, "user": BOB, "channel_type": "channel",
        "ts": new_ts(), "event_ts": new_ts(), "text": "",
        "attachments": [{"is_share": true, "text": format!("@Andy echo forwarded-{m}")}],
    });
    say(&fake, &gw, forwarded).await;

    // Then a message with the trigger: one turn, answered at the top level.
    let go = say(
        &fake,
        &gw,
        plain(
            GENERAL,
            ALICE,
            &new_ts(),
            None,
            &format!("@andy echo go-{m}"),
        ),
    )
    .await;
    fake.wait_for("the triggered answer", Duration::from_secs(60), |calls| {
        answers_at_top(calls, GENERAL)
            .iter()
            .any(|a| a.contains(&format!("go-{m}")))
            .then_some(())
    })
    .await;
    let answers = answers_at_top(&fake.calls(), GENERAL).join("\n");
    for word in [
        "no-",
        "quoted-",
        "mid-",
        "lookalike-",
        "code-",
        "edited-",
        "forwarded-",
    ] {
        assert!(
            !answers.contains(&format!("{word}{m}")),
            "{word}: {answers}"
        );
    }
    wait_until("the turn's record", || {
        (!turns(&gw).is_empty()).then_some(())
    })
    .await;
    assert_eq!(turns(&gw).len(), 1, "{:?}", turns(&gw));
    // The untriggered messages are stored as context of the same (channel)
    // conversation, for the next turn to read.
    let go = gw.stored(&go).unwrap();
    for id in &ids {
        let s = gw.stored(id).unwrap();
        assert_eq!(s.state, MessageState::Answered, "{s:?}");
        assert!(
            s.detail
                .as_deref()
                .unwrap_or("")
                .starts_with("context (no trigger)"),
            "{s:?}"
        );
        assert_eq!(s.conversation_id, go.conversation_id);
        assert!(s.turn_id.is_none());
    }
    // The tries and the forwarded message (its own text is empty).
    assert_eq!(gw.audit_messages("context").len(), tries.len() + 1);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_m4_unmentioned_messages_start_no_turn_where_the_mention_is_required() {
    let (fake, gw) = start("trust-m4-mention", TEAM).await;
    let m = random_tag();
    let root = new_ts();
    say(
        &fake,
        &gw,
        plain(
            GENERAL,
            ALICE,
            &root,
            None,
            &format!("echo unmentioned-{m}"),
        ),
    )
    .await;
    let r2 = new_ts();
    say(
        &fake,
        &gw,
        mention(GENERAL, ALICE, &r2, None, &format!("echo mentioned-{m}")),
    )
    .await;
    fake.wait_post(GENERAL, &r2, &format!("mentioned-{m}"))
        .await;
    wait_until("the turn's record", || {
        (!turns(&gw).is_empty()).then_some(())
    })
    .await;
    assert!(fake.posts_in(GENERAL, &root).is_empty());
    assert_eq!(turns(&gw).len(), 1);
    // Not even stored: a thread's history is read from Slack at its turn.
    assert_eq!(gw.stored_count(), 1);
    gw.stop().await;
}

// Conversation scope: Slack direct messages continue by default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_messages_are_one_conversation() {
    let (fake, gw) = start("trust-dm", TRIGGERED).await;
    let m = random_tag();
    let a = say(
        &fake,
        &gw,
        direct(DM, ALICE, &new_ts(), &format!("echo one-{m}")),
    )
    .await;
    fake.wait_for("the first answer", Duration::from_secs(60), |calls| {
        answers_at_top(calls, DM)
            .iter()
            .any(|t| t.contains(&format!("one-{m}")))
            .then_some(())
    })
    .await;
    let b = say(
        &fake,
        &gw,
        direct(DM, ALICE, &new_ts(), &format!("echo two-{m}")),
    )
    .await;
    fake.wait_for("the second answer", Duration::from_secs(60), |calls| {
        answers_at_top(calls, DM)
            .iter()
            .any(|t| t.contains(&format!("two-{m}")))
            .then_some(())
    })
    .await;
    let (a, b) = (gw.stored(&a).unwrap(), gw.stored(&b).unwrap());
    assert_eq!(a.conversation_id, b.conversation_id);
    gw.stop().await;
}

fn random_tag() -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{n:x}")
}

/// Polls `f` (audit records are not Slack calls) until it is `Some`.
async fn wait_until(what: &str, f: impl Fn() -> Option<()>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while f().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "waited 60 s for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
