//! moat-egress: the sandbox's only door to the network.
//!
//! A [`Door`] owns one sandbox's network namespace (loopback only) and the
//! listeners inside it: an HTTP forward proxy with CONNECT tunnels, a DNS stub
//! that never forwards a query, and transparent listeners for clients that
//! ignore proxy variables. Every destination is judged by the policy's
//! allowlist, resolved on the host, checked by the SSRF guard, connected to at
//! exactly the checked address, and recorded in the audit log.
//!
//! Must never: forward a DNS query, connect before a verdict, connect to an
//! address other than the one checked, forward an ambiguous HTTP request, let a
//! tunnel's TLS name differ from its target, or put a body or secret in a record.

// Outside input never reaches an `unwrap`/`expect` (house style); tests may.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod conn;
pub mod dns;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod github;
pub mod http;
pub mod llm;
pub mod netns;
pub mod tls;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use moat_policy::network::{Allowed, Denied, HostPattern, NetworkPolicy};
use serde::Serialize;

/// The proxy's port on the sandbox's 127.0.0.1.
pub const PROXY_PORT: u16 = 3128;
/// The DNS stub's port on the sandbox's 127.0.0.1.
pub const DNS_PORT: u16 = 53;
/// Time allowed for a request head, a ClientHello, or an upstream connect.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// One audit record: a connection attempt (or DNS query) and its verdict.
/// Never holds a body, a header value or a credential.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct EgressRecord {
    pub ts_ms: u64,
    pub lease: String,
    /// `connect`, `http`, `transparent-tls`, `transparent-http`, `dns`.
    pub kind: &'static str,
    pub host: String,
    pub port: u16,
    /// The address the door connected to (or would have).
    pub address: Option<String>,
    /// `allowed` or `denied`.
    pub verdict: &'static str,
    pub reason: Option<String>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub duration_ms: u64,
}

/// Where audit records go.
pub trait Audit: Send + Sync {
    fn record(&self, rec: &EgressRecord);
    /// One LLM call through the door's LLM proxy (default: dropped).
    fn record_llm(&self, _rec: &llm::LlmRecord) {}
    /// One request to an intercepted GitHub host (default: dropped).
    fn record_github(&self, _rec: &github::GithubRecord) {}
    /// A GitHub installation token minted or revoked (default: dropped).
    fn record_token(&self, _rec: &github::TokenRecord) {}
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Appends records to moat's audit log ([`moat_audit::AuditLog`]: JSON lines,
/// each carrying the hash of the previous), and logs them with `tracing`.
/// A record's `kind` becomes the log record's kind and its other fields the
/// log record's fields; its `ts_ms` is dropped for the log's own (the same
/// clock, taken at the append).
pub struct JsonlAudit {
    log: Arc<moat_audit::AuditLog>,
}

impl JsonlAudit {
    fn append<T: Serialize>(&self, rec: &T, what: &str) {
        let mut fields = match serde_json::to_value(rec) {
            Ok(serde_json::Value::Object(m)) => m,
            Ok(_) | Err(_) => {
                tracing::error!("the {what} audit record is not a JSON object; not written");
                return;
            }
        };
        fields.remove("ts_ms");
        let Some(serde_json::Value::String(kind)) = fields.remove("kind") else {
            tracing::error!("the {what} audit record has no kind; not written");
            return;
        };
        if let Err(e) = self.log.append(&kind, serde_json::Value::Object(fields)) {
            tracing::error!(error = %e, "could not write the {what} audit record");
        }
    }

    /// Opens (or creates) the audit log at `path` for this door alone.
    pub fn open(path: &Path) -> std::io::Result<JsonlAudit> {
        let log = moat_audit::AuditLog::open(path).map_err(std::io::Error::other)?;
        Ok(JsonlAudit::with_log(Arc::new(log)))
    }

    /// Writes to a log shared with others (the gateway's, say).
    pub fn with_log(log: Arc<moat_audit::AuditLog>) -> JsonlAudit {
        JsonlAudit { log }
    }

