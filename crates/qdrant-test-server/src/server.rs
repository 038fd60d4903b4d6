//! A Qdrant-protocol test server: qdrant-client's generated gRPC server traits, backed by
//! the embedded store (qdrant-edge, one shard per collection, on disk). It covers what
//! streambed uses (health check; collection create, exists, info, list, delete; point
//! upsert, delete by id or by filter, get, scroll, search, count, query with prefetch and
//! fusion; payload indexes) for UUID ids, one unnamed cosine vector and at most one named
//! sparse vector, and behaves like Qdrant 1.18 where streambed depends on it:
//! - `wait=true` answers after the operation is applied (and flushed); `wait=false` (the
//!   protocol's default) answers `Acknowledged` on acceptance and applies it later, in
//!   order with the collection's other writes;
//! - a request larger than the configured limit is refused (`OutOfRange`, tonic's own
//!   message), as by the proxies that keep gRPC's 4 MiB default;
//! - a wrong vector size, on upsert, search or query, is `InvalidArgument` naming the
//!   expected dimension; a vector name the collection lacks `InvalidArgument` ("Not
//!   existing vector name"); a missing collection `NotFound`; store failures `Internal`;
//! - with a sparse vector beside the default one, points come back with their vectors
//!   named (the default one as `""`), as Qdrant sends them;
//! - with an API key set, a call without one is `Unauthenticated`, with a wrong one
//!   `PermissionDenied`.
//!
//! Faults for tests, switched by files in the server's folder while it runs: `fail-writes`
//! (upserts and deletes answer `Unavailable`, reads still work) and `slow-writes` (holding
//! a number of milliseconds that each write waits before it is applied).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use qdrant_client::qdrant::collections_server::{Collections, CollectionsServer};
use qdrant_client::qdrant::points_selector::PointsSelectorOneOf;
use qdrant_client::qdrant::points_server::{Points, PointsServer};
use qdrant_client::qdrant::qdrant_server::{Qdrant, QdrantServer};
use qdrant_client::qdrant::{self as pb, vectors_config, Distance};
use qdrant_edge::{
    CreateIndex, FieldIndexOperations, PayloadFieldSchema, PayloadSchemaType, PointId,
    PointOperations, UpdateOperation,
};
use streambed::sink::embedded::{upsert_op, EmbeddedSink};
use streambed::sink::{Point, Sink, SinkError, SparseVector};
use tokio::sync::{mpsc, oneshot, Mutex};
use tonic::{Request, Response, Status};
use uuid::Uuid;

/// A write, applied by the collection's writer task in arrival order.
struct Write {
    ops: Vec<UpdateOperation>,
    /// `Some` for wait=true: told once applied.
    applied: Option<oneshot::Sender<Result<(), Status>>>,
}

struct Collection {
    sink: Arc<EmbeddedSink>,
    dim: usize,
    /// The sparse vector's name and whether it has the IDF modifier.
    sparse: Option<(String, bool)>,
    writes: mpsc::UnboundedSender<Write>,
}

/// What a collection's `sparse` file holds.
#[derive(serde::Serialize, serde::Deserialize)]
struct SparseFile {
    name: String,
    idf: bool,
}

impl Collection {
    async fn write(&self, ops: Vec<UpdateOperation>, wait: bool) -> Result<bool, Status> {
        let (tx, rx) = oneshot::channel();
        let w = Write {
            ops,
            applied: wait.then_some(tx),
        };
        self.writes
            .send(w)
            .map_err(|_| Status::unavailable("collection closed"))?;
        if wait {
            rx.await
                .map_err(|_| Status::unavailable("collection closed"))??;
        }
        Ok(wait)
    }
}

#[derive(Clone)]
pub struct TestServer {
    root: PathBuf,
    collections: Arc<Mutex<HashMap<String, Arc<Collection>>>>,
}

fn status(e: SinkError) -> Status {
    match e {
        SinkError::Transient(m) => Status::internal(m),
        SinkError::Rejected { detail, .. } => Status::invalid_argument(detail),
        SinkError::Permanent(m) => Status::invalid_argument(m),
    }
}

fn wrong_dim(expected: usize, got: usize) -> Status {
    Status::invalid_argument(format!(
        "Wrong input: Vector dimension error: expected dim: {expected}, got {got}"
    ))
}

/// Qdrant's API key check: `api-key: KEY` or `authorization: Bearer KEY`.
#[allow(clippy::result_large_err)]
fn check_key(expected: &Option<String>, r: &Request<()>) -> Result<(), Status> {
    let Some(expected) = expected else {
        return Ok(());
    };
    let md = r.metadata();
    let given = md
        .get("api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| {
            md.get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::to_string)
        });
    match given {
        None => Err(Status::unauthenticated(
            "Must provide an API key or an Authorization bearer token",
        )),
        Some(k) if &k == expected => Ok(()),
        Some(_) => Err(Status::permission_denied("Invalid API key or JWT")),
    }
}

fn unsupported(what: &str) -> Status {
    Status::unimplemented(format!(
        "{what} is not supported by the streambed test server"
    ))
}

