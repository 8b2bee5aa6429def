//! The PostgreSQL side of the store: where the database is, a bounded pool
//! of connections, serializable transactions retried on conflict, and the
//! translation of rows and errors into the store's own types.
//!
//! The store's interface is synchronous (the gateway calls it from blocking
//! threads and from async tasks alike), and tokio-postgres is async. Each
//! call is handed to the store's own small runtime and waited for on a
//! plain channel: safe from any thread, inside an async task or not (a
//! nested `block_on` would panic there). See `docs/store.md`, "PostgreSQL".
//!
//! It must never: put the password into an error, a log line or a `Debug`
//! output (errors name the database by `user@host:port/dbname`), put a
//! parameter's value or a PostgreSQL error's DETAIL into an error (DETAIL
//! may quote a whole row: a message's text), or leave a transaction open on
//! a pooled connection.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use bytes::BytesMut;
use tokio_postgres::config::Host;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{IsNull, ToSql, Type};
use tokio_postgres::{Client, NoTls, Statement};
use zeroize::Zeroizing;

use crate::db::{Conn, Dialect, Row, Value};
use crate::error::StoreError;

/// The environment variable (or secrets file entry) holding the password.
pub const PASSWORD_VAR: &str = "MOAT_STORE_PASSWORD";

/// Connections per store (per gateway node) unless configured.
pub const DEFAULT_POOL_SIZE: usize = 8;

/// A statement, a connect or a wait for a free connection that takes longer
/// fails with [`StoreError::Unavailable`] (the platform retries the event).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A write transaction that conflicts with another node's is run again this
/// many times before [`StoreError::Contention`] is returned...
const CONFLICT_RETRIES: u32 = 30;
/// ...after a random pause of up to 1, 2, 4 ... ms, at most this long.
const CONFLICT_BACKOFF_MAX_MS: u64 = 64;

/// Where the PostgreSQL store is and how to reach it.
#[derive(Clone)]
pub struct PgOptions {
    /// `postgres://user@host:port/dbname` (or the key=value form); must not
    /// hold a password.
    pub url: String,
    /// The password, from [`PASSWORD_VAR`]; `None` for trust or peer
    /// authentication.
    pub password: Option<Zeroizing<String>>,
    /// Connections in the pool.
    pub pool_size: usize,
}

impl std::fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgOptions")
            .field("url", &self.url)
            .field("password", &self.password.as_ref().map(|_| "(set)"))
            .field("pool_size", &self.pool_size)
            .finish()
    }
}

impl PgOptions {
    /// The URL as a config, refusing a password written into it (the
    /// config file is not the place for secrets, D6).
    fn config(&self) -> Result<tokio_postgres::Config, StoreError> {
        let mut config =
            tokio_postgres::Config::from_str(&self.url).map_err(|e| StoreError::Config {
                key: "store.url",
                reason: format!(
                    "is not a PostgreSQL connection URL ({}); write postgres://USER@HOST:PORT/DBNAME",
                    first_line(&e.to_string())
                ),
            })?;
        if config.get_password().is_some() {
            return Err(StoreError::Config {
                key: "store.url",
                reason: format!(
                    "holds a password; remove it from the URL and give it as {PASSWORD_VAR} (environment or secrets file)"
                ),
            });
        }
        if config.get_hosts().is_empty() {
            return Err(StoreError::Config {
                key: "store.url",
                reason: "names no host; write postgres://USER@HOST:PORT/DBNAME".into(),
            });
        }
        if let Some(p) = &self.password {
            config.password(p.as_bytes());
        }
        config.connect_timeout(CALL_TIMEOUT);
        config.application_name("moat");
        Ok(config)
    }
}

