//! Documents and their analysis jobs: the application service that the upload endpoint
//! and the worker drive. Object storage and the queue stay outside it: what they report
//! (an object's size, ETag and first bytes; a message's receive count) is placed in the
//! commands, so every decision is the aggregates' and every outcome is an event.
//!
//! Storage notifications and queue messages arrive at least once, so every step here is
//! idempotent: confirming an upload twice records it once, and the job an upload asks for
//! is keyed by the document and the object's ETag, so a repeated request names the same
//! job and records nothing new.

use std::sync::Arc;

use domain::{
    AiJob, AiJobCommand, AiJobError, Analysis, ContentType, Document, DocumentCommand,
    DocumentError, DocumentId, DocumentSize, DocumentStatus, FileName, JobId, ObjectKey, Rejection,
    Sniffed, UserId,
};

use crate::error::CommandError;
use crate::store::{AggregateStore, Database, Loaded};
use crate::{AfterCommit, CommandMeta, StoreError};

/// The documents and AI-jobs application service.
#[derive(Clone)]
pub struct Documents {
    documents: AggregateStore<Document>,
    jobs: AggregateStore<AiJob>,
    after_commit: Arc<dyn AfterCommit>,
    max_attempts: u32,
}

/// What a storage notification led to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confirmation {
    /// The object is the declared document: its analysis job (new or, for a repeated
    /// notification, the same one).
    Job(JobId),
    /// The object is not what was declared: the document is refused (the caller deletes
    /// the object).
    Rejected(Rejection),
    /// The document was deleted before: nothing to do but drop the object.
    Gone,
    /// The document was confirmed with another object (this notification is of a second
    /// upload to the same key, or out of order): nothing to do, and the object stays.
    Ignored,
}

/// What a worker needs to run a job it has started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartedJob {
    /// The job's number for this attempt: pass it to `job_succeeded` / `job_failed`.
    pub attempt: u32,
    pub object_key: ObjectKey,
    pub etag: String,
    pub content_type: ContentType,
}

impl Documents {
    /// `max_attempts`: how many attempts a job gets before it is dead-lettered (the
    /// queue's `maxReceiveCount`).
    pub fn new(db: &Database, after_commit: Arc<dyn AfterCommit>, max_attempts: u32) -> Self {
        Documents {
            documents: db.aggregates(),
            jobs: db.aggregates(),
            after_commit,
            max_attempts: max_attempts.max(1),
        }
    }

    /// Record an upload request. The object key is derived from the owner and the new
    /// document's id, never from the filename.
    pub async fn request_upload(
        &self,
        owner: UserId,
        filename: FileName,
        content_type: ContentType,
        size: DocumentSize,
        meta: &CommandMeta,
    ) -> Result<(DocumentId, ObjectKey), CommandError<DocumentError>> {
        let document_id = DocumentId::new_v7();
        let committed = self
            .documents
            .execute(
                &document_id.to_string(),
                DocumentCommand::RequestUpload {
                    document_id,
                    owner,
                    filename,
                    content_type,
                    size,
                },
                &(),
                None,
                meta,
            )
            .await?;
        self.after_commit.committed(&committed.written).await;
        Ok((document_id, ObjectKey::for_document(owner, document_id)))
    }

