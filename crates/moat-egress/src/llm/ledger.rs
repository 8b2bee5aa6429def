//! The usage ledger: LLM token totals per lease, per user and per channel,
//! shared by every door that holds it (a gateway shares one across all its
//! sandboxes; the CLI builds one per run from the audit log, so a user's total
//! spans runs).
//!
//! Must never: hold anything but labels and counts (no key, no body), or fail
//! a run because of an unreadable line in the audit log.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::Path;
use std::sync::Mutex;

use serde_json::Value;

/// Token totals (input, cache and output together) per lease, user and channel.
#[derive(Debug, Default)]
pub struct UsageLedger {
    totals: Mutex<Totals>,
}

#[derive(Debug, Default)]
struct Totals {
    leases: HashMap<String, u64>,
    users: HashMap<String, u64>,
    channels: HashMap<String, u64>,
}

fn bump(map: &mut HashMap<String, u64>, key: &str, tokens: u64) {
    let t = map.entry(key.to_string()).or_insert(0);
    *t = t.saturating_add(tokens);
}

impl UsageLedger {
    pub fn new() -> UsageLedger {
        UsageLedger::default()
    }

    /// Counts `tokens` for the lease, and for the user and channel when known.
    pub fn add(&self, lease: &str, user: Option<&str>, channel: Option<&str>, tokens: u64) {
        let mut t = self.totals.lock().unwrap_or_else(|e| e.into_inner());
        bump(&mut t.leases, lease, tokens);
        if let Some(u) = user {
            bump(&mut t.users, u, tokens);
        }
        if let Some(c) = channel {
            bump(&mut t.channels, c, tokens);
        }
    }

    fn get(&self, pick: impl Fn(&Totals) -> &HashMap<String, u64>, key: &str) -> u64 {
        let t = self.totals.lock().unwrap_or_else(|e| e.into_inner());
        pick(&t).get(key).copied().unwrap_or(0)
    }

    /// Tokens used by `lease` as counted by this ledger.
    pub fn lease_total(&self, lease: &str) -> u64 {
        self.get(|t| &t.leases, lease)
    }

    /// Tokens used by `user`.
    pub fn user_total(&self, user: &str) -> u64 {
        self.get(|t| &t.users, user)
    }

    /// Tokens used through `channel`.
    pub fn channel_total(&self, channel: &str) -> u64 {
        self.get(|t| &t.channels, channel)
    }

    /// A ledger holding the totals per user and per channel of the
    /// `"kind":"llm"` records in the audit log at `path` (not per lease: a
    /// lease's budget covers that lease only). A missing file is an empty
    /// ledger; lines that are not such records (other kinds, bad JSON, cut
    /// short) are skipped.
    pub fn from_audit_log(path: &Path) -> std::io::Result<UsageLedger> {
        let ledger = UsageLedger::new();
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ledger),
            Err(e) => return Err(e),
        };
        let mut reader = std::io::BufReader::new(file);
        let mut line = Vec::new();
        let mut t = Totals::default();
        loop {
            line.clear();
            if reader.read_until(b'\n', &mut line)? == 0 {
                break;
            }
            let Ok(v) = serde_json::from_slice::<Value>(&line) else {
                continue;
            };
            if v.get("kind").and_then(Value::as_str) != Some("llm") {
                continue;
            }
            let tokens = [
                "input_tokens",
                "output_tokens",
                "cache_creation_input_tokens",
                "cache_read_input_tokens",
            ]
            .iter()
            .filter_map(|k| v.get(*k).and_then(Value::as_u64))
            .fold(0u64, u64::saturating_add);
            if let Some(u) = v.get("user").and_then(Value::as_str) {
                bump(&mut t.users, u, tokens);
            }
            if let Some(c) = v.get("channel").and_then(Value::as_str) {
                bump(&mut t.channels, c, tokens);
            }
        }
        *ledger.totals.lock().unwrap_or_else(|e| e.into_inner()) = t;
        Ok(ledger)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn counts_per_lease_user_and_channel() {
        let l = UsageLedger::new();
        l.add("a", Some("alice"), Some("cli"), 10);
        l.add("b", Some("alice"), Some("chat"), 5);
        l.add("b", Some("bob"), None, 7);
        l.add("c", None, Some("chat"), 1);
        assert_eq!((l.lease_total("a"), l.lease_total("b")), (10, 12));
        assert_eq!((l.user_total("alice"), l.user_total("bob")), (15, 7));
        assert_eq!((l.channel_total("cli"), l.channel_total("chat")), (10, 6));
        assert_eq!(l.user_total("carol"), 0);
    }

    #[test]
    fn the_audit_log_seeds_users_and_channels_and_bad_lines_are_skipped() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("audit.jsonl");
        let mut f = std::fs::File::create(&p).unwrap();
        let lines = [
            r#"{"kind":"llm","lease":"cli","user":"alice","channel":"cli","input_tokens":10,"output_tokens":5,"cache_creation_input_tokens":2,"cache_read_input_tokens":3}"#,
            r#"{"kind":"llm","lease":"cli","user":"alice","channel":"chat","input_tokens":100,"output_tokens":0,"cache_creation_input_tokens":0,"cache_read_input_tokens":0}"#,
            r#"{"kind":"llm","lease":"cli","user":"bob","channel":"cli","input_tokens":1,"output_tokens":1}"#,
            r#"{"kind":"llm","lease":"cli","input_tokens":1000}"#,
            r#"{"kind":"connect","user":"alice","input_tokens":1000}"#,
            r#"{"lease":"cli","host":"example.com"}"#,
            "not json at all",
            r#"{"kind":"llm","user":"alice","input_tokens":"#,
        ];
        for l in lines {
            writeln!(f, "{l}").unwrap();
        }
        f.write_all(b"\xff\xfe\n").unwrap();
        f.write_all(br#"{"kind":"llm","user":"alice","channel":"cli","input_tokens":4}"#)
            .unwrap();
        drop(f);
        let l = UsageLedger::from_audit_log(&p).unwrap();
        assert_eq!(l.user_total("alice"), 10 + 5 + 2 + 3 + 100 + 4);
        assert_eq!(l.user_total("bob"), 2);
        assert_eq!(l.channel_total("cli"), 20 + 2 + 4);
        assert_eq!(l.channel_total("chat"), 100);
        assert_eq!(l.lease_total("cli"), 0, "leases are not seeded");
        let empty = UsageLedger::from_audit_log(&d.path().join("none.jsonl")).unwrap();
        assert_eq!(empty.user_total("alice"), 0);
        assert!(
            UsageLedger::from_audit_log(d.path()).is_err(),
            "a directory"
        );
    }
}
