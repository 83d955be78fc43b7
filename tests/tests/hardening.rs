//! The spine under stress: one account per email whatever the timing, projections that a
//! frozen driver cannot wedge, any pool size, load shedding and abuse limits, and the
//! smaller defects found by review. Each test failed on the code before its fix.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use commands::Position;
use serde_json::{Value, json};
use tests::{Backend, PASSWORD, TestApp, TestDb, assert_problem, on_both_backends};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn registered_events(events: &[commands::StoredEvent]) -> usize {
    events
        .iter()
        .filter(|e| e.event_type == "UserRegistered")
        .count()
}

async fn all_events(app: &TestApp) -> Vec<commands::StoredEvent> {
    app.store
        .feed()
        .read_after(Position::START, 100_000)
        .await
        .unwrap()
}

// ---------------------------------------------------------------------------------------
// 1. One account per email, with no timing window.

/// 50 registrations of one email (in two spellings) at once: one account.
async fn fifty_racing_registrations_of_one_email_make_one_account(backend: Backend) {
    // A queue for every racer: this test is about the email, not load shedding.
    let app = Arc::new(TestApp::spawn_with(backend, |s| s.hash_queue = Some(64)).await);
    let mut tasks = Vec::new();
    for i in 0..50 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            let email = if i % 2 == 0 {
                "race50@example.com"
            } else {
                " RACE50@Example.COM"
            };
            app.register(email, &format!("Racer {i}"))
                .await
                .status()
                .as_u16()
        }));
    }
    let counts = tests::status_counts(tasks).await;
    assert_eq!(counts.get(&201), Some(&1), "{counts:?}");
    assert_eq!(counts.get(&409), Some(&49), "{counts:?}");
    assert_eq!(registered_events(&all_events(&app).await), 1);
    app.login("race50@example.com").await;
}

/// A registration whose append is held up for longer than any time-based take-over
/// allowed, while a second registration of the same email (the bootstrap admin's) comes
/// in: one account, one admin.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_append_keeps_its_email_and_the_bootstrap_admin_is_made_once() {
    const EMAIL: &str = "boss@example.com";
    let app = Arc::new(
        TestApp::spawn_with(Backend::Postgres, |s| {
            s.bootstrap_admin_email = Some(EMAIL.to_owned());
        })
        .await,
    );
    let side = sqlx::PgPool::connect(&app.db.url).await.unwrap();
    let mut lock = side.begin().await.unwrap();
    sqlx::query("LOCK TABLE events IN EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();

    let first = {
        let app = app.clone();
        tokio::spawn(async move { app.register(EMAIL, "First").await.status().as_u16() })
    };
    wait_for_lock_waiters(&side, 1).await;
    // Whatever the first registration holds for its email, make it look as old as a dead
    // one (the old design handed such reservations over after 30 s).
    sqlx::query("UPDATE email_reservations SET reserved_at = now() - interval '1 hour'")
        .execute(&side)
        .await
        .unwrap();
    let second = {
        let app = app.clone();
        tokio::spawn(async move { app.register(EMAIL, "Second").await.status().as_u16() })
    };
    // The second one either is refused at once or queues behind the lock too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    lock.commit().await.unwrap();

    let mut statuses = vec![first.await.unwrap(), second.await.unwrap()];
    statuses.sort_unstable();
    assert_eq!(statuses, vec![201, 409]);
    let events = all_events(&app).await;
    assert_eq!(registered_events(&events), 1);
    let admins = events
        .iter()
        .filter(|e| e.event_type == "AdminRoleGranted")
        .count();
    assert_eq!(admins, 1);
    app.login(EMAIL).await;
}

