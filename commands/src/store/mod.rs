//! The event-store port and its two adapters (Postgres, SQLite).
//!
//! Appends and loads go through cqrs-es's plain event-sourced store (never its snapshot
//! modes, which apply new events twice). The global feed, which cqrs-es lacks, is ours:
//! see [`EventFeed`].

mod postgres;
mod sqlite;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use cqrs_es::persist::{PersistedEventRepository, PersistedEventStore, SerializedEvent};
use cqrs_es::{Aggregate, AggregateError, EventStore};
use postgres_es::PostgresEventRepository;
use serde::de::DeserializeOwned;
use serde_json::Value;
use sqlite_es::SqliteEventRepository;
use sqlx::{PgPool, SqlitePool};

use crate::CommandMeta;
use crate::error::{CommandError, StoreError};
use crate::upcast::upcasters;

pub use postgres::{
    PING_AFTER_IDLE, PostgresFeed, feed_event as pg_feed_event, feed_query as pg_feed_query,
};
pub use sqlite::SqliteFeed;
pub(crate) use sqlite::parse_time as parse_sqlite_time;

/// A place in the global feed. On Postgres, `(transaction_id, position)`; on SQLite the
/// transaction part is always 0 and `position` is the rowid. Ordered lexicographically.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    pub transaction_id: i64,
    pub position: i64,
}

impl Position {
    pub const START: Position = Position {
        transaction_id: 0,
        position: 0,
    };
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.transaction_id, self.position)
    }
}

/// One event as read from the global feed.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub position: Position,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    pub payload: Value,
    pub metadata: Value,
    pub recorded_at: DateTime<Utc>,
}

impl StoredEvent {
    /// The payload as the current event type, after the registered upcasters have run.
    pub fn decode<E: DeserializeOwned>(&self) -> Result<E, StoreError> {
        let ser = SerializedEvent::new(
            self.aggregate_id.clone(),
            usize::try_from(self.sequence).unwrap_or_default(),
            self.aggregate_type.clone(),
            self.event_type.clone(),
            self.event_version.clone(),
            self.payload.clone(),
            self.metadata.clone(),
        );
        let ser = crate::upcast::upcast(ser);
        serde_json::from_value(ser.payload).map_err(|e| {
            StoreError(anyhow::Error::new(e).context(format!(
                "decoding {} v{} at {}",
                self.event_type, self.event_version, self.position
            )))
        })
    }
}

/// The global feed: every committed event exactly once, in an order that never changes
/// once read (an event is never later inserted before a position already returned).
#[async_trait::async_trait]
pub trait EventFeed: Send + Sync {
    /// Up to `limit` events after `after`, oldest first.
    async fn read_after(&self, after: Position, limit: i64)
    -> Result<Vec<StoredEvent>, StoreError>;
    /// The position of the last committed event (`Position::START` when empty) and when it
    /// was recorded.
    async fn head(&self) -> Result<Option<(Position, DateTime<Utc>)>, StoreError>;
    /// How many committed events lie after `after`.
    async fn count_after(&self, after: Position) -> Result<i64, StoreError>;
    /// A mark in commit time: every event committed before this call is readable from the
    /// feed once [`EventFeed::is_visible`] says so for the mark; `None` when it already is.
    /// (On Postgres the feed holds back events behind transactions still running anywhere
    /// in the cluster.)
    async fn horizon(&self) -> Result<Option<i64>, StoreError>;
    async fn is_visible(&self, horizon: i64) -> Result<bool, StoreError>;
}

/// Where events live. Cheap to clone (pools are shared).
#[derive(Clone, Debug)]
pub enum Database {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// Connection settings shared by both adapters.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub max_connections: u32,
    pub acquire_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            max_connections: 16,
            acquire_timeout: Duration::from_secs(5),
        }
    }
}

