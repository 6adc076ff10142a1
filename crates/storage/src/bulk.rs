//! Multi-row INSERTs: one statement (one round trip) for many rows, chunked to stay under the
//! databases' bound-parameter limits.

use sqlx::{AnyConnection, AssertSqlSafe};

/// A value bound to a statement; everything we store is text or a 64-bit integer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Text(String),
    Int(i64),
    /// NULL (bound as text).
    Null,
}

impl From<Option<String>> for Value {
    fn from(v: Option<String>) -> Self {
        v.map_or(Value::Null, Value::Text)
    }
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
    let mut sql = String::with_capacity(head.len() + chunk.len() * 48);
    sql.push_str(head);
    push_values(&mut sql, &mut 0, chunk);
    if !tail.is_empty() {
        sql.push(' ');
        sql.push_str(tail);
    }
    bind_all(sqlx::query(AssertSqlSafe(sql)), [chunk])
}

/// Appends ` VALUES ($n+1, ...), (...)` for `rows` (each as wide as the first) to `sql`,
/// numbering on from `*n`.
fn push_values(sql: &mut String, n: &mut usize, rows: &[Vec<Value>]) {
    let width = rows.first().map_or(0, Vec::len);
    sql.push_str(" VALUES ");
    for r in 0..rows.len() {
        if r > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for c in 0..width {
            if c > 0 {
                sql.push_str(", ");
            }
            *n += 1;
            sql.push('$');
            sql.push_str(&n.to_string());
        }
        sql.push(')');
    }
}

/// Binds every value of `parts`, in order.
fn bind_all<'q>(
    mut query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>,
    parts: impl IntoIterator<Item = &'q [Vec<Value>]>,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments> {
    for rows in parts {
        for value in rows.iter().flatten() {
            query = match value {
                Value::Text(t) => query.bind(t.clone()),
                Value::Int(i) => query.bind(*i),
                Value::Null => query.bind(None::<String>),
            };
        }
    }
    query
}

/// Several writes of one transaction sent as one statement on PostgreSQL: each is a
/// data-modifying `WITH` part, and the statement returns how many rows each part wrote. One
/// round trip and one statement for the server to parse and plan, where the writes one by one
/// would take one each. On SQLite (in process, no round trips, and no writes inside `WITH`)
/// the parts run one after the other.
///
/// The parts of one statement all see the database as it was before it: no part may read or
/// write a row another part writes (two parts inserting into different tables, or an update
/// of rows no other part touches, are fine).
#[derive(Debug, Default, Clone)]
pub struct Script {
    parts: Vec<Part>,
    /// Counts [`run`](Self::run) returns: one per part, and one more per flagged part.
    slots: usize,
}

#[derive(Debug, Clone)]
struct Part {
    /// Before the values (`INSERT INTO t (a, b)`, or `UPDATE t SET ... FROM (`).
    head: String,
    /// After them (`ON CONFLICT ...`, or `) AS v WHERE ...`).
    tail: String,
    rows: Vec<Vec<Value>>,
    /// Where its count goes.
    slot: usize,
    /// A condition on each row written (over the part's table), and where the count of the rows
    /// it was true for goes (as one statement only; else every row written counts).
    flag: Option<(String, usize)>,
    /// The part (its count's index) that must write a row for this one to write anything.
    guard: Option<usize>,
}

/// A part of a [`Script`] as its statement's text depends on it: head, tail, guard, whether
/// it is flagged, rows, and values per row.
pub type PartShape<'a> = (&'a str, &'a str, Option<usize>, bool, usize, usize);

/// The connection is to PostgreSQL (else SQLite).
pub fn is_postgres(conn: &AnyConnection) -> bool {
    conn.backend_name() == <sqlx::Postgres as sqlx::Database>::NAME
}

/// Bound values one statement of a [`Script`] holds at most (PostgreSQL's limit is 65,535).
const SCRIPT_PARAMETERS: usize = 30_000;

