//! Push and API protection: which REST and GraphQL calls may move a
//! protected branch or change `.github/workflows/`, judged by method, the
//! %-decoded path and, where it decides, the JSON body. The git side (the
//! ref updates of a push) is in `push`.
//!
//! Must never: pass a call that updates a protected branch, or a workflow
//! change without the grant, because its path or body could not be read
//! (fail closed).

use http::Method;
use serde_json::Value;

use super::HostRole;

/// Largest JSON body read to judge a REST or GraphQL call.
pub(super) const MAX_JUDGED_BODY: usize = 64 * 1024 * 1024;
/// GraphQL mutations that move, make or delete a branch or merge into one.
const BRANCH_MUTATIONS: [&str; 9] = [
    "createcommitonbranch",
    "mergepullrequest",
    "mergebranch",
    "updateref",
    "deleteref",
    "createref",
    "enablepullrequestautomerge",
    "branchprotectionrule",
    "updatepullrequestbranch",
];

/// `%XX`-decodes a path; `None` if an escape is malformed or not UTF-8.
pub(super) fn decode_path(p: &str) -> Option<String> {
    let b = p.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Why a branch name is protected, if it is.
pub(super) fn protected_branch<'a>(protected: &'a [String], refname: &str) -> Option<&'a str> {
    let branch = refname.strip_prefix("refs/heads/").unwrap_or(refname);
    protected
        .iter()
        .find(|p| moat_policy::github::branch_matches(p, branch))
        .map(String::as_str)
}

pub(super) fn refusal_text(branch: &str) -> String {
    format!("moat: pushes to the protected branch {branch} are refused; push a feature branch and open a pull request")
}

/// What a REST or GraphQL call needs before it may pass.
pub(super) enum ApiJudgement {
    /// Passes without reading the body.
    Pass,
    /// Refused now, with this reason.
    Refuse(String),
    /// The JSON body decides.
    Body(fn(&Value, &[String]) -> Result<(), String>),
}

fn branch_field(field: &'static str) -> fn(&Value, &[String]) -> Result<(), String> {
    match field {
        "ref" => |v, p| match v.get("ref").and_then(Value::as_str) {
            Some(r) => match protected_branch(p, r) {
                Some(b) if r.starts_with("refs/heads/") => Err(refusal_text(b)),
                _ => Ok(()),
            },
            None => Ok(()),
        },
        "base" => |v, p| match v.get("base").and_then(Value::as_str) {
            Some(r) => protected_branch(p, r).map_or(Ok(()), |b| Err(refusal_text(b))),
            None => Err("moat: a merge must name its base branch".into()),
        },
        _ => |v, p| {
            match v.get("branch").and_then(Value::as_str) {
            Some(r) => protected_branch(p, r).map_or(Ok(()), |b| Err(refusal_text(b))),
            None => Err("moat: name the branch (\"branch\": ...); without one this call writes to the default branch, which may be protected".into()),
        }
        },
    }
}

const WORKFLOWS_REFUSAL: &str = "moat: changes to .github/workflows/ are refused for this channel (workflows run with the repository's secrets); an operator can grant github.permissions.workflows = \"write\"";

/// A `POST git/trees` body: refused when an entry could be, or be inside,
/// `.github/workflows` (trees are built bottom-up, so a `workflows` entry
/// of any tree counts).
fn no_workflow_tree(v: &Value, _: &[String]) -> Result<(), String> {
    let Some(entries) = v.get("tree").and_then(Value::as_array) else {
        return Err("moat: a tree must be {\"tree\": [...]}".into());
    };
    for e in entries {
        let path = e.get("path").and_then(Value::as_str).unwrap_or("");
        let lower = path.to_ascii_lowercase();
        let parts: Vec<&str> = lower.split('/').collect();
        if parts.contains(&"workflows") {
            return Err(WORKFLOWS_REFUSAL.into());
        }
    }
    Ok(())
}

/// A GraphQL body: one `{"query": ...}` object or a batch of them. Anything
/// else cannot be judged and is refused.
fn graphql_mutation(v: &Value, _: &[String]) -> Result<(), String> {
    let one = |doc: &Value| -> Result<(), String> {
        let Some(query) = doc.get("query").and_then(Value::as_str) else {
            return Err("moat: a GraphQL request must be {\"query\": \"...\"}".into());
        };
        let query = query.to_ascii_lowercase();
        for m in BRANCH_MUTATIONS {
            if query.contains(m) {
                return Err(format!("moat: the GraphQL mutation {m} can update a protected branch and is refused; use git push to a feature branch"));
            }
        }
        Ok(())
    };
    match v {
        Value::Array(batch) => batch.iter().try_for_each(one),
        doc => one(doc),
    }
}

