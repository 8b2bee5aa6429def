//! Shared helpers for the sandbox integration and attack tests: an engine on a
//! private data directory, running a command and capturing its output, and
//! snapshots of host state to prove an attack changed nothing.

#![allow(dead_code)]

pub mod host;
pub mod kernel;
pub mod rootfs;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use moat_policy::{BackendKind, SandboxPolicy};
use moat_sandbox::{Engine, EngineConfig, Lease, LeaseOptions, RunOutcome, RunSpec, Stream};

/// A scratch directory for one test binary, world-traversable so sandbox uids
/// can reach lease directories below it.
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("moat-test-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o711)).unwrap();
        d
    })
}

pub fn config() -> EngineConfig {
    EngineConfig {
        data_dir: scratch().join("data"),
        runtime_dir: scratch().join("run"),
        init_path: PathBuf::from(env!("CARGO_BIN_EXE_moat-init")),
    }
}

pub fn engine(kind: BackendKind) -> Engine {
    Engine::new(config(), kind).expect("engine")
}

pub fn policy(kind: BackendKind) -> SandboxPolicy {
    SandboxPolicy {
        backend: kind,
        ..SandboxPolicy::default()
    }
}

/// A fresh lease with the default policy for `kind`.
pub fn lease(kind: BackendKind) -> (Engine, Lease) {
    let e = engine(kind);
    let l = e
        .lease(policy(kind), LeaseOptions::default())
        .expect("lease");
    (e, l)
}

#[derive(Debug)]
pub struct Output {
    pub outcome: RunOutcome,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn code(&self) -> i32 {
        self.outcome.exit_code()
    }
}

/// Runs `sh -c script` in the lease and captures everything.
pub fn sh(lease: &mut Lease, script: &str) -> Output {
    run(lease, RunSpec::new(["/bin/sh", "-c", script]))
}

pub fn run(lease: &mut Lease, spec: RunSpec) -> Output {
    let mut out = Vec::new();
    let mut err = Vec::new();
    let outcome = lease
        .run(spec, &mut |s, b| match s {
            Stream::Stdout => out.extend_from_slice(b),
            Stream::Stderr => err.extend_from_slice(b),
        })
        .expect("run");
    Output {
        outcome,
        stdout: String::from_utf8_lossy(&out).into_owned(),
        stderr: String::from_utf8_lossy(&err).into_owned(),
    }
}

/// Which backends the attack suite runs against: both, unless a backend's
/// runtime is missing *and* MOAT_TEST_REQUIRE_ALL is unset (CI sets it).
pub fn backend_available(kind: BackendKind) -> bool {
    let bin = match kind {
        BackendKind::Bwrap => "bwrap",
        BackendKind::Gvisor => "runsc",
        BackendKind::Local => return true,
    };
    let found = std::process::Command::new(bin)
        .arg("--version")
        .output()
        .is_ok();
    if !found && std::env::var_os("MOAT_TEST_REQUIRE_ALL").is_some() {
        panic!("{bin} is required (MOAT_TEST_REQUIRE_ALL is set) but not installed");
    }
    found
}

/// A file's bytes and metadata, to compare before and after an attack.
pub fn fingerprint(path: &Path) -> Option<(Vec<u8>, u32, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(path).ok()?;
    let bytes = if m.is_file() {
        std::fs::read(path).ok()?
    } else {
        Vec::new()
    };
    Some((
        bytes,
        m.mode(),
        m.mtime() as u64 * 1_000_000_000 + m.mtime_nsec() as u64,
    ))
}

/// Every host process's (pid, uid) whose uid is in moat's sandbox range.
pub fn sandbox_uid_processes() -> Vec<(i32, u32)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        let uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|u| u.parse::<u32>().ok());
        if let Some(uid) = uid {
            if uid >= moat_sandbox::storage::UID_BASE {
                out.push((pid, uid));
            }
        }
    }
    out
}

/// Generates one test per backend from a body taking the backend kind:
/// `attack_test!(attack_f1_name, |kind| { ... });` gives `bwrap::attack_f1_name`
/// and `gvisor::attack_f1_name`.
#[macro_export]
macro_rules! per_backend {
    ($($name:ident => $body:expr;)*) => {
        mod bwrap {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[test]
                fn $name() {
                    let kind = moat_policy::BackendKind::Bwrap;
                    if !common::backend_available(kind) { return; }
                    ($body)(kind)
                }
            )*
        }
        mod gvisor {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[test]
                fn $name() {
                    let kind = moat_policy::BackendKind::Gvisor;
                    if !common::backend_available(kind) { return; }
                    ($body)(kind)
                }
            )*
        }
    };
}
