//! A cache in front of the profile read model: Redis in the AWS configuration, an
//! in-process map in the embedded one, with the same semantics.
//!
//! * Cache-aside with a TTL (default 300 s, 5 to 10 minutes allowed).
//! * Every write to the cache is guarded by the profile's version: an entry is only ever
//!   replaced by a newer one. The projection refreshes the entry right after it writes the
//!   store, and a reader filling a miss cannot put back an older value than that.
//! * A cold key is loaded once however many readers miss it together: once per process
//!   (single flight), and once across processes sharing Redis (a claim in Redis).
//! * Redis calls time out quickly; a slow or dead Redis turns into cache misses.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use domain::UserId;
use redis::aio::ConnectionManager;

use crate::read_models::{ProfileStore, ProfileView, RebuildTarget};

/// Profiles in memory, each for a TTL, at most `capacity` of them: when full, expired
/// entries go first and then everything (a cache, not a store). Shared by the embedded
/// cache and the near copy in front of Redis.
struct TtlMap {
    ttl: Duration,
    capacity: usize,
    map: HashMap<UserId, (ProfileView, Instant)>,
}

impl TtlMap {
    fn new(ttl: Duration, capacity: usize) -> TtlMap {
        TtlMap {
            ttl,
            capacity,
            map: HashMap::new(),
        }
    }

    /// The unexpired entry for `id`; an expired one is dropped on the way.
    fn fresh(&mut self, id: UserId) -> Option<&ProfileView> {
        if self.map.get(&id).is_some_and(|(_, e)| *e <= Instant::now()) {
            self.map.remove(&id);
        }
        self.map.get(&id).map(|(v, _)| v)
    }

    fn insert(&mut self, view: &ProfileView) {
        let now = Instant::now();
        if self.map.len() >= self.capacity {
            self.map.retain(|_, (_, e)| *e > now);
            if self.map.len() >= self.capacity {
                self.map.clear();
            }
        }
        self.map
            .insert(view.user_id, (view.clone(), now + self.ttl));
    }

    fn remove(&mut self, id: UserId) {
        self.map.remove(&id);
    }

    fn clear(&mut self) {
        self.map.clear();
    }
}

/// Where cached profiles live.
#[async_trait::async_trait]
pub trait ProfileCache: Send + Sync {
    async fn get(&self, id: UserId) -> Result<Option<ProfileView>>;
    /// Store `view` for the TTL unless a newer version is cached.
    async fn put_if_newer(&self, view: &ProfileView) -> Result<()>;
    /// [`ProfileCache::put_if_newer`] for each view; a remote cache does it in one round
    /// trip.
    async fn put_many_if_newer(&self, views: &[ProfileView]) -> Result<()> {
        for v in views {
            self.put_if_newer(v).await?;
        }
        Ok(())
    }
    /// Forget every cached profile (after a rebuild).
    async fn clear(&self) -> Result<()>;

    /// Is this cache private to the process (so another process's writes never reach
    /// it)? Then [`CachedProfiles`] refreshes it when the projector hears of them.
    fn is_process_local(&self) -> bool {
        false
    }

    /// Claim, across every process sharing this cache, the loading of the cold key `id`
    /// from the store: `Some(token)` means load it and then [`ProfileCache::release_fill`];
    /// `None` means another process holds the claim (wait for its fill). A cache private to
    /// one process always says load: the in-process single flight covers it.
    async fn claim_fill(&self, _id: UserId) -> Option<String> {
        Some(String::new())
    }
    /// Give up a claim made by [`ProfileCache::claim_fill`].
    async fn release_fill(&self, _id: UserId, _token: &str) {}
    /// Whether some process still holds a claim on `id`.
    async fn fill_pending(&self, _id: UserId) -> bool {
        false
    }
}

/// How long a claim on a cold key lasts if its holder dies without releasing it.
const FILL_CLAIM: Duration = Duration::from_secs(1);
/// How long a reader waits for another process to fill a cold key before it reads the
/// store itself, and how often it looks.
const FILL_WAIT: Duration = Duration::from_millis(250);
const FILL_POLL: Duration = Duration::from_millis(5);

