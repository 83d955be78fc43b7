//! `karmic dlq …`: the operators' commands for failed analysis jobs (SQS in the AWS
//! configuration, the embedded queue otherwise). The logic is `worker::dlq`; this is the
//! command line around it: tables, `--json`, progress bars, confirmation, exit codes.

use std::io::{IsTerminal, Write};

use anyhow::Result;
use clap::Subcommand;
use domain::JobId;
use worker::dlq::{Dlq, Entry, RedriveOptions, RedriveReport};

use crate::Failure;

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// The dead letters: job, document, attempts, last error, when dead-lettered.
    List {
        #[arg(long)]
        json: bool,
    },
    /// One job: its dead letters (with the raw message) and its full event history.
    Show {
        /// The job id.
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Send dead-lettered jobs round again: for each, `JobRedriven` is recorded first,
    /// then the message is re-sent, then the dead letter deleted. Safe to run again after
    /// an interruption.
    Redrive {
        /// Every dead letter.
        #[arg(long, conflicts_with = "id", required_unless_present = "id")]
        all: bool,
        /// Only this job (repeatable).
        #[arg(long)]
        id: Vec<String>,
        /// At most this many jobs.
        #[arg(long)]
        max: Option<u64>,
        /// Say what would happen; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Why (recorded in each JobRedriven event).
        #[arg(long)]
        reason: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete every dead letter (the jobs stay dead-lettered in the event store, so
    /// `dlq replay --from-events` can still bring them back).
    Purge {
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        #[arg(long)]
        json: bool,
    },
    /// Re-enqueue every job whose history ends dead-lettered, from the event store, even
    /// when the queue no longer holds its message.
    Replay {
        /// Read the jobs from the event store (the only source there is).
        #[arg(long, required = true)]
        from_events: bool,
        /// Only jobs dead-lettered at or after this time (RFC 3339 or a date).
        #[arg(long)]
        since: Option<String>,
        /// Only this job (repeatable).
        #[arg(long)]
        id: Vec<String>,
        #[arg(long)]
        max: Option<u64>,
        #[arg(long)]
        dry_run: bool,
        /// Why (recorded in each JobRedriven event).
        #[arg(long)]
        reason: String,
        #[arg(long)]
        json: bool,
    },
}

fn job_ids(ids: &[String]) -> Result<Vec<JobId>> {
    ids.iter()
        .map(|s| JobId::parse(s).map_err(|_| Failure::usage(format!("not a job id: {s:?}")).into()))
        .collect()
}

/// Who runs the command, for the events: `KARMIC_OPERATOR`, else the login name.
fn operator() -> String {
    std::env::var("KARMIC_OPERATOR")
        .or_else(|_| std::env::var("USER"))
        .map(|u| format!("operator:{u}"))
        .unwrap_or_else(|_| "operator:unknown".to_owned())
}

fn bar(len: u64, what: &str) -> Result<indicatif::ProgressBar> {
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(len)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len}, ETA {eta}")?
            .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    Ok(bar)
}

fn short(s: &str, n: usize) -> String {
    let one_line: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if one_line.chars().count() <= n {
        one_line
    } else {
        one_line.chars().take(n - 1).collect::<String>() + "…"
    }
}

fn table(out: &mut impl Write, entries: &[Entry]) -> Result<()> {
    writeln!(
        out,
        "{:<36}  {:<36}  {:<13} {:>8}  {:<24}  LAST ERROR / NOTE",
        "JOB", "DOCUMENT", "STATUS", "ATTEMPTS", "DEAD-LETTERED"
    )?;
    for e in entries {
        let status = e
            .status
            .and_then(|s| serde_json::to_value(s).ok())
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_else(|| "-".to_owned());
        let detail = match (&e.note, &e.last_error) {
            (Some(n), _) => n.clone(),
            (None, Some(err)) => err.clone(),
            (None, None) => String::new(),
        };
        writeln!(
            out,
            "{:<36}  {:<36}  {:<13} {:>8}  {:<24}  {}",
            e.job_id.as_deref().unwrap_or("-"),
            e.document_id.as_deref().unwrap_or("-"),
            status,
            e.attempts,
            e.dead_lettered_at
                .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
                .unwrap_or_else(|| "-".to_owned()),
            short(&detail, 60)
        )?;
    }
    writeln!(out, "({} dead letters)", entries.len())?;
    Ok(())
}

fn report(out: &mut impl Write, r: &RedriveReport, json: bool) -> Result<()> {
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(r)?)?;
        return Ok(());
    }
    let verb = if r.dry_run { "would be " } else { "" };
    for (what, list) in [
        ("redriven", &r.redriven),
        ("dropped", &r.dropped),
        ("left", &r.left),
    ] {
        for o in list {
            writeln!(
                out,
                "{what:<9} job {}  message {}: {}",
                o.job_id.as_deref().unwrap_or("-"),
                o.message_id.as_deref().unwrap_or("-"),
                o.note
            )?;
        }
    }
    writeln!(
        out,
        "{} {verb}redriven, {} {verb}dropped, {} left",
        r.redriven.len(),
        r.dropped.len(),
        r.left.len()
    )?;
    Ok(())
}

