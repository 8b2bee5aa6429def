//! GitHub for the gateway's turns: for each channel with `github = { ... }`,
//! what its doors need to intercept GitHub (the App's settings, the token's
//! scope, the intercepted hosts, the protected branches), made once at start;
//! each door then gets a broker of its own, so revoking one turn's token ends
//! nobody else's.
//!
//! Must never: read, hold or pass on a token (the broker mints inside the
//! door), give a turn a scope wider than its channel's, or start a channel
//! with GitHub when the App is not configured (the error names the variable).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use moat_creds::{GithubBroker, GithubConfig, Scope};
use moat_egress::github::{GithubAccess, InterceptedHost, TokenAudit};
use moat_policy::gateway::GatewayConfig;

/// One channel's GitHub, ready to give each of its doors a broker.
#[derive(Clone)]
pub struct GithubTemplate {
    cfg: GithubConfig,
    scope: Scope,
    hosts: Vec<InterceptedHost>,
    protected: Vec<String>,
    workflows_write: bool,
    state_root: PathBuf,
}

impl std::fmt::Debug for GithubTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GithubTemplate")
            .field("scope", &self.scope)
            .field("protected", &self.protected)
            .finish_non_exhaustive()
    }
}

impl GithubTemplate {
    /// A template from its parts (`moat sandbox run --github` builds one
    /// from its flags; the gateway's come from [`templates`]). Each door's
    /// state lives under `state_root/<door name>`.
    pub fn new(
        cfg: GithubConfig,
        scope: Scope,
        hosts: Vec<InterceptedHost>,
        protected: Vec<String>,
        state_root: PathBuf,
    ) -> GithubTemplate {
        let workflows_write =
            scope.permissions().get("workflows").map(String::as_str) == Some("write");
        GithubTemplate {
            cfg,
            scope,
            hosts,
            protected,
            workflows_write,
            state_root,
        }
    }

    /// The access one door (named `lease`) gets: a broker of its own whose
    /// mint and revoke events go to `audit`.
    pub fn access(
        &self,
        lease: &str,
        audit: Arc<dyn moat_egress::Audit>,
    ) -> Result<GithubAccess, String> {
        let broker = GithubBroker::new(
            self.cfg.clone(),
            moat_creds::system_clock(),
            Arc::new(TokenAudit {
                lease: lease.to_string(),
                audit,
            }),
        )
        .map_err(|e| format!("GitHub App: {e}"))?;
        Ok(GithubAccess {
            broker: Arc::new(broker),
            scope: self.scope.clone(),
            hosts: self.hosts.clone(),
            protected_branches: self.protected.clone(),
            workflows_write: self.workflows_write,
            state_dir: self.state_root.join(lease),
            push_gate: None,
        })
    }
}

/// The templates of every channel with GitHub, by channel index. Fails,
/// naming the variable or key, when the App is not configured.
pub fn templates(
    cfg: &GatewayConfig,
    secret: &(dyn Fn(&str) -> Option<String> + Send + Sync),
    runtime_dir: &Path,
) -> Result<HashMap<usize, GithubTemplate>, String> {
    let mut out = HashMap::new();
    if !cfg.channels.iter().any(|c| c.github.is_some()) {
        return Ok(out);
    }
    let section = &cfg.github;
    // The App's secrets come from the environment or secrets file; where
    // its API and git hosts are comes from [github].
    let lookup = |k: &str| -> Option<String> {
        match k {
            "MOAT_GITHUB_API_URL" => Some(section.api_url.clone()),
            "MOAT_GITHUB_URL" => Some(section.web_url.clone()),
            "MOAT_GITHUB_ALLOW_PLAIN_HTTP" => {
                Some(if section.allow_plain_http { "1" } else { "0" }.into())
            }
            "MOAT_GITHUB_HOST" | "MOAT_GITHUB_API_HOST" => None,
            other => secret(other),
        }
    };
    let first = cfg
        .channels
        .iter()
        .find(|c| c.github.is_some())
        .map(|c| c.index)
        .unwrap_or(0);
    let app = GithubConfig::from_lookup(lookup).map_err(|e| {
        format!("channel[{first}].github: {e} (the GitHub App's settings go in moat's environment or secrets file)")
    })?;
    let hosts = GithubAccess::hosts_from_env(lookup).map_err(|e| format!("github: {e}"))?;
    let state_root = runtime_dir.join("doors");
    for c in &cfg.channels {
        let Some(g) = &c.github else { continue };
        let scope = Scope::new(
            g.repos.clone(),
            g.permissions
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<Vec<_>>(),
        )
        .map_err(|e| format!("channel[{}].github: {e}", c.index))?;
        out.insert(
            c.index,
            GithubTemplate {
                cfg: app.clone(),
                scope,
                hosts: hosts.clone(),
                protected: g.protect.clone(),
                workflows_write: g.workflows_write(),
                state_root: state_root.clone(),
            },
        );
    }
    Ok(out)
}
