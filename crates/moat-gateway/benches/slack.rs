//! The Slack front-end under a forged-event flood (`scripts/bench`, or
//! `cargo bench -p moat-gateway --bench slack`; needs root for the
//! sandboxes). One run, one machine, each number next to its baseline:
//! - the rate at which `POST /slack/events` refuses forged events (signed
//!   with the wrong secret, so every one costs a full HMAC over its body),
//!   sent over several kept-alive connections at once;
//! - the latency of legitimate turns (a signed mention of the bot whose text
//!   is an `echo`, answered by the shell agent in a warm pooled bwrap
//!   sandbox, with the thread read, 👀 and the status message first), from
//!   the request to the answer's `chat.postMessage` reaching the fake Slack,
//!   with and without the flood, in alternating rounds.
//!
//! The gateway is `moat_gateway::server::serve` on a runtime of its own, as
//! `moat up` runs it; the fake Slack (tests/slack_kit) and the flooding
//! client each run on their own thread, on the same 2 cores. Every forged
//! request must get 401 and none may be stored or answered, and every
//! legitimate one must be answered and counted `accepted` in `/metrics`: the
//! bench panics otherwise, so a number never comes from requests the gateway
//! did not really judge. Must never reach anything but servers it starts
//! itself. Prints Markdown.

#[path = "../tests/slack_kit/mod.rs"]
mod slack_kit;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use slack_kit::*;

const ALICE: &str = "U0ALICE1";
const CHANNEL: &str = "C0BENCH";
/// Concurrent kept-alive connections of the flood.
const FLOOD_CONNS: usize = 8;
/// Threads whose CPU time is reported (names as /proc shows them).
const GW_THREAD: &str = "moat-gw";
const FLOOD_THREAD: &str = "forger";

fn percentiles(v: &[Duration]) -> [f64; 3] {
    let mut v = v.to_vec();
    v.sort();
    let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)].as_secs_f64() * 1e3;
    [at(0.5), at(0.9), at(0.99)]
}

/// On-CPU nanoseconds of this process's threads whose name is `name`.
fn cpu_ns(name: &str) -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    let mut total = 0;
    for t in tasks.flatten() {
        let named =
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim_end() == name);
        if !named {
            continue;
        }
        if let Some(ns) = std::fs::read_to_string(t.path().join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        {
            total += ns;
        }
    }
    total
}

/// The flood: `FLOOD_CONNS` connections on one client thread, each sending
/// the same forged request again as soon as its 401 arrives.
struct Flood {
    stop: Arc<AtomicBool>,
    refused: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

fn forged_request(addr: SocketAddr) -> Vec<u8> {
    let body = callback(
        "Ev0FORGED0001",
        mention(CHANNEL, ALICE, &new_ts(), None, "echo forged-$((6*7))"),
    );
    let now = now_secs();
    // A well-formed signature made with the wrong secret: the gateway must
    // compute the HMAC over the whole body to refuse it.
    let sig = moat_chat::slack::sign(
        &moat_creds::Secret::new("not-the-signing-secret"),
        now,
        body.as_bytes(),
    );
    let headers = vec![
        ("X-Slack-Request-Timestamp".to_string(), now.to_string()),
        ("X-Slack-Signature".to_string(), sig),
    ];
    Conn::request_bytes(&addr.to_string(), "/slack/events", &headers, Some(&body))
}

impl Flood {
    /// `rate`: forged events per second in all (spread over the
    /// connections), or `None` for as fast as the client can send them.
    fn start(addr: SocketAddr, rate: Option<f64>) -> Flood {
        let stop = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(AtomicU64::new(0));
        let (s, r) = (stop.clone(), refused.clone());
        let thread = std::thread::Builder::new()
            .name(FLOOD_THREAD.into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let req = Arc::new(forged_request(addr));
                    let mut tasks = Vec::new();
                    for _ in 0..FLOOD_CONNS {
                        let (s, r, req) = (s.clone(), r.clone(), req.clone());
                        tasks.push(tokio::spawn(async move {
                            let mut c = Conn::open(addr).await;
                            // Each connection sends its share of the rate;
                            // a late tick is caught up, so the average holds.
                            let mut tick = rate.map(|r| {
                                tokio::time::interval(Duration::from_secs_f64(
                                    FLOOD_CONNS as f64 / r,
                                ))
                            });
                            while !s.load(Ordering::Relaxed) {
                                if let Some(t) = tick.as_mut() {
                                    t.tick().await;
                                }
                                let resp = c.send_raw(&req).await.expect("the flood's connection");
                                assert_eq!(
                                    resp.status, 401,
                                    "a forged event was not refused: {resp:?}"
                                );
                                r.fetch_add(1, Ordering::Relaxed);
                            }
                        }));
                    }
                    for t in tasks {
                        t.await.expect("a flood connection failed");
                    }
                });
            })
            .unwrap();
        Flood {
            stop,
            refused,
            thread,
        }
    }

    fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the flood thread panicked");
        self.refused.load(Ordering::Relaxed)
    }
}

