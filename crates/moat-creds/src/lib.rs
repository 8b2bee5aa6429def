//! Credential brokers that run on the host, never inside a sandbox.
//!
//! Today: the GitHub App broker ([`GithubBroker`]). It signs an App JWT
//! (RS256), exchanges it for an installation token down-scoped to the
//! repositories and permissions asked for, caches that token until 5 minutes
//! before it expires, and revokes it. Secrets are held in [`Secret`], whose
//! `Debug` and `Display` never show them; errors and audit records never
//! carry a token, the JWT or the private key.

#![forbid(unsafe_code)]
// Outside input never reaches an `unwrap`/`expect` (house style); tests may.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

/// The secrets file and the environment-then-file [`secrets::Lookup`].
pub mod secrets;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

/// Default GitHub REST API base.
pub const DEFAULT_API_URL: &str = "https://api.github.com";
/// A cached token is reused until this many seconds before `expires_at`.
pub const REMINT_BEFORE_SECS: i64 = 5 * 60;
/// The App JWT's `iat` is this far in the past (clock drift, as GitHub advises).
pub const JWT_BACKDATE_SECS: i64 = 60;
/// The App JWT's `exp` is this far ahead (GitHub allows at most 10 minutes).
pub const JWT_LIFETIME_SECS: i64 = 9 * 60;
/// Whole-request limit for one GitHub API call.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest GitHub response body read.
const MAX_RESPONSE: usize = 1024 * 1024;

/// A credential. Its `Debug` and `Display` never show it. The LLM proxy
/// (`moat_egress::llm::Secret`) uses this same type.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }
    /// The value itself: only for the header sent to GitHub (or, later, the
    /// door's injection).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Why the broker cannot give a token. Never carries a secret.
#[derive(Debug, thiserror::Error)]
pub enum CredsError {
    #[error("GitHub is not available: {0} is not set")]
    NotConfigured(&'static str),
    #[error("GitHub is not available: {var} is invalid: {reason}")]
    Invalid { var: &'static str, reason: String },
    #[error("GitHub token request refused: {0}")]
    Scope(String),
    #[error("GitHub API: {0}")]
    Api(String),
}

/// Where the GitHub REST API is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path prefix without a trailing slash (`/api/v3` on GitHub Enterprise).
    pub prefix: String,
}

impl ApiUrl {
    /// Parses `http(s)://host[:port][/prefix]`; `http://` only when
    /// `allow_plain_http`.
    pub fn parse(s: &str, allow_plain_http: bool) -> Result<ApiUrl, String> {
        let (tls, rest) = if let Some(r) = s.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = s.strip_prefix("http://") {
            if !allow_plain_http {
                return Err("http:// needs MOAT_GITHUB_ALLOW_PLAIN_HTTP=1 (tests only)".to_string());
            }
            (false, r)
        } else {
            return Err("must start with https://".to_string());
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.contains(['@', '[', ']']) || path.contains(['?', '#']) {
            return Err(
                "use scheme://host[:port][/path] without credentials, query or IPv6 literal"
                    .to_string(),
            );
        }
        let (host, port) = match authority.split_once(':') {
            Some((h, p)) => (h, p.parse::<u16>().map_err(|_| "bad port".to_string())?),
            None => (authority, if tls { 443 } else { 80 }),
        };
        if host.is_empty()
            || !host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
        {
            return Err("bad host".to_string());
        }
        let prefix = path.trim_end_matches('/');
        if prefix.split('/').any(|seg| seg == "." || seg == "..") {
            return Err("bad path".to_string());
        }
        Ok(ApiUrl {
            tls,
            host: host.to_ascii_lowercase(),
            port,
            prefix: prefix.to_string(),
        })
    }

    fn authority(&self) -> String {
        match (self.tls, self.port) {
            (true, 443) | (false, 80) => self.host.clone(),
            _ => format!("{}:{}", self.host, self.port),
        }
    }
}

/// The GitHub App's configuration.
#[derive(Clone)]
pub struct GithubConfig {
    pub app_id: String,
    pub installation_id: String,
    pub private_key: Secret,
    pub api: ApiUrl,
}

impl fmt::Debug for GithubConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GithubConfig")
            .field("app_id", &self.app_id)
            .field("installation_id", &self.installation_id)
            .field("private_key", &self.private_key)
            .field("api", &self.api)
            .finish()
    }
}

impl GithubConfig {
    /// Reads `GITHUB_APP_ID`, `GITHUB_APP_PRIVATE_KEY`,
    /// `GITHUB_APP_INSTALLATION_ID`, `MOAT_GITHUB_API_URL` and
    /// `MOAT_GITHUB_ALLOW_PLAIN_HTTP` from moat's environment.
    pub fn from_env() -> Result<GithubConfig, CredsError> {
        GithubConfig::from_lookup(|k| std::env::var(k).ok())
    }

