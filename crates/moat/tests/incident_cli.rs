//! `moat incident` and `moat doctor --security` as an operator runs them,
//! against a real `moat up` on loopback (real bwrap sandboxes) and scratch
//! directories.

#[path = "../../moat-gateway/tests/gwkit/mod.rs"]
mod gwkit;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use gwkit::*;

fn moat(data: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_moat"));
    c.env("MOAT_DATA_DIR", data)
        .env("MOAT_RUNTIME_DIR", scratch().join("run"))
        .env("MOAT_INIT", init_path())
        .env_remove("MOAT_SECRETS_FILE")
        .env_remove("MOAT_LOG")
        .stdin(Stdio::null());
    c
}

/// A running `moat up` (killed when dropped).
struct Up {
    child: Child,
    web: SocketAddr,
}

impl Up {
    fn start(data: &Path, config: &Path) -> Up {
        let mut child = moat(data)
            .args(["up", "--config"])
            .arg(config)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting moat up");
        let (tx, rx) = channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut web = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx
                .recv_timeout(left)
                .expect("moat up said where it listens");
            if let Some(a) = line
                .strip_prefix("moat: web chat on http://")
                .and_then(|r| r.strip_suffix('/'))
            {
                web = Some(a.parse().unwrap());
            }
            if line.starts_with("moat: metrics on http://") {
                break;
            }
        }
        Up {
            child,
            web: web.unwrap(),
        }
    }

    fn client(&self) -> Client {
        Client {
            addr: self.web,
            token: None,
        }
    }

    fn stop(mut self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "moat up did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn run(mut c: Command) -> (Output, String) {
    let o = c.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o, text)
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

const PAUSED: &str = "moat is paused by its operator";

fn notices(evs: &[serde_json::Value]) -> usize {
    evs.iter()
        .filter(|v| kind(v) == "notice" && v["text"].as_str().unwrap_or("").contains(PAUSED))
        .count()
}

#[test]
fn incident_pauses_destroys_every_sandbox_survives_a_restart_and_lifts() {
    let dir = fresh_dir("incident");
    let data = dir.join("data");
    let cfg = dir.join("moat.toml");
    std::fs::write(
        &cfg,
        web_config(1, "", "users = [\"*\"]\ndebounce = \"0ms\""),
    )
    .unwrap();
    let up = Up::start(&data, &cfg);
    let leases = leases_of(&data);
    let leases_text = leases.to_str().unwrap().to_string();
    let c = up.client();
    // Working before: a turn answers, and the warm pool is on the host.
    let m = random_hex(8);
    assert_eq!(c.post("t1", &format!("echo before-{m}")).status, 202);
    let evs = c.events("t1").unwrap().answers(1);
    assert_eq!(answers_of(&evs), vec![(format!("before-{m}\n"), true)]);
    // (The pool resets and restarts the runner after the answer, in the
    // background: wait for it.)
    let t0 = std::time::Instant::now();
    while host_procs(&leases_text).is_empty() && t0.elapsed() < std::time::Duration::from_secs(20) {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(!host_procs(&leases_text).is_empty(), "no warm sandbox");
    // A turn running, and a kept (named) lease on disk.
    let sleeper = format!("sleep 40.{}", random_digits(6));
    assert_eq!(c.post("long", &sleeper).status, 202);
    wait_host_proc(&sleeper);
    let named = leases.join("conv-999999");
    std::fs::create_dir_all(&named).unwrap();
    std::fs::write(named.join("uid"), "1000000001").unwrap();

    let mut cmd = moat(&data);
    cmd.args(["incident", "--config"]).arg(&cfg);
    let (o, out) = run(cmd);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("the running gateway is paused"), "{out}");
    assert!(out.contains("1 running turn(s) stopped"), "{out}");
    assert!(out.contains("incident mode is on"), "{out}");
    // No sandbox runs, no lease is left on disk.
    wait_no_host_proc(&sleeper, Duration::from_secs(10));
    assert!(host_procs(&leases_text).is_empty(), "a sandbox still runs");
    assert_eq!(entries(&leases), Vec::<PathBuf>::new());
    // A message is refused, stored as dropped, and the conversation told once.
    for _ in 0..2 {
        let r = c.post("t2", "echo should-not-run");
        assert_eq!(r.status, 503, "{r:?}");
        assert_eq!(r.json()["status"], "paused");
    }
    let evs = c.events("t2").unwrap().during(Duration::from_secs(1));
    assert_eq!(notices(&evs), 1, "{evs:#?}");
    assert!(answers_of(&evs).is_empty(), "{evs:#?}");
    assert!(host_procs(&leases_text).is_empty());
    let recs = audit_records(&data.join("audit").join("audit.jsonl"));
    let inc: Vec<_> = recs.iter().filter(|r| r["kind"] == "incident").collect();
    assert_eq!(inc.len(), 2, "{recs:#?}");
    let gw = inc
        .iter()
        .find(|r| r["actor"] == "gateway")
        .expect("the gateway's record");
    assert_eq!(gw["turns_stopped"], 1, "{gw}");
    // The busy pooled sandbox is destroyed as it comes back; the kept one by the sweep.
    assert!(gw["leases_destroyed"].as_u64() >= Some(1), "{gw}");
    assert!(inc
        .iter()
        .any(|r| r["actor"] == "cli" && r["gateway"] == "reached"));
    let paused = recs
        .iter()
        .filter(|r| r["kind"] == "message" && r["verdict"] == "paused")
        .count();
    assert_eq!(paused, 2, "{recs:#?}");

    // A restart stays paused and starts no sandbox.
    up.stop();
    let up = Up::start(&data, &cfg);
    let c = up.client();
    let r = c.post("t3", "echo after-restart");
    assert_eq!(r.status, 503, "{r:?}");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        host_procs(&leases_text).is_empty(),
        "a paused gateway started a sandbox"
    );

    // The lift: turns run again.
    let mut cmd = moat(&data);
    cmd.args(["incident", "--lift", "--config"]).arg(&cfg);
    let (o, out) = run(cmd);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("takes messages again"), "{out}");
    let m = random_hex(8);
    assert_eq!(c.post("t3", &format!("echo lifted-{m}")).status, 202);
    let evs = c.events("t3").unwrap().answers(1);
    assert_eq!(answers_of(&evs), vec![(format!("lifted-{m}\n"), true)]);
    let recs = audit_records(&data.join("audit").join("audit.jsonl"));
    assert!(recs.iter().any(|r| r["kind"] == "incident_lifted"
        && r["actor"] == "gateway"
        && r["was_paused"] == true));
    assert!(moat_audit::verify(data.join("audit").join("audit.jsonl")).is_ok());
    up.stop();
}

