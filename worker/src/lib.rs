//! The document worker: analysis of uploaded documents, run in an isolated child process
//! per document, and the reading of the storage notifications that announce them.
//!
//! [`run::Worker`] consumes the job queue ([`queue::SqliteQueue`] embedded,
//! [`sqs::SqsQueue`] in AWS) and drives the `Document` and `AiJob` aggregates through
//! `commands::documents`.

pub mod analysis;
pub mod dlq;
pub mod isolate;
pub mod notification;
pub mod queue;
pub mod run;
pub mod sqs;

pub use analysis::{AnalysisError, Analyzer, InProcessAnalyzer, Limits};
pub use isolate::IsolatedAnalyzer;
pub use run::{Worker, WorkerSettings};
