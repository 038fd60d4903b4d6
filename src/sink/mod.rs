//! Where vectors go. A write returns only once the points are durable in the store; only
//! then may their offsets be committed.

pub mod embedded;
pub mod qdrant;

use std::future::Future;

use serde_json::{Map, Value};
use uuid::Uuid;

/// One point to write.
#[derive(Debug, Clone)]
pub struct Point {
    pub id: Uuid,
    pub vector: Vec<f32>,
    /// The lexical vector (see `sparse`), in collections that have one.
    pub sparse: Option<SparseVector>,
    pub payload: Map<String, Value>,
}

/// A sparse vector: sorted, unique indices and their weights.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SparseVector {
    pub indices: Vec<u32>,
    pub values: Vec<f32>,
}

impl SparseVector {
    /// From (index, weight) pairs in any order; of repeated indices the largest weight is
    /// kept.
    pub fn from_pairs(pairs: impl IntoIterator<Item = (u32, f32)>) -> Self {
        let mut pairs: Vec<(u32, f32)> = pairs.into_iter().collect();
        pairs.sort_unstable_by_key(|p| p.0);
        let mut out = SparseVector {
            indices: Vec::with_capacity(pairs.len()),
            values: Vec::with_capacity(pairs.len()),
        };
        for (i, w) in pairs {
            if out.indices.last() == Some(&i) {
                let last = out.values.last_mut().expect("same length");
                *last = last.max(w);
            } else {
                out.indices.push(i);
                out.values.push(w);
            }
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }
}

/// How a search finds points.
#[derive(Debug, Clone)]
pub enum Query {
    /// Nearest by the dense vector (cosine).
    Dense(Vec<f32>),
    /// Best by the sparse vector (BM25 with the store's IDF).
    Sparse(SparseVector),
    /// Both searches, `prefetch` deep each, fused into one ranking in the store.
    Hybrid {
        dense: Vec<f32>,
        sparse: SparseVector,
        fusion: Fusion,
        prefetch: usize,
    },
}

impl Query {
    /// The query as a store should run it: a hybrid query whose text gave no terms is the
    /// dense search alone; `None` for a sparse query without terms, which nothing matches
    /// (so no store is asked for what some would refuse).
    pub fn effective(self) -> Option<Query> {
        match self {
            Query::Sparse(v) if v.is_empty() => None,
            Query::Hybrid { dense, sparse, .. } if sparse.is_empty() => Some(Query::Dense(dense)),
            q => Some(q),
        }
    }
}

/// How hybrid search merges its two rankings (Qdrant's Query API fusions).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fusion {
    /// Reciprocal rank fusion: `Σ weight / (k + rank)`; weights are (dense, sparse).
    Rrf { k: u32, weights: [f32; 2] },
    /// Distribution-based score fusion (scores normalised by their spread, then summed).
    Dbsf,
}

/// RRF weights as a store request carries them: `None` when they are equal, which is
/// plain RRF (and leaves them out for servers before weighted RRF).
pub fn rrf_weights(weights: [f32; 2]) -> Option<[f32; 2]> {
    (weights[0] != weights[1]).then_some(weights)
}

/// Payload fields of the document layout (see `document`), which deletes filter on.
pub mod fields {
    /// The document's id (the UUID of its first chunk's point), on every chunk.
    pub const DOCUMENT_ID: &str = "document_id";
    /// 0-based position of the chunk in its document.
    pub const CHUNK_INDEX: &str = "chunk_index";
    pub const CHUNK_COUNT: &str = "chunk_count";
    /// The chunk's span in the original text, in Unicode code points (`text[start:end]`).
    pub const CHUNK_START: &str = "chunk_start";
    pub const CHUNK_END: &str = "chunk_end";
    /// Hash of what the vectors were made from (text, prefix, model, chunking, metadata).
    pub const CONTENT_HASH: &str = "content_hash";
}

/// Chunks of a document to remove: those with `chunk_index >= from` (all of them for 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRange {
    pub document: Uuid,
    pub from: u32,
}

/// One durable write, applied in this order: `upserts`, `deletes`, `stale`, then `last`.
/// A document's last written point (its first chunk, which carries the content hash the
/// unchanged-document check reads) goes in `last`, after its stale chunks are gone, so a
/// crash at any step leaves a state that a replay repairs and that is never mistaken for
/// a complete document.
#[derive(Debug, Clone, Default)]
pub struct Write {
    pub upserts: Vec<Point>,
    pub deletes: Vec<Uuid>,
    pub stale: Vec<ChunkRange>,
    pub last: Vec<Point>,
}

