//! WhatsApp Business Cloud API: the webhook's subscription check
//! (`hub.mode`, `hub.verify_token`, `hub.challenge`), the delivery signature
//! (`X-Hub-Signature-256`: HMAC-SHA256 of the raw body with the app secret),
//! deliveries read into messages, the Graph API client (`/messages` for text,
//! documents and read receipts, `/media` for uploads), and answers as
//! WhatsApp text.
//!
//! Must never: read a body whose signature does not verify, show the access
//! token or the app secret, or panic on any JSON.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{header, Method, Request};
use moat_creds::Secret;
use ring::hmac;
use serde::Deserialize;
use serde_json::json;

use crate::slack::transport::{self, Client, Endpoint};

pub const DEFAULT_API_URL: &str = "https://graph.facebook.com/v21.0";
/// WhatsApp's limit for a text message body is 4,096 characters.
pub const WHATSAPP_CHUNK: usize = 4000;
/// The header of a delivery's signature.
pub const SIGNATURE_HEADER: &str = "x-hub-signature-256";
/// Graph error: the customer's 24-hour service window is closed.
pub const WINDOW_CLOSED: i64 = 131047;
const TIMEOUT: Duration = Duration::from_secs(30);
const MAX_ATTEMPTS: u32 = 4;

/// Checks `X-Hub-Signature-256` (`sha256=<hex>`) over the raw body, in
/// constant time.
pub fn signature_ok(app_secret: &Secret, header_value: &[u8], body: &[u8]) -> bool {
    let Some(hex) = header_value.strip_prefix(b"sha256=") else {
        return false;
    };
    let Some(tag) = unhex(hex) else { return false };
    let key = hmac::Key::new(hmac::HMAC_SHA256, app_secret.expose().as_bytes());
    !app_secret.expose().is_empty() && hmac::verify(&key, body, &tag).is_ok()
}

/// `sha256=<hex>` for `body` (tests, the fake).
pub fn sign(app_secret: &str, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, app_secret.as_bytes());
    let tag = hmac::sign(&key, body);
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

fn unhex(h: &[u8]) -> Option<Vec<u8>> {
    if h.len() != 64 {
        return None;
    }
    let v = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    h.chunks(2)
        .map(|p| Some(v(p[0])? << 4 | v(p[1])?))
        .collect()
}

/// The subscription check: the challenge to echo, when the mode is
/// `subscribe` and the token matches (constant time).
pub fn subscription<'a>(
    mode: Option<&str>,
    token: Option<&str>,
    challenge: Option<&'a str>,
    verify_token: &Secret,
) -> Option<&'a str> {
    let want = verify_token.expose().as_bytes();
    let given = token?.as_bytes();
    let same = !want.is_empty()
        && want.len() == given.len()
        && want.iter().zip(given).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0;
    (mode? == "subscribe" && same).then_some(challenge?)
}

/// One customer message from a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaMessage {
    /// The business number's id (the channel).
    pub phone_number_id: String,
    /// The customer's WhatsApp id (the chat and the user).
    pub from: String,
    /// `wamid.…`: deduplication and read receipts.
    pub id: String,
    pub timestamp: i64,
    pub kind: WaKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaKind {
    Text(String),
    Document {
        filename: String,
        caption: String,
    },
    /// A sticker, reaction, location, ...: told "I can only read text and files here".
    Unsupported(String),
}

#[derive(Deserialize)]
struct Delivery {
    #[serde(default)]
    entry: Vec<Entry>,
}
#[derive(Deserialize)]
struct Entry {
    #[serde(default)]
    changes: Vec<Change>,
}
#[derive(Deserialize)]
struct Change {
    field: String,
    value: Value,
}
#[derive(Deserialize)]
struct Value {
    metadata: Option<Metadata>,
    #[serde(default)]
    messages: Vec<RawMessage>,
}
#[derive(Deserialize)]
struct Metadata {
    phone_number_id: String,
}
#[derive(Deserialize)]
struct RawMessage {
    from: String,
    id: String,
    timestamp: String,
    #[serde(rename = "type")]
    kind: String,
    text: Option<Body>,
    document: Option<Doc>,
}
#[derive(Deserialize)]
struct Body {
    body: String,
}
#[derive(Deserialize)]
struct Doc {
    filename: Option<String>,
    caption: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("not a WhatsApp delivery: {0}")]
pub struct DeliveryError(String);

