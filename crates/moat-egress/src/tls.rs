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
                let sni = parse_sni(&handshake[4..body + 4]);
                return Ok((Hello::Tls { sni }, raw));
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

/// The host_name of the server_name extension of a ClientHello body.
pub fn parse_sni(body: &[u8]) -> Option<String> {
    let mut c = Cursor(body);
    c.take(2 + 32)?; // legacy_version, random
    let sid = c.u8()?;
    c.take(sid)?;
    let suites = c.u16()?;
    c.take(suites)?;
    let comp = c.u8()?;
    c.take(comp)?;
    let ext_len = c.u16()?;
    let mut exts = Cursor(c.take(ext_len)?);
    while !exts.0.is_empty() {
        let kind = exts.u16()?;
        let len = exts.u16()?;
        let data = exts.take(len)?;
        if kind != 0 {
            continue;
        }
        let mut list = Cursor(data);
        let list_len = list.u16()?;
        let mut names = Cursor(list.take(list_len)?);
        while !names.0.is_empty() {
            let name_type = names.u8()?;
            let n = names.u16()?;
            let name = names.take(n)?;
            if name_type == 0 {
                return std::str::from_utf8(name).ok().map(str::to_string);
            }
        }
        return None;
    }
    None
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal ClientHello record naming `sni` (or none).
    pub fn client_hello(sni: Option<&str>) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7u8; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one suite
        body.extend_from_slice(&[1, 0]); // null compression
        let mut exts = Vec::new();
        if let Some(name) = sni {
            let n = name.as_bytes();
            let mut sn = Vec::new();
            sn.extend_from_slice(&((n.len() + 3) as u16).to_be_bytes());
            sn.push(0);
            sn.extend_from_slice(&(n.len() as u16).to_be_bytes());
            sn.extend_from_slice(n);
            exts.extend_from_slice(&[0, 0]);
            exts.extend_from_slice(&(sn.len() as u16).to_be_bytes());
            exts.extend_from_slice(&sn);
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
        let rec = client_hello(Some("api.github.com"));
        let body = &rec[9..];
        for cut in 0..body.len() {
            let _ = parse_sni(&body[..cut]); // must not panic
        }
        let mut bad = body.to_vec();
        let n = bad.len();
        bad[n - 10] = 0xff; // corrupt a length near the end
        let _ = parse_sni(&bad);
    }
}
