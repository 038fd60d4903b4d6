//! streambed: a streaming embedding worker. Kafka in, BERT sentence vectors (candle) out,
//! into Qdrant, with Prometheus metrics. See README.md for the data flow.

pub mod api;
pub mod backfill;
pub mod chunk;
pub mod commands;
pub mod document;
pub mod embed;
pub use streambed_decode::ids;
pub mod metrics;
pub mod offsets;
pub mod pipeline;
pub mod retrieval;
pub mod run;
pub mod search;
pub mod settings;
pub mod sink;
pub mod source;
pub mod sparse;
pub mod sts;
pub mod util;
