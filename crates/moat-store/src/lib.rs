//! moat's persistence: the durable inbox, conversations, turns and the
//! sandbox and agent session attached to each conversation, in one SQLite
//! database (WAL mode) with ordered migrations.
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
//! share its database with a second live process (see [`Store::open`]).

#![forbid(unsafe_code)]
// Outside input never reaches an `unwrap`/`expect` (house style); tests may.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod crypt;
mod error;
mod github;
mod model;
mod recovery;
mod schema;
mod sealed;
mod tasks;

use std::fs::{DirBuilder, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::types::Type;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Row, TransactionBehavior};

pub use crypt::{CryptError, KeyError, StoreKey, KEY_VAR};
pub use error::StoreError;
pub use github::GithubLink;
pub use model::{
    Conversation, ConversationId, IncomingMessage, Inserted, MessageId, MessageState, SandboxMode,
    StoredMessage, Turn, TurnId, TurnState, UnknownName,
};
pub use schema::{current_version as schema_version, APPLICATION_ID};
pub use sealed::{Encryption, Field, RekeyCount, SEALED_FIELDS};
pub use tasks::{NewTask, RegisteredGroup, Task, TaskRun, TaskState};

use sealed::{Sealer, AGENT_SESSION, MESSAGE_DETAIL, MESSAGE_TEXT, TURN_ERROR};

/// How long a statement waits for a lock held by another connection before
/// failing with [`StoreError::Busy`]. moat holds the only connection, so this
/// only matters when an operator has the file open in another program.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Past this size the WAL file is truncated after a checkpoint.
const JOURNAL_SIZE_LIMIT: u64 = 64 * 1024 * 1024;

/// The background checkpointer is woken after this many commits...
const CHECKPOINT_EVERY_COMMITS: u64 = 64;
/// ...and at least this often while the store lives.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);
/// Backstop: a writer checkpoints by itself once the WAL holds this many
/// pages (about 40 MB), should the checkpointer fall behind.
const WRITER_AUTOCHECKPOINT_PAGES: u32 = 10_000;

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

/// The database. One per process and database file; share it between
/// threads by reference or `Arc` (it is `Send + Sync`; calls are serialised
/// by an internal mutex, each one a single short transaction).
pub struct Store {
    conn: Mutex<Connection>,
    path: PathBuf,
    durability: Durability,
    /// Seals the sensitive fields with the store key, if there is one.
    sealer: Sealer,
    /// Write transactions committed, to wake the checkpointer.
    commits: AtomicU64,
    /// On-disk stores only: the thread that copies the WAL into the
    /// database file, off the writers' path.
    checkpointer: Option<Checkpointer>,
    /// Held (flock) for the store's lifetime: the one-process rule. Declared
    /// last: released only after both connections are closed.
    _lock: Option<File>,
}

/// A thread with its own connection that runs `PRAGMA wal_checkpoint(PASSIVE)`
/// when woken and every [`CHECKPOINT_INTERVAL`]. Passive checkpoints never
/// block writers; they move the fsyncs of checkpointing (two per checkpoint)
/// off [`Store::insert_message`]'s path.
struct Checkpointer {
    wake: Option<SyncSender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    fn start(conn: Connection) -> Checkpointer {
        let (wake, rx) = mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("moat-store-checkpoint".into())
            .spawn(move || Checkpointer::run(conn, rx))
            .ok();
        Checkpointer {
            wake: Some(wake),
            thread,
        }
    }

