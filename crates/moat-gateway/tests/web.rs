//! The gateway end to end through its web chat, against real bwrap
//! sandboxes: `serve` runs in this process on free loopback ports with a
//! private data directory, and the tests talk to it only over HTTP (the JSON
//! API and the server-sent events), reading the audit log, `/metrics` and the
//! host's process table to check what happened inside.
//!
//! Covered: an answer streamed in order; two conversations isolated from each
//! other (docs/threat-model.md C3) in the pool and per thread; authorization (403
//! without a word, 401 without an identity, nobody reads another user's
//! conversation, no message text in the audit log); rate limits (told once,
//! then quiet); duplicates run once; debounce and follow-ups; `stop` and
//! `status`; `/metrics` and `/healthz`; the page itself in headless Chromium;
//! docs/threat-model.md W1 (DNS rebinding: foreign `Host` and `Origin` values refused with
//! nothing queued or read, in raw requests and in Chromium).

mod gwkit;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gwkit::*;
use serde_json::{json, Value};

/// The one channel line every test needs: open to the loopback user.
const OPEN: &str = "users = [\"*\"]";

fn texts(evs: &[Value], k: &str) -> Vec<String> {
    evs.iter()
        .filter(|v| kind(v) == k)
        .map(|v| v["text"].as_str().unwrap_or("").to_string())
        .collect()
}

#[test]
fn a_message_gets_its_answer_over_sse_in_order() {
    let gw = Gw::start(
        "answer",
        &web_config(1, "", &format!("{OPEN}\ndebounce = \"0ms\"")),
    );
    let c = gw.client(None);
    let me = c.get("/api/me");
    assert_eq!(
        (me.status, me.json()["user"].clone()),
        (200, json!("local"))
    );
    // The conversation exists once its first message is stored; watch it
    // from then on.
    let r = c.post("t1", "true");
    assert_eq!(r.status, 202, "{r:?}");
    assert_eq!(r.json()["status"], "queued");
    let mut sse = c.events("t1").expect("the event stream");
    let first = sse.answers(1);
    assert_eq!(answers_of(&first), vec![("(no output)".to_string(), true)]);
    // The runner is back and warm (a quick follow-up is another test).
    gw.wait_pool_idle(1);

    let m = random_hex(8);
    let cmd = format!("echo $((6*7))-{m}");
    let r = c.post("t1", &cmd);
    assert_eq!(r.status, 202, "{r:?}");
    let evs = sse.answers(1);
    // message, then status..., then text..., then the answer; nothing else.
    let phase = |v: &Value| match kind(v) {
        "message" => 0,
        "status" => 1,
        "text" => 2,
        "answer" => 3,
        other => panic!("an unexpected {other} event: {evs:#?}"),
    };
    let phases: Vec<i32> = evs.iter().map(phase).collect();
    assert!(
        phases.windows(2).all(|w| w[0] <= w[1]),
        "events out of order: {evs:#?}"
    );
    for p in 0..4 {
        assert!(phases.contains(&p), "phase {p} missing: {evs:#?}");
    }
    assert_eq!(evs[0]["text"], cmd.as_str());
    assert_eq!(evs[0]["user"], "local");
    assert!(
        texts(&evs, "status").iter().any(|s| s == "running"),
        "{evs:#?}"
    );
    let want = format!("42-{m}\n");
    assert_eq!(texts(&evs, "text").concat(), want, "the streamed text");
    assert_eq!(answers_of(&evs), vec![(want, true)]);
    let list = c.get("/api/conversations").json();
    assert_eq!(list["conversations"][0]["thread"], "t1", "{list}");
    drop(sse);
    gw.stop();
}

#[test]
fn a_quick_follow_up_is_not_told_the_sandboxes_are_busy() {
    // One user, one conversation, an idle pool: the second message comes
    // while the first turn's runner is being reset (a few ms). Nobody else
    // is using the pool, so "All sandboxes are busy" would be wrong.
    let gw = Gw::start(
        "follow-up",
        &web_config(1, "", &format!("{OPEN}\ndebounce = \"0ms\"")),
    );
    let c = gw.client(None);
    assert_eq!(c.post("f", "echo one").status, 202);
    let mut sse = c.events("f").expect("events");
    let mut evs = sse.answers(1);
    assert_eq!(c.post("f", "echo two").status, 202);
    evs.extend(sse.answers(1));
    assert_eq!(
        answers_of(&evs),
        vec![("one\n".to_string(), true), ("two\n".to_string(), true)]
    );
    let notices = texts(&evs, "notice");
    assert!(
        notices.is_empty(),
        "a user alone on an idle gateway was told: {notices:?}"
    );
    drop(sse);
    gw.stop();
}

/// A command that writes `secret` into /workspace, /tmp and $HOME and leaves
/// `bg` running in the background, then keeps its turn busy with `fg`.
fn plant(secret: &str, bg: &str, fg: &str) -> String {
    format!(
        "echo {secret} > /workspace/a.txt; echo {secret} > /tmp/a.txt; echo {secret} > ~/a.txt; \
         {bg} >/dev/null 2>&1 & {fg}; echo planted"
    )
}

/// A command that reports what it finds of another conversation's traces
/// (the channel's group folder, shared by its conversations on purpose, is
/// not one: docs/memory.md).
const PROBE: &str = "echo FILES=$({ ls -A /workspace | grep -vx group; ls -A /tmp ~ | grep -v ':$'; } | tr -s '\\n' ' '); \
     echo SLEEPERS=$(pgrep -c sleep); cat /workspace/a.txt /tmp/a.txt ~/a.txt 2>&1; true";

fn assert_clean(answer: &str, secret: &str, who: &str) {
    assert!(!answer.contains(secret), "{who} saw the secret: {answer}");
    assert!(
        answer.contains("FILES= \n") || answer.contains("FILES=\n"),
        "{who} found files: {answer}"
    );
    assert!(
        answer.contains("SLEEPERS=0"),
        "{who} saw a process: {answer}"
    );
    assert_eq!(answer.matches("No such file").count(), 3, "{who}: {answer}");
}

/// The outbox and the web chat's history (docs/store.md): after a restart
/// a watcher is shown the conversation's stored messages and answers, each
/// once; an answer kept but not delivered when the gateway stopped (a kill
/// between the end of a turn and its delivery) is delivered at the start
/// and shown once, and its message is not run again.
#[test]
fn after_a_restart_the_web_chat_shows_the_stored_history_once() {
    let cfg = web_config(1, "", &format!("{OPEN}\ndebounce = \"0ms\""));
    let gw = Gw::start("history", &cfg);
    let data = gw.data.clone();
    let m = random_hex(6);
    let c = gw.client(None);
    assert_eq!(c.post("h1", &format!("echo before-{m}")).status, 202);
    assert_eq!(answer(&c, "h1"), (format!("before-{m}\n"), true));
    gw.stop();
    let kept_turn = {
        let store = open_store_after_stop(&data);
        let (message_id, conversation_id) = match store
            .insert_message(&moat_store::IncomingMessage {
                platform: "web".into(),
                event_id: format!("kept-{m}"),
                channel: "local".into(),
                thread: "h1".into(),
                user: "local".into(),
                text: format!("echo never-run-{m}"),
                ts_ms: i64::MAX / 2,
                message_ref: None,
            })
            .unwrap()
        {
            moat_store::Inserted::New {
                message_id,
                conversation_id,
            } => (message_id, conversation_id),
            other => panic!("{other:?}"),
        };
        let t = store.start_turn(conversation_id, &[message_id], 1).unwrap();
        store
            .finish_turn_keeping(
                t,
                moat_store::TurnState::Done,
                &format!("kept-{m}"),
                true,
                None,
                i64::MAX / 2,
            )
            .unwrap();
        t
    };
    let gw = Gw::try_start_in(data.clone(), &cfg, Vec::new()).unwrap();
    let c = gw.client(None);
    let mut sse = c.events("h1").expect("the event stream");
    let mut evs = sse.answers(2);
    evs.extend(sse.during(Duration::from_secs(2)));
    let answers = answers_of(&evs);
    assert_eq!(
        answers,
        vec![(format!("before-{m}\n"), true), (format!("kept-{m}"), true)],
        "{evs:#?}"
    );
    assert_eq!(
        texts(&evs, "message"),
        vec![format!("echo before-{m}"), format!("echo never-run-{m}")]
    );
    assert!(
        evs.iter().any(|e| e["turn"] == json!(kept_turn)),
        "{evs:#?}"
    );
    assert!(
        evs.iter().all(|e| !e["text"]
            .as_str()
            .unwrap_or("")
            .contains(&format!("never-run-{m}\n"))),
        "the kept answer's message ran again: {evs:#?}"
    );
    let delivered = gw.audit_kind("answer");
    assert_eq!(delivered.len(), 1, "{delivered:#?}");
    assert!(gw.gw.inner.store.undelivered_answers().unwrap().is_empty());
    gw.stop();
}

