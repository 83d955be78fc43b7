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

const AUTHORIZER_FIXTURE: &str = include_str!("../fixtures/apigw_v2_authorizer_request.json");

/// An API Gateway v2 REQUEST authorizer event carrying `authorization` (or none).
fn authorizer_event(
    authorization: Option<&str>,
) -> aws_lambda_events::apigw::ApiGatewayV2CustomAuthorizerV2Request {
    let mut e: Value = serde_json::from_str(AUTHORIZER_FIXTURE).unwrap();
    match authorization {
        Some(a) => {
            e["identitySource"] = json!([a]);
            e["headers"]["authorization"] = json!(a);
        }
        None => {
            e.as_object_mut().unwrap().remove("identitySource");
            e["headers"]
                .as_object_mut()
                .unwrap()
                .remove("authorization");
        }
    }
    serde_json::from_value(e).unwrap()
}

#[tokio::test]
async fn the_authorizer_lets_through_exactly_the_tokens_the_functions_accept() {
    use handlers::auth::{HmacTokens, TokenVerifier};
    let db = TestDb::new(Backend::Sqlite).await;
    let settings = db.settings();
    let rt = tests::runtime(&db).await;
    let profiles = rt.router(Service::Profiles);
    // A real user's token, from the auth function.
    let auth = rt.router(Service::Auth);
    let r = invoke(
        &auth,
        event(
            "POST",
            "/auth/register",
            "",
            Some(json!({"email": "authz@example.com", "password": PASSWORD, "display_name": "Az"})),
            &[],
            false,
        ),
    )
    .await;
    assert_eq!(r["statusCode"], 201, "{r}");
    let r = invoke(
        &auth,
        event(
            "POST",
            "/auth/login",
            "",
            Some(json!({"email": "authz@example.com", "password": PASSWORD})),
            &[],
            false,
        ),
    )
    .await;
    let token = body(&r)["access_token"].as_str().unwrap().to_owned();
    let secret = settings.jwt_secret.clone().unwrap();
    let tokens = HmacTokens::new(
        &secret,
        &settings.jwt_issuer,
        &settings.jwt_audience,
        settings.token_ttl,
    );
    let user = tokens.verify(&token).unwrap();

    // Through the real serialisation both ways: the fixture in, the simple response out.
    let allowed = handlers::authorizer::authorize(
        &tokens,
        &authorizer_event(Some(&format!("Bearer {token}"))),
    );
    let out = serde_json::to_value(&allowed).unwrap();
    assert_eq!(out["isAuthorized"], true, "{out}");
    assert_eq!(out["context"]["sub"], user.user_id.to_string());
    assert_eq!(out["context"]["role"], "user");

    // Refused: no token, another scheme, a tampered token, another key's token, an
    // expired one; each also refused by the function itself.
    let other = HmacTokens::new(
        &"another-secret-of-at-least-32-bytes!!".to_owned().into(),
        &settings.jwt_issuer,
        &settings.jwt_audience,
        settings.token_ttl,
    );
    let foreign = other.issue(user.user_id, user.role).unwrap();
    let now = jsonwebtoken::get_current_timestamp();
    let expired = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &handlers::auth::Claims {
            sub: user.user_id.to_string(),
            iat: now - 3_600,
            exp: now - 60,
            iss: settings.jwt_issuer.clone(),
            aud: settings.jwt_audience.clone(),
            role: user.role,
        },
        &jsonwebtoken::EncodingKey::from_secret(
            secrecy::ExposeSecret::expose_secret(&secret).as_bytes(),
        ),
    )
    .unwrap();
    let mut tampered = token.clone();
    tampered.pop();
    tampered.push(if token.ends_with('A') { 'B' } else { 'A' });
    for header in [
        None,
        Some(format!("Basic {token}")),
        Some("Bearer ".to_owned()),
        Some(format!("Bearer {tampered}")),
        Some(format!("Bearer {foreign}")),
        Some(format!("Bearer {expired}")),
    ] {
        let decision =
            handlers::authorizer::authorize(&tokens, &authorizer_event(header.as_deref()));
        let out = serde_json::to_value(&decision).unwrap();
        assert_eq!(out["isAuthorized"], false, "{header:?}: {out}");
        let path = "/profiles/0190f0c4-1b2c-7d3e-8f40-000000000001";
        let headers: Vec<(&str, &str)> = header
            .as_deref()
            .map(|h| vec![("authorization", h)])
            .unwrap_or_default();
        let r = invoke(&profiles, event("GET", path, "", None, &headers, false)).await;
        assert_eq!(
            r["statusCode"], 401,
            "{header:?}: the function refuses it too"
        );
    }
}

/// Log lines written through the production JSON format, kept for the test to read.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn lambda_logs_carry_the_x_ray_trace_id_and_the_invocation_id() {
    let db = TestDb::new(Backend::Sqlite).await;
    let rt = tests::runtime(&db).await;
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = handlers::telemetry::json_subscriber(
        tracing_subscriber::EnvFilter::new("info,tower_http=debug"),
        move || writer.clone(),
    );
    let _guard = tracing::subscriber::set_default(subscriber);
    let payload: LambdaRequest = serde_json::from_value(event(
        "GET",
        "/profiles/0190f0c4-1b2c-7d3e-8f40-000000000001",
        "",
        None,
        &[],
        false,
    ))
    .unwrap();
    let mut context = Context::default();
    context.request_id = "8476a536-e9f4-11e8-9739-2dfe598c3fcd".to_owned();
    context.xray_trace_id = Some(
        "Root=1-5bef4de7-ad49b0e87f6ef6c87fc2e700;Parent=9a9197af755a6419;Sampled=1".to_owned(),
    );
    let mut adapter = lambda_http::Adapter::from(rt.router(Service::Profiles));
    let adapter = adapter.ready().await.unwrap();
    let response = adapter
        .call(LambdaEvent::new(payload, context))
        .await
        .unwrap();
    assert_eq!(serde_json::to_value(&response).unwrap()["statusCode"], 401);
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let in_request: Vec<&Value> = lines
        .iter()
        .filter(|l| l["span"]["name"] == "request")
        .collect();
    assert!(!in_request.is_empty(), "{text}");
    for line in in_request {
        assert_eq!(
            line["span"]["trace_id"],
            "Root=1-5bef4de7-ad49b0e87f6ef6c87fc2e700;Parent=9a9197af755a6419;Sampled=1",
            "{line}"
        );
        assert_eq!(
            line["span"]["aws_request_id"],
            "8476a536-e9f4-11e8-9739-2dfe598c3fcd"
        );
    }
}
