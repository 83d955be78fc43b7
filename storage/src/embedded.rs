//! The embedded default's own S3 endpoint, so `karmic serve` uses the same aws-sdk-s3
//! code path (presigned URLs included) as the AWS deployment.
//!
//! `s3s` speaks the S3 protocol and verifies SigV4 (headers and presigned query strings)
//! against one access key; `s3s-fs` stores the objects under a directory. A thin wrapper
//! adds what `s3s-fs` lacks: `If-Match` on GET, one conditional PUT per key at a time
//! (S3's 409 ConditionalRequestConflict; `s3s-fs` checks `If-None-Match: *` but two PUTs
//! can both pass its check), `response-content-disposition`, CORS, and an S3 event
//! notification (as real S3 would send to SQS) after every successful PUT.

use std::collections::HashSet;
use std::future::Future;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{Context, bail};
use chrono::{SecondsFormat, Utc};
use futures::Stream;
use hyper::Method;
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use s3s::auth::SimpleAuth;
use s3s::dto::{
    CreateBucketInput, CreateBucketOutput, DeleteObjectInput, DeleteObjectOutput, ETagCondition,
    GetObjectInput, GetObjectOutput, HeadBucketInput, HeadBucketOutput, HeadObjectInput,
    HeadObjectOutput, ListObjectsV2Input, ListObjectsV2Output, PutObjectInput, PutObjectOutput,
    StreamingBlob,
};
use s3s::service::{S3Service, S3ServiceBuilder};
use s3s::stream::{ByteStream, RemainingLength};
use s3s::{S3, S3ErrorCode, S3Request, S3Response, S3Result, StdError, s3_error};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

/// Where the embedded endpoint hands its `ObjectCreated` notifications (in `karmic serve`,
/// the local queue the worker reads), so uploads are processed as on AWS.
#[async_trait::async_trait]
pub trait ObjectCreatedSink: Send + Sync {
    /// Take one S3 event notification (the JSON S3 would send to SQS). An error makes
    /// the PUT answer 500 so the client retries.
    async fn object_created(&self, notification: String) -> anyhow::Result<()>;
}

/// A bound, not yet serving, embedded S3 endpoint.
pub struct EmbeddedS3 {
    listener: TcpListener,
    service: S3Service,
    local_addr: SocketAddr,
    cors: Arc<Vec<String>>,
}

/// How long shutdown waits for open connections (an upload in flight) to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The region the embedded endpoint claims in its notifications.
const REGION: &str = "us-east-1";

impl EmbeddedS3 {
    /// Serve files under `root` (created if missing) on `addr` (port 0 = any), verifying
    /// SigV4 with the one access key.
    pub async fn bind(
        root: &Path,
        addr: SocketAddr,
        access_key: &str,
        secret_key: &SecretString,
        sink: Arc<dyn ObjectCreatedSink>,
    ) -> anyhow::Result<EmbeddedS3> {
        tokio::fs::create_dir_all(root)
            .await
            .with_context(|| format!("creating the object directory {}", root.display()))?;
        let fs = s3s_fs::FileSystem::new(root).map_err(|e| {
            anyhow::anyhow!("opening the object directory {}: {e:?}", root.display())
        })?;
        let backend = Backend {
            fs,
            root: root.to_owned(),
            sink,
            sequencer: AtomicU64::new(0),
            writing: Mutex::default(),
        };
        let mut builder = S3ServiceBuilder::new(backend);
        // Required: without an auth provider, signed (and presigned) requests are refused.
        builder.set_auth(SimpleAuth::from_single(
            access_key,
            secret_key.expose_secret(),
        ));
        let service = builder.build();
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the embedded S3 endpoint to {addr}"))?;
        let local_addr = listener
            .local_addr()
            .context("reading the embedded S3 endpoint's address")?;
        Ok(EmbeddedS3 {
            listener,
            service,
            local_addr,
            cors: Arc::default(),
        })
    }

