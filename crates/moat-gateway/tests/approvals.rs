//! Approvals end to end (docs/approvals.md, threat model row I6): the
//! gateway in this process on real bwrap sandboxes, the shell agent whose
//! turn runs python3 talking MCP to the lease's socket, a fake Slack
//! (tests/slack_kit) that records the request with its buttons, and
//! interaction payloads as Slack sends them (form-encoded `payload`, signed
//! with the signing secret). Every attack asserts the held action did not
//! happen: no message in the other chat, no task in the store.
//! Run as root: `cargo test -p moat-gateway --test approvals -- --test-threads=2`.

mod slack_kit;

use std::time::Duration;

use serde_json::{json, Value};
use slack_kit::*;

const ALICE: &str = "U0ALICE1";
const BOB: &str = "U0BOB002";
const CAROL: &str = "U0CAROL3";
const DAVE: &str = "U0DAVE04";
const ERIN: &str = "U0ERIN05";
const GENERAL: &str = "C0GENERAL";
const OPS: &str = "C0OPS0001";

/// #ops holds messages to other chats and new tasks for its admin, Carol;
/// Bob is a member there. #general lets Alice in and asks Carol about
/// anyone else.
fn team(timeout: &str) -> String {
    format!(
        r#"
[pool]
size = 1

[defaults]
debounce = "50ms"

[tasks]
min_interval = "1m"

[[channel]]
platform = "slack"
id = "C0GENERAL"
users = ["U0ALICE1"]
admins = ["U0CAROL3"]
unknown = "request_approval"
approve_timeout = "{timeout}"

[[channel]]
platform = "slack"
id = "C0OPS0001"
users = ["U0BOB002"]
admins = ["U0CAROL3"]
approve = ["send_elsewhere", "schedule"]
approve_timeout = "{timeout}"
"#
    )
}

/// The python3 program a turn runs: the given `tools/call`s in order, one
/// `R<i> OK|ERR text` line each, then `DONE`.
fn calls(calls: &[(&str, Value)]) -> String {
    let list: Vec<Value> = calls.iter().map(|(n, a)| json!([n, a])).collect();
    let arg = Value::Array(list).to_string();
    assert!(!arg.contains('\''), "the arguments go in single quotes");
    let program = [
        "import socket,json,sys",
        "s=socket.socket(socket.AF_UNIX)",
        "s.connect(\"/run/moat/ipc.sock\")",
        "f=s.makefile(\"rw\")",
        "def rpc(i,m,p):",
        "  f.write(json.dumps(dict(jsonrpc=\"2.0\",id=i,method=m,params=p))+chr(10)); f.flush()",
        "  return json.loads(f.readline())",
        "rpc(0,\"initialize\",dict(protocolVersion=\"2025-06-18\",capabilities=dict(),clientInfo=dict(name=\"t\",version=\"0\")))",
        "for i,(n,a) in enumerate(json.loads(sys.argv[1])):",
        "  r=rpc(i+1,\"tools/call\",dict(name=n,arguments=a))[\"result\"]",
        "  print(\"R%d %s %s\" % (i, \"ERR\" if r[\"isError\"] else \"OK\", r[\"content\"][0][\"text\"].replace(chr(10),\" | \")))",
        "print(\"DONE\")",
    ]
    .join("\n");
    format!("python3 -c '{program}' '{arg}'")
}

async fn start(name: &str, timeout: &str) -> (FakeSlack, Running) {
    let fake = FakeSlack::start().await;
    let data = data_dir(name);
    let gw = Running::start(&config(&fake, &data, Mode::Events, &team(timeout)), &data).await;
    (fake, gw)
}

