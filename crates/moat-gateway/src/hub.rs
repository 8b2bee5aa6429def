//! What a conversation shows to its watchers (the web chat's event streams):
//! a broadcast per conversation and a short transcript for late joiners.
//!
//! Must never: block a turn on a slow watcher (a watcher that falls behind
//! loses events and is told so), or show one conversation's events in another.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use serde::Serialize;
use tokio::sync::broadcast;

/// Events kept per conversation for a watcher that joins late.
const TRANSCRIPT: usize = 500;
/// Events a slow watcher may lag behind before it misses some.
const CHANNEL: usize = 1024;

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
}

#[derive(Default)]
struct Conv {
    transcript: VecDeque<ConvEvent>,
    tx: Option<broadcast::Sender<ConvEvent>>,
}

/// All conversations' broadcasts.
#[derive(Default)]
pub struct Hub {
    convs: Mutex<HashMap<i64, Conv>>,
    closed: std::sync::atomic::AtomicBool,
}

impl Hub {
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
