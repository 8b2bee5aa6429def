//! GitHub from chat in the store: which conversation pushed a branch or
//! opened a pull request (written from the door's own record, never from
//! the agent's words), and which webhook deliveries were already taken.
//!
//! Must never: link a conversation from text in a webhook event (callers
//! pass only the repository, number and branch the door saw).

use rusqlite::{params, OptionalExtension};

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
        let err = self.err();
        self.conn()
            .prepare_cached(
                "INSERT INTO github_links (repo, kind, name, conversation_id, created_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (repo, kind, name) DO NOTHING",
            )
            .and_then(|mut s| {
                s.execute(params![
                    repo.to_ascii_lowercase(),
                    kind,
                    name,
                    conversation,
                    now_ms
                ])
            })
            .map_err(err)?;
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
        let err = self.err();
        let conn = self.conn();
        let repo = repo.to_ascii_lowercase();
        let find = |kind: &str, name: String| {
            conn.prepare_cached(
                "SELECT conversation_id FROM github_links WHERE repo = ?1 AND kind = ?2 AND name = ?3",
            )
            .and_then(|mut s| s.query_row(params![repo, kind, name], |r| r.get(0)).optional())
        };
        if let Some(n) = number {
            return find("pr", n.to_string()).map_err(&err);
        }
        if let Some(b) = branch {
            return find("branch", b.to_string()).map_err(&err);
        }
        Ok(None)
    }

    /// Takes delivery `id` once: `true` the first time, `false` for a
    /// redelivery or replay. Old ids are forgotten after a week.
    pub fn take_github_delivery(&self, id: &str, now_ms: i64) -> Result<bool, StoreError> {
        let err = self.err();
        let conn = self.conn();
        conn.prepare_cached("DELETE FROM github_deliveries WHERE ts_ms < ?1")
            .and_then(|mut s| s.execute([now_ms - DELIVERIES_KEPT_MS]))
            .map_err(&err)?;
        let n = conn
            .prepare_cached("INSERT OR IGNORE INTO github_deliveries (id, ts_ms) VALUES (?1, ?2)")
            .and_then(|mut s| s.execute(params![id, now_ms]))
            .map_err(&err)?;
        Ok(n == 1)
    }
}
