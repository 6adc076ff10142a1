//! Group commit for any store: callers hand over a job (the statements of one change), one
//! task runs every job waiting at that moment in a single transaction and answers each caller
//! after the commit. One fsync and one BEGIN/COMMIT serve a whole batch, which is what lets a
//! single SQLite writer keep up with many small consumer transactions.
//!
//! A job may run more than once: when a job of a batch fails, the batch is rolled back, that
//! job gets its error (as it would have alone: the jobs before it had run) and the others run
//! again together. When BEGIN or COMMIT fails, every job runs again in a transaction of its own.
//! A job's error reaches its caller as the job returned it, whatever its type.

use crate::Db;
use futures::future::BoxFuture;
use sqlx::AnyConnection;
use std::any::Any;
use tokio::sync::{mpsc, oneshot};

/// What a job gives back to its caller.
pub type Output = Box<dyn Any + Send>;

/// Why a job failed: its own error type (the caller downcasts it) or a database error.
pub type JobError = Box<dyn std::error::Error + Send + Sync>;

/// The statements of one change, run on the batch's transaction.
pub type Job =
    Box<dyn for<'c> FnMut(&'c mut AnyConnection) -> BoxFuture<'c, Result<Output, JobError>> + Send>;

type Request = (Job, oneshot::Sender<Result<Output, JobError>>);

/// Where a batch failed.
enum Failure {
    /// The job at this index, with its error.
    Job(usize, JobError),
    /// BEGIN or COMMIT.
    Transaction(sqlx::Error),
}

/// Jobs in one transaction at most.
const MAX_BATCH: usize = 64;

#[derive(Debug, Clone)]
pub struct GroupCommit {
    jobs: mpsc::Sender<Request>,
}

impl GroupCommit {
    /// Starts the committing task on `db`; `committed` runs after every commit. The task ends
    /// when every clone of the handle is dropped.
    pub fn start(db: Db, committed: impl Fn() + Send + 'static) -> Self {
        let (jobs, receiver) = mpsc::channel(MAX_BATCH * 4);
        tokio::spawn(run(db, receiver, committed));
        Self { jobs }
    }

    /// Runs `job` in the next batch with its own output and error types; its output once the
    /// batch committed, or its error (a database error of the batch's transaction as `E`).
    pub async fn run_as<T, E>(
        &self,
        mut job: impl for<'c> FnMut(&'c mut AnyConnection) -> BoxFuture<'c, Result<T, E>>
        + Send
        + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: std::error::Error + From<sqlx::Error> + Send + Sync + 'static,
    {
        let output = self
            .run(Box::new(move |conn| {
                let fut = job(conn);
                Box::pin(async move {
                    match fut.await {
                        Ok(value) => Ok(Box::new(value) as Output),
                        Err(error) => Err(Box::new(error) as JobError),
                    }
                })
            }))
            .await
            .map_err(|error| match error.downcast::<E>() {
                Ok(own) => *own,
                Err(other) => match other.downcast::<sqlx::Error>() {
                    Ok(db) => E::from(*db),
                    Err(other) => E::from(sqlx::Error::Protocol(other.to_string())),
                },
            })?;
        output.downcast::<T>().map(|v| *v).map_err(|_| {
            E::from(sqlx::Error::Protocol(
                "a batched job answered another type".into(),
            ))
        })
    }

    /// Runs `job` in the next batch; its output once the batch committed.
    pub async fn run(&self, job: Job) -> Result<Output, JobError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send((job, reply))
            .await
            .map_err(|_| Box::new(sqlx::Error::PoolClosed) as JobError)?;
        answer
            .await
            .map_err(|_| Box::new(sqlx::Error::PoolClosed) as JobError)?
    }
}

async fn run(db: Db, mut receiver: mpsc::Receiver<Request>, committed: impl Fn()) {
    let mut batch: Vec<Request> = Vec::with_capacity(MAX_BATCH);
    while receiver.recv_many(&mut batch, MAX_BATCH).await > 0 {
        loop {
            batch.retain(|(_, reply)| !reply.is_closed());
            if batch.is_empty() {
                break;
            }
            match together(&db, &mut batch).await {
                Ok(outputs) => {
                    committed();
                    for ((_, reply), output) in batch.drain(..).zip(outputs) {
                        let _ = reply.send(Ok(output));
                    }
                    break;
                }
                Err(Failure::Job(index, error)) => {
                    // That job fails as it would have alone; the others go again together.
                    let (_, reply) = batch.remove(index);
                    let _ = reply.send(Err(error));
                }
                Err(Failure::Transaction(error)) => {
                    // The database, not a job: each job on its own.
                    tracing::warn!(%error, size = batch.len(), "a grouped transaction failed; running its jobs one by one");
                    for (mut job, reply) in batch.drain(..) {
                        let result = alone(&db, &mut job).await;
                        if result.is_ok() {
                            committed();
                        }
                        let _ = reply.send(result);
                    }
                    break;
                }
            }
        }
    }
}

async fn together(db: &Db, batch: &mut [Request]) -> Result<Vec<Output>, Failure> {
    let mut tx = db.begin_write().await.map_err(Failure::Transaction)?;
    let mut outputs = Vec::with_capacity(batch.len());
    for (index, (job, _)) in batch.iter_mut().enumerate() {
        outputs.push(job(&mut tx).await.map_err(|e| Failure::Job(index, e))?);
    }
    tx.commit().await.map_err(Failure::Transaction)?;
    Ok(outputs)
}

async fn alone(db: &Db, job: &mut Job) -> Result<Output, JobError> {
    let mut tx = db.begin_write().await?;
    let output = job(&mut tx).await?;
    tx.commit().await?;
    Ok(output)
}
