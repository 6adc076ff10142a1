//! Connection pools. SQLite gets one writer connection and a pool of readers on a WAL file;
//! PostgreSQL gets one pool, with each service in its own schema.

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::Migrator;
use sqlx::{AnyConnection, AnyPool, AssertSqlSafe, Executor, Row};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot open the database: {0}")]
    Connect(#[source] sqlx::Error),
    #[error("cannot migrate the database: {0}")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("unsupported database url (expected postgres:// or postgresql://)")]
    UnsupportedUrl,
    /// A service could not bring its stored data up to date after a migration.
    #[error("cannot upgrade the stored data: {0}")]
    Upgrade(String),
}

/// A service's database: where writes go and where reads go (the same pool on PostgreSQL).
#[derive(Clone, Debug)]
pub struct Db {
    backend: Backend,
    writer: AnyPool,
    reader: AnyPool,
    /// SQLite: the database file (its WAL is `<path>-wal`).
    path: Option<std::path::PathBuf>,
    /// PostgreSQL: the database's URL and this pool's schema.
    postgres: Option<(String, String)>,
    /// Callers of `sync` at the same moment share one flush.
    syncs: std::sync::Arc<Syncs>,
}

#[derive(Debug, Default)]
struct Syncs {
    /// One flush at a time.
    running: tokio::sync::Mutex<()>,
    /// Sync requests so far, and how many of them the last flush covered.
    requested: std::sync::atomic::AtomicU64,
    covered: std::sync::atomic::AtomicU64,
}

/// When an SQLite database's commits reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Every commit is on disk before it returns (`synchronous=FULL`: one fsync per commit).
    /// What a service's own data needs: an order answered 201 survives a power loss.
    EachCommit,
    /// A commit returns once the OS has it (`synchronous=NORMAL`): a crash of the process loses
    /// nothing, a power loss may lose the last commits (never the file's consistency, and
    /// always a suffix: what survives is a prefix of the commits). [`Db::sync`] makes
    /// everything committed so far durable. For the bus log: its messages stay in their
    /// senders' outboxes until a sync, so a power loss only makes them publish again.
    OnSync,
}

async fn sqlite_pragmas(
    conn: &mut AnyConnection,
    durability: Durability,
) -> Result<(), sqlx::Error> {
    // synchronous=FULL: a commit is on disk before we answer, so an accepted order survives
    // power loss, not only a process crash.
    let synchronous = match durability {
        Durability::EachCommit => "FULL",
        Durability::OnSync => "NORMAL",
    };
    conn.execute(AssertSqlSafe(format!(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous={synchronous}; PRAGMA busy_timeout=5000; PRAGMA foreign_keys=ON;"
    )))
    .await?;
    Ok(())
}

/// WAL frames (4 KiB pages) above which the WAL is rewound.
const WAL_REWIND_FRAMES: i64 = 4096;

/// Copies the WAL into the database file every 200 ms (PASSIVE: never blocks a reader or the
/// writer) until the pools close. Under steady writes a passive checkpoint never catches up
/// with the writer at the moment a transaction starts, so SQLite never rewinds the WAL and it
/// grows without bound (gigabytes in a 5-minute run, with every read slowing down). Once it holds
/// more than `WAL_REWIND_FRAMES`, a TRUNCATE checkpoint on the writer connection (no write runs
/// meanwhile; what is left to copy is small, the passive ones did the rest) rewinds it.
async fn checkpoint_loop(writer: AnyPool, reader: AnyPool) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if writer.is_closed() || reader.is_closed() {
            return;
        }
        let frames = match sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_one(&reader)
            .await
        {
            Ok(row) => row.try_get::<i64, _>(1).unwrap_or(0),
            Err(error) => {
                if writer.is_closed() || reader.is_closed() {
                    return;
                }
                tracing::warn!(%error, "WAL checkpoint failed");
                continue;
            }
        };
        if frames > WAL_REWIND_FRAMES {
            match rewind(&writer).await {
                Ok(true) => {}
                // Readers held the WAL: try again at the next tick, the writer was held up
                // for at most 20 ms.
                Ok(false) => tracing::debug!(frames, "WAL rewind waited on readers; retrying"),
                Err(error) => {
                    if writer.is_closed() {
                        return;
                    }
                    tracing::warn!(%error, "WAL rewind failed");
                }
            }
        }
    }
}

