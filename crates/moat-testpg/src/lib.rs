//! Tests only: a real PostgreSQL for the store suite and the multi-node
//! tests. The first call of [`cluster`] in a test process makes a
//! throwaway cluster (`initdb` in a scratch directory
//! `$TMPDIR/moat-pgtest-<pid>`, password authentication, `fsync=off`),
//! starts `postgres` on a free loopback port (fsync off for speed;
//! `MOAT_TESTPG_DURABLE=1`, for benchmarks, keeps PostgreSQL's defaults), and starts a watchdog that
//! stops the server and removes the directory once the test process is
//! gone (however it ended). [`Cluster::fresh`] gives each test its own
//! database, so tests run in parallel.
//!
//! As root (tests run as root here) the cluster runs as `nobody`: `initdb`
//! refuses root. The binaries come from `PATH` or Debian's
//! `/usr/lib/postgresql/<version>/bin` (`scripts/setup` installs the
//! `postgresql` package).
//!
//! It must never: listen beyond 127.0.0.1, touch a directory it did not
//! make, or run without a password.

#![forbid(unsafe_code)]

use std::io::Read;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use moat_store::PgOptions;
use zeroize::Zeroizing;

/// The unprivileged user the cluster runs as when the tests run as root.
const NOBODY: u32 = 65534;
/// The cluster's superuser.
pub const USER: &str = "moat";

/// A running throwaway cluster.
#[derive(Debug)]
pub struct Cluster {
    pub dir: PathBuf,
    pub port: u16,
    password: String,
    next_db: AtomicU32,
}

static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();

/// The test process's cluster, started on first use. Panics, naming what
/// is missing, when PostgreSQL cannot be started: the PostgreSQL half of the
/// suite must not be skipped silently.
pub fn cluster() -> &'static Cluster {
    match CLUSTER.get_or_init(start) {
        Ok(c) => c,
        Err(e) => panic!("cannot start the test PostgreSQL: {e}"),
    }
}

/// Where `initdb` and `postgres` are.
fn bin_dir() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            if d.join("initdb").is_file() && d.join("postgres").is_file() {
                return Ok(d);
            }
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path().join("bin"))
                .filter(|b| b.join("initdb").is_file())
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found.pop().ok_or_else(|| {
        "no initdb/postgres in PATH or /usr/lib/postgresql/*/bin; install Debian's postgresql package (scripts/setup does)".to_string()
    })
}

fn random_hex(bytes: usize) -> Result<String, String> {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(|e| format!("reading /dev/urandom: {e}"))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn as_cluster_user(cmd: &mut Command, root: bool) -> &mut Command {
    if root {
        cmd.uid(NOBODY).gid(NOBODY);
    }
    cmd
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("finding a free loopback port: {e}"))
}

