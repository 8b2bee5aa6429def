//! The LLM proxy's request handling: serves the sandbox's 127.0.0.1:8787,
//! checks the placeholder, has each request judged (crate::llm::judge),
//! swaps the placeholder for the real key, forwards from the host, and hands
//! back the answer counted, metered and with the real keys redacted.
//!
//! Must never: forward a request that lacks this lease's placeholder or that
//! the judge refused, forward a credential the sandbox sent, pass a real key
//! back to the sandbox, or leave a forwarded call uncounted because its client
//! went away.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

use super::{
    constant_time_eq, judge, redact, stream, LlmRecord, Pending, Provider, Refusal, Usage, MAX_BODY,
};
use crate::upstream::send_upstream;
use crate::STEP_TIMEOUT;

type ProxyBody = BoxBody<Bytes, hyper::Error>;

fn full(b: impl Into<Bytes>) -> ProxyBody {
    Full::new(b.into())
        .map_err(|e: Infallible| match e {})
        .boxed()
}

/// An error the way the provider's own API shapes it.
fn api_error(
    p: Option<Provider>,
    status: StatusCode,
    kind: &str,
    code: &str,
    msg: &str,
) -> Response<ProxyBody> {
    let body = match p {
        Some(Provider::OpenAi) => {
            json!({"error": {"message": msg, "type": kind, "param": null, "code": code}})
        }
        _ => json!({"type": "error", "error": {"type": kind, "message": msg}}),
    };
    let mut r = Response::new(full(body.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// Serves the proxy on `listener` (inside the sandbox's namespace).
pub(crate) async fn serve(state: Arc<crate::State>, listener: tokio::net::TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let st = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let st = st.clone();
                async move { Ok::<_, Infallible>(handle(st, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(STEP_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// What the audit record of one call starts as.
pub(crate) struct Call {
    provider: Option<Provider>,
    host: String,
    port: u16,
    path: String,
    model: Option<String>,
    stream: bool,
    user: Option<String>,
    channel: Option<String>,
    t0: Instant,
}

impl Call {
    pub(crate) fn record(
        &self,
        verdict: &'static str,
        reason: Option<String>,
        refusal: Option<Refusal>,
        status: u16,
        usage: Usage,
    ) -> LlmRecord {
        LlmRecord {
            ts_ms: 0,
            lease: String::new(),
            user: self.user.clone(),
            channel: self.channel.clone(),
            kind: "llm",
            provider: self.provider.map(Provider::name).unwrap_or("unknown"),
            host: self.host.clone(),
            port: self.port,
            path: self.path.clone(),
            model: self.model.clone(),
            stream: self.stream,
            verdict,
            reason,
            refusal,
            status,
            usage,
            duration_ms: self.t0.elapsed().as_millis() as u64,
        }
    }
}

/// An error the way the provider's own API shapes it, for a refusal.
fn refusal_response(p: Option<Provider>, r: Refusal, msg: &str) -> Response<ProxyBody> {
    let (status, kind, code) = r.shape(p);
    api_error(p, status, kind, code, msg)
}

async fn handle(st: Arc<crate::State>, req: Request<Incoming>) -> Response<ProxyBody> {
    let t0 = Instant::now();
    #[allow(
        clippy::expect_used,
        reason = "the LLM listener is started only with a configuration"
    )]
    let llm = st
        .llm
        .as_ref()
        .expect("the LLM proxy runs only with a config");
    let path = req.uri().path().to_string();
    let (provider, rest) = if let Some(r) = path.strip_prefix("/anthropic/") {
        (Provider::Anthropic, r)
    } else if let Some(r) = path.strip_prefix("/openai/") {
        (Provider::OpenAi, r)
    } else {
        return refusal_response(
            None,
            Refusal::UnknownProvider,
            "moat: use /anthropic/... or /openai/...",
        );
    };
    let rest = format!("/{rest}");
    let pc = llm.cfg.providers.iter().find(|c| c.provider == provider);
    let mut call = Call {
        provider: Some(provider),
        host: pc.map(|c| c.upstream.host.clone()).unwrap_or_default(),
        port: pc.map(|c| c.upstream.port).unwrap_or(0),
        // As sent (hyper admits printable ASCII only), cut short.
        path: rest.chars().take(512).collect(),
        model: None,
        stream: false,
        user: llm.user(),
        channel: llm.cfg.channel.clone(),
        t0,
    };
    let deny = |call: &Call, r: Refusal, msg: String| {
        let (status, _, _) = r.shape(Some(provider));
        st.audit_llm(call.record(
            "denied",
            Some(msg.clone()),
            Some(r),
            status.as_u16(),
            Usage::default(),
        ));
        refusal_response(Some(provider), r, &msg)
    };
    let (Some(pc), Some(placeholder)) = (pc, llm.placeholder(provider)) else {
        let msg = format!(
            "moat: {} is not enabled for this sandbox (moat sandbox run --llm {})",
            provider.name(),
            provider.name()
        );
        return deny(&call, Refusal::ProviderNotEnabled, msg);
    };
    // The placeholder: the only credential the sandbox has, and the only one accepted.
    let presented = presented_key(provider, req.headers());
    if !presented.is_some_and(|k| constant_time_eq(k.as_bytes(), placeholder.expose().as_bytes())) {
        let msg = if presented.is_none() {
            format!(
                "moat: no API key; send this sandbox's {} placeholder",
                provider.key_var()
            )
        } else {
            format!(
                "moat: invalid API key; only this sandbox's {} placeholder is accepted",
                provider.key_var()
            )
        };
        return deny(&call, Refusal::BadKey, msg);
    }
    // A path under the API's documented prefixes, as sent (never decoded),
    // and nothing that makes the upstream read the request another way.
    if let Err((r, msg)) = judge::check_path(provider, req.method(), &rest)
        .and_then(|_| judge::check_headers(req.headers()))
    {
        return deny(&call, r, msg);
    }
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            let msg = format!("moat: the request body is unreadable or over {MAX_BODY} bytes");
            return deny(&call, Refusal::TooLarge, msg);
        }
    };
    let body_len = body.len();
    let judged = match judge::judge(
        provider,
        &parts.method,
        &rest,
        parts.uri.query(),
        body,
        &llm.cfg.models,
    ) {
        Ok(j) => j,
        Err((r, msg)) => return deny(&call, r, msg),
    };
    call.model = judged.model.clone();
    call.stream = judged.stream;
    let est = stream::Estimate::new(body_len, judged.max_output, judged.generates);
    // Judged against the budget and held in it in one step, until counted.
    let pending = match llm.admit(&st, est.tokens()) {
        Ok(p) => p,
        Err(msg) => return deny(&call, Refusal::BudgetSpent, msg),
    };
    // The request upstream: same method, path under the base, no credential
    // or hop-by-hop header from the sandbox, the real key added.
    let up = &pc.upstream;
    let mut target = format!("{}{}", up.base_path, rest);
    if let Some(q) = parts.uri.query() {
        target.push('?');
        target.push_str(q);
    }
    let mut out = Request::builder()
        .method(parts.method.clone())
        .uri(target.as_str());
    #[allow(clippy::expect_used, reason = "a fresh builder has headers")]
    let headers = out.headers_mut().expect("a fresh builder");
    for (k, v) in &parts.headers {
        if !strip_request_header(k) {
            headers.append(k.clone(), v.clone());
        }
    }
    let authority = up.authority();
    headers.insert(
        header::HOST,
        HeaderValue::from_str(&authority).unwrap_or(HeaderValue::from_static("invalid")),
    );
    headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    let key_header = match provider {
        Provider::Anthropic => (
            HeaderName::from_static("x-api-key"),
            pc.key.expose().to_string(),
        ),
        Provider::OpenAi => (header::AUTHORIZATION, format!("Bearer {}", pc.key.expose())),
    };
    let Ok(mut key_value) = HeaderValue::from_str(&key_header.1) else {
        let msg = format!(
            "moat: the host's {} is not a valid header value",
            provider.key_var()
        );
        return deny(&call, Refusal::Upstream, msg);
    };
    key_value.set_sensitive(true);
    headers.insert(key_header.0, key_value);
    let strip = judged.strip_usage_chunk;
    let Ok(out) = out.body(Full::new(judged.body)) else {
        return deny(&call, Refusal::BadRequest, "moat: malformed request".into());
    };
    // The call runs in a task of its own: a client that hangs up does not
    // stop it from being counted.
    let task = tokio::spawn(forward(st.clone(), call, out, strip, est, pending));
    match task.await {
        Ok(r) => r,
        Err(_) => refusal_response(
            Some(provider),
            Refusal::Upstream,
            "moat: the call to the upstream failed",
        ),
    }
}

/// Sends a judged request upstream and hands back the answer, counted (a
/// whole response) or metered as it passes (a stream), with the real keys
/// redacted.
async fn forward(
    st: Arc<crate::State>,
    mut call: Call,
    out: Request<Full<Bytes>>,
    strip: bool,
    est: stream::Estimate,
    pending: Pending,
) -> Response<ProxyBody> {
    let Some(llm) = st.llm.as_ref() else {
        return refusal_response(None, Refusal::Upstream, "moat: no LLM proxy");
    };
    let provider = call.provider;
    let deny = |call: &Call, msg: String| {
        let (status, _, _) = Refusal::Upstream.shape(provider);
        st.audit_llm(call.record(
            "denied",
            Some(msg.clone()),
            Some(Refusal::Upstream),
            status.as_u16(),
            Usage::default(),
        ));
        refusal_response(provider, Refusal::Upstream, &msg)
    };
    let Some(pc) = llm
        .cfg
        .providers
        .iter()
        .find(|c| Some(c.provider) == provider)
    else {
        return deny(&call, "moat: the provider is not enabled".into());
    };
    let up = &pc.upstream;
    let resp = match send_upstream(&llm.tls, up, out).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(provider = pc.provider.name(), host = %up.host, error = %e, "LLM upstream failed");
            let e = String::from_utf8_lossy(&llm.keys.replace_all(e.as_bytes())).into_owned();
            let msg = format!(
                "moat: the upstream {} could not be reached: {e}",
                up.authority()
            );
            return deny(&call, msg);
        }
    };
    let (mut rparts, rbody) = resp.into_parts();
    strip_hop_by_hop(&mut rparts.headers);
    // The upstream's reason phrase would be passed on by hyper: not ours to pass.
    rparts.extensions.clear();
    llm.keys.headers(&mut rparts.headers);
    // The door asked for `identity`: a compressed answer could hide a key
    // from redaction and usage from the meter, so it is not passed on.
    if rparts
        .headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .any(|v| !v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"identity"))
    {
        drop(rbody);
        let (usage, _) = match rparts.status.is_success() {
            true => est.charge(Usage::default(), false),
            false => (Usage::default(), false),
        };
        llm.count(&st.cfg.lease, usage.total());
        let msg = format!(
            "moat: the upstream sent a compressed answer, which the door cannot inspect; charged {} tokens",
            usage.total()
        );
        let (s, _, _) = Refusal::Upstream.shape(provider);
        st.audit_llm(call.record(
            "denied",
            Some(msg.clone()),
            Some(Refusal::Upstream),
            s.as_u16(),
            usage,
        ));
        return refusal_response(provider, Refusal::Upstream, &msg);
    }
    let is_sse = rparts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("text/event-stream"));
    let status = rparts.status.as_u16();
    if is_sse {
        call.stream = true;
        rparts.headers.remove(header::CONTENT_LENGTH);
        let metered = stream::Metered {
            inner: Some(rbody),
            meter: stream::SseMeter::default(),
            strip: strip.then(stream::UsageChunkFilter::default),
            redact: redact::Redactor::new(llm.keys.clone()),
            done: Some(stream::Settle {
                st: st.clone(),
                call,
                status,
                est,
                pending,
            }),
            ended: false,
        };
        return Response::from_parts(rparts, metered.boxed());
    }
    let r = match Limited::new(rbody, MAX_BODY).collect().await {
        Ok(b) => {
            let b = b.to_bytes();
            let mut usage = Usage::default();
            if let Ok(v) = serde_json::from_slice::<Value>(&b) {
                usage.absorb(&v);
            }
            // A generating call answered without usage (a background
            // Responses call, say) still costs: charged its estimate.
            let whole = !(est.generates && (200..300).contains(&status) && usage.total() == 0);
            let (usage, estimated) = est.charge(usage, whole);
            let reason = estimated.then(|| {
                format!(
                    "the answer carried no usage; charged {} tokens (output at the request's limit)",
                    usage.total()
                )
            });
            llm.count(&st.cfg.lease, usage.total());
            st.audit_llm(call.record("allowed", reason, None, status, usage));
            rparts.headers.remove(header::CONTENT_LENGTH);
            Response::from_parts(rparts, full(llm.keys.replace_all(&b)))
        }
        Err(e) => {
            let (usage, _) = est.charge(Usage::default(), false);
            llm.count(&st.cfg.lease, usage.total());
            let msg = format!(
                "moat: the upstream response was unreadable or over {MAX_BODY} bytes: {e}; charged {} tokens",
                usage.total()
            );
            let msg = String::from_utf8_lossy(&llm.keys.replace_all(msg.as_bytes())).into_owned();
            let (s, _, _) = Refusal::Upstream.shape(provider);
            st.audit_llm(call.record(
                "denied",
                Some(msg.clone()),
                Some(Refusal::Upstream),
                s.as_u16(),
                usage,
            ));
            refusal_response(provider, Refusal::Upstream, &msg)
        }
    };
    pending.release();
    r
}

