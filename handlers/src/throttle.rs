//! Abuse controls: failed-login throttling, per-client request rate limiting, and the
//! request timeout.
//!
//! - **Failed logins** are counted per account (canonical email) and per client address in
//!   a fixed window; an attempt counts as failed from the moment it is let through until
//!   it succeeds, so concurrent guesses cannot slip past the limit together. Once either
//!   count reaches its limit, further attempts are refused with 429 and `Retry-After`
//!   *before* any password is hashed, so a guessing attack costs us nothing but a map
//!   lookup. A successful sign-in clears its account's count. The
//!   counts are per process: in `karmic serve` that is the whole system; in AWS each
//!   Lambda container counts for itself, behind API Gateway's throttling.
//! - **Request rate per client** (`karmic serve` only; API Gateway does it in AWS): the
//!   `governor` crate's keyed GCRA limiter, by peer address.
//! - **Request timeout**: a request that runs longer is answered 503 with `Retry-After`
//!   and its handler is dropped (everything after a commit is driven from the event store,
//!   so dropping is safe).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::problem::ApiError;

/// Limits on failed sign-ins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginLimits {
    /// Failures allowed per account in a window (0: no limit).
    pub per_account: u32,
    /// Failures allowed per client address in a window (0: no limit).
    pub per_client: u32,
    pub window: Duration,
}

impl Default for LoginLimits {
    fn default() -> Self {
        LoginLimits {
            per_account: 5,
            per_client: 20,
            window: Duration::from_secs(300),
        }
    }
}

/// The most keys a failure table keeps; beyond it, expired windows are dropped first and
/// then, if still full, the whole table (a flood of distinct keys must not grow memory).
const MAX_KEYS: usize = 100_000;

#[derive(Default)]
struct Windows {
    map: HashMap<String, (u32, Instant)>,
}

impl Windows {
    fn blocked_for(&mut self, key: &str, limit: u32, window: Duration) -> Option<Duration> {
        if limit == 0 {
            return None;
        }
        let (count, started) = *self.map.get(key)?;
        let age = started.elapsed();
        if age >= window {
            self.map.remove(key);
            return None;
        }
        (count >= limit).then(|| window - age)
    }

    fn fail(&mut self, key: &str, window: Duration) {
        if self.map.len() >= MAX_KEYS && !self.map.contains_key(key) {
            self.map.retain(|_, (_, t)| t.elapsed() < window);
            if self.map.len() >= MAX_KEYS {
                self.map.clear();
            }
        }
        let e = self
            .map
            .entry(key.to_owned())
            .or_insert((0, Instant::now()));
        if e.1.elapsed() >= window {
            *e = (0, Instant::now());
        }
        e.0 = e.0.saturating_add(1);
    }
}

/// Failed sign-ins per account and per client address.
pub struct LoginThrottle {
    limits: LoginLimits,
    accounts: Mutex<Windows>,
    clients: Mutex<Windows>,
}

impl LoginThrottle {
    pub fn new(limits: LoginLimits) -> Self {
        LoginThrottle {
            limits,
            accounts: Mutex::default(),
            clients: Mutex::default(),
        }
    }

    /// Refuse (429) if the account or the client has used up its failures; otherwise
    /// count this attempt as a failure until it is known to have succeeded. Counting it up
    /// front, under the same lock as the check, is what keeps a burst of concurrent guesses
    /// from all passing the check before the first of them has failed.
    pub fn attempt(&self, account: &str, client: Option<IpAddr>) -> Result<(), ApiError> {
        let w = self.limits.window;
        let (mut accounts, mut clients) = match (self.accounts.lock(), self.clients.lock()) {
            (Ok(a), Ok(c)) => (a, c),
            // A poisoned table only costs the throttling.
            _ => return Ok(()),
        };
        let client_key = client.map(|ip| ip.to_string());
        let account_wait = accounts.blocked_for(account, self.limits.per_account, w);
        let client_wait = client_key
            .as_deref()
            .and_then(|k| clients.blocked_for(k, self.limits.per_client, w));
        if let Some(wait) = account_wait.max(client_wait) {
            tracing::warn!(client = ?client, "sign-in refused: too many failed attempts");
            return Err(ApiError::TooManyRequests {
                detail: "too many failed sign-in attempts; try again later".to_owned(),
                retry_after: wait.as_secs().max(1),
            });
        }
        if self.limits.per_account > 0 {
            accounts.fail(account, w);
        }
        if let Some(k) = client_key.as_deref()
            && self.limits.per_client > 0
        {
            clients.fail(k, w);
        }
        Ok(())
    }