/// Starts a turn of `user` in a new thread of `channel`; returns the
/// thread's root ts (the turn runs on while the test clicks).
async fn start_turn(
    fake: &FakeSlack,
    gw: &Running,
    channel: &str,
    user: &str,
    text: &str,
) -> String {
    let root = new_ts();
    let r = post_signed(
        gw.events(),
        &fake.callback(&new_event_id(), mention(channel, user, &root, None, text)),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    root
}

/// The turn's answer lines (`R<i> ...`), once it posted `DONE`.
async fn answer(fake: &FakeSlack, channel: &str, root: &str) -> Vec<String> {
    fake.wait_post(channel, root, "DONE")
        .await
        .text()
        .lines()
        .filter(|l| l.starts_with('R'))
        .map(str::to_string)
        .collect()
}

/// Waits for the approval request in `channel`/`thread`: (its id, its ts).
async fn request(fake: &FakeSlack, channel: &str, thread: &str) -> (String, String) {
    fake.wait_for(
        "an approval request with buttons",
        Duration::from_secs(60),
        |calls| {
            calls.iter().find_map(|c| {
                (c.method == "chat.postMessage"
                    && c.arg("channel") == Some(channel)
                    && c.arg("thread_ts") == Some(thread))
                .then(|| approval_id(c))
                .flatten()
                .map(|id| (id, c.answer["ts"].as_str().unwrap_or("").to_string()))
            })
        },
    )
    .await
}

/// `user` clicks on request `id`, signed now: the response.
async fn click(gw: &Running, user: &str, id: &str, approve: bool, channel: &str, ts: &str) -> Resp {
    let body = click_body(user, id, approve, channel, ts);
    post_interaction(gw.events(), &body, &signed_headers(&body, now_secs())).await
}

fn posts_to(fake: &FakeSlack, channel: &str, needle: &str) -> usize {
    fake.calls()
        .iter()
        .filter(|c| {
            c.method == "chat.postMessage"
                && c.arg("channel") == Some(channel)
                && c.text().contains(needle)
                && approval_id(c).is_none()
                && !c.text().contains("send_message")
        })
        .count()
}

fn approvals(gw: &Running) -> Vec<Value> {
    gw.audit()
        .into_iter()
        .filter(|r| r["kind"] == "approval")
        .collect()
}

fn tasks_in(gw: &Running, channel: &str) -> usize {
    gw.gw
        .inner
        .store
        .tasks_of_channel("slack", channel)
        .unwrap()
        .len()
}

fn schedule(tag: &str) -> String {
    calls(&[(
        "schedule_task",
        json!({"prompt": format!("echo {tag}"), "schedule_type": "interval", "schedule_value": "1h"}),
    )])
}

// I6: a message to another chat waits for the admin's click; before it,
// nothing reaches the other chat; after it, the message is sent once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_i6_an_action_happens_only_after_an_admin_approves() {
    let (fake, gw) = start("appr-ok", "60s").await;
    let root = start_turn(
        &fake,
        &gw,
        OPS,
        CAROL,
        &calls(&[(
            "send_message",
            json!({"text": "i6-approved", "chat": GENERAL}),
        )]),
    )
    .await;
    let (id, ts) = request(&fake, OPS, &root).await;
    // Waiting: the other chat got nothing yet.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(posts_to(&fake, GENERAL, "i6-approved"), 0);
    let r = click(&gw, CAROL, &id, true, OPS, &ts).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let lines = answer(&fake, OPS, &root).await;
    assert!(lines[0].starts_with("R0 OK"), "{lines:?}");
    assert_eq!(posts_to(&fake, GENERAL, "i6-approved"), 1);
    // The buttons are replaced by the decision.
    fake.wait_for("the request updated", Duration::from_secs(10), |calls| {
        calls
            .iter()
            .find(|c| {
                c.method == "chat.update"
                    && c.arg("ts") == Some(ts.as_str())
                    && c.text().contains("Approved by")
            })
            .cloned()
    })
    .await;
    let a = approvals(&gw);
    assert!(a.iter().any(|r| r["verdict"] == "requested"
        && r["action"] == "send_elsewhere"
        && r["requester"] == CAROL
        && r["id"] == id.as_str()));
    assert!(a
        .iter()
        .any(|r| r["verdict"] == "approved" && r["by"] == CAROL && r["id"] == id.as_str()));
    // The audit names the action, never its text.
    assert!(!std::fs::read_to_string(gw.audit_path())
        .unwrap()
        .contains("i6-approved"));
    gw.stop().await;
}

