//! The profiles service: `GET /profiles/{id}` (signed in), `PUT /profiles/{id}` (owner).
//!
//! A profile's version (its aggregate sequence) is its `ETag`. `PUT` honours `If-Match`:
//! a stale version is refused with 412 before anything is written, and a write that loses
//! a race to another writer at the same version is refused with 409.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use commands::CommandError;
use domain::{AvatarUrl, Bio, DisplayName, Location, ProfileError, ProfileFields, UserId, Website};
use projections::ProfileView;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::app::{AppState, RequestMeta};
use crate::auth::AuthUser;
use crate::extract::{Json, Path};
use crate::openapi::{
    IfMatch, IfNoneMatch, InternalError, Overloaded, PayloadTooLarge, TooManyRequests,
    Unauthorized, UnsupportedMediaType,
};
use crate::problem::{ApiError, Problem};
use crate::routes::auth::Validator;

/// The `ETag` of a version: a strong validator, `"<version>"`.
pub fn etag(version: u64) -> String {
    format!("\"{version}\"")
}

#[derive(Debug, Serialize, Deserialize, ToSchema, Clone, PartialEq, Eq)]
pub struct ProfileResponse {
    pub user_id: uuid::Uuid,
    pub display_name: String,
    pub bio: Option<String>,
    pub avatar_url: Option<String>,
    pub location: Option<String>,
    pub website: Option<String>,
    /// Also sent as the `ETag` header.
    pub version: u64,
    pub updated_at: DateTime<Utc>,
}

impl From<ProfileView> for ProfileResponse {
    fn from(v: ProfileView) -> Self {
        ProfileResponse {
            user_id: v.user_id.as_uuid(),
            display_name: v.display_name,
            bio: v.bio,
            avatar_url: v.avatar_url,
            location: v.location,
            website: v.website,
            version: u64::try_from(v.version).unwrap_or_default(),
            updated_at: v.updated_at,
        }
    }
}

/// The complete new profile. Absent optional fields are cleared.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateProfileRequest {
    /// 1 to 100 characters once surrounding whitespace is trimmed, with no control
    /// characters.
    #[schema(
        example = "Ann Lee",
        pattern = r#"^[\t-\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]*[^\u0000-\u0020\u007f-\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000](?:[^\u0000-\u001f\u007f-\u009f]{0,98}[^\u0000-\u0020\u007f-\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000])?[\t-\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]*$"#
    )]
    pub display_name: String,
    /// At most 2,000 characters once surrounding whitespace is trimmed; line breaks and tabs
    /// are the only control characters allowed. Empty clears it.
    #[schema(
        pattern = r#"^[\t-\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]*(?:[^\u0000-\u0020\u007f-\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000](?:[^\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f-\u009f]{0,1998}[^\u0000-\u0020\u007f-\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000])?)?[\t-\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]*$"#
    )]
    pub bio: Option<String>,
    /// An absolute http(s) URL without credentials, at most 2048 bytes, as read by the WHATWG
    /// URL parser (so `http:example.com` and backslashes are accepted too). The pattern covers
    /// printable-ASCII URLs with a domain or dotted-decimal IPv4 host; the server also accepts
    /// other IPv4 notations, IPv6, percent-encoded and international (IDNA) host names,
    /// non-ASCII paths, surrounding whitespace and control characters, and tabs and newlines
    /// anywhere (the parser drops them).
    #[schema(
        max_length = 2048,
        example = "https://cdn.example.com/ann.png",
        pattern = r#"^[Hh][Tt][Tt][Pp][Ss]?:[/\\]*(?::?@)?(?:(?:(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\.){3}(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\.?(?![^:/\\?#])|(?:(?![Xx][Nn]--)[!"$&'()*+,\-0-9;=A-Z_`a-z{}~]*\.)*(?:(?!(?:[0-9]+|0[Xx][0-9A-Fa-f]*)\.?(?![^:/\\?#]))(?![Xx][Nn]--)[!"$&'()*+,\-0-9;=A-Z_`a-z{}~]+\.?|\.))(?::(?:0*(?:[0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?)?(?:[/\\?#][!-~]*)?$"#
    )]
    pub avatar_url: Option<String>,
    /// At most 100 characters once surrounding whitespace is trimmed, with no control
    /// characters. Empty clears it.
    #[schema(
        pattern = r#"^[\t-\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]*(?:[^\u0000-\u0020\u007f-\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000](?:[^\u0000-\u001f\u007f-\u009f]{0,98}[^\u0000-\u0020\u007f-\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000])?)?[\t-\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]*$"#
    )]
    pub location: Option<String>,
    /// An absolute http(s) URL, as `avatar_url`.
    #[schema(
        max_length = 2048,
        example = "https://ann.example.com/",
        pattern = r#"^[Hh][Tt][Tt][Pp][Ss]?:[/\\]*(?::?@)?(?:(?:(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\.){3}(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\.?(?![^:/\\?#])|(?:(?![Xx][Nn]--)[!"$&'()*+,\-0-9;=A-Z_`a-z{}~]*\.)*(?:(?!(?:[0-9]+|0[Xx][0-9A-Fa-f]*)\.?(?![^:/\\?#]))(?![Xx][Nn]--)[!"$&'()*+,\-0-9;=A-Z_`a-z{}~]+\.?|\.))(?::(?:0*(?:[0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?)?(?:[/\\?#][!-~]*)?$"#
    )]
    pub website: Option<String>,
}

