//! `streambed run`: the worker. Wires settings, metrics, model, store and Kafka together,
//! runs until `shutdown` resolves, then drains within `shutdown.deadline_ms`.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::{CommitMode, Consumer};
use tokio::sync::watch;

use crate::api::{Api, Serving};
use crate::document::Documents;
use crate::embed::worker::EncoderHandle;
use crate::embed::{self, EncoderOptions, LoadedModel};
use crate::metrics::{self, Metrics};
use crate::offsets::OffsetTracker;
use crate::pipeline::{self, PipelineConfig};
use crate::settings::Settings;
use crate::sink::{self, AnySink, Sink, SinkError};
use crate::source::kafka;

pub fn pipeline_config(s: &Settings) -> PipelineConfig {
    PipelineConfig {
        max_items: s.batch.max_items,
        max_tokens: s.batch.max_tokens,
        linger: Duration::from_millis(s.batch.linger_ms),
        retry_initial: Duration::from_millis(s.sink.retry_initial_ms),
        retry_max: Duration::from_millis(s.sink.retry_max_ms),
    }
}

/// How this run cuts and recognises documents; fails (naming the key) when the chunk
/// settings do not fit the model.
pub fn documents(s: &Settings, m: &embed::LoadedModel) -> anyhow::Result<Arc<Documents>> {
    let model = format!(
        "{}|{}|{}|{}|{}",
        m.info.name,
        m.info.dim,
        m.info.precision.as_str(),
        m.info.pooling.as_str(),
        m.info.normalize
    );
    let mut docs =
        Documents::new(m.tokenizer.clone(), &s.chunk, &model).map_err(|e| anyhow::anyhow!(e))?;
    if s.sparse.enabled {
        let lexer = crate::sparse::Lexer::new(&s.sparse, Some(&m.tokenizer))
            .map_err(|e| anyhow::anyhow!(e))?;
        docs = docs.with_sparse(lexer);
    }
    Ok(Arc::new(docs))
}

/// Loads the configured model off the async threads and records it in the metrics.
pub async fn load_model(
    s: &Settings,
    metrics: &Metrics,
    prefix: &str,
) -> anyhow::Result<LoadedModel> {
    let path = s.model.path.clone();
    let prefix = prefix.to_string();
    let opts = EncoderOptions {
        device: s.model.device,
        precision: s.model.dtype,
        f32_matmul: s.model.f32_matmul,
        max_batch: s.model.forward_batch,
    };
    let m = tokio::task::spawn_blocking(move || embed::load_model(&path, &prefix, &opts))
        .await?
        .with_context(|| "model.path: the model could not be loaded")?;
    metrics
        .model_info
        .with_label_values(&[
            m.info.name.as_str(),
            &m.info.dim.to_string(),
            m.info.device.as_str(),
            m.info.precision.as_str(),
        ])
        .set(1.0);
    metrics.ready.model_loaded.store(true, Ordering::Relaxed);
    tracing::info!(model = %m.info.name, dim = m.info.dim, pooling = m.info.pooling.as_str(),
        normalize = m.info.normalize, max_seq_length = m.info.max_seq_length, "model loaded");
    Ok(m)
}

/// Opens the store and makes sure the collection fits the model. Transient errors (store
/// not up yet) are retried until `stop` turns true; permanent ones fail at once.
pub async fn open_sink(
    s: &Settings,
    dim: usize,
    stop: &mut watch::Receiver<bool>,
) -> anyhow::Result<Arc<AnySink>> {
    let sink = Arc::new(sink::open(s).await?);
    let mut wait = Duration::from_millis(s.sink.retry_initial_ms);
    loop {
        match sink.ensure_collection(dim).await {
            Ok(()) => return Ok(sink),
            Err(SinkError::Permanent(e)) => anyhow::bail!(e),
            Err(e @ SinkError::Rejected { .. }) => anyhow::bail!(e),
            Err(SinkError::Transient(e)) => {
                tracing::warn!(error = %e, "vector store not reachable yet; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => anyhow::bail!("stopped while waiting for the vector store"),
                }
                wait = (wait * 2).min(Duration::from_millis(s.sink.retry_max_ms));
            }
        }
    }
}

