//! The "profiles" Lambda function: serves only the profiles routes (plus /health, /openapi.json).

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    handlers::lambda::run(handlers::Service::Profiles).await
}
