//! The documents read model: what an owner sees of each document and of its analysis,
//! the port it is stored behind (SQL or DocumentDB), and the projection that fills it.
//!
//! One view per document holds the document's own state and its analysis job's. The two
//! aggregates number their events separately, so a view remembers the last sequence it
//! applied of each (`doc_seq`, `job_seq`) and takes an event only when it is newer:
//! re-applied batches, duplicate deliveries and a rebuild from zero all end in the same
//! view. The store itself writes what it is given; the projection decides.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use commands::StoredEvent;
use cqrs_es::Aggregate;
use domain::{
    AiJob, AiJobEvent, Analysis, Document, DocumentEvent, DocumentId, JobId, Rejection, Sniffed,
    UserId,
};
use futures::TryStreamExt;
use mongodb::bson::{Bson, Document as BsonDocument, doc};
use mongodb::{Collection, Database as MongoDatabase, IndexModel};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use tracing::warn;

use crate::engine::Projection;
use crate::mongo::MongoSettings;
use crate::read_models::ReadModels;

/// Where a document is in its life, as its owner sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DocumentState {
    /// The upload URL is signed; nothing has arrived yet.
    AwaitingUpload,
    /// The object arrived and is what was declared.
    Uploaded,
    /// The object arrived and is not what was declared (see `rejection`).
    Rejected,
    /// The owner deleted it (kept, so that a read can answer "gone" rather than guess).
    Deleted,
}

impl DocumentState {
    /// The stored name (the serde name), for the SQL `status` column and queries.
    pub fn as_str(self) -> &'static str {
        match self {
            DocumentState::AwaitingUpload => "awaiting_upload",
            DocumentState::Uploaded => "uploaded",
            DocumentState::Rejected => "rejected",
            DocumentState::Deleted => "deleted",
        }
    }
}

/// Where a document's analysis job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Requested (or redriven) and waiting for a worker.
    Queued,
    /// A worker started an attempt.
    Running,
    /// The analysis is done (`analysis` holds it); final.
    Succeeded,
    /// An attempt failed and another one will come.
    Retrying,
    /// No more attempts: it failed for good until an operator redrives it.
    DeadLettered,
}

/// A document's analysis job, as shown with the document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobView {
    pub job_id: JobId,
    pub status: JobState,
    /// Attempts started so far (the job's own attempt number, which runs on across
    /// redrives).
    pub attempts: u32,
    /// Attempts a job gets before it is dead-lettered (per redrive).
    pub max_attempts: u32,
    /// The last failed attempt's error (or the dead-letter reason when no attempt
    /// reported one); cleared when the job succeeds.
    pub last_error: Option<String>,
    /// The worker of the latest attempt.
    pub worker: Option<String>,
    /// When the latest attempt started.
    pub started_at: Option<DateTime<Utc>>,
    /// When the job succeeded or was dead-lettered; cleared by a redrive.
    pub finished_at: Option<DateTime<Utc>>,
    /// When the job was last dead-lettered (kept after a redrive, see `redrives`).
    pub dead_lettered_at: Option<DateTime<Utc>>,
    /// The successful result. A late outcome never replaces it.
    pub analysis: Option<Analysis>,
    /// How many times an operator sent the job round again.
    pub redrives: u32,
}

/// A document as its owner reads it (`GET /documents/{id}` and the listing).
///
/// Timestamps are kept to the millisecond, the precision every store holds (BSON dates
/// have no more), so a view reads back equal to what was written whichever store holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DocumentView {
    pub document_id: DocumentId,
    pub owner_id: UserId,
    pub filename: String,
    /// The declared MIME type.
    pub content_type: String,
    /// The size the upload URL was signed for, in bytes.
    pub declared_size: u64,
    pub status: DocumentState,
    /// Why the arrived object was refused, in words.
    pub rejection: Option<String>,
    /// The size of the object that arrived.
    pub size: Option<u64>,
    /// The ETag of the object that arrived.
    pub etag: Option<String>,
    pub created_at: DateTime<Utc>,
    /// When the view last changed in a way a reader can see.
    pub updated_at: DateTime<Utc>,
    pub job: Option<JobView>,
    /// The last `Document` event sequence applied.
    pub doc_seq: i64,
    /// The last `AiJob` event sequence applied (of `job`).
    pub job_seq: i64,
}

