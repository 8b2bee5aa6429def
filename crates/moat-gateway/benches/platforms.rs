//! Telegram and WhatsApp through their webhooks (issue 15's goals: over
//! 5,000 forged deliveries refused per second while legitimate turns run,
//! and message to first byte of answer at a median of at most 20 ms with
//! debounce 0).
//!
//! The gateway runs in this process (`server::serve`, as `moat up` runs it)
//! with the shell agent, bwrap sandboxes from a warm pool of 2, debounce 0,
//! against the fake Bot API / Graph API of tests/telegram_kit and
//! tests/whatsapp_kit. Per platform, in one run:
//! - **latency**: a legitimate delivery (`echo <n>` from the allowed user,
//!   with the right secret token or signature), timed from just before the
//!   POST to the fake's receipt of the answer's `sendMessage` / `messages`
//!   call (the first byte of the answer). Before each sample the bench waits
//!   until both runners are warm again;
//! - **forged flood alone**: two client threads on keep-alive connections
//!   post a realistic delivery with a wrong secret token (Telegram) or a
//!   signature by another key (WhatsApp) for `FLOOD` seconds; every answer
//!   must be 401; refused per second;
//! - **latency under the flood**: the latency samples again while two flood
//!   threads post forged deliveries as fast as they can.
//!
//! The bench fails if a forged delivery is ever stored or answered.
//! Prints Markdown tables (docs/BENCHMARKS.md). MOAT_BENCH_N sets the number
//! of latency samples per phase (default 100).

#[path = "../tests/gwkit/mod.rs"]
mod gwkit;
#[path = "../tests/telegram_kit/mod.rs"]
mod telegram_kit;
#[path = "../tests/whatsapp_kit/mod.rs"]
mod whatsapp_kit;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use gwkit::*;
use serde_json::json;

/// Seconds of the forged flood alone.
const FLOOD: u64 = 5;

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// A bench configuration: the tests' own, with a warm pool of 2 and rate
/// limits out of the way.
fn tuned(toml: String) -> String {
    let t = toml
        .replace("[pool]\nsize = 1", "[pool]\nsize = 2")
        .replace(
            "debounce = \"0s\"",
            "debounce = \"0s\"\nrate = { user = \"1000000/min\", channel = \"1000000/min\" }",
        );
    assert!(t.contains("size = 2") && t.contains("1000000/min"), "{t}");
    t
}

/// Headers and body of one delivery.
type Delivery = (Vec<(String, String)>, String);
/// Makes a legitimate delivery of a text (its number makes it unique).
type Legit = Box<dyn Fn(u64, &str) -> Delivery + Send + Sync>;
/// When the fake received the answer holding a needle, if it did.
type Answered = Box<dyn Fn(&str) -> Option<Instant> + Send + Sync>;

/// One platform under test.
struct Target {
    name: &'static str,
    path: &'static str,
    /// Headers and body of a legitimate delivery of `text` (unique `n`).
    legit: Legit,
    /// Headers and body of a forged delivery.
    forged: Delivery,
    /// When the fake received the answer holding `needle`, if it did.
    answered: Answered,
}

fn post(addr: std::net::SocketAddr, path: &str, headers: &[(String, String)], body: &str) -> Resp {
    let h: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    request(addr, "POST", path, &h, Some(body))
}

fn latency(gw: &Gw, t: &Target, n: usize, first: u64) -> Vec<Duration> {
    let mut samples = Vec::with_capacity(n);
    for i in 0..n as u64 {
        gw.wait_pool_idle(2);
        let needle = format!("{}bench-{}", t.name, first + i);
        let (h, body) = (t.legit)(first + i, &format!("echo {needle}"));
        let t0 = Instant::now();
        let r = post(gw.web, t.path, &h, &body);
        assert_eq!(r.status, 200, "{}: {}", t.name, r.body);
        let deadline = t0 + Duration::from_secs(60);
        let at = loop {
            if let Some(at) = (t.answered)(&needle) {
                break at;
            }
            assert!(Instant::now() < deadline, "no answer to {needle}");
            std::thread::sleep(Duration::from_micros(200));
        };
        samples.push(at.duration_since(t0));
    }
    samples.sort();
    samples
}

/// Posts forged deliveries on a keep-alive connection until `stop`;
/// counts the 401s and panics on anything else.
fn flood(addr: std::net::SocketAddr, t: &Target, stop: &AtomicBool, refused: &AtomicU64) {
    let mut conn = Conn::connect(addr);
    let h: Vec<(&str, &str)> = t
        .forged
        .0
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    while !stop.load(Ordering::Relaxed) {
        let r = conn.request("POST", t.path, &h, Some(&t.forged.1));
        assert_eq!(
            r.status, 401,
            "{}: a forged delivery got {}",
            t.name, r.body
        );
        refused.fetch_add(1, Ordering::Relaxed);
    }
}

