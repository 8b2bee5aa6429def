//! moat-audit: the audit log, append-only JSON lines chained by SHA-256.
//!
//! Owns one file format and the three things done with it: [`AuditLog`]
//! appends records (one `write(2)` of one whole line per record, `O_APPEND`,
//! serialised across threads by a mutex and across processes by `flock`),
//! [`verify`] re-computes every hash and link, and [`tail`] reads the last
//! records from the end of the file.
//!
//! A record is one line:
//! `{"kind":K,"prev":P,"seq":N,"ts_ms":T,...fields...,"hash":H}` where every key
//! but `hash` is in byte order, `prev` is the previous record's `hash` (64
//! zeros for seq 1) and `H` is the lowercase hex SHA-256 of the line's bytes
//! with the `,"hash":"…"` member removed (so: of the canonical serialization of
//! the record without `hash`). Beside the log, `<log>.head` holds the last seq
//! and hash; it is overwritten in place (one fixed-size `pwrite`, under the
//! same lock) after every append so that cutting records from the end is
//! found.
//!
//! Tamper-evidence is relative: anyone who can rewrite both the log and its
//! head file can rewrite history consistently. [`verify`] prints the head hash
//! so an operator can keep it elsewhere (another host, a ticket) and compare.
//!
//! Must never: rewrite or drop a whole record, silently drop a torn one (it is
//! moved aside and recorded), continue a chain whose last record or head file
//! does not check out, or hold a secret (callers put no secret in `fields`;
//! this crate cannot tell).

#![forbid(unsafe_code)]
// Outside input never reaches an `unwrap`/`expect` (house style); tests may.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::ffi::OsString;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

/// Field names the chain itself uses; `fields` may not carry them.
pub const RESERVED: [&str; 5] = ["seq", "ts_ms", "kind", "prev", "hash"];
/// `prev` of the first record.
pub const ZERO_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// `,"hash":"` + 64 hex digits + `"}`: how every record line ends.
const HASH_PREFIX: &[u8] = b",\"hash\":\"";
const SUFFIX_LEN: usize = HASH_PREFIX.len() + 64 + 2;
/// Bytes read per step when reading a file from its end.
const BACK_CHUNK: u64 = 64 * 1024;

/// What can go wrong opening, appending to or reading the log.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    /// The caller's record was refused; nothing was written.
    #[error("audit record refused: {0}")]
    Fields(String),
    /// The last record (or the head file) does not check out: the log will not
    /// be continued, since that would bury the evidence.
    #[error(
        "audit log {path}: {detail}; nothing was appended. Run `moat audit verify --file {path}`; \
         to start a new chain, move {path} and its .head file aside (keep them as evidence)"
    )]
    Broken { path: PathBuf, detail: String },
    /// A record line that `tail` could not read.
    #[error("audit log {path}: the record at byte {offset} is not JSON ({detail}); run `moat audit verify --file {path}`")]
    BadRecord {
        path: PathBuf,
        offset: u64,
        detail: String,
    },
}

fn io_err<'a>(
    path: &'a Path,
    what: &'static str,
) -> impl FnOnce(std::io::Error) -> AuditError + 'a {
    move |source| AuditError::Io {
        path: path.to_path_buf(),
        what,
        source,
    }
}

/// An open audit log. `&self` methods, safe to share between threads (wrap
/// it in an `Arc`); several processes may append to the same file.
pub struct AuditLog {
    path: PathBuf,
    head: PathBuf,
    inner: Mutex<Inner>,
}

struct Inner {
    file: File,
    /// The last record's seq (0: none yet) and hash.
    seq: u64,
    hash: String,
    /// The file's length after the last record this handle knows of; a
    /// different length means another process appended (or someone cut it).
    end: u64,
    /// Torn lines moved aside by this handle.
    torn: Vec<PathBuf>,
    /// The head file, open for writing in place (set by `open`).
    head: Option<File>,
}

/// Holds `flock` on the log's open file description until dropped (through
/// a duplicate descriptor of it, so the lock does not borrow the file).
struct FileLock(File);

