//! The auditor's view of the event store: filtered, streamed reads of the whole history,
//! the hash-chain check, the backfill that chains events stored before the chain existed,
//! and an aggregate's state at any point of its history.
//!
//! Everything here streams (one row at a time from the database), so memory stays flat
//! however long the history is.

use anyhow::Context;
use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use futures::TryStreamExt;
use serde::Serialize;
use serde_json::Value;
use sqlx::Row;

use crate::chain::{self, Body, GENESIS, HeadsDigest};
use crate::error::StoreError;
use crate::store::{Database, Position, StoredEvent};

/// One stored event with its chain hash (`None`: not chained yet; see [`backfill`]).
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEvent {
    pub event: StoredEvent,
    pub hash: Option<String>,
}

impl AuditEvent {
    pub fn body(&self) -> Body<'_> {
        let e = &self.event;
        Body {
            aggregate_type: &e.aggregate_type,
            aggregate_id: &e.aggregate_id,
            sequence: e.sequence,
            event_type: &e.event_type,
            event_version: &e.event_version,
            payload: &e.payload,
            metadata: &e.metadata,
            recorded_at: e.recorded_at,
        }
    }

    /// The line `karmic events export` writes: the stored form, whose fields are exactly
    /// what the hash covers (plus where the event is and the hash), and with `upcast`, the
    /// event as the current code reads it beside it.
    pub fn export_line(&self, upcast: bool) -> ExportLine<'_> {
        let e = &self.event;
        ExportLine {
            position: e.position.position,
            transaction_id: e.position.transaction_id,
            recorded_at: chain::format_time(e.recorded_at),
            aggregate_type: &e.aggregate_type,
            aggregate_id: &e.aggregate_id,
            sequence: e.sequence,
            event_type: &e.event_type,
            event_version: &e.event_version,
            payload: &e.payload,
            metadata: &e.metadata,
            hash: self.hash.as_deref(),
            upcast: upcast.then(|| {
                let up = crate::upcast::upcast(self.serialized());
                Upcast {
                    event_version: up.event_version,
                    payload: up.payload,
                }
            }),
        }
    }

    fn serialized(&self) -> cqrs_es::persist::SerializedEvent {
        let e = &self.event;
        cqrs_es::persist::SerializedEvent::new(
            e.aggregate_id.clone(),
            usize::try_from(e.sequence).unwrap_or_default(),
            e.aggregate_type.clone(),
            e.event_type.clone(),
            e.event_version.clone(),
            e.payload.clone(),
            e.metadata.clone(),
        )
    }
}

/// One line of the JSONL export (docs/audit.md describes each field).
#[derive(Debug, Serialize)]
pub struct ExportLine<'a> {
    pub position: i64,
    pub transaction_id: i64,
    pub recorded_at: String,
    pub aggregate_type: &'a str,
    pub aggregate_id: &'a str,
    pub sequence: i64,
    pub event_type: &'a str,
    pub event_version: &'a str,
    pub payload: &'a Value,
    pub metadata: &'a Value,
    pub hash: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upcast: Option<Upcast>,
}

/// The event as the current code reads it (upcasters applied).
#[derive(Debug, Serialize)]
pub struct Upcast {
    pub event_version: String,
    pub payload: Value,
}

/// Which events to read. Every field narrows; the default is the whole history.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub aggregate_type: Option<String>,
    pub aggregate_id: Option<String>,
    pub event_type: Option<String>,
    /// Recorded at or after.
    pub since: Option<DateTime<Utc>>,
    /// Recorded before.
    pub until: Option<DateTime<Utc>>,
    /// Global position (the `position` column; the rowid on SQLite), inclusive.
    pub from_position: Option<i64>,
    pub to_position: Option<i64>,
    /// Feed order strictly after this place (paging).
    pub after: Option<Position>,
}

enum Arg {
    Text(String),
    Int(i64),
    Time(DateTime<Utc>),
}

const PG_COLUMNS: &str = "transaction_id::text::bigint AS tx, position, aggregate_type,
    aggregate_id, sequence, event_type, event_version, payload, metadata, recorded_at, hash";
const SQLITE_COLUMNS: &str = "0 AS tx, rowid AS position, aggregate_type, aggregate_id,
    sequence, event_type, event_version, payload, metadata, recorded_at, hash";

