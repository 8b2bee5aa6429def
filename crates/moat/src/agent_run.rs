//! `moat agent-run`: the built-in agent's entry point inside a sandbox.
//! (Being built: see crates/moat-agent.)

use std::process::ExitCode;

use clap::Args;

#[derive(Args)]
pub struct AgentRunArgs {}

pub fn run(_args: AgentRunArgs) -> ExitCode {
    println!(
        "{}",
        serde_json::json!({"type": "error", "message": "the built-in agent is not built yet"})
    );
    ExitCode::from(1)
}
