//! What the LLM door decides about a request before anything goes upstream:
//! whether its method and path are ones the API documents and the door can
//! meter, whether its body is one unambiguous JSON object, which model it
//! names and whether the allowlist can judge that, and what the upstream
//! request becomes (Chat Completions streams ask for their usage).
//!
//! Must never: let a request through that two parsers could read two ways
//! (encoded path segments, duplicate JSON keys, method overrides, a body on
//! GET, a compressed body), or let a model through that is named anywhere the
//! allowlist did not look (docs/threat-model.md C5).

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Serialize;
use serde_json::{Map, Value};

use super::Provider;

/// Why the door refused a call; the audit record's `refusal` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// Not `/anthropic/...` or `/openai/...`.
    UnknownProvider,
    /// The provider is not enabled for this sandbox.
    ProviderNotEnabled,
    /// No key, or not this sandbox's placeholder.
    BadKey,
    /// Dot segments, percent-encoding, backslashes or empty segments.
    BadPath,
    /// A method and path the door does not serve.
    PathNotServed,
    /// `X-HTTP-Method-Override` and its relatives.
    MethodOverride,
    /// A GET with a body.
    BodyOnGet,
    /// A request body with a `Content-Encoding`.
    EncodedBody,
    /// The body is not one JSON object, or has a key twice.
    AmbiguousJson,
    /// A model named somewhere the allowlist cannot judge.
    ModelNotJudgeable,
    /// A model not on the allowlist.
    ModelNotAllowed,
    /// Over the request size limit.
    TooLarge,
    /// The lease's or the user's token budget is spent.
    BudgetSpent,
    /// The upstream could not be reached or answered badly.
    Upstream,
    /// Anything else the door could not build.
    BadRequest,
}

impl Refusal {
    /// The HTTP status, the error type in the provider's own shape, and a code.
    pub fn shape(self, p: Option<Provider>) -> (StatusCode, &'static str, &'static str) {
        let openai = p == Some(Provider::OpenAi);
        let invalid = "invalid_request_error";
        match self {
            Refusal::UnknownProvider => (StatusCode::NOT_FOUND, "not_found_error", "not_found"),
            Refusal::ProviderNotEnabled => (StatusCode::NOT_FOUND, "not_found_error", "not_found"),
            Refusal::BadKey if openai => (StatusCode::UNAUTHORIZED, invalid, "invalid_api_key"),
            Refusal::BadKey => (
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "invalid_api_key",
            ),
            Refusal::BadPath => (StatusCode::BAD_REQUEST, invalid, "bad_path"),
            Refusal::PathNotServed if openai => (StatusCode::NOT_FOUND, invalid, "path_not_served"),
            Refusal::PathNotServed => (StatusCode::NOT_FOUND, "not_found_error", "path_not_served"),
            Refusal::MethodOverride => (StatusCode::BAD_REQUEST, invalid, "method_override"),
            Refusal::BodyOnGet => (StatusCode::BAD_REQUEST, invalid, "body_on_get"),
            Refusal::EncodedBody => (StatusCode::BAD_REQUEST, invalid, "encoded_body"),
            Refusal::AmbiguousJson => (StatusCode::BAD_REQUEST, invalid, "ambiguous_json"),
            Refusal::ModelNotJudgeable if openai => {
                (StatusCode::FORBIDDEN, invalid, "model_not_judgeable")
            }
            Refusal::ModelNotJudgeable => (
                StatusCode::FORBIDDEN,
                "permission_error",
                "model_not_judgeable",
            ),
            Refusal::ModelNotAllowed if openai => {
                (StatusCode::FORBIDDEN, invalid, "model_not_allowed")
            }
            Refusal::ModelNotAllowed => (
                StatusCode::FORBIDDEN,
                "permission_error",
                "model_not_allowed",
            ),
            Refusal::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, invalid, "request_too_large"),
            Refusal::BudgetSpent if openai => (
                StatusCode::TOO_MANY_REQUESTS,
                "insufficient_quota",
                "budget_exceeded",
            ),
            Refusal::BudgetSpent => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "budget_exceeded",
            ),
            Refusal::Upstream if openai => {
                (StatusCode::BAD_GATEWAY, "server_error", "upstream_error")
            }
            Refusal::Upstream => (StatusCode::BAD_GATEWAY, "api_error", "upstream_error"),
            Refusal::BadRequest => (StatusCode::BAD_REQUEST, invalid, "bad_request"),
        }
    }
}