impl FileLock {
    fn take(file: &File, shared: bool) -> std::io::Result<FileLock> {
        let dup = file.try_clone()?;
        loop {
            let r = if shared {
                dup.lock_shared()
            } else {
                dup.lock()
            };
            match r {
                Ok(()) => return Ok(FileLock(dup)),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // Closing the duplicate would not release a lock other descriptors
        // of the description still hold: unlock explicitly.
        let _ = self.0.unlock();
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = OsString::from(path.as_os_str());
    s.push(suffix);
    PathBuf::from(s)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

fn is_hash(s: &[u8]) -> bool {
    s.len() == 64 && s.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
}

/// Writes `v` with object keys in byte order and no whitespace, whatever
/// serde_json's map order is (its `preserve_order` feature would change it).
fn write_canonical(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(out, item);
            }
            out.push(b']');
        }
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_unstable();
            out.push(b'{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                // Writing a string or a scalar into a Vec cannot fail.
                let _ = serde_json::to_writer(&mut *out, k);
                out.push(b':');
                write_canonical(out, &map[k]);
            }
            out.push(b'}');
        }
        scalar => {
            let _ = serde_json::to_writer(&mut *out, scalar);
        }
    }
}

/// One record line that checked out on its own (its links are checked by
/// the caller).
struct Checked {
    seq: u64,
    prev: String,
    hash: String,
}

/// Checks one line (without its `\n`): JSON object, chain fields present,
/// ends with its hash, and the hash matches. On failure, the seq if known.
fn check_line(line: &[u8]) -> Result<Checked, (Option<u64>, Problem)> {
    let v: Value =
        serde_json::from_slice(line).map_err(|e| (None, Problem::BadJson(e.to_string())))?;
    let Value::Object(map) = v else {
        return Err((None, Problem::BadJson("not a JSON object".into())));
    };
    let seq = map.get("seq").and_then(Value::as_u64);
    let missing = |what: &str| (seq, Problem::Malformed(format!("it has no {what}")));
    let seq_n = seq.ok_or_else(|| missing("\"seq\" number"))?;
    map.get("ts_ms")
        .and_then(Value::as_u64)
        .ok_or_else(|| missing("\"ts_ms\" number"))?;
    map.get("kind")
        .and_then(Value::as_str)
        .ok_or_else(|| missing("\"kind\" string"))?;
    let prev = map
        .get("prev")
        .and_then(Value::as_str)
        .filter(|p| is_hash(p.as_bytes()))
        .ok_or_else(|| missing("\"prev\" hash"))?;
    let n = line.len();
    if n < SUFFIX_LEN + 2
        || &line[n - SUFFIX_LEN..n - SUFFIX_LEN + HASH_PREFIX.len()] != HASH_PREFIX
        || !is_hash(&line[n - 66..n - 2])
        || &line[n - 2..] != b"\"}"
    {
        return Err((
            seq,
            Problem::Malformed("it does not end with its \"hash\" member".into()),
        ));
    }
    let stored = std::str::from_utf8(&line[n - 66..n - 2]).unwrap_or_default();
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(&line[..n - SUFFIX_LEN]);
    ctx.update(b"}");
    let computed = hex(ctx.finish().as_ref());
    if computed != stored {
        return Err((
            seq,
            Problem::HashMismatch {
                stored: stored.to_string(),
                computed,
            },
        ));
    }
    Ok(Checked {
        seq: seq_n,
        prev: prev.to_string(),
        hash: computed,
    })
}

/// The end of a file: its last whole lines (offset, bytes without `\n`), in
/// file order, and the bytes after the last `\n` if any (a torn line).
struct Back {
    lines: Vec<(u64, Vec<u8>)>,
    fragment: Option<(u64, Vec<u8>)>,
}

