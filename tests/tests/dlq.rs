//! Operating the dead-letter queue (`worker::dlq`, `karmic dlq`), on the embedded queue
//! (SQLite store) and on SQS (moto, Postgres store): list what failed, redrive it with an
//! event first, finish a redrive cut short without a second event or a second run, drop
//! stale copies, record dead-letterings the store missed, purge, and re-enqueue from the
//! event store what the queue no longer holds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use commands::documents::{Confirmation, Documents};
use commands::{CommandMeta, Database, NoAfterCommit};
use domain::{
    AiJobError, AiJobEvent, ContentType, DocumentSize, FileName, JobId, JobStatus, Sniffed, UserId,
};
use serde_json::Value;
use tests::{Backend, TestDb};
use worker::dlq::{Dlq, RedriveOptions};
use worker::queue::{DeadLetterQueue, JobQueue, Received, SqliteQueue};

const BUCKET: &str = "karmic-documents";

struct Setup {
    _db: TestDb,
    store: Database,
    documents: Documents,
    queue: Arc<dyn JobQueue>,
    dead: Arc<dyn DeadLetterQueue>,
    /// The SQS job queue's URL (moto).
    queue_url: Option<String>,
}

impl Setup {
    async fn new(on_sqs: bool) -> Setup {
        let db = TestDb::new(if on_sqs {
            Backend::Postgres
        } else {
            Backend::Sqlite
        })
        .await;
        let store = db.connect().await;
        let documents = Documents::new(&store, Arc::new(NoAfterCommit), 3);
        let mut queue_url_out = None;
        let (queue, dead): (Arc<dyn JobQueue>, Arc<dyn DeadLetterQueue>) = if on_sqs {
            let endpoint = std::env::var("KARMIC_TEST_MOTO_URL")
                .unwrap_or_else(|_| "http://127.0.0.1:5000".to_owned());
            let credentials = Some(("test".to_owned(), "test".to_owned().into()));
            let client = worker::sqs::client(
                Some(&endpoint),
                "us-east-1",
                credentials.as_ref(),
                Duration::from_secs(30),
            )
            .await;
            let name = format!("dlq-{}", uuid::Uuid::new_v4().simple());
            let (queue_url, _) = worker::sqs::create_with_dead_letter_queue(
                &client,
                &name,
                4,
                Duration::from_secs(30),
            )
            .await
            .expect("moto must be running (scripts/services.sh)");
            queue_url_out = Some(queue_url.clone());
            let q = Arc::new(
                worker::sqs::SqsQueue::connect(&worker::sqs::SqsSettings {
                    endpoint: Some(endpoint),
                    queue_url,
                    dead_letter_url: None,
                    region: "us-east-1".to_owned(),
                    credentials,
                    operation_timeout: Duration::from_secs(30),
                })
                .await
                .unwrap(),
            );
            (q.clone(), q)
        } else {
            let Database::Sqlite(pool) = &store else {
                unreachable!()
            };
            let q = Arc::new(SqliteQueue::new(pool.clone(), "documents", 4));
            (q.clone(), q)
        };
        Setup {
            _db: db,
            store,
            documents,
            queue,
            dead,
            queue_url: queue_url_out,
        }
    }

    fn dlq(&self, stale_after: Duration) -> Dlq {
        Dlq {
            queue: self.queue.clone(),
            dead: self.dead.clone(),
            documents: self.documents.clone(),
            db: self.store.clone(),
            bucket: BUCKET.to_owned(),
            stale_after,
        }
    }

