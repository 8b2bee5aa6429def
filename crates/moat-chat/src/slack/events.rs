//! Events API callbacks: what a verified request from Slack asks of us.
//!
//! Owns turning a callback body (the same JSON whether it came over HTTP or
//! inside a Socket Mode envelope) into a [`Callback`]: the `url_verification`
//! challenge, or an `event_callback` whose inner event is classified as a
//! mention of the bot, a direct message, or ignored with a reason (other
//! bots, the bot itself, edits, deletions, event types moat does not handle).
//! Also reads Slack's retry headers; recognising a retry is the gateway's job
//! (by `event_id`).
//!
//! It must only ever see bodies whose signature was checked
//! ([`super::verify_request`]) or that came over the Socket Mode connection,
//! and its errors never quote the body.

use http::HeaderMap;
use serde::Deserialize;

/// What one callback asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Callback {
    /// Slack checking the request URL: answer 200 with `challenge` as the body.
    UrlVerification { challenge: String },
    /// An event (answer 200 once it is stored).
    Event(EventCallback),
    /// Slack is dropping this app's events for a minute: too many of them.
    AppRateLimited {
        team_id: Option<String>,
        minute_rate_limited: Option<i64>,
    },
    /// A callback type moat does not know: acknowledge it and do nothing.
    Other { kind: String },
}

/// An `event_callback`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventCallback {
    /// Unique per event, identical across Slack's retries of it: the dedup key.
    pub event_id: String,
    pub team_id: String,
    pub api_app_id: Option<String>,
    /// When the event happened (Unix seconds).
    pub event_time: i64,
    pub inbound: Inbound,
}

/// The inner event, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// `app_mention`: someone mentioned the bot in a channel.
    Mention(InboundMessage),
    /// `message` with `channel_type` `im`: a direct message to the bot.
    DirectMessage(InboundMessage),
    /// `message` in a channel, group or multi-person DM that does not mention
    /// the bot (a mention comes as `app_mention` and is ignored here, so it is
    /// not taken twice). The gateway decides whether it starts a turn
    /// (`mention = "optional"`) or is context.
    ChannelMessage(InboundMessage),
    /// Nothing to answer.
    Ignored(IgnoreReason),
}

/// Why an event is not answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IgnoreReason {
    #[error("sent by a bot")]
    BotMessage,
    #[error("sent by this bot itself")]
    OwnMessage,
    #[error("an edit of an earlier message")]
    Edited,
    #[error("a deletion")]
    Deleted,
    #[error("message subtype {0:?} is not a user's message")]
    Subtype(String),
    #[error("a message outside a direct conversation (channel_type {0:?}); channels reach the bot by mentioning it")]
    NotDirect(String),
    #[error("a channel message that mentions the bot (its app_mention event is the one taken)")]
    MentionedInMessage,
    #[error("event type {0:?} is not handled")]
    UnsupportedEvent(String),
    #[error("the event has no {0}")]
    Incomplete(&'static str),
}

/// A message moat answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundMessage {
    pub channel: String,
    pub user: String,
    /// Slack's text with the bot's mention removed, trimmed, and `&amp;`,
    /// `&lt;`, `&gt;` decoded. Other Slack forms (`<@U…>`, `<url|label>`) stay.
    pub text: String,
    pub ts: String,
    /// The thread's parent `ts` when the message is in a thread.
    pub thread_ts: Option<String>,
    pub files: Vec<FileRef>,
}

/// A file attached to a message: its id and name only (fetching it is separate).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct FileRef {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
}

/// One conversation: a channel and the `ts` of its thread's first message.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ThreadKey {
    pub channel: String,
    pub thread_ts: String,
}

impl std::fmt::Display for ThreadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.channel, self.thread_ts)
    }
}

impl InboundMessage {
    /// The `ts` replies go under: the thread's parent, or this message's own
    /// `ts` when it starts a thread.
    pub fn thread_root(&self) -> &str {
        self.thread_ts.as_deref().unwrap_or(&self.ts)
    }

