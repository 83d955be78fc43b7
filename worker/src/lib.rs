//! The document worker: analysis of uploaded documents, run in an isolated child process
//! per document, and the reading of the storage notifications that announce them.
//!
//! The queue consumer (SQS long-polling, the embedded queue) that drives the `AiJob`
//! aggregate through `commands::documents` comes with the rest of issue 9; the analysis,
//! its isolation and the notification format are here first so that each is tested on
//! its own.

pub mod analysis;
pub mod isolate;
pub mod notification;
pub mod queue;

pub use analysis::{AnalysisError, Analyzer, InProcessAnalyzer, Limits};
pub use isolate::IsolatedAnalyzer;
