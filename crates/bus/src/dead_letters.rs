//! Messages consumer groups gave up on, kept in the platform's own database (the bus tables of
//! `bus.db` or the `bus` schema) whatever the broker, so operators list, redrive and discard them
//! the same way on every adapter.

use crate::{BusError, DeadLetter, Delivery};
use sqlx::{AssertSqlSafe, Row};
use std::sync::Arc;
use storage::{Db, time};
use tokio::sync::watch;

/// The dead-letter table, and a signal for the runners in this process when a redrive is asked
/// for (other processes' requests are found by polling).
#[derive(Clone, Debug)]
pub struct DeadLetters {
    db: Db,
    requested: Arc<watch::Sender<u64>>,
}

impl DeadLetters {
    /// Over a database the bus migrations ran on ([`crate::sql::MIGRATOR`]).
    pub fn new(db: Db) -> Self {
        Self {
            db,
            requested: Arc::new(watch::Sender::new(0)),
        }
    }

    /// The database the dead letters are in (it holds the consumer groups' memberships too).
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Changes whenever a redrive is requested through this handle.
    pub fn redrive_requests(&self) -> watch::Receiver<u64> {
        self.requested.subscribe()
    }

    /// Parks a delivery `group` gave up on after `attempts`.
    pub async fn park(
        &self,
        group: &str,
        delivery: &Delivery,
        error: &str,
        attempts: i64,
    ) -> Result<(), BusError> {
        sqlx::query(
            "INSERT INTO bus_dead_letters (id, group_name, seq, message_id, topic, payload, error, attempts, failed_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(uuid::Uuid::now_v7().to_string())
        .bind(group)
        .bind(delivery.seq)
        .bind(&delivery.message.id)
        .bind(&delivery.message.topic)
        .bind(&delivery.message.payload)
        .bind(error)
        .bind(attempts)
        .bind(time::to_text(time::now()))
        .execute(self.db.writer())
        .await?;
        metrics::counter!("bus_dead_letters_total", "group" => group.to_string()).increment(1);
        Ok(())
    }

    /// Dead letters, newest first; of one group if given.
    pub async fn list(
        &self,
        group: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, BusError> {
        self.select(group, false, limit).await
    }

    /// How many dead letters each group has (groups with none are left out).
    pub async fn counts(&self) -> Result<Vec<(String, i64)>, BusError> {
        let rows = sqlx::query(
            "SELECT group_name, COUNT(*) FROM bus_dead_letters GROUP BY group_name ORDER BY group_name",
        )
        .fetch_all(self.db.reader())
        .await?;
        let counts = rows
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        Ok(counts)
    }

    /// The group's dead letters an operator asked to redrive.
    pub async fn redrives(&self, group: &str) -> Result<Vec<DeadLetter>, BusError> {
        self.select(Some(group), true, 100).await
    }

    async fn select(
        &self,
        group: Option<&str>,
        redrive_only: bool,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, BusError> {
        let mut sql = String::from(
            "SELECT id, group_name, seq, message_id, topic, payload, error, attempts, failed_at, redrive_requested_at \
             FROM bus_dead_letters WHERE 1 = 1",
        );
        if group.is_some() {
            sql.push_str(" AND group_name = $1");
        }
        if redrive_only {
            sql.push_str(" AND redrive_requested_at IS NOT NULL");
        }
        sql.push_str(&format!(
            " ORDER BY failed_at DESC, id DESC LIMIT {}",
            limit.clamp(1, 1000)
        ));
        let mut query = sqlx::query(AssertSqlSafe(sql));
        if let Some(group) = group {
            query = query.bind(group.to_string());
        }
        let rows = query.fetch_all(self.db.reader()).await?;
        let letters = rows
            .iter()
            .map(|r| {
                Ok(DeadLetter {
                    id: r.try_get(0)?,
                    group: r.try_get(1)?,
                    seq: r.try_get(2)?,
                    message_id: r.try_get(3)?,
                    topic: r.try_get(4)?,
                    payload: r.try_get(5)?,
                    error: r.try_get(6)?,
                    attempts: r.try_get(7)?,
                    failed_at: r.try_get(8)?,
                    redrive_requested: r.try_get::<Option<String>, _>(9)?.is_some(),
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        Ok(letters)
    }

    /// Asks the owning group to process a dead letter again.
    pub async fn request_redrive(&self, id: &str) -> Result<(), BusError> {
        let done =
            sqlx::query("UPDATE bus_dead_letters SET redrive_requested_at = $1 WHERE id = $2")
                .bind(time::to_text(time::now()))
                .bind(id)
                .execute(self.db.writer())
                .await?;
        if done.rows_affected() == 0 {
            return Err(BusError::UnknownDeadLetter(id.to_string()));
        }
        self.requested.send_modify(|v| *v = v.wrapping_add(1));
        Ok(())
    }

    /// Deletes a dead letter (discarded, or redriven successfully).
    pub async fn remove(&self, id: &str) -> Result<(), BusError> {
        let done = sqlx::query("DELETE FROM bus_dead_letters WHERE id = $1")
            .bind(id)
            .execute(self.db.writer())
            .await?;
        if done.rows_affected() == 0 {
            return Err(BusError::UnknownDeadLetter(id.to_string()));
        }
        Ok(())
    }

    /// A redrive failed again: the letter stays with the new error, no longer requested.
    pub async fn redrive_failed(&self, id: &str, error: &str) -> Result<(), BusError> {
        sqlx::query(
            "UPDATE bus_dead_letters SET redrive_requested_at = NULL, error = $1, attempts = attempts + 1, failed_at = $2 WHERE id = $3",
        )
        .bind(error)
        .bind(time::to_text(time::now()))
        .bind(id)
        .execute(self.db.writer())
        .await?;
        Ok(())
    }
}
