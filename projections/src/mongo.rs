//! The profile read model on DocumentDB (MongoDB API).
//!
//! Kept to what Amazon DocumentDB supports: no retryable writes, no transactions, no
//! `$lookup`; single-document updates guarded by `version`. The live collection is named by
//! a document in `karmic_meta`, so a rebuild fills a new collection and switches readers to
//! it with one single-document write.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use domain::UserId;
use futures::TryStreamExt;
use mongodb::bson::{Bson, Document, doc};
use mongodb::error::{ErrorKind, WriteFailure};
use mongodb::options::ClientOptions;
use mongodb::{Client, Collection, Database, IndexModel};
use tokio::sync::RwLock;

use crate::read_models::{ProfileStore, ProfileView, RebuildTarget};

const META: &str = "karmic_meta";
const META_ID: &str = "profiles";
const FIRST_COLLECTION: &str = "profiles_v1";
/// How long a reader trusts its idea of the live collection. A rebuild waits longer than
/// this before dropping the old collection, so no reader ever finds it gone.
const ACTIVE_TTL: Duration = Duration::from_secs(1);

/// Connection settings for DocumentDB / MongoDB.
#[derive(Debug, Clone)]
pub struct MongoSettings {
    /// `mongodb://…`; `retryWrites=false` is forced (DocumentDB has none).
    pub url: String,
    pub database: String,
    /// CA bundle for TLS (the Amazon RDS bundle on AWS).
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// Server selection and connect timeout.
    pub timeout: Duration,
}

/// Profiles in DocumentDB.
#[derive(Clone)]
pub struct MongoProfiles {
    db: Database,
    /// `Some(name)` pins this handle to one collection (a rebuild target).
    pinned: Option<String>,
    active: Arc<RwLock<Option<(String, Instant)>>>,
}

fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    match e.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(w)) => w.code == 11000,
        ErrorKind::Command(c) => c.code == 11000,
        _ => false,
    }
}

/// Statements per `update` command: far below the server's limits (100,000 statements,
/// 16 MiB), small enough that one slow command does not hold a batch for long.
const UPDATE_CHUNK: usize = 500;

/// The indexes of the statements of an unordered `update` reply that were refused because
/// the stored document is as new or newer (duplicate `_id` on the upsert). Any other write
/// error, or a write-concern error, fails the whole call: the projector retries the batch,
/// and the statements that did succeed are no-ops the second time.
fn refused_statements(reply: &Document) -> Result<std::collections::HashSet<usize>> {
    if let Ok(wce) = reply.get_document("writeConcernError") {
        anyhow::bail!("MongoDB write concern error: {wce}");
    }
    let mut refused = std::collections::HashSet::new();
    if let Ok(errors) = reply.get_array("writeErrors") {
        for e in errors {
            let e = e.as_document().context("malformed writeErrors entry")?;
            let code = e
                .get_i32("code")
                .map(i64::from)
                .or_else(|_| e.get_i64("code"))
                .context("writeErrors entry without a code")?;
            if code != 11000 {
                anyhow::bail!(
                    "MongoDB refused a profile write: {}",
                    e.get_str("errmsg").unwrap_or("no message")
                );
            }
            let index = e
                .get_i32("index")
                .map(i64::from)
                .or_else(|_| e.get_i64("index"))
                .context("writeErrors entry without an index")?;
            refused.insert(usize::try_from(index).context("negative statement index")?);
        }
    }
    Ok(refused)
}

fn to_doc(v: &ProfileView) -> Document {
    let opt = |s: &Option<String>| s.clone().map_or(Bson::Null, Bson::String);
    doc! {
        "display_name": &v.display_name,
        "bio": opt(&v.bio),
        "avatar_url": opt(&v.avatar_url),
        "location": opt(&v.location),
        "website": opt(&v.website),
        "version": v.version,
        "updated_at": mongodb::bson::DateTime::from_millis(v.updated_at.timestamp_millis()),
    }
}

fn from_doc(d: &Document) -> Result<ProfileView> {
    let opt = |k: &str| -> Option<String> { d.get_str(k).ok().map(str::to_owned) };
    let at = d.get_datetime("updated_at").context("updated_at")?;
    Ok(ProfileView {
        user_id: UserId::parse(d.get_str("_id").context("_id")?)?,
        display_name: d
            .get_str("display_name")
            .context("display_name")?
            .to_owned(),
        bio: opt("bio"),
        avatar_url: opt("avatar_url"),
        location: opt("location"),
        website: opt("website"),
        version: d.get_i64("version").context("version")?,
        updated_at: DateTime::<Utc>::from_timestamp_millis(at.timestamp_millis())
            .context("updated_at out of range")?,
    })
}

