//! The profile read-model port's contract, run against every adapter: SQL on SQLite and
//! Postgres, DocumentDB (SecantusDB here), and the cached stores (in-process and Redis).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use domain::UserId;
use projections::ProfileView;
use projections::cache::{CacheSettings, CachedProfiles, LocalCache, RedisCache};
use projections::read_models::{ProfileStore, ReadModels, SqlProfiles};
use tests::{Backend, TestDb, TestMongo};

/// Keeps whatever backs a store alive for the test.
struct Subject {
    store: Arc<dyn ProfileStore>,
    _db: Option<TestDb>,
    _mongo: Option<TestMongo>,
}

async fn sql(backend: Backend) -> Subject {
    let db = TestDb::new(backend).await;
    let store = Arc::new(SqlProfiles::new(ReadModels::new(&db.connect().await)));
    Subject {
        store,
        _db: Some(db),
        _mongo: None,
    }
}

async fn mongo() -> Subject {
    let m = TestMongo::new();
    let store = Arc::new(m.profiles().await);
    Subject {
        store,
        _db: None,
        _mongo: Some(m),
    }
}

async fn sqlite_with_local_cache() -> Subject {
    let s = sql(Backend::Sqlite).await;
    let store = Arc::new(CachedProfiles::new(
        s.store.clone(),
        Arc::new(LocalCache::new(Duration::from_secs(300), 1000)),
    ));
    Subject { store, ..s }
}

fn redis_settings(near_entries: usize) -> CacheSettings {
    CacheSettings {
        ttl: Duration::from_secs(300),
        timeout: Duration::from_millis(500),
        near_entries,
    }
}

async fn mongo_with_redis(near_entries: usize) -> Subject {
    let s = mongo().await;
    let redis = RedisCache::connect(&tests::redis_url(), redis_settings(near_entries))
        .await
        .unwrap();
    let store = Arc::new(CachedProfiles::new(s.store.clone(), Arc::new(redis)));
    Subject { store, ..s }
}

fn view(id: UserId, version: i64, name: &str) -> ProfileView {
    ProfileView {
        user_id: id,
        display_name: name.to_owned(),
        bio: (version % 2 == 0).then(|| format!("bio {version}")),
        avatar_url: None,
        location: Some("Lisbon".to_owned()),
        website: None,
        version,
        updated_at: Utc
            .timestamp_millis_opt(1_790_000_000_000 + version)
            .unwrap(),
    }
}

async fn missing_profiles_are_none(s: Subject) {
    assert_eq!(s.store.get(UserId::new_v7()).await.unwrap(), None);
}

async fn a_stored_profile_reads_back_field_for_field(s: Subject) {
    let id = UserId::new_v7();
    let mut v = view(id, 3, "Ann");
    v.avatar_url = Some("https://cdn.example.com/a.png".to_owned());
    v.website = Some("https://ann.example.com/".to_owned());
    s.store.upsert(&v).await.unwrap();
    assert_eq!(s.store.get(id).await.unwrap(), Some(v));
}

async fn older_or_equal_versions_are_ignored(s: Subject) {
    let id = UserId::new_v7();
    assert!(s.store.upsert(&view(id, 5, "five")).await.unwrap());
    assert!(!s.store.upsert(&view(id, 4, "four")).await.unwrap());
    assert!(!s.store.upsert(&view(id, 5, "five again")).await.unwrap());
    assert_eq!(s.store.get(id).await.unwrap().unwrap().display_name, "five");
    s.store.upsert(&view(id, 6, "six")).await.unwrap();
    assert_eq!(s.store.get(id).await.unwrap().unwrap().display_name, "six");
}

async fn duplicate_and_out_of_order_delivery_ends_in_the_same_state(s: Subject) {
    let ids: Vec<UserId> = (0..5).map(|_| UserId::new_v7()).collect();
    let mut deliveries = Vec::new();
    for id in &ids {
        for v in 1..=6 {
            deliveries.push(view(*id, v, &format!("v{v}")));
        }
    }
    // Every event twice, in a scrambled order (deterministic).
    let mut scrambled: Vec<ProfileView> = deliveries
        .iter()
        .chain(deliveries.iter())
        .cloned()
        .collect();
    let n = scrambled.len();
    for i in 0..n {
        let j = (i * 7919 + 13) % n;
        scrambled.swap(i, j);
    }
    for v in &scrambled {
        s.store.upsert(v).await.unwrap();
    }
    for id in &ids {
        assert_eq!(s.store.get(*id).await.unwrap(), Some(view(*id, 6, "v6")));
    }
    let all = s.store.all().await.unwrap();
    assert_eq!(all.len(), 5);
    assert!(all.iter().all(|v| v.version == 6));
}

