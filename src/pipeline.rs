//! The stages between a source and the store:
//!
//! ```text
//! source ─► batcher (tokenise) ─► embedder (encoder thread) ─► writer (store, dead letters) ─► completion
//! ```
//!
//! Items are tokenised as they arrive and the model takes the waiting batch the moment it
//! is free (continuous batching), so while the model runs on batch k, batch k+1 is being
//! tokenised and filled and batch k-1 is written; every hand-over is bounded, so a slow
//! stage stops the ones before it.
//! Completion (offset commit, backfill checkpoint) is reported only after the store
//! confirmed the write and every dead letter was delivered.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use rand::Rng;
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::embed::worker::EncoderHandle;
use crate::embed::TextTokenizer;
use crate::metrics::Metrics;
use crate::sink::{Point, Sink, SinkError};
use crate::source::decode::Rejection;

/// Where an item came from, so its completion can be reported back.
#[derive(Debug, Clone)]
pub enum Origin {
    Kafka {
        topic: Arc<str>,
        partition: i32,
        offset: i64,
        generation: u64,
    },
    File {
        file: Arc<str>,
        line: u64,
    },
}

impl Origin {
    /// (topic or file, partition or -1, offset or line) for dead-letter headers and logs.
    pub fn describe(&self) -> (&str, i32, i64) {
        match self {
            Origin::Kafka {
                topic,
                partition,
                offset,
                ..
            } => (topic, *partition, *offset),
            Origin::File { file, line } => (file, -1, *line as i64),
        }
    }
}

/// What to do with an item.
#[derive(Debug, Clone)]
pub enum Op {
    Upsert {
        id: Uuid,
        text: String,
        payload: Map<String, Value>,
    },
    Delete {
        id: Uuid,
    },
    Reject {
        rejection: Rejection,
        key: Option<Vec<u8>>,
        value: Option<Vec<u8>>,
    },
}

#[derive(Debug, Clone)]
pub struct Item {
    pub origin: Origin,
    pub op: Op,
    /// The record's key, kept for the dead letter should the text fail to tokenise.
    pub key: Option<Vec<u8>>,
    /// Event time (Kafka timestamp), for end-to-end latency.
    pub timestamp_ms: Option<i64>,
}

/// Told when items are finished (written, deleted or dead-lettered).
pub trait Completion: Send + Sync + 'static {
    fn done(&self, origins: &[Origin]);
}

/// Receives items that cannot be embedded. `Ok` means durably delivered.
pub trait DeadLetters: Send + Sync + 'static {
    fn send<'a>(
        &'a self,
        origin: &'a Origin,
        rejection: &'a Rejection,
        key: Option<&'a [u8]>,
        value: Option<&'a [u8]>,
    ) -> BoxFuture<'a, Result<(), String>>;
}

#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub max_items: usize,
    pub max_tokens: usize,
    pub linger: Duration,
    pub retry_initial: Duration,
    pub retry_max: Duration,
}

struct Prepared {
    item: Item,
    /// `None`: nothing to embed (a delete or a rejection). The embedder moves the ids out
    /// and leaves `Some` of an empty vector.
    tokens: Option<Vec<u32>>,
}

struct Batch {
    items: Vec<Prepared>,
}

struct Embedded {
    items: Vec<Prepared>,
    vectors: Vec<Vec<f32>>,
}

/// A running pipeline: send items into `input`; drop it to drain and stop; `finished`
/// resolves when the last batch was written and completed.
pub struct Pipeline {
    pub input: mpsc::Sender<Item>,
    pub finished: JoinHandle<()>,
}

#[allow(clippy::too_many_arguments)]
pub fn start<S: Sink>(
    cfg: PipelineConfig,
    tokenizer: TextTokenizer,
    encoder: EncoderHandle,
    sink: Arc<S>,
    dead_letters: Arc<dyn DeadLetters>,
    completion: Arc<dyn Completion>,
    metrics: Metrics,
) -> Pipeline {
    // Room for two batches, so the next batch is already waiting when one closes.
    let (input, items_rx) = mpsc::channel::<Item>(2 * cfg.max_items.max(1));
    let (request_tx, request_rx) = mpsc::channel::<Request>(1);
    let (emb_tx, emb_rx) = mpsc::channel::<Embedded>(1);
    let batcher = tokio::spawn(batcher(
        cfg.clone(),
        tokenizer,
        items_rx,
        request_rx,
        metrics.clone(),
    ));
    let embedder = tokio::spawn(embedder(encoder, request_tx, emb_tx, metrics.clone()));
    let writer = tokio::spawn(writer(cfg, sink, dead_letters, completion, emb_rx, metrics));
    let finished = tokio::spawn(async move {
        for (name, h) in [
            ("batcher", batcher),
            ("embedder", embedder),
            ("writer", writer),
        ] {
            if let Err(e) = h.await {
                tracing::error!(stage = name, error = %e, "pipeline stage failed");
            }
        }
    });
    Pipeline { input, finished }
}

