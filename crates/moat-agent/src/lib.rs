//! moat's built-in agent. The gateway starts it inside the conversation's
//! sandbox (`moat agent-run`), writes one [`protocol::TurnSpec`] to its
//! standard input and reads [`protocol::Event`]s, one JSON object a line,
//! from its standard output.
//!
//! Owns: the wire protocol between gateway and agent, the names of the
//! built-in tools, and (inside the sandbox) the tool-use loop.
//! Must never: run a tool that the turn's allowlist does not name, talk to
//! anything but the LLM base URL it is given (the door), or hold a real key
//! (it only ever sees the door's placeholder).

pub mod protocol;
