//! The `[store]` section: where moat keeps its messages. Absent (or without
//! `url`): the SQLite file `DATA_DIR/moat.db`, one gateway. With
//! `url = "postgres://USER@HOST:PORT/DBNAME"`: a PostgreSQL database that
//! several gateway nodes share (docs/scale-out.md).
//!
//! Pure: validates the text only. Must never accept a password in the URL
//! (secrets come from the environment or the secrets file, D6:
//! `MOAT_STORE_PASSWORD`), nor echo a URL that holds one in an error.

use std::time::Duration;

use serde::Deserialize;

use crate::PolicyError;

/// Connections a node keeps to PostgreSQL unless `store.pool_size` says.
pub const DEFAULT_POOL_SIZE: u32 = 8;
/// A node's lease on its conversations unless `store.lease` says.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(15);

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStore {
    url: Option<String>,
    pool_size: Option<i64>,
    lease: Option<String>,
    node: Option<String>,
    retention: Option<String>,
    // Present only to refuse it with a precise message.
    password: Option<toml::Value>,
}

/// Where the store is.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum StoreConfig {
    /// `DATA_DIR/moat.db` (the default).
    #[default]
    Sqlite,
    /// A shared PostgreSQL database.
    Postgres {
        /// Without a password.
        url: String,
        pool_size: u32,
        /// How long a node owns its conversations after its last heartbeat.
        lease: Duration,
        /// This node's id; `None`: the host name and process id.
        node: Option<String>,
    },
}

