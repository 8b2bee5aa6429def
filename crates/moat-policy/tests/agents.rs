//! The agent keys of the gateway file: which agent, provider, model, tools,
//! MCP servers, steps, persona, budget and artifact limits; `[[mcp]]`,
//! `[llm]` and `[agents]`. Every bad value fails at load naming its key.

use std::path::PathBuf;

use moat_policy::gateway::{AgentKind, GatewayConfig, LlmProvider};
use moat_policy::PolicyError;

fn parse(text: &str) -> GatewayConfig {
    GatewayConfig::from_toml(text).unwrap_or_else(|e| panic!("{e}\n--- in:\n{text}"))
}

fn fails(text: &str) -> (String, String) {
    match GatewayConfig::from_toml(text) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(PolicyError::Invalid { key, message }) => (key, message),
        Err(PolicyError::Syntax { key, message, .. }) => (key, message),
    }
}

const CHANNEL: &str = "[[channel]]\nplatform = \"web\"\nid = \"*\"\nusers = [\"*\"]\n";

#[test]
fn a_full_agent_channel_loads() {
    let c = parse(
        r#"
        [llm]
        anthropic_url = "http://127.0.0.1:9999/"

        [agents]
        dir = "/var/lib/moat/agents/current"

        [[mcp]]
        name = "docs"
        command = ["/usr/bin/python3", "/opt/mcp/docs.py", "--ro"]
        env = { DOCS_ROOT = "/workspace/docs" }

        [[mcp]]
        name = "other"
        command = ["/usr/bin/true"]

        [defaults]
        agent = "builtin"
        provider = "openai"
        max_steps = 12

        [[channel]]
        platform = "slack"
        id = "C1"
        users = ["*"]
        tools = ["read_file", "list_files", "search"]
        mcp = ["docs"]
        model = "gpt-5-mini"
        persona = "/etc/moat/persona.md"
        budget = 100000
        artifacts = { max_files = 3, max_bytes = "2MB" }

        [[channel]]
        platform = "slack"
        id = "C2"
        users = ["*"]
        agent = "claude"
        provider = "anthropic"
        tools = ["Read", "Grep"]
        "#,
    );
    let a = &c.channels[0].agent;
    assert_eq!(a.kind, Some(AgentKind::Builtin));
    assert_eq!(a.provider, Some(LlmProvider::Openai));
    assert_eq!(a.model.as_deref(), Some("gpt-5-mini"));
    assert_eq!(
        a.tools.as_deref(),
        Some(
            &[
                "read_file".to_string(),
                "list_files".into(),
                "search".into()
            ][..]
        )
    );
    assert_eq!(a.mcp.len(), 1, "only the server the channel names");
    assert_eq!(a.mcp[0].name, "docs");
    assert_eq!(a.mcp[0].command[1], "/opt/mcp/docs.py");
    assert_eq!(a.mcp[0].env["DOCS_ROOT"], "/workspace/docs");
    assert_eq!(a.max_steps, 12, "from [defaults]");
    assert_eq!(a.persona, Some(PathBuf::from("/etc/moat/persona.md")));
    assert_eq!(a.budget, Some(100000));
    assert_eq!(
        (a.artifacts.max_files, a.artifacts.max_bytes),
        (3, 2 * 1024 * 1024)
    );
    let b = &c.channels[1].agent;
    assert_eq!(b.kind, Some(AgentKind::ClaudeCode));
    assert!(b.mcp.is_empty());
    assert_eq!(
        (b.artifacts.max_files, b.artifacts.max_bytes),
        (10, 10 * 1024 * 1024),
        "the defaults: 10 files of 10 MB"
    );
    assert_eq!(
        c.llm.anthropic_url.as_deref(),
        Some("http://127.0.0.1:9999")
    );
    assert_eq!(
        c.agents.dir,
        Some(PathBuf::from("/var/lib/moat/agents/current"))
    );
}

