//! moat-policy: the configuration model and its validation. Pure: no I/O, no
//! environment, no clock. Everything here defaults to "deny".

#![forbid(unsafe_code)]
// Outside input never reaches an `unwrap`/`expect` (house style); tests may.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod agents;
pub mod approvals;
pub mod chat_keys;
pub mod credentials;
pub mod gateway;
pub mod gitconfig;
pub mod github;
pub mod hosts;
pub mod images;
pub mod memory;
pub mod network;
pub mod paths;
pub mod platforms;
pub mod sandbox;
pub mod store;
pub mod tasks;
pub mod trust;
pub mod units;

pub use sandbox::{BackendKind, FilesystemPolicy, Limits, MountRequest, Overrides, SandboxPolicy};
pub use units::{parse_duration, parse_size, ByteSize};

/// A policy that cannot be accepted. `key` is the setting's path in the file
/// (`limits.memory`) or the CLI flag (`--memory`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
    #[error("{key}: {message}{}", line.map(|l| format!(" (line {l})")).unwrap_or_default())]
    Syntax {
        key: String,
        message: String,
        line: Option<usize>,
    },
}
