//! Host-side observation for the attack suites: processes, cgroups, mounts and
//! files as the *host* sees them, to prove an attack changed nothing and left
//! nothing behind. Everything here only reads, except the canaries it creates
//! (and removes again) in places the tests own.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use moat_sandbox::Lease;

/// A unique token for markers and canaries.
pub fn token(label: &str) -> String {
    format!(
        "moat-{label}-{}-{:x}",
        std::process::id(),
        moat_sandbox::storage::random_u64()
    )
}

/// Polls `f` every 50 ms until it returns true or `limit` passes.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if f() {
            return true;
        }
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One host process as /proc shows it.
#[derive(Debug, Clone)]
pub struct Proc {
    pub pid: u32,
    pub ppid: u32,
    /// real, effective, saved, filesystem
    pub uids: [u32; 4],
    pub gids: [u32; 4],
    pub cap_eff: u64,
    pub no_new_privs: bool,
    pub cmdline: String,
    /// utime + stime in clock ticks
    pub cpu_ticks: u64,
    pub rss_kib: u64,
    pub zombie: bool,
}

fn ids(status: &str, key: &str) -> Option<[u32; 4]> {
    let line = status.lines().find_map(|l| l.strip_prefix(key))?;
    let v: Vec<u32> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    v.try_into().ok()
}

pub fn proc_info(pid: u32) -> Option<Proc> {
    let dir = PathBuf::from(format!("/proc/{pid}"));
    let status = std::fs::read_to_string(dir.join("status")).ok()?;
    let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ppid = rest.get(1)?.parse().ok()?;
    let utime: u64 = rest.get(11)?.parse().ok()?;
    let stime: u64 = rest.get(12)?.parse().ok()?;
    let cmdline = std::fs::read(dir.join("cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.trim().to_string())
    };
    Some(Proc {
        pid,
        ppid,
        uids: ids(&status, "Uid:")?,
        gids: ids(&status, "Gid:")?,
        cap_eff: u64::from_str_radix(&field("CapEff:")?, 16).ok()?,
        no_new_privs: field("NoNewPrivs:").as_deref() == Some("1"),
        cmdline: cmdline.trim_end().to_string(),
        cpu_ticks: utime + stime,
        rss_kib: field("VmRSS:")
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0),
        zombie: field("State:").is_some_and(|s| s.starts_with('Z')),
    })
}

/// Every live host process. Zombies (exited, waiting for their parent to reap
/// them) are left out: they run nothing and hold nothing but a pid.
pub fn all_procs() -> Vec<Proc> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() {
            if let Some(p) = proc_info(pid) {
                if !p.zombie {
                    out.push(p);
                }
            }
        }
    }
    out
}

/// `roots` and every host process descending from them.
pub fn tree(roots: &[u32]) -> Vec<Proc> {
    let procs = all_procs();
    let mut children: BTreeMap<u32, Vec<&Proc>> = BTreeMap::new();
    for p in &procs {
        children.entry(p.ppid).or_default().push(p);
    }
    let mut out = Vec::new();
    let mut todo: Vec<u32> = roots.to_vec();
    let mut seen = BTreeSet::new();
    while let Some(pid) = todo.pop() {
        if !seen.insert(pid) {
            continue;
        }
        if let Some(p) = procs.iter().find(|p| p.pid == pid) {
            out.push(p.clone());
        }
        for c in children.get(&pid).into_iter().flatten() {
            todo.push(c.pid);
        }
    }
    out
}

/// Host processes whose command line contains `marker`.
pub fn procs_with(marker: &str) -> Vec<Proc> {
    all_procs()
        .into_iter()
        .filter(|p| p.cmdline.contains(marker) && p.pid != std::process::id())
        .collect()
}

/// Host processes running as `uid`.
pub fn procs_of_uid(uid: u32) -> Vec<Proc> {
    all_procs()
        .into_iter()
        .filter(|p| p.uids.contains(&uid))
        .collect()
}

/// Cgroup directories (up to a few levels below each hierarchy) whose name
/// contains `needle`.
pub fn cgroup_dirs_with(needle: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, depth: u32, needle: &str, out: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            if !e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            let p = e.path();
            if e.file_name().to_string_lossy().contains(needle) {
                out.push(p.clone());
            }
            if depth > 0 {
                walk(&p, depth - 1, needle, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(Path::new("/sys/fs/cgroup"), 4, needle, &mut out);
    out
}

/// Lines of the host's mount table that mention `needle`.
pub fn mounts_with(needle: &str) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(needle))
        .map(String::from)
        .collect()
}

/// What a lease left on the host: processes of its uid or naming it, cgroup
/// directories and mounts naming it, its directory. Empty means clean.
pub fn leftovers(lease_id: &str, uid: u32, lease_dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for p in procs_of_uid(uid) {
        out.push(format!("process {} of uid {uid}: {}", p.pid, p.cmdline));
    }
    for p in procs_with(lease_id) {
        out.push(format!("process {} naming the lease: {}", p.pid, p.cmdline));
    }
    for d in cgroup_dirs_with(lease_id) {
        out.push(format!("cgroup {}", d.display()));
    }
    for m in mounts_with(lease_id) {
        out.push(format!("mount {m}"));
    }
    if lease_dir.exists() {
        out.push(format!("lease directory {}", lease_dir.display()));
    }
    out
}

