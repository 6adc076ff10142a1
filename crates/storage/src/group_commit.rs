//! Group commit for any store: callers hand over a job (the statements of one change), one
//! task runs every job waiting at that moment in a single transaction and answers each caller
//! after the commit. One fsync and one BEGIN/COMMIT serve a whole batch, which is what lets a
//! single SQLite writer keep up with many small consumer transactions.
//!
//! A job may run more than once: when a job of a batch fails, the batch is rolled back, that
//! job gets its error (as it would have alone: the jobs before it had run) and the others run
//! again together. When BEGIN or COMMIT fails, every job runs again in a transaction of its own.
//! A job's error reaches its caller as the job returned it, whatever its type.
//!
//! Outbox rows a job wrote (returned by [`GroupCommit::run_outbox_as`]) reach the service's
//! relay through its [`Handoff`] once the batch committed, in commit order.
//!
//! On PostgreSQL a store may run several committers ([`GroupCommit::start_lanes`]): while one
//! batch waits for its commit, the next runs on another connection. Only for jobs that lock
//! the rows they decide on (two jobs about one row then wait for each other, in commit order)
//! and that never lock two such rows (which could deadlock across batches).

use crate::outbox::{Handoff, PendingMessage};
use crate::{Db, HeldWriter};
use futures::future::BoxFuture;
use sqlx::AnyConnection;
use std::any::Any;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

/// What a job gives back to its caller.
pub type Output = Box<dyn Any + Send>;

/// Why a job failed: its own error type (the caller downcasts it) or a database error.
pub type JobError = Box<dyn std::error::Error + Send + Sync>;

/// The statements of one change, run on the batch's transaction.
pub type Job =
    Box<dyn for<'c> FnMut(&'c mut AnyConnection) -> BoxFuture<'c, Result<Output, JobError>> + Send>;

/// A job as the committer runs it: its output and the outbox rows it wrote.
type Staged = Box<
    dyn for<'c> FnMut(
            &'c mut AnyConnection,
        ) -> BoxFuture<'c, Result<(Output, Vec<PendingMessage>), JobError>>
        + Send,
>;

/// What a caller hands over: a job, or a script of writes (which PostgreSQL may run alone as
/// one statement, without BEGIN and COMMIT).
enum Work {
    Job(Staged),
    /// With the outbox rows it writes, if any.
    Script(crate::bulk::Script, Option<crate::outbox::Staged>),
}

type Request = (Work, oneshot::Sender<Result<Output, JobError>>);

/// Where a batch failed.
enum Failure {
    /// The job at this index, with its error.
    Job(usize, JobError),
    /// BEGIN or COMMIT.
    Transaction(sqlx::Error),
}

/// Jobs in one transaction at most.
const MAX_BATCH: usize = 64;

/// Scripts in one merged statement at most: few enough that the statements a store sends
/// repeat (each is planned once) and each stays quick to plan.
const MAX_MERGED: usize = 4;

