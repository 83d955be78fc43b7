//! The `Profile` aggregate: what a user shows about themselves. One per user, same id.

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

use crate::EVENT_VERSION_1;
use crate::values::{AvatarUrl, Bio, DisplayName, Location, UserId, Website};

/// A complete, validated set of profile fields, as `PUT /profiles/{id}` replaces them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileFields {
    pub display_name: DisplayName,
    pub bio: Option<Bio>,
    pub avatar_url: Option<AvatarUrl>,
    pub location: Option<Location>,
    pub website: Option<Website>,
}

#[derive(Debug, Clone)]
pub enum ProfileCommand {
    /// Open the profile of a newly registered user.
    Create {
        user_id: UserId,
        display_name: DisplayName,
    },
    /// Replace every field. Emits nothing when nothing changes.
    Update(ProfileFields),
}

/// Profile events carry the complete state after the change, so a read model can apply them
/// in any order by keeping the one with the highest sequence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ProfileEvent {
    ProfileCreated {
        user_id: UserId,
        display_name: String,
    },
    ProfileUpdated {
        display_name: String,
        bio: Option<String>,
        avatar_url: Option<String>,
        location: Option<String>,
        website: Option<String>,
    },
}

impl DomainEvent for ProfileEvent {
    fn event_type(&self) -> String {
        match self {
            ProfileEvent::ProfileCreated { .. } => "ProfileCreated",
            ProfileEvent::ProfileUpdated { .. } => "ProfileUpdated",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        EVENT_VERSION_1.to_owned()
    }
}

/// Why a profile command was refused. HTTP mapping: `AlreadyExists` → 409, `NotFound` → 404.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProfileError {
    #[error("this profile already exists")]
    AlreadyExists,
    #[error("no such profile")]
    NotFound,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    pub user_id: Option<UserId>,
    pub display_name: String,
    pub bio: Option<String>,
    pub avatar_url: Option<String>,
    pub location: Option<String>,
    pub website: Option<String>,
}

impl Profile {
    pub fn exists(&self) -> bool {
        self.user_id.is_some()
    }

    pub fn decide(&self, command: ProfileCommand) -> Result<Vec<ProfileEvent>, ProfileError> {
        match command {
            ProfileCommand::Create {
                user_id,
                display_name,
            } => {
                if self.exists() {
                    return Err(ProfileError::AlreadyExists);
                }
                Ok(vec![ProfileEvent::ProfileCreated {
                    user_id,
                    display_name: display_name.into_string(),
                }])
            }
            ProfileCommand::Update(fields) => {
                if !self.exists() {
                    return Err(ProfileError::NotFound);
                }
                let event = ProfileEvent::ProfileUpdated {
                    display_name: fields.display_name.into_string(),
                    bio: fields.bio.map(Bio::into_string),
                    avatar_url: fields.avatar_url.map(AvatarUrl::into_string),
                    location: fields.location.map(Location::into_string),
                    website: fields.website.map(Website::into_string),
                };
                let mut next = self.clone();
                next.apply(event.clone());
                Ok(if next == *self { vec![] } else { vec![event] })
            }
        }
    }
}

impl Aggregate for Profile {
    const TYPE: &'static str = "profile";
    type Command = ProfileCommand;
    type Event = ProfileEvent;
    type Error = ProfileError;
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
            ProfileEvent::ProfileCreated {
                user_id,
                display_name,
            } => {
                self.user_id = Some(user_id);
                self.display_name = display_name;
            }
            ProfileEvent::ProfileUpdated {
                display_name,
                bio,
                avatar_url,
                location,
                website,
            } => {
                self.display_name = display_name;
                self.bio = bio;
                self.avatar_url = avatar_url;
                self.location = location;
                self.website = website;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_es::test::TestFramework;

    type ProfileTest = TestFramework<Profile>;

    fn id() -> UserId {
        UserId::parse("0190f0c4-1b2c-7d3e-8f40-000000000002").unwrap()
    }
    fn created() -> ProfileEvent {
        ProfileEvent::ProfileCreated {
            user_id: id(),
            display_name: "Ann".into(),
        }
    }
    fn fields(bio: &str) -> ProfileFields {
        ProfileFields {
            display_name: DisplayName::parse("Ann Lee").unwrap(),
            bio: Some(Bio::parse(bio).unwrap()),
            avatar_url: Some(AvatarUrl::parse("https://cdn.example.com/a.png").unwrap()),
            location: Some(Location::parse("Lisbon").unwrap()),
            website: None,
        }
    }
    fn updated(bio: &str) -> ProfileEvent {
        ProfileEvent::ProfileUpdated {
            display_name: "Ann Lee".into(),
            bio: Some(bio.into()),
            avatar_url: Some("https://cdn.example.com/a.png".into()),
            location: Some("Lisbon".into()),
            website: None,
        }
    }

    #[test]
    fn creating_a_profile_records_the_display_name() {
        ProfileTest::with(())
            .given_no_previous_events()
            .when(ProfileCommand::Create {
                user_id: id(),
                display_name: DisplayName::parse("Ann").unwrap(),
            })
            .then_expect_events(vec![created()]);
    }

    #[test]
    fn creating_a_profile_twice_is_refused() {
        ProfileTest::with(())
            .given(vec![created()])
            .when(ProfileCommand::Create {
                user_id: id(),
                display_name: DisplayName::parse("Ann").unwrap(),
            })
            .then_expect_error(ProfileError::AlreadyExists);
    }

    #[test]
    fn updating_records_the_complete_new_state() {
        ProfileTest::with(())
            .given(vec![created()])
            .when(ProfileCommand::Update(fields("hello")))
            .then_expect_events(vec![updated("hello")]);
    }

    #[test]
    fn updating_with_identical_fields_records_nothing() {
        ProfileTest::with(())
            .given(vec![created(), updated("hello")])
            .when(ProfileCommand::Update(fields("hello")))
            .then_expect_events(vec![]);
    }

    #[test]
    fn updating_a_missing_profile_is_refused() {
        ProfileTest::with(())
            .given_no_previous_events()
            .when(ProfileCommand::Update(fields("hello")))
            .then_expect_error(ProfileError::NotFound);
    }

    #[test]
    fn stored_event_names_are_stable() {
        assert_eq!(created().event_type(), "ProfileCreated");
        assert_eq!(updated("x").event_type(), "ProfileUpdated");
        assert_eq!(updated("x").event_version(), "1.0");
        let json = serde_json::to_value(created()).unwrap();
        assert!(json.get("ProfileCreated").is_some());
    }
}
