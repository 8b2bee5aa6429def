//! Amp's service through the door: the sandbox's HTTPS requests to Amp's
//! host (`ampcode.com` by default) are intercepted with the lease CA
//! (`crate::intercept`), must carry this lease's placeholder (or no
//! credential), and go to the configured upstream from the host with the
//! real Amp API key as `Authorization: Bearer`, the header Amp's CLI sends.
//!
//! Must never: hand the real key to the sandbox, forward a request that
//! carries any credential but the placeholder, forward the placeholder or
//! the sandbox's credential headers, or put the key, the placeholder, a
//! header value or a body in a log or audit record.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use moat_creds::Secret;
use serde_json::json;

use crate::github::GithubRecord;
use crate::llm::{constant_time_eq, random_hex, send_upstream, upstream_tls, UpstreamUrl};

/// The name Amp's CLI uses for its service.
pub const AMP_HOST: &str = "ampcode.com";
/// Where Amp's requests go unless the operator says otherwise.
pub const DEFAULT_URL: &str = "https://ampcode.com";
/// The host variable holding the real key; also the sandbox's variable.
pub const KEY_VAR: &str = "AMP_API_KEY";

/// Amp for one lease: the intercepted name, where its requests go, and the
/// real key.
#[derive(Clone)]
pub struct AmpAccess {
    /// The name the sandbox uses (normalized, lower case).
    pub host: String,
    pub upstream: UpstreamUrl,
    pub key: Secret,
    /// A host directory, traversable by sandbox users, where the door writes
    /// this lease's CA bundle (when GitHub does not already).
    pub state_dir: PathBuf,
}

impl std::fmt::Debug for AmpAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmpAccess")
            .field("host", &self.host)
            .field("upstream", &self.upstream)
            .finish_non_exhaustive()
    }
}

impl AmpAccess {
    /// Reads the key (`AMP_API_KEY`) and where requests go from `env`
    /// (moat's environment or secrets file): `MOAT_AMP_URL` (default
    /// `https://ampcode.com`), `http://` only with
    /// `MOAT_AMP_ALLOW_PLAIN_HTTP=1`; `MOAT_AMP_HOST` the name intercepted
    /// (default `ampcode.com`). `url` (the configuration file's) wins over
    /// `MOAT_AMP_URL`. Fails naming the variable.
    pub fn from_env(
        env: impl Fn(&str) -> Option<String>,
        url: Option<&str>,
        allow_plain_http: bool,
        state_dir: PathBuf,
    ) -> Result<AmpAccess, String> {
        let key = env(KEY_VAR).filter(|k| !k.is_empty()).ok_or_else(|| {
            format!(
                "Amp needs its API key in moat's environment: {KEY_VAR} is not set \
                 (set it there or in the secrets file; the sandbox gets a placeholder)"
            )
        })?;
        let plain = allow_plain_http || env("MOAT_AMP_ALLOW_PLAIN_HTTP").as_deref() == Some("1");
        let (text, var) = match url {
            Some(u) => (u.to_string(), "amp.url"),
            None => (
                env("MOAT_AMP_URL").unwrap_or_else(|| DEFAULT_URL.to_string()),
                "MOAT_AMP_URL",
            ),
        };
        let upstream = UpstreamUrl::parse(&text, plain).map_err(|e| {
            format!(
                "{var}: {}",
                e.replace(
                    "set MOAT_LLM_ALLOW_PLAIN_HTTP=1",
                    "set amp.allow_plain_http = true (or MOAT_AMP_ALLOW_PLAIN_HTTP=1)"
                )
            )
        })?;
        let raw = env("MOAT_AMP_HOST").unwrap_or_else(|| AMP_HOST.to_string());
        let host = moat_policy::network::normalize_name(&raw)
            .filter(|n| moat_policy::network::parse_ip_literal(n).is_none())
            .ok_or_else(|| format!("MOAT_AMP_HOST: {raw:?} is not a host name"))?;
        Ok(AmpAccess {
            host,
            upstream,
            key: Secret::new(key),
            state_dir,
        })
    }
}

/// The lease's running Amp state inside its door.
pub(crate) struct AmpState {
    pub(crate) access: AmpAccess,
    placeholder: Secret,
    client_tls: Arc<tokio_rustls::rustls::ClientConfig>,
}

impl AmpState {
    pub(crate) fn new(access: AmpAccess) -> std::io::Result<AmpState> {
        Ok(AmpState {
            access,
            placeholder: Secret::new(format!("sgamp_moat_{}", random_hex(16)?)),
            client_tls: upstream_tls()?,
        })
    }

    /// The sandbox's variables: the placeholder key and Amp's URL as the
    /// sandbox reaches it (through the interception).
    pub(crate) fn client_env(&self) -> Vec<(String, String)> {
        vec![
            (KEY_VAR.to_string(), self.placeholder.expose().to_string()),
            (
                "AMP_URL".to_string(),
                format!("https://{}", self.access.host),
            ),
        ]
    }
}

type AmpBody = BoxBody<Bytes, hyper::Error>;

