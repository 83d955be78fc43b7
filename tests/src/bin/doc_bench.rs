//! The document pipeline's figures (docs/benchmarks.md, issue 9), each beside a baseline
//! from the same run:
//!
//! * worker throughput (documents/s) on a mixed corpus of ≥ 200 files up to 1 MB: every
//!   upload is made and notified first, then a worker (embedded queue, isolated analysis,
//!   events, projections) is started and timed until every job has succeeded. Baseline:
//!   the same analyses in this process with no isolation, queue or events, one thread per
//!   CPU;
//! * end-to-end latency from the end of the PUT to the result being visible through
//!   `GET /documents/{id}` (p50, p99), one upload at a time, in the embedded default.
//!   Baseline: the isolated analysis alone for the same file;
//! * peak memory: this process's (API + worker + embedded S3) and the largest analysis
//!   child's.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tests::docs::{DocClient, job_status};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../worker/tests/fixtures");
const PDF: &str = "application/pdf";
const DOCX: &str = "application/vnd.openxmlformats-officedocument.wordprocessingml.document";

const WORDS: &[&str] = &[
    "revenue",
    "invoice",
    "quarter",
    "warehouse",
    "budget",
    "board",
    "contract",
    "supplier",
    "customer",
    "region",
    "growth",
    "margin",
    "forecast",
    "payment",
    "delivery",
    "audit",
    "report",
    "project",
    "schedule",
    "risk",
    "compliance",
    "policy",
    "office",
    "team",
];

/// Prose of about `bytes` bytes, with sentences, numbers, emails and dates.
fn prose(seed: usize, bytes: usize) -> String {
    let mut s = String::with_capacity(bytes + 200);
    let mut i = seed;
    while s.len() < bytes {
        i = i
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let w = |k: usize| WORDS[(i >> (k * 5)) % WORDS.len()];
        s.push_str(&format!(
            "The {} for the {} {} was approved on 2026-{:02}-{:02} for ${}.{:02}. Contact {}@example.com about the {} {}. ",
            w(1), w(2), w(3), (i >> 7) % 12 + 1, (i >> 11) % 28 + 1, (i >> 13) % 100_000, (i >> 3) % 100,
            w(4), w(5), w(6)
        ));
    }
    s
}