/// A turn whose end the store could not record (a full disk) must not stop
/// its conversation until the next restart (the soak saw every later turn
/// refused with "already has turn N running"): the next turn closes it as
/// failed and runs.
#[test]
fn a_turn_left_running_in_the_store_does_not_block_its_conversation() {
    let gw = Gw::start(
        "stale-turn",
        &web_config(1, "", &format!("{OPEN}\ndebounce = \"0ms\"")),
    );
    let c = gw.client(None);
    assert_eq!(c.post("s1", "echo first").status, 202);
    assert_eq!(answer(&c, "s1"), ("first\n".to_string(), true));
    // What a turn whose end could not be written leaves: a running turn
    // the conversation's actor no longer runs.
    let store = gw.gw.inner.store.clone();
    let conv = store
        .conversation_by_key("web", "local", "s1")
        .unwrap()
        .unwrap();
    let (m, _) = match store
        .insert_message(&moat_store::IncomingMessage {
            platform: "web".into(),
            event_id: format!("stale-{}", random_hex(6)),
            channel: "local".into(),
            thread: "s1".into(),
            user: "local".into(),
            text: "lost".into(),
            ts_ms: 1,
            message_ref: None,
        })
        .unwrap()
    {
        moat_store::Inserted::New {
            message_id,
            conversation_id,
        } => (message_id, conversation_id),
        other => panic!("{other:?}"),
    };
    let stale = store.start_turn(conv.id, &[m], 2).unwrap();
    let mut sse = c.events("s1").expect("the event stream");
    sse.answers(1);
    assert_eq!(c.post("s1", "echo second-$((6*7))").status, 202);
    let evs = sse.answers(1);
    assert_eq!(
        answers_of(&evs),
        vec![("second-42\n".to_string(), true)],
        "{evs:#?}"
    );
    let closed = store.turn(stale).unwrap().unwrap();
    assert_eq!(closed.state, moat_store::TurnState::Failed);
    gw.stop();
}

/// Retention (`[store] retention`): at its start the gateway delivers what
/// it owes, then deletes the settled messages and delivered answers older
/// than the setting and audits the counts (no text); newer ones stay.
#[test]
fn retention_purges_old_settled_messages_at_start() {
    let cfg = format!(
        "[store]\nretention = \"1h\"\n\n{}",
        web_config(1, "", &format!("{OPEN}\ndebounce = \"0ms\""))
    );
    let data = fresh_dir("retention").join("data");
    std::fs::create_dir_all(&data).unwrap();
    let (old, owed) = {
        let store = moat_store::Store::open(data.join("moat.db")).unwrap();
        let turn = |event: &str, deliver: bool| {
            let (m, c) = match store
                .insert_message(&moat_store::IncomingMessage {
                    platform: "web".into(),
                    event_id: event.into(),
                    channel: "local".into(),
                    thread: "r1".into(),
                    user: "local".into(),
                    text: format!("echo {event}"),
                    ts_ms: 1_000,
                    message_ref: None,
                })
                .unwrap()
            {
                moat_store::Inserted::New {
                    message_id,
                    conversation_id,
                } => (message_id, conversation_id),
                other => panic!("{other:?}"),
            };
            let t = store.start_turn(c, &[m], 1_000).unwrap();
            store
                .finish_turn_keeping(t, moat_store::TurnState::Done, event, true, None, 1_001)
                .unwrap();
            if deliver {
                store.mark_delivered(t, 1_002).unwrap();
            }
            (m, t)
        };
        (turn("long-ago", true), turn("owed", false))
    };
    let gw = Gw::try_start_in(data.clone(), &cfg, Vec::new()).unwrap();
    let recs = gw.wait_audit("a purge", |r| r.iter().any(|x| x["kind"] == "purge"));
    let purges: Vec<_> = recs.iter().filter(|x| x["kind"] == "purge").collect();
    // The owed answer was delivered first (then it is old and settled too).
    let delivered = recs.iter().position(|x| x["kind"] == "answer");
    let purged = recs.iter().position(|x| x["kind"] == "purge");
    assert!(delivered < purged && delivered.is_some(), "{recs:#?}");
    assert_eq!(purges.len(), 1, "{purges:#?}");
    assert_eq!(purges[0]["messages"], 2, "{purges:#?}");
    assert_eq!(purges[0]["turns"], 2, "{purges:#?}");
    assert!(!purges[0].to_string().contains("long-ago"));
    let store = gw.gw.inner.store.clone();
    for (m, t) in [old, owed] {
        assert!(store.message(m).unwrap().is_none());
        assert!(store.turn(t).unwrap().is_none());
    }
    // What is newer than the setting stays.
    let c = gw.client(None);
    assert_eq!(c.post("r2", "echo fresh").status, 202);
    assert_eq!(answer(&c, "r2"), ("fresh\n".to_string(), true));
    assert_eq!(gw.block_on(gw.gw.purge_expired()), 0);
    gw.stop();
}

/// Waits for conversation `thread`'s next answer (watching from its start).
fn answer(c: &Client, thread: &str) -> (String, bool) {
    let mut sse = c.events(thread).expect("the event stream");
    answers_of(&sse.answers(1)).remove(0)
}

#[test]
fn two_conversations_get_isolated_sandboxes_from_the_pool() {
    let gw = Gw::start(
        "c3-pool",
        &web_config(2, "", &format!("{OPEN}\ndebounce = \"0ms\"")),
    );
    gw.wait_pool_idle(2);
    let c = gw.client(None);
    let secret = format!("secret-{}", random_hex(8));
    let bg = format!("sleep 300.{}", random_digits(6));
    let fg = format!("sleep 6.{}", random_digits(6));

    // A plants its traces and stays in its turn; B probes at the same time.
    assert_eq!(c.post("a", &plant(&secret, &bg, &fg)).status, 202);
    let a_procs = wait_host_proc(&bg);
    wait_host_proc(&fg);
    let a_uid = a_procs[0].1;
    assert_eq!(c.post("b", PROBE).status, 202);
    let (b, ok) = answer(&c, "b");
    assert!(ok, "{b}");
    assert!(
        !host_procs(&fg).is_empty(),
        "A's turn ended before B's probe finished; the two did not overlap"
    );
    assert_clean(&b, &secret, "B, beside A");
    let (a, ok) = answer(&c, "a");
    assert_eq!((a.as_str(), ok), ("planted\n", true));
    // A's runner was reset: its background process is gone from the host.
    wait_no_host_proc(&bg, Duration::from_secs(5));

    // Next, two turns at once use both runners, so one of them is the runner
    // A used; neither sees anything of A.
    gw.wait_pool_idle(2);
    let mb = format!("sleep 1.{}", random_digits(6));
    let mc = format!("sleep 1.{}", random_digits(6));
    assert_eq!(c.post("b", &format!("{mb}; {PROBE}")).status, 202);
    assert_eq!(c.post("c", &format!("{mc}; {PROBE}")).status, 202);
    let uids = [wait_host_proc(&mb)[0].1, wait_host_proc(&mc)[0].1];
    assert!(
        uids.contains(&a_uid),
        "neither turn ran in A's runner (host uids {uids:?}, A's {a_uid})"
    );
    let mut sb = c.events("b").expect("events of b");
    let b2 = answers_of(&sb.answers(2)).remove(1).0;
    assert_clean(&b2, &secret, "B, after A");
    let (c2, _) = answer(&c, "c");
    assert_clean(&c2, &secret, "C, after A");
    drop(sb);
    gw.stop();
}

#[test]
fn per_thread_conversations_keep_their_own_files_and_nothing_else() {
    let gw = Gw::start(
        "c3-thread",
        &web_config(
            1,
            "",
            &format!("{OPEN}\ndebounce = \"0ms\"\nsandbox = \"per-thread\""),
        ),
    );
    let c = gw.client(None);
    let secret = format!("secret-{}", random_hex(8));
    let bg = format!("sleep 300.{}", random_digits(6));
    let fg = format!("sleep 4.{}", random_digits(6));
    assert_eq!(c.post("a", &plant(&secret, &bg, &fg)).status, 202);
    wait_host_proc(&fg);
    assert_eq!(c.post("b", PROBE).status, 202);
    let (b, _) = answer(&c, "b");
    assert!(
        !host_procs(&fg).is_empty(),
        "A's turn ended before B's probe finished"
    );
    assert_clean(&b, &secret, "B, beside A");
    let mut sa = c.events("a").expect("events of a");
    assert_eq!(answers_of(&sa.answers(1)), vec![("planted\n".into(), true)]);
    // Nothing runs while the conversation is idle.
    wait_no_host_proc(&bg, Duration::from_secs(5));

    // A's next turn finds its workspace file; B still finds nothing.
    assert_eq!(
        c.post("a", "cat /workspace/a.txt; echo SLEEPERS=$(pgrep -c sleep)")
            .status,
        202
    );
    let a2 = answers_of(&sa.answers(1)).remove(0).0;
    assert_eq!(a2, format!("{secret}\nSLEEPERS=0\n"));
    assert_eq!(c.post("b", PROBE).status, 202);
    let mut sb = c.events("b").expect("events of b");
    let b2 = answers_of(&sb.answers(2)).remove(1).0;
    assert_clean(&b2, &secret, "B, after A");

    // Idle longer than idle_delete (24 h by default): both sandboxes go.
    let leases = leases_of(&gw.data);
    let named = || {
        std::fs::read_dir(&leases)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().starts_with("conv-"))
                    .count()
            })
            .unwrap_or(0)
    };
    assert_eq!(named(), 2, "each conversation has its own kept sandbox");
    let later = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        + 25 * 3600 * 1000;
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert_eq!(rt.block_on(gw.gw.sweep_idle_at(later)), 2);
    assert_eq!(named(), 0, "idle sandboxes are deleted");
    // Not yet idle long enough: nothing is deleted.
    assert_eq!(
        c.post("a", "ls /workspace | grep -vx group; echo listed")
            .status,
        202
    );
    let a3 = answers_of(&sa.answers(1)).remove(0).0;
    assert_eq!(a3, "listed\n", "a deleted sandbox starts empty");
    assert_eq!(rt.block_on(gw.gw.sweep_idle()), 0);
    drop((sa, sb));
    gw.stop();
}

