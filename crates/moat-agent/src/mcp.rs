//! A minimal MCP client over stdio (JSON-RPC 2.0, one message a line):
//! `initialize`, `notifications/initialized`, `tools/list`, `tools/call`.
//! Each server the turn allows is started inside the sandbox, in the
//! workspace, and stopped (its process group killed) when the turn ends.
//!
//! Must never: start a server the turn's spec does not name, or offer a
//! tool under a name that does not carry its server's name
//! (`mcp__<server>__<tool>`), so the allowlist check can tell where a call goes.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::protocol::{is_forbidden_tool, McpServer};
use crate::tools::{cap_output, ToolDef, ToolOutput};

/// Why a server could not be used.
#[derive(Debug, thiserror::Error)]
pub enum McpError {
    #[error("MCP server {server}: {what}")]
    Server { server: String, what: String },
}

/// The tool name the model sees for `tool` of `server`.
pub fn tool_name(server: &str, tool: &str) -> String {
    format!("mcp__{server}__{tool}")
}

/// Splits `mcp__<server>__<tool>` (the server name has no `__`).
pub fn split_tool_name(name: &str) -> Option<(&str, &str)> {
    let rest = name.strip_prefix("mcp__")?;
    let (server, tool) = rest.split_once("__")?;
    (!server.is_empty() && !tool.is_empty()).then_some((server, tool))
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// A running MCP server.
pub struct McpClient {
    pub name: String,
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    next_id: u64,
    timeout: Duration,
    /// Its tools, as the model sees them (names already prefixed).
    pub tools: Vec<ToolDef>,
}

impl McpClient {
    /// Starts `server` in `cwd`, initializes it and lists its tools.
    pub fn start(server: &McpServer, cwd: &Path, timeout: Duration) -> Result<McpClient, McpError> {
        let err = |what: String| McpError::Server {
            server: server.name.clone(),
            what,
        };
        if !valid_name(&server.name) || server.name.contains("__") {
            return Err(err(
                "the name must be 1-64 letters, digits, - or _ (no __)".into()
            ));
        }
        let Some((prog, args)) = server.command.split_first() else {
            return Err(err("no command given".into()));
        };
        let mut child = Command::new(prog)
            .args(args)
            .envs(&server.env)
            .current_dir(cwd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .spawn()
            .map_err(|e| err(format!("cannot start {prog:?}: {e}")))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            return Err(err("no pipes".into()));
        };
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut c = McpClient {
            name: server.name.clone(),
            child,
            stdin,
            lines,
            next_id: 1,
            timeout,
            tools: Vec::new(),
        };
        c.request(
            "initialize",
            json!({"protocolVersion": "2025-06-18", "capabilities": {},
                   "clientInfo": {"name": "moat-agent", "version": env!("CARGO_PKG_VERSION")}}),
        )?;
        c.send(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))?;
        let mut cursor: Option<String> = None;
        for _ in 0..20 {
            let params = match &cursor {
                Some(c) => json!({"cursor": c}),
                None => json!({}),
            };
            let r = c.request("tools/list", params)?;
            for t in r["tools"].as_array().into_iter().flatten() {
                let tname = t["name"].as_str().unwrap_or("");
                if !valid_name(tname) || is_forbidden_tool(tname) {
                    eprintln!(
                        "moat-agent: MCP server {}: tool {tname:?} not offered (bad or forbidden name)",
                        c.name
                    );
                    continue;
                }
                let schema = if t["inputSchema"].is_object() {
                    t["inputSchema"].clone()
                } else {
                    json!({"type": "object"})
                };
                c.tools.push(ToolDef {
                    name: tool_name(&c.name, tname),
                    description: t["description"].as_str().unwrap_or("").to_string(),
                    schema,
                });
            }
            cursor = r["nextCursor"].as_str().map(str::to_string);
            if cursor.is_none() {
                break;
            }
        }
        Ok(c)
    }

    fn send(&mut self, msg: &Value) -> Result<(), McpError> {
        let mut line = msg.to_string();
        line.push('\n');
        self.stdin
            .write_all(line.as_bytes())
            .and_then(|_| self.stdin.flush())
            .map_err(|e| McpError::Server {
                server: self.name.clone(),
                what: format!("writing to it: {e}"),
            })
    }

    fn request(&mut self, method: &str, params: Value) -> Result<Value, McpError> {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))?;
        let err = |what: String| McpError::Server {
            server: self.name.clone(),
            what,
        };
        let deadline = std::time::Instant::now() + self.timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = match self.lines.recv_timeout(left) {
                Ok(l) => l,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(err(format!(
                        "no answer to {method} in {} s",
                        self.timeout.as_secs()
                    )))
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(err(format!("it exited before answering {method}")))
                }
            };
            let Ok(msg) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if msg["id"] != json!(id) {
                continue;
            }
            if let Some(e) = msg.get("error") {
                return Err(err(format!(
                    "{method} failed: {}",
                    e["message"].as_str().unwrap_or("unknown error")
                )));
            }
            return Ok(msg["result"].clone());
        }
    }

    /// Calls `tool` (the server's own name) with `args`.
    pub fn call(&mut self, tool: &str, args: &Value) -> ToolOutput {
        let args = if args.is_object() {
            args.clone()
        } else {
            json!({})
        };
        match self.request("tools/call", json!({"name": tool, "arguments": args})) {
            Ok(r) => {
                let mut text = String::new();
                for c in r["content"].as_array().into_iter().flatten() {
                    if let Some(t) = c["text"].as_str() {
                        if !text.is_empty() {
                            text.push('\n');
                        }
                        text.push_str(t);
                    } else if let Some(k) = c["type"].as_str() {
                        text.push_str(&format!("({k} content)"));
                    }
                }
                if text.is_empty() && !r["structuredContent"].is_null() {
                    text = r["structuredContent"].to_string();
                }
                ToolOutput {
                    ok: r["isError"] != true,
                    text: cap_output(&text),
                }
            }
            Err(e) => ToolOutput {
                ok: false,
                text: e.to_string(),
            },
        }
    }
}

