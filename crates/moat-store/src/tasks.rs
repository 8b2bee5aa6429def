//! Scheduled tasks in the store (docs/tasks.md): the tasks, each task's run
//! log, and the groups admin channels registered (docs/ipc.md).
//!
//! Owns: the rows and their state changes. Must never: decide who may do
//! what (moat-policy's trust table does, in the gateway), or keep a
//! prompt in the clear when the store has a key (`tasks.prompt` is sealed).

use crate::db::{args, Row};
use crate::sealed::TASK_PROMPT;
use crate::{Store, StoreError};

/// Where a task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    /// Runs at `next_run_ms`.
    Active,
    /// Kept, but does not run until resumed.
    Paused,
    /// Ended by a person or the agent.
    Cancelled,
    /// A `once` task that ran.
    Done,
    /// Ended by moat: its creator may no longer run it (`detail` says why).
    Stopped,
}

impl TaskState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Paused => "paused",
            Self::Cancelled => "cancelled",
            Self::Done => "done",
            Self::Stopped => "stopped",
        }
    }

    fn parse(s: &str) -> TaskState {
        match s {
            "active" => Self::Active,
            "paused" => Self::Paused,
            "done" => Self::Done,
            "stopped" => Self::Stopped,
            _ => Self::Cancelled,
        }
    }
}

/// A task to store (its schedule already checked by the caller).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTask {
    pub platform: String,
    pub channel: String,
    /// The conversation's thread for `context = "conversation"`; empty for
    /// an isolated task (each run a fresh thread).
    pub thread: String,
    pub creator: String,
    pub prompt: String,
    /// `cron`, `interval` or `once`.
    pub kind: String,
    pub spec: String,
    /// `conversation` or `isolated`.
    pub context: String,
    pub next_run_ms: i64,
    pub created_ms: i64,
}

/// A stored task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    pub id: i64,
    pub platform: String,
    pub channel: String,
    pub thread: String,
    pub creator: String,
    pub prompt: String,
    pub kind: String,
    pub spec: String,
    pub context: String,
    pub state: TaskState,
    pub next_run_ms: Option<i64>,
    pub created_ms: i64,
    pub detail: Option<String>,
}

/// One entry of a task's run log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRun {
    pub due_ms: i64,
    pub started_ms: i64,
    /// `started`, `refused` or `failed`.
    pub outcome: String,
    pub detail: Option<String>,
}

/// A chat an admin channel registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisteredGroup {
    pub platform: String,
    pub channel: String,
    pub name: String,
    pub registered_by: String,
    pub created_ms: i64,
}

const TASK_COLUMNS: &str = "id, platform, channel, thread, creator, prompt, kind, spec, context, \
                            state, next_run_ms, created_ms, detail";
const GROUP_COLUMNS: &str = "platform, channel, name, registered_by, created_ms";

fn task_row(r: &Row) -> Result<Task, StoreError> {
    Ok(Task {
        id: r.int(0)?,
        platform: r.text(1)?,
        channel: r.text(2)?,
        thread: r.text(3)?,
        creator: r.text(4)?,
        prompt: r.text(5)?,
        kind: r.text(6)?,
        spec: r.text(7)?,
        context: r.text(8)?,
        state: TaskState::parse(&r.text(9)?),
        next_run_ms: r.opt_int(10)?,
        created_ms: r.int(11)?,
        detail: r.opt_text(12)?,
    })
}

fn group_row(r: &Row) -> Result<RegisteredGroup, StoreError> {
    Ok(RegisteredGroup {
        platform: r.text(0)?,
        channel: r.text(1)?,
        name: r.text(2)?,
        registered_by: r.text(3)?,
        created_ms: r.int(4)?,
    })
}

impl Store {
    fn open_task(&self, mut t: Task) -> Result<Task, StoreError> {
        t.prompt =
            self.sealer
                .open(&self.path, TASK_PROMPT, t.id, std::mem::take(&mut t.prompt))?;
        Ok(t)
    }

    /// The tasks matching `clause` (a fixed `WHERE ...`; values are bound).
    fn tasks_where(
        &self,
        clause: &str,
        args: &[crate::db::Value],
    ) -> Result<Vec<Task>, StoreError> {
        let sql = format!("SELECT {TASK_COLUMNS} FROM tasks {clause}");
        let rows = self.read(|c| c.query(&sql, args))?;
        rows.iter()
            .map(|r| task_row(r).and_then(|t| self.open_task(t)))
            .collect()
    }

