//! GitHub access for one lease: which hosts the door intercepts and where
//! their requests go ([`InterceptedHost`], [`GithubAccess`]), and the
//! lease's broker (tokens
//! minted on use, revoked when the lease ends, every mint and revocation
//! audited through [`TokenAudit`]).
//!
//! Must never: hand the token or the App key to the sandbox, or put a token
//! in a log or audit record. (The lease CA is the door's: `crate::intercept`.)

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use moat_creds::{GithubBroker, InstallationToken, Scope, Secret};
use serde::Serialize;
use tokio_rustls::rustls;

use super::GithubActivity;
use crate::llm::{random_hex, upstream_tls, UpstreamUrl};

/// Branches nobody pushes to through moat unless the operator says otherwise.
pub const DEFAULT_PROTECTED: [&str; 2] = moat_policy::github::DEFAULT_PROTECT;
/// Permissions a token gets unless the operator says otherwise (a member
/// channel's defaults; one definition, in the policy).
pub const DEFAULT_PERMISSIONS: [(&str, &str); 2] = moat_policy::github::MEMBER_PERMISSIONS;
/// What a GitHub host is for, which decides how the token is presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostRole {
    /// git smart HTTP (github.com): `Authorization: Basic x-access-token:TOKEN`.
    Git,
    /// The REST and GraphQL API (api.github.com): `Authorization: Bearer TOKEN`.
    Api,
    /// GitHub Enterprise Server: one host for both, the API under `/api/`
    /// (`/api/v3/...`, `/api/graphql`), git everywhere else.
    Enterprise,
}

/// One host the door intercepts, and where its requests go.
#[derive(Debug, Clone)]
pub struct InterceptedHost {
    /// The name the sandbox uses (lower case).
    pub name: String,
    pub role: HostRole,
    pub upstream: UpstreamUrl,
}

/// GitHub access for one lease.
#[derive(Clone)]
pub struct GithubAccess {
    /// One broker per lease: revoking its tokens must not end another lease's.
    pub broker: Arc<GithubBroker>,
    pub scope: Scope,
    pub hosts: Vec<InterceptedHost>,
    /// Branch names or patterns (`release/*`, without `refs/heads/`) no
    /// push may update.
    pub protected_branches: Vec<String>,
    /// Whether API calls may add or change `.github/workflows/` (without it
    /// the token has no `workflows` permission either, so GitHub itself
    /// refuses git pushes that touch them).
    pub workflows_write: bool,
    /// A host directory, traversable by sandbox users, where the door writes
    /// this lease's CA bundle (`crate::intercept`).
    pub state_dir: PathBuf,
    /// Holds every push until it decides (moat's approvals, `approve =
    /// ["github_push"]`); `None`: pushes are not held.
    pub push_gate: Option<Arc<dyn PushGate>>,
}

/// What holds a push before any byte of it goes upstream: the gateway asks
/// the channel's admins. `repo` is the push's `owner/name` as the path
/// names it, `refs` the refs it updates (plain names only).
pub trait PushGate: Send + Sync {
    /// `Ok`: the push goes on; `Err(reason)`: it is refused with `reason`.
    fn decide(
        &self,
        repo: String,
        refs: Vec<String>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>;
}

impl std::fmt::Debug for GithubAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GithubAccess")
            .field("scope", &self.scope)
            .field("hosts", &self.hosts)
            .field("protected_branches", &self.protected_branches)
            .field("push_gate", &self.push_gate.is_some())
            .finish_non_exhaustive()
    }
}

