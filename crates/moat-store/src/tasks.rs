//! Scheduled tasks in the store (docs/tasks.md): the tasks, each task's run
//! log, and the groups admin channels registered (docs/ipc.md).
//!
//! Owns: the rows and their state changes. Must never: decide who may do
//! what (moat-policy's trust table does, in the gateway), or keep a
//! prompt in the clear when the store has a key (`tasks.prompt` is sealed).

use rusqlite::{params, OptionalExtension, Row, TransactionBehavior};

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

fn task_row(r: &Row<'_>) -> rusqlite::Result<Task> {
    Ok(Task {
        id: r.get(0)?,
        platform: r.get(1)?,
        channel: r.get(2)?,
        thread: r.get(3)?,
        creator: r.get(4)?,
        prompt: r.get(5)?,
        kind: r.get(6)?,
        spec: r.get(7)?,
        context: r.get(8)?,
        state: TaskState::parse(&r.get::<_, String>(9)?),
        next_run_ms: r.get(10)?,
        created_ms: r.get(11)?,
        detail: r.get(12)?,
    })
}

impl Store {
    fn open_task(&self, mut t: Task) -> Result<Task, StoreError> {
        t.prompt =
            self.sealer
                .open(&self.path, TASK_PROMPT, t.id, std::mem::take(&mut t.prompt))?;
        Ok(t)
    }

    fn tasks_where(
        &self,
        clause: &str,
        args: &[&dyn rusqlite::ToSql],
    ) -> Result<Vec<Task>, StoreError> {
        let rows: Vec<Task> = self
            .conn()
            .prepare_cached(&format!("SELECT {TASK_COLUMNS} FROM tasks {clause}"))
            .and_then(|mut s| s.query_map(args, task_row)?.collect())
            .map_err(self.err())?;
        rows.into_iter().map(|t| self.open_task(t)).collect()
    }

    /// Stores a new active task; its id.
    pub fn insert_task(&self, t: &NewTask) -> Result<i64, StoreError> {
        let err = self.err();
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&err)?;
        tx.prepare_cached(
            "INSERT INTO tasks (platform, channel, thread, creator, prompt, kind, spec, context,
                                state, next_run_ms, created_ms)
             VALUES (?1, ?2, ?3, ?4, '', ?5, ?6, ?7, 'active', ?8, ?9)",
        )
        .and_then(|mut s| {
            s.execute(params![
                t.platform,
                t.channel,
                t.thread,
                t.creator,
                t.kind,
                t.spec,
                t.context,
                t.next_run_ms,
                t.created_ms
            ])
        })
        .map_err(&err)?;
        let id = tx.last_insert_rowid();
        let sealed = self.sealer.seal(&self.path, TASK_PROMPT, id, &t.prompt)?;
        tx.execute(
            "UPDATE tasks SET prompt = ?2 WHERE id = ?1",
            params![id, sealed],
        )
        .map_err(&err)?;
        tx.commit().map_err(&err)?;
        drop(conn);
        self.committed();
        Ok(id)
    }

    /// The task `id`, or `None`.
    pub fn task(&self, id: i64) -> Result<Option<Task>, StoreError> {
        Ok(self.tasks_where("WHERE id = ?1", &[&id])?.pop())
    }

    /// The tasks of a chat that are not cancelled or done, oldest first.
    pub fn tasks_of_channel(&self, platform: &str, channel: &str) -> Result<Vec<Task>, StoreError> {
        self.tasks_where(
            "WHERE platform = ?1 AND channel = ?2 AND state IN ('active', 'paused', 'stopped')
             ORDER BY id",
            &[&platform, &channel],
        )
    }

    /// Every task that is not cancelled or done, oldest first.
    pub fn live_tasks(&self) -> Result<Vec<Task>, StoreError> {
        self.tasks_where(
            "WHERE state IN ('active', 'paused', 'stopped') ORDER BY id",
            &[],
        )
    }

    /// Active or paused tasks of a chat (what `max_per_channel` counts).
    pub fn count_tasks_of_channel(&self, platform: &str, channel: &str) -> Result<u64, StoreError> {
        self.conn()
            .prepare_cached(
                "SELECT count(*) FROM tasks
                 WHERE platform = ?1 AND channel = ?2 AND state IN ('active', 'paused')",
            )
            .and_then(|mut s| s.query_row(params![platform, channel], |r| r.get(0)))
            .map_err(self.err())
    }

    /// Active tasks due at `now_ms` or before, most overdue first.
    pub fn due_tasks(&self, now_ms: i64, limit: u32) -> Result<Vec<Task>, StoreError> {
        self.tasks_where(
            "WHERE state = 'active' AND next_run_ms <= ?1 ORDER BY next_run_ms LIMIT ?2",
            &[&now_ms, &limit],
        )
    }

    /// The earliest `next_run_ms` of the active tasks.
    pub fn next_due_ms(&self) -> Result<Option<i64>, StoreError> {
        self.conn()
            .prepare_cached("SELECT min(next_run_ms) FROM tasks WHERE state = 'active'")
            .and_then(|mut s| s.query_row([], |r| r.get(0)))
            .map_err(self.err())
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
        let n = self
            .conn()
            .prepare_cached(
                "UPDATE tasks SET state = ?2, next_run_ms = ?3, detail = ?4 WHERE id = ?1",
            )
            .and_then(|mut s| s.execute(params![id, state.as_str(), next_run_ms, detail]))
            .map_err(self.err())?;
        self.committed();
        if n == 0 {
            return Err(StoreError::NotFound { kind: "task", id });
        }
        Ok(())
    }

    /// Adds an entry to task `id`'s run log.
    pub fn record_task_run(&self, id: i64, run: &TaskRun) -> Result<(), StoreError> {
        self.conn()
            .prepare_cached(
                "INSERT INTO task_runs (task_id, due_ms, started_ms, outcome, detail)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    id,
                    run.due_ms,
                    run.started_ms,
                    run.outcome,
                    run.detail
                ])
            })
            .map_err(self.err())?;
        self.committed();
        Ok(())
    }

    /// Task `id`'s run log, newest first, at most `limit` entries.
    pub fn task_runs(&self, id: i64, limit: u32) -> Result<Vec<TaskRun>, StoreError> {
        self.conn()
            .prepare_cached(
                "SELECT due_ms, started_ms, outcome, detail FROM task_runs
                 WHERE task_id = ?1 ORDER BY id DESC LIMIT ?2",
            )
            .and_then(|mut s| {
                s.query_map(params![id, limit], |r| {
                    Ok(TaskRun {
                        due_ms: r.get(0)?,
                        started_ms: r.get(1)?,
                        outcome: r.get(2)?,
                        detail: r.get(3)?,
                    })
                })?
                .collect()
            })
            .map_err(self.err())
    }

    /// Registers (or renames) a group; `false` when it was registered already.
    pub fn register_group(&self, g: &RegisteredGroup) -> Result<bool, StoreError> {
        let existed = self.registered_group(&g.platform, &g.channel)?.is_some();
        self.conn()
            .prepare_cached(
                "INSERT INTO registered_groups (platform, channel, name, registered_by, created_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (platform, channel) DO UPDATE SET name = excluded.name",
            )
            .and_then(|mut s| {
                s.execute(params![
                    g.platform,
                    g.channel,
                    g.name,
                    g.registered_by,
                    g.created_ms
                ])
            })
            .map_err(self.err())?;
        self.committed();
        Ok(!existed)
    }

    /// The registered group of a chat, or `None`.
    pub fn registered_group(
        &self,
        platform: &str,
        channel: &str,
    ) -> Result<Option<RegisteredGroup>, StoreError> {
        self.conn()
            .prepare_cached(
                "SELECT platform, channel, name, registered_by, created_ms FROM registered_groups
                 WHERE platform = ?1 AND channel = ?2",
            )
            .and_then(|mut s| {
                s.query_row(params![platform, channel], group_row)
                    .optional()
            })
            .map_err(self.err())
    }

    /// Every registered group.
    pub fn registered_groups(&self) -> Result<Vec<RegisteredGroup>, StoreError> {
        self.conn()
            .prepare_cached(
                "SELECT platform, channel, name, registered_by, created_ms FROM registered_groups
                 ORDER BY platform, channel",
            )
            .and_then(|mut s| s.query_map([], group_row)?.collect())
            .map_err(self.err())
    }
}

