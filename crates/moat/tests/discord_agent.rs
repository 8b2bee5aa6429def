//! The built-in agent on Discord end to end: a direct message arrives on the
//! fake Discord's Gateway (moat-gateway's tests/discord_fake), the gateway
//! (in this process, real bwrap sandboxes) runs the channel's built-in agent
//! in the conversation's sandbox, its model calls go through the door's LLM
//! proxy to a scripted fake Anthropic upstream (tests/llmkit), and the
//! answer and the agent's artifact come back through Discord's REST API.
//!
//! What it checks: the agent's Markdown answer (not a code block) arrives
//! in the direct message channel; the `@everyone`, the user and role
//! mentions and the masked link the model wrote are not live (P3) and no
//! message may mention anyone; the artifact is uploaded with its exact
//! bytes; the real key never reaches Discord.
//! Run as root: `cargo test -p moat --test discord_agent`.

#[path = "../../moat-gateway/tests/discord_fake/mod.rs"]
mod discord_fake;
#[path = "../../moat-gateway/tests/gwkit/mod.rs"]
mod gwkit;
mod llmkit;

use std::sync::Arc;

use discord_fake::*;
use gwkit::*;
use llmkit::{FakeLlm, Keys, Reply};
use serde_json::json;

const ALICE: &str = "4242";

#[test]
fn the_builtin_agent_answers_a_discord_dm_with_markdown_that_pings_nobody_and_a_file() {
    std::env::set_var("MOAT_EXE", env!("CARGO_BIN_EXE_moat"));
    let keys = Keys::new();
    let mark = llmkit::hex(8);
    let report = format!("# Report {mark}\n");
    let (r2, m2) = (report.clone(), mark.clone());
    let llm = FakeLlm::start(
        &keys.anthropic,
        &keys.openai,
        Arc::new(move |_req, step| {
            match step {
            0 => Reply::tool(
                "write_file",
                json!({"path": "/home/agent/artifacts/report.md", "content": r2}),
            ),
            _ => Reply::text(format!(
                "**Done** ({m2}) @everyone <@{ALICE}> <@&77> see [✅ moat: approved](https://evil.example/x)"
            )),
        }
        }),
    );
    let fake = FakeDiscord::start();
    let toml = format!(
        r#"
[web]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"

[llm]
anthropic_url = "{llm}"

[discord]
enabled = true
api_url = "http://{rest}/api/v10"
gateway_url = "ws://{gw}"

[pool]
size = 1

[defaults]
debounce = "0ms"

[[channel]]
platform = "discord"
id = "dm"
users = ["{ALICE}"]
agent = "builtin"
provider = "anthropic"
tools = ["write_file"]
"#,
        llm = llm.url(),
        rest = fake.rest,
        gw = fake.gateway,
    );
    let gw = Gw::start_with(
        "dc-builtin",
        &toml,
        vec![
            ("DISCORD_BOT_TOKEN".into(), TOKEN.into()),
            ("ANTHROPIC_API_KEY".into(), keys.anthropic.clone()),
            ("MOAT_LLM_ALLOW_PLAIN_HTTP".into(), "1".into()),
        ],
    );
    fake.wait_ready();
    fake.dispatch(
        "MESSAGE_CREATE",
        message(DM, true, ALICE, "write me a report", false),
    );
    let calls = fake.wait("the answer and the ✅", |c| {
        c.iter()
            .any(|c| c.method == "PUT" && c.body["emoji"] == json!("✅"))
    });
    let answers = fake.posted_with(&mark);
    assert_eq!(answers.len(), 1, "{answers:?}");
    let a = &answers[0];
    assert!(a.path.contains(DM));
    let text = a.body["content"].as_str().unwrap();
    assert!(
        !text.contains("```"),
        "an agent's answer is Markdown: {text}"
    );
    assert!(text.starts_with("**Done**"), "{text}");
    for live in ["@everyone", "<@4242>", "<@&77>", "](https://"] {
        assert!(!text.contains(live), "{live} is live in {text}");
    }
    assert!(
        text.contains("✅ moat: approved (<https://evil.example/x>)"),
        "{text}"
    );
    assert_eq!(a.body["allowed_mentions"]["parse"], json!([]));
    // The artifact, with the agent's exact bytes.
    let up = calls
        .iter()
        .find(|c| c.raw.windows(8).any(|w| w == b"files[0]"))
        .expect("the upload");
    let raw = String::from_utf8_lossy(&up.raw);
    assert!(raw.contains("filename=\"report.md\""), "{raw}");
    assert!(raw.contains(&report), "{raw}");
    // The real key never reached Discord.
    for c in &calls {
        let raw = String::from_utf8_lossy(&c.raw);
        assert!(!raw.contains(&keys.anthropic));
        assert!(!c.body.to_string().contains(&keys.anthropic));
    }
    assert!(llm.requests().len() >= 2);
    gw.stop();
}
