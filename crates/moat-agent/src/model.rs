//! The two model APIs the built-in agent speaks, non-streaming: the
//! Anthropic Messages API (`POST {base}/v1/messages`) and the OpenAI
//! Responses API (`POST {base}/responses`), and the conversation each keeps
//! (saved between turns for `resume`).
//!
//! Must never: send the key anywhere but the base URL it came with (the
//! door), or put a request body or a header into an error.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::http::{self, Url};
use crate::protocol::Provider;
use crate::tools::{shorten, ToolDef};

/// Where one provider's calls go and the key they carry (inside a sandbox:
/// the door's URL and placeholder).
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub base: Url,
    pub key: String,
}

/// Why a model call failed.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("the model API could not be reached: {0}")]
    Http(#[from] http::HttpError),
    #[error("the model API answered HTTP {status}: {message}")]
    Status {
        status: u16,
        message: String,
        /// The error's type in the provider's body (`overloaded_error`,
        /// `rate_limit_error`, …), if it has one.
        kind: Option<String>,
        /// The `retry-after` header as sent, if any.
        retry_after: Option<String>,
    },
    #[error("the model API's answer could not be read: {0}")]
    Parse(String),
    #[error("the model API says the response failed: {0}")]
    Failed(String),
}

/// A tool call the model asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct CallRequest {
    pub id: String,
    pub name: String,
    pub input: Value,
    /// The arguments could not be read (OpenAI sends them as a JSON string).
    pub bad_input: Option<String>,
}

/// One answer of the model.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub text: String,
    pub calls: Vec<CallRequest>,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// One tool call's result, as it goes back to the model.
#[derive(Debug, Clone)]
pub struct CallResult {
    pub id: String,
    pub ok: bool,
    pub text: String,
}

/// The conversation in the provider's own shape: Anthropic `messages`, or
/// OpenAI `input` items.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conversation {
    pub provider: Provider,
    pub items: Vec<Value>,
}

impl Conversation {
    pub fn new(provider: Provider) -> Conversation {
        Conversation {
            provider,
            items: Vec::new(),
        }
    }

    /// Adds a user message. Anthropic: joined to a last user message (one
    /// that ends with tool results) instead of a second user message in a row.
    pub fn push_user(&mut self, text: &str) {
        match self.provider {
            Provider::Anthropic => {
                let block = json!({"type": "text", "text": text});
                if let Some(last) = self.items.last_mut() {
                    if last["role"] == "user" {
                        if let Some(s) = last["content"].as_str().map(str::to_string) {
                            last["content"] = json!([{"type": "text", "text": s}]);
                        }
                        if let Some(blocks) = last["content"].as_array_mut() {
                            blocks.push(block);
                            return;
                        }
                    }
                }
                self.items.push(json!({"role": "user", "content": [block]}));
            }
            Provider::Openai => self.items.push(json!({
                "type": "message", "role": "user",
                "content": [{"type": "input_text", "text": text}]
            })),
        }
    }

    /// The request body of the next call.
    pub fn request(&self, model: &str, system: &str, max_tokens: u32, tools: &[ToolDef]) -> Value {
        match self.provider {
            Provider::Anthropic => {
                let mut body = json!({
                    "model": model,
                    "max_tokens": max_tokens,
                    "system": system,
                    "messages": self.items,
                });
                if !tools.is_empty() {
                    body["tools"] = tools
                        .iter()
                        .map(|t| json!({"name": t.name, "description": t.description, "input_schema": t.schema}))
                        .collect();
                }
                body
            }
            Provider::Openai => {
                let mut body = json!({
                    "model": model,
                    "instructions": system,
                    "input": self.items,
                    "max_output_tokens": max_tokens,
                });
                if !tools.is_empty() {
                    body["tools"] = tools
                        .iter()
                        .map(|t| json!({"type": "function", "name": t.name, "description": t.description, "parameters": t.schema}))
                        .collect();
                }
                body
            }
        }
    }

