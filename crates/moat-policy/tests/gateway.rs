//! The gateway configuration: every error names its key, access is closed by
//! default, authorization, the embedded default, and the documentation's
//! examples (docs/examples/moat.toml and every TOML block of
//! docs/configuration.md) parse.

use std::net::SocketAddr;
use std::time::Duration;

use moat_policy::gateway::{
    AgentKind, Authorization, GatewayConfig, Platform, Rate, SandboxMode, SlackMode, Trust, WebAuth,
};
use moat_policy::network::HostPattern;
use moat_policy::{BackendKind, ByteSize, PolicyError};
use proptest::prelude::*;

const EXAMPLE: &str = include_str!("../../../docs/examples/moat.toml");
const CONFIG_DOC: &str = include_str!("../../../docs/configuration.md");

fn key_of(e: &PolicyError) -> &str {
    match e {
        PolicyError::Invalid { key, .. } | PolicyError::Syntax { key, .. } => key,
    }
}

fn parse(text: &str) -> GatewayConfig {
    GatewayConfig::from_toml(text).unwrap_or_else(|e| panic!("{e}\n--- in ---\n{text}"))
}

const WEB_ALL: &str = "[[channel]]\nplatform = \"web\"\nid = \"*\"\nusers = [\"*\"]\n";

/// (file text, the key the error must name, a phrase the message must contain:
/// what is wrong or what to write instead).
const ERROR_CASES: &[(&str, &str, &str)] = &[
    // [amp]: the key never in the file, plain HTTP only when allowed
    ("[amp]\napi_key = \"sgamp_user_x\"", "amp.api_key", "AMP_API_KEY"),
    ("[amp]\nurl = \"ampcode.com\"", "amp.url", "https://"),
    (
        "[amp]\nurl = \"http://127.0.0.1:9\"",
        "amp.url",
        "allow_plain_http = true",
    ),
    // syntax and unknown keys
    ("unknown = 1", "unknown", "unknown field"),
    ("[web]\nlisten = 8080", "web.listen", "expected a string"),
    ("[defaults]\ntrsut = \"member\"", "defaults.trsut", "trust"),
    (
        "[[channel]]\nplatform = \"web\"\nid = \"*\"\nuser = [\"*\"]",
        "channel[0].user",
        "users",
    ),
    ("[[channel]]\nplatform = \"web\"", "channel[0]", "id"),
    (
        "[[channel]]\nplatform = \"web\"\nid = \"*\"\nrate = { user = \"5/min\", burst = 3 }",
        "channel[0].rate.burst",
        "unknown field",
    ),
    (
        "[[channel]]\nplatform = \"web\"\nid = \"*\"\nlimits = { disk = \"1G\" }",
        "channel[0].limits.disk",
        "memory",
    ),
    ("[[group]]\nname = \"eng\"", "group[0]", "users"),
    ("[defaults]\nusers = \"*\"", "defaults.users", "expected a sequence"),
    // [gateway]
    ("[gateway]\ndata_dir = \"moat\"", "gateway.data_dir", "absolute"),
    ("[gateway]\ndata_dir = \"/\"", "gateway.data_dir", "/var/lib/moat"),
    // [web]
    ("[web]\nlisten = \"localhost:8080\"", "web.listen", "127.0.0.1:8080"),
    ("[web]\nlisten = \"0.0.0.0:8080\"", "web.listen", "auth = \"token\""),
    ("[web]\nlisten = \"[::]:8080\"", "web.listen", "listen on 127.0.0.1"),
    ("[web]\nlisten = \"10.1.2.3:8080\"\nauth = \"loopback\"", "web.listen", "loopback"),
    ("[web]\nauth = \"password\"", "web.auth", "\"token\" or \"header\""),
    ("[web]\nheader = \"X-User\"", "web.header", "auth = \"header\""),
    (
        "[web]\nauth = \"header\"\ntoken_env = \"T\"",
        "web.token_env",
        "auth = \"token\"",
    ),
    ("[web]\ntrusted_proxies = [\"10.0.0.5\"]", "web.trusted_proxies", "auth = \"header\""),
    (
        "[web]\nauth = \"token\"\ntoken_env = \"sk-live-123\"",
        "web.token_env",
        "variable's name",
    ),
    ("[web]\nauth = \"header\"\nheader = \"X User\"", "web.header", "X-Forwarded-User"),
    (
        "[web]\nlisten = \"0.0.0.0:8080\"\nauth = \"header\"",
        "web.trusted_proxies",
        "trusted_proxies = [",
    ),
    (
        "[web]\nlisten = \"0.0.0.0:8080\"\nauth = \"header\"\ntrusted_proxies = [\"10.0.0.5\", \"proxy\"]",
        "web.trusted_proxies[1]",
        "not an IP address",
    ),
    (
        "[web]\nlisten = \"0.0.0.0:8080\"\nauth = \"header\"\ntrusted_proxies = [\"0.0.0.0\"]",
        "web.trusted_proxies[0]",
        "every peer",
    ),
    ("[web]\ntoken = \"hunter2\"", "web.token", "token_env"),
    ("[web]\ntokens = [\"hunter2\"]", "web.tokens", "MOAT_WEB_TOKENS"),
    // [admin]
    ("[admin]\nlisten = \"127.0.0.1:8080\"", "admin.listen", "own port"),
    (
        "[web]\nlisten = \"127.0.0.1:7000\"\n[admin]\nlisten = \"0.0.0.0:7000\"",
        "admin.listen",
        "web.listen",
    ),
    ("[admin]\nlisten = \"metrics\"", "admin.listen", "address and port"),
    // [slack]
    ("[slack]\nmode = \"rtm\"", "slack.mode", "\"events\", \"socket\" or \"off\""),
    ("[slack]\napi_url = \"slack.com/api\"", "slack.api_url", "https://"),
    (
        "[slack]\napi_url = \"http://slack.example.com/api\"",
        "slack.api_url",
        "unencrypted",
    ),
    ("[slack]\nbot_token = \"xoxb-1-2-3\"", "slack.bot_token", "SLACK_BOT_TOKEN"),
    (
        "[slack]\nsigning_secret = \"abc\"",
        "slack.signing_secret",
        "SLACK_SIGNING_SECRET",
    ),
    ("[slack]\napp_token = \"xapp-1\"", "slack.app_token", "SLACK_APP_TOKEN"),
    (
        "[slack]\nmode = \"socket\"\nlisten = \"0.0.0.0:3000\"",
        "slack.listen",
        "mode = \"events\"",
    ),
    (
        "[slack]\nmode = \"events\"\nlisten = \"127.0.0.1:9090\"",
        "slack.listen",
        "admin.listen",
    ),
    (
        "[slack]\nmode = \"events\"\nlisten = \"0.0.0.0:8080\"",
        "slack.listen",
        "web.listen",
    ),
    (
        "[web]\nenabled = false\n[slack]\nmode = \"events\"",
        "slack.listen",
        "set slack.listen",
    ),
    // [pool]
    ("[pool]\nsize = -1", "pool.size", "0 to 256"),
    ("[pool]\nsize = 1000", "pool.size", "0 to 256"),
    ("[pool]\nmax_waiters = -5", "pool.max_waiters", "0 to 10000"),
    ("[pool]\nsize = 2\nmax = 8", "pool.size", "leave it out"),
    (
        "[[channel]]\nplatform = \"web\"\nid = \"*\"\ndisk = \"8GiB\"",
        "channel[0].disk",
        "sandbox = \"per-thread\"",
    ),
    (
        "[[channel]]\nplatform = \"web\"\nid = \"*\"\nsandbox = \"per-thread\"\ndisk = \"1MiB\"",
        "channel[0].disk",
        "64MiB to 16TiB",
    ),
    ("[pool]\nmin = 4\nmax = 2", "pool.max", "below pool.min"),
    ("[pool]\nmax = 300", "pool.max", "0 to 256"),
    ("[pool]\nshrink_after = \"0s\"", "pool.shrink_after", "out of range"),
    (
        "[pool]\nmin = 0\nmax = 0\n[[channel]]\nplatform = \"web\"\nid = \"*\"",
        "channel[0].sandbox",
        "pool.max",
    ),
    (
        "[pool]\nsize = 0\n[[channel]]\nplatform = \"web\"\nid = \"*\"",
        "channel[0].sandbox",
        "per-thread",
    ),
    // [[group]]
    ("[[group]]\nname = \"Eng Team\"\nusers = []", "group[0].name", "lower-case"),
    (
        "[[group]]\nname = \"eng\"\nusers = []\n[[group]]\nname = \"eng\"\nusers = []",
        "group[1].name",
        "group[0]",
    ),
    ("[[group]]\nname = \"eng\"\nusers = [\"U1\", \"*\"]", "group[0].users[1]", "users = [\"*\"]"),
    (
        "[[group]]\nname = \"eng\"\nusers = [\"@ops\"]",
        "group[0].users[0]",
        "cannot contain groups",
    ),
    (
        "[[group]]\nname = \"eng\"\nusers = [\"U1\", \"alice smith\"]",
        "group[0].users[1]",
        "user id",
    ),
    ("[[group]]\nname = \"eng\"\nusers = [\"\"]", "group[0].users[0]", "1 to 256"),
    // [defaults] and [[channel]] keys
    ("[defaults]\ntrust = \"admn\"", "defaults.trust", "\"admin\", \"member\" or \"untrusted\""),
    ("[defaults]\nusers = [\"@nope\"]", "defaults.users[0]", "[[group]] name = \"nope\""),
    (
        "[[group]]\nname = \"eng\"\nusers = [\"U1\"]\n[[channel]]\nplatform = \"slack\"\nid = \"C1\"\nusers = [\"U2\", \"@engg\"]",
        "channel[0].users[1]",
        "defined: eng",
    ),
    (
        "[[channel]]\nplatform = \"web\"\nid = \"*\"\nusers = [\"*\", \"alice\"]",
        "channel[0].users[0]",
        "remove the other entries",
    ),
    (
        "[[channel]]\nplatform = \"web\"\nid = \"*\"\nusers = [\"al*\"]",
        "channel[0].users[0]",
        "stands alone",
    ),
    (
        "[[channel]]\nplatform = \"web\"\nid = \"*\"\nadmins = [\"*\"]",
        "channel[0].admins[0]",
        "trust = \"admin\"",
    ),
    (
        "[[channel]]\nplatform = \"web\"\nid = \"*\"\ntrust = \"untrusted\"\nadmins = [\"alice\"]",
        "channel[0].admins",
        "untrusted",
    ),
    (
        "[defaults]\nadmins = [\"alice\"]\n[[channel]]\nplatform = \"web\"\nid = \"*\"\ntrust = \"untrusted\"",
        "channel[0].trust",
        "admins = []",
    ),
    ("[defaults]\nsandbox = \"vm\"", "defaults.sandbox", "\"pool\" or \"per-thread\""),
    (
        "[web]\nallowed_hosts = [\"chat.example.com\", \"https://chat.example.com\"]",
        "web.allowed_hosts[1]",
        "no scheme",
    ),
    ("[web]\nallowed_hosts = [\"*.example.com\"]", "web.allowed_hosts[0]", "no wildcard"),
    ("[defaults]\nidle_delete = \"7d\"", "defaults.idle_delete", "ms, s, m or h"),
    ("[defaults]\nidle_delete = \"10s\"", "defaults.idle_delete", "1m to"),
    ("[defaults]\nagent = \"gpt\"", "defaults.agent", "use \"builtin\", \"claude\""),
    ("[defaults]\ndebounce = \"1.5s\"", "defaults.debounce", "1500ms"),
    ("[defaults]\ndebounce = \"2m\"", "defaults.debounce", "0s to 1m"),
    ("[defaults]\nrate = { user = \"fast\" }", "defaults.rate.user", "\"20/min\""),
    ("[defaults]\nrate = { channel = \"0/min\" }", "defaults.rate.channel", "1 to 1000000"),
    (
        "[[channel]]\nplatform = \"web\"\nid = \"a\"\n[[channel]]\nplatform = \"web\"\nid = \"b\"\n[[channel]]\nplatform = \"web\"\nid = \"c\"\nrate = { user = \"20/day\" }",
        "channel[2].rate.user",
        "sec, min or hour",
    ),
    ("[defaults]\nbackend = \"local\"", "defaults.backend", "\"bwrap\" or \"gvisor\""),
    ("[defaults]\nbackend = \"docker\"", "defaults.backend", "bwrap, gvisor"),
    (
        "[[channel]]\nplatform = \"web\"\nid = \"*\"\negress = [\"pypi.org\", \"*.com\"]",
        "channel[0].egress[1]",
        "top-level domain",
    ),
    (
        "[[channel]]\nplatform = \"web\"\nid = \"*\"\nresolve = { \"git.test\" = \"nowhere\" }",
        "channel[0].resolve.git.test",
        "not an IP address",
    ),
    (
        "[[channel]]\nplatform = \"web\"\nid = \"*\"\nlimits = { memory = \"12XB\" }",
        "channel[0].limits.memory",
        "GiB",
    ),
    ("[defaults]\nlimits = { memory = \"1MiB\" }", "defaults.limits.memory", "16MiB"),
    ("[defaults]\nlimits = { pids = 0 }", "defaults.limits.pids", "4 to 65536"),
    ("[defaults]\nlimits = { cpus = 0.0 }", "defaults.limits.cpus", "0.01 to 1024"),
    ("[defaults]\nlimits = { timeout = \"0s\" }", "defaults.limits.timeout", "1ms to 24h"),
    (
        "[[channel]]\nplatform = \"matrix\"\nid = \"*\"",
        "channel[0].platform",
        "\"telegram\", \"whatsapp\" or \"discord\"",
    ),
    (
        "[[channel]]\nplatform = \"telegram\"\nid = \"@mygroup\"",
        "channel[0].id",
        "negative for groups",
    ),
    (
        "[[channel]]\nplatform = \"whatsapp\"\nid = \"+49 151\"",
        "channel[0].id",
        "phone number id",
    ),
    (
        "[[channel]]\nplatform = \"telegram\"\nid = \"-100123\"\nusers = [\"discord:123\"]",
        "channel[0].users[0]",
        "only on its own platform",
    ),
    (
        "[[channel]]\nplatform = \"discord\"\nid = \"#general\"",
        "channel[0].id",
        "Discord channel id",
    ),
    ("[discord]\nbot_token = \"x\"", "discord.bot_token", "DISCORD_BOT_TOKEN"),
    (
        "[discord]\ngateway_url = \"https://gateway.discord.gg\"",
        "discord.gateway_url",
        "wss://",
    ),
    (
        "[discord]\ngateway_url = \"ws://gateway.example\"",
        "discord.gateway_url",
        "loopback",
    ),
    (
        "[discord]\ngateway_url = \"wss://gateway.discord.gg/?v=9\"",
        "discord.gateway_url",
        "query",
    ),
    (
        "[discord]\napi_url = \"http://discord.example/api\"",
        "discord.api_url",
        "https://",
    ),
    (
        "[[channel]]\nplatform = \"slack\"\nid = \"#general\"",
        "channel[0].id",
        "not its #name",
    ),
    (
        "[[channel]]\nplatform = \"slack\"\nid = \"c0123abcd\"",
        "channel[0].id",
        "C0123ABCD",
    ),
    ("[[channel]]\nplatform = \"web\"\nid = \"a b\"", "channel[0].id", "letters, digits"),
    ("[[channel]]\nplatform = \"cli\"\nid = \"\"", "channel[0].id", "letters, digits"),
    (
        "[[channel]]\nplatform = \"slack\"\nid = \"C1\"\n[[channel]]\nplatform = \"web\"\nid = \"C1\"\n[[channel]]\nplatform = \"slack\"\nid = \"C1\"",
        "channel[2].id",
        "channel[0] is already the entry for slack channel C1",
    ),
    (
        "[[channel]]\nplatform = \"web\"\nid = \"*\"\n[[channel]]\nplatform = \"web\"\nid = \"*\"",
        "channel[1].id",
        "merge",
    ),
];

