//! The job queue's contract: what every adapter must do (SQS's semantics), run on the
//! embedded adapter and on the SQS adapter against moto (`KARMIC_TEST_MOTO_URL`, started
//! by `scripts/services.sh`). Time is counted in ticks: SQS's visibility timeouts are
//! whole seconds, the embedded queue's milliseconds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use worker::queue::{JobQueue, SqliteQueue};

/// A queue under test and how to get more handles on it.
#[async_trait::async_trait]
trait Fixture: Send + Sync {
    /// A handle on the queue under test (another consumer, or the same process after a
    /// restart).
    async fn queue(&self) -> Arc<dyn JobQueue>;
    /// The shortest visibility timeout the adapter can express.
    fn tick(&self) -> Duration;
    /// Does a stale receipt fail to delete? The embedded queue guarantees it; SQS only
    /// says such a delete "might not" happen, so workers must not rely on it.
    fn strict_receipts(&self) -> bool;
    /// Is a message handed to one consumer at a time, never two? The embedded queue
    /// guarantees it; an SQS standard queue delivers at least once (moto, under
    /// concurrent receives, does hand a message out twice), which is why every consumer
    /// of the port must be idempotent.
    fn exactly_once(&self) -> bool;
}

struct Embedded {
    _dir: tempfile::TempDir,
    url: String,
    max_receives: u32,
}

impl Embedded {
    async fn new(max_receives: u32) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/karmic.db?mode=rwc", dir.path().display());
        let e = Embedded {
            _dir: dir,
            url,
            max_receives,
        };
        e.db().await.migrate().await.unwrap();
        e
    }

    async fn db(&self) -> commands::Database {
        commands::Database::connect(&self.url, &commands::store::PoolSettings::default())
            .await
            .unwrap()
    }
}

#[async_trait::async_trait]
impl Fixture for Embedded {
    async fn queue(&self) -> Arc<dyn JobQueue> {
        let commands::Database::Sqlite(pool) = self.db().await else {
            panic!("not SQLite");
        };
        Arc::new(SqliteQueue::new(pool, "jobs", self.max_receives))
    }
    fn tick(&self) -> Duration {
        Duration::from_millis(100)
    }
    fn strict_receipts(&self) -> bool {
        true
    }
    fn exactly_once(&self) -> bool {
        true
    }
}

struct Moto {
    settings: worker::sqs::SqsSettings,
}

impl Moto {
    async fn new(max_receives: u32) -> Self {
        let endpoint = std::env::var("KARMIC_TEST_MOTO_URL")
            .unwrap_or_else(|_| "http://127.0.0.1:5000".to_owned());
        let credentials = Some(("test".to_owned(), "test".to_owned().into()));
        let client = worker::sqs::client(
            Some(&endpoint),
            "us-east-1",
            credentials.as_ref(),
            Duration::from_secs(30),
        )
        .await;
        let name = format!("jobs-{}", uuid::Uuid::new_v4().simple());
        let (queue_url, dlq) = worker::sqs::create_with_dead_letter_queue(
            &client,
            &name,
            max_receives,
            Duration::from_secs(30),
        )
        .await
        .expect("moto must be running (scripts/services.sh)");
        Moto {
            settings: worker::sqs::SqsSettings {
                endpoint: Some(endpoint),
                queue_url,
                // Found from the redrive policy on one handle, given on the others.
                dead_letter_url: max_receives.is_multiple_of(2).then_some(dlq),
                region: "us-east-1".to_owned(),
                credentials,
                operation_timeout: Duration::from_secs(30),
            },
        }
    }
}

