//! moat-store against real database files: opening and migrating, the inbox
//! and its duplicates, the message and turn state machines, the crash path
//! (a dropped store, and a writer process killed with SIGKILL mid-write),
//! concurrent inserts, idle conversations, and the insert rate. The tests
//! of the store's logic run on both databases (`both!`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use moat_store::{
    Conversation, Durability, IncomingMessage, Inserted, MessageState, SandboxMode, Store,
    StoreError, TurnState,
};

/// The tests of the store's logic, each run on both databases:
/// `sqlite::NAME` on an in-memory SQLite store, `postgres::NAME` on a fresh
/// database of the test process's throwaway PostgreSQL (moat-testpg).
macro_rules! both {
    ($($name:ident => $body:expr;)*) => {
        mod sqlite {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[test]
                fn $name() {
                    ($body)(Store::open_in_memory().unwrap())
                }
            )*
        }
        mod postgres {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[test]
                fn $name() {
                    ($body)(Store::open_postgres(&moat_testpg::cluster().fresh(), None).unwrap())
                }
            )*
        }
    };
}

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

fn mode_of(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn sidecar(db: &Path, suffix: &str) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// A plain SQLite connection, to look at or tamper with a file from outside
/// the store (which must be dropped first: it holds the lock).
fn rusqlite_conn(db: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open(db).unwrap()
}

/// Reads a pragma's value as text with a plain connection.
fn raw_pragma(db: &Path, pragma: &str) -> String {
    use rusqlite::types::Value;
    let v: Value = rusqlite_conn(db)
        .query_row(&format!("PRAGMA {pragma}"), [], |r| r.get(0))
        .unwrap();
    match v {
        Value::Integer(i) => i.to_string(),
        Value::Text(t) => t,
        other => format!("{other:?}"),
    }
}

// ---- opening, files, migrations -------------------------------------------

#[test]
fn open_creates_private_files_migrates_and_reopens() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data").join("moat");
    let db = dir.join("moat.db");
    let first = {
        let store = Store::open(&db).unwrap();
        assert_eq!(store.path(), db);
        assert_eq!(store.durability(), Durability::ProcessCrash);
        assert_eq!(mode_of(&dir), 0o700, "data directory");
        assert_eq!(mode_of(tmp.path().join("data").as_path()), 0o700);
        assert_eq!(mode_of(&db), 0o600, "database file");
        assert_eq!(mode_of(&sidecar(&db, ".lock")), 0o600, "lock file");
        let (m, _) = new_id(store.insert_message(&msg("E1", "T1", 1_000)).unwrap());
        // SQLite creates the WAL beside the file with the file's mode.
        assert_eq!(mode_of(&sidecar(&db, "-wal")), 0o600, "WAL file");
        assert!(store.check_integrity().unwrap().is_empty());
        m
    };
    // Closing checkpointed everything and removed the WAL.
    assert!(!sidecar(&db, "-wal").exists(), "WAL left after close");
    assert_eq!(raw_pragma(&db, "journal_mode"), "wal");
    assert_eq!(
        raw_pragma(&db, "user_version"),
        moat_store::schema_version().to_string()
    );
    assert_eq!(
        raw_pragma(&db, "application_id"),
        moat_store::APPLICATION_ID.to_string()
    );
    // Re-open: nothing to migrate, the data is there, and it still works.
    for _ in 0..2 {
        let store = Store::open(&db).unwrap();
        let m = store.message(first).unwrap().expect("stored message");
        assert_eq!(m.event_id, "E1");
        assert_eq!(
            store.insert_message(&msg("E1", "T1", 1_000)).unwrap(),
            Inserted::Duplicate { message_id: first }
        );
    }
    assert_eq!(
        raw_pragma(&db, "user_version"),
        moat_store::schema_version().to_string()
    );
}

#[test]
fn a_loose_existing_file_is_narrowed_to_0600() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("moat.db");
    std::fs::write(&db, b"").unwrap();
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    let store = Store::open(&db).unwrap();
    assert_eq!(mode_of(&db), 0o600);
    new_id(store.insert_message(&msg("E1", "T", 1)).unwrap());
}

#[test]
fn a_second_open_of_the_same_database_is_refused_while_the_first_lives() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("moat.db");
    let first = Store::open(&db).unwrap();
    let err = Store::open(&db).unwrap_err();
    assert!(matches!(err, StoreError::Locked { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.starts_with(&format!(
            "database at {} is locked by another process",
            db.display()
        )),
        "{text}"
    );
    drop(first);
    Store::open(&db).expect("free again once the first store is gone");
}

#[test]
fn a_database_from_a_newer_moat_is_refused_and_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("moat.db");
    drop(Store::open(&db).unwrap());
    let newer = moat_store::schema_version() + 5;
    rusqlite_conn(&db)
        .execute_batch(&format!("PRAGMA user_version = {newer}"))
        .unwrap();
    let err = Store::open(&db).unwrap_err();
    assert!(matches!(err, StoreError::TooNew { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "database at {} was written by a newer moat (schema {newer} > {}); upgrade moat",
            db.display(),
            moat_store::schema_version()
        )
    );
    assert_eq!(raw_pragma(&db, "user_version"), newer.to_string());
}

#[test]
fn another_programs_database_is_refused_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("other.db");
    rusqlite_conn(&db)
        .execute_batch("PRAGMA application_id = 1234; CREATE TABLE notes (body TEXT);")
        .unwrap();
    let err = Store::open(&db).unwrap_err();
    assert!(
        matches!(err, StoreError::NotMoat { found: 1234, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("not moat's"), "{err}");
    // Still in its own journal mode, without moat's tables.
    assert_eq!(raw_pragma(&db, "journal_mode"), "delete");
    assert_eq!(raw_pragma(&db, "user_version"), "0");
}

#[test]
fn a_file_that_is_not_a_database_is_reported_as_such() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("moat.db");
    std::fs::write(&db, vec![0x5a; 8192]).unwrap();
    let err = Store::open(&db).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
    assert!(err.to_string().contains("move it aside"), "{err}");
}

#[test]
fn a_write_lock_held_by_another_program_fails_after_the_busy_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("moat.db");
    let store = Store::open(&db).unwrap();
    // An operator's sqlite3 shell in the middle of a write transaction.
    let shell = rusqlite_conn(&db);
    shell.execute_batch("BEGIN IMMEDIATE").unwrap();
    let start = Instant::now();
    let err = store.insert_message(&msg("E1", "T", 1)).unwrap_err();
    assert!(
        start.elapsed() >= moat_store::BUSY_TIMEOUT / 2,
        "{:?}",
        start.elapsed()
    );
    assert!(matches!(err, StoreError::Busy { .. }), "{err:?}");
    assert!(err.to_string().contains("close it and retry"), "{err}");
    shell.execute_batch("ROLLBACK").unwrap();
    new_id(store.insert_message(&msg("E1", "T", 1)).unwrap());
}

