//! The rows the store hands out and the states they move through. Plain data:
//! no I/O here. The state machines themselves are enforced in `lib.rs`; the
//! names below are the exact strings stored in the database, so renaming one
//! needs a migration.

use std::fmt;
use std::str::FromStr;

/// A message's id (`messages.id`).
pub type MessageId = i64;
/// A conversation's id (`conversations.id`).
pub type ConversationId = i64;
/// A turn's id (`turns.id`).
pub type TurnId = i64;

/// One chat event as a front-end received it, before it is stored.
///
/// `(platform, event_id)` identifies the event: a platform that delivers the
/// same event again (Slack's retries) gives the same pair, and the store
/// answers [`Inserted::Duplicate`]. `(platform, channel, thread)` identifies
/// the conversation. `ts_ms` is the platform's timestamp in Unix milliseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncomingMessage {
    pub platform: String,
    pub event_id: String,
    pub channel: String,
    pub thread: String,
    pub user: String,
    pub text: String,
    pub ts_ms: i64,
    /// The platform's own id of the message (Slack: its `ts`), kept so
    /// that a message recovered after a crash can still be reacted to.
    pub message_ref: Option<String>,
}

/// What [`crate::Store::insert_message`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// The event was new: it is stored as `message_id`, in state
    /// [`MessageState::Received`], in `conversation_id` (created if needed).
    New {
        message_id: MessageId,
        conversation_id: ConversationId,
    },
    /// The event was stored before as `message_id`; nothing was written.
    Duplicate { message_id: MessageId },
}

/// Where a message is in its life. See `docs/store.md` for the transitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageState {
    /// Stored, not yet looked at by the pipeline.
    Received,
    /// Accepted and waiting for a turn (debounce, or a turn already running).
    Queued,
    /// Part of a running turn ([`StoredMessage::turn_id`] names it).
    Running,
    /// The turn that carried it finished and the answer was sent.
    Answered,
    /// It could not be answered; the user was (or must be) told.
    Failed,
    /// Deliberately not answered (unauthorised, over the rate limit, a bot's
    /// own message); `detail` says why.
    Dropped,
}

impl MessageState {
    /// All states, in life order.
    pub const ALL: [MessageState; 6] = [
        MessageState::Received,
        MessageState::Queued,
        MessageState::Running,
        MessageState::Answered,
        MessageState::Failed,
        MessageState::Dropped,
    ];

    /// The string stored in `messages.state`.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageState::Received => "received",
            MessageState::Queued => "queued",
            MessageState::Running => "running",
            MessageState::Answered => "answered",
            MessageState::Failed => "failed",
            MessageState::Dropped => "dropped",
        }
    }

    /// Answered, failed and dropped are final: nothing changes them.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            MessageState::Answered | MessageState::Failed | MessageState::Dropped
        )
    }
}

/// Where a turn is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TurnState {
    /// The agent is (or was, before a crash) working on it.
    Running,
    /// Finished with an answer.
    Done,
    /// Finished with an error.
    Failed,
    /// Stopped by the user (`stop`, `abort`) or by shutdown.
    Cancelled,
}

impl TurnState {
    /// All states, in life order.
    pub const ALL: [TurnState; 4] = [
        TurnState::Running,
        TurnState::Done,
        TurnState::Failed,
        TurnState::Cancelled,
    ];

    /// The string stored in `turns.state`.
    pub fn as_str(self) -> &'static str {
        match self {
            TurnState::Running => "running",
            TurnState::Done => "done",
            TurnState::Failed => "failed",
            TurnState::Cancelled => "cancelled",
        }
    }
}

/// How a conversation gets its sandbox (the channel's `sandbox` setting at
/// the time the conversation's sandbox was assigned).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SandboxMode {
    /// A lease from the shared pool per turn, reset after it.
    Pool,
    /// The conversation's own sandbox, kept across turns, deleted when idle.
    PerThread,
}

impl SandboxMode {
    /// All modes.
    pub const ALL: [SandboxMode; 2] = [SandboxMode::Pool, SandboxMode::PerThread];

    /// The string stored in `conversations.sandbox_mode`.
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxMode::Pool => "pool",
            SandboxMode::PerThread => "per-thread",
        }
    }
}

/// A value read from the database that names no known state: the database was
/// changed by hand or by a build with more states.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownName(pub String);

impl fmt::Display for UnknownName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown state or mode {:?}", self.0)
    }
}

impl std::error::Error for UnknownName {}

macro_rules! named {
    ($t:ty) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $t {
            type Err = UnknownName;
            fn from_str(s: &str) -> Result<Self, UnknownName> {
                <$t>::ALL
                    .into_iter()
                    .find(|v| v.as_str() == s)
                    .ok_or_else(|| UnknownName(s.to_string()))
            }
        }
    };
}

named!(MessageState);
named!(TurnState);
named!(SandboxMode);

/// A row of `conversations`: one chat thread (a Slack thread, a web chat
/// conversation) and the sandbox and agent session attached to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    pub id: ConversationId,
    pub platform: String,
    pub channel: String,
    pub thread: String,
    /// `ts_ms` of the first message stored in it.
    pub created_ms: i64,
    /// The latest of its messages' `ts_ms`, its turns' start and end, and
    /// [`crate::Store::touch_conversation`] calls. Never moves backwards.
    pub last_active_ms: i64,
    /// `None` until the gateway assigns a sandbox for the first time.
    pub sandbox_mode: Option<SandboxMode>,
    /// The lease (pool) or sandbox (per-thread) it holds, if any.
    pub lease_name: Option<String>,
    /// The agent's own session id, to resume the agent's context next turn.
    pub agent_session: Option<String>,
}

/// A row of `messages`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub id: MessageId,
    pub platform: String,
    pub event_id: String,
    pub conversation_id: ConversationId,
    pub user: String,
    pub text: String,
    pub ts_ms: i64,
    pub state: MessageState,
    /// The turn that carries (or carried) it; always set while `Running`.
    pub turn_id: Option<TurnId>,
    /// Why it was dropped or failed, if said.
    pub detail: Option<String>,
    /// The platform's own id of the message, if it has one.
    pub message_ref: Option<String>,
}

/// A row of `turns`: one run of the agent answering one or more messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    pub id: TurnId,
    pub conversation_id: ConversationId,
    pub state: TurnState,
    pub started_ms: i64,
    /// `None` exactly while `Running`.
    pub ended_ms: Option<i64>,
    /// Length of the answer sent, in characters (0 while running).
    pub answer_chars: u64,
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for s in MessageState::ALL {
            assert_eq!(s.as_str().parse::<MessageState>(), Ok(s));
            assert_eq!(s.to_string(), s.as_str());
        }
        for s in TurnState::ALL {
            assert_eq!(s.as_str().parse::<TurnState>(), Ok(s));
        }
        for s in SandboxMode::ALL {
            assert_eq!(s.as_str().parse::<SandboxMode>(), Ok(s));
        }
        assert_eq!(
            "Answered".parse::<MessageState>(),
            Err(UnknownName("Answered".into()))
        );
        assert!("".parse::<TurnState>().is_err());
        assert!("perthread".parse::<SandboxMode>().is_err());
    }

    #[test]
    fn exactly_answered_failed_and_dropped_are_final() {
        let finals: Vec<_> = MessageState::ALL
            .into_iter()
            .filter(|s| s.is_final())
            .collect();
        assert_eq!(
            finals,
            [
                MessageState::Answered,
                MessageState::Failed,
                MessageState::Dropped
            ]
        );
    }
}
