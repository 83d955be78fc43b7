//! Text out of each supported format, within [`Limits`].

use std::io::{Cursor, Read};

use domain::{ContentType, Sniffed};

use super::{AnalysisError, Limits};

/// A document's text and what else the format tells.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extracted {
    pub text: String,
    pub pages: Option<u32>,
    /// Why the text is empty or partial (an encrypted PDF, pages left out).
    pub note: Option<String>,
}

pub fn extract(
    bytes: &[u8],
    declared: ContentType,
    limits: &Limits,
) -> Result<Extracted, AnalysisError> {
    match declared {
        ContentType::Pdf => pdf(bytes, limits),
        ContentType::Docx => Ok(Extracted {
            text: docx(bytes, limits)?,
            ..Extracted::default()
        }),
        ContentType::Html => Ok(Extracted {
            text: html(bytes)?,
            ..Extracted::default()
        }),
        ContentType::Markdown => Ok(Extracted {
            text: markdown(&utf8(bytes)?),
            ..Extracted::default()
        }),
        ContentType::Csv => Ok(Extracted {
            text: csv_text(bytes)?,
            ..Extracted::default()
        }),
        ContentType::PlainText => Ok(Extracted {
            text: utf8(bytes)?,
            ..Extracted::default()
        }),
    }
}

/// What a file's bytes say it is, for the upload's type check: magic numbers only, since
/// this runs in the worker itself on untrusted bytes (no parser; the isolated analysis
/// then finds out whether a ZIP really is a DOCX). Works on a prefix too: a character cut
/// at the end does not make text binary.
pub fn sniff(bytes: &[u8]) -> Sniffed {
    let head = &bytes[..bytes.len().min(1024)];
    if head.windows(5).any(|w| w == b"%PDF-") {
        Sniffed::Pdf
    } else if bytes.starts_with(b"PK\x03\x04") {
        Sniffed::Docx
    } else if !bytes.contains(&0)
        && match std::str::from_utf8(bytes) {
            Ok(_) => true,
            Err(e) => e.error_len().is_none(),
        }
    {
        Sniffed::Text
    } else {
        Sniffed::Other
    }
}

fn utf8(bytes: &[u8]) -> Result<String, AnalysisError> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    String::from_utf8(bytes.to_vec())
        .map_err(|e| AnalysisError::Corrupt(format!("not UTF-8 text: {e}")))
}

fn pdf(bytes: &[u8], limits: &Limits) -> Result<Extracted, AnalysisError> {
    let doc = pdf_oxide::PdfDocument::from_bytes(bytes.to_vec())
        .map_err(|e| AnalysisError::Corrupt(format!("PDF: {e}")))?;
    // Opening tries the empty user password; a document that needs another one cannot
    // be read, and says so.
    if doc.is_encrypted() && !doc.is_authenticated() {
        return Ok(Extracted {
            note: Some("encrypted: the text cannot be read without its password".to_owned()),
            ..Extracted::default()
        });
    }
    let total = doc
        .page_count()
        .map_err(|e| AnalysisError::Corrupt(format!("PDF: {e}")))?;
    let read = total.min(limits.max_pages);
    let mut text = String::new();
    let mut failed = 0usize;
    for page in 0..read {
        match doc.extract_text(page) {
            Ok(t) => {
                text.push_str(&t);
                text.push('\n');
            }
            Err(_) => failed += 1,
        }
        if text.len() > limits.max_text_chars.saturating_mul(4) {
            break;
        }
    }
    if read > 0 && failed == read {
        return Err(AnalysisError::Corrupt(format!(
            "PDF: none of its {read} pages could be read"
        )));
    }
    let mut notes = Vec::new();
    if read < total {
        notes.push(format!("only the first {read} of {total} pages were read"));
    }
    if failed > 0 {
        notes.push(format!("{failed} pages could not be read"));
    }
    Ok(Extracted {
        text,
        pages: u32::try_from(total).ok(),
        note: (!notes.is_empty()).then(|| notes.join("; ")),
    })
}

