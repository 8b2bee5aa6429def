//! GitHub credential injection for one sandbox.
//!
//! For the GitHub hosts only (github.com and api.github.com by default), the
//! door ends the sandbox's TLS itself, with a certificate from a CA made for
//! this lease alone and trusted only through the CA bundle bound into this
//! sandbox. Each request then gets the lease's GitHub App installation token
//! (minted on the host by `moat_creds::GithubBroker`, down-scoped to the
//! lease's repositories) and goes to the configured upstream over verified
//! TLS. Pushes to protected branches are refused here, whatever the token
//! may do: `git push` over smart HTTP by reading the pushed ref updates, and
//! the REST and GraphQL calls that move a branch by reading their paths and
//! bodies.
//!
//! Must never: hand the token or anything of the App to the sandbox, accept a
//! credential other than this lease's placeholder, intercept a host that is not
//! configured, forward a ref update to a protected branch it could not read,
//! or put a token, placeholder, header value or body in a log or audit record.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use base64::Engine as _;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use moat_creds::{GithubBroker, InstallationToken, Scope, Secret};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::rustls;

use crate::llm::{constant_time_eq, random_hex, send_upstream, upstream_tls, UpstreamUrl};
use crate::STEP_TIMEOUT;

pub(crate) mod push;
use push::{drain, push_refusal, read_push_commands, Prefixed};

/// Where the sandbox finds the system roots plus its lease CA.
pub const CA_BUNDLE_PATH: &str = "/run/moat/ca-bundle.pem";
/// The host's bundle of trusted roots (Debian's ca-certificates).
pub const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// Branches nobody pushes to through moat unless the operator says otherwise.
pub const DEFAULT_PROTECTED: [&str; 2] = ["main", "master"];
/// Permissions a token gets unless the operator says otherwise.
pub const DEFAULT_PERMISSIONS: [(&str, &str); 2] =
    [("contents", "write"), ("pull_requests", "write")];
/// Largest JSON body read to judge a REST or GraphQL call.
const MAX_JUDGED_BODY: usize = 64 * 1024 * 1024;
/// The variables that make TLS clients trust the lease CA.
const CA_VARS: [&str; 5] = [
    "SSL_CERT_FILE",
    "GIT_SSL_CAINFO",
    "NODE_EXTRA_CA_CERTS",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
];
/// GraphQL mutations that move, make or delete a branch or merge into one.
const BRANCH_MUTATIONS: [&str; 9] = [
    "createcommitonbranch",
    "mergepullrequest",
    "mergebranch",
    "updateref",
    "deleteref",
    "createref",
    "enablepullrequestautomerge",
    "branchprotectionrule",
    "updatepullrequestbranch",
];

/// What a GitHub host is for, which decides how the token is presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostRole {
    /// git smart HTTP (github.com): `Authorization: Basic x-access-token:TOKEN`.
    Git,
    /// The REST and GraphQL API (api.github.com): `Authorization: Bearer TOKEN`.
    Api,
    /// GitHub Enterprise Server: one host for both, the API under `/api/`
    /// (`/api/v3/...`, `/api/graphql`), git everywhere else.
    Enterprise,
}

/// One host the door intercepts, and where its requests go.
#[derive(Debug, Clone)]
pub struct InterceptedHost {
    /// The name the sandbox uses (lower case).
    pub name: String,
    pub role: HostRole,
    pub upstream: UpstreamUrl,
}

/// GitHub access for one lease.
#[derive(Clone)]
pub struct GithubAccess {
    /// One broker per lease: revoking its tokens must not end another lease's.
    pub broker: Arc<GithubBroker>,
    pub scope: Scope,
    pub hosts: Vec<InterceptedHost>,
    /// Branch names or patterns (`release/*`, without `refs/heads/`) no
    /// push may update.
    pub protected_branches: Vec<String>,
    /// Whether API calls may add or change `.github/workflows/` (without it
    /// the token has no `workflows` permission either, so GitHub itself
    /// refuses git pushes that touch them).
    pub workflows_write: bool,
    /// A host directory, traversable by sandbox users, where the door writes
    /// this lease's CA bundle.
    pub state_dir: PathBuf,
}

impl std::fmt::Debug for GithubAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GithubAccess")
            .field("scope", &self.scope)
            .field("hosts", &self.hosts)
            .field("protected_branches", &self.protected_branches)
            .finish_non_exhaustive()
    }
}

