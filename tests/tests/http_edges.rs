//! Bad input never gets a 5xx: one test per class. Tokens, CORS, limits, request ids.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tests::{Backend, TEST_JWT_SECRET, TestApp, assert_problem};

async fn app() -> TestApp {
    TestApp::spawn_with(Backend::Sqlite, |s| {
        s.cors_origins = vec!["https://app.example.com".into()];
    })
    .await
}

async fn raw(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    ct: Option<&str>,
    body: Vec<u8>,
) -> reqwest::Response {
    let mut req = app.client.request(method, app.url(path)).body(body);
    if let Some(ct) = ct {
        req = req.header("content-type", ct);
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn malformed_json_is_a_400() {
    let app = app().await;
    let r = raw(
        &app,
        reqwest::Method::POST,
        "/auth/register",
        Some("application/json"),
        b"{\"email\": ".to_vec(),
    )
    .await;
    let body = assert_problem(r, 400).await;
    assert!(body["detail"].as_str().unwrap().contains("malformed JSON"));
}

#[tokio::test]
async fn wrong_types_are_a_422() {
    let app = app().await;
    let r = app
        .post_json(
            "/auth/register",
            &json!({"email": 5, "password": true, "display_name": []}),
        )
        .await;
    assert_problem(r, 422).await;
}

#[tokio::test]
async fn missing_fields_are_a_422() {
    let app = app().await;
    let r = app
        .post_json("/auth/register", &json!({"email": "a@example.com"}))
        .await;
    let body = assert_problem(r, 422).await;
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("missing field")
    );
}

#[tokio::test]
async fn unknown_fields_are_a_422() {
    let app = app().await;
    let r = app
        .post_json("/auth/register", &json!({"email": "a@example.com", "password": "long enough pw", "display_name": "A", "role": "admin"}))
        .await;
    assert_problem(r, 422).await;
}

#[tokio::test]
async fn a_body_that_is_not_json_is_a_415() {
    let app = app().await;
    let r = raw(
        &app,
        reqwest::Method::POST,
        "/auth/login",
        Some("text/plain"),
        b"hello".to_vec(),
    )
    .await;
    assert_problem(r, 415).await;
    let r = raw(
        &app,
        reqwest::Method::POST,
        "/auth/login",
        None,
        b"{}".to_vec(),
    )
    .await;
    assert_problem(r, 415).await;
}

#[tokio::test]
async fn oversize_bodies_are_a_413() {
    let app = app().await;
    let big = format!("{{\"email\": \"{}\"}}", "a".repeat(200 * 1024));
    let r = raw(
        &app,
        reqwest::Method::POST,
        "/auth/register",
        Some("application/json"),
        big.into_bytes(),
    )
    .await;
    assert_problem(r, 413).await;
}

#[tokio::test]
async fn over_long_strings_are_a_422() {
    let app = app().await;
    let r = app
        .post_json("/auth/register", &json!({"email": "a@example.com", "password": "long enough pw", "display_name": "x".repeat(101)}))
        .await;
    let body = assert_problem(r, 422).await;
    assert_eq!(body["errors"][0]["field"], "display_name");
    let (id, token) = app.signed_up("b@example.com").await;
    let r = app
        .put_profile(
            &id,
            &token,
            None,
            &json!({"display_name": "B", "bio": "x".repeat(2001)}),
        )
        .await;
    assert_problem(r, 422).await;
    let r = app
        .post_json(
            "/auth/register",
            &json!({"email": "c@example.com", "password": "p".repeat(2000), "display_name": "C"}),
        )
        .await;
    assert_problem(r, 422).await;
}

#[tokio::test]
async fn invalid_emails_are_a_422() {
    let app = app().await;
    for email in [
        "",
        "no-at-sign",
        "a@b",
        "two@@example.com",
        "spa ce@example.com",
    ] {
        let r = app
            .post_json(
                "/auth/register",
                &json!({"email": email, "password": "long enough pw", "display_name": "A"}),
            )
            .await;
        let body = assert_problem(r, 422).await;
        assert_eq!(body["errors"][0]["field"], "email", "{email:?}");
    }
}

#[tokio::test]
async fn invalid_uuids_in_paths_are_a_400() {
    let app = app().await;
    let (_, token) = app.signed_up("a@example.com").await;
    for path in ["/users/not-a-uuid", "/profiles/123", "/profiles/%00"] {
        assert_problem(app.get(path, &token).await, 400).await;
    }
}

#[tokio::test]
async fn unknown_routes_and_methods_are_problems() {
    let app = app().await;
    let r = app.client.get(app.url("/nope")).send().await.unwrap();
    assert_problem(r, 404).await;
    let r = app
        .client
        .delete(app.url("/auth/login"))
        .send()
        .await
        .unwrap();
    assert_problem(r, 405).await;
}

fn token(claims: Value, secret: &str, alg: Algorithm) -> String {
    jsonwebtoken::encode(
        &Header::new(alg),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn claims(sub: &str) -> Value {
    let now = chrono::Utc::now().timestamp();
    json!({"sub": sub, "iat": now, "exp": now + 600, "iss": "karmic", "aud": "karmic-api", "role": "admin"})
}

#[tokio::test]
async fn bad_tokens_are_a_401_with_a_bearer_challenge() {
    let app = app().await;
    let (id, good) = app.signed_up("a@example.com").await;
    let path = format!("/profiles/{id}");
    assert_eq!(app.get(&path, &good).await.status(), 200);

    let mut bad = Vec::new();
    // alg: none, unsigned.
    {
        use base64_like::encode;
        let header = encode(br#"{"alg":"none","typ":"JWT"}"#);
        let body = encode(claims(&id).to_string().as_bytes());
        bad.push(("alg none", format!("{header}.{body}.")));
    }
    let mut expired = claims(&id);
    expired["exp"] = json!(chrono::Utc::now().timestamp() - 3600);
    expired["iat"] = json!(chrono::Utc::now().timestamp() - 7200);
    bad.push(("expired", token(expired, TEST_JWT_SECRET, Algorithm::HS256)));
    let mut tampered = good.clone();
    tampered.pop();
    tampered.push(if good.ends_with('A') { 'B' } else { 'A' });
    bad.push(("tampered", tampered));
    bad.push((
        "other secret",
        token(
            claims(&id),
            "another-secret-another-secret-another-secret",
            Algorithm::HS256,
        ),
    ));
    let mut wrong_iss = claims(&id);
    wrong_iss["iss"] = json!("someone-else");
    bad.push((
        "wrong issuer",
        token(wrong_iss, TEST_JWT_SECRET, Algorithm::HS256),
    ));
    let mut wrong_aud = claims(&id);
    wrong_aud["aud"] = json!("another-api");
    bad.push((
        "wrong audience",
        token(wrong_aud, TEST_JWT_SECRET, Algorithm::HS256),
    ));
    bad.push((
        "HS512",
        token(claims(&id), TEST_JWT_SECRET, Algorithm::HS512),
    ));
    bad.push(("garbage", "not.a.jwt".to_owned()));

    for (what, t) in bad {
        let r = app.get(&path, &t).await;
        assert_eq!(r.status(), 401, "{what}");
        assert!(
            r.headers()["www-authenticate"]
                .to_str()
                .unwrap()
                .starts_with("Bearer"),
            "{what}"
        );
        assert_problem(r, 401).await;
    }
    let r = app.client.get(app.url(&path)).send().await.unwrap();
    assert!(r.headers().contains_key("www-authenticate"));
    assert_problem(r, 401).await;
    let r = app
        .client
        .get(app.url(&path))
        .header("authorization", "Basic abc")
        .send()
        .await
        .unwrap();
    assert_problem(r, 401).await;
}

/// A minimal unpadded base64url encoder for hand-made tokens.
mod base64_like {
    pub fn encode(bytes: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            let chars = chunk.len() + 1;
            for i in 0..chars {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }
}

#[tokio::test]
async fn cors_allows_only_configured_origins() {
    let app = app().await;
    let preflight = |origin: &'static str| {
        app.client
            .request(
                reqwest::Method::OPTIONS,
                app.url("/profiles/00000000-0000-0000-0000-000000000000"),
            )
            .header("origin", origin)
            .header("access-control-request-method", "PUT")
            .header(
                "access-control-request-headers",
                "authorization,if-match,content-type",
            )
            .send()
    };
    let ok = preflight("https://app.example.com").await.unwrap();
    assert_eq!(
        ok.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    let methods = ok.headers()["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(methods.contains("PUT"));
    let evil = preflight("https://evil.example.com").await.unwrap();
    assert!(!evil.headers().contains_key("access-control-allow-origin"));
}

#[tokio::test]
async fn every_response_carries_a_request_id() {
    let app = app().await;
    let r = app.client.get(app.url("/health")).send().await.unwrap();
    assert!(uuid::Uuid::parse_str(r.headers()["x-request-id"].to_str().unwrap()).is_ok());
    let r = app
        .client
        .get(app.url("/health"))
        .header("x-request-id", "abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "abc-123");
}

#[tokio::test]
async fn health_reports_the_store() {
    let app = app().await;
    let r = app.client.get(app.url("/health")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["event_store"], "ok");
    assert_eq!(body["backend"], "sqlite");
    // With the store gone, health says so with a 503.
    app.store.close().await;
    let r = app.client.get(app.url("/health")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["event_store"], "unreachable");
}

#[tokio::test]
async fn the_served_openapi_document_is_the_committed_one() {
    let app = app().await;
    let r = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let served = r.text().await.unwrap();
    let committed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json"))
        .expect("docs/openapi.json is committed; regenerate it with `cargo run -p cli -- openapi > docs/openapi.json`");
    assert_eq!(
        served, committed,
        "docs/openapi.json is out of date; regenerate it with `cargo run -p cli -- openapi > docs/openapi.json`"
    );
    let doc: Value = serde_json::from_str(&served).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for p in [
        "/auth/register",
        "/auth/login",
        "/users",
        "/users/{id}",
        "/profiles/{id}",
        "/health",
    ] {
        assert!(
            doc["paths"].get(p).is_some(),
            "{p} missing from the OpenAPI document"
        );
    }
}

#[tokio::test]
async fn login_timing_does_not_reveal_whether_an_email_exists() {
    // Real hashing parameters here: the point is that both paths do the same work.
    let app = TestApp::spawn_with(Backend::Sqlite, |s| {
        s.argon2_memory_kib = 19 * 1024;
        s.argon2_iterations = 2;
    })
    .await;
    app.register("ann@example.com", "Ann").await;
    // Interleave the two kinds so that load from anything else hits both alike.
    let mut known = Vec::new();
    let mut unknown = Vec::new();
    for i in 0..30 {
        let email = if i % 2 == 0 {
            "ann@example.com"
        } else {
            "nobody@example.com"
        };
        let t = std::time::Instant::now();
        let r = app
            .post_json(
                "/auth/login",
                &json!({"email": email, "password": "wrong password!"}),
            )
            .await;
        assert_eq!(r.status(), 401);
        let took = t.elapsed().as_secs_f64();
        if i % 2 == 0 {
            known.push(took);
        } else {
            unknown.push(took);
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let (known, unknown) = (median(known), median(unknown));
    let ratio = known / unknown;
    assert!(
        (0.5..2.0).contains(&ratio),
        "known {known:.4}s vs unknown {unknown:.4}s"
    );
}
