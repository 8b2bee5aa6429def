//! The sandbox policy: filesystem, environment, limits, network, system calls.
//!
//! Owns the TOML shape of a policy file, its defaults (which deny), validation with
//! errors that name the key, and the CLI overrides. It never reads a file or the
//! environment: callers hand it text and flags.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::network::{parse_allow_entry, parse_pin, NetworkPolicy};
use crate::paths::{blocked_component, check_sandbox_path, DEFAULT_BLOCKED_PATTERNS};
use crate::units::{format_duration, parse_duration, parse_size, ByteSize};
use crate::PolicyError;

/// Which isolation technology runs a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// bubblewrap namespaces + moat's seccomp filter, cgroups and rlimits.
    Bwrap,
    /// gVisor's `runsc`: a user-space kernel between the agent and the host.
    Gvisor,
    /// No isolation at all; only for one trusted user who opted in.
    Local,
}

impl BackendKind {
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "bwrap" => Ok(Self::Bwrap),
            "gvisor" => Ok(Self::Gvisor),
            "local" => Ok(Self::Local),
            other => Err(format!(
                "unknown backend {other:?}; choose one of bwrap, gvisor, local"
            )),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Bwrap => "bwrap",
            Self::Gvisor => "gvisor",
            Self::Local => "local",
        }
    }
}

