//! Lambda entry points: the same router behind API Gateway HTTP API (payload v2).
//!
//! Clients are created once per execution environment, outside the handler. There is no
//! background projector in Lambda (the environment is frozen between invocations): each
//! command catches the read models up before it answers, and a scheduled
//! `karmic projections catch-up` (or any other driver) sweeps up anything missed.

use anyhow::Result;

use crate::app::{Runtime, Service};
use crate::config::{LogFormat, Settings};

/// Run one Lambda function serving `service`'s routes.
pub async fn run(service: Service) -> Result<()> {
    let mut settings = Settings::load()?;
    if std::env::var_os("KARMIC_LOG_FORMAT").is_none() {
        settings.log_format = LogFormat::Json;
    }
    // Schema changes are applied by `karmic migrate` in the deploy, not by every cold start.
    if std::env::var_os("KARMIC_AUTO_MIGRATE").is_none() {
        settings.auto_migrate = false;
    }
    crate::telemetry::init(settings.log_format);
    let runtime = Runtime::build(settings).await?;
    let router = runtime.router(service);
    lambda_http::run(router)
        .await
        .map_err(|e| anyhow::anyhow!("lambda runtime: {e}"))
}