fn uuid_of(id: &pb::PointId) -> Result<Uuid, Status> {
    use pb::point_id::PointIdOptions;
    match &id.point_id_options {
        Some(PointIdOptions::Uuid(u)) => {
            Uuid::parse_str(u).map_err(|e| Status::invalid_argument(format!("bad uuid: {e}")))
        }
        _ => Err(Status::invalid_argument(
            "this test server stores UUID point ids only",
        )),
    }
}

fn no_such_vector(name: &str) -> Status {
    Status::invalid_argument(format!(
        "Wrong input: Not existing vector name error: {name}"
    ))
}

#[allow(deprecated, clippy::result_large_err)]
fn dense_of(v: pb::Vector) -> Result<Vec<f32>, Status> {
    match v.vector {
        Some(pb::vector::Vector::Dense(d)) => Ok(d.data),
        None if v.indices.is_none() && !v.data.is_empty() => Ok(v.data),
        _ => Err(Status::invalid_argument(
            "Wrong input: the default vector must be dense",
        )),
    }
}

#[allow(deprecated, clippy::result_large_err)]
fn sparse_of(v: pb::Vector) -> Result<SparseVector, Status> {
    let (indices, values) = match v.vector {
        Some(pb::vector::Vector::Sparse(s)) => (s.indices, s.values),
        None if v.indices.is_some() => (v.indices.unwrap_or_default().data, v.data),
        _ => {
            return Err(Status::invalid_argument(
                "Wrong input: expected a sparse vector",
            ))
        }
    };
    if indices.len() != values.len() {
        return Err(Status::invalid_argument(
            "Validation error: indices and values must have the same length",
        ));
    }
    let mut sorted = indices.clone();
    sorted.sort_unstable();
    sorted.dedup();
    if sorted.len() != indices.len() {
        return Err(Status::invalid_argument(
            "Validation error: sparse vector indices must be unique",
        ));
    }
    Ok(SparseVector::from_pairs(indices.into_iter().zip(values)))
}

/// A point's vectors: the default (dense) one, and the named sparse one where given.
#[allow(clippy::result_large_err)]
fn vectors_of(
    v: Option<pb::Vectors>,
    sparse_name: Option<&str>,
) -> Result<(Vec<f32>, Option<SparseVector>), Status> {
    use pb::vectors::VectorsOptions;
    match v.and_then(|v| v.vectors_options) {
        Some(VectorsOptions::Vector(v)) => Ok((dense_of(v)?, None)),
        Some(VectorsOptions::Vectors(named)) => {
            let mut dense = None;
            let mut sparse = None;
            for (name, v) in named.vectors {
                if name.is_empty() {
                    dense = Some(dense_of(v)?);
                } else if Some(name.as_str()) == sparse_name {
                    sparse = Some(sparse_of(v)?);
                } else {
                    return Err(no_such_vector(&name));
                }
            }
            let dense = dense.ok_or_else(|| {
                Status::invalid_argument("Wrong input: the default vector is missing")
            })?;
            Ok((dense, sparse))
        }
        None => Err(Status::invalid_argument("point without vectors")),
    }
}

#[allow(deprecated)]
fn vector_output(v: Vec<f32>) -> pb::VectorsOutput {
    pb::VectorsOutput {
        vectors_options: Some(pb::vectors_output::VectorsOptions::Vector(
            pb::VectorOutput {
                data: v.clone(),
                vector: Some(pb::vector_output::Vector::Dense(pb::DenseVector {
                    data: v,
                })),
                ..Default::default()
            },
        )),
    }
}

fn wants_vectors(w: Option<pb::WithVectorsSelector>) -> bool {
    w.is_some_and(|w| {
        matches!(
            w.selector_options,
            Some(pb::with_vectors_selector::SelectorOptions::Enable(true))
        )
    })
}

/// A point as Qdrant returns it; in a collection with a sparse vector the vectors come
/// named, the default one as `""`.
fn retrieved(h: streambed::sink::Hit, with_vectors: bool, named: bool) -> pb::RetrievedPoint {
    let vectors = if with_vectors { h.vector } else { None }.map(|v| {
        let out = vector_output(v);
        if !named {
            return out;
        }
        let Some(pb::vectors_output::VectorsOptions::Vector(single)) = out.vectors_options else {
            unreachable!("vector_output makes one vector")
        };
        pb::VectorsOutput {
            vectors_options: Some(pb::vectors_output::VectorsOptions::Vectors(
                pb::NamedVectorsOutput {
                    vectors: HashMap::from([(String::new(), single)]),
                },
            )),
        }
    });
    pb::RetrievedPoint {
        id: Some(pb::PointId::from(h.id)),
        payload: payload_grpc(h.payload),
        vectors,
        ..Default::default()
    }
}

fn scored_point(h: streambed::sink::Hit) -> pb::ScoredPoint {
    pb::ScoredPoint {
        id: Some(pb::PointId::from(h.id)),
        payload: payload_grpc(h.payload),
        score: h.score,
        ..Default::default()
    }
}

fn payload_grpc(p: serde_json::Map<String, serde_json::Value>) -> HashMap<String, pb::Value> {
    qdrant_client::Payload::from(p).into()
}

/// A gRPC filter as the engine's: through Qdrant's JSON shape, which the engine reads.
#[allow(clippy::result_large_err)]
fn edge_filter(f: &pb::Filter) -> Result<qdrant_edge::Filter, Status> {
    serde_json::from_value(filter_json(f)?)
        .map_err(|e| Status::invalid_argument(format!("bad filter: {e}")))
}

