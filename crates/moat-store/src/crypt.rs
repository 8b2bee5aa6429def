//! The store key and the sealed-field envelope: field-level encryption at
//! rest with ChaCha20-Poly1305 (ring), a random 96-bit nonce per value.
//!
//! A sealed value is the text
//! `moat:v1:<key id>:<base64(nonce || ciphertext || tag)>`. The associated
//! data is the envelope's header with the field's name (`table.column`) and
//! its row id, so a sealed value copied into another row or column, or given
//! another key id, does not open. The key id is 8 hex digits of a SHA-256 of
//! the key under a label: it tells keys apart in errors and never helps to
//! guess the key.
//!
//! It owns the format; `sealed.rs` decides which fields are sealed.
//!
//! It must never: put key bytes or a value's plaintext into an error, a log
//! line or a `Debug` output; reuse a nonce (each comes from the system's
//! random source); hand out text from a value whose tag does not verify.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

/// Every sealed value starts with this.
pub const SEALED_PREFIX: &str = "moat:v1:";
/// A plaintext value that itself starts with `moat:` is stored behind this,
/// so that no plaintext can pass for a sealed value.
pub const PLAIN_PREFIX: &str = "moat:p:";
/// The prefix reserved for moat's own markers.
pub const RESERVED_PREFIX: &str = "moat:";

/// The environment variable (or secrets file entry) holding the key.
pub const KEY_VAR: &str = "MOAT_STORE_KEY";

const KEY_LEN: usize = 32;
const TAG_LEN: usize = 16;
const KEY_ID_LABEL: &[u8] = b"moat store key id\0";

/// A key that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not 32 bytes in base64 or hex. Says only the length it saw.
    #[error(
        "{var} must be 32 random bytes written as base64 (44 characters) or hex (64 characters), but it is {len} characters that are neither; generate one with `openssl rand -base64 32`"
    )]
    Format { var: String, len: usize },
    /// The key is empty.
    #[error("{var} is set but empty; generate a key with `openssl rand -base64 32`")]
    Empty { var: String },
}

/// Why a sealed value did not open. Never carries the value or the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptError {
    /// The value starts like an envelope but is not one.
    #[error("the sealed value is malformed ({0})")]
    Malformed(&'static str),
    /// A `moat:` marker this build does not know (a newer moat wrote it?).
    #[error("the value has an unknown marker; a newer moat may have written it")]
    UnknownVersion,
    /// Sealed under another key.
    #[error("the value was sealed under key id {found}, not under the configured key (id {have})")]
    OtherKey { found: String, have: String },
    /// The tag does not verify: changed, moved to another row, or corrupt.
    #[error("the value does not verify (changed, moved from another row or column, or damaged)")]
    Tampered,
    /// The plaintext is not UTF-8 (cannot happen for values moat sealed).
    #[error("the opened value is not UTF-8")]
    NotUtf8,
    /// The system's random source failed.
    #[error("the system random source failed")]
    Random,
}

/// The store key: 32 bytes, with its public key id.
pub struct StoreKey {
    key: LessSafeKey,
    id: String,
}

impl std::fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl StoreKey {
    /// Parses a key as written in `var` (used only to name it in errors):
    /// base64 (standard alphabet, 44 characters with padding) or hex (64
    /// characters), surrounding white space ignored.
    pub fn parse(var: &str, text: &str) -> Result<StoreKey, KeyError> {
        let t = text.trim();
        if t.is_empty() {
            return Err(KeyError::Empty { var: var.into() });
        }
        let bytes: Option<Zeroizing<Vec<u8>>> = if t.len() == 2 * KEY_LEN {
            decode_hex(t)
        } else {
            B64.decode(t).ok().map(Zeroizing::new)
        };
        match bytes {
            Some(b) if b.len() == KEY_LEN => {
                let mut arr = Zeroizing::new([0u8; KEY_LEN]);
                arr.copy_from_slice(&b);
                Ok(StoreKey::from_bytes(&arr))
            }
            _ => Err(KeyError::Format {
                var: var.into(),
                len: t.chars().count(),
            }),
        }
    }

