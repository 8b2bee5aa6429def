//! Triggers as NanoClaw has them (docs/trust.md, issue 13 part 5): in a
//! channel with `trigger = "^@Andy"`, messages without the trigger start no
//! turn but are read as context by the next turn. End to end: the web chat
//! (in this process, real bwrap sandboxes), the built-in agent, its model
//! calls through the door's LLM proxy to a scripted fake Anthropic upstream
//! (tests/llmkit), which records what the agent was given.
//! Run as root: `cargo test -p moat --test trigger_context`.

#[path = "../../moat-gateway/tests/gwkit/mod.rs"]
mod gwkit;
mod llmkit;

use std::sync::Arc;

use gwkit::*;
use llmkit::{FakeLlm, Keys, Reply};

#[test]
fn messages_without_the_trigger_are_the_next_turns_context() {
    std::env::set_var("MOAT_EXE", env!("CARGO_BIN_EXE_moat"));
    let keys = Keys::new();
    let mark = llmkit::hex(8);
    let llm = FakeLlm::start(
        &keys.anthropic,
        &keys.openai,
        Arc::new(move |_req, _step| Reply::text("noted")),
    );
    let toml = format!(
        r#"
[web]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"

[llm]
anthropic_url = "{llm}"

[pool]
size = 1

[defaults]
debounce = "0ms"

[[channel]]
platform = "web"
id = "*"
users = ["*"]
agent = "builtin"
provider = "anthropic"
trigger = "^@Andy"
"#,
        llm = llm.url(),
    );
    let gw = Gw::start_with(
        "trigger-context",
        &toml,
        vec![
            ("ANTHROPIC_API_KEY".into(), keys.anthropic.clone()),
            ("MOAT_LLM_ALLOW_PLAIN_HTTP".into(), "1".into()),
        ],
    );
    let c = gw.client(None);
    for i in 1..=2 {
        let r = c.post("t", &format!("the build broke, ctx-{i}-{mark}"));
        assert_eq!(r.status, 202, "{r:?}");
    }
    // No turn yet: nothing reached the model.
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(
        llm.requests().is_empty(),
        "an untriggered message started a turn"
    );
    let r = c.post("t", &format!("@Andy what broke? ask-{mark}"));
    assert_eq!(r.status, 202, "{r:?}");
    let mut sse = c.events("t").expect("the event stream");
    let evs = sse.answers(1);
    assert_eq!(
        answers_of(&evs),
        vec![("noted".to_string(), true)],
        "{evs:#?}"
    );
    let reqs = llm.requests();
    assert_eq!(reqs.len(), 1, "one turn, one model call");
    let sent = reqs[0].body.to_string();
    for i in 1..=2 {
        assert!(
            sent.contains(&format!("ctx-{i}-{mark}")),
            "context message {i} not given to the agent: {sent}"
        );
    }
    // The trigger is taken off the turn's own text.
    assert!(sent.contains(&format!("what broke? ask-{mark}")), "{sent}");
    let recs = gw.audit_kind("message");
    assert_eq!(
        recs.iter().filter(|r| r["verdict"] == "context").count(),
        2,
        "{recs:#?}"
    );
    gw.stop();
}
