//! Qdrant's own engine in process (`qdrant-edge`): one shard directory per collection,
//! cosine distance, payloads, on disk. Every write is flushed before it is acknowledged,
//! because qdrant-edge 0.7 does not replay its WAL on load: unflushed segments would be
//! lost on a crash. Writes (update + flush) are serialised by a lock of ours:
//! `EdgeShard::flush` takes its locks with `try_lock().expect(..)` and panics when another
//! write holds them; reads take no lock of ours.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use qdrant_edge::external::ordered_float::OrderedFloat;
use qdrant_edge::{
    CountRequest, CreateIndex, Distance, EdgeConfig, EdgeShard, EdgeSparseVectorParams,
    EdgeVectorParams, FieldIndexOperations, Filter, Modifier, NamedQuery, OperationError,
    PayloadFieldSchema, PayloadSchemaType, PointId, PointInsertOperations, PointOperations,
    PointStruct, Prefetch, QueryEnum, QueryRequest, ScoringQuery, SearchRequest, UpdateOperation,
    VectorInternal, WithPayloadInterface, WithVector,
};
use uuid::Uuid;

use super::{
    check_sparse, fields, no_sparse, ChunkRange, Fusion, Hit, MatchFilter, Point, Query, Sink,
    SinkError, SparseVector, Write,
};

pub struct EmbeddedSink {
    path: PathBuf,
    /// The sparse vector's name, where the collection has one (`sparse.enabled`).
    sparse: Option<String>,
    shard: Arc<Mutex<Option<Arc<EdgeShard>>>>,
    /// Held for each update + flush (see the module comment).
    write_lock: Arc<Mutex<()>>,
}

/// I/O and other environmental failures: worth retrying.
fn err(e: impl std::fmt::Display) -> SinkError {
    SinkError::Transient(e.to_string())
}

/// The engine's own errors, by class: a vector that does not fit the collection is the
/// collection's shape (stop); bad point data is the points' fault (dead-letter); the rest
/// (I/O, out of memory, cancelled) is retried.
pub fn classify(e: OperationError) -> SinkError {
    let text = e.to_string();
    match e {
        OperationError::WrongVectorDimension { .. }
        | OperationError::VectorNameNotExists { .. } => {
            SinkError::Permanent(format!("embedded store: {text}"))
        }
        OperationError::ValidationError { .. }
        | OperationError::TypeError { .. }
        | OperationError::TypeInferenceError { .. }
        | OperationError::WrongSparse
        | OperationError::WrongMulti
        | OperationError::PointIdError { .. }
        | OperationError::NonFiniteNumber { .. } => SinkError::Rejected {
            reason: super::REJECTED,
            detail: text,
        },
        _ => SinkError::Transient(text),
    }
}

/// The engine's filter for the chunks of `ranges` (see `qdrant::chunks_filter`).
pub fn chunks_filter(ranges: &[ChunkRange]) -> Filter {
    let should: Vec<serde_json::Value> = ranges
        .iter()
        .map(|r| {
            let doc = serde_json::json!({
                "key": fields::DOCUMENT_ID,
                "match": {"value": r.document.to_string()},
            });
            if r.from == 0 {
                doc
            } else {
                serde_json::json!({"must": [doc, {
                    "key": fields::CHUNK_INDEX,
                    "range": {"gte": r.from},
                }]})
            }
        })
        .collect();
    serde_json::from_value(serde_json::json!({ "should": should }))
        .expect("the chunk filter is a valid Qdrant filter")
}

/// The engine's filter for "every field equal to its value".
pub fn match_filter(f: &MatchFilter) -> Result<Filter, SinkError> {
    let must: Vec<serde_json::Value> = f
        .iter()
        .map(|(k, v)| serde_json::json!({"key": k, "match": {"value": v}}))
        .collect();
    serde_json::from_value(serde_json::json!({ "must": must })).map_err(|e| SinkError::Rejected {
        reason: super::REJECTED,
        detail: format!("bad filter: {e}"),
    })
}

fn edge_sparse(v: SparseVector) -> qdrant_edge::SparseVector {
    qdrant_edge::SparseVector {
        indices: v.indices,
        values: v.values,
    }
}

