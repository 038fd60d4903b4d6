//! The encoder's own OS thread. Async code sends token batches through a bounded channel
//! and awaits a oneshot reply, so model inference never blocks a runtime worker, and a
//! slow model fills the channel, which pauses the stages before it.

use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::{EmbedError, Encoder};

/// Vectors in input order and the time the model took.
type Reply = Result<(Vec<Vec<f32>>, Duration), EmbedError>;

struct Job {
    seqs: Vec<Vec<u32>>,
    reply: oneshot::Sender<Reply>,
}

/// Cheap to clone; the thread ends when every handle is dropped.
#[derive(Clone)]
pub struct EncoderHandle {
    tx: mpsc::Sender<Job>,
    dim: usize,
}

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
        let (tx, mut rx) = mpsc::channel::<Job>(queue.max(1));
        let dim = encoder.dim();
        let mut serve = move || {
            while let Some(job) = rx.blocking_recv() {
                let started = Instant::now();
                let refs: Vec<&[u32]> = job.seqs.iter().map(Vec::as_slice).collect();
                let result = encoder.embed(&refs).map(|v| (v, started.elapsed()));
                // The requester may have gone away (shutdown); nothing to do then.
                let _ = job.reply.send(result);
            }
        };
        std::thread::Builder::new()
            .name("streambed-encoder".into())
            .spawn(move || match pool {
                Some(pool) => pool.install(serve),
                None => serve(),
            })
            .expect("spawn encoder thread");
        Self { tx, dim }
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Embeds one batch; returns the vectors in input order and the time the model took.
    pub async fn embed(&self, seqs: Vec<Vec<u32>>) -> Reply {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job { seqs, reply })
            .await
            .map_err(|_| EmbedError::Stopped)?;
        rx.await.map_err(|_| EmbedError::Stopped)?
    }
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
    }
}