impl Script {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `head VALUES (...), ... tail` for `rows`; the index of its count in what
    /// [`run`](Self::run) returns.
    pub fn insert(&mut self, head: &str, tail: &str, rows: Vec<Vec<Value>>) -> usize {
        self.add(head, tail, rows, None, None).0
    }

    /// Like [`insert`](Self::insert), writing only if the part at `guard` (added before) wrote
    /// a row: an inbox claim guards the effects of its message, so a message handled before
    /// writes nothing, even as a statement of its own (no transaction to roll back).
    pub fn insert_if(
        &mut self,
        guard: usize,
        head: &str,
        tail: &str,
        rows: Vec<Vec<Value>>,
    ) -> usize {
        self.add(head, tail, rows, None, Some(guard)).0
    }

    /// How many counts [`run`](Self::run) returns.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Adds the parts of `other` after this script's, to run as one statement with them on
    /// PostgreSQL; where `other`'s counts start in what [`run`](Self::run) returns. Only for
    /// scripts that touch different rows (see [`Script`]): two messages' claims and effects,
    /// say, never two changes of one row.
    pub fn append(&mut self, other: &Script) -> usize {
        let offset = self.slots;
        self.parts.extend(other.parts.iter().map(|part| {
            Part {
                slot: part.slot + offset,
                flag: part
                    .flag
                    .as_ref()
                    .map(|(flag, slot)| (flag.clone(), slot + offset)),
                guard: part.guard.map(|guard| guard + offset),
                ..part.clone()
            }
        }));
        self.slots += other.slots;
        offset
    }

