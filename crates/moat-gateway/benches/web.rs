//! Message to first byte of answer through the web chat (issue 5's goal:
//! under 20 ms at the median, under 100 ms at p99).
//!
//! The gateway runs in this process (`server::serve`, as `moat up` runs it)
//! with the shell agent, bwrap sandboxes from a warm pool of 2, debounce 0
//! and rate limits too high to bite. One conversation; its event stream is
//! open for the whole run. Each sample: POST `echo <n>` on a kept-alive
//! connection, then read the event stream until the first `text` event (the
//! first byte of the answer) and on until the `answer` event. Timed from
//! just before the POST is written. Before each sample the bench waits until
//! both runners are warm again (the "warm pool" case); a second series sends
//! the next message as soon as the previous answer arrives.
//!
//! A third series runs the **embedded default** (`moat up` with no
//! configuration: `EMBEDDED_DEFAULT_TOML` with its two listeners moved to
//! free ports, nothing else changed: its debounce, its pool of 2, its rate
//! limit of 20 messages a minute per user, which the series stays under by
//! sending one message every 3.1 s). MOAT_BENCH_EMBEDDED_ONLY=1 runs that
//! series alone; MOAT_BENCH_EMBEDDED_N sets its samples (default 50).
//!
//! Prints Markdown tables (docs/BENCHMARKS.md). MOAT_BENCH_QUICK=1: a smoke
//! run; MOAT_BENCH_N sets the number of samples (default 300).

#[path = "../tests/gwkit/mod.rs"]
mod gwkit;

use std::time::{Duration, Instant};

use gwkit::*;
use serde_json::json;

