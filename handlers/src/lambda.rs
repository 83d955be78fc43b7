//! Lambda entry points: the same router behind API Gateway HTTP API (payload v2).
//!
//! Clients are created once per execution environment, outside the handler. There is no
//! background projector in Lambda (the environment is frozen between invocations, and may
//! be destroyed): each command catches the read models up before it answers, inside the
//! invocation, and cancels that pass rather than leave it running when its wait is over.
//! What no request projects, the **projector function** (`lambda-projector`, invoked on a
//! schedule) does: it drives every projection to the head within its time budget.
//! Projection leases are rows with an expiry, so a frozen container holds nobody up for
//! longer than `KARMIC_PROJECTION_LEASE_MS`.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use anyhow::Result;
use projections::Projector;

use crate::app::{Runtime, Service};
use crate::config::{LogFormat, Settings};

/// Settings for a Lambda function: JSON logs and no migrations unless asked for; refuses
/// the embedded store.
async fn lambda_settings() -> Result<Settings> {
    let mut settings = Settings::load()?;
    if std::env::var_os("KARMIC_LOG_FORMAT").is_none() {
        settings.log_format = LogFormat::Json;
    }
    // Schema changes are applied by `karmic migrate` in the deploy, not by every cold start.
    if std::env::var_os("KARMIC_AUTO_MIGRATE").is_none() {
        settings.auto_migrate = false;
    }
    crate::telemetry::init(settings.log_format);
    settings.resolve_secrets().await?;
    refuse_embedded(&settings)?;
    Ok(settings)
}

/// Run one Lambda function serving `service`'s routes.
pub async fn run(service: Service) -> Result<()> {
    let settings = lambda_settings().await?;
    let runtime = Runtime::build(settings).await?;
    let router = runtime.router(service);
    lambda_http::run(router)
        .await
        .map_err(|e| anyhow::anyhow!("lambda runtime: {e}"))
}

/// A Lambda function is one of many short-lived copies: the embedded store (a private
/// SQLite file, a JWT secret of its own) would silently split the system into as many
/// systems. Refuse to start instead.
pub fn refuse_embedded(settings: &Settings) -> Result<()> {
    if settings.is_embedded() {
        anyhow::bail!(
            "KARMIC_DATABASE_URL must be set in Lambda: the embedded store is for one local process"
        );
    }
    if settings.jwt_secret.is_none() {
        anyhow::bail!("KARMIC_JWT_SECRET must be set in Lambda");
    }
    Ok(())
}

/// Run the authorizer function (`crate::authorizer`). It needs only the signing key (no
/// database, no read model), so its cold start is the settings, the logs and the key.
pub async fn run_authorizer() -> Result<()> {
    use aws_lambda_events::apigw::ApiGatewayV2CustomAuthorizerV2Request;
    use lambda_http::lambda_runtime::{self, LambdaEvent};
    let mut settings = Settings::load()?;
    if std::env::var_os("KARMIC_LOG_FORMAT").is_none() {
        settings.log_format = LogFormat::Json;
    }
    crate::telemetry::init(settings.log_format);
    settings.resolve_secrets().await?;
    let secret = settings.jwt_secret.as_ref().ok_or_else(|| {
        anyhow::anyhow!("KARMIC_JWT_SECRET_ARN (or KARMIC_JWT_SECRET) must be set in Lambda")
    })?;
    let tokens = std::sync::Arc::new(crate::auth::HmacTokens::new(
        secret,
        &settings.jwt_issuer,
        &settings.jwt_audience,
        settings.token_ttl,
    ));
    lambda_runtime::run(lambda_http::service_fn(
        move |event: LambdaEvent<ApiGatewayV2CustomAuthorizerV2Request>| {
            let tokens = tokens.clone();
            async move {
                Ok::<_, lambda_http::Error>(crate::authorizer::authorize(
                    tokens.as_ref(),
                    &event.payload,
                ))
            }
        },
    ))
    .await
    .map_err(|e| anyhow::anyhow!("lambda runtime: {e}"))
}

