//! The untrusted defaults and their override warnings, and the chat keys
//! (`conversation`, `trigger`, `mention`) as the file sets them.

use moat_policy::chat_keys::{Mention, Scope};
use moat_policy::gateway::{GatewayConfig, Platform};
use moat_policy::PolicyError;

fn parse(text: &str) -> GatewayConfig {
    GatewayConfig::from_toml(text).unwrap_or_else(|e| panic!("{e}\n--- in ---\n{text}"))
}

const LOOSE_DEFAULTS: &str = r#"
[[mcp]]
name = "docs"
command = ["/usr/bin/docs-mcp"]

[defaults]
egress = ["api.example.com"]
resolve = { "db.internal" = "10.0.0.7" }
mcp = ["docs"]
users = ["*"]
"#;

#[test]
fn untrusted_channels_do_not_inherit_loosened_defaults() {
    let cfg = parse(&format!(
        "{LOOSE_DEFAULTS}\n[[channel]]\nplatform = \"web\"\nid = \"public\"\ntrust = \"untrusted\"\n\n[[channel]]\nplatform = \"web\"\nid = \"team\"\n"
    ));
    let public = cfg.channel(Platform::Web, "public").unwrap();
    let p = public.sandbox_policy();
    assert!(p.network.allow.is_empty(), "no egress by default");
    assert!(p.network.pins.is_empty());
    assert!(public.agent.mcp.is_empty(), "no MCP by default");
    // A member channel keeps [defaults].
    let team = cfg.channel(Platform::Web, "team").unwrap();
    assert_eq!(team.sandbox_policy().network.allow.len(), 1);
    assert_eq!(team.agent.mcp.len(), 1);
    // Nothing was loosened for the untrusted channel: only the backend note.
    let w = cfg.warnings();
    assert!(!w.iter().any(|w| w.contains("sets egress")), "{w:?}");
    assert!(
        w.iter()
            .any(|w| w.contains("channel[0]") && w.contains("bwrap")),
        "{w:?}"
    );
}

#[test]
fn each_override_on_an_untrusted_channel_is_warned() {
    let cfg = parse(&format!(
        "{LOOSE_DEFAULTS}\n[[channel]]\nplatform = \"web\"\nid = \"public\"\ntrust = \"untrusted\"\negress = [\"pypi.org\"]\nmcp = [\"docs\"]\n"
    ));
    let public = cfg.channel(Platform::Web, "public").unwrap();
    assert_eq!(public.sandbox_policy().network.allow.len(), 1);
    assert_eq!(public.agent.mcp.len(), 1);
    let w = cfg.warnings();
    for key in ["egress", "mcp"] {
        assert!(
            w.iter()
                .any(|w| w.contains("channel[0]") && w.contains(&format!("sets {key} "))),
            "{key}: {w:?}"
        );
    }
    // resolve came from [defaults] only: dropped, not warned.
    assert!(public.sandbox_policy().network.pins.is_empty());
    assert!(!w.iter().any(|w| w.contains("sets resolve")), "{w:?}");
}

#[test]
fn gvisor_silences_the_backend_warning() {
    let cfg = parse(
        "[defaults]\nbackend = \"gvisor\"\n[[channel]]\nplatform = \"web\"\nid = \"p\"\ntrust = \"untrusted\"\nusers = [\"*\"]\n",
    );
    assert!(cfg.warnings().is_empty(), "{:?}", cfg.warnings());
}

#[test]
fn gvisor_on_the_untrusted_channel_alone_silences_the_backend_warning() {
    let cfg = parse(
        "[[channel]]\nplatform = \"web\"\nid = \"p\"\ntrust = \"untrusted\"\nusers = [\"*\"]\nbackend = \"gvisor\"\n\n[[channel]]\nplatform = \"web\"\nid = \"team\"\nusers = [\"*\"]\n",
    );
    assert!(cfg.warnings().is_empty(), "{:?}", cfg.warnings());
    let public = cfg.channel(Platform::Web, "p").unwrap();
    let team = cfg.channel(Platform::Web, "team").unwrap();
    assert_eq!(
        public.sandbox_policy().backend,
        moat_policy::BackendKind::Gvisor
    );
    assert_eq!(
        team.sandbox_policy().backend,
        moat_policy::BackendKind::Bwrap
    );
    // Without it, the warning says where to set it.
    let cfg = parse(
        "[[channel]]\nplatform = \"web\"\nid = \"p\"\ntrust = \"untrusted\"\nusers = [\"*\"]\n",
    );
    let w = cfg.warnings();
    assert!(
        w.iter()
            .any(|w| w.contains("runs on bwrap") && w.contains("[[channel]] entry")),
        "{w:?}"
    );
}

#[test]
fn chat_keys_parse_and_default() {
    let cfg = parse(
        "[[channel]]\nplatform = \"slack\"\nid = \"C0123ABCD\"\nusers = [\"*\"]\nconversation = \"channel\"\ntrigger = \"^@Andy\\\\b\"\nmention = \"optional\"\n\n[[channel]]\nplatform = \"slack\"\nid = \"*\"\nusers = [\"*\"]\n",
    );
    let c = cfg.channel(Platform::Slack, "C0123ABCD").unwrap();
    assert_eq!(c.chat.scope(Platform::Slack, "C0123ABCD"), Scope::Channel);
    assert_eq!(c.chat.mention, Mention::Optional);
    assert_eq!(c.chat.trigger.as_ref().unwrap().pattern(), "^@Andy\\b");
    let any = cfg.channel(Platform::Slack, "D999").unwrap();
    assert_eq!(any.chat.scope(Platform::Slack, "D999"), Scope::Channel);
    assert_eq!(any.chat.scope(Platform::Slack, "C999"), Scope::Thread);
    assert_eq!(any.chat.mention, Mention::Required);
    assert!(any.chat.trigger.is_none());
}

#[test]
fn bad_chat_keys_name_the_key() {
    for (line, key) in [
        ("trigger = \"(@Andy\"", "channel[0].trigger"),
        ("trigger = \"\"", "channel[0].trigger"),
        ("conversation = \"room\"", "channel[0].conversation"),
        ("mention = \"never\"", "channel[0].mention"),
    ] {
        let text =
            format!("[[channel]]\nplatform = \"web\"\nid = \"*\"\nusers = [\"*\"]\n{line}\n");
        match GatewayConfig::from_toml(&text) {
            Err(PolicyError::Invalid { key: k, message }) => {
                assert_eq!(k, key, "{line}: {message}")
            }
            other => panic!("{line}: {other:?}"),
        }
    }
}
