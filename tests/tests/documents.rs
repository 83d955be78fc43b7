//! The documents service on both event stores: upload request, confirmation from storage
//! notifications (delivered more than once), refusals, deletion by the owner only, and a
//! job's life through its attempts to success or the dead-letter queue.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use commands::documents::{Confirmation, Documents};
use commands::{CommandError, CommandMeta, NoAfterCommit};
use domain::{
    AiJobError, Analysis, ContentType, DocumentError, DocumentSize, DocumentStatus, FileName,
    JobStatus, Rejection, Sniffed, UserId,
};
use tests::{Backend, TestDb, on_both_backends};

fn meta() -> CommandMeta {
    CommandMeta::system("test")
}

async fn service(db: &TestDb) -> Documents {
    Documents::new(&db.connect().await, Arc::new(NoAfterCommit), 3)
}

async fn requested(docs: &Documents, owner: UserId, size: u64) -> domain::DocumentId {
    let (id, key) = docs
        .request_upload(
            owner,
            FileName::parse("report.pdf").unwrap(),
            ContentType::Pdf,
            DocumentSize::parse(size, 25 << 20).unwrap(),
            &meta(),
        )
        .await
        .unwrap();
    assert_eq!(key.as_str(), format!("documents/{owner}/{id}"));
    id
}

/// A notification delivered three times: one confirmation, one job.
async fn duplicate_notifications_make_one_job(backend: Backend) {
    let db = TestDb::new(backend).await;
    let docs = service(&db).await;
    let owner = UserId::new_v7();
    let id = requested(&docs, owner, 1000).await;
    let mut jobs = Vec::new();
    for _ in 0..3 {
        match docs
            .confirm_upload(id, 1000, "\"etag-1\"", Sniffed::Pdf, &meta())
            .await
            .unwrap()
        {
            Confirmation::Job(j) => jobs.push(j),
            other => panic!("{other:?}"),
        }
    }
    assert!(jobs.windows(2).all(|w| w[0] == w[1]), "{jobs:?}");
    // A notification of another object under the same key, after the confirmation:
    // not the document; no second job.
    assert_eq!(
        docs.confirm_upload(id, 1000, "etag-2", Sniffed::Pdf, &meta())
            .await
            .unwrap(),
        Confirmation::Ignored
    );
    let job = docs.job(jobs[0]).await.unwrap();
    assert_eq!(job.version, 1, "one JobRequested");
    assert_eq!(job.state.status, JobStatus::Queued);
    let doc = docs.document(id).await.unwrap();
    assert_eq!(doc.version, 2, "UploadRequested, UploadConfirmed");
    assert_eq!(doc.state.status, DocumentStatus::Uploaded);
}

/// An object that is not what was declared is refused, and no job is asked for.
async fn a_mismatched_object_is_refused_without_a_job(backend: Backend) {
    let db = TestDb::new(backend).await;
    let docs = service(&db).await;
    let id = requested(&docs, UserId::new_v7(), 1000).await;
    let c = docs
        .confirm_upload(id, 1000, "e", Sniffed::Other, &meta())
        .await
        .unwrap();
    assert_eq!(
        c,
        Confirmation::Rejected(Rejection::TypeMismatch {
            declared: ContentType::Pdf,
            sniffed: Sniffed::Other
        })
    );
    // Again (a duplicate notification): the same answer, nothing new recorded.
    let again = docs
        .confirm_upload(id, 1000, "e", Sniffed::Other, &meta())
        .await
        .unwrap();
    assert_eq!(again, c);
    assert_eq!(docs.document(id).await.unwrap().version, 2);
    let size = requested(&docs, UserId::new_v7(), 1000).await;
    assert_eq!(
        docs.confirm_upload(size, 5, "e", Sniffed::Pdf, &meta())
            .await
            .unwrap(),
        Confirmation::Rejected(Rejection::SizeMismatch {
            declared: 1000,
            actual: 5
        })
    );
}

