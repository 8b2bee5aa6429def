//! The runner pool against real bwrap sandboxes: warm leases, clean state
//! between holders (docs/threat-model.md C3 at the pool level), FIFO waiting with a
//! bound, and recovery of a sandbox killed from outside.

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use moat_gateway::pool::{Bounds, LeaseFactory, Pool, PoolError};
use moat_policy::{BackendKind, SandboxPolicy};
use moat_sandbox::{Engine, EngineConfig, RunSpec, Stream};

/// moat-init next to the test binaries (built on demand: `cargo test -p
/// moat-gateway` alone does not build other packages' binaries).
fn init_path() -> PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        let p = exe.parent().unwrap().parent().unwrap().join("moat-init");
        if !p.exists() {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let ok = std::process::Command::new(cargo)
                .args(["build", "-p", "moat-sandbox", "--bin", "moat-init"])
                .status()
                .expect("running cargo to build moat-init")
                .success();
            assert!(ok && p.exists(), "moat-init is missing at {}", p.display());
        }
        p
    })
    .clone()
}

fn scratch() -> PathBuf {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("moat-gw-pool-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o711)).unwrap();
        d
    })
    .clone()
}

fn engine() -> Arc<Engine> {
    let cfg = EngineConfig {
        data_dir: scratch().join("data"),
        runtime_dir: scratch().join("run"),
        init_path: init_path(),
    };
    Arc::new(Engine::new(cfg, BackendKind::Bwrap).expect("engine"))
}

async fn pool(size: usize, max_waiters: usize) -> Pool {
    Pool::new(Arc::new(factory()), size, max_waiters)
        .await
        .expect("pool")
}

fn factory() -> LeaseFactory {
    LeaseFactory {
        extras: Default::default(),
        engine: engine(),
        policy: SandboxPolicy::default(),
        run_as: None,
        runtime: tokio::runtime::Handle::current(),
        audit: Arc::new(moat_egress::MemoryAudit::default()),
        prefix: "pool-test".into(),
        counter: AtomicU64::new(0),
        ipc: None,
    }
}

/// Runs `script` in the lent runner's sandbox; returns (exit code, stdout).
async fn sh(
    lent: moat_gateway::pool::Lent,
    script: &str,
) -> (moat_gateway::pool::Lent, i32, String) {
    let script = script.to_string();
    tokio::task::spawn_blocking(move || {
        let mut lent = lent;
        let mut out = Vec::new();
        let o = lent
            .runner()
            .lease
            .run(RunSpec::new(["/bin/sh", "-c", &script]), &mut |s, b| {
                if s == Stream::Stdout {
                    out.extend_from_slice(b)
                }
            })
            .expect("run");
        (
            lent,
            o.exit_code(),
            String::from_utf8_lossy(&out).into_owned(),
        )
    })
    .await
    .unwrap()
}