#[test]
fn bad_agent_settings_fail_naming_the_key() {
    let mcp = "[[mcp]]\nname = \"docs\"\ncommand = [\"/usr/bin/true\"]\n";
    let cases: Vec<(String, &str, &str)> = vec![
        (
            format!("{CHANNEL}agent = \"gpt\""),
            "channel[0].agent",
            "unknown agent",
        ),
        (
            format!("{CHANNEL}agent = \"builtin\"\ntools = [\"find_thread\"]"),
            "channel[0].tools[0]",
            "other people's conversations",
        ),
        (
            format!("{CHANNEL}agent = \"claude\"\ntools = [\"Read\", \"read-thread\"]"),
            "channel[0].tools[1]",
            "never enables thread-search",
        ),
        (
            format!("{CHANNEL}agent = \"builtin\"\ntools = [\"Bash\"]"),
            "channel[0].tools[0]",
            "has no tool \"Bash\"",
        ),
        (
            format!("{CHANNEL}agent = \"builtin\"\ntools = [\"rm -rf\"]"),
            "channel[0].tools[0]",
            "not a tool name",
        ),
        (
            format!("{CHANNEL}agent = \"shell\"\ntools = [\"bash\"]"),
            "channel[0].tools",
            "shell agent",
        ),
        (
            format!("{CHANNEL}agent = \"shell\"\nmodel = \"x\""),
            "channel[0].model",
            "shell agent",
        ),
        (
            format!("{CHANNEL}agent = \"claude\"\nprovider = \"openai\""),
            "channel[0].provider",
            "speaks anthropic only",
        ),
        (
            format!("{CHANNEL}agent = \"codex\"\nprovider = \"anthropic\""),
            "channel[0].provider",
            "speaks openai only",
        ),
        (
            format!("{CHANNEL}provider = \"gemini\""),
            "channel[0].provider",
            "\"anthropic\" or \"openai\"",
        ),
        (
            format!("{CHANNEL}mcp = [\"docs\"]"),
            "channel[0].mcp[0]",
            "no [[mcp]] server named \"docs\" (none is defined)",
        ),
        (
            format!("{mcp}{CHANNEL}mcp = [\"doc\"]"),
            "channel[0].mcp[0]",
            "defined: docs",
        ),
        (
            format!("{mcp}{CHANNEL}mcp = [\"docs\", \"docs\"]"),
            "channel[0].mcp[1]",
            "listed twice",
        ),
        (
            format!("{CHANNEL}max_steps = 0"),
            "channel[0].max_steps",
            "1 to 200",
        ),
        (
            format!("{CHANNEL}max_steps = 201"),
            "channel[0].max_steps",
            "1 to 200",
        ),
        (
            format!("{CHANNEL}persona = \"persona.md\""),
            "channel[0].persona",
            "absolute path",
        ),
        (
            format!("{CHANNEL}budget = 0"),
            "channel[0].budget",
            "1 or more",
        ),
        (
            format!("{CHANNEL}artifacts = {{ max_files = 101 }}"),
            "channel[0].artifacts.max_files",
            "0 (send none) to 100",
        ),
        (
            format!("{CHANNEL}artifacts = {{ max_bytes = \"1GB\" }}"),
            "channel[0].artifacts.max_bytes",
            "1 byte to 100MiB",
        ),
        (
            format!("{CHANNEL}artifacts = {{ max_bytes = \"lots\" }}"),
            "channel[0].artifacts.max_bytes",
            "",
        ),
        (
            format!("{CHANNEL}artifacts = {{ max_size = 3 }}"),
            "channel[0].artifacts.max_size",
            "unknown field",
        ),
        (
            "[[mcp]]\nname = \"a b\"\ncommand = [\"/x\"]".into(),
            "mcp[0].name",
            "not a server name",
        ),
        (
            "[[mcp]]\nname = \"a\"\ncommand = [\"python3\", \"s.py\"]".into(),
            "mcp[0].command",
            "absolute path",
        ),
        (
            "[[mcp]]\nname = \"a\"\ncommand = []".into(),
            "mcp[0].command",
            "absolute path",
        ),
        (format!("{mcp}{mcp}"), "mcp[1].name", "already defined"),
        (
            "[[mcp]]\nname = \"a\"\ncommand = [\"/x\"]\nenv = { GITHUB_TOKEN = \"ghp_x\" }".into(),
            "mcp[0].env.GITHUB_TOKEN",
            "looks like a secret",
        ),
        (
            "[llm]\napi_key = \"sk-ant-x\"".into(),
            "llm.api_key",
            "secrets never go in the configuration file",
        ),
        (
            "[llm]\nopenai_api_key = \"sk-x\"".into(),
            "llm.openai_api_key",
            "OPENAI_API_KEY",
        ),
        (
            "[llm]\nanthropic_url = \"api.anthropic.com\"".into(),
            "llm.anthropic_url",
            "not a URL",
        ),
        (
            "[llm]\nuser_budget = 5".into(),
            "llm.user_budget",
            "unknown field",
        ),
        (
            "[agents]\ndir = \"agents\"".into(),
            "agents.dir",
            "absolute path",
        ),
    ];
    for (text, key, words) in cases {
        let (k, m) = fails(&text);
        assert_eq!(k, key, "wrong key for:\n{text}\nmessage: {m}");
        assert!(m.contains(words), "{key}: {m:?} lacks {words:?}");
        assert!(
            !m.contains("ghp_x") && !m.contains("sk-ant-x") && !m.contains("sk-x\""),
            "an error repeats a secret: {m}"
        );
    }
}

#[test]
fn the_embedded_default_leaves_the_agent_to_the_keys() {
    let c = GatewayConfig::embedded_default();
    assert_eq!(c.channels[0].agent.kind, None);
    assert!(c.channels[0].agent.tools.is_none());
    assert!(c.channels[0].agent.mcp.is_empty());
    assert_eq!(c.llm, Default::default());
    assert_eq!(c.agents.dir, None);
}
