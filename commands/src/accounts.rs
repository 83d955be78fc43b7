//! Accounts: registration, sign-in and roles.

use std::sync::Arc;

use cqrs_es::Aggregate;
use domain::{
    DisplayName, Email, Password, Profile, ProfileCommand, ProfileError, Role, User, UserCommand,
    UserError, UserId,
};
use tracing::{info, warn};

use crate::error::{CommandError, StoreError};
use crate::password::{HashError, PasswordHasher};
use crate::store::{AggregateStore, Database, Written};
use crate::{AfterCommit, CommandMeta};

/// Why a registration did not happen.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// Another account has this email (compared case-insensitively). HTTP 409.
    #[error("an account with this email already exists")]
    EmailTaken,
    /// Too many password computations queued. HTTP 429 with `Retry-After`.
    #[error("too busy to register now; try again shortly")]
    Busy,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<HashError> for RegisterError {
    fn from(e: HashError) -> Self {
        match e {
            HashError::Busy => RegisterError::Busy,
            HashError::Store(s) => RegisterError::Store(s),
        }
    }
}

impl From<HashError> for LoginError {
    fn from(e: HashError) -> Self {
        match e {
            HashError::Busy => LoginError::Busy,
            HashError::Store(s) => LoginError::Store(s),
        }
    }
}

/// Why a sign-in failed. Deliberately one variant: the caller must not learn whether the
/// email exists. HTTP 401.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("invalid email or password")]
    InvalidCredentials,
    /// Too many password computations queued. HTTP 429 with `Retry-After`.
    #[error("too busy to sign in now; try again shortly")]
    Busy,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a role change did not happen.
#[derive(Debug, thiserror::Error)]
pub enum RoleError {
    #[error("no account with this email")]
    UnknownEmail,
    #[error(transparent)]
    Rejected(UserError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    pub user_id: UserId,
    pub email: Email,
    pub display_name: DisplayName,
    pub role: Role,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    pub user_id: UserId,
    pub role: Role,
}

/// The accounts application service.
#[derive(Clone)]
pub struct Accounts {
    db: Database,
    users: AggregateStore<User>,
    profiles: AggregateStore<Profile>,
    hasher: PasswordHasher,
    bootstrap_admin: Option<Email>,
    after_commit: Arc<dyn AfterCommit>,
}

impl Accounts {
    pub fn new(
        db: Database,
        hasher: PasswordHasher,
        bootstrap_admin: Option<Email>,
        after_commit: Arc<dyn AfterCommit>,
    ) -> Self {
        Accounts {
            users: db.aggregates(),
            profiles: db.aggregates(),
            db,
            hasher,
            bootstrap_admin,
            after_commit,
        }
    }

    pub fn users(&self) -> &AggregateStore<User> {
        &self.users
    }

    /// Register a new account and open its profile.
    ///
    /// One account per email is decided by the database, atomically with the append: the
    /// transaction that inserts `UserRegistered` also inserts the email's row (a trigger),
    /// and the row's primary key refuses a second one. No delay, crash or lost connection
    /// can give an email two accounts or leave an account without its email.
    ///
    /// The bootstrap admin email is made an admin only while no active admin exists.
    #[tracing::instrument(skip_all, fields(user_id = tracing::field::Empty), err(level = "debug"))]
    pub async fn register(
        &self,
        email: Email,
        password: Password,
        display_name: DisplayName,
        meta: &CommandMeta,
    ) -> Result<Registered, RegisterError> {
        // A cheap early answer for the common duplicate (it spares an Argon2 hash); the
        // append below is what decides.
        if self.db.email_owner(&email).await?.is_some() {
            return Err(RegisterError::EmailTaken);
        }
        let password_hash = self.hasher.hash(&password).await?;
        let user_id = UserId::new_v7();
        tracing::Span::current().record("user_id", tracing::field::display(user_id));

        let grant_admin = self.bootstrap_admin.as_ref() == Some(&email)
            && {
                let exists = self.db.an_active_admin_exists().await?;
                if exists {
                    warn!(%user_id, "the bootstrap admin email registered while an admin exists: not granted");
                }
                !exists
            };
        let command = UserCommand::Register {
            user_id,
            email: email.clone(),
            password_hash,
            display_name: display_name.clone(),
            grant_admin,
        };
        let meta = with_actor(meta, user_id);
        // `Some(0)`: the aggregate must be new, and a refusal by the email's row is final
        // (not a race to decide again).
        let written = match self
            .users
            .execute(&user_id.to_string(), command, &(), Some(0), &meta)
            .await
        {
            Ok(c) => c.written,
            Err(e) => {
                // Either the email's row refused the append (another account has it), or the
                // store failed, possibly after committing (a lost COMMIT acknowledgement). The
                // email's row, written in the same transaction, tells which.
                match self.db.email_owner(&email).await {
                    Ok(Some(owner)) if owner == user_id => {
                        warn!(%user_id, error = %e, "the append reported an error but committed");
                        // Where it went is unknown: the read-your-writes wait falls back
                        // to the feed's horizon.
                        Written {
                            at: None,
                            events: vec![("user".to_owned(), "UserRegistered".to_owned())],
                        }
                    }
                    Ok(Some(_)) => return Err(RegisterError::EmailTaken),
                    Ok(None) | Err(_) => {
                        return Err(match e {
                            CommandError::Store(s) => RegisterError::Store(s),
                            other => RegisterError::Store(StoreError::msg(other)),
                        });
                    }
                }
            }
        };
        if grant_admin {
            info!(%user_id, "bootstrap admin registered and granted the admin role");
        }
        // The profile provisioner projection would open the profile anyway; doing it here
        // makes it visible at once.
        let written = match self
            .open_profile(user_id, display_name.clone(), &meta)
            .await
        {
            Ok(profile) => written.and(&profile),
            Err(e) => {
                warn!(error = %e, "opening the profile failed; the provisioner will retry");
                written
            }
        };
        self.after_commit.committed(&written).await;
        Ok(Registered {
            user_id,
            email,
            display_name,
            role: if grant_admin { Role::Admin } else { Role::User },
        })
    }

