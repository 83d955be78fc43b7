//! The worker: long-polls the job queue, turns storage notifications into confirmed
//! documents and analysis jobs, runs each analysis in isolation, and stores the outcome as
//! events before it lets go of the message.
//!
//! Every step is safe to repeat, because every message may arrive more than once: the
//! document and job aggregates decide (a repeated confirmation names the same job; a
//! finished job refuses to start again), and the message is deleted only after the
//! outcome is stored. A worker that dies mid-job leaves the message to reappear when its
//! visibility ends; the next receive is a new attempt of the same job.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Result;
use commands::CommandMeta;
use commands::documents::{Confirmation, Documents};
use commands::error::CommandError;
use domain::{AiJobError, DocumentError, JobId, JobStatus, ObjectKey};
use storage::{Fetched, ObjectStore};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::{Instrument, info, info_span, warn};

use crate::analysis::Analyzer;
use crate::analysis::extract::sniff;
use crate::notification::{self, Notification, ObjectCreated};
use crate::queue::{JobQueue, Received};

/// How the worker runs (`KARMIC_WORKER_*`).
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Recorded on every attempt it starts (`KARMIC_WORKER_ID`; default host and pid).
    pub worker_id: String,
    /// Messages in flight at once (`KARMIC_WORKER_CONCURRENCY`).
    pub concurrency: usize,
    /// Long-poll wait of each receive (SQS allows up to 20 s).
    pub wait: Duration,
    /// Visibility timeout given at receive and renewed by each heartbeat.
    pub visibility: Duration,
    /// How often a running job's message has its visibility renewed.
    pub heartbeat: Duration,
    /// After SIGTERM: how long in-flight jobs may run on before they are released.
    pub shutdown_grace: Duration,
    /// The largest object read (the upload limit).
    pub max_bytes: u64,
    /// Delay before a retryable failure is retried, doubled per receive (capped).
    pub retry_delay: Duration,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        WorkerSettings {
            worker_id: default_worker_id(),
            concurrency: default_concurrency(crate::isolate::DEFAULT_MEMORY_BYTES),
            wait: Duration::from_secs(20),
            visibility: Duration::from_secs(600),
            heartbeat: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(30),
            max_bytes: 25 << 20,
            retry_delay: Duration::from_secs(5),
        }
    }
}

/// Messages in flight unless configured: two per CPU, since a slot's analysis child uses
/// a CPU while other slots' commits and object reads wait on the disk and the network (on
/// 2 cores, 2 slots kept the CPUs about 76 % busy and handled 16 documents/s; 3 and 4
/// slots, 23.5 and 25.3/s: docs/benchmarks.md); but no more than the memory this process
/// may use holds with every child at its address-space limit (`child_memory_bytes`,
/// `KARMIC_ANALYZER_MEMORY_MB`) beside [`WORKER_RESERVE_BYTES`] for the worker itself.
/// Never below one.
pub fn default_concurrency(child_memory_bytes: u64) -> usize {
    let cpus = std::thread::available_parallelism().map_or(2, usize::from);
    concurrency_for(cpus, memory_limit_bytes(), child_memory_bytes)
}

/// Memory kept for the worker process itself when sizing the default concurrency.
pub const WORKER_RESERVE_BYTES: u64 = 512 << 20;

fn concurrency_for(cpus: usize, memory: Option<u64>, child_memory_bytes: u64) -> usize {
    let by_cpu = 2 * cpus.max(1);
    let by_memory = memory.map(|m| {
        usize::try_from(m.saturating_sub(WORKER_RESERVE_BYTES) / child_memory_bytes.max(1))
            .unwrap_or(usize::MAX)
    });
    by_memory.map_or(by_cpu, |m| by_cpu.min(m)).max(1)
}