fn prepare(item: Item, tokenizer: &TextTokenizer, metrics: &Metrics) -> Prepared {
    let Op::Upsert { text, .. } = &item.op else {
        return Prepared { item, tokens: None };
    };
    match tokenizer.tokenize(text) {
        Ok(t) => {
            if t.truncated {
                metrics.truncated.inc();
            }
            Prepared {
                item,
                tokens: Some(t.ids),
            }
        }
        Err(e) => {
            let value = match &item.op {
                Op::Upsert { text, .. } => Some(text.as_bytes().to_vec()),
                _ => None,
            };
            Prepared {
                item: Item {
                    op: Op::Reject {
                        rejection: Rejection::new(e.reason(), e.to_string()),
                        key: item.key.clone(),
                        value,
                    },
                    ..item
                },
                tokens: None,
            }
        }
    }
}

/// The embedder's request for its next batch: answered with a batch as soon as one is due.
type Request = oneshot::Sender<Batch>;

/// The batch being filled.
#[derive(Default)]
struct Filling {
    items: Vec<Prepared>,
    /// Texts in `items` (deletes and rejects need no model).
    texts: usize,
    longest: usize,
    first_at: Option<tokio::time::Instant>,
    tokenize: Duration,
    /// The item that did not fit the token budget; it opens the next batch.
    carry: Option<Prepared>,
}

impl Filling {
    fn add(&mut self, p: Prepared, max_tokens: usize) {
        if let Some(t) = &p.tokens {
            let l = self.longest.max(t.len());
            if self.texts > 0 && (self.texts + 1) * l > max_tokens {
                self.carry = Some(p);
                return;
            }
            self.longest = l;
            self.texts += 1;
        }
        self.first_at.get_or_insert_with(tokio::time::Instant::now);
        self.items.push(p);
    }

    fn is_full(&self, max_items: usize) -> bool {
        self.carry.is_some() || self.items.len() >= max_items
    }

    /// Hands the batch over and starts the next with the carried item, if any.
    fn take(&mut self, max_tokens: usize, metrics: &Metrics) -> Batch {
        metrics
            .stage_seconds
            .with_label_values(&["tokenize"])
            .observe(self.tokenize.as_secs_f64());
        if self.texts > 0 {
            metrics.batch_size.observe(self.texts as f64);
            metrics
                .batch_padded_tokens
                .observe((self.texts * self.longest) as f64);
        }
        let carry = self.carry.take();
        let batch = Batch {
            items: std::mem::take(&mut self.items),
        };
        *self = Filling::default();
        if let Some(p) = carry {
            self.add(p, max_tokens);
        }
        batch
    }
}

/// Continuous batching, as text-embeddings-inference does it: items are tokenised as they
/// arrive, and the batch goes to the model the moment the model asks for work. While the
/// model is busy the batch grows, up to `max_items` or the padded-token budget (items ×
/// longest). So under load batches are full, and under light load nothing waits for a
/// timer. `linger` lets the first item of a batch wait that long for company when the model
/// is idle (0 by default).
async fn batcher(
    cfg: PipelineConfig,
    tokenizer: TextTokenizer,
    mut rx: mpsc::Receiver<Item>,
    mut requests: mpsc::Receiver<Request>,
    metrics: Metrics,
) {
    let mut filling = Filling::default();
    let mut waiting: Option<Request> = None;
    let mut input_open = true;
    loop {
        let full = filling.is_full(cfg.max_items);
        let lingered = filling
            .first_at
            .is_some_and(|t| t + cfg.linger <= tokio::time::Instant::now());
        if !filling.items.is_empty() && (full || !input_open || lingered) {
            if let Some(req) = waiting.take() {
                if req.send(filling.take(cfg.max_tokens, &metrics)).is_err() {
                    return;
                }
                continue;
            }
        }
        if !input_open && filling.items.is_empty() && filling.carry.is_none() {
            return;
        }
        let linger_until = filling.first_at.map(|t| t + cfg.linger);
        tokio::select! {
            biased;
            req = requests.recv(), if waiting.is_none() => match req {
                Some(r) => waiting = Some(r),
                None => return,
            },
            item = rx.recv(), if input_open && !full => match item {
                Some(item) => {
                    let started = Instant::now();
                    let p = prepare(item, &tokenizer, &metrics);
                    filling.tokenize += started.elapsed();
                    filling.add(p, cfg.max_tokens);
                }
                None => input_open = false,
            },
            _ = tokio::time::sleep_until(linger_until.unwrap_or_else(tokio::time::Instant::now)),
                if waiting.is_some() && linger_until.is_some() && !lingered => {}
        }
    }
}

