//! The encoder's own OS thread. Async code hands it token batches and awaits a oneshot
//! reply, so model inference never blocks a runtime worker.
//!
//! Two lanes: ingestion batches wait in a bounded queue (a slow model fills it, which
//! pauses the stages before it), queries in a priority lane. Every waiting query runs
//! together in one small forward pass, before the next batch and between the transformer
//! layers of the batch running (in slices of 64 inputs); so a query waits for at most one
//! layer of a slice, or the batch's quantum of model time if that is longer,
//! never behind a full ingestion batch or a backlog.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Semaphore};

use super::{EmbedError, Encoder};

/// Vectors in input order and the time the model took.
type Reply = Result<(Vec<Vec<f32>>, Duration), EmbedError>;

struct Job {
    seqs: Vec<Vec<u32>>,
    reply: oneshot::Sender<Reply>,
    queued: Instant,
}

#[derive(Default)]
struct Lanes {
    queries: VecDeque<Job>,
    batches: VecDeque<Job>,
    closed: bool,
}

struct Shared {
    lanes: Mutex<Lanes>,
    wake: Condvar,
    /// Free places in the ingestion lane.
    batch_slots: Semaphore,
}

/// Closes the lanes when the last handle is dropped, which ends the thread.
struct Closer(Arc<Shared>);

impl Drop for Closer {
    fn drop(&mut self) {
        self.0.lanes.lock().expect("lanes").closed = true;
        self.0.wake.notify_all();
    }
}

/// Cheap to clone; the thread ends when every handle is dropped.
#[derive(Clone)]
pub struct EncoderHandle {
    shared: Arc<Shared>,
    _closer: Arc<Closer>,
    dim: usize,
}

/// Inputs per forward pass of an ingestion batch: the pipeline's default batch
/// (`batch.max_items`), so batches run whole. Queries cut in between layers, so smaller
/// slices while queries flow (8 or 16, measured in docs/PERFORMANCE.md) no longer bought
/// latency worth their cost in ingestion speed.
const SLICE: usize = 64;
/// Model time an ingestion batch in progress gets after queries ran before queries may
/// cut in again. Queries cut in between transformer layers, so without this a steady
/// stream of them would starve ingestion; with it a query waits at most this plus one
/// layer of a slice, and ingestion keeps about QUANTUM / (QUANTUM + a query pass) of the
/// model while queries come back to back (docs/PERFORMANCE.md).
const QUANTUM: Duration = Duration::from_millis(20);

impl EncoderHandle {
    /// Starts the thread, with the model's parallel work on the process-wide thread pool.
    /// `queue` batches may wait while one runs.
    pub fn spawn<E: Encoder>(encoder: E, queue: usize) -> Self {
        Self::start(encoder, queue, None)
    }

    /// Starts the thread with the model's parallel work (candle's matmuls) on a pool of
    /// its own with `threads` threads.
    pub fn spawn_with_threads<E: Encoder>(encoder: E, queue: usize, threads: usize) -> Self {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("streambed-model-{i}"))
            .build()
            .expect("model thread pool");
        Self::start(encoder, queue, Some(pool))
    }

    fn start<E: Encoder>(encoder: E, queue: usize, pool: Option<rayon::ThreadPool>) -> Self {
        let shared = Arc::new(Shared {
            lanes: Mutex::new(Lanes::default()),
            wake: Condvar::new(),
            batch_slots: Semaphore::new(queue.max(1)),
        });
        let dim = encoder.dim();
        let thread_shared = shared.clone();
        let serve = move || serve(&encoder, &thread_shared);
        std::thread::Builder::new()
            .name("streambed-encoder".into())
            .spawn(move || match pool {
                Some(pool) => pool.install(serve),
                None => serve(),
            })
            .expect("spawn encoder thread");
        Self {
            _closer: Arc::new(Closer(shared.clone())),
            shared,
            dim,
        }
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Embeds one ingestion batch; returns the vectors in input order and the time the
    /// model took. Waits while the ingestion lane is full.
    pub async fn embed(&self, seqs: Vec<Vec<u32>>) -> Reply {
        let permit = self
            .shared
            .batch_slots
            .acquire()
            .await
            .map_err(|_| EmbedError::Stopped)?;
        // The thread gives the place back when it takes the batch.
        permit.forget();
        self.push(seqs, false).await
    }

    /// Embeds queries ahead of any ingestion batch. Returns the vectors and the time the
    /// request waited before the model took it up (queue wait).
    pub async fn embed_query(&self, seqs: Vec<Vec<u32>>) -> Reply {
        self.push(seqs, true).await
    }

    async fn push(&self, seqs: Vec<Vec<u32>>, query: bool) -> Reply {
        let (reply, rx) = oneshot::channel();
        {
            let mut lanes = self.shared.lanes.lock().expect("lanes");
            if lanes.closed {
                return Err(EmbedError::Stopped);
            }
            let job = Job {
                seqs,
                reply,
                queued: Instant::now(),
            };
            if query {
                lanes.queries.push_back(job);
            } else {
                lanes.batches.push_back(job);
            }
        }
        self.shared.wake.notify_one();
        rx.await.map_err(|_| EmbedError::Stopped)?
    }
}