#[derive(Debug, Clone)]
pub struct GroupCommit {
    jobs: mpsc::Sender<Request>,
    commits: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl GroupCommit {
    /// Starts the committing task on `db`; outbox rows the jobs wrote go to `handoff` after each
    /// commit. The task ends when every clone of the handle is dropped.
    pub fn start(db: Db, handoff: Handoff) -> Self {
        Self::start_lanes(db, handoff, 1)
    }

    /// Like [`start`](Self::start), with `lanes` committing tasks taking batches side by side
    /// (one on SQLite, which has one writer).
    pub fn start_lanes(db: Db, handoff: Handoff, lanes: usize) -> Self {
        Self::start_with(db, handoff, lanes, Db::held_writer, None)
    }

    /// Like [`start_lanes`](Self::start_lanes), for consumers' handler transactions only: on
    /// PostgreSQL their commits do not wait for the WAL flush ([`Db::handler_writer`] says when
    /// that is safe).
    pub fn start_for_handlers(db: Db, handoff: Handoff, lanes: usize) -> Self {
        Self::start_with(db, handoff, lanes, Db::handler_writer, None)
    }

    /// Like [`start_lanes`](Self::start_lanes), for a store whose scripts never touch a row
    /// another script of it touches at the same time (each writes rows of its own message or
    /// delivery): on PostgreSQL a lane waits `linger` for more work once it has some, and the
    /// scripts of its batch (up to [`MAX_MERGED`]) run as one statement
    /// ([`Script::append`](crate::bulk::Script::append)), without BEGIN and COMMIT. Several
    /// changes, one round trip and one commit, for work nobody waits on closely (a batch that
    /// cannot run so runs as usual). Not more at once: every new combination of scripts is a
    /// new statement for PostgreSQL to plan, and 64 merged scripts took 50-90 ms to plan.
    pub fn start_merging(db: Db, handoff: Handoff, lanes: usize, linger: Duration) -> Self {
        let merge = (db.backend() == crate::Backend::Postgres).then_some(linger);
        Self::start_with(db, handoff, lanes, Db::held_writer, merge)
    }

    /// `lanes` committing tasks on connections of `writer`; with `merge`, scripts merge after
    /// that linger (see [`start_merging`](Self::start_merging)).
    fn start_with(
        db: Db,
        handoff: Handoff,
        lanes: usize,
        writer: fn(&Db) -> HeldWriter,
        merge: Option<Duration>,
    ) -> Self {
        let lanes = if db.backend() == crate::Backend::Sqlite {
            1
        } else {
            lanes.max(1)
        };
        let (jobs, receiver) = mpsc::channel(MAX_BATCH * 4);
        let receiver = std::sync::Arc::new(tokio::sync::Mutex::new(receiver));
        let commits: std::sync::Arc<std::sync::atomic::AtomicU64> = std::sync::Arc::default();
        for _ in 0..lanes {
            tokio::spawn(run(
                db.clone(),
                writer(&db),
                receiver.clone(),
                handoff.clone(),
                std::sync::Arc::clone(&commits),
                merge,
            ));
        }
        Self { jobs, commits }
    }

    /// How many transactions committed so far.
    pub fn commits(&self) -> u64 {
        self.commits.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Like [`run_as`](Self::run_as), for a job that wrote outbox rows: it returns them with
    /// its output, and they are handed to the relay once the batch committed.
    pub async fn run_outbox_as<T, E>(
        &self,
        mut job: impl for<'c> FnMut(
            &'c mut AnyConnection,
        ) -> BoxFuture<'c, Result<(T, Vec<PendingMessage>), E>>
        + Send
        + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: std::error::Error + From<sqlx::Error> + Send + Sync + 'static,
    {
        // The job runs in the committer's task, in the caller's span: the outbox rows it
        // writes carry the caller's trace.
        let span = tracing::Span::current();
        self.submit_as(Work::Job(Box::new(move |conn| {
            let fut = span.in_scope(|| job(conn));
            Box::pin(
                async move {
                    match fut.await {
                        Ok((value, rows)) => Ok((Box::new(value) as Output, rows)),
                        Err(error) => Err(Box::new(error) as JobError),
                    }
                }
                .instrument(span.clone()),
            )
        })))
        .await
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
        self.run_outbox_as(move |conn| {
            let fut = job(conn);
            Box::pin(async move { fut.await.map(|value| (value, Vec::new())) })
        })
        .await
    }

    /// Runs `script` in the next batch; its counts ([`Script::run`](crate::bulk::Script::run)).
    /// On PostgreSQL a script alone in its batch runs as one statement on its own, without
    /// BEGIN and COMMIT: a script that must write nothing in some case says so with
    /// [`insert_if`](crate::bulk::Script::insert_if), not by failing.
    pub async fn run_script<E>(&self, script: crate::bulk::Script) -> Result<Vec<u64>, E>
    where
        E: std::error::Error + From<sqlx::Error> + Send + Sync + 'static,
    {
        self.submit_as(Work::Script(script, None)).await
    }

    /// [`run_script`](Self::run_script) for a script that writes the outbox rows `staged`
    /// ([`crate::outbox::stage_if`]): they are handed to the relay once they committed.
    ///
    /// The parts of one statement share one snapshot, taken before it waited for any row
    /// lock: whether an aggregate had an older unsent row is what was committed when the
    /// statement began. So the rows must be guarded by a change to a row that every other
    /// writer of their aggregate changes too (a status the statement checks): a statement
    /// that waited for such a writer then finds its guard false and writes no rows.
    pub async fn run_script_outbox<E>(
        &self,
        script: crate::bulk::Script,
        staged: crate::outbox::Staged,
    ) -> Result<Vec<u64>, E>
    where
        E: std::error::Error + From<sqlx::Error> + Send + Sync + 'static,
    {
        self.submit_as(Work::Script(script, Some(staged))).await
    }

    /// Submits work and turns its answer back into the caller's types.
    async fn submit_as<T, E>(&self, job: Work) -> Result<T, E>
    where
        T: Send + 'static,
        E: std::error::Error + From<sqlx::Error> + Send + Sync + 'static,
    {
        let output = self
            .submit(job)
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
    pub async fn run(&self, mut job: Job) -> Result<Output, JobError> {
        let span = tracing::Span::current();
        self.submit(Work::Job(Box::new(move |conn| {
            let fut = span.in_scope(|| job(conn));
            Box::pin(
                async move { fut.await.map(|output| (output, Vec::new())) }
                    .instrument(span.clone()),
            )
        })))
        .await
    }

    async fn submit(&self, job: Work) -> Result<Output, JobError> {
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

async fn run(
    db: Db,
    mut writer: HeldWriter,
    receiver: std::sync::Arc<tokio::sync::Mutex<mpsc::Receiver<Request>>>,
    handoff: Handoff,
    commits: std::sync::Arc<std::sync::atomic::AtomicU64>,
    merge: Option<Duration>,
) {
    let committed = || {
        commits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    };
    let mut batch: Vec<Request> = Vec::with_capacity(MAX_BATCH);
    // A lane holds the receiver only while it takes a batch.
    while take(&receiver, &mut batch, merge).await {
        loop {
            batch.retain(|(_, reply)| !reply.is_closed());
            if batch.is_empty() {
                break;
            }
            let scripts: Option<Vec<_>> = batch
                .iter()
                .map(|(work, _)| match work {
                    Work::Script(script, staged) => Some((script, staged.as_ref())),
                    Work::Job(_) => None,
                })
                .collect();
            if let (Some(_), Some(scripts)) = (merge, scripts.filter(|s| s.len() > 1)) {
                match merged(&mut writer, &scripts, &handoff).await {
                    Ok(Some(counts)) => {
                        writer.done(true).await;
                        committed();
                        for ((_, reply), counts) in batch.drain(..).zip(counts) {
                            let _ = reply.send(Ok(Box::new(counts) as Output));
                        }
                        break;
                    }
                    // Too big for one statement: as usual.
                    Ok(None) => {}
                    Err(error) => {
                        // Nothing of it was written: the batch goes again the usual way,
                        // where a script that fails gets its own error.
                        tracing::debug!(%error, size = batch.len(), "a merged statement failed");
                        writer.done(false).await;
                    }
                }
            }
            if let [(Work::Script(script, staged), _)] = batch.as_slice()
                && db.backend() == crate::Backend::Postgres
                && script.is_one_statement()
            {
                // One statement is a transaction of its own: no BEGIN and COMMIT around it.
                let result = handoff
                    .run_alone(&mut writer, script, staged.as_ref())
                    .await;
                writer.done(result.is_ok()).await;
                if result.is_ok() {
                    committed();
                }
                if let Some((_, reply)) = batch.pop() {
                    let _ = reply.send(
                        result
                            .map(|counts| Box::new(counts) as Output)
                            .map_err(|e| Box::new(e) as JobError),
                    );
                }
                break;
            }
            let result = together(&mut writer, &mut batch, &handoff).await;
            writer.done(result.is_ok()).await;
            match result {
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
                        let result = alone(&mut writer, &mut job, &handoff).await;
                        writer.done(result.is_ok()).await;
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

/// Waits for work and takes what is queued (with `merge`, also what comes within its linger);
/// false once every handle is dropped.
async fn take(
    receiver: &tokio::sync::Mutex<mpsc::Receiver<Request>>,
    batch: &mut Vec<Request>,
    merge: Option<Duration>,
) -> bool {
    let mut receiver = receiver.lock().await;
    let most = if merge.is_some() {
        MAX_MERGED
    } else {
        MAX_BATCH
    };
    if receiver.recv_many(batch, most).await == 0 {
        return false;
    }
    if let Some(linger) = merge
        && batch.len() < MAX_MERGED
    {
        tokio::time::sleep(linger).await;
        while batch.len() < MAX_MERGED {
            match receiver.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
    }
    true
}

/// Runs a batch of scripts (with the outbox rows each stages) as one statement (see
/// [`GroupCommit::start_merging`]): each script's counts, in batch order; `None` when they are
/// too big for one statement.
async fn merged(
    writer: &mut HeldWriter,
    batch: &[(&crate::bulk::Script, Option<&crate::outbox::Staged>)],
    handoff: &Handoff,
) -> Result<Option<Vec<Vec<u64>>>, sqlx::Error> {
    // In the order of their shapes: the same scripts make the same statement, which
    // PostgreSQL then plans once (a statement of many parts takes long to plan).
    let mut order: Vec<usize> = (0..batch.len()).collect();
    order.sort_by_cached_key(|&i| batch[i].0.shape());
    let mut script = crate::bulk::Script::new();
    let mut places = vec![(0, 0); batch.len()];
    for i in order {
        let one = batch[i].0;
        places[i] = (script.append(one), one.slots());
    }
    if !script.is_one_statement() {
        return Ok(None);
    }
    let conn = writer.conn().await?;
    // Taken just before the statement, as for a script alone (Handoff::run_alone).
    let ticket = handoff.ticket();
    let counts = script.run(conn).await?;
    let mut rows = Vec::new();
    let mut each = Vec::with_capacity(batch.len());
    for ((_, staged), (first, slots)) in batch.iter().zip(places) {
        let own = counts[first..first + slots].to_vec();
        if let Some(staged) = staged {
            rows.extend(staged.rows(&own));
        }
        each.push(own);
    }
    ticket.committed(rows);
    Ok(Some(each))
}

async fn together(
    writer: &mut HeldWriter,
    batch: &mut [Request],
    handoff: &Handoff,
) -> Result<Vec<Output>, Failure> {
    let mut tx = writer.begin().await.map_err(Failure::Transaction)?;
    let mut outputs = Vec::with_capacity(batch.len());
    let mut rows = Vec::new();
    for (index, (work, _)) in batch.iter_mut().enumerate() {
        let (output, written) = perform(work, &mut tx)
            .await
            .map_err(|e| Failure::Job(index, e))?;
        outputs.push(output);
        rows.extend(written);
    }
    handoff
        .commit(tx, rows)
        .await
        .map_err(Failure::Transaction)?;
    Ok(outputs)
}

/// Runs a job or script on `conn`: its output and the outbox rows it wrote.
async fn perform(
    work: &mut Work,
    conn: &mut AnyConnection,
) -> Result<(Output, Vec<PendingMessage>), JobError> {
    match work {
        Work::Job(job) => job(conn).await,
        Work::Script(script, staged) => {
            let counts = script.run(conn).await?;
            let rows = staged
                .as_ref()
                .map(|staged| staged.rows(&counts))
                .unwrap_or_default();
            Ok((Box::new(counts) as Output, rows))
        }
    }
}

async fn alone(
    writer: &mut HeldWriter,
    job: &mut Work,
    handoff: &Handoff,
) -> Result<Output, JobError> {
    let mut tx = writer.begin().await?;
    let (output, rows) = perform(job, &mut tx).await?;
    handoff.commit(tx, rows).await?;
    Ok(output)
}
