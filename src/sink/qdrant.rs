//! Qdrant over gRPC (`qdrant-client`): the production store. Upserts and deletes use
//! `wait=true`, so a returned write is applied and persisted (per the server's WAL).

use std::time::Duration;

use qdrant_client::qdrant::{
    vector_output, vectors_config, vectors_output, CountPointsBuilder, CreateCollectionBuilder,
    DeletePointsBuilder, Distance, GetPointsBuilder, PointId, PointStruct, PointsIdsList,
    SearchPointsBuilder, UpsertPointsBuilder, VectorParamsBuilder,
};
use qdrant_client::{Qdrant, QdrantError};
use uuid::Uuid;

use super::{Hit, Point, Sink, SinkError};
use crate::settings::QdrantSettings;

pub struct QdrantSink {
    client: Qdrant,
    collection: String,
}

/// Server-side refusals that a retry will not fix; everything else (connection refused,
/// timeouts, unavailable, resource exhausted) is transient.
fn classify(e: QdrantError) -> SinkError {
    use tonic::Code;
    match &e {
        QdrantError::ResponseError { status }
            if matches!(
                status.code(),
                Code::InvalidArgument
                    | Code::Unauthenticated
                    | Code::PermissionDenied
                    | Code::NotFound
            ) =>
        {
            SinkError::Permanent(e.to_string())
        }
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

fn payload_json(
    p: std::collections::HashMap<String, qdrant_client::qdrant::Value>,
) -> serde_json::Map<String, serde_json::Value> {
    p.into_iter().map(|(k, v)| (k, v.into_json())).collect()
}

impl QdrantSink {
    pub fn connect(cfg: &QdrantSettings) -> Result<Self, SinkError> {
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
        })
    }
}

impl Sink for QdrantSink {
    async fn ensure_collection(&self, dim: usize) -> Result<(), SinkError> {
        let exists = self
            .client
            .collection_exists(&self.collection)
            .await
            .map_err(classify)?;
        if !exists {
            let created = self
                .client
                .create_collection(
                    CreateCollectionBuilder::new(&self.collection)
                        .vectors_config(VectorParamsBuilder::new(dim as u64, Distance::Cosine)),
                )
                .await;
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
            .and_then(|p| p.vectors_config)
            .and_then(|v| v.config);
        match params {
            Some(vectors_config::Config::Params(p))
                if p.size == dim as u64 && p.distance == Distance::Cosine as i32 =>
            {
                Ok(())
            }
            other => Err(SinkError::Permanent(format!(
                "Qdrant collection {:?} exists with vectors {other:?}, but the model makes one unnamed \
                 {dim}-dimension cosine vector; set qdrant.collection to another name or recreate it",
                self.collection
            ))),
        }
    }

    async fn write(&self, upserts: Vec<Point>, deletes: Vec<Uuid>) -> Result<(), SinkError> {
        if !upserts.is_empty() {
            let points: Vec<PointStruct> = upserts
                .into_iter()
                .map(|p| PointStruct::new(p.id, p.vector, p.payload))
                .collect();
            self.client
                .upsert_points(UpsertPointsBuilder::new(&self.collection, points).wait(true))
                .await
                .map_err(classify)?;
        }
        if !deletes.is_empty() {
            let ids: Vec<PointId> = deletes.into_iter().map(PointId::from).collect();
            self.client
                .delete_points(
                    DeletePointsBuilder::new(&self.collection)
                        .points(PointsIdsList { ids })
                        .wait(true),
                )
                .await
                .map_err(classify)?;
        }
        Ok(())
    }

    async fn search(&self, vector: Vec<f32>, top_k: usize) -> Result<Vec<Hit>, SinkError> {
        let res = self
            .client
            .search_points(
                SearchPointsBuilder::new(&self.collection, vector, top_k as u64).with_payload(true),
            )
            .await
            .map_err(classify)?;
        Ok(res
            .result
            .into_iter()
            .map(|p| Hit {
                id: id_string(p.id),
                score: p.score,
                payload: payload_json(p.payload),
                vector: None,
            })
            .collect())
    }

    async fn retrieve(&self, ids: Vec<Uuid>) -> Result<Vec<Hit>, SinkError> {
        let ids: Vec<PointId> = ids.into_iter().map(PointId::from).collect();
        let res = self
            .client
            .get_points(
                GetPointsBuilder::new(&self.collection, ids)
                    .with_payload(true)
                    .with_vectors(true),
            )
            .await
            .map_err(classify)?;
        Ok(res
            .result
            .into_iter()
            .map(|p| {
                #[allow(deprecated)]
                let vector = p.vectors.and_then(|v| match v.vectors_options {
                    Some(vectors_output::VectorsOptions::Vector(v)) => match v.vector {
                        Some(vector_output::Vector::Dense(d)) => Some(d.data),
                        // Servers before 1.13 fill only the deprecated field.
                        None => Some(v.data),
                        _ => None,
                    },
                    _ => None,
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
        self.client
            .health_check()
            .await
            .map(|_| ())
            .map_err(classify)
    }
}
