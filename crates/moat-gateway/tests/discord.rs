//! Discord end to end: the gateway (in this process, real bwrap sandboxes,
//! the shell agent) against the fake Discord of `discord_fake` (Gateway
//! WebSocket and REST, from the public API documentation).
//!
//! Run as root: `cargo test -p moat-gateway --test discord`.

mod discord_fake;
mod gwkit;

use std::time::Duration;

use discord_fake::*;
use gwkit::*;
use serde_json::{json, Value};

const ALICE: &str = "4242";
const MALLORY: &str = "666";

fn config(fake: &FakeDiscord, extra: &str) -> String {
    format!(
        r#"
[web]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"

[discord]
enabled = true
api_url = "http://{}/api/v10"
gateway_url = "ws://{}"

[pool]
size = 1

[defaults]
debounce = "0s"

[[channel]]
platform = "discord"
id = "{CHANNEL}"
users = ["{ALICE}"]

[[channel]]
platform = "discord"
id = "dm"
users = ["{ALICE}"]
{extra}
"#,
        fake.rest, fake.gateway
    )
}

fn secrets() -> Vec<(String, String)> {
    vec![("DISCORD_BOT_TOKEN".into(), TOKEN.into())]
}

fn mention(text: &str) -> String {
    format!("<@{BOT_ID}> {text}")
}

fn reactions(calls: &[Call], msg: &str, method: &str, emoji: &str) -> usize {
    calls
        .iter()
        .filter(|c| {
            c.method == method
                && c.path.contains(&format!("/messages/{msg}/reactions"))
                && c.body["emoji"] == json!(emoji)
        })
        .count()
}

/// Every message moat posted: no mention parsed, within 2,000 characters.
fn assert_all_posts_safe(fake: &FakeDiscord) {
    for c in fake.calls() {
        if c.method == "POST" && c.path.ends_with("/messages") {
            assert_eq!(
                c.body["allowed_mentions"]["parse"],
                json!([]),
                "a message that may mention: {}",
                c.body
            );
            if let Some(t) = c.body["content"].as_str() {
                let n = t.encode_utf16().count();
                assert!(n <= 2000, "{n} UTF-16 units");
            }
        }
    }
}

