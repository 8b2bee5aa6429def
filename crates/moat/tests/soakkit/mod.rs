//! The soak test's tools: a loop-mounted ext4 filesystem, a `moat up` that
//! can be SIGKILLed and restarted (its addresses per generation), a plain
//! HTTP/1 client and event-stream reader that survive a dead gateway,
//! finders for this gateway's sandbox processes, cgroups and mounts, and the
//! before/after snapshots of the host the final check compares.
//!
//! Must never: signal or count a process, cgroup or mount that is not this
//! gateway's (other tests run on the same host at the same time), or leave
//! the loop filesystem mounted.

#![allow(dead_code)]

use std::collections::{BTreeSet, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

// ------------------------------------------------------------ loop filesystem

/// An ext4 image in the scratch directory, mounted at `mnt`.
pub struct LoopFs {
    pub img: PathBuf,
    pub mnt: PathBuf,
    mounted: bool,
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let o = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?}: {}: {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ))
    }
}

impl LoopFs {
    /// `mib` MiB, no blocks reserved for root (moat runs as root: a reserve
    /// would keep the gateway from ever seeing a full disk).
    pub fn create(dir: &Path, mib: u64) -> Result<LoopFs, String> {
        let img = dir.join("data.img");
        let mnt = dir.join("mnt");
        std::fs::File::create(&img)
            .and_then(|f| f.set_len(mib << 20))
            .map_err(|e| format!("{}: {e}", img.display()))?;
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0"])
            .arg(&img))?;
        std::fs::create_dir_all(&mnt).map_err(|e| e.to_string())?;
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt))?;
        std::fs::set_permissions(&mnt, std::fs::Permissions::from_mode(0o711))
            .map_err(|e| e.to_string())?;
        Ok(LoopFs {
            img,
            mnt,
            mounted: true,
        })
    }

    /// Unmounts (a plain umount: a busy filesystem is an error, not hidden).
    pub fn unmount(mut self) -> Result<(), String> {
        let r = run(Command::new("umount").arg(&self.mnt));
        if r.is_ok() {
            self.mounted = false;
        }
        r
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        if self.mounted {
            let _ = run(Command::new("umount").arg("-l").arg(&self.mnt));
        }
        let _ = std::fs::remove_file(&self.img);
    }
}

/// Writes `path` until the filesystem is full, keeps it full for `hold`,
/// then deletes the file. Whether it reached ENOSPC.
pub fn fill_up(path: &Path, hold: Duration) -> bool {
    let Ok(mut f) = std::fs::File::create(path) else {
        return false;
    };
    let chunk = vec![0x5au8; 1 << 20];
    let mut full = false;
    for _ in 0..1024 {
        if let Err(e) = f.write_all(&chunk).and_then(|_| f.sync_data()) {
            full = e.raw_os_error() == Some(libc_enospc());
            break;
        }
    }
    std::thread::sleep(hold);
    drop(f);
    let _ = std::fs::remove_file(path);
    full
}

fn libc_enospc() -> i32 {
    nix::errno::Errno::ENOSPC as i32
}

// ------------------------------------------------------------------ moat up

/// How `moat up` is started (the same for every generation).
pub struct Launch {
    pub data: PathBuf,
    pub runtime: PathBuf,
    pub config: PathBuf,
    pub secrets: PathBuf,
}

struct Running {
    child: Child,
    generation: u64,
    web: SocketAddr,
    slack: SocketAddr,
    started: Instant,
    stdout: Receiver<String>,
}

/// The gateway under test, across its restarts.
pub struct GatewayHandle {
    launch: Launch,
    state: Mutex<Option<Running>>,
    generation: AtomicU64,
    stderr: Arc<Mutex<Vec<String>>>,
}

fn addr_after(line: &str, prefix: &str, suffix: &str) -> Option<SocketAddr> {
    line.strip_prefix(prefix)?
        .strip_suffix(suffix)?
        .parse()
        .ok()
}

impl GatewayHandle {
    pub fn new(launch: Launch) -> GatewayHandle {
        GatewayHandle {
            launch,
            state: Mutex::new(None),
            generation: AtomicU64::new(0),
            stderr: Arc::default(),
        }
    }

