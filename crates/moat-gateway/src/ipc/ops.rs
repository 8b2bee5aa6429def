//! The operations behind the endpoint's tools (docs/ipc.md): each checked
//! against the caller the lease's turn bound, by moat-policy's rights table
//! (`trust::may_ipc`), and audited.
//!
//! Owns: reading a tool's arguments, `send_message` and `register_group`
//! (the task tools are `crate::tasks`'), the `ipc` audit records. Must
//! never: read an identity from the arguments, decide a right itself, or
//! audit a message's or prompt's text.

use std::sync::Arc;

use moat_policy::approvals::{ApprovalKeys, ApprovalKind, Outcome};
use moat_policy::gateway::Platform;
use moat_policy::trust::{self, IpcGate, IpcOp, IpcTarget};
use serde_json::{json, Value};

use super::Caller;
use crate::pipeline::{ConvRef, Gateway, Inner, CHANNEL_THREAD};

/// The longest message `send_message` posts.
const MAX_TEXT: usize = 8000;

/// Why an operation did not happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpError {
    /// The rights table said no (`reason` as audited).
    Refused {
        reason: &'static str,
        message: String,
    },
    /// The arguments or the state do not allow it.
    Invalid(String),
}

impl OpError {
    pub fn refused(r: trust::IpcRefusal, op: IpcOp) -> OpError {
        OpError::Refused {
            reason: r.name(),
            message: r.message(op),
        }
    }

    pub fn message(&self) -> &str {
        match self {
            OpError::Refused { message, .. } | OpError::Invalid(message) => message,
        }
    }
}

/// What a successful operation says, and the task it touched, if any.
pub type OpResult = Result<(String, Option<i64>), OpError>;

/// A string argument, trimmed; `None` when absent or blank.
pub fn arg_str<'a>(args: &'a Value, key: &str) -> Option<&'a str> {
    args.get(key)
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// Runs tool `tool` for `caller` and audits it.
pub(crate) async fn call(
    inner: Arc<Inner>,
    caller: Caller,
    lease: String,
    tool: String,
    args: Value,
) -> Result<String, String> {
    let gw = Gateway { inner };
    let op = match tool.as_str() {
        "send_message" => IpcOp::SendMessage,
        "schedule_task" => IpcOp::ScheduleTask,
        "list_tasks" => IpcOp::ListTasks,
        "pause_task" => IpcOp::PauseTask,
        "resume_task" => IpcOp::ResumeTask,
        "cancel_task" => IpcOp::CancelTask,
        "register_group" => IpcOp::RegisterGroup,
        "request_approval" => IpcOp::RequestApproval,
        other => {
            return Err(format!(
                "unknown tool {:?}; tools/list names moat's tools",
                other.chars().take(80).collect::<String>()
            ))
        }
    };
    let r = match op {
        IpcOp::SendMessage => send_message(&gw, &caller, &args).await,
        IpcOp::RegisterGroup => register_group(&gw, &caller, &args),
        IpcOp::RequestApproval => request_approval(&gw, &caller, &args).await,
        IpcOp::ScheduleTask => crate::tasks::schedule(&gw, &caller, &args).await,
        IpcOp::ListTasks => crate::tasks::list(&gw, &caller),
        IpcOp::PauseTask | IpcOp::ResumeTask | IpcOp::CancelTask => {
            match args.get("task_id").and_then(|v| {
                v.as_i64()
                    .or_else(|| v.as_str()?.trim_start_matches('#').parse().ok())
            }) {
                Some(id) => crate::tasks::change(&gw, &caller, op, id),
                None => Err(OpError::Invalid(format!(
                    "{} needs task_id, a number from list_tasks",
                    op.name()
                ))),
            }
        }
    };
    audit(&gw, &caller, "ipc", &lease, op.name(), &r);
    r.map(|(t, _)| t).map_err(|e| e.message().to_string())
}

/// The audit record of one operation (also the chat commands', `source`).
pub(crate) fn audit(gw: &Gateway, c: &Caller, source: &str, lease: &str, op: &str, r: &OpResult) {
    let (verdict, reason, task) = match r {
        Ok((_, t)) => ("ok", None, *t),
        Err(OpError::Refused { reason, .. }) => ("refused", Some(*reason), None),
        Err(OpError::Invalid(_)) => ("invalid", None, None),
    };
    let mut rec = json!({
        "source": source,
        "op": op,
        "verdict": verdict,
        "conversation_id": c.conversation_id,
        "platform": c.platform.name(),
        "channel": c.channel,
        "user": c.user,
        "trust": c.trust.name(),
        "lease": lease,
    });
    if let Some(reason) = reason {
        rec["reason"] = json!(reason);
    }
    if let Some(t) = task {
        rec["task_id"] = json!(t);
    }
    if let Err(e) = gw.inner.audit.append("ipc", rec) {
        tracing::error!(error = %e, "could not write an audit record");
    }
}

