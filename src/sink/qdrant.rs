//! Qdrant over gRPC (`qdrant-client`): the production store. Upserts and deletes use
//! `wait=true`, so a returned write is applied and persisted (per the server's WAL).
//! Upserts are split so that no request exceeds `qdrant.max_request_bytes` (Qdrant itself
//! takes any size over gRPC, but tonic, grpc-go and most proxies in front of it keep
//! gRPC's 4 MiB default); the size is the exact protobuf length of each point.

use std::time::Duration;

use qdrant_client::qdrant::{
    vector_output, vectors_config, vectors_output, Condition, CountPointsBuilder,
    CreateCollectionBuilder, CreateFieldIndexCollectionBuilder, DeletePointsBuilder, Distance,
    FieldType, Filter, GetPointsBuilder, Modifier, NamedVectors, PointId, PointStruct,
    PointsIdsList, PrefetchQuery, QueryPointsBuilder, Range, RrfBuilder, SearchPointsBuilder,
    SparseVectorParams, SparseVectorsConfigBuilder, UpsertPointsBuilder, Vector,
    VectorParamsBuilder,
};
use qdrant_client::{Qdrant, QdrantError};
use uuid::Uuid;

use super::{
    check_sparse, fields, no_sparse, ChunkRange, Fusion, Hit, MatchFilter, Point, Query, Sink,
    SinkError, SparseVector, Write,
};
use crate::settings::QdrantSettings;

pub struct QdrantSink {
    client: Qdrant,
    collection: String,
    max_request_bytes: usize,
    /// The sparse vector's name, where the collection has one (`sparse.enabled`).
    sparse: Option<String>,
}

/// A point as Qdrant's: the dense vector is the collection's default (unnamed) vector, so
/// collections made before sparse vectors and every client that searches the default
/// vector keep working; the sparse one is named beside it (Qdrant's name for the default
/// vector is the empty string).
fn point_struct(p: Point, sparse_name: Option<&str>) -> PointStruct {
    match (p.sparse, sparse_name) {
        (Some(sv), Some(name)) if !sv.is_empty() => {
            let named = NamedVectors::default()
                .add_vector("", Vector::new_dense(p.vector))
                .add_vector(name, Vector::new_sparse(sv.indices, sv.values));
            PointStruct::new(p.id, named, p.payload)
        }
        _ => PointStruct::new(p.id, p.vector, p.payload),
    }
}

fn sparse_input(v: &SparseVector) -> qdrant_client::qdrant::VectorInput {
    qdrant_client::qdrant::VectorInput::new_sparse(v.indices.clone(), v.values.clone())
}

/// Points whose payload field is `document_id` of one of `ranges` and, where `from` > 0,
/// whose `chunk_index` is at least `from`.
pub fn chunks_filter(ranges: &[ChunkRange]) -> Filter {
    Filter::should(ranges.iter().map(|r| {
        let doc = Condition::matches(fields::DOCUMENT_ID, r.document.to_string());
        if r.from == 0 {
            doc
        } else {
            Filter::must([
                doc,
                Condition::range(
                    fields::CHUNK_INDEX,
                    Range {
                        gte: Some(f64::from(r.from)),
                        ..Default::default()
                    },
                ),
            ])
            .into()
        }
    }))
}

/// Every field equal to its value.
pub fn match_filter(f: &MatchFilter) -> Result<Filter, SinkError> {
    let conds = f
        .iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => Ok(Condition::matches(k.clone(), s.clone())),
            serde_json::Value::Bool(b) => Ok(Condition::matches(k.clone(), *b)),
            serde_json::Value::Number(n) if n.is_i64() => {
                Ok(Condition::matches(k.clone(), n.as_i64().expect("checked")))
            }
            other => Err(SinkError::Rejected {
                reason: super::REJECTED,
                detail: format!("filter on {k}: {other} is not a string, integer or boolean"),
            }),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Filter::must(conds))
}

/// Room left in a request for everything but the points (collection name, flags).
const REQUEST_OVERHEAD: usize = 1024;

