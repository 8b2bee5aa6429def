//! The GitHub door's clone benchmark (`cargo bench -p moat --bench github`):
//! a clone of a 50 MB repository (one incompressible file) from the fake
//! GitHub on 127.0.0.1, through the door (TLS ended by the door with the
//! lease CA, the token added, a new TLS-less upstream request to the fake)
//! inside a bwrap sandbox, against the same clone run directly on the host
//! against the same server with the same kind of token. Prints a Markdown
//! table; nothing is asserted. The goal (issue 11): door / direct
//! throughput at least 0.8.
//!
//! `MOAT_BENCH_CLONES` (default 5) clones of each kind; the first of each
//! is a warm-up and not counted.

#[path = "../tests/githubkit/mod.rs"]
mod githubkit;
#[path = "../tests/netkit/mod.rs"]
mod netkit;

use std::process::Command;
use std::time::Instant;

use githubkit::*;
use netkit::{fresh_dir, Backend, Sandbox};
use serde_json::{json, Value};

const SIZE_MB: usize = 50;

fn env_n(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A token minted on the host, as the door would (same scope).
fn mint(fake: &FakeGithub) -> String {
    let t = now();
    let jwt = sign_jwt(&json!({"iat": t - 60, "exp": t + 540, "iss": APP_ID}));
    let o = Command::new("curl")
        .args(["-sS", "-X", "POST", "-H"])
        .arg(format!("Authorization: Bearer {jwt}"))
        .args(["-d"])
        .arg(json!({"repositories": [REPO], "permissions": {"contents": "read"}}).to_string())
        .arg(format!(
            "{}/app/installations/{INSTALLATION}/access_tokens",
            fake.api_url()
        ))
        .output()
        .expect("curl");
    let v: Value = serde_json::from_slice(&o.stdout).expect("a token answer");
    v["token"].as_str().expect("a token").to_string()
}

/// Adds a branch `big` holding one incompressible `SIZE_MB` file.
fn big_branch(fake: &FakeGithub) {
    let (work, _) = fresh_dir("bench-big");
    let bare = fake.bare(REPO);
    git(&work, &["clone", "-q", bare.to_str().unwrap(), "w"]);
    let w = work.join("w");
    let ok = Command::new("head")
        .args(["-c", &format!("{}", SIZE_MB * 1024 * 1024), "/dev/urandom"])
        .stdout(std::fs::File::create(w.join("blob.bin")).unwrap())
        .status()
        .unwrap()
        .success();
    assert!(ok);
    git(&w, &["add", "blob.bin"]);
    git(&w, &["commit", "-q", "-m", "big"]);
    git(&w, &["push", "-q", "origin", "HEAD:refs/heads/big"]);
}

fn secs_stats(v: &[f64]) -> (f64, f64, f64) {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

fn main() {
    let n = env_n("MOAT_BENCH_CLONES", 5).max(2);
    let fake = FakeGithub::start();
    big_branch(&fake);
    let clone_args = "clone -q --single-branch --branch big";

    // Directly on the host, against the fake's git endpoint.
    let token = mint(&fake);
    let basic = format!(
        "Authorization: Basic {}",
        base64(format!("x-access-token:{token}").as_bytes(), false)
    );
    let mut direct = Vec::new();
    for i in 0..n {
        let (dir, _) = fresh_dir("bench-direct");
        let t0 = Instant::now();
        let o = Command::new("git")
            .args(["-c", &format!("http.extraHeader={basic}")])
            .args(clone_args.split(' '))
            .arg(format!("{}/{OWNER}/{REPO}.git", fake.web_url()))
            .arg(dir.join("c"))
            .env("GIT_TERMINAL_PROMPT", "0")
            .output()
            .unwrap();
        let took = t0.elapsed().as_secs_f64();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        if i > 0 {
            direct.push(took);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    // Through the door, inside a bwrap sandbox: timed inside around git.
    let sb = Sandbox::new(Backend::Bwrap, "bench-door");
    let script = format!(
        "for i in $(seq {n}); do rm -rf /tmp/c; s=$(date +%s%N); git {clone_args} https://github.com/{OWNER}/{REPO}.git /tmp/c || exit 1; e=$(date +%s%N); echo took=$(( (e - s) / 1000 )); done"
    );
    let o = sb
        .command()
        .env("GITHUB_APP_ID", APP_ID)
        .env("GITHUB_APP_PRIVATE_KEY", &app_key().private_pem)
        .env("GITHUB_APP_INSTALLATION_ID", INSTALLATION)
        .env("MOAT_GITHUB_API_URL", fake.api_url())
        .env("MOAT_GITHUB_URL", fake.web_url())
        .env("MOAT_GITHUB_ALLOW_PLAIN_HTTP", "1")
        .args(["--github", &format!("{OWNER}/{REPO}"), "--memory", "2g"])
        .args(["--", "/bin/sh", "-c", &script])
        .output()
        .expect("moat sandbox run");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let door: Vec<f64> = out
        .lines()
        .filter_map(|l| l.strip_prefix("took="))
        .filter_map(|v| v.parse::<f64>().ok())
        .map(|us| us / 1e6)
        .skip(1)
        .collect();
    assert_eq!(door.len(), n - 1, "{out}");

    let (dmin, dmed, dmax) = secs_stats(&direct);
    let (gmin, gmed, gmax) = secs_stats(&door);
    let mbps = |s: f64| SIZE_MB as f64 / s;
    println!(
        "\n### Clone of a {SIZE_MB} MB repository ({} clones each after a warm-up)\n",
        n - 1
    );
    println!("| path | min s | median s | max s | median MB/s |");
    println!("|---|---|---|---|---|");
    println!(
        "| direct (host git → fake GitHub) | {dmin:.2} | {dmed:.2} | {dmax:.2} | {:.1} |",
        mbps(dmed)
    );
    println!(
        "| through the door (bwrap sandbox) | {gmin:.2} | {gmed:.2} | {gmax:.2} | {:.1} |",
        mbps(gmed)
    );
    println!(
        "\nthroughput ratio door / direct (medians): **{:.2}** (goal ≥ 0.8)",
        dmed / gmed
    );
}