/// A TRUNCATE checkpoint on the writer connection with a 20 ms busy timeout (the normal 5 s
/// would hold every write up while a reader finishes). True when the WAL was rewound.
async fn rewind(writer: &AnyPool) -> Result<bool, sqlx::Error> {
    let mut conn = writer.acquire().await?;
    conn.execute("PRAGMA busy_timeout=20").await?;
    let result = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .fetch_one(&mut *conn)
        .await;
    // Back to the normal timeout whatever happened; a connection left with 20 ms would fail
    // writes under contention.
    conn.execute("PRAGMA busy_timeout=5000").await?;
    // The first column is 1 when the checkpoint could not finish (SQLITE_BUSY).
    Ok(result?.try_get::<i64, _>(0)? == 0)
}

fn install_drivers() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(sqlx::any::install_default_drivers);
}

/// A PostgreSQL connection idle for longer than this is pinged before it is handed out.
const PING_AFTER_IDLE: Duration = Duration::from_secs(5);

/// Pool options shared by every pool. sqlx pings each idle connection before handing it out
/// (`test_before_acquire`): one more round trip, and one more wake-up of the server's process,
/// for every statement and transaction. A SQLite connection cannot go stale, so it is never
/// pinged; a PostgreSQL one is pinged only after [`PING_AFTER_IDLE`] (a server restart or an
/// idle timeout in between). One that broke more recently fails its statement, which the
/// caller sees as any other database error (consumers retry it, a request answers 503), and the
/// pool replaces it.
fn pool_options(backend: Backend) -> AnyPoolOptions {
    let options = AnyPoolOptions::new().test_before_acquire(false);
    match backend {
        Backend::Sqlite => options,
        Backend::Postgres => options.before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for > PING_AFTER_IDLE {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        }),
    }
}

impl Db {
    /// Opens (creating if needed) `<dir>/<name>.db` in WAL mode, every commit durable.
    pub async fn open_sqlite(dir: &Path, name: &str) -> Result<Db, DbError> {
        Self::open_sqlite_with(dir, name, Durability::EachCommit).await
    }

