//! Karmic's domain: aggregates, commands, events and the value types they are made of.
//!
//! Nothing here does I/O. Whatever an aggregate needs from the outside world (a password
//! hash, the current time, a fresh id) is looked up by the application service and placed
//! in the command, so every decision is a pure function of past events and the command.

pub mod ai_job;
pub mod document;
pub mod profile;
pub mod user;
pub mod values;

pub use ai_job::{
    AiJob, AiJobCommand, AiJobError, AiJobEvent, Analysis, Entities, JobId, JobStatus, PiiFlags,
};
pub use document::{
    ContentType, Document, DocumentCommand, DocumentError, DocumentEvent, DocumentId, DocumentSize,
    DocumentStatus, FileName, ObjectKey, Rejection, Sniffed,
};
pub use profile::{Profile, ProfileCommand, ProfileError, ProfileEvent, ProfileFields};
pub use user::{Role, User, UserCommand, UserError, UserEvent};
pub use values::{
    AvatarUrl, Bio, DisplayName, Email, Location, Password, PasswordHash, UserId, ValueError,
    Website,
};

/// The version written with every event of this release. Bump it (and add an upcaster in
/// `commands::upcast`) whenever the shape of an event's payload changes; never change the
/// meaning of a stored version.
pub const EVENT_VERSION_1: &str = "1.0";
