//! Turns: starting one for a conversation's waiting messages and finishing
//! it (settling those messages), the turn state machine, and the store's
//! integrity check.
//!
//! It must never: let a conversation have two running turns (the schema
//! enforces it too), or let a turn finish twice.

use crate::db::args;
use crate::nodes::{claim_in, require_owner, Ownership};
use crate::{
    turn_row, Backend, ConversationId, MessageId, MessageState, Store, StoreError, StoredMessage,
    Turn, TurnId, TurnState, MESSAGE_DETAIL, TURN_ANSWER, TURN_COLUMNS, TURN_ERROR,
};

impl Store {
    /// Starts a turn of `conversation_id` answering `message_ids`, in one
    /// transaction: creates the turn (`Running`, `started_ms = now_ms`),
    /// moves each message to `Running` linked to it, and raises the
    /// conversation's `last_active_ms` to `now_ms`.
    ///
    /// Refused, changing nothing: an empty `message_ids`
    /// ([`StoreError::Invalid`]); an unknown conversation or message
    /// ([`StoreError::NotFound`]); a message of another conversation
    /// ([`StoreError::WrongConversation`]); a message not `Received` or
    /// `Queued` ([`StoreError::MessageTransition`]); a conversation that
    /// already has a running turn ([`StoreError::TurnRunning`]; the schema
    /// enforces this too); on a store with a node ([`Store::with_node`]), a
    /// conversation another node's live lease covers
    /// ([`StoreError::NotOwner`]; otherwise the turn takes the lease).
    pub fn start_turn(
        &self,
        conversation_id: ConversationId,
        message_ids: &[MessageId],
        now_ms: i64,
    ) -> Result<TurnId, StoreError> {
        if message_ids.is_empty() {
            return Err(StoreError::Invalid {
                field: "message_ids",
                reason: "a turn answers at least one message",
            });
        }
        self.write(|c| {
            if c.query_opt(
                "SELECT 1 FROM conversations WHERE id = ?1",
                args![conversation_id],
            )?
            .is_none()
            {
                return Err(StoreError::NotFound {
                    kind: "conversation",
                    id: conversation_id,
                });
            }
            if let Some(node) = &self.node {
                if let Ownership::Other { node, until_ms } =
                    claim_in(c, node, conversation_id, now_ms)?
                {
                    return Err(StoreError::NotOwner {
                        conversation_id,
                        owner: node,
                        until_ms,
                    });
                }
            }
            if let Some(r) = c.query_opt(
                "SELECT id FROM turns WHERE conversation_id = ?1 AND state = 'running'",
                args![conversation_id],
            )? {
                return Err(StoreError::TurnRunning {
                    conversation_id,
                    turn_id: r.int(0)?,
                });
            }
            for &id in message_ids {
                let Some(r) = c.query_opt(
                    "SELECT conversation_id, state FROM messages WHERE id = ?1",
                    args![id],
                )?
                else {
                    return Err(StoreError::NotFound {
                        kind: "message",
                        id,
                    });
                };
                let actual = r.int(0)?;
                if actual != conversation_id {
                    return Err(StoreError::WrongConversation {
                        message_id: id,
                        expected: conversation_id,
                        actual,
                    });
                }
                let from: MessageState = r.name(1)?;
                if !matches!(from, MessageState::Received | MessageState::Queued) {
                    return Err(StoreError::MessageTransition {
                        id,
                        from,
                        to: MessageState::Running,
                        why: "only received or queued messages join a turn",
                    });
                }
            }
            let turn_id = c
                .query_one(
                    "INSERT INTO turns (conversation_id, state, started_ms)
                     VALUES (?1, 'running', ?2) RETURNING id",
                    args![conversation_id, now_ms],
                )?
                .int(0)?;
            for &id in message_ids {
                c.execute(
                    "UPDATE messages SET state = 'running', turn_id = ?2, detail = NULL
                     WHERE id = ?1",
                    args![id, turn_id],
                )?;
            }
            c.execute(
                "UPDATE conversations SET last_active_ms = GREATEST(last_active_ms, ?2) WHERE id = ?1",
                args![conversation_id, now_ms],
            )?;
            Ok(turn_id)
        })
    }

    /// Finishes a running turn, in one transaction: sets its state,
    /// `ended_ms = now_ms`, `answer_chars` and `error`; moves its messages
    /// that are still `Running` to `Answered` (turn `Done`) or `Failed` with
    /// `detail` = `error` (turn `Failed`, or `Cancelled`, where a missing
    /// `error` reads "cancelled"); and raises the conversation's
    /// `last_active_ms` to `now_ms` (idle time counts from the end of the
    /// last turn).
    ///
    /// A turn finishes once: finishing one that is not running, or finishing
    /// "to" `Running`, is [`StoreError::TurnTransition`]; an unknown turn is
    /// [`StoreError::NotFound`]; on a store with a node, a turn of a
    /// conversation another node took over is [`StoreError::NotOwner`].
    pub fn finish_turn(
        &self,
        turn_id: TurnId,
        state: TurnState,
        answer_chars: u64,
        error: Option<&str>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.finish(turn_id, state, answer_chars, None, error, now_ms)
    }