/// `user@host:port/dbname`, the name errors give the database.
fn label(config: &tokio_postgres::Config) -> PathBuf {
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "?".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    PathBuf::from(format!(
        "postgres://{}@{host}:{port}/{}",
        config.get_user().unwrap_or(""),
        config.get_dbname().unwrap_or("")
    ))
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

/// The pool and the runtime its connections live on.
pub(crate) struct Pg {
    rt: Option<tokio::runtime::Runtime>,
    config: tokio_postgres::Config,
    label: PathBuf,
    size: usize,
    state: Mutex<PoolState>,
    freed: Condvar,
}

struct PoolState {
    idle: Vec<PgClient>,
    open: usize,
}

struct PgClient {
    client: Arc<Client>,
    statements: HashMap<String, Statement>,
    broken: bool,
}

impl Drop for Pg {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which panics inside an async task.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Pg {
    pub(crate) fn new(opts: &PgOptions) -> Result<Pg, StoreError> {
        let config = opts.config()?;
        let label = label(&config);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("moat-store-pg")
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| StoreError::io("start the PostgreSQL client runtime for", &label, e))?;
        let pg = Pg {
            rt: Some(rt),
            config,
            label,
            size: opts.pool_size.max(1),
            state: Mutex::new(PoolState {
                idle: Vec::new(),
                open: 0,
            }),
            freed: Condvar::new(),
        };
        // Connect once now: a wrong host or password fails `open`.
        let c = pg.checkout()?;
        pg.checkin(c);
        Ok(pg)
    }

    pub(crate) fn label(&self) -> &Path {
        &self.label
    }

    /// Runs `fut` on the store's runtime and waits for it, at most
    /// [`CALL_TIMEOUT`].
    fn block<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let unavailable = |reason: &str| StoreError::Unavailable {
            path: self.label.clone(),
            reason: reason.to_string(),
        };
        let Some(rt) = &self.rt else {
            return Err(unavailable("the store is closing"));
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let label = self.label.clone();
        rt.spawn(async move {
            let r = match tokio::time::timeout(CALL_TIMEOUT, fut).await {
                Ok(r) => r,
                Err(_) => Err(StoreError::Unavailable {
                    path: label,
                    reason: format!("no answer within {} s", CALL_TIMEOUT.as_secs()),
                }),
            };
            let _ = tx.send(r);
        });
        rx.recv()
            .unwrap_or_else(|_| Err(unavailable("the client runtime stopped")))
    }

    fn connect(&self) -> Result<PgClient, StoreError> {
        let config = self.config.clone();
        let label = self.label.clone();
        let client = self.block(async move {
            let (client, conn) = config
                .connect(NoTls)
                .await
                .map_err(|e| pg_error(&label, &e))?;
            tokio::spawn(async move {
                // Ends when the client is dropped or the server goes away;
                // the next call on the client reports it.
                let _ = conn.await;
            });
            Ok(client)
        })?;
        Ok(PgClient {
            client: Arc::new(client),
            statements: HashMap::new(),
            broken: false,
        })
    }

    fn checkout(&self) -> Result<PgClient, StoreError> {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(c) = st.idle.pop() {
                if !c.client.is_closed() {
                    return Ok(c);
                }
                st.open -= 1;
                continue;
            }
            if st.open < self.size {
                st.open += 1;
                drop(st);
                return self.connect().inspect_err(|_| {
                    let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
                    st.open -= 1;
                    self.freed.notify_one();
                });
            }
            let (next, timeout) = self
                .freed
                .wait_timeout(st, CALL_TIMEOUT)
                .unwrap_or_else(PoisonError::into_inner);
            st = next;
            if timeout.timed_out() && st.idle.is_empty() && st.open >= self.size {
                return Err(StoreError::Unavailable {
                    path: self.label.clone(),
                    reason: format!(
                        "all {} connections stayed busy for {} s",
                        self.size,
                        CALL_TIMEOUT.as_secs()
                    ),
                });
            }
        }
    }

    fn checkin(&self, c: PgClient) {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if c.broken || c.client.is_closed() {
            st.open -= 1;
        } else {
            st.idle.push(c);
        }
        drop(st);
        self.freed.notify_one();
    }

    /// `f` on a pooled connection, each statement its own transaction.
    pub(crate) fn read<T>(
        &self,
        f: impl FnOnce(&mut dyn Conn) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut c = self.checkout()?;
        let r = f(&mut PgConn {
            pg: self,
            c: &mut c,
        });
        self.checkin(c);
        r
    }

    /// `f` in one serializable transaction, run again (up to
    /// [`CONFLICT_RETRIES`] times) when PostgreSQL reports a conflict with a
    /// concurrent transaction (another node's).
    pub(crate) fn write<T>(
        &self,
        f: impl FnMut(&mut dyn Conn) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.transaction("BEGIN ISOLATION LEVEL SERIALIZABLE", f)
    }

    /// `f` in one read-committed transaction (migrations: each statement
    /// sees what a node that held the advisory lock before committed).
    pub(crate) fn migrate<T>(
        &self,
        f: impl FnMut(&mut dyn Conn) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.transaction("BEGIN ISOLATION LEVEL READ COMMITTED", f)
    }

    fn transaction<T>(
        &self,
        begin: &str,
        mut f: impl FnMut(&mut dyn Conn) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut attempt = 0;
        loop {
            let mut c = self.checkout()?;
            let r = {
                let mut conn = PgConn {
                    pg: self,
                    c: &mut c,
                };
                let r = conn
                    .batch(begin)
                    .and_then(|()| f(&mut conn))
                    .and_then(|v| conn.batch("COMMIT").map(|()| v));
                if r.is_err() && conn.batch("ROLLBACK").is_err() {
                    conn.c.broken = true;
                }
                r
            };
            self.checkin(c);
            match r {
                Err(StoreError::Contention { .. }) if attempt < CONFLICT_RETRIES => {
                    attempt += 1;
                    // Random, so that the transactions that collided do not
                    // collide again in step.
                    let cap = (1u64 << attempt.min(6)).min(CONFLICT_BACKOFF_MAX_MS);
                    std::thread::sleep(Duration::from_micros(jitter() % (cap * 1000) + 100));
                }
                r => return r,
            }
        }
    }
}