/// One legitimate turn: (time to Slack's 200, time to the answer posted).
async fn legit_turn(fake: &FakeSlack, addr: SocketAddr, i: usize) -> (Duration, Duration) {
    let ts = new_ts();
    let (cmd, marker) = marked(&format!("L{i}"));
    let body = fake.callback(&new_event_id(), mention(CHANNEL, ALICE, &ts, None, &cmd));
    let headers = signed_headers(&body, now_secs());
    let t0 = Instant::now();
    let r = post_event(addr, &body, &headers).await;
    let acked = t0.elapsed();
    assert_eq!(r.status, 200, "a legitimate event was refused: {r:?}");
    let answer = fake.wait_post(CHANNEL, &ts, &marker).await;
    (acked, answer.at.duration_since(t0))
}

#[derive(Default)]
struct Phase {
    acks: Vec<Duration>,
    answers: Vec<Duration>,
    /// Forged events refused during the phase, and the phase's length.
    refused: u64,
    secs: f64,
    gw_cpu_ns: u64,
    flood_cpu_ns: u64,
}

impl Phase {
    fn new() -> Phase {
        Phase::default()
    }
}

fn main() {
    let quick = std::env::var("MOAT_BENCH_QUICK").is_ok_and(|v| !v.is_empty());
    let (rounds, turns, alone_secs) = if quick { (1, 10, 1) } else { (4, 50, 5) };

    // The fake Slack on its own thread.
    let fake_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("fake-slack")
        .enable_all()
        .build()
        .unwrap();
    let fake = fake_rt.block_on(FakeSlack::start());
    // The gateway on a runtime of its own, as `moat up` runs it (one worker per core).
    let gw_rt = tokio::runtime::Builder::new_multi_thread()
        .thread_name(GW_THREAD)
        .enable_all()
        .build()
        .unwrap();
    let data = data_dir("bench");
    let rest = format!(
        r#"
[pool]
size = 2

[defaults]
debounce = "0s"
rate = {{ user = "1000/sec", channel = "1000/sec" }}

[[channel]]
platform = "slack"
id = "{CHANNEL}"
users = ["{ALICE}"]
"#
    );
    let toml = config(&fake, &data, Mode::Events, &rest);
    let gw = gw_rt.block_on(Running::start(&toml, &data));
    let addr = gw.events();

    // Warm-up: the pool's runners, the store, the connections to Slack.
    for i in 0..5 {
        fake_rt.block_on(legit_turn(&fake, addr, 1_000_000 + i));
    }

    // Alternating rounds: no flood, a flood paced at the goal's 5,000
    // forged events/s, and a flood as fast as the client can send.
    let floods: [(&str, Option<f64>); 3] = [
        ("no flood", None),
        ("forged flood paced at 5,000/s", Some(5000.0)),
        ("forged flood, as fast as the client sends", None),
    ];
    let mut phases: Vec<Phase> = floods.iter().map(|_| Phase::new()).collect();
    let mut n = 0;
    for _ in 0..rounds {
        for (k, (_, pace)) in floods.iter().enumerate() {
            let phase = &mut phases[k];
            let f = (k > 0).then(|| Flood::start(addr, *pace));
            if f.is_some() {
                // Let the flood reach its pace before measuring.
                std::thread::sleep(Duration::from_millis(500));
            }
            let (c0, g0, f0, t0) = (
                f.as_ref().map_or(0, Flood::refused),
                cpu_ns(GW_THREAD),
                cpu_ns(FLOOD_THREAD),
                Instant::now(),
            );
            for _ in 0..turns {
                let (ack, ans) = fake_rt.block_on(legit_turn(&fake, addr, n));
                n += 1;
                phase.acks.push(ack);
                phase.answers.push(ans);
            }
            phase.secs += t0.elapsed().as_secs_f64();
            phase.gw_cpu_ns += cpu_ns(GW_THREAD) - g0;
            phase.flood_cpu_ns += cpu_ns(FLOOD_THREAD) - f0;
            if let Some(f) = f {
                phase.refused += f.refused() - c0;
                f.finish();
            }
        }
    }

    // The flood alone, for the endpoint's ceiling on this machine.
    let f = Flood::start(addr, None);
    std::thread::sleep(Duration::from_millis(500));
    let mut alone = Phase::new();
    let (c0, g0, f0, t0) = (
        f.refused(),
        cpu_ns(GW_THREAD),
        cpu_ns(FLOOD_THREAD),
        Instant::now(),
    );
    std::thread::sleep(Duration::from_secs(alone_secs));
    alone.refused = f.refused() - c0;
    alone.secs = t0.elapsed().as_secs_f64();
    alone.gw_cpu_ns = cpu_ns(GW_THREAD) - g0;
    alone.flood_cpu_ns = cpu_ns(FLOOD_THREAD) - f0;
    f.finish();

    // Checked, not assumed: every forged request was refused (the flood
    // asserts each 401) and counted, none stored or answered; every
    // legitimate one accepted and answered.
    let forged_total = fake_rt.block_on(events_total(gw.bound.admin, "forged"));
    let accepted = fake_rt.block_on(events_total(gw.bound.admin, "accepted"));
    assert_eq!(accepted, n as u64 + 5, "legitimate events accepted");
    assert_eq!(
        gw.stored_count(),
        n + 5,
        "only legitimate events are stored"
    );
    assert!(
        !fake.calls().iter().any(|c| c.text().contains("forged-42")),
        "a forged event was answered"
    );
    let measured: u64 = phases.iter().map(|p| p.refused).sum::<u64>() + alone.refused;
    assert!(forged_total >= measured, "{forged_total} < {measured}");
    gw_rt.block_on(gw.stop());

    let core = |ns: u64, secs: f64| format!("{:.0}%", ns as f64 / 1e9 / secs * 100.0);
    println!(
        "### Slack events endpoint: forged events and legitimate turns ({rounds} rounds of {turns} turns per phase, alternating; {FLOOD_CONNS} flood connections)\n"
    );
    println!("| phase | legit turns | ack median ms | ack p99 | answer median ms | answer p90 | answer p99 | forged refused/s | gateway CPU | flood client CPU |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let base = percentiles(&phases[0].answers);
    let mut ratios = Vec::new();
    for (k, p) in phases.iter().enumerate() {
        let [a50, a90, a99] = percentiles(&p.answers);
        let [k50, _, k99] = percentiles(&p.acks);
        let (rate, client) = if k == 0 {
            ("-".to_string(), "-".to_string())
        } else {
            (
                format!("{:.0}", p.refused as f64 / p.secs),
                core(p.flood_cpu_ns, p.secs),
            )
        };
        println!(
            "| {} | {} | {k50:.2} | {k99:.2} | {a50:.1} | {a90:.1} | {a99:.1} | {rate} | {} | {client} |",
            floods[k].0,
            p.answers.len(),
            core(p.gw_cpu_ns, p.secs),
        );
        ratios.push((a50 / base[0], a99 / base[2], p.refused as f64 / p.secs));
    }
    println!(
        "| forged flood alone ({:.1} s) | 0 | - | - | - | - | - | {:.0} | {} | {} |",
        alone.secs,
        alone.refused as f64 / alone.secs,
        core(alone.gw_cpu_ns, alone.secs),
        core(alone.flood_cpu_ns, alone.secs),
    );
    println!();
    for (k, (m, p99, rate)) in ratios.iter().enumerate().skip(1) {
        println!(
            "- {}: {rate:.0} forged events/s refused while legitimate turns ran; their answer latency **{m:.2}×** (median) and **{p99:.2}×** (p99) the latency without a flood.",
            floods[k].0
        );
    }
    println!(
        "- forged flood alone: {:.0} forged events/s refused, at **{:.1} µs** of the gateway's CPU each.",
        alone.refused as f64 / alone.secs,
        alone.gw_cpu_ns as f64 / 1e3 / alone.refused.max(1) as f64,
    );
    let top = ratios[2].2;
    println!(
        "\nRefusal rate with legitimate turns running: **{top:.0}/s**; goal over 5,000/s: **{}**. Forged events refused in all: {forged_total}, every one 401, none stored or answered. CPU is the share of one core used by the gateway's threads (not its sandboxes' processes) and by the flood's client thread.",
        if top > 5000.0 { "met" } else { "not met" },
    );
}
