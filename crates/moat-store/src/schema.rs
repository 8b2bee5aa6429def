//! The schema and its migrations.
//!
//! `MIGRATIONS[i]` takes a database from schema `i` to schema `i + 1`; the
//! schema a database is at is its `PRAGMA user_version` (0 for a new file).
//! Each script runs in its own transaction together with the `user_version`
//! bump, so a database is always at exactly one schema: a failed or
//! interrupted migration leaves it at the one before.
//!
//! PostgreSQL has its own scripts, `PG_MIGRATIONS[i]` the same step as
//! `MIGRATIONS[i]` in its dialect (BIGINT identities, `"user"` quoted, no
//! STRICT), and keeps its version in the table `moat_schema`; nodes that
//! start together migrate one after the other under an advisory lock.
//!
//! Rules for whoever adds a migration: append to BOTH lists (a test checks
//! they are as long), never edit or reorder a script that has shipped; a
//! script must not run `PRAGMA user_version` or commit itself; state names
//! are the strings in `model.rs`; every integer column is BIGINT on
//! PostgreSQL (the store binds 64-bit integers).

use std::path::Path;

use rusqlite::{Connection, TransactionBehavior};

use crate::db::{args, Conn};
use crate::error::StoreError;
use crate::pg::Pg;

/// `PRAGMA application_id` of a moat database ("moat" in ASCII). A database
/// with another non-zero id belongs to some other program and is refused.
pub const APPLICATION_ID: i32 = 0x6d6f_6174;

