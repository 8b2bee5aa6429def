//! Telegram webhook bodies (after the secret-token check) as the gateway
//! reads them: `parse_update` for a bot named `moatbot`.
//!
//! Beyond "no panic" (entity offsets and lengths are UTF-16 units from the
//! sender, so they may point past the text or into a surrogate pair): the
//! same body always gives the same answer; a private chat is always
//! addressed; an error never quotes the body.

#![no_main]

use libfuzzer_sys::fuzz_target;
use moat_chat::telegram::{parse_update, BotIdentity, Incoming};

fuzz_target!(|data: &[u8]| {
    let bot = BotIdentity {
        id: 99,
        username: "moatbot".into(),
    };
    let first = parse_update(data, &bot);
    let again = parse_update(data, &bot);
    match (&first, &again) {
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
        _ => panic!("the same body gave two answers"),
    }
    match first {
        Ok(Incoming::Message(m)) | Ok(Incoming::Unsupported(m)) => {
            if m.private {
                assert!(m.addressed, "a private chat is always addressed");
            }
        }
        Ok(Incoming::Ignored(_)) => {}
        Err(e) => assert!(!e.to_string().contains('"'), "the error quotes the body: {e}"),
    }
});
