//! The sandbox benchmark (`scripts/bench`, or `cargo bench -p moat --bench sandbox`
//! after `cargo build --release --workspace`). Measures, in one run on one
//! machine, and prints a Markdown report:
//! - `moat sandbox run -- /bin/true` against bare bwrap and runsc;
//! - a command in an already-created lease;
//! - reset to clean state with a 10 MB and a 1 GB workspace;
//! - density: 100 idle leases, host memory per lease.
//!
//! Medians and 90th percentiles of wall-clock time; nothing is asserted.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use moat_policy::{BackendKind, ByteSize, SandboxPolicy};
use moat_sandbox::{Engine, EngineConfig, LeaseOptions, RunSpec};

fn stats(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    (
        ms(v[v.len() / 2]),
        ms(v[(v.len() * 9 / 10).min(v.len() - 1)]),
    )
}

/// Times `n` runs (after 3 warm-ups); `None` if it cannot run or, unless
/// `may_fail`, exits non-zero (a failing command is not a measurement).
fn time_command(argv: &[&str], n: usize, may_fail: bool) -> Option<Vec<Duration>> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n + 3 {
        let t = Instant::now();
        let st = Command::new(argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .ok()?;
        let d = t.elapsed();
        if !st.success() && !may_fail {
            return None;
        }
        if i >= 3 {
            out.push(d);
        }
    }
    Some(out)
}

fn scratch() -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let d = std::env::temp_dir().join(format!("moat-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("scratch dir");
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o711)).expect("chmod");
    d
}