    /// The attempt succeeded: the account's count starts again, and the client's loses
    /// this attempt.
    pub fn succeeded(&self, account: &str, client: Option<IpAddr>) {
        if let Ok(mut m) = self.accounts.lock() {
            m.map.remove(account);
        }
        if let (Some(ip), Ok(mut m)) = (client, self.clients.lock())
            && let Some(e) = m.map.get_mut(&ip.to_string())
        {
            e.0 = e.0.saturating_sub(1);
        }
    }

    /// The attempt was not decided (the server was busy): it does not count.
    pub fn undecided(&self, account: &str, client: Option<IpAddr>) {
        if let Ok(mut m) = self.accounts.lock()
            && let Some(e) = m.map.get_mut(account)
        {
            e.0 = e.0.saturating_sub(1);
        }
        if let (Some(ip), Ok(mut m)) = (client, self.clients.lock())
            && let Some(e) = m.map.get_mut(&ip.to_string())
        {
            e.0 = e.0.saturating_sub(1);
        }
    }
}

/// The client's address: the TCP peer (`karmic serve`) or API Gateway's source IP
/// (Lambda). `None` when neither is known.
pub struct ClientAddr(pub Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        if let Some(ConnectInfo(addr)) = parts.extensions.get::<ConnectInfo<SocketAddr>>() {
            return Ok(ClientAddr(Some(addr.ip())));
        }
        if let Some(lambda_http::request::RequestContext::ApiGatewayV2(ctx)) =
            parts
                .extensions
                .get::<lambda_http::request::RequestContext>()
        {
            return Ok(ClientAddr(
                ctx.http.source_ip.as_deref().and_then(|s| s.parse().ok()),
            ));
        }
        Ok(ClientAddr(None))
    }
}

/// Requests per second and burst per client address.
pub type ClientLimiter = Arc<DefaultKeyedRateLimiter<IpAddr>>;

/// A per-client limiter, or `None` when `per_second` is 0 (off).
pub fn client_limiter(per_second: u32, burst: u32) -> Option<ClientLimiter> {
    let rate = NonZeroU32::new(per_second)?;
    let burst = NonZeroU32::new(burst.max(1)).unwrap_or(rate);
    Some(Arc::new(RateLimiter::keyed(
        Quota::per_second(rate).allow_burst(burst),
    )))
}

/// Middleware: 429 with `Retry-After` once a client exceeds its rate.
pub async fn limit_clients(
    State(limiter): State<ClientLimiter>,
    ClientAddr(ip): ClientAddr,
    req: Request,
    next: Next,
) -> Response {
    if let Some(ip) = ip
        && let Err(not_until) = limiter.check_key(&ip)
    {
        let wait = not_until.wait_time_from(governor::clock::Clock::now(
            &governor::clock::DefaultClock::default(),
        ));
        return ApiError::TooManyRequests {
            detail: "request rate limit exceeded".to_owned(),
            retry_after: wait.as_secs_f64().ceil().max(1.0) as u64,
        }
        .into_response();
    }
    next.run(req).await
}

/// Middleware: answer 503 with `Retry-After` when a request takes longer than the limit.
pub async fn time_out(State(limit): State<Duration>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(res) => res,
        Err(_) => ApiError::Overloaded {
            detail: format!("the request took longer than {} ms", limit.as_millis()),
            retry_after: 1,
        }
        .into_response(),
    }
}
