//! Untrusted files are parsed in a child process with a wall-clock limit, a memory limit
//! and a CPU limit, so that a file that makes a parser panic, loop, overflow its stack
//! or balloon fails its own job and nothing else.
//!
//! The parent ([`IsolatedAnalyzer`]) starts the child with an empty environment (no
//! secrets reach the parser), writes the file to its stdin and reads one JSON result
//! from its stdout. The child ([`child_main`]) limits itself with `setrlimit` before it
//! reads a byte of input, analyses, and answers. A child that dies or answers nothing
//! readable is [`AnalysisError::Crashed`]; one that runs past the time limit is killed
//! and [`AnalysisError::TimedOut`].

use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use domain::{Analysis, ContentType};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

use crate::analysis::{AnalysisError, Analyzer, DEFAULT_TIMEOUT, Limits, analyze_bytes};

/// The child's address space limit unless configured (`KARMIC_ANALYZER_MEMORY_MB`).
pub const DEFAULT_MEMORY_BYTES: u64 = 1 << 30;

/// What the parent tells the child (one command-line argument, JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ChildSettings {
    content_type: ContentType,
    limits: Limits,
    memory_bytes: u64,
    cpu_seconds: u64,
}

/// Runs each analysis in a child process: `program args… <settings>`.
#[derive(Debug, Clone)]
pub struct IsolatedAnalyzer {
    program: PathBuf,
    args: Vec<OsString>,
    pub limits: Limits,
    pub timeout: Duration,
    pub memory_bytes: u64,
}

impl IsolatedAnalyzer {
    /// `program args…` must end up in [`child_main`] (the `karmic-analyze` binary, or
    /// `karmic analyze-child`).
    pub fn new(program: impl Into<PathBuf>, args: Vec<OsString>) -> Self {
        IsolatedAnalyzer {
            program: program.into(),
            args,
            limits: Limits::default(),
            timeout: DEFAULT_TIMEOUT,
            memory_bytes: DEFAULT_MEMORY_BYTES,
        }
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn with_memory_bytes(mut self, bytes: u64) -> Self {
        self.memory_bytes = bytes;
        self
    }

    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }
}

#[async_trait::async_trait]
impl Analyzer for IsolatedAnalyzer {
    async fn analyze(
        &self,
        bytes: Vec<u8>,
        declared: ContentType,
    ) -> Result<Analysis, AnalysisError> {
        if bytes.len() as u64 > self.limits.max_bytes {
            return Err(AnalysisError::TooLarge(format!(
                "{} bytes, the limit is {}",
                bytes.len(),
                self.limits.max_bytes
            )));
        }
        let settings = ChildSettings {
            content_type: declared,
            limits: self.limits,
            memory_bytes: self.memory_bytes,
            cpu_seconds: self.timeout.as_secs().max(1) + 1,
        };
        let settings = serde_json::to_string(&settings)
            .map_err(|e| AnalysisError::Internal(format!("encoding the child's settings: {e}")))?;
        let mut child = tokio::process::Command::new(&self.program)
            .args(&self.args)
            .arg(settings)
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                AnalysisError::Internal(format!(
                    "starting the analyzer {}: {e}",
                    self.program.display()
                ))
            })?;
        let stdin = child.stdin.take();
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        let feed = async move {
            if let Some(mut stdin) = stdin {
                // A child that dies early closes its end: its exit status tells why.
                let _ = stdin.write_all(&bytes).await;
            }
        };
        // The child's output is read up to a bound, whatever it writes: a child that
        // writes on past it blocks, and the wall clock ends it.
        let read_out = read_capped(stdout, MAX_STDOUT);
        let read_err = read_capped(stderr, MAX_STDERR);
        let run = async {
            let ((), stdout, stderr) = tokio::join!(feed, read_out, read_err);
            child.wait().await.map(|status| std::process::Output {
                status,
                stdout,
                stderr,
            })
        };
        let output = match tokio::time::timeout(self.timeout, run).await {
            // Dropping the future killed the child (`kill_on_drop`).
            Err(_) => return Err(AnalysisError::TimedOut(self.timeout.as_secs())),
            Ok(Err(e)) => {
                return Err(AnalysisError::Internal(format!(
                    "waiting for the analyzer: {e}"
                )));
            }
            Ok(Ok(output)) => output,
        };
        match serde_json::from_slice::<Result<Analysis, AnalysisError>>(&output.stdout) {
            Ok(result) if output.status.success() => result,
            _ => {
                let stderr = String::from_utf8_lossy(&output.stderr);
                let tail: String = stderr
                    .chars()
                    .rev()
                    .take(400)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                Err(AnalysisError::Crashed(format!(
                    "{}; {}",
                    output.status,
                    tail.trim()
                )))
            }
        }
    }
}

/// The most of the child's stdout read: a result is bounded far below this.
const MAX_STDOUT: u64 = 4 << 20;
/// The most of its stderr kept (a panic message and backtrace).
const MAX_STDERR: u64 = 64 << 10;

async fn read_capped<R: tokio::io::AsyncRead + Unpin>(from: Option<R>, cap: u64) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    if let Some(from) = from {
        let _ = from.take(cap).read_to_end(&mut buf).await;
    }
    buf
}

/// The child's `main`: limit this process, read the file from stdin, analyse it, write
/// the JSON result to stdout. The last argument is the settings the parent sent.
pub fn child_main() -> ExitCode {
    let result = run_child();
    let mut out = std::io::stdout().lock();
    let written = serde_json::to_writer(&mut out, &result).is_ok() && out.flush().is_ok();
    if written {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn run_child() -> Result<Analysis, AnalysisError> {
    let settings: ChildSettings = std::env::args()
        .next_back()
        .and_then(|a| serde_json::from_str(&a).ok())
        .ok_or_else(|| {
            AnalysisError::Internal("the analyzer was started without settings".into())
        })?;
    limit_self(&settings)
        .map_err(|e| AnalysisError::Internal(format!("setting resource limits: {e}")))?;
    let mut bytes = Vec::new();
    std::io::stdin()
        .lock()
        .take(settings.limits.max_bytes + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::OutOfMemory => {
                AnalysisError::Crashed("out of memory reading the document".to_owned())
            }
            _ => AnalysisError::Internal(format!("reading the document: {e}")),
        })?;
    std::panic::catch_unwind(|| analyze_bytes(&bytes, settings.content_type, &settings.limits))
        .unwrap_or_else(|panic| {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".to_owned());
            Err(AnalysisError::Crashed(format!(
                "the parser panicked: {why}"
            )))
        })
}

/// Address space, CPU seconds, no core files. Set before any input is read, so the
/// parser never runs without them.
fn limit_self(settings: &ChildSettings) -> std::io::Result<()> {
    use rlimit::Resource;
    Resource::AS.set(settings.memory_bytes, settings.memory_bytes)?;
    Resource::CPU.set(settings.cpu_seconds, settings.cpu_seconds + 1)?;
    Resource::CORE.set(0, 0)?;
    Ok(())
}
