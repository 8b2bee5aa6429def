//! One turn, start to answer: the history, the lease, the agent run in the
//! sandbox (its events streamed to the platform), the door's record of what
//! reached GitHub, the artifacts, the answer, and the turn's audit record.
//!
//! Must never: let an answer grow past [`MAX_ANSWER_BYTES`], record message
//! text or an artifact's contents in the audit log, or talk to a platform
//! other than through [`crate::platform::ChatPlatform`].

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moat_policy::gateway::{ChannelPolicy, SandboxMode};
use moat_store::{MessageState, TurnState};
use serde_json::json;
use tokio::sync::mpsc;

use super::{now_ms, Gateway, Pending, HISTORY_WAIT, MAX_REFUSAL_LINES, SHUTTING_DOWN};
use crate::agent::{AgentEvent, CancelHandle, TurnInput, TurnOutcome};
use crate::artifacts::Collected;
use crate::platform::ConvRef;

/// Refused tool calls recorded one by one per turn; the rest are counted.
const MAX_REFUSALS_AUDITED: usize = 50;
/// The longest answer kept, posted and stored (the agent's output is the
/// sandbox's: bounded here whatever an agent does).
const MAX_ANSWER_BYTES: usize = 256 * 1024;

/// `s` cut to `max` characters.
fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(max).collect::<String>())
    }
}

/// Cuts an answer longer than [`MAX_ANSWER_BYTES`] at a character boundary
/// and says so.
fn cap_answer(answer: &mut String) {
    cap_answer_at(answer, MAX_ANSWER_BYTES);
}

/// [`cap_answer`] at `max` bytes.
fn cap_answer_at(answer: &mut String, max: usize) {
    if answer.len() <= max {
        return;
    }
    let mut end = max;
    while !answer.is_char_boundary(end) {
        end -= 1;
    }
    let cut = answer.len() - end;
    answer.truncate(end);
    answer.push_str(&format!(
        "\n\nmoat: the answer was cut here ({cut} more bytes)"
    ));
}

/// Tries to record the end of a turn (0.25 + 0.5 + 1 + 2 s between them).
const RECORD_ATTEMPTS: u32 = 5;

