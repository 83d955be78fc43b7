//! The "projector" Lambda function: invoked on a schedule (and optionally after commits),
//! it drives every projection to the head of the event store, so that read models advance
//! when no request is running. See `handlers::lambda`.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    handlers::lambda::run_projector().await
}