#[test]
fn a_dm_a_thread_and_a_channel_mention_are_answered_with_reactions_retries_and_chunks() {
    let fake = FakeDiscord::start();
    // The first answer meets a 429: retried after retry_after, once.
    fake.state.lock().unwrap().throttle = 1;
    let gw = Gw::start_with("dc-e2e", &config(&fake, ""), secrets());
    fake.wait_ready();
    assert_eq!(
        fake.gw.lock().unwrap().identifies[0],
        1 | (1 << 9) | (1 << 12) | (1 << 15),
        "GUILDS | GUILD_MESSAGES | DIRECT_MESSAGES | MESSAGE_CONTENT"
    );

    // A direct message.
    let dm = message(DM, true, ALICE, "echo dc-$((6*7))", false);
    let dm_id = dm["id"].as_str().unwrap().to_string();
    fake.dispatch("MESSAGE_CREATE", dm);
    let calls = fake.wait("the DM's ✅", |c| reactions(c, &dm_id, "PUT", "✅") == 1);
    let answers = fake.posted_with("dc-42");
    assert_eq!(answers.len(), 1, "answered once despite the 429");
    assert!(answers[0].path.contains(DM));
    assert!(
        calls.iter().any(|c| c.status == 429),
        "the 429 happened: {:?}",
        calls.iter().map(|c| c.status).collect::<Vec<_>>()
    );
    let pos = |f: &dyn Fn(&Call) -> bool| calls.iter().position(f).unwrap();
    let eyes = pos(&|c| c.method == "PUT" && c.body["emoji"] == json!("👀"));
    let typing = pos(&|c| c.path == format!("/channels/{DM}/typing"));
    let answer = pos(&|c| {
        c.status == 200
            && c.body["content"]
                .as_str()
                .is_some_and(|t| t.contains("dc-42"))
    });
    assert!(eyes < answer && typing < answer);
    assert_eq!(reactions(&calls, &dm_id, "DELETE", "👀"), 1);

    // A mention in a thread GUILD_CREATE announced: answered in the thread.
    fake.dispatch(
        "MESSAGE_CREATE",
        message(THREAD, false, ALICE, &mention("echo thread-ok"), true),
    );
    fake.wait("the thread's answer", |_| {
        !fake.posted_with("thread-ok").is_empty()
    });
    assert!(fake.posted_with("thread-ok")[0].path.contains(THREAD));
    // A thread moat looks up with GET /channels/{id}.
    fake.dispatch(
        "MESSAGE_CREATE",
        message(THREAD2, false, ALICE, &mention("echo thread2-ok"), true),
    );
    fake.wait("the second thread's answer", |_| {
        !fake.posted_with("thread2-ok").is_empty()
    });
    assert!(fake.posted_with("thread2-ok")[0].path.contains(THREAD2));
    // (Unknown, THREAD2 would be a channel of its own: refused, unanswered.)

    // A mention in the channel: answered there, replying to it. Discord
    // posts the answer but the answer to moat is a 500: the retry carries
    // the same enforced nonce, so the message is not posted twice.
    fake.state.lock().unwrap().fail_after_create = 1;
    let m = message(CHANNEL, false, ALICE, &mention("echo chan-ok"), true);
    let m_id = m["id"].as_str().unwrap().to_string();
    fake.dispatch("MESSAGE_CREATE", m);
    fake.wait("the channel's answer", |_| {
        !fake.posted_with("chan-ok").is_empty()
    });
    fake.wait("the retry after the 500", |c| {
        c.iter().any(|c| c.status == 201)
    });
    assert_eq!(fake.posted_with("chan-ok").len(), 1, "posted twice");
    let a = &fake.posted_with("chan-ok")[0];
    assert!(a.path.contains(CHANNEL));
    assert_eq!(a.body["message_reference"]["message_id"], json!(m_id));

    // A long answer: several messages of at most 2,000 characters, code
    // blocks balanced, the channel's rate-limit bucket never overrun.
    let before = fake.posted(DM).len();
    fake.dispatch(
        "MESSAGE_CREATE",
        message(DM, true, ALICE, "seq 1 3000", false),
    );
    fake.wait("the long answer's end", |_| {
        !fake.posted_with("\n3000").is_empty()
    });
    let long: Vec<Call> = fake.posted(DM).into_iter().skip(before).collect();
    assert!(long.len() >= 6, "{} messages", long.len());
    for c in &long {
        let t = c.body["content"].as_str().unwrap();
        assert!(t.encode_utf16().count() <= 2000);
        assert_eq!(t.matches("```").count() % 2, 0, "{t}");
    }
    assert_eq!(
        fake.state.lock().unwrap().violations,
        0,
        "a call went out while its bucket was empty"
    );

    // moat's own command: `status` in a thread, a notice in italics.
    fake.dispatch(
        "MESSAGE_CREATE",
        message(THREAD, false, ALICE, &mention("status"), true),
    );
    fake.wait("the status notice", |_| {
        !fake.posted_with("Messages waiting: 0.").is_empty()
    });
    let n = &fake.posted_with("Messages waiting: 0.")[0];
    assert!(n.path.contains(THREAD));
    assert_eq!(
        n.body["content"],
        json!("*Sandbox: idle. Messages waiting: 0.*")
    );

    // Stickers: told once what moat reads, not run.
    for _ in 0..2 {
        let mut s = message(DM, true, ALICE, "", false);
        s["sticker_items"] = json!([{"id": "1", "name": "wave", "format_type": 1}]);
        fake.dispatch("MESSAGE_CREATE", s);
    }
    fake.wait("the unsupported notice", |_| {
        !fake.posted_with("only read text and files").is_empty()
    });
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(fake.posted_with("only read text and files").len(), 1);
    assert_all_posts_safe(&fake);
    gw.stop();
    // Shutting down ends the session (1000).
    fake.wait_gw("the closing frame", |s| s.closes.contains(&1000));
}

