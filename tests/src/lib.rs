//! Test support: throwaway databases, a spawned app, and HTTP helpers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod bench;
pub mod docs;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use commands::Database;
use commands::store::PoolSettings;
use handlers::{Application, Runtime, Settings};
use serde_json::{Value, json};

/// Which store a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The server every Postgres test database is created on (trust auth).
pub fn postgres_admin_url() -> String {
    std::env::var("KARMIC_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A database of its own for one test: a fresh Postgres database (dropped afterwards) or
/// a SQLite file in a temporary directory.
pub struct TestDb {
    pub backend: Backend,
    pub url: String,
    pub dir: tempfile::TempDir,
    pg_name: Option<String>,
}

impl TestDb {
    pub async fn new(backend: Backend) -> TestDb {
        let dir = tempfile::tempdir().unwrap();
        match backend {
            Backend::Sqlite => TestDb {
                backend,
                url: format!("sqlite://{}", dir.path().join("karmic.db").display()),
                dir,
                pg_name: None,
            },
            Backend::Postgres => {
                let name = format!("karmic_t_{}", uuid::Uuid::new_v4().simple());
                let admin = postgres_admin_url();
                let pool = sqlx::PgPool::connect(&admin).await.expect(
                    "Postgres must be running on 127.0.0.1:5432 (see .ci/run) for these tests",
                );
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&pool)
                    .await
                    .unwrap();
                pool.close().await;
                let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap().to_owned();
                TestDb {
                    backend,
                    url: format!("{base}/{name}"),
                    dir,
                    pg_name: Some(name),
                }
            }
        }
    }

    /// A connected, migrated store.
    pub async fn connect(&self) -> Database {
        let settings = PoolSettings {
            max_connections: 5,
            ..PoolSettings::default()
        };
        let db = Database::connect(&self.url, &settings).await.unwrap();
        db.migrate().await.unwrap();
        db
    }

    /// Settings for an app on this database, listening on a free port.
    pub fn settings(&self) -> Settings {
        let mut env = HashMap::new();
        env.insert(
            "KARMIC_DATA_DIR".to_owned(),
            self.dir.path().display().to_string(),
        );
        env.insert("KARMIC_HTTP_ADDR".to_owned(), "127.0.0.1:0".to_owned());
        // `karmic serve`'s own S3 endpoint: a free port per test.
        env.insert(
            "KARMIC_S3_EMBEDDED_ADDR".to_owned(),
            "127.0.0.1:0".to_owned(),
        );
        env.insert("KARMIC_JWT_SECRET".to_owned(), TEST_JWT_SECRET.to_owned());
        // Cheap hashing keeps the suite fast; the real parameters are covered by the
        // login-timing and benchmark runs.
        env.insert("KARMIC_ARGON2_MEMORY_KIB".to_owned(), "1024".to_owned());
        env.insert("KARMIC_ARGON2_ITERATIONS".to_owned(), "1".to_owned());
        env.insert("KARMIC_PROJECTION_POLL_MS".to_owned(), "100".to_owned());
        // Tests run side by side against one Postgres (max_connections = 100).
        env.insert("KARMIC_DB_MAX_CONNECTIONS".to_owned(), "5".to_owned());
        // Tests drive the API far harder than one client may; the throttles have tests of
        // their own that turn them on.
        for (k, v) in THROTTLES_OFF {
            env.insert((*k).to_owned(), (*v).to_owned());
        }
        if self.backend == Backend::Postgres {
            env.insert("KARMIC_DATABASE_URL".to_owned(), self.url.clone());
        }
        Settings::from_sources(&env).unwrap()
    }

    /// The environment a `karmic` process needs to run on this database.
    pub fn process_env(&self) -> Vec<(String, String)> {
        let mut v = vec![
            (
                "KARMIC_DATA_DIR".to_owned(),
                self.dir.path().display().to_string(),
            ),
            ("KARMIC_JWT_SECRET".to_owned(), TEST_JWT_SECRET.to_owned()),
            ("KARMIC_ARGON2_MEMORY_KIB".to_owned(), "1024".to_owned()),
            ("KARMIC_ARGON2_ITERATIONS".to_owned(), "1".to_owned()),
            ("KARMIC_DB_MAX_CONNECTIONS".to_owned(), "5".to_owned()),
            (
                "KARMIC_S3_EMBEDDED_ADDR".to_owned(),
                "127.0.0.1:0".to_owned(),
            ),
        ];
        v.extend(
            THROTTLES_OFF
                .iter()
                .map(|(k, val)| ((*k).to_owned(), (*val).to_owned())),
        );
        if self.backend == Backend::Postgres {
            v.push(("KARMIC_DATABASE_URL".to_owned(), self.url.clone()));
        }
        v
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(name) = self.pg_name.take() {
            let admin = postgres_admin_url();
            block_on_a_thread(async move {
                if let Ok(pool) = sqlx::PgPool::connect(&admin).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&pool)
                        .await;
                    pool.close().await;
                }
            });
        }
    }
}

