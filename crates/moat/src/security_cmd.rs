//! `moat doctor --security [--config FILE]`: a read-only audit of one
//! deployment (docs/incident.md): file modes of the data directory and the
//! secrets file, listeners other machines can reach and their auth, channels
//! open to everyone, untrusted channels with egress or GitHub write, the
//! gVisor release, and the host tuning `moat doctor` checks.
//!
//! Must never: change anything it looks at, or print a secret (it reads the
//! secrets file's metadata only).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use moat_policy::gateway::{GatewayConfig, SlackMode, Trust, WebAuth};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Low,
    Medium,
    High,
}

impl Severity {
    fn label(self) -> &'static str {
        match self {
            Severity::Low => "low ",
            Severity::Medium => "med ",
            Severity::High => "HIGH",
        }
    }
}

#[derive(Debug)]
pub struct Finding {
    pub severity: Severity,
    pub what: String,
    pub fix: String,
}

fn finding(severity: Severity, what: String, fix: String) -> Finding {
    Finding {
        severity,
        what,
        fix,
    }
}

/// Group- or world-readable (or writable) files and directories moat keeps.
fn mode_findings(data_dir: &Path, secrets: Option<&Path>, out: &mut Vec<Finding>) {
    match std::fs::metadata(data_dir) {
        Ok(m) => {
            let mode = m.mode() & 0o7777;
            if mode & 0o066 != 0 {
                out.push(finding(
                    Severity::High,
                    format!("the data directory {} is mode {mode:04o}: other users can list or change it (it holds the messages, the audit log and the incident flag)", data_dir.display()),
                    format!("chmod 0711 {}", data_dir.display()),
                ));
            }
            if m.uid() != nix::unistd::geteuid().as_raw() {
                out.push(finding(
                    Severity::Medium,
                    format!(
                        "the data directory {} belongs to uid {}, not to moat's user",
                        data_dir.display(),
                        m.uid()
                    ),
                    format!(
                        "chown the directory to the user moat runs as ({})",
                        nix::unistd::geteuid()
                    ),
                ));
            }
            for name in ["moat.db", "moat.db-wal", "audit"] {
                let p = data_dir.join(name);
                if let Ok(m) = std::fs::symlink_metadata(&p) {
                    let mode = m.mode() & 0o7777;
                    let bad = mode & 0o066;
                    if bad != 0 {
                        out.push(finding(
                            Severity::High,
                            format!(
                                "{} is mode {mode:04o}: other users can read or change it",
                                p.display()
                            ),
                            format!("chmod go-rw {}", p.display()),
                        ));
                    }
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => out.push(finding(
            Severity::Medium,
            format!(
                "cannot look at the data directory {}: {e}",
                data_dir.display()
            ),
            "run the check as the user moat runs as".into(),
        )),
    }
    if let Some(s) = secrets {
        match std::fs::metadata(s) {
            Ok(m) => {
                let mode = m.mode() & 0o7777;
                if mode & 0o077 != 0 {
                    out.push(finding(
                        Severity::High,
                        format!("the secrets file {} is mode {mode:04o}: other users can read the keys in it", s.display()),
                        format!("chmod 0600 {} and rotate the keys it holds", s.display()),
                    ));
                }
            }
            Err(e) => out.push(finding(
                Severity::Medium,
                format!("cannot look at the secrets file {}: {e}", s.display()),
                "point --secrets or MOAT_SECRETS_FILE at the file moat up uses".into(),
            )),
        }
    }
}

fn listener_findings(cfg: &GatewayConfig, out: &mut Vec<Finding>) {
    if cfg.web.enabled && !cfg.web.listen.ip().is_loopback() {
        let (sev, auth) = match &cfg.web.auth {
            WebAuth::Loopback => (Severity::High, "none (whoever connects names themselves)".to_string()),
            WebAuth::Token { env } => (Severity::Low, format!("bearer tokens from {env}")),
            WebAuth::Header { header, trusted_proxies } if trusted_proxies.is_empty() => {
                (Severity::Low, format!("header {header} from a proxy on loopback"))
            }
            WebAuth::Header { header, .. } => (Severity::Medium, format!("header {header} from the listed proxies (anyone who can send from their addresses is believed)")),
        };
        out.push(finding(
            sev,
            format!(
                "the web chat listens on {}, reachable from other machines; auth: {auth}",
                cfg.web.listen
            ),
            "listen on 127.0.0.1 behind a TLS proxy, with web.auth = \"token\" or \"header\""
                .into(),
        ));
    }
    if !cfg.admin.listen.ip().is_loopback() {
        out.push(finding(
            Severity::Medium,
            format!("the admin listener (metrics, health) is on {}, reachable from other machines, without auth", cfg.admin.listen),
            "set admin.listen = \"127.0.0.1:9090\" and let the metrics scraper come through a tunnel or proxy".into(),
        ));
    }
    if cfg.slack.mode == SlackMode::Events {
        if let Some(a) = cfg.slack.listen.filter(|a| !a.ip().is_loopback()) {
            out.push(finding(
                Severity::Low,
                format!("Slack events are taken on {a}, reachable from other machines; auth: Slack's request signatures"),
                "expected for the Events API; keep SLACK_SIGNING_SECRET private, or use Socket Mode (slack.mode = \"socket\") and listen nowhere".into(),
            ));
        }
    }
}

fn channel_findings(cfg: &GatewayConfig, out: &mut Vec<Finding>) {
    for c in &cfg.channels {
        let name = c.describe();
        if c.users.everyone {
            let sev = if c.id == "*" && c.trust != Trust::Untrusted {
                Severity::Medium
            } else {
                Severity::Low
            };
            out.push(finding(
                sev,
                format!("{name}: users = [\"*\"], everyone who can post there may run the agent ({} trust)", c.trust.name()),
                "list the users or a group in the channel's users".into(),
            ));
        }
        if c.trust == Trust::Untrusted {
            let policy = c.sandbox_policy();
            if policy.network.is_enabled() {
                out.push(finding(
                    Severity::High,
                    format!("{name}: an untrusted channel whose sandboxes have egress (a hostile prompt can send what it reads to an allowed host)"),
                    "remove the channel's network allowlist, or raise its trust only where everyone is trusted".into(),
                ));
            }
            let gh = &policy.github;
            let writes = gh.permissions.is_empty() || gh.permissions.values().any(|v| v == "write");
            if !gh.repositories.is_empty() && writes {
                out.push(finding(
                    Severity::High,
                    format!("{name}: an untrusted channel with GitHub write access to {}", gh.repositories.join(", ")),
                    "give untrusted channels read permissions only (permissions = { contents = \"read\" })".into(),
                ));
            }
        }
    }
}

/// `runsc --version`'s first line; findings for a missing or old release.
fn gvisor_findings(cfg: &GatewayConfig, out: &mut Vec<Finding>) {
    let uses = cfg
        .channels
        .iter()
        .any(|c| c.sandbox_policy().backend == moat_policy::BackendKind::Gvisor);
    if !uses {
        return;
    }
    let runsc = std::env::var_os("MOAT_RUNSC")
        .map(PathBuf::from)
        .unwrap_or_else(|| "runsc".into());
    match std::process::Command::new(&runsc).arg("--version").output() {
        Ok(o) => {
            let text = String::from_utf8_lossy(&o.stdout).to_string();
            let line = text.lines().next().unwrap_or("").to_string();
            if let Some(year) = release_year(&line) {
                if year < 2024 {
                    out.push(finding(
                        Severity::High,
                        format!("gVisor is an old release ({line}); Debian's package lags years behind gVisor's fixes"),
                        "install runsc from gvisor.dev's release channel (https://gvisor.dev/docs/user_guide/install/)".into(),
                    ));
                }
            } else {
                out.push(finding(
                    Severity::Low,
                    format!("cannot tell gVisor's release from {line:?}"),
                    "check `runsc --version` by hand against gvisor.dev's releases".into(),
                ));
            }
        }
        Err(e) => out.push(finding(
            Severity::High,
            format!(
                "channels use gVisor but {} cannot run: {e}",
                runsc.display()
            ),
            "install runsc (https://gvisor.dev/docs/user_guide/install/)".into(),
        )),
    }
}

/// The year of a runsc version line: `release-20240513.0` or Debian's
/// `0.0~20221219.0`.
pub fn release_year(line: &str) -> Option<u32> {
    let digits: Vec<&str> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|d| d.len() == 8)
        .collect();
    digits.first().and_then(|d| d[..4].parse().ok())
}

fn tuning_findings(out: &mut Vec<Finding>) {
    for c in moat_sandbox::doctor::run_checks() {
        if !c.ok {
            out.push(finding(
                if c.required {
                    Severity::High
                } else {
                    Severity::Low
                },
                format!("{}: {}", c.name, c.detail),
                c.fix.clone().unwrap_or_else(|| "see `moat doctor`".into()),
            ));
        }
    }
}

pub fn run(config: Option<&Path>, secrets: Option<&Path>) -> anyhow::Result<ExitCode> {
    let cfg = crate::up::load_config(config)?;
    let engine = crate::up::engine_config(&cfg);
    let secrets = secrets
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("MOAT_SECRETS_FILE").map(PathBuf::from));
    let mut found = Vec::new();
    mode_findings(&engine.data_dir, secrets.as_deref(), &mut found);
    listener_findings(&cfg, &mut found);
    channel_findings(&cfg, &mut found);
    gvisor_findings(&cfg, &mut found);
    tuning_findings(&mut found);
    found.sort_by_key(|f| std::cmp::Reverse(f.severity));
    println!(
        "moat: security check of {} ({} finding(s))",
        engine.data_dir.display(),
        found.len()
    );
    for f in &found {
        println!("[{}] {}", f.severity.label(), f.what);
        println!("       fix: {}", f.fix);
    }
    if found.iter().any(|f| f.severity == Severity::High) {
        println!("moat: high findings: fix them before exposing this deployment");
        Ok(ExitCode::from(1))
    } else {
        println!("moat: no high finding");
        Ok(ExitCode::SUCCESS)
    }
}

#[cfg(test)]
mod tests {
    use super::release_year;

    #[test]
    fn release_years_of_runsc_version_lines() {
        assert_eq!(release_year("runsc version release-20240513.0"), Some(2024));
        assert_eq!(release_year("runsc version 0.0~20221219.0"), Some(2022));
        assert_eq!(release_year("runsc version unknown"), None);
    }
}
