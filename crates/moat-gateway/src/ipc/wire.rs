//! The endpoint's wire: newline-delimited JSON-RPC 2.0 frames of at most
//! [`MAX_FRAME`] bytes, and the MCP methods moat answers (`initialize`,
//! `ping`, `tools/list`, `tools/call`).
//!
//! Owns: what a valid frame is, the answers' shapes, the tool list. Must
//! never: act on a frame that is not valid JSON-RPC, or read anything in a
//! request as an identity (the caller is the lease's, `mod.rs`).

use std::future::Future;

use serde_json::{json, Value};

/// The largest frame, newline excluded; a longer one is an error and the
/// connection is closed.
pub const MAX_FRAME: usize = 1024 * 1024;

/// The MCP protocol version moat speaks when the client names none.
const PROTOCOL: &str = "2025-06-18";

/// One request or notification.
#[derive(Debug)]
pub struct Frame {
    /// `None`: a notification (no answer).
    id: Option<Value>,
    method: String,
    params: Value,
}

/// A frame moat will not read; the connection ends after the answer.
#[derive(Debug, PartialEq, Eq)]
pub enum Bad {
    Oversized,
    Malformed(String),
}

impl Bad {
    pub fn reason(&self) -> &str {
        match self {
            Bad::Oversized => "oversized frame",
            Bad::Malformed(_) => "malformed frame",
        }
    }

    /// The error answer (id null: the request could not be read).
    pub fn answer(&self) -> Vec<u8> {
        let (code, message) = match self {
            Bad::Oversized => (
                -32600,
                format!("frame over {MAX_FRAME} bytes; the connection is closed"),
            ),
            Bad::Malformed(m) => (-32700, format!("{m}; the connection is closed")),
        };
        line(json!({"jsonrpc": "2.0", "id": null, "error": {"code": code, "message": message}}))
    }
}

fn line(v: Value) -> Vec<u8> {
    let mut b = v.to_string().into_bytes();
    b.push(b'\n');
    b
}

/// Reads one frame (`buf` as read, up to `MAX_FRAME + 1` bytes); `None`
/// for a blank line.
pub fn frame(buf: &[u8]) -> Result<Option<Frame>, Bad> {
    let body = buf.strip_suffix(b"\n").unwrap_or(buf);
    if body.len() > MAX_FRAME {
        return Err(Bad::Oversized);
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let v: Value =
        serde_json::from_slice(body).map_err(|e| Bad::Malformed(format!("not JSON: {e}")))?;
    let Value::Object(mut o) = v else {
        return Err(Bad::Malformed("a frame must be one JSON-RPC object".into()));
    };
    if o.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err(Bad::Malformed("\"jsonrpc\" must be \"2.0\"".into()));
    }
    let Some(Value::String(method)) = o.remove("method") else {
        return Err(Bad::Malformed("a request needs a \"method\" string".into()));
    };
    let id = o.remove("id").filter(|i| !i.is_null());
    if let Some(i) = &id {
        if !(i.is_string() || i.is_number()) {
            return Err(Bad::Malformed("\"id\" must be a string or a number".into()));
        }
    }
    Ok(Some(Frame {
        id,
        method,
        params: o.remove("params").unwrap_or(Value::Null),
    }))
}

fn result(id: &Value, r: Value) -> Vec<u8> {
    line(json!({"jsonrpc": "2.0", "id": id, "result": r}))
}

fn error(id: &Value, code: i64, message: &str) -> Vec<u8> {
    line(json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}}))
}

/// The answer when no turn holds the lease (the connection then ends).
pub fn no_turn(f: &Frame) -> Vec<u8> {
    error(
        f.id.as_ref().unwrap_or(&Value::Null),
        -32000,
        "no turn holds this sandbox now; moat's tools work only during a turn",
    )
}

/// The answer to a call over the lease's rate (`None` for a notification).
pub fn rate_limited(f: &Frame) -> Option<Vec<u8>> {
    f.id.as_ref().map(|id| {
        error(
            id,
            -32029,
            "too many calls from this sandbox; slow down (ipc.rate)",
        )
    })
}

/// The answer to `f`; `call(tool, arguments)` runs a tool. `None` for a
/// notification.
pub async fn answer<F, Fut>(f: &Frame, call: F) -> Option<Vec<u8>>
where
    F: FnOnce(String, Value) -> Fut,
    Fut: Future<Output = Result<String, String>>,
{
    let id = f.id.as_ref()?;
    Some(match f.method.as_str() {
        "initialize" => {
            let version = f
                .params
                .get("protocolVersion")
                .and_then(Value::as_str)
                .unwrap_or(PROTOCOL);
            result(
                id,
                json!({
                    "protocolVersion": version,
                    "capabilities": {"tools": {"listChanged": false}},
                    "serverInfo": {"name": "moat", "version": env!("CARGO_PKG_VERSION")},
                    "instructions": "moat's tools act for the conversation this sandbox serves; who you are is moat's to know, never a field you send.",
                }),
            )
        }
        "ping" => result(id, json!({})),
        "tools/list" => result(id, json!({"tools": tools()})),
        "tools/call" => {
            let Some(name) = f.params.get("name").and_then(Value::as_str) else {
                return Some(error(id, -32602, "tools/call needs params.name"));
            };
            let args = match f.params.get("arguments") {
                None | Some(Value::Null) => json!({}),
                Some(a @ Value::Object(_)) => a.clone(),
                Some(_) => return Some(error(id, -32602, "params.arguments must be an object")),
            };
            let (text, is_error) = match call(name.to_string(), args).await {
                Ok(t) => (t, false),
                Err(t) => (t, true),
            };
            result(
                id,
                json!({"content": [{"type": "text", "text": text}], "isError": is_error}),
            )
        }
        other => error(id, -32601, &format!("unknown method {other:?}")),
    })
}

