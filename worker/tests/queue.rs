//! The job queue's contract: what every adapter must do (SQS's semantics). Run here on
//! the embedded adapter; the SQS adapter joins this suite when it comes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use worker::queue::{JobQueue, SqliteQueue};

struct Embedded {
    _dir: tempfile::TempDir,
    url: String,
}

impl Embedded {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/karmic.db?mode=rwc", dir.path().display());
        let e = Embedded { _dir: dir, url };
        e.db().await.migrate().await.unwrap();
        e
    }

    async fn db(&self) -> commands::Database {
        commands::Database::connect(&self.url, &commands::store::PoolSettings::default())
            .await
            .unwrap()
    }

    async fn queue(&self, max_receives: u32) -> Arc<dyn JobQueue> {
        let commands::Database::Sqlite(pool) = self.db().await else {
            panic!("not SQLite");
        };
        Arc::new(SqliteQueue::new(pool, "jobs", max_receives))
    }
}

const NOW: Duration = Duration::ZERO;

#[tokio::test]
async fn a_received_message_is_hidden_then_comes_back_with_a_new_receipt() {
    let e = Embedded::new().await;
    let q = e.queue(3).await;
    q.send("hello").await.unwrap();
    let first = q
        .receive(10, NOW, Duration::from_millis(300))
        .await
        .unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(
        (first[0].body.as_str(), first[0].receive_count),
        ("hello", 1)
    );
    // Hidden while its visibility lasts.
    assert!(
        q.receive(10, NOW, Duration::from_secs(1))
            .await
            .unwrap()
            .is_empty()
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let second = q.receive(10, NOW, Duration::from_secs(30)).await.unwrap();
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].receive_count, 2);
    assert_ne!(second[0].receipt, first[0].receipt);
    // Only the latest receipt counts.
    assert!(!q.delete(&first[0].receipt).await.unwrap());
    assert!(!q.change_visibility(&first[0].receipt, NOW).await.unwrap());
    assert!(q.delete(&second[0].receipt).await.unwrap());
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(q.receive(10, NOW, NOW).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_heartbeat_keeps_a_message_hidden() {
    let e = Embedded::new().await;
    let q = e.queue(3).await;
    q.send("long job").await.unwrap();
    let m = q.receive(1, NOW, Duration::from_millis(300)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(
        q.change_visibility(&m[0].receipt, Duration::from_secs(2))
            .await
            .unwrap()
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        q.receive(1, NOW, NOW).await.unwrap().is_empty(),
        "visible despite the heartbeat"
    );
}

#[tokio::test]
async fn a_message_received_too_often_goes_to_the_dead_letter_queue() {
    let e = Embedded::new().await;
    let q = e.queue(2).await;
    q.send("poison").await.unwrap();
    for n in 1..=2 {
        let m = q.receive(1, NOW, Duration::from_millis(50)).await.unwrap();
        assert_eq!(m[0].receive_count, n);
        tokio::time::sleep(Duration::from_millis(80)).await;
    }
    // The third receive finds it gone to the dead-letter queue.
    assert!(q.receive(1, NOW, NOW).await.unwrap().is_empty());
    let dead = q.dead_letters().await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].1, "poison");
}

#[tokio::test]
async fn a_message_can_be_dead_lettered_at_once() {
    let e = Embedded::new().await;
    let q = e.queue(5).await;
    q.send("corrupt").await.unwrap();
    let m = q.receive(1, NOW, Duration::from_secs(30)).await.unwrap();
    assert!(q.dead_letter(&m[0].receipt).await.unwrap());
    assert!(
        !q.dead_letter(&m[0].receipt).await.unwrap(),
        "the receipt is spent"
    );
    assert_eq!(q.dead_letters().await.unwrap().len(), 1);
    assert!(q.receive(1, NOW, NOW).await.unwrap().is_empty());
}

#[tokio::test]
async fn messages_survive_a_restart() {
    let e = Embedded::new().await;
    {
        let q = e.queue(3).await;
        q.send("kept").await.unwrap();
        // Received and then the process dies: it comes back when its visibility ends.
        q.send("in flight").await.unwrap();
        let m = q.receive(1, NOW, Duration::from_millis(200)).await.unwrap();
        assert_eq!(m[0].body, "kept");
    }
    let q = e.queue(3).await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    let mut bodies: Vec<String> = q
        .receive(10, NOW, Duration::from_secs(30))
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.body)
        .collect();
    bodies.sort();
    assert_eq!(bodies, ["in flight", "kept"]);
}

#[tokio::test]
async fn concurrent_consumers_never_share_a_message() {
    let e = Embedded::new().await;
    let q = e.queue(3).await;
    for i in 0..60 {
        q.send(&format!("m{i}")).await.unwrap();
    }
    let mut consumers = Vec::new();
    for _ in 0..3 {
        let q = e.queue(3).await;
        consumers.push(tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let batch = q
                    .receive(10, Duration::from_millis(100), Duration::from_secs(30))
                    .await
                    .unwrap();
                if batch.is_empty() {
                    return got;
                }
                for m in batch {
                    assert!(q.delete(&m.receipt).await.unwrap());
                    got.push(m.body);
                }
            }
        }));
    }
    let mut all = Vec::new();
    for c in consumers {
        all.extend(c.await.unwrap());
    }
    assert_eq!(all.len(), 60, "each message once");
    assert_eq!(all.iter().collect::<HashSet<_>>().len(), 60);
}

#[tokio::test]
async fn a_long_poll_returns_as_soon_as_a_message_arrives() {
    let e = Embedded::new().await;
    let q = e.queue(3).await;
    let sender = e.queue(3).await;
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        sender.send("late").await.unwrap();
    });
    let started = Instant::now();
    let m = q
        .receive(1, Duration::from_secs(5), Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(m.len(), 1);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // An empty queue waits the whole wait, no more.
    let started = Instant::now();
    assert!(
        q.receive(1, Duration::from_millis(300), NOW)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
}