    /// Let browsers on these origins (`*`: any) PUT and GET with presigned URLs, as a
    /// bucket's CORS rules do on S3: a frontend uploads straight to the endpoint from its
    /// own origin. `karmic serve` passes the API's `KARMIC_CORS_ORIGINS`. None by default.
    #[must_use]
    pub fn allow_origins(mut self, origins: &[String]) -> Self {
        self.cors = Arc::new(origins.to_vec());
        self
    }

    /// The address actually bound (the port, when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serve until `shutdown` completes, then stop accepting and give open connections
    /// a few seconds to finish.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let graceful = GracefulShutdown::new();
        let builder = auto::Builder::new(TokioExecutor::new());
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = self.listener.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(accepted) => accepted,
                        Err(e) => {
                            // Per-connection failures and fd exhaustion are transient.
                            tracing::warn!(error = %e, "embedded S3: accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    let service = WithPeer {
                        inner: self.service.clone(),
                        peer,
                        cors: self.cors.clone(),
                    };
                    let conn = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .into_owned();
                    let conn = graceful.watch(conn);
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::debug!(error = %e, %peer, "embedded S3: connection error");
                        }
                    });
                }
            }
        }
        drop(self.listener);
        tokio::select! {
            () = graceful.shutdown() => {}
            () = tokio::time::sleep(SHUTDOWN_GRACE) => {
                tracing::warn!("embedded S3: connections still open after {SHUTDOWN_GRACE:?}; leaving them");
            }
        }
        Ok(())
    }
}

/// The client's address, for the notification's `sourceIPAddress`.
#[derive(Clone, Copy)]
struct Peer(SocketAddr);

/// Puts the peer address in the request's extensions, which `s3s` hands to the backend,
/// and answers CORS for the allowed origins (s3s has no bucket CORS rules): a preflight
/// is answered here, without a signature, and responses to an allowed origin carry
/// `Access-Control-Allow-Origin` and expose the `ETag`.
#[derive(Clone)]
struct WithPeer {
    inner: S3Service,
    peer: SocketAddr,
    cors: Arc<Vec<String>>,
}

impl WithPeer {
    /// The request's `Origin`, when CORS allows it.
    fn allowed_origin(&self, req: &hyper::Request<Incoming>) -> Option<HeaderValue> {
        let origin = req.headers().get(header::ORIGIN)?;
        let text = origin.to_str().ok()?;
        self.cors
            .iter()
            .any(|o| o == "*" || o.eq_ignore_ascii_case(text))
            .then(|| origin.clone())
    }
}

impl hyper::service::Service<hyper::Request<Incoming>> for WithPeer {
    type Response = <S3Service as hyper::service::Service<hyper::Request<Incoming>>>::Response;
    type Error = <S3Service as hyper::service::Service<hyper::Request<Incoming>>>::Error;
    type Future = <S3Service as hyper::service::Service<hyper::Request<Incoming>>>::Future;

