//! HTTP/1 request heads as the door accepts them: read with a size limit,
//! parsed by `httparse`, checked for everything that could make the door and
//! the upstream disagree about a request (smuggling), rewritten for the
//! upstream with hop-by-hop and proxy headers removed.
//!
//! Invariant: a head that is ambiguous (both Content-Length and
//! Transfer-Encoding, conflicting lengths, an absolute URI whose host differs
//! from Host, two Host fields, a control character in the target) is an
//! error, never forwarded.

use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt,
};

pub const MAX_HEAD: usize = 16 * 1024;
pub const MAX_HEADERS: usize = 100;

/// Why a request is refused, with the status the client gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    pub status: u16,
    pub reason: String,
}

fn reject(status: u16, reason: impl Into<String>) -> Reject {
    Reject {
        status,
        reason: reason.into(),
    }
}

/// How the request body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    None,
    Length(u64),
    Chunked,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    /// As written on the request line.
    pub target: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Body,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }
}

/// Reads bytes until the end of the head (`\r\n\r\n`), at most `MAX_HEAD`.
pub async fn read_head<R: AsyncBufRead + Unpin>(r: &mut R) -> Result<Vec<u8>, Reject> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        let mut line = Vec::new();
        let n = (&mut *r)
            .take((MAX_HEAD + 1 - buf.len()) as u64)
            .read_until(b'\n', &mut line)
            .await
            .map_err(|_| reject(400, "the request could not be read"))?;
        if n == 0 {
            return Err(reject(
                400,
                "the connection closed before the request head ended",
            ));
        }
        buf.extend_from_slice(&line);
        if buf.len() > MAX_HEAD {
            return Err(reject(431, "the request head is larger than 16 KiB"));
        }
        if line == b"\r\n" || line == b"\n" {
            if buf.len() == line.len() {
                buf.clear(); // tolerate one empty line before the request
                continue;
            }
            return Ok(buf);
        }
    }
}

/// Parses and checks a head. Rejects what could be read two ways.
pub fn parse_head(raw: &[u8]) -> Result<Head, Reject> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(raw) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(reject(400, "incomplete request head")),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(reject(431, "more than 100 header fields"))
        }
        Err(e) => return Err(reject(400, format!("malformed request: {e}"))),
    }
    if req.version != Some(1) && req.version != Some(0) {
        return Err(reject(505, "only HTTP/1.0 and HTTP/1.1 are supported"));
    }
    let method = req.method.unwrap_or("").to_string();
    let target = req.path.unwrap_or("").to_string();
    if target.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(reject(400, "control characters in the request target"));
    }
    let headers: Vec<(String, Vec<u8>)> = req
        .headers
        .iter()
        .map(|h| (h.name.to_string(), h.value.to_vec()))
        .collect();
    if headers
        .iter()
        .any(|(_, v)| v.iter().any(|&b| b == b'\r' || b == b'\n' || b == 0))
    {
        return Err(reject(400, "control characters in a header value"));
    }
    // Two Host fields: the door would judge the first while the upstream may
    // route by another (RFC 9112 3.2: answer 400).
    if headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("host"))
        .count()
        > 1
    {
        return Err(reject(400, "more than one Host header"));
    }
    // Connection names fields the door removes before forwarding; naming one
    // the upstream needs would make it read the body as a second request
    // (Content-Length, Transfer-Encoding) or route by its own default (Host).
    if let Some(n) = connection_named(&headers)
        .into_iter()
        .find(|n| ["content-length", "transfer-encoding", "host"].contains(&n.as_str()))
    {
        return Err(reject(
            400,
            format!("the Connection header names {n}, which the upstream needs; remove {n} from Connection"),
        ));
    }
    let te: Vec<&[u8]> = headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("transfer-encoding"))
        .map(|(_, v)| v.as_slice())
        .collect();
    let cl: Vec<&[u8]> = headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.as_slice())
        .collect();
    let body = match (te.as_slice(), cl.as_slice()) {
        ([], []) => Body::None,
        ([], lengths) => {
            let first = lengths[0];
            if lengths.iter().any(|l| *l != first) {
                return Err(reject(400, "conflicting Content-Length headers"));
            }
            let text = std::str::from_utf8(first).map_err(|_| reject(400, "bad Content-Length"))?;
            if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
                return Err(reject(400, "bad Content-Length"));
            }
            Body::Length(
                text.parse()
                    .map_err(|_| reject(400, "bad Content-Length"))?,
            )
        }
        ([only], []) if only.trim_ascii().eq_ignore_ascii_case(b"chunked") => Body::Chunked,
        (_, []) => {
            return Err(reject(
                400,
                "unsupported Transfer-Encoding (only a single \"chunked\")",
            ))
        }
        (_, _) => {
            return Err(reject(
                400,
                "both Content-Length and Transfer-Encoding: ambiguous request",
            ))
        }
    };
    Ok(Head {
        method,
        target,
        headers,
        body,
    })
}