    /// A key from its 32 bytes.
    pub fn from_bytes(bytes: &[u8; KEY_LEN]) -> StoreKey {
        let mut label = Zeroizing::new(KEY_ID_LABEL.to_vec());
        label.extend_from_slice(bytes);
        let digest = ring::digest::digest(&ring::digest::SHA256, &label);
        let id = digest.as_ref()[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        // CHACHA20_POLY1305 takes exactly KEY_LEN bytes, which the type
        // guarantees, so this cannot fail.
        #[allow(clippy::expect_used)]
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, bytes)
            .expect("a 32-byte ChaCha20-Poly1305 key is always accepted");
        StoreKey {
            key: LessSafeKey::new(unbound),
            id,
        }
    }

    /// A fresh random key (tests, and `moat store rekey` helpers).
    pub fn generate() -> Result<StoreKey, CryptError> {
        let mut b = Zeroizing::new([0u8; KEY_LEN]);
        SystemRandom::new()
            .fill(&mut b[..])
            .map_err(|_| CryptError::Random)?;
        Ok(StoreKey::from_bytes(&b))
    }

    /// The key id: 8 hex digits, safe to show.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Seals `plain` as field `field` of row `row`.
    pub fn seal(&self, field: &str, row: i64, plain: &str) -> Result<String, CryptError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| CryptError::Random)?;
        let mut buf = Vec::with_capacity(NONCE_LEN + plain.len() + TAG_LEN);
        buf.extend_from_slice(&nonce);
        buf.extend_from_slice(plain.as_bytes());
        let ad = associated_data(&self.id, field, row);
        let tag = self
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(ad.as_bytes()),
                &mut buf[NONCE_LEN..],
            )
            .map_err(|_| CryptError::Malformed("too long to seal"))?;
        buf.extend_from_slice(tag.as_ref());
        Ok(format!("{SEALED_PREFIX}{}:{}", self.id, B64.encode(&buf)))
    }

    /// Opens a value [`StoreKey::seal`] made for the same field and row.
    pub fn open(&self, field: &str, row: i64, sealed: &str) -> Result<String, CryptError> {
        let (kid, body) = split_envelope(sealed)?;
        if kid != self.id {
            return Err(CryptError::OtherKey {
                found: kid.to_string(),
                have: self.id.clone(),
            });
        }
        let mut raw = B64
            .decode(body)
            .map_err(|_| CryptError::Malformed("the body is not base64"))?;
        if raw.len() < NONCE_LEN + TAG_LEN {
            return Err(CryptError::Malformed("too short"));
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&raw[..NONCE_LEN]);
        let ad = associated_data(&self.id, field, row);
        let plain = self
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(ad.as_bytes()),
                &mut raw[NONCE_LEN..],
            )
            .map_err(|_| CryptError::Tampered)?;
        String::from_utf8(plain.to_vec()).map_err(|_| CryptError::NotUtf8)
    }
}

/// The key id of a sealed value, if it is one.
pub fn key_id_of(value: &str) -> Option<&str> {
    split_envelope(value).ok().map(|(kid, _)| kid)
}

/// Whether `value` is a sealed value (by its prefix).
pub fn is_sealed(value: &str) -> bool {
    value.starts_with(SEALED_PREFIX)
}

fn split_envelope(value: &str) -> Result<(&str, &str), CryptError> {
    let rest = value
        .strip_prefix(SEALED_PREFIX)
        .ok_or(CryptError::Malformed("no moat:v1: prefix"))?;
    let (kid, body) = rest
        .split_once(':')
        .ok_or(CryptError::Malformed("no key id"))?;
    if kid.len() != 8 || !kid.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(CryptError::Malformed("the key id is not 8 hex digits"));
    }
    Ok((kid, body))
}

fn associated_data(kid: &str, field: &str, row: i64) -> String {
    format!("{SEALED_PREFIX}{kid}\0{field}\0{row}")
}

