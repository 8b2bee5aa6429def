//! moat-store on a real PostgreSQL (moat-testpg's throwaway cluster), for
//! what only PostgreSQL has: several stores (gateway nodes) on one
//! database, migrations by nodes that start together, the connection URL
//! and its password, a server that is not there, encryption at rest in
//! PostgreSQL's rows, and conversation ownership between nodes
//! (docs/threat-model.md H1, H2). The store's logic on both databases is
//! tests/store.rs.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use moat_store::{
    IncomingMessage, Inserted, MessageState, Ownership, PgOptions, Store, StoreError, StoreKey,
    TurnState,
};
use moat_testpg::cluster;
use zeroize::Zeroizing;

const LEASE: Duration = Duration::from_secs(15);
const LEASE_MS: i64 = 15_000;

fn msg(event_id: &str, thread: &str, ts_ms: i64) -> IncomingMessage {
    IncomingMessage {
        platform: "slack".into(),
        event_id: event_id.into(),
        channel: "C1".into(),
        thread: thread.into(),
        user: "U1".into(),
        text: format!("text of {event_id}"),
        ts_ms,
        message_ref: None,
    }
}

fn new_id(r: Inserted) -> (i64, i64) {
    match r {
        Inserted::New {
            message_id,
            conversation_id,
        } => (message_id, conversation_id),
        other => panic!("expected a new message, got {other:?}"),
    }
}

fn node(opts: &PgOptions, id: &str) -> Store {
    Store::open_postgres(opts, None)
        .unwrap()
        .with_node(id, LEASE)
        .unwrap()
}

#[test]
fn two_nodes_given_the_same_events_store_each_once() {
    let opts = cluster().fresh();
    let nodes = [Arc::new(node(&opts, "a")), Arc::new(node(&opts, "b"))];
    const THREADS: usize = 6;
    const EVENTS: usize = 200;
    let barrier = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let store = Arc::clone(&nodes[t % 2]);
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                let mut new = Vec::new();
                for e in 0..EVENTS {
                    let e = (e + t * 13) % EVENTS;
                    let m = msg(&format!("E{e}"), &format!("T{}", e % 10), e as i64);
                    if let Inserted::New { message_id, .. } = store.insert_message(&m).unwrap() {
                        new.push((e, message_id));
                    }
                }
                new
            })
        })
        .collect();
    let mut first: HashMap<usize, i64> = HashMap::new();
    for h in handles {
        for (e, id) in h.join().unwrap() {
            assert!(first.insert(e, id).is_none(), "event E{e} stored twice");
        }
    }
    assert_eq!(first.len(), EVENTS);
    let rows = cluster().sql(&opts, "SELECT count(*) FROM messages");
    assert_eq!(rows[0][0].as_deref(), Some("200"));
    // Each conversation has exactly one owner, one of the two nodes.
    let owners = cluster().sql(&opts, "SELECT node FROM conversation_owners");
    assert_eq!(owners.len(), 10);
    assert!(owners
        .iter()
        .all(|r| matches!(r[0].as_deref(), Some("a") | Some("b"))));
}

#[test]
fn nodes_that_start_together_migrate_once() {
    let opts = cluster().fresh();
    let barrier = Arc::new(Barrier::new(4));
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let opts = opts.clone();
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                Store::open_postgres(&opts, None).map(drop)
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap().unwrap();
    }
    let v = cluster().sql(&opts, "SELECT application, version FROM moat_schema");
    assert_eq!(v.len(), 1, "one version row");
    assert_eq!(v[0][0].as_deref(), Some("moat"));
    assert_eq!(
        v[0][1].as_deref(),
        Some(moat_store::schema_version().to_string().as_str())
    );
}

