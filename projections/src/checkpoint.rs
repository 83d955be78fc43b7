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
use commands::{Database, Position};
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