impl Write {
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty()
            && self.deletes.is_empty()
            && self.stale.is_empty()
            && self.last.is_empty()
    }
}

/// Payload conditions a search must meet: each field equal to its value (a string, an
/// integer or a boolean), all of them.
pub type MatchFilter = Vec<(String, Value)>;

/// A search result or a retrieved point.
#[derive(Debug, Clone)]
pub struct Hit {
    pub id: String,
    pub score: f32,
    pub payload: Map<String, Value>,
    pub vector: Option<Vec<f32>>,
}

/// How a store error is handled, by class.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Worth retrying (store down, timeout, overloaded); nothing is committed meanwhile.
    #[error("store unavailable: {0}")]
    Transient(String),
    /// The store refuses these points (invalid argument, out of range, too large,
    /// failed precondition): the writer isolates the points at fault and dead-letters
    /// them with `reason`; the rest is written.
    #[error("store refused the points ({reason}): {detail}")]
    Rejected {
        reason: &'static str,
        detail: String,
    },
    /// Retrying will not help and no point is at fault (bad credentials, the collection
    /// gone or of another shape): the worker stops with this message.
    #[error("{0}")]
    Permanent(String),
}

/// Dead-letter reason for points the store refused.
pub const REJECTED: &str = "store_rejected";
/// Dead-letter reason for a point larger than the store's request limit on its own.
pub const TOO_LARGE: &str = "too_large_for_store";

/// The store's refusal of a sparse or hybrid search in a collection without the sparse
/// vector.
pub fn no_sparse() -> SinkError {
    SinkError::Rejected {
        reason: REJECTED,
        detail: "sparse and hybrid search need a sparse vector in the collection; \
                 set sparse.enabled = true (a new collection, then backfill) or search dense"
            .into(),
    }
}

/// The collection has the sparse vector `name` with the IDF modifier, or the worker
/// stops with what to do. `found`: (name, has IDF) of the collection's sparse vectors.
pub fn check_sparse(
    collection: &str,
    name: &str,
    found: &[(String, bool)],
) -> Result<(), SinkError> {
    match found.iter().find(|(n, _)| n == name) {
        Some((_, true)) => Ok(()),
        Some((_, false)) => Err(SinkError::Permanent(format!(
            "collection {collection:?} has the sparse vector {name:?} without the idf modifier, \
             so BM25 weights would be scored without IDF; use another sparse.name or collection"
        ))),
        None => Err(SinkError::Permanent(format!(
            "collection {collection:?} has no sparse vector {name:?} (it was made before \
             sparse.enabled, or with another sparse.name; its sparse vectors: {:?}); set \
             sparse.enabled = false to keep using it dense-only, or name a new collection and \
             backfill",
            found.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>()
        ))),
    }
}

/// A vector store.
pub trait Sink: Send + Sync + 'static {
    /// Creates the collection when missing (cosine, `dim` dimensions) and the payload
    /// indexes document deletes filter on; fails with a clear message when it exists with
    /// another shape.
    fn ensure_collection(&self, dim: usize) -> impl Future<Output = Result<(), SinkError>> + Send;
    /// Applies `w` in its order, durably (`wait=true` / flushed) before returning.
    fn write(&self, w: Write) -> impl Future<Output = Result<(), SinkError>> + Send;
    /// The `top_k` best points for `query` meeting `filter`, with payload, best first.
    fn search(
        &self,
        query: Query,
        top_k: usize,
        filter: Option<MatchFilter>,
    ) -> impl Future<Output = Result<Vec<Hit>, SinkError>> + Send;
    /// The points of `ids` that exist, with payload (and vector when asked).
    fn retrieve(
        &self,
        ids: Vec<Uuid>,
        with_vectors: bool,
    ) -> impl Future<Output = Result<Vec<Hit>, SinkError>> + Send;
    fn count(&self) -> impl Future<Output = Result<usize, SinkError>> + Send;
    /// Cheap but real health check for `/readyz` (the store answers, the collection is
    /// there).
    fn ping(&self) -> impl Future<Output = Result<(), SinkError>> + Send;
}

/// The configured store, without dynamic dispatch.
pub enum AnySink {
    Embedded(embedded::EmbeddedSink),
    Qdrant(qdrant::QdrantSink),
}

