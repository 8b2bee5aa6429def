//! The IPC endpoint and the scheduler (`cargo bench -p moat-gateway --bench
//! ipc`; needs root for the sandboxes). One run, one machine:
//! - the round trip of an MCP call from inside a sandbox: python3 in a
//!   pooled bwrap sandbox of a gateway in this process (the shell agent)
//!   sends `ping` and `tools/call list_tasks` over `/run/moat/ipc.sock`,
//!   timing each with `perf_counter_ns`;
//! - the scheduler with 10,000 stored tasks: the process's resident memory
//!   before the tasks, after the gateway started with them, and after 100
//!   of them came due; the cost of one idle look for due tasks; and the
//!   delay between each due time and the run's start (its run log).
//!
//! Must never reach anything but the fake Slack it starts. Prints Markdown.

#[path = "../tests/slack_kit/mod.rs"]
mod slack_kit;

use std::time::{Duration, Instant};

use slack_kit::*;

const ALICE: &str = "U0ALICE1";
const CHANNEL: &str = "C0BENCH";
const CALLS: usize = 2000;
const TASKS: usize = 10_000;
const DUE: usize = 100;

fn config_rest() -> String {
    format!(
        "[pool]\nsize = 1\n\n[defaults]\ndebounce = \"0ms\"\nrate = {{ user = \"100000/sec\", channel = \"100000/sec\" }}\n\n\
         [ipc]\nrate = \"1000000/sec\"\n\n[tasks]\nmin_interval = \"1m\"\nmax_per_channel = 10000\n\n\
         [[channel]]\nplatform = \"slack\"\nid = \"{CHANNEL}\"\nusers = [\"{ALICE}\"]\n"
    )
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn pct(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 * q) as usize).min(v.len() - 1)]
}

async fn round_trips() {
    let fake = FakeSlack::start().await;
    let data = data_dir("bench-ipc-rt");
    let gw = Running::start(&config(&fake, &data, Mode::Events, &config_rest()), &data).await;
    let program = [
        "import socket,json,time",
        "s=socket.socket(socket.AF_UNIX)",
        "s.connect(\"/run/moat/ipc.sock\")",
        "f=s.makefile(\"rwb\")",
        "def rpc(i,m,p):",
        "  f.write((json.dumps(dict(jsonrpc=\"2.0\",id=i,method=m,params=p))+chr(10)).encode()); f.flush()",
        "  return json.loads(f.readline())",
        "rpc(0,\"initialize\",dict(protocolVersion=\"2025-06-18\"))",
        "for name,m,p in [(\"ping\",\"ping\",dict()),(\"list_tasks\",\"tools/call\",dict(name=\"list_tasks\",arguments=dict()))]:",
        "  for i in range(200): rpc(i,m,p)",
        "  t=[]",
        &format!("  for i in range({CALLS}):"),
        "    a=time.perf_counter_ns(); r=rpc(i,m,p); t.append(time.perf_counter_ns()-a)",
        "    assert \"result\" in r, r",
        "  t.sort()",
        "  print(\"RT\", name, t[len(t)//2], t[len(t)*9//10], t[len(t)*99//100])",
        "print(\"DONE\")",
    ]
    .join("\n");
    let root = new_ts();
    let text = format!("python3 -c '{program}'");
    let r = post_signed(
        gw.events(),
        &fake.callback(&new_event_id(), mention(CHANNEL, ALICE, &root, None, &text)),
    )
    .await;
    assert_eq!(r.status, 200);
    let post = fake.wait_post(CHANNEL, &root, "DONE").await;
    println!(
        "### IPC round trip from inside a bwrap sandbox ({CALLS} calls each, after 200 warm-up)\n"
    );
    println!("| call | median | p90 | p99 |\n|---|---|---|---|");
    for l in post.text().lines().filter(|l| l.starts_with("RT ")) {
        let f: Vec<&str> = l.split_whitespace().collect();
        let us = |s: &str| s.parse::<f64>().unwrap() / 1000.0;
        println!(
            "| `{}` | {:.0} µs | {:.0} µs | {:.0} µs |",
            f[1],
            us(f[2]),
            us(f[3]),
            us(f[4])
        );
    }
    println!();
    gw.stop().await;
}

async fn scheduler() {
    let fake = FakeSlack::start().await;
    let data = data_dir("bench-ipc-sched");
    let rss_before = rss_kib();
    let t0 = now_ms();
    // 100 due from 10 s on, 50 ms apart; the other 9,900 in an hour or more.
    let first_due = t0 + 10_000;
    {
        let store = moat_store::Store::open(data.join("moat.db")).unwrap();
        for i in 0..TASKS {
            let next = if i < DUE {
                first_due + i as i64 * 50
            } else {
                t0 + 3_600_000 + i as i64 * 1000
            };
            store
                .insert_task(&moat_store::NewTask {
                    platform: "slack".into(),
                    channel: CHANNEL.into(),
                    thread: String::new(),
                    creator: ALICE.into(),
                    prompt: format!("echo task-{i}"),
                    kind: "once".into(),
                    spec: moat_policy::tasks::format_utc(next),
                    context: "isolated".into(),
                    next_run_ms: next,
                    created_ms: t0,
                })
                .unwrap();
        }
    }
    let insert_s = (now_ms() - t0) as f64 / 1000.0;
    let gw = Running::start(&config(&fake, &data, Mode::Events, &config_rest()), &data).await;
    let rss_started = rss_kib();
    // The scheduler's idle cost: one look for due tasks among 10,000.
    let store = gw.gw.inner.store.clone();
    let mut looks = Vec::new();
    for _ in 0..1000 {
        let a = Instant::now();
        let d = store.due_tasks(t0, 200).unwrap();
        looks.push(a.elapsed().as_secs_f64() * 1e6);
        assert!(d.is_empty());
    }
    let look = pct(&mut looks, 0.5);
    // Wait for the 100 runs to start.
    let deadline = Instant::now() + Duration::from_secs(120);
    let ids: Vec<i64> = (1..=DUE as i64).collect();
    let mut delays = loop {
        let runs: Vec<moat_store::TaskRun> = ids
            .iter()
            .filter_map(|id| store.task_runs(*id, 1).unwrap().pop())
            .collect();
        if runs.len() == DUE {
            assert!(runs.iter().all(|r| r.outcome == "started"), "{runs:?}");
            break runs
                .iter()
                .map(|r| (r.started_ms - r.due_ms) as f64)
                .collect::<Vec<f64>>();
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {DUE} runs started",
            runs.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let rss_after = rss_kib();
    println!(
        "### The scheduler with {TASKS} stored tasks ({DUE} due 50 ms apart, the rest later)\n"
    );
    println!("| measure | value |\n|---|---|");
    println!("| storing {TASKS} tasks (one transaction each) | {insert_s:.1} s |");
    println!("| resident memory of the process before / gateway started / after the runs | {} / {} / {} MiB |", rss_before / 1024, rss_started / 1024, rss_after / 1024);
    println!("| one look for due tasks among {TASKS} (median of 1000) | {look:.0} µs |");
    println!(
        "| due → start (run log), median / p90 / max | {:.0} / {:.0} / {:.0} ms |",
        pct(&mut delays, 0.5),
        pct(&mut delays, 0.9),
        pct(&mut delays, 1.0)
    );
    println!();
    gw.stop().await;
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        round_trips().await;
        scheduler().await;
    });
}
