//! Pure path rules for mounts: blocked name patterns and in-sandbox path shape.
//!
//! Owns the default list of blocked names (docs/threat-model.md F6) and the rules a path
//! must satisfy before the sandbox crate even looks at the disk. It never touches
//! the filesystem: the real-path checks (after symlinks) live in `moat-sandbox`,
//! which must call these functions on the *resolved* path as well.

use std::path::{Component, Path};

/// Names that may never appear as a component of a mounted host path.
/// Matched case-insensitively, against the whole component or its stem before
/// a `.`, `_` or `-` (`.env.local`, `id_rsa.pub`, `.ssh-old` are blocked too).
pub const DEFAULT_BLOCKED_PATTERNS: &[&str] = &[
    ".ssh",
    ".gnupg",
    ".aws",
    ".azure",
    ".gcloud",
    ".config/gcloud",
    ".kube",
    ".docker",
    "credentials",
    ".env",
    ".netrc",
    ".npmrc",
    ".pypirc",
    "id_rsa",
    "id_dsa",
    "id_ecdsa",
    "id_ed25519",
    "private_key",
    ".secret",
    ".secrets",
    ".git-credentials",
    ".password-store",
];

/// Returns the first blocked pattern that some component of `path` matches.
///
/// A pattern containing `/` (such as `.config/gcloud`) matches consecutive components.
pub fn blocked_component<'a>(path: &Path, patterns: &'a [String]) -> Option<&'a str> {
    let comps: Vec<String> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_string_lossy().to_lowercase()),
            _ => None,
        })
        .collect();
    for pat in patterns {
        let parts: Vec<String> = pat
            .split('/')
            .filter(|p| !p.is_empty())
            .map(|p| p.to_lowercase())
            .collect();
        if parts.is_empty() || parts.len() > comps.len() {
            continue;
        }
        for window in comps.windows(parts.len()) {
            let hit = window.iter().zip(&parts).enumerate().all(|(i, (c, p))| {
                if i + 1 == parts.len() {
                    component_matches(c, p)
                } else {
                    c == p
                }
            });
            if hit {
                return Some(pat.as_str());
            }
        }
    }
    None
}

fn component_matches(component: &str, pattern: &str) -> bool {
    component == pattern
        || component
            .strip_prefix(pattern)
            .is_some_and(|rest| rest.starts_with(['.', '_', '-']))
}

/// In-sandbox directories that a mount may never cover or sit under.
pub const RESERVED_SANDBOX_PATHS: &[&str] = &["/proc", "/dev", "/sys", "/run/moat"];

/// Checks the shape of a path inside the sandbox: absolute, no `.` or `..`
/// component, not `/`, not under a reserved directory. Returns why not.
pub fn check_sandbox_path(path: &Path) -> Result<(), String> {
    let text = path.to_string_lossy();
    if !path.is_absolute() {
        return Err(format!(
            "in-sandbox path {text:?} is not absolute; write it from /, e.g. /data"
        ));
    }
    if text.contains('\0') || text.contains('\n') {
        return Err(format!(
            "in-sandbox path {text:?} contains a control character"
        ));
    }
    // `Path::components` silently drops `.`; look at the raw text too.
    if text.split('/').any(|c| c == ".." || c == ".") {
        return Err(format!(
            "in-sandbox path {text:?} contains a '.' or '..' component; write the plain path"
        ));
    }
    if path.components().count() <= 1 {
        return Err("a mount may not cover the sandbox's root directory /".to_string());
    }
    for reserved in RESERVED_SANDBOX_PATHS {
        if path.starts_with(reserved) {
            return Err(format!(
                "in-sandbox path {text:?} is under {reserved}, which moat reserves"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn defaults() -> Vec<String> {
        DEFAULT_BLOCKED_PATTERNS
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    #[test]
    fn every_f6_name_is_blocked_anywhere_in_the_path() {
        let pats = defaults();
        for name in [
            ".ssh",
            ".gnupg",
            ".aws",
            ".azure",
            ".gcloud",
            ".kube",
            ".docker",
            "credentials",
            ".env",
            ".netrc",
            ".npmrc",
            ".pypirc",
            "id_rsa",
            "id_ed25519",
            "private_key",
            ".secret",
        ] {
            let p = PathBuf::from(format!("/srv/repos/{name}"));
            assert!(blocked_component(&p, &pats).is_some(), "{name} not blocked");
            let p = PathBuf::from(format!("/srv/{name}/inner/dir"));
            assert!(
                blocked_component(&p, &pats).is_some(),
                "{name} (middle) not blocked"
            );
        }
    }

    #[test]
    fn variants_of_blocked_names_are_blocked() {
        let pats = defaults();
        for p in [
            "/srv/.ENV",
            "/srv/.env.local",
            "/srv/.env_prod",
            "/home/u/.SSH/x",
            "/k/id_rsa.pub",
            "/k/private_key.pem",
            "/home/u/.config/gcloud",
        ] {
            assert!(
                blocked_component(Path::new(p), &pats).is_some(),
                "{p} not blocked"
            );
        }
    }

    #[test]
    fn ordinary_names_pass() {
        let pats = defaults();
        for p in [
            "/srv/repos/app",
            "/srv/environment",
            "/srv/sshd-docs",
            "/srv/my.envoy",
            "/home/u/.config",
        ] {
            assert_eq!(
                blocked_component(Path::new(p), &pats),
                None,
                "{p} wrongly blocked"
            );
        }
    }

    #[test]
    fn sandbox_paths_must_be_plain_and_absolute() {
        assert!(check_sandbox_path(Path::new("/data")).is_ok());
        assert!(check_sandbox_path(Path::new("/workspace/repo")).is_ok());
        assert!(check_sandbox_path(Path::new("data"))
            .unwrap_err()
            .contains("not absolute"));
        assert!(check_sandbox_path(Path::new("/data/../etc"))
            .unwrap_err()
            .contains(".."));
        assert!(check_sandbox_path(Path::new("/data/./x"))
            .unwrap_err()
            .contains("'.'"));
        assert!(check_sandbox_path(Path::new("/"))
            .unwrap_err()
            .contains("root"));
        assert!(check_sandbox_path(Path::new("/proc/1"))
            .unwrap_err()
            .contains("reserves"));
        assert!(check_sandbox_path(Path::new("/dev"))
            .unwrap_err()
            .contains("reserves"));
    }
}
