//! `moat doctor`: checks that this host can run each backend, and says what is
//! missing and how to fix it. Reads the host; changes nothing but a throw-away
//! cgroup and a throw-away sandbox.

use std::process::Command;

/// One finding.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    /// What was found.
    pub detail: String,
    /// How to fix it, when not ok.
    pub fix: Option<String>,
    /// A missing optional piece does not fail the doctor.
    pub required: bool,
}

fn version_of(cmd: &str, arg: &str) -> Option<String> {
    let out = Command::new(cmd).arg(arg).output().ok()?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    text.lines().next().map(|l| l.trim().to_string())
}

/// Parses "bubblewrap 0.8.0" into (0, 8, 0).
pub fn parse_bwrap_version(text: &str) -> Option<(u32, u32, u32)> {
    let v = text.split_whitespace().last()?;
    let mut it = v.split('.').map(|p| p.parse::<u32>().ok());
    Some((it.next()??, it.next()??, it.next().flatten().unwrap_or(0)))
}

pub fn run_checks() -> Vec<Check> {
    let mut out = Vec::new();
    let apt = |pkg: &str| Some(format!("apt-get install -y {pkg}  (or run scripts/setup)"));

    match version_of("bwrap", "--version") {
        Some(v) => {
            let ok = parse_bwrap_version(&v).is_some_and(|ver| ver >= (0, 8, 0));
            out.push(Check {
                name: "bubblewrap",
                ok,
                detail: v.clone(),
                fix: (!ok)
                    .then(|| "moat needs bubblewrap 0.8.0 or newer (for --disable-userns)".into()),
                required: true,
            });
        }
        None => out.push(Check {
            name: "bubblewrap",
            ok: false,
            detail: "bwrap not found on PATH".into(),
            fix: apt("bubblewrap"),
            required: true,
        }),
    }

    let userns = std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let clone_ok = std::fs::read_to_string("/proc/sys/kernel/unprivileged_userns_clone")
        .map(|s| s.trim() != "0")
        .unwrap_or(true);
    out.push(Check {
        name: "user namespaces",
        ok: userns > 0 && clone_ok,
        detail: format!(
            "max_user_namespaces={userns}, unprivileged_userns_clone={}",
            if clone_ok { "allowed" } else { "0" }
        ),
        fix: Some(
            "sysctl -w user.max_user_namespaces=15000 kernel.unprivileged_userns_clone=1".into(),
        ),
        required: true,
    });

    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let seccomp = status.lines().any(|l| l.starts_with("Seccomp:"));
    let filter = crate::seccomp::deny_filter(&[]).map(|p| p.len());
    out.push(Check {
        name: "seccomp",
        ok: seccomp && filter.is_ok(),
        detail: match &filter {
            Ok(n) => format!(
                "kernel supports seccomp: {seccomp}; moat's filter compiles to {n} instructions"
            ),
            Err(e) => format!("filter does not compile: {e}"),
        },
        fix: Some("use a kernel built with CONFIG_SECCOMP_FILTER".into()),
        required: true,
    });

    match crate::cgroup::layout() {
        Ok(layout) => {
            let desc: Vec<String> = layout
                .controllers
                .iter()
                .map(|(c, mp, v2)| format!("{c}: {} ({})", mp.display(), if *v2 { "v2" } else { "v1" }))
                .collect();
            let probe = crate::cgroup::Cgroup::create(
                &format!("doctor-{}", std::process::id()),
                crate::cgroup::CgroupLimits { memory: 64 << 20, pids: 16, millicpus: 100 },
            );
            let (ok, extra) = match probe {
                Ok(cg) => (cg.remove().is_ok(), String::new()),
                Err(e) => (false, format!("; {e}")),
            };
            out.push(Check {
                name: "cgroups (memory, pids, cpu)",
                ok,
                detail: desc.join(", ") + &extra,
                fix: Some("run moat as root (or delegate a cgroup with the memory, pids and cpu controllers to its user)".into()),
                required: true,
            });
        }
        Err(e) => out.push(Check {
            name: "cgroups (memory, pids, cpu)",
            ok: false,
            detail: e.to_string(),
            fix: Some("mount the cgroup controllers (cgroup v2: enable memory, pids and cpu in cgroup.subtree_control)".into()),
            required: true,
        }),
    }

    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    out.push(Check {
        name: "root (tmpfs quotas, per-lease uids)",
        ok: root,
        detail: if root { "running as root".into() } else { "not root".into() },
        fix: Some("run moat as root: it mounts a size-limited tmpfs per lease and runs each sandbox under its own unprivileged uid".into()),
        required: true,
    });

    let runsc = version_of("runsc", "--version");
    out.push(Check {
        name: "gVisor runsc (backend gvisor)",
        ok: runsc.is_some(),
        detail: runsc.unwrap_or_else(|| "runsc not found on PATH".into()),
        fix: apt("runsc"),
        required: false,
    });
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn bwrap_versions_parse() {
        assert_eq!(
            super::parse_bwrap_version("bubblewrap 0.8.0"),
            Some((0, 8, 0))
        );
        assert_eq!(
            super::parse_bwrap_version("bubblewrap 0.11"),
            Some((0, 11, 0))
        );
        assert_eq!(super::parse_bwrap_version("nonsense"), None);
    }
}
