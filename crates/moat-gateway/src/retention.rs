//! Retention (`[store] retention = "90d"`): messages and kept answers older
//! than the setting are deleted from the store, at start and every hour,
//! and each purge that deleted something is audited with its counts.
//!
//! Must never: delete a message still waiting, a running turn or an answer
//! not yet delivered (the store's purge keeps those), or put a message's
//! text in the audit record.

use std::time::Duration;

use serde_json::json;

use crate::pipeline::Gateway;
use crate::tasks::now_ms;

/// How often the purge runs.
pub const EVERY: Duration = Duration::from_secs(3600);

impl Gateway {
    /// Deletes what the retention setting no longer keeps; the number of
    /// messages deleted (0 without a retention setting).
    pub async fn purge_expired(&self) -> u64 {
        let Some(keep) = self.inner.cfg.retention else {
            return 0;
        };
        let cutoff = now_ms().saturating_sub(i64::try_from(keep.as_millis()).unwrap_or(i64::MAX));
        let store = self.inner.store.clone();
        match tokio::task::spawn_blocking(move || store.purge_before(cutoff)).await {
            Ok(Ok(p)) => {
                if p.messages > 0 || p.turns > 0 {
                    tracing::info!(
                        messages = p.messages,
                        turns = p.turns,
                        "deleted what the retention setting no longer keeps"
                    );
                    self.audit(
                        "purge",
                        json!({"before_ms": cutoff, "messages": p.messages, "turns": p.turns}),
                    );
                }
                p.messages
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "the retention purge failed; trying again in an hour");
                0
            }
            Err(e) => {
                tracing::warn!(error = %e, "the retention purge failed");
                0
            }
        }
    }
}
