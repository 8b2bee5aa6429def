//! The outbox: a finished turn keeps its answer until its platform has it.
//!
//! The gateway finishes a turn with [`Store::finish_turn_keeping`] (the
//! answer sealed, delivery `pending`), delivers it, then marks it
//! [`Store::mark_delivered`]. A gateway killed in between finds the answer
//! in [`Store::undelivered_answers`] at its next start and delivers the kept
//! answer: the messages are not run again (no second, different answer).
//! [`Store::kept_answers`] is a conversation's recent answers, for the web
//! chat's history after a restart, with [`Store::recent_messages`].
//!
//! It must never: hand out an answer of another conversation than the one
//! asked for, or, on a store shared by several nodes, another node's
//! undelivered answers (their owner delivers them, or whoever takes the
//! conversation over).

use crate::db::args;
use crate::{ConversationId, Store, StoreError, StoredMessage, TurnId, TurnState, TURN_ANSWER};

/// A kept answer not yet delivered, with what its delivery needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Undelivered {
    pub turn_id: TurnId,
    pub conversation_id: ConversationId,
    pub state: TurnState,
    pub answer: String,
    /// Command output, shown as it is (not Markdown).
    pub verbatim: bool,
    /// The platform's ids of the messages the turn answered (reactions).
    pub message_refs: Vec<String>,
}

/// One kept answer of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptAnswer {
    pub turn_id: TurnId,
    pub state: TurnState,
    pub answer: String,
    pub verbatim: bool,
    pub ended_ms: i64,
    pub delivered: bool,
}

/// What [`Store::purge_before`] deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Purged {
    pub messages: u64,
    pub turns: u64,
}