fn tool(name: &str, description: &str, properties: Value, required: &[&str]) -> Value {
    json!({
        "name": name,
        "description": description,
        "inputSchema": {"type": "object", "properties": properties, "required": required},
    })
}

/// The tools moat offers (docs/ipc.md).
pub fn tools() -> Vec<Value> {
    let id =
        json!({"task_id": {"type": "integer", "description": "the task's number (list_tasks)"}});
    vec![
        tool(
            "send_message",
            "Post a message. Without `chat`: in this conversation. With `chat`: another chat of this gateway (admin channels only).",
            json!({"text": {"type": "string"}, "chat": {"type": "string", "description": "another chat's id (admin channels only)"}}),
            &["text"],
        ),
        tool(
            "schedule_task",
            "Schedule a prompt to run as a turn in this channel: `schedule_type` cron (5 fields, UTC), interval (e.g. \"1h\") or once (e.g. \"2026-12-24T08:00:00Z\").",
            json!({
                "prompt": {"type": "string"},
                "schedule_type": {"type": "string", "enum": ["cron", "interval", "once"]},
                "schedule_value": {"type": "string"},
                "context": {"type": "string", "enum": ["conversation", "isolated"], "description": "run in this conversation or in a fresh one each time (default isolated)"},
                "chat": {"type": "string", "description": "another channel (admin channels only)"},
            }),
            &["prompt", "schedule_type", "schedule_value"],
        ),
        tool("list_tasks", "List this channel's scheduled tasks (admin channels: all).", json!({}), &[]),
        tool("pause_task", "Pause a scheduled task.", id.clone(), &["task_id"]),
        tool("resume_task", "Resume a paused task.", id.clone(), &["task_id"]),
        tool("cancel_task", "Cancel a scheduled task.", id, &["task_id"]),
        tool(
            "register_group",
            "Register a chat as a group of this gateway (admin channels only).",
            json!({"chat": {"type": "string"}, "name": {"type": "string"}}),
            &["chat", "name"],
        ),
        tool(
            "request_approval",
            "Ask an admin of this channel to approve something before you do it; waits for the decision (approved, denied, or no answer in time, which is a denial).",
            json!({"question": {"type": "string", "description": "what you want to do and why, in a few lines"}}),
            &["question"],
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_checked() {
        assert!(frame(b"\n").unwrap().is_none());
        assert!(matches!(frame(b"{oops\n"), Err(Bad::Malformed(_))));
        assert!(matches!(frame(b"[1]\n"), Err(Bad::Malformed(_))));
        assert!(matches!(
            frame(br#"{"jsonrpc":"1.0","method":"x","id":1}"#),
            Err(Bad::Malformed(_))
        ));
        let big = vec![b' '; MAX_FRAME + 1];
        assert_eq!(frame(&big).unwrap_err(), Bad::Oversized);
        let f = frame(br#"{"jsonrpc":"2.0","method":"ping","id":7}"#)
            .unwrap()
            .unwrap();
        assert_eq!(f.method, "ping");
    }

    #[tokio::test]
    async fn mcp_methods() {
        let f = frame(br#"{"jsonrpc":"2.0","method":"tools/list","id":1}"#)
            .unwrap()
            .unwrap();
        let a = answer(&f, |_, _| async { Ok(String::new()) })
            .await
            .unwrap();
        let v: Value = serde_json::from_slice(&a).unwrap();
        assert_eq!(v["result"]["tools"].as_array().unwrap().len(), 8);
        let f = frame(br#"{"jsonrpc":"2.0","method":"tools/call","id":"a","params":{"name":"x"}}"#)
            .unwrap()
            .unwrap();
        let a = answer(&f, |n, _| async move { Err(format!("no {n}")) })
            .await
            .unwrap();
        let v: Value = serde_json::from_slice(&a).unwrap();
        assert_eq!(v["result"]["isError"], true);
        assert_eq!(v["result"]["content"][0]["text"], "no x");
        let f = frame(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#)
            .unwrap()
            .unwrap();
        assert!(answer(&f, |_, _| async { Ok(String::new()) })
            .await
            .is_none());
    }
}