/// A refusal and the message the client (and the audit record) gets.
pub type Refused = (Refusal, String);

fn refused(r: Refusal, msg: impl Into<String>) -> Refused {
    (r, format!("moat: {}", msg.into()))
}

/// The API endpoints the door serves: each one's usage it can read. `*` is
/// one id segment (letters, digits, `-`, `_`, `.`, `:`).
const ENDPOINTS: &[(Provider, &str, &str)] = &[
    (Provider::Anthropic, "POST", "/v1/messages"),
    (Provider::Anthropic, "POST", "/v1/messages/count_tokens"),
    (Provider::Anthropic, "GET", "/v1/models"),
    (Provider::Anthropic, "GET", "/v1/models/*"),
    (Provider::OpenAi, "POST", "/v1/chat/completions"),
    (Provider::OpenAi, "POST", "/v1/responses"),
    (Provider::OpenAi, "POST", "/v1/embeddings"),
    (Provider::OpenAi, "GET", "/v1/models"),
    (Provider::OpenAi, "GET", "/v1/models/*"),
];

/// The endpoints one provider serves, for messages and docs.
pub fn endpoints(p: Provider) -> impl Iterator<Item = String> {
    ENDPOINTS
        .iter()
        .filter(move |(q, _, _)| *q == p)
        .map(|(_, m, path)| format!("{m} {path}"))
}

fn id_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

fn matches(pattern: &str, path: &str) -> bool {
    let (mut p, mut q) = (pattern.split('/'), path.split('/'));
    loop {
        match (p.next(), q.next()) {
            (None, None) => return true,
            (Some("*"), Some(seg)) if id_segment(seg) => {}
            (Some(a), Some(b)) if a == b => {}
            _ => return false,
        }
    }
}

/// Checks the raw path below the provider prefix (`/v1/...`, as sent, not
/// decoded) and the method against the served endpoints.
pub fn check_path(p: Provider, method: &Method, rest: &str) -> Result<(), Refused> {
    if rest.contains(['%', '\\', ';']) || !rest.is_ascii() {
        return Err(refused(
            Refusal::BadPath,
            "percent-encoding, backslashes and semicolons are not allowed in the path",
        ));
    }
    if rest
        .split('/')
        .skip(1)
        .any(|seg| seg.is_empty() || seg == "." || seg == "..")
    {
        return Err(refused(
            Refusal::BadPath,
            "dot segments and empty segments are not allowed in the path",
        ));
    }
    if ENDPOINTS
        .iter()
        .any(|(q, m, pat)| *q == p && method.as_str() == *m && matches(pat, rest))
    {
        return Ok(());
    }
    Err(refused(
        Refusal::PathNotServed,
        format!(
            "{method} {rest} is not served for {}; the door serves: {}",
            p.name(),
            endpoints(p).collect::<Vec<_>>().join(", ")
        ),
    ))
}

/// Headers that would make the upstream read the request another way.
pub fn check_headers(h: &HeaderMap) -> Result<(), Refused> {
    for name in [
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
    ] {
        if h.contains_key(name) {
            return Err(refused(
                Refusal::MethodOverride,
                format!("the {name} header is not allowed"),
            ));
        }
    }
    if h.get_all(http::header::CONTENT_ENCODING)
        .iter()
        .any(|v| !v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"identity"))
    {
        return Err(refused(
            Refusal::EncodedBody,
            "a request body with a Content-Encoding is not allowed",
        ));
    }
    Ok(())
}

/// What the door learnt from a request it will forward.
#[derive(Debug, Default)]
pub struct Judged {
    /// The top-level `model`.
    pub model: Option<String>,
    pub stream: bool,
    /// Output tokens the request allows (`max_tokens`, ...), if it says.
    pub max_output: Option<u64>,
    /// The endpoint generates output (messages, chat, responses).
    pub generates: bool,
    /// The door added `stream_options.include_usage`: the usage-only chunk
    /// is not the client's to see.
    pub strip_usage_chunk: bool,
    /// The body to send upstream.
    pub body: Bytes,
}

