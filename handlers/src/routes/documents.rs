//! The documents service: upload requests (presigned PUTs straight to the private
//! bucket), the caller's documents with their analysis, downloads (presigned GETs) and
//! deletion.
//!
//! Owner-only throughout: another user's document is answered 404, exactly as a missing
//! one, so ids cannot be probed. Admins may read (list their own, fetch anyone's), never
//! write.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use commands::CommandError;
use domain::{ContentType, DocumentError, DocumentId, DocumentSize, FileName, ObjectKey, Role};
use projections::documents::{DocumentState, DocumentView, JobView};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::app::{AppState, RequestMeta};
use crate::auth::AuthUser;
use crate::extract::{Json, Path, Query};
use crate::openapi::{
    InternalError, Overloaded, PayloadTooLarge, TooManyRequests, Unauthorized, UnsupportedMediaType,
};
use crate::problem::{ApiError, Problem};
use crate::routes::auth::Validator;

/// What the client is about to upload.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UploadRequest {
    /// Shown to the user and used as the download's file name; never part of the storage
    /// key. 1 to 255 characters once surrounding whitespace is trimmed, no control
    /// characters, no `/` or `\\`.
    #[schema(
        example = "report.pdf",
        pattern = r#"^[\t-\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]*[^\u0000-\u0020/\\\u007f-\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000](?:[^\u0000-\u001f/\\\u007f-\u009f]{0,253}[^\u0000-\u0020/\\\u007f-\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000])?[\t-\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]*$"#
    )]
    pub filename: String,
    /// One of `application/pdf`,
    /// `application/vnd.openxmlformats-officedocument.wordprocessingml.document`,
    /// `text/plain`, `text/markdown`, `text/html`, `text/csv` (parameters such as
    /// `; charset=utf-8` are allowed). The uploaded bytes must be of this type.
    #[schema(
        example = "application/pdf",
        pattern = r#"^[\t-\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]*(?:[aA][pP][pP][lL][iI][cC][aA][tT][iI][oO][nN]\/[pP][dD][fF]|[aA][pP][pP][lL][iI][cC][aA][tT][iI][oO][nN]\/[vV][nN][dD]\.[oO][pP][eE][nN][xX][mM][lL][fF][oO][rR][mM][aA][tT][sS]\-[oO][fF][fF][iI][cC][eE][dD][oO][cC][uU][mM][eE][nN][tT]\.[wW][oO][rR][dD][pP][rR][oO][cC][eE][sS][sS][iI][nN][gG][mM][lL]\.[dD][oO][cC][uU][mM][eE][nN][tT]|[tT][eE][xX][tT]\/[pP][lL][aA][iI][nN]|[tT][eE][xX][tT]\/[mM][aA][rR][kK][dD][oO][wW][nN]|[tT][eE][xX][tT]\/[hH][tT][mM][lL]|[tT][eE][xX][tT]\/[cC][sS][vV])[\t-\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]*(?:;[\s\S]*)?$"#
    )]
    pub content_type: String,
    /// Exact size in bytes, 1 to the server's limit (`KARMIC_UPLOAD_MAX_BYTES`; the
    /// maximum shown is the default, 25 MiB). The upload must be exactly this long.
    #[schema(example = 48213, minimum = 1, maximum = 26214400)]
    #[serde(deserialize_with = "whole_number")]
    pub size: u64,
}

/// A non-negative whole number, written as JSON writes it: `56` or `56.0` (JSON Schema's
/// `integer` admits both; serde's `u64` only the first).
fn whole_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let n = serde_json::Number::deserialize(d)?;
    if let Some(v) = n.as_u64() {
        return Ok(v);
    }
    match n.as_f64() {
        Some(f) if f.fract() == 0.0 && (0.0..=9_007_199_254_740_991.0).contains(&f) =>
        {
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            Ok(f as u64)
        }
        _ => Err(serde::de::Error::custom(format!(
            "invalid value: {n}, expected a whole number of bytes"
        ))),
    }
}

/// A request the client makes itself, straight to storage.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PresignedRequest {
    /// `PUT` for uploads, `GET` for downloads.
    #[schema(example = "PUT")]
    pub method: String,
    pub url: String,
    /// Headers to send exactly as given (they are part of the signature).
    pub headers: BTreeMap<String, String>,
    pub expires_at: DateTime<Utc>,
}

