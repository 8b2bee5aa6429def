//! The runner pool (docs/design.md D5): pre-warmed leases of one sandbox policy,
//! handed out one request at a time and reset to a clean state afterwards;
//! elastic between `min` and `max` (grown when a request finds none idle,
//! shrunk back after `shrink_after` without use).
//!
//! Owns: the idle leases, the FIFO of waiters (bounded), growth and
//! shrinking, health checks on acquire, rebuilding a lease that failed, and
//! each lease's egress door. Must never: give one lease to two holders at
//! once, hand out a lease that has not been reset since its last holder,
//! hold more than `max` leases, or block the async runtime on sandbox work
//! (leases start, reset and stop on blocking threads).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use moat_policy::SandboxPolicy;
use moat_sandbox::{Engine, WorkspaceSource};
use tokio::sync::oneshot;

pub use crate::runner::{attachment, end_turn_tokens, start_door, DoorExtras, Runner};

/// Why a lease could not be had.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// Every lease is busy, the pool is at its maximum and the waiting line
    /// is full.
    #[error("all {size} sandboxes are busy and {waiting} requests are already waiting; try again shortly")]
    Full { size: usize, waiting: usize },
    /// A lease could not be built or started.
    #[error("could not prepare a sandbox: {0}")]
    Sandbox(String),
    /// The pool is shutting down.
    #[error("the sandbox pool is shutting down")]
    Closed,
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
            Some(host) if crate::ipc::serves(&self.policy) => {
                let ep = host.endpoint(&name)?;
                extras.files.push(ep.mount());
                Some(ep)
            }
            _ => None,
        };
        crate::push_gate::attach(&mut extras, ipc.as_ref());
        let mut runner = crate::runner::open(crate::runner::RunnerSpec {
            engine: &self.engine,
            policy: self.policy.clone(),
            door_name: &name,
            lease_name: None,
            run_as: self.run_as,
            workspace: WorkspaceSource::Fresh,
            extras: &extras,
            runtime: Some(&self.runtime),
            audit: self.audit.clone(),
        })?;
        if let Some(ep) = &ipc {
            ep.grant(runner.lease.host_uid())?;
        }
        runner.ipc = ipc;
        runner.lease.start().map_err(|e| e.to_string())?;
        Ok(runner)
    }
}

/// How many runners a pool keeps and lends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Kept warm (built at start, never shrunk below).
    pub min: usize,
    /// The most that exist at once (idle, lent, being built or reset).
    pub max: usize,
    /// Requests that may wait once `max` are busy; the next is `Full`.
    pub max_waiters: usize,
    /// A runner above `min` idle this long is destroyed.
    pub shrink_after: Duration,
}

impl Bounds {
    /// A fixed pool of `size` (at least 1).
    pub fn fixed(size: usize, max_waiters: usize) -> Bounds {
        let size = size.max(1);
        Bounds {
            min: size,
            max: size,
            max_waiters,
            shrink_after: Duration::from_secs(300),
        }
    }
}

/// A waiter gets a runner, or the reason a runner built for it failed.
type Handoff = Result<Runner, String>;

struct Idle {
    runner: Runner,
    since: Instant,
}

struct State {
    /// Most recently returned last: acquire takes from the back (a warm
    /// one), shrinking from the front (the longest idle).
    idle: VecDeque<Idle>,
    waiters: VecDeque<oneshot::Sender<Handoff>>,
    /// Runners that exist (idle, lent out, being built, reset or rebuilt).
    total: usize,
    /// Runners being built because a request found none idle; each will
    /// serve a waiter, so each lets one more wait.
    growing: usize,
    closed: bool,
}

struct Inner {
    factory: Arc<dyn RunnerFactory>,
    bounds: Bounds,
    state: Mutex<State>,
}

/// A pool of runners of one policy, between `min` and `max`.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

/// What the pool looks like now (for `/metrics` and `status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// Runners that exist now (idle, lent, being built or reset).
    pub size: usize,
    /// The most there may be.
    pub max: usize,
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
        match w.send(Ok(r)) {
            Ok(()) => return,
            // That waiter gave up; try the next one.
            Err(back) => match back {
                Ok(back) => r = back,
                Err(_) => return,
            },
        }
    }
    st.idle.push_back(Idle {
        runner: r,
        since: Instant::now(),
    });
}

/// Builds one more runner for the waiters (growth); a failure is told to
/// the first waiter, who would otherwise wait for a runner that never comes.
fn grow(inner: &Arc<Inner>) {
    let built = inner.factory.build();
    lock(inner).growing -= 1;
    match built {
        Ok(r) => deliver(inner, Some(r)),
        Err(e) => {
            tracing::warn!(error = %e, "could not grow the sandbox pool");
            let first = {
                let mut st = lock(inner);
                st.total -= 1;
                st.waiters.pop_front()
            };
            if let Some(w) = first {
                let _ = w.send(Err(e));
            }
        }
    }
}