async fn wait_for_lock_waiters(pool: &sqlx::PgPool, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_locks WHERE NOT granted")
            .fetch_one(pool)
            .await
            .unwrap();
        if waiting >= n {
            return;
        }
        assert!(Instant::now() < deadline, "nobody waited for the lock");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Forwards a Postgres connection; once armed, it cuts the first connection that commits
/// a `UserRegistered` event (the COMMIT of its transaction, or the statement itself in
/// autocommit): the commit reaches the server, its answer never reaches the client.
struct CuttingProxy {
    addr: SocketAddr,
    armed: Arc<AtomicBool>,
    cuts: Arc<AtomicUsize>,
}

impl CuttingProxy {
    async fn start(upstream: SocketAddr) -> CuttingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let armed = Arc::new(AtomicBool::new(false));
        let cuts = Arc::new(AtomicUsize::new(0));
        let (a, c) = (armed.clone(), cuts.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                tokio::spawn(Self::pipe(client, server, a.clone(), c.clone()));
            }
        });
        CuttingProxy { addr, armed, cuts }
    }

    async fn pipe(
        client: TcpStream,
        server: TcpStream,
        armed: Arc<AtomicBool>,
        cuts: Arc<AtomicUsize>,
    ) {
        let (mut cr, mut cw) = client.into_split();
        let (mut sr, mut sw) = server.into_split();
        let blackhole = Arc::new(AtomicBool::new(false));
        let bh = blackhole.clone();
        let down = tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match sr.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if bh.load(Ordering::SeqCst) {
                    continue;
                }
                if cw.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        });
        let mut buf = vec![0u8; 64 * 1024];
        let mut registering = false;
        let mut in_transaction = false;
        let mut tail: Vec<u8> = Vec::new();
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            // "UserRegistered" may straddle two reads; a COMMIT message never does.
            let mut window = std::mem::take(&mut tail);
            window.extend_from_slice(&buf[..n]);
            let has = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
            registering |= has(&window, b"UserRegistered");
            in_transaction |= has(&buf[..n], b"BEGIN");
            let commit = has(&buf[..n], b"COMMIT");
            // An extended-protocol statement ends with Sync; in autocommit that commits it.
            let sync = buf[..n].ends_with(b"S\0\0\0\x04");
            let commits = commit || (sync && !in_transaction);
            if commits && registering && armed.swap(false, Ordering::SeqCst) {
                blackhole.store(true, Ordering::SeqCst);
                let _ = sw.write_all(&buf[..n]).await;
                // Let the server commit, then drop the connection without its answer.
                tokio::time::sleep(Duration::from_millis(300)).await;
                cuts.fetch_add(1, Ordering::SeqCst);
                down.abort();
                return;
            }
            if commit || has(&buf[..n], b"ROLLBACK") {
                registering = false;
                in_transaction = false;
            }
            if sw.write_all(&buf[..n]).await.is_err() {
                break;
            }
            tail = window[window.len().saturating_sub(32)..].to_vec();
        }
        down.abort();
    }
}

/// The connection drops right after COMMIT reached the server: the registration did
/// happen, so it must answer 201, the user must be able to sign in, and the email must stay
/// taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_commit_whose_answer_is_lost_still_registers_exactly_one_account() {
    let db = TestDb::new(Backend::Postgres).await;
    let proxy = CuttingProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    // In clear text, so the proxy can see the COMMIT go by.
    let via_proxy = format!(
        "{}?sslmode=disable",
        db.url.replace("127.0.0.1:5432", &proxy.addr.to_string())
    );
    let mut settings = db.settings();
    settings.database_url = Some(via_proxy.into());
    let app = TestApp::spawn_on(db, settings).await;
    proxy.armed.store(true, Ordering::SeqCst);
    let r = app.register("cut@example.com", "Cut").await;
    assert_eq!(proxy.cuts.load(Ordering::SeqCst), 1, "the proxy never cut");
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    app.login("cut@example.com").await;
    let again = app.register("CUT@example.com", "Again").await;
    assert_problem(again, 409).await;
    assert_eq!(registered_events(&all_events(&app).await), 1);
}

// ---------------------------------------------------------------------------------------
// 3. Any pool size works.

