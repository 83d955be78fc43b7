//! The read models of users and profiles, and the projections that fill them.
//!
//! Every write is guarded by the aggregate sequence it comes from (`version`): a row only
//! changes when the event is newer than what the row already holds, so replays and
//! duplicate deliveries are harmless.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use chrono::{DateTime, Utc};
use commands::{Database, StoredEvent};
use cqrs_es::Aggregate;
use domain::{Profile, ProfileEvent, User, UserEvent, UserId};
use serde::Serialize;
use sqlx::{PgPool, Row, SqlitePool};

use crate::checkpoint::Advance;
use crate::engine::Projection;

/// A user as listed to admins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UserView {
    pub user_id: UserId,
    pub email: String,
    pub is_admin: bool,
    pub active: bool,
    pub registered_at: DateTime<Utc>,
    pub version: i64,
}

/// A profile as read by `GET /profiles/{id}`. `version` is the profile aggregate's
/// sequence, exposed as the `ETag`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ProfileView {
    pub user_id: UserId,
    pub display_name: String,
    pub bio: Option<String>,
    pub avatar_url: Option<String>,
    pub location: Option<String>,
    pub website: Option<String>,
    pub version: i64,
    pub updated_at: DateTime<Utc>,
}

impl ProfileView {
    /// The view after `event`, which is at `sequence` of the profile `user_id`. Profile
    /// events carry the complete state, so no earlier state is needed.
    pub fn from_event(
        user_id: UserId,
        event: ProfileEvent,
        sequence: i64,
        at: DateTime<Utc>,
    ) -> ProfileView {
        let mut p = Profile::default();
        p.apply(event);
        ProfileView {
            user_id,
            display_name: p.display_name,
            bio: p.bio,
            avatar_url: p.avatar_url,
            location: p.location,
            website: p.website,
            version: sequence,
            // Milliseconds: the precision every store keeps (BSON dates have no more), so
            // a view reads back equal to what was written, whichever store holds it.
            updated_at: DateTime::from_timestamp_millis(at.timestamp_millis()).unwrap_or(at),
        }
    }
}

/// The SQL read models (users and profiles), on Postgres or SQLite.
#[derive(Clone, Debug)]
pub enum ReadModels {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

fn parse_time(s: &str) -> Result<DateTime<Utc>> {
    Ok(DateTime::parse_from_rfc3339(s)
        .with_context(|| format!("parsing timestamp {s:?}"))?
        .with_timezone(&Utc))
}

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

impl ReadModels {
    pub fn new(db: &Database) -> Self {
        match db {
            Database::Postgres(p) => ReadModels::Postgres(p.clone()),
            Database::Sqlite(p) => ReadModels::Sqlite(p.clone()),
        }
    }

    pub async fn user(&self, id: UserId) -> Result<Option<UserView>> {
        match self {
            ReadModels::Postgres(p) => sqlx::query(
                "SELECT user_id, email, is_admin, active, registered_at, version
                   FROM users_view WHERE user_id = $1",
            )
            .bind(id.as_uuid())
            .fetch_optional(p)
            .await?
            .map(|r| pg_user(&r))
            .transpose(),
            ReadModels::Sqlite(p) => sqlx::query(
                "SELECT user_id, email, is_admin, active, registered_at, version
                   FROM users_view WHERE user_id = ?",
            )
            .bind(id.to_string())
            .fetch_optional(p)
            .await?
            .map(|r| sqlite_user(&r))
            .transpose(),
        }
    }

    /// Users in id order (ids are UUIDv7, so registration order), after `after`.
    pub async fn users(&self, after: Option<UserId>, limit: i64) -> Result<Vec<UserView>> {
        match self {
            ReadModels::Postgres(p) => sqlx::query(
                "SELECT user_id, email, is_admin, active, registered_at, version
                   FROM users_view WHERE $1::uuid IS NULL OR user_id > $1
                  ORDER BY user_id LIMIT $2",
            )
            .bind(after.map(|a| a.as_uuid()))
            .bind(limit)
            .fetch_all(p)
            .await?
            .iter()
            .map(pg_user)
            .collect(),
            ReadModels::Sqlite(p) => sqlx::query(
                "SELECT user_id, email, is_admin, active, registered_at, version
                   FROM users_view WHERE ?1 IS NULL OR user_id > ?1
                  ORDER BY user_id LIMIT ?2",
            )
            .bind(after.map(|a| a.to_string()))
            .bind(limit)
            .fetch_all(p)
            .await?
            .iter()
            .map(sqlite_user)
            .collect(),
        }
    }

