//! The Postgres adapter: pool setup, the gap-safe feed and the email reservations.

use std::str::FromStr;

use anyhow::Context;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{PgPool, Row};

use super::{EventFeed, PoolSettings, Position, StoredEvent};
use crate::error::StoreError;

pub(super) async fn connect(url: &str, settings: &PoolSettings) -> Result<PgPool, StoreError> {
    let options = PgConnectOptions::from_str(url)
        .context("parsing the Postgres URL")?
        .application_name("karmic")
        // An idle open transaction holds back every projection (the feed reads below the
        // oldest running transaction); never let one linger.
        .options([("idle_in_transaction_session_timeout", "10s")]);
    let pool = pool_options(settings.max_connections, settings.acquire_timeout)
        .connect_with(options)
        .await
        .context("connecting to Postgres")?;
    Ok(pool)
}

/// A connection idle for longer than this is pinged before use; one used more recently is
/// taken as it is. (sqlx's default pings before *every* use: one extra round trip per
/// statement, a third of a command's database time.) A connection that died anyway fails
/// its statement, which the caller sees as a store error, and is dropped from the pool.
pub const PING_AFTER_IDLE: std::time::Duration = std::time::Duration::from_secs(1);

/// The pool options every Postgres pool here uses.
pub(super) fn pool_options(
    max_connections: u32,
    acquire_timeout: std::time::Duration,
) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(acquire_timeout)
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for > PING_AFTER_IDLE {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
}

/// The global feed on Postgres.
///
/// `position` comes from an identity column, handed out at insert time; transactions can
/// commit in another order than their positions. A reader that kept only `position > last`
/// would skip an event whose transaction began earlier but committed later. So the feed
/// orders by `(transaction_id, position)` and only returns rows whose transaction is older
/// than every transaction still running (`pg_snapshot_xmin`): no new row can ever appear
/// below that line, so a checkpoint there is final.
pub struct PostgresFeed {
    pool: PgPool,
}

impl PostgresFeed {
    pub fn new(pool: PgPool) -> Self {
        PostgresFeed { pool }
    }
}

/// The feed's read, after the position `(after_tx, after_pos)` (SQL expressions: bind
/// parameters or columns of an enclosing query), at most `limit` rows. The one definition
/// of what the feed shows: [`PostgresFeed::read_after`] runs it alone, and the projection
/// lease claim runs it in the claim's statement. Rows decode with [`feed_event`].
pub fn feed_query(after_tx: &str, after_pos: &str, limit: &str) -> String {
    format!(
        "SELECT transaction_id::text::bigint AS tx, position, aggregate_type, aggregate_id,
                sequence, event_type, event_version, payload, metadata, recorded_at
           FROM events
          WHERE (transaction_id, position) > (({after_tx})::text::xid8, {after_pos})
            AND transaction_id < pg_snapshot_xmin(pg_current_snapshot())
          ORDER BY transaction_id, position
          LIMIT {limit}"
    )
}

/// One row of [`feed_query`].
pub fn feed_event(row: PgRow) -> Result<StoredEvent, StoreError> {
    Ok(StoredEvent {
        position: Position {
            transaction_id: row.try_get("tx")?,
            position: row.try_get("position")?,
        },
        aggregate_type: row.try_get("aggregate_type")?,
        aggregate_id: row.try_get("aggregate_id")?,
        sequence: row.try_get("sequence")?,
        event_type: row.try_get("event_type")?,
        event_version: row.try_get("event_version")?,
        payload: row.try_get("payload")?,
        metadata: row.try_get("metadata")?,
        recorded_at: row.try_get("recorded_at")?,
    })
}

#[async_trait::async_trait]
impl EventFeed for PostgresFeed {
    async fn read_after(
        &self,
        after: Position,
        limit: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let rows = sqlx::query(&feed_query("$1::bigint", "$2", "$3"))
            .bind(after.transaction_id)
            .bind(after.position)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .context("reading the event feed")?;
        rows.into_iter().map(feed_event).collect()
    }

    async fn head(&self) -> Result<Option<(Position, DateTime<Utc>)>, StoreError> {
        let row = sqlx::query(
            "SELECT transaction_id::text::bigint AS tx, position, recorded_at
               FROM events ORDER BY transaction_id DESC, position DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await
        .context("reading the feed head")?;
        row.map(|r| {
            Ok((
                Position {
                    transaction_id: r.try_get("tx")?,
                    position: r.try_get("position")?,
                },
                r.try_get("recorded_at")?,
            ))
        })
        .transpose()
    }

    async fn count_after(&self, after: Position) -> Result<i64, StoreError> {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM events WHERE (transaction_id, position) > ($1::text::xid8, $2)",
        )
        .bind(after.transaction_id.to_string())
        .bind(after.position)
        .fetch_one(&self.pool)
        .await
        .context("counting the feed")?;
        Ok(n)
    }

    async fn horizon(&self) -> Result<Option<i64>, StoreError> {
        // Every transaction that has committed has an id below the snapshot's xmax; when
        // nothing is running (xmin = xmax) all of them are already readable.
        let (xmin, xmax): (i64, i64) = sqlx::query_as(
            "SELECT pg_snapshot_xmin(s)::text::bigint, pg_snapshot_xmax(s)::text::bigint
               FROM pg_current_snapshot() AS s",
        )
        .fetch_one(&self.pool)
        .await
        .context("reading the commit horizon")?;
        Ok((xmin < xmax).then_some(xmax))
    }