async fn every_pool_size_serves_commands_and_projects(backend: Backend) {
    for size in 1..=3u32 {
        let app = Arc::new(
            TestApp::spawn_with(backend, |s| {
                s.db_max_connections = size;
                // The point here is that no pool size deadlocks, not latency: under CI's
                // load a one-connection pool can take longer than the default wait, and
                // the time bound below still catches a stall.
                s.read_your_writes = Duration::from_secs(10);
            })
            .await,
        );
        let started = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..4 {
            let app = app.clone();
            tasks.push(tokio::spawn(async move {
                app.signed_up(&format!("pool{i}@example.com")).await
            }));
        }
        let mut users = Vec::new();
        for t in tasks {
            users.push(t.await.unwrap());
        }
        for (id, token) in &users {
            let body = json!({"display_name": format!("Pooled {size}")});
            let r = app.put_profile(id, token, None, &body).await;
            assert_eq!(r.status(), 200, "pool {size}");
            // Read-your-writes: the read model shows the write at once.
            let r = app.get(&format!("/profiles/{id}"), token).await;
            assert_eq!(r.status(), 200);
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["display_name"], format!("Pooled {size}"), "pool {size}");
        }
        // And the users read model caught up without anyone waiting on a timeout.
        let report = app.runtime_projector.catch_up().await.unwrap();
        assert!(report.failed.is_empty(), "pool {size}: {:?}", report.failed);
        let st = projections::ops::status(&app.runtime_projector)
            .await
            .unwrap();
        assert!(st.iter().all(|s| s.lag_events == 0), "pool {size}: {st:?}");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "pool {size} took {:?}",
            started.elapsed()
        );
        drop(users);
        Arc::try_unwrap(app).ok().unwrap().stop().await;
    }
}

// ---------------------------------------------------------------------------------------
// 2. With the read-your-writes wait off and no background loop (a Lambda function), a
// command still projects.

async fn no_wait_and_no_background_loop_still_projects(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut settings = db.settings();
    settings.read_your_writes = Duration::ZERO;
    let rt = handlers::Runtime::build(settings).await.unwrap();
    let router = rt.router(handlers::Service::All);
    let res = tower::ServiceExt::oneshot(
        router,
        http::Request::post("/auth/register")
            .header("content-type", "application/json")
            .body(axum::body::Body::from(
                json!({"email": "lambda@example.com", "password": PASSWORD, "display_name": "L"})
                    .to_string(),
            ))
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 201);
    // The read models the command changed are there at once; the profile provisioner (no
    // read model) and the documents projection (no document events here) are left to the
    // projector function.
    let st = projections::ops::status(&rt.projector).await.unwrap();
    for s in st
        .iter()
        .filter(|s| !["profile_provisioner", "documents"].contains(&s.name.as_str()))
    {
        assert_eq!(s.lag_events, 0, "{st:?}");
    }
}

/// The projector function drives every projection to the head within its budget.
async fn the_projector_function_catches_everything_up(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.connect().await;
    for i in 0..3 {
        tests::profile_behind_the_projectors_back(&store, &format!("Offline {i}")).await;
    }
    let rt = tests::runtime(&db).await;
    let run = handlers::lambda::project_until(
        &rt.projector,
        std::time::SystemTime::now() + Duration::from_secs(10),
    )
    .await;
    assert!(run.caught_up, "{run:?}");
    assert!(run.failed.is_empty(), "{run:?}");
    assert_eq!(run.applied.get("profiles"), Some(&3), "{run:?}");
    // An invocation with no time left does nothing and says so.
    let late = handlers::lambda::project_until(&rt.projector, std::time::SystemTime::now()).await;
    assert!(!late.caught_up);
}

/// Checkpoints never move backwards and never skip another driver's work: a driver whose
/// lease ran out (frozen, stalled) cannot save over the driver that took over.
async fn a_driver_that_lost_its_lease_cannot_move_the_checkpoint(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.connect().await;
    let checkpoints =
        projections::CheckpointStore::new(&store).with_lease(Duration::from_millis(200));
    let slow = checkpoints
        .lock("users", Duration::ZERO)
        .await
        .unwrap()
        .unwrap();
    // Held: nobody else gets it.
    assert!(
        checkpoints
            .lock("users", Duration::from_millis(50))
            .await
            .unwrap()
            .is_none()
    );
    // The slow driver stalls past its lease; another claims it and moves on.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fast = checkpoints
        .lock("users", Duration::ZERO)
        .await
        .unwrap()
        .expect("an expired lease is free");
    let far = Position {
        transaction_id: 0,
        position: 10,
    };
    assert!(fast.advance_and_release(far).await.unwrap());
    // The slow one wakes up with its older batch: refused, the checkpoint stays.
    let near = Position {
        transaction_id: 0,
        position: 5,
    };
    assert!(!slow.advance_and_release(near).await.unwrap());
    assert_eq!(checkpoints.load("users").await.unwrap(), far);
    // A driver that claimed at 10 cannot save from a stale claim either.
    let again = checkpoints
        .lock("users", Duration::ZERO)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.at(), far);
    checkpoints.save("users", near).await.unwrap(); // an operator's replay
    assert!(!again.advance_and_release(far).await.unwrap());
    assert_eq!(checkpoints.load("users").await.unwrap(), near);
}

