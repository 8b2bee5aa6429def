//! The durable inbox: storing an incoming event once (a platform's retry,
//! or the same event delivered to another gateway node, is recognised by
//! its event id), the message state machine, and reading messages back with
//! their sealed fields opened.
//!
//! It must never: acknowledge (return `Ok` for) an event that is not
//! committed, or let a final state (answered, failed, dropped) change.

use crate::db::{args, Conn, Value};
use crate::{
    message_row, message_state, Conversation, ConversationId, IncomingMessage, Inserted, MessageId,
    MessageState, Store, StoreError, StoredMessage, Turn, AGENT_SESSION, MESSAGE_COLUMNS,
    MESSAGE_DETAIL, MESSAGE_TEXT, TURN_ERROR,
};

impl Store {
    /// Stores one incoming event, atomically with its conversation.
    ///
    /// In one transaction: if `(platform, event_id)` is already stored,
    /// returns [`Inserted::Duplicate`] and writes nothing; otherwise gets or
    /// creates the conversation `(platform, channel, thread)` (created with
    /// `created_ms = last_active_ms = ts_ms`, else `last_active_ms` raised to
    /// `ts_ms` if that is later) and inserts the message in state
    /// [`MessageState::Received`], returning [`Inserted::New`].
    ///
    /// When this returns `Ok`, the row is committed with the store's
    /// [`crate::Durability`]: the event may be acknowledged to the platform.
    /// On PostgreSQL the same holds across nodes: of two nodes given the
    /// same event at once, one stores it and the other gets `Duplicate`.
    /// `platform` and `event_id` must not be empty ([`StoreError::Invalid`]):
    /// an empty id would make every later id-less event a "duplicate".
    pub fn insert_message(&self, m: &IncomingMessage) -> Result<Inserted, StoreError> {
        if m.platform.is_empty() {
            return Err(StoreError::Invalid {
                field: "platform",
                reason: "must not be empty",
            });
        }
        if m.event_id.is_empty() {
            return Err(StoreError::Invalid {
                field: "event_id",
                reason: "must not be empty (the platform's event id recognises retries)",
            });
        }
        self.write(|c| {
            let existing = c.query_opt(
                "SELECT id FROM messages WHERE platform = ?1 AND event_id = ?2",
                args![&m.platform, &m.event_id],
            )?;
            if let Some(r) = existing {
                return Ok(Inserted::Duplicate {
                    message_id: r.int(0)?,
                });
            }
            let conversation_id = c
                .query_one(
                    "INSERT INTO conversations (platform, channel, thread, created_ms, last_active_ms)
                     VALUES (?1, ?2, ?3, ?4, ?4)
                     ON CONFLICT (platform, channel, thread) DO UPDATE
                         SET last_active_ms = GREATEST(conversations.last_active_ms, excluded.last_active_ms)
                     RETURNING id",
                    args![&m.platform, &m.channel, &m.thread, m.ts_ms],
                )?
                .int(0)?;
            // The id is chosen first because a sealed text is bound to its
            // row id.
            let sql = c.dialect().next_message_id();
            let message_id = c.query_one(sql, &[])?.int(0)?;
            let text = self
                .sealer
                .seal(&self.path, MESSAGE_TEXT, message_id, &m.text)?;
            if let Some(node) = &self.node {
                // The node that stores the first event of a conversation
                // nobody owns takes it (a lease from the event's time: the
                // store reads no clock; its first turn renews it).
                c.execute(
                    "INSERT INTO conversation_owners (conversation_id, node, until_ms)
                     VALUES (?1, ?2, ?3) ON CONFLICT (conversation_id) DO NOTHING",
                    args![conversation_id, &node.id, m.ts_ms.saturating_add(node.lease_ms)],
                )?;
            }
            c.execute(
                "INSERT INTO messages (id, platform, event_id, conversation_id, \"user\", text, ts_ms, message_ref)
                 VALUES (?7, ?1, ?2, ?3, ?4, ?5, ?6, ?8)",
                args![
                    &m.platform,
                    &m.event_id,
                    conversation_id,
                    &m.user,
                    text,
                    m.ts_ms,
                    message_id,
                    m.message_ref.as_deref()
                ],
            )?;
            Ok(Inserted::New {
                message_id,
                conversation_id,
            })
        })
    }