#[test]
fn a_newer_schema_or_another_programs_database_is_refused_unchanged() {
    let opts = cluster().fresh();
    drop(Store::open_postgres(&opts, None).unwrap());
    cluster().sql(&opts, "UPDATE moat_schema SET version = 999");
    let err = Store::open_postgres(&opts, None).unwrap_err();
    assert!(
        matches!(err, StoreError::TooNew { found: 999, .. }),
        "{err:?}"
    );
    assert_eq!(
        cluster().sql(&opts, "SELECT version FROM moat_schema")[0][0].as_deref(),
        Some("999")
    );

    let other = cluster().fresh();
    cluster().sql(&other, "CREATE TABLE invoices (id BIGINT PRIMARY KEY)");
    let err = Store::open_postgres(&other, None).unwrap_err();
    assert!(matches!(err, StoreError::NotMoat { .. }), "{err:?}");
    let tables = cluster().sql(
        &other,
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1",
    );
    assert_eq!(tables, vec![vec![Some("invoices".to_string())]]);
}

#[test]
fn the_password_never_appears_in_an_error() {
    let good = cluster().fresh();
    // In the URL: refused, naming the key, without echoing it.
    let mut in_url = good.clone();
    in_url.url = in_url.url.replace("moat@", "moat:hunter2-in-the-url@");
    let err = Store::open_postgres(&in_url, None).unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(
            err,
            StoreError::Config {
                key: "store.url",
                ..
            }
        ),
        "{text}"
    );
    assert!(text.contains("MOAT_STORE_PASSWORD"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
    assert!(!format!("{in_url:?}").contains("hunter2") || in_url.url.contains("hunter2"));
    // Wrong: refused by the server, named without the password.
    let mut wrong = good.clone();
    wrong.password = Some(Zeroizing::new("hunter2-wrong".into()));
    let err = Store::open_postgres(&wrong, None).unwrap_err();
    let text = err.to_string();
    assert!(!text.contains("hunter2"), "{text}");
    assert!(text.contains("MOAT_STORE_PASSWORD"), "{text}");
    assert!(!format!("{wrong:?}").contains("hunter2"));
    // And the right one works.
    drop(Store::open_postgres(&good, None).unwrap());
}

#[test]
fn a_server_that_is_not_there_is_a_retryable_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let opts = PgOptions {
        url: format!("postgres://moat@127.0.0.1:{port}/moat"),
        password: None,
        pool_size: 2,
    };
    let err = Store::open_postgres(&opts, None).unwrap_err();
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
    assert!(err.is_retryable());
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
}

#[test]
fn sealed_fields_reach_postgres_sealed_and_only_their_key_opens_the_store() {
    let opts = cluster().fresh();
    let key = |b: u8| StoreKey::from_bytes(&[b; 32]);
    let marker = "secret-marker-4f1d";
    {
        let s = Store::open_postgres(&opts, Some(key(1))).unwrap();
        let (id, conv) = new_id(s.insert_message(&msg("E1", "T1", 1)).unwrap());
        let mut m = msg("E2", "T1", 2);
        m.text = marker.into();
        let (id2, _) = new_id(s.insert_message(&m).unwrap());
        s.set_agent_session(conv, Some(marker)).unwrap();
        let t = s.start_turn(conv, &[id, id2], 3).unwrap();
        s.finish_turn(t, TurnState::Failed, 0, Some(marker), 4)
            .unwrap();
        assert_eq!(s.message(id2).unwrap().unwrap().text, marker);
    }
    let dump = cluster().sql(
        &opts,
        "SELECT text, coalesce(detail, '') FROM messages
         UNION ALL SELECT coalesce(error, ''), '' FROM turns
         UNION ALL SELECT coalesce(agent_session, ''), '' FROM conversations",
    );
    let all: String = dump.iter().flatten().flatten().cloned().collect();
    assert!(!all.contains(marker), "a sealed field is in clear: {all}");
    assert!(all.contains("moat:v1:"));
    assert!(matches!(
        Store::open_postgres(&opts, Some(key(2))).unwrap_err(),
        StoreError::WrongKey { .. }
    ));
    assert!(matches!(
        Store::open_postgres(&opts, None).unwrap_err(),
        StoreError::KeyMissing { .. }
    ));
    // Re-keyed in one transaction; then only the new key opens it.
    let mut s = Store::open_postgres(&opts, Some(key(1))).unwrap();
    let counts = s.rekey(key(2)).unwrap();
    assert!(counts.iter().any(|c| c.were_sealed > 0));
    drop(s);
    let s = Store::open_postgres(&opts, Some(key(2))).unwrap();
    assert_eq!(s.message(2).unwrap().unwrap().text, marker);
    assert!(matches!(
        Store::open_postgres(&opts, Some(key(1))).unwrap_err(),
        StoreError::WrongKey { .. }
    ));
}