impl Database {
    /// Connect to Postgres (`postgres://…`) or open a SQLite file (`sqlite://path`).
    pub async fn connect(url: &str, settings: &PoolSettings) -> Result<Database, StoreError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            postgres::connect(url, settings)
                .await
                .map(Database::Postgres)
        } else if url.starts_with("sqlite:") {
            sqlite::connect(url, settings).await.map(Database::Sqlite)
        } else {
            Err(StoreError::msg(
                "database URL must start with postgres:// or sqlite:",
            ))
        }
    }

    /// The connections the projector writes read models through. On Postgres, a pool of
    /// its own whose transactions commit asynchronously (`synchronous_commit = off`): read
    /// models and checkpoints are derived from the events, which are still committed
    /// durably, and a database crash can only lose the newest read-model writes *together
    /// with* the checkpoints after them (the WAL keeps commit order), which the projector then
    /// applies again. It spares the command path a WAL flush per projection write. On
    /// SQLite, the same pool.
    pub fn for_projections(&self, max_connections: u32) -> Database {
        match self {
            Database::Postgres(pool) => {
                let options = (*pool.connect_options())
                    .clone()
                    .options([("synchronous_commit", "off")]);
                Database::Postgres(
                    postgres::pool_options(
                        max_connections.max(1),
                        PoolSettings::default().acquire_timeout,
                    )
                    .connect_lazy_with(options),
                )
            }
            Database::Sqlite(_) => self.clone(),
        }
    }

    /// Apply the embedded migrations, then chain any event stored without a hash
    /// ([`crate::audit::backfill`]). Idempotent.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        match self {
            Database::Postgres(pool) => migrations::POSTGRES
                .run(pool)
                .await
                .context("running Postgres migrations")?,
            Database::Sqlite(pool) => migrations::SQLITE
                .run(pool)
                .await
                .context("running SQLite migrations")?,
        }
        // Events stored before the hash chain existed are chained now (a no-op once done).
        let chained = crate::audit::backfill(self).await?;
        if chained > 0 {
            tracing::info!(
                events = chained,
                "chained events stored before the hash chain"
            );
        }
        Ok(())
    }

    /// Can the store be reached right now? (`GET /health`.)
    pub async fn ping(&self) -> Result<(), StoreError> {
        match self {
            Database::Postgres(p) => sqlx::query("SELECT 1").execute(p).await.map(drop)?,
            Database::Sqlite(p) => sqlx::query("SELECT 1").execute(p).await.map(drop)?,
        }
        Ok(())
    }

    /// Close every connection (graceful shutdown, tests).
    pub async fn close(&self) {
        match self {
            Database::Postgres(p) => p.close().await,
            Database::Sqlite(p) => p.close().await,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Database::Postgres(_) => "postgres",
            Database::Sqlite(_) => "sqlite",
        }
    }

    pub fn feed(&self) -> Arc<dyn EventFeed> {
        match self {
            Database::Postgres(p) => Arc::new(PostgresFeed::new(p.clone())),
            Database::Sqlite(p) => Arc::new(SqliteFeed::new(p.clone())),
        }
    }

    pub fn aggregates<A: Aggregate + 'static>(&self) -> AggregateStore<A> {
        AggregateStore::new(self)
    }

    /// Is there a user whose latest role event granted the admin role and who is not
    /// deactivated? Read from the event store itself (not a read model that may lag).
    pub async fn an_active_admin_exists(&self) -> Result<bool, StoreError> {
        const SQL: &str = "SELECT EXISTS (
            SELECT 1 FROM events g
             WHERE g.aggregate_type = 'user' AND g.event_type = 'AdminRoleGranted'
               AND NOT EXISTS (SELECT 1 FROM events r
                                WHERE r.aggregate_type = 'user'
                                  AND r.aggregate_id = g.aggregate_id
                                  AND r.sequence > g.sequence
                                  AND r.event_type IN ('AdminRoleRevoked', 'UserDeactivated')))";
        let exists = match self {
            Database::Postgres(p) => sqlx::query_scalar::<_, bool>(SQL).fetch_one(p).await,
            Database::Sqlite(p) => sqlx::query_scalar::<_, bool>(SQL).fetch_one(p).await,
        }
        .context("looking for an admin")?;
        Ok(exists)
    }

    /// Which user registered `email`, if any. The row is written by a trigger in the
    /// transaction that appends `UserRegistered` (see the migration
    /// `atomic_email_and_leases`), so it exists exactly when that event does.
    pub async fn email_owner(
        &self,
        email: &domain::Email,
    ) -> Result<Option<domain::UserId>, StoreError> {
        match self {
            Database::Postgres(p) => postgres::email_owner(p, email).await,
            Database::Sqlite(p) => sqlite::email_owner(p, email).await,
        }
    }
}

