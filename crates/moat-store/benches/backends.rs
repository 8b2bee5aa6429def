//! The store's share of answering a message, on SQLite and on PostgreSQL in
//! the same run (docs/BENCHMARKS.md, "Store: SQLite and PostgreSQL").
//!
//! One "message" is what the gateway asks of the store for one answered
//! chat message: `insert_message` (the durable inbox), `start_turn` and
//! `finish_turn` (done). THREADS threads send MESSAGES messages each, over
//! CONVERSATIONS conversations (a thread's conversations are its own, as a
//! node's conversations are: no two turns of one conversation at once).
//! Per message the time from the insert to the finished turn; overall the
//! messages per second.
//!
//! Backends: SQLite on a file with the default durability (a commit reaches
//! the WAL before it returns, fsync at checkpoints) and with `PowerLoss`
//! (fsync per commit); PostgreSQL 15 on loopback (moat-testpg's cluster with
//! MOAT_TESTPG_DURABLE=1: fsync and synchronous_commit on, PostgreSQL's
//! defaults), one node with a pool of 8, and two nodes (two stores) on the
//! same database.
//! MOAT_BENCH_QUICK=1: a smoke run; MOAT_BENCH_N: messages per thread
//! (default 1500).

use std::sync::Arc;
use std::time::{Duration, Instant};

use moat_store::{Durability, IncomingMessage, Inserted, Store, TurnState};

const THREADS: usize = 4;
const CONVERSATIONS_PER_THREAD: usize = 25;

fn messages() -> usize {
    if std::env::var_os("MOAT_BENCH_QUICK").is_some() {
        return 100;
    }
    std::env::var("MOAT_BENCH_N")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1500)
}

fn run(name: &str, stores: Vec<Arc<Store>>, tag: &str) -> String {
    let n = messages();
    let start = Instant::now();
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let store = Arc::clone(&stores[t % stores.len()]);
            let tag = tag.to_string();
            std::thread::spawn(move || {
                let mut lat = Vec::with_capacity(n);
                for i in 0..n {
                    let m = IncomingMessage {
                        platform: "slack".into(),
                        event_id: format!("{tag}-{t}-{i}"),
                        channel: "C1".into(),
                        thread: format!("{tag}-{t}-{}", i % CONVERSATIONS_PER_THREAD),
                        user: "U1".into(),
                        text: format!("message {i} of thread {t}, about this long"),
                        ts_ms: i as i64,
                        message_ref: None,
                    };
                    let t0 = Instant::now();
                    let Inserted::New {
                        message_id,
                        conversation_id,
                    } = store.insert_message(&m).unwrap()
                    else {
                        panic!("duplicate");
                    };
                    let turn = store
                        .start_turn(conversation_id, &[message_id], i as i64)
                        .unwrap();
                    store
                        .finish_turn(turn, TurnState::Done, 10, None, i as i64)
                        .unwrap();
                    lat.push(t0.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut all: Vec<Duration> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let wall = start.elapsed();
    all.sort();
    let p = |q: f64| all[((all.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1000.0;
    format!(
        "| {name} | {} | {:.0} | {:.2} | {:.2} | {:.2} |",
        all.len(),
        all.len() as f64 / wall.as_secs_f64(),
        p(0.5),
        p(0.99),
        p(1.0)
    )
}

fn main() {
    // The cluster must be durable: set before it starts.
    if std::env::var_os("MOAT_TESTPG_DURABLE").is_none() {
        eprintln!(
            "note: set MOAT_TESTPG_DURABLE=1 for PostgreSQL with fsync (as scripts/bench does)"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    println!(
        "| store | messages | messages/s | median ms | p99 ms | max ms |\n|---|---|---|---|---|---|"
    );
    let sqlite = Arc::new(Store::open(dir.path().join("a.db")).unwrap());
    println!("{}", run("SQLite (default durability)", vec![sqlite], "a"));
    let sqlite =
        Arc::new(Store::open_with(dir.path().join("b.db"), Durability::PowerLoss).unwrap());
    println!(
        "{}",
        run("SQLite (PowerLoss: fsync per commit)", vec![sqlite], "b")
    );
    let cluster = moat_testpg::cluster();
    let mut opts = cluster.fresh();
    opts.pool_size = 8;
    let pg = Arc::new(Store::open_postgres(&opts, None).unwrap());
    println!("{}", run("PostgreSQL, one node", vec![pg], "c"));
    let mut opts = cluster.fresh();
    opts.pool_size = 8;
    let lease = Duration::from_secs(15);
    let nodes = vec![
        Arc::new(
            Store::open_postgres(&opts, None)
                .unwrap()
                .with_node("n1", lease)
                .unwrap(),
        ),
        Arc::new(
            Store::open_postgres(&opts, None)
                .unwrap()
                .with_node("n2", lease)
                .unwrap(),
        ),
    ];
    println!(
        "{}",
        run("PostgreSQL, two nodes (ownership checked)", nodes, "d")
    );
}