async fn embedder(
    encoder: EncoderHandle,
    requests: mpsc::Sender<Request>,
    tx: mpsc::Sender<Embedded>,
    metrics: Metrics,
) {
    loop {
        let (ask, answer) = oneshot::channel();
        if requests.send(ask).await.is_err() {
            return;
        }
        let Ok(mut batch) = answer.await else { return };
        // The ids move to the encoder thread; `Some(empty)` stays behind to tell the writer
        // which items have a vector.
        let seqs: Vec<Vec<u32>> = batch
            .items
            .iter_mut()
            .filter_map(|p| p.tokens.as_mut().map(std::mem::take))
            .collect();
        let vectors = if seqs.is_empty() {
            Vec::new()
        } else {
            let n = seqs.len();
            match encoder.embed(seqs).await {
                Ok((v, took)) => {
                    metrics
                        .stage_seconds
                        .with_label_values(&["embed"])
                        .observe(took.as_secs_f64());
                    metrics.embedded.inc_by(n as u64);
                    metrics.batches.inc();
                    v
                }
                Err(e) => {
                    // The model itself failed: nothing of this batch may be committed.
                    tracing::error!(error = %e, "encoder failed; stopping the pipeline");
                    return;
                }
            }
        };
        if tx
            .send(Embedded {
                items: batch.items,
                vectors,
            })
            .await
            .is_err()
        {
            return;
        }
    }
}

fn backoff(cfg: &PipelineConfig, attempt: u32) -> Duration {
    let base = cfg
        .retry_initial
        .saturating_mul(1u32 << attempt.min(16))
        .min(cfg.retry_max);
    // Full jitter over the upper half, so replicas do not retry in lockstep.
    let ms = base.as_millis() as u64;
    Duration::from_millis(rand::rng().random_range(ms / 2..=ms.max(1)))
}

