//! The API's one error type and its `application/problem+json` rendering (RFC 9457).
//!
//! Client errors carry a stable `type` URI and a human `detail`. Server errors are logged
//! here, once, with their cause, and shown to the client only as a generic 500/503.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

pub const PROBLEM_JSON: &str = "application/problem+json";
const TYPE_BASE: &str = "https://karmic.dev/problems/";

/// One invalid input field.
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

/// An RFC 9457 problem document.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// A stable URI naming the kind of problem; clients switch on this.
    #[serde(rename = "type")]
    #[schema(
        example = "https://karmic.dev/problems/validation",
        pattern = "^https://karmic\\.dev/problems/[a-z-]+$"
    )]
    pub kind: String,
    pub title: String,
    #[schema(minimum = 400, maximum = 599)]
    pub status: u16,
    pub detail: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request cannot be read (malformed JSON, bad path or query).
    #[error("{0}")]
    BadRequest(String),
    /// 422: readable, but the values are not acceptable.
    #[error("invalid input")]
    Validation(Vec<FieldError>),
    /// 401: no valid credentials. `WWW-Authenticate: Bearer` is set.
    #[error("{0}")]
    Unauthorized(String),
    /// 401 from `POST /auth/login`: identical for unknown email and wrong password.
    #[error("invalid email or password")]
    InvalidCredentials,
    /// 403: signed in, but not allowed.
    #[error("{0}")]
    Forbidden(String),
    /// 404.
    #[error("{0}")]
    NotFound(String),
    /// 405.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// 409: the state does not allow it (email taken, concurrent write).
    #[error("{detail}")]
    Conflict { slug: &'static str, detail: String },
    /// 412: `If-Match` names an old version. Carries the current one.
    #[error("the resource has changed (current version {current})")]
    PreconditionFailed { current: u64 },
    /// 413.
    #[error("request body too large")]
    PayloadTooLarge,
    /// 415.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 503: a dependency is down; retry later. The cause is logged, not shown.
    #[error("{0}")]
    Unavailable(String),
    /// 503 with `Retry-After`: we are shedding load (the password queue is full, the
    /// request ran out of time).
    #[error("{detail}")]
    Overloaded { detail: String, retry_after: u64 },
    /// 429 with `Retry-After`: this client (or account) must slow down.
    #[error("{detail}")]
    TooManyRequests { detail: String, retry_after: u64 },
    /// 500: our fault. The cause is logged, never shown.
    #[error(transparent)]
    Internal(anyhow::Error),
}

impl ApiError {
    /// The password queue is full: come back in a second. 429 rather than 503: nothing is
    /// broken, the server is refusing more work of this kind than it can do now (a burst
    /// of sign-ins is the usual cause), and clients and load balancers treat a 5xx as a
    /// fault.
    pub fn hashing_busy() -> ApiError {
        ApiError::TooManyRequests {
            detail: "too many sign-ins and registrations in progress; retry shortly".to_owned(),
            retry_after: 1,
        }
    }
}

impl From<commands::StoreError> for ApiError {
    fn from(e: commands::StoreError) -> Self {
        e.0.into()
    }
}

/// A failure on our side: 503 if the database was out of reach (retry), 500 otherwise.
impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        if commands::error::is_unavailable(&e) {
            return ApiError::Unavailable(format!("the database is unavailable: {e:#}"));
        }
        ApiError::Internal(e)
    }
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Unauthorized(_) | ApiError::InvalidCredentials => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::PreconditionFailed { .. } => StatusCode::PRECONDITION_FAILED,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unavailable(_) | ApiError::Overloaded { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn slug(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad-request",
            ApiError::Validation(_) => "validation",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::InvalidCredentials => "invalid-credentials",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not-found",
            ApiError::MethodNotAllowed => "method-not-allowed",
            ApiError::Conflict { slug, .. } => slug,
            ApiError::PreconditionFailed { .. } => "precondition-failed",
            ApiError::PayloadTooLarge => "payload-too-large",
            ApiError::UnsupportedMediaType(_) => "unsupported-media-type",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Overloaded { .. } => "overloaded",
            ApiError::TooManyRequests { .. } => "too-many-requests",
            ApiError::Internal(_) => "internal",
        }
    }

    pub fn validation(field: &str, message: impl Into<String>) -> ApiError {
        ApiError::Validation(vec![FieldError {
            field: field.to_owned(),
            message: message.into(),
        }])
    }

    /// The problem document for this error.
    pub fn problem(&self) -> Problem {
        let status = self.status();
        let detail = match self {
            ApiError::Internal(_) => "an internal error occurred".to_owned(),
            ApiError::Unavailable(_) => {
                "a backing service is unavailable; retry shortly".to_owned()
            }
            ApiError::Validation(errs) => format!(
                "{} field(s) invalid: {}",
                errs.len(),
                errs.iter()
                    .map(|e| e.field.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            other => other.to_string(),
        };
        Problem {
            kind: format!("{TYPE_BASE}{}", self.slug()),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail,
            errors: match self {
                ApiError::Validation(e) => e.clone(),
                _ => Vec::new(),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        match &self {
            ApiError::Internal(e) => tracing::error!(error = %format!("{e:#}"), "internal error"),
            ApiError::Unavailable(e) => tracing::warn!(error = %e, "dependency unavailable"),
            ApiError::Overloaded { detail, .. } => tracing::warn!(%detail, "shedding load"),
            _ => tracing::debug!(%status, error = %self, "request refused"),
        }
        let body = serde_json::to_vec(&self.problem()).unwrap_or_default();
        let mut res = (status, body).into_response();
        let h = res.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        match &self {
            ApiError::Unauthorized(_) => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"karmic\""),
                );
            }
            ApiError::PreconditionFailed { current } => {
                if let Ok(v) = HeaderValue::from_str(&crate::routes::profiles::etag(*current)) {
                    h.insert(header::ETAG, v);
                }
            }
            ApiError::Overloaded { retry_after, .. }
            | ApiError::TooManyRequests { retry_after, .. } => {
                h.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
            }
            ApiError::Unavailable(_) => {
                h.insert(header::RETRY_AFTER, HeaderValue::from(1));
            }
            _ => {}
        }
        res
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        match r {
            JsonRejection::JsonDataError(e) => {
                // Wrong types or missing fields: the JSON was readable.
                ApiError::Validation(vec![FieldError {
                    field: "body".to_owned(),
                    message: e.body_text(),
                }])
            }
            JsonRejection::JsonSyntaxError(e) => {
                ApiError::BadRequest(format!("malformed JSON: {}", e.body_text()))
            }
            JsonRejection::MissingJsonContentType(_) => ApiError::UnsupportedMediaType(
                "expected a body with Content-Type: application/json".to_owned(),
            ),
            JsonRejection::BytesRejection(e) => {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::PayloadTooLarge
                } else {
                    ApiError::BadRequest(e.body_text())
                }
            }
            other => ApiError::BadRequest(other.body_text()),
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        ApiError::BadRequest(format!("invalid path: {}", r.body_text()))
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError::BadRequest(format!("invalid query: {}", r.body_text()))
    }
}