// I6: a denied task is never stored; the caller is told it was denied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_i6_a_denied_action_does_not_happen() {
    let (fake, gw) = start("appr-deny", "60s").await;
    let root = start_turn(&fake, &gw, OPS, BOB, &schedule("i6-denied")).await;
    let (id, ts) = request(&fake, OPS, &root).await;
    let r = click(&gw, CAROL, &id, false, OPS, &ts).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let lines = answer(&fake, OPS, &root).await;
    assert!(
        lines[0].starts_with("R0 ERR") && lines[0].contains("denied"),
        "{lines:?}"
    );
    assert_eq!(tasks_in(&gw, OPS), 0);
    assert!(approvals(&gw)
        .iter()
        .any(|r| r["verdict"] == "denied" && r["by"] == CAROL && r["action"] == "schedule"));
    assert!(gw.audit().iter().any(|r| r["kind"] == "ipc"
        && r["op"] == "schedule_task"
        && r["verdict"] == "refused"
        && r["reason"] == "approval_denied"));
    gw.stop().await;
}

// I6, typed: where a platform has no buttons an admin answers `approve ID`
// in the chat. A member typing it is refused (and the task is not stored);
// the admin's typed approval lets it happen, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_i6_a_typed_decision_counts_only_from_an_admin() {
    let (fake, gw) = start("appr-typed", "60s").await;
    let root = start_turn(&fake, &gw, OPS, BOB, &schedule("i6-typed")).await;
    let (id, _) = request(&fake, OPS, &root).await;
    let say = |user: &'static str, text: String| {
        let (fake, events, root) = (&fake, gw.events(), root.clone());
        async move {
            let r = post_signed(
                events,
                &fake.callback(
                    &new_event_id(),
                    mention(OPS, user, &new_ts(), Some(&root), &text),
                ),
            )
            .await;
            assert_eq!(r.status, 200, "{}", r.body);
        }
    };
    say(BOB, format!("approve {id}")).await;
    fake.wait_post(OPS, &root, "only an admin of this channel may decide")
        .await;
    assert_eq!(tasks_in(&gw, OPS), 0);
    say(CAROL, format!("approve {}", id.to_uppercase())).await;
    let lines = answer(&fake, OPS, &root).await;
    assert!(lines[0].starts_with("R0 OK"), "{lines:?}");
    assert_eq!(tasks_in(&gw, OPS), 1);
    // A second typed decision is a replay.
    say(CAROL, format!("deny {id}")).await;
    fake.wait_post(OPS, &root, "decided already").await;
    assert_eq!(tasks_in(&gw, OPS), 1);
    let a = approvals(&gw);
    assert!(a.iter().any(|r| r["verdict"] == "refused"
        && r["reason"] == "not_admin"
        && r["by"] == BOB
        && r["source"] == "chat"));
    assert!(a
        .iter()
        .any(|r| r["verdict"] == "approved" && r["by"] == CAROL && r["source"] == "chat"));
    gw.stop().await;
}