async fn a_batch_stores_the_newest_of_each_and_reports_what_it_stored(s: Subject) {
    let (a, b, c) = (UserId::new_v7(), UserId::new_v7(), UserId::new_v7());
    assert!(s.store.upsert(&view(a, 5, "a5")).await.unwrap());
    assert!(s.store.upsert(&view(c, 9, "c9")).await.unwrap());
    let batch = [
        view(a, 3, "a3, late"),
        view(b, 1, "b1"),
        view(a, 6, "a6"),
        view(c, 9, "c9, again"),
        view(b, 2, "b2"),
        view(a, 4, "a4, late"),
    ];
    let stored = s.store.upsert_many(&batch).await.unwrap();
    // Whatever an adapter writes along the way, what it reports as stored is newer than
    // what was there, and the newest it reports per profile is what the store now holds.
    assert!(stored.iter().all(|v| v.user_id != c), "{stored:?}");
    assert!(
        stored.iter().all(|v| v.user_id != a || v.version > 5),
        "{stored:?}"
    );
    let newest = |id| {
        stored
            .iter()
            .filter(|v| v.user_id == id)
            .map(|v| v.version)
            .max()
    };
    assert_eq!((newest(a), newest(b)), (Some(6), Some(2)));
    assert_eq!(s.store.get(a).await.unwrap(), Some(view(a, 6, "a6")));
    assert_eq!(s.store.get(b).await.unwrap(), Some(view(b, 2, "b2")));
    assert_eq!(s.store.get(c).await.unwrap(), Some(view(c, 9, "c9")));
    // The same batch again changes nothing and reports nothing.
    assert_eq!(s.store.upsert_many(&batch).await.unwrap(), vec![]);
    assert!(s.store.upsert_many(&[]).await.unwrap().is_empty());
}

async fn a_rebuild_fills_a_new_store_and_switches_at_once(s: Subject) {
    let id = UserId::new_v7();
    let other = UserId::new_v7();
    s.store.upsert(&view(id, 1, "old")).await.unwrap();
    s.store
        .upsert(&view(other, 1, "gone after rebuild"))
        .await
        .unwrap();
    let target = s.store.begin_rebuild().await.unwrap();
    target.store.upsert(&view(id, 2, "rebuilt")).await.unwrap();
    // The live store is untouched while the rebuild runs.
    assert_eq!(s.store.get(id).await.unwrap().unwrap().display_name, "old");
    s.store.finish_rebuild(target).await.unwrap();
    assert_eq!(
        s.store.get(id).await.unwrap().unwrap().display_name,
        "rebuilt"
    );
    let all = s.store.all().await.unwrap();
    assert_eq!(all.len(), 1);
    // And the rebuilt store takes writes as the live one.
    s.store.upsert(&view(id, 3, "after")).await.unwrap();
    assert_eq!(
        s.store.get(id).await.unwrap().unwrap().display_name,
        "after"
    );
}

async fn an_interrupted_rebuild_can_be_started_again(s: Subject) {
    let id = UserId::new_v7();
    s.store.upsert(&view(id, 1, "live")).await.unwrap();
    let abandoned = s.store.begin_rebuild().await.unwrap();
    abandoned
        .store
        .upsert(&view(id, 9, "half-built"))
        .await
        .unwrap();
    drop(abandoned); // the process died here
    let target = s.store.begin_rebuild().await.unwrap();
    assert_eq!(
        target.store.get(id).await.unwrap(),
        None,
        "leftovers were not cleared"
    );
    target.store.upsert(&view(id, 2, "complete")).await.unwrap();
    s.store.finish_rebuild(target).await.unwrap();
    assert_eq!(
        s.store.get(id).await.unwrap().unwrap().display_name,
        "complete"
    );
}