impl EventFilter {
    /// `WHERE …` for `db`, with its arguments in order.
    fn where_clause(&self, db: &Database) -> (String, Vec<Arg>) {
        let pg = matches!(db, Database::Postgres(_));
        let mut args = Vec::new();
        let mut terms: Vec<String> = Vec::new();
        let ph = |a: Arg, args: &mut Vec<Arg>| {
            args.push(a);
            if pg {
                format!("${}", args.len())
            } else {
                "?".to_owned()
            }
        };
        if let Some(t) = &self.aggregate_type {
            terms.push(format!(
                "aggregate_type = {}",
                ph(Arg::Text(t.clone()), &mut args)
            ));
        }
        if let Some(t) = &self.aggregate_id {
            terms.push(format!(
                "aggregate_id = {}",
                ph(Arg::Text(t.clone()), &mut args)
            ));
        }
        if let Some(t) = &self.event_type {
            terms.push(format!(
                "event_type = {}",
                ph(Arg::Text(t.clone()), &mut args)
            ));
        }
        // SQLite keeps times as text, in two precisions (milliseconds before the chain,
        // microseconds since): compare them as times, not as text.
        let time = |col: &str| {
            if pg {
                col.to_owned()
            } else {
                format!("julianday({col})")
            }
        };
        if let Some(t) = self.since {
            let p = ph(Arg::Time(t), &mut args);
            terms.push(format!("{} >= {}", time("recorded_at"), time(&p)));
        }
        if let Some(t) = self.until {
            let p = ph(Arg::Time(t), &mut args);
            terms.push(format!("{} < {}", time("recorded_at"), time(&p)));
        }
        let pos = if pg { "position" } else { "rowid" };
        if let Some(p) = self.from_position {
            terms.push(format!("{pos} >= {}", ph(Arg::Int(p), &mut args)));
        }
        if let Some(p) = self.to_position {
            terms.push(format!("{pos} <= {}", ph(Arg::Int(p), &mut args)));
        }
        if let Some(a) = self.after {
            if pg {
                let tx = ph(Arg::Text(a.transaction_id.to_string()), &mut args);
                let p = ph(Arg::Int(a.position), &mut args);
                terms.push(format!("(transaction_id, position) > ({tx}::xid8, {p})"));
            } else {
                terms.push(format!("rowid > {}", ph(Arg::Int(a.position), &mut args)));
            }
        }
        if terms.is_empty() {
            (String::new(), args)
        } else {
            (format!(" WHERE {}", terms.join(" AND ")), args)
        }
    }
}

/// The order events are read in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Commit order (the feed's).
    Feed,
    /// Aggregate by aggregate, each in sequence order (the chains').
    Aggregate,
}

/// Call `f` with every event that `filter` selects, in `order`, at most `limit`; stops at
/// the first error `f` returns. One streamed query.
pub async fn for_each(
    db: &Database,
    filter: &EventFilter,
    order: Order,
    limit: Option<i64>,
    mut f: impl FnMut(AuditEvent) -> anyhow::Result<()>,
) -> Result<u64, StoreError> {
    let (clause, args) = filter.where_clause(db);
    let mut n = 0u64;
    match db {
        Database::Postgres(pool) => {
            if order == Order::Feed {
                wait_for_now(db).await?;
            }
            let (order_by, clause) = match order {
                // Only what no running transaction can still add to (see the feed): a
                // page or an export never misses an event that commits later below it.
                Order::Feed => (
                    "transaction_id, position",
                    format!(
                        "{clause}{} transaction_id < pg_snapshot_xmin(pg_current_snapshot())",
                        if clause.is_empty() { " WHERE" } else { " AND" }
                    ),
                ),
                // Byte order, whatever the database's collation (anchors depend on it).
                Order::Aggregate => (
                    "aggregate_type COLLATE \"C\", aggregate_id COLLATE \"C\", sequence",
                    clause,
                ),
            };
            let mut sql = format!("SELECT {PG_COLUMNS} FROM events{clause} ORDER BY {order_by}");
            if let Some(l) = limit {
                sql.push_str(&format!(" LIMIT {}", l.max(0)));
            }
            let mut q = sqlx::query(&sql);
            for a in &args {
                q = match a {
                    Arg::Text(s) => q.bind(s),
                    Arg::Int(i) => q.bind(i),
                    Arg::Time(t) => q.bind(t),
                };
            }
            let mut rows = q.fetch(pool);
            while let Some(row) = rows.try_next().await.context("reading events")? {
                f(pg_row(&row)?).map_err(StoreError)?;
                n += 1;
            }
        }
        Database::Sqlite(pool) => {
            let order_by = match order {
                Order::Feed => "rowid",
                Order::Aggregate => "aggregate_type, aggregate_id, sequence",
            };
            let mut sql =
                format!("SELECT {SQLITE_COLUMNS} FROM events{clause} ORDER BY {order_by}");
            if let Some(l) = limit {
                sql.push_str(&format!(" LIMIT {}", l.max(0)));
            }
            let mut q = sqlx::query(&sql);
            for a in &args {
                q = match a {
                    Arg::Text(s) => q.bind(s),
                    Arg::Int(i) => q.bind(i),
                    Arg::Time(t) => q.bind(chain::format_time(*t)),
                };
            }
            let mut rows = q.fetch(pool);
            while let Some(row) = rows.try_next().await.context("reading events")? {
                f(sqlite_row(&row)?).map_err(StoreError)?;
                n += 1;
            }
        }
    }
    Ok(n)
}