/// Deletes a fill claim only if it is still the caller's.
const RELEASE_FILL: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

const FILL_PREFIX: &str = "karmic:profile-fill:";

/// Cache settings.
#[derive(Debug, Clone, Copy)]
pub struct CacheSettings {
    pub ttl: Duration,
    /// The longest any request waits on Redis.
    pub timeout: Duration,
    /// Entries of the in-process copy of Redis entries, kept coherent by Redis itself
    /// (server-assisted client-side caching: Redis tells the process when a key it holds
    /// changes or expires). 0 turns it off.
    pub near_entries: usize,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            ttl: Duration::from_secs(300),
            timeout: Duration::from_millis(50),
            near_entries: 10_000,
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
///
/// With `near_entries > 0` a hit is usually answered from memory (see [`Near`]): the
/// connection speaks RESP3 with broadcast client tracking on the profile keys, so Redis
/// pushes an invalidation to every process as soon as a profile key is written, deleted or
/// expires. A process's own writes invalidate its copy before they return, so a read that
/// starts after the projection's write has returned never sees the older value; another
/// process sees the new value once Redis's push reaches it (a loopback or LAN hop), the
/// same kind of window as between the DocumentDB write and the Redis write.
///
/// The copy only answers while Redis is known to be tracking for this connection and to
/// be answering: a dropped connection (the driver's disconnect notice) empties it at once
/// and it stays off until tracking is on again on the new connection; a probe turns it
/// off within [`NEAR_PROBE_INTERVAL`] when Redis hangs without closing the connection. So
/// an unreachable Redis turns into misses (DocumentDB reads), exactly as without the copy.
#[derive(Clone)]
pub struct RedisCache {
    conn: ConnectionManager,
    settings: CacheSettings,
    near: Option<Arc<Near>>,
}

/// How often a process with an in-process copy checks that Redis still answers and, if
/// tracking was lost, turns it back on.
pub const NEAR_PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// How long a probe's answer vouches for the copy. Redis answers in order, so when the
/// probe's reply arrives every invalidation Redis pushed before it has been applied; past
/// this lease (a hung Redis, a starved or frozen process such as a Lambda between
/// invocations) reads go to Redis until the next answer.
pub const NEAR_LEASE: Duration = Duration::from_millis(750);

/// Counters of the in-process copy, for tests and operators.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NearStats {
    pub hits: u64,
    pub misses: u64,
    pub invalidations: u64,
}

/// The in-process copy of Redis profile entries.
///
/// Fills are guarded against the classic client-side-caching race (a value read from Redis
/// just before a write, whose invalidation is handled before the value is stored): a fill
/// carries the logical clock of when its read started and is dropped if its key, or
/// everything, was invalidated since.
pub struct Near {
    capacity: usize,
    state: Mutex<NearState>,
}

struct NearState {
    /// Redis tracks keys for the current connection and answers: the copy may be used.
    live: bool,
    entries: TtlMap,
    clock: u64,
    invalidated_at: HashMap<UserId, u64>,
    cleared_at: u64,
    /// Connections lost so far; tracking turned on before the latest loss does not count.
    disconnects: u64,
    /// When Redis last answered a probe on the tracked connection.
    confirmed_at: Option<Instant>,
    stats: NearStats,
}

