//! The door's upstream client: where an operator-configured upstream is
//! ([`UpstreamUrl`]) and connections from the host to it (the LLM APIs,
//! GitHub): TCP from the host's namespace, never the sandbox's, TLS
//! verified against the Mozilla roots, HTTP/1.1.
//!
//! Must never: connect from the sandbox's namespace or skip certificate checks.

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body::Body;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::STEP_TIMEOUT;

/// Where an upstream is (an LLM provider, a GitHub host):
/// `http(s)://host[:port][/base]`.
#[derive(Debug, Clone)]
pub struct UpstreamUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Prefix of every forwarded path, without a trailing slash.
    pub base_path: String,
}

impl UpstreamUrl {
    pub fn parse(text: &str, allow_plain_http: bool) -> Result<UpstreamUrl, String> {
        let uri: Uri = text
            .parse()
            .map_err(|e| format!("{text:?} is not a URL: {e}"))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") if allow_plain_http => false,
            Some("http") => {
                return Err(format!(
                    "{text:?} is plain HTTP; set MOAT_LLM_ALLOW_PLAIN_HTTP=1 to allow an unencrypted upstream"
                ))
            }
            _ => return Err(format!("{text:?} must start with https://")),
        };
        let auth = uri
            .authority()
            .ok_or_else(|| format!("{text:?} has no host"))?;
        if auth.as_str().contains('@') || uri.query().is_some() {
            return Err(format!(
                "{text:?} must not hold user information or a query"
            ));
        }
        let host = auth.host().trim_start_matches('[').trim_end_matches(']');
        Ok(UpstreamUrl {
            tls,
            host: host.to_string(),
            port: auth.port_u16().unwrap_or(if tls { 443 } else { 80 }),
            base_path: uri.path().trim_end_matches('/').to_string(),
        })
    }

    /// `host[:port]` as a Host header names it (port left out when default).
    pub(crate) fn authority(&self) -> String {
        let default = if self.tls { 443 } else { 80 };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == default {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

/// TLS to an operator-configured upstream: the Mozilla roots, HTTP/1.1.
pub(crate) fn upstream_tls() -> std::io::Result<Arc<tokio_rustls::rustls::ClientConfig>> {
    use tokio_rustls::rustls;
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(std::io::Error::other)?
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(tls))
}

/// Connects from the host (never from the sandbox's namespace) and sends `req`.
pub(crate) async fn send_upstream<B>(
    tls: &Arc<tokio_rustls::rustls::ClientConfig>,
    up: &UpstreamUrl,
    req: Request<B>,
) -> Result<Response<Incoming>, String>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = tokio::time::timeout(
        STEP_TIMEOUT,
        tokio::net::TcpStream::connect((up.host.as_str(), up.port)),
    )
    .await
    .map_err(|_| "connect timed out".to_string())?
    .map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    if !up.tls {
        return exchange(tcp, req).await;
    }
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from(up.host.clone())
        .map_err(|e| e.to_string())?;
    let stream = tokio::time::timeout(
        STEP_TIMEOUT,
        tokio_rustls::TlsConnector::from(tls.clone()).connect(name, tcp),
    )
    .await
    .map_err(|_| "TLS handshake timed out".to_string())?
    .map_err(|e| format!("TLS: {e}"))?;
    exchange(stream, req).await
}

async fn exchange<S, B>(s: S, req: Request<B>) -> Result<Response<Incoming>, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender.send_request(req).await.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_needs_an_explicit_yes() {
        assert!(UpstreamUrl::parse("http://127.0.0.1:9", false).is_err());
        let u = UpstreamUrl::parse("http://127.0.0.1:9/base/", true).unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port, u.base_path.as_str()),
            (false, "127.0.0.1", 9, "/base")
        );
        let u = UpstreamUrl::parse("https://api.anthropic.com", false).unwrap();
        assert_eq!(
            (u.tls, u.port, u.authority()),
            (true, 443, "api.anthropic.com".to_string())
        );
        assert!(UpstreamUrl::parse("ftp://x", true).is_err());
        assert!(UpstreamUrl::parse("https://u:p@x", true).is_err());
    }
}