/// The memory this process may use: the machine's (`MemTotal`), or the lowest limit of
/// its cgroup and the cgroups above it when lower (a container, a systemd `MemoryMax=`;
/// cgroup v2, or v1's `memory.limit_in_bytes`).
fn memory_limit_bytes() -> Option<u64> {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)?;
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    Some(cgroup_limits(&cgroups, |path| std::fs::read_to_string(path).ok()).fold(total, u64::min))
}

/// The memory limits on the way from this process's cgroup (as `/proc/self/cgroup`
/// names it) up to the root, read with `read`; "max" and unreadable files are no limit.
fn cgroup_limits<'a>(
    proc_self_cgroup: &'a str,
    read: impl Fn(&str) -> Option<String> + 'a,
) -> impl Iterator<Item = u64> + 'a {
    proc_self_cgroup.lines().flat_map(move |line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next(), parts.next());
        let file = match controllers {
            // v2: the unified hierarchy.
            Some("") => Some(("/sys/fs/cgroup", "memory.max")),
            // v1: the memory controller's own hierarchy.
            Some(c) if c.split(',').any(|c| c == "memory") => {
                Some(("/sys/fs/cgroup/memory", "memory.limit_in_bytes"))
            }
            _ => None,
        };
        let mut found = Vec::new();
        if let (Some((root, name)), Some(path)) = (file, path) {
            let mut dir = path.trim_end_matches('/').to_owned();
            loop {
                if let Some(limit) =
                    read(&format!("{root}{dir}/{name}")).and_then(|v| v.trim().parse().ok())
                {
                    found.push(limit);
                }
                match dir.rfind('/') {
                    Some(i) => dir.truncate(i),
                    None => break,
                }
            }
        }
        found
    })
}

/// `host:pid`, unique among live workers.
pub fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "worker".to_owned());
    format!("{host}:{}", std::process::id())
}

/// How often a message is given back (an infrastructure failure before any attempt)
/// before its receives are spent after all: with the delays of
/// [`Worker::give_back_after`], an outage of about 50 minutes costs no attempt; a failure
/// that lasts longer is treated as one that retrying will not cure.
pub const MAX_GIVE_BACKS: u32 = 10;

/// What happens to a message once it has been handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Disposal {
    /// Done with (or nothing to do): delete it.
    Delete,
    /// Retrying cannot help: move it to the dead-letter queue.
    DeadLetter,
    /// No work was done (the event store or the bucket was unreachable): let it come
    /// back after this long without spending a receive, so that an outage cannot walk it
    /// into the dead-letter queue behind the job's back.
    GiveBack(Duration),
    /// An attempt was made and failed retryably: let it come back after this long.
    Retry(Duration),
}

/// Aborts the task when dropped: a heartbeat must not outlive the handling of its
/// message, even when that handling is itself dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The worker's parts.
#[derive(Clone)]
pub struct Worker {
    pub queue: Arc<dyn JobQueue>,
    pub documents: Documents,
    pub objects: ObjectStore,
    pub analyzer: Arc<dyn Analyzer>,
    pub settings: WorkerSettings,
}