impl Gateway {
    /// Runs one turn for `batch`, start to answer.
    pub(super) async fn turn(
        self,
        conv: ConvRef,
        channel: ChannelPolicy,
        batch: Vec<Pending>,
        cancel: CancelHandle,
        status: Arc<Mutex<String>>,
    ) {
        let started = batch
            .iter()
            .map(|p| p.arrived)
            .min()
            .unwrap_or_else(Instant::now);
        let ids: Vec<i64> = batch.iter().map(|p| p.message_id).collect();
        let refs: Vec<String> = batch.iter().filter_map(|p| p.message_ref.clone()).collect();
        let out = self.platform(conv.platform);
        let set_status = |s: &str| {
            if let Ok(mut st) = status.lock() {
                *st = s.to_string();
            }
        };
        let store = self.inner.store.clone();
        let mut started_turn = store.start_turn(conv.id, &ids, now_ms());
        if let Err(moat_store::StoreError::TurnRunning { turn_id: stale, .. }) = started_turn {
            // This conversation's turns run one after the other in its
            // actor, so a turn the store still has running is one whose end
            // could not be written (a full disk): closed, so that the
            // conversation is not stuck until the next restart.
            tracing::warn!(
                conversation = conv.id,
                turn = stale,
                "closing a turn whose end was never recorded"
            );
            let _ = store.finish_turn(
                stale,
                TurnState::Failed,
                0,
                Some("moat could not record the end of this turn"),
                now_ms(),
            );
            started_turn = store.start_turn(conv.id, &ids, now_ms());
        }
        let turn_id = match started_turn {
            Ok(t) => t,
            Err(e @ moat_store::StoreError::NotOwner { .. }) => {
                // Another node works on this conversation (docs/scale-out.md):
                // its messages stay queued, for the owner or for whoever
                // takes the conversation over; nothing is told or failed here.
                tracing::warn!(conversation = conv.id, error = %e, "left to the node that owns the conversation");
                for id in &ids {
                    let _ = store.set_message_state(*id, MessageState::Queued, None);
                }
                return;
            }
            Err(e) => {
                tracing::error!(conversation = conv.id, error = %e, "could not start a turn");
                for id in &ids {
                    let _ = store.set_message_state(
                        *id,
                        MessageState::Failed,
                        Some("moat could not start the turn"),
                    );
                }
                let failed = TurnOutcome {
                    preformatted: false,
                    answer: format!("moat could not start this turn: {e}"),
                    ok: false,
                    cancelled: false,
                };
                out.finished(&conv, &refs, &failed).await;
                return;
            }
        };
        self.inner.running.fetch_add(1, Ordering::Relaxed);
        // The platform's thread, briefly: a slow platform must not hold up
        // the turn (the stored messages are the fallback).
        let platform_history = tokio::time::timeout(HISTORY_WAIT, out.history(&conv, &refs))
            .await
            .ok()
            .flatten();
        let history = match platform_history {
            Some(h) => h,
            None => store
                .messages_since_last_turn(conv.id)
                .unwrap_or_default()
                .into_iter()
                .filter(|m| !ids.contains(&m.id) && m.state != MessageState::Dropped)
                .map(|m| format!("{}: {}", m.user, m.text))
                .collect(),
        };
        let input = TurnInput {
            messages: batch.iter().map(|p| p.text.clone()).collect(),
            history,
            resume: matches!(channel.sandbox, SandboxMode::PerThread { .. }),
        };
        let setup = self.inner.setup(channel.index);
        let (agent, limits) = (setup.agent, setup.artifacts);
        out.started(&conv, &refs).await;
        set_status("waiting for a sandbox");
        out.phase(&conv, "waiting for a sandbox").await;
        let held = self.hold_lease(&conv, &channel).await;
        let (mut usage, mut tool_calls, mut refusals) = ((0u64, 0u64), 0u64, 0usize);
        let mut collected = Collected::default();
        let mut outcome = match held {
            Err(text) if text == SHUTTING_DOWN => {
                tracing::info!(
                    conversation = conv.id,
                    turn = turn_id,
                    "turn left for the next start (shutting down)"
                );
                self.inner.running.fetch_sub(1, Ordering::Relaxed);
                return;
            }
            Err(text) => TurnOutcome {
                preformatted: false,
                answer: text,
                ok: false,
                cancelled: false,
            },
            Ok(mut held) => {
                // The lease's IPC endpoint speaks for this turn's sender.
                if let (Some(ep), Some(user)) = (held.ipc(), batch.first().map(|p| &p.user)) {
                    crate::ipc::bind_turn(ep, &self, &conv, &channel, user);
                }
                set_status("running");
                out.phase(&conv, "running").await;
                let (tx, mut rx) = mpsc::unbounded_channel::<AgentEvent>();
                let agent = agent.clone();
                let c2 = cancel.clone();
                // The channel's repository, cloned before the agent starts.
                let clone_plan = channel.github.as_ref().and_then(|g| {
                    let first = input.messages.first().map(String::as_str).unwrap_or("");
                    crate::github_clone::plan(g, conv.id, first)
                });
                // Whose turn it is, for the LLM door's accounting and budget_user.
                let turn_user = batch.first().map(|p| p.user.clone());
                let job = tokio::task::spawn_blocking(move || {
                    let mut held = held;
                    if let Some(d) = held.door() {
                        d.set_llm_user(turn_user.as_deref());
                    }
                    let cloned = match &clone_plan {
                        None => Ok(()),
                        Some(p) => {
                            let _ = tx.send(AgentEvent::Status(format!("cloning {}", p.repo)));
                            crate::github_clone::prepare(held.lease(), p).map(|_| ())
                        }
                    };
                    let out = match cloned {
                        Err(answer) => TurnOutcome {
                            preformatted: false,
                            answer,
                            ok: false,
                            cancelled: false,
                        },
                        Ok(()) => agent.run_turn(held.lease(), &input, &c2, &mut |e| {
                            let _ = tx.send(e);
                        }),
                    };
                    // Before the lease is given back (a pooled one is reset):
                    // what the agent left in ~/artifacts, read without
                    // following any link (crate::artifacts), with the
                    // sandbox stopped (it is stopped or reset next anyway).
                    if crate::artifacts::present(held.lease()) {
                        held.lease().stop();
                    }
                    let collected = crate::artifacts::collect(held.lease(), &limits);
                    // What the hand-back changed in host directories the
                    // sandbox could write (docs/workspace.md), for the audit.
                    let handed_back = held.lease().take_findings();
                    // What reached GitHub, from the door's own record.
                    let github = held
                        .door()
                        .map(|d| d.take_github_activity())
                        .unwrap_or_default();
                    (held, out, (collected, handed_back, github))
                });
                while let Some(ev) = rx.recv().await {
                    match ev {
                        AgentEvent::Text(t) => out.partial(&conv, &t).await,
                        AgentEvent::Status(s) => {
                            set_status(&s);
                            out.progress(&conv, &s).await;
                        }
                        AgentEvent::ToolCall { name, summary } => {
                            let s = format!("{name}: {summary}");
                            set_status(&s);
                            out.progress(&conv, &s).await;
                        }
                        AgentEvent::Refused { tool, reason } => {
                            // The names come from the sandbox: bounded in
                            // number and length before they are recorded.
                            refusals += 1;
                            if refusals <= MAX_REFUSALS_AUDITED {
                                self.audit(
                                    "tool-refused",
                                    json!({
                                        "conversation_id": conv.id,
                                        "turn_id": turn_id,
                                        "tool": clip(&tool, 200),
                                        "reason": clip(&reason, 200),
                                    }),
                                );
                            }
                        }
                        AgentEvent::Usage {
                            input_tokens,
                            output_tokens,
                        } => {
                            usage.0 += input_tokens;
                            usage.1 += output_tokens;
                        }
                        AgentEvent::ToolResult { .. } => tool_calls += 1,
                        AgentEvent::Error(e) => {
                            tracing::warn!(conversation = conv.id, turn = turn_id, error = %e, "agent error");
                        }
                    }
                }
                match job.await {
                    Ok((held, mut out, (found, handed_back, github))) => {
                        self.give_back(&conv, held).await;
                        if !github.is_empty() {
                            // The agent's text is cut first, so that moat's
                            // record is never what the cap cuts off.
                            cap_answer_at(&mut out.answer, MAX_ANSWER_BYTES - 32 * 1024);
                            if !out.answer.is_empty() && !out.answer.ends_with('\n') {
                                out.answer.push('\n');
                            }
                            crate::github_hooks::link(&self, conv.id, &github);
                            out.answer.push_str("\nOn GitHub (moat's record):\n");
                            for a in &github {
                                out.answer.push_str(&format!("- {a}\n"));
                                self.audit(
                                    "github-activity",
                                    json!({
                                        "conversation_id": conv.id,
                                        "turn_id": turn_id,
                                        "activity": a,
                                    }),
                                );
                            }
                        }
                        for f in handed_back.iter().take(MAX_REFUSALS_AUDITED) {
                            self.audit(
                                "hand-back",
                                json!({
                                    "conversation_id": conv.id,
                                    "turn_id": turn_id,
                                    "change": clip(&f.to_string(), 300),
                                }),
                            );
                        }
                        collected = found;
                        out
                    }
                    Err(e) => TurnOutcome {
                        preformatted: false,
                        answer: format!("moat: the turn crashed: {e}"),
                        ok: false,
                        cancelled: false,
                    },
                }
            }
        };
        cap_answer(&mut outcome.answer);
        if refusals > MAX_REFUSALS_AUDITED {
            self.audit(
                "tool-refused",
                json!({
                    "conversation_id": conv.id,
                    "turn_id": turn_id,
                    "more": refusals - MAX_REFUSALS_AUDITED,
                }),
            );
        }
        set_status("idle");
        self.artifacts_found(&conv, turn_id, &collected, &mut outcome);
        let state = if outcome.cancelled {
            TurnState::Cancelled
        } else if outcome.ok {
            TurnState::Done
        } else {
            TurnState::Failed
        };
        let error = (!outcome.ok).then(|| outcome.answer.lines().last().unwrap_or("").to_string());
        // The outbox: the answer is kept with the end of the turn, then
        // delivered, then marked delivered. A gateway killed before the mark
        // delivers the kept answer at its next start (recovery.rs) instead
        // of running the messages again, which gave a second, different
        // answer (the soak saw both: docs/soak.md). Where the store cannot
        // keep it (a full disk), the answer is still delivered.
        self.delivering(turn_id, true);
        let kept = self
            .record_end(turn_id, state, &outcome, error.as_deref())
            .await;
        if !collected.files.is_empty() {
            out.artifacts(&conv, &refs, &collected.files).await;
        }
        out.deliver(&conv, &refs, &outcome, turn_id).await;
        if kept {
            if let Err(e) = store.mark_delivered(turn_id, now_ms()) {
                tracing::warn!(turn = turn_id, error = %e, "could not mark an answer delivered; a restart delivers it again");
            }
        }
        self.delivering(turn_id, false);
        let secs = started.elapsed().as_secs_f64();
        self.inner.metrics.turn(outcome.ok, secs);
        self.inner.running.fetch_sub(1, Ordering::Relaxed);
        self.audit(
            "turn",
            json!({
                "conversation_id": conv.id,
                "turn_id": turn_id,
                "messages": ids,
                "state": format!("{state:?}").to_lowercase(),
                "answer_chars": outcome.answer.chars().count(),
                "duration_ms": (secs * 1000.0) as u64,
                "agent": agent.name(),
                "tool_calls": tool_calls,
                "input_tokens": usage.0,
                "output_tokens": usage.1,
            }),
        );
    }