#[test]
fn store_is_send_and_sync() {
    fn shared<T: Send + Sync + 'static>() {}
    shared::<Store>();
    shared::<StoreError>();
}

// ---- the inbox ---------------------------------------------------------------

fn a_retried_event_is_a_duplicate_never_a_second_row(store: Store) {
    let (m1, c1) = new_id(store.insert_message(&msg("Ev1", "T1", 1_000)).unwrap());
    // Slack retries the same event, even with a later timestamp.
    for ts in [1_000, 4_000] {
        assert_eq!(
            store.insert_message(&msg("Ev1", "T1", ts)).unwrap(),
            Inserted::Duplicate { message_id: m1 }
        );
    }
    // The duplicate wrote nothing: the conversation did not move.
    assert_eq!(
        store.conversation(c1).unwrap().unwrap().last_active_ms,
        1_000
    );
    // The same thread, a new event: the same conversation.
    let (m2, c2) = new_id(store.insert_message(&msg("Ev2", "T1", 2_000)).unwrap());
    assert_eq!(c2, c1);
    assert!(m2 > m1);
    // Another thread: another conversation.
    let (_, c3) = new_id(store.insert_message(&msg("Ev3", "T2", 2_500)).unwrap());
    assert_ne!(c3, c1);
    // The same event id on another platform is another event.
    let mut web = msg("Ev1", "T1", 3_000);
    web.platform = "web".into();
    let (_, c4) = new_id(store.insert_message(&web).unwrap());
    assert_ne!(c4, c1, "web's thread T1 is not slack's");
    let conv = store.conversation(c1).unwrap().unwrap();
    assert_eq!(
        (conv.created_ms, conv.last_active_ms, conv.sandbox_mode),
        (1_000, 2_000, None)
    );
    assert_eq!(store.queue_depth().unwrap(), 4);
    let stored = store.message(m1).unwrap().unwrap();
    assert_eq!(
        (
            stored.state,
            stored.text.as_str(),
            stored.user.as_str(),
            stored.turn_id
        ),
        (MessageState::Received, "text of Ev1", "U1", None)
    );
    assert_eq!(
        store
            .conversation_by_key("slack", "C1", "T1")
            .unwrap()
            .map(|c| c.id),
        Some(c1)
    );
    assert_eq!(
        store.conversation_by_key("slack", "C1", "T9").unwrap(),
        None
    );
}

fn an_event_without_an_id_is_refused(store: Store) {
    let err = store.insert_message(&msg("", "T", 1)).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Invalid {
                field: "event_id",
                ..
            }
        ),
        "{err:?}"
    );
    let mut m = msg("E", "T", 1);
    m.platform.clear();
    assert!(store.insert_message(&m).is_err());
    assert_eq!(store.queue_depth().unwrap(), 0);
}

fn message_states_follow_the_state_machine(store: Store) {
    let (a, _) = new_id(store.insert_message(&msg("A", "T", 1)).unwrap());
    let (b, conv) = new_id(store.insert_message(&msg("B", "T", 2)).unwrap());
    store
        .set_message_state(a, MessageState::Queued, None)
        .unwrap();
    assert_eq!(store.queue_depth().unwrap(), 2);
    // Running only through start_turn.
    let err = store
        .set_message_state(a, MessageState::Running, None)
        .unwrap_err();
    assert!(err.to_string().contains("only through start_turn"), "{err}");
    store
        .set_message_state(b, MessageState::Dropped, Some("unauthorised user U1"))
        .unwrap();
    let dropped = store.message(b).unwrap().unwrap();
    assert_eq!(dropped.state, MessageState::Dropped);
    assert_eq!(dropped.detail.as_deref(), Some("unauthorised user U1"));
    // Final states are final.
    for to in [
        MessageState::Queued,
        MessageState::Answered,
        MessageState::Dropped,
    ] {
        let err = store.set_message_state(b, to, None).unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::MessageTransition {
                    from: MessageState::Dropped,
                    ..
                }
            ),
            "{err:?}"
        );
    }
    assert_eq!(store.queue_depth().unwrap(), 1);
    // Handing a running message back unlinks it from its turn.
    let turn = store.start_turn(conv, &[a], 10).unwrap();
    assert_eq!(store.message(a).unwrap().unwrap().turn_id, Some(turn));
    store
        .set_message_state(a, MessageState::Queued, Some("handed back at shutdown"))
        .unwrap();
    let back = store.message(a).unwrap().unwrap();
    assert_eq!((back.state, back.turn_id), (MessageState::Queued, None));
    assert!(matches!(
        store.set_message_state(999, MessageState::Failed, None),
        Err(StoreError::NotFound {
            kind: "message",
            id: 999
        })
    ));
}

