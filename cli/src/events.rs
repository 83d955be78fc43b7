//! `karmic events …`: the auditor's commands. They read the event store only (no
//! migration, no JWT secret, no read models), so an auditor needs nothing but the
//! database URL.

use std::io::{IsTerminal, Write};

use anyhow::{Context, Result};
use chrono::{DateTime, NaiveDate, Utc};
use clap::{Args, Subcommand};
use commands::Database;
use commands::audit::{self, Anchor, AsOf, EventFilter, Order};

use crate::Failure;

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// List events in commit order, a page at a time.
    List {
        #[command(flatten)]
        filter: FilterArgs,
        /// Only events after this place in commit order (TRANSACTION:POSITION, as printed
        /// by the previous page).
        #[arg(long)]
        after: Option<String>,
        /// Events per page.
        #[arg(long, default_value_t = 50)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// Write the history (or the part a filter selects) as JSON Lines, in commit order,
    /// streaming: one line per event with its position, time, aggregate, sequence, type,
    /// version, stored payload and metadata, and hash.
    Export {
        #[command(flatten)]
        filter: FilterArgs,
        /// The only format: JSON Lines.
        #[arg(long, default_value = "jsonl", value_parser = ["jsonl"])]
        format: String,
        /// Add each event as the current code reads it (upcasters applied) under
        /// `upcast`, beside the stored form the hash covers.
        #[arg(long)]
        upcast: bool,
        /// Write here instead of standard output.
        #[arg(long, short)]
        output: Option<std::path::PathBuf>,
    },
    /// Print an aggregate's state at a point of its history (upcasters applied).
    Replay {
        /// user, profile, document or ai_job.
        aggregate_type: String,
        aggregate_id: String,
        /// The state after the last event recorded at or before this time (RFC 3339, or
        /// a date: its midnight UTC). With --version, after the last event meeting both.
        #[arg(long)]
        as_of: Option<String>,
        /// The state after the event with this sequence number.
        #[arg(long)]
        version: Option<i64>,
        #[arg(long)]
        json: bool,
    },
    /// Recompute every hash chain from the stored events; exit 3 at the first broken link
    /// (printed with its position and aggregate). Prints an anchor to keep; given one
    /// (`--against`), also checks that nothing recorded up to it was removed.
    Verify {
        /// An anchor file written by an earlier `verify --save-anchor`.
        #[arg(long)]
        against: Option<std::path::PathBuf>,
        /// Write the anchor of the history as it stands to this file.
        #[arg(long)]
        save_anchor: Option<std::path::PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

/// The filters `list` and `export` share.
#[derive(Debug, Args)]
pub struct FilterArgs {
    #[arg(long)]
    aggregate_type: Option<String>,
    #[arg(long)]
    aggregate_id: Option<String>,
    #[arg(long)]
    event_type: Option<String>,
    /// Recorded at or after (RFC 3339, or a date).
    #[arg(long)]
    since: Option<String>,
    /// Recorded before (RFC 3339, or a date).
    #[arg(long)]
    until: Option<String>,
    /// Global position at least.
    #[arg(long)]
    from_position: Option<i64>,
    /// Global position at most.
    #[arg(long)]
    to_position: Option<i64>,
}

impl FilterArgs {
    fn filter(&self) -> Result<EventFilter> {
        Ok(EventFilter {
            aggregate_type: self.aggregate_type.clone(),
            aggregate_id: self.aggregate_id.clone(),
            event_type: self.event_type.clone(),
            since: self.since.as_deref().map(parse_time).transpose()?,
            until: self.until.as_deref().map(parse_time).transpose()?,
            from_position: self.from_position,
            to_position: self.to_position,
            after: None,
        })
    }
}

/// RFC 3339, or a bare date (its midnight UTC).
pub fn parse_time(s: &str) -> Result<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    let d = NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .map_err(|_| Failure::usage(format!("not a time (RFC 3339 or YYYY-MM-DD): {s:?}")))?;
    Ok(d.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc())
}

fn parse_position(s: &str) -> Result<commands::Position> {
    let bad = || Failure::usage(format!("not a position (TRANSACTION:POSITION): {s:?}"));
    let (tx, pos) = s.split_once(':').ok_or_else(bad)?;
    Ok(commands::Position {
        transaction_id: tx.parse().map_err(|_| bad())?,
        position: pos.parse().map_err(|_| bad())?,
    })
}

fn bar(len: u64, what: &str) -> Result<indicatif::ProgressBar> {
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(len)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {pos}/{len} events, {per_sec}, ETA {eta}",
        )?
        .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    Ok(bar)
}

