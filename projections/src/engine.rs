//! The projection engine: drives every projection from its checkpoint to the feed's head.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Result;
use commands::{AfterCommit, EventFeed, Position, StoredEvent, Written};
use tokio::sync::{Mutex, Notify};
use tracing::{Instrument, debug, error, info_span, warn};

use crate::checkpoint::{Advance, CheckpointStore};

/// A read model fed by the event feed.
#[async_trait::async_trait]
pub trait Projection: Send + Sync {
    /// Stable name; also the checkpoint's key. Never rename a projection in place.
    fn name(&self) -> &'static str;
    /// Apply a batch of events, oldest first. Must be idempotent: the same batch may be
    /// applied again after a crash, and events of other aggregate types pass by.
    async fn apply(&self, events: &[StoredEvent]) -> Result<()>;

    /// Apply a batch and make the checkpoint's `advance` in one statement (or
    /// transaction), where the read model lives in the checkpoints' database: a command's
    /// read-your-writes wait then pays one round trip for both. `Ok(Some(true))`: both
    /// done. `Ok(Some(false))`: the advance did not take (the lease was lost) and nothing
    /// was written. `Ok(None)` (the default): not done here; the engine calls
    /// [`Projection::apply`] and then moves the checkpoint itself.
    async fn apply_advancing(
        &self,
        _events: &[StoredEvent],
        _advance: &Advance,
    ) -> Result<Option<bool>> {
        Ok(None)
    }

    /// Does an event of this kind change this read model? A command's read-your-writes
    /// wait drives only the projections that handle what it wrote (the others catch up in
    /// the background). Default: everything.
    fn handles(&self, _aggregate_type: &str, _event_type: &str) -> bool {
        true
    }

    /// Does this projection keep state in the process (an in-memory cache) that must hear
    /// of events another process applied? If so, [`Projection::applied_elsewhere`] is
    /// called with them before this process drives the projection again.
    fn keeps_process_state(&self) -> bool {
        false
    }