/// The parts of an absolute-form `http://` target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AbsoluteTarget {
    pub host: String,
    pub port: u16,
    /// Origin-form path and query (`/` if empty).
    pub path: String,
}

/// Splits `host[:port]` (host may be `[v6]`). `None` if malformed.
pub fn split_authority(auth: &str, default_port: u16) -> Option<(String, u16)> {
    if auth.is_empty() || auth.contains('@') {
        return None;
    }
    if let Some(rest) = auth.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        let port = match after {
            "" => default_port,
            p => p.strip_prefix(':')?.parse().ok()?,
        };
        return Some((format!("[{h}]"), port));
    }
    match auth.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => {
            if h.is_empty() || p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            Some((h.to_string(), p.parse().ok()?))
        }
        Some(_) => None,
        None => Some((auth.to_string(), default_port)),
    }
}

pub fn parse_absolute(target: &str) -> Result<AbsoluteTarget, Reject> {
    let lower = target
        .get(..8)
        .map(|s| s.to_ascii_lowercase())
        .unwrap_or_default();
    if lower.starts_with("https://") {
        return Err(reject(
            400,
            "https URLs go through CONNECT; set HTTPS_PROXY",
        ));
    }
    let Some(rest) = target.get(7..).filter(|_| lower.starts_with("http://")) else {
        return Err(reject(
            400,
            "this is a proxy: the request target must be an absolute http:// URL",
        ));
    };
    let (auth, path) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let (host, port) =
        split_authority(auth, 80).ok_or_else(|| reject(400, "malformed host in the URL"))?;
    let path = if path.is_empty() {
        "/".to_string()
    } else if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_string()
    };
    Ok(AbsoluteTarget { host, port, path })
}

/// Whether a Host header names the same host and port.
pub fn host_header_matches(value: &[u8], host: &str, port: u16, default_port: u16) -> bool {
    let Ok(text) = std::str::from_utf8(value) else {
        return false;
    };
    let Some((h, p)) = split_authority(text.trim(), default_port) else {
        return false;
    };
    let norm = |s: &str| s.trim_end_matches('.').to_ascii_lowercase();
    norm(&h) == norm(host) && p == port
}

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "upgrade",
];

