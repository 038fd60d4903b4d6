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
    /// Debezium change events (JSON, with or without the `schema`/`payload` wrapper):
    /// create, snapshot read and update upsert the row in `after`; delete removes it; the
    /// point id is the row's primary key (from the record key, else the id field).
    Debezium,
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
    /// Text built from several fields, e.g. `"{title}\n\n{body}"` (see [`render`]);
    /// when set, `text_field` is not used. Empty in the file means none.
    #[serde(default, deserialize_with = "empty_is_none")]
    pub text_template: Option<String>,
}

impl Default for MessageSettings {
    fn default() -> Self {
        Self {
            format: MessageFormat::Auto,
            text_field: "text".into(),
            id_field: Some("id".into()),
            metadata_fields: Vec::new(),
            max_message_bytes: 1 << 20,
            text_template: None,
        }
    }
}

/// A piece of a parsed text template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece<'a> {
    Literal(String),
    /// A field name, dotted for nested objects (`author.name`).
    Field(&'a str),
}

/// Parses a template: `{field}` is replaced by the field's value, `{{` and `}}` are
/// literal braces. Errors name what is wrong, for the settings check.
fn parse_template(t: &str) -> Result<Vec<Piece<'_>>, String> {
    let mut out = Vec::new();
    let mut lit = String::new();
    let mut rest = t;
    while let Some(c) = rest.chars().next() {
        if rest.starts_with("{{") {
            lit.push('{');
            rest = &rest[2..];
        } else if rest.starts_with("}}") {
            lit.push('}');
            rest = &rest[2..];
        } else if c == '{' {
            let end = rest.find('}').ok_or_else(|| {
                format!(
                    "a '{{' at {:?} is never closed (write {{{{ for a literal brace)",
                    rest
                )
            })?;
            let name = rest[1..end].trim();
            if name.is_empty() || name.contains('{') {
                return Err(format!("{:?} does not name a field", &rest[..=end]));
            }
            if !lit.is_empty() {
                out.push(Piece::Literal(std::mem::take(&mut lit)));
            }
            out.push(Piece::Field(name));
            rest = &rest[end + 1..];
        } else if c == '}' {
            return Err("a '}' without its '{' (write }} for a literal brace)".into());
        } else {
            lit.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    if !lit.is_empty() {
        out.push(Piece::Literal(lit));
    }
    if !out.iter().any(|p| matches!(p, Piece::Field(_))) {
        return Err(
            "names no field; use {field} placeholders, e.g. \"{title}\\n\\n{body}\"".into(),
        );
    }
    Ok(out)
}

/// Checks `message.text_template` before any work starts.
pub fn check_template(t: &str) -> Result<(), String> {
    parse_template(t).map(|_| ())
}

fn lookup<'a>(obj: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    if let Some(v) = obj.get(path) {
        return Some(v);
    }
    let mut parts = path.split('.');
    let mut cur = obj.get(parts.next()?)?;
    for p in parts {
        cur = cur.as_object()?.get(p)?;
    }
    Some(cur)
}

/// Renders a template over a JSON object. The rule for fields: a string is put in as is,
/// a number or boolean as its JSON text, a missing or null field as nothing (so optional
/// columns do not reject the row; a result with no content is `empty_text`), and an
/// object or array is rejected (`text_not_string`), since no rendering of it is right.
pub fn render(template: &str, obj: &Map<String, Value>) -> Result<String, Rejection> {
    let pieces = parse_template(template)
        .map_err(|e| Rejection::new("invalid_template", format!("message.text_template {e}")))?;
    let mut out = String::new();
    for p in pieces {
        match p {
            Piece::Literal(l) => out.push_str(&l),
            Piece::Field(f) => match lookup(obj, f) {
                None | Some(Value::Null) => {}
                Some(Value::String(s)) => out.push_str(s),
                Some(v @ (Value::Number(_) | Value::Bool(_))) => out.push_str(&v.to_string()),
                Some(v) => {
                    return Err(Rejection::new(
                        "text_not_string",
                        format!("template field {f:?} is {}, not a string", type_name(v)),
                    ))
                }
            },
        }
    }
    Ok(out)
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
    if cfg.format == MessageFormat::Debezium {
        return debezium(rec, cfg);
    }
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
        MessageFormat::Json | MessageFormat::Debezium => true,
        MessageFormat::Auto => body.trim_start().starts_with('{'),
    };
    let mut payload = Map::new();
    let (text, id_value) = if json {
        let obj = match serde_json::from_str::<Value>(body) {
            Ok(Value::Object(o)) => o,
            Ok(_) => return Decoded::Reject(Rejection::new("invalid_json", "not a JSON object")),
            Err(e) => return Decoded::Reject(Rejection::new("invalid_json", e.to_string())),
        };
        let text = match text_of(&obj, cfg) {
            Ok(t) => t,
            Err(r) => return Decoded::Reject(r),
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
        copy_metadata(&obj, cfg, &mut payload);
        if let Some(id) = &id_value {
            payload.insert("id".into(), Value::String(id.clone()));
        }
        (text, id_value)
    } else {
        (body.to_string(), None)
    };
    let id = match (&id_value, rec.key) {
        (Some(v), _) => ids::from_entity(v.as_bytes()),
        (None, Some(k)) if !k.is_empty() => ids::from_entity(k),
        _ => ids::from_position(rec.topic, rec.partition, rec.offset),
    };
    finish_upsert(rec, id, text, payload)
}

