//! How many forged Slack requests one core rejects per second.
//!
//! A forged request here has a fresh timestamp (so the HMAC must be computed)
//! and a well-formed but wrong `v0=` signature: the most expensive request to
//! refuse. Measured single-threaded, for `verify_request` (the key prepared
//! on each call, as the function is documented) and for a `Verifier` made
//! once, over bodies of typical Events API sizes. Also a valid request and a
//! stale one for comparison. Run: `cargo bench -p moat-chat --bench verify`
//! (`MOAT_BENCH_QUICK=1` for a short run).

use std::hint::black_box;
use std::time::{Duration, Instant};

use http::HeaderMap;
use moat_chat::slack::{sign, verify_request, Verifier, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use moat_creds::Secret;

const NOW: i64 = 1_700_000_000;

fn body(len: usize) -> Vec<u8> {
    let head = br#"{"token":"x","team_id":"T0TEAM01","api_app_id":"A0APP001","event":{"type":"app_mention","user":"U0ALICE1","text":""#;
    let tail = br#"","ts":"1700000100.000200","channel":"C0GENERAL"},"type":"event_callback","event_id":"Ev0EXAMPLE1","event_time":1700000100}"#;
    let mut b = head.to_vec();
    b.resize(len.saturating_sub(tail.len()).max(head.len()), b'a');
    b.extend_from_slice(tail);
    b
}

fn headers(ts: i64, sig: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(TIMESTAMP_HEADER, ts.to_string().parse().unwrap());
    h.insert(SIGNATURE_HEADER, sig.parse().unwrap());
    h
}

/// Runs `f` repeatedly for about `dur`; returns calls per second.
fn rate(dur: Duration, mut f: impl FnMut() -> bool) -> f64 {
    // Warm up.
    for _ in 0..1000 {
        black_box(f());
    }
    let start = Instant::now();
    let mut n: u64 = 0;
    while start.elapsed() < dur {
        for _ in 0..256 {
            black_box(f());
        }
        n += 256;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let quick = std::env::var_os("MOAT_BENCH_QUICK").is_some();
    let dur = Duration::from_millis(if quick { 200 } else { 2000 });
    let secret = Secret::new("8f742231b10e8888abcd99yyyzzz85a5");
    let verifier = Verifier::new(&secret);
    let forged_sig = format!("v0={}", "0123456789abcdef".repeat(4));

    println!("| body | request | `verify_request` /s | `Verifier::verify` /s | µs per check |");
    println!("|---:|---|---:|---:|---:|");
    for len in [256usize, 1500, 16 * 1024] {
        let b = body(len);
        let cases = [
            (
                "forged (fresh ts, wrong sig)",
                headers(NOW, &forged_sig),
                false,
            ),
            ("valid", headers(NOW, &sign(&secret, NOW, &b)), true),
            ("stale (10 min old)", headers(NOW - 600, &forged_sig), false),
        ];
        for (name, h, ok) in cases {
            assert_eq!(verify_request(&secret, &h, &b, NOW).is_ok(), ok, "{name}");
            let f = rate(dur, || {
                verify_request(&secret, black_box(&h), black_box(&b), NOW).is_ok()
            });
            let v = rate(dur, || {
                verifier.verify(black_box(&h), black_box(&b), NOW).is_ok()
            });
            println!(
                "| {} B | {name} | {:.0} | {:.0} | {:.2} |",
                b.len(),
                f,
                v,
                1e6 / f
            );
        }
    }
}
