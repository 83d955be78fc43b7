//! Documents end to end: a client asks to upload, PUTs real files to the presigned URL
//! with a plain HTTP client, and sees the analysis through the API. Run on the embedded
//! default (SQLite, the process's own S3 endpoint, the embedded queue, the worker
//! in-process) and on the AWS stand-ins (Postgres, SecantusDB, moto's S3 with a real
//! bucket notification to moto's SQS), plus the failures: duplicate notifications, corrupt
//! and hostile files, retries to the dead-letter queue, a worker killed with SIGKILL or
//! stopped with SIGTERM mid-job, and the real `karmic serve` binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use domain::{AiJob, DocumentId, JobId};
use handlers::Settings;
use serde_json::{Value, json};
use tests::docs::{DocClient, job_status};
use tests::{Backend, TestDb, TestMongo};
use worker::queue::JobQueue;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../worker/tests/fixtures");

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{FIXTURES}/{name}")).unwrap()
}

const PDF: &str = "application/pdf";
const DOCX: &str = "application/vnd.openxmlformats-officedocument.wordprocessingml.document";

const PROSE: &str = "Karmic keeps every change as an event. The invoice from Acme Corporation \
    is due on 2026-12-31 and totals $1,250.00. Contact billing@acme.example or call \
    +1 415 555 0100 for questions. The quarterly report covers revenue, costs and the \
    outlook for next year. Revenue grew in every region, and costs fell as the new \
    warehouse opened. The board approved the budget for the coming year.";

/// The supported types, each with real content.
fn samples() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    vec![
        ("report.pdf", PDF, fixture("report.pdf")),
        ("report.docx", DOCX, fixture("report.docx")),
        ("notes.txt", "text/plain", PROSE.as_bytes().to_vec()),
        (
            "notes.md",
            "text/markdown",
            format!("# Quarterly notes\n\n{PROSE}\n\n- one\n- two\n").into_bytes(),
        ),
        (
            "page.html",
            "text/html",
            format!("<!DOCTYPE html><html><body><h1>Notes</h1><p>{PROSE}</p></body></html>")
                .into_bytes(),
        ),
        (
            "table.csv",
            "text/csv",
            format!("name,comment\nAcme,\"{PROSE}\"\nGlobex,paid in full\n").into_bytes(),
        ),
    ]
}

/// A running system and what a test needs to look inside it.
struct Sys {
    base: String,
    settings: Settings,
    queue: Option<Arc<dyn JobQueue>>,
    http: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _db: TestDb,
    _mongo: Option<TestMongo>,
}

impl Sys {
    async fn start(db: TestDb, mongo: Option<TestMongo>, settings: Settings) -> Sys {
        let system = cli::system::System::build(settings).await.unwrap();
        let base = format!("http://127.0.0.1:{}", system.port());
        let settings = system.runtime().settings.clone();
        let queue = system.queue();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(system.run_until(async {
            let _ = rx.await;
        }));
        Sys {
            base,
            settings,
            queue,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            stop: Some(tx),
            task: Some(task),
            _db: db,
            _mongo: mongo,
        }
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap().unwrap();
        }
    }

    /// Stop, keeping the database (and data directory) for another start.
    async fn stop_keeping_db(mut self) -> TestDb {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap().unwrap();
        }
        self._db
    }

    async fn signed_in(&self) -> DocClient {
        DocClient::signed_in(&self.base).await
    }

    /// The job's event types, in order, from the event store.
    async fn job_events(&self, job: &str) -> Vec<String> {
        let rt = handlers::Runtime::build(self.settings.clone())
            .await
            .unwrap();
        let store = rt.state.db.aggregates::<AiJob>();
        let events = store.events(job).await.unwrap();
        events
            .into_iter()
            .map(|(_, e)| {
                use cqrs_es::DomainEvent;
                e.event_type()
            })
            .collect()
    }
}