const TOKENS_ENV: &str = "TEST_WEB_TOKENS";

fn token_gw(name: &str, pool: usize, channel: &str) -> (Gw, String, String) {
    let ta = random_hex(16);
    let tb = random_hex(16);
    let gw = Gw::start_with(
        name,
        &web_config(
            pool,
            &format!("auth = \"token\"\ntoken_env = \"{TOKENS_ENV}\""),
            channel,
        ),
        vec![(TOKENS_ENV.to_string(), format!("alice:{ta},bob:{tb}"))],
    );
    (gw, ta, tb)
}

#[test]
fn only_listed_users_are_answered_and_each_sees_only_their_own() {
    let (gw, ta, tb) = token_gw("authz", 1, "users = [\"alice\"]\ndebounce = \"0ms\"");
    let alice = gw.client(Some(&ta));
    let bob = gw.client(Some(&tb));
    let m = random_hex(8);
    let bob_text = format!("echo bob-{m} > /tmp/bob-{m}; echo bob-{m}");

    // Bob has an identity but may not talk here: 403, and nothing more.
    let r = bob.post("t-bob", &bob_text);
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.json(), json!({"status": "not_accepted"}));

    // No identity, or a wrong one: 401 everywhere.
    let nobody = gw.client(None);
    let wrong = gw.client(Some(&random_hex(16)));
    for c in [&nobody, &wrong] {
        assert_eq!(c.post("t-alice", "echo x").status, 401);
        assert_eq!(c.get("/api/me").status, 401);
        assert_eq!(c.get("/api/conversations").status, 401);
        assert_eq!(c.events("t-bob").err().map(|r| r.status), Some(401));
    }
    let r = gw.client(None);
    let malformed = request(
        r.addr,
        "GET",
        "/api/me",
        &[("Authorization", &format!("Basic {ta}"))],
        None,
    );
    assert_eq!(malformed.status, 401);

    // Alice is answered.
    assert_eq!(alice.get("/api/me").json()["user"], "alice");
    assert_eq!(
        alice.post("t-alice", &format!("echo alice-{m}")).status,
        202
    );
    assert_eq!(answer(&alice, "t-alice"), (format!("alice-{m}\n"), true));
    // Bob's own conversation shows nothing of his message being run.
    if let Ok(mut s) = bob.events("t-bob") {
        let evs = s.during(Duration::from_millis(1500));
        assert!(
            evs.iter()
                .all(|v| kind(v) != "answer" && kind(v) != "message"),
            "bob's refused message shows in his conversation: {evs:#?}"
        );
    }
    // Each user sees conversations under their own identity only.
    assert_eq!(alice.events("t-bob").err().map(|r| r.status), Some(404));
    assert_eq!(bob.events("t-alice").err().map(|r| r.status), Some(404));
    let alice_list = alice.get("/api/conversations").body;
    assert!(
        alice_list.contains("t-alice") && !alice_list.contains("t-bob"),
        "{alice_list}"
    );
    assert!(!bob.get("/api/conversations").body.contains("t-alice"));

    // The audit log: bob's message refused with a reason, no turn or lease
    // for it, and neither its text nor any token anywhere.
    let recs = gw.wait_audit("alice's turn", |r| r.iter().any(|x| x["kind"] == "turn"));
    let refused: Vec<&Value> = recs
        .iter()
        .filter(|r| r["kind"] == "message" && r["verdict"] == "unauthorized")
        .collect();
    assert_eq!(refused.len(), 1, "{recs:#?}");
    assert_eq!(refused[0]["user"], "bob");
    assert!(
        refused[0]["reason"]
            .as_str()
            .is_some_and(|s| s.contains("bob")),
        "a reason naming the user: {}",
        refused[0]
    );
    let bob_id = refused[0]["message_id"].clone();
    let turns: Vec<&Value> = recs.iter().filter(|r| r["kind"] == "turn").collect();
    assert_eq!(turns.len(), 1, "only alice's turn: {turns:#?}");
    assert!(!turns[0]["messages"].as_array().unwrap().contains(&bob_id));
    assert_eq!(
        recs.iter()
            .filter(|r| r["kind"] == "lease" && r["event"] == "acquired")
            .count(),
        1,
        "one sandbox taken, for alice"
    );
    let text = std::fs::read_to_string(gw.audit_path()).unwrap();
    assert!(
        !text.contains(&format!("bob-{m}")),
        "bob's text is in the audit log"
    );
    assert!(
        !text.contains(&format!("alice-{m}")),
        "alice's text is in the audit log"
    );
    assert!(
        !text.contains(&ta) && !text.contains(&tb),
        "a token is in the audit log"
    );
    gw.stop();
}

#[test]
fn a_burst_over_the_rate_is_refused_and_told_once() {
    let gw = Gw::start(
        "rate",
        &web_config(
            1,
            "",
            &format!("{OPEN}\ndebounce = \"0ms\"\nrate = {{ user = \"3/min\" }}"),
        ),
    );
    let c = gw.client(None);
    let m = random_hex(8);
    let statuses: Vec<u16> = (0..7)
        .map(|i| c.post("burst", &format!("echo r{i}-{m}")).status)
        .collect();
    assert_eq!(statuses, vec![202, 202, 202, 429, 429, 429, 429]);
    let r = c.post("burst", "echo again");
    assert_eq!(r.json()["status"], "rate_limited");
    let mut sse = c.events("burst").expect("events");
    let mut seen = Vec::new();
    let mut want: Vec<String> = (0..3).map(|i| format!("r{i}-{m}")).collect();
    while !want.is_empty() {
        let evs = sse.answers(1);
        let a = answers_of(&evs).remove(0).0;
        want.retain(|w| !a.contains(w.as_str()));
        seen.extend(evs);
    }
    seen.extend(sse.during(Duration::from_millis(1500)));
    // (Notices that the pool is busy are another matter: see
    // a_quick_follow_up_is_not_told_the_sandboxes_are_busy.)
    let notices: Vec<String> = texts(&seen, "notice")
        .into_iter()
        .filter(|n| !n.starts_with("All sandboxes are busy"))
        .collect();
    assert_eq!(notices.len(), 1, "told exactly once: {notices:?}");
    assert!(
        notices[0].contains("faster") && notices[0].contains("3/min"),
        "{notices:?}"
    );
    let all: String = answers_of(&seen).into_iter().map(|a| a.0).collect();
    for i in 3..7 {
        assert!(
            !all.contains(&format!("r{i}-{m}")),
            "a limited message ran: {all}"
        );
    }
    let recs = gw.audit();
    let limited: Vec<&Value> = recs
        .iter()
        .filter(|r| r["kind"] == "message" && r["verdict"] == "rate_limited")
        .collect();
    assert_eq!(limited.len(), 5, "{recs:#?}");
    assert!(limited.iter().all(|r| r["reason"]
        .as_str()
        .is_some_and(|s| s.contains("user rate 3/min"))));
    drop(sse);
    gw.stop();
}

#[test]
fn a_retried_post_with_the_same_client_id_runs_once() {
    let gw = Gw::start(
        "dup",
        &web_config(
            1,
            "",
            &format!("{OPEN}\ndebounce = \"0ms\"\nsandbox = \"per-thread\""),
        ),
    );
    let c = gw.client(None);
    let m = random_hex(8);
    let cid = random_hex(8);
    let cmd = format!("echo line-{m} >> /workspace/log; echo ran-{m}");
    let first = c.post_id("d", &cmd, &cid);
    assert_eq!(first.status, 202, "{first:?}");
    let id = first.json()["message_id"].clone();
    let again = c.post_id("d", &cmd, &cid);
    assert_eq!(again.status, 200, "{again:?}");
    assert_eq!(
        again.json(),
        json!({"status": "duplicate", "message_id": id})
    );
    let mut sse = c.events("d").expect("events");
    assert_eq!(
        answers_of(&sse.answers(1)),
        vec![(format!("ran-{m}\n"), true)]
    );
    // A retry after the answer is still the same message.
    assert_eq!(c.post_id("d", &cmd, &cid).json()["status"], "duplicate");
    assert_eq!(c.post("d", "cat /workspace/log").status, 202);
    let evs = sse.answers(1);
    assert_eq!(
        answers_of(&evs),
        vec![(format!("line-{m}\n"), true)],
        "the command ran once"
    );
    let recs = gw.wait_audit("two turns", |r| {
        r.iter().filter(|x| x["kind"] == "turn").count() == 2
    });
    let verdicts: Vec<&str> = recs
        .iter()
        .filter(|r| r["kind"] == "message")
        .filter_map(|r| r["verdict"].as_str())
        .collect();
    assert_eq!(
        verdicts,
        vec!["accepted", "duplicate", "duplicate", "accepted"]
    );
    drop(sse);
    gw.stop();
}