    /// As [`from_env`](Self::from_env), reading variables through `get`.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<GithubConfig, CredsError> {
        let need = |var: &'static str| match get(var) {
            Some(v) if !v.trim().is_empty() => Ok(v),
            _ => Err(CredsError::NotConfigured(var)),
        };
        let app_id = need("GITHUB_APP_ID")?.trim().to_string();
        if !app_id.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(CredsError::Invalid {
                var: "GITHUB_APP_ID",
                reason: "expected an App ID or client ID".to_string(),
            });
        }
        let private_key = Secret::new(need("GITHUB_APP_PRIVATE_KEY")?.replace("\\n", "\n"));
        let installation_id = need("GITHUB_APP_INSTALLATION_ID")?.trim().to_string();
        if !installation_id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(CredsError::Invalid {
                var: "GITHUB_APP_INSTALLATION_ID",
                reason: "expected a number".to_string(),
            });
        }
        let allow_plain = get("MOAT_GITHUB_ALLOW_PLAIN_HTTP").as_deref() == Some("1");
        let url = get("MOAT_GITHUB_API_URL")
            .filter(|v| !v.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_API_URL.to_string());
        let api = ApiUrl::parse(url.trim(), allow_plain).map_err(|reason| CredsError::Invalid {
            var: "MOAT_GITHUB_API_URL",
            reason,
        })?;
        Ok(GithubConfig {
            app_id,
            installation_id,
            private_key,
            api,
        })
    }
}

/// What a token may do: repository names (without the owner) and
/// permissions (`"contents" => "write"`, ...). Both must be non-empty, since
/// an empty list would ask GitHub for everything the installation can reach.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scope {
    repositories: Vec<String>,
    permissions: BTreeMap<String, String>,
}

impl Scope {
    pub fn new<R, P, K, V>(repositories: R, permissions: P) -> Result<Scope, CredsError>
    where
        R: IntoIterator,
        R::Item: Into<String>,
        P: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let mut repos: Vec<String> = repositories.into_iter().map(Into::into).collect();
        repos.sort();
        repos.dedup();
        if repos.is_empty() {
            return Err(CredsError::Scope("no repositories".to_string()));
        }
        for r in &repos {
            let ok = !r.is_empty()
                && r.len() <= 100
                && r != "."
                && r != ".."
                && r.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
            if !ok {
                return Err(CredsError::Scope(format!(
                    "bad repository name {r:?} (a name without the owner)"
                )));
            }
        }
        let permissions: BTreeMap<String, String> = permissions
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        if permissions.is_empty() {
            return Err(CredsError::Scope("no permissions".to_string()));
        }
        for (k, v) in &permissions {
            let name_ok = !k.is_empty() && k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
            if !name_ok || !matches!(v.as_str(), "read" | "write" | "admin") {
                return Err(CredsError::Scope(format!("bad permission {k:?}: {v:?}")));
            }
        }
        Ok(Scope {
            repositories: repos,
            permissions,
        })
    }

    pub fn repositories(&self) -> &[String] {
        &self.repositories
    }

    pub fn permissions(&self) -> &BTreeMap<String, String> {
        &self.permissions
    }
}

/// A minted installation token.
#[derive(Debug, Clone)]
pub struct InstallationToken {
    pub token: Secret,
    pub scope: Scope,
    /// Unix seconds.
    pub expires_at: i64,
}

/// What happened, for moat's audit log. Never holds a token, JWT or key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GithubAudit {
    Minted {
        repositories: Vec<String>,
        permissions: BTreeMap<String, String>,
        /// Unix seconds.
        expires_at: i64,
    },
    Revoked {
        repositories: Vec<String>,
        permissions: BTreeMap<String, String>,
        expires_at: i64,
    },
}

/// Receives [`GithubAudit`] records.
pub trait AuditSink: Send + Sync {
    fn record(&self, event: &GithubAudit);
}

/// Drops every record.
pub struct NoAudit;

impl AuditSink for NoAudit {
    fn record(&self, _: &GithubAudit) {}
}

/// The clock, in Unix seconds; injectable for tests.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
    })
}

/// Mints, caches and revokes GitHub App installation tokens.
pub struct GithubBroker {
    cfg: GithubConfig,
    key: jsonwebtoken::EncodingKey,
    tls: Arc<tokio_rustls::rustls::ClientConfig>,
    now: Clock,
    audit: Arc<dyn AuditSink>,
    /// Held across a mint so two callers for one scope get one token.
    cache: tokio::sync::Mutex<HashMap<Scope, InstallationToken>>,
}

impl fmt::Debug for GithubBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GithubBroker")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

