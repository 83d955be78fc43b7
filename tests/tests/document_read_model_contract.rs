//! The documents read-model port's contract, run against every adapter: SQL on SQLite and
//! Postgres, and DocumentDB (SecantusDB here).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use chrono::{DateTime, TimeZone, Utc};
use domain::{Analysis, DocumentId, Entities, JobId, PiiFlags, UserId};
use projections::documents::{DocumentState, DocumentStore, JobState, JobView, SqlDocuments};
use projections::{DocumentView, ReadModels};
use tests::{Backend, TestDb, TestMongo};

/// Keeps whatever backs a store alive for the test.
struct Subject {
    store: Arc<dyn DocumentStore>,
    _db: Option<TestDb>,
    _mongo: Option<TestMongo>,
}

async fn sql(backend: Backend) -> Subject {
    let db = TestDb::new(backend).await;
    let store = Arc::new(SqlDocuments::new(ReadModels::new(&db.connect().await)));
    Subject {
        store,
        _db: Some(db),
        _mongo: None,
    }
}

async fn mongo() -> Subject {
    let m = TestMongo::new();
    let store = Arc::new(m.documents().await);
    Subject {
        store,
        _db: None,
        _mongo: Some(m),
    }
}

/// A whole-millisecond instant `ms` after a fixed origin (the precision every store keeps).
fn at(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(1_790_000_000_000 + ms).unwrap()
}

fn view(owner: UserId, created: i64) -> DocumentView {
    DocumentView {
        document_id: DocumentId::new_v7(),
        owner_id: owner,
        filename: "report.pdf".to_owned(),
        content_type: "application/pdf".to_owned(),
        declared_size: 1000,
        status: DocumentState::AwaitingUpload,
        rejection: None,
        size: None,
        etag: None,
        created_at: at(created),
        updated_at: at(created),
        job: None,
        doc_seq: 1,
        job_seq: 0,
    }
}

fn analysis() -> Analysis {
    Analysis {
        sha256: "ab".repeat(32),
        language: Some("eng".to_owned()),
        pages: Some(3),
        words: 1020,
        characters: 6400,
        keywords: vec!["karmic".to_owned(), "documents".to_owned()],
        summary: vec!["It begins.".to_owned(), "It ends.".to_owned()],
        entities: Entities {
            emails: vec!["ann@example.com".to_owned()],
            urls: vec!["https://example.com/".to_owned()],
            dates: vec!["2026-11-29".to_owned()],
            phone_numbers: vec![],
            money: vec!["€12.50".to_owned()],
        },
        pii: PiiFlags {
            email: true,
            phone: false,
            card_number: false,
            iban: true,
        },
        note: None,
    }
}

/// A view with every field set: an uploaded document whose job succeeded after a redrive.
fn analysed(owner: UserId, created: i64) -> DocumentView {
    let mut v = view(owner, created);
    v.status = DocumentState::Uploaded;
    v.size = Some(1000);
    v.etag = Some("9b2cf535f27731c974343645a3985328".to_owned());
    v.rejection = Some("not used here, but stored all the same".to_owned());
    v.updated_at = at(created + 90);
    v.doc_seq = 2;
    v.job_seq = 9;
    v.job = Some(JobView {
        job_id: JobId::for_object(v.document_id, "9b2cf535f27731c974343645a3985328"),
        status: JobState::Succeeded,
        attempts: 4,
        max_attempts: 3,
        last_error: Some("extractor timed out".to_owned()),
        worker: Some("worker-i-0abc".to_owned()),
        started_at: Some(at(created + 60)),
        finished_at: Some(at(created + 90)),
        dead_lettered_at: Some(at(created + 30)),
        analysis: Some(analysis()),
        redrives: 1,
    });
    v
}

