//! The documents projection, fed the real events of `commands::documents::Documents`:
//! each step of a document's life shows in its view, a job's attempts and outcome show
//! with it, and re-applying or rebuilding from zero gives the same views. Run with the
//! events and the views on SQLite, on Postgres, and with the views in DocumentDB.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use commands::documents::{Confirmation, Documents};
use commands::{AfterCommit, CommandMeta, Database, NoAfterCommit, Position, StoredEvent};
use domain::{
    AiJob, AiJobCommand, Analysis, ContentType, DocumentId, DocumentSize, FileName, JobId, Sniffed,
    UserId,
};
use projections::documents::{DocumentState, DocumentStore, JobState, SqlDocuments};
use projections::{
    CheckpointStore, DocumentView, DocumentsProjection, Projection, Projector, ProjectorSettings,
    ReadModels,
};
use tests::{Backend, TestDb, TestMongo};

/// Where the views are kept.
#[derive(Debug, Clone, Copy)]
enum Views {
    /// In `document_views` of the event store's own database.
    Sql,
    /// In DocumentDB.
    DocumentDb,
}

/// A document read model being fed from an event store.
struct World {
    db: Database,
    docs: Documents,
    store: Arc<dyn DocumentStore>,
    projection: DocumentsProjection,
    /// How far the feed has been applied.
    at: tokio::sync::Mutex<Position>,
    views: Views,
    backend: Backend,
    _test_db: TestDb,
    _mongo: Vec<TestMongo>,
    /// What backs the spare stores of rebuilds, kept until the test ends.
    spares: tokio::sync::Mutex<Vec<Box<dyn std::any::Any + Send>>>,
}

fn meta() -> CommandMeta {
    CommandMeta::system("test")
}

async fn world(backend: Backend, views: Views) -> World {
    world_with(backend, views, |_, _| Arc::new(NoAfterCommit)).await
}

/// A world whose commands run `after_commit(db, store)` after each commit.
async fn world_with(
    backend: Backend,
    views: Views,
    after_commit: impl FnOnce(&Database, Arc<dyn DocumentStore>) -> Arc<dyn AfterCommit>,
) -> World {
    let test_db = TestDb::new(backend).await;
    let db = test_db.connect().await;
    let mut mongo = Vec::new();
    let store: Arc<dyn DocumentStore> = match views {
        Views::Sql => Arc::new(SqlDocuments::new(ReadModels::new(&db))),
        Views::DocumentDb => {
            let m = TestMongo::new();
            let s = Arc::new(m.documents().await);
            mongo.push(m);
            s
        }
    };
    let hook = after_commit(&db, store.clone());
    World {
        docs: Documents::new(&db, hook, 3),
        projection: DocumentsProjection(store.clone()),
        store,
        db,
        at: tokio::sync::Mutex::new(Position::START),
        views,
        backend,
        _test_db: test_db,
        _mongo: mongo,
        spares: tokio::sync::Mutex::default(),
    }
}

