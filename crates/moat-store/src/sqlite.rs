//! The SQLite side of the store: opening the database file (its mode, the
//! one-process lock, WAL and the pragmas), and the background checkpointer.
//!
//! It must never: open a database file another live process holds, leave a
//! database file readable by group or others, or switch the journal mode of
//! a database this build refuses (another program's, a newer moat's).

use std::fs::{DirBuilder, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use crate::db::SqliteConn;
use crate::sealed::{self, Sealer};
use crate::{
    busy_ms, schema, Backend, Durability, Encryption, Store, StoreError, StoreKey, APPLICATION_ID,
    BUSY_TIMEOUT,
};

/// Past this size the WAL file is truncated after a checkpoint.
const JOURNAL_SIZE_LIMIT: u64 = 64 * 1024 * 1024;

/// The background checkpointer is woken after this many commits...
pub(crate) const CHECKPOINT_EVERY_COMMITS: u64 = 64;
/// ...and at least this often while the store lives.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);
/// Backstop: a writer checkpoints by itself once the WAL holds this many
/// pages (about 40 MB), should the checkpointer fall behind.
const WRITER_AUTOCHECKPOINT_PAGES: u32 = 10_000;

/// A thread with its own connection that runs `PRAGMA wal_checkpoint(PASSIVE)`
/// when woken and every [`CHECKPOINT_INTERVAL`]. Passive checkpoints never
/// block writers; they move the fsyncs of checkpointing (two per checkpoint)
/// off [`Store::insert_message`]'s path.
pub(crate) struct Checkpointer {
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

    pub(crate) fn nudge(&self) {
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
            db: Backend::Sqlite(Mutex::new(conn)),
            path,
            durability,
            sealer: Sealer::new(key),
            node: None,
            commits: AtomicU64::new(0),
            checkpointer: None,
            _lock: Some(lock),
        };
        store.configure_sqlite(true)?;
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
            db: Backend::Sqlite(Mutex::new(conn)),
            path,
            durability: Durability::default(),
            sealer: Sealer::new(key),
            node: None,
            commits: AtomicU64::new(0),
            checkpointer: None,
            _lock: None,
        };
        store.configure_sqlite(false)?;
        Ok(store)
    }

    pub(crate) fn configure_sqlite(&mut self, on_disk: bool) -> Result<(), StoreError> {
        let path = self.path.clone();
        let sync = match self.durability {
            Durability::ProcessCrash => "NORMAL",
            Durability::PowerLoss => "FULL",
        };
        let Backend::Sqlite(conn) = &mut self.db else {
            return Ok(());
        };
        let conn = conn.get_mut().unwrap_or_else(PoisonError::into_inner);
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
        sealed::check_key(&mut SqliteConn { conn, path: &path }, &path, &self.sealer)?;
        if self.sealer.encryption() != Encryption::Off {
            // A row that grows when it is sealed may move; the old cell is
            // then zeroed, not left as free space holding plaintext.
            conn.execute_batch("PRAGMA secure_delete = ON")
                .map_err(sql)?;
        }
        Ok(())
    }
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