/// The engine's upsert of `points`: the dense vector is the default one, the sparse one
/// (when given and the collection has `sparse_name`) named beside it.
pub fn upsert_op(points: Vec<Point>, sparse_name: Option<&str>) -> UpdateOperation {
    let points = points
        .into_iter()
        .map(|p| {
            let vectors: qdrant_edge::Vectors = match (p.sparse, sparse_name) {
                (Some(sv), Some(name)) if !sv.is_empty() => qdrant_edge::Vectors::new_named([
                    (
                        qdrant_edge::DEFAULT_VECTOR_NAME.to_string(),
                        qdrant_edge::Vector::new_dense(p.vector),
                    ),
                    (name.to_string(), qdrant_edge::Vector::from(edge_sparse(sv))),
                ]),
                _ => p.vector.into(),
            };
            PointStruct::new(
                PointId::Uuid(p.id),
                vectors,
                serde_json::Value::Object(p.payload),
            )
            .into()
        })
        .collect::<Vec<_>>();
    UpdateOperation::PointOperation(PointOperations::UpsertPoints(
        PointInsertOperations::PointsList(points),
    ))
}

fn to_hit(
    id: PointId,
    score: f32,
    payload: Option<qdrant_edge::Payload>,
    vector: Option<qdrant_edge::VectorStructInternal>,
) -> Hit {
    let id = match id {
        PointId::NumId(n) => n.to_string(),
        PointId::Uuid(u) => u.to_string(),
    };
    let payload = payload
        .map(|p| p.0.into_iter().collect())
        .unwrap_or_default();
    let vector = vector.and_then(|v| match v {
        qdrant_edge::VectorStructInternal::Single(d) => Some(d),
        qdrant_edge::VectorStructInternal::Named(mut m) => {
            match m.remove(qdrant_edge::DEFAULT_VECTOR_NAME) {
                Some(VectorInternal::Dense(d)) => Some(d),
                _ => None,
            }
        }
        _ => None,
    });
    Hit {
        id,
        score,
        payload,
        vector,
    }
}

impl EmbeddedSink {
    /// Does no I/O; the shard is opened by [`Sink::ensure_collection`].
    pub fn open(path: PathBuf, sparse: Option<String>) -> Self {
        Self {
            path,
            sparse,
            shard: Arc::new(Mutex::new(None)),
            write_lock: Arc::new(Mutex::new(())),
        }
    }

    fn shard(&self) -> Result<Arc<EdgeShard>, SinkError> {
        self.shard
            .lock()
            .expect("shard lock")
            .clone()
            .ok_or_else(|| {
                SinkError::Permanent("embedded store used before ensure_collection".into())
            })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&EdgeShard) -> Result<T, SinkError> + Send + 'static,
    ) -> Result<T, SinkError> {
        let shard = self.shard()?;
        tokio::task::spawn_blocking(move || f(&shard))
            .await
            .map_err(err)?
    }
}

impl EmbeddedSink {
    /// Applies `ops` in order and flushes, under the write lock. The test server's way in,
    /// and what [`Sink::write`] comes to.
    pub async fn apply(&self, ops: Vec<UpdateOperation>) -> Result<(), SinkError> {
        if ops.is_empty() {
            return Ok(());
        }
        let lock = self.write_lock.clone();
        self.blocking(move |shard| {
            let _writing = lock.lock().unwrap_or_else(|p| p.into_inner());
            for op in ops {
                shard.update(op).map_err(classify)?;
            }
            shard.flush();
            Ok(())
        })
        .await
    }

    /// The payload indexes document deletes filter on (created once; kept by the shard).
    async fn ensure_indexes(&self) -> Result<(), SinkError> {
        let ops = [
            (fields::DOCUMENT_ID, PayloadSchemaType::Keyword),
            (fields::CHUNK_INDEX, PayloadSchemaType::Integer),
        ]
        .into_iter()
        .map(|(field, kind)| {
            UpdateOperation::FieldIndexOperation(FieldIndexOperations::CreateIndex(CreateIndex {
                field_name: field.parse().expect("a plain field name"),
                field_schema: Some(PayloadFieldSchema::FieldType(kind)),
            }))
        })
        .collect();
        self.apply(ops).await
    }

