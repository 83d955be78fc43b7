//! Operating the dead-letter queue (`karmic dlq`): see what failed, send it round again,
//! throw it away, or re-enqueue from the event store what the queue no longer holds.
//!
//! The event store is the record. A redrive first appends `JobRedriven` (who, when, why,
//! which dead letter), then sends the message to the job queue, and only then deletes the
//! dead letter, so a redrive cut short at any point is finished by running it again:
//! the job knows which dead letter its last redrive re-sent, and a second `JobRedriven`
//! for the same dead letter is never written. The one thing a rerun cannot know is
//! whether a send just before the cut went through, so it sends again; the copies meet at
//! the job, which starts each attempt once (a copy of a started attempt waits for its
//! outcome, then goes), so a redrive never runs the job twice.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use commands::documents::Documents;
use commands::{CommandMeta, Database};
use domain::{DocumentId, JobId, JobStatus, ObjectKey};
use serde::Serialize;

use crate::notification::{self, Notification};
use crate::queue::{DeadLetterQueue, JobQueue, Received};

/// How long a dead letter stays hidden from other takers while one command works on it.
const HOLD: Duration = Duration::from_secs(300);

/// Each take is a long poll this long: a short poll on SQS samples only some of its
/// servers and can come back empty while messages wait.
const TAKE_WAIT: Duration = Duration::from_secs(1);

/// One dead letter as `dlq list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    pub message_id: String,
    pub job_id: Option<String>,
    pub document_id: Option<String>,
    /// The job's status in the event store.
    pub status: Option<JobStatus>,
    /// Attempts the job has started, in all.
    pub attempts: u32,
    pub last_error: Option<String>,
    /// When the job's last `JobDeadLettered` was recorded.
    pub dead_lettered_at: Option<DateTime<Utc>>,
    /// Anything an operator should know (not a job's message, a stale copy, …).
    pub note: Option<String>,
    /// The message as it sits in the queue.
    pub body: String,
}

/// What to redrive.
#[derive(Debug, Clone, Default)]
pub struct RedriveOptions {
    /// Only these jobs (`--id`); all when empty.
    pub jobs: Vec<JobId>,
    /// At most this many (`--max`).
    pub max: Option<u64>,
    pub dry_run: bool,
    pub by: String,
    pub reason: String,
}

/// What a redrive (or a replay) did, message by message.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RedriveReport {
    /// Sent round again (job id, dead-letter message id or `events`).
    pub redriven: Vec<Outcome>,
    /// Dead letters removed without a send (stale copies of finished or already redriven
    /// jobs).
    pub dropped: Vec<Outcome>,
    /// Left where they are, with why.
    pub left: Vec<Outcome>,
    pub dry_run: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub message_id: Option<String>,
    pub job_id: Option<String>,
    pub note: String,
}

/// The operator's side of the queues.
pub struct Dlq {
    pub queue: Arc<dyn JobQueue>,
    pub dead: Arc<dyn DeadLetterQueue>,
    pub documents: Documents,
    pub db: Database,
    /// The bucket whose notifications the worker takes (for messages built from events).
    pub bucket: String,
    /// A job recorded as running or queued whose last event is older than this has no
    /// live attempt (the queue's visibility timeout).
    pub stale_after: Duration,
}

/// What a dead letter is about.
struct Resolved {
    job: Option<JobId>,
    document: Option<DocumentId>,
    note: Option<String>,
}

impl Dlq {
    /// Which job a dead letter's storage notification is for.
    async fn resolve(&self, body: &str) -> Result<Resolved> {
        let none = |note: &str| Resolved {
            job: None,
            document: None,
            note: Some(note.to_owned()),
        };
        let objects = match notification::parse(body) {
            Ok(Notification::Created(objects)) => objects,
            Ok(Notification::Test) => return Ok(none("a storage test event")),
            Err(e) => return Ok(none(&format!("not a storage notification: {e}"))),
        };
        let Some(object) = objects.first() else {
            return Ok(none("a notification without an ObjectCreated record"));
        };
        let Some((_, _, document)) = ObjectKey::parse(&object.key) else {
            return Ok(none(&format!("not a document key: {}", object.key)));
        };
        let doc = self.documents.document(document).await?.state;
        let Some(etag) = doc.etag.as_deref() else {
            return Ok(Resolved {
                job: None,
                document: Some(document),
                note: Some("the document has no confirmed upload".to_owned()),
            });
        };
        Ok(Resolved {
            job: Some(JobId::for_object(document, etag)),
            document: Some(document),
            note: None,
        })
    }

