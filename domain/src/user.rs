//! The `User` aggregate: an account that can sign in.

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

use crate::EVENT_VERSION_1;
use crate::values::{DisplayName, Email, PasswordHash, UserId};

/// What a signed-in user may do. Carried in the access token's `role` claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    #[default]
    User,
    Admin,
}

impl Role {
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Admin => "admin",
        }
    }
}

#[derive(Debug, Clone)]
pub enum UserCommand {
    /// Create the account. `grant_admin` is decided by the application (bootstrap admin).
    Register {
        user_id: UserId,
        email: Email,
        password_hash: PasswordHash,
        display_name: DisplayName,
        grant_admin: bool,
    },
    ChangePassword {
        password_hash: PasswordHash,
    },
    /// Idempotent: granting a role the user has emits nothing.
    GrantAdmin,
    /// Idempotent: revoking a role the user lacks emits nothing.
    RevokeAdmin,
    /// Idempotent: deactivating a deactivated user emits nothing.
    Deactivate,
}

/// Everything that can happen to a user. Variant names are the stored event names: never
/// rename one; add a new variant or version and upcast instead.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum UserEvent {
    UserRegistered {
        user_id: UserId,
        email: String,
        password_hash: PasswordHash,
        display_name: String,
    },
    PasswordChanged {
        password_hash: PasswordHash,
    },
    AdminRoleGranted,
    AdminRoleRevoked,
    UserDeactivated,
}

impl DomainEvent for UserEvent {
    fn event_type(&self) -> String {
        match self {
            UserEvent::UserRegistered { .. } => "UserRegistered",
            UserEvent::PasswordChanged { .. } => "PasswordChanged",
            UserEvent::AdminRoleGranted => "AdminRoleGranted",
            UserEvent::AdminRoleRevoked => "AdminRoleRevoked",
            UserEvent::UserDeactivated => "UserDeactivated",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        EVENT_VERSION_1.to_owned()
    }
}

/// Why a user command was refused. HTTP mapping: `AlreadyRegistered` → 409,
/// `NotRegistered` → 404, `Deactivated` → 409.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserError {
    #[error("this user is already registered")]
    AlreadyRegistered,
    #[error("no such user")]
    NotRegistered,
    #[error("this user is deactivated")]
    Deactivated,
}

/// The state a user's decisions need, folded from its events.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct User {
    pub id: Option<UserId>,
    pub email: Option<Email>,
    pub password_hash: Option<PasswordHash>,
    pub role: Role,
    pub active: bool,
}

impl User {
    pub fn is_registered(&self) -> bool {
        self.id.is_some()
    }

    fn require_active(&self) -> Result<(), UserError> {
        if !self.is_registered() {
            Err(UserError::NotRegistered)
        } else if !self.active {
            Err(UserError::Deactivated)
        } else {
            Ok(())
        }
    }

    /// The pure decision: which events a command produces in the current state.
    pub fn decide(&self, command: UserCommand) -> Result<Vec<UserEvent>, UserError> {
        match command {
            UserCommand::Register {
                user_id,
                email,
                password_hash,
                display_name,
                grant_admin,
            } => {
                if self.is_registered() {
                    return Err(UserError::AlreadyRegistered);
                }
                let mut events = vec![UserEvent::UserRegistered {
                    user_id,
                    email: email.as_str().to_owned(),
                    password_hash,
                    display_name: display_name.into_string(),
                }];
                if grant_admin {
                    events.push(UserEvent::AdminRoleGranted);
                }
                Ok(events)
            }
            UserCommand::ChangePassword { password_hash } => {
                self.require_active()?;
                Ok(vec![UserEvent::PasswordChanged { password_hash }])
            }
            UserCommand::GrantAdmin => {
                self.require_active()?;
                Ok(if self.role == Role::Admin {
                    vec![]
                } else {
                    vec![UserEvent::AdminRoleGranted]
                })
            }
            UserCommand::RevokeAdmin => {
                if !self.is_registered() {
                    return Err(UserError::NotRegistered);
                }
                Ok(if self.role == Role::Admin {
                    vec![UserEvent::AdminRoleRevoked]
                } else {
                    vec![]
                })
            }
            UserCommand::Deactivate => {
                if !self.is_registered() {
                    return Err(UserError::NotRegistered);
                }
                Ok(if self.active {
                    vec![UserEvent::UserDeactivated]
                } else {
                    vec![]
                })
            }
        }
    }
}

impl Aggregate for User {
    const TYPE: &'static str = "user";
    type Command = UserCommand;
    type Event = UserEvent;
    type Error = UserError;
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
            UserEvent::UserRegistered {
                user_id,
                email,
                password_hash,
                ..
            } => {
                self.id = Some(user_id);
                // Stored emails were canonical when written; re-parse leniently so that an
                // old event never fails to load.
                self.email = Email::parse(&email).ok();
                self.password_hash = Some(password_hash);
                self.active = true;
            }
            UserEvent::PasswordChanged { password_hash } => {
                self.password_hash = Some(password_hash)
            }
            UserEvent::AdminRoleGranted => self.role = Role::Admin,
            UserEvent::AdminRoleRevoked => self.role = Role::User,
            UserEvent::UserDeactivated => self.active = false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_es::test::TestFramework;

    type UserTest = TestFramework<User>;