fn with_etag(mut res: Response, version: u64) -> Response {
    if let Ok(v) = HeaderValue::from_str(&etag(version)) {
        res.headers_mut().insert(header::ETAG, v);
    }
    res
}

/// Parse `If-Match`/`If-None-Match`: `*`, `"N"` or `W/"N"` (a list: any of them).
fn parse_versions(value: &str) -> Result<Option<Vec<u64>>, ApiError> {
    let value = value.trim();
    if value == "*" {
        return Ok(None);
    }
    value
        .split(',')
        .map(|tag| {
            let tag = tag.trim();
            let tag = tag.strip_prefix("W/").unwrap_or(tag);
            tag.strip_prefix('"')
                .and_then(|t| t.strip_suffix('"'))
                .and_then(|t| t.parse::<u64>().ok())
                .ok_or_else(|| ApiError::BadRequest(format!("malformed entity tag {tag:?}")))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Result<Option<&str>, ApiError> {
    headers
        .get(&name)
        .map(|v| {
            v.to_str()
                .map_err(|_| ApiError::BadRequest(format!("malformed {name} header")))
        })
        .transpose()
}

/// Read a profile.
#[utoipa::path(
    get, path = "/profiles/{id}", tag = "profiles",
    params(
        ("id" = String, Path, description = "User id: a UUID (hyphenated, simple, braced or `urn:uuid:` form)",
            pattern = r#"^(?:[0-9A-Fa-f]{32}|(?:[Uu][Rr][Nn]:[Uu][Uu][Ii][Dd]:)?[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}|\{[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}\})$"#),
        ("If-None-Match" = Option<IfNoneMatch>, Header, nullable = false,
            description = "`*` or a comma-separated list of entity tags (`\"N\"` or `W/\"N\"`, N a version); \
            304 if the profile's version is among them"),
    ),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The profile; `ETag` is its version", body = ProfileResponse,
         headers(("ETag", description = "The profile's version"))),
        (status = 304, description = "Not modified: `If-None-Match` names the current version",
         headers(("ETag", description = "The profile's version"))),
        (status = 400, description = "The id is not a UUID, or `If-None-Match` is malformed (`bad-request`)", body = Problem, content_type = "application/problem+json"),
        (status = 401, response = Unauthorized),
        (status = 404, description = "No such profile (`not-found`)", body = Problem, content_type = "application/problem+json"),
        (status = 429, response = TooManyRequests),
        (status = 500, response = InternalError),
        (status = 503, description = "Overloaded (`overloaded`): the request ran longer than \
            `KARMIC_REQUEST_TIMEOUT_MS`; or the profile read model or the database is unavailable (`unavailable`)",
         body = Problem, content_type = "application/problem+json",
         headers(("Retry-After", description = "Seconds to wait before retrying"))),
    )
)]
#[tracing::instrument(skip_all, fields(user_id = tracing::field::Empty, profile_id = %id))]
pub async fn get_profile(
    State(state): State<AppState>,
    _who: AuthUser,
    Path(id): Path<uuid::Uuid>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let view = state
        .profile_reader
        .get(UserId::from_uuid(id))
        .await
        .map_err(|e| {
            ApiError::Unavailable(format!("the profile read model is unavailable: {e:#}"))
        })?
        .ok_or_else(|| ApiError::NotFound("no such profile".to_owned()))?;
    let version = u64::try_from(view.version).unwrap_or_default();
    if let Some(inm) = header_str(&headers, header::IF_NONE_MATCH)?
        && parse_versions(inm)?.is_none_or(|vs| vs.contains(&version))
    {
        return Ok(with_etag(StatusCode::NOT_MODIFIED.into_response(), version));
    }
    let body = ProfileResponse::from(view);
    Ok(with_etag(Json(body).into_response(), version))
}

