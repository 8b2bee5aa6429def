//! Reads a TLS ClientHello far enough to learn the server name it asks for.
//!
//! Owns nothing but parsing; every length is checked before it is used, and the
//! bytes read are returned so the door can forward them unchanged. Never
//! decrypts or alters anything.

use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest ClientHello the door accepts (several records are allowed).
pub const MAX_HELLO: usize = 64 * 1024;

#[derive(Debug, PartialEq, Eq)]
pub enum Hello {
    /// A ClientHello; `sni` is the host_name entry of server_name, if any.
    Tls { sni: Option<String> },
    /// A ClientHello that names its server more than one way (two entries in
    /// server_name, or two server_name extensions): a server may route by a
    /// name the door did not check (docs/threat-model.md N7), so it is never forwarded.
    Ambiguous(&'static str),
    /// The first bytes are not a TLS handshake record.
    NotTls,
}

/// Reads the first TLS records from `r` until the whole ClientHello handshake
/// message is in; returns what it says and every byte read.
pub async fn read_client_hello<R: AsyncRead + Unpin>(
    r: &mut R,
) -> std::io::Result<(Hello, Vec<u8>)> {
    let mut raw = Vec::new();
    let mut handshake = Vec::new();
    loop {
        let mut header = [0u8; 5];
        r.read_exact(&mut header).await?;
        raw.extend_from_slice(&header);
        if header[0] != 0x16 || header[1] != 0x03 {
            return Ok((Hello::NotTls, raw));
        }
        let len = u16::from_be_bytes([header[3], header[4]]) as usize;
        if len == 0 || raw.len() + len > MAX_HELLO {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "TLS record too large",
            ));
        }
        let start = raw.len();
        raw.resize(start + len, 0);
        r.read_exact(&mut raw[start..]).await?;
        handshake.extend_from_slice(&raw[start..]);
        if handshake.len() >= 4 {
            if handshake[0] != 1 {
                return Ok((Hello::Tls { sni: None }, raw));
            }
            let body = u32::from_be_bytes([0, handshake[1], handshake[2], handshake[3]]) as usize;
            if body + 4 > MAX_HELLO {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "ClientHello too large",
                ));
            }
            if handshake.len() >= body + 4 {
                return Ok(match parse_sni(&handshake[4..body + 4]) {
                    Ok(sni) => (Hello::Tls { sni }, raw),
                    Err(why) => (Hello::Ambiguous(why), raw),
                });
            }
        }
    }
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| b[0] as usize)
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
    }
}

/// The host_name of the server_name extension of a ClientHello body:
/// `Ok(None)` when there is none or the body is malformed (the caller then
/// refuses a hello that had to name a host), `Err` when the hello names its
/// server more than once (two list entries, two extensions).
pub fn parse_sni(body: &[u8]) -> Result<Option<String>, &'static str> {
    Ok(walk_extensions(body)?.flatten())
}

/// `None`: malformed; `Some(None)`: no server_name; `Some(Some(name))`.
fn walk_extensions(body: &[u8]) -> Result<Option<Option<String>>, &'static str> {
    let mut c = Cursor(body);
    let parsed = (|| {
        c.take(2 + 32)?; // legacy_version, random
        let sid = c.u8()?;
        c.take(sid)?;
        let suites = c.u16()?;
        c.take(suites)?;
        let comp = c.u8()?;
        c.take(comp)?;
        let ext_len = c.u16()?;
        c.take(ext_len)
    })();
    let Some(ext_block) = parsed else {
        return Ok(None);
    };
    let mut exts = Cursor(ext_block);
    let mut found: Option<Option<String>> = None;
    while !exts.0.is_empty() {
        let (Some(kind), Some(len)) = (exts.u16(), exts.u16()) else {
            return Ok(None);
        };
        let Some(data) = exts.take(len) else {
            return Ok(None);
        };
        if kind != 0 {
            continue;
        }
        if found.is_some() {
            return Err("two server_name extensions");
        }
        found = Some(server_name(data)?);
    }
    Ok(Some(found.flatten()))
}