    async fn apply_user_event(&self, e: &StoredEvent, event: UserEvent) -> Result<()> {
        let id = UserId::parse(&e.aggregate_id).context("user aggregate id")?;
        let seq = e.sequence;
        match self {
            ReadModels::Postgres(p) => {
                let q = match event {
                    UserEvent::UserRegistered { email, .. } => sqlx::query(
                        "INSERT INTO users_view (user_id, email, registered_at, version)
                         VALUES ($1, $3, $4, $2)
                         ON CONFLICT (user_id) DO UPDATE
                            SET email = EXCLUDED.email, registered_at = EXCLUDED.registered_at,
                                version = EXCLUDED.version
                          WHERE users_view.version < EXCLUDED.version",
                    )
                    .bind(id.as_uuid())
                    .bind(seq)
                    .bind(email)
                    .bind(e.recorded_at),
                    UserEvent::PasswordChanged { .. } => sqlx::query(
                        "UPDATE users_view SET version = $2 WHERE user_id = $1 AND version < $2",
                    )
                    .bind(id.as_uuid())
                    .bind(seq),
                    UserEvent::AdminRoleGranted | UserEvent::AdminRoleRevoked => sqlx::query(
                        "UPDATE users_view SET is_admin = $3, version = $2
                          WHERE user_id = $1 AND version < $2",
                    )
                    .bind(id.as_uuid())
                    .bind(seq)
                    .bind(matches!(event, UserEvent::AdminRoleGranted)),
                    UserEvent::UserDeactivated => sqlx::query(
                        "UPDATE users_view SET active = false, version = $2
                          WHERE user_id = $1 AND version < $2",
                    )
                    .bind(id.as_uuid())
                    .bind(seq),
                };
                q.execute(p).await.context("updating users_view")?;
            }
            ReadModels::Sqlite(p) => {
                let q = match event {
                    UserEvent::UserRegistered { email, .. } => sqlx::query(
                        "INSERT INTO users_view (user_id, email, registered_at, version)
                         VALUES (?1, ?3, ?4, ?2)
                         ON CONFLICT (user_id) DO UPDATE
                            SET email = excluded.email, registered_at = excluded.registered_at,
                                version = excluded.version
                          WHERE users_view.version < excluded.version",
                    )
                    .bind(id.to_string())
                    .bind(seq)
                    .bind(email)
                    .bind(ts(e.recorded_at)),
                    UserEvent::PasswordChanged { .. } => sqlx::query(
                        "UPDATE users_view SET version = ?2 WHERE user_id = ?1 AND version < ?2",
                    )
                    .bind(id.to_string())
                    .bind(seq),
                    UserEvent::AdminRoleGranted | UserEvent::AdminRoleRevoked => sqlx::query(
                        "UPDATE users_view SET is_admin = ?3, version = ?2
                          WHERE user_id = ?1 AND version < ?2",
                    )
                    .bind(id.to_string())
                    .bind(seq)
                    .bind(matches!(event, UserEvent::AdminRoleGranted)),
                    UserEvent::UserDeactivated => sqlx::query(
                        "UPDATE users_view SET active = 0, version = ?2
                          WHERE user_id = ?1 AND version < ?2",
                    )
                    .bind(id.to_string())
                    .bind(seq),
                };
                q.execute(p).await.context("updating users_view")?;
            }
        }
        Ok(())
    }
}

/// The users table a rebuild fills beside `users_view`.
pub const USERS_TABLE: &str = "users_view";
pub const USERS_REBUILD_TABLE: &str = "users_view_rebuild";

impl ReadModels {
    /// An empty copy of table `live` named `next` (dropped first if a rebuild left it).
    async fn create_beside(&self, live: &str, next: &str) -> Result<()> {
        match self {
            ReadModels::Postgres(p) => {
                sqlx::query(&format!("DROP TABLE IF EXISTS {next}"))
                    .execute(p)
                    .await?;
                sqlx::query(&format!("CREATE TABLE {next} (LIKE {live} INCLUDING ALL)"))
                    .execute(p)
                    .await?;
            }
            ReadModels::Sqlite(p) => {
                // Copy the live table's own DDL, renamed, so the two never drift apart.
                let ddl: String = sqlx::query_scalar(
                    "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?",
                )
                .bind(live)
                .fetch_one(p)
                .await?;
                let ddl = ddl.replacen(live, next, 1);
                sqlx::query(&format!("DROP TABLE IF EXISTS {next}"))
                    .execute(p)
                    .await?;
                sqlx::query(&ddl).execute(p).await?;
            }
        }
        Ok(())
    }

