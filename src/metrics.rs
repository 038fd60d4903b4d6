//! Every metric the worker exports, in one place: one prefix (`streambed_`), Prometheus
//! units in the names, low-cardinality labels. `/metrics`, `/healthz` and `/readyz` are
//! served from here.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use prometheus::{
    Encoder as _, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub const PREFIX: &str = "streambed";

/// Buckets chosen by what is measured.
fn seconds_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.0005, 2.0, 18).expect("buckets")
}
fn size_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(1.0, 2.0, 12).expect("buckets")
}
fn token_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(16.0, 2.0, 14).expect("buckets")
}

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub consumed: IntCounter,
    pub embedded: IntCounter,
    pub upserted: IntCounter,
    pub deleted: IntCounter,
    /// Documents (messages, backfill lines) whose chunks were all written.
    pub documents: IntCounter,
    pub chunks_per_document: Histogram,
    /// Documents not embedded again: the store already held the same content.
    pub unchanged: IntCounter,
    /// Query endpoints: requests by endpoint and status, latency, encoder queue wait.
    pub http_requests: IntCounterVec,
    pub query_seconds: HistogramVec,
    pub query_queue_seconds: Histogram,
    pub dead_lettered: IntCounterVec,
    pub truncated: IntCounter,
    pub batches: IntCounter,
    pub batch_size: Histogram,
    pub batch_padded_tokens: Histogram,
    pub stage_seconds: HistogramVec,
    pub end_to_end_seconds: Histogram,
    pub consumer_lag: IntGaugeVec,
    pub in_flight: IntGauge,
    pub sink_retries: IntCounter,
    pub sink_errors: IntCounterVec,
    pub fenced: IntCounter,
    pub committed_offset: IntGaugeVec,
    pub model_info: GaugeVec,
    pub build_info: GaugeVec,
    pub ready: Arc<Readiness>,
    /// Exact end-to-end latencies, kept only when a benchmark sets this to `Some`.
    pub latency_samples: Arc<std::sync::Mutex<Option<Vec<f64>>>>,
    /// Exact event-time-to-consume delays (the broker's share), likewise.
    pub consume_samples: Arc<std::sync::Mutex<Option<Vec<f64>>>>,
}

/// What `/readyz` checks. Each flag is set by the part that knows: the store's health by
/// the periodic check, the last write's outcome by the writer (the two are kept apart, so
/// a successful ping cannot hide failing writes), a stopped pipeline by the stage that died.
#[derive(Default)]
pub struct Readiness {
    pub model_loaded: AtomicBool,
    pub source_ready: AtomicBool,
    /// The periodic health check reached the store and found the collection.
    pub sink_reachable: AtomicBool,
    /// The last write failed (cleared by the next successful one).
    write_failing: AtomicBool,
    /// Why the pipeline stopped, once it has; never cleared.
    failed: std::sync::Mutex<Option<String>>,
}

impl Readiness {
    /// `None` when ready, else the first reason it is not.
    pub fn reason(&self) -> Option<String> {
        if let Some(why) = self.failed.lock().expect("readiness").as_ref() {
            Some(format!("pipeline stopped: {why}"))
        } else if !self.model_loaded.load(Ordering::Relaxed) {
            Some("model not loaded".into())
        } else if !self.source_ready.load(Ordering::Relaxed) {
            Some("no partitions assigned".into())
        } else if !self.sink_reachable.load(Ordering::Relaxed) {
            Some("vector store unreachable".into())
        } else if self.write_failing.load(Ordering::Relaxed) {
            Some("vector store writes failing".into())
        } else {
            None
        }
    }

    pub fn set_last_write_ok(&self, ok: bool) {
        self.write_failing.store(!ok, Ordering::Relaxed);
    }

    /// Records that the pipeline cannot go on (the first cause is kept).
    pub fn fail(&self, why: &str) {
        self.failed
            .lock()
            .expect("readiness")
            .get_or_insert_with(|| why.to_string());
    }

    pub fn failure(&self) -> Option<String> {
        self.failed.lock().expect("readiness").clone()
    }
}

