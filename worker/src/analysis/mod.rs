//! Document analysis: the text out of each supported format, then what the text says.
//!
//! [`analyze_bytes`] is the whole analysis, synchronous and in-process. It reads untrusted
//! files with young parsers, so the worker runs it in a child process
//! ([`crate::isolate::IsolatedAnalyzer`]); [`InProcessAnalyzer`] is for trusted input
//! and tests.

pub mod entities;
pub mod extract;
pub mod text;

use std::time::Duration;

use domain::{Analysis, ContentType};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Bounds on what one analysis reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// The largest input accepted.
    pub max_bytes: u64,
    /// PDF pages read; later pages are left out (and the analysis says so).
    pub max_pages: usize,
    /// The largest ZIP entry (DOCX) inflated, whatever its header claims.
    pub max_zip_entry_bytes: u64,
    /// Text analysed, in characters; the rest is counted but not searched.
    pub max_text_chars: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 25 << 20,
            max_pages: 2_000,
            max_zip_entry_bytes: 64 << 20,
            max_text_chars: 2_000_000,
        }
    }
}

/// Why a document could not be analysed. Only [`AnalysisError::Internal`] is worth a
/// retry: every other outcome would repeat with the same file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "detail")]
pub enum AnalysisError {
    /// The file cannot be read as its type (corrupt, truncated, another format).
    #[error("unreadable document: {0}")]
    Corrupt(String),
    /// Over a limit: its size, or what it inflates to.
    #[error("document too large: {0}")]
    TooLarge(String),
    /// The parser ran past the wall-clock limit.
    #[error("analysis took longer than {0} s")]
    TimedOut(u64),
    /// The isolated parser died: a crash, a stack overflow, the memory limit.
    #[error("the parser died: {0}")]
    Crashed(String),
    /// Something on our side (the child could not be started, an I/O failure).
    #[error("analysis failed: {0}")]
    Internal(String),
}

impl AnalysisError {
    pub fn retryable(&self) -> bool {
        matches!(self, AnalysisError::Internal(_))
    }
}

/// Something that analyses a document: today the text analysis below, later perhaps a
/// model-backed one.
#[async_trait::async_trait]
pub trait Analyzer: Send + Sync {
    async fn analyze(
        &self,
        bytes: Vec<u8>,
        declared: ContentType,
    ) -> Result<Analysis, AnalysisError>;
}

/// [`analyze_bytes`] on the blocking pool of this process: no isolation. For trusted
/// input and tests; the worker uses [`crate::isolate::IsolatedAnalyzer`].
#[derive(Debug, Clone, Default)]
pub struct InProcessAnalyzer {
    pub limits: Limits,
}

#[async_trait::async_trait]
impl Analyzer for InProcessAnalyzer {
    async fn analyze(
        &self,
        bytes: Vec<u8>,
        declared: ContentType,
    ) -> Result<Analysis, AnalysisError> {
        let limits = self.limits;
        tokio::task::spawn_blocking(move || analyze_bytes(&bytes, declared, &limits))
            .await
            .map_err(|e| AnalysisError::Crashed(format!("{e}")))?
    }
}

/// The whole analysis of one document.
pub fn analyze_bytes(
    bytes: &[u8],
    declared: ContentType,
    limits: &Limits,
) -> Result<Analysis, AnalysisError> {
    if bytes.len() as u64 > limits.max_bytes {
        return Err(AnalysisError::TooLarge(format!(
            "{} bytes, the limit is {}",
            bytes.len(),
            limits.max_bytes
        )));
    }
    let extracted = extract::extract(bytes, declared, limits)?;
    let mut analysis = Analysis {
        sha256: sha256_hex(bytes),
        pages: extracted.pages,
        note: extracted.note,
        ..Analysis::default()
    };
    text::analyze_text(&extracted.text, limits.max_text_chars, &mut analysis);
    Ok(analysis.bounded())
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let digest = Sha256::digest(bytes);
    let mut s = String::with_capacity(64);
    for b in digest.iter() {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The wall-clock limit of one analysis unless configured (`KARMIC_ANALYZER_TIMEOUT_MS`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