    /// Put table `next` in the place of `live` and drop the old one, in one transaction:
    /// DDL is transactional on both databases, so readers see the old table or the new,
    /// never neither.
    async fn swap_in(&self, live: &str, next: &str, fence: Option<&Fence>) -> Result<()> {
        let old = format!("{live}_old");
        let steps = [
            format!("ALTER TABLE {live} RENAME TO {old}"),
            format!("ALTER TABLE {next} RENAME TO {live}"),
            format!("DROP TABLE {old}"),
        ];
        match self {
            ReadModels::Postgres(p) => {
                let mut tx = p.begin().await?;
                if let Some(f) = fence {
                    // The row lock keeps a driver from claiming the lease until we commit.
                    let held: Option<i32> = sqlx::query_scalar(
                        "SELECT 1 FROM projection_checkpoints
                          WHERE name = $1 AND lease_owner = $2 FOR UPDATE",
                    )
                    .bind(&f.projection)
                    .bind(f.owner)
                    .fetch_optional(&mut *tx)
                    .await?;
                    if held.is_none() {
                        bail!(
                            "lost the {} projection's lease before the switch",
                            f.projection
                        );
                    }
                }
                for step in &steps {
                    sqlx::query(step).execute(&mut *tx).await?;
                }
                tx.commit().await?;
            }
            ReadModels::Sqlite(p) => {
                let mut tx = p.begin().await?;
                if let Some(f) = fence {
                    // Take the write lock first: no other process writes until we commit.
                    let held: Option<i32> = sqlx::query_scalar(
                        "UPDATE projection_checkpoints SET lease_owner = lease_owner
                          WHERE name = ?1 AND lease_owner = ?2 RETURNING 1",
                    )
                    .bind(&f.projection)
                    .bind(f.owner.to_string())
                    .fetch_optional(&mut *tx)
                    .await?;
                    if held.is_none() {
                        bail!(
                            "lost the {} projection's lease before the switch",
                            f.projection
                        );
                    }
                }
                for step in &steps {
                    sqlx::query(step).execute(&mut *tx).await?;
                }
                tx.commit().await?;
            }
        }
        Ok(())
    }

    /// Start a rebuild of the users read model: an empty `users_view_rebuild`.
    pub async fn begin_users_rebuild(&self) -> Result<()> {
        self.create_beside(USERS_TABLE, USERS_REBUILD_TABLE).await
    }

    /// Write whole user rows into the rebuild table, each unless it already holds the
    /// same or a newer version.
    pub async fn write_rebuilt_users(&self, users: &[UserView]) -> Result<()> {
        const CHUNK: usize = 500;
        let t = USERS_REBUILD_TABLE;
        let head =
            format!("INSERT INTO {t} (user_id, email, is_admin, active, registered_at, version) ");
        let tail = format!(
            " ON CONFLICT (user_id) DO UPDATE
                SET email = excluded.email, is_admin = excluded.is_admin,
                    active = excluded.active, registered_at = excluded.registered_at,
                    version = excluded.version
              WHERE {t}.version < excluded.version"
        );
        for chunk in users.chunks(CHUNK) {
            match self {
                ReadModels::Postgres(p) => {
                    let mut q = sqlx::QueryBuilder::<sqlx::Postgres>::new(&head);
                    q.push_values(chunk, |mut b, u| {
                        b.push_bind(u.user_id.as_uuid())
                            .push_bind(&u.email)
                            .push_bind(u.is_admin)
                            .push_bind(u.active)
                            .push_bind(u.registered_at)
                            .push_bind(u.version);
                    });
                    q.push(&tail);
                    q.build().execute(p).await.context("writing users")?;
                }
                ReadModels::Sqlite(p) => {
                    let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(&head);
                    q.push_values(chunk, |mut b, u| {
                        b.push_bind(u.user_id.to_string())
                            .push_bind(&u.email)
                            .push_bind(u.is_admin)
                            .push_bind(u.active)
                            .push_bind(ts(u.registered_at))
                            .push_bind(u.version);
                    });
                    q.push(&tail);
                    q.build().execute(p).await.context("writing users")?;
                }
            }
        }
        Ok(())
    }

