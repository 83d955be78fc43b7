//! The "auth" Lambda function: serves only the auth routes (plus /health, /openapi.json).

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    handlers::lambda::run(handlers::Service::Auth).await
}