#[test]
fn incident_without_a_gateway_sweeps_leases_and_sets_the_flag() {
    let dir = fresh_dir("incident-offline");
    let data = dir.join("data");
    let leases = leases_of(&data);
    let named = leases.join("conv-424242");
    std::fs::create_dir_all(&named).unwrap();
    std::fs::write(named.join("uid"), "1000000002").unwrap();
    let (o, out) = run({
        let mut c = moat(&data);
        c.arg("incident");
        c
    });
    assert!(o.status.success(), "{out}");
    assert!(out.contains("no gateway is running"), "{out}");
    assert!(!named.exists());
    assert!(data.join("incident.json").exists());
    // A one-off sandbox is refused while paused.
    let (o, out) = run({
        let mut c = moat(&data);
        c.args(["sandbox", "run", "--", "true"]);
        c
    });
    assert!(!o.status.success(), "{out}");
    assert!(out.contains("incident --lift"), "{out}");
    let (o, out) = run({
        let mut c = moat(&data);
        c.args(["incident", "--lift"]);
        c
    });
    assert!(o.status.success(), "{out}");
    assert!(!data.join("incident.json").exists());
    let recs = audit_records(&data.join("audit").join("audit.jsonl"));
    let kinds: Vec<_> = recs
        .iter()
        .map(|r| r["kind"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(kinds, vec!["incident", "incident_lifted"], "{recs:#?}");
    assert_eq!(recs[0]["leases_destroyed"], 1);
}

fn doctor(data: &Path, cfg: &Path, secrets: &Path) -> (Output, String) {
    let mut c = moat(data);
    c.args(["doctor", "--security", "--config"])
        .arg(cfg)
        .arg("--secrets")
        .arg(secrets);
    run(c)
}

#[test]
fn doctor_security_finds_open_modes_and_is_quiet_on_a_clean_deployment() {
    let dir = fresh_dir("doctor-sec");
    let cfg = dir.join("moat.toml");
    std::fs::write(&cfg, web_config(1, "", "users = [\"alice\"]")).unwrap();
    // The decoy: a data directory anyone can list, a secrets file anyone can read.
    let data = dir.join("open-data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let secrets = dir.join("open-secrets");
    std::fs::write(&secrets, "ANTHROPIC_API_KEY=sk-decoy-not-a-key\n").unwrap();
    std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (o, out) = doctor(&data, &cfg, &secrets);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.contains(&format!(
            "[HIGH] the data directory {} is mode 0755",
            data.display()
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("chmod 0711 {}", data.display())),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "[HIGH] the secrets file {} is mode 0644",
            secrets.display()
        )),
        "{out}"
    );
    assert!(!out.contains("sk-decoy"), "a secret printed: {out}");
    // Read-only: the modes are as they were.
    assert_eq!(
        std::fs::metadata(&data).unwrap().permissions().mode() & 0o777,
        0o755
    );
    assert_eq!(
        std::fs::metadata(&secrets).unwrap().permissions().mode() & 0o777,
        0o644
    );

    // Clean: moat's own modes, loopback listeners, a listed user.
    let data = dir.join("clean-data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (o, out) = doctor(&data, &cfg, &secrets);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("(0 finding(s))"), "{out}");

    // A web chat on every address without auth, open to everyone.
    let open = dir.join("open.toml");
    std::fs::write(
        &open,
        "[web]\nlisten = \"0.0.0.0:0\"\nauth = \"token\"\ntoken_env = \"T\"\n[admin]\nlisten = \"0.0.0.0:0\"\n\
         [[channel]]\nplatform = \"web\"\nid = \"*\"\nusers = [\"*\"]\n",
    )
    .unwrap();
    let (o, out) = doctor(&data, &open, &secrets);
    assert!(
        out.contains("reachable from other machines; auth: bearer tokens from T"),
        "{out}"
    );
    assert!(out.contains("the admin listener"), "{out}");
    assert!(out.contains("users = [\"*\"]"), "{out}");
    assert_eq!(o.status.code(), Some(0), "no high finding here: {out}");
}
