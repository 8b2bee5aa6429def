//! Keeps the real keys out of what an upstream sends back: a key that an
//! upstream echoes (in a header, a body, an error message, split across the
//! frames of a stream) reaches the sandbox as the sandbox's own placeholder.
//!
//! Must never: let a whole key through, or hold back bytes that cannot be the
//! start of a key (a stream must not stall waiting for the next frame).

use http::{HeaderMap, HeaderValue};

/// The real keys and what each becomes.
#[derive(Clone, Default)]
pub struct Keys(Vec<(Vec<u8>, Vec<u8>)>);

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keys(<{} redacted>)", self.0.len())
    }
}

impl Keys {
    /// `pairs`: (real key, what to show instead); empty keys are skipped.
    pub fn new(pairs: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>) -> Keys {
        Keys(pairs.into_iter().filter(|(k, _)| !k.is_empty()).collect())
    }

    /// `data` with every key replaced.
    pub fn replace_all(&self, data: &[u8]) -> Vec<u8> {
        let mut out = data.to_vec();
        for (key, with) in &self.0 {
            out = replace(&out, key, with);
        }
        out
    }

    /// Replaces keys in header values; a value that no longer makes a valid
    /// header is dropped.
    pub fn headers(&self, h: &mut HeaderMap) {
        let mut names: Vec<_> = h
            .iter()
            .filter(|(_, v)| self.replace_all(v.as_bytes()) != v.as_bytes())
            .map(|(n, _)| n.clone())
            .collect();
        names.dedup();
        for name in names {
            let values: Vec<Vec<u8>> = h
                .get_all(&name)
                .iter()
                .map(|v| self.replace_all(v.as_bytes()))
                .collect();
            h.remove(&name);
            for v in values {
                if let Ok(v) = HeaderValue::from_bytes(&v) {
                    h.append(name.clone(), v);
                }
            }
        }
    }

    /// The longest end of `data` that could be the start of a key.
    fn partial_tail(&self, data: &[u8]) -> usize {
        let mut best = 0;
        for (key, _) in &self.0 {
            let max = (key.len() - 1).min(data.len());
            for n in (best + 1..=max).rev() {
                if data[data.len() - n..] == key[..n] {
                    best = n;
                    break;
                }
            }
        }
        best
    }
}

fn replace(data: &[u8], key: &[u8], with: &[u8]) -> Vec<u8> {
    let finder = memchr::memmem::Finder::new(key);
    let mut out = Vec::with_capacity(data.len());
    let mut at = 0;
    while let Some(i) = finder.find(&data[at..]) {
        out.extend_from_slice(&data[at..at + i]);
        out.extend_from_slice(with);
        at += i + key.len();
    }
    out.extend_from_slice(&data[at..]);
    out
}

/// Redacts a stream: bytes that could be the start of a key split across
/// frames wait for the next frame; everything else passes at once.
#[derive(Debug, Default)]
pub struct Redactor {
    keys: Keys,
    held: Vec<u8>,
}

impl Redactor {
    pub fn new(keys: Keys) -> Redactor {
        Redactor {
            keys,
            held: Vec::new(),
        }
    }

    /// What may pass now of `chunk` (and of what was held before it).
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        let mut buf = std::mem::take(&mut self.held);
        buf.extend_from_slice(chunk);
        let mut out = self.keys.replace_all(&buf);
        let hold = self.keys.partial_tail(&out);
        self.held = out.split_off(out.len() - hold);
        out
    }

    /// The rest, at the end of the stream.
    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Keys {
        Keys::new([(b"sk-REAL-0123456789".to_vec(), b"sk-moat-ph".to_vec())])
    }

    #[test]
    fn a_key_split_anywhere_never_passes() {
        let text = b"data: {\"echo\":\"sk-REAL-0123456789\"}\n\nsk-REAL-0123456789";
        for a in 0..text.len() {
            for b in a..text.len() {
                let mut r = Redactor::new(keys());
                let mut out = r.push(&text[..a]);
                out.extend(r.push(&text[a..b]));
                out.extend(r.push(&text[b..]));
                out.extend(r.finish());
                let s = String::from_utf8(out).unwrap();
                assert_eq!(
                    s, "data: {\"echo\":\"sk-moat-ph\"}\n\nsk-moat-ph",
                    "split at {a}/{b}"
                );
            }
        }
    }

    #[test]
    fn only_a_possible_key_start_is_held() {
        let mut r = Redactor::new(keys());
        assert_eq!(r.push(b"data: x\n\n"), b"data: x\n\n");
        assert_eq!(r.push(b"abc sk-RE"), b"abc ");
        assert_eq!(r.push(b"X"), b"sk-REX");
        assert_eq!(r.finish(), b"");
    }

    #[test]
    fn header_values_are_redacted() {
        let mut h = HeaderMap::new();
        h.append(
            "x-echo",
            HeaderValue::from_static("Bearer sk-REAL-0123456789"),
        );
        h.append("x-echo", HeaderValue::from_static("fine"));
        h.insert("x-other", HeaderValue::from_static("fine"));
        keys().headers(&mut h);
        let vals: Vec<_> = h.get_all("x-echo").iter().collect();
        assert_eq!(vals, ["Bearer sk-moat-ph", "fine"]);
        assert_eq!(h["x-other"], "fine");
    }
}
