//! Upcasters: how old stored event versions are read as the current ones.
//!
//! Every event is stored with its name and version. When a payload's shape changes, the
//! new code writes a new version and registers an upcaster here that rewrites the old
//! version on load, both for aggregates and for the projection feed. Stored rows are never
//! rewritten.

use cqrs_es::persist::{EventUpcaster, SemanticVersionEventUpcaster};
use serde_json::Value;

/// The upcasters in force. Applied in order to every event loaded.
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
