//! Approvals on Slack (docs/approvals.md): the request message with
//! Approve and Deny buttons (Block Kit; the action ids carry the request's
//! random id), its update once decided, and `POST /slack/interactions`, the
//! endpoint Slack sends button clicks to (`application/x-www-form-urlencoded`
//! with one field, `payload`, a JSON `block_actions` object); in Socket
//! Mode the same payload comes in an `interactive` envelope.
//!
//! Must never: read a byte of an interaction before its signature and
//! timestamp verified (the events endpoint's check, same secret, same
//! five-minute window), take the clicker from anywhere but the signed
//! payload's `user.id`, or show the agent's words unescaped (they could
//! mention everyone or hide a link).

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use moat_chat::format::escape;
use moat_chat::slack::WebApi;
use moat_policy::approvals::DecideRefusal;
use moat_policy::gateway::Platform;
use serde_json::{json, Value};

use crate::approvals::{ApprovalPost, Decision};
use crate::metrics::Verdict;
use crate::platform::{decision_text, ConvRef, CHANNEL_THREAD};
use crate::slack::SlackIn;

/// Action id prefixes of the two buttons: `moat-approve:<id>`.
const APPROVE: &str = "moat-approve:";
const DENY: &str = "moat-deny:";
/// Largest interaction body read (Slack's are a few KiB).
const MAX_BODY: usize = 256 * 1024;

fn thread(conv: &ConvRef) -> Option<&str> {
    (conv.thread != CHANNEL_THREAD).then_some(conv.thread.as_str())
}

/// The request's text: moat's summary and the agent's detail, both escaped.
fn text_of(req: &ApprovalPost) -> String {
    let mut t = format!("*Approval needed.* {}", escape(&req.summary));
    if let Some(d) = &req.detail {
        for line in d.lines().take(40) {
            t.push_str("\n> ");
            t.push_str(&escape(line));
        }
    }
    t
}

/// The request's blocks: the text, then Approve and Deny.
pub fn request_blocks(req: &ApprovalPost) -> Value {
    json!([
        {"type": "section", "text": {"type": "mrkdwn", "text": text_of(req)}},
        {"type": "actions", "block_id": "moat-approval", "elements": [
            {"type": "button", "action_id": format!("{APPROVE}{}", req.id), "value": req.id,
             "style": "primary", "text": {"type": "plain_text", "text": "Approve"}},
            {"type": "button", "action_id": format!("{DENY}{}", req.id), "value": req.id,
             "style": "danger", "text": {"type": "plain_text", "text": "Deny"}},
        ]},
    ])
}

/// Posts the request in the conversation; its `ts`.
pub async fn post_request(api: &WebApi, conv: &ConvRef, req: &ApprovalPost) -> Option<String> {
    let text = text_of(req);
    match api
        .post_blocks(&conv.channel, thread(conv), &text, &request_blocks(req))
        .await
    {
        Ok(ts) => Some(ts),
        Err(e) => {
            tracing::warn!(error = %e, "an approval request could not be posted to Slack; it will time out");
            None
        }
    }
}

/// Replaces the buttons with the decision.
pub async fn post_decision(
    api: &WebApi,
    conv: &ConvRef,
    req: &ApprovalPost,
    asked: Option<&str>,
    d: &Decision,
) {
    let text = format!("{}\n*{}*", text_of(req), escape(&decision_text(d)));
    let blocks = json!([{"type": "section", "text": {"type": "mrkdwn", "text": text}}]);
    let r = match asked {
        Some(ts) => api.update_blocks(&conv.channel, ts, &text, &blocks).await,
        None => api
            .post_message(&conv.channel, thread(conv), &text)
            .await
            .map(drop),
    };
    if let Err(e) = r {
        tracing::warn!(error = %e, "an approval's decision could not be shown on Slack");
    }
}

/// What a click asks: (request id, approve?, clicker).
#[derive(Debug, PartialEq, Eq)]
pub struct Click {
    pub id: String,
    pub approve: bool,
    pub user: String,
}

/// Reads a verified interaction body: the `payload` field, a
/// `block_actions` payload with one of moat's buttons.
pub fn parse_click(body: &[u8]) -> Result<Click, &'static str> {
    let payload = form_urlencoded::parse(body)
        .find(|(k, _)| k == "payload")
        .map(|(_, v)| v.into_owned())
        .ok_or("no payload field")?;
    parse_payload(payload.as_bytes())
}

