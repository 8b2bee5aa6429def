//! The conversation's actor: one task per conversation that debounces each
//! user's messages into a turn, queues follow-ups, runs one turn at a time,
//! and answers `stop` and `status`.
//!
//! Must never: run two turns of one conversation at once, or let a user stop
//! or inspect what their trust level does not allow.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moat_policy::trust::{self, Command, Whose};
use moat_store::MessageState;
use serde_json::json;
use tokio::sync::mpsc;

use super::{ConvCmd, Gateway, Pending};

/// How long `stop` waits for its notice to be posted before it cancels.
const TELL_BEFORE_STOP: Duration = Duration::from_secs(1);
use crate::agent::CancelHandle;
use crate::platform::ConvRef;

impl Gateway {
    /// One conversation's actor: debounce per user, one turn at a time,
    /// follow-ups queued, `stop` and `status`.
    pub(super) async fn conversation(
        self,
        conv: ConvRef,
        chan_idx: usize,
        mut rx: mpsc::UnboundedReceiver<ConvCmd>,
    ) {
        let channel = self.inner.cfg.channels[chan_idx].clone();
        let debounce = channel.debounce;
        // Per user: their messages and when their debounce ends.
        let mut pending: Vec<(String, Vec<Pending>, tokio::time::Instant)> = Vec::new();
        let mut ready: VecDeque<Vec<Pending>> = VecDeque::new();
        let mut running: Option<(tokio::task::JoinHandle<()>, CancelHandle)> = None;
        // Whose turn runs, and who has written here (for `stop`/`status`).
        let mut running_user: Option<String> = None;
        let mut participants: HashSet<String> = HashSet::new();
        let status = Arc::new(Mutex::new(String::from("idle")));
        let idle_exit = Duration::from_secs(600);
        loop {
            let now = tokio::time::Instant::now();
            let mut i = 0;
            while i < pending.len() {
                if pending[i].2 <= now {
                    let (_, batch, _) = pending.remove(i);
                    ready.push_back(batch);
                } else {
                    i += 1;
                }
            }
            if running.is_none() {
                if let Some(mut batch) = ready.pop_front() {
                    // What the same user sent while this waited joins it: a
                    // burst typed during a running turn is one follow-up
                    // turn, also when the debounce is 0 (the web chat's).
                    let user = batch.first().map(|p| p.user.clone());
                    let mut i = 0;
                    while i < ready.len() {
                        if ready[i].first().map(|p| &p.user) == user.as_ref() {
                            batch.extend(ready.remove(i).unwrap_or_default());
                        } else {
                            i += 1;
                        }
                    }
                    let cancel = CancelHandle::default();
                    let gw = self.clone();
                    let c = conv.clone();
                    let ch = channel.clone();
                    let st = status.clone();
                    let cn = cancel.clone();
                    let h = tokio::spawn(async move { gw.turn(c, ch, batch, cn, st).await });
                    running = Some((h, cancel));
                    running_user = user;
                    continue;
                }
            }
            let next = pending.iter().map(|p| p.2).min();
            let quiet = running.is_none() && pending.is_empty() && ready.is_empty();
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    None => break,
                    Some(ConvCmd::Message(p)) => {
                        participants.insert(p.user.clone());
                        let deadline = tokio::time::Instant::now() + debounce;
                        match pending.iter_mut().find(|e| e.0 == p.user) {
                            Some(e) => { e.1.push(p); e.2 = deadline; }
                            None => pending.push((p.user.clone(), vec![p], deadline)),
                        }
                    }
                    Some(ConvCmd::Stop { user, trust }) => {
                        let whose = |u: &str| if u == user { Whose::Own } else { Whose::Others };
                        let may = |u: &str| trust::may_command(trust, Command::Stop, whose(u)).is_ok();
                        let mut dropped = Vec::new();
                        pending.retain_mut(|(u, b, _)| {
                            if may(u) { dropped.append(b); false } else { true }
                        });
                        ready.retain_mut(|b| {
                            let u = b.first().map(|p| p.user.clone()).unwrap_or_default();
                            if may(&u) { dropped.append(b); false } else { true }
                        });
                        for p in &dropped {
                            let _ = self.inner.store.set_message_state(p.message_id, MessageState::Failed, Some("stopped before its turn"));
                        }
                        let verdict = running.as_ref().map(|_| {
                            trust::may_command(trust, Command::Stop, whose(running_user.as_deref().unwrap_or("")))
                        });
                        let text = match verdict {
                            Some(Ok(())) => "Stopping the running turn.".to_string(),
                            Some(Err(r)) => {
                                self.audit("command", json!({"verdict": "refused", "command": "stop", "reason": r.name(), "trust": trust.name(), "user": user, "conversation_id": conv.id}));
                                r.message(Command::Stop)
                            }
                            None if !dropped.is_empty() => format!("Dropped {} queued message(s).", dropped.len()),
                            None => "Nothing is running.".to_string(),
                        };
                        // Told before the cancel (the stopped turn's answer
                        // comes after it), waiting briefly: a slow platform
                        // must not hold the stop up.
                        let (out, c2) = (self.platform(conv.platform), conv.clone());
                        let told = tokio::spawn(async move { out.notice(&c2, &text).await });
                        let _ = tokio::time::timeout(TELL_BEFORE_STOP, told).await;
                        if let (Some((_, cancel)), Some(Ok(()))) = (&running, verdict) {
                            cancel.cancel();
                        }
                    }
                    Some(ConvCmd::Status { user, trust }) => {
                        let whose = if participants.contains(&user) { Whose::Own } else { Whose::Others };
                        let text = match trust::may_command(trust, Command::Status, whose) {
                            Ok(()) => {
                                let waiting: usize = pending.iter().map(|p| p.1.len()).sum::<usize>() + ready.iter().map(Vec::len).sum::<usize>();
                                let now_doing = status.lock().map(|s| s.clone()).unwrap_or_default();
                                format!("Sandbox: {now_doing}. Messages waiting: {waiting}.")
                            }
                            Err(r) => {
                                self.audit("command", json!({"verdict": "refused", "command": "status", "reason": r.name(), "trust": trust.name(), "user": user, "conversation_id": conv.id}));
                                r.message(Command::Status)
                            }
                        };
                        self.platform(conv.platform).notice(&conv, &text).await;
                    }
                },
                _ = sleep_until(next), if next.is_some() => {}
                _ = async { if let Some((h, _)) = running.as_mut() { let _ = h.await; } }, if running.is_some() => {
                    running = None;
                    running_user = None;
                }
                _ = tokio::time::sleep(idle_exit), if quiet => {
                    // Idle: end the actor; a new message starts a new one.
                    let mut convs = self.inner.convs.lock().unwrap_or_else(|p| p.into_inner());
                    if rx.is_empty() {
                        convs.remove(&conv.id);
                        break;
                    }
                }
            }
        }
    }
}

async fn sleep_until(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
