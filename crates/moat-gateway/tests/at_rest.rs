//! Encryption at rest end to end: a gateway given MOAT_STORE_KEY answers a
//! web chat message as usual, and the message's text is nowhere in the database files (WAL included), while
//! running or after it stopped. The same run without a key is the control:
//! there the text is in the files, so the search can see it.

mod gwkit;

use std::path::Path;

use gwkit::*;

const OPEN: &str = "users = [\"*\"]\ndebounce = \"0ms\"";

/// 32 random bytes in hex, as `openssl rand -hex 32` writes them.
fn random_key() -> String {
    random_hex(32)
}

/// Which database files (moat.db, -wal, -shm) contain `needle`.
fn files_holding(data: &Path, needle: &str) -> Vec<String> {
    let mut hits = Vec::new();
    let mut seen = 0;
    for name in ["moat.db", "moat.db-wal", "moat.db-shm"] {
        let Ok(bytes) = std::fs::read(data.join(name)) else {
            continue;
        };
        seen += 1;
        if bytes.windows(needle.len()).any(|w| w == needle.as_bytes()) {
            hits.push(name.to_string());
        }
    }
    assert!(seen > 0, "no database files under {}", data.display());
    hits
}

/// Sends `echo MARKER` on the web chat (the agent reads it from the store),
/// waits for the answer, and returns the marker with the database files
/// holding it while the gateway ran and after it stopped.
fn round_trip(name: &str, secrets: Vec<(String, String)>) -> (String, Vec<String>, Vec<String>) {
    let gw = Gw::start_with(name, &web_config(1, "", OPEN), secrets);
    let c = gw.client(None);
    let m = format!("atrest{}", random_hex(10));
    let r = c.post("t", &format!("echo {m}"));
    assert_eq!(r.status, 202, "{r:?}");
    let mut sse = c.events("t").expect("events");
    let evs = sse.answers(1);
    assert_eq!(answers_of(&evs), vec![(format!("{m}\n"), true)], "{evs:#?}");
    drop(sse);
    let running = files_holding(&gw.data, &m);
    let data = gw.data.clone();
    gw.stop();
    let stopped = files_holding(&data, &m);
    (m, running, stopped)
}

#[test]
fn a_web_message_with_a_store_key_is_answered_and_never_stored_in_clear() {
    let (_, running, stopped) = round_trip("at-rest-plain", Vec::new());
    assert!(
        !running.is_empty() || !stopped.is_empty(),
        "the control failed: without a key the text should be in the files"
    );
    let (m, running, stopped) =
        round_trip("at-rest-key", vec![("MOAT_STORE_KEY".into(), random_key())]);
    assert!(running.is_empty(), "{m} in {running:?} while running");
    assert!(stopped.is_empty(), "{m} in {stopped:?} after stopping");
}

#[test]
fn a_malformed_store_key_stops_the_gateway_naming_it_without_its_text() {
    let bad = "thisisnotakey-butlooks-secret-1234567890";
    let err = Gw::try_start_with(
        "at-rest-bad-key",
        &web_config(1, "", OPEN),
        vec![("MOAT_STORE_KEY".into(), bad.into())],
    )
    .err()
    .expect("a malformed key is refused");
    assert!(err.contains("MOAT_STORE_KEY"), "{err}");
    assert!(err.contains("openssl rand -base64 32"), "{err}");
    for w in bad.as_bytes().windows(6) {
        let w = std::str::from_utf8(w).unwrap();
        assert!(!err.contains(w), "key text {w:?} in: {err}");
    }
}