// ---- turns -----------------------------------------------------------------

fn a_turn_links_its_messages_and_finishing_it_settles_them(store: Store) {
    let (a, conv) = new_id(store.insert_message(&msg("A", "T", 100)).unwrap());
    let (b, _) = new_id(store.insert_message(&msg("B", "T", 200)).unwrap());
    let (other, other_conv) = new_id(store.insert_message(&msg("X", "T2", 250)).unwrap());
    store
        .set_message_state(b, MessageState::Queued, None)
        .unwrap();

    // Refusals change nothing.
    assert!(matches!(
        store.start_turn(conv, &[], 300),
        Err(StoreError::Invalid { .. })
    ));
    assert!(matches!(
        store.start_turn(conv, &[a, other], 300),
        Err(StoreError::WrongConversation { message_id, expected, actual })
            if message_id == other && expected == conv && actual == other_conv
    ));
    assert!(matches!(
        store.start_turn(conv, &[a, 4242], 300),
        Err(StoreError::NotFound {
            kind: "message",
            id: 4242
        })
    ));
    assert!(matches!(
        store.start_turn(77, &[a], 300),
        Err(StoreError::NotFound {
            kind: "conversation",
            id: 77
        })
    ));
    assert_eq!(
        store.message(a).unwrap().unwrap().state,
        MessageState::Received
    );
    assert!(store.interrupted_turns().unwrap().is_empty());

    let turn = store.start_turn(conv, &[a, b], 1_000).unwrap();
    for id in [a, b] {
        let m = store.message(id).unwrap().unwrap();
        assert_eq!((m.state, m.turn_id), (MessageState::Running, Some(turn)));
    }
    assert_eq!(
        store.queue_depth().unwrap(),
        1,
        "only the other thread's message waits"
    );
    assert_eq!(
        store.conversation(conv).unwrap().unwrap().last_active_ms,
        1_000
    );
    // One running turn per conversation.
    let (c, _) = new_id(store.insert_message(&msg("C", "T", 1_100)).unwrap());
    let err = store.start_turn(conv, &[c], 1_200).unwrap_err();
    assert!(
        matches!(err, StoreError::TurnRunning { turn_id, .. } if turn_id == turn),
        "{err:?}"
    );
    // A running message cannot join another turn (here: the other thread's).
    assert!(matches!(
        store.start_turn(other_conv, &[other, a], 1_200),
        Err(StoreError::WrongConversation { .. })
    ));
    let t = store.turn(turn).unwrap().unwrap();
    assert_eq!(
        (t.state, t.started_ms, t.ended_ms),
        (TurnState::Running, 1_000, None)
    );
    assert_eq!(
        store
            .turn_messages(turn)
            .unwrap()
            .iter()
            .map(|m| m.id)
            .collect::<Vec<_>>(),
        [a, b]
    );

    assert!(matches!(
        store.finish_turn(turn, TurnState::Running, 0, None, 2_000),
        Err(StoreError::TurnTransition { .. })
    ));
    store
        .finish_turn(turn, TurnState::Done, 1234, None, 2_000)
        .unwrap();
    let t = store.turn(turn).unwrap().unwrap();
    assert_eq!(
        (t.state, t.ended_ms, t.answer_chars, t.error),
        (TurnState::Done, Some(2_000), 1234, None)
    );
    for id in [a, b] {
        assert_eq!(
            store.message(id).unwrap().unwrap().state,
            MessageState::Answered
        );
    }
    assert_eq!(
        store.conversation(conv).unwrap().unwrap().last_active_ms,
        2_000
    );
    // A turn finishes once.
    let err = store
        .finish_turn(turn, TurnState::Failed, 0, Some("late"), 3_000)
        .unwrap_err();
    assert!(err.to_string().contains("finishes once"), "{err}");
    assert_eq!(store.turn(turn).unwrap().unwrap().state, TurnState::Done);

    // Failed and cancelled turns fail their messages, saying why.
    let t2 = store.start_turn(conv, &[c], 3_000).unwrap();
    store
        .finish_turn(
            t2,
            TurnState::Failed,
            0,
            Some("sandbox out of memory"),
            3_500,
        )
        .unwrap();
    let m = store.message(c).unwrap().unwrap();
    assert_eq!(
        (m.state, m.detail.as_deref()),
        (MessageState::Failed, Some("sandbox out of memory"))
    );
    let (d, _) = new_id(store.insert_message(&msg("D", "T", 3_600)).unwrap());
    let t3 = store.start_turn(conv, &[d], 3_700).unwrap();
    store
        .finish_turn(t3, TurnState::Cancelled, 0, None, 3_800)
        .unwrap();
    let m = store.message(d).unwrap().unwrap();
    assert_eq!(
        (m.state, m.detail.as_deref()),
        (MessageState::Failed, Some("cancelled"))
    );
    assert!(matches!(
        store.finish_turn(999, TurnState::Done, 0, None, 1),
        Err(StoreError::NotFound {
            kind: "turn",
            id: 999
        })
    ));
}