/// The dead-letter queue's messages, once it holds at least `n` (the view can show the
/// job dead-lettered a moment before the worker has moved the message).
async fn dead_letters(queue: &Arc<dyn JobQueue>, n: usize) -> Vec<(String, String)> {
    let started = Instant::now();
    loop {
        let dead = queue.dead_letters().await.unwrap();
        if dead.len() >= n || started.elapsed() > Duration::from_secs(20) {
            return dead;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn finished(doc: &Value) -> bool {
    matches!(job_status(doc), "succeeded" | "dead_lettered") || doc["status"] == "rejected"
}

/// Test settings for the embedded default: every port picked by the OS, the analysis
/// child is the `karmic` entry point built for the tests, retries fast.
fn embedded_settings(db: &TestDb) -> Settings {
    let mut s = db.settings();
    s.s3_embedded_addr = ([127, 0, 0, 1], 0).into();
    s.analyzer_program = Some(tests::karmic_binary!());
    s.worker_wait = Duration::from_secs(1);
    s.worker_retry_delay = Duration::from_millis(100);
    s.worker_concurrency = Some(2);
    s
}

async fn embedded() -> Sys {
    let db = TestDb::new(Backend::Sqlite).await;
    let settings = embedded_settings(&db);
    Sys::start(db, None, settings).await
}

fn assert_analysed(name: &str, doc: &Value) {
    assert_eq!(job_status(doc), "succeeded", "{name}: {doc:#}");
    let a = &doc["analysis"];
    assert!(a["words"].as_u64().unwrap() > 20, "{name}: {a:#}");
    assert_eq!(a["sha256"].as_str().unwrap().len(), 64);
    assert!(!a["keywords"].as_array().unwrap().is_empty(), "{name}");
    assert!(!a["summary"].as_array().unwrap().is_empty(), "{name}");
    assert_eq!(doc["job"]["attempts"], 1, "{name}");
}

#[tokio::test]
async fn embedded_every_supported_type_is_analysed_within_seconds() {
    let sys = embedded().await;
    let me = sys.signed_in().await;
    let token = me.token.clone();
    let mut ids = Vec::new();
    for (name, ct, bytes) in samples() {
        ids.push((name, me.upload(name, ct, bytes).await));
    }
    for (name, id) in &ids {
        let doc = me.wait_for(id, Duration::from_secs(30), finished).await;
        assert_analysed(name, &doc);
        if *name == "report.pdf" {
            assert_eq!(doc["analysis"]["pages"], 3, "{doc:#}");
        }
        if name.ends_with(".txt") {
            let a = &doc["analysis"];
            assert_eq!(a["pii"]["email"], true);
            assert!(
                a["entities"]["emails"]
                    .to_string()
                    .contains("billing@acme.example")
            );
            assert!(
                a["entities"]["money"].to_string().contains("1,250.00"),
                "{a:#}"
            );
        }
    }
    // Listed, newest first.
    let r = sys
        .http
        .get(format!("{}/documents?limit=4", sys.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let page: Value = r.json().await.unwrap();
    let listed: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["document_id"].as_str().unwrap())
        .collect();
    let newest: Vec<&str> = ids
        .iter()
        .rev()
        .take(4)
        .map(|(_, id)| id.as_str())
        .collect();
    assert_eq!(listed, newest);
    let cursor = page["next_cursor"].as_str().unwrap();
    let r = sys
        .http
        .get(format!("{}/documents?limit=4&cursor={cursor}", sys.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let rest: Value = r.json().await.unwrap();
    assert_eq!(rest["items"].as_array().unwrap().len(), 2);
    assert!(rest["next_cursor"].is_null());
    // Every cursor the OpenAPI pattern admits is a position (schemathesis found one far in
    // the future that was refused); one digit more is refused.
    for (cursor, status, items) in [
        ("999999999999999.ffffffffffffffffffffffffffffffff", 200, 6),
        ("0.00000000000000000000000000000000", 200, 0),
        ("8506306646778420.f15700baf3df67a8c752080c0813acaf", 400, 0),
    ] {
        let r = sys
            .http
            .get(format!("{}/documents?limit=10&cursor={cursor}", sys.base))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{cursor}");
        if status == 200 {
            let page: Value = r.json().await.unwrap();
            assert_eq!(page["items"].as_array().unwrap().len(), items, "{cursor}");
        }
    }
    sys.stop().await;
}

#[tokio::test]
async fn uploads_are_checked_before_signing_and_documents_are_owner_only() {
    let sys = embedded().await;
    let me = sys.signed_in().await;
    let token = me.token.clone();
    let other = sys.signed_in().await;
    let upload = |body: Value| {
        let sys = &sys;
        let token = token.clone();
        async move {
            sys.http
                .post(format!("{}/documents/upload", sys.base))
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    for bad in [
        json!({"filename": "a.exe", "content_type": "application/x-msdownload", "size": 10}),
        json!({"filename": "a.pdf", "content_type": PDF, "size": 0}),
        json!({"filename": "a.pdf", "content_type": PDF, "size": 26_214_401u64}),
        json!({"filename": "../../etc/passwd", "content_type": PDF, "size": 10}),
    ] {
        let r = upload(bad.clone()).await;
        tests::assert_problem(r, 422).await;
    }
    let r = sys
        .http
        .post(format!("{}/documents/upload", sys.base))
        .json(&json!({"filename": "a.pdf", "content_type": PDF, "size": 10}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // JSON Schema's integers include 10.0; a fraction is refused.
    let r = upload(json!({"filename": "a.pdf", "content_type": "Application/PDF; charset=binary", "size": 10.0})).await;
    assert_eq!(r.status(), 201);
    let r = upload(json!({"filename": "a.pdf", "content_type": PDF, "size": 10.5})).await;
    tests::assert_problem(r, 422).await;

    // The key is the server's, whatever the filename says.
    let grant = me.request_upload("evil name.pdf", PDF, 10).await;
    let url = grant["upload"]["url"].as_str().unwrap();
    assert!(!url.contains("evil"), "{url}");
    assert!(
        grant["upload"]["url"]
            .as_str()
            .unwrap()
            .contains("/documents/")
    );
    assert!(
        url.contains(grant["document_id"].as_str().unwrap()),
        "{url}"
    );

    let id = me.upload("report.pdf", PDF, fixture("report.pdf")).await;
    me.wait_for(&id, Duration::from_secs(30), finished).await;
    // Another user sees nothing: not in GET, not in the list, no download, no delete.
    tests::assert_problem(other.document(&id).await, 404).await;
    for (method, path) in [
        (reqwest::Method::GET, format!("/documents/{id}/download")),
        (reqwest::Method::DELETE, format!("/documents/{id}")),
    ] {
        let r = sys
            .http
            .request(method, format!("{}{path}", sys.base))
            .bearer_auth(&other.token)
            .send()
            .await
            .unwrap();
        tests::assert_problem(r, 404).await;
    }
    let list: Value = sys
        .http
        .get(format!("{}/documents", sys.base))
        .bearer_auth(&other.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["items"], json!([]));

    // The owner downloads it as an attachment, then deletes it.
    let link: Value = sys
        .http
        .get(format!("{}/documents/{id}/download", sys.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let got = reqwest::get(link["url"].as_str().unwrap()).await.unwrap();
    assert_eq!(got.status(), 200);
    let disposition = got.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(disposition.starts_with("attachment"), "{disposition}");
    assert!(disposition.contains("report.pdf"), "{disposition}");
    assert_eq!(got.bytes().await.unwrap().to_vec(), fixture("report.pdf"));
    for _ in 0..2 {
        let r = sys
            .http
            .delete(format!("{}/documents/{id}", sys.base))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204, "deleting is safe to repeat");
    }
    tests::assert_problem(me.document(&id).await, 404).await;
    let gone = reqwest::get(link["url"].as_str().unwrap()).await.unwrap();
    assert_eq!(gone.status(), 404, "the object is deleted too");
    sys.stop().await;
}

/// An `ObjectCreated` notification for an object, as S3 sends it.
fn notification(bucket: &str, key: &str, size: u64, etag: &str) -> String {
    json!({"Records": [{
        "eventVersion": "2.1", "eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
        "s3": {"bucket": {"name": bucket}, "object": {"key": key, "size": size, "eTag": etag}}
    }]})
    .to_string()
}

/// Messages of the documents queue (in flight or not).
async fn queue_depth(sys: &Sys) -> i64 {
    count_messages(sys, "").await
}

/// Messages of the documents queue that have been received at least once.
async fn received(sys: &Sys) -> i64 {
    count_messages(sys, "AND receive_count > 0").await
}

async fn count_messages(sys: &Sys, and: &str) -> i64 {
    let commands::Database::Sqlite(pool) = handlers::Runtime::build(sys.settings.clone())
        .await
        .unwrap()
        .state
        .db
    else {
        panic!("embedded only");
    };
    sqlx::query_scalar(&format!(
        "SELECT count(*) FROM queue_messages WHERE queue = 'documents' {and}"
    ))
    .fetch_one(&pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_notification_delivered_three_times_gives_one_job_and_one_result() {
    let sys = embedded().await;
    let me = sys.signed_in().await;
    let user = me.user_id.clone();
    let bytes = PROSE.as_bytes().to_vec();
    let size = bytes.len() as u64;
    let id = me.upload("notes.txt", "text/plain", bytes).await;
    // S3 delivers at least once: two more copies of the same notification.
    let key = format!("documents/{user}/{id}");
    let store = storage::ObjectStore::connect(&handlers::app::s3_settings(&sys.settings))
        .await
        .unwrap();
    let (object_key, _, _) = domain::ObjectKey::parse(&key).unwrap();
    let etag = store.head(&object_key).await.unwrap().unwrap().etag;
    let queue = sys.queue.clone().unwrap();
    for _ in 0..2 {
        queue
            .send(&notification(&sys.settings.s3_bucket, &key, size, &etag))
            .await
            .unwrap();
    }
    let doc = me.wait_for(&id, Duration::from_secs(30), finished).await;
    assert_analysed("notes.txt", &doc);
    let started = Instant::now();
    while queue_depth(&sys).await > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the copies were not consumed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let job = JobId::for_object(DocumentId::parse(&id).unwrap(), &etag);
    assert_eq!(doc["job"]["job_id"], job.to_string());
    assert_eq!(
        sys.job_events(&job.to_string()).await,
        ["JobRequested", "JobStarted", "JobSucceeded"]
    );
    sys.stop().await;
}

#[tokio::test]
async fn a_corrupt_file_fails_once_and_is_dead_lettered_with_the_events_to_show_it() {
    let sys = embedded().await;
    let me = sys.signed_in().await;
    let mut corrupt = b"%PDF-1.7\n".to_vec();
    corrupt.extend(std::iter::repeat_n(b'#', 4000));
    let id = me.upload("broken.pdf", PDF, corrupt).await;
    let doc = me.wait_for(&id, Duration::from_secs(30), finished).await;
    assert_eq!(job_status(&doc), "dead_lettered", "{doc:#}");
    assert_eq!(
        doc["job"]["attempts"], 1,
        "non-retryable: no attempts burnt"
    );
    let error = doc["job"]["last_error"].as_str().unwrap();
    assert!(error.contains("unreadable"), "{error}");
    assert!(doc["analysis"].is_null());
    let job = doc["job"]["job_id"].as_str().unwrap();
    assert_eq!(
        sys.job_events(job).await,
        [
            "JobRequested",
            "JobStarted",
            "AttemptFailed",
            "JobDeadLettered"
        ]
    );
    let dead = dead_letters(&sys.queue.clone().unwrap(), 1).await;
    assert_eq!(dead.len(), 1);
    assert!(dead[0].1.contains(&id));
    sys.stop().await;
}

#[tokio::test]
async fn a_retryable_failure_is_retried_up_to_the_limit_then_dead_lettered() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut settings = embedded_settings(&db);
    // The analyzer cannot start: a failure on our side, worth retrying.
    settings.analyzer_program = Some("/nonexistent/karmic-analyze".into());
    let sys = Sys::start(db, None, settings).await;
    let me = sys.signed_in().await;
    let id = me
        .upload("notes.txt", "text/plain", PROSE.as_bytes().to_vec())
        .await;
    let doc = me.wait_for(&id, Duration::from_secs(30), finished).await;
    assert_eq!(job_status(&doc), "dead_lettered", "{doc:#}");
    assert_eq!(doc["job"]["attempts"], 3);
    assert_eq!(doc["job"]["max_attempts"], 3);
    let job = doc["job"]["job_id"].as_str().unwrap();
    assert_eq!(
        sys.job_events(job).await,
        [
            "JobRequested",
            "JobStarted",
            "AttemptFailed",
            "JobStarted",
            "AttemptFailed",
            "JobStarted",
            "AttemptFailed",
            "JobDeadLettered"
        ]
    );
    assert_eq!(dead_letters(&sys.queue.clone().unwrap(), 1).await.len(), 1);
    sys.stop().await;
}

#[tokio::test]
async fn a_decompression_bomb_fails_alone_and_the_worker_serves_the_others() {
    let sys = embedded().await;
    let me = sys.signed_in().await;
    let bomb = me.upload("bomb.docx", DOCX, fixture("bomb.docx")).await;
    let good = me.upload("report.pdf", PDF, fixture("report.pdf")).await;
    let doc = me.wait_for(&bomb, Duration::from_secs(60), finished).await;
    assert_eq!(job_status(&doc), "dead_lettered", "{doc:#}");
    assert_eq!(doc["job"]["attempts"], 1);
    let doc = me.wait_for(&good, Duration::from_secs(60), finished).await;
    assert_analysed("report.pdf", &doc);
    // And after it, too.
    let after = me
        .upload("notes.txt", "text/plain", PROSE.as_bytes().to_vec())
        .await;
    let doc = me.wait_for(&after, Duration::from_secs(30), finished).await;
    assert_analysed("notes.txt", &doc);
    sys.stop().await;
}

#[tokio::test]
async fn a_file_that_is_not_what_was_declared_is_rejected_and_deleted() {
    let sys = embedded().await;
    let me = sys.signed_in().await;
    let user = me.user_id.clone();
    // Declared a PDF, sent text.
    let id = me.upload("fake.pdf", PDF, PROSE.as_bytes().to_vec()).await;
    let doc = me.wait_for(&id, Duration::from_secs(30), finished).await;
    assert_eq!(doc["status"], "rejected", "{doc:#}");
    assert!(doc["job"].is_null());
    let store = storage::ObjectStore::connect(&handlers::app::s3_settings(&sys.settings))
        .await
        .unwrap();
    let (key, _, _) = domain::ObjectKey::parse(&format!("documents/{user}/{id}")).unwrap();
    // The rejection is visible as soon as it is an event; the delete follows it.
    let started = Instant::now();
    while store.head(&key).await.unwrap().is_some() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the object is deleted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sys.stop().await;
}

// ---------------------------------------------------------------------------------------
// The AWS stand-ins: Postgres, SecantusDB, moto's S3 notifying moto's SQS.

fn moto_url() -> String {
    std::env::var("KARMIC_TEST_MOTO_URL").unwrap_or_else(|_| "http://127.0.0.1:5000".to_owned())
}

/// A bucket whose `ObjectCreated` notifications go to a queue with a dead-letter queue
/// (maxReceiveCount: the job's attempts plus one), all on moto.
async fn moto_settings(db: &TestDb, mongo: &TestMongo) -> Settings {
    let mut s = embedded_settings(db);
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let creds = (
        "test".to_owned(),
        secrecy::SecretString::from("test".to_owned()),
    );
    s.mongodb_url = Some(mongo.url.clone().into());
    s.mongodb_database = mongo.database.clone();
    s.s3_endpoint = Some(moto_url());
    s.s3_bucket = format!("docs-{suffix}");
    s.aws_credentials = Some(creds.clone());
    s.sqs_endpoint = Some(moto_url());
    s.worker_in_process = Some(true);
    let sqs = worker::sqs::client(
        Some(&moto_url()),
        "us-east-1",
        Some(&creds),
        Duration::from_secs(30),
    )
    .await;
    let (queue_url, dlq_url) = worker::sqs::create_with_dead_letter_queue(
        &sqs,
        &format!("docs-{suffix}"),
        s.job_max_attempts + 1,
        Duration::from_secs(600),
    )
    .await
    .expect("moto must be running (scripts/services.sh)");
    s.sqs_queue_url = Some(queue_url.clone());
    s.sqs_dlq_url = Some(dlq_url);
    let store = storage::ObjectStore::connect(&handlers::app::s3_settings(&s))
        .await
        .unwrap();
    store.ensure_bucket().await.unwrap();
    let queue_arn = sqs
        .get_queue_attributes()
        .queue_url(&queue_url)
        .attribute_names(aws_sdk_sqs::types::QueueAttributeName::QueueArn)
        .send()
        .await
        .unwrap()
        .attributes()
        .unwrap()[&aws_sdk_sqs::types::QueueAttributeName::QueueArn]
        .clone();
    store
        .notify_queue_on_create(&queue_arn)
        .await
        .expect("configuring the bucket notification");
    s
}

#[tokio::test]
async fn aws_stand_ins_every_supported_type_is_analysed_through_real_notifications() {
    let db = TestDb::new(Backend::Postgres).await;
    let mongo = TestMongo::new();
    let settings = moto_settings(&db, &mongo).await;
    let sys = Sys::start(db, Some(mongo), settings).await;
    let me = sys.signed_in().await;
    let mut ids = Vec::new();
    for (name, ct, bytes) in samples() {
        ids.push((name, me.upload(name, ct, bytes).await));
    }
    for (name, id) in &ids {
        let doc = me.wait_for(id, Duration::from_secs(60), finished).await;
        assert_analysed(name, &doc);
    }
    // A corrupt file goes to the real dead-letter queue.
    let id = me
        .upload("broken.pdf", PDF, b"%PDF-1.4\nnot really".to_vec())
        .await;
    let doc = me.wait_for(&id, Duration::from_secs(60), finished).await;
    assert_eq!(job_status(&doc), "dead_lettered", "{doc:#}");
    let dead = dead_letters(&sys.queue.clone().unwrap(), 1).await;
    assert!(dead.iter().any(|(_, body)| body.contains(&id)), "{dead:?}");
    sys.stop().await;
}

/// A queue that counts the receives that brought a message.
struct CountingQueue {
    inner: Arc<dyn JobQueue>,
    receives: std::sync::atomic::AtomicU32,
}

#[async_trait::async_trait]
impl JobQueue for CountingQueue {
    async fn send(&self, body: &str) -> anyhow::Result<String> {
        self.inner.send(body).await
    }
    async fn receive(
        &self,
        max: u32,
        wait: Duration,
        visibility: Duration,
    ) -> anyhow::Result<Vec<worker::queue::Received>> {
        let got = self.inner.receive(max, wait, visibility).await?;
        if !got.is_empty() {
            self.receives
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(got)
    }
    async fn put_back(
        &self,
        m: &worker::queue::Received,
        delay: Duration,
        counted: bool,
    ) -> anyhow::Result<bool> {
        self.inner.put_back(m, delay, counted).await
    }
    async fn close(&self) {
        self.inner.close().await
    }
    async fn change_visibility(&self, receipt: &str, v: Duration) -> anyhow::Result<bool> {
        self.inner.change_visibility(receipt, v).await
    }
    async fn delete(&self, receipt: &str) -> anyhow::Result<bool> {
        self.inner.delete(receipt).await
    }
    async fn dead_letter(&self, m: &worker::queue::Received) -> anyhow::Result<bool> {
        self.inner.dead_letter(m).await
    }
    async fn dead_letters(&self) -> anyhow::Result<Vec<(String, String)>> {
        self.inner.dead_letters().await
    }
}

#[tokio::test]
async fn an_outage_before_any_attempt_never_dead_letters_and_the_job_keeps_its_attempts() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut settings = embedded_settings(&db);
    // One attempt: the embedded queue moves a message after its second receive.
    settings.job_max_attempts = 1;
    settings.worker_in_process = Some(false);
    let sys = Sys::start(db, None, settings).await;
    let me = sys.signed_in().await;
    let id = me
        .upload("notes.txt", "text/plain", PROSE.as_bytes().to_vec())
        .await;
    // The storage goes away with the notification queued: every HEAD fails.
    let settings = sys.settings.clone();
    let db = sys.stop_keeping_db().await;
    let rt = handlers::Runtime::build(settings.clone()).await.unwrap();
    let counting = Arc::new(CountingQueue {
        inner: cli::system::job_queue(&rt).await.unwrap(),
        receives: Default::default(),
    });
    let worker = cli::system::worker(&rt, counting.clone()).unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(worker.run(async {
        let _ = rx.await;
    }));
    let started = Instant::now();
    while counting.receives.load(std::sync::atomic::Ordering::SeqCst) < 4 {
        let dead = counting.dead_letters().await.unwrap();
        assert!(
            dead.is_empty(),
            "the queue dead-lettered the message after {} receives",
            counting.receives.load(std::sync::atomic::Ordering::SeqCst)
        );
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "too few receives"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = tx.send(());
    run.await.unwrap().unwrap();
    assert!(counting.dead_letters().await.unwrap().is_empty());
    drop(rt);
    // The storage is back: the job runs, as its first and only attempt.
    let mut settings = settings;
    settings.worker_in_process = Some(true);
    settings.s3_endpoint = None;
    settings.s3_credentials = None;
    let sys = Sys::start(db, None, settings).await;
    let mut me = me;
    me.base = sys.base.clone();
    let doc = me.wait_for(&id, Duration::from_secs(60), finished).await;
    assert_analysed("notes.txt", &doc);
    let job = doc["job"]["job_id"].as_str().unwrap().to_owned();
    assert_eq!(
        sys.job_events(&job).await,
        ["JobRequested", "JobStarted", "JobSucceeded"]
    );
    assert_eq!(doc["job"]["attempts"], 1, "{doc}");
    sys.stop().await;
}

#[tokio::test]
async fn a_second_delivery_of_a_running_attempt_waits_for_its_outcome_instead_of_deleting() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut settings = embedded_settings(&db);
    settings.worker_in_process = Some(false);
    let sys = Sys::start(db, None, settings).await;
    let me = sys.signed_in().await;
    let id = me
        .upload("notes.txt", "text/plain", PROSE.as_bytes().to_vec())
        .await;
    let rt = handlers::Runtime::build(sys.settings.clone())
        .await
        .unwrap();
    let queue = sys.queue.clone().unwrap();
    // Another worker holds the notification and runs attempt 1.
    let held = queue
        .receive(1, Duration::from_secs(5), Duration::from_secs(600))
        .await
        .unwrap()
        .remove(0);
    let store = storage::ObjectStore::connect(&handlers::app::s3_settings(&sys.settings))
        .await
        .unwrap();
    let (key, _, document) =
        domain::ObjectKey::parse(&format!("documents/{}/{id}", me.user_id)).unwrap();
    let info = store.head(&key).await.unwrap().unwrap();
    let meta = commands::CommandMeta::system("test");
    let docs = &rt.state.documents;
    let commands::documents::Confirmation::Job(job) = docs
        .confirm_upload(
            document,
            info.size,
            &info.etag,
            domain::Sniffed::Text,
            &meta,
        )
        .await
        .unwrap()
    else {
        panic!("no job");
    };
    docs.start_job(job, 1, "the-other-worker", &meta)
        .await
        .unwrap();
    // A second delivery of it (SQS delivers at least once) reaches this worker: deleting
    // it could delete the message the running attempt holds.
    queue.send(&held.body).await.unwrap();
    let worker = cli::system::worker(&rt, queue.clone()).unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(worker.run(async {
        let _ = rx.await;
    }));
    // The worker takes the second delivery...
    let started = Instant::now();
    while received(&sys).await < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "never received"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ...and keeps it while the attempt runs.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        queue_depth(&sys).await,
        2,
        "the second delivery went while its attempt was running"
    );
    // The attempt fails, retryably: the job is not finished, and the second delivery
    // does not wait out a visibility timeout for it but comes back as attempt 2, which
    // completes the job.
    docs.job_failed(job, 1, "the other worker lost its disk", true, &meta)
        .await
        .unwrap();
    let doc = me.wait_for(&id, Duration::from_secs(20), finished).await;
    assert_eq!(job_status(&doc), "succeeded", "{doc}");
    assert_eq!(
        sys.job_events(&job.to_string()).await,
        [
            "JobRequested",
            "JobStarted",
            "AttemptFailed",
            "JobStarted",
            "JobSucceeded"
        ]
    );
    let started = Instant::now();
    while queue_depth(&sys).await > 1 {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the second delivery stayed after the outcome"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = tx.send(());
    run.await.unwrap().unwrap();
    // The first delivery, still held: the job's outcome is stored, so it goes.
    assert!(queue.delete(&held.receipt).await.unwrap());
    sys.stop().await;
}