    fn call(&self, mut req: hyper::Request<Incoming>) -> Self::Future {
        req.extensions_mut().insert(Peer(self.peer));
        let Some(origin) = self.allowed_origin(&req) else {
            if self.cors.is_empty() {
                return hyper::service::Service::call(&self.inner, req);
            }
            // The answer depends on the Origin: say so, or a cache could hand a response
            // without CORS headers to an allowed origin.
            let response = hyper::service::Service::call(&self.inner, req);
            return Box::pin(async move {
                let mut resp = response.await?;
                resp.headers_mut()
                    .append(header::VARY, HeaderValue::from_static("Origin"));
                Ok(resp)
            });
        };
        let preflight = req.method() == Method::OPTIONS
            && req
                .headers()
                .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
        if preflight {
            let requested = req
                .headers()
                .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
                .cloned();
            return Box::pin(async move {
                let mut resp = hyper::Response::new(s3s::Body::empty());
                let h = resp.headers_mut();
                h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
                h.insert(
                    header::ACCESS_CONTROL_ALLOW_METHODS,
                    HeaderValue::from_static("GET, HEAD, PUT"),
                );
                if let Some(requested) = requested {
                    h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, requested);
                }
                h.insert(
                    header::ACCESS_CONTROL_MAX_AGE,
                    HeaderValue::from_static("600"),
                );
                h.insert(header::VARY, HeaderValue::from_static("Origin"));
                Ok(resp)
            });
        }
        let response = hyper::service::Service::call(&self.inner, req);
        Box::pin(async move {
            let mut resp = response.await?;
            let h = resp.headers_mut();
            h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
            h.insert(
                header::ACCESS_CONTROL_EXPOSE_HEADERS,
                HeaderValue::from_static("ETag"),
            );
            h.append(header::VARY, HeaderValue::from_static("Origin"));
            Ok(resp)
        })
    }
}

/// `s3s-fs` plus what it lacks; only the operations Karmic uses are exposed.
struct Backend {
    fs: s3s_fs::FileSystem,
    /// Where `fs` keeps the objects (`ROOT/BUCKET/KEY`).
    root: PathBuf,
    sink: Arc<dyn ObjectCreatedSink>,
    sequencer: AtomicU64,
    /// (bucket, key) of conditional PUTs under way: a second one at the same time is a
    /// conflict, as on S3.
    writing: Mutex<HashSet<(String, String)>>,
}

/// A conditional PUT's hold on its key, released when dropped.
struct Claim<'a> {
    writing: &'a Mutex<HashSet<(String, String)>>,
    key: (String, String),
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.writing
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.key);
    }
}

impl Backend {
    /// Where `fs` keeps `bucket`/`key`; keys that would leave the bucket's directory are
    /// refused (s3s-fs refuses them too; this check is for the paths used here).
    fn object_path(&self, bucket: &str, key: &str) -> S3Result<PathBuf> {
        // Plain segments only: no absolute key, no empty, `.` or `..` segment, so that one
        // path has one spelling (the claim is per spelling) and stays in the bucket.
        let plain = |p: &str| !(p.is_empty() || p == "." || p == ".." || p.contains('\\'));
        if !plain(bucket) || bucket.contains('/') || !key.split('/').all(plain) {
            return Err(s3_error!(InvalidArgument, "invalid bucket or key"));
        }
        let path = self.root.join(bucket).join(key);
        if !path.starts_with(self.root.join(bucket)) {
            return Err(s3_error!(InvalidArgument, "invalid key"));
        }
        Ok(path)
    }

    fn claim(&self, bucket: &str, key: &str) -> S3Result<Claim<'_>> {
        let k = (bucket.to_owned(), key.to_owned());
        let mut writing = self.writing.lock().unwrap_or_else(PoisonError::into_inner);
        if !writing.insert(k.clone()) {
            return Err(s3_error!(
                ConditionalRequestConflict,
                "a conditional write to this key is under way"
            ));
        }
        Ok(Claim {
            writing: &self.writing,
            key: k,
        })
    }

    /// A strictly increasing hex sequencer, like S3's (ordering events for one key).
    fn next_sequencer(&self) -> String {
        let now = u64::try_from(Utc::now().timestamp_nanos_opt().unwrap_or(0)).unwrap_or(0);
        let mut prev = self.sequencer.load(Ordering::Relaxed);
        loop {
            let next = now.max(prev + 1);
            match self.sequencer.compare_exchange_weak(
                prev,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return format!("{next:016X}"),
                Err(actual) => prev = actual,
            }
        }
    }
}