/// How many events `filter` selects (for progress bars).
pub async fn count(db: &Database, filter: &EventFilter) -> Result<u64, StoreError> {
    let (clause, args) = filter.where_clause(db);
    let sql = format!("SELECT count(*) FROM events{clause}");
    let n: i64 = match db {
        Database::Postgres(pool) => {
            let mut q = sqlx::query_scalar(&sql);
            for a in &args {
                q = match a {
                    Arg::Text(s) => q.bind(s),
                    Arg::Int(i) => q.bind(i),
                    Arg::Time(t) => q.bind(t),
                };
            }
            q.fetch_one(pool).await
        }
        Database::Sqlite(pool) => {
            let mut q = sqlx::query_scalar(&sql);
            for a in &args {
                q = match a {
                    Arg::Text(s) => q.bind(s),
                    Arg::Int(i) => q.bind(i),
                    Arg::Time(t) => q.bind(chain::format_time(*t)),
                };
            }
            q.fetch_one(pool).await
        }
    }
    .context("counting events")?;
    Ok(u64::try_from(n).unwrap_or_default())
}

fn pg_row(row: &sqlx::postgres::PgRow) -> Result<AuditEvent, StoreError> {
    Ok(AuditEvent {
        event: StoredEvent {
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
        },
        hash: row.try_get("hash")?,
    })
}

fn sqlite_row(row: &sqlx::sqlite::SqliteRow) -> Result<AuditEvent, StoreError> {
    let payload: String = row.try_get("payload")?;
    let metadata: String = row.try_get("metadata")?;
    let recorded_at: String = row.try_get("recorded_at")?;
    Ok(AuditEvent {
        event: StoredEvent {
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
            recorded_at: crate::store::parse_sqlite_time(&recorded_at)?,
        },
        hash: row.try_get("hash")?,
    })
}

/// One aggregate's stored events, in sequence order.
pub async fn history(
    db: &Database,
    aggregate_type: &str,
    aggregate_id: &str,
) -> Result<Vec<AuditEvent>, StoreError> {
    let filter = EventFilter {
        aggregate_type: Some(aggregate_type.to_owned()),
        aggregate_id: Some(aggregate_id.to_owned()),
        ..EventFilter::default()
    };
    let mut out = Vec::new();
    for_each(db, &filter, Order::Aggregate, None, |e| {
        out.push(e);
        Ok(())
    })
    .await?;
    Ok(out)
}

/// A point in one aggregate's history: after the longest run of its events, from the
/// first, that are at or below `version` and recorded at or before `time` (each bound
/// optional; none: the latest). A prefix, so a state is always one that existed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AsOf {
    pub version: Option<i64>,
    pub time: Option<DateTime<Utc>>,
}

impl AsOf {
    pub const NOW: AsOf = AsOf {
        version: None,
        time: None,
    };

    pub fn version(v: i64) -> AsOf {
        AsOf {
            version: Some(v),
            time: None,
        }
    }

