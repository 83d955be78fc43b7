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
fn lambda_settings() -> Result<Settings> {
    let mut settings = Settings::load()?;
    if std::env::var_os("KARMIC_LOG_FORMAT").is_none() {
        settings.log_format = LogFormat::Json;
    }
    // Schema changes are applied by `karmic migrate` in the deploy, not by every cold start.
    if std::env::var_os("KARMIC_AUTO_MIGRATE").is_none() {
        settings.auto_migrate = false;
    }
    crate::telemetry::init(settings.log_format);
    refuse_embedded(&settings)?;
    Ok(settings)
}

/// Run one Lambda function serving `service`'s routes.
pub async fn run(service: Service) -> Result<()> {
    let settings = lambda_settings()?;
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

/// Run the projector function: every invocation (a schedule, or a nudge after commits)
/// drives all projections towards the head until caught up or out of time.
pub async fn run_projector() -> Result<()> {
    use lambda_http::lambda_runtime::{self, LambdaEvent};
    let settings = lambda_settings()?;
    let runtime = Runtime::build(settings).await?;
    let projector = runtime.projector.clone();
    lambda_runtime::run(lambda_http::service_fn(
        move |event: LambdaEvent<serde_json::Value>| {
            let projector = projector.clone();
            async move {
                let run = project_until(&projector, event.context.deadline()).await;
                Ok::<_, lambda_http::Error>(run)
            }
        },
    ))
    .await
    .map_err(|e| anyhow::anyhow!("lambda runtime: {e}"))
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