impl GithubAccess {
    /// The intercepted hosts from moat's settings: the names the sandbox uses,
    /// `MOAT_GITHUB_HOST` (default github.com) and `MOAT_GITHUB_API_HOST`
    /// (default api.github.com), go to `MOAT_GITHUB_URL` (default
    /// `https://github.com`) and `MOAT_GITHUB_API_URL` (default
    /// `https://api.github.com`); `http://` only with
    /// `MOAT_GITHUB_ALLOW_PLAIN_HTTP=1`. When both names are the same (GitHub
    /// Enterprise Server), that one host serves both, by path.
    pub fn hosts_from_env(
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Vec<InterceptedHost>, String> {
        let plain = env("MOAT_GITHUB_ALLOW_PLAIN_HTTP").as_deref() == Some("1");
        let name_of = |var: &str, default: &str| -> Result<String, String> {
            let raw = env(var).unwrap_or_else(|| default.to_string());
            moat_policy::network::normalize_name(&raw)
                .filter(|n| moat_policy::network::parse_ip_literal(n).is_none())
                .ok_or_else(|| format!("{var}: {raw:?} is not a host name"))
        };
        let git_name = name_of("MOAT_GITHUB_HOST", "github.com")?;
        let api_name = name_of("MOAT_GITHUB_API_HOST", "api.github.com")?;
        let same = git_name == api_name;
        let mut hosts: Vec<InterceptedHost> = Vec::new();
        for (name, role, var, default) in [
            (
                git_name,
                if same {
                    HostRole::Enterprise
                } else {
                    HostRole::Git
                },
                "MOAT_GITHUB_URL",
                "https://github.com",
            ),
            (
                api_name,
                HostRole::Api,
                "MOAT_GITHUB_API_URL",
                moat_creds::DEFAULT_API_URL,
            ),
        ] {
            if same && role == HostRole::Api {
                continue;
            }
            let url = env(var).unwrap_or_else(|| default.to_string());
            let upstream = UpstreamUrl::parse(&url, plain).map_err(|e| {
                format!(
                    "{var}: {}",
                    e.replace("MOAT_LLM_ALLOW_PLAIN_HTTP", "MOAT_GITHUB_ALLOW_PLAIN_HTTP")
                )
            })?;
            hosts.push(InterceptedHost {
                name,
                role,
                upstream,
            });
        }
        Ok(hosts)
    }
}

/// One request through the interception, for the audit log. Never holds a
/// header value, a query string or a body.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct GithubRecord {
    pub ts_ms: u64,
    pub lease: String,
    /// Always `github`.
    pub kind: &'static str,
    pub method: String,
    pub host: String,
    pub path: String,
    pub status: u16,
    /// `allowed` or `denied`.
    pub verdict: &'static str,
    pub reason: Option<String>,
    pub duration_ms: u64,
}

/// A token minted or revoked for a lease (from the broker's audit events).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TokenRecord {
    pub ts_ms: u64,
    pub lease: String,
    /// Always `github-token`.
    pub kind: &'static str,
    /// `minted` or `revoked`.
    pub event: &'static str,
    pub repositories: Vec<String>,
    pub permissions: std::collections::BTreeMap<String, String>,
    /// Unix seconds.
    pub expires_at: i64,
}

/// Hands the broker's mint and revoke events to a door's audit log, named
/// for the lease. Give it to `GithubBroker::new`.
pub struct TokenAudit {
    pub lease: String,
    pub audit: Arc<dyn crate::Audit>,
}

impl moat_creds::AuditSink for TokenAudit {
    fn record(&self, event: &moat_creds::GithubAudit) {
        let (ev, repositories, permissions, expires_at) = match event {
            moat_creds::GithubAudit::Minted {
                repositories,
                permissions,
                expires_at,
            } => ("minted", repositories, permissions, expires_at),
            moat_creds::GithubAudit::Revoked {
                repositories,
                permissions,
                expires_at,
            } => ("revoked", repositories, permissions, expires_at),
        };
        self.audit.record_token(&TokenRecord {
            ts_ms: crate::now_ms(),
            lease: self.lease.clone(),
            kind: "github-token",
            event: ev,
            repositories: repositories.clone(),
            permissions: permissions.clone(),
            expires_at: *expires_at,
        });
    }
}

/// The lease's running GitHub state inside its door.
pub(crate) struct GithubState {
    access: GithubAccess,
    placeholder: Secret,
    server_tls: Arc<rustls::ServerConfig>,
    client_tls: Arc<rustls::ClientConfig>,
    bundle: PathBuf,
    /// Every token this lease used, for revocation when it ends.
    used: Mutex<Vec<InstallationToken>>,
    /// What reached GitHub since the last `take_activity` (bounded).
    activity: Mutex<Vec<GithubActivity>>,
}

/// Activities kept between two `take_activity` calls; later ones are dropped.
const MAX_ACTIVITY: usize = 100;
/// Largest pull-request answer read for its number and link.
const MAX_PR_ANSWER: usize = 1024 * 1024;

/// Something the door saw reach GitHub, told in the turn's answer: the
/// door's own record, never the agent's account of it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum GithubActivity {
    /// A push went upstream (GitHub answered `status`): these ref updates.
    /// An HTTP 200 means GitHub took the push request; whether it accepted
    /// each ref is in git's own output (its report-status is not read here).
    Pushed {
        repo: String,
        refs: Vec<String>,
        status: u16,
    },
    /// A pull request was opened.
    PullRequest {
        repo: String,
        number: u64,
        url: String,
    },
}

impl std::fmt::Display for GithubActivity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GithubActivity::Pushed { repo, refs, status } => {
                let names: Vec<&str> = refs
                    .iter()
                    .map(|r| r.strip_prefix("refs/heads/").unwrap_or(r))
                    .collect();
                if (200..300).contains(status) {
                    write!(f, "pushed {} to {repo}", names.join(", "))
                } else {
                    write!(
                        f,
                        "a push of {} to {repo} failed (GitHub answered {status})",
                        names.join(", ")
                    )
                }
            }
            GithubActivity::PullRequest { repo, number, url } => {
                write!(f, "opened pull request #{number} in {repo}: {url}")
            }
        }
    }
}

/// A ref name as `git check-ref-format` would accept it, and printable:
/// what may be shown in moat's record and stored as a link.
fn plain_ref(r: &str) -> bool {
    r.len() <= 255
        && r.starts_with("refs/")
        && !r.contains("..")
        && !r.contains("@{")
        && !r.ends_with('/')
        && !r.ends_with(".lock")
        && !r.ends_with('.')
        && r.bytes()
            .all(|b| b.is_ascii_graphic() && !b"~^:?*[\\".contains(&b))
}

