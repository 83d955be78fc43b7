//! Operating projections: status, consistency checks, rebuilds.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use chrono::{DateTime, Utc};
use commands::{EventFeed, Position, StoredEvent};
use cqrs_es::Aggregate;
use domain::{Profile, ProfileEvent, User, UserEvent, UserId};
use serde::Serialize;

use crate::engine::{Projection, Projector};
use crate::read_models::{
    Fence, ProfileStore, ProfileView, ProfilesProjection, ReadModels, UserView,
};

/// Where one projection stands.
#[derive(Debug, Clone, Serialize)]
pub struct ProjectionStatus {
    pub name: String,
    pub checkpoint: String,
    pub head: Option<String>,
    /// Committed events after the checkpoint.
    pub lag_events: i64,
    /// Age of the oldest event not yet applied (0 when caught up).
    pub lag_seconds: f64,
}

pub async fn status(projector: &Projector) -> Result<Vec<ProjectionStatus>> {
    let feed = projector.feed();
    let head = feed.head().await?;
    let mut out = Vec::new();
    for p in projector.projections() {
        let cp = projector.checkpoints().load(p.name()).await?;
        let lag_events = feed.count_after(cp).await?;
        let lag_seconds = if lag_events > 0 {
            match feed.read_after(cp, 1).await?.first() {
                Some(e) => (Utc::now() - e.recorded_at).num_milliseconds().max(0) as f64 / 1000.0,
                // Committed but not yet readable (held back by a running transaction).
                None => 0.0,
            }
        } else {
            0.0
        };
        out.push(ProjectionStatus {
            name: p.name().to_owned(),
            checkpoint: cp.to_string(),
            head: head.map(|(h, _)| h.to_string()),
            lag_events,
            lag_seconds,
        });
    }
    Ok(out)
}

/// Every event in the feed, in order, in batches.
async fn for_each_batch(
    feed: &dyn EventFeed,
    from: Position,
    mut f: impl FnMut(&[StoredEvent]) -> Result<()>,
) -> Result<Position> {
    let mut at = from;
    loop {
        let batch = feed.read_after(at, 1000).await?;
        let Some(last) = batch.last() else {
            return Ok(at);
        };
        at = last.position;
        f(&batch)?;
    }
}

/// One difference between a read model and a fresh fold of the event store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Difference {
    Missing {
        id: String,
    },
    Unexpected {
        id: String,
    },
    Field {
        id: String,
        field: String,
        expected: String,
        actual: String,
    },
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Difference::Missing { id } => write!(f, "{id}: missing from the read model"),
            Difference::Unexpected { id } => {
                write!(f, "{id}: in the read model but not in the events")
            }
            Difference::Field {
                id,
                field,
                expected,
                actual,
            } => {
                write!(f, "{id}: {field} is {actual}, the events say {expected}")
            }
        }
    }
}

fn compare<T: Serialize>(
    id: &str,
    expected: &T,
    actual: &T,
    out: &mut Vec<Difference>,
) -> Result<()> {
    let (e, a) = (
        serde_json::to_value(expected)?,
        serde_json::to_value(actual)?,
    );
    if let (Some(e), Some(a)) = (e.as_object(), a.as_object()) {
        for (k, ev) in e {
            let av = a.get(k).cloned().unwrap_or_default();
            if *ev != av {
                out.push(Difference::Field {
                    id: id.to_owned(),
                    field: k.clone(),
                    expected: ev.to_string(),
                    actual: av.to_string(),
                });
            }
        }
    }
    Ok(())
}

fn diff<T: Serialize>(
    expected: BTreeMap<String, T>,
    actual: BTreeMap<String, T>,
) -> Result<Vec<Difference>> {
    let mut out = Vec::new();
    for (id, e) in &expected {
        match actual.get(id) {
            None => out.push(Difference::Missing { id: id.clone() }),
            Some(a) => compare(id, e, a, &mut out)?,
        }
    }
    for id in actual.keys().filter(|id| !expected.contains_key(*id)) {
        out.push(Difference::Unexpected { id: id.clone() });
    }
    Ok(out)
}

/// The profiles the event store implies, folded afresh.
pub async fn fold_profiles(feed: &dyn EventFeed) -> Result<BTreeMap<String, ProfileView>> {
    let mut views: BTreeMap<String, ProfileView> = BTreeMap::new();
    for_each_batch(feed, Position::START, |batch| {
        for e in batch.iter().filter(|e| e.aggregate_type == Profile::TYPE) {
            let event: ProfileEvent = e.decode()?;
            let id = UserId::parse(&e.aggregate_id)?;
            views.insert(
                e.aggregate_id.clone(),
                ProfileView::from_event(id, event, e.sequence, e.recorded_at),
            );
        }
        Ok(())
    })
    .await?;
    Ok(views)
}

