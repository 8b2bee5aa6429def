//! The agent's IPC endpoint and scheduled tasks, end to end (docs/ipc.md,
//! docs/tasks.md, threat model rows I1–I5 and C4): the gateway in this
//! process on real bwrap sandboxes, the shell agent, and a fake Slack
//! (tests/slack_kit). Each turn runs python3 inside the sandbox, which
//! talks MCP to `/run/moat/ipc.sock` as Claude Code's bridge would.
//! Run as root: `cargo test -p moat-gateway --test ipc -- --test-threads=2`.

mod slack_kit;

use std::time::Duration;

use serde_json::{json, Value};
use slack_kit::*;

const ALICE: &str = "U0ALICE1";
const BOB: &str = "U0BOB002";
const CAROL: &str = "U0CAROL3";
const GENERAL: &str = "C0GENERAL";
const OPS: &str = "C0OPS0001";
const SECRET_CHAT: &str = "C0UNLISTED";

/// Alice and Bob are members of #general; Carol administers #ops, where
/// Bob is a member too.
const TEAM: &str = r#"
[pool]
size = 1

[defaults]
debounce = "50ms"

[tasks]
min_interval = "1m"
max_per_channel = 3

[[channel]]
platform = "slack"
id = "C0GENERAL"
users = ["U0ALICE1", "U0BOB002"]

[[channel]]
platform = "slack"
id = "C0OPS0001"
users = ["U0BOB002"]
admins = ["U0CAROL3"]
"#;

/// The python3 program a turn runs: one MCP session over the lease's
/// socket, the given `tools/call`s in order, one `R<i> OK|ERR text` line
/// each, then `DONE`.
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

async fn start(name: &str) -> (FakeSlack, Running) {
    let fake = FakeSlack::start().await;
    let data = data_dir(name);
    let gw = Running::start(&config(&fake, &data, Mode::Events, TEAM), &data).await;
    (fake, gw)
}

/// Sends `text` as `user` in a new thread of `channel`; the turn's answer
/// lines (`R<i> ...`).
async fn turn(
    fake: &FakeSlack,
    gw: &Running,
    channel: &str,
    user: &str,
    text: &str,
) -> Vec<String> {
    let root = new_ts();
    let id = new_event_id();
    let r = post_signed(
        gw.events(),
        &fake.callback(&id, mention(channel, user, &root, None, text)),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let post = fake.wait_post(channel, &root, "DONE").await;
    post.text()
        .lines()
        .filter(|l| l.starts_with('R'))
        .map(str::to_string)
        .collect()
}

fn ipc_records(gw: &Running, op: &str) -> Vec<Value> {
    gw.audit()
        .into_iter()
        .filter(|r| r["kind"] == "ipc" && r["op"] == op)
        .collect()
}

fn posts_to(fake: &FakeSlack, channel: &str) -> Vec<String> {
    fake.calls()
        .iter()
        .filter(|c| c.method == "chat.postMessage" && c.arg("channel") == Some(channel))
        .map(|c| c.text().to_string())
        .collect()
}

// I1: a member's sandbox cannot post to another chat, listed or not; an
// admin's can post to a listed chat only. Its own conversation works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_i1_a_member_sandbox_cannot_send_to_another_chat() {
    let (fake, gw) = start("ipc-i1").await;
    let lines = turn(
        &fake,
        &gw,
        GENERAL,
        ALICE,
        &calls(&[
            ("send_message", json!({"text": "i1-elsewhere", "chat": OPS})),
            (
                "send_message",
                json!({"text": "i1-unlisted", "chat": SECRET_CHAT}),
            ),
            ("send_message", json!({"text": "i1-own"})),
        ]),
    )
    .await;
    assert!(
        lines[0].starts_with("R0 ERR") && lines[0].contains("admin"),
        "{lines:?}"
    );
    assert!(lines[1].starts_with("R1 ERR"), "{lines:?}");
    assert!(lines[2].starts_with("R2 OK"), "{lines:?}");
    // Nothing reached the other chats; the own message did.
    assert!(posts_to(&fake, OPS).is_empty());
    assert!(posts_to(&fake, SECRET_CHAT).is_empty());
    assert!(posts_to(&fake, GENERAL)
        .iter()
        .any(|p| p.contains("i1-own")));
    let rec = ipc_records(&gw, "send_message");
    assert_eq!(rec.iter().filter(|r| r["verdict"] == "refused").count(), 2);
    assert!(rec
        .iter()
        .all(|r| r["user"] == ALICE && r["trust"] == "member"));
    // No message text in the audit.
    assert!(!std::fs::read_to_string(gw.audit_path())
        .unwrap()
        .contains("i1-elsewhere"));

    // Carol (admin of #ops) may post to #general (listed), never to an
    // unlisted chat.
    let lines = turn(
        &fake,
        &gw,
        OPS,
        CAROL,
        &calls(&[
            ("send_message", json!({"text": "i1-admin", "chat": GENERAL})),
            (
                "send_message",
                json!({"text": "i1-admin-unlisted", "chat": SECRET_CHAT}),
            ),
        ]),
    )
    .await;
    assert!(lines[0].starts_with("R0 OK"), "{lines:?}");
    assert!(
        lines[1].starts_with("R1 ERR") && lines[1].contains("not a channel"),
        "{lines:?}"
    );
    assert!(posts_to(&fake, GENERAL)
        .iter()
        .any(|p| p.contains("i1-admin")));
    assert!(posts_to(&fake, SECRET_CHAT).is_empty());
    gw.stop().await;
}