macro_rules! dispatch {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            AnySink::Embedded($s) => $e,
            AnySink::Qdrant($s) => $e,
        }
    };
}

impl Sink for AnySink {
    async fn ensure_collection(&self, dim: usize) -> Result<(), SinkError> {
        dispatch!(self, s => s.ensure_collection(dim).await)
    }
    async fn write(&self, w: Write) -> Result<(), SinkError> {
        dispatch!(self, s => s.write(w).await)
    }
    async fn search(
        &self,
        query: Query,
        top_k: usize,
        filter: Option<MatchFilter>,
    ) -> Result<Vec<Hit>, SinkError> {
        dispatch!(self, s => s.search(query, top_k, filter).await)
    }
    async fn retrieve(&self, ids: Vec<Uuid>, with_vectors: bool) -> Result<Vec<Hit>, SinkError> {
        dispatch!(self, s => s.retrieve(ids, with_vectors).await)
    }
    async fn count(&self) -> Result<usize, SinkError> {
        dispatch!(self, s => s.count().await)
    }
    async fn ping(&self) -> Result<(), SinkError> {
        dispatch!(self, s => s.ping().await)
    }
}

/// The document a hit belongs to: its `document_id`, or its own id for points written
/// before documents were split.
pub fn document_of(hit: &Hit) -> String {
    hit.payload
        .get(fields::DOCUMENT_ID)
        .and_then(|v| v.as_str())
        .map_or_else(|| hit.id.clone(), str::to_string)
}

/// The `top_k` best documents, each by its best chunk (score order). Searches deeper
/// until that many distinct documents are found or the collection has no more points;
/// the same result in both stores, as Qdrant's own grouping would give for `group_size=1`.
pub async fn search_documents<S: Sink>(
    sink: &S,
    query: Query,
    top_k: usize,
    filter: Option<MatchFilter>,
) -> Result<Vec<Hit>, SinkError> {
    /// Beyond this many chunks, the documents found are returned (a search that deep
    /// means a few documents of very many chunks fill the top).
    const DEEPEST: usize = 16_384;
    let mut limit = (top_k * 4).max(16);
    loop {
        // A hybrid search's legs go as deep as the fused list.
        let q = match &query {
            Query::Hybrid {
                dense,
                sparse,
                fusion,
                prefetch,
            } => Query::Hybrid {
                dense: dense.clone(),
                sparse: sparse.clone(),
                fusion: *fusion,
                prefetch: (*prefetch).max(limit),
            },
            other => other.clone(),
        };
        let hits = sink.search(q, limit, filter.clone()).await?;
        let exhausted = hits.len() < limit;
        let mut seen = std::collections::HashSet::new();
        let mut best = Vec::with_capacity(top_k);
        for h in hits {
            if seen.insert(document_of(&h)) {
                best.push(h);
                if best.len() == top_k {
                    return Ok(best);
                }
            }
        }
        if exhausted || limit >= DEEPEST {
            return Ok(best);
        }
        limit = (limit * 4).min(DEEPEST);
    }
}

/// Opens the store the settings name.
pub async fn open(settings: &crate::settings::Settings) -> Result<AnySink, SinkError> {
    use crate::settings::SinkKind;
    let sparse = settings
        .sparse
        .enabled
        .then(|| settings.sparse.name.clone());
    match settings.sink.kind {
        SinkKind::Embedded => Ok(AnySink::Embedded(embedded::EmbeddedSink::open(
            std::path::Path::new(&settings.embedded.path).join(&settings.embedded.collection),
            sparse,
        ))),
        SinkKind::Qdrant => Ok(AnySink::Qdrant(qdrant::QdrantSink::connect(
            &settings.qdrant,
            sparse,
        )?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_without_terms_need_no_lexical_search() {
        let none = SparseVector::default();
        let some = SparseVector::from_pairs([(3, 1.0), (1, 0.5), (3, 2.0)]);
        assert_eq!(some.indices, vec![1, 3]);
        assert_eq!(some.values, vec![0.5, 2.0]);
        assert!(Query::Sparse(none.clone()).effective().is_none());
        let hybrid = |sparse| Query::Hybrid {
            dense: vec![1.0],
            sparse,
            fusion: Fusion::Dbsf,
            prefetch: 10,
        };
        assert!(matches!(
            hybrid(none).effective(),
            Some(Query::Dense(v)) if v == vec![1.0]
        ));
        assert!(matches!(
            hybrid(some).effective(),
            Some(Query::Hybrid { .. })
        ));
    }
}
