//! HTTP/1.1 over TCP or rustls for the Slack clients: a parsed endpoint URL,
//! connections kept for reuse, one request and its whole response.
//!
//! Owns sockets and TLS (webpki roots, ring). Plain `http://` is refused
//! unless the caller allowed it (tests and local fakes). It never logs or
//! formats a request's headers or body, so tokens and messages stay out of
//! errors: callers pass the token as a sensitive header value.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls;

/// Largest response body read from Slack.
pub(crate) const MAX_RESPONSE: usize = 16 * 1024 * 1024;
/// Idle connections kept for reuse.
const MAX_IDLE: usize = 8;

/// A parsed `http(s)://host[:port]/prefix` or `ws(s)://…` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Endpoint {
    pub tls: bool,
    /// Without brackets for IPv6 literals (as used for connecting and SNI).
    pub host: String,
    pub port: u16,
    /// `host[:port]` as written: the `Host` header.
    pub authority: String,
    /// Path and query, `/` at least, no trailing `/` unless it is all.
    pub path_and_query: String,
}

/// Why a URL is not usable (never quotes the URL's query, which may carry a ticket).
pub(crate) fn parse_endpoint(
    url: &str,
    allow_plain: bool,
    websocket: bool,
) -> Result<Endpoint, &'static str> {
    let uri: http::Uri = url.parse().map_err(|_| "not a URL")?;
    let (secure, plain) = if websocket {
        ("wss", "ws")
    } else {
        ("https", "http")
    };
    let tls = match uri.scheme_str() {
        Some(s) if s.eq_ignore_ascii_case(secure) => true,
        Some(s) if s.eq_ignore_ascii_case(plain) => {
            if !allow_plain {
                return Err(if websocket {
                    "ws:// (no TLS) is only allowed when plain HTTP was explicitly allowed"
                } else {
                    "http:// (no TLS) is only allowed when explicitly allowed (tests, local fakes)"
                });
            }
            false
        }
        _ => {
            return Err(if websocket {
                "the scheme must be wss://"
            } else {
                "the scheme must be https://"
            })
        }
    };
    let auth = uri.authority().ok_or("no host")?;
    if auth.as_str().contains('@') {
        return Err("user information in the URL is not allowed");
    }
    let host = auth.host().trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err("no host");
    }
    let port = auth.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let mut path_and_query = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".to_string());
    if path_and_query.is_empty() {
        path_and_query.push('/');
    }
    Ok(Endpoint {
        tls,
        host: host.to_string(),
        port,
        authority: auth.as_str().to_string(),
        path_and_query,
    })
}

#[allow(
    clippy::expect_used,
    reason = "ring supports TLS 1.2 and 1.3; no input reaches this"
)]
pub(crate) fn tls_config() -> Arc<rustls::ClientConfig> {
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(tls)
}

/// An open byte stream to an endpoint: TCP, or TLS over TCP.
pub(crate) trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

