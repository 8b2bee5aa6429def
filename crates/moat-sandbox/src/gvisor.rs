//! The `gvisor` backend (runsc). Placeholder until implemented.
use crate::backend::{Backend, Instance, LeaseEnv};
use crate::error::{Result, SandboxError};
use crate::EngineConfig;
use std::os::fd::OwnedFd;

pub struct GvisorBackend;

impl GvisorBackend {
    pub fn new(_config: &EngineConfig) -> Result<Self> {
        Ok(GvisorBackend)
    }
}

impl Backend for GvisorBackend {
    fn name(&self) -> &'static str {
        "gvisor"
    }
    fn uses_host_cgroup(&self) -> bool {
        false
    }
    fn start(&self, _env: &LeaseEnv, _procs: &[OwnedFd]) -> Result<Box<dyn Instance>> {
        Err(SandboxError::Refused("gvisor backend not built yet".into()))
    }
}
