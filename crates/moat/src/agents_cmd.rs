//! `moat agents ...`: the template of agent CLIs (Claude Code, Codex, Amp)
//! that the gateway mounts read-only in agent sandboxes (installed with the
//! prefix `/opt/moat-agents`, working at any mount point).
//!
//! Owns the command line of `moat agents install` and its inputs (the
//! pinned packages, package specs, the registry); the install itself is
//! `agents_install`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::bail;
use clap::{Args, Subcommand};
use moat_policy::network::parse_allow_entry;

/// Claude Code's pinned version; the same as `CLAUDE_CODE_VERSION` in
/// scripts/setup (a test fails if they differ).
pub const CLAUDE_CODE_VERSION: &str = "2.1.330";
/// The Codex CLI's pinned version; the same as `CODEX_VERSION` in scripts/setup.
pub const CODEX_VERSION: &str = "0.169.0";
/// Amp's pinned version (`@ampcode/cli`, the CLI's package since
/// `@sourcegraph/amp` was renamed); the same as `AMP_VERSION` in scripts/setup.
pub const AMP_VERSION: &str = "0.0.1790142911-g7618fb";
/// Pi's pinned version (`npm view @mariozechner/pi-coding-agent version`);
/// the same as `PI_VERSION` in scripts/setup.
pub const PI_VERSION: &str = "0.73.1";

/// Where the template is seen inside sandboxes (npm's `--prefix`): the CLIs
/// are at `/opt/moat-agents/bin/{claude,codex,amp,pi}`.
pub const SANDBOX_PREFIX: &str = "/opt/moat-agents";
/// Where the check also mounts a new version: the template must work
/// wherever it is mounted (the gateway shows it at its own path).
pub(crate) const RELOCATED_PREFIX: &str = "/opt/moat-agents-moved";
/// npm's download cache inside the install sandbox (a scratch directory of
/// the install, deleted with it).
pub(crate) const SANDBOX_CACHE: &str = "/opt/moat-npm-cache";
/// The public npm registry.
pub const DEFAULT_REGISTRY: &str = "https://registry.npmjs.org/";
/// The name of the symlink to the version in use.
pub use moat_sandbox::versions::CURRENT;
/// What moat writes into each version: what was installed, from where.
pub const MANIFEST: &str = "moat-template.json";
/// How long one command's `--version` may take in the check.
pub(crate) const VERSION_TIMEOUT: Duration = Duration::from_secs(60);
/// The host's CA store (Debian's path), which sandboxes see in their /etc.
pub(crate) const HOST_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// Where the sandbox sees the host's `npm` and `node` (its PATH).
pub(crate) const SANDBOX_PATH_DIRS: &[&str] = &[
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

#[derive(Subcommand)]
pub enum AgentsCmd {
    /// Install the agent CLIs (Claude Code, Codex, Amp) into a new version of
    /// the sandbox template, with npm inside a sandbox that may reach only the
    /// package registry, and switch DIR/current to it.
    Install(InstallArgs),
}

#[derive(Args)]
pub struct InstallArgs {
    /// The template directory: versions and the `current` symlink
    /// [default: $MOAT_DATA_DIR/agents, else /var/lib/moat/agents].
    #[arg(long, value_name = "DIR")]
    pub(crate) dir: Option<PathBuf>,
    /// The npm registry; the install sandbox's door allows its host and port
    /// and nothing else.
    #[arg(long, value_name = "URL", default_value = DEFAULT_REGISTRY)]
    pub(crate) registry: String,
    /// Pin a name to an address for the door (e.g. a registry mirror on this
    /// network). Repeatable. A pinned name is still refused unless it is the
    /// registry's.
    #[arg(long = "resolve", value_name = "HOST=IP")]
    pub(crate) resolve: Vec<String>,
    /// Isolation backend of the install and check sandboxes.
    #[arg(long, value_name = "bwrap|gvisor", default_value = "bwrap")]
    pub(crate) backend: String,
    /// A package to install instead of the defaults (repeatable): NAME@VERSION.
    /// Default: @anthropic-ai/claude-code, @openai/codex and @ampcode/cli
    /// at the versions this moat pins.
    #[arg(long = "package", value_name = "NAME@VERSION")]
    pub(crate) packages: Vec<String>,
    /// Time limit of the npm install, e.g. 20m.
    #[arg(long, value_name = "DURATION", default_value = "20m")]
    pub(crate) timeout: String,
    /// Versions to keep, the new one included (older ones are removed).
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub(crate) keep: usize,
}

pub fn run(cmd: AgentsCmd) -> anyhow::Result<()> {
    match cmd {
        AgentsCmd::Install(args) => crate::agents_install::install(args),
    }
}

// ---------------------------------------------------------------------------
// Inputs
// ---------------------------------------------------------------------------

/// One package to install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Package {
    pub name: String,
    pub version: String,
    /// The command the package must provide (the defaults' CLIs).
    pub command: Option<&'static str>,
}