/// Sorts a gRPC status into what the writer does with it:
/// - the points are at fault (invalid argument, out of range, failed precondition, a
///   message too large): `Rejected`, so the writer isolates them and dead-letters them;
/// - the store refuses all work (credentials, a missing collection, one whose vectors do
///   not fit the model, an endpoint that is not Qdrant): `Permanent`, the worker stops;
/// - everything else (connection refused, unavailable, deadline exceeded, overloaded):
///   `Transient`, retried.
pub fn classify_status(code: tonic::Code, message: &str) -> SinkError {
    use tonic::Code;
    let m = message.to_ascii_lowercase();
    let too_large = m.contains("too large") || m.contains("larger than") || m.contains("exceeds");
    let shape =
        m.contains("dimension") || m.contains("vector name") || m.contains("not existing vector");
    let text = format!("{code:?}: {message}");
    match code {
        Code::Unauthenticated | Code::PermissionDenied | Code::NotFound | Code::Unimplemented => {
            SinkError::Permanent(text)
        }
        Code::InvalidArgument if shape => SinkError::Permanent(text),
        Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
            SinkError::Rejected {
                reason: if too_large {
                    super::TOO_LARGE
                } else {
                    super::REJECTED
                },
                detail: text,
            }
        }
        Code::ResourceExhausted if too_large => SinkError::Rejected {
            reason: super::TOO_LARGE,
            detail: text,
        },
        _ => SinkError::Transient(text),
    }
}

fn classify(e: QdrantError) -> SinkError {
    match &e {
        QdrantError::ResponseError { status } => classify_status(status.code(), status.message()),
        _ => SinkError::Transient(e.to_string()),
    }
}

fn id_string(id: Option<PointId>) -> String {
    use qdrant_client::qdrant::point_id::PointIdOptions;
    match id.and_then(|p| p.point_id_options) {
        Some(PointIdOptions::Num(n)) => n.to_string(),
        Some(PointIdOptions::Uuid(u)) => u,
        None => String::new(),
    }
}

fn scored_hit(p: qdrant_client::qdrant::ScoredPoint) -> Hit {
    Hit {
        id: id_string(p.id),
        score: p.score,
        payload: payload_json(p.payload),
        vector: None,
    }
}

fn payload_json(
    p: std::collections::HashMap<String, qdrant_client::qdrant::Value>,
) -> serde_json::Map<String, serde_json::Value> {
    p.into_iter().map(|(k, v)| (k, v.into_json())).collect()
}

impl QdrantSink {
    /// The payload indexes document deletes filter on (idempotent: Qdrant answers an
    /// existing index of the same type with success).
    async fn ensure_indexes(&self) -> Result<(), SinkError> {
        for (field, kind) in [
            (fields::DOCUMENT_ID, FieldType::Keyword),
            (fields::CHUNK_INDEX, FieldType::Integer),
        ] {
            self.client
                .create_field_index(
                    CreateFieldIndexCollectionBuilder::new(&self.collection, field, kind)
                        .wait(true),
                )
                .await
                .map_err(classify)?;
        }
        Ok(())
    }

    /// Upserts `points` in requests under `max_request_bytes`.
    async fn upsert(&self, points: Vec<Point>) -> Result<(), SinkError> {
        if points.is_empty() {
            return Ok(());
        }
        let name = self.sparse.as_deref();
        let points: Vec<PointStruct> = points.into_iter().map(|p| point_struct(p, name)).collect();
        let budget = self
            .max_request_bytes
            .saturating_sub(REQUEST_OVERHEAD + self.collection.len());
        for chunk in split_by_size(points, budget)? {
            self.client
                .upsert_points(UpsertPointsBuilder::new(&self.collection, chunk).wait(true))
                .await
                .map_err(classify)?;
        }
        Ok(())
    }

    pub fn connect(cfg: &QdrantSettings, sparse: Option<String>) -> Result<Self, SinkError> {
        let mut b = Qdrant::from_url(&cfg.url)
            .timeout(Duration::from_millis(cfg.timeout_ms))
            .connect_timeout(Duration::from_millis(cfg.timeout_ms))
            .skip_compatibility_check();
        if !cfg.api_key.is_empty() {
            b = b.api_key(cfg.api_key.expose().to_string());
        }
        let client = b.build().map_err(|e| {
            SinkError::Permanent(format!("qdrant.url {:?} is not usable: {e}", cfg.url))
        })?;
        Ok(Self {
            client,
            collection: cfg.collection.clone(),
            max_request_bytes: cfg.max_request_bytes,
            sparse,
        })
    }

