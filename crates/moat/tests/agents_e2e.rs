//! The agents end to end: a fake Slack event in, the gateway (in this
//! process, `moat_gateway::server::serve`, real bwrap sandboxes) runs the
//! channel's built-in agent inside the conversation's sandbox, the agent's
//! model calls go through the door's LLM proxy to a scripted fake Anthropic
//! or OpenAI upstream (tests/llmkit), and the threaded answer and the
//! agent's artifact come back to the fake Slack (moat-gateway's
//! tests/slack_kit).
//!
//! What they check: the answer lands in the mention's thread; the file the
//! agent wrote to `~/artifacts` is uploaded into that thread with its exact
//! bytes; the fake saw the real key and never a placeholder; the real key is
//! nowhere in the data directory (store, audit log) or Slack's calls; the
//! audit log's turn record names the agent and counts its tool calls; in a
//! per-thread channel the second turn continues the first one's session.
//! Run as root: `cargo test -p moat --test agents_e2e -- --test-threads=2`.

#[path = "../../moat-gateway/tests/slack_kit/mod.rs"]
mod slack_kit;

mod ampkit;
mod clikit;
mod llmkit;

use std::sync::Arc;
use std::time::Duration;

use llmkit::{FakeLlm, Keys, Reply};
use serde_json::json;
use slack_kit::*;

const ALICE: &str = "U0ALICE1";
const GENERAL: &str = "C0GENERAL";

/// Slack's secrets plus the real LLM keys (what moat's environment would hold).
fn secrets(keys: &Keys) -> moat_gateway::server::SecretFn {
    secrets_of(&keys.anthropic, &keys.openai)
}

fn secrets_of(anthropic: &str, openai: &str) -> moat_gateway::server::SecretFn {
    let slack = secret_fn();
    let (a, o) = (anthropic.to_string(), openai.to_string());
    Arc::new(move |k: &str| match k {
        "ANTHROPIC_API_KEY" => Some(a.clone()),
        "OPENAI_API_KEY" => Some(o.clone()),
        // The fake upstream is plain HTTP on loopback.
        "MOAT_LLM_ALLOW_PLAIN_HTTP" => Some("1".into()),
        other => slack(other),
    })
}

/// The gateway's configuration: one Slack channel for Alice with the
/// built-in agent on `provider`, upstream the fake.
fn rest(fake_llm: &FakeLlm, provider: &str, sandbox: &str) -> String {
    format!(
        "[llm]\nanthropic_url = \"{url}\"\nopenai_url = \"{url}\"\n\n\
         [pool]\nsize = 1\n\n[defaults]\ndebounce = \"0ms\"\n\n\
         [[channel]]\nplatform = \"slack\"\nid = \"{GENERAL}\"\nusers = [\"{ALICE}\"]\n\
         agent = \"builtin\"\nprovider = \"{provider}\"\nsandbox = \"{sandbox}\"\n\
         tools = [\"list_files\", \"write_file\", \"read_file\"]\n",
        url = fake_llm.url()
    )
}

/// The uploads completed into `channel`/`thread`: (filename, sha256).
fn uploads(calls: &[Call], channel: &str, thread: &str) -> Vec<(String, String)> {
    slack_kit::uploads(calls, channel, thread)
        .into_iter()
        .map(|(name, _, sha)| (name, sha))
        .collect()
}

/// Every file under `dir`, read as bytes, checked for `needle`.
fn files_containing(dir: &std::path::Path, needle: &str) -> Vec<String> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(meta) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if meta.is_dir() {
                stack.push(p);
            } else if meta.is_file() {
                if let Ok(b) = std::fs::read(&p) {
                    if b.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                        hits.push(p.display().to_string());
                    }
                }
            }
        }
    }
    hits
}

