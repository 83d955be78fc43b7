//! The auth Lambda function's entry point, for tests of its start-up checks.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    handlers::lambda::run(handlers::Service::Auth).await
}
