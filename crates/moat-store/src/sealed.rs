//! Which fields are sealed at rest, the key check, and `rekey`.
//!
//! With a store key every value moat writes into a sealed field (message
//! texts and details, turn errors, agent session ids: user content and
//! tokens) is an envelope of `crypt.rs`, bound to its row; without one they
//! are stored as they are. Values are read either way, so a store that gets
//! a key keeps reading its old plaintext until [`Store::rekey`] seals it.
//! The key check (`store_meta.key_check`, a known text sealed under the key)
//! makes a wrong key fail at open instead of at the first read.
//!
//! It must never: open a store whose sealed values the configured key (or
//! the lack of one) cannot read; leave a store half re-keyed (rekey is one
//! transaction); put a key or an opened value into an error.

use std::path::Path;

use crate::crypt::{self, CryptError, StoreKey, PLAIN_PREFIX, RESERVED_PREFIX, SEALED_PREFIX};
use crate::db::{args, Conn};
use crate::error::StoreError;
use crate::{Backend, Store};

/// A sealed field: its table and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    pub table: &'static str,
    pub column: &'static str,
    /// `table.column`, bound into each value's associated data.
    pub name: &'static str,
}

pub(crate) const MESSAGE_TEXT: Field = Field {
    table: "messages",
    column: "text",
    name: "messages.text",
};
pub(crate) const MESSAGE_DETAIL: Field = Field {
    table: "messages",
    column: "detail",
    name: "messages.detail",
};
pub(crate) const TURN_ERROR: Field = Field {
    table: "turns",
    column: "error",
    name: "turns.error",
};
pub(crate) const TURN_ANSWER: Field = Field {
    table: "turns",
    column: "answer",
    name: "turns.answer",
};
pub(crate) const AGENT_SESSION: Field = Field {
    table: "conversations",
    column: "agent_session",
    name: "conversations.agent_session",
};

pub(crate) const TASK_PROMPT: Field = Field {
    table: "tasks",
    column: "prompt",
    name: "tasks.prompt",
};

/// Every sealed field.
pub const SEALED_FIELDS: [Field; 6] = [
    MESSAGE_TEXT,
    MESSAGE_DETAIL,
    TURN_ERROR,
    TURN_ANSWER,
    AGENT_SESSION,
    TASK_PROMPT,
];

/// The text the key check seals; opening it proves the key is the store's.
const CHECK_TEXT: &str = "moat store key check v1";
const CHECK_FIELD: &str = "store_meta.key_check";

/// Whether a store seals what it writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Encryption {
    /// No key: fields are stored in the clear.
    Off,
    /// New values are sealed under the key with this id.
    On { key_id: String },
}

/// What [`Store::rekey`] did to one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RekeyCount {
    /// `table.column`.
    pub field: &'static str,
    /// Values sealed under the previous key, now under the new one.
    pub were_sealed: u64,
    /// Values that were plaintext, now sealed.
    pub were_plain: u64,
}

/// Seals and opens field values with the store's key, if it has one.
#[derive(Debug, Default)]
pub(crate) struct Sealer {
    key: Option<StoreKey>,
}

impl Sealer {
    pub(crate) fn new(key: Option<StoreKey>) -> Sealer {
        Sealer { key }
    }

    pub(crate) fn encryption(&self) -> Encryption {
        match &self.key {
            None => Encryption::Off,
            Some(k) => Encryption::On {
                key_id: k.id().to_string(),
            },
        }
    }

    /// The stored form of `plain` in `field` of row `row`.
    pub(crate) fn seal(
        &self,
        path: &Path,
        field: Field,
        row: i64,
        plain: &str,
    ) -> Result<String, StoreError> {
        match &self.key {
            Some(k) => k
                .seal(field.name, row, plain)
                .map_err(|reason| unreadable(path, field, row, reason)),
            None if plain.starts_with(RESERVED_PREFIX) => Ok(format!("{PLAIN_PREFIX}{plain}")),
            None => Ok(plain.to_string()),
        }
    }

    pub(crate) fn seal_opt(
        &self,
        path: &Path,
        field: Field,
        row: i64,
        plain: Option<&str>,
    ) -> Result<Option<String>, StoreError> {
        plain.map(|p| self.seal(path, field, row, p)).transpose()
    }

    /// The plaintext of a stored value of `field` in row `row`.
    pub(crate) fn open(
        &self,
        path: &Path,
        field: Field,
        row: i64,
        stored: String,
    ) -> Result<String, StoreError> {
        if let Some(p) = stored.strip_prefix(PLAIN_PREFIX) {
            return Ok(p.to_string());
        }
        if !stored.starts_with(RESERVED_PREFIX) {
            return Ok(stored);
        }
        if !stored.starts_with(SEALED_PREFIX) {
            return Err(unreadable(path, field, row, CryptError::UnknownVersion));
        }
        match &self.key {
            Some(k) => k
                .open(field.name, row, &stored)
                .map_err(|reason| unreadable(path, field, row, reason)),
            None => Err(StoreError::KeyMissing {
                path: path.to_path_buf(),
            }),
        }
    }