    pub fn time(t: DateTime<Utc>) -> AsOf {
        AsOf {
            version: None,
            time: Some(t),
        }
    }

    pub fn includes(&self, e: &StoredEvent) -> bool {
        self.version.is_none_or(|v| e.sequence <= v) && self.time.is_none_or(|t| e.recorded_at <= t)
    }
}

/// The aggregate types a history can be replayed for.
pub const AGGREGATE_TYPES: [&str; 4] = ["user", "profile", "document", "ai_job"];

/// Why a replay could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("no aggregate type {0:?} (one of user, profile, document, ai_job)")]
    UnknownType(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The state of an aggregate after the events of `history` that `as_of` includes, with the
/// registered upcasters applied, as JSON; and the version it is at (0: no event yet).
pub fn replay(
    aggregate_type: &str,
    history: &[AuditEvent],
    as_of: AsOf,
) -> Result<(Value, i64), ReplayError> {
    fn fold<A: Aggregate>(history: &[AuditEvent], as_of: AsOf) -> Result<(Value, i64), StoreError> {
        let mut state = A::default();
        let mut version = 0;
        for e in history.iter().take_while(|e| as_of.includes(&e.event)) {
            state.apply(e.event.decode::<A::Event>()?);
            version = e.event.sequence;
        }
        let json = serde_json::to_value(&state).context("encoding the state")?;
        Ok((json, version))
    }
    Ok(match aggregate_type {
        "user" => fold::<domain::User>(history, as_of)?,
        "profile" => fold::<domain::Profile>(history, as_of)?,
        "document" => fold::<domain::Document>(history, as_of)?,
        "ai_job" => fold::<domain::AiJob>(history, as_of)?,
        other => return Err(ReplayError::UnknownType(other.to_owned())),
    })
}

/// The place in the feed below which the history is final: no transaction still running
/// can add an event before it. `None` on an empty store.
///
/// Waits (up to 5 s) for the transactions running when it was called to end, so that
/// everything committed before the call counts.
pub async fn final_through(db: &Database) -> Result<Option<Position>, StoreError> {
    wait_for_now(db).await?;
    let row: Option<(i64, i64)> = match db {
        Database::Postgres(p) => sqlx::query_as(
            "SELECT transaction_id::text::bigint, position FROM events
              WHERE transaction_id < pg_snapshot_xmin(pg_current_snapshot())
              ORDER BY transaction_id DESC, position DESC LIMIT 1",
        )
        .fetch_optional(p)
        .await
        .context("reading the final position")?,
        Database::Sqlite(p) => {
            sqlx::query_as("SELECT 0, max(rowid) FROM events HAVING count(*) > 0")
                .fetch_optional(p)
                .await
                .context("reading the final position")?
        }
    };
    Ok(row.map(|(transaction_id, position)| Position {
        transaction_id,
        position,
    }))
}

/// Wait (up to 5 s) until everything committed before the call can be read in commit
/// order: on Postgres, until the transactions running at the call have ended.
async fn wait_for_now(db: &Database) -> Result<(), StoreError> {
    let feed = db.feed();
    if let Some(horizon) = feed.horizon().await? {
        for _ in 0..200 {
            if feed.is_visible(horizon).await? {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
    }
    Ok(())
}

/// A line an auditor keeps outside the system: the digest of every chain head as it stood
/// at `through`. A later [`verify`] against it recomputes the digest over the events up to
/// `through`, which shows any of them removed (an aggregate's last events, or a whole
/// aggregate), which per-aggregate chains alone cannot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Anchor {
    /// `transaction_id:position`.
    pub through: String,
    pub heads: String,
    pub aggregates: u64,
}

impl Anchor {
    fn position(&self) -> Result<Position, StoreError> {
        let (tx, pos) = self
            .through
            .split_once(':')
            .ok_or_else(|| StoreError::msg("an anchor's `through` is TRANSACTION:POSITION"))?;
        let parse = |s: &str| {
            s.parse::<i64>()
                .map_err(|_| StoreError::msg(format!("not a position: {s:?}")))
        };
        Ok(Position {
            transaction_id: parse(tx)?,
            position: parse(pos)?,
        })
    }
}

/// What [`verify`] found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub events: u64,
    pub aggregates: u64,
    /// Events whose link is broken (each counted once).
    pub broken: u64,
    /// The first broken link in chain order (aggregate type, id, sequence).
    pub first_broken: Option<BrokenLink>,
    /// The anchor for the history as it stands (when nothing is broken), or the one
    /// checked against.
    pub anchor: Option<Anchor>,
    /// Checked against an anchor: did the history up to it still give the same digest?
    pub anchor_matches: Option<bool>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.broken == 0 && self.anchor_matches != Some(false)
    }
}

