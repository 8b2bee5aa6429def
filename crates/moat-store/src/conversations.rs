//! Conversations: looking them up, and what the gateway records on them
//! (the lease or sandbox held, the sandbox mode, the agent's session, the
//! last activity), and which per-thread sandboxes sit idle.
//!
//! It must never: let `last_active_ms` move backwards, or store an agent
//! session id unsealed when the store has a key.

use crate::db::{args, Value};
use crate::{
    conversation_row, Conversation, ConversationId, SandboxMode, Store, StoreError, AGENT_SESSION,
    CONVERSATION_COLUMNS,
};

impl Store {
    /// The conversation `conversation_id`, or `None`.
    pub fn conversation(
        &self,
        conversation_id: ConversationId,
    ) -> Result<Option<Conversation>, StoreError> {
        Ok(self
            .conversations_where("id = ?1", args![conversation_id])?
            .into_iter()
            .next())
    }

    /// The conversation of `(platform, channel, thread)`, or `None` if no
    /// message of that thread was stored yet.
    pub fn conversation_by_key(
        &self,
        platform: &str,
        channel: &str,
        thread: &str,
    ) -> Result<Option<Conversation>, StoreError> {
        Ok(self
            .conversations_where(
                "platform = ?1 AND channel = ?2 AND thread = ?3",
                args![platform, channel, thread],
            )?
            .into_iter()
            .next())
    }

    pub(crate) fn conversations_where(
        &self,
        clause: &str,
        args: &[Value],
    ) -> Result<Vec<Conversation>, StoreError> {
        let rows = self.read(|c| {
            c.query(
                &format!("SELECT {CONVERSATION_COLUMNS} FROM conversations c WHERE {clause}"),
                args,
            )
        })?;
        rows.iter()
            .map(|r| conversation_row(r).and_then(|c| self.open_conversation(c)))
            .collect()
    }

    /// Records the lease (pool mode, for the length of a turn) or the
    /// sandbox (per-thread mode, until deleted) the conversation holds;
    /// `None` when it holds none. Unknown id: [`StoreError::NotFound`].
    pub fn set_conversation_lease(
        &self,
        conversation_id: ConversationId,
        lease_name: Option<&str>,
    ) -> Result<(), StoreError> {
        self.update_conversation(
            "UPDATE conversations SET lease_name = ?2 WHERE id = ?1",
            conversation_id,
            lease_name.into(),
        )
    }

    /// Records the sandbox mode the conversation's sandbox is assigned under
    /// (the channel's setting when it got one; kept so that a later policy
    /// change cannot make moat forget a per-thread sandbox it must delete).
    pub fn set_sandbox_mode(
        &self,
        conversation_id: ConversationId,
        mode: SandboxMode,
    ) -> Result<(), StoreError> {
        self.update_conversation(
            "UPDATE conversations SET sandbox_mode = ?2 WHERE id = ?1",
            conversation_id,
            mode.as_str().into(),
        )
    }

    /// Records the agent's session id (to resume its context next turn);
    /// `None` forgets it. Unknown id: [`StoreError::NotFound`].
    pub fn set_agent_session(
        &self,
        conversation_id: ConversationId,
        session: Option<&str>,
    ) -> Result<(), StoreError> {
        let session = self
            .sealer
            .seal_opt(&self.path, AGENT_SESSION, conversation_id, session)?;
        self.update_conversation(
            "UPDATE conversations SET agent_session = ?2 WHERE id = ?1",
            conversation_id,
            session.into(),
        )
    }

    /// Raises `last_active_ms` to `ts_ms`; an earlier `ts_ms` changes
    /// nothing (activity never moves backwards). Unknown id:
    /// [`StoreError::NotFound`].
    pub fn touch_conversation(
        &self,
        conversation_id: ConversationId,
        ts_ms: i64,
    ) -> Result<(), StoreError> {
        self.update_conversation(
            "UPDATE conversations SET last_active_ms = GREATEST(last_active_ms, ?2) WHERE id = ?1",
            conversation_id,
            ts_ms.into(),
        )
    }

    fn update_conversation(
        &self,
        sql: &str,
        conversation_id: ConversationId,
        value: Value,
    ) -> Result<(), StoreError> {
        let n = self.write(|c| c.execute(sql, &[Value::Int(conversation_id), value.clone()]))?;
        if n == 0 {
            return Err(StoreError::NotFound {
                kind: "conversation",
                id: conversation_id,
            });
        }
        Ok(())
    }

    pub(crate) fn require_conversation(
        &self,
        conversation_id: ConversationId,
    ) -> Result<(), StoreError> {
        let found = self.read(|c| {
            c.query_opt(
                "SELECT 1 FROM conversations WHERE id = ?1",
                args![conversation_id],
            )
        })?;
        match found {
            Some(_) => Ok(()),
            None => Err(StoreError::NotFound {
                kind: "conversation",
                id: conversation_id,
            }),
        }
    }

    /// Per-thread conversations whose sandbox may be deleted: sandbox mode
    /// `per-thread`, a sandbox recorded (`lease_name` set), last active
    /// strictly before `older_than_ms` (an instant: now minus the idle time),
    /// no running turn and no message waiting (received, queued, running).
    /// Least recently active first. Clearing the lease
    /// ([`Store::set_conversation_lease`] with `None`) after deleting the
    /// sandbox takes a conversation off this list.
    pub fn idle_conversations(&self, older_than_ms: i64) -> Result<Vec<Conversation>, StoreError> {
        self.conversations_where(
            "c.lease_name IS NOT NULL
               AND c.last_active_ms < ?1
               AND c.sandbox_mode = 'per-thread'
               AND NOT EXISTS (SELECT 1 FROM turns t
                               WHERE t.conversation_id = c.id AND t.state = 'running')
               AND NOT EXISTS (SELECT 1 FROM messages m
                               WHERE m.conversation_id = c.id
                                 AND m.state IN ('received', 'queued', 'running'))
             ORDER BY c.last_active_ms, c.id",
            args![older_than_ms],
        )
    }

    /// The conversations of one platform channel (a web user's own list),
    /// most recently active first, at most 200.
    pub fn conversations_in(
        &self,
        platform: &str,
        channel: &str,
    ) -> Result<Vec<Conversation>, StoreError> {
        self.conversations_where(
            "platform = ?1 AND channel = ?2
             ORDER BY last_active_ms DESC, id DESC LIMIT 200",
            args![platform, channel],
        )
    }
}
