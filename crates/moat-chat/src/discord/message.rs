//! Discord `MESSAGE_CREATE` dispatches read into what moat acts on.
//!
//! A message is addressed to the bot in a direct message (no `guild_id`),
//! when it mentions the bot (`<@BOT_ID>` in `mentions`; `@everyone` does not
//! count), or when it replies to one of the bot's messages. The leading
//! mention is taken off the text.
//!
//! Must never: act on a bot's or a webhook's message (its own included), a
//! system message (joins, pins, thread starts), or panic on any JSON.

use serde::Deserialize;

/// Discord's epoch (2015-01-01) in Unix milliseconds: a snowflake's time.
const DISCORD_EPOCH_MS: i64 = 1_420_070_400_000;

#[derive(Debug, Clone, Deserialize)]
struct Message {
    id: String,
    channel_id: String,
    #[serde(default)]
    guild_id: Option<String>,
    author: Option<User>,
    #[serde(default)]
    content: String,
    #[serde(rename = "type", default)]
    kind: u8,
    #[serde(default)]
    webhook_id: Option<String>,
    #[serde(default)]
    mentions: Vec<User>,
    #[serde(default)]
    attachments: Vec<Attachment>,
    #[serde(default)]
    sticker_items: Option<Vec<serde::de::IgnoredAny>>,
    #[serde(default)]
    poll: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    referenced_message: Option<Box<Referenced>>,
}

#[derive(Debug, Clone, Deserialize)]
struct Referenced {
    author: Option<User>,
}

#[derive(Debug, Clone, Deserialize)]
struct User {
    id: String,
    #[serde(default)]
    bot: bool,
}

#[derive(Debug, Clone, Deserialize)]
struct Attachment {
    #[serde(default)]
    filename: String,
    #[serde(default)]
    size: Option<u64>,
}

/// A Discord message moat takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DcMessage {
    pub id: String,
    /// The channel the message is in (a thread is a channel of its own).
    pub channel_id: String,
    /// `None`: a direct message.
    pub guild_id: Option<String>,
    pub user_id: String,
    /// The text, a leading mention of the bot taken off.
    pub text: String,
    pub addressed: bool,
    /// Unix milliseconds, from the snowflake.
    pub ts_ms: i64,
    /// Files: name and size.
    pub attachments: Vec<(String, Option<u64>)>,
}

/// What a dispatch is to moat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    Message(DcMessage),
    /// A sticker or poll without text, addressed to the bot: told once "I
    /// can only read text and files here".
    Unsupported(DcMessage),
    Ignored(&'static str),
}

/// `d` is not a message.
#[derive(Debug, thiserror::Error)]
#[error("not a Discord message")]
pub struct MessageError;

fn is_snowflake(s: &str) -> bool {
    !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit())
}

/// A snowflake's creation time in Unix milliseconds.
pub fn snowflake_ms(id: &str) -> Option<i64> {
    let n: u64 = id.parse().ok()?;
    Some((n >> 22) as i64 + DISCORD_EPOCH_MS)
}