fn decode_hex(t: &str) -> Option<Zeroizing<Vec<u8>>> {
    let b = t.as_bytes();
    let mut out = Zeroizing::new(Vec::with_capacity(b.len() / 2));
    for pair in b.chunks(2) {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (*pair.get(1)? as char).to_digit(16)?;
        out.push((hi * 16 + lo) as u8);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const B64_KEY: &str = "q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA=";

    fn key() -> StoreKey {
        StoreKey::parse(KEY_VAR, B64_KEY).unwrap()
    }

    #[test]
    fn a_sealed_value_opens_to_its_plaintext_and_hides_it() {
        let k = key();
        let plain = "deploy the thing — ünïcode and all";
        let s = k.seal("messages.text", 7, plain).unwrap();
        assert!(s.starts_with(&format!("moat:v1:{}:", k.id())), "{s}");
        assert!(!s.contains("deploy"), "{s}");
        assert_eq!(k.open("messages.text", 7, &s).unwrap(), plain);
        // Fresh nonce each time: the same plaintext seals differently.
        assert_ne!(s, k.seal("messages.text", 7, plain).unwrap());
        assert_eq!(k.open("f", 1, &k.seal("f", 1, "").unwrap()).unwrap(), "");
        assert!(is_sealed(&s));
        assert_eq!(key_id_of(&s), Some(k.id()));
    }

    #[test]
    fn a_changed_byte_anywhere_in_the_body_is_refused() {
        let k = key();
        let s = k.seal("messages.text", 7, "hello there").unwrap();
        let (head, body) = s.rsplit_once(':').unwrap();
        let raw = B64.decode(body).unwrap();
        for i in 0..raw.len() {
            let mut bad = raw.clone();
            bad[i] ^= 0x01;
            let t = format!("{head}:{}", B64.encode(&bad));
            assert_eq!(
                k.open("messages.text", 7, &t),
                Err(CryptError::Tampered),
                "byte {i}"
            );
        }
        // Truncated, not base64, no key id.
        let short = format!("{head}:{}", B64.encode(&raw[..20]));
        assert!(matches!(
            k.open("messages.text", 7, &short),
            Err(CryptError::Malformed(_))
        ));
        assert!(k.open("messages.text", 7, &format!("{head}:@@@")).is_err());
        assert!(k.open("messages.text", 7, "moat:v1:").is_err());
    }

    #[test]
    fn another_row_or_column_or_key_id_does_not_open_it() {
        let k = key();
        let s = k.seal("messages.text", 7, "secret plan").unwrap();
        assert_eq!(k.open("messages.text", 8, &s), Err(CryptError::Tampered));
        assert_eq!(k.open("messages.detail", 7, &s), Err(CryptError::Tampered));
        // A forged key id in the header is both refused and bound into the AD.
        let other = StoreKey::generate().unwrap();
        let forged = s.replacen(k.id(), other.id(), 1);
        assert!(matches!(
            other.open("messages.text", 7, &forged),
            Err(CryptError::Tampered)
        ));
    }

    #[test]
    fn the_wrong_key_is_refused_by_id_and_by_tag() {
        let k = key();
        let s = k.seal("messages.text", 1, "x").unwrap();
        let other = StoreKey::generate().unwrap();
        assert_eq!(
            other.open("messages.text", 1, &s),
            Err(CryptError::OtherKey {
                found: k.id().into(),
                have: other.id().into()
            })
        );
    }

    #[test]
    fn keys_parse_from_base64_or_hex_and_bad_ones_are_named_without_their_text() {
        let hex = "abcdef1234567890abcdef1234567890abcdef1234567890abcdef1234567890";
        let from_b64 = key();
        let from_hex = StoreKey::parse(KEY_VAR, &format!("  {hex}\n")).unwrap();
        assert_eq!(from_b64.id(), from_hex.id(), "the same 32 bytes");
        assert_eq!(from_b64.id().len(), 8);
        for bad in [
            "q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQ", // 24 bytes
            &hex[..62],
            &format!("{}zz", &hex[..62]),
            "not a key at all, just words!",
        ] {
            let e = StoreKey::parse(KEY_VAR, bad).unwrap_err();
            let text = e.to_string();
            assert!(text.contains("MOAT_STORE_KEY") && text.contains("openssl rand -base64 32"));
            assert!(!text.contains(bad), "the key text leaked: {text}");
        }
        assert!(matches!(
            StoreKey::parse(KEY_VAR, " \n"),
            Err(KeyError::Empty { .. })
        ));
        let dbg = format!("{from_b64:?}");
        assert!(!dbg.contains(B64_KEY) && !dbg.contains("q83v"), "{dbg}");
    }
}
