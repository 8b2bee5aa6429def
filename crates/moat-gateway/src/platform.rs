//! The one platform interface: what every chat front-end (Slack, the web
//! chat, Telegram, WhatsApp, Discord) hands the gateway, and what the turn
//! code asks of it.
//!
//! Inbound: a front-end verifies the platform's delivery (signature, secret,
//! token) and turns it into an [`Inbound`] gateway message; the pipeline does
//! the rest (store, dedupe, authorize, rate-limit, debounce). Outbound: the
//! turn code talks to a [`ChatPlatform`] only (notices, the live status,
//! reactions or typing, the stream, history, file uploads, the answer), never
//! to a platform's API or the web chat's hub directly.
//!
//! Owns: the interface, the registry of the platforms the gateway speaks
//! ([`Platforms`]), and the shared rule for cutting an answer into a
//! platform's messages ([`answer_parts`]).
//! Must never: call a platform's API itself, or let an answer exceed the
//! number of messages a platform's limit allows.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use moat_policy::gateway::Platform;

use moat_policy::approvals::Outcome;

use crate::agent::TurnOutcome;
use crate::approvals::{ApprovalPost, Decision};
use crate::artifacts::Artifact;

/// A future a platform's outbound calls return.
pub type BoxFut<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// The stored thread of a conversation that is the whole channel
/// (`conversation = "channel"`); platforms answer at the top level there.
pub const CHANNEL_THREAD: &str = "";

/// Where a conversation lives on its platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvRef {
    pub id: i64,
    pub platform: Platform,
    pub channel: String,
    pub thread: String,
}

/// A file that came with a message (its name and size only: moat does not
/// download inbound files yet; the agent is told they were there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub name: String,
    pub bytes: Option<u64>,
}

/// One chat message as a front-end hands it over (the delivery already
/// verified): the gateway message.
#[derive(Debug, Clone)]
pub struct Inbound {
    pub platform: Platform,
    /// The platform's id for the event; a retry carries the same id.
    pub event_id: String,
    /// The chat (Slack channel, Telegram chat, WhatsApp phone number, ...).
    pub channel: String,
    /// The conversation within the chat (a Slack thread's root ts, a
    /// Telegram forum topic).
    pub thread: String,
    pub user: String,
    pub text: String,
    pub ts_ms: i64,
    /// The platform's id of this message (Slack: its ts), for reactions.
    pub message_ref: Option<String>,
    /// Addressed to the bot: a mention, a direct message, a command or a
    /// reply to the bot, a web chat message. A channel message without one
    /// starts a turn only where the channel sets `mention = "optional"`.
    pub addressed: bool,
    /// Files that came with the message.
    pub attachments: Vec<Attachment>,
}

impl Inbound {
    /// The text as stored and shown to the agent: the message, and one line
    /// per attached file.
    pub fn full_text(&self) -> String {
        let mut t = self.text.clone();
        for a in &self.attachments {
            if !t.is_empty() {
                t.push('\n');
            }
            let name: String = a
                .name
                .chars()
                .filter(|c| !c.is_control())
                .take(200)
                .collect();
            match a.bytes {
                Some(b) => t.push_str(&format!("[attached file: {name}, {b} bytes]")),
                None => t.push_str(&format!("[attached file: {name}]")),
            }
        }
        t
    }
}

