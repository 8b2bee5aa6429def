//! Discord Gateway dispatches as the gateway reads them: a
//! `MESSAGE_CREATE`'s `d` (`parse_message`) and an interaction's
//! (`parse_click`), from any JSON.
//!
//! Beyond "no panic": the same value always gives the same answer; a
//! message taken is never the bot's own and has numeric ids; a direct
//! message is always addressed.

#![no_main]

use libfuzzer_sys::fuzz_target;
use moat_chat::discord::{parse_click, parse_message, Incoming};

const BOT: &str = "1000000000000000042";

fuzz_target!(|data: &[u8]| {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let a = parse_message(&v, BOT);
    let b = parse_message(&v, BOT);
    match (&a, &b) {
        (Ok(x), Ok(y)) => assert_eq!(x, y),
        (Err(_), Err(_)) => {}
        _ => panic!("the same value gave two answers"),
    }
    if let Ok(Incoming::Message(m) | Incoming::Unsupported(m)) = a {
        assert_ne!(m.user_id, BOT, "the bot's own message was taken");
        for id in [&m.id, &m.channel_id, &m.user_id] {
            assert!(!id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()), "{id:?}");
        }
        if m.guild_id.is_none() {
            assert!(m.addressed, "a direct message is always addressed");
        }
    }
    assert_eq!(format!("{:?}", parse_click(&v)), format!("{:?}", parse_click(&v)));
});