/// Compare the profile read model with a fresh fold of the event store.
pub async fn verify_profiles(
    feed: &dyn EventFeed,
    store: &dyn ProfileStore,
) -> Result<Vec<Difference>> {
    let expected = fold_profiles(feed).await?;
    let actual = store
        .all()
        .await?
        .into_iter()
        .map(|v| (v.user_id.to_string(), v))
        .collect();
    diff(expected, actual)
}

/// Compare the users read model with a fresh fold of the event store.
pub async fn verify_users(
    feed: &dyn EventFeed,
    read_models: &ReadModels,
) -> Result<Vec<Difference>> {
    let mut expected: BTreeMap<String, UserView> = BTreeMap::new();
    for_each_batch(feed, Position::START, |batch| {
        fold_users(batch, &mut expected)?;
        Ok(())
    })
    .await?;
    let mut actual = BTreeMap::new();
    let mut after = None;
    loop {
        let page = read_models.users(after, 1000).await?;
        let Some(last) = page.last() else { break };
        after = Some(last.user_id);
        for u in page {
            actual.insert(u.user_id.to_string(), u);
        }
    }
    // Timestamps round differently per store; compare them at millisecond precision.
    let ms = |t: DateTime<Utc>| DateTime::from_timestamp_millis(t.timestamp_millis()).unwrap_or(t);
    for v in expected.values_mut().chain(actual.values_mut()) {
        v.registered_at = ms(v.registered_at);
    }
    diff(expected, actual)
}

/// Fold the user events of `batch` into `users` (keyed by aggregate id); returns the ids
/// it changed. The same fold serves the consistency check and the rebuild, so they cannot
/// disagree about what the read model should hold.
fn fold_users(
    batch: &[StoredEvent],
    users: &mut BTreeMap<String, UserView>,
) -> Result<BTreeSet<String>> {
    let mut touched = BTreeSet::new();
    for e in batch.iter().filter(|e| e.aggregate_type == User::TYPE) {
        let id = UserId::parse(&e.aggregate_id)?;
        let event: UserEvent = e.decode()?;
        if let UserEvent::UserRegistered { email, .. } = &event {
            users.insert(
                e.aggregate_id.clone(),
                UserView {
                    user_id: id,
                    email: email.clone(),
                    is_admin: false,
                    active: true,
                    registered_at: e.recorded_at,
                    version: 0,
                },
            );
        }
        if let Some(v) = users.get_mut(&e.aggregate_id) {
            match event {
                UserEvent::AdminRoleGranted => v.is_admin = true,
                UserEvent::AdminRoleRevoked => v.is_admin = false,
                UserEvent::UserDeactivated => v.active = false,
                UserEvent::UserRegistered { .. } | UserEvent::PasswordChanged { .. } => {}
            }
            v.version = e.sequence;
            touched.insert(e.aggregate_id.clone());
        }
    }
    Ok(touched)
}

/// Rebuild the users read model from position zero into `users_view_rebuild`, then swap it
/// in for `users_view` in one transaction. Users are few and small, so the fold happens in
/// memory and the table is written in multi-row inserts; the events committed meanwhile
/// are folded and written under the projection's lock, right before the switch. Reads
/// answer from the old table until then. Safe to interrupt at any point and run again.
pub async fn rebuild_users(
    projector: &Projector,
    read_models: &ReadModels,
    progress: Progress<'_>,
) -> Result<u64> {
    const NAME: &str = "users";
    let feed = projector.feed().clone();
    read_models.begin_users_rebuild().await?;
    let total = feed.count_after(Position::START).await?.max(0) as u64;
    let mut users: BTreeMap<String, UserView> = BTreeMap::new();
    let mut done = 0u64;
    let at = for_each_batch(&*feed, Position::START, |batch| {
        fold_users(batch, &mut users)?;
        done += batch.len() as u64;
        progress(done, total.max(done));
        Ok(())
    })
    .await?;
    let all: Vec<UserView> = users.values().cloned().collect();
    read_models.write_rebuilt_users(&all).await?;
    switch_over(projector, NAME, async |fence: Fence| {
        let mut touched = BTreeSet::new();
        let at = for_each_batch(&*feed, at, |batch| {
            touched.extend(fold_users(batch, &mut users)?);
            done += batch.len() as u64;
            progress(done, done);
            Ok(())
        })
        .await?;
        let tail: Vec<UserView> = touched
            .iter()
            .filter_map(|id| users.get(id).cloned())
            .collect();
        read_models.write_rebuilt_users(&tail).await?;
        read_models.finish_users_rebuild(Some(&fence)).await?;
        Ok(at)
    })
    .await?;
    Ok(done)
}