/// The thread's loop: queries first, ingestion batches in slices, queries cutting in
/// between their layers.
fn serve<E: Encoder>(encoder: &E, shared: &Shared) {
    // When queries last ran: ingestion gets QUANTUM of model time after that.
    let mut queries_ran = Instant::now() - QUANTUM;
    loop {
        let job = {
            let mut lanes = shared.lanes.lock().expect("lanes");
            loop {
                if !lanes.queries.is_empty() {
                    break None;
                }
                if let Some(j) = lanes.batches.pop_front() {
                    break Some(j);
                }
                if lanes.closed {
                    return;
                }
                lanes = shared.wake.wait(lanes).expect("lanes");
            }
        };
        let Some(job) = job else {
            if run_queries(encoder, shared) {
                queries_ran = Instant::now();
            }
            continue;
        };
        shared.batch_slots.add_permits(1);
        let started = Instant::now();
        let mut vectors = Vec::with_capacity(job.seqs.len());
        let mut failed = None;
        let mut at = 0;
        while at < job.seqs.len() {
            let end = (at + SLICE).min(job.seqs.len());
            let refs: Vec<&[u32]> = job.seqs[at..end].iter().map(Vec::as_slice).collect();
            at = end;
            // Queries that arrive meanwhile run between the slice's layers, once the
            // batch had its quantum.
            let mut between = || {
                if queries_ran.elapsed() >= QUANTUM && run_queries(encoder, shared) {
                    queries_ran = Instant::now();
                }
            };
            match encoder.embed_yielding(&refs, &mut between) {
                Ok(v) => vectors.extend(v),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        // The time the model spent on this batch, not on the queries between its slices.
        let result = match failed {
            Some(e) => Err(e),
            None => Ok((vectors, started.elapsed())),
        };
        // The requester may have gone away (shutdown); nothing to do then.
        let _ = job.reply.send(result);
    }
}

/// Runs every waiting query in one forward pass and answers each; false when none waited.
fn run_queries<E: Encoder>(encoder: &E, shared: &Shared) -> bool {
    let jobs: Vec<Job> = shared
        .lanes
        .lock()
        .expect("lanes")
        .queries
        .drain(..)
        .collect();
    if jobs.is_empty() {
        return false;
    }
    let refs: Vec<&[u32]> = jobs
        .iter()
        .flat_map(|j| j.seqs.iter().map(Vec::as_slice))
        .collect();
    let started = Instant::now();
    match encoder.embed(&refs) {
        Ok(all) => {
            let mut all = all.into_iter();
            for j in jobs {
                let mine: Vec<Vec<f32>> = all.by_ref().take(j.seqs.len()).collect();
                let _ = j.reply.send(Ok((mine, started - j.queued)));
            }
        }
        Err(e) => {
            let text = e.to_string();
            for j in jobs {
                let _ = j.reply.send(Err(EmbedError::Resolve(text.clone())));
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    struct LenEncoder;
    impl Encoder for LenEncoder {
        fn dim(&self) -> usize {
            1
        }
        fn embed(&self, batch: &[&[u32]]) -> Result<Vec<Vec<f32>>, EmbedError> {
            Ok(batch.iter().map(|s| vec![s.len() as f32]).collect())
        }
    }

    #[tokio::test]
    async fn replies_in_input_order_from_its_own_thread() {
        let h = EncoderHandle::spawn(LenEncoder, 2);
        let (v, _) = h.embed(vec![vec![1, 2, 3], vec![1]]).await.unwrap();
        assert_eq!(v, vec![vec![3.0], vec![1.0]]);
        assert_eq!(h.dim(), 1);
        let (q, _) = h.embed_query(vec![vec![1, 2]]).await.unwrap();
        assert_eq!(q, vec![vec![2.0]]);
    }

    /// 10 ms per input: a 320-input batch takes 3.2 s; a query sent while it runs must
    /// be answered within about one 64-input slice (0.64 s).
    struct SlowEncoder;
    impl Encoder for SlowEncoder {
        fn dim(&self) -> usize {
            1
        }
        fn embed(&self, batch: &[&[u32]]) -> Result<Vec<Vec<f32>>, EmbedError> {
            std::thread::sleep(Duration::from_millis(10 * batch.len() as u64));
            Ok(batch.iter().map(|s| vec![s.len() as f32]).collect())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queries_overtake_ingestion_batches() {
        let h = EncoderHandle::spawn(SlowEncoder, 2);
        let ingest = {
            let h = h.clone();
            tokio::spawn(async move {
                for _ in 0..3 {
                    let (v, _) = h.embed(vec![vec![1]; 320]).await.unwrap();
                    assert_eq!(v.len(), 320);
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = Instant::now();
        let (v, _) = h.embed_query(vec![vec![1, 2, 3]]).await.unwrap();
        let waited = started.elapsed();
        assert_eq!(v, vec![vec![3.0]]);
        assert!(
            waited < Duration::from_millis(1500),
            "query waited {waited:?}"
        );
        ingest.await.unwrap();
    }

    /// 12 "layers" of 50 ms per forward pass, whatever its size, yielding between them.
    struct LayeredEncoder;
    impl Encoder for LayeredEncoder {
        fn dim(&self) -> usize {
            1
        }
        fn embed(&self, batch: &[&[u32]]) -> Result<Vec<Vec<f32>>, EmbedError> {
            self.embed_yielding(batch, &mut || {})
        }
        fn embed_yielding(
            &self,
            batch: &[&[u32]],
            between: &mut dyn FnMut(),
        ) -> Result<Vec<Vec<f32>>, EmbedError> {
            for _ in 0..12 {
                std::thread::sleep(Duration::from_millis(50));
                between();
            }
            Ok(batch.iter().map(|s| vec![s.len() as f32]).collect())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queries_cut_in_between_layers_without_starving_ingestion() {
        let h = EncoderHandle::spawn(LayeredEncoder, 2);
        let ingest = {
            let h = h.clone();
            tokio::spawn(async move { h.embed(vec![vec![1]; 10]).await.unwrap() })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        // A forward pass takes 600 ms; a query cuts in at the next layer (50 ms) and
        // itself takes a pass (600 ms here), so well under two passes.
        let started = Instant::now();
        let (v, _) = h.embed_query(vec![vec![1, 2]]).await.unwrap();
        assert_eq!(v, vec![vec![2.0]]);
        assert!(
            started.elapsed() < Duration::from_millis(900),
            "query took {:?}",
            started.elapsed()
        );
        // Queries back to back: the batch still gets a layer after each, and finishes.
        let flood = {
            let h = h.clone();
            tokio::spawn(async move {
                for _ in 0..30 {
                    h.embed_query(vec![vec![1]]).await.unwrap();
                }
            })
        };
        let (v, _) = tokio::time::timeout(Duration::from_secs(15), ingest)
            .await
            .expect("ingestion starved by queries")
            .unwrap();
        assert_eq!(v.len(), 10);
        flood.abort();
    }
}