/// The migration scripts, in order. The schema this build writes is
/// `MIGRATIONS.len()`.
pub const MIGRATIONS: &[&str] = &[
    // 1: conversations, turns, messages.
    r#"
CREATE TABLE conversations (
    id              INTEGER PRIMARY KEY,
    platform        TEXT NOT NULL,
    channel         TEXT NOT NULL,
    thread          TEXT NOT NULL,
    created_ms      INTEGER NOT NULL,
    last_active_ms  INTEGER NOT NULL,
    sandbox_mode    TEXT CHECK (sandbox_mode IN ('pool', 'per-thread')),
    lease_name      TEXT,
    agent_session   TEXT,
    UNIQUE (platform, channel, thread)
) STRICT;

CREATE INDEX conversations_idle ON conversations (last_active_ms)
    WHERE lease_name IS NOT NULL;

CREATE TABLE turns (
    id              INTEGER PRIMARY KEY,
    conversation_id INTEGER NOT NULL REFERENCES conversations (id),
    state           TEXT NOT NULL
                    CHECK (state IN ('running', 'done', 'failed', 'cancelled')),
    started_ms      INTEGER NOT NULL,
    ended_ms        INTEGER,
    answer_chars    INTEGER NOT NULL DEFAULT 0 CHECK (answer_chars >= 0),
    error           TEXT,
    CHECK ((state = 'running') = (ended_ms IS NULL))
) STRICT;

-- At most one running turn per conversation: a conversation's sandbox never
-- serves two turns at once.
CREATE UNIQUE INDEX turns_running ON turns (conversation_id)
    WHERE state = 'running';
CREATE INDEX turns_by_conversation ON turns (conversation_id, id);

CREATE TABLE messages (
    id              INTEGER PRIMARY KEY,
    platform        TEXT NOT NULL,
    event_id        TEXT NOT NULL,
    conversation_id INTEGER NOT NULL REFERENCES conversations (id),
    user            TEXT NOT NULL,
    text            TEXT NOT NULL,
    ts_ms           INTEGER NOT NULL,
    state           TEXT NOT NULL DEFAULT 'received'
                    CHECK (state IN ('received', 'queued', 'running',
                                     'answered', 'failed', 'dropped')),
    turn_id         INTEGER REFERENCES turns (id),
    detail          TEXT,
    UNIQUE (platform, event_id),
    CHECK (state <> 'running' OR turn_id IS NOT NULL)
) STRICT;

CREATE INDEX messages_by_state ON messages (state, id);
CREATE INDEX messages_by_conversation ON messages (conversation_id, id);
CREATE INDEX messages_by_turn ON messages (turn_id) WHERE turn_id IS NOT NULL;
"#,
    // 2: encryption at rest. The store's own settings (the key check), and
    // the "moat:" prefix reserved for sealed values: a plaintext that
    // already starts with it is marked as plaintext (GLOB is case-sensitive).
    r#"
CREATE TABLE store_meta (
    name            TEXT PRIMARY KEY,
    value           TEXT NOT NULL
) STRICT;

UPDATE messages SET text = 'moat:p:' || text WHERE text GLOB 'moat:*';
UPDATE messages SET detail = 'moat:p:' || detail WHERE detail GLOB 'moat:*';
UPDATE turns SET error = 'moat:p:' || error WHERE error GLOB 'moat:*';
UPDATE conversations SET agent_session = 'moat:p:' || agent_session
    WHERE agent_session GLOB 'moat:*';
"#,
    // 3: the platform's own id of a message (Slack: its ts), so that a
    // message recovered after a crash still gets its reactions.
    r#"
ALTER TABLE messages ADD COLUMN message_ref TEXT;
"#,
    // 4: GitHub from chat. Which conversation pushed a branch or opened a
    // pull request (from the door's record), so that the repository's
    // webhook events reach it; and the deliveries already taken.
    r#"
CREATE TABLE github_links (
    repo            TEXT NOT NULL,
    kind            TEXT NOT NULL CHECK (kind IN ('branch', 'pr')),
    name            TEXT NOT NULL,
    conversation_id INTEGER NOT NULL REFERENCES conversations (id),
    created_ms      INTEGER NOT NULL,
    PRIMARY KEY (repo, kind, name)
) STRICT;

CREATE TABLE github_deliveries (
    id              TEXT PRIMARY KEY,
    ts_ms           INTEGER NOT NULL
) STRICT;
"#,
    // 5: many gateway nodes on one database: which node owns each
    // conversation, until when (renewed by the owner's heartbeat; an
    // expired lease may be taken over). Unused by a single SQLite node.
    r#"
CREATE TABLE conversation_owners (
    conversation_id INTEGER PRIMARY KEY REFERENCES conversations (id),
    node            TEXT NOT NULL,
    until_ms        INTEGER NOT NULL
) STRICT;

CREATE INDEX conversation_owners_by_node ON conversation_owners (node, until_ms);
"#,
    // 6: scheduled tasks (docs/tasks.md), their run log, and the groups an
    // admin channel registered through IPC (docs/ipc.md).
    r#"
CREATE TABLE tasks (
    id              INTEGER PRIMARY KEY,
    platform        TEXT NOT NULL,
    channel         TEXT NOT NULL,
    thread          TEXT NOT NULL,
    creator         TEXT NOT NULL,
    prompt          TEXT NOT NULL,
    kind            TEXT NOT NULL CHECK (kind IN ('cron', 'interval', 'once')),
    spec            TEXT NOT NULL,
    context         TEXT NOT NULL CHECK (context IN ('conversation', 'isolated')),
    state           TEXT NOT NULL
                    CHECK (state IN ('active', 'paused', 'cancelled', 'done', 'stopped')),
    next_run_ms     INTEGER,
    created_ms      INTEGER NOT NULL,
    detail          TEXT,
    CHECK (state <> 'active' OR next_run_ms IS NOT NULL)
) STRICT;

CREATE INDEX tasks_due ON tasks (next_run_ms) WHERE state = 'active';
CREATE INDEX tasks_by_channel ON tasks (platform, channel, id);

CREATE TABLE task_runs (
    id              INTEGER PRIMARY KEY,
    task_id         INTEGER NOT NULL REFERENCES tasks (id),
    due_ms          INTEGER NOT NULL,
    started_ms      INTEGER NOT NULL,
    outcome         TEXT NOT NULL CHECK (outcome IN ('started', 'refused', 'failed')),
    detail          TEXT
) STRICT;

CREATE INDEX task_runs_by_task ON task_runs (task_id, id);

CREATE TABLE registered_groups (
    platform        TEXT NOT NULL,
    channel         TEXT NOT NULL,
    name            TEXT NOT NULL,
    registered_by   TEXT NOT NULL,
    created_ms      INTEGER NOT NULL,
    PRIMARY KEY (platform, channel)
) STRICT;
"#,
    // 7: the outbox. A finished turn keeps its answer (sealed like the
    // messages; `answer_verbatim`: command output, shown as it is) until
    // the platform has it: `delivery` is 'pending' from
    // the end of the turn until the answer is delivered, so that a restart
    // delivers the kept answer instead of running the messages again. NULL:
    // a turn of an older moat, or one whose answer is not kept.
    r#"
ALTER TABLE turns ADD COLUMN answer TEXT;
ALTER TABLE turns ADD COLUMN delivery TEXT CHECK (delivery IN ('pending', 'delivered'));
ALTER TABLE turns ADD COLUMN delivered_ms INTEGER;
ALTER TABLE turns ADD COLUMN answer_verbatim INTEGER NOT NULL DEFAULT 0
    CHECK (answer_verbatim IN (0, 1));
CREATE INDEX turns_undelivered ON turns (id) WHERE delivery = 'pending';
"#,
    // 8: unknown senders an admin let in (docs/approvals.md,
    // `unknown = "request_approval"`).
    r#"
CREATE TABLE admitted_users (
    platform        TEXT NOT NULL,
    channel         TEXT NOT NULL,
    user            TEXT NOT NULL,
    admitted_by     TEXT NOT NULL,
    created_ms      INTEGER NOT NULL,
    PRIMARY KEY (platform, channel, user)
) STRICT;
"#,
];

