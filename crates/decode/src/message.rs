//! Kafka record -> what to do with it: upsert a text, delete a point, or dead-letter the
//! record with a reason. Pure, so it can be unit-tested and fuzzed.

use serde_json::{Map, Value};
use uuid::Uuid;

use crate::ids;

/// How message values are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageFormat {
    /// JSON when the value starts with `{`, else text.
    Auto,
    Json,
    Text,
}

/// The `[message]` settings: where the text, id and metadata are.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageSettings {
    pub format: MessageFormat,
    pub text_field: String,
    /// Empty in the file means none.
    #[serde(deserialize_with = "empty_is_none")]
    pub id_field: Option<String>,
    pub metadata_fields: Vec<String>,
    pub max_message_bytes: usize,
}

impl Default for MessageSettings {
    fn default() -> Self {
        Self {
            format: MessageFormat::Auto,
            text_field: "text".into(),
            id_field: Some("id".into()),
            metadata_fields: Vec::new(),
            max_message_bytes: 1 << 20,
        }
    }
}

fn empty_is_none<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    use serde::Deserialize;
    let s = Option::<String>::deserialize(d)?;
    Ok(s.filter(|s| !s.is_empty()))
}

/// A record as read from Kafka, borrowed.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
    pub timestamp_ms: Option<i64>,
}

/// Why a record cannot be embedded. `reason` is a short stable label (metrics label and
/// dead-letter header); `detail` is for humans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: &'static str,
    pub detail: String,
}

impl Rejection {
    pub fn new(reason: &'static str, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    Upsert {
        id: Uuid,
        text: String,
        payload: Map<String, Value>,
    },
    Delete {
        id: Uuid,
    },
    Reject(Rejection),
}