/// The command path's two combined statements: the lease claim reads the feed in the
/// same statement, and (Postgres SQL read models) a batch's rows and its checkpoint move
/// are written together or not at all: a driver whose lease ran out writes nothing.
async fn a_batch_and_its_checkpoint_move_together_or_not_at_all(backend: Backend) {
    use projections::read_models::{ProfileStore, ProfilesProjection, SqlProfiles};
    use projections::{Projection, ReadModels};
    let db = TestDb::new(backend).await;
    let store = db.connect().await;
    let id = tests::profile_behind_the_projectors_back(&store, "Fenced first").await;
    let uid = domain::UserId::parse(&id).unwrap();
    // Two events of one profile in the batch: one row, the newest.
    store
        .aggregates::<domain::Profile>()
        .execute(
            &id,
            domain::ProfileCommand::Update(domain::ProfileFields {
                display_name: domain::DisplayName::parse("Fenced").unwrap(),
                bio: None,
                avatar_url: None,
                location: None,
                website: None,
            }),
            &(),
            None,
            &commands::CommandMeta::system("test"),
        )
        .await
        .unwrap();
    let feed = store.feed();
    let checkpoints =
        projections::CheckpointStore::new(&store).with_lease(Duration::from_millis(200));
    let claim = |wait| {
        let (checkpoints, feed) = (checkpoints.clone(), feed.clone());
        async move {
            checkpoints
                .lock_reading("profiles", wait, &*feed, 100)
                .await
                .unwrap()
        }
    };
    // The event shows once the feed's horizon passes it (other tests' transactions on
    // the same server can hold it back for a moment).
    let deadline = Instant::now() + Duration::from_secs(10);
    let (slow, batch) = loop {
        let (lease, batch) = claim(Duration::ZERO).await.expect("a free lease");
        if !batch.is_empty() || Instant::now() > deadline {
            break (lease, batch);
        }
        lease.release().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let (slow, batch) = if batch.len() < 2 {
        slow.release().await;
        loop {
            let (lease, batch) = claim(Duration::ZERO).await.expect("a free lease");
            if batch.len() >= 2 || Instant::now() > deadline {
                break (lease, batch);
            }
            lease.release().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    } else {
        (slow, batch)
    };
    assert_eq!(batch.len(), 2, "{batch:?}");
    assert!(batch.iter().all(|e| e.aggregate_id == id));
    let next = batch[1].position;
    // Held: a second claim gets nothing.
    assert!(claim(Duration::from_millis(50)).await.is_none());

    let profiles = Arc::new(SqlProfiles::new(ReadModels::new(&store)));
    let projection = ProfilesProjection(profiles.clone());
    // The holder stalls past its lease; another driver claims and reads the same batch.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (fast, again) = claim(Duration::ZERO)
        .await
        .expect("an expired lease is free");
    assert_eq!(again.len(), 2);
    let stale = projection
        .apply_advancing(&batch, &slow.advance_to(next))
        .await
        .unwrap();
    match backend {
        Backend::Postgres => {
            assert_eq!(stale, Some(false), "a lost lease writes nothing");
            slow.advanced(false).await;
            assert!(profiles.get(uid).await.unwrap().is_none());
            assert_eq!(
                projection
                    .apply_advancing(&again, &fast.advance_to(next))
                    .await
                    .unwrap(),
                Some(true)
            );
            fast.advanced(true).await;
            assert_eq!(
                profiles.get(uid).await.unwrap().unwrap().display_name,
                "Fenced"
            );
            assert_eq!(checkpoints.load("profiles").await.unwrap(), next);
            // Given back: the next claim is at once, and finds nothing after it.
            let (lease, rest) = claim(Duration::ZERO).await.expect("released");
            assert_eq!(lease.at(), next);
            assert!(rest.is_empty());
            lease.release().await;
        }
        Backend::Sqlite => {
            // One local writer: the engine applies and advances in two steps.
            assert_eq!(stale, None);
            slow.release().await;
            fast.release().await;
        }
    }
}

/// Pooled connections are not pinged before every statement (that costs a round trip
/// each), only after a second idle. So when the server drops connections (a restart, a
/// failover, an operator), a request may meet a dead one: it gets a 503 it can retry, the
/// dead connection leaves the pool, and service comes back without a restart: at most
/// one refusal per pooled connection, never a 500, never a lost write.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_the_server_dropped_cost_a_retryable_503_at_most_once_each() {
    let app = TestApp::spawn(Backend::Postgres).await;
    let (id, token) = app.signed_up("idle@example.com").await;
    let admin = sqlx::PgPool::connect(&tests::postgres_admin_url())
        .await
        .unwrap();
    let db_name = app.db.url.rsplit('/').next().unwrap().to_owned();
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
          WHERE datname = $1 AND pid <> pg_backend_pid()) t",
    )
    .bind(&db_name)
    .fetch_one(&admin)
    .await
    .unwrap();
    assert!(killed > 0, "the app had connections to {db_name}");
    let mut refused = 0;
    let mut written = 0;
    for i in 0..(killed + 10) {
        let body = json!({"display_name": format!("Served {i}")});
        let r = app.put_profile(&id, &token, None, &body).await;
        match r.status().as_u16() {
            200 => written += 1,
            503 => {
                assert_eq!(r.headers()["retry-after"], "1");
                assert_problem(r, 503).await;
                refused += 1;
                assert_eq!(written, 0, "a refusal after service came back");
            }
            other => panic!("status {other}: {}", r.text().await.unwrap()),
        }
    }
    // Killed within a second of their last use, so not pinged: the first request meets
    // a dead connection.
    assert!(refused >= 1, "no request met a dead connection");
    assert!(
        refused <= killed,
        "{refused} refusals for {killed} connections"
    );
    assert!(written >= 10);
    let r = app.get(&format!("/profiles/{id}"), &token).await;
    assert_eq!(r.status(), 200);
    let last = format!("Served {}", killed + 9);
    assert_eq!(
        r.json::<Value>().await.unwrap()["display_name"],
        last.as_str()
    );
}