#[allow(clippy::result_large_err)]
fn filter_json(f: &pb::Filter) -> Result<serde_json::Value, Status> {
    if f.min_should.is_some() {
        return Err(unsupported("min_should"));
    }
    let list = |cs: &[pb::Condition]| -> Result<serde_json::Value, Status> {
        Ok(serde_json::Value::Array(
            cs.iter().map(condition_json).collect::<Result<_, _>>()?,
        ))
    };
    let mut o = serde_json::Map::new();
    for (k, cs) in [
        ("must", &f.must),
        ("should", &f.should),
        ("must_not", &f.must_not),
    ] {
        if !cs.is_empty() {
            o.insert(k.into(), list(cs)?);
        }
    }
    Ok(serde_json::Value::Object(o))
}

#[allow(clippy::result_large_err)]
fn condition_json(c: &pb::Condition) -> Result<serde_json::Value, Status> {
    use pb::condition::ConditionOneOf as C;
    use pb::r#match::MatchValue as M;
    use serde_json::json;
    Ok(match &c.condition_one_of {
        Some(C::Field(fc)) => {
            let mut o = json!({ "key": fc.key });
            if let Some(m) = fc.r#match.as_ref().and_then(|m| m.match_value.as_ref()) {
                o["match"] = match m {
                    M::Keyword(v) => json!({ "value": v }),
                    M::Integer(v) => json!({ "value": v }),
                    M::Boolean(v) => json!({ "value": v }),
                    M::Text(v) => json!({ "text": v }),
                    M::Keywords(v) => json!({ "any": v.strings }),
                    M::Integers(v) => json!({ "any": v.integers }),
                    M::ExceptKeywords(v) => json!({ "except": v.strings }),
                    M::ExceptIntegers(v) => json!({ "except": v.integers }),
                    _ => return Err(unsupported("this match")),
                };
            }
            if let Some(r) = &fc.range {
                let mut range = serde_json::Map::new();
                for (k, v) in [("lt", r.lt), ("gt", r.gt), ("gte", r.gte), ("lte", r.lte)] {
                    if let Some(v) = v {
                        range.insert(k.into(), json!(v));
                    }
                }
                o["range"] = serde_json::Value::Object(range);
            }
            o
        }
        Some(C::Filter(f)) => filter_json(f)?,
        Some(C::HasId(h)) => {
            let ids = h
                .has_id
                .iter()
                .map(|id| uuid_of(id).map(|u| u.to_string()))
                .collect::<Result<Vec<_>, _>>()?;
            json!({ "has_id": ids })
        }
        Some(C::IsEmpty(e)) => json!({ "is_empty": { "key": e.key } }),
        Some(C::IsNull(e)) => json!({ "is_null": { "key": e.key } }),
        _ => return Err(unsupported("this filter condition")),
    })
}

/// One prefetch of a query as the engine's.
#[allow(clippy::result_large_err)]
fn prefetch(c: &Collection, p: &pb::PrefetchQuery) -> Result<qdrant_edge::Prefetch, Status> {
    if p.lookup_from.is_some() || p.score_threshold.is_some() {
        return Err(unsupported(
            "prefetch with lookup_from or a score threshold",
        ));
    }
    Ok(qdrant_edge::Prefetch {
        prefetches: p
            .prefetch
            .iter()
            .map(|q| prefetch(c, q))
            .collect::<Result<_, _>>()?,
        query: p
            .query
            .as_ref()
            .map(|q| scoring(c, q, p.using.as_deref()))
            .transpose()?,
        limit: p.limit.unwrap_or(10) as usize,
        params: None,
        filter: p.filter.as_ref().map(edge_filter).transpose()?,
        score_threshold: None,
    })
}

/// A query (nearest by a dense or sparse vector, or a fusion) as the engine's.
#[allow(clippy::result_large_err)]
fn scoring(
    c: &Collection,
    q: &pb::Query,
    using: Option<&str>,
) -> Result<qdrant_edge::ScoringQuery, Status> {
    use pb::query::Variant;
    use pb::vector_input::Variant as Input;
    use qdrant_edge::{NamedQuery, QueryEnum, ScoringQuery, VectorInternal};
    let using = using.filter(|u| !u.is_empty());
    let rrf = |k: Option<u32>, weights: &[f32]| {
        qdrant_edge::Fusion::Rrf {
            // Qdrant's default k.
            k: k.unwrap_or(2) as usize,
            weights: (!weights.is_empty()).then(|| {
                weights
                    .iter()
                    .map(|w| qdrant_edge::external::ordered_float::OrderedFloat(*w))
                    .collect()
            }),
        }
    };
    match q.variant.as_ref() {
        Some(Variant::Nearest(v)) => {
            let vector = match v.variant.as_ref() {
                Some(Input::Dense(d)) => {
                    if let Some(name) = using {
                        return Err(no_such_vector(name));
                    }
                    if d.data.len() != c.dim {
                        return Err(wrong_dim(c.dim, d.data.len()));
                    }
                    VectorInternal::Dense(d.data.clone())
                }
                Some(Input::Sparse(sv)) => {
                    let name = using.unwrap_or_default();
                    if c.sparse.as_ref().is_none_or(|(n, _)| n != name) {
                        return Err(no_such_vector(name));
                    }
                    let v = sparse_of(pb::Vector {
                        vector: Some(pb::vector::Vector::Sparse(pb::SparseVector {
                            values: sv.values.clone(),
                            indices: sv.indices.clone(),
                        })),
                        ..Default::default()
                    })?;
                    VectorInternal::Sparse(qdrant_edge::SparseVector {
                        indices: v.indices,
                        values: v.values,
                    })
                }
                _ => return Err(unsupported("this query vector")),
            };
            Ok(ScoringQuery::Vector(QueryEnum::Nearest(NamedQuery {
                query: vector,
                using: using.map(str::to_string),
            })))
        }
        Some(Variant::Fusion(f)) => match pb::Fusion::try_from(*f) {
            Ok(pb::Fusion::Rrf) => Ok(ScoringQuery::Fusion(rrf(None, &[]))),
            Ok(pb::Fusion::Dbsf) => Ok(ScoringQuery::Fusion(qdrant_edge::Fusion::Dbsf)),
            Err(_) => Err(Status::invalid_argument("unknown fusion")),
        },
        Some(Variant::Rrf(r)) => Ok(ScoringQuery::Fusion(rrf(r.k, &r.weights))),
        _ => Err(unsupported("this query")),
    }
}