    /// A confirmed upload and its job; returns the job and the notification's body.
    async fn job(&self) -> (JobId, String) {
        let meta = CommandMeta::system("test");
        let (document, key) = self
            .documents
            .request_upload(
                UserId::new_v7(),
                FileName::parse("report.pdf").unwrap(),
                ContentType::Pdf,
                DocumentSize::parse(1000, 25 << 20).unwrap(),
                &meta,
            )
            .await
            .unwrap();
        let etag = format!("{:032x}", rand_u128());
        let Confirmation::Job(job) = self
            .documents
            .confirm_upload(document, 1000, &etag, Sniffed::Pdf, &meta)
            .await
            .unwrap()
        else {
            panic!("no job")
        };
        let body = serde_json::json!({"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
            "s3": {"bucket": {"name": BUCKET}, "object": {"key": key.as_str(), "size": 1000, "eTag": etag}}}]})
        .to_string();
        (job, body)
    }

    /// A job whose one attempt failed for good, its message in the dead-letter queue.
    async fn dead_letter(&self) -> (JobId, String) {
        let (job, body) = self.job().await;
        let meta = CommandMeta::system("test");
        self.documents.start_job(job, 1, "w1", &meta).await.unwrap();
        assert!(
            self.documents
                .job_failed(job, 1, "corrupt: no trailer", false, &meta)
                .await
                .unwrap()
        );
        self.put_in_dlq(&body).await;
        (job, body)
    }

    /// Send `body` and move it to the dead-letter queue as a worker would.
    async fn put_in_dlq(&self, body: &str) {
        self.queue.send(body).await.unwrap();
        let m = self.receive_one().await;
        assert!(self.queue.dead_letter(&m).await.unwrap());
    }

    async fn receive_one(&self) -> Received {
        for _ in 0..20 {
            let got = self
                .queue
                .receive(1, Duration::from_secs(1), Duration::from_secs(30))
                .await
                .unwrap();
            if let Some(m) = got.into_iter().next() {
                return m;
            }
        }
        panic!("no message arrived")
    }

    /// Everything the job queue holds now (taken and deleted).
    async fn drain(&self) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            let got = self
                .queue
                .receive(10, Duration::from_millis(1500), Duration::from_secs(30))
                .await
                .unwrap();
            if got.is_empty() {
                return out;
            }
            for m in got {
                self.queue.delete(&m.receipt).await.unwrap();
                out.push(m.body);
            }
        }
    }

    async fn events(&self, job: JobId) -> Vec<AiJobEvent> {
        self.store
            .aggregates::<domain::AiJob>()
            .events(&job.to_string())
            .await
            .unwrap()
            .into_iter()
            .map(|(_, e)| e)
            .collect()
    }
}

fn rand_u128() -> u128 {
    uuid::Uuid::new_v4().as_u128()
}

fn options(reason: &str) -> RedriveOptions {
    RedriveOptions {
        by: "operator:ann".into(),
        reason: reason.into(),
        ..RedriveOptions::default()
    }
}

fn redrives(events: &[AiJobEvent]) -> Vec<(String, String, Option<String>)> {
    events
        .iter()
        .filter_map(|e| match e {
            AiJobEvent::JobRedriven {
                by,
                reason,
                message,
            } => Some((by.clone(), reason.clone(), message.clone())),
            _ => None,
        })
        .collect()
}

async fn list_shows_jobs_and_redrive_records_then_sends_then_deletes(on_sqs: bool) {
    let s = Setup::new(on_sqs).await;
    let (job, body) = s.dead_letter().await;
    let (other, _) = s.dead_letter().await;
    let dlq = s.dlq(Duration::from_secs(600));

    let list = dlq.list().await.unwrap();
    assert_eq!(list.len(), 2, "{list:?}");
    let e = list
        .iter()
        .find(|e| e.job_id.as_deref() == Some(job.to_string().as_str()))
        .unwrap();
    assert_eq!(e.status, Some(JobStatus::DeadLettered));
    assert_eq!(e.attempts, 1);
    assert_eq!(e.last_error.as_deref(), Some("corrupt: no trailer"));
    assert!(e.dead_lettered_at.is_some());
    assert!(e.note.is_none(), "{e:?}");
    assert_eq!(e.body, body);
    // Listing took nothing away.
    assert_eq!(dlq.list().await.unwrap().len(), 2);

    // A dry run changes nothing.
    let mut dry = options("dry");
    dry.dry_run = true;
    let r = dlq.redrive(&dry, &|_| {}).await.unwrap();
    assert_eq!(r.redriven.len(), 2, "{r:?}");
    assert!(redrives(&s.events(job).await).is_empty());
    assert_eq!(dlq.list().await.unwrap().len(), 2);

    // One job by id.
    let mut one = options("parser fixed");
    one.jobs = vec![job];
    let r = dlq.redrive(&one, &|_| {}).await.unwrap();
    assert_eq!(r.redriven.len(), 1, "{r:?}");
    let message = e.message_id.clone();
    assert_eq!(
        redrives(&s.events(job).await),
        vec![("operator:ann".into(), "parser fixed".into(), Some(message))]
    );
    assert_eq!(
        s.documents.job(job).await.unwrap().state.status,
        JobStatus::Queued
    );
    assert_eq!(s.drain().await, vec![body.clone()], "re-sent as it was");
    let left = dlq.list().await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].job_id.as_deref(), Some(other.to_string().as_str()));

    // Again: nothing for that job is left to redrive; the other is untouched.
    let r = dlq.redrive(&one, &|_| {}).await.unwrap();
    assert!(r.redriven.is_empty(), "{r:?}");
    assert_eq!(redrives(&s.events(job).await).len(), 1);
    assert!(redrives(&s.events(other).await).is_empty());

    // The redriven job's attempt numbering goes on: its receive count restarts at 1.
    let meta = CommandMeta::system("test");
    let started = s.documents.start_job(job, 1, "w2", &meta).await.unwrap();
    assert_eq!(started.attempt, 2);
}