impl From<storage::Presigned> for PresignedRequest {
    fn from(p: storage::Presigned) -> Self {
        PresignedRequest {
            method: p.method,
            url: p.url,
            headers: p.headers.into_iter().collect(),
            expires_at: p.expires_at,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct UploadResponse {
    pub document_id: uuid::Uuid,
    /// Send the file's bytes with this request before `expires_at`.
    pub upload: PresignedRequest,
}

/// Entities found in the text (at most 50 of each kind).
#[derive(Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct EntitiesResponse {
    pub emails: Vec<String>,
    pub urls: Vec<String>,
    pub dates: Vec<String>,
    pub phone_numbers: Vec<String>,
    pub money: Vec<String>,
}

/// Kinds of personal data the text contains.
#[derive(Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct PiiResponse {
    pub email: bool,
    pub phone: bool,
    /// A card number that passes the Luhn check.
    pub card_number: bool,
    /// An IBAN that passes the mod-97 check.
    pub iban: bool,
}

/// The analysis of a document.
#[derive(Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct AnalysisResponse {
    /// SHA-256 of the uploaded bytes, lowercase hex.
    pub sha256: String,
    /// ISO 639-3 code, when the text is long enough for a reliable guess.
    pub language: Option<String>,
    pub pages: Option<u32>,
    pub words: u64,
    pub characters: u64,
    /// At most 20.
    pub keywords: Vec<String>,
    /// 3 to 5 sentences from the text (fewer if it has fewer).
    pub summary: Vec<String>,
    pub entities: EntitiesResponse,
    pub pii: PiiResponse,
    /// Why the text could not be read (for example an encrypted PDF).
    pub note: Option<String>,
}

impl From<domain::Analysis> for AnalysisResponse {
    fn from(a: domain::Analysis) -> Self {
        AnalysisResponse {
            sha256: a.sha256,
            language: a.language,
            pages: a.pages,
            words: a.words,
            characters: a.characters,
            keywords: a.keywords,
            summary: a.summary,
            entities: EntitiesResponse {
                emails: a.entities.emails,
                urls: a.entities.urls,
                dates: a.entities.dates,
                phone_numbers: a.entities.phone_numbers,
                money: a.entities.money,
            },
            pii: PiiResponse {
                email: a.pii.email,
                phone: a.pii.phone,
                card_number: a.pii.card_number,
                iban: a.pii.iban,
            },
            note: a.note,
        }
    }
}

/// The document's analysis job.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JobResponse {
    pub job_id: uuid::Uuid,
    /// `queued`, `running`, `succeeded`, `retrying` (an attempt failed; another follows) or
    /// `dead_lettered` (no more attempts; operators can redrive it).
    #[schema(pattern = "^(queued|running|succeeded|retrying|dead_lettered)$")]
    pub status: String,
    /// Attempts started so far.
    pub attempts: u32,
    pub max_attempts: u32,
    /// The last failed attempt's error.
    pub last_error: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// A document: what was declared, what arrived, and its analysis.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DocumentResponse {
    pub document_id: uuid::Uuid,
    pub filename: String,
    pub content_type: String,
    /// The declared size; once uploaded, the stored object's size.
    pub size: u64,
    /// `awaiting_upload`, `uploaded` or `rejected` (the object was not what was
    /// declared, and has been deleted).
    #[schema(pattern = "^(awaiting_upload|uploaded|rejected)$")]
    pub status: String,
    /// Why it was rejected.
    pub rejection: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Present once the upload is confirmed.
    pub job: Option<JobResponse>,
    /// Present once the job has succeeded.
    pub analysis: Option<AnalysisResponse>,
}

/// The serde name of a unit variant (`awaiting_upload`).
fn name_of<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

fn job_response(j: &JobView) -> JobResponse {
    JobResponse {
        job_id: j.job_id.as_uuid(),
        status: name_of(&j.status),
        attempts: j.attempts,
        max_attempts: j.max_attempts,
        last_error: j.last_error.clone(),
        started_at: j.started_at,
        finished_at: j.finished_at,
    }
}