async fn slack_turn_with_artifact(provider: &str) {
    std::env::set_var("MOAT_EXE", env!("CARGO_BIN_EXE_moat"));
    let keys = Keys::new();
    let mark = llmkit::hex(8);
    let report = format!("# Report {mark}\nall files listed\n");
    let (r2, m2) = (report.clone(), mark.clone());
    let llm = FakeLlm::start(
        &keys.anthropic,
        &keys.openai,
        Arc::new(move |_req, step| match step {
            0 => Reply::tool("list_files", json!({"path": "."})),
            1 => Reply::tool(
                "write_file",
                json!({"path": "/home/agent/artifacts/report.md", "content": r2}),
            ),
            _ => Reply::text(format!("Done: the report is attached ({m2}).")),
        }),
    );
    let slack = FakeSlack::start().await;
    let data = data_dir(&format!("agents-e2e-{provider}"));
    let gw = Running::start_with(
        &config(&slack, &data, Mode::Events, &rest(&llm, provider, "pool")),
        &data,
        secrets(&keys),
    )
    .await;

    let ts = new_ts();
    let body = slack.callback(
        &new_event_id(),
        mention(GENERAL, ALICE, &ts, None, "write me a report of the files"),
    );
    assert_eq!(post_signed(gw.events(), &body).await.status, 200);

    // The answer in the mention's thread.
    let answer = slack
        .wait_post(
            GENERAL,
            &ts,
            &format!("Done: the report is attached ({mark})"),
        )
        .await;
    assert_eq!(answer.arg("thread_ts"), Some(ts.as_str()));
    assert!(
        !answer.text().contains("```"),
        "an agent's answer is Markdown, not a code block: {}",
        answer.text()
    );
    let calls = slack
        .wait_for("the ✅ reaction", Duration::from_secs(60), |calls| {
            calls
                .iter()
                .any(|c| c.method == "reactions.add" && c.arg("name") == Some("white_check_mark"))
                .then(|| calls.to_vec())
        })
        .await;
    // The artifact, with the agent's exact bytes, in the same thread.
    assert_eq!(
        uploads(&calls, GENERAL, &ts),
        [("report.md".to_string(), sha256_hex(report.as_bytes()))],
        "{}",
        summary(&calls)
    );

    // Three model calls, all with the real key, none with a placeholder;
    // the tools offered are exactly the channel's allowlist.
    let reqs = llm.requests();
    assert_eq!(reqs.len(), 3, "list, write, answer");
    for r in &reqs {
        assert_eq!(r.status, 200);
        let key = match provider {
            "anthropic" => r.header("x-api-key").map(str::to_string),
            _ => r
                .header("authorization")
                .and_then(|a| a.strip_prefix("Bearer "))
                .map(str::to_string),
        };
        let real = if provider == "anthropic" {
            &keys.anthropic
        } else {
            &keys.openai
        };
        assert_eq!(
            key.as_deref(),
            Some(real.as_str()),
            "the door put the real key in"
        );
        assert!(
            !r.raw.contains("moat-placeholder"),
            "a placeholder went upstream"
        );
        let mut offered: Vec<String> = r.body["tools"]
            .as_array()
            .expect("tools offered")
            .iter()
            .map(|t| {
                t["name"]
                    .as_str()
                    .or(t["function"]["name"].as_str())
                    .unwrap_or("")
                    .to_string()
            })
            .collect();
        offered.sort();
        // The channel's tools, and moat's own through `moat ipc-bridge`
        // (docs/ipc.md).
        assert_eq!(
            offered,
            [
                "list_files",
                "mcp__moat__cancel_task",
                "mcp__moat__list_tasks",
                "mcp__moat__pause_task",
                "mcp__moat__register_group",
                "mcp__moat__request_approval",
                "mcp__moat__resume_task",
                "mcp__moat__schedule_task",
                "mcp__moat__send_message",
                "read_file",
                "write_file"
            ]
        );
    }

    // The audit log: the turn names the agent and its tool calls; the door
    // logged each model call. (The turn record follows the ✅ reaction.)
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let recs = loop {
        let recs = gw.audit();
        if recs.iter().any(|r| r["kind"] == "turn") || std::time::Instant::now() > deadline {
            break recs;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let turn = recs
        .iter()
        .find(|r| r["kind"] == "turn")
        .unwrap_or_else(|| panic!("no turn record: {recs:#?}"));
    assert_eq!(turn["agent"], "builtin");
    assert_eq!(turn["tool_calls"], 2, "{turn}");
    assert_eq!(turn["state"], "done");
    let artifact = recs
        .iter()
        .find(|r| r["kind"] == "artifact")
        .expect("artifact record");
    assert_eq!(artifact["name"], "report.md");
    assert_eq!(
        recs.iter().filter(|r| r["kind"] == "llm").count(),
        3,
        "one door record per model call"
    );

    gw.stop().await;
    // No real key anywhere the gateway wrote, nor in anything sent to Slack.
    for key in [&keys.anthropic, &keys.openai] {
        assert_eq!(files_containing(&data, key), Vec::<String>::new());
        assert!(!summary(&calls).contains(key.as_str()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_event_to_threaded_answer_with_artifact_builtin_anthropic() {
    slack_turn_with_artifact("anthropic").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_event_to_threaded_answer_with_artifact_builtin_openai() {
    slack_turn_with_artifact("openai").await;
}

/// A per-thread channel: the conversation's sandbox keeps the agent's
/// session, so the second mention's model call carries the first turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_thread_second_turn_continues_the_first_session() {
    std::env::set_var("MOAT_EXE", env!("CARGO_BIN_EXE_moat"));
    let keys = Keys::new();
    let first = llmkit::hex(6);
    let f2 = first.clone();
    let llm = FakeLlm::start(
        &keys.anthropic,
        &keys.openai,
        Arc::new(move |req, _step| {
            let n = req.body["messages"].as_array().map_or(0, |m| m.len());
            Reply::text(format!("turn with {n} messages ({f2})"))
        }),
    );
    let slack = FakeSlack::start().await;
    let data = data_dir("agents-e2e-per-thread");
    let gw = Running::start_with(
        &config(
            &slack,
            &data,
            Mode::Events,
            &rest(&llm, "anthropic", "per-thread"),
        ),
        &data,
        secrets(&keys),
    )
    .await;
    let ts = new_ts();
    let one = slack.callback(
        &new_event_id(),
        mention(GENERAL, ALICE, &ts, None, "remember the word heron"),
    );
    assert_eq!(post_signed(gw.events(), &one).await.status, 200);
    slack
        .wait_post(GENERAL, &ts, &format!("turn with 1 messages ({first})"))
        .await;
    let two = slack.callback(
        &new_event_id(),
        mention(GENERAL, ALICE, &new_ts(), Some(&ts), "which word?"),
    );
    assert_eq!(post_signed(gw.events(), &two).await.status, 200);
    slack
        .wait_post(GENERAL, &ts, &format!("turn with 3 messages ({first})"))
        .await;
    let reqs = llm.requests();
    assert_eq!(reqs.len(), 2);
    let second = reqs[1].body["messages"].to_string();
    assert!(
        second.contains("remember the word heron") && second.contains("which word?"),
        "the second call continues the session: {second}"
    );
    gw.stop().await;
}

/// Claude Code through the gateway: a Slack channel with `agent = "claude"`
/// and `[agents] dir` naming a CLI install (shown to the sandbox at
/// /run/moat/agents, as a `moat agents install` template is). Claude Code
/// writes the report with its Write tool into ~/artifacts; the answer and the
/// file come back into the thread; `Bash`, not in the channel's tools, is
/// never offered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_event_to_threaded_answer_with_artifact_claude_code() {
    let cli = clikit::claude_dir();
    let keys = clikit::Keys::new();
    let mark = clikit::hex(8);
    let report = format!("report {mark}\n");
    let (r2, m2) = (report.clone(), mark.clone());
    let llm = clikit::FakeLlm::start(
        &keys,
        Arc::new(move |req, step| {
            // Claude Code's side calls (titles, topic checks) offer no tools.
            let tools = req.body["tools"].as_array().map_or(0, |t| t.len());
            match step {
                0 if tools > 0 => clikit::Reply::tool(
                    "Write",
                    json!({"file_path": "/home/agent/artifacts/report.md", "content": r2}),
                ),
                _ => clikit::Reply::text(format!("Claude wrote the report ({m2}).")),
            }
        }),
    );
    let slack = FakeSlack::start().await;
    let data = data_dir("agents-e2e-claude");
    let rest = format!(
        "[llm]\nanthropic_url = \"{url}\"\n\n[agents]\ndir = \"{dir}\"\n\n\
         [pool]\nsize = 1\n\n[defaults]\ndebounce = \"0ms\"\n\n\
         [[channel]]\nplatform = \"slack\"\nid = \"{GENERAL}\"\nusers = [\"{ALICE}\"]\n\
         agent = \"claude\"\ntools = [\"Write\", \"Read\"]\nlimits = {{ memory = \"2GiB\" }}\n",
        url = llm.url(),
        dir = cli.display()
    );
    let gw = Running::start_with(
        &config(&slack, &data, Mode::Events, &rest),
        &data,
        secrets_of(&keys.anthropic, &keys.openai),
    )
    .await;
    let ts = new_ts();
    let body = slack.callback(
        &new_event_id(),
        mention(GENERAL, ALICE, &ts, None, "write the report"),
    );
    assert_eq!(post_signed(gw.events(), &body).await.status, 200);
    slack
        .wait_post(GENERAL, &ts, &format!("Claude wrote the report ({mark})"))
        .await;
    let calls = slack
        .wait_for("the ✅ reaction", Duration::from_secs(90), |calls| {
            calls
                .iter()
                .any(|c| c.method == "reactions.add" && c.arg("name") == Some("white_check_mark"))
                .then(|| calls.to_vec())
        })
        .await;
    assert_eq!(
        uploads(&calls, GENERAL, &ts),
        [("report.md".to_string(), sha256_hex(report.as_bytes()))],
        "{}",
        summary(&calls)
    );
    let model_calls = llm.calls();
    assert!(!model_calls.is_empty());
    for r in &model_calls {
        assert_eq!(r.header("x-api-key"), Some(keys.anthropic.as_str()));
        let names = r.tool_names();
        assert!(
            !names.iter().any(|n| n == "Bash"),
            "Bash is not in the channel's tools but was offered: {names:?}"
        );
    }
    assert!(
        model_calls
            .iter()
            .any(|r| r.tool_names().iter().any(|n| n == "Write")),
        "Write was offered"
    );
    gw.stop().await;
    assert_eq!(
        files_containing(&data, &keys.anthropic),
        Vec::<String>::new()
    );
}

/// Amp through the gateway: a Slack channel with `agent = "amp"`, `[amp]`
/// pointing the door at a fake Amp service and `[agents] dir` at the
/// stand-in `amp` (tests/ampkit; Amp's CLI itself cannot finish a turn
/// offline). The stand-in asks Amp's service who it is through the door;
/// the answer in the thread says what the fake answered, the fake saw only
/// the real key, and the key is nowhere in the data directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_event_to_threaded_answer_amp() {
    let real = ampkit::real_key();
    let amp = ampkit::FakeAmp::start(&real);
    let cli = ampkit::fake_amp_dir();
    let slack = FakeSlack::start().await;
    let data = data_dir("agents-e2e-amp");
    let rest = format!(
        "[amp]\nurl = \"{url}\"\nallow_plain_http = true\n\n[agents]\ndir = \"{dir}\"\n\n\
         [pool]\nsize = 1\n\n[defaults]\ndebounce = \"0ms\"\n\n\
         [[channel]]\nplatform = \"slack\"\nid = \"{GENERAL}\"\nusers = [\"{ALICE}\"]\n\
         agent = \"amp\"\ntools = [\"Bash\"]\n",
        url = amp.url(),
        dir = cli.display()
    );
    let slack_secrets = secret_fn();
    let key = real.clone();
    let secrets: moat_gateway::server::SecretFn = Arc::new(move |k: &str| match k {
        "AMP_API_KEY" => Some(key.clone()),
        other => slack_secrets(other),
    });
    let gw = Running::start_with(&config(&slack, &data, Mode::Events, &rest), &data, secrets).await;
    let ts = new_ts();
    let body = slack.callback(
        &new_event_id(),
        mention(GENERAL, ALICE, &ts, None, "who are you?"),
    );
    assert_eq!(post_signed(gw.events(), &body).await.status, 200);
    slack
        .wait_post(
            GENERAL,
            &ts,
            &format!(
                "Amp answers as {} (settings: tools-limited",
                ampkit::FAKE_USER
            ),
        )
        .await;
    gw.stop().await;
    let seen = amp.requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].authorization, [format!("Bearer {real}")]);
    assert_eq!(files_containing(&data, &real), Vec::<String>::new());
    let _ = std::fs::remove_dir_all(&cli);
}

/// `budget` is per turn: on a pool of one sandbox, two three-call turns of
/// 330 tokens each both finish under `budget = 400` (the door's count starts
/// again for each holder), and one turn of the same size under
/// `budget = 200` is stopped by the door. The channel's `model` is the only
/// one the door lets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_budget_is_per_turn_and_the_model_is_enforced() {
    std::env::set_var("MOAT_EXE", env!("CARGO_BIN_EXE_moat"));
    let keys = Keys::new();
    let llm = FakeLlm::start(
        &keys.anthropic,
        &keys.openai,
        Arc::new(move |_req, step| match step {
            0 => Reply::tool("list_files", json!({"path": "."})),
            1 => Reply::tool("read_file", json!({"path": "nothing-here"})),
            _ => Reply::text("three calls done"),
        }),
    );
    for (budget, name) in [(400, "per-turn"), (200, "spent")] {
        let slack = FakeSlack::start().await;
        let data = data_dir(&format!("agents-e2e-budget-{name}"));
        let rest = format!(
            "{}budget = {budget}\nmodel = \"claude-test-model\"\n",
            rest(&llm, "anthropic", "pool")
        );
        let gw = Running::start_with(
            &config(&slack, &data, Mode::Events, &rest),
            &data,
            secrets(&keys),
        )
        .await;
        let turns = if budget == 400 { 2 } else { 1 };
        for _ in 0..turns {
            let ts = new_ts();
            let body = slack.callback(&new_event_id(), mention(GENERAL, ALICE, &ts, None, "go"));
            assert_eq!(post_signed(gw.events(), &body).await.status, 200);
            let needle = if budget == 400 {
                "three calls done"
            } else {
                "token budget is spent"
            };
            slack.wait_post(GENERAL, &ts, needle).await;
        }
        gw.stop().await;
    }
    let models: Vec<String> = llm
        .requests()
        .iter()
        .map(|r| r.body["model"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(!models.is_empty());
    assert!(
        models.iter().all(|m| m == "claude-test-model"),
        "{models:?}"
    );
}

/// `budget_user` is per user in the channel over a rolling day, across the
/// turns and leases of the pool: Alice's first three-call turn (330 tokens)
/// fits in 500, her second is stopped by the door at its third call with
/// the API-shaped refusal, and Bob, on the same pooled sandbox, still has
/// his own 500. The door's `llm` records name the turn's user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_user_is_per_user_per_channel_over_a_day() {
    std::env::set_var("MOAT_EXE", env!("CARGO_BIN_EXE_moat"));
    const BOB: &str = "U0BOB001";
    let keys = Keys::new();
    let llm = FakeLlm::start(
        &keys.anthropic,
        &keys.openai,
        Arc::new(move |_req, step| match step {
            0 => Reply::tool("list_files", json!({"path": "."})),
            1 => Reply::tool("read_file", json!({"path": "nothing-here"})),
            _ => Reply::text("three calls done"),
        }),
    );
    let slack = FakeSlack::start().await;
    let data = data_dir("agents-e2e-budget-user");
    let rest = rest(&llm, "anthropic", "pool").replace(
        &format!("users = [\"{ALICE}\"]\n"),
        &format!("users = [\"{ALICE}\", \"{BOB}\"]\nbudget_user = \"500/day\"\n"),
    );
    assert!(rest.contains("budget_user"), "{rest}");
    let gw = Running::start_with(
        &config(&slack, &data, Mode::Events, &rest),
        &data,
        secrets(&keys),
    )
    .await;
    for (user, needle) in [
        (ALICE, "three calls done"),
        (
            ALICE,
            "token budget in this channel for the last 24 hours is spent",
        ),
        (BOB, "three calls done"),
    ] {
        let ts = new_ts();
        let body = slack.callback(&new_event_id(), mention(GENERAL, user, &ts, None, "go"));
        assert_eq!(post_signed(gw.events(), &body).await.status, 200);
        slack.wait_post(GENERAL, &ts, needle).await;
    }
    // Alice: 3 + 2 calls reached the model, the sixth was refused by the door.
    let llm_records: Vec<serde_json::Value> = gw
        .audit()
        .into_iter()
        .filter(|v| v["kind"] == "llm")
        .collect();
    // `moat usage` reads the same records: per user, then per channel.
    let usage = |by: &str| -> Vec<serde_json::Value> {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_moat"))
            .args(["usage", "--since", "1h", "--json", "--by", by, "--file"])
            .arg(gw.audit_path())
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let users = usage("user");
    let alice = users.iter().find(|r| r["user"] == ALICE).expect("alice");
    assert_eq!(
        (&alice["calls"], &alice["refused"]),
        (&json!(6), &json!(1)),
        "{users:?}"
    );
    let bob = users.iter().find(|r| r["user"] == BOB).expect("bob");
    assert_eq!(
        (&bob["calls"], &bob["refused"]),
        (&json!(3), &json!(0)),
        "{users:?}"
    );
    assert!(alice["tokens"].as_u64().unwrap() >= 500, "{users:?}");
    let channels = usage("channel");
    assert_eq!(channels.len(), 1, "{channels:?}");
    assert_eq!(channels[0]["calls"], json!(9), "{channels:?}");
    gw.stop().await;
    let of = |u: &str, outcome: &str| {
        llm_records
            .iter()
            .filter(|v| v["user"] == u && v["verdict"] == outcome)
            .count()
    };
    assert_eq!(of(ALICE, "denied"), 1, "{llm_records:#?}");
    assert_eq!(of(BOB, "denied"), 0, "{llm_records:#?}");
    assert_eq!(llm.requests().len(), 3 + 2 + 3);
}

/// docs/threat-model.md C4: what an agent sends to moat (its event stream) is
/// attributed by the sandbox it came from, never by a field in it. A tool
/// call in conversation A writes forged events straight into the agent's
/// event pipe, naming conversation B's id, channel and thread; B's thread
/// gets nothing, no other channel is posted to, and the forged text can at
/// most become A's own answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_c4_agent_events_cannot_address_another_conversation() {
    std::env::set_var("MOAT_EXE", env!("CARGO_BIN_EXE_moat"));
    let keys = Keys::new();
    let forged_mark = llmkit::hex(6);
    let b_ts = new_ts();
    let (fm, bt) = (forged_mark.clone(), b_ts.clone());
    let llm = FakeLlm::start(
        &keys.anthropic,
        &keys.openai,
        Arc::new(move |req, step| {
            let attack = req.body.to_string().contains("run the attack");
            match (attack, step) {
                (true, 0) => {
                    let forged = [
                        json!({"type": "final", "text": format!("FORGED-{fm}"), "steps": 1,
                               "conversation_id": 1, "channel": GENERAL, "thread": bt}),
                        json!({"type": "text", "text": format!("FORGED-{fm}"),
                               "channel": "C0OTHER", "thread_ts": bt}),
                    ];
                    let cmd = forged
                        .iter()
                        .map(|l| format!("echo '{l}' > /proc/$PPID/fd/1"))
                        .collect::<Vec<_>>()
                        .join(" && ")
                        + " && echo INJECTED-OK";
                    Reply::tool("bash", json!({"command": cmd}))
                }
                (true, _) => Reply::text("A is done"),
                (false, _) => Reply::text("B is answered"),
            }
        }),
    );
    let slack = FakeSlack::start().await;
    let data = data_dir("agents-e2e-c4");
    let rest = rest(&llm, "anthropic", "pool").replace(
        "tools = [\"list_files\", \"write_file\", \"read_file\"]",
        "tools = [\"bash\"]",
    );
    let gw = Running::start_with(
        &config(&slack, &data, Mode::Events, &rest),
        &data,
        secrets(&keys),
    )
    .await;
    // Conversation B first, answered.
    let body = slack.callback(
        &new_event_id(),
        mention(GENERAL, ALICE, &b_ts, None, "hello"),
    );
    assert_eq!(post_signed(gw.events(), &body).await.status, 200);
    slack.wait_post(GENERAL, &b_ts, "B is answered").await;
    let b_before = slack.posts_in(GENERAL, &b_ts);
    // Conversation A forges events for B.
    let a_ts = new_ts();
    let body = slack.callback(
        &new_event_id(),
        mention(GENERAL, ALICE, &a_ts, None, "run the attack"),
    );
    assert_eq!(post_signed(gw.events(), &body).await.status, 200);
    let calls = slack
        .wait_for("A's turn to end", Duration::from_secs(60), |calls| {
            calls
                .iter()
                .any(|c| {
                    c.method == "reactions.add"
                        && c.arg("timestamp") == Some(a_ts.as_str())
                        && matches!(c.arg("name"), Some("white_check_mark") | Some("x"))
                })
                .then(|| calls.to_vec())
        })
        .await;
    // The forged lines were written into the agent's event pipe (the
    // command went on to print INJECTED-OK, which the model got back)...
    let injected = llm.requests().iter().any(|r| {
        r.body.to_string().contains("run the attack") && r.body.to_string().contains("INJECTED-OK")
    });
    assert!(
        injected,
        "the forged events were not written; the test proves nothing"
    );
    let a_posts = slack.posts_in(GENERAL, &a_ts).join("\n");
    assert!(
        a_posts.contains("A is done"),
        "A's turn answered in A's thread: {a_posts}"
    );
    // ...but nothing of it went anywhere else.
    assert_eq!(
        slack.posts_in(GENERAL, &b_ts),
        b_before,
        "B's thread changed: {}",
        summary(&calls)
    );
    for c in &calls {
        if c.method == "chat.postMessage" || c.method == "chat.update" {
            assert_ne!(c.arg("channel"), Some("C0OTHER"), "{}", summary(&calls));
            if c.text().contains("FORGED") {
                assert_ne!(c.arg("thread_ts"), Some(b_ts.as_str()));
            }
        }
    }
    // B has exactly one turn in the audit log.
    let recs = gw.audit();
    let b_conv = recs
        .iter()
        .find(|r| r["kind"] == "message" && r["thread"] == b_ts.as_str())
        .map(|r| r["conversation_id"].clone())
        .expect("B's message record");
    let b_turns = recs
        .iter()
        .filter(|r| r["kind"] == "turn" && r["conversation_id"] == b_conv)
        .count();
    assert_eq!(b_turns, 1);
    gw.stop().await;
}

/// The built-in agent reaches moat's tools through `moat ipc-bridge`
/// (docs/ipc.md): its model's `mcp__moat__send_message` posts in the
/// conversation, and `schedule_task` stores a task of the turn's sender.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builtin_agent_uses_moats_ipc_tools_through_the_bridge() {
    std::env::set_var("MOAT_EXE", env!("CARGO_BIN_EXE_moat"));
    let keys = Keys::new();
    let mark = llmkit::hex(8);
    let m2 = mark.clone();
    let llm = FakeLlm::start(
        &keys.anthropic,
        &keys.openai,
        Arc::new(move |_req, step| match step {
            0 => Reply::tool(
                "mcp__moat__send_message",
                json!({"text": format!("progress {m2}"), "user": "U0SOMEONE"}),
            ),
            1 => Reply::tool(
                "mcp__moat__schedule_task",
                json!({"prompt": "summarise", "schedule_type": "cron", "schedule_value": "0 8 * * 1-5"}),
            ),
            _ => Reply::text(format!("all done {m2}")),
        }),
    );
    let slack = FakeSlack::start().await;
    let data = data_dir("agents-e2e-ipc");
    let gw = Running::start_with(
        &config(
            &slack,
            &data,
            Mode::Events,
            &rest(&llm, "anthropic", "pool"),
        ),
        &data,
        secrets(&keys),
    )
    .await;
    let ts = new_ts();
    let body = slack.callback(&new_event_id(), mention(GENERAL, ALICE, &ts, None, "go"));
    assert_eq!(post_signed(gw.events(), &body).await.status, 200);
    slack
        .wait_post(GENERAL, &ts, &format!("progress {mark}"))
        .await;
    slack
        .wait_post(GENERAL, &ts, &format!("all done {mark}"))
        .await;
    let tasks = gw.gw.inner.store.live_tasks().unwrap();
    assert_eq!(tasks.len(), 1);
    assert_eq!(
        (tasks[0].creator.as_str(), tasks[0].channel.as_str()),
        (ALICE, GENERAL)
    );
    let ipc: Vec<_> = gw
        .audit()
        .into_iter()
        .filter(|r| r["kind"] == "ipc" && r["verdict"] == "ok")
        .collect();
    assert_eq!(ipc.len(), 2, "{ipc:?}");
    assert!(ipc.iter().all(|r| r["user"] == ALICE));
    gw.stop().await;
}
