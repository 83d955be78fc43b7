//! Fault tolerance of the read side, against real servers this test starts and stops:
//! a private SecantusDB (DocumentDB stand-in), a private Redis, Postgres for events.
//! Final states are compared with a fresh fold of the event store and with a rebuild.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use projections::cache::{CacheSettings, CachedProfiles, LocalCache, RedisCache};
use projections::ops;
use projections::read_models::{ProfileStore, ProfilesProjection, RebuildTarget};
use projections::{ProfileView, Projection};
use serde_json::{Value, json};
use tests::{Backend, PrivateServer, TestApp, TestDb};

async fn app_on(mongo: &PrivateServer, redis: &PrivateServer) -> TestApp {
    let (m, r) = (mongo.mongodb_url(), redis.redis_url());
    TestApp::spawn_with(Backend::Postgres, move |s| {
        s.mongodb_url = Some(m.into());
        s.mongodb_database = format!("karmic_{}", uuid::Uuid::new_v4().simple());
        s.mongodb_timeout = Duration::from_millis(500);
        s.redis_url = Some(r.into());
        s.redis_timeout = Duration::from_millis(100);
    })
    .await
}

async fn no_differences(app: &TestApp) {
    let rt = tests::runtime_like(app).await;
    let feed = rt.projector.feed().clone();
    let diffs = ops::verify_profiles(&*feed, &*rt.state.profile_reader)
        .await
        .unwrap();
    assert!(
        diffs.is_empty(),
        "read model differs from the events: {diffs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mongodb_down_commands_succeed_reads_never_lie_and_catch_up_after() {
    let mut mongo = PrivateServer::mongo().await;
    let redis = PrivateServer::redis().await;
    let app = app_on(&mongo, &redis).await;
    let (a, token) = app.signed_up("a@example.com").await;
    let (b, _) = app.signed_up("b@example.com").await;
    // `a` is cached; `b`'s entry is gone (evicted, say) when the outage starts.
    assert_eq!(
        app.get(&format!("/profiles/{a}"), &token).await.status(),
        200
    );
    let client = redis::Client::open(redis.redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: i64 = redis::cmd("DEL")
        .arg(format!("karmic:profile:{b}"))
        .query_async(&mut conn)
        .await
        .unwrap();

    mongo.stop();
    for i in 0..3 {
        let r = app
            .put_profile(&a, &token, None, &json!({"display_name": format!("a{i}")}))
            .await;
        assert_eq!(
            r.status(),
            200,
            "commands must not depend on the read model"
        );
    }
    // Cached: answered from Redis with the last value the read model had. Uncached: 503.
    let r = app.get(&format!("/profiles/{a}"), &token).await;
    assert_eq!(r.status(), 200);
    let cached: Value = r.json().await.unwrap();
    assert_eq!(
        cached["version"], 1,
        "a value the read model never held was served"
    );
    let r = app.get(&format!("/profiles/{b}"), &token).await;
    tests::assert_problem(r, 503).await;

    mongo.start().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = app.get(&format!("/profiles/{a}"), &token).await;
        if r.status() == 200 && r.headers()["etag"] == "\"4\"" {
            assert_eq!(r.json::<Value>().await.unwrap()["display_name"], "a2");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the projection did not catch up after MongoDB returned"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    no_differences(&app).await;
    // And a rebuild from zero gives the very same documents.
    let rt = tests::runtime_like(&app).await;
    let before = rt.state.profile_reader.all().await.unwrap();
    ops::rebuild_profiles(&rt.projector, rt.state.profile_reader.clone(), &|_, _| {})
        .await
        .unwrap();
    assert_eq!(before, rt.state.profile_reader.all().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_down_reads_come_from_documentdb_within_the_timeout() {
    let mongo = PrivateServer::mongo().await;
    // Redis comes back holding the old entry (not empty), so a missed refresh would show.
    let mut redis = PrivateServer::redis_persistent().await;
    let app = app_on(&mongo, &redis).await;
    let (a, token) = app.signed_up("a@example.com").await;
    assert_eq!(
        app.get(&format!("/profiles/{a}"), &token).await.status(),
        200
    );

    // Redis holds version 1 and keeps it through the restart.
    let mut raw = redis::Client::open(redis.redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let kept: String = redis::cmd("GET")
        .arg(format!("karmic:profile:{a}"))
        .query_async(&mut raw)
        .await
        .unwrap();
    assert!(kept.contains("\"version\":1"), "{kept}");
    drop(raw);
    redis.stop();
    let r = app
        .put_profile(
            &a,
            &token,
            None,
            &json!({"display_name": "while redis is down"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    for _ in 0..10 {
        let t = Instant::now();
        let r = app.get(&format!("/profiles/{a}"), &token).await;
        let took = t.elapsed();
        assert_eq!(r.status(), 200);
        assert!(
            took < Duration::from_secs(1),
            "a read waited {took:?} on a dead Redis"
        );
        let p: Value = r.json().await.unwrap();
        assert_eq!(p["display_name"], "while redis is down");
    }
    redis.start().await;
    // Once Redis is back the cache is refreshed and serves the current value.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rt = tests::runtime_like(&app).await;
        let status = ops::status(&rt.projector).await.unwrap();
        if status.iter().all(|s| s.lag_events == 0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the profiles projection stayed behind after Redis returned: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let p: Value = app
        .get(&format!("/profiles/{a}"), &token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(p["display_name"], "while redis is down");
    no_differences(&app).await;
}

/// A Redis that keeps its connections open and never answers (SIGSTOP): every read still
/// finishes within one Redis timeout plus the store's own time, cold keys and warm ones,
/// with the near cache on or off; after SIGCONT reads go on answering.
///
/// The bound is under two timeouts, which is what tells "waited once, then read the
/// store" from "waited for Redis twice" (a claim or fill after the failed GET); the
/// timeout is long enough that a loaded 2-core CI machine's slower store read (one took
/// 245 ms there) fits in the other half.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_redis_costs_a_read_no_more_than_the_timeout() {
    let redis = PrivateServer::redis().await;
    let db = TestDb::new(Backend::Sqlite).await;
    let store: Arc<dyn ProfileStore> = Arc::new(projections::read_models::SqlProfiles::new(
        projections::ReadModels::new(&db.connect().await),
    ));
    let timeout = Duration::from_millis(300);
    let ids: Vec<domain::UserId> = (0..4).map(|_| domain::UserId::new_v7()).collect();
    for id in &ids {
        store.upsert(&profile(*id, 3)).await.unwrap();
    }
    let mut readers = Vec::new();
    for near_entries in [0, 100] {
        let cache = RedisCache::connect(
            &redis.redis_url(),
            CacheSettings {
                ttl: Duration::from_secs(300),
                timeout,
                near_entries,
            },
        )
        .await
        .unwrap();
        readers.push(CachedProfiles::new(store.clone(), Arc::new(cache)));
    }
    // Warm two of the four keys.
    for r in &readers {
        for id in &ids[..2] {
            assert_eq!(r.get(*id).await.unwrap(), Some(profile(*id, 3)));
        }
    }
    redis.pause();
    for r in &readers {
        for id in &ids {
            let t = Instant::now();
            assert_eq!(r.get(*id).await.unwrap(), Some(profile(*id, 3)));
            assert!(
                t.elapsed() < timeout * 2,
                "a read took {:?} with Redis hung (timeout {timeout:?})",
                t.elapsed()
            );
        }
    }
    redis.resume();
    for r in &readers {
        for id in &ids {
            assert_eq!(r.get(*id).await.unwrap(), Some(profile(*id, 3)));
        }
    }
}

fn profile(id: domain::UserId, version: i64) -> ProfileView {
    ProfileView {
        user_id: id,
        display_name: format!("v{version}"),
        bio: None,
        avatar_url: None,
        location: None,
        website: None,
        version,
        updated_at: chrono::DateTime::from_timestamp_millis(1_790_000_000_000 + version).unwrap(),
    }
}

/// The in-process copy in front of Redis never outlives the connection it was filled
/// over: a Redis that restarts empty while another process writes a newer version is
/// never answered from the old copy, and a Redis that hangs without closing its
/// connections stops being answered from memory within the probe interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_near_cache_is_dropped_when_redis_restarts_and_bypassed_when_it_hangs() {
    use projections::cache::{NEAR_PROBE_INTERVAL, ProfileCache};
    let mut redis = PrivateServer::redis().await;
    let settings = |near_entries| CacheSettings {
        ttl: Duration::from_secs(300),
        timeout: Duration::from_millis(100),
        near_entries,
    };
    let reader = RedisCache::connect(&redis.redis_url(), settings(100))
        .await
        .unwrap();
    let writer = RedisCache::connect(&redis.redis_url(), settings(0))
        .await
        .unwrap();
    let id = domain::UserId::new_v7();
    writer.put_if_newer(&profile(id, 1)).await.unwrap();
    let t = Instant::now();
    while reader.near_cache_statistics().unwrap().hits < 2 {
        assert_eq!(reader.get(id).await.unwrap(), Some(profile(id, 1)));
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "the copy never filled"
        );
    }

    // Restart: Redis comes back empty and the writer (another process) stores v2.
    redis.stop();
    redis.start().await;
    let t = Instant::now();
    while writer.put_if_newer(&profile(id, 2)).await.is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "writer never reconnected"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..20 {
        // An error is a reconnect in progress: a miss, which reads the store.
        if let Ok(v) = reader.get(id).await {
            assert_eq!(
                v,
                Some(profile(id, 2)),
                "served from a dead connection's copy"
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(reader.get(id).await.unwrap(), Some(profile(id, 2)));
    assert_eq!(reader.get(id).await.unwrap(), Some(profile(id, 2)));

    // Hang: connections stay open, nothing answers. After the probe has noticed, reads
    // are not served from memory any more (they fail fast and go to the store).
    redis.pause();
    tokio::time::sleep(NEAR_PROBE_INTERVAL * 2 + Duration::from_millis(200)).await;
    let t = Instant::now();
    assert!(
        reader.get(id).await.is_err(),
        "answered from memory while Redis hangs"
    );
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    redis.resume();
    let t = Instant::now();
    loop {
        let hits = reader.near_cache_statistics().unwrap().hits;
        if matches!(reader.get(id).await, Ok(Some(v)) if v == profile(id, 2))
            && reader.near_cache_statistics().unwrap().hits > hits
        {
            break; // back in use
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "near cache never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A store in front of a real one that counts the reads reaching it (each made slow, which
/// widens stampede races) and can die after a number of writes (a projector crashing
/// mid-batch).
struct FaultyStore {
    inner: Arc<dyn ProfileStore>,
    gets: AtomicUsize,
    slow_gets: Duration,
    writes_left: AtomicUsize,
}

impl FaultyStore {
    fn counting(inner: Arc<dyn ProfileStore>) -> FaultyStore {
        FaultyStore {
            inner,
            gets: AtomicUsize::new(0),
            slow_gets: Duration::from_millis(50),
            writes_left: AtomicUsize::new(usize::MAX),
        }
    }

    fn crashing_after(inner: Arc<dyn ProfileStore>, writes: usize) -> FaultyStore {
        FaultyStore {
            writes_left: AtomicUsize::new(writes),
            slow_gets: Duration::ZERO,
            ..FaultyStore::counting(inner)
        }
    }
}

#[async_trait::async_trait]
impl ProfileStore for FaultyStore {
    async fn get(&self, id: domain::UserId) -> anyhow::Result<Option<ProfileView>> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.slow_gets).await;
        self.inner.get(id).await
    }
    async fn upsert(&self, v: &ProfileView) -> anyhow::Result<bool> {
        if self
            .writes_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_err()
        {
            anyhow::bail!("killed mid-batch");
        }
        self.inner.upsert(v).await
    }
    async fn all(&self) -> anyhow::Result<Vec<ProfileView>> {
        self.inner.all().await
    }
    async fn begin_rebuild(&self) -> anyhow::Result<RebuildTarget> {
        self.inner.begin_rebuild().await
    }
    async fn finish_rebuild(&self, t: RebuildTarget) -> anyhow::Result<()> {
        self.inner.finish_rebuild(t).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cold_key_is_loaded_once_however_many_readers_miss_it() {
    let redis = PrivateServer::redis().await;
    let db = TestDb::new(Backend::Sqlite).await;
    let inner: Arc<dyn ProfileStore> = Arc::new(projections::read_models::SqlProfiles::new(
        projections::ReadModels::new(&db.connect().await),
    ));
    let id = domain::UserId::new_v7();
    inner
        .upsert(&ProfileView {
            user_id: id,
            display_name: "Hot".into(),
            bio: None,
            avatar_url: None,
            location: None,
            website: None,
            version: 1,
            updated_at: chrono::Utc::now(),
        })
        .await
        .unwrap();
    for cache in [
        Arc::new(
            RedisCache::connect(&redis.redis_url(), CacheSettings::default())
                .await
                .unwrap(),
        ) as Arc<dyn projections::cache::ProfileCache>,
        Arc::new(LocalCache::new(Duration::from_secs(300), 100)),
    ] {
        let counting = Arc::new(FaultyStore::counting(inner.clone()));
        let cached = Arc::new(CachedProfiles::new(counting.clone(), cache));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let c = cached.clone();
            tasks.push(tokio::spawn(async move {
                c.get(id).await.unwrap().unwrap().display_name
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), "Hot");
        }
        assert_eq!(
            counting.gets.load(Ordering::SeqCst),
            1,
            "the store was hit more than once"
        );
    }
}

/// Several processes (own Redis connections, own in-process single flight) miss the same
/// cold key together: the store is read once, through the claim in Redis. A claimant that
/// dies without filling costs the others no more than the wait, not a failed read.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cold_key_is_loaded_once_across_processes_and_a_dead_claimant_costs_only_the_wait() {
    let redis = PrivateServer::redis().await;
    let db = TestDb::new(Backend::Sqlite).await;
    let inner: Arc<dyn ProfileStore> = Arc::new(projections::read_models::SqlProfiles::new(
        projections::ReadModels::new(&db.connect().await),
    ));
    let (hot, orphan) = (domain::UserId::new_v7(), domain::UserId::new_v7());
    inner.upsert(&profile(hot, 1)).await.unwrap();
    inner.upsert(&profile(orphan, 1)).await.unwrap();
    let counting = Arc::new(FaultyStore::counting(inner.clone()));
    let mut processes = Vec::new();
    for near_entries in [0, 0, 100, 100] {
        let cache = RedisCache::connect(
            &redis.redis_url(),
            CacheSettings {
                near_entries,
                ..CacheSettings::default()
            },
        )
        .await
        .unwrap();
        processes.push(Arc::new(CachedProfiles::new(
            counting.clone(),
            Arc::new(cache),
        )));
    }
    let mut tasks = Vec::new();
    for p in &processes {
        for _ in 0..20 {
            let p = p.clone();
            tasks.push(tokio::spawn(async move { p.get(hot).await.unwrap() }));
        }
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), Some(profile(hot, 1)));
    }
    assert_eq!(
        counting.gets.load(Ordering::SeqCst),
        1,
        "the store was read more than once for one cold key"
    );

    // A claim whose holder died before filling: the reader waits it out, then reads.
    let mut raw = redis::Client::open(redis.redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(format!("karmic:profile-fill:{orphan}"))
        .arg("dead process")
        .arg("PX")
        .arg(5000)
        .query_async(&mut raw)
        .await
        .unwrap();
    let t = Instant::now();
    assert_eq!(
        processes[0].get(orphan).await.unwrap(),
        Some(profile(orphan, 1))
    );
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(200) && waited < Duration::from_millis(1000),
        "{waited:?}"
    );
    assert_eq!(counting.gets.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_projector_killed_mid_batch_loses_and_doubles_nothing() {
    let mongo = PrivateServer::mongo().await;
    let redis = PrivateServer::redis().await;
    let app = app_on(&mongo, &redis).await;
    let mut users = Vec::new();
    for i in 0..6 {
        users.push(app.signed_up(&format!("u{i}@example.com")).await);
    }
    for round in 0..5 {
        for (id, token) in &users {
            let r = app
                .put_profile(
                    id,
                    token,
                    None,
                    &json!({"display_name": format!("{id} r{round}")}),
                )
                .await;
            assert_eq!(r.status(), 200);
        }
    }
    let rt = tests::runtime_like(&app).await;
    let feed = rt.projector.feed().clone();
    // Replay everything into the live store through a projector that dies after 7 writes,
    // with the checkpoint at zero, then resume with a healthy one from its checkpoint.
    rt.projector
        .checkpoints()
        .save("profiles", commands::Position::START)
        .await
        .unwrap();
    let crashing = ProfilesProjection(Arc::new(FaultyStore::crashing_after(
        rt.state.profile_reader.clone(),
        7,
    )));
    let batch = feed
        .read_after(commands::Position::START, 1000)
        .await
        .unwrap();
    assert!(crashing.apply(&batch).await.is_err());
    rt.projector.catch_up_one("profiles").await.unwrap();
    no_differences(&app).await;
    // Duplicate and out-of-order delivery of the whole feed changes nothing either.
    let healthy = ProfilesProjection(rt.state.profile_reader.clone());
    let mut reversed = batch.clone();
    reversed.reverse();
    healthy.apply(&reversed).await.unwrap();
    healthy.apply(&batch).await.unwrap();
    no_differences(&app).await;
    for (id, _) in &users {
        let v = rt
            .state
            .profile_reader
            .get(domain::UserId::parse(id).unwrap())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(v.version, 6, "{id}");
        assert_eq!(v.display_name, format!("{id} r4"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_keep_answering_during_a_rebuild_and_a_killed_rebuild_can_be_rerun() {
    let mongo = PrivateServer::mongo().await;
    let redis = PrivateServer::redis().await;
    let app = Arc::new(app_on(&mongo, &redis).await);
    let (a, token) = app.signed_up("a@example.com").await;
    for i in 0..300 {
        let r = app
            .put_profile(
                &a,
                &token,
                None,
                &json!({"display_name": format!("edit {i}")}),
            )
            .await;
        assert_eq!(r.status(), 200);
    }
    // Start a rebuild as a real process and kill -9 it part-way.
    let mut env = app.db.process_env();
    env.push(("KARMIC_MONGODB_URL".into(), mongo.mongodb_url()));
    let db_name = tests::runtime_like(&app)
        .await
        .settings
        .mongodb_database
        .clone();
    env.push(("KARMIC_MONGODB_DATABASE".into(), db_name));
    env.push(("KARMIC_REDIS_URL".into(), redis.redis_url()));
    let mut child = std::process::Command::new(tests::karmic_binary!())
        .args(["projections", "rebuild", "profiles"])
        .envs(env.clone())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = child.kill();
    let _ = child.wait();

    // Meanwhile and after, reads answer.
    let reader = {
        let app = app.clone();
        let (a, token) = (a.clone(), token.clone());
        tokio::spawn(async move {
            let mut n = 0;
            let until = Instant::now() + Duration::from_secs(4);
            while Instant::now() < until {
                let r = app.get(&format!("/profiles/{a}"), &token).await;
                assert_eq!(r.status(), 200, "a read failed during the rebuild");
                n += 1;
            }
            n
        })
    };
    let out = std::process::Command::new(tests::karmic_binary!())
        .args(["projections", "rebuild", "profiles"])
        .envs(env)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("events/s"));
    assert!(reader.await.unwrap() > 10);
    no_differences(&app).await;
    let p: Value = app
        .get(&format!("/profiles/{a}"), &token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(p["display_name"], "edit 299");
}

/// `rediss://` (ElastiCache with encryption in transit) speaks TLS: against the local
/// Redis, which speaks plain text, the handshake fails. Without TLS compiled in, the same
/// call fails at once with "the feature is not enabled"; with two crypto providers and
/// none chosen, it panics.
#[tokio::test]
async fn a_rediss_url_connects_over_tls() {
    let url = tests::redis_url().replacen("redis://", "rediss://", 1);
    assert!(url.starts_with("rediss://"), "{url}");
    let settings = CacheSettings {
        near_entries: 0,
        ..CacheSettings::default()
    };
    let err = match RedisCache::connect(&url, settings).await {
        Ok(_) => panic!("a plain-text server accepted a TLS client"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        !err.contains("not enabled") && !err.contains("feature"),
        "{err}"
    );
    assert!(err.contains("connecting to Redis"), "{err}");
}