/// The same migrations for PostgreSQL, step for step.
pub const PG_MIGRATIONS: &[&str] = &[
    // 1: conversations, turns, messages.
    r#"
CREATE TABLE conversations (
    id              BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    platform        TEXT NOT NULL,
    channel         TEXT NOT NULL,
    thread          TEXT NOT NULL,
    created_ms      BIGINT NOT NULL,
    last_active_ms  BIGINT NOT NULL,
    sandbox_mode    TEXT CHECK (sandbox_mode IN ('pool', 'per-thread')),
    lease_name      TEXT,
    agent_session   TEXT,
    UNIQUE (platform, channel, thread)
);

CREATE INDEX conversations_idle ON conversations (last_active_ms)
    WHERE lease_name IS NOT NULL;

CREATE TABLE turns (
    id              BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    conversation_id BIGINT NOT NULL REFERENCES conversations (id),
    state           TEXT NOT NULL
                    CHECK (state IN ('running', 'done', 'failed', 'cancelled')),
    started_ms      BIGINT NOT NULL,
    ended_ms        BIGINT,
    answer_chars    BIGINT NOT NULL DEFAULT 0 CHECK (answer_chars >= 0),
    error           TEXT,
    CHECK ((state = 'running') = (ended_ms IS NULL))
);

CREATE UNIQUE INDEX turns_running ON turns (conversation_id)
    WHERE state = 'running';
CREATE INDEX turns_by_conversation ON turns (conversation_id, id);

CREATE TABLE messages (
    id              BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    platform        TEXT NOT NULL,
    event_id        TEXT NOT NULL,
    conversation_id BIGINT NOT NULL REFERENCES conversations (id),
    "user"          TEXT NOT NULL,
    text            TEXT NOT NULL,
    ts_ms           BIGINT NOT NULL,
    state           TEXT NOT NULL DEFAULT 'received'
                    CHECK (state IN ('received', 'queued', 'running',
                                     'answered', 'failed', 'dropped')),
    turn_id         BIGINT REFERENCES turns (id),
    detail          TEXT,
    UNIQUE (platform, event_id),
    CHECK (state <> 'running' OR turn_id IS NOT NULL)
);

CREATE INDEX messages_by_state ON messages (state, id);
CREATE INDEX messages_by_conversation ON messages (conversation_id, id);
CREATE INDEX messages_by_turn ON messages (turn_id) WHERE turn_id IS NOT NULL;
"#,
    // 2: encryption at rest (see MIGRATIONS[1]).
    r#"
CREATE TABLE store_meta (
    name            TEXT PRIMARY KEY,
    value           TEXT NOT NULL
);

UPDATE messages SET text = 'moat:p:' || text WHERE substr(text, 1, 5) = 'moat:';
UPDATE messages SET detail = 'moat:p:' || detail WHERE substr(detail, 1, 5) = 'moat:';
UPDATE turns SET error = 'moat:p:' || error WHERE substr(error, 1, 5) = 'moat:';
UPDATE conversations SET agent_session = 'moat:p:' || agent_session
    WHERE substr(agent_session, 1, 5) = 'moat:';
"#,
    // 3: the platform's own id of a message.
    r#"
ALTER TABLE messages ADD COLUMN message_ref TEXT;
"#,
    // 4: GitHub from chat.
    r#"
CREATE TABLE github_links (
    repo            TEXT NOT NULL,
    kind            TEXT NOT NULL CHECK (kind IN ('branch', 'pr')),
    name            TEXT NOT NULL,
    conversation_id BIGINT NOT NULL REFERENCES conversations (id),
    created_ms      BIGINT NOT NULL,
    PRIMARY KEY (repo, kind, name)
);

CREATE TABLE github_deliveries (
    id              TEXT PRIMARY KEY,
    ts_ms           BIGINT NOT NULL
);
"#,
    // 5: conversation ownership (see MIGRATIONS[4]).
    r#"
CREATE TABLE conversation_owners (
    conversation_id BIGINT PRIMARY KEY REFERENCES conversations (id),
    node            TEXT NOT NULL,
    until_ms        BIGINT NOT NULL
);

CREATE INDEX conversation_owners_by_node ON conversation_owners (node, until_ms);
"#,
    // 6: scheduled tasks (see MIGRATIONS[5]).
    r#"
CREATE TABLE tasks (
    id              BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    platform        TEXT NOT NULL,
    channel         TEXT NOT NULL,
    thread          TEXT NOT NULL,
    creator         TEXT NOT NULL,
    prompt          TEXT NOT NULL,
    kind            TEXT NOT NULL CHECK (kind IN ('cron', 'interval', 'once')),
    spec            TEXT NOT NULL,
    context         TEXT NOT NULL CHECK (context IN ('conversation', 'isolated')),
    state           TEXT NOT NULL
                    CHECK (state IN ('active', 'paused', 'cancelled', 'done', 'stopped')),
    next_run_ms     BIGINT,
    created_ms      BIGINT NOT NULL,
    detail          TEXT,
    CHECK (state <> 'active' OR next_run_ms IS NOT NULL)
);

CREATE INDEX tasks_due ON tasks (next_run_ms) WHERE state = 'active';
CREATE INDEX tasks_by_channel ON tasks (platform, channel, id);

CREATE TABLE task_runs (
    id              BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    task_id         BIGINT NOT NULL REFERENCES tasks (id),
    due_ms          BIGINT NOT NULL,
    started_ms      BIGINT NOT NULL,
    outcome         TEXT NOT NULL CHECK (outcome IN ('started', 'refused', 'failed')),
    detail          TEXT
);

CREATE INDEX task_runs_by_task ON task_runs (task_id, id);

CREATE TABLE registered_groups (
    platform        TEXT NOT NULL,
    channel         TEXT NOT NULL,
    name            TEXT NOT NULL,
    registered_by   TEXT NOT NULL,
    created_ms      BIGINT NOT NULL,
    PRIMARY KEY (platform, channel)
);
"#,
    // 7: the outbox (see MIGRATIONS[6]).
    r#"
ALTER TABLE turns ADD COLUMN answer TEXT;
ALTER TABLE turns ADD COLUMN delivery TEXT CHECK (delivery IN ('pending', 'delivered'));
ALTER TABLE turns ADD COLUMN delivered_ms BIGINT;
ALTER TABLE turns ADD COLUMN answer_verbatim BIGINT NOT NULL DEFAULT 0
    CHECK (answer_verbatim IN (0, 1));
CREATE INDEX turns_undelivered ON turns (id) WHERE delivery = 'pending';
"#,
    // 8: unknown senders an admin let in.
    r#"
CREATE TABLE admitted_users (
    platform        TEXT NOT NULL,
    channel         TEXT NOT NULL,
    "user"          TEXT NOT NULL,
    admitted_by     TEXT NOT NULL,
    created_ms      BIGINT NOT NULL,
    PRIMARY KEY (platform, channel, "user")
);
"#,
];