#[async_trait::async_trait]
impl S3 for Backend {
    async fn create_bucket(
        &self,
        req: S3Request<CreateBucketInput>,
    ) -> S3Result<S3Response<CreateBucketOutput>> {
        // One owner here: an existing bucket is always "ours".
        self.fs.create_bucket(req).await.map_err(|e| {
            if *e.code() == S3ErrorCode::BucketAlreadyExists {
                s3_error!(BucketAlreadyOwnedByYou)
            } else {
                e
            }
        })
    }

    async fn head_bucket(
        &self,
        req: S3Request<HeadBucketInput>,
    ) -> S3Result<S3Response<HeadBucketOutput>> {
        self.fs.head_bucket(req).await
    }

    async fn list_objects_v2(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        self.fs.list_objects_v2(req).await
    }

    async fn head_object(
        &self,
        req: S3Request<HeadObjectInput>,
    ) -> S3Result<S3Response<HeadObjectOutput>> {
        self.fs.head_object(req).await
    }

    async fn get_object(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        let if_match = req.input.if_match.clone();
        let disposition = req.input.response_content_disposition.clone();
        let mut resp = self.fs.get_object(req).await?;
        // s3s-fs ignores If-Match on GET.
        if let Some(ETagCondition::ETag(expected)) = &if_match {
            let matches = resp
                .output
                .e_tag
                .as_ref()
                .is_some_and(|current| current.strong_cmp(expected));
            if !matches {
                return Err(s3_error!(PreconditionFailed));
            }
        }
        // s3s-fs ignores response-content-disposition (s3s 0.14.1 also sets the header
        // from the query; setting it here too keeps the presigned download right either way).
        if let Some(disposition) = disposition {
            resp.output.content_disposition = Some(disposition);
        }
        Ok(resp)
    }

    async fn delete_object(
        &self,
        req: S3Request<DeleteObjectInput>,
    ) -> S3Result<S3Response<DeleteObjectOutput>> {
        self.fs.delete_object(req).await
    }

    async fn put_object(
        &self,
        mut req: S3Request<PutObjectInput>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        let bucket = req.input.bucket.clone();
        let key = req.input.key.clone();
        let path = self.object_path(&bucket, &key)?;
        // `If-None-Match: *` is S3's "only if there is no such object". s3s-fs checks it,
        // but two PUTs at once can both pass that check: one at a time per key here.
        let _claim = match &req.input.if_none_match {
            None => None,
            Some(ETagCondition::Any) => {
                let claim = self.claim(&bucket, &key)?;
                if tokio::fs::try_exists(&path).await.unwrap_or(true) {
                    return Err(s3_error!(
                        PreconditionFailed,
                        "the object exists (If-None-Match: *)"
                    ));
                }
                Some(claim)
            }
            Some(ETagCondition::ETag(_)) => {
                return Err(s3_error!(
                    NotImplemented,
                    "If-None-Match on PUT takes only *"
                ));
            }
        };
        let principal = req
            .credentials
            .as_ref()
            .map(|c| format!("AWS:{}", c.access_key));
        let source_ip = req.extensions.get::<Peer>().map(|p| p.0.ip().to_string());
        let size = Arc::new(AtomicU64::new(0));
        if let Some(body) = req.input.body.take() {
            req.input.body = Some(StreamingBlob::new(Counting {
                inner: body,
                count: Arc::clone(&size),
            }));
        }
        let resp = match self.fs.put_object(req).await {
            Ok(resp) => resp,
            Err(e) => {
                // s3s-fs moves the file into place before it checks Content-MD5 and
                // checksums: a conditional PUT that fails there must not leave an object
                // that every retry would then find in its way (412) with no notification.
                // Its own precondition check fails before writing, and then the object
                // there is someone else's.
                if _claim.is_some() && *e.code() != S3ErrorCode::PreconditionFailed {
                    let _ = tokio::fs::remove_file(&path).await;
                }
                return Err(e);
            }
        };
        let Some(etag) = resp.output.e_tag.as_ref().map(|t| t.value().to_owned()) else {
            // A "directory" object (key ending in '/'): nothing was stored.
            return Ok(resp);
        };
        let notification = Notification::object_created(NotificationFields {
            bucket: &bucket,
            key: &key,
            size: size.load(Ordering::Relaxed),
            etag: &etag,
            sequencer: self.next_sequencer(),
            principal: principal.as_deref(),
            source_ip: source_ip.as_deref(),
        });
        let json = serde_json::to_string(&notification)
            .map_err(|e| s3_error!(e, InternalError, "encoding the event notification"))?;
        if let Err(e) = self.sink.object_created(json).await {
            // Without its notification the object would never be seen: take it away, so
            // that the client's retry (a conditional one too) stores it and notifies.
            tracing::error!(error = ?e, %bucket, %key, "embedded S3: the object-created sink failed");
            let _ = tokio::fs::remove_file(&path).await;
            return Err(s3_error!(
                InternalError,
                "the object was stored but its notification could not be queued; retry"
            ));
        }
        Ok(resp)
    }
}