// I6, the agent asks (`request_approval`): the question reaches the admins
// of the caller's own channel; only an admin's click decides; an approval is
// the tool's result, a denial an error saying so; the audit names the
// request, never the question.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_i6_request_approval_is_decided_only_by_an_admin_of_the_callers_channel() {
    let (fake, gw) = start("appr-ask", "60s").await;
    let root = start_turn(
        &fake,
        &gw,
        OPS,
        BOB,
        &calls(&[
            (
                "request_approval",
                json!({"question": "rotate the staging keys i6-ask-1"}),
            ),
            (
                "request_approval",
                json!({"question": "drop the cache i6-ask-2"}),
            ),
            ("request_approval", json!({"question": ""})),
        ]),
    )
    .await;
    let (id, ts) = request(&fake, OPS, &root).await;
    let asked = fake
        .calls()
        .into_iter()
        .find(|c| approval_id(c).as_deref() == Some(id.as_str()))
        .unwrap();
    assert!(
        asked.args.to_string().contains("i6-ask-1"),
        "the admins see the question"
    );
    // The requester is a member: their click decides nothing.
    let r = click(&gw, BOB, &id, true, OPS, &ts).await;
    assert_eq!(r.status, 403, "{}", r.body);
    let r = click(&gw, CAROL, &id, true, OPS, &ts).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let (id2, ts2) = fake
        .wait_for("the second request", Duration::from_secs(60), |calls| {
            calls.iter().find_map(|c| {
                approval_id(c)
                    .filter(|i| *i != id)
                    .map(|i| (i, c.answer["ts"].as_str().unwrap_or("").to_string()))
            })
        })
        .await;
    let r = click(&gw, CAROL, &id2, false, OPS, &ts2).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let lines = answer(&fake, OPS, &root).await;
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(lines[0], format!("R0 OK approved by {CAROL}"), "{lines:?}");
    assert!(
        lines[1].starts_with("R1 ERR denied by") && lines[1].contains("do not do it"),
        "{lines:?}"
    );
    assert!(
        lines[2].starts_with("R2 ERR") && lines[2].contains("needs question"),
        "{lines:?}"
    );
    let a = approvals(&gw);
    assert!(a.iter().any(|r| r["verdict"] == "requested"
        && r["action"] == "agent_request"
        && r["requester"] == BOB));
    assert!(a
        .iter()
        .any(|r| r["verdict"] == "refused" && r["reason"] == "not_admin" && r["by"] == BOB));
    assert!(!std::fs::read_to_string(gw.audit_path())
        .unwrap()
        .contains("i6-ask"));
    gw.stop().await;
}

// I6: nobody decides: the request times out as a denial, and a click that
// comes after the timeout changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_i6_an_unanswered_request_times_out_denied() {
    let (fake, gw) = start("appr-timeout", "2s").await;
    let root = start_turn(
        &fake,
        &gw,
        OPS,
        CAROL,
        &calls(&[(
            "send_message",
            json!({"text": "i6-timeout", "chat": GENERAL}),
        )]),
    )
    .await;
    let (id, ts) = request(&fake, OPS, &root).await;
    let lines = answer(&fake, OPS, &root).await;
    assert!(
        lines[0].starts_with("R0 ERR") && lines[0].contains("approve_timeout"),
        "{lines:?}"
    );
    let r = click(&gw, CAROL, &id, true, OPS, &ts).await;
    assert_eq!(r.status, 409, "{}", r.body);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(posts_to(&fake, GENERAL, "i6-timeout"), 0);
    let a = approvals(&gw);
    assert!(a
        .iter()
        .any(|r| r["verdict"] == "timed_out" && r["id"] == id.as_str()));
    assert!(a.iter().any(|r| r["verdict"] == "refused"
        && r["reason"] == "already_decided"
        && r["by"] == CAROL));
    assert!(!a.iter().any(|r| r["verdict"] == "approved"));
    gw.stop().await;
}

// I6: a member (even the one whose turn asks) and an outsider cannot
// approve; their clicks are refused and audited and the request still
// waits for an admin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_i6_a_non_admin_click_is_refused() {
    let (fake, gw) = start("appr-nonadmin", "60s").await;
    let root = start_turn(&fake, &gw, OPS, BOB, &schedule("i6-nonadmin")).await;
    let (id, ts) = request(&fake, OPS, &root).await;
    for who in [BOB, ALICE, DAVE] {
        let r = click(&gw, who, &id, true, OPS, &ts).await;
        assert_eq!(r.status, 403, "{who}: {}", r.body);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        tasks_in(&gw, OPS),
        0,
        "a non-admin's click scheduled the task"
    );
    let refused: Vec<Value> = approvals(&gw)
        .into_iter()
        .filter(|r| r["verdict"] == "refused" && r["reason"] == "not_admin")
        .collect();
    assert_eq!(refused.len(), 3, "{refused:?}");
    assert!(refused
        .iter()
        .any(|r| r["by"] == BOB && r["id"] == id.as_str()));
    // Still pending: the admin's decision is the one that counts.
    let r = click(&gw, CAROL, &id, false, OPS, &ts).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let lines = answer(&fake, OPS, &root).await;
    assert!(lines[0].contains("denied"), "{lines:?}");
    assert_eq!(tasks_in(&gw, OPS), 0);
    assert!(!approvals(&gw).iter().any(|r| r["verdict"] == "approved"));
    gw.stop().await;
}

