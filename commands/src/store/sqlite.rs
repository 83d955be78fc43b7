//! The SQLite adapter (embedded default): pool setup, the feed and the email lookup.

use std::str::FromStr;

use anyhow::Context;
use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, SqlitePool};

use super::{EventFeed, PoolSettings, Position, StoredEvent};
use crate::error::StoreError;

pub(super) async fn connect(url: &str, settings: &PoolSettings) -> Result<SqlitePool, StoreError> {
    let options = SqliteConnectOptions::from_str(url)
        .context("parsing the SQLite URL")?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        // FULL: a command acknowledged with a 2xx is on disk, even across a power cut.
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(std::time::Duration::from_secs(10))
        .foreign_keys(true);
    let pool = SqlitePoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(settings.acquire_timeout)
        // A connection to a local file does not drop: no ping before each use.
        .test_before_acquire(false)
        .connect_with(options)
        .await
        .context("opening the SQLite database")?;
    Ok(pool)
}

/// The global feed on SQLite: rowid order. SQLite admits one writer at a time, so a
/// transaction's rows get rowids above every row committed before it; none is ever skipped.
pub struct SqliteFeed {
    pool: SqlitePool,
}

impl SqliteFeed {
    pub fn new(pool: SqlitePool) -> Self {
        SqliteFeed { pool }
    }
}

pub(crate) fn parse_time(s: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .with_context(|| format!("parsing timestamp {s:?}"))
        .map_err(StoreError)
}

fn row_to_event(row: SqliteRow) -> Result<StoredEvent, StoreError> {
    let payload: String = row.try_get("payload")?;
    let metadata: String = row.try_get("metadata")?;
    let recorded_at: String = row.try_get("recorded_at")?;
    Ok(StoredEvent {
        position: Position {
            transaction_id: 0,
            position: row.try_get("position")?,
        },
        aggregate_type: row.try_get("aggregate_type")?,
        aggregate_id: row.try_get("aggregate_id")?,
        sequence: row.try_get("sequence")?,
        event_type: row.try_get("event_type")?,
        event_version: row.try_get("event_version")?,
        payload: serde_json::from_str(&payload).context("event payload")?,
        metadata: serde_json::from_str(&metadata).context("event metadata")?,
        recorded_at: parse_time(&recorded_at)?,
    })
}

#[async_trait::async_trait]
impl EventFeed for SqliteFeed {
    async fn read_after(
        &self,
        after: Position,
        limit: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let rows = sqlx::query(
            "SELECT rowid AS position, aggregate_type, aggregate_id, sequence, event_type,
                    event_version, payload, metadata, recorded_at
               FROM events WHERE rowid > ? ORDER BY rowid LIMIT ?",
        )
        .bind(after.position)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .context("reading the event feed")?;
        rows.into_iter().map(row_to_event).collect()
    }

    async fn head(&self) -> Result<Option<(Position, DateTime<Utc>)>, StoreError> {
        let row = sqlx::query(
            "SELECT rowid AS position, recorded_at FROM events ORDER BY rowid DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await
        .context("reading the feed head")?;
        row.map(|r| {
            let at: String = r.try_get("recorded_at")?;
            Ok((
                Position {
                    transaction_id: 0,
                    position: r.try_get("position")?,
                },
                parse_time(&at)?,
            ))
        })
        .transpose()
    }

    async fn count_after(&self, after: Position) -> Result<i64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE rowid > ?")
            .bind(after.position)
            .fetch_one(&self.pool)
            .await
            .context("counting the feed")?;
        Ok(n)
    }

    /// One writer at a time: whatever has committed is already readable.
    async fn horizon(&self) -> Result<Option<i64>, StoreError> {
        Ok(None)
    }

    async fn is_visible(&self, _horizon: i64) -> Result<bool, StoreError> {
        Ok(true)
    }
}

pub(super) async fn email_owner(
    pool: &SqlitePool,
    email: &domain::Email,
) -> Result<Option<domain::UserId>, StoreError> {
    let id: Option<String> =
        sqlx::query_scalar("SELECT user_id FROM email_reservations WHERE email = ?")
            .bind(email.as_str())
            .fetch_optional(pool)
            .await
            .context("looking up an email")?;
    id.map(|s| domain::UserId::parse(&s).map_err(StoreError::msg))
        .transpose()
}

/// Append rows of one aggregate in one statement, if `guard` holds (checked in the same
/// statement). The hashes chain on from the stored hash of the event just before the first
/// row (the genesis value at sequence 1); a unique violation (another writer took one of
/// these sequences, or the email trigger refused) is a conflict, with nothing written.
pub(super) async fn append(
    pool: &SqlitePool,
    aggregate_type: &str,
    aggregate_id: &str,
    rows: &[super::NewEvent],
    metadata: &serde_json::Value,
    guard: Option<&super::Guard>,
) -> Result<super::Appended, StoreError> {
    let Some(first) = rows.first() else {
        return Ok(super::Appended::Done(None));
    };
    let mut prev: String = if first.sequence == 1 {
        crate::chain::GENESIS.to_owned()
    } else {
        let before = sqlx::query_scalar::<_, Option<String>>(
            "SELECT hash FROM events WHERE aggregate_type = ? AND aggregate_id = ? AND sequence = ?",
        )
        .bind(aggregate_type)
        .bind(aggregate_id)
        .bind(first.sequence - 1)
        .fetch_optional(pool)
        .await
        .context("reading the hash the chain continues from")?;
        match before {
            Some(Some(h)) => h,
            // Stored before the chain and not chained yet.
            Some(None) => return Ok(super::Appended::Unchained),
            // The aggregate is not where the decision thought it was.
            None => return Ok(super::Appended::Conflict),
        }
    };
    let metadata = serde_json::to_string(metadata).context("encoding event metadata")?;
    let mut values = Vec::with_capacity(rows.len());
    for r in rows {
        let hash = crate::chain::hash_canonical(&prev, &r.canonical);
        let payload = serde_json::to_string(&r.payload).context("encoding an event")?;
        values.push((r, payload, hash.clone()));
        prev = hash;
    }
    let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                             payload, metadata, recorded_at, hash) SELECT * FROM (",
    );
    q.push_values(&values, |mut b, (r, payload, hash)| {
        b.push_bind(aggregate_type)
            .push_bind(aggregate_id)
            .push_bind(r.sequence)
            .push_bind(&r.event_type)
            .push_bind(&r.event_version)
            .push_bind(payload)
            .push_bind(&metadata)
            .push_bind(crate::chain::format_time(r.recorded_at))
            .push_bind(hash);
    });
    q.push(")");
    if let Some(g) = guard {
        q.push(" WHERE NOT EXISTS (SELECT 1 FROM events g WHERE g.aggregate_type = ")
            .push_bind(g.aggregate_type)
            .push(" AND g.aggregate_id = ")
            .push_bind(&g.aggregate_id)
            .push(" AND g.event_type = ")
            .push_bind(g.absent_event)
            .push(")");
    }
    match q.build().execute(pool).await {
        Ok(done) if done.rows_affected() == 0 => Ok(super::Appended::Guarded),
        Ok(_) => Ok(super::Appended::Done(None)),
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Ok(super::Appended::Conflict),
        Err(e) => Err(StoreError(
            anyhow::Error::new(e).context("appending events"),
        )),
    }
}