/// The field names (lower case) the `Connection` fields list: removed
/// before forwarding, as hop-by-hop.
fn connection_named(headers: &[(String, Vec<u8>)]) -> Vec<String> {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
        .flat_map(|(_, v)| {
            String::from_utf8_lossy(v)
                .split(',')
                .map(|t| t.trim().to_ascii_lowercase())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The head sent upstream: origin-form target, no hop-by-hop or `Proxy-*`
/// headers (nor those that `Connection` names), and `Connection: close`.
pub fn upstream_head(head: &Head, path: &str) -> Vec<u8> {
    let named = connection_named(&head.headers);
    let mut out = format!("{} {} HTTP/1.1\r\n", head.method, path).into_bytes();
    for (n, v) in &head.headers {
        let lower = n.to_ascii_lowercase();
        if HOP_BY_HOP.contains(&lower.as_str())
            || lower.starts_with("proxy-")
            || named.contains(&lower)
        {
            continue;
        }
        out.extend_from_slice(n.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    out
}

/// Copies exactly one request body, framed as the head says, and nothing after
/// it (a pipelined second request is never forwarded). Returns bytes copied.
pub async fn copy_body<R, W>(r: &mut R, w: &mut W, body: Body) -> std::io::Result<u64>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin,
{
    match body {
        Body::None => Ok(0),
        Body::Length(n) => {
            let copied = tokio::io::copy(&mut (&mut *r).take(n), w).await?;
            if copied != n {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "short body",
                ));
            }
            Ok(copied)
        }
        Body::Chunked => {
            let mut total = 0u64;
            loop {
                let mut line = Vec::new();
                (&mut *r).take(1024).read_until(b'\n', &mut line).await?;
                if !is_crlf_line(&line) {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "bad chunk size line",
                    ));
                }
                let size_text = line[..line.len() - 2]
                    .split(|&b| b == b';')
                    .next()
                    .unwrap_or(b"");
                let size = std::str::from_utf8(size_text)
                    .ok()
                    .filter(|s| {
                        !s.is_empty() && s.len() <= 16 && s.bytes().all(|b| b.is_ascii_hexdigit())
                    })
                    .and_then(|s| u64::from_str_radix(s, 16).ok())
                    .ok_or_else(|| {
                        std::io::Error::new(std::io::ErrorKind::InvalidData, "bad chunk size")
                    })?;
                w.write_all(&line).await?;
                total += line.len() as u64;
                if size == 0 {
                    // Trailers, then the final empty line.
                    loop {
                        let mut t = Vec::new();
                        (&mut *r)
                            .take(MAX_HEAD as u64)
                            .read_until(b'\n', &mut t)
                            .await?;
                        if !is_crlf_line(&t) || (t != b"\r\n" && !is_field_line(&t)) {
                            return Err(std::io::Error::new(
                                std::io::ErrorKind::InvalidData,
                                "bad trailer",
                            ));
                        }
                        w.write_all(&t).await?;
                        total += t.len() as u64;
                        if t == b"\r\n" {
                            return Ok(total);
                        }
                    }
                }
                let copied = tokio::io::copy(&mut (&mut *r).take(size), w).await?;
                if copied != size {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "short chunk",
                    ));
                }
                let mut end = [0u8; 2];
                r.read_exact(&mut end).await?;
                if &end != b"\r\n" {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "chunk data not followed by CRLF",
                    ));
                }
                w.write_all(&end).await?;
                total += copied + 2;
            }
        }
    }
}

/// A line of chunked framing that every parser ends at the same place: it
/// ends in CRLF and holds no other CR, LF or control character (tab aside).
fn is_crlf_line(line: &[u8]) -> bool {
    line.strip_suffix(b"\r\n")
        .is_some_and(|l| l.iter().all(|&b| b == b'\t' || !b.is_ascii_control()))
}

