//! The object store against the embedded S3 endpoint: real servers, real signatures.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_lambda_events::s3::S3Event;
use domain::{DocumentId, ObjectKey, UserId};
use storage::embedded::{EmbeddedS3, ObjectCreatedSink, credentials};
use storage::{Fetched, ObjectInfo, ObjectStore, Presigned, S3Settings};
use tokio::sync::oneshot;

#[derive(Default)]
struct RecordingSink {
    events: Mutex<Vec<String>>,
    failing: AtomicBool,
}

#[async_trait::async_trait]
impl ObjectCreatedSink for RecordingSink {
    async fn object_created(&self, notification: String) -> anyhow::Result<()> {
        if self.failing.load(Ordering::SeqCst) {
            anyhow::bail!("the queue is down");
        }
        self.events.lock().unwrap().push(notification);
        Ok(())
    }
}

struct TestS3 {
    store: ObjectStore,
    settings: S3Settings,
    sink: Arc<RecordingSink>,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
    _stop: oneshot::Sender<()>,
}

impl TestS3 {
    fn events(&self) -> Vec<S3Event> {
        self.sink
            .events
            .lock()
            .unwrap()
            .iter()
            .map(|json| serde_json::from_str(json).expect("a notification aws_lambda_events reads"))
            .collect()
    }

    async fn store_with(&self, change: impl FnOnce(&mut S3Settings)) -> ObjectStore {
        let mut settings = self.settings.clone();
        change(&mut settings);
        ObjectStore::connect(&settings).await.unwrap()
    }

    async fn send(&self, p: &Presigned, body: Vec<u8>) -> reqwest::Response {
        send(&self.http, p, body).await
    }
}

/// Perform a presigned request as a browser would: the signed headers, except
/// Content-Length, which the HTTP client derives from the body.
async fn send(http: &reqwest::Client, p: &Presigned, body: Vec<u8>) -> reqwest::Response {
    send_from(http, p, body, None).await
}

/// [`send`], from a browser page on `origin` when given.
async fn send_from(
    http: &reqwest::Client,
    p: &Presigned,
    body: Vec<u8>,
    origin: Option<&str>,
) -> reqwest::Response {
    let mut req = http.request(p.method.parse().unwrap(), &p.url);
    if let Some(origin) = origin {
        req = req.header("Origin", origin);
    }
    for (name, value) in &p.headers {
        if !name.eq_ignore_ascii_case("content-length") {
            req = req.header(name, value);
        }
    }
    if p.method == "PUT" {
        req = req.body(body);
    }
    req.send().await.unwrap()
}

async fn spawn_s3() -> TestS3 {
    spawn_s3_for(&[]).await
}

/// With CORS for these browser origins.
async fn spawn_s3_for(origins: &[&str]) -> TestS3 {
    let origins: Vec<String> = origins.iter().map(|o| (*o).to_owned()).collect();
    let dir = tempfile::tempdir().unwrap();
    let (access_key, secret_key) = credentials(dir.path()).unwrap();
    let sink = Arc::new(RecordingSink::default());
    let server = EmbeddedS3::bind(
        &dir.path().join("objects"),
        SocketAddr::from(([127, 0, 0, 1], 0)),
        &access_key,
        &secret_key,
        sink.clone(),
    )
    .await
    .unwrap()
    .allow_origins(&origins);
    let addr = server.local_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(server.run_until(async move {
        let _ = stopped.await;
    }));
    let mut settings = S3Settings::new(Some(format!("http://{addr}")), "karmic-test");
    settings.credentials = Some((access_key, secret_key));
    let store = ObjectStore::connect(&settings).await.unwrap();
    store.ensure_bucket().await.unwrap();
    TestS3 {
        store,
        settings,
        sink,
        http: reqwest::Client::new(),
        _dir: dir,
        _stop: stop,
    }
}

/// Flip the first character of the URL's signature.
fn tamper(p: &mut Presigned) {
    let at = p.url.find("X-Amz-Signature=").unwrap() + "X-Amz-Signature=".len();
    let flipped = if &p.url[at..=at] == "0" { "1" } else { "0" };
    p.url.replace_range(at..=at, flipped);
}

fn new_key() -> ObjectKey {
    ObjectKey::for_document(UserId::new_v7(), DocumentId::new_v7())
}

const BODY: &[u8] = b"%PDF-1.7 hello, world";

