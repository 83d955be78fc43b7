//! The `Document` aggregate: one uploaded file, from the upload request to its deletion.
//!
//! The client uploads straight to object storage with a presigned URL; the storage's
//! notification, not the client, confirms the upload. So the aggregate records what was
//! *declared* when the URL was signed and what *arrived*, and refuses an object that does
//! not match (size, or a type its content betrays).

use std::fmt;

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::EVENT_VERSION_1;
use crate::values::{UserId, ValueError};

/// A document's id (UUIDv7: newest-first listings follow it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DocumentId(Uuid);

impl DocumentId {
    pub fn new_v7() -> Self {
        DocumentId(Uuid::now_v7())
    }

    pub fn parse(s: &str) -> Result<Self, ValueError> {
        Uuid::parse_str(s)
            .map(DocumentId)
            .map_err(|_| ValueError::InvalidId {
                field: "document_id",
            })
    }

    pub fn from_uuid(u: Uuid) -> Self {
        DocumentId(u)
    }

    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl fmt::Display for DocumentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The document types Karmic accepts and can analyse, by their canonical media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContentType {
    Pdf,
    Docx,
    PlainText,
    Markdown,
    Html,
    Csv,
}

impl ContentType {
    pub const ALL: [ContentType; 6] = [
        ContentType::Pdf,
        ContentType::Docx,
        ContentType::PlainText,
        ContentType::Markdown,
        ContentType::Html,
        ContentType::Csv,
    ];

    /// The allowed media types, for error messages and the API description.
    pub const ALLOWED: &'static str = "application/pdf, \
        application/vnd.openxmlformats-officedocument.wordprocessingml.document, \
        text/plain, text/markdown, text/html, text/csv";

    /// Parse a media type as a client declares it: case-insensitive, parameters (such as
    /// `; charset=utf-8`) ignored. The upload must then be sent with [`ContentType::mime`]
    /// exactly, since that is what the URL signs.
    pub fn parse(s: &str) -> Result<Self, ValueError> {
        let essence = s
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        ContentType::ALL
            .into_iter()
            .find(|t| t.mime() == essence)
            .ok_or(ValueError::NotAllowed {
                field: "content_type",
                allowed: ContentType::ALLOWED,
            })
    }

    pub fn mime(self) -> &'static str {
        match self {
            ContentType::Pdf => "application/pdf",
            ContentType::Docx => {
                "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
            }
            ContentType::PlainText => "text/plain",
            ContentType::Markdown => "text/markdown",
            ContentType::Html => "text/html",
            ContentType::Csv => "text/csv",
        }
    }

    /// Does content that sniffs as `sniffed` fit this declared type? Binary formats are
    /// recognised by their magic bytes; the text formats cannot be told apart by content,
    /// so any text fits any of them.
    pub fn accepts(self, sniffed: Sniffed) -> bool {
        matches!(
            (self, sniffed),
            (ContentType::Pdf, Sniffed::Pdf)
                | (ContentType::Docx, Sniffed::Docx)
                | (
                    ContentType::PlainText
                        | ContentType::Markdown
                        | ContentType::Html
                        | ContentType::Csv,
                    Sniffed::Text
                )
        )
    }
}

impl fmt::Display for ContentType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.mime())
    }
}

/// What an object's first bytes say it is (the worker looks; the aggregate decides).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sniffed {
    Pdf,
    Docx,
    /// Valid UTF-8 text (HTML, Markdown, CSV and plain text all look like this).
    Text,
    /// Anything else: another binary format, or bytes that are not UTF-8.
    Other,
    /// Not looked at: larger than the worker reads (its size limit is below the one the
    /// upload was signed under, a configuration mismatch between API and worker).
    Unread,
}

/// The name the client gave its file: shown back to it, never used as a storage key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileName(String);

impl FileName {
    pub const MAX_CHARS: usize = 255;