    /// Reads a (successful) response body and adds the model's turn to the
    /// conversation.
    pub fn take_reply(&mut self, body: &Value) -> Result<Reply, ModelError> {
        match self.provider {
            Provider::Anthropic => {
                let content = body["content"]
                    .as_array()
                    .ok_or_else(|| ModelError::Parse("no `content` array".into()))?;
                let mut reply = Reply {
                    text: String::new(),
                    calls: Vec::new(),
                    input_tokens: body["usage"]["input_tokens"].as_u64().unwrap_or(0),
                    output_tokens: body["usage"]["output_tokens"].as_u64().unwrap_or(0),
                };
                for b in content {
                    match b["type"].as_str() {
                        Some("text") => reply.text.push_str(b["text"].as_str().unwrap_or("")),
                        Some("tool_use") => reply.calls.push(CallRequest {
                            id: b["id"].as_str().unwrap_or("").to_string(),
                            name: b["name"].as_str().unwrap_or("").to_string(),
                            input: b["input"].clone(),
                            bad_input: None,
                        }),
                        _ => {}
                    }
                }
                if reply.calls.iter().any(|c| c.id.is_empty()) {
                    return Err(ModelError::Parse("a tool_use block without an id".into()));
                }
                if !content.is_empty() {
                    self.items
                        .push(json!({"role": "assistant", "content": content}));
                }
                Ok(reply)
            }
            Provider::Openai => {
                if let Some(e) = body.get("error").filter(|e| !e.is_null()) {
                    return Err(ModelError::Failed(error_message(e)));
                }
                if body["status"] == "failed" {
                    return Err(ModelError::Failed("status failed".into()));
                }
                let output = body["output"]
                    .as_array()
                    .ok_or_else(|| ModelError::Parse("no `output` array".into()))?;
                let mut reply = Reply {
                    text: String::new(),
                    calls: Vec::new(),
                    input_tokens: body["usage"]["input_tokens"].as_u64().unwrap_or(0),
                    output_tokens: body["usage"]["output_tokens"].as_u64().unwrap_or(0),
                };
                for item in output {
                    match item["type"].as_str() {
                        Some("message") => {
                            for c in item["content"].as_array().into_iter().flatten() {
                                match c["type"].as_str() {
                                    Some("output_text") => {
                                        reply.text.push_str(c["text"].as_str().unwrap_or(""))
                                    }
                                    Some("refusal") => {
                                        reply.text.push_str(c["refusal"].as_str().unwrap_or(""))
                                    }
                                    _ => {}
                                }
                            }
                        }
                        Some("function_call") => {
                            let raw = item["arguments"].as_str().unwrap_or("{}");
                            let (input, bad_input) = match serde_json::from_str::<Value>(raw) {
                                Ok(v) => (v, None),
                                Err(e) => (Value::Null, Some(e.to_string())),
                            };
                            let id = item["call_id"].as_str().unwrap_or("").to_string();
                            if id.is_empty() {
                                return Err(ModelError::Parse(
                                    "a function_call without a call_id".into(),
                                ));
                            }
                            reply.calls.push(CallRequest {
                                id,
                                name: item["name"].as_str().unwrap_or("").to_string(),
                                input,
                                bad_input,
                            });
                        }
                        _ => {}
                    }
                }
                self.items.extend(output.iter().cloned());
                Ok(reply)
            }
        }
    }

    /// Adds the results of the calls of the last reply.
    pub fn push_results(&mut self, results: &[CallResult]) {
        match self.provider {
            Provider::Anthropic => {
                let blocks: Vec<Value> = results
                    .iter()
                    .map(|r| {
                        json!({"type": "tool_result", "tool_use_id": r.id,
                               "content": r.text, "is_error": !r.ok})
                    })
                    .collect();
                self.items.push(json!({"role": "user", "content": blocks}));
            }
            Provider::Openai => {
                for r in results {
                    let output = if r.ok {
                        r.text.clone()
                    } else {
                        format!("Error: {}", r.text)
                    };
                    self.items.push(json!({"type": "function_call_output",
                        "call_id": r.id, "output": output}));
                }
            }
        }
    }

    /// Whether every tool call of the conversation has its result (a saved
    /// conversation that does not cannot be continued).
    pub fn is_complete(&self) -> bool {
        let mut open: Vec<String> = Vec::new();
        for item in &self.items {
            match self.provider {
                Provider::Anthropic => {
                    for b in item["content"].as_array().into_iter().flatten() {
                        match b["type"].as_str() {
                            Some("tool_use") => open.push(b["id"].as_str().unwrap_or("").into()),
                            Some("tool_result") => {
                                let id = b["tool_use_id"].as_str().unwrap_or("");
                                open.retain(|o| o != id);
                            }
                            _ => {}
                        }
                    }
                }
                Provider::Openai => match item["type"].as_str() {
                    Some("function_call") => {
                        open.push(item["call_id"].as_str().unwrap_or("").into())
                    }
                    Some("function_call_output") => {
                        let id = item["call_id"].as_str().unwrap_or("");
                        open.retain(|o| o != id);
                    }
                    _ => {}
                },
            }
        }
        open.is_empty()
    }
}

fn error_message(e: &Value) -> String {
    let m = e["message"]
        .as_str()
        .or_else(|| e["error"]["message"].as_str())
        .or_else(|| e.as_str())
        .map(str::to_string)
        .unwrap_or_else(|| e.to_string());
    shorten(&m, 300)
}