enum Inner<A: Aggregate> {
    Postgres(
        PersistedEventStore<PostgresEventRepository, A>,
        PostgresEventRepository,
        PgPool,
    ),
    Sqlite(
        PersistedEventStore<SqliteEventRepository, A>,
        SqliteEventRepository,
        SqlitePool,
    ),
}

/// Append and load one aggregate type's events.
///
/// Recently used aggregates are kept in memory with their version; a load then reads only
/// the events recorded after that version (events never change, so the result is exactly
/// a full fold). This stands in for snapshots, which cqrs-es 0.5 gets wrong (it applies new
/// events twice in its snapshot modes).
pub struct AggregateStore<A: Aggregate> {
    inner: Arc<Inner<A>>,
    cache: Arc<std::sync::Mutex<HashMap<String, (A, u64)>>>,
    /// One writer per aggregate in this process at a time: writers of one aggregate queue
    /// here instead of racing each other to the store (and losing), so an optimistic
    /// conflict can only come from another process.
    writers: Arc<crate::keyed::KeyedLocks<String>>,
}

/// How many times a command without a precondition is decided again after losing a
/// write race to another process, before the caller gets `Conflict`.
const UNCONDITIONAL_RETRIES: u32 = 8;

/// How many aggregates of one type the in-memory cache keeps.
const AGGREGATE_CACHE_ENTRIES: usize = 10_000;

impl<A: Aggregate> Clone for AggregateStore<A> {
    fn clone(&self) -> Self {
        AggregateStore {
            inner: self.inner.clone(),
            cache: self.cache.clone(),
            writers: self.writers.clone(),
        }
    }
}

/// An aggregate as loaded: its state and the sequence of its last event (0: none yet).
#[derive(Debug, Clone)]
pub struct Loaded<A> {
    pub state: A,
    pub version: u64,
}

/// A committed command: the aggregate's version afterwards and how many events it wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub version: u64,
    pub events: usize,
    /// What was written, for the read-your-writes wait.
    pub written: Written,
}

/// A condition on another aggregate that the append itself checks, atomically on
/// Postgres (the insert writes nothing if it fails): "aggregate `aggregate_id` of type
/// `aggregate_type` has no `absent_event`". A profile write, for instance, requires that
/// its owner was never deactivated; checking it in the same statement costs no round
/// trip and leaves no window between the check and the write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guard {
    pub aggregate_type: &'static str,
    pub aggregate_id: String,
    pub absent_event: &'static str,
    /// Why a refusal happened, for the caller (`CommandError::Guarded`).
    pub refusal: &'static str,
}

/// Where a command's events went in the feed and what they were: enough for the projector
/// to bring exactly the read models that care up to them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Written {
    /// The feed position of the last event written, where the store reports it (Postgres);
    /// `None` when unknown (SQLite, where the feed shows a commit at once).
    pub at: Option<Position>,
    /// `(aggregate type, event type)` of each event written.
    pub events: Vec<(String, String)>,
}