/// Only the owner deletes; anyone else is told there is no such document.
async fn only_the_owner_deletes(backend: Backend) {
    let db = TestDb::new(backend).await;
    let docs = service(&db).await;
    let owner = UserId::new_v7();
    let id = requested(&docs, owner, 10).await;
    let stranger = docs.delete(id, UserId::new_v7(), &meta()).await;
    assert!(matches!(
        stranger,
        Err(CommandError::Rejected(DocumentError::NotFound))
    ));
    docs.delete(id, owner, &meta()).await.unwrap();
    assert_eq!(
        docs.document(id).await.unwrap().state.status,
        DocumentStatus::Deleted
    );
    // A late notification for a deleted document: nothing to analyse.
    assert_eq!(
        docs.confirm_upload(id, 10, "e", Sniffed::Pdf, &meta())
            .await
            .unwrap(),
        Confirmation::Gone
    );
}

/// Three failed attempts dead-letter the job; a success before that is final, and a
/// late result after it is only recorded.
async fn a_job_lives_through_its_attempts(backend: Backend) {
    let db = TestDb::new(backend).await;
    let docs = service(&db).await;
    let id = requested(&docs, UserId::new_v7(), 10).await;
    let Confirmation::Job(job) = docs
        .confirm_upload(id, 10, "e1", Sniffed::Pdf, &meta())
        .await
        .unwrap()
    else {
        panic!("no job");
    };
    for attempt in 1..=3 {
        let started = docs.start_job(job, attempt, "w1", &meta()).await.unwrap();
        assert_eq!(started.attempt, attempt);
        assert_eq!(started.etag, "e1");
        let dead = docs
            .job_failed(job, attempt, "parser timed out", true, &meta())
            .await
            .unwrap();
        assert_eq!(dead, attempt == 3, "attempt {attempt}");
    }
    assert_eq!(
        docs.job(job).await.unwrap().state.status,
        JobStatus::DeadLettered
    );
    assert!(matches!(
        docs.start_job(job, 4, "w1", &meta()).await,
        Err(CommandError::Rejected(AiJobError::Finished))
    ));

    // Another document: success is final.
    let id = requested(&docs, UserId::new_v7(), 10).await;
    let Confirmation::Job(job) = docs
        .confirm_upload(id, 10, "e2", Sniffed::Pdf, &meta())
        .await
        .unwrap()
    else {
        panic!("no job");
    };
    docs.start_job(job, 1, "w1", &meta()).await.unwrap();
    // The message's visibility ran out; a second worker starts attempt 2 and wins.
    docs.start_job(job, 2, "w2", &meta()).await.unwrap();
    // A duplicate delivery of the notification (same receive count) does not run it twice.
    assert!(matches!(
        docs.start_job(job, 2, "w3", &meta()).await,
        Err(CommandError::Rejected(AiJobError::AlreadyStarted))
    ));
    let result = |words| Analysis {
        sha256: "ab".into(),
        words,
        ..Analysis::default()
    };
    docs.job_succeeded(job, 2, result(20), &meta())
        .await
        .unwrap();
    docs.job_succeeded(job, 1, result(10), &meta())
        .await
        .unwrap();
    let events = db
        .connect()
        .await
        .aggregates::<domain::AiJob>()
        .events(&job.to_string())
        .await
        .unwrap();
    let names: Vec<String> = events
        .iter()
        .map(|(_, e)| cqrs_es::DomainEvent::event_type(e))
        .collect();
    assert_eq!(
        names,
        [
            "JobRequested",
            "JobStarted",
            "JobStarted",
            "JobSucceeded",
            "LateOutcomeRecorded"
        ]
    );
    let succeeded = events
        .iter()
        .find_map(|(_, e)| match e {
            domain::AiJobEvent::JobSucceeded { analysis, .. } => Some(analysis.words),
            _ => None,
        })
        .unwrap();
    assert_eq!(succeeded, 20, "the late result did not overwrite the first");
}

on_both_backends!(
    duplicate_notifications_make_one_job,
    a_mismatched_object_is_refused_without_a_job,
    only_the_owner_deletes,
    a_job_lives_through_its_attempts,
);