// I6 (and P1 for interactions): unsigned, forged, altered and stale
// payloads are refused before they are read; the request stays pending and
// nothing happens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_i6_unsigned_and_forged_clicks_are_refused() {
    let (fake, gw) = start("appr-forged", "60s").await;
    let root = start_turn(&fake, &gw, OPS, BOB, &schedule("i6-forged")).await;
    let (id, ts) = request(&fake, OPS, &root).await;
    let body = click_body(CAROL, &id, true, OPS, &ts);
    // Unsigned.
    let r = post_interaction(gw.events(), &body, &[]).await;
    assert_eq!(r.status, 401, "{}", r.body);
    // Signed with another secret.
    let sig = moat_chat::slack::sign(
        &moat_creds::Secret::new("not-the-signing-secret-0000000000"),
        now_secs(),
        body.as_bytes(),
    );
    let forged = vec![
        (
            "X-Slack-Request-Timestamp".to_string(),
            now_secs().to_string(),
        ),
        ("X-Slack-Signature".to_string(), sig),
    ];
    let r = post_interaction(gw.events(), &body, &forged).await;
    assert_eq!(r.status, 401, "{}", r.body);
    // A genuine signature over Bob's deny, sent with Carol's approve.
    let bobs = click_body(BOB, &id, false, OPS, &ts);
    let r = post_interaction(gw.events(), &body, &signed_headers(&bobs, now_secs())).await;
    assert_eq!(r.status, 401, "{}", r.body);
    // Correctly signed, but ten minutes old.
    let old = now_secs() - 600;
    let r = post_interaction(gw.events(), &body, &signed_headers(&body, old)).await;
    assert_eq!(r.status, 401, "{}", r.body);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(tasks_in(&gw, OPS), 0, "a forged click scheduled the task");
    let a = approvals(&gw);
    assert!(
        a.iter().any(|r| r["verdict"] == "refused"
            && ["unsigned", "bad_signature", "stale_timestamp"]
                .contains(&r["reason"].as_str().unwrap_or(""))),
        "{a:?}"
    );
    assert!(!a.iter().any(|r| r["verdict"] == "approved"));
    // The real admin's deny still decides it.
    let r = click(&gw, CAROL, &id, false, OPS, &ts).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let lines = answer(&fake, OPS, &root).await;
    assert!(lines[0].contains("denied"), "{lines:?}");
    assert_eq!(tasks_in(&gw, OPS), 0);
    gw.stop().await;
}

// I6: a captured approval, replayed byte for byte within the signature
// window, is refused: a request is decided once, the action ran once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_i6_a_replayed_click_is_refused() {
    let (fake, gw) = start("appr-replay", "60s").await;
    let root = start_turn(
        &fake,
        &gw,
        OPS,
        CAROL,
        &calls(&[(
            "send_message",
            json!({"text": "i6-replay", "chat": GENERAL}),
        )]),
    )
    .await;
    let (id, ts) = request(&fake, OPS, &root).await;
    let body = click_body(CAROL, &id, true, OPS, &ts);
    let headers = signed_headers(&body, now_secs());
    let r = post_interaction(gw.events(), &body, &headers).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let lines = answer(&fake, OPS, &root).await;
    assert!(lines[0].starts_with("R0 OK"), "{lines:?}");
    for _ in 0..2 {
        let r = post_interaction(gw.events(), &body, &headers).await;
        assert_eq!(r.status, 409, "{}", r.body);
    }
    // A second call in a new turn is a new request: the old click does not
    // carry over.
    let root2 = start_turn(
        &fake,
        &gw,
        OPS,
        CAROL,
        &calls(&[(
            "send_message",
            json!({"text": "i6-replay-2", "chat": GENERAL}),
        )]),
    )
    .await;
    let (id2, ts2) = request(&fake, OPS, &root2).await;
    assert_ne!(id2, id);
    let r = post_interaction(gw.events(), &body, &headers).await;
    assert_eq!(r.status, 409, "{}", r.body);
    let r = click(&gw, CAROL, &id2, false, OPS, &ts2).await;
    assert_eq!(r.status, 200);
    answer(&fake, OPS, &root2).await;
    assert_eq!(posts_to(&fake, GENERAL, "i6-replay"), 1);
    assert_eq!(posts_to(&fake, GENERAL, "i6-replay-2"), 0);
    let a = approvals(&gw);
    assert_eq!(
        a.iter()
            .filter(|r| r["verdict"] == "refused" && r["reason"] == "already_decided")
            .count(),
        3
    );
    assert_eq!(a.iter().filter(|r| r["verdict"] == "approved").count(), 1);
    gw.stop().await;
}

