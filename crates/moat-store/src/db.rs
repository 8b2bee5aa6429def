//! The one place where SQL meets a database: a small connection interface
//! ([`Conn`]) that the store's queries are written against, with owned
//! parameter and row values, implemented for SQLite (rusqlite) here and for
//! PostgreSQL in `pg.rs`.
//!
//! Queries are written once, in the SQL both databases understand, with
//! numbered parameters `?1 ?2 ...` and two spellings moat normalises:
//! `GREATEST(a, b)` (SQLite's two-argument `max`) and the column `"user"`
//! (a reserved word in PostgreSQL, quoted for both). What differs beyond
//! that (how a row id is chosen ahead of its insert, the schema's version
//! marker, maintenance) is asked of [`Dialect`].
//!
//! It must never: put a parameter's value into an error (a parameter may be
//! a message's text), or build SQL from a value (values are always bound).

use std::path::Path;

use rusqlite::types::{ToSqlOutput, ValueRef};

use crate::error::StoreError;

/// Which database a [`Conn`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// A query returning the id the next message will get, for sealing its
    /// text before the insert (a sealed value is bound to its row id).
    pub(crate) fn next_message_id(self) -> &'static str {
        match self {
            // The caller holds SQLite's write lock: no other writer.
            Dialect::Sqlite => "SELECT coalesce(max(id), 0) + 1 FROM messages",
            // The identity's sequence: unique across every node.
            Dialect::Postgres => "SELECT nextval(pg_get_serial_sequence('messages', 'id'))",
        }
    }

    /// `sql` in this dialect: SQLite spells `GREATEST` as `max`; PostgreSQL
    /// numbers its parameters `$1` rather than `?1`.
    pub(crate) fn translate(self, sql: &str) -> String {
        match self {
            Dialect::Sqlite => sql.replace("GREATEST(", "max("),
            Dialect::Postgres => {
                let mut out = String::with_capacity(sql.len());
                let mut in_literal = false;
                let mut chars = sql.chars().peekable();
                while let Some(c) = chars.next() {
                    match c {
                        '\'' => {
                            in_literal = !in_literal;
                            out.push(c);
                        }
                        '?' if !in_literal && chars.peek().is_some_and(|d| d.is_ascii_digit()) => {
                            out.push('$');
                        }
                        _ => out.push(c),
                    }
                }
                out
            }
        }
    }
}

/// A parameter or a column value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Value {
    Null,
    Int(i64),
    Text(String),
    Bool(bool),
}