/// `owner/name` from a git path (`/owner/name.git/...`) or an API path
/// (`/repos/owner/name/...`); sandbox-supplied, so bounded and plain.
fn repo_of(path: &str, api: bool) -> Option<String> {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (o, n) = if api {
        (*segs.get(1)?, *segs.get(2)?)
    } else {
        (*segs.first()?, *segs.get(1)?)
    };
    let n = n.strip_suffix(".git").unwrap_or(n);
    let plain = |s: &str| {
        !s.is_empty()
            && s.len() <= 100
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    };
    (plain(o) && plain(n)).then(|| format!("{o}/{n}"))
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

impl GithubState {
    /// Makes the lease CA and writes the sandbox's CA bundle (the system's
    /// roots plus the lease CA) into the access's state directory.
    pub(crate) fn new(lease: &str, access: GithubAccess) -> std::io::Result<GithubState> {
        let names: Vec<String> = access.hosts.iter().map(|h| h.name.clone()).collect();
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
        let client_tls = upstream_tls()?;
        let mut bundle_text = std::fs::read_to_string(SYSTEM_BUNDLE).unwrap_or_default();
        if !bundle_text.is_empty() && !bundle_text.ends_with('\n') {
            bundle_text.push('\n');
        }
        bundle_text.push_str(&format!(
            "# moat lease CA for {lease} (trusted in this sandbox only)\n"
        ));
        bundle_text.push_str(&ca_pem);
        let bundle = write_bundle(&access.state_dir, &bundle_text)?;
        Ok(GithubState {
            access,
            placeholder: Secret::new(format!("ghs_moat{}", random_hex(16)?)),
            server_tls: Arc::new(server),
            client_tls,
            bundle,
            used: Mutex::new(Vec::new()),
            activity: Mutex::new(Vec::new()),
        })
    }

    fn note(&self, a: GithubActivity) {
        if let Ok(mut v) = self.activity.lock() {
            if v.len() < MAX_ACTIVITY {
                v.push(a);
            }
        }
    }

    /// What reached GitHub since the last call, oldest first.
    pub(crate) fn take_activity(&self) -> Vec<GithubActivity> {
        self.activity
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
    }

    /// The intercepted host named `name` (already normalized), if any.
    pub(crate) fn host(&self, name: &str) -> Option<&InterceptedHost> {
        self.access.hosts.iter().find(|h| h.name == name)
    }

    /// Variables for the sandbox: the placeholder token and the CA bundle.
    pub(crate) fn client_env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            (
                "GH_TOKEN".to_string(),
                self.placeholder.expose().to_string(),
            ),
            (
                "GITHUB_TOKEN".to_string(),
                self.placeholder.expose().to_string(),
            ),
        ];
        for v in CA_VARS {
            env.push((v.to_string(), CA_BUNDLE_PATH.to_string()));
        }
        env
    }

    /// The host file bound read-only at [`CA_BUNDLE_PATH`].
    pub(crate) fn bundle_path(&self) -> &Path {
        &self.bundle
    }

    /// Revokes every token this lease used; returns how many failed.
    pub(crate) async fn revoke_all(&self) -> usize {
        self.revoke_all_counted().await.1
    }

    /// Revokes every token this lease used; returns (how many, how many failed).
    pub(crate) async fn revoke_all_counted(&self) -> (usize, usize) {
        let tokens: Vec<InstallationToken> = self
            .used
            .lock()
            .map(|mut u| std::mem::take(&mut *u))
            .unwrap_or_default();
        let mut failed = 0;
        let used = tokens.len();
        for t in tokens {
            if let Err(e) = self.access.broker.revoke(&t).await {
                tracing::warn!(error = %e, "could not revoke a GitHub installation token");
                failed += 1;
            }
        }
        (used, failed)
    }

    async fn token(&self) -> Result<InstallationToken, moat_creds::CredsError> {
        let t = self.access.broker.token(&self.access.scope).await?;
        if let Ok(mut used) = self.used.lock() {
            if !used.iter().any(|u| u.token.expose() == t.token.expose()) {
                used.push(t.clone());
            }
        }
        Ok(t)
    }
}

