//! The router as Lambda functions: real API Gateway HTTP API (payload v2) events go in
//! through lambda_http's adapter, and the Lambda response JSON comes out.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use handlers::Service;
use lambda_http::request::LambdaRequest;
use lambda_http::{Context, LambdaEvent};
use serde_json::{Value, json};
use tests::{Backend, PASSWORD, TestDb};
use tower::{Service as _, ServiceExt};

const FIXTURE: &str = include_str!("../fixtures/apigw_v2_request.json");

/// An API Gateway v2 event for `method path` with a body and extra headers.
fn event(
    method: &str,
    path: &str,
    query: &str,
    body: Option<Value>,
    headers: &[(&str, &str)],
    base64: bool,
) -> Value {
    let mut e: Value = serde_json::from_str(FIXTURE).unwrap();
    let route_path = if path.starts_with("/profiles/") {
        "/profiles/{id}".to_owned()
    } else if path.starts_with("/users/") {
        "/users/{id}".to_owned()
    } else {
        path.to_owned()
    };
    e["routeKey"] = json!(format!("{method} {route_path}"));
    e["requestContext"]["routeKey"] = e["routeKey"].clone();
    e["rawPath"] = json!(path);
    e["rawQueryString"] = json!(query);
    e["requestContext"]["http"]["method"] = json!(method);
    e["requestContext"]["http"]["path"] = json!(path);
    if let Some(id) = path
        .rsplit('/')
        .next()
        .filter(|_| route_path.ends_with("{id}"))
    {
        e["pathParameters"] = json!({"id": id});
    }
    for (k, v) in headers {
        e["headers"][*k] = json!(v);
    }
    match body {
        Some(b) if base64 => {
            e["body"] = json!(b64(b.to_string().as_bytes()));
            e["isBase64Encoded"] = json!(true);
        }
        Some(b) => e["body"] = json!(b.to_string()),
        None => {
            e.as_object_mut().unwrap().remove("body");
        }
    }
    e
}

fn b64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Invoke a Lambda function (the router for `service`) with one event; returns the
/// Lambda response as JSON (`statusCode`, `headers`, `body`, ...).
async fn invoke(router: &axum::Router, event: Value) -> Value {
    let payload: LambdaRequest = serde_json::from_value(event).unwrap();
    let mut adapter = lambda_http::Adapter::from(router.clone());
    let adapter = adapter.ready().await.unwrap();
    let response = adapter
        .call(LambdaEvent::new(payload, Context::default()))
        .await
        .unwrap();
    serde_json::to_value(&response).unwrap()
}

fn body(resp: &Value) -> Value {
    serde_json::from_str(resp["body"].as_str().unwrap()).unwrap()
}

