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

/// Rows per statement: 500 rows of up to 9 columns stay far below SQLite's 32766 and
/// PostgreSQL's 65535 parameters.
const CHUNK: usize = 500;

/// Runs `head VALUES (...), (...)` for `rows`, each of `head`'s column count, in the caller's
/// transaction.
pub async fn insert(
    conn: &mut AnyConnection,
    head: &str,
    rows: &[Vec<Value>],
) -> Result<(), sqlx::Error> {
    for chunk in rows.chunks(CHUNK) {
        let Some(width) = chunk.first().map(Vec::len) else {
            continue;
        };
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
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for row in chunk {
            for value in row {
                query = match value {
                    Value::Text(t) => query.bind(t.clone()),
                    Value::Int(i) => query.bind(*i),
                };
            }
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}
