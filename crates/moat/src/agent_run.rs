//! `moat agent-run`: the built-in agent's entry point inside a sandbox. Reads
//! one turn (JSON) on standard input, writes its events (JSON lines) to
//! standard output; the loop itself is `moat_agent::turn`.
//!
//! Must never: write anything but events to standard output (logs go to
//! standard error), or be given a real key (the door hands the sandbox a
//! placeholder; `moat_agent` talks only to the base URLs it finds).

use std::process::ExitCode;

use clap::Args;

#[derive(Args)]
pub struct AgentRunArgs {}

/// Exit status 0 when the turn ended with `final`, 1 with `error`.
pub fn run(_args: AgentRunArgs) -> ExitCode {
    let stdin = std::io::stdin().lock();
    let stdout = std::io::stdout().lock();
    if moat_agent::run_stdio(stdin, stdout, moat_agent::Setup::from_env()) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
