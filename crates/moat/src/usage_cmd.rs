//! `moat usage`: LLM token use per user or per channel, from the door's
//! `llm` records in the audit log (each names the turn's user and channel,
//! and its tokens), over a period.
//!
//! Must never: write to the audit log, or print anything of a record but its
//! user, channel and counts (records hold no key or prompt, and this command
//! does not go looking).

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, ValueEnum};
use serde_json::Value;

#[derive(Args)]
pub struct UsageArgs {
    /// Only calls in this last stretch of time: `30m`, `24h`, `7d`
    /// (default: the whole log).
    #[arg(long, value_name = "DURATION")]
    since: Option<String>,
    /// Totals per user (the chat user id) or per channel.
    #[arg(long, value_enum, default_value_t = By::User)]
    by: By,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
    /// The audit log (default: <data dir>/audit/audit.jsonl).
    #[arg(long, value_name = "PATH")]
    file: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum By {
    User,
    Channel,
}

/// One user's or channel's totals.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Row {
    pub calls: u64,
    pub refused: u64,
    pub input: u64,
    pub output: u64,
    pub cache: u64,
}

impl Row {
    fn tokens(&self) -> u64 {
        self.input
            .saturating_add(self.output)
            .saturating_add(self.cache)
    }
}

/// `7d`, `24h`, `30m`, `90s` (days besides what `moat_policy` durations take).
fn parse_since(text: &str) -> Result<Duration, String> {
    if let Some(d) = text.strip_suffix('d') {
        let n: u64 = d
            .parse()
            .map_err(|_| format!("--since {text:?}: use a number of days, e.g. 7d"))?;
        return Ok(Duration::from_secs(n.saturating_mul(86_400)));
    }
    moat_policy::parse_duration(text).map_err(|e| format!("--since {text:?}: {e} (or d)"))
}

fn count(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0)
}

/// Totals of the `llm` records at or after `since_ms`, keyed by user or
/// channel (`(none)` when a record has none). Lines that are not such
/// records are skipped.
pub fn totals(path: &Path, since_ms: u64, by_user: bool) -> std::io::Result<BTreeMap<String, Row>> {
    let file = std::fs::File::open(path)?;
    let mut reader = std::io::BufReader::new(file);
    let mut line = Vec::new();
    let mut out: BTreeMap<String, Row> = BTreeMap::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        let Ok(v) = serde_json::from_slice::<Value>(&line) else {
            continue;
        };
        if v.get("kind").and_then(Value::as_str) != Some("llm") || count(&v, "ts_ms") < since_ms {
            continue;
        }
        let key = v
            .get(if by_user { "user" } else { "channel" })
            .and_then(Value::as_str)
            .unwrap_or("(none)")
            .to_string();
        let row = out.entry(key).or_default();
        row.calls += 1;
        if v.get("verdict").and_then(Value::as_str) == Some("denied") {
            row.refused += 1;
        }
        row.input = row.input.saturating_add(count(&v, "input_tokens"));
        row.output = row.output.saturating_add(count(&v, "output_tokens"));
        row.cache = row
            .cache
            .saturating_add(count(&v, "cache_creation_input_tokens"))
            .saturating_add(count(&v, "cache_read_input_tokens"));
    }
    Ok(out)
}

pub fn run(args: UsageArgs) -> ExitCode {
    let path = args.file.unwrap_or_else(crate::audit_cmd::default_path);
    let since_ms = match args.since.as_deref().map(parse_since).transpose() {
        Ok(None) => 0,
        Ok(Some(d)) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            u64::try_from(now.saturating_sub(d).as_millis()).unwrap_or(u64::MAX)
        }
        Err(e) => {
            eprintln!("moat: {e}");
            return ExitCode::from(2);
        }
    };
    let rows = match totals(&path, since_ms, args.by == By::User) {
        Ok(r) => r,
        Err(e) => {
            eprintln!(
                "moat: reading the audit log {}: {e} (is this the data directory moat up uses? set MOAT_DATA_DIR or --file)",
                path.display()
            );
            return ExitCode::from(1);
        }
    };
    let mut sorted: Vec<(&String, &Row)> = rows.iter().collect();
    sorted.sort_by(|a, b| b.1.tokens().cmp(&a.1.tokens()).then(a.0.cmp(b.0)));
    let what = if args.by == By::User {
        "user"
    } else {
        "channel"
    };
    if args.json {
        for (k, r) in sorted {
            println!(
                "{}",
                serde_json::json!({
                    what: k, "calls": r.calls, "refused": r.refused,
                    "input_tokens": r.input, "output_tokens": r.output,
                    "cache_tokens": r.cache, "tokens": r.tokens(),
                })
            );
        }
        return ExitCode::SUCCESS;
    }
    let width = sorted
        .iter()
        .map(|(k, _)| k.len())
        .max()
        .unwrap_or(0)
        .max(what.len());
    println!(
        "{what:<width$}  {:>8}  {:>8}  {:>12}  {:>12}  {:>12}  {:>12}",
        "calls", "refused", "input", "output", "cache", "tokens"
    );
    for (k, r) in sorted {
        println!(
            "{k:<width$}  {:>8}  {:>8}  {:>12}  {:>12}  {:>12}  {:>12}",
            r.calls,
            r.refused,
            r.input,
            r.output,
            r.cache,
            r.tokens()
        );
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn totals_by_user_and_channel_since_a_time() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("audit.jsonl");
        let mut f = std::fs::File::create(&p).unwrap();
        for l in [
            r#"{"kind":"llm","ts_ms":1000,"user":"alice","channel":"c1","verdict":"forwarded","input_tokens":10,"output_tokens":5}"#,
            r#"{"kind":"llm","ts_ms":5000,"user":"alice","channel":"c2","verdict":"forwarded","input_tokens":1,"output_tokens":2,"cache_read_input_tokens":3}"#,
            r#"{"kind":"llm","ts_ms":6000,"user":"alice","channel":"c2","verdict":"denied"}"#,
            r#"{"kind":"llm","ts_ms":7000,"channel":"c1","verdict":"forwarded","input_tokens":100}"#,
            r#"{"kind":"connect","ts_ms":7000,"user":"alice","input_tokens":999}"#,
            "not json",
        ] {
            writeln!(f, "{l}").unwrap();
        }
        drop(f);
        let u = totals(&p, 0, true).unwrap();
        assert_eq!(
            u["alice"],
            Row {
                calls: 3,
                refused: 1,
                input: 11,
                output: 7,
                cache: 3
            }
        );
        assert_eq!(u["(none)"].input, 100);
        let c = totals(&p, 5000, false).unwrap();
        assert_eq!(c.keys().collect::<Vec<_>>(), ["c1", "c2"]);
        assert_eq!((c["c2"].calls, c["c2"].tokens()), (2, 6));
        assert_eq!(c["c1"].tokens(), 100);
        assert_eq!(parse_since("7d").unwrap(), Duration::from_secs(604_800));
        assert_eq!(parse_since("90m").unwrap(), Duration::from_secs(5400));
        assert!(parse_since("x").unwrap_err().contains("--since"));
    }
}
