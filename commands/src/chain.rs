//! Tamper evidence: every stored event carries a SHA-256 hash chained to the previous
//! event of the same aggregate.
//!
//! **Why per aggregate.** Writers of one aggregate are already serialised by the event
//! store's key `(aggregate_type, aggregate_id, sequence)`: two commands that race for the
//! same sequence end in one conflict whatever we add. Chaining to the aggregate's previous
//! event therefore adds no contention, and on Postgres the append computes the hash in its
//! own `INSERT` (no extra round trip). A global chain would make every writer wait for the
//! one before it, which is the lock the design must not have. What a per-aggregate chain
//! cannot show on its own (an aggregate's newest events or a whole aggregate removed) is
//! what the heads digest of `karmic events verify` is for: keep it, and a later verify
//! against it shows anything that was cut off (see [`HeadsDigest`]).
//!
//! **The encoding** (docs/audit.md has the same, for auditors with other tools):
//!
//! ```text
//! hash(e) = lowercase hex of SHA-256( prev(e) ‖ canonical(body(e)) )   (UTF-8 bytes)
//! prev(e) = hash of the aggregate's event at sequence − 1, or 64 × "0" at sequence 1
//! body(e) = {"aggregate_id", "aggregate_type", "event_type", "event_version",
//!            "metadata", "payload", "recorded_at", "sequence"}
//! ```
//!
//! `payload` and `metadata` are the stored JSON (never the upcast form), `recorded_at` is
//! RFC 3339 in UTC with exactly six fractional digits (`2026-12-07T22:50:00.123456Z`),
//! `sequence` an integer. `canonical` is the JSON Canonicalization Scheme (RFC 8785): no
//! whitespace, object keys sorted by their UTF-16 code units, strings escaped minimally
//! (`\"`, `\\`, `\b \f \n \r \t`, other controls as `\u00xx`), non-integral numbers in the
//! shortest form ECMAScript prints; one deliberate difference: integers are written exactly
//! (JCS would round those beyond 2^53 through a double).

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// The `prev` of an aggregate's first event.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What one event's hash covers.
#[derive(Debug, Clone, Copy)]
pub struct Body<'a> {
    pub aggregate_type: &'a str,
    pub aggregate_id: &'a str,
    pub sequence: i64,
    pub event_type: &'a str,
    pub event_version: &'a str,
    pub payload: &'a Value,
    pub metadata: &'a Value,
    pub recorded_at: DateTime<Utc>,
}

impl Body<'_> {
    /// The canonical encoding of the body (what follows `prev` in the hash input).
    pub fn canonical(&self) -> String {
        let mut out = String::with_capacity(256);
        // Keys in sorted order, written by hand so no map type decides the order.
        out.push_str("{\"aggregate_id\":");
        string(self.aggregate_id, &mut out);
        out.push_str(",\"aggregate_type\":");
        string(self.aggregate_type, &mut out);
        out.push_str(",\"event_type\":");
        string(self.event_type, &mut out);
        out.push_str(",\"event_version\":");
        string(self.event_version, &mut out);
        out.push_str(",\"metadata\":");
        canonical_json(self.metadata, &mut out);
        out.push_str(",\"payload\":");
        canonical_json(self.payload, &mut out);
        out.push_str(",\"recorded_at\":");
        string(&format_time(self.recorded_at), &mut out);
        let _ = write!(out, ",\"sequence\":{}}}", self.sequence);
        out
    }

    /// This event's hash, chained to `prev`.
    pub fn hash(&self, prev: &str) -> String {
        hash_canonical(prev, &self.canonical())
    }
}

/// `hex(sha256(prev ‖ canonical))`.
pub fn hash_canonical(prev: &str, canonical: &str) -> String {
    let mut h = Sha256::new();
    h.update(prev.as_bytes());
    h.update(canonical.as_bytes());
    let digest = h.finalize();
    let mut s = String::with_capacity(64);
    for b in digest.iter() {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The one text form of a recorded time: UTC, microseconds, `Z`.
pub fn format_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

/// A time as the store keeps it: microseconds (Postgres's `timestamptz` precision), so
/// what is hashed at the append is what is read back.
pub fn store_time(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap_or(t)
}

/// RFC 8785 canonical JSON of `v`, appended to `out`.
pub fn canonical_json(v: &Value, out: &mut String) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                let _ = write!(out, "{i}");
            } else if let Some(u) = n.as_u64() {
                let _ = write!(out, "{u}");
            } else if let Some(f) = n.as_f64() {
                ecmascript_number(f, out);
            }
        }
        Value::String(s) => string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical_json(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_by(|a, b| a.encode_utf16().cmp(b.encode_utf16()));
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                string(k, out);
                out.push(':');
                if let Some(v) = map.get(k) {
                    canonical_json(v, out);
                }
            }
            out.push('}');
        }
    }
}