/// Run the projector function: every invocation (a schedule, or a nudge after commits)
/// drives all projections towards the head until caught up or out of time, then logs the
/// lag left as a metric ([`lag_metric`]). Invoked with `{"action": "migrate"}`, it
/// applies the database migrations instead (the deploy's migration step: the database is
/// reachable only from inside the VPC).
pub async fn run_projector() -> Result<()> {
    use lambda_http::lambda_runtime::{self, LambdaEvent};
    let settings = lambda_settings().await?;
    let runtime = Runtime::build(settings.clone()).await?;
    let projector = runtime.projector.clone();
    let stage = std::env::var("KARMIC_STAGE").unwrap_or_else(|_| "local".to_owned());
    lambda_runtime::run(lambda_http::service_fn(
        move |event: LambdaEvent<serde_json::Value>| {
            let projector = projector.clone();
            let stage = stage.clone();
            let settings = settings.clone();
            async move {
                // The deploy's migration step (infra/README.md): `{"action": "migrate"}`
                // does what `karmic migrate` does: the SQL schema and the DocumentDB
                // indexes, by building the runtime with migrations on.
                match event.payload.get("action") {
                    None => {}
                    Some(a) if a == "migrate" => {
                        let mut s = settings;
                        s.auto_migrate = true;
                        Runtime::build(s)
                            .await
                            .map_err(|e| lambda_http::Error::from(format!("migrating: {e:#}")))?;
                        tracing::info!("migrations applied");
                        return Ok(serde_json::json!({"migrated": true}));
                    }
                    Some(other) => {
                        return Err(lambda_http::Error::from(format!(
                            "unknown action {other}: the projector function takes no payload, or {{\"action\": \"migrate\"}}"
                        )));
                    }
                }
                let run = project_until(&projector, event.context.deadline()).await;
                // What is left behind, for the projection-lag alarm. When the store cannot
                // be read, nothing is published, and the alarm counts the gap as lag.
                match projections::ops::status(&projector).await {
                    Ok(statuses) => {
                        // A line of its own on stdout, which Lambda sends to CloudWatch
                        // Logs (where EMF lines become metrics).
                        use std::io::Write as _;
                        let line = lag_metric(&stage, &statuses, now_ms());
                        let _ = writeln!(std::io::stdout().lock(), "{line}");
                    }
                    Err(e) => tracing::warn!(error = %format!("{e:#}"), "projection lag not measured"),
                }
                Ok::<_, lambda_http::Error>(serde_json::to_value(run)?)
            }
        },
    ))
    .await
    .map_err(|e| anyhow::anyhow!("lambda runtime: {e}"))
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

/// The projection lag as a CloudWatch Embedded Metric Format log line: namespace
/// `Karmic`, dimension `Stage`, the age in seconds of the oldest event some projection
/// has not applied (`ProjectionLagSeconds`, 0 when every one is caught up) and how many
/// events that projection is behind (`ProjectionLagEvents`). CloudWatch Logs turns the
/// line into metrics; the template's alarm watches the first.
pub fn lag_metric(
    stage: &str,
    statuses: &[projections::ops::ProjectionStatus],
    timestamp_ms: u128,
) -> serde_json::Value {
    let seconds = statuses
        .iter()
        .map(|s| s.lag_seconds)
        .fold(0.0_f64, f64::max);
    let events = statuses.iter().map(|s| s.lag_events).max().unwrap_or(0);
    serde_json::json!({
        "_aws": {
            "Timestamp": timestamp_ms,
            "CloudWatchMetrics": [{
                "Namespace": "Karmic",
                "Dimensions": [["Stage"]],
                "Metrics": [
                    {"Name": "ProjectionLagSeconds", "Unit": "Seconds"},
                    {"Name": "ProjectionLagEvents", "Unit": "Count"},
                ],
            }],
        },
        "Stage": stage,
        "ProjectionLagSeconds": seconds,
        "ProjectionLagEvents": events,
    })
}

/// What one projector invocation did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct ProjectorRun {
    pub applied: BTreeMap<String, usize>,
    pub failed: BTreeMap<String, String>,
    pub busy: Vec<String>,
    /// Every projection reached the head of the feed.
    pub caught_up: bool,
}

