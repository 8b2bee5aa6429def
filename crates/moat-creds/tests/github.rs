//! The GitHub App broker against a fake GitHub REST API (written from
//! GitHub's docs: "Create an installation access token for an app" and
//! "Revoke an installation access token") on 127.0.0.1. The fake verifies the
//! App JWT with the App's public key.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use moat_creds::{AuditSink, Clock, CredsError, GithubAudit, GithubBroker, GithubConfig, Scope};

const APP_ID: &str = "424242";
const INSTALLATION: &str = "777";
/// A fixed start time: 2026-01-01T00:00:00Z.
const T0: i64 = 1_767_225_600;

struct Keys {
    private_pem: String,
    public_pem: String,
}

/// One RSA key pair per test binary, made with the openssl CLI (never committed).
fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("moat-creds-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("app.pem");
        let ok = std::process::Command::new("openssl")
            .args(["genrsa", "-traditional", "-out"])
            .arg(&key)
            .arg("2048")
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl CLI")
            .success();
        assert!(ok, "openssl genrsa failed");
        let out = std::process::Command::new("openssl")
            .args(["rsa", "-pubout", "-in"])
            .arg(&key)
            .stderr(std::process::Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success());
        let private_pem = std::fs::read_to_string(&key).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        Keys {
            private_pem,
            public_pem: String::from_utf8(out.stdout).unwrap(),
        }
    })
}

#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    authorization: String,
    accept: String,
    api_version: String,
    body: serde_json::Value,
}

struct Fake {
    clock: Arc<AtomicI64>,
    /// Lifetime of the next tokens, in seconds from the fake's now.
    lifetime: AtomicI64,
    counter: AtomicU64,
    seen: Mutex<Vec<Seen>>,
    /// token -> still valid
    tokens: Mutex<HashMap<String, bool>>,
    jwts: Mutex<Vec<String>>,
    failures: Mutex<Vec<String>>,
}

impl Fake {
    fn fail(&self, why: String) -> Response<Full<Bytes>> {
        self.failures.lock().unwrap().push(why.clone());
        json(
            StatusCode::UNAUTHORIZED,
            serde_json::json!({ "message": why }),
        )
    }

