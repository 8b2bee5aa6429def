//! Approvals on Discord (docs/approvals.md): the request message with
//! Approve and Deny buttons (`custom_id` `moat-approve:<id>` /
//! `moat-deny:<id>`, the request's random id), its edit once decided, and
//! the clicks, which come as `INTERACTION_CREATE` on the Gateway moat
//! opened with the bot token (Discord authenticated the clicker; moat serves
//! no interactions endpoint).
//!
//! Must never: take the clicker from anywhere but the interaction's
//! `member.user.id` (or `user.id` in a DM), decide anything itself (the desk
//! does, `Gateway::decide_approval`), or show the agent's words unsafe
//! (they could mention everyone or hide a link).

use moat_chat::discord::format::to_discord;
use moat_chat::discord::{parse_click, RestApi};
use moat_policy::gateway::Platform;
use serde_json::json;

use crate::approvals::{ApprovalPost, Decision};
use crate::discord::DiscordOut;
use crate::pipeline::Gateway;
use crate::platform::decision_text;

/// `custom_id` prefixes of the two approval buttons: `moat-approve:<id>`.
const APPROVE: &str = "moat-approve:";
const DENY: &str = "moat-deny:";

/// An approval request's text: moat's summary and the agent's words,
/// quoted, both made safe.
fn request_text(req: &ApprovalPost) -> String {
    let mut t = format!(
        "**Approval needed.** {}\n(an admin clicks below, or answers `approve {}` or `deny {}`)",
        req.summary, req.id, req.id
    );
    if let Some(d) = &req.detail {
        for line in d.lines().take(40) {
            t.push_str("\n> ");
            t.push_str(line);
        }
    }
    t
}

/// Posts the request in `channel` with its two buttons; the message's id.
pub async fn post_request(api: &RestApi, channel: &str, req: &ApprovalPost) -> Option<String> {
    // ACTION_ROW of two buttons: SUCCESS (3) and DANGER (4).
    let buttons = json!([{"type": 1, "components": [
        {"type": 2, "style": 3, "label": "Approve", "custom_id": format!("{APPROVE}{}", req.id)},
        {"type": 2, "style": 4, "label": "Deny", "custom_id": format!("{DENY}{}", req.id)},
    ]}]);
    let r = api
        .send_with_components(channel, &to_discord(&request_text(req)), buttons)
        .await;
    DiscordOut::log("ask for approval", r)
}

/// The request edited with the decision, its buttons taken off (or the
/// decision posted, when the request could not be).
pub async fn post_decision(
    api: &RestApi,
    channel: &str,
    req: &ApprovalPost,
    asked: Option<&str>,
    d: &Decision,
) {
    let text = to_discord(&format!("{}\n**{}**", request_text(req), decision_text(d)));
    let r = match asked {
        Some(m) => api.edit_message(channel, m, &text).await,
        None => api.send_message(channel, &text, None).await.map(drop),
    };
    DiscordOut::log("show a decision", r);
}

/// A click on one of moat's approval buttons (docs/approvals.md): the
/// clicker is the one Discord authenticated on the Gateway; the desk
/// decides whether they may. Answered within Discord's 3 s: an update
/// (the request message is edited with the decision), or a note only
/// the clicker sees saying why not.
pub async fn click(api: &RestApi, gw: &Gateway, d: &serde_json::Value) {
    let Some(c) = parse_click(d) else {
        tracing::debug!("a Discord interaction that is not a button click; ignored");
        return;
    };
    let (id, approve) = if let Some(id) = c.custom_id.strip_prefix(APPROVE) {
        (id, true)
    } else if let Some(id) = c.custom_id.strip_prefix(DENY) {
        (id, false)
    } else {
        tracing::debug!("a click on a button that is not moat's; ignored");
        return;
    };
    let answer = match gw.decide_approval(id, Platform::Discord, &c.user_id, approve, "discord") {
        // DEFERRED_UPDATE_MESSAGE: the decision edits the message.
        Ok(_) => json!({"type": 6}),
        // CHANNEL_MESSAGE_WITH_SOURCE, EPHEMERAL: only the clicker sees it.
        Err(why) => json!({"type": 4, "data": {"content": why.message(), "flags": 64,
            "allowed_mentions": {"parse": []}}}),
    };
    DiscordOut::log(
        "answer a click",
        api.interaction_callback(&c.interaction_id, &c.token, answer)
            .await,
    );
}
