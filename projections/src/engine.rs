//! The projection engine: drives every projection from its checkpoint to the feed's head.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Result;
use commands::{AfterCommit, EventFeed, Position, StoredEvent};
use tokio::sync::{Mutex, Notify};
use tracing::{Instrument, debug, error, info_span, warn};

use crate::checkpoint::CheckpointStore;

/// A read model fed by the event feed.
#[async_trait::async_trait]
pub trait Projection: Send + Sync {
    /// Stable name; also the checkpoint's key. Never rename a projection in place.
    fn name(&self) -> &'static str;
    /// Apply a batch of events, oldest first. Must be idempotent: the same batch may be
    /// applied again after a crash, and events of other aggregate types pass by.
    async fn apply(&self, events: &[StoredEvent]) -> Result<()>;
}

#[derive(Debug, Clone)]
pub struct ProjectorSettings {
    /// Events read per batch.
    pub batch_size: i64,
    /// How long a driver waits for another driver of the same projection.
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
    /// Pass requests made so far, and the highest request a finished pass has covered.
    /// A pass that starts after request N was made has seen every event committed before
    /// N, so waiters at N or below are done when it ends.
    requested: AtomicU64,
    completed: AtomicU64,
    wake: Notify,
    /// Recent projection lags (commit to applied), per projection, in milliseconds.
    lags:
        std::sync::Mutex<std::collections::HashMap<&'static str, std::collections::VecDeque<f64>>>,
}

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
        Projector {
            inner: Arc::new(Inner {
                feed,
                checkpoints,
                projections,
                settings,
                pass: Mutex::new(()),
                requested: AtomicU64::new(0),
                completed: AtomicU64::new(0),
                wake: Notify::new(),
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
    /// share passes. Runs on its own task, so a cancelled caller never cuts a pass short.
    pub async fn catch_up(&self) -> Result<PassReport> {
        let ticket = self.inner.requested.fetch_add(1, Ordering::SeqCst) + 1;
        let inner = self.inner.clone();
        let task = tokio::spawn(async move {
            let _pass = inner.pass.lock().await;
            if inner.completed.load(Ordering::SeqCst) >= ticket {
                return Ok(PassReport::default());
            }
            let covers = inner.requested.load(Ordering::SeqCst);
            let report = inner.run_pass().await;
            inner.completed.fetch_max(covers, Ordering::SeqCst);
            Ok(report)
        });
        task.await?
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

    /// Ask the background loop for a pass without waiting for it.
    pub fn nudge(&self) {
        self.inner.wake.notify_one();
    }

    /// The background loop: a pass on every nudge and every poll interval, until
    /// `shutdown` resolves. This is what catches up events whose request died right after
    /// its commit.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
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
            .drive(p)
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
                    .drive(p.clone())
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

    /// Returns how many events were applied, or `None` if another driver holds the lock.
    ///
    /// The lock is taken per batch, not for the whole catch-up, so that a long catch-up
    /// never keeps another driver (a rebuild's switch-over, say) waiting for more than one
    /// batch; the checkpoint is re-read under each lock for the same reason.
    async fn drive(&self, p: Arc<dyn Projection>) -> Result<Option<usize>> {
        let name = p.name();
        let mut applied = 0;
        loop {
            let Some(lock) = self.checkpoints.lock(name, self.settings.lock_wait).await? else {
                return Ok(if applied > 0 { Some(applied) } else { None });
            };
            let result = self.drive_one_batch(&*p).await;
            lock.release().await;
            let (n, more) = result?;
            applied += n;
            if !more {
                return Ok(Some(applied));
            }
        }
    }

    /// Apply the next batch after the checkpoint. Returns its size and whether a full
    /// batch was read (there may be more).
    async fn drive_one_batch(&self, p: &dyn Projection) -> Result<(usize, bool)> {
        let name = p.name();
        let at: Position = self.checkpoints.load(name).await?;
        let batch = self.feed.read_after(at, self.settings.batch_size).await?;
        let Some(last) = batch.last() else {
            return Ok((0, false));
        };
        let next = last.position;
        p.apply(&batch).await?;
        self.checkpoints.save(name, next).await?;
        self.record_lags(name, &batch);
        debug!(projection = name, at = %next, n = batch.len(), "batch applied");
        Ok((batch.len(), batch.len() as i64 >= self.settings.batch_size))
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

#[async_trait::async_trait]
impl AfterCommit for Projector {
    /// Catch up before the response goes out, but never wait past the configured timeout:
    /// the command is committed either way and the background loop finishes the job.
    async fn committed(&self) {
        let timeout = self.inner.settings.read_your_writes_timeout;
        if timeout.is_zero() {
            self.nudge();
            return;
        }
        match tokio::time::timeout(timeout, self.catch_up_through_now(timeout)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!(error = %e, "read models did not catch up after a commit"),
            Err(_) => {
                warn!(?timeout, "read models still catching up; answering anyway");
                self.nudge();
            }
        }
    }
}
