//! Message to first byte of answer through Discord (issue 15's goal: a
//! median of at most 20 ms with debounce 0).
//!
//! The gateway runs in this process (`server::serve`, as `moat up` runs it)
//! with the shell agent, bwrap sandboxes from a warm pool of 2, debounce 0,
//! connected to the fake Discord of tests/discord_fake (its per-channel
//! bucket off, so the fake never makes moat wait). Each sample: the fake
//! sends a `MESSAGE_CREATE` (a direct message `echo <n>`) on the Gateway;
//! timed from just before the fake queues it to the arrival at the fake of
//! the answer's `POST /channels/{id}/messages` (the first byte of the
//! answer; 👀 and "typing…" go out before it, as in a real turn). Before
//! each sample the bench waits until both runners are warm again.
//!
//! Discord has no inbound delivery to forge (moat opens the Gateway), so
//! there is no refusal rate to measure here.
//!
//! Prints a Markdown table (docs/BENCHMARKS.md). MOAT_BENCH_N sets the
//! number of samples (default 200).

#[path = "../tests/discord_fake/mod.rs"]
mod discord_fake;
#[path = "../tests/gwkit/mod.rs"]
mod gwkit;

use std::time::{Duration, Instant};

use discord_fake::*;
use gwkit::*;

const ALICE: &str = "4242";

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

fn main() {
    let n: usize = std::env::var("MOAT_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let fake = FakeDiscord::start();
    fake.state.lock().unwrap().unlimited = true;
    let toml = format!(
        "[web]\nlisten = \"127.0.0.1:0\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [discord]\nenabled = true\napi_url = \"http://{}/api/v10\"\ngateway_url = \"ws://{}\"\n\n\
         [pool]\nsize = 2\n\n[defaults]\ndebounce = \"0s\"\nrate = {{ user = \"100000/min\", channel = \"100000/min\" }}\n\n\
         [[channel]]\nplatform = \"discord\"\nid = \"dm\"\nusers = [\"{ALICE}\"]\n",
        fake.rest, fake.gateway
    );
    let gw = Gw::start_with(
        "bench-discord",
        &toml,
        vec![("DISCORD_BOT_TOKEN".into(), TOKEN.into())],
    );
    fake.wait_ready();
    let mut samples = Vec::with_capacity(n);
    // Two warm-up turns, not counted.
    for i in 0..n + 2 {
        gw.wait_pool_idle(2);
        let needle = format!("dcbench-{i}\n");
        let t0 = Instant::now();
        fake.dispatch(
            "MESSAGE_CREATE",
            message(DM, true, ALICE, &format!("echo dcbench-{i}"), false),
        );
        let deadline = t0 + WAIT;
        let at = loop {
            if let Some(c) = fake.posted_with(&needle).first() {
                break c.at;
            }
            assert!(Instant::now() < deadline, "no answer to message {i}");
            std::thread::sleep(Duration::from_micros(200));
        };
        if i >= 2 {
            samples.push(at.duration_since(t0));
        }
    }
    samples.sort();
    println!("\n### Discord: message to first byte of answer ({n} direct messages, warm pool of 2, debounce 0)\n");
    println!("| from the MESSAGE_CREATE to | median ms | p90 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|");
    println!(
        "| **the answer's `POST /channels/{{id}}/messages`** | {:.2} | {:.2} | {:.2} | {:.2} |",
        pct(&samples, 0.5),
        pct(&samples, 0.9),
        pct(&samples, 0.99),
        pct(&samples, 1.0)
    );
    let m = gw.metrics();
    let accepted = metric(&m, "moat_events_total{verdict=\"accepted\"}").unwrap_or(0.0);
    assert!(accepted >= (n + 2) as f64, "{m}");
    gw.stop();
}
