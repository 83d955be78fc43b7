//! The auth service: `POST /auth/register`, `POST /auth/login`.

use crate::throttle::ClientAddr;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use commands::accounts::{LoginError, RegisterError};
use domain::{DisplayName, Email, Password, ValueError};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::app::{AppState, RequestMeta};
use crate::extract::Json;
use crate::openapi::{
    InternalError, Overloaded, PayloadTooLarge, TooManyRequests, UnsupportedMediaType,
};
use crate::problem::{ApiError, FieldError, Problem};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    /// An address `local@domain`: at most 254 characters, a dot-atom local part of at most
    /// 64 (letters, digits and ``!#$%&'*+/=?^_`{|}~.-``), and a domain of two or more
    /// labels (letters, digits, inner hyphens; at most 63 each). Surrounding whitespace is
    /// ignored; it is stored lower-cased.
    #[schema(
        example = "ann@example.com",
        pattern = r#"^[\t-\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]*(?![^\t-\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]{255})(?![^@]{65})[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+[\t-\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]*$"#
    )]
    pub email: String,
    /// 10 to 1024 characters, and at most 1024 bytes as UTF-8. Taken as typed: not trimmed.
    #[schema(
        example = "correct horse battery staple",
        min_length = 10,
        max_length = 1024
    )]
    pub password: String,
    /// 1 to 100 characters once surrounding whitespace is trimmed, with no control
    /// characters.
    #[schema(
        example = "Ann Lee",
        pattern = r#"^[\t-\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]*[^\u0000-\u0020\u007f-\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000](?:[^\u0000-\u001f\u007f-\u009f]{0,98}[^\u0000-\u0020\u007f-\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000])?[\t-\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]*$"#
    )]
    pub display_name: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RegisterResponse {
    pub user_id: uuid::Uuid,
    pub email: String,
    pub display_name: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    /// Any spelling of the registered address (case and surrounding whitespace are ignored).
    #[schema(example = "ann@example.com")]
    pub email: String,
    /// Anything is read; a wrong password, or one over 1024 bytes, is answered 401.
    #[schema(example = "correct horse battery staple")]
    pub password: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenResponse {
    pub access_token: String,
    /// Always `Bearer`.
    #[schema(pattern = "^Bearer$")]
    pub token_type: String,
    /// Seconds until the token expires.
    pub expires_in: u64,
}

/// Collects every invalid field instead of stopping at the first.
#[derive(Default)]
pub(crate) struct Validator(Vec<FieldError>);

impl Validator {
    pub(crate) fn check<T>(&mut self, r: Result<T, ValueError>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.0.push(FieldError {
                    field: e.field().to_owned(),
                    message: e.to_string(),
                });
                None
            }
        }
    }

    pub(crate) fn finish(self) -> Result<(), ApiError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ApiError::Validation(self.0))
        }
    }
}

/// Register a new account.
#[utoipa::path(
    post, path = "/auth/register", tag = "auth",
    request_body = RegisterRequest,
    responses(
        (status = 201, description = "Registered; `Location` names the new user", body = RegisterResponse,
         headers(("Location", description = "`/users/{id}` of the new user"))),
        (status = 400, description = "The body is not JSON (`bad-request`)", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "An account with this email exists (`email-taken`)", body = Problem, content_type = "application/problem+json"),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, description = "JSON of the wrong shape (missing or unknown fields, wrong types), or invalid \
            field values; `errors` names each field (`validation`)", body = Problem, content_type = "application/problem+json"),
        (status = 429, response = TooManyRequests),
        (status = 500, response = InternalError),
        (status = 503, response = Overloaded),
    )
)]
#[tracing::instrument(skip_all)]
pub async fn register(
    State(state): State<AppState>,
    meta: RequestMeta,
    Json(body): Json<RegisterRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let mut v = Validator::default();
    let email = v.check(Email::parse(&body.email));
    let password = v.check(Password::parse(&body.password));
    let display_name = v.check(DisplayName::parse(&body.display_name));
    v.finish()?;
    let (Some(email), Some(password), Some(display_name)) = (email, password, display_name) else {
        return Err(ApiError::Internal(anyhow::anyhow!(
            "validator passed a missing field"
        )));
    };
    let registered = state
        .accounts
        .register(email, password, display_name, &meta.command())
        .await
        .map_err(|e| match e {
            RegisterError::EmailTaken => ApiError::Conflict {
                slug: "email-taken",
                detail: "an account with this email already exists".to_owned(),
            },
            RegisterError::Busy => ApiError::hashing_busy(),
            RegisterError::Store(s) => s.into(),
        })?;
    let mut headers = HeaderMap::new();
    if let Ok(v) = format!("/users/{}", registered.user_id).parse() {
        headers.insert(header::LOCATION, v);
    }
    Ok((
        StatusCode::CREATED,
        headers,
        Json(RegisterResponse {
            user_id: registered.user_id.as_uuid(),
            email: registered.email.as_str().to_owned(),
            display_name: registered.display_name.as_str().to_owned(),
        }),
    ))
}

/// Exchange an email and password for an access token.
#[utoipa::path(
    post, path = "/auth/login", tag = "auth",
    request_body = LoginRequest,
    responses(
        (status = 200, description = "Signed in", body = TokenResponse),
        (status = 400, description = "The body is not JSON (`bad-request`)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Wrong email or password, indistinguishably (`invalid-credentials`)", body = Problem, content_type = "application/problem+json"),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, description = "JSON of the wrong shape: missing or unknown fields, wrong types (`validation`)", body = Problem, content_type = "application/problem+json"),
        (status = 429, response = TooManyRequests),
        (status = 500, response = InternalError),
        (status = 503, response = Overloaded),
    )
)]
#[tracing::instrument(skip_all)]
pub async fn login(
    State(state): State<AppState>,
    ClientAddr(client): ClientAddr,
    Json(body): Json<LoginRequest>,
) -> Result<Json<TokenResponse>, ApiError> {
    if body.password.len() > Password::MAX_LEN || body.email.len() > 1024 {
        return Err(ApiError::InvalidCredentials);
    }
    // Throttled by the canonical email where there is one, so that spellings of one
    // address share a budget.
    let account = Email::parse(&body.email)
        .map(|e| e.as_str().to_owned())
        .unwrap_or_else(|_| body.email.trim().to_ascii_lowercase());
    let throttle = &state.login_throttle;
    throttle.attempt(&account, client)?;
    let who = match state
        .accounts
        .authenticate(&body.email, &body.password)
        .await
    {
        Ok(who) => {
            throttle.succeeded(&account, client);
            who
        }
        Err(LoginError::InvalidCredentials) => return Err(ApiError::InvalidCredentials),
        Err(LoginError::Busy) => {
            throttle.undecided(&account, client);
            return Err(ApiError::hashing_busy());
        }
        Err(LoginError::Store(s)) => {
            throttle.undecided(&account, client);
            return Err(s.into());
        }
    };
    let token = state.tokens.issue(who.user_id, who.role)?;
    Ok(Json(TokenResponse {
        access_token: token,
        token_type: "Bearer".to_owned(),
        expires_in: state.tokens.ttl().as_secs(),
    }))
}
