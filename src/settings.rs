//! Settings: one typed tree, layered (compiled-in defaults, `config/default.toml`,
//! `config/$RUN_MODE.toml`, `--config FILE`, `STREAMBED__SECTION__KEY` variables), unknown
//! keys rejected, validated before any work starts. Secrets are redacted from `Debug`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;

use crate::embed::{DeviceKind, F32Matmul, Precision};

const DEFAULTS: &str = include_str!("../config/default.toml");

/// A string that never shows in `Debug` or logs.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("\"\"")
        } else {
            f.write_str("\"<redacted>\"")
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub model: ModelSettings,
    pub kafka: KafkaSettings,
    pub message: MessageSettings,
    pub batch: BatchSettings,
    pub chunk: ChunkSettings,
    pub sparse: SparseSettings,
    pub search: SearchSettings,
    pub sink: SinkSettings,
    pub qdrant: QdrantSettings,
    pub embedded: EmbeddedSettings,
    pub metrics: MetricsSettings,
    pub api: ApiSettings,
    pub log: LogSettings,
    pub shutdown: ShutdownSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSettings {
    /// Folder or hub id.
    pub path: String,
    pub prefix: String,
    pub query_prefix: String,
    pub device: DeviceKind,
    pub dtype: Precision,
    /// How f32 linear layers multiply on the CPU ("high", "highest" or "medium").
    pub f32_matmul: F32Matmul,
    pub forward_batch: usize,
    /// CPU threads for the model; 0 means all cores (see `compute_threads`).
    pub threads: usize,
}

impl ModelSettings {
    /// The model's CPU threads: all cores unless set. Session 2 left one core to the Kafka
    /// client, tokenizer and store, because two model threads on 2 cores were stalled by
    /// every other thread; since batches run packed (no padding) the model needs far less
    /// time per message, and on 2 cores all cores gave both more throughput and the same
    /// latency (docs/PERFORMANCE.md). `model.threads = N` still pins it.
    pub fn compute_threads(&self) -> usize {
        if self.threads > 0 {
            return self.threads;
        }
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSettings {
    pub brokers: String,
    pub topics: Vec<String>,
    pub group_id: String,
    pub auto_offset_reset: String,
    pub dead_letter_topic: String,
    pub session_timeout_ms: u64,
    pub heartbeat_interval_ms: u64,
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

/// Words that make a property's value secret, matched anywhere in the key.
const SECRET_WORDS: &[&str] = &[
    "password",
    "passwd",
    "secret",
    "key",
    "token",
    "jaas",
    "oauthbearer.config",
    "credential",
    "auth",
];

/// librdkafka properties whose values are secret. One rule for every spelling: the key is
/// lower-cased and `_` read as `.` (the environment spelling of `ssl.key.pem` is
/// `ssl_key_pem`) before matching. Redacting a harmless value (`ssl.key.location`) costs
/// nothing; missing a secret leaks it.
pub fn is_secret_property(key: &str) -> bool {
    let k = key.to_ascii_lowercase().replace('_', ".");
    SECRET_WORDS.iter().any(|w| k.contains(w))
}

impl fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let props: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(k, v)| {
                let v = if is_secret_property(k) {
                    "<redacted>"
                } else {
                    v.as_str()
                };
                (k.as_str(), v)
            })
            .collect();
        f.debug_struct("KafkaSettings")
            .field("brokers", &self.brokers)
            .field("topics", &self.topics)
            .field("group_id", &self.group_id)
            .field("auto_offset_reset", &self.auto_offset_reset)
            .field("dead_letter_topic", &self.dead_letter_topic)
            .field("session_timeout_ms", &self.session_timeout_ms)
            .field("heartbeat_interval_ms", &self.heartbeat_interval_ms)
            .field("properties", &props)
            .finish()
    }
}

pub use streambed_decode::message::{MessageFormat, MessageSettings};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchSettings {
    pub max_items: usize,
    pub max_tokens: usize,
    pub linger_ms: u64,
}

/// How a text longer than the model's input becomes points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChunkMode {
    /// One point per chunk of at most `max_tokens`; the document's chunks are kept exact.
    Split,
    /// One point per document, of its first `max_seq_length` tokens.
    Truncate,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkSettings {
    pub mode: ChunkMode,
    /// Tokens per chunk, prefix and special tokens included; 0 = the model's
    /// `max_seq_length`.
    pub max_tokens: usize,
    pub overlap_tokens: usize,
    /// Skip documents whose content hash the store already holds.
    pub skip_unchanged: bool,
}

pub use crate::sparse::{SparseSettings, TermSource};

/// How a search ranks points (see `search`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SearchMode {
    /// `hybrid` where the collection has sparse vectors, else `dense`.
    Auto,
    Dense,
    Sparse,
    Hybrid,
}

