//! The elastic pool through the gateway: with `[pool] min = 2, max = 64` and
//! no waiting line at all (`max_waiters = 0`), 50 conversations at once all
//! get a sandbox of their own and an answer, none is told the sandboxes are
//! busy; afterwards the pool shrinks back to `min`. Real bwrap sandboxes,
//! the real web chat on loopback.

mod gwkit;

use std::time::{Duration, Instant};

use gwkit::*;
use serde_json::Value;

#[test]
fn fifty_conversations_at_once_with_max_64_none_is_told_busy() {
    const N: usize = 50;
    let toml = "[web]\nlisten = \"127.0.0.1:0\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [pool]\nmin = 2\nmax = 64\nmax_waiters = 0\nshrink_after = \"2s\"\n\n\
         [[channel]]\nplatform = \"web\"\nid = \"*\"\nusers = [\"*\"]\ndebounce = \"0ms\"\n\
         rate = { user = \"1000/min\", channel = \"1000/min\" }\n";
    let gw = Gw::start("elastic", toml);
    gw.wait_pool_idle(2);
    let c = gw.client(None);
    // Each turn holds its sandbox until the test lets it go (a file the
    // test puts in every lease's workspace from the host), so the 50 run at
    // once: a turn that had to wait for another's sandbox would be refused
    // (no waiting line), and the gauge could not reach 50.
    for i in 0..N {
        let cmd = format!(
            "touch /workspace/started; while [ ! -e /workspace/go ]; do sleep 0.1; done; echo t{i}-$((6*7))"
        );
        let r = c.post(&format!("c{i}"), &cmd);
        assert_eq!(r.status, 202, "conversation {i}: {r:?}");
    }
    // The workspaces (on the host) of the turns that have started.
    let leases = leases_of(&gw.data);
    let workspaces = || -> Vec<std::path::PathBuf> {
        let mut out = Vec::new();
        for lease in std::fs::read_dir(&leases).into_iter().flatten().flatten() {
            for generation in std::fs::read_dir(lease.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let ws = generation.path().join("workspace");
                if ws.join("started").exists() {
                    out.push(ws);
                }
            }
        }
        out
    };
    let deadline = Instant::now() + Duration::from_secs(180);
    let started = loop {
        let started = workspaces();
        if started.len() == N {
            break started;
        }
        assert!(
            Instant::now() < deadline,
            "the 50 turns never ran at once: {} started; {:?}",
            started.len(),
            gw.gauges()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let g = gw.gauges();
    assert!(
        g.running_turns == N as u64 && g.pool_size <= 64,
        "50 running, at most max sandboxes: {g:?}"
    );
    for ws in started {
        std::fs::write(ws.join("go"), b"").unwrap();
    }
    let mut answers = Vec::new();
    for i in 0..N {
        let mut sse = c.events(&format!("c{i}")).expect("events");
        let evs = sse.until(Duration::from_secs(120), |v| v["type"] == "answer");
        let notices: Vec<&Value> = evs.iter().filter(|v| kind(v) == "notice").collect();
        assert!(
            notices.is_empty(),
            "conversation {i} was told something: {notices:?}"
        );
        let (text, ok) = answers_of(&evs).remove(0);
        assert!(
            ok && text.contains(&format!("t{i}-42")),
            "conversation {i}: {text:?}"
        );
        answers.push(text);
    }
    assert_eq!(answers.len(), N);
    // Back to min after shrink_after without use.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let g = gw.gauges();
        if g.pool_size == 2 && g.running_turns == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the pool did not shrink back to min = 2: {g:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    gw.stop();
}
