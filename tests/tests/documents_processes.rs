//! The worker and the embedded system as real processes: a worker killed with SIGKILL
//! mid-job (its message comes back and the job completes exactly once), a worker stopped
//! with SIGTERM mid-job (it releases the message and exits in bounded time), two
//! processes sharing the embedded queue, and the whole embedded flow through the real
//! `karmic serve` binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use domain::AiJob;
use serde_json::Value;
use tests::docs::{DocClient, job_status};
use tests::{Backend, TestDb};

const PROSE: &str = "The quarterly report covers revenue, costs and the outlook for next \
    year. Revenue grew in every region, and costs fell as the new warehouse opened. The \
    board approved the budget for the coming year, and the invoice from Acme is due on \
    2026-12-31. Contact billing@acme.example for questions about the amounts.";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An analyzer that sleeps first: a job long enough to be interrupted.
fn slow_analyzer(dir: &std::path::Path, secs: u32) -> std::path::PathBuf {
    let path = dir.join("slow-analyzer.sh");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\n/bin/sleep {secs}\nexec {} \"$@\"\n",
            tests::karmic_binary!().display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// An in-process API + embedded S3 whose worker runs elsewhere, and the environment a
/// `karmic worker` process needs to join it.
async fn api_without_worker(
    db: &TestDb,
) -> (
    tokio::sync::oneshot::Sender<()>,
    String,
    Vec<(String, String)>,
    handlers::Settings,
) {
    let mut s = db.settings();
    s.s3_embedded_addr = ([127, 0, 0, 1], 0).into();
    s.worker_in_process = Some(false);
    let system = cli::system::System::build(s).await.unwrap();
    let base = format!("http://127.0.0.1:{}", system.port());
    let settings = system.runtime().settings.clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(system.run_until(async {
        let _ = rx.await;
    }));
    // The worker finds the embedded endpoint's keys in the shared data directory itself;
    // it is told only where the endpoint listens (port 0 picked one).
    let mut env = db.process_env();
    env.retain(|(k, _)| k != "KARMIC_S3_EMBEDDED_ADDR");
    env.extend([
        (
            "KARMIC_S3_EMBEDDED_ADDR".to_owned(),
            settings
                .s3_endpoint
                .clone()
                .unwrap()
                .trim_start_matches("http://")
                .to_owned(),
        ),
        ("KARMIC_WORKER_WAIT_SECS".to_owned(), "1".to_owned()),
        ("KARMIC_WORKER_VISIBILITY_SECS".to_owned(), "3".to_owned()),
        ("KARMIC_WORKER_HEARTBEAT_SECS".to_owned(), "1".to_owned()),
        ("KARMIC_WORKER_SHUTDOWN_SECS".to_owned(), "1".to_owned()),
        ("KARMIC_LOG_FORMAT".to_owned(), "json".to_owned()),
    ]);
    (tx, base, env, settings)
}

fn spawn_worker(env: &[(String, String)], analyzer: &std::path::Path, id: &str) -> Child {
    Command::new(tests::karmic_binary!())
        .arg("worker")
        .env_clear()
        .envs(env.iter().cloned())
        .env("KARMIC_ANALYZER_PROGRAM", analyzer)
        .env("KARMIC_WORKER_ID", id)
        .env("PATH", "/usr/bin:/bin")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

async fn job_events(settings: &handlers::Settings, job: &str) -> Vec<(String, Value)> {
    let rt = handlers::Runtime::build(settings.clone()).await.unwrap();
    let events = rt.state.db.aggregates::<AiJob>().events(job).await.unwrap();
    events
        .into_iter()
        .map(|(_, e)| {
            use cqrs_es::DomainEvent;
            (e.event_type(), serde_json::to_value(&e).unwrap())
        })
        .collect()
}

fn wait_exit(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let started = Instant::now();
    while started.elapsed() < within {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[tokio::test]
async fn a_worker_killed_mid_job_leaves_the_message_to_come_back_and_the_job_completes_once() {
    let db = TestDb::new(Backend::Sqlite).await;
    let (stop, base, env, settings) = api_without_worker(&db).await;
    let client = DocClient::signed_in(&base).await;
    let slow = slow_analyzer(db.dir.path(), 60);
    let mut doomed = spawn_worker(&env, &slow, "doomed");
    let id = client
        .upload("notes.txt", "text/plain", PROSE.as_bytes().to_vec())
        .await;
    let doc = client
        .wait_for(&id, Duration::from_secs(30), |d| job_status(d) == "running")
        .await;
    doomed.kill().unwrap(); // SIGKILL
    doomed.wait().unwrap();
    let mut rescuer = spawn_worker(&env, &tests::karmic_binary!(), "rescuer");
    let done = client
        .wait_for(&id, Duration::from_secs(30), |d| {
            job_status(d) == "succeeded"
        })
        .await;
    assert_eq!(done["job"]["attempts"], 2, "{done:#}");
    let job = doc["job"]["job_id"].as_str().unwrap();
    let events = job_events(&settings, job).await;
    let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        kinds,
        ["JobRequested", "JobStarted", "JobStarted", "JobSucceeded"]
    );
    assert_eq!(
        events[1].1["JobStarted"]["worker"], "doomed",
        "{:?}",
        events[1].1
    );
    assert_eq!(events[2].1["JobStarted"]["worker"], "rescuer");
    rescuer.kill().unwrap();
    rescuer.wait().unwrap();
    let _ = stop.send(());
}

#[tokio::test]
async fn a_worker_told_to_stop_mid_job_releases_it_and_exits_in_bounded_time() {
    let db = TestDb::new(Backend::Sqlite).await;
    let (stop, base, env, settings) = api_without_worker(&db).await;
    let client = DocClient::signed_in(&base).await;
    let slow = slow_analyzer(db.dir.path(), 60);
    let mut stopping = spawn_worker(&env, &slow, "stopping");
    let id = client
        .upload("notes.txt", "text/plain", PROSE.as_bytes().to_vec())
        .await;
    client
        .wait_for(&id, Duration::from_secs(30), |d| job_status(d) == "running")
        .await;
    let pid = stopping.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let started = Instant::now();
    let exit = wait_exit(&mut stopping, Duration::from_secs(10)).expect("exits within 10 s");
    assert!(exit.success(), "{exit:?}");
    // A 1 s grace period, then the release: well within the bound.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // Released, so the next worker takes it at once (not after the 3 s visibility).
    let mut next = spawn_worker(&env, &tests::karmic_binary!(), "next");
    let done = client
        .wait_for(&id, Duration::from_secs(30), |d| {
            job_status(d) == "succeeded"
        })
        .await;
    assert_eq!(done["job"]["attempts"], 2);
    let job = done["job"]["job_id"].as_str().unwrap();
    let kinds: Vec<String> = job_events(&settings, job)
        .await
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(
        kinds,
        ["JobRequested", "JobStarted", "JobStarted", "JobSucceeded"]
    );
    next.kill().unwrap();
    next.wait().unwrap();
    let _ = stop.send(());
}

#[tokio::test]
async fn the_embedded_default_runs_the_whole_flow_through_the_real_binary() {
    let dir = tempfile::tempdir().unwrap();
    let (http, s3) = (free_port(), free_port());
    let mut serve = Command::new(tests::karmic_binary!())
        .arg("serve")
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("KARMIC_DATA_DIR", dir.path())
        .env("KARMIC_HTTP_ADDR", format!("127.0.0.1:{http}"))
        .env("KARMIC_S3_EMBEDDED_ADDR", format!("127.0.0.1:{s3}"))
        .env("KARMIC_ARGON2_MEMORY_KIB", "1024")
        .env("KARMIC_ARGON2_ITERATIONS", "1")
        .env("KARMIC_RATE_LIMIT_PER_SEC", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{http}");
    let started = Instant::now();
    while reqwest::get(format!("{base}/health")).await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "serve did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let client = DocClient::signed_in(&base).await;
    let pdf = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../worker/tests/fixtures/report.pdf"
    ))
    .unwrap();
    let docx = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../worker/tests/fixtures/report.docx"
    ))
    .unwrap();
    let a = client.upload("report.pdf", "application/pdf", pdf).await;
    let b = client
        .upload(
            "report.docx",
            "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
            docx,
        )
        .await;
    for id in [&a, &b] {
        let doc = client
            .wait_for(id, Duration::from_secs(30), |d| {
                job_status(d) == "succeeded"
            })
            .await;
        assert!(doc["analysis"]["words"].as_u64().unwrap() > 20, "{doc:#}");
    }
    // The objects are files in the data directory.
    assert!(dir.path().join("objects").is_dir());
    let pid = serve.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let exit = wait_exit(&mut serve, Duration::from_secs(40)).expect("serve stops on SIGTERM");
    assert!(exit.success(), "{exit:?}");
}
