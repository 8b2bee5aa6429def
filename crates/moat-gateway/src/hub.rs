//! What a conversation shows to its watchers (the web chat's event streams):
//! a broadcast per conversation, a short transcript for late joiners (after a
//! restart it starts from the stored history), and the
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
    /// A user's message was accepted. `id`: the stored message's id (the
    /// same message is shown once, also after a restart).
    Message {
        user: String,
        text: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<i64>,
    },
    /// The sandbox's state: queued, running, ...
    Status { text: String },
    /// Part of the answer, as it streams.
    Text { text: String },
    /// The turn's whole answer. `turn`: the turn's id; a watcher shows one
    /// answer per turn (the history after a restart and a delivery after a
    /// restart may show the same answer again).
    Answer {
        text: String,
        ok: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        turn: Option<i64>,
        /// Command output, shown as it is; otherwise Markdown.
        #[serde(default)]
        verbatim: bool,
    },
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

impl ConvEvent {
    /// What makes two events the same one (a stored message, a turn's
    /// answer); `None`: every event of its kind is new.
    fn key(&self) -> Option<(u8, i64)> {
        match self {
            ConvEvent::Message { id: Some(id), .. } => Some((0, *id)),
            ConvEvent::Answer { turn: Some(t), .. } => Some((1, *t)),
            _ => None,
        }
    }
}

#[derive(Default)]
struct Conv {
    transcript: VecDeque<ConvEvent>,
    tx: Option<broadcast::Sender<ConvEvent>>,
    /// The stored history was merged into the transcript (once per
    /// conversation and gateway start).
    seeded: bool,
}

impl Conv {
    fn holds(&self, key: (u8, i64)) -> bool {
        self.transcript.iter().any(|e| e.key() == Some(key))
    }

    fn keep(&mut self, ev: ConvEvent) {
        if self.transcript.len() == TRANSCRIPT {
            self.transcript.pop_front();
        }
        self.transcript.push_back(ev);
    }
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
        // Streamed pieces are not kept: the final answer replaces them. An
        // event the transcript already holds (a kept answer delivered again
        // after a restart) is not kept twice.
        let held = ev.key().is_some_and(|k| c.holds(k));
        if !matches!(ev, ConvEvent::Text { .. }) && !held {
            c.keep(ev.clone());
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
        self.subscribe_with(conversation, Vec::new)
    }

    /// [`Hub::subscribe`], the first time for `conversation` since the
    /// gateway started merging `history()` (the stored messages and kept
    /// answers, oldest first) before what the transcript holds: a watcher
    /// sees the conversation's past after a restart. `history` runs
    /// outside the hub's lock (it reads the store).
    pub fn subscribe_with(
        &self,
        conversation: i64,
        history: impl FnOnce() -> Vec<ConvEvent>,
    ) -> (Vec<ConvEvent>, broadcast::Receiver<ConvEvent>) {
        let seeded = {
            let convs = self.convs.lock().unwrap_or_else(|p| p.into_inner());
            convs.get(&conversation).is_some_and(|c| c.seeded)
        };
        let past = if seeded { Vec::new() } else { history() };
        let mut convs = self.convs.lock().unwrap_or_else(|p| p.into_inner());
        let c = convs.entry(conversation).or_default();
        if !c.seeded {
            c.seeded = true;
            // What happened since the start stays in its order after the
            // stored past; the past gives up what the transcript holds.
            let now: Vec<ConvEvent> = c.transcript.drain(..).collect();
            let in_now: Vec<(u8, i64)> = now.iter().filter_map(ConvEvent::key).collect();
            for ev in past {
                if !ev.key().is_some_and(|k| in_now.contains(&k) || c.holds(k)) {
                    c.keep(ev);
                }
            }
            for ev in now {
                c.keep(ev);
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(turn: i64, text: &str) -> ConvEvent {
        ConvEvent::Answer {
            text: text.into(),
            ok: true,
            turn: Some(turn),
            verbatim: false,
        }
    }

    fn message(id: i64, text: &str) -> ConvEvent {
        ConvEvent::Message {
            user: "u".into(),
            text: text.into(),
            id: Some(id),
        }
    }

    #[test]
    fn the_stored_past_comes_first_and_nothing_is_shown_twice() {
        let hub = Hub::default();
        // Since the start: a turn's events, its answer also in the store.
        hub.publish(7, message(2, "second"));
        hub.publish(
            7,
            ConvEvent::Status {
                text: "running".into(),
            },
        );
        hub.publish(7, answer(20, "two"));
        let (past, _rx) = hub.subscribe_with(7, || {
            vec![
                message(1, "first"),
                answer(10, "one"),
                message(2, "second"),
                answer(20, "two"),
            ]
        });
        assert_eq!(
            past,
            vec![
                message(1, "first"),
                answer(10, "one"),
                message(2, "second"),
                ConvEvent::Status {
                    text: "running".into()
                },
                answer(20, "two"),
            ]
        );
        // Delivered again after a restart: kept once; the store is read once.
        hub.publish(7, answer(10, "one"));
        let (again, _rx) = hub.subscribe_with(7, || panic!("read once"));
        assert_eq!(again, past);
        // Another conversation's history is its own.
        let (other, _rx) = hub.subscribe_with(8, Vec::new);
        assert!(other.is_empty());
    }
}
