//! The analysis on real files, through the isolated child process (`karmic-analyze`), as
//! the worker runs it: every supported format, an encrypted PDF, a corrupt file, a
//! decompression bomb, and children that hang, crash or run out of memory.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use domain::{Analysis, ContentType};
use worker::analysis::{AnalysisError, Analyzer, sha256_hex};
use worker::{IsolatedAnalyzer, Limits};

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn analyzer() -> IsolatedAnalyzer {
    IsolatedAnalyzer::new(env!("CARGO_BIN_EXE_karmic-analyze"), vec![])
}

async fn analyze(bytes: Vec<u8>, ct: ContentType) -> Result<Analysis, AnalysisError> {
    analyzer().analyze(bytes, ct).await
}

/// What the report fixtures say, whatever the format.
fn assert_report(a: &Analysis) {
    assert_eq!(a.language.as_deref(), Some("eng"), "{a:?}");
    assert!(a.words > 100, "{a:?}");
    assert!(a.characters > a.words);
    assert!(
        a.keywords.iter().any(|k| k.contains("energy")
            || k.contains("solar")
            || k.contains("battery")
            || k.contains("wind")),
        "{:?}",
        a.keywords
    );
    assert!((3..=5).contains(&a.summary.len()), "{:?}", a.summary);
    let e = &a.entities;
    assert!(
        e.emails.contains(&"energy.office@example.org".to_owned()),
        "{e:?}"
    );
    assert!(
        e.urls
            .iter()
            .any(|u| u.starts_with("https://energy.example.org/reports/2026")),
        "{e:?}"
    );
    assert!(e.dates.contains(&"14 March 2026".to_owned()), "{e:?}");
    assert!(e.dates.contains(&"2026-09-30".to_owned()), "{e:?}");
    assert!(
        e.phone_numbers.contains(&"+44 20 7946 0958".to_owned()),
        "{e:?}"
    );
    assert!(e.money.contains(&"$2,500,000".to_owned()), "{e:?}");
    assert!(
        a.pii.email && a.pii.phone && a.pii.card_number && a.pii.iban,
        "{:?}",
        a.pii
    );
}

#[tokio::test]
async fn a_real_three_page_pdf_is_read_and_analysed() {
    let bytes = fixture("report.pdf");
    let a = analyze(bytes.clone(), ContentType::Pdf).await.unwrap();
    assert_eq!(a.pages, Some(3));
    assert_eq!(a.sha256, sha256_hex(&bytes));
    assert_eq!(a.note, None);
    assert_report(&a);
}

#[tokio::test]
async fn a_real_docx_is_read_and_analysed() {
    let a = analyze(fixture("report.docx"), ContentType::Docx)
        .await
        .unwrap();
    assert_eq!(a.pages, None);
    assert_report(&a);
}

const REPORT: &str = "Quarterly report on renewable energy adoption in coastal cities. \
    Solar panels and wind turbines now supply most of the electricity used by the harbour district. \
    The city council approved a budget of $2,500,000 for battery storage on 14 March 2026. \
    Questions about the programme go to energy.office@example.org or +44 20 7946 0958. \
    Further reading is published at https://energy.example.org/reports/2026 today. \
    Payments for the pilot were made from IBAN GB82 WEST 1234 5698 7654 32 using card 4111 1111 1111 1111. \
    Battery storage smooths the daily peaks that solar panels cannot cover in winter. \
    Wind turbines offshore produced more energy than forecast during the autumn storms. \
    Residents reported lower electricity bills after the harbour district joined the programme. \
    The next review of renewable energy targets is scheduled for 2026-09-30.";

#[tokio::test]
async fn plain_text_markdown_html_and_csv_are_read_and_analysed() {
    let md = format!("# Energy report\n\n{REPORT}\n\n* one item\n* another item\n");
    let html = format!(
        "<!DOCTYPE html><html><head><title>Report</title><style>p {{ color: red }}</style></head>\
         <body><h1>Energy report</h1><p>{REPORT}</p></body></html>"
    );
    let csv = format!(
        "\"{}\",42\nsecond,row,has,more,cells\n",
        REPORT.replace('"', "\"\"")
    );
    for (bytes, ct) in [
        (REPORT.as_bytes().to_vec(), ContentType::PlainText),
        (md.into_bytes(), ContentType::Markdown),
        (html.into_bytes(), ContentType::Html),
        (csv.into_bytes(), ContentType::Csv),
    ] {
        let a = analyze(bytes, ct).await.unwrap();
        assert_report(&a);
        assert!(
            !a.keywords.iter().any(|k| k.contains("color")),
            "{ct}: {:?}",
            a.keywords
        );
    }
}

#[tokio::test]
async fn an_encrypted_pdf_is_tried_with_the_empty_password_then_reported_as_encrypted() {
    // Owner password only: opens with the empty user password.
    let open = analyze(fixture("owner-only.pdf"), ContentType::Pdf)
        .await
        .unwrap();
    assert!(open.words > 50, "{open:?}");
    assert!(
        open.entities
            .emails
            .contains(&"energy.office@example.org".to_owned())
    );
    // A user password: nothing can be read, and the analysis says why.
    let locked = analyze(fixture("locked.pdf"), ContentType::Pdf)
        .await
        .unwrap();
    assert_eq!(locked.words, 0);
    assert!(
        locked.note.as_deref().unwrap_or("").contains("encrypted"),
        "{locked:?}"
    );
}