fn err(key: &str, message: impl Into<String>) -> PolicyError {
    PolicyError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// `store.retention`: how long messages and kept answers stay in the store
/// (`"90d"`, `"12h"`); `None`: kept until deleted by hand. At least an
/// hour, at most 100 years.
pub(crate) fn retention(raw: &RawStore) -> Result<Option<Duration>, PolicyError> {
    let Some(text) = &raw.retention else {
        return Ok(None);
    };
    let d = match text.trim().strip_suffix('d') {
        Some(days) => days
            .trim()
            .parse::<u64>()
            .map(|n| Duration::from_secs(n.saturating_mul(86_400)))
            .map_err(|_| format!("{text:?} is not a number of days; write e.g. \"90d\"")),
        None => crate::parse_duration(text),
    }
    .map_err(|m| err("store.retention", m))?;
    if !(Duration::from_secs(3600)..=Duration::from_secs(100 * 365 * 86_400)).contains(&d) {
        return Err(err(
            "store.retention",
            format!("{text:?} is out of range; keep messages at least 1h and at most 36500d, or leave it out to keep them"),
        ));
    }
    Ok(Some(d))
}

pub(crate) fn section(raw: RawStore) -> Result<StoreConfig, PolicyError> {
    if raw.password.is_some() {
        return Err(err(
            "store.password",
            "secrets never go in the config file; give the database password as MOAT_STORE_PASSWORD in moat's environment or secrets file",
        ));
    }
    let Some(url) = raw.url else {
        for (set, key) in [
            (raw.pool_size.is_some(), "store.pool_size"),
            (raw.lease.is_some(), "store.lease"),
            (raw.node.is_some(), "store.node"),
        ] {
            if set {
                return Err(err(
                    key,
                    "applies to a PostgreSQL store only; set store.url = \"postgres://USER@HOST:PORT/DBNAME\" or remove it",
                ));
            }
        }
        return Ok(StoreConfig::Sqlite);
    };
    let rest = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
        .ok_or_else(|| {
            err(
                "store.url",
                "must start with postgres:// (postgres://USER@HOST:PORT/DBNAME); leave it out for the SQLite file in the data directory",
            )
        })?;
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    if let Some((userinfo, _)) = authority.rsplit_once('@') {
        if userinfo.contains(':') {
            return Err(err(
                "store.url",
                "holds a password; remove it from the URL and give it as MOAT_STORE_PASSWORD in moat's environment or secrets file",
            ));
        }
    }
    if rest.contains("password=") {
        return Err(err(
            "store.url",
            "holds a password parameter; give the password as MOAT_STORE_PASSWORD in moat's environment or secrets file",
        ));
    }
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if host.is_empty() {
        return Err(err(
            "store.url",
            "names no host; write postgres://USER@HOST:PORT/DBNAME",
        ));
    }
    let pool_size = match raw.pool_size {
        None => DEFAULT_POOL_SIZE,
        Some(n) if (1..=256).contains(&n) => n as u32,
        Some(n) => {
            return Err(err(
                "store.pool_size",
                format!("{n} is out of range; use 1 to 256 connections"),
            ))
        }
    };
    let lease = match raw.lease {
        None => DEFAULT_LEASE,
        Some(t) => {
            let d = crate::parse_duration(&t).map_err(|m| err("store.lease", m))?;
            if !(Duration::from_secs(3)..=Duration::from_secs(600)).contains(&d) {
                return Err(err(
                    "store.lease",
                    format!("{t:?} is out of range; use 3s to 10m (a dead node's conversations wait this long)"),
                ));
            }
            d
        }
    };
    if let Some(n) = &raw.node {
        if n.is_empty() || n.len() > 200 || n.chars().any(char::is_control) {
            return Err(err("store.node", "must be 1 to 200 printable characters"));
        }
    }
    Ok(StoreConfig::Postgres {
        url,
        pool_size,
        lease,
        node: raw.node,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<StoreConfig, PolicyError> {
        section(toml::from_str(text).unwrap())
    }

    #[test]
    fn absent_is_sqlite_and_a_postgres_url_is_taken_with_defaults() {
        assert_eq!(parse("").unwrap(), StoreConfig::Sqlite);
        assert_eq!(
            parse(r#"url = "postgres://moat@db:5432/moat""#).unwrap(),
            StoreConfig::Postgres {
                url: "postgres://moat@db:5432/moat".into(),
                pool_size: DEFAULT_POOL_SIZE,
                lease: DEFAULT_LEASE,
                node: None,
            }
        );
    }

    #[test]
    fn a_password_is_refused_wherever_it_is_written_and_never_echoed() {
        for text in [
            r#"url = "postgres://moat:s3cret-pw@db/moat""#,
            r#"url = "postgres://db/moat?user=moat&password=s3cret-pw""#,
            r#"password = "s3cret-pw""#,
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains("MOAT_STORE_PASSWORD"), "{e}");
            assert!(!e.contains("s3cret"), "{e}");
        }
    }

    #[test]
    fn retention_takes_days_or_hours_and_refuses_nonsense_naming_the_key() {
        let r = |t: &str| retention(&toml::from_str(t).unwrap());
        assert_eq!(r("").unwrap(), None);
        assert_eq!(
            r(r#"retention = "90d""#).unwrap(),
            Some(Duration::from_secs(90 * 86_400))
        );
        assert_eq!(
            r(r#"retention = "12h""#).unwrap(),
            Some(Duration::from_secs(12 * 3600))
        );
        for bad in [
            r#"retention = "5m""#,
            r#"retention = "xd""#,
            r#"retention = "soon""#,
            r#"retention = "99999d""#,
        ] {
            let e = r(bad).unwrap_err().to_string();
            assert!(e.starts_with("store.retention"), "{bad}: {e}");
        }
    }

    #[test]
    fn bad_values_name_their_key() {
        for (text, key) in [
            (r#"url = "mysql://moat@db/moat""#, "store.url"),
            (r#"url = "postgres:///moat""#, "store.url"),
            (
                r#"url = "postgres://m@db/x"
pool_size = 0"#,
                "store.pool_size",
            ),
            (
                r#"url = "postgres://m@db/x"
lease = "1s""#,
                "store.lease",
            ),
            (r#"pool_size = 4"#, "store.pool_size"),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.starts_with(key), "{text}: {e}");
        }
    }
}

#[cfg(test)]
mod deploy_tests {
    /// The Kubernetes manifests' `moat.toml` (deploy/kubernetes/configmap.yaml)
    /// is a configuration moat accepts, with its PostgreSQL store.
    #[test]
    fn the_kubernetes_configmap_is_a_valid_configuration() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deploy/kubernetes/configmap.yaml"
        );
        let yaml = std::fs::read_to_string(path).unwrap();
        let start = yaml.find("moat.toml: |").unwrap();
        let toml: String = yaml[start..]
            .lines()
            .skip(1)
            .map(|l| l.strip_prefix("    ").unwrap_or(l.trim()))
            .map(|l| format!("{l}\n"))
            .collect();
        let cfg = crate::gateway::GatewayConfig::from_toml(&toml)
            .unwrap_or_else(|e| panic!("{e}\n--- in ---\n{toml}"));
        assert!(matches!(
            cfg.store,
            super::StoreConfig::Postgres { ref url, .. } if url.starts_with("postgres://moat@")
        ));
    }
}