impl From<i64> for Value {
    fn from(v: i64) -> Value {
        Value::Int(v)
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Value {
        Value::Bool(v)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Value {
        Value::Text(v.to_string())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Value {
        Value::Text(v)
    }
}
impl From<&String> for Value {
    fn from(v: &String) -> Value {
        Value::Text(v.clone())
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Value {
        v.map_or(Value::Null, Into::into)
    }
}

/// `args![a, b]`: the parameters `?1 ?2` of a query.
macro_rules! args {
    ($($v:expr),* $(,)?) => { &[$($crate::db::Value::from($v)),*][..] };
}
pub(crate) use args;

/// One result row.
#[derive(Debug, Clone)]
pub(crate) struct Row(pub(crate) Vec<Value>);

impl Row {
    fn get(&self, i: usize) -> Result<&Value, StoreError> {
        self.0.get(i).ok_or_else(|| bad_row(i, "a column"))
    }

    pub(crate) fn int(&self, i: usize) -> Result<i64, StoreError> {
        match self.get(i)? {
            Value::Int(v) => Ok(*v),
            _ => Err(bad_row(i, "an integer")),
        }
    }

    pub(crate) fn opt_int(&self, i: usize) -> Result<Option<i64>, StoreError> {
        match self.get(i)? {
            Value::Null => Ok(None),
            _ => self.int(i).map(Some),
        }
    }

    pub(crate) fn text(&self, i: usize) -> Result<String, StoreError> {
        match self.get(i)? {
            Value::Text(v) => Ok(v.clone()),
            _ => Err(bad_row(i, "a text")),
        }
    }

    pub(crate) fn opt_text(&self, i: usize) -> Result<Option<String>, StoreError> {
        match self.get(i)? {
            Value::Null => Ok(None),
            _ => self.text(i).map(Some),
        }
    }

    /// A state or mode name parsed into its type.
    pub(crate) fn name<T: std::str::FromStr>(&self, i: usize) -> Result<T, StoreError> {
        self.text(i)?
            .parse()
            .map_err(|_| bad_row(i, "a known state or mode name"))
    }
}

fn bad_row(column: usize, expected: &'static str) -> StoreError {
    StoreError::BadRow { column, expected }
}

/// A connection, or a transaction on one, that runs the store's queries.
pub(crate) trait Conn {
    fn dialect(&self) -> Dialect;

    /// Runs `sql` and returns every row.
    fn query(&mut self, sql: &str, args: &[Value]) -> Result<Vec<Row>, StoreError>;

    /// Runs `sql` and returns the number of rows changed.
    fn execute(&mut self, sql: &str, args: &[Value]) -> Result<u64, StoreError>;

    /// Runs a script of several statements without parameters (migrations).
    fn execute_batch(&mut self, sql: &str) -> Result<(), StoreError>;

    /// The first row, if any.
    fn query_opt(&mut self, sql: &str, args: &[Value]) -> Result<Option<Row>, StoreError> {
        Ok(self.query(sql, args)?.into_iter().next())
    }

    /// The first row; none is [`StoreError::BadRow`] (for queries that
    /// always return one, such as `count(*)`).
    fn query_one(&mut self, sql: &str, args: &[Value]) -> Result<Row, StoreError> {
        self.query_opt(sql, args)?.ok_or(StoreError::BadRow {
            column: 0,
            expected: "a row",
        })
    }
}

/// An SQLite connection (or a transaction: it derefs to one).
pub(crate) struct SqliteConn<'a> {
    pub(crate) conn: &'a rusqlite::Connection,
    pub(crate) path: &'a Path,
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            Value::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            Value::Int(v) => ToSqlOutput::Borrowed(ValueRef::Integer(*v)),
            Value::Bool(v) => ToSqlOutput::Borrowed(ValueRef::Integer(i64::from(*v))),
            Value::Text(v) => ToSqlOutput::Borrowed(ValueRef::Text(v.as_bytes())),
        })
    }
}

impl SqliteConn<'_> {
    fn err(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        move |e| StoreError::sqlite(self.path, crate::busy_ms(), e)
    }
}

impl Conn for SqliteConn<'_> {
    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }

    fn execute_batch(&mut self, sql: &str) -> Result<(), StoreError> {
        self.conn.execute_batch(sql).map_err(self.err())
    }

    fn query(&mut self, sql: &str, args: &[Value]) -> Result<Vec<Row>, StoreError> {
        let sql = Dialect::Sqlite.translate(sql);
        let mut stmt = self.conn.prepare_cached(&sql).map_err(self.err())?;
        let n = stmt.column_count();
        let rows = stmt
            .query_map(rusqlite::params_from_iter(args.iter()), |r| {
                let mut vals = Vec::with_capacity(n);
                for i in 0..n {
                    vals.push(match r.get_ref(i)? {
                        ValueRef::Null => Value::Null,
                        ValueRef::Integer(v) => Value::Int(v),
                        ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
                        // moat stores neither; a row holding one is refused
                        // by the getters.
                        ValueRef::Real(_) | ValueRef::Blob(_) => Value::Null,
                    });
                }
                Ok(Row(vals))
            })
            .map_err(self.err())?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.err())?;
        Ok(rows)
    }

    fn execute(&mut self, sql: &str, args: &[Value]) -> Result<u64, StoreError> {
        let sql = Dialect::Sqlite.translate(sql);
        self.conn
            .prepare_cached(&sql)
            .and_then(|mut s| s.execute(rusqlite::params_from_iter(args.iter())))
            .map(|n| n as u64)
            .map_err(self.err())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_numbers_parameters_with_dollars_outside_literals() {
        assert_eq!(
            Dialect::Postgres.translate("SELECT '?1', x FROM t WHERE a = ?1 AND b = ?12 AND c = ?"),
            "SELECT '?1', x FROM t WHERE a = $1 AND b = $12 AND c = ?"
        );
        assert_eq!(
            Dialect::Sqlite.translate("SET a = GREATEST(a, ?2)"),
            "SET a = max(a, ?2)"
        );
    }
}
