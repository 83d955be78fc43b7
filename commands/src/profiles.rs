//! Profiles: the owner edits theirs.

use std::sync::Arc;

use cqrs_es::Aggregate;
use domain::{Profile, ProfileCommand, ProfileError, ProfileFields, User, UserId};

use crate::error::CommandError;
use crate::store::{AggregateStore, Database, Guard, Loaded};
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
    /// the version after the change (unchanged when nothing changed). The append requires,
    /// in the same statement, that the owner's account was never deactivated
    /// (`CommandError::Guarded` otherwise): a token that outlives its account cannot write.
    #[tracing::instrument(skip_all, fields(profile_id = %id), err(level = "debug"))]
    pub async fn update(
        &self,
        id: UserId,
        fields: ProfileFields,
        expected_version: Option<u64>,
        meta: &CommandMeta,
    ) -> Result<u64, CommandError<ProfileError>> {
        let owner_active = Guard {
            aggregate_type: User::TYPE,
            aggregate_id: id.to_string(),
            absent_event: "UserDeactivated",
            refusal: "this account is deactivated",
        };
        let committed = self
            .profiles
            .execute_guarded(
                &id.to_string(),
                ProfileCommand::Update(fields),
                &(),
                expected_version,
                meta,
                Some(&owner_active),
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