/// Reads the last `want` whole lines of the first `size` bytes of `file`,
/// chunk by chunk from the end (never the whole file unless it must).
fn read_back(file: &File, size: u64, want: usize) -> std::io::Result<Back> {
    let mut pos = size;
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = BACK_CHUNK;
    loop {
        let newlines = buf.iter().filter(|&&b| b == b'\n').count();
        if pos == 0 || newlines > want {
            break;
        }
        let step = chunk.min(pos);
        pos -= step;
        let mut more = vec![0u8; step as usize];
        file.read_exact_at(&mut more, pos)?;
        more.extend_from_slice(&buf);
        buf = more;
        chunk = chunk.saturating_mul(2).min(16 * 1024 * 1024);
    }
    // Without the start of the file in view, the first piece is a partial line.
    let mut start = 0usize;
    if pos > 0 {
        start = buf
            .iter()
            .position(|&b| b == b'\n')
            .map_or(buf.len(), |i| i + 1);
    }
    let mut lines = Vec::new();
    let mut at = start;
    while let Some(i) = buf[at..].iter().position(|&b| b == b'\n') {
        lines.push((pos + at as u64, buf[at..at + i].to_vec()));
        at += i + 1;
    }
    let fragment = (at < buf.len()).then(|| (pos + at as u64, buf[at..].to_vec()));
    if lines.len() > want {
        lines.drain(..lines.len() - want);
    }
    Ok(Back { lines, fragment })
}

/// The head file's content: the last seq and hash the writer finished.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Head {
    seq: u64,
    hash: String,
}

/// Size of the head file: `{"seq":N,"hash":"H"}`, spaces, `\n`.
const HEAD_LEN: usize = 128;

/// Overwrites the head file in place with one fixed-size `pwrite` (the
/// caller holds the log's lock). Not a rename: renaming over a file makes
/// ext4 write it out at once, about 200 µs per record on a virtual disk,
/// where this costs a few µs; see docs/audit.md.
fn write_head(head: &File, seq: u64, hash: &str) -> std::io::Result<()> {
    let mut buf = format!("{{\"seq\":{seq},\"hash\":\"{hash}\"}}").into_bytes();
    buf.resize(HEAD_LEN - 1, b' ');
    buf.push(b'\n');
    head.write_all_at(&buf, 0)
}

/// `Ok(None)` when there is no head file.
fn read_head(path: &Path) -> Result<Option<Head>, String> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let v: Value = serde_json::from_slice(&text)
        .map_err(|e| format!("{} is not JSON: {e}", path.display()))?;
    let seq = v.get("seq").and_then(Value::as_u64);
    let hash = v
        .get("hash")
        .and_then(Value::as_str)
        .filter(|h| is_hash(h.as_bytes()));
    match (seq, hash) {
        (Some(seq), Some(hash)) => Ok(Some(Head {
            seq,
            hash: hash.to_string(),
        })),
        _ => Err(format!(
            "{} does not hold {{\"seq\":N,\"hash\":\"<64 hex>\"}}",
            path.display()
        )),
    }
}

