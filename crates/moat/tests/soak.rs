//! The chaos and soak run (docs/soak.md): `moat up` on a data directory that
//! lives on a small ext4 filesystem the test makes (a loop-mounted image in
//! its scratch directory), driven for `SOAK_SECONDS` (default 180) with mixed
//! traffic — web chat conversations and fake-Slack threads on the shell
//! agent, one fake-Slack channel on the built-in agent against a fake
//! Anthropic upstream that fails one call in five and has outages — while a
//! chaos thread SIGKILLs sandbox processes, SIGKILLs and restarts the
//! gateway, fills the data filesystem (and later frees it) and turns the LLM
//! upstream off for a while.
//!
//! Checked at the end: every message the gateway acknowledged (web `202` or
//! `200 duplicate`, Slack `200`) got exactly one answer (an error answer
//! counts), none got two; after SIGTERM nothing of this gateway is left:
//! no process in its cgroups or in the sandbox uids it used, no cgroup of its
//! scope, no mount below its data or runtime directory, no new network
//! namespace, and the loop filesystem unmounts; the last gateway's RSS grew
//! less than 10% between its warm-up point and the end of the traffic.
//!
//! Ignored by default (it needs root, a loop device and minutes); CI runs it
//! with `cargo test -p moat --test soak -- --ignored` (scripts/soak).
//!
//! Must never: talk to anything but 127.0.0.1, signal a process that is not
//! this gateway or one of its sandboxes, or leave the mount, the gateway or a
//! sandbox behind (the loop filesystem is unmounted even when a check fails).

#[path = "../../moat-gateway/tests/gwkit/mod.rs"]
mod gwkit;
mod llmkit;
#[path = "../../moat-gateway/tests/slack_kit/mod.rs"]
mod slack_kit;
mod soakkit;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use soakkit::*;

const WEB_CONVERSATIONS: usize = 4;
const SLACK_SHELL_THREADS: usize = 2;
const SLACK_LLM_THREADS: usize = 1;
const SHELL_CHANNEL: &str = "C0SOAKSH1";
const LLM_CHANNEL: &str = "C0SOAKLM1";
/// How long a sender waits for the answer to its message.
const ANSWER_WAIT: Duration = Duration::from_secs(120);

fn soak_seconds() -> u64 {
    std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(180)
}

/// Counts for the summary line.
#[derive(Default)]
struct Counts {
    web_accepted: AtomicU64,
    web_unacked: AtomicU64,
    slack_accepted: AtomicU64,
    slack_unacked: AtomicU64,
    sandbox_kills: AtomicU64,
    gateway_kills: AtomicU64,
    disk_fills: AtomicU64,
    llm_outages: AtomicU64,
    llm_failed_calls: AtomicU64,
}

/// One web conversation's record: messages acknowledged (their markers),
/// messages never acknowledged, and the answers its watcher saw.
#[derive(Default)]
struct WebConv {
    accepted: Vec<String>,
    unacked: Vec<String>,
    answers: Vec<(u64, String, bool)>,
}

