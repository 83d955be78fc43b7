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
use tests::bench::{RawInsert, bare_handler, bare_rate, env_or, median, rate};
use tests::{Backend, PASSWORD, TestApp};

/// This process's resident memory in MiB (Linux), printed after each phase so that a
/// phase that grows memory shows up.
fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
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
    let users = users_of(&app, "bench", concurrency).await;

    // Baseline for writes: a raw single-row INSERT into an events-shaped table.
    let raw_insert = RawInsert::on(&app.store).await;
    let mut put_rates = Vec::new();
    let mut insert_rates = Vec::new();
    for run in 0..runs {
        let put = put_rate(
            app.clone(),
            users.clone(),
            client.clone(),
            concurrency,
            secs,
            run,
        )
        .await;
        let insert = raw_insert.rate(concurrency, secs).await;
        eprintln!(
            "run {run}: PUT {put:.0}/s, INSERT {insert:.0}/s (RSS {:.0} MiB)",
            rss_mib()
        );
        put_rates.push(put);
        insert_rates.push(insert);
    }

    // Where the write time goes: the same PUTs with the read-your-writes wait switched off
    // (read models projected by the background loop only).
    let background = Arc::new(
        TestApp::spawn_with(Backend::Postgres, |s| {
            s.read_your_writes = Duration::ZERO;
            s.db_max_connections = 32;
        })
        .await,
    );
    let bg_users = users_of(&background, "bg", concurrency).await;
    let mut bg_rates = Vec::new();
    for run in 0..runs {
        let put = put_rate(
            background.clone(),
            bg_users.clone(),
            client.clone(),
            concurrency,
            secs,
            run,
        )
        .await;
        eprintln!(
            "run {run}: PUT without read-your-writes wait {put:.0}/s (RSS {:.0} MiB)",
            rss_mib()
        );
        bg_rates.push(put);
    }
    drop(background);

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
    let bare_addr = bare_handler(sample.clone()).await;
    // The embedded configuration (SQLite, in-process profile cache), same load.
    let embedded = Arc::new(TestApp::spawn(Backend::Sqlite).await);
    let embedded_users = users_of(&embedded, "e", concurrency).await;
    let mut embedded_rates = Vec::new();
    let mut get_rates = Vec::new();
    let mut bare_rates = Vec::new();
    for run in 0..runs {
        let emb = get_rate(
            embedded.clone(),
            embedded_users.clone(),
            client.clone(),
            concurrency,
            secs,
        )
        .await;
        eprintln!(
            "run {run}: embedded GET {emb:.0}/s (RSS {:.0} MiB)",
            rss_mib()
        );
        embedded_rates.push(emb);
        let get = get_rate(
            app.clone(),
            users.clone(),
            client.clone(),
            concurrency,
            secs,
        )
        .await;
        let bare = bare_rate(client.clone(), bare_addr, concurrency, secs).await;
        eprintln!(
            "run {run}: GET {get:.0}/s, bare {bare:.0}/s (RSS {:.0} MiB)",
            rss_mib()
        );
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
        eprintln!("run {run}: register {reg:.1}/s (RSS {:.0} MiB)", rss_mib());
        reg_rates.push(reg);
    }

    let read_models = read_model_bench(runs, secs, concurrency, &client, bare_addr).await;

    let (put, insert) = (median(put_rates.clone()), median(insert_rates.clone()));
    let (get, bare) = (median(get_rates.clone()), median(bare_rates.clone()));
    let reg = median(reg_rates.clone());
    let emb = median(embedded_rates.clone());
    let bg = median(bg_rates.clone());
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
        "| `PUT /profiles/{{id}}` with `KARMIC_READ_YOUR_WRITES_MS=0` vs raw INSERT | {bg:.0} | {insert:.0} | {:.0}% | – | {} |",
        100.0 * bg / insert,
        fmt(&bg_rates)
    );
    println!(
        "| `GET /profiles/{{id}}` embedded (SQLite + in-process cache) vs bare axum handler | {emb:.0} | {bare:.0} | {:.0}% | ≥ 50% | {} / {} |",
        100.0 * emb / bare,
        fmt(&embedded_rates),
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
    println!();
    println!("{read_models}");
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// `PUT /profiles/{id}` from each worker on its own profile.
async fn put_rate(
    app: Arc<TestApp>,
    users: Arc<Vec<(String, String)>>,
    client: reqwest::Client,
    concurrency: usize,
    secs: f64,
    run: usize,
) -> f64 {
    rate(concurrency, secs, move |w, i| {
        let (c, u, a) = (client.clone(), users.clone(), app.clone());
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
    .await
}

/// One signed-up user per worker on `app`, as (id, token).
async fn users_of(app: &TestApp, prefix: &str, concurrency: usize) -> Arc<Vec<(String, String)>> {
    let mut users = Vec::new();
    for w in 0..concurrency {
        users.push(app.signed_up(&format!("{prefix}{w}@example.com")).await);
    }
    Arc::new(users)
}

async fn get_rate(
    app: Arc<TestApp>,
    users: Arc<Vec<(String, String)>>,
    client: reqwest::Client,
    concurrency: usize,
    secs: f64,
) -> f64 {
    rate(concurrency, secs, move |w, _| {
        let (c, u, a) = (client.clone(), users.clone(), app.clone());
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
    .await
}

/// The AWS read side: DocumentDB (SecantusDB) behind Redis. Projection lag under a steady
/// write load, cached and uncached reads against the bare handler, rebuild speed.
async fn read_model_bench(
    runs: usize,
    secs: f64,
    concurrency: usize,
    client: &reqwest::Client,
    bare_addr: std::net::SocketAddr,
) -> String {
    let mongo_url = tests::mongodb_url();
    let redis_url = tests::redis_url();
    // `near`: None = no Redis; Some(n) = Redis with an n-entry in-process copy (0 = off).
    let with = |near: Option<usize>| {
        let (m, r) = (mongo_url.clone(), redis_url.clone());
        move |s: &mut handlers::Settings| {
            s.mongodb_url = Some(m.into());
            s.mongodb_database = format!("karmic_bench_{}", uuid::Uuid::new_v4().simple());
            if let Some(n) = near {
                s.redis_url = Some(r.into());
                s.redis_near_cache_entries = n;
            }
            s.db_max_connections = 32;
        }
    };
    let cached_app = Arc::new(TestApp::spawn_with(Backend::Postgres, with(Some(10_000))).await);
    let redis_only_app = Arc::new(TestApp::spawn_with(Backend::Postgres, with(Some(0))).await);
    let uncached_app = Arc::new(TestApp::spawn_with(Backend::Postgres, with(None)).await);
    let users = users_of(&cached_app, "rm", concurrency).await;
    let users_redis_only = users_of(&redis_only_app, "rm", concurrency).await;
    let users_uncached = users_of(&uncached_app, "rm", concurrency).await;

    // Projection lag under a steady load: each worker sends one PUT every 50 ms.
    let steady_rate = concurrency as f64 * 20.0;
    let (c, u, a) = (client.clone(), users.clone(), cached_app.clone());
    let done = rate(concurrency, secs * runs as f64, move |w, i| {
        let (c, u, a) = (c.clone(), u.clone(), a.clone());
        async move {
            let t = Instant::now();
            let (id, token) = &u[w];
            let ok = c
                .put(a.url(&format!("/profiles/{id}")))
                .bearer_auth(token)
                .json(&json!({"display_name": format!("Steady {i}")}))
                .send()
                .await
                .map(|r| r.status() == 200)
                .unwrap_or(false);
            if let Some(rest) = Duration::from_millis(50).checked_sub(t.elapsed()) {
                tokio::time::sleep(rest).await;
            }
            ok
        }
    })
    .await;
    let lags = cached_app.runtime_projector.recent_lags_ms("profiles");
    let (p50, p99) = (
        percentile(lags.clone(), 0.5),
        percentile(lags.clone(), 0.99),
    );
    eprintln!(
        "steady load {done:.0} PUT/s: lag p50 {p50:.1} ms, p99 {p99:.1} ms over {} events",
        lags.len()
    );

    let mut cached_rates = Vec::new();
    let mut redis_only_rates = Vec::new();
    let mut uncached_rates = Vec::new();
    let mut bare_rates = Vec::new();
    for run in 0..runs {
        let cached = get_rate(
            cached_app.clone(),
            users.clone(),
            client.clone(),
            concurrency,
            secs,
        )
        .await;
        let redis_only = get_rate(
            redis_only_app.clone(),
            users_redis_only.clone(),
            client.clone(),
            concurrency,
            secs,
        )
        .await;
        let uncached = get_rate(
            uncached_app.clone(),
            users_uncached.clone(),
            client.clone(),
            concurrency,
            secs,
        )
        .await;
        let bare = bare_rate(client.clone(), bare_addr, concurrency, secs).await;
        eprintln!(
            "run {run}: cached GET {cached:.0}/s, Redis-only GET {redis_only:.0}/s, DocumentDB GET {uncached:.0}/s, bare {bare:.0}/s"
        );
        cached_rates.push(cached);
        redis_only_rates.push(redis_only);
        uncached_rates.push(uncached);
        bare_rates.push(bare);
    }

    // Rebuild speed: 100,000 profile events (1,000 profiles x 100 versions), inserted
    // directly as stored events, then rebuilt into a new DocumentDB collection.
    let pool = match &cached_app.store {
        commands::Database::Postgres(p) => p.clone(),
        commands::Database::Sqlite(_) => unreachable!(),
    };
    let n_profiles: i64 = env_or("KARMIC_BENCH_REBUILD_PROFILES", 1000);
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         SELECT 'profile', ids.id::text, s,
                CASE WHEN s = 1 THEN 'ProfileCreated' ELSE 'ProfileUpdated' END, '1.0',
                CASE WHEN s = 1
                     THEN json_build_object('ProfileCreated', json_build_object('user_id', ids.id, 'display_name', 'P'))
                     ELSE json_build_object('ProfileUpdated', json_build_object('display_name', 'P' || s, 'bio', 'bio ' || s,
                          'avatar_url', null, 'location', 'Lisbon', 'website', null)) END,
                '{}'::json
           FROM (SELECT gen_random_uuid() AS id FROM generate_series(1, $1)) ids,
                generate_series(1, 100) s",
    )
    .bind(n_profiles)
    .execute(&pool)
    .await
    .unwrap();
    let rt = tests::runtime_like(&cached_app).await;
    let t = Instant::now();
    let n = projections::ops::rebuild_profiles(
        &rt.projector,
        rt.state.profile_reader.clone(),
        &|_, _| {},
    )
    .await
    .unwrap();
    let rebuild_secs = t.elapsed().as_secs_f64();
    let diffs =
        projections::ops::verify_profiles(&**rt.projector.feed(), &*rt.state.profile_reader)
            .await
            .unwrap();
    assert!(
        diffs.is_empty(),
        "rebuild produced differences: {}",
        diffs.len()
    );
    eprintln!(
        "rebuild: {n} events in {rebuild_secs:.1}s (RSS {:.0} MiB)",
        rss_mib()
    );

    let redis_only = median(redis_only_rates.clone());
    let (cached, uncached, bare) = (
        median(cached_rates.clone()),
        median(uncached_rates.clone()),
        median(bare_rates.clone()),
    );
    let fmt = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out = String::new();
    out += "| Read side (DocumentDB = SecantusDB, Redis) | Median | Baseline (same run) | Ratio | Target | Runs |\n";
    out += "|---|---:|---:|---:|---|---|\n";
    out += &format!(
        "| Projection lag (commit → DocumentDB + Redis), {steady_rate:.0} PUT/s offered, {done:.0}/s served | p50 {p50:.1} ms, p99 {p99:.1} ms | – | – | p99 < 100 ms | {} events |\n",
        lags.len()
    );
    out += &format!(
        "| Cached `GET /profiles/{{id}}` (Redis + its in-process near cache, the default) vs bare axum handler | {cached:.0}/s | {bare:.0}/s | {:.0}% | ≥ 50% | {} / {} |\n",
        100.0 * cached / bare,
        fmt(&cached_rates),
        fmt(&bare_rates)
    );
    out += &format!(
        "| Cached `GET /profiles/{{id}}`, Redis only (`KARMIC_REDIS_NEAR_CACHE_ENTRIES=0`) vs bare | {redis_only:.0}/s | {bare:.0}/s | {:.0}% | – | {} |\n",
        100.0 * redis_only / bare,
        fmt(&redis_only_rates)
    );
    out += &format!(
        "| Uncached `GET /profiles/{{id}}` (DocumentDB, no Redis) vs bare | {uncached:.0}/s | {bare:.0}/s | {:.0}% | – | {} |\n",
        100.0 * uncached / bare,
        fmt(&uncached_rates)
    );
    out += &format!(
        "| Rebuild of `profiles` into a new DocumentDB collection | {:.0} events/s | – | – | – | {n} events in {rebuild_secs:.1} s |\n",
        n as f64 / rebuild_secs
    );
    out
}
