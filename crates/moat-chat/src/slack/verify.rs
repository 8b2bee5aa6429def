//! Slack request signatures (the `v0` scheme): is this HTTP request from Slack?
//!
//! Slack signs every Events API request with the app's signing secret:
//! `X-Slack-Signature: v0=` + hex(HMAC-SHA256(secret, `v0:{timestamp}:{raw body}`)),
//! with the timestamp in `X-Slack-Request-Timestamp`. This module checks that
//! over the raw body exactly as received, compares in constant time (ring's
//! `hmac::verify`) and refuses timestamps more than five minutes from now in
//! either direction, so a captured request cannot be replayed later.
//!
//! It must never put the signing secret, the body or the expected signature
//! into an error, and it must run before anything parses the body.

use http::HeaderMap;
use moat_creds::Secret;
use ring::hmac;

/// Header carrying the request's Unix time in seconds.
pub const TIMESTAMP_HEADER: &str = "x-slack-request-timestamp";
/// Header carrying `v0=<hex HMAC>`.
pub const SIGNATURE_HEADER: &str = "x-slack-signature";
/// A request whose timestamp is further than this from now is refused.
pub const MAX_SKEW_SECS: i64 = 5 * 60;

/// Why a request is not accepted as Slack's. Carries no secret and no body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error(
        "Slack request refused: the {0} header is missing (requests must come from Slack, signed)"
    )]
    MissingHeader(&'static str),
    #[error(
        "Slack request refused: X-Slack-Request-Timestamp is not a Unix time in whole seconds"
    )]
    BadTimestamp,
    #[error("Slack request refused: its timestamp is {skew_secs} s away from this host's clock, outside the {MAX_SKEW_SECS} s window (a replayed request, or the host clock is wrong)")]
    Stale { skew_secs: i64 },
    #[error("Slack request refused: the signature does not match (forged or altered, or SLACK_SIGNING_SECRET is not this Slack app's signing secret)")]
    Mismatch,
}

/// Checks a request against the signing secret. `headers` are the request's
/// headers, `raw_body` its body byte for byte, `now_secs` the current Unix time.
pub fn verify_request(
    signing_secret: &Secret,
    headers: &HeaderMap,
    raw_body: &[u8],
    now_secs: i64,
) -> Result<(), SignatureError> {
    Verifier::new(signing_secret).verify(headers, raw_body, now_secs)
}

/// [`verify_request`] with the key prepared once: for a server that checks
/// many requests with one secret.
#[derive(Clone)]
pub struct Verifier {
    key: hmac::Key,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Verifier(<redacted>)")
    }
}

impl Verifier {
    pub fn new(signing_secret: &Secret) -> Verifier {
        Verifier {
            key: hmac::Key::new(hmac::HMAC_SHA256, signing_secret.expose().as_bytes()),
        }
    }

    /// See [`verify_request`].
    pub fn verify(
        &self,
        headers: &HeaderMap,
        raw_body: &[u8],
        now_secs: i64,
    ) -> Result<(), SignatureError> {
        let ts = headers
            .get(TIMESTAMP_HEADER)
            .ok_or(SignatureError::MissingHeader("X-Slack-Request-Timestamp"))?;
        let sig = headers
            .get(SIGNATURE_HEADER)
            .ok_or(SignatureError::MissingHeader("X-Slack-Signature"))?;
        self.verify_parts(ts.as_bytes(), sig.as_bytes(), raw_body, now_secs)
    }

    /// The check itself, from the two header values as bytes.
    pub fn verify_parts(
        &self,
        timestamp: &[u8],
        signature: &[u8],
        raw_body: &[u8],
        now_secs: i64,
    ) -> Result<(), SignatureError> {
        let ts = parse_timestamp(timestamp)?;
        let skew = now_secs.saturating_sub(ts);
        if skew.saturating_abs() > MAX_SKEW_SECS {
            return Err(SignatureError::Stale { skew_secs: skew });
        }
        let tag = signature
            .strip_prefix(b"v0=")
            .and_then(decode_hex32)
            .ok_or(SignatureError::Mismatch)?;
        let mut msg = Vec::with_capacity(4 + timestamp.len() + raw_body.len());
        msg.extend_from_slice(b"v0:");
        msg.extend_from_slice(timestamp);
        msg.push(b':');
        msg.extend_from_slice(raw_body);
        hmac::verify(&self.key, &msg, &tag).map_err(|_| SignatureError::Mismatch)
    }
}

/// Signs a body as Slack would: the `X-Slack-Signature` value for `timestamp`.
/// For tests and fakes of Slack; the gateway never needs to sign.
pub fn sign(signing_secret: &Secret, timestamp: i64, raw_body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, signing_secret.expose().as_bytes());
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(format!("v0:{timestamp}:").as_bytes());
    ctx.update(raw_body);
    let tag = ctx.sign();
    let mut out = String::with_capacity(67);
    out.push_str("v0=");
    for b in tag.as_ref() {
        out.push(HEX[(b >> 4) as usize] as char);
        out.push(HEX[(b & 15) as usize] as char);
    }
    out
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Decimal digits only (no sign, no spaces), at most 12 of them.
fn parse_timestamp(raw: &[u8]) -> Result<i64, SignatureError> {
    if raw.is_empty() || raw.len() > 12 || !raw.iter().all(u8::is_ascii_digit) {
        return Err(SignatureError::BadTimestamp);
    }
    Ok(raw.iter().fold(0i64, |n, d| n * 10 + i64::from(d - b'0')))
}