/// The errors quoted at the top of docs/configuration.md are what moat prints.
#[test]
fn the_errors_quoted_on_the_configuration_page_are_real() {
    let start = CONFIG_DOC
        .find("```\n")
        .expect("the page quotes errors in a ``` block")
        + 4;
    let quoted: Vec<&str> = CONFIG_DOC[start..][..CONFIG_DOC[start..].find("```").unwrap()]
        .lines()
        .collect();
    let mut printed = Vec::new();
    for text in [
        "[[channel]]\nplatform = \"web\"\nid = \"a\"\n[[channel]]\nplatform = \"web\"\nid = \"b\"\n[[channel]]\nplatform = \"web\"\nid = \"c\"\nrate = { user = \"20/day\" }",
        "[[group]]\nname = \"eng\"\nusers = [\"U1\", \"*\"]",
        "[web]\nlisten = \"0.0.0.0:8080\"",
        "\n\n\n\n\n\n\n\n\n\n\n[defaults]\ntrsut = \"member\"",
    ] {
        printed.push(GatewayConfig::from_toml(text).unwrap_err().to_string());
    }
    assert_eq!(quoted, printed);
}

#[test]
fn every_error_names_its_key_and_what_to_do() {
    for &(text, key, phrase) in ERROR_CASES {
        let e = GatewayConfig::from_toml(text).expect_err(text);
        let shown = e.to_string();
        assert_eq!(key_of(&e), key, "wrong key for\n{text}\n=> {shown}");
        assert!(
            shown.starts_with(&format!("{key}: ")),
            "the message must start with the key: {shown}"
        );
        assert!(
            shown.contains(phrase),
            "{text}\n=> {shown}\nshould contain {phrase:?}"
        );
    }
}

