//! Slack request signatures (the v0 scheme) as the gateway checks them.
//!
//! Input: the X-Slack-Request-Timestamp value, a newline, the
//! X-Slack-Signature value, a newline, then the raw body.
//!
//! Beyond "no panic": a request is accepted only if its signature is the
//! HMAC of exactly this timestamp and body under the signing secret and its
//! time is inside the window; a correctly signed request is accepted and
//! one changed byte of body, timestamp or signature is refused; no error
//! message carries the secret or the expected signature.

#![no_main]

use libfuzzer_sys::fuzz_target;
use moat_chat::slack::{sign, SignatureError, Verifier, MAX_SKEW_SECS};
use moat_creds::Secret;

const SECRET: &str = "fuzz-signing-secret-3c9d0e7a41b2";
const NOW: i64 = 1_750_000_000;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |b| *b == b'\n');
    let (Some(ts), Some(sig), body) = (parts.next(), parts.next(), parts.next()) else {
        return;
    };
    let body = body.unwrap_or_default();
    let secret = Secret::new(SECRET);
    let v = Verifier::new(&secret);

    let res = v.verify_parts(ts, sig, body, NOW);
    if let Ok(t) = std::str::from_utf8(ts).map(str::parse::<i64>) {
        if let (Ok(t), Ok(())) = (t, &res) {
            assert!((NOW - t).abs() <= MAX_SKEW_SECS);
            assert!(sign(&secret, t, body).eq_ignore_ascii_case(std::str::from_utf8(sig).unwrap()));
        }
    }
    if res.is_ok() {
        assert!(
            ts.iter().all(u8::is_ascii_digit),
            "accepted timestamp {ts:?}"
        );
    }
    if let Err(e) = &res {
        no_secret_in(e, ts, sig, body);
    }

    // The same body signed properly, now and at the window's edges.
    for t in [NOW, NOW - MAX_SKEW_SECS, NOW + MAX_SKEW_SECS] {
        let good = sign(&secret, t, body);
        let t_text = t.to_string();
        assert_eq!(
            v.verify_parts(t_text.as_bytes(), good.as_bytes(), body, NOW),
            Ok(())
        );
        assert_eq!(
            v.verify_parts(
                t_text.as_bytes(),
                good.to_uppercase().replace("V0=", "v0=").as_bytes(),
                body,
                NOW
            ),
            Ok(())
        );
        // One byte changed anywhere: refused.
        let mut other = body.to_vec();
        match other.first_mut() {
            Some(b) => *b ^= 1,
            None => other.push(b'x'),
        }
        let e = v.verify_parts(t_text.as_bytes(), good.as_bytes(), &other, NOW);
        assert_eq!(e, Err(SignatureError::Mismatch));
        let later = (t + 1).to_string();
        let e = v.verify_parts(later.as_bytes(), good.as_bytes(), body, NOW + 1);
        assert_eq!(e, Err(SignatureError::Mismatch));
        let i = 3 + usize::from(body.first().copied().unwrap_or(0)) % 64;
        let mut bad_sig = good.clone().into_bytes();
        bad_sig[i] = if bad_sig[i] == b'0' { b'1' } else { b'0' };
        let e = v.verify_parts(t_text.as_bytes(), &bad_sig, body, NOW);
        assert_eq!(e, Err(SignatureError::Mismatch));
    }
    // Outside the window: refused before the signature counts.
    let stale = NOW - MAX_SKEW_SECS - 1;
    let e = v.verify_parts(
        stale.to_string().as_bytes(),
        sign(&secret, stale, body).as_bytes(),
        body,
        NOW,
    );
    assert!(matches!(e, Err(SignatureError::Stale { .. })));
});

fn no_secret_in(e: &SignatureError, ts: &[u8], sig: &[u8], body: &[u8]) {
    let text = e.to_string();
    assert!(!text.contains(SECRET));
    let expected = sign(&Secret::new(SECRET), NOW, body);
    assert!(!text.contains(&expected[3..]));
    // Nothing of the body is in it: another body gives the same error.
    let other = Verifier::new(&Secret::new(SECRET)).verify_parts(ts, sig, b"\x00other", NOW);
    assert_eq!(other.map_err(|e| e.to_string()), Err(text));
}
