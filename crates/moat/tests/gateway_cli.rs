//! `moat up` as an operator runs it: a configuration it cannot honour stops
//! it before it listens, naming the key; a gateway killed with SIGKILL in the
//! middle of a turn answers the message after a restart on the same data
//! directory; SIGTERM lets the running turn finish, exits 0 and leaves no
//! sandbox process behind. Real bwrap sandboxes; the tests talk to the
//! gateway over its web chat on free loopback ports.

#[path = "../../moat-gateway/tests/gwkit/mod.rs"]
mod gwkit;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
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

/// A running `moat up`.
struct Up {
    child: Child,
    web: SocketAddr,
    stdout: Receiver<String>,
    stderr: Arc<Mutex<String>>,
}

impl Up {
    fn start(data: &Path, config: &Path) -> Up {
        let mut child = moat(data)
            .args(["up", "--config"])
            .arg(config)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting moat up");
        let (tx, stdout) = channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let err = child.stderr.take().unwrap();
        let e2 = stderr.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                e2.lock().unwrap().push_str(&format!("{l}\n"));
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut web = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = stdout.recv_timeout(left).unwrap_or_else(|_| {
                panic!(
                    "moat up did not say where it listens; stderr:\n{}",
                    stderr.lock().unwrap()
                )
            });
            if let Some(a) = line
                .strip_prefix("moat: web chat on http://")
                .and_then(|r| r.strip_suffix('/'))
            {
                web = Some(a.parse().expect("a web address"));
            }
            if line.starts_with("moat: metrics on http://") {
                break;
            }
        }
        Up {
            child,
            web: web.expect("moat up printed its web address"),
            stdout,
            stderr,
        }
    }

    fn client(&self) -> Client {
        Client {
            addr: self.web,
            token: None,
        }
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig)
            .expect("signalling moat up");
    }

    /// Waits for moat up to exit.
    fn wait(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "moat up did not exit within {within:?}; stderr:\n{}",
                    self.stderr.lock().unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stdout_lines(&self) -> Vec<String> {
        self.stdout.try_iter().collect()
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

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("moat.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn plain_config(dir: &Path) -> PathBuf {
    write_config(
        dir,
        &web_config(1, "", "users = [\"*\"]\ndebounce = \"0ms\""),
    )
}

#[test]
fn a_bad_configuration_stops_moat_up_naming_the_key() {
    let dir = fresh_dir("bad-config");
    let data = dir.join("data");
    let cases: [(&str, &[&str]); 4] = [
        (
            "[web]\nlisten = \"127.0.0.1:0\"\nlisten_typo = 1\n",
            &["web.listen_typo", "unknown field", "(line 3)"],
        ),
        (
            "[pool]\nsize = 100000\n",
            &["pool.size"],
        ),
        (
            "[[channel]]\nplatform = \"web\"\nid = \"*\"\nusers = [\"*\"]\nrate = { user = \"5/day\" }\n",
            &["channel[0].rate.user", "day"],
        ),
        (
            "[web]\nlisten = \"127.0.0.1:0\"\nauth = \"token\"\ntoken_env = \"MOAT_TEST_NO_SUCH_TOKENS\"\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n",
            &["MOAT_TEST_NO_SUCH_TOKENS"],
        ),
    ];
    for (text, want) in cases {
        let cfg = write_config(&dir, text);
        let o = moat(&data)
            .env_remove("MOAT_TEST_NO_SUCH_TOKENS")
            .args(["up", "--config"])
            .arg(&cfg)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(!o.status.success(), "moat up accepted:\n{text}");
        assert!(err.starts_with("moat: "), "{err}");
        for w in want {
            assert!(err.contains(w), "{err:?} lacks {w:?}");
        }
        assert!(!out.contains("web chat on"), "it listened anyway: {out}");
    }
    let o = moat(&data)
        .args(["up", "--config", "/nonexistent/moat.toml"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/moat.toml"));
}

#[test]
fn a_message_cut_off_by_a_crash_is_answered_after_the_restart() {
    let dir = fresh_dir("crash");
    let data = dir.join("data");
    let cfg = plain_config(&dir);
    let m = random_hex(8);
    let sleeper = format!("sleep 3.{}", random_digits(6));

    let mut up = Up::start(&data, &cfg);
    let r = up
        .client()
        .post("t", &format!("{sleeper}; echo recovered-{m}"));
    assert_eq!(r.status, 202, "{r:?}");
    wait_host_proc(&sleeper);
    up.signal(nix::sys::signal::Signal::SIGKILL);
    up.wait(Duration::from_secs(10));
    // The killed gateway's sandbox dies with it.
    wait_no_host_proc(&sleeper, Duration::from_secs(5));
    drop(up);

    let mut up = Up::start(&data, &cfg);
    let mut sse = up.client().events("t").expect("the conversation survives");
    let evs = sse.answers(1);
    assert_eq!(
        answers_of(&evs),
        vec![(format!("recovered-{m}\n"), true)],
        "{evs:#?}"
    );
    drop(sse);
    let recs = audit_records(&data.join("audit").join("audit.jsonl"));
    let verdicts: Vec<&str> = recs
        .iter()
        .filter(|r| r["kind"] == "message")
        .filter_map(|r| r["verdict"].as_str())
        .collect();
    assert_eq!(verdicts, vec!["accepted", "recovered"], "{recs:#?}");
    up.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(up.wait(Duration::from_secs(30)).success());
}

#[test]
fn sigterm_lets_the_running_turn_finish_and_leaves_nothing_running() {
    let dir = fresh_dir("sigterm");
    let data = dir.join("data");
    let cfg = plain_config(&dir);
    let m = random_hex(8);
    let sleeper = format!("sleep 2.{}", random_digits(6));

    let mut up = Up::start(&data, &cfg);
    // Sandboxes' command lines name their lease directories.
    let data_text = leases_of(&data).to_str().unwrap().to_string();
    let c = up.client();
    // The warm pool is sandboxes on the host (so the final check can fail).
    assert!(
        !host_procs(&data_text).is_empty(),
        "no sandbox of this gateway on the host"
    );
    assert_eq!(
        c.post("g", &format!("{sleeper}; echo graceful-{m}")).status,
        202
    );
    // A watcher stays connected, as the web page does.
    let mut sse = c.events("g").expect("events");
    wait_host_proc(&sleeper);
    up.signal(nix::sys::signal::Signal::SIGTERM);
    let evs = sse.answers(1);
    assert_eq!(answers_of(&evs), vec![(format!("graceful-{m}\n"), true)]);
    let status = up.wait(Duration::from_secs(30));
    assert!(
        status.success(),
        "{status:?}; stderr:\n{}",
        up.stderr.lock().unwrap()
    );
    assert!(up.stdout_lines().contains(&"moat: stopped".to_string()));
    drop(sse);
    let left = host_procs(&data_text);
    assert!(left.is_empty(), "left running: {left:?}");
    assert!(host_procs(&sleeper).is_empty());
    let recs = audit_records(&data.join("audit").join("audit.jsonl"));
    assert!(
        recs.iter()
            .any(|r| r["kind"] == "turn" && r["state"] == "done"),
        "{recs:#?}"
    );
}

/// A data directory below a directory only root may enter (mode 0700, as
/// `/root` is): moat up starts and answers, its sandboxes' files are under
/// the runtime directory, and the closed parent is left as it was.
#[test]
fn a_data_dir_under_a_closed_parent_starts_and_answers() {
    let dir = fresh_dir("closed");
    let parent = dir.join("parent");
    std::fs::create_dir_all(&parent).unwrap();
    std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o700)).unwrap();
    let data = parent.join("moat");
    let cfg = plain_config(&dir);
    let mut up = Up::start(&data, &cfg);
    let m = random_hex(8);
    let c = up.client();
    assert_eq!(c.post("t", &format!("echo closed-{m}; id -u")).status, 202);
    let mut sse = c.events("t").expect("events");
    let evs = sse.answers(1);
    assert_eq!(
        answers_of(&evs),
        vec![(format!("closed-{m}\n1000\n"), true)],
        "{evs:#?}; stderr:\n{}",
        up.stderr.lock().unwrap()
    );
    drop(sse);
    assert!(!data.join("leases").exists());
    assert_eq!(
        std::fs::metadata(&parent).unwrap().permissions().mode() & 0o7777,
        0o700
    );
    up.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(up.wait(Duration::from_secs(30)).success());
}

/// `moat chat` from a pipe: each line is a message and gets its answer, in
/// order, before the next is sent; a failing command says why.
#[test]
fn moat_chat_sends_each_line_and_prints_its_answer() {
    let dir = fresh_dir("chat");
    let data = dir.join("data");
    let cfg = plain_config(&dir);
    let mut up = Up::start(&data, &cfg);
    let m = random_hex(8);
    let mut chat = moat(&data)
        .args(["chat", "--url"])
        .arg(format!("http://{}", up.web))
        .args(["--conversation", "from-a-pipe"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting moat chat");
    {
        use std::io::Write;
        let mut input = chat.stdin.take().unwrap();
        writeln!(input, "echo first-{m}").unwrap();
        writeln!(input, "expr 6 \\* 7").unwrap();
        writeln!(input, "exit 3").unwrap();
    }
    let out = chat.wait_with_output().expect("moat chat ran");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first = stdout
        .find(&format!("first-{m}"))
        .unwrap_or_else(|| panic!("{stdout}"));
    let second = stdout.find("42").unwrap_or_else(|| panic!("{stdout}"));
    let third = stdout
        .find("moat: command exited with status 3")
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(
        first < second && second < third,
        "answers out of order: {stdout}"
    );
    // Three messages, three turns (one answer each, nothing merged).
    let recs = audit_records(&data.join("audit").join("audit.jsonl"));
    let turns = recs.iter().filter(|r| r["kind"] == "turn").count();
    assert_eq!(turns, 3, "{recs:#?}");
    up.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(up.wait(Duration::from_secs(30)).success());
}
