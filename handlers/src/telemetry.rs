//! Logging: JSON lines in production, human-readable locally. `RUST_LOG` filters.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::config::LogFormat;

pub fn init(format: LogFormat) {
    let _ = match format {
        LogFormat::Json => json_subscriber(filter(), std::io::stderr)
            .try_init()
            .map_err(|e| e.to_string()),
        LogFormat::Pretty => tracing_subscriber::fmt()
            .with_env_filter(filter())
            .with_writer(std::io::stderr)
            .compact()
            .try_init()
            .map_err(|e| e.to_string()),
    };
}

fn filter() -> EnvFilter {
    EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,tower_http=info"))
}

/// The production format: one JSON object per line, the event's fields flattened, the
/// current span's fields (request id, user id, X-Ray trace id…) under `span`.
pub fn json_subscriber<W>(filter: EnvFilter, writer: W) -> impl tracing::Subscriber + Send + Sync
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .json()
        .flatten_event(true)
        .with_current_span(true)
        .with_span_list(false)
        .finish()
}