// I2: a member schedules in its own channel only, cannot pause or cancel
// another channel's task (it is "not found" to it), and lists only its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_i2_other_groups_tasks_are_out_of_reach() {
    let (fake, gw) = start("ipc-i2").await;
    // Carol's task in #ops.
    let lines = turn(
        &fake,
        &gw,
        OPS,
        CAROL,
        &calls(&[(
            "schedule_task",
            json!({"prompt": "echo ops-report", "schedule_type": "cron", "schedule_value": "0 8 * * 1-5"}),
        )]),
    )
    .await;
    assert!(lines[0].starts_with("R0 OK task "), "{lines:?}");
    let ops_task: i64 = lines[0]["R0 OK task ".len()..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let lines = turn(
        &fake,
        &gw,
        GENERAL,
        ALICE,
        &calls(&[
            (
                "schedule_task",
                json!({"prompt": "echo x", "schedule_type": "interval", "schedule_value": "1h", "chat": OPS}),
            ),
            ("pause_task", json!({"task_id": ops_task})),
            ("cancel_task", json!({"task_id": ops_task})),
            (
                "schedule_task",
                json!({"prompt": "echo mine", "schedule_type": "interval", "schedule_value": "1h"}),
            ),
            ("list_tasks", json!({})),
            // Bad input: refused with the reason.
            (
                "schedule_task",
                json!({"prompt": "x", "schedule_type": "cron", "schedule_value": "61 * * * *"}),
            ),
            (
                "schedule_task",
                json!({"prompt": "x", "schedule_type": "interval", "schedule_value": "10s"}),
            ),
        ]),
    )
    .await;
    assert!(
        lines[0].starts_with("R0 ERR") && lines[0].contains("admin"),
        "{lines:?}"
    );
    assert!(
        lines[1].starts_with("R1 ERR") && lines[1].contains("no task"),
        "{lines:?}"
    );
    assert!(
        lines[2].starts_with("R2 ERR") && lines[2].contains("no task"),
        "{lines:?}"
    );
    assert!(lines[3].starts_with("R3 OK"), "{lines:?}");
    assert!(
        lines[4].contains("echo mine") && !lines[4].contains("ops-report"),
        "{lines:?}"
    );
    assert!(lines[5].contains("minute field"), "{lines:?}");
    assert!(lines[6].contains("tasks.min_interval"), "{lines:?}");
    // Carol's task is untouched; #ops got no task of Alice's.
    let t = gw.gw.inner.store.task(ops_task).unwrap().unwrap();
    assert_eq!(t.state, moat_store::TaskState::Active);
    let ops = gw.gw.inner.store.tasks_of_channel("slack", OPS).unwrap();
    assert_eq!(ops.len(), 1);
    assert_eq!(ops[0].creator, CAROL);
    // A person's `tasks` in #general lists only #general's.
    let root = new_ts();
    let r = post_signed(
        gw.events(),
        &fake.callback(&new_event_id(), mention(GENERAL, BOB, &root, None, "tasks")),
    )
    .await;
    assert_eq!(r.status, 200);
    let p = fake.wait_post(GENERAL, &root, "echo mine").await;
    assert!(!p.text().contains("ops-report"));
    // And `cancel N` of #ops's task from #general is refused.
    let root = new_ts();
    post_signed(
        gw.events(),
        &fake.callback(
            &new_event_id(),
            mention(GENERAL, BOB, &root, None, &format!("cancel {ops_task}")),
        ),
    )
    .await;
    fake.wait_post(GENERAL, &root, "no task").await;
    assert_eq!(
        gw.gw.inner.store.task(ops_task).unwrap().unwrap().state,
        moat_store::TaskState::Active
    );
    gw.stop().await;
}