#[tokio::test]
async fn a_presigned_put_with_the_declared_body_is_stored_and_notified() {
    let s3 = spawn_s3().await;
    let key = new_key();
    let put = s3
        .store
        .presign_put(&key, "application/pdf", BODY.len() as u64)
        .await
        .unwrap();
    assert_eq!(put.method, "PUT");
    let mut headers = put.headers.clone();
    headers.sort();
    assert_eq!(
        headers,
        [
            ("Content-Length".to_owned(), BODY.len().to_string()),
            ("Content-Type".to_owned(), "application/pdf".to_owned()),
            ("If-None-Match".to_owned(), "*".to_owned()),
        ]
    );
    assert!(put.expires_at > chrono::Utc::now());
    assert!(
        put.url
            .contains("X-Amz-SignedHeaders=content-length%3Bcontent-type%3Bhost%3Bif-none-match"),
        "{}",
        put.url
    );

    let resp = s3.send(&put, BODY.to_vec()).await;
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());

    let events = s3.events();
    assert_eq!(events.len(), 1);
    let record = &events[0].records[0];
    assert_eq!(record.event_name.as_deref(), Some("ObjectCreated:Put"));
    assert_eq!(record.event_source.as_deref(), Some("aws:s3"));
    assert_eq!(record.s3.bucket.name.as_deref(), Some("karmic-test"));
    assert_eq!(
        record.s3.bucket.arn.as_deref(),
        Some("arn:aws:s3:::karmic-test")
    );
    assert_eq!(record.aws_region.as_deref(), Some("us-east-1"));
    assert_eq!(
        record.request_parameters.source_ip_address.as_deref(),
        Some("127.0.0.1")
    );
    let access_key = &s3.settings.credentials.as_ref().unwrap().0;
    assert_eq!(
        record.principal_id.principal_id.as_deref(),
        Some(format!("AWS:{access_key}").as_str())
    );
    assert_eq!(record.s3.object.key.as_deref(), Some(key.as_str()));
    assert!(record.s3.object.sequencer.is_some());
    assert_eq!(record.s3.object.size, Some(BODY.len() as i64));
    let info = s3.store.head(&key).await.unwrap().unwrap();
    assert_eq!(
        info,
        ObjectInfo {
            size: BODY.len() as u64,
            etag: record.s3.object.e_tag.clone().unwrap(),
        }
    );
    assert!(!info.etag.contains('"'));

    assert_eq!(
        s3.store.get(&key, &info.etag, 1024).await.unwrap(),
        Fetched::Body(BODY.to_vec())
    );
    assert_eq!(
        s3.store
            .get(&key, &format!("\"{}\"", info.etag), BODY.len() as u64)
            .await
            .unwrap(),
        Fetched::Body(BODY.to_vec()),
        "quoted ETags and an exact limit are fine"
    );
    assert_eq!(
        s3.store
            .get(&key, "0123456789abcdef0123456789abcdef", 1024)
            .await
            .unwrap(),
        Fetched::Changed
    );
    assert_eq!(
        s3.store.get(&key, &info.etag, 10).await.unwrap(),
        Fetched::TooLarge {
            size: BODY.len() as u64
        }
    );
}

#[tokio::test]
async fn an_upload_url_writes_once() {
    let s3 = spawn_s3().await;
    let key = new_key();
    let put = s3
        .store
        .presign_put(&key, "application/pdf", BODY.len() as u64)
        .await
        .unwrap();
    assert_eq!(s3.send(&put, BODY.to_vec()).await.status(), 200);
    let etag = s3.store.head(&key).await.unwrap().unwrap().etag;
    // Same URL, same size and type, other bytes: it must not replace what is there.
    let other = b"%PDF-1.7 hello, WORLD".to_vec();
    assert_eq!(other.len(), BODY.len());
    let resp = s3.send(&put, other.clone()).await;
    assert_eq!(resp.status(), 412, "{}", resp.text().await.unwrap());
    assert_eq!(s3.store.head(&key).await.unwrap().unwrap().etag, etag);
    assert_eq!(s3.events().len(), 1, "no notification for the refused PUT");
    // Dropping the If-None-Match header breaks the signature.
    let mut unconditional = put.clone();
    unconditional
        .headers
        .retain(|(name, _)| !name.eq_ignore_ascii_case("if-none-match"));
    assert_eq!(s3.send(&unconditional, other.clone()).await.status(), 403);
    // Once the object is gone (a refused upload is deleted), the URL may write again.
    s3.store.delete(&key).await.unwrap();
    assert_eq!(s3.send(&put, other).await.status(), 200);
    assert_eq!(s3.events().len(), 2);
}