/// Reads that must see the latest write (the live-collection pointer, cache fills) go to
/// the primary even when the URL prefers secondaries for ordinary reads.
pub fn primary() -> mongodb::options::SelectionCriteria {
    mongodb::options::SelectionCriteria::ReadPreference(mongodb::options::ReadPreference::Primary)
}

/// A client for DocumentDB as Karmic uses it (no retryable writes, TLS with the given CA
/// bundle, bounded timeouts), and its database. One per process: every DocumentDB read
/// model shares its connection pool.
pub async fn connect_database(settings: &MongoSettings) -> Result<Database> {
    let mut opts = ClientOptions::parse(&settings.url)
        .await
        .context("parsing KARMIC_MONGODB_URL")?;
    opts.retry_writes = Some(false);
    opts.app_name = Some("karmic".to_owned());
    opts.server_selection_timeout = Some(settings.timeout);
    opts.connect_timeout = Some(settings.timeout);
    if let Some(ca) = &settings.tls_ca_file {
        opts.tls = Some(mongodb::options::Tls::Enabled(
            mongodb::options::TlsOptions::builder()
                .ca_file_path(Some(ca.clone()))
                .build(),
        ));
    }
    let client = Client::with_options(opts).context("creating the MongoDB client")?;
    Ok(client.database(&settings.database))
}

impl MongoProfiles {
    /// Profiles in `db` (see [`connect_database`]).
    pub fn new(db: Database) -> MongoProfiles {
        MongoProfiles {
            db,
            pinned: None,
            active: Arc::default(),
        }
    }

    /// With a client of its own.
    pub async fn connect(settings: &MongoSettings) -> Result<MongoProfiles> {
        Ok(MongoProfiles::new(connect_database(settings).await?))
    }

    /// Create the metadata document and the indexes. Run by `karmic migrate`, never on the
    /// request path. Idempotent.
    pub async fn migrate(&self) -> Result<()> {
        let meta = self.db.collection::<Document>(META);
        match meta
            .insert_one(doc! {"_id": META_ID, "collection": FIRST_COLLECTION})
            .await
        {
            Ok(_) => {}
            Err(e) if is_duplicate_key(&e) => {}
            Err(e) => return Err(e).context("creating the read-model metadata"),
        }
        let live = self.live_collection_name().await?;
        self.create_indexes(&live).await
    }

    async fn create_indexes(&self, collection: &str) -> Result<()> {
        // Profiles are read by `_id` only; `updated_at` serves operators' "recently changed"
        // queries and the consistency checker's ordered scans.
        self.db
            .collection::<Document>(collection)
            .create_index(IndexModel::builder().keys(doc! {"updated_at": 1}).build())
            .await
            .with_context(|| format!("creating indexes on {collection}"))?;
        Ok(())
    }

    async fn live_collection_name(&self) -> Result<String> {
        let meta = self
            .db
            .collection::<Document>(META)
            .find_one(doc! {"_id": META_ID})
            // Never a lagging secondary, whatever the URL's readPreference: an old pointer
            // after a rebuild would read (and let the projector recreate) a dropped one.
            .selection_criteria(primary())
            .await
            .context("reading the read-model metadata")?;
        Ok(meta
            .and_then(|d| d.get_str("collection").ok().map(str::to_owned))
            .unwrap_or_else(|| FIRST_COLLECTION.to_owned()))
    }

    async fn collection(&self) -> Result<Collection<Document>> {
        if let Some(p) = &self.pinned {
            return Ok(self.db.collection(p));
        }
        if let Some((name, at)) = &*self.active.read().await
            && at.elapsed() < ACTIVE_TTL
        {
            return Ok(self.db.collection(name));
        }
        let name = self.live_collection_name().await?;
        *self.active.write().await = Some((name.clone(), Instant::now()));
        Ok(self.db.collection(&name))
    }