impl GithubAccess {
    /// The intercepted hosts from moat's settings: the names the sandbox uses,
    /// `MOAT_GITHUB_HOST` (default github.com) and `MOAT_GITHUB_API_HOST`
    /// (default api.github.com), go to `MOAT_GITHUB_URL` (default
    /// `https://github.com`) and `MOAT_GITHUB_API_URL` (default
    /// `https://api.github.com`); `http://` only with
    /// `MOAT_GITHUB_ALLOW_PLAIN_HTTP=1`. When both names are the same (GitHub
    /// Enterprise Server), that one host serves both, by path.
    pub fn hosts_from_env(
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Vec<InterceptedHost>, String> {
        let plain = env("MOAT_GITHUB_ALLOW_PLAIN_HTTP").as_deref() == Some("1");
        let name_of = |var: &str, default: &str| -> Result<String, String> {
            let raw = env(var).unwrap_or_else(|| default.to_string());
            moat_policy::network::normalize_name(&raw)
                .filter(|n| moat_policy::network::parse_ip_literal(n).is_none())
                .ok_or_else(|| format!("{var}: {raw:?} is not a host name"))
        };
        let git_name = name_of("MOAT_GITHUB_HOST", "github.com")?;
        let api_name = name_of("MOAT_GITHUB_API_HOST", "api.github.com")?;
        let same = git_name == api_name;
        let mut hosts: Vec<InterceptedHost> = Vec::new();
        for (name, role, var, default) in [
            (
                git_name,
                if same {
                    HostRole::Enterprise
                } else {
                    HostRole::Git
                },
                "MOAT_GITHUB_URL",
                "https://github.com",
            ),
            (
                api_name,
                HostRole::Api,
                "MOAT_GITHUB_API_URL",
                moat_creds::DEFAULT_API_URL,
            ),
        ] {
            if same && role == HostRole::Api {
                continue;
            }
            let url = env(var).unwrap_or_else(|| default.to_string());
            let upstream = UpstreamUrl::parse(&url, plain).map_err(|e| {
                format!(
                    "{var}: {}",
                    e.replace("MOAT_LLM_ALLOW_PLAIN_HTTP", "MOAT_GITHUB_ALLOW_PLAIN_HTTP")
                )
            })?;
            hosts.push(InterceptedHost {
                name,
                role,
                upstream,
            });
        }
        Ok(hosts)
    }
}

/// A token minted or revoked for a lease (from the broker's audit events).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TokenRecord {
    pub ts_ms: u64,
    pub lease: String,
    /// Always `github-token`.
    pub kind: &'static str,
    /// `minted` or `revoked`.
    pub event: &'static str,
    pub repositories: Vec<String>,
    pub permissions: std::collections::BTreeMap<String, String>,
    /// Unix seconds.
    pub expires_at: i64,
}

/// Hands the broker's mint and revoke events to a door's audit log, named
/// for the lease. Give it to `GithubBroker::new`.
pub struct TokenAudit {
    pub lease: String,
    pub audit: Arc<dyn crate::Audit>,
}

impl moat_creds::AuditSink for TokenAudit {
    fn record(&self, event: &moat_creds::GithubAudit) {
        let (ev, repositories, permissions, expires_at) = match event {
            moat_creds::GithubAudit::Minted {
                repositories,
                permissions,
                expires_at,
            } => ("minted", repositories, permissions, expires_at),
            moat_creds::GithubAudit::Revoked {
                repositories,
                permissions,
                expires_at,
            } => ("revoked", repositories, permissions, expires_at),
        };
        self.audit.record_token(&TokenRecord {
            ts_ms: crate::now_ms(),
            lease: self.lease.clone(),
            kind: "github-token",
            event: ev,
            repositories: repositories.clone(),
            permissions: permissions.clone(),
            expires_at: *expires_at,
        });
    }
}

/// The lease's running GitHub state inside its door.
pub(crate) struct GithubState {
    pub(super) access: GithubAccess,
    pub(super) placeholder: Secret,
    pub(super) client_tls: Arc<rustls::ClientConfig>,
    /// Every token this lease used, for revocation when it ends.
    used: Mutex<Vec<InstallationToken>>,
    /// What reached GitHub since the last `take_activity` (bounded).
    pub(super) activity: Mutex<Vec<GithubActivity>>,
}