    /// Records the end of the turn with its answer kept (the outbox),
    /// trying again for a few seconds when the store cannot be written (a
    /// full disk clears, a busy database frees). Whether it was recorded.
    async fn record_end(
        &self,
        turn_id: i64,
        state: TurnState,
        outcome: &TurnOutcome,
        error: Option<&str>,
    ) -> bool {
        let mut wait = Duration::from_millis(250);
        for attempt in 1..=RECORD_ATTEMPTS {
            let store = self.inner.store.clone();
            let (answer, verbatim) = (outcome.answer.clone(), outcome.preformatted);
            let error = error.map(str::to_string);
            let r = tokio::task::spawn_blocking(move || {
                store.finish_turn_keeping(
                    turn_id,
                    state,
                    &answer,
                    verbatim,
                    error.as_deref(),
                    now_ms(),
                )
            })
            .await;
            match r {
                Ok(Ok(())) => return true,
                Ok(Err(
                    e @ (moat_store::StoreError::TurnTransition { .. }
                    | moat_store::StoreError::NotFound { .. }
                    | moat_store::StoreError::NotOwner { .. }),
                )) => {
                    tracing::error!(turn = turn_id, error = %e, "could not record the end of a turn");
                    return false;
                }
                Ok(Err(e)) if attempt == RECORD_ATTEMPTS => {
                    tracing::error!(turn = turn_id, error = %e, attempts = attempt, "could not record the end of a turn");
                }
                Ok(Err(e)) => {
                    tracing::warn!(turn = turn_id, error = %e, "recording the end of a turn failed; trying again");
                }
                Err(e) => {
                    tracing::error!(turn = turn_id, error = %e, "recording the end of a turn failed");
                    return false;
                }
            }
            tokio::time::sleep(wait).await;
            wait *= 2;
        }
        false
    }

    /// Audits a turn's artifacts (name, size, SHA-256; never contents) and
    /// refusals, tells the user about every refusal in the answer, and
    /// offers the files to the web chat's watchers (kept for download).
    fn artifacts_found(
        &self,
        conv: &ConvRef,
        turn_id: i64,
        collected: &Collected,
        outcome: &mut TurnOutcome,
    ) {
        for a in &collected.files {
            self.audit(
                "artifact",
                json!({
                    "conversation_id": conv.id,
                    "turn_id": turn_id,
                    "name": a.name,
                    "bytes": a.size(),
                    "sha256": a.sha256,
                }),
            );
        }
        for (name, why) in &collected.refused {
            self.audit(
                "artifact-refused",
                json!({
                    "conversation_id": conv.id,
                    "turn_id": turn_id,
                    "name": name,
                    "reason": why.kind(),
                    "detail": why.to_string(),
                }),
            );
        }
        let lines = collected.refusal_lines(MAX_REFUSAL_LINES);
        if !lines.is_empty() {
            if !outcome.answer.is_empty() && !outcome.answer.ends_with('\n') {
                outcome.answer.push('\n');
            }
            for l in lines {
                outcome.answer.push_str(&l);
                outcome.answer.push('\n');
            }
        }
    }
}
