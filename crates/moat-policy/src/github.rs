//! GitHub in the gateway's configuration: the `[github]` section (where the
//! App's API and git hosts are) and a channel's `github = { ... }` (which
//! repositories its turns may reach, with what permissions, which branches
//! no push may move, and the repository a turn's workspace starts with).
//!
//! Owns the validation and the trust-dependent defaults: an untrusted
//! channel gets read-only permissions unless its own entry says otherwise.
//! Pure: never reads the App's key, a token or the environment (the gateway
//! does, through `moat-creds`).

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::PolicyError;

/// Branches no push may move unless a channel lists its own.
pub const DEFAULT_PROTECT: [&str; 2] = ["main", "master"];
/// Permissions a member channel's token gets unless it lists its own.
pub const MEMBER_PERMISSIONS: [(&str, &str); 2] =
    [("contents", "write"), ("pull_requests", "write")];
/// Permissions an untrusted channel's token gets unless it lists its own.
pub const UNTRUSTED_PERMISSIONS: [(&str, &str); 2] =
    [("contents", "read"), ("pull_requests", "read")];
/// The branch prefix of conversation branches unless a channel sets one.
pub const DEFAULT_BRANCH_PREFIX: &str = "moat/";
/// GitHub App permission names a channel may ask for (the App's own
/// settings still bound what a token can get).
const PERMISSION_NAMES: [&str; 10] = [
    "actions",
    "checks",
    "contents",
    "issues",
    "metadata",
    "pull_requests",
    "statuses",
    "workflows",
    "deployments",
    "discussions",
];

fn err(key: impl Into<String>, message: impl Into<String>) -> PolicyError {
    PolicyError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// `[github]` as written.
#[derive(Deserialize, Default, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawGithubSection {
    api_url: Option<String>,
    web_url: Option<String>,
    allow_plain_http: Option<bool>,
    webhook: Option<bool>,
    bot: Option<String>,
    // Present only to refuse them: the App's secrets never go in this file.
    private_key: Option<toml::Value>,
    webhook_secret: Option<toml::Value>,
}

/// A channel's `github = { ... }` as written.
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawChannelGithub {
    repos: Vec<String>,
    permissions: Option<BTreeMap<String, String>>,
    protect: Option<Vec<String>>,
    clone: Option<String>,
    depth: Option<i64>,
    branch_prefix: Option<String>,
    users: Option<BTreeMap<String, String>>,
}

/// `[github]`, validated: where the door sends intercepted requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GithubSection {
    /// The REST API and the App's token endpoints (`https://api.github.com`).
    pub api_url: String,
    /// git over smart HTTP (`https://github.com`).
    pub web_url: String,
    /// `http://` upstreams (tests against a local fake only).
    pub allow_plain_http: bool,
    /// Serve `POST /github/webhook` (needs `GITHUB_WEBHOOK_SECRET`).
    pub webhook: bool,
    /// The login a pull-request comment mentions (`@login`) to start a turn.
    pub bot: Option<String>,
}

impl Default for GithubSection {
    fn default() -> Self {
        GithubSection {
            api_url: "https://api.github.com".into(),
            web_url: "https://github.com".into(),
            allow_plain_http: false,
            webhook: false,
            bot: None,
        }
    }
}

/// What one channel's turns may do on GitHub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelGithub {
    /// The App installation's account (every repository's owner).
    pub owner: String,
    /// Repository names under `owner`.
    pub repos: Vec<String>,
    /// GitHub App permissions of the turn's token.
    pub permissions: BTreeMap<String, String>,
    /// Whether the permissions came from the channel's own entry.
    pub permissions_set: bool,
    /// Branch names or patterns (`release/*`) no push may move.
    pub protect: Vec<String>,
    /// `owner/name` the workspace starts with, if any (one of `repos`).
    pub clone: Option<String>,
    /// History depth of that clone (0: all of it).
    pub depth: u32,
    /// Prefix of the branch made for a conversation.
    pub branch_prefix: String,
    /// GitHub login (lower case) → the chat user a comment of theirs that
    /// mentions the bot runs a turn as.
    pub users: BTreeMap<String, String>,
}

