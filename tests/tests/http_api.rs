//! Black-box tests of the HTTP API against a spawned app, on both stores.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::{Value, json};
use tests::{Backend, PASSWORD, TestApp, assert_problem, on_both_backends};

async fn registering_returns_the_new_account(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let r = app.register("  Ann.Lee@Example.COM ", "Ann Lee").await;
    assert_eq!(r.status(), 201);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["email"], "ann.lee@example.com");
    assert_eq!(body["display_name"], "Ann Lee");
    let id = body["user_id"].as_str().unwrap();
    assert_eq!(location, format!("/users/{id}"));
    uuid::Uuid::parse_str(id).unwrap();
}

async fn an_email_is_taken_whatever_its_case(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    assert_eq!(app.register("ann@example.com", "Ann").await.status(), 201);
    let body = assert_problem(app.register("ANN@example.com", "Other Ann").await, 409).await;
    assert_eq!(body["type"], "https://karmic.dev/problems/email-taken");
}

/// 20 concurrent registrations of one email: one 201, nineteen 409, one user stored.
async fn invalid_registrations_name_every_bad_field(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let r = app
        .post_json(
            "/auth/register",
            &json!({"email": "not-an-email", "password": "short", "display_name": ""}),
        )
        .await;
    let body = assert_problem(r, 422).await;
    let fields: Vec<&str> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, vec!["email", "password", "display_name"]);
}

async fn logging_in_returns_a_bearer_token(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.register("ann@example.com", "Ann").await;
    let r = app
        .post_json(
            "/auth/login",
            &json!({"email": "Ann@Example.com", "password": PASSWORD}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3600);
    assert_eq!(body["access_token"].as_str().unwrap().split('.').count(), 3);
}

/// Wrong email and wrong password look the same: same status, same body.
async fn a_wrong_email_and_a_wrong_password_are_indistinguishable(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.register("ann@example.com", "Ann").await;
    let wrong_pw = app
        .post_json(
            "/auth/login",
            &json!({"email": "ann@example.com", "password": "wrong password!"}),
        )
        .await;
    let wrong_email = app
        .post_json(
            "/auth/login",
            &json!({"email": "nobody@example.com", "password": PASSWORD}),
        )
        .await;
    let malformed_email = app
        .post_json(
            "/auth/login",
            &json!({"email": "nobody", "password": PASSWORD}),
        )
        .await;
    let a = assert_problem(wrong_pw, 401).await;
    let b = assert_problem(wrong_email, 401).await;
    let c = assert_problem(malformed_email, 401).await;
    assert_eq!(a, b);
    assert_eq!(b, c);
}

async fn the_bootstrap_admin_lists_users_page_by_page(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| {
        s.bootstrap_admin_email = Some("Boss@Example.com".into());
    })
    .await;
    let (_, admin) = app.signed_up("boss@example.com").await;
    for i in 0..4 {
        app.register(&format!("u{i}@example.com"), "U").await;
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/users?limit=2&cursor={c}"),
            None => "/users?limit=2".to_owned(),
        };
        let r = app.get(&path, &admin).await;
        assert_eq!(r.status(), 200);
        let page: Value = r.json().await.unwrap();
        for item in page["items"].as_array().unwrap() {
            seen.push(item["email"].as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(
        seen,
        vec![
            "boss@example.com",
            "u0@example.com",
            "u1@example.com",
            "u2@example.com",
            "u3@example.com"
        ]
    );
    let r = app.get("/users?limit=1", &admin).await;
    let page: Value = r.json().await.unwrap();
    assert_eq!(page["items"][0]["role"], "admin");
    assert_problem(app.get("/users?limit=0", &admin).await, 400).await;
    assert_problem(app.get("/users?limit=abc", &admin).await, 400).await;
    assert_problem(app.get("/users?cursor=zzz", &admin).await, 400).await;
}

async fn only_admins_list_users_and_only_owners_or_admins_read_one(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| {
        s.bootstrap_admin_email = Some("boss@example.com".into());
    })
    .await;
    let (boss_id, boss) = app.signed_up("boss@example.com").await;
    let (ann_id, ann) = app.signed_up("ann@example.com").await;
    let (bob_id, _) = app.signed_up("bob@example.com").await;

    assert_problem(app.get("/users", &ann).await, 403).await;
    let me = app.get(&format!("/users/{ann_id}"), &ann).await;
    assert_eq!(me.status(), 200);
    let me: Value = me.json().await.unwrap();
    assert_eq!(me["email"], "ann@example.com");
    assert_eq!(me["role"], "user");
    assert_eq!(me["active"], true);
    assert_problem(app.get(&format!("/users/{bob_id}"), &ann).await, 403).await;
    assert_eq!(
        app.get(&format!("/users/{bob_id}"), &boss).await.status(),
        200
    );
    assert_eq!(
        app.get(&format!("/users/{boss_id}"), &boss).await.status(),
        200
    );
    let missing = uuid::Uuid::now_v7();
    assert_problem(app.get(&format!("/users/{missing}"), &boss).await, 404).await;
}

async fn granting_admin_through_the_service_takes_effect_at_next_login(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (_, before) = app.signed_up("ann@example.com").await;
    assert_problem(app.get("/users", &before).await, 403).await;
    let rt = tests::runtime(&app.db).await;
    rt.state
        .accounts
        .grant_admin(
            &domain::Email::parse("ann@example.com").unwrap(),
            &commands::CommandMeta::system("test"),
        )
        .await
        .unwrap();
    let after = app.login("ann@example.com").await;
    assert_eq!(app.get("/users", &after).await.status(), 200);
    // A revoked admin loses access at once, even with a token that still says admin.
    rt.state
        .accounts
        .revoke_admin(
            &domain::Email::parse("ann@example.com").unwrap(),
            &commands::CommandMeta::system("test"),
        )
        .await
        .unwrap();
    assert_problem(app.get("/users", &after).await, 403).await;
}

async fn profiles_are_versioned_with_etags(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (id, token) = app.signed_up("ann@example.com").await;
    let (_, other) = app.signed_up("bob@example.com").await;

    let r = app.get(&format!("/profiles/{id}"), &other).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["etag"], "\"1\"");
    let p: Value = r.json().await.unwrap();
    assert_eq!(p["display_name"], "Someone");
    assert_eq!(p["version"], 1);

    let update = json!({
        "display_name": "Ann Lee",
        "bio": "Writes things.\nReads more.",
        "avatar_url": "https://cdn.example.com/ann.png",
        "location": "Lisbon",
        "website": "https://ann.example.com"
    });
    let r = app.put_profile(&id, &token, Some("\"1\""), &update).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["etag"], "\"2\"");

    // Read your own write.
    let r = app.get(&format!("/profiles/{id}"), &token).await;
    assert_eq!(r.headers()["etag"], "\"2\"");
    let p: Value = r.json().await.unwrap();
    assert_eq!(p["display_name"], "Ann Lee");
    assert_eq!(p["bio"], "Writes things.\nReads more.");
    assert_eq!(p["location"], "Lisbon");
    assert_eq!(p["website"], "https://ann.example.com/");

    // A stale If-Match is refused and told the current version.
    let r = app.put_profile(&id, &token, Some("\"1\""), &update).await;
    assert_eq!(r.headers()["etag"], "\"2\"");
    assert_problem(r, 412).await;

    // If-None-Match with the current version: 304.
    let r = app
        .client
        .get(app.url(&format!("/profiles/{id}")))
        .bearer_auth(&token)
        .header("if-none-match", "\"2\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);

    // Someone else's profile: 403. Bad fields: 422. Unknown profile: 404.
    assert_problem(app.put_profile(&id, &other, None, &update).await, 403).await;
    let bad = json!({"display_name": "Ann", "website": "javascript:alert(1)"});
    let body = assert_problem(app.put_profile(&id, &token, None, &bad).await, 422).await;
    assert_eq!(body["errors"][0]["field"], "website");
    let missing = uuid::Uuid::now_v7();
    assert_problem(app.get(&format!("/profiles/{missing}"), &token).await, 404).await;
    assert_problem(
        app.put_profile(&id, &token, Some("nonsense"), &update)
            .await,
        400,
    )
    .await;
}