impl SearchMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SearchMode::Auto => "auto",
            SearchMode::Dense => "dense",
            SearchMode::Sparse => "sparse",
            SearchMode::Hybrid => "hybrid",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "auto" => SearchMode::Auto,
            "dense" => SearchMode::Dense,
            "sparse" => SearchMode::Sparse,
            "hybrid" => SearchMode::Hybrid,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FusionKind {
    Rrf,
    Dbsf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchSettings {
    pub mode: SearchMode,
    pub fusion: FusionKind,
    pub rrf_k: u32,
    pub dense_weight: f32,
    pub sparse_weight: f32,
    /// Candidates each leg of a hybrid search brings to the fusion (at least `top_k`).
    pub prefetch: usize,
}

/// The query endpoints on the metrics server (see `api`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSettings {
    pub enabled: bool,
    /// `Authorization: Bearer` token for the query endpoints; empty: none.
    pub api_key: Secret,
    pub max_inputs: usize,
    pub max_body_bytes: usize,
    pub max_concurrent: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkKind {
    Embedded,
    Qdrant,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkSettings {
    pub kind: SinkKind,
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QdrantSettings {
    pub url: String,
    pub collection: String,
    pub api_key: Secret,
    pub timeout_ms: u64,
    /// The largest gRPC request sent (upserts are split to fit).
    pub max_request_bytes: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedSettings {
    pub path: String,
    pub collection: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSettings {
    /// Empty disables the HTTP server.
    pub addr: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownSettings {
    pub deadline_ms: u64,
}

/// A setting that is wrong, with the key and what would be right.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("settings could not be read: {0}")]
    Load(#[from] config::ConfigError),
    #[error("setting `{key}` {problem}")]
    Invalid { key: &'static str, problem: String },
}

/// The keys whose values are names, and the names they take.
const CHOICES: &[(&str, &str)] = &[
    ("model.device", "cpu, cuda"),
    ("model.dtype", "f32, int8, bf16, f16"),
    ("model.f32_matmul", "high, highest, medium"),
    ("chunk.mode", "split, truncate"),
    ("search.mode", "auto, dense, sparse, hybrid"),
    ("search.fusion", "rrf, dbsf"),
    ("sink.kind", "embedded, qdrant"),
    ("log.format", "human, json"),
];

/// A value the settings' types do not know: where the key takes names, the names (the
/// `config` crate's message gives the key and the value only).
fn with_choices(e: config::ConfigError) -> SettingsError {
    let msg = e.to_string();
    for &(key, choices) in CHOICES {
        if msg.contains(&format!("`{key}`")) && msg.contains("variant") {
            return invalid(
                key,
                format!("has a value it does not know ({msg}); use one of: {choices}"),
            );
        }
    }
    SettingsError::Load(e)
}

fn invalid(key: &'static str, problem: impl Into<String>) -> SettingsError {
    SettingsError::Invalid {
        key,
        problem: problem.into(),
    }
}

impl Settings {
    /// Loads every layer and validates. `file` is `--config`.
    pub fn load(file: Option<&Path>) -> Result<Self, SettingsError> {
        Self::load_from(file, std::env::vars())
    }

    /// As [`Settings::load`], with the environment given (for tests).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, SettingsError> {
        let env: std::collections::HashMap<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("STREAMBED__") || k == "RUN_MODE")
            .collect();
        let mut b = config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml))
            .add_source(config::File::with_name("config/default").required(false));
        if let Some(mode) = env.get("RUN_MODE") {
            b = b.add_source(config::File::with_name(&format!("config/{mode}")).required(false));
        }
        if let Some(f) = file {
            if !f.exists() {
                return Err(invalid(
                    "--config",
                    format!("names {} which does not exist", f.display()),
                ));
            }
            b = b.add_source(config::File::from(f));
        }
        let source = config::Environment::with_prefix("STREAMBED")
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .with_list_parse_key("kafka.topics")
            .with_list_parse_key("message.metadata_fields")
            .source(Some(env.into_iter().collect()));
        let settings: Settings = b
            .add_source(source)
            .build()?
            .try_deserialize()
            .map_err(with_choices)?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks what types alone cannot. Messages name the key and the fix.
    pub fn validate(&self) -> Result<(), SettingsError> {
        if self.model.path.trim().is_empty() {
            return Err(invalid(
                "model.path",
                "is empty; set a model folder or a hub id such as klue/bert-base",
            ));
        }
        if self.model.forward_batch == 0 {
            return Err(invalid(
                "model.forward_batch",
                "must be at least 1 (32 is a good CPU value)",
            ));
        }
        if let Some(why) = self.model.dtype.unsupported_on(self.model.device) {
            return Err(invalid("model.dtype", why));
        }
        if self.kafka.brokers.trim().is_empty() {
            return Err(invalid(
                "kafka.brokers",
                "is empty; give host:port[,host:port]",
            ));
        }
        if self.kafka.topics.is_empty() || self.kafka.topics.iter().any(|t| t.trim().is_empty()) {
            return Err(invalid(
                "kafka.topics",
                "must list at least one non-empty topic name",
            ));
        }
        if self.kafka.group_id.trim().is_empty() {
            return Err(invalid(
                "kafka.group_id",
                "is empty; replicas sharing the work use the same group id",
            ));
        }
        if !matches!(self.kafka.auto_offset_reset.as_str(), "earliest" | "latest") {
            return Err(invalid(
                "kafka.auto_offset_reset",
                format!(
                    "is {:?}; use \"earliest\" or \"latest\"",
                    self.kafka.auto_offset_reset
                ),
            ));
        }
        if self.kafka.dead_letter_topic.trim().is_empty() {
            return Err(invalid(
                "kafka.dead_letter_topic",
                "is empty; bad messages must go somewhere (e.g. \"streambed-dead-letter\")",
            ));
        }
        if self.kafka.topics.contains(&self.kafka.dead_letter_topic) {
            return Err(invalid(
                "kafka.dead_letter_topic",
                "is also in kafka.topics; that would loop",
            ));
        }
        for k in self.kafka.properties.keys() {
            if matches!(
                k.as_str(),
                "enable.auto.offset.store" | "group.id" | "bootstrap.servers"
            ) {
                return Err(invalid(
                    "kafka.properties",
                    format!("sets {k:?}, which streambed manages; use the kafka.* keys instead"),
                ));
            }
        }
        if self.kafka.heartbeat_interval_ms * 3 > self.kafka.session_timeout_ms {
            return Err(invalid(
                "kafka.heartbeat_interval_ms",
                "must be at most a third of kafka.session_timeout_ms",
            ));
        }
        if self.sparse.enabled && self.sparse.name.trim().is_empty() {
            return Err(invalid(
                "sparse.name",
                "is empty; name the sparse vector (e.g. \"bm25\"); Qdrant's unnamed vector is the dense one",
            ));
        }
        if !(self.sparse.k1 > 0.0 && self.sparse.k1.is_finite()) {
            return Err(invalid("sparse.k1", "must be above 0 (1.2 is usual)"));
        }
        if !(0.0..=1.0).contains(&self.sparse.b) {
            return Err(invalid("sparse.b", "must be from 0 to 1 (0.75 is usual)"));
        }
        if !(self.sparse.avg_terms >= 1.0 && self.sparse.avg_terms.is_finite()) {
            return Err(invalid(
                "sparse.avg_terms",
                "must be at least 1: the typical number of terms of a point's text",
            ));
        }
        if !self.sparse.enabled
            && matches!(self.search.mode, SearchMode::Sparse | SearchMode::Hybrid)
        {
            return Err(invalid(
                "search.mode",
                format!(
                    "is {:?}, which needs sparse vectors; set sparse.enabled = true or search.mode = \"dense\"",
                    self.search.mode.as_str()
                ),
            ));
        }
        if self.search.rrf_k == 0 {
            return Err(invalid("search.rrf_k", "must be at least 1"));
        }
        let weights = [self.search.dense_weight, self.search.sparse_weight];
        if weights.iter().any(|w| !(*w >= 0.0 && w.is_finite())) || weights == [0.0, 0.0] {
            return Err(invalid(
                "search.dense_weight",
                "and search.sparse_weight must be 0 or more, not both 0",
            ));
        }
        if self.search.prefetch == 0 {
            return Err(invalid(
                "search.prefetch",
                "must be at least 1 (100 is a good value)",
            ));
        }
        if self.message.text_field.is_empty() {
            return Err(invalid(
                "message.text_field",
                "is empty; name the JSON field holding the text (e.g. \"text\")",
            ));
        }
        if let Some(t) = &self.message.text_template {
            if let Err(e) = streambed_decode::message::check_template(t) {
                return Err(invalid("message.text_template", e));
            }
        }
        if self.message.max_message_bytes == 0 {
            return Err(invalid(
                "message.max_message_bytes",
                "must be positive (e.g. 1048576)",
            ));
        }
        if self.api.max_inputs == 0 || self.api.max_concurrent == 0 {
            return Err(invalid(
                "api.max_inputs",
                "api.max_inputs and api.max_concurrent must be at least 1 (e.g. 256 and 64)",
            ));
        }
        if self.api.max_body_bytes < 1024 {
            return Err(invalid(
                "api.max_body_bytes",
                "must be at least 1024 (2097152 is a good value)",
            ));
        }
        if self.chunk.max_tokens != 0 && self.chunk.max_tokens < 16 {
            return Err(invalid(
                "chunk.max_tokens",
                "must be 0 (the model's max_seq_length) or at least 16",
            ));
        }
        if self.chunk.max_tokens != 0 && 2 * self.chunk.overlap_tokens >= self.chunk.max_tokens {
            return Err(invalid(
                "chunk.overlap_tokens",
                "must be less than half of chunk.max_tokens (e.g. 32 for 512)",
            ));
        }
        if self.batch.max_items == 0 {
            return Err(invalid(
                "batch.max_items",
                "must be at least 1 (64 is a good CPU value)",
            ));
        }
        if self.batch.max_tokens < 512 {
            return Err(invalid(
                "batch.max_tokens",
                "must be at least 512 so one full-length text fits",
            ));
        }
        if self.batch.linger_ms > 60_000 {
            return Err(invalid(
                "batch.linger_ms",
                "is over a minute; use a few milliseconds to a second",
            ));
        }
        if self.sink.retry_initial_ms == 0 || self.sink.retry_max_ms < self.sink.retry_initial_ms {
            return Err(invalid(
                "sink.retry_max_ms",
                "must be >= sink.retry_initial_ms > 0",
            ));
        }
        match self.sink.kind {
            SinkKind::Qdrant => {
                let u = &self.qdrant.url;
                if !(u.starts_with("http://") || u.starts_with("https://")) {
                    return Err(invalid("qdrant.url", format!("is {u:?}; with sink.kind = \"qdrant\" give the gRPC URL, e.g. http://localhost:6334")));
                }
                if self.qdrant.collection.is_empty() {
                    return Err(invalid("qdrant.collection", "is empty"));
                }
                if self.qdrant.max_request_bytes < 64 * 1024 {
                    return Err(invalid(
                        "qdrant.max_request_bytes",
                        "must be at least 65536; 4194304 (gRPC's usual 4 MiB limit) is the default",
                    ));
                }
            }
            SinkKind::Embedded => {
                if self.embedded.path.is_empty() {
                    return Err(invalid(
                        "embedded.path",
                        "is empty; give a folder for the store",
                    ));
                }
                if self.embedded.collection.is_empty() {
                    return Err(invalid("embedded.collection", "is empty"));
                }
            }
        }
        if !self.metrics.addr.is_empty() && self.metrics.addr.parse::<SocketAddr>().is_err() {
            return Err(invalid(
                "metrics.addr",
                format!(
                    "is {:?}; give ip:port such as 0.0.0.0:9464, or \"\" to disable",
                    self.metrics.addr
                ),
            ));
        }
        if self.shutdown.deadline_ms == 0 {
            return Err(invalid(
                "shutdown.deadline_ms",
                "must be positive (e.g. 30000)",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_load_and_env_overrides() {
        let s = Settings::load_from(
            None,
            env(&[
                ("STREAMBED__KAFKA__BROKERS", "b1:9092,b2:9092"),
                ("STREAMBED__KAFKA__TOPICS", "a,b"),
                ("STREAMBED__BATCH__MAX_ITEMS", "8"),
            ]),
        )
        .unwrap();
        assert_eq!(s.kafka.brokers, "b1:9092,b2:9092");
        assert_eq!(s.kafka.topics, vec!["a", "b"]);
        assert_eq!(s.batch.max_items, 8);
        assert_eq!(s.sink.kind, SinkKind::Embedded);
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = Settings::load_from(None, env(&[("STREAMBED__BATCH__MAX_ITEM", "8")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_item"), "{err}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let err = Settings::load_from(None, env(&[("STREAMBED__SINK__KIND", "qdrant")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("qdrant.url"), "{err}");
        let err = Settings::load_from(
            None,
            env(&[("STREAMBED__KAFKA__AUTO_OFFSET_RESET", "oldest")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("kafka.auto_offset_reset") && err.contains("earliest"),
            "{err}"
        );
        let err = Settings::load_from(
            None,
            env(&[
                ("STREAMBED__MODEL__DEVICE", "cuda"),
                ("STREAMBED__MODEL__DTYPE", "int8"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("model.dtype") && err.contains("f16"), "{err}");
        let s = Settings::load_from(None, env(&[("STREAMBED__MODEL__DTYPE", "int8")])).unwrap();
        assert_eq!(s.model.dtype, Precision::Int8);
        let s = Settings::load_from(None, env(&[])).unwrap();
        assert_eq!(s.model.f32_matmul, F32Matmul::High, "the default");
        let s =
            Settings::load_from(None, env(&[("STREAMBED__MODEL__F32_MATMUL", "medium")])).unwrap();
        assert_eq!(s.model.f32_matmul, F32Matmul::Medium);
        let err = Settings::load_from(None, env(&[("STREAMBED__MODEL__F32_MATMUL", "low")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("model.f32_matmul") && err.contains("high, highest, medium"),
            "{err}"
        );
        let err = Settings::load_from(None, env(&[("STREAMBED__CHUNK__MODE", "cut")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("chunk.mode") && err.contains("split, truncate"),
            "{err}"
        );
    }

    #[test]
    fn every_spelling_of_a_secret_property_is_redacted() {
        let secrets = [
            ("SSL_KEY_PEM", "-----BEGIN PRIVATE KEY-----hunter2"),
            ("SSL_KEY_PASSWORD", "hunter2"),
            ("SASL_PASSWORD", "hunter2"),
            ("SASL_OAUTHBEARER_CONFIG", "principal=x hunter2"),
            ("SASL_OAUTHBEARER_CLIENT_SECRET", "hunter2"),
            ("SASL_JAAS_CONFIG", "org.apache...hunter2"),
            ("SSL_KEYSTORE_PASSWORD", "hunter2"),
            ("SASL_OAUTHBEARER_TOKEN", "hunter2"),
            ("SSL_CERTIFICATE_PEM_CREDENTIALS", "hunter2"),
        ];
        for (name, value) in secrets {
            let var = format!("STREAMBED__KAFKA__PROPERTIES__{name}");
            let s = Settings::load_from(None, env(&[(var.as_str(), value)])).unwrap();
            let dbg = format!("{s:?}");
            assert!(!dbg.contains("hunter2"), "{name} leaked: {dbg}");
            let dotted = name.to_ascii_lowercase().replace('_', ".");
            assert!(is_secret_property(&dotted), "{dotted}");
        }
        // Settings that are not secret stay visible for debugging.
        let s = Settings::load_from(
            None,
            env(&[(
                "STREAMBED__KAFKA__PROPERTIES__SECURITY_PROTOCOL",
                "SASL_SSL",
            )]),
        )
        .unwrap();
        assert!(format!("{s:?}").contains("SASL_SSL"));
    }

    #[test]
    fn secrets_are_redacted() {
        let s = Settings::load_from(
            None,
            env(&[
                ("STREAMBED__QDRANT__API_KEY", "hunter2-key"),
                (
                    "STREAMBED__KAFKA__PROPERTIES__SASL_PASSWORD",
                    "hunter2-pass",
                ),
            ]),
        )
        .unwrap();
        let dbg = format!("{s:?}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
        assert_eq!(s.qdrant.api_key.expose(), "hunter2-key");
    }
}