    /// Open a user's profile unless it exists. Idempotent; used by registration and by the
    /// profile provisioner projection. Returns what it wrote (nothing if it existed).
    pub async fn open_profile(
        &self,
        user_id: UserId,
        display_name: DisplayName,
        meta: &CommandMeta,
    ) -> Result<Written, StoreError> {
        let command = ProfileCommand::Create {
            user_id,
            display_name,
        };
        match self
            .profiles
            .execute(&user_id.to_string(), command, &(), None, meta)
            .await
        {
            Ok(c) => Ok(c.written),
            // Someone else (the provisioner, say) opened it first: it exists, but where its
            // event is in the feed is unknown here, so a read-your-writes wait falls back to
            // the feed's horizon and a pass over every projection.
            Err(CommandError::Rejected(ProfileError::AlreadyExists))
            | Err(CommandError::Conflict) => Ok(Written {
                at: None,
                events: vec![(Profile::TYPE.to_owned(), "ProfileCreated".to_owned())],
            }),
            Err(CommandError::Store(e)) => Err(e),
            Err(other) => Err(StoreError::msg(other)),
        }
    }

    /// Check an email and password. Every failure takes about as long as a success, and
    /// all of them look alike to the caller.
    #[tracing::instrument(skip_all, err(level = "debug"))]
    pub async fn authenticate(
        &self,
        email: &str,
        password: &str,
    ) -> Result<Authenticated, LoginError> {
        let user = match Email::parse(email) {
            Ok(email) => match self.db.email_owner(&email).await? {
                Some(id) => Some(self.users.load(&id.to_string()).await?.state),
                None => None,
            },
            Err(_) => None,
        };
        let hash = user.as_ref().and_then(|u| u.password_hash.as_ref());
        let matches = self.hasher.verify(password, hash).await?;
        match user {
            Some(u) if matches && u.active => match u.id {
                Some(user_id) => Ok(Authenticated {
                    user_id,
                    role: u.role,
                }),
                None => Err(LoginError::InvalidCredentials),
            },
            _ => Err(LoginError::InvalidCredentials),
        }
    }

    /// Grant the admin role to the account with this email. Idempotent.
    pub async fn grant_admin(
        &self,
        email: &Email,
        meta: &CommandMeta,
    ) -> Result<UserId, RoleError> {
        self.change_role(email, UserCommand::GrantAdmin, meta).await
    }

    /// Revoke the admin role from the account with this email. Idempotent.
    pub async fn revoke_admin(
        &self,
        email: &Email,
        meta: &CommandMeta,
    ) -> Result<UserId, RoleError> {
        self.change_role(email, UserCommand::RevokeAdmin, meta)
            .await
    }

    /// Deactivate the account with this email: it can no longer sign in or write, even
    /// with a token issued before. Idempotent.
    pub async fn deactivate(&self, email: &Email, meta: &CommandMeta) -> Result<UserId, RoleError> {
        self.change_role(email, UserCommand::Deactivate, meta).await
    }

    async fn change_role(
        &self,
        email: &Email,
        command: UserCommand,
        meta: &CommandMeta,
    ) -> Result<UserId, RoleError> {
        let user_id = self
            .db
            .email_owner(email)
            .await?
            .ok_or(RoleError::UnknownEmail)?;
        // A conflict means someone else changed the user at the same moment: try again on
        // the new state (role changes are idempotent, so this converges).
        for _ in 0..3 {
            match self
                .users
                .execute(&user_id.to_string(), command.clone(), &(), None, meta)
                .await
            {
                Ok(c) => {
                    if c.events > 0 {
                        self.after_commit.committed(&c.written).await;
                    }
                    return Ok(user_id);
                }
                Err(CommandError::Conflict) => continue,
                Err(CommandError::Rejected(UserError::NotRegistered)) => {
                    return Err(RoleError::UnknownEmail);
                }
                Err(CommandError::Rejected(e)) => return Err(RoleError::Rejected(e)),
                Err(CommandError::Store(e)) => return Err(RoleError::Store(e)),
                Err(e @ (CommandError::StaleVersion { .. } | CommandError::Guarded(_))) => {
                    return Err(RoleError::Store(StoreError::msg(e)));
                }
            }
        }
        Err(RoleError::Store(StoreError::msg(
            "gave up after repeated write conflicts",
        )))
    }
}

fn with_actor(meta: &CommandMeta, user_id: UserId) -> CommandMeta {
    CommandMeta {
        request_id: meta.request_id.clone(),
        actor: meta
            .actor
            .clone()
            .or_else(|| Some(format!("user:{user_id}"))),
    }
}