    fn run(conn: Connection, wake: Receiver<()>) {
        loop {
            match wake.recv_timeout(CHECKPOINT_INTERVAL) {
                Ok(()) | Err(RecvTimeoutError::Timeout) => {
                    // A failure (busy, disk full) is retried next time; the
                    // writer's own auto-checkpoint is the backstop.
                    let _ = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
                }
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    fn nudge(&self) {
        if let Some(w) = &self.wake {
            // Full means a wake-up is already pending.
            let _ = w.try_send(());
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        drop(self.wake.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .field("durability", &self.durability)
            .finish_non_exhaustive()
    }
}

const MESSAGE_COLUMNS: &str =
    "id, platform, event_id, conversation_id, user, text, ts_ms, state, turn_id, detail, message_ref";
const CONVERSATION_COLUMNS: &str = "id, platform, channel, thread, created_ms, last_active_ms, \
     sandbox_mode, lease_name, agent_session";
const TURN_COLUMNS: &str = "id, conversation_id, state, started_ms, ended_ms, answer_chars, error";

impl Store {
    /// Opens (creating if needed) the database at `path` with
    /// [`Durability::ProcessCrash`]; see [`Store::open_with`].
    pub fn open(path: impl AsRef<Path>) -> Result<Store, StoreError> {
        Store::open_with(path, Durability::default())
    }

    /// Opens (creating if needed) the database file at `path` and brings its
    /// schema up to date.
    ///
    /// - A missing parent directory is created with mode 0700; the database
    ///   file is created with mode 0600, and an existing one readable by group
    ///   or others is narrowed to 0600 (with its `-wal` and `-shm` files;
    ///   SQLite gives those the database file's mode).
    /// - One process at a time: `open` takes an exclusive `flock` on
    ///   `PATH.lock` (mode 0600, left in place) and holds it until the store
    ///   is dropped; while another process holds it, `open` fails at once
    ///   with [`StoreError::Locked`]. The lock dies with its process, so a
    ///   crashed moat never blocks the next one. This is what makes
    ///   [`Store::interrupted_turns`] mean "interrupted": no other gateway can
    ///   be running them.
    /// - `journal_mode=WAL`, `synchronous` per `durability`,
    ///   `foreign_keys=ON`, `busy_timeout` = [`BUSY_TIMEOUT`].
    /// - Migrations run in order, one transaction each; a database written by
    ///   a newer moat is refused with [`StoreError::TooNew`] and left as it
    ///   is, and an SQLite file of another program with
    ///   [`StoreError::NotMoat`].
    pub fn open_with(path: impl AsRef<Path>, durability: Durability) -> Result<Store, StoreError> {
        Store::open_with_key(path, durability, None)
    }

    /// [`Store::open_with`] with the store key (encryption at rest, see
    /// `docs/store.md`): with `Some`, new values of the sealed fields are
    /// sealed under it and a store sealed under another key is refused
    /// ([`StoreError::WrongKey`]); with `None`, a store holding sealed values
    /// is refused ([`StoreError::KeyMissing`]).
    pub fn open_with_key(
        path: impl AsRef<Path>,
        durability: Durability,
        key: Option<StoreKey>,
    ) -> Result<Store, StoreError> {
        let path = path.as_ref().to_path_buf();
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !dir.exists() {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|e| StoreError::io("create the data directory", &dir, e))?;
        }

        let mut lock_path = path.clone().into_os_string();
        lock_path.push(".lock");
        let lock_path = PathBuf::from(lock_path);
        let lock = private_file(&lock_path, "create the lock file")?;
        if let Err(e) = lock.try_lock() {
            if matches!(e, std::fs::TryLockError::WouldBlock) {
                return Err(StoreError::Locked { path });
            }
            let err = match e {
                std::fs::TryLockError::Error(err) => err,
                std::fs::TryLockError::WouldBlock => std::io::ErrorKind::WouldBlock.into(),
            };
            return Err(StoreError::io("lock", &lock_path, err));
        }

        drop(private_file(&path, "create the database file")?);
        for suffix in ["-wal", "-shm"] {
            let mut side = path.clone().into_os_string();
            side.push(suffix);
            let side = PathBuf::from(side);
            if side.exists() {
                narrow_mode(&side)?;
            }
        }

        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| StoreError::sqlite(&path, busy_ms(), e))?;
        let mut store = Store {
            conn: Mutex::new(conn),
            path,
            durability,
            sealer: Sealer::new(key),
            commits: AtomicU64::new(0),
            checkpointer: None,
            _lock: Some(lock),
        };
        store.configure(true)?;
        // The checkpointer's connection, opened once the schema is in place.
        let ckpt = Connection::open_with_flags(
            &store.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .and_then(|c| {
            c.busy_timeout(BUSY_TIMEOUT)?;
            Ok(c)
        })
        .map_err(|e| StoreError::sqlite(&store.path, busy_ms(), e))?;
        store.checkpointer = Some(Checkpointer::start(ckpt));
        Ok(store)
    }

    /// A private database in memory, for tests: same schema and rules, no
    /// file, no lock, no WAL; gone when dropped.
    pub fn open_in_memory() -> Result<Store, StoreError> {
        Store::open_in_memory_with_key(None)
    }

    /// [`Store::open_in_memory`] with a store key.
    pub fn open_in_memory_with_key(key: Option<StoreKey>) -> Result<Store, StoreError> {
        let path = PathBuf::from(":memory:");
        let conn =
            Connection::open_in_memory().map_err(|e| StoreError::sqlite(&path, busy_ms(), e))?;
        let mut store = Store {
            conn: Mutex::new(conn),
            path,
            durability: Durability::default(),
            sealer: Sealer::new(key),
            commits: AtomicU64::new(0),
            checkpointer: None,
            _lock: None,
        };
        store.configure(false)?;
        Ok(store)
    }

    fn configure(&mut self, on_disk: bool) -> Result<(), StoreError> {
        let path = self.path.clone();
        let sync = match self.durability {
            Durability::ProcessCrash => "NORMAL",
            Durability::PowerLoss => "FULL",
        };
        let conn = self.conn.get_mut().unwrap_or_else(PoisonError::into_inner);
        let sql = |e| StoreError::sqlite(&path, busy_ms(), e);
        conn.busy_timeout(BUSY_TIMEOUT).map_err(sql)?;
        // Refuse another program's database before changing anything in it.
        let app_id: i32 = conn
            .query_row("PRAGMA application_id", [], |r| r.get(0))
            .map_err(sql)?;
        if app_id != 0 && app_id != APPLICATION_ID {
            return Err(StoreError::NotMoat {
                path,
                found: app_id,
            });
        }
        // And a newer moat's database before switching its journal mode.
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(sql)?;
        if version > schema::current_version() {
            return Err(StoreError::TooNew {
                path,
                found: version,
                supported: schema::current_version(),
            });
        }
        if on_disk {
            let mode: String = conn
                .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
                .map_err(sql)?;
            if !mode.eq_ignore_ascii_case("wal") {
                return Err(StoreError::Sqlite {
                    path,
                    reason: format!(
                        "cannot switch to WAL mode (journal mode stays {mode}); put the database on a local file system"
                    ),
                });
            }
        }
        conn.execute_batch(&format!(
            "PRAGMA synchronous = {sync}; PRAGMA foreign_keys = ON; \
             PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}; \
             PRAGMA wal_autocheckpoint = {WRITER_AUTOCHECKPOINT_PAGES};"
        ))
        .map_err(sql)?;
        schema::migrate(conn, &path, busy_ms())?;
        sealed::check_key(conn, &path, &self.sealer)?;
        if self.sealer.encryption() != Encryption::Off {
            // A row that grows when it is sealed may move; the old cell is
            // then zeroed, not left as free space holding plaintext.
            conn.execute_batch("PRAGMA secure_delete = ON")
                .map_err(sql)?;
        }
        Ok(())
    }

    /// The database file's path (`:memory:` for [`Store::open_in_memory`]).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The durability this store was opened with.
    pub fn durability(&self) -> Durability {
        self.durability
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves no transaction open (a
        // rusqlite transaction rolls back when dropped), so the connection is
        // still sound.
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
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

    fn err(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        move |e| StoreError::sqlite(&self.path, busy_ms(), e)
    }

    // ---- the inbox -----------------------------------------------------

    /// Stores one incoming event, atomically with its conversation.
    ///
    /// In one transaction: if `(platform, event_id)` is already stored,
    /// returns [`Inserted::Duplicate`] and writes nothing; otherwise gets or
    /// creates the conversation `(platform, channel, thread)` (created with
    /// `created_ms = last_active_ms = ts_ms`, else `last_active_ms` raised to
    /// `ts_ms` if that is later) and inserts the message in state
    /// [`MessageState::Received`], returning [`Inserted::New`].
    ///
    /// When this returns `Ok`, the row is committed with the store's
    /// [`Durability`]: the event may be acknowledged to the platform.
    /// `platform` and `event_id` must not be empty ([`StoreError::Invalid`]):
    /// an empty id would make every later id-less event a "duplicate".
    pub fn insert_message(&self, m: &IncomingMessage) -> Result<Inserted, StoreError> {
        if m.platform.is_empty() {
            return Err(StoreError::Invalid {
                field: "platform",
                reason: "must not be empty",
            });
        }
        if m.event_id.is_empty() {
            return Err(StoreError::Invalid {
                field: "event_id",
                reason: "must not be empty (the platform's event id recognises retries)",
            });
        }
        let err = self.err();
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&err)?;
        let existing: Option<MessageId> = tx
            .prepare_cached("SELECT id FROM messages WHERE platform = ?1 AND event_id = ?2")
            .and_then(|mut s| {
                s.query_row(params![m.platform, m.event_id], |r| r.get(0))
                    .optional()
            })
            .map_err(&err)?;
        if let Some(message_id) = existing {
            return Ok(Inserted::Duplicate { message_id });
        }
        let conversation_id: ConversationId = tx
            .prepare_cached(
                "INSERT INTO conversations (platform, channel, thread, created_ms, last_active_ms)
                 VALUES (?1, ?2, ?3, ?4, ?4)
                 ON CONFLICT (platform, channel, thread) DO UPDATE
                     SET last_active_ms = max(last_active_ms, excluded.last_active_ms)
                 RETURNING id",
            )
            .and_then(|mut s| {
                s.query_row(params![m.platform, m.channel, m.thread, m.ts_ms], |r| {
                    r.get(0)
                })
            })
            .map_err(&err)?;
        // The id is chosen here (what SQLite would choose: we hold the write
        // lock) because a sealed text is bound to its row id.
        let message_id: MessageId = tx
            .prepare_cached("SELECT coalesce(max(id), 0) + 1 FROM messages")
            .and_then(|mut s| s.query_row([], |r| r.get(0)))
            .map_err(&err)?;
        let text = self
            .sealer
            .seal(&self.path, MESSAGE_TEXT, message_id, &m.text)?;
        tx.prepare_cached(
            "INSERT INTO messages (id, platform, event_id, conversation_id, user, text, ts_ms, message_ref)
             VALUES (?7, ?1, ?2, ?3, ?4, ?5, ?6, ?8)",
        )
        .and_then(|mut s| {
            s.execute(params![
                m.platform,
                m.event_id,
                conversation_id,
                m.user,
                text,
                m.ts_ms,
                message_id,
                m.message_ref
            ])
        })
        .map_err(&err)?;
        tx.commit().map_err(&err)?;
        self.committed();
        Ok(Inserted::New {
            message_id,
            conversation_id,
        })
    }

    /// Moves a message to `state` and sets its `detail` to `detail` (`None`
    /// clears it).
    ///
    /// Allowed: from `Received`, `Queued` or `Running` to any state except
    /// `Running` (a message becomes running only through
    /// [`Store::start_turn`], which links it to its turn). Moving a running
    /// message back to `Received` or `Queued` (handing it back, e.g. at
    /// shutdown) unlinks it from its turn. `Answered`, `Failed` and `Dropped`
    /// are final: changing them is [`StoreError::MessageTransition`].
    pub fn set_message_state(
        &self,
        message_id: MessageId,
        state: MessageState,
        detail: Option<&str>,
    ) -> Result<(), StoreError> {
        let err = self.err();
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&err)?;
        let from = message_state(&tx, message_id)
            .map_err(&err)?
            .ok_or(StoreError::NotFound {
                kind: "message",
                id: message_id,
            })?;
        if state == MessageState::Running {
            return Err(StoreError::MessageTransition {
                id: message_id,
                from,
                to: state,
                why: "a message becomes running only through start_turn",
            });
        }
        if from.is_final() {
            return Err(StoreError::MessageTransition {
                id: message_id,
                from,
                to: state,
                why: "answered, failed and dropped are final",
            });
        }
        let unlink = matches!(state, MessageState::Received | MessageState::Queued);
        let detail = self
            .sealer
            .seal_opt(&self.path, MESSAGE_DETAIL, message_id, detail)?;
        tx.prepare_cached(
            "UPDATE messages
             SET state = ?2, detail = ?3, turn_id = CASE WHEN ?4 THEN NULL ELSE turn_id END
             WHERE id = ?1",
        )
        .and_then(|mut s| s.execute(params![message_id, state.as_str(), detail, unlink]))
        .map_err(&err)?;
        tx.commit().map_err(&err)?;
        self.committed();
        Ok(())
    }

    /// The message `message_id`, or `None` if there is none.
    pub fn message(&self, message_id: MessageId) -> Result<Option<StoredMessage>, StoreError> {
        let conn = self.conn();
        conn.prepare_cached(&format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = ?1"
        ))
        .and_then(|mut s| s.query_row([message_id], message_row).optional())
        .map_err(self.err())?
        .map(|m| self.open_message(m))
        .transpose()
    }

    /// Messages received, queued or running, oldest (first stored) first:
    /// what a restarted gateway still owes an answer or a failure report.
    /// Running ones belong to [`Store::interrupted_turns`].
    pub fn unfinished_messages(&self) -> Result<Vec<StoredMessage>, StoreError> {
        self.messages_where(
            "state IN ('received', 'queued', 'running') ORDER BY id",
            params![],
        )
    }

    /// Number of messages waiting for a turn (received or queued), for the
    /// queue-depth metric.
    pub fn queue_depth(&self) -> Result<u64, StoreError> {
        let conn = self.conn();
        conn.prepare_cached("SELECT count(*) FROM messages WHERE state IN ('received', 'queued')")
            .and_then(|mut s| s.query_row([], |r| r.get::<_, i64>(0)))
            .map(|n| n as u64)
            .map_err(self.err())
    }

    /// The conversation's messages stored after the newest message of its
    /// last finished turn (all of them if no turn has finished), oldest
    /// first, in every state: the thread history the agent gets as context.
    /// The caller filters (e.g. leaves out dropped ones). An unknown
    /// conversation is [`StoreError::NotFound`].
    pub fn messages_since_last_turn(
        &self,
        conversation_id: ConversationId,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        self.require_conversation(conversation_id)?;
        self.messages_where(
            "conversation_id = ?1 AND id > coalesce(
                 (SELECT max(m.id) FROM messages m JOIN turns t ON t.id = m.turn_id
                  WHERE t.conversation_id = ?1 AND t.state <> 'running'), 0)
             ORDER BY id",
            params![conversation_id],
        )
    }

    fn messages_where(
        &self,
        clause: &str,
        args: &[&dyn rusqlite::ToSql],
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let conn = self.conn();
        conn.prepare_cached(&format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE {clause}"
        ))
        .and_then(|mut s| {
            s.query_map(args, message_row)?
                .collect::<Result<Vec<_>, _>>()
        })
        .map_err(self.err())?
        .into_iter()
        .map(|m| self.open_message(m))
        .collect()
    }

    /// A message row as read, with its sealed fields opened.
    fn open_message(&self, mut m: StoredMessage) -> Result<StoredMessage, StoreError> {
        m.text = self
            .sealer
            .open(&self.path, MESSAGE_TEXT, m.id, std::mem::take(&mut m.text))?;
        m.detail = self
            .sealer
            .open_opt(&self.path, MESSAGE_DETAIL, m.id, m.detail.take())?;
        Ok(m)
    }

    /// A conversation row as read, with its sealed fields opened.
    fn open_conversation(&self, mut c: Conversation) -> Result<Conversation, StoreError> {
        c.agent_session =
            self.sealer
                .open_opt(&self.path, AGENT_SESSION, c.id, c.agent_session.take())?;
        Ok(c)
    }

    fn open_conversations(&self, cs: Vec<Conversation>) -> Result<Vec<Conversation>, StoreError> {
        cs.into_iter().map(|c| self.open_conversation(c)).collect()
    }

    /// A turn row as read, with its sealed fields opened.
    fn open_turn(&self, mut t: Turn) -> Result<Turn, StoreError> {
        t.error = self
            .sealer
            .open_opt(&self.path, TURN_ERROR, t.id, t.error.take())?;
        Ok(t)
    }

    // ---- conversations -------------------------------------------------

    /// The conversation `conversation_id`, or `None`.
    pub fn conversation(
        &self,
        conversation_id: ConversationId,
    ) -> Result<Option<Conversation>, StoreError> {
        let conn = self.conn();
        conn.prepare_cached(&format!(
            "SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE id = ?1"
        ))
        .and_then(|mut s| s.query_row([conversation_id], conversation_row).optional())
        .map_err(self.err())?
        .map(|c| self.open_conversation(c))
        .transpose()
    }

    /// The conversation of `(platform, channel, thread)`, or `None` if no
    /// message of that thread was stored yet.
    pub fn conversation_by_key(
        &self,
        platform: &str,
        channel: &str,
        thread: &str,
    ) -> Result<Option<Conversation>, StoreError> {
        let conn = self.conn();
        conn.prepare_cached(&format!(
            "SELECT {CONVERSATION_COLUMNS} FROM conversations
             WHERE platform = ?1 AND channel = ?2 AND thread = ?3"
        ))
        .and_then(|mut s| {
            s.query_row(params![platform, channel, thread], conversation_row)
                .optional()
        })
        .map_err(self.err())?
        .map(|c| self.open_conversation(c))
        .transpose()
    }

    /// Records the lease (pool mode, for the length of a turn) or the
    /// sandbox (per-thread mode, until deleted) the conversation holds;
    /// `None` when it holds none. Unknown id: [`StoreError::NotFound`].
    pub fn set_conversation_lease(
        &self,
        conversation_id: ConversationId,
        lease_name: Option<&str>,
    ) -> Result<(), StoreError> {
        self.update_conversation(
            "UPDATE conversations SET lease_name = ?2 WHERE id = ?1",
            conversation_id,
            &lease_name,
        )
    }

    /// Records the sandbox mode the conversation's sandbox is assigned under
    /// (the channel's setting when it got one; kept so that a later policy
    /// change cannot make moat forget a per-thread sandbox it must delete).
    pub fn set_sandbox_mode(
        &self,
        conversation_id: ConversationId,
        mode: SandboxMode,
    ) -> Result<(), StoreError> {
        self.update_conversation(
            "UPDATE conversations SET sandbox_mode = ?2 WHERE id = ?1",
            conversation_id,
            &mode.as_str(),
        )
    }

    /// Records the agent's session id (to resume its context next turn);
    /// `None` forgets it. Unknown id: [`StoreError::NotFound`].
    pub fn set_agent_session(
        &self,
        conversation_id: ConversationId,
        session: Option<&str>,
    ) -> Result<(), StoreError> {
        let session = self
            .sealer
            .seal_opt(&self.path, AGENT_SESSION, conversation_id, session)?;
        self.update_conversation(
            "UPDATE conversations SET agent_session = ?2 WHERE id = ?1",
            conversation_id,
            &session,
        )
    }

    /// Raises `last_active_ms` to `ts_ms`; an earlier `ts_ms` changes
    /// nothing (activity never moves backwards). Unknown id:
    /// [`StoreError::NotFound`].
    pub fn touch_conversation(
        &self,
        conversation_id: ConversationId,
        ts_ms: i64,
    ) -> Result<(), StoreError> {
        self.update_conversation(
            "UPDATE conversations SET last_active_ms = max(last_active_ms, ?2) WHERE id = ?1",
            conversation_id,
            &ts_ms,
        )
    }

    fn update_conversation(
        &self,
        sql: &str,
        conversation_id: ConversationId,
        value: &dyn rusqlite::ToSql,
    ) -> Result<(), StoreError> {
        let conn = self.conn();
        let n = conn
            .prepare_cached(sql)
            .and_then(|mut s| s.execute(params![conversation_id, value]))
            .map_err(self.err())?;
        drop(conn);
        if n == 0 {
            return Err(StoreError::NotFound {
                kind: "conversation",
                id: conversation_id,
            });
        }
        self.committed();
        Ok(())
    }

    fn require_conversation(&self, conversation_id: ConversationId) -> Result<(), StoreError> {
        match self.conversation(conversation_id)? {
            Some(_) => Ok(()),
            None => Err(StoreError::NotFound {
                kind: "conversation",
                id: conversation_id,
            }),
        }
    }

    /// Per-thread conversations whose sandbox may be deleted: sandbox mode
    /// `per-thread`, a sandbox recorded (`lease_name` set), last active
    /// strictly before `older_than_ms` (an instant: now minus the idle time),
    /// no running turn and no message waiting (received, queued, running).
    /// Least recently active first. Clearing the lease
    /// ([`Store::set_conversation_lease`] with `None`) after deleting the
    /// sandbox takes a conversation off this list.
    pub fn idle_conversations(&self, older_than_ms: i64) -> Result<Vec<Conversation>, StoreError> {
        let conn = self.conn();
        conn.prepare_cached(&format!(
            "SELECT {CONVERSATION_COLUMNS} FROM conversations c
             WHERE c.lease_name IS NOT NULL
               AND c.last_active_ms < ?1
               AND c.sandbox_mode = 'per-thread'
               AND NOT EXISTS (SELECT 1 FROM turns t
                               WHERE t.conversation_id = c.id AND t.state = 'running')
               AND NOT EXISTS (SELECT 1 FROM messages m
                               WHERE m.conversation_id = c.id
                                 AND m.state IN ('received', 'queued', 'running'))
             ORDER BY c.last_active_ms, c.id"
        ))
        .and_then(|mut s| s.query_map([older_than_ms], conversation_row)?.collect())
        .map_err(self.err())
        .and_then(|cs| self.open_conversations(cs))
    }

    // ---- turns ---------------------------------------------------------

    /// Starts a turn of `conversation_id` answering `message_ids`, in one
    /// transaction: creates the turn (`Running`, `started_ms = now_ms`),
    /// moves each message to `Running` linked to it, and raises the
    /// conversation's `last_active_ms` to `now_ms`.
    ///
    /// Refused, changing nothing: an empty `message_ids`
    /// ([`StoreError::Invalid`]); an unknown conversation or message
    /// ([`StoreError::NotFound`]); a message of another conversation
    /// ([`StoreError::WrongConversation`]); a message not `Received` or
    /// `Queued` ([`StoreError::MessageTransition`]); a conversation that
    /// already has a running turn ([`StoreError::TurnRunning`]; the schema
    /// enforces this too).
    pub fn start_turn(
        &self,
        conversation_id: ConversationId,
        message_ids: &[MessageId],
        now_ms: i64,
    ) -> Result<TurnId, StoreError> {
        if message_ids.is_empty() {
            return Err(StoreError::Invalid {
                field: "message_ids",
                reason: "a turn answers at least one message",
            });
        }
        let err = self.err();
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&err)?;
        let exists: bool = tx
            .prepare_cached("SELECT 1 FROM conversations WHERE id = ?1")
            .and_then(|mut s| s.exists([conversation_id]))
            .map_err(&err)?;
        if !exists {
            return Err(StoreError::NotFound {
                kind: "conversation",
                id: conversation_id,
            });
        }
        let running: Option<TurnId> = tx
            .prepare_cached("SELECT id FROM turns WHERE conversation_id = ?1 AND state = 'running'")
            .and_then(|mut s| s.query_row([conversation_id], |r| r.get(0)).optional())
            .map_err(&err)?;
        if let Some(turn_id) = running {
            return Err(StoreError::TurnRunning {
                conversation_id,
                turn_id,
            });
        }
        for &id in message_ids {
            let row: Option<(ConversationId, String)> = tx
                .prepare_cached("SELECT conversation_id, state FROM messages WHERE id = ?1")
                .and_then(|mut s| s.query_row([id], |r| Ok((r.get(0)?, r.get(1)?))).optional())
                .map_err(&err)?;
            let Some((actual, state)) = row else {
                return Err(StoreError::NotFound {
                    kind: "message",
                    id,
                });
            };
            if actual != conversation_id {
                return Err(StoreError::WrongConversation {
                    message_id: id,
                    expected: conversation_id,
                    actual,
                });
            }
            let from = parse_name::<MessageState>(&state, 1).map_err(&err)?;
            if !matches!(from, MessageState::Received | MessageState::Queued) {
                return Err(StoreError::MessageTransition {
                    id,
                    from,
                    to: MessageState::Running,
                    why: "only received or queued messages join a turn",
                });
            }
        }
        tx.prepare_cached(
            "INSERT INTO turns (conversation_id, state, started_ms) VALUES (?1, 'running', ?2)",
        )
        .and_then(|mut s| s.execute(params![conversation_id, now_ms]))
        .map_err(&err)?;
        let turn_id = tx.last_insert_rowid();
        {
            let mut link = tx
                .prepare_cached(
                    "UPDATE messages SET state = 'running', turn_id = ?2, detail = NULL
                     WHERE id = ?1",
                )
                .map_err(&err)?;
            for &id in message_ids {
                link.execute(params![id, turn_id]).map_err(&err)?;
            }
        }
        tx.prepare_cached(
            "UPDATE conversations SET last_active_ms = max(last_active_ms, ?2) WHERE id = ?1",
        )
        .and_then(|mut s| s.execute(params![conversation_id, now_ms]))
        .map_err(&err)?;
        tx.commit().map_err(&err)?;
        self.committed();
        Ok(turn_id)
    }

