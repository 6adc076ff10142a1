//! Multi-row INSERTs: one statement (one round trip) for many rows, chunked to stay under the
//! databases' bound-parameter limits.

use sqlx::{AnyConnection, AssertSqlSafe};

/// A value bound to a statement; everything we store is text or a 64-bit integer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Text(String),
    Int(i64),
}

impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(v)
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.to_string())
    }
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}

/// `$first, $first+1, ...`: `count` numbered placeholders, for an `IN (...)` list.
pub fn placeholders(first: usize, count: usize) -> String {
    (first..first + count)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Rows per statement: 500 rows of up to 9 columns stay far below SQLite's 32766 and
/// PostgreSQL's 65535 parameters.
pub const CHUNK: usize = 500;

/// Runs `head VALUES (...), (...)` for `rows`, each of `head`'s column count, in the caller's
/// transaction.
pub async fn insert(
    conn: &mut AnyConnection,
    head: &str,
    rows: &[Vec<Value>],
) -> Result<(), sqlx::Error> {
    insert_returning_count(conn, head, "", rows)
        .await
        .map(|_| ())
}

/// Like [`insert`], with `tail` after the values (`ON CONFLICT ... RETURNING ...`); the rows
/// it returns.
pub async fn insert_returning(
    conn: &mut AnyConnection,
    head: &str,
    tail: &str,
    rows: &[Vec<Value>],
) -> Result<Vec<sqlx::any::AnyRow>, sqlx::Error> {
    let mut returned = Vec::new();
    for chunk in rows.chunks(CHUNK) {
        returned.extend(
            values_statement(head, tail, chunk)
                .fetch_all(&mut *conn)
                .await?,
        );
    }
    Ok(returned)
}

/// Runs `head (VALUES (...), ...) tail` for `rows` (an `UPDATE ... FROM` a list of values);
/// how many rows it changed.
pub async fn update_from_values(
    conn: &mut AnyConnection,
    head: &str,
    tail: &str,
    rows: &[Vec<Value>],
) -> Result<u64, sqlx::Error> {
    insert_returning_count(conn, &format!("{head} ("), &format!(") {tail}"), rows).await
}

/// `head VALUES (...), ... tail` for `chunk` (at most [`CHUNK`] rows, all as wide as the first),
/// with their values bound as `$1...`; more parameters of `tail` are bound after them.
pub fn values_statement<'q>(
    head: &str,
    tail: &str,
    chunk: &'q [Vec<Value>],
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments> {
    let width = chunk.first().map_or(0, Vec::len);
    let mut sql = String::with_capacity(head.len() + chunk.len() * width * 6);
    sql.push_str(head);
    sql.push_str(" VALUES ");
    let mut n = 0;
    for (r, _) in chunk.iter().enumerate() {
        if r > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for c in 0..width {
            if c > 0 {
                sql.push_str(", ");
            }
            n += 1;
            sql.push('$');
            sql.push_str(&n.to_string());
        }
        sql.push(')');
    }
    if !tail.is_empty() {
        sql.push(' ');
        sql.push_str(tail);
    }
    let mut query = sqlx::query(AssertSqlSafe(sql));
    for row in chunk {
        for value in row {
            query = match value {
                Value::Text(t) => query.bind(t.clone()),
                Value::Int(i) => query.bind(*i),
            };
        }
    }
    query
}

/// Like [`insert`], with `tail` after the values (an `ON CONFLICT` clause); how many rows were
/// inserted.
pub async fn insert_returning_count(
    conn: &mut AnyConnection,
    head: &str,
    tail: &str,
    rows: &[Vec<Value>],
) -> Result<u64, sqlx::Error> {
    let mut inserted = 0;
    for chunk in rows.chunks(CHUNK) {
        inserted += values_statement(head, tail, chunk)
            .execute(&mut *conn)
            .await?
            .rows_affected();
    }
    Ok(inserted)
}
