//! moat's built-in agent. The gateway starts it inside the conversation's
//! sandbox (`moat agent-run`), writes one [`protocol::TurnSpec`] to its
//! standard input and reads [`protocol::Event`]s, one JSON object a line,
//! from its standard output.
//!
//! Owns: the wire protocol between gateway and agent, the names of the
//! built-in tools, and (inside the sandbox) the tool-use loop: `turn` (the
//! loop, the allowlist check, the saved session), `model` (Anthropic
//! Messages and OpenAI Responses), `retry` (which failed calls are tried
//! again), `tools` (the built-in tools), `mcp` (a stdio MCP client), `http`
//! (a plain-HTTP client for the door).
//! Must never: run a tool that the turn's allowlist does not name, talk to
//! anything but the LLM base URL it is given (the door), or hold a real key
//! (it only ever sees the door's placeholder).

#![forbid(unsafe_code)]
// Outside input never reaches an `unwrap`/`expect` (house style); tests may.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod http;
pub mod mcp;
pub mod model;
pub mod protocol;
pub mod retry;
pub mod tools;
pub mod turn;

use std::io::{Read, Write};

pub use turn::{run_turn, Setup};

/// Reads a [`protocol::TurnSpec`] from `input`, runs the turn and writes its
/// events to `out`, one JSON line each, flushed as they come. Returns whether
/// the turn ended with `final` (anything else ends with one `error` event).
pub fn run_stdio(input: impl Read, out: impl Write, setup: Result<Setup, String>) -> bool {
    let mut out = out;
    let mut emit = |e: protocol::Event| {
        if let Ok(line) = serde_json::to_string(&e) {
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    };
    let spec: protocol::TurnSpec = match serde_json::from_reader(input.take(16 * 1024 * 1024)) {
        Ok(s) => s,
        Err(e) => {
            emit(protocol::Event::Error {
                message: format!("the turn spec on standard input is not valid: {e}"),
            });
            return false;
        }
    };
    match setup {
        Ok(setup) => run_turn(&spec, &setup, &mut emit),
        Err(message) => {
            emit(protocol::Event::Error { message });
            false
        }
    }
}