/// Replace a profile (its owner only).
#[utoipa::path(
    put, path = "/profiles/{id}", tag = "profiles",
    params(
        ("id" = String, Path, description = "User id: a UUID (hyphenated, simple, braced or `urn:uuid:` form)",
            pattern = r#"^(?:[0-9A-Fa-f]{32}|(?:[Uu][Rr][Nn]:[Uu][Uu][Ii][Dd]:)?[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}|\{[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}\})$"#),
        ("If-Match" = Option<IfMatch>, Header, nullable = false,
            description = "The `ETag` last read (`\"N\"` or `W/\"N\"`, exactly one), or `*`; a stale one gives 412. \
            Without it the write is unconditional"),
    ),
    request_body = UpdateProfileRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Updated; `ETag` is the new version", body = ProfileResponse,
         headers(("ETag", description = "The profile's new version"))),
        (status = 400, description = "The body is not JSON, the id is not a UUID, or `If-Match` is malformed \
            (`bad-request`)", body = Problem, content_type = "application/problem+json"),
        (status = 401, response = Unauthorized),
        (status = 403, description = "Not the owner, or the account is deactivated (`forbidden`)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such profile (`not-found`)", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Another write to this profile was saved at the same time (`write-conflict`)", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "`If-Match` names an old version (`precondition-failed`); `ETag` is the current one", body = Problem, content_type = "application/problem+json",
         headers(("ETag", description = "The profile's current version"))),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, description = "JSON of the wrong shape (missing or unknown fields, wrong types), or invalid \
            field values; `errors` names each field (`validation`)", body = Problem, content_type = "application/problem+json"),
        (status = 429, response = TooManyRequests),
        (status = 500, response = InternalError),
        (status = 503, response = Overloaded),
    )
)]
#[tracing::instrument(skip_all, fields(user_id = tracing::field::Empty, profile_id = %id))]
pub async fn put_profile(
    State(state): State<AppState>,
    who: AuthUser,
    Path(id): Path<uuid::Uuid>,
    meta: RequestMeta,
    headers: HeaderMap,
    Json(body): Json<UpdateProfileRequest>,
) -> Result<Response, ApiError> {
    let id = UserId::from_uuid(id);
    if who.user_id != id {
        return Err(ApiError::Forbidden(
            "only the owner may edit a profile".to_owned(),
        ));
    }
    let expected = match header_str(&headers, header::IF_MATCH)? {
        None => None,
        Some(v) => match parse_versions(v)? {
            None => None,
            Some(vs) if vs.len() == 1 => vs.first().copied(),
            Some(_) => {
                return Err(ApiError::BadRequest(
                    "If-Match must name exactly one version".to_owned(),
                ));
            }
        },
    };
    let mut v = Validator::default();
    let display_name = v.check(DisplayName::parse(&body.display_name));
    let bio = body.bio.as_deref().map(|s| v.check(Bio::parse(s)));
    let avatar_url = body
        .avatar_url
        .as_deref()
        .map(|s| v.check(AvatarUrl::parse(s)));
    let location = body
        .location
        .as_deref()
        .map(|s| v.check(Location::parse(s)));
    let website = body.website.as_deref().map(|s| v.check(Website::parse(s)));
    v.finish()?;
    let Some(display_name) = display_name else {
        return Err(ApiError::Internal(anyhow::anyhow!(
            "validator passed a missing field"
        )));
    };
    let fields = ProfileFields {
        display_name,
        // Empty strings clear a field.
        bio: bio.flatten().filter(|b| !b.as_str().is_empty()),
        avatar_url: avatar_url.flatten(),
        location: location.flatten().filter(|l| !l.as_str().is_empty()),
        website: website.flatten(),
    };
    let response_fields = fields.clone();
    let version = state
        .profiles
        .update(id, fields, expected, &meta.command())
        .await
        .map_err(|e| match e {
            CommandError::Rejected(ProfileError::NotFound) => {
                ApiError::NotFound("no such profile".to_owned())
            }
            CommandError::Rejected(ProfileError::AlreadyExists) => ApiError::Conflict {
                slug: "conflict",
                detail: "the profile already exists".to_owned(),
            },
            CommandError::StaleVersion { actual, .. } => {
                ApiError::PreconditionFailed { current: actual }
            }
            // The token may outlive the account: the append itself refuses a deactivated
            // owner's write.
            CommandError::Guarded(why) => ApiError::Forbidden(why.to_owned()),
            CommandError::Conflict => ApiError::Conflict {
                slug: "write-conflict",
                detail: "another change to this profile was saved at the same time; read it again and retry".to_owned(),
            },
            CommandError::Store(s) => s.into(),
        })?;
    let body = ProfileResponse {
        user_id: id.as_uuid(),
        display_name: response_fields.display_name.into_string(),
        bio: response_fields.bio.map(Bio::into_string),
        avatar_url: response_fields.avatar_url.map(AvatarUrl::into_string),
        location: response_fields.location.map(Location::into_string),
        website: response_fields.website.map(Website::into_string),
        version,
        updated_at: Utc::now(),
    };
    Ok(with_etag(Json(body).into_response(), version))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entity_tags_parse_strong_weak_lists_and_star() {
        assert_eq!(parse_versions("\"3\"").unwrap(), Some(vec![3]));
        assert_eq!(parse_versions("W/\"3\", \"4\"").unwrap(), Some(vec![3, 4]));
        assert_eq!(parse_versions("*").unwrap(), None);
        assert!(parse_versions("3").is_err());
        assert!(parse_versions("\"x\"").is_err());
    }
}
