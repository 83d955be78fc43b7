//! Value types. Each one is parsed once at the boundary and is valid by construction.

use std::fmt;

use serde::{Deserialize, Serialize};
use url::Url;
use uuid::Uuid;

/// Why a piece of user input was refused. The field name is part of the message so the
/// HTTP layer can say which field was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("{field} must not be empty")]
    Empty { field: &'static str },
    #[error("{field} must be at most {max} characters")]
    TooLong { field: &'static str, max: usize },
    #[error("{field} must be at least {min} characters")]
    TooShort { field: &'static str, min: usize },
    #[error("{field} contains control characters")]
    ControlCharacters { field: &'static str },
    #[error("{field} is not a valid email address")]
    InvalidEmail { field: &'static str },
    #[error("{field} must be an absolute http or https URL")]
    InvalidUrl { field: &'static str },
    #[error("{field} is not a valid id")]
    InvalidId { field: &'static str },
    #[error("{field} must not contain {what}")]
    Forbidden {
        field: &'static str,
        what: &'static str,
    },
    #[error("{field} must be one of: {allowed}")]
    NotAllowed {
        field: &'static str,
        allowed: &'static str,
    },
    #[error("{field} must be between {min} and {max}")]
    OutOfRange {
        field: &'static str,
        min: u64,
        max: u64,
    },
}

impl ValueError {
    /// The input field this error is about.
    pub fn field(&self) -> &'static str {
        match self {
            ValueError::Empty { field }
            | ValueError::TooLong { field, .. }
            | ValueError::TooShort { field, .. }
            | ValueError::ControlCharacters { field }
            | ValueError::InvalidEmail { field }
            | ValueError::InvalidUrl { field }
            | ValueError::InvalidId { field }
            | ValueError::Forbidden { field, .. }
            | ValueError::NotAllowed { field, .. }
            | ValueError::OutOfRange { field, .. } => field,
        }
    }
}

/// A user's id; also the id of that user's profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UserId(Uuid);

impl UserId {
    /// A new, time-ordered id (UUIDv7), so keyset pagination follows registration order.
    pub fn new_v7() -> Self {
        UserId(Uuid::now_v7())
    }

    pub fn parse(s: &str) -> Result<Self, ValueError> {
        Uuid::parse_str(s)
            .map(UserId)
            .map_err(|_| ValueError::InvalidId { field: "user_id" })
    }

    pub fn from_uuid(id: Uuid) -> Self {
        UserId(id)
    }

    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An email address in canonical form: trimmed and lower-cased, so that two spellings of
/// one address compare equal (`Ann@Example.com` is `ann@example.com`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Email(String);

impl Email {
    pub const MAX_LEN: usize = 254;

    pub fn parse(raw: &str) -> Result<Self, ValueError> {
        const FIELD: &str = "email";
        let s = raw.trim();
        if s.is_empty() {
            return Err(ValueError::Empty { field: FIELD });
        }
        if s.chars().count() > Self::MAX_LEN {
            return Err(ValueError::TooLong {
                field: FIELD,
                max: Self::MAX_LEN,
            });
        }
        let invalid = ValueError::InvalidEmail { field: FIELD };
        let (local, domain) = s.split_once('@').ok_or(invalid.clone())?;
        let local_ok = !local.is_empty()
            && local.len() <= 64
            && !local.starts_with('.')
            && !local.ends_with('.')
            && !local.contains("..")
            && local
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+/=?^_`{|}~.-".contains(c));
        let labels: Vec<&str> = domain.split('.').collect();
        let domain_ok = labels.len() >= 2
            && labels.iter().all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && !l.starts_with('-')
                    && !l.ends_with('-')
                    && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            });
        if !(local_ok && domain_ok) {
            return Err(invalid);
        }
        Ok(Email(s.to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A plain-text password as typed, checked for length. It never leaves the process: it is
/// hashed by the application service and only the hash reaches an event. `Debug` hides it.
#[derive(Clone)]
pub struct Password(String);

impl Password {
    pub const MIN_LEN: usize = 10;
    /// Bounded so that hashing cost cannot be driven up by the client.
    pub const MAX_LEN: usize = 1024;

    pub fn parse(raw: &str) -> Result<Self, ValueError> {
        const FIELD: &str = "password";
        let n = raw.chars().count();
        if n < Self::MIN_LEN {
            return Err(ValueError::TooShort {
                field: FIELD,
                min: Self::MIN_LEN,
            });
        }
        if raw.len() > Self::MAX_LEN {
            return Err(ValueError::TooLong {
                field: FIELD,
                max: Self::MAX_LEN,
            });
        }
        Ok(Password(raw.to_owned()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(***)")
    }
}

/// A password hash in PHC string format (`$argon2id$v=19$...`).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PasswordHash(String);

impl PasswordHash {
    pub fn from_phc(phc: String) -> Self {
        PasswordHash(phc)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PasswordHash(***)")
    }
}

fn bounded_text(
    raw: &str,
    field: &'static str,
    max: usize,
    allow_newlines: bool,
) -> Result<String, ValueError> {
    let s = raw.trim();
    if s.chars().count() > max {
        return Err(ValueError::TooLong { field, max });
    }
    if s.chars()
        .any(|c| c.is_control() && !(allow_newlines && (c == '\n' || c == '\r' || c == '\t')))
    {
        return Err(ValueError::ControlCharacters { field });
    }
    Ok(s.to_owned())
}

fn web_url(raw: &str, field: &'static str) -> Result<String, ValueError> {
    const MAX: usize = 2048;
    let s = raw.trim();
    if s.len() > MAX {
        return Err(ValueError::TooLong { field, max: MAX });
    }
    let url = Url::parse(s).map_err(|_| ValueError::InvalidUrl { field })?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
        return Err(ValueError::InvalidUrl { field });
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ValueError::InvalidUrl { field });
    }
    Ok(url.to_string())
}

macro_rules! text_value {
    ($(#[$doc:meta])* $name:ident, $field:literal, $max:expr, required: $required:literal, newlines: $nl:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub const MAX_LEN: usize = $max;

            pub fn parse(raw: &str) -> Result<Self, ValueError> {
                let s = bounded_text(raw, $field, Self::MAX_LEN, $nl)?;
                if $required && s.is_empty() {
                    return Err(ValueError::Empty { field: $field });
                }
                Ok($name(s))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_string(self) -> String {
                self.0
            }
        }
    };
}

text_value!(
    /// The name shown for a user: 1 to 100 characters, no control characters.
    DisplayName, "display_name", 100, required: true, newlines: false
);
text_value!(
    /// A free-text biography of at most 2,000 characters; line breaks allowed.
    Bio, "bio", 2000, required: false, newlines: true
);
text_value!(
    /// Where the user says they are, at most 100 characters.
    Location, "location", 100, required: false, newlines: false
);

/// An avatar image address: an absolute http(s) URL without credentials.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AvatarUrl(String);

impl AvatarUrl {
    pub fn parse(raw: &str) -> Result<Self, ValueError> {
        web_url(raw, "avatar_url").map(AvatarUrl)
    }
    pub fn into_string(self) -> String {
        self.0
    }
}

/// A personal website: an absolute http(s) URL without credentials.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Website(String);

impl Website {
    pub fn parse(raw: &str) -> Result<Self, ValueError> {
        web_url(raw, "website").map(Website)
    }
    pub fn into_string(self) -> String {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_canonicalised_to_lower_case() {
        let a = Email::parse("  Ann.Lee+x@Example.COM ").unwrap();
        assert_eq!(a.as_str(), "ann.lee+x@example.com");
        assert_eq!(a, Email::parse("ann.lee+x@example.com").unwrap());
    }

    #[test]
    fn malformed_emails_are_refused() {
        for bad in [
            "",
            "plain",
            "@example.com",
            "a@",
            "a@b",
            "a b@example.com",
            "a@@example.com",
            "a@-x.com",
            ".a@example.com",
            "a..b@example.com",
            "a@exa mple.com",
        ] {
            assert!(Email::parse(bad).is_err(), "{bad:?} was accepted");
        }
        let long = format!("{}@example.com", "a".repeat(250));
        assert!(matches!(
            Email::parse(&long),
            Err(ValueError::TooLong { .. })
        ));
    }

    #[test]
    fn passwords_need_ten_characters_and_never_print() {
        assert!(matches!(
            Password::parse("123456789"),
            Err(ValueError::TooShort { min: 10, .. })
        ));
        let p = Password::parse("correct horse").unwrap();
        assert_eq!(format!("{p:?}"), "Password(***)");
        assert!(Password::parse(&"x".repeat(1025)).is_err());
    }

    #[test]
    fn display_names_are_trimmed_bounded_and_required() {
        assert_eq!(DisplayName::parse("  Ann ").unwrap().as_str(), "Ann");
        assert_eq!(
            DisplayName::parse("   "),
            Err(ValueError::Empty {
                field: "display_name"
            })
        );
        assert!(DisplayName::parse(&"é".repeat(100)).is_ok());
        assert!(DisplayName::parse(&"é".repeat(101)).is_err());
        assert!(DisplayName::parse("a\u{0}b").is_err());
    }

    #[test]
    fn bios_may_hold_line_breaks_but_not_other_controls() {
        assert!(Bio::parse("line one\nline two").is_ok());
        assert!(Bio::parse("bell\u{7}").is_err());
        assert!(Bio::parse(&"x".repeat(2001)).is_err());
    }

    #[test]
    fn urls_must_be_http_or_https_without_credentials() {
        assert!(Website::parse("https://example.com/me").is_ok());
        assert!(AvatarUrl::parse("http://cdn.example.com/a.png").is_ok());
        for bad in [
            "javascript:alert(1)",
            "ftp://example.com",
            "data:image/png;base64,AAAA",
            "example.com",
            "https://user:pw@example.com",
            "file:///etc/passwd",
        ] {
            assert!(Website::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn user_ids_parse_only_uuids() {
        assert!(UserId::parse("not-a-uuid").is_err());
        let id = UserId::new_v7();
        assert_eq!(UserId::parse(&id.to_string()).unwrap(), id);
    }
}
