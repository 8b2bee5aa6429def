//! What the fake LLM upstreams of the tests share (tests/llmkit for the
//! built-in agent, tests/clikit for the agent CLIs): the recorded request,
//! reading one HTTP/1.1 request, which step of a turn a request asks for, the
//! made-up real keys. Included by both with `mod wire` / `#[path]`.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::TcpStream;

use serde_json::Value;

/// One request the fake received.
#[derive(Debug, Clone)]
pub struct Req {
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Value,
    /// The whole request as text (request line, headers, body).
    pub raw: String,
    pub status: u16,
}

impl Req {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Which step of the current turn `body` asks for: the number of model
/// answers after the last message of the user (Anthropic: a user message
/// that is not only tool results; OpenAI: a user message item).
pub fn step_of(body: &Value) -> usize {
    if let Some(messages) = body["messages"].as_array() {
        let plain_user = |m: &Value| {
            m["role"] == "user"
                && !m["content"]
                    .as_array()
                    .is_some_and(|c| c.iter().any(|b| b["type"] == "tool_result"))
        };
        let start = messages.iter().rposition(plain_user).map_or(0, |i| i + 1);
        return messages[start..]
            .iter()
            .filter(|m| m["role"] == "assistant")
            .count();
    }
    if let Some(items) = body["input"].as_array() {
        let start = items
            .iter()
            .rposition(|i| i["type"] == "message" && i["role"] == "user")
            .map_or(0, |i| i + 1);
        let output = |i: &Value| {
            matches!(
                i["type"].as_str(),
                Some("function_call" | "reasoning" | "custom_tool_call")
            ) || (i["type"] == "message" && i["role"] == "assistant")
        };
        let mut runs = 0;
        let mut prev = false;
        for i in &items[start..] {
            let o = output(i);
            if o && !prev {
                runs += 1;
            }
            prev = o;
        }
        return runs;
    }
    0
}

pub(crate) fn read_request(r: &mut BufReader<TcpStream>) -> Option<Req> {
    let mut first = String::new();
    if r.read_line(&mut first).ok()? == 0 {
        return None;
    }
    let mut parts = first.trim_end().split(' ');
    let _method = parts.next()?;
    let target = parts.next()?.to_string();
    let mut raw = first.clone();
    let mut headers = Vec::new();
    loop {
        let mut l = String::new();
        if r.read_line(&mut l).ok()? == 0 {
            return None;
        }
        raw.push_str(&l);
        let t = l.trim_end();
        if t.is_empty() {
            break;
        }
        let (k, v) = t.split_once(':')?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).ok()?;
    let text = String::from_utf8_lossy(&body).into_owned();
    raw.push_str(&text);
    Some(Req {
        path: target.split('?').next().unwrap_or("").to_string(),
        headers,
        body: serde_json::from_str(&text).unwrap_or(Value::Null),
        raw,
        status: 0,
    })
}

/// Real keys, known only to the host (the door) and the fake upstream.
pub struct Keys {
    pub anthropic: String,
    pub openai: String,
}

impl Keys {
    pub fn new() -> Keys {
        Keys {
            anthropic: format!("sk-ant-api03-{}", hex(24)),
            openai: format!("sk-proj-{}", hex(24)),
        }
    }
}

pub fn hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut buf)
        .unwrap();
    buf.iter().map(|b| format!("{b:02x}")).collect()
}