fn elapsed(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

impl TestServer {
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            collections: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Opens a collection created earlier (its folder holds the shard).
    async fn open(&self, name: &str) -> Result<Option<Arc<Collection>>, Status> {
        if name.is_empty() || name.contains(['/', '\\', '.']) {
            return Err(Status::invalid_argument("bad collection name"));
        }
        let mut map = self.collections.lock().await;
        if let Some(c) = map.get(name) {
            return Ok(Some(c.clone()));
        }
        let dir = self.root.join(name);
        let Ok(text) = std::fs::read_to_string(dir.join("dim")) else {
            return Ok(None);
        };
        let dim: usize = text
            .trim()
            .parse()
            .map_err(|_| Status::internal("bad dim file"))?;
        let sparse: Option<(String, bool)> = match std::fs::read_to_string(dir.join("sparse")) {
            Ok(t) => {
                let f: SparseFile =
                    serde_json::from_str(&t).map_err(|_| Status::internal("bad sparse file"))?;
                Some((f.name, f.idf))
            }
            Err(_) => None,
        };
        let sink = Arc::new(EmbeddedSink::open(
            dir.join("shard"),
            sparse.as_ref().map(|(n, _)| n.clone()),
        ));
        sink.ensure_collection(dim).await.map_err(status)?;
        let (writes, mut rx) = mpsc::unbounded_channel::<Write>();
        let writer = sink.clone();
        let slow = self.root.join("slow-writes");
        tokio::spawn(async move {
            while let Some(w) = rx.recv().await {
                if let Some(ms) = std::fs::read_to_string(&slow)
                    .ok()
                    .and_then(|t| t.trim().parse::<u64>().ok())
                {
                    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                }
                let r = writer.apply(w.ops).await.map_err(status);
                if let Err(e) = &r {
                    tracing::warn!(error = %e, "write failed");
                }
                if let Some(tx) = w.applied {
                    let _ = tx.send(r);
                }
            }
        });
        let c = Arc::new(Collection {
            sink,
            dim,
            sparse,
            writes,
        });
        map.insert(name.to_string(), c.clone());
        Ok(Some(c))
    }

    /// The `fail-writes` fault (see the module comment).
    #[allow(clippy::result_large_err)]
    fn injected_write_fault(&self) -> Result<(), Status> {
        if self.root.join("fail-writes").exists() {
            return Err(Status::unavailable("injected fault: writes unavailable"));
        }
        Ok(())
    }

    async fn must(&self, name: &str) -> Result<Arc<Collection>, Status> {
        self.open(name)
            .await?
            .ok_or_else(|| Status::not_found(format!("Collection `{name}` doesn't exist!")))
    }

    /// Serves on `listener` until `shutdown` resolves.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        max_request_bytes: usize,
        api_key: Option<String>,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        use tonic::service::interceptor::InterceptedService;
        let incoming = tokio_stream_listener(listener);
        let auth = move |r: Request<()>| check_key(&api_key, &r).map(|()| r);
        tonic::transport::Server::builder()
            .add_service(InterceptedService::new(
                QdrantServer::new(self.clone()).max_decoding_message_size(max_request_bytes),
                auth.clone(),
            ))
            .add_service(InterceptedService::new(
                CollectionsServer::new(self.clone()).max_decoding_message_size(max_request_bytes),
                auth.clone(),
            ))
            .add_service(InterceptedService::new(
                PointsServer::new(self)
                    .max_decoding_message_size(max_request_bytes)
                    .max_encoding_message_size(usize::MAX),
                auth,
            ))
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await?;
        Ok(())
    }
}

fn tokio_stream_listener(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |l| async move {
        let r = l.accept().await.map(|(s, _)| s);
        Some((r, l))
    })
}

#[tonic::async_trait]
impl Qdrant for TestServer {
    async fn health_check(
        &self,
        _: Request<pb::HealthCheckRequest>,
    ) -> Result<Response<pb::HealthCheckReply>, Status> {
        Ok(Response::new(pb::HealthCheckReply {
            title: "streambed qdrant test server".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            commit: None,
        }))
    }
}