// I3 (and C4 for IPC): identity fields in a request change nothing: the
// lease's turn is the caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_i3_identity_fields_in_requests_are_ignored() {
    let (fake, gw) = start("ipc-i3").await;
    let forged = json!({
        "text": "i3-forged", "chat": OPS,
        "user": CAROL, "trust": "admin", "conversation_id": 1,
        "platform": "slack", "channel": OPS, "_meta": {"user": CAROL},
    });
    let mut sched = json!({"prompt": "echo forged", "schedule_type": "interval", "schedule_value": "1h",
        "creator": CAROL, "user": CAROL, "trust": "admin", "channel": OPS});
    let lines = turn(
        &fake,
        &gw,
        GENERAL,
        BOB,
        &calls(&[("send_message", forged), ("schedule_task", sched.take())]),
    )
    .await;
    assert!(lines[0].starts_with("R0 ERR"), "{lines:?}");
    assert!(lines[1].starts_with("R1 OK"), "{lines:?}");
    assert!(posts_to(&fake, OPS).is_empty());
    // The task is Bob's, in #general.
    let all = gw.gw.inner.store.live_tasks().unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(
        (all[0].creator.as_str(), all[0].channel.as_str()),
        (BOB, GENERAL)
    );
    let rec = ipc_records(&gw, "send_message");
    assert_eq!(rec[0]["user"], BOB);
    assert_eq!(rec[0]["trust"], "member");
    gw.stop().await;
}

// C4: the same for the conversation: a call can only ever speak for the
// conversation whose turn holds the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_c4_ipc_calls_speak_for_the_lease_holder_only() {
    let (fake, gw) = start("ipc-c4").await;
    let lines = turn(
        &fake,
        &gw,
        GENERAL,
        ALICE,
        &calls(&[(
            "send_message",
            json!({"text": "c4-mine", "conversation_id": 999, "thread": "1.000"}),
        )]),
    )
    .await;
    assert!(lines[0].starts_with("R0 OK"), "{lines:?}");
    let own = ipc_records(&gw, "send_message");
    let conv = own[0]["conversation_id"].as_i64().unwrap();
    assert_ne!(conv, 999);
    // Posted in Alice's thread, nowhere else.
    let p: Vec<_> = fake
        .calls()
        .into_iter()
        .filter(|c| c.method == "chat.postMessage" && c.text().contains("c4-mine"))
        .collect();
    assert_eq!(p.len(), 1);
    assert_ne!(p[0].arg("thread_ts"), Some("1.000"));
    gw.stop().await;
}

// I4: a malformed frame and an oversized one get an error and a closed
// connection; the turn goes on (later calls on a new connection work), and
// a flood is rate-limited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_i4_bad_frames_and_floods_are_contained() {
    let (fake, gw) = start("ipc-i4").await;
    let program = [
        "import socket,json",
        "def conn():",
        "  s=socket.socket(socket.AF_UNIX); s.connect(\"/run/moat/ipc.sock\"); return s",
        "s=conn(); s.sendall(b\"{not json\"+bytes([10])); f=s.makefile(\"rb\")",
        "print(\"R0\", json.loads(f.readline())[\"error\"][\"code\"], repr(f.readline()))",
        "s=conn(); s.sendall(b\"x\"*(1024*1024+10)); f=s.makefile(\"rb\")",
        "print(\"R1\", json.loads(f.readline())[\"error\"][\"code\"], repr(f.readline()))",
        "s=conn(); f=s.makefile(\"rwb\")",
        "limited=0",
        "for i in range(200):",
        "  f.write((json.dumps(dict(jsonrpc=\"2.0\",id=i,method=\"tools/call\",params=dict(name=\"list_tasks\",arguments=dict())))+chr(10)).encode()); f.flush()",
        "  r=json.loads(f.readline())",
        "  limited+=1 if \"error\" in r and r[\"error\"][\"code\"]==-32029 else 0",
        "print(\"R2 limited\", limited)",
        "print(\"DONE\")",
    ]
    .join("\n");
    let script = format!("python3 -c '{program}'");
    let lines = turn(&fake, &gw, GENERAL, ALICE, &script).await;
    assert_eq!(lines[0], "R0 -32700 b''", "{lines:?}");
    assert_eq!(lines[1], "R1 -32600 b''", "{lines:?}");
    let limited: u32 = lines[2]["R2 limited ".len()..].trim().parse().unwrap();
    assert!(limited > 0, "{lines:?}");
    let audit = gw.audit();
    assert_eq!(
        audit
            .iter()
            .filter(|r| r["kind"] == "ipc" && r["verdict"] == "bad_frame")
            .count(),
        2
    );
    assert!(audit
        .iter()
        .any(|r| r["kind"] == "ipc" && r["verdict"] == "rate_limited"));
    // The gateway goes on: the next turn's calls work.
    let lines = turn(
        &fake,
        &gw,
        GENERAL,
        BOB,
        &calls(&[("list_tasks", json!({}))]),
    )
    .await;
    assert!(lines[0].starts_with("R0 OK"), "{lines:?}");
    gw.stop().await;
}