/// Keeps `sink_reachable` current for `/readyz` (the writer reports its own outcomes
/// separately, so a good ping cannot hide failing writes).
pub fn watch_sink(sink: Arc<AnySink>, metrics: Metrics, mut stop: watch::Receiver<bool>) {
    tokio::spawn(async move {
        let mut was_ok = true;
        loop {
            let r = tokio::time::timeout(Duration::from_secs(2), sink.ping()).await;
            let ok = matches!(r, Ok(Ok(())));
            if ok != was_ok {
                match r {
                    Ok(Err(e)) => tracing::warn!(error = %e, "vector store health check failed"),
                    Err(_) => tracing::warn!("vector store health check timed out"),
                    Ok(Ok(())) => tracing::info!("vector store healthy again"),
                }
                was_ok = ok;
            }
            metrics.ready.sink_reachable.store(ok, Ordering::Relaxed);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                _ = stop.changed() => return,
            }
        }
    });
}

/// Starts the metrics server when configured; returns its stop handle.
pub async fn serve_metrics(
    s: &Settings,
    metrics: &Metrics,
    api: Option<&Arc<Api>>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    if s.metrics.addr.is_empty() {
        return Ok(());
    }
    let addr = s.metrics.addr.parse().context("metrics.addr")?;
    let mut stop = stop;
    let bound = metrics::serve(addr, metrics.clone(), api.map(|a| a.router()), async move {
        let _ = stop.changed().await;
    })
    .await
    .with_context(|| format!("metrics.addr = {addr:?} could not be bound; choose a free port"))?;
    if api.is_some() {
        tracing::info!(addr = %bound, "serving /metrics, /healthz, /readyz and the query API (/embed, /v1/embeddings, /search, /info)");
    } else {
        tracing::info!(addr = %bound, "serving /metrics, /healthz, /readyz");
    }
    Ok(())
}

/// The query API's handle when it is on (`api.enabled` and a `metrics.addr`).
fn query_api(s: &Settings, metrics: &Metrics) -> Option<Arc<Api>> {
    (s.api.enabled && !s.metrics.addr.is_empty()).then(|| Api::new(s.api.clone(), metrics.clone()))
}

/// Opens the query endpoints with the loaded model and the open store.
fn open_queries(
    api: Option<&Arc<Api>>,
    s: &Settings,
    tokenizer: &embed::TextTokenizer,
    info: &embed::ModelInfo,
    encoder: &EncoderHandle,
    sink: &Arc<AnySink>,
) {
    let Some(api) = api else { return };
    let searcher = match crate::search::Searcher::new(s, tokenizer) {
        Ok(x) => x,
        Err(e) => {
            tracing::error!(error = %e, "query API not opened");
            return;
        }
    };
    let (store, collection) = match s.sink.kind {
        crate::settings::SinkKind::Embedded => ("embedded", s.embedded.collection.clone()),
        crate::settings::SinkKind::Qdrant => ("qdrant", s.qdrant.collection.clone()),
    };
    api.set_serving(Serving {
        encoder: encoder.clone(),
        tokenizer: tokenizer.clone(),
        info: info.clone(),
        prefix: s.model.prefix.clone(),
        query_prefix: s.model.query_prefix.clone(),
        sink: sink.clone(),
        searcher,
        store: store.into(),
        collection,
    });
    tracing::info!("query API ready");
}

/// What `run` and `serve` both start with.
struct Started {
    documents: Arc<Documents>,
    encoder: EncoderHandle,
    sink: Arc<AnySink>,
}

