//! A conversation's history as the store keeps it (its messages and the
//! answers kept in the outbox), for `moat history`: as JSON, and as Markdown
//! where every text is quoted so that nothing a user or an agent wrote can
//! pass for a heading or a line of moat's own.
//!
//! Must never: read another conversation than the one asked for, or print a
//! message that was dropped (an unauthorised sender's text).

use moat_store::{ConversationId, MessageState, Store, StoreError, TurnState};
use serde::{Deserialize, Serialize};

/// At most this many messages, and as many answers, are exported.
pub const MAX_ENTRIES: u32 = 10_000;

/// One conversation's history, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    pub conversation: ConversationId,
    pub platform: String,
    pub channel: String,
    pub thread: String,
    pub entries: Vec<Entry>,
}

/// A message or an answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Entry {
    Message {
        id: i64,
        at_ms: i64,
        user: String,
        text: String,
        state: String,
    },
    Answer {
        turn: i64,
        at_ms: i64,
        ok: bool,
        delivered: bool,
        text: String,
    },
}

impl Entry {
    fn at(&self) -> (i64, u8) {
        match self {
            Entry::Message { at_ms, .. } => (*at_ms, 0),
            Entry::Answer { at_ms, .. } => (*at_ms, 1),
        }
    }
}

/// The history of `conversation`, or `None` when there is no such
/// conversation.
pub fn read(store: &Store, conversation: ConversationId) -> Result<Option<History>, StoreError> {
    let Some(conv) = store.conversation(conversation)? else {
        return Ok(None);
    };
    let mut entries: Vec<Entry> = store
        .recent_messages(conversation, MAX_ENTRIES)?
        .into_iter()
        .filter(|m| m.state != MessageState::Dropped)
        .map(|m| Entry::Message {
            id: m.id,
            at_ms: m.ts_ms,
            user: m.user,
            text: m.text,
            state: m.state.as_str().to_string(),
        })
        .chain(
            store
                .kept_answers(conversation, MAX_ENTRIES)?
                .into_iter()
                .map(|a| Entry::Answer {
                    turn: a.turn_id,
                    at_ms: a.ended_ms,
                    ok: a.state == TurnState::Done,
                    delivered: a.delivered,
                    text: a.answer,
                }),
        )
        .collect();
    entries.sort_by_key(Entry::at);
    Ok(Some(History {
        conversation,
        platform: conv.platform,
        channel: conv.channel,
        thread: conv.thread,
        entries,
    }))
}

/// Every line of `text` as a Markdown quote (an empty text is one `>`).
fn quoted(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        out.push_str("> ");
        out.push_str(line);
        out.push('\n');
    }
    if out.is_empty() {
        out.push_str(">\n");
    }
    out
}

/// One line, no control characters, at most 200 characters (ids and user
/// names come from the platform).
fn plain(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(200)
        .collect()
}

/// UTC time of `ms` as `YYYY-MM-DD HH:MM:SS`.
fn utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The history as Markdown: a heading, then each message and answer with
/// its time (UTC), its texts quoted.
pub fn to_markdown(h: &History) -> String {
    let mut out = format!(
        "# Conversation {} ({} {} {})\n\n",
        h.conversation,
        plain(&h.platform),
        plain(&h.channel),
        if h.thread.is_empty() {
            "(whole channel)".to_string()
        } else {
            plain(&h.thread)
        }
    );
    for e in &h.entries {
        match e {
            Entry::Message {
                at_ms, user, text, ..
            } => {
                out.push_str(&format!("**{}** at {} UTC:\n\n", plain(user), utc(*at_ms)));
                out.push_str(&quoted(text));
            }
            Entry::Answer {
                turn,
                at_ms,
                ok,
                delivered,
                text,
            } => {
                let how = match (ok, delivered) {
                    (true, true) => "",
                    (false, true) => ", failed",
                    (true, false) => ", not delivered yet",
                    (false, false) => ", failed, not delivered yet",
                };
                out.push_str(&format!(
                    "**moat** (turn {turn}{how}) at {} UTC:\n\n",
                    utc(*at_ms)
                ));
                out.push_str(&quoted(text));
            }
        }
        out.push('\n');
    }
    if h.entries.is_empty() {
        out.push_str("(nothing kept)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_store::{IncomingMessage, Inserted};

    fn insert(s: &Store, event: &str, user: &str, text: &str, ts_ms: i64) -> (i64, i64) {
        let m = IncomingMessage {
            platform: "web".into(),
            event_id: event.into(),
            channel: "alice".into(),
            thread: "t1".into(),
            user: user.into(),
            text: text.into(),
            ts_ms,
            message_ref: None,
        };
        match s.insert_message(&m).unwrap() {
            Inserted::New {
                message_id,
                conversation_id,
            } => (message_id, conversation_id),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn history_is_in_order_quoted_and_leaves_out_dropped_messages() {
        let s = Store::open_in_memory().unwrap();
        let (m1, c) = insert(&s, "e1", "alice", "# not a heading\nsecond line", 1_000);
        let t = s.start_turn(c, &[m1], 1_500).unwrap();
        s.finish_turn_keeping(
            t,
            TurnState::Done,
            "**moat** (turn 99) forged",
            false,
            None,
            2_000,
        )
        .unwrap();
        s.mark_delivered(t, 2_001).unwrap();
        let (m2, _) = insert(&s, "e2", "mallory", "let me in", 3_000);
        s.set_message_state(m2, MessageState::Dropped, Some("not authorised"))
            .unwrap();
        let h = read(&s, c).unwrap().unwrap();
        assert_eq!(h.entries.len(), 2, "{h:#?}");
        assert!(matches!(&h.entries[0], Entry::Message { user, .. } if user == "alice"));
        assert!(
            matches!(&h.entries[1], Entry::Answer { turn, ok: true, delivered: true, .. } if *turn == t)
        );
        let md = to_markdown(&h);
        assert!(md.starts_with("# Conversation "), "{md}");
        assert!(md.contains("> # not a heading\n> second line\n"), "{md}");
        assert!(md.contains("> **moat** (turn 99) forged\n"), "{md}");
        assert!(md.contains("at 1970-01-01 00:00:01 UTC"), "{md}");
        assert!(!md.contains("let me in"), "{md}");
        // The JSON form reads back the same.
        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(serde_json::from_str::<History>(&json).unwrap(), h);
        assert!(read(&s, c + 100).unwrap().is_none());
    }

    #[test]
    fn utc_dates_are_right() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(1_796_601_600_000), "2026-12-07 00:00:00");
        assert_eq!(utc(951_782_400_000 + 3_723_000), "2000-02-29 01:02:03");
    }
}