    /// Storage says the object arrived: confirm the document (or refuse it) and ask for
    /// its analysis. Safe to repeat: a repeated notification confirms nothing new and
    /// names the same job.
    pub async fn confirm_upload(
        &self,
        document: DocumentId,
        size: u64,
        etag: &str,
        sniffed: Sniffed,
        meta: &CommandMeta,
    ) -> Result<Confirmation, CommandError<DocumentError>> {
        let etag = etag.trim_matches('"').to_owned();
        let committed = self
            .documents
            .execute(
                &document.to_string(),
                DocumentCommand::ConfirmUpload {
                    size,
                    etag: etag.clone(),
                    sniffed,
                },
                &(),
                None,
                meta,
            )
            .await?;
        self.after_commit.committed(&committed.written).await;
        let state = self.documents.load(&document.to_string()).await?.state;
        match state.status {
            DocumentStatus::Uploaded if state.etag.as_deref() == Some(etag.as_str()) => {}
            // Confirmed with another object: this one is not the document's.
            DocumentStatus::Uploaded => return Ok(Confirmation::Ignored),
            DocumentStatus::Deleted | DocumentStatus::None => return Ok(Confirmation::Gone),
            DocumentStatus::Rejected | DocumentStatus::AwaitingUpload => {
                return Ok(match self.rejection(document).await? {
                    Some(r) => Confirmation::Rejected(r),
                    None => Confirmation::Gone,
                });
            }
        }
        let (Some(owner), Some(object_key), Some(content_type)) =
            (state.owner, state.object_key.clone(), state.content_type)
        else {
            return Err(
                StoreError::msg(format!("document {document} is uploaded but incomplete")).into(),
            );
        };
        let job_id = JobId::for_object(document, &etag);
        let committed = self
            .jobs
            .execute(
                &job_id.to_string(),
                AiJobCommand::Request {
                    job_id,
                    document_id: document,
                    owner,
                    object_key,
                    etag,
                    content_type,
                    max_attempts: self.max_attempts,
                },
                &(),
                None,
                meta,
            )
            .await
            .map_err(|e| job_to_document_error(e, document))?;
        self.after_commit.committed(&committed.written).await;
        Ok(Confirmation::Job(job_id))
    }

    /// Why the document was refused, from its events.
    async fn rejection(&self, document: DocumentId) -> Result<Option<Rejection>, StoreError> {
        let events = self.documents.events(&document.to_string()).await?;
        Ok(events.into_iter().rev().find_map(|(_, e)| match e {
            domain::DocumentEvent::DocumentRejected { reason } => Some(reason),
            _ => None,
        }))
    }

    /// The owner deletes a document. Anyone else is told it does not exist.
    pub async fn delete(
        &self,
        document: DocumentId,
        by: UserId,
        meta: &CommandMeta,
    ) -> Result<Loaded<Document>, CommandError<DocumentError>> {
        let loaded = self.documents.load(&document.to_string()).await?;
        if loaded.state.owner != Some(by) {
            return Err(CommandError::Rejected(DocumentError::NotFound));
        }
        let committed = self
            .documents
            .execute(
                &document.to_string(),
                DocumentCommand::Delete { by },
                &(),
                None,
                meta,
            )
            .await?;
        self.after_commit.committed(&committed.written).await;
        Ok(loaded)
    }

    /// A document as folded from its events.
    pub async fn document(&self, document: DocumentId) -> Result<Loaded<Document>, StoreError> {
        self.documents.load(&document.to_string()).await
    }

    /// A job as folded from its events.
    pub async fn job(&self, job: JobId) -> Result<Loaded<AiJob>, StoreError> {
        self.jobs.load(&job.to_string()).await
    }

    /// A worker took the job's message (`attempt`: the queue's receive count). Returns
    /// what the worker needs; `Rejected(Finished)` tells it to drop the message.
    pub async fn start_job(
        &self,
        job: JobId,
        attempt: u32,
        worker: &str,
        meta: &CommandMeta,
    ) -> Result<StartedJob, CommandError<AiJobError>> {
        let committed = self
            .jobs
            .execute(
                &job.to_string(),
                AiJobCommand::Start {
                    attempt,
                    worker: worker.to_owned(),
                },
                &(),
                None,
                meta,
            )
            .await?;
        self.after_commit.committed(&committed.written).await;
        let state = self.jobs.load(&job.to_string()).await?.state;
        if state.status == domain::JobStatus::DeadLettered {
            // This receive was one too many: the job is dead-lettered (move the message).
            return Err(CommandError::Rejected(AiJobError::Finished));
        }
        if committed.written.is_empty() {
            // Nothing new: this attempt (or a later one) was started by another delivery
            // of the same notification. That delivery carries the job; this copy goes.
            return Err(CommandError::Rejected(AiJobError::AlreadyStarted));
        }
        match (state.object_key, state.content_type) {
            (Some(object_key), Some(content_type)) => Ok(StartedJob {
                attempt: state.attempt_base + attempt,
                object_key,
                etag: state.etag,
                content_type,
            }),
            _ => Err(CommandError::Rejected(AiJobError::NotFound)),
        }
    }