#[tonic::async_trait]
impl Collections for TestServer {
    async fn get(
        &self,
        r: Request<pb::GetCollectionInfoRequest>,
    ) -> Result<Response<pb::GetCollectionInfoResponse>, Status> {
        let t = Instant::now();
        let c = self.must(&r.get_ref().collection_name).await?;
        let points = c.sink.count().await.map_err(status)? as u64;
        let params = pb::CollectionParams {
            shard_number: 1,
            vectors_config: Some(pb::VectorsConfig {
                config: Some(vectors_config::Config::Params(pb::VectorParams {
                    size: c.dim as u64,
                    distance: Distance::Cosine as i32,
                    ..Default::default()
                })),
            }),
            sparse_vectors_config: c.sparse.as_ref().map(|(name, idf)| pb::SparseVectorConfig {
                map: HashMap::from([(
                    name.clone(),
                    pb::SparseVectorParams {
                        index: None,
                        modifier: idf.then_some(pb::Modifier::Idf as i32),
                    },
                )]),
            }),
            ..Default::default()
        };
        Ok(Response::new(pb::GetCollectionInfoResponse {
            result: Some(pb::CollectionInfo {
                status: pb::CollectionStatus::Green as i32,
                segments_count: 1,
                config: Some(pb::CollectionConfig {
                    params: Some(params),
                    ..Default::default()
                }),
                points_count: Some(points),
                ..Default::default()
            }),
            time: elapsed(t),
        }))
    }

    async fn list(
        &self,
        _: Request<pb::ListCollectionsRequest>,
    ) -> Result<Response<pb::ListCollectionsResponse>, Status> {
        let t = Instant::now();
        let mut collections = Vec::new();
        if let Ok(dir) = std::fs::read_dir(&self.root) {
            for e in dir.flatten() {
                if e.path().join("dim").exists() {
                    collections.push(pb::CollectionDescription {
                        name: e.file_name().to_string_lossy().into_owned(),
                    });
                }
            }
        }
        Ok(Response::new(pb::ListCollectionsResponse {
            collections,
            time: elapsed(t),
        }))
    }

    async fn create(
        &self,
        r: Request<pb::CreateCollection>,
    ) -> Result<Response<pb::CollectionOperationResponse>, Status> {
        let t = Instant::now();
        let req = r.into_inner();
        if self.open(&req.collection_name).await?.is_some() {
            return Err(Status::already_exists(format!(
                "Collection `{}` already exists!",
                req.collection_name
            )));
        }
        let params = match req.vectors_config.and_then(|v| v.config) {
            Some(vectors_config::Config::Params(p)) => p,
            _ => return Err(unsupported("named vectors")),
        };
        if params.distance != Distance::Cosine as i32 {
            return Err(unsupported("a distance other than cosine"));
        }
        let sparse = req.sparse_vectors_config.map(|c| c.map).unwrap_or_default();
        if sparse.len() > 1 {
            return Err(unsupported("more than one sparse vector"));
        }
        let sparse = sparse.into_iter().next().map(|(name, p)| SparseFile {
            name,
            idf: p.modifier == Some(pb::Modifier::Idf as i32),
        });
        let dir = self.root.join(&req.collection_name);
        std::fs::create_dir_all(&dir).map_err(|e| Status::internal(e.to_string()))?;
        if let Some(f) = &sparse {
            std::fs::write(
                dir.join("sparse"),
                serde_json::to_string(f).expect("plain struct"),
            )
            .map_err(|e| Status::internal(e.to_string()))?;
        }
        // Written last: its presence makes the collection exist.
        std::fs::write(dir.join("dim"), params.size.to_string())
            .map_err(|e| Status::internal(e.to_string()))?;
        self.must(&req.collection_name).await?;
        Ok(Response::new(pb::CollectionOperationResponse {
            result: true,
            time: elapsed(t),
        }))
    }

    async fn update(
        &self,
        _: Request<pb::UpdateCollection>,
    ) -> Result<Response<pb::CollectionOperationResponse>, Status> {
        Err(unsupported("update collection"))
    }

    async fn delete(
        &self,
        r: Request<pb::DeleteCollection>,
    ) -> Result<Response<pb::CollectionOperationResponse>, Status> {
        let t = Instant::now();
        let name = r.into_inner().collection_name;
        let existed = self.open(&name).await?.is_some();
        self.collections.lock().await.remove(&name);
        if existed {
            std::fs::remove_dir_all(self.root.join(&name))
                .map_err(|e| Status::internal(e.to_string()))?;
        }
        Ok(Response::new(pb::CollectionOperationResponse {
            result: existed,
            time: elapsed(t),
        }))
    }

    async fn update_aliases(
        &self,
        _: Request<pb::ChangeAliases>,
    ) -> Result<Response<pb::CollectionOperationResponse>, Status> {
        Err(unsupported("aliases"))
    }

    async fn list_collection_aliases(
        &self,
        _: Request<pb::ListCollectionAliasesRequest>,
    ) -> Result<Response<pb::ListAliasesResponse>, Status> {
        Err(unsupported("aliases"))
    }

    async fn list_aliases(
        &self,
        _: Request<pb::ListAliasesRequest>,
    ) -> Result<Response<pb::ListAliasesResponse>, Status> {
        Err(unsupported("aliases"))
    }