fn mem_available_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let quick = std::env::var("MOAT_BENCH_QUICK").is_ok_and(|v| !v.is_empty());
    let n = if quick { 10 } else { 100 };
    let moat = env!("CARGO_BIN_EXE_moat");
    let s = scratch();
    std::env::set_var("MOAT_DATA_DIR", s.join("data"));
    std::env::set_var("MOAT_RUNTIME_DIR", s.join("run"));
    let init = PathBuf::from(moat).with_file_name("moat-init");
    if !init.exists() {
        eprintln!("build the workspace first: cargo build --release --workspace");
        std::process::exit(2);
    }

    println!("## One-shot sandbox: `/bin/true`, {n} runs each (after 3 warm-up runs)\n");
    println!("| command | median ms | p90 ms | median / bare bwrap |");
    println!("|---|---|---|---|");
    let cases: Vec<(&str, Vec<&str>)> = vec![
        (
            "bare bwrap (`bwrap --unshare-all --die-with-parent --ro-bind / / /bin/true`)",
            vec![
                "bwrap",
                "--unshare-all",
                "--die-with-parent",
                "--ro-bind",
                "/",
                "/",
                "/bin/true",
            ],
        ),
        (
            "bare bwrap as named in the issue (no root bind; exec fails)",
            vec!["bwrap", "--unshare-all", "--die-with-parent", "/bin/true"],
        ),
        (
            "`moat sandbox run -- /bin/true` (bwrap backend)",
            vec![moat, "sandbox", "run", "--", "/bin/true"],
        ),
        (
            "`runsc --network=none do /bin/true`",
            vec!["runsc", "--network=none", "do", "/bin/true"],
        ),
        (
            "`moat sandbox run --backend gvisor -- /bin/true`",
            vec![
                moat,
                "sandbox",
                "run",
                "--backend",
                "gvisor",
                "--",
                "/bin/true",
            ],
        ),
    ];
    let mut base = None;
    for (name, argv) in &cases {
        let runs = if argv[0] == "runsc" || argv.contains(&"gvisor") {
            n.min(30)
        } else {
            n
        };
        let may_fail = name.contains("exec fails");
        match time_command(argv, runs, may_fail) {
            Some(v) => {
                let (med, p90) = stats(v);
                let b = *base.get_or_insert(med);
                println!("| {name} | {med:.2} | {p90:.2} | {:.2} |", med / b);
            }
            None => println!("| {name} | not available (fails here) | | |"),
        }
    }

    let config = EngineConfig {
        data_dir: s.join("data"),
        runtime_dir: s.join("run"),
        init_path: init,
    };
    let engine = Engine::new(config, BackendKind::Bwrap).expect("engine");
    let mut policy = SandboxPolicy::default();
    policy.limits.disk = ByteSize(2 << 30);
    policy.limits.memory = ByteSize(3 << 30);

    println!("\n## A command in an already-created lease (bwrap)\n");
    let mut lease = engine
        .lease(policy.clone(), LeaseOptions::default())
        .expect("lease");
    lease.start().expect("start");
    let mut v = Vec::new();
    for i in 0..(n * 2 + 5) {
        let t = Instant::now();
        lease
            .run(RunSpec::new(["/bin/true"]), &mut |_, _| {})
            .expect("run");
        if i >= 5 {
            v.push(t.elapsed());
        }
    }
    let (med, p90) = stats(v);
    println!("| operation | median ms | p90 ms |\n|---|---|---|");
    println!("| `lease.run(/bin/true)` | {med:.2} | {p90:.2} |");

    println!("\n## Reset to clean state (bwrap; running sandbox killed, fresh tmpfs mounted)\n");
    println!("| workspace | median ms | p90 ms | runs |\n|---|---|---|---|");
    for (label, size) in [("10 MB", 10usize << 20), ("1 GB", 1 << 30)] {
        let runs = if size > (100 << 20) { 5 } else { 20 };
        let data = vec![7u8; size];
        let mut v = Vec::new();
        for _ in 0..runs {
            lease.start().expect("start");
            std::fs::write(lease.workspace_dir().join("big"), &data).expect("fill workspace");
            let t = Instant::now();
            lease.reset().expect("reset");
            v.push(t.elapsed());
        }
        let (med, p90) = stats(v);
        println!("| {label} | {med:.2} | {p90:.2} | {runs} |");
    }
    let mut restart = Vec::new();
    for _ in 0..20 {
        lease.reset().expect("reset");
        let t = Instant::now();
        lease.start().expect("start");
        restart.push(t.elapsed());
    }
    let (med, p90) = stats(restart);
    println!("\nRestarting the sandbox after a reset (the pool does this ahead of the next request): median {med:.2} ms, p90 {p90:.2} ms.");
    lease.destroy().expect("destroy");

    let count = if quick { 10 } else { 100 };
    println!("\n## Density: {count} idle leases (bwrap, sandbox started, nothing running but moat-init)\n");
    std::thread::sleep(Duration::from_millis(500));
    let before = mem_available_kib();
    let mut leases = Vec::new();
    for _ in 0..count {
        let mut l = engine
            .lease(SandboxPolicy::default(), LeaseOptions::default())
            .expect("lease");
        l.start().expect("start");
        leases.push(l);
    }
    std::thread::sleep(Duration::from_millis(1000));
    let after = mem_available_kib();
    let mut pss = 0;
    for l in &leases {
        for pid in l.host_pids() {
            pss += pss_kib(pid);
            // moat-init: the bwrap child's child.
            if let Ok(children) =
                std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            {
                for c in children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok())
                {
                    pss += pss_kib(c);
                    if let Ok(gc) = std::fs::read_to_string(format!("/proc/{c}/task/{c}/children"))
                    {
                        pss += gc
                            .split_whitespace()
                            .filter_map(|g| g.parse::<u32>().ok())
                            .map(pss_kib)
                            .sum::<u64>();
                    }
                }
            }
        }
    }
    let per_lease_avail = before.saturating_sub(after) as f64 / count as f64 / 1024.0;
    let per_lease_pss = pss as f64 / count as f64 / 1024.0;
    println!("| measure | per lease |\n|---|---|");
    println!("| drop in MemAvailable (all kernel and user memory) | {per_lease_avail:.2} MiB |");
    println!("| PSS of the lease's processes (bwrap, moat-init) | {per_lease_pss:.2} MiB |");
    for l in leases {
        l.destroy().expect("destroy");
    }
    let _ = std::fs::remove_dir_all(&s);
}