/// Judges a REST or GraphQL call by method and (decoded) path.
pub(super) fn judge_api(
    method: &Method,
    path: &str,
    protected: &[String],
    workflows_write: bool,
) -> ApiJudgement {
    let mut segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    // `/repositories/ID/...` is GitHub's alias of `/repos/OWNER/REPO/...`.
    if segs.len() >= 2 && segs[0].eq_ignore_ascii_case("repositories") {
        segs.splice(0..1, ["repos", "-"]);
    }
    let lower: Vec<String> = segs.iter().map(|s| s.to_ascii_lowercase()).collect();
    let l: Vec<&str> = lower.iter().map(String::as_str).collect();
    // Methods are judged whatever their case (fail closed on `put`).
    let upper = method.as_str().to_ascii_uppercase();
    let m = upper.as_str();
    if l.as_slice() == ["graphql"] && m != "POST" {
        return ApiJudgement::Refuse("moat: GraphQL is accepted by POST only".into());
    }
    if m == "GET" || m == "HEAD" || m == "OPTIONS" {
        return ApiJudgement::Pass;
    }
    match l.as_slice() {
        ["graphql"] => ApiJudgement::Body(graphql_mutation),
        ["repos", _, _, "git", "refs"] if m == "POST" => ApiJudgement::Body(branch_field("ref")),
        ["repos", _, _, "git", "refs", "heads", ..] => {
            let branch = segs[6..].join("/");
            match protected_branch(protected, &branch) {
                Some(b) => ApiJudgement::Refuse(refusal_text(b)),
                None => ApiJudgement::Pass,
            }
        }
        ["repos", _, _, "contents", rest @ ..] if m == "PUT" || m == "DELETE" => {
            if !workflows_write && rest.len() >= 2 && rest[0] == ".github" && rest[1] == "workflows" {
                return ApiJudgement::Refuse(WORKFLOWS_REFUSAL.into());
            }
            ApiJudgement::Body(branch_field("branch"))
        }
        ["repos", _, _, "git", "trees"] if m == "POST" && !workflows_write => {
            ApiJudgement::Body(no_workflow_tree)
        }
        ["repos", _, _, "merges"] => ApiJudgement::Body(branch_field("base")),
        ["repos", _, _, "merge-upstream"] => ApiJudgement::Body(branch_field("branch")),
        ["repos", _, _, "pulls", _, "update-branch"] => ApiJudgement::Refuse(
            "moat: updating a pull request's branch through the API is refused (it merges the base into the head, which may be protected); merge locally and push".into(),
        ),
        ["repos", _, _, "pulls", _, "merge"] => ApiJudgement::Refuse(
            "moat: merging pull requests is refused (the branch it would update is not checked here); a person merges".into(),
        ),
        ["repos", _, _, "branches", ..] => ApiJudgement::Refuse(
            "moat: changing branches (rename, protection) through the API is refused".into(),
        ),
        _ => ApiJudgement::Pass,
    }
}

