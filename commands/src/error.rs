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
