//! `cargo run --release -p tests --bin audit_bench` — the auditor's commands on a large
//! history (issue 10), against `COPY events TO STDOUT` on the same table in the same run:
//!
//! * `KARMIC_BENCH_EVENTS` (default 1,000,000) profile events (10,000 profiles x 100
//!   versions, ~300 bytes of payload each) are inserted as stored events without a hash,
//!   then chained by the migration's backfill (its throughput is reported too);
//! * `events export` (JSON Lines into a byte-counting sink, the same code as the CLI),
//!   `events verify`, and `COPY events TO STDOUT` (read to the end by this process), each
//!   `KARMIC_BENCH_RUNS` (default 3) times; medians and every run;
//! * peak memory: the process's high-water mark (VmHWM) after a quarter of the history
//!   has been exported and verified, then after the whole of it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::io::Write;
use std::time::Instant;

use commands::Database;
use commands::audit::{self, EventFilter, Order};
use futures::TryStreamExt;
use tests::bench::{env_or, median};
use tests::{Backend, TestDb};

/// Counts what is written to it.
struct Counting(u64);

impl Write for Counting {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

async fn insert(pool: &sqlx::PgPool, profiles: i64, versions: i64) {
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         SELECT 'profile', ids.id::text, s,
                CASE WHEN s = 1 THEN 'ProfileCreated' ELSE 'ProfileUpdated' END, '1.0',
                CASE WHEN s = 1
                     THEN json_build_object('ProfileCreated', json_build_object('user_id', ids.id, 'display_name', 'P'))
                     ELSE json_build_object('ProfileUpdated', json_build_object('display_name', 'Profile ' || s,
                          'bio', repeat('A short biography, version ' || s || '. ', 4),
                          'avatar_url', 'https://example.com/a/' || ids.id || '.png', 'location', 'Lisbon',
                          'website', 'https://example.com/~' || s)) END,
                json_build_object('actor', 'system:bench', 'request_id', md5(ids.id::text || s))
           FROM (SELECT gen_random_uuid() AS id FROM generate_series(1, $1)) ids,
                generate_series(1, $2) s",
    )
    .bind(profiles)
    .bind(versions)
    .execute(pool)
    .await
    .unwrap();
}

async fn export(db: &Database) -> (u64, u64, f64) {
    let t = Instant::now();
    let mut sink = std::io::BufWriter::with_capacity(1 << 16, Counting(0));
    let n = audit::for_each(db, &EventFilter::default(), Order::Feed, None, |e| {
        serde_json::to_writer(&mut sink, &e.export_line(false))?;
        sink.write_all(b"\n")?;
        Ok(())
    })
    .await
    .unwrap();
    sink.flush().unwrap();
    let bytes = sink.get_ref().0;
    (n, bytes, t.elapsed().as_secs_f64())
}

async fn verify(db: &Database) -> (u64, f64) {
    let t = Instant::now();
    let r = audit::verify(db, None, &|_| {}).await.unwrap();
    assert!(r.ok(), "{r:?}");
    (r.events, t.elapsed().as_secs_f64())
}

async fn copy(pool: &sqlx::PgPool) -> (u64, f64) {
    let t = Instant::now();
    let mut conn = pool.acquire().await.unwrap();
    let mut stream = conn.copy_out_raw("COPY events TO STDOUT").await.unwrap();
    let mut bytes = 0u64;
    while let Some(chunk) = stream.try_next().await.unwrap() {
        bytes += chunk.len() as u64;
    }
    (bytes, t.elapsed().as_secs_f64())
}

fn runs_line(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.0}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[tokio::main]
async fn main() {
    let total: i64 = env_or("KARMIC_BENCH_EVENTS", 1_000_000);
    let runs: usize = env_or("KARMIC_BENCH_RUNS", 3);
    let versions = 100;
    let profiles = (total / versions).max(4);
    let t = TestDb::new(Backend::Postgres).await;
    let db = t.connect().await;
    let Database::Postgres(pool) = &db else {
        unreachable!()
    };
    eprintln!("audit bench: {} events, {runs} runs", profiles * versions);

    // A quarter first: memory at N/4, then at N.
    let quarter = profiles / 4;
    let mut peaks = Vec::new();
    for (step, n_profiles) in [(1, quarter), (2, profiles - quarter)] {
        let t0 = Instant::now();
        insert(pool, n_profiles, versions).await;
        let inserted = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let chained = audit::backfill(&db).await.unwrap();
        let backfill = t1.elapsed().as_secs_f64();
        sqlx::query("VACUUM ANALYZE events")
            .execute(pool)
            .await
            .unwrap();
        eprintln!(
            "step {step}: inserted {} rows in {inserted:.1} s; backfill chained {chained} in {backfill:.1} s ({:.0}/s)",
            n_profiles * versions,
            chained as f64 / backfill
        );
        let (n, _, _) = export(&db).await;
        verify(&db).await;
        peaks.push((n, peak_rss_mb()));
        if step == 2 {
            println!(
                "| backfill (the migration's chaining of unhashed events) | {:.0} events/s |",
                chained as f64 / backfill
            );
        }
    }

    let mut export_rates = Vec::new();
    let mut verify_rates = Vec::new();
    let mut copy_rates = Vec::new();
    let mut export_bytes = 0;
    let mut copy_bytes = 0;
    for _ in 0..runs {
        let (n, bytes, secs) = export(&db).await;
        export_rates.push(n as f64 / secs);
        export_bytes = bytes;
        let (n, secs) = verify(&db).await;
        verify_rates.push(n as f64 / secs);
        let (bytes, secs) = copy(pool).await;
        copy_rates.push(n as f64 / secs);
        copy_bytes = bytes;
    }
    let (e, v, c) = (
        median(export_rates.clone()),
        median(verify_rates.clone()),
        median(copy_rates.clone()),
    );
    println!("| what | events/s (median) | % of COPY | runs |");
    println!("|---|---|---|---|");
    println!(
        "| `COPY events TO STDOUT` ({:.0} MB) | {c:.0} | 100% | {} |",
        copy_bytes as f64 / 1e6,
        runs_line(&copy_rates)
    );
    println!(
        "| `events export` ({:.0} MB of JSONL) | {e:.0} | {:.0}% | {} |",
        export_bytes as f64 / 1e6,
        100.0 * e / c,
        runs_line(&export_rates)
    );
    println!(
        "| `events verify` | {v:.0} | {:.0}% | {} |",
        100.0 * v / c,
        runs_line(&verify_rates)
    );
    for (n, mb) in &peaks {
        println!("| peak RSS after exporting and verifying {n} events | {mb:.0} MB |");
    }
}