/// The role a request plays, and the path judged for it: on an Enterprise
/// host the API lives under `/api/v3` (REST) and `/api/graphql`.
pub(super) fn effective_role(role: HostRole, path: String) -> (HostRole, String) {
    if role != HostRole::Enterprise {
        return (role, path);
    }
    let lower = path.to_ascii_lowercase();
    if lower == "/api/graphql" || lower.starts_with("/api/graphql/") {
        return (HostRole::Api, "/graphql".to_string());
    }
    if lower.starts_with("/api/v3/") || lower == "/api/v3" {
        return (HostRole::Api, path["/api/v3".len()..].to_string());
    }
    if lower.starts_with("/api/") {
        return (HostRole::Api, path);
    }
    (HostRole::Git, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn prot() -> Vec<String> {
        vec!["main".into(), "master".into()]
    }

    #[test]
    fn updating_a_pull_requests_branch_is_refused() {
        let p = vec!["main".to_string()];
        assert!(matches!(
            judge_api(&Method::PUT, "/repos/o/r/pulls/3/update-branch", &p, true),
            ApiJudgement::Refuse(_)
        ));
        let ApiJudgement::Body(f) = judge_api(&Method::POST, "/graphql", &p, true) else {
            panic!("graphql is read")
        };
        assert!(f(
            &json!({"query": "mutation { updatePullRequestBranch(input: {}) { x } }"}),
            &p
        )
        .is_err());
    }

    #[test]
    fn workflow_changes_need_the_grant_and_patterns_protect() {
        let p = vec!["main".to_string(), "release/*".to_string()];
        let judge = |m: &str, path: &str, w: bool| {
            judge_api(&Method::from_bytes(m.as_bytes()).unwrap(), path, &p, w)
        };
        assert!(matches!(
            judge("PUT", "/repos/o/r/contents/.github/workflows/ci.yml", false),
            ApiJudgement::Refuse(_)
        ));
        assert!(matches!(
            judge(
                "DELETE",
                "/repos/o/r/contents/.github/workflows/ci.yml",
                false
            ),
            ApiJudgement::Refuse(_)
        ));
        assert!(matches!(
            judge("PUT", "/repos/o/r/contents/.github/workflows/ci.yml", true),
            ApiJudgement::Body(_)
        ));
        assert!(matches!(
            judge("PUT", "/repos/o/r/contents/docs/workflows.md", false),
            ApiJudgement::Body(_)
        ));
        let ApiJudgement::Body(f) = judge("POST", "/repos/o/r/git/trees", false) else {
            panic!("trees are read without the grant");
        };
        assert!(f(&json!({"tree": [{"path": ".github/workflows/x.yml"}]}), &p).is_err());
        assert!(f(
            &json!({"tree": [{"path": "workflows", "type": "tree"}]}),
            &p
        )
        .is_err());
        assert!(f(&json!({"tree": [{"path": "src/main.rs"}]}), &p).is_ok());
        assert!(f(&json!({"nottree": 1}), &p).is_err());
        assert!(matches!(
            judge("POST", "/repos/o/r/git/trees", true),
            ApiJudgement::Pass
        ));
        assert!(matches!(
            judge("PATCH", "/repos/o/r/git/refs/heads/release/2.0", false),
            ApiJudgement::Refuse(_)
        ));
        assert!(matches!(
            judge("PATCH", "/repos/o/r/git/refs/heads/releases", false),
            ApiJudgement::Pass
        ));
    }

    #[test]
    fn api_writes_to_protected_branches_are_judged() {
        let p = prot();
        let refuse = |m: &str, path: &str| {
            matches!(
                judge_api(&Method::from_bytes(m.as_bytes()).unwrap(), path, &p, false),
                ApiJudgement::Refuse(_)
            )
        };
        assert!(refuse("PATCH", "/repos/o/r/git/refs/heads/main"));
        assert!(refuse("patch", "/repos/o/r/git/refs/heads/main"));
        assert!(refuse("PATCH", "/repositories/42/git/refs/heads/main"));
        assert!(refuse("DELETE", "/repos/O/R/git/refs/heads/master"));
        assert!(!refuse("PATCH", "/repos/o/r/git/refs/heads/feature"));
        assert!(refuse("PUT", "/repos/o/r/pulls/3/merge"));
        assert!(refuse("POST", "/repos/o/r/branches/main/rename"));
        assert!(matches!(
            judge_api(&Method::GET, "/repos/o/r/git/refs/heads/main", &p, false),
            ApiJudgement::Pass
        ));
        let body = |m: &str, path: &str, v: Value| match judge_api(
            &Method::from_bytes(m.as_bytes()).unwrap(),
            path,
            &p,
            false,
        ) {
            ApiJudgement::Body(f) => f(&v, &p),
            _ => panic!("{m} {path} should read its body"),
        };
        assert!(body("PUT", "/repos/o/r/contents/a.txt", json!({"message":"m"})).is_err());
        assert!(body("PUT", "/repos/o/r/contents/a.txt", json!({"branch":"main"})).is_err());
        assert!(body("PUT", "/repos/o/r/contents/a.txt", json!({"branch":"feat"})).is_ok());
        assert!(body(
            "POST",
            "/repos/o/r/git/refs",
            json!({"ref":"refs/heads/main"})
        )
        .is_err());
        assert!(body("POST", "/repos/o/r/git/refs", json!({"ref":"refs/heads/x"})).is_ok());
        assert!(body(
            "POST",
            "/repos/o/r/merges",
            json!({"base":"master","head":"x"})
        )
        .is_err());
        assert!(body(
            "POST",
            "/graphql",
            json!({"query":"mutation { x: createCommitOnBranch(input: {}) { commit { oid } } }"})
        )
        .is_err());
        assert!(body(
            "POST",
            "/graphql",
            json!({"query":"query { viewer { login } }"})
        )
        .is_ok());
        let batch = json!([{"query": "query { a }"}, {"query": "mutation { mergePullRequest(input: {}) { x } }"}]);
        assert!(body("POST", "/graphql", batch).is_err());
        assert!(body("POST", "/graphql", json!({"variables": {}})).is_err());
        assert!(refuse("GET", "/graphql"));
    }

    #[test]
    fn escaped_paths_are_decoded_before_judging() {
        assert_eq!(
            decode_path("/repos/o/r/git/refs/heads/%6Dain").as_deref(),
            Some("/repos/o/r/git/refs/heads/main")
        );
        assert_eq!(decode_path("/a%2"), None);
        assert_eq!(decode_path("/a%zz"), None);
    }
}
