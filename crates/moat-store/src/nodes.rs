//! Many gateway nodes on one database: which node owns each conversation.
//!
//! A node (a store opened with [`Store::with_node`]) owns a conversation
//! while its lease on it runs: taken when the node starts a turn there
//! ([`Store::start_turn`] refuses a conversation another node's live lease
//! covers, with [`StoreError::NotOwner`]) or by [`Store::claim`], renewed
//! for all its conversations by [`Store::heartbeat`], and taken over by
//! another node through [`Store::take_over`] once it has expired (the node
//! died or lost the database). A node whose lease was taken over cannot
//! finish its old turn: [`Store::finish_turn`] checks the owner in the same
//! transaction, so a late answer from a node presumed dead is refused,
//! never recorded twice.
//!
//! It must never: read the clock (every instant is the caller's), let two
//! live leases cover one conversation, or take over a conversation whose
//! owner's lease has not expired.

use std::time::Duration;

use crate::db::{args, Conn};
use crate::sealed::TURN_ERROR;
use crate::{ConversationId, Store, StoreError, StoredMessage};

/// This store's node: its id and how long its leases last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Node {
    pub(crate) id: String,
    pub(crate) lease_ms: i64,
}

/// Who owns a conversation, as [`Store::claim`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ownership {
    /// This node, now until `until_ms`.
    Mine { until_ms: i64 },
    /// Another node whose lease runs until `until_ms`.
    Other { node: String, until_ms: i64 },
}

impl Store {
    /// This store acts as node `id` (unique per running process: the pod's
    /// name and the process id, say) with leases of `lease`. A node that
    /// stops heartbeating loses its conversations `lease` after its last
    /// heartbeat. Refused: an empty or overlong id, a lease under a second.
    pub fn with_node(mut self, id: &str, lease: Duration) -> Result<Store, StoreError> {
        if id.is_empty() || id.len() > 200 || id.chars().any(char::is_control) {
            return Err(StoreError::Config {
                key: "store.node",
                reason: "must be 1 to 200 printable characters".into(),
            });
        }
        if lease < Duration::from_secs(1) {
            return Err(StoreError::Config {
                key: "store.lease",
                reason: "must be at least 1s".into(),
            });
        }
        self.node = Some(Node {
            id: id.to_string(),
            lease_ms: i64::try_from(lease.as_millis()).unwrap_or(i64::MAX),
        });
        Ok(self)
    }

    /// This store's node id, if it is one of several.
    pub fn node_id(&self) -> Option<&str> {
        self.node.as_ref().map(|n| n.id.as_str())
    }

    /// Takes (or renews) this node's lease on `conversation_id` unless
    /// another node's lease covers `now_ms`. A store without a node owns
    /// everything.
    pub fn claim(
        &self,
        conversation_id: ConversationId,
        now_ms: i64,
    ) -> Result<Ownership, StoreError> {
        let Some(node) = &self.node else {
            return Ok(Ownership::Mine { until_ms: i64::MAX });
        };
        self.write(|c| claim_in(c, node, conversation_id, now_ms))
    }

    /// Renews this node's leases on all its conversations to `now_ms` plus
    /// the lease; returns how many. Call it well within the lease (a third).
    pub fn heartbeat(&self, now_ms: i64) -> Result<u64, StoreError> {
        let Some(node) = &self.node else {
            return Ok(0);
        };
        self.write(|c| {
            c.execute(
                "UPDATE conversation_owners SET until_ms = ?2 WHERE node = ?1",
                args![&node.id, now_ms.saturating_add(node.lease_ms)],
            )
        })
    }