    /// Make the rebuilt users table the live one.
    ///
    /// `fence`: the swap happens only if that lease is still held, checked in the swap's
    /// own transaction (so no live driver can have written to the old table meanwhile).
    pub async fn finish_users_rebuild(&self, fence: Option<&Fence>) -> Result<()> {
        self.swap_in(USERS_TABLE, USERS_REBUILD_TABLE, fence).await
    }
}

fn pg_user(r: &sqlx::postgres::PgRow) -> Result<UserView> {
    Ok(UserView {
        user_id: UserId::from_uuid(r.try_get("user_id")?),
        email: r.try_get("email")?,
        is_admin: r.try_get("is_admin")?,
        active: r.try_get("active")?,
        registered_at: r.try_get("registered_at")?,
        version: r.try_get("version")?,
    })
}

fn sqlite_user(r: &sqlx::sqlite::SqliteRow) -> Result<UserView> {
    let id: String = r.try_get("user_id")?;
    let at: String = r.try_get("registered_at")?;
    Ok(UserView {
        user_id: UserId::parse(&id)?,
        email: r.try_get("email")?,
        is_admin: r.try_get("is_admin")?,
        active: r.try_get("active")?,
        registered_at: parse_time(&at)?,
        version: r.try_get("version")?,
    })
}

/// A projection lease that a table switch must still hold when it commits.
#[derive(Debug, Clone)]
pub struct Fence {
    pub projection: String,
    pub owner: uuid::Uuid,
}

/// The profile read-model port. Adapters: SQL ([`SqlProfiles`]) and, in the AWS
/// configuration, DocumentDB (`mongo::MongoProfiles`); [`crate::cache::CachedProfiles`]
/// puts a cache in front of either. One contract test suite runs against all of them.
#[async_trait::async_trait]
pub trait ProfileStore: Send + Sync {
    async fn get(&self, id: UserId) -> Result<Option<ProfileView>>;
    /// [`ProfileStore::get`] from where the latest write is certain to be (the primary):
    /// for filling caches, which would otherwise keep a lagging replica's value for the
    /// whole TTL.
    async fn get_fresh(&self, id: UserId) -> Result<Option<ProfileView>> {
        self.get(id).await
    }
    /// Store `view` unless the stored one has the same or a higher version. Returns
    /// whether it was stored.
    async fn upsert(&self, view: &ProfileView) -> Result<bool>;
    /// Store a batch, in order, and return the views that were stored (an older or equal
    /// version than the stored one is not). The default stores each; a store with a
    /// batch write overrides it, and a cache overrides it so that a cache failure never
    /// holds the store back.
    async fn upsert_many(&self, views: &[ProfileView]) -> Result<Vec<ProfileView>> {
        let mut stored = Vec::new();
        for v in views {
            if self.upsert(v).await? {
                stored.push(v.clone());
            }
        }
        Ok(stored)
    }
    /// [`ProfileStore::upsert_many`] and the checkpoint's `advance` in one statement, where
    /// the store shares the checkpoints' database (see
    /// [`crate::Projection::apply_advancing`]). `Ok(Some((true, stored)))`: both done;
    /// `Ok(Some((false, _)))`: the advance did not take and nothing was written;
    /// `Ok(None)` (the default): not supported by this store. (A cache in front keeps the
    /// default: its refresh must be able to fail the batch before the checkpoint moves.)
    async fn upsert_many_advancing(
        &self,
        _views: &[ProfileView],
        _advance: &Advance,
    ) -> Result<Option<(bool, Vec<ProfileView>)>> {
        Ok(None)
    }
    /// Every stored profile (consistency checks; not for request paths).
    async fn all(&self) -> Result<Vec<ProfileView>>;
    /// An empty store beside the live one, to rebuild into while the live one serves.
    async fn begin_rebuild(&self) -> Result<RebuildTarget>;
    /// Make `target` the live store in one atomic step and drop the old one.
    async fn finish_rebuild(&self, target: RebuildTarget) -> Result<()>;

