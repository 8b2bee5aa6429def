//! The agent's IPC endpoint (docs/ipc.md): one unix socket per lease,
//! created by the host and bound read-only into that sandbox alone at
//! [`SOCKET_INSIDE`], speaking MCP (JSON-RPC 2.0, one JSON object per line).
//!
//! Owns: the sockets, who holds each one (the [`Caller`] the turn bound:
//! conversation, chat, user, trust), the frame limit, the per-lease rate
//! limit, and handing each tool call to the operations (`ops.rs`).
//! Must never: take the caller's identity from a request, serve a call on a
//! lease no turn holds, serve a connection opened under an earlier turn,
//! let a bad client stop the gateway, or put a message's text in the audit.

pub(crate) mod ops;
mod wire;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use governor::{DefaultDirectRateLimiter, Quota};
use moat_policy::gateway::{Platform, Rate, Trust};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

pub use wire::MAX_FRAME;

/// The MCP server name agents know moat's tools by (`mcp__moat__<tool>`).
pub const MCP_SERVER: &str = "moat";

/// Where a sandbox finds its endpoint.
pub const SOCKET_INSIDE: &str = "/run/moat/ipc.sock";

/// Whether a lease of `policy` gets an endpoint. gVisor's `runsc` refuses to
/// start a sandbox with a host unix socket bound in (it would need
/// `--host-uds`, not enabled: docs/ipc.md), so its leases get none and their
/// agents simply have no moat tools.
pub fn serves(policy: &moat_policy::SandboxPolicy) -> bool {
    policy.backend != moat_policy::BackendKind::Gvisor
}

/// Who holds a lease for one turn: the identity of every call made through
/// its endpoint, whatever a request says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub conversation_id: i64,
    pub platform: Platform,
    /// The chat (Slack channel id, web chat).
    pub channel: String,
    pub thread: String,
    pub user: String,
    pub trust: Trust,
    /// The `[[channel]]` entry (index) the turn runs under.
    pub chan_idx: usize,
}

/// The holder of a lease: a generation bumped at every bind and unbind, so
/// that a connection serves only the turn it was opened under.
#[derive(Default)]
struct Holder {
    generation: u64,
    caller: Option<Caller>,
}

type Shared = Arc<Mutex<Holder>>;

fn lock(h: &Shared) -> std::sync::MutexGuard<'_, Holder> {
    h.lock().unwrap_or_else(|p| p.into_inner())
}

/// One lease's endpoint. Dropping it closes the socket and removes it.
pub struct Endpoint {
    dir: PathBuf,
    holder: Shared,
    task: tokio::task::JoinHandle<()>,
}

impl Endpoint {
    /// The (host path, path inside) pair for the lease's moat files.
    pub fn mount(&self) -> (PathBuf, PathBuf) {
        (self.dir.join("ipc.sock"), PathBuf::from(SOCKET_INSIDE))
    }