fn runs(gw: &Running, task: i64) -> Vec<moat_store::TaskRun> {
    gw.gw.inner.store.task_runs(task, 10).unwrap()
}

// I5: tasks live in the store: one due while the gateway was down runs once
// at the next start, as its creator, under the configuration of that
// start; a creator removed from the channel meanwhile stops their task
// instead of running it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_i5_tasks_survive_a_restart_and_are_reauthorized_at_run_time() {
    let fake = FakeSlack::start().await;
    let data = data_dir("ipc-i5");
    let tag = new_ts().replace('.', "");
    // What a gateway leaves in the store when it stops with two tasks
    // scheduled (as schedule_task stores them, attack_i2/i3), both due
    // 4 s later, while it is down.
    let due = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        + 4000;
    let (alice_task, bob_task) = {
        let store = moat_store::Store::open(data.join("moat.db")).unwrap();
        let task = |who: &str, creator: &str| moat_store::NewTask {
            platform: "slack".into(),
            channel: GENERAL.into(),
            thread: String::new(),
            creator: creator.into(),
            prompt: format!("echo i5-{who}-{tag}"),
            kind: "once".into(),
            spec: moat_policy::tasks::format_utc(due),
            context: "isolated".into(),
            next_run_ms: due,
            created_ms: due - 60_000,
        };
        (
            store.insert_task(&task("alice", ALICE)).unwrap(),
            store.insert_task(&task("bob", BOB)).unwrap(),
        )
    };
    // Down while the tasks come due; Bob leaves #general meanwhile.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let without_bob = TEAM.replacen(
        r#"users = ["U0ALICE1", "U0BOB002"]"#,
        r#"users = ["U0ALICE1"]"#,
        1,
    );
    assert_ne!(without_bob, TEAM);
    let gw = Running::start(&config(&fake, &data, Mode::Events, &without_bob), &data).await;
    // Alice's missed run runs once, at the channel's top level, as Alice.
    let post = fake
        .wait_for("Alice's task run", Duration::from_secs(60), |calls| {
            calls
                .iter()
                .find(|c| {
                    c.method == "chat.postMessage"
                        && c.arg("channel") == Some(GENERAL)
                        && c.text().contains(&format!("i5-alice-{tag}"))
                        && !c.text().contains("schedule_task")
                })
                .cloned()
        })
        .await;
    assert_eq!(post.arg("thread_ts"), None);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while gw.gw.inner.store.task(bob_task).unwrap().unwrap().state != moat_store::TaskState::Stopped
    {
        assert!(
            std::time::Instant::now() < deadline,
            "Bob's task was not stopped"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let alice = gw.gw.inner.store.task(alice_task).unwrap().unwrap();
    assert_eq!(alice.state, moat_store::TaskState::Done);
    let r = runs(&gw, alice_task);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].outcome, "started");
    let r = runs(&gw, bob_task);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].outcome, "refused");
    assert!(r[0]
        .detail
        .as_deref()
        .unwrap_or("")
        .contains("not in the users"));
    // Bob's prompt never ran: no post carries its output.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!fake.calls().iter().any(|c| c.method == "chat.postMessage"
        && c.text().contains(&format!("i5-bob-{tag}"))
        && !c.text().contains("schedule_task")));
    // The run was a turn of Alice's: the stored message is hers.
    let audit = gw.audit();
    assert!(audit.iter().any(|r| r["kind"] == "message"
        && r["verdict"] == "accepted"
        && r["user"] == ALICE
        && r["event_id"]
            .as_str()
            .unwrap_or("")
            .starts_with("moat-task:")));
    gw.stop().await;
}
