//! What the gateway needs after a restart and for its web chat's list:
//! queuing again the messages a crash left unanswered, and a channel's
//! conversations.

use rusqlite::{params, TransactionBehavior};

use crate::error::StoreError;
use crate::model::{Conversation, StoredMessage};
use crate::sealed::TURN_ERROR;
use crate::{conversation_row, Store, CONVERSATION_COLUMNS, MESSAGE_COLUMNS};

impl Store {
    /// Called once at start-up, before any turn starts. In one transaction:
    /// every turn still `running` (cut off by a crash) becomes `failed`
    /// ("interrupted by a restart"), and its messages, with every `received`
    /// one, go back to `queued` without a turn. Returns every `queued`
    /// message, oldest first: what the gateway must run again.
    ///
    /// Invariant: afterwards no turn is running and no message is `running`
    /// or `received`, so each unanswered message is in the returned list.
    pub fn requeue_interrupted(&self, now_ms: i64) -> Result<Vec<StoredMessage>, StoreError> {
        let err = self.err();
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&err)?;
        tx.execute(
            "UPDATE messages SET state = 'queued', turn_id = NULL
             WHERE state = 'running' OR state = 'received'",
            [],
        )
        .map_err(&err)?;
        let cut: Vec<i64> = tx
            .prepare("SELECT id FROM turns WHERE state = 'running'")
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
            .map_err(&err)?;
        for id in cut {
            let error = self.sealer.seal(
                &self.path,
                TURN_ERROR,
                id,
                "interrupted by a restart of moat",
            )?;
            tx.execute(
                "UPDATE turns SET state = 'failed', ended_ms = max(?1, started_ms), error = ?2
                 WHERE id = ?3",
                params![now_ms, error, id],
            )
            .map_err(&err)?;
        }
        let queued = {
            let mut s = tx
                .prepare(&format!(
                    "SELECT {MESSAGE_COLUMNS} FROM messages WHERE state = 'queued' ORDER BY id"
                ))
                .map_err(&err)?;
            let rows = s
                .query_map([], crate::message_row)
                .map_err(&err)?
                .collect::<rusqlite::Result<Vec<_>>>()
                .map_err(&err)?;
            rows
        };
        tx.commit().map_err(&err)?;
        queued.into_iter().map(|m| self.open_message(m)).collect()
    }

    /// The conversations of one platform channel (a web user's own list),
    /// most recently active first, at most 200.
    pub fn conversations_in(
        &self,
        platform: &str,
        channel: &str,
    ) -> Result<Vec<Conversation>, StoreError> {
        let conn = self.conn();
        conn.prepare_cached(&format!(
            "SELECT {CONVERSATION_COLUMNS} FROM conversations
             WHERE platform = ?1 AND channel = ?2
             ORDER BY last_active_ms DESC, id DESC LIMIT 200"
        ))
        .and_then(|mut s| {
            s.query_map(params![platform, channel], conversation_row)?
                .collect()
        })
        .map_err(self.err())
        .and_then(|cs| self.open_conversations(cs))
    }
}

#[cfg(test)]
mod tests {
    use crate::{IncomingMessage, Inserted, MessageState, Store, TurnState};

    fn msg(event: &str, thread: &str) -> IncomingMessage {
        IncomingMessage {
            platform: "web".into(),
            event_id: event.into(),
            channel: "alice".into(),
            thread: thread.into(),
            user: "alice".into(),
            text: format!("echo {event}"),
            ts_ms: 1,
            message_ref: None,
        }
    }

    #[test]
    fn a_restart_queues_every_unanswered_message_again() {
        let s = Store::open_in_memory().unwrap();
        let ids: Vec<(i64, i64)> = ["a", "b", "c", "d"]
            .iter()
            .map(|e| {
                match s
                    .insert_message(&msg(e, if *e == "d" { "t2" } else { "t1" }))
                    .unwrap()
                {
                    Inserted::New {
                        message_id,
                        conversation_id,
                    } => (message_id, conversation_id),
                    other => panic!("{other:?}"),
                }
            })
            .collect();
        // a: answered; b: cut off mid-turn; c: queued; d: only received.
        let t = s.start_turn(ids[0].1, &[ids[0].0], 2).unwrap();
        s.finish_turn(t, TurnState::Done, 3, None, 3).unwrap();
        s.set_message_state(ids[2].0, MessageState::Queued, None)
            .unwrap();
        let cut = s.start_turn(ids[1].1, &[ids[1].0], 4).unwrap();
        let again = s.requeue_interrupted(10).unwrap();
        let got: Vec<i64> = again.iter().map(|m| m.id).collect();
        assert_eq!(got, vec![ids[1].0, ids[2].0, ids[3].0]);
        assert!(again
            .iter()
            .all(|m| m.state == MessageState::Queued && m.turn_id.is_none()));
        let turn = s.turn(cut).unwrap().unwrap();
        assert_eq!(turn.state, TurnState::Failed);
        assert!(s.interrupted_turns().unwrap().is_empty());
        // The conversation can run a turn again.
        s.start_turn(ids[1].1, &[ids[1].0, ids[2].0], 11).unwrap();
        let list = s.conversations_in("web", "alice").unwrap();
        assert_eq!(list.len(), 2);
        assert!(s.conversations_in("web", "bob").unwrap().is_empty());
    }
}