impl From<DocumentView> for DocumentResponse {
    fn from(v: DocumentView) -> Self {
        let job = v.job.as_ref().map(job_response);
        let analysis = v.job.and_then(|j| j.analysis).map(AnalysisResponse::from);
        DocumentResponse {
            document_id: v.document_id.as_uuid(),
            filename: v.filename,
            content_type: v.content_type,
            size: v.size.unwrap_or(v.declared_size),
            status: name_of(&v.status),
            rejection: v.rejection,
            created_at: v.created_at,
            updated_at: v.updated_at,
            job,
            analysis,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DocumentPage {
    /// Newest first.
    pub items: Vec<DocumentResponse>,
    /// Pass as `cursor` to get the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DocumentListParams {
    /// Page size, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100, default = 20)]
    pub limit: Option<i64>,
    /// `next_cursor` from the previous page.
    /// (15 digits of milliseconds reach the year 33658; more would leave the calendar.)
    #[param(pattern = r"^[0-9]{1,15}\.[0-9a-f]{32}$")]
    pub cursor: Option<String>,
}

/// `{created_at millis}.{document id, simple}`: the keyset of the last item of a page.
fn cursor_of(v: &DocumentResponse) -> String {
    format!(
        "{}.{}",
        v.created_at.timestamp_millis(),
        v.document_id.simple()
    )
}

fn parse_cursor(c: &str) -> Result<(DateTime<Utc>, DocumentId), ApiError> {
    let bad = || ApiError::BadRequest("invalid cursor".to_owned());
    let (millis, id) = c.split_once('.').ok_or_else(bad)?;
    if millis.is_empty() || millis.len() > 15 || !millis.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    if id.len() != 32 || !id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(bad());
    }
    // Read models store four-digit years (a later time would sort before "2026" as text):
    // a cursor past the year 9999 is the same position as one at its end.
    const END_OF_9999: i64 = 253_402_300_799_999;
    let millis: i64 = millis.parse().map_err(|_| bad())?;
    let at = DateTime::from_timestamp_millis(millis.min(END_OF_9999)).ok_or_else(bad)?;
    let id = DocumentId::parse(id).map_err(|_| bad())?;
    Ok((at, id))
}

/// Is the caller an admin right now (checked against the event store, not just the
/// token's claim)?
async fn is_active_admin(state: &AppState, who: &AuthUser) -> Result<bool, ApiError> {
    if !who.is_admin() {
        return Ok(false);
    }
    let user = state
        .accounts
        .users()
        .load(&who.user_id.to_string())
        .await?;
    Ok(user.state.role == Role::Admin && user.state.active)
}

/// The caller's account must be active to write.
async fn require_active(state: &AppState, who: &AuthUser) -> Result<(), ApiError> {
    let user = state
        .accounts
        .users()
        .load(&who.user_id.to_string())
        .await?;
    if user.state.active {
        Ok(())
    } else {
        Err(ApiError::Forbidden(
            "this account is deactivated".to_owned(),
        ))
    }
}

fn not_found() -> ApiError {
    ApiError::NotFound("no such document".to_owned())
}

/// The document if the caller may read it: the owner's, or anyone's for an active admin.
/// Deleted documents are gone.
async fn readable(
    state: &AppState,
    who: &AuthUser,
    id: DocumentId,
) -> Result<DocumentView, ApiError> {
    let view = state
        .document_reader
        .get(id)
        .await?
        .filter(|v| v.status != DocumentState::Deleted)
        .ok_or_else(not_found)?;
    if view.owner_id == who.user_id || is_active_admin(state, who).await? {
        Ok(view)
    } else {
        Err(not_found())
    }
}

const ID_PARAM: &str = "Document id: a UUID";

/// Ask to upload a document.
#[utoipa::path(
    post, path = "/documents/upload", tag = "documents",
    request_body = UploadRequest,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Recorded; PUT the bytes to `upload.url` with `upload.headers` before \
            `upload.expires_at`. The analysis follows on its own", body = UploadResponse,
         headers(("Location", description = "`/documents/{id}` of the new document"))),
        (status = 400, description = "The body is not JSON (`bad-request`)", body = Problem, content_type = "application/problem+json"),
        (status = 401, response = Unauthorized),
        (status = 403, description = "The account is deactivated (`forbidden`)", body = Problem, content_type = "application/problem+json"),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, description = "JSON of the wrong shape, a type that is not accepted, a size of 0 or over \
            the limit, or an unusable file name; `errors` names each field (`validation`)", body = Problem, content_type = "application/problem+json"),
        (status = 429, response = TooManyRequests),
        (status = 500, response = InternalError),
        (status = 503, response = Overloaded),
    )
)]
#[tracing::instrument(skip_all, fields(user_id = %who.user_id, document_id = tracing::field::Empty))]
pub async fn request_upload(
    State(state): State<AppState>,
    who: AuthUser,
    meta: RequestMeta,
    Json(body): Json<UploadRequest>,
) -> Result<Response, ApiError> {
    let mut v = Validator::default();
    let filename = v.check(FileName::parse(&body.filename));
    let content_type = v.check(ContentType::parse(&body.content_type));
    let size = v.check(DocumentSize::parse(body.size, state.upload_max_bytes));
    v.finish()?;
    let (Some(filename), Some(content_type), Some(size)) = (filename, content_type, size) else {
        return Err(ApiError::Internal(anyhow::anyhow!(
            "validated fields missing"
        )));
    };
    require_active(&state, &who).await?;
    let (document_id, key) = state
        .documents
        .request_upload(who.user_id, filename, content_type, size, &meta.command())
        .await
        .map_err(document_error)?;
    tracing::Span::current().record("document_id", tracing::field::display(document_id));
    let upload = state
        .objects
        .presign_put(&key, content_type.mime(), body.size)
        .await
        .map_err(ApiError::from)?;
    let mut res = (
        StatusCode::CREATED,
        Json(UploadResponse {
            document_id: document_id.as_uuid(),
            upload: upload.into(),
        }),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/documents/{document_id}")) {
        res.headers_mut().insert(header::LOCATION, v);
    }
    Ok(res)
}