fn string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// ECMAScript's `Number.prototype.toString` for a finite double (RFC 8785 § 3.2.2.3).
fn ecmascript_number(f: f64, out: &mut String) {
    if f == 0.0 || !f.is_finite() {
        out.push('0');
        return;
    }
    if f < 0.0 {
        out.push('-');
    }
    // Rust's `{:e}` gives the shortest digits that read back as the same double.
    let sci = format!("{:e}", f.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let digits = digits.trim_end_matches('0');
    let digits = if digits.is_empty() { "0" } else { digits };
    let k = digits.len() as i64;
    let n = exp.parse::<i64>().unwrap_or(0) + 1;
    if k <= n && n <= 21 {
        out.push_str(digits);
        out.extend(std::iter::repeat_n('0', (n - k) as usize));
    } else if 0 < n && n <= 21 {
        let (a, b) = digits.split_at(n as usize);
        out.push_str(a);
        out.push('.');
        out.push_str(b);
    } else if -6 < n && n <= 0 {
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', (-n) as usize));
        out.push_str(digits);
    } else {
        let e = n - 1;
        let (first, rest) = digits.split_at(1);
        out.push_str(first);
        if !rest.is_empty() {
            out.push('.');
            out.push_str(rest);
        }
        let _ = write!(out, "e{}{}", if e < 0 { '-' } else { '+' }, e.abs());
    }
}

/// A digest of every aggregate's chain head (type, id, last sequence, its hash), in key
/// order: one line an auditor keeps outside the system. Any later history that still
/// holds all those events unchanged (and only adds to them) contains every one of those
/// heads; `verify --against` checks exactly that, which shows a truncated aggregate or a
/// removed one, the cases a per-aggregate chain cannot show on its own.
#[derive(Debug, Default)]
pub struct HeadsDigest {
    hasher: Sha256,
    pub aggregates: u64,
}

impl HeadsDigest {
    pub fn add(&mut self, aggregate_type: &str, aggregate_id: &str, sequence: i64, hash: &str) {
        let mut line = String::with_capacity(128);
        line.push('[');
        string(aggregate_type, &mut line);
        line.push(',');
        string(aggregate_id, &mut line);
        let _ = write!(line, ",{sequence},");
        string(hash, &mut line);
        line.push_str("]\n");
        self.hasher.update(line.as_bytes());
        self.aggregates += 1;
    }

    pub fn finish(self) -> String {
        let digest = self.hasher.finalize();
        let mut s = String::with_capacity(64);
        for b in digest.iter() {
            let _ = write!(s, "{b:02x}");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn canon(v: &Value) -> String {
        let mut s = String::new();
        canonical_json(v, &mut s);
        s
    }

    #[test]
    fn numbers_print_as_ecmascript_does() {
        // RFC 8785 appendix B and ECMAScript's own examples.
        for (f, want) in [
            (1.0, "1"),
            (0.5, "0.5"),
            (-1.5, "-1.5"),
            (1e21, "1e+21"),
            (1e20, "100000000000000000000"),
            (123456789012345680000.0, "123456789012345680000"),
            (1e-7, "1e-7"),
            (0.000001, "0.000001"),
            (1.5e-7, "1.5e-7"),
            (4.5e300, "4.5e+300"),
            (0.1, "0.1"),
            (333333333.3333333, "333333333.3333333"),
            (9007199254740994.0, "9007199254740994"),
            (5e-324, "5e-324"),
        ] {
            let mut s = String::new();
            ecmascript_number(f, &mut s);
            assert_eq!(s, want, "{f:e}");
        }
    }

    #[test]
    fn objects_sort_keys_and_strings_escape_minimally() {
        let v = json!({"b": [1, "x\n\"y\"\u{1}é€😀"], "a": {"z": null, "y": true}, "\u{e000}": 1, "😀": 2});
        assert_eq!(
            canon(&v),
            "{\"a\":{\"y\":true,\"z\":null},\"b\":[1,\"x\\n\\\"y\\\"\\u0001é€😀\"],\"😀\":2,\"\u{e000}\":1}"
        );
    }

    #[test]
    fn a_body_hashes_the_same_whatever_order_its_json_was_written_in() {
        let t = DateTime::parse_from_rfc3339("2026-12-07T22:50:00.123Z")
            .unwrap()
            .with_timezone(&Utc);
        let p1: Value = serde_json::from_str(r#"{"X":{"b":1,"a":2}}"#).unwrap();
        let p2: Value = serde_json::from_str(r#"{"X":{"a":2,"b":1}}"#).unwrap();
        let meta = json!({});
        let body = |p| Body {
            aggregate_type: "user",
            aggregate_id: "u1",
            sequence: 1,
            event_type: "X",
            event_version: "1.0",
            payload: p,
            metadata: &meta,
            recorded_at: t,
        };
        assert_eq!(body(&p1).hash(GENESIS), body(&p2).hash(GENESIS));
        assert_eq!(
            body(&p1).canonical(),
            "{\"aggregate_id\":\"u1\",\"aggregate_type\":\"user\",\"event_type\":\"X\",\"event_version\":\"1.0\",\"metadata\":{},\"payload\":{\"X\":{\"a\":2,\"b\":1}},\"recorded_at\":\"2026-12-07T22:50:00.123000Z\",\"sequence\":1}"
        );
        // The known answer, from scripts/verify-export.py's functions (Python's hashlib).
        assert_eq!(
            body(&p1).hash(GENESIS),
            "389acc46870b78e5ce280d97a964a58a6f82371b5bfea142f1e98ac9624ac75c"
        );
        assert_ne!(body(&p1).hash(GENESIS), body(&p1).hash(&"1".repeat(64)));
    }
}