    /// Sparse and hybrid searches, through the Query API (prefetch + fusion in one
    /// request).
    async fn query(
        &self,
        query: Query,
        top_k: usize,
        filter: Option<Filter>,
    ) -> Result<Vec<Hit>, SinkError> {
        let name = self.sparse.as_deref().ok_or_else(no_sparse)?;
        let mut req = QueryPointsBuilder::new(&self.collection)
            .limit(top_k as u64)
            .with_payload(true);
        if let Some(f) = &filter {
            req = req.filter(f.clone());
        }
        req = match query {
            Query::Dense(_) => unreachable!("dense searches use search_points"),
            Query::Sparse(sv) => req
                .query(qdrant_client::qdrant::Query::new_nearest(sparse_input(&sv)))
                .using(name),
            Query::Hybrid {
                dense,
                sparse,
                fusion,
                prefetch,
            } => {
                let leg = |q: qdrant_client::qdrant::Query, using: Option<&str>| PrefetchQuery {
                    query: Some(q),
                    using: using.map(str::to_string),
                    filter: filter.clone(),
                    limit: Some(prefetch as u64),
                    ..Default::default()
                };
                let fused = match fusion {
                    Fusion::Rrf { k, weights } => {
                        let mut rrf = RrfBuilder::with_k(k);
                        if let Some(w) = super::rrf_weights(weights) {
                            rrf = rrf.weights(w.to_vec());
                        }
                        qdrant_client::qdrant::Query::new_rrf(rrf)
                    }
                    Fusion::Dbsf => qdrant_client::qdrant::Query::new_fusion(
                        qdrant_client::qdrant::Fusion::Dbsf,
                    ),
                };
                req.add_prefetch(leg(qdrant_client::qdrant::Query::new_nearest(dense), None))
                    .add_prefetch(leg(
                        qdrant_client::qdrant::Query::new_nearest(sparse_input(&sparse)),
                        Some(name),
                    ))
                    .query(fused)
            }
        };
        let res = self.client.query(req).await.map_err(classify)?;
        Ok(res.result.into_iter().map(scored_hit).collect())
    }
}

/// Splits points into requests of at most `budget` bytes of points each, by their exact
/// protobuf length (plus the field's tag and length prefix). A point larger than the
/// budget on its own is an error naming its size and the setting.
fn split_by_size(
    points: Vec<PointStruct>,
    budget: usize,
) -> Result<Vec<Vec<PointStruct>>, SinkError> {
    use prost::Message;
    let mut out: Vec<Vec<PointStruct>> = Vec::new();
    let mut size = 0usize;
    for p in points {
        let len = p.encoded_len();
        let framed = len + prost::length_delimiter_len(len) + 1;
        if framed > budget {
            return Err(SinkError::Rejected {
                reason: super::TOO_LARGE,
                detail: format!(
                    "a point of {len} bytes is larger than qdrant.max_request_bytes allows \
                     ({budget} bytes of points per request); raise the limit if every hop to \
                     Qdrant accepts it, or lower message.max_message_bytes"
                ),
            });
        }
        match out.last_mut() {
            Some(chunk) if size + framed <= budget => {
                chunk.push(p);
                size += framed;
            }
            _ => {
                out.push(vec![p]);
                size = framed;
            }
        }
    }
    Ok(out)
}

