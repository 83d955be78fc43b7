//! A cache in front of the profile read model: Redis in the AWS configuration, an
//! in-process map in the embedded one, with the same semantics.
//!
//! * Cache-aside with a TTL (default 300 s, 5 to 10 minutes allowed).
//! * Every write to the cache is guarded by the profile's version: an entry is only ever
//!   replaced by a newer one. The projection refreshes the entry right after it writes the
//!   store, and a reader filling a miss cannot put back an older value than that.
//! * A cold key is loaded once per process however many readers miss it together
//!   (stampede protection).
//! * Redis calls time out quickly; a slow or dead Redis turns into cache misses.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use domain::UserId;
use redis::aio::ConnectionManager;

use crate::read_models::{ProfileStore, ProfileView, RebuildTarget};

/// Where cached profiles live.
#[async_trait::async_trait]
pub trait ProfileCache: Send + Sync {
    async fn get(&self, id: UserId) -> Result<Option<ProfileView>>;
    /// Store `view` for the TTL unless a newer version is cached.
    async fn put_if_newer(&self, view: &ProfileView) -> Result<()>;
    /// Forget every cached profile (after a rebuild).
    async fn clear(&self) -> Result<()>;
}

/// Cache settings.
#[derive(Debug, Clone, Copy)]
pub struct CacheSettings {
    pub ttl: Duration,
    /// The longest any request waits on Redis.
    pub timeout: Duration,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            ttl: Duration::from_secs(300),
            timeout: Duration::from_millis(50),
        }
    }
}

const KEY_PREFIX: &str = "karmic:profile:";

/// Compare-and-set on the version inside the cached JSON, atomically in Redis.
const PUT_IF_NEWER: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, v = pcall(cjson.decode, cur)
  if ok and tonumber(v['version']) >= tonumber(ARGV[2]) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
return 1
"#;

/// Profiles cached in Redis (ElastiCache).
#[derive(Clone)]
pub struct RedisCache {
    conn: ConnectionManager,
    settings: CacheSettings,
    script: Arc<redis::Script>,
}

impl RedisCache {
    pub async fn connect(url: &str, settings: CacheSettings) -> Result<RedisCache> {
        let client = redis::Client::open(url).context("parsing KARMIC_REDIS_URL")?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.timeout.max(Duration::from_millis(200))))
            .set_response_timeout(Some(settings.timeout))
            .set_number_of_retries(1);
        // Connecting lazily would hide a wrong URL; a down server is fine later on.
        let conn = tokio::time::timeout(
            Duration::from_secs(5),
            ConnectionManager::new_with_config(client, config),
        )
        .await
        .context("connecting to Redis timed out")?
        .context("connecting to Redis")?;
        Ok(RedisCache {
            conn,
            settings,
            script: Arc::new(redis::Script::new(PUT_IF_NEWER)),
        })
    }

    async fn timed<T>(
        &self,
        f: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T> {
        tokio::time::timeout(self.settings.timeout, f)
            .await
            .context("Redis timed out")?
            .context("Redis call failed")
    }
}

#[async_trait::async_trait]
impl ProfileCache for RedisCache {
    async fn get(&self, id: UserId) -> Result<Option<ProfileView>> {
        let mut c = self.conn.clone();
        let key = format!("{KEY_PREFIX}{id}");
        let raw: Option<String> = self
            .timed(async move { redis::cmd("GET").arg(key).query_async(&mut c).await })
            .await?;
        Ok(raw.and_then(|s| serde_json::from_str(&s).ok()))
    }

    async fn put_if_newer(&self, view: &ProfileView) -> Result<()> {
        let mut c = self.conn.clone();
        let json = serde_json::to_string(view)?;
        let mut inv = self.script.key(format!("{KEY_PREFIX}{}", view.user_id));
        inv.arg(json)
            .arg(view.version)
            .arg(self.settings.ttl.as_secs());
        let _: i64 = self
            .timed(async move { inv.invoke_async(&mut c).await })
            .await?;
        Ok(())
    }