    /// [`Store::finish_turn`], keeping `answer` too when given (sealed,
    /// delivery `pending`: the outbox, `outbox.rs`).
    pub(crate) fn finish(
        &self,
        turn_id: TurnId,
        state: TurnState,
        answer_chars: u64,
        answer: Option<(&str, bool)>,
        error: Option<&str>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.write(|c| {
            let Some(r) = c.query_opt(
                "SELECT conversation_id, state FROM turns WHERE id = ?1",
                args![turn_id],
            )?
            else {
                return Err(StoreError::NotFound {
                    kind: "turn",
                    id: turn_id,
                });
            };
            let conversation_id = r.int(0)?;
            let from: TurnState = r.name(1)?;
            if let Some(node) = &self.node {
                require_owner(c, node, conversation_id)?;
            }
            if state == TurnState::Running {
                return Err(StoreError::TurnTransition {
                    id: turn_id,
                    from,
                    to: state,
                    why: "finish a turn as done, failed or cancelled",
                });
            }
            if from != TurnState::Running {
                return Err(StoreError::TurnTransition {
                    id: turn_id,
                    from,
                    to: state,
                    why: "a turn finishes once",
                });
            }
            let answer_chars = i64::try_from(answer_chars).unwrap_or(i64::MAX);
            let sealed_error = self
                .sealer
                .seal_opt(&self.path, TURN_ERROR, turn_id, error)?;
            c.execute(
                "UPDATE turns SET state = ?2, ended_ms = ?3, answer_chars = ?4, error = ?5
                 WHERE id = ?1",
                args![turn_id, state.as_str(), now_ms, answer_chars, sealed_error],
            )?;
            if let Some((answer, verbatim)) = answer {
                let sealed = self.sealer.seal(&self.path, TURN_ANSWER, turn_id, answer)?;
                c.execute(
                    "UPDATE turns SET answer = ?2, answer_verbatim = ?3, delivery = 'pending'
                     WHERE id = ?1",
                    args![turn_id, sealed, i64::from(verbatim)],
                )?;
            }
            let (message_state, detail) = match state {
                TurnState::Done => (MessageState::Answered, None),
                TurnState::Failed => (MessageState::Failed, error),
                _ => (MessageState::Failed, Some(error.unwrap_or("cancelled"))),
            };
            // Each message's detail is sealed for its own row.
            let settle = c.query(
                "SELECT id FROM messages WHERE turn_id = ?1 AND state = 'running'",
                args![turn_id],
            )?;
            for r in settle {
                let id = r.int(0)?;
                let detail = self
                    .sealer
                    .seal_opt(&self.path, MESSAGE_DETAIL, id, detail)?;
                c.execute(
                    "UPDATE messages SET state = ?2, detail = ?3 WHERE id = ?1",
                    args![id, message_state.as_str(), detail],
                )?;
            }
            c.execute(
                "UPDATE conversations SET last_active_ms = GREATEST(last_active_ms, ?2) WHERE id = ?1",
                args![conversation_id, now_ms],
            )?;
            Ok(())
        })
    }

    /// The turn `turn_id`, or `None`.
    pub fn turn(&self, turn_id: TurnId) -> Result<Option<Turn>, StoreError> {
        let row = self.read(|c| {
            c.query_opt(
                &format!("SELECT {TURN_COLUMNS} FROM turns WHERE id = ?1"),
                args![turn_id],
            )
        })?;
        row.map(|r| turn_row(&r).and_then(|t| self.open_turn(t)))
            .transpose()
    }

    /// The messages linked to `turn_id` (those it answers or answered),
    /// oldest first; what to retry or report when the turn was interrupted.
    pub fn turn_messages(&self, turn_id: TurnId) -> Result<Vec<StoredMessage>, StoreError> {
        self.messages_where("turn_id = ?1 ORDER BY id", args![turn_id])
    }

    /// Turns in state `Running`, oldest first. Called at start-up, before any
    /// new turn starts, these are the turns a crash or kill interrupted (the
    /// lock of [`Store::open`] guarantees no other process runs them); the
    /// gateway retries or fails each with [`Store::finish_turn`].
    pub fn interrupted_turns(&self) -> Result<Vec<Turn>, StoreError> {
        let rows = self.read(|c| {
            c.query(
                &format!("SELECT {TURN_COLUMNS} FROM turns WHERE state = 'running' ORDER BY id"),
                &[],
            )
        })?;
        rows.iter()
            .map(|r| turn_row(r).and_then(|t| self.open_turn(t)))
            .collect()
    }

    /// Checks the database and returns the problems found; empty means it
    /// is sound. SQLite: its `integrity_check` and `foreign_key_check`.
    /// PostgreSQL checks its own pages and enforces foreign keys on every
    /// write; here it reports nothing.
    pub fn check_integrity(&self) -> Result<Vec<String>, StoreError> {
        let Backend::Sqlite(m) = &self.db else {
            return Ok(Vec::new());
        };
        let conn = m.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let err = |e| StoreError::sqlite(&self.path, crate::busy_ms(), e);
        let mut problems: Vec<String> = conn
            .prepare("PRAGMA integrity_check")
            .and_then(|mut s| s.query_map([], |r| r.get::<_, String>(0))?.collect())
            .map_err(err)?;
        if problems == ["ok"] {
            problems.clear();
        }
        let fk: Vec<String> = conn
            .prepare("PRAGMA foreign_key_check")
            .and_then(|mut s| {
                s.query_map([], |r| {
                    Ok(format!(
                        "{} row {} references a missing {} row",
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, String>(2)?
                    ))
                })?
                .collect()
            })
            .map_err(err)?;
        problems.extend(fk);
        Ok(problems)
    }
}