impl Drop for McpClient {
    fn drop(&mut self) {
        let pgid = self.child.id() as i32;
        if pgid > 1 {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pgid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(tool_name("gh", "issues"), "mcp__gh__issues");
        assert_eq!(split_tool_name("mcp__gh__list__x"), Some(("gh", "list__x")));
        assert_eq!(split_tool_name("mcp____x"), None);
        assert_eq!(split_tool_name("bash"), None);
    }

    /// A tiny MCP server in shell + python: answers initialize, lists one
    /// tool and one forbidden tool, echoes calls.
    #[test]
    fn a_stdio_server_lists_and_calls_tools() {
        let script = r#"
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if "id" not in m:
        continue
    meth = m["method"]
    if meth == "initialize":
        r = {"protocolVersion": "2025-06-18", "capabilities": {"tools": {}}, "serverInfo": {"name": "t", "version": "1"}}
    elif meth == "tools/list":
        r = {"tools": [{"name": "echo", "description": "echo it", "inputSchema": {"type": "object"}},
                       {"name": "read_thread", "inputSchema": {"type": "object"}}]}
    elif meth == "tools/call":
        r = {"content": [{"type": "text", "text": "echo:" + m["params"]["arguments"].get("x", "")}], "isError": False}
    print(json.dumps({"noise": True}), flush=True)
    print(json.dumps({"jsonrpc": "2.0", "id": m["id"], "result": r}), flush=True)
"#;
        let d = tempfile::tempdir().unwrap();
        let s = McpServer {
            name: "t".into(),
            command: vec!["python3".into(), "-c".into(), script.into()],
            env: Default::default(),
        };
        let mut c = McpClient::start(&s, d.path(), Duration::from_secs(10)).unwrap();
        let names: Vec<_> = c.tools.iter().map(|t| t.name.clone()).collect();
        assert_eq!(names, ["mcp__t__echo"]);
        let out = c.call("echo", &json!({"x": "hi"}));
        assert_eq!(
            out,
            ToolOutput {
                ok: true,
                text: "echo:hi".into()
            }
        );

        let bad = McpServer {
            name: "a__b".into(),
            command: vec!["true".into()],
            env: Default::default(),
        };
        assert!(McpClient::start(&bad, d.path(), Duration::from_secs(1)).is_err());
        let dead = McpServer {
            name: "dead".into(),
            command: vec!["true".into()],
            env: Default::default(),
        };
        let e = McpClient::start(&dead, d.path(), Duration::from_secs(5))
            .err()
            .unwrap();
        assert!(e.to_string().starts_with("MCP server dead: "), "{e}");
    }
}