    pub fn parse(s: &str) -> Result<Self, ValueError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(ValueError::Empty { field: "filename" });
        }
        if s.chars().count() > Self::MAX_CHARS {
            return Err(ValueError::TooLong {
                field: "filename",
                max: Self::MAX_CHARS,
            });
        }
        if s.chars().any(char::is_control) {
            return Err(ValueError::ControlCharacters { field: "filename" });
        }
        // A name, not a path: nothing downstream may mistake it for one.
        if s.contains(['/', '\\']) {
            return Err(ValueError::Forbidden {
                field: "filename",
                what: "path separators (/ or \\)",
            });
        }
        Ok(FileName(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

/// A declared document size in bytes: at least 1, at most the configured limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DocumentSize(u64);

impl DocumentSize {
    pub fn parse(bytes: u64, max: u64) -> Result<Self, ValueError> {
        if bytes == 0 || bytes > max {
            return Err(ValueError::OutOfRange {
                field: "size",
                min: 1,
                max,
            });
        }
        Ok(DocumentSize(bytes))
    }

    pub fn bytes(self) -> u64 {
        self.0
    }
}

/// Where a document's object lives in the bucket: `documents/{owner}/{document}`. The
/// server derives it; the client's filename never reaches it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ObjectKey(String);

impl ObjectKey {
    const PREFIX: &'static str = "documents/";

    pub fn for_document(owner: UserId, document: DocumentId) -> Self {
        ObjectKey(format!("{}{owner}/{document}", Self::PREFIX))
    }

    /// Read a key back (from a storage notification): the owner and document it names,
    /// or `None` for a key Karmic never hands out.
    pub fn parse(key: &str) -> Option<(Self, UserId, DocumentId)> {
        let rest = key.strip_prefix(Self::PREFIX)?;
        let (owner, document) = rest.split_once('/')?;
        let owner = UserId::parse(owner).ok()?;
        let document = DocumentId::parse(document).ok()?;
        let canonical = ObjectKey::for_document(owner, document);
        (canonical.0 == key).then_some((canonical, owner, document))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone)]
pub enum DocumentCommand {
    /// Record an upload request; the URL is signed for exactly this type and size.
    RequestUpload {
        document_id: DocumentId,
        owner: UserId,
        filename: FileName,
        content_type: ContentType,
        size: DocumentSize,
    },
    /// Storage reports the object arrived, with what it holds (placed here by the worker).
    ConfirmUpload {
        size: u64,
        etag: String,
        sniffed: Sniffed,
    },
    /// The owner deletes the document.
    Delete { by: UserId },
}

/// Why an arrived object was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Rejection {
    /// It is not the size the URL was signed for.
    SizeMismatch { declared: u64, actual: u64 },
    /// Its content is not the declared type.
    TypeMismatch {
        declared: ContentType,
        sniffed: Sniffed,
    },
    /// It is larger than the worker reads.
    TooLarge { actual: u64 },
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::SizeMismatch { declared, actual } => {
                write!(f, "declared {declared} bytes, {actual} arrived")
            }
            Rejection::TypeMismatch { declared, sniffed } => {
                write!(f, "declared {declared}, content looks like {sniffed:?}")
            }
            Rejection::TooLarge { actual } => {
                write!(f, "{actual} bytes: more than the worker reads")
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DocumentEvent {
    UploadRequested {
        document_id: DocumentId,
        owner: UserId,
        filename: String,
        content_type: ContentType,
        size: u64,
        object_key: ObjectKey,
    },
    UploadConfirmed {
        size: u64,
        etag: String,
    },
    DocumentRejected {
        reason: Rejection,
    },
    DocumentDeleted {
        by: UserId,
    },
}

impl DomainEvent for DocumentEvent {
    fn event_type(&self) -> String {
        match self {
            DocumentEvent::UploadRequested { .. } => "UploadRequested",
            DocumentEvent::UploadConfirmed { .. } => "UploadConfirmed",
            DocumentEvent::DocumentRejected { .. } => "DocumentRejected",
            DocumentEvent::DocumentDeleted { .. } => "DocumentDeleted",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        EVENT_VERSION_1.to_owned()
    }
}

/// Why a document command was refused. HTTP mapping: `NotFound` → 404,
/// `AlreadyExists` → 409.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DocumentError {
    #[error("no such document")]
    NotFound,
    #[error("this document already exists")]
    AlreadyExists,
}

/// Where a document is in its life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DocumentStatus {
    /// Not requested (the aggregate does not exist).
    #[default]
    None,
    /// The URL is signed; nothing has arrived yet.
    AwaitingUpload,
    Uploaded,
    Rejected,
    Deleted,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Document {
    pub status: DocumentStatus,
    pub owner: Option<UserId>,
    pub filename: String,
    pub content_type: Option<ContentType>,
    pub declared_size: u64,
    pub object_key: Option<ObjectKey>,
    pub size: Option<u64>,
    pub etag: Option<String>,
}

impl Document {
    pub fn exists(&self) -> bool {
        self.status != DocumentStatus::None
    }

    pub fn decide(&self, command: DocumentCommand) -> Result<Vec<DocumentEvent>, DocumentError> {
        match command {
            DocumentCommand::RequestUpload {
                document_id,
                owner,
                filename,
                content_type,
                size,
            } => {
                if self.exists() {
                    return Err(DocumentError::AlreadyExists);
                }
                Ok(vec![DocumentEvent::UploadRequested {
                    document_id,
                    owner,
                    filename: filename.into_string(),
                    content_type,
                    size: size.bytes(),
                    object_key: ObjectKey::for_document(owner, document_id),
                }])
            }
            DocumentCommand::ConfirmUpload {
                size,
                etag,
                sniffed,
            } => match self.status {
                DocumentStatus::None => Err(DocumentError::NotFound),
                // Notifications come at least once: a confirmed, refused or deleted
                // document has nothing more to learn from one.
                DocumentStatus::Uploaded | DocumentStatus::Rejected | DocumentStatus::Deleted => {
                    Ok(vec![])
                }
                DocumentStatus::AwaitingUpload => {
                    let declared = self.declared_size;
                    let content_type = self.content_type.ok_or(DocumentError::NotFound)?;
                    if size != declared {
                        return Ok(vec![DocumentEvent::DocumentRejected {
                            reason: Rejection::SizeMismatch {
                                declared,
                                actual: size,
                            },
                        }]);
                    }
                    if sniffed == Sniffed::Unread {
                        return Ok(vec![DocumentEvent::DocumentRejected {
                            reason: Rejection::TooLarge { actual: size },
                        }]);
                    }
                    if !content_type.accepts(sniffed) {
                        return Ok(vec![DocumentEvent::DocumentRejected {
                            reason: Rejection::TypeMismatch {
                                declared: content_type,
                                sniffed,
                            },
                        }]);
                    }
                    Ok(vec![DocumentEvent::UploadConfirmed { size, etag }])
                }
            },
            DocumentCommand::Delete { by } => match self.status {
                DocumentStatus::None => Err(DocumentError::NotFound),
                DocumentStatus::Deleted => Ok(vec![]),
                _ => Ok(vec![DocumentEvent::DocumentDeleted { by }]),
            },
        }
    }
}

impl Aggregate for Document {
    const TYPE: &'static str = "document";
    type Command = DocumentCommand;
    type Event = DocumentEvent;
    type Error = DocumentError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        for event in self.decide(command)? {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            DocumentEvent::UploadRequested {
                owner,
                filename,
                content_type,
                size,
                object_key,
                ..
            } => {
                self.status = DocumentStatus::AwaitingUpload;
                self.owner = Some(owner);
                self.filename = filename;
                self.content_type = Some(content_type);
                self.declared_size = size;
                self.object_key = Some(object_key);
            }
            DocumentEvent::UploadConfirmed { size, etag } => {
                self.status = DocumentStatus::Uploaded;
                self.size = Some(size);
                self.etag = Some(etag);
            }
            DocumentEvent::DocumentRejected { .. } => self.status = DocumentStatus::Rejected,
            DocumentEvent::DocumentDeleted { .. } => self.status = DocumentStatus::Deleted,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_es::test::TestFramework;

    type DocumentTest = TestFramework<Document>;

    fn owner() -> UserId {
        UserId::parse("0190f0c4-1b2c-7d3e-8f40-000000000001").unwrap()
    }
    fn doc() -> DocumentId {
        DocumentId::parse("0190f0c4-1b2c-7d3e-8f40-0000000000d1").unwrap()
    }
    fn request(content_type: ContentType, size: u64) -> DocumentCommand {
        DocumentCommand::RequestUpload {
            document_id: doc(),
            owner: owner(),
            filename: FileName::parse("  report.pdf ").unwrap(),
            content_type,
            size: DocumentSize::parse(size, 25 << 20).unwrap(),
        }
    }
    fn requested(content_type: ContentType, size: u64) -> DocumentEvent {
        DocumentEvent::UploadRequested {
            document_id: doc(),
            owner: owner(),
            filename: "report.pdf".into(),
            content_type,
            size,
            object_key: ObjectKey::for_document(owner(), doc()),
        }
    }
    fn confirm(size: u64, sniffed: Sniffed) -> DocumentCommand {
        DocumentCommand::ConfirmUpload {
            size,
            etag: "abc".into(),
            sniffed,
        }
    }

    #[test]
    fn requesting_an_upload_records_the_declaration_and_a_server_made_key() {
        DocumentTest::with(())
            .given_no_previous_events()
            .when(request(ContentType::Pdf, 1000))
            .then_expect_events(vec![requested(ContentType::Pdf, 1000)]);
        assert_eq!(
            ObjectKey::for_document(owner(), doc()).as_str(),
            "documents/0190f0c4-1b2c-7d3e-8f40-000000000001/0190f0c4-1b2c-7d3e-8f40-0000000000d1"
        );
    }

    #[test]
    fn a_matching_object_confirms_the_upload_once() {
        DocumentTest::with(())
            .given(vec![requested(ContentType::Pdf, 1000)])
            .when(confirm(1000, Sniffed::Pdf))
            .then_expect_events(vec![DocumentEvent::UploadConfirmed {
                size: 1000,
                etag: "abc".into(),
            }]);
        // The same notification again: nothing new.
        DocumentTest::with(())
            .given(vec![
                requested(ContentType::Pdf, 1000),
                DocumentEvent::UploadConfirmed {
                    size: 1000,
                    etag: "abc".into(),
                },
            ])
            .when(confirm(1000, Sniffed::Pdf))
            .then_expect_events(vec![]);
    }

    #[test]
    fn an_object_of_another_size_is_rejected() {
        DocumentTest::with(())
            .given(vec![requested(ContentType::Pdf, 1000)])
            .when(confirm(999, Sniffed::Pdf))
            .then_expect_events(vec![DocumentEvent::DocumentRejected {
                reason: Rejection::SizeMismatch {
                    declared: 1000,
                    actual: 999,
                },
            }]);
    }

    #[test]
    fn content_that_betrays_another_type_is_rejected() {
        DocumentTest::with(())
            .given(vec![requested(ContentType::Pdf, 10)])
            .when(confirm(10, Sniffed::Text))
            .then_expect_events(vec![DocumentEvent::DocumentRejected {
                reason: Rejection::TypeMismatch {
                    declared: ContentType::Pdf,
                    sniffed: Sniffed::Text,
                },
            }]);
        DocumentTest::with(())
            .given(vec![requested(ContentType::Csv, 10)])
            .when(confirm(10, Sniffed::Other))
            .then_expect_events(vec![DocumentEvent::DocumentRejected {
                reason: Rejection::TypeMismatch {
                    declared: ContentType::Csv,
                    sniffed: Sniffed::Other,
                },
            }]);
        // Too large for the worker to read: refused as such, not as the wrong type.
        DocumentTest::with(())
            .given(vec![requested(ContentType::Pdf, 10)])
            .when(confirm(10, Sniffed::Unread))
            .then_expect_events(vec![DocumentEvent::DocumentRejected {
                reason: Rejection::TooLarge { actual: 10 },
            }]);
        // Text types cannot be told apart by content: Markdown that sniffs as text is fine.
        DocumentTest::with(())
            .given(vec![requested(ContentType::Markdown, 10)])
            .when(confirm(10, Sniffed::Text))
            .then_expect_events(vec![DocumentEvent::UploadConfirmed {
                size: 10,
                etag: "abc".into(),
            }]);
    }

    #[test]
    fn unknown_documents_cannot_be_confirmed_or_deleted_and_requests_are_once() {
        DocumentTest::with(())
            .given_no_previous_events()
            .when(confirm(10, Sniffed::Pdf))
            .then_expect_error(DocumentError::NotFound);
        DocumentTest::with(())
            .given_no_previous_events()
            .when(DocumentCommand::Delete { by: owner() })
            .then_expect_error(DocumentError::NotFound);
        DocumentTest::with(())
            .given(vec![requested(ContentType::Pdf, 10)])
            .when(request(ContentType::Pdf, 10))
            .then_expect_error(DocumentError::AlreadyExists);
    }

    #[test]
    fn deleting_is_recorded_once_and_a_late_notification_changes_nothing() {
        let deleted = DocumentEvent::DocumentDeleted { by: owner() };
        DocumentTest::with(())
            .given(vec![requested(ContentType::Pdf, 10)])
            .when(DocumentCommand::Delete { by: owner() })
            .then_expect_events(vec![deleted.clone()]);
        DocumentTest::with(())
            .given(vec![requested(ContentType::Pdf, 10), deleted.clone()])
            .when(DocumentCommand::Delete { by: owner() })
            .then_expect_events(vec![]);
        DocumentTest::with(())
            .given(vec![requested(ContentType::Pdf, 10), deleted])
            .when(confirm(10, Sniffed::Pdf))
            .then_expect_events(vec![]);
    }

    #[test]
    fn values_are_parsed_at_the_boundary() {
        assert_eq!(
            ContentType::parse("Text/Markdown; charset=UTF-8").unwrap(),
            ContentType::Markdown
        );
        assert!(ContentType::parse("application/zip").is_err());
        assert!(ContentType::parse("").is_err());
        assert!(DocumentSize::parse(0, 100).is_err());
        assert!(DocumentSize::parse(101, 100).is_err());
        assert_eq!(DocumentSize::parse(100, 100).unwrap().bytes(), 100);
        assert!(FileName::parse("   ").is_err());
        assert!(FileName::parse("a\u{0}b").is_err());
        assert!(FileName::parse(&"x".repeat(256)).is_err());
        // A name, not a path.
        assert!(FileName::parse("../../etc/passwd").is_err());
        assert!(FileName::parse("a\\b.pdf").is_err());
        assert_eq!(
            FileName::parse("  Q3 report (final).pdf ")
                .unwrap()
                .as_str(),
            "Q3 report (final).pdf"
        );
    }

    #[test]
    fn object_keys_read_back_only_when_karmic_made_them() {
        let key = ObjectKey::for_document(owner(), doc());
        let (k, o, d) = ObjectKey::parse(key.as_str()).unwrap();
        assert_eq!((k, o, d), (key.clone(), owner(), doc()));
        assert!(ObjectKey::parse("documents/x/y").is_none());
        assert!(ObjectKey::parse(&format!("{key}/extra")).is_none());
        assert!(ObjectKey::parse(&key.as_str().to_uppercase()).is_none());
        assert!(ObjectKey::parse("other/a/b").is_none());
    }

    #[test]
    fn stored_event_names_are_stable() {
        assert_eq!(
            requested(ContentType::Pdf, 1).event_type(),
            "UploadRequested"
        );
        assert_eq!(
            DocumentEvent::DocumentRejected {
                reason: Rejection::SizeMismatch {
                    declared: 1,
                    actual: 2
                }
            }
            .event_type(),
            "DocumentRejected"
        );
        let json = serde_json::to_value(requested(ContentType::Docx, 1)).unwrap();
        assert_eq!(json["UploadRequested"]["content_type"], "docx");
    }
}
