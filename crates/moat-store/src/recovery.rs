//! What the gateway needs after a restart and for its web chat's list:
//! queuing again the messages a crash left unanswered.

use crate::db::args;
use crate::error::StoreError;
use crate::model::StoredMessage;
use crate::sealed::TURN_ERROR;
use crate::Store;

impl Store {
    /// Called once at start-up, before any turn starts. In one transaction:
    /// every turn still `running` (cut off by a crash) becomes `failed`
    /// ("interrupted by a restart"), and its messages, with every `received`
    /// one, go back to `queued` without a turn. Returns every `queued`
    /// message, oldest first: what the gateway must run again.
    ///
    /// Invariant: afterwards no turn is running and no message is `running`
    /// or `received`, so each unanswered message is in the returned list.
    ///
    /// On a store with a node ([`Store::with_node`]) the other nodes'
    /// turns are not this node's to judge: this is [`Store::take_over`],
    /// which takes only conversations whose owner's lease expired.
    pub fn requeue_interrupted(&self, now_ms: i64) -> Result<Vec<StoredMessage>, StoreError> {
        if self.node.is_some() {
            return self.take_over(now_ms);
        }
        let queued = self.write(|c| {
            c.execute(
                "UPDATE messages SET state = 'queued', turn_id = NULL
                 WHERE state = 'running' OR state = 'received'",
                &[],
            )?;
            let cut = c.query("SELECT id FROM turns WHERE state = 'running'", &[])?;
            for r in cut {
                let id = r.int(0)?;
                let error = self.sealer.seal(
                    &self.path,
                    TURN_ERROR,
                    id,
                    "interrupted by a restart of moat",
                )?;
                c.execute(
                    "UPDATE turns SET state = 'failed', ended_ms = GREATEST(?1, started_ms), error = ?2
                     WHERE id = ?3",
                    args![now_ms, error, id],
                )?;
            }
            Store::messages_in(c, "state = 'queued' ORDER BY id", &[])
        })?;
        queued.into_iter().map(|m| self.open_message(m)).collect()
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