    /// When the job's last `JobDeadLettered` was recorded, and when its last event was.
    async fn times(&self, job: JobId) -> Result<(Option<DateTime<Utc>>, Option<DateTime<Utc>>)> {
        let history = commands::audit::history(&self.db, "ai_job", &job.to_string()).await?;
        let dead = history
            .iter()
            .rev()
            .find(|e| e.event.event_type == "JobDeadLettered")
            .map(|e| e.event.recorded_at);
        Ok((dead, history.last().map(|e| e.event.recorded_at)))
    }

    async fn entry(&self, m: &Received) -> Result<Entry> {
        let r = self.resolve(&m.body).await?;
        let mut e = Entry {
            message_id: m.id.clone(),
            job_id: r.job.map(|j| j.to_string()),
            document_id: r.document.map(|d| d.to_string()),
            status: None,
            attempts: 0,
            last_error: None,
            dead_lettered_at: None,
            note: r.note,
            body: m.body.clone(),
        };
        if let Some(job) = r.job {
            let state = self.documents.job(job).await?.state;
            e.status = Some(state.status);
            e.attempts = state.attempt;
            e.last_error = state.last_error.clone();
            e.dead_lettered_at = self.times(job).await?.0;
            e.note = match state.status {
                JobStatus::None => Some("no such job in the event store".to_owned()),
                JobStatus::Succeeded => {
                    Some("the job succeeded: a stale copy (redrive drops it)".to_owned())
                }
                JobStatus::DeadLettered => None,
                _ if state.redriven_from.as_deref() == Some(m.id.as_str()) => {
                    Some("redriven; the redrive was cut short (redrive finishes it)".to_owned())
                }
                _ => Some("the event store has not recorded it as dead-lettered".to_owned()),
            };
        }
        Ok(e)
    }

