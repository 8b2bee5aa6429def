//! Recovery at start: after a crash or restart, the answers kept in the
//! store's outbox but not delivered are delivered (not run again), and every
//! stored message that was not answered is queued again (turns cut off are
//! closed as failed first). On a shared store this runs on every beat, for
//! the conversations of nodes that stopped.
//!
//! Must never: run a recovered message whose sender is no longer authorised,
//! or deliver a kept answer this process is delivering right now.

use std::time::Instant;

use moat_policy::gateway::{Authorization, Platform};
use moat_store::{MessageState, TurnState, Undelivered};
use serde_json::json;

use super::{now_ms, ConvCmd, Gateway, GatewayError, Pending};
use crate::agent::TurnOutcome;
use crate::platform::ConvRef;

impl Gateway {
    /// After a crash: every kept answer not yet delivered is delivered, and
    /// every stored message that was not answered is queued again (turns
    /// cut off by the crash are closed as failed first). Returns the
    /// number of messages queued again.
    pub async fn recover(&self) -> Result<usize, GatewayError> {
        let store = self.inner.store.clone();
        let requeued = tokio::task::spawn_blocking(move || store.requeue_interrupted(now_ms()))
            .await
            .map_err(|e| GatewayError::Internal(e.to_string()))??;
        self.deliver_kept().await?;
        let mut n = 0;
        for m in requeued {
            let Some(conv) = self.inner.store.conversation(m.conversation_id)? else {
                continue;
            };
            let Ok(platform) = Platform::parse(&conv.platform) else {
                continue;
            };
            let Authorization::Allowed { channel, .. } =
                self.authorize(platform, &conv.channel, &m.user)
            else {
                self.inner.store.set_message_state(
                    m.id,
                    MessageState::Dropped,
                    Some("no longer authorised after a restart"),
                )?;
                continue;
            };
            let idx = channel.index;
            let cref = ConvRef {
                id: conv.id,
                platform,
                channel: conv.channel.clone(),
                thread: conv.thread.clone(),
            };
            self.audit(
                "message",
                json!({"verdict": "recovered", "message_id": m.id, "conversation_id": conv.id}),
            );
            self.send(
                &cref,
                idx,
                ConvCmd::Message(Pending {
                    message_id: m.id,
                    user: m.user,
                    text: m.text,
                    // Stored with the message: the recovered message still
                    // gets its reactions.
                    message_ref: m.message_ref,
                    arrived: Instant::now(),
                }),
            );
            n += 1;
        }
        Ok(n)
    }

    /// Marks `turn` as being delivered by this process (`true`) or no longer
    /// (`false`). Returns whether the mark changed: `false` for a turn
    /// already marked, which someone else delivers.
    pub(super) fn delivering(&self, turn: i64, on: bool) -> bool {
        let mut d = self
            .inner
            .delivering
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if on {
            d.insert(turn)
        } else {
            d.remove(&turn)
        }
    }

    /// Delivers the outbox's kept answers (the store's own, or this node's
    /// on a shared store) that nobody in this process is delivering.
    async fn deliver_kept(&self) -> Result<(), GatewayError> {
        let store = self.inner.store.clone();
        let owed = tokio::task::spawn_blocking(move || store.undelivered_answers())
            .await
            .map_err(|e| GatewayError::Internal(e.to_string()))??;
        for u in owed {
            if !self.delivering(u.turn_id, true) {
                continue;
            }
            self.redeliver(&u).await;
            self.delivering(u.turn_id, false);
        }
        Ok(())
    }

    async fn redeliver(&self, u: &Undelivered) {
        let conv = match self.inner.store.conversation(u.conversation_id) {
            Ok(Some(c)) => c,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(turn = u.turn_id, error = %e, "a kept answer's conversation could not be read");
                return;
            }
        };
        let Ok(platform) = Platform::parse(&conv.platform) else {
            return;
        };
        let cref = ConvRef {
            id: conv.id,
            platform,
            channel: conv.channel.clone(),
            thread: conv.thread.clone(),
        };
        let outcome = TurnOutcome {
            answer: u.answer.clone(),
            ok: u.state == TurnState::Done,
            cancelled: u.state == TurnState::Cancelled,
            preformatted: u.verbatim,
        };
        self.platform(platform)
            .redeliver(&cref, &u.message_refs, &outcome, u.turn_id)
            .await;
        match self.inner.store.mark_delivered(u.turn_id, now_ms()) {
            Ok(()) => self.audit(
                "answer",
                json!({"verdict": "delivered after a restart", "turn_id": u.turn_id, "conversation_id": conv.id}),
            ),
            Err(e) => {
                tracing::warn!(turn = u.turn_id, error = %e, "could not mark a kept answer delivered")
            }
        }
    }
}
