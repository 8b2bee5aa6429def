//! WhatsApp Cloud API webhook deliveries: the `X-Hub-Signature-256` check
//! over the raw body, and `parse_delivery` of what passes it.
//!
//! The first byte splits the input into a header value and a body. Beyond
//! "no panic": moat's own signature of any body is accepted; a header is
//! accepted only if it is that signature (hex case aside); an empty app
//! secret accepts nothing; parsing is deterministic and an error never
//! quotes the body.

#![no_main]

use libfuzzer_sys::fuzz_target;
use moat_chat::whatsapp::{parse_delivery, sign, signature_ok};
use moat_creds::Secret;

const APP_SECRET: &str = "fuzz-app-secret-0123456789";

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let cut = usize::from(n).min(rest.len());
    let (header, body) = rest.split_at(cut);
    let secret = Secret::new(APP_SECRET);
    let good = sign(APP_SECRET, body);
    assert!(signature_ok(&secret, good.as_bytes(), body));
    if signature_ok(&secret, header, body) {
        assert_eq!(
            String::from_utf8_lossy(header).to_ascii_lowercase(),
            good,
            "a header that is not the body's signature was accepted"
        );
    }
    assert!(!signature_ok(&Secret::new(""), header, body));
    assert!(!signature_ok(&Secret::new(""), sign("", body).as_bytes(), body));
    let a = parse_delivery(body);
    let b = parse_delivery(body);
    match (&a, &b) {
        (Ok(x), Ok(y)) => assert_eq!(format!("{x:?}"), format!("{y:?}")),
        (Err(x), Err(y)) => {
            assert_eq!(x.to_string(), y.to_string());
            assert!(!x.to_string().contains('"'), "the error quotes the body: {x}");
        }
        _ => panic!("the same body gave two answers"),
    }
});