#[tokio::test]
async fn corrupt_files_fail_for_good_with_a_clear_error() {
    let mut truncated = fixture("report.pdf");
    truncated.truncate(300);
    for (bytes, ct) in [
        (truncated, ContentType::Pdf),
        (b"this is not a zip archive".to_vec(), ContentType::Docx),
        (b"%PDF-1.7 garbage".to_vec(), ContentType::Pdf),
        (vec![0xff, 0xfe, 0x00, 0x41], ContentType::PlainText),
    ] {
        let err = analyze(bytes, ct).await.unwrap_err();
        assert!(matches!(err, AnalysisError::Corrupt(_)), "{ct}: {err:?}");
        assert!(!err.retryable());
    }
}

#[tokio::test]
async fn a_decompression_bomb_is_refused_at_the_cap() {
    // 131 KB that inflate to 128 MiB of XML.
    let bomb = fixture("bomb.docx");
    assert!(bomb.len() < 200_000);
    let small_cap = analyzer().with_limits(Limits {
        max_zip_entry_bytes: 8 << 20,
        ..Limits::default()
    });
    let started = Instant::now();
    let err = small_cap
        .analyze(bomb, ContentType::Docx)
        .await
        .unwrap_err();
    assert!(matches!(err, AnalysisError::TooLarge(_)), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn inputs_over_the_size_limit_are_refused_before_a_child_starts() {
    let tiny = IsolatedAnalyzer::new("/nonexistent/analyzer", vec![]).with_limits(Limits {
        max_bytes: 10,
        ..Limits::default()
    });
    let err = tiny
        .analyze(vec![b'a'; 11], ContentType::PlainText)
        .await
        .unwrap_err();
    assert!(matches!(err, AnalysisError::TooLarge(_)), "{err:?}");
}

#[tokio::test]
async fn a_child_over_its_memory_limit_dies_alone() {
    // 40 MB of text against a 64 MiB address space: the copies the analysis makes do not
    // fit, the allocation fails, the child aborts; this process carries on.
    let big = "lorem ipsum dolor sit amet ".repeat(1_500_000).into_bytes();
    let starved = analyzer().with_memory_bytes(64 << 20).with_limits(Limits {
        max_bytes: 100 << 20,
        ..Limits::default()
    });
    let err = starved
        .analyze(big, ContentType::PlainText)
        .await
        .unwrap_err();
    assert!(matches!(err, AnalysisError::Crashed(_)), "{err:?}");
    assert!(!err.retryable());
    // The same analyzer still serves the next document.
    let ok = starved
        .analyze(
            b"A small document is fine.".to_vec(),
            ContentType::PlainText,
        )
        .await
        .unwrap();
    assert_eq!(ok.words, 5);
}

#[tokio::test]
async fn a_child_that_hangs_is_killed_at_the_time_limit() {
    // A stand-in child that never answers: the limit, not the parser, ends it.
    let hang = IsolatedAnalyzer::new("/bin/sh", vec!["-c".into(), "sleep 30".into()])
        .with_timeout(Duration::from_millis(500));
    let started = Instant::now();
    let err = hang
        .analyze(b"x".to_vec(), ContentType::PlainText)
        .await
        .unwrap_err();
    assert_eq!(err, AnalysisError::TimedOut(0));
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn a_child_that_crashes_or_answers_nonsense_is_reported_as_crashed() {
    let segv = IsolatedAnalyzer::new("/bin/sh", vec!["-c".into(), "kill -SEGV $$".into()]);
    let err = segv
        .analyze(b"x".to_vec(), ContentType::PlainText)
        .await
        .unwrap_err();
    assert!(
        matches!(err, AnalysisError::Crashed(ref m) if m.contains("SIGSEGV") || m.contains("signal")),
        "{err:?}"
    );
    let nonsense = IsolatedAnalyzer::new("/bin/echo", vec!["not json".into()]);
    let err = nonsense
        .analyze(b"x".to_vec(), ContentType::PlainText)
        .await
        .unwrap_err();
    assert!(matches!(err, AnalysisError::Crashed(_)), "{err:?}");
    let missing = IsolatedAnalyzer::new("/nonexistent/analyzer", vec![]);
    let err = missing
        .analyze(b"x".to_vec(), ContentType::PlainText)
        .await
        .unwrap_err();
    assert!(err.retryable(), "a missing program is ours to fix: {err:?}");
}

#[tokio::test]
async fn the_child_gets_no_environment() {
    // A stand-in child that prints its environment to stderr and fails: none of this
    // process's variables (database URLs, secrets) reach a parser.
    assert!(std::env::var_os("PATH").is_some() && std::env::var_os("HOME").is_some());
    let env = IsolatedAnalyzer::new("/bin/sh", vec!["-c".into(), "env >&2; exit 3".into()]);
    let err = env
        .analyze(b"x".to_vec(), ContentType::PlainText)
        .await
        .unwrap_err();
    match err {
        AnalysisError::Crashed(m) => {
            assert!(m.contains("exit status: 3"), "{m}");
            assert!(!m.contains("PATH=") && !m.contains("HOME="), "{m}");
        }
        other => panic!("{other:?}"),
    }
}
