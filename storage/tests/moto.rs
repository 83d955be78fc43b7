//! The object store against moto (`KARMIC_TEST_MOTO_URL`, default `http://127.0.0.1:5000`),
//! a stand-in for AWS S3's protocol. moto checks no signatures, so refusals are tested
//! against the embedded endpoint only.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use domain::{DocumentId, ObjectKey, UserId};
use secrecy::SecretString;
use storage::{Fetched, ObjectStore, Presigned, S3Settings};

fn moto_url() -> String {
    std::env::var("KARMIC_TEST_MOTO_URL").unwrap_or_else(|_| "http://127.0.0.1:5000".to_owned())
}

/// A store on a fresh bucket of its own.
async fn store() -> ObjectStore {
    let bucket = format!("karmic-test-{}", uuid::Uuid::new_v4().simple());
    let mut settings = S3Settings::new(Some(moto_url()), bucket);
    settings.credentials = Some(("testing".to_owned(), SecretString::from("testing")));
    let store = ObjectStore::connect(&settings).await.unwrap();
    store
        .ensure_bucket()
        .await
        .expect("moto running at KARMIC_TEST_MOTO_URL (moto_server -H 127.0.0.1 -p 5000)");
    store
}

async fn send(p: &Presigned, body: Vec<u8>) -> reqwest::Response {
    let http = reqwest::Client::new();
    let mut req = http.request(p.method.parse().unwrap(), &p.url);
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

fn new_key() -> ObjectKey {
    ObjectKey::for_document(UserId::new_v7(), DocumentId::new_v7())
}

const BODY: &[u8] = b"%PDF-1.7 hello, moto";

#[tokio::test]
async fn ensure_bucket_twice_is_fine() {
    let store = store().await;
    store.ensure_bucket().await.unwrap();
    store.ensure_bucket().await.unwrap();
}

#[tokio::test]
async fn a_presigned_put_is_read_back_conditionally_and_deleted() {
    let store = store().await;
    let key = new_key();
    assert_eq!(store.head(&key).await.unwrap(), None);
    assert_eq!(
        store.get(&key, "abc", 1024).await.unwrap(),
        Fetched::Missing
    );

    let put = store
        .presign_put(&key, "application/pdf", BODY.len() as u64)
        .await
        .unwrap();
    let resp = send(&put, BODY.to_vec()).await;
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    // The URL writes once (If-None-Match: *): other bytes cannot replace the object.
    let resp = send(&put, b"%PDF-1.7 HELLO, MOTO".to_vec()).await;
    assert_eq!(resp.status(), 412, "{}", resp.text().await.unwrap());

    let info = store.head(&key).await.unwrap().unwrap();
    assert_eq!(info.size, BODY.len() as u64);
    assert!(!info.etag.is_empty() && !info.etag.contains('"'));
    assert_eq!(
        store.get(&key, &info.etag, 1024).await.unwrap(),
        Fetched::Body(BODY.to_vec())
    );
    assert_eq!(
        store
            .get(&key, "0123456789abcdef0123456789abcdef", 1024)
            .await
            .unwrap(),
        Fetched::Changed
    );
    assert_eq!(
        store.get(&key, &info.etag, 5).await.unwrap(),
        Fetched::TooLarge {
            size: BODY.len() as u64
        }
    );

    store.delete(&key).await.unwrap();
    assert_eq!(store.head(&key).await.unwrap(), None);
    store.delete(&key).await.unwrap();
}

#[tokio::test]
async fn a_presigned_get_downloads_the_bytes() {
    let store = store().await;
    let key = new_key();
    let put = store
        .presign_put(&key, "application/pdf", BODY.len() as u64)
        .await
        .unwrap();
    assert_eq!(send(&put, BODY.to_vec()).await.status(), 200);

    let get = store.presign_get(&key, "report.pdf").await.unwrap();
    assert_eq!(get.method, "GET");
    // moto 5.2.1 ignores `response-content-disposition` (real S3 and the embedded
    // endpoint honour it); check that the URL asks for it.
    assert!(
        get.url
            .contains("response-content-disposition=attachment%3B%20filename%3D%22report.pdf%22"),
        "{}",
        get.url
    );
    let resp = send(&get, Vec::new()).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap().as_ref(), BODY);
}