struct Sample {
    accepted: Duration,
    first_byte: Duration,
    answer: Duration,
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

fn row(name: &str, mut v: Vec<Duration>) -> String {
    v.sort();
    format!(
        "| {name} | {:.2} | {:.2} | {:.2} | {:.2} |",
        pct(&v, 0.5),
        pct(&v, 0.9),
        pct(&v, 0.99),
        pct(&v, 1.0)
    )
}

/// One message, timed.
fn sample(gw: &Gw, conn: &mut Conn, sse: &mut Sse, n: usize) -> Sample {
    sample_on(gw, conn, sse, n, "bench")
}

/// One message to conversation `thread`, timed.
fn sample_on(gw: &Gw, conn: &mut Conn, sse: &mut Sse, n: usize, thread: &str) -> Sample {
    let body = json!({ "text": format!("echo {n}") }).to_string();
    let t0 = Instant::now();
    let r = conn.request(
        "POST",
        &format!("/api/conversations/{thread}/messages"),
        &[("Content-Type", "application/json")],
        Some(&body),
    );
    let accepted = t0.elapsed();
    assert_eq!(r.status, 202, "{r:?}");
    let mut first_byte = None;
    loop {
        let ev = sse
            .next(WAIT)
            .unwrap_or_else(|| panic!("no answer to message {n}; pool {:?}", gw.gauges()));
        match kind(&ev) {
            "text" if first_byte.is_none() => {
                first_byte = Some(t0.elapsed());
                assert_eq!(ev["text"], format!("{n}\n"), "the first byte of answer {n}");
            }
            "answer" => {
                assert_eq!(ev["text"], format!("{n}\n"));
                assert_eq!(ev["ok"], true);
                return Sample {
                    accepted,
                    first_byte: first_byte.expect("a text event before the answer"),
                    answer: t0.elapsed(),
                };
            }
            "notice" => eprintln!("notice during sample {n}: {}", ev["text"]),
            _ => {}
        }
    }
}

fn series(
    gw: &Gw,
    conn: &mut Conn,
    sse: &mut Sse,
    start: usize,
    n: usize,
    warm: bool,
) -> Vec<Sample> {
    (start..start + n)
        .map(|i| {
            if warm {
                gw.wait_pool_idle(2);
            }
            sample(gw, conn, sse, i)
        })
        .collect()
}

fn table(title: &str, s: &[Sample]) {
    println!("\n### {title}\n");
    println!("| from the POST to | median ms | p90 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|");
    println!(
        "{}",
        row(
            "`202 Accepted` (stored, audited, queued)",
            s.iter().map(|x| x.accepted).collect()
        )
    );
    println!(
        "{}",
        row(
            "**first byte of the answer** (first `text` event)",
            s.iter().map(|x| x.first_byte).collect()
        )
    );
    println!(
        "{}",
        row("the `answer` event", s.iter().map(|x| x.answer).collect())
    );
}

/// The embedded default, paced under its own rate limit: message to first
/// byte of answer as a new user of `moat up` sees it.
fn embedded(n: usize) {
    let toml = moat_policy::gateway::EMBEDDED_DEFAULT_TOML
        .replace("127.0.0.1:8080", "127.0.0.1:0")
        .replace("127.0.0.1:9090", "127.0.0.1:0");
    let gw = Gw::start("bench-embedded", &toml);
    let mut conn = Conn::connect(gw.web);
    let r = conn.request(
        "POST",
        "/api/conversations/embedded/messages",
        &[("Content-Type", "application/json")],
        Some(r#"{"text":"true"}"#),
    );
    assert_eq!(r.status, 202, "{r:?}");
    let mut sse = gw
        .client(None)
        .events("embedded")
        .expect("the event stream");
    sse.answers(1);
    let pace = Duration::from_millis(3100);
    let mut last = Instant::now();
    let mut samples = Vec::new();
    for i in 0..n {
        std::thread::sleep(pace.saturating_sub(last.elapsed()));
        gw.wait_pool_idle(2);
        last = Instant::now();
        samples.push(sample_on(&gw, &mut conn, &mut sse, 20000 + i, "embedded"));
    }
    table(
        &format!(
            "Embedded default (`moat up` without a configuration): {n} messages, one every 3.1 s"
        ),
        &samples,
    );
    drop(sse);
    gw.stop();
}

fn main() {
    if std::env::var("MOAT_BENCH_EMBEDDED_ONLY").is_ok_and(|v| !v.is_empty()) {
        let n = std::env::var("MOAT_BENCH_EMBEDDED_N")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(50);
        embedded(n);
        return;
    }
    let quick = std::env::var("MOAT_BENCH_QUICK").is_ok_and(|v| !v.is_empty());
    let n: usize = std::env::var("MOAT_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 50 } else { 300 });
    let warmup = if quick { 5 } else { 30 };
    let gw = Gw::start(
        "bench",
        &web_config(
            2,
            "",
            "users = [\"*\"]\ndebounce = \"0ms\"\n\
             rate = { user = \"1000000/sec\", channel = \"1000000/sec\" }",
        ),
    );
    let mut conn = Conn::connect(gw.web);
    // The conversation exists from its first message on; watch it from then.
    let r = conn.request(
        "POST",
        "/api/conversations/bench/messages",
        &[("Content-Type", "application/json")],
        Some(r#"{"text":"true"}"#),
    );
    assert_eq!(r.status, 202, "{r:?}");
    let mut sse = gw.client(None).events("bench").expect("the event stream");
    sse.answers(1);

    series(&gw, &mut conn, &mut sse, 0, warmup, true);
    let warm = series(&gw, &mut conn, &mut sse, 1000, n, true);
    let back_to_back = series(&gw, &mut conn, &mut sse, 10000, n, false);

    println!(
        "\n## Gateway: message to first byte of answer (`crates/moat-gateway/benches/web.rs`)"
    );
    table(
        &format!("Web chat, shell agent `echo`, warm pool of 2, debounce 0: {n} messages after {warmup} warm-up"),
        &warm,
    );
    table(
        &format!(
            "The same, each message sent as soon as the previous answer arrived ({n} messages)"
        ),
        &back_to_back,
    );
    let t = gw.metrics();
    println!(
        "\nTurns: {} ok, {} failed (from `/metrics`).",
        metric(&t, "moat_turns_total{result=\"ok\"}").unwrap_or(-1.0),
        metric(&t, "moat_turns_total{result=\"failed\"}").unwrap_or(-1.0)
    );
    drop(sse);
    gw.stop();
    embedded(if quick { 5 } else { 50 });
}
