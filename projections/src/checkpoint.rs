//! Where each projection has got to, and who may drive it.
//!
//! One driver per projection at a time is a **lease**: a row (`lease_owner`, `lease_until`)
//! beside the checkpoint, claimed and given back by single statements. A lease holds no
//! connection and no transaction, so
//! - a driver that is frozen (a Lambda container between invocations), stopped or killed
//!   holds others off for at most the lease's length, measured on the database's clock;
//! - a pool of one connection is enough: nothing waits for a second connection while it
//!   holds one;
//! - it holds across processes on SQLite too (a `karmic` CLI beside `karmic serve`).
//!
//! A lease can run out under a driver that is merely slow. That is safe because every
//! read-model write is idempotent and the checkpoint only moves by compare-and-set from the
//! position its driver claimed it at, while the driver still holds the lease: a late
//! driver's save is refused, so a checkpoint never moves backwards and never skips what
//! another driver applied.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use commands::{Database, EventFeed, Position, StoredEvent};
use sqlx::Row;
use sqlx::{PgPool, SqlitePool};
use uuid::Uuid;

/// How long a claimed lease lasts unless renewed or released.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(5);

/// Checkpoints and the per-projection driver lease.
#[derive(Clone)]
pub struct CheckpointStore {
    db: Db,
    lease: Duration,
}

#[derive(Clone)]
enum Db {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// A claimed lease on one projection: the right to apply the events after `at` and move
/// the checkpoint from there. Give it back with [`DriverLock::release`] or
/// [`DriverLock::advance_and_release`]; a dropped one is given back in the background if a
/// runtime is there to do it, and otherwise simply runs out.
pub struct DriverLock {
    store: CheckpointStore,
    name: String,
    owner: Uuid,
    at: Position,
    released: bool,
}

impl std::fmt::Debug for DriverLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DriverLock")
            .field("name", &self.name)
            .field("owner", &self.owner)
            .field("at", &self.at)
            .finish()
    }
}

impl DriverLock {
    /// The checkpoint as it was when the lease was claimed (or last advanced).
    pub fn at(&self) -> Position {
        self.at
    }

    /// The lease holder's id (fencing token).
    pub fn owner(&self) -> Uuid {
        self.owner
    }

    /// Move the checkpoint from [`DriverLock::at`] to `to` and give the lease back, in one
    /// statement. `false`: the lease had run out and another driver claimed it; nothing
    /// was saved (what this driver applied was idempotent, and the other driver applies it
    /// too).
    pub async fn advance_and_release(mut self, to: Position) -> Result<bool> {
        let saved = self
            .store
            .set(&self.name, self.owner, Some(self.at), to)
            .await?;
        if !saved {
            // Lost, or the checkpoint was moved under us (a rewind): give back whatever is
            // still ours so that nobody waits for it to run out.
            self.store.release(&self.name, self.owner).await;
        }
        self.released = true;
        Ok(saved)
    }

    /// Set the checkpoint to `to` whatever it is now, if the lease is still held, and give
    /// the lease back (a rebuild's switch-over: its position covers everything so far).
    pub async fn overwrite_and_release(mut self, to: Position) -> Result<bool> {
        let saved = self.store.set(&self.name, self.owner, None, to).await?;
        if !saved {
            self.store.release(&self.name, self.owner).await;
        }
        self.released = true;
        Ok(saved)
    }

    /// The checkpoint move from [`DriverLock::at`] to `to`, for a read model that makes it
    /// in the same statement as its writes (see [`crate::Projection::apply_advancing`]).
    /// Report how that went with [`DriverLock::advanced`].
    pub fn advance_to(&self, to: Position) -> Advance {
        Advance {
            name: self.name.clone(),
            owner: self.owner,
            from: self.at,
            to,
        }
    }

