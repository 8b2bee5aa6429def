//! The JSON-lines protocol between the gateway (host) and an agent running
//! inside a sandbox. The host writes one [`TurnSpec`] (JSON) to the agent's
//! standard input; the agent writes [`Event`]s, one JSON object a line, to
//! its standard output and ends with exactly one `final` or `error` event.
//!
//! Everything here is data; nothing in it may be a secret (the spec travels
//! into the sandbox, the events into logs, chat and the audit log).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The built-in tools and the thread-search tools that are never enabled:
/// one list, the policy's, for the configuration check, the gateway and the
/// agent alike.
pub use moat_policy::agents::{is_forbidden_tool, BUILTIN_TOOLS, FORBIDDEN_TOOLS};

/// Which API the built-in agent speaks (through the door).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// The Anthropic Messages API (`POST {ANTHROPIC_BASE_URL}/v1/messages`).
    Anthropic,
    /// The OpenAI Responses API (`POST {OPENAI_BASE_URL}/responses`).
    Openai,
}

impl Provider {
    pub fn name(self) -> &'static str {
        match self {
            Provider::Anthropic => "anthropic",
            Provider::Openai => "openai",
        }
    }
}

/// An MCP server the agent may use: a command started inside the sandbox
/// that speaks MCP over its standard input and output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct McpServer {
    /// The name the configuration gives it; its tools are `mcp__<name>__<tool>`.
    pub name: String,
    /// Program and arguments, as seen inside the sandbox.
    pub command: Vec<String>,
    /// Extra environment for the server (no secrets: it runs in the sandbox).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// One turn, as the host hands it to the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TurnSpec {
    pub provider: Provider,
    pub model: String,
    /// The operator's persona / system prompt.
    #[serde(default)]
    pub system: Option<String>,
    /// The new message(s) of this turn.
    pub prompt: String,
    /// The thread's messages since the last turn, oldest first (`user: text`).
    #[serde(default)]
    pub history: Vec<String>,
    /// The built-in tools the model may call ([`BUILTIN_TOOLS`] names).
    pub tools: Vec<String>,
    /// The MCP servers the model may call.
    #[serde(default)]
    pub mcp: Vec<McpServer>,
    /// Model calls allowed in this turn (each answer with tool calls is one step).
    pub max_steps: u32,
    /// `max_tokens` / `max_output_tokens` of each model call.
    pub max_tokens: u32,
    /// Continue the conversation saved by the previous turn in this sandbox.
    #[serde(default)]
    pub resume: bool,
    /// Time limit of one tool call, in seconds.
    pub tool_timeout_secs: u64,
}

/// What the agent reports, one per line on its standard output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// Text of the answer as the model produces it.
    Text { text: String },
    /// The model asked for a tool.
    ToolCall {
        id: String,
        name: String,
        input: serde_json::Value,
    },
    /// A tool ran (`ok = false`: it failed; `output` is what the model saw, shortened).
    ToolResult {
        id: String,
        name: String,
        ok: bool,
        output: String,
    },
    /// A tool call was refused before anything ran.
    Refused {
        id: String,
        name: String,
        reason: String,
    },
    /// What the agent is doing, for the status line (e.g. waiting to retry
    /// a model call that failed).
    Status { text: String },
    /// Tokens of one model call.
    Usage {
        input_tokens: u64,
        output_tokens: u64,
    },
    /// The turn is over; `text` is the whole answer.
    Final { text: String, steps: u32 },
    /// The turn failed; `message` says why (no secret, no request body).
    Error { message: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_tagged_json_lines() {
        let e = Event::ToolCall {
            id: "t1".into(),
            name: "bash".into(),
            input: serde_json::json!({"command": "ls"}),
        };
        let line = serde_json::to_string(&e).unwrap();
        assert_eq!(
            line,
            r#"{"type":"tool_call","id":"t1","name":"bash","input":{"command":"ls"}}"#
        );
        assert_eq!(serde_json::from_str::<Event>(&line).unwrap(), e);
        assert!(serde_json::from_str::<Event>(r#"{"type":"nope"}"#).is_err());
    }

    #[test]
    fn thread_search_tools_are_forbidden_in_any_spelling() {
        for n in ["find_thread", "READ_THREAD", "search-threads"] {
            assert!(is_forbidden_tool(n), "{n}");
        }
        for n in BUILTIN_TOOLS {
            assert!(!is_forbidden_tool(n), "{n}");
        }
    }
}
