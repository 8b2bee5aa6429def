//! The LLM door's judgement of a request before anything goes upstream:
//! path and method, and the body's model against an allowlist
//! (`crates/moat-egress/src/llm/judge.rs`, docs/threat-model.md C5).
//!
//! Input: one byte choosing provider, method and whether an allowlist is
//! set, then the path, a newline, the query, a newline, the body.
//!
//! Beyond "no panic": a path the door serves is plain ASCII without
//! percent-encoding, backslashes, semicolons, empty or dot segments; a body
//! it forwards is one JSON object whose top-level keys are all different,
//! so a first-wins and a last-wins parser upstream both read the model the
//! door judged; with an allowlist, that model is on it and no other
//! top-level key or query key can name one.

#![no_main]

use std::fmt;

use bytes::Bytes;
use http::Method;
use libfuzzer_sys::fuzz_target;
use moat_egress::llm::judge::{check_path, judge};
use moat_egress::llm::Provider;
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};

const ALLOWED: &[&str] = &["claude-ok-1", "gpt-ok-1"];

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let mut parts = rest.splitn(3, |b| *b == b'\n');
    let (Some(path), Some(query), Some(body)) = (parts.next(), parts.next(), parts.next()) else {
        return;
    };
    let (Ok(path), Ok(query)) = (std::str::from_utf8(path), std::str::from_utf8(query)) else {
        return;
    };
    let p = if sel & 1 == 0 {
        Provider::Anthropic
    } else {
        Provider::OpenAi
    };
    let method = if sel & 2 == 0 {
        Method::POST
    } else {
        Method::GET
    };
    let allowed: Vec<String> = if sel & 4 == 0 {
        ALLOWED.iter().map(|s| s.to_string()).collect()
    } else {
        Vec::new()
    };
    let query = (sel & 8 == 0).then_some(query);

    if check_path(p, &method, path).is_ok() {
        assert!(path.is_ascii() && path.starts_with("/v1/"));
        assert!(!path.contains(['%', '\\', ';']));
        assert!(path
            .split('/')
            .skip(1)
            .all(|s| !s.is_empty() && s != "." && s != ".."));
    }

    let Ok(j) = judge(
        p,
        &method,
        path,
        query,
        Bytes::copy_from_slice(body),
        &allowed,
    ) else {
        return;
    };
    if method == Method::GET {
        assert!(body.is_empty() && j.model.is_none());
        return;
    }
    // The upstream's two possible readings of the forwarded body.
    let keys = top_level_keys(&j.body).expect("the forwarded body is a JSON object");
    let mut sorted = keys.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), keys.len(), "a key twice: {keys:?}");
    let last_wins: serde_json::Value = serde_json::from_slice(&j.body).unwrap();
    assert_eq!(
        last_wins.get("model").and_then(|m| m.as_str()),
        j.model.as_deref()
    );
    if !allowed.is_empty() {
        let m = j.model.as_deref().expect("a judged call names its model");
        assert!(ALLOWED.contains(&m), "{m:?} passed the allowlist");
        for k in &keys {
            let k = k.to_ascii_lowercase();
            assert!(
                k == "model"
                    || !["model_id", "engine", "deployment", "deployment_id"].contains(&k.as_str())
            );
        }
    }
});

/// The top-level keys of a JSON object in document order, duplicates kept
/// (what a first-wins parser would see).
fn top_level_keys(b: &[u8]) -> Option<Vec<String>> {
    struct Keys;
    impl<'de> Visitor<'de> for Keys {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Vec<String>, A::Error> {
            let mut out = Vec::new();
            while let Some(k) = m.next_key::<String>()? {
                m.next_value::<IgnoredAny>()?;
                out.push(k);
            }
            Ok(out)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(b);
    de.deserialize_map(Keys).ok()
}
