//! `--github` for `moat sandbox run`: turns the flags and moat's environment
//! (or secrets file) into the lease's GitHub template (the App, the token's
//! scope, the intercepted hosts and the protected branches); the door gets
//! its own broker from it, as a gateway channel's doors do.
//!
//! Never reads, prints or passes on a token; the broker mints them later,
//! inside the door.

use std::path::PathBuf;

use anyhow::{bail, Context};
use moat_creds::{GithubConfig, Scope};
use moat_egress::github::{GithubAccess, DEFAULT_PERMISSIONS, DEFAULT_PROTECTED};
use moat_gateway::github_setup::GithubTemplate;

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

/// The GitHub template of `moat sandbox run --github`: the App from moat's
/// environment or secrets file, the flags' scope and protected branches;
/// its door's state under `state_root/<door name>`.
pub fn template(
    flags: &GithubFlags<'_>,
    lookup: impl Fn(&str) -> Option<String> + Copy,
    state_root: PathBuf,
) -> anyhow::Result<GithubTemplate> {
    let scope = scope(flags)?;
    let protected_branches = protected(flags)?;
    let cfg = GithubConfig::from_lookup(lookup)
        .context("--github needs a GitHub App (GITHUB_APP_ID, GITHUB_APP_PRIVATE_KEY, GITHUB_APP_INSTALLATION_ID in moat's environment or secrets file)")?;
    let hosts = GithubAccess::hosts_from_env(lookup).map_err(anyhow::Error::msg)?;
    Ok(GithubTemplate::new(
        cfg,
        scope,
        hosts,
        protected_branches,
        state_root,
    ))
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
        let e = template(
            &flags(&r, &[], &[]),
            |_| None,
            PathBuf::from("/nonexistent"),
        )
        .err()
        .unwrap();
        let text = format!("{e:#}");
        assert!(
            text.contains("GitHub is not available") && text.contains("GITHUB_APP_ID"),
            "{text}"
        );
    }
}
