//! Kafka record -> upsert, delete or dead letter: the pure decoding lives in the
//! `streambed-decode` crate (crates/decode), which the fuzz target builds on its own.

pub use streambed_decode::message::{decode, Decoded, Record, Rejection};