/// The text of `word/document.xml`: runs (`w:t`), tabs and paragraph breaks. The entry is
/// inflated through a cap, whatever size the archive claims for it.
fn docx(bytes: &[u8], limits: &Limits) -> Result<String, AnalysisError> {
    use quick_xml::escape::resolve_predefined_entity;
    use quick_xml::events::Event;

    let cap = limits.max_zip_entry_bytes;
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes))
        .map_err(|e| AnalysisError::Corrupt(format!("DOCX: {e}")))?;
    let mut xml = Vec::new();
    {
        let mut entry = zip
            .by_name("word/document.xml")
            .map_err(|e| AnalysisError::Corrupt(format!("DOCX: word/document.xml: {e}")))?;
        if entry.size() > cap {
            return Err(AnalysisError::TooLarge(format!(
                "DOCX: word/document.xml inflates to {} bytes, the limit is {cap}",
                entry.size()
            )));
        }
        entry
            .by_ref()
            .take(cap + 1)
            .read_to_end(&mut xml)
            .map_err(|e| AnalysisError::Corrupt(format!("DOCX: {e}")))?;
    }
    if xml.len() as u64 > cap {
        return Err(AnalysisError::TooLarge(format!(
            "DOCX: word/document.xml inflates past the limit of {cap} bytes"
        )));
    }
    let mut reader = quick_xml::Reader::from_reader(xml.as_slice());
    let mut out = String::new();
    let mut in_text = false;
    loop {
        let event = reader
            .read_event()
            .map_err(|e| AnalysisError::Corrupt(format!("DOCX: {e}")))?;
        match event {
            Event::Start(e) if e.local_name().as_ref() == "t" => in_text = true,
            Event::End(e) => match e.local_name().as_ref() {
                "t" => in_text = false,
                "p" => out.push('\n'),
                "tc" => out.push('\t'),
                _ => {}
            },
            Event::Empty(e) => match e.local_name().as_ref() {
                "tab" => out.push('\t'),
                "br" | "cr" | "p" => out.push('\n'),
                _ => {}
            },
            Event::Text(t) if in_text => out.push_str(&t.xml10_content()),
            Event::CData(t) if in_text => out.push_str(&t.xml10_content()),
            Event::GeneralRef(r) if in_text => {
                if let Ok(Some(c)) = r.resolve_char_ref() {
                    out.push(c);
                } else if let Some(s) = resolve_predefined_entity(&r) {
                    out.push_str(s);
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    Ok(out)
}

fn html(bytes: &[u8]) -> Result<String, AnalysisError> {
    html2text::config::plain_no_decorate()
        .raw_mode(true)
        .string_from_read(bytes, 120)
        .map_err(|e| AnalysisError::Corrupt(format!("HTML: {e}")))
}

fn markdown(src: &str) -> String {
    use pulldown_cmark::{Event, Options, Parser, TagEnd};
    let options = Options::ENABLE_TABLES
        | Options::ENABLE_FOOTNOTES
        | Options::ENABLE_STRIKETHROUGH
        | Options::ENABLE_TASKLISTS;
    let mut out = String::with_capacity(src.len());
    for event in Parser::new_ext(src, options) {
        match event {
            Event::Text(t) | Event::Code(t) | Event::InlineMath(t) | Event::DisplayMath(t) => {
                out.push_str(&t)
            }
            Event::SoftBreak => out.push(' '),
            Event::HardBreak | Event::Rule => out.push('\n'),
            Event::End(TagEnd::TableCell) => out.push('\t'),
            Event::End(
                TagEnd::Paragraph
                | TagEnd::Heading(_)
                | TagEnd::Item
                | TagEnd::CodeBlock
                | TagEnd::BlockQuote(_)
                | TagEnd::TableRow
                | TagEnd::TableHead,
            ) => out.push('\n'),
            _ => {}
        }
    }
    out
}

/// Rows as lines, cells separated by tabs. Ragged rows are fine; any byte is kept
/// (invalid UTF-8 is replaced).
fn csv_text(bytes: &[u8]) -> Result<String, AnalysisError> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(bytes);
    let mut out = String::with_capacity(bytes.len());
    for record in reader.byte_records() {
        let record = record.map_err(|e| AnalysisError::Corrupt(format!("CSV: {e}")))?;
        for (i, field) in record.iter().enumerate() {
            if i > 0 {
                out.push('\t');
            }
            out.push_str(&String::from_utf8_lossy(field));
        }
        out.push('\n');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_and_csv_come_out_as_plain_text() {
        let md =
            markdown("# Title\n\nSome *emphasis* and `code`.\n\n| a | b |\n|---|---|\n| 1 | 2 |\n");
        assert!(md.contains("Title\n"));
        assert!(md.contains("Some emphasis and code."));
        assert!(md.contains("1\t2\t"));
        let csv = csv_text(b"name,amount\nAnn,\"1,000\"\nBob\n").unwrap();
        assert_eq!(csv, "name\tamount\nAnn\t1,000\nBob\n");
    }

    #[test]
    fn sniffing_tells_binary_formats_and_text_apart() {
        assert_eq!(sniff(b"%PDF-1.7\n..."), Sniffed::Pdf);
        assert_eq!(sniff(b"plain words"), Sniffed::Text);
        assert_eq!(sniff(b"<!DOCTYPE html><p>x</p>"), Sniffed::Text);
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\n\0\0\0"), Sniffed::Other);
        assert_eq!(sniff(b"ab\xff\xfe"), Sniffed::Other);
        assert_eq!(sniff(b"PK\x03\x04rest of a zip"), Sniffed::Docx);
        // A prefix that cuts a character in two is still text.
        assert_eq!(
            sniff("caf\u{e9}".as_bytes().split_last().unwrap().1),
            Sniffed::Text
        );
        assert_eq!(sniff(b"text\0with a NUL"), Sniffed::Other);
    }

    #[test]
    fn text_that_is_not_utf8_is_corrupt() {
        assert!(matches!(
            extract(b"\xff\xfe\x00a", ContentType::PlainText, &Limits::default()),
            Err(AnalysisError::Corrupt(_))
        ));
    }
}