    /// Opens (creating if needed) `<dir>/<name>.db` in WAL mode, with commits made durable as
    /// `durability` says.
    pub async fn open_sqlite_with(
        dir: &Path,
        name: &str,
        durability: Durability,
    ) -> Result<Db, DbError> {
        install_drivers();
        std::fs::create_dir_all(dir).map_err(|source| DbError::DataDir {
            path: dir.display().to_string(),
            source,
        })?;
        let path = dir.join(format!("{name}.db"));
        let url = format!("sqlite://{}?mode=rwc", path.display());
        let options = AnyConnectOptions::from_str(&url).map_err(DbError::Connect)?;
        let writer = pool_options(Backend::Sqlite)
            .max_connections(1)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    sqlite_pragmas(conn, durability).await?;
                    // The writer never checkpoints on commit (that stalls the commit for the
                    // whole copy); a background task checkpoints instead, blocking no one.
                    conn.execute("PRAGMA wal_autocheckpoint=0").await?;
                    Ok(())
                })
            })
            .connect_with(options.clone())
            .await
            .map_err(DbError::Connect)?;
        // Readers are few and small: hot orders are served from the service's cache, so a
        // reader's page cache is 1 MiB instead of SQLite's 2 MiB.
        let reader = pool_options(Backend::Sqlite)
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(30))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    sqlite_pragmas(conn, durability).await?;
                    conn.execute("PRAGMA cache_size=-1024").await?;
                    Ok(())
                })
            })
            .connect_with(options)
            .await
            .map_err(DbError::Connect)?;
        tokio::spawn(checkpoint_loop(writer.clone(), reader.clone()));
        Ok(Db {
            backend: Backend::Sqlite,
            writer,
            reader,
            path: Some(path),
            postgres: None,
            syncs: std::sync::Arc::default(),
        })
    }

    /// Connects to PostgreSQL with `schema` as the search path (created if missing).
    pub async fn open_postgres(
        url: &str,
        schema: &str,
        max_connections: u32,
    ) -> Result<Db, DbError> {
        Self::open_postgres_with(url, schema, max_connections, Durability::EachCommit).await
    }

    /// Like [`open_postgres`](Self::open_postgres). With [`Durability::OnSync`] the pool's
    /// commits do not wait for the WAL flush (`synchronous_commit = off`); the next synchronous
    /// commit on the server flushes them with its own, because PostgreSQL writes one WAL for
    /// all its databases, so [`sync`](Self::sync) has nothing to do. For the bus: a relay on
    /// the same database marks its rows sent in the statement that publishes them (lost
    /// together or kept together); one on another database of the same server (one
    /// `--database-url` serves every service and the bus) marks them with a synchronous commit
    /// of its own, which flushes the publish before it.
    pub async fn open_postgres_with(
        url: &str,
        schema: &str,
        max_connections: u32,
        durability: Durability,
    ) -> Result<Db, DbError> {
        install_drivers();
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(DbError::UnsupportedUrl);
        }
        let options = AnyConnectOptions::from_str(url).map_err(DbError::Connect)?;
        let schema = schema.replace(|c: char| !c.is_ascii_alphanumeric() && c != '_', "");
        {
            let setup = AnyPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(Duration::from_secs(5))
                .connect_with(options.clone())
                .await
                .map_err(DbError::Connect)?;
            let created = setup
                .execute(AssertSqlSafe(format!(
                    "CREATE SCHEMA IF NOT EXISTS {schema}"
                )))
                .await;
            match created {
                Ok(_) => {}
                // IF NOT EXISTS is no guard against another process creating it at the same
                // moment (processes of a deployment start together): then it exists.
                Err(sqlx::Error::Database(error))
                    if matches!(error.code().as_deref(), Some("23505" | "42P06")) => {}
                Err(error) => return Err(DbError::Connect(error)),
            }
            setup.close().await;
        }
        let search_path = match durability {
            Durability::EachCommit => format!("SET search_path TO {schema}"),
            Durability::OnSync => {
                format!("SET search_path TO {schema}; SET synchronous_commit TO off")
            }
        };
        let pool = pool_options(Backend::Postgres)
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(30))
            .after_connect(move |conn, _| {
                let sql = search_path.clone();
                Box::pin(async move {
                    conn.execute(AssertSqlSafe(sql)).await?;
                    Ok(())
                })
            })
            .connect_with(options)
            .await
            .map_err(DbError::Connect)?;
        Ok(Db {
            backend: Backend::Postgres,
            writer: pool.clone(),
            reader: pool,
            path: None,
            postgres: Some((url.to_string(), schema)),
            syncs: std::sync::Arc::default(),
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// On PostgreSQL, `table` of this pool's schema as a statement on a pool of `other`
    /// (another schema of the same database, opened with the same URL) names it: the two can
    /// then write in one statement. `None` on SQLite or another database.
    pub fn table_seen_from(&self, other: &Db, table: &str) -> Option<String> {
        match (&self.postgres, &other.postgres) {
            (Some((url, schema)), Some((other_url, _))) if url == other_url => {
                Some(format!("{schema}.{table}"))
            }
            _ => None,
        }
    }

    /// PostgreSQL: this pool's schema.
    pub fn schema(&self) -> Option<&str> {
        self.postgres.as_ref().map(|(_, schema)| schema.as_str())
    }

    pub fn writer(&self) -> &AnyPool {
        &self.writer
    }

    pub fn reader(&self) -> &AnyPool {
        &self.reader
    }

    /// Begins a write transaction. On SQLite it takes the write lock at once (`BEGIN
    /// IMMEDIATE`): a deferred transaction that read first could not upgrade to a writer when
    /// another process wrote meanwhile, and would fail with "database is locked" instead of
    /// waiting its turn.
    pub async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, sqlx::Error> {
        match self.backend {
            Backend::Sqlite => self.writer.begin_with("BEGIN IMMEDIATE").await,
            Backend::Postgres => self.writer.begin().await,
        }
    }

    /// A write connection for a task that writes all the time (a group-commit lane, a store's
    /// write loop), kept between its batches; see [`HeldWriter`].
    pub fn held_writer(&self) -> HeldWriter {
        HeldWriter {
            db: self.clone(),
            pooled: None,
            own: None,
            flush: Flush::Wait,
        }
    }

    /// A held writer for a consumer's handler transactions (its effects and the inbox claim
    /// of the message that caused them). On PostgreSQL their commits do not wait for the WAL
    /// flush (`synchronous_commit = off` on its connection); on SQLite it is
    /// [`held_writer`](Self::held_writer).
    ///
    /// Why that loses nothing: PostgreSQL writes one WAL for the whole server, in commit
    /// order, and a crash keeps a prefix of it. A handler's commit that did not reach the disk
    /// is lost together with everything after it: the group's position (committed after the
    /// handler), so the message is delivered and handled again, and whatever read the lost
    /// effects. Anything that acted on them outside the database (a charge asked of the
    /// provider, an email, an answer to a client) did so after a synchronous commit of its own,
    /// which flushed the WAL up to that point, so their cause was on disk.
    ///
    /// So only for handlers whose bus log is on the same server (in orderwave every schema is
    /// on one `--database-url`) and that act outside the database only after such a commit.
    pub fn handler_writer(&self) -> HeldWriter {
        HeldWriter {
            flush: match self.backend {
                Backend::Sqlite => Flush::Wait,
                Backend::Postgres => Flush::DoNotWait,
            },
            ..self.held_writer()
        }
    }

    pub async fn migrate(&self, migrator: &Migrator) -> Result<(), DbError> {
        migrator.run(&self.writer).await.map_err(DbError::Migrate)
    }

    /// The tables every service has, then the service's own.
    pub async fn migrate_service(&self, own: &Migrator) -> Result<(), DbError> {
        self.migrate(&crate::SERVICE_MIGRATOR).await?;
        self.migrate(own).await
    }

    /// Makes every commit that returned before this call durable. Needed only for an SQLite
    /// database opened with [`Durability::OnSync`]: its WAL is flushed to disk (fdatasync on
    /// the file, which covers whatever connection wrote it; frames already copied into the
    /// database file were synced there by the checkpoint). Elsewhere it does nothing: commits
    /// are durable when they return, or on PostgreSQL with `OnSync` made durable by the next
    /// synchronous commit on the server (see [`open_postgres_with`](Self::open_postgres_with)).
    pub async fn sync(&self) -> Result<(), sqlx::Error> {
        use std::sync::atomic::Ordering;
        let Some(path) = &self.path else {
            return Ok(());
        };
        let request = self.syncs.requested.fetch_add(1, Ordering::SeqCst) + 1;
        let _running = self.syncs.running.lock().await;
        if self.syncs.covered.load(Ordering::SeqCst) >= request {
            return Ok(()); // a flush that began after this request finished meanwhile
        }
        // Every request made before the flush begins is covered by it.
        let covers = self.syncs.requested.load(Ordering::SeqCst);
        let mut wal = path.clone().into_os_string();
        wal.push("-wal");
        tokio::task::spawn_blocking(move || match std::fs::File::open(&wal) {
            Ok(file) => file.sync_data(),
            // No WAL: everything is in the database file, synced by the checkpoint that
            // removed it.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(error),
        })
        .await
        .map_err(|e| sqlx::Error::Io(std::io::Error::other(e)))?
        .map_err(sqlx::Error::Io)?;
        self.syncs.covered.fetch_max(covers, Ordering::SeqCst);
        Ok(())
    }

    /// A round trip to the database, for readiness checks.
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT 1")
            .execute(&self.reader)
            .await
            .map(|_| ())
    }

    pub async fn close(&self) {
        self.writer.close().await;
        self.reader.close().await;
    }
}

