//! The document worker: analysis of uploaded documents (this crate so far), run in an
//! isolated child process per document.
//!
//! The queue consumer (SQS long-polling, the embedded queue) and the job life around the
//! `AiJob` aggregate come with the rest of issue 9; the analysis and its isolation are
//! here first so that they can be tested on real files on their own.

pub mod analysis;
pub mod isolate;

pub use analysis::{AnalysisError, Analyzer, InProcessAnalyzer, Limits};
pub use isolate::IsolatedAnalyzer;
