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
        Self::start_with(db, &[]).await
    }

    async fn start_with(db: &TestDb, extra: &[(&str, &str)]) -> Server {
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
        for (k, v) in extra {
            cmd.env(k, v);
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

    /// Sign in and return the access token.
    async fn token(&self, email: &str) -> String {
        self.login(email).await.json::<Value>().await.unwrap()["access_token"]
            .as_str()
            .unwrap()
            .to_owned()
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
    let token = server.token(&email0).await;
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
    // The three reset projections replay everything (the documents projection was not
    // reset, and there are no documents).
    assert!(
        report
            .applied
            .iter()
            .filter(|(name, _)| *name != "documents")
            .all(|(_, n)| *n > 0),
        "{report:?}"
    );
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

/// Run the real `karmic` CLI on `db`; returns (success, stdout, stderr).
fn cli(db: &TestDb, args: &[&str], extra: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = Command::new(karmic_binary!());
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "error");
    for (k, v) in db.process_env() {
        cmd.env(k, v);
    }
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Only one driver per projection at a time, across processes on both stores: while this
/// process holds the `users` lease, a `karmic projections catch-up` process backs off
/// (and says so); once it is released, the CLI drives it.
async fn one_driver_per_projection(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.connect().await;
    tests::profile_behind_the_projectors_back(&store, "X").await;
    let a = tests::runtime(&db).await;
    let held = a
        .projector
        .checkpoints()
        .lock("users", Duration::from_secs(1))
        .await
        .unwrap()
        .unwrap();
    let (ok, out, err) = cli(&db, &["projections", "catch-up"], &[]);
    assert!(ok, "{err}");
    assert!(out.contains("users: busy"), "{out}");
    assert_eq!(
        a.projector.checkpoints().load("users").await.unwrap(),
        Position::START,
        "another process drove the projection while the lease was held"
    );
    held.release().await;
    let (ok, out, err) = cli(&db, &["projections", "catch-up"], &[]);
    assert!(ok, "{err}");
    assert!(out.contains("users: applied 1 events"), "{out}");
}

/// A driver frozen inside its batch (a Lambda container frozen mid-pass, here a process
/// SIGSTOPped while it blocks forever) holds the projection up for one lease at most:
/// another process's catch-up still advances within a bounded time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_driver_holds_a_projection_up_for_one_lease_at_most() {
    use std::io::BufRead;
    let db = TestDb::new(Backend::Postgres).await;
    let store = db.connect().await;
    for i in 0..3 {
        tests::profile_behind_the_projectors_back(&store, &format!("Frozen {i}")).await;
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_stuck-projector"))
        .args([db.url.as_str(), "1000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .unwrap();
        line
    });
    let line = tokio::time::timeout(Duration::from_secs(30), line)
        .await
        .expect("the stuck driver never started its batch")
        .unwrap();
    assert_eq!(line.trim(), "applying");
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-STOP", &pid])
            .status()
            .unwrap()
            .success()
    );

    let rt = tests::runtime(&db).await;
    let head = rt.projector.feed().head().await.unwrap().unwrap().0;
    let started = Instant::now();
    loop {
        if rt.projector.catch_up_one("users").await.is_ok()
            && rt.projector.checkpoints().load("users").await.unwrap() == head
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the frozen driver still holds the projection after {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// The embedded store across processes: `karmic projections rebuild users` (a process of
/// its own) while `karmic serve` keeps registering users; afterwards the read model equals
/// a fresh fold of the event store.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rebuilding_users_beside_a_busy_server_loses_nothing() {
    let db = TestDb::new(Backend::Sqlite).await;
    let server = std::sync::Arc::new(Server::start(&db).await);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..2 {
        let (server, stop) = (server.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let r = server
                    .post(
                        "/auth/register",
                        json!({"email": format!("w{w}-{n}@example.com"), "password": PASSWORD, "display_name": "Busy"}),
                    )
                    .await;
                assert_eq!(r.status(), 201);
                n += 1;
            }
            n
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..5 {
        let (ok, _, err) = cli(&db, &["projections", "rebuild", "users"], &[]);
        assert!(ok, "{err}");
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut registered = 0;
    for w in writers {
        registered += w.await.unwrap();
    }
    assert!(
        registered > 10,
        "only {registered} registrations ran during the rebuilds"
    );
    // Let the server's projector settle, then compare with a fresh fold.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ok, out, err) = cli(&db, &["projections", "verify", "users"], &[]);
    assert!(
        ok,
        "differences after rebuilding beside a busy server:\n{out}\n{err}"
    );
}

/// Embedded `serve` keeps profiles in an in-process cache. When another process (a CLI,
/// a second projector) applies profile events, `serve` hears of it within a poll interval
/// instead of serving the old profile until the cache's TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_embedded_cache_hears_of_another_processs_projection_work() {
    let db = TestDb::new(Backend::Sqlite).await;
    let server = Server::start_with(&db, &[("KARMIC_PROJECTION_POLL_MS", "1000")]).await;
    let r = server
        .post(
            "/auth/register",
            json!({"email": "cached@example.com", "password": PASSWORD, "display_name": "Old Name"}),
        )
        .await;
    assert_eq!(r.status(), 201);
    let id = r.json::<Value>().await.unwrap()["user_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let token = server.token("cached@example.com").await;
    // Warm serve's cache.
    let p: Value = server
        .get(&format!("/profiles/{id}"), &token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(p["display_name"], "Old Name");
    // Another process commits and projects at once (before serve's next poll).
    let store = db.connect().await;
    tests::commit_behind_the_projectors_back(&store, &id, "New Name").await;
    let rt = tests::runtime(&db).await;
    rt.projector.catch_up().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let p: Value = server
            .get(&format!("/profiles/{id}"), &token)
            .await
            .json()
            .await
            .unwrap();
        if p["display_name"] == "New Name" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "serve still answers the old profile"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
    let token = server.token("ops@example.com").await;
    let r = server.get("/users", &token).await;
    assert_eq!(r.status(), 200);
    let page: Value = r.json().await.unwrap();
    assert_eq!(page["items"][0]["role"], "admin");
    server.kill_9();
}
