//! Upcasters: how old stored event versions are read as the current ones.
//!
//! Every event is stored with its name and version. When a payload's shape changes, the
//! new code writes a new version and registers an upcaster here that rewrites the old
//! version on load, both for aggregates and for the projection feed. Stored rows are never
//! rewritten.

use std::sync::LazyLock;

use cqrs_es::persist::{EventUpcaster, SemanticVersionEventUpcaster, SerializedEvent};
use serde_json::Value;

static UPCASTERS: LazyLock<Vec<Box<dyn EventUpcaster>>> = LazyLock::new(upcasters);

/// Bring one stored event up to the current version of its type.
pub fn upcast(mut event: SerializedEvent) -> SerializedEvent {
    for up in UPCASTERS.iter() {
        if up.can_upcast(&event.event_type, &event.event_version) {
            event = up.upcast(event);
        }
    }
    event
}

/// The upcasters in force, in order. cqrs-es applies them to full aggregate loads; [`upcast`]
/// applies the same list to the feed and to incremental loads.
pub fn upcasters() -> Vec<Box<dyn EventUpcaster>> {
    vec![
        // Version 0.9 of `UserRegistered` (pre-release builds) had no `display_name`; read it
        // as an empty one. Kept as the worked example of the mechanism.
        Box::new(SemanticVersionEventUpcaster::new(
            "UserRegistered",
            "1.0",
            Box::new(|mut payload: Value| {
                if let Some(body) = payload
                    .get_mut("UserRegistered")
                    .and_then(Value::as_object_mut)
                {
                    body.entry("display_name")
                        .or_insert_with(|| Value::String(String::new()));
                }
                payload
            }),
        )),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pre_release_registration_is_read_with_an_empty_display_name() {
        let old = SerializedEvent::new(
            "u1".into(),
            1,
            "user".into(),
            "UserRegistered".into(),
            "0.9".into(),
            serde_json::json!({"UserRegistered": {"user_id": "0190f0c4-1b2c-7d3e-8f40-000000000001", "email": "a@example.com", "password_hash": "x"}}),
            serde_json::json!({}),
        );
        let new = upcast(old);
        assert_eq!(new.event_version, "1.0.0");
        assert_eq!(new.payload["UserRegistered"]["display_name"], "");
        let current = upcast(SerializedEvent {
            event_version: "1.0".into(),
            ..new.clone()
        });
        assert_eq!(
            current.event_version, "1.0",
            "a current event must pass untouched"
        );
    }
}