    /// Starts a new generation and waits until it listens everywhere.
    pub fn start(&self) {
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let l = &self.launch;
        let mut child = Command::new(env!("CARGO_BIN_EXE_moat"))
            .env("MOAT_DATA_DIR", &l.data)
            .env("MOAT_RUNTIME_DIR", &l.runtime)
            .env("MOAT_INIT", super::gwkit::init_path())
            .env_remove("MOAT_SECRETS_FILE")
            .env_remove("MOAT_LOG")
            .env_remove("ANTHROPIC_API_KEY")
            .env_remove("OPENAI_API_KEY")
            // The fake LLM upstream is plain HTTP on 127.0.0.1.
            .env("MOAT_LLM_ALLOW_PLAIN_HTTP", "1")
            .args(["up", "--config"])
            .arg(&l.config)
            .arg("--secrets")
            .arg(&l.secrets)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting moat up");
        let (tx, lines) = channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        let err = child.stderr.take().unwrap();
        let keep = self.stderr.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                let mut k = keep.lock().unwrap();
                k.push(format!("[{generation}] {l}"));
                let n = k.len();
                if n > 2000 {
                    k.drain(..n - 1000);
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(120);
        let (mut web, mut slack) = (None, None);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = lines.recv_timeout(left) else {
                let _ = child.kill();
                let _ = child.wait();
                std::thread::sleep(Duration::from_millis(500));
                panic!(
                    "moat up (generation {generation}) did not become ready; stderr:\n{}",
                    self.stderr_tail(60)
                );
            };
            web = web.or(addr_after(&line, "moat: web chat on http://", "/"));
            slack = slack.or(addr_after(
                &line,
                "moat: Slack events on http://",
                "/slack/events",
            ));
            if line.starts_with("moat: metrics on http://") {
                break;
            }
        }
        *self.state.lock().unwrap() = Some(Running {
            child,
            generation,
            web: web.expect("moat up printed its web address"),
            slack: slack.expect("moat up printed its Slack address"),
            started: Instant::now(),
            stdout: lines,
        });
    }

    /// (generation, pid, when it became ready) of the running gateway.
    pub fn current(&self) -> Option<(u64, u32, Instant)> {
        let s = self.state.lock().unwrap();
        s.as_ref().map(|r| (r.generation, r.child.id(), r.started))
    }

    pub fn web(&self) -> Option<SocketAddr> {
        self.state.lock().unwrap().as_ref().map(|r| r.web)
    }

    pub fn web_generation(&self) -> Option<(u64, SocketAddr)> {
        self.state
            .lock()
            .unwrap()
            .as_ref()
            .map(|r| (r.generation, r.web))
    }

    pub fn slack(&self) -> Option<SocketAddr> {
        self.state.lock().unwrap().as_ref().map(|r| r.slack)
    }

    /// SIGKILL, a pause with the gateway down, then a new generation.
    pub fn kill_and_restart(&self, down: Duration) {
        let running = self.state.lock().unwrap().take();
        if let Some(mut r) = running {
            let _ = r.child.kill();
            let _ = r.child.wait();
        }
        std::thread::sleep(down);
        self.start();
    }

    /// SIGTERM; Ok when it exits 0 within `within` having said "moat: stopped".
    pub fn terminate(&self, within: Duration) -> Result<(), String> {
        let Some(mut r) = self.state.lock().unwrap().take() else {
            return Err("no gateway running at the end".into());
        };
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(r.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + within;
        let status = loop {
            if let Some(s) = r.child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = r.child.kill();
                let _ = r.child.wait();
                return Err(format!("moat up did not stop within {within:?} of SIGTERM"));
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut said = false;
        while let Ok(l) = r.stdout.recv_timeout(Duration::from_secs(2)) {
            said |= l == "moat: stopped";
        }
        if status.success() && said {
            Ok(())
        } else {
            Err(format!(
                "moat up ended with {status} after SIGTERM (said \"moat: stopped\": {said})"
            ))
        }
    }

    pub fn stderr_tail(&self, n: usize) -> String {
        let s = self.stderr.lock().unwrap();
        s[s.len().saturating_sub(n)..].join("\n")
    }
}

/// The gateway's resident memory, kB.
pub fn vm_rss_kb(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()
}

// ---------------------------------------------------------------------- HTTP

/// One request on a new connection (`Connection: close`): status and body,
/// or `None` when the gateway is not there or the answer is cut off.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw);
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    Some((status, body.to_string()))
}

/// Reads the event stream at `path` (HTTP/1.0: the body ends with the
/// connection) and hands each event to `on_event`, until the stream ends or
/// `stop` says so. False when it could not be opened.
pub fn sse(
    addr: SocketAddr,
    path: &str,
    on_event: &mut dyn FnMut(&Value),
    stop: &dyn Fn() -> bool,
) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return false;
    };
    let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err()
        || s.set_read_timeout(Some(Duration::from_millis(500)))
            .is_err()
    {
        return false;
    }
    let mut r = BufReader::new(s);
    let mut line = Vec::new();
    let mut head = true;
    loop {
        match r.read_until(b'\n', &mut line) {
            Ok(0) => return !head,
            Ok(_) if line.ends_with(b"\n") => {}
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if stop() {
                    return !head;
                }
                continue;
            }
            Err(_) => return !head,
        }
        let l = String::from_utf8_lossy(&line).trim_end().to_string();
        line.clear();
        if head {
            if l.starts_with("HTTP/") && l.split(' ').nth(1) != Some("200") {
                return false;
            }
            if l.is_empty() {
                head = false;
            }
            continue;
        }
        if let Some(d) = l.strip_prefix("data:") {
            if let Ok(v) = serde_json::from_str::<Value>(d.trim_start()) {
                on_event(&v);
            }
        }
    }
}

