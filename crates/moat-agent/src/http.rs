//! A small blocking HTTP/1.1 client for one job: `POST` a JSON body to the
//! door's LLM proxy (`http://127.0.0.1:8787/...` inside the sandbox) and read
//! the whole answer.
//!
//! Plain HTTP only: inside the sandbox the only server the agent talks to is
//! the door on loopback, which holds the TLS connection upstream. Must never:
//! put a header or a body into an error message (the key header is only a
//! placeholder, but errors go to chat and logs all the same).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Largest response body read (the door's own limit is 64 MiB).
pub const MAX_RESPONSE: usize = 64 * 1024 * 1024;
/// Longest status line or header line accepted.
const MAX_LINE: usize = 64 * 1024;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{0:?} is not a plain http:// URL with a host (the built-in agent talks only to the door on 127.0.0.1)")]
    BadUrl(String),
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("talking to {addr}: {source}")]
    Io {
        addr: String,
        source: std::io::Error,
    },
    #[error("the answer from {addr} is not valid HTTP: {what}")]
    Protocol { addr: String, what: String },
    #[error("the answer from {addr} is larger than {MAX_RESPONSE} bytes")]
    TooLarge { addr: String },
}

/// A parsed `http://host[:port]/path` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub host: String,
    pub port: u16,
    /// The path, starting with `/`, without a trailing `/` (may be empty).
    pub path: String,
}

impl Url {
    pub fn parse(text: &str) -> Result<Url, HttpError> {
        let bad = || HttpError::BadUrl(text.to_string());
        let rest = text.strip_prefix("http://").ok_or_else(bad)?;
        let (auth, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if auth.is_empty() || auth.contains('@') || path.contains(['?', '#', ' ']) {
            return Err(bad());
        }
        let (host, port) = match auth.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
                (h, p.parse::<u16>().map_err(|_| bad())?)
            }
            _ => (auth, 80),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(bad());
        }
        Ok(Url {
            host: host.to_string(),
            port,
            path: path.trim_end_matches('/').to_string(),
        })
    }

    fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// A response: status, the one header the agent acts on, and the whole
/// (de-chunked) body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// The `retry-after` header as sent (seconds or an HTTP date), if any.
    pub retry_after: Option<String>,
    pub body: Vec<u8>,
}

