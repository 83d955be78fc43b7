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

async fn mongo_with_redis() -> Subject {
    let s = mongo().await;
    let redis = RedisCache::connect(
        &tests::redis_url(),
        CacheSettings {
            ttl: Duration::from_secs(300),
            timeout: Duration::from_millis(500),
        },
    )
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
    assert_eq!(local.get(id).await.unwrap(), None);
    assert_eq!(cached.get(id).await.unwrap().unwrap().display_name, "six");
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
    documentdb_redis => mongo_with_redis().await,
);