    /// Finishes a running turn, in one transaction: sets its state,
    /// `ended_ms = now_ms`, `answer_chars` and `error`; moves its messages
    /// that are still `Running` to `Answered` (turn `Done`) or `Failed` with
    /// `detail` = `error` (turn `Failed`, or `Cancelled`, where a missing
    /// `error` reads "cancelled"); and raises the conversation's
    /// `last_active_ms` to `now_ms` (idle time counts from the end of the
    /// last turn).
    ///
    /// A turn finishes once: finishing one that is not running, or finishing
    /// "to" `Running`, is [`StoreError::TurnTransition`]; an unknown turn is
    /// [`StoreError::NotFound`].
    pub fn finish_turn(
        &self,
        turn_id: TurnId,
        state: TurnState,
        answer_chars: u64,
        error: Option<&str>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let err = self.err();
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&err)?;
        let row: Option<(ConversationId, String)> = tx
            .prepare_cached("SELECT conversation_id, state FROM turns WHERE id = ?1")
            .and_then(|mut s| {
                s.query_row([turn_id], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()
            })
            .map_err(&err)?;
        let Some((conversation_id, from)) = row else {
            return Err(StoreError::NotFound {
                kind: "turn",
                id: turn_id,
            });
        };
        let from = parse_name::<TurnState>(&from, 1).map_err(&err)?;
        if state == TurnState::Running {
            return Err(StoreError::TurnTransition {
                id: turn_id,
                from,
                to: state,
                why: "finish a turn as done, failed or cancelled",
            });
        }
        if from != TurnState::Running {
            return Err(StoreError::TurnTransition {
                id: turn_id,
                from,
                to: state,
                why: "a turn finishes once",
            });
        }
        let answer_chars = i64::try_from(answer_chars).unwrap_or(i64::MAX);
        let sealed_error = self
            .sealer
            .seal_opt(&self.path, TURN_ERROR, turn_id, error)?;
        tx.prepare_cached(
            "UPDATE turns SET state = ?2, ended_ms = ?3, answer_chars = ?4, error = ?5
             WHERE id = ?1",
        )
        .and_then(|mut s| {
            s.execute(params![
                turn_id,
                state.as_str(),
                now_ms,
                answer_chars,
                sealed_error
            ])
        })
        .map_err(&err)?;
        let (message_state, detail) = match state {
            TurnState::Done => (MessageState::Answered, None),
            TurnState::Failed => (MessageState::Failed, error),
            _ => (MessageState::Failed, Some(error.unwrap_or("cancelled"))),
        };
        // Each message's detail is sealed for its own row.
        let settle: Vec<MessageId> = tx
            .prepare_cached("SELECT id FROM messages WHERE turn_id = ?1 AND state = 'running'")
            .and_then(|mut s| s.query_map([turn_id], |r| r.get(0))?.collect())
            .map_err(&err)?;
        for id in settle {
            let detail = self
                .sealer
                .seal_opt(&self.path, MESSAGE_DETAIL, id, detail)?;
            tx.prepare_cached("UPDATE messages SET state = ?2, detail = ?3 WHERE id = ?1")
                .and_then(|mut s| s.execute(params![id, message_state.as_str(), detail]))
                .map_err(&err)?;
        }
        tx.prepare_cached(
            "UPDATE conversations SET last_active_ms = max(last_active_ms, ?2) WHERE id = ?1",
        )
        .and_then(|mut s| s.execute(params![conversation_id, now_ms]))
        .map_err(&err)?;
        tx.commit().map_err(&err)?;
        self.committed();
        Ok(())
    }

