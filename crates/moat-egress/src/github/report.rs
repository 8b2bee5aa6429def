//! What GitHub answered to a push and to a pull request opened over GraphQL,
//! read by the door for its own record of a turn (`GithubActivity`).
//!
//! Owns: reading git's report-status (`unpack ok|<error>`, then `ok <ref>` or
//! `ng <ref> <reason>` per ref, inside side band 1 when the client asked for
//! one) so that a ref GitHub refused inside an HTTP 200 is never told as
//! pushed; and finding the pull request `gh pr create` opened in the answer
//! to a `createPullRequest` mutation.
//! Must never: let a ref name or reason from the answer forge a line of
//! moat's record (only plain ref names and one printable line of a bounded
//! reason come out), or fail a push whose answer it cannot read (the caller
//! then tells the refs as sent, without GitHub's verdict).

use bytes::BytesMut;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::Value;

use super::proxy::{full, plain_name, GhBody};
use super::push::Prefixed;

/// Longest reason kept from an `ng` line or an unpack error.
const MAX_REASON: usize = 200;
/// Largest push answer read whole for its report-status (a report and
/// GitHub's progress lines are a few kilobytes); past it the answer is
/// handed on as it comes and the refs are told without GitHub's verdict.
const MAX_PUSH_ANSWER: usize = 1024 * 1024;

/// Reads GitHub's answer to a push before handing it on: the same bytes
/// for git, and the report-status in them when there is a complete one.
pub(super) async fn read_push_answer(
    mut body: Incoming,
    sideband: bool,
    plain: impl Fn(&str) -> bool,
) -> (GhBody, Option<PushReport>) {
    let mut buf = BytesMut::new();
    loop {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Some(d) = frame.data_ref() {
                    buf.extend_from_slice(d);
                }
                if buf.len() > MAX_PUSH_ANSWER {
                    let rest = Prefixed {
                        first: Some(buf.freeze()),
                        rest: Some(body),
                    };
                    return (rest.boxed(), None);
                }
            }
            // A broken answer goes on as far as it came: git reports it.
            Some(Err(e)) => {
                tracing::warn!(error = %e, "GitHub's answer to a push broke off");
                return (full(buf.freeze()), None);
            }
            None => {
                let report = parse_push_report(&buf, sideband, plain);
                return (full(buf.freeze()), report);
            }
        }
    }
}

/// GitHub's verdict on one push, from its report-status.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct PushReport {
    /// Refs GitHub updated (`ok <ref>`).
    pub(crate) accepted: Vec<String>,
    /// Refs GitHub refused, each with its reason (`ng <ref> <reason>`, or
    /// every ref when the pack could not be unpacked).
    pub(crate) rejected: Vec<(String, String)>,
}

/// One pkt-line: `Some(payload)`, `None` for a flush (or delimiter), or an
/// error when the bytes are not pkt-lines.
fn packets(buf: &[u8]) -> Result<Vec<Option<&[u8]>>, ()> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < buf.len() {
        let len = buf
            .get(i..i + 4)
            .and_then(|h| std::str::from_utf8(h).ok())
            .filter(|s| s.bytes().all(|b| b.is_ascii_hexdigit()))
            .and_then(|s| usize::from_str_radix(s, 16).ok())
            .ok_or(())?;
        if len < 4 {
            out.push(None);
            i += 4;
            continue;
        }
        out.push(Some(buf.get(i + 4..i + len).ok_or(())?));
        i += len;
    }
    Ok(out)
}

/// A reason as it may appear in moat's record: one printable line, bounded.
fn plain_reason(raw: &[u8]) -> String {
    let s: String = String::from_utf8_lossy(raw)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_REASON)
        .collect();
    let s = s.trim();
    if s.is_empty() {
        "no reason given".to_string()
    } else {
        s.to_string()
    }
}

