//! Counters for `/metrics` (Prometheus text format 0.0.4), served on the
//! admin address only. Must never carry a user's text or a secret in a label.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds (seconds) of the turn latency histogram.
const BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
];

/// What an inbound event came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accepted,
    Duplicate,
    Unauthorized,
    RateLimited,
    Forged,
    Invalid,
    Command,
}

impl Verdict {
    const ALL: [Verdict; 7] = [
        Verdict::Accepted,
        Verdict::Duplicate,
        Verdict::Unauthorized,
        Verdict::RateLimited,
        Verdict::Forged,
        Verdict::Invalid,
        Verdict::Command,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Verdict::Accepted => "accepted",
            Verdict::Duplicate => "duplicate",
            Verdict::Unauthorized => "unauthorized",
            Verdict::RateLimited => "rate_limited",
            Verdict::Forged => "forged",
            Verdict::Invalid => "invalid",
            Verdict::Command => "command",
        }
    }
}

#[derive(Default)]
pub struct Metrics {
    events: [AtomicU64; 7],
    turns_ok: AtomicU64,
    turns_failed: AtomicU64,
    turn_buckets: [AtomicU64; 12],
    turn_count: AtomicU64,
    /// Sum of turn seconds, in microseconds.
    turn_sum_us: AtomicU64,
    /// LLM tokens per user and per channel (the doors' shared ledger,
    /// seeded from the audit log at start).
    ledger: std::sync::OnceLock<std::sync::Arc<moat_egress::llm::UsageLedger>>,
}

/// A label value in the exposition format: `\`, `"` and newlines escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Values read when `/metrics` is asked for.
#[derive(Debug, Default, Clone, Copy)]
pub struct Gauges {
    pub queue_depth: u64,
    pub pool_size: u64,
    pub pool_idle: u64,
    pub pool_busy: u64,
    pub pool_waiting: u64,
    pub running_turns: u64,
}

impl Metrics {
    pub fn event(&self, v: Verdict) {
        let i = Verdict::ALL.iter().position(|x| *x == v).unwrap_or(0);
        self.events[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn events(&self, v: Verdict) -> u64 {
        let i = Verdict::ALL.iter().position(|x| *x == v).unwrap_or(0);
        self.events[i].load(Ordering::Relaxed)
    }

    pub fn turn(&self, ok: bool, secs: f64) {
        if ok {
            self.turns_ok.fetch_add(1, Ordering::Relaxed);
        } else {
            self.turns_failed.fetch_add(1, Ordering::Relaxed);
        }
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                self.turn_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.turn_count.fetch_add(1, Ordering::Relaxed);
        self.turn_sum_us
            .fetch_add((secs * 1e6) as u64, Ordering::Relaxed);
    }

    /// Counts LLM tokens from `ledger` in `/metrics` (set once, at start).
    pub fn set_ledger(&self, ledger: std::sync::Arc<moat_egress::llm::UsageLedger>) {
        let _ = self.ledger.set(ledger);
    }

    /// The exposition text.
    pub fn render(&self, g: Gauges) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# HELP moat_events_total Chat events by verdict.");
        let _ = writeln!(s, "# TYPE moat_events_total counter");
        for (i, v) in Verdict::ALL.iter().enumerate() {
            let _ = writeln!(
                s,
                "moat_events_total{{verdict=\"{}\"}} {}",
                v.name(),
                self.events[i].load(Ordering::Relaxed)
            );
        }
        let gauges = [
            (
                "moat_queue_depth",
                "Stored messages not yet in a turn.",
                g.queue_depth,
            ),
            (
                "moat_pool_size",
                "Runners the pools should hold.",
                g.pool_size,
            ),
            ("moat_pool_idle", "Idle warm runners.", g.pool_idle),
            (
                "moat_pool_busy",
                "Runners lent out or being reset.",
                g.pool_busy,
            ),
            (
                "moat_pool_waiting",
                "Requests waiting for a runner.",
                g.pool_waiting,
            ),
            ("moat_running_turns", "Turns running now.", g.running_turns),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        let _ = writeln!(s, "# HELP moat_turns_total Finished turns by result.");
        let _ = writeln!(s, "# TYPE moat_turns_total counter");
        let _ = writeln!(
            s,
            "moat_turns_total{{result=\"ok\"}} {}",
            self.turns_ok.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            s,
            "moat_turns_total{{result=\"failed\"}} {}",
            self.turns_failed.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            s,
            "# HELP moat_turn_seconds Turn latency, message to final answer."
        );
        let _ = writeln!(s, "# TYPE moat_turn_seconds histogram");
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                s,
                "moat_turn_seconds_bucket{{le=\"{b}\"}} {}",
                self.turn_buckets[i].load(Ordering::Relaxed)
            );
        }
        let count = self.turn_count.load(Ordering::Relaxed);
        let _ = writeln!(s, "moat_turn_seconds_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            s,
            "moat_turn_seconds_sum {}",
            self.turn_sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(s, "moat_turn_seconds_count {count}");
        if let Some(l) = self.ledger.get() {
            for (metric, what, rows) in [
                ("moat_llm_user_tokens_total", "user", l.user_totals()),
                (
                    "moat_llm_channel_tokens_total",
                    "channel",
                    l.channel_totals(),
                ),
            ] {
                let _ = writeln!(
                    s,
                    "# HELP {metric} LLM tokens (input, cache and output) by {what}, since the audit log began.\n# TYPE {metric} counter"
                );
                for (k, v) in rows {
                    let _ = writeln!(s, "{metric}{{{what}=\"{}\"}} {v}", label(&k));
                }
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llm_tokens_by_user_and_channel_with_labels_escaped() {
        let m = Metrics::default();
        assert!(!m.render(Gauges::default()).contains("moat_llm_"));
        let l = std::sync::Arc::new(moat_egress::llm::UsageLedger::new());
        l.add("lease", Some("U0ALICE"), Some("slack channel C1"), 42, 0);
        l.add(
            "lease",
            Some("we\"ird\nname"),
            Some("slack channel C1"),
            8,
            0,
        );
        m.set_ledger(l);
        let text = m.render(Gauges::default());
        assert!(
            text.contains("moat_llm_user_tokens_total{user=\"U0ALICE\"} 42\n"),
            "{text}"
        );
        assert!(
            text.contains("moat_llm_user_tokens_total{user=\"we\\\"ird\\nname\"} 8\n"),
            "{text}"
        );
        assert!(
            text.contains("moat_llm_channel_tokens_total{channel=\"slack channel C1\"} 50\n"),
            "{text}"
        );
    }
}
