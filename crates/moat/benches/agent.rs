//! The agent benchmark (`cargo bench -p moat --bench agent`): moat's own
//! overhead for a three-tool-call turn, and the same turn through Claude
//! Code for comparison. Prints a Markdown report; nothing is asserted.
//!
//! The turn: the model asks for a listing of the workspace, then to read a
//! file, then to run `true`, then answers (four model calls, three tool
//! calls). The fake upstream (tests/llmkit) answers at once and adds up the
//! time it spends on each request (first byte in to last byte out); moat's
//! overhead is the host-side turn time minus that. Everything runs on a warm
//! bwrap lease whose LLM calls go through the door's proxy, as in a channel.
//!
//! `MOAT_BENCH_TURNS` (default 50) turns of the built-in agent,
//! `MOAT_BENCH_CLAUDE_TURNS` (default 30) of Claude Code (0 skips it).

#[path = "../tests/llmkit/mod.rs"]
mod llmkit;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use llmkit::*;
use moat_agent::protocol::Provider;
use moat_gateway::agent::builtin::{BuiltinAgent, MOAT_INSIDE};
use moat_gateway::agent::{Agent, AgentSettings, CancelHandle, TurnInput};
use moat_policy::BackendKind;
use serde_json::json;

const MOAT: &str = env!("CARGO_BIN_EXE_moat");
const CLAUDE: &str = "/usr/local/lib/moat-agent-clis/bin/claude";