impl AuditLog {
    /// Opens (creating it, mode 0600, and its directory if needed) the log at
    /// `path` and continues its chain. A torn last line (a crash during a
    /// write) is moved to `<path>.torn-<ms>`, logged as a warning and recorded
    /// as an `audit-torn` record. Refuses ([`AuditError::Broken`]) a log whose
    /// last record fails its hash, or whose head file is missing, unreadable,
    /// ahead of the log or names another hash.
    pub fn open(path: impl AsRef<Path>) -> Result<AuditLog, AuditError> {
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io_err(&path, "creating its directory"))?;
        }
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err(&path, "opening"))?;
        let meta = file.metadata().map_err(io_err(&path, "reading metadata"))?;
        if meta.permissions().mode() & 0o077 != 0 {
            file.set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(io_err(&path, "making it mode 0600"))?;
        }
        let log = AuditLog {
            head: with_suffix(&path, ".head"),
            path,
            inner: Mutex::new(Inner {
                file,
                seq: 0,
                hash: ZERO_HASH.to_string(),
                end: 0,
                torn: Vec::new(),
                head: None,
            }),
        };
        {
            let mut guard = log.lock();
            let inner = &mut *guard;
            let _lock = FileLock::take(&inner.file, false).map_err(io_err(&log.path, "locking"))?;
            let torn = log.resync(inner)?;
            let broken = |detail: String| AuditError::Broken {
                path: log.path.clone(),
                detail,
            };
            match read_head(&log.head).map_err(broken)? {
                None if inner.seq > 0 => {
                    return Err(broken(format!(
                        "the head file {} is missing but the log has records up to seq {}: \
                         records cut from the end could not be found",
                        log.head.display(),
                        inner.seq
                    )))
                }
                None => {}
                Some(h) if h.seq > inner.seq => {
                    return Err(broken(format!(
                        "the head file says the last record is seq {} but the log ends at seq {}: \
                         records were cut from the end",
                        h.seq, inner.seq
                    )))
                }
                Some(h) if h.seq == inner.seq && h.hash != inner.hash => {
                    return Err(broken(format!(
                        "the head file says seq {} has hash {} but the log's has {}: \
                         the last record was replaced",
                        h.seq, h.hash, inner.hash
                    )))
                }
                Some(_) => {}
            }
            let head = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&log.head)
                .map_err(io_err(&log.path, "opening its head file"))?;
            // Brings a lagging head (a crash between the two writes) up to
            // the last record, at the fixed size.
            write_head(&head, inner.seq, &inner.hash)
                .and_then(|_| head.set_len(HEAD_LEN as u64))
                .map_err(io_err(&log.path, "writing its head file"))?;
            inner.head = Some(head);
            if let Some(t) = torn {
                log.note_torn(inner, t)?;
            }
        }
        Ok(log)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic mid-append leaves `end` stale at worst; `append` re-reads
        // the file's end when its length differs.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The head file's path (`<log>.head`).
    pub fn head_path(&self) -> &Path {
        &self.head
    }

    /// The last record's seq (0 when empty) and hash, as this handle knows it.
    pub fn last(&self) -> (u64, String) {
        let inner = self.lock();
        (inner.seq, inner.hash.clone())
    }

    /// Where torn lines found by this handle were moved.
    pub fn torn_files(&self) -> Vec<PathBuf> {
        self.lock().torn.clone()
    }

    /// Appends one record of `kind` with `fields` (a JSON object whose keys
    /// are not [`RESERVED`]) and returns its seq.
    pub fn append(&self, kind: &str, fields: Value) -> Result<u64, AuditError> {
        let map = match fields {
            Value::Object(m) => m,
            other => {
                return Err(AuditError::Fields(format!(
                    "the fields of a {kind:?} record must be a JSON object, not {}",
                    match other {
                        Value::Null => "null",
                        Value::Bool(_) => "a boolean",
                        Value::Number(_) => "a number",
                        Value::String(_) => "a string",
                        Value::Array(_) => "an array",
                        Value::Object(_) => "an object",
                    }
                )))
            }
        };
        if kind.is_empty() {
            return Err(AuditError::Fields("the record kind is empty".into()));
        }
        if let Some(k) = RESERVED.iter().find(|k| map.contains_key(**k)) {
            return Err(AuditError::Fields(format!(
                "field {k:?} of a {kind:?} record is reserved for the audit chain \
                 (seq, ts_ms, kind, prev, hash); rename it"
            )));
        }
        let mut guard = self.lock();
        let inner = &mut *guard;
        let _lock = FileLock::take(&inner.file, false).map_err(io_err(&self.path, "locking"))?;
        let size = inner
            .file
            .metadata()
            .map_err(io_err(&self.path, "reading metadata"))?
            .len();
        if size != inner.end {
            // Another process appended (or crashed mid-line) since our last record.
            if let Some(t) = self.resync(inner)? {
                self.note_torn(inner, t)?;
            }
        }
        self.append_locked(inner, kind, map)
    }

    /// Writes one record; the caller holds the mutex and the file lock.
    fn append_locked(
        &self,
        inner: &mut Inner,
        kind: &str,
        mut map: Map<String, Value>,
    ) -> Result<u64, AuditError> {
        let seq = inner.seq + 1;
        map.insert("seq".into(), seq.into());
        map.insert("ts_ms".into(), now_ms().into());
        map.insert("kind".into(), kind.into());
        map.insert("prev".into(), inner.hash.clone().into());
        let mut line = Vec::with_capacity(384);
        write_canonical(&mut line, &Value::Object(map));
        let hash = hex(ring::digest::digest(&ring::digest::SHA256, &line).as_ref());
        line.pop(); // the closing brace
        line.extend_from_slice(HASH_PREFIX);
        line.extend_from_slice(hash.as_bytes());
        line.extend_from_slice(b"\"}\n");
        // One write(2) of the whole line: with O_APPEND and the lock held, no
        // other writer's bytes can land inside it.
        let written = loop {
            match (&inner.file).write(&line) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err(&self.path, "appending a record")(e)),
            }
        };
        if written != line.len() {
            // A short write (disk full): cut it off rather than leave a torn line.
            let _ = inner.file.set_len(inner.end);
            return Err(io_err(&self.path, "appending a record")(
                std::io::Error::new(
                    std::io::ErrorKind::WriteZero,
                    format!(
                        "only {written} of {} bytes were written (disk full?)",
                        line.len()
                    ),
                ),
            ));
        }
        inner.end += line.len() as u64;
        inner.seq = seq;
        inner.hash = hash;
        if let Some(head) = &inner.head {
            write_head(head, seq, &inner.hash).map_err(io_err(
                &self.path,
                "updating the head file (the record was written)",
            ))?;
        }
        Ok(seq)
    }

    /// Re-reads the end of the file (the caller holds the file lock): moves a
    /// torn last line aside and takes seq and hash from the last whole
    /// record, which must check out. Returns the torn file and its size.
    fn resync(&self, inner: &mut Inner) -> Result<Option<(PathBuf, usize)>, AuditError> {
        let size = inner
            .file
            .metadata()
            .map_err(io_err(&self.path, "reading metadata"))?
            .len();
        let back = read_back(&inner.file, size, 1).map_err(io_err(&self.path, "reading"))?;
        let mut torn = None;
        let mut end = size;
        if let Some((offset, bytes)) = back.fragment {
            let base = format!(".torn-{}", now_ms());
            let mut n = 0;
            let (aside, mut f) = loop {
                let p = with_suffix(
                    &self.path,
                    &if n == 0 {
                        base.clone()
                    } else {
                        format!("{base}-{n}")
                    },
                );
                match OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&p)
                {
                    Ok(f) => break (p, f),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 100 => n += 1,
                    Err(e) => return Err(io_err(&self.path, "moving a torn line aside")(e)),
                }
            };
            f.write_all(&bytes)
                .and_then(|_| f.sync_all())
                .map_err(io_err(&self.path, "moving a torn line aside"))?;
            inner
                .file
                .set_len(offset)
                .map_err(io_err(&self.path, "cutting off a torn line"))?;
            end = offset;
            torn = Some((aside, bytes.len()));
        }
        match back.lines.last() {
            None => {
                inner.seq = 0;
                inner.hash = ZERO_HASH.to_string();
            }
            Some((offset, line)) => {
                let c = check_line(line).map_err(|(seq, problem)| AuditError::Broken {
                    path: self.path.clone(),
                    detail: format!(
                        "the last record (byte {offset}{}) does not check out: {problem}",
                        seq.map(|s| format!(", seq {s}")).unwrap_or_default()
                    ),
                })?;
                inner.seq = c.seq;
                inner.hash = c.hash;
            }
        }
        inner.end = end;
        Ok(torn)
    }

    /// Reports a torn line that was moved aside: a warning and a record.
    fn note_torn(
        &self,
        inner: &mut Inner,
        (aside, bytes): (PathBuf, usize),
    ) -> Result<(), AuditError> {
        tracing::warn!(
            log = %self.path.display(),
            moved_to = %aside.display(),
            bytes,
            "the audit log ended in a torn line (a crash during a write); it was moved aside"
        );
        let mut m = Map::new();
        m.insert("moved_to".into(), aside.display().to_string().into());
        m.insert("bytes".into(), (bytes as u64).into());
        m.insert("after_seq".into(), inner.seq.into());
        inner.torn.push(aside);
        self.append_locked(inner, "audit-torn", m).map(|_| ())
    }
}

