//! The audit service: one aggregate's history and its state at any point (admins only).
//! The same reads as `karmic events replay`, over HTTP.

use axum::extract::State;
use commands::audit::{self, AsOf, ReplayError};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use crate::app::AppState;
use crate::auth::AuthUser;
use crate::extract::{Json, Path, Query};
use crate::openapi::{InternalError, Overloaded, TooManyRequests, Unauthorized};
use crate::problem::{ApiError, Problem};
use crate::routes::users::require_admin;

/// An aggregate's history up to a point, and its state there.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AggregateHistory {
    /// `user`, `profile`, `document` or `ai_job`.
    pub aggregate_type: String,
    pub aggregate_id: String,
    /// The version (sequence of the last event) the state is at.
    pub version: i64,
    /// The aggregate's current version.
    pub latest_version: i64,
    /// The state after `events` (upcasters applied; password hashes redacted).
    #[schema(value_type = Object)]
    pub state: Value,
    pub events: Vec<HistoryEvent>,
}

/// One event as the current code reads it, with what was stored.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HistoryEvent {
    /// Place in commit order, `TRANSACTION:POSITION`.
    pub position: String,
    pub recorded_at: String,
    pub sequence: i64,
    pub event_type: String,
    /// The version the payload is shown in (after upcasting).
    pub event_version: String,
    /// The version that was stored (what the hash covers).
    pub stored_event_version: String,
    /// The payload, upcast (password hashes redacted).
    #[schema(value_type = Object)]
    pub payload: Value,
    #[schema(value_type = Object)]
    pub metadata: Value,
    /// The event's chain hash (`null` if it was never chained).
    pub hash: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AsOfParams {
    /// The state after the last event recorded at or before this time (RFC 3339). With
    /// `version` too, after the last event that meets both.
    #[param(value_type = Option<String>, format = DateTime)]
    pub as_of: Option<chrono::DateTime<chrono::Utc>>,
    /// The state after the event with this sequence number.
    #[param(minimum = 0)]
    pub version: Option<i64>,
}

/// Values a history must never show, whoever asks: they stay in the event store (and in
/// the auditors' export, which only database operators can take).
fn redact(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                if k == "password_hash" {
                    *v = Value::String("[redacted]".to_owned());
                } else {
                    redact(v);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact),
        _ => {}
    }
}

/// One aggregate's history and its state at a point (admins only).
#[utoipa::path(
    get, path = "/admin/events/{aggregate_type}/{aggregate_id}", tag = "audit",
    params(
        ("aggregate_type" = String, Path, description = "`user`, `profile`, `document` or `ai_job`",
            pattern = "^(user|profile|document|ai_job)$"),
        ("aggregate_id" = String, Path, description = "The aggregate's id",
            pattern = "^[A-Za-z0-9._:-]{1,200}$"),
        AsOfParams,
    ),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The history up to the point and the state there", body = AggregateHistory),
        (status = 400, description = "An unknown aggregate type, a malformed id, time or version, or a \
            repeated parameter (`bad-request`)", body = Problem, content_type = "application/problem+json"),
        (status = 401, response = Unauthorized),
        (status = 403, description = "Not an active admin (`forbidden`)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No events for this aggregate (`not-found`)", body = Problem, content_type = "application/problem+json"),
        (status = 429, response = TooManyRequests),
        (status = 500, response = InternalError),
        (status = 503, response = Overloaded),
    )
)]
#[tracing::instrument(skip_all, fields(user_id = tracing::field::Empty, aggregate_type = %aggregate_type, aggregate_id = %aggregate_id))]
pub async fn aggregate_history(
    State(state): State<AppState>,
    who: AuthUser,
    Path((aggregate_type, aggregate_id)): Path<(String, String)>,
    Query(params): Query<AsOfParams>,
) -> Result<Json<AggregateHistory>, ApiError> {
    require_admin(&state, &who).await?;
    if !audit::AGGREGATE_TYPES.contains(&aggregate_type.as_str()) {
        return Err(ApiError::BadRequest(format!(
            "no aggregate type {aggregate_type:?} (one of user, profile, document, ai_job)"
        )));
    }
    let id_ok = (1..=200).contains(&aggregate_id.len())
        && aggregate_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b));
    if !id_ok {
        return Err(ApiError::BadRequest("not an aggregate id".to_owned()));
    }
    if params.version.is_some_and(|v| v < 0) {
        return Err(ApiError::BadRequest("version must be 0 or more".to_owned()));
    }
    let as_of = AsOf {
        version: params.version,
        time: params.as_of,
    };
    let history = audit::history(&state.db, &aggregate_type, &aggregate_id).await?;
    let Some(latest) = history.last().map(|e| e.event.sequence) else {
        return Err(ApiError::NotFound(format!(
            "no events for {aggregate_type} {aggregate_id}"
        )));
    };
    let (mut snapshot, version) =
        audit::replay(&aggregate_type, &history, as_of).map_err(|e| match e {
            ReplayError::UnknownType(t) => ApiError::BadRequest(format!("no aggregate type {t:?}")),
            ReplayError::Store(e) => e.into(),
        })?;
    redact(&mut snapshot);
    let events = history
        .iter()
        .take_while(|e| as_of.includes(&e.event))
        .map(|e| {
            let line = e.export_line(true);
            let (event_version, mut payload) = match line.upcast {
                Some(u) => (u.event_version, u.payload),
                None => (e.event.event_version.clone(), e.event.payload.clone()),
            };
            redact(&mut payload);
            HistoryEvent {
                position: e.event.position.to_string(),
                recorded_at: line.recorded_at,
                sequence: e.event.sequence,
                event_type: e.event.event_type.clone(),
                event_version,
                stored_event_version: e.event.event_version.clone(),
                payload,
                metadata: e.event.metadata.clone(),
                hash: e.hash.clone(),
            }
        })
        .collect();
    Ok(Json(AggregateHistory {
        aggregate_type,
        aggregate_id,
        version,
        latest_version: latest,
        state: snapshot,
        events,
    }))
}