/// H2: node b can neither start a turn in, claim, take over nor finish the
/// turn of a conversation whose lease node a holds; a's turn and messages
/// are exactly as a left them.
#[test]
fn attack_h2_a_node_cannot_act_on_a_conversation_another_node_owns() {
    let opts = cluster().fresh();
    let a = node(&opts, "node-a");
    let b = node(&opts, "node-b");
    let (m1, conv) = new_id(a.insert_message(&msg("E1", "T1", 1_000)).unwrap());
    let t = a.start_turn(conv, &[m1], 1_000).unwrap();
    // A second message of the thread, delivered to b (the load balancer's
    // choice): stored once, but the conversation stays a's.
    let (m2, conv2) = new_id(b.insert_message(&msg("E2", "T1", 1_500)).unwrap());
    assert_eq!(conv2, conv);
    let before = cluster().sql(
        &opts,
        "SELECT id, state, coalesce(turn_id, 0) FROM messages ORDER BY id",
    );

    let err = b.start_turn(conv, &[m2], 2_000).unwrap_err();
    assert!(
        matches!(&err, StoreError::NotOwner { owner, .. } if owner == "node-a"),
        "{err:?}"
    );
    assert_eq!(
        b.claim(conv, 2_000).unwrap(),
        Ownership::Other {
            node: "node-a".into(),
            until_ms: 1_000 + LEASE_MS
        }
    );
    assert!(b.take_over(2_000).unwrap().is_empty());
    let err = b
        .finish_turn(t, TurnState::Done, 5, None, 2_000)
        .unwrap_err();
    assert!(matches!(err, StoreError::NotOwner { .. }), "{err:?}");

    // Nothing changed: a's turn runs, the messages are as they were, the
    // lease is a's.
    assert_eq!(a.turn(t).unwrap().unwrap().state, TurnState::Running);
    let after = cluster().sql(
        &opts,
        "SELECT id, state, coalesce(turn_id, 0) FROM messages ORDER BY id",
    );
    assert_eq!(before, after);
    assert_eq!(
        cluster().sql(&opts, "SELECT node FROM conversation_owners")[0][0].as_deref(),
        Some("node-a")
    );
    // a goes on as if b did not exist.
    a.finish_turn(t, TurnState::Done, 5, None, 2_500).unwrap();
    let t2 = a.start_turn(conv, &[m2], 2_600).unwrap();
    a.finish_turn(t2, TurnState::Done, 5, None, 2_700).unwrap();
    assert_eq!(
        a.message(m2).unwrap().unwrap().state,
        MessageState::Answered
    );
}

