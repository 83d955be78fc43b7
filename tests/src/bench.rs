//! Helpers shared by the benchmark binaries (`bench`, `command_path`, `login_burst`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// `k` from the environment, parsed, or `d`.
pub fn env_or<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Run `op(worker, i)` from `concurrency` tasks for `secs`; returns successful ops/s.
pub async fn rate<F, Fut>(concurrency: usize, secs: f64, op: F) -> f64
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let op = Arc::new(op);
    let ok = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let (op, ok) = (op.clone(), ok.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while Instant::now() < deadline {
                if op(w, i).await {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    ok.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// A bare axum handler answering `body` as JSON on a listener of its own (the read
/// baseline); returns its address.
pub async fn bare_handler(body: axum::body::Bytes) -> std::net::SocketAddr {
    let bare = axum::Router::new().route(
        "/fixed",
        axum::routing::get(move || {
            let body = body.clone();
            async move {
                (
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    body,
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, bare).await.unwrap() });
    addr
}

/// The write baseline: a raw single-row `INSERT` (autocommit) into `bench_rows`, a copy of
/// the `events` table, through the same kind of pool.
pub struct RawInsert {
    pool: sqlx::PgPool,
    payload: serde_json::Value,
    seq: Arc<AtomicU64>,
}

impl RawInsert {
    /// Create `bench_rows` beside `events` on `store` (a Postgres test database).
    pub async fn on(store: &commands::Database) -> RawInsert {
        let pool = match store {
            commands::Database::Postgres(p) => p.clone(),
            commands::Database::Sqlite(_) => panic!("the INSERT baseline needs Postgres"),
        };
        sqlx::query("CREATE TABLE bench_rows (LIKE events INCLUDING ALL)")
            .execute(&pool)
            .await
            .unwrap();
        RawInsert {
            pool,
            payload: serde_json::json!({"ProfileUpdated": {"display_name": "Bench", "bio": "x", "avatar_url": null, "location": null, "website": null}}),
            seq: Arc::default(),
        }
    }

    /// INSERTs per second from `concurrency` tasks for `secs`.
    pub async fn rate(&self, concurrency: usize, secs: f64) -> f64 {
        let (p, pl, s) = (self.pool.clone(), self.payload.clone(), self.seq.clone());
        rate(concurrency, secs, move |w, _| {
            let (p, pl, s) = (p.clone(), pl.clone(), s.clone());
            async move {
                let n = s.fetch_add(1, Ordering::Relaxed) as i64;
                sqlx::query(
                    "INSERT INTO bench_rows (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
                     VALUES ('profile', $1, $2, 'ProfileUpdated', '1.0', $3, '{}')",
                )
                .bind(format!("w{w}"))
                .bind(n)
                .bind(&pl)
                .execute(&p)
                .await
                .map_err(|e| eprintln!("baseline insert failed: {e}"))
                .is_ok()
            }
        })
        .await
    }
}

/// Requests per second to the bare handler at `addr` (see [`bare_handler`]).
pub async fn bare_rate(
    client: reqwest::Client,
    addr: std::net::SocketAddr,
    concurrency: usize,
    secs: f64,
) -> f64 {
    rate(concurrency, secs, move |_, _| {
        let c = client.clone();
        async move {
            match c.get(format!("http://{addr}/fixed")).send().await {
                Ok(r) => r.status() == 200 && r.bytes().await.is_ok(),
                Err(_) => false,
            }
        }
    })
    .await
}
