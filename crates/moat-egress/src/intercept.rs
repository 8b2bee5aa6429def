//! TLS interception for one lease: the lease CA (made when the door starts,
//! limited by X.509 name constraints to the intercepted names, its private
//! key only in this process), the CA bundle the sandbox trusts it through,
//! the table of intercepted hosts and which service answers each (GitHub,
//! Amp), and the ending of the sandbox's TLS before a request goes to that
//! service's handler.
//!
//! Must never: make a CA that could vouch for a name that is not
//! intercepted, let the CA's key leave moat's memory, or serve a host that
//! is not in the table.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::rustls;

use crate::llm::random_hex;
use crate::STEP_TIMEOUT;

/// Where the sandbox finds the system roots plus its lease CA.
pub const CA_BUNDLE_PATH: &str = "/run/moat/ca-bundle.pem";
/// The host's bundle of trusted roots (Debian's ca-certificates).
pub const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// The variables that make TLS clients trust the lease CA.
const CA_VARS: [&str; 5] = [
    "SSL_CERT_FILE",
    "GIT_SSL_CAINFO",
    "NODE_EXTRA_CA_CERTS",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
];

/// Which of the door's services answers an intercepted host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Service {
    Github,
    Amp,
}

impl Service {
    /// The audit record kind of an intercepted tunnel.
    pub(crate) fn tls_kind(self) -> &'static str {
        match self {
            Service::Github => "github-tls",
            Service::Amp => "amp-tls",
        }
    }
}

/// The lease CA, its server certificate for every intercepted name, the CA
/// bundle file on the host, and which service answers each name.
pub(crate) struct Intercept {
    hosts: Vec<(String, Service)>,
    server_tls: Arc<rustls::ServerConfig>,
    bundle: PathBuf,
    dir: PathBuf,
}

impl Intercept {
    /// Makes the lease CA for `hosts` (normalized names) and writes the
    /// sandbox's CA bundle (the system's roots plus the lease CA) into `dir`.
    pub(crate) fn new(
        lease: &str,
        hosts: Vec<(String, Service)>,
        dir: &Path,
    ) -> std::io::Result<Intercept> {
        let names: Vec<String> = hosts.iter().map(|(n, _)| n.clone()).collect();
        let (ca_pem, chain, key) = lease_pki(lease, &names)
            .map_err(|e| std::io::Error::other(format!("lease CA: {e}")))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(std::io::Error::other)?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(std::io::Error::other)?;
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut bundle_text = std::fs::read_to_string(SYSTEM_BUNDLE).unwrap_or_default();
        if !bundle_text.is_empty() && !bundle_text.ends_with('\n') {
            bundle_text.push('\n');
        }
        bundle_text.push_str(&format!(
            "# moat lease CA for {lease} (trusted in this sandbox only)\n"
        ));
        bundle_text.push_str(&ca_pem);
        let bundle = write_bundle(dir, &bundle_text)?;
        Ok(Intercept {
            hosts,
            server_tls: Arc::new(server),
            bundle,
            dir: dir.to_path_buf(),
        })
    }

    /// The service answering `name` (normalized), if it is intercepted.
    pub(crate) fn service(&self, name: &str) -> Option<Service> {
        self.hosts.iter().find(|(n, _)| n == name).map(|(_, s)| *s)
    }

    /// The variables that make the sandbox's TLS clients trust the lease CA.
    pub(crate) fn client_env(&self) -> Vec<(String, String)> {
        CA_VARS
            .iter()
            .map(|v| (v.to_string(), CA_BUNDLE_PATH.to_string()))
            .collect()
    }

    /// The host file bound read-only at [`CA_BUNDLE_PATH`].
    pub(crate) fn bundle_path(&self) -> &Path {
        &self.bundle
    }
}

impl Drop for Intercept {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.bundle);
        // The directory goes too once no other door of this run uses it.
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// A CA for one lease, limited by name constraints to the intercepted hosts,
/// and one server certificate for all of them. Returns (CA PEM, chain, key).
fn lease_pki(
    lease: &str,
    names: &[String],
) -> Result<
    (
        String,
        Vec<rustls::pki_types::CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    ),
    rcgen::Error,
> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, GeneralSubtree, IsCa,
        KeyPair, KeyUsagePurpose, NameConstraints,
    };
    let now = time::OffsetDateTime::now_utc();
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, format!("moat lease CA {lease}"));
    ca.distinguished_name
        .push(DnType::OrganizationName, "moat (this sandbox only)");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.name_constraints = Some(NameConstraints {
        permitted_subtrees: names
            .iter()
            .map(|n| GeneralSubtree::DnsName(n.clone()))
            .collect(),
        excluded_subtrees: Vec::new(),
    });
    ca.not_before = now - time::Duration::hours(1);
    ca.not_after = now + time::Duration::days(30);
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    let mut leaf = CertificateParams::new(names.to_vec())?;
    leaf.distinguished_name.push(
        DnType::CommonName,
        names.first().cloned().unwrap_or_default(),
    );
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.not_before = now - time::Duration::hours(1);
    leaf.not_after = now + time::Duration::days(30);
    let leaf_key = KeyPair::generate()?;
    let leaf_cert = leaf.signed_by(&leaf_key, &ca_cert, &ca_key)?;
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
    Ok((
        ca_cert.pem(),
        vec![leaf_cert.der().clone(), ca_cert.der().clone()],
        key,
    ))
}

fn write_bundle(dir: &Path, text: &str) -> std::io::Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("ca-bundle-{}.pem", random_hex(8)?));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&path)?;
    f.write_all(text.as_bytes())?;
    // The sandbox's user reads it through a read-only bind; nobody writes it.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444))?;
    Ok(path)
}

/// Bytes already read from the client (its ClientHello) before the rest.
struct Rewound<S> {
    first: Bytes,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewound<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.first.is_empty() {
            let n = self.first.len().min(buf.remaining());
            let chunk = self.first.split_to(n);
            buf.put_slice(&chunk);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewound<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Ends the sandbox's TLS for an intercepted host (its ClientHello, already
/// read and checked against the host, is `hello`) and serves HTTP/1.1 on it
/// with the handler of the host's service.
pub(crate) async fn serve_tls<S>(state: Arc<crate::State>, client: S, hello: Vec<u8>, host: String)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Some(service) = state.intercept.as_ref().and_then(|i| i.service(&host)) else {
        return;
    };
    let Some(server_tls) = state.intercept.as_ref().map(|i| i.server_tls.clone()) else {
        return;
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(server_tls);
    let stream = Rewound {
        first: Bytes::from(hello),
        inner: client,
    };
    let tls = match tokio::time::timeout(STEP_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::info!(host = %host, error = %e, "TLS with the sandbox failed (does it trust the lease CA?)");
            return;
        }
        Err(_) => return,
    };
    let svc = hyper::service::service_fn(move |req| {
        let st = state.clone();
        let host = host.clone();
        async move {
            Ok::<_, Infallible>(match service {
                Service::Github => crate::github::handle(st, host, req).await,
                Service::Amp => crate::amp::handle(st, host, req).await,
            })
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(STEP_TIMEOUT)
        .serve_connection(TokioIo::new(tls), svc)
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lease_ca_signs_a_certificate_for_the_hosts_only() {
        let (pem, chain, _) =
            lease_pki("t", &["github.com".into(), "api.github.com".into()]).unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert_eq!(chain.len(), 2);
        let (pem2, _, _) = lease_pki("t", &["github.com".into()]).unwrap();
        assert_ne!(pem, pem2, "every lease gets its own CA");
    }
}
