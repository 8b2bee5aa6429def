//! The runner pool (docs/design.md D5): pre-warmed leases of one sandbox policy,
//! handed out one request at a time and reset to a clean state afterwards.
//!
//! Owns: the idle leases, the FIFO of waiters (bounded), health checks on
//! acquire, rebuilding a lease that failed, and each lease's egress door.
//! Must never: give one lease to two holders at once, hand out a lease that
//! has not been reset since its last holder, or block the async runtime on
//! sandbox work (leases start, reset and stop on blocking threads).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use moat_policy::SandboxPolicy;
use moat_sandbox::{Engine, Lease, LeaseOptions, NetworkAttachment, WorkspaceSource};
use tokio::sync::oneshot;

/// Why a lease could not be had.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// Every lease is busy and the waiting line is full.
    #[error("all {size} sandboxes are busy and {waiting} requests are already waiting; try again shortly")]
    Full { size: usize, waiting: usize },
    /// A lease could not be built or started.
    #[error("could not prepare a sandbox: {0}")]
    Sandbox(String),
    /// The pool is shutting down.
    #[error("the sandbox pool is shutting down")]
    Closed,
}

/// A lease with its door (when the policy allows any network or serves
/// credentials). The door lives exactly as long as the lease.
pub struct Runner {
    pub lease: Lease,
    pub door: Option<moat_egress::Door>,
    /// The lease's IPC endpoint (crate::ipc), bound to a caller per turn.
    pub ipc: Option<crate::ipc::Endpoint>,
}

/// How the pool makes a runner: the engine, the policy, and an optional door
/// factory (the gateway supplies one that wires the audit log).
pub trait RunnerFactory: Send + Sync + 'static {
    /// Builds one runner (on a blocking thread).
    fn build(&self) -> Result<Runner, String>;
}

/// The plain factory: one lease of `policy` per runner, with a door when the
/// policy allows any destination.
pub struct LeaseFactory {
    pub engine: Arc<Engine>,
    pub policy: SandboxPolicy,
    /// The uid the runners share (a channel's group folder owner).
    pub run_as: Option<u32>,
    /// The door's LLM proxy, and moat's own files for the sandbox (e.g. the
    /// moat binary for the built-in agent).
    pub extras: DoorExtras,
    pub runtime: tokio::runtime::Handle,
    pub audit: Arc<dyn moat_egress::Audit>,
    /// Names the runners in audit records (`<prefix>-<n>`).
    pub prefix: String,
    pub counter: std::sync::atomic::AtomicU64,
    /// Gives each runner an IPC endpoint of its own (`None`: none).
    pub ipc: Option<Arc<crate::ipc::IpcHost>>,
}

impl RunnerFactory for LeaseFactory {
    fn build(&self) -> Result<Runner, String> {
        let n = self
            .counter
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("{}-{n}", self.prefix);
        let mut extras = self.extras.clone();
        let ipc = match &self.ipc {
            Some(host) => {
                let ep = host.endpoint(&name)?;
                extras.files.push(ep.mount());
                Some(ep)
            }
            None => None,
        };
        let door = start_door(
            &self.runtime,
            &self.policy,
            &name,
            self.audit.clone(),
            &extras,
        )?;
        let network = door.as_ref().map(|d| attachment(d, &extras));
        let mut lease = self
            .engine
            .lease(
                self.policy.clone(),
                LeaseOptions {
                    run_as: self.run_as,
                    name: None,
                    workspace: WorkspaceSource::Fresh,
                    network,
                },
            )
            .map_err(|e| e.to_string())?;
        if let Some(ep) = &ipc {
            ep.grant(lease.host_uid())?;
        }
        lease.start().map_err(|e| e.to_string())?;
        Ok(Runner { lease, door, ipc })
    }
}

/// What a channel's doors add to the policy's egress: the LLM proxy (the
/// real keys stay in the door) and moat's own read-only files under
/// `/run/moat` (host path, path inside).
#[derive(Clone, Default)]
pub struct DoorExtras {
    pub llm: Option<moat_egress::llm::LlmConfig>,
    pub files: Vec<(std::path::PathBuf, std::path::PathBuf)>,
    /// GitHub interception with a token of the channel's scope.
    pub github: Option<crate::github_setup::GithubTemplate>,
    /// Amp's key injected for Amp's host; its `state_dir` is the root under
    /// which each door gets a directory of its own.
    pub amp: Option<moat_egress::amp::AmpAccess>,
}

/// The lease's side of a door: its namespace, client settings and files.
pub fn attachment(door: &moat_egress::Door, extras: &DoorExtras) -> NetworkAttachment {
    let mut files = door.files();
    files.extend(extras.files.iter().cloned());
    NetworkAttachment {
        netns: door.netns(),
        env: moat_egress::Door::client_env()
            .into_iter()
            .chain(door.llm_env())
            .chain(door.intercept_env())
            .collect(),
        files,
    }
}