async fn a_redrive_cut_short_is_finished_without_a_second_event_or_run(on_sqs: bool) {
    let s = Setup::new(on_sqs).await;
    let meta = CommandMeta::system("test");
    let dlq = s.dlq(Duration::from_secs(600));

    // Cut after the event, before the send.
    let (a, body_a) = s.dead_letter().await;
    let id_a = dlq.list().await.unwrap()[0].message_id.clone();
    assert!(
        s.documents
            .redrive_job(a, "operator:ann", "first try", Some(&id_a), &meta)
            .await
            .unwrap()
    );
    let r = dlq.redrive(&options("second try"), &|_| {}).await.unwrap();
    assert_eq!(r.redriven.len(), 1, "{r:?}");
    assert!(r.redriven[0].note.contains("cut short"), "{r:?}");
    assert_eq!(
        redrives(&s.events(a).await).len(),
        1,
        "one event per redrive"
    );
    assert_eq!(s.drain().await, vec![body_a]);
    assert!(dlq.list().await.unwrap().is_empty());

    // Cut after the send, before the delete: the rerun cannot know the send went through
    // and sends again; the two copies meet at the job, which runs the attempt once.
    let (b, body_b) = s.dead_letter().await;
    let id_b = dlq.list().await.unwrap()[0].message_id.clone();
    s.documents
        .redrive_job(b, "operator:ann", "first try", Some(&id_b), &meta)
        .await
        .unwrap();
    s.queue.send(&body_b).await.unwrap();
    dlq.redrive(&options("second try"), &|_| {}).await.unwrap();
    assert_eq!(redrives(&s.events(b).await).len(), 1);
    let copies = s.drain().await;
    assert_eq!(copies, vec![body_b.clone(), body_b.clone()]);
    s.documents.start_job(b, 1, "w1", &meta).await.unwrap();
    assert!(matches!(
        s.documents.start_job(b, 1, "w2", &meta).await,
        Err(commands::CommandError::Rejected(AiJobError::AlreadyStarted))
    ));
    let started = s
        .events(b)
        .await
        .iter()
        .filter(|e| matches!(e, AiJobEvent::JobStarted { .. }))
        .count();
    assert_eq!(started, 2, "attempt 1, then one run after the redrive");

    // Cut after the send, and the job has started since: its send went through, so the
    // rerun only deletes the dead letter.
    let (c, body_c) = s.dead_letter().await;
    let id_c = dlq.list().await.unwrap()[0].message_id.clone();
    s.documents
        .redrive_job(c, "operator:ann", "first try", Some(&id_c), &meta)
        .await
        .unwrap();
    s.queue.send(&body_c).await.unwrap();
    assert_eq!(s.drain().await, vec![body_c]);
    s.documents.start_job(c, 1, "w1", &meta).await.unwrap();
    let r = dlq.redrive(&options("second try"), &|_| {}).await.unwrap();
    assert_eq!((r.redriven.len(), r.dropped.len()), (0, 1), "{r:?}");
    assert!(s.drain().await.is_empty());
    assert!(dlq.list().await.unwrap().is_empty());
    assert_eq!(redrives(&s.events(c).await).len(), 1);

    // A copy of a job that is running now (not this redrive's dead letter) is left.
    s.put_in_dlq(&body_b).await;
    let r = dlq.redrive(&options("third"), &|_| {}).await.unwrap();
    assert_eq!((r.redriven.len(), r.left.len()), (0, 1), "{r:?}");
    assert_eq!(redrives(&s.events(b).await).len(), 1);
}