    /// Every dead letter, taken and given straight back (on SQS they stay hidden for a
    /// moment if this process dies in between).
    pub async fn list(&self) -> Result<Vec<Entry>> {
        let taken = self.take_all().await?;
        let mut out = Vec::with_capacity(taken.len());
        let mut failed = None;
        for m in &taken {
            match self.entry(m).await {
                Ok(e) => out.push(e),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        for m in &taken {
            self.dead.untake(&m.receipt).await?;
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// Take every message the dead-letter queue holds (each once). On an error, what
    /// was taken is given back.
    async fn take_all(&self) -> Result<Vec<Received>> {
        let mut seen = HashSet::new();
        let mut all: Vec<Received> = Vec::new();
        loop {
            match self.next_batch(&mut seen, &mut all).await {
                Ok(Some(batch)) => all.extend(batch),
                Ok(None) => return Ok(all),
                Err(e) => {
                    let _ = self.give_back(&all).await;
                    return Err(e);
                }
            }
        }
    }

    /// Delete every dead letter; returns how many. `progress(done)` after each.
    pub async fn purge(&self, progress: &(dyn Fn(u64) + Sync)) -> Result<u64> {
        let mut n = 0;
        let mut seen = HashSet::new();
        loop {
            let Some(batch) = self.next_batch(&mut seen, &mut []).await? else {
                return Ok(n);
            };
            for m in batch {
                if self.dead.remove(&m.receipt).await? {
                    n += 1;
                    progress(n);
                }
            }
        }
    }

    /// One job's dead letters (as `list` shows them) and its full history.
    pub async fn show(&self, job: JobId) -> Result<(Vec<Entry>, Vec<commands::audit::AuditEvent>)> {
        let id = job.to_string();
        let entries = self
            .list()
            .await?
            .into_iter()
            .filter(|e| e.job_id.as_deref() == Some(id.as_str()))
            .collect();
        let history = commands::audit::history(&self.db, "ai_job", &id).await?;
        Ok((entries, history))
    }

    /// Send dead letters round again (see the module documentation for the order of the
    /// steps and why a rerun is safe). `progress(done)` after each message. Whatever
    /// happens, every dead letter it took and did not remove is given back before it
    /// returns.
    pub async fn redrive(
        &self,
        options: &RedriveOptions,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<RedriveReport> {
        let bulk = options.jobs.is_empty() && options.max.is_none() && !options.dry_run;
        if !bulk {
            return self.pass(options, progress, Send::Now).await;
        }
        // Everything: record every redrive first, then let SQS move the dead letters back
        // in bulk (StartMessageMoveTask) where it can; where it cannot (the embedded
        // queue, an endpoint without the API), or when a dead letter must stay, a second
        // pass sends each recorded one (no new events: each job knows its dead letter).
        let recorded = self.pass(options, progress, Send::Later).await?;
        if recorded.left.is_empty()
            && !recorded.redriven.is_empty()
            && let Some(task) = self.dead.move_all_back().await?
        {
            let mut r = recorded;
            for o in &mut r.redriven {
                o.note = format!("{}; moved back by SQS StartMessageMoveTask {task}", o.note);
            }
            return Ok(r);
        }
        let mut sent = self.pass(options, progress, Send::Now).await?;
        for o in &mut sent.redriven {
            if let Some(first) = recorded
                .redriven
                .iter()
                .find(|r| r.message_id == o.message_id)
            {
                o.note.clone_from(&first.note);
            }
        }
        let mut dropped = recorded.dropped;
        dropped.append(&mut sent.dropped);
        sent.dropped = dropped;
        Ok(sent)
    }

    /// One pass over the dead-letter queue; every message taken and not removed is given
    /// back at the end, whatever happened.
    async fn pass(
        &self,
        options: &RedriveOptions,
        progress: &(dyn Fn(u64) + Sync),
        send: Send,
    ) -> Result<RedriveReport> {
        let mut held: Vec<Received> = Vec::new();
        let result = self
            .redrive_holding(options, progress, &mut held, send)
            .await;
        let given_back = self.give_back(&held).await;
        let report = result?;
        given_back?;
        Ok(report)
    }

    /// Make every message in `held` visible again.
    async fn give_back(&self, held: &[Received]) -> Result<()> {
        let mut first_error = None;
        for m in held {
            if let Err(e) = self.dead.untake(&m.receipt).await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Take the next batch, at least one long poll (a short poll on SQS samples only
    /// some servers and may come back empty while messages wait); ends after two empty
    /// takes in a row. A message seen before (its hold ran out during a long run) only
    /// has its receipt renewed in `held`.
    async fn next_batch(
        &self,
        seen: &mut HashSet<String>,
        held: &mut [Received],
    ) -> Result<Option<Vec<Received>>> {
        let mut empty = 0;
        loop {
            let batch = self.dead.take(10, TAKE_WAIT, HOLD).await?;
            if batch.is_empty() {
                empty += 1;
                if empty >= 2 {
                    return Ok(None);
                }
                continue;
            }
            let mut fresh = Vec::new();
            for m in batch {
                if seen.insert(m.id.clone()) {
                    fresh.push(m);
                } else if let Some(h) = held.iter_mut().find(|h| h.id == m.id) {
                    h.receipt = m.receipt;
                }
            }
            if !fresh.is_empty() {
                return Ok(Some(fresh));
            }
        }
    }

    async fn redrive_holding(
        &self,
        options: &RedriveOptions,
        progress: &(dyn Fn(u64) + Sync),
        held: &mut Vec<Received>,
        send: Send,
    ) -> Result<RedriveReport> {
        let meta = CommandMeta::system("dlq");
        let mut report = RedriveReport {
            dry_run: options.dry_run,
            ..RedriveReport::default()
        };
        let wanted: HashSet<String> = options.jobs.iter().map(JobId::to_string).collect();
        let mut seen = HashSet::new();
        let mut done_jobs: HashSet<JobId> = HashSet::new();
        let mut handled = 0u64;
        while let Some(batch) = self.next_batch(&mut seen, held).await? {
            for m in batch {
                if options
                    .max
                    .is_some_and(|max| report.redriven.len() as u64 >= max)
                {
                    held.push(m);
                    continue;
                }
                let r = self.resolve(&m.body).await?;
                let job_id = r.job.map(|j| j.to_string());
                if !wanted.is_empty() && !job_id.as_ref().is_some_and(|j| wanted.contains(j)) {
                    held.push(m);
                    continue;
                }
                let outcome = |note: &str| Outcome {
                    message_id: Some(m.id.clone()),
                    job_id: job_id.clone(),
                    note: note.to_owned(),
                };
                let Some(job) = r.job else {
                    report.left.push(outcome(&format!(
                        "{} (`dlq purge` removes it)",
                        r.note.as_deref().unwrap_or("not a job's message")
                    )));
                    held.push(m);
                    continue;
                };
                let state = self.documents.job(job).await?.state;
                let action = self.action(&m, job, &state, &done_jobs).await?;
                if options.dry_run {
                    match action {
                        Action::Redrive | Action::RecordThenRedrive | Action::Resend => {
                            done_jobs.insert(job);
                            report.redriven.push(outcome("would be redriven"))
                        }
                        Action::Drop(why) => report.dropped.push(outcome(why)),
                        Action::Leave(why) => report.left.push(outcome(why)),
                    }
                    held.push(m);
                    continue;
                }
                match action {
                    Action::Leave(why) => {
                        report.left.push(outcome(why));
                        held.push(m);
                        continue;
                    }
                    Action::Drop(why) => {
                        self.dead.remove(&m.receipt).await?;
                        report.dropped.push(outcome(why));
                    }
                    Action::Redrive | Action::RecordThenRedrive | Action::Resend => {
                        match self
                            .redrive_one(job, &m, &action, options, &meta, send)
                            .await
                        {
                            Ok(()) => {
                                done_jobs.insert(job);
                                if send == Send::Later {
                                    held.push(m.clone());
                                }
                                report.redriven.push(outcome(match action {
                                    Action::Resend => "redriven (finishing a redrive cut short)",
                                    Action::RecordThenRedrive => {
                                        "dead-lettering recorded, then redriven"
                                    }
                                    _ => "redriven",
                                }));
                            }
                            Err(OneFailed::Refused(why)) => {
                                // The job moved on between the look and the command
                                // (another operator, a worker): nothing was sent.
                                report.left.push(outcome(&why));
                                held.push(m);
                                continue;
                            }
                            Err(OneFailed::Failed(e)) => {
                                // Given back with the rest: the next run finishes it.
                                held.push(m);
                                return Err(e);
                            }
                        }
                    }
                }
                handled += 1;
                progress(handled);
            }
        }
        Ok(report)
    }

    /// What to do with dead letter `m` of `job`.
    async fn action(
        &self,
        m: &Received,
        job: JobId,
        state: &domain::AiJob,
        done_jobs: &HashSet<JobId>,
    ) -> Result<Action> {
        Ok(match state.status {
            // Dead-lettered again after this run redrove it: a new failure, for a later
            // redrive.
            JobStatus::DeadLettered if done_jobs.contains(&job) => {
                Action::Leave("dead-lettered again since this run redrove it")
            }
            _ if done_jobs.contains(&job) => {
                Action::Drop("a second copy of a job redriven in this run")
            }
            JobStatus::None => Action::Leave("no such job in the event store"),
            JobStatus::Succeeded => Action::Drop("the job succeeded: a stale copy"),
            JobStatus::DeadLettered => Action::Redrive,
            _ if state.redriven_from.as_deref() == Some(m.id.as_str()) => {
                if state.attempt > state.attempt_base {
                    // An attempt started after the redrive: its send went through; only
                    // the delete was cut off.
                    Action::Drop("redriven before; the job has started since")
                } else {
                    Action::Resend
                }
            }
            JobStatus::Queued if state.redrives > 0 && state.attempt == state.attempt_base => {
                Action::Drop(
                    "a copy of a job already redriven and waiting to run (if its message was \
                     lost, `dlq replay --from-events` sends it again)",
                )
            }
            _ => {
                let last = self.times(job).await?.1;
                let quiet = last.is_none_or(|t| {
                    Utc::now()
                        .signed_duration_since(t)
                        .to_std()
                        .unwrap_or_default()
                        >= self.stale_after
                });
                if quiet {
                    Action::RecordThenRedrive
                } else {
                    Action::Leave(
                        "the job is running or queued now; not dead-lettered in the event \
                         store (try again later)",
                    )
                }
            }
        })
    }

    /// The redrive of one dead letter: event(s) first, then the send, then the delete.
    async fn redrive_one(
        &self,
        job: JobId,
        m: &Received,
        action: &Action,
        options: &RedriveOptions,
        meta: &CommandMeta,
        send: Send,
    ) -> std::result::Result<(), OneFailed> {
        if matches!(action, Action::RecordThenRedrive) {
            self.documents
                .record_dead_lettered(
                    job,
                    "found in the dead-letter queue with no outcome recorded",
                    meta,
                )
                .await
                .map_err(|e| refused("recording the dead-lettering", e))?;
        }
        if !matches!(action, Action::Resend) {
            self.documents
                .redrive_job(job, &options.by, &options.reason, Some(&m.id), meta)
                .await
                .map_err(|e| refused("recording the redrive", e))?;
        }
        if send == Send::Later {
            return Ok(());
        }
        self.queue
            .send(&m.body)
            .await
            .map_err(|e| OneFailed::Failed(e.context("sending the job round again")))?;
        self.dead
            .remove(&m.receipt)
            .await
            .map_err(|e| OneFailed::Failed(e.context("deleting the dead letter")))?;
        Ok(())
    }

    /// Re-enqueue every job whose history ends dead-lettered (recorded at or after
    /// `since`), whether or not the queue still holds its message: the event store is
    /// the record. Each gets `JobRedriven` (from no dead letter) and a storage
    /// notification built from the job's own events. A job whose history ends in such a
    /// redrive (a replay cut short) is sent again without a second event.
    pub async fn replay_from_events(
        &self,
        since: Option<DateTime<Utc>>,
        options: &RedriveOptions,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<RedriveReport> {
        let meta = CommandMeta::system("dlq");
        let mut report = RedriveReport {
            dry_run: options.dry_run,
            ..RedriveReport::default()
        };
        let wanted: HashSet<String> = options.jobs.iter().map(JobId::to_string).collect();
        let candidates = dead_or_replayed_jobs(&self.db, since).await?;
        for (i, id) in candidates.iter().enumerate() {
            if !wanted.is_empty() && !wanted.contains(id) {
                continue;
            }
            if options
                .max
                .is_some_and(|max| report.redriven.len() as u64 >= max)
            {
                break;
            }
            let Ok(job) = JobId::parse(id) else {
                continue;
            };
            let state = self.documents.job(job).await?.state;
            let outcome = |note: &str| Outcome {
                message_id: None,
                job_id: Some(id.clone()),
                note: note.to_owned(),
            };
            let (Some(key), true) = (state.object_key.clone(), !state.etag.is_empty()) else {
                report
                    .left
                    .push(outcome("the job has no object to analyse"));
                continue;
            };
            // Redriven (from events or a dead letter) and never started since: the send
            // may not have happened (a replay or redrive cut short, its dead letter gone).
            let resend = state.status == JobStatus::Queued
                && state.redrives > 0
                && state.attempt == state.attempt_base;
            if state.status != JobStatus::DeadLettered && !resend {
                report
                    .left
                    .push(outcome("no longer dead-lettered (redriven or running)"));
                continue;
            }
            if options.dry_run {
                report.redriven.push(outcome("would be re-enqueued"));
                continue;
            }
            if state.status == JobStatus::DeadLettered {
                self.documents
                    .redrive_job(job, &options.by, &options.reason, None, &meta)
                    .await
                    .context("recording the redrive")?;
            }
            let body = object_created(&self.bucket, key.as_str(), &state.etag);
            self.queue
                .send(&body)
                .await
                .context("sending the job round again")?;
            report.redriven.push(outcome(if resend {
                "re-enqueued (finishing a replay cut short)"
            } else {
                "re-enqueued from the event store"
            }));
            progress(i as u64 + 1);
        }
        Ok(report)
    }
}

/// How one dead letter's redrive failed: refused by the job (it moved on: the message is
/// left for the operator), or the store or a queue failed (the run stops).
enum OneFailed {
    Refused(String),
    Failed(anyhow::Error),
}

fn refused(what: &str, e: commands::CommandError<domain::AiJobError>) -> OneFailed {
    match e {
        commands::CommandError::Rejected(why) => OneFailed::Refused(format!("{what}: {why}")),
        other => OneFailed::Failed(anyhow::Error::new(other).context(what.to_owned())),
    }
}

/// Whether a pass sends what it redrives, or only records it (the bulk move follows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Send {
    Now,
    Later,
}

enum Action {
    Redrive,
    RecordThenRedrive,
    Resend,
    Drop(&'static str),
    Leave(&'static str),
}

/// Jobs whose last event (late outcomes aside) is `JobDeadLettered` (recorded at or after
/// `since`) or `JobRedriven` (a redrive or replay that no attempt followed).
async fn dead_or_replayed_jobs(db: &Database, since: Option<DateTime<Utc>>) -> Result<Vec<String>> {
    // (Postgres's timestamps start in 4713 BC: the epoch stands for "ever".)
    let since = since.unwrap_or(DateTime::<Utc>::UNIX_EPOCH);
    let sql = "SELECT e.aggregate_id FROM events e
                WHERE e.aggregate_type = 'ai_job'
                  AND e.event_type IN ('JobDeadLettered', 'JobRedriven')
                  AND e.sequence = (SELECT max(m.sequence) FROM events m
                                     WHERE m.aggregate_type = 'ai_job'
                                       AND m.aggregate_id = e.aggregate_id
                                       -- recorded after the end, changes nothing
                                       AND m.event_type <> 'LateOutcomeRecorded')";
    let rows: Vec<(String,)> = match db {
        Database::Postgres(p) => {
            sqlx::query_as(&format!(
                "{sql} AND e.recorded_at >= $1 ORDER BY e.recorded_at"
            ))
            .bind(since)
            .fetch_all(p)
            .await
        }
        Database::Sqlite(p) => {
            sqlx::query_as(&format!(
                "{sql} AND e.recorded_at >= ? ORDER BY e.recorded_at"
            ))
            .bind(commands::chain::format_time(since))
            .fetch_all(p)
            .await
        }
    }
    .context("finding dead-lettered jobs")?;
    Ok(rows.into_iter().map(|(id,)| id).collect())
}

/// A storage notification for one object, as S3 would send it (the fields the worker
/// reads).
fn object_created(bucket: &str, key: &str, etag: &str) -> String {
    serde_json::json!({
        "Records": [{
            "eventVersion": "2.1",
            "eventSource": "aws:s3",
            "eventTime": Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "eventName": "ObjectCreated:Put",
            "s3": {
                "s3SchemaVersion": "1.0",
                "configurationId": "karmic-replay",
                "bucket": {"name": bucket, "arn": format!("arn:aws:s3:::{bucket}")},
                "object": {"key": key, "eTag": etag},
            },
        }],
    })
    .to_string()
}