/// The egress door for a lease of `policy`, when the policy allows any
/// destination or an LLM is served (`None`: the sandbox gets an empty
/// network namespace).
pub fn start_door(
    runtime: &tokio::runtime::Handle,
    policy: &SandboxPolicy,
    name: &str,
    audit: Arc<dyn moat_egress::Audit>,
    extras: &DoorExtras,
) -> Result<Option<moat_egress::Door>, String> {
    if !policy.network.is_enabled()
        && extras.llm.is_none()
        && extras.files.is_empty()
        && extras.github.is_none()
        && extras.amp.is_none()
    {
        return Ok(None);
    }
    let github = match &extras.github {
        Some(t) => Some(t.access(name, audit.clone())?),
        None => None,
    };
    moat_egress::Door::start(
        runtime,
        moat_egress::DoorConfig {
            lease: name.to_string(),
            policy: Arc::new(policy.network.clone()),
            resolver: moat_egress::Resolver::System,
            audit,
            llm: extras.llm.clone(),
            github,
            amp: extras.amp.clone().map(|mut a| {
                a.state_dir = a.state_dir.join(name);
                a
            }),
        },
    )
    .map(Some)
    .map_err(|e| format!("starting the egress door: {e}"))
}

struct State {
    idle: VecDeque<Runner>,
    waiters: VecDeque<oneshot::Sender<Runner>>,
    /// Runners that exist (idle, lent out, or being reset/rebuilt).
    total: usize,
    closed: bool,
}

struct Inner {
    factory: Arc<dyn RunnerFactory>,
    size: usize,
    max_waiters: usize,
    state: Mutex<State>,
}

/// A pool of `size` runners of one policy.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

/// What the pool looks like now (for `/metrics` and `status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    pub size: usize,
    pub idle: usize,
    pub busy: usize,
    pub waiting: usize,
}

/// A runner lent out. Dropping it gives it back: it is reset on a blocking
/// thread, then handed to the first waiter or put back idle.
pub struct Lent {
    runner: Option<Runner>,
    pool: Arc<Inner>,
}

impl Lent {
    #[allow(clippy::expect_used, reason = "the runner is taken only in drop")]
    pub fn runner(&mut self) -> &mut Runner {
        self.runner
            .as_mut()
            .expect("a lent runner is present until dropped")
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        if let Some(r) = self.runner.take() {
            let pool = self.pool.clone();
            // Reset off the async threads; a runner that cannot be reset is
            // destroyed and replaced.
            std::thread::spawn(move || give_back(&pool, r));
        }
    }
}

fn lock(inner: &Inner) -> std::sync::MutexGuard<'_, State> {
    inner.state.lock().unwrap_or_else(|p| p.into_inner())
}

/// Resets `r` and hands it on; on failure builds a replacement.
fn give_back(inner: &Arc<Inner>, mut r: Runner) {
    // No call speaks for the last holder once its turn is over.
    if let Some(ep) = &r.ipc {
        ep.unbind();
    }
    let reset = r.lease.reset();
    // The turn's GitHub token ends with the turn, once nothing of the turn
    // runs any more (a process left behind could otherwise mint another);
    // what such a process did after the turn's record was taken is nobody's.
    if let Some(d) = &r.door {
        end_turn_tokens(d);
        let _ = d.take_github_activity();
    }
    let runner = match reset.and_then(|_| r.lease.start()) {
        Ok(()) => {
            // The token budget is per turn: the next holder starts at zero.
            if let Some(d) = &r.door {
                d.reset_llm_usage();
            }
            Some(r)
        }
        Err(e) => {
            tracing::warn!(error = %e, "a pooled sandbox could not be reset; rebuilding it");
            drop(r);
            match inner.factory.build() {
                Ok(n) => Some(n),
                Err(e) => {
                    tracing::error!(error = %e, "could not rebuild a pooled sandbox");
                    None
                }
            }
        }
    };
    deliver(inner, runner);
}

/// Revokes the GitHub tokens a turn's door minted (a blocking thread's
/// call: it waits for GitHub's answer, at most the door's step timeout).
pub fn end_turn_tokens(door: &moat_egress::Door) {
    let failed = door.revoke_github_blocking();
    if failed > 0 {
        tracing::warn!(
            failed,
            "GitHub tokens of a finished turn could not be revoked; they expire within the hour"
        );
    }
}