    /// The conversation this message belongs to.
    pub fn thread_key(&self) -> ThreadKey {
        ThreadKey {
            channel: self.channel.clone(),
            thread_ts: self.thread_root().to_string(),
        }
    }
}

/// Why a body is not a callback. Never quotes the body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("Slack callback is not valid JSON ({category} at line {line}, column {column})")]
    Json {
        category: &'static str,
        line: usize,
        column: usize,
    },
    #[error("Slack callback of type {kind:?} has no {field}")]
    Missing { kind: String, field: &'static str },
}

impl ParseError {
    fn json(e: serde_json::Error) -> ParseError {
        use serde_json::error::Category;
        ParseError::Json {
            category: match e.classify() {
                Category::Io => "read error",
                Category::Syntax => "syntax error",
                Category::Data => "unexpected shape",
                Category::Eof => "cut short",
            },
            line: e.line(),
            column: e.column(),
        }
    }
}

#[derive(Deserialize)]
struct Outer {
    #[serde(rename = "type")]
    kind: String,
    challenge: Option<String>,
    event_id: Option<String>,
    team_id: Option<String>,
    api_app_id: Option<String>,
    event_time: Option<i64>,
    minute_rate_limited: Option<i64>,
    event: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Kind {
    #[serde(rename = "type")]
    kind: Option<String>,
}

/// The fields of `app_mention` and `message` events moat reads.
#[derive(Deserialize)]
struct RawMessage {
    subtype: Option<String>,
    channel: Option<String>,
    channel_type: Option<String>,
    user: Option<String>,
    bot_id: Option<String>,
    text: Option<String>,
    ts: Option<String>,
    thread_ts: Option<String>,
    #[serde(default)]
    files: Vec<FileRef>,
}

/// Parses a callback body. `bot_user_id` is the bot's own user id
/// (`auth.test`'s `user_id`): its messages are ignored and its mention is
/// removed from the text. Without it, only a leading mention is removed.
pub fn parse_callback(raw_body: &[u8], bot_user_id: Option<&str>) -> Result<Callback, ParseError> {
    let outer: Outer = serde_json::from_slice(raw_body).map_err(ParseError::json)?;
    let missing = |field| ParseError::Missing {
        kind: outer.kind.clone(),
        field,
    };
    match outer.kind.as_str() {
        "url_verification" => Ok(Callback::UrlVerification {
            challenge: outer
                .challenge
                .clone()
                .ok_or_else(|| missing("challenge"))?,
        }),
        "app_rate_limited" => Ok(Callback::AppRateLimited {
            team_id: outer.team_id,
            minute_rate_limited: outer.minute_rate_limited,
        }),
        "event_callback" => {
            let event_id = outer.event_id.clone().ok_or_else(|| missing("event_id"))?;
            let team_id = outer.team_id.clone().ok_or_else(|| missing("team_id"))?;
            let event_time = outer.event_time.ok_or_else(|| missing("event_time"))?;
            let event = outer.event.ok_or_else(|| ParseError::Missing {
                kind: outer.kind.clone(),
                field: "event",
            })?;
            Ok(Callback::Event(EventCallback {
                event_id,
                team_id,
                api_app_id: outer.api_app_id,
                event_time,
                inbound: classify(event, bot_user_id)?,
            }))
        }
        _ => Ok(Callback::Other { kind: outer.kind }),
    }
}

fn classify(event: serde_json::Value, bot: Option<&str>) -> Result<Inbound, ParseError> {
    let kind = Kind::deserialize(&event)
        .map_err(ParseError::json)?
        .kind
        .unwrap_or_default();
    let mention = match kind.as_str() {
        "app_mention" => true,
        "message" => false,
        _ => return Ok(Inbound::Ignored(IgnoreReason::UnsupportedEvent(kind))),
    };
    let m = RawMessage::deserialize(&event).map_err(ParseError::json)?;
    let ignored = |r| Ok(Inbound::Ignored(r));
    match m.subtype.as_deref() {
        Some("message_changed") => return ignored(IgnoreReason::Edited),
        Some("message_deleted") => return ignored(IgnoreReason::Deleted),
        Some("bot_message") => return ignored(IgnoreReason::BotMessage),
        // A user's message that carries files, or a thread reply also sent
        // to the channel: still a user's message.
        None | Some("file_share") | Some("thread_broadcast") => {}
        Some(other) => return ignored(IgnoreReason::Subtype(other.to_string())),
    }
    if m.bot_id.is_some() {
        return ignored(IgnoreReason::BotMessage);
    }
    let Some(user) = m.user else {
        return ignored(IgnoreReason::Incomplete("user"));
    };
    if bot.is_some_and(|b| b == user) {
        return ignored(IgnoreReason::OwnMessage);
    }
    let ct = m.channel_type.clone().unwrap_or_default();
    let in_channel = !mention && ct != "im";
    if in_channel {
        if !matches!(ct.as_str(), "channel" | "group" | "mpim") {
            return ignored(IgnoreReason::NotDirect(ct));
        }
        let raw = m.text.as_deref().unwrap_or("");
        let mentions_bot = match bot {
            Some(b) => raw.contains(&format!("<@{b}>")) || raw.contains(&format!("<@{b}|")),
            // Unknown bot id: any mention might be ours; never take it twice.
            None => raw.contains("<@"),
        };
        if mentions_bot {
            return ignored(IgnoreReason::MentionedInMessage);
        }
    }
    let Some(channel) = m.channel else {
        return ignored(IgnoreReason::Incomplete("channel"));
    };
    let Some(ts) = m.ts else {
        return ignored(IgnoreReason::Incomplete("ts"));
    };
    let text = decode_entities(&strip_mention(m.text.as_deref().unwrap_or(""), bot));
    let msg = InboundMessage {
        channel,
        user,
        text,
        ts,
        thread_ts: m.thread_ts,
        files: m.files,
    };
    Ok(if mention {
        Inbound::Mention(msg)
    } else if in_channel {
        Inbound::ChannelMessage(msg)
    } else {
        Inbound::DirectMessage(msg)
    })
}

/// Removes every `<@BOT>` / `<@BOT|name>` (with one following space), or,
/// when the bot's id is not known, a leading `<@…>`; then trims.
fn strip_mention(text: &str, bot: Option<&str>) -> String {
    let Some(bot) = bot else {
        let t = text.trim_start();
        if let Some(rest) = t.strip_prefix("<@") {
            if let Some(end) = rest.find('>') {
                return rest[end + 1..].trim().to_string();
            }
        }
        return text.trim().to_string();
    };
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("<@") {
        let after = &rest[i + 2..];
        let token_len = after.strip_prefix(bot).and_then(|tail| {
            if tail.starts_with('>') {
                Some(bot.len() + 1)
            } else if tail.starts_with('|') {
                tail.find('>').map(|e| bot.len() + e + 1)
            } else {
                None
            }
        });
        match token_len {
            Some(n) => {
                out.push_str(&rest[..i]);
                let mut next = &after[n..];
                if out.is_empty() || out.ends_with(char::is_whitespace) {
                    next = next.strip_prefix(' ').unwrap_or(next);
                }
                rest = next;
            }
            None => {
                out.push_str(&rest[..i + 2]);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out.trim().to_string()
}

/// Slack escapes exactly these three in message text.
fn decode_entities(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// Slack's retry headers: the delivery attempt and why Slack retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryInfo {
    /// 1 for the first retry (the original delivery has no header).
    pub num: u32,
    /// `http_timeout`, `http_error`, … (printable ASCII, at most 64 chars).
    pub reason: Option<String>,
}

/// `X-Slack-Retry-Num` and `X-Slack-Retry-Reason`, if this delivery is a retry.
/// Headers are not signed: use this for logs and metrics, and dedup by
/// `event_id`, never by these.
pub fn retry_info(headers: &HeaderMap) -> Option<RetryInfo> {
    let num = headers.get("x-slack-retry-num")?.to_str().ok()?.trim();
    let num = num.parse().ok()?;
    let reason = headers
        .get("x-slack-retry-reason")
        .and_then(|v| v.to_str().ok())
        .map(|r| {
            r.chars()
                .filter(|c| c.is_ascii_graphic())
                .take(64)
                .collect::<String>()
        })
        .filter(|r| !r.is_empty());
    Some(RetryInfo { num, reason })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOT: &str = "UB0TM047";

    fn callback(event: serde_json::Value) -> String {
        serde_json::json!({
            "token": "legacy-verification-token",
            "team_id": "T0TEAM01",
            "api_app_id": "A0APP001",
            "event": event,
            "type": "event_callback",
            "event_id": "Ev0EXAMPLE1",
            "event_time": 1_700_000_123,
            "authorizations": [{"team_id": "T0TEAM01", "user_id": BOT, "is_bot": true}],
            "is_ext_shared_channel": false,
            "event_context": "4-opaque"
        })
        .to_string()
    }

    fn inbound(event: serde_json::Value) -> Inbound {
        match parse_callback(callback(event).as_bytes(), Some(BOT)).unwrap() {
            Callback::Event(e) => {
                assert_eq!(e.event_id, "Ev0EXAMPLE1");
                assert_eq!(e.team_id, "T0TEAM01");
                assert_eq!(e.event_time, 1_700_000_123);
                assert_eq!(e.api_app_id.as_deref(), Some("A0APP001"));
                e.inbound
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn url_verification() {
        let body = br#"{"token":"t0k","challenge":"c4allenge-Str1ng","type":"url_verification"}"#;
        assert_eq!(
            parse_callback(body, None).unwrap(),
            Callback::UrlVerification {
                challenge: "c4allenge-Str1ng".into()
            }
        );
        let err = parse_callback(br#"{"type":"url_verification"}"#, None).unwrap_err();
        assert_eq!(
            err,
            ParseError::Missing {
                kind: "url_verification".into(),
                field: "challenge"
            }
        );
    }

    #[test]
    fn mention_in_a_channel() {
        let ev = serde_json::json!({
            "type": "app_mention",
            "user": "U0ALICE1",
            "text": "<@UB0TM047> why is the build red? a &lt; b &amp;&amp; c &gt; d",
            "ts": "1700000100.000200",
            "channel": "C0GENERAL",
            "event_ts": "1700000100.000200",
            "client_msg_id": "a-uuid",
            "team": "T0TEAM01",
            "blocks": []
        });
        let Inbound::Mention(m) = inbound(ev) else {
            panic!()
        };
        assert_eq!(m.channel, "C0GENERAL");
        assert_eq!(m.user, "U0ALICE1");
        assert_eq!(m.text, "why is the build red? a < b && c > d");
        assert_eq!(m.ts, "1700000100.000200");
        assert_eq!(m.thread_ts, None);
        assert_eq!(m.thread_root(), "1700000100.000200");
        assert_eq!(m.thread_key().to_string(), "C0GENERAL/1700000100.000200");
        assert!(m.files.is_empty());
    }

    #[test]
    fn mention_in_a_thread_with_files() {
        let ev = serde_json::json!({
            "type": "app_mention",
            "user": "U0ALICE1",
            "text": "please look at this <@UB0TM047|jane> thanks",
            "ts": "1700000200.000300",
            "thread_ts": "1700000100.000200",
            "channel": "C0GENERAL",
            "event_ts": "1700000200.000300",
            "files": [
                {"id": "F0LOG001", "name": "build.log", "mimetype": "text/plain", "size": 1234},
                {"id": "F0HIDDEN", "mode": "hidden_by_limit"}
            ]
        });
        let Inbound::Mention(m) = inbound(ev) else {
            panic!()
        };
        assert_eq!(m.text, "please look at this thanks");
        assert_eq!(m.thread_ts.as_deref(), Some("1700000100.000200"));
        assert_eq!(
            m.thread_key(),
            ThreadKey {
                channel: "C0GENERAL".into(),
                thread_ts: "1700000100.000200".into()
            }
        );
        assert_eq!(
            m.files,
            vec![
                FileRef {
                    id: "F0LOG001".into(),
                    name: Some("build.log".into())
                },
                FileRef {
                    id: "F0HIDDEN".into(),
                    name: None
                },
            ]
        );
    }

    #[test]
    fn direct_message_and_file_share() {
        let ev = serde_json::json!({
            "type": "message",
            "channel": "D0DIRECT1",
            "user": "U0BOB002",
            "text": "run the tests",
            "ts": "1700000300.000100",
            "event_ts": "1700000300.000100",
            "channel_type": "im"
        });
        let Inbound::DirectMessage(m) = inbound(ev) else {
            panic!()
        };
        assert_eq!(
            (m.channel.as_str(), m.user.as_str(), m.text.as_str()),
            ("D0DIRECT1", "U0BOB002", "run the tests")
        );
        let ev = serde_json::json!({
            "type": "message", "subtype": "file_share", "channel": "D0DIRECT1",
            "user": "U0BOB002", "text": "", "ts": "1700000301.000100", "channel_type": "im",
            "files": [{"id": "F0PIC001", "name": "screen.png"}]
        });
        let Inbound::DirectMessage(m) = inbound(ev) else {
            panic!()
        };
        assert_eq!(m.files[0].id, "F0PIC001");
    }

    #[test]
    fn ignored_events() {
        let cases = [
            (
                serde_json::json!({"type": "message", "subtype": "bot_message", "bot_id": "B0OTHER1",
                    "text": "beep", "ts": "1.2", "channel": "D0DIRECT1", "channel_type": "im"}),
                IgnoreReason::BotMessage,
            ),
            (
                serde_json::json!({"type": "app_mention", "bot_id": "B0OTHER1", "user": "U0OTHERBOT",
                    "text": "<@UB0TM047> hi", "ts": "1.2", "channel": "C0GENERAL"}),
                IgnoreReason::BotMessage,
            ),
            (
                serde_json::json!({"type": "message", "user": BOT, "text": "my own reply",
                    "ts": "1.2", "channel": "D0DIRECT1", "channel_type": "im"}),
                IgnoreReason::OwnMessage,
            ),
            (
                serde_json::json!({"type": "message", "subtype": "message_changed", "hidden": true,
                    "channel": "D0DIRECT1", "channel_type": "im", "ts": "1.3",
                    "message": {"type": "message", "user": "U0BOB002", "text": "edited", "ts": "1.2"},
                    "previous_message": {"type": "message", "user": "U0BOB002", "text": "orig", "ts": "1.2"}}),
                IgnoreReason::Edited,
            ),
            (
                serde_json::json!({"type": "message", "subtype": "message_deleted", "hidden": true,
                    "channel": "D0DIRECT1", "channel_type": "im", "ts": "1.4", "deleted_ts": "1.2"}),
                IgnoreReason::Deleted,
            ),
            (
                serde_json::json!({"type": "message", "subtype": "channel_join", "user": "U0BOB002",
                    "text": "joined", "ts": "1.2", "channel": "C0GENERAL", "channel_type": "channel"}),
                IgnoreReason::Subtype("channel_join".into()),
            ),
            (
                // The bot's mention also comes as app_mention: taken once.
                serde_json::json!({"type": "message", "user": "U0BOB002", "text": "<@UB0TM047> hi",
                    "ts": "1.2", "channel": "C0GENERAL", "channel_type": "channel"}),
                IgnoreReason::MentionedInMessage,
            ),
            (
                serde_json::json!({"type": "message", "user": "U0BOB002", "text": "chatter",
                    "ts": "1.2", "channel": "C0GENERAL", "channel_type": "app_home"}),
                IgnoreReason::NotDirect("app_home".into()),
            ),
            (
                // `channel` is an object here: must not be a parse error.
                serde_json::json!({"type": "channel_created",
                    "channel": {"id": "C0NEW", "name": "new", "created": 1, "creator": "U0BOB002"}}),
                IgnoreReason::UnsupportedEvent("channel_created".into()),
            ),
            (
                serde_json::json!({"type": "app_mention", "text": "<@UB0TM047> hi", "ts": "1.2", "channel": "C0GENERAL"}),
                IgnoreReason::Incomplete("user"),
            ),
        ];
        for (ev, want) in cases {
            assert_eq!(inbound(ev.clone()), Inbound::Ignored(want), "{ev}");
        }
    }

    #[test]
    fn channel_messages_without_a_mention_are_handed_on() {
        let ev = serde_json::json!({"type": "message", "user": "U0BOB002", "text": "chatter",
            "ts": "1.2", "channel": "C0GENERAL", "channel_type": "channel"});
        match inbound(ev) {
            Inbound::ChannelMessage(m) => assert_eq!(
                (m.channel.as_str(), m.text.as_str()),
                ("C0GENERAL", "chatter")
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn other_callbacks_and_errors() {
        assert_eq!(
            parse_callback(br#"{"type":"app_rate_limited","team_id":"T0TEAM01","minute_rate_limited":1700000040,"api_app_id":"A0APP001"}"#, None).unwrap(),
            Callback::AppRateLimited { team_id: Some("T0TEAM01".into()), minute_rate_limited: Some(1_700_000_040) }
        );
        assert_eq!(
            parse_callback(br#"{"type":"block_actions"}"#, None).unwrap(),
            Callback::Other {
                kind: "block_actions".into()
            }
        );
        let missing = parse_callback(
            br#"{"type":"event_callback","team_id":"T","event_time":1,"event":{}}"#,
            None,
        );
        assert_eq!(
            missing.unwrap_err(),
            ParseError::Missing {
                kind: "event_callback".into(),
                field: "event_id"
            }
        );
        // Errors never quote the body.
        for body in [
            &br#"{"type":"event_callback","event_id":"secret-words-here""#[..],
            br#"{"type":"event_callback","event_id":"E","team_id":"T","event_time":"secret-words-here","event":{}}"#,
            br#"{"type":"event_callback","event_id":"E","team_id":"T","event_time":1,"event":{"type":"message","text":["secret-words-here"]}}"#,
        ] {
            let e = parse_callback(body, None).unwrap_err();
            assert!(matches!(e, ParseError::Json { .. }), "{e:?}");
            assert!(!e.to_string().contains("secret-words"), "{e}");
            assert!(!format!("{e:?}").contains("secret-words"), "{e:?}");
        }
    }

    #[test]
    fn mention_stripping() {
        let s = |t, b| strip_mention(t, b);
        assert_eq!(s("<@UB0TM047> hello", Some(BOT)), "hello");
        assert_eq!(s("hello <@UB0TM047>", Some(BOT)), "hello");
        assert_eq!(s("a <@UB0TM047> b <@UB0TM047|jane> c", Some(BOT)), "a b c");
        // Other users' mentions and look-alikes stay.
        assert_eq!(
            s("<@UB0TM047> ask <@U0ALICE1>", Some(BOT)),
            "ask <@U0ALICE1>"
        );
        assert_eq!(s("<@UB0TM0470> x", Some(BOT)), "<@UB0TM0470> x");
        assert_eq!(s("<@UB0TM047", Some(BOT)), "<@UB0TM047");
        // Unknown bot id: only a leading mention goes.
        assert_eq!(
            s("  <@UWHOEVER> do it <@U0ALICE1>", None),
            "do it <@U0ALICE1>"
        );
        assert_eq!(s("do it <@U0ALICE1>", None), "do it <@U0ALICE1>");
    }

    #[test]
    fn retry_headers() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_info(&h), None);
        h.insert("x-slack-retry-num", "2".parse().unwrap());
        h.insert("x-slack-retry-reason", "http_timeout".parse().unwrap());
        assert_eq!(
            retry_info(&h),
            Some(RetryInfo {
                num: 2,
                reason: Some("http_timeout".into())
            })
        );
        h.insert(
            "x-slack-retry-reason",
            "bad\treason with spaces".parse().unwrap(),
        );
        assert_eq!(
            retry_info(&h).unwrap().reason.as_deref(),
            Some("badreasonwithspaces")
        );
        h.insert("x-slack-retry-num", "many".parse().unwrap());
        assert_eq!(retry_info(&h), None);
    }
}