impl Worker {
    /// Receive and handle messages until `shutdown` resolves; then stop receiving, give
    /// in-flight jobs `shutdown_grace` to finish, release the rest (visible again at
    /// once, for another worker), and return.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
        let slots = Arc::new(Semaphore::new(self.settings.concurrency.max(1)));
        let (release_tx, release_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let mut backoff = Duration::from_millis(200);
        tokio::pin!(shutdown);
        info!(worker = %self.settings.worker_id, concurrency = self.settings.concurrency, "worker started");
        loop {
            // Wait for a free slot, then take as many messages as there are free slots.
            let first = tokio::select! {
                p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                () = &mut shutdown => break,
            };
            let mut permits = vec![first];
            while permits.len() < 10 {
                match slots.clone().try_acquire_owned() {
                    Ok(p) => permits.push(p),
                    Err(_) => break,
                }
            }
            let received = tokio::select! {
                r = self.queue.receive(
                    u32::try_from(permits.len()).unwrap_or(1),
                    self.settings.wait,
                    self.settings.visibility,
                ) => r,
                () = &mut shutdown => break,
            };
            let messages = match received {
                Ok(m) => {
                    backoff = Duration::from_millis(200);
                    m
                }
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "receiving failed; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {},
                        () = &mut shutdown => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(20));
                    continue;
                }
            };
            for message in messages {
                let Some(permit) = permits.pop() else { break };
                let worker = self.clone();
                let release = release_rx.clone();
                let span = info_span!(
                    "message",
                    message_id = %message.id,
                    receive_count = message.receive_count,
                    job_id = tracing::field::Empty,
                    document_id = tracing::field::Empty,
                );
                tasks.spawn(
                    async move {
                        worker.handle_released(message, release).await;
                        drop(permit);
                    }
                    .instrument(span),
                );
            }
            // Reap finished tasks so the set stays small.
            while tasks.try_join_next().is_some() {}
        }
        info!(in_flight = tasks.len(), "worker stopping: no more receives");
        // In-flight jobs get the grace period to finish; meanwhile, side by side, a
        // receive cut short gives its messages back. An SQS long poll cannot be cut: it
        // ends within its wait, and what it brings must be given back before the process
        // ends, so that part may outlast a grace period shorter than the wait.
        let grace = self.settings.shutdown_grace;
        let polls = grace.max(self.settings.wait + Duration::from_secs(10));
        let (closed, drained) = tokio::join!(
            tokio::time::timeout(polls, self.queue.close()),
            tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }),
        );
        if closed.is_err() {
            warn!("a receive cut short did not finish giving its messages back");
        }
        if drained.is_err() {
            warn!(
                in_flight = tasks.len(),
                "grace period over: releasing in-flight messages"
            );
            let _ = release_tx.send(true);
            while tasks.join_next().await.is_some() {}
        }
        info!("worker stopped");
        Ok(())
    }

    /// [`Worker::handle`], with a heartbeat while it runs, ended early (the message made
    /// visible again) if the worker is told to release its work.
    async fn handle_released(&self, message: Received, mut release: watch::Receiver<bool>) {
        let mut heartbeat = AbortOnDrop({
            let queue = self.queue.clone();
            let receipt = message.receipt.clone();
            let (every, visibility) = (self.settings.heartbeat, self.settings.visibility);
            tokio::spawn(
                async move {
                    let mut tick =
                        tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                    loop {
                        tick.tick().await;
                        match queue.change_visibility(&receipt, visibility).await {
                            Ok(true) => tracing::debug!("heartbeat"),
                            Ok(false) => {
                                warn!("heartbeat: the message was received elsewhere");
                                return;
                            }
                            Err(e) => warn!(error = %format!("{e:#}"), "heartbeat failed"),
                        }
                    }
                }
                .in_current_span(),
            )
        });
        let attempted = AtomicBool::new(false);
        let disposal = tokio::select! {
            d = self.handle(&message, &attempted) => Some(d),
            _ = release.wait_for(|r| *r) => None,
        };
        // The heartbeat stops before the message is let go of.
        heartbeat.0.abort();
        let _ = (&mut heartbeat.0).await;
        let result = match disposal {
            Some(Disposal::Delete) => self.queue.delete(&message.receipt).await,
            Some(Disposal::DeadLetter) => self.queue.dead_letter(&message).await,
            Some(Disposal::Retry(after)) => {
                self.queue.change_visibility(&message.receipt, after).await
            }
            Some(Disposal::GiveBack(after)) => self.queue.give_back(&message, after).await,
            // Released at shutdown: an attempt it started is spent; a receive that
            // started none (still fetching, or waiting on a duplicate) is released
            // unspent, so that scale-ins cannot walk a message into the dead-letter queue.
            None if attempted.load(Ordering::SeqCst) => {
                info!("released at shutdown");
                self.queue
                    .change_visibility(&message.receipt, Duration::ZERO)
                    .await
            }
            None => {
                info!("released at shutdown before any attempt; its receive unspent");
                self.queue.release(&message).await
            }
        };
        match result {
            Ok(true) => {}
            Ok(false) => warn!(
                ?disposal,
                "the receipt was stale: the message was received again"
            ),
            Err(e) => {
                warn!(?disposal, error = %format!("{e:#}"), "could not let go of the message; it will come back")
            }
        }
    }

    /// Handle one message and say what to do with it.
    async fn handle(&self, message: &Received, attempted: &AtomicBool) -> Disposal {
        let objects = match notification::parse(&message.body) {
            Ok(Notification::Test) => {
                info!("storage test event");
                return Disposal::Delete;
            }
            Ok(Notification::Created(objects)) => objects,
            Err(e) => {
                warn!(error = %e, "not a storage notification");
                return Disposal::DeadLetter;
            }
        };
        // S3 sends one record per message; should there be several, the message goes
        // when all are done.
        let mut disposal = Disposal::Delete;
        for object in &objects {
            let d = match self
                .object_created(object, message.receive_count, attempted)
                .await
            {
                Ok(d) => d,
                Err(e) if message.given_back < MAX_GIVE_BACKS => {
                    warn!(error = %format!("{e:#}"), key = %object.key, given_back = message.given_back, "infrastructure failure before any attempt; giving the message back");
                    Disposal::GiveBack(self.give_back_after(message.given_back))
                }
                Err(e) => {
                    // Failing this long is no outage: count the receive like an attempt,
                    // so that the queue's limit ends it.
                    tracing::error!(error = %format!("{e:#}"), key = %object.key, given_back = message.given_back, "still failing after {MAX_GIVE_BACKS} give-backs; spending the receive");
                    Disposal::Retry(self.retry_after(message.receive_count))
                }
            };
            disposal = disposal.max(d);
        }
        disposal
    }

    /// The delay of the `n`th give-back (from 0): the retry delay doubled each time, up to
    /// SQS's longest delay (15 min). The first ten cover about 50 minutes at the default.
    fn give_back_after(&self, n: u32) -> Duration {
        (self.settings.retry_delay * 2u32.pow(n.min(8))).min(Duration::from_secs(900))
    }

    fn retry_after(&self, receive_count: u32) -> Duration {
        let doublings = receive_count.saturating_sub(1).min(6);
        (self.settings.retry_delay * 2u32.pow(doublings)).min(Duration::from_secs(300))
    }

    async fn object_created(
        &self,
        object: &ObjectCreated,
        receive_count: u32,
        attempted: &AtomicBool,
    ) -> Result<Disposal> {
        if let Some(bucket) = &object.bucket
            && bucket != self.objects.bucket()
        {
            warn!(%bucket, "a notification from another bucket");
            return Ok(Disposal::Delete);
        }
        let Some((key, _owner, document)) = ObjectKey::parse(&object.key) else {
            warn!(key = %object.key, "not a document key");
            return Ok(Disposal::Delete);
        };
        tracing::Span::current().record("document_id", tracing::field::display(document));
        let meta = CommandMeta::system("worker");
        let Some(info) = self.objects.head(&key).await? else {
            info!("the object is gone");
            return Ok(Disposal::Delete);
        };
        let (bytes, sniffed) = match self
            .objects
            .get(&key, &info.etag, self.settings.max_bytes)
            .await?
        {
            Fetched::Body(bytes) => {
                let sniffed = sniff(&bytes);
                (Some(bytes), sniffed)
            }
            // Larger than this worker reads: the confirmation refuses it as too large.
            Fetched::TooLarge { .. } => (None, domain::Sniffed::Unread),
            Fetched::Missing => {
                info!("the object is gone");
                return Ok(Disposal::Delete);
            }
            Fetched::Changed => {
                // Replaced since the HEAD: the new object's own notification comes.
                info!("the object changed while being read");
                return Ok(Disposal::Delete);
            }
        };
        let confirmation = match self
            .documents
            .confirm_upload(document, info.size, &info.etag, sniffed, &meta)
            .await
        {
            Ok(c) => c,
            Err(CommandError::Rejected(DocumentError::NotFound)) => {
                warn!("an object for a document that was never requested");
                return Ok(Disposal::Delete);
            }
            Err(CommandError::Rejected(e)) => {
                warn!(error = %e, "the upload could not be confirmed");
                return Ok(Disposal::Delete);
            }
            Err(e) => return Err(anyhow::Error::new(e).context("confirming the upload")),
        };
        match confirmation {
            Confirmation::Job(job) => match bytes {
                Some(bytes) => {
                    self.run_job(job, receive_count, bytes, &meta, attempted)
                        .await
                }
                None => Ok(Disposal::Delete),
            },
            Confirmation::Rejected(reason) => {
                info!(?reason, "upload refused; deleting the object");
                self.objects.delete(&key).await?;
                Ok(Disposal::Delete)
            }
            Confirmation::Gone => {
                self.objects.delete(&key).await?;
                Ok(Disposal::Delete)
            }
            Confirmation::Ignored => {
                // Upload URLs write once, so another object under a confirmed document's
                // key was put there some other way (direct write access to the bucket).
                // The analysis stands for the confirmed ETag only; say so loudly.
                warn!(etag = %info.etag, "the object is not the one confirmed for its document (replaced outside its upload URL); ignored");
                Ok(Disposal::Delete)
            }
        }
    }

    async fn run_job(
        &self,
        job: JobId,
        receive_count: u32,
        bytes: Vec<u8>,
        meta: &CommandMeta,
        attempted: &AtomicBool,
    ) -> Result<Disposal> {
        tracing::Span::current().record("job_id", tracing::field::display(job));
        let started = match self
            .documents
            .start_job(job, receive_count, &self.settings.worker_id, meta)
            .await
        {
            Ok(s) => s,
            Err(CommandError::Rejected(AiJobError::Finished)) => {
                let status = self.documents.job(job).await?.state.status;
                info!(?status, "the job has finished");
                return Ok(if status == JobStatus::DeadLettered {
                    Disposal::DeadLetter
                } else {
                    Disposal::Delete
                });
            }
            Err(CommandError::Rejected(AiJobError::AlreadyStarted)) => {
                // Another delivery runs this attempt. It may be another copy of this
                // very message (SQS delivers at least once), and deleting ours would
                // delete the message under it: wait for the outcome instead.
                info!("a duplicate delivery of a running attempt: waiting for its outcome");
                return self.await_outcome(job, receive_count).await;
            }
            Err(CommandError::Rejected(e)) => {
                warn!(error = %e, "the job cannot start");
                return Ok(Disposal::Delete);
            }
            Err(e) => return Err(anyhow::Error::new(e).context("starting the job")),
        };
        attempted.store(true, Ordering::SeqCst);
        // From here on the attempt counts: a failure to store its outcome spends the
        // receive (the next one is a new attempt) rather than giving it back.
        match self
            .attempt(
                job,
                receive_count,
                started.attempt,
                bytes,
                started.content_type,
                meta,
            )
            .await
        {
            Ok(d) => Ok(d),
            Err(e) => {
                warn!(attempt = started.attempt, error = %format!("{e:#}"), "the attempt's outcome could not be stored; retrying");
                Ok(Disposal::Retry(self.retry_after(receive_count)))
            }
        }
    }

    /// A duplicate delivery waits (heartbeat running) until the attempt it duplicates
    /// has an outcome. Finished job: it goes. Attempt failed (or a later one began): it
    /// comes back after the retry delay, as a later attempt if one is due (not deleted:
    /// it may be the very message the attempt held). No outcome within a visibility
    /// timeout: the delivery that ran the attempt is presumed dead, and this one comes
    /// back at once as the next attempt.
    async fn await_outcome(&self, job: JobId, receive_count: u32) -> Result<Disposal> {
        let began = std::time::Instant::now();
        let mut duplicated = None;
        loop {
            let state = self.documents.job(job).await?.state;
            let attempt = *duplicated.get_or_insert(state.attempt_base + receive_count);
            if matches!(state.status, JobStatus::Succeeded | JobStatus::DeadLettered) {
                info!(status = ?state.status, "the duplicated attempt has finished; dropping this copy");
                return Ok(Disposal::Delete);
            }
            if state.last_outcome >= attempt || state.attempt > attempt {
                info!(
                    attempt,
                    "the duplicated attempt has ended without finishing the job"
                );
                return Ok(Disposal::Retry(self.retry_after(receive_count)));
            }
            if began.elapsed() >= self.settings.visibility {
                warn!(
                    attempt,
                    "no outcome from the duplicated attempt; this copy becomes the next"
                );
                return Ok(Disposal::Retry(Duration::ZERO));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn attempt(
        &self,
        job: JobId,
        receive_count: u32,
        attempt: u32,
        bytes: Vec<u8>,
        content_type: domain::ContentType,
        meta: &CommandMeta,
    ) -> Result<Disposal> {
        let started_attempt = attempt;
        let began = std::time::Instant::now();
        match self.analyzer.analyze(bytes, content_type).await {
            Ok(analysis) => {
                self.documents
                    .job_succeeded(job, started_attempt, analysis, meta)
                    .await
                    .map_err(|e| anyhow::Error::new(e).context("storing the analysis"))?;
                info!(
                    attempt = started_attempt,
                    ms = began.elapsed().as_millis() as u64,
                    "job succeeded"
                );
                Ok(Disposal::Delete)
            }
            Err(e) => {
                let retryable = e.retryable();
                let dead = self
                    .documents
                    .job_failed(job, started_attempt, &e.to_string(), retryable, meta)
                    .await
                    .map_err(|e| anyhow::Error::new(e).context("storing the failure"))?;
                warn!(attempt = started_attempt, retryable, dead_lettered = dead, error = %e, "job attempt failed");
                Ok(if dead {
                    Disposal::DeadLetter
                } else {
                    Disposal::Retry(self.retry_after(receive_count))
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_concurrency_is_two_per_cpu_within_memory() {
        const GIB: u64 = 1 << 30;
        // Plenty of memory: two slots per CPU.
        assert_eq!(concurrency_for(2, Some(24 * GIB), GIB), 4);
        assert_eq!(concurrency_for(2, None, GIB), 4);
        // A 4 GiB host with 1 GiB children: three, after the worker's own reserve.
        assert_eq!(concurrency_for(2, Some(4 * GIB), GIB), 3);
        assert_eq!(concurrency_for(8, Some(4 * GIB), 256 << 20), 14);
        // Never none, however little memory.
        assert_eq!(concurrency_for(2, Some(GIB / 2), GIB), 1);
        assert_eq!(concurrency_for(0, None, GIB), 2);
    }

    #[test]
    fn the_memory_limit_is_the_lowest_on_the_way_up_the_cgroups() {
        let files = |path: &str| -> Option<String> {
            match path {
                "/sys/fs/cgroup/system.slice/memory.max" => Some("3221225472\n".into()),
                "/sys/fs/cgroup/system.slice/karmic-worker.service/memory.max" => {
                    Some("max\n".into())
                }
                "/sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes" => {
                    Some("1073741824\n".into())
                }
                _ => None,
            }
        };
        let v2: Vec<u64> =
            cgroup_limits("0::/system.slice/karmic-worker.service\n", files).collect();
        assert_eq!(v2, vec![3 << 30]);
        let v1: Vec<u64> =
            cgroup_limits("12:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n", files).collect();
        assert_eq!(v1, vec![1 << 30]);
        assert_eq!(cgroup_limits("", files).count(), 0);
    }
}
