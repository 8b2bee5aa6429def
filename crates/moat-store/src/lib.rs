//! moat's persistence: the durable inbox, conversations, turns and the
//! sandbox and agent session attached to each conversation, in one SQLite
//! database (WAL mode, the default) or in PostgreSQL (several gateway nodes
//! sharing one database), with ordered migrations for both.
//!
//! It owns the rule "nothing accepted is lost" (docs/design.md D7) at the storage
//! level: [`Store::insert_message`] returns only once the event is in the
//! database, recognises a platform's retry of the same event, and after a
//! crash [`Store::unfinished_messages`] and [`Store::interrupted_turns`] tell
//! the gateway exactly what it still owes. It enforces the message and turn
//! state machines (`docs/store.md`) and "one running turn per conversation".
//!
//! It must never: decide policy (who may talk, which sandbox mode a channel
//! uses: the gateway passes those in), read the clock (every time is given by
//! the caller, in Unix milliseconds), put a message's text into an error, or
//! share an SQLite database with a second live process (see [`Store::open`]).
//!
//! Layout: `db.rs` is the connection interface both databases implement
//! (`sqlite.rs` opens SQLite files, `pg.rs` pools PostgreSQL connections);
//! `inbox.rs`, `conversations.rs`, `turns.rs`, `recovery.rs`,
//! `github.rs`, `outbox.rs` and `tasks.rs` are the queries, written once for both; `schema.rs` the
//! migrations; `sealed.rs` and `crypt.rs` encryption at rest.

#![forbid(unsafe_code)]
// Outside input never reaches an `unwrap`/`expect` (house style); tests may.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod admitted;
mod conversations;
mod crypt;
mod db;
mod error;
mod github;
mod inbox;
mod model;
mod nodes;
mod outbox;
mod pg;
mod recovery;
mod schema;
mod sealed;
mod sqlite;
mod tasks;
mod turns;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use rusqlite::{Connection, TransactionBehavior};

pub use crypt::{CryptError, KeyError, StoreKey, KEY_VAR};
pub use error::StoreError;
pub use github::GithubLink;
pub use model::{
    Conversation, ConversationId, IncomingMessage, Inserted, MessageId, MessageState, SandboxMode,
    StoredMessage, Turn, TurnId, TurnState, UnknownName,
};
pub use nodes::Ownership;
pub use outbox::{KeptAnswer, Purged, Undelivered};
pub use pg::{PgOptions, DEFAULT_POOL_SIZE, PASSWORD_VAR};
pub use schema::{current_version as schema_version, APPLICATION_ID};
pub use sealed::{Encryption, Field, RekeyCount, SEALED_FIELDS};
pub use tasks::{NewTask, RegisteredGroup, Task, TaskRun, TaskState};

use db::{Conn, Row, SqliteConn};
use sealed::{Sealer, AGENT_SESSION, MESSAGE_DETAIL, MESSAGE_TEXT, TURN_ANSWER, TURN_ERROR};
use sqlite::{Checkpointer, CHECKPOINT_EVERY_COMMITS};

/// How long a statement waits for a lock held by another connection before
/// failing with [`StoreError::Busy`]. moat holds the only connection, so this
/// only matters when an operator has the file open in another program.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// What a committed write must survive. See `docs/store.md`, "Durability".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// `synchronous=NORMAL` in WAL mode: a commit is written to the WAL file
    /// (into the kernel's page cache) before the call returns, and fsynced at
    /// checkpoints. Survives any crash or kill of moat; a power loss or kernel
    /// crash may roll back the last commits (never corrupts). The default:
    /// moat's requirement is the process crash.
    #[default]
    ProcessCrash,
    /// `synchronous=FULL`: every commit is also fsynced before the call
    /// returns. Survives power loss too, at the cost of one fsync per insert.
    PowerLoss,
}

/// Which database a store keeps its rows in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// One SQLite file, one process (the default).
    Sqlite,
    /// A PostgreSQL database, shared by any number of gateway nodes.
    Postgres,
}

/// The database. One per process (and, for SQLite, per database file);
/// share it between threads by reference or `Arc` (it is `Send + Sync`;
/// each call is a single short transaction).
pub struct Store {
    db: Backend,
    /// The database's name in errors: the SQLite file's path, or
    /// `postgres://user@host:port/dbname` (never a password).
    path: PathBuf,
    durability: Durability,
    /// Seals the sensitive fields with the store key, if there is one.
    sealer: Sealer,
    /// This store's node, when several share the database.
    node: Option<nodes::Node>,
    /// Write transactions committed, to wake the checkpointer.
    commits: AtomicU64,
    /// On-disk SQLite stores only: the thread that copies the WAL into the
    /// database file, off the writers' path.
    checkpointer: Option<Checkpointer>,
    /// SQLite files only: held (flock) for the store's lifetime, the
    /// one-process rule. Declared last: released only after both
    /// connections are closed.
    _lock: Option<std::fs::File>,
}

pub(crate) enum Backend {
    /// Calls are serialised by the mutex.
    Sqlite(Mutex<Connection>),
    Postgres(Box<pg::Pg>),
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .field("backend", &self.backend())
            .field("durability", &self.durability)
            .finish_non_exhaustive()
    }
}

const MESSAGE_COLUMNS: &str =
    "id, platform, event_id, conversation_id, \"user\", text, ts_ms, state, \
     turn_id, detail, message_ref";
const CONVERSATION_COLUMNS: &str = "id, platform, channel, thread, created_ms, last_active_ms, \
     sandbox_mode, lease_name, agent_session";
const TURN_COLUMNS: &str = "id, conversation_id, state, started_ms, ended_ms, answer_chars, error";

