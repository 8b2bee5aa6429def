//! `moat channels [--json]`: the chats this gateway serves: the
//! configuration's `[[channel]]` entries (trust, backend, sandbox mode,
//! agent) and the groups an admin registered with the IPC tool
//! `register_group` (kept in the store). Asks the running gateway for the
//! registry, or reads the store itself when none runs.
//!
//! Must never: print a user list's members, a secret, or anything but
//! channel ids, names and settings.

use std::path::PathBuf;
use std::time::Duration;

use moat_gateway::incident::{self, ControlRequest};
use moat_policy::gateway::{GatewayConfig, SandboxMode};
use serde_json::{json, Value};

#[derive(clap::Args)]
pub struct ChannelsArgs {
    /// JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Gateway configuration (TOML), as given to `moat up`; default: the
    /// embedded one.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Secrets file (KEY=VALUE lines), for the store when no gateway runs.
    #[arg(long, value_name = "FILE")]
    pub secrets: Option<PathBuf>,
}

/// The configuration's channels, one JSON object each.
pub fn configured(cfg: &GatewayConfig) -> Vec<Value> {
    cfg.channels
        .iter()
        .map(|c| {
            json!({
                "platform": c.platform.name(),
                "id": c.id,
                "trust": c.trust.name(),
                "backend": c.sandbox_policy().backend.name(),
                "sandbox": match c.sandbox {
                    SandboxMode::Pool => "pool",
                    SandboxMode::PerThread { .. } => "per-thread",
                },
                "agent": c.agent.kind.map(|k| k.name()).unwrap_or("default"),
            })
        })
        .collect()
}

pub fn run(args: ChannelsArgs) -> anyhow::Result<()> {
    let cfg = crate::up::load_config(args.config.as_deref())?;
    let data_dir = crate::up::engine_config(&cfg).data_dir;
    let req = ControlRequest {
        op: "channels".into(),
        by: String::new(),
        conversation: None,
    };
    let registered: Vec<Value> = match incident::send(&data_dir, &req, Duration::from_secs(30))? {
        Some(answer) => answer["registered"].as_array().cloned().unwrap_or_default(),
        None if !data_dir.join("moat.db").exists()
            && matches!(cfg.store, moat_policy::store::StoreConfig::Sqlite) =>
        {
            Vec::new()
        }
        None => crate::history_cmd::open_store(args.secrets.as_deref(), &cfg.store, &data_dir)?
            .registered_groups()?
            .into_iter()
            .map(|g| {
                json!({"platform": g.platform, "channel": g.channel, "name": g.name,
                    "registered_by": g.registered_by, "created_ms": g.created_ms})
            })
            .collect(),
    };
    let configured = configured(&cfg);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"configured": configured, "registered": registered})
            )?
        );
        return Ok(());
    }
    let s = |v: &Value, k: &str| v[k].as_str().unwrap_or("").to_string();
    println!(
        "{:<10} {:<24} {:<10} {:<8} {:<11} agent",
        "platform", "channel", "trust", "backend", "sandbox"
    );
    for c in &configured {
        println!(
            "{:<10} {:<24} {:<10} {:<8} {:<11} {}",
            s(c, "platform"),
            s(c, "id"),
            s(c, "trust"),
            s(c, "backend"),
            s(c, "sandbox"),
            s(c, "agent")
        );
    }
    if registered.is_empty() {
        println!("\nno registered groups");
    } else {
        println!("\nregistered groups (register_group):");
        for g in &registered {
            println!(
                "{:<10} {:<24} {:<20} by {}",
                s(g, "platform"),
                s(g, "channel"),
                s(g, "name"),
                s(g, "registered_by")
            );
        }
    }
    Ok(())
}