/// `POST {url}{suffix}` with `body` (JSON) and the extra `headers`; waits at
/// most `timeout` for each read. One connection per request.
pub fn post_json(
    url: &Url,
    suffix: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> Result<Response, HttpError> {
    let addr = url.addr();
    let io = |source| HttpError::Io {
        addr: addr.clone(),
        source,
    };
    let sock = addr
        .to_socket_addrs()
        .map_err(|source| HttpError::Connect {
            addr: addr.clone(),
            source,
        })?
        .next()
        .ok_or_else(|| HttpError::Connect {
            addr: addr.clone(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
        })?;
    let mut stream =
        TcpStream::connect_timeout(&sock, Duration::from_secs(10)).map_err(|source| {
            HttpError::Connect {
                addr: addr.clone(),
                source,
            }
        })?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let _ = stream.set_nodelay(true);
    let mut head = format!(
        "POST {}{} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\naccept: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
        url.path,
        suffix,
        url.addr(),
        body.len()
    );
    for (k, v) in headers {
        if k.contains(['\r', '\n', ':']) || v.contains(['\r', '\n']) {
            return Err(HttpError::Protocol {
                addr,
                what: format!("header {k} has a line break"),
            });
        }
        head.push_str(k);
        head.push_str(": ");
        head.push_str(v);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    let mut req = head.into_bytes();
    req.extend_from_slice(body);
    stream.write_all(&req).map_err(io)?;
    stream.flush().map_err(io)?;
    read_response(BufReader::new(stream), &addr)
}

fn read_line(r: &mut impl BufRead, addr: &str) -> Result<String, HttpError> {
    let mut line = Vec::new();
    let n = r
        .by_ref()
        .take(MAX_LINE as u64)
        .read_until(b'\n', &mut line)
        .map_err(|source| HttpError::Io {
            addr: addr.to_string(),
            source,
        })?;
    if n == 0 || !line.ends_with(b"\n") {
        return Err(HttpError::Protocol {
            addr: addr.to_string(),
            what: "the connection closed in the middle of the header".into(),
        });
    }
    Ok(String::from_utf8_lossy(&line)
        .trim_end_matches(['\r', '\n'])
        .to_string())
}

/// Reads a status line, headers and a body (chunked, sized or to the end).
pub fn read_response(mut r: impl BufRead, addr: &str) -> Result<Response, HttpError> {
    let proto = |what: &str| HttpError::Protocol {
        addr: addr.to_string(),
        what: what.to_string(),
    };
    let io = |source| HttpError::Io {
        addr: addr.to_string(),
        source,
    };
    let status_line = read_line(&mut r, addr)?;
    let mut parts = status_line.split(' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(proto("no HTTP/1.x status line"));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| proto("no status code"))?;
    let mut chunked = false;
    let mut length: Option<usize> = None;
    let mut retry_after = None;
    for _ in 0..256 {
        let line = read_line(&mut r, addr)?;
        if line.is_empty() {
            break;
        }
        let Some((k, v)) = line.split_once(':') else {
            return Err(proto("a header line without a colon"));
        };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
        if k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked") {
            chunked = true;
        } else if k == "content-length" {
            length = Some(v.parse().map_err(|_| proto("a bad content-length"))?);
        } else if k == "retry-after" {
            retry_after = Some(v.chars().take(100).collect());
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            let size_line = read_line(&mut r, addr)?;
            let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| proto("a bad chunk size"))?;
            if size == 0 {
                break;
            }
            if body.len() + size > MAX_RESPONSE {
                return Err(HttpError::TooLarge {
                    addr: addr.to_string(),
                });
            }
            let start = body.len();
            body.resize(start + size, 0);
            r.read_exact(&mut body[start..]).map_err(io)?;
            let mut crlf = [0u8; 2];
            r.read_exact(&mut crlf).map_err(io)?;
        }
    } else if let Some(n) = length {
        if n > MAX_RESPONSE {
            return Err(HttpError::TooLarge {
                addr: addr.to_string(),
            });
        }
        body.resize(n, 0);
        r.read_exact(&mut body).map_err(io)?;
    } else {
        r.take(MAX_RESPONSE as u64 + 1)
            .read_to_end(&mut body)
            .map_err(io)?;
        if body.len() > MAX_RESPONSE {
            return Err(HttpError::TooLarge {
                addr: addr.to_string(),
            });
        }
    }
    Ok(Response {
        status,
        retry_after,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = Url::parse("http://127.0.0.1:8787/openai/v1/").unwrap();
        assert_eq!(
            u,
            Url {
                host: "127.0.0.1".into(),
                port: 8787,
                path: "/openai/v1".into()
            }
        );
        assert_eq!(Url::parse("http://localhost").unwrap().port, 80);
        assert_eq!(Url::parse("http://[::1]:9/x").unwrap().host, "::1");
        for bad in [
            "https://api.anthropic.com",
            "http://",
            "http://u:p@h/",
            "http://h:x/",
            "http://h/?q",
        ] {
            assert!(Url::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn chunked_sized_and_unsized_bodies() {
        let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n";
        let r = read_response(&chunked[..], "t").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"abcde"[..]));
        assert_eq!(r.retry_after, None);
        let sized =
            b"HTTP/1.1 429 Too Many\r\nContent-Length: 4\r\nRetry-After:  7 \r\n\r\nnope+extra";
        let r = read_response(&sized[..], "t").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (429, &b"nope"[..]));
        assert_eq!(r.retry_after.as_deref(), Some("7"));
        let eof = b"HTTP/1.0 200 OK\r\n\r\nall of it";
        assert_eq!(read_response(&eof[..], "t").unwrap().body, b"all of it");
        for bad in [
            &b"SSH-2.0\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
        ] {
            assert!(read_response(bad, "t").is_err());
        }
    }
}