/// Closes the pool and waits until every runner is destroyed (no sandbox
/// mount outlives the test).
async fn shut(p: Pool) {
    p.close();
    for _ in 0..1000 {
        let s = p.stats();
        if s.idle == 0 && s.busy == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the pool did not empty: {:?}", p.stats());
}

async fn wait_idle(p: &Pool, idle: usize) {
    for _ in 0..500 {
        if p.stats().idle == idle {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("pool never had {idle} idle runners: {:?}", p.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_is_clean_for_its_next_holder() {
    let p = pool(1, 4).await;
    assert_eq!(
        p.stats().idle,
        1,
        "the pool is warm before the first request"
    );
    let lent = p.acquire(|_| panic!("nobody should wait")).await.unwrap();
    let (lent, code, _) = sh(
        lent,
        "echo secret-of-a > /workspace/a.txt; echo x > /tmp/t; echo y > ~/h; sleep 600 & echo started",
    )
    .await;
    assert_eq!(code, 0);
    drop(lent);
    wait_idle(&p, 1).await;
    let lent = p.acquire(|_| panic!("nobody should wait")).await.unwrap();
    let (lent2, code, out) = sh(
        lent,
        "echo FILES=$(ls -A /workspace /tmp ~ | grep -v ':$' | tr -s '\n' ' '); echo SLEEPERS=$(pgrep -c sleep); cat /workspace/a.txt 2>&1 || true",
    )
    .await;
    assert_eq!(code, 0);
    assert!(
        out.contains("FILES= \n") || out.contains("FILES=\n"),
        "files survived: {out}"
    );
    assert!(out.contains("SLEEPERS=0"), "a process survived: {out}");
    assert!(
        !out.contains("secret-of-a") && out.contains("No such file"),
        "{out}"
    );
    drop(lent2);
    shut(p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_served_in_order_and_the_line_is_bounded() {
    let p = pool(1, 2).await;
    let first = p.acquire(|_| {}).await.unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..2 {
        let p = p.clone();
        let order = order.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tasks.push(tokio::spawn(async move {
            let lent = p
                .acquire(move |ahead| {
                    let _ = tx.send(ahead);
                })
                .await
                .unwrap();
            order.lock().unwrap().push(i);
            drop(lent);
        }));
        // Each waiter is told how many are ahead of it before the next comes.
        assert_eq!(rx.await.unwrap(), i, "waiter {i}");
    }
    assert_eq!(p.stats().waiting, 2);
    match p.acquire(|_| {}).await {
        Err(PoolError::Full {
            size: 1,
            waiting: 2,
        }) => {}
        other => panic!("a third waiter must be refused: {:?}", other.err()),
    }
    drop(first);
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        *order.lock().unwrap(),
        vec![0, 1],
        "first come, first served"
    );
    wait_idle(&p, 1).await;
    shut(p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_killed_from_outside_is_replaced() {
    let p = pool(1, 2).await;
    let lent = p.acquire(|_| {}).await.unwrap();
    let (mut lent, _, _) = sh(lent, "true").await;
    let pids = lent.runner().lease.host_pids();
    assert!(!pids.is_empty(), "a warm runner has a running sandbox");
    for pid in pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    drop(lent);
    wait_idle(&p, 1).await;
    let lent = p.acquire(|_| {}).await.unwrap();
    let (l, code, out) = sh(lent, "echo alive").await;
    assert_eq!((code, out.trim()), (0, "alive"));
    drop(l);
    shut(p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_grows_to_max_then_queues_then_refuses_and_shrinks_back() {
    let p = Pool::elastic(
        Arc::new(factory()),
        Bounds {
            min: 1,
            max: 3,
            max_waiters: 1,
            shrink_after: Duration::from_secs(1),
        },
    )
    .await
    .expect("pool");
    assert_eq!((p.stats().size, p.stats().max), (1, 3));
    // Up to max: each request gets a runner of its own, nobody is queued.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(
            p.acquire(|_| panic!("nobody waits below max"))
                .await
                .unwrap(),
        );
    }
    let uids: std::collections::BTreeSet<u32> = held
        .iter_mut()
        .map(|l| l.runner().lease.host_uid())
        .collect();
    assert_eq!(uids.len(), 3, "three holders, three sandboxes");
    assert_eq!(p.stats().size, 3);
    // Past max: one may wait...
    let (tx, rx) = tokio::sync::oneshot::channel();
    let waiter = {
        let p = p.clone();
        tokio::spawn(async move {
            p.acquire(move |ahead| {
                let _ = tx.send(ahead);
            })
            .await
        })
    };
    assert_eq!(
        rx.await.unwrap(),
        0,
        "the fourth request waits first in line"
    );
    // ...and the next is told the pool is busy: past max + max_waiters.
    match p.acquire(|_| {}).await {
        Err(PoolError::Full {
            size: 3,
            waiting: 1,
        }) => {}
        other => panic!("the fifth request must be refused: {:?}", other.err()),
    }
    assert_eq!(p.stats().size, 3, "never more than max");
    held.pop();
    let fourth = waiter.await.unwrap().expect("served when one came back");
    drop(fourth);
    drop(held);
    // Idle past shrink_after: back to min.
    for _ in 0..500 {
        if p.stats().size == 1 && p.stats().idle == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!((p.stats().size, p.stats().idle), (1, 1), "{:?}", p.stats());
    shut(p).await;
}
