//! The object store other crates call: presigned uploads and downloads, reads, deletes.
//!
//! One code path for both modes: on AWS it talks to S3 through the default credential
//! chain; in the embedded default it talks to [`crate::embedded`]'s endpoint with static
//! keys and path-style addressing. "Not found" and "precondition failed" are read from the
//! SDK's typed service errors and the raw HTTP status, never from message text.

use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::operation::create_bucket::CreateBucketError;
use aws_sdk_s3::operation::get_object::GetObjectError;
use aws_sdk_s3::operation::head_bucket::HeadBucketError;
use aws_sdk_s3::operation::head_object::HeadObjectError;
use aws_sdk_s3::presigning::{PresignedRequest, PresigningConfig};
use aws_sdk_s3::types::{BucketLocationConstraint, CreateBucketConfiguration};
use chrono::{DateTime, Utc};
use domain::ObjectKey;
use secrecy::{ExposeSecret, SecretString};

/// Where the objects live and how long presigned URLs stay valid; built by the caller from
/// `KARMIC_S3_*` settings (or by `karmic serve` for the embedded endpoint).
#[derive(Debug, Clone)]
pub struct S3Settings {
    /// `KARMIC_S3_ENDPOINT`; `None` talks to AWS itself.
    pub endpoint: Option<String>,
    /// `KARMIC_S3_BUCKET`.
    pub bucket: String,
    /// The bucket's region (`us-east-1` by default).
    pub region: String,
    /// Path-style addressing (`http://host/bucket/key`); needed by every non-AWS endpoint.
    pub force_path_style: bool,
    /// Static keys (embedded endpoint, tests); `None` uses aws-config's default chain
    /// (environment, web identity, IMDS, ...).
    pub credentials: Option<(String, SecretString)>,
    /// How long a presigned upload URL stays valid.
    pub upload_expiry: Duration,
    /// How long a presigned download URL stays valid.
    pub download_expiry: Duration,
    /// Bound on each whole operation (retries included).
    pub timeout: Duration,
}

impl S3Settings {
    /// Settings with the defaults (region `us-east-1`, 5-minute URLs, 30 s operations);
    /// path-style is on whenever an endpoint is given.
    pub fn new(endpoint: Option<String>, bucket: impl Into<String>) -> Self {
        S3Settings {
            force_path_style: endpoint.is_some(),
            endpoint,
            bucket: bucket.into(),
            region: "us-east-1".to_owned(),
            credentials: None,
            upload_expiry: Duration::from_secs(5 * 60),
            download_expiry: Duration::from_secs(5 * 60),
            timeout: Duration::from_secs(30),
        }
    }
}

/// A handle on the bucket; cheap to clone (one shared `aws_sdk_s3::Client`).
#[derive(Clone, Debug)]
pub struct ObjectStore {
    client: Client,
    bucket: String,
    region: String,
    upload_expiry: Duration,
    download_expiry: Duration,
    timeout: Duration,
}

/// A presigned request the browser (or any HTTP client) performs itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presigned {
    /// `PUT` or `GET`.
    pub method: String,
    /// The full URL, signature included.
    pub url: String,
    /// Headers that were signed and must be sent exactly as given.
    pub headers: Vec<(String, String)>,
    /// When the signature stops being accepted.
    pub expires_at: DateTime<Utc>,
}

/// What a stored object is, as far as the callers care.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Size in bytes.
    pub size: u64,
    /// The ETag, without surrounding quotes.
    pub etag: String,
}

/// The outcome of a conditional, bounded read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    /// The whole object.
    Body(Vec<u8>),
    /// No object under that key.
    Missing,
    /// The object is no longer the version named by `If-Match` (S3 answered 412).
    Changed,
    /// The object is larger than allowed; `size` is its declared size (or, for a body
    /// without a declared length, how much arrived before the read was cut off).
    TooLarge {
        /// Bytes, as far as known.
        size: u64,
    },
}