/// The text of a JSON object: the template when one is set, else the text field.
fn text_of(obj: &Map<String, Value>, cfg: &MessageSettings) -> Result<String, Rejection> {
    if let Some(t) = &cfg.text_template {
        return render(t, obj);
    }
    match obj.get(&cfg.text_field) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(Rejection::new(
            "text_not_string",
            format!(
                "field {:?} is {}, not a string",
                cfg.text_field,
                type_name(other)
            ),
        )),
        None => Err(Rejection::new(
            "missing_text_field",
            format!("no field {:?}", cfg.text_field),
        )),
    }
}

fn copy_metadata(
    obj: &Map<String, Value>,
    cfg: &MessageSettings,
    payload: &mut Map<String, Value>,
) {
    if cfg.metadata_fields.iter().any(|f| f == "*") {
        for (k, v) in obj {
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
}

/// The common end of an upsert: the emptiness check and the record's own payload fields.
fn finish_upsert(
    rec: &Record<'_>,
    id: Uuid,
    text: String,
    mut payload: Map<String, Value>,
) -> Decoded {
    if text.chars().all(|c| c.is_whitespace() || c.is_control()) {
        return Decoded::Reject(Rejection::new(
            "empty_text",
            "text is empty or has only whitespace/control characters",
        ));
    }
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

/// A Debezium JSON document: the envelope (or key) itself, or the `payload` of the
/// `schema`/`payload` wrapper (JSON converter with `schemas.enable=true`).
fn unwrap_schema(v: Value) -> Value {
    match v {
        Value::Object(mut o) if o.contains_key("schema") && o.contains_key("payload") => {
            o.remove("payload").unwrap_or(Value::Null)
        }
        other => other,
    }
}

/// The row's primary key as an entity id: a one-column key is that column's value (as
/// the id field would be: `42` and `"42"` alike); a composite key is its columns as
/// compact JSON in column-name order, so the same row always gets the same id.
fn key_id(key: &Value) -> Option<String> {
    match key {
        Value::Object(o) if o.len() == 1 => o.values().next().and_then(id_string),
        Value::Object(o) if !o.is_empty() => {
            let sorted: std::collections::BTreeMap<&String, &Value> = o.iter().collect();
            serde_json::to_string(&sorted).ok()
        }
        other => id_string(other),
    }
}

/// The primary key from the record key (JSON, optionally wrapped), else `row`'s id field.
fn debezium_id(
    key: Option<&[u8]>,
    row: Option<&Map<String, Value>>,
    cfg: &MessageSettings,
) -> Option<String> {
    if let Some(k) = key.filter(|k| !k.is_empty()) {
        if let Ok(v) = serde_json::from_slice::<Value>(k) {
            if let Some(id) = key_id(&unwrap_schema(v)) {
                return Some(id);
            }
        } else if let Ok(s) = std::str::from_utf8(k) {
            return Some(s.to_string());
        }
    }
    let f = cfg.id_field.as_ref()?;
    row?.get(f).and_then(id_string)
}

fn debezium(rec: &Record<'_>, cfg: &MessageSettings) -> Decoded {
    let reject = |reason, detail: String| Decoded::Reject(Rejection::new(reason, detail));
    let Some(bytes) = rec.payload else {
        // The tombstone Debezium writes after a delete (for log compaction): the delete
        // was applied already; deleting again is harmless, and is what a compacted topic
        // that kept only the tombstone needs.
        return match debezium_id(rec.key, None, cfg) {
            Some(id) => Decoded::Delete {
                id: ids::from_entity(id.as_bytes()),
            },
            None => reject(
                "tombstone_without_key",
                "null value and no usable key: nothing to delete".into(),
            ),
        };
    };
    if bytes.len() > cfg.max_message_bytes {
        return reject(
            "too_large",
            format!(
                "{} bytes is over message.max_message_bytes = {}",
                bytes.len(),
                cfg.max_message_bytes
            ),
        );
    }
    let envelope = match serde_json::from_slice::<Value>(bytes) {
        Ok(v) => unwrap_schema(v),
        Err(e) => {
            return match std::str::from_utf8(bytes) {
                Err(u) => reject("invalid_utf8", u.to_string()),
                Ok(_) => reject("invalid_json", e.to_string()),
            }
        }
    };
    let Value::Object(mut env) = envelope else {
        return reject(
            "invalid_debezium",
            "not a Debezium change event (a JSON object with \"op\")".into(),
        );
    };
    let op = env
        .get("op")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let row = |name: &str, env: &mut Map<String, Value>| match env.remove(name) {
        Some(Value::Object(o)) => Some(o),
        _ => None,
    };
    match op.as_str() {
        "c" | "r" | "u" => {
            let Some(after) = row("after", &mut env) else {
                return reject(
                    "invalid_debezium",
                    format!("op {op:?} without an \"after\" row"),
                );
            };
            let text = match text_of(&after, cfg) {
                Ok(t) => t,
                Err(r) => return Decoded::Reject(r),
            };
            let id_value = debezium_id(rec.key, Some(&after), cfg);
            let mut payload = Map::new();
            copy_metadata(&after, cfg, &mut payload);
            payload.insert("op".into(), Value::String(op.clone()));
            if let Some(Value::Object(source)) = env.get("source") {
                for f in ["db", "schema", "table"] {
                    if let Some(v @ Value::String(_)) = source.get(f) {
                        payload.insert(format!("source_{f}"), v.clone());
                    }
                }
            }
            let id = match &id_value {
                Some(v) => {
                    payload.insert("id".into(), Value::String(v.clone()));
                    ids::from_entity(v.as_bytes())
                }
                None => ids::from_position(rec.topic, rec.partition, rec.offset),
            };
            finish_upsert(rec, id, text, payload)
        }
        "d" => {
            let before = row("before", &mut env);
            match debezium_id(rec.key, before.as_ref(), cfg) {
                Some(id) => Decoded::Delete {
                    id: ids::from_entity(id.as_bytes()),
                },
                None => reject(
                    "delete_without_key",
                    "a delete with neither a record key nor the id field in \"before\"".into(),
                ),
            }
        }
        "t" => reject(
            "debezium_truncate",
            "a table truncate is not applied to the store (its points stay); delete the \
             collection, or the points by source_table, and re-snapshot if that is meant"
                .into(),
        ),
        "" => reject(
            "invalid_debezium",
            "no \"op\" field: not a Debezium change event".into(),
        ),
        other => reject(
            "debezium_unsupported_op",
            format!("op {other:?} is not a row change"),
        ),
    }
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

    fn dbz() -> MessageSettings {
        MessageSettings {
            format: MessageFormat::Debezium,
            text_template: Some("{title}\n\n{body}".into()),
            metadata_fields: vec!["lang".into()],
            ..MessageSettings::default()
        }
    }

    fn event(op: &str, before: Value, after: Value, wrapped: bool) -> Vec<u8> {
        let payload = serde_json::json!({
            "before": before, "after": after, "op": op, "ts_ms": 1,
            "source": {"db": "shop", "schema": "public", "table": "articles"}
        });
        let v = if wrapped {
            serde_json::json!({"schema": {"type": "struct"}, "payload": payload})
        } else {
            payload
        };
        v.to_string().into_bytes()
    }

    #[test]
    fn debezium_envelopes_with_and_without_the_schema_wrapper() {
        let after =
            serde_json::json!({"id": 7, "title": "제목", "body": "본문입니다", "lang": "ko"});
        for wrapped in [false, true] {
            let key = if wrapped {
                br#"{"schema": {"type": "struct"}, "payload": {"id": 7}}"#.to_vec()
            } else {
                br#"{"id": 7}"#.to_vec()
            };
            for op in ["c", "r", "u"] {
                let v = event(op, Value::Null, after.clone(), wrapped);
                let Decoded::Upsert { id, text, payload } =
                    decode(&rec(Some(&key), Some(&v)), &dbz())
                else {
                    panic!("{op} {wrapped}")
                };
                assert_eq!(
                    id,
                    ids::from_entity(b"7"),
                    "the primary key names the point"
                );
                assert_eq!(text, "제목\n\n본문입니다");
                assert_eq!(payload["lang"], "ko");
                assert_eq!(payload["op"], op);
                assert_eq!(payload["source_table"], "articles");
            }
            let v = event("d", after.clone(), Value::Null, wrapped);
            assert_eq!(
                decode(&rec(Some(&key), Some(&v)), &dbz()),
                Decoded::Delete {
                    id: ids::from_entity(b"7")
                }
            );
            // Debezium's tombstone after the delete: the same point, deleted again.
            assert_eq!(
                decode(&rec(Some(&key), None), &dbz()),
                Decoded::Delete {
                    id: ids::from_entity(b"7")
                }
            );
            let v = event("t", Value::Null, Value::Null, wrapped);
            assert_eq!(
                reason(decode(&rec(Some(&key), Some(&v)), &dbz())),
                "debezium_truncate"
            );
        }
        // No key: the id field of `before` / `after`.
        let v = event("d", serde_json::json!({"id": "a-1"}), Value::Null, false);
        assert_eq!(
            decode(&rec(None, Some(&v)), &dbz()),
            Decoded::Delete {
                id: ids::from_entity(b"a-1")
            }
        );
        // A composite key: the same row, the same id, whatever the column order.
        let k1 = br#"{"tenant": 1, "id": 2}"#;
        let k2 = br#"{"id": 2, "tenant": 1}"#;
        let v = event("c", Value::Null, after.clone(), false);
        let id_of = |k: &[u8]| match decode(&rec(Some(k), Some(&v)), &dbz()) {
            Decoded::Upsert { id, .. } => id,
            other => panic!("{other:?}"),
        };
        assert_eq!(id_of(k1), id_of(k2));
        assert_ne!(id_of(k1), ids::from_entity(b"7"));
        for bad in [
            &b"not json"[..],
            br#"{"op": "c"}"#,
            br#"{"after": {}}"#,
            b"[1]",
        ] {
            assert!(matches!(
                decode(&rec(None, Some(bad)), &dbz()),
                Decoded::Reject(_)
            ));
        }
    }

    #[test]
    fn templates_render_fields_by_one_rule() {
        let obj = |v: Value| v.as_object().unwrap().clone();
        let t = "{title} ({year}) {{{author.name}}}: {body}";
        let full = obj(
            serde_json::json!({"title": "책", "year": 2024, "author": {"name": "김"}, "body": "내용"}),
        );
        assert_eq!(render(t, &full).unwrap(), "책 (2024) {김}: 내용");
        // Missing and null fields render as nothing.
        let partial = obj(serde_json::json!({"title": "책", "body": null}));
        assert_eq!(render(t, &partial).unwrap(), "책 () {}: ");
        // Objects and arrays are not text.
        let r = render("{tags}", &obj(serde_json::json!({"tags": ["a"]}))).unwrap_err();
        assert_eq!(r.reason, "text_not_string");
        // A row whose fields are all empty is empty text.
        let c = MessageSettings {
            text_template: Some("{title}\n\n{body}".into()),
            ..cfg()
        };
        let d = decode(&rec(None, Some(br#"{"title": "", "other": 1}"#)), &c);
        assert_eq!(reason(d), "empty_text");
        let d = decode(
            &rec(None, Some(r#"{"title": "제목", "body": 3}"#.as_bytes())),
            &c,
        );
        assert!(
            matches!(d, Decoded::Upsert { ref text, .. } if text == "제목\n\n3"),
            "{d:?}"
        );
        for bad in ["{title", "title}", "{}", "no fields"] {
            assert!(check_template(bad).is_err(), "{bad}");
        }
        assert!(check_template("{title}\n\n{body}").is_ok());
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