#[async_trait::async_trait]
impl Fixture for Moto {
    async fn queue(&self) -> Arc<dyn JobQueue> {
        Arc::new(
            worker::sqs::SqsQueue::connect(&self.settings)
                .await
                .unwrap(),
        )
    }
    fn tick(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn strict_receipts(&self) -> bool {
        false
    }
    fn exactly_once(&self) -> bool {
        false
    }
}

macro_rules! contract {
    ($adapter:ident, $make:expr) => {
        mod $adapter {
            use super::*;

            #[tokio::test]
            async fn a_received_message_is_hidden_then_comes_back_with_a_new_receipt() {
                super::hidden_then_back(&$make(3).await).await;
            }
            #[tokio::test]
            async fn a_heartbeat_keeps_a_message_hidden() {
                super::heartbeat(&$make(3).await).await;
            }
            #[tokio::test]
            async fn a_message_received_too_often_goes_to_the_dead_letter_queue() {
                super::too_often(&$make(2).await).await;
            }
            #[tokio::test]
            async fn a_message_can_be_dead_lettered_at_once() {
                super::at_once(&$make(5).await).await;
            }
            #[tokio::test]
            async fn messages_survive_a_new_handle() {
                super::survive(&$make(3).await).await;
            }
            #[tokio::test]
            async fn concurrent_consumers_get_every_message() {
                super::concurrent(&$make(3).await).await;
            }
            #[tokio::test]
            async fn a_long_poll_returns_as_soon_as_a_message_arrives() {
                super::long_poll(&$make(3).await).await;
            }
            #[tokio::test]
            async fn a_message_given_back_keeps_its_receive_count_and_never_dead_letters() {
                super::given_back(&$make(2).await).await;
            }
            #[tokio::test]
            async fn a_receive_dropped_mid_poll_gives_its_messages_back() {
                super::dropped_receive(&$make(3).await).await;
            }
        }
    };
}

contract!(embedded, Embedded::new);
contract!(sqs_on_moto, Moto::new);

const NOW: Duration = Duration::ZERO;

async fn hidden_then_back(f: &dyn Fixture) {
    let t = f.tick();
    let q = f.queue().await;
    q.send("hello").await.unwrap();
    let first = q.receive(10, NOW, t * 3).await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(
        (first[0].body.as_str(), first[0].receive_count),
        ("hello", 1)
    );
    // Hidden while its visibility lasts.
    assert!(q.receive(10, NOW, t * 10).await.unwrap().is_empty());
    tokio::time::sleep(t * 14).await;
    let second = q.receive(10, NOW, Duration::from_secs(30)).await.unwrap();
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].receive_count, 2);
    assert_ne!(second[0].receipt, first[0].receipt);
    // Only the latest receipt counts.
    if f.strict_receipts() {
        assert!(!q.delete(&first[0].receipt).await.unwrap());
        assert!(!q.change_visibility(&first[0].receipt, NOW).await.unwrap());
    }
    assert!(q.delete(&second[0].receipt).await.unwrap());
    tokio::time::sleep(t / 10).await;
    assert!(q.receive(10, NOW, NOW).await.unwrap().is_empty());
}

async fn heartbeat(f: &dyn Fixture) {
    let t = f.tick();
    let q = f.queue().await;
    q.send("long job").await.unwrap();
    let m = q.receive(1, NOW, t * 3).await.unwrap();
    tokio::time::sleep(t * 3 / 2).await;
    assert!(q.change_visibility(&m[0].receipt, t * 20).await.unwrap());
    tokio::time::sleep(t * 4).await;
    assert!(
        q.receive(1, NOW, NOW).await.unwrap().is_empty(),
        "visible despite the heartbeat"
    );
}

async fn too_often(f: &dyn Fixture) {
    let t = f.tick();
    let q = f.queue().await;
    q.send("poison").await.unwrap();
    for n in 1..=2 {
        let m = q.receive(1, t * 3, t).await.unwrap();
        assert_eq!(m[0].receive_count, n);
        tokio::time::sleep(t * 3 / 2).await;
    }
    // The third receive finds it gone to the dead-letter queue.
    assert!(q.receive(1, NOW, NOW).await.unwrap().is_empty());
    let dead = q.dead_letters().await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].1, "poison");
}

async fn at_once(f: &dyn Fixture) {
    let q = f.queue().await;
    q.send("corrupt").await.unwrap();
    let m = q.receive(1, NOW, Duration::from_secs(30)).await.unwrap();
    assert!(q.dead_letter(&m[0]).await.unwrap());
    if f.strict_receipts() {
        assert!(!q.dead_letter(&m[0]).await.unwrap(), "the receipt is spent");
    }
    assert_eq!(q.dead_letters().await.unwrap().len(), 1);
    assert!(q.receive(1, NOW, NOW).await.unwrap().is_empty());
}