/// The documents read-model port. Adapters: SQL ([`SqlDocuments`]) and DocumentDB
/// ([`MongoDocuments`]); one contract test suite runs against both.
#[async_trait::async_trait]
pub trait DocumentStore: Send + Sync {
    /// The view of a document, deleted ones included (the HTTP layer answers 404 for
    /// those).
    async fn get(&self, id: DocumentId) -> Result<Option<DocumentView>>;
    /// The view of the document whose analysis is `job`.
    async fn by_job(&self, job: JobId) -> Result<Option<DocumentView>>;
    /// Store `view` in place of whatever the store holds for its document: the projection
    /// decides what is newer, the store does not.
    async fn put(&self, view: &DocumentView) -> Result<()>;
    /// The owner's documents, newest first (`created_at`, then `document_id`, both
    /// descending), deleted ones left out, strictly after the cursor `before` (the
    /// `(created_at, document_id)` of the last item of the previous page).
    async fn list(
        &self,
        owner: UserId,
        limit: u32,
        before: Option<(DateTime<Utc>, DocumentId)>,
    ) -> Result<Vec<DocumentView>>;
}

/// The readable reason for a refused upload, as shown in `DocumentView::rejection`.
pub fn rejection_text(r: &Rejection) -> String {
    match r {
        Rejection::SizeMismatch { declared, actual } => format!(
            "size mismatch: the file that arrived is {actual} bytes, {declared} bytes were declared"
        ),
        Rejection::TypeMismatch { declared, sniffed } => {
            let looks = match sniffed {
                Sniffed::Pdf => "a PDF document",
                Sniffed::Docx => "a Word (DOCX) document",
                Sniffed::Text => "plain text",
                Sniffed::Other => "neither a PDF, a Word document nor text",
                Sniffed::Unread => "nothing (it was not read)",
            };
            format!(
                "type mismatch: declared as {}, but the content looks like {looks}",
                declared.mime()
            )
        }
        Rejection::TooLarge { actual } => format!(
            "too large: the file that arrived is {actual} bytes, more than the worker reads"
        ),
    }
}

/// `at` cut to whole milliseconds (see [`DocumentView`]).
fn millis(at: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(at.timestamp_millis()).unwrap_or(at)
}

// ---------------------------------------------------------------------------------------
// SQL

/// Documents in the SQL table `document_views`, on Postgres or SQLite: the whole view as
/// JSON in `body`, and beside it the columns that reads filter and sort by.
#[derive(Clone, Debug)]
pub struct SqlDocuments {
    db: ReadModels,
}

impl SqlDocuments {
    /// A store over the read-model database (migrated by `Database::migrate`).
    pub fn new(db: ReadModels) -> Self {
        SqlDocuments { db }
    }
}

/// RFC 3339, UTC, always six fractional digits: on SQLite, text order is then time order.
fn sqlite_ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn sqlite_view(r: &sqlx::sqlite::SqliteRow) -> Result<DocumentView> {
    let body: String = r.try_get("body")?;
    serde_json::from_str(&body).context("decoding a document view")
}

fn pg_view(r: &sqlx::postgres::PgRow) -> Result<DocumentView> {
    let body: sqlx::types::Json<DocumentView> =
        r.try_get("body").context("decoding a document view")?;
    Ok(body.0)
}

