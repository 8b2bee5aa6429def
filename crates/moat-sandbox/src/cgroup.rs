//! Control groups for one sandbox instance: memory, pids and cpu limits on
//! cgroup v1, v2 or a v1/v2 hybrid host; the OOM-kill counter; killing every
//! member; removal.
//!
//! Invariant: `Cgroup::create` either returns a group in which all three limits
//! are written, or an error. It never returns a group with a limit missing
//! (fail closed). `remove` kills every member before it deletes the directories.

use std::fs;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::error::{Result, SandboxError};

/// Where each controller lives on this host.
#[derive(Debug, Clone)]
pub struct Layout {
    /// (controller, hierarchy mount point, is cgroup v2)
    pub controllers: Vec<(&'static str, PathBuf, bool)>,
    pub v2_root: Option<PathBuf>,
}

const NEEDED: [&str; 3] = ["memory", "pids", "cpu"];

/// Reads /proc/self/mountinfo once and finds the memory, pids and cpu controllers,
/// preferring a v1 hierarchy that has the controller, then the v2 hierarchy.
pub fn layout() -> std::result::Result<&'static Layout, String> {
    static LAYOUT: OnceLock<std::result::Result<Layout, String>> = OnceLock::new();
    LAYOUT
        .get_or_init(|| {
            let info = fs::read_to_string("/proc/self/mountinfo")
                .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
            parse_layout(&info, &|root: &Path| {
                fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default()
            })
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Finds the needed controllers in a mountinfo text; `v2_controllers` reads the
/// `cgroup.controllers` of a cgroup2 mount point.
pub fn parse_layout(
    mountinfo: &str,
    v2_controllers: &dyn Fn(&Path) -> String,
) -> std::result::Result<Layout, String> {
    let mut v1: Vec<(String, PathBuf)> = Vec::new();
    let mut v2_root = None;
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mount_point = left.split(' ').nth(4).unwrap_or("");
        let mut r = right.split(' ');
        let fstype = r.next().unwrap_or("");
        let _source = r.next();
        let opts = r.next().unwrap_or("");
        match fstype {
            "cgroup2" if v2_root.is_none() => v2_root = Some(PathBuf::from(mount_point)),
            "cgroup" => v1.push((opts.to_string(), PathBuf::from(mount_point))),
            _ => {}
        }
    }
    let available = v2_root.as_deref().map(v2_controllers).unwrap_or_default();
    let mut controllers = Vec::new();
    for c in NEEDED {
        if let Some((_, mp)) = v1.iter().find(|(opts, _)| opts.split(',').any(|o| o == c)) {
            controllers.push((c, mp.clone(), false));
        } else if let Some(root) = v2_root
            .as_ref()
            .filter(|_| available.split_whitespace().any(|x| x == c))
        {
            controllers.push((c, root.clone(), true));
        } else {
            return Err(format!(
                "the {c} cgroup controller is not available on this host (mounted neither as cgroup v1 nor enabled in cgroup v2)"
            ));
        }
    }
    Ok(Layout {
        controllers,
        v2_root,
    })
}

/// Names of the instance cgroups under `moat/` in every hierarchy.
pub fn instance_names() -> Vec<String> {
    let Ok(layout) = layout() else {
        return Vec::new();
    };
    let mut names: Vec<String> = layout
        .controllers
        .iter()
        .filter_map(|(_, mount, _)| fs::read_dir(mount.join("moat")).ok())
        .flat_map(|rd| rd.flatten())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Kills every member of the instance cgroup `name` and removes it, in every hierarchy.
pub fn remove_stale(name: &str) -> Result<()> {
    let layout = layout().map_err(SandboxError::Limits)?;
    let mut dirs: Vec<(PathBuf, bool)> = Vec::new();
    for (_, mount, v2) in &layout.controllers {
        let d = mount.join("moat").join(name);
        if d.is_dir() && !dirs.iter().any(|(x, _)| *x == d) {
            dirs.push((d, *v2));
        }
    }
    if dirs.is_empty() {
        return Ok(());
    }
    let memory_dir = dirs[0].clone();
    Cgroup {
        dirs,
        memory_dir,
        removed: false,
    }
    .remove()
}

#[derive(Debug, Clone, Copy)]
pub struct CgroupLimits {
    pub memory: u64,
    pub pids: u32,
    pub millicpus: u32,
}

/// One directory per hierarchy that holds a needed controller.
#[derive(Debug)]
pub struct Cgroup {
    dirs: Vec<(PathBuf, bool)>,
    memory_dir: (PathBuf, bool),
    removed: bool,
}

fn write(path: &Path, value: &str) -> Result<()> {
    fs::write(path, value)
        .map_err(|e| SandboxError::Limits(format!("writing {value:?} to {}: {e}", path.display())))
}

fn ensure_v2_parent(root: &Path, parent: &Path, controllers: &[&str]) -> Result<()> {
    let enable: String = controllers.iter().map(|c| format!("+{c} ")).collect();
    for dir in [root, parent] {
        let current = fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
        if controllers
            .iter()
            .all(|c| current.split_whitespace().any(|x| x == *c))
        {
            continue;
        }
        write(&dir.join("cgroup.subtree_control"), enable.trim())?;
    }
    Ok(())
}

impl Cgroup {
    /// Creates `moat/<name>` in every needed hierarchy and writes the limits.
    pub fn create(name: &str, limits: CgroupLimits) -> Result<Cgroup> {
        let layout = layout().map_err(SandboxError::Limits)?;
        let mut dirs: Vec<(PathBuf, bool)> = Vec::new();
        for (_, mount, v2) in &layout.controllers {
            let parent = mount.join("moat");
            let dir = parent.join(name);
            if dirs.iter().any(|(d, _)| *d == dir) {
                continue;
            }
            fs::create_dir_all(&parent).map_err(|e| {
                SandboxError::Limits(format!(
                    "cannot create cgroup {}: {e} (run moat as root, or delegate a cgroup to its user)",
                    parent.display()
                ))
            })?;
            if *v2 {
                let here: Vec<&str> = layout
                    .controllers
                    .iter()
                    .filter(|(_, _, is_v2)| *is_v2)
                    .map(|(c, _, _)| *c)
                    .collect();
                ensure_v2_parent(mount, &parent, &here)?;
            }
            match fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(SandboxError::Limits(format!(
                        "cannot create cgroup {}: {e}",
                        dir.display()
                    )))
                }
            }
            dirs.push((dir, *v2));
        }
        #[allow(
            clippy::expect_used,
            reason = "the layout was checked to have every needed controller"
        )]
        let find = |c: &str| -> (PathBuf, bool) {
            let (_, mount, v2) = layout
                .controllers
                .iter()
                .find(|(n, _, _)| *n == c)
                .expect("layout has every needed controller");
            (mount.join("moat").join(name), *v2)
        };
        let cg = Cgroup {
            memory_dir: find("memory"),
            dirs,
            removed: false,
        };
        if let Err(e) = cg.write_limits(limits, &find) {
            cg.remove_dirs();
            return Err(e);
        }
        Ok(cg)
    }

    fn write_limits(&self, l: CgroupLimits, find: &dyn Fn(&str) -> (PathBuf, bool)) -> Result<()> {
        let (mem, v2) = find("memory");
        if v2 {
            write(&mem.join("memory.max"), &l.memory.to_string())?;
            if mem.join("memory.swap.max").exists() {
                write(&mem.join("memory.swap.max"), "0")?;
            }
        } else {
            write(&mem.join("memory.limit_in_bytes"), &l.memory.to_string())?;
            if mem.join("memory.memsw.limit_in_bytes").exists() {
                write(
                    &mem.join("memory.memsw.limit_in_bytes"),
                    &l.memory.to_string(),
                )?;
            } else {
                // No swap accounting: keep the group out of swap instead.
                let _ = fs::write(mem.join("memory.swappiness"), "0");
            }
        }
        let (pids, _) = find("pids");
        write(&pids.join("pids.max"), &l.pids.to_string())?;
        let (cpu, v2) = find("cpu");
        let period: u64 = 100_000;
        let quota = (l.millicpus as u64 * period / 1000).max(1000);
        if v2 {
            write(&cpu.join("cpu.max"), &format!("{quota} {period}"))?;
        } else {
            write(&cpu.join("cpu.cfs_period_us"), &period.to_string())?;
            write(&cpu.join("cpu.cfs_quota_us"), &quota.to_string())?;
        }
        Ok(())
    }

    /// Opens `cgroup.procs` of every hierarchy for writing, close-on-exec, so a
    /// child can join between fork and exec with a plain `write(fd, "0")`.
    pub fn procs_fds(&self) -> Result<Vec<OwnedFd>> {
        self.dirs
            .iter()
            .map(|(d, _)| {
                fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_CLOEXEC)
                    .open(d.join("cgroup.procs"))
                    .map(OwnedFd::from)
                    .map_err(|e| {
                        SandboxError::Limits(format!("opening {}/cgroup.procs: {e}", d.display()))
                    })
            })
            .collect()
    }

    /// Adds an already running process (used for runtimes that fork themselves).
    pub fn add_pid(&self, pid: u32) -> Result<()> {
        for (d, _) in &self.dirs {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .open(d.join("cgroup.procs"))
                .map_err(|e| SandboxError::Limits(format!("{}: {e}", d.display())))?;
            f.write_all(pid.to_string().as_bytes())
                .map_err(|e| SandboxError::Limits(format!("{}: {e}", d.display())))?;
        }
        Ok(())
    }

    /// How many times the kernel's OOM killer fired in this group.
    pub fn oom_kills(&self) -> u64 {
        let (dir, v2) = &self.memory_dir;
        let file = if *v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        let text = fs::read_to_string(dir.join(file)).unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The pids currently in the group (all hierarchies).
    pub fn pids(&self) -> Vec<i32> {
        let mut out = Vec::new();
        for (d, _) in &self.dirs {
            if let Ok(text) = fs::read_to_string(d.join("cgroup.procs")) {
                out.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// SIGKILLs every member until the group is empty (or `limit` passes).
    /// Returns whether the group is empty.
    pub fn kill_all(&self, limit: Duration) -> bool {
        for (d, v2) in &self.dirs {
            if *v2 && d.join("cgroup.kill").exists() {
                let _ = fs::write(d.join("cgroup.kill"), "1");
            }
        }
        let start = Instant::now();
        loop {
            let pids = self.pids();
            if pids.is_empty() {
                return true;
            }
            for pid in pids {
                // SAFETY: kill(2) with a pid read from our own cgroup.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            if start.elapsed() > limit {
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn remove_dirs(&self) -> bool {
        let mut ok = true;
        for (d, _) in &self.dirs {
            let start = Instant::now();
            loop {
                match fs::remove_dir(d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(_) if start.elapsed() < Duration::from_secs(2) => {
                        std::thread::sleep(Duration::from_micros(500))
                    }
                    Err(e) => {
                        tracing::error!(cgroup = %d.display(), error = %e, "could not remove cgroup");
                        ok = false;
                        break;
                    }
                }
            }
        }
        ok
    }

    /// Kills every member and deletes the group's directories.
    pub fn remove(mut self) -> Result<()> {
        self.removed = true;
        let empty = self.kill_all(Duration::from_secs(5));
        if self.remove_dirs() && empty {
            Ok(())
        } else {
            Err(SandboxError::Limits(
                "cgroup still has processes after SIGKILL".into(),
            ))
        }
    }

    pub fn paths(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|(d, _)| d.clone()).collect()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if !self.removed {
            self.kill_all(Duration::from_secs(5));
            self.remove_dirs();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const PURE_V2: &str = "\
25 30 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
28 25 0:25 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";
    const COMBINED_V1: &str = "\
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
";

    fn find<'a>(l: &'a Layout, c: &str) -> (&'a Path, bool) {
        let (_, p, v2) = l.controllers.iter().find(|(n, _, _)| *n == c).unwrap();
        (p.as_path(), *v2)
    }

    #[test]
    fn hybrid_hosts_use_the_v1_hierarchies() {
        let l = parse_layout(HYBRID, &|_| String::new()).unwrap();
        assert_eq!(
            find(&l, "memory"),
            (Path::new("/sys/fs/cgroup/memory"), false)
        );
        assert_eq!(find(&l, "pids"), (Path::new("/sys/fs/cgroup/pids"), false));
        assert_eq!(find(&l, "cpu"), (Path::new("/sys/fs/cgroup/cpu"), false));
        assert_eq!(
            l.v2_root.as_deref(),
            Some(Path::new("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn pure_v2_hosts_use_the_unified_hierarchy() {
        let l = parse_layout(PURE_V2, &|_| {
            "cpuset cpu io memory hugetlb pids rdma".into()
        })
        .unwrap();
        for c in NEEDED {
            assert_eq!(find(&l, c), (Path::new("/sys/fs/cgroup"), true));
        }
    }

    #[test]
    fn combined_v1_mounts_are_found() {
        let l = parse_layout(COMBINED_V1, &|_| String::new()).unwrap();
        assert_eq!(
            find(&l, "cpu"),
            (Path::new("/sys/fs/cgroup/cpu,cpuacct"), false)
        );
    }

    #[test]
    fn a_missing_controller_fails_closed_naming_it() {
        let e = parse_layout(PURE_V2, &|_| "cpu memory".into()).unwrap_err();
        assert!(e.contains("pids"), "{e}");
        let e = parse_layout("", &|_| String::new()).unwrap_err();
        assert!(e.contains("memory"), "{e}");
    }
}
