//! Encryption at rest against real database files: with a key, no
//! plaintext of a sealed field reaches the database file or its WAL; a
//! missing or wrong key is refused at open, naming MOAT_STORE_KEY and never
//! showing key material; old plaintext stays readable until `rekey`, which
//! re-seals everything at once (or nothing) and leaves no old bytes behind;
//! a sealed value moved to another row is refused, never shown as garbage.

use std::path::{Path, PathBuf};

use moat_store::{
    Durability, Encryption, IncomingMessage, Inserted, MessageState, Store, StoreError, StoreKey,
    TurnState, KEY_VAR,
};

const KEY_A: &str = "q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA=";
const KEY_B_HEX: &str = "0123456789abcdef00112233445566778899aabbccddeeff0f1e2d3c4b5a6978";

fn key_a() -> StoreKey {
    StoreKey::parse(KEY_VAR, KEY_A).unwrap()
}

fn key_b() -> StoreKey {
    StoreKey::parse(KEY_VAR, KEY_B_HEX).unwrap()
}

fn open(db: &Path, key: Option<StoreKey>) -> Result<Store, StoreError> {
    Store::open_with_key(db, Durability::ProcessCrash, key)
}

/// A marker no test writes twice, hard to find by chance in a file.
fn marker(what: &str) -> String {
    let mut b = [0u8; 8];
    getrandom(&mut b);
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{what}-PLAINTEXT-{hex}")
}

fn getrandom(b: &mut [u8]) {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(b)
        .unwrap();
}

