//! Encryption at rest as an operator meets it: `moat up` without a key
//! warns once; `moat store rekey` encrypts a plaintext store and later moves
//! it to another key, printing counts and auditing key ids only; `moat up`
//! then refuses no key and the old key, naming MOAT_STORE_KEY, and answers
//! with the new one; `moat doctor` reports the key. No key text ever shows
//! in output, errors, logs or the audit log.

#[path = "../../moat-gateway/tests/gwkit/mod.rs"]
mod gwkit;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gwkit::*;

fn moat(data: &Path, key: Option<&str>) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_moat"));
    c.env("MOAT_DATA_DIR", data)
        .env("MOAT_RUNTIME_DIR", scratch().join("run"))
        .env("MOAT_INIT", init_path())
        .env("MOAT_LOG", "info")
        .env_remove("MOAT_SECRETS_FILE")
        .env_remove("MOAT_STORE_KEY")
        .stdin(Stdio::null());
    if let Some(k) = key {
        c.env("MOAT_STORE_KEY", k);
    }
    c
}

struct Up {
    child: Child,
    web: SocketAddr,
    stderr: Arc<Mutex<String>>,
    _stdout: Receiver<String>,
}

impl Up {
    fn start(data: &Path, cfg: &Path, key: Option<&str>) -> Up {
        let mut child = moat(data, key)
            .args(["up", "--config"])
            .arg(cfg)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting moat up");
        let (tx, rx) = channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let (err, e2) = (child.stderr.take().unwrap(), stderr.clone());
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                e2.lock().unwrap().push_str(&format!("{l}\n"));
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut web = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx.recv_timeout(left).unwrap_or_else(|_| {
                panic!("moat up did not start; stderr:\n{}", stderr.lock().unwrap())
            });
            if let Some(a) = line
                .strip_prefix("moat: web chat on http://")
                .and_then(|r| r.strip_suffix('/'))
            {
                web = Some(a.parse().unwrap());
            }
            if line.starts_with("moat: metrics on") {
                break;
            }
        }
        Up {
            child,
            web: web.expect("a web address"),
            stderr,
            _stdout: rx,
        }
    }

    /// Sends `echo MARKER` and checks the answer.
    fn echo(&self, thread: &str, marker: &str) {
        let c = Client {
            addr: self.web,
            token: None,
        };
        assert_eq!(c.post(thread, &format!("echo {marker}")).status, 202);
        let evs = c.events(thread).expect("events").answers(1);
        assert_eq!(answers_of(&evs), vec![(format!("{marker}\n"), true)]);
    }

    /// SIGTERM, exit 0; returns everything it wrote to stderr.
    fn stop(mut self) -> String {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                assert!(s.success(), "{s}");
                break;
            }
            assert!(Instant::now() < deadline, "moat up did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(100));
        let e = self.stderr.lock().unwrap().clone();
        e
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

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// No 8-character piece of any key in `keys` is in `s`.
fn assert_no_key(s: &str, keys: &[&str]) {
    for k in keys {
        for w in k.as_bytes().windows(8) {
            let w = std::str::from_utf8(w).unwrap();
            assert!(!s.contains(w), "key text {w:?} in:\n{s}");
        }
    }
}

fn in_files(data: &Path, needle: &str) -> bool {
    ["moat.db", "moat.db-wal"].iter().any(|f| {
        std::fs::read(data.join(f))
            .map(|b| b.windows(needle.len()).any(|w| w == needle.as_bytes()))
            .unwrap_or(false)
    })
}

fn rekey(data: &Path, current: Option<&str>, new: &str) -> Output {
    moat(data, current)
        .env("MOAT_TEST_NEW_STORE_KEY", new)
        .args(["store", "rekey", "--new-key-env", "MOAT_TEST_NEW_STORE_KEY"])
        .output()
        .unwrap()
}

fn up_fails(data: &Path, cfg: &Path, key: Option<&str>) -> String {
    let o = moat(data, key)
        .args(["up", "--config"])
        .arg(cfg)
        .output()
        .unwrap();
    assert!(!o.status.success(), "moat up started: {}", text(&o));
    let t = text(&o);
    assert!(!t.contains("web chat on"), "it listened: {t}");
    t
}

#[test]
fn rekey_encrypts_a_plain_store_then_moves_it_and_moat_up_takes_only_the_current_key() {
    let dir = fresh_dir("store-cli");
    let data = dir.join("data");
    let cfg: PathBuf = dir.join("moat.toml");
    std::fs::write(
        &cfg,
        web_config(1, "", "users = [\"*\"]\ndebounce = \"0ms\""),
    )
    .unwrap();
    let k1 = random_hex(32);
    let k2 = {
        // The base64 form works as well.
        let o = Command::new("openssl")
            .args(["rand", "-base64", "32"])
            .output()
            .expect("openssl");
        String::from_utf8(o.stdout).unwrap().trim().to_string()
    };
    let keys = [k1.as_str(), k2.as_str()];

    // No key: it runs, warns once, stores in the clear.
    let m1 = format!("plain{}", random_hex(8));
    let up = Up::start(&data, &cfg, None);
    up.echo("t", &m1);
    let err = up.stop();
    assert_eq!(
        err.matches("not encrypted at rest").count(),
        1,
        "one warning:\n{err}"
    );
    assert!(err.contains("MOAT_STORE_KEY"), "{err}");
    assert!(in_files(&data, &m1), "the control: plaintext is findable");

    // Encrypt it under k1.
    let o = rekey(&data, None, &k1);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains("messages.text")
            && out.contains("0 re-encrypted, 1 encrypted for the first time"),
        "{out}"
    );
    assert_no_key(&out, &keys);
    assert!(!in_files(&data, &m1), "the old plaintext is gone");

    // Without a key, or with another one, moat up refuses to start.
    let e = up_fails(&data, &cfg, None);
    assert!(
        e.contains("MOAT_STORE_KEY") && e.contains("encrypted"),
        "{e}"
    );
    let e = up_fails(&data, &cfg, Some(&k2));
    assert!(e.contains("MOAT_STORE_KEY") && e.contains("key id"), "{e}");
    assert_no_key(&e, &keys);
    let e = up_fails(&data, &cfg, Some("short"));
    assert!(e.contains("MOAT_STORE_KEY") && !e.contains("short"), "{e}");

    // k1 -> k2: the one row is re-encrypted; then only k2 opens it.
    let o = rekey(&data, Some(&k1), &k2);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains("1 re-encrypted, 0 encrypted for the first time"),
        "{out}"
    );
    assert_no_key(&out, &keys);
    up_fails(&data, &cfg, Some(&k1));
    // A rekey with the wrong current key changes nothing.
    let o = rekey(&data, Some(&k1), &k2);
    assert!(!o.status.success());
    assert!(text(&o).contains("nothing was changed") || text(&o).contains("MOAT_STORE_KEY"));

    let m2 = format!("sealed{}", random_hex(8));
    let up = Up::start(&data, &cfg, Some(&k2));
    up.echo("t2", &m2);
    assert!(!in_files(&data, &m2), "written under a key, yet in clear");
    let err = up.stop();
    assert!(!err.contains("not encrypted at rest"), "{err}");
    assert!(
        err.contains("encrypted at rest"),
        "the key id is logged: {err}"
    );
    assert_no_key(&err, &keys);

    // Audited with key ids, never keys.
    let audit = std::fs::read_to_string(data.join("audit").join("audit.jsonl")).unwrap();
    let rekeys: Vec<&str> = audit
        .lines()
        .filter(|l| l.contains("\"store_rekey\""))
        .collect();
    assert_eq!(rekeys.len(), 2, "{audit}");
    assert!(rekeys[0].contains("\"from_key_id\":null"), "{}", rekeys[0]);
    assert_no_key(&audit, &keys);

    // moat doctor: the key's state, never its text.
    let o = moat(&data, None).arg("doctor").output().unwrap();
    let out = text(&o);
    assert!(
        out.contains("[warn] message store encryption at rest: MOAT_STORE_KEY is not set"),
        "{out}"
    );
    let o = moat(&data, Some(&k2)).arg("doctor").output().unwrap();
    let out = text(&o);
    assert!(
        out.contains("[ok  ] message store encryption at rest: MOAT_STORE_KEY is set (key id"),
        "{out}"
    );
    assert_no_key(&out, &keys);
}