#[test]
fn the_error_cases_are_each_valid_once_the_fault_is_fixed() {
    // Guards against a case failing for a reason other than the one it names:
    // a few representative cases, repaired, must parse.
    for text in [
        "[gateway]\ndata_dir = \"/srv/moat\"",
        "[web]\nlisten = \"0.0.0.0:8080\"\nauth = \"token\"",
        "[web]\nlisten = \"0.0.0.0:8080\"\nauth = \"header\"\ntrusted_proxies = [\"10.0.0.5\"]",
        "[web]\nlisten = \"127.0.0.1:8080\"\nauth = \"header\"",
        "[admin]\nlisten = \"127.0.0.1:9091\"",
        "[slack]\nmode = \"events\"\nlisten = \"0.0.0.0:3000\"",
        "[web]\nenabled = false\n[slack]\nmode = \"events\"\nlisten = \"0.0.0.0:3000\"",
        "[web]\nenabled = false\nlisten = \"0.0.0.0:8080\"",
        "[slack]\napi_url = \"http://127.0.0.1:4000/api/\"",
        "[amp]\nurl = \"http://127.0.0.1:9\"\nallow_plain_http = true",
        "[pool]\nsize = 0\n[[channel]]\nplatform = \"web\"\nid = \"*\"\nsandbox = \"per-thread\"",
        "[defaults]\nidle_delete = \"1m\"\ndebounce = \"0ms\"",
        "[[channel]]\nplatform = \"web\"\nid = \"*\"\nsandbox = \"per-thread\"\ndisk = \"8GiB\"",
        // From [defaults], pool channels leave it (their sandboxes stay on tmpfs).
        "[defaults]\ndisk = \"8GiB\"\n[[channel]]\nplatform = \"web\"\nid = \"*\"",
        "[[channel]]\nplatform = \"slack\"\nid = \"C1\"\n[[channel]]\nplatform = \"web\"\nid = \"C1\"",
    ] {
        parse(text);
    }
}

