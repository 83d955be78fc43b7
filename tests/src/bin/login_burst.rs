//! `cargo run --release -p tests --bin login_burst` — a burst of sign-ins against a real
//! `karmic serve` process (embedded store, the real Argon2id cost), with:
//!
//! * the status of every sign-in (no 5xx allowed; the excess is 429 with `Retry-After`),
//! * the latency of a normal request (`GET /profiles/{id}` from 8 other clients, each every
//!   100 ms) while the burst runs: median, p99, max,
//! * the server's resident memory before and at its peak (`VmHWM`).
//!
//! Three configurations: per-client rate limiting off (the burst stands for many clients,
//! as behind API Gateway), `karmic serve`'s defaults (10 requests/s per client, burst 20),
//! and, for comparison, no shedding at all (a queue as long as the burst).
//! `KARMIC_BURST_LOGINS` (default 1000), `KARMIC_BURST_CONCURRENCY` (default 500) and
//! `KARMIC_BURST_ROUNDS` (default 3, two seconds apart) shape the bursts. Prints Markdown;
//! exits 1 if a request got a 5xx in either of Karmic's own configurations.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tests::bench::env_or;

const PASSWORD: &str = "correct horse battery staple";

fn status_kib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .unwrap_or(f64::NAN)
}

struct Server {
    child: Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start(extra: &[(&str, &str)]) -> Server {
    let exe = std::env::current_exe().unwrap();
    let karmic = exe.parent().unwrap().join("karmic-under-test");
    let dir = tempfile::tempdir().unwrap();
    let port = tests::free_port();
    let mut cmd = Command::new(karmic);
    cmd.arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("KARMIC_DATA_DIR", dir.path())
        .env("KARMIC_HTTP_ADDR", format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let child = cmd.spawn().unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while client
        .get(format!("{base}/health"))
        .send()
        .await
        .map(|r| r.status() != 200)
        .unwrap_or(true)
    {
        assert!(Instant::now() < deadline, "karmic serve did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Server {
        child,
        base,
        _dir: dir,
    }
}

/// `logins` sign-ins of one account, `gate` bounding those in flight; returns the count of
/// each status (0: no answer) and how long the burst took.
async fn one_burst(
    client: &reqwest::Client,
    base: &str,
    gate: &Arc<tokio::sync::Semaphore>,
    logins: usize,
) -> (BTreeMap<u16, usize>, Duration) {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..logins {
        let (client, base, gate) = (client.clone(), base.to_owned(), gate.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.unwrap();
            match client
                .post(format!("{base}/auth/login"))
                .json(&json!({"email": "burst@example.com", "password": PASSWORD}))
                .send()
                .await
            {
                Ok(r) => r.status().as_u16(),
                Err(_) => 0,
            }
        }));
    }
    let mut statuses = BTreeMap::new();
    for t in tasks {
        *statuses.entry(t.await.unwrap()).or_insert(0) += 1;
    }
    (statuses, started.elapsed())
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

struct Outcome {
    statuses: BTreeMap<u16, usize>,
    burst: Duration,
    normal_ms: Vec<f64>,
    normal_errors: usize,
    rss_before_mib: f64,
    rss_peak_mib: f64,
}

async fn run(extra: &[(&str, &str)]) -> Outcome {
    let server = start(extra).await;
    let pid = server.child.id();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let base = server.base.clone();
    let post = |path: &str, body: Value| client.post(format!("{base}{path}")).json(&body).send();
    let mut sub = String::new();
    for email in ["burst@example.com", "normal@example.com"] {
        let r = post(
            "/auth/register",
            json!({"email": email, "password": PASSWORD, "display_name": "Bench"}),
        )
        .await
        .unwrap();
        assert_eq!(r.status(), 201);
        let body: Value = r.json().await.unwrap();
        sub = body["user_id"].as_str().unwrap().to_owned();
    }
    let login: Value = post(
        "/auth/login",
        json!({"email": "normal@example.com", "password": PASSWORD}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let token = login["access_token"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before_mib = status_kib(pid, "VmRSS:") / 1024.0;

    let done = Arc::new(AtomicBool::new(false));
    // Normal traffic: 32 other clients (other loopback addresses, as they would be), each
    // reading a profile every 100 ms (10 requests/s, within the default per-client rate).
    let mut normal = Vec::new();
    for c in 0..32u8 {
        let other = reqwest::Client::builder()
            .local_address(std::net::IpAddr::from([127, 0, 0, 2 + c]))
            .timeout(Duration::from_secs(120))
            .build()
            .unwrap();
        let (base, token, done, sub) = (base.clone(), token.clone(), done.clone(), sub.clone());
        normal.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(3 * u64::from(c))).await;
            let mut ms = Vec::new();
            let mut errors = 0;
            while !done.load(Ordering::SeqCst) {
                let t = Instant::now();
                match other
                    .get(format!("{base}/profiles/{sub}"))
                    .bearer_auth(&token)
                    .send()
                    .await
                {
                    Ok(r) if r.status() == 200 => ms.push((t, t.elapsed().as_secs_f64() * 1000.0)),
                    _ => errors += 1,
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (ms, errors)
        }));
    }

    // Let the normal clients connect first (they keep their connections).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let logins: usize = env_or("KARMIC_BURST_LOGINS", 1000);
    let concurrency: usize = env_or("KARMIC_BURST_CONCURRENCY", 500);
    let rounds: usize = env_or("KARMIC_BURST_ROUNDS", 3);
    let gate = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut statuses = BTreeMap::new();
    let mut burst = Duration::ZERO;
    let mut windows = Vec::new();
    for round in 0..rounds {
        if round > 0 {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        let from = Instant::now();
        let (s, took) = one_burst(&client, &base, &gate, logins).await;
        windows.push((from, from + took));
        burst += took;
        for (k, n) in s {
            *statuses.entry(k).or_insert(0) += n;
        }
    }
    let burst = burst / rounds.max(1) as u32;
    done.store(true, Ordering::SeqCst);
    // Only requests sent while a burst was running count.
    let (mut normal_ms, mut normal_errors) = (Vec::new(), 0);
    for n in normal {
        let (ms, errors) = n.await.unwrap();
        normal_ms.extend(
            ms.into_iter()
                .filter(|(at, _)| windows.iter().any(|(a, b)| a <= at && at <= b))
                .map(|(_, ms)| ms),
        );
        normal_errors += errors;
    }
    normal_ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let rss_peak_mib = status_kib(pid, "VmHWM:") / 1024.0;
    Outcome {
        statuses,
        burst,
        normal_ms,
        normal_errors,
        rss_before_mib,
        rss_peak_mib,
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let logins: usize = env_or("KARMIC_BURST_LOGINS", 1000);
    let concurrency: usize = env_or("KARMIC_BURST_CONCURRENCY", 500);
    let rounds: usize = env_or("KARMIC_BURST_ROUNDS", 3);
    println!(
        "## Login burst: {rounds} × {logins} sign-ins, {concurrency} in flight, against `karmic serve` (embedded, Argon2id m=19456 KiB t=2 p=1, {} CPUs)\n",
        std::thread::available_parallelism().map_or(1, usize::from)
    );
    println!(
        "| configuration | statuses (all rounds) | one burst took | normal GET during burst: p50 / p99 / max (n) | GET errors | RSS before → peak |"
    );
    println!("|---|---|---:|---:|---:|---:|");
    let mut server_errors = 0;
    // (label, settings, whether it is Karmic's own configuration: the last row is a
    // comparison without shedding, whose time-outs are the point)
    for (label, extra, ours) in [
        (
            "rate limit off (many clients)",
            vec![("KARMIC_RATE_LIMIT_PER_SEC", "0")],
            true,
        ),
        ("`karmic serve` defaults (10/s, burst 20)", vec![], true),
        (
            "comparison, no shedding: queue of 100,000, rate limit off",
            vec![
                ("KARMIC_RATE_LIMIT_PER_SEC", "0"),
                ("KARMIC_HASH_QUEUE", "100000"),
            ],
            false,
        ),
    ] {
        let o = run(&extra).await;
        if ours {
            server_errors += o
                .statuses
                .iter()
                .filter(|(s, _)| **s >= 500 || **s == 0)
                .map(|(_, n)| n)
                .sum::<usize>();
        }
        let statuses: Vec<String> = o
            .statuses
            .iter()
            .map(|(s, n)| format!("{n} × {s}"))
            .collect();
        println!(
            "| {label} | {} | {:.1} s | {:.1} / {:.1} / {:.1} ms ({}) | {} | {:.0} → {:.0} MiB |",
            statuses.join(", "),
            o.burst.as_secs_f64(),
            pct(&o.normal_ms, 0.5),
            pct(&o.normal_ms, 0.99),
            o.normal_ms.last().copied().unwrap_or(f64::NAN),
            o.normal_ms.len(),
            o.normal_errors,
            o.rss_before_mib,
            o.rss_peak_mib,
        );
    }
    if server_errors > 0 {
        println!("\n**{server_errors} sign-ins got a 5xx or no answer.**");
        return std::process::ExitCode::FAILURE;
    }
    std::process::ExitCode::SUCCESS
}