/// The end of a rebuild: with the live projector of `name` held off (its lease, renewed
/// while this runs), and once the feed can show everything committed so far, run `finish`
/// (apply the tail, switch reads) and set the checkpoint to the position it returns.
/// `finish` gets the lease as a [`Fence`] for a switch that can check it atomically.
///
/// Should the lease still be lost (the process stalled for longer than a lease), the
/// checkpoint is moved back to the rebuild's position: whatever a live driver applied to
/// the old store meanwhile is then applied again, idempotently, to the new one.
async fn switch_over(
    projector: &Projector,
    name: &str,
    finish: impl AsyncFnOnce(Fence) -> Result<Position>,
) -> Result<()> {
    let checkpoints = projector.checkpoints();
    let Some(lease) = checkpoints.lock(name, Duration::from_secs(30)).await? else {
        bail!("could not take over the {name} projection (another driver holds it)");
    };
    let fence = Fence {
        projection: name.to_owned(),
        owner: lease.owner(),
    };
    let work = async {
        projector
            .wait_until_feed_shows_now(Duration::from_secs(5))
            .await?;
        finish(fence).await
    };
    let renew_every = checkpoints.lease() / 3;
    let at = {
        tokio::pin!(work);
        loop {
            tokio::select! {
                r = &mut work => break r,
                () = tokio::time::sleep(renew_every) => {
                    if !lease.renew().await? {
                        // Stop before the switch (dropping `work` is an interruption, which
                        // a rebuild survives): a live driver may be writing the old store.
                        break Err(anyhow::anyhow!(
                            "lost the {name} projection's lease during the switch-over (the process stalled for longer than a lease); run the rebuild again"
                        ));
                    }
                }
            }
        }
    };
    let at = match at {
        Ok(at) => at,
        Err(e) => {
            lease.release().await;
            return Err(e);
        }
    };
    if !lease
        .overwrite_and_release(at)
        .await
        .context("saving the checkpoint")?
    {
        // The lease ran out between the last renewal and the switch, and another driver
        // may have applied events to the old store. Take the lease again (a driver still
        // mid-batch under the old lease then cannot move the checkpoint: its owner no
        // longer matches) and go back to the rebuild's position unless the checkpoint is
        // already behind it: whatever was applied to the old store is applied again to
        // the new one.
        tracing::warn!(projection = name, at = %at, "lease lost at the switch; re-applying from the rebuild's position");
        let Some(again) = checkpoints.lock(name, Duration::from_secs(30)).await? else {
            bail!(
                "could not take the {name} projection back after the switch; run `karmic projections rebuild {name}` again"
            );
        };
        let to = again.at().min(at);
        again.overwrite_and_release(to).await?;
    }
    Ok(())
}

/// How many distinct profiles a rebuild folds in memory before writing them.
const REBUILD_FLUSH: usize = 5_000;

/// Progress of a rebuild: events read so far and the total to read.
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Send + Sync);

/// Rebuild the profiles read model from position zero into a new store, then switch reads
/// to it atomically and drop the old one. Reads keep answering from the old store until the
/// switch. Safe to interrupt at any point and run again.
pub async fn rebuild_profiles(
    projector: &Projector,
    store: Arc<dyn ProfileStore>,
    progress: Progress<'_>,
) -> Result<u64> {
    const NAME: &str = "profiles";
    let feed = projector.feed().clone();
    let target = store.begin_rebuild().await?;
    let projection = ProfilesProjection(target.store.clone());
    let total = feed.count_after(Position::START).await?.max(0) as u64;
    let mut done = 0u64;
    let mut at = Position::START;
    // Profile events carry the whole state: fold many batches in memory and write each
    // profile once per flush instead of once per event.
    let mut pending: BTreeMap<UserId, ProfileView> = BTreeMap::new();
    loop {
        let batch = feed.read_after(at, 1000).await?;
        let Some(last) = batch.last() else { break };
        at = last.position;
        for e in batch.iter().filter(|e| e.aggregate_type == Profile::TYPE) {
            let event: ProfileEvent = e.decode()?;
            let id = UserId::parse(&e.aggregate_id)?;
            let view = ProfileView::from_event(id, event, e.sequence, e.recorded_at);
            if pending.get(&id).is_none_or(|v| v.version < view.version) {
                pending.insert(id, view);
            }
        }
        if pending.len() >= REBUILD_FLUSH {
            let views: Vec<ProfileView> = std::mem::take(&mut pending).into_values().collect();
            target.store.upsert_many(&views).await?;
        }
        done += batch.len() as u64;
        progress(done, total.max(done));
    }
    let views: Vec<ProfileView> = std::mem::take(&mut pending).into_values().collect();
    target.store.upsert_many(&views).await?;
    // The tail, the switch and the checkpoint happen while the live projector is held off.
    switch_over(projector, NAME, async |_fence: Fence| {
        loop {
            let batch = feed.read_after(at, 1000).await?;
            let Some(last) = batch.last() else { break };
            at = last.position;
            projection.apply(&batch).await?;
            done += batch.len() as u64;
            progress(done, done);
        }
        store.finish_rebuild(target).await?;
        Ok(at)
    })
    .await?;
    Ok(done)
}