fn run(gw: &Gw, t: &Target, n: usize) {
    let warm = latency(gw, t, 2, 0);
    drop(warm);
    let quiet = latency(gw, t, n, 10);
    // The flood alone.
    let stop = AtomicBool::new(false);
    let refused = AtomicU64::new(0);
    let t0 = Instant::now();
    let web = gw.web;
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| flood(web, t, &stop, &refused));
        }
        std::thread::sleep(Duration::from_secs(FLOOD));
        stop.store(true, Ordering::Relaxed);
    });
    let alone = refused.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64();
    // Legitimate turns under two flooding threads.
    let stop = AtomicBool::new(false);
    let refused = AtomicU64::new(0);
    let t1 = Instant::now();
    let under = std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| flood(web, t, &stop, &refused));
        }
        let under = latency(gw, t, n, 10_000);
        stop.store(true, Ordering::Relaxed);
        under
    });
    let during = refused.load(Ordering::Relaxed) as f64 / t1.elapsed().as_secs_f64();
    println!(
        "\n### {}: webhook deliveries ({n} turns a phase, warm pool of 2, debounce 0)\n",
        t.name
    );
    println!("| phase | answer median ms | p90 ms | p99 ms | forged refused/s |");
    println!("|---|---|---|---|---|");
    println!(
        "| legitimate turns alone | {:.2} | {:.2} | {:.2} | - |",
        pct(&quiet, 0.5),
        pct(&quiet, 0.9),
        pct(&quiet, 0.99)
    );
    println!(
        "| legitimate turns under a forged flood (two client threads) | {:.2} | {:.2} | {:.2} | {:.0} |",
        pct(&under, 0.5),
        pct(&under, 0.9),
        pct(&under, 0.99),
        during
    );
    println!("| forged flood alone ({FLOOD} s, two client threads) | - | - | - | {alone:.0} |");
}

fn main() {
    let n: usize = std::env::var("MOAT_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);

    // Telegram, webhook mode.
    let tg = telegram_kit::FakeTelegram::start();
    let gw = Gw::start_with(
        "bench-telegram",
        &tuned(telegram_kit::config(&tg, "webhook")),
        telegram_kit::secrets(),
    );
    let tg_state = tg.state.clone();
    let target = Target {
        name: "telegram",
        path: "/telegram/webhook",
        legit: Box::new(|n, text| {
            let u = telegram_kit::update(
                1000 + n as i64,
                telegram_kit::ALICE,
                "private",
                telegram_kit::ALICE,
                json!({"text": text}),
            );
            (
                vec![
                    ("Content-Type".into(), "application/json".into()),
                    (
                        "X-Telegram-Bot-Api-Secret-Token".into(),
                        telegram_kit::HOOK_SECRET.into(),
                    ),
                ],
                u.to_string(),
            )
        }),
        forged: (
            vec![
                ("Content-Type".into(), "application/json".into()),
                (
                    "X-Telegram-Bot-Api-Secret-Token".into(),
                    "not-the-secret-0123456789".into(),
                ),
            ],
            telegram_kit::update(
                1,
                telegram_kit::ALICE,
                "private",
                telegram_kit::ALICE,
                json!({"text": "echo forged"}),
            )
            .to_string(),
        ),
        answered: Box::new(move |needle| {
            tg_state
                .lock()
                .unwrap()
                .calls
                .iter()
                .find(|c| c.method == "sendMessage" && c.ok && c.body.to_string().contains(needle))
                .map(|c| c.at)
        }),
    };
    run(&gw, &target, n);
    let m = gw.metrics();
    assert!(
        !tg.calls()
            .iter()
            .any(|c| c.body.to_string().contains("forged")),
        "a forged delivery was answered"
    );
    let stored = metric(&m, "moat_events_total{verdict=\"accepted\"}").unwrap_or(0.0);
    assert!(
        stored >= (2 * n + 2) as f64 && stored < (2 * n + 10) as f64,
        "{m}"
    );
    gw.stop();

    // WhatsApp.
    let wa = whatsapp_kit::FakeGraph::start();
    let gw = Gw::start_with(
        "bench-whatsapp",
        &tuned(whatsapp_kit::config(&wa)),
        whatsapp_kit::secrets(),
    );
    let wa_state = wa.state.clone();
    let forged_body = whatsapp_kit::delivery(
        "wamid.forged",
        whatsapp_kit::ALICE,
        json!({"type": "text", "text": {"body": "echo forged"}}),
    );
    let target = Target {
        name: "whatsapp",
        path: "/whatsapp/webhook",
        legit: Box::new(|n, text| {
            let body = whatsapp_kit::delivery(
                &format!("wamid.bench{n}"),
                whatsapp_kit::ALICE,
                json!({"type": "text", "text": {"body": text}}),
            );
            let sig = moat_chat::whatsapp::sign(whatsapp_kit::APP_SECRET, body.as_bytes());
            (
                vec![
                    ("Content-Type".into(), "application/json".into()),
                    ("X-Hub-Signature-256".into(), sig),
                ],
                body,
            )
        }),
        forged: (
            vec![
                ("Content-Type".into(), "application/json".into()),
                (
                    "X-Hub-Signature-256".into(),
                    moat_chat::whatsapp::sign("another-apps-secret", forged_body.as_bytes()),
                ),
            ],
            forged_body,
        ),
        answered: Box::new(move |needle| {
            wa_state
                .lock()
                .unwrap()
                .calls
                .iter()
                .find(|c| {
                    c.ok && c.body["type"] == json!("text") && c.body.to_string().contains(needle)
                })
                .map(|c| c.at)
        }),
    };
    run(&gw, &target, n);
    let m = gw.metrics();
    assert!(
        wa.texts_to(whatsapp_kit::ALICE)
            .iter()
            .all(|t| !t.contains("forged")),
        "a forged delivery was answered"
    );
    let stored = metric(&m, "moat_events_total{verdict=\"accepted\"}").unwrap_or(0.0);
    assert!(
        stored >= (2 * n + 2) as f64 && stored < (2 * n + 10) as f64,
        "{m}"
    );
    gw.stop();
}