    /// Takes over every conversation whose owner's lease expired before
    /// `now_ms`, and every one nobody owns that has messages waiting, in one
    /// transaction: its running turn fails ("interrupted:
    /// node N stopped answering"), its running and received messages go back
    /// to queued, and the lease becomes this node's. Returns the queued
    /// messages of the conversations taken, oldest first: what this node
    /// must now answer. Each is returned to exactly one node.
    pub fn take_over(&self, now_ms: i64) -> Result<Vec<StoredMessage>, StoreError> {
        let Some(node) = &self.node else {
            return Ok(Vec::new());
        };
        let taken = self.write(|c| {
            let expired = c.query(
                "SELECT conversation_id, node FROM conversation_owners
                 WHERE until_ms < ?1 AND node <> ?2
                 UNION
                 SELECT DISTINCT m.conversation_id, '(none)' FROM messages m
                 WHERE m.state IN ('received', 'queued', 'running')
                   AND NOT EXISTS (SELECT 1 FROM conversation_owners o
                                   WHERE o.conversation_id = m.conversation_id)
                 ORDER BY 1",
                args![now_ms, &node.id],
            )?;
            let mut msgs = Vec::new();
            for r in expired {
                let (conv, dead) = (r.int(0)?, r.text(1)?);
                let cut = c.query(
                    "SELECT id FROM turns WHERE conversation_id = ?1 AND state = 'running'",
                    args![conv],
                )?;
                for t in cut {
                    let id = t.int(0)?;
                    let error = self.sealer.seal(
                        &self.path,
                        TURN_ERROR,
                        id,
                        &format!("interrupted: node {dead} stopped answering"),
                    )?;
                    c.execute(
                        "UPDATE messages SET state = 'queued', turn_id = NULL
                         WHERE turn_id = ?1 AND state = 'running'",
                        args![id],
                    )?;
                    c.execute(
                        "UPDATE turns SET state = 'failed', ended_ms = GREATEST(?1, started_ms), error = ?2
                         WHERE id = ?3",
                        args![now_ms, error, id],
                    )?;
                }
                c.execute(
                    "UPDATE messages SET state = 'queued'
                     WHERE conversation_id = ?1 AND state = 'received'",
                    args![conv],
                )?;
                c.execute(
                    "INSERT INTO conversation_owners (conversation_id, node, until_ms)
                     VALUES (?1, ?2, ?3)
                     ON CONFLICT (conversation_id) DO UPDATE
                         SET node = excluded.node, until_ms = excluded.until_ms",
                    args![conv, &node.id, now_ms.saturating_add(node.lease_ms)],
                )?;
                msgs.extend(Store::messages_in(
                    c,
                    "conversation_id = ?1 AND state = 'queued' ORDER BY id",
                    args![conv],
                )?);
            }
            Ok(msgs)
        })?;
        let mut out = taken
            .into_iter()
            .map(|m| self.open_message(m))
            .collect::<Result<Vec<_>, _>>()?;
        out.sort_by_key(|m| m.id);
        Ok(out)
    }
}

/// The lease check and take of [`Store::claim`], inside a transaction.
pub(crate) fn claim_in(
    c: &mut dyn Conn,
    node: &Node,
    conversation_id: ConversationId,
    now_ms: i64,
) -> Result<Ownership, StoreError> {
    if let Some(r) = c.query_opt(
        "SELECT node, until_ms FROM conversation_owners WHERE conversation_id = ?1",
        args![conversation_id],
    )? {
        let (owner, until_ms) = (r.text(0)?, r.int(1)?);
        if owner != node.id && until_ms >= now_ms {
            return Ok(Ownership::Other {
                node: owner,
                until_ms,
            });
        }
    }
    let until_ms = now_ms.saturating_add(node.lease_ms);
    c.execute(
        "INSERT INTO conversation_owners (conversation_id, node, until_ms) VALUES (?1, ?2, ?3)
         ON CONFLICT (conversation_id) DO UPDATE SET node = excluded.node, until_ms = excluded.until_ms",
        args![conversation_id, &node.id, until_ms],
    )?;
    Ok(Ownership::Mine { until_ms })
}

/// Refuses `conversation_id` unless this node owns it (for finishing a turn:
/// a lease lost to a take-over stays lost).
pub(crate) fn require_owner(
    c: &mut dyn Conn,
    node: &Node,
    conversation_id: ConversationId,
) -> Result<(), StoreError> {
    let owner = c
        .query_opt(
            "SELECT node, until_ms FROM conversation_owners WHERE conversation_id = ?1",
            args![conversation_id],
        )?
        .map(|r| Ok::<_, StoreError>((r.text(0)?, r.int(1)?)))
        .transpose()?;
    match owner {
        Some((owner, until_ms)) if owner != node.id => Err(StoreError::NotOwner {
            conversation_id,
            owner,
            until_ms,
        }),
        _ => Ok(()),
    }
}
