//! GitHub webhook deliveries (`POST /github/webhook`): the signature check
//! (`X-Hub-Signature-256`, HMAC-SHA256 of the raw body with the webhook
//! secret, compared in constant time before anything is parsed) and the few
//! pull-request events moat tells a conversation about, reduced to what
//! finds the conversation (repository, pull request number, branch) and one
//! short line.
//!
//! Must never: parse a body whose signature did not verify, put the secret
//! or a body into an error, or take a conversation from text in the event
//! (only the repository, number and branch moat stored decide).

use ring::hmac;
use serde_json::Value;

use moat_creds::Secret;

/// Largest delivery read (GitHub caps payloads at 25 MB).
pub const MAX_BODY: usize = 25 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    #[error("no X-Hub-Signature-256 header")]
    MissingSignature,
    #[error("the signature does not match the body")]
    Mismatch,
    #[error("the body is not a JSON object")]
    NotJson,
}

/// The webhook secret, prepared once.
#[derive(Clone)]
pub struct WebhookVerifier {
    key: hmac::Key,
}

impl std::fmt::Debug for WebhookVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookVerifier(<redacted>)")
    }
}

fn hex32(s: &[u8]) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in s.chunks(2).enumerate() {
        let d = |c: u8| (c as char).to_digit(16).map(|v| v as u8);
        out[i] = d(pair[0])? << 4 | d(pair[1])?;
    }
    Some(out)
}

impl WebhookVerifier {
    pub fn new(secret: &Secret) -> WebhookVerifier {
        WebhookVerifier {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret.expose().as_bytes()),
        }
    }

    /// Checks `sha256=<hex>` against the raw body (constant time).
    pub fn verify(&self, signature: Option<&[u8]>, raw_body: &[u8]) -> Result<(), WebhookError> {
        let sig = signature.ok_or(WebhookError::MissingSignature)?;
        let tag = sig
            .strip_prefix(b"sha256=")
            .and_then(hex32)
            .ok_or(WebhookError::Mismatch)?;
        hmac::verify(&self.key, raw_body, &tag).map_err(|_| WebhookError::Mismatch)
    }
}

/// The `X-Hub-Signature-256` value for `body` (for tests and fakes).
pub fn sign(secret: &str, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    let tag = hmac::sign(&key, body);
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

/// A delivery moat may tell a conversation about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrEvent {
    /// `owner/name`, lower case.
    pub repo: String,
    /// The pull request, when the event names one.
    pub number: Option<u64>,
    /// The head branch, when the event names one (check suites name only it).
    pub branch: Option<String>,
    /// One line for the conversation.
    pub line: String,
    /// A comment on the pull request: who wrote it (GitHub login) and its
    /// whole text, for a turn when it mentions the bot.
    pub comment: Option<(String, String)>,
}

fn s<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_str()
}

fn n(v: &Value, path: &[&str]) -> Option<u64> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_u64()
}

/// Text from an event, for one line: control characters out, bounded.
fn clean(t: &str, max: usize) -> String {
    let one: String = t
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(max)
        .collect();
    one.trim().to_string()
}

/// A comment on pull request `number_at`: one line, and the whole text.
fn comment_on(v: &Value, repo: &str, number_at: &[&str]) -> Option<PrEvent> {
    let who = clean(s(v, &["comment", "user", "login"]).unwrap_or("someone"), 40);
    let raw = s(v, &["comment", "body"]).unwrap_or("");
    let body = clean(raw, 200);
    n(v, number_at).map(|number| PrEvent {
        repo: repo.to_string(),
        number: Some(number),
        branch: None,
        line: format!("GitHub: {who} commented on pull request #{number}: {body}"),
        comment: Some((who, raw.chars().take(20_000).collect())),
    })
}