#[test]
fn syntax_errors_carry_the_line() {
    let text = "[web]\nlisten = \"127.0.0.1:8080\"\n\n[[channel]]\nplatform = \"web\"\nid = \"*\"\nusers = \"everyone\"\n";
    let e = GatewayConfig::from_toml(text).unwrap_err();
    let shown = e.to_string();
    assert_eq!(key_of(&e), "channel[0].users");
    assert!(shown.contains("(line 7)"), "{shown}");

    let e = GatewayConfig::from_toml("[pool]\nsize = 2\nmax_waiters = \"many\"").unwrap_err();
    assert!(e.to_string().contains("(line 3)"), "{e}");

    let e = GatewayConfig::from_toml("[web\nlisten = 1").unwrap_err();
    assert!(
        matches!(e, PolicyError::Syntax { line: Some(1), .. }),
        "{e:?}"
    );
}

#[test]
fn secret_values_never_appear_in_errors() {
    for text in [
        "[web]\ntoken = \"zq9-hunter2\"",
        "[web]\ntokens = { alice = \"zq9-hunter2\" }",
        "[slack]\nbot_token = \"xoxb-zq9-hunter2\"",
        "[slack]\nsigning_secret = \"zq9-hunter2\"",
        "[slack]\napp_token = \"xapp-zq9-hunter2\"",
    ] {
        let shown = GatewayConfig::from_toml(text).unwrap_err().to_string();
        assert!(!shown.contains("zq9"), "{shown}");
        assert!(
            shown.contains("never go in the configuration file"),
            "{shown}"
        );
    }
}

// ---- closed by default ----------------------------------------------------

#[test]
fn a_channel_without_users_lets_nobody_talk() {
    let c = parse("[[channel]]\nplatform = \"slack\"\nid = \"C0123\"");
    assert!(c.channels[0].users.is_empty());
    match c.authorize(Platform::Slack, "C0123", "U1") {
        Authorization::Denied { reason } => {
            assert!(reason.contains("lets nobody talk"), "{reason}");
            assert!(reason.contains("C0123"), "{reason}");
        }
        a => panic!("{a:?}"),
    }
    assert!(c.warnings().iter().any(|w| w.contains("channel[0]")));
}

#[test]
fn an_empty_list_closes_a_channel_even_when_the_defaults_open_it() {
    let c = parse(
        "[defaults]\nusers = [\"*\"]\n\
         [[channel]]\nplatform = \"slack\"\nid = \"C1\"\n\
         [[channel]]\nplatform = \"slack\"\nid = \"C2\"\nusers = []",
    );
    assert!(c.authorize(Platform::Slack, "C1", "U9").is_allowed());
    assert!(!c.authorize(Platform::Slack, "C2", "U9").is_allowed());
}

#[test]
fn everyone_is_only_an_explicit_star() {
    let c = parse("[[channel]]\nplatform = \"slack\"\nid = \"C1\"\nusers = [\"*\"]");
    for user in ["U1", "U2", "W3", "someone"] {
        assert!(
            c.authorize(Platform::Slack, "C1", user).is_allowed(),
            "{user}"
        );
    }
}

#[test]
fn a_channel_without_an_entry_is_refused() {
    let c = parse("[[channel]]\nplatform = \"slack\"\nid = \"C0123\"\nusers = [\"*\"]");
    match c.authorize(Platform::Slack, "C999", "U1") {
        Authorization::Denied { reason } => {
            assert_eq!(reason, "no [[channel]] entry for slack channel C999")
        }
        a => panic!("{a:?}"),
    }
    // Another platform's entries never apply.
    assert!(!c.authorize(Platform::Web, "C0123", "U1").is_allowed());
    assert!(!c.authorize(Platform::Cli, "C0123", "U1").is_allowed());
}