/// The start `run` and `serve` share: the model loaded and on its thread, the documents'
/// settings checked against it, the store open (waited for while it is not up) and
/// watched, and the query API opened on them. `None` when `shutdown` came first.
async fn start_serving<F: Future<Output = ()>>(
    s: &Settings,
    metrics: &Metrics,
    api: Option<&Arc<Api>>,
    stop_rx: &watch::Receiver<bool>,
    shutdown: &mut std::pin::Pin<&mut F>,
) -> anyhow::Result<Option<Started>> {
    let model = tokio::select! {
        m = load_model(s, metrics, &s.model.prefix) => m?,
        _ = shutdown.as_mut() => return Ok(None),
    };
    let documents = documents(s, &model)?;
    let (tokenizer, info) = (model.tokenizer.clone(), model.info.clone());
    let encoder = EncoderHandle::spawn_with_threads(model.encoder, 2, s.model.compute_threads());
    let sink = {
        let mut stop = stop_rx.clone();
        tokio::select! {
            r = open_sink(s, info.dim, &mut stop) => r?,
            _ = shutdown.as_mut() => return Ok(None),
        }
    };
    metrics.ready.sink_reachable.store(true, Ordering::Relaxed);
    watch_sink(sink.clone(), metrics.clone(), stop_rx.clone());
    open_queries(api, s, &tokenizer, &info, &encoder, &sink);
    Ok(Some(Started {
        documents,
        encoder,
        sink,
    }))
}

/// `streambed serve`: the query API alone (model and store, no Kafka), until `shutdown`.
pub async fn serve(s: Settings, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    anyhow::ensure!(
        !s.metrics.addr.is_empty(),
        "metrics.addr is empty; `serve` answers on that address (e.g. \"127.0.0.1:9464\")"
    );
    anyhow::ensure!(
        s.api.enabled,
        "api.enabled is false; `serve` has nothing else to do: set it to true"
    );
    let metrics = Metrics::new();
    let (stop_tx, stop_rx) = watch::channel(false);
    let api = query_api(&s, &metrics);
    serve_metrics(&s, &metrics, api.as_ref(), stop_rx.clone()).await?;
    tokio::pin!(shutdown);
    // Held until shutdown (the query API holds its own handles too).
    let Some(_started) = start_serving(&s, &metrics, api.as_ref(), &stop_rx, &mut shutdown).await?
    else {
        return Ok(());
    };
    metrics.ready.source_ready.store(true, Ordering::Relaxed);
    shutdown.await;
    let _ = stop_tx.send(true);
    Ok(())
}

pub async fn run(s: Settings, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    run_with_metrics(s, Metrics::new(), shutdown).await
}