/// The key the sandbox presented, by the provider's own conventions.
fn presented_key(p: Provider, h: &HeaderMap) -> Option<&str> {
    let bearer = h
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match p {
        Provider::Anthropic => h
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .or(bearer),
        Provider::OpenAi => bearer,
    }
}

/// Credentials (any of them, whoever they were meant for) and hop-by-hop headers.
fn strip_request_header(k: &HeaderName) -> bool {
    matches!(
        k.as_str(),
        "authorization"
            | "proxy-authorization"
            | "x-api-key"
            | "api-key"
            | "x-goog-api-key"
            | "cookie"
            | "host"
            | "content-length"
            | "accept-encoding"
    ) || is_hop_by_hop(k)
}

fn is_hop_by_hop(k: &HeaderName) -> bool {
    matches!(
        k.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

fn strip_hop_by_hop(h: &mut HeaderMap) {
    let names: Vec<HeaderName> = h.keys().filter(|k| is_hop_by_hop(k)).cloned().collect();
    for n in names {
        h.remove(n);
    }
    h.remove("set-cookie");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_carry_user_and_channel() {
        let call = Call {
            provider: Some(Provider::Anthropic),
            host: "h".into(),
            port: 1,
            path: "/v1/messages".into(),
            model: None,
            stream: false,
            user: Some("alice".into()),
            channel: Some("cli".into()),
            t0: Instant::now(),
        };
        let v = serde_json::to_value(call.record("allowed", None, None, 200, Usage::default()))
            .unwrap();
        assert_eq!(
            (v["user"].as_str(), v["channel"].as_str()),
            (Some("alice"), Some("cli"))
        );
        assert_eq!(v["kind"], "llm");
    }

    #[test]
    fn presented_keys_follow_each_api() {
        let mut h = HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_static("a"));
        assert_eq!(presented_key(Provider::Anthropic, &h), Some("a"));
        assert_eq!(presented_key(Provider::OpenAi, &h), None);
        h.insert("authorization", HeaderValue::from_static("Bearer b"));
        assert_eq!(presented_key(Provider::OpenAi, &h), Some("b"));
    }
}
