//! The GitHub door's reading of a push (`git-receive-pack` request body):
//! the ref updates in pkt-lines up to the flush, which decide whether a
//! push touches a protected branch.
//!
//! Beyond "no panic": the door decides only on complete commands (every
//! shorter prefix of what it took reads as "need more bytes", so a push
//! cannot be judged on part of its commands); what it took ends in the
//! flush packet; and every ref it reports is one that a strict pkt-line
//! reader (git's: four hex digits, then the payload) finds in the same
//! bytes, in the same order, and none is missed.

#![no_main]

use libfuzzer_sys::fuzz_target;
use moat_egress::fuzzing::parse_push;

fuzz_target!(|data: &[u8]| {
    let res = parse_push(data);
    // Deterministic, and unchanged by bytes after the commands.
    assert_eq!(res, parse_push(data));
    let Ok(Some((refs, caps, len))) = res else {
        return;
    };
    assert!(len >= 4 && len <= data.len());
    assert_eq!(&data[len - 4..len], b"0000");
    let mut longer = data[..len].to_vec();
    longer.extend_from_slice(b"0032garbage that must not count\n");
    assert_eq!(
        parse_push(&longer),
        Ok(Some((refs.clone(), caps.clone(), len)))
    );
    let step = (len / 64).max(1);
    for cut in (0..len).step_by(step) {
        assert_eq!(
            parse_push(&data[..cut]),
            Ok(None),
            "decided on {cut} of {len} bytes"
        );
    }
    assert_eq!(strict_refs(&data[..len]), Some(refs), "{:?}", &data[..len]);
});

/// The ref names of a command list as git reads pkt-lines.
fn strict_refs(b: &[u8]) -> Option<Vec<String>> {
    let mut refs = Vec::new();
    let mut i = 0;
    loop {
        let hex = b.get(i..i + 4)?;
        if !hex.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        let len = usize::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
        if len == 0 {
            return (i + 4 == b.len()).then_some(refs);
        }
        let line = b.get(i + 4..i.checked_add(len)?)?;
        i += len;
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let cmd = line.split(|c| *c == 0).next()?;
        let cmd = std::str::from_utf8(cmd).ok()?;
        if cmd.starts_with("shallow ") {
            continue;
        }
        let mut parts = cmd.splitn(3, ' ');
        let (_, _, name) = (parts.next()?, parts.next()?, parts.next()?);
        refs.push(name.to_string());
    }
}