/// Whether `text` mentions `login` (`@login`, not part of a longer name).
pub fn mentions(text: &str, login: &str) -> bool {
    let needle = format!("@{}", login.to_ascii_lowercase());
    let lower = text.to_ascii_lowercase();
    lower.match_indices(&needle).any(|(i, _)| {
        let before_ok = i == 0 || !lower.as_bytes()[i - 1].is_ascii_alphanumeric();
        let after = lower.as_bytes().get(i + needle.len()).copied();
        let after_ok = after.is_none_or(|c| !(c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
        before_ok && after_ok
    })
}

/// The event (`X-GitHub-Event`) and its verified body, reduced; `Ok(None)`:
/// an event or action moat does not tell anyone about.
pub fn parse(event: &str, body: &[u8]) -> Result<Option<PrEvent>, WebhookError> {
    let v: Value = serde_json::from_slice(body).map_err(|_| WebhookError::NotJson)?;
    if !v.is_object() {
        return Err(WebhookError::NotJson);
    }
    let Some(repo) = s(&v, &["repository", "full_name"]) else {
        return Ok(None);
    };
    let repo = repo.to_ascii_lowercase();
    let action = s(&v, &["action"]).unwrap_or("");
    let pr_line = |what: &str| -> Option<PrEvent> {
        let number = n(&v, &["pull_request", "number"])?;
        let title = clean(s(&v, &["pull_request", "title"]).unwrap_or(""), 80);
        Some(PrEvent {
            repo: repo.clone(),
            number: Some(number),
            branch: s(&v, &["pull_request", "head", "ref"]).map(|b| clean(b, 200)),
            line: format!("GitHub: pull request #{number} ({title}) {what}"),
            comment: None,
        })
    };
    let ev = match (event, action) {
        ("pull_request", "opened") => pr_line("was opened"),
        ("pull_request", "reopened") => pr_line("was reopened"),
        ("pull_request", "closed") => {
            if v["pull_request"]["merged"].as_bool() == Some(true) {
                pr_line("was merged")
            } else {
                pr_line("was closed without merging")
            }
        }
        ("pull_request_review", "submitted") => {
            let who = clean(s(&v, &["review", "user", "login"]).unwrap_or("someone"), 40);
            let state = match s(&v, &["review", "state"]).unwrap_or("") {
                "approved" => "approved".to_string(),
                "changes_requested" => "requested changes on".to_string(),
                _ => "reviewed".to_string(),
            };
            n(&v, &["pull_request", "number"]).map(|number| PrEvent {
                repo: repo.clone(),
                number: Some(number),
                branch: s(&v, &["pull_request", "head", "ref"]).map(|b| clean(b, 200)),
                line: format!("GitHub: {who} {state} pull request #{number}"),
                comment: s(&v, &["review", "body"])
                    .filter(|b| !b.is_empty())
                    .map(|b| (who.clone(), b.chars().take(20_000).collect())),
            })
        }
        ("check_suite", "completed") | ("check_run", "completed") => {
            let key = if event == "check_suite" {
                "check_suite"
            } else {
                "check_run"
            };
            let conclusion = clean(s(&v, &[key, "conclusion"]).unwrap_or("unknown"), 30);
            let name = if event == "check_run" {
                clean(s(&v, &["check_run", "name"]).unwrap_or("a check"), 60)
            } else {
                "checks".to_string()
            };
            let branch = s(&v, &[key, "head_branch"])
                .or_else(|| s(&v, &["check_run", "check_suite", "head_branch"]))
                .map(|b| clean(b, 200));
            let number = v[key]["pull_requests"]
                .as_array()
                .and_then(|a| a.first())
                .and_then(|p| p["number"].as_u64());
            (branch.is_some() || number.is_some()).then(|| PrEvent {
                repo: repo.clone(),
                number,
                branch: branch.clone(),
                line: format!(
                    "GitHub: {name} on {} finished: {conclusion}",
                    branch.as_deref().unwrap_or("the pull request")
                ),
                comment: None,
            })
        }
        ("issue_comment", "created") if v["issue"].get("pull_request").is_some() => {
            comment_on(&v, &repo, &["issue", "number"])
        }
        ("pull_request_review_comment", "created") => {
            comment_on(&v, &repo, &["pull_request", "number"])
        }
        _ => None,
    };
    Ok(ev)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn signatures_are_checked_on_the_raw_body() {
        let v = WebhookVerifier::new(&Secret::new("s3cret"));
        let body = br#"{"zen":"x"}"#;
        let good = sign("s3cret", body);
        assert_eq!(v.verify(Some(good.as_bytes()), body), Ok(()));
        assert_eq!(v.verify(None, body), Err(WebhookError::MissingSignature));
        assert_eq!(
            v.verify(Some(sign("other", body).as_bytes()), body),
            Err(WebhookError::Mismatch)
        );
        assert_eq!(
            v.verify(Some(good.as_bytes()), br#"{"zen":"y"}"#),
            Err(WebhookError::Mismatch)
        );
        assert_eq!(
            v.verify(Some(b"sha256=zz"), body),
            Err(WebhookError::Mismatch)
        );
        assert_eq!(
            v.verify(Some(good.replace("sha256=", "sha1=").as_bytes()), body),
            Err(WebhookError::Mismatch)
        );
    }

    #[test]
    fn pull_request_events_become_one_line() {
        let b = json!({"action": "closed", "repository": {"full_name": "Acme/App"},
            "pull_request": {"number": 7, "title": "fix\nlogin", "merged": true, "head": {"ref": "moat/1-fix"}}})
        .to_string();
        let e = parse("pull_request", b.as_bytes()).unwrap().unwrap();
        assert_eq!(e.repo, "acme/app");
        assert_eq!(e.number, Some(7));
        assert_eq!(e.branch.as_deref(), Some("moat/1-fix"));
        assert_eq!(e.line, "GitHub: pull request #7 (fix login) was merged");
        let b = json!({"action": "completed", "repository": {"full_name": "acme/app"},
            "check_suite": {"conclusion": "failure", "head_branch": "moat/1-fix", "pull_requests": []}})
        .to_string();
        let e = parse("check_suite", b.as_bytes()).unwrap().unwrap();
        assert_eq!(e.line, "GitHub: checks on moat/1-fix finished: failure");
        assert_eq!(parse("push", b.as_bytes()).unwrap(), None);
        assert_eq!(parse("pull_request", b"[1]"), Err(WebhookError::NotJson));
        let b = json!({"action": "created", "repository": {"full_name": "acme/app"},
            "issue": {"number": 7, "pull_request": {}},
            "comment": {"user": {"login": "octocat"}, "body": "@moat-bot please fix the test"}})
        .to_string();
        let e = parse("issue_comment", b.as_bytes()).unwrap().unwrap();
        assert_eq!(
            e.comment,
            Some(("octocat".into(), "@moat-bot please fix the test".into()))
        );
        assert_eq!(e.number, Some(7));
    }

    #[test]
    fn mentions_are_whole_logins() {
        assert!(mentions("@moat-bot fix it", "moat-bot"));
        assert!(mentions("hey @Moat-Bot, fix it", "moat-bot"));
        assert!(!mentions("@moat-bot2 fix it", "moat-bot"));
        assert!(!mentions("mail@moat-bot.dev", "moat-bot"));
        assert!(!mentions("moat-bot fix it", "moat-bot"));
    }
}
