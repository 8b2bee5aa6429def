//! A channel's `conversation`, `trigger` and `mention` keys: what one
//! conversation is (a thread or the whole chat) and which messages start a
//! turn.
//!
//! Owns their parsing and validation (a trigger that is not a valid regex is
//! refused naming the key) and the matching. Must never decide by trust level
//! (that is `trust.rs`), read a file or the environment.

use regex::{Regex, RegexBuilder};

use crate::gateway::Platform;
use crate::PolicyError;

/// Longest trigger pattern accepted, and the compiled size allowed: a trigger
/// is run on every message of a channel.
const MAX_TRIGGER: usize = 256;
const MAX_COMPILED: usize = 64 * 1024;

/// What one conversation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Each thread (Slack) or chat (web) is one conversation.
    Thread,
    /// The whole channel, group or direct message is one conversation.
    Channel,
}

/// Whether a Slack message in a channel must mention the bot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mention {
    #[default]
    Required,
    Optional,
}

/// A channel's trigger: a regex, case-insensitive unless it says `(?-i)`.
#[derive(Debug, Clone)]
pub struct Trigger {
    pattern: String,
    re: Regex,
}

impl PartialEq for Trigger {
    fn eq(&self, other: &Self) -> bool {
        self.pattern == other.pattern
    }
}

impl Trigger {
    pub fn parse(pattern: &str, key: &str) -> Result<Self, PolicyError> {
        let bad = |m: String| PolicyError::Invalid {
            key: key.to_string(),
            message: m,
        };
        if pattern.trim().is_empty() {
            return Err(bad(
                "an empty trigger matches every message; remove the key instead".into(),
            ));
        }
        if pattern.len() > MAX_TRIGGER {
            return Err(bad(format!(
                "the trigger is {} bytes; keep it under {MAX_TRIGGER}",
                pattern.len()
            )));
        }
        let re = RegexBuilder::new(pattern)
            .case_insensitive(true)
            .size_limit(MAX_COMPILED)
            .build()
            .map_err(|e| {
                let first = e.to_string();
                let first = first.lines().last().unwrap_or("").trim().to_string();
                bad(format!(
                    "{pattern:?} is not a valid regex ({first}); e.g. trigger = \"^@Andy\\\\b\""
                ))
            })?;
        Ok(Self {
            pattern: pattern.to_string(),
            re,
        })
    }

    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// The text after the trigger when `text` matches it (for reading a
    /// command such as `@Andy stop`), else `None`.
    pub fn strip<'t>(&self, text: &'t str) -> Option<&'t str> {
        let m = self.re.find(text)?;
        Some(if m.start() == 0 {
            &text[m.end()..]
        } else {
            text
        })
    }
}

/// The three keys, as set in `[defaults]` or `[[channel]]`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ChatKeys {
    /// `None`: a thread, except Slack direct messages (see [`ChatKeys::scope`]).
    pub conversation: Option<Scope>,
    pub trigger: Option<Trigger>,
    pub mention: Mention,
}

impl ChatKeys {
    pub(crate) fn apply(
        &mut self,
        conversation: Option<String>,
        trigger: Option<String>,
        mention: Option<String>,
        at: &str,
    ) -> Result<(), PolicyError> {
        if let Some(c) = conversation {
            self.conversation = Some(match c.as_str() {
                "thread" => Scope::Thread,
                "channel" => Scope::Channel,
                other => {
                    return Err(PolicyError::Invalid {
                        key: format!("{at}.conversation"),
                        message: format!(
                            "unknown conversation scope {other:?}; use \"thread\" or \"channel\""
                        ),
                    })
                }
            });
        }
        if let Some(t) = trigger {
            self.trigger = Some(Trigger::parse(&t, &format!("{at}.trigger"))?);
        }
        if let Some(m) = mention {
            self.mention = match m.as_str() {
                "required" => Mention::Required,
                "optional" => Mention::Optional,
                other => {
                    return Err(PolicyError::Invalid {
                        key: format!("{at}.mention"),
                        message: format!(
                            "unknown mention rule {other:?}; use \"required\" or \"optional\""
                        ),
                    })
                }
            };
        }
        Ok(())
    }

    /// The scope of a message in `channel_id`: the key when set, else a
    /// Slack direct message (`D…`) is one conversation and anything else a
    /// thread. The web chat is always by thread.
    pub fn scope(&self, platform: Platform, channel_id: &str) -> Scope {
        if platform == Platform::Web {
            // A web chat's channel is its user, and each named chat is
            // addressed by its own URL: always a thread.
            return Scope::Thread;
        }
        if platform == Platform::Discord && channel_id == crate::gateway::DISCORD_DMS {
            // Discord's direct messages: the thread is the direct message
            // channel, where answers go; never merged into one.
            return Scope::Thread;
        }
        match self.conversation {
            Some(s) => s,
            None if platform == Platform::Slack && channel_id.starts_with('D') => Scope::Channel,
            None => Scope::Thread,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn triggers_are_case_insensitive_and_strip_a_leading_match() {
        let t = Trigger::parse("^@Andy\\b", "channel[0].trigger").unwrap();
        assert_eq!(t.strip("@andy stop"), Some(" stop"));
        assert_eq!(t.strip("@ANDY what is up"), Some(" what is up"));
        assert_eq!(t.strip("hey @Andy"), None);
        assert_eq!(t.strip("@Andrew hi"), None);
        let anywhere = Trigger::parse("\\bandy\\b", "k").unwrap();
        assert_eq!(anywhere.strip("ask andy"), Some("ask andy"));
        let exact = Trigger::parse("(?-i)^Andy", "k").unwrap();
        assert_eq!(exact.strip("andy"), None);
    }

    #[test]
    fn bad_triggers_name_the_key() {
        for bad in ["(unclosed", "", "   ", &"a".repeat(300)] {
            let e = Trigger::parse(bad, "channel[3].trigger").unwrap_err();
            assert!(
                e.to_string().starts_with("channel[3].trigger: "),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn slack_direct_messages_are_one_conversation_by_default() {
        let k = ChatKeys::default();
        assert_eq!(k.scope(Platform::Slack, "D0123"), Scope::Channel);
        assert_eq!(k.scope(Platform::Slack, "C0123"), Scope::Thread);
        assert_eq!(k.scope(Platform::Web, "D0123"), Scope::Thread);
        let t = ChatKeys {
            conversation: Some(Scope::Thread),
            ..ChatKeys::default()
        };
        assert_eq!(t.scope(Platform::Slack, "D0123"), Scope::Thread);
        let c = ChatKeys {
            conversation: Some(Scope::Channel),
            ..ChatKeys::default()
        };
        assert_eq!(c.scope(Platform::Slack, "C0123"), Scope::Channel);
        assert_eq!(c.scope(Platform::Web, "alice"), Scope::Thread);
        assert_eq!(c.scope(Platform::Discord, "dm"), Scope::Thread);
        assert_eq!(c.scope(Platform::Discord, "123"), Scope::Channel);
    }
}