async fn writer<S: Sink>(
    cfg: PipelineConfig,
    sink: Arc<S>,
    dead_letters: Arc<dyn DeadLetters>,
    completion: Arc<dyn Completion>,
    mut rx: mpsc::Receiver<Embedded>,
    metrics: Metrics,
) {
    while let Some(batch) = rx.recv().await {
        let started = Instant::now();
        let mut vectors = batch.vectors.into_iter();
        // Last operation per id wins, as it would have if applied one by one.
        let mut last: HashMap<Uuid, Option<Point>> = HashMap::new();
        let mut origins = Vec::with_capacity(batch.items.len());
        let mut rejected = Vec::new();
        let mut stamps = Vec::new();
        for p in batch.items {
            match p.item.op {
                Op::Upsert { id, payload, .. } if p.tokens.is_some() => {
                    let vector = vectors.next().expect("one vector per tokenised item");
                    last.insert(
                        id,
                        Some(Point {
                            id,
                            vector,
                            payload,
                        }),
                    );
                    if let Some(ts) = p.item.timestamp_ms {
                        stamps.push(ts);
                    }
                }
                Op::Upsert { .. } => unreachable!("untokenised upserts become rejections"),
                Op::Delete { id } => {
                    last.insert(id, None);
                }
                Op::Reject {
                    rejection,
                    key,
                    value,
                } => rejected.push((p.item.origin.clone(), rejection, key, value)),
            }
            origins.push(p.item.origin);
        }
        // Dead letters go out all at once (each a broker round trip), alongside the store
        // write below; completion waits for both.
        let dead_lettering = futures::future::join_all(rejected.iter().map(
            |(origin, rejection, key, value)| async {
                let mut attempt = 0;
                while let Err(e) = dead_letters
                    .send(origin, rejection, key.as_deref(), value.as_deref())
                    .await
                {
                    tracing::warn!(error = %e, attempt, "dead-letter delivery failed; retrying");
                    tokio::time::sleep(backoff(&cfg, attempt)).await;
                    attempt += 1;
                }
                metrics
                    .dead_lettered
                    .with_label_values(&[rejection.reason])
                    .inc();
            },
        ));
        let mut upserts = Vec::new();
        let mut deletes = Vec::new();
        for (id, op) in last {
            match op {
                Some(p) => upserts.push(p),
                None => deletes.push(id),
            }
        }
        let (n_up, n_del) = (upserts.len(), deletes.len());
        let writing = async {
            if n_up + n_del == 0 {
                return;
            }
            let mut attempt = 0;
            loop {
                match sink.write(upserts.clone(), deletes.clone()).await {
                    Ok(()) => {
                        metrics
                            .ready
                            .sink_ok
                            .store(true, std::sync::atomic::Ordering::Relaxed);
                        break;
                    }
                    Err(e) => {
                        metrics
                            .ready
                            .sink_ok
                            .store(false, std::sync::atomic::Ordering::Relaxed);
                        metrics.sink_retries.inc();
                        let level_permanent = matches!(e, SinkError::Permanent(_));
                        if level_permanent {
                            tracing::error!(error = %e, attempt, "store refused the write; retrying, nothing is committed meanwhile");
                        } else {
                            tracing::warn!(error = %e, attempt, "store write failed; retrying");
                        }
                        tokio::time::sleep(backoff(&cfg, attempt)).await;
                        attempt += 1;
                    }
                }
            }
        };
        tokio::join!(dead_lettering, writing);
        metrics.upserted.inc_by(n_up as u64);
        metrics.deleted.inc_by(n_del as u64);
        metrics
            .stage_seconds
            .with_label_values(&["upsert"])
            .observe(started.elapsed().as_secs_f64());
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let mut samples = metrics.latency_samples.lock().expect("samples");
        for ts in stamps {
            let seconds = ((now_ms - ts).max(0)) as f64 / 1000.0;
            metrics.end_to_end_seconds.observe(seconds);
            if let Some(s) = samples.as_mut() {
                s.push(seconds);
            }
        }
        drop(samples);
        completion.done(&origins);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embed::{EmbedError, Encoder};
    use crate::sink::Hit;
    use std::sync::Mutex;

    struct LenEncoder;
    impl Encoder for LenEncoder {
        fn dim(&self) -> usize {
            2
        }
        fn embed(&self, batch: &[&[u32]]) -> Result<Vec<Vec<f32>>, EmbedError> {
            Ok(batch.iter().map(|s| vec![s.len() as f32, 1.0]).collect())
        }
    }

    /// Fails the first `fail` writes, then records what it is given.
    #[derive(Default)]
    struct FakeSink {
        fail: Mutex<usize>,
        points: Mutex<HashMap<Uuid, Point>>,
        writes: Mutex<usize>,
    }
    impl Sink for FakeSink {
        async fn ensure_collection(&self, _: usize) -> Result<(), SinkError> {
            Ok(())
        }
        async fn write(&self, up: Vec<Point>, del: Vec<Uuid>) -> Result<(), SinkError> {
            {
                let mut f = self.fail.lock().unwrap();
                if *f > 0 {
                    *f -= 1;
                    return Err(SinkError::Transient("down".into()));
                }
            }
            *self.writes.lock().unwrap() += 1;
            let mut pts = self.points.lock().unwrap();
            for p in up {
                pts.insert(p.id, p);
            }
            for d in del {
                pts.remove(&d);
            }
            Ok(())
        }
        async fn search(&self, _: Vec<f32>, _: usize) -> Result<Vec<Hit>, SinkError> {
            Ok(vec![])
        }
        async fn retrieve(&self, _: Vec<Uuid>) -> Result<Vec<Hit>, SinkError> {
            Ok(vec![])
        }
        async fn count(&self) -> Result<usize, SinkError> {
            Ok(self.points.lock().unwrap().len())
        }
        async fn ping(&self) -> Result<(), SinkError> {
            Ok(())
        }
    }

    #[derive(Default)]
    struct Record(Mutex<Vec<i64>>);
    impl Completion for Record {
        fn done(&self, origins: &[Origin]) {
            self.0
                .lock()
                .unwrap()
                .extend(origins.iter().map(|o| o.describe().2));
        }
    }
    #[derive(Default)]
    struct DeadList(Mutex<Vec<&'static str>>);
    impl DeadLetters for DeadList {
        fn send<'a>(
            &'a self,
            _: &'a Origin,
            r: &'a Rejection,
            _: Option<&'a [u8]>,
            _: Option<&'a [u8]>,
        ) -> BoxFuture<'a, Result<(), String>> {
            self.0.lock().unwrap().push(r.reason);
            Box::pin(async { Ok(()) })
        }
    }

    fn tokenizer() -> TextTokenizer {
        // A tiny WordPiece vocabulary is enough to drive the pipeline logic.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("vocab.txt"),
            "[PAD]\n[UNK]\n[CLS]\n[SEP]\n안녕\n하세요\n##하세요\n",
        )
        .unwrap();
        TextTokenizer::load(dir.path(), 16, "").unwrap()
    }

    fn item(offset: i64, op: Op) -> Item {
        Item {
            origin: Origin::Kafka {
                topic: "t".into(),
                partition: 0,
                offset,
                generation: 1,
            },
            op,
            key: None,
            timestamp_ms: None,
        }
    }

    fn upsert(id: u128, text: &str) -> Op {
        Op::Upsert {
            id: Uuid::from_u128(id),
            text: text.into(),
            payload: Map::new(),
        }
    }

    fn cfg() -> PipelineConfig {
        PipelineConfig {
            max_items: 4,
            max_tokens: 1024,
            linger: Duration::from_millis(50),
            retry_initial: Duration::from_millis(10),
            retry_max: Duration::from_millis(40),
        }
    }

    /// Waits for a condition with a deadline (the encoder runs on a real thread, so these
    /// tests use real time).
    async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn writes_deletes_dead_letters_and_retries_before_completing() {
        let sink = Arc::new(FakeSink {
            fail: Mutex::new(3),
            ..Default::default()
        });
        let done = Arc::new(Record::default());
        let dead = Arc::new(DeadList::default());
        let p = start(
            cfg(),
            tokenizer(),
            EncoderHandle::spawn(LenEncoder, 1),
            sink.clone(),
            dead.clone(),
            done.clone(),
            Metrics::new(),
        );
        p.input
            .send(item(0, upsert(1, "안녕하세요")))
            .await
            .unwrap();
        p.input.send(item(1, upsert(2, "안녕"))).await.unwrap();
        p.input.send(item(2, upsert(3, "   "))).await.unwrap();
        p.input
            .send(item(
                3,
                Op::Delete {
                    id: Uuid::from_u128(1),
                },
            ))
            .await
            .unwrap();
        p.input.send(item(4, upsert(4, "안녕"))).await.unwrap();
        drop(p.input);
        p.finished.await.unwrap();
        let points = sink.points.lock().unwrap();
        assert!(
            !points.contains_key(&Uuid::from_u128(1)),
            "deleted after upsert"
        );
        assert!(points.contains_key(&Uuid::from_u128(2)));
        assert!(points.contains_key(&Uuid::from_u128(4)));
        assert_eq!(*dead.0.lock().unwrap(), vec!["empty_text"]);
        assert_eq!(*done.0.lock().unwrap(), vec![0, 1, 2, 3, 4]);
        assert_eq!(
            *sink.fail.lock().unwrap(),
            0,
            "the failed writes were retried"
        );
    }

    #[tokio::test]
    async fn nothing_completes_while_the_store_is_down() {
        let sink = Arc::new(FakeSink {
            fail: Mutex::new(usize::MAX),
            ..Default::default()
        });
        let done = Arc::new(Record::default());
        let p = start(
            cfg(),
            tokenizer(),
            EncoderHandle::spawn(LenEncoder, 1),
            sink.clone(),
            Arc::new(DeadList::default()),
            done.clone(),
            Metrics::new(),
        );
        p.input.send(item(0, upsert(1, "안녕"))).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(done.0.lock().unwrap().is_empty());
        *sink.fail.lock().unwrap() = 0;
        wait_for("completion after recovery", || {
            !done.0.lock().unwrap().is_empty()
        })
        .await;
        assert_eq!(*done.0.lock().unwrap(), vec![0]);
    }

    #[tokio::test]
    async fn batches_close_on_items_and_linger() {
        let sink = Arc::new(FakeSink::default());
        let done = Arc::new(Record::default());
        let p = start(
            cfg(),
            tokenizer(),
            EncoderHandle::spawn(LenEncoder, 1),
            sink.clone(),
            Arc::new(DeadList::default()),
            done.clone(),
            Metrics::new(),
        );
        for i in 0..5 {
            p.input
                .send(item(i, upsert(i as u128, "안녕")))
                .await
                .unwrap();
        }
        // 4 close at max_items; the fifth waits for linger, then goes alone.
        wait_for("all five", || done.0.lock().unwrap().len() == 5).await;
        assert_eq!(*sink.writes.lock().unwrap(), 2);
    }
}