impl ObjectStore {
    /// Build the client: checksums only when S3 requires them (a presigned PUT must not
    /// carry the CRC of an empty body, and moto/s3s do not return every checksum), the
    /// endpoint, region, addressing style and an operation timeout.
    pub async fn connect(s: &S3Settings) -> anyhow::Result<ObjectStore> {
        if s.bucket.is_empty() {
            bail!("the S3 bucket name is empty");
        }
        let region = Region::new(s.region.clone());
        let mut loader = aws_config::defaults(BehaviorVersion::latest()).region(region.clone());
        if let Some((access_key, secret_key)) = &s.credentials {
            loader = loader.credentials_provider(Credentials::new(
                access_key.clone(),
                secret_key.expose_secret().to_owned(),
                None,
                None,
                "karmic-static",
            ));
        }
        let shared = loader.load().await;
        let mut config = aws_sdk_s3::config::Builder::from(&shared)
            .region(region)
            .force_path_style(s.force_path_style)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .retry_config(RetryConfig::standard())
            .timeout_config(
                TimeoutConfig::builder()
                    .operation_timeout(s.timeout)
                    .build(),
            );
        if let Some(endpoint) = &s.endpoint {
            url::Url::parse(endpoint)
                .with_context(|| format!("KARMIC_S3_ENDPOINT is not a URL: {endpoint:?}"))?;
            config = config.endpoint_url(endpoint);
        }
        Ok(ObjectStore {
            client: Client::from_conf(config.build()),
            bucket: s.bucket.clone(),
            region: s.region.clone(),
            upload_expiry: s.upload_expiry,
            download_expiry: s.download_expiry,
            timeout: s.timeout,
        })
    }

    /// The bucket every call addresses.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Create the bucket unless it exists (and is ours); safe to call on every start.
    pub async fn ensure_bucket(&self) -> anyhow::Result<()> {
        match self.client.head_bucket().bucket(&self.bucket).send().await {
            Ok(_) => return Ok(()),
            Err(e) if is_head_bucket_missing(&e) => {}
            Err(e) => {
                return Err(anyhow::Error::new(e))
                    .with_context(|| format!("checking S3 bucket {}", self.bucket));
            }
        }
        let mut create = self.client.create_bucket().bucket(&self.bucket);
        if self.region != "us-east-1" {
            create = create.create_bucket_configuration(
                CreateBucketConfiguration::builder()
                    .location_constraint(BucketLocationConstraint::from(self.region.as_str()))
                    .build(),
            );
        }
        match create.send().await {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.as_service_error(),
                    Some(CreateBucketError::BucketAlreadyOwnedByYou(_))
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(anyhow::Error::new(e))
                .with_context(|| format!("creating S3 bucket {}", self.bucket)),
        }
    }