    /// Does this store keep copies in the process (an in-memory cache) that another
    /// process's writes would leave stale? See [`ProfileStore::heard_of_writes`].
    fn keeps_process_copies(&self) -> bool {
        false
    }

    /// Another process wrote these profiles to the shared store: bring this process's
    /// copies of them up to date.
    async fn heard_of_writes(&self, _ids: &[UserId]) -> Result<()> {
        Ok(())
    }
}

/// A store being rebuilt: its name in the backing database and a handle to write to it.
pub struct RebuildTarget {
    pub name: String,
    pub store: Arc<dyn ProfileStore>,
}

/// Profiles in a SQL table (`profiles_view`, or the rebuild table beside it).
#[derive(Clone, Debug)]
pub struct SqlProfiles {
    db: ReadModels,
    table: String,
}

pub const PROFILES_TABLE: &str = "profiles_view";
const PROFILES_REBUILD_TABLE: &str = "profiles_view_rebuild";

impl SqlProfiles {
    pub fn new(db: ReadModels) -> Self {
        SqlProfiles {
            db,
            table: PROFILES_TABLE.to_owned(),
        }
    }
}

fn pg_profile(r: &sqlx::postgres::PgRow) -> Result<ProfileView> {
    Ok(ProfileView {
        user_id: UserId::from_uuid(r.try_get("user_id")?),
        display_name: r.try_get("display_name")?,
        bio: r.try_get("bio")?,
        avatar_url: r.try_get("avatar_url")?,
        location: r.try_get("location")?,
        website: r.try_get("website")?,
        version: r.try_get("version")?,
        updated_at: r.try_get("updated_at")?,
    })
}

fn sqlite_profile(r: &sqlx::sqlite::SqliteRow) -> Result<ProfileView> {
    let uid: String = r.try_get("user_id")?;
    let at: String = r.try_get("updated_at")?;
    Ok(ProfileView {
        user_id: UserId::parse(&uid)?,
        display_name: r.try_get("display_name")?,
        bio: r.try_get("bio")?,
        avatar_url: r.try_get("avatar_url")?,
        location: r.try_get("location")?,
        website: r.try_get("website")?,
        version: r.try_get("version")?,
        updated_at: parse_time(&at)?,
    })
}

const PROFILE_COLS: &str =
    "user_id, display_name, bio, avatar_url, location, website, version, updated_at";

#[async_trait::async_trait]
impl ProfileStore for SqlProfiles {
    async fn get(&self, id: UserId) -> Result<Option<ProfileView>> {
        let t = &self.table;
        match &self.db {
            ReadModels::Postgres(p) => sqlx::query(&format!(
                "SELECT {PROFILE_COLS} FROM {t} WHERE user_id = $1"
            ))
            .bind(id.as_uuid())
            .fetch_optional(p)
            .await?
            .map(|r| pg_profile(&r))
            .transpose(),
            ReadModels::Sqlite(p) => {
                sqlx::query(&format!("SELECT {PROFILE_COLS} FROM {t} WHERE user_id = ?"))
                    .bind(id.to_string())
                    .fetch_optional(p)
                    .await?
                    .map(|r| sqlite_profile(&r))
                    .transpose()
            }
        }
    }

    async fn all(&self) -> Result<Vec<ProfileView>> {
        let t = &self.table;
        match &self.db {
            ReadModels::Postgres(p) => {
                sqlx::query(&format!("SELECT {PROFILE_COLS} FROM {t} ORDER BY user_id"))
                    .fetch_all(p)
                    .await?
                    .iter()
                    .map(pg_profile)
                    .collect()
            }
            ReadModels::Sqlite(p) => {
                sqlx::query(&format!("SELECT {PROFILE_COLS} FROM {t} ORDER BY user_id"))
                    .fetch_all(p)
                    .await?
                    .iter()
                    .map(sqlite_profile)
                    .collect()
            }
        }
    }

