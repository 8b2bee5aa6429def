//! The store's errors. Each names what is wrong and, where the operator or the
//! caller can act, what to do. They never carry a message's text: a chat
//! message may hold anything, and errors end up in logs.

use std::path::{Path, PathBuf};

use rusqlite::ErrorCode;

use crate::model::{MessageState, TurnState};

/// Everything a [`crate::Store`] call can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The data directory, the database file or the lock file could not be
    /// created, opened or given its permissions.
    #[error("cannot {action} {path}: {reason}")]
    Io {
        action: &'static str,
        path: PathBuf,
        reason: String,
    },
    /// Another process holds the database (its lock file is locked).
    #[error(
        "database at {path} is locked by another process (another moat with the same data directory?); stop that process or give this one its own data directory"
    )]
    Locked { path: PathBuf },
    /// SQLite stayed busy past the busy timeout: another program holds a
    /// write lock (moat itself never does, see [`crate::Store::open`]).
    #[error(
        "database at {path} stayed busy for {timeout_ms} ms: another program holds a lock on it (an open sqlite3 shell?); close it and retry"
    )]
    Busy { path: PathBuf, timeout_ms: u64 },
    /// The database's schema is newer than this build knows.
    #[error(
        "database at {path} was written by a newer moat (schema {found} > {supported}); upgrade moat"
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    /// The file is an SQLite database of some other program.
    #[error(
        "{path} is an SQLite database of another program (application id {found:#010x}), not moat's; give moat its own database file"
    )]
    NotMoat { path: PathBuf, found: i32 },
    /// The file is not a database at all, or SQLite found it damaged.
    #[error(
        "database at {path} is damaged or not a database ({reason}); move it aside (moat then starts a new one) or restore it from a backup"
    )]
    Corrupt { path: PathBuf, reason: String },
    /// A write failed because the disk is full.
    #[error("disk full while writing the database at {path}; free some space and retry")]
    DiskFull { path: PathBuf },
    /// The file or its directory cannot be written.
    #[error(
        "database at {path} cannot be written ({reason}); check the owner and permissions of the file and its directory"
    )]
    ReadOnly { path: PathBuf, reason: String },
    /// One migration script failed; its transaction was rolled back.
    #[error(
        "migrating the database at {path} to schema {version} failed ({reason}); it was left at schema {left_at}"
    )]
    Migration {
        path: PathBuf,
        version: i64,
        left_at: i64,
        reason: String,
    },
    /// The given id names no row.
    #[error("{kind} {id} does not exist")]
    NotFound { kind: &'static str, id: i64 },
    /// A message state change that the state machine does not allow.
    #[error("message {id} is {from} and cannot become {to}: {why}")]
    MessageTransition {
        id: i64,
        from: MessageState,
        to: MessageState,
        why: &'static str,
    },
    /// A turn state change that the state machine does not allow.
    #[error("turn {id} is {from} and cannot become {to}: {why}")]
    TurnTransition {
        id: i64,
        from: TurnState,
        to: TurnState,
        why: &'static str,
    },
    /// `start_turn` on a conversation that already has a running turn.
    #[error(
        "conversation {conversation_id} already has turn {turn_id} running; finish it (finish_turn) before starting another"
    )]
    TurnRunning { conversation_id: i64, turn_id: i64 },
    /// `start_turn` with a message of another conversation.
    #[error(
        "message {message_id} belongs to conversation {actual}, not to conversation {expected}"
    )]
    WrongConversation {
        message_id: i64,
        expected: i64,
        actual: i64,
    },
    /// An argument the store refuses (e.g. an empty event id, which would make
    /// every such event a duplicate of the first).
    #[error("invalid {field}: {reason}")]
    Invalid {
        field: &'static str,
        reason: &'static str,
    },
    /// The database holds sealed values (or a key check) and no key is
    /// configured.
    #[error(
        "the database at {path} is encrypted and no key is configured: set MOAT_STORE_KEY (in moat's environment or its secrets file) to the key it was written with"
    )]
    KeyMissing { path: PathBuf },
    /// The configured key is not the one the database was sealed with.
    #[error(
        "MOAT_STORE_KEY (key id {configured}) is not the key the database at {path} is encrypted with (key id {stored}); set MOAT_STORE_KEY to that key (`moat store rekey` changes keys)"
    )]
    WrongKey {
        path: PathBuf,
        stored: String,
        configured: String,
    },
    /// A sealed value that does not open (changed, moved, damaged).
    #[error(
        "{field} of row {row} in the database at {path} cannot be read: {reason}; restore the database from a backup"
    )]
    Unreadable {
        path: PathBuf,
        field: &'static str,
        row: i64,
        reason: crate::crypt::CryptError,
    },
    /// Any other SQLite failure.
    #[error("database at {path}: {reason}")]
    Sqlite { path: PathBuf, reason: String },
    /// A store setting that cannot work, named by its configuration key.
    #[error("{key} {reason}")]
    Config { key: &'static str, reason: String },
    /// The PostgreSQL server cannot be reached, went away or did not answer
    /// in time. Nothing was written by the failed call; retry later (the
    /// gateway answers the platform with a retryable status).
    #[error(
        "database at {path} is unavailable ({reason}); the call changed nothing, retry when the database is back"
    )]
    Unavailable { path: PathBuf, reason: String },
    /// A transaction kept conflicting with concurrent ones (other gateway
    /// nodes) after the store's retries. Nothing was written; retry.
    #[error(
        "database at {path} kept reporting conflicts with other nodes' transactions ({reason}); nothing was written, retry"
    )]
    Contention { path: PathBuf, reason: String },
    /// Any other PostgreSQL failure (its primary message and SQLSTATE).
    #[error("database at {path}: {reason}")]
    Postgres { path: PathBuf, reason: String },
    /// Another node owns the conversation (its lease runs until
    /// `until_ms`): this node may not act on it.
    #[error(
        "conversation {conversation_id} is owned by node {owner} (lease until {until_ms}); only its owner may act on it"
    )]
    NotOwner {
        conversation_id: i64,
        owner: String,
        until_ms: i64,
    },
    /// A row that does not have the shape this build expects.
    #[error(
        "the database holds a row moat cannot read: column {column} is not {expected}; is it another program's database, or was it changed by hand?"
    )]
    BadRow {
        column: usize,
        expected: &'static str,
    },
}

