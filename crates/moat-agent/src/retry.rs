//! When a failed model call is tried again, and how long to wait first.
//!
//! Retried: HTTP 429 (rate limited), any 5xx (529 is Anthropic's
//! "overloaded"), and any answer whose error type is `overloaded_error`, at
//! most [`RetryPolicy::delays`]`.len()` times, waiting the policy's backoff
//! or the upstream's `retry-after` (seconds or an HTTP date) when it sends
//! one. Not retried: every other 4xx, a `retry-after` longer than the
//! policy's cap (the wait would hold the turn for too long; the error says
//! so), and the door's own refusals (their message starts with `moat:`:
//! a spent token budget, a model not allowed), except the door's "the
//! upstream could not be reached".
//!
//! Must never: retry a refusal of moat's door (a retry could not change
//! it, and the budget is the operator's limit), or wait longer than the cap.

use std::time::{Duration, SystemTime};

use crate::model::ModelError;

/// How failed model calls are retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The wait before each retry, in order; its length is the number of
    /// retries (so a call is made at most `delays.len() + 1` times).
    pub delays: Vec<Duration>,
    /// The longest `retry-after` honoured; a longer one is not retried.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    /// Two retries, after 1 s and 4 s; `retry-after` up to 30 s.
    fn default() -> RetryPolicy {
        RetryPolicy {
            delays: vec![Duration::from_secs(1), Duration::from_secs(4)],
            max_retry_after: Duration::from_secs(30),
        }
    }
}

/// What to do after a failed call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Wait, then call again; `status` is the line for the user.
    Retry { wait: Duration, status: String },
    /// Give up; `note` (if any) is added to the error (why it was not retried).
    Stop { note: Option<String> },
}

/// Judges the failure of the call made after `retried` retries.
pub fn judge(err: &ModelError, retried: usize, policy: &RetryPolicy, now: SystemTime) -> Verdict {
    let ModelError::Status {
        status,
        message,
        kind,
        retry_after,
    } = err
    else {
        return Verdict::Stop { note: None };
    };
    let overloaded = *status == 529 || kind.as_deref() == Some("overloaded_error");
    let transient = *status == 429 || (500..=599).contains(status) || overloaded;
    if !transient || from_the_door(message) {
        return Verdict::Stop { note: None };
    }
    let Some(backoff) = policy.delays.get(retried) else {
        let attempts = retried + 1;
        return Verdict::Stop {
            note: Some(format!("gave up after {attempts} attempts")),
        };
    };
    let wait = match retry_after
        .as_deref()
        .and_then(|v| parse_retry_after(v, now))
    {
        Some(w) if w > policy.max_retry_after => {
            return Verdict::Stop {
                note: Some(format!(
                    "not retried: the API asked to wait {} s, longer than moat waits ({} s)",
                    w.as_secs(),
                    policy.max_retry_after.as_secs()
                )),
            };
        }
        Some(w) => w,
        None => *backoff,
    };
    let what = if overloaded {
        format!("the model is overloaded (HTTP {status})")
    } else if *status == 429 {
        "the model API is rate limiting (HTTP 429)".to_string()
    } else {
        format!("the model API failed (HTTP {status})")
    };
    Verdict::Retry {
        wait,
        status: format!(
            "{what}; retrying in {} ({} of {})",
            seconds(wait),
            retried + 1,
            policy.delays.len()
        ),
    }
}

/// An answer moat's door made itself (its refusals say `moat: …`); only
/// "the upstream could not be reached" may pass with time.
fn from_the_door(message: &str) -> bool {
    message.starts_with("moat:") && !message.contains("could not be reached")
}