fn env_n(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// (median, p99) in milliseconds.
fn stats(v: &[Duration]) -> (f64, f64) {
    let mut v = v.to_vec();
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let p99 = ((v.len() as f64 * 0.99).ceil() as usize).clamp(1, v.len()) - 1;
    (ms(v[v.len() / 2]), ms(v[p99]))
}

struct Measured {
    total: Vec<Duration>,
    upstream: Vec<Duration>,
    overhead: Vec<Duration>,
}

impl Measured {
    fn new() -> Measured {
        Measured {
            total: vec![],
            upstream: vec![],
            overhead: vec![],
        }
    }
    fn push(&mut self, total: Duration, upstream: Duration) {
        self.total.push(total);
        self.upstream.push(upstream);
        self.overhead.push(total.saturating_sub(upstream));
    }
    fn rows(&self, name: &str) -> String {
        let mut s = String::new();
        for (what, v) in [
            ("turn (host side)", &self.total),
            ("inside the fake upstream", &self.upstream),
            ("overhead = turn − upstream", &self.overhead),
        ] {
            let (m, p) = stats(v);
            s.push_str(&format!("| {name} | {what} | {m:.1} | {p:.1} |\n"));
        }
        s
    }
}

fn builtin(n: usize) -> Measured {
    let keys = Keys::new();
    let fake = FakeLlm::start(
        &keys.anthropic,
        &keys.openai,
        Arc::new(|_: &Req, step: usize| match step {
            0 => Reply::tool("list_files", json!({})),
            1 => Reply::tool("read_file", json!({"path": "seed.txt"})),
            2 => Reply::tool("bash", json!({"command": "true"})),
            _ => Reply::text("Listed, read and ran."),
        }),
    );
    let mut bx = AgentBox::start(
        BackendKind::Bwrap,
        Path::new(MOAT),
        None,
        &fake.url(),
        &keys,
    );
    let (code, _) = bx.sh("echo seed > /workspace/seed.txt");
    assert_eq!(code, 0);
    let agent = BuiltinAgent::new(
        AgentSettings {
            provider: Some(Provider::Anthropic),
            tools: ["list_files", "read_file", "bash"]
                .map(String::from)
                .to_vec(),
            max_steps: 10,
            ..Default::default()
        },
        MOAT_INSIDE,
    );
    let input = TurnInput {
        messages: vec!["List, read, run.".into()],
        ..Default::default()
    };
    let mut m = Measured::new();
    for i in 0..n + 3 {
        fake.reset_stats();
        let t0 = Instant::now();
        let out = agent.run_turn(bx.lease(), &input, &CancelHandle::default(), &mut |_| {});
        let total = t0.elapsed();
        let reqs = fake.requests();
        assert!(out.ok && reqs.len() == 4, "{out:?} {} requests", reqs.len());
        if i >= 3 {
            m.push(total, fake.handler_time());
        }
    }
    m
}

fn claude(n: usize) -> Option<Measured> {
    if n == 0 || !Path::new(CLAUDE).exists() {
        eprintln!("Claude Code not measured ({CLAUDE} missing or MOAT_BENCH_CLAUDE_TURNS=0)");
        return None;
    }
    let keys = Keys::new();
    let fake = FakeLlm::start(
        &keys.anthropic,
        &keys.openai,
        Arc::new(|_: &Req, step: usize| match step {
            0 => Reply::tool("Glob", json!({"pattern": "*"})),
            1 => Reply::tool("Read", json!({"file_path": "/workspace/seed.txt"})),
            2 => Reply::tool(
                "Bash",
                json!({"command": "true", "description": "Run true"}),
            ),
            _ => Reply::text("Listed, read and ran."),
        }),
    );
    let mut bx = AgentBox::start(
        BackendKind::Bwrap,
        Path::new(MOAT),
        None,
        &fake.url(),
        &keys,
    );
    let (code, _) = bx.sh("echo seed > /workspace/seed.txt");
    assert_eq!(code, 0);
    let mut m = Measured::new();
    for i in 0..n + 2 {
        fake.reset_stats();
        let mut spec = moat_sandbox::RunSpec::new([
            CLAUDE,
            "-p",
            "List, read, run.",
            "--output-format",
            "stream-json",
            "--verbose",
            "--allowedTools",
            "Glob Read Bash",
        ]);
        spec.env = vec![(
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC".into(),
            "1".into(),
        )];
        spec.timeout = Some(Duration::from_secs(120));
        let mut stdout = Vec::new();
        let t0 = Instant::now();
        let o = bx
            .lease()
            .run(spec, &mut |s, b| {
                if s == moat_sandbox::Stream::Stdout {
                    stdout.extend_from_slice(b)
                }
            })
            .expect("running Claude Code");
        let total = t0.elapsed();
        let text = String::from_utf8_lossy(&stdout);
        let reqs = fake.requests();
        let tools_ok = reqs.len() >= 4 && text.contains("Listed, read and ran.");
        if o.exit_code() != 0 || !tools_ok {
            eprintln!(
                "Claude Code turn failed (exit {}, {} requests): {}",
                o.exit_code(),
                reqs.len(),
                text.chars().take(2000).collect::<String>()
            );
            return None;
        }
        if i >= 2 {
            m.push(total, fake.handler_time());
        }
    }
    Some(m)
}

fn main() {
    // `cargo bench` passes --bench; nothing else is taken.
    let n = env_n("MOAT_BENCH_TURNS", 50).max(1);
    let nc = env_n("MOAT_BENCH_CLAUDE_TURNS", 30);
    let uname = std::process::Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let b = builtin(n);
    let c = claude(nc);
    println!("\n### Three-tool-call turn: built-in agent vs Claude Code\n");
    println!("{cores} cores, kernel {uname}; warm bwrap lease, LLM calls through the door to a fake upstream that answers at once.\n");
    println!("| agent | what | median ms | p99 ms |\n|---|---|---:|---:|");
    print!("{}", b.rows(&format!("built-in ({n} turns)")));
    if let Some(c) = &c {
        print!("{}", c.rows(&format!("Claude Code ({nc} turns)")));
        let (bo, _) = stats(&b.overhead);
        let (co, _) = stats(&c.overhead);
        let (bt, _) = stats(&b.total);
        let (ct, _) = stats(&c.total);
        println!(
            "\nClaude Code / built-in: overhead {:.1}x, turn {:.1}x (medians)",
            co / bo,
            ct / bt
        );
    }
    let (bo, bp) = stats(&b.overhead);
    println!(
        "\nbuilt-in overhead beyond the upstream: median {bo:.1} ms, p99 {bp:.1} ms (goal: under 50 ms): {}",
        if bp < 50.0 { "met" } else { "NOT met" }
    );
}
