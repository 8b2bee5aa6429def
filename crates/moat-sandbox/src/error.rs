//! Typed errors of the sandbox engine. Messages say what failed and what to do;
//! they never carry a command's environment or output.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The policy asks for something this host or backend refuses (exit 125).
    #[error("{0}")]
    Refused(String),
    /// A requested mount failed its checks on the real path.
    #[error("mount {host:?} -> {sandbox:?} refused: {reason}")]
    MountRefused {
        host: PathBuf,
        sandbox: PathBuf,
        reason: String,
    },
    /// The host cannot enforce a limit the policy sets; we fail closed.
    #[error("cannot enforce limits: {0}")]
    Limits(String),
    /// The sandbox could not be created or started.
    #[error("sandbox could not be started: {0}")]
    Start(String),
    /// The in-sandbox init broke the protocol or vanished.
    #[error("sandbox stopped responding: {0}")]
    Broken(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl SandboxError {
    pub fn io(context: impl Into<String>, source: impl Into<std::io::Error>) -> Self {
        SandboxError::Io {
            context: context.into(),
            source: source.into(),
        }
    }
}

pub type Result<T, E = SandboxError> = std::result::Result<T, E>;

/// Adds context to I/O results.
pub(crate) trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: Into<std::io::Error>> IoContext<T> for std::result::Result<T, E> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| SandboxError::io(context(), e))
    }
}