fn msg(event_id: &str, text: &str) -> IncomingMessage {
    IncomingMessage {
        platform: "web".into(),
        event_id: event_id.into(),
        channel: "alice".into(),
        thread: "t1".into(),
        user: "alice".into(),
        text: text.into(),
        ts_ms: 1,
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

/// The database file with its `-wal` and `-shm`, as bytes.
fn files_of(db: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    ["", "-wal", "-shm"]
        .iter()
        .filter_map(|suffix| {
            let mut p = db.as_os_str().to_owned();
            p.push(suffix);
            let p = PathBuf::from(p);
            std::fs::read(&p).ok().map(|b| (p, b))
        })
        .collect()
}

/// Which of `needles` appear in the database's files.
fn found_in_files(db: &Path, needles: &[&str]) -> Vec<String> {
    let files = files_of(db);
    assert!(!files.is_empty(), "no database files at {}", db.display());
    let mut found = Vec::new();
    for n in needles {
        for (p, bytes) in &files {
            if bytes.windows(n.len()).any(|w| w == n.as_bytes()) {
                found.push(format!("{n} in {}", p.display()));
            }
        }
    }
    found
}

/// Writes one message with every sealed field filled: the text, a failed
/// turn's error (and so the message's detail), the agent session. Returns
/// (message id, conversation id).
fn write_all_fields(s: &Store, event: &str, text: &str, error: &str, session: &str) -> (i64, i64) {
    let (m, c) = new_id(s.insert_message(&msg(event, text)).unwrap());
    s.set_agent_session(c, Some(session)).unwrap();
    let t = s.start_turn(c, &[m], 2).unwrap();
    s.finish_turn(t, TurnState::Failed, 0, Some(error), 3)
        .unwrap();
    (m, c)
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn with_a_key_no_sealed_field_reaches_the_files_in_clear() {
    let dir = tmp();
    // Control: without a key the same writes are in the files, so the
    // search below can see plaintext when it is there.
    let plain_db = dir.path().join("plain.db");
    let (t0, e0, s0) = (marker("text"), marker("error"), marker("session"));
    {
        let s = open(&plain_db, None).unwrap();
        assert_eq!(s.encryption(), Encryption::Off);
        write_all_fields(&s, "e0", &t0, &e0, &s0);
        assert!(found_in_files(&plain_db, &[&t0, &e0, &s0]).len() >= 3);
    }

    let db = dir.path().join("moat.db");
    let (text, error, session) = (marker("text"), marker("error"), marker("session"));
    let s = open(&db, Some(key_a())).unwrap();
    assert!(matches!(s.encryption(), Encryption::On { ref key_id } if key_id == key_a().id()));
    let (m, c) = write_all_fields(&s, "e1", &text, &error, &session);
    // Still open: the WAL holds the writes.
    let leaks = found_in_files(&db, &[&text, &error, &session]);
    assert!(leaks.is_empty(), "plaintext on disk: {leaks:?}");
    // The store reads them back as written.
    let got = s.message(m).unwrap().unwrap();
    assert_eq!(got.text, text);
    assert_eq!(got.detail.as_deref(), Some(error.as_str()));
    assert_eq!(got.state, MessageState::Failed);
    let conv = s.conversation(c).unwrap().unwrap();
    assert_eq!(conv.agent_session.as_deref(), Some(session.as_str()));
    assert_eq!(s.turn_messages(got.turn_id.unwrap()).unwrap()[0].text, text);
    assert_eq!(
        s.turn(got.turn_id.unwrap())
            .unwrap()
            .unwrap()
            .error
            .as_deref(),
        Some(error.as_str())
    );
    drop(s);
    // Closed and checkpointed: the database file alone.
    let leaks = found_in_files(&db, &[&text, &error, &session]);
    assert!(leaks.is_empty(), "plaintext on disk: {leaks:?}");
    // What is there instead is an envelope.
    let raw: String = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row("SELECT text FROM messages WHERE id = ?1", [m], |r| r.get(0))
        .unwrap();
    assert!(
        raw.starts_with(&format!("moat:v1:{}:", key_a().id())),
        "{raw}"
    );
}

#[test]
fn a_store_with_sealed_values_is_refused_without_its_key_or_with_another() {
    let dir = tmp();
    let db = dir.path().join("moat.db");
    drop(open(&db, Some(key_a())).unwrap());

    let err = open(&db, None).unwrap_err();
    assert!(matches!(err, StoreError::KeyMissing { .. }), "{err:?}");
    assert!(err.to_string().contains("MOAT_STORE_KEY"), "{err}");

    let err = open(&db, Some(key_b())).unwrap_err();
    let text = err.to_string();
    match &err {
        StoreError::WrongKey {
            stored, configured, ..
        } => {
            assert_eq!(stored, key_a().id());
            assert_eq!(configured, key_b().id());
        }
        other => panic!("expected WrongKey, got {other:?}"),
    }
    assert!(text.contains("MOAT_STORE_KEY"), "{text}");
    assert_no_key_material(&format!("{text} {err:?}"));
    // Nothing was changed by the refusals: the right key still opens it.
    drop(open(&db, Some(key_a())).unwrap());
}

/// No 8-character piece of either key, in base64 or hex, is in `text`.
fn assert_no_key_material(text: &str) {
    let a_hex: String = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .decode(KEY_A)
            .unwrap()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    for k in [KEY_A, KEY_B_HEX, &a_hex] {
        for w in k.as_bytes().windows(8) {
            let w = std::str::from_utf8(w).unwrap();
            assert!(!text.contains(w), "key material {w:?} in: {text}");
        }
    }
}

#[test]
fn a_store_with_sealed_rows_but_no_check_is_refused_without_a_key() {
    // Sealed values copied in by hand (no key check row): still refused.
    let dir = tmp();
    let db = dir.path().join("moat.db");
    drop(
        open(&db, Some(key_a()))
            .unwrap()
            .insert_message(&msg("e", "x")),
    );
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute("DELETE FROM store_meta", [])
        .unwrap();
    assert!(matches!(
        open(&db, None).unwrap_err(),
        StoreError::KeyMissing { .. }
    ));
    assert!(matches!(
        open(&db, Some(key_b())).unwrap_err(),
        StoreError::WrongKey { .. }
    ));
    // The right key opens it and writes the check again.
    drop(open(&db, Some(key_a())).unwrap());
    assert!(matches!(
        open(&db, Some(key_b())).unwrap_err(),
        StoreError::WrongKey { .. }
    ));
}

#[test]
fn a_sealed_value_moved_to_another_row_is_an_error_never_garbage() {
    let dir = tmp();
    let db = dir.path().join("moat.db");
    let (a, b);
    {
        let s = open(&db, Some(key_a())).unwrap();
        a = new_id(s.insert_message(&msg("a", "the text of a")).unwrap()).0;
        b = new_id(s.insert_message(&msg("b", "the text of b")).unwrap()).0;
    }
    // Someone with write access to the file swaps a's sealed text into b.
    let c = rusqlite::Connection::open(&db).unwrap();
    c.execute(
        "UPDATE messages SET text = (SELECT text FROM messages WHERE id = ?1) WHERE id = ?2",
        [a, b],
    )
    .unwrap();
    drop(c);
    let s = open(&db, Some(key_a())).unwrap();
    assert_eq!(s.message(a).unwrap().unwrap().text, "the text of a");
    let err = s.message(b).unwrap_err();
    assert!(
        matches!(err, StoreError::Unreadable { field: "messages.text", row, .. } if row == b),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(!text.contains("the text of"), "{text}");
    assert_no_key_material(&text);
    // Lists that hold it fail too, rather than show something else.
    assert!(s.unfinished_messages().is_err());
}

#[test]
fn plaintext_rows_stay_readable_with_a_key_and_rekey_seals_everything_under_the_new_key() {
    let dir = tmp();
    let db = dir.path().join("moat.db");
    let old: Vec<String> = (0..3).map(|i| marker(&format!("old{i}"))).collect();
    let mut ids = Vec::new();
    {
        let s = open(&db, None).unwrap();
        for (i, t) in old.iter().enumerate() {
            ids.push(new_id(s.insert_message(&msg(&format!("p{i}"), t)).unwrap()).0);
        }
        // A user text that looks like an envelope stays a plain text.
        ids.push(
            new_id(
                s.insert_message(&msg("p3", "moat:v1:deadbeef:AAAA"))
                    .unwrap(),
            )
            .0,
        );
    }
    // A key is set: old rows read as they are, new ones are sealed.
    let new_text = marker("new");
    {
        let s = open(&db, Some(key_a())).unwrap();
        for (id, t) in ids.iter().zip(&old) {
            assert_eq!(&s.message(*id).unwrap().unwrap().text, t);
        }
        assert_eq!(
            s.message(ids[3]).unwrap().unwrap().text,
            "moat:v1:deadbeef:AAAA"
        );
        ids.push(new_id(s.insert_message(&msg("k0", &new_text)).unwrap()).0);
    }
    assert!(found_in_files(&db, &[&new_text]).is_empty());
    assert_eq!(found_in_files(&db, &[&old[0]]).len(), 1, "not yet re-keyed");

    let mut s = open(&db, Some(key_a())).unwrap();
    let counts = s.rekey(key_b()).unwrap();
    let text = counts.iter().find(|c| c.field == "messages.text").unwrap();
    assert_eq!((text.were_plain, text.were_sealed), (4, 1), "{counts:?}");
    assert!(counts
        .iter()
        .filter(|c| c.field != "messages.text")
        .all(|c| c.were_plain + c.were_sealed == 0));
    assert_eq!(
        s.encryption(),
        Encryption::On {
            key_id: key_b().id().into()
        }
    );
    // The re-keyed store keeps working under the new key.
    assert_eq!(s.message(ids[4]).unwrap().unwrap().text, new_text);
    drop(s);

    // No old plaintext left anywhere in the files (WAL, free pages).
    let all: Vec<&str> = old.iter().map(String::as_str).collect();
    assert!(
        found_in_files(&db, &all).is_empty(),
        "{:?}",
        found_in_files(&db, &all)
    );
    // Old key refused, no key refused, new key reads everything.
    assert!(matches!(
        open(&db, Some(key_a())).unwrap_err(),
        StoreError::WrongKey { .. }
    ));
    assert!(matches!(
        open(&db, None).unwrap_err(),
        StoreError::KeyMissing { .. }
    ));
    let s = open(&db, Some(key_b())).unwrap();
    let texts: Vec<String> = ids
        .iter()
        .map(|id| s.message(*id).unwrap().unwrap().text)
        .collect();
    assert_eq!(texts[..3], old[..]);
    assert_eq!(texts[3], "moat:v1:deadbeef:AAAA");
    assert_eq!(texts[4], new_text);
    let raw: Vec<String> = rusqlite::Connection::open(&db)
        .unwrap()
        .prepare("SELECT text FROM messages")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let prefix = format!("moat:v1:{}:", key_b().id());
    assert!(raw.iter().all(|t| t.starts_with(&prefix)), "{raw:?}");
}

#[test]
fn a_rekey_that_fails_midway_changes_nothing() {
    let dir = tmp();
    let db = dir.path().join("moat.db");
    {
        let s = open(&db, Some(key_a())).unwrap();
        for i in 0..5 {
            s.insert_message(&msg(&format!("e{i}"), &format!("text {i}")))
                .unwrap();
        }
    }
    // Row 4's value is damaged: rekey reaches it after re-sealing rows 1-3.
    let c = rusqlite::Connection::open(&db).unwrap();
    c.execute(
        "UPDATE messages SET text = (SELECT text FROM messages WHERE id = 1) WHERE id = 4",
        [],
    )
    .unwrap();
    let before: Vec<String> = c
        .prepare("SELECT text FROM messages ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    drop(c);
    let mut s = open(&db, Some(key_a())).unwrap();
    let err = s.rekey(key_b()).unwrap_err();
    assert!(
        matches!(err, StoreError::Unreadable { row: 4, .. }),
        "{err:?}"
    );
    // Still under key A, rows untouched.
    assert_eq!(s.message(2).unwrap().unwrap().text, "text 1");
    drop(s);
    let after: Vec<String> = rusqlite::Connection::open(&db)
        .unwrap()
        .prepare("SELECT text FROM messages ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(before, after);
    assert!(matches!(
        open(&db, Some(key_b())).unwrap_err(),
        StoreError::WrongKey { .. }
    ));
    drop(open(&db, Some(key_a())).unwrap());
}

#[test]
fn sealing_costs_little_per_insert() {
    // Measured, not asserted tightly: 2,000 inserts with and without a key.
    let dir = tmp();
    let mut times = Vec::new();
    for key in [None, Some(key_a())] {
        let db = dir.path().join(format!("rate-{}.db", key.is_some()));
        let s = open(&db, key).unwrap();
        let text = "x".repeat(400);
        let start = std::time::Instant::now();
        for i in 0..2000 {
            s.insert_message(&msg(&format!("e{i}"), &text)).unwrap();
        }
        times.push(start.elapsed());
    }
    eprintln!(
        "2000 inserts of 400-byte texts: plaintext {:?}, sealed {:?}",
        times[0], times[1]
    );
    assert!(times[1] < times[0] * 3 + std::time::Duration::from_millis(500));
}

#[test]
fn with_a_key_a_task_prompt_never_reaches_the_files_in_clear() {
    let dir = tmp();
    let db = dir.path().join("moat.db");
    let prompt = marker("prompt");
    let s = open(&db, Some(key_a())).unwrap();
    let id = s
        .insert_task(&moat_store::NewTask {
            platform: "slack".into(),
            channel: "C1".into(),
            thread: String::new(),
            creator: "U1".into(),
            prompt: prompt.clone(),
            kind: "once".into(),
            spec: "2026-12-31T00:00:00Z".into(),
            context: "isolated".into(),
            next_run_ms: 1,
            created_ms: 0,
        })
        .unwrap();
    let leaks = found_in_files(&db, &[&prompt]);
    assert!(leaks.is_empty(), "plaintext on disk: {leaks:?}");
    assert_eq!(s.task(id).unwrap().unwrap().prompt, prompt);
    drop(s);
    let leaks = found_in_files(&db, &[&prompt]);
    assert!(leaks.is_empty(), "plaintext on disk: {leaks:?}");
    let raw: String = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row("SELECT prompt FROM tasks WHERE id = ?1", [id], |r| r.get(0))
        .unwrap();
    assert!(
        raw.starts_with(&format!("moat:v1:{}:", key_a().id())),
        "{raw}"
    );
}
