//! Scheduled tasks (docs/tasks.md): scheduling, listing and changing them
//! (for the IPC tools and the chat commands `tasks`, `pause N`, `resume N`,
//! `cancel N`), and the scheduler that runs each due task as a turn.
//!
//! Owns: the task rules around the store (schedule checked against
//! `[tasks]`, at most `max_per_channel`, a missed run runs once), the run
//! log, and re-authorizing a task's creator at every run. Must never: run a
//! task as anyone but its creator, run it when the creator may no longer
//! talk in its channel (the task is stopped instead), or decide a right
//! itself (moat-policy's `trust::may_ipc` does).

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use moat_policy::gateway::{Authorization, Platform};
use moat_policy::tasks::{format_utc, Schedule};
use moat_policy::trust::{self, IpcGate, IpcOp, IpcTarget, TaskCommand};
use moat_store::{NewTask, Task, TaskRun, TaskState};
use serde_json::{json, Value};

use crate::ipc::ops::{arg_str, audit, OpError, OpResult};
use crate::ipc::Caller;
use crate::pipeline::{Accepted, ConvRef, Gateway, Inbound};

/// How often the scheduler looks for due tasks.
const TICK: Duration = Duration::from_secs(1);
/// Due tasks started per tick at most (the rest wait for the next one).
const PER_TICK: u32 = 200;
/// The longest prompt a task keeps.
const MAX_PROMPT: usize = 16_000;

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The event ids of task runs the scheduler handed to `accept`: these, and
/// only these, start a turn without the channel's trigger.
#[derive(Default)]
pub struct ScheduledRuns(Mutex<HashSet<String>>);

impl ScheduledRuns {
    fn add(&self, id: &str) {
        if let Ok(mut s) = self.0.lock() {
            s.insert(id.to_string());
        }
    }

    /// Was `event_id` handed over by the scheduler (forgets it)?
    pub fn take(&self, event_id: &str) -> bool {
        self.0
            .lock()
            .map(|mut s| s.remove(event_id))
            .unwrap_or(false)
    }
}

fn invalid(s: impl Into<String>) -> OpError {
    OpError::Invalid(s.into())
}

fn own(c: &Caller, t: &Task) -> bool {
    t.platform == c.platform.name() && t.channel == c.channel
}

/// `schedule_task`.
pub(crate) async fn schedule(gw: &Gateway, c: &Caller, args: &Value) -> OpResult {
    let op = IpcOp::ScheduleTask;
    let chat = arg_str(args, "chat").filter(|ch| *ch != c.channel);
    let target = match chat {
        None => IpcTarget::Own,
        Some(ch) => IpcTarget::Other {
            listed: crate::ipc::ops::listed(gw, c.platform, ch),
        },
    };
    let gate = trust::ipc_gate(c.trust, op, target, crate::ipc::ops::approvals_of(gw, c))
        .map_err(|r| OpError::refused(r, op))?;
    if let IpcTarget::Other { listed: false } = target {
        return Err(OpError::refused(trust::IpcRefusal::NotListed, op));
    }
    let prompt = arg_str(args, "prompt").ok_or_else(|| invalid("schedule_task needs a prompt"))?;
    if prompt.chars().count() > MAX_PROMPT {
        return Err(invalid(format!(
            "the prompt is over {MAX_PROMPT} characters"
        )));
    }
    let kind = arg_str(args, "schedule_type").unwrap_or("");
    let value = arg_str(args, "schedule_value").unwrap_or("");
    let sched =
        Schedule::parse(kind, value).map_err(|e| invalid(format!("schedule_value: {e}")))?;
    let now = now_ms();
    let limits = gw.inner.cfg.tasks;
    sched
        .check_min_interval(limits.min_interval, now)
        .map_err(invalid)?;
    let Some(next) = sched.next_after(now, now) else {
        return Err(invalid(format!(
            "{value:?} is in the past; a once task needs a future time"
        )));
    };
    let context = match arg_str(args, "context").unwrap_or("isolated") {
        c @ ("conversation" | "isolated") => c,
        other => {
            return Err(invalid(format!(
                "context {other:?}: use \"conversation\" or \"isolated\""
            )))
        }
    };
    let channel = chat.unwrap_or(&c.channel);
    // `approve = ["schedule"]`: checked first, held until an admin decides,
    // then scheduled from the moment of the approval.
    let (now, next) = match gate {
        IpcGate::Go => (now, next),
        IpcGate::Approval(k) => {
            crate::ipc::ops::held(
                gw,
                c,
                k,
                format!(
                    "The agent of user {}'s turn wants to schedule this task in {} ({kind} {value:?}, {context}):",
                    c.user,
                    channel.chars().take(200).collect::<String>()
                ),
                Some(prompt.to_string()),
                "schedule_task",
            )
            .await?;
            let now = now_ms();
            let next = sched.next_after(now, now).ok_or_else(|| {
                invalid(format!(
                    "{value:?} passed while the task waited for approval"
                ))
            })?;
            (now, next)
        }
    };
    let store = &gw.inner.store;
    let n = store
        .count_tasks_of_channel(c.platform.name(), channel)
        .map_err(|e| invalid(e.to_string()))?;
    if n >= u64::from(limits.max_per_channel) {
        return Err(invalid(format!(
            "this channel has {n} tasks, the most it may have (tasks.max_per_channel); cancel one first"
        )));
    }
    let thread = if context == "conversation" && chat.is_none() {
        c.thread.clone()
    } else {
        String::new()
    };
    let id = store
        .insert_task(&NewTask {
            platform: c.platform.name().to_string(),
            channel: channel.to_string(),
            thread,
            creator: c.user.clone(),
            prompt: prompt.to_string(),
            kind: kind.to_string(),
            spec: value.to_string(),
            context: context.to_string(),
            next_run_ms: next,
            created_ms: now,
        })
        .map_err(|e| invalid(format!("moat could not store the task: {e}")))?;
    Ok((
        format!("task {id} scheduled; first run {}", format_utc(next)),
        Some(id),
    ))
}