/// Writers racing at one version: one wins, the rest are told 409 (or 412 if they
/// loaded after the winner).
/// Unconditional writes (no `If-Match`) mean "replace, whatever the version": 16 clients
/// sending 320 of them to one profile all get 200, and the profile ends as one of them.
/// Conditional writes keep their meaning: of 12 writers naming the same version, one wins
/// and the others get 412.
async fn concurrent_profile_writes(backend: Backend) {
    let app = std::sync::Arc::new(TestApp::spawn(backend).await);
    let (id, token) = app.signed_up("ann@example.com").await;
    let mut tasks = Vec::new();
    for w in 0..16 {
        let app = app.clone();
        let (id, token) = (id.clone(), token.clone());
        tasks.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            for i in 0..20 {
                let body = json!({"display_name": format!("writer {w} write {i}")});
                statuses.push(
                    app.put_profile(&id, &token, None, &body)
                        .await
                        .status()
                        .as_u16(),
                );
            }
            statuses
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.extend(t.await.unwrap());
    }
    assert_eq!(statuses.len(), 320);
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let r = app.get(&format!("/profiles/{id}"), &token).await;
    assert_eq!(r.headers()["etag"], "\"321\"");
    let p: Value = r.json().await.unwrap();
    let name = p["display_name"].as_str().unwrap();
    assert!(
        name.starts_with("writer ") && name.contains(" write "),
        "{name}"
    );

    let mut tasks = Vec::new();
    for w in 0..12 {
        let app = app.clone();
        let (id, token) = (id.clone(), token.clone());
        tasks.push(tokio::spawn(async move {
            let body = json!({"display_name": format!("conditional {w}")});
            app.put_profile(&id, &token, Some("\"321\""), &body)
                .await
                .status()
                .as_u16()
        }));
    }
    let counts = tests::status_counts(tasks).await;
    assert_eq!(counts.get(&200), Some(&1), "{counts:?}");
    assert_eq!(
        counts.get(&412).copied().unwrap_or(0) + counts.get(&409).copied().unwrap_or(0),
        11,
        "{counts:?}"
    );
}

on_both_backends!(
    registering_returns_the_new_account,
    an_email_is_taken_whatever_its_case,
    invalid_registrations_name_every_bad_field,
    logging_in_returns_a_bearer_token,
    a_wrong_email_and_a_wrong_password_are_indistinguishable,
    the_bootstrap_admin_lists_users_page_by_page,
    only_admins_list_users_and_only_owners_or_admins_read_one,
    granting_admin_through_the_service_takes_effect_at_next_login,
    profiles_are_versioned_with_etags,
    concurrent_profile_writes,
);