/// When the turn that carried message `id` started, in ms after the message
/// was received (both stamped by the gateway: no sandbox time in it).
fn wait_before_turn(gw: &Gw, id: i64) -> i64 {
    let store = &gw.gw.inner.store;
    let m = store.message(id).unwrap().expect("the stored message");
    let turn = m.turn_id.expect("the message's turn");
    let t = store.turn(turn).unwrap().expect("the turn");
    t.started_ms - m.ts_ms
}

#[test]
fn a_web_message_starts_at_once_and_a_burst_during_its_turn_is_one_follow_up() {
    // Issue 17: the web chat's default debounce (none set here) made every
    // message wait 1.5 s before its turn even began.
    let gw = Gw::start("at-once", &web_config(1, "", OPEN));
    let c = gw.client(None);
    let m = random_hex(8);
    let slow = format!("sleep 1; echo a-{m}");
    let a = post_id(&c, "b", &slow);
    let mut sse = c.events("b").expect("events");
    let running = format!("running: {slow}");
    sse.until(WAIT, |v| {
        kind(v) == "status" && v["text"] == running.as_str()
    });
    // Typed while the first turn runs: they wait for it, then go together.
    let b = post_id(&c, "b", &format!("echo b-{m}"));
    let cc = post_id(&c, "b", &format!("echo c-{m}"));
    let evs = sse.answers(2);
    assert_eq!(
        answers_of(&evs),
        vec![
            (format!("a-{m}\n"), true),
            (format!("b-{m}\nc-{m}\n"), true)
        ]
    );
    let recs = gw.wait_audit("two turns", |r| {
        r.iter().filter(|x| x["kind"] == "turn").count() == 2
    });
    let turns: Vec<&Value> = recs.iter().filter(|r| r["kind"] == "turn").collect();
    assert_eq!(turns[0]["messages"], json!([a]));
    assert_eq!(turns[1]["messages"], json!([b, cc]));
    // The first message's turn began as soon as the actor had it. The bound
    // is a regression guard only, far below the old 1500 ms and far above
    // the few ms it takes (the gap measured excludes the sandbox: it ends
    // where the turn's row is written, before a lease is taken).
    let waited = wait_before_turn(&gw, a);
    assert!(
        waited < 500,
        "the first message waited {waited} ms for its turn"
    );
    drop(sse);
    gw.stop();
}

#[test]
fn quick_messages_become_one_turn_and_follow_ups_the_next() {
    let gw = Gw::start(
        "debounce",
        &web_config(1, "", &format!("{OPEN}\ndebounce = \"600ms\"")),
    );
    let c = gw.client(None);
    let m = random_hex(8);
    let ids: Vec<Value> = (1..=3)
        .map(|i| {
            let r = c.post("q", &format!("echo d{i}-{m}"));
            assert_eq!(r.status, 202);
            r.json()["message_id"].clone()
        })
        .collect();
    let mut sse = c.events("q").expect("events");
    let evs = sse.answers(1);
    assert_eq!(
        answers_of(&evs),
        vec![(format!("d1-{m}\nd2-{m}\nd3-{m}\n"), true)],
        "one turn, in order"
    );
    let recs = gw.wait_audit("the turn", |r| r.iter().any(|x| x["kind"] == "turn"));
    let turns: Vec<&Value> = recs.iter().filter(|r| r["kind"] == "turn").collect();
    assert_eq!(turns.len(), 1);
    assert_eq!(turns[0]["messages"], Value::Array(ids));
    assert_eq!(turns[0]["state"], "done");

    // Follow-ups sent while a turn runs are the next turn, in order.
    let slow = format!("sleep 1.5; echo f0-{m}");
    assert_eq!(c.post("q", &slow).status, 202);
    let running = format!("running: {slow}");
    sse.until(WAIT, |v| {
        kind(v) == "status" && v["text"] == running.as_str()
    });
    let f1 = c.post("q", &format!("echo f1-{m}")).json()["message_id"].clone();
    let f2 = c.post("q", &format!("echo f2-{m}")).json()["message_id"].clone();
    let evs = sse.answers(2);
    assert_eq!(
        answers_of(&evs),
        vec![
            (format!("f0-{m}\n"), true),
            (format!("f1-{m}\nf2-{m}\n"), true)
        ]
    );
    let recs = gw.wait_audit("three turns", |r| {
        r.iter().filter(|x| x["kind"] == "turn").count() == 3
    });
    let last = recs.iter().rev().find(|r| r["kind"] == "turn").unwrap();
    assert_eq!(last["messages"], json!([f1, f2]));
    drop(sse);
    gw.stop();
}

#[test]
fn stop_cancels_a_running_turn_and_status_reports() {
    let gw = Gw::start(
        "stop",
        &web_config(1, "", &format!("{OPEN}\ndebounce = \"0ms\"")),
    );
    let c = gw.client(None);
    let m = random_hex(8);
    let sleeper = format!("sleep 30.{}", random_digits(6));
    assert_eq!(
        c.post("s", &format!("{sleeper}; echo never-{m}")).status,
        202
    );
    let mut sse = c.events("s").expect("events");
    wait_host_proc(&sleeper);

    let r = c.post("s", "status");
    assert_eq!(r.json()["status"], "command");
    let evs = sse.until(WAIT, |v| kind(v) == "notice");
    let note = texts(&evs, "notice").remove(0);
    assert!(
        note.starts_with(&format!("Sandbox: running: {sleeper}")) && note.contains("waiting: 0"),
        "{note}"
    );

    let t0 = Instant::now();
    assert_eq!(c.post("s", "stop").json()["status"], "command");
    let evs = sse.until(WAIT, |v| kind(v) == "answer");
    let took = t0.elapsed();
    assert!(
        texts(&evs, "notice").contains(&"Stopping the running turn.".to_string()),
        "{evs:#?}"
    );
    let (a, ok) = answers_of(&evs).remove(0);
    assert!(!ok && a.contains("stopped") && !a.contains("never"), "{a}");
    assert!(took < Duration::from_secs(3), "stopping took {took:?}");
    wait_no_host_proc(&sleeper, Duration::from_secs(3));
    gw.wait_pool_idle(1);

    c.post("s", "STATUS ");
    let evs = sse.until(WAIT, |v| kind(v) == "notice");
    assert_eq!(
        texts(&evs, "notice"),
        vec!["Sandbox: idle. Messages waiting: 0."]
    );
    c.post("s", "stop");
    let evs = sse.until(WAIT, |v| kind(v) == "notice");
    assert_eq!(texts(&evs, "notice"), vec!["Nothing is running."]);
    // The conversation and its runner still work.
    assert_eq!(c.post("s", &format!("echo after-{m}")).status, 202);
    let evs = sse.answers(1);
    assert_eq!(answers_of(&evs), vec![(format!("after-{m}\n"), true)]);
    let turns = gw.wait_audit("two turns", |r| {
        r.iter().filter(|x| x["kind"] == "turn").count() == 2
    });
    let states: Vec<&Value> = turns
        .iter()
        .filter(|r| r["kind"] == "turn")
        .map(|r| &r["state"])
        .collect();
    assert_eq!(states, vec!["cancelled", "done"]);
    drop(sse);
    gw.stop();
}

#[test]
fn metrics_count_what_happened_and_healthz_answers() {
    let (gw, ta, tb) = token_gw(
        "metrics",
        2,
        "users = [\"alice\"]\ndebounce = \"0ms\"\nrate = { user = \"2/min\" }",
    );
    let h = request(gw.admin, "GET", "/healthz", &[], None);
    assert_eq!((h.status, h.body.as_str()), (200, "ok\n"));
    assert_eq!(
        gw.client(None).get("/metrics").status,
        404,
        "no /metrics on the web chat"
    );
    let v = |text: &str, s: &str| metric(text, s).unwrap_or_else(|| panic!("{s} missing:\n{text}"));
    let t = gw.metrics();
    assert_eq!(v(&t, "moat_pool_size"), 2.0);
    assert_eq!(v(&t, "moat_pool_idle"), 2.0);
    assert_eq!(v(&t, "moat_events_total{verdict=\"accepted\"}"), 0.0);

    let alice = gw.client(Some(&ta));
    let m = random_hex(8);
    let sleeper = format!("sleep 1.{}", random_digits(6));
    assert_eq!(
        alice.post("m", &format!("{sleeper}; echo m1-{m}")).status,
        202
    );
    wait_host_proc(&sleeper);
    assert_eq!(alice.post("m", &format!("echo m2-{m}")).status, 202);
    let t = gw.metrics();
    assert_eq!(v(&t, "moat_running_turns"), 1.0, "{t}");
    assert_eq!(v(&t, "moat_pool_busy"), 1.0, "{t}");
    assert_eq!(v(&t, "moat_pool_idle"), 1.0, "{t}");
    assert_eq!(v(&t, "moat_queue_depth"), 1.0, "the follow-up waits: {t}");
    assert_eq!(alice.post("m", "echo m3").status, 429);
    assert_eq!(gw.client(Some(&tb)).post("m", "echo hi").status, 403);

    let mut sse = alice.events("m").expect("events");
    let mut evs = sse.answers(1);
    while !answers_of(&evs).concat_texts().contains(&format!("m2-{m}")) {
        evs.extend(sse.answers(1));
    }
    let answers = answers_of(&evs);
    assert!(answers.iter().all(|a| a.1), "{answers:?}");
    gw.wait_pool_idle(2);
    let t = gw.metrics();
    for (s, want) in [
        ("moat_events_total{verdict=\"accepted\"}", 2.0),
        ("moat_events_total{verdict=\"rate_limited\"}", 1.0),
        ("moat_events_total{verdict=\"unauthorized\"}", 1.0),
        ("moat_events_total{verdict=\"duplicate\"}", 0.0),
        ("moat_events_total{verdict=\"command\"}", 0.0),
        ("moat_turns_total{result=\"ok\"}", answers.len() as f64),
        ("moat_turns_total{result=\"failed\"}", 0.0),
        ("moat_turn_seconds_count", answers.len() as f64),
        ("moat_running_turns", 0.0),
        ("moat_queue_depth", 0.0),
        ("moat_pool_size", 2.0),
        ("moat_pool_idle", 2.0),
        ("moat_pool_busy", 0.0),
        ("moat_pool_waiting", 0.0),
    ] {
        assert_eq!(v(&t, s), want, "{s}:\n{t}");
    }
    assert!(
        !t.contains(&m) && !t.contains("alice"),
        "user data in /metrics:\n{t}"
    );
    drop(sse);
    gw.stop();
}

