//! `moat agents install`, the install itself: npm runs inside a moat sandbox
//! whose only network is an egress door allowing the package registry alone
//! (install scripts included); the result is handed to root and sealed
//! (`moat_sandbox::seal`), checked in sandboxes without any network (each
//! command answers `--version`, at the prefix and mounted elsewhere), moved
//! into place as a new version and switched in with one atomic rename of the
//! `current` symlink (`moat_sandbox::versions`). The command line and its
//! inputs (packages, registry) are `agents_cmd`'s.
//!
//! Must never: run npm or a package's install script on the host, let the
//! install reach any host but the registry, follow a symlink the sandbox left
//! while fixing ownership or modes, change `current` before the new version
//! passed its checks, or leave a half-installed version where `current` (or a
//! version name) could point at it.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use moat_policy::network::{parse_allow_entry, parse_pin};
use moat_policy::{BackendKind, MountRequest, SandboxPolicy};
use moat_sandbox::seal::SealMode;
use moat_sandbox::versions::{self, VersionDir};
use moat_sandbox::{
    Engine, EngineConfig, Lease, LeaseOptions, RunSpec, Stream, Termination, WorkspaceSource,
};
use serde_json::{json, Value};

use crate::agents_cmd::*;

// ---------------------------------------------------------------------------
// The template directory (versions, the `current` switch and sealing are
// shared with images: moat_sandbox::versions and moat_sandbox::seal)
// ---------------------------------------------------------------------------

/// An install's scratch directory `DIR/.new-<random>`: `prefix/` (npm's
/// `--prefix`, the future version) and `cache/` (npm's cache). Removed on
/// drop unless the prefix was moved into place.
struct Staging {
    root: PathBuf,
}