/// The customer messages of one delivery (statuses and other fields are
/// skipped).
pub fn parse_delivery(body: &[u8]) -> Result<Vec<WaMessage>, DeliveryError> {
    let d: Delivery = serde_json::from_slice(body).map_err(|e| {
        let s = e.to_string();
        DeliveryError(s.split('"').next().unwrap_or("").trim().to_string())
    })?;
    let mut out = Vec::new();
    for e in d.entry {
        for c in e.changes.into_iter().filter(|c| c.field == "messages") {
            let Some(meta) = c.value.metadata else {
                continue;
            };
            for m in c.value.messages {
                let kind = match (m.kind.as_str(), m.text, m.document) {
                    ("text", Some(t), _) => WaKind::Text(t.body),
                    ("document", _, Some(d)) => WaKind::Document {
                        filename: d.filename.unwrap_or_else(|| "file".into()),
                        caption: d.caption.unwrap_or_default(),
                    },
                    (other, _, _) => WaKind::Unsupported(other.chars().take(32).collect()),
                };
                out.push(WaMessage {
                    phone_number_id: meta.phone_number_id.clone(),
                    from: m.from,
                    id: m.id,
                    timestamp: m.timestamp.parse().unwrap_or(0),
                    kind,
                });
            }
        }
    }
    Ok(out)
}

/// The agent's Markdown as WhatsApp text: `**bold**` → `*bold*`, headings
/// bold, links shown as `text (url)`; code blocks kept (WhatsApp shows
/// ``` as monospace). WhatsApp has no mass mentions; `@` is left alone.
pub fn to_text(markdown: &str) -> String {
    let mut out = String::new();
    let mut in_code = false;
    for line in markdown.split('\n') {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            out.push_str("```\n");
            continue;
        }
        if in_code {
            out.push_str(line);
        } else {
            let l = match line.trim_start().strip_prefix('#') {
                Some(_) => format!("*{}*", line.trim_start().trim_start_matches('#').trim()),
                None => line.replace("**", "*"),
            };
            out.push_str(&unlink(&l));
        }
        out.push('\n');
    }
    out.trim_end().to_string()
}