/// Reads an interaction payload (JSON): a click on one of moat's buttons.
/// Socket Mode delivers it as is, inside an `interactive` envelope.
pub fn parse_payload(payload: &[u8]) -> Result<Click, &'static str> {
    let v: Value = serde_json::from_slice(payload).map_err(|_| "the payload is not JSON")?;
    if v["type"] != "block_actions" {
        return Err("not a block_actions payload");
    }
    let user = v["user"]["id"]
        .as_str()
        .filter(|u| !u.is_empty() && u.len() <= 64)
        .ok_or("no user.id")?;
    let action = v["actions"]
        .as_array()
        .and_then(|a| a.first())
        .and_then(|a| a["action_id"].as_str())
        .ok_or("no action")?;
    let (approve, id) = if let Some(id) = action.strip_prefix(APPROVE) {
        (true, id)
    } else if let Some(id) = action.strip_prefix(DENY) {
        (false, id)
    } else {
        return Err("not one of moat's buttons");
    };
    Ok(Click {
        id: id.to_string(),
        approve,
        user: user.to_string(),
    })
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `POST /slack/interactions`.
pub async fn interactions(State(s): State<SlackIn>, headers: HeaderMap, body: Bytes) -> Response {
    let gw = &s.gw;
    if body.len() > MAX_BODY {
        gw.inner.metrics.event(Verdict::Invalid);
        return (StatusCode::PAYLOAD_TOO_LARGE, "body too large").into_response();
    }
    // The signature first: nothing of an unsigned body is read.
    if let Err(e) = s.verifier.verify(&headers, &body, now_secs()) {
        gw.inner.metrics.event(Verdict::Forged);
        let reason = match e {
            moat_chat::slack::SignatureError::Stale { .. } => "stale_timestamp",
            moat_chat::slack::SignatureError::Mismatch => "bad_signature",
            _ => "unsigned",
        };
        gw.audit_unverified_click("slack", reason);
        return (StatusCode::UNAUTHORIZED, "invalid signature").into_response();
    }
    let click = match parse_click(&body) {
        Ok(c) => c,
        Err(why) => {
            gw.inner.metrics.event(Verdict::Invalid);
            tracing::debug!(
                reason = why,
                "a Slack interaction was not one of moat's buttons"
            );
            return (StatusCode::BAD_REQUEST, why).into_response();
        }
    };
    match gw.decide_approval(
        &click.id,
        Platform::Slack,
        &click.user,
        click.approve,
        "slack",
    ) {
        Ok(_) => StatusCode::OK.into_response(),
        Err(why) => {
            let status = match why {
                DecideRefusal::NotAdmin => StatusCode::FORBIDDEN,
                DecideRefusal::AlreadyDecided => StatusCode::CONFLICT,
                DecideRefusal::Unknown => StatusCode::NOT_FOUND,
            };
            (status, why.message()).into_response()
        }
    }
}

/// A click that came over Socket Mode (authenticated by the connection
/// moat opened with the app-level token): decided like one over HTTP.
/// Always acknowledged, refused or not (Slack would only resend it).
pub fn socket_click(gw: &crate::pipeline::Gateway, payload: &[u8]) {
    match parse_payload(payload) {
        Ok(c) => {
            let _ = gw.decide_approval(&c.id, Platform::Slack, &c.user, c.approve, "slack-socket");
        }
        Err(why) => {
            tracing::debug!(
                reason = why,
                "a Socket Mode interaction was not one of moat's buttons"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(payload: &Value) -> Vec<u8> {
        form_urlencoded::Serializer::new(String::new())
            .append_pair("payload", &payload.to_string())
            .finish()
            .into_bytes()
    }

    #[test]
    fn clicks_are_read_from_the_payload() {
        let id = "0123456789abcdef0123456789abcdef";
        let p = json!({"type": "block_actions", "user": {"id": "U1"},
            "actions": [{"action_id": format!("moat-deny:{id}"), "value": id}]});
        assert_eq!(
            parse_click(&form(&p)),
            Ok(Click {
                id: id.into(),
                approve: false,
                user: "U1".into()
            })
        );
        let p = json!({"type": "view_submission", "user": {"id": "U1"}});
        assert!(parse_click(&form(&p)).is_err());
        let p = json!({"type": "block_actions", "user": {"id": "U1"},
            "actions": [{"action_id": "other:1"}]});
        assert!(parse_click(&form(&p)).is_err());
        assert!(parse_click(b"payload=%7Bnot").is_err());
        assert!(parse_click(b"x=1").is_err());
    }

    #[test]
    fn the_agents_words_are_escaped() {
        let req = ApprovalPost {
            id: "ab".into(),
            summary: "send to C1".into(),
            detail: Some("<!channel> <https://evil|click>".into()),
        };
        let t = text_of(&req);
        assert!(!t.contains("<!channel>") && !t.contains("<https"), "{t}");
        let b = request_blocks(&req);
        assert_eq!(b[1]["elements"][0]["action_id"], "moat-approve:ab");
        assert_eq!(b[1]["elements"][1]["action_id"], "moat-deny:ab");
    }
}