impl Staging {
    fn create(t: &VersionDir) -> anyhow::Result<Staging> {
        let s = Staging {
            root: t.staging(0o711)?,
        };
        for d in [s.prefix(), s.cache()] {
            std::fs::create_dir(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        Ok(s)
    }
    fn prefix(&self) -> PathBuf {
        self.root.join("prefix")
    }
    fn cache(&self) -> PathBuf {
        self.root.join("cache")
    }
    /// Hands `prefix/` and `cache/` to the install sandbox's uid.
    fn give_to(&self, uid: u32) -> anyhow::Result<()> {
        for d in [self.prefix(), self.cache()] {
            std::os::unix::fs::chown(&d, Some(uid), Some(uid))
                .with_context(|| format!("handing {} to the sandbox", d.display()))?;
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755))?;
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if self.root.exists() {
            if let Err(e) = std::fs::remove_dir_all(&self.root) {
                eprintln!(
                    "moat: warning: could not remove {}: {e}; the next install removes it",
                    self.root.display()
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The door's records
// ---------------------------------------------------------------------------

/// Writes the door's records to moat's audit log and keeps a copy, so the
/// install can say which connections were refused and whether the registry
/// answered.
struct Recorder {
    log: moat_egress::JsonlAudit,
    seen: Mutex<Vec<moat_egress::EgressRecord>>,
}

impl moat_egress::Audit for Recorder {
    fn record(&self, rec: &moat_egress::EgressRecord) {
        self.log.record(rec);
        if let Ok(mut s) = self.seen.lock() {
            s.push(rec.clone());
        }
    }
}

impl Recorder {
    fn denied(&self) -> Vec<moat_egress::EgressRecord> {
        self.seen
            .lock()
            .map(|s| {
                s.iter()
                    .filter(|r| r.verdict == "denied")
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// `host:port (reason)` of each refused connection and `DNS host (reason)`
/// of each refused lookup, once each.
fn refusal_lines(denied: &[moat_egress::EgressRecord]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for r in denied {
        let reason = r.reason.as_deref().unwrap_or("refused");
        let line = if r.kind == "dns" {
            format!("DNS {} ({reason})", r.host)
        } else {
            format!("{}:{} ({reason})", r.host, r.port)
        };
        if !out.contains(&line) {
            out.push(line);
        }
    }
    out
}

// ---------------------------------------------------------------------------
// The install
// ---------------------------------------------------------------------------

/// What one package turned out to be.
struct Installed {
    name: String,
    version: String,
    /// (command, first line of its `--version`)
    commands: Vec<(String, String)>,
}

pub(crate) fn install(args: InstallArgs) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let backend = match args.backend.as_str() {
        "bwrap" => BackendKind::Bwrap,
        "gvisor" => BackendKind::Gvisor,
        other => bail!("--backend {other:?}: choose bwrap or gvisor (the install runs untrusted install scripts)"),
    };
    let registry = parse_registry(&args.registry).map_err(anyhow::Error::msg)?;
    let packages = if args.packages.is_empty() {
        default_packages()
    } else {
        args.packages
            .iter()
            .map(|p| parse_package(p))
            .collect::<Result<Vec<_>, _>>()
            .map_err(anyhow::Error::msg)?
    };
    let mut pins = Vec::new();
    for p in &args.resolve {
        pins.push(parse_pin(p).map_err(|e| anyhow::anyhow!("--resolve: {e}"))?);
    }
    let timeout = moat_policy::parse_duration(&args.timeout)
        .map_err(|e| anyhow::anyhow!("--timeout: {e}"))?;
    if args.keep == 0 {
        bail!("--keep 0: at least the new version is kept; use 1 or more");
    }
    check_host_tools()?;
    if !nix::unistd::geteuid().is_root() {
        bail!("moat agents install runs as root: it hands the install to a sandbox uid and the result back to root");
    }

    let dir = args.dir.clone().unwrap_or_else(default_dir);
    let template = VersionDir::open(&dir, "moat agents install")?;
    let staging = Staging::create(&template)?;
    let engine = Engine::new(EngineConfig::from_env(), backend)?;
    let audit_path = engine.config().data_dir.join("audit").join("audit.jsonl");
    let recorder = Arc::new(Recorder {
        log: moat_egress::JsonlAudit::open(&audit_path)
            .with_context(|| format!("opening the audit log {}", audit_path.display()))?,
        seen: Mutex::new(Vec::new()),
    });

    eprintln!(
        "moat: installing {} from {} in a {} sandbox (the door allows {} only)",
        packages
            .iter()
            .map(Package::spec)
            .collect::<Vec<_>>()
            .join(", "),
        registry.url,
        backend.name(),
        registry.entry
    );
    npm_install(
        &engine,
        backend,
        &template,
        &staging,
        &registry,
        &pins,
        &packages,
        timeout,
        recorder.clone(),
    )?;

    // Every install process is gone: the tree is the host's to fix.
    let bytes = moat_sandbox::seal::seal(&staging.prefix(), SealMode::Template)?.bytes;
    let installed = check(&engine, backend, &template, &staging, &packages)?;

    let id = versions::new_version_id(template.versions().last().map(String::as_str));
    let manifest = json!({
        "version_id": id,
        "installed_at_ms": SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
        "registry": registry.url,
        "prefix": SANDBOX_PREFIX,
        "packages": installed.iter().map(|i| json!({
            "name": i.name,
            "version": i.version,
            "commands": i.commands.iter().map(|(c, v)| json!({"command": c, "version": v})).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    });
    let manifest_path = staging.prefix().join(MANIFEST);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&manifest_path)
        .with_context(|| format!("writing {}", manifest_path.display()))?;
    f.write_all(format!("{manifest:#}\n").as_bytes())?;
    f.sync_all()?;
    std::fs::set_permissions(&manifest_path, std::fs::Permissions::from_mode(0o644))?;

    // Into place: a complete, checked version under its final name, then
    // `current` switched to it.
    let final_dir = template.dir.join(&id);
    std::fs::rename(staging.prefix(), &final_dir)
        .with_context(|| format!("moving the new version to {}", final_dir.display()))?;
    drop(staging);
    versions::sync_dir(&template.dir);
    let previous = template.current();
    template.switch(&id)?;
    let removed = template.prune(args.keep);
    let _ = recorder.log.log().append(
        "agents_install",
        json!({
            "dir": template.dir.display().to_string(),
            "version_id": id,
            "registry": registry.url,
            "packages": installed.iter().map(|i| format!("{}@{}", i.name, i.version)).collect::<Vec<_>>(),
        }),
    );

    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "moat: installed into {} ({} now points at it)",
        final_dir.display(),
        template.dir.join(CURRENT).display()
    )?;
    for i in &installed {
        writeln!(out, "  {} {}", i.name, i.version)?;
        for (c, v) in &i.commands {
            writeln!(out, "    {SANDBOX_PREFIX}/bin/{c}: {v}")?;
        }
    }
    writeln!(
        out,
        "moat: {:.1} MiB in {:.1} s",
        bytes as f64 / (1024.0 * 1024.0),
        t0.elapsed().as_secs_f64()
    )?;
    if let Some(p) = previous {
        writeln!(out, "moat: the previous version {p} is kept")?;
    }
    for r in removed {
        writeln!(out, "moat: removed the old version {r}")?;
    }
    let refused = refusal_lines(&recorder.denied());
    if !refused.is_empty() {
        writeln!(
            out,
            "moat: note: the door refused (install scripts may reach the registry only; see the audit log): {}",
            refused.join(", ")
        )?;
    }
    Ok(())
}

/// Runs npm in a sandbox whose door allows the registry alone.
#[allow(clippy::too_many_arguments)]
fn npm_install(
    engine: &Engine,
    backend: BackendKind,
    template: &VersionDir,
    staging: &Staging,
    registry: &Registry,
    pins: &[(String, std::net::IpAddr)],
    packages: &[Package],
    timeout: Duration,
    recorder: Arc<Recorder>,
) -> anyhow::Result<()> {
    let mut policy = SandboxPolicy {
        backend,
        ..SandboxPolicy::default()
    };
    policy.filesystem.allowed_roots = vec![template.dir.clone()];
    for (host, sandbox) in [
        (staging.prefix(), SANDBOX_PREFIX),
        (staging.cache(), SANDBOX_CACHE),
    ] {
        policy.add_mount(
            MountRequest {
                host,
                sandbox: sandbox.into(),
                writable: true,
            },
            "agents install",
        )?;
    }
    policy.network.allow = vec![parse_allow_entry(&registry.entry).map_err(anyhow::Error::msg)?];
    for (h, ip) in pins {
        policy.network.pins.insert(h.clone(), *ip);
    }
    policy.set_memory("2GiB", "agents install")?;
    policy.set_pids(1024, "agents install")?;
    policy.set_cpus(2.0, "agents install")?;
    policy.limits.timeout = timeout;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the egress door's runtime")?;
    // The install's lease behind its door, made as every other sandbox's.
    let moat_gateway::runner::Runner {
        mut lease, door, ..
    } = moat_gateway::runner::open(moat_gateway::runner::RunnerSpec {
        engine,
        policy,
        door_name: "agents-install",
        lease_name: None,
        run_as: None,
        workspace: WorkspaceSource::Fresh,
        extras: &moat_gateway::runner::DoorExtras::default(),
        runtime: Some(rt.handle()),
        audit: recorder.clone(),
    })
    .map_err(|e| {
        anyhow::anyhow!("{e} (moat agents install needs root to create network namespaces)")
    })?;
    let proxy = format!("http://127.0.0.1:{}", moat_egress::PROXY_PORT);
    staging.give_to(lease.host_uid())?;

    let mut argv: Vec<String> = [
        "npm",
        "install",
        "--global",
        "--prefix",
        SANDBOX_PREFIX,
        "--cache",
        SANDBOX_CACHE,
        "--ignore-scripts=false",
        "--no-fund",
        "--no-audit",
        "--no-update-notifier",
        "--loglevel=warn",
        "--",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    argv.extend(packages.iter().map(Package::spec));
    let mut spec = RunSpec::new(argv);
    spec.env = vec![
        ("npm_config_registry".into(), registry.url.clone()),
        ("npm_config_proxy".into(), proxy.clone()),
        ("npm_config_https_proxy".into(), proxy),
        ("npm_config_noproxy".into(), "localhost,127.0.0.1".into()),
        // The host's npm configuration (under /usr, seen read-only) is not
        // the template's; the user configuration is in the empty home.
        ("npm_config_globalconfig".into(), "/dev/null".into()),
        // A registry that is down fails in seconds, not minutes.
        ("npm_config_fetch_retries".into(), "2".into()),
        ("npm_config_fetch_retry_mintimeout".into(), "2000".into()),
        ("npm_config_fetch_retry_maxtimeout".into(), "10000".into()),
        ("npm_config_progress".into(), "false".into()),
        // npm's debug log would go to the scratch cache, deleted afterwards.
        ("npm_config_logs_max".into(), "0".into()),
    ];
    // Node's own CA roots plus the host's store (the sandbox's /etc has
    // it): a registry mirror or proxy with a site CA works like on the host.
    if Path::new(HOST_CA_BUNDLE).is_file() {
        spec.env
            .push(("NODE_EXTRA_CA_CERTS".into(), HOST_CA_BUNDLE.into()));
    }
    spec.timeout = Some(timeout);
    let mut tail: Vec<u8> = Vec::new();
    let stderr = std::io::stderr();
    let outcome = lease.run(spec, &mut |_stream, bytes| {
        let _ = stderr.lock().write_all(bytes);
        tail.extend_from_slice(bytes);
        if tail.len() > 64 * 1024 {
            tail.drain(..tail.len() - 32 * 1024);
        }
    });
    let destroyed = lease.destroy();
    drop(door);
    rt.shutdown_background();
    let outcome = outcome.context("running npm in the install sandbox")?;
    destroyed.context("cleaning up the install sandbox")?;

    if outcome.termination == Termination::Exited(0) {
        return Ok(());
    }
    let denied = recorder.denied();
    let (registry_failures, others): (Vec<_>, Vec<_>) =
        denied.into_iter().partition(|r| r.host == registry.host);
    let npm_said = String::from_utf8_lossy(&tail).into_owned();
    let mut msg = if let Termination::TimedOut(d) = outcome.termination {
        format!(
            "npm install did not finish within {}; raise --timeout",
            moat_policy::units::format_duration(d)
        )
    } else if let Some(r) = registry_failures.first() {
        format!(
            "could not reach the registry {} ({}): check --registry and that the door allows it",
            registry.url,
            r.reason.as_deref().unwrap_or("refused")
        )
    } else if npm_said.contains("E404") || npm_said.contains("404 Not Found") {
        format!(
            "the registry {} does not have {} (npm: 404 Not Found); check the package names and versions",
            registry.url,
            packages.iter().map(Package::spec).collect::<Vec<_>>().join(", ")
        )
    } else if npm_said.contains("ETARGET") {
        format!(
            "the registry {} has no matching version of {}; check --package",
            registry.url,
            packages
                .iter()
                .map(Package::spec)
                .collect::<Vec<_>>()
                .join(", ")
        )
    } else {
        format!(
            "npm install failed ({}); npm's output is above",
            outcome
                .reason()
                .map(|r| r.trim_start_matches("moat: ").to_string())
                .unwrap_or_else(|| "no reason given".into())
        )
    };
    let refused = refusal_lines(&others);
    if !refused.is_empty() {
        msg.push_str(&format!(
            "; the door refused (install scripts may reach the registry only; see the audit log): {}",
            refused.join(", ")
        ));
    }
    msg.push_str("; nothing was changed in ");
    msg.push_str(&template.dir.display().to_string());
    bail!(msg)
}

/// The check, in sandboxes without any network and with the new version
/// mounted read-only: at the install prefix, each package's `package.json`
/// is read and each of its commands answers `--version`; then, in a second
/// sandbox where the version is mounted elsewhere only, each command answers
/// `--version` again (the gateway shows the template at its own path, so a
/// package that depends on where it was installed is refused).
fn check(
    engine: &Engine,
    backend: BackendKind,
    template: &VersionDir,
    staging: &Staging,
    packages: &[Package],
) -> anyhow::Result<Vec<Installed>> {
    let lease_at = |at: &str| -> anyhow::Result<Lease> {
        let mut policy = SandboxPolicy {
            backend,
            ..SandboxPolicy::default()
        };
        policy.filesystem.allowed_roots = vec![template.dir.clone()];
        policy.add_mount(
            MountRequest {
                host: staging.prefix(),
                sandbox: at.into(),
                writable: false,
            },
            "agents check",
        )?;
        policy.limits.timeout = VERSION_TIMEOUT;
        Ok(engine.lease(policy, LeaseOptions::default())?)
    };
    let mut lease = lease_at(SANDBOX_PREFIX)?;
    let r = check_in(&mut lease, packages);
    let destroyed = lease.destroy();
    let installed = r?;
    destroyed.context("cleaning up the check sandbox")?;

    let mut lease = lease_at(RELOCATED_PREFIX)?;
    let mut r = Ok(());
    'all: for i in &installed {
        for (c, _) in &i.commands {
            r = run_version(&mut lease, RELOCATED_PREFIX, c).map(|_| ()).map_err(|e| {
                e.context(format!(
                    "{}@{} works at {SANDBOX_PREFIX} but not when mounted elsewhere: it depends on where it was installed, and the gateway mounts the template at its own path",
                    i.name, i.version
                ))
            });
            if r.is_err() {
                break 'all;
            }
        }
    }
    let destroyed = lease.destroy();
    r?;
    destroyed.context("cleaning up the check sandbox")?;
    Ok(installed)
}

/// Runs `<at>/bin/<command> --version`; its first line (of standard error
/// when standard output is empty: Pi prints its version there), or why it
/// failed.
fn run_version(lease: &mut Lease, at: &str, command: &str) -> anyhow::Result<String> {
    let path = format!("{at}/bin/{command}");
    let mut spec = RunSpec::new([path.clone(), "--version".into()]);
    spec.timeout = Some(VERSION_TIMEOUT);
    let (term, out, err) = run_captured(lease, spec)?;
    if term != Termination::Exited(0) {
        bail!(
            "the new version does not work: {path} --version failed ({term:?}): {}",
            one_line(if err.trim().is_empty() { &out } else { &err })
        );
    }
    Ok(one_line(if out.trim().is_empty() { &err } else { &out }))
}

/// Reads what npm installed (inside: the host never reads the sandbox's files).
const LIST_JS: &str = r#"
const fs = require('fs'), path = require('path');
const out = [];
for (const n of JSON.parse(process.env.MOAT_PACKAGES)) {
  const p = JSON.parse(fs.readFileSync(path.join(process.env.MOAT_PREFIX, 'lib/node_modules', n, 'package.json'), 'utf8'));
  let bin = p.bin || {};
  if (typeof bin === 'string') bin = { [String(p.name).split('/').pop()]: bin };
  out.push({ name: String(p.name), version: String(p.version), commands: Object.keys(bin) });
}
process.stdout.write(JSON.stringify(out) + '\n');
"#;

fn run_captured(lease: &mut Lease, spec: RunSpec) -> anyhow::Result<(Termination, String, String)> {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let o = lease.run(spec, &mut |s, b| match s {
        Stream::Stdout if out.len() < 1 << 20 => out.extend_from_slice(b),
        Stream::Stderr if err.len() < 1 << 20 => err.extend_from_slice(b),
        _ => {}
    })?;
    Ok((
        o.termination,
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
    ))
}

fn one_line(text: &str) -> String {
    let l = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    l.chars().take(200).collect()
}

fn command_name_ok(c: &str) -> bool {
    !c.is_empty()
        && c != "."
        && c != ".."
        && c.len() <= 100
        && c.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn check_in(lease: &mut Lease, packages: &[Package]) -> anyhow::Result<Vec<Installed>> {
    let names: Vec<&str> = packages.iter().map(|p| p.name.as_str()).collect();
    let mut spec = RunSpec::new(["node", "-e", LIST_JS]);
    spec.env = vec![
        ("MOAT_PACKAGES".into(), serde_json::to_string(&names)?),
        ("MOAT_PREFIX".into(), SANDBOX_PREFIX.into()),
    ];
    let (term, out, err) = run_captured(lease, spec)?;
    if term != Termination::Exited(0) {
        bail!(
            "the new version is incomplete: reading the installed packages failed ({term:?}): {}",
            one_line(&err)
        );
    }
    let listed: Value = serde_json::from_str(out.trim())
        .map_err(|e| anyhow::anyhow!("the list of installed packages is not JSON ({e})"))?;
    let listed = listed
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("the list of installed packages is not a JSON array"))?;
    let mut installed = Vec::new();
    for (want, got) in packages.iter().zip(listed) {
        let name = got["name"].as_str().unwrap_or("").to_string();
        let version = got["version"].as_str().unwrap_or("").to_string();
        if name != want.name {
            bail!(
                "the new version is wrong: {} installed a package named {name:?}",
                want.spec()
            );
        }
        if is_exact_version(&want.version) && version != want.version {
            bail!(
                "the new version is wrong: {} installed version {version:?}",
                want.spec()
            );
        }
        let commands: Vec<String> = got["commands"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|c| c.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        if let Some(c) = commands.iter().find(|c| !command_name_ok(c)) {
            bail!(
                "{} declares a command with an unusable name {c:?}",
                want.spec()
            );
        }
        if let Some(c) = want.command {
            if !commands.iter().any(|x| x == c) {
                bail!(
                    "{} does not provide the command {c} (it has: {})",
                    want.spec(),
                    commands.join(", ")
                );
            }
        }
        let mut checked = Vec::new();
        for c in commands {
            let v = run_version(lease, SANDBOX_PREFIX, &c)?;
            checked.push((c, v));
        }
        installed.push(Installed {
            name,
            version,
            commands: checked,
        });
    }
    if installed.len() != packages.len() {
        bail!("the new version is incomplete: not every package was found");
    }
    Ok(installed)
}
