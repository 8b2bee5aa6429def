//! Every gateway configuration the docs ship starts: `moat up --config` with
//! each file under docs/examples and each ```toml block of the docs pages
//! that is a whole configuration (every block of docs/configuration.md; a
//! block elsewhere when it has a `[[channel]]` with a platform and parses on
//! its own), reaches ready (`/healthz`, the web page, Slack's
//! `url_verification` or its Socket Mode connection), and stops cleanly on
//! SIGTERM (exit 0, "moat: stopped"). The shipped docs/examples/moat.toml is
//! also talked to: each of its channels answers, from its own backend
//! (bwrap and gVisor side by side).
//!
//! What the test changes in a configuration, and only that: every `listen`
//! becomes `127.0.0.1:0` (free loopback ports), the data directory is a
//! scratch one (`MOAT_DATA_DIR` wins over `gateway.data_dir`), and
//! `[slack] api_url` points at a fake Slack on 127.0.0.1 (slack_kit), a
//! `persona` file becomes a made-up one in the scratch directory, and a
//! `[store] url = "postgres://..."` becomes a fresh database of the tests'
//! throwaway PostgreSQL cluster on 127.0.0.1 (moat-testpg; its password in
//! `MOAT_STORE_PASSWORD`).
//! Secrets come from a test secrets file of made-up values. Real bwrap (or
//! gVisor) sandboxes fill the pools.
//!
//! Must never: talk to anything but 127.0.0.1, or leave `moat up` running.

#[path = "../../moat-gateway/tests/gwkit/mod.rs"]
mod gwkit;
#[path = "../../moat-gateway/tests/slack_kit/mod.rs"]
mod slack_kit;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use moat_policy::gateway::GatewayConfig;
use serde_json::json;

fn docs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs")
}

/// (where it comes from, its text): every example file, then every whole
/// configuration among the pages' ```toml blocks.
fn examples() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(docs().join("examples"))
        .expect("docs/examples")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    for f in files {
        let name = format!("docs/examples/{}", f.file_name().unwrap().to_string_lossy());
        out.push((name, std::fs::read_to_string(&f).unwrap()));
    }
    let mut pages = Vec::new();
    for dir in [docs(), docs().join("agents")] {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "md") {
                pages.push(p);
            }
        }
    }
    pages.sort();
    for page in pages {
        let text = std::fs::read_to_string(&page).unwrap();
        let rel = page.strip_prefix(docs()).unwrap().display().to_string();
        let whole_page = rel == "configuration.md";
        let mut rest = text.as_str();
        let mut n = 0;
        while let Some(start) = rest.find("\n```toml\n").map(|i| i + 1) {
            let body = &rest[start + 8..];
            let end = body.find("```").expect("an unclosed ```toml block");
            let block = &body[..end];
            rest = &body[end + 3..];
            let is_config = whole_page
                || (block.contains("[[channel]]")
                    && block.contains("platform")
                    && GatewayConfig::from_toml(block).is_ok());
            if is_config {
                out.push((format!("docs/{rel} block {n}"), block.to_string()));
            } else {
                eprintln!("docs/{rel} block {n}: a fragment, not a whole configuration");
            }
            n += 1;
        }
    }
    out
}

/// The configuration as the test runs it (see the module comment).
fn localised(toml: &str, slack_api: &str, persona: &Path) -> String {
    let mut out = String::new();
    let is_key = |t: &str, key: &str| {
        t.strip_prefix(key)
            .is_some_and(|r| r.trim_start().starts_with('='))
    };
    for line in toml.lines() {
        let t = line.trim_start();
        if is_key(t, "listen") {
            out.push_str("listen = \"127.0.0.1:0\"\n");
            continue;
        }
        if is_key(t, "persona") {
            out.push_str(&format!("persona = \"{}\"\n", persona.display()));
            continue;
        }
        if is_key(t, "url") && t.contains("postgres://") {
            let db = moat_testpg::cluster().fresh();
            out.push_str(&format!("url = \"{}\"\n", db.url));
            continue;
        }
        out.push_str(line);
        out.push('\n');
        if t.starts_with("[slack]") {
            out.push_str(&format!("api_url = \"{slack_api}\"\n"));
        }
    }
    if !toml.contains("[slack]") {
        out.push_str(&format!("\n[slack]\napi_url = \"{slack_api}\"\n"));
    }
    out
}

/// What `moat up` printed before it was ready.
#[derive(Default)]
struct Ready {
    web: Option<SocketAddr>,
    slack: Option<SocketAddr>,
    admin: Option<SocketAddr>,
}

fn addr_after(line: &str, prefix: &str, suffix: &str) -> Option<SocketAddr> {
    line.strip_prefix(prefix)?
        .strip_suffix(suffix)?
        .parse()
        .ok()
}

