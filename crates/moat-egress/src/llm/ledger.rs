//! The usage ledger: LLM token totals per lease, per user and per channel,
//! and per user in a channel by the hour (for budgets over a rolling window,
//! `budget_user = "200000/day"`), shared by every door that holds it (a
//! gateway shares one across all its sandboxes; the CLI and the gateway seed
//! it from the audit log, so totals span runs and restarts).
//!
//! Must never: hold anything but labels and counts (no key, no body), or fail
//! a run because of an unreadable line in the audit log.

use std::collections::{BTreeMap, HashMap};
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
    /// (channel, user) -> tokens per hour since the epoch.
    hourly: HashMap<(String, String), BTreeMap<u64, u64>>,
}

const HOUR_MS: u64 = 3_600_000;
/// Hours of per-user counts kept: the longest window a budget may have
/// (a week), and a day more.
const KEEP_HOURS: u64 = 8 * 24;

fn bump_hour(t: &mut Totals, channel: &str, user: &str, at_ms: u64, tokens: u64) {
    let hours = t
        .hourly
        .entry((channel.to_string(), user.to_string()))
        .or_default();
    let h = at_ms / HOUR_MS;
    let e = hours.entry(h).or_insert(0);
    *e = e.saturating_add(tokens);
    // Forget what no window reaches any more.
    let oldest = h.saturating_sub(KEEP_HOURS);
    while hours.first_key_value().is_some_and(|(k, _)| *k < oldest) {
        hours.pop_first();
    }
}

fn bump(map: &mut HashMap<String, u64>, key: &str, tokens: u64) {
    let t = map.entry(key.to_string()).or_insert(0);
    *t = t.saturating_add(tokens);
}

impl UsageLedger {
    pub fn new() -> UsageLedger {
        UsageLedger::default()
    }

    /// Counts `tokens` for the lease, and for the user and channel when
    /// known, at `at_ms` (Unix milliseconds).
    pub fn add(
        &self,
        lease: &str,
        user: Option<&str>,
        channel: Option<&str>,
        tokens: u64,
        at_ms: u64,
    ) {
        let mut t = self.totals.lock().unwrap_or_else(|e| e.into_inner());
        bump(&mut t.leases, lease, tokens);
        if let Some(u) = user {
            bump(&mut t.users, u, tokens);
        }
        if let Some(c) = channel {
            bump(&mut t.channels, c, tokens);
        }
        if let (Some(u), Some(c)) = (user, channel) {
            bump_hour(&mut t, c, u, at_ms, tokens);
        }
    }

    /// Tokens `user` used in `channel` from the hour that holds `since_ms`
    /// on (counted by the hour: a window may reach up to an hour further
    /// back than asked, never less far).
    pub fn user_in_channel_since(&self, channel: &str, user: &str, since_ms: u64) -> u64 {
        let t = self.totals.lock().unwrap_or_else(|e| e.into_inner());
        t.hourly
            .get(&(channel.to_string(), user.to_string()))
            .map(|h| {
                h.range(since_ms / HOUR_MS..)
                    .fold(0u64, |a, (_, v)| a.saturating_add(*v))
            })
            .unwrap_or(0)
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

    /// Every user's total, sorted by user.
    pub fn user_totals(&self) -> Vec<(String, u64)> {
        let t = self.totals.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<(String, u64)> = t.users.iter().map(|(k, v)| (k.clone(), *v)).collect();
        v.sort();
        v
    }

    /// Every channel's total, sorted by channel.
    pub fn channel_totals(&self) -> Vec<(String, u64)> {
        let t = self.totals.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<(String, u64)> = t.channels.iter().map(|(k, v)| (k.clone(), *v)).collect();
        v.sort();
        v
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
            let user = v.get("user").and_then(Value::as_str);
            let channel = v.get("channel").and_then(Value::as_str);
            if let Some(u) = user {
                bump(&mut t.users, u, tokens);
            }
            if let Some(c) = channel {
                bump(&mut t.channels, c, tokens);
            }
            if let (Some(u), Some(c), Some(at)) =
                (user, channel, v.get("ts_ms").and_then(Value::as_u64))
            {
                bump_hour(&mut t, c, u, at, tokens);
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
        l.add("a", Some("alice"), Some("cli"), 10, 0);
        l.add("b", Some("alice"), Some("chat"), 5, 0);
        l.add("b", Some("bob"), None, 7, 0);
        l.add("c", None, Some("chat"), 1, 0);
        assert_eq!((l.lease_total("a"), l.lease_total("b")), (10, 12));
        assert_eq!((l.user_total("alice"), l.user_total("bob")), (15, 7));
        assert_eq!((l.channel_total("cli"), l.channel_total("chat")), (10, 6));
        assert_eq!(l.user_total("carol"), 0);
    }

    #[test]
    fn a_user_in_a_channel_is_counted_by_the_hour() {
        let l = UsageLedger::new();
        let day = 24 * HOUR_MS;
        let now = 100 * day + 30 * 60_000; // half past midnight, day 100
        l.add("a", Some("alice"), Some("chat"), 10, now - 2 * day);
        l.add("a", Some("alice"), Some("chat"), 20, now - 23 * HOUR_MS);
        l.add("a", Some("alice"), Some("chat"), 30, now);
        l.add("a", Some("alice"), Some("other"), 40, now);
        l.add("a", Some("bob"), Some("chat"), 50, now);
        assert_eq!(l.user_in_channel_since("chat", "alice", now - day), 50);
        assert_eq!(l.user_in_channel_since("chat", "alice", now - 3 * day), 60);
        assert_eq!(l.user_in_channel_since("other", "alice", now - day), 40);
        assert_eq!(l.user_in_channel_since("chat", "carol", now - day), 0);
        // Counts older than any window are forgotten.
        l.add("a", Some("alice"), Some("chat"), 1, now + 30 * day);
        assert_eq!(l.user_in_channel_since("chat", "alice", 0), 1);
    }

    #[test]
    fn the_audit_log_seeds_users_and_channels_and_bad_lines_are_skipped() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("audit.jsonl");
        let mut f = std::fs::File::create(&p).unwrap();
        let lines = [
            r#"{"kind":"llm","lease":"cli","user":"alice","channel":"cli","input_tokens":10,"output_tokens":5,"cache_creation_input_tokens":2,"cache_read_input_tokens":3}"#,
            r#"{"kind":"llm","lease":"cli","user":"alice","channel":"chat","input_tokens":100,"output_tokens":0,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"ts_ms":7200000}"#,
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
        assert_eq!(l.user_in_channel_since("chat", "alice", 7_200_000), 100);
        assert_eq!(l.user_in_channel_since("chat", "alice", 10_800_000), 0);
        let empty = UsageLedger::from_audit_log(&d.path().join("none.jsonl")).unwrap();
        assert_eq!(empty.user_total("alice"), 0);
        assert!(
            UsageLedger::from_audit_log(d.path()).is_err(),
            "a directory"
        );
    }
}