fn error(status: StatusCode, msg: &str) -> Response<AmpBody> {
    let body = json!({ "error": msg }).to_string();
    let mut r = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|e: std::convert::Infallible| match e {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// Whether the request's credential is acceptable: none, or exactly one
/// `Authorization: Bearer <placeholder>` (compared in constant time).
fn credential_ok(h: &HeaderMap, placeholder: &str) -> bool {
    if h.contains_key("x-api-key") || h.contains_key(header::PROXY_AUTHORIZATION) {
        return false;
    }
    let mut values = h.get_all(header::AUTHORIZATION).iter();
    let Some(v) = values.next() else {
        return true;
    };
    if values.next().is_some() {
        return false;
    }
    let Ok(v) = v.to_str() else {
        return false;
    };
    let (scheme, rest) = v.trim().split_once(' ').unwrap_or((v, ""));
    scheme.eq_ignore_ascii_case("bearer")
        && constant_time_eq(rest.trim().as_bytes(), placeholder.as_bytes())
}

/// Request headers never forwarded: credentials, hop-by-hop headers and
/// method overrides.
fn strip(k: &str) -> bool {
    matches!(
        k,
        "authorization"
            | "proxy-authorization"
            | "x-api-key"
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

/// One request to the intercepted Amp host (TLS already ended by the door).
pub(crate) async fn handle(
    st: Arc<crate::State>,
    host: String,
    req: Request<Incoming>,
) -> Response<AmpBody> {
    let t0 = Instant::now();
    let method: String = req.method().as_str().chars().take(16).collect();
    let path: String = req.uri().path().chars().take(1024).collect();
    let audit = |status: StatusCode, reason: Option<String>| {
        st.audit_github(GithubRecord {
            ts_ms: 0,
            lease: String::new(),
            kind: "amp",
            method: method.clone(),
            host: host.clone(),
            path: path.clone(),
            status: status.as_u16(),
            verdict: if reason.is_none() {
                "allowed"
            } else {
                "denied"
            },
            reason,
            duration_ms: t0.elapsed().as_millis() as u64,
        });
    };
    let deny = |status: StatusCode, msg: &str| {
        audit(status, Some(msg.to_string()));
        error(status, msg)
    };
    let Some(amp) = st.amp.as_ref().filter(|a| a.access.host == host) else {
        return deny(
            StatusCode::NOT_FOUND,
            "moat: this host is not Amp's for this sandbox",
        );
    };
    if !credential_ok(req.headers(), amp.placeholder.expose()) {
        return deny(
            StatusCode::UNAUTHORIZED,
            "moat: only this sandbox's AMP_API_KEY placeholder (or no credential) is accepted",
        );
    }
    let up = &amp.access.upstream;
    let (parts, body) = req.into_parts();
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
        if !strip(k.as_str()) {
            headers.append(k.clone(), v.clone());
        }
    }
    if let Ok(h) = HeaderValue::from_str(&up.authority()) {
        headers.insert(header::HOST, h);
    }
    let Ok(mut auth) = HeaderValue::from_str(&format!("Bearer {}", amp.access.key.expose())) else {
        return deny(
            StatusCode::BAD_GATEWAY,
            "moat: the Amp key is not a valid header value",
        );
    };
    auth.set_sensitive(true);
    headers.insert(header::AUTHORIZATION, auth);
    let Ok(out) = out.body(body.boxed()) else {
        return deny(StatusCode::BAD_REQUEST, "moat: malformed request");
    };
    match send_upstream(&amp.client_tls, up, out).await {
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
            audit(rparts.status, None);
            Response::from_parts(rparts, rbody.boxed())
        }
        Err(e) => {
            tracing::warn!(host = %up.host, error = %e, "Amp upstream failed");
            deny(
                StatusCode::BAD_GATEWAY,
                &format!(
                    "moat: the upstream {} could not be reached: {e}",
                    up.authority()
                ),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_placeholder_or_nothing_passes() {
        let ph = "sgamp_moat_abc";
        let mut h = HeaderMap::new();
        assert!(credential_ok(&h, ph), "no credential: the key is added");
        h.insert(
            "authorization",
            HeaderValue::from_static("Bearer sgamp_moat_abc"),
        );
        assert!(credential_ok(&h, ph));
        h.insert(
            "authorization",
            HeaderValue::from_static("Bearer sgamp_user_real"),
        );
        assert!(!credential_ok(&h, ph));
        h.insert(
            "authorization",
            HeaderValue::from_static("Basic sgamp_moat_abc"),
        );
        assert!(!credential_ok(&h, ph));
        h.insert(
            "authorization",
            HeaderValue::from_static("Bearer sgamp_moat_abc"),
        );
        h.append(
            "authorization",
            HeaderValue::from_static("Bearer sgamp_moat_abc"),
        );
        assert!(!credential_ok(&h, ph), "two credentials");
        let mut h = HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_static("sgamp_user_real"));
        assert!(!credential_ok(&h, ph), "a key in another header");
    }

    #[test]
    fn configuration_names_what_is_missing_or_wrong() {
        let dir = PathBuf::from("/nonexistent");
        let e = AmpAccess::from_env(|_| None, None, false, dir.clone()).unwrap_err();
        assert!(e.contains("AMP_API_KEY is not set"), "{e}");
        let key = |k: &str| (k == "AMP_API_KEY").then(|| "sgamp_user_x".to_string());
        let a = AmpAccess::from_env(key, None, false, dir.clone()).unwrap();
        assert_eq!(
            (a.host.as_str(), a.upstream.host.as_str()),
            ("ampcode.com", "ampcode.com")
        );
        assert!(!format!("{a:?}").contains("sgamp_user_x"));
        let e =
            AmpAccess::from_env(key, Some("http://127.0.0.1:9"), false, dir.clone()).unwrap_err();
        assert!(
            e.contains("amp.url") && e.contains("allow_plain_http"),
            "{e}"
        );
        let a = AmpAccess::from_env(key, Some("http://127.0.0.1:9"), true, dir).unwrap();
        assert_eq!((a.upstream.tls, a.upstream.port), (false, 9));
    }
}
