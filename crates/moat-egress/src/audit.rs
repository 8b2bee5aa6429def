//! The door's audit records and where they go: one record per connection
//! attempt, DNS query, LLM call, GitHub request and token event, appended to
//! moat's hash-chained audit log ([`JsonlAudit`]) or kept in memory
//! ([`MemoryAudit`]).
//!
//! Must never: put a body, a header value, a key, a token or a placeholder
//! in a record.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::{github, llm};

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
    /// One request to an intercepted host: GitHub's (`kind` `github`) or
    /// Amp's (`kind` `amp`) (default: dropped).
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
