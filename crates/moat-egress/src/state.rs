//! The state every part of one door shares: its configuration, how names
//! resolve, the DNS stub's name table, the LLM and GitHub state, and the
//! audit helpers that name the lease.
//!
//! Must never: return an address the SSRF guard did not pass (or a pin),
//! or resolve a name inside the sandbox's namespace.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use moat_policy::network::{Allowed, Denied, NetworkPolicy};

use crate::intercept::{Intercept, Service};
use crate::{amp, github, llm, now_ms, Audit, EgressRecord, STEP_TIMEOUT};

/// How the door turns names into addresses (on the host, never in the sandbox).
#[derive(Debug, Clone)]
pub enum Resolver {
    /// The host's resolver (getaddrinfo).
    System,
    /// A fixed table, for tests: names absent from it do not resolve.
    Static(HashMap<String, Vec<IpAddr>>),
}

impl Resolver {
    pub async fn lookup(&self, host: &str, port: u16) -> std::io::Result<Vec<IpAddr>> {
        match self {
            Resolver::System => Ok(tokio::net::lookup_host((host, port))
                .await?
                .map(|a| a.ip())
                .collect()),
            Resolver::Static(map) => map
                .get(host)
                .cloned()
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no such name")),
        }
    }
}

pub struct DoorConfig {
    /// Names the lease in audit records.
    pub lease: String,
    pub policy: Arc<NetworkPolicy>,
    pub resolver: Resolver,
    pub audit: Arc<dyn Audit>,
    /// The LLM reverse proxy on 127.0.0.1:8787, when any provider is set.
    pub llm: Option<llm::LlmConfig>,
    /// GitHub credential injection for the GitHub hosts, when set.
    pub github: Option<github::GithubAccess>,
    /// Amp key injection for Amp's host, when set.
    pub amp: Option<amp::AmpAccess>,
}

/// Addresses the DNS stub hands out: 127.100.0.1 upwards, one per name.
#[derive(Default)]
pub(crate) struct NameTable {
    by_name: HashMap<String, Ipv4Addr>,
    by_addr: HashMap<Ipv4Addr, String>,
}

impl NameTable {
    pub(crate) fn address_for(&mut self, name: &str) -> Option<Ipv4Addr> {
        if let Some(a) = self.by_name.get(name) {
            return Some(*a);
        }
        let n = self.by_name.len() as u32 + 1;
        if n >= 1 << 16 {
            return None;
        }
        let a = Ipv4Addr::new(127, 100, (n >> 8) as u8, n as u8);
        self.by_name.insert(name.to_string(), a);
        self.by_addr.insert(a, name.to_string());
        Some(a)
    }
    pub(crate) fn name_at(&self, a: Ipv4Addr) -> Option<String> {
        self.by_addr.get(&a).cloned()
    }
}

pub(crate) struct State {
    pub cfg: DoorConfig,
    pub names: Mutex<NameTable>,
    pub llm: Option<llm::LlmState>,
    pub github: Option<github::GithubState>,
    pub amp: Option<amp::AmpState>,
    /// The lease CA and the intercepted hosts (GitHub's, Amp's).
    pub intercept: Option<Intercept>,
}

impl State {
    pub(crate) fn audit(&self, mut rec: EgressRecord) {
        rec.ts_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        rec.lease = self.cfg.lease.clone();
        self.cfg.audit.record(&rec);
    }

    pub(crate) fn audit_llm(&self, mut rec: llm::LlmRecord) {
        rec.ts_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        rec.lease = self.cfg.lease.clone();
        self.cfg.audit.record_llm(&rec);
    }

    pub(crate) fn audit_github(&self, mut rec: github::GithubRecord) {
        rec.ts_ms = now_ms();
        rec.lease = self.cfg.lease.clone();
        self.cfg.audit.record_github(&rec);
    }

    /// Whether this door intercepts `name` (normalized) on `port`.
    pub(crate) fn intercepts(&self, name: &str, port: u16) -> bool {
        self.intercepted(name, port).is_some()
    }

    /// The service answering `name` (normalized) on `port`, if intercepted.
    pub(crate) fn intercepted(&self, name: &str, port: u16) -> Option<Service> {
        if port != 443 {
            return None;
        }
        self.intercept.as_ref().and_then(|i| i.service(name))
    }

    /// Resolves an allowed destination and checks every address it has.
    /// Invariant: the returned address is one the SSRF guard passed (or a pin).
    pub(crate) async fn resolve(&self, allowed: &Allowed) -> Result<SocketAddr, Denied> {
        if let Some(ip) = allowed.fixed {
            return Ok(SocketAddr::new(ip, allowed.port));
        }
        let ips = tokio::time::timeout(
            STEP_TIMEOUT,
            self.cfg.resolver.lookup(&allowed.host, allowed.port),
        )
        .await
        .map_err(|_| Denied(format!("resolving {} timed out", allowed.host)))?
        .map_err(|e| Denied(format!("{} does not resolve: {e}", allowed.host)))?;
        let first = *ips
            .first()
            .ok_or_else(|| Denied(format!("{} has no address", allowed.host)))?;
        for ip in &ips {
            self.cfg.policy.check_resolved(allowed, *ip)?;
        }
        Ok(SocketAddr::new(first, allowed.port))
    }
}