    async fn begin_rebuild(&self) -> Result<RebuildTarget> {
        let next = PROFILES_REBUILD_TABLE;
        self.db.create_beside(PROFILES_TABLE, next).await?;
        Ok(RebuildTarget {
            name: next.to_owned(),
            store: Arc::new(SqlProfiles {
                db: self.db.clone(),
                table: next.to_owned(),
            }),
        })
    }

    async fn finish_rebuild(&self, target: RebuildTarget) -> Result<()> {
        self.db.swap_in(PROFILES_TABLE, &target.name, None).await?;
        Ok(())
    }

    /// On Postgres, the whole batch in one statement that also moves the checkpoint: the
    /// rows are written only if the advance takes.
    async fn upsert_many_advancing(
        &self,
        views: &[ProfileView],
        advance: &Advance,
    ) -> Result<Option<(bool, Vec<ProfileView>)>> {
        let ReadModels::Postgres(p) = &self.db else {
            return Ok(None);
        };
        // One row per profile (a statement may not update a row twice): the newest.
        let mut newest: HashMap<UserId, &ProfileView> = HashMap::new();
        for v in views {
            match newest.get(&v.user_id) {
                Some(cur) if cur.version >= v.version => {}
                _ => {
                    newest.insert(v.user_id, v);
                }
            }
        }
        let rows: Vec<&ProfileView> = newest.into_values().collect();
        let t = &self.table;
        let sql = format!(
            "WITH advance AS ({advance}),
                  up AS (
                    INSERT INTO {t}
                        (user_id, display_name, bio, avatar_url, location, website, version, updated_at)
                    SELECT * FROM unnest($7::uuid[], $8::text[], $9::text[], $10::text[],
                                         $11::text[], $12::text[], $13::bigint[], $14::timestamptz[])
                     WHERE EXISTS (SELECT 1 FROM advance)
                    ON CONFLICT (user_id) DO UPDATE
                       SET display_name = EXCLUDED.display_name, bio = EXCLUDED.bio,
                           avatar_url = EXCLUDED.avatar_url, location = EXCLUDED.location,
                           website = EXCLUDED.website, version = EXCLUDED.version,
                           updated_at = EXCLUDED.updated_at
                     WHERE {t}.version < EXCLUDED.version
                    RETURNING user_id)
             SELECT EXISTS (SELECT 1 FROM advance) AS advanced,
                    ARRAY(SELECT user_id FROM up) AS stored",
            advance = Advance::pg_update(1),
        );
        let row = advance
            .bind(sqlx::query(&sql))
            .bind(rows.iter().map(|v| v.user_id.as_uuid()).collect::<Vec<_>>())
            .bind(
                rows.iter()
                    .map(|v| v.display_name.clone())
                    .collect::<Vec<_>>(),
            )
            .bind(rows.iter().map(|v| v.bio.clone()).collect::<Vec<_>>())
            .bind(
                rows.iter()
                    .map(|v| v.avatar_url.clone())
                    .collect::<Vec<_>>(),
            )
            .bind(rows.iter().map(|v| v.location.clone()).collect::<Vec<_>>())
            .bind(rows.iter().map(|v| v.website.clone()).collect::<Vec<_>>())
            .bind(rows.iter().map(|v| v.version).collect::<Vec<_>>())
            .bind(rows.iter().map(|v| v.updated_at).collect::<Vec<_>>())
            .fetch_one(p)
            .await
            .context("upserting profiles_view and advancing its checkpoint")?;
        let advanced: bool = row.try_get("advanced")?;
        let stored: Vec<uuid::Uuid> = row.try_get("stored")?;
        let stored: std::collections::HashSet<uuid::Uuid> = stored.into_iter().collect();
        let stored = rows
            .into_iter()
            .filter(|v| stored.contains(&v.user_id.as_uuid()))
            .cloned()
            .collect();
        Ok(Some((advanced, stored)))
    }