/// A random number for backoff (not for anything secret): the standard
/// library's per-instance random hash keys.
fn jitter() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

/// A checked-out connection running the store's queries.
struct PgConn<'a> {
    pg: &'a Pg,
    c: &'a mut PgClient,
}

impl PgConn<'_> {
    fn batch(&mut self, sql: &str) -> Result<(), StoreError> {
        let sql = sql.to_string();
        let client = self.c.client.clone();
        let label = self.pg.label.clone();
        let r = self.pg.block(async move {
            client
                .batch_execute(&sql)
                .await
                .map_err(|e| pg_error(&label, &e))
        });
        self.note(r)
    }

    fn note<T>(&mut self, r: Result<T, StoreError>) -> Result<T, StoreError> {
        if matches!(r, Err(StoreError::Unavailable { .. })) {
            self.c.broken = true;
        }
        r
    }

    /// Prepares (once per connection) and runs `sql`; `rows` chooses
    /// between returning rows and counting changed ones.
    fn run(
        &mut self,
        sql: &str,
        args: &[Value],
        rows: bool,
    ) -> Result<(Vec<Row>, u64), StoreError> {
        let cached = self.c.statements.get(sql).cloned();
        let text = Dialect::Postgres.translate(sql);
        let client = self.c.client.clone();
        let args = args.to_vec();
        let label = self.pg.label.clone();
        let r = self.pg.block(async move {
            let stmt = match cached {
                Some(s) => s,
                None => client
                    .prepare(&text)
                    .await
                    .map_err(|e| pg_error(&label, &e))?,
            };
            let params: Vec<&(dyn ToSql + Sync)> =
                args.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
            if rows {
                let got = client
                    .query(&stmt, &params)
                    .await
                    .map_err(|e| pg_error(&label, &e))?;
                let got = got.iter().map(row).collect::<Result<Vec<_>, _>>()?;
                Ok((stmt, got, 0))
            } else {
                let n = client
                    .execute(&stmt, &params)
                    .await
                    .map_err(|e| pg_error(&label, &e))?;
                Ok((stmt, Vec::new(), n))
            }
        });
        let (stmt, got, n) = self.note(r)?;
        self.c.statements.entry(sql.to_string()).or_insert(stmt);
        Ok((got, n))
    }
}

