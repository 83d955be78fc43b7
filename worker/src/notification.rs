//! Storage notifications as they arrive on the queue, read leniently.
//!
//! An SQS message from an S3 bucket notification is one of: an event with `Records`
//! (`ObjectCreated:*` among other kinds), the `s3:TestEvent` S3 sends when a
//! notification is configured, or either of those wrapped in an SNS envelope. Real S3
//! records carry every field; moto's lack `userIdentity` and `requestParameters` and,
//! in older versions, the `Z` of `eventTime`, so the strict `aws_lambda_events` records
//! refuse them. Only what the worker needs is read here, and everything but the key may
//! be missing. Keys arrive form-URL-encoded (`+` is a space).

use serde::Deserialize;

/// One object that was created, as the notification tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectCreated {
    pub bucket: Option<String>,
    /// Decoded: the key as stored.
    pub key: String,
    pub size: Option<u64>,
    /// Without surrounding quotes.
    pub etag: Option<String>,
    pub event_name: String,
}

/// What a queue message says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notification {
    /// `s3:TestEvent`: nothing to do (delete the message).
    Test,
    /// The `ObjectCreated` records (possibly none: other kinds are left out).
    Created(Vec<ObjectCreated>),
}

/// A message that is not a storage notification at all: retrying cannot help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a storage notification: {0}")]
pub struct NotANotification(pub String);

#[derive(Deserialize)]
struct Envelope {
    #[serde(rename = "Records")]
    records: Option<Vec<Record>>,
    #[serde(rename = "Event")]
    event: Option<String>,
    /// SNS: the notification, as a JSON string.
    #[serde(rename = "Message")]
    message: Option<String>,
}

#[derive(Deserialize)]
struct Record {
    #[serde(rename = "eventName", default)]
    event_name: String,
    s3: Option<S3Entity>,
}

#[derive(Deserialize)]
struct S3Entity {
    bucket: Option<Bucket>,
    object: Option<Object>,
}

#[derive(Deserialize)]
struct Bucket {
    name: Option<String>,
}

#[derive(Deserialize)]
struct Object {
    key: Option<String>,
    size: Option<u64>,
    #[serde(rename = "eTag")]
    e_tag: Option<String>,
}

/// Read one queue message body.
pub fn parse(body: &str) -> Result<Notification, NotANotification> {
    let envelope: Envelope =
        serde_json::from_str(body).map_err(|e| NotANotification(format!("invalid JSON: {e}")))?;
    if let Some(message) = envelope.message
        && envelope.records.is_none()
    {
        return parse(&message);
    }
    if envelope.event.as_deref() == Some("s3:TestEvent") {
        return Ok(Notification::Test);
    }
    let Some(records) = envelope.records else {
        return Err(NotANotification("no Records".to_owned()));
    };
    let mut created = Vec::new();
    for r in records {
        if !r.event_name.starts_with("ObjectCreated:") {
            continue;
        }
        let Some(s3) = r.s3 else {
            return Err(NotANotification(format!("{} without s3", r.event_name)));
        };
        let Some(object) = s3.object else {
            return Err(NotANotification(format!(
                "{} without an object",
                r.event_name
            )));
        };
        let Some(key) = object.key else {
            return Err(NotANotification(format!("{} without a key", r.event_name)));
        };
        created.push(ObjectCreated {
            bucket: s3.bucket.and_then(|b| b.name),
            key: decode_key(&key),
            size: object.size,
            etag: object
                .e_tag
                .map(|t| t.trim_matches('"').to_owned())
                .filter(|t| !t.is_empty()),
            event_name: r.event_name,
        });
    }
    Ok(Notification::Created(created))
}

/// Undo S3's form-URL-encoding of keys: `+` is a space, `%XX` a byte. A malformed escape
/// is kept as written.
pub fn decode_key(key: &str) -> String {
    let bytes = key.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                if let Some(b) = hex {
                    out.push(b);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record as real S3 sends it (every field).
    const REAL: &str = r#"{"Records":[{"eventVersion":"2.1","eventSource":"aws:s3",
        "awsRegion":"eu-west-1","eventTime":"2026-11-29T03:00:00.000Z",
        "eventName":"ObjectCreated:Put","userIdentity":{"principalId":"AWS:X"},
        "requestParameters":{"sourceIPAddress":"1.2.3.4"},
        "responseElements":{"x-amz-request-id":"R","x-amz-id-2":"I"},
        "s3":{"s3SchemaVersion":"1.0","configurationId":"c",
          "bucket":{"name":"karmic-docs","ownerIdentity":{"principalId":"O"},"arn":"arn:aws:s3:::karmic-docs"},
          "object":{"key":"documents/a/My+Report%C3%A9+%282%29.pdf","size":1234,
            "eTag":"\"0123abcd\"","versionId":"v1","sequencer":"0055AED6DCD90281E5"}}}]}"#;

    #[test]
    fn a_real_s3_record_is_read_and_its_key_decoded() {
        let Notification::Created(objects) = parse(REAL).unwrap() else {
            panic!("not created");
        };
        assert_eq!(
            objects,
            [ObjectCreated {
                bucket: Some("karmic-docs".into()),
                key: "documents/a/My Reporté (2).pdf".into(),
                size: Some(1234),
                etag: Some("0123abcd".into()),
                event_name: "ObjectCreated:Put".into(),
            }]
        );
    }

    #[test]
    fn moto_style_records_with_missing_fields_are_read() {
        let moto = r#"{"Records":[{"eventVersion":"2.1","eventSource":"aws:s3",
            "eventTime":"2026-11-29T03:00:00.000","eventName":"ObjectCreated:Put",
            "s3":{"bucket":{"name":"b"},"object":{"key":"documents/x/y","size":5}}}]}"#;
        let Notification::Created(objects) = parse(moto).unwrap() else {
            panic!("not created");
        };
        assert_eq!(objects[0].key, "documents/x/y");
        assert_eq!(objects[0].etag, None);
        assert_eq!(objects[0].size, Some(5));
    }

    #[test]
    fn test_events_sns_envelopes_and_other_kinds() {
        let test = r#"{"Service":"Amazon S3","Event":"s3:TestEvent","Time":"2026-11-29T03:00:00.000Z","Bucket":"b","RequestId":"r","HostId":"h"}"#;
        assert_eq!(parse(test).unwrap(), Notification::Test);
        let sns = serde_json::json!({"Type": "Notification", "Message": REAL}).to_string();
        assert!(matches!(parse(&sns).unwrap(), Notification::Created(o) if o.len() == 1));
        let removed =
            r#"{"Records":[{"eventName":"ObjectRemoved:Delete","s3":{"object":{"key":"k"}}}]}"#;
        assert_eq!(parse(removed).unwrap(), Notification::Created(vec![]));
    }

    #[test]
    fn anything_else_is_not_a_notification() {
        assert!(parse("not json").is_err());
        assert!(parse(r#"{"hello":"world"}"#).is_err());
        assert!(
            parse(r#"{"Records":[{"eventName":"ObjectCreated:Put","s3":{"object":{}}}]}"#).is_err()
        );
    }

    #[test]
    fn keys_decode_like_form_urls() {
        assert_eq!(decode_key("a+b%2Bc%20d"), "a b+c d");
        assert_eq!(decode_key("100%"), "100%");
        assert_eq!(decode_key("%zz%4"), "%zz%4");
        assert_eq!(decode_key("%E2%82%AC"), "€");
    }
}
