//! Object storage: S3 through aws-sdk-s3 (presigned uploads and downloads, conditional
//! bounded reads, deletes) and, behind the `embedded` feature, an S3-compatible endpoint
//! over local files so the embedded default uses the same code path as AWS.

pub mod objects;

#[cfg(feature = "embedded")]
pub mod embedded;

pub use objects::{Fetched, ObjectInfo, ObjectStore, Presigned, S3Settings};

#[cfg(feature = "embedded")]
pub use embedded::{EmbeddedS3, ObjectCreatedSink};