/// One call: `body` to the provider's endpoint; the response's JSON.
pub fn call(
    provider: Provider,
    endpoint: &Endpoint,
    body: &Value,
    timeout: Duration,
) -> Result<Value, ModelError> {
    let bytes = serde_json::to_vec(body).map_err(|e| ModelError::Parse(e.to_string()))?;
    let bearer;
    let (suffix, headers): (&str, Vec<(&str, &str)>) = match provider {
        Provider::Anthropic => (
            "/v1/messages",
            vec![
                ("x-api-key", endpoint.key.as_str()),
                ("anthropic-version", "2023-06-01"),
            ],
        ),
        Provider::Openai => {
            bearer = format!("Bearer {}", endpoint.key);
            ("/responses", vec![("authorization", bearer.as_str())])
        }
    };
    let resp = http::post_json(&endpoint.base, suffix, &headers, &bytes, timeout)?;
    let doc: Option<Value> = serde_json::from_slice(&resp.body).ok();
    if resp.status != 200 {
        let message = match &doc {
            Some(d) if d.get("error").is_some() => error_message(&d["error"]),
            Some(d) if d.get("message").is_some() => error_message(d),
            _ => shorten(String::from_utf8_lossy(&resp.body).trim(), 200),
        };
        let kind = doc
            .as_ref()
            .and_then(|d| d["error"]["type"].as_str().or_else(|| d["type"].as_str()))
            .filter(|k| *k != "error")
            .map(|k| shorten(k, 100));
        return Err(ModelError::Status {
            status: resp.status,
            message,
            kind,
            retry_after: resp.retry_after,
        });
    }
    doc.ok_or_else(|| ModelError::Parse("the body is not JSON".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anthropic_turns_and_results() {
        let mut c = Conversation::new(Provider::Anthropic);
        c.push_user("hi");
        let r = c
            .take_reply(&json!({"content": [
                {"type": "text", "text": "Looking."},
                {"type": "tool_use", "id": "tu1", "name": "list_files", "input": {}}
            ], "stop_reason": "tool_use", "usage": {"input_tokens": 5, "output_tokens": 7}}))
            .unwrap();
        assert_eq!(r.text, "Looking.");
        assert_eq!(r.calls[0].name, "list_files");
        assert_eq!((r.input_tokens, r.output_tokens), (5, 7));
        assert!(!c.is_complete());
        c.push_results(&[CallResult {
            id: "tu1".into(),
            ok: false,
            text: "no".into(),
        }]);
        assert!(c.is_complete());
        // A new prompt joins the tool-result message: no two user messages in a row.
        c.push_user("next");
        assert_eq!(c.items.len(), 3);
        assert_eq!(c.items[2]["content"][0]["is_error"], true);
        assert_eq!(c.items[2]["content"][1]["text"], "next");
        let tools = vec![crate::tools::definition("bash").unwrap()];
        let body = c.request("m", "sys", 100, &tools);
        assert_eq!(body["tools"][0]["input_schema"]["type"], "object");
        assert_eq!(body["system"], "sys");
        assert!(c.take_reply(&json!({"nope": 1})).is_err());
    }

    #[test]
    fn openai_items_and_outputs() {
        let mut c = Conversation::new(Provider::Openai);
        c.push_user("hi");
        let r = c
            .take_reply(&json!({"status": "completed", "output": [
                {"type": "reasoning", "id": "rs_1", "summary": []},
                {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "bash", "arguments": "{\"command\":\"ls\"}"},
                {"type": "function_call", "id": "fc_2", "call_id": "call_2", "name": "bash", "arguments": "{bad"}
            ], "usage": {"input_tokens": 3, "output_tokens": 4}}))
            .unwrap();
        assert_eq!(r.calls[0].input["command"], "ls");
        assert!(r.calls[1].bad_input.is_some());
        assert_eq!(c.items.len(), 4);
        c.push_results(&[
            CallResult {
                id: "call_1".into(),
                ok: true,
                text: "a".into(),
            },
            CallResult {
                id: "call_2".into(),
                ok: false,
                text: "b".into(),
            },
        ]);
        assert!(c.is_complete());
        assert_eq!(c.items[5]["output"], "Error: b");
        let tools = vec![crate::tools::definition("bash").unwrap()];
        let body = c.request("m", "sys", 100, &tools);
        assert_eq!(body["tools"][0]["type"], "function");
        assert_eq!(body["instructions"], "sys");
        assert!(c
            .take_reply(&json!({"status": "failed", "error": {"message": "boom"}}))
            .is_err());
    }
}