// I6 for people: an unknown sender's first message is held while Carol is
// asked; nothing runs before she approves; then the held message runs and
// the sender is let in (stored). Another unknown sender Carol denies stays
// out, and so does one whose approval a member tried to give.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_i6_an_unknown_sender_is_let_in_only_by_an_admin() {
    let (fake, gw) = start("appr-unknown", "60s").await;
    let (cmd, out) = marked("i6dave");
    let root = start_turn(&fake, &gw, GENERAL, DAVE, &cmd).await;
    let (id, ts) = request(&fake, GENERAL, &root).await;
    // A member cannot let Dave in.
    let r = click(&gw, ALICE, &id, true, GENERAL, &ts).await;
    assert_eq!(r.status, 403, "{}", r.body);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !fake.calls().iter().any(|c| c.text().contains(&out)),
        "ran before approval"
    );
    assert!(!gw
        .gw
        .inner
        .store
        .is_admitted("slack", GENERAL, DAVE)
        .unwrap());
    // Dave's second message meanwhile asks nobody again.
    let (cmd2, out2) = marked("i6dave2");
    let root2 = start_turn(&fake, &gw, GENERAL, DAVE, &cmd2).await;
    let r = click(&gw, CAROL, &id, true, GENERAL, &ts).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // The held message runs, as Dave.
    fake.wait_post(GENERAL, &root, &out).await;
    assert!(gw
        .gw
        .inner
        .store
        .is_admitted("slack", GENERAL, DAVE)
        .unwrap());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let requests = fake
        .calls()
        .iter()
        .filter(|c| c.method == "chat.postMessage" && approval_id(c).is_some())
        .count();
    assert_eq!(requests, 1, "a second request for the same sender");
    assert!(!fake.calls().iter().any(|c| c.text().contains(&out2)));
    // Let in: his next message runs at once.
    let (cmd3, out3) = marked("i6dave3");
    let root3 = start_turn(&fake, &gw, GENERAL, DAVE, &cmd3).await;
    fake.wait_post(GENERAL, &root3, &out3).await;
    let _ = root2;

    // Erin: Carol denies; her message never runs and she stays out.
    let (cmd, out) = marked("i6erin");
    let root = start_turn(&fake, &gw, GENERAL, ERIN, &cmd).await;
    let (id, ts) = request(&fake, GENERAL, &root).await;
    let r = click(&gw, CAROL, &id, false, GENERAL, &ts).await;
    assert_eq!(r.status, 200, "{}", r.body);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!fake.calls().iter().any(|c| c.text().contains(&out)));
    assert!(!gw
        .gw
        .inner
        .store
        .is_admitted("slack", GENERAL, ERIN)
        .unwrap());
    let a = approvals(&gw);
    assert!(a
        .iter()
        .any(|r| r["verdict"] == "admitted" && r["user"] == DAVE && r["by"] == CAROL));
    assert!(a
        .iter()
        .any(|r| r["verdict"] == "refused" && r["reason"] == "not_admin" && r["by"] == ALICE));
    assert!(!a
        .iter()
        .any(|r| r["verdict"] == "admitted" && r["user"] == ERIN));
    assert!(gw
        .audit()
        .iter()
        .any(|r| r["kind"] == "message" && r["verdict"] == "held" && r["user"] == ERIN));
    gw.stop().await;
}

