//! Application services and the event-store adapters.
//!
//! `store` is the event-store port: per-aggregate append/load through cqrs-es
//! (`postgres-es` or `sqlite-es` underneath) and the global, gap-safe event feed that
//! projections subscribe to. `accounts` and `profiles` are the application services the
//! HTTP handlers and the CLI call.

pub mod accounts;
pub mod audit;
pub mod chain;
pub mod documents;
pub mod error;
pub mod keyed;
pub mod password;
pub mod profiles;
pub mod store;
pub mod upcast;

pub use error::{CommandError, StoreError};
pub use store::{AggregateStore, Database, EventFeed, Position, StoredEvent, Written};

use std::collections::HashMap;

/// Who asked for a change and in which request; stored as each event's metadata so the
/// history can be audited.
#[derive(Debug, Clone, Default)]
pub struct CommandMeta {
    pub request_id: Option<String>,
    pub actor: Option<String>,
}

impl CommandMeta {
    pub fn system(reason: &str) -> Self {
        CommandMeta {
            request_id: None,
            actor: Some(format!("system:{reason}")),
        }
    }

    pub(crate) fn to_map(&self) -> HashMap<String, String> {
        let mut m = HashMap::new();
        if let Some(r) = &self.request_id {
            m.insert("request_id".to_owned(), r.clone());
        }
        if let Some(a) = &self.actor {
            m.insert("actor".to_owned(), a.clone());
        }
        m
    }
}

/// Called after a command's events are committed, so that the read models that care about
/// them catch up before the response is sent (read-your-writes in the common case).
/// Implemented by the projector. It is an optimisation only: a background loop (or the
/// projector function) catches up whatever this misses.
#[async_trait::async_trait]
pub trait AfterCommit: Send + Sync {
    async fn committed(&self, written: &Written);
}

/// An `AfterCommit` that does nothing (CLI one-shots, tests of the command side alone).
pub struct NoAfterCommit;

#[async_trait::async_trait]
impl AfterCommit for NoAfterCommit {
    async fn committed(&self, _written: &Written) {}
}
