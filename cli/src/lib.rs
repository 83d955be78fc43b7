//! The `karmic` command line: run the server, migrate, and operate the system.

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use commands::CommandMeta;
use domain::Email;
use handlers::{Application, Runtime, Settings};

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
    /// ./karmic-data (KARMIC_DATA_DIR), listening on 127.0.0.1:8080 (KARMIC_HTTP_ADDR).
    Serve,
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
    /// Print the OpenAPI document.
    Openapi,
}

#[derive(Debug, Subcommand)]
enum UsersCommand {
    /// Give the admin role to the account with this email.
    GrantAdmin { email: String },
    /// Take the admin role from the account with this email.
    RevokeAdmin { email: String },
}

#[derive(Debug, Subcommand)]
enum ProjectionsCommand {
    /// Bring every projection up to the head of the event store once.
    CatchUp,
}

/// Run the CLI with the process's arguments.
pub async fn main_entry() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    if let Command::Openapi = cli.command {
        use std::io::Write;
        std::io::stdout().write_all(handlers::openapi::document().as_bytes())?;
        return Ok(());
    }
    let settings = Settings::load()?;
    handlers::telemetry::init(settings.log_format);
    tracing::info!(config = %settings.redacted_summary(), "configuration");
    match cli.command {
        Command::Serve => {
            let app = Application::build(settings).await?;
            app.run_until(handlers::app::shutdown_signal()).await
        }
        Command::Migrate => {
            let mut s = settings;
            s.auto_migrate = true;
            Runtime::build(s).await?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Command::Users { command } => {
            let rt = Runtime::build(settings).await?;
            let (email, grant) = match &command {
                UsersCommand::GrantAdmin { email } => (email, true),
                UsersCommand::RevokeAdmin { email } => (email, false),
            };
            let email = Email::parse(email).context("not a valid email")?;
            let meta = CommandMeta::system("cli");
            let result = if grant {
                rt.state.accounts.grant_admin(&email, &meta).await
            } else {
                rt.state.accounts.revoke_admin(&email, &meta).await
            };
            let user_id = result.with_context(|| format!("changing the role of {email}"))?;
            rt.projector.catch_up().await?;
            tracing::info!(%user_id, %email, admin = grant, "role changed");
            Ok(())
        }
        Command::Projections {
            command: ProjectionsCommand::CatchUp,
        } => {
            let rt = Runtime::build(settings).await?;
            let report = rt.projector.catch_up().await?;
            for (name, n) in &report.applied {
                tracing::info!(projection = name, applied = n, "caught up");
            }
            if !report.failed.is_empty() {
                anyhow::bail!("projections failed: {:?}", report.failed);
            }
            Ok(())
        }
        Command::Openapi => Ok(()),
    }
}