    /// Nearest points meeting `filter`, with payload. Takes no lock of ours: a search never
    /// waits for a write (the engine's own locks order them).
    pub async fn search_filtered(
        &self,
        vector: Vec<f32>,
        top_k: usize,
        filter: Option<Filter>,
    ) -> Result<Vec<Hit>, SinkError> {
        self.blocking(move |shard| {
            let req = SearchRequest {
                query: QueryEnum::Nearest(qdrant_edge::NamedQuery::default_dense(vector)),
                filter,
                params: None,
                limit: top_k,
                offset: 0,
                with_payload: Some(WithPayloadInterface::Bool(true)),
                with_vector: None,
                score_threshold: None,
            };
            let found = shard.search(req).map_err(classify)?;
            Ok(found
                .into_iter()
                .map(|p| to_hit(p.id, p.score, p.payload, None))
                .collect())
        })
        .await
    }

    /// Sparse and hybrid searches through the engine's Query API (prefetch + fusion), as
    /// Qdrant runs them.
    pub async fn query_filtered(
        &self,
        query: Query,
        top_k: usize,
        filter: Option<Filter>,
    ) -> Result<Vec<Hit>, SinkError> {
        let name = self.sparse.clone().ok_or_else(no_sparse)?;
        let sparse_query = move |v: SparseVector| {
            ScoringQuery::Vector(QueryEnum::Nearest(NamedQuery {
                query: VectorInternal::Sparse(edge_sparse(v)),
                using: Some(name.clone()),
            }))
        };
        let (prefetches, scoring) = match query {
            Query::Dense(v) => (
                Vec::new(),
                ScoringQuery::Vector(QueryEnum::Nearest(NamedQuery::default_dense(v))),
            ),
            Query::Sparse(v) => (Vec::new(), sparse_query(v)),
            Query::Hybrid {
                dense,
                sparse,
                fusion,
                prefetch,
            } => {
                let leg = |q: ScoringQuery| Prefetch {
                    prefetches: Vec::new(),
                    query: Some(q),
                    limit: prefetch,
                    params: None,
                    filter: filter.clone(),
                    score_threshold: None,
                };
                let fused = match fusion {
                    Fusion::Rrf { k, weights } => qdrant_edge::Fusion::Rrf {
                        k: k as usize,
                        weights: super::rrf_weights(weights)
                            .map(|w| w.iter().map(|w| OrderedFloat(*w)).collect()),
                    },
                    Fusion::Dbsf => qdrant_edge::Fusion::Dbsf,
                };
                (
                    vec![
                        leg(ScoringQuery::Vector(QueryEnum::Nearest(
                            NamedQuery::default_dense(dense),
                        ))),
                        leg(sparse_query(sparse)),
                    ],
                    ScoringQuery::Fusion(fused),
                )
            }
        };
        self.query_request(QueryRequest {
            prefetches,
            query: Some(scoring),
            filter,
            score_threshold: None,
            limit: top_k,
            offset: 0,
            params: None,
            with_vector: WithVector::Bool(false),
            with_payload: WithPayloadInterface::Bool(true),
        })
        .await
    }

    /// Runs one request of the engine's Query API (the test server's way in).
    pub async fn query_request(&self, req: QueryRequest) -> Result<Vec<Hit>, SinkError> {
        self.blocking(move |shard| {
            let found = shard.query(req).map_err(classify)?;
            Ok(found
                .into_iter()
                .map(|p| to_hit(p.id, p.score, p.payload, None))
                .collect())
        })
        .await
    }

    /// Every point with payload and vector, page by page (for tests and exports).
    pub async fn scroll_all(&self) -> Result<Vec<Hit>, SinkError> {
        self.blocking(|shard| {
            let mut out = Vec::new();
            let mut offset = None;
            loop {
                let req = qdrant_edge::ScrollRequest {
                    offset,
                    limit: Some(1000),
                    with_payload: Some(WithPayloadInterface::Bool(true)),
                    with_vector: WithVector::Bool(true),
                    ..Default::default()
                };
                let (page, next) = shard.scroll(req).map_err(err)?;
                out.extend(
                    page.into_iter()
                        .map(|r| to_hit(r.id, 0.0, r.payload, r.vector)),
                );
                match next {
                    Some(n) => offset = Some(n),
                    None => return Ok(out),
                }
            }
        })
        .await
    }
}

