//! Slack Events API callbacks (after the signature check) as the gateway
//! classifies them, with and without the bot's own user id known.
//!
//! Beyond "no panic": a message to answer is never the bot's own, always
//! keeps its channel, user, ts and thread whether or not the bot's id is
//! known, and its text is trimmed; knowing the bot's id changes nothing but that; the
//! same body always gives the same answer; an error never quotes the body.

#![no_main]

use libfuzzer_sys::fuzz_target;
use moat_chat::slack::{parse_callback, Callback, IgnoreReason, Inbound, ParseError};

const BOT: &str = "UBOT0FUZZ";

fuzz_target!(|data: &[u8]| {
    let with = parse_callback(data, Some(BOT));
    let without = parse_callback(data, None);
    assert_eq!(with, parse_callback(data, Some(BOT)));
    match (&with, &without) {
        (Err(a), Err(b)) => {
            assert_eq!(a, b);
            if let ParseError::Missing { kind, .. } = a {
                assert!(["url_verification", "event_callback"].contains(&kind.as_str()));
            }
        }
        (Ok(Callback::Event(a)), Ok(Callback::Event(b))) => {
            assert_eq!(
                (&a.event_id, &a.team_id, a.event_time),
                (&b.event_id, &b.team_id, b.event_time)
            );
            match (&a.inbound, &b.inbound) {
                (Inbound::Mention(m), _)
                | (Inbound::DirectMessage(m), _)
                | (Inbound::ChannelMessage(m), _) => {
                    assert_ne!(m.user, BOT);
                    assert_eq!(m.text.trim(), m.text);
                    // Without the id, the same message, same place.
                    let other = match &b.inbound {
                        Inbound::Mention(o)
                        | Inbound::DirectMessage(o)
                        | Inbound::ChannelMessage(o) => o,
                        Inbound::Ignored(r) => panic!("ignored only without the bot's id: {r}"),
                    };
                    assert_eq!(
                        (&m.channel, &m.user, &m.ts, &m.thread_ts),
                        (&other.channel, &other.user, &other.ts, &other.thread_ts)
                    );
                    assert_eq!(
                        m.thread_key().thread_ts,
                        m.thread_ts.clone().unwrap_or(m.ts.clone())
                    );
                }
                (Inbound::Ignored(IgnoreReason::OwnMessage), _) => {}
                (Inbound::Ignored(r), other) => assert_eq!(&Inbound::Ignored(r.clone()), other),
            }
        }
        (a, b) => assert_eq!(a, b),
    }
});