impl Drop for GithubState {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.bundle);
        // The directory goes too once no other door of this run uses it.
        let _ = std::fs::remove_dir(&self.access.state_dir);
    }
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
/// read and checked against the host, is `hello`) and serves HTTP/1.1 on it.
pub(crate) async fn serve_tls<S>(state: Arc<crate::State>, client: S, hello: Vec<u8>, host: String)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Some(gh) = state.github.as_ref() else {
        return;
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(gh.server_tls.clone());
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
        async move { Ok::<_, Infallible>(handle(st, host, req).await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(STEP_TIMEOUT)
        .serve_connection(TokioIo::new(tls), svc)
        .await;
}

type GhBody = BoxBody<Bytes, hyper::Error>;

fn full(b: impl Into<Bytes>) -> GhBody {
    Full::new(b.into())
        .map_err(|e: Infallible| match e {})
        .boxed()
}

/// A JSON error the way GitHub's API shapes one.
fn api_error(status: StatusCode, msg: &str) -> Response<GhBody> {
    let body = json!({"message": msg, "documentation_url": "https://docs.github.com/rest", "status": status.as_u16().to_string()});
    let mut r = Response::new(full(body.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    r
}

struct Call {
    method: String,
    host: String,
    path: String,
    t0: Instant,
}

impl Call {
    fn audit(&self, st: &crate::State, status: u16, reason: Option<String>) {
        st.audit_github(GithubRecord {
            ts_ms: 0,
            lease: String::new(),
            kind: "github",
            method: self.method.clone(),
            host: self.host.clone(),
            path: self.path.chars().take(1024).collect(),
            status,
            verdict: if reason.is_none() {
                "allowed"
            } else {
                "denied"
            },
            reason,
            duration_ms: self.t0.elapsed().as_millis() as u64,
        });
    }
}

/// What the sandbox sent as a credential, judged against the placeholder.
#[derive(Debug, PartialEq, Eq)]
enum Presented {
    None,
    Placeholder,
    Other,
}

fn presented(h: &HeaderMap, placeholder: &str) -> Presented {
    let mut values = h.get_all(header::AUTHORIZATION).iter();
    let Some(v) = values.next() else {
        return Presented::None;
    };
    if values.next().is_some() {
        return Presented::Other;
    }
    let Ok(v) = v.to_str() else {
        return Presented::Other;
    };
    let (scheme, rest) = v.trim().split_once(' ').unwrap_or((v, ""));
    let rest = rest.trim();
    let secret = match scheme.to_ascii_lowercase().as_str() {
        "bearer" | "token" => rest.to_string(),
        "basic" => {
            let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(rest) else {
                return Presented::Other;
            };
            let Ok(text) = String::from_utf8(raw) else {
                return Presented::Other;
            };
            match text.split_once(':') {
                Some((_, pass)) => pass.to_string(),
                None => return Presented::Other,
            }
        }
        _ => return Presented::Other,
    };
    if constant_time_eq(secret.as_bytes(), placeholder.as_bytes()) {
        Presented::Placeholder
    } else {
        Presented::Other
    }
}

/// Request headers never forwarded: credentials of any kind, hop-by-hop
/// headers, and method overrides.
fn strip_request_header(k: &HeaderName) -> bool {
    matches!(
        k.as_str(),
        "authorization"
            | "proxy-authorization"
            | "cookie"
            | "host"
            | "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "upgrade"
            | "x-http-method-override"
            | "x-http-method"
            | "x-method-override"
    )
}

/// `%XX`-decodes a path; `None` if an escape is malformed or not UTF-8.
fn decode_path(p: &str) -> Option<String> {
    let b = p.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Why a branch name is protected, if it is.
fn protected_branch<'a>(protected: &'a [String], refname: &str) -> Option<&'a str> {
    let branch = refname.strip_prefix("refs/heads/").unwrap_or(refname);
    protected
        .iter()
        .find(|p| moat_policy::github::branch_matches(p, branch))
        .map(String::as_str)
}

fn refusal_text(branch: &str) -> String {
    format!("moat: pushes to the protected branch {branch} are refused; push a feature branch and open a pull request")
}

/// What a REST or GraphQL call needs before it may pass.
enum ApiJudgement {
    /// Passes without reading the body.
    Pass,
    /// Refused now, with this reason.
    Refuse(String),
    /// The JSON body decides.
    Body(fn(&Value, &[String]) -> Result<(), String>),
}

fn branch_field(field: &'static str) -> fn(&Value, &[String]) -> Result<(), String> {
    match field {
        "ref" => |v, p| match v.get("ref").and_then(Value::as_str) {
            Some(r) => match protected_branch(p, r) {
                Some(b) if r.starts_with("refs/heads/") => Err(refusal_text(b)),
                _ => Ok(()),
            },
            None => Ok(()),
        },
        "base" => |v, p| match v.get("base").and_then(Value::as_str) {
            Some(r) => protected_branch(p, r).map_or(Ok(()), |b| Err(refusal_text(b))),
            None => Err("moat: a merge must name its base branch".into()),
        },
        _ => |v, p| {
            match v.get("branch").and_then(Value::as_str) {
            Some(r) => protected_branch(p, r).map_or(Ok(()), |b| Err(refusal_text(b))),
            None => Err("moat: name the branch (\"branch\": ...); without one this call writes to the default branch, which may be protected".into()),
        }
        },
    }
}

const WORKFLOWS_REFUSAL: &str = "moat: changes to .github/workflows/ are refused for this channel (workflows run with the repository's secrets); an operator can grant github.permissions.workflows = \"write\"";

/// A `POST git/trees` body: refused when an entry could be, or be inside,
/// `.github/workflows` (trees are built bottom-up, so a `workflows` entry
/// of any tree counts).
fn no_workflow_tree(v: &Value, _: &[String]) -> Result<(), String> {
    let Some(entries) = v.get("tree").and_then(Value::as_array) else {
        return Err("moat: a tree must be {\"tree\": [...]}".into());
    };
    for e in entries {
        let path = e.get("path").and_then(Value::as_str).unwrap_or("");
        let lower = path.to_ascii_lowercase();
        let parts: Vec<&str> = lower.split('/').collect();
        if parts.contains(&"workflows") {
            return Err(WORKFLOWS_REFUSAL.into());
        }
    }
    Ok(())
}

/// A GraphQL body: one `{"query": ...}` object or a batch of them. Anything
/// else cannot be judged and is refused.
fn graphql_mutation(v: &Value, _: &[String]) -> Result<(), String> {
    let one = |doc: &Value| -> Result<(), String> {
        let Some(query) = doc.get("query").and_then(Value::as_str) else {
            return Err("moat: a GraphQL request must be {\"query\": \"...\"}".into());
        };
        let query = query.to_ascii_lowercase();
        for m in BRANCH_MUTATIONS {
            if query.contains(m) {
                return Err(format!("moat: the GraphQL mutation {m} can update a protected branch and is refused; use git push to a feature branch"));
            }
        }
        Ok(())
    };
    match v {
        Value::Array(batch) => batch.iter().try_for_each(one),
        doc => one(doc),
    }
}

/// Judges a REST or GraphQL call by method and (decoded) path.
fn judge_api(
    method: &Method,
    path: &str,
    protected: &[String],
    workflows_write: bool,
) -> ApiJudgement {
    let mut segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    // `/repositories/ID/...` is GitHub's alias of `/repos/OWNER/REPO/...`.
    if segs.len() >= 2 && segs[0].eq_ignore_ascii_case("repositories") {
        segs.splice(0..1, ["repos", "-"]);
    }
    let lower: Vec<String> = segs.iter().map(|s| s.to_ascii_lowercase()).collect();
    let l: Vec<&str> = lower.iter().map(String::as_str).collect();
    // Methods are judged whatever their case (fail closed on `put`).
    let upper = method.as_str().to_ascii_uppercase();
    let m = upper.as_str();
    if l.as_slice() == ["graphql"] && m != "POST" {
        return ApiJudgement::Refuse("moat: GraphQL is accepted by POST only".into());
    }
    if m == "GET" || m == "HEAD" || m == "OPTIONS" {
        return ApiJudgement::Pass;
    }
    match l.as_slice() {
        ["graphql"] => ApiJudgement::Body(graphql_mutation),
        ["repos", _, _, "git", "refs"] if m == "POST" => ApiJudgement::Body(branch_field("ref")),
        ["repos", _, _, "git", "refs", "heads", ..] => {
            let branch = segs[6..].join("/");
            match protected_branch(protected, &branch) {
                Some(b) => ApiJudgement::Refuse(refusal_text(b)),
                None => ApiJudgement::Pass,
            }
        }
        ["repos", _, _, "contents", rest @ ..] if m == "PUT" || m == "DELETE" => {
            if !workflows_write && rest.len() >= 2 && rest[0] == ".github" && rest[1] == "workflows" {
                return ApiJudgement::Refuse(WORKFLOWS_REFUSAL.into());
            }
            ApiJudgement::Body(branch_field("branch"))
        }
        ["repos", _, _, "git", "trees"] if m == "POST" && !workflows_write => {
            ApiJudgement::Body(no_workflow_tree)
        }
        ["repos", _, _, "merges"] => ApiJudgement::Body(branch_field("base")),
        ["repos", _, _, "merge-upstream"] => ApiJudgement::Body(branch_field("branch")),
        ["repos", _, _, "pulls", _, "update-branch"] => ApiJudgement::Refuse(
            "moat: updating a pull request's branch through the API is refused (it merges the base into the head, which may be protected); merge locally and push".into(),
        ),
        ["repos", _, _, "pulls", _, "merge"] => ApiJudgement::Refuse(
            "moat: merging pull requests is refused (the branch it would update is not checked here); a person merges".into(),
        ),
        ["repos", _, _, "branches", ..] => ApiJudgement::Refuse(
            "moat: changing branches (rename, protection) through the API is refused".into(),
        ),
        _ => ApiJudgement::Pass,
    }
}

async fn handle(st: Arc<crate::State>, host: String, req: Request<Incoming>) -> Response<GhBody> {
    let call = Call {
        method: req.method().as_str().chars().take(16).collect(),
        host: host.clone(),
        path: req.uri().path().to_string(),
        t0: Instant::now(),
    };
    let deny = |status: StatusCode, msg: String, resp: Response<GhBody>| {
        call.audit(&st, status.as_u16(), Some(msg));
        resp
    };
    let Some(gh) = st.github.as_ref() else {
        let msg = "moat: GitHub is not enabled for this sandbox".to_string();
        return deny(
            StatusCode::NOT_FOUND,
            msg.clone(),
            api_error(StatusCode::NOT_FOUND, &msg),
        );
    };
    let Some(target) = gh.host(&host).cloned() else {
        let msg = format!("moat: {host} is not a GitHub host of this sandbox");
        return deny(
            StatusCode::NOT_FOUND,
            msg.clone(),
            api_error(StatusCode::NOT_FOUND, &msg),
        );
    };
    if presented(req.headers(), gh.placeholder.expose()) == Presented::Other {
        let msg = "moat: Bad credentials; only this sandbox's GH_TOKEN placeholder (or no credential) is accepted".to_string();
        let mut r = api_error(StatusCode::UNAUTHORIZED, &msg);
        if target.role != HostRole::Api {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"GitHub\""),
            );
        }
        return deny(StatusCode::UNAUTHORIZED, msg, r);
    }
    let Some(path) = decode_path(req.uri().path()) else {
        let msg = "moat: the request path has a malformed %-escape".to_string();
        return deny(
            StatusCode::BAD_REQUEST,
            msg.clone(),
            api_error(StatusCode::BAD_REQUEST, &msg),
        );
    };
    if path.split('/').any(|s| s == "." || s == "..") {
        let msg = "moat: dot segments are not allowed in the path".to_string();
        return deny(
            StatusCode::BAD_REQUEST,
            msg.clone(),
            api_error(StatusCode::BAD_REQUEST, &msg),
        );
    }
    let protected = &gh.access.protected_branches;
    let (role, path) = effective_role(target.role, path);
    let (parts, mut body) = req.into_parts();
    let mut pushed: Option<Vec<String>> = None;
    let opens_pr = role == HostRole::Api && parts.method.as_str().eq_ignore_ascii_case("POST") && {
        let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        segs.len() == 4
            && segs[0].eq_ignore_ascii_case("repos")
            && segs[3].eq_ignore_ascii_case("pulls")
    };
    // Decide what body goes upstream, refusing writes to protected branches.
    let out_body: GhBody = match role {
        HostRole::Git
            if parts.method.as_str().eq_ignore_ascii_case("POST")
                && path
                    .trim_end_matches('/')
                    .rsplit('/')
                    .next()
                    .is_some_and(|last| last.to_ascii_lowercase().contains("receive-pack")) =>
        {
            let encoded = parts
                .headers
                .get(header::CONTENT_ENCODING)
                .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
            if encoded {
                let msg = "moat: a compressed push cannot be checked for protected branches and is refused".to_string();
                return deny(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    msg.clone(),
                    api_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, &msg),
                );
            }
            let (cmds, first, ended) = match read_push_commands(&mut body).await {
                Ok(v) => v,
                Err(msg) => {
                    return deny(
                        StatusCode::BAD_REQUEST,
                        msg.clone(),
                        api_error(StatusCode::BAD_REQUEST, &msg),
                    );
                }
            };
            if let Some(b) = cmds.refs.iter().find_map(|r| {
                r.starts_with("refs/heads/")
                    .then(|| protected_branch(protected, r))
                    .flatten()
            }) {
                let b = b.to_string();
                // Nothing of it goes upstream; the client gets the answer
                // once it has sent its pack.
                if !ended && !drain(&mut body).await {
                    tracing::info!(
                        "a refused push's pack was cut short; its client may not see the reason"
                    );
                }
                let resp = push_refusal(&cmds, &b);
                return deny(resp.status(), refusal_text(&b), resp);
            }
            // Only names git itself would accept go into moat's record (a
            // name with a newline could forge lines of it).
            pushed = Some(
                cmds.refs
                    .iter()
                    .filter(|r| plain_ref(r))
                    .take(50)
                    .cloned()
                    .collect(),
            );
            Prefixed {
                first: Some(first.freeze()),
                rest: (!ended).then_some(body),
            }
            .boxed()
        }
        HostRole::Api => {
            match judge_api(&parts.method, &path, protected, gh.access.workflows_write) {
                ApiJudgement::Pass => body.boxed(),
                ApiJudgement::Refuse(msg) => {
                    return deny(
                        StatusCode::FORBIDDEN,
                        msg.clone(),
                        api_error(StatusCode::FORBIDDEN, &msg),
                    );
                }
                ApiJudgement::Body(check) => {
                    let bytes = match Limited::new(body, MAX_JUDGED_BODY).collect().await {
                        Ok(b) => b.to_bytes(),
                        Err(_) => {
                            let msg = format!("moat: the request body is unreadable or over {MAX_JUDGED_BODY} bytes");
                            return deny(
                                StatusCode::PAYLOAD_TOO_LARGE,
                                msg.clone(),
                                api_error(StatusCode::PAYLOAD_TOO_LARGE, &msg),
                            );
                        }
                    };
                    let Ok(doc) = serde_json::from_slice::<Value>(&bytes) else {
                        let msg = "moat: this call writes to a repository and its body is not JSON, so its branch cannot be checked".to_string();
                        return deny(
                            StatusCode::BAD_REQUEST,
                            msg.clone(),
                            api_error(StatusCode::BAD_REQUEST, &msg),
                        );
                    };
                    if let Err(msg) = check(&doc, protected) {
                        return deny(
                            StatusCode::FORBIDDEN,
                            msg.clone(),
                            api_error(StatusCode::FORBIDDEN, &msg),
                        );
                    }
                    full(bytes)
                }
            }
        }
        HostRole::Git | HostRole::Enterprise => body.boxed(),
    };
    let token = match gh.token().await {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(error = %e, "no GitHub installation token");
            let msg = format!("moat: could not get a GitHub token for this sandbox: {e}");
            return deny(
                StatusCode::BAD_GATEWAY,
                msg.clone(),
                api_error(StatusCode::BAD_GATEWAY, &msg),
            );
        }
    };
    let up = &target.upstream;
    let mut uri = format!("{}{}", up.base_path, parts.uri.path());
    if let Some(q) = parts.uri.query() {
        uri.push('?');
        uri.push_str(q);
    }
    let mut out = Request::builder()
        .method(parts.method.clone())
        .uri(uri.as_str());
    #[allow(clippy::expect_used, reason = "a fresh builder has headers")]
    let headers = out.headers_mut().expect("a fresh builder");
    for (k, v) in &parts.headers {
        // The answer to opening a pull request is read for moat's record:
        // asked for uncompressed.
        let encoding = opens_pr && k == header::ACCEPT_ENCODING;
        if !strip_request_header(k) && !encoding {
            headers.append(k.clone(), v.clone());
        }
    }
    if let Ok(h) = HeaderValue::from_str(&up.authority()) {
        headers.insert(header::HOST, h);
    }
    let auth = match role {
        HostRole::Git | HostRole::Enterprise => format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD
                .encode(format!("x-access-token:{}", token.token.expose()))
        ),
        HostRole::Api => format!("Bearer {}", token.token.expose()),
    };
    let Ok(mut auth) = HeaderValue::from_str(&auth) else {
        let msg = "moat: the installation token is not a valid header value".to_string();
        return deny(
            StatusCode::BAD_GATEWAY,
            msg.clone(),
            api_error(StatusCode::BAD_GATEWAY, &msg),
        );
    };
    auth.set_sensitive(true);
    headers.insert(header::AUTHORIZATION, auth);
    let Ok(out) = out.body(out_body) else {
        let msg = "moat: malformed request".to_string();
        return deny(
            StatusCode::BAD_REQUEST,
            msg.clone(),
            api_error(StatusCode::BAD_REQUEST, &msg),
        );
    };
    match send_upstream(&gh.client_tls, up, out).await {
        Ok(resp) => {
            let (mut rparts, rbody) = resp.into_parts();
            for h in [
                "connection",
                "keep-alive",
                "proxy-connection",
                "te",
                "trailer",
                "upgrade",
                "set-cookie",
            ] {
                rparts.headers.remove(h);
            }
            call.audit(&st, rparts.status.as_u16(), None);
            if let (Some(refs), Some(repo)) = (pushed, repo_of(&path, false)) {
                gh.note(GithubActivity::Pushed {
                    repo,
                    refs,
                    status: rparts.status.as_u16(),
                });
            }
            if opens_pr && rparts.status == StatusCode::CREATED {
                // Read the answer for the pull request's number and link,
                // then hand the same bytes on.
                let bytes = match Limited::new(rbody, MAX_PR_ANSWER).collect().await {
                    Ok(b) => b.to_bytes(),
                    Err(_) => {
                        let msg = "moat: GitHub's answer to opening a pull request was unreadable or too large".to_string();
                        return api_error(StatusCode::BAD_GATEWAY, &msg);
                    }
                };
                if let (Ok(v), Some(repo)) = (
                    serde_json::from_slice::<Value>(&bytes),
                    repo_of(&path, true),
                ) {
                    let number = v.get("number").and_then(Value::as_u64);
                    let url = v.get("html_url").and_then(Value::as_str).filter(|u| {
                        u.len() <= 500 && u.starts_with("http") && !u.chars().any(char::is_control)
                    });
                    if let (Some(number), Some(url)) = (number, url) {
                        gh.note(GithubActivity::PullRequest {
                            repo,
                            number,
                            url: url.to_string(),
                        });
                    }
                }
                return Response::from_parts(rparts, full(bytes));
            }
            Response::from_parts(rparts, rbody.boxed())
        }
        Err(e) => {
            tracing::warn!(host = %up.host, error = %e, "GitHub upstream failed");
            let msg = format!(
                "moat: the upstream {} could not be reached: {e}",
                up.authority()
            );
            deny(
                StatusCode::BAD_GATEWAY,
                msg.clone(),
                api_error(StatusCode::BAD_GATEWAY, &msg),
            )
        }
    }
}

