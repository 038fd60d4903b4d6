//! The stages between a source and the store:
//!
//! ```text
//! source ─► preparer (unchanged? chunk, tokenise) ─► batcher ─► embedder (encoder thread) ─► writer (store, dead letters) ─► completion
//! ```
//!
//! Items are tokenised as they arrive and the model takes the waiting batch the moment it
//! is free (continuous batching), so while the model runs on batch k, batch k+1 is being
//! tokenised and filled and batch k-1 is written; every hand-over is bounded, so a slow
//! stage stops the ones before it.
//! Completion (offset commit, backfill checkpoint) is reported only after the store
//! confirmed the write and every dead letter was delivered.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use rand::Rng;
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::document::{CharCursor, Documents, Plan};
use crate::embed::worker::EncoderHandle;
use crate::metrics::Metrics;
use crate::sink::{fields, ChunkRange, Point, Sink, SinkError, SparseVector, Write};
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
    },
    /// The store already holds this content (set by the preparer, never by a source).
    Unchanged,
}

#[derive(Debug, Clone)]
pub struct Item {
    pub origin: Origin,
    pub op: Op,
    /// The record's key and value as they arrived: whatever stage rejects the item, its
    /// dead letter carries these, never something derived from them.
    pub key: Option<Vec<u8>>,
    /// Shared: every chunk of a document refers to its message's bytes.
    pub value: Option<Arc<[u8]>>,
    /// Event time (Kafka timestamp), for end-to-end latency.
    pub timestamp_ms: Option<i64>,
}

/// Held while a store write (or dead letter) for some origins is in flight; `owned[i]`
/// says whether origin i still belongs to this worker. A source that fences (Kafka: a
/// revoked partition) refuses to release a revoke until every hold on its partitions
/// is dropped, so once a revoke returns no item of the old assignment reaches the store.
pub struct Hold {
    pub owned: Vec<bool>,
    release: Option<Box<dyn FnOnce() + Send>>,
}

impl Hold {
    pub fn all_owned(n: usize) -> Self {
        Self {
            owned: vec![true; n],
            release: None,
        }
    }

    pub fn new(owned: Vec<bool>, release: impl FnOnce() + Send + 'static) -> Self {
        Self {
            owned,
            release: Some(Box::new(release)),
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if let Some(f) = self.release.take() {
            f();
        }
    }
}

/// Told when items are finished (written, deleted or dead-lettered).
pub trait Completion: Send + Sync + 'static {
    fn done(&self, origins: &[Origin]);
    /// Which of `origins` are still this worker's to write; see [`Hold`]. Files always are.
    fn hold(&self, origins: &[&Origin]) -> Hold {
        Hold::all_owned(origins.len())
    }
}

/// Why a dead letter could not be delivered.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DeliveryError {
    /// Worth retrying (broker unreachable, leader moving).
    #[error("{0}")]
    Transient(String),
    /// The destination refuses (not authorised, topic invalid, disk full): stop.
    #[error("{0}")]
    Permanent(String),
}

/// Receives items that cannot be embedded or stored. `Ok` means durably delivered.
pub trait DeadLetters: Send + Sync + 'static {
    fn send<'a>(
        &'a self,
        origin: &'a Origin,
        rejection: &'a Rejection,
        key: Option<&'a [u8]>,
        value: Option<&'a [u8]>,
    ) -> BoxFuture<'a, Result<(), DeliveryError>>;
}

/// Why the pipeline stopped before its input ended. The process must not go on (or exit
/// 0) after one of these: nothing of the failed batch was committed, and it is replayed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PipelineError {
    #[error("the encoder failed: {0}")]
    Encoder(String),
    #[error("the vector store refuses the work: {0}")]
    Store(String),
    #[error("dead letters cannot be delivered: {0}")]
    DeadLetters(String),
    #[error("pipeline stage {0} panicked: {1}")]
    Panicked(&'static str, String),
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
    /// The point's lexical vector, where the collection has them.
    sparse: Option<SparseVector>,
    /// The document this item writes or deletes; it counts as in flight until its
    /// message's last item is finished.
    document: Option<Uuid>,
    /// The message's number in this pipeline (a document's chunks share it).
    message: u64,
    /// The last item of its message: the message is finished (and its completion
    /// reported) with this one.
    ends_message: bool,
    /// On a document's first chunk, written last: its chunk count (chunks from it on are
    /// stale and deleted before it is written).
    chunk_count: Option<u32>,
}

impl Prepared {
    fn whole(item: Item, message: u64) -> Self {
        Prepared {
            item,
            tokens: None,
            sparse: None,
            document: None,
            message,
            ends_message: true,
            chunk_count: None,
        }
    }
}

/// Documents between the preparer and the end of the writer, so that an unchanged-content
/// check never trusts a store that a write in flight is about to change.
#[derive(Default)]
struct InFlight(std::sync::Mutex<HashMap<Uuid, u32>>);

impl InFlight {
    fn add(&self, d: Uuid) {
        *self.0.lock().expect("in flight").entry(d).or_default() += 1;
    }
    fn finish(&self, d: Uuid) {
        let mut m = self.0.lock().expect("in flight");
        if let Some(n) = m.get_mut(&d) {
            *n -= 1;
            if *n == 0 {
                m.remove(&d);
            }
        }
    }
    fn contains(&self, d: &Uuid) -> bool {
        self.0.lock().expect("in flight").contains_key(d)
    }
}

struct Batch {
    items: Vec<Prepared>,
}

struct Embedded {
    items: Vec<Prepared>,
    vectors: Vec<Vec<f32>>,
}

/// A running pipeline: send items into `input`; drop it to drain and stop; `finished`
/// resolves when the last batch was written and completed, or with the error that
/// stopped a stage (which also turns `/readyz` to 503 at once).
pub struct Pipeline {
    pub input: mpsc::Sender<Item>,
    pub finished: JoinHandle<Result<(), PipelineError>>,
}

