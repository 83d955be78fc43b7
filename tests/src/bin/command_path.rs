//! `cargo run --release -p tests --bin command_path` — the command path at C=1 and C=16,
//! against baselines measured in the same run at the same concurrency:
//!
//! * `PUT /profiles/{id}` (read-your-writes on, Postgres, no Redis), in two modes:
//!   **fresh histories** (each request picks one of `KARMIC_BENCH_AGGREGATES`, default
//!   300, profiles at random) and **one aggregate per client**;
//! * a raw single-row `INSERT` into an events-shaped table (the write baseline);
//! * `GET /profiles/{id}` on Postgres without Redis, over the same 300 profiles;
//! * a bare axum handler returning a body of the same size (the read baseline).
//!
//! The server runs as a user runs it: a log subscriber at `info` (to a file, so that the
//! terminal is not the bottleneck). Each figure is the median of `KARMIC_BENCH_RUNS`
//! (default 5) runs of `KARMIC_BENCH_SECS` (default 3) seconds; the runs are listed too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::sync::Arc;

use serde_json::json;
use tests::bench::{RawInsert, bare_handler, bare_rate, env_or, median, rate};
use tests::{Backend, TestApp};

struct Row {
    what: String,
    runs: Vec<f64>,
}

impl Row {
    fn median(&self) -> f64 {
        median(self.runs.clone())
    }

    fn spread(&self) -> String {
        let lo = self.runs.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = self.runs.iter().copied().fold(0.0, f64::max);
        format!("{lo:.0}–{hi:.0}")
    }
}

#[tokio::main]
async fn main() {
    let runs: usize = env_or("KARMIC_BENCH_RUNS", 5);
    let secs: f64 = env_or("KARMIC_BENCH_SECS", 3.0);
    let aggregates: usize = env_or("KARMIC_BENCH_AGGREGATES", 300);
    let log = tempfile::NamedTempFile::new().unwrap();
    let writer = std::sync::Mutex::new(log.reopen().unwrap());
    // `KARMIC_BENCH_SPANS=FILE`: log every span's busy and idle time to FILE instead (a
    // profile of where a request's time goes; it slows the run).
    let spans = std::env::var("KARMIC_BENCH_SPANS").ok();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "info,sqlx=warn,tower_http=info",
        ))
        .compact();
    match &spans {
        Some(path) => builder
            .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
            .with_writer(std::sync::Mutex::new(std::fs::File::create(path).unwrap()))
            .init(),
        None => builder.with_writer(writer).init(),
    }
    eprintln!("command path: {runs} runs x {secs}s; {aggregates} aggregates; info logs to a file");

    let app = Arc::new(
        TestApp::spawn_with(Backend::Postgres, |s| {
            // Hashing is not what this measures; the real cost is in bench.rs.
            s.argon2_memory_kib = 1024;
            s.argon2_iterations = 1;
            s.db_max_connections = 32;
        })
        .await,
    );
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .unwrap();
    let mut users = Vec::new();
    for i in 0..aggregates {
        users.push(app.signed_up(&format!("cp{i}@example.com")).await);
    }
    let users = Arc::new(users);
    let raw_insert = RawInsert::on(&app.store).await;

    // The bare handler, with a body the size of a real profile.
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

    let mut table = Vec::new();
    for concurrency in [1usize, 16] {
        let mut rows: Vec<Row> = [
            "raw single-row INSERT",
            "PUT, fresh histories (random of N)",
            "PUT, one aggregate per client",
            "bare axum handler",
            "GET /profiles/{id}, Postgres, no Redis",
        ]
        .iter()
        .map(|w| Row {
            what: (*w).to_owned(),
            runs: Vec::new(),
        })
        .collect();
        for run in 0..runs {
            rows[0].runs.push(raw_insert.rate(concurrency, secs).await);
            for (row, fresh) in [(1, true), (2, false)] {
                let (c, u, a) = (client.clone(), users.clone(), app.clone());
                rows[row].runs.push(
                    rate(concurrency, secs, move |w, i| {
                        let (c, u, a) = (c.clone(), u.clone(), a.clone());
                        async move {
                            let k = if fresh {
                                rand::random_range(0..u.len())
                            } else {
                                w % u.len()
                            };
                            let (id, token) = &u[k];
                            c.put(a.url(&format!("/profiles/{id}")))
                                .bearer_auth(token)
                                .json(&json!({"display_name": format!("Bench {run} {i}"), "bio": "x"}))
                                .send()
                                .await
                                .map(|r| r.status() == 200)
                                .unwrap_or(false)
                        }
                    })
                    .await,
                );
            }
            rows[3]
                .runs
                .push(bare_rate(client.clone(), bare_addr, concurrency, secs).await);
            let (c, u, a) = (client.clone(), users.clone(), app.clone());
            rows[4].runs.push(
                rate(concurrency, secs, move |_, _| {
                    let (c, u, a) = (c.clone(), u.clone(), a.clone());
                    async move {
                        let (id, token) = &u[rand::random_range(0..u.len())];
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
                .await,
            );
            eprintln!(
                "C={concurrency} run {run}: {}",
                rows.iter()
                    .map(|r| format!("{} {:.0}", r.what, r.runs[run]))
                    .collect::<Vec<_>>()
                    .join(" | ")
            );
        }
        table.push((concurrency, rows));
    }

    println!("| Measure | C=1 median (spread) | C=16 median (spread) |");
    println!("|---|---:|---:|");
    for i in 0..table[0].1.len() {
        let cells: Vec<String> = table
            .iter()
            .map(|(_, rows)| format!("{:.0} ({})", rows[i].median(), rows[i].spread()))
            .collect();
        println!("| {} | {} |", table[0].1[i].what, cells.join(" | "));
    }
    println!();
    for (c, rows) in &table {
        let insert = rows[0].median();
        let bare = rows[3].median();
        println!(
            "C={c}: PUT fresh = {:.0}% of raw INSERT, one-per-client = {:.0}%; GET = {:.0}% of bare",
            100.0 * rows[1].median() / insert,
            100.0 * rows[2].median() / insert,
            100.0 * rows[4].median() / bare
        );
    }
    drop(log);
}