#[async_trait::async_trait]
impl DocumentStore for SqlDocuments {
    async fn get(&self, id: DocumentId) -> Result<Option<DocumentView>> {
        match &self.db {
            ReadModels::Postgres(p) => {
                sqlx::query("SELECT body FROM document_views WHERE document_id = $1")
                    .bind(id.as_uuid())
                    .fetch_optional(p)
                    .await
                    .context("reading document_views")?
                    .map(|r| pg_view(&r))
                    .transpose()
            }
            ReadModels::Sqlite(p) => {
                sqlx::query("SELECT body FROM document_views WHERE document_id = ?")
                    .bind(id.to_string())
                    .fetch_optional(p)
                    .await
                    .context("reading document_views")?
                    .map(|r| sqlite_view(&r))
                    .transpose()
            }
        }
    }

    async fn by_job(&self, job: JobId) -> Result<Option<DocumentView>> {
        match &self.db {
            ReadModels::Postgres(p) => {
                sqlx::query("SELECT body FROM document_views WHERE job_id = $1 LIMIT 1")
                    .bind(job.as_uuid())
                    .fetch_optional(p)
                    .await
                    .context("reading document_views by job")?
                    .map(|r| pg_view(&r))
                    .transpose()
            }
            ReadModels::Sqlite(p) => {
                sqlx::query("SELECT body FROM document_views WHERE job_id = ? LIMIT 1")
                    .bind(job.to_string())
                    .fetch_optional(p)
                    .await
                    .context("reading document_views by job")?
                    .map(|r| sqlite_view(&r))
                    .transpose()
            }
        }
    }

    async fn put(&self, v: &DocumentView) -> Result<()> {
        let job_id = v.job.as_ref().map(|j| j.job_id);
        match &self.db {
            ReadModels::Postgres(p) => {
                sqlx::query(
                    "INSERT INTO document_views
                        (document_id, owner_id, job_id, created_at, status, body)
                     VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT (document_id) DO UPDATE
                        SET owner_id = EXCLUDED.owner_id, job_id = EXCLUDED.job_id,
                            created_at = EXCLUDED.created_at, status = EXCLUDED.status,
                            body = EXCLUDED.body",
                )
                .bind(v.document_id.as_uuid())
                .bind(v.owner_id.as_uuid())
                .bind(job_id.map(|j| j.as_uuid()))
                .bind(v.created_at)
                .bind(v.status.as_str())
                .bind(sqlx::types::Json(v))
                .execute(p)
                .await
                .context("writing document_views")?;
            }
            ReadModels::Sqlite(p) => {
                let body = serde_json::to_string(v).context("encoding a document view")?;
                sqlx::query(
                    "INSERT INTO document_views
                        (document_id, owner_id, job_id, created_at, status, body)
                     VALUES (?, ?, ?, ?, ?, ?)
                     ON CONFLICT (document_id) DO UPDATE
                        SET owner_id = excluded.owner_id, job_id = excluded.job_id,
                            created_at = excluded.created_at, status = excluded.status,
                            body = excluded.body",
                )
                .bind(v.document_id.to_string())
                .bind(v.owner_id.to_string())
                .bind(job_id.map(|j| j.to_string()))
                .bind(sqlite_ts(v.created_at))
                .bind(v.status.as_str())
                .bind(body)
                .execute(p)
                .await
                .context("writing document_views")?;
            }
        }
        Ok(())
    }

    async fn list(
        &self,
        owner: UserId,
        limit: u32,
        before: Option<(DateTime<Utc>, DocumentId)>,
    ) -> Result<Vec<DocumentView>> {
        let deleted = DocumentState::Deleted.as_str();
        match &self.db {
            ReadModels::Postgres(p) => sqlx::query(
                "SELECT body FROM document_views
                  WHERE owner_id = $1 AND status <> $2
                    AND ($3::timestamptz IS NULL OR (created_at, document_id) < ($3, $4::uuid))
                  ORDER BY created_at DESC, document_id DESC
                  LIMIT $5",
            )
            .bind(owner.as_uuid())
            .bind(deleted)
            .bind(before.map(|(at, _)| at))
            .bind(before.map(|(_, id)| id.as_uuid()))
            .bind(i64::from(limit))
            .fetch_all(p)
            .await
            .context("listing document_views")?
            .iter()
            .map(pg_view)
            .collect(),
            ReadModels::Sqlite(p) => sqlx::query(
                "SELECT body FROM document_views
                  WHERE owner_id = ?1 AND status <> ?2
                    AND (?3 IS NULL OR created_at < ?3
                         OR (created_at = ?3 AND document_id < ?4))
                  ORDER BY created_at DESC, document_id DESC
                  LIMIT ?5",
            )
            .bind(owner.to_string())
            .bind(deleted)
            .bind(before.map(|(at, _)| sqlite_ts(at)))
            .bind(before.map(|(_, id)| id.to_string()))
            .bind(i64::from(limit))
            .fetch_all(p)
            .await
            .context("listing document_views")?
            .iter()
            .map(sqlite_view)
            .collect(),
        }
    }
}

