//! The `karmic` command line: run the server, migrate, and operate the system.

pub mod dlq;
pub mod events;
pub mod system;

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use commands::CommandMeta;
use domain::Email;
use handlers::{Runtime, Settings};

#[derive(Debug, Parser)]
#[command(
    name = "karmic",
    version,
    about = "Karmic: an event-sourced document backend"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the HTTP API and the projector. With no configuration: embedded SQLite under
    /// ./karmic-data (KARMIC_DATA_DIR), listening on 127.0.0.1:8080 (KARMIC_HTTP_ADDR),
    /// with its own S3 endpoint on 127.0.0.1:8081 (KARMIC_S3_EMBEDDED_ADDR) and the
    /// document worker in-process.
    Serve,
    /// Run the document worker: long-poll the queue (SQS when KARMIC_SQS_QUEUE_URL is
    /// set), analyse each upload in an isolated child process, record the outcome.
    Worker,
    /// The isolated analysis process the worker starts (not for use by hand).
    #[command(hide = true)]
    AnalyzeChild {
        /// The settings the worker sends (JSON).
        settings: String,
    },
    /// Apply the database migrations and exit.
    Migrate,
    /// Manage accounts.
    Users {
        #[command(subcommand)]
        command: UsersCommand,
    },
    /// Operate projections.
    Projections {
        #[command(subcommand)]
        command: ProjectionsCommand,
    },
    /// Failed analysis jobs: list, show, redrive, purge, replay from the event store
    /// (SQS when KARMIC_SQS_QUEUE_URL is set, else the embedded queue).
    Dlq {
        #[command(subcommand)]
        command: dlq::DlqCommand,
    },
    /// Read, export, replay and verify the event history (auditors).
    Events {
        #[command(subcommand)]
        command: events::EventsCommand,
    },
    /// Print the OpenAPI document.
    Openapi,
}

/// An outcome a script can tell from others by the exit code (documented in the README):
/// 0 success, 1 an operation failed (the store or a queue could not be reached, …),
/// 2 the command line is wrong, 3 a check found a problem (`events verify`), 4 nothing
/// matched what was named.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    pub fn usage(message: impl Into<String>) -> Failure {
        Failure {
            code: 2,
            message: message.into(),
        }
    }

    pub fn check(message: impl Into<String>) -> Failure {
        Failure {
            code: 3,
            message: message.into(),
        }
    }

    pub fn not_found(message: impl Into<String>) -> Failure {
        Failure {
            code: 4,
            message: message.into(),
        }
    }
}

#[derive(Debug, Subcommand)]
enum UsersCommand {
    /// Give the admin role to the account with this email.
    GrantAdmin { email: String },
    /// Take the admin role from the account with this email.
    RevokeAdmin { email: String },
    /// Deactivate the account with this email (it can no longer sign in or write).
    Deactivate { email: String },
}

#[derive(Debug, Subcommand)]
enum ProjectionsCommand {
    /// Bring every projection up to the head of the event store once.
    CatchUp,
    /// Per projection: checkpoint, head of the event store, lag in events and seconds.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Compare a read model with a fresh fold of the event store; exit 1 on differences.
    Verify {
        /// `profiles` or `users`.
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Rebuild a read model from position zero into a new collection/table, then switch
    /// reads to it atomically. Safe to interrupt and run again.
    Rebuild {
        /// `profiles` or `users`.
        name: String,
    },
}

async fn projections(settings: Settings, command: ProjectionsCommand) -> Result<()> {
    use projections::ops;
    use std::io::Write;
    let rt = Runtime::build(settings).await?;
    let mut out = std::io::stdout().lock();
    match command {
        ProjectionsCommand::CatchUp => {
            // Everything committed before the command, once the feed can show it.
            let report = rt
                .projector
                .catch_up_through_now(std::time::Duration::from_secs(5))
                .await?;
            for (name, n) in &report.applied {
                writeln!(out, "{name}: applied {n} events")?;
            }
            for name in &report.busy {
                writeln!(out, "{name}: busy (another driver holds its lease)")?;
            }
            if !report.failed.is_empty() {
                anyhow::bail!("projections failed: {:?}", report.failed);
            }
        }
        ProjectionsCommand::Status { json } => {
            let st = ops::status(&rt.projector).await?;
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&st)?)?;
            } else {
                writeln!(
                    out,
                    "{:<22} {:>18} {:>18} {:>10} {:>10}",
                    "PROJECTION", "CHECKPOINT", "HEAD", "LAG", "LAG (s)"
                )?;
                for s in st {
                    writeln!(
                        out,
                        "{:<22} {:>18} {:>18} {:>10} {:>10.1}",
                        s.name,
                        s.checkpoint,
                        s.head.unwrap_or_else(|| "-".to_owned()),
                        s.lag_events,
                        s.lag_seconds
                    )?;
                }
            }
        }
        ProjectionsCommand::Verify { name, json } => {
            let feed = rt.projector.feed().clone();
            let diffs = match name.as_str() {
                "profiles" => ops::verify_profiles(&*feed, &*rt.state.profile_reader).await?,
                "users" => ops::verify_users(&*feed, &rt.state.read_models).await?,
                other => anyhow::bail!("no read model named {other:?} (profiles, users)"),
            };
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&diffs)?)?;
            } else if diffs.is_empty() {
                writeln!(
                    out,
                    "{name}: the read model equals a fresh fold of the event store"
                )?;
            } else {
                for d in &diffs {
                    writeln!(out, "{d}")?;
                }
            }
            if !diffs.is_empty() {
                anyhow::bail!("{name}: {} difference(s)", diffs.len());
            }
        }
        ProjectionsCommand::Rebuild { name } => {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:30}] {pos}/{len} events, {per_sec}, ETA {eta}",
                )?
                .progress_chars("=> "),
            );
            bar.set_message(format!("rebuilding {name}"));
            let b = bar.clone();
            let started = std::time::Instant::now();
            let progress = move |done, total| {
                b.set_length(total);
                b.set_position(done);
            };
            let n = match name.as_str() {
                "profiles" => {
                    ops::rebuild_profiles(&rt.projector, rt.state.profile_reader.clone(), &progress)
                        .await?
                }
                "users" => {
                    ops::rebuild_users(&rt.projector, &rt.state.read_models, &progress).await?
                }
                other => {
                    anyhow::bail!("no projection named {other:?} can be rebuilt (profiles, users)")
                }
            };
            bar.finish_and_clear();
            let secs = started.elapsed().as_secs_f64();
            writeln!(
                out,
                "{name}: rebuilt from {n} events in {secs:.1} s ({:.0} events/s); reads switched",
                n as f64 / secs.max(1e-9)
            )?;
        }
    }
    Ok(())
}