impl Package {
    pub(crate) fn spec(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }
}

/// Claude Code, Codex, Amp and Pi at the pinned versions.
pub fn default_packages() -> Vec<Package> {
    [
        ("@anthropic-ai/claude-code", CLAUDE_CODE_VERSION, "claude"),
        ("@openai/codex", CODEX_VERSION, "codex"),
        ("@ampcode/cli", AMP_VERSION, "amp"),
        ("@mariozechner/pi-coding-agent", PI_VERSION, "pi"),
    ]
    .into_iter()
    .map(|(n, v, c)| Package {
        name: n.into(),
        version: v.into(),
        command: Some(c),
    })
    .collect()
}

fn npm_name_ok(part: &str) -> bool {
    !part.is_empty()
        && part.len() <= 214
        && !part.starts_with(['.', '_'])
        && part.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'_' | b'~')
        })
}

/// Parses `NAME@VERSION` (`@scope/name@1.2.3`, `name@latest`). Only registry
/// package names and plain versions or tags: no URLs, paths or git specs,
/// which would make npm fetch from somewhere else than the registry.
pub fn parse_package(text: &str) -> Result<Package, String> {
    let at = text
        .rfind('@')
        .filter(|&i| i > 0)
        .ok_or_else(|| format!("--package {text:?}: write NAME@VERSION, e.g. tinycli@1.0.0"))?;
    let (name, version) = (&text[..at], &text[at + 1..]);
    let name_ok = match name.strip_prefix('@') {
        Some(scoped) => scoped
            .split_once('/')
            .is_some_and(|(s, n)| npm_name_ok(s) && npm_name_ok(n)),
        None => npm_name_ok(name),
    };
    if !name_ok {
        return Err(format!(
            "--package {text:?}: {name:?} is not an npm package name (lowercase letters, digits, - . _ ~, optionally @scope/)"
        ));
    }
    let version_ok = !version.is_empty()
        && version.len() <= 128
        && version
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'+' | b'_'));
    if !version_ok {
        return Err(format!(
            "--package {text:?}: {version:?} is not a version or tag (letters, digits, . - + _)"
        ));
    }
    Ok(Package {
        name: name.into(),
        version: version.into(),
        command: None,
    })
}

/// Whether `version` names one exact version (so the installed one must match).
pub(crate) fn is_exact_version(version: &str) -> bool {
    version.starts_with(|c: char| c.is_ascii_digit())
}

/// The registry, and the one door allowlist entry it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registry {
    /// As npm gets it, ending in `/`.
    pub url: String,
    /// The allowlist entry `host:port`.
    pub entry: String,
    /// The host as the door records it.
    pub host: String,
}

/// Parses an `http://` or `https://` registry URL. A URL with a user or
/// password is refused: credentials never go on a command line.
pub fn parse_registry(text: &str) -> Result<Registry, String> {
    let bad = |why: &str| Err(format!("--registry {text:?}: {why}"));
    let (rest, default_port) = if let Some(r) = text.strip_prefix("https://") {
        (r, 443)
    } else if let Some(r) = text.strip_prefix("http://") {
        (r, 80)
    } else {
        return bad("use an http:// or https:// URL, e.g. https://registry.npmjs.org/");
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.contains('@') {
        return bad("a user or password in the URL is not supported (it would show in process lists and logs)");
    }
    if path.contains(['?', '#']) || text.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return bad("a registry URL has no query, fragment, spaces or control characters");
    }
    let entry_text = if authority.ends_with(']') || !authority.contains(':') {
        format!("{authority}:{default_port}")
    } else {
        authority.to_string()
    };
    let entry = parse_allow_entry(&entry_text).map_err(|e| format!("--registry {text:?}: {e}"))?;
    let host = match &entry.host {
        moat_policy::network::HostPattern::Exact(h) => h.clone(),
        moat_policy::network::HostPattern::Ip(ip) => ip.to_string(),
        moat_policy::network::HostPattern::Subdomains(_) => {
            return bad("the host is not a name or an address")
        }
    };
    let mut url = format!("{}{authority}{path}", &text[..text.len() - rest.len()]);
    if !url.ends_with('/') {
        url.push('/');
    }
    Ok(Registry {
        url,
        entry: entry.to_string(),
        host,
    })
}

