//! The SQL schema of the event store and the SQL read models, embedded in the binary.
//!
//! Migrations are append-only: once one has been applied anywhere it is never edited; a
//! change is a new file.

use sqlx::migrate::Migrator;

/// Migrations for the Postgres configuration.
pub static POSTGRES: Migrator = sqlx::migrate!("./postgres");

/// Migrations for the embedded (SQLite) configuration.
pub static SQLITE: Migrator = sqlx::migrate!("./sqlite");