/// Keys an API could read a model from.
const MODEL_KEYS: &[&str] = &["model", "model_id", "engine", "deployment", "deployment_id"];

/// Top-level fields that hold the conversation and tools: free-form data in
/// which a key named `model` is content, not a choice of model.
const CONTENT_FIELDS: &[&str] = &[
    "messages",
    "input",
    "system",
    "tools",
    "tool_choice",
    "instructions",
    "prompt",
    "metadata",
    "response_format",
    "text",
];

/// A key naming a model below `v`, as a path for the message.
fn nested_model(v: &Value, at: &str) -> Option<String> {
    match v {
        Value::Object(m) => m.iter().find_map(|(k, v)| {
            let here = format!("{at}.{k}");
            if MODEL_KEYS.contains(&k.to_ascii_lowercase().as_str()) {
                Some(here)
            } else {
                nested_model(v, &here)
            }
        }),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .find_map(|(i, v)| nested_model(v, &format!("{at}[{i}]"))),
        _ => None,
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Judges a request the door may forward: its body (one JSON object without
/// duplicate keys for a POST, nothing for a GET), and, with an allowlist,
/// every place it could name a model.
pub fn judge(
    p: Provider,
    method: &Method,
    rest: &str,
    query: Option<&str>,
    body: Bytes,
    allowed: &[String],
) -> Result<Judged, Refused> {
    if !allowed.is_empty() {
        for pair in query.unwrap_or("").split('&') {
            let mut key = pair.split('=').next().unwrap_or("").to_string();
            for _ in 0..4 {
                key = percent_decode(&key);
            }
            let key = key.to_ascii_lowercase();
            if MODEL_KEYS.iter().any(|m| key.contains(m)) {
                return Err(refused(
                    Refusal::ModelNotJudgeable,
                    "a model named in the query string cannot be judged by the allowlist; \
                     name it in the body's model field",
                ));
            }
        }
    }
    if method == Method::GET {
        if !body.is_empty() {
            return Err(refused(
                Refusal::BodyOnGet,
                "a GET request must not have a body",
            ));
        }
        return Ok(Judged {
            body,
            ..Judged::default()
        });
    }
    let doc = match serde_json::from_slice::<Strict>(&body) {
        Ok(Strict(Value::Object(m))) => m,
        Ok(_) => {
            return Err(refused(
                Refusal::AmbiguousJson,
                "the request body must be one JSON object",
            ))
        }
        Err(e) => {
            let why: String = e.to_string().chars().take(120).collect();
            return Err(refused(
                Refusal::AmbiguousJson,
                format!("the request body is not one unambiguous JSON object: {why}"),
            ));
        }
    };
    let model = match doc.get("model") {
        None => None,
        Some(Value::String(m)) => Some(m.clone()),
        Some(_) => {
            return Err(refused(
                Refusal::ModelNotJudgeable,
                "the model field must be a string",
            ))
        }
    };
    if !allowed.is_empty() {
        for (k, v) in &doc {
            let lower = k.to_ascii_lowercase();
            if k != "model" && MODEL_KEYS.contains(&lower.as_str()) {
                return Err(refused(
                    Refusal::ModelNotJudgeable,
                    format!("a model named in {k:?} cannot be judged by the allowlist"),
                ));
            }
            if CONTENT_FIELDS.contains(&k.as_str()) {
                continue;
            }
            if let Some(at) = nested_model(v, k) {
                return Err(refused(
                    Refusal::ModelNotJudgeable,
                    format!(
                        "a model named in {at:?} cannot be judged by the allowlist; \
                         only the top-level model field is"
                    ),
                ));
            }
        }
        let ok = model.as_ref().is_some_and(|m| allowed.contains(m));
        if !ok {
            return Err(refused(
                Refusal::ModelNotAllowed,
                format!(
                    "model {} is not allowed for this sandbox; allowed: {}",
                    model.as_deref().unwrap_or("(none)"),
                    allowed.join(", ")
                ),
            ));
        }
    }
    let stream = doc.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let max_output = ["max_tokens", "max_completion_tokens", "max_output_tokens"]
        .iter()
        .find_map(|k| doc.get(*k).and_then(Value::as_u64));
    let generates = matches!(
        rest,
        "/v1/messages" | "/v1/chat/completions" | "/v1/responses"
    );
    let mut j = Judged {
        model,
        stream,
        max_output,
        generates,
        strip_usage_chunk: false,
        body,
    };
    // A Chat Completions stream carries its usage only when asked to.
    if p == Provider::OpenAi && rest == "/v1/chat/completions" && stream {
        let asked = doc
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            == Some(true);
        if !asked {
            let mut doc = doc;
            let opts = doc
                .entry("stream_options")
                .or_insert_with(|| Value::Object(Map::new()));
            if !opts.is_object() {
                *opts = Value::Object(Map::new());
            }
            if let Some(o) = opts.as_object_mut() {
                o.insert("include_usage".into(), Value::Bool(true));
            }
            j.body = Bytes::from(serde_json::to_vec(&Value::Object(doc)).map_err(|_| {
                refused(Refusal::BadRequest, "the request body could not be rebuilt")
            })?);
            j.strip_usage_chunk = true;
        }
    }
    Ok(j)
}

/// A JSON value that refuses an object with the same key twice (at any
/// depth): the door and a first-wins parser upstream would read two models.
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Strict, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(k) = map.next_key::<String>()? {
            let Strict(v) = map.next_value()?;
            if out.contains_key(&k) {
                let shown: String = k.chars().take(40).collect();
                return Err(de::Error::custom(format!(
                    "the key {shown:?} appears twice"
                )));
            }
            out.insert(k, v);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn j(body: &str, allowed: &[&str]) -> Result<Judged, Refused> {
        let allowed: Vec<String> = allowed.iter().map(|s| s.to_string()).collect();
        judge(
            Provider::Anthropic,
            &Method::POST,
            "/v1/messages",
            None,
            Bytes::from(body.to_string()),
            &allowed,
        )
    }

    #[test]
    fn encoded_traversal_and_unserved_paths_are_refused() {
        let post = Method::POST;
        for bad in [
            "/v1/..%2f..%2fadmin",
            "/v1/%2f..%2fmessages",
            "/v1/..%5cadmin",
            "/v1/%252e%252e/admin",
            "/v1/%2E%2E/admin",
            "/v1/messages%2f..%2f..%2fx",
            "/v1/..\\admin",
            "/v1/messages;x=1",
            "/v1//messages",
            "/v1/./messages",
            "/v1/../v1/messages",
        ] {
            let e = check_path(Provider::Anthropic, &post, bad).unwrap_err();
            assert_eq!(e.0, Refusal::BadPath, "{bad}: {e:?}");
        }
        for unserved in [
            "/v1/messages/batches",
            "/v1/files",
            "/deployments/gpt-x/chat/completions",
            "/v1/complete",
            "/admin",
        ] {
            let e = check_path(Provider::Anthropic, &post, unserved).unwrap_err();
            assert_eq!(e.0, Refusal::PathNotServed, "{unserved}");
        }
        check_path(Provider::Anthropic, &post, "/v1/messages").unwrap();
        check_path(Provider::Anthropic, &Method::GET, "/v1/models/claude-x-1.5").unwrap();
        assert!(check_path(Provider::Anthropic, &Method::GET, "/v1/messages").is_err());
        assert!(check_path(Provider::Anthropic, &Method::DELETE, "/v1/models/x").is_err());
        check_path(Provider::OpenAi, &post, "/v1/chat/completions").unwrap();
        assert!(check_path(Provider::OpenAi, &post, "/v1/messages").is_err());
        assert!(check_path(Provider::OpenAi, &post, "/v1/batches").is_err());
    }

    #[test]
    fn a_model_named_outside_the_top_level_field_is_refused() {
        let ok = j(r#"{"model":"m1","max_tokens":5,"messages":[]}"#, &["m1"]).unwrap();
        assert_eq!((ok.model.as_deref(), ok.max_output), (Some("m1"), Some(5)));
        let bad = j(r#"{"model":"m2","messages":[]}"#, &["m1"]).unwrap_err();
        assert_eq!(bad.0, Refusal::ModelNotAllowed);
        for (body, want) in [
            (r#"{"model":"m1","model":"m2"}"#, Refusal::AmbiguousJson),
            (
                r#"{"model":"m1","x":{"a":1,"a":2}}"#,
                Refusal::AmbiguousJson,
            ),
            (
                r#"{"model":"m1","mod\u0065l":"m2"}"#,
                Refusal::AmbiguousJson,
            ),
            (r#"{"model":"m1"} {"model":"m2"}"#, Refusal::AmbiguousJson),
            (r#"[{"model":"m1"}]"#, Refusal::AmbiguousJson),
            ("model=m1", Refusal::AmbiguousJson),
            (
                r#"{"model":"m1","params":{"model":"m2"}}"#,
                Refusal::ModelNotJudgeable,
            ),
            (
                r#"{"model":"m1","requests":[{"params":{"model":"m2"}}]}"#,
                Refusal::ModelNotJudgeable,
            ),
            (
                r#"{"model":"m1","engine":"m2"}"#,
                Refusal::ModelNotJudgeable,
            ),
            (r#"{"model":["m1","m2"]}"#, Refusal::ModelNotJudgeable),
            (
                r#"{"model":"m1","extra_body":{"Model":"m2"}}"#,
                Refusal::ModelNotJudgeable,
            ),
        ] {
            assert_eq!(j(body, &["m1"]).unwrap_err().0, want, "{body}");
        }
        // Duplicate keys are refused with or without an allowlist.
        assert_eq!(
            j(r#"{"stream":false,"stream":true}"#, &[]).unwrap_err().0,
            Refusal::AmbiguousJson
        );
        // A tool whose schema has a property called model is content.
        j(
            r#"{"model":"m1","tools":[{"name":"t","input_schema":{"properties":{"model":{}}}}],"messages":[{"role":"user","content":[{"type":"tool_result","content":"{\"model\":1}"}]}]}"#,
            &["m1"],
        )
        .unwrap();
        let q = |q: &str| {
            judge(
                Provider::Anthropic,
                &Method::POST,
                "/v1/messages",
                Some(q),
                Bytes::from_static(br#"{"model":"m1"}"#),
                &["m1".to_string()],
            )
        };
        for bad in [
            "model=m2",
            "beta=true&MODEL=m2",
            "%6dodel=m2",
            "%256dodel=m2",
            "x_model_id=m2",
        ] {
            assert_eq!(q(bad).unwrap_err().0, Refusal::ModelNotJudgeable, "{bad}");
        }
        q("beta=true").unwrap();
    }

    #[test]
    fn gets_with_bodies_and_overrides_are_refused() {
        let e = judge(
            Provider::OpenAi,
            &Method::GET,
            "/v1/models",
            None,
            Bytes::from_static(br#"{"model":"m2"}"#),
            &[],
        )
        .unwrap_err();
        assert_eq!(e.0, Refusal::BodyOnGet);
        let mut h = HeaderMap::new();
        h.insert("x-http-method-override", "GET".parse().unwrap());
        assert_eq!(check_headers(&h).unwrap_err().0, Refusal::MethodOverride);
        let mut h = HeaderMap::new();
        h.insert("content-encoding", "gzip".parse().unwrap());
        assert_eq!(check_headers(&h).unwrap_err().0, Refusal::EncodedBody);
    }

    #[test]
    fn chat_streams_ask_for_their_usage() {
        let chat = |body: &str| {
            judge(
                Provider::OpenAi,
                &Method::POST,
                "/v1/chat/completions",
                None,
                Bytes::from(body.to_string()),
                &[],
            )
            .unwrap()
        };
        let j = chat(r#"{"model":"g","stream":true,"messages":[]}"#);
        assert!(j.strip_usage_chunk);
        let v: Value = serde_json::from_slice(&j.body).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        let j = chat(r#"{"model":"g","stream":true,"stream_options":{"include_usage":true}}"#);
        assert!(!j.strip_usage_chunk);
        let j = chat(r#"{"model":"g","stream":true,"stream_options":{"include_usage":false}}"#);
        assert!(j.strip_usage_chunk);
        let j = chat(r#"{"model":"g","messages":[]}"#);
        assert!(!j.strip_usage_chunk);
        assert_eq!(&j.body[..], br#"{"model":"g","messages":[]}"#);
    }
}