impl Store {
    /// Retention: deletes the messages stored before `cutoff_ms` that are
    /// settled (answered, failed or dropped) and whose turn, if any, ended
    /// before it with its answer delivered; then the turns that ended
    /// before it, delivered, with no message left. A running turn, an
    /// answer still owed and a message still waiting are never deleted.
    /// SQLite overwrites what it deletes (`secure_delete`).
    pub fn purge_before(&self, cutoff_ms: i64) -> Result<Purged, StoreError> {
        self.write(|c| {
            let messages = c.execute(
                "DELETE FROM messages
                 WHERE ts_ms < ?1 AND state IN ('answered', 'failed', 'dropped')
                   AND (turn_id IS NULL OR turn_id IN (
                        SELECT id FROM turns
                        WHERE state <> 'running' AND ended_ms < ?1
                          AND (delivery IS NULL OR delivery = 'delivered')))",
                args![cutoff_ms],
            )?;
            let turns = c.execute(
                "DELETE FROM turns
                 WHERE state <> 'running' AND ended_ms < ?1
                   AND (delivery IS NULL OR delivery = 'delivered')
                   AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.turn_id = turns.id)",
                args![cutoff_ms],
            )?;
            Ok(Purged { messages, turns })
        })
    }

    /// [`Store::finish_turn`] that keeps `answer` (sealed at rest; with
    /// `verbatim`, command output shown as it is) with delivery `pending`,
    /// in the same transaction: from here on a restart delivers this answer
    /// rather than running the turn's messages again.
    pub fn finish_turn_keeping(
        &self,
        turn_id: TurnId,
        state: TurnState,
        answer: &str,
        verbatim: bool,
        error: Option<&str>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let chars = answer.chars().count() as u64;
        self.finish(
            turn_id,
            state,
            chars,
            Some((answer, verbatim)),
            error,
            now_ms,
        )
    }

    /// The answer of `turn_id` reached its platform. Marking one already
    /// delivered changes nothing; an unknown turn, or one whose answer is
    /// not kept, is [`StoreError::NotFound`].
    pub fn mark_delivered(&self, turn_id: TurnId, now_ms: i64) -> Result<(), StoreError> {
        self.write(|c| {
            let n = c.execute(
                "UPDATE turns SET delivery = 'delivered', delivered_ms = ?2
                 WHERE id = ?1 AND delivery = 'pending'",
                args![turn_id, now_ms],
            )?;
            if n == 0
                && c.query_opt(
                    "SELECT 1 FROM turns WHERE id = ?1 AND delivery = 'delivered'",
                    args![turn_id],
                )?
                .is_none()
            {
                return Err(StoreError::NotFound {
                    kind: "kept answer",
                    id: turn_id,
                });
            }
            Ok(())
        })
    }

    /// Every kept answer still `pending`, oldest first: what a restart must
    /// deliver. On a store with a node, only those of conversations this
    /// node owns (call after [`Store::requeue_interrupted`], which takes
    /// over the conversations of nodes that are gone).
    pub fn undelivered_answers(&self) -> Result<Vec<Undelivered>, StoreError> {
        let node = self.node.as_ref().map(|n| n.id.clone());
        let rows = self.read(|c| {
            let turns = match &node {
                None => c.query(
                    "SELECT id, conversation_id, state, answer, answer_verbatim FROM turns
                     WHERE delivery = 'pending' ORDER BY id",
                    &[],
                )?,
                Some(node) => c.query(
                    "SELECT t.id, t.conversation_id, t.state, t.answer, t.answer_verbatim FROM turns t
                     JOIN conversation_owners o ON o.conversation_id = t.conversation_id
                     WHERE t.delivery = 'pending' AND o.node = ?1 ORDER BY t.id",
                    args![node.as_str()],
                )?,
            };
            let mut out = Vec::new();
            for r in turns {
                let turn_id = r.int(0)?;
                let refs = c
                    .query(
                        "SELECT message_ref FROM messages
                         WHERE turn_id = ?1 AND message_ref IS NOT NULL ORDER BY id",
                        args![turn_id],
                    )?
                    .iter()
                    .map(|m| m.text(0))
                    .collect::<Result<Vec<_>, _>>()?;
                out.push((
                    turn_id,
                    r.int(1)?,
                    r.name::<TurnState>(2)?,
                    r.opt_text(3)?.unwrap_or_default(),
                    r.int(4)? != 0,
                    refs,
                ));
            }
            Ok(out)
        })?;
        rows.into_iter()
            .map(
                |(turn_id, conversation_id, state, sealed, verbatim, message_refs)| {
                    Ok(Undelivered {
                        turn_id,
                        conversation_id,
                        state,
                        answer: self.sealer.open(&self.path, TURN_ANSWER, turn_id, sealed)?,
                        verbatim,
                        message_refs,
                    })
                },
            )
            .collect()
    }

    /// The last `limit` messages of `conversation_id` that were not dropped,
    /// oldest first: with [`Store::kept_answers`], the conversation's
    /// history as the web chat shows it after a restart.
    pub fn recent_messages(
        &self,
        conversation_id: ConversationId,
        limit: u32,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let mut m = self.messages_where(
            "conversation_id = ?1 AND state <> 'dropped' ORDER BY id DESC LIMIT ?2",
            args![conversation_id, i64::from(limit)],
        )?;
        m.reverse();
        Ok(m)
    }

    /// The last `limit` kept answers of `conversation_id`, oldest first.
    pub fn kept_answers(
        &self,
        conversation_id: ConversationId,
        limit: u32,
    ) -> Result<Vec<KeptAnswer>, StoreError> {
        let rows = self.read(|c| {
            c.query(
                "SELECT id, state, answer, ended_ms, delivery, answer_verbatim FROM turns
                 WHERE conversation_id = ?1 AND answer IS NOT NULL
                 ORDER BY id DESC LIMIT ?2",
                args![conversation_id, i64::from(limit)],
            )
        })?;
        let mut out = rows
            .iter()
            .map(|r| {
                let turn_id = r.int(0)?;
                Ok(KeptAnswer {
                    turn_id,
                    state: r.name(1)?,
                    answer: self
                        .sealer
                        .open(&self.path, TURN_ANSWER, turn_id, r.text(2)?)?,
                    verbatim: r.int(5)? != 0,
                    ended_ms: r.opt_int(3)?.unwrap_or(0),
                    delivered: r.opt_text(4)?.as_deref() == Some("delivered"),
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        out.reverse();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use crate::{IncomingMessage, Inserted, Store, StoreKey, TurnState};

    fn msg(store: &Store, event: &str, thread: &str) -> (i64, i64) {
        let m = IncomingMessage {
            platform: "slack".into(),
            event_id: event.into(),
            channel: "C1".into(),
            thread: thread.into(),
            user: "U1".into(),
            text: format!("echo {event}"),
            ts_ms: 1,
            message_ref: Some(format!("ts-{event}")),
        };
        match store.insert_message(&m).unwrap() {
            Inserted::New {
                message_id,
                conversation_id,
            } => (message_id, conversation_id),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_kept_answer_is_pending_until_delivered_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("moat.db");
        let key = || Some(StoreKey::from_bytes(&[7u8; 32]));
        let turn = {
            let s = Store::open_with_key(&db, Default::default(), key()).unwrap();
            let (m, conv) = msg(&s, "a", "t1");
            let t = s.start_turn(conv, &[m], 2).unwrap();
            s.finish_turn_keeping(t, TurnState::Done, "the answer: 42", true, None, 3)
                .unwrap();
            t
        };
        // "Killed" before delivery: the next start finds it, with its refs.
        let s = Store::open_with_key(&db, Default::default(), key()).unwrap();
        assert!(
            s.requeue_interrupted(4).unwrap().is_empty(),
            "not run again"
        );
        let owed = s.undelivered_answers().unwrap();
        assert_eq!(owed.len(), 1);
        assert_eq!(owed[0].turn_id, turn);
        assert_eq!(owed[0].answer, "the answer: 42");
        assert_eq!(owed[0].state, TurnState::Done);
        assert!(owed[0].verbatim);
        assert_eq!(owed[0].message_refs, vec!["ts-a".to_string()]);
        s.mark_delivered(turn, 5).unwrap();
        s.mark_delivered(turn, 6).unwrap();
        assert!(s.undelivered_answers().unwrap().is_empty());
        let kept = s.kept_answers(owed[0].conversation_id, 10).unwrap();
        assert_eq!(kept.len(), 1);
        assert!(kept[0].delivered);
        assert_eq!(kept[0].answer, "the answer: 42");
        // Sealed at rest: the answer's text is not in the file.
        drop(s);
        let raw = std::fs::read(&db).unwrap();
        let wal = std::fs::read(dir.path().join("moat.db-wal")).unwrap_or_default();
        for bytes in [raw, wal] {
            assert!(!bytes.windows(10).any(|w| w == b"answer: 42"));
        }
    }

    #[test]
    fn a_purge_deletes_only_what_is_settled_and_older_than_the_cutoff() {
        let s = Store::open_in_memory().unwrap();
        let ins = |e: &str, ts: i64| {
            let m = IncomingMessage {
                platform: "web".into(),
                event_id: e.into(),
                channel: "c".into(),
                thread: "t".into(),
                user: "u".into(),
                text: e.into(),
                ts_ms: ts,
                message_ref: None,
            };
            match s.insert_message(&m).unwrap() {
                Inserted::New {
                    message_id,
                    conversation_id,
                } => (message_id, conversation_id),
                other => panic!("{other:?}"),
            }
        };
        // old, answered and delivered: goes.
        let (m1, c) = ins("old-done", 100);
        let t1 = s.start_turn(c, &[m1], 100).unwrap();
        s.finish_turn_keeping(t1, TurnState::Done, "a1", false, None, 110)
            .unwrap();
        s.mark_delivered(t1, 111).unwrap();
        // old, answer still owed: stays.
        let (m2, _) = ins("old-owed", 200);
        let t2 = s.start_turn(c, &[m2], 200).unwrap();
        s.finish_turn_keeping(t2, TurnState::Done, "a2", false, None, 210)
            .unwrap();
        // old but still waiting: stays.
        let (m3, _) = ins("old-waiting", 300);
        // new: stays.
        let (m4, _) = ins("new", 5_000);
        let p = s.purge_before(1_000).unwrap();
        assert_eq!(
            p,
            super::Purged {
                messages: 1,
                turns: 1
            }
        );
        assert!(s.message(m1).unwrap().is_none());
        assert!(s.turn(t1).unwrap().is_none());
        for m in [m2, m3, m4] {
            assert!(s.message(m).unwrap().is_some(), "message {m} kept");
        }
        assert_eq!(s.undelivered_answers().unwrap().len(), 1);
        // Once delivered, the owed one goes too.
        s.mark_delivered(t2, 400).unwrap();
        assert_eq!(
            s.purge_before(1_000).unwrap(),
            super::Purged {
                messages: 1,
                turns: 1
            }
        );
        assert!(s.message(m3).unwrap().is_some());
    }

    #[test]
    fn kept_answers_are_the_conversations_own_and_unkept_turns_are_not_owed() {
        let s = Store::open_in_memory().unwrap();
        let (m1, c1) = msg(&s, "a", "t1");
        let (m2, c2) = msg(&s, "b", "t2");
        let (m3, _) = msg(&s, "c", "t1");
        let t1 = s.start_turn(c1, &[m1], 2).unwrap();
        s.finish_turn_keeping(
            t1,
            TurnState::Failed,
            "it broke",
            false,
            Some("it broke"),
            3,
        )
        .unwrap();
        let t2 = s.start_turn(c2, &[m2], 2).unwrap();
        s.finish_turn_keeping(t2, TurnState::Done, "other", false, None, 3)
            .unwrap();
        // A turn finished without keeping its answer owes nothing.
        let t3 = s.start_turn(c1, &[m3], 4).unwrap();
        s.finish_turn(t3, TurnState::Done, 5, None, 5).unwrap();
        let kept = s.kept_answers(c1, 10).unwrap();
        assert_eq!(kept.iter().map(|k| k.turn_id).collect::<Vec<_>>(), vec![t1]);
        assert_eq!(kept[0].state, TurnState::Failed);
        assert!(!kept[0].verbatim);
        let said: Vec<_> = s
            .recent_messages(c1, 1)
            .unwrap()
            .into_iter()
            .map(|m| m.id)
            .collect();
        assert_eq!(said, vec![m3], "the newest, within the limit");
        assert_eq!(s.recent_messages(c1, 10).unwrap().len(), 2);
        let owed: Vec<_> = s
            .undelivered_answers()
            .unwrap()
            .into_iter()
            .map(|u| u.turn_id)
            .collect();
        assert_eq!(owed, vec![t1, t2]);
        assert!(s.mark_delivered(t3, 6).is_err(), "nothing kept to deliver");
        assert!(s.mark_delivered(9999, 6).is_err());
    }
}
