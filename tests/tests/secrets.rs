//! Secrets from Secrets Manager (moto's, `KARMIC_TEST_MOTO_URL`, started by
//! scripts/services.sh): settings that name secrets by ARN start with the values put in
//! place, and a missing or misshapen secret stops the start-up naming the variable.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;

use handlers::Settings;
use secrecy::ExposeSecret;

fn moto() -> String {
    std::env::var("KARMIC_TEST_MOTO_URL").unwrap_or_else(|_| "http://127.0.0.1:5000".to_owned())
}

async fn client() -> aws_sdk_secretsmanager::Client {
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(moto())
        .credentials_provider(aws_sdk_secretsmanager::config::Credentials::new(
            "test", "test", None, None, "test",
        ))
        .load()
        .await;
    aws_sdk_secretsmanager::Client::new(&config)
}

/// A new secret holding `value`; its ARN.
async fn secret(value: &str) -> String {
    let name = format!("karmic-test-{}", uuid::Uuid::new_v4());
    let out = client()
        .await
        .create_secret()
        .name(&name)
        .secret_string(value)
        .send()
        .await
        .expect("moto's Secrets Manager (bash scripts/services.sh)");
    out.arn().unwrap().to_owned()
}

fn settings(vars: &[(&str, &str)]) -> anyhow::Result<Settings> {
    let mut env: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    env.insert("KARMIC_SECRETS_ENDPOINT".into(), moto());
    env.insert("KARMIC_AWS_ACCESS_KEY_ID".into(), "test".into());
    env.insert("KARMIC_AWS_SECRET_ACCESS_KEY".into(), "test".into());
    Settings::from_sources(&env)
}

#[tokio::test]
async fn secrets_named_by_arn_are_read_into_the_settings() {
    let jwt = secret("a-signing-key-of-at-least-thirty-two-bytes").await;
    let db =
        secret(r#"{"username": "karmic", "password": "s3cr/t@pw", "engine": "postgres"}"#).await;
    let mongo = secret(r#"{"username": "docs", "password": "m0ngo"}"#).await;
    let redis = secret(r#"{"password": "t0kenT0ken"}"#).await;
    let mut s = settings(&[
        ("KARMIC_JWT_SECRET_ARN", &jwt),
        (
            "KARMIC_DATABASE_URL",
            "postgres://db.internal:5432/karmic?sslmode=require",
        ),
        ("KARMIC_DATABASE_SECRET_ARN", &db),
        (
            "KARMIC_MONGODB_URL",
            "mongodb://docdb.internal:27017/?tls=true&retryWrites=false",
        ),
        ("KARMIC_MONGODB_SECRET_ARN", &mongo),
        ("KARMIC_REDIS_URL", "rediss://cache.internal:6379"),
        ("KARMIC_REDIS_SECRET_ARN", &redis),
    ])
    .unwrap();
    assert!(
        s.jwt_secret.is_none(),
        "nothing is read before resolve_secrets"
    );
    s.resolve_secrets().await.unwrap();
    assert_eq!(
        s.jwt_secret.as_ref().unwrap().expose_secret(),
        "a-signing-key-of-at-least-thirty-two-bytes"
    );
    assert_eq!(
        s.database_url.as_ref().unwrap().expose_secret(),
        "postgres://karmic:s3cr%2Ft%40pw@db.internal:5432/karmic?sslmode=require"
    );
    assert_eq!(
        s.mongodb_url.as_ref().unwrap().expose_secret(),
        "mongodb://docs:m0ngo@docdb.internal:27017/?tls=true&retryWrites=false"
    );
    assert_eq!(
        s.redis_url.as_ref().unwrap().expose_secret(),
        "rediss://:t0kenT0ken@cache.internal:6379"
    );
    // Resolved once: a second call reads nothing more.
    s.resolve_secrets().await.unwrap();
    assert!(!s.is_embedded());
}

#[tokio::test]
async fn a_missing_short_or_misshapen_secret_stops_the_start_up() {
    // No such secret.
    let mut s = settings(&[(
        "KARMIC_JWT_SECRET_ARN",
        "arn:aws:secretsmanager:us-east-1:123456789012:secret:nope-AbCdEf",
    )])
    .unwrap();
    let e = format!("{:#}", s.resolve_secrets().await.unwrap_err());
    assert!(e.contains("KARMIC_JWT_SECRET_ARN"), "{e}");
    // A signing key too short for HS256: the same rule as KARMIC_JWT_SECRET.
    let short = secret("short").await;
    let mut s = settings(&[("KARMIC_JWT_SECRET_ARN", &short)]).unwrap();
    let e = format!("{:#}", s.resolve_secrets().await.unwrap_err());
    assert!(e.contains("at least 32 bytes"), "{e}");
    // A database secret that is not credentials JSON; its value is never shown.
    let plain = secret("hunter2hunter2").await;
    let mut s = settings(&[
        ("KARMIC_DATABASE_URL", "postgres://db.internal/karmic"),
        ("KARMIC_DATABASE_SECRET_ARN", &plain),
    ])
    .unwrap();
    let e = format!("{:#}", s.resolve_secrets().await.unwrap_err());
    assert!(
        e.contains("KARMIC_DATABASE_SECRET_ARN") && !e.contains("hunter2"),
        "{e}"
    );
    // A secret for a URL that is not given, or two sources for one value: refused as
    // the settings are read.
    assert!(settings(&[("KARMIC_DATABASE_SECRET_ARN", &plain)]).is_err());
    assert!(
        settings(&[
            (
                "KARMIC_JWT_SECRET",
                "a-signing-key-of-at-least-thirty-two-bytes"
            ),
            ("KARMIC_JWT_SECRET_ARN", &short),
        ])
        .is_err()
    );
}