#[allow(clippy::too_many_arguments)]
pub fn start<S: Sink>(
    cfg: PipelineConfig,
    documents: Arc<Documents>,
    encoder: EncoderHandle,
    sink: Arc<S>,
    dead_letters: Arc<dyn DeadLetters>,
    completion: Arc<dyn Completion>,
    metrics: Metrics,
) -> Pipeline {
    // Room for two batches, so the next batch is already waiting when one closes.
    let (input, items_rx) = mpsc::channel::<Item>(2 * cfg.max_items.max(1));
    let (prepared_tx, prepared_rx) = mpsc::channel::<Prepared>(2 * cfg.max_items.max(1));
    let (request_tx, request_rx) = mpsc::channel::<Request>(1);
    let (emb_tx, emb_rx) = mpsc::channel::<Embedded>(1);
    let in_flight = Arc::new(InFlight::default());
    let preparer = tokio::spawn(
        Preparer {
            documents,
            sink: sink.clone(),
            in_flight: in_flight.clone(),
            metrics: metrics.clone(),
            group: cfg.max_items.max(1),
            next_message: 0,
        }
        .run(items_rx, prepared_tx),
    );
    let batcher = tokio::spawn(batcher(
        cfg.clone(),
        prepared_rx,
        request_rx,
        metrics.clone(),
    ));
    let embedder = tokio::spawn(embedder(encoder, request_tx, emb_tx, metrics.clone()));
    let writer = tokio::spawn(
        Writer {
            cfg,
            sink,
            dead_letters,
            completion,
            in_flight,
            metrics: metrics.clone(),
        }
        .run(emb_rx),
    );
    let finished = tokio::spawn(async move {
        let mut first_error = None;
        for (name, h) in [
            ("preparer", preparer),
            ("batcher", batcher),
            ("embedder", embedder),
            ("writer", writer),
        ] {
            let r = match h.await {
                Ok(r) => r,
                Err(e) => Err(PipelineError::Panicked(name, e.to_string())),
            };
            if let Err(e) = r {
                metrics.ready.fail(&e.to_string());
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    });
    Pipeline { input, finished }
}

/// The first stage: decides for each message whether it needs embedding at all (its
/// content already in the store), cuts documents into chunks and tokenises them. A
/// document's chunks go out one by one into the bounded channel, so a 10 MB document
/// flows through the same small batches as everything else.
struct Preparer<S> {
    documents: Arc<Documents>,
    sink: Arc<S>,
    in_flight: Arc<InFlight>,
    metrics: Metrics,
    /// Messages looked up in the store at once.
    group: usize,
    next_message: u64,
}

/// Big texts are chunked off the async worker threads.
const BLOCKING_TEXT_BYTES: usize = 16 * 1024;

impl<S: Sink> Preparer<S> {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Item>,
        tx: mpsc::Sender<Prepared>,
    ) -> Result<(), PipelineError> {
        loop {
            // A batcher that stopped closes `tx`: stop too, so the source sees it.
            let first = tokio::select! {
                item = rx.recv() => match item {
                    Some(item) => item,
                    None => return Ok(()),
                },
                _ = tx.closed() => return Ok(()),
            };
            let mut group = vec![first];
            while group.len() < self.group {
                match rx.try_recv() {
                    Ok(item) => group.push(item),
                    Err(_) => break,
                }
            }
            let started = Instant::now();
            let hashes: Vec<Option<String>> = group
                .iter()
                .map(|item| match &item.op {
                    Op::Upsert { text, payload, .. } => {
                        Some(self.documents.content_hash(text, payload))
                    }
                    _ => None,
                })
                .collect();
            let (stored, busy) = self.stored_hashes(&group).await;
            for (item, hash) in group.into_iter().zip(hashes) {
                let unchanged = match (&item.op, &hash) {
                    (Op::Upsert { id, .. }, Some(h)) => {
                        !busy.contains(id)
                            && !self.in_flight.contains(id)
                            && stored.get(id) == Some(h)
                    }
                    _ => false,
                };
                let message = self.next_message;
                self.next_message += 1;
                let sent = if unchanged {
                    self.metrics.unchanged.inc();
                    let item = Item {
                        op: Op::Unchanged,
                        ..item
                    };
                    tx.send(Prepared::whole(item, message)).await.is_ok()
                } else {
                    self.prepare(item, hash, message, &tx).await
                };
                if !sent {
                    // The batcher stopped; whoever stopped reports why.
                    return Ok(());
                }
            }
            self.metrics
                .stage_seconds
                .with_label_values(&["tokenize"])
                .observe(started.elapsed().as_secs_f64());
        }
    }

    /// The content hashes the store holds for the group's documents, and the documents
    /// that were in flight when it was asked (what the store says of those may be about to
    /// change). A failed lookup skips nothing: the work is done again, never lost.
    async fn stored_hashes(&self, group: &[Item]) -> (HashMap<Uuid, String>, HashSet<Uuid>) {
        if !self.documents.skip_unchanged {
            return Default::default();
        }
        let mut busy = HashSet::new();
        let mut ids = Vec::new();
        for item in group {
            if let Op::Upsert { id, .. } = &item.op {
                if self.in_flight.contains(id) {
                    busy.insert(*id);
                } else {
                    ids.push(*id);
                }
            }
        }
        if ids.is_empty() {
            return (HashMap::new(), busy);
        }
        match self.sink.retrieve(ids, false).await {
            Ok(hits) => {
                let stored = hits
                    .into_iter()
                    .filter_map(|h| {
                        let id = h.id.parse::<Uuid>().ok()?;
                        let hash = h.payload.get(fields::CONTENT_HASH)?.as_str()?.to_string();
                        Some((id, hash))
                    })
                    .collect();
                (stored, busy)
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not look up stored documents; embedding them again");
                (HashMap::new(), busy)
            }
        }
    }

    /// Sends the items of one message; false when the batcher is gone.
    async fn prepare(
        &self,
        item: Item,
        hash: Option<String>,
        message: u64,
        tx: &mpsc::Sender<Prepared>,
    ) -> bool {
        let Op::Upsert { id, text, payload } = item.op else {
            let document = match &item.op {
                Op::Delete { id } => Some(*id),
                _ => None,
            };
            if let Some(d) = document {
                self.in_flight.add(d);
            }
            let mut p = Prepared::whole(item, message);
            p.document = document;
            return tx.send(p).await.is_ok();
        };
        let docs = &self.documents;
        let plan = if text.len() > BLOCKING_TEXT_BYTES {
            crate::util::blocking_here(|| docs.plan(&text))
        } else {
            docs.plan(&text)
        };
        let reject = |item: Item, e: crate::embed::ItemError| Item {
            op: Op::Reject {
                rejection: Rejection::new(e.reason(), e.to_string()),
            },
            ..item
        };
        let shell = Item {
            op: Op::Unchanged,
            ..item
        };
        let mut payload = payload;
        payload.remove("text");
        if let Some(h) = hash {
            payload.insert(fields::CONTENT_HASH.into(), Value::String(h));
        }
        payload.insert(fields::DOCUMENT_ID.into(), Value::String(id.to_string()));
        let chunk = |index: u32, count: u32, span: Range<usize>, chars: (usize, usize), tokens| {
            let mut payload = payload.clone();
            let sparse = docs.sparse(&text[span.clone()]);
            payload.insert("text".into(), Value::String(text[span].to_string()));
            payload.insert(fields::CHUNK_INDEX.into(), index.into());
            payload.insert(fields::CHUNK_COUNT.into(), count.into());
            payload.insert(fields::CHUNK_START.into(), chars.0.into());
            payload.insert(fields::CHUNK_END.into(), chars.1.into());
            Prepared {
                item: Item {
                    op: Op::Upsert {
                        id: streambed_decode::ids::chunk(id, index),
                        text: String::new(),
                        payload,
                    },
                    ..shell.clone()
                },
                tokens: Some(tokens),
                sparse,
                document: Some(id),
                message,
                ends_message: index == 0,
                chunk_count: (index == 0).then_some(count),
            }
        };
        match plan {
            Err(e) => tx
                .send(Prepared::whole(reject(shell, e), message))
                .await
                .is_ok(),
            Ok(Plan::Whole(tokens)) => {
                if tokens.truncated {
                    self.metrics.truncated.inc();
                }
                self.in_flight.add(id);
                let n = text.chars().count();
                tx.send(chunk(0, 1, 0..text.len(), (0, n), tokens.ids))
                    .await
                    .is_ok()
            }
            Ok(Plan::Chunks(spans)) => {
                let count = spans.len() as u32;
                let mut starts = CharCursor::new(&text);
                let mut ends = CharCursor::new(&text);
                let chars: Vec<(usize, usize)> = spans
                    .iter()
                    .map(|r| (starts.at(r.start), ends.at(r.end)))
                    .collect();
                self.in_flight.add(id);
                // The first chunk goes last: see `document`.
                for i in (1..spans.len()).chain(std::iter::once(0)) {
                    let piece = &text[spans[i].clone()];
                    let tokens = match docs.tokenize_chunk(piece) {
                        Ok(t) => t.ids,
                        Err(e) => {
                            // The tokenizer failed on a part of a text it read whole:
                            // dead-letter the document (its earlier chunks stay until
                            // it is sent again).
                            self.in_flight.finish(id);
                            return tx
                                .send(Prepared::whole(reject(shell, e), message))
                                .await
                                .is_ok();
                        }
                    };
                    let p = chunk(i as u32, count, spans[i].clone(), chars[i], tokens);
                    if tx.send(p).await.is_err() {
                        return false;
                    }
                }
                true
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

/// Continuous batching, as text-embeddings-inference does it: items arrive tokenised,
/// and the batch goes to the model the moment the model asks for work. While the
/// model is busy the batch grows, up to `max_items` or the padded-token budget (items ×
/// longest). So under load batches are full, and under light load nothing waits for a
/// timer. `linger` lets the first item of a batch wait that long for company when the model
/// is idle (0 by default).
async fn batcher(
    cfg: PipelineConfig,
    mut rx: mpsc::Receiver<Prepared>,
    mut requests: mpsc::Receiver<Request>,
    metrics: Metrics,
) -> Result<(), PipelineError> {
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
                    // The embedder stopped; it reports why.
                    return Ok(());
                }
                continue;
            }
        }
        if !input_open && filling.items.is_empty() && filling.carry.is_none() {
            return Ok(());
        }
        let linger_until = filling.first_at.map(|t| t + cfg.linger);
        tokio::select! {
            biased;
            req = requests.recv(), if waiting.is_none() => match req {
                Some(r) => waiting = Some(r),
                None => return Ok(()),
            },
            // The embedder gave up its request: it stopped (and reports why).
            _ = async { waiting.as_mut().expect("guarded").closed().await }, if waiting.is_some() => {
                return Ok(());
            }
            item = rx.recv(), if input_open && !full => match item {
                Some(p) => filling.add(p, cfg.max_tokens),
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
) -> Result<(), PipelineError> {
    loop {
        let (ask, answer) = oneshot::channel();
        if requests.send(ask).await.is_err() {
            return Ok(());
        }
        // A writer that stopped closes `tx`: stop too, so the stages before see it.
        let mut batch = tokio::select! {
            a = answer => match a {
                Ok(b) => b,
                Err(_) => return Ok(()),
            },
            _ = tx.closed() => return Ok(()),
        };
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
                    // The model itself failed (a model error, out of memory on the device):
                    // nothing of this batch may be committed, and the worker cannot go on.
                    // candle's errors carry a backtrace after the message: log the cause once.
                    let text = e.to_string();
                    let cause = text
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .trim_end_matches(':');
                    let e = PipelineError::Encoder(cause.to_string());
                    tracing::error!(error = %e, "encoder failed; stopping the pipeline");
                    metrics.ready.fail(&e.to_string());
                    return Err(e);
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
            return Ok(());
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

/// What the writer does with one item of a batch.
enum Action {
    Upsert(Point),
    Delete(Uuid),
    /// Dead-letter it (bad input, or refused by the store).
    Reject(Rejection),
    /// A later item of the same batch has the same id: the last operation wins.
    Superseded,
    /// Its partition was revoked before it was written: the new owner writes it.
    Fenced,
    /// The store already holds this content: nothing to write.
    Unchanged,
}

struct Entry {
    origin: Origin,
    key: Option<Vec<u8>>,
    value: Option<Arc<[u8]>>,
    timestamp_ms: Option<i64>,
    action: Action,
    document: Option<Uuid>,
    ends_message: bool,
    /// A document's first chunk: written after its stale chunks (from this index) are gone.
    chunk_count: Option<u32>,
}

/// The last stage: writes a batch's points (split to the store's request limit, the
/// points a store refuses isolated by bisection and dead-lettered), delivers its dead
/// letters, then reports completion.
struct Writer<S> {
    cfg: PipelineConfig,
    sink: Arc<S>,
    dead_letters: Arc<dyn DeadLetters>,
    completion: Arc<dyn Completion>,
    in_flight: Arc<InFlight>,
    metrics: Metrics,
}

/// The outcome of one group's write.
enum GroupWrite {
    Written,
    Rejected(Rejection),
}

impl<S: Sink> Writer<S> {
    async fn run(self, mut rx: mpsc::Receiver<Embedded>) -> Result<(), PipelineError> {
        while let Some(batch) = rx.recv().await {
            if let Err(e) = self.batch(batch).await {
                tracing::error!(error = %e, "writer stopped; the unfinished batch will be replayed");
                self.metrics.ready.fail(&e.to_string());
                return Err(e);
            }
        }
        Ok(())
    }

    async fn batch(&self, batch: Embedded) -> Result<(), PipelineError> {
        let started = Instant::now();
        let mut entries = self.entries(batch);
        // Dead letters of bad input go out alongside the store write (each is a broker
        // round trip); completion waits for both.
        let bad: Vec<usize> = (0..entries.len())
            .filter(|&i| matches!(entries[i].action, Action::Reject(_)))
            .collect();
        let writes: Vec<usize> = (0..entries.len())
            .filter(|&i| matches!(entries[i].action, Action::Upsert(_) | Action::Delete(_)))
            .collect();
        let (dead, stored) = tokio::join!(
            self.dead_letter(&entries, &bad),
            self.store(&entries, writes)
        );
        dead?;
        let (refused, fenced) = stored?;
        for i in &fenced {
            entries[*i].action = Action::Fenced;
        }
        let mut refused_idx = Vec::with_capacity(refused.len());
        for (i, rejection) in refused {
            entries[i].action = Action::Reject(rejection);
            refused_idx.push(i);
        }
        // Points the store refused are dead-lettered before their offsets move.
        self.dead_letter(&entries, &refused_idx).await?;

        let (mut n_up, mut n_del) = (0u64, 0u64);
        let mut stamps = Vec::new();
        for e in &entries {
            match &e.action {
                Action::Upsert(_) => {
                    n_up += 1;
                    if e.ends_message {
                        stamps.extend(e.timestamp_ms);
                    }
                    if let Some(n) = e.chunk_count {
                        self.metrics.documents.inc();
                        self.metrics.chunks_per_document.observe(f64::from(n));
                    }
                }
                Action::Delete(_) => n_del += 1,
                _ => {}
            }
        }
        self.metrics.upserted.inc_by(n_up);
        self.metrics.deleted.inc_by(n_del);
        self.metrics
            .stage_seconds
            .with_label_values(&["upsert"])
            .observe(started.elapsed().as_secs_f64());
        self.observe_latency(stamps);
        let mut origins = Vec::new();
        for e in entries {
            if !e.ends_message {
                continue;
            }
            if let Some(d) = e.document {
                self.in_flight.finish(d);
            }
            if !matches!(e.action, Action::Fenced) {
                origins.push(e.origin);
            }
        }
        self.completion.done(&origins);
        Ok(())
    }

    /// One entry per item. Of several messages about one document in a batch only the
    /// last is applied (its chunks overwrite, its stale-chunk delete covers the rest).
    fn entries(&self, batch: Embedded) -> Vec<Entry> {
        let mut vectors = batch.vectors.into_iter();
        let mut latest: HashMap<Uuid, (u64, Vec<usize>)> = HashMap::new();
        let mut entries: Vec<Entry> = Vec::with_capacity(batch.items.len());
        for p in batch.items {
            let action = match p.item.op {
                Op::Upsert { id, payload, .. } if p.tokens.is_some() => {
                    let vector = vectors.next().expect("one vector per tokenised item");
                    Action::Upsert(Point {
                        id,
                        vector,
                        sparse: p.sparse,
                        payload,
                    })
                }
                Op::Upsert { .. } => unreachable!("untokenised upserts become rejections"),
                Op::Delete { id } => Action::Delete(id),
                Op::Reject { rejection } => Action::Reject(rejection),
                Op::Unchanged => Action::Unchanged,
            };
            if let Some(d) = p.document {
                let (message, members) = latest.entry(d).or_insert((p.message, Vec::new()));
                if *message != p.message {
                    for &i in members.iter() {
                        if matches!(entries[i].action, Action::Upsert(_) | Action::Delete(_)) {
                            entries[i].action = Action::Superseded;
                        }
                    }
                    members.clear();
                    *message = p.message;
                }
                members.push(entries.len());
            }
            entries.push(Entry {
                origin: p.item.origin,
                key: p.item.key,
                value: p.item.value,
                timestamp_ms: p.item.timestamp_ms,
                action,
                document: p.document,
                ends_message: p.ends_message,
                chunk_count: p.chunk_count,
            });
        }
        entries
    }

    /// Dead-letters `which` entries (all `Action::Reject`) concurrently, each retried while
    /// the failure is transient; a permanent failure stops the pipeline.
    async fn dead_letter(&self, entries: &[Entry], which: &[usize]) -> Result<(), PipelineError> {
        if which.is_empty() {
            return Ok(());
        }
        let origins: Vec<&Origin> = which.iter().map(|&i| &entries[i].origin).collect();
        // Held while sending: a revoked partition's bad records are the new owner's to report.
        let hold = self.completion.hold(&origins);
        let sends = which
            .iter()
            .zip(&hold.owned)
            .filter(|(_, owned)| **owned)
            .map(|(&i, _)| async move {
                let e = &entries[i];
                let Action::Reject(rejection) = &e.action else {
                    unreachable!("only rejections are dead-lettered")
                };
                let mut attempt = 0;
                loop {
                    match self
                        .dead_letters
                        .send(&e.origin, rejection, e.key.as_deref(), e.value.as_deref())
                        .await
                    {
                        Ok(()) => break,
                        Err(DeliveryError::Permanent(m)) => {
                            return Err(PipelineError::DeadLetters(m));
                        }
                        Err(DeliveryError::Transient(m)) => {
                            tracing::warn!(error = %m, attempt, "dead-letter delivery failed; retrying");
                            tokio::time::sleep(backoff(&self.cfg, attempt)).await;
                            attempt += 1;
                        }
                    }
                }
                self.metrics
                    .dead_lettered
                    .with_label_values(&[rejection.reason])
                    .inc();
                Ok(())
            });
        let results = futures::future::join_all(sends).await;
        drop(hold);
        results.into_iter().collect()
    }

    /// Writes the entries `which` (upserts and deletes). Returns the entries the store
    /// refused, each with the reason, and those fenced off by a revoke. A refused group is
    /// halved until the points at fault are alone, so one bad point costs about
    /// 2·log2(batch) extra requests and every other point is written.
    #[allow(clippy::type_complexity)]
    async fn store(
        &self,
        entries: &[Entry],
        which: Vec<usize>,
    ) -> Result<(Vec<(usize, Rejection)>, Vec<usize>), PipelineError> {
        let mut refused = Vec::new();
        let mut fenced = Vec::new();
        let mut todo = vec![which];
        while let Some(group) = todo.pop() {
            if group.is_empty() {
                continue;
            }
            match self.write_group(entries, &group, &mut fenced).await? {
                GroupWrite::Written => {}
                GroupWrite::Rejected(r) if group.len() == 1 => {
                    self.confirm_rejection(entries, group[0], &r).await?;
                    refused.push((group[0], r));
                }
                GroupWrite::Rejected(r) => {
                    tracing::warn!(points = group.len(), error = %r.detail, "store refused a write; isolating the points at fault");
                    let mut a = group;
                    let b = a.split_off(a.len() / 2);
                    todo.push(b);
                    todo.push(a);
                }
            }
        }
        Ok((refused, fenced))
    }

    /// Before a point is dead-lettered for a refusal, make sure the refusal is about the
    /// point and not about the collection (one of another shape created after start
    /// refuses every point, and must stop the worker rather than empty the stream into the
    /// dead-letter topic).
    async fn confirm_rejection(
        &self,
        entries: &[Entry],
        i: usize,
        r: &Rejection,
    ) -> Result<(), PipelineError> {
        if let Action::Upsert(p) = &entries[i].action {
            loop {
                match self.sink.ensure_collection(p.vector.len()).await {
                    Ok(()) => break,
                    Err(SinkError::Transient(_)) => {
                        tokio::time::sleep(self.cfg.retry_initial).await;
                    }
                    Err(e) => return Err(PipelineError::Store(e.to_string())),
                }
            }
        }
        tracing::warn!(reason = r.reason, error = %r.detail, "the store refused a point; dead-lettering it");
        Ok(())
    }

    /// One group's write, retried while the store is unavailable. Items whose partition was
    /// revoked meanwhile are left out (and added to `fenced`).
    async fn write_group(
        &self,
        entries: &[Entry],
        group: &[usize],
        fenced: &mut Vec<usize>,
    ) -> Result<GroupWrite, PipelineError> {
        let mut attempt = 0;
        loop {
            let origins: Vec<&Origin> = group.iter().map(|&i| &entries[i].origin).collect();
            let hold = self.completion.hold(&origins);
            let mut w = Write::default();
            for (&i, &owned) in group.iter().zip(&hold.owned) {
                if !owned {
                    if !fenced.contains(&i) {
                        fenced.push(i);
                    }
                    continue;
                }
                let e = &entries[i];
                match &e.action {
                    Action::Upsert(p) => match (e.chunk_count, e.document) {
                        (Some(from), Some(document)) => {
                            w.stale.push(ChunkRange { document, from });
                            w.last.push(p.clone());
                        }
                        _ => w.upserts.push(p.clone()),
                    },
                    Action::Delete(id) => {
                        w.deletes.push(*id);
                        w.stale.push(ChunkRange {
                            document: *id,
                            from: 0,
                        });
                    }
                    _ => unreachable!("only upserts and deletes are written"),
                }
            }
            if w.is_empty() {
                return Ok(GroupWrite::Written);
            }
            let result = self.sink.write(w).await;
            drop(hold);
            let ready = &self.metrics.ready;
            match result {
                Ok(()) => {
                    ready.set_last_write_ok(true);
                    return Ok(GroupWrite::Written);
                }
                Err(SinkError::Rejected { reason, detail }) => {
                    // The store answered; it is up, these points are the problem.
                    ready.set_last_write_ok(true);
                    self.metrics
                        .sink_errors
                        .with_label_values(&["rejected"])
                        .inc();
                    return Ok(GroupWrite::Rejected(Rejection::new(reason, detail)));
                }
                Err(SinkError::Permanent(m)) => {
                    ready.set_last_write_ok(false);
                    self.metrics.sink_errors.with_label_values(&["fatal"]).inc();
                    return Err(PipelineError::Store(m));
                }
                Err(SinkError::Transient(m)) => {
                    ready.set_last_write_ok(false);
                    self.metrics
                        .sink_errors
                        .with_label_values(&["transient"])
                        .inc();
                    self.metrics.sink_retries.inc();
                    tracing::warn!(error = %m, attempt, "store write failed; retrying, nothing is committed meanwhile");
                    tokio::time::sleep(backoff(&self.cfg, attempt)).await;
                    attempt += 1;
                }
            }
        }
    }

    fn observe_latency(&self, stamps: Vec<i64>) {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let mut samples = self.metrics.latency_samples.lock().expect("samples");
        for ts in stamps {
            let seconds = ((now_ms - ts).max(0)) as f64 / 1000.0;
            self.metrics.end_to_end_seconds.observe(seconds);
            if let Some(s) = samples.as_mut() {
                s.push(seconds);
            }
        }
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

    /// Fails the first `fail` writes, then records what it is given; refuses any write
    /// holding a point whose vector's first value is `poison`, or everything when `fatal`.
    #[derive(Default)]
    struct FakeSink {
        fail: Mutex<usize>,
        points: Mutex<HashMap<Uuid, Point>>,
        writes: Mutex<usize>,
        poison: Option<f32>,
        fatal: bool,
    }
    impl Sink for FakeSink {
        async fn ensure_collection(&self, _: usize) -> Result<(), SinkError> {
            Ok(())
        }
        async fn write(&self, w: Write) -> Result<(), SinkError> {
            if self.fatal {
                return Err(SinkError::Permanent("bad api key".into()));
            }
            if w.upserts
                .iter()
                .chain(&w.last)
                .any(|p| Some(p.vector[0]) == self.poison)
            {
                return Err(SinkError::Rejected {
                    reason: "store_rejected",
                    detail: "payload too deep".into(),
                });
            }
            {
                let mut f = self.fail.lock().unwrap();
                if *f > 0 {
                    *f -= 1;
                    return Err(SinkError::Transient("down".into()));
                }
            }
            *self.writes.lock().unwrap() += 1;
            let mut pts = self.points.lock().unwrap();
            for p in w.upserts {
                pts.insert(p.id, p);
            }
            for d in w.deletes {
                pts.remove(&d);
            }
            for r in w.stale {
                pts.retain(|_, p| {
                    let doc = p.payload.get(fields::DOCUMENT_ID).and_then(|v| v.as_str());
                    let index = p.payload.get(fields::CHUNK_INDEX).and_then(|v| v.as_u64());
                    !(doc == Some(r.document.to_string().as_str())
                        && index.is_some_and(|i| i >= u64::from(r.from)))
                });
            }
            for p in w.last {
                pts.insert(p.id, p);
            }
            Ok(())
        }
        async fn search(
            &self,
            _: crate::sink::Query,
            _: usize,
            _: Option<crate::sink::MatchFilter>,
        ) -> Result<Vec<Hit>, SinkError> {
            Ok(vec![])
        }
        async fn retrieve(&self, ids: Vec<Uuid>, _: bool) -> Result<Vec<Hit>, SinkError> {
            let pts = self.points.lock().unwrap();
            Ok(ids
                .iter()
                .filter_map(|id| pts.get(id))
                .map(|p| Hit {
                    id: p.id.to_string(),
                    score: 0.0,
                    payload: p.payload.clone(),
                    vector: None,
                })
                .collect())
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
    struct DeadList(Mutex<Vec<&'static str>>, Mutex<Vec<Option<Vec<u8>>>>);
    impl DeadLetters for DeadList {
        fn send<'a>(
            &'a self,
            _: &'a Origin,
            r: &'a Rejection,
            _: Option<&'a [u8]>,
            v: Option<&'a [u8]>,
        ) -> BoxFuture<'a, Result<(), DeliveryError>> {
            self.0.lock().unwrap().push(r.reason);
            self.1.lock().unwrap().push(v.map(<[u8]>::to_vec));
            Box::pin(async { Ok(()) })
        }
    }

    /// Completion that fences one offset off, as a revoked partition would be.
    struct Fencing {
        record: Arc<Record>,
        fenced_offset: i64,
    }
    impl Completion for Fencing {
        fn done(&self, origins: &[Origin]) {
            self.record.done(origins)
        }
        fn hold(&self, origins: &[&Origin]) -> Hold {
            let owned = origins
                .iter()
                .map(|o| o.describe().2 != self.fenced_offset)
                .collect();
            Hold::new(owned, || {})
        }
    }

    struct FailingEncoder;
    impl Encoder for FailingEncoder {
        fn dim(&self) -> usize {
            2
        }
        fn embed(&self, _: &[&[u32]]) -> Result<Vec<Vec<f32>>, EmbedError> {
            Err(EmbedError::Stopped)
        }
    }

    fn documents() -> Arc<Documents> {
        documents_with(crate::settings::ChunkSettings {
            mode: crate::settings::ChunkMode::Split,
            max_tokens: 0,
            overlap_tokens: 0,
            skip_unchanged: true,
        })
    }

    fn documents_with(s: crate::settings::ChunkSettings) -> Arc<Documents> {
        // A tiny WordPiece vocabulary is enough to drive the pipeline logic.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("vocab.txt"),
            "[PAD]\n[UNK]\n[CLS]\n[SEP]\n안녕\n하세요\n##하세요\n",
        )
        .unwrap();
        let t = crate::embed::TextTokenizer::load(dir.path(), 16, "").unwrap();
        Arc::new(Documents::new(t, &s, "test-model").unwrap())
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
            value: Some(format!("original-{offset}").into_bytes().into()),
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
            documents(),
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
        p.finished.await.unwrap().unwrap();
        let points = sink.points.lock().unwrap();
        assert!(
            !points.contains_key(&Uuid::from_u128(1)),
            "deleted after upsert"
        );
        assert!(points.contains_key(&Uuid::from_u128(2)));
        assert!(points.contains_key(&Uuid::from_u128(4)));
        assert_eq!(*dead.0.lock().unwrap(), vec!["empty_text"]);
        // The dead letter carries the record's original value, not the extracted text.
        assert_eq!(*dead.1.lock().unwrap(), vec![Some(b"original-2".to_vec())]);
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
            documents(),
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
            documents(),
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

    fn start_with(
        encoder: impl Encoder,
        sink: Arc<FakeSink>,
        dead: Arc<DeadList>,
        completion: Arc<dyn Completion>,
        metrics: Metrics,
    ) -> Pipeline {
        start(
            cfg(),
            documents(),
            EncoderHandle::spawn(encoder, 1),
            sink,
            dead,
            completion,
            metrics,
        )
    }

    #[tokio::test]
    async fn an_encoder_failure_stops_the_pipeline_with_an_error_and_commits_nothing() {
        let done = Arc::new(Record::default());
        let metrics = Metrics::new();
        metrics
            .ready
            .model_loaded
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let p = start_with(
            FailingEncoder,
            Arc::new(FakeSink::default()),
            Arc::new(DeadList::default()),
            done.clone(),
            metrics.clone(),
        );
        p.input.send(item(0, upsert(1, "안녕"))).await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(10), p.finished)
            .await
            .expect("the pipeline ends by itself")
            .unwrap();
        assert!(matches!(r, Err(PipelineError::Encoder(_))), "{r:?}");
        assert!(done.0.lock().unwrap().is_empty());
        let reason = metrics.ready.reason().expect("not ready");
        assert!(reason.contains("encoder"), "{reason}");
        // The reader sees the pipeline closed and stops too.
        assert!(p.input.send(item(1, upsert(2, "안녕"))).await.is_err());
    }

    #[tokio::test]
    async fn a_refused_point_is_isolated_and_dead_lettered_the_rest_written() {
        // "안녕 안녕 안녕" is [CLS] + 3 + [SEP] = 5 ids, "안녕" 3: only the first is refused.
        let sink = Arc::new(FakeSink {
            poison: Some(5.0),
            ..Default::default()
        });
        let done = Arc::new(Record::default());
        let dead = Arc::new(DeadList::default());
        let p = start_with(
            LenEncoder,
            sink.clone(),
            dead.clone(),
            done.clone(),
            Metrics::new(),
        );
        p.input.send(item(0, upsert(1, "안녕"))).await.unwrap();
        p.input
            .send(item(1, upsert(2, "안녕 안녕 안녕")))
            .await
            .unwrap();
        p.input.send(item(2, upsert(3, "안녕"))).await.unwrap();
        p.input.send(item(3, upsert(4, "안녕"))).await.unwrap();
        drop(p.input);
        p.finished.await.unwrap().unwrap();
        let points = sink.points.lock().unwrap();
        assert_eq!(points.len(), 3);
        assert!(!points.contains_key(&Uuid::from_u128(2)));
        assert_eq!(*dead.0.lock().unwrap(), vec!["store_rejected"]);
        assert_eq!(*dead.1.lock().unwrap(), vec![Some(b"original-1".to_vec())]);
        assert_eq!(*done.0.lock().unwrap(), vec![0, 1, 2, 3]);
    }

    #[tokio::test]
    async fn a_permanent_store_error_stops_instead_of_retrying_for_ever() {
        let sink = Arc::new(FakeSink {
            fatal: true,
            ..Default::default()
        });
        let done = Arc::new(Record::default());
        let metrics = Metrics::new();
        let p = start_with(
            LenEncoder,
            sink,
            Arc::new(DeadList::default()),
            done.clone(),
            metrics.clone(),
        );
        p.input.send(item(0, upsert(1, "안녕"))).await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(10), p.finished)
            .await
            .expect("no endless retry")
            .unwrap();
        assert!(
            matches!(r, Err(PipelineError::Store(ref m)) if m.contains("api key")),
            "{r:?}"
        );
        assert!(done.0.lock().unwrap().is_empty());
        // The input stays open (a reader still holds it): the pipeline ended anyway, and
        // the reader finds it closed.
        assert!(p.input.send(item(1, upsert(2, "안녕"))).await.is_err());
        assert_eq!(metrics.sink_errors.with_label_values(&["fatal"]).get(), 1);
    }

    #[tokio::test]
    async fn fenced_items_are_neither_written_nor_completed() {
        let sink = Arc::new(FakeSink::default());
        let record = Arc::new(Record::default());
        let p = start_with(
            LenEncoder,
            sink.clone(),
            Arc::new(DeadList::default()),
            Arc::new(Fencing {
                record: record.clone(),
                fenced_offset: 1,
            }),
            Metrics::new(),
        );
        for i in 0..3 {
            p.input
                .send(item(i, upsert(i as u128, "안녕")))
                .await
                .unwrap();
        }
        drop(p.input);
        p.finished.await.unwrap().unwrap();
        let points = sink.points.lock().unwrap();
        assert!(points.contains_key(&Uuid::from_u128(0)));
        assert!(
            !points.contains_key(&Uuid::from_u128(1)),
            "fenced item written"
        );
        assert_eq!(*record.0.lock().unwrap(), vec![0, 2]);
    }

    fn chunks_of(sink: &FakeSink, doc: u128) -> Vec<(u64, String)> {
        let doc = Uuid::from_u128(doc).to_string();
        let mut v: Vec<(u64, String)> = sink
            .points
            .lock()
            .unwrap()
            .values()
            .filter(|p| p.payload[fields::DOCUMENT_ID] == doc.as_str())
            .map(|p| {
                (
                    p.payload[fields::CHUNK_INDEX].as_u64().unwrap(),
                    p.payload["text"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        v.sort();
        v
    }

    #[tokio::test]
    async fn a_document_keeps_exactly_the_chunks_of_its_last_version() {
        let sink = Arc::new(FakeSink::default());
        let done = Arc::new(Record::default());
        let metrics = Metrics::new();
        let p = start_with(
            LenEncoder,
            sink.clone(),
            Arc::new(DeadList::default()),
            done.clone(),
            metrics.clone(),
        );
        // 60 tokens: five chunks of at most 14 text tokens, over several batches of 4.
        let long = "안녕 ".repeat(60);
        p.input.send(item(0, upsert(7, &long))).await.unwrap();
        wait_for("the long document", || done.0.lock().unwrap().len() == 1).await;
        let chunks = chunks_of(&sink, 7);
        assert_eq!(chunks.len(), 5, "{chunks:?}");
        assert_eq!(
            chunks.iter().map(|c| c.1.as_str()).collect::<String>(),
            long
        );
        for (i, c) in chunks.iter().enumerate() {
            assert_eq!(c.0, i as u64);
        }
        // Sent again, shorter: only its two chunks remain. In the same batch as a newer
        // version of another document, and followed by its own tombstone and rebirth.
        p.input
            .send(item(1, upsert(7, &"안녕 ".repeat(20))))
            .await
            .unwrap();
        p.input
            .send(item(2, upsert(8, "안녕하세요")))
            .await
            .unwrap();
        wait_for("the shorter version", || done.0.lock().unwrap().len() == 3).await;
        assert_eq!(chunks_of(&sink, 7).len(), 2);
        p.input
            .send(item(
                3,
                Op::Delete {
                    id: Uuid::from_u128(7),
                },
            ))
            .await
            .unwrap();
        wait_for("the tombstone", || done.0.lock().unwrap().len() == 4).await;
        assert!(chunks_of(&sink, 7).is_empty());
        assert_eq!(chunks_of(&sink, 8).len(), 1);
        // Versions racing through one batch: the last wins, whole.
        p.input.send(item(4, upsert(9, &long))).await.unwrap();
        p.input
            .send(item(
                5,
                Op::Delete {
                    id: Uuid::from_u128(9),
                },
            ))
            .await
            .unwrap();
        p.input
            .send(item(6, upsert(9, &"안녕 ".repeat(30))))
            .await
            .unwrap();
        drop(p.input);
        p.finished.await.unwrap().unwrap();
        assert_eq!(chunks_of(&sink, 9).len(), 3);
        assert_eq!(*done.0.lock().unwrap(), vec![0, 1, 2, 3, 4, 5, 6]);
        // Doc 9's first version is written, or superseded when it shares a batch.
        assert!((4..=5).contains(&metrics.documents.get()));
    }

    #[tokio::test]
    async fn unchanged_documents_are_not_embedded_again_unless_a_newer_version_is_in_flight() {
        let sink = Arc::new(FakeSink::default());
        let done = Arc::new(Record::default());
        let metrics = Metrics::new();
        let p = start_with(
            LenEncoder,
            sink.clone(),
            Arc::new(DeadList::default()),
            done.clone(),
            metrics.clone(),
        );
        let long = "안녕 ".repeat(40);
        p.input.send(item(0, upsert(1, &long))).await.unwrap();
        p.input.send(item(1, upsert(2, "안녕"))).await.unwrap();
        wait_for("the first pass", || done.0.lock().unwrap().len() == 2).await;
        let writes = *sink.writes.lock().unwrap();
        p.input.send(item(2, upsert(1, &long))).await.unwrap();
        p.input.send(item(3, upsert(2, "안녕"))).await.unwrap();
        wait_for("the replay", || done.0.lock().unwrap().len() == 4).await;
        assert_eq!(metrics.unchanged.get(), 2);
        assert_eq!(*sink.writes.lock().unwrap(), writes, "nothing written");
        // A, then B, then A again in a row: the store holds A while B is in flight, so the
        // second A must not be skipped.
        p.input
            .send(item(4, upsert(2, "안녕하세요")))
            .await
            .unwrap();
        p.input.send(item(5, upsert(2, "안녕"))).await.unwrap();
        drop(p.input);
        p.finished.await.unwrap().unwrap();
        assert_eq!(chunks_of(&sink, 2), vec![(0, "안녕".to_string())]);
        assert_eq!(metrics.unchanged.get(), 2);
    }

    #[tokio::test]
    async fn truncate_mode_stores_one_point_per_document() {
        let sink = Arc::new(FakeSink::default());
        let p = start(
            cfg(),
            documents_with(crate::settings::ChunkSettings {
                mode: crate::settings::ChunkMode::Truncate,
                max_tokens: 0,
                overlap_tokens: 0,
                skip_unchanged: false,
            }),
            EncoderHandle::spawn(LenEncoder, 1),
            sink.clone(),
            Arc::new(DeadList::default()),
            Arc::new(Record::default()),
            Metrics::new(),
        );
        p.input
            .send(item(0, upsert(1, &"안녕 ".repeat(60))))
            .await
            .unwrap();
        drop(p.input);
        p.finished.await.unwrap().unwrap();
        let points = sink.points.lock().unwrap();
        let point = &points[&Uuid::from_u128(1)];
        assert_eq!(points.len(), 1);
        assert_eq!(point.vector[0], 16.0, "truncated to max_seq_length");
        assert_eq!(point.payload[fields::CHUNK_COUNT], 1);
    }
}
