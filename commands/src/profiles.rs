//! Profiles: the owner edits theirs.

use std::sync::Arc;

use domain::{Profile, ProfileCommand, ProfileError, ProfileFields, UserId};

use crate::error::CommandError;
use crate::store::{AggregateStore, Database, Loaded};
use crate::{AfterCommit, CommandMeta, StoreError};

/// The profiles application service.
#[derive(Clone)]
pub struct Profiles {
    profiles: AggregateStore<Profile>,
    after_commit: Arc<dyn AfterCommit>,
}

impl Profiles {
    pub fn new(db: &Database, after_commit: Arc<dyn AfterCommit>) -> Self {
        Profiles {
            profiles: db.aggregates(),
            after_commit,
        }
    }

    /// Replace a profile's fields. `expected_version` is the caller's `If-Match`. Returns
    /// the version after the change (unchanged when nothing changed).
    #[tracing::instrument(skip_all, fields(profile_id = %id), err(level = "debug"))]
    pub async fn update(
        &self,
        id: UserId,
        fields: ProfileFields,
        expected_version: Option<u64>,
        meta: &CommandMeta,
    ) -> Result<u64, CommandError<ProfileError>> {
        let committed = self
            .profiles
            .execute(
                &id.to_string(),
                ProfileCommand::Update(fields),
                &(),
                expected_version,
                meta,
            )
            .await?;
        if committed.events > 0 {
            self.after_commit.committed(&committed.written).await;
        }
        Ok(committed.version)
    }

    /// The profile as folded from the event store (the source of truth).
    pub async fn load(&self, id: UserId) -> Result<Loaded<Profile>, StoreError> {
        self.profiles.load(&id.to_string()).await
    }
}