async fn stale_copies_go_strangers_stay_and_missed_dead_letterings_are_recorded(on_sqs: bool) {
    let s = Setup::new(on_sqs).await;
    let meta = CommandMeta::system("test");
    // A copy of a job that succeeded.
    let (done, body) = s.job().await;
    s.documents.start_job(done, 1, "w1", &meta).await.unwrap();
    s.documents
        .job_succeeded(done, 1, domain::Analysis::default(), &meta)
        .await
        .unwrap();
    s.put_in_dlq(&body).await;
    // A message that is no storage notification.
    s.put_in_dlq("{\"not\": \"a notification\"}").await;
    // A job the queue dead-lettered while the store still shows it running (a worker
    // killed on its last receive).
    let (orphan, orphan_body) = s.job().await;
    s.documents.start_job(orphan, 1, "w1", &meta).await.unwrap();
    s.put_in_dlq(&orphan_body).await;

    // While the job may still be running, it is left alone.
    let r = s
        .dlq(Duration::from_secs(600))
        .redrive(&options("x"), &|_| {})
        .await
        .unwrap();
    assert_eq!(
        (r.redriven.len(), r.dropped.len(), r.left.len()),
        (0, 1, 2),
        "{r:?}"
    );
    assert!(s.drain().await.is_empty());

    // Once it has been quiet for a visibility timeout: its dead-lettering is recorded,
    // then it is redriven.
    let dlq = s.dlq(Duration::ZERO);
    let r = dlq.redrive(&options("worker died"), &|_| {}).await.unwrap();
    assert_eq!((r.redriven.len(), r.left.len()), (1, 1), "{r:?}");
    let events = s.events(orphan).await;
    assert!(matches!(
        events[events.len() - 2],
        AiJobEvent::JobDeadLettered { .. }
    ));
    assert!(matches!(
        events[events.len() - 1],
        AiJobEvent::JobRedriven { .. }
    ));
    assert_eq!(s.drain().await, vec![orphan_body]);

    let list = dlq.list().await.unwrap();
    assert_eq!(list.len(), 1);
    assert!(
        list[0]
            .note
            .as_deref()
            .unwrap()
            .contains("not a storage notification")
    );
    assert_eq!(dlq.purge(&|_| {}).await.unwrap(), 1);
    assert!(dlq.list().await.unwrap().is_empty());
}

async fn replay_from_events_reenqueues_what_the_queue_no_longer_holds(on_sqs: bool) {
    let s = Setup::new(on_sqs).await;
    let (a, _) = s.dead_letter().await;
    let (b, _) = s.dead_letter().await;
    let dlq = s.dlq(Duration::from_secs(600));
    // The dead letters expire (SQS keeps them 14 days at most).
    assert_eq!(dlq.purge(&|_| {}).await.unwrap(), 2);

    let mut one = options("replayed");
    one.jobs = vec![a];
    let r = dlq.replay_from_events(None, &one, &|_| {}).await.unwrap();
    assert_eq!(r.redriven.len(), 1, "{r:?}");
    assert_eq!(
        redrives(&s.events(a).await),
        vec![("operator:ann".into(), "replayed".into(), None)]
    );
    let sent = s.drain().await;
    assert_eq!(sent.len(), 1);
    // The worker reads it as the storage notification of the job's object.
    let n: Value = serde_json::from_str(&sent[0]).unwrap();
    let state = s.documents.job(a).await.unwrap().state;
    assert_eq!(
        n["Records"][0]["s3"]["object"]["key"],
        state.object_key.unwrap().as_str()
    );
    let parsed = worker::notification::parse(&sent[0]).unwrap();
    assert!(matches!(parsed, worker::notification::Notification::Created(ref o) if o.len() == 1));

    // Only jobs dead-lettered since a time: none after now.
    let later = chrono::Utc::now() + chrono::Duration::seconds(5);
    let r = dlq
        .replay_from_events(Some(later), &options("later"), &|_| {})
        .await
        .unwrap();
    assert!(r.redriven.is_empty(), "{r:?}");

    // All: `b` now; `a` is queued again with no attempt since its replay, so it is sent
    // again (a replay cut short before its send is finished this way) without a second
    // event.
    let r = dlq
        .replay_from_events(None, &options("all"), &|_| {})
        .await
        .unwrap();
    assert_eq!(r.redriven.len(), 2, "{r:?}");
    assert_eq!(redrives(&s.events(a).await).len(), 1);
    assert_eq!(redrives(&s.events(b).await).len(), 1);
    assert_eq!(s.drain().await.len(), 2);
    // Once a job has started again, a replay leaves it be.
    let meta = CommandMeta::system("test");
    s.documents.start_job(a, 1, "w1", &meta).await.unwrap();
    s.documents.start_job(b, 1, "w1", &meta).await.unwrap();
    let r = dlq
        .replay_from_events(None, &options("again"), &|_| {})
        .await
        .unwrap();
    assert!(r.redriven.is_empty(), "{r:?}");
}

