//! The "users" Lambda function: serves only the users routes (plus /health, /openapi.json).

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    handlers::lambda::run(handlers::Service::Users).await
}