/// How much of the invocation's time is kept back for answering.
const DEADLINE_MARGIN: Duration = Duration::from_secs(2);

/// Drive every projection towards the head until caught up or `deadline` (less a margin)
/// comes; a pass still running then is cancelled (safe at any point).
pub async fn project_until(projector: &Projector, deadline: SystemTime) -> ProjectorRun {
    let mut run = ProjectorRun::default();
    let time_left = || {
        deadline
            .duration_since(SystemTime::now())
            .unwrap_or_default()
            .saturating_sub(DEADLINE_MARGIN)
    };
    // Everything committed before the invocation is projected by it: wait (within the
    // budget) until the gap-safe feed can show all of it.
    let left = time_left();
    if left.is_zero() {
        return run;
    }
    if let Err(e) = projector
        .wait_until_feed_shows_now(left.min(Duration::from_secs(5)))
        .await
    {
        run.failed.insert("*".to_owned(), format!("{e:#}"));
        return run;
    }
    loop {
        let left = time_left();
        if left.is_zero() {
            return run;
        }
        let report = match tokio::time::timeout(left, projector.catch_up()).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                run.failed.insert("*".to_owned(), format!("{e:#}"));
                return run;
            }
            Err(_) => return run,
        };
        let mut progressed = false;
        for (name, n) in &report.applied {
            *run.applied.entry((*name).to_owned()).or_default() += n;
            progressed |= *n > 0;
        }
        for (name, e) in &report.failed {
            run.failed.insert((*name).to_owned(), e.clone());
        }
        run.busy = report.busy.iter().map(|b| (*b).to_owned()).collect();
        if !report.failed.is_empty() {
            return run;
        }
        if !progressed && report.busy.is_empty() {
            run.caught_up = true;
            return run;
        }
        if !progressed {
            // Someone else holds a lease: give them a moment.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use projections::ops::ProjectionStatus;

    fn status(name: &str, lag_events: i64, lag_seconds: f64) -> ProjectionStatus {
        ProjectionStatus {
            name: name.to_owned(),
            checkpoint: "0".to_owned(),
            head: None,
            lag_events,
            lag_seconds,
        }
    }

    #[test]
    fn the_lag_metric_is_an_embedded_metric_format_line_of_the_worst_projection() {
        let line = lag_metric(
            "prod",
            &[
                status("users", 0, 0.0),
                status("documents", 12, 42.5),
                status("profiles", 30, 3.0),
            ],
            1_796_612_645_000,
        );
        let directive = &line["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(line["_aws"]["Timestamp"], 1_796_612_645_000_u64);
        assert_eq!(directive["Namespace"], "Karmic");
        assert_eq!(directive["Dimensions"], serde_json::json!([["Stage"]]));
        // Every metric named in the directive is a member of the line, as EMF requires.
        for m in directive["Metrics"].as_array().unwrap() {
            assert!(line.get(m["Name"].as_str().unwrap()).is_some(), "{m}");
        }
        assert_eq!(line["Stage"], "prod");
        assert_eq!(line["ProjectionLagSeconds"], 42.5);
        assert_eq!(line["ProjectionLagEvents"], 30);
        // Caught up: zeros, still published (a missing point means the projector did not run).
        let idle = lag_metric("prod", &[status("users", 0, 0.0)], 0);
        assert_eq!(idle["ProjectionLagSeconds"], 0.0);
        assert_eq!(idle["ProjectionLagEvents"], 0);
    }
}
