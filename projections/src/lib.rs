//! Projections: durable catch-up subscriptions over the global event feed, and the read
//! models they maintain.
//!
//! A projection reads the feed from its stored checkpoint, applies each batch idempotently
//! (every read-model row remembers the last aggregate sequence it applied and ignores older
//! or equal ones) and then advances its checkpoint. A crash between apply and checkpoint
//! re-applies a batch, which changes nothing. One driver per projection at a time: a
//! lease row beside the checkpoint, on both stores and across processes (see
//! [`checkpoint`]).

pub mod cache;
pub mod checkpoint;
pub mod documents;
pub mod engine;
pub mod mongo;
pub mod ops;
pub mod provisioner;
pub mod read_models;

pub use checkpoint::CheckpointStore;
pub use documents::{
    DocumentState, DocumentStore, DocumentView, DocumentsProjection, JobState, JobView,
    MongoDocuments, SqlDocuments,
};
pub use engine::{Nudging, Projection, Projector, ProjectorSettings};
pub use read_models::{ProfileView, ReadModels, UserView};
