//! The privilege table (docs/trust.md): what a message at each trust level may
//! make the gateway do, and which keys an untrusted channel gets tighter
//! defaults for.
//!
//! Owns every decision that depends on a trust level: chat commands (`stop`,
//! `status`, `pool`), whether a channel needs its trigger, and the warnings for
//! an untrusted channel that loosens a tightened key. The gateway asks here and
//! never compares trust levels itself. Must never loosen anything for
//! `untrusted`, read a file or the environment.

use crate::gateway::Trust;

/// A chat command: a message that is exactly one of these words (after the
/// channel's trigger, when it has one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `stop` or `abort`: cancel the running turn, drop the queued messages.
    Stop,
    /// `status`: what the conversation's sandbox is doing.
    Status,
    /// `pool`: the pool's numbers (admins only).
    Pool,
}

impl Command {
    /// The command `text` is, if it is one (case and surrounding space ignored).
    pub fn parse(text: &str) -> Option<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "stop" | "abort" => Some(Self::Stop),
            "status" => Some(Self::Status),
            "pool" => Some(Self::Pool),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Status => "status",
            Self::Pool => "pool",
        }
    }
}

/// Whose turn or conversation a command would act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whose {
    /// The sender's own: their turn is running, their messages wait, or (for
    /// `status`) they have written in this conversation.
    Own,
    /// Someone else's.
    Others,
}

/// Why a command is refused; `message` is what the sender is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    NotYours,
    AdminsOnly,
}

impl Refusal {
    pub fn message(self, cmd: Command) -> String {
        match self {
            Self::NotYours => format!(
                "`{}` acts on your own turns only; this one is someone else's. An admin of this channel can {} it.",
                cmd.name(),
                cmd.name()
            ),
            Self::AdminsOnly => format!("`{}` is for this channel's admins.", cmd.name()),
        }
    }

    /// The reason in audit records.
    pub fn name(self) -> &'static str {
        match self {
            Self::NotYours => "not_yours",
            Self::AdminsOnly => "admins_only",
        }
    }
}

/// May a sender at `trust` run `cmd` on a conversation that is `whose`?
pub fn may_command(trust: Trust, cmd: Command, whose: Whose) -> Result<(), Refusal> {
    match (cmd, trust, whose) {
        (_, Trust::Admin, _) => Ok(()),
        (Command::Pool, _, _) => Err(Refusal::AdminsOnly),
        (Command::Stop | Command::Status, _, Whose::Own) => Ok(()),
        (Command::Stop | Command::Status, _, Whose::Others) => Err(Refusal::NotYours),
    }
}

/// Does a message in a channel of `channel_trust` need the channel's trigger
/// (when it has one) to start a turn? Admin channels answer everything.
pub fn needs_trigger(channel_trust: Trust) -> bool {
    channel_trust != Trust::Admin
}

/// The keys an untrusted channel does not take from `[defaults]`: it starts
/// from the tightened value, and only its own `[[channel]]` entry can loosen
/// one, with a warning (`github` write permissions are checked in
/// `github.rs`, the backend in [`backend_warning`]).
pub const TIGHTENED: &[(&str, &str)] = &[
    ("egress", "no network"),
    ("resolve", "no pinned names"),
    ("mcp", "no MCP servers"),
];

/// The warning for an untrusted channel (`where_` e.g. `channel[2] (slack
/// channel C1)`) that sets a tightened key itself.
pub fn override_warning(where_: &str, key: &str) -> String {
    let tight = TIGHTENED
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| *v)
        .unwrap_or("the tightened default");
    format!(
        "{where_} is untrusted but sets {key} (an untrusted channel's default is {tight}): anyone there can use it"
    )
}

/// The warning for an untrusted channel that runs on `bwrap`: gVisor is the
/// stronger boundary. moat does not switch the backend itself (runsc may not
/// be installed); the operator sets it on that channel alone, the others
/// stay on bwrap in the same gateway.
pub fn backend_warning(where_: &str) -> String {
    format!(
        "{where_} is untrusted and runs on bwrap; where runsc is installed set backend = \"gvisor\" in its [[channel]] entry (other channels may stay on bwrap)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_by_trust() {
        use Command::*;
        for cmd in [Stop, Status, Pool] {
            for whose in [Whose::Own, Whose::Others] {
                assert_eq!(may_command(Trust::Admin, cmd, whose), Ok(()));
            }
        }
        for t in [Trust::Member, Trust::Untrusted] {
            assert_eq!(may_command(t, Stop, Whose::Own), Ok(()));
            assert_eq!(may_command(t, Status, Whose::Own), Ok(()));
            assert_eq!(may_command(t, Stop, Whose::Others), Err(Refusal::NotYours));
            assert_eq!(
                may_command(t, Status, Whose::Others),
                Err(Refusal::NotYours)
            );
            assert_eq!(may_command(t, Pool, Whose::Own), Err(Refusal::AdminsOnly));
        }
    }

    #[test]
    fn command_words() {
        assert_eq!(Command::parse(" STOP "), Some(Command::Stop));
        assert_eq!(Command::parse("abort"), Some(Command::Stop));
        assert_eq!(Command::parse("status"), Some(Command::Status));
        assert_eq!(Command::parse("pool"), Some(Command::Pool));
        assert_eq!(Command::parse("stop it"), None);
    }

    #[test]
    fn only_admin_channels_skip_the_trigger() {
        assert!(!needs_trigger(Trust::Admin));
        assert!(needs_trigger(Trust::Member));
        assert!(needs_trigger(Trust::Untrusted));
    }
}