async fn survive(f: &dyn Fixture) {
    let t = f.tick();
    {
        let q = f.queue().await;
        q.send("kept").await.unwrap();
        // Received and then the process dies: it comes back when its visibility ends.
        q.send("in flight").await.unwrap();
        let m = q.receive(1, NOW, t * 2).await.unwrap();
        assert_eq!(m[0].body, "kept");
    }
    let q = f.queue().await;
    tokio::time::sleep(t * 3).await;
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

async fn concurrent(f: &dyn Fixture) {
    let q = f.queue().await;
    for i in 0..60 {
        q.send(&format!("m{i}")).await.unwrap();
    }
    let mut consumers = Vec::new();
    for _ in 0..3 {
        let q = f.queue().await;
        consumers.push(tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let batch = q
                    .receive(10, Duration::from_secs(1), Duration::from_secs(30))
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
    // Every message is delivered; with exactly-once delivery, each only once.
    assert_eq!(all.iter().collect::<HashSet<_>>().len(), 60);
    if f.exactly_once() {
        assert_eq!(all.len(), 60, "each message once");
    }
}

async fn long_poll(f: &dyn Fixture) {
    let q = f.queue().await;
    let sender = f.queue().await;
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
        q.receive(1, Duration::from_secs(1), NOW)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(started.elapsed() >= Duration::from_millis(900));
}

async fn given_back(f: &dyn Fixture) {
    let t = f.tick();
    let q = f.queue().await;
    q.send("outage").await.unwrap();
    // Far more receives than the queue allows (2), each given back: an outage that
    // keeps failing before any work never walks the message to the dead-letter queue.
    let mut last = None;
    for n in 0..4 {
        let m = q.receive(1, t * 3, t * 30).await.unwrap();
        assert_eq!(m.len(), 1, "the message must come back");
        assert_eq!(m[0].body, "outage");
        assert_eq!(m[0].receive_count, 1, "a given-back receive is not spent");
        assert_eq!(m[0].given_back, n, "give-backs are counted");
        assert!(q.give_back(&m[0], NOW).await.unwrap());
        last = Some(m[0].clone());
    }
    if f.strict_receipts() {
        assert!(
            !q.delete(&last.unwrap().receipt).await.unwrap(),
            "the receipt is spent"
        );
    }
    assert!(q.dead_letters().await.unwrap().is_empty());
    // Released (nothing failed): back at once, neither receive nor give-back counted.
    let m = q.receive(1, t * 3, t * 30).await.unwrap();
    assert!(q.release(&m[0]).await.unwrap());
    let m = q.receive(1, t * 3, t * 30).await.unwrap();
    assert_eq!((m[0].receive_count, m[0].given_back), (1, 4));
    // Given back with a delay: hidden until it is over.
    assert!(q.give_back(&m[0], t * 10).await.unwrap());
    assert!(
        q.receive(1, NOW, t * 30).await.unwrap().is_empty(),
        "hidden for the delay"
    );
    tokio::time::sleep(t * 10).await;
    let m = q.receive(1, t * 5, t * 30).await.unwrap();
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].receive_count, 1);
    assert_eq!(m[0].given_back, 5);
}

async fn dropped_receive(f: &dyn Fixture) {
    let q = f.queue().await;
    q.send("in the poll").await.unwrap();
    // The receive starts, takes the message, and its caller goes away (a worker shutting
    // down mid-poll) at every point in between.
    for cut in [0, 1, 5, 20, 100] {
        match tokio::time::timeout(
            Duration::from_millis(cut),
            q.receive(10, Duration::from_secs(2), Duration::from_secs(60)),
        )
        .await
        {
            // Finished in time: handed over, so ours to give back.
            Ok(got) => {
                for m in got.unwrap() {
                    assert!(q.release(&m).await.unwrap());
                }
            }
            // Cut short (always at 0 ms): the receive must give back what it took.
            Err(_elapsed) => {}
        }
        q.close().await;
        let m = q
            .receive(10, Duration::from_secs(3), Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(m.len(), 1, "cut after {cut} ms: the message was stranded");
        assert_eq!(m[0].receive_count, 1, "cut after {cut} ms");
        assert_eq!(
            m[0].given_back, 0,
            "cut after {cut} ms: a release is no give-back"
        );
        assert!(q.release(&m[0]).await.unwrap());
    }
}