#[test]
#[ignore = "the chaos and soak run: needs root and a loop device; scripts/soak runs it"]
fn soak_under_chaos_loses_nothing_and_leaves_nothing() {
    let secs = soak_seconds();
    let total = Duration::from_secs(secs);
    let dir = gwkit::fresh_dir("soak");
    eprintln!("soak: {secs} s in {}", dir.display());

    // The data filesystem: 256 MiB of ext4, mounted for this run only.
    let fs = LoopFs::create(&dir, 256).expect("making the loop filesystem");
    let data = fs.mnt.join("data");
    let runtime = dir.join("run");
    let before = Snapshot::take();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let fake_slack = rt.block_on(slack_kit::FakeSlack::start());
    let keys = llmkit::Keys::new();
    let llm_down = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let llm = {
        let down = llm_down.clone();
        let counts = counts.clone();
        let n = AtomicU64::new(0);
        llmkit::FakeLlm::start(
            &keys.anthropic,
            &keys.openai,
            Arc::new(move |_req, _step| {
                let i = n.fetch_add(1, Ordering::SeqCst);
                if down.load(Ordering::SeqCst) || i % 5 == 4 {
                    counts.llm_failed_calls.fetch_add(1, Ordering::SeqCst);
                    llmkit::Reply::Fail(if i.is_multiple_of(2) { 500 } else { 529 })
                } else {
                    llmkit::Reply::text(format!("fake model answer {i}"))
                }
            }),
        )
    };
    let secrets = dir.join("secrets");
    write_secret_file(
        &secrets,
        &format!(
            "SLACK_BOT_TOKEN={}\nSLACK_SIGNING_SECRET={}\nANTHROPIC_API_KEY={}\n",
            slack_kit::BOT_TOKEN,
            slack_kit::SIGNING_SECRET,
            keys.anthropic
        ),
    );
    let cfg = dir.join("moat.toml");
    std::fs::write(&cfg, config(&fake_slack.api_url(), &llm.url())).unwrap();

    let gw = Arc::new(GatewayHandle::new(Launch {
        data: data.clone(),
        runtime: runtime.clone(),
        config: cfg.clone(),
        secrets: secrets.clone(),
    }));
    gw.start();
    let scope = leases_scope(&data, &runtime);
    let leases = moat_sandbox::leases_dir(&moat_sandbox::EngineConfig {
        data_dir: data.clone(),
        runtime_dir: runtime.clone(),
        init_path: gwkit::init_path(),
    });

    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    let watch_stop = Arc::new(AtomicBool::new(false));
    let mut watchers = Vec::new();

    // Web conversations: one message at a time, each waits for its answer.
    let web: Arc<Mutex<HashMap<String, WebConv>>> = Arc::default();
    for i in 0..WEB_CONVERSATIONS {
        let conv = format!("soak{i}");
        web.lock().unwrap().insert(conv.clone(), WebConv::default());
        let (gw2, web2, stop2) = (gw.clone(), web.clone(), watch_stop.clone());
        watchers.push(std::thread::spawn(move || {
            watch_web(&gw2, &conv, &web2, &stop2)
        }));
        let conv = format!("soak{i}");
        let (gw, web, stop, counts) = (gw.clone(), web.clone(), stop.clone(), counts.clone());
        threads.push(std::thread::spawn(move || {
            drive_web(&gw, &conv, &web, &stop, &counts)
        }));
    }

    // Slack threads: shell ones and the LLM one; messages acknowledged by ts.
    let slack_acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let slack_unacked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    for (i, channel) in std::iter::repeat_n(SHELL_CHANNEL, SLACK_SHELL_THREADS)
        .chain(std::iter::repeat_n(LLM_CHANNEL, SLACK_LLM_THREADS))
        .enumerate()
    {
        let s = SlackDriver {
            gw: gw.clone(),
            fake: fake_slack.clone(),
            rt: rt.handle().clone(),
            channel: channel.to_string(),
            user: format!("U0SOAK{i:03}"),
            acked: slack_acked.clone(),
            unacked: slack_unacked.clone(),
            counts: counts.clone(),
            stop: stop.clone(),
        };
        threads.push(std::thread::spawn(move || s.run()));
    }

    // RSS of each gateway, sampled every second: (generation, since its start, kB).
    let rss: Arc<Mutex<Vec<(u64, Duration, u64)>>> = Arc::default();
    {
        let (gw, rss, stop) = (gw.clone(), rss.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                if let Some((generation, pid, started)) = gw.current() {
                    if let Some(kb) = vm_rss_kb(pid) {
                        rss.lock()
                            .unwrap()
                            .push((generation, started.elapsed(), kb));
                    }
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        }));
    }

    // Chaos. The gateway is killed only in the first half, so the last one
    // runs through the second half (its RSS is the one judged).
    let seen_uids: Arc<Mutex<HashSet<u32>>> = Arc::default();
    let gateway_kills_until = total / 2;
    let chaos = {
        let (gw, stop, counts) = (gw.clone(), stop.clone(), counts.clone());
        let (scope, fs_mnt, down) = (scope.clone(), fs.mnt.clone(), llm_down.clone());
        let seen_uids = seen_uids.clone();
        std::thread::spawn(move || {
            let plan = ["sandbox", "gateway", "fill", "sandbox", "llm", "sandbox"];
            let mut step = 0usize;
            let every = Duration::from_millis(if secs >= 600 { 6000 } else { 4000 });
            while t0.elapsed() + Duration::from_secs(15) < total {
                std::thread::sleep(every);
                for (_, uid) in sandbox_procs(&scope) {
                    seen_uids.lock().unwrap().insert(uid);
                }
                match plan[step % plan.len()] {
                    "sandbox" => {
                        if let Some(pid) = pick_sandbox_proc(&scope, step) {
                            let _ = nix::sys::signal::kill(
                                nix::unistd::Pid::from_raw(pid as i32),
                                nix::sys::signal::Signal::SIGKILL,
                            );
                            counts.sandbox_kills.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    "fill" => {
                        if fill_up(&fs_mnt.join("filler"), Duration::from_secs(4)) {
                            counts.disk_fills.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    "llm" => {
                        down.store(true, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_secs(5));
                        down.store(false, Ordering::SeqCst);
                        counts.llm_outages.fetch_add(1, Ordering::SeqCst);
                    }
                    _ => {
                        if t0.elapsed() < gateway_kills_until {
                            gw.kill_and_restart(Duration::from_millis(
                                300 + (step as u64 % 7) * 150,
                            ));
                            counts.gateway_kills.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
                step += 1;
            }
            let _ = stop;
        })
    };

    while t0.elapsed() < total {
        std::thread::sleep(Duration::from_millis(200));
    }
    chaos.join().expect("the chaos thread");
    stop.store(true, Ordering::SeqCst);
    let traffic_end = Instant::now();
    for t in threads {
        t.join().expect("a traffic thread");
    }
    // Answers that come late (a second answer, say) still count.
    std::thread::sleep(Duration::from_secs(3));
    watch_stop.store(true, Ordering::SeqCst);
    for t in watchers {
        t.join().expect("a web watcher");
    }
    eprintln!(
        "soak: traffic stopped; senders drained in {:?}",
        traffic_end.elapsed()
    );
    let last_generation = gw.current().map(|c| c.0).unwrap_or(0);

    // Stop the gateway as an operator does.
    let stopped = gw.terminate(Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(2));
    let after = Snapshot::take();
    let mut failures = Vec::new();
    if let Err(e) = stopped {
        failures.push(e);
    }

    // --- Invariant: every acknowledged message answered exactly once.
    let web = web.lock().unwrap();
    let (mut web_answers, mut web_markers) = (0usize, HashMap::<String, usize>::new());
    for (conv, c) in web.iter() {
        web_answers += c.answers.len();
        let lo = c.accepted.len();
        let hi = lo + c.unacked.len();
        if c.answers.len() < lo || c.answers.len() > hi {
            failures.push(format!(
                "web conversation {conv}: {} messages acknowledged ({} never), {} answers: {:?}",
                lo,
                c.unacked.len(),
                c.answers.len(),
                c.answers
            ));
        }
        for (_, text, _) in &c.answers {
            for m in c.accepted.iter().chain(&c.unacked) {
                if text.contains(m.as_str()) {
                    *web_markers.entry(m.clone()).or_default() += 1;
                }
            }
        }
    }
    for (m, n) in &web_markers {
        if *n > 1 {
            failures.push(format!("web message {m} answered {n} times"));
        }
    }
    let calls = fake_slack.calls();
    let finals = |ts: &str| {
        calls
            .iter()
            .filter(|c| {
                // What the message shows: a reaction Slack refused as
                // already there (a delivery again after a restart) is not
                // a second answer.
                c.method == "reactions.add"
                    && c.ok()
                    && c.arg("timestamp") == Some(ts)
                    && matches!(c.arg("name"), Some("white_check_mark") | Some("x"))
            })
            .count()
    };
    let acked = slack_acked.lock().unwrap();
    for (channel, ts) in acked.iter() {
        let n = finals(ts);
        if n != 1 {
            // What the fake saw of this message: its thread's calls and the
            // reactions on it.
            let seen: Vec<_> = calls
                .iter()
                .filter(|c| {
                    c.arg("timestamp") == Some(ts.as_str())
                        || c.arg("thread_ts") == Some(ts.as_str())
                })
                .cloned()
                .collect();
            failures.push(format!(
                "Slack message {channel}/{ts}: {n} final answers; the fake saw:\n{}",
                slack_kit::summary(&seen)
            ));
        }
    }
    for (channel, ts) in slack_unacked.lock().unwrap().iter() {
        let n = finals(ts);
        if n > 1 {
            failures.push(format!(
                "Slack message {channel}/{ts} (never acknowledged): {n} final answers"
            ));
        }
    }
    let slack_failed = acked
        .iter()
        .filter(|(_, ts)| {
            calls.iter().any(|c| {
                c.method == "reactions.add"
                    && c.arg("timestamp") == Some(ts)
                    && c.arg("name") == Some("x")
            })
        })
        .count();

    // --- Invariant: nothing left behind.
    failures.extend(leftovers(
        &before,
        &after,
        &scope,
        &leases,
        &data,
        &fs.mnt,
        &seen_uids.lock().unwrap(),
    ));

    // --- Invariant: the last gateway's memory is steady.
    let rss = rss.lock().unwrap();
    let last: Vec<(Duration, u64)> = rss
        .iter()
        .filter(|(g, _, _)| *g == last_generation)
        .map(|(_, at, kb)| (*at, *kb))
        .collect();
    let warm_at = (total / 2 / 5).max(Duration::from_secs(20));
    let warm = last.iter().find(|(at, _)| *at >= warm_at).map(|x| x.1);
    let end = last.last().map(|x| x.1);
    let growth = match (warm, end) {
        (Some(w), Some(e)) if w > 0 => (e as f64 - w as f64) / w as f64 * 100.0,
        _ => {
            failures.push(format!(
                "no RSS samples of the last gateway after {warm_at:?}: {last:?}"
            ));
            0.0
        }
    };
    if growth >= 10.0 {
        failures.push(format!(
            "the last gateway's RSS grew {growth:.1}% ({warm:?} kB at {warm_at:?} → {end:?} kB): {last:?}"
        ));
    }

    if !failures.is_empty() {
        // A post-mortem copy of the store and the audit log (the filesystem
        // goes away with the image).
        let keep = dir.join("post-mortem");
        let _ = std::process::Command::new("cp")
            .arg("-a")
            .arg(&data)
            .arg(&keep)
            .status();
        failures.push(format!(
            "the data directory is copied to {}",
            keep.display()
        ));
    }
    let unmounted = fs.unmount();
    if let Err(e) = unmounted {
        failures.push(format!("the data filesystem did not unmount: {e}"));
    }
    let summary = json!({
        "seconds": secs,
        "web_messages": counts.web_accepted.load(Ordering::SeqCst),
        "web_unacknowledged": counts.web_unacked.load(Ordering::SeqCst),
        "web_answers": web_answers,
        "slack_messages": counts.slack_accepted.load(Ordering::SeqCst),
        "slack_unacknowledged": counts.slack_unacked.load(Ordering::SeqCst),
        "slack_failed_answers": slack_failed,
        "sandbox_kills": counts.sandbox_kills.load(Ordering::SeqCst),
        "gateway_kills": counts.gateway_kills.load(Ordering::SeqCst),
        "disk_fills": counts.disk_fills.load(Ordering::SeqCst),
        "llm_outages": counts.llm_outages.load(Ordering::SeqCst),
        "llm_calls": llm.requests().len(),
        "llm_failed_calls": counts.llm_failed_calls.load(Ordering::SeqCst),
        "rss_kb_warm": warm,
        "rss_kb_end": end,
        "rss_growth_percent": (growth * 10.0).round() / 10.0,
        "rss_samples_last_gateway": last.len(),
    });
    println!("soak: {summary}");
    eprintln!("soak: {summary}");
    assert!(
        failures.is_empty(),
        "{} invariant(s) failed:\n{}\ngateway stderr (tail):\n{}",
        failures.len(),
        failures.join("\n"),
        gw.stderr_tail(60)
    );
}

fn config(slack_api: &str, llm_url: &str) -> String {
    format!(
        r#"[web]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"

[slack]
mode = "events"
listen = "127.0.0.1:0"
api_url = "{slack_api}"

[llm]
anthropic_url = "{llm_url}"

[pool]
size = 3

[defaults]
users = ["*"]
debounce = "0ms"
rate = {{ user = "100000/min", channel = "100000/min" }}
limits = {{ timeout = "60s" }}

[[channel]]
platform = "web"
id = "*"
agent = "shell"

[[channel]]
platform = "slack"
id = "{SHELL_CHANNEL}"
agent = "shell"

[[channel]]
platform = "slack"
id = "{LLM_CHANNEL}"
agent = "builtin"
provider = "anthropic"
max_steps = 3
"#
    )
}

/// Sends messages to web conversation `conv` one at a time until `stop`:
/// each is posted (again, with the same client id, until acknowledged), then
/// its answer awaited.
fn drive_web(
    gw: &GatewayHandle,
    conv: &str,
    web: &Mutex<HashMap<String, WebConv>>,
    stop: &AtomicBool,
    counts: &Counts,
) {
    let mut seq = 0u64;
    while !stop.load(Ordering::SeqCst) {
        seq += 1;
        let marker = format!("{conv}-{seq}-{}", gwkit::random_hex(3));
        // The command's text never contains its output (`$((6*7))`).
        let pause = if seq.is_multiple_of(3) {
            "sleep 1.5; "
        } else {
            ""
        };
        let text = format!("{pause}echo ok-{marker}-$((6*7))");
        let client_id = gwkit::random_hex(8);
        let body = json!({"text": text, "client_id": client_id}).to_string();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut acked = false;
        while Instant::now() < deadline {
            if let Some(addr) = gw.web() {
                match http(
                    addr,
                    "POST",
                    &format!("/api/conversations/{conv}/messages"),
                    &[("Content-Type", "application/json")],
                    &body,
                ) {
                    Some((202, _)) | Some((200, _)) => {
                        acked = true;
                        break;
                    }
                    _ => {}
                }
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        let mark = format!("ok-{marker}-42");
        let want = {
            let mut w = web.lock().unwrap();
            let c = w.get_mut(conv).unwrap();
            if acked {
                c.accepted.push(mark);
                counts.web_accepted.fetch_add(1, Ordering::SeqCst);
            } else {
                c.unacked.push(mark);
                counts.web_unacked.fetch_add(1, Ordering::SeqCst);
                continue;
            }
            c.accepted.len()
        };
        let until = Instant::now() + ANSWER_WAIT;
        while Instant::now() < until {
            if web.lock().unwrap()[conv].answers.len() >= want {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Keeps one event stream of `conv` open per gateway generation and records
/// every answer it shows, until `stop`. A stream that ends while the same
/// gateway still runs is reopened and its replay (the recent events) skipped.
fn watch_web(
    gw: &GatewayHandle,
    conv: &str,
    web: &Mutex<HashMap<String, WebConv>>,
    stop: &AtomicBool,
) {
    let mut seen: (u64, usize) = (u64::MAX, 0);
    // Turns whose answer was recorded: after a restart the stream replays
    // the stored history, and an answer delivered again shows the same turn.
    let mut turns = HashSet::new();
    while !stop.load(Ordering::SeqCst) {
        let Some((generation, addr)) = gw.web_generation() else {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        if seen.0 != generation {
            seen = (generation, 0);
        }
        let skip = seen.1;
        let mut n = 0usize;
        let path = format!("/api/conversations/{conv}/events");
        let opened = sse(
            addr,
            &path,
            &mut |ev| {
                n += 1;
                let new_turn = ev["turn"].as_i64().is_none_or(|t| turns.insert(t));
                if n > skip && ev["type"] == "answer" && new_turn {
                    web.lock().unwrap().get_mut(conv).unwrap().answers.push((
                        generation,
                        ev["text"].as_str().unwrap_or("").to_string(),
                        ev["ok"].as_bool().unwrap_or(false),
                    ));
                }
            },
            &|| stop.load(Ordering::SeqCst),
        );
        seen.1 = seen.1.max(n);
        if !opened {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// One Slack thread's sender.
struct SlackDriver {
    gw: Arc<GatewayHandle>,
    fake: slack_kit::FakeSlack,
    rt: tokio::runtime::Handle,
    channel: String,
    user: String,
    acked: Arc<Mutex<Vec<(String, String)>>>,
    unacked: Arc<Mutex<Vec<(String, String)>>>,
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
}

impl SlackDriver {
    fn run(self) {
        let mut thread: Option<String> = None;
        let mut seq = 0u64;
        let _ = &self.rt;
        while !self.stop.load(Ordering::SeqCst) {
            seq += 1;
            // A new thread every fifth message, replies in it otherwise.
            if seq % 5 == 1 {
                thread = None;
            }
            let ts = slack_kit::new_ts();
            let text = if self.channel == LLM_CHANNEL {
                format!("say something, {seq}")
            } else if seq.is_multiple_of(4) {
                format!("sleep 1.2; echo slack-{seq}-$((6*7))")
            } else {
                format!("echo slack-{seq}-$((6*7))")
            };
            let event =
                slack_kit::mention(&self.channel, &self.user, &ts, thread.as_deref(), &text);
            let event_id = slack_kit::new_event_id();
            // Kept in the fake's thread once, as Slack keeps it; the delivery
            // is retried (same event id) until acknowledged, as Slack retries.
            let body = self.fake.callback(&event_id, event);
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut ok = false;
            while Instant::now() < deadline {
                if let Some(addr) = self.gw.slack() {
                    let now = slack_kit::now_secs();
                    let headers = slack_kit::signed_headers(&body, now);
                    let h: Vec<(&str, &str)> = headers
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .chain([("Content-Type", "application/json")])
                        .collect();
                    if let Some((200, _)) = http(addr, "POST", "/slack/events", &h, &body) {
                        ok = true;
                        break;
                    }
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            if thread.is_none() {
                thread = Some(ts.clone());
            }
            if !ok {
                self.unacked
                    .lock()
                    .unwrap()
                    .push((self.channel.clone(), ts));
                self.counts.slack_unacked.fetch_add(1, Ordering::SeqCst);
                continue;
            }
            self.acked
                .lock()
                .unwrap()
                .push((self.channel.clone(), ts.clone()));
            self.counts.slack_accepted.fetch_add(1, Ordering::SeqCst);
            let until = Instant::now() + ANSWER_WAIT;
            while Instant::now() < until {
                let done = self.fake.calls().iter().any(|c| {
                    c.method == "reactions.add"
                        && c.arg("timestamp") == Some(ts.as_str())
                        && matches!(c.arg("name"), Some("white_check_mark") | Some("x"))
                });
                if done {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn write_secret_file(p: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(p, text).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap();
}
