//! The privilege table (docs/trust.md): what a message at each trust level may
//! make the gateway do, and which keys an untrusted channel gets tighter
//! defaults for.
//!
//! Owns every decision that depends on a trust level: chat commands (`stop`,
//! `status`, `pool`, `tasks`, `pause N`, `resume N`, `cancel N`), the
//! agent's IPC operations (docs/ipc.md), whether a channel needs its
//! trigger, and the warnings for
//! an untrusted channel that loosens a tightened key. The gateway asks here and
//! never compares trust levels itself. Must never loosen anything for
//! `untrusted`, read a file or the environment.

use crate::approvals::{ApprovalKeys, ApprovalKind};
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

/// An operation the agent asks of moat through its IPC endpoint, or a
/// person through a task command (docs/ipc.md, docs/tasks.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpcOp {
    SendMessage,
    ScheduleTask,
    ListTasks,
    PauseTask,
    ResumeTask,
    CancelTask,
    RegisterGroup,
    /// The agent asks its channel's admins to decide something it is about
    /// to do (its own words; the answer is the decision).
    RequestApproval,
}

impl IpcOp {
    pub fn name(self) -> &'static str {
        match self {
            Self::SendMessage => "send_message",
            Self::ScheduleTask => "schedule_task",
            Self::ListTasks => "list_tasks",
            Self::PauseTask => "pause_task",
            Self::ResumeTask => "resume_task",
            Self::CancelTask => "cancel_task",
            Self::RegisterGroup => "register_group",
            Self::RequestApproval => "request_approval",
        }
    }
}

/// What an operation acts on, as moat sees it (from the lease's identity and
/// the store, never from the request's words).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpcTarget {
    /// The caller's own conversation or channel (its tasks).
    Own,
    /// Another chat or channel; `listed`: the configuration (or the group
    /// registry) names it.
    Other { listed: bool },
}

/// Why an IPC operation is refused; `message` is what the caller is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpcRefusal {
    /// Acting on another chat or channel needs an admin.
    AdminsOnly,
    /// Even an admin sends only to chats the configuration lists.
    NotListed,
    /// An untrusted channel only answers in its own conversation.
    Untrusted,
}

impl IpcRefusal {
    pub fn message(self, op: IpcOp) -> String {
        match self {
            Self::AdminsOnly => format!(
                "{} on another chat or channel is for admin channels only; this call acts on its own channel only",
                op.name()
            ),
            Self::NotListed => format!(
                "{}: that chat is not a channel of this gateway's configuration (or the group registry)",
                op.name()
            ),
            Self::Untrusted => format!(
                "{} is not available to an untrusted channel; it may only send_message to its own conversation",
                op.name()
            ),
        }
    }

    /// The reason in audit records.
    pub fn name(self) -> &'static str {
        match self {
            Self::AdminsOnly => "admins_only",
            Self::NotListed => "not_listed",
            Self::Untrusted => "untrusted",
        }
    }
}

/// May a caller at `trust` (the lease's, never the request's) run `op` on
/// `target`? Admins: everything, sending only to listed chats. Members:
/// their own conversation and channel's tasks, and asking their own
/// channel's admins. Untrusted: only `send_message` to their own
/// conversation and `list_tasks` (it sees none of anyone else's); it may
/// not ask admins anything (an untrusted prompt must not reach them).
pub fn may_ipc(trust: Trust, op: IpcOp, target: IpcTarget) -> Result<(), IpcRefusal> {
    use IpcOp::*;
    match (trust, op, target) {
        (Trust::Admin, SendMessage, IpcTarget::Other { listed: false }) => {
            Err(IpcRefusal::NotListed)
        }
        (Trust::Admin, _, _) => Ok(()),
        (_, RegisterGroup, _) => Err(IpcRefusal::AdminsOnly),
        (_, RequestApproval, IpcTarget::Other { .. }) => Err(IpcRefusal::AdminsOnly),
        (_, _, IpcTarget::Other { .. }) => Err(IpcRefusal::AdminsOnly),
        (Trust::Untrusted, SendMessage | ListTasks, IpcTarget::Own) => Ok(()),
        (Trust::Untrusted, _, IpcTarget::Own) => Err(IpcRefusal::Untrusted),
        (Trust::Member, _, IpcTarget::Own) => Ok(()),
    }
}

/// What an allowed IPC operation still needs before it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpcGate {
    /// Nothing: it runs now.
    Go,
    /// It waits until an admin of the channel approves it (denied on
    /// timeout): the channel lists this action in `approve`.
    Approval(ApprovalKind),
}

/// [`may_ipc`], then the channel's `approve` list: the one decision for an
/// IPC operation. A refused operation never asks anyone (a member cannot
/// make the admins approve what the rights table forbids).
pub fn ipc_gate(
    trust: Trust,
    op: IpcOp,
    target: IpcTarget,
    approvals: &ApprovalKeys,
) -> Result<IpcGate, IpcRefusal> {
    may_ipc(trust, op, target)?;
    let kind = match (op, target) {
        (IpcOp::SendMessage, IpcTarget::Other { .. }) => Some(ApprovalKind::SendElsewhere),
        (IpcOp::ScheduleTask, _) => Some(ApprovalKind::Schedule),
        _ => None,
    };
    Ok(match kind {
        Some(k) if approvals.needs(k) => IpcGate::Approval(k),
        _ => IpcGate::Go,
    })
}