    /// The log records go to.
    pub fn log(&self) -> &Arc<moat_audit::AuditLog> {
        &self.log
    }
}

impl Audit for JsonlAudit {
    fn record(&self, rec: &EgressRecord) {
        tracing::info!(target: "moat::egress", lease = %rec.lease, kind = rec.kind, host = %rec.host, port = rec.port, verdict = rec.verdict, reason = rec.reason.as_deref().unwrap_or(""), "egress");
        self.append(rec, "egress");
    }

    fn record_llm(&self, rec: &llm::LlmRecord) {
        tracing::info!(target: "moat::egress", lease = %rec.lease, provider = rec.provider, model = rec.model.as_deref().unwrap_or(""), status = rec.status, verdict = rec.verdict, input_tokens = rec.usage.input_tokens, output_tokens = rec.usage.output_tokens, "llm");
        self.append(rec, "LLM");
    }

    fn record_github(&self, rec: &github::GithubRecord) {
        tracing::info!(target: "moat::egress", lease = %rec.lease, method = %rec.method, host = %rec.host, path = %rec.path, status = rec.status, verdict = rec.verdict, reason = rec.reason.as_deref().unwrap_or(""), "github");
        self.append(rec, "GitHub");
    }

    fn record_token(&self, rec: &github::TokenRecord) {
        tracing::info!(target: "moat::egress", lease = %rec.lease, event = rec.event, repositories = ?rec.repositories, expires_at = rec.expires_at, "github token");
        self.append(rec, "GitHub token");
    }
}

/// Keeps records in memory (tests, benchmarks).
#[derive(Default)]
pub struct MemoryAudit {
    pub records: Mutex<Vec<EgressRecord>>,
    pub llm_records: Mutex<Vec<llm::LlmRecord>>,
    pub github_records: Mutex<Vec<github::GithubRecord>>,
    pub token_records: Mutex<Vec<github::TokenRecord>>,
}

impl MemoryAudit {
    pub fn snapshot(&self) -> Vec<EgressRecord> {
        self.records.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

impl Audit for MemoryAudit {
    fn record(&self, rec: &EgressRecord) {
        if let Ok(mut r) = self.records.lock() {
            r.push(rec.clone());
        }
    }

    fn record_llm(&self, rec: &llm::LlmRecord) {
        if let Ok(mut r) = self.llm_records.lock() {
            r.push(rec.clone());
        }
    }

    fn record_github(&self, rec: &github::GithubRecord) {
        if let Ok(mut r) = self.github_records.lock() {
            r.push(rec.clone());
        }
    }

    fn record_token(&self, rec: &github::TokenRecord) {
        if let Ok(mut r) = self.token_records.lock() {
            r.push(rec.clone());
        }
    }
}

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

    /// The GitHub host `name` (normalized) if this door intercepts it on `port`.
    pub(crate) fn intercepts(&self, name: &str, port: u16) -> bool {
        port == 443 && self.github.as_ref().is_some_and(|g| g.host(name).is_some())
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

/// Ports the transparent listeners serve: 80, 443 and every explicit entry port.
fn transparent_ports(policy: &NetworkPolicy) -> Vec<u16> {
    let mut ports = vec![80, 443];
    for e in &policy.allow {
        if let (Some(p), false) = (e.port, matches!(e.host, HostPattern::Ip(_))) {
            ports.push(p);
        }
    }
    ports.retain(|p| *p != PROXY_PORT && *p != DNS_PORT);
    ports.sort_unstable();
    ports.dedup();
    ports
}

struct Sockets {
    proxy: std::net::TcpListener,
    dns_udp: std::net::UdpSocket,
    dns_tcp: std::net::TcpListener,
    transparent: Vec<(u16, std::net::TcpListener)>,
    llm: Option<std::net::TcpListener>,
}

/// A running door. Dropping it stops every listener and connection; the
/// sandbox is then left with a loopback that leads nowhere (fail closed).
pub struct Door {
    netns: Arc<OwnedFd>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    llm_env: Vec<(String, String)>,
    state: Arc<State>,
    rt: tokio::runtime::Handle,
}

impl Door {
    /// Creates the namespace, binds the listeners inside it and starts serving
    /// on `rt`.
    pub fn start(rt: &tokio::runtime::Handle, cfg: DoorConfig) -> std::io::Result<Door> {
        let ports = transparent_ports(&cfg.policy);
        let with_llm = cfg.llm.as_ref().is_some_and(|l| !l.providers.is_empty());
        let (ns, socks) = netns::with_new_netns(move || {
            let proxy = std::net::TcpListener::bind(("127.0.0.1", PROXY_PORT))?;
            let dns_udp = std::net::UdpSocket::bind(("127.0.0.1", DNS_PORT))?;
            let dns_tcp = std::net::TcpListener::bind(("127.0.0.1", DNS_PORT))?;
            let mut transparent = Vec::new();
            for p in ports {
                transparent.push((p, std::net::TcpListener::bind(("0.0.0.0", p))?));
            }
            let llm = if with_llm {
                Some(std::net::TcpListener::bind(("127.0.0.1", llm::LLM_PORT))?)
            } else {
                None
            };
            Ok(Sockets {
                llm,
                proxy,
                dns_udp,
                dns_tcp,
                transparent,
            })
        })?;
        let llm_state = match cfg.llm.clone() {
            Some(l) if with_llm => Some(llm::LlmState::new(l)?),
            _ => None,
        };
        let llm_env = llm_state
            .as_ref()
            .map(|l| l.client_env())
            .unwrap_or_default();
        let github = match cfg.github.clone() {
            Some(g) => Some(github::GithubState::new(&cfg.lease, g)?),
            None => None,
        };
        let state = Arc::new(State {
            cfg,
            names: Mutex::new(NameTable::default()),
            llm: llm_state,
            github,
        });
        let _enter = rt.enter();
        let mut tasks = Vec::new();
        let tcp = |l: std::net::TcpListener| -> std::io::Result<tokio::net::TcpListener> {
            l.set_nonblocking(true)?;
            tokio::net::TcpListener::from_std(l)
        };
        tasks.push(rt.spawn(conn::serve_proxy(state.clone(), tcp(socks.proxy)?)));
        socks.dns_udp.set_nonblocking(true)?;
        tasks.push(rt.spawn(dns::serve_udp(
            state.clone(),
            tokio::net::UdpSocket::from_std(socks.dns_udp)?,
        )));
        tasks.push(rt.spawn(dns::serve_tcp(state.clone(), tcp(socks.dns_tcp)?)));
        for (port, l) in socks.transparent {
            tasks.push(rt.spawn(conn::serve_transparent(state.clone(), tcp(l)?, port)));
        }
        if let Some(l) = socks.llm {
            tasks.push(rt.spawn(llm::serve(state.clone(), tcp(l)?)));
        }
        Ok(Door {
            netns: Arc::new(ns),
            tasks,
            llm_env,
            state,
            rt: rt.clone(),
        })
    }

    /// The namespace a sandbox must join to use this door.
    pub fn netns(&self) -> Arc<OwnedFd> {
        self.netns.clone()
    }

    /// Starts the LLM token count of this door's lease again: a pooled lease
    /// is reset for its next holder, and its token budget is per holder.
    pub fn reset_llm_usage(&self) {
        if let Some(l) = &self.state.llm {
            l.reset_usage();
        }
    }

    /// Variables for the LLM proxy: base URLs and this lease's placeholder
    /// keys (never a real key). Empty without an LLM config.
    pub fn llm_env(&self) -> Vec<(String, String)> {
        self.llm_env.clone()
    }

    /// Variables for GitHub: the placeholder `GH_TOKEN`/`GITHUB_TOKEN` and
    /// the CA bundle variables (never a real token). Empty without GitHub.
    pub fn github_env(&self) -> Vec<(String, String)> {
        self.state
            .github
            .as_ref()
            .map(|g| g.client_env())
            .unwrap_or_default()
    }

    /// Files the sandbox must see read-only: (host path, sandbox path). Today
    /// the CA bundle with the lease CA, when GitHub is set.
    pub fn files(&self) -> Vec<(std::path::PathBuf, std::path::PathBuf)> {
        self.state
            .github
            .as_ref()
            .map(|g| {
                vec![(
                    g.bundle_path().to_path_buf(),
                    std::path::PathBuf::from(github::CA_BUNDLE_PATH),
                )]
            })
            .unwrap_or_default()
    }

    /// Revokes the GitHub tokens this lease used (call when the lease ends);
    /// returns how many could not be revoked (each is logged).
    pub async fn revoke_github(&self) -> usize {
        match self.state.github.as_ref() {
            Some(g) => g.revoke_all().await,
            None => 0,
        }
    }

    /// What this door saw reach GitHub since the last call (pushes, pull
    /// requests opened), oldest first.
    pub fn take_github_activity(&self) -> Vec<github::GithubActivity> {
        self.state
            .github
            .as_ref()
            .map(|g| g.take_activity())
            .unwrap_or_default()
    }

    /// [`revoke_github`](Self::revoke_github) from a thread that is not
    /// the runtime's own (a blocking thread): waits for GitHub's answers.
    pub fn revoke_github_blocking(&self) -> usize {
        let Some(_) = self.state.github.as_ref() else {
            return 0;
        };
        let state = self.state.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        self.rt.spawn(async move {
            let failed = match state.github.as_ref() {
                Some(g) => g.revoke_all().await,
                None => 0,
            };
            let _ = tx.send(failed);
        });
        // A runtime that is shutting down drops the task: count it failed.
        rx.recv().unwrap_or(1)
    }

    /// As [`Door::revoke_github`], returning (tokens revoked or tried,
    /// how many failed): `moat incident` reports both.
    pub async fn revoke_github_counted(&self) -> (usize, usize) {
        match self.state.github.as_ref() {
            Some(g) => g.revoke_all_counted().await,
            None => (0, 0),
        }
    }

    /// Variables that point proxy-aware clients at the door.
    pub fn client_env() -> Vec<(String, String)> {
        let proxy = format!("http://127.0.0.1:{PROXY_PORT}");
        let no_proxy = "localhost,127.0.0.1".to_string();
        vec![
            ("HTTP_PROXY".into(), proxy.clone()),
            ("HTTPS_PROXY".into(), proxy.clone()),
            ("http_proxy".into(), proxy.clone()),
            ("https_proxy".into(), proxy),
            ("NO_PROXY".into(), no_proxy.clone()),
            ("no_proxy".into(), no_proxy),
        ]
    }
}

impl Drop for Door {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        // The last resort: tokens a caller did not revoke (a turn that
        // panicked, a mint after the caller's revoke) are revoked now, in
        // the background, rather than left valid until they expire.
        if self.state.github.is_some() {
            let state = self.state.clone();
            self.rt.spawn(async move {
                if let Some(g) = state.github.as_ref() {
                    g.revoke_all().await;
                }
            });
        }
    }
}

#[cfg(test)]
mod jsonl_audit_tests {
    use super::*;

    fn connect(host: &str) -> EgressRecord {
        EgressRecord {
            ts_ms: 1,
            lease: "l1".into(),
            kind: "connect",
            host: host.into(),
            port: 443,
            address: Some("192.0.2.1:443".into()),
            verdict: "allowed",
            reason: None,
            bytes_up: 10,
            bytes_down: 20,
            duration_ms: 3,
        }
    }

    #[test]
    fn records_go_into_the_chain_with_one_kind_and_one_ts_ms() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("audit").join("audit.jsonl");
        let a = JsonlAudit::open(&p).unwrap();
        a.record(&connect("a.test"));
        // A second door sharing the same log.
        let b = JsonlAudit::with_log(a.log().clone());
        b.record(&connect("b.test"));
        let text = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        for (i, l) in lines.iter().enumerate() {
            assert_eq!(l.matches("\"kind\":").count(), 1, "{l}");
            assert_eq!(l.matches("\"ts_ms\":").count(), 1, "{l}");
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["kind"], "connect");
            assert_eq!(v["seq"], i as u64 + 1);
            assert_eq!(v["lease"], "l1");
            assert_eq!(v["bytes_down"], 20);
            assert!(
                v["ts_ms"].as_u64().unwrap() > 1,
                "the log's own time, not the record's"
            );
        }
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(lines[1]).unwrap()["host"],
            "b.test"
        );
        assert_eq!(moat_audit::verify(&p).unwrap().records, 2);
    }
}