impl ChannelGithub {
    /// Whether pushes may add or change `.github/workflows/`.
    pub fn workflows_write(&self) -> bool {
        self.permissions.get("workflows").map(String::as_str) == Some("write")
    }

    /// Whether the token may write anything.
    pub fn can_write(&self) -> bool {
        self.permissions.values().any(|v| v == "write")
    }

    /// `owner/name` of every repository.
    pub fn full_names(&self) -> Vec<String> {
        self.repos
            .iter()
            .map(|r| format!("{}/{r}", self.owner))
            .collect()
    }
}

fn name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 100
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

fn split_repo(r: &str, key: &str) -> Result<(String, String), PolicyError> {
    let bad = || {
        err(
            key,
            format!("{r:?} is not a repository; write \"owner/name\" with letters, digits, '-', '_' or '.'"),
        )
    };
    let (o, n) = r.split_once('/').ok_or_else(bad)?;
    let n = n.strip_suffix(".git").unwrap_or(n);
    if !name_ok(o) || !name_ok(n) {
        return Err(bad());
    }
    Ok((o.to_string(), n.to_string()))
}

/// A branch name or a pattern with `*` (any characters, `/` included).
fn branch_pattern_ok(b: &str) -> bool {
    !b.is_empty()
        && b.len() <= 200
        && !b.starts_with('-')
        && !b.starts_with("refs/")
        && !b.contains("..")
        && !b
            .bytes()
            .any(|c| c.is_ascii_control() || b" ~^:?[\\".contains(&c))
}

pub(crate) fn section(raw: RawGithubSection) -> Result<GithubSection, PolicyError> {
    if raw.private_key.is_some() {
        return Err(err(
            "github.private_key",
            "secrets never go in this file; set GITHUB_APP_PRIVATE_KEY in moat's environment or the secrets file",
        ));
    }
    if raw.webhook_secret.is_some() {
        return Err(err(
            "github.webhook_secret",
            "secrets never go in this file; set GITHUB_WEBHOOK_SECRET in moat's environment or the secrets file",
        ));
    }
    let plain = raw.allow_plain_http.unwrap_or(false);
    let d = GithubSection::default();
    let url = |v: Option<String>, default: String, key: &str| -> Result<String, PolicyError> {
        let u = v.unwrap_or(default);
        let ok = u.starts_with("https://") || (plain && u.starts_with("http://"));
        if !ok {
            return Err(err(
                key,
                format!("{u:?} must be an https:// URL (http:// only with allow_plain_http = true, for a local test server)"),
            ));
        }
        Ok(u.trim_end_matches('/').to_string())
    };
    Ok(GithubSection {
        api_url: url(raw.api_url, d.api_url, "github.api_url")?,
        web_url: url(raw.web_url, d.web_url, "github.web_url")?,
        allow_plain_http: plain,
        webhook: raw.webhook.unwrap_or(false),
        bot: match raw.bot {
            None => None,
            Some(b) => {
                let login = b.trim_start_matches('@').to_string();
                if !name_ok(&login) || login.contains('.') {
                    return Err(err(
                        "github.bot",
                        format!("{b:?} is not a GitHub login; write the login comments mention, e.g. \"moat-bot\""),
                    ));
                }
                Some(login)
            }
        },
    })
}