impl World {
    /// Every event committed so far, once the feed can show all of them (on Postgres it
    /// holds back events behind transactions still open anywhere on the server).
    async fn events_after(&self, after: Position) -> Vec<StoredEvent> {
        let feed = self.db.feed();
        if let Some(horizon) = feed.horizon().await.unwrap() {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !feed.is_visible(horizon).await.unwrap() {
                assert!(std::time::Instant::now() < deadline, "the feed is stuck");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let mut out = Vec::new();
        let mut at = after;
        loop {
            let batch = feed.read_after(at, 1000).await.unwrap();
            let Some(last) = batch.last() else { break };
            at = last.position;
            out.extend(batch);
        }
        out
    }

    async fn all_events(&self) -> Vec<StoredEvent> {
        self.events_after(Position::START).await
    }

    /// Apply what was committed since the last call, as one batch (as the engine would).
    async fn catch_up(&self) {
        let mut at = self.at.lock().await;
        let batch = self.events_after(*at).await;
        if let Some(last) = batch.last() {
            self.projection.apply(&batch).await.unwrap();
            *at = last.position;
        }
    }

    async fn view(&self, id: DocumentId) -> DocumentView {
        self.store.get(id).await.unwrap().expect("no view")
    }

    /// An empty store of the same kind, to rebuild into.
    async fn spare_store(&self) -> Arc<dyn DocumentStore> {
        match self.views {
            Views::Sql => {
                let db = TestDb::new(self.backend).await;
                let store = Arc::new(SqlDocuments::new(ReadModels::new(&db.connect().await)));
                self.spares.lock().await.push(Box::new(db));
                store
            }
            Views::DocumentDb => {
                let m = TestMongo::new();
                let store = Arc::new(m.documents().await);
                self.spares.lock().await.push(Box::new(m));
                store
            }
        }
    }

    async fn request(&self, owner: UserId, size: u64) -> DocumentId {
        self.docs
            .request_upload(
                owner,
                FileName::parse("report.pdf").unwrap(),
                ContentType::Pdf,
                DocumentSize::parse(size, 25 << 20).unwrap(),
                &meta(),
            )
            .await
            .unwrap()
            .0
    }

    async fn confirm(&self, id: DocumentId, size: u64, etag: &str) -> JobId {
        match self
            .docs
            .confirm_upload(id, size, etag, Sniffed::Pdf, &meta())
            .await
            .unwrap()
        {
            Confirmation::Job(job) => job,
            other => panic!("{other:?}"),
        }
    }
}

fn analysis(words: u64) -> Analysis {
    Analysis {
        sha256: "cd".repeat(32),
        language: Some("eng".to_owned()),
        pages: Some(2),
        words,
        characters: words * 6,
        keywords: vec!["karmic".to_owned()],
        summary: vec!["A short report.".to_owned()],
        ..Analysis::default()
    }
}

/// request → awaiting_upload; confirm → uploaded with a queued job; start → running,
/// attempt 1; succeed → succeeded with the analysis; a late result changes nothing.
async fn a_document_goes_from_request_to_analysis(w: World) {
    let owner = UserId::new_v7();
    let id = w.request(owner, 1000).await;
    w.catch_up().await;
    let v = w.view(id).await;
    assert_eq!(
        (v.document_id, v.owner_id, v.status),
        (id, owner, DocumentState::AwaitingUpload)
    );
    assert_eq!(
        (
            v.filename.as_str(),
            v.content_type.as_str(),
            v.declared_size
        ),
        ("report.pdf", "application/pdf", 1000)
    );
    assert_eq!(
        (v.size, v.etag.as_deref(), v.job.as_ref()),
        (None, None, None)
    );
    assert_eq!((v.doc_seq, v.job_seq), (1, 0));
    assert_eq!(v.created_at, v.updated_at);
    assert_eq!(
        w.store.list(owner, 10, None).await.unwrap(),
        vec![v.clone()]
    );
    let created = v.created_at;

    let job = w.confirm(id, 1000, "\"etag-1\"").await;
    w.catch_up().await;
    let v = w.view(id).await;
    assert_eq!(v.status, DocumentState::Uploaded);
    assert_eq!((v.size, v.etag.as_deref()), (Some(1000), Some("etag-1")));
    assert_eq!(v.created_at, created);
    assert!(v.updated_at >= created);
    let j = v.job.clone().expect("a job");
    assert_eq!((j.job_id, j.status), (job, JobState::Queued));
    assert_eq!((j.attempts, j.max_attempts, j.redrives), (0, 3, 0));
    assert_eq!((j.analysis, j.worker, j.started_at), (None, None, None));
    assert_eq!((v.doc_seq, v.job_seq), (2, 1));
    assert_eq!(w.store.by_job(job).await.unwrap(), Some(v));

    let started = w.docs.start_job(job, 1, "w1", &meta()).await.unwrap();
    w.catch_up().await;
    let j = w.view(id).await.job.unwrap();
    assert_eq!((j.status, j.attempts), (JobState::Running, 1));
    assert_eq!(j.worker.as_deref(), Some("w1"));
    assert!(j.started_at.is_some() && j.finished_at.is_none());

    w.docs
        .job_succeeded(job, started.attempt, analysis(120), &meta())
        .await
        .unwrap();
    w.catch_up().await;
    let v = w.view(id).await;
    let j = v.job.clone().unwrap();
    assert_eq!(j.status, JobState::Succeeded);
    assert_eq!(j.analysis, Some(analysis(120)));
    assert_eq!((j.attempts, j.last_error.as_deref()), (1, None));
    assert!(j.finished_at.is_some());
    assert_eq!(v.updated_at, j.finished_at.unwrap());

    // The same attempt's result again: recorded as late, never applied over the first.
    w.docs
        .job_succeeded(job, 1, analysis(999), &meta())
        .await
        .unwrap();
    w.catch_up().await;
    let after = w.view(id).await;
    assert_eq!(after.job_seq, v.job_seq + 1, "the late outcome was applied");
    assert_eq!(
        DocumentView {
            job_seq: v.job_seq,
            ..after
        },
        v,
        "a late outcome changed the view"
    );
}

/// Retryable failures leave the job retrying until the last attempt dead-letters it; an
/// operator's redrive queues it again, and its attempts count on.
async fn failed_attempts_retry_then_dead_letter(w: World) {
    let owner = UserId::new_v7();
    let id = w.request(owner, 10).await;
    let job = w.confirm(id, 10, "e1").await;
    for attempt in 1..=3 {
        w.docs.start_job(job, attempt, "w1", &meta()).await.unwrap();
        w.catch_up().await;
        let j = w.view(id).await.job.unwrap();
        assert_eq!((j.status, j.attempts), (JobState::Running, attempt));
        let dead = w
            .docs
            .job_failed(job, attempt, &format!("boom {attempt}"), true, &meta())
            .await
            .unwrap();
        w.catch_up().await;
        let j = w.view(id).await.job.unwrap();
        assert_eq!(j.last_error, Some(format!("boom {attempt}")));
        if attempt < 3 {
            assert!(!dead);
            assert_eq!(j.status, JobState::Retrying);
            assert!(j.dead_lettered_at.is_none() && j.finished_at.is_none());
        } else {
            assert!(dead);
            assert_eq!(j.status, JobState::DeadLettered);
            assert!(j.dead_lettered_at.is_some());
            assert_eq!(j.finished_at, j.dead_lettered_at);
        }
        assert_eq!(j.analysis, None);
    }

    // An operator redrives it; the queue's receive count starts again at 1, which is the
    // job's attempt 4.
    w.db.aggregates::<AiJob>()
        .execute(
            &job.to_string(),
            AiJobCommand::Redrive {
                by: "ops".into(),
                reason: "test".into(),
                message: None,
            },
            &(),
            None,
            &meta(),
        )
        .await
        .unwrap();
    w.catch_up().await;
    let j = w.view(id).await.job.unwrap();
    assert_eq!((j.status, j.redrives, j.attempts), (JobState::Queued, 1, 3));
    assert!(j.finished_at.is_none() && j.dead_lettered_at.is_some());
    let started = w.docs.start_job(job, 1, "w2", &meta()).await.unwrap();
    assert_eq!(started.attempt, 4);
    w.docs
        .job_succeeded(job, 4, analysis(7), &meta())
        .await
        .unwrap();
    w.catch_up().await;
    let j = w.view(id).await.job.unwrap();
    assert_eq!((j.status, j.attempts), (JobState::Succeeded, 4));
    assert_eq!(j.worker.as_deref(), Some("w2"));
    assert_eq!((j.analysis, j.last_error), (Some(analysis(7)), None));

    // A failure retrying cannot fix dead-letters at once, with its error.
    let id = w.request(owner, 10).await;
    let job = w.confirm(id, 10, "e2").await;
    w.docs.start_job(job, 1, "w1", &meta()).await.unwrap();
    assert!(
        w.docs
            .job_failed(job, 1, "encrypted PDF", false, &meta())
            .await
            .unwrap()
    );
    w.catch_up().await;
    let j = w.view(id).await.job.unwrap();
    assert_eq!((j.status, j.attempts), (JobState::DeadLettered, 1));
    assert_eq!(j.last_error.as_deref(), Some("encrypted PDF"));
}

/// An object that is not what was declared: rejected, with the reason in words.
async fn a_refused_upload_says_why(w: World) {
    let owner = UserId::new_v7();
    let by_size = w.request(owner, 1000).await;
    let by_type = w.request(owner, 1000).await;
    let c = w
        .docs
        .confirm_upload(by_size, 999, "e", Sniffed::Pdf, &meta())
        .await
        .unwrap();
    assert!(matches!(c, Confirmation::Rejected(_)), "{c:?}");
    let c = w
        .docs
        .confirm_upload(by_type, 1000, "e", Sniffed::Text, &meta())
        .await
        .unwrap();
    assert!(matches!(c, Confirmation::Rejected(_)), "{c:?}");
    w.catch_up().await;
    let v = w.view(by_size).await;
    assert_eq!(v.status, DocumentState::Rejected);
    assert_eq!(
        v.rejection.as_deref(),
        Some("size mismatch: the file that arrived is 999 bytes, 1000 bytes were declared")
    );
    assert_eq!((v.size, v.job), (None, None));
    let v = w.view(by_type).await;
    assert_eq!(v.status, DocumentState::Rejected);
    assert_eq!(
        v.rejection.as_deref(),
        Some("type mismatch: declared as application/pdf, but the content looks like plain text")
    );
    // Rejected documents stay listed (the owner sees why); only deleted ones go.
    assert_eq!(w.store.list(owner, 10, None).await.unwrap().len(), 2);
}

/// A deleted document reads as deleted and leaves its owner's listing.
async fn a_deleted_document_leaves_the_listing(w: World) {
    let owner = UserId::new_v7();
    let kept = w.request(owner, 10).await;
    let gone = w.request(owner, 10).await;
    w.confirm(gone, 10, "e").await;
    w.catch_up().await;
    assert_eq!(w.store.list(owner, 10, None).await.unwrap().len(), 2);
    w.docs.delete(gone, owner, &meta()).await.unwrap();
    w.catch_up().await;
    let v = w.view(gone).await;
    assert_eq!((v.status, v.doc_seq), (DocumentState::Deleted, 3));
    assert_eq!(v.job.as_ref().unwrap().status, JobState::Queued);
    let listed: Vec<DocumentId> = w
        .store
        .list(owner, 10, None)
        .await
        .unwrap()
        .iter()
        .map(|v| v.document_id)
        .collect();
    assert_eq!(listed, vec![kept]);
}

/// Several documents through every kind of step; then the whole feed applied again, and
/// rebuilt from zero (in one batch, and one event at a time) into an empty store: the
/// same views every time.
async fn reapplying_or_rebuilding_gives_the_same_views(w: World) {
    let owner = UserId::new_v7();
    let mut ids = Vec::new();
    // Succeeded after a failed attempt, with a late result.
    let id = w.request(owner, 10).await;
    let job = w.confirm(id, 10, "a").await;
    w.docs.start_job(job, 1, "w1", &meta()).await.unwrap();
    w.catch_up().await;
    w.docs
        .job_failed(job, 1, "flaky", true, &meta())
        .await
        .unwrap();
    w.docs.start_job(job, 2, "w1", &meta()).await.unwrap();
    w.docs.start_job(job, 3, "w2", &meta()).await.unwrap();
    w.docs
        .job_succeeded(job, 3, analysis(3), &meta())
        .await
        .unwrap();
    w.docs
        .job_succeeded(job, 2, analysis(2), &meta())
        .await
        .unwrap();
    ids.push(id);
    // Rejected.
    let id = w.request(owner, 10).await;
    w.docs
        .confirm_upload(id, 11, "b", Sniffed::Pdf, &meta())
        .await
        .unwrap();
    ids.push(id);
    w.catch_up().await;
    // Deleted while its job runs, then the job dead-letters.
    let id = w.request(owner, 10).await;
    let job = w.confirm(id, 10, "c").await;
    w.docs.start_job(job, 1, "w1", &meta()).await.unwrap();
    w.docs.delete(id, owner, &meta()).await.unwrap();
    w.docs
        .job_failed(job, 1, "gone", false, &meta())
        .await
        .unwrap();
    ids.push(id);
    // Dead-lettered, redriven, and running again.
    let id = w.request(owner, 10).await;
    let job = w.confirm(id, 10, "d").await;
    w.docs.start_job(job, 1, "w1", &meta()).await.unwrap();
    w.docs
        .job_failed(job, 1, "encrypted", false, &meta())
        .await
        .unwrap();
    w.db.aggregates::<AiJob>()
        .execute(
            &job.to_string(),
            AiJobCommand::Redrive {
                by: "ops".into(),
                reason: "test".into(),
                message: None,
            },
            &(),
            None,
            &meta(),
        )
        .await
        .unwrap();
    w.docs.start_job(job, 1, "w2", &meta()).await.unwrap();
    ids.push(id);
    // Still waiting for its upload.
    ids.push(w.request(owner, 10).await);
    w.catch_up().await;

    let views = async |store: &dyn DocumentStore| {
        let mut out = Vec::new();
        for id in &ids {
            out.push(store.get(*id).await.unwrap().expect("no view"));
        }
        out
    };
    let expected = views(&*w.store).await;
    assert_eq!(
        expected[0].job.as_ref().unwrap().analysis,
        Some(analysis(3))
    );
    assert_eq!(expected[1].status, DocumentState::Rejected);
    assert_eq!(expected[2].status, DocumentState::Deleted);
    assert_eq!(
        expected[2].job.as_ref().unwrap().status,
        JobState::DeadLettered
    );
    let redriven = expected[3].job.as_ref().unwrap();
    assert_eq!(
        (redriven.status, redriven.redrives, redriven.attempts),
        (JobState::Running, 1, 2)
    );
    assert_eq!(expected[4].status, DocumentState::AwaitingUpload);

    // The whole feed again (a crash before any checkpoint moved), twice.
    let all = w.all_events().await;
    for _ in 0..2 {
        w.projection.apply(&all).await.unwrap();
        assert_eq!(views(&*w.store).await, expected);
    }
    // Part of it again, then all of it (a crash part-way through a batch).
    w.projection.apply(&all[all.len() / 2..]).await.unwrap();
    w.projection.apply(&all).await.unwrap();
    assert_eq!(views(&*w.store).await, expected);

    // A rebuild from zero into an empty store, in one batch.
    let fresh = w.spare_store().await;
    DocumentsProjection(fresh.clone())
        .apply(&all)
        .await
        .unwrap();
    assert_eq!(views(&*fresh).await, expected);
    // …and one event at a time.
    let fresh = w.spare_store().await;
    let p = DocumentsProjection(fresh.clone());
    for e in &all {
        p.apply(std::slice::from_ref(e)).await.unwrap();
    }
    assert_eq!(views(&*fresh).await, expected);
    let listed = fresh.list(owner, 10, None).await.unwrap();
    assert_eq!(listed.len(), 4, "the deleted one is not listed");
}

/// Through the engine, as the application runs it: the projector is the commands'
/// after-commit hook, so each command's answer comes after its view changed.
async fn the_engine_projects_each_command_before_it_answers(w: World) {
    let owner = UserId::new_v7();
    let id = w.request(owner, 10).await;
    assert_eq!(w.view(id).await.status, DocumentState::AwaitingUpload);
    let job = w.confirm(id, 10, "e").await;
    let v = w.view(id).await;
    assert_eq!(v.status, DocumentState::Uploaded);
    assert_eq!(v.job.unwrap().status, JobState::Queued);
    w.docs.start_job(job, 1, "w1", &meta()).await.unwrap();
    assert_eq!(w.view(id).await.job.unwrap().status, JobState::Running);
    w.docs
        .job_succeeded(job, 1, analysis(5), &meta())
        .await
        .unwrap();
    assert_eq!(w.view(id).await.job.unwrap().analysis, Some(analysis(5)));
    w.docs.delete(id, owner, &meta()).await.unwrap();
    assert_eq!(w.view(id).await.status, DocumentState::Deleted);
    assert!(w.store.list(owner, 10, None).await.unwrap().is_empty());
}

async fn engine_world(backend: Backend, views: Views) -> World {
    world_with(backend, views, |db, store| {
        let projection: Arc<dyn Projection> = Arc::new(DocumentsProjection(store));
        Arc::new(Projector::new(
            db.feed(),
            CheckpointStore::new(db),
            vec![projection],
            ProjectorSettings {
                read_your_writes_timeout: Duration::from_secs(10),
                ..ProjectorSettings::default()
            },
        ))
    })
    .await
}

#[tokio::test]
async fn the_projection_handles_documents_and_jobs_only() {
    let p = DocumentsProjection(Arc::new(SqlDocuments::new(ReadModels::Sqlite(
        sqlx::SqlitePool::connect_lazy("sqlite::memory:").unwrap(),
    ))));
    assert_eq!(p.name(), "documents");
    assert!(p.handles("document", "UploadRequested"));
    assert!(p.handles("ai_job", "JobSucceeded"));
    assert!(!p.handles("profile", "ProfileUpdated"));
    assert!(!p.handles("user", "UserRegistered"));
}

macro_rules! projection_tests {
    ($($setup:ident => ($backend:expr, $views:expr)),* $(,)?) => {
        $(
            mod $setup {
                use super::*;
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn request_to_analysis() {
                    a_document_goes_from_request_to_analysis(world($backend, $views).await).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn retry_then_dead_letter() {
                    failed_attempts_retry_then_dead_letter(world($backend, $views).await).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn refused_upload() {
                    a_refused_upload_says_why(world($backend, $views).await).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn deleted() {
                    a_deleted_document_leaves_the_listing(world($backend, $views).await).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn reapply_and_rebuild() {
                    reapplying_or_rebuilding_gives_the_same_views(world($backend, $views).await).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn through_the_engine() {
                    the_engine_projects_each_command_before_it_answers(
                        engine_world($backend, $views).await,
                    )
                    .await
                }
            }
        )*
    };
}

projection_tests!(
    sqlite => (Backend::Sqlite, Views::Sql),
    postgres => (Backend::Postgres, Views::Sql),
    documentdb => (Backend::Sqlite, Views::DocumentDb),
);
