//! The OpenAPI 3 document, generated from the handlers' annotations.
//!
//! The document is meant to be exact: a request that matches it is one the server reads
//! (it may still be refused for reasons of state, such as a missing resource), a request
//! that does not is refused, and every status the server can answer is listed with its
//! headers. `scripts/schemathesis.sh` checks this against a running server.
//!
//! Responses shared by many operations (401, 413, 415, 429, 500, 503) are components,
//! defined here; each operation lists the ones it can answer. Response headers are
//! described once, in [`ResponseHeaders`]: their schemas, and that they are always sent.

use axum::http::header;
use axum::response::IntoResponse;
use utoipa::openapi::header::Header;
use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::schema::{AnyOfBuilder, Schema};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, ObjectBuilder, Ref, RefOr, Type};
use utoipa::{Modify, OpenApi, PartialSchema, ToResponse, ToSchema};

use crate::problem::PROBLEM_JSON;
use crate::routes;

#[derive(OpenApi)]
#[openapi(
    info(title = "Karmic API", description = "Accounts, users, profiles and documents. Errors are \
        application/problem+json (RFC 9457); their `type` is `https://karmic.dev/problems/<slug>`.\n\n\
        Every operation may answer 429 with `Retry-After` when a client exceeds its request rate \
        (`karmic serve`; in AWS, API Gateway throttles), 503 with `Retry-After` when a request runs \
        longer than `KARMIC_REQUEST_TIMEOUT_MS` or the database cannot be reached, and 500 on an \
        internal fault."),
    paths(
        routes::health::health,
        routes::auth::register,
        routes::auth::login,
        routes::users::list_users,
        routes::users::get_user,
        routes::audit::aggregate_history,
        routes::profiles::get_profile,
        routes::profiles::put_profile,
        routes::documents::request_upload,
        routes::documents::list_documents,
        routes::documents::get_document,
        routes::documents::download_document,
        routes::documents::delete_document,
    ),
    components(
        schemas(crate::problem::Problem, crate::problem::FieldError, IfMatch, IfNoneMatch),
        responses(
            Unauthorized,
            PayloadTooLarge,
            UnsupportedMediaType,
            TooManyRequests,
            Overloaded,
            InternalError,
        ),
    ),
    modifiers(&BearerAuth, &ResponseHeaders),
    tags(
        (name = "auth", description = "Registration and sign-in"),
        (name = "users", description = "Accounts"),
        (name = "profiles", description = "Public profiles"),
        (name = "documents", description = "Uploads (presigned, straight to storage), analysis results, downloads"),
        (name = "audit", description = "The event history of one aggregate and its state at any point (admins)"),
        (name = "health", description = "Liveness"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// A problem document response with the given description.
fn problem(description: &str) -> ResponseBuilder {
    ResponseBuilder::new().description(description).content(
        PROBLEM_JSON,
        ContentBuilder::new()
            .schema(Some(Ref::from_schema_name("Problem")))
            .build(),
    )
}

/// A response header; its schema and `required` are filled in by [`ResponseHeaders`].
fn response_header(description: &str) -> Header {
    let mut h = Header::default();
    h.description = Some(description.to_owned());
    h
}

macro_rules! problem_response {
    ($(#[$doc:meta])* $name:ident, $description:expr $(, $header:literal => $header_doc:literal)*) => {
        $(#[$doc])*
        pub struct $name;

        impl<'r> ToResponse<'r> for $name {
            fn response() -> (&'r str, RefOr<Response>) {
                let r = problem($description)
                    $(.header($header, response_header($header_doc)))*
                    .build();
                (stringify!($name), r.into())
            }
        }
    };
}

problem_response!(
    /// 401 from the bearer-token check.
    Unauthorized,
    "No valid access token (`unauthorized`): none was sent, or it is malformed, expired or not signed by this service.",
    "WWW-Authenticate" => "Always `Bearer realm=\"karmic\"`."
);
problem_response!(
    /// 413 from the body limit.
    PayloadTooLarge,
    "The body is larger than `KARMIC_BODY_LIMIT_BYTES` (default 64 KiB) (`payload-too-large`)."
);
problem_response!(
    /// 415 from the JSON extractor.
    UnsupportedMediaType,
    "The body is not declared as JSON: `Content-Type` is missing or is not `application/json` \
     (or another `+json` type) (`unsupported-media-type`)."
);
problem_response!(
    /// 429 from the per-client rate limit, and on sign-in and registration from the failed
    /// sign-in limit and the password-hashing queue.
    TooManyRequests,
    "Too many requests (`too-many-requests`): this client exceeded `KARMIC_RATE_LIMIT_PER_SEC` requests per \
     second (burst `KARMIC_RATE_LIMIT_BURST`; `karmic serve` only: in AWS, API Gateway throttles); on \
     `POST /auth/login`, there were too many failed sign-ins for the account or from the client; on \
     `POST /auth/login` and `POST /auth/register`, too many sign-ins and registrations are in progress (the \
     password-hashing queue is full). Retry after `Retry-After` seconds.",
    "Retry-After" => "Seconds to wait before retrying."
);
problem_response!(
    /// 503 from the request timeout, or a database out of reach.
    Overloaded,
    "Overloaded (`overloaded`): the request ran longer than `KARMIC_REQUEST_TIMEOUT_MS` (default 10 s); or \
     unavailable (`unavailable`): the database could not be reached (a dropped connection, no free \
     connection). Retry after `Retry-After` seconds; a write whose connection dropped mid-statement may \
     have been saved, so read back (or send `If-Match`) before repeating it.",
    "Retry-After" => "Seconds to wait before retrying."
);
problem_response!(
    /// 500.
    InternalError,
    "An internal fault (`internal`). The cause is logged, never shown."
);

/// A version as an entity tag: `"N"` or `W/"N"`, N a u64 (an optional `+`, leading zeros
/// allowed: it is read with `u64::from_str`).
fn entity_tag_pattern() -> String {
    const U64: &str = "0*(?:[0-9]{1,19}|1[0-7][0-9]{18}|18[0-3][0-9]{17}|184[0-3][0-9]{16}\
        |1844[0-5][0-9]{15}|18446[0-6][0-9]{14}|184467[0-3][0-9]{13}|1844674[0-3][0-9]{12}\
        |184467440[0-6][0-9]{10}|1844674407[0-2][0-9]{9}|18446744073[0-6][0-9]{8}\
        |1844674407370[0-8][0-9]{6}|18446744073709[0-4][0-9]{5}|184467440737095[0-4][0-9]{4}\
        |18446744073709550[0-9]{3}|18446744073709551[0-5][0-9]{2}|1844674407370955160[0-9]\
        |1844674407370955161[0-5])";
    format!(r#"(?:W/)?"\+?{U64}""#)
}

/// `*` or entity tags, as the profile routes read a conditional header: surrounding spaces
/// and tabs are ignored. The first branch repeats a value the second already admits; it is
/// there for schemathesis, whose coverage phase draws header values from letters and digits
/// only: given no value it can draw, it sends an invalid one in a case it counts as valid.
fn conditional_header_schema(description: &str, tags: &str) -> RefOr<Schema> {
    let pattern = format!(r"^[\t ]*(?:\*|{tags})[\t ]*$");
    let any_of = AnyOfBuilder::new()
        .description(Some(description))
        .item(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some(["*"])),
        )
        .item(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some(pattern)),
        )
        .build();
    RefOr::T(Schema::AnyOf(any_of))
}

/// `If-Match` on `PUT /profiles/{id}`: `*`, or exactly one entity tag.
pub struct IfMatch;

impl PartialSchema for IfMatch {
    fn schema() -> RefOr<Schema> {
        conditional_header_schema(
            "`*` (any version), or exactly one entity tag `\"N\"` or `W/\"N\"` naming a version.",
            &entity_tag_pattern(),
        )
    }
}

impl ToSchema for IfMatch {}

/// `If-None-Match` on `GET /profiles/{id}`: `*`, or a comma-separated list of entity tags.
pub struct IfNoneMatch;

impl PartialSchema for IfNoneMatch {
    fn schema() -> RefOr<Schema> {
        let tag = entity_tag_pattern();
        conditional_header_schema(
            "`*` (any version), or a comma-separated list of entity tags `\"N\"` or `W/\"N\"`.",
            &format!(r"{tag}(?:[\t ]*,[\t ]*{tag})*"),
        )
    }
}

impl ToSchema for IfNoneMatch {}

/// Response headers whose value is not always sent: `(path, method, status, header)`.
/// Every other documented response header is always sent, and is marked `required`.
const OPTIONAL_RESPONSE_HEADERS: &[(&str, &str, &str, &str)] = &[
    // A degraded store is answered without it; an overloaded server with it.
    ("/health", "get", "503", "Retry-After"),
];

/// Gives every documented response header its schema, and marks it `required` unless it is
/// in [`OPTIONAL_RESPONSE_HEADERS`].
struct ResponseHeaders;

impl ResponseHeaders {
    fn schema(name: &str) -> Option<RefOr<utoipa::openapi::Schema>> {
        let s = match name {
            "Retry-After" => ObjectBuilder::new()
                .schema_type(Type::Integer)
                .minimum(Some(1)),
            // A strong entity tag naming the profile's version.
            "ETag" => ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some(r#"^"[0-9]+"$"#)),
            "Location" => ObjectBuilder::new().schema_type(Type::String).pattern(Some(
                "^/(?:users|documents)/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$",
            )),
            "WWW-Authenticate" => ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some(["Bearer realm=\"karmic\""])),
            _ => return None,
        };
        Some(RefOr::T(s.build().into()))
    }

    fn fill(response: &mut RefOr<Response>, optional: impl Fn(&str) -> bool) {
        let RefOr::T(response) = response else {
            return;
        };
        for (name, h) in response.headers.iter_mut() {
            let RefOr::T(h) = h else { continue };
            if let Some(schema) = Self::schema(name) {
                h.schema = Some(schema);
            }
            if !optional(name) {
                h.extensions
                    .get_or_insert_with(Default::default)
                    .insert("required".to_owned(), true.into());
            }
        }
    }
}

impl Modify for ResponseHeaders {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        if let Some(components) = openapi.components.as_mut() {
            for response in components.responses.values_mut() {
                Self::fill(response, |_| false);
            }
        }
        for (path, item) in openapi.paths.paths.iter_mut() {
            let operations = [
                ("get", item.get.as_mut()),
                ("put", item.put.as_mut()),
                ("post", item.post.as_mut()),
            ];
            for (method, op) in operations {
                let Some(op) = op else { continue };
                for (status, response) in op.responses.responses.iter_mut() {
                    Self::fill(response, |name| {
                        OPTIONAL_RESPONSE_HEADERS.contains(&(
                            path.as_str(),
                            method,
                            status.as_str(),
                            name,
                        ))
                    });
                }
            }
        }
    }
}

/// The document as pretty JSON, exactly as committed in `docs/openapi.json`.
pub fn document() -> String {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    let mut s = doc.to_pretty_json().unwrap_or_default();
    s.push('\n');
    s
}

pub async fn serve() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], document())
}
