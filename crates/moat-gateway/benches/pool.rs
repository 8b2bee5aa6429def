//! The elastic pool benchmark (`scripts/bench`, or `cargo bench -p
//! moat-gateway --bench pool`; root). One run, one machine, prints Markdown
//! (docs/BENCHMARKS.md):
//! - the time for a pool at `min = 2` to grow to 50 runners when 50
//!   requests come at once (from the first request to the 50th runner lent),
//!   against building the same 48 runners one after another in this run;
//! - both without a door (no network) and with one (an allowed domain: a
//!   network namespace and the door's listeners per runner, as in the
//!   gateway).
//!
//! Real bwrap sandboxes in a scratch directory under /tmp; nothing asserted.

#[path = "../tests/gwkit/mod.rs"]
mod gwkit;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moat_gateway::pool::{Bounds, LeaseFactory, Pool, RunnerFactory};
use moat_policy::{BackendKind, SandboxPolicy};
use moat_sandbox::{Engine, EngineConfig};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn factory(
    engine: &Arc<Engine>,
    policy: &SandboxPolicy,
    rt: &tokio::runtime::Runtime,
) -> LeaseFactory {
    LeaseFactory {
        engine: engine.clone(),
        policy: policy.clone(),
        run_as: None,
        extras: Default::default(),
        runtime: rt.handle().clone(),
        audit: Arc::new(moat_egress::MemoryAudit::default()),
        prefix: "bench".into(),
        counter: AtomicU64::new(0),
        ipc: None,
    }
}

/// From 50 requests at once on a pool at min 2 to 50 runners lent.
fn grow(rt: &tokio::runtime::Runtime, f: LeaseFactory, to: usize) -> Duration {
    rt.block_on(async move {
        let p = Pool::elastic(
            Arc::new(f),
            Bounds {
                min: 2,
                max: to,
                max_waiters: 0,
                shrink_after: Duration::from_secs(3600),
            },
        )
        .await
        .expect("pool");
        let t = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..to {
            let p = p.clone();
            tasks.push(tokio::spawn(async move { p.acquire(|_| {}).await }));
        }
        let mut held = Vec::new();
        for task in tasks {
            held.push(task.await.expect("task").expect("a runner"));
        }
        let d = t.elapsed();
        drop(held);
        p.close();
        while p.stats().size > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        d
    })
}

/// `n` runners built one after another (then destroyed).
fn sequential(f: &LeaseFactory, n: usize) -> Duration {
    let t = Instant::now();
    let mut built = Vec::new();
    for _ in 0..n {
        built.push(f.build().expect("a runner"));
    }
    let d = t.elapsed();
    drop(built);
    d
}

fn main() {
    let quick = std::env::var("MOAT_BENCH_QUICK").is_ok_and(|v| !v.is_empty());
    let runs = if quick { 1 } else { 3 };
    let to = 50;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let engine = Arc::new(
        Engine::new(
            EngineConfig {
                data_dir: gwkit::scratch().join("data"),
                runtime_dir: gwkit::scratch().join("run"),
                init_path: gwkit::init_path(),
            },
            BackendKind::Bwrap,
        )
        .expect("engine"),
    );
    let plain = SandboxPolicy::default();
    let mut with_door = SandboxPolicy::default();
    with_door.network.allow =
        vec![moat_policy::network::parse_allow_entry("example.com").expect("an allow entry")];
    println!(
        "\n## Elastic pool: growing from 2 to {to} (`crates/moat-gateway/benches/pool.rs`), median of {runs}\n"
    );
    println!("| runners | grow 2 → {to} ({to} requests at once) | the same {} built one after another | ratio |", to - 2);
    println!("|---|---|---|---|");
    for (name, policy) in [
        ("bwrap, no network", &plain),
        ("bwrap, with a door", &with_door),
    ] {
        let mut g = Vec::new();
        let mut s = Vec::new();
        for _ in 0..runs {
            g.push(grow(&rt, factory(&engine, policy, &rt), to));
            s.push(sequential(&factory(&engine, policy, &rt), to - 2));
        }
        let (g, s) = (median(g), median(s));
        println!(
            "| {name} | {:.0} ms | {:.0} ms | {:.2} |",
            g.as_secs_f64() * 1000.0,
            s.as_secs_f64() * 1000.0,
            g.as_secs_f64() / s.as_secs_f64()
        );
    }
    let _ = std::fs::remove_dir_all(gwkit::scratch());
}