    /// Stores a new active task; its id.
    pub fn insert_task(&self, t: &NewTask) -> Result<i64, StoreError> {
        self.write(|c| {
            // The prompt is sealed bound to the row id: the row first, the
            // prompt in the same transaction.
            let id = c
                .query_one(
                    "INSERT INTO tasks (platform, channel, thread, creator, prompt, kind, spec,
                                        context, state, next_run_ms, created_ms)
                     VALUES (?1, ?2, ?3, ?4, '', ?5, ?6, ?7, 'active', ?8, ?9)
                     RETURNING id",
                    args![
                        &t.platform,
                        &t.channel,
                        &t.thread,
                        &t.creator,
                        &t.kind,
                        &t.spec,
                        &t.context,
                        t.next_run_ms,
                        t.created_ms
                    ],
                )?
                .int(0)?;
            let sealed = self.sealer.seal(&self.path, TASK_PROMPT, id, &t.prompt)?;
            c.execute(
                "UPDATE tasks SET prompt = ?2 WHERE id = ?1",
                args![id, sealed],
            )?;
            Ok(id)
        })
    }

    /// The task `id`, or `None`.
    pub fn task(&self, id: i64) -> Result<Option<Task>, StoreError> {
        Ok(self.tasks_where("WHERE id = ?1", args![id])?.pop())
    }

    /// The tasks of a chat that are not cancelled or done, oldest first.
    pub fn tasks_of_channel(&self, platform: &str, channel: &str) -> Result<Vec<Task>, StoreError> {
        self.tasks_where(
            "WHERE platform = ?1 AND channel = ?2 AND state IN ('active', 'paused', 'stopped')
             ORDER BY id",
            args![platform, channel],
        )
    }

    /// Every task that is not cancelled or done, oldest first.
    pub fn live_tasks(&self) -> Result<Vec<Task>, StoreError> {
        self.tasks_where(
            "WHERE state IN ('active', 'paused', 'stopped') ORDER BY id",
            args![],
        )
    }

    /// Active or paused tasks of a chat (what `max_per_channel` counts).
    pub fn count_tasks_of_channel(&self, platform: &str, channel: &str) -> Result<u64, StoreError> {
        let n = self.read(|c| {
            c.query_one(
                "SELECT count(*) FROM tasks
                 WHERE platform = ?1 AND channel = ?2 AND state IN ('active', 'paused')",
                args![platform, channel],
            )?
            .int(0)
        })?;
        Ok(n.max(0) as u64)
    }

    /// Active tasks due at `now_ms` or before, most overdue first.
    pub fn due_tasks(&self, now_ms: i64, limit: u32) -> Result<Vec<Task>, StoreError> {
        self.tasks_where(
            "WHERE state = 'active' AND next_run_ms <= ?1 ORDER BY next_run_ms, id LIMIT ?2",
            args![now_ms, i64::from(limit)],
        )
    }

    /// The earliest `next_run_ms` of the active tasks.
    pub fn next_due_ms(&self) -> Result<Option<i64>, StoreError> {
        self.read(|c| {
            c.query_one(
                "SELECT min(next_run_ms) FROM tasks WHERE state = 'active'",
                args![],
            )?
            .opt_int(0)
        })
    }

    /// Sets a task's state (and `next_run_ms`, required for `active`);
    /// `detail` says why. Unknown id: [`StoreError::NotFound`].
    pub fn set_task_state(
        &self,
        id: i64,
        state: TaskState,
        next_run_ms: Option<i64>,
        detail: Option<&str>,
    ) -> Result<(), StoreError> {
        let n = self.write(|c| {
            c.execute(
                "UPDATE tasks SET state = ?2, next_run_ms = ?3, detail = ?4 WHERE id = ?1",
                args![id, state.as_str(), next_run_ms, detail],
            )
        })?;
        if n == 0 {
            return Err(StoreError::NotFound { kind: "task", id });
        }
        Ok(())
    }

    /// Adds an entry to task `id`'s run log.
    pub fn record_task_run(&self, id: i64, run: &TaskRun) -> Result<(), StoreError> {
        self.write(|c| {
            c.execute(
                "INSERT INTO task_runs (task_id, due_ms, started_ms, outcome, detail)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                args![
                    id,
                    run.due_ms,
                    run.started_ms,
                    &run.outcome,
                    run.detail.as_deref()
                ],
            )
        })?;
        Ok(())
    }

    /// Task `id`'s run log, newest first, at most `limit` entries.
    pub fn task_runs(&self, id: i64, limit: u32) -> Result<Vec<TaskRun>, StoreError> {
        let rows = self.read(|c| {
            c.query(
                "SELECT due_ms, started_ms, outcome, detail FROM task_runs
                 WHERE task_id = ?1 ORDER BY id DESC LIMIT ?2",
                args![id, i64::from(limit)],
            )
        })?;
        rows.iter()
            .map(|r| {
                Ok(TaskRun {
                    due_ms: r.int(0)?,
                    started_ms: r.int(1)?,
                    outcome: r.text(2)?,
                    detail: r.opt_text(3)?,
                })
            })
            .collect()
    }

    /// Registers (or renames) a group; `false` when it was registered already.
    pub fn register_group(&self, g: &RegisteredGroup) -> Result<bool, StoreError> {
        self.write(|c| {
            let existed = c
                .query_opt(
                    "SELECT 1 FROM registered_groups WHERE platform = ?1 AND channel = ?2",
                    args![&g.platform, &g.channel],
                )?
                .is_some();
            c.execute(
                "INSERT INTO registered_groups (platform, channel, name, registered_by, created_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (platform, channel) DO UPDATE SET name = excluded.name",
                args![
                    &g.platform,
                    &g.channel,
                    &g.name,
                    &g.registered_by,
                    g.created_ms
                ],
            )?;
            Ok(!existed)
        })
    }

    /// The registered group of a chat, or `None`.
    pub fn registered_group(
        &self,
        platform: &str,
        channel: &str,
    ) -> Result<Option<RegisteredGroup>, StoreError> {
        let sql = format!(
            "SELECT {GROUP_COLUMNS} FROM registered_groups WHERE platform = ?1 AND channel = ?2"
        );
        self.read(|c| {
            c.query_opt(&sql, args![platform, channel])?
                .map(|r| group_row(&r))
                .transpose()
        })
    }

    /// Every registered group.
    pub fn registered_groups(&self) -> Result<Vec<RegisteredGroup>, StoreError> {
        let sql =
            format!("SELECT {GROUP_COLUMNS} FROM registered_groups ORDER BY platform, channel");
        let rows = self.read(|c| c.query(&sql, args![]))?;
        rows.iter().map(group_row).collect()
    }
}
