//! Fuzzes message decoding and id derivation: any key, value and settings must give an
//! upsert, a delete or a rejection with a reason, never a panic; the same record must decode
//! the same way twice (ids are deterministic); an upsert must carry non-blank text, within
//! the size limit, and the id of its key, or of its position when it has neither id field
//! nor key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use streambed_decode::ids;
use streambed_decode::message::{decode, Decoded, MessageFormat, MessageSettings, Record};

fuzz_target!(|data: &[u8]| {
    // Byte 0 picks settings; byte 1 splits the rest into key and value.
    let (Some(&mode), Some(&split)) = (data.first(), data.get(1)) else {
        return;
    };
    let rest = &data[2..];
    let split = (split as usize).min(rest.len());
    let (key, value) = rest.split_at(split);
    let cfg = MessageSettings {
        format: match mode % 4 {
            0 => MessageFormat::Auto,
            1 => MessageFormat::Json,
            2 => MessageFormat::Text,
            _ => MessageFormat::Debezium,
        },
        text_field: if mode & 4 == 0 {
            "text".into()
        } else {
            "body".into()
        },
        id_field: if mode & 8 == 0 {
            Some("id".into())
        } else {
            None
        },
        metadata_fields: if mode & 16 == 0 {
            vec![]
        } else {
            vec!["*".into()]
        },
        max_message_bytes: if mode & 32 == 0 { 1 << 20 } else { 64 },
        text_template: (mode & 4 != 0 && mode % 2 == 1).then(|| "{title}\n\n{body.text}".into()),
    };
    let debezium = cfg.format == MessageFormat::Debezium;
    let rec = Record {
        topic: "t",
        partition: (mode >> 6) as i32,
        offset: split as i64,
        key: (mode & 64 == 0).then_some(key),
        payload: (mode & 128 == 0).then_some(value),
        timestamp_ms: None,
    };
    let first = decode(&rec, &cfg);
    assert_eq!(first, decode(&rec, &cfg), "decoding is deterministic");
    match &first {
        Decoded::Upsert { id, text, .. } => {
            assert!(!text.trim().is_empty(), "upserts carry text");
            assert!(
                value.len() <= cfg.max_message_bytes,
                "oversized values are rejected"
            );
            match (rec.key, cfg.id_field.as_ref()) {
                _ if debezium => {}
                (Some(k), None) if !k.is_empty() => {
                    assert_eq!(*id, ids::from_entity(k), "the key names the point")
                }
                (None | Some([]), None) => assert_eq!(
                    *id,
                    ids::from_position(rec.topic, rec.partition, rec.offset),
                    "without id field or key, the position names the point"
                ),
                _ => {}
            }
        }
        Decoded::Delete { id } => {
            assert!(
                rec.payload.is_none() || debezium,
                "only tombstones (and Debezium deletes) delete"
            );
            let _ = id;
        }
        Decoded::Reject(r) => assert!(!r.reason.is_empty() && !r.detail.is_empty()),
    }
});