/// A person's task command: `tasks`, `pause N`, `resume N`, `cancel N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskCommand {
    List,
    Pause(i64),
    Resume(i64),
    Cancel(i64),
}

impl TaskCommand {
    /// The task command `text` is, if it is one (case and space ignored).
    pub fn parse(text: &str) -> Option<Self> {
        let t = text.trim().to_ascii_lowercase();
        if t == "tasks" {
            return Some(Self::List);
        }
        let (word, n) = t.split_once(char::is_whitespace)?;
        let n: i64 = n
            .trim()
            .strip_prefix('#')
            .unwrap_or(n.trim())
            .parse()
            .ok()?;
        match word {
            "pause" => Some(Self::Pause(n)),
            "resume" => Some(Self::Resume(n)),
            "cancel" => Some(Self::Cancel(n)),
            _ => None,
        }
    }

    /// The IPC operation with the same rights.
    pub fn op(self) -> IpcOp {
        match self {
            Self::List => IpcOp::ListTasks,
            Self::Pause(_) => IpcOp::PauseTask,
            Self::Resume(_) => IpcOp::ResumeTask,
            Self::Cancel(_) => IpcOp::CancelTask,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipc_rights_table() {
        use IpcOp::*;
        let other = IpcTarget::Other { listed: true };
        let unlisted = IpcTarget::Other { listed: false };
        for op in [
            SendMessage,
            ScheduleTask,
            ListTasks,
            PauseTask,
            ResumeTask,
            CancelTask,
            RegisterGroup,
            RequestApproval,
        ] {
            assert_eq!(may_ipc(Trust::Admin, op, IpcTarget::Own), Ok(()));
            assert_eq!(may_ipc(Trust::Admin, op, other), Ok(()));
            for t in [Trust::Member, Trust::Untrusted] {
                assert_eq!(may_ipc(t, op, other), Err(IpcRefusal::AdminsOnly), "{op:?}");
            }
        }
        assert_eq!(
            may_ipc(Trust::Admin, SendMessage, unlisted),
            Err(IpcRefusal::NotListed)
        );
        assert_eq!(may_ipc(Trust::Member, ScheduleTask, IpcTarget::Own), Ok(()));
        assert_eq!(
            may_ipc(Trust::Member, RegisterGroup, IpcTarget::Own),
            Err(IpcRefusal::AdminsOnly)
        );
        assert_eq!(
            may_ipc(Trust::Untrusted, SendMessage, IpcTarget::Own),
            Ok(())
        );
        assert_eq!(
            may_ipc(Trust::Untrusted, ScheduleTask, IpcTarget::Own),
            Err(IpcRefusal::Untrusted)
        );
        // Asking the own channel's admins: members yes, untrusted never.
        assert_eq!(
            may_ipc(Trust::Member, RequestApproval, IpcTarget::Own),
            Ok(())
        );
        assert_eq!(
            may_ipc(Trust::Untrusted, RequestApproval, IpcTarget::Own),
            Err(IpcRefusal::Untrusted)
        );
    }

    #[test]
    fn approval_gates_follow_the_rights_table() {
        use IpcOp::*;
        let mut keys = ApprovalKeys::default();
        let other = IpcTarget::Other { listed: true };
        assert_eq!(
            ipc_gate(Trust::Admin, SendMessage, other, &keys),
            Ok(IpcGate::Go)
        );
        keys.approve = vec![ApprovalKind::SendElsewhere, ApprovalKind::Schedule];
        assert_eq!(
            ipc_gate(Trust::Admin, SendMessage, other, &keys),
            Ok(IpcGate::Approval(ApprovalKind::SendElsewhere))
        );
        // The own conversation is not "elsewhere".
        assert_eq!(
            ipc_gate(Trust::Member, SendMessage, IpcTarget::Own, &keys),
            Ok(IpcGate::Go)
        );
        assert_eq!(
            ipc_gate(Trust::Member, ScheduleTask, IpcTarget::Own, &keys),
            Ok(IpcGate::Approval(ApprovalKind::Schedule))
        );
        // Refused stays refused: nobody is asked.
        assert_eq!(
            ipc_gate(Trust::Member, SendMessage, other, &keys),
            Err(IpcRefusal::AdminsOnly)
        );
        assert_eq!(
            ipc_gate(Trust::Untrusted, ScheduleTask, IpcTarget::Own, &keys),
            Err(IpcRefusal::Untrusted)
        );
        assert_eq!(
            ipc_gate(Trust::Admin, ListTasks, IpcTarget::Own, &keys),
            Ok(IpcGate::Go)
        );
    }

    #[test]
    fn task_command_words() {
        assert_eq!(TaskCommand::parse(" Tasks "), Some(TaskCommand::List));
        assert_eq!(TaskCommand::parse("pause 3"), Some(TaskCommand::Pause(3)));
        assert_eq!(
            TaskCommand::parse("cancel #12"),
            Some(TaskCommand::Cancel(12))
        );
        assert_eq!(
            TaskCommand::parse("resume  4"),
            Some(TaskCommand::Resume(4))
        );
        assert_eq!(TaskCommand::parse("pause the music"), None);
        assert_eq!(TaskCommand::parse("cancel"), None);
    }

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