async fn several_copies_of_one_job_give_one_redrive(on_sqs: bool) {
    let s = Setup::new(on_sqs).await;
    let (job, body) = s.dead_letter().await;
    s.put_in_dlq(&body).await;
    let (other, _) = s.dead_letter().await;
    let dlq = s.dlq(Duration::from_secs(600));
    assert_eq!(dlq.list().await.unwrap().len(), 3);

    // --max 1 with one job named: one redrive, the rest given back at once.
    let mut one = options("first");
    one.jobs = vec![job];
    one.max = Some(1);
    let r = dlq.redrive(&one, &|_| {}).await.unwrap();
    assert_eq!(r.redriven.len(), 1, "{r:?}");
    assert_eq!(dlq.list().await.unwrap().len(), 2, "nothing left hidden");
    // The job's other copy, while the redrive's message waits to run: dropped, with no
    // second event; the other job is redriven.
    let r = dlq.redrive(&options("second"), &|_| {}).await.unwrap();
    assert_eq!((r.redriven.len(), r.dropped.len()), (1, 1), "{r:?}");
    assert_eq!(redrives(&s.events(job).await).len(), 1);
    assert_eq!(redrives(&s.events(other).await).len(), 1);
    assert_eq!(s.drain().await.len(), 2);

    // Two copies in one run: one redrive, the second copy dropped.
    let s = Setup::new(on_sqs).await;
    let (job, body) = s.dead_letter().await;
    s.put_in_dlq(&body).await;
    let dlq = s.dlq(Duration::from_secs(600));
    let r = dlq.redrive(&options("both"), &|_| {}).await.unwrap();
    assert_eq!((r.redriven.len(), r.dropped.len()), (1, 1), "{r:?}");
    assert_eq!(redrives(&s.events(job).await).len(), 1);
    assert_eq!(s.drain().await, vec![body]);
}

async fn replay_finds_jobs_with_late_outcomes_and_honours_since(on_sqs: bool) {
    let s = Setup::new(on_sqs).await;
    let meta = CommandMeta::system("test");
    // Attempt 1 timed out, attempt 2 failed for good, then attempt 1's failure arrived.
    let (job, _) = s.job().await;
    let before = chrono::Utc::now() - chrono::Duration::seconds(5);
    s.documents.start_job(job, 1, "w1", &meta).await.unwrap();
    s.documents.start_job(job, 2, "w2", &meta).await.unwrap();
    assert!(
        s.documents
            .job_failed(job, 2, "corrupt", false, &meta)
            .await
            .unwrap()
    );
    s.documents
        .job_failed(job, 1, "late", true, &meta)
        .await
        .unwrap();
    assert!(matches!(
        s.events(job).await.last(),
        Some(AiJobEvent::LateOutcomeRecorded { .. })
    ));
    let dlq = s.dlq(Duration::from_secs(600));
    let r = dlq
        .replay_from_events(Some(before), &options("since"), &|_| {})
        .await
        .unwrap();
    assert_eq!(r.redriven.len(), 1, "{r:?}");
    assert_eq!(redrives(&s.events(job).await).len(), 1);
    assert_eq!(s.drain().await.len(), 1);
}

macro_rules! on_both_queues {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() { super::$name(false).await }
            )*
        }
        mod sqs_on_moto {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() { super::$name(true).await }
            )*
        }
    };
}

on_both_queues!(
    list_shows_jobs_and_redrive_records_then_sends_then_deletes,
    a_redrive_cut_short_is_finished_without_a_second_event_or_run,
    stale_copies_go_strangers_stay_and_missed_dead_letterings_are_recorded,
    replay_from_events_reenqueues_what_the_queue_no_longer_holds,
    several_copies_of_one_job_give_one_redrive,
    replay_finds_jobs_with_late_outcomes_and_honours_since,
);