/// A host directory bound into the sandbox, already checked for shape
/// (absolute paths, no `..`, no blocked name in the path as written).
/// The sandbox crate re-checks the *real* path before start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountRequest {
    pub host: PathBuf,
    pub sandbox: PathBuf,
    pub writable: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FilesystemPolicy {
    /// Extra mounts must lie (after symlinks) under one of these. Empty: none allowed.
    pub allowed_roots: Vec<PathBuf>,
    /// Names refused anywhere in a mounted path: the defaults plus the policy's own.
    pub blocked_patterns: Vec<String>,
    /// Paths, relative to any writable host directory bound in, kept read-only.
    pub protected: Vec<String>,
    pub mounts: Vec<MountRequest>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub memory: ByteSize,
    pub pids: u32,
    /// CPU time per wall-clock time, in thousandths of a CPU.
    pub millicpus: u32,
    pub timeout: Duration,
    /// stdout and stderr together, per command.
    pub output: ByteSize,
    /// All writable places of a lease together (workspace, home, /tmp).
    pub disk: ByteSize,
    pub open_files: u32,
    /// `Some`: a named (kept) lease's files live on an ext4 filesystem image
    /// of this size on the host's disk (a hard limit, not counted against
    /// `memory`, surviving restarts) instead of a tmpfs of `disk`. Unnamed
    /// leases (the pool) always use tmpfs.
    pub persistent_disk: Option<ByteSize>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SandboxPolicy {
    pub backend: BackendKind,
    /// Config equivalent of `MOAT_ALLOW_UNSANDBOXED=1`.
    pub allow_unsandboxed: bool,
    pub filesystem: FilesystemPolicy,
    /// Variables set inside, besides the minimal PATH, HOME, LANG, TERM.
    pub env: BTreeMap<String, String>,
    pub limits: Limits,
    /// Egress through the sandbox's door; empty allowlist: no network at all.
    pub network: NetworkPolicy,
    /// System calls denied on top of moat's fixed list (names, checked by the backend).
    pub extra_denied_syscalls: Vec<String>,
    /// `[llm]`: the LLM APIs the door serves (keys never come from a policy).
    pub llm: crate::credentials::LlmSettings,
    /// `[github]`: the repositories the door injects a GitHub token for.
    pub github: crate::credentials::GithubSettings,
    /// The root filesystem image (`moat image import`) whose directories
    /// replace the host's /usr, /bin, /lib...; `None`: the host's, read-only.
    pub image: Option<String>,
    /// With an image: uid 0 inside (the lease's unprivileged uid outside) and
    /// a writable layer of the lease's own over the image.
    pub root_inside: bool,
}

impl Default for SandboxPolicy {
    fn default() -> Self {
        SandboxPolicy {
            backend: BackendKind::Bwrap,
            allow_unsandboxed: false,
            filesystem: FilesystemPolicy {
                allowed_roots: Vec::new(),
                blocked_patterns: DEFAULT_BLOCKED_PATTERNS
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
                protected: vec![".git/hooks".into(), ".git/config".into()],
                mounts: Vec::new(),
            },
            env: BTreeMap::new(),
            limits: Limits {
                memory: ByteSize::mib(1024),
                pids: 256,
                millicpus: 1000,
                timeout: Duration::from_secs(600),
                output: ByteSize::mib(16),
                disk: ByteSize::mib(1024),
                open_files: 1024,
                persistent_disk: None,
            },
            network: NetworkPolicy::default(),
            extra_denied_syscalls: Vec::new(),
            llm: Default::default(),
            github: Default::default(),
            image: None,
            root_inside: false,
        }
    }
}

// ---- the file format ------------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    sandbox: RawSandbox,
    #[serde(default)]
    filesystem: RawFilesystem,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    network: RawNetwork,
    #[serde(default)]
    syscalls: RawSyscalls,
    #[serde(default)]
    llm: crate::credentials::RawLlm,
    #[serde(default)]
    github: crate::credentials::RawGithub,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSandbox {
    backend: Option<String>,
    allow_unsandboxed: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFilesystem {
    #[serde(default)]
    allowed_roots: Vec<String>,
    #[serde(default)]
    extra_blocked_patterns: Vec<String>,
    protected: Option<Vec<String>>,
    #[serde(default)]
    mount: Vec<RawMount>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMount {
    host: String,
    sandbox: String,
    mode: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    memory: Option<String>,
    pids: Option<i64>,
    cpus: Option<f64>,
    timeout: Option<String>,
    output: Option<String>,
    disk: Option<String>,
    open_files: Option<i64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    resolve: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSyscalls {
    #[serde(default)]
    deny: Vec<String>,
}

fn err(key: impl Into<String>, message: impl Into<String>) -> PolicyError {
    PolicyError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

impl SandboxPolicy {
    /// Parses and validates a policy file's text. Unset keys keep the (denying)
    /// defaults. Every error names the key and says what to write instead.
    pub fn from_toml(text: &str) -> Result<Self, PolicyError> {
        let de = toml::Deserializer::new(text);
        let raw: RawPolicy = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            PolicyError::Syntax {
                key: if key == "." {
                    "(top level)".into()
                } else {
                    key
                },
                message: inner.message().to_string(),
                line: inner.span().map(|s| line_of(text, s.start)),
            }
        })?;
        let mut p = SandboxPolicy::default();
        if let Some(b) = raw.sandbox.backend {
            p.backend = BackendKind::parse(&b).map_err(|m| err("sandbox.backend", m))?;
        }
        if let Some(a) = raw.sandbox.allow_unsandboxed {
            p.allow_unsandboxed = a;
        }

        let fs = raw.filesystem;
        for (i, root) in fs.allowed_roots.iter().enumerate() {
            let path = PathBuf::from(root);
            if !path.is_absolute() {
                return Err(err(
                    format!("filesystem.allowed_roots[{i}]"),
                    format!("{root:?} is not an absolute path"),
                ));
            }
            if path.components().count() <= 1 {
                return Err(err(
                    format!("filesystem.allowed_roots[{i}]"),
                    "the whole host filesystem (/) cannot be an allowed root; name a directory",
                ));
            }
            p.filesystem.allowed_roots.push(path);
        }
        for (i, pat) in fs.extra_blocked_patterns.iter().enumerate() {
            if pat.trim().is_empty() || pat.contains('\0') {
                return Err(err(
                    format!("filesystem.extra_blocked_patterns[{i}]"),
                    "a pattern must be a non-empty file or directory name",
                ));
            }
            p.filesystem.blocked_patterns.push(pat.clone());
        }
        if let Some(prot) = fs.protected {
            for (i, rel) in prot.iter().enumerate() {
                let path = Path::new(rel);
                if path.is_absolute()
                    || rel.split('/').any(|c| c == ".." || c == ".")
                    || rel.is_empty()
                {
                    return Err(err(
                        format!("filesystem.protected[{i}]"),
                        format!("{rel:?} must be a plain relative path such as \".git/hooks\""),
                    ));
                }
            }
            p.filesystem.protected = prot;
        }
        for (i, m) in fs.mount.iter().enumerate() {
            let key = format!("filesystem.mount[{i}]");
            let writable = match m.mode.as_deref() {
                None | Some("ro") => false,
                Some("rw") => true,
                Some(other) => {
                    return Err(err(
                        format!("{key}.mode"),
                        format!("unknown mode {other:?}; use \"ro\" or \"rw\""),
                    ))
                }
            };
            let req = MountRequest {
                host: PathBuf::from(&m.host),
                sandbox: PathBuf::from(&m.sandbox),
                writable,
            };
            p.add_mount(req, &key)?;
        }

        p.env = BTreeMap::new();
        for (k, v) in raw.env {
            p.set_env(&k, &v, &format!("env.{k}"))?;
        }

        let l = raw.limits;
        if let Some(m) = l.memory {
            p.set_memory(&m, "limits.memory")?;
        }
        if let Some(n) = l.pids {
            p.set_pids(n, "limits.pids")?;
        }
        if let Some(c) = l.cpus {
            p.set_cpus(c, "limits.cpus")?;
        }
        if let Some(t) = l.timeout {
            p.set_timeout(&t, "limits.timeout")?;
        }
        if let Some(o) = l.output {
            let size = parse_size(&o).map_err(|m| err("limits.output", m))?;
            if size.0 < 1024 {
                return Err(err("limits.output", "must be at least 1KiB"));
            }
            p.limits.output = size;
        }
        if let Some(d) = l.disk {
            let size = parse_size(&d).map_err(|m| err("limits.disk", m))?;
            if size.0 < (1 << 20) {
                return Err(err("limits.disk", "must be at least 1MiB"));
            }
            p.limits.disk = size;
        }
        if let Some(n) = l.open_files {
            if !(16..=1 << 20).contains(&n) {
                return Err(err(
                    "limits.open_files",
                    format!("{n} is out of range; use 16 to 1048576"),
                ));
            }
            p.limits.open_files = n as u32;
        }

        for (i, entry) in raw.network.allow.iter().enumerate() {
            let e = parse_allow_entry(entry).map_err(|m| err(format!("network.allow[{i}]"), m))?;
            p.network.allow.push(e);
        }
        for (host, ip) in &raw.network.resolve {
            let (h, a) = parse_pin(&format!("{host}={ip}"))
                .map_err(|m| err(format!("network.resolve.{host}"), m))?;
            p.network.pins.insert(h, a);
        }
        for (i, name) in raw.syscalls.deny.iter().enumerate() {
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            {
                return Err(err(
                    format!("syscalls.deny[{i}]"),
                    format!("{name:?} is not a system call name (lowercase letters, digits, _)"),
                ));
            }
            p.extra_denied_syscalls.push(name.clone());
        }
        p.llm = raw.llm.validate()?;
        p.github = raw.github.validate()?;
        Ok(p)
    }

    /// Adds an extra mount after checking its shape. `key` names the setting in errors.
    pub fn add_mount(&mut self, req: MountRequest, key: &str) -> Result<(), PolicyError> {
        if !req.host.is_absolute() {
            return Err(err(
                key,
                format!("host path {:?} is not absolute", req.host),
            ));
        }
        check_sandbox_path(&req.sandbox).map_err(|m| err(key, m))?;
        if let Some(pat) = blocked_component(&req.host, &self.filesystem.blocked_patterns) {
            return Err(err(
                key,
                format!(
                    "host path {:?} matches the blocked pattern {pat:?}; secrets are never mounted",
                    req.host
                ),
            ));
        }
        if self
            .filesystem
            .mounts
            .iter()
            .any(|m| m.sandbox == req.sandbox)
        {
            return Err(err(key, format!("{:?} is mounted twice", req.sandbox)));
        }
        self.filesystem.mounts.push(req);
        Ok(())
    }

    /// Sets one variable for inside the sandbox. HOME is moat's to set.
    pub fn set_env(&mut self, name: &str, value: &str, key: &str) -> Result<(), PolicyError> {
        let valid = !name.is_empty()
            && !name.as_bytes()[0].is_ascii_digit()
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid {
            return Err(err(
                key,
                format!("{name:?} is not a variable name (letters, digits, _; not starting with a digit)"),
            ));
        }
        if name == "HOME" {
            return Err(err(
                key,
                "HOME is set by moat to the agent's home directory",
            ));
        }
        if value.contains('\0') {
            return Err(err(key, "the value contains a NUL byte"));
        }
        self.env.insert(name.to_string(), value.to_string());
        Ok(())
    }

    pub fn set_memory(&mut self, text: &str, key: &str) -> Result<(), PolicyError> {
        let size = parse_size(text).map_err(|m| err(key, m))?;
        if size.0 < (16 << 20) {
            return Err(err(
                key,
                format!("{size} is too little to start a process; use at least 16MiB"),
            ));
        }
        self.limits.memory = size;
        Ok(())
    }

    pub fn set_pids(&mut self, n: i64, key: &str) -> Result<(), PolicyError> {
        if !(4..=65536).contains(&n) {
            return Err(err(
                key,
                format!("{n} is out of range; use 4 to 65536 processes"),
            ));
        }
        self.limits.pids = n as u32;
        Ok(())
    }

    pub fn set_cpus(&mut self, cpus: f64, key: &str) -> Result<(), PolicyError> {
        if !cpus.is_finite() || !(0.01..=1024.0).contains(&cpus) {
            return Err(err(
                key,
                format!("{cpus} is out of range; use 0.01 to 1024 CPUs"),
            ));
        }
        self.limits.millicpus = (cpus * 1000.0).round() as u32;
        Ok(())
    }

    pub fn set_timeout(&mut self, text: &str, key: &str) -> Result<(), PolicyError> {
        let d = parse_duration(text).map_err(|m| err(key, m))?;
        if d.is_zero() || d > Duration::from_secs(24 * 3600) {
            return Err(err(
                key,
                format!("{} is out of range; use 1ms to 24h", format_duration(d)),
            ));
        }
        self.limits.timeout = d;
        Ok(())
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
}

/// Values given on the command line, applied on top of a policy file.
/// Each error names the flag.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub backend: Option<String>,
    pub mounts: Vec<String>,
    pub env: Vec<String>,
    pub memory: Option<String>,
    pub pids: Option<i64>,
    pub cpus: Option<f64>,
    pub timeout: Option<String>,
    /// `--allow-domain ENTRY`, repeatable.
    pub allow_domains: Vec<String>,
    /// `--resolve HOST=IP`, repeatable.
    pub resolve: Vec<String>,
}

impl Overrides {
    pub fn apply(&self, p: &mut SandboxPolicy) -> Result<(), PolicyError> {
        if let Some(b) = &self.backend {
            p.backend = BackendKind::parse(b).map_err(|m| err("--backend", m))?;
        }
        for spec in &self.mounts {
            let req = parse_mount_flag(spec).map_err(|m| err("--mount", m))?;
            p.add_mount(req, "--mount")?;
        }
        for kv in &self.env {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| err("--env", format!("{kv:?} is not KEY=VALUE")))?;
            p.set_env(k, v, "--env")?;
        }
        if let Some(m) = &self.memory {
            p.set_memory(m, "--memory")?;
        }
        if let Some(n) = self.pids {
            p.set_pids(n, "--pids")?;
        }
        if let Some(c) = self.cpus {
            p.set_cpus(c, "--cpus")?;
        }
        if let Some(t) = &self.timeout {
            p.set_timeout(t, "--timeout")?;
        }
        for entry in &self.allow_domains {
            let e = parse_allow_entry(entry).map_err(|m| err("--allow-domain", m))?;
            p.network.allow.push(e);
        }
        for pin in &self.resolve {
            let (h, a) = parse_pin(pin).map_err(|m| err("--resolve", m))?;
            p.network.pins.insert(h, a);
        }
        Ok(())
    }
}

/// Parses `HOST:SANDBOX[:ro|:rw]` (read-only unless `:rw`).
pub fn parse_mount_flag(spec: &str) -> Result<MountRequest, String> {
    let parts: Vec<&str> = spec.split(':').collect();
    let (host, sandbox, writable) = match parts.as_slice() {
        [h, s] => (*h, *s, false),
        [h, s, "ro"] => (*h, *s, false),
        [h, s, "rw"] => (*h, *s, true),
        [_, _, mode] => return Err(format!("unknown mode {mode:?} in {spec:?}; use :ro or :rw")),
        _ => return Err(format!("{spec:?} is not HOST:SANDBOX[:ro|:rw]")),
    };
    if host.is_empty() || sandbox.is_empty() {
        return Err(format!("{spec:?} is not HOST:SANDBOX[:ro|:rw]"));
    }
    Ok(MountRequest {
        host: PathBuf::from(host),
        sandbox: PathBuf::from(sandbox),
        writable,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_of(e: PolicyError) -> String {
        match e {
            PolicyError::Invalid { key, .. } | PolicyError::Syntax { key, .. } => key,
        }
    }

    #[test]
    fn empty_file_gives_denying_defaults() {
        let p = SandboxPolicy::from_toml("").unwrap();
        assert_eq!(p, SandboxPolicy::default());
        assert!(p.filesystem.allowed_roots.is_empty());
        assert!(p.filesystem.mounts.is_empty());
        assert!(p.env.is_empty());
        assert!(!p.network.is_enabled());
        assert!(!p.allow_unsandboxed);
    }

    #[test]
    fn a_full_file_parses() {
        let p = SandboxPolicy::from_toml(
            r#"
            [sandbox]
            backend = "gvisor"
            [filesystem]
            allowed_roots = ["/srv/repos"]
            extra_blocked_patterns = ["vault"]
            protected = [".git/hooks"]
            [[filesystem.mount]]
            host = "/srv/repos/app"
            sandbox = "/repos/app"
            mode = "rw"
            [env]
            GREETING = "hi"
            [limits]
            memory = "256MiB"
            pids = 64
            cpus = 0.5
            timeout = "30s"
            output = "1MiB"
            disk = "64MiB"
            [syscalls]
            deny = ["uname"]
            "#,
        )
        .unwrap();
        assert_eq!(p.backend, BackendKind::Gvisor);
        assert!(p.filesystem.mounts[0].writable);
        assert_eq!(p.limits.memory, ByteSize::mib(256));
        assert_eq!(p.limits.millicpus, 500);
        assert_eq!(p.limits.timeout, Duration::from_secs(30));
        assert_eq!(p.env["GREETING"], "hi");
        assert!(p.filesystem.blocked_patterns.contains(&"vault".to_string()));
        assert_eq!(p.extra_denied_syscalls, vec!["uname"]);
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("[limits]\nmemory = \"12XB\"", "limits.memory"),
            ("[limits]\nmemory = \"1MiB\"", "limits.memory"),
            ("[limits]\npids = 0", "limits.pids"),
            ("[limits]\ncpus = -1.0", "limits.cpus"),
            ("[limits]\ntimeout = \"0s\"", "limits.timeout"),
            ("[limits]\npids = \"many\"", "limits.pids"),
            ("[limits]\nmemroy = \"1G\"", "limits.memroy"),
            ("[sandbox]\nbackend = \"docker\"", "sandbox.backend"),
            ("[network]\nmode = \"open\"", "network.mode"),
            ("[network]\nallow = [\"*.com\"]", "network.allow[0]"),
            (
                "[network]\nallow = [\"ok.test\", \"bad host\"]",
                "network.allow[1]",
            ),
            (
                "[network.resolve]\n\"git.test\" = \"nowhere\"",
                "network.resolve.git.test",
            ),
            ("[env]\nHOME = \"/root\"", "env.HOME"),
            ("[env]\n\"1BAD\" = \"x\"", "env.1BAD"),
            (
                "[filesystem]\nallowed_roots = [\"relative\"]",
                "filesystem.allowed_roots[0]",
            ),
            (
                "[filesystem]\nallowed_roots = [\"/\"]",
                "filesystem.allowed_roots[0]",
            ),
            (
                "[[filesystem.mount]]\nhost = \"/srv/x\"\nsandbox = \"/a/../b\"",
                "filesystem.mount[0]",
            ),
            (
                "[[filesystem.mount]]\nhost = \"/home/u/.ssh\"\nsandbox = \"/k\"",
                "filesystem.mount[0]",
            ),
            (
                "[[filesystem.mount]]\nhost = \"/srv/x\"\nsandbox = \"/x\"\nmode = \"rx\"",
                "filesystem.mount[0].mode",
            ),
            (
                "[filesystem]\nprotected = [\"../x\"]",
                "filesystem.protected[0]",
            ),
            ("[syscalls]\ndeny = [\"Bad Name\"]", "syscalls.deny[0]"),
            ("unknown = 1", "unknown"),
        ];
        for (text, key) in cases {
            let e = SandboxPolicy::from_toml(text).expect_err(text);
            let shown = e.to_string();
            assert_eq!(key_of(e), key, "{text}: {shown}");
            assert!(shown.starts_with(key) || shown.contains(key), "{shown}");
        }
    }

    #[test]
    fn syntax_errors_carry_the_line() {
        let e = SandboxPolicy::from_toml("[limits]\n\nmemory = 5").unwrap_err();
        let text = e.to_string();
        assert!(text.contains("limits.memory"), "{text}");
        assert!(text.contains("line 3"), "{text}");
    }

    #[test]
    fn overrides_apply_and_name_the_flag() {
        let mut p = SandboxPolicy::default();
        let o = Overrides {
            mounts: vec!["/srv/data:/data".into(), "/srv/out:/out:rw".into()],
            env: vec!["A=1".into(), "B=x=y".into()],
            memory: Some("64M".into()),
            pids: Some(32),
            cpus: Some(2.0),
            timeout: Some("5s".into()),
            backend: Some("local".into()),
            allow_domains: vec!["*.github.com".into(), "git.test:8443".into()],
            resolve: vec!["git.test=127.0.0.1".into()],
        };
        o.apply(&mut p).unwrap();
        assert_eq!(p.filesystem.mounts.len(), 2);
        assert!(!p.filesystem.mounts[0].writable);
        assert!(p.filesystem.mounts[1].writable);
        assert_eq!(p.env["B"], "x=y");
        assert_eq!(p.limits.millicpus, 2000);
        assert_eq!(p.backend, BackendKind::Local);

        for (o, flag) in [
            (
                Overrides {
                    memory: Some("lots".into()),
                    ..Default::default()
                },
                "--memory",
            ),
            (
                Overrides {
                    env: vec!["NOEQUALS".into()],
                    ..Default::default()
                },
                "--env",
            ),
            (
                Overrides {
                    mounts: vec!["/a".into()],
                    ..Default::default()
                },
                "--mount",
            ),
            (
                Overrides {
                    mounts: vec!["/a:/b:rx".into()],
                    ..Default::default()
                },
                "--mount",
            ),
            (
                Overrides {
                    mounts: vec!["/x/.aws:/aws".into()],
                    ..Default::default()
                },
                "--mount",
            ),
            (
                Overrides {
                    backend: Some("vm".into()),
                    ..Default::default()
                },
                "--backend",
            ),
            (
                Overrides {
                    pids: Some(1),
                    ..Default::default()
                },
                "--pids",
            ),
            (
                Overrides {
                    allow_domains: vec!["*".into()],
                    ..Default::default()
                },
                "--allow-domain",
            ),
            (
                Overrides {
                    resolve: vec!["x.test=300.1.1.1".into()],
                    ..Default::default()
                },
                "--resolve",
            ),
        ] {
            let e = o.apply(&mut SandboxPolicy::default()).unwrap_err();
            assert_eq!(key_of(e), flag);
        }
    }
}