/// How long a kept connection has to answer the ping after a failed batch.
const PING_AFTER_ERROR: Duration = Duration::from_secs(2);

/// A write connection a task keeps between its batches, on PostgreSQL. A pool connection given
/// back costs a round trip: sqlx pings it on release, and the server process wakes for it. A
/// task that writes all the time keeps its own connection instead, taken out of the pool (which
/// may open another in its place, so a pool's limit does not count it), and replaces it when an
/// error leaves it broken. Being out of the pool, it does not hold up [`Db::close`]; it closes
/// when the task drops it. On SQLite the connection goes back after every batch: the writer
/// pool has one connection, which the whole process shares.
#[derive(Debug)]
pub struct HeldWriter {
    db: Db,
    /// SQLite: the pool's writer, during a batch.
    pooled: Option<sqlx::pool::PoolConnection<sqlx::Any>>,
    /// PostgreSQL: this task's own connection.
    own: Option<AnyConnection>,
    flush: Flush,
}

/// Whether a held writer's commits wait for the WAL flush.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flush {
    Wait,
    /// PostgreSQL, `synchronous_commit = off` on the connection (see [`Db::handler_writer`]).
    DoNotWait,
}

impl HeldWriter {
    /// The connection, taken from the pool if not held.
    pub async fn conn(&mut self) -> Result<&mut AnyConnection, sqlx::Error> {
        match self.db.backend {
            Backend::Sqlite => {
                if self.pooled.is_none() {
                    self.pooled = Some(self.db.writer.acquire().await?);
                }
                match &mut self.pooled {
                    Some(conn) => Ok(&mut **conn),
                    None => Err(sqlx::Error::PoolClosed),
                }
            }
            Backend::Postgres => {
                if self.own.is_none() {
                    let mut conn = self.db.writer.acquire().await?.detach();
                    if self.flush == Flush::DoNotWait {
                        // Out of the pool, so the setting stays with this writer.
                        conn.execute("SET synchronous_commit TO off").await?;
                    }
                    self.own = Some(conn);
                }
                self.own.as_mut().ok_or(sqlx::Error::PoolClosed)
            }
        }
    }