/// Settings that turn off per-client throttling (request rate, failed sign-ins).
pub const THROTTLES_OFF: &[(&str, &str)] = &[
    ("KARMIC_RATE_LIMIT_PER_SEC", "0"),
    ("KARMIC_LOGIN_FAILURES_PER_ACCOUNT", "0"),
    ("KARMIC_LOGIN_FAILURES_PER_CLIENT", "0"),
];

/// The MongoDB-compatible server the tests use (SecantusDB, started by scripts/services.sh).
pub fn mongodb_url() -> String {
    std::env::var("KARMIC_TEST_MONGODB_URL").unwrap_or_else(|_| {
        "mongodb://127.0.0.1:27017/?directConnection=true&retryWrites=false".to_owned()
    })
}

/// The Redis the tests use.
pub fn redis_url() -> String {
    std::env::var("KARMIC_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".to_owned())
}

/// A MongoDB database of its own for one test, dropped afterwards.
pub struct TestMongo {
    pub url: String,
    pub database: String,
}

impl TestMongo {
    pub fn new() -> TestMongo {
        TestMongo {
            url: mongodb_url(),
            database: format!("karmic_t_{}", uuid::Uuid::new_v4().simple()),
        }
    }

    pub fn settings(&self) -> projections::mongo::MongoSettings {
        projections::mongo::MongoSettings {
            url: self.url.clone(),
            database: self.database.clone(),
            tls_ca_file: None,
            timeout: Duration::from_secs(5),
        }
    }

    pub async fn profiles(&self) -> projections::mongo::MongoProfiles {
        let m = projections::mongo::MongoProfiles::connect(&self.settings())
            .await
            .unwrap();
        m.migrate().await.unwrap();
        m
    }

    /// The documents read model in this database, indexes created.
    pub async fn documents(&self) -> projections::MongoDocuments {
        let m = projections::MongoDocuments::connect(&self.settings())
            .await
            .unwrap();
        m.migrate().await.unwrap();
        m
    }
}

impl Default for TestMongo {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestMongo {
    fn drop(&mut self) {
        let (url, name) = (self.url.clone(), self.database.clone());
        block_on_a_thread(async move {
            if let Ok(c) = mongodb::Client::with_uri_str(&url).await {
                let _ = c.database(&name).drop().await;
            }
        });
    }
}

/// Commit a profile update straight to the event store: no after-commit hook runs, no
/// projector sees it (a process that died between its commit and its projection).
pub async fn commit_behind_the_projectors_back(store: &Database, profile_id: &str, name: &str) {
    let fields = domain::ProfileFields {
        display_name: domain::DisplayName::parse(name).unwrap(),
        bio: None,
        avatar_url: None,
        location: None,
        website: None,
    };
    store
        .aggregates::<domain::Profile>()
        .execute(
            profile_id,
            domain::ProfileCommand::Update(fields),
            &(),
            None,
            &commands::CommandMeta::system("test"),
        )
        .await
        .unwrap();
}

/// Open a profile straight in the event store (no projector sees it): a fresh aggregate
/// for [`commit_behind_the_projectors_back`]. Returns its id.
pub async fn profile_behind_the_projectors_back(store: &Database, name: &str) -> String {
    let id = domain::UserId::new_v7();
    store
        .aggregates::<domain::Profile>()
        .execute(
            &id.to_string(),
            domain::ProfileCommand::Create {
                user_id: id,
                display_name: domain::DisplayName::parse(name).unwrap(),
            },
            &(),
            None,
            &commands::CommandMeta::system("test"),
        )
        .await
        .unwrap();
    id.to_string()
}

/// Run async clean-up from `Drop`: on a thread of its own with its own runtime, so it
/// works whether or not the dropping thread is inside a runtime.
fn block_on_a_thread(cleanup: impl std::future::Future<Output = ()> + Send + 'static) {
    let _ = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(cleanup);
    })
    .join();
}

