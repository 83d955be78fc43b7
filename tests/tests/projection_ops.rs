//! `karmic projections status|verify`: what ops see.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use projections::ops;
use serde_json::Value;
use tests::{Backend, TestApp, karmic_binary, on_both_backends};

async fn status_shows_checkpoint_head_and_lag(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (id, _) = app.signed_up("ann@example.com").await;
    let rt = tests::runtime_like(&app).await;
    // The read models are current when the registration answers; the profile provisioner
    // (which keeps no read model) is driven by the background loop right after.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let status = loop {
        let status = ops::status(&rt.projector).await.unwrap();
        let read_models_current = status
            .iter()
            .filter(|s| !["profile_provisioner", "documents"].contains(&s.name.as_str()))
            .all(|s| s.lag_events == 0);
        assert!(read_models_current, "{status:?}");
        if status.iter().all(|s| s.lag_events == 0) || std::time::Instant::now() > deadline {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let names: Vec<&str> = status.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        vec!["users", "profiles", "profile_provisioner", "documents"]
    );
    assert!(
        status
            .iter()
            .all(|s| s.lag_events == 0 && s.lag_seconds == 0.0),
        "{status:?}"
    );
    assert!(
        status
            .iter()
            .all(|s| Some(&s.checkpoint) == s.head.as_ref()),
        "{status:?}"
    );

    // Stop the app's projector and commit behind its back: the lag shows.
    let db = app.stop().await;
    let store = db.connect().await;
    tests::commit_behind_the_projectors_back(&store, &id, "Later").await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let rt = tests::runtime(&db).await;
    let status = ops::status(&rt.projector).await.unwrap();
    assert!(status.iter().all(|s| s.lag_events == 1), "{status:?}");
    assert!(status.iter().all(|s| s.lag_seconds >= 1.0), "{status:?}");

    // The CLI says the same, as JSON for scripts.
    let mut cmd = std::process::Command::new(karmic_binary!());
    cmd.args(["projections", "status", "--json"])
        .env_clear()
        .env("RUST_LOG", "error");
    for (k, v) in db.process_env() {
        cmd.env(k, v);
    }
    cmd.env("KARMIC_AUTO_MIGRATE", "false");
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 4);
    assert_eq!(json[1]["name"], "profiles");
    assert_eq!(json[1]["lag_events"], 1);

    rt.projector.catch_up().await.unwrap();
    let status = ops::status(&rt.projector).await.unwrap();
    assert!(status.iter().all(|s| s.lag_events == 0), "{status:?}");
}

async fn verify_finds_a_tampered_read_model(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (id, token) = app.signed_up("ann@example.com").await;
    app.signed_up("bob@example.com").await;
    let r = app
        .put_profile(
            &id,
            &token,
            None,
            &serde_json::json!({"display_name": "Ann"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let rt = tests::runtime_like(&app).await;
    let feed = rt.projector.feed().clone();
    assert_eq!(
        ops::verify_profiles(&*feed, &*rt.state.profile_reader)
            .await
            .unwrap(),
        vec![]
    );
    assert_eq!(
        ops::verify_users(&*feed, &rt.state.read_models)
            .await
            .unwrap(),
        vec![]
    );

    match &app.store {
        commands::Database::Postgres(p) => {
            sqlx::query("UPDATE profiles_view SET display_name = 'Mallory'")
                .execute(p)
                .await
                .unwrap();
            sqlx::query("UPDATE users_view SET is_admin = true")
                .execute(p)
                .await
                .unwrap();
        }
        commands::Database::Sqlite(p) => {
            sqlx::query("UPDATE profiles_view SET display_name = 'Mallory'")
                .execute(p)
                .await
                .unwrap();
            sqlx::query("UPDATE users_view SET is_admin = 1")
                .execute(p)
                .await
                .unwrap();
        }
    }
    // A fresh runtime: no in-process cache hides the tampering.
    let rt = tests::runtime_like(&app).await;
    let diffs = ops::verify_profiles(&*feed, &*rt.state.profile_reader)
        .await
        .unwrap();
    assert_eq!(diffs.len(), 2, "{diffs:?}");
    assert!(
        diffs
            .iter()
            .all(|d| matches!(d, ops::Difference::Field { field, .. } if field == "display_name"))
    );
    let diffs = ops::verify_users(&*feed, &rt.state.read_models)
        .await
        .unwrap();
    assert_eq!(diffs.len(), 2, "{diffs:?}");

    let mut cmd = std::process::Command::new(karmic_binary!());
    cmd.args(["projections", "verify", "profiles"])
        .env_clear()
        .env("RUST_LOG", "error");
    for (k, v) in app.db.process_env() {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("display_name is \"Mallory\""), "{stdout}");

    // A rebuild repairs it.
    ops::rebuild_profiles(&rt.projector, rt.state.profile_reader.clone(), &|_, _| {})
        .await
        .unwrap();
    assert_eq!(
        ops::verify_profiles(&*feed, &*rt.state.profile_reader)
            .await
            .unwrap(),
        vec![]
    );

    // Users: besides the tampered flags, a row no event explains, and the half-filled
    // table a killed rebuild leaves behind. `karmic projections rebuild users` (the real
    // binary) ends with exactly the fold of the events.
    let ghost = uuid::Uuid::new_v4();
    match &app.store {
        commands::Database::Postgres(p) => {
            sqlx::query(
                "INSERT INTO users_view (user_id, email, registered_at, version)
                 VALUES ($1, 'ghost@example.com', now(), 1)",
            )
            .bind(ghost)
            .execute(p)
            .await
            .unwrap();
        }
        commands::Database::Sqlite(p) => {
            sqlx::query(
                "INSERT INTO users_view (user_id, email, registered_at, version)
                 VALUES (?, 'ghost@example.com', '2026-01-01T00:00:00.000000Z', 1)",
            )
            .bind(ghost.to_string())
            .execute(p)
            .await
            .unwrap();
        }
    }
    rt.state.read_models.begin_users_rebuild().await.unwrap();
    let diffs = ops::verify_users(&*feed, &rt.state.read_models)
        .await
        .unwrap();
    assert_eq!(diffs.len(), 3, "{diffs:?}");
    let mut cmd = std::process::Command::new(karmic_binary!());
    cmd.args(["projections", "rebuild", "users"])
        .env_clear()
        .env("RUST_LOG", "error");
    for (k, v) in app.db.process_env() {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("users: rebuilt from"), "{stdout}");
    assert_eq!(
        ops::verify_users(&*feed, &rt.state.read_models)
            .await
            .unwrap(),
        vec![]
    );
    // The running app's projection carries on in the swapped-in table.
    app.signed_up("carol@example.com").await;
    rt.projector.catch_up().await.unwrap();
    assert_eq!(
        ops::verify_users(&*feed, &rt.state.read_models)
            .await
            .unwrap(),
        vec![]
    );
    assert_eq!(rt.state.read_models.users(None, 10).await.unwrap().len(), 3);
}

on_both_backends!(
    status_shows_checkpoint_head_and_lag,
    verify_finds_a_tampered_read_model
);
