//! Telegram updates (`Update` objects from a webhook delivery or
//! `getUpdates`), read into what moat acts on.
//!
//! A message is addressed to the bot in a private chat, when it mentions the
//! bot (`@botname`), is a command (`/stop`, `/status@botname`), or replies to
//! one of the bot's messages. A forum topic (`message_thread_id` with
//! `is_topic_message`) is the conversation's thread; elsewhere the chat is.
//!
//! Must never: act on an edited message, a channel post, a service message
//! or a bot's message (its own included), or panic on any JSON.

use serde::Deserialize;

/// The parts of an `Update` moat reads.
#[derive(Debug, Clone, Deserialize)]
pub struct Update {
    pub update_id: i64,
    pub message: Option<Message>,
    pub edited_message: Option<serde::de::IgnoredAny>,
    pub channel_post: Option<serde::de::IgnoredAny>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Message {
    pub message_id: i64,
    pub date: i64,
    pub chat: Chat,
    pub from: Option<User>,
    pub message_thread_id: Option<i64>,
    #[serde(default)]
    pub is_topic_message: bool,
    pub text: Option<String>,
    pub caption: Option<String>,
    #[serde(default)]
    pub entities: Vec<Entity>,
    #[serde(default)]
    pub caption_entities: Vec<Entity>,
    pub reply_to_message: Option<Box<ReplyTo>>,
    pub document: Option<Document>,
    pub photo: Option<Vec<serde::de::IgnoredAny>>,
    pub sticker: Option<serde::de::IgnoredAny>,
    pub poll: Option<serde::de::IgnoredAny>,
    pub voice: Option<serde::de::IgnoredAny>,
    pub video: Option<serde::de::IgnoredAny>,
    pub audio: Option<serde::de::IgnoredAny>,
    pub location: Option<serde::de::IgnoredAny>,
    pub contact: Option<serde::de::IgnoredAny>,
    pub animation: Option<serde::de::IgnoredAny>,
    pub video_note: Option<serde::de::IgnoredAny>,
    pub dice: Option<serde::de::IgnoredAny>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ReplyTo {
    pub from: Option<User>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Chat {
    pub id: i64,
    #[serde(rename = "type")]
    pub kind: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct User {
    pub id: i64,
    #[serde(default)]
    pub is_bot: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Entity {
    #[serde(rename = "type")]
    pub kind: String,
    pub offset: usize,
    pub length: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Document {
    pub file_name: Option<String>,
    pub file_size: Option<u64>,
}

/// The bot itself, from `getMe`.
#[derive(Debug, Clone, Default)]
pub struct BotIdentity {
    pub id: i64,
    /// Without the `@`.
    pub username: String,
}

/// A Telegram message moat takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TgMessage {
    pub update_id: i64,
    pub chat_id: i64,
    /// The forum topic, when the message is in one.
    pub topic: Option<i64>,
    pub user_id: i64,
    pub message_id: i64,
    pub date: i64,
    /// The text, a leading `@botname` or `/command@botname` cleaned.
    pub text: String,
    pub addressed: bool,
    pub private: bool,
    /// A document's name and size.
    pub document: Option<(String, Option<u64>)>,
}

/// What an update is to moat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    Message(TgMessage),
    /// A message of a kind moat cannot read (sticker, poll, voice, ...),
    /// addressed to the bot: told once "I can only read text and files here".
    Unsupported(TgMessage),
    /// Acknowledged and dropped.
    Ignored(&'static str),
}

/// `body` is not an Update.
#[derive(Debug, thiserror::Error)]
#[error("not a Telegram update: {0}")]
pub struct UpdateError(String);

/// Parses one update (a webhook body).
pub fn parse_update(body: &[u8], bot: &BotIdentity) -> Result<Incoming, UpdateError> {
    let u: Update = serde_json::from_slice(body).map_err(|e| UpdateError(clean(&e)))?;
    Ok(classify(u, bot))
}

fn clean(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.find('"') {
        Some(i) => format!("{} …", s[..i].trim_end()),
        None => s,
    }
}

/// What an update is to moat.
pub fn classify(u: Update, bot: &BotIdentity) -> Incoming {
    if u.edited_message.is_some() {
        return Incoming::Ignored("an edited message");
    }
    if u.channel_post.is_some() {
        return Incoming::Ignored("a channel post");
    }
    let Some(m) = u.message else {
        return Incoming::Ignored("not a message");
    };
    let Some(from) = &m.from else {
        return Incoming::Ignored("a message without a sender");
    };
    if from.is_bot {
        return Incoming::Ignored("a bot's message");
    }
    let private = m.chat.kind == "private";
    let (raw, entities) = match (&m.text, &m.caption) {
        (Some(t), _) => (t.as_str(), &m.entities),
        (None, Some(c)) => (c.as_str(), &m.caption_entities),
        (None, None) => ("", &m.entities),
    };
    let at_bot = format!("@{}", bot.username);
    let mut mentioned = false;
    let mut command = false;
    for e in entities.iter() {
        let Some(piece) = utf16_slice(raw, e.offset, e.length) else {
            continue;
        };
        match e.kind.as_str() {
            "mention" if piece.eq_ignore_ascii_case(&at_bot) => mentioned = true,
            "bot_command" if e.offset == 0 => {
                // `/cmd` in a private chat or a group with one bot, or
                // `/cmd@thisbot`; `/cmd@otherbot` is not ours.
                command = match piece.split_once('@') {
                    Some((_, b)) => b.eq_ignore_ascii_case(&bot.username),
                    None => true,
                };
            }
            _ => {}
        }
    }
    let replied_to_bot = m
        .reply_to_message
        .as_ref()
        .and_then(|r| r.from.as_ref())
        .is_some_and(|f| f.id == bot.id);
    let addressed = private || mentioned || command || replied_to_bot;
    let text = clean_text(raw, &at_bot, command);
    let document = m.document.as_ref().map(|d| {
        (
            d.file_name.clone().unwrap_or_else(|| "file".to_string()),
            d.file_size,
        )
    });
    let unsupported = m.text.is_none()
        && document.is_none()
        && (m.photo.is_some()
            || m.sticker.is_some()
            || m.poll.is_some()
            || m.voice.is_some()
            || m.video.is_some()
            || m.audio.is_some()
            || m.location.is_some()
            || m.contact.is_some()
            || m.animation.is_some()
            || m.video_note.is_some()
            || m.dice.is_some());
    let msg = TgMessage {
        update_id: u.update_id,
        chat_id: m.chat.id,
        topic: m.message_thread_id.filter(|_| m.is_topic_message),
        user_id: from.id,
        message_id: m.message_id,
        date: m.date,
        text,
        addressed,
        private,
        document,
    };
    if unsupported {
        return Incoming::Unsupported(msg);
    }
    if msg.text.trim().is_empty() && msg.document.is_none() {
        return Incoming::Ignored("a service message or an empty one");
    }
    Incoming::Message(msg)
}

/// The text without a leading `@botname`, and a leading `/cmd@botname` as
/// `cmd` (so `/stop` is moat's `stop`).
fn clean_text(raw: &str, at_bot: &str, command: bool) -> String {
    let t = raw.trim_start();
    if command {
        if let Some(rest) = t.strip_prefix('/') {
            let (word, tail) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
            let word = word.split('@').next().unwrap_or(word);
            return format!("{word} {}", tail.trim_start()).trim().to_string();
        }
    }
    if t.len() >= at_bot.len()
        && t.is_char_boundary(at_bot.len())
        && t[..at_bot.len()].eq_ignore_ascii_case(at_bot)
    {
        return t[at_bot.len()..]
            .trim_start_matches([',', ':'])
            .trim()
            .to_string();
    }
    raw.to_string()
}

/// Telegram entity offsets count UTF-16 code units.
fn utf16_slice(s: &str, offset: usize, length: usize) -> Option<&str> {
    let mut units = 0usize;
    let (mut start, mut end) = (None, None);
    for (i, c) in s.char_indices() {
        if units == offset {
            start = Some(i);
        }
        if units == offset + length {
            end = Some(i);
            break;
        }
        units += c.len_utf16();
    }
    if units == offset + length && end.is_none() {
        end = Some(s.len());
    }
    if start.is_none() && offset == units && length == 0 {
        start = Some(s.len());
    }
    s.get(start?..end?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bot() -> BotIdentity {
        BotIdentity {
            id: 99,
            username: "moat_bot".into(),
        }
    }

    fn parse(v: serde_json::Value) -> Incoming {
        parse_update(v.to_string().as_bytes(), &bot()).unwrap()
    }

    fn msg(chat: serde_json::Value, extra: serde_json::Value) -> serde_json::Value {
        let mut m = serde_json::json!({
            "message_id": 5, "date": 1700000000, "chat": chat,
            "from": {"id": 42, "is_bot": false, "first_name": "A"}
        });
        if let (Some(o), Some(e)) = (m.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        serde_json::json!({"update_id": 1, "message": m})
    }

    #[test]
    fn private_group_mention_command_reply_topic() {
        let private = serde_json::json!({"id": 42, "type": "private"});
        let group = serde_json::json!({"id": -100, "type": "supergroup"});
        let Incoming::Message(m) = parse(msg(private, serde_json::json!({"text": "hi"}))) else {
            panic!()
        };
        assert!(m.addressed && m.private && m.topic.is_none());
        let Incoming::Message(m) = parse(msg(group.clone(), serde_json::json!({"text": "hi all"})))
        else {
            panic!()
        };
        assert!(!m.addressed);
        let Incoming::Message(m) = parse(msg(
            group.clone(),
            serde_json::json!({"text": "@moat_bot echo hi", "entities": [{"type": "mention", "offset": 0, "length": 9}]}),
        )) else {
            panic!()
        };
        assert!(m.addressed);
        assert_eq!(m.text, "echo hi");
        let Incoming::Message(m) = parse(msg(
            group.clone(),
            serde_json::json!({"text": "/stop@moat_bot", "entities": [{"type": "bot_command", "offset": 0, "length": 14}],
                "message_thread_id": 7, "is_topic_message": true}),
        )) else {
            panic!()
        };
        assert!(m.addressed);
        assert_eq!((m.text.as_str(), m.topic), ("stop", Some(7)));
        let Incoming::Message(m) = parse(msg(
            group.clone(),
            serde_json::json!({"text": "/stop@other_bot", "entities": [{"type": "bot_command", "offset": 0, "length": 15}]}),
        )) else {
            panic!()
        };
        assert!(!m.addressed);
        let Incoming::Message(m) = parse(msg(
            group.clone(),
            serde_json::json!({"text": "and this?", "reply_to_message": {"message_id": 3, "from": {"id": 99, "is_bot": true}}}),
        )) else {
            panic!()
        };
        assert!(m.addressed);
        assert!(matches!(
            parse(msg(group, serde_json::json!({"sticker": {"file_id": "x"}}))),
            Incoming::Unsupported(_)
        ));
    }

    #[test]
    fn bots_edits_and_garbage() {
        let v = serde_json::json!({"update_id": 1, "edited_message": {}});
        assert!(matches!(parse(v), Incoming::Ignored(_)));
        let v = serde_json::json!({"update_id": 1, "message": {"message_id": 1, "date": 1,
            "chat": {"id": 1, "type": "private"}, "from": {"id": 99, "is_bot": true}, "text": "x"}});
        assert!(matches!(parse(v), Incoming::Ignored(_)));
        for body in [&b"{"[..], b"[]", b"{\"update_id\": \"x\"}", b"\xff"] {
            assert!(parse_update(body, &bot()).is_err());
        }
    }

    #[test]
    fn utf16_offsets() {
        assert_eq!(utf16_slice("😀 @moat_bot", 3, 9), Some("@moat_bot"));
        assert_eq!(utf16_slice("ab", 1, 5), None);
    }
}
