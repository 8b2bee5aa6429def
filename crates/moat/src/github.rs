//! `--github` for `moat sandbox run`: turns the flags and moat's environment
//! (or secrets file) into one lease's GitHub access: its own broker, the
//! token's scope, the intercepted hosts and the protected branches.
//!
//! Never reads, prints or passes on a token; the broker mints them later,
//! inside the door.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use moat_creds::{GithubBroker, GithubConfig, Scope};
use moat_egress::github::{GithubAccess, TokenAudit, DEFAULT_PERMISSIONS, DEFAULT_PROTECTED};

/// The `--github*` flags of one run.
pub struct GithubFlags<'a> {
    /// `OWNER/REPO`, at least one.
    pub repos: &'a [String],
    /// `NAME=LEVEL`; empty: the defaults.
    pub permissions: &'a [String],
    /// Branch names; empty: `main` and `master`.
    pub protect: &'a [String],
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 100
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// The token's scope from `--github` and `--github-permission`. All
/// repositories must belong to one owner: an App installation is one account's.
pub fn scope(flags: &GithubFlags<'_>) -> anyhow::Result<Scope> {
    let mut owner: Option<&str> = None;
    let mut names = Vec::new();
    for r in flags.repos {
        let Some((o, n)) = r.split_once('/') else {
            bail!("--github {r}: write OWNER/REPO");
        };
        if !valid_name(o) || !valid_name(n) || n.contains('/') {
            bail!("--github {r}: write OWNER/REPO with letters, digits, '-', '_' or '.'");
        }
        match owner {
            Some(prev) if !prev.eq_ignore_ascii_case(o) => bail!(
                "--github {r}: every repository must belong to one owner (the App installation's account), not both {prev} and {o}"
            ),
            _ => owner = Some(o),
        }
        names.push(n.trim_end_matches(".git").to_string());
    }
    let mut perms = Vec::new();
    for p in flags.permissions {
        let Some((k, v)) = p.split_once('=') else {
            bail!("--github-permission {p}: write NAME=LEVEL, e.g. contents=write");
        };
        perms.push((k.trim().to_string(), v.trim().to_string()));
    }
    if perms.is_empty() {
        perms = DEFAULT_PERMISSIONS
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    }
    Scope::new(names, perms).map_err(|e| anyhow::anyhow!("--github: {e}"))
}

/// Branches no push may update, from `--protect-branch` (default main, master).
pub fn protected(flags: &GithubFlags<'_>) -> anyhow::Result<Vec<String>> {
    if flags.protect.is_empty() {
        return Ok(DEFAULT_PROTECTED.iter().map(|s| s.to_string()).collect());
    }
    for b in flags.protect {
        let b = b.as_str();
        let bad = b.is_empty()
            || b.starts_with('-')
            || b.starts_with("refs/")
            || b.bytes()
                .any(|c| c.is_ascii_control() || c == b' ' || c == b'~' || c == b'^' || c == b':');
        if bad {
            bail!("--protect-branch {b}: give a branch name such as main (without refs/heads/)");
        }
    }
    Ok(flags.protect.to_vec())
}

/// Everything the door needs for GitHub in one lease. Fails (before any
/// sandbox exists) when the App is not configured, naming the variable.
pub fn access(
    flags: &GithubFlags<'_>,
    lookup: impl Fn(&str) -> Option<String> + Copy,
    lease: &str,
    audit: Arc<dyn moat_egress::Audit>,
    state_dir: PathBuf,
) -> anyhow::Result<GithubAccess> {
    let scope = scope(flags)?;
    let protected_branches = protected(flags)?;
    let cfg = GithubConfig::from_lookup(lookup)
        .context("--github needs a GitHub App (GITHUB_APP_ID, GITHUB_APP_PRIVATE_KEY, GITHUB_APP_INSTALLATION_ID in moat's environment or secrets file)")?;
    let hosts = GithubAccess::hosts_from_env(lookup).map_err(anyhow::Error::msg)?;
    let broker = GithubBroker::new(
        cfg,
        moat_creds::system_clock(),
        Arc::new(TokenAudit {
            lease: lease.to_string(),
            audit,
        }),
    )?;
    let workflows_write = scope.permissions().get("workflows").map(String::as_str) == Some("write");
    Ok(GithubAccess {
        broker: Arc::new(broker),
        workflows_write,
        scope,
        hosts,
        protected_branches,
        state_dir,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags<'a>(
        repos: &'a [String],
        perms: &'a [String],
        protect: &'a [String],
    ) -> GithubFlags<'a> {
        GithubFlags {
            repos,
            permissions: perms,
            protect,
        }
    }

    #[test]
    fn repositories_must_share_an_owner() {
        let r = vec!["acme/one".to_string(), "acme/two.git".to_string()];
        let s = scope(&flags(&r, &[], &[])).unwrap();
        assert_eq!(s.repositories(), ["one", "two"]);
        assert_eq!(
            s.permissions().get("contents").map(String::as_str),
            Some("write")
        );
        let r = vec!["acme/one".to_string(), "other/two".to_string()];
        let e = scope(&flags(&r, &[], &[])).unwrap_err().to_string();
        assert!(e.contains("one owner"), "{e}");
        for bad in ["acme", "acme/", "/x", "a/b/c", "a/b c"] {
            let r = vec![bad.to_string()];
            assert!(scope(&flags(&r, &[], &[])).is_err(), "{bad}");
        }
    }

    #[test]
    fn permissions_and_branches_are_checked() {
        let r = vec!["acme/one".to_string()];
        let p = vec!["issues=read".to_string()];
        let s = scope(&flags(&r, &p, &[])).unwrap();
        assert_eq!(s.permissions().len(), 1);
        let p = vec!["issues".to_string()];
        assert!(scope(&flags(&r, &p, &[])).is_err());
        assert_eq!(protected(&flags(&r, &[], &[])).unwrap(), ["main", "master"]);
        let b = vec!["release".to_string()];
        assert_eq!(protected(&flags(&r, &[], &b)).unwrap(), ["release"]);
        let b = vec!["refs/heads/x".to_string()];
        assert!(protected(&flags(&r, &[], &b)).is_err());
    }

    #[test]
    fn without_the_app_github_is_not_available() {
        let r = vec!["acme/one".to_string()];
        let audit: Arc<dyn moat_egress::Audit> = Arc::new(moat_egress::MemoryAudit::default());
        let e = access(
            &flags(&r, &[], &[]),
            |_| None,
            "t",
            audit,
            PathBuf::from("/nonexistent"),
        )
        .unwrap_err();
        let text = format!("{e:#}");
        assert!(
            text.contains("GitHub is not available") && text.contains("GITHUB_APP_ID"),
            "{text}"
        );
    }
}