/// ≥ 200 files, up to 1 MB: the real PDF and DOCX fixtures and generated text formats of
/// sizes from 2 KB to 1 MB.
fn corpus() -> Vec<(String, &'static str, Vec<u8>)> {
    let pdf = std::fs::read(format!("{FIXTURES}/report.pdf")).unwrap();
    let docx = std::fs::read(format!("{FIXTURES}/report.docx")).unwrap();
    let sizes = [2_000usize, 8_000, 30_000, 120_000, 400_000, 1_000_000];
    let mut out = Vec::new();
    for i in 0..210 {
        let size = sizes[i % sizes.len()];
        match i % 6 {
            0 => out.push((format!("r{i}.pdf"), PDF, pdf.clone())),
            1 => out.push((format!("r{i}.docx"), DOCX, docx.clone())),
            2 => out.push((
                format!("t{i}.txt"),
                "text/plain",
                prose(i, size).into_bytes(),
            )),
            3 => out.push((
                format!("m{i}.md"),
                "text/markdown",
                format!("# Notes {i}\n\n{}", prose(i, size)).into_bytes(),
            )),
            4 => out.push((
                format!("h{i}.html"),
                "text/html",
                format!(
                    "<html><body><h1>Notes</h1><p>{}</p></body></html>",
                    prose(i, size)
                )
                .into_bytes(),
            )),
            _ => {
                let mut csv = String::from("id,comment\n");
                let mut n = 0;
                while csv.len() < size {
                    csv.push_str(&format!("{n},\"{}\"\n", prose(i + n, 200)));
                    n += 1;
                }
                out.push((format!("c{i}.csv"), "text/csv", csv.into_bytes()));
            }
        }
    }
    out
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn status_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Peak RSS of the largest reaped child (the analysis processes), KiB.
fn children_max_rss_kb() -> i64 {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
        .map(|u| u.max_rss())
        .unwrap_or(0)
}

/// The job's status of a document, as the API shows it.
async fn status(api: &DocClient, id: &str) -> String {
    let doc: Value = api.document(id).await.json().await.unwrap();
    job_status(&doc).to_owned()
}

/// `karmic-analyze` (the small analysis binary `karmic serve` prefers) when it was built
/// beside this one (`scripts/bench.sh` builds it), else the full `karmic-under-test`.
fn analyzer_program() -> std::path::PathBuf {
    let me = std::env::current_exe().unwrap();
    let small = me.with_file_name("karmic-analyze");
    if small.is_file() {
        small
    } else {
        me.with_file_name("karmic-under-test")
    }
}

#[tokio::main]
async fn main() {
    let files = corpus();
    let total_bytes: usize = files.iter().map(|f| f.2.len()).sum();
    let cpus = std::thread::available_parallelism().map_or(2, usize::from);
    let slots = std::env::var("KARMIC_WORKER_CONCURRENCY")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| worker::run::default_concurrency(worker::isolate::DEFAULT_MEMORY_BYTES));
    println!(
        "corpus: {} files, {:.1} MB, largest {} KB; {slots} worker slots on {cpus} CPUs",
        files.len(),
        total_bytes as f64 / 1e6,
        files.iter().map(|f| f.2.len()).max().unwrap() / 1000,
    );

    // Baseline: the analyses alone, in this process, one thread per CPU.
    let shared = Arc::new(files.clone());
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let threads: Vec<_> = (0..cpus)
        .map(|_| {
            let (shared, next) = (shared.clone(), next.clone());
            std::thread::spawn(move || {
                let limits = worker::Limits::default();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some((_, ct, bytes)) = shared.get(i) else {
                        break;
                    };
                    let ct = domain::ContentType::parse(ct).unwrap();
                    worker::analysis::analyze_bytes(bytes, ct, &limits).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let baseline = files.len() as f64 / started.elapsed().as_secs_f64();
    println!("baseline: in-process analysis, no isolation/queue/events: {baseline:.1} documents/s");

    // The system, embedded, with the worker held back.
    let dir = tempfile::tempdir().unwrap();
    let mut env = std::collections::HashMap::new();
    env.insert(
        "KARMIC_DATA_DIR".to_owned(),
        dir.path().display().to_string(),
    );
    env.insert("KARMIC_HTTP_ADDR".to_owned(), "127.0.0.1:0".to_owned());
    env.insert(
        "KARMIC_S3_EMBEDDED_ADDR".to_owned(),
        "127.0.0.1:0".to_owned(),
    );
    env.insert("KARMIC_RATE_LIMIT_PER_SEC".to_owned(), "0".to_owned());
    env.insert("KARMIC_WORKER_IN_PROCESS".to_owned(), "false".to_owned());
    env.insert("KARMIC_LOG_FORMAT".to_owned(), "json".to_owned());
    if let Ok(n) = std::env::var("KARMIC_WORKER_CONCURRENCY") {
        env.insert("KARMIC_WORKER_CONCURRENCY".to_owned(), n);
    }
    let settings = handlers::Settings::from_sources(&env).unwrap();
    let system = cli::system::System::build(settings).await.unwrap();
    let base = format!("http://127.0.0.1:{}", system.port());
    let mut settings = system.runtime().settings.clone();
    settings.analyzer_program = Some(analyzer_program());
    settings.worker_wait = Duration::from_secs(1);
    let queue = system.queue().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let sys_task = tokio::spawn(system.run_until(async {
        let _ = stop_rx.await;
    }));
    let api = Arc::new(DocClient::signed_in(&base).await);
    let started = Instant::now();
    let mut ids = Vec::new();
    for chunk in files.chunks(8) {
        let mut tasks = Vec::new();
        for (name, ct, bytes) in chunk.iter().cloned() {
            let api = api.clone();
            tasks.push(tokio::spawn(
                async move { api.upload(&name, ct, bytes).await },
            ));
        }
        for t in tasks {
            ids.push(t.await.unwrap());
        }
    }
    println!(
        "uploads: {} in {:.1} s (API + presigned PUT to the embedded S3)",
        ids.len(),
        started.elapsed().as_secs_f64()
    );

    // The worker, timed from its start until every job has succeeded.
    let rt = handlers::Runtime::build(settings.clone()).await.unwrap();
    // As `karmic worker` runs: with its own projector loop, which projects the worker's
    // commits in batches.
    let (pstop_tx, pstop_rx) = tokio::sync::oneshot::channel::<()>();
    let ptask = tokio::spawn(rt.projector.clone().run(async {
        let _ = pstop_rx.await;
    }));
    let w = cli::system::worker(&rt, queue.clone()).unwrap();
    let (wstop_tx, wstop_rx) = tokio::sync::oneshot::channel::<()>();
    let started = Instant::now();
    let wtask = tokio::spawn(w.run(async {
        let _ = wstop_rx.await;
    }));
    // Watch one document at a time, oldest first (the queue hands them out in that
    // order): a poll of every pending document would itself load the machine.
    let mut next = 0;
    while let Some(id) = ids.get(next) {
        match status(&api, id).await.as_str() {
            "succeeded" => next += 1,
            "dead_lettered" => panic!("{id} failed"),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let throughput = ids.len() as f64 / secs;
    println!(
        "worker: {} documents in {secs:.1} s = {throughput:.1} documents/s ({:.0}% of the baseline; target ≥ 20/s: {})",
        ids.len(),
        100.0 * throughput / baseline,
        if throughput >= 20.0 { "met" } else { "MISSED" }
    );
    let _ = wstop_tx.send(());
    wtask.await.unwrap().unwrap();

    // Latency, one upload at a time, with the worker in-process as `karmic serve` runs it.
    // The system's own queue handle, which the embedded S3 endpoint sends to (as in
    // `karmic serve`: its sends wake the worker's poll).
    let w = cli::system::worker(&rt, queue.clone()).unwrap();
    let (wstop_tx, wstop_rx) = tokio::sync::oneshot::channel::<()>();
    let wtask = tokio::spawn(w.run(async {
        let _ = wstop_rx.await;
    }));
    // The same child under GNU time, whose own tiny footprint is all the child inherits:
    // getrusage(RUSAGE_CHILDREN) of this process would count this process's pages, which
    // a child holds between fork and exec.
    let peaks = dir.path().join("child-peaks");
    let isolated = if std::path::Path::new("/usr/bin/time").is_file() {
        worker::IsolatedAnalyzer::new(
            "/usr/bin/time",
            vec![
                "-a".into(),
                "-o".into(),
                peaks.clone().into(),
                "-f".into(),
                "%M".into(),
                analyzer_program().into(),
                "analyze-child".into(),
            ],
        )
    } else {
        worker::IsolatedAnalyzer::new(analyzer_program(), vec!["analyze-child".into()])
    };
    let mut e2e = Vec::new();
    let mut alone = Vec::new();
    // (document id, wall clock at the end of the PUT, wall clock when seen), for the
    // stage breakdown from the events' own timestamps.
    let mut walls = Vec::new();
    for (i, (name, ct, bytes)) in files
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 4 == 0)
        .take(40)
    {
        let _ = i;
        let t = Instant::now();
        use worker::Analyzer;
        isolated
            .analyze(bytes.clone(), domain::ContentType::parse(ct).unwrap())
            .await
            .unwrap();
        alone.push(t.elapsed().as_secs_f64() * 1000.0);
        let id = api.upload(name, ct, bytes.clone()).await;
        let put_done = Instant::now();
        let put_wall = chrono::Utc::now();
        loop {
            if status(&api, &id).await == "succeeded" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        e2e.push(put_done.elapsed().as_secs_f64() * 1000.0);
        walls.push((id, put_wall, chrono::Utc::now()));
    }
    e2e.sort_by(f64::total_cmp);
    alone.sort_by(f64::total_cmp);
    println!(
        "latency, end of PUT → result visible ({} uploads, one at a time): p50 {:.0} ms, p99 {:.0} ms, min {:.0}, max {:.0}",
        e2e.len(),
        percentile(&e2e, 0.5),
        percentile(&e2e, 0.99),
        e2e[0],
        e2e[e2e.len() - 1]
    );
    println!(
        "baseline: the isolated analysis alone, same files: p50 {:.0} ms, p99 {:.0} ms",
        percentile(&alone, 0.5),
        percentile(&alone, 0.99)
    );
    let _ = wstop_tx.send(());
    wtask.await.unwrap().unwrap();
    stages(&api, &rt, &walls).await;
    println!(
        "memory: this process (API + worker + embedded S3 + projector) peak RSS {} MB",
        status_kb("VmHWM:") / 1024
    );
    let child_peak_kb = std::fs::read_to_string(&peaks)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse::<i64>().ok())
        .max();
    match child_peak_kb {
        Some(kb) => println!(
            "memory: the largest analysis child's peak RSS {:.1} MB over the 40 latency files, measured by GNU time (limit: KARMIC_ANALYZER_MEMORY_MB address space)",
            kb as f64 / 1024.0
        ),
        None => println!(
            "memory: analysis children, getrusage (an upper bound: includes this process's pages up to exec): {} MB",
            children_max_rss_kb() / 1024
        ),
    }
    let _ = pstop_tx.send(());
    ptask.await.unwrap();
    let _ = stop_tx.send(());
    sys_task.await.unwrap().unwrap();
}

/// Where the upload-to-visible time goes, from the events' `recorded_at` (SQLite's clock,
/// the same host): the PUT's end → `UploadConfirmed` (queue pickup, HEAD, GET, sniffing,
/// the commit) → `JobStarted` (the job's request and start commits) → `JobSucceeded` (the
/// isolated analysis) → seen through the API (the projection, and this 5 ms poll).
async fn stages(
    api: &DocClient,
    rt: &handlers::Runtime,
    walls: &[(
        String,
        chrono::DateTime<chrono::Utc>,
        chrono::DateTime<chrono::Utc>,
    )],
) {
    let commands::Database::Sqlite(pool) = &rt.state.db else {
        return;
    };
    let at = |t: &str| {
        chrono::DateTime::parse_from_rfc3339(t)
            .unwrap()
            .with_timezone(&chrono::Utc)
    };
    let ms = |a: chrono::DateTime<chrono::Utc>, b: chrono::DateTime<chrono::Utc>| {
        (b - a).num_microseconds().unwrap_or(0) as f64 / 1000.0
    };
    let mut cols: [Vec<f64>; 4] = Default::default();
    for (id, put, seen) in walls {
        let doc: Value = api.document(id).await.json().await.unwrap();
        let job = doc["job"]["job_id"].as_str().unwrap().to_owned();
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT event_type, recorded_at FROM events WHERE aggregate_id IN (?1, ?2)",
        )
        .bind(id)
        .bind(&job)
        .fetch_all(pool)
        .await
        .unwrap();
        let when = |ty: &str| {
            rows.iter()
                .find(|(t, _)| t == ty)
                .map(|(_, r)| at(r))
                .unwrap()
        };
        let (confirmed, started, succeeded) = (
            when("UploadConfirmed"),
            when("JobStarted"),
            when("JobSucceeded"),
        );
        cols[0].push(ms(*put, confirmed));
        cols[1].push(ms(confirmed, started));
        cols[2].push(ms(started, succeeded));
        cols[3].push(ms(succeeded, *seen));
    }
    for c in &mut cols {
        c.sort_by(f64::total_cmp);
    }
    println!(
        "stages (p50 / p99 ms): PUT end → confirmed {:.0} / {:.0}; → job started {:.0} / {:.0}; → analysed {:.0} / {:.0}; → visible {:.0} / {:.0}",
        percentile(&cols[0], 0.5),
        percentile(&cols[0], 0.99),
        percentile(&cols[1], 0.5),
        percentile(&cols[1], 0.99),
        percentile(&cols[2], 0.5),
        percentile(&cols[2], 0.99),
        percentile(&cols[3], 0.5),
        percentile(&cols[3], 0.99),
    );
}
