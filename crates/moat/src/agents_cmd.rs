//! `moat agents ...`: the agent CLIs for the sandboxes.
//! (Being built: `moat agents install`.)

use clap::Subcommand;

#[derive(Subcommand)]
pub enum AgentsCmd {
    /// Install the agent CLIs into a template directory (not built yet).
    Install,
}

pub fn run(cmd: AgentsCmd) -> anyhow::Result<()> {
    match cmd {
        AgentsCmd::Install => anyhow::bail!("moat agents install is not built yet"),
    }
}