    /// The turn `turn_id`, or `None`.
    pub fn turn(&self, turn_id: TurnId) -> Result<Option<Turn>, StoreError> {
        let conn = self.conn();
        conn.prepare_cached(&format!("SELECT {TURN_COLUMNS} FROM turns WHERE id = ?1"))
            .and_then(|mut s| s.query_row([turn_id], turn_row).optional())
            .map_err(self.err())?
            .map(|t| self.open_turn(t))
            .transpose()
    }

    /// The messages linked to `turn_id` (those it answers or answered),
    /// oldest first; what to retry or report when the turn was interrupted.
    pub fn turn_messages(&self, turn_id: TurnId) -> Result<Vec<StoredMessage>, StoreError> {
        self.messages_where("turn_id = ?1 ORDER BY id", params![turn_id])
    }

    /// Turns in state `Running`, oldest first. Called at start-up, before any
    /// new turn starts, these are the turns a crash or kill interrupted (the
    /// lock of [`Store::open`] guarantees no other process runs them); the
    /// gateway retries or fails each with [`Store::finish_turn`].
    pub fn interrupted_turns(&self) -> Result<Vec<Turn>, StoreError> {
        let conn = self.conn();
        conn.prepare_cached(&format!(
            "SELECT {TURN_COLUMNS} FROM turns WHERE state = 'running' ORDER BY id"
        ))
        .and_then(|mut s| s.query_map([], turn_row)?.collect::<Result<Vec<_>, _>>())
        .map_err(self.err())?
        .into_iter()
        .map(|t| self.open_turn(t))
        .collect()
    }