pub async fn run(dlq: &Dlq, command: DlqCommand) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match command {
        DlqCommand::List { json } => {
            let entries = dlq.list().await?;
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&entries)?)?;
            } else {
                table(&mut out, &entries)?;
            }
        }
        DlqCommand::Show { id, json } => {
            let job = job_ids(std::slice::from_ref(&id))?[0];
            let (entries, history) = dlq.show(job).await?;
            if history.is_empty() && entries.is_empty() {
                return Err(Failure::not_found(format!("no job {job}")).into());
            }
            let events: Vec<_> = history.iter().map(|e| e.export_line(false)).collect();
            if json {
                let body =
                    serde_json::json!({"job_id": job, "dead_letters": entries, "events": events});
                writeln!(out, "{}", serde_json::to_string_pretty(&body)?)?;
            } else {
                writeln!(out, "job {job}: {} event(s)", history.len())?;
                for e in &history {
                    let ev = &e.event;
                    writeln!(
                        out,
                        "  {:>3}  {}  {:<20} {}",
                        ev.sequence,
                        commands::chain::format_time(ev.recorded_at),
                        ev.event_type,
                        short(&ev.payload.to_string(), 100)
                    )?;
                }
                if entries.is_empty() {
                    writeln!(out, "no dead letter for this job in the queue")?;
                }
                for e in &entries {
                    writeln!(out, "dead letter {}:", e.message_id)?;
                    writeln!(out, "{}", e.body)?;
                }
            }
        }
        DlqCommand::Redrive {
            all: _,
            id,
            max,
            dry_run,
            reason,
            json,
        } => {
            let options = RedriveOptions {
                jobs: job_ids(&id)?,
                max,
                dry_run,
                by: operator(),
                reason,
            };
            let total = dlq.dead.approximate_len().await.unwrap_or(0);
            let bar = bar(total, if dry_run { "checking" } else { "redriving" })?;
            let b = bar.clone();
            let r = dlq.redrive(&options, &move |n| b.set_position(n)).await?;
            bar.finish_and_clear();
            report(&mut out, &r, json)?;
            outcome_code(&options, &r)?;
        }
        DlqCommand::Purge { yes, json } => {
            let n = dlq.dead.approximate_len().await?;
            if !yes {
                if !std::io::stdin().is_terminal() {
                    return Err(Failure::usage(
                        "purge asks for confirmation on a terminal; pass --yes to skip it",
                    )
                    .into());
                }
                eprint!(
                    "Delete about {n} dead letter(s)? The jobs stay dead-lettered in the event store. [y/N] "
                );
                let mut answer = String::new();
                std::io::stdin().read_line(&mut answer)?;
                if !matches!(answer.trim(), "y" | "Y" | "yes") {
                    eprintln!("nothing deleted");
                    return Ok(());
                }
            }
            let bar = bar(n, "purging")?;
            let b = bar.clone();
            let deleted = dlq.purge(&move |k| b.set_position(k)).await?;
            bar.finish_and_clear();
            if json {
                writeln!(out, "{}", serde_json::json!({"deleted": deleted}))?;
            } else {
                writeln!(out, "{deleted} dead letter(s) deleted")?;
            }
        }
        DlqCommand::Replay {
            from_events: _,
            since,
            id,
            max,
            dry_run,
            reason,
            json,
        } => {
            let since = since
                .as_deref()
                .map(crate::events::parse_time)
                .transpose()?;
            let options = RedriveOptions {
                jobs: job_ids(&id)?,
                max,
                dry_run,
                by: operator(),
                reason,
            };
            let bar = bar(0, "re-enqueuing")?;
            let b = bar.clone();
            let r = dlq
                .replay_from_events(since, &options, &move |n| b.set_position(n))
                .await?;
            bar.finish_and_clear();
            report(&mut out, &r, json)?;
            outcome_code(&options, &r)?;
        }
    }
    Ok(())
}

/// 4 when jobs were named and none of them was found; 3 when something was left that
/// needs an operator (see the notes); else success.
fn outcome_code(options: &RedriveOptions, r: &RedriveReport) -> Result<()> {
    if !options.jobs.is_empty()
        && r.redriven.is_empty()
        && r.dropped.is_empty()
        && r.left.is_empty()
    {
        return Err(Failure::not_found("nothing found for the job(s) named").into());
    }
    if !r.left.is_empty() {
        return Err(Failure::check(format!(
            "{} dead letter(s) left (see the notes above)",
            r.left.len()
        ))
        .into());
    }
    Ok(())
}