impl Sink for QdrantSink {
    async fn ensure_collection(&self, dim: usize) -> Result<(), SinkError> {
        let exists = self
            .client
            .collection_exists(&self.collection)
            .await
            .map_err(classify)?;
        if !exists {
            let mut create = CreateCollectionBuilder::new(&self.collection)
                .vectors_config(VectorParamsBuilder::new(dim as u64, Distance::Cosine));
            if let Some(name) = &self.sparse {
                let mut sparse = SparseVectorsConfigBuilder::default();
                sparse.add_named_vector_params(
                    name,
                    SparseVectorParams {
                        index: None,
                        modifier: Some(Modifier::Idf as i32),
                    },
                );
                create = create.sparse_vectors_config(sparse);
            }
            let created = self.client.create_collection(create).await;
            // Another replica may have created it first; fall through to the check.
            if let Err(e) = created {
                tracing::debug!(error = %e, "create_collection failed; checking the existing one");
            }
        }
        let info = self
            .client
            .collection_info(&self.collection)
            .await
            .map_err(classify)?;
        let params = info
            .result
            .and_then(|r| r.config)
            .and_then(|c| c.params)
            .unwrap_or_default();
        let sparse_names = params
            .sparse_vectors_config
            .as_ref()
            .map(|c| {
                c.map
                    .iter()
                    .map(|(n, p)| (n.clone(), p.modifier == Some(Modifier::Idf as i32)))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        match params.vectors_config.and_then(|v| v.config) {
            Some(vectors_config::Config::Params(p))
                if p.size == dim as u64 && p.distance == Distance::Cosine as i32 => {}
            other => {
                return Err(SinkError::Permanent(format!(
                    "Qdrant collection {:?} exists with vectors {other:?}, but the model makes one unnamed \
                     {dim}-dimension cosine vector; set qdrant.collection to another name or recreate it",
                    self.collection
                )))
            }
        }
        if let Some(name) = &self.sparse {
            check_sparse(&self.collection, name, &sparse_names)?;
        }
        self.ensure_indexes().await
    }

    async fn write(&self, w: Write) -> Result<(), SinkError> {
        self.upsert(w.upserts).await?;
        if !w.deletes.is_empty() {
            let ids: Vec<PointId> = w.deletes.into_iter().map(PointId::from).collect();
            self.client
                .delete_points(
                    DeletePointsBuilder::new(&self.collection)
                        .points(PointsIdsList { ids })
                        .wait(true),
                )
                .await
                .map_err(classify)?;
        }
        if !w.stale.is_empty() {
            self.client
                .delete_points(
                    DeletePointsBuilder::new(&self.collection)
                        .points(chunks_filter(&w.stale))
                        .wait(true),
                )
                .await
                .map_err(classify)?;
        }
        self.upsert(w.last).await
    }

    async fn search(
        &self,
        query: Query,
        top_k: usize,
        filter: Option<MatchFilter>,
    ) -> Result<Vec<Hit>, SinkError> {
        let filter = filter.as_ref().map(match_filter).transpose()?;
        let vector = match query.effective() {
            None => return Ok(Vec::new()),
            Some(Query::Dense(v)) => v,
            Some(other) => return self.query(other, top_k, filter).await,
        };
        let mut req =
            SearchPointsBuilder::new(&self.collection, vector, top_k as u64).with_payload(true);
        if let Some(f) = filter {
            req = req.filter(f);
        }
        let res = self.client.search_points(req).await.map_err(classify)?;
        Ok(res.result.into_iter().map(scored_hit).collect())
    }

    async fn retrieve(&self, ids: Vec<Uuid>, with_vectors: bool) -> Result<Vec<Hit>, SinkError> {
        let ids: Vec<PointId> = ids.into_iter().map(PointId::from).collect();
        let res = self
            .client
            .get_points(
                GetPointsBuilder::new(&self.collection, ids)
                    .with_payload(true)
                    .with_vectors(with_vectors),
            )
            .await
            .map_err(classify)?;
        Ok(res
            .result
            .into_iter()
            .map(|p| {
                #[allow(deprecated)]
                let dense = |v: qdrant_client::qdrant::VectorOutput| match v.vector {
                    Some(vector_output::Vector::Dense(d)) => Some(d.data),
                    // Servers before 1.13 fill only the deprecated field.
                    None => Some(v.data),
                    _ => None,
                };
                let vector = p.vectors.and_then(|v| match v.vectors_options {
                    Some(vectors_output::VectorsOptions::Vector(v)) => dense(v),
                    // With a sparse vector beside it, the default one comes named "".
                    Some(vectors_output::VectorsOptions::Vectors(mut named)) => {
                        named.vectors.remove("").and_then(dense)
                    }
                    None => None,
                });
                Hit {
                    id: id_string(p.id),
                    score: 0.0,
                    payload: payload_json(p.payload),
                    vector,
                }
            })
            .collect())
    }

    async fn count(&self) -> Result<usize, SinkError> {
        let res = self
            .client
            .count(CountPointsBuilder::new(&self.collection).exact(true))
            .await
            .map_err(classify)?;
        Ok(res.result.map_or(0, |r| r.count as usize))
    }

    async fn ping(&self) -> Result<(), SinkError> {
        // The server answers, and the collection is still there.
        if self
            .client
            .collection_exists(&self.collection)
            .await
            .map_err(classify)?
        {
            Ok(())
        } else {
            Err(SinkError::Permanent(format!(
                "Qdrant collection {:?} no longer exists",
                self.collection
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn statuses_are_classed_by_what_a_retry_would_do() {
        let class = |c, m| match classify_status(c, m) {
            SinkError::Transient(_) => "transient",
            SinkError::Rejected { reason, .. } => reason,
            SinkError::Permanent(_) => "fatal",
        };
        assert_eq!(class(Code::Unavailable, "connection refused"), "transient");
        assert_eq!(class(Code::DeadlineExceeded, "timeout"), "transient");
        assert_eq!(class(Code::ResourceExhausted, "rate limited"), "transient");
        assert_eq!(class(Code::Unauthenticated, "Invalid api-key"), "fatal");
        assert_eq!(class(Code::PermissionDenied, "read-only key"), "fatal");
        assert_eq!(
            class(Code::NotFound, "Collection `x` doesn't exist!"),
            "fatal"
        );
        assert_eq!(
            class(
                Code::InvalidArgument,
                "Wrong input: Vector dimension error: expected dim: 768, got 384"
            ),
            "fatal"
        );
        assert_eq!(
            class(Code::InvalidArgument, "payload too deep"),
            "store_rejected"
        );
        assert_eq!(
            class(Code::FailedPrecondition, "bad state"),
            "store_rejected"
        );
        assert_eq!(
            class(
                Code::OutOfRange,
                "Error, decoded message length too large: found 5000000 bytes, the limit is: 4194304 bytes"
            ),
            "too_large_for_store"
        );
        assert_eq!(
            class(
                Code::ResourceExhausted,
                "message larger than max (5000000 vs. 4194304)"
            ),
            "too_large_for_store"
        );
    }

    fn point(text_bytes: usize) -> PointStruct {
        let mut payload = serde_json::Map::new();
        payload.insert("text".into(), "가".repeat(text_bytes / 3).into());
        point_struct(
            Point {
                id: Uuid::from_u128(1),
                vector: vec![0.5f32; 384],
                sparse: Some(SparseVector::from_pairs((0..200).map(|i| (i * 7, 0.5)))),
                payload,
            },
            Some("bm25"),
        )
    }

    #[test]
    fn requests_stay_under_the_limit() {
        use prost::Message;
        let points: Vec<PointStruct> = (0..64).map(|_| point(900_000)).collect();
        let budget = 4 * 1024 * 1024 - REQUEST_OVERHEAD;
        let chunks = split_by_size(points, budget).unwrap();
        assert_eq!(chunks.iter().map(Vec::len).sum::<usize>(), 64);
        for c in &chunks {
            let req = qdrant_client::qdrant::UpsertPoints {
                collection_name: "streambed".into(),
                wait: Some(true),
                points: c.clone(),
                ..Default::default()
            };
            assert!(
                req.encoded_len() <= 4 * 1024 * 1024,
                "{}",
                req.encoded_len()
            );
        }
        assert!(chunks.len() >= 14, "{} chunks", chunks.len());
        let err = split_by_size(vec![point(5_000_000)], budget).unwrap_err();
        assert!(
            matches!(err, SinkError::Rejected { reason, ref detail } if reason == super::super::TOO_LARGE && detail.contains("qdrant.max_request_bytes")),
            "{err:?}"
        );
    }
}