/// Destroys runners above `min` idle longer than `shrink_after` (on this
/// blocking thread); returns how many.
fn shrink(inner: &Arc<Inner>) -> usize {
    let victims: Vec<Idle> = {
        let mut st = lock(inner);
        let mut out = Vec::new();
        while st.total > inner.bounds.min
            && st
                .idle
                .front()
                .is_some_and(|i| i.since.elapsed() >= inner.bounds.shrink_after)
        {
            if let Some(i) = st.idle.pop_front() {
                st.total -= 1;
                out.push(i);
            }
        }
        out
    };
    let n = victims.len();
    drop(victims);
    n
}

/// Shrinks the pool now and then, until it is dropped or closed.
async fn shrinker(weak: Weak<Inner>) {
    let tick = {
        let Some(inner) = weak.upgrade() else { return };
        (inner.bounds.shrink_after / 2).clamp(Duration::from_millis(100), Duration::from_secs(10))
    };
    loop {
        tokio::time::sleep(tick).await;
        let Some(inner) = weak.upgrade() else { return };
        if lock(&inner).closed {
            return;
        }
        let n = tokio::task::spawn_blocking(move || shrink(&inner))
            .await
            .unwrap_or(0);
        if n > 0 {
            tracing::debug!(destroyed = n, "the sandbox pool shrank after idling");
        }
    }
}

impl Pool {
    /// A fixed pool: builds `size` runners now (on blocking threads) so the
    /// first requests find them warm.
    pub async fn new(
        factory: Arc<dyn RunnerFactory>,
        size: usize,
        max_waiters: usize,
    ) -> Result<Pool, PoolError> {
        Pool::elastic(factory, Bounds::fixed(size, max_waiters)).await
    }

    /// An elastic pool: `bounds.min` runners built now, more under load up
    /// to `bounds.max`, shrunk back after `bounds.shrink_after` idle.
    pub async fn elastic(
        factory: Arc<dyn RunnerFactory>,
        bounds: Bounds,
    ) -> Result<Pool, PoolError> {
        let bounds = Bounds {
            max: bounds.max.max(bounds.min).max(1),
            ..bounds
        };
        let inner = Arc::new(Inner {
            factory,
            bounds,
            state: Mutex::new(State {
                idle: VecDeque::new(),
                waiters: VecDeque::new(),
                total: 0,
                growing: 0,
                closed: false,
            }),
        });
        let pool = Pool { inner };
        pool.refill().await?;
        if bounds.max > bounds.min {
            tokio::spawn(shrinker(Arc::downgrade(&pool.inner)));
        }
        Ok(pool)
    }

    /// Builds runners until the pool has `min` again.
    pub async fn refill(&self) -> Result<(), PoolError> {
        loop {
            {
                let mut st = lock(&self.inner);
                if st.total >= self.inner.bounds.min || st.closed {
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
            size: st.total,
            max: self.inner.bounds.max,
            idle: st.idle.len(),
            busy: st.total - st.idle.len(),
            waiting: st.waiters.len(),
        }
    }

    /// Takes a runner: an idle one at once (after a health check); else one
    /// built for this request while fewer than `max` exist; else waits in
    /// line. `queued(n)` is called once with the number of requests ahead
    /// when the caller has to wait for someone else's runner (for a "busy, n
    /// ahead of you" answer); not while one is being built for it.
    pub async fn acquire(&self, queued: impl FnOnce(usize)) -> Result<Lent, PoolError> {
        let mut queued = Some(queued);
        loop {
            let waiting = {
                let mut st = lock(&self.inner);
                if st.closed {
                    return Err(PoolError::Closed);
                }
                match st.idle.pop_back() {
                    Some(i) => Err(i.runner),
                    None => {
                        let b = &self.inner.bounds;
                        let grow = st.total < b.max;
                        if grow {
                            st.total += 1;
                            st.growing += 1;
                            let inner = self.inner.clone();
                            std::thread::spawn(move || self::grow(&inner));
                        } else if st.waiters.len() >= b.max_waiters + st.growing {
                            return Err(PoolError::Full {
                                size: st.total,
                                waiting: st.waiters.len(),
                            });
                        }
                        let (tx, rx) = oneshot::channel();
                        st.waiters.push_back(tx);
                        let ahead = (!grow).then(|| st.waiters.len() - 1);
                        Ok((rx, ahead))
                    }
                }
            };
            let runner = match waiting {
                Err(r) => r,
                Ok((rx, ahead)) => {
                    if let Some(ahead) = ahead {
                        if let Some(f) = queued.take() {
                            f(ahead);
                        }
                    }
                    match rx.await.map_err(|_| PoolError::Closed)? {
                        Ok(r) => r,
                        Err(e) => return Err(PoolError::Sandbox(e)),
                    }
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
        let idle: Vec<Runner> = st.idle.drain(..).map(|i| i.runner).collect();
        st.total -= idle.len();
        idle
    }
}