    pub(crate) fn open_opt(
        &self,
        path: &Path,
        field: Field,
        row: i64,
        stored: Option<String>,
    ) -> Result<Option<String>, StoreError> {
        stored.map(|s| self.open(path, field, row, s)).transpose()
    }
}

fn unreadable(path: &Path, field: Field, row: i64, reason: CryptError) -> StoreError {
    StoreError::Unreadable {
        path: path.to_path_buf(),
        field: field.name,
        row,
        reason,
    }
}

/// At open, after migrations: refuses a store that the configured key (or
/// the lack of one) cannot read, and records the key check of a store that
/// gets its first key.
pub(crate) fn check_key(
    conn: &mut dyn Conn,
    path: &Path,
    sealer: &Sealer,
) -> Result<(), StoreError> {
    let check: Option<String> = conn
        .query_opt("SELECT value FROM store_meta WHERE name = 'key_check'", &[])?
        .map(|r| r.text(0))
        .transpose()?;
    let Some(key) = &sealer.key else {
        if check.is_some() || first_sealed(conn)?.is_some() {
            return Err(StoreError::KeyMissing {
                path: path.to_path_buf(),
            });
        }
        return Ok(());
    };
    match check {
        Some(c) => match key.open(CHECK_FIELD, 0, &c) {
            Ok(t) if t == CHECK_TEXT => Ok(()),
            Ok(_) | Err(CryptError::Tampered) | Err(CryptError::OtherKey { .. }) => {
                Err(StoreError::WrongKey {
                    path: path.to_path_buf(),
                    stored: crypt::key_id_of(&c).unwrap_or("unknown").to_string(),
                    configured: key.id().to_string(),
                })
            }
            Err(reason) => Err(StoreError::Unreadable {
                path: path.to_path_buf(),
                field: CHECK_FIELD,
                row: 0,
                reason,
            }),
        },
        None => {
            // No check yet: values sealed without one (copied in by hand?)
            // must at least name this key.
            if let Some(v) = first_sealed(conn)? {
                let found = crypt::key_id_of(&v).unwrap_or("unknown");
                if found != key.id() {
                    return Err(StoreError::WrongKey {
                        path: path.to_path_buf(),
                        stored: found.to_string(),
                        configured: key.id().to_string(),
                    });
                }
            }
            write_check(conn, path, key)
        }
    }
}

fn write_check(conn: &mut dyn Conn, path: &Path, key: &StoreKey) -> Result<(), StoreError> {
    let sealed = key
        .seal(CHECK_FIELD, 0, CHECK_TEXT)
        .map_err(|reason| StoreError::Unreadable {
            path: path.to_path_buf(),
            field: CHECK_FIELD,
            row: 0,
            reason,
        })?;
    conn.execute(
        "INSERT INTO store_meta (name, value) VALUES ('key_check', ?1)
         ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        args![sealed],
    )?;
    Ok(())
}

/// Some sealed value of any sealed field, if there is one.
fn first_sealed(conn: &mut dyn Conn) -> Result<Option<String>, StoreError> {
    for f in SEALED_FIELDS {
        let v = conn.query_opt(
            &format!(
                "SELECT {c} FROM {t} WHERE substr({c}, 1, 8) = 'moat:v1:' LIMIT 1",
                c = f.column,
                t = f.table
            ),
            &[],
        )?;
        if let Some(r) = v {
            return Ok(Some(r.text(0)?));
        }
    }
    Ok(None)
}

/// Rows re-sealed per batch, to bound memory on large stores.
const REKEY_BATCH: i64 = 500;

impl Store {
    /// Whether this store seals what it writes, and under which key id.
    pub fn encryption(&self) -> Encryption {
        self.sealer.encryption()
    }