/// What a platform does with a conversation's turn. Every method is called
/// by the gateway only; a platform that has no use for one ignores it.
pub trait ChatPlatform: Send + Sync {
    /// A note to the conversation (busy, rate-limited, status, stopped).
    fn notice<'a>(&'a self, conv: &'a ConvRef, text: &'a str) -> BoxFut<'a>;
    /// A user's message was accepted, or kept as context (the web chat shows
    /// it to its watchers; a chat app already shows it).
    /// `message_id`: the stored message's id.
    fn said<'a>(
        &'a self,
        _conv: &'a ConvRef,
        _message_id: i64,
        _user: &'a str,
        _text: &'a str,
    ) -> BoxFut<'a> {
        Box::pin(async {})
    }
    /// A turn started for these platform messages (reactions, typing, a live
    /// status message).
    fn started<'a>(&'a self, conv: &'a ConvRef, refs: &'a [String]) -> BoxFut<'a>;
    /// moat's own step of the turn ("waiting for a sandbox", "running").
    fn phase<'a>(&'a self, _conv: &'a ConvRef, _text: &'a str) -> BoxFut<'a> {
        Box::pin(async {})
    }
    /// The sandbox's status while the turn runs (called often; throttle).
    fn progress<'a>(&'a self, conv: &'a ConvRef, status: &'a str) -> BoxFut<'a>;
    /// A piece of the answer as it streams.
    fn partial<'a>(&'a self, _conv: &'a ConvRef, _text: &'a str) -> BoxFut<'a> {
        Box::pin(async {})
    }
    /// The thread's messages since the previous turn, when the platform
    /// keeps the thread (Slack: `conversations.replies`; the bot only hears
    /// mentions, the agent should see the whole thread). `None`: use the
    /// messages the gateway stored.
    fn history<'a>(
        &'a self,
        _conv: &'a ConvRef,
        _refs: &'a [String],
    ) -> Pin<Box<dyn Future<Output = Option<Vec<String>>> + Send + 'a>> {
        Box::pin(async { None })
    }
    /// The files the agent left in `~/artifacts`, called before
    /// [`ChatPlatform::finished`] when there are any (uploaded, or offered
    /// for download). Entries moat refused are already lines of the answer.
    fn artifacts<'a>(
        &'a self,
        _conv: &'a ConvRef,
        _refs: &'a [String],
        _files: &'a [Artifact],
    ) -> BoxFut<'a> {
        Box::pin(async {})
    }
    /// Asks the chat's admins to decide request `req` (docs/approvals.md).
    /// Returns the platform's id of the message that asked (Slack: its
    /// `ts`), for [`ChatPlatform::approval_decided`]. A platform without
    /// buttons asks in a notice; an admin answers `approve ID` or `deny ID`.
    fn approval<'a>(
        &'a self,
        conv: &'a ConvRef,
        req: &'a ApprovalPost,
    ) -> Pin<Box<dyn Future<Output = Option<String>> + Send + 'a>> {
        Box::pin(async move {
            let text = format!(
                "{}\nAn admin of this chat answers `approve {}` or `deny {}` (no answer in time is a denial).",
                req.summary, req.id, req.id
            );
            self.notice(conv, &text).await;
            None
        })
    }
    /// Request `req` was decided (or timed out); `asked` is what
    /// [`ChatPlatform::approval`] returned.
    fn approval_decided<'a>(
        &'a self,
        conv: &'a ConvRef,
        _req: &'a ApprovalPost,
        _asked: Option<&'a str>,
        d: &'a Decision,
    ) -> BoxFut<'a> {
        Box::pin(async move {
            self.notice(conv, &decision_text(d)).await;
        })
    }
    /// The turn ended with this answer.
    fn finished<'a>(
        &'a self,
        conv: &'a ConvRef,
        refs: &'a [String],
        outcome: &'a TurnOutcome,
    ) -> BoxFut<'a>;

    /// The answer of turn `turn`, kept in the store's outbox until this
    /// returns: [`ChatPlatform::finished`], marked with the turn where the
    /// platform can carry a mark (Slack: message metadata; the web chat:
    /// the event's turn id).
    fn deliver<'a>(
        &'a self,
        conv: &'a ConvRef,
        refs: &'a [String],
        outcome: &'a TurnOutcome,
        _turn: i64,
    ) -> BoxFut<'a> {
        self.finished(conv, refs, outcome)
    }

    /// The kept answer of turn `turn` again, after a restart cut its first
    /// delivery short (it may or may not have arrived). A platform that can
    /// look (Slack: the thread's messages carrying the turn's mark) sends
    /// only what is missing; one that cannot sends it again (at least once).
    fn redeliver<'a>(
        &'a self,
        conv: &'a ConvRef,
        refs: &'a [String],
        outcome: &'a TurnOutcome,
        turn: i64,
    ) -> BoxFut<'a> {
        self.deliver(conv, refs, outcome, turn)
    }
}