impl Sink for EmbeddedSink {
    async fn ensure_collection(&self, dim: usize) -> Result<(), SinkError> {
        let path = self.path.clone();
        let sparse = self.sparse.clone();
        let shard = tokio::task::spawn_blocking(move || -> Result<EdgeShard, SinkError> {
            if path.join("edge_config.json").exists() {
                let shard = EdgeShard::load(&path, None).map_err(err)?;
                if let Some(name) = &sparse {
                    let found: Vec<(String, bool)> = shard
                        .config()
                        .sparse_vectors
                        .iter()
                        .map(|(n, p)| (n.to_string(), p.modifier == Some(Modifier::Idf)))
                        .collect();
                    check_sparse(&path.display().to_string(), name, &found)?;
                }
                let existing = shard
                    .config()
                    .vectors
                    .get(qdrant_edge::DEFAULT_VECTOR_NAME)
                    .map(|v| (v.size, v.distance));
                if existing != Some((dim, Distance::Cosine)) {
                    return Err(SinkError::Permanent(format!(
                        "embedded store {} holds vectors {:?}, but the model makes {dim}-dimension cosine vectors; \
                         use another embedded.path or embedded.collection, or remove the folder",
                        path.display(),
                        existing
                    )));
                }
                Ok(shard)
            } else {
                std::fs::create_dir_all(&path).map_err(err)?;
                let mut config = EdgeConfig::builder().vector(
                    qdrant_edge::DEFAULT_VECTOR_NAME,
                    EdgeVectorParams::builder(dim, Distance::Cosine).build(),
                );
                if let Some(name) = &sparse {
                    config = config.sparse_vector(
                        name.as_str(),
                        EdgeSparseVectorParams::builder().modifier(Modifier::Idf).build(),
                    );
                }
                let config = config.build();
                EdgeShard::new(&path, config).map_err(err)
            }
        })
        .await
        .map_err(err)??;
        *self.shard.lock().expect("shard lock") = Some(Arc::new(shard));
        self.ensure_indexes().await
    }

    async fn write(&self, w: Write) -> Result<(), SinkError> {
        let mut ops = Vec::new();
        let name = self.sparse.as_deref();
        if !w.upserts.is_empty() {
            ops.push(upsert_op(w.upserts, name));
        }
        if !w.deletes.is_empty() {
            let ids = w.deletes.into_iter().map(PointId::Uuid).collect();
            ops.push(UpdateOperation::PointOperation(
                PointOperations::DeletePoints { ids },
            ));
        }
        if !w.stale.is_empty() {
            ops.push(UpdateOperation::PointOperation(
                PointOperations::DeletePointsByFilter(chunks_filter(&w.stale)),
            ));
        }
        if !w.last.is_empty() {
            ops.push(upsert_op(w.last, name));
        }
        self.apply(ops).await
    }

    async fn search(
        &self,
        query: Query,
        top_k: usize,
        filter: Option<MatchFilter>,
    ) -> Result<Vec<Hit>, SinkError> {
        let filter = filter.as_ref().map(match_filter).transpose()?;
        match query.effective() {
            None => Ok(Vec::new()),
            Some(Query::Dense(v)) => self.search_filtered(v, top_k, filter).await,
            Some(other) => self.query_filtered(other, top_k, filter).await,
        }
    }

    async fn retrieve(&self, ids: Vec<Uuid>, with_vectors: bool) -> Result<Vec<Hit>, SinkError> {
        self.blocking(move |shard| {
            let ids: Vec<PointId> = ids.into_iter().map(PointId::Uuid).collect();
            let found = shard
                .retrieve(
                    &ids,
                    Some(WithPayloadInterface::Bool(true)),
                    Some(WithVector::Bool(with_vectors)),
                )
                .map_err(err)?;
            Ok(found
                .into_iter()
                .map(|r| to_hit(r.id, 0.0, r.payload, r.vector))
                .collect())
        })
        .await
    }

    async fn count(&self) -> Result<usize, SinkError> {
        self.blocking(|shard| {
            shard
                .count(CountRequest {
                    filter: None,
                    exact: true,
                })
                .map_err(err)
        })
        .await
    }

    async fn ping(&self) -> Result<(), SinkError> {
        // A real look at the store: its folder is still there and the shard answers.
        let path = self.path.clone();
        self.blocking(move |shard| {
            if !path.join("edge_config.json").exists() {
                return Err(SinkError::Transient(format!(
                    "embedded store folder {} is gone or unreadable",
                    path.display()
                )));
            }
            shard
                .count(CountRequest {
                    filter: None,
                    exact: false,
                })
                .map(|_| ())
                .map_err(classify)
        })
        .await
    }
}