    async fn collection_cluster_info(
        &self,
        _: Request<pb::CollectionClusterInfoRequest>,
    ) -> Result<Response<pb::CollectionClusterInfoResponse>, Status> {
        Err(unsupported("cluster info"))
    }

    async fn collection_exists(
        &self,
        r: Request<pb::CollectionExistsRequest>,
    ) -> Result<Response<pb::CollectionExistsResponse>, Status> {
        let t = Instant::now();
        let exists = self.open(&r.get_ref().collection_name).await?.is_some();
        Ok(Response::new(pb::CollectionExistsResponse {
            result: Some(pb::CollectionExists { exists }),
            time: elapsed(t),
        }))
    }

    async fn update_collection_cluster_setup(
        &self,
        _: Request<pb::UpdateCollectionClusterSetupRequest>,
    ) -> Result<Response<pb::UpdateCollectionClusterSetupResponse>, Status> {
        Err(unsupported("cluster setup"))
    }

    async fn create_shard_key(
        &self,
        _: Request<pb::CreateShardKeyRequest>,
    ) -> Result<Response<pb::CreateShardKeyResponse>, Status> {
        Err(unsupported("shard keys"))
    }

    async fn delete_shard_key(
        &self,
        _: Request<pb::DeleteShardKeyRequest>,
    ) -> Result<Response<pb::DeleteShardKeyResponse>, Status> {
        Err(unsupported("shard keys"))
    }

    async fn list_shard_keys(
        &self,
        _: Request<pb::ListShardKeysRequest>,
    ) -> Result<Response<pb::ListShardKeysResponse>, Status> {
        Err(unsupported("shard keys"))
    }
}

fn done(t: Instant, applied: bool) -> Response<pb::PointsOperationResponse> {
    let status = if applied {
        pb::UpdateStatus::Completed
    } else {
        pb::UpdateStatus::Acknowledged
    };
    Response::new(pb::PointsOperationResponse {
        result: Some(pb::UpdateResult {
            operation_id: Some(0),
            status: status as i32,
        }),
        time: elapsed(t),
        ..Default::default()
    })
}

#[tonic::async_trait]
impl Points for TestServer {
    async fn upsert(
        &self,
        r: Request<pb::UpsertPoints>,
    ) -> Result<Response<pb::PointsOperationResponse>, Status> {
        let t = Instant::now();
        let req = r.into_inner();
        let c = self.must(&req.collection_name).await?;
        self.injected_write_fault()?;
        let mut points = Vec::with_capacity(req.points.len());
        for p in req.points {
            let id = uuid_of(
                p.id.as_ref()
                    .ok_or_else(|| Status::invalid_argument("point without id"))?,
            )?;
            let sparse_name = c.sparse.as_ref().map(|(n, _)| n.as_str());
            let (vector, sparse) = vectors_of(p.vectors, sparse_name)?;
            if vector.len() != c.dim {
                return Err(wrong_dim(c.dim, vector.len()));
            }
            let payload = qdrant_client::Payload::from(p.payload).into();
            points.push(Point {
                id,
                vector,
                sparse,
                payload,
            });
        }
        // The embedded store flushes every write, which is what wait=true promises.
        let name = c.sparse.as_ref().map(|(n, _)| n.as_str());
        let applied = c
            .write(vec![upsert_op(points, name)], req.wait.unwrap_or(false))
            .await?;
        Ok(done(t, applied))
    }

    async fn delete(
        &self,
        r: Request<pb::DeletePoints>,
    ) -> Result<Response<pb::PointsOperationResponse>, Status> {
        let t = Instant::now();
        let req = r.into_inner();
        let c = self.must(&req.collection_name).await?;
        self.injected_write_fault()?;
        let op = match req.points.and_then(|p| p.points_selector_one_of) {
            Some(PointsSelectorOneOf::Points(list)) => {
                let ids = list
                    .ids
                    .iter()
                    .map(|id| uuid_of(id).map(PointId::Uuid))
                    .collect::<Result<Vec<_>, _>>()?;
                PointOperations::DeletePoints { ids }
            }
            Some(PointsSelectorOneOf::Filter(f)) => {
                PointOperations::DeletePointsByFilter(edge_filter(&f)?)
            }
            None => return Err(Status::invalid_argument("delete without a selector")),
        };
        let applied = c
            .write(
                vec![UpdateOperation::PointOperation(op)],
                req.wait.unwrap_or(false),
            )
            .await?;
        Ok(done(t, applied))
    }

    async fn get(&self, r: Request<pb::GetPoints>) -> Result<Response<pb::GetResponse>, Status> {
        let t = Instant::now();
        let req = r.into_inner();
        let c = self.must(&req.collection_name).await?;
        let ids = req.ids.iter().map(uuid_of).collect::<Result<Vec<_>, _>>()?;
        let with_vectors = wants_vectors(req.with_vectors);
        let hits = c.sink.retrieve(ids, with_vectors).await.map_err(status)?;
        let named = c.sparse.is_some();
        let result = hits
            .into_iter()
            .map(|h| retrieved(h, with_vectors, named))
            .collect();
        Ok(Response::new(pb::GetResponse {
            result,
            time: elapsed(t),
            ..Default::default()
        }))
    }