    /// The attempt's analysis. A job succeeds once; a later result is recorded only.
    pub async fn job_succeeded(
        &self,
        job: JobId,
        attempt: u32,
        analysis: Analysis,
        meta: &CommandMeta,
    ) -> Result<(), CommandError<AiJobError>> {
        let committed = self
            .jobs
            .execute(
                &job.to_string(),
                AiJobCommand::Succeed { attempt, analysis },
                &(),
                None,
                meta,
            )
            .await?;
        self.after_commit.committed(&committed.written).await;
        Ok(())
    }

    /// The attempt failed. Returns whether the job is now dead-lettered (the last attempt
    /// failed, or retrying cannot help), in which case the caller moves its message to
    /// the dead-letter queue.
    pub async fn job_failed(
        &self,
        job: JobId,
        attempt: u32,
        error: &str,
        retryable: bool,
        meta: &CommandMeta,
    ) -> Result<bool, CommandError<AiJobError>> {
        let committed = self
            .jobs
            .execute(
                &job.to_string(),
                AiJobCommand::Fail {
                    attempt,
                    error: error.to_owned(),
                    retryable,
                },
                &(),
                None,
                meta,
            )
            .await?;
        self.after_commit.committed(&committed.written).await;
        let state = self.jobs.load(&job.to_string()).await?.state;
        Ok(state.status == domain::JobStatus::DeadLettered)
    }
}

impl Documents {
    /// An operator sends a dead-lettered job round again. `message`: the dead-letter
    /// message being re-sent. `Ok(true)`: recorded now; `Ok(false)`: this message's
    /// redrive was recorded before (a redrive cut short, run again).
    pub async fn redrive_job(
        &self,
        job: JobId,
        by: &str,
        reason: &str,
        message: Option<&str>,
        meta: &CommandMeta,
    ) -> Result<bool, CommandError<AiJobError>> {
        let committed = self
            .jobs
            .execute(
                &job.to_string(),
                AiJobCommand::Redrive {
                    by: by.to_owned(),
                    reason: reason.to_owned(),
                    message: message.map(str::to_owned),
                },
                &(),
                None,
                meta,
            )
            .await?;
        self.after_commit.committed(&committed.written).await;
        Ok(!committed.written.is_empty())
    }

    /// The queue dead-lettered the job's message without the job recording it: record
    /// it. `Ok(false)`: it was recorded already.
    pub async fn record_dead_lettered(
        &self,
        job: JobId,
        reason: &str,
        meta: &CommandMeta,
    ) -> Result<bool, CommandError<AiJobError>> {
        let committed = self
            .jobs
            .execute(
                &job.to_string(),
                AiJobCommand::RecordDeadLettered {
                    reason: reason.to_owned(),
                },
                &(),
                None,
                meta,
            )
            .await?;
        self.after_commit.committed(&committed.written).await;
        Ok(!committed.written.is_empty())
    }
}

fn job_to_document_error(
    e: CommandError<AiJobError>,
    document: DocumentId,
) -> CommandError<DocumentError> {
    match e {
        CommandError::Store(s) => CommandError::Store(s),
        CommandError::Conflict => CommandError::Conflict,
        other => CommandError::Store(StoreError::msg(format!(
            "requesting the analysis of {document}: {other}"
        ))),
    }
}