async fn missing_documents_are_none(s: Subject) {
    assert_eq!(s.store.get(DocumentId::new_v7()).await.unwrap(), None);
    let job = JobId::for_object(DocumentId::new_v7(), "e");
    assert_eq!(s.store.by_job(job).await.unwrap(), None);
    assert!(
        s.store
            .list(UserId::new_v7(), 10, None)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn a_stored_view_reads_back_field_for_field(s: Subject) {
    let owner = UserId::new_v7();
    let plain = view(owner, 0);
    s.store.put(&plain).await.unwrap();
    assert_eq!(s.store.get(plain.document_id).await.unwrap(), Some(plain));
    let full = analysed(owner, 5);
    s.store.put(&full).await.unwrap();
    assert_eq!(
        s.store.get(full.document_id).await.unwrap(),
        Some(full.clone())
    );
    // The same view in the listing.
    let listed = s.store.list(owner, 1, None).await.unwrap();
    assert_eq!(listed, vec![full]);
}

async fn a_view_is_found_by_its_job(s: Subject) {
    let owner = UserId::new_v7();
    let v = analysed(owner, 0);
    let other = analysed(owner, 1);
    s.store.put(&v).await.unwrap();
    s.store.put(&other).await.unwrap();
    s.store.put(&view(owner, 2)).await.unwrap();
    let job = v.job.as_ref().unwrap().job_id;
    assert_eq!(s.store.by_job(job).await.unwrap(), Some(v));
    let job = other.job.as_ref().unwrap().job_id;
    assert_eq!(s.store.by_job(job).await.unwrap(), Some(other));
}

/// Newest first, ties on `created_at` broken by the id (descending), and pages that
/// neither repeat nor skip a document even when a page boundary falls inside a tie.
async fn listing_is_newest_first_and_pages_through_ties(s: Subject) {
    let owner = UserId::new_v7();
    let mut all = Vec::new();
    for created in [10, 20, 20, 20, 20, 30, 5, 20, 30] {
        let v = view(owner, created);
        s.store.put(&v).await.unwrap();
        all.push(v);
    }
    all.sort_by_key(|v| std::cmp::Reverse((v.created_at, v.document_id)));
    assert_eq!(s.store.list(owner, 100, None).await.unwrap(), all);
    assert_eq!(s.store.list(owner, 3, None).await.unwrap(), all[..3]);
    for size in [1, 2, 3, 4] {
        let mut pages = Vec::new();
        let mut before = None;
        loop {
            let page = s.store.list(owner, size, before).await.unwrap();
            assert!(page.len() <= size as usize);
            let Some(last) = page.last() else { break };
            before = Some((last.created_at, last.document_id));
            pages.extend(page);
        }
        assert_eq!(pages, all, "pages of {size}");
    }
    // A cursor inside the tie at 20: the rest of the tie, then older ones.
    let cursor = &all[3];
    assert_eq!(cursor.created_at, at(20));
    let rest = s
        .store
        .list(owner, 100, Some((cursor.created_at, cursor.document_id)))
        .await
        .unwrap();
    assert_eq!(rest, all[4..]);
    assert_eq!(s.store.list(owner, 0, None).await.unwrap(), vec![]);
}

async fn other_owners_documents_are_not_listed(s: Subject) {
    let (ann, bob) = (UserId::new_v7(), UserId::new_v7());
    let a = view(ann, 1);
    let b = view(bob, 2);
    s.store.put(&a).await.unwrap();
    s.store.put(&b).await.unwrap();
    assert_eq!(s.store.list(ann, 10, None).await.unwrap(), vec![a]);
    assert_eq!(s.store.list(bob, 10, None).await.unwrap(), vec![b]);
    assert_eq!(
        s.store.list(UserId::new_v7(), 10, None).await.unwrap(),
        vec![]
    );
}

async fn deleted_documents_are_read_but_not_listed(s: Subject) {
    let owner = UserId::new_v7();
    let kept = view(owner, 1);
    let mut gone = analysed(owner, 2);
    gone.status = DocumentState::Deleted;
    gone.doc_seq = 3;
    s.store.put(&kept).await.unwrap();
    s.store.put(&gone).await.unwrap();
    assert_eq!(
        s.store.list(owner, 10, None).await.unwrap(),
        vec![kept.clone()]
    );
    // Paging past where it would have been changes nothing either.
    assert_eq!(
        s.store
            .list(owner, 10, Some((at(3), DocumentId::new_v7())))
            .await
            .unwrap(),
        vec![kept]
    );
    assert_eq!(s.store.get(gone.document_id).await.unwrap(), Some(gone));
}

/// `put` replaces whatever is stored, whatever its sequences: the projection decides.
async fn put_overwrites(s: Subject) {
    let owner = UserId::new_v7();
    let first = analysed(owner, 1);
    s.store.put(&first).await.unwrap();
    let old_job = first.job.as_ref().unwrap().job_id;

    let mut second = first.clone();
    second.status = DocumentState::Rejected;
    second.rejection = Some("size mismatch".to_owned());
    second.created_at = at(7);
    second.doc_seq = 1;
    second.job_seq = 0;
    let new_job = JobView {
        job_id: JobId::for_object(second.document_id, "other"),
        status: JobState::Retrying,
        analysis: None,
        ..first.job.clone().unwrap()
    };
    second.job = Some(new_job.clone());
    s.store.put(&second).await.unwrap();
    assert_eq!(
        s.store.get(second.document_id).await.unwrap(),
        Some(second.clone())
    );
    assert_eq!(s.store.by_job(old_job).await.unwrap(), None);
    assert_eq!(
        s.store.by_job(new_job.job_id).await.unwrap(),
        Some(second.clone())
    );
    assert_eq!(
        s.store.list(owner, 10, None).await.unwrap(),
        vec![second.clone()]
    );

    // Deleted by an overwrite: out of the listing; without a job: not found by it.
    let mut third = second.clone();
    third.status = DocumentState::Deleted;
    third.job = None;
    s.store.put(&third).await.unwrap();
    assert_eq!(s.store.list(owner, 10, None).await.unwrap(), vec![]);
    assert_eq!(s.store.by_job(new_job.job_id).await.unwrap(), None);
    assert_eq!(s.store.get(third.document_id).await.unwrap(), Some(third));
}

/// The JSON of a view is the shape the HTTP layer and the SQL `body` share.
#[test]
fn states_are_snake_case_in_json() {
    let mut v = analysed(UserId::new_v7(), 0);
    v.status = DocumentState::AwaitingUpload;
    let json = serde_json::to_value(&v).unwrap();
    assert_eq!(json["status"], "awaiting_upload");
    assert_eq!(json["job"]["status"], "succeeded");
    v.job.as_mut().unwrap().status = JobState::DeadLettered;
    assert_eq!(
        serde_json::to_value(&v).unwrap()["job"]["status"],
        "dead_lettered"
    );
    let back: DocumentView = serde_json::from_value(serde_json::to_value(&v).unwrap()).unwrap();
    assert_eq!(back, v);
}

macro_rules! contract {
    ($($adapter:ident => $make:expr),* $(,)?) => {
        $(
            mod $adapter {
                use super::*;
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn missing() { missing_documents_are_none($make).await }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn reads_back() { a_stored_view_reads_back_field_for_field($make).await }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn by_job() { a_view_is_found_by_its_job($make).await }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn newest_first_in_pages() { listing_is_newest_first_and_pages_through_ties($make).await }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn owners_apart() { other_owners_documents_are_not_listed($make).await }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn deleted() { deleted_documents_are_read_but_not_listed($make).await }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn overwrites() { put_overwrites($make).await }
            }
        )*
    };
}

contract!(
    sqlite => sql(Backend::Sqlite).await,
    postgres => sql(Backend::Postgres).await,
    documentdb => mongo().await,
);