fn document_error(e: CommandError<DocumentError>) -> ApiError {
    match e {
        CommandError::Rejected(DocumentError::NotFound) => not_found(),
        CommandError::Rejected(DocumentError::AlreadyExists) | CommandError::Conflict => {
            ApiError::Conflict {
                slug: "write-conflict",
                detail: "another write to this document was saved at the same time".to_owned(),
            }
        }
        CommandError::StaleVersion { .. } | CommandError::Guarded(_) => ApiError::Conflict {
            slug: "write-conflict",
            detail: e.to_string(),
        },
        CommandError::Store(s) => s.into(),
    }
}

/// My documents.
#[utoipa::path(
    get, path = "/documents", tag = "documents",
    params(DocumentListParams),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A page of the caller's documents, newest first", body = DocumentPage),
        (status = 400, description = "`limit` is not an integer from 1 to 100, `cursor` is malformed, or a \
            parameter is repeated (`bad-request`)", body = Problem, content_type = "application/problem+json"),
        (status = 401, response = Unauthorized),
        (status = 429, response = TooManyRequests),
        (status = 500, response = InternalError),
        (status = 503, response = Overloaded),
    )
)]
#[tracing::instrument(skip_all, fields(user_id = %who.user_id))]
pub async fn list_documents(
    State(state): State<AppState>,
    who: AuthUser,
    Query(params): Query<DocumentListParams>,
) -> Result<Json<DocumentPage>, ApiError> {
    let limit = params.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::BadRequest(
            "limit must be between 1 and 100".to_owned(),
        ));
    }
    let before = params.cursor.as_deref().map(parse_cursor).transpose()?;
    let limit = u32::try_from(limit).unwrap_or(20);
    let mut rows = state
        .document_reader
        .list(who.user_id, limit + 1, before)
        .await?;
    let more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    let items: Vec<DocumentResponse> = rows.into_iter().map(DocumentResponse::from).collect();
    let next_cursor = if more {
        items.last().map(cursor_of)
    } else {
        None
    };
    Ok(Json(DocumentPage { items, next_cursor }))
}