/// Brings a PostgreSQL database to [`current_version`], in one transaction
/// under an advisory lock (nodes starting together take turns; the later
/// ones find the work done). Refused, changing nothing: a database of a
/// newer moat ([`StoreError::TooNew`]), or one that holds other tables but
/// no moat schema ([`StoreError::NotMoat`]).
pub(crate) fn migrate_postgres(pg: &Pg, path: &Path) -> Result<(), StoreError> {
    let latest = PG_MIGRATIONS.len() as i64;
    pg.migrate(|c| {
        c.execute(
            "SELECT pg_advisory_xact_lock(?1)",
            args![i64::from(APPLICATION_ID)],
        )?;
        c.execute_batch(
            "CREATE TABLE IF NOT EXISTS moat_schema (
                 application TEXT NOT NULL,
                 version     BIGINT NOT NULL
             )",
        )?;
        let start = match c.query_opt("SELECT application, version FROM moat_schema", &[])? {
            Some(r) => {
                if r.text(0)? != "moat" {
                    return Err(StoreError::NotMoat {
                        path: path.to_path_buf(),
                        found: 0,
                    });
                }
                r.int(1)?
            }
            None => {
                let others = c
                    .query_one(
                        "SELECT count(*) FROM information_schema.tables
                         WHERE table_schema = current_schema() AND table_name <> 'moat_schema'",
                        &[],
                    )?
                    .int(0)?;
                if others > 0 {
                    return Err(StoreError::NotMoat {
                        path: path.to_path_buf(),
                        found: 0,
                    });
                }
                c.execute(
                    "INSERT INTO moat_schema (application, version) VALUES ('moat', 0)",
                    &[],
                )?;
                0
            }
        };
        if start > latest {
            return Err(StoreError::TooNew {
                path: path.to_path_buf(),
                found: start,
                supported: latest,
            });
        }
        for version in start..latest {
            run_pg_script(c, version)
                .and_then(|()| {
                    c.execute("UPDATE moat_schema SET version = ?1", args![version + 1])
                        .map(drop)
                })
                .map_err(|e| StoreError::Migration {
                    path: path.to_path_buf(),
                    version: version + 1,
                    left_at: start,
                    reason: e.to_string(),
                })?;
        }
        Ok(())
    })
}