/// The one host_name entry of a server_name extension (`None`: malformed,
/// or an entry of another name type).
fn server_name(data: &[u8]) -> Result<Option<String>, &'static str> {
    let mut list = Cursor(data);
    let Some(list_len) = list.u16() else {
        return Ok(None);
    };
    let Some(entries) = list.take(list_len).filter(|_| list.0.is_empty()) else {
        return Ok(None);
    };
    let mut names = Cursor(entries);
    let mut first: Option<(usize, &[u8])> = None;
    while !names.0.is_empty() {
        let (Some(name_type), Some(n)) = (names.u8(), names.u16()) else {
            return Ok(None);
        };
        let Some(name) = names.take(n) else {
            return Ok(None);
        };
        if first.is_some() {
            return Err("more than one name in server_name");
        }
        first = Some((name_type, name));
    }
    Ok(match first {
        Some((0, name)) => std::str::from_utf8(name).ok().map(str::to_string),
        _ => None,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal ClientHello record naming `sni` (or none).
    pub fn client_hello(sni: Option<&str>) -> Vec<u8> {
        client_hello_with(sni.map(|n| vec![n]).unwrap_or_default().as_slice(), 1)
    }

    /// A ClientHello whose server_name lists `names`, in `copies` extensions.
    pub fn client_hello_with(names: &[&str], copies: usize) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7u8; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one suite
        body.extend_from_slice(&[1, 0]); // null compression
        let mut exts = Vec::new();
        if !names.is_empty() {
            let mut entries = Vec::new();
            for name in names {
                let n = name.as_bytes();
                entries.push(0);
                entries.extend_from_slice(&(n.len() as u16).to_be_bytes());
                entries.extend_from_slice(n);
            }
            let mut sn = (entries.len() as u16).to_be_bytes().to_vec();
            sn.extend_from_slice(&entries);
            for _ in 0..copies {
                exts.extend_from_slice(&[0, 0]);
                exts.extend_from_slice(&(sn.len() as u16).to_be_bytes());
                exts.extend_from_slice(&sn);
            }
        }
        exts.extend_from_slice(&[0, 43, 0, 3, 2, 3, 4]); // supported_versions
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut hs = vec![1];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut rec = vec![0x16, 0x03, 0x01];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    #[tokio::test]
    async fn sni_is_found() {
        let rec = client_hello(Some("api.github.com"));
        let (h, raw) = read_client_hello(&mut rec.as_slice()).await.unwrap();
        assert_eq!(
            h,
            Hello::Tls {
                sni: Some("api.github.com".into())
            }
        );
        assert_eq!(raw, rec);
    }

    #[tokio::test]
    async fn no_sni_and_not_tls_are_told_apart() {
        let rec = client_hello(None);
        assert_eq!(
            read_client_hello(&mut rec.as_slice()).await.unwrap().0,
            Hello::Tls { sni: None }
        );
        let http = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        assert_eq!(
            read_client_hello(&mut http.as_slice()).await.unwrap().0,
            Hello::NotTls
        );
    }

    #[tokio::test]
    async fn hellos_split_over_records_are_joined() {
        let rec = client_hello(Some("split.test"));
        let hs = &rec[5..];
        let (a, b) = hs.split_at(10);
        let mut two = Vec::new();
        for part in [a, b] {
            two.extend_from_slice(&[0x16, 0x03, 0x01]);
            two.extend_from_slice(&(part.len() as u16).to_be_bytes());
            two.extend_from_slice(part);
        }
        let (h, raw) = read_client_hello(&mut two.as_slice()).await.unwrap();
        assert_eq!(
            h,
            Hello::Tls {
                sni: Some("split.test".into())
            }
        );
        assert_eq!(raw, two);
    }

    #[test]
    fn truncated_or_lying_lengths_give_none() {
        const NAME: &str = "api.github.com";
        let rec = client_hello(Some(NAME));
        let body = &rec[9..];
        assert_eq!(parse_sni(body), Ok(Some(NAME.into())));
        for cut in 0..body.len() {
            assert_eq!(parse_sni(&body[..cut]), Ok(None), "cut at {cut}");
        }
        // Every byte set to 0 and to 0xff, each result predicted from the
        // layout client_hello_with writes (offsets into the body):
        // 0..34 version+random, 34 session id length, 35..37 suites length,
        // 37..39 the suite, 39 compression length, 40 compression, 41..43
        // extensions length, 43..45 server_name type, 45..47 its length,
        // 47..49 list length, 49 name type, 50..52 name length, 52..66 the
        // name, 66..68 supported_versions type, 68..70 its length, 70..73 data.
        assert_eq!(body.len(), 73, "the layout below no longer matches");
        let same = || Ok(Some(NAME.to_string()));
        let none = || Ok(None);
        let expected = |at: usize, v: u8| -> Result<Option<String>, &'static str> {
            match (at, v) {
                (52..=65, 0x00) => {
                    let mut n = NAME.as_bytes().to_vec();
                    n[at - 52] = 0;
                    Ok(Some(String::from_utf8(n).expect("NUL is UTF-8")))
                }
                (52..=65, _) => none(), // 0xff is not UTF-8
                // Bytes the parser does not read, or writes of the value already there.
                (0..=33 | 37 | 38 | 40 | 70..=72, _) => same(),
                (34 | 35 | 41 | 43 | 44 | 45 | 47 | 49 | 50 | 66 | 68, 0x00) => same(),
                // Another extension type where neither is server_name.
                (66 | 67, 0xff) => same(),
                // supported_versions turned into a second server_name.
                (67, 0x00) => Err("two server_name extensions"),
                // Everything else is a length or type that now lies.
                _ => none(),
            }
        };
        for at in 0..body.len() {
            for v in [0x00u8, 0xff] {
                let mut bad = body.to_vec();
                bad[at] = v;
                assert_eq!(parse_sni(&bad), expected(at, v), "byte {at} = {v:#x}");
            }
        }
        let mut bad = body.to_vec();
        let n = bad.len();
        bad[n - 10] = 0xff; // the extensions' lengths no longer add up
        assert_eq!(parse_sni(&bad), Ok(None));
    }

    #[tokio::test]
    async fn a_hello_naming_two_servers_is_ambiguous() {
        for (names, copies, why) in [
            (
                &["front.test", "other.test"][..],
                1,
                "more than one name in server_name",
            ),
            (&["front.test", "front.test"][..], 1, "more than one name"),
            (&["front.test"][..], 2, "two server_name extensions"),
        ] {
            let rec = client_hello_with(names, copies);
            let (h, raw) = read_client_hello(&mut rec.as_slice()).await.unwrap();
            assert_eq!(raw, rec);
            match h {
                Hello::Ambiguous(r) => assert!(r.contains(why), "{names:?}: {r}"),
                other => panic!("{names:?} x{copies}: {other:?}"),
            }
        }
        let one = client_hello_with(&["front.test"], 1);
        assert_eq!(
            read_client_hello(&mut one.as_slice()).await.unwrap().0,
            Hello::Tls {
                sni: Some("front.test".into())
            }
        );
    }
}