/// How a decision reads in the chat: "Approved by U1.", "Timed out: denied."
pub fn decision_text(d: &Decision) -> String {
    let by: String =
        d.by.as_deref()
            .unwrap_or("")
            .chars()
            .filter(|c| !c.is_control())
            .take(100)
            .collect();
    match d.outcome {
        Outcome::Approved => format!("Approved by {by}."),
        Outcome::Denied => format!("Denied by {by}."),
        Outcome::TimedOut => "No admin decided in time: denied.".to_string(),
    }
}

/// A platform that does nothing (tests, a platform not connected).
pub struct Silent;

impl ChatPlatform for Silent {
    fn notice<'a>(&'a self, _: &'a ConvRef, _: &'a str) -> BoxFut<'a> {
        Box::pin(async {})
    }
    fn started<'a>(&'a self, _: &'a ConvRef, _: &'a [String]) -> BoxFut<'a> {
        Box::pin(async {})
    }
    fn progress<'a>(&'a self, _: &'a ConvRef, _: &'a str) -> BoxFut<'a> {
        Box::pin(async {})
    }
    fn finished<'a>(&'a self, _: &'a ConvRef, _: &'a [String], _: &'a TurnOutcome) -> BoxFut<'a> {
        Box::pin(async {})
    }
}

/// The platforms a gateway speaks, by name.
#[derive(Clone, Default)]
pub struct Platforms {
    map: HashMap<Platform, Arc<dyn ChatPlatform>>,
}

impl Platforms {
    pub fn insert(&mut self, p: Platform, out: Arc<dyn ChatPlatform>) {
        self.map.insert(p, out);
    }

    pub fn contains(&self, p: Platform) -> bool {
        self.map.contains_key(&p)
    }

    /// The platform's outbound side; [`Silent`] when it is not connected.
    pub fn get(&self, p: Platform) -> Arc<dyn ChatPlatform> {
        self.map
            .get(&p)
            .cloned()
            .unwrap_or_else(|| Arc::new(Silent))
    }
}

/// An answer's body before the platform's formatting: command output in a
/// code block, an agent's Markdown as it is, "(no output)" for nothing.
pub fn answer_body(outcome: &TurnOutcome) -> String {
    if outcome.answer.trim().is_empty() {
        "(no output)".to_string()
    } else if outcome.preformatted {
        format!("```\n{}\n```", outcome.answer.trim_end())
    } else {
        outcome.answer.trim_end().to_string()
    }
}

/// `formatted` cut into messages of at most `limit` characters, at most
/// `max_parts` of them: the last one then says how much was left out (in
/// `note`'s words, given the count of characters left).
pub fn answer_parts(
    formatted: &str,
    limit: usize,
    max_parts: usize,
    note: impl Fn(usize) -> String,
) -> Vec<String> {
    let mut parts = moat_chat::format::chunk(formatted, limit);
    let max_parts = max_parts.max(1);
    if parts.len() > max_parts {
        let left: usize = parts[max_parts - 1..]
            .iter()
            .map(|p| p.chars().count())
            .sum();
        parts.truncate(max_parts - 1);
        parts.push(note(left));
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_bounded_in_size_and_number() {
        let text = "word ".repeat(2000);
        let parts = answer_parts(&text, 100, 5, |n| format!("({n} more)"));
        assert_eq!(parts.len(), 5);
        assert!(parts.iter().all(|p| p.chars().count() <= 100));
        assert!(parts[4].starts_with('(') && parts[4].ends_with("more)"));
    }

    #[test]
    fn attachments_are_lines_of_the_text() {
        let m = Inbound {
            platform: Platform::Web,
            event_id: "e".into(),
            channel: "c".into(),
            thread: "t".into(),
            user: "u".into(),
            text: "see".into(),
            ts_ms: 0,
            message_ref: None,
            addressed: true,
            attachments: vec![Attachment {
                name: "a\nb.txt".into(),
                bytes: Some(3),
            }],
        };
        assert_eq!(m.full_text(), "see\n[attached file: ab.txt, 3 bytes]");
    }
}