/// The role a request plays, and the path judged for it: on an Enterprise
/// host the API lives under `/api/v3` (REST) and `/api/graphql`.
fn effective_role(role: HostRole, path: String) -> (HostRole, String) {
    if role != HostRole::Enterprise {
        return (role, path);
    }
    let lower = path.to_ascii_lowercase();
    if lower == "/api/graphql" || lower.starts_with("/api/graphql/") {
        return (HostRole::Api, "/graphql".to_string());
    }
    if lower.starts_with("/api/v3/") || lower == "/api/v3" {
        return (HostRole::Api, path["/api/v3".len()..].to_string());
    }
    if lower.starts_with("/api/") {
        return (HostRole::Api, path);
    }
    (HostRole::Git, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prot() -> Vec<String> {
        vec!["main".into(), "master".into()]
    }

    #[test]
    fn placeholder_forms_are_recognised() {
        let ph = "ghs_mootabc";
        let mut h = HeaderMap::new();
        assert_eq!(presented(&h, ph), Presented::None);
        h.insert(
            "authorization",
            HeaderValue::from_static("token ghs_mootabc"),
        );
        assert_eq!(presented(&h, ph), Presented::Placeholder);
        h.insert(
            "authorization",
            HeaderValue::from_static("Bearer ghs_mootabc"),
        );
        assert_eq!(presented(&h, ph), Presented::Placeholder);
        let b = base64::engine::general_purpose::STANDARD.encode("x-access-token:ghs_mootabc");
        h.insert(
            "authorization",
            HeaderValue::from_str(&format!("Basic {b}")).unwrap(),
        );
        assert_eq!(presented(&h, ph), Presented::Placeholder);
        h.insert("authorization", HeaderValue::from_static("Bearer ghp_real"));
        assert_eq!(presented(&h, ph), Presented::Other);
        h.insert("authorization", HeaderValue::from_static("Basic !!!"));
        assert_eq!(presented(&h, ph), Presented::Other);
        h.insert(
            "authorization",
            HeaderValue::from_static("token ghs_mootabc"),
        );
        h.append(
            "authorization",
            HeaderValue::from_static("token ghs_mootabc"),
        );
        assert_eq!(presented(&h, ph), Presented::Other);
    }

    #[test]
    fn only_plain_ref_names_reach_the_record() {
        assert!(plain_ref("refs/heads/moat/1-fix"));
        assert!(!plain_ref("refs/heads/x\n- opened pull request #12"));
        assert!(!plain_ref("refs/heads/a b"));
        assert!(!plain_ref("refs/heads/a..b"));
        assert!(!plain_ref("refs/heads/x.lock"));
        assert!(!plain_ref("heads/x"));
        let p = vec!["main".to_string()];
        assert!(matches!(
            judge_api(&Method::PUT, "/repos/o/r/pulls/3/update-branch", &p, true),
            ApiJudgement::Refuse(_)
        ));
        let ApiJudgement::Body(f) = judge_api(&Method::POST, "/graphql", &p, true) else {
            panic!("graphql is read")
        };
        assert!(f(
            &json!({"query": "mutation { updatePullRequestBranch(input: {}) { x } }"}),
            &p
        )
        .is_err());
    }

    #[test]
    fn workflow_changes_need_the_grant_and_patterns_protect() {
        let p = vec!["main".to_string(), "release/*".to_string()];
        let judge = |m: &str, path: &str, w: bool| {
            judge_api(&Method::from_bytes(m.as_bytes()).unwrap(), path, &p, w)
        };
        assert!(matches!(
            judge("PUT", "/repos/o/r/contents/.github/workflows/ci.yml", false),
            ApiJudgement::Refuse(_)
        ));
        assert!(matches!(
            judge(
                "DELETE",
                "/repos/o/r/contents/.github/workflows/ci.yml",
                false
            ),
            ApiJudgement::Refuse(_)
        ));
        assert!(matches!(
            judge("PUT", "/repos/o/r/contents/.github/workflows/ci.yml", true),
            ApiJudgement::Body(_)
        ));
        assert!(matches!(
            judge("PUT", "/repos/o/r/contents/docs/workflows.md", false),
            ApiJudgement::Body(_)
        ));
        let ApiJudgement::Body(f) = judge("POST", "/repos/o/r/git/trees", false) else {
            panic!("trees are read without the grant");
        };
        assert!(f(&json!({"tree": [{"path": ".github/workflows/x.yml"}]}), &p).is_err());
        assert!(f(
            &json!({"tree": [{"path": "workflows", "type": "tree"}]}),
            &p
        )
        .is_err());
        assert!(f(&json!({"tree": [{"path": "src/main.rs"}]}), &p).is_ok());
        assert!(f(&json!({"nottree": 1}), &p).is_err());
        assert!(matches!(
            judge("POST", "/repos/o/r/git/trees", true),
            ApiJudgement::Pass
        ));
        assert!(matches!(
            judge("PATCH", "/repos/o/r/git/refs/heads/release/2.0", false),
            ApiJudgement::Refuse(_)
        ));
        assert!(matches!(
            judge("PATCH", "/repos/o/r/git/refs/heads/releases", false),
            ApiJudgement::Pass
        ));
    }

    #[test]
    fn api_writes_to_protected_branches_are_judged() {
        let p = prot();
        let refuse = |m: &str, path: &str| {
            matches!(
                judge_api(&Method::from_bytes(m.as_bytes()).unwrap(), path, &p, false),
                ApiJudgement::Refuse(_)
            )
        };
        assert!(refuse("PATCH", "/repos/o/r/git/refs/heads/main"));
        assert!(refuse("patch", "/repos/o/r/git/refs/heads/main"));
        assert!(refuse("PATCH", "/repositories/42/git/refs/heads/main"));
        assert!(refuse("DELETE", "/repos/O/R/git/refs/heads/master"));
        assert!(!refuse("PATCH", "/repos/o/r/git/refs/heads/feature"));
        assert!(refuse("PUT", "/repos/o/r/pulls/3/merge"));
        assert!(refuse("POST", "/repos/o/r/branches/main/rename"));
        assert!(matches!(
            judge_api(&Method::GET, "/repos/o/r/git/refs/heads/main", &p, false),
            ApiJudgement::Pass
        ));
        let body = |m: &str, path: &str, v: Value| match judge_api(
            &Method::from_bytes(m.as_bytes()).unwrap(),
            path,
            &p,
            false,
        ) {
            ApiJudgement::Body(f) => f(&v, &p),
            _ => panic!("{m} {path} should read its body"),
        };
        assert!(body("PUT", "/repos/o/r/contents/a.txt", json!({"message":"m"})).is_err());
        assert!(body("PUT", "/repos/o/r/contents/a.txt", json!({"branch":"main"})).is_err());
        assert!(body("PUT", "/repos/o/r/contents/a.txt", json!({"branch":"feat"})).is_ok());
        assert!(body(
            "POST",
            "/repos/o/r/git/refs",
            json!({"ref":"refs/heads/main"})
        )
        .is_err());
        assert!(body("POST", "/repos/o/r/git/refs", json!({"ref":"refs/heads/x"})).is_ok());
        assert!(body(
            "POST",
            "/repos/o/r/merges",
            json!({"base":"master","head":"x"})
        )
        .is_err());
        assert!(body(
            "POST",
            "/graphql",
            json!({"query":"mutation { x: createCommitOnBranch(input: {}) { commit { oid } } }"})
        )
        .is_err());
        assert!(body(
            "POST",
            "/graphql",
            json!({"query":"query { viewer { login } }"})
        )
        .is_ok());
        let batch = json!([{"query": "query { a }"}, {"query": "mutation { mergePullRequest(input: {}) { x } }"}]);
        assert!(body("POST", "/graphql", batch).is_err());
        assert!(body("POST", "/graphql", json!({"variables": {}})).is_err());
        assert!(refuse("GET", "/graphql"));
    }

    #[test]
    fn enterprise_hosts_split_api_and_git_by_path() {
        let env = |k: &str| match k {
            "MOAT_GITHUB_HOST" | "MOAT_GITHUB_API_HOST" => Some("GHE.Corp.Example".to_string()),
            "MOAT_GITHUB_URL" => Some("https://ghe.corp.example".to_string()),
            _ => None,
        };
        let hosts = GithubAccess::hosts_from_env(env).unwrap();
        assert_eq!(hosts.len(), 1);
        assert_eq!(
            (hosts[0].name.as_str(), hosts[0].role),
            ("ghe.corp.example", HostRole::Enterprise)
        );
        let r = |p: &str| effective_role(HostRole::Enterprise, p.to_string());
        assert_eq!(
            r("/api/v3/repos/o/r/git/refs/heads/main"),
            (HostRole::Api, "/repos/o/r/git/refs/heads/main".to_string())
        );
        assert_eq!(r("/API/graphql"), (HostRole::Api, "/graphql".to_string()));
        assert_eq!(
            r("/o/r.git/git-receive-pack"),
            (HostRole::Git, "/o/r.git/git-receive-pack".to_string())
        );
        let default = GithubAccess::hosts_from_env(|_| None).unwrap();
        assert_eq!(
            default
                .iter()
                .map(|h| (h.name.as_str(), h.role))
                .collect::<Vec<_>>(),
            [
                ("github.com", HostRole::Git),
                ("api.github.com", HostRole::Api)
            ]
        );
        assert!(GithubAccess::hosts_from_env(
            |k| (k == "MOAT_GITHUB_HOST").then(|| "10.0.0.1".to_string())
        )
        .is_err());
    }

    #[test]
    fn escaped_paths_are_decoded_before_judging() {
        assert_eq!(
            decode_path("/repos/o/r/git/refs/heads/%6Dain").as_deref(),
            Some("/repos/o/r/git/refs/heads/main")
        );
        assert_eq!(decode_path("/a%2"), None);
        assert_eq!(decode_path("/a%zz"), None);
    }

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
