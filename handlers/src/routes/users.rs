//! The users service: `GET /users` (admins), `GET /users/{id}` (that user or an admin).

use axum::extract::State;
use chrono::{DateTime, Utc};
use domain::{Role, UserId};
use projections::UserView;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::app::AppState;
use crate::auth::AuthUser;
use crate::extract::{Json, Path, Query};
use crate::openapi::{InternalError, Overloaded, TooManyRequests, Unauthorized};
use crate::problem::{ApiError, Problem};

#[derive(Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct UserResponse {
    pub user_id: uuid::Uuid,
    pub email: String,
    /// `user` or `admin`.
    #[schema(value_type = String, pattern = "^(user|admin)$")]
    pub role: String,
    pub active: bool,
    pub registered_at: DateTime<Utc>,
}

impl From<UserView> for UserResponse {
    fn from(v: UserView) -> Self {
        UserResponse {
            user_id: v.user_id.as_uuid(),
            email: v.email,
            role: if v.is_admin { Role::Admin } else { Role::User }
                .as_str()
                .to_owned(),
            active: v.active,
            registered_at: v.registered_at,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct UserPage {
    pub items: Vec<UserResponse>,
    /// Pass as `cursor` to get the next page; `null` on the last page.
    #[schema(value_type = Option<uuid::Uuid>)]
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Page size, 1 to 200 (default 50).
    #[param(minimum = 1, maximum = 200, default = 50)]
    pub limit: Option<i64>,
    /// `next_cursor` from the previous page: a user id (UUID; hyphenated, simple, braced or
    /// `urn:uuid:` form). The page starts after that user.
    #[param(
        pattern = r#"^(?:[0-9A-Fa-f]{32}|(?:[Uu][Rr][Nn]:[Uu][Uu][Ii][Dd]:)?[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}|\{[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}\})$"#
    )]
    pub cursor: Option<String>,
}

/// The caller must be an admin now: the token's role claim is checked against the event
/// store, so a revoked or deactivated admin loses access before the token expires.
pub(crate) async fn require_admin(state: &AppState, who: &AuthUser) -> Result<(), ApiError> {
    if !who.is_admin() {
        return Err(ApiError::Forbidden("this needs the admin role".to_owned()));
    }
    let user = state
        .accounts
        .users()
        .load(&who.user_id.to_string())
        .await?;
    if user.state.role == Role::Admin && user.state.active {
        Ok(())
    } else {
        Err(ApiError::Forbidden("this needs the admin role".to_owned()))
    }
}

/// List users (admins only).
#[utoipa::path(
    get, path = "/users", tag = "users",
    params(ListParams),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A page of users, in registration order", body = UserPage),
        (status = 400, description = "`limit` is not an integer from 1 to 200, `cursor` is not a UUID, or a \
            parameter is repeated (`bad-request`)", body = Problem, content_type = "application/problem+json"),
        (status = 401, response = Unauthorized),
        (status = 403, description = "Not an active admin (`forbidden`)", body = Problem, content_type = "application/problem+json"),
        (status = 429, response = TooManyRequests),
        (status = 500, response = InternalError),
        (status = 503, response = Overloaded),
    )
)]
#[tracing::instrument(skip_all, fields(user_id = tracing::field::Empty))]
pub async fn list_users(
    State(state): State<AppState>,
    who: AuthUser,
    Query(params): Query<ListParams>,
) -> Result<Json<UserPage>, ApiError> {
    require_admin(&state, &who).await?;
    let limit = params.limit.unwrap_or(50);
    if !(1..=200).contains(&limit) {
        return Err(ApiError::BadRequest(
            "limit must be between 1 and 200".to_owned(),
        ));
    }
    let after = params
        .cursor
        .as_deref()
        .map(|c| UserId::parse(c).map_err(|_| ApiError::BadRequest("invalid cursor".to_owned())))
        .transpose()?;
    let mut rows = state.read_models.users(after, limit + 1).await?;
    let next_cursor = if rows.len() as i64 > limit {
        rows.truncate(limit as usize);
        rows.last().map(|u| u.user_id.to_string())
    } else {
        None
    };
    Ok(Json(UserPage {
        items: rows.into_iter().map(UserResponse::from).collect(),
        next_cursor,
    }))
}

/// One user (that user or an admin).
#[utoipa::path(
    get, path = "/users/{id}", tag = "users",
    params(("id" = String, Path, description = "User id: a UUID (hyphenated, simple, braced or `urn:uuid:` form)",
        pattern = r#"^(?:[0-9A-Fa-f]{32}|(?:[Uu][Rr][Nn]:[Uu][Uu][Ii][Dd]:)?[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}|\{[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}\})$"#)),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The user", body = UserResponse),
        (status = 400, description = "The id is not a UUID (`bad-request`)", body = Problem, content_type = "application/problem+json"),
        (status = 401, response = Unauthorized),
        (status = 403, description = "Another user's, and the caller is not an active admin (`forbidden`)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such user (`not-found`)", body = Problem, content_type = "application/problem+json"),
        (status = 429, response = TooManyRequests),
        (status = 500, response = InternalError),
        (status = 503, response = Overloaded),
    )
)]
#[tracing::instrument(skip_all, fields(user_id = tracing::field::Empty, target_id = %id))]
pub async fn get_user(
    State(state): State<AppState>,
    who: AuthUser,
    Path(id): Path<uuid::Uuid>,
) -> Result<Json<UserResponse>, ApiError> {
    let id = UserId::from_uuid(id);
    if who.user_id != id {
        require_admin(&state, &who).await?;
    }
    let user = state
        .read_models
        .user(id)
        .await?
        .ok_or_else(|| ApiError::NotFound("no such user".to_owned()))?;
    Ok(Json(user.into()))
}
