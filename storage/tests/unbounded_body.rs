//! `get` stops reading a body without a declared length once it passes `max_bytes`
//! (a raw HTTP server that streams chunks with no Content-Length).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use domain::{DocumentId, ObjectKey, UserId};
use secrecy::SecretString;
use storage::{Fetched, ObjectStore, S3Settings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const CHUNK: usize = 1024;
const CHUNKS: usize = 1024; // 1 MiB offered in total

#[tokio::test]
async fn a_body_without_a_declared_length_is_cut_off_at_the_limit() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = socket.read(&mut buf).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    request.extend_from_slice(&buf[..n]);
                }
                let head = "HTTP/1.1 200 OK\r\nETag: \"abc\"\r\nContent-Type: application/pdf\r\nTransfer-Encoding: chunked\r\n\r\n";
                if socket.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = format!("{CHUNK:x}\r\n{}\r\n", "x".repeat(CHUNK));
                for _ in 0..CHUNKS {
                    if socket.write_all(chunk.as_bytes()).await.is_err() {
                        return; // the client stopped reading: good
                    }
                }
                let _ = socket.write_all(b"0\r\n\r\n").await;
            });
        }
    });

    let mut settings = S3Settings::new(Some(format!("http://{addr}")), "karmic-test");
    settings.credentials = Some(("key".to_owned(), SecretString::from("secret")));
    let store = ObjectStore::connect(&settings).await.unwrap();
    let key = ObjectKey::for_document(UserId::new_v7(), DocumentId::new_v7());
    let max = 4 * CHUNK as u64 + 10;
    match store.get(&key, "abc", max).await.unwrap() {
        Fetched::TooLarge { size } => assert!(size > max && size < 64 * CHUNK as u64, "{size}"),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    match store
        .get(&key, "abc", (CHUNK * CHUNKS) as u64)
        .await
        .unwrap()
    {
        Fetched::Body(body) => assert_eq!(body.len(), CHUNK * CHUNKS),
        other => panic!("expected the whole body, got {other:?}"),
    }
}