pub(crate) fn audit_limited(inner: &Arc<Inner>, c: &Caller, lease: &str) {
    let rec = json!({"source": "ipc", "verdict": "rate_limited", "conversation_id": c.conversation_id, "user": c.user, "lease": lease});
    let _ = inner.audit.append("ipc", rec);
}

pub(crate) fn audit_bad_frame(inner: &Arc<Inner>, c: Option<&Caller>, lease: &str, reason: &str) {
    let rec = json!({"source": "ipc", "verdict": "bad_frame", "reason": reason, "conversation_id": c.map(|c| c.conversation_id), "lease": lease});
    let _ = inner.audit.append("ipc", rec);
}

/// The approval keys of the caller's channel.
pub(crate) fn approvals_of<'g>(gw: &'g Gateway, c: &Caller) -> &'g ApprovalKeys {
    static NONE: std::sync::OnceLock<ApprovalKeys> = std::sync::OnceLock::new();
    gw.inner
        .cfg
        .channels
        .get(c.chan_idx)
        .map(|ch| &ch.approvals)
        .unwrap_or_else(|| NONE.get_or_init(ApprovalKeys::default))
}

/// Holds the call until an admin of the caller's channel approves it
/// (`approve = [...]`): `Ok` then, a refusal saying why when it was denied
/// or nobody decided within `approve_timeout`. `what` names the action in
/// the refusal.
pub(crate) async fn held(
    gw: &Gateway,
    c: &Caller,
    kind: ApprovalKind,
    summary: String,
    detail: Option<String>,
    what: &str,
) -> Result<(), OpError> {
    // Incident mode: nothing held is asked for, nothing approved runs.
    let paused = || OpError::Refused {
        reason: "paused",
        message: format!(
            "{what}: moat is paused by its operator (incident mode); it did not happen"
        ),
    };
    if gw.paused() {
        return Err(paused());
    }
    let conv = ConvRef {
        id: c.conversation_id,
        platform: c.platform,
        channel: c.channel.clone(),
        thread: c.thread.clone(),
    };
    let d = gw
        .ask_approval(
            &conv,
            c.chan_idx,
            &c.user,
            crate::approvals::Subject::Action(kind),
            summary,
            detail,
        )
        .await;
    match d.outcome {
        Outcome::Approved if gw.paused() => Err(paused()),
        Outcome::Approved => Ok(()),
        Outcome::Denied => Err(OpError::Refused {
            reason: "approval_denied",
            message: format!(
                "{what}: an admin of this channel denied it (approve = [\"{}\"]); it did not happen",
                kind.name()
            ),
        }),
        Outcome::TimedOut => Err(OpError::Refused {
            reason: "approval_timed_out",
            message: format!(
                "{what}: no admin of this channel approved it within approve_timeout, so it is denied; it did not happen"
            ),
        }),
    }
}

/// The longest question `request_approval` takes.
const MAX_QUESTION: usize = 2000;

/// `request_approval`: the agent asks the admins of its own channel (never
/// another's) and waits for their decision; approved is a result naming who
/// approved, denied or timed out a refusal saying so.
async fn request_approval(gw: &Gateway, c: &Caller, args: &Value) -> OpResult {
    let op = IpcOp::RequestApproval;
    trust::may_ipc(c.trust, op, IpcTarget::Own).map_err(|r| OpError::refused(r, op))?;
    let Some(question) = arg_str(args, "question")
        .map(str::trim)
        .filter(|q| !q.is_empty())
    else {
        return Err(OpError::Invalid(
            "request_approval needs question: what you want to do and why".into(),
        ));
    };
    if question.chars().count() > MAX_QUESTION {
        return Err(OpError::Invalid(format!(
            "request_approval: the question is over {MAX_QUESTION} characters; say it shorter"
        )));
    }
    if gw.paused() {
        return Err(OpError::Refused {
            reason: "paused",
            message:
                "request_approval: moat is paused by its operator (incident mode); nobody was asked"
                    .into(),
        });
    }
    let conv = ConvRef {
        id: c.conversation_id,
        platform: c.platform,
        channel: c.channel.clone(),
        thread: c.thread.clone(),
    };
    let d = gw
        .ask_approval(
            &conv,
            c.chan_idx,
            &c.user,
            crate::approvals::Subject::Asked,
            format!(
                "The agent working for {} in this conversation asks an admin to approve:",
                c.user
            ),
            Some(question.to_string()),
        )
        .await;
    match d.outcome {
        Outcome::Approved => Ok((
            format!(
                "approved by {}",
                d.by.as_deref().unwrap_or("an admin of this channel")
            ),
            None,
        )),
        Outcome::Denied => Err(OpError::Refused {
            reason: "approval_denied",
            message: format!(
                "denied by {}: do not do it",
                d.by.as_deref().unwrap_or("an admin of this channel")
            ),
        }),
        Outcome::TimedOut => Err(OpError::Refused {
            reason: "approval_timed_out",
            message: "no admin of this channel answered within approve_timeout: treat it as denied"
                .into(),
        }),
    }
}