#[derive(serde::Serialize)]
struct Claims<'a> {
    iat: i64,
    exp: i64,
    iss: &'a str,
}

#[derive(serde::Deserialize)]
struct TokenResponse {
    token: String,
    expires_at: String,
}

impl GithubBroker {
    /// Checks the private key now, so a bad key fails at start-up.
    pub fn new(
        cfg: GithubConfig,
        now: Clock,
        audit: Arc<dyn AuditSink>,
    ) -> Result<GithubBroker, CredsError> {
        // The library's error is not shown: keep key material out of errors.
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(cfg.private_key.expose().as_bytes())
            .map_err(|_| CredsError::Invalid {
                var: "GITHUB_APP_PRIVATE_KEY",
                reason: "not an RSA private key in PEM form".to_string(),
            })?;
        use tokio_rustls::rustls;
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| CredsError::Api(format!("TLS setup: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let broker = GithubBroker {
            cfg,
            key,
            tls: Arc::new(tls),
            now,
            audit,
            cache: tokio::sync::Mutex::new(HashMap::new()),
        };
        // Signing once proves the key is usable for RS256.
        broker.app_jwt().map_err(|_| CredsError::Invalid {
            var: "GITHUB_APP_PRIVATE_KEY",
            reason: "cannot sign with this key".to_string(),
        })?;
        Ok(broker)
    }

    /// The App JWT: RS256, `iat` 60 s ago, `exp` 9 minutes ahead, `iss` the App ID.
    fn app_jwt(&self) -> Result<Secret, CredsError> {
        let now = (self.now)();
        let claims = Claims {
            iat: now - JWT_BACKDATE_SECS,
            exp: now + JWT_LIFETIME_SECS,
            iss: &self.cfg.app_id,
        };
        let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        jsonwebtoken::encode(&header, &claims, &self.key)
            .map(Secret::new)
            .map_err(|_| CredsError::Api("cannot sign the App JWT".to_string()))
    }

    /// A token for `scope`: the cached one while it has more than 5 minutes
    /// left, otherwise a newly minted one. Callers asking one broker for the
    /// same scope share a token, so revoking it ends it for all of them: give
    /// each lease its own broker.
    pub async fn token(&self, scope: &Scope) -> Result<InstallationToken, CredsError> {
        let mut cache = self.cache.lock().await;
        if let Some(t) = cache.get(scope) {
            if t.expires_at - REMINT_BEFORE_SECS > (self.now)() {
                return Ok(t.clone());
            }
        }
        let t = self.mint(scope).await?;
        let now = (self.now)();
        cache.retain(|_, old| old.expires_at > now);
        cache.insert(scope.clone(), t.clone());
        Ok(t)
    }

    async fn mint(&self, scope: &Scope) -> Result<InstallationToken, CredsError> {
        let jwt = self.app_jwt()?;
        let body = serde_json::json!({
            "repositories": scope.repositories,
            "permissions": scope.permissions,
        });
        let path = format!(
            "/app/installations/{}/access_tokens",
            self.cfg.installation_id
        );
        let (status, bytes) = self
            .call(Method::POST, &path, &jwt, Some(body.to_string()))
            .await?;
        if status != StatusCode::CREATED {
            return Err(api_error("minting an installation token", status, &bytes));
        }
        // serde_json's messages can quote values, and this body holds the token.
        let parsed: TokenResponse = serde_json::from_slice(&bytes).map_err(|_| {
            CredsError::Api("minting an installation token: unexpected response body".into())
        })?;
        let expires_at = time::OffsetDateTime::parse(
            &parsed.expires_at,
            &time::format_description::well_known::Rfc3339,
        )
        .map_err(|_| CredsError::Api("minting an installation token: bad expires_at".into()))?
        .unix_timestamp();
        if parsed.token.is_empty() {
            return Err(CredsError::Api(
                "minting an installation token: empty token".into(),
            ));
        }
        self.audit.record(&GithubAudit::Minted {
            repositories: scope.repositories.clone(),
            permissions: scope.permissions.clone(),
            expires_at,
        });
        Ok(InstallationToken {
            token: Secret::new(parsed.token),
            scope: scope.clone(),
            expires_at,
        })
    }

    /// Revokes `token` at GitHub and forgets it.
    pub async fn revoke(&self, token: &InstallationToken) -> Result<(), CredsError> {
        {
            let mut cache = self.cache.lock().await;
            let same = cache
                .get(&token.scope)
                .is_some_and(|t| t.token.expose() == token.token.expose());
            if same {
                cache.remove(&token.scope);
            }
        }
        let (status, bytes) = self
            .call(Method::DELETE, "/installation/token", &token.token, None)
            .await?;
        if status != StatusCode::NO_CONTENT {
            return Err(api_error("revoking an installation token", status, &bytes));
        }
        self.audit.record(&GithubAudit::Revoked {
            repositories: token.scope.repositories.clone(),
            permissions: token.scope.permissions.clone(),
            expires_at: token.expires_at,
        });
        Ok(())
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        bearer: &Secret,
        body: Option<String>,
    ) -> Result<(StatusCode, Bytes), CredsError> {
        let api = &self.cfg.api;
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{}", api.prefix, path))
            .header(hyper::header::HOST, api.authority())
            .header(hyper::header::USER_AGENT, "moat")
            .header(hyper::header::ACCEPT, "application/vnd.github+json")
            .header("X-GitHub-Api-Version", "2022-11-28");
        let mut auth = hyper::header::HeaderValue::from_str(&format!("Bearer {}", bearer.expose()))
            .map_err(|_| CredsError::Api("credential is not a valid header value".into()))?;
        auth.set_sensitive(true);
        req = req.header(hyper::header::AUTHORIZATION, auth);
        let body = match body {
            Some(b) => {
                req = req.header(hyper::header::CONTENT_TYPE, "application/json");
                Bytes::from(b)
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(body))
            .map_err(|e| CredsError::Api(format!("building the request: {e}")))?;
        tokio::time::timeout(REQUEST_TIMEOUT, self.send(req))
            .await
            .map_err(|_| CredsError::Api(format!("{} timed out", api.host)))?
    }

    async fn send(&self, req: Request<Full<Bytes>>) -> Result<(StatusCode, Bytes), CredsError> {
        let api = &self.cfg.api;
        let err = |what: &str, e: &dyn fmt::Display| {
            CredsError::Api(format!("{what} {}:{}: {e}", api.host, api.port))
        };
        let tcp = tokio::net::TcpStream::connect((api.host.as_str(), api.port))
            .await
            .map_err(|e| err("connecting to", &e))?;
        let _ = tcp.set_nodelay(true);
        if !api.tls {
            return exchange(tcp, req).await.map_err(|e| err("talking to", &e));
        }
        let name = tokio_rustls::rustls::pki_types::ServerName::try_from(api.host.clone())
            .map_err(|e| err("TLS name", &e))?;
        let stream = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| err("TLS with", &e))?;
        exchange(stream, req)
            .await
            .map_err(|e| err("talking to", &e))
    }
}

async fn exchange<S>(s: S, req: Request<Full<Bytes>>) -> Result<(StatusCode, Bytes), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), MAX_RESPONSE)
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body))
}