// ------------------------------------------------------------ host look-ups

/// The cgroup scope of this data directory's sandboxes (the name of its
/// leases directory; instance cgroups are `moat/<scope>-<n>-<lease>`).
pub fn leases_scope(data: &Path, runtime: &Path) -> String {
    moat_sandbox::leases_dir(&moat_sandbox::EngineConfig {
        data_dir: data.to_path_buf(),
        runtime_dir: runtime.to_path_buf(),
        init_path: super::gwkit::init_path(),
    })
    .file_name()
    .unwrap()
    .to_string_lossy()
    .into_owned()
}

fn pids() -> Vec<u32> {
    let mut v: Vec<u32> = std::fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn in_scope(pid: u32, scope: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .is_ok_and(|c| c.contains(&format!("/moat/{scope}-")))
}

fn uid_of(pid: u32) -> Option<u32> {
    std::fs::metadata(format!("/proc/{pid}"))
        .ok()
        .map(|m| m.uid())
}

/// (pid, uid) of the processes in this gateway's sandbox cgroups.
pub fn sandbox_procs(scope: &str) -> Vec<(u32, u32)> {
    pids()
        .into_iter()
        .filter(|p| in_scope(*p, scope))
        .filter_map(|p| Some((p, uid_of(p)?)))
        .collect()
}

/// A sandbox process to SIGKILL: one running as a sandbox uid, chosen by
/// `n` among them.
pub fn pick_sandbox_proc(scope: &str, n: usize) -> Option<u32> {
    let base = moat_sandbox::storage::UID_BASE;
    let range = base..base + moat_sandbox::storage::UID_RANGE;
    let c: Vec<u32> = sandbox_procs(scope)
        .into_iter()
        .filter(|(_, u)| range.contains(u))
        .map(|(p, _)| p)
        .collect();
    (!c.is_empty()).then(|| c[n.wrapping_mul(7919) % c.len()])
}

/// What the host looked like: named network namespaces, mounts, moat's
/// instance cgroups.
pub struct Snapshot {
    pub netns: BTreeSet<String>,
    pub mounts: BTreeSet<String>,
    pub cgroups: BTreeSet<PathBuf>,
}

impl Snapshot {
    pub fn take() -> Snapshot {
        let netns = Command::new("ip")
            .args(["netns", "list"])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .filter_map(|l| l.split_whitespace().next().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
            .collect();
        let mut cgroups = BTreeSet::new();
        for h in std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            for c in std::fs::read_dir(h.path().join("moat"))
                .into_iter()
                .flatten()
                .flatten()
            {
                if c.file_type().is_ok_and(|t| t.is_dir()) {
                    cgroups.insert(c.path());
                }
            }
        }
        Snapshot {
            netns,
            mounts,
            cgroups,
        }
    }
}

/// What this gateway left behind after it stopped, one line per finding.
pub fn leftovers(
    before: &Snapshot,
    after: &Snapshot,
    scope: &str,
    leases: &Path,
    data: &Path,
    own_mount: &Path,
    seen_uids: &HashSet<u32>,
) -> Vec<String> {
    let mut out = Vec::new();
    let me = std::process::id();
    let (leases_s, data_s) = (leases.display().to_string(), data.display().to_string());
    for p in pids() {
        if p == me {
            continue;
        }
        let cmd = std::fs::read(format!("/proc/{p}/cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        let uid = uid_of(p).unwrap_or(0);
        let base = moat_sandbox::storage::UID_BASE;
        let sandbox_uid = (base..base + moat_sandbox::storage::UID_RANGE).contains(&uid);
        if in_scope(p, scope)
            || (sandbox_uid && seen_uids.contains(&uid))
            || cmd.contains(&leases_s)
            || cmd.contains(&data_s)
        {
            out.push(format!("process {p} (uid {uid}) left running: {cmd}"));
        }
    }
    for c in &after.cgroups {
        let name = c.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with(&format!("{scope}-")) {
            out.push(format!("cgroup left behind: {}", c.display()));
        }
    }
    for m in after.mounts.difference(&before.mounts) {
        if Path::new(m) == own_mount {
            continue;
        }
        if m.starts_with(&leases_s) || m.starts_with(&data_s) {
            out.push(format!("mount left behind: {m}"));
        }
    }
    for n in after.netns.difference(&before.netns) {
        out.push(format!("a new network namespace: {n}"));
    }
    out
}