/// Reads a receive-pack answer. `sideband`: the client asked for
/// `side-band`/`side-band-64k`, so the report travels in band 1. `None` when
/// the answer holds no complete report-status. Ref names are kept only when
/// `plain` accepts them.
pub(crate) fn parse_push_report(
    answer: &[u8],
    sideband: bool,
    plain: impl Fn(&str) -> bool,
) -> Option<PushReport> {
    let joined;
    let report: &[u8] = if sideband {
        let mut band1 = Vec::new();
        for p in packets(answer).ok()?.into_iter().flatten() {
            if let Some((1, data)) = p.split_first() {
                band1.extend_from_slice(data);
            }
        }
        joined = band1;
        &joined
    } else {
        answer
    };
    let lines = packets(report).ok()?;
    let mut out = PushReport::default();
    let mut unpack_error: Option<String> = None;
    let mut saw_unpack = false;
    let mut complete = false;
    for p in lines {
        let Some(line) = p else {
            complete = saw_unpack;
            break;
        };
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        if let Some(rest) = line.strip_prefix(b"unpack ") {
            saw_unpack = true;
            if rest != b"ok" {
                unpack_error = Some(plain_reason(rest));
            }
        } else if let Some(r) = line.strip_prefix(b"ok ") {
            let r = String::from_utf8_lossy(r).into_owned();
            if plain(&r) {
                out.accepted.push(r);
            }
        } else if let Some(rest) = line.strip_prefix(b"ng ") {
            let mut it = rest.splitn(2, |b| *b == b' ');
            let r = String::from_utf8_lossy(it.next().unwrap_or_default()).into_owned();
            let why = plain_reason(it.next().unwrap_or_default());
            if plain(&r) {
                out.rejected.push((r, why));
            }
        }
        // `option ...` lines (report-status-v2) qualify the ref before them.
    }
    if !complete {
        return None;
    }
    if let Some(why) = unpack_error {
        let why = format!("GitHub could not unpack the push: {why}");
        let all: Vec<String> = out.accepted.drain(..).collect();
        out.rejected
            .extend(all.into_iter().map(|r| (r, why.clone())));
    }
    Some(out)
}

/// Whether a GraphQL request body (one document or a batch) opens a pull
/// request.
pub(crate) fn graphql_opens_pr(doc: &Value) -> bool {
    let one = |d: &Value| {
        d.get("query")
            .and_then(Value::as_str)
            .is_some_and(|q| q.to_ascii_lowercase().contains("createpullrequest"))
    };
    match doc {
        Value::Array(batch) => batch.iter().any(one),
        d => one(d),
    }
}