impl Written {
    /// Both writes together (a command that wrote twice, e.g. registration). Nothing
    /// written is neutral; a write whose position is unknown makes the whole unknown.
    pub fn and(mut self, other: &Written) -> Written {
        if other.is_empty() {
            return self;
        }
        if self.is_empty() {
            return other.clone();
        }
        self.at = match (self.at, other.at) {
            (Some(a), Some(b)) => Some(a.max(b)),
            _ => None,
        };
        self.events.extend(other.events.iter().cloned());
        self
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

/// A boxed error from cqrs-es or its stores, unboxed to its `sqlx::Error` when it is one,
/// so that [`StoreError::is_unavailable`] can still tell a dropped connection from a bug.
fn unbox(e: Box<dyn std::error::Error + Send + Sync + 'static>) -> anyhow::Error {
    match e.downcast::<sqlx::Error>() {
        Ok(sqlx) => anyhow::Error::new(*sqlx),
        Err(other) => anyhow::anyhow!(other),
    }
}

fn persistence_error(e: cqrs_es::persist::PersistenceError) -> anyhow::Error {
    use cqrs_es::persist::PersistenceError as P;
    match e {
        P::ConnectionError(e) | P::DeserializationError(e) | P::UnknownError(e) => unbox(e),
        P::OptimisticLockError => anyhow::anyhow!("optimistic lock error"),
    }
}

fn store_error<E: std::error::Error>(e: AggregateError<E>) -> StoreError {
    match e {
        AggregateError::DatabaseConnectionError(e)
        | AggregateError::DeserializationError(e)
        | AggregateError::UnexpectedError(e) => StoreError(unbox(e)),
        AggregateError::AggregateConflict => StoreError::msg("unexpected aggregate conflict"),
        AggregateError::UserError(e) => StoreError::msg(format!("unexpected user error: {e}")),
    }
}

impl<A: Aggregate + 'static> AggregateStore<A> {
    fn new(db: &Database) -> Self {
        let inner = match db {
            Database::Postgres(pool) => Inner::Postgres(
                PersistedEventStore::new_event_store(PostgresEventRepository::new(pool.clone()))
                    .with_upcasters(upcasters()),
                PostgresEventRepository::new(pool.clone()),
                pool.clone(),
            ),
            Database::Sqlite(pool) => Inner::Sqlite(
                PersistedEventStore::new_event_store(SqliteEventRepository::new(pool.clone()))
                    .with_upcasters(upcasters()),
                SqliteEventRepository::new(pool.clone()),
                pool.clone(),
            ),
        };
        AggregateStore {
            inner: Arc::new(inner),
            cache: Arc::default(),
            writers: Arc::default(),
        }
    }

    fn cached(&self, id: &str) -> Option<(A, u64)>
    where
        A: Clone,
    {
        self.cache.lock().ok()?.get(id).cloned()
    }

    fn remember(&self, id: &str, state: A, version: u64) {
        if let Ok(mut c) = self.cache.lock() {
            if c.len() >= AGGREGATE_CACHE_ENTRIES && !c.contains_key(id) {
                c.clear();
            }
            match c.get(id) {
                Some((_, v)) if *v >= version => {}
                _ => {
                    c.insert(id.to_owned(), (state, version));
                }
            }
        }
    }

    /// The aggregate's current state, folded from all its events.
    pub async fn load(&self, id: &str) -> Result<Loaded<A>, StoreError>
    where
        A: Clone,
    {
        if let Some((mut state, mut version)) = self.cached(id) {
            let newer = match &*self.inner {
                Inner::Postgres(_, r, _) => r.get_last_events::<A>(id, version as usize).await,
                Inner::Sqlite(_, r, _) => r.get_last_events::<A>(id, version as usize).await,
            }
            .map_err(|e| {
                StoreError(persistence_error(e).context(format!("loading events of {id}")))
            })?;
            for ser in newer {
                let ser = crate::upcast::upcast(ser);
                let event: A::Event = serde_json::from_value(ser.payload).map_err(|e| {
                    StoreError(anyhow::Error::new(e).context(format!("decoding an event of {id}")))
                })?;
                state.apply(event);
                version = ser.sequence as u64;
            }
            self.remember(id, state.clone(), version);
            return Ok(Loaded { state, version });
        }
        let ctx = match &*self.inner {
            Inner::Postgres(s, _, _) => s.load_aggregate(id).await,
            Inner::Sqlite(s, _, _) => s.load_aggregate(id).await,
        }
        .map_err(store_error)?;
        let version = ctx.current_sequence as u64;
        if version > 0 {
            self.remember(id, ctx.aggregate.clone(), version);
        }
        Ok(Loaded {
            state: ctx.aggregate,
            version,
        })
    }

    /// Load, decide, append. `expected` is the version the caller last saw (`If-Match`);
    /// when given and different, nothing is written (`StaleVersion`), and losing a write
    /// race gives `Conflict`.
    ///
    /// A command without `expected` means "whatever the version": when another process
    /// wins the race it is decided again on the fresh state and appended again, up to
    /// [`UNCONDITIONAL_RETRIES`] times with jitter, before `Conflict`. Writers of one
    /// aggregate in this process queue for it rather than race.
    ///
    /// The decision is first made on the cached state, without reading the store: the
    /// append at the next sequence succeeds only if no event was recorded since, so a
    /// success proves the state was current. A conflict, a refusal or a no-op decided on the
    /// cached state is decided again on a fresh load before it is answered.
    pub async fn execute(
        &self,
        id: &str,
        command: A::Command,
        services: &A::Services,
        expected: Option<u64>,
        meta: &CommandMeta,
    ) -> Result<Committed, CommandError<A::Error>>
    where
        A: Clone,
        A::Command: Clone,
    {
        self.execute_guarded(id, command, services, expected, meta, None)
            .await
    }

    /// [`AggregateStore::execute`], appending only if `guard` holds (checked by the append
    /// itself; `CommandError::Guarded` otherwise).
    pub async fn execute_guarded(
        &self,
        id: &str,
        command: A::Command,
        services: &A::Services,
        expected: Option<u64>,
        meta: &CommandMeta,
        guard: Option<&Guard>,
    ) -> Result<Committed, CommandError<A::Error>>
    where
        A: Clone,
        A::Command: Clone,
    {
        self.writers
            .run(
                &id.to_owned(),
                self.execute_in_turn(id, command, services, expected, meta, guard),
            )
            .await
    }

    async fn execute_in_turn(
        &self,
        id: &str,
        command: A::Command,
        services: &A::Services,
        expected: Option<u64>,
        meta: &CommandMeta,
        guard: Option<&Guard>,
    ) -> Result<Committed, CommandError<A::Error>>
    where
        A: Clone,
        A::Command: Clone,
    {
        let mut retries = 0u32;
        let mut use_cache = true;
        loop {
            let cached = if use_cache { self.cached(id) } else { None };
            let from_cache = cached.is_some();
            let (state, version) = match cached {
                Some(c) => c,
                None => {
                    let l = self.load(id).await?;
                    (l.state, l.version)
                }
            };
            let outcome = self
                .execute_with(
                    id,
                    state,
                    version,
                    command.clone(),
                    services,
                    expected,
                    meta,
                    guard,
                )
                .await;
            match outcome {
                Ok((committed, state)) if committed.events > 0 => {
                    self.remember(id, state, committed.version);
                    return Ok(committed);
                }
                // Decided on a cached state that may be old: decide again on a fresh one.
                Ok(_)
                | Err(CommandError::Rejected(_))
                | Err(CommandError::StaleVersion { .. })
                | Err(CommandError::Conflict)
                    if from_cache =>
                {
                    use_cache = false;
                }
                Err(CommandError::Conflict) if expected.is_none() => {
                    if retries >= UNCONDITIONAL_RETRIES {
                        return Err(CommandError::Conflict);
                    }
                    retries += 1;
                    // Another process is writing this aggregate: back off a little, by a
                    // random amount, so that the racers spread out.
                    let cap = 1u64 << retries.min(5);
                    let pause = rand::random_range(0..=cap * 1000);
                    tokio::time::sleep(std::time::Duration::from_micros(pause)).await;
                    use_cache = false;
                }
                // A no-op writes nothing, so the append checked no guard: check it here, so
                // that the answer does not depend on whether the fields changed.
                Ok((committed, _)) if committed.events == 0 && guard.is_some() => {
                    if let Some(g) = guard
                        && !self.guard_holds(g).await?
                    {
                        return Err(CommandError::Guarded(g.refusal));
                    }
                    return Ok(committed);
                }
                other => return other.map(|(c, _)| c),
            }
        }
    }

    async fn guard_holds(&self, g: &Guard) -> Result<bool, StoreError> {
        const SQL: &str = "SELECT NOT EXISTS (SELECT 1 FROM events
                             WHERE aggregate_type = $1 AND aggregate_id = $2 AND event_type = $3)";
        let holds = match &*self.inner {
            Inner::Postgres(_, _, p) => {
                sqlx::query_scalar::<_, bool>(SQL)
                    .bind(g.aggregate_type)
                    .bind(&g.aggregate_id)
                    .bind(g.absent_event)
                    .fetch_one(p)
                    .await
            }
            Inner::Sqlite(_, _, p) => {
                sqlx::query_scalar::<_, bool>(&SQL.replace('$', "?"))
                    .bind(g.aggregate_type)
                    .bind(&g.aggregate_id)
                    .bind(g.absent_event)
                    .fetch_one(p)
                    .await
            }
        }
        .context("checking a guard")?;
        Ok(holds)
    }