/// `[text](url)` → `text (url)`.
fn unlink(line: &str) -> String {
    let mut out = String::new();
    let mut rest = line;
    while let Some(i) = rest.find('[') {
        out.push_str(&rest[..i]);
        let after = &rest[i..];
        let parsed = after.find("](").and_then(|c| {
            let text = &after[1..c];
            let tail = &after[c + 2..];
            let e = tail.find(')')?;
            (!text.contains('[')).then(|| (text, &tail[..e], c + 2 + e + 1))
        });
        match parsed {
            Some((t, u, used)) => {
                out.push_str(&format!("{t} ({u})"));
                rest = &after[used..];
            }
            None => {
                out.push('[');
                rest = &after[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    #[error("whatsapp.api_url {url:?} is not usable: {reason}")]
    BadUrl { url: String, reason: &'static str },
    #[error("WhatsApp {what} failed: {reason}")]
    Transport { what: &'static str, reason: String },
    #[error("WhatsApp {what} refused the call (error {code}): {message}")]
    Api {
        what: &'static str,
        code: i64,
        message: String,
    },
}

impl CloudError {
    /// The customer's 24-hour window is closed: only template messages
    /// reach them now.
    pub fn window_closed(&self) -> bool {
        matches!(self, CloudError::Api { code, .. } if *code == WINDOW_CLOSED)
    }
}

/// The Graph API with the access token.
#[derive(Clone)]
pub struct CloudApi {
    base: Endpoint,
    token: Secret,
    client: Arc<Client>,
}

impl std::fmt::Debug for CloudApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloudApi")
            .field("host", &self.base.host)
            .finish_non_exhaustive()
    }
}

impl CloudApi {
    pub fn new(api_url: &str, allow_http: bool, token: Secret) -> Result<CloudApi, CloudError> {
        let base = transport::parse_endpoint(api_url, allow_http, false).map_err(|reason| {
            CloudError::BadUrl {
                url: api_url.to_string(),
                reason,
            }
        })?;
        Ok(CloudApi {
            base,
            token,
            client: Arc::new(Client::new()),
        })
    }

    /// A text message to `to`.
    pub async fn send_text(&self, phone_id: &str, to: &str, text: &str) -> Result<(), CloudError> {
        let body = json!({"messaging_product": "whatsapp", "recipient_type": "individual",
            "to": to, "type": "text", "text": {"preview_url": false, "body": text}});
        self.post(
            "messages",
            phone_id,
            "application/json",
            Bytes::from(body.to_string()),
        )
        .await
        .map(drop)
    }

    /// Marks a customer's message read (the blue ticks).
    pub async fn mark_read(&self, phone_id: &str, message_id: &str) -> Result<(), CloudError> {
        let body =
            json!({"messaging_product": "whatsapp", "status": "read", "message_id": message_id});
        self.post(
            "messages",
            phone_id,
            "application/json",
            Bytes::from(body.to_string()),
        )
        .await
        .map(drop)
    }

    /// Uploads `bytes` to `/media` and sends it to `to` as a document.
    pub async fn send_document(
        &self,
        phone_id: &str,
        to: &str,
        name: &str,
        bytes: Bytes,
    ) -> Result<(), CloudError> {
        let boundary = format!("moat-{}", bytes.len() ^ 0x5a5a_5a5a);
        let safe: String = name
            .chars()
            .map(|c| {
                if c == '"' || c == '\\' || c.is_control() {
                    '_'
                } else {
                    c
                }
            })
            .collect();
        let mut body = Vec::with_capacity(bytes.len() + 512);
        body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"messaging_product\"\r\n\r\nwhatsapp\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"type\"\r\n\r\napplication/octet-stream\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{safe}\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes());
        body.extend_from_slice(&bytes);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let v = self
            .post(
                "media",
                phone_id,
                &format!("multipart/form-data; boundary={boundary}"),
                Bytes::from(body),
            )
            .await?;
        let id = v["id"].as_str().unwrap_or_default().to_string();
        let msg = json!({"messaging_product": "whatsapp", "recipient_type": "individual", "to": to,
            "type": "document", "document": {"id": id, "filename": safe}});
        self.post(
            "messages",
            phone_id,
            "application/json",
            Bytes::from(msg.to_string()),
        )
        .await
        .map(drop)
    }

    async fn post(
        &self,
        what: &'static str,
        phone_id: &str,
        ctype: &str,
        payload: Bytes,
    ) -> Result<serde_json::Value, CloudError> {
        let prefix = self.base.path_and_query.trim_end_matches('/');
        let uri = format!("{prefix}/{phone_id}/{what}");
        let mut auth = header::HeaderValue::from_str(&format!("Bearer {}", self.token.expose()))
            .map_err(|_| CloudError::Transport {
                what,
                reason: "WHATSAPP_TOKEN is not a valid header value".into(),
            })?;
        auth.set_sensitive(true);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let req = Request::builder()
                .method(Method::POST)
                .uri(uri.as_str())
                .header(header::HOST, self.base.authority.as_str())
                .header(header::USER_AGENT, "moat")
                .header(header::AUTHORIZATION, auth.clone())
                .header(header::CONTENT_TYPE, ctype)
                .body(Full::new(payload.clone()))
                .map_err(|e| CloudError::Transport {
                    what,
                    reason: format!("building the request: {e}"),
                })?;
            let (resp, body) = self
                .client
                .send(&self.base, req, TIMEOUT)
                .await
                .map_err(|reason| CloudError::Transport { what, reason })?;
            let status = resp.status().as_u16();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            if (status == 429 || status >= 500) && attempt < MAX_ATTEMPTS {
                tracing::warn!(
                    call = what,
                    status,
                    attempt,
                    "WhatsApp asked to slow down or failed; retrying"
                );
                tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
                continue;
            }
            if !(200..300).contains(&status) {
                let e = &v["error"];
                return Err(CloudError::Api {
                    what,
                    code: e["code"].as_i64().unwrap_or(status as i64),
                    message: e["message"]
                        .as_str()
                        .unwrap_or("")
                        .chars()
                        .filter(|c| !c.is_control())
                        .take(200)
                        .collect(),
                });
            }
            return Ok(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_and_subscription() {
        let s = Secret::new("app-secret");
        let body = br#"{"entry":[]}"#;
        assert!(signature_ok(&s, sign("app-secret", body).as_bytes(), body));
        assert!(!signature_ok(&s, sign("other", body).as_bytes(), body));
        assert!(!signature_ok(&s, sign("app-secret", b"x").as_bytes(), body));
        assert!(!signature_ok(&s, b"sha256=zz", body));
        assert!(!signature_ok(&s, b"", body));
        let v = Secret::new("verify-me");
        assert_eq!(
            subscription(Some("subscribe"), Some("verify-me"), Some("42"), &v),
            Some("42")
        );
        assert_eq!(
            subscription(Some("subscribe"), Some("verify-mE"), Some("42"), &v),
            None
        );
        assert_eq!(
            subscription(Some("unsubscribe"), Some("verify-me"), Some("42"), &v),
            None
        );
    }

    #[test]
    fn deliveries_and_text() {
        let body = json!({"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [
            {"field": "messages", "value": {"metadata": {"phone_number_id": "555"},
             "messages": [{"from": "4915", "id": "wamid.A", "timestamp": "1700000000", "type": "text", "text": {"body": "hi"}},
                          {"from": "4915", "id": "wamid.B", "timestamp": "1700000001", "type": "sticker", "sticker": {}}],
             "statuses": [{"id": "x"}]}}]}]});
        let m = parse_delivery(body.to_string().as_bytes()).unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].kind, WaKind::Text("hi".into()));
        assert_eq!(m[1].kind, WaKind::Unsupported("sticker".into()));
        assert!(parse_delivery(b"{").is_err());
        assert_eq!(
            to_text("# T\n**b** [✅ done](https://e.x)"),
            "*T*\n*b* ✅ done (https://e.x)"
        );
    }
}