trait ConcatTexts {
    fn concat_texts(&self) -> String;
}

impl ConcatTexts for Vec<(String, bool)> {
    fn concat_texts(&self) -> String {
        self.iter().map(|a| a.0.as_str()).collect()
    }
}

// ---- the page in headless Chromium, driven over the DevTools protocol ----

/// A minimal WebSocket client (RFC 6455: masked text frames out; text,
/// continuation, ping and close frames in), enough for the DevTools protocol.
struct Ws {
    s: TcpStream,
    raw: Vec<u8>,
}

impl Ws {
    fn connect(url: &str) -> Ws {
        let rest = url.strip_prefix("ws://").expect("a ws:// address");
        let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let mut s = TcpStream::connect(host).expect("connecting to the browser");
        s.set_nodelay(true).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: bW9hdC10ZXN0LWtleS0xMg==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .unwrap();
        let mut raw = Vec::new();
        let mut buf = [0u8; 4096];
        let end = loop {
            let n = s.read(&mut buf).expect("the WebSocket handshake");
            assert!(n > 0, "the browser closed the WebSocket handshake");
            raw.extend_from_slice(&buf[..n]);
            if let Some(p) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break p;
            }
        };
        let head = String::from_utf8_lossy(&raw[..end]).into_owned();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        raw.drain(..end + 4);
        Ws { s, raw }
    }

    fn frame(&mut self, opcode: u8, payload: &[u8]) {
        let mut f = vec![0x80 | opcode];
        let n = payload.len();
        if n < 126 {
            f.push(0x80 | n as u8);
        } else if n < 65536 {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
        let key = [0x6d, 0x6f, 0x61, 0x74];
        f.extend_from_slice(&key);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        self.s.write_all(&f).expect("writing to the browser");
    }

    fn send(&mut self, text: &str) {
        self.frame(1, text.as_bytes());
    }

    /// The next text message, or `None` after `deadline`.
    fn recv(&mut self, deadline: Instant) -> Option<String> {
        let mut msg = Vec::new();
        loop {
            if let Some((fin, op, payload, used)) = parse_frame(&self.raw) {
                self.raw.drain(..used);
                match op {
                    0 | 1 => {
                        msg.extend_from_slice(&payload);
                        if fin {
                            return Some(String::from_utf8_lossy(&msg).into_owned());
                        }
                    }
                    8 => return None,
                    9 => self.frame(10, &payload),
                    _ => {}
                }
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.s.set_read_timeout(Some(left)).unwrap();
            let mut buf = [0u8; 65536];
            match self.s.read(&mut buf) {
                Ok(0) => return None,
                Ok(n) => self.raw.extend_from_slice(&buf[..n]),
                Err(_) => return None,
            }
        }
    }
}

/// (fin, opcode, payload, bytes used) of the first whole frame in `b`.
fn parse_frame(b: &[u8]) -> Option<(bool, u8, Vec<u8>, usize)> {
    if b.len() < 2 {
        return None;
    }
    let fin = b[0] & 0x80 != 0;
    let op = b[0] & 0x0f;
    let masked = b[1] & 0x80 != 0;
    let (len, mut at) = match b[1] & 0x7f {
        126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
        127 if b.len() >= 10 => (u64::from_be_bytes(b[2..10].try_into().ok()?) as usize, 10),
        126 | 127 => return None,
        n => (n as usize, 2),
    };
    let key = if masked {
        let k = b.get(at..at + 4)?.to_vec();
        at += 4;
        Some(k)
    } else {
        None
    };
    let data = b.get(at..at + len)?;
    let payload = match key {
        Some(k) => data.iter().enumerate().map(|(i, x)| x ^ k[i % 4]).collect(),
        None => data.to_vec(),
    };
    Some((fin, op, payload, at + len))
}

/// A DevTools session with one page.
struct Cdp {
    ws: Ws,
    next: u64,
}

impl Cdp {
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        self.ws
            .send(&json!({"id": id, "method": method, "params": params}).to_string());
        let deadline = Instant::now() + WAIT;
        loop {
            let msg = self
                .ws
                .recv(deadline)
                .unwrap_or_else(|| panic!("no answer from the browser to {method}"));
            let v: Value = serde_json::from_str(&msg).expect("DevTools sends JSON");
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// Evaluates `expr` in the page and returns its value.
    fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
        );
        assert!(r.get("exceptionDetails").is_none(), "{expr}: {r}");
        r["result"]["value"].clone()
    }

    /// Evaluates `expr` until it is truthy; returns its value.
    fn wait_for(&mut self, what: &str, expr: &str) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let v = self.eval(expr);
            if !(v.is_null() || v == false || v == "") {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "the page never showed {what}; log: {}",
                self.eval("document.getElementById('log').innerText")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Debian's Chromium, headless, as this test's browser. `--no-sandbox`: the
/// tests run as root and Chromium refuses to start its own sandbox as root;
/// this is the test's browser, not a moat sandbox.
struct Browser {
    child: Child,
    port: u16,
}

impl Browser {
    fn start() -> Browser {
        Browser::start_with(&[])
    }

    /// Chromium with `extra` command-line flags.
    fn start_with(extra: &[&str]) -> Browser {
        let profile = fresh_dir("chromium");
        let mut child = Command::new("chromium")
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--no-default-browser-check",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .args(extra)
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("Debian's chromium is needed for this test: scripts/setup installs it");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("DevTools listening on ws://").nth(1) {
                    let _ = tx.send(rest.to_string());
                }
            }
        });
        let addr = rx
            .recv_timeout(WAIT)
            .expect("chromium did not announce its DevTools address");
        let port = addr
            .split('/')
            .next()
            .and_then(|h| h.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .expect("a DevTools port");
        Browser { child, port }
    }

    /// A DevTools session with the browser's first page.
    fn page(&self) -> Cdp {
        let addr = format!("127.0.0.1:{}", self.port).parse().unwrap();
        let deadline = Instant::now() + WAIT;
        let url = loop {
            let list = request(addr, "GET", "/json/list", &[], None).json();
            let page = list
                .as_array()
                .and_then(|l| l.iter().find(|t| t["type"] == "page"))
                .and_then(|t| t["webSocketDebuggerUrl"].as_str().map(str::to_string));
            if let Some(u) = page {
                break u;
            }
            assert!(Instant::now() < deadline, "chromium has no page: {list}");
            std::thread::sleep(Duration::from_millis(50));
        };
        // The browser builds the address from our Host header (no port):
        // keep its path, use the port it announced.
        let path = url
            .strip_prefix("ws://")
            .and_then(|r| r.find('/').map(|i| r[i..].to_string()))
            .unwrap_or_else(|| panic!("a DevTools address without a path: {url}"));
        Cdp {
            ws: Ws::connect(&format!("ws://127.0.0.1:{}{path}", self.port)),
            next: 0,
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_web_page_answers_in_headless_chromium() {
    let gw = Gw::start(
        "chromium",
        &web_config(1, "", &format!("{OPEN}\ndebounce = \"0ms\"")),
    );
    let browser = Browser::start();
    let mut page = browser.page();
    page.call("Page.enable", json!({}));
    page.call(
        "Page.navigate",
        json!({"url": format!("http://{}/", gw.web)}),
    );
    page.wait_for(
        "the chat form",
        "document.readyState === 'complete' && !!document.getElementById('text')",
    );
    let m = random_hex(8);
    let cmd = format!("echo $((6*7))-{m}");
    // Type the command and press Enter, as a user does.
    page.eval("document.getElementById('text').focus()");
    page.call("Input.insertText", json!({"text": cmd}));
    for t in ["keyDown", "keyUp"] {
        page.call(
            "Input.dispatchKeyEvent",
            json!({"type": t, "key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13}),
        );
    }
    let done = page.wait_for(
        "the answer",
        "(() => { const d = document.querySelector('#log .answer[data-done=\"1\"]'); \
         return d ? d.textContent : null; })()",
    );
    assert_eq!(done, format!("42-{m}\n"), "the shell ran the command");
    let view = page.eval(
        "JSON.stringify({ user: [...document.querySelectorAll('#log .user')].map(d => d.textContent), \
         failed: document.querySelectorAll('#log .answer.failed').length, \
         thread: location.hash.slice(1), \
         convs: [...document.querySelectorAll('#convs a')].map(a => a.textContent), \
         input: document.getElementById('text').value, \
         status: document.getElementById('status').textContent })",
    );
    let view: Value = serde_json::from_str(view.as_str().unwrap()).unwrap();
    assert_eq!(view["user"], json!([cmd]), "{view}");
    assert_eq!(view["failed"], 0, "{view}");
    assert_eq!(
        view["input"], "",
        "the box is cleared after sending: {view}"
    );
    assert_eq!(view["status"], "idle", "{view}");
    let thread = view["thread"].as_str().unwrap().to_string();
    assert!(!thread.is_empty(), "{view}");
    // The page's conversation is the gateway's: listed in the sidebar and in
    // the API, and audited as the loopback user's message.
    page.wait_for(
        "the conversation in the sidebar",
        &format!(
            "[...document.querySelectorAll('#convs a')].some(a => a.textContent === '{thread}')"
        ),
    );
    let list = gw.client(None).get("/api/conversations").body;
    assert!(list.contains(&thread), "{list}");
    let recs = gw.audit_kind("message");
    assert!(
        recs.iter().any(|r| r["verdict"] == "accepted"
            && r["user"] == "local"
            && r["thread"] == thread.as_str()),
        "{recs:#?}"
    );
    drop(page);
    drop(browser);
    gw.stop();
}

/// The page renders an agent's Markdown answer (issue 15 part 6) from the
/// stored history after a restart: code blocks, tables, emphasis and links
/// (http/https only, `rel=noopener`), and nothing of the answer is ever
/// HTML: a script, an image with `onerror` and a `javascript:` link stay
/// text, and nothing runs.
#[test]
fn the_web_page_renders_markdown_answers_safely_in_headless_chromium() {
    let data = fresh_dir("markdown").join("data");
    std::fs::create_dir_all(&data).unwrap();
    let answer = "## Result\n\nAll **good**, see [the docs](https://example.test/docs) and \
         [this](javascript:window.__pwned=1).\n\n\
         <script>window.__pwned = 1</script><img src=x onerror=\"window.__pwned=1\">\n\n\
         ```\n<b>not bold</b>\n```\n\n\
         | file | lines |\n|---|---|\n| a.rs | `12` |\n| b.rs | 7 |\n\n\
         - one\n- two\n";
    {
        let store = moat_store::Store::open(data.join("moat.db")).unwrap();
        let (message_id, conversation_id) = match store
            .insert_message(&moat_store::IncomingMessage {
                platform: "web".into(),
                event_id: "md-1".into(),
                channel: "local".into(),
                thread: "md1".into(),
                user: "local".into(),
                text: "summarise".into(),
                ts_ms: 1,
                message_ref: None,
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
            .finish_turn_keeping(t, moat_store::TurnState::Done, answer, false, None, 3)
            .unwrap();
        store.mark_delivered(t, 4).unwrap();
    }
    let gw = Gw::try_start_in(
        data,
        &web_config(1, "", &format!("{OPEN}\ndebounce = \"0ms\"")),
        Vec::new(),
    )
    .unwrap();
    let browser = Browser::start();
    let mut page = browser.page();
    page.call("Page.enable", json!({}));
    page.call(
        "Page.navigate",
        json!({"url": format!("http://{}/#md1", gw.web)}),
    );
    page.wait_for(
        "the rendered answer",
        "!!document.querySelector('#log .answer.md[data-done=\"1\"] table')",
    );
    let view = page.eval(
        "JSON.stringify((() => { const a = document.querySelector('#log .answer.md'); return { \
         pwned: window.__pwned === undefined ? null : window.__pwned, \
         dangerous: a.querySelectorAll('script, img, iframe, object, embed, style').length, \
         h: [...a.querySelectorAll('h4')].map(e => e.textContent), \
         strong: [...a.querySelectorAll('strong')].map(e => e.textContent), \
         links: [...a.querySelectorAll('a')].map(e => [e.getAttribute('href'), e.rel, e.target, e.textContent]), \
         pre: [...a.querySelectorAll('pre code')].map(e => e.textContent), \
         cells: [...a.querySelectorAll('td')].map(e => e.textContent), \
         code_cells: a.querySelectorAll('td code').length, \
         items: [...a.querySelectorAll('ul li')].map(e => e.textContent), \
         text: a.textContent }; })())",
    );
    let v: Value = serde_json::from_str(view.as_str().unwrap()).unwrap();
    assert_eq!(v["pwned"], Value::Null, "an answer ran script: {v:#}");
    assert_eq!(v["dangerous"], 0, "{v:#}");
    assert_eq!(v["h"], json!(["Result"]), "{v:#}");
    assert_eq!(v["strong"], json!(["good"]), "{v:#}");
    assert_eq!(
        v["links"],
        json!([[
            "https://example.test/docs",
            "noopener noreferrer",
            "_blank",
            "the docs"
        ]]),
        "only the https link is a link: {v:#}"
    );
    assert_eq!(v["pre"], json!(["<b>not bold</b>"]), "{v:#}");
    assert_eq!(v["cells"], json!(["a.rs", "12", "b.rs", "7"]), "{v:#}");
    assert_eq!(v["code_cells"], 1, "{v:#}");
    assert_eq!(v["items"], json!(["one", "two"]), "{v:#}");
    let text = v["text"].as_str().unwrap();
    assert!(
        text.contains("<script>window.__pwned = 1</script>"),
        "shown as text: {text}"
    );
    assert!(
        text.contains("javascript:window.__pwned=1"),
        "the refused link's target is shown: {text}"
    );
    drop(page);
    drop(browser);
    gw.stop();
}

// ---- docs/threat-model.md W1: DNS rebinding and cross-site requests ----

/// A request head for `raw_request`: the request line, `Host` (when given)
/// and `extra` header lines.
fn head(method: &str, target: &str, host: Option<&str>, extra: &[(&str, &str)]) -> String {
    let mut h = format!("{method} {target} HTTP/1.1\r\n");
    if let Some(host) = host {
        h.push_str(&format!("Host: {host}\r\n"));
    }
    for (k, v) in extra {
        h.push_str(&format!("{k}: {v}\r\n"));
    }
    h
}

/// The id the store gives the next message, learnt by sending one; the
/// messages in between prove (or disprove) that nothing else was stored.
fn post_id(c: &Client, thread: &str, text: &str) -> i64 {
    let r = c.post(thread, text);
    assert_eq!(r.status, 202, "{r:?}");
    r.json()["message_id"].as_i64().expect("a message id")
}

#[test]
fn attack_w1_a_rebound_host_name_is_refused_and_nothing_is_queued_or_read() {
    // A page on evil.test whose name now points at 127.0.0.1 is same-origin
    // with itself, so the browser sends its requests with `Host: evil.test:PORT`
    // (and, for a POST, `Origin: http://evil.test:PORT`). None is served.
    let gw = Gw::start(
        "w1-host",
        &web_config(1, "", &format!("{OPEN}\ndebounce = \"0ms\"")),
    );
    let port = gw.web.port();
    let other = if port == 65535 { 1 } else { port + 1 };
    let c = gw.client(None);
    let secret = random_hex(8);
    let first = post_id(&c, "mine", &format!("echo {secret}"));
    let mut sse = c.events("mine").expect("events");
    sse.answers(1);
    gw.wait_pool_idle(1);
    let turns = metric(&gw.metrics(), "moat_turns_total{result=\"ok\"}");
    let messages = gw.audit_kind("message").len();

    let pwn = random_hex(8);
    let body = json!({ "text": format!("echo {pwn}") }).to_string();
    let foreign = [
        format!("evil.test:{port}"),
        format!("EVIL.TEST:{port}"),
        format!("evil.test.:{port}"),
        "evil.test".to_string(),
        format!("127.0.0.1.evil.test:{port}"),
        format!("localhost.evil.test:{port}"),
        format!("127.0.0.1:{other}"),
        format!("localhost:{other}"),
        format!("[::1]:{port}"),
        format!("[::ffff:127.0.0.1]:{port}"),
        format!("127.0.0.2:{port}"),
    ];
    let targets = [
        ("POST", "/api/conversations/mine/messages", body.as_str()),
        ("POST", "/api/conversations/new/messages", body.as_str()),
        ("GET", "/api/conversations", ""),
        ("GET", "/api/conversations/mine/events", ""),
        ("GET", "/api/conversations/mine/artifacts/x", ""),
        ("GET", "/api/me", ""),
        ("GET", "/", ""),
    ];
    let mut tried = 0;
    for h in &foreign {
        for (method, path, b) in targets {
            let origin = format!("http://{h}");
            for extra in [
                vec![("Content-Type", "application/json")],
                vec![
                    ("Content-Type", "application/json"),
                    ("Origin", origin.as_str()),
                ],
            ] {
                let r = raw_request(gw.web, &head(method, path, Some(h), &extra), b);
                tried += 1;
                assert_eq!(r.status, 421, "{method} {path} Host {h}: {r:?}");
                assert_eq!(r.json()["reason"], "foreign_host", "{r:?}");
                assert!(
                    !r.body.contains(&secret) && !r.body.contains("mine"),
                    "{r:?}"
                );
            }
        }
    }
    // Missing, doubled and unparsable Hosts; the absolute form, whose
    // authority is the host the request is for.
    let p = "/api/conversations/mine/messages";
    let json_ct = ("Content-Type", "application/json");
    let weird = [
        (head("POST", p, None, &[json_ct]), 400, "no_host"),
        (
            head("GET", "/api/conversations", None, &[]).replace("HTTP/1.1", "HTTP/1.0"),
            400,
            "no_host",
        ),
        (
            head(
                "POST",
                p,
                Some(&format!("127.0.0.1:{port}")),
                &[("Host", "evil.test"), json_ct],
            ),
            400,
            "no_host",
        ),
        (
            head("POST", p, Some("evil test"), &[json_ct]),
            400,
            "bad_host",
        ),
        (
            head("POST", p, Some("2130706433"), &[json_ct]),
            400,
            "bad_host",
        ),
        (
            head(
                "POST",
                &format!("http://evil.test:{port}{p}"),
                Some(&format!("127.0.0.1:{port}")),
                &[json_ct],
            ),
            421,
            "foreign_host",
        ),
        (
            head(
                "GET",
                &format!("http://evil.test:{port}/api/conversations"),
                Some(&format!("127.0.0.1:{port}")),
                &[],
            ),
            421,
            "foreign_host",
        ),
        (
            head(
                "GET",
                &format!("http://127.0.0.1:{port}/api/conversations"),
                Some(&format!("evil.test:{port}")),
                &[],
            ),
            421,
            "foreign_host",
        ),
    ];
    for (h, status, reason) in &weird {
        let b = if h.starts_with("POST") {
            body.as_str()
        } else {
            ""
        };
        let r = raw_request(gw.web, h, b);
        assert_eq!(r.status, *status, "{h:?}: {r:?}");
        assert_eq!(r.json()["reason"], *reason, "{h:?}: {r:?}");
        assert!(
            !r.body.contains(&secret) && !r.body.contains("\"mine\""),
            "{r:?}"
        );
    }
    // /metrics on the admin address: the same rule.
    let m = raw_request(
        gw.admin,
        &head("GET", "/metrics", Some("evil.test"), &[]),
        "",
    );
    assert_eq!(m.status, 421, "{m:?}");
    assert!(!m.body.contains("moat_"), "{m:?}");

    // Nothing was queued, run or stored: the open stream saw nothing, no
    // turn ran, no message was audited, and the next message is the very
    // next one the store numbers.
    let seen = sse.during(Duration::from_millis(300));
    assert!(seen.is_empty(), "{seen:#?}");
    assert_eq!(
        metric(&gw.metrics(), "moat_turns_total{result=\"ok\"}"),
        turns
    );
    assert_eq!(gw.audit_kind("message").len(), messages);
    assert_eq!(
        post_id(&c, "mine", "echo after"),
        first + 1,
        "a refused request was stored"
    );
    let evs = sse.answers(1);
    assert_eq!(answers_of(&evs), vec![("after\n".to_string(), true)]);
    let all = serde_json::to_string(&gw.audit()).unwrap();
    assert!(
        !all.contains(&pwn),
        "a refused command reached the audit log"
    );
    let refused = gw.audit_kind("http_refused");
    for reason in ["foreign_host", "no_host", "bad_host"] {
        assert!(
            refused.iter().any(|r| r["reason"] == reason),
            "{reason}: {refused:#?}"
        );
    }
    // At most one record per reason every ten seconds: a page looping
    // requests cannot fill the disk.
    assert!(
        refused.len() < 10,
        "{tried} refusals, {} records",
        refused.len()
    );

    // The chat's own names still work, in every spelling a browser uses.
    for h in [
        format!("127.0.0.1:{port}"),
        "127.0.0.1".to_string(),
        format!("localhost:{port}"),
        format!("LOCALHOST:{port}"),
        format!("localhost.:{port}"),
    ] {
        let r = raw_request(
            gw.web,
            &head("GET", "/api/conversations", Some(&h), &[]),
            "",
        );
        assert_eq!(r.status, 200, "Host {h}: {r:?}");
        assert!(r.body.contains("\"mine\""), "{r:?}");
    }
    let r = raw_request(
        gw.web,
        &head(
            "GET",
            &format!("http://127.0.0.1:{port}/api/me"),
            Some(&format!("127.0.0.1:{port}")),
            &[],
        ),
        "",
    );
    assert_eq!(r.status, 200, "absolute form naming the chat itself: {r:?}");
    drop(sse);
    gw.stop();
}

#[test]
fn attack_w1_a_foreign_origin_cannot_post_and_the_page_itself_can() {
    let gw = Gw::start(
        "w1-origin",
        &web_config(1, "", &format!("{OPEN}\ndebounce = \"0ms\"")),
    );
    let port = gw.web.port();
    let host = format!("127.0.0.1:{port}");
    let c = gw.client(None);
    let first = post_id(&c, "o", "echo first");
    let mut sse = c.events("o").expect("events");
    sse.answers(1);
    gw.wait_pool_idle(1);
    let pwn = random_hex(8);
    let body = json!({ "text": format!("echo {pwn}") }).to_string();
    let p = "/api/conversations/o/messages";
    let json_ct = ("Content-Type", "application/json");
    let other_port = format!(
        "http://127.0.0.1:{}",
        if port == 65535 { 1 } else { port + 1 }
    );
    for (extra, reason) in [
        (vec![("Origin", "http://evil.test")], "foreign_origin"),
        (
            vec![("Origin", format!("http://evil.test:{port}").as_str())],
            "foreign_origin",
        ),
        (vec![("Origin", "null")], "foreign_origin"),
        (vec![("Origin", other_port.as_str())], "foreign_origin"),
        (vec![("Origin", "http://127.0.0.1")], "foreign_origin"),
        (vec![("Origin", "file://")], "foreign_origin"),
        (
            vec![(
                "Origin",
                format!("http://127.0.0.1.evil.test:{port}").as_str(),
            )],
            "foreign_origin",
        ),
        (vec![("Sec-Fetch-Site", "cross-site")], "cross_site"),
        (vec![("Sec-Fetch-Site", "same-site")], "cross_site"),
    ] {
        let mut h = extra.clone();
        h.push(json_ct);
        let r = raw_request(gw.web, &head("POST", p, Some(&host), &h), &body);
        assert_eq!(r.status, 403, "{extra:?}: {r:?}");
        assert_eq!(r.json()["reason"], reason, "{r:?}");
    }
    // An EventSource opened from another site is not served either.
    let r = raw_request(
        gw.web,
        &head(
            "GET",
            "/api/conversations/o/events",
            Some(&host),
            &[("Origin", "http://evil.test")],
        ),
        "",
    );
    assert_eq!(r.status, 403, "{r:?}");
    assert!(sse.during(Duration::from_millis(300)).is_empty());
    // The page itself (same origin, as Chromium sends it), localhost, and
    // a client with no Origin at all (curl, `moat chat`) are served.
    let own = format!("http://{host}");
    let localhost = format!("http://localhost:{port}");
    for (i, extra) in [
        vec![("Origin", own.as_str()), ("Sec-Fetch-Site", "same-origin")],
        vec![("Origin", localhost.as_str())],
        vec![("Sec-Fetch-Site", "none")],
        vec![],
    ]
    .into_iter()
    .enumerate()
    {
        let mut h = extra.clone();
        h.push(json_ct);
        let b = json!({ "text": format!("echo ok{i}") }).to_string();
        let r = raw_request(gw.web, &head("POST", p, Some(&host), &h), &b);
        assert_eq!(r.status, 202, "{extra:?}: {r:?}");
        assert_eq!(
            r.json()["message_id"].as_i64(),
            Some(first + 1 + i as i64),
            "{r:?}"
        );
    }
    // However the four were batched into turns (a burst joins one follow-up
    // turn), their answers come in order and end with the last one's.
    let evs = sse.until(WAIT, |v| {
        kind(v) == "answer" && v["text"].as_str().unwrap_or("").ends_with("ok3\n")
    });
    let got: Vec<String> = answers_of(&evs).into_iter().map(|(t, _)| t).collect();
    assert_eq!(got.concat(), "ok0\nok1\nok2\nok3\n", "{evs:#?}");
    assert!(!serde_json::to_string(&gw.audit()).unwrap().contains(&pwn));
    drop(sse);
    gw.stop();
}

#[test]
fn attack_w1_a_rebound_name_gets_nothing_in_chromium() {
    // DNS rebinding as a browser lives it: `rebind.test` resolves to
    // 127.0.0.1 (Chromium's resolver rules stand in for the attacker's DNS
    // answer), so a page at http://rebind.test:PORT/ is same-origin with
    // whatever listens there. The chat refuses the page and every request
    // its script makes; the chat's own page keeps working.
    let gw = Gw::start(
        "w1-chromium",
        &web_config(1, "", &format!("{OPEN}\ndebounce = \"0ms\"")),
    );
    let port = gw.web.port();
    let c = gw.client(None);
    let secret = random_hex(8);
    let first = post_id(&c, "mine", &format!("echo {secret}"));
    let browser = Browser::start_with(&["--host-resolver-rules=MAP rebind.test 127.0.0.1"]);
    let mut page = browser.page();
    page.call("Page.enable", json!({}));
    page.call(
        "Page.navigate",
        json!({"url": format!("http://rebind.test:{port}/")}),
    );
    let text = page.wait_for(
        "the refusal",
        "document.readyState === 'complete' && document.body && document.body.innerText",
    );
    let text = text.as_str().unwrap_or_default().to_string();
    assert!(text.contains("foreign_host"), "the page got: {text}");
    let form = page.eval("!!document.getElementById('text')");
    assert_eq!(
        form,
        json!(false),
        "the chat page was served to rebind.test"
    );
    // What the attacker's script would do next: read and post.
    let read =
        page.eval("fetch('/api/conversations').then(async r => r.status + ' ' + await r.text())");
    let read = read.as_str().unwrap_or_default().to_string();
    assert!(read.starts_with("421 "), "{read}");
    assert!(!read.contains("mine") && !read.contains(&secret), "{read}");
    let events = page.eval(
        "fetch('/api/conversations/mine/events').then(async r => r.status + ' ' + await r.text())",
    );
    assert!(
        events.as_str().unwrap_or_default().starts_with("421 "),
        "{events}"
    );
    let pwn = random_hex(8);
    let post = page.eval(&format!(
        "fetch('/api/conversations/mine/messages', {{method: 'POST', \
         headers: {{'Content-Type': 'application/json'}}, \
         body: JSON.stringify({{text: 'echo {pwn}'}})}}).then(r => r.status)"
    ));
    assert_eq!(post, json!(421), "the rebound page could post");
    assert_eq!(
        post_id(&c, "mine", "echo after"),
        first + 1,
        "a refused message was stored"
    );
    assert!(!serde_json::to_string(&gw.audit()).unwrap().contains(&pwn));
    // The chat's own origin, in the same browser: served.
    page.call(
        "Page.navigate",
        json!({"url": format!("http://127.0.0.1:{port}/")}),
    );
    page.wait_for(
        "the chat form",
        "document.readyState === 'complete' && !!document.getElementById('text')",
    );
    let own =
        page.eval("fetch('/api/conversations').then(async r => r.status + ' ' + await r.text())");
    let own = own.as_str().unwrap_or_default().to_string();
    assert!(own.starts_with("200 ") && own.contains("mine"), "{own}");
    let posted = page.eval(
        "fetch('/api/conversations/mine/messages', {method: 'POST', \
         headers: {'Content-Type': 'application/json'}, \
         body: JSON.stringify({text: 'echo own'})}).then(r => r.status)",
    );
    assert_eq!(posted, json!(202), "the chat's own page could not post");
    drop(page);
    drop(browser);
    gw.stop();
}

#[test]
fn attack_w1_names_in_allowed_hosts_are_served_and_look_alikes_are_not() {
    // Behind a reverse proxy that keeps the public name in Host.
    let gw = Gw::start(
        "w1-allowed",
        &web_config(
            1,
            "allowed_hosts = [\"chat.example.test\", \"alt.example.test:8443\"]",
            &format!("{OPEN}\ndebounce = \"0ms\""),
        ),
    );
    let port = gw.web.port();
    let get = |host: &str| raw_request(gw.web, &head("GET", "/api/me", Some(host), &[]), "").status;
    for ok in [
        "chat.example.test",
        "CHAT.example.test:443",
        "chat.example.test.",
        "alt.example.test:8443",
    ] {
        assert_eq!(get(ok), 200, "{ok}");
    }
    for bad in [
        "chat.example.test.evil.test",
        "evilchat.example.test",
        "example.test",
        "alt.example.test",
        "alt.example.test:443",
        "evil.test",
    ] {
        assert_eq!(get(bad), 421, "{bad}");
    }
    assert_eq!(
        get(&format!("127.0.0.1:{port}")),
        200,
        "its own address still"
    );
    let post = |origin: &str| {
        raw_request(
            gw.web,
            &head(
                "POST",
                "/api/conversations/p/messages",
                Some("chat.example.test"),
                &[("Content-Type", "application/json"), ("Origin", origin)],
            ),
            &json!({"text": "true"}).to_string(),
        )
        .status
    };
    assert_eq!(post("https://chat.example.test"), 202);
    assert_eq!(
        post("https://alt.example.test"),
        403,
        "port 443 is not 8443"
    );
    assert_eq!(post("https://chat.example.test.evil.test"), 403);
    gw.stop();
}

/// docs/threat-model.md F8 through the gateway: a per-thread conversation's
/// sandbox plants a repository whose configuration would run a program at an
/// operator's `git status` on the host; after the turn it is neutralised and the
/// change is in the audit log.
#[test]
fn attack_f8_a_per_thread_workspace_is_handed_back_and_audited() {
    let gw = Gw::start(
        "f8-thread",
        &web_config(
            1,
            "",
            &format!("{OPEN}\ndebounce = \"0ms\"\nsandbox = \"per-thread\""),
        ),
    );
    let c = gw.client(None);
    let plant = "mkdir -p r && cd r && git init -q && git config core.fsmonitor 'touch pwned; false' && echo planted";
    assert_eq!(c.post("f8", plant).status, 202);
    let (a, ok) = answer(&c, "f8");
    assert!(ok && a.contains("planted"), "{a}");
    let recs = gw.audit_kind("hand-back");
    assert!(
        recs.iter().any(|r| r["change"]
            .as_str()
            .is_some_and(|c| c.contains("r/.git/config") && c.contains("core.fsmonitor"))),
        "{recs:?}"
    );
    // The value (the command) is never in the audit record.
    assert!(!recs.iter().any(|r| r.to_string().contains("touch pwned")));
    gw.stop();
}

// ---- docs/threat-model.md I6: approvals in the web chat ----

/// A python3 program for the shell agent: one `tools/call` over the
/// lease's IPC socket, its result as `R0 OK|ERR text`.
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

// I6 on the web chat: Bob's schedule_task waits; his own click, a click
// without an identity and a cross-site POST with the admin's token are
// refused (nothing stored); Alice's approval schedules it; a second click
// is refused as decided.
#[test]
fn attack_i6_web_approvals_are_decided_by_an_admin_once() {
    let (gw, ta, tb) = token_gw(
        "approvals",
        1,
        "users = [\"bob\"]\nadmins = [\"alice\"]\napprove = [\"schedule\"]\napprove_timeout = \"60s\"\ndebounce = \"0ms\"",
    );
    let bob = gw.client(Some(&tb));
    let prompt = format!("echo web-i6-{}", random_hex(4));
    let call = ipc_call(
        "schedule_task",
        &json!({"prompt": prompt, "schedule_type": "interval", "schedule_value": "1h"}),
    );
    assert_eq!(bob.post("t", &call).status, 202);
    let mut sse = bob.events("t").expect("Bob's event stream");
    let evs = sse.until(WAIT, |v| v["type"] == "approval");
    let ev = evs.last().unwrap().clone();
    let url = ev["url"].as_str().unwrap().to_string();
    assert!(ev["detail"].as_str().unwrap().contains(&prompt), "{ev}");
    let stored = || {
        gw.gw
            .inner
            .store
            .tasks_of_channel("web", "bob")
            .unwrap()
            .len()
    };
    let decide = |token: Option<&str>, extra: &[(&str, &str)], approve: bool| {
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut h: Vec<(&str, &str)> = vec![("Content-Type", "application/json")];
        if let Some(a) = &auth {
            h.push(("Authorization", a.as_str()));
        }
        h.extend_from_slice(extra);
        request(
            gw.web,
            "POST",
            &url,
            &h,
            Some(&json!({ "approve": approve }).to_string()),
        )
    };
    // Bob may not approve his own request; nobody without an identity; a
    // page of another site not even with Alice's token.
    assert_eq!(decide(Some(&tb), &[], true).status, 403);
    assert_eq!(decide(None, &[], true).status, 401);
    assert_eq!(
        decide(Some(&ta), &[("Origin", "http://evil.test")], true).status,
        403
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        stored(),
        0,
        "the task was stored before an admin approved it"
    );
    // Alice approves: the call returns and the task is Bob's.
    let r = decide(Some(&ta), &[], true);
    assert_eq!(
        (r.status, r.json()["status"].clone()),
        (200, json!("approved"))
    );
    let evs = sse.answers(1);
    let answer = answers_of(&evs).remove(0).0;
    assert!(answer.starts_with("R0 OK task "), "{answer}");
    assert!(evs.iter().any(|v| v["type"] == "decided"
        && v["text"]
            .as_str()
            .unwrap_or("")
            .contains("Approved by alice")));
    assert_eq!(stored(), 1);
    // Decided once.
    assert_eq!(decide(Some(&ta), &[], false).status, 409);
    let a = gw.audit_kind("approval");
    assert!(a
        .iter()
        .any(|r| r["verdict"] == "refused" && r["reason"] == "not_admin" && r["by"] == "bob"));
    assert!(a
        .iter()
        .any(|r| r["verdict"] == "approved" && r["by"] == "alice" && r["source"] == "web"));
    assert!(a
        .iter()
        .any(|r| r["verdict"] == "refused" && r["reason"] == "already_decided"));
    assert_eq!(a.iter().filter(|r| r["verdict"] == "approved").count(), 1);
    gw.stop();
}
