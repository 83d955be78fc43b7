//! A projection driver that claims the `users` projection and then blocks forever inside
//! its batch, as a Lambda container frozen mid-pass would. The failure tests start it,
//! wait for "applying" on its standard output, and SIGSTOP it.
//!
//! Usage: stuck-projector DATABASE_URL LEASE_MS
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use commands::store::PoolSettings;
use commands::{Database, StoredEvent};
use projections::{CheckpointStore, Projection, Projector, ProjectorSettings};

struct Stuck;

#[async_trait::async_trait]
impl Projection for Stuck {
    fn name(&self) -> &'static str {
        "users"
    }

    async fn apply(&self, _events: &[StoredEvent]) -> anyhow::Result<()> {
        println!("applying");
        std::io::stdout().flush().unwrap();
        std::future::pending::<()>().await;
        Ok(())
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let url = &args[1];
    let lease = Duration::from_millis(args[2].parse().unwrap());
    let db = Database::connect(url, &PoolSettings::default())
        .await
        .unwrap();
    let projector = Projector::new(
        db.feed(),
        CheckpointStore::new(&db).with_lease(lease),
        vec![Arc::new(Stuck)],
        ProjectorSettings::default(),
    );
    let _ = projector
        .catch_up_through_now(Duration::from_secs(10))
        .await;
}