/// An error from GitHub's status and its JSON `message` (never the whole body).
fn api_error(what: &str, status: StatusCode, body: &[u8]) -> CredsError {
    #[derive(serde::Deserialize)]
    struct Msg {
        message: String,
    }
    let msg = serde_json::from_slice::<Msg>(body)
        .map(|m| {
            let m: String = m
                .message
                .chars()
                .filter(|c| !c.is_control())
                .take(200)
                .collect();
            format!(": {m}")
        })
        .unwrap_or_default();
    CredsError::Api(format!("{what}: HTTP {}{msg}", status.as_u16()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_url() {
        let u = ApiUrl::parse("https://ghe.example.com/api/v3/", false).unwrap();
        assert_eq!(
            u,
            ApiUrl {
                tls: true,
                host: "ghe.example.com".into(),
                port: 443,
                prefix: "/api/v3".into()
            }
        );
        assert!(ApiUrl::parse("http://127.0.0.1:9", false).is_err());
        let u = ApiUrl::parse("http://127.0.0.1:9", true).unwrap();
        assert_eq!((u.tls, u.port, u.prefix.as_str()), (false, 9, ""));
        assert!(ApiUrl::parse("https://u:p@h", false).is_err());
        assert!(ApiUrl::parse("ftp://h", true).is_err());
        assert!(ApiUrl::parse("https://h/a/../b", false).is_err());
    }

    #[test]
    fn scope_is_normalised_and_checked() {
        let a = Scope::new(["b", "a", "a"], [("contents", "write")]).unwrap();
        assert_eq!(a.repositories(), ["a", "b"]);
        assert!(Scope::new(Vec::<String>::new(), [("contents", "read")]).is_err());
        assert!(Scope::new(["owner/repo"], [("contents", "read")]).is_err());
        assert!(Scope::new(["r"], Vec::<(String, String)>::new()).is_err());
        assert!(Scope::new(["r"], [("contents", "everything")]).is_err());
    }

    #[test]
    fn secret_is_redacted() {
        let s = Secret::new("ghs_abc");
        assert_eq!(format!("{s}"), "<redacted>");
        assert!(!format!("{s:?}").contains("ghs_abc"));
    }
}
