//! The Host and Origin checks in front of every HTTP listener of the gateway
//! (the web chat, `/slack/events` on its own address, the admin address):
//! docs/threat-model.md W1, DNS rebinding and cross-site requests.
//!
//! A request is served only when every host it names (its `Host` header and,
//! in absolute form, its request line's authority) names the listening address
//! or a name in `web.allowed_hosts` (the verdicts are
//! `moat_policy::hosts`), and, when it carries an `Origin`, that origin passes
//! the same test; a state-changing request (anything but GET, HEAD, OPTIONS)
//! without an `Origin` is refused when the browser says it is cross-site or
//! same-site (`Sec-Fetch-Site`). Slack's own deliveries carry no `Origin` and
//! no `Sec-Fetch-Site`, so they pass on `Host` alone.
//!
//! Each refusal has a typed reason, a clear status and body, a warning in the
//! log and an audit record (`http_refused`; at most one per reason every
//! ten seconds, with the number left out, so a page looping requests cannot
//! fill the disk).
//!
//! Must never: let a refused request reach a route (nothing is read, nothing
//! is queued), or put more than a short, printable prefix of what the client
//! sent into a response, the log or the audit log.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use moat_policy::hosts::{parse_host_port, parse_origin, AllowedHosts, HostPort};
use serde_json::json;

use crate::pipeline::Gateway;

/// Why a request was refused before any route saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// No `Host` header and no authority in the request line, or two `Host`s.
    NoHost,
    /// A `Host` (or authority) that is not `host[:port]`.
    BadHost,
    /// A host that is not this listener's address nor an allowed name.
    ForeignHost,
    /// An `Origin` that is not this listener's address nor an allowed name.
    ForeignOrigin,
    /// A state-changing request the browser marked cross-site (no `Origin`).
    CrossSite,
}

impl Refusal {
    pub fn name(self) -> &'static str {
        match self {
            Refusal::NoHost => "no_host",
            Refusal::BadHost => "bad_host",
            Refusal::ForeignHost => "foreign_host",
            Refusal::ForeignOrigin => "foreign_origin",
            Refusal::CrossSite => "cross_site",
        }
    }

    fn status(self) -> StatusCode {
        match self {
            Refusal::NoHost | Refusal::BadHost => StatusCode::BAD_REQUEST,
            // "Not the server for this name": what a rebinding page gets.
            Refusal::ForeignHost => StatusCode::MISDIRECTED_REQUEST,
            Refusal::ForeignOrigin | Refusal::CrossSite => StatusCode::FORBIDDEN,
        }
    }

    fn message(self) -> &'static str {
        match self {
            Refusal::NoHost => "a request needs exactly one Host header",
            Refusal::BadHost => "the Host is not host[:port]",
            Refusal::ForeignHost => "moat does not answer to this host name: it answers to its listening address (and localhost on a loopback address); a reverse proxy's public name goes in [web] allowed_hosts",
            Refusal::ForeignOrigin => "requests from pages of other sites are refused (Origin); a reverse proxy's public name goes in [web] allowed_hosts",
            Refusal::CrossSite => "requests from pages of other sites are refused (Sec-Fetch-Site)",
        }
    }
}

/// What the client sent, cut to a short printable prefix for logs and bodies.
fn shown(v: &str) -> String {
    v.chars()
        .take(100)
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect()
}

