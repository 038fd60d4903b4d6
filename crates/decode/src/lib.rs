//! The pure part of streambed's input handling, kept apart from the worker so it can be
//! fuzzed without building the model and store stacks: a Kafka record (or backfill line)
//! becomes an upsert, a delete or a rejection with a reason, and every point gets a
//! deterministic id.

pub mod ids;
pub mod message;