/// Reads one `MESSAGE_CREATE` dispatch's `d` for the bot `bot_id`.
pub fn parse_message(d: &serde_json::Value, bot_id: &str) -> Result<Incoming, MessageError> {
    let m = Message::deserialize(d).map_err(|_| MessageError)?;
    if !is_snowflake(&m.id) || !is_snowflake(&m.channel_id) {
        return Err(MessageError);
    }
    if m.guild_id.as_deref().is_some_and(|g| !is_snowflake(g)) {
        return Err(MessageError);
    }
    // 0 DEFAULT, 19 REPLY: everything else is a system message.
    if m.kind != 0 && m.kind != 19 {
        return Ok(Incoming::Ignored("a system message"));
    }
    if m.webhook_id.is_some() {
        return Ok(Incoming::Ignored("a webhook's message"));
    }
    let Some(author) = &m.author else {
        return Ok(Incoming::Ignored("a message without an author"));
    };
    if author.bot || author.id == bot_id {
        return Ok(Incoming::Ignored("a bot's message"));
    }
    if !is_snowflake(&author.id) {
        return Err(MessageError);
    }
    let dm = m.guild_id.is_none();
    let mentioned = m.mentions.iter().any(|u| u.id == bot_id);
    let replied_to_bot = m
        .referenced_message
        .as_ref()
        .and_then(|r| r.author.as_ref())
        .is_some_and(|a| a.id == bot_id);
    let text = strip_mention(&m.content, bot_id);
    let msg = DcMessage {
        ts_ms: snowflake_ms(&m.id).unwrap_or(0),
        id: m.id,
        channel_id: m.channel_id,
        guild_id: m.guild_id,
        user_id: author.id.clone(),
        text,
        addressed: dm || mentioned || replied_to_bot,
        attachments: m
            .attachments
            .iter()
            .map(|a| {
                let name = if a.filename.is_empty() {
                    "file".to_string()
                } else {
                    a.filename.clone()
                };
                (name, a.size)
            })
            .collect(),
    };
    if msg.text.trim().is_empty() && msg.attachments.is_empty() {
        if m.sticker_items.is_some() || m.poll.is_some() {
            return Ok(Incoming::Unsupported(msg));
        }
        return Ok(Incoming::Ignored("an empty message"));
    }
    Ok(Incoming::Message(msg))
}

/// A click on a message button (`INTERACTION_CREATE` of type 3), as
/// Discord authenticated it on the Gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Click {
    /// The interaction's id and token, to answer it.
    pub interaction_id: String,
    pub token: String,
    /// The button's `custom_id`.
    pub custom_id: String,
    /// Who clicked: `member.user.id` in a guild, `user.id` in a DM.
    pub user_id: String,
    pub channel_id: String,
}

/// Reads one `INTERACTION_CREATE` dispatch's `d`: a button click, or `None`
/// for any other interaction.
pub fn parse_click(d: &serde_json::Value) -> Option<Click> {
    #[derive(Deserialize)]
    struct Interaction {
        id: String,
        token: String,
        #[serde(rename = "type")]
        kind: u8,
        #[serde(default)]
        channel_id: Option<String>,
        #[serde(default)]
        member: Option<Member>,
        #[serde(default)]
        user: Option<User>,
        #[serde(default)]
        data: Option<Data>,
    }
    #[derive(Deserialize)]
    struct Member {
        user: Option<User>,
    }
    #[derive(Deserialize)]
    struct Data {
        #[serde(default)]
        custom_id: String,
        #[serde(default)]
        component_type: u8,
    }
    let i = Interaction::deserialize(d).ok()?;
    // 3: MESSAGE_COMPONENT; 2: a button.
    let data = i.data?;
    if i.kind != 3 || data.component_type != 2 || !is_snowflake(&i.id) {
        return None;
    }
    let user = i.member.and_then(|m| m.user).or(i.user)?;
    if !is_snowflake(&user.id) {
        return None;
    }
    Some(Click {
        interaction_id: i.id,
        token: i.token,
        custom_id: data.custom_id,
        user_id: user.id,
        channel_id: i.channel_id.filter(|c| is_snowflake(c)).unwrap_or_default(),
    })
}

