//! Where each projection has got to, and who may drive it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use commands::{Database, Position};
use sqlx::pool::PoolConnection;
use sqlx::{PgPool, Postgres, SqlitePool};

/// Checkpoints and the per-projection driver lock.
#[derive(Clone)]
pub enum CheckpointStore {
    Postgres(PgPool),
    Sqlite {
        pool: SqlitePool,
        locks: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
    },
}

/// Held while driving one projection; `release` gives it back. If the holder dies, the
/// lock goes with its connection (Postgres) or its process (SQLite).
pub enum DriverLock {
    Postgres {
        conn: Option<PoolConnection<Postgres>>,
        key: i64,
    },
    Sqlite(#[allow(dead_code)] tokio::sync::OwnedMutexGuard<()>),
}

impl DriverLock {
    pub async fn release(mut self) {
        if let DriverLock::Postgres { conn, key } = &mut self
            && let Some(mut c) = conn.take()
        {
            let ok = sqlx::query_scalar::<_, bool>("SELECT pg_advisory_unlock($1)")
                .bind(*key)
                .fetch_one(&mut *c)
                .await
                .unwrap_or(false);
            if !ok {
                // Never hand a connection that may still hold the lock back to the pool.
                drop(c.detach());
            }
        }
    }
}

impl Drop for DriverLock {
    fn drop(&mut self) {
        // Dropped without `release` (a panic or a cancelled task): close the connection,
        // which makes Postgres drop the session lock, instead of pooling it.
        if let DriverLock::Postgres { conn, .. } = self
            && let Some(c) = conn.take()
        {
            drop(c.detach());
        }
    }
}

fn lock_key(name: &str) -> i64 {
    // FNV-1a: stable across processes and releases (unlike std's hasher).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in b"karmic.projection.".iter().chain(name.as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h as i64
}

impl CheckpointStore {
    pub fn new(db: &Database) -> Self {
        match db {
            Database::Postgres(p) => CheckpointStore::Postgres(p.clone()),
            Database::Sqlite(p) => CheckpointStore::Sqlite {
                pool: p.clone(),
                locks: Arc::default(),
            },
        }
    }

    /// Become the one driver of `name`, waiting up to `wait`. `None`: someone else drives.
    pub async fn lock(&self, name: &str, wait: Duration) -> Result<Option<DriverLock>> {
        match self {
            CheckpointStore::Postgres(pool) => {
                let key = lock_key(name);
                let deadline = Instant::now() + wait;
                loop {
                    let mut conn = pool.acquire().await.context("acquiring a connection")?;
                    let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                        .bind(key)
                        .fetch_one(&mut *conn)
                        .await
                        .context("taking the projection lock")?;
                    if got {
                        return Ok(Some(DriverLock::Postgres {
                            conn: Some(conn),
                            key,
                        }));
                    }
                    drop(conn);
                    if Instant::now() >= deadline {
                        return Ok(None);
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            CheckpointStore::Sqlite { locks, .. } => {
                let m = {
                    let mut map = locks
                        .lock()
                        .map_err(|_| anyhow::anyhow!("projection lock table poisoned"))?;
                    map.entry(name.to_owned()).or_default().clone()
                };
                match tokio::time::timeout(wait, m.lock_owned()).await {
                    Ok(g) => Ok(Some(DriverLock::Sqlite(g))),
                    Err(_) => Ok(None),
                }
            }
        }
    }

    pub async fn load(&self, name: &str) -> Result<Position> {
        let row: Option<(i64, i64)> = match self {
            CheckpointStore::Postgres(p) => sqlx::query_as(
                "SELECT transaction_id, position FROM projection_checkpoints WHERE name = $1",
            )
            .bind(name)
            .fetch_optional(p)
            .await
            .context("loading a checkpoint")?,
            CheckpointStore::Sqlite { pool, .. } => sqlx::query_as(
                "SELECT transaction_id, position FROM projection_checkpoints WHERE name = ?",
            )
            .bind(name)
            .fetch_optional(pool)
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

    pub async fn save(&self, name: &str, at: Position) -> Result<()> {
        match self {
            CheckpointStore::Postgres(p) => {
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
            CheckpointStore::Sqlite { pool, .. } => {
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
                .execute(pool)
                .await
                .context("saving a checkpoint")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn lock_keys_are_stable_and_distinct() {
        assert_eq!(super::lock_key("users"), super::lock_key("users"));
        assert_ne!(super::lock_key("users"), super::lock_key("profiles"));
    }
}