/// A channel's GitHub access; `untrusted` picks the read-only defaults.
pub(crate) fn channel(
    raw: &RawChannelGithub,
    at: &str,
    untrusted: bool,
) -> Result<ChannelGithub, PolicyError> {
    let key = |k: &str| format!("{at}.github.{k}");
    if raw.repos.is_empty() {
        return Err(err(
            key("repos"),
            "lists no repository; name at least one \"owner/name\", or remove github",
        ));
    }
    let mut owner: Option<String> = None;
    let mut repos = Vec::new();
    for (i, r) in raw.repos.iter().enumerate() {
        let k = key(&format!("repos[{i}]"));
        let (o, n) = split_repo(r, &k)?;
        match &owner {
            Some(prev) if !prev.eq_ignore_ascii_case(&o) => {
                return Err(err(
                    k,
                    format!("every repository must belong to one owner (the App installation's account), not both {prev} and {o}"),
                ))
            }
            _ => owner = Some(o),
        }
        if !repos.contains(&n) {
            repos.push(n);
        }
    }
    let owner = owner.unwrap_or_default();
    let permissions_set = raw.permissions.is_some();
    let permissions: BTreeMap<String, String> = match &raw.permissions {
        Some(p) => {
            for (name, level) in p {
                let k = key(&format!("permissions.{name}"));
                if !PERMISSION_NAMES.contains(&name.as_str()) {
                    return Err(err(
                        k,
                        format!(
                            "unknown permission; use one of {}",
                            PERMISSION_NAMES.join(", ")
                        ),
                    ));
                }
                if level != "read" && level != "write" {
                    return Err(err(k, format!("{level:?}: use \"read\" or \"write\"")));
                }
            }
            if p.is_empty() {
                return Err(err(
                    key("permissions"),
                    "is empty; leave it out for the defaults or list e.g. contents = \"read\"",
                ));
            }
            p.clone()
        }
        None => {
            let d: &[(&str, &str)] = if untrusted {
                &UNTRUSTED_PERMISSIONS
            } else {
                &MEMBER_PERMISSIONS
            };
            d.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        }
    };
    let protect = match &raw.protect {
        None => DEFAULT_PROTECT.iter().map(|s| s.to_string()).collect(),
        Some(list) => {
            for (i, b) in list.iter().enumerate() {
                if !branch_pattern_ok(b) {
                    return Err(err(
                        key(&format!("protect[{i}]")),
                        format!("{b:?} is not a branch name or pattern; write e.g. \"main\" or \"release/*\" (without refs/heads/)"),
                    ));
                }
            }
            list.clone()
        }
    };
    let clone = match &raw.clone {
        None => None,
        Some(c) => {
            let (o, n) = split_repo(c, &key("clone"))?;
            if !o.eq_ignore_ascii_case(&owner) || !repos.contains(&n) {
                return Err(err(
                    key("clone"),
                    format!(
                        "{c:?} is not in github.repos; add it there or clone one of {}",
                        raw.repos.join(", ")
                    ),
                ));
            }
            Some(format!("{owner}/{n}"))
        }
    };
    let depth = match raw.depth {
        None => 1,
        Some(d) if (0..=1_000_000).contains(&d) => d as u32,
        Some(d) => {
            return Err(err(
                key("depth"),
                format!("{d} is out of range; use 1 for the latest commit only, up to 1000000, or 0 for the whole history"),
            ))
        }
    };
    if raw.depth.is_some() && clone.is_none() {
        return Err(err(
            key("depth"),
            "is only used with clone; set clone or remove depth",
        ));
    }
    let branch_prefix = raw
        .branch_prefix
        .clone()
        .unwrap_or_else(|| DEFAULT_BRANCH_PREFIX.to_string());
    let prefix_ok = branch_prefix.len() <= 50
        && branch_pattern_ok(&format!("{branch_prefix}x"))
        && !branch_prefix.contains('*')
        && !branch_prefix.starts_with('/');
    if !prefix_ok {
        return Err(err(
            key("branch_prefix"),
            format!("{branch_prefix:?} cannot start a branch name; use letters, digits, '-', '_', '.' and '/', e.g. \"moat/\""),
        ));
    }
    let mut users = BTreeMap::new();
    for (login, user) in raw.users.iter().flatten() {
        let k = key(&format!("users.{login}"));
        if !name_ok(login) || login.contains('.') {
            return Err(err(k, "is not a GitHub login"));
        }
        if user.is_empty() || user == "*" || user.starts_with('@') {
            return Err(err(
                k,
                format!("{user:?}: map the login to one chat user id, e.g. \"U01ALICE\""),
            ));
        }
        users.insert(login.to_ascii_lowercase(), user.clone());
    }
    Ok(ChannelGithub {
        users,
        owner,
        repos,
        permissions,
        permissions_set,
        protect,
        clone,
        depth,
        branch_prefix,
    })
}