/// H1: node a dies (no more heartbeats) with a turn running and messages
/// waiting. Nobody takes its conversations while its lease runs; the first
/// take-over after the lease (at most LEASE after a's last heartbeat) gets
/// them, each message to exactly one of the two survivors racing for them;
/// a's late answer is refused; every message is answered exactly once.
#[test]
fn attack_h1_a_dead_nodes_conversations_are_taken_over_once_after_its_lease() {
    let opts = cluster().fresh();
    let a = node(&opts, "node-a");
    let mut ids = Vec::new();
    for i in 0..30 {
        let (m, c) = new_id(
            a.insert_message(&msg(&format!("E{i}"), &format!("T{}", i % 6), 10_000))
                .unwrap(),
        );
        ids.push((m, c));
    }
    let (m0, c0) = ids[0];
    let running = a.start_turn(c0, &[m0], 10_000).unwrap();
    assert_eq!(a.heartbeat(20_000).unwrap(), 6);
    let last_heartbeat = 20_000;
    // a "dies": it stops heartbeating. (Its store stays open only so that
    // its late answer can be tried below.)
    let b = Arc::new(node(&opts, "node-b"));
    let c = Arc::new(node(&opts, "node-c"));
    // While a's lease runs: nothing to take.
    assert!(b.take_over(last_heartbeat + LEASE_MS).unwrap().is_empty());
    assert!(c.take_over(last_heartbeat + 1).unwrap().is_empty());
    // Just after it: b and c race.
    let barrier = Arc::new(Barrier::new(2));
    let racers: Vec<_> = [Arc::clone(&b), Arc::clone(&c)]
        .into_iter()
        .map(|s| {
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                s.take_over(last_heartbeat + LEASE_MS + 1).unwrap()
            })
        })
        .collect();
    let got: Vec<Vec<moat_store::StoredMessage>> =
        racers.into_iter().map(|h| h.join().unwrap()).collect();
    let mut seen = BTreeSet::new();
    for m in got.iter().flatten() {
        assert!(seen.insert(m.id), "message {} handed to two nodes", m.id);
        assert_eq!(m.state, MessageState::Queued);
    }
    let all: BTreeSet<i64> = ids.iter().map(|(m, _)| *m).collect();
    assert_eq!(seen, all, "every unanswered message is handed over");
    let turn = b.turn(running).unwrap().unwrap();
    assert_eq!(turn.state, TurnState::Failed);
    assert!(turn.error.unwrap().contains("node-a"));
    // a wakes up and tries to answer: refused, nothing recorded.
    let err = a
        .finish_turn(running, TurnState::Done, 9, None, 50_000)
        .unwrap_err();
    assert!(matches!(err, StoreError::NotOwner { .. }), "{err:?}");
    // The new owners answer what they were handed.
    for (store, msgs) in [(&b, &got[0]), (&c, &got[1])] {
        let mut by_conv: HashMap<i64, Vec<i64>> = HashMap::new();
        for m in msgs {
            by_conv.entry(m.conversation_id).or_default().push(m.id);
        }
        for (conv, ms) in by_conv {
            let t = store.start_turn(conv, &ms, 60_000).unwrap();
            store
                .finish_turn(t, TurnState::Done, 1, None, 60_001)
                .unwrap();
        }
    }
    let states = cluster().sql(&opts, "SELECT state, count(*) FROM messages GROUP BY state");
    assert_eq!(
        states,
        vec![vec![Some("answered".to_string()), Some("30".to_string())]]
    );
    // Each answered by one turn that finished done.
    let done = cluster().sql(
        &opts,
        "SELECT count(DISTINCT m.id) FROM messages m JOIN turns t ON t.id = m.turn_id
         WHERE t.state = 'done'",
    );
    assert_eq!(done[0][0].as_deref(), Some("30"));
}

#[test]
fn a_dead_nodes_undelivered_answer_is_delivered_by_the_node_that_takes_over() {
    let opts = cluster().fresh();
    let a = node(&opts, "node-a");
    let (m, c) = new_id(a.insert_message(&msg("E1", "T1", 10_000)).unwrap());
    let t = a.start_turn(c, &[m], 10_000).unwrap();
    a.finish_turn_keeping(t, TurnState::Done, "kept on postgres", false, None, 10_001)
        .unwrap();
    // a owes it; b, which does not own the conversation, does not.
    let b = node(&opts, "node-b");
    assert_eq!(a.undelivered_answers().unwrap().len(), 1);
    assert!(b.undelivered_answers().unwrap().is_empty());
    // a dies before delivering; after its lease b takes the conversation
    // over: the kept answer is b's to deliver, the message is not run again.
    assert!(b.take_over(10_001 + LEASE_MS + 1).unwrap().is_empty());
    let owed = b.undelivered_answers().unwrap();
    assert_eq!(owed.len(), 1);
    assert_eq!(owed[0].turn_id, t);
    assert_eq!(owed[0].answer, "kept on postgres");
    assert!(a.undelivered_answers().unwrap().is_empty());
    b.mark_delivered(t, 40_000).unwrap();
    assert!(b.undelivered_answers().unwrap().is_empty());
    let row = cluster().sql(&opts, "SELECT delivery FROM turns");
    assert_eq!(row, vec![vec![Some("delivered".to_string())]]);
}