fn messages_since_last_turn_is_the_history_after_the_last_finished_turn(store: Store) {
    let (a, conv) = new_id(store.insert_message(&msg("A", "T", 1)).unwrap());
    let (b, _) = new_id(store.insert_message(&msg("B", "T", 2)).unwrap());
    let (_, other) = new_id(store.insert_message(&msg("Z", "T2", 3)).unwrap());
    let ids = |v: Vec<moat_store::StoredMessage>| v.into_iter().map(|m| m.id).collect::<Vec<_>>();
    assert_eq!(ids(store.messages_since_last_turn(conv).unwrap()), [a, b]);

    let t1 = store.start_turn(conv, &[a, b], 10).unwrap();
    // A follow-up during the turn.
    let (c, _) = new_id(store.insert_message(&msg("C", "T", 11)).unwrap());
    // Still running: nothing finished yet, so everything is history.
    assert_eq!(
        ids(store.messages_since_last_turn(conv).unwrap()),
        [a, b, c]
    );
    store.finish_turn(t1, TurnState::Done, 5, None, 12).unwrap();
    assert_eq!(ids(store.messages_since_last_turn(conv).unwrap()), [c]);

    let (d, _) = new_id(store.insert_message(&msg("D", "T", 13)).unwrap());
    store
        .set_message_state(d, MessageState::Dropped, Some("rate limited"))
        .unwrap();
    // Every state is returned; the caller filters.
    assert_eq!(ids(store.messages_since_last_turn(conv).unwrap()), [c, d]);
    let t2 = store.start_turn(conv, &[c], 14).unwrap();
    store
        .finish_turn(t2, TurnState::Failed, 0, Some("boom"), 15)
        .unwrap();
    // D was stored after C, the newest message of the last finished turn.
    assert_eq!(ids(store.messages_since_last_turn(conv).unwrap()), [d]);
    let (e, _) = new_id(store.insert_message(&msg("E", "T", 16)).unwrap());
    let t3 = store.start_turn(conv, &[e], 17).unwrap();
    store.finish_turn(t3, TurnState::Done, 1, None, 18).unwrap();
    assert!(store.messages_since_last_turn(conv).unwrap().is_empty());
    assert_eq!(store.messages_since_last_turn(other).unwrap().len(), 1);
    assert!(matches!(
        store.messages_since_last_turn(555),
        Err(StoreError::NotFound {
            kind: "conversation",
            ..
        })
    ));
}

// ---- conversations and idle sandboxes --------------------------------------

fn conversation_fields_are_recorded_and_unknown_ids_reported(store: Store) {
    let (_, conv) = new_id(store.insert_message(&msg("A", "T", 500)).unwrap());
    store
        .set_sandbox_mode(conv, SandboxMode::PerThread)
        .unwrap();
    store
        .set_conversation_lease(conv, Some("thread-7f3a"))
        .unwrap();
    store.set_agent_session(conv, Some("sess-1")).unwrap();
    store.touch_conversation(conv, 900).unwrap();
    store.touch_conversation(conv, 600).unwrap(); // never backwards
    let c = store.conversation(conv).unwrap().unwrap();
    assert_eq!(
        c,
        Conversation {
            id: conv,
            platform: "slack".into(),
            channel: "C1".into(),
            thread: "T".into(),
            created_ms: 500,
            last_active_ms: 900,
            sandbox_mode: Some(SandboxMode::PerThread),
            lease_name: Some("thread-7f3a".into()),
            agent_session: Some("sess-1".into()),
        }
    );
    store.set_conversation_lease(conv, None).unwrap();
    store.set_agent_session(conv, None).unwrap();
    let c = store.conversation(conv).unwrap().unwrap();
    assert_eq!((c.lease_name, c.agent_session), (None, None));
    for r in [
        store.set_conversation_lease(99, Some("x")),
        store.set_agent_session(99, None),
        store.touch_conversation(99, 1),
        store.set_sandbox_mode(99, SandboxMode::Pool),
    ] {
        assert!(matches!(
            r,
            Err(StoreError::NotFound {
                kind: "conversation",
                id: 99
            })
        ));
    }
    assert_eq!(store.conversation(99).unwrap(), None);
}

fn idle_conversations_are_per_thread_ones_holding_a_sandbox_and_doing_nothing(store: Store) {
    let conv = |event: &str, thread: &str, ts: i64, mode: SandboxMode, lease: Option<&str>| {
        let (m, c) = new_id(store.insert_message(&msg(event, thread, ts)).unwrap());
        store.set_sandbox_mode(c, mode).unwrap();
        store.set_conversation_lease(c, lease).unwrap();
        (m, c)
    };
    let (m_old, old) = conv("E1", "old", 1_000, SandboxMode::PerThread, Some("s-old"));
    let (m_older, older) = conv("E2", "older", 500, SandboxMode::PerThread, Some("s-older"));
    let (m_new, _new) = conv("E3", "new", 9_000, SandboxMode::PerThread, Some("s-new"));
    let (m_pool, _pool) = conv("E4", "pool", 100, SandboxMode::Pool, Some("lease-3"));
    let (m_none, _none) = conv("E5", "none", 100, SandboxMode::PerThread, None);
    for m in [m_old, m_older, m_new, m_pool, m_none] {
        store
            .set_message_state(m, MessageState::Answered, None)
            .unwrap();
    }
    let idle = |cutoff| {
        store
            .idle_conversations(cutoff)
            .unwrap()
            .into_iter()
            .map(|c| c.id)
            .collect::<Vec<_>>()
    };
    assert_eq!(idle(5_000), [older, old], "least recently active first");
    assert_eq!(idle(1_000), [older], "strictly before the cutoff");

    // A running turn or a waiting message keeps a conversation's sandbox.
    let (m2, _) = new_id(store.insert_message(&msg("E6", "old", 1_200)).unwrap());
    assert_eq!(idle(5_000), [older]);
    let t = store.start_turn(old, &[m2], 1_300).unwrap();
    assert_eq!(idle(5_000), [older]);
    store
        .finish_turn(t, TurnState::Done, 1, None, 1_400)
        .unwrap();
    assert_eq!(idle(5_000), [older, old]);
    // A turn's end counts as activity.
    assert_eq!(idle(1_400), [older]);
    // Deleting the sandbox (clearing the lease) takes it off the list.
    store.set_conversation_lease(older, None).unwrap();
    assert_eq!(idle(5_000), [old]);
}