/// Heartbeats at HELLO's interval carry the last sequence; a dropped socket
/// is resumed (what was sent meanwhile replayed, nothing answered twice),
/// op 7 resumes, a missing heartbeat ACK resumes, op 9 (not resumable)
/// identifies afresh.
#[test]
fn the_gateway_heartbeats_resumes_and_reconnects_without_losing_or_repeating_a_message() {
    let fake = FakeDiscord::start();
    let gw = Gw::start_with("dc-resume", &config(&fake, ""), secrets());
    fake.wait_ready();
    let first = fake.dispatch(
        "MESSAGE_CREATE",
        message(DM, true, ALICE, "echo before-$((1+1))", false),
    );
    fake.wait("the first answer", |_| {
        !fake.posted_with("before-2").is_empty()
    });
    fake.wait_gw("heartbeats", |s| s.heartbeats.len() >= 3);
    // A heartbeat carries the last sequence handled.
    fake.wait_gw("a beat with the message's seq", |s| {
        s.heartbeats
            .iter()
            .any(|h| h.as_u64().is_some_and(|q| q >= first))
    });

    // The socket drops; a message sent meanwhile arrives by the replay.
    let seqs = fake.drop_socket_then(vec![(
        "MESSAGE_CREATE",
        message(DM, true, ALICE, "echo during-$((2+2))", false),
    )]);
    fake.wait("the missed message's answer", |_| {
        !fake.posted_with("during-4").is_empty()
    });
    {
        let s = fake.gw.lock().unwrap();
        assert_eq!(s.identifies.len(), 1, "resumed, not identified again");
        assert_eq!(s.resumes.len(), 1);
        assert!(
            s.resumes[0] >= first && s.resumes[0] < seqs[0],
            "{:?}",
            s.resumes
        );
    }

    // op 7: reconnect and resume.
    fake.send_op(json!({"op": 7, "d": null}));
    fake.wait_gw("a resume after op 7", |s| s.resumes.len() == 2);
    fake.dispatch(
        "MESSAGE_CREATE",
        message(DM, true, ALICE, "echo after7-ok", false),
    );
    fake.wait("the answer after op 7", |_| {
        !fake.posted_with("after7-ok").is_empty()
    });

    // Heartbeats not acknowledged: a zombie connection, resumed.
    fake.gw.lock().unwrap().no_ack = true;
    fake.wait_gw("a resume after a missing ACK", |s| s.resumes.len() == 3);
    fake.gw.lock().unwrap().no_ack = false;
    assert!(
        fake.gw
            .lock()
            .unwrap()
            .closes
            .iter()
            .all(|c| *c != 1000 && *c != 1001),
        "a resumable close must not end the session"
    );

    // op 9, not resumable: a fresh IDENTIFY after 1-5 s.
    fake.send_op(json!({"op": 9, "d": false}));
    fake.wait_gw("a second IDENTIFY", |s| s.identifies.len() == 2);
    fake.dispatch(
        "MESSAGE_CREATE",
        message(DM, true, ALICE, "echo after9-ok", false),
    );
    fake.wait("the answer after op 9", |_| {
        !fake.posted_with("after9-ok").is_empty()
    });

    // The same message delivered twice (Discord may): answered once.
    let again = message(DM, true, ALICE, "echo twice-$((3*3))", false);
    fake.dispatch("MESSAGE_CREATE", again.clone());
    fake.dispatch("MESSAGE_CREATE", again);
    fake.wait("the answer", |_| !fake.posted_with("twice-9").is_empty());
    std::thread::sleep(Duration::from_millis(800));
    for needle in ["before-2", "during-4", "after7-ok", "after9-ok", "twice-9"] {
        assert_eq!(fake.posted_with(needle).len(), 1, "{needle} answered once");
    }
    gw.stop();
}