fn decode_hex32(hex: &[u8]) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        out[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";
    const NOW: i64 = 1_700_000_000;

    fn headers(ts: &str, sig: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(TIMESTAMP_HEADER, ts.parse().unwrap());
        h.insert(SIGNATURE_HEADER, sig.parse().unwrap());
        h
    }

    fn secret() -> Secret {
        Secret::new(SECRET)
    }

    /// A fixed vector computed independently (`openssl dgst -sha256 -hmac`),
    /// so `sign` and `verify` cannot agree on a wrong construction.
    #[test]
    fn known_vector() {
        let body = b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&command=%2Fweather";
        let sig = sign(&secret(), 1531420618, body);
        assert_eq!(
            sig,
            "v0=6b8b0b4cff7baf56906b6a54056df891b9cc8292bc01770e0e1d6dd9bc623977"
        );
    }

    #[test]
    fn valid_request_passes() {
        let body = br#"{"type":"event_callback","event_id":"Ev1"}"#;
        let sig = sign(&secret(), NOW - 10, body);
        verify_request(
            &secret(),
            &headers(&(NOW - 10).to_string(), &sig),
            body,
            NOW,
        )
        .unwrap();
        // Upper-case hex is the same signature.
        let upper = format!("v0={}", sig[3..].to_ascii_uppercase());
        verify_request(
            &secret(),
            &headers(&(NOW - 10).to_string(), &upper),
            body,
            NOW,
        )
        .unwrap();
    }

    #[test]
    fn forged_and_altered_requests_fail() {
        let body = br#"{"type":"event_callback","event_id":"Ev1"}"#;
        let ts = NOW.to_string();
        let good = sign(&secret(), NOW, body);
        let other = sign(&Secret::new("not-the-secret"), NOW, body);
        let cases: Vec<(String, &[u8])> = vec![
            (other, body),                                    // wrong secret
            (good.clone(), b"{\"type\":\"event_callback\"}"), // altered body
            (good.replace("v0=", "v1="), body),               // wrong version
            (good[..good.len() - 2].to_string(), body),       // truncated
            (format!("{good}00"), body),                      // too long
            ("v0=".to_string() + &"zz".repeat(32), body),     // not hex
            (String::new(), body),                            // empty
        ];
        for (sig, b) in cases {
            let h = headers(&ts, if sig.is_empty() { "x" } else { &sig });
            assert_eq!(
                verify_request(&secret(), &h, b, NOW),
                Err(SignatureError::Mismatch),
                "{sig}"
            );
        }
        // The timestamp is signed too: the same signature with another time fails.
        let h = headers(&(NOW - 1).to_string(), &good);
        assert_eq!(
            verify_request(&secret(), &h, body, NOW),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn stale_and_future_requests_fail() {
        let body = b"{}";
        for (ts, ok) in [
            (NOW - 300, true),
            (NOW + 300, true),
            (NOW - 301, false),
            (NOW + 301, false),
            (0, false),
        ] {
            let h = headers(&ts.to_string(), &sign(&secret(), ts, body));
            let r = verify_request(&secret(), &h, body, NOW);
            if ok {
                r.unwrap();
            } else {
                assert_eq!(
                    r,
                    Err(SignatureError::Stale {
                        skew_secs: NOW - ts
                    })
                );
            }
        }
    }

    #[test]
    fn missing_and_bad_headers() {
        let body = b"{}";
        let sig = sign(&secret(), NOW, body);
        let mut h = HeaderMap::new();
        h.insert(SIGNATURE_HEADER, sig.parse().unwrap());
        assert_eq!(
            verify_request(&secret(), &h, body, NOW),
            Err(SignatureError::MissingHeader("X-Slack-Request-Timestamp"))
        );
        let mut h = HeaderMap::new();
        h.insert(TIMESTAMP_HEADER, NOW.to_string().parse().unwrap());
        assert_eq!(
            verify_request(&secret(), &h, body, NOW),
            Err(SignatureError::MissingHeader("X-Slack-Signature"))
        );
        for ts in [
            "",
            "-5",
            "+1700000000",
            " 1700000000",
            "17e8",
            "9999999999999",
        ] {
            let h = headers(ts, &sig);
            assert_eq!(
                verify_request(&secret(), &h, body, NOW),
                Err(SignatureError::BadTimestamp),
                "{ts:?}"
            );
        }
    }

    #[test]
    fn errors_never_show_secret_or_body() {
        let body = b"very-private-body-text";
        let sig = sign(&secret(), NOW, body);
        let errs = [
            verify_request(&secret(), &headers(&NOW.to_string(), &sig), b"x", NOW),
            verify_request(&secret(), &headers("1", &sig), body, NOW),
            verify_request(&secret(), &headers("x", &sig), body, NOW),
            verify_request(&secret(), &HeaderMap::new(), body, NOW),
        ];
        for e in errs {
            let e = e.unwrap_err();
            for shown in [e.to_string(), format!("{e:?}")] {
                assert!(!shown.contains(SECRET), "{shown}");
                assert!(!shown.contains("very-private"), "{shown}");
                assert!(!shown.contains(&sig[3..]), "{shown}");
            }
        }
        assert!(!format!("{:?}", Verifier::new(&secret())).contains(SECRET));
    }
}
