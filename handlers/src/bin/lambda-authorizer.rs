//! The "authorizer" Lambda function: API Gateway asks it whether a request to a protected
//! route carries a valid access token. See `handlers::authorizer`.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    handlers::lambda::run_authorizer().await
}