/// A user not in the channel's users, and a mention in a guild channel no
/// `[[channel]]` names: stored as refused, audited, not answered, not run.
/// Chatter in that channel (no mention) is not even stored.
#[test]
fn unauthorized_users_and_other_channels_are_refused_and_audited() {
    let fake = FakeDiscord::start();
    let gw = Gw::start_with("dc-auth", &config(&fake, ""), secrets());
    fake.wait_ready();
    let marker = fresh_dir("dc-auth-marker").join("ran");
    let cmd = format!("touch {} ; echo refused-ran", marker.display());
    fake.dispatch("MESSAGE_CREATE", message(DM, true, MALLORY, &cmd, false));
    fake.dispatch(
        "MESSAGE_CREATE",
        message(OTHER, false, ALICE, &mention(&cmd), true),
    );
    fake.dispatch(
        "MESSAGE_CREATE",
        message(OTHER, false, ALICE, "just chatting", false),
    );
    let recs = gw.wait_audit("two refusals", |r| {
        r.iter()
            .filter(|r| r["kind"] == "message" && r["verdict"] == "unauthorized")
            .count()
            == 2
    });
    let refused: Vec<&Value> = recs
        .iter()
        .filter(|r| r["kind"] == "message" && r["verdict"] == "unauthorized")
        .collect();
    assert!(refused
        .iter()
        .any(|r| r["user"] == MALLORY && r["channel"] == "dm"));
    assert!(refused
        .iter()
        .any(|r| r["user"] == ALICE && r["channel"] == OTHER));
    assert!(refused.iter().all(|r| r["platform"] == "discord"));
    // Alice's DM still works, and nothing of the refused ones ran.
    fake.dispatch(
        "MESSAGE_CREATE",
        message(DM, true, ALICE, "echo allowed-ok", false),
    );
    fake.wait("Alice's answer", |_| {
        !fake.posted_with("allowed-ok").is_empty()
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(fake.posted_with("refused-ran").is_empty());
    assert!(!marker.exists(), "a refused message ran");
    let stored = gw.audit_kind("message");
    assert!(
        stored
            .iter()
            .all(|r| r["channel"] != OTHER || r["verdict"] == "unauthorized"),
        "chatter in an unserved channel was stored: {stored:?}"
    );
    assert_eq!(stored.iter().filter(|r| r["channel"] == OTHER).count(), 1);
    gw.stop();
}

/// P2 for Discord: Telegram user 4242 (a channel's own id and `telegram:`
/// in a group) is nobody on Discord, even with the same digits.
#[test]
fn attack_p2_a_telegram_user_id_is_never_a_discord_user() {
    let fake = FakeDiscord::start();
    let extra = r#"
[[group]]
name = "team"
users = ["telegram:5151"]

[[channel]]
platform = "telegram"
id = "*"
users = ["7777", "@team"]

[[channel]]
platform = "discord"
id = "555555555555555555"
users = ["@team"]
"#;
    // The Telegram channel needs no Telegram connection for this test.
    let gw = Gw::start_with("dc-p2", &config(&fake, extra), secrets());
    fake.wait_ready();
    let marker = fresh_dir("dc-p2-marker").join("ran");
    let cmd = format!("touch {} ; echo p2-ran", marker.display());
    for user in ["7777", "5151", "telegram:5151"] {
        fake.dispatch("MESSAGE_CREATE", message(DM, true, user, &cmd, false));
    }
    // Only two: "telegram:5151" is not even a Discord user id (not parsed).
    gw.wait_audit("the refusals", |r| {
        r.iter()
            .filter(|r| r["kind"] == "message" && r["verdict"] == "unauthorized")
            .count()
            == 2
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(fake.posted_with("p2-ran").is_empty());
    assert!(!marker.exists(), "a Telegram id ran a command on Discord");
    let accepted: Vec<Value> = gw
        .audit_kind("message")
        .into_iter()
        .filter(|r| r["verdict"] == "accepted")
        .collect();
    assert!(accepted.is_empty(), "{accepted:?}");
    gw.stop();
}

/// P3 for Discord: an answer that tries `@everyone`, user and role mentions
/// and a masked link notifies nobody (every message carries
/// `allowed_mentions.parse = []`) and shows no live mention or hidden link.
#[test]
fn attack_p3_discord_answers_cannot_ping_anyone_or_hide_a_link() {
    let fake = FakeDiscord::start();
    let gw = Gw::start_with("dc-p3", &config(&fake, ""), secrets());
    fake.wait_ready();
    // The shell agent's output is fenced (Discord renders no mention in
    // code); outside code the formatter breaks them
    // (`attack_p3_discord_answers_mention_nobody_and_show_link_targets`).
    // Here: what moat posts may mention nobody at all.
    let evil =
        "printf '%s\\n' 'MARK @everyone @here <@4242> <@&77> [moat: done](https://evil.example/x)'";
    fake.dispatch(
        "MESSAGE_CREATE",
        message(CHANNEL, false, ALICE, &mention(evil), true),
    );
    fake.wait("the answer", |_| !fake.posted_with("MARK").is_empty());
    let a = &fake.posted_with("MARK")[0];
    assert_eq!(
        a.body["allowed_mentions"],
        json!({"parse": [], "replied_user": false})
    );
    assert_all_posts_safe(&fake);
    gw.stop();
}

/// Every file under `dir` whose bytes contain `needle`.
fn files_containing(dir: &std::path::Path, needle: &str) -> Vec<String> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(meta) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if meta.is_dir() {
                stack.push(p);
            } else if meta.is_file() {
                if let Ok(b) = std::fs::read(&p) {
                    if b.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                        hits.push(p.display().to_string());
                    }
                }
            }
        }
    }
    hits
}

