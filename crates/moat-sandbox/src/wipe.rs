//! The incident sweep: every sandbox of one data directory destroyed at once,
//! for `moat incident` (docs/incident.md).
//!
//! Owns: killing the processes of this data directory's sandbox cgroups and
//! deleting every lease directory no live process holds, named ones (a
//! conversation's kept files) included.
//! Must never: touch another data directory's leases or cgroups (everything
//! is chosen by this directory's scope), or delete a lease whose lock a live
//! process still holds (that process deletes its own lease when its sandbox
//! dies; the sweep waits for it and counts what is left).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::{cgroup, leases_dir_of, scope_of, storage, sweep_views, EngineConfig};

/// What [`destroy_all`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Wiped {
    /// Lease directories deleted (pooled, per-conversation and named).
    pub leases: usize,
    /// Sandbox cgroups whose processes were killed and which were removed.
    pub cgroups: usize,
    /// Lease directories still held by a live process when the sweep gave up.
    pub held: usize,
    /// Lease directories that could not be deleted (each is logged).
    pub failed: usize,
}

/// Destroys every sandbox of the data directory `config` names: the
/// processes in its cgroups are killed (their owners, a gateway or a `moat
/// sandbox run`, then see the run end and let go of the lease), then every
/// lease directory whose lock is free is deleted. Held leases are retried
/// for up to `wait`.
pub fn destroy_all(config: &EngineConfig, wait: Duration) -> Wiped {
    let scope = scope_of(&config.data_dir);
    let leases = leases_dir_of(&config.runtime_dir, &scope);
    let mut wiped = Wiped::default();
    let prefix = format!("{scope}-");
    for cg in cgroup::instance_names() {
        if cg.starts_with(&prefix) && cgroup::remove_stale(&cg).is_ok() {
            wiped.cgroups += 1;
        }
    }
    let deadline = Instant::now() + wait;
    loop {
        let held = delete_free(&leases, &mut wiped);
        if held == 0 || Instant::now() >= deadline {
            wiped.held = held;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // The legacy place (before leases moved to the runtime directory).
    let mut legacy = Wiped::default();
    delete_free(&config.data_dir.join("leases"), &mut legacy);
    wiped.leases += legacy.leases;
    wiped.failed += legacy.failed;
    sweep_views(config, &scope, &leases);
    wiped
}

/// Deletes every free lease under `dir`; returns how many are still held.
fn delete_free(dir: &Path, wiped: &mut Wiped) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut held = 0;
    for e in rd.flatten() {
        let path = e.path();
        if !path.is_dir() {
            continue;
        }
        match storage::Storage::adopt_stale(&path) {
            Ok(Some(st)) => match st.destroy() {
                Ok(()) => wiped.leases += 1,
                Err(err) => {
                    tracing::warn!(lease = %path.display(), error = %err, "could not delete a lease");
                    wiped.failed += 1;
                }
            },
            // Held by a live process (or, without a `uid` file, still being
            // created by one: left alone).
            Ok(None) => {
                if path.join("uid").exists() {
                    held += 1;
                }
            }
            Err(err) => {
                tracing::warn!(lease = %path.display(), error = %err, "could not open a lease");
                wiped.failed += 1;
            }
        }
    }
    held
}
