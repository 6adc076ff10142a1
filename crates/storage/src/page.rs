//! Newest-first list queries with keyset pagination, built from bound values only.

use sqlx::{AnyPool, AssertSqlSafe, Row};

/// `SELECT document FROM <table>` newest first (`created_at DESC, id DESC`) with filters added
/// as `?`-clauses; every value is bound, never spliced into the SQL.
#[derive(Debug)]
pub struct NewestFirst {
    sql: String,
    binds: Vec<String>,
}

impl NewestFirst {
    /// A query over `table`, which has `document`, `created_at` and `id` columns.
    pub fn documents_of(table: &'static str) -> Self {
        Self::columns_of(table, "document")
    }

    /// A query of `columns` over `table`, which has `created_at` and `id` columns.
    pub fn columns_of(table: &'static str, columns: &'static str) -> Self {
        Self {
            sql: format!("SELECT {columns} FROM {table} WHERE 1 = 1"),
            binds: Vec::new(),
        }
    }

    /// Adds `clause`, whose `?` is bound to `value` (e.g. `" AND customer_id = ?"`).
    pub fn and(&mut self, clause: &str, value: String) -> &mut Self {
        self.binds.push(value);
        self.sql
            .push_str(&clause.replace('?', &format!("${}", self.binds.len())));
        self
    }

    /// Adds `AND column IN (...)` unless `values` is empty.
    pub fn and_in(&mut self, column: &'static str, values: Vec<String>) -> &mut Self {
        if values.is_empty() {
            return self;
        }
        self.sql.push_str(&format!(" AND {column} IN ("));
        for (i, value) in values.into_iter().enumerate() {
            self.and(if i == 0 { "?" } else { ", ?" }, value);
        }
        self.sql.push(')');
        self
    }

    /// Keeps rows strictly after the cursor `(created_at, id)` in newest-first order.
    pub fn after(&mut self, cursor: Option<&(String, String)>) -> &mut Self {
        if let Some((created, id)) = cursor {
            self.and(" AND (created_at < ?", created.clone());
            self.and(" OR (created_at = ?", created.clone());
            self.and(" AND id < ?))", id.clone());
        }
        self
    }

    /// Up to `limit` documents, and whether more follow.
    pub async fn fetch(
        self,
        pool: &AnyPool,
        limit: u32,
    ) -> Result<(Vec<String>, bool), sqlx::Error> {
        let (rows, more) = self.fetch_rows(pool, limit).await?;
        let documents = rows
            .iter()
            .map(|r| r.try_get::<String, _>(0))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((documents, more))
    }

    /// Up to `limit` rows, and whether more follow.
    pub async fn fetch_rows(
        mut self,
        pool: &AnyPool,
        limit: u32,
    ) -> Result<(Vec<sqlx::any::AnyRow>, bool), sqlx::Error> {
        self.sql.push_str(&format!(
            " ORDER BY created_at DESC, id DESC LIMIT {}",
            u64::from(limit) + 1
        ));
        let mut query = sqlx::query(AssertSqlSafe(self.sql));
        for value in self.binds {
            query = query.bind(value);
        }
        let mut rows = query.fetch_all(pool).await?;
        let more = rows.len() > limit as usize;
        rows.truncate(limit as usize);
        Ok((rows, more))
    }
}
