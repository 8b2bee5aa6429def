//! The LLM door's view of a streamed (SSE) answer: the usage meter, the
//! removal of the usage-only chunk the door asked for, and the redaction of
//! echoed keys, fed the stream in frames the input chooses.
//!
//! Input: one byte giving how many of the next bytes choose frame cuts,
//! those bytes, then the stream.
//!
//! Beyond "no panic": how the stream is cut into frames changes nothing
//! (usage, completeness, what the client gets); a usage total is computed
//! without overflow; only whole usage-only lines are taken out, nothing else
//! is changed or reordered; and no real key reaches the client, whole or
//! split across frames, while everything else passes unchanged.

#![no_main]

#[path = "../common/mod.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use moat_egress::fuzzing::{sse_usage, strip_usage_chunk};
use moat_egress::llm::redact::{Keys, Redactor};

/// Real keys as an upstream might echo them, and what the client sees
/// instead. Two share a prefix, one overlaps itself.
const KEYS: &[(&[u8], &[u8])] = &[
    (b"sk-ant-api03-Qk7Q", b"[K1]"),
    (b"sk-proj-Zz9", b"[K2]"),
    (b"xyxyxz", b"[K3]"),
];

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = (n as usize % 16).min(rest.len());
    let (seed, stream) = rest.split_at(n);
    let pieces: Vec<&[u8]> = common::split_by_seed(seed, stream)
        .into_iter()
        .map(|r| &stream[r])
        .collect();

    let (usage, complete) = sse_usage([stream]);
    assert_eq!(sse_usage(pieces.iter().copied()), (usage.clone(), complete));
    let _ = usage.total();

    let stripped = strip_usage_chunk([stream]);
    assert_eq!(strip_usage_chunk(pieces.iter().copied()), stripped);
    let mut out = stripped.as_slice();
    for line in stream.split_inclusive(|b| *b == b'\n') {
        match out.strip_prefix(line) {
            Some(after) => out = after,
            None => assert!(
                usage_only(line),
                "removed a line that is not the usage chunk: {line:?}"
            ),
        }
    }
    assert!(
        out.is_empty(),
        "the client got bytes the upstream did not send"
    );

    let keys = Keys::new(KEYS.iter().map(|(k, v)| (k.to_vec(), v.to_vec())));
    let mut r = Redactor::new(keys.clone());
    let mut got = Vec::new();
    for p in &pieces {
        got.extend(r.push(p));
    }
    got.extend(r.finish());
    for (k, _) in KEYS {
        assert!(
            !got.windows(k.len()).any(|w| w == *k),
            "key {k:?} reached the client"
        );
    }
    assert_eq!(got, keys.replace_all(stream));
});

fn usage_only(line: &[u8]) -> bool {
    let l = line.strip_suffix(b"\n").unwrap_or(line);
    let l = l.strip_suffix(b"\r").unwrap_or(l);
    l.strip_prefix(b"data:")
        .and_then(|d| serde_json::from_slice::<serde_json::Value>(d).ok())
        .is_some_and(|v| {
            v.get("choices")
                .and_then(|c| c.as_array())
                .is_some_and(|c| c.is_empty())
                && v.get("usage").is_some_and(|u| u.is_object())
        })
}