    async fn upsert(&self, v: &ProfileView) -> Result<bool> {
        let stored = match &self.db {
            ReadModels::Postgres(p) => {
                let t = &self.table;
                sqlx::query(&format!(
                    "INSERT INTO {t}
                        (user_id, display_name, bio, avatar_url, location, website, version, updated_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                     ON CONFLICT (user_id) DO UPDATE
                        SET display_name = EXCLUDED.display_name, bio = EXCLUDED.bio,
                            avatar_url = EXCLUDED.avatar_url, location = EXCLUDED.location,
                            website = EXCLUDED.website, version = EXCLUDED.version,
                            updated_at = EXCLUDED.updated_at
                      WHERE {t}.version < EXCLUDED.version"
                ))
                .bind(v.user_id.as_uuid())
                .bind(&v.display_name)
                .bind(&v.bio)
                .bind(&v.avatar_url)
                .bind(&v.location)
                .bind(&v.website)
                .bind(v.version)
                .bind(v.updated_at)
                .execute(p)
                .await
                .context("upserting profiles_view")?
                .rows_affected()
            }
            ReadModels::Sqlite(p) => {
                let t = &self.table;
                sqlx::query(&format!(
                    "INSERT INTO {t}
                        (user_id, display_name, bio, avatar_url, location, website, version, updated_at)
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                     ON CONFLICT (user_id) DO UPDATE
                        SET display_name = excluded.display_name, bio = excluded.bio,
                            avatar_url = excluded.avatar_url, location = excluded.location,
                            website = excluded.website, version = excluded.version,
                            updated_at = excluded.updated_at
                      WHERE {t}.version < excluded.version"
                ))
                .bind(v.user_id.to_string())
                .bind(&v.display_name)
                .bind(&v.bio)
                .bind(&v.avatar_url)
                .bind(&v.location)
                .bind(&v.website)
                .bind(v.version)
                .bind(ts(v.updated_at))
                .execute(p)
                .await
                .context("upserting profiles_view")?
                .rows_affected()
            }
        };
        Ok(stored == 1)
    }
}

/// Projection: the users read model.
pub struct UsersProjection(pub ReadModels);

#[async_trait::async_trait]
impl Projection for UsersProjection {
    fn name(&self) -> &'static str {
        "users"
    }

    fn handles(&self, aggregate_type: &str, _event_type: &str) -> bool {
        aggregate_type == User::TYPE
    }

    async fn apply(&self, events: &[StoredEvent]) -> Result<()> {
        for e in events.iter().filter(|e| e.aggregate_type == User::TYPE) {
            let event: UserEvent = e.decode()?;
            self.0.apply_user_event(e, event).await?;
        }
        Ok(())
    }
}

/// The profile views the profile events among `events` make, oldest first.
fn profile_views(events: &[StoredEvent]) -> Result<Vec<ProfileView>> {
    let mut views = Vec::new();
    for e in events.iter().filter(|e| e.aggregate_type == Profile::TYPE) {
        let event: ProfileEvent = e.decode()?;
        let id = UserId::parse(&e.aggregate_id).context("profile aggregate id")?;
        views.push(ProfileView::from_event(
            id,
            event,
            e.sequence,
            e.recorded_at,
        ));
    }
    Ok(views)
}

/// Projection: the profiles read model, into whichever store is configured.
pub struct ProfilesProjection(pub Arc<dyn ProfileStore>);

#[async_trait::async_trait]
impl Projection for ProfilesProjection {
    fn name(&self) -> &'static str {
        "profiles"
    }

    fn handles(&self, aggregate_type: &str, _event_type: &str) -> bool {
        aggregate_type == Profile::TYPE
    }

    async fn apply(&self, events: &[StoredEvent]) -> Result<()> {
        let views = profile_views(events)?;
        self.0.upsert_many(&views).await?;
        Ok(())
    }

    async fn apply_advancing(
        &self,
        events: &[StoredEvent],
        advance: &Advance,
    ) -> Result<Option<bool>> {
        let views = profile_views(events)?;
        Ok(self
            .0
            .upsert_many_advancing(&views, advance)
            .await?
            .map(|(advanced, _)| advanced))
    }

    fn keeps_process_state(&self) -> bool {
        self.0.keeps_process_copies()
    }

    async fn applied_elsewhere(&self, events: &[StoredEvent]) -> Result<()> {
        let ids: std::collections::BTreeSet<UserId> = events
            .iter()
            .filter(|e| e.aggregate_type == Profile::TYPE)
            .filter_map(|e| UserId::parse(&e.aggregate_id).ok())
            .collect();
        let ids: Vec<UserId> = ids.into_iter().collect();
        self.0.heard_of_writes(&ids).await
    }
}
