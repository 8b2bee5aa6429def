//! The egress door's TLS ClientHello reader (the SNI behind docs/threat-model.md N7).
//!
//! Beyond "no panic": the bytes the reader returns (forwarded unchanged) are
//! the input's first bytes and within the size limit; a server name it
//! reports occurs in those bytes; the name the door judges after
//! normalization is a well-formed DNS name; and a ClientHello built here
//! around any name (or two names) reads back as that name (or as ambiguous).

#![no_main]

#[path = "../common/mod.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use moat_egress::tls::{self, Hello};
use moat_policy::network::normalize_name;

fuzz_target!(|data: &[u8]| {
    // As read off a tunnel.
    if let Ok((hello, raw)) = common::block_on(tls::read_client_hello(&mut &data[..])) {
        assert!(data.starts_with(&raw));
        assert!(raw.len() <= tls::MAX_HELLO);
        if let Hello::Tls { sni: Some(name) } = &hello {
            assert!(raw.windows(name.len().max(1)).any(|w| w == name.as_bytes()));
            judged_name_is_dns(name);
        }
    }
    // As a handshake body.
    if let Ok(Some(name)) = tls::parse_sni(data) {
        judged_name_is_dns(&name);
        round_trip(&name);
    }
    // The input as a server name.
    if let Ok(name) = std::str::from_utf8(data) {
        if name.len() < 2048 {
            round_trip(name);
        }
    }
});

fn judged_name_is_dns(name: &str) {
    let Some(n) = normalize_name(name) else {
        return;
    };
    assert!(!n.is_empty() && n.len() <= 253, "{n:?}");
    for label in n.split('.') {
        assert!((1..=63).contains(&label.len()), "{n:?}");
        assert!(label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'));
        assert!(!label.starts_with('-') && !label.ends_with('-'));
    }
}

fn round_trip(name: &str) {
    let body = hello_body(&[name.as_bytes()]);
    assert_eq!(tls::parse_sni(&body), Ok(Some(name.to_string())));
    let rec = record(&body);
    let (hello, raw) = common::block_on(tls::read_client_hello(&mut rec.as_slice())).unwrap();
    assert_eq!(
        hello,
        Hello::Tls {
            sni: Some(name.to_string())
        }
    );
    assert_eq!(raw, rec);
    // The same name twice, or next to another: never one answer.
    let two = hello_body(&[name.as_bytes(), b"allowed.test"]);
    assert!(tls::parse_sni(&two).is_err());
}

/// A ClientHello body with a server_name extension listing `names`.
fn hello_body(names: &[&[u8]]) -> Vec<u8> {
    let mut list = Vec::new();
    for n in names {
        list.push(0u8);
        list.extend_from_slice(&(n.len() as u16).to_be_bytes());
        list.extend_from_slice(n);
    }
    let mut ext = (list.len() as u16).to_be_bytes().to_vec();
    ext.extend_from_slice(&list);
    let mut exts = vec![0u8, 0];
    exts.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    exts.extend_from_slice(&ext);
    // A second, unrelated extension after it (supported_versions).
    exts.extend_from_slice(&[0, 0x2b, 0, 3, 2, 3, 4]);
    let mut b = vec![3, 3];
    b.extend_from_slice(&[7u8; 32]);
    b.push(0); // session id
    b.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
    b.extend_from_slice(&[1, 0]); // null compression
    b.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    b.extend_from_slice(&exts);
    b
}

/// The body as a handshake message in TLS records of at most 16 KiB.
fn record(body: &[u8]) -> Vec<u8> {
    let mut hs = vec![1u8];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(body);
    let mut out = Vec::new();
    for part in hs.chunks(16 * 1024) {
        out.extend_from_slice(&[0x16, 3, 1]);
        out.extend_from_slice(&(part.len() as u16).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}