/// `$MOAT_DATA_DIR/agents`, else the gateway's default data directory's.
pub(crate) fn default_dir() -> PathBuf {
    std::env::var_os("MOAT_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(moat_policy::gateway::DEFAULT_DATA_DIR))
        .join("agents")
}

/// The host's npm and node, where the sandbox finds them (its PATH lies in
/// /usr and /bin, which it sees read-only).
pub(crate) fn check_host_tools() -> anyhow::Result<()> {
    for tool in ["npm", "node"] {
        let found = SANDBOX_PATH_DIRS
            .iter()
            .any(|d| Path::new(d).join(tool).is_file());
        if !found {
            bail!(
                "{tool} is not installed in /usr or /bin, where sandboxes find it: install Node.js and npm \
                 from your distribution (e.g. apt-get install nodejs npm); moat runs the host's npm \
                 inside the install sandbox"
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// scripts/setup installs the CLIs on the host for the tests; the template
    /// must pin the same versions.
    #[test]
    fn pins_agree_with_scripts_setup() {
        let setup = include_str!("../../../scripts/setup");
        let value = |name: &str| {
            setup
                .lines()
                .find_map(|l| l.trim().strip_prefix(&format!("{name}=")))
                .map(|v| v.trim_matches('"').to_string())
                .unwrap_or_else(|| panic!("scripts/setup has no {name}= line"))
        };
        assert_eq!(value("CLAUDE_CODE_VERSION"), CLAUDE_CODE_VERSION);
        assert_eq!(value("CODEX_VERSION"), CODEX_VERSION);
        assert_eq!(value("AMP_VERSION"), AMP_VERSION);
        assert_eq!(value("PI_VERSION"), PI_VERSION);
        let defaults = default_packages();
        assert_eq!(
            defaults[0].spec(),
            format!("@anthropic-ai/claude-code@{CLAUDE_CODE_VERSION}")
        );
        assert_eq!(defaults[1].spec(), format!("@openai/codex@{CODEX_VERSION}"));
        assert_eq!(defaults[2].spec(), format!("@ampcode/cli@{AMP_VERSION}"));
    }

    #[test]
    fn package_specs() {
        let p = parse_package("@scope/a-b@1.2.3").unwrap();
        assert_eq!(
            (p.name.as_str(), p.version.as_str()),
            ("@scope/a-b", "1.2.3")
        );
        assert_eq!(parse_package("tinycli@latest").unwrap().version, "latest");
        for bad in [
            "tinycli",
            "@scope/x",
            "tinycli@",
            "Tiny@1",
            "github:x/y@1",
            "../x@1",
            "x@file:/etc",
            "x@1 2",
            "@scope@1",
            ".x@1",
        ] {
            assert!(parse_package(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn registry_urls() {
        let r = parse_registry("https://registry.npmjs.org").unwrap();
        assert_eq!(r.url, "https://registry.npmjs.org/");
        assert_eq!(r.entry, "registry.npmjs.org:443");
        assert_eq!(r.host, "registry.npmjs.org");
        let r = parse_registry("http://registry.test:4873/npm").unwrap();
        assert_eq!(r.url, "http://registry.test:4873/npm/");
        assert_eq!(r.entry, "registry.test:4873");
        let r = parse_registry("http://10.0.0.5/").unwrap();
        assert_eq!(r.entry, "10.0.0.5:80");
        assert_eq!(r.host, "10.0.0.5");
        for bad in [
            "ftp://x/",
            "registry.npmjs.org",
            "https://user:pw@registry.npmjs.org/",
            "https://x/?q",
            "https://*.x/",
            "https://x:99999/",
        ] {
            assert!(parse_registry(bad).is_err(), "{bad} accepted");
        }
    }
}