/// What [`verify`] found in a log that checks out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Number of records.
    pub records: u64,
    /// The last record's seq (0 when empty).
    pub last_seq: u64,
    /// The last record's hash (64 zeros when empty): keep it elsewhere to
    /// check later that nothing before it changed.
    pub last_hash: String,
}

/// What is wrong with one line (or the head file).
#[derive(Debug)]
pub enum Problem {
    /// The file could not be read.
    Io(std::io::Error),
    /// Not a JSON object.
    BadJson(String),
    /// JSON, but not a record of the chain.
    Malformed(String),
    /// The record's bytes do not hash to its `hash`: it was changed.
    HashMismatch { stored: String, computed: String },
    /// The seq is not the one after the previous record's.
    SeqGap { expected: u64, found: u64 },
    /// The `prev` is not the previous record's hash.
    PrevMismatch { expected: String, found: String },
    /// The last line has no newline: a write was cut short.
    TornTail,
    /// The head file is missing although the log has records.
    HeadMissing,
    /// The head file cannot be read or parsed.
    HeadBad(String),
    /// The head file names a later seq than the log's last.
    HeadAhead { head_seq: u64, last_seq: u64 },
    /// The head file names another hash for this record.
    HeadHashMismatch { head_hash: String, hash: String },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Io(e) => write!(f, "cannot read it: {e}"),
            Problem::BadJson(e) => write!(f, "not a JSON record ({e})"),
            Problem::Malformed(e) => write!(f, "not a record of the chain: {e}"),
            Problem::HashMismatch { stored, computed } => write!(
                f,
                "the record was changed after it was written: its content hashes to {computed}, \
                 not to its stored hash {stored}"
            ),
            Problem::SeqGap { expected, found } if found > expected => write!(
                f,
                "expected seq {expected}, found {found}: {} deleted (or the records were reordered)",
                span(*expected, found - 1, "was", "were")
            ),
            Problem::SeqGap { expected, found } => write!(
                f,
                "expected seq {expected}, found {found}: the records were reordered or one was copied"
            ),
            Problem::PrevMismatch { expected, found } => write!(
                f,
                "its prev is {found} but the previous record's hash is {expected}: \
                 the previous record was replaced or this one moved"
            ),
            Problem::TornTail => write!(
                f,
                "the last line is incomplete (a crash during a write?); the next `AuditLog::open` \
                 moves it aside"
            ),
            Problem::HeadMissing => write!(
                f,
                "the head file is missing: records cut from the end cannot be ruled out"
            ),
            Problem::HeadBad(e) => write!(f, "the head file is unusable: {e}"),
            Problem::HeadAhead { head_seq, last_seq } => write!(
                f,
                "the head file says the last record is seq {head_seq} but the log ends at seq \
                 {last_seq}: {} cut from the end",
                span(last_seq + 1, *head_seq, "was", "were")
            ),
            Problem::HeadHashMismatch { head_hash, hash } => write!(
                f,
                "the head file says this record's hash is {head_hash} but it is {hash}: \
                 the record was replaced"
            ),
        }
    }
}

