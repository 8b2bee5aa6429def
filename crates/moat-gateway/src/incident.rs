//! Incident mode (`moat incident`, docs/incident.md): the gateway stops taking
//! turns, stops the running ones, revokes its doors' GitHub tokens and
//! destroys every sandbox, until the operator lifts it.
//!
//! Owns: the persistent flag (`<data dir>/incident.json`, so a restarted
//! gateway stays paused), the control socket (`<data dir>/control.sock`,
//! mode 0600, callers of another uid than moat's or root refused) through
//! which the CLI reaches a running gateway, the flag watcher, and the
//! `incident` / `incident_lifted` audit records of the gateway's part.
//! Must never: take a message or lease a sandbox while paused, lose a message
//! silently while paused (each is stored as dropped, audited, and its
//! conversation told once), or accept a control request from another user.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::pipeline::{Accepted, ConvCmd, ConvRef, Gateway, GatewayError};
use moat_store::MessageState;

/// What a paused gateway answers (once per conversation, and to every web
/// chat post).
pub const PAUSED_TEXT: &str = "moat is paused by its operator (incident mode); this message was not run. Send it again once moat is back.";
/// The persistent flag, in the data directory.
pub const FLAG_FILE: &str = "incident.json";
/// The control socket, in the data directory.
pub const SOCKET_FILE: &str = "control.sock";
/// How often a running gateway looks at the flag file.
const WATCH_EVERY: Duration = Duration::from_secs(1);
/// The longest control request read.
const MAX_REQUEST: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum IncidentError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not an incident flag moat wrote ({reason}); look at it, then delete it to lift"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error("the gateway's control socket {path}: {reason}")]
    Control { path: PathBuf, reason: String },
}

/// The persistent flag's content.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct IncidentFlag {
    /// Unix milliseconds.
    pub since_ms: i64,
    /// Who set it (the operator's user name, or "gateway").
    pub by: String,
}

/// Reads the flag of `data_dir` (`None`: not in incident mode).
pub fn read_flag(data_dir: &Path) -> Result<Option<IncidentFlag>, IncidentError> {
    let path = data_dir.join(FLAG_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| IncidentError::Corrupt {
                path,
                reason: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(IncidentError::Io { path, source }),
    }
}

/// Writes the flag (mode 0600, by rename: never half written).
pub fn write_flag(data_dir: &Path, flag: &IncidentFlag) -> Result<(), IncidentError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join(FLAG_FILE);
    let tmp = data_dir.join(format!("{FLAG_FILE}.tmp"));
    let io = |source| IncidentError::Io {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(data_dir).map_err(io)?;
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    let text = serde_json::to_vec(flag).unwrap_or_default();
    f.write_all(&text).and_then(|_| f.sync_all()).map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)
}

/// Removes the flag; `true` if there was one.
pub fn clear_flag(data_dir: &Path) -> Result<bool, IncidentError> {
    let path = data_dir.join(FLAG_FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(IncidentError::Io { path, source }),
    }
}

/// The gateway's incident bookkeeping.
#[derive(Default)]
pub struct IncidentState {
    /// Serialises entering and lifting (the socket and the watcher).
    lock: tokio::sync::Mutex<()>,
    /// Conversations told they are paused (once each).
    told: Mutex<HashSet<i64>>,
    /// The gateway started paused: the messages a crash left unanswered
    /// are queued again at the lift, not at the start.
    pub(crate) recover_at_lift: std::sync::atomic::AtomicBool,
}

/// What the gateway did when entering incident mode.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct IncidentReport {
    pub turns_stopped: u64,
    pub conversations_stopped: usize,
    pub github_tokens_revoked: usize,
    pub github_tokens_failed: usize,
    pub pooled_sandboxes_destroyed: usize,
    pub leases_destroyed: usize,
    pub leases_still_held: usize,
}

/// What the gateway did at the lift.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LiftReport {
    pub was_paused: bool,
    pub messages_requeued: usize,
}

impl Gateway {
    /// Whether incident mode is on.
    pub fn paused(&self) -> bool {
        self.inner.paused.load(Ordering::SeqCst)
    }

    /// Starts paused (the flag was set when this gateway started).
    pub fn start_paused(&self) {
        self.inner.paused.store(true, Ordering::SeqCst);
        self.inner
            .incident
            .recover_at_lift
            .store(true, Ordering::SeqCst);
    }