// ---------------------------------------------------------------------------------------
// 6. Load shedding and abuse.

/// A burst of sign-ins larger than the password queue: the excess is refused at once
/// with 429 and `Retry-After`, and nothing fails otherwise.
async fn a_full_password_queue_answers_429_with_retry_after(backend: Backend) {
    let app = Arc::new(
        TestApp::spawn_with(backend, |s| {
            s.hash_queue = Some(2);
            s.argon2_memory_kib = 8 * 1024;
            s.argon2_iterations = 3;
        })
        .await,
    );
    app.signed_up("queue@example.com").await;
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            let r = app
                .post_json(
                    "/auth/login",
                    &json!({"email": "queue@example.com", "password": PASSWORD}),
                )
                .await;
            let retry = r.headers().get("retry-after").cloned();
            (r.status().as_u16(), retry)
        }));
    }
    let mut counts: HashMap<u16, usize> = HashMap::new();
    for t in tasks {
        let (status, retry) = t.await.unwrap();
        if status == 429 {
            assert_eq!(retry.unwrap(), "1");
        }
        *counts.entry(status).or_default() += 1;
    }
    assert!(counts.get(&429).copied().unwrap_or(0) > 0, "{counts:?}");
    assert!(counts.get(&200).copied().unwrap_or(0) >= 2, "{counts:?}");
    assert_eq!(
        counts.keys().filter(|s| ![200, 429].contains(*s)).count(),
        0,
        "{counts:?}"
    );
}

