//! GitHub from chat in the store: which conversation pushed a branch or
//! opened a pull request (written from the door's own record, never from
//! the agent's words), and which webhook deliveries were already taken.
//!
//! Must never: link a conversation from text in a webhook event (callers
//! pass only the repository, number and branch the door saw).

use crate::db::args;
use crate::{ConversationId, Store, StoreError};

/// Deliveries remembered for deduplication (GitHub redelivers within days).
const DELIVERIES_KEPT_MS: i64 = 7 * 24 * 3600 * 1000;

/// What a conversation did on GitHub that later events refer to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GithubLink<'a> {
    Branch(&'a str),
    PullRequest(u64),
}

impl Store {
    /// Records that `conversation` pushed a branch or opened a pull request
    /// in `repo` (`owner/name`, compared without case). The first
    /// conversation to link a branch or number keeps it: another one pushing
    /// to the same branch cannot take over its events.
    pub fn link_github(
        &self,
        repo: &str,
        link: GithubLink<'_>,
        conversation: ConversationId,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let (kind, name) = match link {
            GithubLink::Branch(b) => ("branch", b.to_string()),
            GithubLink::PullRequest(n) => ("pr", n.to_string()),
        };
        let repo = repo.to_ascii_lowercase();
        self.write(|c| {
            c.execute(
                "INSERT INTO github_links (repo, kind, name, conversation_id, created_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (repo, kind, name) DO NOTHING",
                args![&repo, kind, &name, conversation, now_ms],
            )
        })?;
        Ok(())
    }

    /// The conversation that opened pull request `number` of `repo`; for an
    /// event that names no pull request (a check suite of a branch), the one
    /// that pushed `branch`. A pull request moat did not open finds nobody,
    /// whatever its branch.
    pub fn github_conversation(
        &self,
        repo: &str,
        number: Option<u64>,
        branch: Option<&str>,
    ) -> Result<Option<ConversationId>, StoreError> {
        let repo = repo.to_ascii_lowercase();
        let (kind, name) = match (number, branch) {
            (Some(n), _) => ("pr", n.to_string()),
            (None, Some(b)) => ("branch", b.to_string()),
            (None, None) => return Ok(None),
        };
        self.read(|c| {
            c.query_opt(
                "SELECT conversation_id FROM github_links WHERE repo = ?1 AND kind = ?2 AND name = ?3",
                args![&repo, kind, &name],
            )?
            .map(|r| r.int(0))
            .transpose()
        })
    }

    /// Takes delivery `id` once: `true` the first time, `false` for a
    /// redelivery or replay. Old ids are forgotten after a week.
    pub fn take_github_delivery(&self, id: &str, now_ms: i64) -> Result<bool, StoreError> {
        self.write(|c| {
            c.execute(
                "DELETE FROM github_deliveries WHERE ts_ms < ?1",
                args![now_ms - DELIVERIES_KEPT_MS],
            )?;
            let n = c.execute(
                "INSERT INTO github_deliveries (id, ts_ms) VALUES (?1, ?2)
                 ON CONFLICT (id) DO NOTHING",
                args![id, now_ms],
            )?;
            Ok(n == 1)
        })
    }
}
