//! Failure tests: kill -9, restart, events committed while no projector ran, replays,
//! competing drivers, refusals at start-up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use commands::Position;
use domain::UserId;
use serde_json::{Value, json};
use tests::{Backend, PASSWORD, TestApp, TestDb, karmic_binary, on_both_backends};

struct Server {
    child: Child,
    base: String,
    client: reqwest::Client,
}

use tests::free_port;

impl Server {
    async fn start(db: &TestDb) -> Server {
        let port = free_port();
        let mut cmd = Command::new(karmic_binary!());
        cmd.arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("KARMIC_HTTP_ADDR", format!("127.0.0.1:{port}"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (k, v) in db.process_env() {
            if k != "KARMIC_JWT_SECRET" || db.backend == Backend::Postgres {
                cmd.env(k, v);
            }
        }
        let child = cmd.spawn().unwrap();
        let s = Server {
            child,
            base: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = s.client.get(format!("{}/health", s.base)).send().await
                && r.status() == 200
            {
                return s;
            }
            assert!(Instant::now() < deadline, "server did not come up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn kill_9(mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }

    async fn post(&self, path: &str, body: Value) -> reqwest::Response {
        self.client
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    async fn get(&self, path: &str, token: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.base))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    async fn login(&self, email: &str) -> reqwest::Response {
        self.post("/auth/login", json!({"email": email, "password": PASSWORD}))
            .await
    }
}

/// `kill -9` right after a burst of 2xx: after a restart every acknowledged command is
/// there, in the event store and in the read models. Tokens survive the restart (the
/// embedded JWT secret is kept in the data directory).
async fn kill_9_after_a_2xx_loses_nothing(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = Server::start(&db).await;
    let mut users = Vec::new();
    for i in 0..10 {
        let email = format!("u{i}@example.com");
        let r = server
            .post(
                "/auth/register",
                json!({"email": email, "password": PASSWORD, "display_name": format!("User {i}")}),
            )
            .await;
        assert_eq!(r.status(), 201);
        let id = r.json::<Value>().await.unwrap()["user_id"]
            .as_str()
            .unwrap()
            .to_owned();
        users.push((email, id));
    }
    let (email0, id0) = users[0].clone();
    let token: String = server.login(&email0).await.json::<Value>().await.unwrap()["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    // The last acknowledged write, then kill -9 at once.
    let r = server
        .client
        .put(format!("{}/profiles/{id0}", server.base))
        .bearer_auth(&token)
        .json(&json!({"display_name": "Survivor", "location": "Disk"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    server.kill_9();

    let server = Server::start(&db).await;
    // The old token still works: same secret after restart.
    let r = server.get(&format!("/profiles/{id0}"), &token).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["etag"], "\"2\"");
    let p: Value = r.json().await.unwrap();
    assert_eq!(p["display_name"], "Survivor");
    assert_eq!(p["location"], "Disk");
    for (email, id) in &users {
        let login = server.login(email).await;
        assert_eq!(login.status(), 200, "{email} lost");
        let own: Value = login.json().await.unwrap();
        let own_token = own["access_token"].as_str().unwrap();
        let r = server.get(&format!("/users/{id}"), own_token).await;
        assert_eq!(r.status(), 200, "{email} missing from the users read model");
        assert_eq!(
            server
                .get(&format!("/profiles/{id}"), &token)
                .await
                .status(),
            200
        );
    }
    server.kill_9();
}

/// Events committed while no projector ran (a process that died between its commit and
/// its projection) reach the read models: at start-up and from the background loop.
async fn events_committed_behind_the_projectors_back_are_caught_up(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (id, token) = app.signed_up("ann@example.com").await;
    let uid = UserId::parse(&id).unwrap();
    // Commit straight to the event store: no after-commit hook runs.
    tests::commit_behind_the_projectors_back(&app.store, &id, "Behind your back").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = app.get(&format!("/profiles/{id}"), &token).await;
        if r.headers()["etag"] == "\"2\"" {
            assert_eq!(
                r.json::<Value>().await.unwrap()["display_name"],
                "Behind your back"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the background projector never caught up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Now with the server down: commit, start, and the read model is current at once.
    let db = app.stop().await;
    let store = db.connect().await;
    tests::commit_behind_the_projectors_back(&store, &id, "While you were out").await;
    store.close().await;
    let rt = tests::runtime(&db).await;
    rt.projector
        .catch_up_through_now(Duration::from_secs(5))
        .await
        .unwrap();
    let view = rt.state.profile_reader.get(uid).await.unwrap().unwrap();
    assert_eq!(view.display_name, "While you were out");
    assert_eq!(view.version, 3);
}

/// Replaying the whole feed from zero changes nothing (idempotent apply).
async fn replaying_the_feed_from_zero_changes_nothing(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let (id, token) = app.signed_up(&format!("u{i}@example.com")).await;
        let r = app
            .put_profile(
                &id,
                &token,
                None,
                &json!({"display_name": format!("Name {i}"), "bio": "b"}),
            )
            .await;
        assert_eq!(r.status(), 200);
        ids.push(UserId::parse(&id).unwrap());
    }
    // Stop the app (and its projector) so this replay is the only driver, deterministically.
    let db = app.stop().await;
    let rt = tests::runtime(&db).await;
    // `all()` reads the store itself, never a cache.
    let before_profiles = rt.state.profile_reader.all().await.unwrap();
    let before_users = rt.state.read_models.users(None, 100).await.unwrap();
    assert_eq!(before_profiles.len(), 5);
    for name in ["users", "profiles", "profile_provisioner"] {
        rt.projector
            .checkpoints()
            .save(name, Position::START)
            .await
            .unwrap();
    }
    let report = rt
        .projector
        .catch_up_through_now(Duration::from_secs(5))
        .await
        .unwrap();
    assert!(report.failed.is_empty(), "{report:?}");
    assert!(report.applied.iter().all(|(_, n)| *n > 0), "{report:?}");
    let after_profiles = rt.state.profile_reader.all().await.unwrap();
    let after_users = rt.state.read_models.users(None, 100).await.unwrap();
    assert_eq!(before_profiles, after_profiles);
    assert_eq!(before_users, after_users);
    assert!(
        ids.iter()
            .all(|id| after_profiles.iter().any(|p| p.user_id == *id))
    );
    // And no profile was opened twice by the provisioner's replay.
    let events = rt
        .state
        .db
        .feed()
        .read_after(Position::START, 10_000)
        .await
        .unwrap();
    assert_eq!(
        events
            .iter()
            .filter(|e| e.event_type == "ProfileCreated")
            .count(),
        5
    );
}

/// Only one driver per projection at a time: while one holds the lock, another backs off.
async fn one_driver_per_projection(backend: Backend) {
    let db = TestDb::new(backend).await;
    let a = tests::runtime(&db).await;
    let other;
    let b: &handlers::Runtime = if backend == Backend::Postgres {
        other = tests::runtime(&db).await; // another "process": its own pools
        &other
    } else {
        // SQLite's lock is in-process: embedded mode is one process.
        &a
    };
    let held = a
        .projector
        .checkpoints()
        .lock("users", Duration::from_secs(1))
        .await
        .unwrap()
        .unwrap();
    let err = b.projector.catch_up_one("users").await.unwrap_err();
    assert!(err.to_string().contains("driven by someone else"), "{err}");
    held.release().await;
    b.projector.catch_up_one("users").await.unwrap();
}

on_both_backends!(
    kill_9_after_a_2xx_loses_nothing,
    events_committed_behind_the_projectors_back_are_caught_up,
    replaying_the_feed_from_zero_changes_nothing,
    one_driver_per_projection,
);

#[tokio::test]
async fn postgres_mode_refuses_to_start_without_a_jwt_secret() {
    let db = TestDb::new(Backend::Postgres).await;
    let out = Command::new(karmic_binary!())
        .arg("serve")
        .env_clear()
        .env("KARMIC_DATABASE_URL", &db.url)
        .env("KARMIC_HTTP_ADDR", format!("127.0.0.1:{}", free_port()))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("KARMIC_JWT_SECRET must be set"), "{err}");
    assert!(!err.contains(&db.url), "the database URL was printed");
}

#[tokio::test]
async fn sigterm_shuts_down_gracefully() {
    let db = TestDb::new(Backend::Sqlite).await;
    let server = Server::start(&db).await;
    let pid = server.child.id();
    let t = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let mut child = server.child;
    let exit = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    assert!(t.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn grant_admin_from_the_cli() {
    let db = TestDb::new(Backend::Sqlite).await;
    let server = Server::start(&db).await;
    server
        .post(
            "/auth/register",
            json!({"email": "ops@example.com", "password": PASSWORD, "display_name": "Ops"}),
        )
        .await;
    let run = |args: &[&str]| {
        let mut cmd = Command::new(karmic_binary!());
        cmd.args(args).env_clear().env("RUST_LOG", "warn");
        for (k, v) in db.process_env() {
            cmd.env(k, v);
        }
        cmd.env_remove("KARMIC_JWT_SECRET");
        cmd.output().unwrap()
    };
    let out = run(&["users", "grant-admin", "OPS@example.com"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&["users", "grant-admin", "nobody@example.com"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no account with this email"));
    let token = server
        .login("ops@example.com")
        .await
        .json::<Value>()
        .await
        .unwrap()["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = server.get("/users", &token).await;
    assert_eq!(r.status(), 200);
    let page: Value = r.json().await.unwrap();
    assert_eq!(page["items"][0]["role"], "admin");
    server.kill_9();
}