impl StoreError {
    /// Turns an SQLite error into the variant that says what to do.
    pub(crate) fn sqlite(path: &Path, busy_timeout_ms: u64, err: rusqlite::Error) -> StoreError {
        let path = path.to_path_buf();
        let code = err.sqlite_error_code();
        match code {
            Some(ErrorCode::DatabaseBusy) | Some(ErrorCode::DatabaseLocked) => StoreError::Busy {
                path,
                timeout_ms: busy_timeout_ms,
            },
            Some(ErrorCode::DiskFull) => StoreError::DiskFull { path },
            Some(ErrorCode::NotADatabase) | Some(ErrorCode::DatabaseCorrupt) => {
                StoreError::Corrupt {
                    path,
                    reason: err.to_string(),
                }
            }
            Some(ErrorCode::ReadOnly)
            | Some(ErrorCode::CannotOpen)
            | Some(ErrorCode::PermissionDenied) => StoreError::ReadOnly {
                path,
                reason: err.to_string(),
            },
            _ => StoreError::Sqlite {
                path,
                reason: err.to_string(),
            },
        }
    }

    /// Whether retrying later may succeed (the database was unreachable
    /// or busy, or transactions conflicted): the caller should answer the
    /// platform with a retryable status rather than drop the event.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StoreError::Unavailable { .. }
                | StoreError::Contention { .. }
                | StoreError::Busy { .. }
        )
    }

    pub(crate) fn io(action: &'static str, path: &Path, err: std::io::Error) -> StoreError {
        StoreError::Io {
            action,
            path: path.to_path_buf(),
            reason: err.to_string(),
        }
    }
}