    // ---- maintenance ---------------------------------------------------

    /// Runs SQLite's `integrity_check` and `foreign_key_check` and returns
    /// the problems found; empty means the database is sound.
    pub fn check_integrity(&self) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut problems: Vec<String> = conn
            .prepare("PRAGMA integrity_check")
            .and_then(|mut s| s.query_map([], |r| r.get::<_, String>(0))?.collect())
            .map_err(self.err())?;
        if problems == ["ok"] {
            problems.clear();
        }
        let fk: Vec<String> = conn
            .prepare("PRAGMA foreign_key_check")
            .and_then(|mut s| {
                s.query_map([], |r| {
                    Ok(format!(
                        "{} row {} references a missing {} row",
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, String>(2)?
                    ))
                })?
                .collect()
            })
            .map_err(self.err())?;
        problems.extend(fk);
        Ok(problems)
    }
}

fn busy_ms() -> u64 {
    BUSY_TIMEOUT.as_millis() as u64
}

/// Opens (creating with mode 0600) a file only moat's user may read, and
/// narrows an existing file's mode to 0600.
fn private_file(path: &Path, action: &'static str) -> Result<File, StoreError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|e| StoreError::io(action, path, e))?;
    narrow_mode(path)?;
    Ok(file)
}

fn narrow_mode(path: &Path) -> Result<(), StoreError> {
    let meta = std::fs::metadata(path).map_err(|e| StoreError::io("inspect", path, e))?;
    if !meta.is_file() {
        return Err(StoreError::Io {
            action: "use",
            path: path.to_path_buf(),
            reason: "it is not a regular file".into(),
        });
    }
    if meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| StoreError::io("set mode 0600 on", path, e))?;
    }
    Ok(())
}