    #[allow(clippy::too_many_arguments)]
    async fn execute_with(
        &self,
        id: &str,
        state: A,
        version: u64,
        command: A::Command,
        services: &A::Services,
        expected: Option<u64>,
        meta: &CommandMeta,
        guard: Option<&Guard>,
    ) -> Result<(Committed, A), CommandError<A::Error>>
    where
        A: Clone,
    {
        let ctx = cqrs_es::persist::EventStoreAggregateContext {
            aggregate_id: id.to_owned(),
            aggregate: state,
            current_sequence: version as usize,
            current_snapshot: None,
        };
        match &*self.inner {
            Inner::Postgres(_, _, pool) => {
                execute_on(
                    &PgAppend(pool),
                    ctx,
                    command,
                    services,
                    expected,
                    meta,
                    guard,
                )
                .await
            }
            Inner::Sqlite(_, _, pool) => {
                execute_on(
                    &SqliteAppend(pool),
                    ctx,
                    command,
                    services,
                    expected,
                    meta,
                    guard,
                )
                .await
            }
        }
    }

    /// Every event of one aggregate, in order (audits, tests).
    pub async fn events(&self, id: &str) -> Result<Vec<(u64, A::Event)>, StoreError> {
        let envelopes = match &*self.inner {
            Inner::Postgres(s, _, _) => s.load_events(id).await,
            Inner::Sqlite(s, _, _) => s.load_events(id).await,
        }
        .map_err(store_error)?;
        Ok(envelopes
            .into_iter()
            .map(|e| (e.sequence as u64, e.payload))
            .collect())
    }
}