/// `retry-after`: delay-seconds or an HTTP date (a past date is no wait).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// "4 s", "1.5 s", "250 ms".
fn seconds(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{} ms", d.as_millis())
    } else if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(status: u16, kind: Option<&str>, message: &str, after: Option<&str>) -> ModelError {
        ModelError::Status {
            status,
            message: message.into(),
            kind: kind.map(str::to_string),
            retry_after: after.map(str::to_string),
        }
    }

    #[test]
    fn overloaded_rate_limited_and_5xx_are_retried_twice() {
        let p = RetryPolicy::default();
        let now = SystemTime::now();
        let e = status(529, Some("overloaded_error"), "Overloaded", None);
        assert_eq!(
            judge(&e, 0, &p, now),
            Verdict::Retry {
                wait: Duration::from_secs(1),
                status: "the model is overloaded (HTTP 529); retrying in 1 s (1 of 2)".into()
            }
        );
        assert_eq!(
            judge(&e, 1, &p, now),
            Verdict::Retry {
                wait: Duration::from_secs(4),
                status: "the model is overloaded (HTTP 529); retrying in 4 s (2 of 2)".into()
            }
        );
        assert_eq!(
            judge(&e, 2, &p, now),
            Verdict::Stop {
                note: Some("gave up after 3 attempts".into())
            }
        );
        // Overloaded by its type, whatever the status.
        let e = status(503, Some("overloaded_error"), "x", None);
        assert!(
            matches!(judge(&e, 0, &p, now), Verdict::Retry { status, .. } if status.starts_with("the model is overloaded (HTTP 503)"))
        );
        for s in [429, 500, 502, 503, 504] {
            assert!(matches!(
                judge(&status(s, None, "x", None), 0, &p, now),
                Verdict::Retry { .. }
            ));
        }
    }

    #[test]
    fn other_errors_are_not_retried() {
        let p = RetryPolicy::default();
        let now = SystemTime::now();
        for s in [400, 401, 403, 404, 413, 422] {
            assert_eq!(
                judge(&status(s, None, "x", None), 0, &p, now),
                Verdict::Stop { note: None },
                "{s}"
            );
        }
        // The door's budget refusal (a 429 of its own) is final.
        let budget = status(
            429,
            Some("rate_limit_error"),
            "moat: this sandbox's token budget is spent (50 of 50 tokens used)",
            None,
        );
        assert_eq!(judge(&budget, 0, &p, now), Verdict::Stop { note: None });
        // The door's "could not reach the upstream" may pass.
        let down = status(
            502,
            Some("api_error"),
            "moat: the upstream api.anthropic.com:443 could not be reached: refused",
            None,
        );
        assert!(matches!(judge(&down, 0, &p, now), Verdict::Retry { .. }));
        // Not an HTTP status at all.
        let e = ModelError::Parse("no".into());
        assert_eq!(judge(&e, 0, &p, now), Verdict::Stop { note: None });
    }

    #[test]
    fn retry_after_is_honoured_up_to_the_cap() {
        let p = RetryPolicy::default();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let e = status(429, Some("rate_limit_error"), "slow down", Some("7"));
        assert_eq!(
            judge(&e, 0, &p, now),
            Verdict::Retry {
                wait: Duration::from_secs(7),
                status: "the model API is rate limiting (HTTP 429); retrying in 7 s (1 of 2)"
                    .into()
            }
        );
        let date = httpdate::fmt_http_date(now + Duration::from_secs(12));
        assert_eq!(parse_retry_after(&date, now), Some(Duration::from_secs(12)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(12));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        // An unreadable value falls back to the backoff.
        let e = status(500, None, "x", Some("soon"));
        assert!(
            matches!(judge(&e, 1, &p, now), Verdict::Retry { wait, .. } if wait == Duration::from_secs(4))
        );
        // Longer than the cap: not retried, and the error says why.
        let e = status(429, None, "slow down", Some("120"));
        assert_eq!(
            judge(&e, 0, &p, now),
            Verdict::Stop {
                note: Some(
                    "not retried: the API asked to wait 120 s, longer than moat waits (30 s)"
                        .into()
                )
            }
        );
    }
}