// ---------------------------------------------------------------------------------------
// DocumentDB

/// The collection of document views.
pub const DOCUMENTS_COLLECTION: &str = "documents";

/// Documents in DocumentDB (collection `documents`): the view's fields as a BSON document,
/// `_id` the document id, timestamps as BSON dates (so they sort as times). Only what
/// Amazon DocumentDB supports: single-document replaces, `find` with `$or`/`$lt`, sort.
#[derive(Clone, Debug)]
pub struct MongoDocuments {
    collection: Collection<BsonDocument>,
}

/// The view's timestamp fields, top level and in `job`.
const DATES: [&str; 2] = ["created_at", "updated_at"];
const JOB_DATES: [&str; 3] = ["started_at", "finished_at", "dead_lettered_at"];

fn bson_date(t: DateTime<Utc>) -> Bson {
    Bson::DateTime(mongodb::bson::DateTime::from_millis(t.timestamp_millis()))
}

/// Replace the RFC 3339 strings serde wrote at `keys` with BSON dates (or back).
fn convert_dates(d: &mut BsonDocument, keys: &[&str], to_bson: bool) -> Result<()> {
    for key in keys {
        let Some(value) = d.get_mut(*key) else {
            continue;
        };
        match (&*value, to_bson) {
            (Bson::String(s), true) => {
                let t = DateTime::parse_from_rfc3339(s)
                    .with_context(|| format!("parsing {key} {s:?}"))?
                    .with_timezone(&Utc);
                *value = bson_date(t);
            }
            (Bson::DateTime(t), false) => {
                let t = DateTime::<Utc>::from_timestamp_millis(t.timestamp_millis())
                    .with_context(|| format!("{key} out of range"))?;
                *value = Bson::String(t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
            }
            _ => {}
        }
    }
    Ok(())
}

fn to_bson_doc(v: &DocumentView) -> Result<BsonDocument> {
    let mut d = mongodb::bson::to_document(v).context("encoding a document view")?;
    d.remove("document_id");
    d.insert("_id", v.document_id.to_string());
    convert_dates(&mut d, &DATES, true)?;
    if let Some(Bson::Document(job)) = d.get_mut("job") {
        convert_dates(job, &JOB_DATES, true)?;
    }
    Ok(d)
}

fn from_bson_doc(mut d: BsonDocument) -> Result<DocumentView> {
    let id = d.remove("_id").context("a document view without _id")?;
    d.insert("document_id", id);
    convert_dates(&mut d, &DATES, false)?;
    if let Some(Bson::Document(job)) = d.get_mut("job") {
        convert_dates(job, &JOB_DATES, false)?;
    }
    mongodb::bson::from_document(d).context("decoding a document view")
}

impl MongoDocuments {
    /// A store on an existing database handle: share the client (its connection pool)
    /// with whatever else uses that DocumentDB.
    pub fn new(db: &MongoDatabase) -> Self {
        MongoDocuments {
            collection: db.collection(DOCUMENTS_COLLECTION),
        }
    }

    /// With a client of its own (see [`crate::mongo::connect_database`]).
    pub async fn connect(settings: &MongoSettings) -> Result<Self> {
        Ok(Self::new(&crate::mongo::connect_database(settings).await?))
    }

    /// Create the indexes: an owner's listing, newest first, and the lookup by job. Run
    /// by `karmic migrate`, never on the request path. Idempotent.
    pub async fn migrate(&self) -> Result<()> {
        let name = self.collection.name().to_owned();
        self.collection
            .create_indexes([
                IndexModel::builder()
                    .keys(doc! {"owner_id": 1, "created_at": -1, "_id": -1})
                    .build(),
                IndexModel::builder().keys(doc! {"job.job_id": 1}).build(),
            ])
            .await
            .with_context(|| format!("creating indexes on {name}"))?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl DocumentStore for MongoDocuments {
    async fn get(&self, id: DocumentId) -> Result<Option<DocumentView>> {
        self.collection
            .find_one(doc! {"_id": id.to_string()})
            .await
            .context("reading a document view from MongoDB")?
            .map(from_bson_doc)
            .transpose()
    }

    async fn by_job(&self, job: JobId) -> Result<Option<DocumentView>> {
        self.collection
            .find_one(doc! {"job.job_id": job.to_string()})
            .await
            .context("reading a document view by job from MongoDB")?
            .map(from_bson_doc)
            .transpose()
    }

    async fn put(&self, v: &DocumentView) -> Result<()> {
        self.collection
            .replace_one(doc! {"_id": v.document_id.to_string()}, to_bson_doc(v)?)
            .upsert(true)
            .await
            .context("writing a document view to MongoDB")?;
        Ok(())
    }

    async fn list(
        &self,
        owner: UserId,
        limit: u32,
        before: Option<(DateTime<Utc>, DocumentId)>,
    ) -> Result<Vec<DocumentView>> {
        if limit == 0 {
            // A limit of 0 means "no limit" to MongoDB.
            return Ok(Vec::new());
        }
        let mut filter = doc! {
            "owner_id": owner.to_string(),
            "status": {"$ne": DocumentState::Deleted.as_str()},
        };
        if let Some((at, id)) = before {
            filter.insert(
                "$or",
                vec![
                    doc! {"created_at": {"$lt": bson_date(at)}},
                    doc! {"created_at": bson_date(at), "_id": {"$lt": id.to_string()}},
                ],
            );
        }
        let docs: Vec<BsonDocument> = self
            .collection
            .find(filter)
            .sort(doc! {"created_at": -1, "_id": -1})
            .limit(i64::from(limit))
            .await
            .context("listing document views in MongoDB")?
            .try_collect()
            .await
            .context("listing document views in MongoDB")?;
        docs.into_iter().map(from_bson_doc).collect()
    }
}

// ---------------------------------------------------------------------------------------
// The projection

/// Projection: the documents read model (documents and their analysis jobs), into
/// whichever store is configured.
pub struct DocumentsProjection(pub Arc<dyn DocumentStore>);

impl DocumentView {
    /// The view an upload request starts (`None` for any other event: a view starts
    /// with its document's first event).
    fn requested(event: &DocumentEvent, sequence: i64, at: DateTime<Utc>) -> Option<Self> {
        let DocumentEvent::UploadRequested {
            document_id,
            owner,
            filename,
            content_type,
            size,
            ..
        } = event
        else {
            return None;
        };
        Some(DocumentView {
            document_id: *document_id,
            owner_id: *owner,
            filename: filename.clone(),
            content_type: content_type.mime().to_owned(),
            declared_size: *size,
            status: DocumentState::AwaitingUpload,
            rejection: None,
            size: None,
            etag: None,
            created_at: at,
            updated_at: at,
            job: None,
            doc_seq: sequence,
            job_seq: 0,
        })
    }

    fn apply_document(&mut self, event: DocumentEvent) {
        match event {
            DocumentEvent::UploadRequested {
                owner,
                filename,
                content_type,
                size,
                ..
            } => {
                self.owner_id = owner;
                self.filename = filename;
                self.content_type = content_type.mime().to_owned();
                self.declared_size = size;
            }
            DocumentEvent::UploadConfirmed { size, etag } => {
                self.status = DocumentState::Uploaded;
                self.size = Some(size);
                self.etag = Some(etag);
            }
            DocumentEvent::DocumentRejected { reason } => {
                self.status = DocumentState::Rejected;
                self.rejection = Some(rejection_text(&reason));
            }
            DocumentEvent::DocumentDeleted { .. } => self.status = DocumentState::Deleted,
        }
    }
}

impl JobView {
    fn queued(job_id: JobId, max_attempts: u32) -> Self {
        JobView {
            job_id,
            status: JobState::Queued,
            attempts: 0,
            max_attempts,
            last_error: None,
            worker: None,
            started_at: None,
            finished_at: None,
            dead_lettered_at: None,
            analysis: None,
            redrives: 0,
        }
    }

    fn finished(&self) -> bool {
        matches!(self.status, JobState::Succeeded | JobState::DeadLettered)
    }

    fn apply(&mut self, event: AiJobEvent, at: DateTime<Utc>) {
        match event {
            // The job exists already: a request is only ever its first event.
            AiJobEvent::JobRequested { .. } => {}
            AiJobEvent::JobStarted { attempt, worker } => {
                if !self.finished() {
                    self.status = JobState::Running;
                }
                self.attempts = self.attempts.max(attempt);
                self.worker = Some(worker);
                self.started_at = Some(at);
            }
            AiJobEvent::JobSucceeded { analysis, .. } => {
                // A job succeeds once: whatever comes after the first success is ignored.
                if self.status != JobState::Succeeded {
                    self.status = JobState::Succeeded;
                    self.analysis = Some(analysis);
                    self.last_error = None;
                    self.finished_at = Some(at);
                }
            }
            AiJobEvent::AttemptFailed { error, .. } => {
                if !self.finished() {
                    self.status = JobState::Retrying;
                    self.last_error = Some(error);
                }
            }
            AiJobEvent::JobDeadLettered { reason } => {
                if self.status != JobState::Succeeded {
                    self.status = JobState::DeadLettered;
                    self.dead_lettered_at = Some(at);
                    self.finished_at = Some(at);
                    if self.last_error.is_none() {
                        self.last_error = Some(reason);
                    }
                }
            }
            // Recorded for the audit trail only: never applied over the outcome.
            AiJobEvent::LateOutcomeRecorded { .. } => {}
            AiJobEvent::JobRedriven { .. } => {
                if self.status == JobState::DeadLettered {
                    self.status = JobState::Queued;
                    self.finished_at = None;
                }
                self.redrives += 1;
            }
        }
    }
}

/// One batch being folded: each affected view is read once, changed in memory, and
/// written once at the end.
struct Fold<'a> {
    store: &'a dyn DocumentStore,
    /// Views read so far (`None`: the store has none).
    views: HashMap<DocumentId, Option<DocumentView>>,
    /// Which document each job seen so far belongs to (`None`: no view knows the job).
    jobs: HashMap<JobId, Option<DocumentId>>,
    /// Views to write, in the order they first changed.
    changed: Vec<DocumentId>,
    changed_set: HashSet<DocumentId>,
}

impl<'a> Fold<'a> {
    fn new(store: &'a dyn DocumentStore) -> Self {
        Fold {
            store,
            views: HashMap::new(),
            jobs: HashMap::new(),
            changed: Vec::new(),
            changed_set: HashSet::new(),
        }
    }

    async fn load(&mut self, id: DocumentId) -> Result<()> {
        if !self.views.contains_key(&id) {
            let v = self.store.get(id).await?;
            if let Some(job) = v.as_ref().and_then(|v| v.job.as_ref()) {
                self.jobs.insert(job.job_id, Some(id));
            }
            self.views.insert(id, v);
        }
        Ok(())
    }

    async fn document_of_job(&mut self, job: JobId) -> Result<Option<DocumentId>> {
        if let Some(id) = self.jobs.get(&job) {
            return Ok(*id);
        }
        let found = self.store.by_job(job).await?;
        let id = found.as_ref().map(|v| v.document_id);
        if let Some(v) = found {
            self.views.entry(v.document_id).or_insert(Some(v));
        }
        self.jobs.insert(job, id);
        Ok(id)
    }

    fn touched(&mut self, id: DocumentId) {
        if self.changed_set.insert(id) {
            self.changed.push(id);
        }
    }

    async fn document_event(&mut self, e: &StoredEvent) -> Result<()> {
        let id = DocumentId::parse(&e.aggregate_id).context("document aggregate id")?;
        let event: DocumentEvent = e.decode()?;
        let at = millis(e.recorded_at);
        self.load(id).await?;
        let slot = self.views.entry(id).or_default();
        match slot {
            Some(v) if e.sequence <= v.doc_seq => return Ok(()),
            Some(v) => {
                let before = v.clone();
                v.apply_document(event);
                if *v != before {
                    v.updated_at = v.updated_at.max(at);
                }
                v.doc_seq = e.sequence;
            }
            None => match DocumentView::requested(&event, e.sequence, at) {
                Some(v) => *slot = Some(v),
                None => {
                    warn!(
                        document = %id,
                        event = %e.event_type,
                        sequence = e.sequence,
                        "no view of this document to apply the event to; skipped"
                    );
                    return Ok(());
                }
            },
        }
        self.touched(id);
        Ok(())
    }

    async fn job_event(&mut self, e: &StoredEvent) -> Result<()> {
        let job_id = JobId::parse(&e.aggregate_id).context("job aggregate id")?;
        let event: AiJobEvent = e.decode()?;
        let at = millis(e.recorded_at);
        let document = match &event {
            AiJobEvent::JobRequested { document_id, .. } => {
                self.load(*document_id).await?;
                self.jobs.insert(job_id, Some(*document_id));
                Some(*document_id)
            }
            _ => self.document_of_job(job_id).await?,
        };
        let Some(v) = document
            .and_then(|d| self.views.get_mut(&d))
            .and_then(Option::as_mut)
        else {
            warn!(
                job = %job_id,
                event = %e.event_type,
                sequence = e.sequence,
                "no document view for this job; skipped"
            );
            return Ok(());
        };
        if let Some(job) = &v.job
            && job.job_id != job_id
        {
            warn!(
                job = %job_id,
                document = %v.document_id,
                "the document's view follows another job; event skipped"
            );
            return Ok(());
        }
        if e.sequence <= v.job_seq {
            return Ok(());
        }
        let changed = match v.job.as_mut() {
            Some(job) => {
                let before = job.clone();
                job.apply(event, at);
                *job != before
            }
            None => match event {
                AiJobEvent::JobRequested {
                    job_id: requested,
                    max_attempts,
                    ..
                } => {
                    v.job = Some(JobView::queued(requested, max_attempts));
                    true
                }
                _ => {
                    warn!(
                        job = %job_id,
                        event = %e.event_type,
                        "a job event before the job was requested; skipped"
                    );
                    return Ok(());
                }
            },
        };
        if changed {
            v.updated_at = v.updated_at.max(at);
        }
        v.job_seq = e.sequence;
        let id = v.document_id;
        self.touched(id);
        Ok(())
    }

    async fn write(self) -> Result<()> {
        for id in &self.changed {
            if let Some(Some(v)) = self.views.get(id) {
                self.store.put(v).await?;
            }
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Projection for DocumentsProjection {
    fn name(&self) -> &'static str {
        "documents"
    }

    fn handles(&self, aggregate_type: &str, _event_type: &str) -> bool {
        aggregate_type == Document::TYPE || aggregate_type == AiJob::TYPE
    }

    async fn apply(&self, events: &[StoredEvent]) -> Result<()> {
        let mut fold = Fold::new(&*self.0);
        for e in events {
            if e.aggregate_type == Document::TYPE {
                fold.document_event(e).await?;
            } else if e.aggregate_type == AiJob::TYPE {
                fold.job_event(e).await?;
            }
        }
        fold.write().await
    }
}