    async fn search(
        &self,
        r: Request<pb::SearchPoints>,
    ) -> Result<Response<pb::SearchResponse>, Status> {
        let t = Instant::now();
        let req = r.into_inner();
        let c = self.must(&req.collection_name).await?;
        if let Some(name) = req.vector_name.as_deref().filter(|n| !n.is_empty()) {
            return Err(if c.sparse.as_ref().is_some_and(|(n, _)| n == name) {
                unsupported("searching the sparse vector with search (use query)")
            } else {
                no_such_vector(name)
            });
        }
        if req.vector.len() != c.dim {
            return Err(wrong_dim(c.dim, req.vector.len()));
        }
        let filter = req.filter.as_ref().map(edge_filter).transpose()?;
        let hits = c
            .sink
            .search_filtered(req.vector, req.limit as usize, filter)
            .await
            .map_err(status)?;
        let result = hits.into_iter().map(scored_point).collect();
        Ok(Response::new(pb::SearchResponse {
            result,
            time: elapsed(t),
            ..Default::default()
        }))
    }

    async fn count(
        &self,
        r: Request<pb::CountPoints>,
    ) -> Result<Response<pb::CountResponse>, Status> {
        let t = Instant::now();
        let req = r.into_inner();
        if req.filter.is_some() {
            return Err(unsupported("count with a filter"));
        }
        let c = self.must(&req.collection_name).await?;
        let count = c.sink.count().await.map_err(status)? as u64;
        Ok(Response::new(pb::CountResponse {
            result: Some(pb::CountResult { count }),
            time: elapsed(t),
            ..Default::default()
        }))
    }

    async fn update_vectors(
        &self,
        _: Request<pb::UpdatePointVectors>,
    ) -> Result<Response<pb::PointsOperationResponse>, Status> {
        Err(unsupported("update_vectors"))
    }

    async fn delete_vectors(
        &self,
        _: Request<pb::DeletePointVectors>,
    ) -> Result<Response<pb::PointsOperationResponse>, Status> {
        Err(unsupported("delete_vectors"))
    }

    async fn set_payload(
        &self,
        _: Request<pb::SetPayloadPoints>,
    ) -> Result<Response<pb::PointsOperationResponse>, Status> {
        Err(unsupported("set_payload"))
    }

    async fn overwrite_payload(
        &self,
        _: Request<pb::SetPayloadPoints>,
    ) -> Result<Response<pb::PointsOperationResponse>, Status> {
        Err(unsupported("overwrite_payload"))
    }

    async fn delete_payload(
        &self,
        _: Request<pb::DeletePayloadPoints>,
    ) -> Result<Response<pb::PointsOperationResponse>, Status> {
        Err(unsupported("delete_payload"))
    }

    async fn clear_payload(
        &self,
        _: Request<pb::ClearPayloadPoints>,
    ) -> Result<Response<pb::PointsOperationResponse>, Status> {
        Err(unsupported("clear_payload"))
    }

    async fn create_field_index(
        &self,
        r: Request<pb::CreateFieldIndexCollection>,
    ) -> Result<Response<pb::PointsOperationResponse>, Status> {
        let t = Instant::now();
        let req = r.into_inner();
        let c = self.must(&req.collection_name).await?;
        let kind = match pb::FieldType::try_from(req.field_type.unwrap_or(0)) {
            Ok(pb::FieldType::Keyword) => PayloadSchemaType::Keyword,
            Ok(pb::FieldType::Integer) => PayloadSchemaType::Integer,
            Ok(pb::FieldType::Float) => PayloadSchemaType::Float,
            Ok(pb::FieldType::Bool) => PayloadSchemaType::Bool,
            Ok(pb::FieldType::Uuid) => PayloadSchemaType::Uuid,
            _ => return Err(unsupported("this payload index type")),
        };
        let field_name = req
            .field_name
            .parse()
            .map_err(|_| Status::invalid_argument("bad field name"))?;
        let op =
            UpdateOperation::FieldIndexOperation(FieldIndexOperations::CreateIndex(CreateIndex {
                field_name,
                field_schema: Some(PayloadFieldSchema::FieldType(kind)),
            }));
        let applied = c.write(vec![op], req.wait.unwrap_or(false)).await?;
        Ok(done(t, applied))
    }

    async fn delete_field_index(
        &self,
        _: Request<pb::DeleteFieldIndexCollection>,
    ) -> Result<Response<pb::PointsOperationResponse>, Status> {
        Err(unsupported("delete_field_index"))
    }

    async fn create_vector_name(
        &self,
        _: Request<pb::CreateVectorNameRequest>,
    ) -> Result<Response<pb::PointsOperationResponse>, Status> {
        Err(unsupported("create_vector_name"))
    }

    async fn delete_vector_name(
        &self,
        _: Request<pb::DeleteVectorNameRequest>,
    ) -> Result<Response<pb::PointsOperationResponse>, Status> {
        Err(unsupported("delete_vector_name"))
    }

    async fn search_batch(
        &self,
        _: Request<pb::SearchBatchPoints>,
    ) -> Result<Response<pb::SearchBatchResponse>, Status> {
        Err(unsupported("search_batch"))
    }

    async fn search_groups(
        &self,
        _: Request<pb::SearchPointGroups>,
    ) -> Result<Response<pb::SearchGroupsResponse>, Status> {
        Err(unsupported("search_groups"))
    }