#[tokio::test]
async fn the_three_functions_serve_register_login_and_profiles() {
    let db = TestDb::new(Backend::Sqlite).await;
    // Ann is the bootstrap admin, so that the users function reads her query strings.
    let mut settings = db.settings();
    settings.bootstrap_admin_email = Some("ann@example.com".to_owned());
    let rt = handlers::Runtime::build(settings).await.unwrap();
    let auth = rt.router(Service::Auth);
    let profiles = rt.router(Service::Profiles);
    let users = rt.router(Service::Users);

    let r = invoke(
        &auth,
        event(
            "POST",
            "/auth/register",
            "",
            Some(json!({"email": "ann@example.com", "password": PASSWORD, "display_name": "Ann"})),
            &[],
            false,
        ),
    )
    .await;
    assert_eq!(r["statusCode"], 201, "{r}");
    assert_eq!(r["headers"]["content-type"], "application/json");
    assert!(r["headers"]["x-request-id"].is_string());
    let id = body(&r)["user_id"].as_str().unwrap().to_owned();
    assert_eq!(r["headers"]["location"], format!("/users/{id}"));

    // API Gateway may hand the body over base64-encoded.
    let r = invoke(
        &auth,
        event(
            "POST",
            "/auth/login",
            "",
            Some(json!({"email": "ann@example.com", "password": PASSWORD})),
            &[],
            true,
        ),
    )
    .await;
    assert_eq!(r["statusCode"], 200, "{r}");
    let token = body(&r)["access_token"].as_str().unwrap().to_owned();
    let bearer = format!("Bearer {token}");

    let r = invoke(
        &profiles,
        event(
            "GET",
            &format!("/profiles/{id}"),
            "",
            None,
            &[("authorization", &bearer)],
            false,
        ),
    )
    .await;
    assert_eq!(r["statusCode"], 200, "{r}");
    assert_eq!(r["headers"]["etag"], "\"1\"");
    assert_eq!(body(&r)["display_name"], "Ann");

    let r = invoke(
        &profiles,
        event(
            "PUT",
            &format!("/profiles/{id}"),
            "",
            Some(json!({"display_name": "Ann Lee"})),
            &[("authorization", &bearer), ("if-match", "\"1\"")],
            false,
        ),
    )
    .await;
    assert_eq!(r["statusCode"], 200, "{r}");
    assert_eq!(r["headers"]["etag"], "\"2\"");

    let r = invoke(
        &users,
        event(
            "GET",
            &format!("/users/{id}"),
            "",
            None,
            &[("authorization", &bearer)],
            false,
        ),
    )
    .await;
    assert_eq!(r["statusCode"], 200, "{r}");
    assert_eq!(body(&r)["email"], "ann@example.com");

    // Query strings arrive through rawQueryString: an out-of-range limit is refused, a
    // valid one shapes the page (both would be ignored if the query were lost).
    let r = invoke(
        &users,
        event(
            "GET",
            "/users",
            "limit=0",
            None,
            &[("authorization", &bearer)],
            false,
        ),
    )
    .await;
    assert_eq!(r["statusCode"], 400, "{r}");
    assert!(
        body(&r)["detail"].as_str().unwrap().contains("limit"),
        "{r}"
    );
    let r = invoke(
        &users,
        event(
            "GET",
            "/users",
            &format!("limit=1&cursor={id}"),
            None,
            &[("authorization", &bearer)],
            false,
        ),
    )
    .await;
    assert_eq!(r["statusCode"], 200, "{r}");
    assert_eq!(body(&r)["items"].as_array().unwrap().len(), 0, "{r}");
}

#[tokio::test]
async fn each_function_serves_only_its_own_routes() {
    let db = TestDb::new(Backend::Sqlite).await;
    let rt = tests::runtime(&db).await;
    let auth = rt.router(Service::Auth);
    let r = invoke(
        &auth,
        event(
            "GET",
            "/profiles/0190f0c4-1b2c-7d3e-8f40-000000000001",
            "",
            None,
            &[],
            false,
        ),
    )
    .await;
    assert_eq!(r["statusCode"], 404);
    assert_eq!(r["headers"]["content-type"], "application/problem+json");
    let r = invoke(&auth, event("GET", "/health", "", None, &[], false)).await;
    assert_eq!(r["statusCode"], 200);
}

#[tokio::test]
async fn lambda_errors_are_problem_documents_with_a_bearer_challenge() {
    let db = TestDb::new(Backend::Sqlite).await;
    let rt = tests::runtime(&db).await;
    let profiles = rt.router(Service::Profiles);
    let r = invoke(
        &profiles,
        event(
            "GET",
            "/profiles/0190f0c4-1b2c-7d3e-8f40-000000000001",
            "",
            None,
            &[],
            false,
        ),
    )
    .await;
    assert_eq!(r["statusCode"], 401);
    assert!(
        r["headers"]["www-authenticate"]
            .as_str()
            .unwrap()
            .starts_with("Bearer")
    );
    assert_eq!(body(&r)["type"], "https://karmic.dev/problems/unauthorized");
    let auth = rt.router(Service::Auth);
    let mut e = event("POST", "/auth/register", "", None, &[], false);
    e["body"] = json!("{not json");
    let r = invoke(&auth, e).await;
    assert_eq!(r["statusCode"], 400);
}