fn group_row(r: &Row<'_>) -> rusqlite::Result<RegisteredGroup> {
    Ok(RegisteredGroup {
        platform: r.get(0)?,
        channel: r.get(1)?,
        name: r.get(2)?,
        registered_by: r.get(3)?,
        created_ms: r.get(4)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(channel: &str, next: i64) -> NewTask {
        NewTask {
            platform: "slack".into(),
            channel: channel.into(),
            thread: String::new(),
            creator: "U1".into(),
            prompt: "moat:looks like a prefix".into(),
            kind: "interval".into(),
            spec: "10m".into(),
            context: "isolated".into(),
            next_run_ms: next,
            created_ms: 0,
        }
    }

    #[test]
    fn tasks_round_trip_and_come_due() {
        let s = Store::open_in_memory().unwrap();
        let a = s.insert_task(&new("C1", 100)).unwrap();
        let b = s.insert_task(&new("C2", 50)).unwrap();
        assert_eq!(
            s.task(a).unwrap().unwrap().prompt,
            "moat:looks like a prefix"
        );
        assert_eq!(s.tasks_of_channel("slack", "C1").unwrap().len(), 1);
        let due: Vec<i64> = s.due_tasks(100, 10).unwrap().iter().map(|t| t.id).collect();
        assert_eq!(due, [b, a]);
        s.set_task_state(b, TaskState::Paused, None, None).unwrap();
        assert_eq!(s.due_tasks(100, 10).unwrap().len(), 1);
        assert_eq!(s.next_due_ms().unwrap(), Some(100));
        assert_eq!(s.count_tasks_of_channel("slack", "C2").unwrap(), 1);
        s.set_task_state(b, TaskState::Cancelled, None, Some("by U1"))
            .unwrap();
        assert_eq!(s.count_tasks_of_channel("slack", "C2").unwrap(), 0);
        assert!(s
            .set_task_state(999, TaskState::Paused, None, None)
            .is_err());
        // Active needs a next run (the schema holds it).
        assert!(s.set_task_state(a, TaskState::Active, None, None).is_err());
        s.record_task_run(
            a,
            &TaskRun {
                due_ms: 100,
                started_ms: 101,
                outcome: "started".into(),
                detail: None,
            },
        )
        .unwrap();
        assert_eq!(s.task_runs(a, 5).unwrap().len(), 1);
    }

    #[test]
    fn groups_register_once() {
        let s = Store::open_in_memory().unwrap();
        let g = RegisteredGroup {
            platform: "slack".into(),
            channel: "C9".into(),
            name: "ops".into(),
            registered_by: "U1".into(),
            created_ms: 1,
        };
        assert!(s.register_group(&g).unwrap());
        assert!(!s.register_group(&g).unwrap());
        assert_eq!(s.registered_groups().unwrap(), [g]);
    }
}