/// Failed sign-ins are limited per account (the right password is refused too until the
/// window ends) and per client address; another account is not affected by the first.
async fn failed_sign_ins_are_throttled_per_account_and_per_client(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| {
        s.login_failures_per_account = 3;
        s.login_failures_per_client = 6;
        s.login_failure_window = Duration::from_secs(60);
    })
    .await;
    app.signed_up("victim@example.com").await;
    app.signed_up("other@example.com").await;
    let attempt = async |email: &str, pw: &str| {
        app.post_json("/auth/login", &json!({"email": email, "password": pw}))
            .await
    };
    for _ in 0..3 {
        assert_eq!(
            attempt("victim@example.com", "wrong guess").await.status(),
            401
        );
    }
    let r = attempt("VICTIM@example.com", PASSWORD).await;
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert_problem(r, 429).await;
    // The other account still signs in; then the client's own budget runs out.
    assert_eq!(attempt("other@example.com", PASSWORD).await.status(), 200);
    for i in 0..3 {
        let s = attempt("nobody@example.com", "wrong guess").await.status();
        assert_eq!(s, 401, "attempt {i}");
    }
    assert_problem(attempt("other@example.com", PASSWORD).await, 429).await;
}

/// Concurrent guesses cannot slip past the limit together: every attempt counts from the
/// moment it is let through.
async fn concurrent_guesses_are_throttled_like_sequential_ones(backend: Backend) {
    let app = Arc::new(
        TestApp::spawn_with(backend, |s| {
            s.login_failures_per_account = 3;
            s.login_failures_per_client = 0;
            s.argon2_memory_kib = 4096;
            s.argon2_iterations = 2;
        })
        .await,
    );
    app.signed_up("target@example.com").await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            app.post_json(
                "/auth/login",
                &json!({"email": "target@example.com", "password": format!("guess number {i}")}),
            )
            .await
            .status()
            .as_u16()
        }));
    }
    let counts = tests::status_counts(tasks).await;
    assert_eq!(counts.get(&401), Some(&3), "{counts:?}");
    assert_eq!(counts.get(&429), Some(&17), "{counts:?}");
}