fn parse_name<T: FromStr<Err = UnknownName>>(s: &str, col: usize) -> rusqlite::Result<T> {
    s.parse()
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(col, Type::Text, Box::new(e)))
}

fn message_state(conn: &Connection, id: MessageId) -> rusqlite::Result<Option<MessageState>> {
    let s: Option<String> = conn
        .prepare_cached("SELECT state FROM messages WHERE id = ?1")?
        .query_row([id], |r| r.get(0))
        .optional()?;
    s.map(|s| parse_name(&s, 0)).transpose()
}

fn message_row(r: &Row<'_>) -> rusqlite::Result<StoredMessage> {
    Ok(StoredMessage {
        id: r.get(0)?,
        platform: r.get(1)?,
        event_id: r.get(2)?,
        conversation_id: r.get(3)?,
        user: r.get(4)?,
        text: r.get(5)?,
        ts_ms: r.get(6)?,
        state: parse_name(&r.get::<_, String>(7)?, 7)?,
        turn_id: r.get(8)?,
        detail: r.get(9)?,
        message_ref: r.get(10)?,
    })
}

fn conversation_row(r: &Row<'_>) -> rusqlite::Result<Conversation> {
    let mode: Option<String> = r.get(6)?;
    Ok(Conversation {
        id: r.get(0)?,
        platform: r.get(1)?,
        channel: r.get(2)?,
        thread: r.get(3)?,
        created_ms: r.get(4)?,
        last_active_ms: r.get(5)?,
        sandbox_mode: mode.map(|m| parse_name(&m, 6)).transpose()?,
        lease_name: r.get(7)?,
        agent_session: r.get(8)?,
    })
}

fn turn_row(r: &Row<'_>) -> rusqlite::Result<Turn> {
    Ok(Turn {
        id: r.get(0)?,
        conversation_id: r.get(1)?,
        state: parse_name(&r.get::<_, String>(2)?, 2)?,
        started_ms: r.get(3)?,
        ended_ms: r.get(4)?,
        answer_chars: r.get::<_, i64>(5)?.max(0) as u64,
        error: r.get(6)?,
    })
}