// ---- crashes -----------------------------------------------------------------

#[test]
fn a_store_dropped_mid_turn_reports_the_turn_interrupted_after_reopening() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("moat.db");
    let (a, b, c, conv, turn) = {
        let store = Store::open(&db).unwrap();
        let (a, conv) = new_id(store.insert_message(&msg("A", "T", 1)).unwrap());
        let (b, _) = new_id(store.insert_message(&msg("B", "T", 2)).unwrap());
        let turn = store.start_turn(conv, &[a, b], 3).unwrap();
        let (c, _) = new_id(store.insert_message(&msg("C", "T", 4)).unwrap());
        store
            .set_message_state(c, MessageState::Queued, None)
            .unwrap();
        // Dropped without finish_turn: what a crash leaves.
        (a, b, c, conv, turn)
    };
    let store = Store::open(&db).unwrap();
    assert!(store.check_integrity().unwrap().is_empty());
    let interrupted = store.interrupted_turns().unwrap();
    assert_eq!(interrupted.len(), 1);
    assert_eq!(
        (
            interrupted[0].id,
            interrupted[0].conversation_id,
            interrupted[0].state
        ),
        (turn, conv, TurnState::Running)
    );
    let unfinished: Vec<_> = store
        .unfinished_messages()
        .unwrap()
        .into_iter()
        .map(|m| (m.id, m.state))
        .collect();
    assert_eq!(
        unfinished,
        [
            (a, MessageState::Running),
            (b, MessageState::Running),
            (c, MessageState::Queued)
        ]
    );
    // The follow-up must wait: the interrupted turn still holds the conversation.
    assert!(matches!(
        store.start_turn(conv, &[c], 5),
        Err(StoreError::TurnRunning { .. })
    ));
    // What the gateway does at start-up: fail (or retry) the interrupted turn.
    store
        .finish_turn(
            turn,
            TurnState::Failed,
            0,
            Some("interrupted by a restart"),
            6,
        )
        .unwrap();
    assert!(store.interrupted_turns().unwrap().is_empty());
    let t2 = store.start_turn(conv, &[c], 7).unwrap();
    store.finish_turn(t2, TurnState::Done, 2, None, 8).unwrap();
    assert!(store.unfinished_messages().unwrap().is_empty());
    assert_eq!(
        store.message(a).unwrap().unwrap().detail.as_deref(),
        Some("interrupted by a restart")
    );
}

/// When set, the test below is the writer child rather than the parent.
const WRITER_ENV: &str = "MOAT_STORE_TEST_WRITER_DB";
const WRITER_ROUND_ENV: &str = "MOAT_STORE_TEST_WRITER_ROUND";

/// The writer: recovers what the previous writer left (fails interrupted
/// turns and waiting messages, as a restarted gateway would), then inserts
/// messages and runs turns as fast as it can, printing each acknowledged
/// step on stdout (a pipe to the parent) only after the store returned Ok.
fn writer_child(db: &Path, round: u32) -> ! {
    let store = Store::open(db).expect("writer: open");
    let mut out = std::io::stdout().lock();
    for t in store.interrupted_turns().unwrap() {
        store
            .finish_turn(t.id, TurnState::Failed, 0, Some("interrupted"), 0)
            .unwrap();
        writeln!(out, "recovered-turn {}", t.id).unwrap();
    }
    for m in store.unfinished_messages().unwrap() {
        store
            .set_message_state(m.id, MessageState::Failed, Some("interrupted"))
            .unwrap();
    }
    writeln!(out, "ready").unwrap();
    out.flush().unwrap();
    let started = Instant::now();
    let mut waiting: HashMap<i64, Vec<i64>> = HashMap::new();
    let mut running: HashMap<i64, i64> = HashMap::new();
    let mut i: u64 = 0;
    // Bounded, so an orphan cannot run for ever if the parent dies.
    while started.elapsed() < Duration::from_secs(60) {
        let event = format!("r{round}-e{i}");
        let thread = format!("t{}", i % 7);
        match store
            .insert_message(&msg(&event, &thread, i as i64))
            .unwrap()
        {
            Inserted::New {
                message_id,
                conversation_id,
            } => {
                writeln!(out, "ack {message_id} {event}").unwrap();
                waiting.entry(conversation_id).or_default().push(message_id);
                if i % 3 == 2 {
                    if let Some(turn) = running.remove(&conversation_id) {
                        let state = [TurnState::Done, TurnState::Failed][(i % 2) as usize];
                        store.finish_turn(turn, state, i, None, i as i64).unwrap();
                        writeln!(out, "finished {turn}").unwrap();
                    } else {
                        let ids = std::mem::take(waiting.get_mut(&conversation_id).unwrap());
                        let turn = store.start_turn(conversation_id, &ids, i as i64).unwrap();
                        running.insert(conversation_id, turn);
                        writeln!(out, "started {turn}").unwrap();
                    }
                }
            }
            dup => panic!("writer: {event} already stored: {dup:?}"),
        }
        out.flush().unwrap();
        i += 1;
    }
    std::process::exit(3);
}