fn safe_method(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// The verdict on one request's head: `Err` with the reason and the value
/// that failed (as the client wrote it).
pub fn check(
    allowed: &AllowedHosts,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<(), (Refusal, String)> {
    let hosts: Vec<_> = headers.get_all(header::HOST).iter().collect();
    if hosts.len() > 1 {
        return Err((Refusal::NoHost, String::new()));
    }
    let mut named: Vec<String> = Vec::new();
    if let Some(h) = hosts.first() {
        let Ok(h) = h.to_str() else {
            return Err((Refusal::BadHost, String::new()));
        };
        named.push(h.to_string());
    }
    // Absolute form (`GET http://evil.test/ HTTP/1.1`): its authority is the
    // host the request is for, whatever the Host header says.
    if let Some(a) = uri.authority() {
        if a.as_str().contains('@') {
            return Err((Refusal::BadHost, a.as_str().to_string()));
        }
        named.push(a.as_str().to_string());
    }
    if named.is_empty() {
        return Err((Refusal::NoHost, String::new()));
    }
    for h in &named {
        let hp: HostPort = parse_host_port(h).ok_or_else(|| (Refusal::BadHost, h.clone()))?;
        if !allowed.host_ok(&hp) {
            return Err((Refusal::ForeignHost, h.clone()));
        }
    }
    let origins: Vec<_> = headers.get_all(header::ORIGIN).iter().collect();
    for o in &origins {
        let text = o.to_str().unwrap_or("");
        match parse_origin(text) {
            Some(hp) if allowed.origin_ok(&hp) => {}
            _ => return Err((Refusal::ForeignOrigin, text.to_string())),
        }
    }
    if origins.is_empty() && !safe_method(method) {
        let site = headers
            .get("sec-fetch-site")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if site == "cross-site" || site == "same-site" {
            return Err((Refusal::CrossSite, site));
        }
    }
    Ok(())
}

/// One listener's guard: its allowed hosts and where refusals are told.
#[derive(Clone)]
pub struct Guard {
    allowed: Arc<AllowedHosts>,
    listener: &'static str,
    gw: Gateway,
    /// Per reason: when the last audit record was written, and how many
    /// refusals were left out since.
    audited: Arc<Mutex<HashMap<Refusal, (Instant, u64)>>>,
}

/// At most one audit record per reason in this window.
const AUDIT_EVERY: Duration = Duration::from_secs(10);

impl Guard {
    /// `listener` names it in logs (`web`, `slack`, `admin`); `bound` is the
    /// address actually bound.
    pub fn new(gw: &Gateway, listener: &'static str, bound: SocketAddr) -> Guard {
        Guard {
            allowed: Arc::new(AllowedHosts::new(bound, &gw.inner.cfg.web.allowed_hosts)),
            listener,
            gw: gw.clone(),
            audited: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Puts the guard in front of every route of `router` (its fallback too).
    pub fn wrap(self, router: axum::Router) -> axum::Router {
        router.layer(axum::middleware::from_fn_with_state(self, guard))
    }

    fn refuse(&self, why: Refusal, value: &str, method: &Method, uri: &Uri) -> Response {
        let value = shown(value);
        let path = shown(uri.path());
        tracing::warn!(
            listener = self.listener,
            reason = why.name(),
            value = %value,
            method = %method,
            path = %path,
            "request refused (docs/threat-model.md W1: Host/Origin)"
        );
        let suppressed = {
            let mut a = self.audited.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            match a.get_mut(&why) {
                Some((last, left_out)) if now.duration_since(*last) < AUDIT_EVERY => {
                    *left_out += 1;
                    None
                }
                Some((last, left_out)) => {
                    *last = now;
                    Some(std::mem::take(left_out))
                }
                None => {
                    a.insert(why, (now, 0));
                    Some(0)
                }
            }
        };
        if let Some(n) = suppressed {
            self.gw.audit(
                "http_refused",
                json!({"listener": self.listener, "reason": why.name(), "value": value,
                       "method": method.as_str(), "path": path, "not_recorded_before": n}),
            );
        }
        (
            why.status(),
            Json(json!({"error": why.message(), "reason": why.name(), "value": value})),
        )
            .into_response()
    }
}

async fn guard(State(g): State<Guard>, req: Request, next: Next) -> Response {
    match check(&g.allowed, req.method(), req.uri(), req.headers()) {
        Ok(()) => next.run(req).await,
        Err((why, value)) => g.refuse(why, &value, req.method(), req.uri()),
    }
}
