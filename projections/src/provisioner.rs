//! A projection that issues commands: every registered user gets a profile.
//!
//! Registration opens the profile itself; this catches the case where the process died
//! between the user's commit and the profile's. Opening a profile is idempotent.

use anyhow::{Context, Result};
use commands::accounts::Accounts;
use commands::{CommandMeta, StoredEvent};
use cqrs_es::Aggregate;
use domain::{DisplayName, User, UserEvent};

use crate::engine::Projection;

pub struct ProfileProvisioner(pub Accounts);

#[async_trait::async_trait]
impl Projection for ProfileProvisioner {
    fn name(&self) -> &'static str {
        "profile_provisioner"
    }

    /// It keeps no read model: nothing a command answers depends on it, so commands never
    /// wait for it (the background loop and the projector function drive it).
    fn handles(&self, _aggregate_type: &str, _event_type: &str) -> bool {
        false
    }

    async fn apply(&self, events: &[StoredEvent]) -> Result<()> {
        for e in events.iter().filter(|e| e.aggregate_type == User::TYPE) {
            if let UserEvent::UserRegistered {
                user_id,
                display_name,
                ..
            } = e.decode()?
            {
                // A stored name that no longer passes today's rules still gets a profile.
                let name = DisplayName::parse(&display_name)
                    .or_else(|_| DisplayName::parse("New user"))
                    .context("fallback display name")?;
                self.0
                    .open_profile(user_id, name, &CommandMeta::system("profile_provisioner"))
                    .await?;
            }
        }
        Ok(())
    }
}
