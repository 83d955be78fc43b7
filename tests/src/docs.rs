//! A documents client as a frontend would be one: sign up, ask to upload, PUT the bytes
//! to the presigned URL with exactly the signed headers, and poll the result. Shared by
//! the end-to-end tests, the process tests and the document benchmark.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::PASSWORD;

/// A signed-in user of the API at `base`.
pub struct DocClient {
    pub base: String,
    pub http: reqwest::Client,
    pub user_id: String,
    pub token: String,
}

impl DocClient {
    /// Register a new user and sign in.
    pub async fn signed_in(base: &str) -> DocClient {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let email = format!("u{}@example.com", uuid::Uuid::new_v4().simple());
        let r = http
            .post(format!("{base}/auth/register"))
            .json(&json!({"email": email, "password": PASSWORD, "display_name": "Doc Owner"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
        let user_id = r.json::<Value>().await.unwrap()["user_id"]
            .as_str()
            .unwrap()
            .to_owned();
        let r = http
            .post(format!("{base}/auth/login"))
            .json(&json!({"email": email, "password": PASSWORD}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let token = r.json::<Value>().await.unwrap()["access_token"]
            .as_str()
            .unwrap()
            .to_owned();
        DocClient {
            base: base.to_owned(),
            http,
            user_id,
            token,
        }
    }

    /// `POST /documents/upload`, which must answer 201; the grant.
    pub async fn request_upload(&self, name: &str, ct: &str, size: usize) -> Value {
        let r = self
            .http
            .post(format!("{}/documents/upload", self.base))
            .bearer_auth(&self.token)
            .json(&json!({"filename": name, "content_type": ct, "size": size}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
        r.json().await.unwrap()
    }

    /// Request an upload and PUT the bytes (which must answer 200); the document's id.
    pub async fn upload(&self, name: &str, ct: &str, bytes: Vec<u8>) -> String {
        let grant = self.request_upload(name, ct, bytes.len()).await;
        assert_eq!(
            put(&grant["upload"], bytes).await,
            200,
            "PUT to the presigned URL"
        );
        grant["document_id"].as_str().unwrap().to_owned()
    }

    /// `GET /documents/{id}`.
    pub async fn document(&self, id: &str) -> reqwest::Response {
        self.http
            .get(format!("{}/documents/{id}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap()
    }

    /// Poll `GET /documents/{id}` (each answer must be 200) until `done` holds, or fail
    /// after `within`.
    pub async fn wait_for(
        &self,
        id: &str,
        within: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let started = Instant::now();
        loop {
            let r = self.document(id).await;
            assert_eq!(r.status(), 200);
            let doc: Value = r.json().await.unwrap();
            if done(&doc) {
                return doc;
            }
            assert!(
                started.elapsed() < within,
                "gave up after {within:?}; the document is {doc:#}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// PUT `bytes` to a presigned upload with exactly the signed headers, as a browser would
/// (the length is the body's own); the status.
pub async fn put(upload: &Value, bytes: Vec<u8>) -> u16 {
    assert_eq!(upload["method"], "PUT");
    let mut req = reqwest::Client::new().put(upload["url"].as_str().unwrap());
    for (k, v) in upload["headers"].as_object().unwrap() {
        if !k.eq_ignore_ascii_case("content-length") {
            req = req.header(k, v.as_str().unwrap());
        }
    }
    req.body(bytes).send().await.unwrap().status().as_u16()
}

/// The job's status in a `GET /documents/{id}` answer.
pub fn job_status(doc: &Value) -> &str {
    doc["job"]["status"].as_str().unwrap_or("")
}