#[test]
fn sigkill_mid_write_loses_no_acknowledged_write() {
    if let Ok(db) = std::env::var(WRITER_ENV) {
        let round = std::env::var(WRITER_ROUND_ENV).unwrap().parse().unwrap();
        writer_child(Path::new(&db), round);
    }
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("moat.db");
    let exe = std::env::current_exe().unwrap();
    let mut acked: BTreeMap<i64, String> = BTreeMap::new();
    let mut finished: BTreeSet<i64> = BTreeSet::new();
    for round in 0..4u32 {
        let mut child = Command::new(&exe)
            .args([
                "sigkill_mid_write_loses_no_acknowledged_write",
                "--exact",
                "--test-threads=1",
            ])
            .env(WRITER_ENV, &db)
            .env(WRITER_ROUND_ENV, round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut round_acks = 0u32;
        let mut record = |line: &str, acks: &mut u32| {
            let mut w = line.split(' ');
            match (w.next(), w.next(), w.next()) {
                (Some("ack"), Some(id), Some(event)) => {
                    acked.insert(id.parse().unwrap(), event.to_string());
                    *acks += 1;
                }
                (Some("finished"), Some(id), None) => {
                    finished.insert(id.parse().unwrap());
                }
                _ => {}
            }
        };
        // Kill at a different point each round, while it writes flat out.
        let kill_after = 400 + 350 * round;
        for line in lines.by_ref() {
            let line = line.unwrap();
            record(&line, &mut round_acks);
            if round_acks >= kill_after {
                break;
            }
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the writer must still be writing when killed"
        );
        child.kill().unwrap(); // SIGKILL
                               // Whatever reached the pipe before the kill was acknowledged too.
        for line in lines {
            record(&line.unwrap(), &mut round_acks);
        }
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
        assert!(round_acks >= kill_after);

        // Reopen as a restarted gateway would.
        let store = Store::open(&db).expect("reopen after SIGKILL");
        assert_eq!(store.check_integrity().unwrap(), Vec::<String>::new());
        for (id, event) in &acked {
            let m = store
                .message(*id)
                .unwrap()
                .unwrap_or_else(|| panic!("acknowledged message {id} ({event}) lost"));
            assert_eq!(&m.event_id, event);
        }
        for turn in &finished {
            let t = store.turn(*turn).unwrap().expect("acknowledged turn");
            assert_ne!(t.state, TurnState::Running, "turn {turn} was finished");
            for m in store.turn_messages(*turn).unwrap() {
                assert!(
                    m.state.is_final(),
                    "message {} of finished turn {turn}",
                    m.id
                );
            }
        }
        // Atomicity: running messages sit exactly in running turns, and no
        // running turn is without its messages.
        let interrupted = store.interrupted_turns().unwrap();
        let running_turns: BTreeSet<i64> = interrupted.iter().map(|t| t.id).collect();
        for m in store.unfinished_messages().unwrap() {
            if m.state == MessageState::Running {
                assert!(running_turns.contains(&m.turn_id.unwrap()), "{m:?}");
            }
        }
        for t in &interrupted {
            assert!(!store.turn_messages(t.id).unwrap().is_empty(), "{t:?}");
        }
        eprintln!(
            "round {round}: {round_acks} acknowledged inserts, all present; {} turns interrupted",
            interrupted.len()
        );
    }
    assert!(acked.len() >= 400 + 750 + 1100 + 1450);
}

// ---- concurrency and rate ------------------------------------------------------

#[test]
fn concurrent_inserts_store_each_event_once() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(tmp.path().join("moat.db")).unwrap());
    const THREADS: usize = 4;
    const EVENTS: usize = 300;
    let barrier = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let store = Arc::clone(&store);
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                let mut new = Vec::new();
                let mut dup = 0;
                // Every thread delivers every event: as if each were a retry.
                for e in 0..EVENTS {
                    let e = (e + t * 7) % EVENTS;
                    match store
                        .insert_message(&msg(&format!("E{e}"), &format!("T{}", e % 10), e as i64))
                        .unwrap()
                    {
                        Inserted::New { message_id, .. } => new.push((e, message_id)),
                        Inserted::Duplicate { .. } => dup += 1,
                    }
                }
                (new, dup)
            })
        })
        .collect();
    let mut first: HashMap<usize, i64> = HashMap::new();
    let mut dups = 0;
    for h in handles {
        let (new, dup) = h.join().unwrap();
        dups += dup;
        for (e, id) in new {
            assert!(first.insert(e, id).is_none(), "event E{e} stored twice");
        }
    }
    assert_eq!(first.len(), EVENTS);
    assert_eq!(dups, EVENTS * (THREADS - 1));
    assert_eq!(store.unfinished_messages().unwrap().len(), EVENTS);
    for (e, id) in first {
        assert_eq!(
            store.message(id).unwrap().unwrap().event_id,
            format!("E{e}")
        );
    }
    // Ten threads, ten conversations.
    let convs: BTreeSet<i64> = store
        .unfinished_messages()
        .unwrap()
        .iter()
        .map(|m| m.conversation_id)
        .collect();
    assert_eq!(convs.len(), 10);
}

fn unfinished_messages_are_oldest_first_and_exclude_settled_ones(store: Store) {
    let mut ids = Vec::new();
    for i in 0..6 {
        // Platform timestamps out of order: stored order decides.
        let (id, _) = new_id(
            store
                .insert_message(&msg(&format!("E{i}"), "T", 100 - i))
                .unwrap(),
        );
        ids.push(id);
    }
    store
        .set_message_state(ids[1], MessageState::Answered, None)
        .unwrap();
    store
        .set_message_state(ids[2], MessageState::Dropped, Some("bot"))
        .unwrap();
    store
        .set_message_state(ids[3], MessageState::Queued, None)
        .unwrap();
    let conv = store.message(ids[0]).unwrap().unwrap().conversation_id;
    store.start_turn(conv, &[ids[4]], 5).unwrap();
    let got: Vec<_> = store
        .unfinished_messages()
        .unwrap()
        .into_iter()
        .map(|m| (m.id, m.state))
        .collect();
    assert_eq!(
        got,
        [
            (ids[0], MessageState::Received),
            (ids[3], MessageState::Queued),
            (ids[4], MessageState::Running),
            (ids[5], MessageState::Received)
        ]
    );
    assert_eq!(store.queue_depth().unwrap(), 3);
}