    /// A message that came while paused: dropped (stored as such), audited,
    /// and its conversation told once.
    pub(crate) fn refuse_paused(
        &self,
        conv: &ConvRef,
        message_id: i64,
        audit: serde_json::Value,
    ) -> Result<Accepted, GatewayError> {
        self.inner.store.set_message_state(
            message_id,
            MessageState::Dropped,
            Some("moat is paused (incident mode)"),
        )?;
        self.audit("message", audit);
        let first = self
            .inner
            .incident
            .told
            .lock()
            .map(|mut t| t.insert(conv.id))
            .unwrap_or(false);
        if first {
            let (out, conv2) = (self.platform(conv.platform), conv.clone());
            tokio::spawn(async move { out.notice(&conv2, PAUSED_TEXT).await });
        }
        Ok(Accepted::Paused)
    }

    /// Enters incident mode: persists the flag, stops every conversation's
    /// turn, revokes the GitHub tokens of the pooled doors, destroys every
    /// sandbox of this data directory, and audits what it did.
    pub async fn enter_incident(&self, by: &str) -> IncidentReport {
        let _g = self.inner.incident.lock.lock().await;
        let data_dir = self.inner.engine.config().data_dir.clone();
        let flag = IncidentFlag {
            since_ms: now_ms(),
            by: by.to_string(),
        };
        if let Err(e) = write_flag(&data_dir, &flag) {
            tracing::error!(error = %e, "could not persist incident mode; it ends with this process");
        }
        self.inner.paused.store(true, Ordering::SeqCst);
        let mut report = IncidentReport {
            turns_stopped: self.inner.running_turns(),
            ..IncidentReport::default()
        };
        let actors: Vec<_> = self
            .inner
            .convs
            .lock()
            .map(|c| c.values().cloned().collect())
            .unwrap_or_default();
        for tx in actors {
            if tx
                .send(ConvCmd::Stop {
                    user: "moat incident".into(),
                    trust: moat_policy::gateway::Trust::Admin,
                })
                .is_ok()
            {
                report.conversations_stopped += 1;
            }
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while self.inner.running_turns() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The pools: idle runners' doors revoke their tokens, then the
        // runners are destroyed; lent ones are destroyed as they come back.
        let pools: Vec<_> = std::mem::take(&mut *self.inner.pools.lock().await)
            .into_values()
            .collect();
        for p in &pools {
            for r in p.drain() {
                if let Some(d) = &r.door {
                    let (used, failed) = d.revoke_github_counted().await;
                    report.github_tokens_revoked += used - failed;
                    report.github_tokens_failed += failed;
                }
                let destroyed = tokio::task::spawn_blocking(move || {
                    let crate::pool::Runner { lease, door, .. } = r;
                    let ok = lease.destroy().is_ok();
                    drop(door);
                    ok
                })
                .await
                .unwrap_or(false);
                if destroyed {
                    report.pooled_sandboxes_destroyed += 1;
                }
            }
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::time::Instant::now() < deadline
            && pools.iter().any(|p| {
                let s = p.stats();
                s.idle + s.busy > 0
            })
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Everything else of this data directory: parked per-conversation
        // leases, named ones, and whatever another moat process left.
        let cfg = self.inner.engine.config().clone();
        let wiped = tokio::task::spawn_blocking(move || {
            moat_sandbox::wipe::destroy_all(&cfg, Duration::from_secs(5))
        })
        .await
        .unwrap_or_default();
        report.leases_destroyed = wiped.leases;
        report.leases_still_held = wiped.held;
        if let Ok(convs) = self.inner.store.idle_conversations(i64::MAX) {
            for c in convs {
                let _ = self.inner.store.set_conversation_lease(c.id, None);
            }
        }
        self.audit(
            "incident",
            json!({
                "actor": "gateway",
                "by": by,
                "turns_stopped": report.turns_stopped,
                "conversations_stopped": report.conversations_stopped,
                "github_tokens_revoked": report.github_tokens_revoked,
                "github_tokens_failed": report.github_tokens_failed,
                "pooled_sandboxes_destroyed": report.pooled_sandboxes_destroyed,
                "leases_destroyed": report.leases_destroyed,
                "leases_still_held": report.leases_still_held,
            }),
        );
        report
    }

    /// Lifts incident mode: the flag goes, messages are taken again, the
    /// pools are warmed, and what a crash left unanswered is queued.
    pub async fn lift_incident(&self, by: &str) -> LiftReport {
        let _g = self.inner.incident.lock.lock().await;
        let data_dir = self.inner.engine.config().data_dir.clone();
        if let Err(e) = clear_flag(&data_dir) {
            tracing::error!(error = %e, "could not remove the incident flag");
        }
        let was_paused = self.inner.paused.swap(false, Ordering::SeqCst);
        if let Ok(mut t) = self.inner.incident.told.lock() {
            t.clear();
        }
        let mut report = LiftReport {
            was_paused,
            messages_requeued: 0,
        };
        if self
            .inner
            .incident
            .recover_at_lift
            .swap(false, Ordering::SeqCst)
        {
            match self.recover().await {
                Ok(n) => report.messages_requeued = n,
                Err(e) => tracing::error!(error = %e, "queueing again after the lift"),
            }
        }
        if let Err(e) = self.warm().await {
            tracing::warn!(error = %e, "warming the pools after the lift");
        }
        self.audit(
            "incident_lifted",
            json!({"actor": "gateway", "by": by, "was_paused": was_paused, "messages_requeued": report.messages_requeued}),
        );
        report
    }

    /// Follows the flag file: set by hand or by a `moat incident` that could
    /// not reach this gateway, it pauses; removed, it lifts.
    pub async fn watch_flag(&self) {
        let data_dir = self.inner.engine.config().data_dir.clone();
        loop {
            tokio::time::sleep(WATCH_EVERY).await;
            let flagged = match read_flag(&data_dir) {
                Ok(f) => f.is_some(),
                // A flag moat cannot read still means "paused".
                Err(IncidentError::Corrupt { .. }) => true,
                Err(_) => continue,
            };
            if flagged && !self.paused() {
                let _ = self.enter_incident("flag file").await;
            } else if !flagged && self.paused() {
                // Re-checked under the lock: an incident being entered
                // writes the flag first.
                let lifted = {
                    let _g = self.inner.incident.lock.lock().await;
                    !matches!(read_flag(&data_dir), Ok(Some(_)) | Err(_))
                };
                if lifted {
                    let _ = self.lift_incident("flag file").await;
                }
            }
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A control request.
#[derive(Debug, Serialize, Deserialize)]
pub struct ControlRequest {
    /// `incident`, `lift` or `status`.
    pub op: String,
    /// Who asks (for the audit record).
    #[serde(default)]
    pub by: String,
    /// `history`: the conversation's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation: Option<i64>,
}

/// Binds the control socket (mode 0600) in `data_dir`.
pub fn bind_control(data_dir: &Path) -> Result<tokio::net::UnixListener, IncidentError> {
    use std::os::unix::fs::PermissionsExt;
    let path = data_dir.join(SOCKET_FILE);
    let ctl = |reason: String| IncidentError::Control {
        path: path.clone(),
        reason,
    };
    // A socket left by a gateway that died; two gateways on one data
    // directory are refused earlier (the store).
    let _ = std::fs::remove_file(&path);
    let l = tokio::net::UnixListener::bind(&path).map_err(|e| ctl(e.to_string()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| ctl(e.to_string()))?;
    Ok(l)
}

/// Answers control requests until `stop` completes.
pub async fn serve_control(
    gw: Gateway,
    listener: tokio::net::UnixListener,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    loop {
        let conn = tokio::select! {
            c = listener.accept() => c,
            _ = &mut stop => break,
        };
        let Ok((stream, _)) = conn else { continue };
        let gw = gw.clone();
        tokio::spawn(async move {
            if let Err(e) = control_conn(gw, stream).await {
                tracing::warn!(error = %e, "a control request failed");
            }
        });
    }
}

async fn control_conn(gw: Gateway, stream: tokio::net::UnixStream) -> std::io::Result<()> {
    // Only moat's own uid or root: the socket's mode says so too.
    let me = nix::unistd::geteuid().as_raw();
    let peer = stream.peer_cred()?.uid();
    let (r, mut w) = stream.into_split();
    if peer != me && peer != 0 {
        tracing::warn!(uid = peer, "control request from another user refused");
        w.write_all(b"{\"error\":\"refused: not moat's user\"}\n")
            .await?;
        return Ok(());
    }
    let mut line = String::new();
    BufReader::new(tokio::io::AsyncReadExt::take(r, MAX_REQUEST))
        .read_line(&mut line)
        .await?;
    let answer = match serde_json::from_str::<ControlRequest>(&line) {
        Ok(req) => {
            let by = if req.by.is_empty() {
                "operator".to_string()
            } else {
                req.by.chars().take(64).collect()
            };
            match req.op.as_str() {
                "incident" => json!({"ok": true, "report": gw.enter_incident(&by).await}),
                "lift" => json!({"ok": true, "lift": gw.lift_incident(&by).await}),
                "status" => json!({"ok": true, "paused": gw.paused()}),
                "history" => history_answer(&gw, req.conversation, &by).await,
                "channels" => {
                    let store = gw.inner.store.clone();
                    match tokio::task::spawn_blocking(move || store.registered_groups()).await {
                        Ok(Ok(groups)) => {
                            json!({"ok": true, "registered": groups.iter().map(|g| json!({
                            "platform": g.platform, "channel": g.channel, "name": g.name,
                            "registered_by": g.registered_by, "created_ms": g.created_ms,
                        })).collect::<Vec<_>>()})
                        }
                        Ok(Err(e)) => json!({"error": format!("reading the store: {e}")}),
                        Err(e) => json!({"error": format!("reading the store: {e}")}),
                    }
                }
                other => {
                    json!({"error": format!("unknown op {other:?}; use incident, lift, status, history or channels")})
                }
            }
        }
        Err(_) => json!({"error": "send one JSON line: {\"op\": \"incident\"}"}),
    };
    let mut text = answer.to_string();
    text.push('\n');
    w.write_all(text.as_bytes()).await
}

/// `history`: the conversation's stored history (crate::history), audited
/// (who exported which conversation; never its texts).
async fn history_answer(gw: &Gateway, conversation: Option<i64>, by: &str) -> serde_json::Value {
    let Some(id) = conversation else {
        return json!({"error": "history needs a conversation id"});
    };
    let store = gw.inner.store.clone();
    let read = tokio::task::spawn_blocking(move || crate::history::read(&store, id)).await;
    match read {
        Ok(Ok(Some(h))) => {
            gw.audit(
                "history",
                json!({"by": by, "conversation_id": id, "entries": h.entries.len()}),
            );
            json!({"ok": true, "history": h})
        }
        Ok(Ok(None)) => json!({"error": format!("no conversation {id}")}),
        Ok(Err(e)) => json!({"error": format!("reading the store: {e}")}),
        Err(e) => json!({"error": format!("reading the store: {e}")}),
    }
}

/// The CLI's side: sends `op` to the gateway of `data_dir`. `Ok(None)`: no
/// gateway listens there.
pub fn request(
    data_dir: &Path,
    op: &str,
    by: &str,
    timeout: Duration,
) -> Result<Option<serde_json::Value>, IncidentError> {
    let req = ControlRequest {
        op: op.to_string(),
        by: by.to_string(),
        conversation: None,
    };
    send(data_dir, &req, timeout)
}

/// Sends `req` to the gateway of `data_dir`. `Ok(None)`: no gateway
/// listens there.
pub fn send(
    data_dir: &Path,
    req: &ControlRequest,
    timeout: Duration,
) -> Result<Option<serde_json::Value>, IncidentError> {
    use std::io::{BufRead, Write};
    let path = data_dir.join(SOCKET_FILE);
    let ctl = |reason: String| IncidentError::Control {
        path: path.clone(),
        reason,
    };
    let mut s = match std::os::unix::net::UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(ctl(e.to_string())),
    };
    s.set_read_timeout(Some(timeout))
        .map_err(|e| ctl(e.to_string()))?;
    let mut text = serde_json::to_string(req).map_err(|e| ctl(e.to_string()))?;
    text.push('\n');
    s.write_all(text.as_bytes())
        .map_err(|e| ctl(e.to_string()))?;
    let mut line = String::new();
    std::io::BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| ctl(format!("no answer: {e}")))?;
    let v: serde_json::Value =
        serde_json::from_str(&line).map_err(|_| ctl("an answer that is not JSON".into()))?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        return Err(ctl(e.to_string()));
    }
    Ok(Some(v))
}
