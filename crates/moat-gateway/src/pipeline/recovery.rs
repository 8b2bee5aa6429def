//! Recovery at start: after a crash or restart, every stored message that was
//! not answered is queued again (turns cut off are closed as failed first).
//!
//! Must never: run a recovered message whose sender is no longer authorised.

use std::time::Instant;

use moat_policy::gateway::{Authorization, Platform};
use moat_store::MessageState;
use serde_json::json;

use super::{now_ms, ConvCmd, Gateway, GatewayError, Pending};
use crate::platform::ConvRef;

impl Gateway {
    /// After a crash: every stored message that was not answered is queued
    /// again (turns cut off by the crash are closed as failed first).
    pub async fn recover(&self) -> Result<usize, GatewayError> {
        let store = self.inner.store.clone();
        let requeued = tokio::task::spawn_blocking(move || store.requeue_interrupted(now_ms()))
            .await
            .map_err(|e| GatewayError::Internal(e.to_string()))??;
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
}