/// Gives a ready runner to the first live waiter, else puts it idle. `None`
/// means a runner was lost (the pool shrinks until `refill`).
fn deliver(inner: &Arc<Inner>, runner: Option<Runner>) {
    let mut st = lock(inner);
    let Some(mut r) = runner else {
        st.total -= 1;
        return;
    };
    if st.closed {
        st.total -= 1;
        drop(st);
        drop(r);
        return;
    }
    while let Some(w) = st.waiters.pop_front() {
        match w.send(r) {
            Ok(()) => return,
            // That waiter gave up; try the next one.
            Err(back) => r = back,
        }
    }
    st.idle.push_back(r);
}

impl Pool {
    /// Builds `size` runners now (on blocking threads) so the first requests
    /// find them warm.
    pub async fn new(
        factory: Arc<dyn RunnerFactory>,
        size: usize,
        max_waiters: usize,
    ) -> Result<Pool, PoolError> {
        let size = size.max(1);
        let inner = Arc::new(Inner {
            factory,
            size,
            max_waiters,
            state: Mutex::new(State {
                idle: VecDeque::new(),
                waiters: VecDeque::new(),
                total: 0,
                closed: false,
            }),
        });
        let pool = Pool { inner };
        pool.refill().await?;
        Ok(pool)
    }

    /// Builds runners until the pool has `size` again.
    pub async fn refill(&self) -> Result<(), PoolError> {
        loop {
            {
                let mut st = lock(&self.inner);
                if st.total >= self.inner.size || st.closed {
                    return Ok(());
                }
                st.total += 1;
            }
            let inner = self.inner.clone();
            let built = tokio::task::spawn_blocking(move || inner.factory.build())
                .await
                .map_err(|e| PoolError::Sandbox(e.to_string()))
                .and_then(|r| r.map_err(PoolError::Sandbox));
            match built {
                Ok(r) => deliver(&self.inner, Some(r)),
                Err(e) => {
                    lock(&self.inner).total -= 1;
                    return Err(e);
                }
            }
        }
    }

    pub fn stats(&self) -> PoolStats {
        let st = lock(&self.inner);
        PoolStats {
            size: self.inner.size,
            idle: st.idle.len(),
            busy: st.total - st.idle.len(),
            waiting: st.waiters.len(),
        }
    }

    /// Takes a runner: an idle one at once (after a health check), else waits
    /// in line. `queued(n)` is called once with the number of requests ahead
    /// when the caller has to wait (for a "busy, n ahead of you" answer).
    pub async fn acquire(&self, queued: impl FnOnce(usize)) -> Result<Lent, PoolError> {
        let mut queued = Some(queued);
        loop {
            let waiting = {
                let mut st = lock(&self.inner);
                if st.closed {
                    return Err(PoolError::Closed);
                }
                match st.idle.pop_front() {
                    Some(r) => Err(r),
                    None => {
                        if st.waiters.len() >= self.inner.max_waiters {
                            return Err(PoolError::Full {
                                size: self.inner.size,
                                waiting: st.waiters.len(),
                            });
                        }
                        let (tx, rx) = oneshot::channel();
                        st.waiters.push_back(tx);
                        Ok((rx, st.waiters.len() - 1))
                    }
                }
            };
            let runner = match waiting {
                Err(r) => r,
                Ok((rx, ahead)) => {
                    if let Some(f) = queued.take() {
                        f(ahead);
                    }
                    rx.await.map_err(|_| PoolError::Closed)?
                }
            };
            match self.checked(runner).await {
                Ok(l) => return Ok(l),
                // That runner was broken and is being replaced; try again.
                Err(PoolError::Sandbox(_)) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// The health check on acquire: the sandbox must be running. A broken one
    /// is rebuilt in the background and the caller gets an error.
    async fn checked(&self, mut r: Runner) -> Result<Lent, PoolError> {
        let inner = self.inner.clone();
        let (r, ok) = tokio::task::spawn_blocking(move || {
            let ok = r.lease.start();
            (r, ok)
        })
        .await
        .map_err(|e| PoolError::Sandbox(e.to_string()))?;
        match ok {
            Ok(()) => Ok(Lent {
                runner: Some(r),
                pool: inner,
            }),
            Err(e) => {
                tracing::warn!(error = %e, "a pooled sandbox failed its health check; rebuilding it");
                std::thread::spawn(move || {
                    drop(r);
                    let n = inner.factory.build().ok();
                    deliver(&inner, n);
                });
                Err(PoolError::Sandbox(e.to_string()))
            }
        }
    }

    /// Stops handing out runners; idle ones are destroyed, lent ones when
    /// they come back; waiters get `Closed`.
    pub fn close(&self) {
        drop(self.drain());
    }

    /// As [`Pool::close`], but the idle runners are handed to the caller
    /// (to revoke their doors' credentials before they are destroyed).
    pub fn drain(&self) -> Vec<Runner> {
        let mut st = lock(&self.inner);
        st.closed = true;
        st.waiters.clear();
        let idle: Vec<Runner> = st.idle.drain(..).collect();
        st.total -= idle.len();
        idle
    }
}
