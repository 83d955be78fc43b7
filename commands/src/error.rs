//! Error types. Business refusals and infrastructure failures are kept apart: a refusal is
//! the client's to fix (4xx), an infrastructure failure is ours (5xx, logged, never shown).

/// The event store or a database could not do what was asked.
#[derive(Debug, thiserror::Error)]
#[error("storage failure: {0}")]
pub struct StoreError(#[from] pub anyhow::Error);

impl StoreError {
    pub fn msg(msg: impl std::fmt::Display) -> Self {
        StoreError(anyhow::anyhow!("{msg}"))
    }

    /// Is the database out of reach rather than refusing what was asked (a dropped or
    /// refused connection, a pool with nothing free, a server shutting down or out of
    /// connections)? Then the caller may retry shortly: the API answers 503 with
    /// `Retry-After`, not 500. (A connection that drops mid-statement leaves the outcome
    /// unknown: the statement may have committed.)
    pub fn is_unavailable(&self) -> bool {
        is_unavailable(&self.0)
    }
}

/// [`StoreError::is_unavailable`] for any error that may carry a `sqlx::Error` (read
/// models report `anyhow` errors).
pub fn is_unavailable(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<sqlx::Error>()
            .is_some_and(sqlx_error_is_unavailable)
    })
}

/// Postgres SQLSTATEs that mean "not now" rather than "no": connection exceptions,
/// too many connections, and the server shutting down or ending this session.
const UNAVAILABLE_SQLSTATES: &[&str] = &[
    "08000", "08001", "08003", "08004", "08006", "53300", "57P01", "57P02", "57P03",
];

fn sqlx_error_is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
            .is_some_and(|pg| UNAVAILABLE_SQLSTATES.contains(&pg.code())),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreachable_databases_are_told_from_refusals() {
        let timed_out =
            StoreError(anyhow::Error::new(sqlx::Error::PoolTimedOut).context("loading"));
        assert!(timed_out.is_unavailable());
        let io = StoreError::from(sqlx::Error::Io(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset,
        )));
        assert!(io.is_unavailable());
        assert!(!StoreError::from(sqlx::Error::RowNotFound).is_unavailable());
        assert!(!StoreError::msg("decoding failed").is_unavailable());
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError(anyhow::Error::new(e))
    }
}

/// The outcome of a command that did not commit.
#[derive(Debug, thiserror::Error)]
pub enum CommandError<E: std::error::Error> {
    /// The aggregate refused the command.
    #[error(transparent)]
    Rejected(E),
    /// The caller expected another version (HTTP `If-Match`); nothing was written.
    #[error("expected version {expected}, found {actual}")]
    StaleVersion { expected: u64, actual: u64 },
    /// Another writer committed to the same aggregate first; nothing was written.
    #[error("concurrent write conflict")]
    Conflict,
    /// A condition on another aggregate, checked atomically with the append (see
    /// [`crate::store::Guard`]), did not hold; nothing was written.
    #[error("refused: {0}")]
    Guarded(&'static str),
    #[error(transparent)]
    Store(#[from] StoreError),
}