    /// The read model made the [`Advance`] itself: `saved` says whether it took (which
    /// also gave the lease back). If it did not, give back whatever is still ours.
    pub async fn advanced(mut self, saved: bool) {
        if !saved {
            self.store.release(&self.name, self.owner).await;
        }
        self.released = true;
    }

    /// Extend the lease by its full length; `false` if it was lost meanwhile.
    pub async fn renew(&self) -> Result<bool> {
        self.store.renew(&self.name, self.owner).await
    }

    /// Give the lease back without moving the checkpoint.
    pub async fn release(mut self) {
        self.store.release(&self.name, self.owner).await;
        self.released = true;
    }
}

/// A checkpoint move that a read model writes in the same statement (or transaction) as
/// the batch it applies, so that a command's read-your-writes wait pays one round trip
/// for both. The move is a compare-and-set: it takes only while `owner` holds the lease
/// and the checkpoint is still at `from`; if it does not take, nothing of the batch may be
/// written either. Taking it gives the lease back.
#[derive(Debug, Clone)]
pub struct Advance {
    pub name: String,
    pub owner: Uuid,
    pub from: Position,
    pub to: Position,
}

impl Advance {
    /// The Postgres statement fragment that makes the move, for a `WITH` clause:
    /// `advance AS (<this>)` yields one row if it took. Its parameters are numbered from
    /// `first`: name, owner, from (transaction, position), to (transaction, position);
    /// bind them with [`Advance::bind`].
    pub fn pg_update(first: usize) -> String {
        let n = |i: usize| format!("${}", first + i);
        format!(
            "UPDATE projection_checkpoints
                SET transaction_id = {to_tx}, position = {to_pos}, updated_at = now(),
                    lease_owner = NULL, lease_until = NULL
              WHERE name = {name} AND lease_owner = {owner}
                AND transaction_id = {from_tx} AND position = {from_pos}
             RETURNING 1",
            name = n(0),
            owner = n(1),
            from_tx = n(2),
            from_pos = n(3),
            to_tx = n(4),
            to_pos = n(5),
        )
    }

    /// Bind the parameters of [`Advance::pg_update`], in order.
    pub fn bind<'q>(
        &'q self,
        q: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        q.bind(self.name.as_str())
            .bind(self.owner)
            .bind(self.from.transaction_id)
            .bind(self.from.position)
            .bind(self.to.transaction_id)
            .bind(self.to.position)
    }
}

impl Drop for DriverLock {
    fn drop(&mut self) {
        // Dropped without a release (a cancelled pass, a panic): give it back in the
        // background. In a frozen Lambda container this never runs, and the lease runs out.
        if !self.released
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let store = self.store.clone();
            let name = std::mem::take(&mut self.name);
            let owner = self.owner;
            rt.spawn(async move { store.release(&name, owner).await });
        }
    }
}

impl CheckpointStore {
    pub fn new(db: &Database) -> Self {
        let db = match db {
            Database::Postgres(p) => Db::Postgres(p.clone()),
            Database::Sqlite(p) => Db::Sqlite(p.clone()),
        };
        CheckpointStore {
            db,
            lease: DEFAULT_LEASE,
        }
    }

