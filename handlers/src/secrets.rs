//! Secrets from AWS Secrets Manager. In AWS, a function or the worker is given the ARNs
//! of its secrets (`KARMIC_*_SECRET_ARN`), never the secrets: the environment of a Lambda
//! function or a launch template is readable by anyone who may describe it. They are read
//! once, at start-up, before any client is built.
//!
//! * `KARMIC_JWT_SECRET_ARN`: the secret's string is the signing key.
//! * `KARMIC_DATABASE_SECRET_ARN`, `KARMIC_MONGODB_SECRET_ARN`: JSON with `username` and
//!   `password` (the shape RDS and DocumentDB secrets have), put into the URL that
//!   names the host, port, database and options.
//! * `KARMIC_REDIS_SECRET_ARN`: JSON with `password` (ElastiCache's AUTH token) and
//!   optionally `username`, put into `KARMIC_REDIS_URL`.
//!
//! A secret that cannot be read or does not have that shape stops the start-up with a
//! message that names the variable, never the value.

use anyhow::{Context, Result, anyhow};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::config::Settings;

/// The credentials a database secret carries.
#[derive(Deserialize)]
struct Credentials {
    #[serde(default)]
    username: Option<String>,
    password: String,
}

/// `url` with the user and password of the JSON `secret` in it (percent-encoded as
/// URLs need).
pub fn with_credentials(url: &str, secret: &str, variable: &str) -> Result<String> {
    let creds: Credentials = serde_json::from_str(secret).map_err(|_| {
        anyhow!("the secret of {variable} is not JSON with a \"password\" (and \"username\")")
    })?;
    // One host only: `url` does not read the comma-separated hosts of a MongoDB replica
    // set URL (DocumentDB's cluster endpoint is one host).
    let mut url = url::Url::parse(url).map_err(|e| anyhow!("the URL {variable} completes: {e}"))?;
    // Every byte but letters and digits is escaped first: `url` would leave a `%` as it
    // is, and the drivers would decode it.
    let escape = |s: &str| {
        percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    if let Some(user) = &creds.username {
        url.set_username(&escape(user))
            .map_err(|()| anyhow!("the URL {variable} completes cannot take a user"))?;
    }
    url.set_password(Some(&escape(&creds.password)))
        .map_err(|()| anyhow!("the URL {variable} completes cannot take a password"))?;
    Ok(url.into())
}

impl Settings {
    /// Read the secrets named by `KARMIC_*_SECRET_ARN` and put them in place. Nothing to
    /// do (and no AWS client built) when none is named.
    pub async fn resolve_secrets(&mut self) -> Result<()> {
        if self.secret_arns.is_empty() {
            return Ok(());
        }
        let client = self.secrets_client().await;
        let arns = self.secret_arns.clone();
        let read = |arn: String, variable: &'static str| {
            let client = client.clone();
            async move {
                let out = client
                    .get_secret_value()
                    .secret_id(&arn)
                    .send()
                    .await
                    .map_err(|e| {
                        anyhow!(
                            "reading the secret {variable} names: {}",
                            aws_sdk_secretsmanager::error::DisplayErrorContext(e)
                        )
                    })?;
                out.secret_string()
                    .map(|s| SecretString::from(s.to_owned()))
                    .ok_or_else(|| anyhow!("the secret {variable} names holds no string"))
            }
        };
        if let Some(arn) = arns.jwt {
            self.jwt_secret = Some(read(arn, "KARMIC_JWT_SECRET_ARN").await?);
        }
        for (arn, slot, variable) in [
            (
                arns.database,
                &mut self.database_url,
                "KARMIC_DATABASE_SECRET_ARN",
            ),
            (
                arns.mongodb,
                &mut self.mongodb_url,
                "KARMIC_MONGODB_SECRET_ARN",
            ),
            (arns.redis, &mut self.redis_url, "KARMIC_REDIS_SECRET_ARN"),
        ] {
            let Some(arn) = arn else { continue };
            let secret = read(arn, variable).await?;
            let url = slot
                .as_ref()
                .with_context(|| format!("{variable} needs the URL it completes"))?;
            let full = with_credentials(url.expose_secret(), secret.expose_secret(), variable)?;
            *slot = Some(full.into());
        }
        self.secret_arns = Default::default();
        // The values read are held to the same rules as values set directly.
        self.validate()
            .context("a value read from Secrets Manager is not valid")
    }

    async fn secrets_client(&self) -> aws_sdk_secretsmanager::Client {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(self.aws_region.clone()))
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .operation_timeout(std::time::Duration::from_secs(10))
                    .connect_timeout(std::time::Duration::from_secs(5))
                    .build(),
            );
        if let Some(endpoint) = &self.secrets_endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        if let Some((key, secret)) = &self.aws_credentials {
            loader = loader.credentials_provider(aws_sdk_secretsmanager::config::Credentials::new(
                key.clone(),
                secret.expose_secret().to_owned(),
                None,
                None,
                "karmic-settings",
            ));
        }
        aws_sdk_secretsmanager::Client::new(&loader.load().await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_go_into_the_url_percent_encoded() {
        let url = with_credentials(
            "postgres://db.internal:5432/karmic?sslmode=require",
            r#"{"username": "karmic", "password": "p@ss:w/rd?#"}"#,
            "KARMIC_DATABASE_SECRET_ARN",
        )
        .unwrap();
        assert_eq!(
            url,
            "postgres://karmic:p%40ss%3Aw%2Frd%3F%23@db.internal:5432/karmic?sslmode=require"
        );
        let parsed = url::Url::parse(&url).unwrap();
        assert_eq!(parsed.password(), Some("p%40ss%3Aw%2Frd%3F%23"));
        // A `%` is escaped too, so that the drivers' decoding gives it back.
        let url = with_credentials("postgres://h/db", r#"{"password": "100%41"}"#, "X").unwrap();
        assert_eq!(url, "postgres://:100%2541@h/db");
        // A token alone (ElastiCache AUTH): the password only.
        assert_eq!(
            with_credentials("rediss://cache:6379", r#"{"password": "t0ken"}"#, "X").unwrap(),
            "rediss://:t0ken@cache:6379"
        );
    }

    #[test]
    fn a_secret_of_another_shape_is_refused_without_showing_it() {
        for bad in ["hunter2hunter2", r#"{"user": "a"}"#, "[]"] {
            let e = with_credentials("postgres://h/db", bad, "KARMIC_DATABASE_SECRET_ARN")
                .unwrap_err()
                .to_string();
            assert!(e.contains("KARMIC_DATABASE_SECRET_ARN"), "{e}");
            assert!(!e.contains("hunter2"), "{e}");
        }
    }
}