fn id_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Decodes one record.
pub fn decode(rec: &Record<'_>, cfg: &MessageSettings) -> Decoded {
    let Some(bytes) = rec.payload else {
        return match rec.key {
            Some(k) if !k.is_empty() => Decoded::Delete {
                id: ids::from_entity(k),
            },
            _ => Decoded::Reject(Rejection::new(
                "tombstone_without_key",
                "null value and no key: nothing to delete",
            )),
        };
    };
    if bytes.len() > cfg.max_message_bytes {
        return Decoded::Reject(Rejection::new(
            "too_large",
            format!(
                "{} bytes is over message.max_message_bytes = {}",
                bytes.len(),
                cfg.max_message_bytes
            ),
        ));
    }
    let body = match std::str::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => return Decoded::Reject(Rejection::new("invalid_utf8", e.to_string())),
    };
    let json = match cfg.format {
        MessageFormat::Text => false,
        MessageFormat::Json => true,
        MessageFormat::Auto => body.trim_start().starts_with('{'),
    };
    let mut payload = Map::new();
    let (text, id_value) = if json {
        let obj = match serde_json::from_str::<Value>(body) {
            Ok(Value::Object(o)) => o,
            Ok(_) => return Decoded::Reject(Rejection::new("invalid_json", "not a JSON object")),
            Err(e) => return Decoded::Reject(Rejection::new("invalid_json", e.to_string())),
        };
        let text = match obj.get(&cfg.text_field) {
            Some(Value::String(s)) => s.clone(),
            Some(other) => {
                return Decoded::Reject(Rejection::new(
                    "text_not_string",
                    format!(
                        "field {:?} is {}, not a string",
                        cfg.text_field,
                        type_name(other)
                    ),
                ))
            }
            None => {
                return Decoded::Reject(Rejection::new(
                    "missing_text_field",
                    format!("no field {:?}", cfg.text_field),
                ))
            }
        };
        let id_value = match cfg
            .id_field
            .as_ref()
            .and_then(|f| obj.get(f).map(|v| (f, v)))
        {
            None | Some((_, Value::Null)) => None,
            Some((f, v)) => match id_string(v) {
                Some(id) => Some(id),
                // An empty string is taken as no id: the key (or position) names the point.
                None if v.as_str() == Some("") => None,
                None => {
                    return Decoded::Reject(Rejection::new(
                        "invalid_id",
                        format!(
                            "field {f:?} is {}; ids must be strings or numbers",
                            type_name(v)
                        ),
                    ))
                }
            },
        };
        if cfg.metadata_fields.iter().any(|f| f == "*") {
            for (k, v) in &obj {
                if k != &cfg.text_field {
                    payload.insert(k.clone(), v.clone());
                }
            }
        } else {
            for f in &cfg.metadata_fields {
                if let Some(v) = obj.get(f) {
                    payload.insert(f.clone(), v.clone());
                }
            }
        }
        if let Some(id) = &id_value {
            payload.insert("id".into(), Value::String(id.clone()));
        }
        (text, id_value)
    } else {
        (body.to_string(), None)
    };
    if text.chars().all(|c| c.is_whitespace() || c.is_control()) {
        return Decoded::Reject(Rejection::new(
            "empty_text",
            "text is empty or has only whitespace/control characters",
        ));
    }
    let id = match (&id_value, rec.key) {
        (Some(v), _) => ids::from_entity(v.as_bytes()),
        (None, Some(k)) if !k.is_empty() => ids::from_entity(k),
        _ => ids::from_position(rec.topic, rec.partition, rec.offset),
    };
    payload.insert("text".into(), Value::String(text.clone()));
    payload.insert("topic".into(), Value::String(rec.topic.to_string()));
    payload.insert("partition".into(), rec.partition.into());
    payload.insert("offset".into(), rec.offset.into());
    if let Some(ts) = rec.timestamp_ms {
        payload.insert("timestamp_ms".into(), ts.into());
    }
    if let Some(k) = rec.key {
        payload.insert(
            "key".into(),
            Value::String(String::from_utf8_lossy(k).into_owned()),
        );
    }
    Decoded::Upsert { id, text, payload }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> MessageSettings {
        MessageSettings {
            id_field: Some("id".into()),
            metadata_fields: vec!["lang".into()],
            ..MessageSettings::default()
        }
    }

    fn rec<'a>(key: Option<&'a [u8]>, payload: Option<&'a [u8]>) -> Record<'a> {
        Record {
            topic: "events",
            partition: 2,
            offset: 7,
            key,
            payload,
            timestamp_ms: Some(1_700_000_000_000),
        }
    }

    fn reason(d: Decoded) -> &'static str {
        match d {
            Decoded::Reject(r) => r.reason,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn json_with_id_and_metadata() {
        let body = r#"{"id": 42, "text": "안녕하세요 😀", "lang": "ko", "other": 1}"#;
        let Decoded::Upsert { id, text, payload } =
            decode(&rec(None, Some(body.as_bytes())), &cfg())
        else {
            panic!()
        };
        assert_eq!(id, ids::from_entity(b"42"));
        assert_eq!(text, "안녕하세요 😀");
        assert_eq!(payload["lang"], "ko");
        assert_eq!(payload["id"], "42");
        assert_eq!(payload["partition"], 2);
        assert_eq!(payload["offset"], 7);
        assert!(!payload.contains_key("other"));
    }

    #[test]
    fn plain_text_uses_key_then_position() {
        let d = decode(&rec(Some(b"k1"), Some("한국어 문장".as_bytes())), &cfg());
        assert!(matches!(d, Decoded::Upsert { id, .. } if id == ids::from_entity(b"k1")));
        let d = decode(&rec(None, Some("한국어 문장".as_bytes())), &cfg());
        assert!(
            matches!(d, Decoded::Upsert { id, .. } if id == ids::from_position("events", 2, 7))
        );
    }

    #[test]
    fn ids_of_the_wrong_type_are_rejected_null_and_empty_fall_back() {
        for bad in [r#"{"a": 1}"#, "[1]", "true"] {
            let body = format!(r#"{{"id": {bad}, "text": "문장"}}"#);
            assert_eq!(
                reason(decode(&rec(Some(b"k"), Some(body.as_bytes())), &cfg())),
                "invalid_id"
            );
        }
        for none in ["null", r#""""#] {
            let body = format!(r#"{{"id": {none}, "text": "문장"}}"#);
            let d = decode(&rec(Some(b"k"), Some(body.as_bytes())), &cfg());
            assert!(matches!(d, Decoded::Upsert { id, .. } if id == ids::from_entity(b"k")));
        }
    }

    #[test]
    fn tombstones_delete_by_key() {
        assert_eq!(
            decode(&rec(Some(b"42"), None), &cfg()),
            Decoded::Delete {
                id: ids::from_entity(b"42")
            }
        );
        assert_eq!(
            reason(decode(&rec(None, None), &cfg())),
            "tombstone_without_key"
        );
    }

    #[test]
    fn bad_input_is_rejected_with_a_reason() {
        let c = cfg();
        assert_eq!(
            reason(decode(&rec(None, Some(b"\xff\xfe")), &c)),
            "invalid_utf8"
        );
        assert_eq!(
            reason(decode(&rec(None, Some(b"{not json")), &c)),
            "invalid_json"
        );
        assert_eq!(
            reason(decode(&rec(None, Some(br#"{"t": 1}"#)), &c)),
            "missing_text_field"
        );
        assert_eq!(
            reason(decode(&rec(None, Some(br#"{"text": 1}"#)), &c)),
            "text_not_string"
        );
        let deep = "[".repeat(10_000);
        let body = format!(r#"{{"text": {deep}"#);
        assert_eq!(
            reason(decode(&rec(None, Some(body.as_bytes())), &c)),
            "invalid_json"
        );
        let big = vec![b'a'; c.max_message_bytes + 1];
        assert_eq!(reason(decode(&rec(None, Some(&big)), &c)), "too_large");
    }

    /// Bounded random inputs (seeded): decoding never panics, every rejection has a
    /// reason, and ids are stable. A stable-toolchain stand-in for a cargo-fuzz run.
    #[test]
    fn random_and_mutated_records_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let seeds: [&[u8]; 6] = [
            r#"{"id": 1, "text": "안녕하세요"}"#.as_bytes(),
            br#"{"text": "\ud800 lone surrogate"}"#,
            "{\"text\": \"\u{301}\u{302}\"}".as_bytes(),
            b"plain text \x00 with nul",
            br#"{"id": {"nested": [1, 2, {"deep": true}]}, "text": ["not", "a", "string"]}"#,
            b"{}",
        ];
        let c = MessageSettings {
            metadata_fields: vec!["*".into()],
            max_message_bytes: 4096,
            ..cfg()
        };
        for i in 0..20_000 {
            let mut bytes = seeds[i % seeds.len()].to_vec();
            for _ in 0..rng.random_range(0..8) {
                let op = rng.random_range(0..3);
                let at = rng.random_range(0..=bytes.len());
                match op {
                    0 => bytes.insert(at, rng.random()),
                    1 if !bytes.is_empty() => {
                        bytes.remove(at.min(bytes.len() - 1));
                    }
                    _ => bytes
                        .splice(at..at, std::iter::repeat_n(b'[', rng.random_range(0..300)))
                        .for_each(drop),
                }
            }
            let key: Option<Vec<u8>> = rng
                .random_bool(0.5)
                .then(|| (0..rng.random_range(0..8)).map(|_| rng.random()).collect());
            let payload = rng.random_bool(0.95).then_some(bytes.as_slice());
            let r = rec(key.as_deref(), payload);
            match decode(&r, &c) {
                Decoded::Reject(rej) => assert!(!rej.reason.is_empty()),
                Decoded::Upsert { id, text, .. } => {
                    assert!(!text.chars().all(|ch| ch.is_whitespace() || ch.is_control()));
                    let again = decode(&r, &c);
                    assert!(
                        matches!(again, Decoded::Upsert { id: i2, .. } if i2 == id),
                        "ids are stable"
                    );
                }
                Decoded::Delete { id } => {
                    assert_eq!(Some(id), key.as_deref().map(ids::from_entity))
                }
            }
        }
    }
}