/// The bot token is in moat's memory only: not in the sandbox's
/// environment or files, not in the store or the audit log.
#[test]
fn the_bot_token_never_reaches_the_sandbox_the_store_or_the_log() {
    let fake = FakeDiscord::start();
    let gw = Gw::start_with("dc-token-scope", &config(&fake, ""), secrets());
    fake.wait_ready();
    let probe = "env; cat /proc/1/environ 2>/dev/null | tr '\\0' '\\n'; \
                 grep -rls 'test-discord-bot''-token' /home /tmp /etc /run /var 2>/dev/null | head -5; echo probe-done";
    fake.dispatch("MESSAGE_CREATE", message(DM, true, ALICE, probe, false));
    fake.wait("the probe's answer", |_| {
        !fake.posted_with("probe-done").is_empty()
    });
    let out: String = fake
        .posted(DM)
        .iter()
        .map(|c| c.body["content"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(
        out.contains("probe-done") && out.contains("PATH="),
        "the probe ran: {out}"
    );
    assert!(
        !out.contains(TOKEN) && !out.contains("test-discord-bot-token"),
        "{out}"
    );
    assert!(!out.contains("DISCORD_BOT_TOKEN"), "{out}");
    let data = gw.data.clone();
    gw.stop();
    let hits = files_containing(&data, "test-discord-bot-token");
    assert!(hits.is_empty(), "the token is in {hits:?}");
}

/// The outbox on Discord: a gateway that stopped while posting a kept
/// answer (its first message had reached Discord) delivers it again at the
/// next start with the same per-turn nonces, so Discord hands back the
/// message it already has and only the missing one is posted; the message
/// is not run again.
#[test]
fn a_kept_answer_is_redelivered_after_a_crash_without_a_second_message() {
    let fake = FakeDiscord::start();
    let data = fresh_dir("dc-outbox").join("data");
    std::fs::create_dir_all(&data).unwrap();
    let msg_id = snowflake();
    let answer = format!("first-half {}second-half-77", "lorem ".repeat(400));
    let turn = {
        let store = moat_store::Store::open(data.join("moat.db")).unwrap();
        let (message_id, conversation_id) = match store
            .insert_message(&moat_store::IncomingMessage {
                platform: "discord".into(),
                event_id: format!("discord:{msg_id}"),
                channel: "dm".into(),
                thread: DM.into(),
                user: ALICE.into(),
                text: "echo never-run-$((6*7))".into(),
                ts_ms: 1,
                message_ref: Some(msg_id.clone()),
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
    // The first message reached Discord before the crash.
    fake.state
        .lock()
        .unwrap()
        .nonces
        .insert(format!("t{turn}m0"), snowflake());
    let gw = Gw::try_start_in(data.clone(), &config(&fake, ""), secrets()).unwrap();
    fake.wait("the ✅", |c| reactions(c, &msg_id, "PUT", "✅") == 1);
    assert_eq!(fake.posted_with("second-half-77").len(), 1);
    assert!(
        fake.posted_with("first-half").is_empty(),
        "the first message was posted twice"
    );
    assert!(fake.calls().iter().any(|c| c.status == 201
        && c.body["content"]
            .as_str()
            .is_some_and(|t| t.starts_with("first-half"))));
    std::thread::sleep(Duration::from_millis(300));
    assert!(fake.posted_with("never-run-42").is_empty(), "run again");
    let data_dir = gw.data.clone();
    gw.stop();
    let store = moat_store::Store::open(data_dir.join("moat.db")).unwrap();
    assert!(store.undelivered_answers().unwrap().is_empty());
    assert!(store.turn(turn + 1).unwrap().is_none(), "no second turn");
}

#[test]
fn artifacts_are_uploaded_as_attachments() {
    let fake = FakeDiscord::start();
    let gw = Gw::start_with("dc-art", &config(&fake, ""), secrets());
    fake.wait_ready();
    fake.dispatch(
        "MESSAGE_CREATE",
        message(
            DM,
            true,
            ALICE,
            "mkdir -p ~/artifacts && echo report-body > ~/artifacts/report.txt && echo made",
            false,
        ),
    );
    let calls = fake.wait("the upload", |c| {
        c.iter().any(|c| c.raw.windows(8).any(|w| w == b"files[0]"))
    });
    let up = calls
        .iter()
        .find(|c| c.raw.windows(8).any(|w| w == b"files[0]"))
        .unwrap();
    assert!(up.path.contains(DM));
    let raw = String::from_utf8_lossy(&up.raw);
    assert!(raw.contains("filename=\"report.txt\""), "{raw}");
    assert!(raw.contains("report-body"));
    assert_eq!(up.body["attachments"][0]["filename"], json!("report.txt"));
    assert_eq!(up.body["allowed_mentions"]["parse"], json!([]));
    gw.stop();
}

/// A wrong token stops moat at start with Discord's reason, and the token
/// is not in the error.
#[test]
fn a_refused_token_stops_moat_at_start_without_showing_it() {
    let fake = FakeDiscord::start();
    let wrong = "MTEx.wrong-token-do-not-print";
    let r = Gw::try_start_with(
        "dc-token",
        &config(&fake, ""),
        vec![("DISCORD_BOT_TOKEN".into(), wrong.into())],
    );
    let Err(e) = r else {
        panic!("moat started with a wrong token")
    };
    assert!(e.contains("DISCORD_BOT_TOKEN") && e.contains("401"), "{e}");
    assert!(!e.contains(wrong), "{e}");
}

/// A shell command that calls moat's IPC tool `tool` from inside the
/// sandbox and prints `R0 OK|ERR <text>`.
fn ipc_call(tool: &str, args: &Value) -> String {
    let arg = json!([tool, args]).to_string();
    assert!(!arg.contains('\''));
    let program = [
        "import socket,json,sys",
        "s=socket.socket(socket.AF_UNIX); s.connect(\"/run/moat/ipc.sock\"); f=s.makefile(\"rw\")",
        "def rpc(i,m,p):",
        "  f.write(json.dumps(dict(jsonrpc=\"2.0\",id=i,method=m,params=p))+chr(10)); f.flush()",
        "  return json.loads(f.readline())",
        "rpc(0,\"initialize\",dict(protocolVersion=\"2025-06-18\",capabilities=dict(),clientInfo=dict(name=\"t\",version=\"0\")))",
        "n,a=json.loads(sys.argv[1])",
        "r=rpc(1,\"tools/call\",dict(name=n,arguments=a))[\"result\"]",
        "print(\"R0\", \"ERR\" if r[\"isError\"] else \"OK\", r[\"content\"][0][\"text\"])",
    ]
    .join("\n");
    format!("python3 -c '{program}' '{arg}'")
}

/// I6 on Discord: Bob's schedule_task waits for an admin; the request is a
/// message with Approve/Deny buttons. Bob's own click is refused (only he
/// sees why) and nothing is stored; Alice's click approves it, the request
/// message is edited with the decision and its buttons taken off; her
/// click again is refused as decided.
#[test]
fn attack_i6_discord_approvals_are_decided_by_an_admin_once() {
    const BOB: &str = "5151";
    let fake = FakeDiscord::start();
    let toml = format!(
        r#"
[web]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"

[discord]
enabled = true
api_url = "http://{}/api/v10"
gateway_url = "ws://{}"

[pool]
size = 1

[[channel]]
platform = "discord"
id = "{CHANNEL}"
users = ["{BOB}"]
admins = ["{ALICE}"]
approve = ["schedule"]
approve_timeout = "60s"
debounce = "0ms"
"#,
        fake.rest, fake.gateway
    );
    let gw = Gw::start_with("dc-i6", &toml, secrets());
    fake.wait_ready();
    let prompt = format!("echo dc-i6-{}", random_hex(4));
    let call = ipc_call(
        "schedule_task",
        &json!({"prompt": prompt, "schedule_type": "interval", "schedule_value": "1h"}),
    );
    fake.dispatch(
        "MESSAGE_CREATE",
        message(CHANNEL, false, BOB, &mention(&call), true),
    );
    let button = |c: &Call| c.body["components"][0]["components"][0]["custom_id"].is_string();
    let calls = fake.wait("the request with buttons", |c| c.iter().any(button));
    let req = calls.iter().find(|c| button(c)).unwrap().clone();
    assert!(req.path.contains(CHANNEL));
    let content = req.body["content"].as_str().unwrap();
    assert!(
        content.contains("Approval needed") && content.contains(&prompt),
        "{content}"
    );
    assert_eq!(req.body["allowed_mentions"]["parse"], json!([]));
    let approve = req.body["components"][0]["components"][0]["custom_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(approve.starts_with("moat-approve:"), "{approve}");
    // The message names the id for a typed decision too.
    let id = approve.trim_start_matches("moat-approve:");
    assert!(content.contains(&format!("`approve {id}`")), "{content}");
    let stored = || {
        gw.gw
            .inner
            .store
            .tasks_of_channel("discord", CHANNEL)
            .unwrap()
            .len()
    };
    let answered = |token: &str| {
        fake.calls()
            .into_iter()
            .find(|c| c.path.contains(token) && c.path.ends_with("/callback"))
    };
    // Bob may not approve his own request.
    let bob_click = click(CHANNEL, BOB, &approve);
    let bob_token = bob_click["token"].as_str().unwrap().to_string();
    fake.dispatch("INTERACTION_CREATE", bob_click);
    fake.wait("the answer to Bob's click", |_| {
        answered(&bob_token).is_some()
    });
    let a = answered(&bob_token).unwrap();
    assert_eq!(a.body["type"], json!(4));
    assert_eq!(a.body["data"]["flags"], json!(64), "only Bob sees it");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(stored(), 0, "stored before an admin approved it");
    // Alice approves: the task is stored, the request edited.
    let alice_click = click(CHANNEL, ALICE, &approve);
    let alice_token = alice_click["token"].as_str().unwrap().to_string();
    fake.dispatch("INTERACTION_CREATE", alice_click);
    fake.wait("Bob's answer", |_| {
        !fake.posted_with("R0 OK task").is_empty()
    });
    assert_eq!(answered(&alice_token).unwrap().body["type"], json!(6));
    let calls = fake.wait("the edited request", |c| {
        c.iter().any(|c| c.method == "PATCH")
    });
    let edit = calls.iter().find(|c| c.method == "PATCH").unwrap();
    let req_id = req.created.clone().unwrap();
    assert_eq!(edit.path, format!("/channels/{CHANNEL}/messages/{req_id}"));
    assert!(
        edit.body["content"]
            .as_str()
            .unwrap()
            .contains(&format!("Approved by {ALICE}")),
        "{}",
        edit.body
    );
    assert_eq!(edit.body["components"], json!([]));
    assert_eq!(stored(), 1);
    // Decided once.
    let again = click(CHANNEL, ALICE, &approve);
    let again_token = again["token"].as_str().unwrap().to_string();
    fake.dispatch("INTERACTION_CREATE", again);
    fake.wait("the answer to the replay", |_| {
        answered(&again_token).is_some()
    });
    assert_eq!(answered(&again_token).unwrap().body["type"], json!(4));
    let a = gw.audit_kind("approval");
    assert!(a
        .iter()
        .any(|r| r["verdict"] == "refused" && r["reason"] == "not_admin" && r["by"] == BOB));
    assert!(a
        .iter()
        .any(|r| r["verdict"] == "approved" && r["by"] == ALICE && r["source"] == "discord"));
    assert!(a
        .iter()
        .any(|r| r["verdict"] == "refused" && r["reason"] == "already_decided"));
    assert_eq!(a.iter().filter(|r| r["verdict"] == "approved").count(), 1);
    assert_eq!(stored(), 1);

    // A second request, denied by Alice: nothing stored.
    let call = ipc_call(
        "schedule_task",
        &json!({"prompt": "echo denied", "schedule_type": "interval", "schedule_value": "1h"}),
    );
    fake.dispatch(
        "MESSAGE_CREATE",
        message(CHANNEL, false, BOB, &mention(&call), true),
    );
    let calls = fake.wait("the second request", |c| {
        c.iter().filter(|c| button(c)).count() == 2
    });
    let req2 = calls.iter().filter(|c| button(c)).nth(1).unwrap().clone();
    let deny = req2.body["components"][0]["components"][1]["custom_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(deny.starts_with("moat-deny:"), "{deny}");
    fake.dispatch("INTERACTION_CREATE", click(CHANNEL, ALICE, &deny));
    let req2_id = req2.created.clone().unwrap();
    let calls = fake.wait("the denied request's edit", |c| {
        c.iter()
            .any(|c| c.method == "PATCH" && c.path.ends_with(&req2_id))
    });
    let edit = calls
        .iter()
        .find(|c| c.method == "PATCH" && c.path.ends_with(&req2_id))
        .unwrap();
    assert!(
        edit.body["content"]
            .as_str()
            .unwrap()
            .contains(&format!("Denied by {ALICE}")),
        "{}",
        edit.body
    );
    fake.wait("Bob's second answer", |_| {
        !fake.posted_with("R0 ERR").is_empty()
    });
    assert_eq!(stored(), 1, "a denied task was stored");
    gw.stop();
}