/// [`run`] with the caller's metrics, so a benchmark can watch the counters in process.
pub async fn run_with_metrics(
    s: Settings,
    metrics: Metrics,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let api = query_api(&s, &metrics);
    serve_metrics(&s, &metrics, api.as_ref(), stop_rx.clone()).await?;
    tokio::pin!(shutdown);

    let Some(Started {
        documents,
        encoder,
        sink,
    }) = start_serving(&s, &metrics, api.as_ref(), &stop_rx, &mut shutdown).await?
    else {
        return Ok(());
    };

    let tracker = Arc::new(Mutex::new(OffsetTracker::new()));
    let drain = Duration::from_millis(s.shutdown.deadline_ms);
    let consumer = kafka::consumer(&s.kafka, tracker.clone(), metrics.clone(), drain)
        .context("kafka: the consumer could not be created")?;
    let producer = kafka::producer(&s.kafka).context("kafka: the producer could not be created")?;
    let mut pipe = pipeline::start(
        pipeline_config(&s),
        documents,
        encoder,
        sink,
        Arc::new(kafka::KafkaDeadLetters {
            producer,
            topic: s.kafka.dead_letter_topic.clone(),
        }),
        Arc::new(kafka::KafkaCompletion {
            consumer: consumer.clone(),
            tracker: tracker.clone(),
            metrics: metrics.clone(),
        }),
        metrics.clone(),
    );
    let mut reader = tokio::spawn(kafka::read_loop(
        consumer.clone(),
        tracker.clone(),
        s.message.clone(),
        pipe.input,
        metrics.clone(),
        stop_rx.clone(),
    ));
    tracing::info!(topics = ?s.kafka.topics, group = %s.kafka.group_id, "consuming");
    // Whatever ends the run first: a shutdown request, the reader stopping (a fatal Kafka
    // error, or the pipeline closed under it), or a pipeline stage dying.
    let mut failure: Option<anyhow::Error> = None;
    let mut pipeline_result = None;
    let mut reader_done = false;
    tokio::select! {
        _ = &mut shutdown => tracing::info!("shutdown requested: draining"),
        r = &mut reader => {
            reader_done = true;
            match r {
                Ok(Ok(())) => tracing::warn!("reader stopped"),
                Ok(Err(e)) => failure = Some(anyhow::anyhow!(e)),
                Err(e) => failure = Some(anyhow::anyhow!("the Kafka reader panicked: {e}")),
            }
        }
        r = &mut pipe.finished => pipeline_result = Some(r),
    }
    if let Some(why) = &failure {
        metrics.ready.fail(&why.to_string());
    }
    // One deadline for the whole shutdown: drain, final commit, leaving the group.
    let deadline = tokio::time::Instant::now() + drain;
    consumer
        .context()
        .set_shutdown_deadline(deadline.into_std());
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout_at(deadline, async {
        if !reader_done {
            let _ = (&mut reader).await;
        }
        if pipeline_result.is_none() {
            pipeline_result = Some((&mut pipe.finished).await);
        }
    })
    .await
    .is_ok();
    match pipeline_result {
        Some(Ok(Ok(()))) | None => {}
        Some(Ok(Err(e))) => {
            failure.get_or_insert(anyhow::anyhow!(e));
        }
        Some(Err(e)) => {
            failure.get_or_insert(anyhow::anyhow!("the pipeline panicked: {e}"));
        }
    }
    if let Some(why) = &failure {
        tracing::error!(error = %why, "the worker cannot go on; finished work is committed, the rest will be replayed");
    }
    let in_flight = tracker.lock().map(|t| t.total_in_flight()).unwrap_or(0);
    if !drained {
        tracing::warn!(
            deadline_ms = s.shutdown.deadline_ms,
            in_flight,
            "drain deadline passed; unfinished work will be replayed"
        );
    }
    // The final commit and leaving the group block (and leaving runs the revoke callback,
    // bounded by the same deadline); they run off the async workers.
    let closing = {
        let consumer = consumer.clone();
        tokio::task::spawn_blocking(move || {
            let committed = consumer.commit_consumer_state(CommitMode::Sync);
            consumer.context().note_commit(&committed);
            match committed {
                Ok(()) => tracing::info!("final offsets committed"),
                Err(e) => {
                    tracing::info!(error = %e, "final commit (nothing new to commit is normal)")
                }
            }
            consumer.unsubscribe();
        })
    };
    let context = consumer.context().clone();
    drop(consumer);
    let mut closed = tokio::time::timeout_at(deadline + Duration::from_millis(500), closing)
        .await
        .is_ok();
    let in_flight = tracker.lock().map(|t| t.total_in_flight()).unwrap_or(0);
    if drained && !closed && in_flight == 0 && context.offsets_settled() {
        // Only leaving the group is left, and it costs nothing: a leave that meets a
        // rebalance in progress can wait on the broker for as long as the rebalance
        // (seen: past a 20 s deadline, with every record stored and every offset
        // committed). The broker drops this member after session.timeout.ms.
        tracing::warn!(
            deadline_ms = s.shutdown.deadline_ms,
            "leaving the consumer group did not finish by the deadline (a rebalance in \
             progress); every record is stored and every offset committed, so the broker \
             will drop this member after session.timeout.ms"
        );
        closed = true;
    }
    tracing::info!(in_flight, "stopped");
    if let Some(why) = failure {
        return Err(why);
    }
    if !drained || !closed {
        anyhow::bail!(
            "shutdown.deadline_ms = {} passed before the drain and final commit finished; \
             {in_flight} unfinished records will be replayed (raise shutdown.deadline_ms)",
            s.shutdown.deadline_ms
        );
    }
    Ok(())
}