/// Whether `branch` (without `refs/heads/`) matches a protect entry: equal,
/// or a pattern whose `*` stands for any run of characters.
pub fn branch_matches(pattern: &str, branch: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == branch;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !branch.starts_with(first) || branch.len() < first.len() + last.len() {
        return false;
    }
    let mut rest = &branch[first.len()..];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    rest.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(repos: &[&str]) -> RawChannelGithub {
        RawChannelGithub {
            repos: repos.iter().map(|s| s.to_string()).collect(),
            permissions: None,
            protect: None,
            clone: None,
            depth: None,
            branch_prefix: None,
            users: None,
        }
    }

    #[test]
    fn defaults_depend_on_trust() {
        let m = channel(&raw(&["acme/app"]), "channel[0]", false).unwrap();
        assert_eq!(m.permissions["contents"], "write");
        assert!(m.can_write() && !m.workflows_write() && !m.permissions_set);
        let u = channel(&raw(&["acme/app"]), "channel[0]", true).unwrap();
        assert_eq!(u.permissions["contents"], "read");
        assert!(!u.can_write());
        assert_eq!(u.protect, ["main", "master"]);
        assert_eq!(u.branch_prefix, "moat/");
    }

    #[test]
    fn errors_name_the_key() {
        let e = channel(&raw(&["acme/app", "other/x"]), "channel[1]", false).unwrap_err();
        assert!(
            e.to_string().starts_with("channel[1].github.repos[1]:"),
            "{e}"
        );
        let e = channel(&raw(&["app"]), "channel[0]", false).unwrap_err();
        assert!(
            e.to_string().starts_with("channel[0].github.repos[0]:"),
            "{e}"
        );
        let mut r = raw(&["acme/app"]);
        r.permissions = Some([("contents".to_string(), "admin".to_string())].into());
        let e = channel(&r, "channel[0]", false).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("channel[0].github.permissions.contents:"),
            "{e}"
        );
        let mut r = raw(&["acme/app"]);
        r.clone = Some("acme/other".into());
        let e = channel(&r, "channel[0]", false).unwrap_err();
        assert!(e.to_string().starts_with("channel[0].github.clone:"), "{e}");
        let mut r = raw(&["acme/app"]);
        r.protect = Some(vec!["refs/heads/main".into()]);
        assert!(channel(&r, "c", false).is_err());
        let mut r = raw(&["acme/app"]);
        r.depth = Some(3);
        assert!(channel(&r, "c", false).is_err(), "depth without clone");
    }

    #[test]
    fn patterns() {
        assert!(branch_matches("main", "main"));
        assert!(!branch_matches("main", "main2"));
        assert!(branch_matches("release/*", "release/1.0"));
        assert!(branch_matches("release/*", "release/a/b"));
        assert!(!branch_matches("release/*", "releases/1"));
        assert!(branch_matches("*-hotfix", "x-hotfix"));
        assert!(branch_matches("a*b*c", "axxbyyc"));
        assert!(!branch_matches("a*b*c", "axxcyyb"));
        assert!(!branch_matches("ab*ba", "aba"));
    }

    #[test]
    fn secrets_are_refused_in_the_section() {
        let s = RawGithubSection {
            private_key: Some(toml::Value::String("x".into())),
            ..Default::default()
        };
        assert!(section(s)
            .unwrap_err()
            .to_string()
            .starts_with("github.private_key:"));
        let s = RawGithubSection {
            api_url: Some("http://127.0.0.1:1".into()),
            ..Default::default()
        };
        assert!(section(s)
            .unwrap_err()
            .to_string()
            .starts_with("github.api_url:"));
    }
}