fn name(n: &str) -> String {
    format!("{PREFIX}_{n}")
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        macro_rules! reg {
            ($m:expr) => {{
                let m = $m;
                registry
                    .register(Box::new(m.clone()))
                    .expect("metric registered once");
                m
            }};
        }
        let counter = |n: &str, help: &str| IntCounter::new(name(n), help).expect("metric");
        let m = Self {
            consumed: reg!(counter(
                "messages_consumed_total",
                "Records read from Kafka"
            )),
            embedded: reg!(counter("messages_embedded_total", "Texts embedded")),
            upserted: reg!(counter(
                "points_upserted_total",
                "Points confirmed written to the store"
            )),
            deleted: reg!(counter(
                "points_deleted_total",
                "Points deleted by tombstones"
            )),
            documents: reg!(counter(
                "documents_written_total",
                "Documents whose chunks (points) were all written"
            )),
            chunks_per_document: reg!(Histogram::with_opts(
                HistogramOpts::new(name("document_chunks"), "Chunks a written document made")
                    .buckets(size_buckets())
            )
            .expect("metric")),
            unchanged: reg!(counter(
                "documents_unchanged_total",
                "Documents skipped because the store already held the same content"
            )),
            http_requests: reg!(IntCounterVec::new(
                Opts::new(
                    name("http_requests_total"),
                    "Query API requests by endpoint and status"
                ),
                &["endpoint", "status"]
            )
            .expect("metric")),
            query_seconds: reg!(HistogramVec::new(
                HistogramOpts::new(
                    name("query_duration_seconds"),
                    "Query API request latency by endpoint"
                )
                .buckets(seconds_buckets()),
                &["endpoint"]
            )
            .expect("metric")),
            query_queue_seconds: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    name("query_queue_seconds"),
                    "How long queries waited for the encoder"
                )
                .buckets(seconds_buckets())
            )
            .expect("metric")),
            dead_lettered: reg!(IntCounterVec::new(
                Opts::new(
                    name("messages_dead_lettered_total"),
                    "Records sent to the dead-letter topic"
                ),
                &["reason"]
            )
            .expect("metric")),
            truncated: reg!(counter(
                "texts_truncated_total",
                "Texts cut at the model's max_seq_length"
            )),
            batches: reg!(counter("batches_total", "Batches embedded")),
            batch_size: reg!(Histogram::with_opts(
                HistogramOpts::new(name("batch_size"), "Texts per batch").buckets(size_buckets())
            )
            .expect("metric")),
            batch_padded_tokens: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    name("batch_padded_tokens"),
                    "Items x longest item per batch"
                )
                .buckets(token_buckets())
            )
            .expect("metric")),
            stage_seconds: reg!(HistogramVec::new(
                HistogramOpts::new(
                    name("stage_duration_seconds"),
                    "Time per batch in each stage"
                )
                .buckets(seconds_buckets()),
                &["stage"]
            )
            .expect("metric")),
            end_to_end_seconds: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    name("end_to_end_latency_seconds"),
                    "Message timestamp to confirmed upsert"
                )
                .buckets(seconds_buckets())
            )
            .expect("metric")),
            consumer_lag: reg!(IntGaugeVec::new(
                Opts::new(
                    name("consumer_lag_messages"),
                    "High watermark minus committed position"
                ),
                &["topic", "partition"]
            )
            .expect("metric")),
            in_flight: reg!(IntGauge::new(
                name("in_flight_messages"),
                "Read but not yet committable"
            )
            .expect("metric")),
            sink_retries: reg!(counter(
                "sink_retries_total",
                "Store writes retried after a transient error"
            )),
            sink_errors: reg!(IntCounterVec::new(
                Opts::new(
                    name("sink_errors_total"),
                    "Store write errors by class: transient (retried), rejected (points \
                     isolated and dead-lettered), fatal (the worker stops)"
                ),
                &["class"]
            )
            .expect("metric")),
            fenced: reg!(counter(
                "messages_fenced_total",
                "Records of a revoked partition left unwritten for its next owner"
            )),
            committed_offset: reg!(IntGaugeVec::new(
                Opts::new(
                    name("committed_offset"),
                    "Next offset to read, as stored for commit"
                ),
                &["topic", "partition"]
            )
            .expect("metric")),
            model_info: reg!(GaugeVec::new(
                Opts::new(name("model_info"), "The loaded model (value 1)"),
                &["name", "dimension", "device", "dtype"]
            )
            .expect("metric")),
            build_info: reg!(GaugeVec::new(
                Opts::new(name("build_info"), "Version of this binary (value 1)"),
                &["version"]
            )
            .expect("metric")),
            ready: Arc::new(Readiness::default()),
            latency_samples: Arc::new(std::sync::Mutex::new(None)),
            consume_samples: Arc::new(std::sync::Mutex::new(None)),
            registry,
        };
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1.0);
        m
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding");
        String::from_utf8(buf).expect("utf8 metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Serves `/metrics`, `/healthz`, `/readyz` until `shutdown` resolves.
pub async fn serve(
    addr: std::net::SocketAddr,
    metrics: Metrics,
    extra: Option<axum::Router>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<std::net::SocketAddr> {
    use axum::http::StatusCode;
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let m1 = metrics.clone();
    let ready = metrics.ready.clone();
    let app = axum::Router::new()
        .route("/metrics", get(move || async move { m1.render() }))
        .route(
            "/healthz",
            get(|| async { (StatusCode::OK, "{\"status\":\"alive\"}") }),
        )
        .route(
            "/readyz",
            get(move || {
                let ready = ready.clone();
                async move {
                    match ready.reason() {
                        None => (StatusCode::OK, "{\"status\":\"ready\"}".to_string()),
                        Some(r) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            serde_json::json!({"status": "not ready", "reason": r}).to_string(),
                        ),
                    }
                }
            }),
        );
    let app = match extra {
        Some(r) => app.merge(r),
        None => app,
    };
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await;
    });
    Ok(bound)
}