    async fn is_visible(&self, horizon: i64) -> Result<bool, StoreError> {
        let xmin: i64 =
            sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
                .fetch_one(&self.pool)
                .await
                .context("reading the visibility horizon")?;
        Ok(xmin >= horizon)
    }
}

/// Append rows of one aggregate in one statement, if `guard` holds (checked in the same
/// statement). The statement also chains the hashes: the first row's `prev` is the stored
/// hash of the event just before it (or the genesis value at sequence 1), and each hash is
/// `sha256(prev ‖ canonical)` computed by Postgres, so tamper evidence costs the command
/// path no round trip. A unique violation (a row with one of these sequences exists:
/// another writer got there first; or a constraint of the append, the email's row) is a
/// conflict; nothing was written then.
pub(super) async fn append(
    pool: &PgPool,
    aggregate_type: &str,
    aggregate_id: &str,
    rows: &[super::NewEvent],
    metadata: &serde_json::Value,
    guard: Option<&super::Guard>,
) -> Result<super::Appended, StoreError> {
    use std::fmt::Write as _;
    let Some(first) = rows.first() else {
        return Ok(super::Appended::Done(None));
    };
    // $1 type, $2 id, $3 metadata, $4 the first sequence, then six per row.
    let mut sql = String::with_capacity(1024);
    sql.push_str(
        "WITH RECURSIVE v (n, sequence, event_type, event_version, payload, recorded_at, canonical) AS (VALUES ",
    );
    for i in 0..rows.len() {
        let b = 5 + i * 6;
        if i > 0 {
            sql.push_str(", ");
        }
        let _ = write!(
            sql,
            "({n}, ${b}::bigint, ${}::text, ${}::text, ${}::json, ${}::timestamptz, ${}::text)",
            b + 1,
            b + 2,
            b + 3,
            b + 4,
            b + 5,
            n = i + 1,
        );
    }
    sql.push_str(
        "), chain (n, hash) AS (
            SELECT 0, CASE WHEN $4::bigint = 1 THEN repeat('0', 64)
                           ELSE (SELECT e.hash FROM events e
                                  WHERE e.aggregate_type = $1 AND e.aggregate_id = $2
                                    AND e.sequence = $4::bigint - 1) END
            UNION ALL
            SELECT v.n, encode(sha256(convert_to(chain.hash || v.canonical, 'UTF8')), 'hex')
              FROM chain JOIN v ON v.n = chain.n + 1)
         INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                             payload, metadata, recorded_at, hash)
         SELECT $1, $2, v.sequence, v.event_type, v.event_version, v.payload, $3::json,
                v.recorded_at, chain.hash
           FROM v JOIN chain ON chain.n = v.n
          WHERE chain.hash IS NOT NULL",
    );
    let next = 5 + rows.len() * 6;
    if guard.is_some() {
        let _ = write!(
            sql,
            " AND NOT EXISTS (SELECT 1 FROM events g WHERE g.aggregate_type = ${}
                 AND g.aggregate_id = ${} AND g.event_type = ${})",
            next,
            next + 1,
            next + 2
        );
    }
    // Positions are handed out in the order the rows come: sequence order.
    sql.push_str(" ORDER BY v.n RETURNING transaction_id::text::bigint AS tx, position");
    let mut q = sqlx::query(&sql)
        .bind(aggregate_type)
        .bind(aggregate_id)
        .bind(metadata)
        .bind(first.sequence);
    for r in rows {
        q = q
            .bind(r.sequence)
            .bind(&r.event_type)
            .bind(&r.event_version)
            .bind(&r.payload)
            .bind(r.recorded_at)
            .bind(&r.canonical);
    }
    if let Some(g) = guard {
        q = q
            .bind(g.aggregate_type)
            .bind(&g.aggregate_id)
            .bind(g.absent_event);
    }
    match q.fetch_all(pool).await {
        Ok(done) if done.is_empty() => {
            // Nothing written: the guard, or no hash to chain on from (the event before was
            // stored before the chain and not chained yet), or no event before at all.
            let before: Option<Option<String>> = sqlx::query_scalar(
                "SELECT hash FROM events WHERE aggregate_type = $1 AND aggregate_id = $2
                    AND sequence = $3",
            )
            .bind(aggregate_type)
            .bind(aggregate_id)
            .bind(first.sequence - 1)
            .fetch_optional(pool)
            .await
            .context("checking what an append follows")?;
            Ok(match before {
                Some(None) => super::Appended::Unchained,
                None if first.sequence > 1 => super::Appended::Conflict,
                _ if guard.is_some() => super::Appended::Guarded,
                _ => super::Appended::Conflict,
            })
        }
        Ok(done) => {
            let mut last = Position::START;
            for r in &done {
                last = last.max(Position {
                    transaction_id: r.try_get("tx")?,
                    position: r.try_get("position")?,
                });
            }
            Ok(super::Appended::Done(Some(last)))
        }
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("23505") => {
            Ok(super::Appended::Conflict)
        }
        Err(e) => Err(StoreError(
            anyhow::Error::new(e).context("appending events"),
        )),
    }
}

pub(super) async fn email_owner(
    pool: &PgPool,
    email: &domain::Email,
) -> Result<Option<domain::UserId>, StoreError> {
    let id: Option<uuid::Uuid> =
        sqlx::query_scalar("SELECT user_id FROM email_reservations WHERE email = $1")
            .bind(email.as_str())
            .fetch_optional(pool)
            .await
            .context("looking up an email")?;
    Ok(id.map(domain::UserId::from_uuid))
}