#[tokio::test]
async fn concurrent_conditional_puts_store_one_object() {
    let s3 = spawn_s3().await;
    let key = new_key();
    let put = s3
        .store
        .presign_put(&key, "application/pdf", BODY.len() as u64)
        .await
        .unwrap();
    let sends = (0..8).map(|_| s3.send(&put, BODY.to_vec()));
    let statuses: Vec<u16> = futures::future::join_all(sends)
        .await
        .iter()
        .map(|r| r.status().as_u16())
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        1,
        "{statuses:?}"
    );
    assert!(
        statuses.iter().all(|s| [200, 409, 412].contains(s)),
        "{statuses:?}"
    );
    assert_eq!(s3.events().len(), 1);
}

#[tokio::test]
async fn a_missing_object_is_missing() {
    let s3 = spawn_s3().await;
    let key = new_key();
    assert_eq!(s3.store.head(&key).await.unwrap(), None);
    assert_eq!(
        s3.store.get(&key, "abc", 1024).await.unwrap(),
        Fetched::Missing
    );
}

#[tokio::test]
async fn ensure_bucket_is_idempotent() {
    let s3 = spawn_s3().await;
    s3.store.ensure_bucket().await.unwrap();
    let other = s3.store_with(|s| s.bucket = "karmic-other".into()).await;
    other.ensure_bucket().await.unwrap();
    other.ensure_bucket().await.unwrap();
}

#[tokio::test]
async fn an_expired_upload_url_is_refused() {
    let s3 = spawn_s3().await;
    let short = s3
        .store_with(|s| s.upload_expiry = Duration::from_secs(1))
        .await;
    let key = new_key();
    let put = short
        .presign_put(&key, "application/pdf", BODY.len() as u64)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(s3.send(&put, BODY.to_vec()).await.status(), 403);
    assert!(s3.events().is_empty());
    assert_eq!(s3.store.head(&key).await.unwrap(), None);
}

#[tokio::test]
async fn a_tampered_signature_is_refused() {
    let s3 = spawn_s3().await;
    let key = new_key();
    let mut put = s3
        .store
        .presign_put(&key, "application/pdf", BODY.len() as u64)
        .await
        .unwrap();
    tamper(&mut put);
    assert_eq!(s3.send(&put, BODY.to_vec()).await.status(), 403);
    assert_eq!(s3.store.head(&key).await.unwrap(), None);
}

#[tokio::test]
async fn a_body_larger_than_signed_is_refused() {
    let s3 = spawn_s3().await;
    let key = new_key();
    let put = s3
        .store
        .presign_put(&key, "application/pdf", BODY.len() as u64)
        .await
        .unwrap();
    assert_eq!(s3.send(&put, vec![b'x'; 5_000]).await.status(), 403);
    assert_eq!(s3.send(&put, BODY[..10].to_vec()).await.status(), 403);
    assert_eq!(s3.store.head(&key).await.unwrap(), None);
    assert!(s3.events().is_empty());
}

#[tokio::test]
async fn another_content_type_is_refused() {
    let s3 = spawn_s3().await;
    let key = new_key();
    let mut put = s3
        .store
        .presign_put(&key, "application/pdf", BODY.len() as u64)
        .await
        .unwrap();
    for (name, value) in &mut put.headers {
        if name == "Content-Type" {
            *value = "text/html".into();
        }
    }
    assert_eq!(s3.send(&put, BODY.to_vec()).await.status(), 403);
    assert_eq!(s3.store.head(&key).await.unwrap(), None);
}

#[tokio::test]
async fn a_presigned_get_downloads_the_bytes_as_an_attachment() {
    let s3 = spawn_s3().await;
    let key = new_key();
    let put = s3
        .store
        .presign_put(&key, "application/pdf", BODY.len() as u64)
        .await
        .unwrap();
    assert_eq!(s3.send(&put, BODY.to_vec()).await.status(), 200);

    let get = s3
        .store
        .presign_get(&key, "Résumé \"v2\".pdf")
        .await
        .unwrap();
    assert_eq!(get.method, "GET");
    let resp = s3.send(&get, Vec::new()).await;
    assert_eq!(resp.status(), 200);
    let disposition = resp.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        disposition,
        "attachment; filename=\"R_sum_ _v2_.pdf\"; filename*=UTF-8''R%C3%A9sum%C3%A9%20%22v2%22.pdf"
    );
    assert_eq!(resp.bytes().await.unwrap().as_ref(), BODY);
}