// I6 and incident mode: an action approved after the operator paused moat
// still does not happen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_i6_an_approval_during_incident_mode_runs_nothing() {
    let (fake, gw) = start("appr-incident", "60s").await;
    let root = start_turn(
        &fake,
        &gw,
        OPS,
        CAROL,
        &calls(&[(
            "send_message",
            json!({"text": "i6-incident", "chat": GENERAL}),
        )]),
    )
    .await;
    let (id, ts) = request(&fake, OPS, &root).await;
    gw.gw.enter_incident("test").await;
    let r = click(&gw, CAROL, &id, true, OPS, &ts).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !gw
        .audit()
        .iter()
        .any(|r| r["kind"] == "ipc" && r["op"] == "send_message" && r["reason"] == "paused")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no refused ipc record"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(posts_to(&fake, GENERAL, "i6-incident"), 0);
    gw.stop().await;
}

// ------------------------------------------------------------------ Socket Mode

/// A Socket Mode envelope of `kind` around `payload` (JSON text).
fn envelope(kind: &str, id: &str, payload: &str) -> tokio_tungstenite::tungstenite::Message {
    tokio_tungstenite::tungstenite::Message::text(format!(
        r#"{{"envelope_id":"{id}","payload":{payload},"type":"{kind}","accepts_response_payload":false,"retry_attempt":0,"retry_reason":""}}"#
    ))
}

/// Reads frames until the acknowledgement of `id`.
async fn ack_of(ws: &mut Ws, id: &str) {
    use futures_util::StreamExt;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| panic!("no ack of {id} within 10 s"))
            .expect("the socket is open")
            .unwrap();
        if let tokio_tungstenite::tungstenite::Message::Text(t) = m {
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if v["envelope_id"] == id {
                return;
            }
        }
    }
}

// I6 over Socket Mode: clicks come in `interactive` envelopes on the
// connection moat opened; a member's click is acknowledged but decides
// nothing, the admin's approval schedules the task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_i6_socket_mode_clicks_are_decided_by_an_admin_only() {
    use futures_util::SinkExt;
    let fake = FakeSlack::start().await;
    let sock = fake.socket().await;
    let data = data_dir("appr-socket");
    let gw = Running::start(&config(&fake, &data, Mode::Socket, &team("60s")), &data).await;
    let (mut ws, _) = sock.accept().await;
    ws.send(tokio_tungstenite::tungstenite::Message::text(
        json!({"type": "hello", "num_connections": 1, "connection_info": {"app_id": "A0APP001"}})
            .to_string(),
    ))
    .await
    .unwrap();
    let root = new_ts();
    let ev = fake.callback(
        &new_event_id(),
        mention(OPS, BOB, &root, None, &schedule("i6-socket")),
    );
    ws.send(envelope("events_api", "env-1", &ev)).await.unwrap();
    ack_of(&mut ws, "env-1").await;
    let (id, ts) = request(&fake, OPS, &root).await;
    let bobs = click_payload(BOB, &id, true, OPS, &ts).to_string();
    ws.send(envelope("interactive", "env-2", &bobs))
        .await
        .unwrap();
    ack_of(&mut ws, "env-2").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(tasks_in(&gw, OPS), 0, "a member's click scheduled the task");
    let carols = click_payload(CAROL, &id, true, OPS, &ts).to_string();
    ws.send(envelope("interactive", "env-3", &carols))
        .await
        .unwrap();
    ack_of(&mut ws, "env-3").await;
    let lines = answer(&fake, OPS, &root).await;
    assert!(lines[0].starts_with("R0 OK task "), "{lines:?}");
    assert_eq!(tasks_in(&gw, OPS), 1);
    // Redelivered: acknowledged, decides nothing more.
    ws.send(envelope("interactive", "env-3r", &carols))
        .await
        .unwrap();
    ack_of(&mut ws, "env-3r").await;
    let a = approvals(&gw);
    assert!(a
        .iter()
        .any(|r| r["verdict"] == "refused" && r["reason"] == "not_admin" && r["by"] == BOB));
    assert!(a
        .iter()
        .any(|r| r["verdict"] == "approved" && r["by"] == CAROL && r["source"] == "slack-socket"));
    assert!(a
        .iter()
        .any(|r| r["verdict"] == "refused" && r["reason"] == "already_decided"));
    assert_eq!(tasks_in(&gw, OPS), 1);
    drop(ws);
    gw.stop().await;
}