    /// Moves a message to `state` and sets its `detail` to `detail` (`None`
    /// clears it).
    ///
    /// Allowed: from `Received`, `Queued` or `Running` to any state except
    /// `Running` (a message becomes running only through
    /// [`Store::start_turn`], which links it to its turn). Moving a running
    /// message back to `Received` or `Queued` (handing it back, e.g. at
    /// shutdown) unlinks it from its turn. `Answered`, `Failed` and `Dropped`
    /// are final: changing them is [`StoreError::MessageTransition`].
    pub fn set_message_state(
        &self,
        message_id: MessageId,
        state: MessageState,
        detail: Option<&str>,
    ) -> Result<(), StoreError> {
        self.write(|c| {
            let from = message_state(c, message_id)?.ok_or(StoreError::NotFound {
                kind: "message",
                id: message_id,
            })?;
            if state == MessageState::Running {
                return Err(StoreError::MessageTransition {
                    id: message_id,
                    from,
                    to: state,
                    why: "a message becomes running only through start_turn",
                });
            }
            if from.is_final() {
                return Err(StoreError::MessageTransition {
                    id: message_id,
                    from,
                    to: state,
                    why: "answered, failed and dropped are final",
                });
            }
            let unlink = matches!(state, MessageState::Received | MessageState::Queued);
            let detail = self
                .sealer
                .seal_opt(&self.path, MESSAGE_DETAIL, message_id, detail)?;
            c.execute(
                "UPDATE messages
                 SET state = ?2, detail = ?3, turn_id = CASE WHEN ?4 THEN NULL ELSE turn_id END
                 WHERE id = ?1",
                args![message_id, state.as_str(), detail, unlink],
            )?;
            Ok(())
        })
    }

    /// The message `message_id`, or `None` if there is none.
    pub fn message(&self, message_id: MessageId) -> Result<Option<StoredMessage>, StoreError> {
        Ok(self
            .messages_where("id = ?1", args![message_id])?
            .into_iter()
            .next())
    }

    /// Messages received, queued or running, oldest (first stored) first:
    /// what a restarted gateway still owes an answer or a failure report.
    /// Running ones belong to [`Store::interrupted_turns`].
    pub fn unfinished_messages(&self) -> Result<Vec<StoredMessage>, StoreError> {
        self.messages_where(
            "state IN ('received', 'queued', 'running') ORDER BY id",
            &[],
        )
    }

    /// Number of messages waiting for a turn (received or queued), for the
    /// queue-depth metric.
    pub fn queue_depth(&self) -> Result<u64, StoreError> {
        self.read(|c| {
            c.query_one(
                "SELECT count(*) FROM messages WHERE state IN ('received', 'queued')",
                &[],
            )?
            .int(0)
        })
        .map(|n| n.max(0) as u64)
    }

    /// The conversation's messages stored after the newest message of its
    /// last finished turn (all of them if no turn has finished), oldest
    /// first, in every state: the thread history the agent gets as context.
    /// The caller filters (e.g. leaves out dropped ones). An unknown
    /// conversation is [`StoreError::NotFound`].
    pub fn messages_since_last_turn(
        &self,
        conversation_id: ConversationId,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        self.require_conversation(conversation_id)?;
        self.messages_where(
            "conversation_id = ?1 AND id > coalesce(
                 (SELECT max(m.id) FROM messages m JOIN turns t ON t.id = m.turn_id
                  WHERE t.conversation_id = ?1 AND t.state <> 'running'), 0)
             ORDER BY id",
            args![conversation_id],
        )
    }

    pub(crate) fn messages_where(
        &self,
        clause: &str,
        args: &[Value],
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let rows = self.read(|c| {
            c.query(
                &format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE {clause}"),
                args,
            )
        })?;
        rows.iter()
            .map(|r| message_row(r).and_then(|m| self.open_message(m)))
            .collect()
    }

    /// Messages matching `clause` on an open connection (inside a
    /// transaction), not yet opened.
    pub(crate) fn messages_in(
        c: &mut dyn Conn,
        clause: &str,
        args: &[Value],
    ) -> Result<Vec<StoredMessage>, StoreError> {
        c.query(
            &format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE {clause}"),
            args,
        )?
        .iter()
        .map(message_row)
        .collect()
    }

    /// A message row as read, with its sealed fields opened.
    pub(crate) fn open_message(&self, mut m: StoredMessage) -> Result<StoredMessage, StoreError> {
        m.text = self
            .sealer
            .open(&self.path, MESSAGE_TEXT, m.id, std::mem::take(&mut m.text))?;
        m.detail = self
            .sealer
            .open_opt(&self.path, MESSAGE_DETAIL, m.id, m.detail.take())?;
        Ok(m)
    }

    /// A conversation row as read, with its sealed fields opened.
    pub(crate) fn open_conversation(
        &self,
        mut c: Conversation,
    ) -> Result<Conversation, StoreError> {
        c.agent_session =
            self.sealer
                .open_opt(&self.path, AGENT_SESSION, c.id, c.agent_session.take())?;
        Ok(c)
    }

    /// A turn row as read, with its sealed fields opened.
    pub(crate) fn open_turn(&self, mut t: Turn) -> Result<Turn, StoreError> {
        t.error = self
            .sealer
            .open_opt(&self.path, TURN_ERROR, t.id, t.error.take())?;
        Ok(t)
    }
}
