//! Audit log speed: appends per second (one thread, and two threads sharing
//! one log), `verify` and `tail` on the result. Prints numbers; asserts none.
//!
//! `cargo bench -p moat-audit` (set `MOAT_BENCH_DIR` to measure on another
//! filesystem than the temporary directory's).

use std::sync::Arc;
use std::time::Instant;

use moat_audit::AuditLog;
use serde_json::json;

/// A record shaped like the egress door's `connect` records.
fn fields(i: u64) -> serde_json::Value {
    json!({
        "lease": "lease-7f3a9c",
        "host": "api.anthropic.com",
        "port": 443,
        "address": "160.79.104.10:443",
        "verdict": "allowed",
        "reason": null,
        "bytes_up": 1834 + i,
        "bytes_down": 90211,
        "duration_ms": 412,
    })
}

fn main() {
    let base = std::env::var_os("MOAT_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::tempdir_in(&base).expect("temporary directory");
    let path = dir.path().join("audit.jsonl");
    let n: u64 = 20_000;

    let log = Arc::new(AuditLog::open(&path).expect("open"));
    let t = Instant::now();
    for i in 0..n {
        log.append("connect", fields(i)).expect("append");
    }
    let one = t.elapsed();
    println!(
        "append, 1 thread:   {n} records in {:.3} s = {:.0} appends/s ({:.1} µs each)",
        one.as_secs_f64(),
        n as f64 / one.as_secs_f64(),
        one.as_secs_f64() * 1e6 / n as f64
    );

    let t = Instant::now();
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let log = log.clone();
            std::thread::spawn(move || {
                for i in 0..n / 2 {
                    log.append("connect", fields(i)).expect("append");
                }
            })
        })
        .collect();
    for th in threads {
        th.join().expect("thread");
    }
    let two = t.elapsed();
    println!(
        "append, 2 threads:  {n} records in {:.3} s = {:.0} appends/s",
        two.as_secs_f64(),
        n as f64 / two.as_secs_f64()
    );

    let size = std::fs::metadata(&path).expect("size").len();
    let t = Instant::now();
    let r = moat_audit::verify(&path).expect("verify");
    let v = t.elapsed();
    println!(
        "verify:             {} records ({:.1} MB) in {:.3} s = {:.0} records/s",
        r.records,
        size as f64 / 1e6,
        v.as_secs_f64(),
        r.records as f64 / v.as_secs_f64()
    );
    let t = Instant::now();
    let last = moat_audit::tail(&path, 20).expect("tail");
    println!(
        "tail -n 20:         {} records in {:.3} ms",
        last.len(),
        t.elapsed().as_secs_f64() * 1e3
    );
    println!("filesystem of {}", base.display());
}