impl GithubState {
    /// The lease's GitHub state; the lease CA and its bundle are the
    /// door's (`crate::intercept`).
    pub(crate) fn new(access: GithubAccess) -> std::io::Result<GithubState> {
        let client_tls = upstream_tls()?;
        Ok(GithubState {
            access,
            placeholder: Secret::new(format!("ghs_moat{}", random_hex(16)?)),
            client_tls,
            used: Mutex::new(Vec::new()),
            activity: Mutex::new(Vec::new()),
        })
    }
    /// The intercepted host named `name` (already normalized), if any.
    pub(crate) fn host(&self, name: &str) -> Option<&InterceptedHost> {
        self.access.hosts.iter().find(|h| h.name == name)
    }

    /// Where pull requests' links point: `https://` and the name the
    /// sandbox uses for git (github.com, or the Enterprise host).
    pub(crate) fn web_base(&self) -> String {
        let git = self
            .access
            .hosts
            .iter()
            .find(|h| h.role != HostRole::Api)
            .map_or("github.com", |h| h.name.as_str());
        format!("https://{git}")
    }

    /// Variables for the sandbox: the placeholder token.
    pub(crate) fn client_env(&self) -> Vec<(String, String)> {
        vec![
            (
                "GH_TOKEN".to_string(),
                self.placeholder.expose().to_string(),
            ),
            (
                "GITHUB_TOKEN".to_string(),
                self.placeholder.expose().to_string(),
            ),
        ]
    }

    /// Revokes every token this lease used; returns how many failed.
    pub(crate) async fn revoke_all(&self) -> usize {
        self.revoke_all_counted().await.1
    }

    /// Revokes every token this lease used; returns (how many, how many failed).
    pub(crate) async fn revoke_all_counted(&self) -> (usize, usize) {
        let tokens: Vec<InstallationToken> = self
            .used
            .lock()
            .map(|mut u| std::mem::take(&mut *u))
            .unwrap_or_default();
        let mut failed = 0;
        let used = tokens.len();
        for t in tokens {
            if let Err(e) = self.access.broker.revoke(&t).await {
                tracing::warn!(error = %e, "could not revoke a GitHub installation token");
                failed += 1;
            }
        }
        (used, failed)
    }

    pub(super) async fn token(&self) -> Result<InstallationToken, moat_creds::CredsError> {
        let t = self.access.broker.token(&self.access.scope).await?;
        if let Ok(mut used) = self.used.lock() {
            if !used.iter().any(|u| u.token.expose() == t.token.expose()) {
                used.push(t.clone());
            }
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::super::protect::effective_role;
    use super::*;

    #[test]
    fn enterprise_hosts_split_api_and_git_by_path() {
        let env = |k: &str| match k {
            "MOAT_GITHUB_HOST" | "MOAT_GITHUB_API_HOST" => Some("GHE.Corp.Example".to_string()),
            "MOAT_GITHUB_URL" => Some("https://ghe.corp.example".to_string()),
            _ => None,
        };
        let hosts = GithubAccess::hosts_from_env(env).unwrap();
        assert_eq!(hosts.len(), 1);
        assert_eq!(
            (hosts[0].name.as_str(), hosts[0].role),
            ("ghe.corp.example", HostRole::Enterprise)
        );
        let r = |p: &str| effective_role(HostRole::Enterprise, p.to_string());
        assert_eq!(
            r("/api/v3/repos/o/r/git/refs/heads/main"),
            (HostRole::Api, "/repos/o/r/git/refs/heads/main".to_string())
        );
        assert_eq!(r("/API/graphql"), (HostRole::Api, "/graphql".to_string()));
        assert_eq!(
            r("/o/r.git/git-receive-pack"),
            (HostRole::Git, "/o/r.git/git-receive-pack".to_string())
        );
        let default = GithubAccess::hosts_from_env(|_| None).unwrap();
        assert_eq!(
            default
                .iter()
                .map(|h| (h.name.as_str(), h.role))
                .collect::<Vec<_>>(),
            [
                ("github.com", HostRole::Git),
                ("api.github.com", HostRole::Api)
            ]
        );
        assert!(GithubAccess::hosts_from_env(
            |k| (k == "MOAT_GITHUB_HOST").then(|| "10.0.0.1".to_string())
        )
        .is_err());
    }
}