    /// A URL for uploading exactly `length` bytes of `content_type` to `key`; both are
    /// signed, so any other size or type is refused by S3 with 403. It writes once: it
    /// signs `If-None-Match: *` (S3's conditional write), so once an object is there a
    /// second PUT with the URL is refused with 412 and cannot replace what was confirmed
    /// and analysed.
    pub async fn presign_put(
        &self,
        key: &ObjectKey,
        content_type: &str,
        length: u64,
    ) -> anyhow::Result<Presigned> {
        let length = i64::try_from(length).context("upload length out of range")?;
        let (config, expires_at) = presigning(self.upload_expiry)?;
        let request = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key.as_str())
            .content_type(content_type)
            .content_length(length)
            .if_none_match("*")
            .presigned(config)
            .await
            .with_context(|| format!("presigning PUT {key}"))?;
        Ok(to_presigned(&request, expires_at))
    }

    /// A URL for downloading `key` that makes the browser save it as `download_name`.
    pub async fn presign_get(
        &self,
        key: &ObjectKey,
        download_name: &str,
    ) -> anyhow::Result<Presigned> {
        let (config, expires_at) = presigning(self.download_expiry)?;
        let request = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key.as_str())
            .response_content_disposition(content_disposition(download_name))
            .presigned(config)
            .await
            .with_context(|| format!("presigning GET {key}"))?;
        Ok(to_presigned(&request, expires_at))
    }

    /// Size and ETag of `key`, or `None` when there is no such object.
    pub async fn head(&self, key: &ObjectKey) -> anyhow::Result<Option<ObjectInfo>> {
        let out = match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key.as_str())
            .send()
            .await
        {
            Ok(out) => out,
            Err(e)
                if matches!(e.as_service_error(), Some(HeadObjectError::NotFound(_)))
                    || http_status(&e) == Some(404) =>
            {
                return Ok(None);
            }
            Err(e) => {
                return Err(anyhow::Error::new(e)).with_context(|| format!("HEAD {key}"));
            }
        };
        let size = out
            .content_length()
            .and_then(|n| u64::try_from(n).ok())
            .with_context(|| format!("HEAD {key}: no Content-Length"))?;
        let etag = out
            .e_tag()
            .map(unquote)
            .with_context(|| format!("HEAD {key}: no ETag"))?;
        Ok(Some(ObjectInfo { size, etag }))
    }

    /// Read `key` if it is still the version `if_match` names (ETag, quotes optional) and
    /// holds at most `max_bytes`; never buffers more than `max_bytes`.
    pub async fn get(
        &self,
        key: &ObjectKey,
        if_match: &str,
        max_bytes: u64,
    ) -> anyhow::Result<Fetched> {
        let out = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key.as_str())
            .if_match(format!("\"{}\"", unquote(if_match)))
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) => {
                let status = http_status(&e);
                if status == Some(412) {
                    return Ok(Fetched::Changed);
                }
                if matches!(e.as_service_error(), Some(GetObjectError::NoSuchKey(_))) {
                    return Ok(Fetched::Missing);
                }
                return Err(anyhow::Error::new(e)).with_context(|| format!("GET {key}"));
            }
        };
        let declared = out.content_length().and_then(|n| u64::try_from(n).ok());
        if let Some(size) = declared
            && size > max_bytes
        {
            // Dropping the body closes the connection without reading it.
            return Ok(Fetched::TooLarge { size });
        }
        // The SDK's operation timeout ends when the headers arrive; bound the body too.
        tokio::time::timeout(self.timeout, read_bounded(out.body, declared, max_bytes))
            .await
            .map_err(|_| anyhow::anyhow!("timed out after {:?}", self.timeout))
            .and_then(|read| read)
            .with_context(|| format!("reading the body of {key}"))
    }

    /// Remove `key`; removing an object that is not there is fine.
    pub async fn delete(&self, key: &ObjectKey) -> anyhow::Result<()> {
        match self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(key.as_str())
            .send()
            .await
        {
            Ok(_) => Ok(()),
            // S3 answers 204 for a missing key; some S3-compatible servers answer 404 NoSuchKey.
            Err(e) if http_status(&e) == Some(404) && e.code() == Some("NoSuchKey") => Ok(()),
            Err(e) => Err(anyhow::Error::new(e)).with_context(|| format!("DELETE {key}")),
        }
    }

    /// Have the bucket send `s3:ObjectCreated:*` notifications for `documents/` to the
    /// queue `queue_arn` (which must allow it). For local stand-ins and tests: in AWS the
    /// template configures this.
    pub async fn notify_queue_on_create(&self, queue_arn: &str) -> anyhow::Result<()> {
        use aws_sdk_s3::types::{
            Event, FilterRule, FilterRuleName, NotificationConfiguration,
            NotificationConfigurationFilter, QueueConfiguration, S3KeyFilter,
        };
        let filter = NotificationConfigurationFilter::builder()
            .key(
                S3KeyFilter::builder()
                    .filter_rules(
                        FilterRule::builder()
                            .name(FilterRuleName::Prefix)
                            .value("documents/")
                            .build(),
                    )
                    .build(),
            )
            .build();
        let queue = QueueConfiguration::builder()
            .id("karmic-documents")
            .queue_arn(queue_arn)
            .events(Event::from("s3:ObjectCreated:*"))
            .filter(filter)
            .build()
            .context("building the queue notification")?;
        self.client
            .put_bucket_notification_configuration()
            .bucket(&self.bucket)
            .notification_configuration(
                NotificationConfiguration::builder()
                    .queue_configurations(queue)
                    .build(),
            )
            .send()
            .await
            .with_context(|| format!("configuring notifications of {}", self.bucket))?;
        Ok(())
    }
}

/// Read at most `max_bytes` of `body`: a body without a declared length that runs past
/// the limit is `TooLarge` (its size so far); one longer or shorter than declared is an error.
async fn read_bounded(
    mut body: aws_sdk_s3::primitives::ByteStream,
    declared: Option<u64>,
    max_bytes: u64,
) -> anyhow::Result<Fetched> {
    let capacity = usize::try_from(declared.unwrap_or(0).min(max_bytes)).unwrap_or(0);
    let mut buf = Vec::with_capacity(capacity);
    while let Some(chunk) = body.try_next().await.context("receiving the body")? {
        let total = buf.len() as u64 + chunk.len() as u64;
        if total > max_bytes {
            if let Some(size) = declared {
                bail!("the body is longer than its declared {size} bytes");
            }
            return Ok(Fetched::TooLarge { size: total });
        }
        buf.extend_from_slice(&chunk);
    }
    if let Some(size) = declared
        && size != buf.len() as u64
    {
        bail!("got {} bytes, {size} were declared", buf.len());
    }
    Ok(Fetched::Body(buf))
}