/// What an append did.
pub(crate) enum Appended {
    /// Written; the feed position of the last event, where the store reports it.
    Done(Option<Position>),
    /// Another writer got there first (or a constraint refused it); nothing written.
    Conflict,
    /// The guard did not hold; nothing written.
    Guarded,
    /// The event this append follows has no hash yet (stored before the chain and not
    /// chained yet); nothing written. The caller chains the aggregate and appends again.
    Unchained,
}

/// How a decided command's events are appended.
trait Append<A: Aggregate> {
    /// Append `events` after the context's sequence, if `guard` holds.
    async fn append(
        &self,
        ctx: cqrs_es::persist::EventStoreAggregateContext<A>,
        events: Vec<A::Event>,
        metadata: HashMap<String, String>,
        guard: Option<&Guard>,
    ) -> Result<Appended, StoreError>;
}

/// One event to append: its sequence, type, version, payload, when it is recorded, and
/// the canonical encoding that its hash covers (with the aggregate and the metadata; see
/// [`crate::chain`]).
pub(crate) struct NewEvent {
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    pub payload: Value,
    pub recorded_at: DateTime<Utc>,
    pub canonical: String,
}

/// The rows a decided command appends after the context's sequence, recorded now.
fn new_events<A: Aggregate>(
    aggregate_id: &str,
    after: usize,
    events: &[A::Event],
    metadata: &Value,
) -> Result<Vec<NewEvent>, StoreError> {
    use cqrs_es::DomainEvent;
    let recorded_at = crate::chain::store_time(Utc::now());
    let mut rows = Vec::with_capacity(events.len());
    for (i, e) in events.iter().enumerate() {
        let payload = serde_json::to_value(e).context("encoding an event")?;
        let sequence = i64::try_from(after + i + 1).unwrap_or(i64::MAX);
        let (event_type, event_version) = (e.event_type(), e.event_version());
        let canonical = crate::chain::Body {
            aggregate_type: A::TYPE,
            aggregate_id,
            sequence,
            event_type: &event_type,
            event_version: &event_version,
            payload: &payload,
            metadata,
            recorded_at,
        }
        .canonical();
        rows.push(NewEvent {
            sequence,
            event_type,
            event_version,
            payload,
            recorded_at,
            canonical,
        });
    }
    Ok(rows)
}

/// SQLite: one multi-row `INSERT` that checks the guard in the same statement, after one
/// local read of the hash the chain continues from (a racing writer of the same aggregate
/// loses on the sequence key, so the hash read is the one just before what is written).
struct SqliteAppend<'a>(&'a SqlitePool);