#[test]
fn the_checkpointer_moves_committed_rows_into_the_database_file() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("moat.db");
    let store = Store::open(&db).unwrap();
    // Few enough that the writer's own auto-checkpoint (10,000 pages) never
    // runs: only the background checkpointer can copy these into the file.
    for i in 0..200 {
        new_id(
            store
                .insert_message(&msg(&format!("E{i}"), "T", i))
                .unwrap(),
        );
    }
    // The main file alone (without its WAL) holds what was checkpointed.
    let copy = tmp.path().join("copy.db");
    let deadline = Instant::now() + Duration::from_secs(20);
    let rows = loop {
        std::fs::copy(&db, &copy).unwrap();
        let rows: i64 = rusqlite_conn(&copy)
            .query_row("SELECT count(*) FROM messages", [], |r| r.get(0))
            .unwrap_or(-1);
        if rows == 200 || Instant::now() > deadline {
            break rows;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(rows, 200, "rows in the database file without its WAL");
    drop(store);
}

/// Measures `insert_message` on a database file; prints, asserts only that
/// every insert was stored. Run with
/// `cargo test --release -p moat-store --test store insert_rate -- --nocapture`.
#[test]
fn insert_rate() {
    let tmp = tempfile::tempdir().unwrap();
    for (durability, n, threads) in [
        (Durability::ProcessCrash, 20_000usize, 1usize),
        (Durability::ProcessCrash, 20_000, 4),
        (Durability::PowerLoss, 2_000, 1),
    ] {
        let db = tmp.path().join(format!("rate-{durability:?}-{threads}.db"));
        let store = Arc::new(Store::open_with(&db, durability).unwrap());
        let start = Instant::now();
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let store = Arc::clone(&store);
                std::thread::spawn(move || {
                    let mut took = Vec::with_capacity(n / threads + 1);
                    for i in (t..n).step_by(threads) {
                        let mut m = msg(&format!("Ev{i:08}"), &format!("T{}", i % 50), i as i64);
                        m.text = "please run the tests and tell me what fails".into();
                        let one = Instant::now();
                        new_id(store.insert_message(&m).unwrap());
                        took.push(one.elapsed());
                    }
                    took
                })
            })
            .collect();
        let mut took: Vec<Duration> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        let secs = start.elapsed().as_secs_f64();
        assert_eq!(store.queue_depth().unwrap(), n as u64);
        took.sort();
        let pct = |p: usize| took[(took.len() * p / 100).min(took.len() - 1)].as_micros();
        println!(
            "insert_message, {durability:?}, {threads} thread(s): {n} inserts in {secs:.3} s = {:.0} inserts/s; \
             latency p50 {} us, p99 {} us, max {} us",
            n as f64 / secs,
            pct(50),
            pct(99),
            took.last().unwrap().as_micros()
        );
    }
}

fn github_links_find_the_conversation_and_deliveries_are_taken_once(store: Store) {
    let (_, conversation_id) = new_id(store.insert_message(&msg("ev-gh", "T1", 1)).unwrap());
    assert_eq!(
        store
            .github_conversation("acme/app", Some(3), None)
            .unwrap(),
        None
    );
    store
        .link_github(
            "Acme/App",
            moat_store::GithubLink::Branch("moat/1-x"),
            conversation_id,
            5,
        )
        .unwrap();
    store
        .link_github(
            "acme/app",
            moat_store::GithubLink::PullRequest(3),
            conversation_id,
            6,
        )
        .unwrap();
    assert_eq!(
        store
            .github_conversation("ACME/app", Some(3), None)
            .unwrap(),
        Some(conversation_id)
    );
    assert_eq!(
        store
            .github_conversation("acme/app", None, Some("moat/1-x"))
            .unwrap(),
        Some(conversation_id),
        "a check suite names only the branch"
    );
    assert_eq!(
        store
            .github_conversation("acme/app", Some(4), Some("moat/1-x"))
            .unwrap(),
        None,
        "a pull request moat did not open finds nobody, whatever its branch"
    );
    assert_eq!(
        store
            .github_conversation("acme/other", Some(3), Some("moat/1-x"))
            .unwrap(),
        None
    );
    assert!(store.take_github_delivery("d-1", 1_000).unwrap());
    assert!(
        !store.take_github_delivery("d-1", 2_000).unwrap(),
        "a replay"
    );
    // Forgotten after a week.
    assert!(store
        .take_github_delivery("d-1", 1_000 + 8 * 24 * 3600 * 1000)
        .unwrap());
}

fn a_github_link_stays_with_the_conversation_that_made_it(store: Store) {
    let (_, first) = new_id(store.insert_message(&msg("ev-a", "TA", 1)).unwrap());
    let (_, other) = new_id(store.insert_message(&msg("ev-b", "TB", 2)).unwrap());
    let b = moat_store::GithubLink::Branch("moat/1-x");
    store.link_github("acme/app", b, first, 5).unwrap();
    store.link_github("acme/app", b, other, 6).unwrap();
    assert_eq!(
        store
            .github_conversation("acme/app", None, Some("moat/1-x"))
            .unwrap(),
        Some(first)
    );
}

fn task(channel: &str, next: i64) -> moat_store::NewTask {
    moat_store::NewTask {
        platform: "slack".into(),
        channel: channel.into(),
        thread: String::new(),
        creator: "U1".into(),
        prompt: "moat:looks like a prefix".into(),
        kind: "interval".into(),
        spec: "10m".into(),
        context: "isolated".into(),
        next_run_ms: next,
        created_ms: 0,
    }
}