/// Run the CLI with the process's arguments.
pub async fn main_entry() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            match e.downcast_ref::<Failure>() {
                Some(f) => ExitCode::from(f.code),
                None => ExitCode::FAILURE,
            }
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    if let Command::AnalyzeChild { .. } = cli.command {
        // Reads stdin, writes stdout; its exit code is the result's.
        let code = worker::isolate::child_main();
        if code == ExitCode::SUCCESS {
            return Ok(());
        }
        anyhow::bail!("the analysis could not report its result");
    }
    if let Command::Openapi = cli.command {
        use std::io::Write;
        std::io::stdout().write_all(handlers::openapi::document().as_bytes())?;
        return Ok(());
    }
    let mut settings = Settings::load()?;
    handlers::telemetry::init(settings.log_format);
    // On a worker host in AWS, secrets come from Secrets Manager (KARMIC_*_SECRET_ARN).
    settings.resolve_secrets().await?;
    tracing::info!(config = %settings.redacted_summary(), "configuration");
    match cli.command {
        Command::Serve => {
            let system = system::System::build(settings).await?;
            system.run_until(handlers::app::shutdown_signal()).await
        }
        Command::Worker => system::run_worker(settings).await,
        Command::Migrate => {
            let mut s = settings;
            s.auto_migrate = true;
            Runtime::build(s).await?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Command::Users { command } => {
            let rt = Runtime::build(settings).await?;
            let (email, what) = match &command {
                UsersCommand::GrantAdmin { email } => (email, "grant-admin"),
                UsersCommand::RevokeAdmin { email } => (email, "revoke-admin"),
                UsersCommand::Deactivate { email } => (email, "deactivate"),
            };
            let email = Email::parse(email).context("not a valid email")?;
            let meta = CommandMeta::system("cli");
            let accounts = &rt.state.accounts;
            let result = match &command {
                UsersCommand::GrantAdmin { .. } => accounts.grant_admin(&email, &meta).await,
                UsersCommand::RevokeAdmin { .. } => accounts.revoke_admin(&email, &meta).await,
                UsersCommand::Deactivate { .. } => accounts.deactivate(&email, &meta).await,
            };
            let user_id = result.with_context(|| format!("{what} {email}"))?;
            rt.projector.catch_up().await?;
            tracing::info!(%user_id, %email, change = what, "account changed");
            Ok(())
        }
        Command::Projections { command } => projections(settings, command).await,
        Command::Dlq { command } => {
            let rt = Runtime::build(settings).await?;
            let (queue, dead) = system::queues(&rt).await?;
            let dlq = worker::dlq::Dlq {
                queue,
                dead,
                documents: rt.state.documents.clone(),
                db: rt.state.db.clone(),
                bucket: rt.settings.s3_bucket.clone(),
                // A live job writes an event at least every visibility timeout, and a
                // message given back (store or bucket unreachable) waits up to 15 min a
                // time, about 50 min in all, without one: an hour of quiet is a dead job.
                stale_after: rt
                    .settings
                    .worker_visibility
                    .max(std::time::Duration::from_secs(3600)),
            };
            let result = dlq::run(&dlq, command).await;
            if result.is_ok() {
                // Read models see the redrives now rather than at the next catch-up.
                let _ = rt.projector.catch_up().await;
            }
            result
        }
        Command::Events { command } => {
            let db = handlers::app::connect(&settings).await?;
            let result = events::run(&db, command).await;
            db.close().await;
            result
        }
        Command::Openapi | Command::AnalyzeChild { .. } => Ok(()),
    }
}