impl<A: Aggregate> Append<A> for SqliteAppend<'_> {
    async fn append(
        &self,
        ctx: cqrs_es::persist::EventStoreAggregateContext<A>,
        events: Vec<A::Event>,
        metadata: HashMap<String, String>,
        guard: Option<&Guard>,
    ) -> Result<Appended, StoreError> {
        let metadata = serde_json::to_value(&metadata).context("encoding event metadata")?;
        let rows = new_events::<A>(&ctx.aggregate_id, ctx.current_sequence, &events, &metadata)?;
        match sqlite::append(self.0, A::TYPE, &ctx.aggregate_id, &rows, &metadata, guard).await? {
            Appended::Unchained => {
                let db = Database::Sqlite(self.0.clone());
                crate::audit::chain_aggregate(&db, A::TYPE, &ctx.aggregate_id).await?;
                sqlite::append(self.0, A::TYPE, &ctx.aggregate_id, &rows, &metadata, guard).await
            }
            other => Ok(other),
        }
    }
}

/// Postgres: one multi-row `INSERT` in autocommit (atomic on its own; one round trip
/// instead of `BEGIN`/`INSERT`/`COMMIT`), in postgres-es's table layout, chaining the
/// hashes in the same statement and returning where the events went in the feed.
struct PgAppend<'a>(&'a PgPool);

impl<A: Aggregate> Append<A> for PgAppend<'_> {
    async fn append(
        &self,
        ctx: cqrs_es::persist::EventStoreAggregateContext<A>,
        events: Vec<A::Event>,
        metadata: HashMap<String, String>,
        guard: Option<&Guard>,
    ) -> Result<Appended, StoreError> {
        let metadata = serde_json::to_value(&metadata).context("encoding event metadata")?;
        let rows = new_events::<A>(&ctx.aggregate_id, ctx.current_sequence, &events, &metadata)?;
        match postgres::append(self.0, A::TYPE, &ctx.aggregate_id, &rows, &metadata, guard).await? {
            Appended::Unchained => {
                let db = Database::Postgres(self.0.clone());
                crate::audit::chain_aggregate(&db, A::TYPE, &ctx.aggregate_id).await?;
                postgres::append(self.0, A::TYPE, &ctx.aggregate_id, &rows, &metadata, guard).await
            }
            other => Ok(other),
        }
    }
}

/// Decide and append on a loaded aggregate. Returns the outcome and the state after it.
async fn execute_on<S, A>(
    store: &S,
    mut ctx: cqrs_es::persist::EventStoreAggregateContext<A>,
    command: A::Command,
    services: &A::Services,
    expected: Option<u64>,
    meta: &CommandMeta,
    guard: Option<&Guard>,
) -> Result<(Committed, A), CommandError<A::Error>>
where
    A: Aggregate + Clone,
    S: Append<A>,
{
    use cqrs_es::DomainEvent;
    let before = ctx.current_sequence as u64;
    if let Some(expected) = expected
        && expected != before
    {
        return Err(CommandError::StaleVersion {
            expected,
            actual: before,
        });
    }
    let sink = cqrs_es::event_sink::EventSink::default();
    ctx.aggregate
        .handle(command, services, &sink)
        .await
        .map_err(CommandError::Rejected)?;
    let events = sink.collect().await;
    let n = events.len();
    if n == 0 {
        return Ok((
            Committed {
                version: before,
                events: 0,
                written: Written::default(),
            },
            ctx.aggregate,
        ));
    }
    // The sink applied each event as it was written: this is the state after them.
    let after = ctx.aggregate.clone();
    let kinds: Vec<(String, String)> = events
        .iter()
        .map(|e| (A::TYPE.to_owned(), e.event_type()))
        .collect();
    let metadata: HashMap<String, String> = meta.to_map();
    match store.append(ctx, events, metadata, guard).await? {
        Appended::Done(at) => Ok((
            Committed {
                version: before + n as u64,
                events: n,
                written: Written { at, events: kinds },
            },
            after,
        )),
        Appended::Conflict | Appended::Unchained => Err(CommandError::Conflict),
        Appended::Guarded => Err(CommandError::Guarded(
            guard.map_or("a guard did not hold", |g| g.refusal),
        )),
    }
}
