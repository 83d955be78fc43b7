//! `cargo run --release -p tests --bin bench` — throughput of the API against baselines
//! measured in the same run, on the same machine, at the same concurrency.
//!
//! * `PUT /profiles/{id}` through HTTP on Postgres vs a raw single-row INSERT into a table
//!   shaped like the events table (one sqlx pool, same concurrency).
//! * `GET /profiles/{id}` vs a bare axum handler returning a fixed JSON body of the same size.
//! * `POST /auth/register` (bound by Argon2id at the default parameters).
//!
//! Each figure is the median of `KARMIC_BENCH_RUNS` runs (default 5) of
//! `KARMIC_BENCH_SECS` seconds (default 3). Prints a Markdown report on stdout.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use tests::{Backend, PASSWORD, TestApp};

fn env_or<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Run `op(worker, i)` from `concurrency` tasks for `secs`; returns successful ops/s.
async fn rate<F, Fut>(concurrency: usize, secs: f64, op: F) -> f64
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

#[tokio::main]
async fn main() {
    let runs: usize = env_or("KARMIC_BENCH_RUNS", 5);
    let secs: f64 = env_or("KARMIC_BENCH_SECS", 3.0);
    let concurrency: usize = env_or("KARMIC_BENCH_CONCURRENCY", 16);
    eprintln!("bench: {runs} runs x {secs}s, concurrency {concurrency}");

    let app = Arc::new(
        TestApp::spawn_with(Backend::Postgres, |s| {
            s.argon2_memory_kib = 19 * 1024;
            s.argon2_iterations = 2;
            s.argon2_parallelism = 1;
            s.db_max_connections = 32;
        })
        .await,
    );
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency * 2)
        .build()
        .unwrap();

    // One user per worker, each editing their own profile.
    let mut users = Vec::new();
    for w in 0..concurrency {
        users.push(app.signed_up(&format!("bench{w}@example.com")).await);
    }
    let users = Arc::new(users);

    // Baseline for writes: a raw single-row INSERT into an events-shaped table.
    let pool = match &app.store {
        commands::Database::Postgres(p) => p.clone(),
        commands::Database::Sqlite(_) => unreachable!(),
    };
    sqlx::query(
        "CREATE TABLE bench_rows (LIKE events INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let payload = json!({"ProfileUpdated": {"display_name": "Bench", "bio": "x", "avatar_url": null, "location": null, "website": null}});
    let mut put_rates = Vec::new();
    let mut insert_rates = Vec::new();
    let seq = Arc::new(AtomicU64::new(0));
    for run in 0..runs {
        let (c, u, a) = (client.clone(), users.clone(), app.clone());
        let put = rate(concurrency, secs, move |w, i| {
            let (c, u, a) = (c.clone(), u.clone(), a.clone());
            async move {
                let (id, token) = &u[w];
                c.put(a.url(&format!("/profiles/{id}")))
                    .bearer_auth(token)
                    .json(&json!({"display_name": format!("Bench {run} {i}"), "bio": "x"}))
                    .send()
                    .await
                    .map(|r| r.status() == 200)
                    .unwrap_or(false)
            }
        })
        .await;
        let (p, pl, s) = (pool.clone(), payload.clone(), seq.clone());
        let insert = rate(concurrency, secs, move |w, _| {
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
                .is_ok()
            }
        })
        .await;
        eprintln!("run {run}: PUT {put:.0}/s, INSERT {insert:.0}/s");
        put_rates.push(put);
        insert_rates.push(insert);
    }

    // Reads: the real GET vs a bare axum handler with a body of the same size.
    let (id0, token0) = users[0].clone();
    let sample = client
        .get(app.url(&format!("/profiles/{id0}")))
        .bearer_auth(&token0)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let fixed = sample.clone();
    let bare = axum::Router::new().route(
        "/fixed",
        axum::routing::get(move || {
            let body = fixed.clone();
            async move {
                (
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    body,
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let bare_addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, bare).await.unwrap() });
    let mut get_rates = Vec::new();
    let mut bare_rates = Vec::new();
    for run in 0..runs {
        let (c, u, a) = (client.clone(), users.clone(), app.clone());
        let get = rate(concurrency, secs, move |w, _| {
            let (c, u, a) = (c.clone(), u.clone(), a.clone());
            async move {
                let (id, token) = &u[w];
                match c
                    .get(a.url(&format!("/profiles/{id}")))
                    .bearer_auth(token)
                    .send()
                    .await
                {
                    Ok(r) => r.status() == 200 && r.bytes().await.is_ok(),
                    Err(_) => false,
                }
            }
        })
        .await;
        let c = client.clone();
        let bare = rate(concurrency, secs, move |_, _| {
            let c = c.clone();
            async move {
                match c.get(format!("http://{bare_addr}/fixed")).send().await {
                    Ok(r) => r.status() == 200 && r.bytes().await.is_ok(),
                    Err(_) => false,
                }
            }
        })
        .await;
        eprintln!("run {run}: GET {get:.0}/s, bare {bare:.0}/s");
        get_rates.push(get);
        bare_rates.push(bare);
    }

    // Registration, bound by Argon2id.
    let mut reg_rates = Vec::new();
    let counter = Arc::new(AtomicU64::new(0));
    for run in 0..runs {
        let (c, a, n) = (client.clone(), app.clone(), counter.clone());
        let reg = rate(concurrency, secs, move |_, _| {
            let (c, a, n) = (c.clone(), a.clone(), n.clone());
            async move {
                let k = n.fetch_add(1, Ordering::Relaxed);
                c.post(a.url("/auth/register"))
                    .json(&json!({"email": format!("r{k}@example.com"), "password": PASSWORD, "display_name": "R"}))
                    .send()
                    .await
                    .map(|r| r.status() == 201)
                    .unwrap_or(false)
            }
        })
        .await;
        eprintln!("run {run}: register {reg:.1}/s");
        reg_rates.push(reg);
    }

    let (put, insert) = (median(put_rates.clone()), median(insert_rates.clone()));
    let (get, bare) = (median(get_rates.clone()), median(bare_rates.clone()));
    let reg = median(reg_rates.clone());
    let fmt = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("| Measure | Median ops/s | Baseline (same run) | Ratio | Target | Runs (ops/s) |");
    println!("|---|---:|---:|---:|---|---|");
    println!(
        "| `PUT /profiles/{{id}}` (HTTP, Postgres) vs raw single-row INSERT | {put:.0} | {insert:.0} | {:.0}% | ≥ 50% | {} / {} |",
        100.0 * put / insert,
        fmt(&put_rates),
        fmt(&insert_rates)
    );
    println!(
        "| `GET /profiles/{{id}}` vs bare axum handler ({} B body) | {get:.0} | {bare:.0} | {:.0}% | ≥ 50% | {} / {} |",
        sample.len(),
        100.0 * get / bare,
        fmt(&get_rates),
        fmt(&bare_rates)
    );
    println!(
        "| `POST /auth/register` (Argon2id m=19456 KiB, t=2, p=1) | {reg:.1} | – | – | – | {} |",
        reg_rates
            .iter()
            .map(|x| format!("{x:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
}