fn is_head_bucket_missing(e: &SdkError<HeadBucketError, HttpResponse>) -> bool {
    matches!(e.as_service_error(), Some(HeadBucketError::NotFound(_)))
        || http_status(e) == Some(404)
}

/// The HTTP status of a service error, when the service answered at all.
fn http_status<E>(e: &SdkError<E, HttpResponse>) -> Option<u16> {
    match e {
        SdkError::ServiceError(se) => Some(se.raw().status().as_u16()),
        _ => None,
    }
}

fn presigning(expiry: Duration) -> anyhow::Result<(PresigningConfig, DateTime<Utc>)> {
    let start = SystemTime::now();
    let config = PresigningConfig::builder()
        .start_time(start)
        .expires_in(expiry)
        .build()
        .context("presigning expiry out of range (at most 7 days)")?;
    let expires_at = DateTime::<Utc>::from(start + expiry);
    Ok((config, expires_at))
}

fn to_presigned(request: &PresignedRequest, expires_at: DateTime<Utc>) -> Presigned {
    Presigned {
        method: request.method().to_owned(),
        url: request.uri().to_owned(),
        headers: request
            .headers()
            .map(|(name, value)| (canonical_header_name(name), value.to_owned()))
            .collect(),
        expires_at,
    }
}

/// `content-type` → `Content-Type`, for clients that show or log the list.
fn canonical_header_name(name: &str) -> String {
    name.split('-')
        .map(|part| {
            let mut chars = part.chars();
            match chars.next() {
                Some(first) => first.to_ascii_uppercase().to_string() + chars.as_str(),
                None => String::new(),
            }
        })
        .collect::<Vec<_>>()
        .join("-")
}

fn unquote(etag: &str) -> String {
    let etag = etag.trim();
    let etag = etag.strip_prefix("W/").unwrap_or(etag);
    etag.trim_matches('"').to_owned()
}

/// `attachment; filename="..."` with an ASCII fallback (quotes, backslashes, slashes and
/// control characters replaced) and, for non-ASCII names, RFC 6266 / RFC 8187 `filename*`.
pub(crate) fn content_disposition(download_name: &str) -> String {
    let cleaned: String = download_name
        .chars()
        .filter(|c| !c.is_control())
        .map(|c| if matches!(c, '/' | '\\') { '_' } else { c })
        .collect();
    let cleaned = cleaned.trim();
    let cleaned = if cleaned.is_empty() {
        "download"
    } else {
        cleaned
    };
    let fallback: String = cleaned
        .chars()
        .map(|c| {
            if c.is_ascii() && c != '"' && c != '\\' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if cleaned.is_ascii() {
        return format!("attachment; filename=\"{fallback}\"");
    }
    let mut encoded = String::with_capacity(cleaned.len() * 3);
    for b in cleaned.bytes() {
        // RFC 8187 attr-char
        if b.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&b) {
            encoded.push(char::from(b));
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    format!("attachment; filename=\"{fallback}\"; filename*=UTF-8''{encoded}")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn ascii_names_are_quoted_and_cleaned() {
        assert_eq!(
            content_disposition("report.pdf"),
            "attachment; filename=\"report.pdf\""
        );
        assert_eq!(
            content_disposition("a\"b\\c/d\r\ne.pdf"),
            "attachment; filename=\"a_b_c_de.pdf\""
        );
        assert_eq!(
            content_disposition(" \u{7} "),
            "attachment; filename=\"download\""
        );
    }

    #[test]
    fn non_ascii_names_get_filename_star() {
        assert_eq!(
            content_disposition("Résumé 2.pdf"),
            "attachment; filename=\"R_sum_ 2.pdf\"; filename*=UTF-8''R%C3%A9sum%C3%A9%202.pdf"
        );
    }

    #[test]
    fn etags_lose_their_quotes() {
        assert_eq!(unquote("\"abc\""), "abc");
        assert_eq!(unquote("W/\"abc\""), "abc");
        assert_eq!(unquote("abc"), "abc");
    }

    #[test]
    fn header_names_are_canonical() {
        assert_eq!(canonical_header_name("content-length"), "Content-Length");
        assert_eq!(canonical_header_name("x-amz-acl"), "X-Amz-Acl");
    }
}