    async fn scroll(
        &self,
        r: Request<pb::ScrollPoints>,
    ) -> Result<Response<pb::ScrollResponse>, Status> {
        let t = Instant::now();
        let req = r.into_inner();
        if req.filter.is_some() || req.order_by.is_some() {
            return Err(unsupported("scroll with a filter or order"));
        }
        let c = self.must(&req.collection_name).await?;
        let with_vectors = wants_vectors(req.with_vectors);
        let from = req.offset.as_ref().map(uuid_of).transpose()?;
        let limit = req.limit.unwrap_or(10).max(1) as usize;
        let mut hits = c.sink.scroll_all().await.map_err(status)?;
        hits.sort_by_key(|h| Uuid::parse_str(&h.id).unwrap_or_default());
        let mut page: Vec<_> = hits
            .into_iter()
            .filter(|h| from.is_none_or(|f| Uuid::parse_str(&h.id).is_ok_and(|u| u >= f)))
            .take(limit + 1)
            .collect();
        let next_page_offset = (page.len() > limit).then(|| {
            let next = page.pop().expect("limit + 1 taken");
            pb::PointId::from(next.id)
        });
        let named = c.sparse.is_some();
        let result = page
            .into_iter()
            .map(|h| retrieved(h, with_vectors, named))
            .collect();
        Ok(Response::new(pb::ScrollResponse {
            next_page_offset,
            result,
            time: elapsed(t),
            ..Default::default()
        }))
    }

    async fn recommend(
        &self,
        _: Request<pb::RecommendPoints>,
    ) -> Result<Response<pb::RecommendResponse>, Status> {
        Err(unsupported("recommend"))
    }

    async fn recommend_batch(
        &self,
        _: Request<pb::RecommendBatchPoints>,
    ) -> Result<Response<pb::RecommendBatchResponse>, Status> {
        Err(unsupported("recommend_batch"))
    }

    async fn recommend_groups(
        &self,
        _: Request<pb::RecommendPointGroups>,
    ) -> Result<Response<pb::RecommendGroupsResponse>, Status> {
        Err(unsupported("recommend_groups"))
    }

    async fn discover(
        &self,
        _: Request<pb::DiscoverPoints>,
    ) -> Result<Response<pb::DiscoverResponse>, Status> {
        Err(unsupported("discover"))
    }

    async fn discover_batch(
        &self,
        _: Request<pb::DiscoverBatchPoints>,
    ) -> Result<Response<pb::DiscoverBatchResponse>, Status> {
        Err(unsupported("discover_batch"))
    }

    async fn update_batch(
        &self,
        _: Request<pb::UpdateBatchPoints>,
    ) -> Result<Response<pb::UpdateBatchResponse>, Status> {
        Err(unsupported("update_batch"))
    }

    async fn query(
        &self,
        r: Request<pb::QueryPoints>,
    ) -> Result<Response<pb::QueryResponse>, Status> {
        let t = Instant::now();
        let req = r.into_inner();
        let c = self.must(&req.collection_name).await?;
        if req.offset.unwrap_or(0) != 0 || req.score_threshold.is_some() {
            return Err(unsupported("query with an offset or a score threshold"));
        }
        let limit = req.limit.unwrap_or(10) as usize;
        let request = qdrant_edge::QueryRequest {
            prefetches: req
                .prefetch
                .iter()
                .map(|p| prefetch(&c, p))
                .collect::<Result<_, _>>()?,
            query: req
                .query
                .as_ref()
                .map(|q| scoring(&c, q, req.using.as_deref()))
                .transpose()?,
            filter: req.filter.as_ref().map(edge_filter).transpose()?,
            score_threshold: None,
            limit,
            offset: 0,
            params: None,
            with_vector: qdrant_edge::WithVector::Bool(false),
            with_payload: qdrant_edge::WithPayloadInterface::Bool(true),
        };
        let hits = c.sink.query_request(request).await.map_err(status)?;
        let result = hits.into_iter().map(scored_point).collect();
        Ok(Response::new(pb::QueryResponse {
            result,
            time: elapsed(t),
            ..Default::default()
        }))
    }

    async fn query_batch(
        &self,
        _: Request<pb::QueryBatchPoints>,
    ) -> Result<Response<pb::QueryBatchResponse>, Status> {
        Err(unsupported("query_batch"))
    }

    async fn query_groups(
        &self,
        _: Request<pb::QueryPointGroups>,
    ) -> Result<Response<pb::QueryGroupsResponse>, Status> {
        Err(unsupported("query_groups"))
    }

    async fn facet(
        &self,
        _: Request<pb::FacetCounts>,
    ) -> Result<Response<pb::FacetResponse>, Status> {
        Err(unsupported("facet"))
    }

    async fn search_matrix_pairs(
        &self,
        _: Request<pb::SearchMatrixPoints>,
    ) -> Result<Response<pb::SearchMatrixPairsResponse>, Status> {
        Err(unsupported("search_matrix_pairs"))
    }

    async fn search_matrix_offsets(
        &self,
        _: Request<pb::SearchMatrixPoints>,
    ) -> Result<Response<pb::SearchMatrixOffsetsResponse>, Status> {
        Err(unsupported("search_matrix_offsets"))
    }
}