/// Is `chat` of `platform` one this gateway lists: a `[[channel]]` entry of
/// its own (not a `"*"` entry) or a registered group?
pub(crate) fn listed(gw: &Gateway, platform: Platform, chat: &str) -> bool {
    gw.inner
        .cfg
        .channels
        .iter()
        .any(|c| c.platform == platform && !c.is_wildcard() && c.id == chat)
        || matches!(
            gw.inner.store.registered_group(platform.name(), chat),
            Ok(Some(_))
        )
}

async fn send_message(gw: &Gateway, c: &Caller, args: &Value) -> OpResult {
    let op = IpcOp::SendMessage;
    let Some(text) = args
        .get("text")
        .and_then(Value::as_str)
        .filter(|t| !t.trim().is_empty())
    else {
        return Err(OpError::Invalid(
            "send_message needs a non-empty text".into(),
        ));
    };
    if text.chars().count() > MAX_TEXT {
        return Err(OpError::Invalid(format!(
            "the text is over {MAX_TEXT} characters; shorten it or send it in parts"
        )));
    }
    let chat = arg_str(args, "chat").filter(|ch| *ch != c.channel);
    let target = match chat {
        None => IpcTarget::Own,
        Some(ch) => IpcTarget::Other {
            listed: listed(gw, c.platform, ch),
        },
    };
    let gate = trust::ipc_gate(c.trust, op, target, approvals_of(gw, c))
        .map_err(|r| OpError::refused(r, op))?;
    if let IpcGate::Approval(kind) = gate {
        let to = chat
            .unwrap_or_default()
            .chars()
            .take(200)
            .collect::<String>();
        held(
            gw,
            c,
            kind,
            format!(
                "The agent of user {}'s turn wants to send this message to {to}:",
                c.user
            ),
            Some(text.to_string()),
            &format!("send_message to {to}"),
        )
        .await?;
    }
    let conv = match chat {
        None => ConvRef {
            id: c.conversation_id,
            platform: c.platform,
            channel: c.channel.clone(),
            thread: c.thread.clone(),
        },
        Some(ch) => {
            let id = gw
                .inner
                .store
                .conversation_by_key(c.platform.name(), ch, CHANNEL_THREAD)
                .ok()
                .flatten()
                .map(|conv| conv.id)
                .unwrap_or(0);
            ConvRef {
                id,
                platform: c.platform,
                channel: ch.to_string(),
                thread: CHANNEL_THREAD.to_string(),
            }
        }
    };
    gw.platform(conv.platform).notice(&conv, text).await;
    Ok((
        match chat {
            None => "sent to this conversation".to_string(),
            Some(ch) => format!("sent to {ch}"),
        },
        None,
    ))
}

fn register_group(gw: &Gateway, c: &Caller, args: &Value) -> OpResult {
    let op = IpcOp::RegisterGroup;
    trust::may_ipc(c.trust, op, IpcTarget::Own).map_err(|r| OpError::refused(r, op))?;
    let (Some(chat), Some(name)) = (arg_str(args, "chat"), arg_str(args, "name")) else {
        return Err(OpError::Invalid(
            "register_group needs chat and name".into(),
        ));
    };
    if chat.len() > 200 || name.chars().count() > 100 || chat.chars().any(char::is_control) {
        return Err(OpError::Invalid(
            "chat is at most 200 bytes and name at most 100 characters, without control characters"
                .into(),
        ));
    }
    let g = moat_store::RegisteredGroup {
        platform: c.platform.name().to_string(),
        channel: chat.to_string(),
        name: name.to_string(),
        registered_by: c.user.clone(),
        created_ms: crate::tasks::now_ms(),
    };
    match gw.inner.store.register_group(&g) {
        Ok(true) => Ok((format!("registered {chat} as {name}"), None)),
        Ok(false) => Ok((
            format!("{chat} was registered already; its name is now {name}"),
            None,
        )),
        Err(e) => Err(OpError::Invalid(format!(
            "moat could not store the group: {e}"
        ))),
    }
}