/// `moat history`: a conversation's messages and answers from the store, as
/// Markdown through the running gateway (audited) and as JSON from the store
/// itself once it stopped; an unknown conversation is an error naming it.
#[test]
fn moat_history_exports_a_conversation_with_and_without_a_running_gateway() {
    let dir = fresh_dir("history-cli");
    let data = dir.join("data");
    let cfg: PathBuf = dir.join("moat.toml");
    std::fs::write(
        &cfg,
        web_config(1, "", "users = [\"*\"]\ndebounce = \"0ms\""),
    )
    .unwrap();
    let m = format!("hist{}", random_hex(6));
    let up = Up::start(&data, &cfg, None);
    up.echo("h", &m);
    let o = moat(&data, None)
        .args(["history", "1", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let md = text(&o);
    assert!(o.status.success(), "{md}");
    assert!(md.starts_with("# Conversation 1 (web local h)"), "{md}");
    assert!(md.contains(&format!("> echo {m}\n")), "{md}");
    assert!(md.contains("**moat** (turn 1) at "), "{md}");
    assert!(md.contains(&format!("> {m}\n")), "{md}");
    up.stop();
    let exported: Vec<_> = audit_records(&data.join("audit").join("audit.jsonl"))
        .into_iter()
        .filter(|r| r["kind"] == "history")
        .collect();
    assert_eq!(exported.len(), 1, "{exported:#?}");
    assert_eq!(exported[0]["conversation_id"], 1);
    assert!(
        !exported[0].to_string().contains(&m),
        "no text in the audit"
    );

    // No gateway: read from the store.
    let o = moat(&data, None)
        .args(["history", "1", "--json", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let h: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let entries = h["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "{h:#}");
    assert_eq!(entries[0]["kind"], "message");
    assert_eq!(entries[0]["text"], format!("echo {m}"));
    assert_eq!(entries[1]["kind"], "answer");
    assert_eq!(entries[1]["text"], format!("{m}\n"));
    assert_eq!(entries[1]["delivered"], true);

    let o = moat(&data, None)
        .args(["history", "99", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(text(&o).contains("no conversation 99"), "{}", text(&o));
}

/// `moat channels`: the configuration's channels and the groups registered
/// in the store, through the running gateway and from the store itself.
#[test]
fn moat_channels_lists_the_configured_channels_and_the_registry() {
    let dir = fresh_dir("channels-cli");
    let data = dir.join("data");
    let cfg: PathBuf = dir.join("moat.toml");
    std::fs::write(
        &cfg,
        format!(
            "{}\n[[channel]]\nplatform = \"slack\"\nid = \"C0OPS0001\"\nusers = [\"U0BOB002\"]\nadmins = [\"U0CAROL3\"]\nsandbox = \"per-thread\"\n",
            web_config(1, "", "users = [\"*\"]\ndebounce = \"0ms\"")
        ),
    )
    .unwrap();
    std::fs::create_dir_all(&data).unwrap();
    {
        let store = moat_store::Store::open(data.join("moat.db")).unwrap();
        assert!(store
            .register_group(&moat_store::RegisteredGroup {
                platform: "telegram".into(),
                channel: "-100200".into(),
                name: "family".into(),
                registered_by: "U0CAROL3".into(),
                created_ms: 1,
            })
            .unwrap());
    }
    let list = |what: &str| {
        let o = moat(&data, None)
            .args(["channels", "--json", "--config"])
            .arg(&cfg)
            .output()
            .unwrap();
        assert!(o.status.success(), "{what}: {}", text(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v
    };
    let check = |v: &serde_json::Value| {
        let c = v["configured"].as_array().unwrap();
        assert_eq!(c.len(), 2, "{v:#}");
        assert_eq!(c[0]["platform"], "web");
        assert_eq!(c[1]["id"], "C0OPS0001");
        assert_eq!(c[1]["trust"], "member", "{v:#}");
        assert_eq!(c[1]["sandbox"], "per-thread");
        let r = v["registered"].as_array().unwrap();
        assert_eq!(r.len(), 1, "{v:#}");
        assert_eq!(r[0]["name"], "family");
        assert!(
            !v.to_string().contains("U0BOB002"),
            "no member lists: {v:#}"
        );
    };
    check(&list("no gateway"));
    let up = Up::start(&data, &cfg, None);
    check(&list("through the gateway"));
    up.stop();
}