#[tokio::test]
async fn a_late_old_event_never_reaches_an_expired_cache() {
    let s = sql(Backend::Sqlite).await;
    let local = Arc::new(LocalCache::new(Duration::from_secs(300), 1000));
    let cached = CachedProfiles::new(s.store.clone(), local.clone());
    let id = UserId::new_v7();
    assert!(cached.upsert(&view(id, 6, "six")).await.unwrap());
    use projections::cache::ProfileCache;
    local.clear().await.unwrap(); // the entry expired
    assert!(
        !cached
            .upsert(&view(id, 3, "three, redelivered"))
            .await
            .unwrap()
    );
    // The redelivered batch refreshes the cache from the store (v6), never with v3.
    let entry = local.get(id).await.unwrap();
    assert!(entry.as_ref().is_none_or(|v| v.version == 6), "{entry:?}");
    assert_eq!(cached.get(id).await.unwrap().unwrap().display_name, "six");
}

/// Process A wrote v2 to DocumentDB and died before refreshing Redis, which still holds
/// v1. Process B re-applies the same batch: DocumentDB turns v2 away ("already stored"),
/// and B must still bring Redis up to v2, or every process (and every near cache) serves
/// v1 until the TTL and `If-Match: "2"` gets 412.
#[tokio::test]
async fn a_reapplied_batch_refreshes_a_cache_another_process_left_stale() {
    let m = TestMongo::new();
    let mongo: Arc<dyn ProfileStore> = Arc::new(m.profiles().await);
    let process = async |near: usize| {
        let redis = RedisCache::connect(&tests::redis_url(), redis_settings(near))
            .await
            .unwrap();
        CachedProfiles::new(mongo.clone(), Arc::new(redis))
    };
    let a = process(0).await;
    let id = UserId::new_v7();
    a.upsert_many(&[view(id, 1, "one")]).await.unwrap();
    assert_eq!(a.get(id).await.unwrap().unwrap().version, 1);
    // A: DocumentDB takes v2; the Redis refresh never happens (A is gone).
    assert_eq!(
        mongo
            .upsert_many(&[view(id, 2, "two")])
            .await
            .unwrap()
            .len(),
        1
    );
    drop(a);
    // B re-applies the batch.
    let b = process(0).await;
    let stored = b.upsert_many(&[view(id, 2, "two")]).await.unwrap();
    assert!(stored.is_empty(), "DocumentDB already held v2");
    // Any process, with or without a near cache, now reads v2.
    for near in [0, 100] {
        let c = process(near).await;
        assert_eq!(c.get(id).await.unwrap().unwrap().version, 2, "near={near}");
    }
}

/// With the README's own URL (`readPreference=secondaryPreferred`), the live-collection
/// pointer and cache fills are read from the primary: a rebuild's switch is seen at once
/// and every read and fill gives the newest version. (The stand-in is a single server, so
/// this shows the configuration works end to end; `MongoProfiles::get_fresh` and the
/// pointer read pin `ReadPreference::Primary` in code.)
#[tokio::test]
async fn secondary_preferred_urls_still_read_pointers_and_fills_from_the_primary() {
    let url = tests::mongodb_url();
    let sep = if url.contains('?') { '&' } else { '?' };
    let m = TestMongo::new();
    let mut settings = m.settings();
    settings.url = format!("{url}{sep}readPreference=secondaryPreferred");
    let mongo = projections::mongo::MongoProfiles::connect(&settings)
        .await
        .unwrap();
    mongo.migrate().await.unwrap();
    let mongo: Arc<dyn ProfileStore> = Arc::new(mongo);
    let redis = RedisCache::connect(&tests::redis_url(), redis_settings(100))
        .await
        .unwrap();
    let cached = CachedProfiles::new(mongo.clone(), Arc::new(redis));
    let id = UserId::new_v7();
    cached.upsert_many(&[view(id, 1, "one")]).await.unwrap();
    assert_eq!(cached.get(id).await.unwrap().unwrap().version, 1);
    let target = cached.begin_rebuild().await.unwrap();
    target.store.upsert(&view(id, 3, "three")).await.unwrap();
    cached.finish_rebuild(target).await.unwrap();
    assert_eq!(mongo.get_fresh(id).await.unwrap().unwrap().version, 3);
    assert_eq!(cached.get(id).await.unwrap().unwrap().version, 3);
    cached.upsert_many(&[view(id, 4, "four")]).await.unwrap();
    assert_eq!(cached.get(id).await.unwrap().unwrap().version, 4);
}