    async fn clear(&self) -> Result<()> {
        let mut c = self.conn.clone();
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{KEY_PREFIX}*"))
                .arg("COUNT")
                .arg(500)
                .query_async(&mut c)
                .await?;
            if !keys.is_empty() {
                let _: i64 = redis::cmd("DEL").arg(keys).query_async(&mut c).await?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }
}

/// Profiles cached in this process (embedded mode), with the same TTL semantics.
pub struct LocalCache {
    ttl: Duration,
    max_entries: usize,
    map: Mutex<HashMap<UserId, (ProfileView, Instant)>>,
}

impl LocalCache {
    pub fn new(ttl: Duration, max_entries: usize) -> Self {
        LocalCache {
            ttl,
            max_entries,
            map: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, HashMap<UserId, (ProfileView, Instant)>>> {
        self.map
            .lock()
            .map_err(|_| anyhow::anyhow!("local cache poisoned"))
    }
}

#[async_trait::async_trait]
impl ProfileCache for LocalCache {
    async fn get(&self, id: UserId) -> Result<Option<ProfileView>> {
        let mut map = self.lock()?;
        match map.get(&id) {
            Some((v, expires)) if *expires > Instant::now() => Ok(Some(v.clone())),
            Some(_) => {
                map.remove(&id);
                Ok(None)
            }
            None => Ok(None),
        }
    }

    async fn put_if_newer(&self, view: &ProfileView) -> Result<()> {
        let mut map = self.lock()?;
        let now = Instant::now();
        if let Some((cur, expires)) = map.get(&view.user_id)
            && *expires > now
            && cur.version >= view.version
        {
            return Ok(());
        }
        if map.len() >= self.max_entries {
            map.retain(|_, (_, e)| *e > now);
            if map.len() >= self.max_entries {
                map.clear();
            }
        }
        map.insert(view.user_id, (view.clone(), now + self.ttl));
        Ok(())
    }

    async fn clear(&self) -> Result<()> {
        self.lock()?.clear();
        Ok(())
    }
}

/// A profile store with a cache in front.
pub struct CachedProfiles {
    store: Arc<dyn ProfileStore>,
    cache: Arc<dyn ProfileCache>,
    loading: Mutex<HashMap<UserId, Arc<tokio::sync::Mutex<()>>>>,
    /// Profiles written to the store whose cache entry could not be refreshed yet.
    dirty: Mutex<std::collections::HashSet<UserId>>,
}

impl CachedProfiles {
    pub fn new(store: Arc<dyn ProfileStore>, cache: Arc<dyn ProfileCache>) -> Self {
        CachedProfiles {
            store,
            cache,
            loading: Mutex::new(HashMap::new()),
            dirty: Mutex::new(std::collections::HashSet::new()),
        }
    }

    fn dirty(&self) -> Result<std::sync::MutexGuard<'_, std::collections::HashSet<UserId>>> {
        self.dirty
            .lock()
            .map_err(|_| anyhow::anyhow!("dirty set poisoned"))
    }

    fn key_lock(&self, id: UserId) -> Result<Arc<tokio::sync::Mutex<()>>> {
        let mut m = self
            .loading
            .lock()
            .map_err(|_| anyhow::anyhow!("loader table poisoned"))?;
        Ok(m.entry(id).or_default().clone())
    }

    fn forget_key_lock(&self, id: UserId, lock: &Arc<tokio::sync::Mutex<()>>) {
        if let Ok(mut m) = self.loading.lock()
            && m.get(&id).is_some_and(|l| Arc::ptr_eq(l, lock))
            && Arc::strong_count(lock) <= 2
        {
            m.remove(&id);
        }
    }

    async fn cached(&self, id: UserId) -> Option<ProfileView> {
        match self.cache.get(id).await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "profile cache unavailable; reading the store");
                None
            }
        }
    }
}

#[async_trait::async_trait]
impl ProfileStore for CachedProfiles {
    async fn get(&self, id: UserId) -> Result<Option<ProfileView>> {
        if let Some(v) = self.cached(id).await {
            return Ok(Some(v));
        }
        // One loader per key; the others wait for it and then find the cache warm.
        let lock = self.key_lock(id)?;
        let result = async {
            let _g = lock.lock().await;
            if let Some(v) = self.cached(id).await {
                return Ok(Some(v));
            }
            let v = self.store.get(id).await?;
            if let Some(v) = &v
                && let Err(e) = self.cache.put_if_newer(v).await
            {
                tracing::warn!(error = %format!("{e:#}"), "could not fill the profile cache");
            }
            Ok(v)
        }
        .await;
        self.forget_key_lock(id, &lock);
        result
    }

    async fn upsert(&self, view: &ProfileView) -> Result<bool> {
        // Only what the store accepted goes to the cache: a late, older event must not
        // land in a cache whose entry for the newer one has expired.
        if !self.store.upsert(view).await? {
            return Ok(false);
        }
        // Refresh (never just delete) so that no reader can put back an older value.
        // Failing here fails the batch: the projector retries until the cache agrees.
        self.cache
            .put_if_newer(view)
            .await
            .context("refreshing the profile cache")?;
        Ok(true)
    }

    /// Write the whole batch to the store first (a dead cache must not hold the read
    /// model back), then bring the cache entries of everything written up to the store.
    /// If the cache cannot be refreshed the batch fails, so the projector retries (and the
    /// checkpoint, and `projections status`, show the lag) until it can.
    async fn upsert_many(&self, views: &[ProfileView]) -> Result<()> {
        for v in views {
            if self.store.upsert(v).await? {
                self.dirty()?.insert(v.user_id);
            }
        }
        let pending: Vec<UserId> = self.dirty()?.iter().copied().collect();
        let mut failed = 0usize;
        for id in pending {
            let refreshed = match self.store.get(id).await? {
                Some(current) => self.cache.put_if_newer(&current).await,
                None => Ok(()),
            };
            match refreshed {
                Ok(()) => {
                    self.dirty()?.remove(&id);
                }
                Err(_) => failed += 1,
            }
        }
        if failed > 0 {
            anyhow::bail!("{failed} profile cache entries could not be refreshed");
        }
        Ok(())
    }

    async fn all(&self) -> Result<Vec<ProfileView>> {
        self.store.all().await
    }

    async fn begin_rebuild(&self) -> Result<RebuildTarget> {
        self.store.begin_rebuild().await
    }

    async fn finish_rebuild(&self, target: RebuildTarget) -> Result<()> {
        self.store.finish_rebuild(target).await?;
        // The new store holds the same versions (it is a fold of the same events), but a
        // clean cache costs little and removes any doubt.
        self.cache.clear().await
    }
}