    fn id() -> UserId {
        UserId::parse("0190f0c4-1b2c-7d3e-8f40-000000000001").unwrap()
    }
    fn hash(s: &str) -> PasswordHash {
        PasswordHash::from_phc(format!("$argon2id$v=19$m=19456,t=2,p=1${s}"))
    }
    fn registered() -> UserEvent {
        UserEvent::UserRegistered {
            user_id: id(),
            email: "ann@example.com".into(),
            password_hash: hash("one"),
            display_name: "Ann".into(),
        }
    }
    fn register(grant_admin: bool) -> UserCommand {
        UserCommand::Register {
            user_id: id(),
            email: Email::parse("Ann@Example.com").unwrap(),
            password_hash: hash("one"),
            display_name: DisplayName::parse("Ann").unwrap(),
            grant_admin,
        }
    }

    #[test]
    fn registering_a_new_user_records_it_with_the_canonical_email() {
        UserTest::with(())
            .given_no_previous_events()
            .when(register(false))
            .then_expect_events(vec![registered()]);
    }

    #[test]
    fn registering_the_bootstrap_admin_also_grants_the_admin_role() {
        UserTest::with(())
            .given_no_previous_events()
            .when(register(true))
            .then_expect_events(vec![registered(), UserEvent::AdminRoleGranted]);
    }

    #[test]
    fn registering_twice_is_refused() {
        UserTest::with(())
            .given(vec![registered()])
            .when(register(false))
            .then_expect_error(UserError::AlreadyRegistered);
    }

    #[test]
    fn changing_the_password_records_the_new_hash() {
        UserTest::with(())
            .given(vec![registered()])
            .when(UserCommand::ChangePassword {
                password_hash: hash("two"),
            })
            .then_expect_events(vec![UserEvent::PasswordChanged {
                password_hash: hash("two"),
            }]);
    }

    #[test]
    fn changing_the_password_of_an_unknown_user_is_refused() {
        UserTest::with(())
            .given_no_previous_events()
            .when(UserCommand::ChangePassword {
                password_hash: hash("two"),
            })
            .then_expect_error(UserError::NotRegistered);
    }

    #[test]
    fn changing_the_password_of_a_deactivated_user_is_refused() {
        UserTest::with(())
            .given(vec![registered(), UserEvent::UserDeactivated])
            .when(UserCommand::ChangePassword {
                password_hash: hash("two"),
            })
            .then_expect_error(UserError::Deactivated);
    }

    #[test]
    fn granting_admin_records_the_role_once() {
        UserTest::with(())
            .given(vec![registered()])
            .when(UserCommand::GrantAdmin)
            .then_expect_events(vec![UserEvent::AdminRoleGranted]);
        UserTest::with(())
            .given(vec![registered(), UserEvent::AdminRoleGranted])
            .when(UserCommand::GrantAdmin)
            .then_expect_events(vec![]);
    }

    #[test]
    fn granting_admin_to_an_unknown_or_deactivated_user_is_refused() {
        UserTest::with(())
            .given_no_previous_events()
            .when(UserCommand::GrantAdmin)
            .then_expect_error(UserError::NotRegistered);
        UserTest::with(())
            .given(vec![registered(), UserEvent::UserDeactivated])
            .when(UserCommand::GrantAdmin)
            .then_expect_error(UserError::Deactivated);
    }

    #[test]
    fn revoking_admin_records_it_only_when_held() {
        UserTest::with(())
            .given(vec![registered(), UserEvent::AdminRoleGranted])
            .when(UserCommand::RevokeAdmin)
            .then_expect_events(vec![UserEvent::AdminRoleRevoked]);
        UserTest::with(())
            .given(vec![registered()])
            .when(UserCommand::RevokeAdmin)
            .then_expect_events(vec![]);
    }

    #[test]
    fn revoking_admin_from_an_unknown_user_is_refused() {
        UserTest::with(())
            .given_no_previous_events()
            .when(UserCommand::RevokeAdmin)
            .then_expect_error(UserError::NotRegistered);
    }

    #[test]
    fn deactivating_records_it_once() {
        UserTest::with(())
            .given(vec![registered()])
            .when(UserCommand::Deactivate)
            .then_expect_events(vec![UserEvent::UserDeactivated]);
        UserTest::with(())
            .given(vec![registered(), UserEvent::UserDeactivated])
            .when(UserCommand::Deactivate)
            .then_expect_events(vec![]);
    }

    #[test]
    fn deactivating_an_unknown_user_is_refused() {
        UserTest::with(())
            .given_no_previous_events()
            .when(UserCommand::Deactivate)
            .then_expect_error(UserError::NotRegistered);
    }

    #[test]
    fn folding_events_gives_the_current_state() {
        let mut user = User::default();
        for e in [
            registered(),
            UserEvent::AdminRoleGranted,
            UserEvent::PasswordChanged {
                password_hash: hash("two"),
            },
        ] {
            user.apply(e);
        }
        assert_eq!(user.role, Role::Admin);
        assert!(user.active);
        assert_eq!(user.password_hash, Some(hash("two")));
        assert_eq!(user.email.unwrap().as_str(), "ann@example.com");
    }

    #[test]
    fn stored_event_names_are_stable() {
        let json = serde_json::to_value(UserEvent::AdminRoleGranted).unwrap();
        assert_eq!(json, serde_json::json!("AdminRoleGranted"));
        assert_eq!(registered().event_type(), "UserRegistered");
        assert_eq!(registered().event_version(), "1.0");
    }
}