    /// Leases of this length (at least 100 ms).
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease.max(Duration::from_millis(100));
        self
    }

    pub fn lease(&self) -> Duration {
        self.lease
    }

    fn lease_ms(&self) -> i64 {
        i64::try_from(self.lease.as_millis()).unwrap_or(i64::MAX)
    }

    /// Claim `name`'s lease, retrying up to `wait` while another driver holds it. `None`:
    /// someone else drives it.
    pub async fn lock(&self, name: &str, wait: Duration) -> Result<Option<DriverLock>> {
        let deadline = Instant::now() + wait;
        let owner = Uuid::new_v4();
        loop {
            if let Some(at) = self.try_claim(name, owner).await? {
                return Ok(Some(DriverLock {
                    store: self.clone(),
                    name: name.to_owned(),
                    owner,
                    at,
                    released: false,
                }));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// [`CheckpointStore::lock`], and the feed's first `limit` events after the claimed
    /// checkpoint. On Postgres one statement does both, so a command's read-your-writes
    /// wait pays one round trip for them (the events table and the checkpoints share the
    /// database); elsewhere the claim, then `feed`.
    ///
    /// The feed part reads with the statement's snapshot, taken before the claim, while
    /// the claim returns the latest checkpoint (another driver may have moved it since).
    /// Every row below the snapshot's horizon is committed and visible to it, so the
    /// batch after any checkpoint is complete: never past a gap. (`feed` must read the
    /// same database; on Postgres the statement reads its `events` table directly.)
    pub async fn lock_reading(
        &self,
        name: &str,
        wait: Duration,
        feed: &dyn EventFeed,
        limit: i64,
    ) -> Result<Option<(DriverLock, Vec<StoredEvent>)>> {
        let Db::Postgres(pool) = &self.db else {
            let Some(lease) = self.lock(name, wait).await? else {
                return Ok(None);
            };
            let batch = feed.read_after(lease.at(), limit).await?;
            return Ok(Some((lease, batch)));
        };
        let deadline = Instant::now() + wait;
        let owner = Uuid::new_v4();
        let sql = format!(
            "WITH claim AS (
                 INSERT INTO projection_checkpoints AS c (name, lease_owner, lease_until)
                 VALUES ($1, $2, clock_timestamp() + make_interval(secs => $3 / 1000.0))
                 ON CONFLICT (name) DO UPDATE
                    SET lease_owner = EXCLUDED.lease_owner, lease_until = EXCLUDED.lease_until
                  WHERE c.lease_owner IS NULL OR c.lease_owner = EXCLUDED.lease_owner
                     OR c.lease_until < clock_timestamp()
                 RETURNING c.transaction_id AS cp_tx, c.position AS cp_pos)
             SELECT claim.cp_tx, claim.cp_pos, f.*
               FROM claim LEFT JOIN LATERAL ({feed}) f ON true",
            feed = commands::store::pg_feed_query("claim.cp_tx", "claim.cp_pos", "$4"),
        );
        loop {
            let rows = sqlx::query(&sql)
                .bind(name)
                .bind(owner)
                .bind(self.lease_ms() as f64)
                .bind(limit)
                .fetch_all(pool)
                .await
                .context("claiming a projection lease and reading the feed")?;
            if let Some(first) = rows.first() {
                let at = Position {
                    transaction_id: first.try_get("cp_tx")?,
                    position: first.try_get("cp_pos")?,
                };
                let lease = DriverLock {
                    store: self.clone(),
                    name: name.to_owned(),
                    owner,
                    at,
                    released: false,
                };
                let mut batch = Vec::with_capacity(rows.len());
                for row in rows {
                    // The claim with nothing after it: one row of NULL event columns.
                    if row.try_get::<Option<i64>, _>("tx")?.is_some() {
                        batch.push(commands::store::pg_feed_event(row)?);
                    }
                }
                return Ok(Some((lease, batch)));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// One attempt: take the lease if it is free, expired or already `owner`'s, and return
    /// the checkpoint.
    async fn try_claim(&self, name: &str, owner: Uuid) -> Result<Option<Position>> {
        let row: Option<(i64, i64)> = match &self.db {
            Db::Postgres(p) => sqlx::query_as(
                "INSERT INTO projection_checkpoints AS c (name, lease_owner, lease_until)
                 VALUES ($1, $2, clock_timestamp() + make_interval(secs => $3 / 1000.0))
                 ON CONFLICT (name) DO UPDATE
                    SET lease_owner = EXCLUDED.lease_owner, lease_until = EXCLUDED.lease_until
                  WHERE c.lease_owner IS NULL OR c.lease_owner = EXCLUDED.lease_owner
                     OR c.lease_until < clock_timestamp()
                 RETURNING c.transaction_id, c.position",
            )
            .bind(name)
            .bind(owner)
            .bind(self.lease_ms() as f64)
            .fetch_optional(p)
            .await
            .context("claiming a projection lease")?,
            Db::Sqlite(p) => sqlx::query_as(
                "INSERT INTO projection_checkpoints AS c (name, lease_owner, lease_until)
                 VALUES (?1, ?2, CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER) + ?3)
                 ON CONFLICT (name) DO UPDATE
                    SET lease_owner = excluded.lease_owner, lease_until = excluded.lease_until
                  WHERE c.lease_owner IS NULL OR c.lease_owner = excluded.lease_owner
                     OR c.lease_until < CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)
                 RETURNING transaction_id, position",
            )
            .bind(name)
            .bind(owner.to_string())
            .bind(self.lease_ms())
            .fetch_optional(p)
            .await
            .context("claiming a projection lease")?,
        };
        Ok(row.map(|(transaction_id, position)| Position {
            transaction_id,
            position,
        }))
    }

    /// Save `to` and release, if `owner` still holds the lease (and, with `from`, if the
    /// checkpoint is still there).
    async fn set(
        &self,
        name: &str,
        owner: Uuid,
        from: Option<Position>,
        to: Position,
    ) -> Result<bool> {
        let (from_tx, from_pos) = from
            .map(|p| (Some(p.transaction_id), Some(p.position)))
            .unwrap_or((None, None));
        let n = match &self.db {
            Db::Postgres(p) => sqlx::query(
                "UPDATE projection_checkpoints
                    SET transaction_id = $3, position = $4, updated_at = now(),
                        lease_owner = NULL, lease_until = NULL
                  WHERE name = $1 AND lease_owner = $2
                    AND ($5::bigint IS NULL OR (transaction_id = $5 AND position = $6))",
            )
            .bind(name)
            .bind(owner)
            .bind(to.transaction_id)
            .bind(to.position)
            .bind(from_tx)
            .bind(from_pos)
            .execute(p)
            .await
            .context("saving a checkpoint")?
            .rows_affected(),
            Db::Sqlite(p) => sqlx::query(
                "UPDATE projection_checkpoints
                    SET transaction_id = ?3, position = ?4,
                        updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now'),
                        lease_owner = NULL, lease_until = NULL
                  WHERE name = ?1 AND lease_owner = ?2
                    AND (?5 IS NULL OR (transaction_id = ?5 AND position = ?6))",
            )
            .bind(name)
            .bind(owner.to_string())
            .bind(to.transaction_id)
            .bind(to.position)
            .bind(from_tx)
            .bind(from_pos)
            .execute(p)
            .await
            .context("saving a checkpoint")?
            .rows_affected(),
        };
        Ok(n == 1)
    }

    async fn renew(&self, name: &str, owner: Uuid) -> Result<bool> {
        let n = match &self.db {
            Db::Postgres(p) => sqlx::query(
                "UPDATE projection_checkpoints
                    SET lease_until = clock_timestamp() + make_interval(secs => $3 / 1000.0)
                  WHERE name = $1 AND lease_owner = $2",
            )
            .bind(name)
            .bind(owner)
            .bind(self.lease_ms() as f64)
            .execute(p)
            .await
            .context("renewing a projection lease")?
            .rows_affected(),
            Db::Sqlite(p) => sqlx::query(
                "UPDATE projection_checkpoints
                    SET lease_until = CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER) + ?3
                  WHERE name = ?1 AND lease_owner = ?2",
            )
            .bind(name)
            .bind(owner.to_string())
            .bind(self.lease_ms())
            .execute(p)
            .await
            .context("renewing a projection lease")?
            .rows_affected(),
        };
        Ok(n == 1)
    }

    async fn release(&self, name: &str, owner: Uuid) {
        let r = match &self.db {
            Db::Postgres(p) => sqlx::query(
                "UPDATE projection_checkpoints SET lease_owner = NULL, lease_until = NULL
                      WHERE name = $1 AND lease_owner = $2",
            )
            .bind(name)
            .bind(owner)
            .execute(p)
            .await
            .map(drop),
            Db::Sqlite(p) => sqlx::query(
                "UPDATE projection_checkpoints SET lease_owner = NULL, lease_until = NULL
                      WHERE name = ?1 AND lease_owner = ?2",
            )
            .bind(name)
            .bind(owner.to_string())
            .execute(p)
            .await
            .map(drop),
        };
        if let Err(e) = r {
            // It runs out on its own.
            tracing::warn!(projection = name, error = %e, "could not release a projection lease");
        }
    }

    pub async fn load(&self, name: &str) -> Result<Position> {
        let row: Option<(i64, i64)> = match &self.db {
            Db::Postgres(p) => sqlx::query_as(
                "SELECT transaction_id, position FROM projection_checkpoints WHERE name = $1",
            )
            .bind(name)
            .fetch_optional(p)
            .await
            .context("loading a checkpoint")?,
            Db::Sqlite(p) => sqlx::query_as(
                "SELECT transaction_id, position FROM projection_checkpoints WHERE name = ?",
            )
            .bind(name)
            .fetch_optional(p)
            .await
            .context("loading a checkpoint")?,
        };
        Ok(row
            .map(|(transaction_id, position)| Position {
                transaction_id,
                position,
            })
            .unwrap_or(Position::START))
    }

    /// Move a checkpoint back to `at` if it is further on (never forwards). Events after
    /// `at` are then applied again, idempotently.
    pub async fn rewind_to(&self, name: &str, at: Position) -> Result<()> {
        match &self.db {
            Db::Postgres(p) => {
                sqlx::query(
                    "UPDATE projection_checkpoints SET transaction_id = $2, position = $3
                      WHERE name = $1 AND (transaction_id, position) > ($2, $3)",
                )
                .bind(name)
                .bind(at.transaction_id)
                .bind(at.position)
                .execute(p)
                .await
                .context("rewinding a checkpoint")?;
            }
            Db::Sqlite(p) => {
                sqlx::query(
                    "UPDATE projection_checkpoints SET transaction_id = ?2, position = ?3
                      WHERE name = ?1 AND (transaction_id, position) > (?2, ?3)",
                )
                .bind(name)
                .bind(at.transaction_id)
                .bind(at.position)
                .execute(p)
                .await
                .context("rewinding a checkpoint")?;
            }
        }
        Ok(())
    }

    /// Set a checkpoint unconditionally, leaving any lease alone. An operator's tool (replay
    /// from an earlier position, tests): it may move the checkpoint backwards on purpose,
    /// which re-applies events idempotently.
    pub async fn save(&self, name: &str, at: Position) -> Result<()> {
        match &self.db {
            Db::Postgres(p) => {
                sqlx::query(
                    "INSERT INTO projection_checkpoints (name, transaction_id, position, updated_at)
                     VALUES ($1, $2, $3, now())
                     ON CONFLICT (name) DO UPDATE
                        SET transaction_id = EXCLUDED.transaction_id,
                            position = EXCLUDED.position, updated_at = now()",
                )
                .bind(name)
                .bind(at.transaction_id)
                .bind(at.position)
                .execute(p)
                .await
                .context("saving a checkpoint")?;
            }
            Db::Sqlite(p) => {
                sqlx::query(
                    "INSERT INTO projection_checkpoints (name, transaction_id, position, updated_at)
                     VALUES (?, ?, ?, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
                     ON CONFLICT (name) DO UPDATE
                        SET transaction_id = excluded.transaction_id,
                            position = excluded.position, updated_at = excluded.updated_at",
                )
                .bind(name)
                .bind(at.transaction_id)
                .bind(at.position)
                .execute(p)
                .await
                .context("saving a checkpoint")?;
            }
        }
        Ok(())
    }
}
