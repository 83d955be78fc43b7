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
    /// connections)? Then nothing was committed by the failing statement and the caller
    /// may retry later: the API answers 503 with `Retry-After`, not 500.
    pub fn is_unavailable(&self) -> bool {
        self.0.chain().any(|cause| {
            let Some(e) = cause.downcast_ref::<sqlx::Error>() else {
                return false;
            };
            match e {
                sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed => true,
                // SQLSTATE classes 08 (connection exception), 53 (insufficient
                // resources: too many connections) and 57P (server shutting down, or
                // this session terminated by an operator).
                sqlx::Error::Database(db) => db.code().is_some_and(|c| {
                    c.starts_with("08") || c.starts_with("53") || c.starts_with("57P")
                }),
                _ => false,
            }
        })
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