macro_rules! contract {
    ($($adapter:ident => $make:expr),* $(,)?) => {
        $(
            mod $adapter {
                use super::*;
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn missing() { missing_profiles_are_none($make).await }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn reads_back() { a_stored_profile_reads_back_field_for_field($make).await }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn version_guard() { older_or_equal_versions_are_ignored($make).await }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn duplicates_and_reordering() { duplicate_and_out_of_order_delivery_ends_in_the_same_state($make).await }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn batches() { a_batch_stores_the_newest_of_each_and_reports_what_it_stored($make).await }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn rebuild_switch() { a_rebuild_fills_a_new_store_and_switches_at_once($make).await }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn rebuild_restart() { an_interrupted_rebuild_can_be_started_again($make).await }
            }
        )*
    };
}

contract!(
    sqlite => sql(Backend::Sqlite).await,
    postgres => sql(Backend::Postgres).await,
    documentdb => mongo().await,
    sqlite_local_cache => sqlite_with_local_cache().await,
    documentdb_redis => mongo_with_redis(0).await,
    documentdb_redis_near_cache => mongo_with_redis(1000).await,
);

fn profile_key_value(v: &ProfileView) -> String {
    serde_json::to_string(v).unwrap()
}

/// The in-process copy in front of Redis answers repeated reads from memory, and a write
/// made by another process (another connection) reaches it through Redis's invalidation
/// push, not after the TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_near_cache_answers_from_memory_and_hears_of_other_writers_at_once() {
    use projections::cache::ProfileCache;
    let reader = RedisCache::connect(&tests::redis_url(), redis_settings(100))
        .await
        .unwrap();
    let writer = RedisCache::connect(&tests::redis_url(), redis_settings(0))
        .await
        .unwrap();
    let id = UserId::new_v7();
    writer.put_if_newer(&view(id, 1, "one")).await.unwrap();
    // The first read fills the copy. (A fill whose read raced the invalidation push of
    // the write before it is dropped, by design, so allow a few misses first.)
    let t = std::time::Instant::now();
    while reader.near_cache_statistics().unwrap().hits == 0 {
        assert_eq!(reader.get(id).await.unwrap(), Some(view(id, 1, "one")));
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "the copy never filled"
        );
    }
    let before = reader.near_cache_statistics().unwrap();
    for _ in 0..10 {
        assert_eq!(reader.get(id).await.unwrap(), Some(view(id, 1, "one")));
    }
    let after = reader.near_cache_statistics().unwrap();
    assert_eq!(
        (after.misses - before.misses, after.hits - before.hits),
        (0, 10),
        "{after:?}"
    );

    // Another process writes: the reader sees it within the time of a push, not a TTL.
    writer.put_if_newer(&view(id, 2, "two")).await.unwrap();
    let t = std::time::Instant::now();
    while reader.get(id).await.unwrap() != Some(view(id, 2, "two")) {
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "the reader still holds version 1 after 1 s"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(
        t.elapsed() < Duration::from_millis(200),
        "{:?}",
        t.elapsed()
    );

    // A write through the reader's own connection is seen by its very next read: the
    // invalidation comes back on that connection ahead of the write's reply.
    for v in 3..50 {
        let want = view(id, v, &format!("v{v}"));
        reader.put_if_newer(&want).await.unwrap();
        assert_eq!(reader.get(id).await.unwrap(), Some(want));
    }
    // Deleting the key in Redis (as an operator might) is heard too.
    let mut raw = redis::Client::open(tests::redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let key = format!("karmic:profile:{id}");
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg(profile_key_value(&view(id, 100, "set by hand")))
        .query_async(&mut raw)
        .await
        .unwrap();
    let t = std::time::Instant::now();
    while reader.get(id).await.unwrap().map(|v| v.version) != Some(100) {
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "no invalidation heard"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
