//! The whole janebot flow in moat: a fake Slack mention in a channel with
//! `github = { ..., clone = ... }` → the turn's workspace starts with the
//! repository on a conversation branch → the built-in agent (a scripted fake
//! Anthropic upstream through the door's LLM proxy) edits a file, commits,
//! pushes the branch and opens a pull request with `gh` → the Slack thread
//! gets the answer with the branch and the pull request's link, from the
//! door's own record. The fake GitHub (`netkit/fake_github.py`) saw only the
//! real token (minted for the channel's repository, revoked after the
//! turn); the sandbox only ever held placeholders.
//!
//! `MOAT_E2E_ROUNDS` (default 1) repeats the mention to time it: each
//! round prints mention → link in the thread, and the fake LLM's own time.
//! Must never: contact anything but the fakes on 127.0.0.1.

#[path = "../../moat-gateway/tests/slack_kit/mod.rs"]
mod slack_kit;

mod githubkit;
mod llmkit;
mod netkit;

use std::sync::Arc;
use std::time::Instant;

use githubkit::{app_key, FakeGithub, APP_ID, INSTALLATION, OWNER, REPO};
use llmkit::{FakeLlm, Keys, Reply};
use serde_json::json;
use slack_kit::*;

const ALICE: &str = "U0ALICE1";
const GENERAL: &str = "C0GENERAL";

fn secrets(keys: &Keys) -> moat_gateway::server::SecretFn {
    let slack = secret_fn();
    let a = keys.anthropic.clone();
    Arc::new(move |k: &str| match k {
        "ANTHROPIC_API_KEY" => Some(a.clone()),
        "MOAT_LLM_ALLOW_PLAIN_HTTP" => Some("1".into()),
        "GITHUB_APP_ID" => Some(APP_ID.into()),
        "GITHUB_APP_PRIVATE_KEY" => Some(app_key().private_pem.clone()),
        "GITHUB_APP_INSTALLATION_ID" => Some(INSTALLATION.into()),
        other => slack(other),
    })
}

/// The agent's one tool call: edit, commit, push the conversation branch,
/// open the pull request with `gh pr create` (GraphQL, through the door).
const WORK: &str = r#"cd /workspace/@R@ && echo fixed > FIXED && git add FIXED \
 && git -c user.name=agent -c user.email=agent@moat.invalid commit -qm 'fix the thing' \
 && git push -q origin HEAD 2>&1 \
 && gh pr create --head "$(git branch --show-current)" --base main --title 'Fix the thing' --body 'Asked for in Slack'"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slack_mention_ends_in_a_pull_request_link_in_the_thread() {
    std::env::set_var("MOAT_EXE", env!("CARGO_BIN_EXE_moat"));
    let keys = Keys::new();
    let github = FakeGithub::start();
    let work = WORK.replace("@O@", OWNER).replace("@R@", REPO);
    let llm = FakeLlm::start(
        &keys.anthropic,
        &keys.openai,
        Arc::new(move |_req, step| match step {
            0 => Reply::tool("bash", json!({"command": work})),
            _ => Reply::text("I fixed the thing and opened a pull request."),
        }),
    );
    let slack = FakeSlack::start().await;
    let data = data_dir("github-slack-e2e");
    let rest = format!(
        "[llm]\nanthropic_url = \"{llm}\"\n\n\
         [github]\napi_url = \"{api}\"\nweb_url = \"{web}\"\nallow_plain_http = true\n\n\
         [pool]\nsize = 1\n\n[defaults]\ndebounce = \"0ms\"\n\n\
         [[channel]]\nplatform = \"slack\"\nid = \"{GENERAL}\"\nusers = [\"{ALICE}\"]\n\
         agent = \"builtin\"\nprovider = \"anthropic\"\ntools = [\"bash\"]\n\
         github = {{ repos = [\"{OWNER}/{REPO}\"], clone = \"{OWNER}/{REPO}\" }}\n",
        llm = llm.url(),
        api = github.api_url(),
        web = github.web_url(),
    );
    let gw = Running::start_with(
        &config(&slack, &data, Mode::Events, &rest),
        &data,
        secrets(&keys),
    )
    .await;

    let rounds: usize = std::env::var("MOAT_E2E_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    for round in 1..=rounds {
        llm.reset_stats();
        let ts = new_ts();
        let body = slack.callback(
            &new_event_id(),
            mention(GENERAL, ALICE, &ts, None, "please fix the thing"),
        );
        let t0 = Instant::now();
        assert_eq!(post_signed(gw.events(), &body).await.status, 200);
        let link = format!("https://github.com/{OWNER}/{REPO}/pull/{round}");
        let answer = slack
            .wait_post(GENERAL, &ts, &format!("opened pull request #{round}"))
            .await;
        let took = t0.elapsed();
        let text = answer.arg("text").unwrap_or("").to_string();
        assert!(text.contains("I fixed the thing"), "{text}");
        assert!(text.contains(&link), "the link in the thread: {text}");
        assert!(
            text.contains("pushed moat/") && text.contains(&format!("to {OWNER}/{REPO}")),
            "{text}"
        );
        eprintln!(
            "round {round}: mention → pull request link in the thread {:.0} ms (fake LLM {:.1} ms)",
            took.as_secs_f64() * 1000.0,
            llm.handler_time().as_secs_f64() * 1000.0
        );
    }

    // The pull requests exist at the fake, from conversation branches.
    let pulls = github.kind("pull");
    assert_eq!(pulls.len(), rounds, "{pulls:?}");
    assert!(pulls[0]["head"].as_str().unwrap_or("").starts_with("moat/"));
    assert!(pulls.iter().all(|p| p["via"] == "graphql"), "{pulls:?}");
    // Real tokens only at the fake, one per turn, each revoked.
    github.assert_swapped(&[]);
    let tokens = github.tokens();
    assert_eq!(tokens.len(), rounds);
    for t in &tokens {
        github.wait_for("revoked", |r| r["token"] == t.as_str());
        let calls = format!("{:?}", slack.calls());
        assert!(!calls.contains(t.as_str()), "a token in Slack's calls");
    }
    gw.stop().await;
}