#[test]
fn an_empty_file_lets_nobody_talk() {
    let c = parse("");
    assert!(c.channels.is_empty());
    for p in [Platform::Slack, Platform::Web, Platform::Cli] {
        assert!(!c.authorize(p, "any", "anyone").is_allowed());
    }
    assert!(c.warnings().iter().any(|w| w.contains("nobody can talk")));
    // and the other sections take their documented defaults
    assert_eq!(
        c.web.listen,
        "127.0.0.1:8080".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(c.web.auth, WebAuth::Loopback);
    assert_eq!(
        c.admin.listen,
        "127.0.0.1:9090".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(c.slack.mode, SlackMode::Off);
    assert_eq!(c.slack.api_url, "https://slack.com/api");
    assert_eq!((c.pool.size, c.pool.max_waiters), (2, 16));
    assert_eq!(c.pool.max, 16);
    assert_eq!(c.data_dir.to_str(), Some("/var/lib/moat"));
}

#[test]
fn pool_sizes_fixed_elastic_and_default() {
    let p = |t: &str| GatewayConfig::from_toml(t).unwrap().pool;
    let fixed = p("[pool]\nsize = 3");
    assert_eq!((fixed.size, fixed.max), (3, 3));
    let elastic = p("[pool]\nmin = 1\nmax = 64\nshrink_after = \"30s\"");
    assert_eq!((elastic.size, elastic.max), (1, 64));
    assert_eq!(elastic.shrink_after, std::time::Duration::from_secs(30));
    let default = p("");
    assert_eq!(
        (default.size, default.max, default.max_waiters),
        (2, 16, 16)
    );
    assert_eq!(default.shrink_after, std::time::Duration::from_secs(300));
    // min above the default max: max follows it.
    assert_eq!(p("[pool]\nmin = 20").max, 20);
    // min = 0 is allowed: the pool starts empty and grows on demand.
    let lazy = p("[pool]\nmin = 0\nmax = 4\n[[channel]]\nplatform = \"web\"\nid = \"*\"");
    assert_eq!((lazy.size, lazy.max), (0, 4));
}

// ---- authorization --------------------------------------------------------

const TEAM: &str = r#"
[[group]]
name = "eng"
users = ["U01ALICE", "U02BOB"]

[[group]]
name = "ops"
users = ["U09OPS"]

[[channel]]
platform = "slack"
id = "C0123"
users = ["U01ALICE"]
admins = ["@ops"]

[[channel]]
platform = "slack"
id = "*"
users = ["@eng"]

[[channel]]
platform = "slack"
id = "CPUBLIC"
trust = "untrusted"
users = ["*"]

[[channel]]
platform = "web"
id = "lab"
trust = "admin"
users = ["alice"]
"#;

fn allowed<'a>(a: Authorization<'a>) -> (usize, Trust) {
    match a {
        Authorization::Allowed { channel, trust } => (channel.index, trust),
        Authorization::Denied { reason } => panic!("denied: {reason}"),
    }
}

fn denied(a: Authorization<'_>) -> String {
    match a {
        Authorization::Denied { reason } => reason,
        a => panic!("allowed: {a:?}"),
    }
}

#[test]
fn an_exact_entry_wins_over_the_wildcard_and_does_not_fall_through() {
    let c = parse(TEAM);
    assert_eq!(
        allowed(c.authorize(Platform::Slack, "C0123", "U01ALICE")),
        (0, Trust::Member)
    );
    // Bob is in @eng, which the "*" entry lets in, but C0123 has its own entry.
    let r = denied(c.authorize(Platform::Slack, "C0123", "U02BOB"));
    assert_eq!(
        r,
        "user U02BOB is not in the users of slack channel C0123 (channel[0])"
    );
    // Another channel falls under "*".
    assert_eq!(
        allowed(c.authorize(Platform::Slack, "C0777", "U02BOB")),
        (1, Trust::Member)
    );
    let r = denied(c.authorize(Platform::Slack, "C0777", "U05EVE"));
    assert!(
        r.contains("U05EVE") && r.contains("\"*\" entry, channel[1]"),
        "{r}"
    );
    // The wildcard entry listed before an exact one does not shadow it.
    assert_eq!(
        allowed(c.authorize(Platform::Slack, "CPUBLIC", "U05EVE")),
        (2, Trust::Untrusted)
    );
}

#[test]
fn user_ids_match_exactly() {
    let c = parse(TEAM);
    for user in [
        "u01alice",
        "U01ALICE ",
        " U01ALICE",
        "U01ALIC",
        "U01ALICEX",
        "@eng",
        "*",
    ] {
        assert!(
            !c.authorize(Platform::Slack, "C0123", user).is_allowed(),
            "{user:?} must not match U01ALICE"
        );
    }
    assert!(!c.authorize(Platform::Slack, "C0123", "").is_allowed());
    let r = denied(c.authorize(Platform::Slack, "C0123", ""));
    assert!(r.contains("no user id"), "{r}");
    let r = denied(c.authorize(Platform::Slack, "", "U01ALICE"));
    assert!(r.contains("no channel id"), "{r}");
}

/// P2: the same id text on two platforms is two people. A channel's own ids
/// are its platform's; a shared list (`[[group]]`, `[defaults]`) writes ids
/// of the numeric platforms as `telegram:ID`, and plain ids there never match
/// on Telegram, WhatsApp or Discord.
#[test]
fn attack_p2_a_user_id_of_one_platform_is_never_authorized_on_another() {
    let c = parse(
        r#"
[[group]]
name = "team"
users = ["U01ALICE", "telegram:4242", "whatsapp:4915112345678"]

[[channel]]
platform = "telegram"
id = "-1001"
users = ["@team", "777"]

[[channel]]
platform = "discord"
id = "900"
users = ["@team"]

[[channel]]
platform = "whatsapp"
id = "*"
users = ["@team"]

[[channel]]
platform = "slack"
id = "C0123"
users = ["@team", "777"]
"#,
    );
    // Each id on its own platform.
    assert!(c
        .authorize(Platform::Telegram, "-1001", "4242")
        .is_allowed());
    assert!(c.authorize(Platform::Telegram, "-1001", "777").is_allowed());
    assert!(c
        .authorize(Platform::WhatsApp, "5550001", "4915112345678")
        .is_allowed());
    assert!(c
        .authorize(Platform::Slack, "C0123", "U01ALICE")
        .is_allowed());
    // The Telegram user's number on Discord or WhatsApp: nobody.
    assert!(!c.authorize(Platform::Discord, "900", "4242").is_allowed());
    assert!(!c
        .authorize(Platform::WhatsApp, "5550001", "4242")
        .is_allowed());
    // The Slack channel's plain "777" is a Slack id, the Telegram channel's
    // a Telegram id: neither crosses over.
    assert!(!c.authorize(Platform::Discord, "900", "777").is_allowed());
    assert!(!c
        .authorize(Platform::WhatsApp, "5550001", "777")
        .is_allowed());
    // A plain id in a group is never a Telegram, WhatsApp or Discord user,
    // and the prefixed text is not an id on any platform.
    for p in [Platform::Telegram, Platform::Discord] {
        let chan = if p == Platform::Telegram {
            "-1001"
        } else {
            "900"
        };
        assert!(!c.authorize(p, chan, "U01ALICE").is_allowed());
        assert!(!c.authorize(p, chan, "telegram:4242").is_allowed());
    }
    assert!(!c
        .authorize(Platform::Slack, "C0123", "telegram:4242")
        .is_allowed());
    assert!(!c.authorize(Platform::Slack, "C0123", "4242").is_allowed());
    // The config is unchanged by the attempts: the first still holds.
    assert!(c
        .authorize(Platform::Telegram, "-1001", "4242")
        .is_allowed());
}

#[test]
fn trust_comes_from_the_channel_and_admins() {
    let c = parse(TEAM);
    // ops is not in C0123's users but is its admin: allowed, as admin.
    assert_eq!(
        allowed(c.authorize(Platform::Slack, "C0123", "U09OPS")),
        (0, Trust::Admin)
    );
    // everyone in an untrusted channel is untrusted
    assert_eq!(
        allowed(c.authorize(Platform::Slack, "CPUBLIC", "U01ALICE")).1,
        Trust::Untrusted
    );
    // a channel's trust applies to all its users
    assert_eq!(
        allowed(c.authorize(Platform::Web, "lab", "alice")),
        (3, Trust::Admin)
    );
    assert!(!c.authorize(Platform::Web, "lab", "bob").is_allowed());
    assert!(Trust::Untrusted < Trust::Member && Trust::Member < Trust::Admin);
}

#[test]
fn reasons_do_not_carry_raw_control_characters() {
    let c = parse(TEAM);
    let r = denied(c.authorize(Platform::Slack, "C1\nforged audit line", "U1"));
    assert!(!r.contains('\n'), "{r:?}");
    let r = denied(c.authorize(Platform::Slack, "C0123", "U1\r\nX"));
    assert!(!r.contains('\n') && !r.contains('\r'), "{r:?}");
    let long = "U".repeat(10_000);
    let r = denied(c.authorize(Platform::Slack, "C0123", &long));
    assert!(r.len() < 300, "{}", r.len());
}

proptest! {
    /// A user is let in exactly when the channel lists them, whatever the ids.
    #[test]
    fn listed_users_and_only_they_are_allowed(
        listed in proptest::collection::btree_set("[A-Za-z0-9._-]{1,12}", 0..6),
        asking in "[A-Za-z0-9._-]{0,12}",
    ) {
        let users: Vec<String> = listed.iter().map(|u| format!("{u:?}")).collect();
        let c = parse(&format!(
            "[[channel]]\nplatform = \"web\"\nid = \"room\"\nusers = [{}]",
            users.join(", ")
        ));
        let verdict = c.authorize(Platform::Web, "room", &asking).is_allowed();
        prop_assert_eq!(verdict, listed.contains(&asking));
        prop_assert!(!c.authorize(Platform::Web, "other", &asking).is_allowed());
    }
}

// ---- what a channel carries -----------------------------------------------

#[test]
fn channels_inherit_the_defaults_and_override_key_by_key() {
    let c = parse(
        r#"
        [defaults]
        users = ["*"]
        trust = "untrusted"
        backend = "gvisor"
        debounce = "2s"
        rate = { user = "10/min", channel = "50/hour" }
        egress = ["pypi.org"]
        resolve = { "git.test" = "127.0.0.1" }
        limits = { memory = "512MiB", pids = 64, cpus = 0.5, timeout = "1m" }

        [[channel]]
        platform = "slack"
        id = "C1"

        [[channel]]
        platform = "slack"
        id = "C2"
        trust = "member"
        sandbox = "per-thread"
        idle_delete = "48h"
        rate = { user = "3/sec" }
        egress = ["*.github.com:8443"]
        limits = { memory = "2GiB" }
        "#,
    );
    let (a, b) = (&c.channels[0], &c.channels[1]);
    assert_eq!(a.trust, Trust::Untrusted);
    assert_eq!(a.sandbox, SandboxMode::Pool);
    assert_eq!(a.agent.kind, None, "agent unset: decided by the gateway");
    assert_eq!(a.debounce, Duration::from_secs(2));
    let pa = a.sandbox_policy();
    assert_eq!(pa.backend, BackendKind::Gvisor);
    assert_eq!(pa.limits.memory, ByteSize::mib(512));
    assert_eq!((pa.limits.pids, pa.limits.millicpus), (64, 500));
    assert_eq!(pa.limits.timeout, Duration::from_secs(60));
    // Untrusted: egress and resolve come from the channel's own entry only
    // (docs/trust.md), so those of [defaults] do not reach it.
    assert!(pa.network.allow.is_empty());
    assert!(pa.network.pins.is_empty());
    assert!(!pa.allow_unsandboxed);

    assert_eq!(b.trust, Trust::Member);
    assert_eq!(
        b.sandbox,
        SandboxMode::PerThread {
            idle_delete: Duration::from_secs(48 * 3600)
        }
    );
    // rate: user overridden, channel inherited
    assert_eq!(b.rate.user.to_string(), "3/sec");
    assert_eq!(b.rate.channel.to_string(), "50/hour");
    let pb = b.sandbox_policy();
    // limits: memory overridden, the rest inherited
    assert_eq!(pb.limits.memory, ByteSize::mib(2048));
    assert_eq!((pb.limits.pids, pb.limits.millicpus), (64, 500));
    // egress: the channel's list replaces the defaults'
    assert_eq!(pb.network.allow.len(), 1);
    assert_eq!(
        pb.network.allow[0].host,
        HostPattern::Subdomains("github.com".into())
    );
    assert_eq!(pb.network.allow[0].port, Some(8443));
    // both channels let everyone in (from the defaults)
    assert!(c.authorize(Platform::Slack, "C2", "U1").is_allowed());
}

#[test]
fn unset_settings_take_the_documented_defaults() {
    let c = parse("[[channel]]\nplatform = \"cli\"\nid = \"*\"\nsandbox = \"per-thread\"");
    let ch = &c.channels[0];
    assert_eq!(ch.trust, Trust::Member);
    assert_eq!(
        ch.sandbox,
        SandboxMode::PerThread {
            idle_delete: Duration::from_secs(24 * 3600)
        }
    );
    // `moat chat` sends complete messages: no debounce unless one is set.
    assert_eq!(ch.debounce, Duration::ZERO);
    assert_eq!(ch.rate.user.to_string(), "20/min");
    assert_eq!(ch.rate.channel.to_string(), "100/min");
    assert!(ch.admins.is_empty() && ch.users.is_empty());
    assert_eq!(ch.sandbox_policy(), moat_policy::SandboxPolicy::default());
}

#[test]
fn debounce_defaults_per_platform_and_an_explicit_one_wins() {
    // Slack bursts become one turn; a web or CLI message starts at once.
    let c = parse(
        "[[channel]]\nplatform = \"slack\"\nid = \"*\"\n\
         [[channel]]\nplatform = \"web\"\nid = \"*\"\n\
         [[channel]]\nplatform = \"web\"\nid = \"bob\"\ndebounce = \"300ms\"",
    );
    let d: Vec<Duration> = c.channels.iter().map(|c| c.debounce).collect();
    assert_eq!(
        d,
        [
            Duration::from_millis(1500),
            Duration::ZERO,
            Duration::from_millis(300)
        ]
    );
    let e = moat_policy::gateway::GatewayConfig::embedded_default();
    assert_eq!(
        e.channels[0].debounce,
        Duration::ZERO,
        "the embedded web chat"
    );
    let c = parse("[defaults]\ndebounce = \"2s\"\n[[channel]]\nplatform = \"web\"\nid = \"*\"");
    assert_eq!(c.channels[0].debounce, Duration::from_secs(2));
}

#[test]
fn rates_parse_into_counts_per_period() {
    let r = Rate::parse("20/min").unwrap();
    assert_eq!((r.count.get(), r.per), (20, Duration::from_secs(60)));
    assert_eq!(r.interval(), Duration::from_secs(3));
    for (text, count, secs, shown) in [
        ("1/sec", 1, 1, "1/sec"),
        (" 5 / s ", 5, 1, "5/sec"),
        ("100/hour", 100, 3600, "100/hour"),
        ("7/h", 7, 3600, "7/hour"),
        ("30/minute", 30, 60, "30/min"),
        ("1000000/sec", 1_000_000, 1, "1000000/sec"),
    ] {
        let r = Rate::parse(text).unwrap();
        assert_eq!((r.count.get(), r.per.as_secs()), (count, secs), "{text}");
        assert_eq!(r.to_string(), shown);
        assert_eq!(Rate::parse(shown).unwrap(), r);
    }
    for bad in [
        "",
        "20",
        "/min",
        "-1/min",
        "1.5/min",
        "0/sec",
        "1000001/sec",
        "5/day",
        "x/min",
    ] {
        assert!(Rate::parse(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn listeners_on_port_zero_never_clash() {
    // Tests bind every listener to a free port.
    let c = parse(
        "[web]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [slack]\nmode = \"events\"\nlisten = \"127.0.0.1:0\"\napi_url = \"http://127.0.0.1:1/api\"",
    );
    assert_eq!(c.slack.listen.unwrap().port(), 0);
    assert_eq!(c.slack.api_url, "http://127.0.0.1:1/api");
    assert_eq!(
        c.slack.mode.required_env(),
        ["SLACK_SIGNING_SECRET", "SLACK_BOT_TOKEN"]
    );
}

#[test]
fn web_auth_modes_carry_their_settings() {
    let c = parse("[web]\nlisten = \"0.0.0.0:8443\"\nauth = \"token\"");
    assert_eq!(
        c.web.auth,
        WebAuth::Token {
            env: "MOAT_WEB_TOKENS".into()
        }
    );
    let c = parse("[web]\nauth = \"token\"\ntoken_env = \"TEAM_CHAT_TOKENS\"");
    assert_eq!(
        c.web.auth,
        WebAuth::Token {
            env: "TEAM_CHAT_TOKENS".into()
        }
    );
    let c = parse(
        "[web]\nlisten = \"[::]:8080\"\nauth = \"header\"\nheader = \"X-Auth-Request-User\"\n\
         trusted_proxies = [\"10.0.0.5\", \"::ffff:10.0.0.6\", \"[fd00::1]\"]",
    );
    match c.web.auth {
        WebAuth::Header {
            header,
            trusted_proxies,
        } => {
            assert_eq!(header, "X-Auth-Request-User");
            let shown: Vec<String> = trusted_proxies.iter().map(|i| i.to_string()).collect();
            assert_eq!(shown, ["10.0.0.5", "10.0.0.6", "fd00::1"]);
        }
        a => panic!("{a:?}"),
    }
    // A v4-mapped loopback address is loopback.
    parse("[web]\nlisten = \"[::ffff:127.0.0.1]:8080\"");
    // A disabled web chat binds nothing, so its address is not judged.
    let c = parse("[web]\nenabled = false\nlisten = \"0.0.0.0:9090\"");
    assert!(!c.web.enabled);
}

// ---- the embedded default and the documentation --------------------------

#[test]
fn the_embedded_default_is_a_local_web_chat() {
    let c = GatewayConfig::embedded_default();
    assert!(c.web.enabled);
    assert_eq!(
        c.web.listen,
        "127.0.0.1:8080".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(c.web.auth, WebAuth::Loopback);
    assert_eq!(
        c.admin.listen,
        "127.0.0.1:9090".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(c.slack.mode, SlackMode::Off);
    assert_eq!(c.pool.size, 2);
    assert!(c.groups.is_empty());
    assert_eq!(c.channels.len(), 1);
    let ch = &c.channels[0];
    assert_eq!((ch.platform, ch.id.as_str()), (Platform::Web, "*"));
    assert!(ch.users.everyone);
    assert!(ch.admins.is_empty());
    assert_eq!(ch.trust, Trust::Member);
    assert_eq!(ch.sandbox, SandboxMode::Pool);
    assert_eq!(
        ch.agent.kind, None,
        "agent unset: builtin with an LLM key, else shell"
    );
    assert_eq!(ch.agent.kind_or_default(false), AgentKind::Shell);
    assert_eq!(ch.agent.kind_or_default(true), AgentKind::Builtin);
    assert!(ch.agent.mcp.is_empty(), "no MCP server by default");
    let p = ch.sandbox_policy();
    assert!(!p.network.is_enabled(), "no egress by default");
    assert_eq!(p.backend, BackendKind::Bwrap);
    assert_eq!(
        allowed(c.authorize(Platform::Web, "main", "anyone")),
        (0, Trust::Member)
    );
    assert!(!c.authorize(Platform::Slack, "C1", "U1").is_allowed());
    assert!(!c.authorize(Platform::Cli, "main", "anyone").is_allowed());
    assert!(c.warnings().is_empty(), "{:?}", c.warnings());
}

#[test]
fn the_example_file_parses() {
    let c = parse(EXAMPLE);
    // The untrusted channel runs on gVisor, the others on bwrap: no warning.
    assert!(c.warnings().is_empty(), "{:?}", c.warnings());
    let help = c.channel(Platform::Slack, "C0456HELP").unwrap();
    assert_eq!(help.sandbox_policy().backend, BackendKind::Gvisor);
    let eng = c.channel(Platform::Slack, "C0123ENG").unwrap();
    assert_eq!(eng.sandbox_policy().backend, BackendKind::Bwrap);
    assert_eq!(c.slack.mode, SlackMode::Events);
    assert_eq!(c.groups.len(), 2);
    let eng = c.channel(Platform::Slack, "C0123ENG").unwrap();
    assert!(matches!(eng.sandbox, SandboxMode::PerThread { .. }));
    assert!(eng.sandbox_policy().network.is_enabled());
    // an ops admin who is also an engineer talks as admin
    assert_eq!(
        allowed(c.authorize(Platform::Slack, "C0123ENG", "U03CAROL")).1,
        Trust::Admin
    );
    assert_eq!(
        allowed(c.authorize(Platform::Slack, "C0123ENG", "U01ALICE")).1,
        Trust::Member
    );
    assert_eq!(
        allowed(c.authorize(Platform::Slack, "C0456HELP", "U77GUEST")).1,
        Trust::Untrusted
    );
    assert!(!c
        .authorize(Platform::Slack, "D0DIRECT", "U77GUEST")
        .is_allowed());
    assert!(c
        .authorize(Platform::Slack, "D0DIRECT", "U02BOB")
        .is_allowed());
}

/// Every ```toml block of docs/configuration.md is a whole, valid file.
#[test]
fn the_configuration_page_examples_parse() {
    let mut blocks = 0;
    let mut rest = CONFIG_DOC;
    while let Some(start) = rest.find("\n```toml\n").map(|i| i + 1) {
        let body = &rest[start + 8..];
        let end = body.find("```").expect("an unclosed ```toml block");
        let block = &body[..end];
        GatewayConfig::from_toml(block)
            .unwrap_or_else(|e| panic!("docs/configuration.md block {blocks}: {e}\n{block}"));
        blocks += 1;
        rest = &body[end + 3..];
    }
    assert!(blocks >= 3, "only {blocks} toml blocks found");

    // The page shows the embedded default as it is.
    let section = &CONFIG_DOC[CONFIG_DOC.find("## The embedded default").unwrap()..];
    let body = &section[section.find("```toml\n").unwrap() + 8..];
    let shown = &body[..body.find("```").unwrap()];
    assert_eq!(parse(shown), GatewayConfig::embedded_default());
}

#[test]
fn the_embedded_default_is_the_defaults_plus_one_open_web_channel() {
    let c = parse(WEB_ALL);
    assert_eq!(c, GatewayConfig::embedded_default());
}

/// Found by the gateway_config fuzz target: a table or key with an empty
/// name (`[""]`) gave an error whose key was empty (`: unknown field ...`).
#[test]
fn an_empty_key_is_named_in_the_error() {
    for text in ["[\"\"]\n", "\"\" = 1\n", "[gateway]\n\"\" = 1\n"] {
        let e = GatewayConfig::from_toml(text).expect_err(text);
        let shown = e.to_string();
        assert!(!key_of(&e).is_empty(), "{text:?} => {shown}");
        assert!(shown.contains("\"\""), "{text:?} => {shown}");
    }
}

#[test]
fn budget_user_is_tokens_per_window_and_errors_name_the_key() {
    let c = parse(
        "[defaults]\nbudget_user = \"200000/day\"\n[[channel]]\nplatform = \"web\"\nid = \"a\"\n[[channel]]\nplatform = \"web\"\nid = \"b\"\nbudget_user = \"5_000/12h\"",
    );
    let day = std::time::Duration::from_secs(86_400);
    let b0 = c.channels[0].agent.budget_user.expect("inherited");
    assert_eq!((b0.tokens, b0.per), (200_000, day));
    let b1 = c.channels[1].agent.budget_user.expect("its own");
    assert_eq!(
        (b1.tokens, b1.per),
        (5_000, std::time::Duration::from_secs(12 * 3600))
    );
    for (text, phrase) in [
        ("lots", "TOKENS/day"),
        ("0/day", "1 or more"),
        ("100/fortnight", "TOKENS/day"),
        ("100/10m", "an hour to a week"),
        ("100/300h", "an hour to a week"),
        ("100/30d", "ms, s, m or h"),
    ] {
        let toml = format!("[[channel]]\nplatform = \"web\"\nid = \"a\"\nbudget_user = \"{text}\"");
        let e = GatewayConfig::from_toml(&toml).expect_err(text);
        assert_eq!(key_of(&e), "channel[0].budget_user", "{e}");
        assert!(e.to_string().contains(phrase), "{text}: {e}");
    }
}
