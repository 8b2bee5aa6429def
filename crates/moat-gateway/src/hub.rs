//! What a conversation shows to its watchers (the web chat's event streams):
//! a broadcast per conversation, a short transcript for late joiners, and the
//! web chat's artifacts (kept in memory, within [`SHELF_BYTES`], oldest
//! dropped first, until the gateway stops).
//!
//! Must never: block a turn on a slow watcher (a watcher that falls behind
//! loses events and is told so), show one conversation's events in another,
//! or hand out an artifact under another conversation's id.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use axum::body::Bytes;
use serde::Serialize;
use tokio::sync::broadcast;

use crate::artifacts::Artifact;

/// Events kept per conversation for a watcher that joins late.
const TRANSCRIPT: usize = 500;
/// Events a slow watcher may lag behind before it misses some.
const CHANNEL: usize = 1024;
/// Bytes of web artifacts kept in memory for download, all conversations
/// together; the oldest are dropped first.
pub const SHELF_BYTES: u64 = 128 << 20;

/// One thing that happened in a conversation.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ConvEvent {
    /// A user's message was accepted.
    Message { user: String, text: String },
    /// The sandbox's state: queued, running, ...
    Status { text: String },
    /// Part of the answer, as it streams.
    Text { text: String },
    /// The turn's whole answer.
    Answer { text: String, ok: bool },
    /// A note from moat (busy, rate-limited, stopped, ...).
    Notice { text: String },
    /// A file the agent left in `~/artifacts`, sent with the turn's answer.
    /// `url`: where its owner downloads it (web chat), while it is kept.
    Artifact {
        name: String,
        size: u64,
        sha256: String,
        url: Option<String>,
    },
    /// moat asks the conversation's admins to approve an action
    /// (docs/approvals.md): an admin POSTs `{"approve": true|false}` to `url`.
    Approval {
        id: String,
        summary: String,
        detail: Option<String>,
        url: String,
    },
    /// The approval `id` was decided (or timed out).
    Decided { id: String, text: String },
}

#[derive(Default)]
struct Conv {
    transcript: VecDeque<ConvEvent>,
    tx: Option<broadcast::Sender<ConvEvent>>,
}

/// One kept artifact.
struct Kept {
    conversation: i64,
    id: String,
    name: String,
    bytes: Bytes,
}

/// The web chat's artifacts, oldest first.
#[derive(Default)]
struct Shelf {
    items: VecDeque<Kept>,
    bytes: u64,
}

/// All conversations' broadcasts.
#[derive(Default)]
pub struct Hub {
    convs: Mutex<HashMap<i64, Conv>>,
    closed: std::sync::atomic::AtomicBool,
    shelf: Mutex<Shelf>,
}

impl Hub {
    /// Keeps an artifact of `conversation` for download; its id (random, 128
    /// bits), or `None` when it is larger than the whole shelf. Older
    /// artifacts are dropped to make room.
    pub fn keep_artifact(&self, conversation: i64, a: &Artifact) -> Option<String> {
        if a.size() > SHELF_BYTES {
            return None;
        }
        let mut b = [0u8; 16];
        getrandom::getrandom(&mut b).ok()?;
        let id: String = b.iter().map(|x| format!("{x:02x}")).collect();
        let mut shelf = self.shelf.lock().unwrap_or_else(|p| p.into_inner());
        while shelf.bytes + a.size() > SHELF_BYTES {
            match shelf.items.pop_front() {
                Some(old) => shelf.bytes -= old.bytes.len() as u64,
                None => break,
            }
        }
        shelf.bytes += a.size();
        shelf.items.push_back(Kept {
            conversation,
            id: id.clone(),
            name: a.name.clone(),
            bytes: a.bytes.clone(),
        });
        Some(id)
    }

    /// A kept artifact of `conversation`: its name and bytes. Another
    /// conversation's id finds nothing.
    pub fn artifact(&self, conversation: i64, id: &str) -> Option<(String, Bytes)> {
        let shelf = self.shelf.lock().unwrap_or_else(|p| p.into_inner());
        shelf
            .items
            .iter()
            .find(|k| k.conversation == conversation && k.id == id)
            .map(|k| (k.name.clone(), k.bytes.clone()))
    }

    pub fn publish(&self, conversation: i64, ev: ConvEvent) {
        let mut convs = self.convs.lock().unwrap_or_else(|p| p.into_inner());
        let c = convs.entry(conversation).or_default();
        // Streamed pieces are not kept: the final answer replaces them.
        if !matches!(ev, ConvEvent::Text { .. }) {
            if c.transcript.len() == TRANSCRIPT {
                c.transcript.pop_front();
            }
            c.transcript.push_back(ev.clone());
        }
        if let Some(tx) = &c.tx {
            let _ = tx.send(ev);
        }
    }

    /// Ends every watcher's stream after the events already sent (shutdown:
    /// open event streams must not hold the server up). Later subscribers
    /// get the transcript and then the end.
    pub fn close(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        let mut convs = self.convs.lock().unwrap_or_else(|p| p.into_inner());
        for c in convs.values_mut() {
            c.tx = None;
        }
    }

    /// The transcript so far and a receiver for what comes next.
    pub fn subscribe(&self, conversation: i64) -> (Vec<ConvEvent>, broadcast::Receiver<ConvEvent>) {
        let mut convs = self.convs.lock().unwrap_or_else(|p| p.into_inner());
        let c = convs.entry(conversation).or_default();
        let past = c.transcript.iter().cloned().collect();
        if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            // A receiver whose sender is gone: it ends at once.
            let (tx, rx) = broadcast::channel(1);
            drop(tx);
            return (past, rx);
        }
        let tx =
            c.tx.get_or_insert_with(|| broadcast::channel(CHANNEL).0)
                .clone();
        (past, tx.subscribe())
    }
}