pub const TEST_JWT_SECRET: &str = "test-secret-test-secret-test-secret-0123456789";

/// A running app on a throwaway database.
pub struct TestApp {
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    pub db: TestDb,
    pub store: Database,
    pub runtime_projector: projections::Projector,
    pub settings: Settings,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestApp {
    pub async fn spawn(backend: Backend) -> TestApp {
        Self::spawn_with(backend, |_| {}).await
    }

    pub async fn spawn_with(backend: Backend, tweak: impl FnOnce(&mut Settings)) -> TestApp {
        let db = TestDb::new(backend).await;
        let mut settings = db.settings();
        tweak(&mut settings);
        Self::spawn_on(db, settings).await
    }

    /// An app on `db` with exactly these settings.
    pub async fn spawn_on(db: TestDb, settings: Settings) -> TestApp {
        let app = Application::build(settings.clone()).await.unwrap();
        let addr: SocketAddr = ([127, 0, 0, 1], app.port()).into();
        let store = app.runtime().state.db.clone();
        let runtime_projector = app.runtime().projector.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            app.run_until(async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        TestApp {
            addr,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            db,
            store,
            runtime_projector,
            settings,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// Stop the server gracefully and wait for it.
    pub async fn stop(mut self) -> TestDb {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        self.store.close().await;
        std::mem::replace(&mut self.db, TestDb::placeholder())
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn register(&self, email: &str, display_name: &str) -> reqwest::Response {
        self.post_json(
            "/auth/register",
            &json!({"email": email, "password": PASSWORD, "display_name": display_name}),
        )
        .await
    }

    /// Register and sign in; returns (user id, access token).
    pub async fn signed_up(&self, email: &str) -> (String, String) {
        let r = self.register(email, "Someone").await;
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
        let id = r.json::<Value>().await.unwrap()["user_id"]
            .as_str()
            .unwrap()
            .to_owned();
        (id, self.login(email).await)
    }

    pub async fn login(&self, email: &str) -> String {
        let r = self
            .post_json(
                "/auth/login",
                &json!({"email": email, "password": PASSWORD}),
            )
            .await;
        assert_eq!(r.status(), 200);
        r.json::<Value>().await.unwrap()["access_token"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    pub async fn get(&self, path: &str, token: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    pub async fn put_profile(
        &self,
        id: &str,
        token: &str,
        if_match: Option<&str>,
        body: &Value,
    ) -> reqwest::Response {
        let mut req = self
            .client
            .put(self.url(&format!("/profiles/{id}")))
            .bearer_auth(token)
            .json(body);
        if let Some(m) = if_match {
            req = req.header("if-match", m);
        }
        req.send().await.unwrap()
    }
}

impl TestDb {
    fn placeholder() -> TestDb {
        TestDb {
            backend: Backend::Sqlite,
            url: String::new(),
            dir: tempfile::tempdir().unwrap(),
            pg_name: None,
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

pub const PASSWORD: &str = "correct horse battery staple";

/// Build a `Runtime` (no HTTP) on a test database.
pub async fn runtime(db: &TestDb) -> Runtime {
    Runtime::build(db.settings()).await.unwrap()
}

/// A second `Runtime` configured exactly like a running test app (same stores).
pub async fn runtime_like(app: &TestApp) -> Runtime {
    Runtime::build(app.settings.clone()).await.unwrap()
}

/// Path of the `karmic` entry point built for the failure tests (integration tests only).
#[macro_export]
macro_rules! karmic_binary {
    () => {
        std::path::PathBuf::from(env!("CARGO_BIN_EXE_karmic-under-test"))
    };
}

/// How many of `tasks` ended with each HTTP status.
pub async fn status_counts(tasks: Vec<tokio::task::JoinHandle<u16>>) -> HashMap<u16, usize> {
    let mut counts = HashMap::new();
    for t in tasks {
        *counts.entry(t.await.unwrap()).or_default() += 1;
    }
    counts
}

/// Asserts a response is a problem document with this status; returns the document.
pub async fn assert_problem(r: reqwest::Response, status: u16) -> Value {
    assert_eq!(r.status().as_u16(), status, "unexpected status");
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert_eq!(ct, "application/problem+json");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], status);
    assert!(
        body["type"]
            .as_str()
            .unwrap()
            .starts_with("https://karmic.dev/problems/")
    );
    assert!(body["title"].is_string() && body["detail"].is_string());
    body
}

/// Generates one test per backend from an `async fn(Backend)`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() { super::$name($crate::Backend::Sqlite).await }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() { super::$name($crate::Backend::Postgres).await }
            )*
        }
    };
}

/// A server process of its own for a fault test, which the test stops and starts.
pub struct PrivateServer {
    pub port: u16,
    program: String,
    args: Vec<String>,
    child: Option<std::process::Child>,
    _dir: tempfile::TempDir,
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl PrivateServer {
    /// A private SecantusDB (MongoDB wire protocol) with its own storage.
    pub async fn mongo() -> PrivateServer {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let args = vec![
            "--host".into(),
            "127.0.0.1".into(),
            "--port".into(),
            port.to_string(),
            "--storage-path".into(),
            dir.path().join("data").display().to_string(),
            "--log-level".into(),
            "WARNING".into(),
            // Durable on acknowledgement, as DocumentDB is: the test kills it with SIGKILL.
            "--sync-on-commit".into(),
        ];
        let mut s = PrivateServer {
            port,
            program: "secantusd-py".into(),
            args,
            child: None,
            _dir: dir,
        };
        s.start().await;
        s
    }

    /// A private Redis (no persistence: a restart comes back empty, like a failed-over node).
    pub async fn redis() -> PrivateServer {
        Self::redis_keeping_data(false).await
    }

    /// A Redis that keeps its data across a stop and start (append-only file, fsync on
    /// every write), so that it comes back holding what it had, stale entries included.
    pub async fn redis_persistent() -> PrivateServer {
        Self::redis_keeping_data(true).await
    }

    async fn redis_keeping_data(persist: bool) -> PrivateServer {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut args: Vec<String> = vec![
            "--port".into(),
            port.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--save".into(),
            String::new(),
            "--appendonly".into(),
            if persist { "yes" } else { "no" }.into(),
            "--dir".into(),
            dir.path().display().to_string(),
        ];
        if persist {
            args.extend(["--appendfsync".into(), "always".into()]);
        }
        let mut s = PrivateServer {
            port,
            program: "redis-server".into(),
            args,
            child: None,
            _dir: dir,
        };
        s.start().await;
        s
    }

    pub async fn start(&mut self) {
        let child = std::process::Command::new(&self.program)
            .args(&self.args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e} (run scripts/services.sh)", self.program));
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "{} did not start",
                self.program
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The port opens a little before the server answers.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    /// SIGKILL and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP: the server keeps its connections open and answers nothing (a hung node).
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`PrivateServer::pause`].
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("server not running").id();
        let ok = std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {pid} failed");
    }

    pub fn mongodb_url(&self) -> String {
        format!(
            "mongodb://127.0.0.1:{}/?directConnection=true&retryWrites=false",
            self.port
        )
    }

    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        self.stop();
    }
}