/// The pull requests in GitHub's answer to `createPullRequest`:
/// `(owner/name, number, url)` from each `pullRequest.url` under the web
/// host `web_base` (`https://github.com`), the number from the link's path
/// (gh asks only for `id` and `url`).
pub(crate) fn graphql_opened_prs(answer: &Value, web_base: &str) -> Vec<(String, u64, String)> {
    let docs: Vec<&Value> = match answer {
        Value::Array(b) => b.iter().collect(),
        d => vec![d],
    };
    let mut out = Vec::new();
    for d in docs {
        let Some(url) = d
            .pointer("/data/createPullRequest/pullRequest/url")
            .and_then(Value::as_str)
        else {
            continue;
        };
        if url.len() > 500 || url.chars().any(char::is_control) {
            continue;
        }
        let Some(path) = url.strip_prefix(web_base.trim_end_matches('/')) else {
            continue;
        };
        let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let [owner, name, "pull", n] = segs.as_slice() else {
            continue;
        };
        if let (true, Ok(number)) = (plain_name(owner) && plain_name(name), n.parse::<u64>()) {
            out.push((format!("{owner}/{name}"), number, url.to_string()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::push::pkt;
    use super::*;
    use serde_json::json;

    fn plain(r: &str) -> bool {
        r.starts_with("refs/") && !r.contains(char::is_whitespace)
    }

    fn report(lines: &[&str]) -> Vec<u8> {
        let mut v = Vec::new();
        for l in lines {
            v.extend(pkt(format!("{l}\n").as_bytes()));
        }
        v.extend_from_slice(b"0000");
        v
    }

    fn banded(inner: &[u8]) -> Vec<u8> {
        let mut v = pkt(b"\x02Resolving deltas: 100% (1/1)\n");
        for c in inner.chunks(7) {
            let mut p = vec![1u8];
            p.extend_from_slice(c);
            v.extend(pkt(&p));
        }
        v.extend_from_slice(b"0000");
        v
    }

    #[test]
    fn accepted_and_refused_refs_are_told_apart() {
        let r = report(&[
            "unpack ok",
            "ok refs/heads/moat/1-fix",
            "ng refs/heads/other non-fast-forward",
        ]);
        let want = PushReport {
            accepted: vec!["refs/heads/moat/1-fix".into()],
            rejected: vec![("refs/heads/other".into(), "non-fast-forward".into())],
        };
        assert_eq!(parse_push_report(&r, false, plain), Some(want));
        // The same inside side band 1, split across packets, with progress.
        let b = banded(&r);
        let got = parse_push_report(&b, true, plain).expect("a report");
        assert_eq!(got.accepted, ["refs/heads/moat/1-fix"]);
        assert_eq!(got.rejected.len(), 1);
    }

    #[test]
    fn a_failed_unpack_refuses_every_ref() {
        let r = report(&["unpack index-pack abnormal exit", "ok refs/heads/a"]);
        let got = parse_push_report(&r, false, plain).expect("a report");
        assert!(got.accepted.is_empty());
        assert_eq!(got.rejected[0].0, "refs/heads/a");
        assert!(got.rejected[0].1.contains("index-pack abnormal exit"));
    }

    #[test]
    fn attack_g4_a_refusal_reason_cannot_forge_lines_of_moats_record() {
        let r = report(&[
            "unpack ok",
            "ng refs/heads/a x\r- opened pull request #9 in o/r: https://evil",
        ]);
        let got = parse_push_report(&r, false, plain).expect("a report");
        assert!(!got.rejected[0].1.contains('\r') && !got.rejected[0].1.contains('\n'));
        let long = format!("ng refs/heads/a {}", "y".repeat(5000));
        let r = report(&["unpack ok", &long]);
        let got = parse_push_report(&r, false, plain).expect("a report");
        assert_eq!(got.rejected[0].1.len(), MAX_REASON);
        // A ref name that is not plain never comes out.
        let r = report(&["unpack ok", "ok heads/x y"]);
        assert_eq!(
            parse_push_report(&r, false, plain),
            Some(PushReport::default())
        );
    }

    #[test]
    fn incomplete_or_garbled_answers_give_none() {
        let r = report(&["unpack ok", "ok refs/heads/a"]);
        assert_eq!(parse_push_report(&r[..r.len() - 4], false, plain), None);
        assert_eq!(parse_push_report(b"zzzz", false, plain), None);
        assert_eq!(parse_push_report(b"", false, plain), None);
        assert_eq!(parse_push_report(b"00ffshort", false, plain), None);
        // A flush before any `unpack` line is not a report.
        assert_eq!(parse_push_report(b"0000", false, plain), None);
    }

    #[test]
    fn graphql_pull_requests_are_found_by_their_link() {
        let q = json!({"query": "mutation PullRequestCreate($input: CreatePullRequestInput!) { createPullRequest(input: $input) { pullRequest { id url } } }"});
        assert!(graphql_opens_pr(&q));
        assert!(!graphql_opens_pr(
            &json!({"query": "query { viewer { login } }"})
        ));
        let a = json!({"data": {"createPullRequest": {"pullRequest": {"id": "PR_1", "url": "https://github.com/acme/app/pull/7"}}}});
        assert_eq!(
            graphql_opened_prs(&a, "https://github.com/"),
            vec![(
                "acme/app".to_string(),
                7,
                "https://github.com/acme/app/pull/7".to_string()
            )]
        );
        // A link elsewhere, or not to a pull request, is not recorded.
        let other = json!({"data": {"createPullRequest": {"pullRequest": {"url": "https://evil.example/acme/app/pull/7"}}}});
        assert!(graphql_opened_prs(&other, "https://github.com").is_empty());
        let issue = json!({"data": {"createPullRequest": {"pullRequest": {"url": "https://github.com/acme/app/issues/7"}}}});
        assert!(graphql_opened_prs(&issue, "https://github.com").is_empty());
        assert!(graphql_opened_prs(&json!({"errors": []}), "https://github.com").is_empty());
    }
}
