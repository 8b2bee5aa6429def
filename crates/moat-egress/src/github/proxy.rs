//! The proxy for intercepted GitHub hosts: ends the sandbox's TLS with the
//! lease CA's certificate, checks the credential it presents (only this
//! lease's placeholder, or none), applies push and API protection, swaps in
//! the installation token and forwards upstream; records every request in
//! the audit log and what reached GitHub (pushes, pull requests opened) for
//! the turn's answer.
//!
//! Must never: forward a request carrying any credential but the
//! placeholder, forward the placeholder or the sandbox's credential headers,
//! or put a token, placeholder, header value or body in a record.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use base64::Engine as _;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Serialize;
use serde_json::{json, Value};

use super::access::GithubState;
use super::protect::{
    decode_path, effective_role, judge_api, protected_branch, refusal_text, ApiJudgement,
    MAX_JUDGED_BODY,
};
use super::push::{drain, push_held_refusal, push_refusal, read_push_commands, Prefixed};
use super::report::{graphql_opened_prs, graphql_opens_pr, read_push_answer};
use super::HostRole;
use crate::llm::{constant_time_eq, send_upstream};

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

/// Activities kept between two `take_activity` calls; later ones are dropped.
const MAX_ACTIVITY: usize = 100;
/// Largest pull-request answer read for its number and link.
const MAX_PR_ANSWER: usize = 1024 * 1024;

/// Something the door saw reach GitHub, told in the turn's answer: the
/// door's own record, never the agent's account of it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum GithubActivity {
    /// A push went upstream (GitHub answered `status`). `refs`: the ref
    /// updates GitHub's report-status accepted (`confirmed`), or, when its
    /// answer could not be read, the ones sent; `rejected`: those it refused
    /// inside its HTTP 200, with its reason.
    Pushed {
        repo: String,
        refs: Vec<String>,
        rejected: Vec<RefusedRef>,
        status: u16,
        confirmed: bool,
    },
    /// A pull request was opened.
    PullRequest {
        repo: String,
        number: u64,
        url: String,
    },
}

/// A ref GitHub refused in its report-status, and why (one printable line).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RefusedRef {
    pub name: String,
    pub reason: String,
}

fn branch_name(r: &str) -> &str {
    r.strip_prefix("refs/heads/").unwrap_or(r)
}

impl std::fmt::Display for GithubActivity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GithubActivity::Pushed {
                repo,
                refs,
                rejected,
                status,
                confirmed,
            } => {
                let names: Vec<&str> = refs.iter().map(|r| branch_name(r)).collect();
                if (200..300).contains(status) {
                    let mut lines = Vec::new();
                    if !names.is_empty() {
                        let unread = if *confirmed {
                            ""
                        } else {
                            " (GitHub's report on it could not be read)"
                        };
                        lines.push(format!("pushed {} to {repo}{unread}", names.join(", ")));
                    }
                    for r in rejected {
                        lines.push(format!(
                            "GitHub refused the push of {} to {repo}: {}",
                            branch_name(&r.name),
                            r.reason
                        ));
                    }
                    if lines.is_empty() {
                        lines.push(format!("a push to {repo} updated no branch"));
                    }
                    write!(f, "{}", lines.join("\n- "))
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

/// An owner or repository name as GitHub allows it, bounded: what may be
/// shown in moat's record.
pub(super) fn plain_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 100
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
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
    (plain_name(o) && plain_name(n)).then(|| format!("{o}/{n}"))
}

impl GithubState {
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
}

pub(super) type GhBody = BoxBody<Bytes, hyper::Error>;

pub(super) fn full(b: impl Into<Bytes>) -> GhBody {
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

/// One request to an intercepted GitHub host (TLS already ended by the door).
pub(crate) async fn handle(
    st: Arc<crate::State>,
    host: String,
    req: Request<Incoming>,
) -> Response<GhBody> {
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
    let mut push_sideband = false;
    let mut opens_pr_graphql = false;
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
            // Held until the gateway's approvers decide (`approve =
            // ["github_push"]`): nothing of the push goes upstream before.
            if let Some(gate) = &gh.access.push_gate {
                let repo: String = path
                    .trim_start_matches('/')
                    .split('/')
                    .take(2)
                    .collect::<Vec<_>>()
                    .join("/")
                    .trim_end_matches(".git")
                    .chars()
                    .take(200)
                    .collect();
                let refs: Vec<String> = cmds
                    .refs
                    .iter()
                    .filter(|r| plain_ref(r))
                    .take(50)
                    .cloned()
                    .collect();
                if let Err(reason) = gate.decide(repo, refs).await {
                    if !ended && !drain(&mut body).await {
                        tracing::info!(
                            "a refused push's pack was cut short; its client may not see the reason"
                        );
                    }
                    let resp = push_held_refusal(&cmds, &reason);
                    return deny(resp.status(), format!("moat: {reason}"), resp);
                }
            }
            push_sideband = cmds
                .caps
                .iter()
                .any(|c| c == "side-band-64k" || c == "side-band");
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
                    opens_pr_graphql = path == "/graphql" && graphql_opens_pr(&doc);
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
        // So is the answer to a push, for GitHub's report-status.
        let read_answer = opens_pr || opens_pr_graphql || pushed.is_some();
        let encoding = read_answer && k == header::ACCEPT_ENCODING;
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
                let status = rparts.status.as_u16();
                if rparts.status != StatusCode::OK {
                    gh.note(GithubActivity::Pushed {
                        repo,
                        refs,
                        rejected: Vec::new(),
                        status,
                        confirmed: false,
                    });
                    return Response::from_parts(rparts, rbody.boxed());
                }
                // GitHub's verdict on each ref is in its report-status, at
                // the end of a small answer: read it before git does.
                let (answer, report) = read_push_answer(rbody, push_sideband, plain_ref).await;
                let activity = match report {
                    Some(r) => GithubActivity::Pushed {
                        repo,
                        refs: r.accepted,
                        rejected: r
                            .rejected
                            .into_iter()
                            .map(|(name, reason)| RefusedRef { name, reason })
                            .collect(),
                        status,
                        confirmed: true,
                    },
                    None => GithubActivity::Pushed {
                        repo,
                        refs,
                        rejected: Vec::new(),
                        status,
                        confirmed: false,
                    },
                };
                gh.note(activity);
                return Response::from_parts(rparts, answer);
            }
            if opens_pr_graphql && rparts.status == StatusCode::OK {
                let bytes = match Limited::new(rbody, MAX_PR_ANSWER).collect().await {
                    Ok(b) => b.to_bytes(),
                    Err(_) => {
                        let msg = "moat: GitHub's answer to opening a pull request was unreadable or too large".to_string();
                        return api_error(StatusCode::BAD_GATEWAY, &msg);
                    }
                };
                if let Ok(v) = serde_json::from_slice::<Value>(&bytes) {
                    for (repo, number, url) in graphql_opened_prs(&v, &gh.web_base()) {
                        gh.note(GithubActivity::PullRequest { repo, number, url });
                    }
                }
                return Response::from_parts(rparts, full(bytes));
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

#[cfg(test)]
mod tests {
    #[test]
    fn attack_g4_a_ref_name_cannot_forge_lines_of_moats_record() {
        assert!(super::plain_ref("refs/heads/moat/1-fix"));
        assert!(!super::plain_ref("refs/heads/x\n- opened pull request #12"));
        assert!(!super::plain_ref("refs/heads/a b"));
        assert!(!super::plain_ref("refs/heads/a..b"));
        assert!(!super::plain_ref("refs/heads/x.lock"));
        assert!(!super::plain_ref("heads/x"));
    }

    use super::*;

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
}
