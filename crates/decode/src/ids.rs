//! Deterministic point ids, so that a replayed message overwrites its point instead of
//! adding a second one.
//!
//! The id is a UUIDv5 (in streambed's own namespace) of, in order of preference:
//! 1. the configured id field of a JSON message, as a string (`42` and `"42"` are the same);
//! 2. the message key, as bytes;
//! 3. `topic/partition/offset` (a fallback: the same event produced twice gets two points).
//!
//! 1 and 2 hash the same bytes, so a message keyed `doc-1` with `"id": "doc-1"` and a
//! tombstone keyed `doc-1` address the same point (the Kafka convention: key = entity id).

use uuid::Uuid;

/// streambed's UUIDv5 namespace (a fixed random UUID).
pub const NAMESPACE: Uuid = Uuid::from_u128(0x6c1b_9c9e_3d0f_4f7a_9a55_0b7e_2f41_8d23);

/// Id from an entity id (id field or key).
pub fn from_entity(bytes: &[u8]) -> Uuid {
    Uuid::new_v5(&NAMESPACE, bytes)
}

/// Id from the message's position, for messages with neither id field nor key.
pub fn from_position(topic: &str, partition: i32, offset: i64) -> Uuid {
    Uuid::new_v5(
        &NAMESPACE,
        format!("{topic}/{partition}/{offset}").as_bytes(),
    )
}

/// Id of a backfilled line without an id field.
pub fn from_file_line(file: &str, line: u64) -> Uuid {
    Uuid::new_v5(&NAMESPACE, format!("file:{file}:{line}").as_bytes())
}

/// Id of chunk `index` of a document: the document's own id for the first chunk (so a
/// document of one chunk keeps the id it had before documents were split, and replays
/// overwrite points written by older versions), else a UUIDv5 in the document's namespace.
pub fn chunk(document: Uuid, index: u32) -> Uuid {
    if index == 0 {
        document
    } else {
        Uuid::new_v5(&document, format!("chunk:{index}").as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_distinct() {
        assert_eq!(from_entity(b"doc-1"), from_entity(b"doc-1"));
        assert_ne!(from_entity(b"doc-1"), from_entity(b"doc-2"));
        assert_eq!(from_position("t", 0, 5), from_position("t", 0, 5));
        assert_ne!(from_position("t", 0, 5), from_position("t", 1, 5));
        assert_eq!(from_entity(b"doc-1").get_version_num(), 5);
    }

    /// Pinned to literal values computed once: changing the namespace or the derivation
    /// would orphan every stored point (replays would add instead of overwrite).
    #[test]
    fn ids_are_pinned() {
        assert_eq!(
            from_entity(b"doc-1").to_string(),
            "1f5bd9ae-3cb7-5b1f-be66-0ecd27fb3728"
        );
        assert_eq!(
            from_position("events", 2, 17).to_string(),
            "e807aa21-6aeb-571b-8092-3f851eb44dd1"
        );
        assert_eq!(
            from_file_line("corpus.txt", 3).to_string(),
            "b5044a96-a69b-58af-9561-4bb671cd3f63"
        );
        assert_eq!(from_entity(b"doc-1").get_version_num(), 5);
        let doc = from_entity(b"doc-1");
        assert_eq!(chunk(doc, 0), doc);
        assert_eq!(
            chunk(doc, 3).to_string(),
            "411a8308-ee61-5462-bdfa-71bb6c8782bd"
        );
    }
}