    /// What decides the text of the statement [`run`](Self::run) sends on PostgreSQL (its
    /// parts, their guards and their numbers of rows): scripts of one shape share a prepared
    /// statement and its plan.
    pub fn shape(&self) -> Vec<PartShape<'_>> {
        self.parts
            .iter()
            .map(|p| {
                (
                    p.head.as_str(),
                    p.tail.as_str(),
                    p.guard,
                    p.flag.is_some(),
                    p.rows.len(),
                    p.rows.first().map_or(0, Vec::len),
                )
            })
            .collect()
    }

    /// Whether, on PostgreSQL, [`run`](Self::run) sends one statement (atomic on its own).
    pub fn is_one_statement(&self) -> bool {
        let parameters: usize = self
            .parts
            .iter()
            .map(|p| p.rows.iter().map(Vec::len).sum::<usize>())
            .sum();
        parameters <= SCRIPT_PARAMETERS && self.parts.iter().all(|p| p.rows.len() <= CHUNK)
    }

    /// Like [`insert`](Self::insert), also counting the rows written for which `flag` (an SQL
    /// condition in the `RETURNING` clause: it sees the database as it was before the
    /// statement, not the rows the statement writes) holds: the indexes of both counts. Only
    /// PostgreSQL runs the condition; on SQLite every row written counts as flagged.
    pub fn insert_flagged(
        &mut self,
        head: &str,
        tail: &str,
        rows: Vec<Vec<Value>>,
        flag: &str,
    ) -> (usize, usize) {
        self.insert_flagged_if(None, head, tail, rows, flag)
    }

    /// [`insert_flagged`](Self::insert_flagged), guarded like [`insert_if`](Self::insert_if)
    /// when `guard` is given.
    pub fn insert_flagged_if(
        &mut self,
        guard: Option<usize>,
        head: &str,
        tail: &str,
        rows: Vec<Vec<Value>>,
        flag: &str,
    ) -> (usize, usize) {
        let (slot, flagged) = self.add(head, tail, rows, Some(flag), guard);
        (slot, flagged.unwrap_or(slot))
    }

    fn add(
        &mut self,
        head: &str,
        tail: &str,
        rows: Vec<Vec<Value>>,
        flag: Option<&str>,
        guard: Option<usize>,
    ) -> (usize, Option<usize>) {
        let slot = self.slots;
        let flag = flag.map(|f| (f.to_string(), slot + 1));
        let flagged = flag.as_ref().map(|(_, s)| *s);
        self.slots += 1 + usize::from(flag.is_some());
        self.parts.push(Part {
            head: head.to_string(),
            tail: tail.to_string(),
            rows,
            slot,
            flag,
            guard,
        });
        (slot, flagged)
    }

    /// Adds `head (VALUES (...), ...) tail` for `rows` (an `UPDATE ... FROM` a list of values,
    /// as [`update_from_values`]); the index of its count in what [`run`](Self::run) returns.
    pub fn update_from_values(&mut self, head: &str, tail: &str, rows: Vec<Vec<Value>>) -> usize {
        self.insert(&format!("{head} ("), &format!(") {tail}"), rows)
    }

    /// Like [`update_from_values`](Self::update_from_values), updating only if the part at
    /// `guard` (added before) wrote a row, as [`insert_if`](Self::insert_if).
    pub fn update_from_values_if(
        &mut self,
        guard: usize,
        head: &str,
        tail: &str,
        rows: Vec<Vec<Value>>,
    ) -> usize {
        self.insert_if(guard, &format!("{head} ("), &format!(") {tail}"), rows)
    }

    /// Runs the parts on `conn` (in the caller's transaction); the counts, at the indexes the
    /// parts were added with (how many rows each wrote, and how many of them were flagged). A
    /// part without rows runs nowhere and wrote 0.
    pub async fn run(&self, conn: &mut AnyConnection) -> Result<Vec<u64>, sqlx::Error> {
        let mut counts = vec![0; self.slots];
        if !(is_postgres(conn) && self.is_one_statement()) {
            for part in &self.parts {
                if part.guard.is_some_and(|guard| counts[guard] == 0) {
                    continue;
                }
                let written =
                    insert_returning_count(conn, &part.head, &part.tail, &part.rows).await?;
                counts[part.slot] = written;
                if let Some((_, flagged)) = &part.flag {
                    counts[*flagged] = written;
                }
            }
            return Ok(counts);
        }
        // Parts without rows are left out, and so are those they guard.
        let mut present = vec![false; self.slots];
        let mut written: Vec<&Part> = Vec::new();
        for part in &self.parts {
            if !part.rows.is_empty() && part.guard.is_none_or(|guard| present[guard]) {
                present[part.slot] = true;
                written.push(part);
            }
        }
        if written.is_empty() {
            return Ok(counts);
        }
        let mut sql = String::from("WITH ");
        let mut n = 0;
        for (i, part) in written.iter().enumerate() {
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!("p{} AS (", part.slot));
            sql.push_str(&part.head);
            match part.guard {
                Some(guard) => {
                    sql.push_str(" SELECT * FROM (");
                    push_values(&mut sql, &mut n, &part.rows);
                    sql.push_str(&format!(") AS v WHERE EXISTS (SELECT 1 FROM p{guard})"));
                }
                None => push_values(&mut sql, &mut n, &part.rows),
            }
            if !part.tail.is_empty() {
                sql.push(' ');
                sql.push_str(&part.tail);
            }
            match &part.flag {
                Some((flag, _)) => sql.push_str(&format!(" RETURNING ({flag}) AS flag)")),
                None => sql.push_str(" RETURNING 1)"),
            }
        }
        sql.push_str(" SELECT ");
        let mut columns = Vec::new();
        for part in &written {
            columns.push((part.slot, format!("(SELECT COUNT(*) FROM p{})", part.slot)));
            if let Some((_, flagged)) = &part.flag {
                columns.push((
                    *flagged,
                    format!("(SELECT COUNT(*) FROM p{} WHERE flag)", part.slot),
                ));
            }
        }
        sql.push_str(
            &columns
                .iter()
                .map(|(_, c)| c.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        );
        let row = bind_all(
            sqlx::query(AssertSqlSafe(sql)),
            written.iter().map(|p| p.rows.as_slice()),
        )
        .fetch_one(&mut *conn)
        .await?;
        for (column, (slot, _)) in columns.iter().enumerate() {
            let count: i64 = sqlx::Row::try_get(&row, column)?;
            counts[*slot] = u64::try_from(count).unwrap_or(0);
        }
        Ok(counts)
    }
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