/// `karmic dlq` end to end: tables and `--json`, `--dry-run`, exit codes, `purge --yes`,
/// and purge refusing to run unconfirmed without a terminal.
async fn the_cli(on_sqs: bool) {
    let s = Setup::new(on_sqs).await;
    let (job, _) = s.dead_letter().await;
    let mut env = s._db.process_env();
    env.push(("KARMIC_OPERATOR".into(), "ann".into()));
    if on_sqs {
        env.push(("KARMIC_SQS_ENDPOINT".into(), "http://127.0.0.1:5000".into()));
        env.push(("KARMIC_SQS_QUEUE_URL".into(), s.queue_url.clone().unwrap()));
        env.push(("KARMIC_AWS_ACCESS_KEY_ID".into(), "test".into()));
        env.push(("KARMIC_AWS_SECRET_ACCESS_KEY".into(), "test".into()));
        env.push(("KARMIC_S3_ENDPOINT".into(), "http://127.0.0.1:5000".into()));
    }
    let karmic = |args: &[&str]| {
        std::process::Command::new(tests::karmic_binary!())
            .args(args)
            .envs(env.clone())
            .env("KARMIC_LOG_FORMAT", "json")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    let out = karmic(&["dlq", "list"]);
    assert!(out.status.success(), "{out:?}");
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        table.contains(&job.to_string()) && table.contains("corrupt: no trailer"),
        "{table}"
    );
    assert!(table.contains("(1 dead letters)"), "{table}");
    let out = karmic(&["dlq", "list", "--json"]);
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["job_id"], job.to_string());
    assert_eq!(list[0]["status"], "dead_lettered");

    let out = karmic(&["dlq", "show", &job.to_string(), "--json"]);
    assert!(out.status.success(), "{out:?}");
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["events"].as_array().unwrap().len(), 4, "{shown}");
    assert_eq!(
        shown["dead_letters"][0]["message_id"],
        list[0]["message_id"]
    );
    let out = karmic(&[
        "dlq",
        "show",
        &JobId::for_object(domain::DocumentId::new_v7(), "x").to_string(),
    ]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let out = karmic(&["dlq", "show", "not-a-job"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = karmic(&["dlq", "redrive"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "--all or --id is required: {out:?}"
    );

    let out = karmic(&[
        "dlq",
        "redrive",
        "--all",
        "--dry-run",
        "--json",
        "--reason",
        "x",
    ]);
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (
            r["dry_run"].as_bool(),
            r["redriven"].as_array().unwrap().len()
        ),
        (Some(true), 1)
    );
    let out = karmic(&[
        "dlq",
        "redrive",
        "--id",
        &job.to_string(),
        "--reason",
        "parser fixed",
    ]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 redriven, 0 dropped, 0 left"));
    assert_eq!(
        redrives(&s.events(job).await),
        vec![(
            "operator:ann".into(),
            "parser fixed".into(),
            Some(list[0]["message_id"].as_str().unwrap().to_owned())
        )]
    );
    let out = karmic(&[
        "dlq",
        "redrive",
        "--id",
        &job.to_string(),
        "--reason",
        "again",
    ]);
    assert_eq!(
        out.status.code(),
        Some(4),
        "nothing left for that job: {out:?}"
    );
    let out = karmic(&["dlq", "redrive", "--all"]);
    assert_eq!(out.status.code(), Some(2), "--reason is required: {out:?}");

    assert_eq!(s.drain().await.len(), 1, "the redriven job's message");
    s.put_in_dlq("garbage").await;
    let out = karmic(&["dlq", "redrive", "--all", "--reason", "x"]);
    assert_eq!(out.status.code(), Some(3), "a message was left: {out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 redriven, 0 dropped, 1 left"));
    let out = karmic(&["dlq", "purge"]);
    assert_eq!(out.status.code(), Some(2), "no terminal, no --yes: {out:?}");
    let out = karmic(&["dlq", "purge", "--yes", "--json"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        serde_json::from_slice::<Value>(&out.stdout).unwrap()["deleted"],
        1
    );
    let out = karmic(&[
        "dlq",
        "replay",
        "--from-events",
        "--dry-run",
        "--json",
        "--reason",
        "x",
    ]);
    assert!(out.status.success(), "{out:?}");
}

mod cli {
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn embedded() {
        super::the_cli(false).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn sqs_on_moto() {
        super::the_cli(true).await
    }
}