impl Store {
    /// Connects to the PostgreSQL database `opts.url` (a pool of
    /// `opts.pool_size` connections) and brings its schema up to date.
    /// Any number of gateway nodes may share it: migrations take an
    /// advisory lock, and every write is a serializable transaction, run
    /// again when it conflicts with another node's.
    ///
    /// `key` is the store key, as for [`Store::open_with_key`]. Refused: a
    /// URL holding a password or naming no host ([`StoreError::Config`]),
    /// an unreachable server ([`StoreError::Unavailable`]), a database of
    /// a newer moat ([`StoreError::TooNew`]) or of another program
    /// ([`StoreError::NotMoat`]).
    pub fn open_postgres(opts: &PgOptions, key: Option<StoreKey>) -> Result<Store, StoreError> {
        let pg = pg::Pg::new(opts)?;
        let path = pg.label().to_path_buf();
        let store = Store {
            db: Backend::Postgres(Box::new(pg)),
            path,
            durability: Durability::PowerLoss,
            sealer: Sealer::new(key),
            node: None,
            commits: AtomicU64::new(0),
            checkpointer: None,
            _lock: None,
        };
        if let Backend::Postgres(pg) = &store.db {
            schema::migrate_postgres(pg, &store.path)?;
        }
        store.write(|c| sealed::check_key(c, &store.path, &store.sealer))?;
        Ok(store)
    }

    /// The database's name: the SQLite file's path (`:memory:` for
    /// [`Store::open_in_memory`]), or `postgres://user@host:port/dbname`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The durability this store was opened with (PostgreSQL: the server's
    /// own, a committed transaction is on its disk).
    pub fn durability(&self) -> Durability {
        self.durability
    }

    /// Which database this store keeps its rows in.
    pub fn backend(&self) -> BackendKind {
        match self.db {
            Backend::Sqlite(_) => BackendKind::Sqlite,
            Backend::Postgres(_) => BackendKind::Postgres,
        }
    }

    /// `f` outside a transaction (SQLite: under the connection's mutex).
    fn read<T>(
        &self,
        f: impl FnOnce(&mut dyn Conn) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        match &self.db {
            Backend::Sqlite(m) => {
                // A panic while holding the lock leaves no transaction open
                // (a rusqlite transaction rolls back when dropped), so the
                // connection is still sound.
                let conn = m.lock().unwrap_or_else(PoisonError::into_inner);
                f(&mut SqliteConn {
                    conn: &conn,
                    path: &self.path,
                })
            }
            Backend::Postgres(pg) => pg.read(f),
        }
    }

    /// `f` in one write transaction, committed when it returns `Ok` and
    /// rolled back otherwise. SQLite: `BEGIN IMMEDIATE`, writers serialised.
    /// PostgreSQL: serializable, and `f` runs again when the transaction
    /// conflicts with a concurrent one (so `f` must not have effects beyond
    /// the database).
    fn write<T>(
        &self,
        mut f: impl FnMut(&mut dyn Conn) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let r = match &self.db {
            Backend::Sqlite(m) => {
                let mut conn = m.lock().unwrap_or_else(PoisonError::into_inner);
                let err = |e| StoreError::sqlite(&self.path, busy_ms(), e);
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(err)?;
                let v = f(&mut SqliteConn {
                    conn: &tx,
                    path: &self.path,
                })?;
                tx.commit().map_err(err)?;
                v
            }
            Backend::Postgres(pg) => pg.write(f)?,
        };
        self.committed();
        Ok(r)
    }

    /// Called after each committed write transaction.
    fn committed(&self) {
        let n = self.commits.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_multiple_of(CHECKPOINT_EVERY_COMMITS) {
            if let Some(c) = &self.checkpointer {
                c.nudge();
            }
        }
    }
}

pub(crate) fn busy_ms() -> u64 {
    BUSY_TIMEOUT.as_millis() as u64
}

fn message_state(c: &mut dyn Conn, id: MessageId) -> Result<Option<MessageState>, StoreError> {
    c.query_opt("SELECT state FROM messages WHERE id = ?1", db::args![id])?
        .map(|r| r.name(0))
        .transpose()
}

fn message_row(r: &Row) -> Result<StoredMessage, StoreError> {
    Ok(StoredMessage {
        id: r.int(0)?,
        platform: r.text(1)?,
        event_id: r.text(2)?,
        conversation_id: r.int(3)?,
        user: r.text(4)?,
        text: r.text(5)?,
        ts_ms: r.int(6)?,
        state: r.name(7)?,
        turn_id: r.opt_int(8)?,
        detail: r.opt_text(9)?,
        message_ref: r.opt_text(10)?,
    })
}

fn conversation_row(r: &Row) -> Result<Conversation, StoreError> {
    let mode: Option<String> = r.opt_text(6)?;
    Ok(Conversation {
        id: r.int(0)?,
        platform: r.text(1)?,
        channel: r.text(2)?,
        thread: r.text(3)?,
        created_ms: r.int(4)?,
        last_active_ms: r.int(5)?,
        sandbox_mode: match mode {
            Some(_) => Some(r.name(6)?),
            None => None,
        },
        lease_name: r.opt_text(7)?,
        agent_session: r.opt_text(8)?,
    })
}

fn turn_row(r: &Row) -> Result<Turn, StoreError> {
    Ok(Turn {
        id: r.int(0)?,
        conversation_id: r.int(1)?,
        state: r.name(2)?,
        started_ms: r.int(3)?,
        ended_ms: r.opt_int(4)?,
        answer_chars: r.int(5)?.max(0) as u64,
        error: r.opt_text(6)?,
    })
}
