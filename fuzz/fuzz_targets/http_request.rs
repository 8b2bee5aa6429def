//! The egress door's HTTP/1 request head: read with its size limit, parsed
//! and checked for smuggling, CONNECT and absolute-form targets, Host
//! matching, and the head rewritten for the upstream.
//!
//! Beyond "no panic": a head the door accepts has one meaning (body framing
//! agrees with its headers, no control characters, one Host); the head it
//! sends upstream parses back to the same request (same method, framing and
//! end-to-end fields, nothing hop-by-hop but `Connection: close`); and the
//! authority and absolute-URL parsers round-trip.

#![no_main]

#[path = "../common/mod.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use moat_egress::http::{self, Body, Head};

fuzz_target!(|data: &[u8]| {
    // As the door reads a connection: the head through its limit.
    let mut reader = tokio::io::BufReader::new(data);
    if let Ok(raw) = common::block_on(http::read_head(&mut reader)) {
        assert!(raw.len() <= http::MAX_HEAD);
        assert!(raw.ends_with(b"\n"));
        // The bytes read are the input's, after nothing but empty lines.
        let start = data
            .windows(raw.len())
            .position(|w| w == raw.as_slice())
            .expect("the head is the input's bytes");
        assert!(data[..start]
            .split_inclusive(|b| *b == b'\n')
            .all(|l| l == b"\n" || l == b"\r\n"));
        check(&raw);
    }
    check(data);
});

fn headers<'a>(head: &'a Head, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
    head.headers
        .iter()
        .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_slice())
}

fn check(raw: &[u8]) {
    let Ok(head) = http::parse_head(raw) else {
        return;
    };
    assert!(!head
        .target
        .bytes()
        .any(|b| b.is_ascii_control() || b == b' '));
    assert!(headers(&head, "host").count() <= 1);
    for (_, v) in &head.headers {
        assert!(!v.iter().any(|b| matches!(b, b'\r' | b'\n' | 0)));
    }
    let te = headers(&head, "transfer-encoding").count();
    let cl: Vec<&[u8]> = headers(&head, "content-length").collect();
    match head.body {
        Body::None => assert!(te == 0 && cl.is_empty()),
        Body::Chunked => assert!(te == 1 && cl.is_empty()),
        Body::Length(n) => {
            assert_eq!(te, 0);
            for v in cl {
                assert_eq!(
                    std::str::from_utf8(v).ok().and_then(|s| s.parse().ok()),
                    Some(n)
                );
            }
        }
    }

    if head.method.eq_ignore_ascii_case("CONNECT") {
        if let Some((host, port)) = http::split_authority(&head.target, 443) {
            authority_round_trips(&host, port);
        }
    }
    let path = match http::parse_absolute(&head.target) {
        Ok(t) => {
            assert!(t.path.starts_with('/'));
            assert!(!t.host.contains(['/', '?', '@']));
            authority_round_trips(&t.host, t.port);
            let again = http::parse_absolute(&format!("http://{}:{}{}", t.host, t.port, t.path));
            assert_eq!(again.as_ref(), Ok(&t));
            t.path
        }
        Err(r) => {
            assert_eq!(r.status, 400);
            "/".to_string()
        }
    };

    // What goes upstream is the same request, and only it.
    let up = http::upstream_head(&head, &path);
    let again = match http::parse_head(&up) {
        Ok(h) => h,
        // A head of exactly the most fields the door takes, none of them
        // hop-by-hop, goes up with one more (`Connection: close`): more
        // than the door itself would accept, not more than upstreams do.
        Err(r) if r.status == 431 => {
            assert_eq!(head.headers.len(), http::MAX_HEADERS);
            return;
        }
        Err(r) => panic!("the door's upstream head does not parse: {r:?}"),
    };
    assert_eq!(again.method, head.method);
    assert_eq!(again.target, path);
    assert_eq!(again.body, head.body, "upstream framing differs: {up:?}");
    assert_eq!(
        headers(&again, "host").collect::<Vec<_>>(),
        headers(&head, "host").collect::<Vec<_>>()
    );
    let connection: Vec<&[u8]> = headers(&again, "connection").collect();
    assert_eq!(connection, [b"close".as_slice()]);
    for (n, _) in &again.headers {
        let n = n.to_ascii_lowercase();
        assert!(!n.starts_with("proxy-"));
        assert!(!["keep-alive", "te", "trailer", "upgrade"].contains(&n.as_str()));
    }
    // Every field sent upstream was the client's (or the door's one `Connection`).
    let mut original = head.headers.iter();
    for f in again
        .headers
        .iter()
        .filter(|(n, _)| !n.eq_ignore_ascii_case("connection"))
    {
        assert!(original.any(|o| o == f), "field {f:?} was not the client's");
    }
}

fn authority_round_trips(host: &str, port: u16) {
    assert!(!host.is_empty() && !host.contains('@'));
    let written = format!("{host}:{port}");
    assert_eq!(
        http::split_authority(&written, 1),
        Some((host.to_string(), port))
    );
    if host.trim() == host {
        assert!(http::host_header_matches(written.as_bytes(), host, port, 1));
    }
}