/// Where a chain breaks and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BrokenLink {
    /// `transaction_id:position` of the event where the break shows.
    pub position: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub problem: String,
}

/// Recompute every chain from the stored bytes (never the upcast ones) and, with
/// `against`, the heads digest up to the anchor. `progress(done)` is called every 10,000
/// events.
pub async fn verify(
    db: &Database,
    against: Option<&Anchor>,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<VerifyReport, StoreError> {
    let through = match against {
        Some(a) => Some(a.position()?),
        None => final_through(db).await?,
    };
    let mut report = VerifyReport::default();
    let mut heads = HeadsDigest::default();
    struct Cur {
        key: (String, String),
        prev: String,
        next_sequence: i64,
        last_position: Position,
        /// The last (sequence, hash) at or before `through`.
        head: Option<(i64, String)>,
    }
    let mut cur: Option<Cur> = None;
    let finish = |c: Cur, heads: &mut HeadsDigest| {
        if let Some((seq, hash)) = c.head {
            heads.add(&c.key.0, &c.key.1, seq, &hash);
        }
    };
    for_each(db, &EventFilter::default(), Order::Aggregate, None, |row| {
        let e = &row.event;
        report.events += 1;
        if report.events.is_multiple_of(10_000) {
            progress(report.events);
        }
        let same = cur
            .as_ref()
            .is_some_and(|c| c.key.0 == e.aggregate_type && c.key.1 == e.aggregate_id);
        if !same {
            if let Some(done) = cur.take() {
                finish(done, &mut heads);
            }
            report.aggregates += 1;
            cur = Some(Cur {
                key: (e.aggregate_type.clone(), e.aggregate_id.clone()),
                prev: GENESIS.to_owned(),
                next_sequence: 1,
                last_position: Position::START,
                head: None,
            });
        }
        let Some(c) = cur.as_mut() else {
            return Ok(());
        };
        let computed = row.body().hash(&c.prev);
        let problem = if e.sequence != c.next_sequence {
            Some(if e.sequence > c.next_sequence {
                format!(
                    "sequence {} is missing (the next stored event is {})",
                    c.next_sequence, e.sequence
                )
            } else {
                format!("sequence {} is out of place", e.sequence)
            })
        } else if row.hash.is_none() {
            Some("the event has no hash (it was never chained: run `karmic migrate`)".to_owned())
        } else if row.hash.as_deref() != Some(computed.as_str()) {
            Some(
                "the hash does not match the stored event (its content, time or place in the \
                 chain changed)"
                    .to_owned(),
            )
        } else if e.position <= c.last_position {
            Some(format!(
                "the event is at {} in commit order, not after its predecessor at {}",
                e.position, c.last_position
            ))
        } else {
            None
        };
        if let Some(problem) = problem {
            report.broken += 1;
            if report.first_broken.is_none() {
                report.first_broken = Some(BrokenLink {
                    position: e.position.to_string(),
                    aggregate_type: e.aggregate_type.clone(),
                    aggregate_id: e.aggregate_id.clone(),
                    sequence: e.sequence,
                    problem,
                });
            }
        }
        // Go on from what is stored, so one edited event shows as one break, not as every
        // event after it.
        let stored = row.hash.clone().unwrap_or(computed);
        if through.is_some_and(|t| e.position <= t) {
            c.head = Some((e.sequence, stored.clone()));
        }
        c.prev = stored;
        c.next_sequence = e.sequence + 1;
        c.last_position = e.position;
        Ok(())
    })
    .await?;
    if let Some(done) = cur.take() {
        finish(done, &mut heads);
    }
    if let Some(t) = through {
        let aggregates = heads.aggregates;
        let anchor = Anchor {
            through: t.to_string(),
            heads: heads.finish(),
            aggregates,
        };
        match against {
            Some(a) => {
                report.anchor_matches = Some(a.heads == anchor.heads);
                report.anchor = Some(a.clone());
            }
            None => report.anchor = (report.broken == 0).then_some(anchor),
        }
    }
    Ok(report)
}

/// Chain every event stored without a hash (those written before the chain existed), in
/// sequence order per aggregate, continuing from whatever hash the event before holds.
/// Idempotent and resumable: it only fills empty hashes, an aggregate at a time, walking
/// the aggregates in key order (so one it cannot read is reported and passed, not
/// retried forever). Run by [`Database::migrate`] after the SQL migrations; with nothing
/// left to chain it costs one index lookup. Returns how many events it chained.
pub async fn backfill(db: &Database) -> Result<u64, StoreError> {
    const BATCH: i64 = 200;
    let mut chained = 0u64;
    let mut after = (String::new(), String::new());
    loop {
        let keys: Vec<(String, String)> = match db {
            Database::Postgres(p) => {
                sqlx::query_as(
                    "SELECT DISTINCT aggregate_type, aggregate_id FROM events
                  WHERE hash IS NULL AND (aggregate_type, aggregate_id) > ($1, $2)
                  ORDER BY 1, 2 LIMIT $3",
                )
                .bind(&after.0)
                .bind(&after.1)
                .bind(BATCH)
                .fetch_all(p)
                .await
            }
            Database::Sqlite(p) => {
                sqlx::query_as(
                    "SELECT DISTINCT aggregate_type, aggregate_id FROM events
                  WHERE hash IS NULL AND (aggregate_type, aggregate_id) > (?, ?)
                  ORDER BY 1, 2 LIMIT ?",
                )
                .bind(&after.0)
                .bind(&after.1)
                .bind(BATCH)
                .fetch_all(p)
                .await
            }
        }
        .context("finding events without a hash")?;
        let Some(last) = keys.last() else {
            return Ok(chained);
        };
        after = last.clone();
        for (t, id) in &keys {
            match chain_aggregate(db, t, id).await {
                Ok(n) => chained += n,
                Err(e) => tracing::error!(
                    aggregate_type = %t, aggregate_id = %id, error = %format!("{e:#}"),
                    "cannot chain this aggregate's events (verify will report them)"
                ),
            }
        }
    }
}

/// Chain one aggregate's events that have no hash (see [`backfill`]); also what an
/// append does when the event it follows was never chained. Returns how many it chained.
pub async fn chain_aggregate(
    db: &Database,
    aggregate_type: &str,
    aggregate_id: &str,
) -> Result<u64, StoreError> {
    let mut prev = GENESIS.to_owned();
    let mut updates: Vec<(i64, String)> = Vec::new();
    for e in history(db, aggregate_type, aggregate_id).await? {
        let hash = match e.hash.clone() {
            Some(h) => h,
            None => {
                let h = e.body().hash(&prev);
                updates.push((e.event.sequence, h.clone()));
                h
            }
        };
        prev = hash;
    }
    if updates.is_empty() {
        return Ok(0);
    }
    let (sequences, hashes): (Vec<i64>, Vec<String>) = updates.iter().cloned().unzip();
    match db {
        Database::Postgres(p) => {
            sqlx::query(
                "UPDATE events e SET hash = u.hash
                   FROM unnest($3::bigint[], $4::text[]) AS u(sequence, hash)
                  WHERE e.aggregate_type = $1 AND e.aggregate_id = $2
                    AND e.sequence = u.sequence AND e.hash IS NULL",
            )
            .bind(aggregate_type)
            .bind(aggregate_id)
            .bind(&sequences)
            .bind(&hashes)
            .execute(p)
            .await
            .context("chaining events")?;
        }
        Database::Sqlite(p) => {
            let mut tx = p.begin().await.context("chaining events")?;
            for (seq, h) in &updates {
                sqlx::query(
                    "UPDATE events SET hash = ? WHERE aggregate_type = ?
                        AND aggregate_id = ? AND sequence = ? AND hash IS NULL",
                )
                .bind(h)
                .bind(aggregate_type)
                .bind(aggregate_id)
                .bind(seq)
                .execute(&mut *tx)
                .await
                .context("chaining an event")?;
            }
            tx.commit().await.context("chaining events")?;
        }
    }
    Ok(updates.len() as u64)
}
