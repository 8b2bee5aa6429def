//! Opening the store `[store]` names: the SQLite file in the data directory,
//! or a shared PostgreSQL database as one node of several; and, for a node,
//! the loop that renews its leases and takes over the conversations of nodes
//! that stopped (docs/scale-out.md).
//!
//! Must never: read the database password from anywhere but the secrets
//! (`MOAT_STORE_PASSWORD`), or put it into a log line or an error.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use moat_policy::store::StoreConfig;
use moat_store::{PgOptions, Store, StoreError, StoreKey};
use zeroize::Zeroizing;

use crate::pipeline::Gateway;
use crate::server::{SecretFn, ServeError};

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// This process's node id when `store.node` does not give one: the host
/// name (a pod's name on Kubernetes) and the process id.
fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let host = if host.is_empty() { "moat".into() } else { host };
    format!("{host}-{}", std::process::id())
}

/// Opens the store; for PostgreSQL, as a node with its lease.
pub(crate) fn open(
    cfg: &StoreConfig,
    data_dir: &Path,
    key: Option<StoreKey>,
    secret: &SecretFn,
) -> Result<(Store, Option<Duration>), ServeError> {
    match cfg {
        StoreConfig::Sqlite => {
            let db = data_dir.join("moat.db");
            Store::open_with_key(&db, moat_store::Durability::default(), key)
                .map(|s| (s, None))
                .map_err(|source| ServeError::Store { path: db, source })
        }
        StoreConfig::Postgres {
            url,
            pool_size,
            lease,
            node,
        } => {
            let opts = PgOptions {
                url: url.clone(),
                password: secret(moat_store::PASSWORD_VAR).map(Zeroizing::new),
                pool_size: *pool_size as usize,
            };
            let node = node.clone().unwrap_or_else(default_node_id);
            let failed = |source: StoreError| ServeError::Store {
                path: url.into(),
                source,
            };
            let store = Store::open_postgres(&opts, key)
                .and_then(|s| s.with_node(&node, *lease))
                .map_err(failed)?;
            tracing::info!(node = %node, store = %store.path().display(), "one node of several on a PostgreSQL store");
            Ok((store, Some(*lease)))
        }
    }
}

/// A node's heartbeat: every third of the lease, renews this node's leases
/// and takes over (then answers, through the gateway's recovery) the
/// conversations of nodes whose leases ran out. A database that does not
/// answer is logged and tried again next beat.
pub(crate) async fn heartbeat(gw: Gateway, store: Arc<Store>, lease: Duration) {
    let every = lease / 3;
    loop {
        tokio::time::sleep(every).await;
        let s = store.clone();
        let beat = tokio::task::spawn_blocking(move || s.heartbeat(now_ms())).await;
        match beat {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "heartbeat: the store does not answer; this node's leases run out if it stays so");
                continue;
            }
            Err(_) => continue,
        }
        if gw.paused() {
            // Incident mode: nothing runs; the leases are kept.
            continue;
        }
        match gw.recover().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                messages = n,
                "took over the conversations of a node that stopped"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "taking over stopped nodes' conversations failed; trying again next beat")
            }
        }
    }
}