/// Counts the bytes of a PUT body as `s3s-fs` reads them (the notification's `size`).
struct Counting {
    inner: StreamingBlob,
    count: Arc<AtomicU64>,
}

impl Stream for Counting {
    type Item = Result<Bytes, StdError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        let polled = Pin::new(&mut self.inner).poll_next(cx);
        if let Poll::Ready(Some(Ok(bytes))) = &polled {
            self.count.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.inner.size_hint()
    }
}

impl ByteStream for Counting {
    fn remaining_length(&self) -> RemainingLength {
        self.inner.remaining_length()
    }
}

struct NotificationFields<'a> {
    bucket: &'a str,
    key: &'a str,
    size: u64,
    etag: &'a str,
    sequencer: String,
    principal: Option<&'a str>,
    source_ip: Option<&'a str>,
}

/// The S3 event notification, shaped as real S3 sends it (and as `aws_lambda_events`
/// requires: `userIdentity` and `requestParameters` included).
#[derive(Serialize)]
struct Notification {
    #[serde(rename = "Records")]
    records: Vec<Record>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Record {
    event_version: &'static str,
    event_source: &'static str,
    aws_region: &'static str,
    event_time: String,
    event_name: &'static str,
    user_identity: Principal,
    request_parameters: RequestParameters,
    response_elements: ResponseElements,
    s3: Entity,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Principal {
    principal_id: String,
}

#[derive(Serialize)]
struct RequestParameters {
    #[serde(rename = "sourceIPAddress", skip_serializing_if = "Option::is_none")]
    source_ip_address: Option<String>,
}

#[derive(Serialize)]
struct ResponseElements {
    #[serde(rename = "x-amz-request-id")]
    request_id: String,
    #[serde(rename = "x-amz-id-2")]
    id_2: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Entity {
    s3_schema_version: &'static str,
    configuration_id: &'static str,
    bucket: BucketEntity,
    object: ObjectEntity,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct BucketEntity {
    name: String,
    owner_identity: Principal,
    arn: String,
}

#[derive(Serialize)]
struct ObjectEntity {
    key: String,
    size: u64,
    #[serde(rename = "eTag")]
    e_tag: String,
    sequencer: String,
}

impl Notification {
    fn object_created(f: NotificationFields<'_>) -> Notification {
        let principal = f.principal.unwrap_or("anonymous").to_owned();
        Notification {
            records: vec![Record {
                event_version: "2.1",
                event_source: "aws:s3",
                aws_region: REGION,
                event_time: Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
                event_name: "ObjectCreated:Put",
                user_identity: Principal {
                    principal_id: principal.clone(),
                },
                request_parameters: RequestParameters {
                    source_ip_address: f.source_ip.map(str::to_owned),
                },
                response_elements: ResponseElements {
                    request_id: f.sequencer.clone(),
                    id_2: format!("karmic-embedded/{}", f.sequencer),
                },
                s3: Entity {
                    s3_schema_version: "1.0",
                    configuration_id: "karmic-embedded",
                    bucket: BucketEntity {
                        name: f.bucket.to_owned(),
                        owner_identity: Principal {
                            principal_id: principal,
                        },
                        arn: format!("arn:aws:s3:::{}", f.bucket),
                    },
                    object: ObjectEntity {
                        key: encode_key(f.key),
                        size: f.size,
                        e_tag: f.etag.to_owned(),
                        sequencer: f.sequencer,
                    },
                },
            }],
        }
    }
}

/// S3's encoding of keys in notifications: form-URL-encoding (space as `+`) of each
/// path segment, with `/` left as is.
fn encode_key(key: &str) -> String {
    key.split('/')
        .map(|segment| url::form_urlencoded::byte_serialize(segment.as_bytes()).collect::<String>())
        .collect::<Vec<_>>()
        .join("/")
}

/// The file the embedded endpoint's keys are kept in, under the data directory.
const CREDENTIALS_FILE: &str = "s3-credentials";

#[derive(Serialize, Deserialize)]
struct StoredCredentials {
    access_key_id: String,
    secret_access_key: String,
}

/// The keys of an embedded endpoint that already exists (`karmic worker` beside an
/// embedded `karmic serve`): an error, not new keys, when there are none, since new keys
/// would only be refused by the running endpoint.
pub fn existing_credentials(data_dir: &Path) -> anyhow::Result<(String, SecretString)> {
    let path = data_dir.join(CREDENTIALS_FILE);
    if !path.exists() {
        bail!(
            "{} does not exist: run `karmic serve` with this KARMIC_DATA_DIR first (it creates the embedded S3 endpoint and its keys), or set KARMIC_S3_ENDPOINT",
            path.display()
        );
    }
    credentials(data_dir)
}

/// Keys for the embedded endpoint, generated on first start and kept in
/// `data_dir/s3-credentials` (mode 0600), reused after restarts.
pub fn credentials(data_dir: &Path) -> anyhow::Result<(String, SecretString)> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating the data directory {}", data_dir.display()))?;
    let path = data_dir.join(CREDENTIALS_FILE);
    if !path.exists() {
        let generated = StoredCredentials {
            access_key_id: format!("KARMIC{}", hex::encode_upper(rand::random::<[u8; 7]>())),
            secret_access_key: hex::encode(rand::random::<[u8; 32]>()),
        };
        let json = serde_json::to_vec_pretty(&generated).context("encoding S3 credentials")?;
        // Write a private temporary file, then link it into place: the file appears whole
        // or not at all, and a concurrent first start keeps whichever won.
        let tmp = data_dir.join(format!(
            ".{CREDENTIALS_FILE}.{}.tmp",
            hex::encode(rand::random::<[u8; 8]>())
        ));
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        file.write_all(&json)
            .and_then(|()| file.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
        drop(file);
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(e).with_context(|| format!("creating {}", path.display()));
            }
        }
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path)
            .with_context(|| format!("reading the permissions of {}", path.display()))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            tracing::warn!(path = %path.display(), "S3 credentials file was readable by others; making it private");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("restricting {}", path.display()))?;
        }
    }
    let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let stored: StoredCredentials = serde_json::from_slice(&text)
        .with_context(|| format!("{} is not a credentials file", path.display()))?;
    if stored.access_key_id.is_empty() || stored.secret_access_key.is_empty() {
        bail!("{} holds an empty key", path.display());
    }
    Ok((
        stored.access_key_id,
        SecretString::from(stored.secret_access_key),
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn keys_are_form_encoded_per_segment() {
        assert_eq!(
            encode_key("documents/a b/Résumé (2).pdf"),
            "documents/a+b/R%C3%A9sum%C3%A9+%282%29.pdf"
        );
        assert_eq!(encode_key("documents/x/y"), "documents/x/y");
    }
}