    /// Seals every value of every sealed field under `new`, in one
    /// transaction together with the new key check: a crash or error leaves
    /// the store exactly as it was, under the old key. Values sealed under
    /// the current key and plaintext values are both taken. Afterwards only
    /// `new` opens the store (give it as `MOAT_STORE_KEY`).
    pub fn rekey(&mut self, new: StoreKey) -> Result<Vec<RekeyCount>, StoreError> {
        let path = self.path.clone();
        let new = Sealer::new(Some(new));
        if let Backend::Sqlite(m) = &self.db {
            // Freed cells (a row that grew and moved) are zeroed.
            m.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .execute_batch("PRAGMA secure_delete = ON")
                .map_err(|e| StoreError::sqlite(&path, crate::busy_ms(), e))?;
        }
        let counts = self.write(|c| {
            let mut counts = Vec::new();
            for f in SEALED_FIELDS {
                let mut count = RekeyCount {
                    field: f.name,
                    were_sealed: 0,
                    were_plain: 0,
                };
                let mut after = i64::MIN;
                loop {
                    let batch = c.query(
                        &format!(
                            "SELECT id, {c} FROM {t} WHERE id > ?1 AND {c} IS NOT NULL
                             ORDER BY id LIMIT ?2",
                            c = f.column,
                            t = f.table
                        ),
                        args![after, REKEY_BATCH],
                    )?;
                    let Some(last) = batch.last() else {
                        break;
                    };
                    after = last.int(0)?;
                    let update = format!(
                        "UPDATE {t} SET {c} = ?2 WHERE id = ?1",
                        c = f.column,
                        t = f.table
                    );
                    for r in batch {
                        let (id, stored) = (r.int(0)?, r.text(1)?);
                        if crypt::is_sealed(&stored) {
                            count.were_sealed += 1;
                        } else {
                            count.were_plain += 1;
                        }
                        let plain = self.sealer.open(&path, f, id, stored)?;
                        let resealed = new.seal(&path, f, id, &plain)?;
                        c.execute(&update, args![id, resealed])?;
                    }
                }
                counts.push(count);
            }
            if let Some(k) = &new.key {
                write_check(c, &path, k)?;
            }
            Ok(counts)
        })?;
        self.sealer = new;
        // The old values may still sit in the write-ahead log and in pages
        // freed before: copy the WAL in and empty it, rewrite the file, and
        // empty the WAL again. The new key already holds; a failure here
        // leaves old bytes on disk, so it is reported. (PostgreSQL: old row
        // versions stay until its VACUUM reclaims them; see docs/store.md.)
        if let Backend::Sqlite(m) = &self.db {
            if self.path != Path::new(":memory:") {
                m.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .execute_batch(
                        "PRAGMA wal_checkpoint(TRUNCATE); VACUUM; PRAGMA wal_checkpoint(TRUNCATE);",
                    )
                    .map_err(|e| StoreError::Sqlite {
                        path: path.clone(),
                        reason: format!(
                            "the store is re-keyed, but clearing the old values from the file failed ({e}); run `moat store rekey` again"
                        ),
                    })?;
            }
        }
        Ok(counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{IncomingMessage, Inserted};

    #[test]
    fn legacy_text_that_looks_sealed_stays_plaintext_after_migration() {
        use rusqlite::Connection;
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("moat.db");
        {
            // A schema-1 database, as a moat before encryption wrote it.
            let c = Connection::open(&db).unwrap();
            c.execute_batch(crate::schema::MIGRATIONS[0]).unwrap();
            c.execute_batch(&format!(
                "PRAGMA application_id = {}; PRAGMA user_version = 1;
                 INSERT INTO conversations (id, platform, channel, thread, created_ms,
                                            last_active_ms, agent_session)
                 VALUES (1, 'web', 'c', 't', 0, 0, 'moat:p:odd');
                 INSERT INTO messages (id, platform, event_id, conversation_id, user, text, ts_ms)
                 VALUES (1, 'web', 'e', 1, 'u', 'moat:v1:0011aabb:AAAA', 0),
                        (2, 'web', 'f', 1, 'u', 'Moat:v1: is not reserved', 0);",
                crate::APPLICATION_ID
            ))
            .unwrap();
        }
        // Neither refused for lack of a key nor read as sealed.
        let s = Store::open(&db).unwrap();
        assert_eq!(s.message(1).unwrap().unwrap().text, "moat:v1:0011aabb:AAAA");
        assert_eq!(
            s.message(2).unwrap().unwrap().text,
            "Moat:v1: is not reserved"
        );
        assert_eq!(
            s.conversation(1).unwrap().unwrap().agent_session.as_deref(),
            Some("moat:p:odd")
        );
        // And new plaintext in the reserved space round-trips too.
        let m = IncomingMessage {
            platform: "web".into(),
            event_id: "g".into(),
            channel: "c".into(),
            thread: "t".into(),
            user: "u".into(),
            text: "moat:p:x".into(),
            ts_ms: 1,
            message_ref: None,
        };
        let Inserted::New { message_id, .. } = s.insert_message(&m).unwrap() else {
            panic!("a new message");
        };
        assert_eq!(s.message(message_id).unwrap().unwrap().text, "moat:p:x");
    }

    #[test]
    fn an_unknown_marker_is_an_error_not_text() {
        let s = Sealer::new(None);
        let e = s
            .open(
                Path::new("x.db"),
                MESSAGE_TEXT,
                1,
                "moat:v9:whatever".into(),
            )
            .unwrap_err();
        assert!(
            matches!(
                e,
                StoreError::Unreadable {
                    reason: CryptError::UnknownVersion,
                    ..
                }
            ),
            "{e:?}"
        );
    }
}