pub async fn run(db: &Database, command: EventsCommand) -> Result<()> {
    match command {
        EventsCommand::List {
            filter,
            after,
            limit,
            json,
        } => {
            let mut f = filter.filter()?;
            f.after = after.as_deref().map(parse_position).transpose()?;
            if !(1..=10_000).contains(&limit) {
                return Err(Failure::usage("--limit is 1 to 10000").into());
            }
            let mut out = std::io::stdout().lock();
            let mut lines = Vec::new();
            audit::for_each(db, &f, Order::Feed, Some(limit + 1), |e| {
                lines.push(e);
                Ok(())
            })
            .await?;
            let next = if lines.len() as i64 > limit {
                lines.truncate(limit as usize);
                lines.last().map(|e| e.event.position.to_string())
            } else {
                None
            };
            if json {
                let events: Vec<_> = lines.iter().map(|e| e.export_line(false)).collect();
                let page = serde_json::json!({"events": events, "next_after": next});
                writeln!(out, "{}", serde_json::to_string_pretty(&page)?)?;
            } else {
                writeln!(
                    out,
                    "{:<14} {:<27} {:<10} {:<36} {:>4}  {:<26} VERSION",
                    "POSITION", "RECORDED", "TYPE", "AGGREGATE", "SEQ", "EVENT"
                )?;
                for e in &lines {
                    let ev = &e.event;
                    writeln!(
                        out,
                        "{:<14} {:<27} {:<10} {:<36} {:>4}  {:<26} {}",
                        ev.position.to_string(),
                        commands::chain::format_time(ev.recorded_at),
                        ev.aggregate_type,
                        ev.aggregate_id,
                        ev.sequence,
                        ev.event_type,
                        ev.event_version
                    )?;
                }
                match next {
                    Some(n) => writeln!(out, "next page: --after {n}")?,
                    None => writeln!(out, "({} events; end of history)", lines.len())?,
                }
            }
        }
        EventsCommand::Export {
            filter,
            format: _,
            upcast,
            output,
        } => {
            let f = filter.filter()?;
            let sink: Box<dyn Write> = match &output {
                Some(path) => Box::new(
                    std::fs::File::create(path)
                        .with_context(|| format!("creating {}", path.display()))?,
                ),
                None => Box::new(std::io::stdout().lock()),
            };
            let mut sink = std::io::BufWriter::with_capacity(1 << 16, sink);
            let total = if std::io::stderr().is_terminal() {
                audit::count(db, &f).await?
            } else {
                0
            };
            let bar = bar(total, "exporting")?;
            let n = audit::for_each(db, &f, Order::Feed, None, |e| {
                serde_json::to_writer(&mut sink, &e.export_line(upcast))?;
                sink.write_all(b"\n")?;
                bar.inc(1);
                Ok(())
            })
            .await?;
            sink.flush()?;
            bar.finish_and_clear();
            tracing::info!(events = n, "exported");
        }
        EventsCommand::Replay {
            aggregate_type,
            aggregate_id,
            as_of,
            version,
            json,
        } => {
            if version.is_some_and(|v| v < 0) {
                return Err(Failure::usage("--version is 0 or more").into());
            }
            let at = AsOf {
                version,
                time: as_of.as_deref().map(parse_time).transpose()?,
            };
            if !audit::AGGREGATE_TYPES.contains(&aggregate_type.as_str()) {
                return Err(Failure::usage(format!(
                    "no aggregate type {aggregate_type:?} (one of {})",
                    audit::AGGREGATE_TYPES.join(", ")
                ))
                .into());
            }
            let history = audit::history(db, &aggregate_type, &aggregate_id).await?;
            if history.is_empty() {
                return Err(Failure::not_found(format!(
                    "no events for {aggregate_type} {aggregate_id}"
                ))
                .into());
            }
            let (state, at_version) = audit::replay(&aggregate_type, &history, at)?;
            let mut out = std::io::stdout().lock();
            if json {
                let body = serde_json::json!({
                    "aggregate_type": aggregate_type,
                    "aggregate_id": aggregate_id,
                    "version": at_version,
                    "latest_version": history.last().map_or(0, |e| e.event.sequence),
                    "state": state,
                });
                writeln!(out, "{}", serde_json::to_string_pretty(&body)?)?;
            } else {
                writeln!(
                    out,
                    "{aggregate_type} {aggregate_id} at version {at_version} (of {}):",
                    history.last().map_or(0, |e| e.event.sequence)
                )?;
                writeln!(out, "{}", serde_json::to_string_pretty(&state)?)?;
            }
        }
        EventsCommand::Verify {
            against,
            save_anchor,
            json,
        } => {
            let against: Option<Anchor> = against
                .as_deref()
                .map(|p| -> Result<Anchor> {
                    let text = std::fs::read_to_string(p)
                        .with_context(|| format!("reading the anchor {}", p.display()))?;
                    serde_json::from_str(&text)
                        .map_err(|e| Failure::usage(format!("not an anchor file: {e}")).into())
                })
                .transpose()?;
            let total = if std::io::stderr().is_terminal() {
                audit::count(db, &EventFilter::default()).await?
            } else {
                0
            };
            let bar = bar(total, "verifying")?;
            let b = bar.clone();
            let report = audit::verify(db, against.as_ref(), &move |n| b.set_position(n)).await?;
            bar.finish_and_clear();
            if let Some(path) = &save_anchor {
                match (&report.anchor, &against) {
                    (Some(anchor), None) => {
                        std::fs::write(path, serde_json::to_string_pretty(anchor)? + "\n")
                            .with_context(|| format!("writing {}", path.display()))?;
                    }
                    _ => eprintln!(
                        "no anchor written: {}",
                        if against.is_some() {
                            "--save-anchor does not go with --against"
                        } else if report.broken > 0 {
                            "the history does not verify"
                        } else {
                            "the store holds no events yet"
                        }
                    ),
                }
            }
            let mut out = std::io::stdout().lock();
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
            } else {
                writeln!(
                    out,
                    "{} events in {} aggregates checked; {} broken link(s)",
                    report.events, report.aggregates, report.broken
                )?;
                if let Some(b) = &report.first_broken {
                    writeln!(
                        out,
                        "first broken link: position {}, {} {} sequence {}: {}",
                        b.position, b.aggregate_type, b.aggregate_id, b.sequence, b.problem
                    )?;
                }
                match (&report.anchor, report.anchor_matches) {
                    (Some(a), Some(true)) => writeln!(
                        out,
                        "the history through {} still gives the anchor's digest {}",
                        a.through, a.heads
                    )?,
                    (Some(a), Some(false)) => writeln!(
                        out,
                        "the history through {} no longer gives the anchor's digest {}: \
                         events recorded up to it were removed",
                        a.through, a.heads
                    )?,
                    (Some(a), None) => writeln!(
                        out,
                        "anchor: through {} heads {} ({} aggregates)",
                        a.through, a.heads, a.aggregates
                    )?,
                    (None, _) => {}
                }
            }
            if !report.ok() {
                return Err(Failure::check("the event history does not verify").into());
            }
        }
    }
    Ok(())
}