fn line(t: &Task) -> String {
    let when = match (t.state, t.next_run_ms) {
        (TaskState::Active, Some(n)) => format!("next {}", format_utc(n)),
        (s, _) => s.as_str().to_string(),
    };
    let prompt: String = t.prompt.chars().take(60).collect();
    format!(
        "{} [{} {}] {} by {} in {}: {}",
        t.id, t.kind, t.spec, when, t.creator, t.channel, prompt
    )
}

/// `list_tasks`: the caller's channel's tasks (an admin's: every channel's).
pub(crate) fn list(gw: &Gateway, c: &Caller) -> OpResult {
    let op = IpcOp::ListTasks;
    trust::may_ipc(c.trust, op, IpcTarget::Own).map_err(|r| OpError::refused(r, op))?;
    let all = trust::may_ipc(c.trust, op, IpcTarget::Other { listed: true }).is_ok();
    let store = &gw.inner.store;
    let tasks = if all {
        store.live_tasks()
    } else {
        store.tasks_of_channel(c.platform.name(), &c.channel)
    }
    .map_err(|e| invalid(e.to_string()))?;
    if tasks.is_empty() {
        return Ok(("No scheduled tasks.".into(), None));
    }
    Ok((tasks.iter().map(line).collect::<Vec<_>>().join("\n"), None))
}

/// `pause_task`, `resume_task`, `cancel_task` on task `id`.
pub(crate) fn change(gw: &Gateway, c: &Caller, op: IpcOp, id: i64) -> OpResult {
    let store = &gw.inner.store;
    let not_found = || {
        invalid(format!(
            "there is no task {id} in this channel (list_tasks shows yours)"
        ))
    };
    let t = store
        .task(id)
        .map_err(|e| invalid(e.to_string()))?
        .ok_or_else(not_found)?;
    let target = if own(c, &t) {
        IpcTarget::Own
    } else {
        IpcTarget::Other { listed: true }
    };
    // Someone else's task is "not found" to whoever may not touch it: its
    // existence is not theirs to learn.
    if let Err(r) = trust::may_ipc(c.trust, op, target) {
        return Err(match target {
            IpcTarget::Own => OpError::refused(r, op),
            IpcTarget::Other { .. } => OpError::Refused {
                reason: r.name(),
                message: not_found().message().to_string(),
            },
        });
    }
    let now = now_ms();
    let (state, next, word) = match (op, t.state) {
        (_, TaskState::Cancelled | TaskState::Done) => {
            return Err(invalid(format!(
                "task {id} is {} already",
                t.state.as_str()
            )))
        }
        (IpcOp::PauseTask, _) => (TaskState::Paused, None, "paused"),
        (IpcOp::CancelTask, _) => (TaskState::Cancelled, None, "cancelled"),
        (IpcOp::ResumeTask, TaskState::Active) => {
            return Ok((format!("task {id} is running already"), Some(id)))
        }
        (IpcOp::ResumeTask, _) => {
            let next = Schedule::parse(&t.kind, &t.spec)
                .ok()
                .and_then(|s| s.next_after(now, t.created_ms));
            match next {
                Some(n) => (TaskState::Active, Some(n), "resumed"),
                None => {
                    return Err(invalid(format!(
                        "task {id} has no run left; schedule a new one"
                    )))
                }
            }
        }
        _ => return Err(invalid("not a task change")),
    };
    store
        .set_task_state(id, state, next, Some(&format!("{word} by {}", c.user)))
        .map_err(|e| invalid(e.to_string()))?;
    Ok((format!("task {id} {word}"), Some(id)))
}

