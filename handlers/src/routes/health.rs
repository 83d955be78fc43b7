//! `GET /health`: is the process up and can it reach its store?

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::app::AppState;
use crate::extract::Json;
use crate::openapi::{InternalError, TooManyRequests};
use crate::problem::Problem;

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `ok` or `degraded`.
    #[schema(pattern = "^(ok|degraded)$")]
    pub status: String,
    /// The event store: `ok` or `unreachable`.
    #[schema(pattern = "^(ok|unreachable)$")]
    pub event_store: String,
    /// `postgres` or `sqlite`.
    #[schema(pattern = "^(postgres|sqlite)$")]
    pub backend: String,
    pub version: String,
}

/// Liveness and store reachability. No authentication.
#[utoipa::path(
    get, path = "/health", tag = "health",
    responses(
        (status = 200, description = "Healthy", body = Health),
        (status = 429, response = TooManyRequests),
        (status = 500, response = InternalError),
        (status = 503, description = "The event store is unreachable (a `Health` document), or the request ran \
            longer than `KARMIC_REQUEST_TIMEOUT_MS` (a problem document, `overloaded`, with `Retry-After`)",
         content(
            (Health = "application/json"),
            (Problem = "application/problem+json"),
         ),
         headers(("Retry-After", description = "Seconds to wait before retrying; sent when overloaded"))),
    )
)]
pub async fn health(State(state): State<AppState>) -> (StatusCode, Json<Health>) {
    let reachable = tokio::time::timeout(std::time::Duration::from_secs(2), state.db.ping())
        .await
        .map(|r| r.is_ok())
        .unwrap_or(false);
    let status = if reachable {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(Health {
            status: if reachable { "ok" } else { "degraded" }.to_owned(),
            event_store: if reachable { "ok" } else { "unreachable" }.to_owned(),
            backend: state.db.kind().to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        }),
    )
}
