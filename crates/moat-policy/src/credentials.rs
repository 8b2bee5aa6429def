//! The `[llm]` and `[github]` sections of a policy: which credentials the
//! sandbox's door serves and within which limits. Pure data and validation;
//! never a key, a token or a file of secrets (those come from moat's
//! environment or secrets file, never from a policy).

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::PolicyError;

/// `[llm]`: the door's LLM proxy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LlmSettings {
    /// `anthropic`, `openai`; empty: no LLM proxy.
    pub providers: Vec<String>,
    /// Models a call may name; empty: any.
    pub models: Vec<String>,
    /// Tokens the lease may use.
    pub budget: Option<u64>,
    /// Tokens the user may use over all runs.
    pub user_budget: Option<u64>,
    /// Upstream bases; `None`: `MOAT_ANTHROPIC_URL` / `MOAT_OPENAI_URL`, else the public APIs.
    pub anthropic_url: Option<String>,
    pub openai_url: Option<String>,
}

/// `[github]`: GitHub App tokens injected by the door.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GithubSettings {
    /// `OWNER/REPO`; empty: no GitHub access.
    pub repositories: Vec<String>,
    /// `name = "read" | "write"`; empty: contents and pull_requests write.
    pub permissions: BTreeMap<String, String>,
    /// Branches no push may update; `None`: main and master.
    pub protected_branches: Option<Vec<String>>,
    /// Upstreams; `None`: `MOAT_GITHUB_URL` / `MOAT_GITHUB_API_URL`, else github.com.
    pub url: Option<String>,
    pub api_url: Option<String>,
    /// Names the sandbox uses; `None`: `MOAT_GITHUB_HOST` / `MOAT_GITHUB_API_HOST`,
    /// else github.com and api.github.com. The same name twice: GitHub
    /// Enterprise Server (API under `/api/`).
    pub host: Option<String>,
    pub api_host: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLlm {
    #[serde(default)]
    providers: Vec<String>,
    #[serde(default)]
    models: Vec<String>,
    budget: Option<i64>,
    user_budget: Option<i64>,
    anthropic_url: Option<String>,
    openai_url: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawGithub {
    #[serde(default)]
    repositories: Vec<String>,
    #[serde(default)]
    permissions: BTreeMap<String, String>,
    protected_branches: Option<Vec<String>>,
    url: Option<String>,
    api_url: Option<String>,
    host: Option<String>,
    api_host: Option<String>,
}

fn err(key: impl Into<String>, message: impl Into<String>) -> PolicyError {
    PolicyError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

fn tokens(v: Option<i64>, key: &str) -> Result<Option<u64>, PolicyError> {
    match v {
        None => Ok(None),
        Some(n) if n > 0 => Ok(Some(n as u64)),
        Some(n) => Err(err(
            key,
            format!("{n} is not a number of tokens; use 1 or more"),
        )),
    }
}

fn url(v: Option<String>, key: &str) -> Result<Option<String>, PolicyError> {
    match v {
        Some(u) if !(u.starts_with("https://") || u.starts_with("http://")) => Err(err(
            key,
            format!("{u:?} is not a URL; write https://host[:port][/base]"),
        )),
        other => Ok(other),
    }
}

fn host(v: Option<String>, key: &str) -> Result<Option<String>, PolicyError> {
    match v {
        Some(h) => match crate::network::normalize_name(&h) {
            Some(n) if crate::network::parse_ip_literal(&n).is_none() => Ok(Some(n)),
            _ => Err(err(
                key,
                format!("{h:?} is not a host name such as \"github.example.com\""),
            )),
        },
        None => Ok(None),
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

impl RawLlm {
    pub(crate) fn validate(self) -> Result<LlmSettings, PolicyError> {
        for (i, p) in self.providers.iter().enumerate() {
            if p != "anthropic" && p != "openai" {
                return Err(err(
                    format!("llm.providers[{i}]"),
                    format!("unknown provider {p:?}; use \"anthropic\" or \"openai\""),
                ));
            }
        }
        for (i, m) in self.models.iter().enumerate() {
            if m.trim().is_empty() {
                return Err(err(format!("llm.models[{i}]"), "a model name is empty"));
            }
        }
        Ok(LlmSettings {
            providers: self.providers,
            models: self.models,
            budget: tokens(self.budget, "llm.budget")?,
            user_budget: tokens(self.user_budget, "llm.user_budget")?,
            anthropic_url: url(self.anthropic_url, "llm.anthropic_url")?,
            openai_url: url(self.openai_url, "llm.openai_url")?,
        })
    }
}

impl RawGithub {
    pub(crate) fn validate(self) -> Result<GithubSettings, PolicyError> {
        for (i, r) in self.repositories.iter().enumerate() {
            let ok = r
                .split_once('/')
                .is_some_and(|(o, n)| name_ok(o) && name_ok(n));
            if !ok {
                return Err(err(
                    format!("github.repositories[{i}]"),
                    format!("{r:?} is not OWNER/REPO"),
                ));
            }
        }
        for (k, v) in &self.permissions {
            if !matches!(v.as_str(), "read" | "write") {
                return Err(err(
                    format!("github.permissions.{k}"),
                    format!("{v:?} is not a level; use \"read\" or \"write\""),
                ));
            }
        }
        if let Some(bs) = &self.protected_branches {
            for (i, b) in bs.iter().enumerate() {
                if b.is_empty() || b.starts_with("refs/") || b.contains(' ') {
                    return Err(err(
                        format!("github.protected_branches[{i}]"),
                        format!("{b:?} is not a branch name such as \"main\""),
                    ));
                }
            }
        }
        Ok(GithubSettings {
            repositories: self.repositories,
            permissions: self.permissions,
            protected_branches: self.protected_branches,
            url: url(self.url, "github.url")?,
            api_url: url(self.api_url, "github.api_url")?,
            host: host(self.host, "github.host")?,
            api_host: host(self.api_host, "github.api_host")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::SandboxPolicy;

    #[test]
    fn sections_are_read_and_checked() {
        let p = SandboxPolicy::from_toml(
            r#"
[llm]
providers = ["anthropic"]
models = ["claude-sonnet-4-5"]
budget = 1000
anthropic_url = "https://llm.corp.example/anthropic"

[github]
repositories = ["acme/widget"]
permissions = { contents = "write" }
protected_branches = ["main", "release"]
"#,
        )
        .unwrap();
        assert_eq!(p.llm.providers, ["anthropic"]);
        assert_eq!(p.llm.budget, Some(1000));
        assert_eq!(p.github.repositories, ["acme/widget"]);
        assert_eq!(
            p.github.protected_branches.as_deref(),
            Some(&["main".to_string(), "release".to_string()][..])
        );
        for (text, key) in [
            ("[llm]\nproviders = [\"gemini\"]", "llm.providers[0]"),
            ("[llm]\nbudget = 0", "llm.budget"),
            ("[llm]\nopenai_url = \"api.openai.com\"", "llm.openai_url"),
            ("[llm]\napi_key = \"sk-1\"", "llm.api_key"),
            (
                "[github]\nrepositories = [\"widget\"]",
                "github.repositories[0]",
            ),
            (
                "[github]\npermissions = { contents = \"all\" }",
                "github.permissions.contents",
            ),
            (
                "[github]\nprotected_branches = [\"refs/heads/main\"]",
                "github.protected_branches[0]",
            ),
            ("[github]\nprivate_key = \"x\"", "github"),
            ("[github]\nhost = \"10.1.2.3\"", "github.host"),
        ] {
            let e = SandboxPolicy::from_toml(text).unwrap_err().to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
    }
}
