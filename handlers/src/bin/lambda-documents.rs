//! The "documents" Lambda function: serves only the documents routes (plus /health, /openapi.json).

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    handlers::lambda::run(handlers::Service::Documents).await
}