    fn handle(&self, s: Seen) -> Response<Full<Bytes>> {
        self.seen.lock().unwrap().push(s.clone());
        if s.accept != "application/vnd.github+json" || s.api_version != "2022-11-28" {
            return self.fail("missing Accept or X-GitHub-Api-Version".into());
        }
        let Some(bearer) = s.authorization.strip_prefix("Bearer ") else {
            return self.fail("no bearer".into());
        };
        match (s.method.as_str(), s.path.as_str()) {
            ("POST", p) if p == format!("/app/installations/{INSTALLATION}/access_tokens") => {
                self.jwts.lock().unwrap().push(bearer.to_string());
                if let Err(e) = self.check_jwt(bearer) {
                    return self.fail(e);
                }
                let repos = s.body["repositories"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                let perms_ok =
                    matches!(s.body["permissions"].as_object(), Some(p) if !p.is_empty());
                if repos.is_empty() || !perms_ok {
                    return self.fail("not down-scoped".into());
                }
                let n = self.counter.fetch_add(1, Ordering::SeqCst);
                let token = format!("ghs_faketoken{n:04}xyzzy");
                self.tokens.lock().unwrap().insert(token.clone(), true);
                let exp = self.clock.load(Ordering::SeqCst) + self.lifetime.load(Ordering::SeqCst);
                let expires_at = time::OffsetDateTime::from_unix_timestamp(exp)
                    .unwrap()
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap();
                json(
                    StatusCode::CREATED,
                    serde_json::json!({
                        "token": token,
                        "expires_at": expires_at,
                        "permissions": s.body["permissions"],
                        "repository_selection": "selected",
                        "repositories": repos.iter().map(|r| serde_json::json!({"name": r})).collect::<Vec<_>>(),
                    }),
                )
            }
            ("DELETE", "/installation/token") => {
                let mut tokens = self.tokens.lock().unwrap();
                match tokens.get_mut(bearer) {
                    Some(valid @ true) => {
                        *valid = false;
                        Response::builder()
                            .status(StatusCode::NO_CONTENT)
                            .body(Full::new(Bytes::new()))
                            .unwrap()
                    }
                    _ => {
                        drop(tokens);
                        json(
                            StatusCode::UNAUTHORIZED,
                            serde_json::json!({"message": "Bad credentials"}),
                        )
                    }
                }
            }
            _ => json(
                StatusCode::NOT_FOUND,
                serde_json::json!({"message": "Not Found"}),
            ),
        }
    }

    fn check_jwt(&self, jwt: &str) -> Result<(), String> {
        let key = jsonwebtoken::DecodingKey::from_rsa_pem(keys().public_pem.as_bytes())
            .map_err(|e| e.to_string())?;
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
        // The fake checks times against its own (test-controlled) clock below.
        v.validate_exp = false;
        v.required_spec_claims = ["iat", "exp", "iss"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.set_issuer(&[APP_ID]);
        let data = jsonwebtoken::decode::<serde_json::Value>(jwt, &key, &v)
            .map_err(|e| format!("JWT: {e}"))?;
        let now = self.clock.load(Ordering::SeqCst);
        let iat = data.claims["iat"].as_i64().ok_or("iat")?;
        let exp = data.claims["exp"].as_i64().ok_or("exp")?;
        if !(now - 120..=now - 30).contains(&iat) {
            return Err(format!("iat {iat} not ~60 s before {now}"));
        }
        if exp <= now || exp > now + 600 {
            return Err(format!("exp {exp} not within 10 minutes of {now}"));
        }
        Ok(())
    }
}

fn json(status: StatusCode, v: serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json; charset=utf-8")
        .body(Full::new(Bytes::from(v.to_string())))
        .unwrap()
}

async fn start_fake(clock: Arc<AtomicI64>) -> (Arc<Fake>, u16) {
    let fake = Arc::new(Fake {
        clock,
        lifetime: AtomicI64::new(3600),
        counter: AtomicU64::new(0),
        seen: Mutex::new(Vec::new()),
        tokens: Mutex::new(HashMap::new()),
        jwts: Mutex::new(Vec::new()),
        failures: Mutex::new(Vec::new()),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let f = fake.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let f = f.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let f = f.clone();
                    async move {
                        let h = |n: &str| {
                            req.headers()
                                .get(n)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_string()
                        };
                        let (method, path) =
                            (req.method().to_string(), req.uri().path().to_string());
                        let (authorization, accept, api_version) =
                            (h("authorization"), h("accept"), h("x-github-api-version"));
                        let bytes = req.into_body().collect().await.unwrap().to_bytes();
                        let body =
                            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
                        Ok::<_, Infallible>(f.handle(Seen {
                            method,
                            path,
                            authorization,
                            accept,
                            api_version,
                            body,
                        }))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (fake, port)
}

#[derive(Default)]
struct Recorder(Mutex<Vec<GithubAudit>>);

impl AuditSink for Recorder {
    fn record(&self, e: &GithubAudit) {
        self.0.lock().unwrap().push(e.clone());
    }
}

fn env(port: u16) -> HashMap<&'static str, String> {
    HashMap::from([
        ("GITHUB_APP_ID", APP_ID.to_string()),
        // As a one-line environment value, with literal \n.
        (
            "GITHUB_APP_PRIVATE_KEY",
            keys().private_pem.replace('\n', "\\n"),
        ),
        ("GITHUB_APP_INSTALLATION_ID", INSTALLATION.to_string()),
        ("MOAT_GITHUB_API_URL", format!("http://127.0.0.1:{port}")),
        ("MOAT_GITHUB_ALLOW_PLAIN_HTTP", "1".to_string()),
    ])
}

fn config(vars: &HashMap<&'static str, String>) -> Result<GithubConfig, CredsError> {
    GithubConfig::from_lookup(|k| vars.get(k).cloned())
}

struct Setup {
    fake: Arc<Fake>,
    clock: Arc<AtomicI64>,
    audit: Arc<Recorder>,
    broker: GithubBroker,
}

async fn setup() -> Setup {
    let clock = Arc::new(AtomicI64::new(T0));
    let (fake, port) = start_fake(clock.clone()).await;
    let c = clock.clone();
    let now: Clock = Arc::new(move || c.load(Ordering::SeqCst));
    let audit = Arc::new(Recorder::default());
    let broker = GithubBroker::new(config(&env(port)).unwrap(), now, audit.clone()).unwrap();
    Setup {
        fake,
        clock,
        audit,
        broker,
    }
}

fn scope() -> Scope {
    Scope::new(
        ["widgets", "gadgets"],
        [
            ("contents", "write"),
            ("pull_requests", "write"),
            ("metadata", "read"),
        ],
    )
    .unwrap()
}

/// A line from the middle of the private key's base64 body.
fn key_fragment() -> String {
    keys().private_pem.lines().nth(5).unwrap().to_string()
}

#[tokio::test]
async fn mint_carries_the_scope_and_a_valid_jwt() {
    let s = setup().await;
    let t = s.broker.token(&scope()).await.unwrap();
    assert!(t.token.expose().starts_with("ghs_faketoken"));
    assert_eq!(t.expires_at, T0 + 3600);
    assert!(s.fake.failures.lock().unwrap().is_empty());
    let seen = s.fake.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, "POST");
    assert_eq!(seen[0].path, "/app/installations/777/access_tokens");
    assert_eq!(
        seen[0].body,
        serde_json::json!({
            "repositories": ["gadgets", "widgets"],
            "permissions": {"contents": "write", "pull_requests": "write", "metadata": "read"},
        })
    );
    let audit = s.audit.0.lock().unwrap().clone();
    assert_eq!(
        audit,
        vec![GithubAudit::Minted {
            repositories: vec!["gadgets".into(), "widgets".into()],
            permissions: BTreeMap::from([
                ("contents".into(), "write".into()),
                ("metadata".into(), "read".into()),
                ("pull_requests".into(), "write".into()),
            ]),
            expires_at: T0 + 3600,
        }]
    );
}

#[tokio::test]
async fn cached_token_is_reused_per_scope() {
    let s = setup().await;
    let a = s.broker.token(&scope()).await.unwrap();
    s.clock.fetch_add(600, Ordering::SeqCst);
    let b = s.broker.token(&scope()).await.unwrap();
    assert_eq!(a.token.expose(), b.token.expose());
    assert_eq!(s.fake.seen.lock().unwrap().len(), 1);
    // Another scope is another token.
    let other = Scope::new(["widgets"], [("contents", "read")]).unwrap();
    let c = s.broker.token(&other).await.unwrap();
    assert_ne!(a.token.expose(), c.token.expose());
    assert_eq!(s.fake.seen.lock().unwrap().len(), 2);
    assert!(s.fake.failures.lock().unwrap().is_empty());
}

#[tokio::test]
async fn token_near_expiry_is_reminted() {
    let s = setup().await;
    let a = s.broker.token(&scope()).await.unwrap();
    // 5 min 1 s left: still reused.
    s.clock.store(a.expires_at - 301, Ordering::SeqCst);
    let b = s.broker.token(&scope()).await.unwrap();
    assert_eq!(a.token.expose(), b.token.expose());
    // Exactly 5 minutes left: minted again, with a fresh JWT for the new time.
    s.clock.store(a.expires_at - 300, Ordering::SeqCst);
    let c = s.broker.token(&scope()).await.unwrap();
    assert_ne!(a.token.expose(), c.token.expose());
    assert_eq!(c.expires_at, a.expires_at - 300 + 3600);
    assert_eq!(s.fake.seen.lock().unwrap().len(), 2);
    assert!(s.fake.failures.lock().unwrap().is_empty());
    // A token GitHub gives with under 5 minutes left is never reused.
    s.fake.lifetime.store(200, Ordering::SeqCst);
    let other = Scope::new(["widgets"], [("contents", "read")]).unwrap();
    let d = s.broker.token(&other).await.unwrap();
    let e = s.broker.token(&other).await.unwrap();
    assert_ne!(d.token.expose(), e.token.expose());
}

#[tokio::test]
async fn revoke_sends_delete_with_the_installation_token() {
    let s = setup().await;
    let t = s.broker.token(&scope()).await.unwrap();
    s.broker.revoke(&t).await.unwrap();
    let seen = s.fake.seen.lock().unwrap().clone();
    let last = seen.last().unwrap();
    assert_eq!(last.method, "DELETE");
    assert_eq!(last.path, "/installation/token");
    assert_eq!(last.authorization, format!("Bearer {}", t.token.expose()));
    assert_eq!(
        s.fake.tokens.lock().unwrap().get(t.token.expose()),
        Some(&false)
    );
    assert!(matches!(
        s.audit.0.lock().unwrap().last(),
        Some(GithubAudit::Revoked { expires_at, .. }) if *expires_at == t.expires_at
    ));
    // Revoked tokens leave the cache: the next request mints.
    let u = s.broker.token(&scope()).await.unwrap();
    assert_ne!(u.token.expose(), t.token.expose());
    // Revoking twice is GitHub's 401, reported without the token.
    let err = s.broker.revoke(&t).await.unwrap_err();
    let text = format!("{err} {err:?}");
    assert!(text.contains("401"), "{text}");
    assert!(!text.contains(t.token.expose()), "{text}");
}

#[tokio::test]
async fn missing_variables_are_named() {
    for var in [
        "GITHUB_APP_ID",
        "GITHUB_APP_PRIVATE_KEY",
        "GITHUB_APP_INSTALLATION_ID",
    ] {
        let mut vars = env(1);
        vars.remove(var);
        let err = config(&vars).unwrap_err();
        assert!(matches!(err, CredsError::NotConfigured(v) if v == var));
        let text = err.to_string();
        assert!(text.contains("GitHub is not available"), "{text}");
        assert!(text.contains(var), "{text}");
    }
    let mut vars = env(1);
    vars.remove("MOAT_GITHUB_ALLOW_PLAIN_HTTP");
    let err = config(&vars).unwrap_err();
    assert!(err.to_string().contains("MOAT_GITHUB_API_URL"), "{err}");
    vars.remove("MOAT_GITHUB_API_URL");
    assert_eq!(config(&vars).unwrap().api.host, "api.github.com");
}

#[tokio::test]
async fn bad_private_key_is_a_typed_error_without_the_key() {
    let clock: Clock = Arc::new(|| T0);
    let mut vars = env(1);
    // A PEM-looking key with its body damaged.
    let damaged = keys().private_pem.replace(&key_fragment(), "AAAA");
    vars.insert("GITHUB_APP_PRIVATE_KEY", damaged);
    let err = GithubBroker::new(
        config(&vars).unwrap(),
        clock.clone(),
        Arc::new(moat_creds::NoAudit),
    )
    .unwrap_err();
    let text = format!("{err} {err:?}");
    assert!(
        matches!(
            err,
            CredsError::Invalid {
                var: "GITHUB_APP_PRIVATE_KEY",
                ..
            }
        ),
        "{text}"
    );
    assert!(text.contains("GITHUB_APP_PRIVATE_KEY"), "{text}");
    let other_line = keys().private_pem.lines().nth(6).unwrap();
    assert!(!text.contains(other_line), "{text}");
    vars.insert("GITHUB_APP_PRIVATE_KEY", "not a key".into());
    let err = GithubBroker::new(config(&vars).unwrap(), clock, Arc::new(moat_creds::NoAudit))
        .unwrap_err();
    assert!(err.to_string().contains("GITHUB_APP_PRIVATE_KEY"));
    assert!(!err.to_string().contains("not a key"));
}

#[tokio::test]
async fn secrets_never_appear_in_output() {
    let s = setup().await;
    let t = s.broker.token(&scope()).await.unwrap();
    // An API error (a scope the fake refuses cannot be made; use a wrong
    // installation instead) and a connection error.
    let mut vars = env(1);
    vars.insert("GITHUB_APP_INSTALLATION_ID", "1".into());
    let c = s.clock.clone();
    let now: Clock = Arc::new(move || c.load(Ordering::SeqCst));
    let refused =
        GithubBroker::new(config(&vars).unwrap(), now, Arc::new(moat_creds::NoAudit)).unwrap();
    let err = refused.token(&scope()).await.unwrap_err();
    s.broker.revoke(&t).await.unwrap();
    let err2 = s.broker.revoke(&t).await.unwrap_err();

    let jwt = s.fake.jwts.lock().unwrap()[0].clone();
    let config_dbg = format!("{:?}", config(&env(1)).unwrap());
    let outputs = [
        format!("{err} {err:?}"),
        format!("{err2} {err2:?}"),
        format!("{t:?}"),
        format!("{:?}", s.broker),
        format!("{refused:?}"),
        config_dbg,
        format!("{:?}", s.audit.0.lock().unwrap()),
    ];
    let jwt_sig = jwt.rsplit('.').next().unwrap().to_string();
    for out in &outputs {
        assert!(!out.contains(t.token.expose()), "token in {out}");
        assert!(!out.contains("ghs_"), "token in {out}");
        assert!(!out.contains(&jwt_sig), "JWT in {out}");
        assert!(!out.contains(&key_fragment()), "key in {out}");
        assert!(!out.contains("PRIVATE KEY"), "key in {out}");
    }
    assert_eq!(s.audit.0.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn fake_refuses_a_jwt_from_the_wrong_clock() {
    // Checks the fake's own checks: a broker whose clock is 12 minutes behind
    // signs a JWT that has already expired for GitHub.
    let clock = Arc::new(AtomicI64::new(T0));
    let (fake, port) = start_fake(clock).await;
    let behind: Clock = Arc::new(|| T0 - 720);
    let broker = GithubBroker::new(
        config(&env(port)).unwrap(),
        behind,
        Arc::new(moat_creds::NoAudit),
    )
    .unwrap();
    let err = broker.token(&scope()).await.unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");
    let failures = fake.failures.lock().unwrap().clone();
    assert_eq!(failures.len(), 1);
    assert!(
        failures[0].starts_with("iat") || failures[0].starts_with("exp"),
        "{failures:?}"
    );
}