/// "record 3 was" or "records 3..5 were".
fn span(from: u64, to: u64, one: &str, many: &str) -> String {
    if from == to {
        format!("record {from} {one}")
    } else {
        format!("records {from}..{to} {many}")
    }
}

/// Where [`verify`] found the log wrong: the line (1-based; the line after
/// the last for problems at the end), the seq when known, and what.
#[derive(Debug)]
pub struct VerifyError {
    pub path: PathBuf,
    pub line: Option<u64>,
    pub seq: Option<u64>,
    pub problem: Problem,
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        match (self.line, self.seq) {
            (Some(l), Some(s)) => write!(f, " line {l} (seq {s})")?,
            (Some(l), None) => write!(f, " line {l}")?,
            (None, Some(s)) => write!(f, " seq {s}")?,
            (None, None) => {}
        }
        write!(f, ": {}", self.problem)
    }
}

impl std::error::Error for VerifyError {}

/// Re-computes every record's hash and link, and checks the head file.
/// Reads the log up to its length when called (taken under a shared lock
/// together with the head file, so a concurrent writer is no false alarm).
pub fn verify(path: impl AsRef<Path>) -> Result<VerifyReport, VerifyError> {
    let path = path.as_ref();
    let err = |line: Option<u64>, seq: Option<u64>, problem: Problem| VerifyError {
        path: path.to_path_buf(),
        line,
        seq,
        problem,
    };
    let file = File::open(path).map_err(|e| err(None, None, Problem::Io(e)))?;
    let (size, head) = {
        let _lock = FileLock::take(&file, true).map_err(|e| err(None, None, Problem::Io(e)))?;
        let size = file
            .metadata()
            .map_err(|e| err(None, None, Problem::Io(e)))?
            .len();
        let head = read_head(&with_suffix(path, ".head"))
            .map_err(|e| err(None, None, Problem::HeadBad(e)))?;
        (size, head)
    };
    let mut reader = BufReader::with_capacity(256 * 1024, (&file).take(size));
    let mut buf = Vec::with_capacity(1024);
    let mut line_no = 0u64;
    let mut last_seq = 0u64;
    let mut last_hash = ZERO_HASH.to_string();
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|e| err(Some(line_no + 1), None, Problem::Io(e)))?;
        if n == 0 {
            break;
        }
        line_no += 1;
        if buf.pop() != Some(b'\n') {
            return Err(err(Some(line_no), None, Problem::TornTail));
        }
        let c = check_line(&buf).map_err(|(seq, p)| err(Some(line_no), seq, p))?;
        let at = |p| err(Some(line_no), Some(c.seq), p);
        if c.seq != last_seq + 1 {
            return Err(at(Problem::SeqGap {
                expected: last_seq + 1,
                found: c.seq,
            }));
        }
        if c.prev != last_hash {
            return Err(at(Problem::PrevMismatch {
                expected: last_hash,
                found: c.prev,
            }));
        }
        if let Some(h) = head.as_ref().filter(|h| h.seq == c.seq) {
            if h.hash != c.hash {
                return Err(at(Problem::HeadHashMismatch {
                    head_hash: h.hash.clone(),
                    hash: c.hash,
                }));
            }
        }
        last_seq = c.seq;
        last_hash = c.hash;
    }
    match head {
        None if line_no > 0 => return Err(err(Some(line_no + 1), None, Problem::HeadMissing)),
        Some(h) if h.seq > last_seq => {
            return Err(err(
                Some(line_no + 1),
                Some(last_seq + 1),
                Problem::HeadAhead {
                    head_seq: h.seq,
                    last_seq,
                },
            ))
        }
        Some(h) if h.seq == 0 && h.hash != ZERO_HASH => {
            return Err(err(
                None,
                None,
                Problem::HeadBad("seq 0 with a hash other than zeros".into()),
            ))
        }
        _ => {}
    }
    Ok(VerifyReport {
        records: line_no,
        last_seq,
        last_hash,
    })
}

/// The last `n` records of the log at `path` (fewer if it has fewer), oldest
/// first, read from the end of the file. A torn last line is left out.
/// Records are parsed, not checked: use [`verify`] for that.
pub fn tail(path: impl AsRef<Path>, n: usize) -> Result<Vec<Value>, AuditError> {
    let path = path.as_ref();
    if n == 0 {
        return Ok(Vec::new());
    }
    let file = File::open(path).map_err(io_err(path, "opening"))?;
    let size = file
        .metadata()
        .map_err(io_err(path, "reading metadata"))?
        .len();
    let back = read_back(&file, size, n).map_err(io_err(path, "reading"))?;
    back.lines
        .into_iter()
        .map(|(offset, line)| {
            serde_json::from_slice(&line).map_err(|e| AuditError::BadRecord {
                path: path.to_path_buf(),
                offset,
                detail: e.to_string(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests;