/// One document, with its job and analysis.
#[utoipa::path(
    get, path = "/documents/{id}", tag = "documents",
    params(("id" = uuid::Uuid, Path, description = ID_PARAM)),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The document", body = DocumentResponse),
        (status = 400, description = "The id is not a UUID (`bad-request`)", body = Problem, content_type = "application/problem+json"),
        (status = 401, response = Unauthorized),
        (status = 404, description = "No such document, deleted, or not the caller's (`not-found`)", body = Problem, content_type = "application/problem+json"),
        (status = 429, response = TooManyRequests),
        (status = 500, response = InternalError),
        (status = 503, response = Overloaded),
    )
)]
#[tracing::instrument(skip_all, fields(user_id = %who.user_id, document_id = %id))]
pub async fn get_document(
    State(state): State<AppState>,
    who: AuthUser,
    Path(id): Path<uuid::Uuid>,
) -> Result<Json<DocumentResponse>, ApiError> {
    let view = readable(&state, &who, DocumentId::from_uuid(id)).await?;
    Ok(Json(view.into()))
}

/// A short-lived link to download a document.
#[utoipa::path(
    get, path = "/documents/{id}/download", tag = "documents",
    params(("id" = uuid::Uuid, Path, description = ID_PARAM)),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "GET `url` before `expires_at`; the response is an attachment named \
            after the document", body = PresignedRequest),
        (status = 400, description = "The id is not a UUID (`bad-request`)", body = Problem, content_type = "application/problem+json"),
        (status = 401, response = Unauthorized),
        (status = 404, description = "No such document, deleted, or not the caller's (`not-found`)", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Not uploaded, or rejected (`not-uploaded`)", body = Problem, content_type = "application/problem+json"),
        (status = 429, response = TooManyRequests),
        (status = 500, response = InternalError),
        (status = 503, response = Overloaded),
    )
)]
#[tracing::instrument(skip_all, fields(user_id = %who.user_id, document_id = %id))]
pub async fn download_document(
    State(state): State<AppState>,
    who: AuthUser,
    Path(id): Path<uuid::Uuid>,
) -> Result<Json<PresignedRequest>, ApiError> {
    let view = readable(&state, &who, DocumentId::from_uuid(id)).await?;
    if view.status != DocumentState::Uploaded {
        return Err(ApiError::Conflict {
            slug: "not-uploaded",
            detail: "the document has not been uploaded".to_owned(),
        });
    }
    let key = ObjectKey::for_document(view.owner_id, view.document_id);
    let link = state
        .objects
        .presign_get(&key, &view.filename)
        .await
        .map_err(ApiError::from)?;
    Ok(Json(link.into()))
}

/// Delete a document (its owner only) and its stored object.
#[utoipa::path(
    delete, path = "/documents/{id}", tag = "documents",
    params(("id" = uuid::Uuid, Path, description = ID_PARAM)),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Deleted (also when it already was: a retry finishes the job)"),
        (status = 400, description = "The id is not a UUID (`bad-request`)", body = Problem, content_type = "application/problem+json"),
        (status = 401, response = Unauthorized),
        (status = 403, description = "The account is deactivated (`forbidden`)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such document, or not the caller's (`not-found`)", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Another write to this document was saved at the same time (`write-conflict`)", body = Problem, content_type = "application/problem+json"),
        (status = 429, response = TooManyRequests),
        (status = 500, response = InternalError),
        (status = 503, response = Overloaded),
    )
)]
#[tracing::instrument(skip_all, fields(user_id = %who.user_id, document_id = %id))]
pub async fn delete_document(
    State(state): State<AppState>,
    who: AuthUser,
    meta: RequestMeta,
    Path(id): Path<uuid::Uuid>,
) -> Result<StatusCode, ApiError> {
    let id = DocumentId::from_uuid(id);
    require_active(&state, &who).await?;
    state
        .documents
        .delete(id, who.user_id, &meta.command())
        .await
        .map_err(document_error)?;
    // The event is the record; the object goes after it (a retry of this request deletes
    // it if this attempt could not).
    state
        .objects
        .delete(&ObjectKey::for_document(who.user_id, id))
        .await
        .map_err(ApiError::from)?;
    Ok(StatusCode::NO_CONTENT)
}