fn check_one(
    name: &str,
    toml: &str,
    fake: &slack_kit::FakeSlack,
    rt: &tokio::runtime::Runtime,
    secrets: &Path,
) {
    let dir = gwkit::fresh_dir("example");
    let cfg_path = dir.join("moat.toml");
    let persona = dir.join("persona.md");
    std::fs::write(&persona, "You are a made-up persona for the docs test.\n").unwrap();
    let text = localised(toml, &fake.api_url(), &persona);
    std::fs::write(&cfg_path, &text).unwrap();
    let cfg = GatewayConfig::from_toml(&text)
        .unwrap_or_else(|e| panic!("{name}: the localised configuration is refused: {e}"));
    let socket_mode = cfg.slack.mode == moat_policy::gateway::SlackMode::Socket;
    // Socket Mode: accept the gateway's WebSocket and say hello, as Slack does.
    let connected = Arc::new(Mutex::new(false));
    let acceptor = socket_mode.then(|| {
        let sock = rt.block_on(fake.socket());
        let connected = connected.clone();
        rt.spawn(async move {
            let (mut ws, _) = sock.accept().await;
            let hello = json!({"type": "hello", "num_connections": 1}).to_string();
            let _ = ws
                .send(tokio_tungstenite::tungstenite::Message::Text(hello.into()))
                .await;
            *connected.lock().unwrap() = true;
            // Held open until the gateway closes it at shutdown.
            use futures_util::StreamExt;
            while let Some(Ok(_)) = ws.next().await {}
        })
    });
    let data = dir.join("data");
    let mut child = Command::new(env!("CARGO_BIN_EXE_moat"))
        .env("MOAT_STORE_PASSWORD", moat_testpg::cluster().password())
        .env("MOAT_DATA_DIR", &data)
        .env("MOAT_RUNTIME_DIR", gwkit::scratch().join("run"))
        .env("MOAT_INIT", gwkit::init_path())
        .env_remove("MOAT_SECRETS_FILE")
        .env_remove("MOAT_LOG")
        .env_remove("ANTHROPIC_API_KEY")
        .env_remove("OPENAI_API_KEY")
        .args(["up", "--config"])
        .arg(&cfg_path)
        .arg("--secrets")
        .arg(secrets)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting moat up");
    let (tx, lines) = channel();
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
    let fail = |child: &mut std::process::Child, what: String| -> ! {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "{name}: {what}\nconfiguration:\n{text}\nstderr:\n{}",
            stderr.lock().unwrap()
        );
    };
    let mut ready = Ready::default();
    let deadline = Instant::now() + Duration::from_secs(120);
    while ready.admin.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = lines.recv_timeout(left) else {
            fail(&mut child, "moat up did not become ready".into());
        };
        if let Some(a) = addr_after(&line, "moat: web chat on http://", "/") {
            ready.web = Some(a);
        }
        if let Some(a) = addr_after(&line, "moat: Slack events on http://", "/slack/events") {
            ready.slack = Some(a);
        }
        if let Some(a) = addr_after(&line, "moat: metrics on http://", "/metrics") {
            ready.admin = Some(a);
        }
    }
    let admin = ready.admin.unwrap();
    let h = gwkit::request(admin, "GET", "/healthz", &[], None);
    if (h.status, h.body.as_str()) != (200, "ok\n") {
        fail(&mut child, format!("/healthz answered {h:?}"));
    }
    if let Some(web) = ready.web {
        let p = gwkit::request(web, "GET", "/", &[], None);
        if p.status != 200 || !p.body.contains("<html") {
            fail(&mut child, format!("the web page: {}", p.status));
        }
    }
    if let Some(events) = ready.slack.or(ready
        .web
        .filter(|_| cfg.slack.mode == moat_policy::gateway::SlackMode::Events))
    {
        let challenge = gwkit::random_hex(16);
        let body = json!({"type": "url_verification", "challenge": challenge}).to_string();
        let r = rt.block_on(slack_kit::post_signed(events, &body));
        if r.status != 200 || r.body != challenge {
            fail(&mut child, format!("Slack's url_verification: {r:?}"));
        }
    }
    if name == "docs/examples/moat.toml" {
        if let Err(e) = talk_to_each_channel(&ready, fake, rt) {
            fail(&mut child, e);
        }
    }
    if socket_mode {
        let until = Instant::now() + Duration::from_secs(30);
        while !*connected.lock().unwrap() {
            if Instant::now() > until {
                fail(&mut child, "no Socket Mode connection".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let until = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > until {
            fail(
                &mut child,
                "moat up did not stop within 60 s of SIGTERM".into(),
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let rest: Vec<String> = lines.try_iter().collect();
    // The reader thread may still hold the last line: give it a moment.
    let rest = if rest.iter().any(|l| l == "moat: stopped") {
        rest
    } else {
        let mut r = rest;
        r.extend(lines.recv_timeout(Duration::from_secs(5)));
        r
    };
    assert!(
        status.success() && rest.iter().any(|l| l == "moat: stopped"),
        "{name}: moat up ended with {status}, printing {rest:?}; stderr:\n{}",
        stderr.lock().unwrap()
    );
    if let Some(a) = acceptor {
        a.abort();
    }
    eprintln!("{name}: started, ready and stopped cleanly");
}

/// The shipped example, as a user would use it: a message to each of its
/// channels (the engineering channel, the public help channel, any other
/// Slack channel, the web chat) is answered, and each answer comes from the
/// channel's own backend: the help channel's from gVisor (its kernel
/// release is gVisor's, not the host's), the others' from bwrap (the
/// host's), all in one `moat up`.
fn talk_to_each_channel(
    ready: &Ready,
    fake: &slack_kit::FakeSlack,
    rt: &tokio::runtime::Runtime,
) -> Result<(), String> {
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_err(|e| e.to_string())?
        .trim()
        .to_string();
    let events = ready.slack.ok_or("the example serves Slack events")?;
    let web = ready.web.ok_or("the example serves the web chat")?;
    // (channel, user, tag, gVisor?)
    let slack = [
        ("C0123ENG", "U01ALICE", "eng", false),
        ("C0456HELP", "U09GUEST", "help", true),
        ("C0777RAND", "U02BOB", "any", false),
    ];
    let kernel_of = |text: &str, tag: &str| -> Result<String, String> {
        text.split_once(&format!("{tag}-42 kernel="))
            .map(|(_, k)| k.split_whitespace().next().unwrap_or("").to_string())
            .ok_or_else(|| format!("{tag}: no kernel in the answer {text:?}"))
    };
    let check =
        |tag: &str, kernel: &str, gvisor: bool| -> Result<(), String> {
            match (gvisor, kernel == host) {
                (true, false) | (false, true) => {
                    eprintln!(
                        "  {tag}: answered on {} (kernel {kernel})",
                        if gvisor { "gVisor" } else { "bwrap" }
                    );
                    Ok(())
                }
                _ => {
                    Err(format!(
                "{tag}: the answer came from kernel {kernel:?} (host {host:?}); expected {}",
                if gvisor { "gVisor's, not the host's" } else { "the host's (bwrap)" }
            ))
                }
            }
        };
    for (ch, user, tag, gvisor) in slack {
        let ts = slack_kit::new_ts();
        let cmd = format!("echo {tag}-$((6*7)) kernel=$(uname -r)");
        let body = fake.callback(
            &slack_kit::new_event_id(),
            slack_kit::mention(ch, user, &ts, None, &cmd),
        );
        let r = rt.block_on(slack_kit::post_signed(events, &body));
        if r.status != 200 {
            return Err(format!("{ch}: the event was answered {}", r.status));
        }
        let post = rt.block_on(fake.wait_post(ch, &ts, &format!("{tag}-42")));
        check(tag, &kernel_of(post.text(), tag)?, gvisor)?;
    }
    let client = gwkit::Client {
        addr: web,
        token: None,
    };
    let r = client.post("docs-example", "echo web-$((6*7)) kernel=$(uname -r)");
    if r.status / 100 != 2 {
        return Err(format!("the web chat refused the message: {}", r.status));
    }
    // The stream replays the conversation from its start.
    let mut sse = client
        .events("docs-example")
        .map_err(|r| format!("the web chat's events: {}", r.status))?;
    let evs = sse.answers(1);
    let text = gwkit::answers_of(&evs)
        .into_iter()
        .map(|(t, _)| t)
        .collect::<Vec<_>>()
        .join("\n");
    check("web", &kernel_of(&text, "web")?, false)
}

#[test]
fn every_example_configuration_in_the_docs_starts_and_stops_cleanly() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let fake = rt.block_on(slack_kit::FakeSlack::start());
    // Made-up secrets (slack_kit's), in a secrets file as an operator keeps it.
    let dir = gwkit::fresh_dir("example-secrets");
    let secrets = dir.join("secrets");
    std::fs::write(
        &secrets,
        format!(
            "SLACK_BOT_TOKEN={}\nSLACK_SIGNING_SECRET={}\nSLACK_APP_TOKEN={}\n\
             MOAT_WEB_TOKENS=alice:0123456789abcdef0123\n\
             ANTHROPIC_API_KEY=sk-ant-made-up-for-the-docs-test\n\
             OPENAI_API_KEY=sk-made-up-for-the-docs-test\n\
             AMP_API_KEY=sgamp_made_up_for_the_docs_test\n",
            slack_kit::BOT_TOKEN,
            slack_kit::SIGNING_SECRET,
            slack_kit::APP_TOKEN
        ),
    )
    .unwrap();
    std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o600)).unwrap();
    let all = examples();
    assert!(
        all.iter().any(|(n, _)| n == "docs/examples/moat.toml"),
        "the example file is missing: {:?}",
        all.iter().map(|(n, _)| n).collect::<Vec<_>>()
    );
    assert!(all.len() >= 5, "only {} configurations found", all.len());
    for (name, toml) in &all {
        check_one(name, toml, &fake, &rt, &secrets);
    }
}