impl Near {
    fn new(capacity: usize, ttl: Duration) -> Near {
        Near {
            capacity,
            state: Mutex::new(NearState {
                live: false,
                entries: TtlMap::new(ttl, capacity),
                clock: 0,
                invalidated_at: HashMap::new(),
                cleared_at: 0,
                disconnects: 0,
                confirmed_at: None,
                stats: NearStats::default(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, NearState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The copy may answer: tracking is on and a recent probe vouches for it.
    fn usable(s: &NearState) -> bool {
        s.live && s.confirmed_at.is_some_and(|at| at.elapsed() < NEAR_LEASE)
    }

    fn get(&self, id: UserId) -> Option<ProfileView> {
        let mut s = self.lock();
        if !Near::usable(&s) {
            return None;
        }
        let found = s.entries.fresh(id).cloned();
        match found {
            Some(_) => s.stats.hits += 1,
            None => s.stats.misses += 1,
        }
        found
    }

    /// Taken before reading Redis; `None` while the copy is off.
    fn ticket(&self) -> Option<u64> {
        let s = self.lock();
        Near::usable(&s).then_some(s.clock)
    }

    fn fill(&self, ticket: u64, view: &ProfileView) {
        let mut s = self.lock();
        if !Near::usable(&s)
            || s.cleared_at > ticket
            || s.invalidated_at
                .get(&view.user_id)
                .is_some_and(|&at| at > ticket)
        {
            return;
        }
        s.entries.insert(view);
    }

    fn invalidate(&self, ids: impl IntoIterator<Item = UserId>) {
        let mut s = self.lock();
        s.clock += 1;
        let now = s.clock;
        for id in ids {
            s.entries.remove(id);
            s.invalidated_at.insert(id, now);
            s.stats.invalidations += 1;
        }
        if s.invalidated_at.len() > self.capacity {
            s.invalidated_at.clear();
            s.cleared_at = now;
        }
    }

    fn clear(s: &mut NearState, live: bool) {
        s.clock += 1;
        s.cleared_at = s.clock;
        s.entries.clear();
        s.invalidated_at.clear();
        s.live = live;
    }

    /// Stop answering until the probe has seen Redis answer and tracking on.
    fn suspend(&self) {
        Near::clear(&mut self.lock(), false);
    }

    fn disconnects(&self) -> u64 {
        self.lock().disconnects
    }

    /// Tracking was turned on after `disconnects_before` losses: use the copy, from empty.
    fn resume(&self, disconnects_before: u64) -> bool {
        let mut s = self.lock();
        if s.disconnects != disconnects_before {
            return false;
        }
        if !s.live {
            Near::clear(&mut s, true);
        }
        s.confirmed_at = Some(Instant::now());
        true
    }

    fn is_live(&self) -> bool {
        self.lock().live
    }

    /// A probe answered on the tracked connection.
    fn confirm(&self) {
        let mut s = self.lock();
        if s.live {
            s.confirmed_at = Some(Instant::now());
        }
    }

    /// Everything the connection pushes: invalidations and the driver's disconnect notice.
    fn on_push(&self, push: redis::PushInfo) {
        match push.kind {
            redis::PushKind::Invalidate => match push.data.first() {
                Some(redis::Value::Array(keys)) => self.invalidate(keys.iter().filter_map(|k| {
                    let k: String = redis::FromRedisValue::from_redis_value_ref(k).ok()?;
                    UserId::parse(k.strip_prefix(KEY_PREFIX)?).ok()
                })),
                // FLUSHALL/FLUSHDB: everything is gone; tracking stays on.
                _ => {
                    let mut s = self.lock();
                    let live = s.live;
                    Near::clear(&mut s, live);
                }
            },
            redis::PushKind::Disconnection => {
                let mut s = self.lock();
                s.disconnects += 1;
                Near::clear(&mut s, false);
            }
            _ => {}
        }
    }
}

impl RedisCache {
    pub async fn connect(url: &str, settings: CacheSettings) -> Result<RedisCache> {
        use redis::IntoConnectionInfo;
        let mut info = url
            .into_connection_info()
            .context("parsing KARMIC_REDIS_URL")?;
        let mut config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.timeout.max(Duration::from_millis(200))))
            .set_response_timeout(Some(settings.timeout))
            .set_number_of_retries(1);
        let near = (settings.near_entries > 0)
            .then(|| Arc::new(Near::new(settings.near_entries, settings.ttl)));
        if let Some(near) = &near {
            let resp3 = info
                .redis_settings()
                .clone()
                .set_protocol(redis::ProtocolVersion::RESP3);
            info = info.set_redis_settings(resp3);
            let n = Arc::downgrade(near);
            config = config.set_push_sender(move |push: redis::PushInfo| {
                if let Some(n) = n.upgrade() {
                    n.on_push(push);
                }
                Ok::<(), std::convert::Infallible>(())
            });
        }
        if matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. }) {
            // rediss:// (ElastiCache encrypts in transit): rustls is built with two crypto
            // providers in this workspace and will not pick one itself. Another part of the
            // process may have chosen already; that one stays.
            let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        }
        let client = redis::Client::open(info).context("parsing KARMIC_REDIS_URL")?;
        // Connecting lazily would hide a wrong URL; a down server is fine later on.
        let conn = tokio::time::timeout(
            Duration::from_secs(5),
            ConnectionManager::new_with_config(client, config),
        )
        .await
        .context("connecting to Redis timed out")?
        .with_context(|| {
            if near.is_some() {
                "connecting to Redis with RESP3 (the near cache needs Redis 6 or later; \
                 KARMIC_REDIS_NEAR_CACHE_ENTRIES=0 turns it off)"
            } else {
                "connecting to Redis"
            }
        })?;
        if let Some(near) = &near {
            probe_once(&mut conn.clone(), near, settings.timeout).await;
            tokio::spawn(probe(conn.clone(), Arc::downgrade(near), settings.timeout));
        }
        Ok(RedisCache {
            conn,
            settings,
            near,
        })
    }

    /// Counters of the in-process copy (`None` when it is off).
    pub fn near_cache_statistics(&self) -> Option<NearStats> {
        self.near.as_ref().map(|n| n.lock().stats)
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

/// Ping Redis; on silence stop using the copy, on an answer make sure tracking is on.
async fn probe_once(conn: &mut ConnectionManager, near: &Near, timeout: Duration) {
    let answered = matches!(
        tokio::time::timeout(
            timeout,
            redis::cmd("PING").query_async::<redis::Value>(conn)
        )
        .await,
        Ok(Ok(_))
    );
    if !answered {
        if near.is_live() {
            tracing::warn!("Redis does not answer; profile near cache bypassed");
        }
        near.suspend();
        return;
    }
    if near.is_live() {
        near.confirm();
        return;
    }
    let before = near.disconnects();
    // OFF first: turning tracking on twice with the same prefix is refused.
    let mut pipe = redis::pipe();
    pipe.cmd("CLIENT")
        .arg("TRACKING")
        .arg("OFF")
        .ignore()
        .cmd("CLIENT")
        .arg("TRACKING")
        .arg("ON")
        .arg("BCAST")
        .arg("PREFIX")
        .arg(KEY_PREFIX)
        .ignore();
    match tokio::time::timeout(timeout, pipe.query_async::<()>(conn)).await {
        Ok(Ok(())) => {
            if near.resume(before) {
                tracing::info!("profile near cache in use (Redis tracks the profile keys)");
            }
        }
        Ok(Err(e)) => tracing::warn!(error = %e, "Redis refused client tracking; near cache off"),
        Err(_) => {}
    }
}

/// [`probe_once`] every [`NEAR_PROBE_INTERVAL`]; ends when the cache it serves is dropped.
async fn probe(mut conn: ConnectionManager, near: std::sync::Weak<Near>, timeout: Duration) {
    let mut tick = tokio::time::interval(NEAR_PROBE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(n) = near.upgrade() else {
            return;
        };
        probe_once(&mut conn, &n, timeout).await;
    }
}

#[async_trait::async_trait]
impl ProfileCache for RedisCache {
    async fn get(&self, id: UserId) -> Result<Option<ProfileView>> {
        let ticket = match &self.near {
            Some(near) => match near.get(id) {
                Some(v) => return Ok(Some(v)),
                None => near.ticket(),
            },
            None => None,
        };
        let mut c = self.conn.clone();
        let key = format!("{KEY_PREFIX}{id}");
        let raw: Option<String> = self
            .timed(async move { redis::cmd("GET").arg(key).query_async(&mut c).await })
            .await?;
        let view: Option<ProfileView> = raw.and_then(|s| serde_json::from_str(&s).ok());
        if let (Some(near), Some(ticket), Some(v)) = (&self.near, ticket, &view) {
            near.fill(ticket, v);
        }
        Ok(view)
    }

    async fn put_if_newer(&self, view: &ProfileView) -> Result<()> {
        self.put_many_if_newer(std::slice::from_ref(view)).await
    }

    /// One pipeline of compare-and-sets: one round trip for a whole projection batch.
    /// (`EVAL` rather than `EVALSHA`: Redis keeps the compiled script by its hash anyway,
    /// and a restarted Redis needs no reload.)
    async fn put_many_if_newer(&self, views: &[ProfileView]) -> Result<()> {
        if views.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for v in views {
            pipe.cmd("EVAL")
                .arg(PUT_IF_NEWER)
                .arg(1)
                .arg(format!("{KEY_PREFIX}{}", v.user_id))
                .arg(serde_json::to_string(v)?)
                .arg(v.version)
                .arg(self.settings.ttl.as_secs())
                .ignore();
        }
        let mut c = self.conn.clone();
        let result = self
            .timed(async move { pipe.query_async::<()>(&mut c).await })
            .await;
        // Whatever happened, this process's copy of these keys is no longer to be trusted;
        // Redis's own invalidation push for them may come after the reply.
        if let Some(near) = &self.near {
            near.invalidate(views.iter().map(|v| v.user_id));
        }
        result
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

    /// `SET NX PX`: one process per cold key loads it; the claim expires on its own if the
    /// holder dies. If Redis cannot be asked, load anyway (never fail a read over this).
    async fn claim_fill(&self, id: UserId) -> Option<String> {
        let token = uuid::Uuid::new_v4().simple().to_string();
        let mut c = self.conn.clone();
        let key = format!("{FILL_PREFIX}{id}");
        let t = token.clone();
        let set: Result<Option<String>> = self
            .timed(async move {
                redis::cmd("SET")
                    .arg(key)
                    .arg(t)
                    .arg("NX")
                    .arg("PX")
                    .arg(FILL_CLAIM.as_millis() as u64)
                    .query_async(&mut c)
                    .await
            })
            .await;
        match set {
            Ok(None) => None,
            Ok(Some(_)) | Err(_) => Some(token),
        }
    }

    async fn release_fill(&self, id: UserId, token: &str) {
        let mut c = self.conn.clone();
        let mut eval = redis::cmd("EVAL");
        eval.arg(RELEASE_FILL)
            .arg(1)
            .arg(format!("{FILL_PREFIX}{id}"))
            .arg(token);
        if let Err(e) = self
            .timed(async move { eval.query_async::<i64>(&mut c).await })
            .await
        {
            tracing::debug!(error = %format!("{e:#}"), "fill claim left to expire");
        }
    }

    async fn fill_pending(&self, id: UserId) -> bool {
        let mut c = self.conn.clone();
        let key = format!("{FILL_PREFIX}{id}");
        self.timed(async move {
            redis::cmd("EXISTS")
                .arg(key)
                .query_async::<bool>(&mut c)
                .await
        })
        .await
        .unwrap_or(false)
    }
}

/// Profiles cached in this process (embedded mode), with the same TTL semantics.
pub struct LocalCache {
    map: Mutex<TtlMap>,
}

impl LocalCache {
    pub fn new(ttl: Duration, max_entries: usize) -> Self {
        LocalCache {
            map: Mutex::new(TtlMap::new(ttl, max_entries)),
        }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, TtlMap>> {
        self.map
            .lock()
            .map_err(|_| anyhow::anyhow!("local cache poisoned"))
    }
}

#[async_trait::async_trait]
impl ProfileCache for LocalCache {
    async fn get(&self, id: UserId) -> Result<Option<ProfileView>> {
        Ok(self.lock()?.fresh(id).cloned())
    }

    async fn put_if_newer(&self, view: &ProfileView) -> Result<()> {
        let mut map = self.lock()?;
        if map
            .fresh(view.user_id)
            .is_some_and(|cur| cur.version >= view.version)
        {
            return Ok(());
        }
        map.insert(view);
        Ok(())
    }

    async fn clear(&self) -> Result<()> {
        self.lock()?.clear();
        Ok(())
    }

    fn is_process_local(&self) -> bool {
        true
    }
}

/// A profile store with a cache in front.
pub struct CachedProfiles {
    store: Arc<dyn ProfileStore>,
    cache: Arc<dyn ProfileCache>,
    /// One loader per cold key in this process.
    loading: commands::keyed::KeyedLocks<UserId>,
    /// Profiles written to the store whose cache entry is not refreshed yet, with what
    /// was written (the store's current value: the projection has one driver at a time,
    /// and the cache's compare-and-set discards it if another process wrote newer since).
    dirty: Mutex<HashMap<UserId, ProfileView>>,
    /// `dirty.len()`, readable without the lock on the read path.
    dirty_len: AtomicUsize,
}

impl CachedProfiles {
    pub fn new(store: Arc<dyn ProfileStore>, cache: Arc<dyn ProfileCache>) -> Self {
        CachedProfiles {
            store,
            cache,
            loading: commands::keyed::KeyedLocks::default(),
            dirty: Mutex::new(HashMap::new()),
            dirty_len: AtomicUsize::new(0),
        }
    }

    fn dirty(&self) -> Result<std::sync::MutexGuard<'_, HashMap<UserId, ProfileView>>> {
        self.dirty
            .lock()
            .map_err(|_| anyhow::anyhow!("dirty set poisoned"))
    }

    /// Remember `views` as written to the store but not yet refreshed in the cache.
    fn mark_dirty(&self, views: &[ProfileView]) -> Result<()> {
        let mut dirty = self.dirty()?;
        for v in views {
            match dirty.get(&v.user_id) {
                Some(cur) if cur.version >= v.version => {}
                _ => {
                    dirty.insert(v.user_id, v.clone());
                }
            }
        }
        self.dirty_len.store(dirty.len(), Ordering::Release);
        Ok(())
    }

    /// Read a cold key from the store and fill the cache, unless another process has
    /// claimed that load: then wait (up to [`FILL_WAIT`]) for its fill, and read the store
    /// only if none comes (the claimant found nothing, died, or is slow).
    async fn load_cold(&self, id: UserId) -> Result<Option<ProfileView>> {
        let claim = self.cache.claim_fill(id).await;
        if claim.is_none() {
            let deadline = Instant::now() + FILL_WAIT;
            loop {
                tokio::time::sleep(FILL_POLL).await;
                if let Some(v) = self.cached(id).await {
                    return Ok(Some(v));
                }
                if Instant::now() >= deadline || !self.cache.fill_pending(id).await {
                    break;
                }
            }
            if let Some(v) = self.cached(id).await {
                return Ok(Some(v));
            }
        }
        let loaded = self.store.get_fresh(id).await;
        if let Ok(Some(v)) = &loaded
            && let Err(e) = self.cache.put_if_newer(v).await
        {
            tracing::warn!(error = %format!("{e:#}"), "could not fill the profile cache");
        }
        if let Some(token) = claim {
            self.cache.release_fill(id, &token).await;
        }
        loaded
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
        // A profile this process wrote to the store but could not refresh in the cache:
        // the cache may hold an older version, the store is the truth.
        if self.dirty_len.load(Ordering::Acquire) > 0 && self.dirty()?.contains_key(&id) {
            return self.store.get(id).await;
        }
        match self.cache.get(id).await {
            Ok(Some(v)) => return Ok(Some(v)),
            Ok(None) => {}
            Err(e) => {
                // The cache is down or slow: this read has had its one timeout's worth of
                // waiting; no claim, no fill, straight to the store.
                tracing::warn!(error = %format!("{e:#}"), "profile cache unavailable; reading the store");
                return self.store.get(id).await;
            }
        }
        // One loader per key in this process; the others wait for it and then find the
        // cache warm. Across processes, one claim per key (see `load_cold`).
        self.loading
            .run(&id, async {
                if let Some(v) = self.cached(id).await {
                    return Ok(Some(v));
                }
                self.load_cold(id).await
            })
            .await
    }

    /// Only what the store accepted goes to the cache (a late, older event must not land
    /// in a cache whose entry for the newer one has expired), and it is refreshed, never
    /// just deleted, so that no reader can put back an older value.
    async fn upsert(&self, view: &ProfileView) -> Result<bool> {
        Ok(!self
            .upsert_many(std::slice::from_ref(view))
            .await?
            .is_empty())
    }

    /// Write the whole batch to the store first (a dead cache must not hold the read
    /// model back), then bring the cache entries of everything written up to the store.
    /// If the cache cannot be refreshed the batch fails, so the projector retries (and the
    /// checkpoint, and `projections status`, show the lag) until it can.
    ///
    /// A view the store turned away (it already holds that version or a newer one) is a
    /// re-applied batch: the process that stored it first may have failed to refresh the
    /// cache, so the cache is brought up to the store's current value for it too.
    async fn upsert_many(&self, views: &[ProfileView]) -> Result<Vec<ProfileView>> {
        let stored = self.store.upsert_many(views).await?;
        // Marked dirty before anything else is awaited: if this is cancelled from here on,
        // reads of these profiles go to the store until a later refresh succeeds.
        self.mark_dirty(&stored)?;
        let mut current = Vec::new();
        let accepted: std::collections::HashSet<UserId> =
            stored.iter().map(|v| v.user_id).collect();
        let turned_away: std::collections::BTreeSet<UserId> = views
            .iter()
            .map(|v| v.user_id)
            .filter(|id| !accepted.contains(id))
            .collect();
        for id in turned_away {
            if let Some(view) = self.store.get_fresh(id).await? {
                current.push(view);
            }
        }
        self.mark_dirty(&current)?;
        let pending: Vec<ProfileView> = self.dirty()?.values().cloned().collect();
        self.cache
            .put_many_if_newer(&pending)
            .await
            .with_context(|| format!("refreshing {} profile cache entries", pending.len()))?;
        let mut dirty = self.dirty()?;
        for v in &pending {
            if dirty
                .get(&v.user_id)
                .is_some_and(|cur| cur.version == v.version)
            {
                dirty.remove(&v.user_id);
            }
        }
        self.dirty_len.store(dirty.len(), Ordering::Release);
        Ok(stored)
    }

    async fn get_fresh(&self, id: UserId) -> Result<Option<ProfileView>> {
        self.store.get_fresh(id).await
    }

    async fn all(&self) -> Result<Vec<ProfileView>> {
        self.store.all().await
    }

    async fn begin_rebuild(&self) -> Result<RebuildTarget> {
        self.store.begin_rebuild().await
    }

    fn keeps_process_copies(&self) -> bool {
        self.cache.is_process_local()
    }

    /// Refresh (never just delete) the copies from the store, so that a reader that read
    /// the store before the other process's write cannot put the older value back.
    async fn heard_of_writes(&self, ids: &[UserId]) -> Result<()> {
        for id in ids {
            if let Some(current) = self.store.get_fresh(*id).await? {
                self.cache.put_if_newer(&current).await?;
            }
        }
        Ok(())
    }

    async fn finish_rebuild(&self, target: RebuildTarget) -> Result<()> {
        self.store.finish_rebuild(target).await?;
        // The new store holds the same versions (it is a fold of the same events), but a
        // clean cache costs little and removes any doubt.
        self.cache.clear().await
    }
}
