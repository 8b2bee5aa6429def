//! `moat incident [--lift]`: the operator's stop button (docs/incident.md).
//! Reaches a running gateway through its control socket (it stops its turns,
//! revokes its doors' GitHub tokens and destroys its sandboxes), sets the
//! persistent flag, destroys whatever sandboxes of the data directory are
//! left (also when no gateway runs), audits and prints what was done.
//!
//! Must never: report a step as done that was not, or leave the flag unset
//! when it says moat is paused.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use moat_gateway::incident;
use serde_json::json;

#[derive(clap::Args)]
pub struct IncidentArgs {
    /// Gateway configuration (TOML), as given to `moat up` (it names the data
    /// directory); default: the embedded one.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// End incident mode: the gateway takes messages again.
    #[arg(long)]
    pub lift: bool,
}

/// Who runs the command, for the audit record.
fn operator() -> String {
    std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| format!("uid {}", nix::unistd::getuid()))
}

pub fn run(args: IncidentArgs) -> anyhow::Result<()> {
    let cfg = crate::up::load_config(args.config.as_deref())?;
    let engine = crate::up::engine_config(&cfg);
    let data_dir = engine.data_dir.clone();
    let by = operator();
    let audit_path = data_dir.join("audit").join("audit.jsonl");
    let audit = moat_audit::AuditLog::open(&audit_path)
        .with_context(|| format!("opening the audit log {}", audit_path.display()))?;
    if args.lift {
        let gw = incident::request(&data_dir, "lift", &by, Duration::from_secs(120))?;
        let was = incident::clear_flag(&data_dir)?;
        let gateway = match &gw {
            Some(v) => {
                let requeued = v["lift"]["messages_requeued"].as_u64().unwrap_or(0);
                println!("moat: the running gateway takes messages again ({requeued} message(s) left from before were queued again)");
                "reached"
            }
            None => {
                println!("moat: no gateway is running; the next `moat up` takes messages");
                "not running"
            }
        };
        let was_paused = was || gw.as_ref().is_some_and(|v| v["lift"]["was_paused"] == true);
        if !was_paused {
            println!("moat: moat was not in incident mode");
        }
        audit.append(
            "incident_lifted",
            json!({"actor": "cli", "by": by, "gateway": gateway, "was_paused": was_paused}),
        )?;
        println!("moat: incident mode lifted (audited)");
        return Ok(());
    }
    // The gateway first: it stops its turns before the sweep kills them.
    let gw = incident::request(&data_dir, "incident", &by, Duration::from_secs(120))?;
    let flag = incident::IncidentFlag {
        since_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0),
        by: by.clone(),
    };
    // Kept if the gateway wrote it already (its time is the incident's).
    if incident::read_flag(&data_dir).ok().flatten().is_none() {
        incident::write_flag(&data_dir, &flag)?;
    }
    match &gw {
        Some(v) => {
            let r: incident::IncidentReport =
                serde_json::from_value(v["report"].clone()).unwrap_or_default();
            println!(
                "moat: the running gateway is paused: it takes no message and starts no sandbox"
            );
            println!(
                "moat: gateway: {} running turn(s) stopped in {} conversation(s)",
                r.turns_stopped, r.conversations_stopped
            );
            println!(
                "moat: gateway: {} GitHub token(s) revoked, {} could not be revoked",
                r.github_tokens_revoked, r.github_tokens_failed
            );
            println!(
                "moat: gateway: {} pooled sandbox(es) and {} lease(s) destroyed",
                r.pooled_sandboxes_destroyed, r.leases_destroyed
            );
        }
        None => println!(
            "moat: no gateway is running on {}; the next `moat up` starts paused",
            data_dir.display()
        ),
    }
    // Whatever is left: sandboxes of `moat sandbox run` (killed; their
    // process then revokes its own GitHub tokens), kept leases.
    let wiped = moat_sandbox::wipe::destroy_all(&engine, Duration::from_secs(10));
    println!(
        "moat: sweep: {} sandbox group(s) killed, {} lease(s) destroyed, {} still held, {} failed",
        wiped.cgroups, wiped.leases, wiped.held, wiped.failed
    );
    audit.append(
        "incident",
        json!({
            "actor": "cli",
            "by": by,
            "gateway": if gw.is_some() { "reached" } else { "not running" },
            "cgroups_killed": wiped.cgroups,
            "leases_destroyed": wiped.leases,
            "leases_still_held": wiped.held,
            "leases_failed": wiped.failed,
        }),
    )?;
    println!(
        "moat: incident mode is on (flag {}); lift it with `moat incident --lift`",
        data_dir.join(incident::FLAG_FILE).display()
    );
    if wiped.held + wiped.failed > 0 {
        anyhow::bail!("{} lease(s) could not be destroyed; see the log (MOAT_LOG=warn) and run `moat incident` again", wiped.held + wiped.failed);
    }
    Ok(())
}