/// A person's task command in a conversation: answered there, audited.
pub(crate) async fn command(gw: Gateway, conv: ConvRef, caller: Caller, cmd: TaskCommand) {
    let op = cmd.op();
    let r = match cmd {
        TaskCommand::List => list(&gw, &caller),
        TaskCommand::Pause(id) | TaskCommand::Resume(id) | TaskCommand::Cancel(id) => {
            change(&gw, &caller, op, id)
        }
    };
    audit(&gw, &caller, "chat", "", op.name(), &r);
    let text = match r {
        Ok((t, _)) => t,
        Err(e) => e.message().to_string(),
    };
    gw.platform(conv.platform).notice(&conv, &text).await;
}

/// The scheduler: every [`TICK`], starts the tasks that are due. Runs until
/// the gateway is dropped.
pub async fn run(gw: Gateway) {
    loop {
        // Incident mode runs nothing; due tasks wait for the lift.
        if !gw.paused() {
            tick(&gw, now_ms()).await;
        }
        tokio::time::sleep(TICK).await;
    }
}

/// Starts every task due at `now` (public for the benchmark).
pub async fn tick(gw: &Gateway, now: i64) -> usize {
    let due = match gw.inner.store.due_tasks(now, PER_TICK) {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(error = %e, "could not read the due tasks");
            return 0;
        }
    };
    let n = due.len();
    for t in due {
        run_one(gw, t, now).await;
    }
    n
}

fn log_run(gw: &Gateway, t: &Task, due: i64, outcome: &str, detail: Option<String>) {
    let run = TaskRun {
        due_ms: due,
        started_ms: now_ms(),
        outcome: outcome.to_string(),
        detail: detail.clone(),
    };
    if let Err(e) = gw.inner.store.record_task_run(t.id, &run) {
        tracing::error!(task = t.id, error = %e, "could not log a task run");
    }
    let mut rec = json!({"task_id": t.id, "platform": t.platform, "channel": t.channel, "creator": t.creator, "due_ms": due, "outcome": outcome});
    if let Some(d) = detail {
        rec["detail"] = json!(d);
    }
    let _ = gw.inner.audit.append("task-run", rec);
}

async fn run_one(gw: &Gateway, t: Task, now: i64) {
    let due = t.next_run_ms.unwrap_or(now);
    let store = &gw.inner.store;
    let Ok(platform) = Platform::parse(&t.platform) else {
        let _ = store.set_task_state(
            t.id,
            TaskState::Stopped,
            None,
            Some("its platform is no longer known"),
        );
        log_run(gw, &t, due, "refused", Some("unknown platform".into()));
        return;
    };
    // Re-authorized now, under today's policy: a creator who may no longer
    // talk here stops their tasks.
    if let Authorization::Denied { reason } = gw.authorize(platform, &t.channel, &t.creator) {
        let detail = format!("stopped: its creator may no longer run it ({reason})");
        let _ = store.set_task_state(t.id, TaskState::Stopped, None, Some(&detail));
        log_run(gw, &t, due, "refused", Some(detail));
        return;
    }
    // The next run is recorded before this one starts: a crash in between
    // loses this run rather than repeating it, and a missed run (downtime)
    // runs once, then the schedule continues from now.
    let next = Schedule::parse(&t.kind, &t.spec)
        .ok()
        .and_then(|s| s.next_after(now, t.created_ms));
    let set = match next {
        Some(n) => store.set_task_state(t.id, TaskState::Active, Some(n), None),
        None => store.set_task_state(t.id, TaskState::Done, None, Some("ran")),
    };
    if let Err(e) = set {
        tracing::error!(task = t.id, error = %e, "could not advance a task");
        return;
    }
    let event_id = format!("moat-task:{}:{due}", t.id);
    // `conversation`: in the thread it was scheduled from; `isolated`: at
    // the channel's top level, apart from every thread.
    let thread = if t.context == "conversation" {
        t.thread.clone()
    } else {
        crate::pipeline::CHANNEL_THREAD.to_string()
    };
    gw.inner.scheduled.add(&event_id);
    let accepted = gw
        .accept(Inbound {
            platform,
            event_id: event_id.clone(),
            channel: t.channel.clone(),
            thread,
            user: t.creator.clone(),
            text: t.prompt.clone(),
            ts_ms: now,
            message_ref: None,
            addressed: true,
            attachments: Vec::new(),
        })
        .await;
    gw.inner.scheduled.take(&event_id);
    match accepted {
        Ok(Accepted::Queued { .. }) => log_run(gw, &t, due, "started", None),
        Ok(other) => log_run(gw, &t, due, "refused", Some(format!("{other:?}"))),
        Err(e) => log_run(gw, &t, due, "failed", Some(e.to_string())),
    }
}
