//! Planner statistics of a PostgreSQL schema's tables, kept current by the service that owns
//! them.
//!
//! PostgreSQL plans a prepared statement once for all (its generic plan) after five runs, from
//! the table sizes it sees then, and keeps that plan until one of its tables is analyzed. A
//! table never analyzed and smaller than ten pages is planned as ten pages. So a statement that
//! looks rows up by key from a list of values (the relay's "mark these sent", the "is another
//! row of this aggregate waiting" check) gets a sequential scan or a hash of the whole table,
//! cheapest for a few hundred rows, and keeps it once the table holds thousands: every run then
//! reads the whole outbox.
//!
//! autovacuum analyzes a table about a minute after its first changes, and again each time a
//! tenth of it has changed. A server running without autovacuum never does, and even with it
//! on, a new database serves its first minute on plans made for small tables. Each service
//! therefore analyzes a table of its own when it holds [`BASE`] rows and has not been analyzed
//! yet, and again each time it has grown [`GROWTH`]-fold since. Growth is what turns a plan
//! wrong; rows updated in place (the bus's sequence row, a product's stock) leave the plans
//! right, and analyzing would only make every connection plan its statements again.
//! Where autovacuum runs it analyzes at every tenth of growth, so this adds an analysis only in
//! a new table's first minute, before autovacuum's first look.

use crate::Db;
use sqlx::{AssertSqlSafe, Row};
use std::time::Duration;

/// How often the schema's tables are looked at.
const EVERY: Duration = Duration::from_secs(2);
/// Rows a table holds before its first analysis...
pub const BASE: i64 = 500;
/// ...and how many times the rows it had at its last analysis before the next.
pub const GROWTH: i64 = 4;

/// On PostgreSQL, analyzes the tables of `db`'s schema as they grow, until the pool is closed.
/// Nothing on SQLite, whose planner prefers an index without statistics.
pub fn keep_current(db: &Db) {
    let Some(schema) = db.schema() else {
        return;
    };
    let db = db.clone();
    let schema = schema.to_string();
    tokio::spawn(async move {
        while !db.writer().is_closed() {
            match due(&db, &schema).await {
                Ok(tables) => {
                    for table in tables {
                        if let Err(error) = analyze(&db, &schema, &table).await {
                            if db.writer().is_closed() {
                                return;
                            }
                            // Tried again at the next look.
                            tracing::debug!(%schema, %table, %error, "cannot analyze a table");
                        }
                    }
                }
                Err(error) => {
                    tracing::debug!(%schema, %error, "cannot read the tables' sizes")
                }
            }
            tokio::time::sleep(EVERY).await;
        }
    });
}

/// The tables of `schema` due for an analysis, among those this role may analyze (the ones it
/// owns, or all of them for a superuser): PostgreSQL skips another role's table with a warning,
/// and it would stay due.
async fn due(db: &Db, schema: &str) -> Result<Vec<String>, sqlx::Error> {
    let sql = format!(
        "SELECT s.relname::text FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid \
         WHERE s.schemaname = $1 AND s.n_live_tup >= {BASE} AND s.n_live_tup >= {GROWTH} * c.reltuples \
         AND pg_has_role(c.relowner, 'MEMBER') ORDER BY s.relname"
    );
    sqlx::query(AssertSqlSafe(sql))
        .bind(schema)
        .fetch_all(db.writer())
        .await?
        .iter()
        .map(|row| row.try_get(0))
        .collect()
}

async fn analyze(db: &Db, schema: &str, table: &str) -> Result<(), sqlx::Error> {
    let started = std::time::Instant::now();
    sqlx::query(AssertSqlSafe(format!(
        "ANALYZE {}.{}",
        quoted(schema),
        quoted(table)
    )))
    .execute(db.writer())
    .await?;
    tracing::debug!(%schema, %table, ms = started.elapsed().as_millis() as u64, "table analyzed");
    Ok(())
}

/// `name` as a PostgreSQL identifier.
fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