/// The text without a leading `<@BOT>` or `<@!BOT>`.
fn strip_mention(content: &str, bot_id: &str) -> String {
    let t = content.trim_start();
    for m in [format!("<@{bot_id}>"), format!("<@!{bot_id}>")] {
        if let Some(rest) = t.strip_prefix(m.as_str()) {
            return rest.trim_start_matches([',', ':']).trim().to_string();
        }
    }
    content.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const BOT: &str = "900000000000000001";

    fn msg(extra: serde_json::Value) -> serde_json::Value {
        let mut m = json!({
            "id": "1100000000000000000", "channel_id": "2200", "guild_id": "3300",
            "author": {"id": "4242", "username": "alice"}, "content": "hi", "type": 0,
            "mentions": [], "attachments": []
        });
        m.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        m
    }

    fn parse(v: serde_json::Value) -> Incoming {
        parse_message(&v, BOT).unwrap()
    }

    #[test]
    fn dms_mentions_replies_and_plain_channel_messages() {
        let Incoming::Message(m) = parse(msg(json!({"guild_id": null}))) else {
            panic!()
        };
        assert!(m.addressed && m.guild_id.is_none());
        let Incoming::Message(m) = parse(msg(json!({}))) else {
            panic!()
        };
        assert!(!m.addressed);
        let Incoming::Message(m) = parse(msg(json!({
            "content": format!("<@{BOT}> echo hi"), "mentions": [{"id": BOT, "bot": true}]
        }))) else {
            panic!()
        };
        assert!(m.addressed);
        assert_eq!(m.text, "echo hi");
        let Incoming::Message(m) = parse(msg(json!({
            "type": 19, "content": "and this?", "referenced_message": {"author": {"id": BOT, "bot": true}}
        }))) else {
            panic!()
        };
        assert!(m.addressed);
        // @everyone is not a mention of the bot.
        let Incoming::Message(m) = parse(msg(
            json!({"content": "@everyone hi", "mention_everyone": true}),
        )) else {
            panic!()
        };
        assert!(!m.addressed);
        assert!(m.ts_ms > DISCORD_EPOCH_MS);
    }

    #[test]
    fn clicks_are_read_from_guild_and_dm_interactions() {
        let guild = json!({"id": "77", "token": "tok-1", "type": 3, "channel_id": "2200",
            "member": {"user": {"id": "4242"}}, "data": {"custom_id": "moat-approve:ab", "component_type": 2}});
        let c = parse_click(&guild).unwrap();
        assert_eq!(
            (c.user_id.as_str(), c.custom_id.as_str()),
            ("4242", "moat-approve:ab")
        );
        let dm = json!({"id": "78", "token": "t", "type": 3, "user": {"id": "5"},
            "data": {"custom_id": "x", "component_type": 2}});
        assert_eq!(parse_click(&dm).unwrap().user_id, "5");
        // A slash command, a select menu, no user: not a click.
        for bad in [
            json!({"id": "1", "token": "t", "type": 2, "user": {"id": "5"}, "data": {"component_type": 2}}),
            json!({"id": "1", "token": "t", "type": 3, "user": {"id": "5"}, "data": {"component_type": 3}}),
            json!({"id": "1", "token": "t", "type": 3, "data": {"component_type": 2}}),
            json!({"id": "1", "token": "t", "type": 3, "user": {"id": "x"}, "data": {"component_type": 2}}),
        ] {
            assert!(parse_click(&bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn bots_system_messages_stickers_and_garbage() {
        assert!(matches!(
            parse(msg(json!({"author": {"id": "5", "bot": true}}))),
            Incoming::Ignored(_)
        ));
        assert!(matches!(
            parse(msg(json!({"author": {"id": BOT}}))),
            Incoming::Ignored(_)
        ));
        assert!(matches!(
            parse(msg(json!({"type": 7}))),
            Incoming::Ignored(_)
        ));
        assert!(matches!(
            parse(msg(json!({"webhook_id": "77"}))),
            Incoming::Ignored(_)
        ));
        assert!(matches!(
            parse(msg(
                json!({"content": "", "guild_id": null, "sticker_items": [{"id": "1"}]})
            )),
            Incoming::Unsupported(_)
        ));
        let Incoming::Message(m) = parse(msg(
            json!({"content": "", "attachments": [{"filename": "a.txt", "size": 3}]}),
        )) else {
            panic!()
        };
        assert_eq!(m.attachments, vec![("a.txt".to_string(), Some(3))]);
        for bad in [
            json!([]),
            json!({"id": 1}),
            msg(json!({"channel_id": "../x"})),
            msg(json!({"author": {"id": "x y"}})),
        ] {
            assert!(parse_message(&bad, BOT).is_err(), "{bad}");
        }
    }
}