/// `karmic serve` limits each client's request rate (10/s with a burst by default).
async fn a_client_over_its_rate_gets_429_with_retry_after(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| {
        s.rate_limit_per_sec = 5;
        s.rate_limit_burst = 5;
    })
    .await;
    let mut statuses = Vec::new();
    for _ in 0..15 {
        let r = app.client.get(app.url("/health")).send().await.unwrap();
        if r.status() == 429 {
            assert!(r.headers().contains_key("retry-after"));
        }
        statuses.push(r.status().as_u16());
    }
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert!((5..=10).contains(&limited), "{statuses:?}");
    assert_eq!(statuses.iter().take(5).filter(|s| **s == 200).count(), 5);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        app.client
            .get(app.url("/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

/// A request that takes longer than `KARMIC_REQUEST_TIMEOUT_MS` is answered 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_over_the_time_limit_is_answered_503() {
    let app = TestApp::spawn_with(Backend::Postgres, |s| {
        s.request_timeout = Duration::from_millis(500);
    })
    .await;
    let side = sqlx::PgPool::connect(&app.db.url).await.unwrap();
    let mut lock = side.begin().await.unwrap();
    sqlx::query("LOCK TABLE events IN EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let started = Instant::now();
    let r = app.register("slow@example.com", "Slow").await;
    let took = started.elapsed();
    assert_eq!(r.headers()["retry-after"], "1");
    assert_problem(r, 503).await;
    assert!(took < Duration::from_secs(2), "{took:?}");
    lock.rollback().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// 8. Smaller defects.

async fn a_deactivated_user_cannot_edit_with_an_old_token(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (id, token) = app.signed_up("leaver@example.com").await;
    let body = json!({"display_name": "Still here"});
    assert_eq!(
        app.put_profile(&id, &token, None, &body).await.status(),
        200
    );
    let rt = tests::runtime_like(&app).await;
    rt.state
        .accounts
        .deactivate(
            &domain::Email::parse("leaver@example.com").unwrap(),
            &commands::CommandMeta::system("test"),
        )
        .await
        .unwrap();
    let body = json!({"display_name": "Gone"});
    let problem = assert_problem(app.put_profile(&id, &token, None, &body).await, 403).await;
    assert!(problem["detail"].as_str().unwrap().contains("deactivated"));
    // Not even a write that would change nothing.
    let same = json!({"display_name": "Still here"});
    assert_problem(app.put_profile(&id, &token, None, &same).await, 403).await;
    let r = app.get(&format!("/profiles/{id}"), &token).await;
    assert_eq!(
        r.json::<Value>().await.unwrap()["display_name"],
        "Still here"
    );
    let r = app
        .post_json(
            "/auth/login",
            &json!({"email": "leaver@example.com", "password": PASSWORD}),
        )
        .await;
    assert_eq!(r.status(), 401);
}

/// The bootstrap email is made an admin only while no admin exists.
async fn the_bootstrap_email_is_admin_only_while_there_is_none(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| {
        s.bootstrap_admin_email = Some("late-boss@example.com".to_owned());
    })
    .await;
    // Someone else became admin first.
    app.signed_up("first-admin@example.com").await;
    let rt = tests::runtime_like(&app).await;
    rt.state
        .accounts
        .grant_admin(
            &domain::Email::parse("first-admin@example.com").unwrap(),
            &commands::CommandMeta::system("test"),
        )
        .await
        .unwrap();
    let (_, token) = app.signed_up("late-boss@example.com").await;
    assert_problem(app.get("/users", &token).await, 403).await;

    // On a fresh system the bootstrap email does become admin.
    let fresh = TestApp::spawn_with(backend, |s| {
        s.bootstrap_admin_email = Some("boss@example.com".to_owned());
    })
    .await;
    let (_, token) = fresh.signed_up("boss@example.com").await;
    assert_eq!(fresh.get("/users", &token).await.status(), 200);
}

#[tokio::test]
async fn cors_allows_any_origin_with_a_star_and_refuses_malformed_origins() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut env: HashMap<String, String> = HashMap::new();
    env.insert(
        "KARMIC_DATA_DIR".into(),
        db.dir.path().display().to_string(),
    );
    env.insert("KARMIC_CORS_ORIGINS".into(), "*".into());
    let settings = handlers::Settings::from_sources(&env).unwrap();
    let rt = handlers::Runtime::build(settings).await.unwrap();
    let res = tower::ServiceExt::oneshot(
        rt.router(handlers::Service::All),
        http::Request::builder()
            .method("OPTIONS")
            .uri("/health")
            .header("origin", "https://anywhere.example")
            .header("access-control-request-method", "GET")
            .body(axum::body::Body::empty())
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(res.headers()["access-control-allow-origin"], "*");
    assert!(
        !res.headers()
            .contains_key("access-control-allow-credentials")
    );
    for bad in [
        "app.example.com",
        "https://app.example.com/",
        "https://app.example.com/path",
        "*,https://app.example.com",
        "ftp://files.example.com",
    ] {
        env.insert("KARMIC_CORS_ORIGINS".into(), bad.into());
        let err = handlers::Settings::from_sources(&env).unwrap_err();
        assert!(
            format!("{err:#}").contains("KARMIC_CORS_ORIGINS"),
            "{bad}: {err:#}"
        );
    }
    env.insert(
        "KARMIC_CORS_ORIGINS".into(),
        "https://app.example.com, http://localhost:3000".into(),
    );
    handlers::Settings::from_sources(&env).unwrap();
}

/// A Lambda function without `KARMIC_DATABASE_URL` refuses to start (it would run on a
/// private SQLite file with a JWT secret of its own).
#[test]
fn a_lambda_function_without_a_database_url_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lambda-under-test"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("KARMIC_DATA_DIR", dir.path())
        .env("AWS_LAMBDA_RUNTIME_API", "127.0.0.1:9")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("KARMIC_DATABASE_URL"), "{stderr}");
    assert!(
        std::fs::read_dir(dir.path()).unwrap().next().is_none(),
        "it created files before refusing"
    );
}

on_both_backends!(
    fifty_racing_registrations_of_one_email_make_one_account,
    a_driver_that_lost_its_lease_cannot_move_the_checkpoint,
    a_batch_and_its_checkpoint_move_together_or_not_at_all,
    every_pool_size_serves_commands_and_projects,
    no_wait_and_no_background_loop_still_projects,
    the_projector_function_catches_everything_up,
    a_full_password_queue_answers_429_with_retry_after,
    failed_sign_ins_are_throttled_per_account_and_per_client,
    concurrent_guesses_are_throttled_like_sequential_ones,
    a_client_over_its_rate_gets_429_with_retry_after,
    a_deactivated_user_cannot_edit_with_an_old_token,
    the_bootstrap_email_is_admin_only_while_there_is_none,
);