fn start() -> Result<Cluster, String> {
    let bin = bin_dir()?;
    let durable = std::env::var_os("MOAT_TESTPG_DURABLE").is_some_and(|v| v == "1");
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    let dir = std::env::temp_dir().join(format!("moat-pgtest-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("chmod {}: {e}", dir.display()))?;
    let password = random_hex(16)?;
    let pwfile = dir.join("pw");
    std::fs::write(&pwfile, &password).map_err(|e| format!("writing the password file: {e}"))?;
    if root {
        for p in [&dir, &pwfile] {
            std::os::unix::fs::chown(p, Some(NOBODY), Some(NOBODY))
                .map_err(|e| format!("chown {} to nobody: {e}", p.display()))?;
        }
    }
    let data = dir.join("data");
    let out = as_cluster_user(&mut Command::new(bin.join("initdb")), root)
        .arg("-D")
        .arg(&data)
        .args([
            "-U",
            USER,
            "--auth=scram-sha-256",
            "-E",
            "UTF8",
            "--no-sync",
        ])
        .arg(format!("--pwfile={}", pwfile.display()))
        .current_dir(&dir)
        .output()
        .map_err(|e| format!("running initdb: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let _ = std::fs::remove_file(&pwfile);
    let mut last = String::new();
    for _ in 0..5 {
        let port = free_port()?;
        let log = std::fs::File::create(dir.join("postgres.log"))
            .map_err(|e| format!("creating the server log: {e}"))?;
        if root {
            let _ = std::os::unix::fs::chown(dir.join("postgres.log"), Some(NOBODY), Some(NOBODY));
        }
        let child = as_cluster_user(&mut Command::new(bin.join("postgres")), root)
            .arg("-D")
            .arg(&data)
            .arg("-p")
            .arg(port.to_string())
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", dir.display()))
            .args(if durable {
                // Benchmarks: a commit is on disk before it returns, as on
                // a real server.
                &["-c", "fsync=on", "-c", "synchronous_commit=on"][..]
            } else {
                &[
                    "-c",
                    "fsync=off",
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "full_page_writes=off",
                ][..]
            })
            .args(["-c", "max_connections=300"])
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting postgres: {e}"))?;
        watchdog(child.id(), &dir);
        let cluster = Cluster {
            dir: dir.clone(),
            port,
            password: password.clone(),
            next_db: AtomicU32::new(0),
        };
        match cluster.wait_ready(Duration::from_secs(30)) {
            Ok(()) => return Ok(cluster),
            Err(e) => {
                last = e;
                let _ = Command::new("kill").arg(child.id().to_string()).status();
            }
        }
    }
    let log = std::fs::read_to_string(dir.join("postgres.log")).unwrap_or_default();
    Err(format!(
        "postgres did not come up ({last}); its log:\n{log}"
    ))
}

/// Stops the server (fast shutdown, then immediate) and removes `dir` once
/// this process is gone.
fn watchdog(server: u32, dir: &Path) {
    let script = format!(
        "while kill -0 {me} 2>/dev/null; do sleep 0.5; done; \
         kill -INT {server} 2>/dev/null; sleep 2; kill -QUIT {server} 2>/dev/null; sleep 0.5; \
         rm -rf '{dir}'",
        me = std::process::id(),
        dir = dir.display()
    );
    let _ = Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
}

impl Cluster {
    /// Options for database `db` as the cluster's superuser.
    pub fn options(&self, db: &str) -> PgOptions {
        PgOptions {
            url: format!("postgres://{USER}@127.0.0.1:{}/{db}", self.port),
            password: Some(Zeroizing::new(self.password.clone())),
            pool_size: 4,
        }
    }

    /// The password (tests that start `moat up` pass it in the environment).
    pub fn password(&self) -> &str {
        &self.password
    }

    fn admin<T>(
        &self,
        f: impl AsyncFnOnce(&tokio_postgres::Client) -> Result<T, tokio_postgres::Error>,
    ) -> Result<T, String> {
        self.on("postgres", f)
    }

    /// Runs `sql` (simple protocol, several statements allowed) in the
    /// database `opts` names, as the superuser; every row's columns as text.
    /// For tests that look at or tamper with what the store wrote.
    pub fn sql(&self, opts: &PgOptions, sql: &str) -> Vec<Vec<Option<String>>> {
        let db = opts
            .url
            .rsplit('/')
            .next()
            .unwrap_or("postgres")
            .to_string();
        let r = self.on(&db, async |c| {
            let msgs = c.simple_query(sql).await?;
            Ok(msgs
                .into_iter()
                .filter_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => {
                        Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
                    }
                    _ => None,
                })
                .collect())
        });
        match r {
            Ok(rows) => rows,
            Err(e) => panic!("running {sql:?} on {db}: {e}"),
        }
    }

    fn on<T>(
        &self,
        db: &str,
        f: impl AsyncFnOnce(&tokio_postgres::Client) -> Result<T, tokio_postgres::Error>,
    ) -> Result<T, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(self.port)
            .user(USER)
            .password(self.password.as_bytes())
            .dbname(db)
            .connect_timeout(Duration::from_secs(5));
        rt.block_on(async {
            let (client, conn) = config
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(|e| e.to_string())?;
            let task = tokio::spawn(conn);
            let r = f(&client).await.map_err(|e| e.to_string());
            drop(client);
            let _ = task.await;
            r
        })
    }

    fn wait_ready(&self, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        loop {
            match self.admin(async |c| c.simple_query("SELECT 1").await.map(drop)) {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// A new, empty database for one test; its options.
    pub fn fresh(&self) -> PgOptions {
        let n = self.next_db.fetch_add(1, Ordering::Relaxed);
        let name = format!("t{}_{n}", std::process::id());
        let create = format!("CREATE DATABASE {name}");
        if let Err(e) = self.admin(async |c| c.batch_execute(&create).await) {
            panic!("creating test database {name}: {e}");
        }
        self.options(&name)
    }
}