fn tasks_round_trip_come_due_and_keep_their_run_log(store: Store) {
    use moat_store::{TaskRun, TaskState};
    let a = store.insert_task(&task("C1", 100)).unwrap();
    let b = store.insert_task(&task("C2", 50)).unwrap();
    let got = store.task(a).unwrap().unwrap();
    assert_eq!(got.prompt, "moat:looks like a prefix");
    assert_eq!((got.state, got.next_run_ms), (TaskState::Active, Some(100)));
    assert_eq!(store.task(999).unwrap(), None);
    assert_eq!(store.tasks_of_channel("slack", "C1").unwrap(), [got]);
    let due: Vec<i64> = store
        .due_tasks(100, 10)
        .unwrap()
        .iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(due, [b, a]);
    assert_eq!(store.due_tasks(99, 10).unwrap().len(), 1);
    assert_eq!(store.due_tasks(100, 1).unwrap().len(), 1);
    store
        .set_task_state(b, TaskState::Paused, None, None)
        .unwrap();
    assert_eq!(store.due_tasks(100, 10).unwrap().len(), 1);
    assert_eq!(store.next_due_ms().unwrap(), Some(100));
    assert_eq!(store.count_tasks_of_channel("slack", "C2").unwrap(), 1);
    store
        .set_task_state(b, TaskState::Cancelled, None, Some("by U1"))
        .unwrap();
    assert_eq!(store.count_tasks_of_channel("slack", "C2").unwrap(), 0);
    assert_eq!(store.live_tasks().unwrap().len(), 1);
    assert_eq!(
        store.task(b).unwrap().unwrap().detail.as_deref(),
        Some("by U1")
    );
    assert!(matches!(
        store.set_task_state(999, TaskState::Paused, None, None),
        Err(StoreError::NotFound {
            kind: "task",
            id: 999
        })
    ));
    // Active needs a next run (the schema holds it); the task is unchanged.
    assert!(store
        .set_task_state(a, TaskState::Active, None, None)
        .is_err());
    assert_eq!(store.task(a).unwrap().unwrap().next_run_ms, Some(100));
    store
        .set_task_state(a, TaskState::Done, None, None)
        .unwrap();
    assert_eq!(store.next_due_ms().unwrap(), None);
    for (i, outcome) in ["started", "refused"].into_iter().enumerate() {
        let i = i as i64;
        store
            .record_task_run(
                a,
                &TaskRun {
                    due_ms: 100 + i,
                    started_ms: 101 + i,
                    outcome: outcome.into(),
                    detail: (i == 1).then(|| "creator removed".to_string()),
                },
            )
            .unwrap();
    }
    let runs = store.task_runs(a, 5).unwrap();
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0].outcome, "refused");
    assert_eq!(runs[0].detail.as_deref(), Some("creator removed"));
    assert_eq!(store.task_runs(a, 1).unwrap().len(), 1);
}

fn groups_register_once_and_a_second_registration_renames(store: Store) {
    let mut g = moat_store::RegisteredGroup {
        platform: "slack".into(),
        channel: "C9".into(),
        name: "ops".into(),
        registered_by: "U1".into(),
        created_ms: 1,
    };
    assert!(store.register_group(&g).unwrap());
    assert!(!store.register_group(&g).unwrap());
    assert_eq!(store.registered_groups().unwrap(), [g.clone()]);
    g.name = "ops-2".into();
    assert!(!store.register_group(&g).unwrap());
    assert_eq!(store.registered_group("slack", "C9").unwrap(), Some(g));
    assert_eq!(store.registered_group("slack", "C8").unwrap(), None);
}

fn admitted_users_stay_admitted_in_their_channel_only(store: Store) {
    assert!(!store.is_admitted("slack", "C1", "U1").unwrap());
    assert!(store.admit_user("slack", "C1", "U1", "UADMIN", 1).unwrap());
    assert!(!store.admit_user("slack", "C1", "U1", "UADMIN", 2).unwrap());
    assert!(store.is_admitted("slack", "C1", "U1").unwrap());
    assert!(!store.is_admitted("slack", "C2", "U1").unwrap());
    assert!(!store.is_admitted("web", "C1", "U1").unwrap());
    assert!(!store.is_admitted("slack", "C1", "U2").unwrap());
}

both! {
    a_retried_event_is_a_duplicate_never_a_second_row => super::a_retried_event_is_a_duplicate_never_a_second_row;
    an_event_without_an_id_is_refused => super::an_event_without_an_id_is_refused;
    message_states_follow_the_state_machine => super::message_states_follow_the_state_machine;
    a_turn_links_its_messages_and_finishing_it_settles_them => super::a_turn_links_its_messages_and_finishing_it_settles_them;
    messages_since_last_turn_is_the_history_after_the_last_finished_turn => super::messages_since_last_turn_is_the_history_after_the_last_finished_turn;
    conversation_fields_are_recorded_and_unknown_ids_reported => super::conversation_fields_are_recorded_and_unknown_ids_reported;
    idle_conversations_are_per_thread_ones_holding_a_sandbox_and_doing_nothing => super::idle_conversations_are_per_thread_ones_holding_a_sandbox_and_doing_nothing;
    unfinished_messages_are_oldest_first_and_exclude_settled_ones => super::unfinished_messages_are_oldest_first_and_exclude_settled_ones;
    github_links_find_the_conversation_and_deliveries_are_taken_once => super::github_links_find_the_conversation_and_deliveries_are_taken_once;
    a_github_link_stays_with_the_conversation_that_made_it => super::a_github_link_stays_with_the_conversation_that_made_it;
    tasks_round_trip_come_due_and_keep_their_run_log => super::tasks_round_trip_come_due_and_keep_their_run_log;
    groups_register_once_and_a_second_registration_renames => super::groups_register_once_and_a_second_registration_renames;
    admitted_users_stay_admitted_in_their_channel_only => super::admitted_users_stay_admitted_in_their_channel_only;
}