/// Waits (up to 5 s: killing is asynchronous) until the lease left nothing.
pub fn assert_no_leftovers(lease_id: &str, uid: u32, lease_dir: &Path) {
    let mut left = Vec::new();
    let clean = wait_until(Duration::from_secs(5), || {
        left = leftovers(lease_id, uid, lease_dir);
        left.is_empty()
    });
    assert!(clean, "the lease left things behind:\n{}", left.join("\n"));
}

/// Everything that identifies a lease on the host, read before it is consumed.
pub struct LeaseIds {
    pub id: String,
    pub uid: u32,
    pub dir: PathBuf,
}

impl LeaseIds {
    pub fn of(engine: &moat_sandbox::Engine, lease: &Lease) -> LeaseIds {
        LeaseIds {
            id: lease.id().to_string(),
            uid: lease.host_uid(),
            dir: engine.leases_dir().join(lease.id()),
        }
    }
    pub fn assert_gone(&self) {
        assert_no_leftovers(&self.id, self.uid, &self.dir);
    }
}

/// A file the test owns, with known content, removed when dropped.
pub struct Canary {
    pub path: PathBuf,
    pub content: String,
}

impl Canary {
    pub fn new(path: PathBuf, label: &str) -> Canary {
        let content = token(&format!("canary-{label}"));
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&path, &content).unwrap();
        Canary { path, content }
    }
}

impl Drop for Canary {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A file's fingerprint (see `fingerprint`), `None` if it does not exist.
pub type Print = Option<(Vec<u8>, u32, u64)>;

/// Host state an attack must not change: fingerprints of sensitive files and
/// canaries, the entries of / and /etc, free space of /.
pub struct HostSnapshot {
    files: Vec<(PathBuf, Print)>,
    listings: Vec<(PathBuf, BTreeSet<String>)>,
    _canaries: Vec<Canary>,
}

pub const SENSITIVE: &[&str] = &[
    "/etc/passwd",
    "/etc/shadow",
    "/etc/group",
    "/etc/gshadow",
    "/etc/hosts",
    "/etc/sudoers",
    "/root/.bashrc",
    "/root/.ssh/authorized_keys",
];

fn listing(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

impl HostSnapshot {
    /// Plants canaries in root's home and moat's data directory, then records
    /// the sensitive files, the canaries and `extra` paths.
    pub fn take(extra: &[&Path]) -> HostSnapshot {
        let canaries = vec![
            Canary::new(PathBuf::from("/root").join(token("home-canary")), "home"),
            Canary::new(super::config().data_dir.join(token("data-canary")), "data"),
        ];
        let mut paths: Vec<PathBuf> = SENSITIVE.iter().map(PathBuf::from).collect();
        paths.extend(canaries.iter().map(|c| c.path.clone()));
        paths.extend(extra.iter().map(|p| p.to_path_buf()));
        HostSnapshot {
            files: paths
                .into_iter()
                .map(|p| {
                    let f = super::fingerprint(&p);
                    (p, f)
                })
                .collect(),
            listings: ["/", "/etc", "/usr", "/usr/bin"]
                .iter()
                .map(|d| (PathBuf::from(d), listing(Path::new(d))))
                .collect(),
            _canaries: canaries,
        }
    }

    pub fn canary_paths(&self) -> Vec<PathBuf> {
        self._canaries.iter().map(|c| c.path.clone()).collect()
    }

    pub fn assert_unchanged(&self) {
        for (p, before) in &self.files {
            assert!(
                super::fingerprint(p) == *before,
                "host file {} changed",
                p.display()
            );
        }
        for (d, before) in &self.listings {
            let now = listing(d);
            assert_eq!(
                &now,
                before,
                "entries of host directory {} changed",
                d.display()
            );
        }
    }
}

/// Free bytes of the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> u64 {
    let s = nix::sys::statvfs::statvfs(path).unwrap();
    s.blocks_available() as u64 * s.fragment_size() as u64
}

/// Total bytes of the filesystem holding `path`.
pub fn total_bytes(path: &Path) -> u64 {
    let s = nix::sys::statvfs::statvfs(path).unwrap();
    s.blocks() as u64 * s.fragment_size() as u64
}

/// Runs python3 code in the lease.
pub fn py(lease: &mut Lease, code: &str) -> super::Output {
    super::run(
        lease,
        moat_sandbox::RunSpec::new(["/usr/bin/python3", "-c", code]),
    )
}

/// Parses `name value` lines into a map (later lines win).
pub fn pairs(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

/// Checks `name value` lines against expectations; `A|B` accepts either.
/// Every expected name must be present, so a script that died early fails.
pub fn expect_all(o: &crate::common::Output, expected: &[(&str, &str)]) {
    let got = pairs(&o.stdout);
    let mut wrong = Vec::new();
    for (name, want) in expected {
        match got.get(*name) {
            Some(v) if want.split('|').any(|w| w == v) => {}
            other => wrong.push(format!("{name}: expected {want}, got {other:?}")),
        }
    }
    assert!(
        wrong.is_empty(),
        "{}\n--- stdout\n{}--- stderr\n{}",
        wrong.join("\n"),
        o.stdout,
        o.stderr
    );
}

/// A directory the test creates (under the scratch dir or root's home) and removes.
pub struct OwnedDir(pub std::path::PathBuf);
impl Drop for OwnedDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A directory that sandbox uids can traverse, under the test's scratch dir.
pub fn scratch_dir(label: &str) -> OwnedDir {
    use std::os::unix::fs::PermissionsExt;
    let d = crate::common::scratch().join(token(label));
    std::fs::create_dir_all(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    OwnedDir(d)
}
