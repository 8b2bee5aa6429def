//! The egress door's request body copy (Content-Length and chunked framing).
//!
//! Beyond "no panic": what the door forwards is exactly a prefix of what the
//! client sent; a body it accepts has exactly the declared length, or is a
//! complete chunked body that a strict RFC 9112 decoder (below, the
//! upstream's view) ends at the same byte, so no pipelined bytes ride along
//! (request smuggling); and copying what was forwarded gives the same bytes.

#![no_main]

#[path = "../common/mod.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use moat_egress::http::{copy_body, Body};

fuzz_target!(|data: &[u8]| {
    let [sel, cap, rest @ ..] = data else {
        return;
    };
    let body = match sel % 4 {
        0 | 1 => Body::Chunked,
        2 => Body::Length(u64::from(sel / 4)),
        _ => Body::None,
    };
    // Small read buffers put the framing across reads.
    let mut r = tokio::io::BufReader::with_capacity(1 + *cap as usize % 32, rest);
    let mut out = Vec::new();
    let res = common::block_on(copy_body(&mut r, &mut out, body));
    assert!(
        rest.starts_with(&out),
        "forwarded bytes the client did not send"
    );
    let Ok(n) = res else {
        return;
    };
    assert_eq!(n as usize, out.len());
    match body {
        Body::None => assert!(out.is_empty()),
        Body::Length(k) => assert_eq!(n, k),
        Body::Chunked => {
            assert_eq!(strict_chunked_len(rest), Some(out.len()), "{rest:?}");
            let mut again = Vec::new();
            let n2 = common::block_on(copy_body(&mut out.as_slice(), &mut again, body));
            assert_eq!(n2.ok(), Some(n));
            assert_eq!(again, out);
        }
    }
});

/// Where a strict decoder ends a chunked body: chunk-size in hex, optional
/// extensions, CRLF, data, CRLF; a zero chunk, trailer fields, CRLF.
fn strict_chunked_len(b: &[u8]) -> Option<usize> {
    let line = |at: usize| -> Option<(&[u8], usize)> {
        let end = b.get(at..)?.windows(2).position(|w| w == b"\r\n")?;
        let l = &b[at..at + end];
        if l.iter()
            .any(|c| (c.is_ascii_control() && *c != b'\t') || *c == b'\n')
        {
            return None;
        }
        Some((l, at + end + 2))
    };
    let mut at = 0;
    loop {
        let (l, next) = line(at)?;
        let size = l.split(|c| *c == b';').next()?;
        if size.is_empty() || !size.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        let size = usize::from_str_radix(std::str::from_utf8(size).ok()?, 16).ok()?;
        at = next;
        if size == 0 {
            loop {
                let (l, next) = line(at)?;
                at = next;
                if l.is_empty() {
                    return Some(at);
                }
                let name = l.iter().take_while(|c| **c != b':').count();
                if name == 0 || name == l.len() {
                    return None;
                }
            }
        }
        let data_end = at.checked_add(size)?;
        if b.get(data_end..data_end + 2)? != b"\r\n" {
            return None;
        }
        at = data_end + 2;
    }
}
