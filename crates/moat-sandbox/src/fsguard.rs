//! Real-path checks for everything the host binds into a sandbox.
//!
//! Owns the rule that a host path is judged by its *canonical* form (all
//! symlinks resolved) and that only that canonical form is handed to a backend.
//! Never binds or opens anything itself.

use std::path::{Path, PathBuf};

use moat_policy::paths::{blocked_component, check_sandbox_path};
use moat_policy::SandboxPolicy;

use crate::error::{Result, SandboxError};

/// A mount whose host side is canonical and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedMount {
    pub host: PathBuf,
    pub sandbox: PathBuf,
    pub writable: bool,
}

fn refused(host: &Path, sandbox: &Path, reason: String) -> SandboxError {
    SandboxError::MountRefused {
        host: host.to_path_buf(),
        sandbox: sandbox.to_path_buf(),
        reason,
    }
}

/// Resolves and checks every extra mount of the policy.
///
/// Invariant: each returned `host` is canonical, lies under a canonical allowed
/// root, and neither the requested nor the real path has a blocked component.
pub fn resolve_mounts(policy: &SandboxPolicy) -> Result<Vec<ResolvedMount>> {
    let fs = &policy.filesystem;
    if fs.mounts.is_empty() {
        return Ok(Vec::new());
    }
    let roots: Vec<PathBuf> = fs
        .allowed_roots
        .iter()
        .filter_map(|r| std::fs::canonicalize(r).ok())
        .collect();
    let mut out = Vec::new();
    for m in &fs.mounts {
        check_sandbox_path(&m.sandbox).map_err(|r| refused(&m.host, &m.sandbox, r))?;
        let real = std::fs::canonicalize(&m.host).map_err(|e| {
            refused(
                &m.host,
                &m.sandbox,
                format!("the host path cannot be resolved: {e}"),
            )
        })?;
        if roots.is_empty() {
            return Err(refused(
                &m.host,
                &m.sandbox,
                "no filesystem.allowed_roots are configured, so no extra mount is allowed; add its parent directory to filesystem.allowed_roots in the policy file".into(),
            ));
        }
        if !roots.iter().any(|r| real.starts_with(r)) {
            return Err(refused(
                &m.host,
                &m.sandbox,
                format!(
                    "its real path {} is outside the allowed roots ({})",
                    real.display(),
                    roots
                        .iter()
                        .map(|r| r.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        for p in [&m.host, &real] {
            if let Some(pat) = blocked_component(p, &fs.blocked_patterns) {
                return Err(refused(
                    &m.host,
                    &m.sandbox,
                    format!("{} matches the blocked pattern {pat:?}", p.display()),
                ));
            }
        }
        out.push(ResolvedMount {
            host: real,
            sandbox: m.sandbox.clone(),
            writable: m.writable,
        });
    }
    Ok(out)
}

/// Checks a host directory used as the workspace: it must exist, be a
/// directory, not be `/`, and contain no blocked component in its real path.
pub fn resolve_workspace(dir: &Path, policy: &SandboxPolicy) -> Result<PathBuf> {
    let real = std::fs::canonicalize(dir).map_err(|e| {
        SandboxError::Refused(format!(
            "--workspace {}: cannot be resolved: {e}",
            dir.display()
        ))
    })?;
    if !real.is_dir() {
        return Err(SandboxError::Refused(format!(
            "--workspace {}: not a directory",
            dir.display()
        )));
    }
    if real.parent().is_none() {
        return Err(SandboxError::Refused(
            "--workspace /: the host's root directory cannot be a workspace".into(),
        ));
    }
    if let Some(pat) = blocked_component(&real, &policy.filesystem.blocked_patterns) {
        return Err(SandboxError::Refused(format!(
            "--workspace {}: its real path matches the blocked pattern {pat:?}",
            dir.display()
        )));
    }
    Ok(real)
}

/// The protected paths (relative, e.g. `.git/hooks`) that exist inside a
/// writable host directory, as (host path, in-sandbox path) pairs to bind
/// read-only. A protected path that is a symlink, or whose real path leaves
/// `dir`, refuses the start: binding it would expose what it points at.
pub fn protected_binds(
    dir: &Path,
    in_sandbox: &Path,
    protected: &[String],
) -> Result<Vec<(PathBuf, PathBuf)>> {
    let mut out = Vec::new();
    for rel in protected {
        let host = dir.join(rel);
        let Ok(meta) = std::fs::symlink_metadata(&host) else {
            continue;
        };
        let real = std::fs::canonicalize(&host).ok();
        if meta.file_type().is_symlink() || real.as_deref() != Some(host.as_path()) {
            return Err(SandboxError::Refused(format!(
                "protected path {} is a symlink or leads outside {}; remove it before starting a sandbox here",
                host.display(),
                dir.display()
            )));
        }
        out.push((host, in_sandbox.join(rel)));
    }
    Ok(out)
}