fn run_pg_script(c: &mut dyn Conn, version: i64) -> Result<(), StoreError> {
    let script = usize::try_from(version)
        .ok()
        .and_then(|v| PG_MIGRATIONS.get(v))
        .ok_or(StoreError::Invalid {
            field: "schema version",
            reason: "no such migration",
        })?;
    c.execute_batch(script)
}

/// The schema this build writes.
pub fn current_version() -> i64 {
    MIGRATIONS.len() as i64
}

/// Brings `conn` to [`current_version`], or refuses a database that is newer
/// ([`StoreError::TooNew`], changing nothing). The caller has already checked
/// the application id. `path` and `busy_ms` only shape errors.
pub fn migrate(conn: &mut Connection, path: &Path, busy_ms: u64) -> Result<(), StoreError> {
    apply(conn, path, busy_ms, MIGRATIONS)
}

/// [`migrate`] with a given script list (tests use a broken one).
fn apply(
    conn: &mut Connection,
    path: &Path,
    busy_ms: u64,
    scripts: &[&str],
) -> Result<(), StoreError> {
    let latest = scripts.len() as i64;
    let mut version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| StoreError::sqlite(path, busy_ms, e))?;
    if version > latest {
        return Err(StoreError::TooNew {
            path: path.to_path_buf(),
            found: version,
            supported: latest,
        });
    }
    while version < latest {
        let next = version + 1;
        let failed = |e: rusqlite::Error| match StoreError::sqlite(path, busy_ms, e) {
            StoreError::Sqlite { reason, .. } => StoreError::Migration {
                path: path.to_path_buf(),
                version: next,
                left_at: version,
                reason,
            },
            other => other,
        };
        // IMMEDIATE: take the write lock first, so two openers cannot both
        // read version N and both try to apply script N+1.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(failed)?;
        // Re-read under the lock.
        let seen: i64 = tx
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(failed)?;
        if seen != version {
            // Someone else migrated meanwhile; start over from what is there.
            drop(tx);
            version = seen;
            if version > latest {
                return Err(StoreError::TooNew {
                    path: path.to_path_buf(),
                    found: version,
                    supported: latest,
                });
            }
            continue;
        }
        tx.execute_batch(scripts[version as usize])
            .map_err(failed)?;
        // PRAGMA arguments cannot be bound; both values are integers we made.
        tx.execute_batch(&format!(
            "PRAGMA application_id = {APPLICATION_ID}; PRAGMA user_version = {next};"
        ))
        .map_err(failed)?;
        tx.commit().map_err(failed)?;
        version = next;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(conn: &Connection) -> i64 {
        conn.query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap()
    }

    fn tables(conn: &Connection) -> Vec<String> {
        conn.prepare("SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn both_databases_have_every_migration() {
        assert_eq!(
            MIGRATIONS.len(),
            PG_MIGRATIONS.len(),
            "a migration was added for one database only; add its PostgreSQL (or SQLite) twin"
        );
    }

    #[test]
    fn scripts_apply_in_order_and_once() {
        let mut conn = Connection::open_in_memory().unwrap();
        let scripts = ["CREATE TABLE a (x INTEGER)", "CREATE TABLE b (y INTEGER)"];
        apply(&mut conn, Path::new(":memory:"), 0, &scripts).unwrap();
        assert_eq!(version(&conn), 2);
        assert_eq!(tables(&conn), ["a", "b"]);
        // Again: nothing to do (a second CREATE TABLE would fail).
        apply(&mut conn, Path::new(":memory:"), 0, &scripts).unwrap();
        assert_eq!(version(&conn), 2);
        let app: i32 = conn
            .query_row("PRAGMA application_id", [], |r| r.get(0))
            .unwrap();
        assert_eq!(app, APPLICATION_ID);
    }

    #[test]
    fn a_failing_script_rolls_back_whole_and_keeps_the_version() {
        let mut conn = Connection::open_in_memory().unwrap();
        let scripts = [
            "CREATE TABLE a (x INTEGER)",
            // The first statement succeeds, the second fails: the table and
            // the version bump must both be rolled back.
            "CREATE TABLE b (y INTEGER); INSERT INTO nowhere VALUES (1);",
        ];
        let err = apply(&mut conn, Path::new("/data/moat.db"), 0, &scripts).unwrap_err();
        match &err {
            StoreError::Migration {
                version, left_at, ..
            } => assert_eq!((*version, *left_at), (2, 1)),
            other => panic!("expected a migration error, got {other:?}"),
        }
        let text = err.to_string();
        assert!(
            text.contains("/data/moat.db") && text.contains("schema 2"),
            "{text}"
        );
        assert!(text.contains("nowhere"), "the cause is kept: {text}");
        assert_eq!(version(&conn), 1);
        assert_eq!(tables(&conn), ["a"]);
    }

    #[test]
    fn a_newer_database_is_refused_untouched() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("PRAGMA user_version = 7").unwrap();
        let err = apply(
            &mut conn,
            Path::new("/d/moat.db"),
            0,
            &["CREATE TABLE a (x)"],
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "database at /d/moat.db was written by a newer moat (schema 7 > 1); upgrade moat"
        );
        assert_eq!(version(&conn), 7);
        assert!(tables(&conn).is_empty());
    }

    #[test]
    fn the_real_schema_applies_and_its_constraints_hold() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("PRAGMA foreign_keys = ON").unwrap();
        migrate(&mut conn, Path::new(":memory:"), 0).unwrap();
        assert_eq!(version(&conn), current_version());
        assert_eq!(
            tables(&conn),
            [
                "admitted_users",
                "conversation_owners",
                "conversations",
                "github_deliveries",
                "github_links",
                "messages",
                "registered_groups",
                "store_meta",
                "task_runs",
                "tasks",
                "turns"
            ]
        );
        conn.execute_batch(
            "INSERT INTO conversations (id, platform, channel, thread, created_ms, last_active_ms)
             VALUES (1, 'web', 'c', 't', 0, 0);",
        )
        .unwrap();
        let refused = [
            // Unknown states and modes.
            "UPDATE conversations SET sandbox_mode = 'shared' WHERE id = 1",
            "INSERT INTO turns (conversation_id, state, started_ms) VALUES (1, 'paused', 0)",
            "INSERT INTO messages (platform, event_id, conversation_id, user, text, ts_ms, state)
             VALUES ('web', 'e0', 1, 'u', 't', 0, 'lost')",
            // A running message without its turn.
            "INSERT INTO messages (platform, event_id, conversation_id, user, text, ts_ms, state)
             VALUES ('web', 'e1', 1, 'u', 't', 0, 'running')",
            // A message of a conversation that does not exist.
            "INSERT INTO messages (platform, event_id, conversation_id, user, text, ts_ms)
             VALUES ('web', 'e2', 99, 'u', 't', 0)",
            // A finished turn without an end, a running one with an end.
            "INSERT INTO turns (conversation_id, state, started_ms) VALUES (1, 'done', 0)",
            "INSERT INTO turns (conversation_id, state, started_ms, ended_ms)
             VALUES (1, 'running', 0, 5)",
            // STRICT: text in an integer column.
            "INSERT INTO messages (platform, event_id, conversation_id, user, text, ts_ms)
             VALUES ('web', 'e3', 1, 'u', 't', 'yesterday')",
        ];
        for sql in refused {
            assert!(conn.execute_batch(sql).is_err(), "accepted: {sql}");
        }
        // Two running turns in one conversation.
        conn.execute_batch(
            "INSERT INTO turns (conversation_id, state, started_ms) VALUES (1, 'running', 0)",
        )
        .unwrap();
        assert!(conn
            .execute_batch(
                "INSERT INTO turns (conversation_id, state, started_ms) VALUES (1, 'running', 1)"
            )
            .is_err());
    }
}