    /// Gives the socket to the lease's host uid alone (mode 0600): no
    /// other sandbox, and no other host user, can connect to it.
    pub fn grant(&self, host_uid: u32) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt;
        let path = self.dir.join("ipc.sock");
        std::os::unix::fs::chown(&path, Some(host_uid), None)
            .and_then(|_| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)))
            .map_err(|e| format!("giving {} to the sandbox: {e}", path.display()))
    }

    /// Makes `caller` the identity of every call until [`Endpoint::unbind`].
    pub fn bind(&self, caller: Caller) {
        let mut h = lock(&self.holder);
        h.generation += 1;
        h.caller = Some(caller);
    }

    /// Ends the turn's hold: calls are refused, open connections closed at
    /// their next frame.
    pub fn unbind(&self) {
        let mut h = lock(&self.holder);
        h.generation += 1;
        h.caller = None;
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What answers tool calls (the gateway, `ops.rs`).
pub(crate) type OpsRef = Weak<crate::pipeline::Inner>;

/// Makes the endpoints of one gateway.
pub struct IpcHost {
    root: PathBuf,
    rate: Rate,
    ops: OpsRef,
    runtime: tokio::runtime::Handle,
    counter: std::sync::atomic::AtomicU64,
}

impl IpcHost {
    /// Endpoints live under `root` (search-only directories: the sandbox's
    /// host uid must reach its socket; each socket is that uid's alone).
    pub(crate) fn new(
        root: PathBuf,
        rate: Rate,
        ops: OpsRef,
        runtime: tokio::runtime::Handle,
    ) -> IpcHost {
        IpcHost {
            root,
            rate,
            ops,
            runtime,
            counter: Default::default(),
        }
    }

    /// A new endpoint for the lease `name`, listening now.
    pub fn endpoint(&self, name: &str) -> Result<Endpoint, String> {
        use std::os::unix::fs::PermissionsExt;
        let n = self
            .counter
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let search_only = |d: &Path| {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o711))
                .map_err(|e| format!("{}: {e}", d.display()))
        };
        std::fs::create_dir_all(&self.root)
            .map_err(|e| format!("creating {}: {e}", self.root.display()))?;
        if let Some(parent) = self.root.parent() {
            search_only(parent)?;
        }
        search_only(&self.root)?;
        let safe: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .take(40)
            .collect();
        let dir = self.root.join(format!("{safe}.{n}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        search_only(&dir)?;
        let path = dir.join("ipc.sock");
        let listener = {
            let _guard = self.runtime.enter();
            UnixListener::bind(&path).map_err(|e| format!("binding {}: {e}", path.display()))?
        };
        // Nobody's until `grant` gives it to the lease's uid.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let holder: Shared = Default::default();
        let limiter = Arc::new(DefaultDirectRateLimiter::direct(quota(self.rate)));
        let task = self.runtime.spawn(serve(
            listener,
            holder.clone(),
            limiter,
            self.ops.clone(),
            name.to_string(),
        ));
        Ok(Endpoint { dir, holder, task })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

#[allow(clippy::expect_used, reason = "the period is at least 1 ns")]
fn quota(r: Rate) -> Quota {
    Quota::with_period(r.interval().max(std::time::Duration::from_nanos(1)))
        .expect("a positive period")
        .allow_burst(r.count)
}

async fn serve(
    listener: UnixListener,
    holder: Shared,
    limiter: Arc<DefaultDirectRateLimiter>,
    ops: OpsRef,
    lease: String,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let generation = lock(&holder).generation;
        tokio::spawn(connection(
            stream,
            holder.clone(),
            generation,
            limiter.clone(),
            ops.clone(),
            lease.clone(),
        ));
    }
}

/// One client: frames in, answers out, until it hangs up, sends a bad frame,
/// or its turn ends.
async fn connection(
    stream: UnixStream,
    holder: Shared,
    generation: u64,
    limiter: Arc<DefaultDirectRateLimiter>,
    ops: OpsRef,
    lease: String,
) {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = match (&mut r)
            .take(MAX_FRAME as u64 + 1)
            .read_until(b'\n', &mut buf)
            .await
        {
            Ok(n) => n,
            Err(_) => return,
        };
        if n == 0 {
            return;
        }
        let frame = match wire::frame(&buf) {
            Ok(Some(f)) => f,
            Ok(None) => continue,
            Err(bad) => {
                audit_bad(&ops, &lease, &holder, bad.reason());
                let _ = w.write_all(&bad.answer()).await;
                let _ = w.shutdown().await;
                return;
            }
        };
        let caller = {
            let h = lock(&holder);
            match (&h.caller, h.generation == generation) {
                (Some(c), true) => Some(c.clone()),
                _ => None,
            }
        };
        let Some(caller) = caller else {
            let _ = w.write_all(&wire::no_turn(&frame)).await;
            let _ = w.shutdown().await;
            return;
        };
        if limiter.check().is_err() {
            if let Some(inner) = ops.upgrade() {
                ops::audit_limited(&inner, &caller, &lease);
            }
            if let Some(a) = wire::rate_limited(&frame) {
                if w.write_all(&a).await.is_err() {
                    return;
                }
            }
            continue;
        }
        let Some(inner) = ops.upgrade() else { return };
        let answer = wire::answer(&frame, |tool, args| {
            ops::call(inner.clone(), caller.clone(), lease.clone(), tool, args)
        })
        .await;
        if let Some(a) = answer {
            if w.write_all(&a).await.is_err() {
                return;
            }
        }
    }
}

fn audit_bad(ops: &OpsRef, lease: &str, holder: &Shared, reason: &str) {
    let caller = lock(holder).caller.clone();
    if let Some(inner) = ops.upgrade() {
        ops::audit_bad_frame(&inner, caller.as_ref(), lease, reason);
    }
}

/// Where one gateway's endpoints live: a directory of its own below the
/// engine's runtime directory (several gateways may share that).
pub fn root_under(runtime_dir: &Path) -> PathBuf {
    let mut b = [0u8; 6];
    let _ = getrandom::getrandom(&mut b);
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    runtime_dir.join("ipc").join(hex)
}

/// Binds `ep` to the turn of `user` in `conv`: the trust is the one the
/// configuration gives that user there now.
pub(crate) fn bind_turn(
    ep: &Endpoint,
    gw: &crate::pipeline::Gateway,
    conv: &crate::pipeline::ConvRef,
    channel: &moat_policy::gateway::ChannelPolicy,
    user: &str,
) {
    match gw.authorize(conv.platform, &conv.channel, user) {
        moat_policy::gateway::Authorization::Allowed { trust, .. } => ep.bind(Caller {
            conversation_id: conv.id,
            platform: conv.platform,
            channel: conv.channel.clone(),
            thread: conv.thread.clone(),
            user: user.to_string(),
            trust,
            chan_idx: channel.index,
        }),
        moat_policy::gateway::Authorization::Denied { .. } => ep.unbind(),
    }
}