    /// Events another process applied to the shared read model since this process last
    /// drove the projection (see [`Projection::keeps_process_state`]).
    async fn applied_elsewhere(&self, _events: &[StoredEvent]) -> Result<()> {
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct ProjectorSettings {
    /// Events read per batch.
    pub batch_size: i64,
    /// How long a driver waits for another driver's lease on the same projection.
    pub lock_wait: Duration,
    /// How often the background loop looks for missed events.
    pub poll_interval: Duration,
    /// How long the command path waits for the read models before answering anyway.
    pub read_your_writes_timeout: Duration,
}

impl Default for ProjectorSettings {
    fn default() -> Self {
        ProjectorSettings {
            batch_size: 500,
            lock_wait: Duration::from_secs(2),
            poll_interval: Duration::from_millis(500),
            read_your_writes_timeout: Duration::from_secs(2),
        }
    }
}

/// Runs projections. Cloning shares the same state.
#[derive(Clone)]
pub struct Projector {
    inner: Arc<Inner>,
}

struct Inner {
    feed: Arc<dyn EventFeed>,
    checkpoints: CheckpointStore,
    projections: Vec<Arc<dyn Projection>>,
    settings: ProjectorSettings,
    /// Serialises passes in this process.
    pass: Mutex<()>,
    /// One driver per projection in this process at a time: concurrent commands queue for
    /// a projection's turn, and the first one's batch usually covers the others' events.
    turns: std::collections::HashMap<&'static str, Arc<Mutex<()>>>,
    /// Pass requests made so far, and the highest request a finished pass has covered.
    /// A pass that starts after request N was made has seen every event committed before
    /// N, so waiters at N or below are done when it ends.
    requested: AtomicU64,
    completed: AtomicU64,
    wake: Notify,
    /// Whether [`Projector::run`] is looping in this process. Without it (a Lambda
    /// function), a command with the read-your-writes wait turned off still projects.
    background: std::sync::atomic::AtomicBool,
    /// Per projection, the checkpoint as this process last left or saw it: a checkpoint
    /// found further on was moved by another process.
    seen: std::sync::Mutex<std::collections::HashMap<&'static str, Position>>,
    /// Recent projection lags (commit to applied), per projection, in milliseconds.
    lags:
        std::sync::Mutex<std::collections::HashMap<&'static str, std::collections::VecDeque<f64>>>,
}

/// The longest batch a command's read-your-writes wait reads in its claim statement.
const COMMAND_PATH_BATCH: i64 = 100;

/// How many recent lag samples each projection keeps.
const LAG_SAMPLES: usize = 10_000;

/// What one pass did, per projection.
#[derive(Debug, Default, Clone)]
pub struct PassReport {
    pub applied: Vec<(&'static str, usize)>,
    pub failed: Vec<(&'static str, String)>,
    pub busy: Vec<&'static str>,
}

impl Projector {
    pub fn new(
        feed: Arc<dyn EventFeed>,
        checkpoints: CheckpointStore,
        projections: Vec<Arc<dyn Projection>>,
        settings: ProjectorSettings,
    ) -> Self {
        let turns = projections
            .iter()
            .map(|p| (p.name(), Arc::new(Mutex::new(()))))
            .collect();
        Projector {
            inner: Arc::new(Inner {
                feed,
                checkpoints,
                projections,
                settings,
                pass: Mutex::new(()),
                turns,
                requested: AtomicU64::new(0),
                completed: AtomicU64::new(0),
                wake: Notify::new(),
                background: std::sync::atomic::AtomicBool::new(false),
                seen: std::sync::Mutex::default(),
                lags: std::sync::Mutex::default(),
            }),
        }
    }

    pub fn projections(&self) -> &[Arc<dyn Projection>] {
        &self.inner.projections
    }

    pub fn checkpoints(&self) -> &CheckpointStore {
        &self.inner.checkpoints
    }

    pub fn feed(&self) -> &Arc<dyn EventFeed> {
        &self.inner.feed
    }

    /// Bring every projection up to the head of the feed as it is now. Concurrent callers
    /// share passes.
    ///
    /// The pass runs in the caller's task: a caller that gives up (the read-your-writes
    /// wait timing out, a Lambda invocation ending) cancels it rather than leaving it
    /// running unseen. Cancelling is safe at any point: applies are idempotent, a lease
    /// still held is given back (or runs out) and the next pass starts from the checkpoint.
    pub async fn catch_up(&self) -> Result<PassReport> {
        let inner = &self.inner;
        let ticket = inner.requested.fetch_add(1, Ordering::SeqCst) + 1;
        let _pass = inner.pass.lock().await;
        if inner.completed.load(Ordering::SeqCst) >= ticket {
            return Ok(PassReport::default());
        }
        let covers = inner.requested.load(Ordering::SeqCst);
        let report = inner.run_pass().await;
        inner.completed.fetch_max(covers, Ordering::SeqCst);
        Ok(report)
    }

    /// Catch up far enough to include everything committed before this call: wait (up to
    /// `wait`) until the feed can show all of it, then run a pass.
    pub async fn catch_up_through_now(&self, wait: Duration) -> Result<PassReport> {
        self.wait_until_feed_shows_now(wait).await?;
        self.catch_up().await
    }

    /// Wait (up to `wait`) until the feed can show everything committed before this call
    /// (transactions still open hold the gap-safe feed back).
    pub async fn wait_until_feed_shows_now(&self, wait: Duration) -> Result<()> {
        let feed = &self.inner.feed;
        if let Some(horizon) = feed.horizon().await? {
            let deadline = tokio::time::Instant::now() + wait;
            let mut pause = Duration::from_millis(1);
            while !feed.is_visible(horizon).await? {
                if tokio::time::Instant::now() >= deadline {
                    break;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// Recent lags of `name` in milliseconds (time from an event's commit to its
    /// application), oldest first. Empty if nothing was applied in this process.
    pub fn recent_lags_ms(&self, name: &str) -> Vec<f64> {
        self.inner
            .lags
            .lock()
            .map(|m| {
                m.get(name)
                    .map(|d| d.iter().copied().collect())
                    .unwrap_or_default()
            })
            .unwrap_or_default()
    }

    /// Learn where the checkpoint of every projection that keeps state in this process
    /// is now, so that its first pass can tell what other processes apply from then on.
    /// Call before serving; costs nothing where no projection keeps such state.
    pub async fn prime(&self) -> Result<()> {
        for p in self
            .inner
            .projections
            .iter()
            .filter(|p| p.keeps_process_state())
        {
            let at = self.inner.checkpoints.load(p.name()).await?;
            if let Ok(mut m) = self.inner.seen.lock() {
                m.entry(p.name()).or_insert(at);
            }
        }
        Ok(())
    }

    /// Ask the background loop for a pass without waiting for it.
    pub fn nudge(&self) {
        self.inner.wake.notify_one();
    }

    /// The background loop: a pass on every nudge and every poll interval, until
    /// `shutdown` resolves. This is what catches up events whose request died right after
    /// its commit.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        struct Running<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for Running<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::SeqCst);
            }
        }
        self.inner.background.store(true, Ordering::SeqCst);
        let _running = Running(&self.inner.background);
        tokio::pin!(shutdown);
        let mut failures: u32 = 0;
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                () = self.inner.wake.notified() => {}
                () = tokio::time::sleep(self.inner.settings.poll_interval) => {}
            }
            match self.catch_up().await {
                Ok(r) if r.failed.is_empty() => failures = 0,
                Ok(r) => {
                    failures += 1;
                    warn!(failed = ?r.failed, "projection pass incomplete");
                }
                Err(e) => {
                    failures += 1;
                    error!(error = %e, "projection pass crashed");
                }
            }
            if failures > 0 {
                // Back off while a read-model store is down, up to 10 s.
                let backoff = Duration::from_millis(200 * 2u64.pow(failures.min(6)));
                tokio::select! {
                    () = &mut shutdown => break,
                    () = tokio::time::sleep(backoff.min(Duration::from_secs(10))) => {}
                }
            }
        }
    }

    /// Drive one projection from its checkpoint to the head (CLI, tests).
    pub async fn catch_up_one(&self, name: &str) -> Result<usize> {
        let p = self
            .inner
            .projections
            .iter()
            .find(|p| p.name() == name)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("no projection named {name:?}"))?;
        self.inner
            .drive(p, false)
            .await?
            .ok_or_else(|| anyhow::anyhow!("projection {name} is driven by someone else"))
    }
}

impl Inner {
    /// Every projection at once: they are independent (own checkpoints, own locks), so a
    /// pass takes as long as the slowest rather than the sum.
    async fn run_pass(&self) -> PassReport {
        let mut report = PassReport::default();
        let runs = self.projections.iter().map(|p| {
            let name = p.name();
            async move {
                let r = self
                    .drive(p.clone(), false)
                    .instrument(info_span!("projection", name))
                    .await;
                (name, r)
            }
        });
        for (name, result) in futures::future::join_all(runs).await {
            match result {
                Ok(Some(n)) => report.applied.push((name, n)),
                Ok(None) => report.busy.push(name),
                Err(e) => {
                    warn!(projection = name, error = %format!("{e:#}"), "projection failed");
                    report.failed.push((name, format!("{e:#}")));
                }
            }
        }
        report
    }

    /// Returns how many events were applied, or `None` if another driver holds the lease.
    ///
    /// The lease is taken per batch, not for the whole catch-up, so that a long catch-up
    /// never keeps another driver (a rebuild's switch-over, say) waiting for more than one
    /// batch. An idle projection costs two reads (checkpoint, feed) and no write.
    ///
    /// `claim_first`: there is work (a command just committed), so claim the lease at once
    /// rather than look first; later batches of a long catch-up do the same.
    async fn drive(&self, p: Arc<dyn Projection>, claim_first: bool) -> Result<Option<usize>> {
        self.drive_to(p, claim_first, None).await
    }

    /// [`Inner::drive`], unless the projection reached `target` while this caller queued
    /// for its turn (another caller's batch covered it).
    async fn drive_to(
        &self,
        p: Arc<dyn Projection>,
        claim_first: bool,
        target: Option<Position>,
    ) -> Result<Option<usize>> {
        let name = p.name();
        let turn = self.turns.get(name).cloned().unwrap_or_default();
        let size = self.settings.batch_size;
        let mut applied = 0;
        let mut claim_first = claim_first;
        loop {
            // The turn is taken per batch, so that commands queued behind a long catch-up
            // find their events applied after one batch, not after all of them.
            let _turn = turn.lock().await;
            if let Some(target) = target
                && self.seen(name).is_some_and(|s| s >= target)
            {
                return Ok(Some(applied));
            }
            // A command waiting for its own events claims and reads in one statement. That
            // statement holds a transaction id while it reads, which holds every other
            // reader's horizon back, so it reads a short batch.
            let combined = claim_first && target.is_some();
            let limit = if combined {
                size.min(COMMAND_PATH_BATCH)
            } else {
                size
            };
            let (lease, batch) = if combined {
                let Some((lease, batch)) = self
                    .checkpoints
                    .lock_reading(name, self.settings.lock_wait, &*self.feed, limit)
                    .await?
                else {
                    return Ok((applied > 0).then_some(applied));
                };
                self.notice_foreign(&*p, lease.at()).await?;
                (lease, batch)
            } else if claim_first {
                let Some(lease) = self.checkpoints.lock(name, self.settings.lock_wait).await?
                else {
                    return Ok((applied > 0).then_some(applied));
                };
                self.notice_foreign(&*p, lease.at()).await?;
                let batch = self.feed.read_after(lease.at(), size).await?;
                (lease, batch)
            } else {
                let at = self.checkpoints.load(name).await?;
                self.notice_foreign(&*p, at).await?;
                let mut batch = self.feed.read_after(at, size).await?;
                if batch.is_empty() {
                    return Ok(Some(applied));
                }
                let Some(lease) = self.checkpoints.lock(name, self.settings.lock_wait).await?
                else {
                    return Ok((applied > 0).then_some(applied));
                };
                if lease.at() != at {
                    // Another driver moved it between the look and the claim.
                    self.notice_foreign(&*p, lease.at()).await?;
                    batch = self.feed.read_after(lease.at(), size).await?;
                }
                (lease, batch)
            };
            let Some(next) = batch.last().map(|e| e.position) else {
                lease.release().await;
                return Ok(Some(applied));
            };
            let saved = match p.apply_advancing(&batch, &lease.advance_to(next)).await {
                Ok(Some(saved)) => {
                    lease.advanced(saved).await;
                    saved
                }
                Ok(None) => {
                    if let Err(e) = p.apply(&batch).await {
                        lease.release().await;
                        return Err(e);
                    }
                    lease.advance_and_release(next).await?
                }
                Err(e) => {
                    lease.release().await;
                    return Err(e);
                }
            };
            if !saved {
                // The lease ran out under us and another driver took over; it applies the
                // same events (idempotently) and moves the checkpoint.
                warn!(
                    projection = name,
                    "lost the projection lease during a batch"
                );
                return Ok((applied > 0).then_some(applied));
            }
            self.saw(name, next);
            self.record_lags(name, &batch);
            debug!(projection = name, at = %next, n = batch.len(), "batch applied");
            applied += batch.len();
            if (batch.len() as i64) < limit {
                return Ok(Some(applied));
            }
            claim_first = true;
        }
    }

    fn seen(&self, name: &str) -> Option<Position> {
        self.seen.lock().ok().and_then(|m| m.get(name).copied())
    }

    /// Drive each projection that handles one of `kinds` until its checkpoint is at `at`
    /// or beyond. The feed may not show `at` yet (a transaction that began earlier is
    /// still open somewhere): then look again shortly.
    async fn project_through(&self, at: Position, kinds: &[(String, String)]) -> Result<()> {
        let relevant = self
            .projections
            .iter()
            .filter(|p| kinds.iter().any(|(a, e)| p.handles(a, e)))
            .cloned();
        let runs = relevant.map(|p| async move {
            let name = p.name();
            let mut claim_first = true;
            let mut pause = Duration::from_micros(200);
            loop {
                if self.seen(name).is_some_and(|s| s >= at) {
                    return Ok::<(), anyhow::Error>(());
                }
                self.drive_to(p.clone(), claim_first, Some(at))
                    .instrument(info_span!("projection", name))
                    .await?;
                if self.seen(name).is_some_and(|s| s >= at) {
                    return Ok(());
                }
                // Not visible yet: a transaction that began before ours is still open.
                claim_first = false;
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(5));
            }
        });
        for r in futures::future::join_all(runs).await {
            r?;
        }
        Ok(())
    }

    fn saw(&self, name: &'static str, at: Position) {
        if let Ok(mut m) = self.seen.lock() {
            m.insert(name, at);
        }
    }

    /// If another process moved `p`'s checkpoint past where this process last saw it,
    /// tell `p` what it applied (only projections that keep state in the process).
    async fn notice_foreign(&self, p: &dyn Projection, at: Position) -> Result<()> {
        let name = p.name();
        let last = self.seen.lock().ok().and_then(|m| m.get(name).copied());
        match last {
            Some(last) if last < at && p.keeps_process_state() => {
                let mut from = last;
                while from < at {
                    let batch = self.feed.read_after(from, self.settings.batch_size).await?;
                    let Some(end) = batch.last().map(|e| e.position) else {
                        break;
                    };
                    let mine: Vec<StoredEvent> =
                        batch.into_iter().filter(|e| e.position <= at).collect();
                    p.applied_elsewhere(&mine).await?;
                    from = end;
                }
                self.saw(name, at);
            }
            Some(last) if last == at => {}
            _ => self.saw(name, at),
        }
        Ok(())
    }
}

impl Inner {
    fn record_lags(&self, name: &'static str, batch: &[StoredEvent]) {
        let now = chrono::Utc::now();
        if let Ok(mut m) = self.lags.lock() {
            let d = m.entry(name).or_default();
            for e in batch {
                d.push_back((now - e.recorded_at).num_microseconds().unwrap_or(0) as f64 / 1000.0);
                if d.len() > LAG_SAMPLES {
                    d.pop_front();
                }
            }
        }
    }
}

/// An [`AfterCommit`] for writers nobody waits on (the worker): with a background loop in
/// this process, a nudge to it and no wait, so a burst of commits is projected in batches
/// rather than one pass per commit; without one (nothing else would project here), the
/// projector's own read-your-writes pass.
#[derive(Clone)]
pub struct Nudging(pub Projector);

#[async_trait::async_trait]
impl AfterCommit for Nudging {
    async fn committed(&self, written: &Written) {
        if written.is_empty() {
            return;
        }
        if self.0.inner.background.load(Ordering::SeqCst) {
            self.0.nudge();
        } else {
            self.0.committed(written).await;
        }
    }
}

#[async_trait::async_trait]
impl AfterCommit for Projector {
    /// Catch up before the response goes out, but never wait past the configured timeout:
    /// the command is committed either way, and the pass is cancelled rather than left
    /// running (in Lambda it would be frozen mid-way). What is left is projected by the
    /// background loop (`karmic serve`), the projector function (AWS) or the next command.
    async fn committed(&self, written: &Written) {
        if written.is_empty() {
            return;
        }
        let timeout = self.inner.settings.read_your_writes_timeout;
        let timeout = if timeout.is_zero() {
            if self.inner.background.load(Ordering::SeqCst) {
                self.nudge();
                return;
            }
            // No background loop here (a Lambda function): "do not wait" must not mean
            // "nothing projects". This invocation is the only time this container can
            // project, so it does, within the default bound.
            ProjectorSettings::default().read_your_writes_timeout
        } else {
            timeout
        };
        let work = async {
            match written.at {
                // Where the events went is known: drive just the read models that care,
                // until they are there.
                Some(at) => self.inner.project_through(at, &written.events).await,
                // Unknown (SQLite, a lost acknowledgement): wait until the feed shows
                // everything committed so far, then a pass over every projection.
                None => self.catch_up_through_now(timeout).await.map(drop),
            }
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "read models did not catch up after a commit"),
            Err(_) => {
                warn!(
                    ?timeout,
                    "read models still catching up; pass cancelled, answering"
                );
                self.nudge();
            }
        }
    }
}