    /// Begins a write transaction on the connection ([`Db::begin_write`]'s kind).
    pub async fn begin(&mut self) -> Result<sqlx::Transaction<'_, sqlx::Any>, sqlx::Error> {
        let backend = self.db.backend;
        let conn = self.conn().await?;
        match backend {
            Backend::Sqlite => sqlx::Connection::begin_with(conn, "BEGIN IMMEDIATE").await,
            Backend::Postgres => sqlx::Connection::begin(conn).await,
        }
    }

    /// Ends a batch. On SQLite the connection goes back to the pool. After an error a
    /// PostgreSQL connection is kept only if it answers a ping within 2 s; the ping also runs
    /// the ROLLBACK a failed transaction left queued on it. A job the database refused (a
    /// duplicate, a stale version) leaves a healthy connection, kept: a run of refusals does
    /// not open a connection each. A broken one is dropped and the next batch takes a fresh
    /// one.
    pub async fn done(&mut self, ok: bool) {
        self.pooled = None;
        if ok {
            return;
        }
        if let Some(conn) = self.own.as_mut() {
            let answered =
                tokio::time::timeout(PING_AFTER_ERROR, sqlx::Connection::ping(conn)).await;
            if !matches!(answered, Ok(Ok(()))) {
                self.own = None;
            }
        }
    }

    pub fn db(&self) -> &Db {
        &self.db
    }
}