/// A trailer line that is a header field (`token:`), not a folded
/// continuation or a request line.
fn is_field_line(line: &[u8]) -> bool {
    let name_len = line
        .iter()
        .take_while(|&&b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        .count();
    name_len > 0 && line.get(name_len) == Some(&b':')
}

/// A complete refusal response with a one-line reason.
pub fn refusal(status: u16, reason: &str) -> Vec<u8> {
    let text = match status {
        400 => "Bad Request",
        403 => "Forbidden",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    };
    let one_line: String = reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let body = format!("moat door: {one_line}\n");
    format!(
        "HTTP/1.1 {status} {text}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\nX-Moat-Denied: {one_line}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Reads a request head from a possibly unbuffered stream (helper for tests).
pub async fn read_and_parse<R: AsyncRead + Unpin>(r: R) -> Result<Head, Reject> {
    let mut br = tokio::io::BufReader::new(r);
    let raw = read_head(&mut br).await?;
    parse_head(&raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Head, Reject> {
        parse_head(text.as_bytes())
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        let both = "POST http://a.test/ HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(parse(both).unwrap_err().reason.contains("ambiguous"));
        let two_cl = "POST http://a.test/ HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n";
        assert!(parse(two_cl).unwrap_err().reason.contains("conflicting"));
        let te_gzip = "POST http://a.test/ HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: gzip, chunked\r\n\r\n";
        assert!(parse(te_gzip).is_err());
        let two_te = "POST http://a.test/ HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(parse(two_te).is_err());
        let neg = "POST http://a.test/ HTTP/1.1\r\nHost: a.test\r\nContent-Length: -1\r\n\r\n";
        assert!(parse(neg).is_err());
        let plus = "POST http://a.test/ HTTP/1.1\r\nHost: a.test\r\nContent-Length: +5\r\n\r\n";
        assert!(parse(plus).is_err());
        let space_name = "GET http://a.test/ HTTP/1.1\r\nHost : a.test\r\n\r\n";
        assert!(parse(space_name).is_err());
        let folded = "GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nX: a\r\n b\r\n\r\n";
        assert!(parse(folded).is_err());
        let crlf_target = "CONNECT a.test:443\r\nx HTTP/1.1\r\n\r\n";
        assert!(parse(crlf_target).is_err());
    }

    /// Found by the http_request fuzz target: `Connection` naming Host made
    /// the door drop Host after checking it; naming Content-Length (or
    /// Transfer-Encoding) would make the upstream read the body the door
    /// forwards as a second, unchecked request.
    #[test]
    fn connection_cannot_name_what_frames_or_routes_the_request() {
        let smuggle = "POST http://a.test/ HTTP/1.1\r\nHost: a.test\r\nConnection: keep-alive, Content-Length\r\nContent-Length: 35\r\n\r\n";
        let r = parse(smuggle).unwrap_err();
        assert_eq!(r.status, 400);
        assert!(r.reason.contains("content-length"), "{}", r.reason);
        for named in ["transfer-encoding", "Host", "HOST\u{a0}"] {
            let req = format!("POST http://a.test/ HTTP/1.1\r\nHost: a.test\r\nConnection: {named}\r\nTransfer-Encoding: chunked\r\n\r\n");
            assert!(parse(&req).is_err(), "{named}");
        }
        // Other fields may still be named, and are removed.
        let ok = parse("GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nConnection: x-trace\r\nX-Trace: 1\r\nContent-Length: 0\r\n\r\n").unwrap();
        let up = String::from_utf8(upstream_head(&ok, "/")).unwrap();
        assert!(up.contains("Host: a.test\r\n") && up.contains("Content-Length: 0\r\n"));
        assert!(!up.contains("X-Trace"));
    }

    #[test]
    fn absolute_targets_split() {
        let t = parse_absolute("http://A.test:8080/x?y").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("A.test", 8080, "/x?y")
        );
        assert_eq!(parse_absolute("http://a.test").unwrap().path, "/");
        assert_eq!(parse_absolute("http://a.test?q").unwrap().path, "/?q");
        assert_eq!(parse_absolute("http://[::1]:80/").unwrap().host, "[::1]");
        assert!(parse_absolute("/relative").is_err());
        assert!(parse_absolute("https://a.test/")
            .unwrap_err()
            .reason
            .contains("CONNECT"));
        assert!(parse_absolute("http://user@a.test/").is_err());
        assert!(parse_absolute("http://a.test:/").is_err());
        assert!(parse_absolute("http://a.test:99999/").is_err());
    }

    #[test]
    fn a_second_host_header_is_refused() {
        let two = "GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nHost: evil.test\r\n\r\n";
        assert!(parse(two)
            .unwrap_err()
            .reason
            .contains("more than one Host"));
        let cased = "GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nhost: a.test\r\n\r\n";
        assert!(parse(cased).is_err());
        assert!(parse("GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n").is_ok());
    }

    #[test]
    fn host_must_match_the_uri() {
        assert!(host_header_matches(b"a.test", "a.test", 80, 80));
        assert!(host_header_matches(b"A.TEST.:80", "a.test", 80, 80));
        assert!(!host_header_matches(b"b.test", "a.test", 80, 80));
        assert!(!host_header_matches(b"a.test:81", "a.test", 80, 80));
        assert!(!host_header_matches(b"a.test@b.test", "a.test", 80, 80));
    }

    #[test]
    fn hop_by_hop_and_proxy_headers_are_stripped() {
        let h = parse("GET http://a.test/p HTTP/1.1\r\nHost: a.test\r\nProxy-Authorization: Basic x\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: 5\r\nAccept: */*\r\n\r\n").unwrap();
        let out = String::from_utf8(upstream_head(&h, "/p")).unwrap();
        assert!(out.starts_with("GET /p HTTP/1.1\r\n"));
        assert!(out.contains("Host: a.test\r\n") && out.contains("Accept: */*\r\n"));
        for gone in [
            "Proxy-Authorization",
            "X-Secret",
            "Keep-Alive",
            "keep-alive",
        ] {
            assert!(!out.contains(gone), "{gone} kept: {out}");
        }
        assert!(out.ends_with("Connection: close\r\n\r\n"));
    }

    #[tokio::test]
    async fn one_body_is_copied_and_nothing_after_it() {
        let data = b"5\r\nhello\r\n0\r\n\r\nGET http://evil.test/ HTTP/1.1\r\n\r\n".to_vec();
        let mut r = tokio::io::BufReader::new(data.as_slice());
        let mut out = Vec::new();
        copy_body(&mut r, &mut out, Body::Chunked).await.unwrap();
        assert_eq!(out, b"5\r\nhello\r\n0\r\n\r\n");
        let data = b"abcdefGET /".to_vec();
        let mut r = tokio::io::BufReader::new(data.as_slice());
        let mut out = Vec::new();
        copy_body(&mut r, &mut out, Body::Length(6)).await.unwrap();
        assert_eq!(out, b"abcdef");
        let mut r = tokio::io::BufReader::new(b"zz\r\n".as_slice());
        assert!(copy_body(&mut r, &mut Vec::new(), Body::Chunked)
            .await
            .is_err());
    }

    #[tokio::test]
    async fn chunk_framing_a_lenient_parser_reads_differently_is_refused() {
        let smuggled = "GET /smuggled HTTP/1.1\r\nHost: evil.test\r\n\r\n";
        for bad in [
            format!("0\r\n\n{smuggled}"),
            format!("0\r\nX-T: 1\n\r\n{smuggled}"),
            format!("0\r\n{smuggled}"),
            format!("0\r\nX-T: 1\r\n {smuggled}"),
            "5\r\nhelloXY0\r\n\r\n".to_string(),
            format!("5\r\nhello\n0\r\n\r\n{smuggled}"),
            "5;a\rGET /smuggled HTTP/1.1\r\nhello\r\n0\r\n\r\n".to_string(),
            "5\r\nhello\r\n0\r\nX-T\x00: 1\r\n\r\n".to_string(),
        ] {
            let mut r = tokio::io::BufReader::new(bad.as_bytes());
            let mut out = Vec::new();
            assert!(
                copy_body(&mut r, &mut out, Body::Chunked).await.is_err(),
                "{bad:?} passed as {:?}",
                String::from_utf8_lossy(&out)
            );
            assert!(
                !String::from_utf8_lossy(&out).contains("smuggled"),
                "{bad:?}"
            );
        }
        let good = "5;ext=1\r\nhello\r\n0\r\nX-Checksum: abc\r\n\r\n";
        let mut r = tokio::io::BufReader::new(good.as_bytes());
        let mut out = Vec::new();
        copy_body(&mut r, &mut out, Body::Chunked).await.unwrap();
        assert_eq!(out, good.as_bytes());
    }

    #[tokio::test]
    async fn oversized_heads_are_431() {
        let mut big = b"GET http://a.test/ HTTP/1.1\r\n".to_vec();
        for i in 0..2000 {
            big.extend_from_slice(format!("X-{i}: aaaaaaaaaa\r\n").as_bytes());
        }
        big.extend_from_slice(b"\r\n");
        assert_eq!(
            read_and_parse(big.as_slice()).await.unwrap_err().status,
            431
        );
    }
}
