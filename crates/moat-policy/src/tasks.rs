//! Scheduled tasks as data (docs/tasks.md): the `[tasks]` and `[ipc]`
//! sections, and a task's schedule (`cron`, `interval` or `once`) parsed and
//! checked against the minimum interval, with the next run computed in UTC.
//!
//! Owns: what a valid schedule is and when it runs next. Must never: read a
//! clock (callers pass `now`), accept a schedule that runs more often than
//! `min_interval`, or panic on any input.

use std::time::Duration;

use serde::Deserialize;

use crate::gateway::Rate;
use crate::PolicyError;

/// `[tasks]`: limits on what agents and people may schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TasksConfig {
    /// No task runs more often than this (`min_interval`, default 5m).
    pub min_interval: Duration,
    /// Active (not cancelled) tasks one channel may have (`max_per_channel`).
    pub max_per_channel: u32,
}

impl Default for TasksConfig {
    fn default() -> Self {
        TasksConfig {
            min_interval: Duration::from_secs(300),
            max_per_channel: 20,
        }
    }
}

/// `[ipc]`: the agent's endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpcConfig {
    /// Calls one lease may make (`rate`, default "20/sec").
    pub rate: Rate,
}

impl Default for IpcConfig {
    fn default() -> Self {
        #[allow(clippy::unwrap_used, reason = "a constant that parses")]
        IpcConfig {
            rate: Rate::parse("20/sec").unwrap(),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTasks {
    min_interval: Option<String>,
    max_per_channel: Option<i64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawIpc {
    rate: Option<String>,
}

fn invalid(key: &str, message: String) -> PolicyError {
    PolicyError::Invalid {
        key: key.into(),
        message,
    }
}

pub(crate) fn tasks_config(raw: RawTasks) -> Result<TasksConfig, PolicyError> {
    let mut c = TasksConfig::default();
    if let Some(m) = raw.min_interval {
        c.min_interval = crate::parse_duration(&m).map_err(|e| invalid("tasks.min_interval", e))?;
        if c.min_interval < Duration::from_secs(60) {
            return Err(invalid(
                "tasks.min_interval",
                format!(
                    "{m:?} is below one minute, the scheduler's resolution; use \"1m\" or more"
                ),
            ));
        }
    }
    if let Some(n) = raw.max_per_channel {
        c.max_per_channel = u32::try_from(n)
            .ok()
            .filter(|n| (1..=10_000).contains(n))
            .ok_or_else(|| {
                invalid(
                    "tasks.max_per_channel",
                    format!("{n} is out of range; use 1 to 10000"),
                )
            })?;
    }
    Ok(c)
}

pub(crate) fn ipc_config(raw: RawIpc) -> Result<IpcConfig, PolicyError> {
    let mut c = IpcConfig::default();
    if let Some(r) = raw.rate {
        c.rate = Rate::parse(&r).map_err(|e| invalid("ipc.rate", e))?;
    }
    Ok(c)
}

/// When a task runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Schedule {
    /// A five-field cron expression (minute hour day-of-month month
    /// day-of-week), in UTC.
    Cron(Cron),
    /// Every this long, from the time it was scheduled.
    Every(Duration),
    /// Once, at this time (ms since the epoch).
    Once(i64),
}

impl Schedule {
    /// Parses a schedule of `kind` (`cron`, `interval` or `once`); the error
    /// names what is wrong and how to write it.
    pub fn parse(kind: &str, value: &str) -> Result<Schedule, String> {
        match kind {
            "cron" => Cron::parse(value).map(Schedule::Cron),
            "interval" => crate::parse_duration(value).map(Schedule::Every),
            "once" => parse_utc(value).map(Schedule::Once),
            other => Err(format!(
                "unknown schedule kind {other:?}; use \"cron\", \"interval\" or \"once\""
            )),
        }
    }

    /// Refuses a schedule that runs more often than `min` (a `once` runs
    /// once; a cron expression is checked over its next runs).
    pub fn check_min_interval(&self, min: Duration, now_ms: i64) -> Result<(), String> {
        let min_ms = min.as_millis() as i64;
        match self {
            Schedule::Once(_) => Ok(()),
            Schedule::Every(d) if d.as_millis() as i64 >= min_ms => Ok(()),
            Schedule::Every(d) => Err(format!(
                "an interval of {}s is below the minimum of {}s (tasks.min_interval)",
                d.as_secs(),
                min.as_secs()
            )),
            Schedule::Cron(c) => {
                let mut t = now_ms;
                let mut prev: Option<i64> = None;
                for _ in 0..64 {
                    let Some(n) = c.next_after(t) else { break };
                    if let Some(p) = prev {
                        if n - p < min_ms {
                            return Err(format!(
                                "this cron expression runs {}s apart, below the minimum of {}s (tasks.min_interval)",
                                (n - p) / 1000,
                                min.as_secs()
                            ));
                        }
                    }
                    prev = Some(n);
                    t = n;
                }
                Ok(())
            }
        }
    }

    /// The first run strictly after `after_ms`; `created_ms` anchors
    /// intervals. `None`: it never runs again.
    pub fn next_after(&self, after_ms: i64, created_ms: i64) -> Option<i64> {
        match self {
            Schedule::Once(t) => (*t > after_ms).then_some(*t),
            Schedule::Every(d) => {
                let step = (d.as_millis() as i64).max(1);
                if after_ms < created_ms {
                    return Some(created_ms + step);
                }
                let k = (after_ms - created_ms) / step + 1;
                Some(created_ms + k * step)
            }
            Schedule::Cron(c) => c.next_after(after_ms),
        }
    }
}

/// A parsed cron expression: the allowed values of each field as bit sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    minutes: u64,
    hours: u64,
    days: u64,
    months: u64,
    weekdays: u64,
    /// Both day fields restricted: a day matches either (cron's rule).
    day_or: bool,
}

const FIELDS: [(&str, u32, u32); 5] = [
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day of month", 1, 31),
    ("month", 1, 12),
    ("day of week", 0, 7),
];

impl Cron {
    /// Parses `m h dom mon dow`: numbers, `*`, lists `a,b`, ranges `a-b`
    /// and steps `*/n` or `a-b/n`; day of week 0 or 7 is Sunday.
    pub fn parse(text: &str) -> Result<Cron, String> {
        let parts: Vec<&str> = text.split_whitespace().collect();
        if parts.len() != 5 {
            return Err(format!(
                "{text:?} has {} fields; a cron expression has 5: minute hour day-of-month month day-of-week, e.g. \"0 8 * * 1-5\"",
                parts.len()
            ));
        }
        let mut sets = [0u64; 5];
        for (i, p) in parts.iter().enumerate() {
            let (name, lo, hi) = FIELDS[i];
            sets[i] = field(p, lo, hi).map_err(|e| format!("cron {name} field {p:?}: {e}"))?;
        }
        let mut weekdays = sets[4];
        if weekdays & (1 << 7) != 0 {
            weekdays = (weekdays | 1) & !(1 << 7);
        }
        Ok(Cron {
            minutes: sets[0],
            hours: sets[1],
            days: sets[2],
            months: sets[3],
            weekdays,
            day_or: parts[2] != "*" && parts[4] != "*",
        })
    }

    fn day_matches(&self, day: u32, weekday: u32) -> bool {
        let d = self.days & (1 << day) != 0;
        let w = self.weekdays & (1 << weekday) != 0;
        if self.day_or {
            d || w
        } else {
            d && w
        }
    }

    /// The first matching minute strictly after `after_ms` (within 5 years).
    pub fn next_after(&self, after_ms: i64) -> Option<i64> {
        let start_min = after_ms.div_euclid(60_000) + 1;
        let first_day = start_min.div_euclid(1440);
        let mut first_minute = start_min.rem_euclid(1440);
        for day in first_day..first_day + 366 * 5 {
            let (_, month, dom) = civil_from_days(day);
            let weekday = (day + 4).rem_euclid(7) as u32; // 1970-01-01 was a Thursday
            if self.months & (1 << month) != 0 && self.day_matches(dom, weekday) {
                for m in first_minute..1440 {
                    let (h, mi) = (m / 60, m % 60);
                    if self.hours & (1 << h) != 0 && self.minutes & (1 << mi) != 0 {
                        return Some((day * 1440 + m) * 60_000);
                    }
                }
            }
            first_minute = 0;
        }
        None
    }
}

fn num(s: &str, lo: u32, hi: u32) -> Result<u32, String> {
    s.parse::<u32>()
        .ok()
        .filter(|n| (lo..=hi).contains(n))
        .ok_or_else(|| format!("{s:?} is not a number from {lo} to {hi}"))
}

fn field(text: &str, lo: u32, hi: u32) -> Result<u64, String> {
    let mut set = 0u64;
    for item in text.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((r, s)) => (r, num(s, 1, hi.max(1))?),
            None => (item, 1),
        };
        let (a, b) = if range == "*" {
            (lo, hi)
        } else if let Some((a, b)) = range.split_once('-') {
            let (a, b) = (num(a, lo, hi)?, num(b, lo, hi)?);
            if a > b {
                return Err(format!("the range {a}-{b} runs backwards"));
            }
            (a, b)
        } else {
            let a = num(range, lo, hi)?;
            (a, if item.contains('/') { hi } else { a })
        };
        let mut v = a;
        while v <= b {
            set |= 1 << v;
            v += step;
        }
    }
    Ok(set)
}

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Parses `YYYY-MM-DDTHH:MM[:SS]Z` (UTC) into ms since the epoch.
pub fn parse_utc(text: &str) -> Result<i64, String> {
    let bad = || format!("{text:?} is not a UTC time; write e.g. \"2026-12-24T08:00:00Z\"");
    let t = text.trim().strip_suffix('Z').ok_or_else(bad)?;
    let (date, time) = t.split_once('T').ok_or_else(bad)?;
    let d: Vec<&str> = date.split('-').collect();
    let h: Vec<&str> = time.split(':').collect();
    if d.len() != 3 || !(2..=3).contains(&h.len()) {
        return Err(bad());
    }
    let p = |s: &str, lo: u32, hi: u32| num(s, lo, hi).map_err(|_| bad());
    let (y, mo, da) = (p(d[0], 1970, 9999)?, p(d[1], 1, 12)?, p(d[2], 1, 31)?);
    let (hh, mm) = (p(h[0], 0, 23)?, p(h[1], 0, 59)?);
    let ss = if h.len() == 3 { p(h[2], 0, 59)? } else { 0 };
    let days = days_from_civil(i64::from(y), mo, da);
    if civil_from_days(days) != (i64::from(y), mo, da) {
        return Err(format!("{text:?}: that day does not exist"));
    }
    Ok(((days * 24 + i64::from(hh)) * 60 + i64::from(mm)) * 60_000 + i64::from(ss) * 1000)
}