impl Conn for PgConn<'_> {
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }

    fn execute_batch(&mut self, sql: &str) -> Result<(), StoreError> {
        self.batch(sql)
    }

    fn query(&mut self, sql: &str, args: &[Value]) -> Result<Vec<Row>, StoreError> {
        self.run(sql, args, true).map(|(r, _)| r)
    }

    fn execute(&mut self, sql: &str, args: &[Value]) -> Result<u64, StoreError> {
        self.run(sql, args, false).map(|(_, n)| n)
    }
}

fn row(r: &tokio_postgres::Row) -> Result<Row, StoreError> {
    let bad = |column| StoreError::BadRow {
        column,
        expected: "a column of a type moat stores",
    };
    let mut vals = Vec::with_capacity(r.len());
    for (i, col) in r.columns().iter().enumerate() {
        let t = col.type_();
        let v = if *t == Type::INT8 {
            r.try_get::<_, Option<i64>>(i).map(|v| v.map(Value::Int))
        } else if *t == Type::INT4 {
            r.try_get::<_, Option<i32>>(i)
                .map(|v| v.map(|v| Value::Int(v.into())))
        } else if *t == Type::INT2 {
            r.try_get::<_, Option<i16>>(i)
                .map(|v| v.map(|v| Value::Int(v.into())))
        } else if *t == Type::BOOL {
            r.try_get::<_, Option<bool>>(i).map(|v| v.map(Value::Bool))
        } else if [Type::TEXT, Type::VARCHAR, Type::NAME, Type::BPCHAR].contains(t) {
            r.try_get::<_, Option<String>>(i)
                .map(|v| v.map(Value::Text))
        } else {
            return Err(bad(i));
        };
        vals.push(v.map_err(|_| bad(i))?.unwrap_or(Value::Null));
    }
    Ok(Row(vals))
}

impl ToSql for Value {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(v) if *ty == Type::INT4 => i32::try_from(*v)?.to_sql(ty, out),
            Value::Int(v) if *ty == Type::INT2 => i16::try_from(*v)?.to_sql(ty, out),
            Value::Int(v) => v.to_sql(ty, out),
            Value::Text(v) => v.as_str().to_sql(ty, out),
            Value::Bool(v) => v.to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    fn to_sql_checked(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        let ok = match self {
            Value::Null => true,
            Value::Int(_) => [Type::INT8, Type::INT4, Type::INT2].contains(ty),
            Value::Text(_) => <&str as ToSql>::accepts(ty),
            Value::Bool(_) => *ty == Type::BOOL,
        };
        if !ok {
            return Err(format!("a parameter of type {ty} got another kind of value").into());
        }
        self.to_sql(ty, out)
    }
}

/// A PostgreSQL error as the store's error: conflicts (retried), the
/// database gone (retryable), or anything else, named by its SQLSTATE and
/// primary message only (never DETAIL, which may quote row values).
pub(crate) fn pg_error(label: &Path, e: &tokio_postgres::Error) -> StoreError {
    let path = label.to_path_buf();
    if let Some(db) = e.as_db_error() {
        let code = db.code();
        let reason = format!("{} (SQLSTATE {})", db.message(), code.code());
        if *code == SqlState::T_R_SERIALIZATION_FAILURE || *code == SqlState::T_R_DEADLOCK_DETECTED
        {
            return StoreError::Contention { path, reason };
        }
        if code.code().starts_with("08")
            || code.code().starts_with("57P")
            || *code == SqlState::TOO_MANY_CONNECTIONS
        {
            return StoreError::Unavailable { path, reason };
        }
        if *code == SqlState::INVALID_PASSWORD
            || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
        {
            return StoreError::Postgres {
                path,
                reason: format!("{reason}; check the user in store.url and {PASSWORD_VAR}"),
            };
        }
        return StoreError::Postgres { path, reason };
    }
    // No server error: the connection failed or was lost.
    StoreError::Unavailable {
        path,
        reason: first_line(&e.to_string()).to_string(),
    }
}