    /// Reachability check.
    pub async fn ping(&self) -> Result<()> {
        self.db
            .run_command(doc! {"ping": 1})
            .await
            .context("pinging MongoDB")?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl ProfileStore for MongoProfiles {
    async fn get(&self, id: UserId) -> Result<Option<ProfileView>> {
        let d = self
            .collection()
            .await?
            .find_one(doc! {"_id": id.to_string()})
            .await
            .context("reading a profile from MongoDB")?;
        d.as_ref().map(from_doc).transpose()
    }

    async fn get_fresh(&self, id: UserId) -> Result<Option<ProfileView>> {
        let d = self
            .collection()
            .await?
            .find_one(doc! {"_id": id.to_string()})
            .selection_criteria(primary())
            .await
            .context("reading a profile from the MongoDB primary")?;
        d.as_ref().map(from_doc).transpose()
    }

    async fn upsert(&self, v: &ProfileView) -> Result<bool> {
        // Matches only an older version (or nothing, and then inserts). A newer stored
        // version makes the insert collide on `_id`: that is the no-op case.
        let r = self
            .collection()
            .await?
            .update_one(
                doc! {"_id": v.user_id.to_string(), "version": {"$lt": v.version}},
                doc! {"$set": to_doc(v)},
            )
            .upsert(true)
            .await;
        match r {
            Ok(r) => Ok(r.modified_count > 0 || r.upserted_id.is_some()),
            Err(e) if is_duplicate_key(&e) => Ok(false),
            Err(e) => Err(e).context("writing a profile to MongoDB"),
        }
    }

    /// One `update` command per chunk of the batch (unordered: the profiles are
    /// independent documents), so a batch costs one round trip instead of one per profile.
    /// Within the batch only the newest view of each profile is written: the older ones
    /// would be overwritten by it anyway. A statement refused with a duplicate key is the
    /// "stored version is newer" case, exactly as in [`ProfileStore::upsert`].
    async fn upsert_many(&self, views: &[ProfileView]) -> Result<Vec<ProfileView>> {
        let mut newest: Vec<&ProfileView> = Vec::with_capacity(views.len());
        let mut at: HashMap<UserId, usize> = HashMap::with_capacity(views.len());
        for v in views {
            match at.get(&v.user_id) {
                Some(&i) if newest[i].version >= v.version => {}
                Some(&i) => newest[i] = v,
                None => {
                    at.insert(v.user_id, newest.len());
                    newest.push(v);
                }
            }
        }
        let collection = self.collection().await?;
        let mut stored = Vec::with_capacity(newest.len());
        for chunk in newest.chunks(UPDATE_CHUNK) {
            let updates: Vec<Document> = chunk
                .iter()
                .map(|v| {
                    doc! {
                        "q": {"_id": v.user_id.to_string(), "version": {"$lt": v.version}},
                        "u": {"$set": to_doc(v)},
                        "upsert": true,
                        "multi": false,
                    }
                })
                .collect();
            let reply = self
                .db
                .run_command(doc! {
                    "update": collection.name(),
                    "updates": updates,
                    "ordered": false,
                })
                .await
                .context("writing profiles to MongoDB")?;
            let refused = refused_statements(&reply)?;
            stored.extend(
                chunk
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !refused.contains(i))
                    .map(|(_, v)| (*v).clone()),
            );
        }
        Ok(stored)
    }

    async fn all(&self) -> Result<Vec<ProfileView>> {
        let docs: Vec<Document> = self
            .collection()
            .await?
            .find(doc! {})
            .sort(doc! {"_id": 1})
            .await?
            .try_collect()
            .await
            .context("listing profiles")?;
        docs.iter().map(from_doc).collect()
    }

    async fn begin_rebuild(&self) -> Result<RebuildTarget> {
        let live = self.live_collection_name().await?;
        // Leftovers of an interrupted rebuild: every profiles_* that is not live.
        for name in self.db.list_collection_names().await? {
            if name.starts_with("profiles_v") && name != live {
                self.db.collection::<Document>(&name).drop().await?;
            }
        }
        let next = format!("profiles_v{}", Utc::now().format("%Y%m%d%H%M%S%3f"));
        self.db.create_collection(&next).await?;
        self.create_indexes(&next).await?;
        Ok(RebuildTarget {
            name: next.clone(),
            store: Arc::new(MongoProfiles {
                db: self.db.clone(),
                pinned: Some(next),
                active: Arc::default(),
            }),
        })
    }

    async fn finish_rebuild(&self, target: RebuildTarget) -> Result<()> {
        let old = self.live_collection_name().await?;
        // One single-document write switches every reader (within ACTIVE_TTL).
        self.db
            .collection::<Document>(META)
            .update_one(
                doc! {"_id": META_ID},
                doc! {"$set": {"collection": &target.name, "switched_at": mongodb::bson::DateTime::now()}},
            )
            .upsert(true)
            .await
            .context("switching the live profiles collection")?;
        *self.active.write().await = Some((target.name.clone(), Instant::now()));
        // Let readers that cached the old name finish before it disappears.
        tokio::time::sleep(ACTIVE_TTL * 2).await;
        if old != target.name {
            self.db.collection::<Document>(&old).drop().await?;
        }
        Ok(())
    }
}