/// `ms` as `YYYY-MM-DDTHH:MM:SSZ` (what [`parse_utc`] reads).
pub fn format_utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEC7_1600: i64 = 1_796_659_200_000; // 2026-12-07T16:00:00Z (a Monday)

    #[test]
    fn utc_round_trip() {
        assert_eq!(parse_utc("2026-12-07T16:00:00Z"), Ok(DEC7_1600));
        assert_eq!(format_utc(DEC7_1600), "2026-12-07T16:00:00Z");
        assert!(parse_utc("2026-02-30T00:00:00Z")
            .unwrap_err()
            .contains("does not exist"));
        assert!(parse_utc("tomorrow").is_err());
    }

    #[test]
    fn cron_next_runs() {
        let c = Cron::parse("0 8 * * 1-5").unwrap();
        // Monday 16:00 → Tuesday 08:00.
        assert_eq!(
            format_utc(c.next_after(DEC7_1600).unwrap()),
            "2026-12-08T08:00:00Z"
        );
        let c = Cron::parse("*/15 * * * *").unwrap();
        assert_eq!(c.next_after(DEC7_1600), Some(DEC7_1600 + 15 * 60_000));
        let c = Cron::parse("30 9 1 * *").unwrap();
        assert_eq!(
            format_utc(c.next_after(DEC7_1600).unwrap()),
            "2027-01-01T09:30:00Z"
        );
        // Sunday as 7.
        let c = Cron::parse("0 0 * * 7").unwrap();
        assert_eq!(
            format_utc(c.next_after(DEC7_1600).unwrap()),
            "2026-12-13T00:00:00Z"
        );
    }

    #[test]
    fn cron_errors_name_the_field() {
        assert!(Cron::parse("* * *").unwrap_err().contains("has 3 fields"));
        let e = Cron::parse("61 * * * *").unwrap_err();
        assert!(e.contains("minute field \"61\""), "{e}");
        assert!(Cron::parse("* 5-2 * * *")
            .unwrap_err()
            .contains("backwards"));
        assert!(Cron::parse("* * * * mon")
            .unwrap_err()
            .contains("day of week"));
    }

    #[test]
    fn min_interval_is_held() {
        let min = Duration::from_secs(300);
        let every_minute = Schedule::parse("cron", "* * * * *").unwrap();
        assert!(every_minute
            .check_min_interval(min, DEC7_1600)
            .unwrap_err()
            .contains("tasks.min_interval"));
        assert!(Schedule::parse("cron", "*/5 * * * *")
            .unwrap()
            .check_min_interval(min, DEC7_1600)
            .is_ok());
        assert!(Schedule::parse("interval", "1m")
            .unwrap()
            .check_min_interval(min, DEC7_1600)
            .is_err());
        assert!(Schedule::parse("weekly", "x")
            .unwrap_err()
            .contains("unknown schedule kind"));
    }

    #[test]
    fn intervals_anchor_at_creation() {
        let s = Schedule::Every(Duration::from_secs(600));
        assert_eq!(
            s.next_after(DEC7_1600, DEC7_1600),
            Some(DEC7_1600 + 600_000)
        );
        // After a long downtime: the next one after now, not every missed one.
        assert_eq!(
            s.next_after(DEC7_1600 + 3_600_500, DEC7_1600),
            Some(DEC7_1600 + 4_200_000)
        );
        assert_eq!(Schedule::Once(5).next_after(5, 0), None);
    }

    #[test]
    fn tasks_section_keys() {
        let e = tasks_config(RawTasks {
            min_interval: Some("10s".into()),
            max_per_channel: None,
        })
        .unwrap_err();
        assert!(e.to_string().starts_with("tasks.min_interval"));
        let e = tasks_config(RawTasks {
            min_interval: None,
            max_per_channel: Some(0),
        })
        .unwrap_err();
        assert!(e.to_string().starts_with("tasks.max_per_channel"));
    }
}