#[tokio::test]
async fn delete_is_idempotent() {
    let s3 = spawn_s3().await;
    let key = new_key();
    let put = s3
        .store
        .presign_put(&key, "application/pdf", BODY.len() as u64)
        .await
        .unwrap();
    assert_eq!(s3.send(&put, BODY.to_vec()).await.status(), 200);
    s3.store.delete(&key).await.unwrap();
    assert_eq!(s3.store.head(&key).await.unwrap(), None);
    s3.store.delete(&key).await.unwrap();
    s3.store.delete(&new_key()).await.unwrap();
}

#[tokio::test]
async fn when_the_sink_fails_the_put_fails_and_a_retry_succeeds() {
    let s3 = spawn_s3().await;
    let key = new_key();
    let put = s3
        .store
        .presign_put(&key, "application/pdf", BODY.len() as u64)
        .await
        .unwrap();
    s3.sink.failing.store(true, Ordering::SeqCst);
    let status = s3.send(&put, BODY.to_vec()).await.status();
    assert!(!status.is_success(), "{status}");
    assert_eq!(status, 500);
    assert!(s3.events().is_empty());

    s3.sink.failing.store(false, Ordering::SeqCst);
    assert_eq!(s3.send(&put, BODY.to_vec()).await.status(), 200);
    assert_eq!(s3.events().len(), 1);
}

#[tokio::test]
async fn unsigned_requests_are_refused() {
    let s3 = spawn_s3().await;
    let key = new_key();
    let url = format!(
        "{}/karmic-test/{}",
        s3.settings.endpoint.as_deref().unwrap(),
        key.as_str()
    );
    let resp = s3.http.put(&url).body(BODY.to_vec()).send().await.unwrap();
    assert_eq!(resp.status(), 403);
    assert_eq!(s3.http.get(&url).send().await.unwrap().status(), 403);
}

#[tokio::test]
async fn the_server_stops_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let (access_key, secret_key) = credentials(dir.path()).unwrap();
    let server = EmbeddedS3::bind(
        dir.path(),
        SocketAddr::from(([127, 0, 0, 1], 0)),
        &access_key,
        &secret_key,
        Arc::new(RecordingSink::default()),
    )
    .await
    .unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let running = tokio::spawn(server.run_until(async move {
        let _ = stopped.await;
    }));
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[test]
fn credentials_are_generated_once_and_kept_private() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("karmic-data");
    let (access_a, secret_a) = credentials(&data).unwrap();
    let (access_b, secret_b) = credentials(&data).unwrap();
    use secrecy::ExposeSecret;
    assert_eq!(access_a, access_b);
    assert_eq!(secret_a.expose_secret(), secret_b.expose_secret());
    assert!(secret_a.expose_secret().len() >= 40);
    assert!(!format!("{secret_a:?}").contains(secret_a.expose_secret()));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(data.join("s3-credentials"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let other = tempfile::tempdir().unwrap();
    assert_ne!(credentials(other.path()).unwrap().0, access_a);
}

#[tokio::test]
async fn a_browser_on_an_allowed_origin_can_upload_and_others_get_no_cors() {
    let s3 = spawn_s3_for(&["http://localhost:3000"]).await;
    let key = new_key();
    let put = s3
        .store
        .presign_put(&key, "application/pdf", BODY.len() as u64)
        .await
        .unwrap();
    let preflight = |origin: &'static str| {
        s3.http
            .request(reqwest::Method::OPTIONS, &put.url)
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "PUT")
            .header(
                "Access-Control-Request-Headers",
                "content-type,if-none-match",
            )
            .send()
    };
    let r = preflight("http://localhost:3000").await.unwrap();
    assert_eq!(r.status(), 200);
    let h = r.headers();
    assert_eq!(h["access-control-allow-origin"], "http://localhost:3000");
    assert!(
        h["access-control-allow-methods"]
            .to_str()
            .unwrap()
            .contains("PUT")
    );
    assert_eq!(
        h["access-control-allow-headers"],
        "content-type,if-none-match"
    );
    // Another origin: no CORS headers, so the browser refuses.
    let r = preflight("http://evil.example").await.unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());

    // The upload itself, as the browser sends it.
    let browser = Some("http://localhost:3000");
    let r = send_from(&s3.http, &put, BODY.to_vec(), browser).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "http://localhost:3000"
    );
    assert_eq!(r.headers()["access-control-expose-headers"], "ETag");
    assert_eq!(s3.events().len(), 1);
    // The signature is still checked for a CORS request.
    let mut tampered = s3
        .store
        .presign_put(&new_key(), "application/pdf", BODY.len() as u64)
        .await
        .unwrap();
    tamper(&mut tampered);
    let r = send_from(&s3.http, &tampered, BODY.to_vec(), browser).await;
    assert_eq!(r.status(), 403);
    assert_eq!(s3.events().len(), 1);
}