/// Opens TCP (and TLS when the endpoint asks for it) with `tls` as config.
pub(crate) async fn dial(
    ep: &Endpoint,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<Box<dyn Stream>, String> {
    let tcp = tokio::net::TcpStream::connect((ep.host.as_str(), ep.port))
        .await
        .map_err(|e| format!("cannot connect to {}:{}: {e}", ep.host, ep.port))?;
    let _ = tcp.set_nodelay(true);
    if !ep.tls {
        return Ok(Box::new(tcp));
    }
    let name = rustls::pki_types::ServerName::try_from(ep.host.clone())
        .map_err(|_| format!("{} is not a valid TLS server name", ep.host))?;
    let s = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS with {}:{} failed: {e}", ep.host, ep.port))?;
    Ok(Box::new(s))
}

type Key = (bool, String, u16);

/// HTTP/1.1 client with a few idle connections kept per host.
pub(crate) struct Client {
    tls: Arc<rustls::ClientConfig>,
    idle: Mutex<Vec<(Key, SendRequest<Full<Bytes>>)>>,
}

impl Client {
    pub fn new() -> Client {
        Client {
            tls: tls_config(),
            idle: Mutex::new(Vec::new()),
        }
    }

    pub fn tls(&self) -> &Arc<rustls::ClientConfig> {
        &self.tls
    }

    fn take_idle(&self, key: &Key) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(|(_, s)| !s.is_closed());
        let i = idle.iter().position(|(k, s)| k == key && s.is_ready())?;
        Some(idle.swap_remove(i).1)
    }

    fn put_idle(&self, key: Key, s: SendRequest<Full<Bytes>>) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE && !s.is_closed() {
            idle.push((key, s));
        }
    }

    async fn connect(&self, ep: &Endpoint) -> Result<SendRequest<Full<Bytes>>, String> {
        let stream = dial(ep, &self.tls).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP with {}:{} failed: {e}", ep.host, ep.port))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// Sends `req` (origin-form URI, `Host` set) to `ep` and reads the whole
    /// response. A kept connection that turns out closed before the request
    /// went out is replaced by a new one; a request that may have reached
    /// the server is never sent twice.
    pub async fn send(
        &self,
        ep: &Endpoint,
        req: Request<Full<Bytes>>,
        timeout: Duration,
    ) -> Result<(Response<()>, Bytes), String> {
        tokio::time::timeout(timeout, self.send_inner(ep, req))
            .await
            .map_err(|_| format!("no answer from {}:{} within {timeout:?}", ep.host, ep.port))?
    }

    async fn send_inner(
        &self,
        ep: &Endpoint,
        mut req: Request<Full<Bytes>>,
    ) -> Result<(Response<()>, Bytes), String> {
        let key: Key = (ep.tls, ep.host.clone(), ep.port);
        let fail = |e: hyper::Error| format!("HTTP with {}:{} failed: {e}", ep.host, ep.port);
        let mut reused = self.take_idle(&key);
        let resp = loop {
            let fresh = reused.is_none();
            let mut sender = match reused.take() {
                Some(s) => s,
                None => self.connect(ep).await?,
            };
            match sender.try_send_request(req).await {
                Ok(resp) => break (sender, resp),
                Err(mut e) => match e.take_message() {
                    Some(back) if !fresh => req = back,
                    _ => return Err(fail(e.into_error())),
                },
            }
        };
        let (sender, resp) = resp;
        let (parts, body) = resp.into_parts();
        let body = Limited::new(body, MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| {
                format!(
                    "reading the answer from {}:{} failed: {e}",
                    ep.host, ep.port
                )
            })?
            .to_bytes();
        let keep = !parts
            .headers
            .get(hyper::header::CONNECTION)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        if keep {
            self.put_idle(key, sender);
        }
        Ok((Response::from_parts(parts, ()), body))
    }
}

/// `application/x-www-form-urlencoded` encoding of `pairs`.
pub(crate) fn form_encode(pairs: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        encode_into(&mut out, k);
        out.push('=');
        encode_into(&mut out, v);
    }
    out
}

fn encode_into(out: &mut String, s: &str) {
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => {
                const HEX: &[u8; 16] = b"0123456789ABCDEF";
                out.push('%');
                out.push(HEX[(b >> 4) as usize] as char);
                out.push(HEX[(b & 15) as usize] as char);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let e = parse_endpoint("https://slack.com/api", false, false).unwrap();
        assert_eq!(
            (
                e.tls,
                e.host.as_str(),
                e.port,
                e.authority.as_str(),
                e.path_and_query.as_str()
            ),
            (true, "slack.com", 443, "slack.com", "/api")
        );
        let e = parse_endpoint("http://127.0.0.1:8088", true, false).unwrap();
        assert_eq!(
            (e.tls, e.port, e.path_and_query.as_str()),
            (false, 8088, "/")
        );
        let e = parse_endpoint(
            "wss://wss-primary.slack.com/link/?ticket=t1&app_id=A1",
            false,
            true,
        )
        .unwrap();
        assert_eq!(e.path_and_query, "/link/?ticket=t1&app_id=A1");
        let e = parse_endpoint("http://[::1]:9/x", true, false).unwrap();
        assert_eq!((e.host.as_str(), e.authority.as_str()), ("::1", "[::1]:9"));
        for (url, plain, ws) in [
            ("http://slack.com/api", false, false),
            ("ws://127.0.0.1:1/link", false, true),
            ("https://slack.com/api", true, true),
            ("ftp://slack.com/", true, false),
            ("https://user:pw@slack.com/api", false, false),
            ("slack.com/api", false, false),
            ("not a url", false, false),
        ] {
            assert!(parse_endpoint(url, plain, ws).is_err(), "{url}");
        }
    }

    #[test]
    fn form() {
        assert_eq!(
            form_encode(&[("channel", "C1"), ("text", "a b&c=d/é"), ("e", "")]),
            "channel=C1&text=a+b%26c%3Dd%2F%C3%A9&e="
        );
    }
}
